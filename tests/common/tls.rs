//! TLS: a throwaway CA and a localhost leaf, and stunnel.

use super::*;

/// A dev CA and a leaf for localhost, 127.0.0.1 and ::1, made with openssl once and cached in
/// target/test-media/certs. The keys are throwaway test keys.
#[derive(Debug)]
pub struct DevCerts {
    pub dir: PathBuf,
    /// The CA certificate (trust anchor for `--upstream-ca`, curl --cacert...).
    pub ca: PathBuf,
    /// The leaf certificate alone.
    pub cert: PathBuf,
    /// The leaf followed by the CA (what `--tls-cert` and stunnel's `cert` take).
    pub chain: PathBuf,
    /// The leaf's private key (PKCS#8 PEM).
    pub key: PathBuf,
}

pub fn dev_certs() -> &'static DevCerts {
    static CERTS: OnceLock<DevCerts> = OnceLock::new();
    CERTS.get_or_init(|| DevCerts::in_dir(cached(&media_dir().join("certs"), make_certs)))
}

/// The same, with RSA 2048 keys (CA and leaf): what most certificates in use still are, and
/// the key whose signature makes a TLS handshake costly (rtmpgate signs it off the executor),
/// cached in target/test-media/certs-rsa.
pub fn rsa_certs() -> &'static DevCerts {
    static CERTS: OnceLock<DevCerts> = OnceLock::new();
    CERTS.get_or_init(|| {
        DevCerts::in_dir(cached(&media_dir().join("certs-rsa"), |dir| {
            make_certs_with(dir, &["-newkey", "rsa:2048"])
        }))
    })
}

impl DevCerts {
    fn in_dir(dir: PathBuf) -> DevCerts {
        DevCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            chain: dir.join("chain.pem"),
            key: dir.join("key.pem"),
            dir,
        }
    }
}

pub(crate) fn make_certs(dir: &Path) {
    make_certs_with(
        dir,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    )
}

/// A CA and a localhost leaf in `dir`, both with the key openssl's `newkey` arguments name.
fn make_certs_with(dir: &Path, newkey: &[&str]) {
    let openssl = &peers().openssl;
    fs::create_dir_all(dir).expect("cannot create the certs directory");
    let t = Duration::from_secs(30);
    let ossl = |args: &[&str]| {
        let mut c = Command::new(openssl);
        c.current_dir(dir).args(args);
        run_ok(&mut c, t);
    };
    ossl(
        &[
            &["req", "-x509", "-nodes"][..],
            newkey,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "3650",
                "-subj",
                "/CN=rtmpgate test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    ossl(
        &[
            &["req", "-nodes"][..],
            newkey,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("cannot write leaf.ext");
    ossl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "825",
        "-extfile",
        "leaf.ext",
    ]);
    let leaf = fs::read_to_string(dir.join("cert.pem")).expect("cert.pem");
    let ca = fs::read_to_string(dir.join("ca.pem")).expect("ca.pem");
    fs::write(dir.join("chain.pem"), format!("{leaf}{ca}")).expect("cannot write chain.pem");
}

/// Which side of TLS stunnel plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Accepts TLS (with the dev certificate) and connects in plain TCP: a TLS front for a
    /// plain server, e.g. nginx-rtmp as an `rtmps://` upstream.
    Server,
    /// Accepts plain TCP and connects with TLS (no verification): lets a plain client reach a
    /// TLS listener.
    Client,
}

/// stunnel on a loopback port, forwarding to `connect`.
pub struct Stunnel {
    pub(crate) proc: Proc,
    pub(crate) dir: TempDir,
    pub(crate) port: u16,
}

impl Stunnel {
    pub fn start(connect: SocketAddr, mode: TlsMode) -> Stunnel {
        let p = peers();
        let certs = dev_certs();
        let mut last = String::new();
        for _ in 0..4 {
            let dir = temp_dir();
            let port = free_port();
            let mut conf = format!(
                "foreground = yes\npid =\nsyslog = no\ndebug = 4\n[rtmps]\n\
                 accept = 127.0.0.1:{port}\nconnect = {connect}\n"
            );
            match mode {
                TlsMode::Server => {
                    let _ = writeln!(
                        conf,
                        "cert = {}\nkey = {}",
                        certs.chain.display(),
                        certs.key.display()
                    );
                }
                TlsMode::Client => conf.push_str("client = yes\nsni = localhost\n"),
            }
            let path = dir.path().join("stunnel.conf");
            fs::write(&path, conf).expect("cannot write stunnel.conf");
            let mut cmd = Command::new(&p.stunnel);
            cmd.arg(&path);
            let mut proc = Proc::spawn("stunnel", cmd);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let up = wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running());
            if up && proc.is_running() {
                return Stunnel { proc, dir, port };
            }
            proc.kill();
            last = proc.log();
        }
        panic!("stunnel did not start; its output:\n{last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
