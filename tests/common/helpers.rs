//! Small helpers: free ports, bounded waits, reading logs and files.

use super::*;

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

/// A loopback port that was free a moment ago (bound to port 0, then released), and not
/// handed out before by this process. The kernel may give a released port again at once:
/// two calls in a row returned the same port, so HAProxy bound its RTMP and HTTP frontends
/// to one port (it can, with SO_REUSEPORT) and the kernel spread the connections over both:
/// an RTMP publisher landed on the HTTP frontend and was closed in its handshake
/// (`cluster::example_haproxy_recipe_routes_by_node_prefix`, a flake under load).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("cannot bind 127.0.0.1:0 to find a free port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("bind(127.0.0.1:0) gave only ports handed out before, 1000 times");
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
    established_where(|local| {
        let lport = local
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        lport == Some(port)
    })
}

/// Established TCP connections whose local address is `ip:port` (the server side of
/// connections to a listener there), from /proc/net/tcp.
pub fn established_at(ip: [u8; 4], port: u16) -> usize {
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip));
    established_where(|local| local == want)
}

/// Established connections whose local address (as /proc/net/tcp writes it) `is_local`.
///
/// The kernel writes those tables a page at a time and resumes each page by position in a
/// hash bucket, so while other sockets come and go one read can list a connection twice, or
/// miss one. With a few thousand sockets churning on the machine (another process's load),
/// a read listed 39 connections up to 100 times; counting lines made
/// `attack_tunnel::open_flood_with_upstream_opens_at_most_the_cap_of_backend_connections`
/// see 54 backend connections for 39 sessions. So connections are counted once each by
/// their (local, remote) address pair, over two reads (one that missed a connection is
/// covered by the other).
fn established_where(is_local: impl Fn(&str) -> bool) -> usize {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local_address rem_address st ...; st 01 is ESTABLISHED.
                let (Some(local), Some(remote), Some(st)) = (f.get(1), f.get(2), f.get(3)) else {
                    continue;
                };
                if *st == "01" && is_local(local) {
                    seen.insert((local.to_string(), remote.to_string()));
                }
            }
        }
    }
    seen.len()
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
pub(crate) fn cached(dest: &Path, make: impl FnOnce(&Path)) -> PathBuf {
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

pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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
