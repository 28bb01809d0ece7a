//! TLS server and client configuration, PEM loading, SNI certificates (servers run TLS through
//! [`crate::net::tls_stream`], clients through tokio-rustls).
//!
//! Only TLS 1.2 and 1.3 with the aws-lc-rs provider. Certificates and keys are read from PEM
//! through rustls-pki-types; every error names the file and says what to do about it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::SupportedCipherSuite;

use crate::metrics::ChainKey;
use crate::net::tls_stream::{HelloName, HelloOffer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The dev chain (leaf + CA) from `certs/`, built into the binary so `cargo run` works from
/// any directory. Its private key is public: for testing only. Only in builds with the
/// `dev-cert` feature (the default; the container image is built without it).
#[cfg(any(test, feature = "dev-cert"))]
pub const DEV_CERT_PEM: &[u8] = include_bytes!("../../certs/localhost.pem");
/// The dev private key matching [`DEV_CERT_PEM`]. Public, testing only.
#[cfg(any(test, feature = "dev-cert"))]
pub const DEV_KEY_PEM: &[u8] = include_bytes!("../../certs/localhost.key");

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // Each variant keeps the error underneath as its source and also says it in the message
    // (log lines show `{e}` alone; `reload::report` drops a cause the message already says).
    #[error("cannot read {what} file {path}: {error}; check the path and its permissions")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{what} file {path} is not PEM ({}); expected '-----BEGIN ...-----' sections (convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`)", pem_detail(.source))]
    NotPem {
        what: &'static str,
        path: PathBuf,
        /// None when the file has no PEM section at all.
        #[source]
        source: Option<rustls_pki_types::pem::Error>,
    },
    #[error("a TLS listener needs a certificate and none is configured, and this build has no built-in dev certificate (built without the dev-cert feature, as the container image is): mount your certificate and key and set [tls] cert and key (or --tls-cert and --tls-key)")]
    NoDevCertificate,
    #[error("certificate file {path} holds no certificate (no '-----BEGIN CERTIFICATE-----' section); pass the certificate chain, for example Let's Encrypt's fullchain.pem")]
    NoCertificate { path: PathBuf },
    #[error("key file {path} holds no private key (no '-----BEGIN PRIVATE KEY-----', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY' section); pass the private key, for example Let's Encrypt's privkey.pem")]
    NoPrivateKey { path: PathBuf },
    #[error("private key in {path} cannot be used: {source}; use an RSA, ECDSA (P-256/P-384) or Ed25519 key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate {path} cannot be parsed: {source}")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("private key {key} does not match the certificate {cert}; pass the key that belongs to the first certificate in the chain (fullchain.pem goes with privkey.pem)")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("CA file {path} holds no certificate usable as a trust anchor: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// What is wrong with a file that is not PEM: the parser's error, or no PEM section at all.
fn pem_detail(e: &Option<rustls_pki_types::pem::Error>) -> String {
    match e {
        Some(e) => e.to_string(),
        None => "no PEM section found".into(),
    }
}

/// Where a certificate chain and its key come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files on disk.
    Files { cert: PathBuf, key: PathBuf },
    /// The dev certificate built into the binary.
    EmbeddedDev,
}

/// `path` as the config file at `base` means it: a relative path is taken from the file's
/// directory, not from wherever the process was started.
pub fn relative_to(base: Option<&Path>, path: PathBuf) -> PathBuf {
    match base {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }
}

/// A settings section set `cert` without `key` or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpairedCert;

impl CertSource {
    /// A settings section's `cert` and `key`: both (paths relative to `base`, the config
    /// file's directory, when given), or neither (None). `Err` when only one is set: the
    /// caller names its own keys in the message.
    pub fn pair(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        base: Option<&Path>,
    ) -> Result<Option<CertSource>, UnpairedCert> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertSource::Files {
                cert: relative_to(base, cert),
                key: relative_to(base, key),
            })),
            (None, None) => Ok(None),
            _ => Err(UnpairedCert),
        }
    }
}

impl std::fmt::Display for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertSource::Files { cert, key } => {
                write!(f, "{} (key {})", cert.display(), key.display())
            }
            CertSource::EmbeddedDev => f.write_str("the built-in dev certificate for localhost"),
        }
    }
}

/// The crypto provider used everywhere (server, relay client, cluster link, tools): aws-lc-rs.
/// It signs RSA 2048 in about half ring's time (0.26 against 0.47 ms on the reference
/// machine), which is most of a full handshake on an RSA certificate (bench/RESULTS.md).
///
/// Its cipher suites are rustls's defaults in [`SUITE_ORDER`]'s order: AES-128-GCM first.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // A stable sort: suites the order does not name keep their place, after those it names.
    provider.cipher_suites.sort_by_key(|s| {
        SUITE_ORDER
            .iter()
            .position(|&named| named == s.suite())
            .unwrap_or(SUITE_ORDER.len())
    });
    Arc::new(provider)
}

/// The cipher suites in the order the server picks them (the client's order is ignored, as
/// haproxy does by default, except for clients that prefer ChaCha20-Poly1305: see
/// [`config_for_client`]) and the client offers them. AES-128-GCM before AES-256-GCM:
/// the suite's hash is SHA-256 instead of SHA-384, and every TLS 1.3 key derivation (HKDF,
/// about twenty per handshake) and the transcript hash run on it; SHA-256 has instructions
/// of its own on current x86 and ARM CPUs, SHA-384 does not, and AWS-LC's SHA-384 was 7 % of
/// a full RSA 2048 handshake's server CPU (bench/RESULTS.md, seventh session). AES-128's 10
/// rounds against AES-256's 14 make every record cheaper too. AES-128 matches the strength
/// of X25519 (128-bit) and exceeds RSA 2048's (112-bit); Mozilla's recommended TLS order,
/// Go and BoringSSL also put it first.
const SUITE_ORDER: &[rustls::CipherSuite] = &[
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Parses every certificate in a PEM buffer; `path` only labels errors.
pub fn certs_from_pem(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::NotPem {
            what: "certificate",
            path: path.to_path_buf(),
            source: Some(e),
        })?;
    if certs.is_empty() {
        if looks_like_pem(bytes) {
            return Err(TlsError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        return Err(TlsError::NotPem {
            what: "certificate",
            path: path.to_path_buf(),
            source: None,
        });
    }
    Ok(certs)
}

/// Parses the first private key in a PEM buffer; `path` only labels errors.
pub fn key_from_pem(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) if looks_like_pem(bytes) => {
            Err(TlsError::NoPrivateKey {
                path: path.to_path_buf(),
            })
        }
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::NotPem {
            what: "key",
            path: path.to_path_buf(),
            source: None,
        }),
        Err(e) => Err(TlsError::NotPem {
            what: "key",
            path: path.to_path_buf(),
            source: Some(e),
        }),
    }
}

/// Builds a chain + key pair from PEM bytes and checks that the key matches the leaf.
pub fn certified_key_from_pem(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs_from_pem(cert_pem, cert_path)?;
    let key = key_from_pem(key_pem, key_path)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_path.to_path_buf(),
            source,
        })?;
    let signing_key = sha256_first(signing_key);
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // The provider could not derive a public key: nothing to compare, accept.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(TlsError::BadCertificate {
                path: cert_path.to_path_buf(),
                source,
            })
        }
    }
    Ok(Arc::new(certified))
}

/// The RSA signature schemes in the order the server picks them from those a client offers:
/// SHA-256 before SHA-384 and SHA-512 within RSA-PSS, then the same for PKCS#1 v1.5 (TLS 1.2
/// only). rustls's own order starts with RSA-PSS-SHA512, whose hash AWS-LC runs in portable
/// code on CPUs it does not recognise (this AMD EPYC among them) where SHA-256 runs on the
/// CPU's SHA instructions. OpenSSL's server order (haproxy, nginx) and Go's (the client's,
/// which lists SHA-256 first) sign with RSA-PSS-SHA256 too. Nothing is removed: a client
/// offering only SHA-384 or SHA-512 gets it. The hash does not weaken the signature: RSA
/// 2048 is a 112-bit level, SHA-256 a 128-bit one.
const RSA_SCHEME_ORDER: [rustls::SignatureScheme; 6] = [
    rustls::SignatureScheme::RSA_PSS_SHA256,
    rustls::SignatureScheme::RSA_PSS_SHA384,
    rustls::SignatureScheme::RSA_PSS_SHA512,
    rustls::SignatureScheme::RSA_PKCS1_SHA256,
    rustls::SignatureScheme::RSA_PKCS1_SHA384,
    rustls::SignatureScheme::RSA_PKCS1_SHA512,
];

/// An RSA key choosing its scheme in [`RSA_SCHEME_ORDER`]'s order; any other key as it is
/// (an ECDSA or Ed25519 key has one scheme: there is no order to choose).
fn sha256_first(key: Arc<dyn SigningKey>) -> Arc<dyn SigningKey> {
    if key.algorithm() == rustls::SignatureAlgorithm::RSA {
        Arc::new(RsaSha256First(key))
    } else {
        key
    }
}

/// See [`sha256_first`].
#[derive(Debug)]
struct RsaSha256First(Arc<dyn SigningKey>);

impl SigningKey for RsaSha256First {
    fn choose_scheme(&self, offered: &[rustls::SignatureScheme]) -> Option<Box<dyn Signer>> {
        RSA_SCHEME_ORDER
            .iter()
            .filter(|scheme| offered.contains(scheme))
            .find_map(|scheme| self.0.choose_scheme(std::slice::from_ref(scheme)))
            // A scheme rustls may add that this list does not name: rustls's own choice.
            .or_else(|| self.0.choose_scheme(offered))
    }

    fn public_key(&self) -> Option<rustls_pki_types::SubjectPublicKeyInfoDer<'_>> {
        self.0.public_key()
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        self.0.algorithm()
    }
}

/// Loads a chain + key pair from wherever `source` says.
pub fn load_certified_key(source: &CertSource) -> Result<Arc<CertifiedKey>, TlsError> {
    match source {
        CertSource::Files { cert, key } => {
            let cert_pem = read_file("certificate", cert)?;
            let key_pem = read_file("key", key)?;
            certified_key_from_pem(&cert_pem, cert, &key_pem, key)
        }
        CertSource::EmbeddedDev => embedded_dev(),
    }
}

#[cfg(any(test, feature = "dev-cert"))]
fn embedded_dev() -> Result<Arc<CertifiedKey>, TlsError> {
    certified_key_from_pem(
        DEV_CERT_PEM,
        Path::new("<built-in certs/localhost.pem>"),
        DEV_KEY_PEM,
        Path::new("<built-in certs/localhost.key>"),
    )
}

#[cfg(not(any(test, feature = "dev-cert")))]
fn embedded_dev() -> Result<Arc<CertifiedKey>, TlsError> {
    Err(TlsError::NoDevCertificate)
}

/// The certificates served for one name: one chain per kind of key, the cheapest to sign with
/// first. An operator holding an RSA certificate (what most CAs still issue by default) can
/// add an ECDSA one for the same names, as haproxy and nginx let them: every client that
/// accepts ECDSA (ffmpeg's GnuTLS, OpenSSL, librtmp, browsers) then gets the handshake whose
/// signature costs 0.04 ms instead of RSA 2048's 1-1.6 ms on this machine (bench/RESULTS.md,
/// TLS handshakes), and older clients still get the RSA chain.
#[derive(Clone, Debug)]
pub struct Chains {
    keys: Vec<Arc<CertifiedKey>>,
    /// The [`CHEAP_SCHEMES`] some non-RSA chain here signs with, as bits: worked out once
    /// here, since asking a key (`choose_scheme`) allocates, and the burst rule asks for
    /// every handshake.
    cheap: u8,
}

impl Chains {
    fn one(key: Arc<CertifiedKey>) -> Chains {
        let mut chains = Chains {
            keys: vec![key],
            cheap: 0,
        };
        chains.cheap = chains.cheap_schemes();
        chains
    }

    /// Adds `key` beside the chains held; a chain with the same kind of key is replaced (a
    /// later entry for the same names wins, as before there were several kinds).
    fn add(&mut self, key: Arc<CertifiedKey>) {
        let kind = key.key.algorithm();
        match self.keys.iter_mut().find(|k| k.key.algorithm() == kind) {
            Some(same) => *same = key,
            None => {
                self.keys.push(key);
                // Stable: keys of one cost keep the order they were given in.
                self.keys.sort_by_key(|k| signing_cost(k.key.algorithm()));
            }
        }
        self.cheap = self.cheap_schemes();
    }

    /// Every chain, the cheapest to sign with first.
    pub fn all(&self) -> &[Arc<CertifiedKey>] {
        &self.keys
    }

    /// The [`CHEAP_SCHEMES`] some non-RSA chain here signs with, as bits.
    pub fn cheap(&self) -> u8 {
        self.cheap
    }

    fn cheap_schemes(&self) -> u8 {
        let mut bits = 0;
        for key in self
            .keys
            .iter()
            .filter(|k| signing_cost(k.key.algorithm()) == 0)
        {
            for (i, scheme) in CHEAP_SCHEMES.iter().enumerate() {
                if key
                    .key
                    .choose_scheme(std::slice::from_ref(scheme))
                    .is_some()
                {
                    bits |= 1 << i;
                }
            }
        }
        bits
    }

    /// The chain for a client: the cheapest one it can take (a signature scheme it offers
    /// and, for TLS 1.2, a cipher suite for that kind of key), else the first one, whose
    /// handshake then fails with rustls's own error. One chain is served without looking.
    fn for_client(
        &self,
        client: &ClientOffer<'_>,
        suites: &[SupportedCipherSuite],
    ) -> Option<Arc<CertifiedKey>> {
        let [first, more @ ..] = self.keys.as_slice() else {
            return None;
        };
        if more.is_empty() {
            return Some(first.clone());
        }
        self.keys
            .iter()
            .find(|k| client.can_take(k, suites))
            .unwrap_or(first)
            .clone()
            .into()
    }
}

/// Signature cost rank of a kind of key, cheapest first: ECDSA and Ed25519 sign in tens of
/// microseconds, RSA 2048 in a millisecond or more.
fn signing_cost(kind: rustls::SignatureAlgorithm) -> u8 {
    match kind {
        rustls::SignatureAlgorithm::ECDSA | rustls::SignatureAlgorithm::ED25519 => 0,
        rustls::SignatureAlgorithm::RSA => 2,
        _ => 1,
    }
}

/// The signature schemes of keys that sign cheaply (tens of microseconds): a client offering
/// one that a chain for the name it asks signs with gets such a chain, never an RSA one.
const CHEAP_SCHEMES: [rustls::SignatureScheme; 4] = [
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::ECDSA_NISTP521_SHA512,
    rustls::SignatureScheme::ED25519,
];

/// What a ClientHello offers that decides which chain it can take.
#[derive(Clone, Copy, Debug)]
pub struct ClientOffer<'a> {
    pub server_name: Option<&'a str>,
    pub signature_schemes: &'a [rustls::SignatureScheme],
    pub cipher_suites: &'a [rustls::CipherSuite],
}

impl<'a> ClientOffer<'a> {
    pub fn from_hello(hello: &'a ClientHello<'a>) -> ClientOffer<'a> {
        ClientOffer {
            server_name: hello.server_name(),
            signature_schemes: hello.signature_schemes(),
            cipher_suites: hello.cipher_suites(),
        }
    }

    /// Whether a handshake with `key` can complete for this client: the key signs with a
    /// scheme the client offers, and some suite both sides have suits the key (any TLS 1.3
    /// suite does; TLS 1.2 suites name ECDSA or RSA).
    fn can_take(&self, key: &CertifiedKey, suites: &[SupportedCipherSuite]) -> bool {
        let kind = key.key.algorithm();
        suites.iter().any(|s| {
            self.cipher_suites.contains(&s.suite()) && s.usable_for_signature_algorithm(kind)
        }) && key.key.choose_scheme(self.signature_schemes).is_some()
    }
}

/// Chooses a certificate by the SNI name the client asked for, or the default one, and
/// within a name by the kind of key the client can take ([`Chains`]).
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Chains>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Chains>,
    default: Chains,
    /// The server's cipher suites (the provider's), for [`ClientOffer::can_take`].
    suites: Vec<SupportedCipherSuite>,
}

impl SniResolver {
    pub fn new(default: Arc<CertifiedKey>) -> Self {
        SniResolver {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: Chains::one(default),
            suites: provider().cipher_suites.clone(),
        }
    }

    /// Serves `key` to clients asking for no name or a name no entry has, beside the default
    /// given to [`SniResolver::new`] (a chain with another kind of key; one with the same
    /// kind replaces it).
    pub fn add_default(&mut self, key: Arc<CertifiedKey>) {
        self.default.add(key);
    }

    /// Serves `key` to clients asking for `name` (`*.example.com` matches one label). A name
    /// given twice keeps one chain per kind of key ([`Chains`]).
    pub fn add(&mut self, name: &str, key: Arc<CertifiedKey>) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let map = match name.strip_prefix("*.") {
            Some(parent) => (&mut self.wildcard, parent.to_string()),
            None => (&mut self.exact, name),
        };
        match map.0.entry(map.1) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(key),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Chains::one(key));
            }
        }
    }

    /// The chains for a requested server name.
    pub fn chains(&self, server_name: Option<&str>) -> &Chains {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(chains) = self.exact.get(&name) {
            return chains;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(chains) = self.wildcard.get(parent) {
                return chains;
            }
        }
        &self.default
    }

    /// The certificate for a client's ClientHello (counted by kind of key in the metrics).
    pub fn choose(&self, client: &ClientOffer<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = self
            .chains(client.server_name)
            .for_client(client, &self.suites)?;
        let kind = match chosen.key.algorithm() {
            rustls::SignatureAlgorithm::ECDSA => ChainKey::Ecdsa,
            rustls::SignatureAlgorithm::RSA => ChainKey::Rsa,
            _ => ChainKey::Other,
        };
        crate::metrics::global().tls_chain_chosen(kind);
        Some(chosen)
    }

    /// The [`CHEAP_SCHEMES`] (as bits) that a non-RSA chain signs with for some name served
    /// (the default or an SNI entry): 0 when no client can get a cheap chain here, and the
    /// burst rule need not read a ClientHello to know.
    pub fn cheap_anywhere(&self) -> u8 {
        std::iter::once(&self.default)
            .chain(self.exact.values())
            .chain(self.wildcard.values())
            .fold(0, |bits, c| bits | c.cheap())
    }

    /// Whether any of its keys is RSA. One RSA 2048 signature costs 1-3 ms of CPU (0.3 ms on
    /// a CPU with AVX-512 IFMA), 20-30 times an ECDSA P-256 one (bench/RESULTS.md, TLS
    /// handshakes): handshakes that may make one run their steps off the executor
    /// ([`crate::net::tls_stream`]), so that a burst of new RTMPS clients does not stall the
    /// streams already running. With an ECDSA chain beside the RSA one this stays true (a
    /// burst of clients offering RSA alone would otherwise sign on the executor); each
    /// handshake then asks [`TlsServer::signs_cheaply_for`] whether its client gets the cheap
    /// chain.
    pub fn signs_slowly(&self) -> bool {
        std::iter::once(&self.default)
            .chain(self.exact.values())
            .chain(self.wildcard.values())
            .flat_map(|c| c.all())
            .any(|k| k.key.algorithm() == rustls::SignatureAlgorithm::RSA)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(&ClientOffer::from_hello(&client_hello))
    }
}

/// An [`SniResolver`] that can be replaced while running, so renewed certificates are picked
/// up (on SIGHUP) without dropping a single connection. Handshakes in flight keep the
/// certificates they started with.
#[derive(Debug)]
pub struct Reloadable {
    current: std::sync::RwLock<Arc<SniResolver>>,
    /// The current resolver's [`SniResolver::signs_slowly`], read once per handshake.
    slow: AtomicBool,
    /// The current resolver's [`SniResolver::cheap_anywhere`].
    cheap: AtomicU8,
}

impl Reloadable {
    pub fn new(resolver: SniResolver) -> Arc<Reloadable> {
        Arc::new(Reloadable {
            slow: AtomicBool::new(resolver.signs_slowly()),
            cheap: AtomicU8::new(resolver.cheap_anywhere()),
            current: std::sync::RwLock::new(Arc::new(resolver)),
        })
    }

    /// Serves `resolver`'s certificates to every handshake from now on.
    pub fn replace(&self, resolver: SniResolver) {
        let slow = resolver.signs_slowly();
        let cheap = resolver.cheap_anywhere();
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        *slot = Arc::new(resolver);
        self.slow.store(slow, Ordering::Relaxed);
        self.cheap.store(cheap, Ordering::Relaxed);
    }

    /// [`SniResolver::signs_slowly`] of the certificates served now.
    pub fn signs_slowly(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// [`SniResolver::cheap_anywhere`] of the certificates served now.
    pub fn cheap_anywhere(&self) -> u8 {
        self.cheap.load(Ordering::Relaxed)
    }

    /// [`Chains::cheap`] of the chains served now for `server_name` (as rustls will resolve
    /// them: [`SniResolver::chains`]).
    pub fn cheap_for(&self, server_name: Option<&str>) -> u8 {
        if self.cheap_anywhere() == 0 {
            return 0;
        }
        self.get().chains(server_name).cheap()
    }

    fn get(&self) -> Arc<SniResolver> {
        // A panic elsewhere while holding the lock leaves a valid resolver behind: use it.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().choose(&ClientOffer::from_hello(&client_hello))
    }
}

/// A TLS server: its configuration, the certificates it answers with, and the handshakes
/// under way on it (together they decide where a handshake signs:
/// [`TlsServer::sign_off_executor`]). Clones share all three.
#[derive(Clone, Debug)]
pub struct TlsServer {
    pub config: Arc<ServerConfig>,
    certificates: Arc<Reloadable>,
    handshakes: Arc<AtomicUsize>,
}

impl TlsServer {
    /// Whether handshakes may sign with an RSA key now (certificates reload).
    pub fn signs_slowly(&self) -> bool {
        self.certificates.signs_slowly()
    }

    /// Whether a client offering `offer` gets a chain that signs cheaply (ECDSA, Ed25519): a
    /// cheap chain for the name it asks (or the default chains when it asks none) signs with a
    /// scheme it offers, and it can agree on a suite for that chain (TLS 1.3 offered in its
    /// supported versions with a TLS 1.3 suite we have, or one of our TLS 1.2 suites for that
    /// kind of key). Resolving the chain follows the same rule ([`Chains`]: cheapest first,
    /// the first the client can take), so such a handshake does not sign with RSA. False when
    /// unsure: a name rustls refuses, which fails the handshake anyway.
    pub fn signs_cheaply_for(&self, offer: &HelloOffer<'_>) -> bool {
        let cheap = match offer.server_name {
            HelloName::Absent => self.certificates.cheap_for(None),
            HelloName::Dns(name) => self.certificates.cheap_for(Some(name)),
            HelloName::Unusable => return false,
        };
        if cheap == 0 {
            return false;
        }
        // One pass over each vector, read where it is (no copy per handshake; a hello's
        // vectors are bounded by its 16 KiB record).
        let tls13 = offer.versions.chunks_exact(2).any(|p| p == [0x03, 0x04]);
        let ours = &self.config.crypto_provider().cipher_suites;
        // Which kinds of key some suite both sides have can serve: TLS 1.3 ones serve any.
        let (mut any_key, mut ecdsa, mut ed25519) = (false, false, false);
        for pair in offer.suites.chunks_exact(2) {
            let Ok(pair) = <[u8; 2]>::try_from(pair) else {
                continue;
            };
            let code = rustls::CipherSuite::from(u16::from_be_bytes(pair));
            for suite in ours.iter().filter(|s| s.suite() == code) {
                match suite {
                    SupportedCipherSuite::Tls13(_) => any_key |= tls13,
                    SupportedCipherSuite::Tls12(_) => {
                        ecdsa |=
                            suite.usable_for_signature_algorithm(rustls::SignatureAlgorithm::ECDSA);
                        ed25519 |= suite
                            .usable_for_signature_algorithm(rustls::SignatureAlgorithm::ED25519);
                    }
                }
            }
        }
        let mut offered = 0u8;
        for pair in offer.signature_schemes.chunks_exact(2) {
            let Ok(pair) = <[u8; 2]>::try_from(pair) else {
                continue;
            };
            let scheme = rustls::SignatureScheme::from(u16::from_be_bytes(pair));
            if let Some(i) = CHEAP_SCHEMES.iter().position(|s| *s == scheme) {
                offered |= 1 << i;
            }
        }
        CHEAP_SCHEMES.iter().enumerate().any(|(i, scheme)| {
            let suite_for_it = match scheme {
                rustls::SignatureScheme::ED25519 => any_key || ed25519,
                _ => any_key || ecdsa,
            };
            cheap & offered & (1 << i) != 0 && suite_for_it
        })
    }

    /// Counts a handshake as under way until the value returned is dropped.
    pub fn handshake_begins(&self) -> HandshakeUnderWay {
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        HandshakeUnderWay(self.handshakes.clone())
    }

    /// Handshakes under way now.
    pub fn handshakes_under_way(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Whether a handshake's signing step goes to the blocking pool: with an RSA key, once
    /// other handshakes are under way beside it. A lone signature holds one executor thread
    /// for 1-3 ms, as haproxy's event loop does, and moving it costs two thread wake-ups
    /// (0.06-0.12 ms of CPU per handshake here: bench/RESULTS.md, fifteenth session); a burst
    /// of them queued on the executor held every stream behind them (a running player's p99
    /// latency 245 ms instead of 76 ms while 580 RSA handshakes a second arrived).
    pub fn sign_off_executor(&self) -> bool {
        self.signs_slowly() && self.handshakes_under_way() > 1
    }
}

/// A handshake counted by [`TlsServer::handshake_begins`]; dropping it ends the count.
#[derive(Debug)]
pub struct HandshakeUnderWay(Arc<AtomicUsize>);

impl Drop for HandshakeUnderWay {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TLS server (TLS 1.2 and 1.3) answering with certificates from `resolver`.
pub fn server_config(resolver: SniResolver) -> Result<TlsServer, TlsError> {
    server_config_with(Reloadable::new(resolver))
}

/// [`server_config`] with a resolver the caller keeps to replace its certificates.
///
/// Session resumption uses stateless tickets (the session sealed with keys only this process
/// knows: AES-256-CBC and HMAC-SHA256 as RFC 5077 recommends, rotated every 6 hours), as
/// haproxy and nginx do by default: rustls's default keeps the sessions themselves in a cache
/// of 256 instead, so with more clients than that reconnecting, most resumptions missed and
/// paid a full handshake (on an RSA certificate, the signature is most of it). A ticket costs the same server CPU as a
/// cache entry (measured: bench/RESULTS.md, TLS handshakes) and holds no memory per session.
/// The config lives as long as the listeners (a reload swaps the certificates in the
/// resolver, not the config), so tickets stay valid across reloads.
pub fn server_config_with(resolver: Arc<Reloadable>) -> Result<TlsServer, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    // The server's order (SUITE_ORDER), not the client's: most clients (OpenSSL's, ffmpeg's,
    // Python's) list AES-256-GCM first.
    config.ignore_client_order = true;
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(TlsServer {
        config: Arc::new(config),
        certificates: resolver,
        handshakes: Arc::new(AtomicUsize::new(0)),
    })
}

/// TLS 1.3 session tickets sent after each handshake (full or resumed): one, as Go's server
/// sends, where rustls, OpenSSL and BoringSSL send two. A second ticket only serves a client
/// that resumes several connections in parallel from one handshake (a browser); RTMP clients
/// keep one session per server and offer the newest ticket (OpenSSL's `-sess_out`, curl's
/// session cache and Python's `ssl` keep the last one received; each resumption brings a new
/// ticket), so the second was sealed, encrypted and sent for nothing on every handshake (the
/// two were 2.8 % of a full RSA 2048 handshake's server CPU in the seventh session's profile,
/// bench/RESULTS.md). Checked with OpenSSL's s_client (-sess_out/-sess_in, three resumptions
/// in a row) and curl (a second transfer re-uses the session).
const TLS13_TICKETS: usize = 1;

/// The server configuration for a client whose ClientHello lists `suites`: `config` (the
/// server's order, AES-128-GCM first) unless the first suite it lists that we know is a
/// ChaCha20-Poly1305 one, which is how clients without AES instructions say that AES would be
/// slow for them (Go's server reads it the same way): those get a copy that follows their
/// order. Rare, so the copy is made per handshake rather than kept.
pub fn config_for_client(
    config: &Arc<ServerConfig>,
    suites: &[rustls::CipherSuite],
) -> Arc<ServerConfig> {
    config_for_suites(config, suites.iter().copied())
}

/// [`config_for_client`] for suites read straight from a ClientHello's bytes (the door's TLS
/// stream reads them in place, without parsing the whole hello twice).
pub fn config_for_suites(
    config: &Arc<ServerConfig>,
    mut suites: impl Iterator<Item = rustls::CipherSuite>,
) -> Arc<ServerConfig> {
    let first_known = suites.find(|s| SUITE_ORDER.contains(s));
    let chacha = first_known.is_some_and(|s| {
        matches!(
            s,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        )
    });
    if !chacha || !config.ignore_client_order {
        return config.clone();
    }
    let mut theirs = ServerConfig::clone(config);
    theirs.ignore_client_order = false;
    Arc::new(theirs)
}

/// A TLS client configuration trusting the system roots plus, optionally, the certificates
/// in `extra_ca` (a private CA for the backend).
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!("system CA store: {err}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!("loaded {added} system CA certificates");
    if let Some(path) = extra_ca {
        let pem = read_file("CA", path)?;
        let certs = certs_from_pem(&pem, path)?;
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: path.to_path_buf(),
                source,
            })?;
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted CA certificates (system store empty and no --upstream-ca); \
             TLS connections to the upstream will fail verification"
        );
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rustls_pki_types::ServerName;
    use std::io::Write;

    const CA_PEM: &[u8] = include_bytes!("../../certs/ca.pem");
    const CA_KEY: &[u8] = include_bytes!("../../certs/ca.key");

    fn file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn files(cert: &[u8], key: &[u8]) -> (tempfile::NamedTempFile, tempfile::NamedTempFile) {
        (file(cert), file(key))
    }

    fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
        load_certified_key(&CertSource::Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    #[test]
    fn dev_pair_loads() {
        let key = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        assert_eq!(key.cert.len(), 2, "leaf + CA");
        let (c, k) = files(DEV_CERT_PEM, DEV_KEY_PEM);
        load(c.path(), k.path()).unwrap();
    }

    #[test]
    fn missing_file_names_it() {
        let (_, k) = files(DEV_CERT_PEM, DEV_KEY_PEM);
        let err = load(Path::new("/nonexistent/chain.pem"), k.path()).unwrap_err();
        assert!(matches!(
            err,
            TlsError::Read {
                what: "certificate",
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/chain.pem"), "{msg}");
    }

    #[test]
    fn not_pem() {
        let (c, k) = files(b"\x30\x82\x01\x0a binary DER", DEV_KEY_PEM);
        let err = load(c.path(), k.path()).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NotPem {
                    what: "certificate",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&c.path().display().to_string()));
    }

    #[test]
    fn key_given_as_certificate() {
        let (c, k) = files(DEV_KEY_PEM, DEV_KEY_PEM);
        let err = load(c.path(), k.path()).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }

    #[test]
    fn certificate_given_as_key() {
        let (c, k) = files(DEV_CERT_PEM, DEV_CERT_PEM);
        let err = load(c.path(), k.path()).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains(&k.path().display().to_string()));
    }

    #[test]
    fn key_does_not_match() {
        // The CA's key is a valid key, but not the leaf's.
        let (c, k) = files(DEV_CERT_PEM, CA_KEY);
        let err = load(c.path(), k.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("does not match"), "{msg}");
    }

    #[test]
    fn broken_base64() {
        let (c, k) = files(
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            DEV_KEY_PEM,
        );
        let err = load(c.path(), k.path()).unwrap_err();
        assert!(matches!(err, TlsError::NotPem { .. }), "{err}");
    }

    #[test]
    fn sni_choice() {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let ca =
            certified_key_from_pem(CA_PEM, Path::new("ca"), CA_KEY, Path::new("ca.key")).unwrap();
        let mut r = SniResolver::new(dev.clone());
        r.add("Live.Example.com", ca.clone());
        r.add("*.cdn.example.com", ca.clone());
        assert!(Arc::ptr_eq(&r.pick(Some("live.example.com")), &ca));
        assert!(Arc::ptr_eq(&r.pick(Some("LIVE.example.com.")), &ca));
        assert!(Arc::ptr_eq(&r.pick(Some("a.cdn.example.com")), &ca));
        assert!(Arc::ptr_eq(&r.pick(Some("a.b.cdn.example.com")), &dev));
        assert!(Arc::ptr_eq(&r.pick(Some("other.org")), &dev));
        assert!(Arc::ptr_eq(&r.pick(None), &dev));
    }

    impl SniResolver {
        /// The chain for a name, for a client that takes any (the first, cheapest).
        fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
            self.chains(name).all()[0].clone()
        }
    }

    /// A key that says it is RSA and signs only with the RSA schemes (its signatures are
    /// never made: the choice of chain is what is tested).
    #[derive(Debug)]
    struct ClaimsRsa;

    impl SigningKey for ClaimsRsa {
        fn choose_scheme(&self, offered: &[rustls::SignatureScheme]) -> Option<Box<dyn Signer>> {
            RSA_SCHEME_ORDER
                .iter()
                .any(|s| offered.contains(s))
                .then(|| Box::new(NoSigner) as Box<dyn Signer>)
        }

        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::RSA
        }
    }

    #[derive(Debug)]
    struct NoSigner;

    impl Signer for NoSigner {
        fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            Err(rustls::Error::General("not a signing key".into()))
        }

        fn scheme(&self) -> rustls::SignatureScheme {
            rustls::SignatureScheme::RSA_PSS_SHA256
        }
    }

    fn claims_rsa() -> Arc<CertifiedKey> {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        Arc::new(CertifiedKey::new(dev.cert.clone(), Arc::new(ClaimsRsa)))
    }

    #[test]
    fn an_ecdsa_chain_beside_an_rsa_one_serves_every_client_that_takes_it() {
        use rustls::CipherSuite as C;
        use rustls::SignatureScheme as S;
        let ecdsa = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let rsa = claims_rsa();
        // Given RSA first (the operator's order does not matter): ECDSA is tried first.
        let mut r = SniResolver::new(rsa.clone());
        r.add_default(ecdsa.clone());
        r.add("live.example.com", rsa.clone());
        r.add("live.example.com", ecdsa.clone());
        r.add("rsa.example.com", rsa.clone());
        let offer = |name, schemes, suites| ClientOffer {
            server_name: name,
            signature_schemes: schemes,
            cipher_suites: suites,
        };
        let both = &[S::ECDSA_NISTP256_SHA256, S::RSA_PSS_SHA256][..];
        let rsa_only = &[S::RSA_PSS_SHA256, S::RSA_PKCS1_SHA256][..];
        let tls13 = &[C::TLS13_AES_128_GCM_SHA256][..];
        let tls12_rsa = &[C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256][..];
        let tls12_both = &[
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ][..];
        let chose = |r: &SniResolver, o: ClientOffer<'_>| r.choose(&o).unwrap();
        for name in [None, Some("live.example.com"), Some("other.org")] {
            // A TLS 1.3 client taking both, and a TLS 1.2 one with suites for both: ECDSA.
            assert!(Arc::ptr_eq(&chose(&r, offer(name, both, tls13)), &ecdsa));
            assert!(Arc::ptr_eq(
                &chose(&r, offer(name, both, tls12_both)),
                &ecdsa
            ));
            // Offering RSA signatures alone, or TLS 1.2 suites for RSA alone: RSA.
            assert!(Arc::ptr_eq(&chose(&r, offer(name, rsa_only, tls13)), &rsa));
            assert!(Arc::ptr_eq(&chose(&r, offer(name, both, tls12_rsa)), &rsa));
            // Nothing either could do: the first, for rustls to refuse in its own words.
            assert!(Arc::ptr_eq(
                &chose(&r, offer(name, &[S::ED25519], tls13)),
                &ecdsa
            ));
        }
        // A name with one chain gets it whatever the client offers.
        let rsa_name = Some("rsa.example.com");
        assert!(Arc::ptr_eq(&chose(&r, offer(rsa_name, both, tls13)), &rsa));
        assert!(Arc::ptr_eq(
            &chose(&r, offer(rsa_name, &[S::ED25519], tls13)),
            &rsa
        ));
        assert!(
            r.signs_slowly(),
            "an RSA chain may sign: a burst moves off the executor"
        );
        // A second chain of the same kind for a name replaces the first.
        let ecdsa2 = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        r.add("LIVE.example.com", ecdsa2.clone());
        assert_eq!(r.chains(Some("live.example.com")).all().len(), 2);
        assert!(Arc::ptr_eq(
            &chose(&r, offer(Some("live.example.com"), both, tls13)),
            &ecdsa2
        ));
    }

    #[test]
    fn a_client_signs_cheaply_when_the_name_it_asks_has_a_chain_it_takes() {
        use crate::net::tls_stream::{HelloName, HelloOffer};
        let ecdsa = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let be = |v: &[u16]| v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        let (tls13, ecdhe_ecdsa, ecdhe_rsa) = (be(&[0x1301]), be(&[0xc02b]), be(&[0xc02f]));
        let (p256, p384, rsa_pss) = (be(&[0x0403]), be(&[0x0503]), be(&[0x0804]));
        let (v13, v12) = (be(&[0x0304, 0x0303]), be(&[0x0303]));
        let named = |server_name, suites, schemes, versions| HelloOffer {
            server_name,
            suites,
            signature_schemes: schemes,
            versions,
        };
        let offer = |suites, schemes, versions| named(HelloName::Absent, suites, schemes, versions);
        let mut dual = SniResolver::new(claims_rsa());
        dual.add_default(ecdsa.clone());
        dual.add("live.example.com", ecdsa.clone());
        dual.add("live.example.com", claims_rsa());
        let dual = server_config(dual).unwrap();
        // TLS 1.3 with P-256 offered, or TLS 1.2 with an ECDHE-ECDSA suite: cheap.
        assert!(dual.signs_cheaply_for(&offer(&tls13, &p256, &v13)));
        assert!(dual.signs_cheaply_for(&offer(&ecdhe_ecdsa, &p256, &v12)));
        // RSA schemes alone, TLS 1.3 suites without 1.3 in its versions, ECDHE-RSA alone,
        // or a scheme no chain here signs with (P-384): costly.
        assert!(!dual.signs_cheaply_for(&offer(&tls13, &rsa_pss, &v13)));
        assert!(!dual.signs_cheaply_for(&offer(&tls13, &p256, &v12)));
        assert!(!dual.signs_cheaply_for(&offer(&ecdhe_rsa, &p256, &v12)));
        assert!(!dual.signs_cheaply_for(&offer(&tls13, &p384, &v13)));
        // A name rustls refuses: unsure, so costly.
        assert!(!dual.signs_cheaply_for(&named(HelloName::Unusable, &tls13, &p256, &v13)));
        // One name served by RSA alone: its clients sign costly, every other name's cheaply
        // (names as the resolver matches them: any case, a trailing dot).
        let mut partial = SniResolver::new(claims_rsa());
        partial.add_default(ecdsa.clone());
        partial.add("rsa.example.com", claims_rsa());
        partial.add("*.rsa.example.org", claims_rsa());
        partial.add("live.example.com", ecdsa.clone());
        let partial = server_config(partial).unwrap();
        for rsa_only in ["rsa.example.com", "RSA.Example.com.", "a.rsa.example.org"] {
            let o = named(HelloName::Dns(rsa_only), &tls13, &p256, &v13);
            assert!(!partial.signs_cheaply_for(&o), "{rsa_only}");
        }
        for cheap in ["live.example.com", "other.example.com", "rsa.example.org"] {
            let o = named(HelloName::Dns(cheap), &tls13, &p256, &v13);
            assert!(partial.signs_cheaply_for(&o), "{cheap}");
        }
        assert!(partial.signs_cheaply_for(&offer(&tls13, &p256, &v13)));
        // The default chain RSA alone, a name with ECDSA beside it: that name's clients alone.
        let mut named_only = SniResolver::new(claims_rsa());
        named_only.add("live.example.com", ecdsa.clone());
        named_only.add("live.example.com", claims_rsa());
        let named_only = server_config(named_only).unwrap();
        let o = named(HelloName::Dns("live.example.com"), &tls13, &p256, &v13);
        assert!(named_only.signs_cheaply_for(&o));
        assert!(!named_only.signs_cheaply_for(&offer(&tls13, &p256, &v13)));
        let o = named(HelloName::Dns("other.example.com"), &tls13, &p256, &v13);
        assert!(!named_only.signs_cheaply_for(&o));
        // RSA alone: never.
        let rsa = server_config(SniResolver::new(claims_rsa())).unwrap();
        assert!(!rsa.signs_cheaply_for(&offer(&tls13, &p256, &v13)));
    }

    #[test]
    fn reloadable_switches_certificates() {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let ca =
            certified_key_from_pem(CA_PEM, Path::new("ca"), CA_KEY, Path::new("ca.key")).unwrap();
        let r = Reloadable::new(SniResolver::new(dev.clone()));
        assert!(Arc::ptr_eq(&r.get().pick(None), &dev));
        r.replace(SniResolver::new(ca.clone()));
        assert!(Arc::ptr_eq(&r.get().pick(None), &ca));
        // What a reload serves decides the burst rule: RSA alone (costly for every client),
        // then both chains (cheap for clients offering P-256), then ECDSA alone.
        let p256 = 1 << 0;
        r.replace(SniResolver::new(claims_rsa()));
        assert!(r.signs_slowly());
        assert_eq!(r.cheap_anywhere(), 0);
        let mut both = SniResolver::new(claims_rsa());
        both.add_default(dev.clone());
        r.replace(both);
        assert!(r.signs_slowly());
        assert_eq!(r.cheap_anywhere(), p256);
        r.replace(SniResolver::new(dev.clone()));
        assert!(!r.signs_slowly());
        server_config_with(r).unwrap();
    }

    /// Runs a handshake between `client` and `server` in memory (no sockets).
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        for _ in 0..20 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        // The tickets a TLS 1.3 server sends right after the handshake.
        let mut wire = Vec::new();
        server.write_tls(&mut wire).unwrap();
        client.read_tls(&mut wire.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }

    #[test]
    fn sessions_resume_with_tickets_beyond_any_cache() {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let server = server_config(SniResolver::new(dev)).unwrap().config;
        assert!(server.ticketer.enabled(), "stateless tickets are on");
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(CA_PEM, Path::new("ca")).unwrap() {
            roots.add(cert).unwrap();
        }
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[version])
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            );
            let mut first = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut first, &mut s);
            assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
            // More sessions than rustls's default cache holds come and go in between: a
            // ticket does not depend on server-side storage.
            for _ in 0..300 {
                let other = Arc::new(
                    ClientConfig::builder_with_provider(provider())
                        .with_protocol_versions(&[version])
                        .unwrap()
                        .with_root_certificates(roots.clone())
                        .with_no_client_auth(),
                );
                let mut c = rustls::ClientConnection::new(other, name.clone()).unwrap();
                let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
                handshake(&mut c, &mut s);
            }
            let mut again = rustls::ClientConnection::new(client, name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut again, &mut s);
            assert_eq!(
                again.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "{version:?}"
            );
        }
    }

    /// rustls's client session cache, counting the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct CountingStore {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: std::sync::atomic::AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(name, value)
        }
        fn tls12_session(
            &self,
            name: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name)
        }
        fn insert_tls13_ticket(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.insert_tls13_ticket(name, value)
        }
        fn take_tls13_ticket(
            &self,
            name: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
    }

    /// One TLS 1.3 ticket after each handshake, full or resumed, and that one resumes.
    #[test]
    fn one_ticket_per_handshake_and_it_resumes() {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let server = server_config(SniResolver::new(dev)).unwrap().config;
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(CA_PEM, Path::new("ca")).unwrap() {
            roots.add(cert).unwrap();
        }
        let store = Arc::new(CountingStore {
            inner: rustls::client::ClientSessionMemoryCache::new(8),
            tickets: std::sync::atomic::AtomicUsize::new(0),
        });
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        let name = ServerName::try_from("localhost").unwrap();
        let count = || store.tickets.load(std::sync::atomic::Ordering::Relaxed);
        let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        handshake(&mut c, &mut s);
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(count(), 1, "tickets after a full handshake");
        for _ in 0..2 {
            let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            let before = count();
            handshake(&mut c, &mut s);
            assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
            assert_eq!(count() - before, 1, "tickets after a resumed handshake");
        }
    }

    /// A client offering only `suites`, in that order, trusting the dev CA.
    fn client_offering(suites: &[rustls::SupportedCipherSuite]) -> rustls::ClientConnection {
        let mut roots = RootCertStore::empty();
        for cert in certs_from_pem(CA_PEM, Path::new("ca")).unwrap() {
            roots.add(cert).unwrap();
        }
        let provider = CryptoProvider {
            cipher_suites: suites.to_vec(),
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        rustls::ClientConnection::new(Arc::new(config), name).unwrap()
    }

    /// The suite a handshake through rustls's Acceptor and [`config_for_client`] (as the door
    /// runs it) settles on, in memory.
    fn suite_chosen(mut client: rustls::ClientConnection) -> rustls::CipherSuite {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let config = server_config(SniResolver::new(dev)).unwrap().config;
        let mut acceptor = rustls::server::Acceptor::default();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        acceptor.read_tls(&mut wire.as_slice()).unwrap();
        let accepted = acceptor.accept().map_err(|(e, _)| e).unwrap().unwrap();
        let config = config_for_client(&config, accepted.client_hello().cipher_suites());
        let mut server = accepted
            .into_connection(config)
            .map_err(|(e, _)| e)
            .unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            if !wire.is_empty() {
                client.read_tls(&mut wire.as_slice()).unwrap();
                client.process_new_packets().unwrap();
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            if !wire.is_empty() {
                server.read_tls(&mut wire.as_slice()).unwrap();
                server.process_new_packets().unwrap();
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        server.negotiated_cipher_suite().unwrap().suite()
    }

    #[test]
    fn aes_128_before_aes_256_unless_the_client_prefers_chacha() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        use rustls::CipherSuite as Cs;
        // What a client offers, in its order -> the suite the server takes.
        let cases: [(&str, &[rustls::SupportedCipherSuite], Cs); 5] = [
            (
                "OpenSSL's order (ffmpeg, Python, curl), AES-256 first: AES-128 is taken",
                &[
                    cs::TLS13_AES_256_GCM_SHA384,
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_128_GCM_SHA256,
                ],
                Cs::TLS13_AES_128_GCM_SHA256,
            ),
            (
                "the same in TLS 1.2 (the dev certificate is ECDSA)",
                &[
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                ],
                Cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
            (
                "a client without AES instructions lists ChaCha20 first: it keeps it",
                &[
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                ],
                Cs::TLS13_CHACHA20_POLY1305_SHA256,
            ),
            (
                "the same in TLS 1.2",
                &[
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                ],
                Cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ),
            (
                "a client offering only AES-256 still gets it",
                &[cs::TLS13_AES_256_GCM_SHA384],
                Cs::TLS13_AES_256_GCM_SHA384,
            ),
        ];
        for (what, offered, want) in cases {
            assert_eq!(suite_chosen(client_offering(offered)), want, "{what}");
        }
    }

    /// A throwaway RSA 2048 key (public: for this test only), made with
    /// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`.
    const TEST_RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCnAzCZASQ22pjF
dqYZvSxAzBCDxdXeS3kuQrqTNTgb8TYVU8m8RV5Czc64llJu20mIapDNcNMWUXpb
S1gmFj+VZWqMTJqg4FtoThaewltjohhU76vAfPoX2eKrH7VRrE4HlG45Z/rQWM3O
MMGy5hXoMBbN208SEkvo9zhwGJSKDn2DklM80mZ6kYWEQZ9IWEpmoabmm87IBe/x
rGYdFYzk8zVKid8IDm8WabfblHwHQRI5/lAsPsLbWD+QpAVkmeAxxOPnMfoJ3G12
OYpuitgy5UGggILBWUaN0u0xajZPtpOrl/LeUV71pVs/JLF3JmImrXyY/0rIYnQw
tRwmTx0vAgMBAAECggEAFFLADC5mYMJzCrxodANgKjZq4A4n+1gF1ApMt/Mm88eD
hE7g4qcyVEDFIhMwzsqihRYqrsVG+pVJpWhivqfAbwabU51Sx7bliKjP+du+0T39
ZgCQTukmadaazaYbI2grSqLWUugDTm0wBiJKv+Fd0xZfAAfq9FEDqcLDvGhRUwdE
Bbm7gAQ0lhY69bKW/6mTuwEXnQWatRuaNQHb246sn3bt47oQBqzhZN5YspKlvLIB
mPJAeLN1Ca+TbKoIMZIRgwoXkjVSOUhf1fYFyTpBFCc6Zpm80+gdCQRTYxza5USW
rrD5mqgyxfUasSWP3xaMnV1o+5Hiz3y5yAm/8SqjWQKBgQDWPsQhvys/JP2qmDet
aThlCMkCBM95E7TEgDk50YR12TpH7K2nXAuMrN6vriu7bib5Y3esj1SOK6E32vLk
diP7Rb0yF3tqVoXvwq4/t80YTc0wQY901EzSikEHlvAftkAbO5Tw7xuSCCOLvd0P
RxLsqjHNM5mPP+3y/MngEEe1lQKBgQDHj90lE3l81xN8CSsVA2lcaHHvcogQ7DGa
4DnYoN9QDS5nKpDB77a9gUYHuwZSpLsBqcA2sraYzXv+fT6yEdvXmM6BGwYfx4q2
5LG5WweBm3IwEHOwXW8I/MDIUFl5XkEW1/ar6tnRvOEIBo1a1wxf0kEffbOYf+Yy
BNfAHgkOswKBgQCBqhsqEXkrDkg4J0gLO9NV0qtU/XRT4wlUpAX+aD+y03Xicevn
jl2vFjDwQolVNqV/6iNT3KtgICfCllDK1HWSbfLDjlKzWQpWwYyUI7mNLAkzW3pn
StXz1pjk7wUFLFhAIx9RcmVNTH+244IW7P0XHypk9wXJHPf2R+gmI7RCwQKBgFaS
u75M34RgDazekVkRXNDg4qSdDBhDTxXANnga+iXRQhMxbRElPCKkBUxvP0P1AMes
650PFJXfdu4lSWCYzMWQHe32WkbJGw1S0yL1MaFxXS0qxfV54ySD+eIssVQsppIR
aIqWXJ5XkUwZA5On/U9IeEYAEzySJ7wFS8+leApvAoGAR1TVSWIk6dw6+BDH4QEF
DfnRmSvYdZihw0n84LU1BCR5Q6LO38r2exbnV1B+3rq4QajxcF1Qc+im7DRiyvuZ
FBQBXdfYurl8i8dyyhfR4XuwSqPOjBjrusq4hwOmga43/F3aGOOVomfVyUYQ1pro
Z2SBtOGMAoFMVnnpX4ncZOc=
-----END PRIVATE KEY-----
";

    #[test]
    fn rsa_keys_sign_with_sha256_first() {
        use rustls::SignatureScheme as S;
        let der = key_from_pem(TEST_RSA_KEY.as_bytes(), Path::new("test")).unwrap();
        let key = sha256_first(provider().key_provider.load_private_key(der).unwrap());
        let chosen = |offered: &[S]| key.choose_scheme(offered).map(|s| s.scheme());
        // rustls's own client lists SHA-512 first, OpenSSL's SHA-256: both get SHA-256.
        let rustls_client = [
            S::ECDSA_NISTP384_SHA384,
            S::ED25519,
            S::RSA_PSS_SHA512,
            S::RSA_PSS_SHA384,
            S::RSA_PSS_SHA256,
            S::RSA_PKCS1_SHA512,
            S::RSA_PKCS1_SHA384,
            S::RSA_PKCS1_SHA256,
        ];
        assert_eq!(chosen(&rustls_client), Some(S::RSA_PSS_SHA256));
        // PSS before PKCS#1 v1.5 whatever the hash; nothing offered is refused.
        assert_eq!(
            chosen(&[S::RSA_PKCS1_SHA256, S::RSA_PSS_SHA384]),
            Some(S::RSA_PSS_SHA384)
        );
        assert_eq!(chosen(&[S::RSA_PSS_SHA512]), Some(S::RSA_PSS_SHA512));
        assert_eq!(chosen(&[S::RSA_PKCS1_SHA512]), Some(S::RSA_PKCS1_SHA512));
        assert_eq!(chosen(&[S::ECDSA_NISTP256_SHA256]), None);
        // The chosen signer signs (RSA 2048: 256 bytes).
        let signer = key.choose_scheme(&rustls_client).unwrap();
        let message = b"TLS 1.3, server CertificateVerify";
        let signature = signer.sign(message).unwrap();
        assert_eq!(signature.len(), 256);
        // An ECDSA key has one scheme and is left as it is.
        let dev = key_from_pem(DEV_KEY_PEM, Path::new("dev")).unwrap();
        let dev = provider().key_provider.load_private_key(dev).unwrap();
        let same = sha256_first(dev.clone());
        assert!(Arc::ptr_eq(&dev, &same));
    }

    #[test]
    fn configs_build() {
        let dev = load_certified_key(&CertSource::EmbeddedDev).unwrap();
        server_config(SniResolver::new(dev)).unwrap();
        let ca = file(CA_PEM);
        client_config(Some(ca.path())).unwrap();
        let not_ca = file(b"hello");
        assert!(client_config(Some(not_ca.path())).is_err());
    }
}
