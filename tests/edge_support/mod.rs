//! The compose recipe of examples/cluster run natively for the edge tests: its two
//! nginx-rtmp origins, three rtmpgate nodes and HAProxy, with 10.0.0.x made 127.0.0.x and
//! HAProxy's frontends on ports chosen at run time (tests/edge.rs, tests/edge_failover.rs).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// The README's rendezvous rule with every weight 1: the origin whose 64-bit hash of
/// ("app/stream", 0, origin URL) is largest (FNV-1a 64, then the splitmix64 finalizer), as
/// the highest `weight / -ln(u)` falls on the largest `u`.
pub fn hashed_origin<'a>(origins: &'a [String], app: &str, name: &str) -> &'a str {
    let key = format!("{app}/{name}");
    let hash = |id: &str| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in key.as_bytes().iter().chain(&[0u8]).chain(id.as_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    };
    origins.iter().max_by_key(|o| hash(o)).unwrap()
}

/// Waits (bounded) for every player to stop by itself, else kills it and fails.
pub fn wait_players(players: &mut [Proc], within: Duration) {
    let deadline = Instant::now() + within;
    for p in players.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            p.wait_timeout(left).is_some(),
            "{} did not stop within {within:?}: {}",
            p.name(),
            p.log()
        );
    }
}

/// A file of examples/cluster.
pub fn recipe(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/cluster")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An origin from the recipe's nginx-origin.conf, listening on `ip`:1935.
pub fn start_origin(conf: &str, ip: &str) -> (Proc, tempfile::TempDir) {
    let dir = temp_dir();
    let d = dir.path().display();
    let module = peers().nginx_rtmp_module.display().to_string();
    let body: String = conf
        .lines()
        .filter(|l| !l.starts_with("load_module") && !l.starts_with("error_log"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(body.contains("listen 1935;"));
    let text = format!(
        "load_module {module};\ndaemon off; master_process off;\nerror_log {d}/error.log warn; pid {d}/nginx.pid;\n{}",
        body.replace("listen 1935;", &format!("listen {ip}:1935;"))
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(&peers().nginx);
    cmd.arg("-c").arg(&path).arg("-p").arg(dir.path());
    let mut proc = Proc::spawn(&format!("nginx origin {ip}"), cmd);
    let addr: std::net::SocketAddr = format!("{ip}:1935").parse().unwrap();
    assert!(
        wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running()) && proc.is_running(),
        "origin {ip} did not start: {}{}",
        proc.log(),
        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
    );
    (proc, dir)
}

/// The recipe's processes, running; each is killed when this is dropped.
pub struct Compose {
    pub origins: Vec<(Proc, tempfile::TempDir)>,
    /// n1, n2, n3 on 127.0.0.11-13.
    pub nodes: Vec<Gateway>,
    pub haproxy: Proc,
    _haproxy_dir: tempfile::TempDir,
    pub p_rtmp: u16,
    pub p_rtmps: u16,
    pub p_http: u16,
    /// The configuration files as run (HAProxy's, each node's), for tests that check they
    /// are the recipe's with only addresses, ports and paths changed.
    pub haproxy_conf: String,
    pub node_confs: Vec<String>,
    /// Held while the recipe runs: its addresses and ports (127.0.0.11-13:1935...) are fixed,
    /// so two tests of one binary take turns. Last, so the processes are gone when it frees.
    _serial: std::sync::MutexGuard<'static, ()>,
    _machine: MachineLock,
}

/// The same turn-taking across processes: test binaries of this recipe run by other
/// worktrees or shells on the machine at the same moment (a node failing with "address
/// already in use" on 127.0.0.11:9935 was seen when two ran at once). An flock on a file in
/// the temporary directory, released when the file closes, also when a test dies.
pub struct MachineLock(std::fs::File);

impl MachineLock {
    /// Waits for the lock, at most 10 minutes (far longer than any test holding it).
    fn take() -> MachineLock {
        use std::os::unix::io::AsRawFd;
        let path = std::env::temp_dir().join("rtmpgate-compose-recipe.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return MachineLock(file);
            }
            assert!(
                Instant::now() < deadline,
                "another run held the compose recipe's addresses ({}) for 10 minutes",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Compose {
    /// Starts the recipe's origins, nodes and HAProxy from its config files (`haproxy_cfg`,
    /// `node_toml`), each waited for (bounded) until it listens.
    pub fn start(haproxy_cfg: &str, node_toml: &str) -> Compose {
        // A test that failed while holding it poisons it; the next one may still run.
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let machine = MachineLock::take();
        // The same configs, natively: 10.0.0.x becomes 127.0.0.x.
        let origin_conf = recipe("nginx-origin.conf");
        let _origins = [
            start_origin(&origin_conf, "127.0.0.21"),
            start_origin(&origin_conf, "127.0.0.22"),
        ];
        let certs = dev_certs();
        let mut node_confs = Vec::new();
        let nodes: Vec<Gateway> = (1..=3)
            .map(|i| {
                let conf = node_toml
                    .replace("0.0.0.0", &format!("127.0.0.1{i}"))
                    .replace("10.0.0.", "127.0.0.")
                    .replace(
                        "/etc/rtmpgate/certs/fullchain.pem",
                        &certs.chain.display().to_string(),
                    )
                    .replace(
                        "/etc/rtmpgate/certs/privkey.pem",
                        &certs.key.display().to_string(),
                    );
                node_confs.push(conf.clone());
                let gw = Gateway::builder()
                    .config(&conf)
                    .env(
                        "RTMPGATE_ADMIN_TOKEN",
                        "compose-test-admin-token-0123456789abcdef",
                    )
                    .env(
                        "RTMPGATE_CLUSTER_SECRET",
                        "compose-test-cluster-secret-0123456789abcdef",
                    )
                    .env("RUST_LOG", "info,rtmpgate::engine::edge=debug")
                    .args(&["--node-id", &format!("n{i}")])
                    .start();
                for port in [1935, 8443, 8080, 9935] {
                    let a: std::net::SocketAddr = format!("127.0.0.1{i}:{port}").parse().unwrap();
                    assert!(
                        wait_until(START_TIMEOUT, || accepts(a)),
                        "n{i} does not listen on {a}"
                    );
                }
                gw
            })
            .collect();
        // HAProxy with the recipe: its frontends on the test's ports, and 127.0.0.10 as its
        // source address (in the compose network its container has 10.0.0.10 anyway).
        let (p_rtmp, p_rtmps, p_http) = (free_port(), free_port(), free_port());
        let mut conf = String::new();
        for l in haproxy_cfg
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            let l = match l.trim() {
                "bind :1935" => format!("  bind 127.0.0.10:{p_rtmp}"),
                "bind :443" => format!("  bind 127.0.0.10:{p_rtmps}"),
                "bind :80" => format!("  bind 127.0.0.10:{p_http}"),
                "maxconn 100000" => "  maxconn 1000".to_string(),
                "defaults" => "defaults\n  source 127.0.0.10".to_string(),
                _ => l.replace("10.0.0.", "127.0.0."),
            };
            conf.push_str(&l);
            conf.push('\n');
        }
        assert!(
            !conf.contains(" :"),
            "a frontend port the test does not map: {conf}"
        );
        let hdir = temp_dir();
        let hpath = hdir.path().join("haproxy.cfg");
        std::fs::write(&hpath, &conf).unwrap();
        let mut cmd = Command::new(&peers().haproxy);
        cmd.arg("-db").arg("-f").arg(&hpath);
        let mut haproxy = Proc::spawn("haproxy", cmd);
        let front: std::net::SocketAddr = format!("127.0.0.10:{p_http}").parse().unwrap();
        assert!(
            wait_until(START_TIMEOUT, || accepts(front) || !haproxy.is_running())
                && haproxy.is_running(),
            "haproxy did not start: {}",
            haproxy.log()
        );
        Compose {
            origins: _origins.into(),
            nodes,
            haproxy,
            _haproxy_dir: hdir,
            p_rtmp,
            p_rtmps,
            p_http,
            haproxy_conf: conf,
            node_confs,
            _serial: serial,
            _machine: machine,
        }
    }

    /// HAProxy's URL of `stream` for `scheme` (rtmp, rtmps, rtmpt, rtmpts).
    pub fn url(&self, scheme: &str, stream: &str) -> String {
        let port = match scheme {
            "rtmp" => self.p_rtmp,
            "rtmps" | "rtmpts" => self.p_rtmps,
            _ => self.p_http,
        };
        format!("{scheme}://127.0.0.10:{port}/{stream}")
    }
}

/// The video packets of `frames`.
pub fn video(frames: &[Frame]) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| f.media == "video")
        .cloned()
        .collect()
}

/// The video packets from the last time the source's first video frame came (a second
/// publish of the same file), asserting it came twice.
pub fn after_restart(want_video: &[Frame], got: &[Frame]) -> Vec<Frame> {
    let v = video(got);
    let first = &want_video[0].hash;
    let at = v.iter().rposition(|f| &f.hash == first).unwrap_or(0);
    assert!(
        at > 0,
        "the source's first frame came only once: no second publish was played"
    );
    v[at..].to_vec()
}

/// A recipe file's configuration lines (comments and blank lines dropped) with every IPv4
/// address, port and quoted absolute path made a placeholder: what may differ between the
/// recipe and the files a test runs.
pub fn shape_of(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            // HAProxy's "bind :1935" (every address) becomes the test's "bind 127.0.0.10:P".
            let l = l.replace(" :", " ADDR:");
            let c: Vec<char> = l.chars().collect();
            let mut out = String::new();
            let mut i = 0;
            while i < c.len() {
                if c[i].is_ascii_digit() && (i == 0 || !c[i - 1].is_ascii_alphanumeric()) {
                    let mut j = i;
                    while j < c.len() && (c[j].is_ascii_digit() || c[j] == '.') {
                        j += 1;
                    }
                    let tok: String = c[i..j].iter().collect();
                    let parts: Vec<&str> = tok.split('.').collect();
                    if parts.len() == 4 && parts.iter().all(|p| p.parse::<u8>().is_ok()) {
                        out.push_str("ADDR");
                    } else if i > 0 && c[i - 1] == ':' {
                        out.push_str("PORT");
                    } else {
                        out.push_str(&tok);
                    }
                    i = j;
                } else if c[i] == '"' && c.get(i + 1) == Some(&'/') {
                    let end = c[i + 1..]
                        .iter()
                        .position(|&x| x == '"')
                        .map_or(c.len(), |p| i + 1 + p);
                    out.push_str("\"PATH");
                    i = end;
                } else {
                    out.push(c[i]);
                    i += 1;
                }
            }
            out
        })
        .collect()
}

/// Asserts the files `c` runs are the recipe's, changed only in addresses, ports and paths,
/// plus what the native run needs and says: HAProxy's `maxconn` (100000 needs more file
/// descriptors than a test process may open) and its `source` line (its container's address
/// in the compose network); nginx's module path, foreground mode, log and pid files (the
/// container image's defaults) and its listen address.
pub fn assert_recipe_as_run(c: &Compose) {
    let haproxy: Vec<String> = shape_of(&recipe("haproxy.cfg"))
        .into_iter()
        .map(|l| {
            if l == "maxconn 100000" {
                "maxconn 1000".to_string()
            } else {
                l
            }
        })
        .collect();
    let ran: Vec<String> = shape_of(&c.haproxy_conf)
        .into_iter()
        .filter(|l| l != "source ADDR")
        .collect();
    assert_eq!(
        haproxy, ran,
        "haproxy.cfg was changed beyond addresses and ports"
    );
    let node = shape_of(&recipe("rtmpgate-node.toml"));
    for (i, conf) in c.node_confs.iter().enumerate() {
        assert_eq!(
            node,
            shape_of(conf),
            "n{}: rtmpgate-node.toml was changed beyond addresses, ports and paths",
            i + 1
        );
    }
    let process_lines = ["load_module ", "error_log ", "daemon "];
    let origin: Vec<String> = shape_of(&recipe("nginx-origin.conf"))
        .into_iter()
        .filter(|l| !process_lines.iter().any(|p| l.starts_with(p)))
        .map(|l| {
            if l == "listen 1935;" {
                "listen ADDR:PORT;".to_string()
            } else {
                l
            }
        })
        .collect();
    for (_, dir) in &c.origins {
        let conf = std::fs::read_to_string(dir.path().join("nginx.conf")).unwrap();
        let ran: Vec<String> = shape_of(&conf)
            .into_iter()
            .filter(|l| !process_lines.iter().any(|p| l.starts_with(p)))
            .collect();
        assert_eq!(
            origin, ran,
            "nginx-origin.conf was changed beyond its listen address"
        );
    }
}

/// For a failure report: every established connection to `ip:port` (its client side's
/// address) and the process holding that client side (pid and command), found by the
/// socket's inode in every /proc/PID/fd.
pub fn who_is_connected_to(ip: [u8; 4], port: u16) -> Vec<String> {
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip));
    let rows: Vec<(String, String)> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str()) && f.get(3) == Some(&"01"))
                .then(|| Some((f.get(1)?.to_string(), format!("socket:[{}]", f.get(9)?))))
                .flatten()
        })
        .collect();
    let mut owners = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        for fd in std::fs::read_dir(e.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                let t = t.to_string_lossy().to_string();
                if rows.iter().any(|(_, inode)| *inode == t) {
                    let cmd = std::fs::read_to_string(e.path().join("cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ");
                    owners.insert(
                        t,
                        format!("pid {pid} {}", cmd.chars().take(120).collect::<String>()),
                    );
                }
            }
        }
    }
    rows.into_iter()
        .map(|(local, inode)| {
            format!(
                "{local} {}",
                owners
                    .get(&inode)
                    .map_or("(owner not found)", String::as_str)
            )
        })
        .collect()
}

/// One look at the established connections whose server side is `ip:port`: how many there
/// are, and which process holds each client side, from one `ss -tnp` (iproute2) call, so a
/// sample is one instant. Not from /proc/net/tcp: with the thousands of TIME_WAIT sockets a
/// test suite leaves behind, reading it took 0.6 s on the loaded development machine, which
/// left a 6 s window only a handful of samples; ss filters by state and address in the
/// kernel.
pub struct Snapshot {
    pub at_server: usize,
    /// pid -> client sides held.
    clients: std::collections::HashMap<u32, usize>,
}

impl Snapshot {
    pub fn take(ip: [u8; 4], port: u16) -> Snapshot {
        let addr = format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]);
        let mut cmd = Command::new("ss");
        cmd.args(["-Htnp", "state", "established"])
            .arg(format!("( src {addr} or dst {addr} )"));
        let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "ss (iproute2; scripts/install-peers.sh) failed: {}",
            String::from_utf8_lossy(&err)
        );
        let mut at_server = 0;
        let mut clients = std::collections::HashMap::new();
        for l in String::from_utf8_lossy(&out).lines() {
            // Recv-Q Send-Q Local Peer [users:(("name",pid=N,fd=M),...)]
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(2) == Some(&addr.as_str()) {
                at_server += 1;
            } else if f.get(3) == Some(&addr.as_str()) {
                let users = f.get(4).copied().unwrap_or("");
                for pid in users.split("pid=").skip(1) {
                    let digits: String = pid.chars().take_while(char::is_ascii_digit).collect();
                    if let Ok(pid) = digits.parse::<u32>() {
                        *clients.entry(pid).or_insert(0) += 1;
                    }
                }
            }
        }
        Snapshot { at_server, clients }
    }

    /// How many of the connections' client sides process `pid` holds.
    pub fn held_by(&self, pid: u32) -> usize {
        self.clients.get(&pid).copied().unwrap_or(0)
    }
}
