//! Shared harness for rtmpgate's integration tests: finds the real peers (ffmpeg, rtmpdump,
//! nginx-rtmp, stunnel, curl), starts the gateway and peers on loopback ports chosen at run
//! time, makes test media once per run, and compares received media with the source packet by
//! packet.
//!
//! Use it from a test file with `mod common;`. Every process it starts is killed when its
//! guard is dropped, and every wait is bounded: a test fails, it never hangs. A missing peer
//! fails the test (it is not skipped), with a message saying to run scripts/install-peers.sh,
//! because a silently skipped test would hide a broken install.

// Each test binary uses a different part of the harness; test code may panic by design.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod delay;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// How long a gateway or peer may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a player may run on after its publisher finished, before it is killed.
pub const PLAYER_TAIL: Duration = Duration::from_secs(20);
/// Seconds of silence after which an ffmpeg or rtmpdump player gives up on its own. Far
/// longer than any bound a test asserts (closing a client takes well under 5 s): when a
/// test waits for a player to be closed, only the gateway can end it in time, never the
/// player's own give-up. Players of a healthy stream are stopped by the harness
/// ([`PLAYER_QUIET`]), so this costs nothing when things work.
pub const PLAYER_IDLE_SECS: u64 = 60;
/// How long a player's output may stay the same size, after its publisher finished, before the
/// harness decides the stream is over and stops it.
pub const PLAYER_QUIET: Duration = Duration::from_secs(2);

const INSTALL_HINT: &str = "run scripts/install-peers.sh (as root, or with passwordless sudo) \
                            to install them; CI does this before the tests";

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

/// Paths of the real programs the tests drive.
#[derive(Debug)]
pub struct Peers {
    /// Debian's ffmpeg 5.1: rtmp, rtmps, rtmpt, rtmpts.
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
    /// rtmpdump 2.4 (librtmp): rtmp, rtmpt, rtmpe, rtmpte, rtmps.
    pub rtmpdump: PathBuf,
    pub nginx: PathBuf,
    /// nginx's RTMP module (libnginx-mod-rtmp), loaded by the generated config.
    pub nginx_rtmp_module: PathBuf,
    pub stunnel: PathBuf,
    /// haproxy, the L4 proxy users would pick (PROXY protocol tests, benchmarks).
    pub haproxy: PathBuf,
    pub curl: PathBuf,
    pub openssl: PathBuf,
    /// The static ffmpeg from the imageio-ffmpeg wheel: all six schemes, rtmpe and rtmpte too.
    pub static_ffmpeg: PathBuf,
}

/// The peers, looked up once per test binary. Panics (fails the test) naming every missing
/// one and how to install it.
pub fn peers() -> &'static Peers {
    static PEERS: OnceLock<Result<Peers, String>> = OnceLock::new();
    match PEERS.get_or_init(Peers::find) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

impl Peers {
    fn find() -> Result<Peers, String> {
        let mut missing = Vec::new();
        let mut get = |name: &str, pkg: &str| match which(name) {
            Some(p) => p,
            None => {
                missing.push(format!("{name} (package {pkg})"));
                PathBuf::new()
            }
        };
        let ffmpeg = get("ffmpeg", "ffmpeg");
        let ffprobe = get("ffprobe", "ffmpeg");
        let rtmpdump = get("rtmpdump", "rtmpdump");
        let nginx = get("nginx", "nginx");
        let stunnel = get("stunnel4", "stunnel4");
        let haproxy = get("haproxy", "haproxy");
        let curl = get("curl", "curl");
        let openssl = get("openssl", "openssl");
        let nginx_rtmp_module = [
            "/usr/lib/nginx/modules/ngx_rtmp_module.so",
            "/usr/lib64/nginx/modules/ngx_rtmp_module.so",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
        if nginx_rtmp_module.is_none() {
            missing.push("the nginx RTMP module (package libnginx-mod-rtmp)".into());
        }
        let static_ffmpeg = find_static_ffmpeg();
        if static_ffmpeg.is_none() {
            missing.push(
                "the static ffmpeg from the PyPI wheel imageio-ffmpeg (in /opt/imageio-venv, \
                 target/peers/venv, $RTMPGATE_PEERS_VENV or $RTMPGATE_STATIC_FFMPEG)"
                    .into(),
            );
        }
        if !missing.is_empty() {
            return Err(format!(
                "missing test peers: {}; {INSTALL_HINT}",
                missing.join(", ")
            ));
        }
        Ok(Peers {
            ffmpeg,
            ffprobe,
            rtmpdump,
            nginx,
            nginx_rtmp_module: nginx_rtmp_module.unwrap_or_default(),
            stunnel,
            haproxy,
            curl,
            openssl,
            static_ffmpeg: static_ffmpeg.unwrap_or_default(),
        })
    }
}

/// Looks a program up on PATH and in the sbin directories a non-root PATH often lacks.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_static_ffmpeg() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RTMPGATE_STATIC_FFMPEG") {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("RTMPGATE_PEERS_VENV") {
        venvs.push(PathBuf::from(v));
    }
    venvs.push(PathBuf::from("/opt/imageio-venv"));
    venvs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv"));
    for venv in venvs {
        let Ok(libs) = fs::read_dir(venv.join("lib")) else {
            continue;
        };
        for lib in libs.flatten() {
            if !lib.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            let bins = lib.path().join("site-packages/imageio_ffmpeg/binaries");
            let Ok(entries) = fs::read_dir(&bins) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if e.file_name().to_string_lossy().starts_with("ffmpeg-") && is_executable(&p) {
                    return Some(p);
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every 25 ms until it holds or `timeout` passes; true if it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("rtmpgate-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// True once something accepts TCP connections on `addr`.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Open file descriptors of a process (from /proc/PID/fd).
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A numeric field of /proc/PID/status (e.g. "Threads", "VmRSS" in kB).
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Threads of a process.
pub fn thread_count(pid: u32) -> u64 {
    proc_status(pid, "Threads").unwrap_or(0)
}

/// Resident memory of a process, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    proc_status(pid, "VmRSS").unwrap_or(0)
}

/// CPU time (user + system) a process has used, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Established TCP connections on loopback whose local port is `port` (the server side of
/// connections to a listener on that port), from /proc/net/tcp and tcp6.
pub fn established_on(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 01 is ESTABLISHED.
            let (Some(local), Some(st)) = (f.get(1), f.get(3)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *st == "01" && lport == Some(port) {
                n += 1;
            }
        }
    }
    n
}

/// Where test media and certificates are cached across test runs: target/test-media.
pub fn media_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("test-media");
    fs::create_dir_all(&dir).expect("cannot create target/test-media");
    dir
}

/// Makes `dest` with `make(staging_path)` unless it exists. The staging path is unique and
/// renamed into place at the end, so concurrent tests (and test binaries) never see half a
/// file and never make it twice at once.
fn cached(dest: &Path, make: impl FnOnce(&Path)) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if dest.exists() {
        return dest.to_path_buf();
    }
    let staging = dest.with_extension(format!("staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&staging);
    make(&staging);
    if fs::rename(&staging, dest).is_err() && !dest.exists() {
        panic!("cannot move {} to {}", staging.display(), dest.display());
    }
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_file(&staging);
    dest.to_path_buf()
}

/// Runs a command to completion with a bound on its time; panics with its output if it fails
/// or overruns. Returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Vec<u8> {
    let (status, out, err) = run_capture(cmd, timeout);
    if !status.is_some_and(|s| s.success()) {
        panic!(
            "{:?} failed ({}):\n{}",
            cmd,
            status.map_or("timed out".into(), |s| s.to_string()),
            String::from_utf8_lossy(&err)
        );
    }
    out
}

/// Runs a command with a bound on its time: (exit status, or None if it was killed at the
/// timeout; stdout; stderr).
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> (Option<ExitStatus>, Vec<u8>, Vec<u8>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Sends a signal (by name: TERM, INT, KILL...) to a process through kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// The last lines a process wrote to stdout and stderr, shared with the reader threads.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

const LOG_LINES: usize = 20_000;

impl LogTail {
    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= LOG_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    /// Everything kept so far, one line each.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::new();
        for l in q.iter() {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// The lines kept so far.
    pub fn lines(&self) -> Vec<String> {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().cloned().collect()
    }

    /// True if any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        let q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().any(|l| l.contains(needle))
    }

    fn follow(&self, pipe: impl Read + Send + 'static) {
        let tail = self.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Split on '\r' too: rtmpdump redraws its progress line with it.
                        let text = String::from_utf8_lossy(&buf);
                        for piece in text.split(['\r', '\n']).filter(|p| !p.is_empty()) {
                            tail.push(strip_ansi(piece));
                        }
                    }
                }
            }
        });
    }
}

/// Removes terminal colour escapes (ESC [ ... letter) from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A child process that is killed (SIGKILL) when dropped, with its output kept; the output
/// is printed when the test is failing, so the reason is in the test's report.
pub struct Proc {
    name: String,
    child: Child,
    log: LogTail,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = LogTail::default();
        if let Some(out) = child.stdout.take() {
            log.follow(out);
        }
        if let Some(err) = child.stderr.take() {
            log.follow(err);
        }
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The output kept so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    pub fn log_tail(&self) -> &LogTail {
        &self.log
    }

    /// The exit status if it has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for it to exit; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Waits up to `timeout`, then kills it if it is still running. True if it exited by
    /// itself.
    pub fn wait_or_kill(&mut self, timeout: Duration) -> bool {
        if self.wait_timeout(timeout).is_some() {
            return true;
        }
        self.kill();
        false
    }

    /// Sends a signal by name (TERM, INT, KILL, STOP...).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            let text = self.log.text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            eprintln!(
                "---- {} (pid {}, {:?}): last {} lines of its output ----\n{}\n---- end of {} ----",
                self.name,
                self.child.id(),
                self.status,
                lines.len() - from,
                lines[from..].join("\n"),
                self.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// A running rtmpgate, killed when dropped (its log is printed if the test is failing).
pub struct Gateway {
    proc: Proc,
    dir: TempDir,
    listeners: Vec<(String, SocketAddr)>,
}

/// Options for starting a gateway beyond its command-line arguments.
#[derive(Default)]
pub struct GatewayBuilder {
    args: Vec<String>,
    config: Option<String>,
    listeners: Option<usize>,
    env: Vec<(String, String)>,
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
        let c = dev_certs();
        let chain = c.chain.display().to_string();
        let key = c.key.display().to_string();
        self.args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--listen",
            "rtmps://127.0.0.1:0",
            "--tls-cert",
            &chain,
            "--tls-key",
            &key,
        ])
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

    fn command(&self, dir: &TempDir) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtmpgate"));
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

    /// True if a log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.proc.log.contains(needle)
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
fn tcp_sockets() -> BTreeMap<String, String> {
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

// ---------------------------------------------------------------------------------------------
// nginx-rtmp
// ---------------------------------------------------------------------------------------------

/// nginx with its RTMP module on a loopback port, `application live`; one process
/// (`master_process off`), so killing it leaves no orphaned worker.
pub struct Nginx {
    proc: Proc,
    dir: TempDir,
    port: u16,
}

impl Nginx {
    pub fn start() -> Nginx {
        Nginx::start_with_listen_options("")
    }

    /// With extra parameters on its `listen` line, e.g. "proxy_protocol".
    pub fn start_with_listen_options(options: &str) -> Nginx {
        Nginx::launch(None, options)
    }

    /// On a given port (a backend restarting where it was).
    pub fn start_on_port(port: u16) -> Nginx {
        Nginx::launch(Some(port), "")
    }

    fn launch(fixed_port: Option<u16>, options: &str) -> Nginx {
        let p = peers();
        let mut last = String::new();
        // Another test may grab the port between free_port() and nginx's bind: retry.
        for _ in 0..4 {
            let dir = temp_dir();
            let port = fixed_port.unwrap_or_else(free_port);
            let d = dir.path().display();
            let conf = format!(
                "load_module {module};\n\
                 worker_processes 1; daemon off; master_process off;\n\
                 error_log {d}/error.log warn; pid {d}/nginx.pid;\n\
                 events {{ worker_connections 4096; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{port} {options}; chunk_size 4096;\n  \
                 application live {{ live on; record off; }} }} }}\n",
                module = p.nginx_rtmp_module.display(),
            );
            let conf_path = dir.path().join("nginx.conf");
            fs::write(&conf_path, conf).expect("cannot write nginx.conf");
            let mut cmd = Command::new(&p.nginx);
            cmd.arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"));
            let mut proc = Proc::spawn("nginx", cmd);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let up = wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running());
            if up && proc.is_running() {
                return Nginx { proc, dir, port };
            }
            proc.kill();
            last = format!(
                "{}{}",
                proc.log(),
                fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
        }
        panic!("nginx-rtmp did not start; its output:\n{last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `rtmp://127.0.0.1:PORT`, the value for `--upstream`.
    pub fn upstream(&self) -> String {
        format!("rtmp://127.0.0.1:{}", self.port)
    }

    /// `rtmp://127.0.0.1:PORT/PATH`, e.g. `url("live/test")`.
    pub fn url(&self, path: &str) -> String {
        format!("rtmp://127.0.0.1:{}/{}", self.port, path)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Connections nginx has open from clients (the gateway's upstream legs, for example).
    pub fn clients(&self) -> usize {
        established_on(self.port)
    }

    /// nginx's error.log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Kills it at once (a backend dying mid-stream).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.kill();
        if thread::panicking() {
            eprintln!("---- nginx error.log ----\n{}", self.error_log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS: a throwaway CA and a localhost leaf, and stunnel
// ---------------------------------------------------------------------------------------------

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
    CERTS.get_or_init(|| {
        let dir = cached(&media_dir().join("certs"), make_certs);
        DevCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            chain: dir.join("chain.pem"),
            key: dir.join("key.pem"),
            dir,
        }
    })
}

fn make_certs(dir: &Path) {
    let openssl = &peers().openssl;
    fs::create_dir_all(dir).expect("cannot create the certs directory");
    let t = Duration::from_secs(30);
    let ossl = |args: &[&str]| {
        let mut c = Command::new(openssl);
        c.current_dir(dir).args(args);
        run_ok(&mut c, t);
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    ossl(
        &[
            &["req", "-x509", "-nodes"][..],
            &ec,
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
            &ec,
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
    proc: Proc,
    dir: TempDir,
    port: u16,
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

// ---------------------------------------------------------------------------------------------
// haproxy, for the PROXY protocol
// ---------------------------------------------------------------------------------------------

/// haproxy in TCP mode on a free 127.0.0.1 port, forwarding to `backend`; `bind_opts` go on
/// its `bind` line (`accept-proxy`: it reads a PROXY header) and `server_opts` on its `server`
/// line (`send-proxy-v2`: it sends one). Returns the process, its config directory and port.
pub fn haproxy_tcp(
    backend: SocketAddr,
    bind_opts: &str,
    server_opts: &str,
) -> (Proc, TempDir, u16) {
    let dir = temp_dir();
    let port = free_port();
    let conf = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 60s\n  timeout server 60s\nfrontend f\n  \
         bind 127.0.0.1:{port} {bind_opts}\n  default_backend b\nbackend b\n  \
         server s {backend} {server_opts}\n"
    );
    let path = dir.path().join("haproxy.cfg");
    fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(&peers().haproxy);
    cmd.arg("-db").arg("-f").arg(&path);
    let mut proc = Proc::spawn("haproxy", cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running()) && proc.is_running(),
        "haproxy did not start: {}",
        proc.log()
    );
    (proc, dir, port)
}

// ---------------------------------------------------------------------------------------------
// Media and clients
// ---------------------------------------------------------------------------------------------

/// An FLV test source of `seconds` seconds (testsrc2 640x360 at 30 fps, H.264 with a keyframe
/// every 30 frames, and a sine tone in AAC), made once and cached in target/test-media.
pub fn source_flv(seconds: u32) -> PathBuf {
    let dest = media_dir().join(format!("src-{seconds}s.flv"));
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", &seconds.to_string()])
            .args(["-c:v", "libx264", "-g", "30", "-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

/// A heavy FLV source of `seconds` seconds: random noise at 320x240, 30 fps, H.264 at a low
/// quantiser (about 22 Mb/s, 2.7 MB a second: no encoder can shrink noise), a keyframe every
/// 30 frames, and a sine tone. For bounds that an unbounded queue must visibly break.
pub fn noise_source_flv(seconds: u32) -> PathBuf {
    let dest = media_dir().join(format!("noise-{seconds}s.flv"));
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i"])
            .arg("nullsrc=s=320x240:r=30,geq=lum='random(1)*255':cb=128:cr=128")
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", &seconds.to_string()])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-qp",
                "12",
                "-g",
                "30",
            ])
            .args(["-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

/// Publishes `file` in real time with `ffmpeg -re -i FILE -c copy -f flv URL`; `ffmpeg` is
/// `&peers().ffmpeg` or `&peers().static_ffmpeg`.
pub fn publish(ffmpeg: &Path, url: &str, file: &Path) -> Proc {
    let mut cmd = Command::new(ffmpeg);
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-i",
    ])
    .arg(file)
    .args(["-c", "copy", "-f", "flv", url]);
    Proc::spawn(&format!("ffmpeg publisher to {url}"), cmd)
}

/// Plays `url` with Debian's ffmpeg into `out` (FLV, packets copied).
pub fn play_ffmpeg(url: &str, out: &Path) -> Proc {
    play_ffmpeg_with(&peers().ffmpeg, url, out)
}

/// Plays `url` with this ffmpeg into `out`. It gives up after PLAYER_IDLE_SECS without data
/// (`-rw_timeout`), so a stalled stream ends the player rather than the test's patience.
pub fn play_ffmpeg_with(ffmpeg: &Path, url: &str, out: &Path) -> Proc {
    let mut cmd = Command::new(ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "warning", "-y"])
        .args(["-rw_timeout", &(PLAYER_IDLE_SECS * 1_000_000).to_string()])
        .args(["-i", url, "-c", "copy", "-f", "flv"])
        .arg(out);
    Proc::spawn(&format!("ffmpeg player of {url}"), cmd)
}

/// Plays `url` (live) with rtmpdump into `out`; it gives up after PLAYER_IDLE_SECS without
/// data.
pub fn play_rtmpdump(url: &str, out: &Path) -> Proc {
    let mut cmd = Command::new(&peers().rtmpdump);
    cmd.args(["-v", "-m", &PLAYER_IDLE_SECS.to_string(), "-r", url, "-o"])
        .arg(out);
    Proc::spawn(&format!("rtmpdump player of {url}"), cmd)
}

/// Waits for `publisher` to finish (at most `within`) with success, then for `player` to stop
/// by itself (at most [`PLAYER_TAIL`]); `what` names the run in the failure messages.
pub fn wait_publisher_then_player(
    publisher: &mut Proc,
    player: &mut Proc,
    within: Duration,
    what: &str,
) {
    let st = publisher
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{what}: the publisher did not finish within {within:?}"));
    assert!(
        st.success(),
        "{what}: the publisher failed: {}",
        publisher.log()
    );
    assert!(
        player.wait_timeout(PLAYER_TAIL).is_some(),
        "{what}: the player did not stop within {PLAYER_TAIL:?} after the publisher left"
    );
}

/// The duration of a media file in seconds (ffprobe), if it can be read.
pub fn media_seconds(file: &Path) -> Option<f64> {
    let mut cmd = Command::new(&peers().ffprobe);
    cmd.args([
        "-v",
        "error",
        "-show_entries",
        "format=duration",
        "-of",
        "csv=p=0",
    ])
    .arg(file);
    let (status, out, _) = run_capture(&mut cmd, Duration::from_secs(20));
    if !status.is_some_and(|s| s.success()) {
        return None;
    }
    String::from_utf8_lossy(&out).trim().parse().ok()
}

/// One packet of a media file, as `ffmpeg -f framemd5` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// "video" or "audio" (from the framemd5 header), so files whose streams were found in a
    /// different order still compare.
    pub media: String,
    pub stream: u32,
    pub dts: i64,
    pub size: u64,
    pub hash: String,
}

/// The packets of `file` (`ffmpeg -i FILE -c copy -f framemd5 -`). A missing or unreadable
/// file gives no packets (the comparison then says so).
pub fn framemd5(file: &Path) -> Vec<Frame> {
    if !file.exists() {
        eprintln!("framemd5: {} does not exist", file.display());
        return Vec::new();
    }
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
        .arg(file)
        .args(["-c", "copy", "-f", "framemd5", "-"]);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(60));
    if !status.is_some_and(|s| s.success()) {
        eprintln!(
            "framemd5 of {} ended with {status:?}: {}",
            file.display(),
            String::from_utf8_lossy(&err).trim()
        );
    }
    parse_framemd5(&String::from_utf8_lossy(&out))
}

/// Parses framemd5 text: `#media_type N: video` headers, then
/// `stream, dts, pts, duration, size, hash` lines.
pub fn parse_framemd5(text: &str) -> Vec<Frame> {
    let mut media: BTreeMap<u32, String> = BTreeMap::new();
    let mut frames = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#media_type ") {
            if let Some((idx, kind)) = rest.split_once(':') {
                if let Ok(i) = idx.trim().parse() {
                    media.insert(i, kind.trim().to_string());
                }
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 6 {
            continue;
        }
        let (Ok(stream), Ok(dts), Ok(size)) = (f[0].parse(), f[1].parse(), f[4].parse()) else {
            continue;
        };
        frames.push(Frame {
            media: media
                .get(&stream)
                .cloned()
                .unwrap_or_else(|| format!("stream{stream}")),
            stream,
            dts,
            size,
            hash: f[5].to_string(),
        });
    }
    frames
}

/// How a received file compares with its source.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Per media type: (received packets that match, source packets, index in the source where
    /// the run starts).
    pub streams: BTreeMap<String, (usize, usize, usize)>,
    /// Matching packets over source packets, all streams together.
    pub fraction: f64,
    /// True if the last received packet was cut short (allowed, not counted as matching).
    pub cut_last: bool,
    /// Per media type: how much of the source's end is missing after the last matching
    /// packet, in ms of dts (FLV's time base is 1/1000).
    pub tail_ms: BTreeMap<String, i64>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}% of the source", self.fraction * 100.0)?;
        for (media, (got, of, start)) in &self.streams {
            let tail = self.tail_ms.get(media).copied().unwrap_or(0);
            write!(
                f,
                "; {media} {got}/{of} from #{start}, {tail} ms short of the end"
            )?;
        }
        if self.cut_last {
            write!(f, "; last packet cut short")?;
        }
        Ok(())
    }
}

impl RunReport {
    /// The index in the source where the received `media` ("video", "audio") packets start.
    pub fn start(&self, media: &str) -> Option<usize> {
        self.streams.get(media).map(|s| s.2)
    }
}

/// How many of `frames` are `media` ("video", "audio") packets.
pub fn count_media(frames: &[Frame], media: &str) -> usize {
    frames.iter().filter(|f| f.media == media).count()
}

/// Asserts that, for each stream, the received packets are one contiguous run of the source's
/// packets (same payload hashes, in order, nothing skipped or repeated), allowing only the
/// very last received packet to be cut short; and that at least `min_fraction` of the source
/// arrived. Prints the figures, labelled with `what`, and returns them.
pub fn assert_contiguous_run(
    what: &str,
    src: &[Frame],
    got: &[Frame],
    min_fraction: f64,
) -> RunReport {
    let report = match contiguous_run(src, got) {
        Ok(r) => r,
        Err(e) => panic!("{what}: received packets are not a contiguous run of the source: {e}"),
    };
    eprintln!("{what}: {report}");
    assert!(
        report.fraction >= min_fraction,
        "{what}: received {:.1}% of the source, below the expected {:.1}% ({report})",
        report.fraction * 100.0,
        min_fraction * 100.0
    );
    report
}

/// The README's "frames": for each stream, the received packets are one contiguous run of the
/// source's that starts at its first packet (the players start before the publisher, so a
/// late start is a loss) and ends at most `max_tail_ms` before its last packet (the same
/// player's shortfall straight from nginx-rtmp, see [`PlayerKind::max_tail_ms`]).
pub fn assert_whole_run(what: &str, src: &[Frame], got: &[Frame], max_tail_ms: i64) -> RunReport {
    let report = assert_contiguous_run(what, src, got, 0.0);
    for (media, (_, _, start)) in &report.streams {
        assert_eq!(
            *start, 0,
            "{what}: the {media} run starts at source packet #{start}, not the first ({report})"
        );
        let tail = report.tail_ms.get(media).copied().unwrap_or(0);
        assert!(
            tail <= max_tail_ms,
            "{what}: the {media} run ends {tail} ms before the source's end, more than the \
             {max_tail_ms} ms allowed for this player ({report})"
        );
    }
    report
}

/// Asserts a player during an attack got a contiguous run of `want` that starts at the first
/// video frame and holds at least 85% of the video frames; `what` names the player in failures.
pub fn assert_attack_run(want: &[Frame], got: &[Frame], what: &str, log: &str) {
    let run = contiguous_run(want, got).unwrap_or_else(|e| panic!("{what}: {e}; {log}"));
    eprintln!("{what}: {run}");
    assert_eq!(run.start("video"), Some(0), "{what} missed the start");
    assert!(
        count_media(got, "video") * 100 >= count_media(want, "video") * 85,
        "{what} got {} of {} video frames",
        count_media(got, "video"),
        count_media(want, "video")
    );
}

/// The comparison behind [`assert_contiguous_run`], without the assertions.
pub fn contiguous_run(src: &[Frame], got: &[Frame]) -> Result<RunReport, String> {
    if got.is_empty() {
        return Err(format!(
            "nothing received (source has {} packets)",
            src.len()
        ));
    }
    let by_media = |frames: &[Frame]| {
        let mut m: BTreeMap<String, Vec<Frame>> = BTreeMap::new();
        for f in frames {
            m.entry(f.media.clone()).or_default().push(f.clone());
        }
        m
    };
    let src_m = by_media(src);
    let mut got_m = by_media(got);
    let last = got.last().cloned();

    let mut streams = BTreeMap::new();
    let mut tail_ms = BTreeMap::new();
    let mut cut_last = false;
    for (media, s) in &src_m {
        let Some(g) = got_m.get_mut(media) else {
            return Err(format!("no {media} packets received"));
        };
        let start = match find_run(s, g) {
            Some(k) => k,
            None => {
                // The last packet of the whole file may be cut short: retry without it.
                let is_last =
                    g.last().map(|f| (&f.hash, f.dts)) == last.as_ref().map(|f| (&f.hash, f.dts));
                let k = if is_last && g.len() > 1 {
                    let mut shorter = g.clone();
                    shorter.pop();
                    find_run(s, &shorter)
                } else {
                    None
                };
                match k {
                    Some(k) => {
                        g.pop();
                        cut_last = true;
                        k
                    }
                    None => return Err(describe_mismatch(media, s, g)),
                }
            }
        };
        let last_matched = (start + g.len()).checked_sub(1).and_then(|i| s.get(i));
        let tail = match (s.last(), last_matched) {
            (Some(end), Some(last)) => end.dts - last.dts,
            _ => 0,
        };
        tail_ms.insert(media.clone(), tail);
        streams.insert(media.clone(), (g.len(), s.len(), start));
    }
    if let Some(extra) = got_m.keys().find(|m| !src_m.contains_key(*m)) {
        return Err(format!(
            "received a {extra} stream the source does not have"
        ));
    }
    let matched: usize = streams.values().map(|v| v.0).sum();
    let total: usize = src_m.values().map(Vec::len).sum();
    Ok(RunReport {
        streams,
        fraction: if total == 0 {
            0.0
        } else {
            matched as f64 / total as f64
        },
        cut_last,
        tail_ms,
    })
}

/// The first source index where `got` matches as a contiguous run.
fn find_run(src: &[Frame], got: &[Frame]) -> Option<usize> {
    let first = got.first()?;
    (0..src.len()).find(|&k| {
        src[k].hash == first.hash
            && src.len() - k >= got.len()
            && src[k..k + got.len()]
                .iter()
                .zip(got)
                .all(|(a, b)| a.hash == b.hash)
    })
}

fn describe_mismatch(media: &str, src: &[Frame], got: &[Frame]) -> String {
    let Some(first) = got.first() else {
        return format!("no {media} packets received");
    };
    let Some(k) = src.iter().position(|f| f.hash == first.hash) else {
        return format!(
            "the first {media} packet received (dts {}, {} bytes) is not in the source",
            first.dts, first.size
        );
    };
    let same = src[k..]
        .iter()
        .zip(got)
        .take_while(|(a, b)| a.hash == b.hash)
        .count();
    match (src.get(k + same), got.get(same)) {
        (Some(want), Some(have)) => format!(
            "{media}: {same} packets match from source #{k}, then received #{same} (dts {}, {} \
             bytes) where the source has #{} (dts {}, {} bytes); received {} {media} packets",
            have.dts,
            have.size,
            k + same,
            want.dts,
            want.size,
            got.len()
        ),
        (None, Some(_)) => format!(
            "{media}: received {} packets, more than the source has after #{k}",
            got.len()
        ),
        _ => format!("{media}: mismatch after {same} packets from source #{k}"),
    }
}

// ---------------------------------------------------------------------------------------------
// curl, for the tunnel by hand
// ---------------------------------------------------------------------------------------------

/// One HTTP reply as curl saw it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The response head as sent (status line and headers).
    pub head: String,
    pub body: Vec<u8>,
}

/// POSTs `body` to `url` with curl (`-k` for https: the dev certificate), bounded to 10 s.
/// Returns None if curl could not get a reply at all (connection refused or reset, timeout).
pub fn curl_post(url: &str, body: &[u8]) -> Option<HttpReply> {
    let dir = temp_dir();
    let req = dir.path().join("request.bin");
    let head = dir.path().join("head.txt");
    let resp = dir.path().join("body.bin");
    fs::write(&req, body).expect("cannot write the request body");
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "-k", "--max-time", "10", "-X", "POST"])
        .args(["-H", "Content-Type: application/x-fcs"])
        .arg("--data-binary")
        .arg(format!("@{}", req.display()))
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&resp)
        .args(["-w", "%{http_code}", url]);
    let (status, out, _) = run_capture(&mut cmd, Duration::from_secs(15));
    let code: u16 = String::from_utf8_lossy(&out).trim().parse().unwrap_or(0);
    if !status.is_some_and(|s| s.success()) || code == 0 {
        return None;
    }
    Some(HttpReply {
        status: code,
        head: fs::read_to_string(&head).unwrap_or_default(),
        body: fs::read(&resp).unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// One publisher, several players
// ---------------------------------------------------------------------------------------------

/// A kind of player.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlayerKind {
    /// Debian's ffmpeg 5.1.
    Ffmpeg,
    /// The static ffmpeg from imageio-ffmpeg (rtmpe, rtmpte).
    StaticFfmpeg,
    /// rtmpdump 2.4.
    Rtmpdump,
}

impl PlayerKind {
    /// How much of the source's end this player may miss, in ms: its shortfall straight
    /// from nginx-rtmp (`baseline_nginx_direct`), plus a stated margin. rtmpdump writes every
    /// packet (the last may be cut short, which leaves one packet, under 50 ms, unmatched).
    /// ffmpeg 5.1 stopped by the harness drops what it still had buffered: 0.47 s of video
    /// and 0.53 s of audio in every run measured (136/150 video, 192/217 audio packets of a
    /// 5 s source); 700 ms allows five more audio packets. The static ffmpeg is held to the
    /// same figure.
    pub fn max_tail_ms(self) -> i64 {
        match self {
            PlayerKind::Ffmpeg | PlayerKind::StaticFfmpeg => 700,
            PlayerKind::Rtmpdump => 50,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PlayerKind::Ffmpeg => "ffmpeg",
            PlayerKind::StaticFfmpeg => "static ffmpeg",
            PlayerKind::Rtmpdump => "rtmpdump",
        }
    }

    /// Starts this player on `url`, writing FLV to `out`. ffmpeg logs at debug level so the
    /// harness can see when it has sent `play`.
    pub fn start(self, url: &str, out: &Path) -> Proc {
        match self {
            PlayerKind::Rtmpdump => play_rtmpdump(url, out),
            PlayerKind::Ffmpeg | PlayerKind::StaticFfmpeg => {
                let bin = if self == PlayerKind::Ffmpeg {
                    &peers().ffmpeg
                } else {
                    &peers().static_ffmpeg
                };
                let mut cmd = Command::new(bin);
                cmd.args(["-nostdin", "-hide_banner", "-loglevel", "debug", "-y"])
                    .args(["-rw_timeout", &(PLAYER_IDLE_SECS * 1_000_000).to_string()])
                    .args(["-i", url, "-c", "copy", "-f", "flv"])
                    .arg(out);
                Proc::spawn(&format!("{} player of {url}", self.name()), cmd)
            }
        }
    }

    /// The log line that says the player has asked to play.
    fn ready_marker(self) -> &'static str {
        match self {
            PlayerKind::Rtmpdump => "Starting Live Stream",
            _ => "Sending play command",
        }
    }
}

/// What one player received.
#[derive(Debug)]
pub struct Received {
    /// "ffmpeg over rtmpt://127.0.0.1:PORT/live/x".
    pub label: String,
    pub kind: PlayerKind,
    pub file: PathBuf,
    pub frames: Vec<Frame>,
    /// True if the player ended by itself (rather than being killed at the deadline).
    pub exited: bool,
}

impl Received {
    /// Asserts the received packets are the README's "frames": one contiguous run of `src`
    /// from its first packet to within the player's baseline shortfall of its end
    /// ([`assert_whole_run`], [`PlayerKind::max_tail_ms`]).
    pub fn assert_run_of(&self, src: &[Frame]) -> RunReport {
        assert_whole_run(&self.label, src, &self.frames, self.kind.max_tail_ms())
    }
}

/// Starts every player on its URL, waits until each has asked to play, publishes `source`
/// with `publisher` (an ffmpeg binary) to `publish_url`, waits for the publisher to finish,
/// then for the players to end by themselves (at most [`PLAYER_TAIL`], then they are killed).
/// Output files go to `dir`. Fails the test if a player never asks to play or the publisher
/// fails.
pub fn publish_and_play(
    dir: &Path,
    publisher: &Path,
    publish_url: &str,
    source: &Path,
    players: &[(PlayerKind, String)],
) -> Vec<Received> {
    publish_and_play_when(dir, publisher, publish_url, source, players, || true)
}

/// [`publish_and_play`], with one more condition before the publisher starts: `server_ready`
/// must hold (polled up to [`START_TIMEOUT`]), e.g. the server has logged every player's play
/// command, so no player can miss the start on a loaded machine.
pub fn publish_and_play_when(
    dir: &Path,
    publisher: &Path,
    publish_url: &str,
    source: &Path,
    players: &[(PlayerKind, String)],
    server_ready: impl FnMut() -> bool,
) -> Vec<Received> {
    let mut running: Vec<(PlayerKind, String, PathBuf, Proc)> = players
        .iter()
        .enumerate()
        .map(|(i, (kind, url))| {
            let out = dir.join(format!("player{i}.flv"));
            let proc = kind.start(url, &out);
            (*kind, url.clone(), out, proc)
        })
        .collect();
    for (kind, url, _, proc) in running.iter_mut() {
        let marker = kind.ready_marker();
        let ready = wait_until(START_TIMEOUT, || {
            proc.log_tail().contains(marker) || !proc.is_running()
        });
        assert!(
            ready && proc.is_running(),
            "{} player of {url} did not get as far as asking to play (no `{marker}` within \
             {START_TIMEOUT:?}); its output:\n{}",
            kind.name(),
            proc.log()
        );
    }
    assert!(
        wait_until(START_TIMEOUT, server_ready),
        "the server was not ready for the publisher within {START_TIMEOUT:?}"
    );
    // The play command may still have to travel through the gateway to the server.
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut publ = publish(publisher, publish_url, source);
    // Real time: the media's length, plus room for a loaded machine.
    let limit = media_seconds(source).map_or(Duration::from_secs(60), |s| {
        Duration::from_secs(60).max(Duration::from_secs_f64(s + 30.0))
    });
    let status = publ.wait_timeout(limit);
    assert!(
        status.is_some_and(|s| s.success()),
        "publisher to {publish_url} ended with {status:?}; its output:\n{}",
        publ.log()
    );
    eprintln!(
        "published {} to {publish_url} in {:.1} s",
        source.display(),
        started.elapsed().as_secs_f64()
    );
    let ended = Instant::now();
    let deadline = ended + PLAYER_TAIL;
    // Stopped side by side, so a run costs the media's duration plus one quiet period.
    let exits: Vec<bool> = thread::scope(|scope| {
        let handles: Vec<_> = running
            .iter_mut()
            .map(|(_, _, out, proc)| scope.spawn(move || finish_player(proc, out, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .collect()
    });
    running
        .into_iter()
        .zip(exits)
        .map(|((kind, url, out, proc), exited)| {
            eprintln!(
                "{} over {url}: {} ({:?})",
                kind.name(),
                if exited {
                    "ended by itself"
                } else {
                    "stopped by the harness"
                },
                proc.status
            );
            Received {
                label: format!("{} over {url}", kind.name()),
                kind,
                frames: framemd5(&out),
                file: out,
                exited,
            }
        })
        .collect()
}

/// Lets a player end by itself; once its output file has not grown for [`PLAYER_QUIET`] (the
/// stream is over; neither ffmpeg nor rtmpdump ends at nginx-rtmp's unpublish notice, they
/// wait for their idle timeout) it gets SIGINT, on which both finish their file; SIGKILL at
/// `deadline`. True if it ended by itself.
fn finish_player(proc: &mut Proc, out: &Path, deadline: Instant) -> bool {
    let size = || fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let mut last = (size(), Instant::now());
    while Instant::now() < deadline {
        if !proc.is_running() {
            return true;
        }
        let now = size();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= PLAYER_QUIET {
            // ffmpeg takes the first SIGINT as "finish up" but only interrupts a blocking
            // read on the second; rtmpdump finishes on the first and ignores the second.
            proc.signal("INT");
            if proc.wait_timeout(Duration::from_millis(300)).is_none() {
                proc.signal("INT");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            proc.wait_or_kill(left.min(Duration::from_secs(5)));
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    proc.kill();
    false
}
