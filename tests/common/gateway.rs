//! The gateway binary: built once, started on ports chosen at run time, its log read.

use super::*;

/// A running rtmpgate, killed when dropped (its log is printed if the test is failing).
pub struct Gateway {
    pub(crate) proc: Proc,
    pub(crate) dir: TempDir,
    pub(crate) listeners: Vec<(String, SocketAddr)>,
}

/// Options for starting a gateway beyond its command-line arguments.
#[derive(Default)]
pub struct GatewayBuilder {
    pub(crate) args: Vec<String>,
    pub(crate) config: Option<String>,
    pub(crate) listeners: Option<usize>,
    pub(crate) env: Vec<(String, String)>,
    /// A command line the gateway runs under (`unshare ...`, `prlimit ...`), which must end
    /// by exec'ing it (same pid) with the arguments that follow.
    pub(crate) wrap: Vec<String>,
}

impl GatewayBuilder {
    /// Command-line arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// An rtmp and an rtmps listener on ports bound to 0 (each also serves its tunnel
    /// sibling), with the harness's dev certificate.
    pub fn rtmp_and_rtmps(self) -> Self {
        self.rtmp_and_rtmps_with(dev_certs())
    }

    /// [`GatewayBuilder::rtmp_and_rtmps`] with these certificates (e.g. [`rsa_certs`]).
    pub fn rtmp_and_rtmps_with(self, c: &DevCerts) -> Self {
        self.rtmp_and_rtmps_with_chains(&[c])
    }

    /// [`GatewayBuilder::rtmp_and_rtmps`] serving several chains for the same names (an RSA
    /// and an ECDSA one: each client gets the one it can take), in the order given.
    pub fn rtmp_and_rtmps_with_chains(self, certs: &[&DevCerts]) -> Self {
        let mut b = self.args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--listen",
            "rtmps://127.0.0.1:0",
        ]);
        for c in certs {
            let chain = c.chain.display().to_string();
            let key = c.key.display().to_string();
            b = b.args(&["--tls-cert", &chain, "--tls-key", &key]);
        }
        b
    }

    /// A TOML config file with this text, passed as `--config FILE` (flags still win).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// How many `listening on` lines to wait for (default: the number of `--listen` flags,
    /// or the three default listeners when there are none).
    pub fn listeners(mut self, n: usize) -> Self {
        self.listeners = Some(n);
        self
    }

    /// Runs the gateway as the last argument of this command line (which must exec it, so
    /// the pid the harness kills is the gateway's).
    pub fn wrap(mut self, cmd: &[&str]) -> Self {
        self.wrap = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// An environment variable for the gateway.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts it and waits for its listeners; fails the test with its log if it cannot.
    pub fn start(self) -> Gateway {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts it and waits for its listeners; Err carries what went wrong and its log.
    pub fn try_start(self) -> Result<Gateway, String> {
        let dir = temp_dir();
        let mut cmd = self.command(&dir);
        let want = self.listeners.unwrap_or_else(|| {
            match self
                .args
                .iter()
                .filter(|a| *a == "--listen" || a.starts_with("--listen="))
                .count()
            {
                0 => 3,
                n => n,
            }
        });
        cmd.env("NO_COLOR", "1");
        let proc = Proc::spawn("rtmpgate", cmd);
        let mut gw = Gateway {
            proc,
            dir,
            listeners: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            gw.listeners = parse_listening(&gw.proc.log.lines());
            if gw.listeners.len() >= want {
                return Ok(gw);
            }
            if let Some(status) = gw.proc.try_status() {
                // Give the reader threads a moment to collect the last lines.
                thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "rtmpgate exited ({status}) before listening; its log:\n{}",
                    gw.proc.log()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rtmpgate did not log {want} `listening on` line(s) within {START_TIMEOUT:?}; \
                     its log:\n{}",
                    gw.proc.log()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs it expecting it to exit by itself (e.g. a bad certificate, --check-config):
    /// (exit status, or None if it was still running after `timeout` and was killed; log).
    pub fn run_to_exit(self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let dir = temp_dir();
        let mut cmd = self.command(&dir);
        cmd.env("NO_COLOR", "1");
        let (status, out, err) = run_capture(&mut cmd, timeout);
        let mut log = String::from_utf8_lossy(&out).into_owned();
        log.push_str(&strip_ansi(&String::from_utf8_lossy(&err)));
        (status, log)
    }

    pub(crate) fn command(&self, dir: &TempDir) -> Command {
        let bin = env!("CARGO_BIN_EXE_rtmpgate");
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // The gateway finds its dev certificate in certs/ relative to the checkout.
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(toml) = &self.config {
            let path = dir.path().join("rtmpgate.toml");
            fs::write(&path, toml).expect("cannot write the gateway's config file");
            cmd.arg("--config").arg(path);
        }
        cmd.args(&self.args);
        if !self.args.iter().any(|a| a.starts_with("--log-level")) {
            let level = std::env::var("RTMPGATE_TEST_LOG").unwrap_or_else(|_| "info".into());
            cmd.env("RUST_LOG", level);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// `listening on SCHEME://ADDR` lines, in order (the door's interface for tests and tools).
pub fn parse_listening(lines: &[String]) -> Vec<(String, SocketAddr)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("listening on ")? + "listening on ".len()..];
            let url = rest.split_whitespace().next()?;
            let (scheme, addr) = url.split_once("://")?;
            let addr = addr.trim_end_matches('/').parse().ok()?;
            Some((scheme.to_string(), addr))
        })
        .collect()
}

impl Gateway {
    /// Starts rtmpgate with these arguments and waits for its listeners.
    pub fn start(args: &[&str]) -> Gateway {
        Gateway::builder().args(args).start()
    }

    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The listeners it reported, in order.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// The address of its first listener with this scheme (rtmp, rtmps, rtmpt, rtmpts).
    /// A plain listener also serves the other plain schemes (sniffing), so `addr("rtmpt")`
    /// falls back to an rtmp listener and the reverse, and likewise rtmps and rtmpts.
    pub fn addr(&self, scheme: &str) -> SocketAddr {
        let family: &[&str] = match scheme {
            "rtmp" | "rtmpt" | "rtmpe" | "rtmpte" => &["rtmp", "rtmpt"],
            "rtmps" | "rtmpts" => &["rtmps", "rtmpts"],
            other => panic!("unknown scheme {other}"),
        };
        let exact = self.listeners.iter().find(|(s, _)| s == scheme);
        let near = self
            .listeners
            .iter()
            .find(|(s, _)| family.contains(&s.as_str()));
        match exact.or(near) {
            Some((_, a)) => *a,
            None => panic!(
                "rtmpgate has no listener serving {scheme}; it listens on {:?}",
                self.listeners
            ),
        }
    }

    /// `SCHEME://127.0.0.1:PORT` for clients (no trailing slash; append `/live/key`).
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr(scheme))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its log so far (stderr and stdout, colours removed).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// True if a log line that has arrived so far contains `needle`: for a line that is
    /// expected after an event, [`Gateway::expect_log`].
    pub fn log_contains(&self, needle: &str) -> bool {
        self.proc.log.contains(needle)
    }

    /// Waits up to [`LOG_LAG`] for a log line containing `needle`: a line an event the test
    /// saw has caused (the log arrives a moment after the event).
    pub fn expect_log(&self, needle: &str) -> bool {
        self.wait_log(needle, LOG_LAG)
    }

    /// Waits up to `timeout` for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.proc.log.contains(needle))
    }

    /// Waits up to `timeout` until at least `n` log lines contain `needle`; true if they do.
    /// Prefer it to [`Gateway::count_log`] right after an event: the log is read from the
    /// gateway's stderr by another thread, so a line may arrive a moment after the client
    /// saw its effect.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count_log(needle) >= n)
    }

    /// How many log lines contain `needle` so far (see [`Gateway::wait_log_count`]).
    pub fn count_log(&self, needle: &str) -> usize {
        self.proc
            .log
            .lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// A temporary directory that lives as long as the gateway.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Open file descriptors of the gateway process.
    pub fn fds(&self) -> usize {
        fd_count(self.pid())
    }

    pub fn threads(&self) -> u64 {
        thread_count(self.pid())
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }

    /// A snapshot of its resource use, for "nothing left behind" checks.
    pub fn usage(&self) -> Usage {
        Usage {
            fds: self.fds(),
            threads: self.threads(),
            rss_kb: self.rss_kb(),
        }
    }

    /// Waits until its fd count is at most `baseline` (sessions closed, sockets released);
    /// fails the test with the figures if it does not get there in `timeout`.
    pub fn assert_fds_back_to(&self, baseline: usize, timeout: Duration) {
        let ok = wait_until(timeout, || self.fds() <= baseline);
        let now = self.fds();
        eprintln!("rtmpgate fds: baseline {baseline}, now {now}");
        assert!(
            ok,
            "rtmpgate still holds {now} fds, {} more than its baseline of {baseline}, \
             {timeout:?} after its sessions ended; /proc/{}/fd:\n{}",
            now.saturating_sub(baseline),
            self.pid(),
            list_fds(self.pid())
        );
    }

    /// Sends SIGTERM and waits up to `timeout` for it to exit; None if it did not (it is then
    /// killed when dropped).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.signal("TERM");
        self.proc.wait_timeout(timeout)
    }

    /// Sends a signal by name.
    pub fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    /// Waits up to `timeout` for it to exit (after a signal sent with [`Gateway::signal`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.proc.try_status()
    }
}

/// A process's resource use at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub threads: u64,
    pub rss_kb: u64,
}

/// What each fd of a process points at, one per line, with TCP sockets resolved to their
/// addresses and state (for failure messages).
pub fn list_fds(pid: u32) -> String {
    let sockets = tcp_sockets();
    let mut s = String::new();
    if let Ok(d) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            let target = fs::read_link(e.path()).unwrap_or_default();
            let target = target.display().to_string();
            let detail = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|inode| sockets.get(inode))
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {} -> {target}{detail}",
                e.file_name().to_string_lossy()
            );
        }
    }
    s
}

/// TCP sockets by inode: "127.0.0.1:1935 -> 127.0.0.1:40000 ESTABLISHED".
pub(crate) fn tcp_sockets() -> BTreeMap<String, String> {
    const STATES: [&str; 12] = [
        "?",
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
    ];
    let mut map = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let st = usize::from_str_radix(f[3], 16).unwrap_or(0);
            let port = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            map.insert(
                f[9].to_string(),
                format!(
                    "tcp :{} -> :{} {}",
                    port(f[1]),
                    port(f[2]),
                    STATES.get(st).unwrap_or(&"?")
                ),
            );
        }
    }
    map
}

/// The admin address the gateway logged (`admin listener on http://ADDR: ...`).
pub fn admin_addr(gw: &Gateway) -> SocketAddr {
    assert!(
        gw.wait_log("admin listener on ", Duration::from_secs(10)),
        "no admin listener line; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("admin listener on "))
        .unwrap();
    // "admin listener on http://127.0.0.1:PORT: status page /, ..."
    let rest = &line[line.find("://").unwrap() + 3..];
    let addr = rest.split(": ").next().unwrap();
    addr.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
}
