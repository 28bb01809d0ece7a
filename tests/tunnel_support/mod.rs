//! Shared pieces for the RTMPT tests against real peers: nginx-rtmp as the backend, the
//! tunnel on a loopback listener with a byte pump to nginx, media files and frame checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rtmpgate::door::rtmpt::Tunnel;
use rtmpgate::limits::Limits;
use rtmpgate::stream::{ClientStream, StreamHandler};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Tests that run real encoders and servers take turns: the machine is small.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// True if every named program is on PATH; otherwise prints why the test is skipped.
pub fn have(programs: &[&str]) -> bool {
    for p in programs {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("SKIPPED: {p} is not installed");
            return false;
        }
    }
    if !Path::new("/usr/lib/nginx/modules/ngx_rtmp_module.so").exists() {
        eprintln!("SKIPPED: libnginx-mod-rtmp is not installed");
        return false;
    }
    true
}

/// A free loopback port (bound, then released for the peer to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Wait until something accepts TCP connections on `port`.
pub async fn wait_port(port: u16) {
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port} after 5 s");
}

/// nginx with the RTMP module, app `live`, on a loopback port.
pub struct Nginx {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start() -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\n\
             master_process off; worker_processes 1; daemon off; error_log {d}/error.log warn; pid {d}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
               application live {{ live on; record off; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_port(port).await;
        Nginx {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A handler that connects each session to `backend` and copies bytes both ways.
pub fn pump_to(backend: SocketAddr) -> StreamHandler {
    Arc::new(move |mut client: ClientStream| {
        Box::pin(async move {
            let Ok(mut up) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut up,
                64 * 1024,
                64 * 1024,
            )
            .await;
        })
    })
}

/// The tunnel on a loopback listener, pumping every session to a backend.
pub struct Gateway {
    pub port: u16,
    pub tunnel: Arc<Tunnel>,
    accept: tokio::task::JoinHandle<()>,
}

impl Gateway {
    pub async fn start(backend_port: u16, limits: Limits) -> Gateway {
        let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let tunnel = Tunnel::new(Arc::new(limits), pump_to(backend));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Arc::clone(&tunnel);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let Ok(local) = tcp.local_addr() else {
                    continue;
                };
                let t = Arc::clone(&t);
                tokio::spawn(async move { t.serve_connection(tcp, peer, local, false).await });
            }
        });
        Gateway {
            port,
            tunnel,
            accept,
        }
    }

    /// The tunnel behind TLS (the dev certificate), reached the way the door does it:
    /// TLS handshake, sniff the first bytes, replay them in front of the TLS stream.
    pub async fn start_tls(backend_port: u16, limits: Limits) -> Gateway {
        use rtmpgate::door::{sniff, tls};
        let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let tunnel = Tunnel::new(Arc::new(limits), pump_to(backend));
        let key = tls::load_certified_key(&tls::CertSource::EmbeddedDev).unwrap();
        let config = tls::server_config(tls::SniResolver::new(key)).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Arc::clone(&tunnel);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let Ok(local) = tcp.local_addr() else {
                    continue;
                };
                let t = Arc::clone(&t);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok((sniff::Kind::Http, head)) = sniff::sniff(&mut tls).await else {
                        return;
                    };
                    let io = rtmpgate::stream::Prefixed::new(head, tls);
                    t.serve_connection(io, peer, local, true).await
                });
            }
        });
        Gateway {
            port,
            tunnel,
            accept,
        }
    }

    pub fn url_tls(&self, stream: &str) -> String {
        format!("rtmpts://127.0.0.1:{}/live/{stream}", self.port)
    }

    pub fn url(&self, stream: &str) -> String {
        format!("rtmpt://127.0.0.1:{}/live/{stream}", self.port)
    }

    /// Wait (bounded) until no tunnel session is left.
    pub async fn wait_no_sessions(&self, within: Duration) -> usize {
        let end = tokio::time::Instant::now() + within;
        while self.tunnel.sessions() > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.tunnel.sessions()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.accept.abort();
        self.tunnel.shutdown();
    }
}

/// Run a command to completion within `limit`, killing it if it overstays.
/// Returns (exit success, stderr).
pub async fn run(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("timed out after {limit:?}")),
    }
}

/// Wait for a spawned child within `limit`, killing it if it overstays.
pub async fn finish(mut child: Child, limit: Duration) -> bool {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = child.kill().await;
            false
        }
    }
}

/// Stop a player the way a person would (SIGINT: ffmpeg writes out what it has), then
/// kill it if it is still there after `grace`.
pub async fn interrupt(child: Child, grace: Duration) -> bool {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await;
    }
    finish(child, grace).await
}

/// The PEERS.md source: H.264 + AAC test pattern in FLV, `secs` long.
pub async fn make_source(dir: &Path, secs: u32) -> PathBuf {
    let out = dir.join("src.flv");
    let (ok, err) = run(
        Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=640x360:rate=30",
                "-f",
                "lavfi",
                "-i",
                "sine",
                "-t",
                &secs.to_string(),
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-g",
                "30",
                "-c:a",
                "aac",
                "-f",
                "flv",
            ])
            .arg(&out),
        Duration::from_secs(120),
    )
    .await;
    assert!(ok, "could not make the test source: {err}");
    out
}

/// One packet as `ffmpeg -f framemd5` sees it: stream index, size, payload hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub stream: String,
    pub size: String,
    pub md5: String,
}

pub async fn frames(file: &Path) -> Vec<Frame> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-c", "copy", "-f", "framemd5", "-"])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("framemd5 timed out")
        .expect("ffmpeg framemd5 failed to run");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(Frame {
                stream: f.first()?.to_string(),
                size: f.get(4)?.to_string(),
                md5: f.get(5)?.to_string(),
            })
        })
        .collect()
}

/// Check that each stream of `got` is one contiguous run of the same stream of `src`
/// (the last packet may be cut short). Returns (received, source) video packet counts.
pub fn check_contiguous(src: &[Frame], got: &[Frame], what: &str) -> (usize, usize) {
    assert!(!got.is_empty(), "{what}: no frames received");
    let mut streams: Vec<&str> = got.iter().map(|f| f.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    let mut video = (0, 0);
    for s in streams {
        let recv: Vec<&Frame> = got.iter().filter(|f| f.stream == s).collect();
        // Find the source stream holding the first received packet (indexes may differ).
        let first = recv[0];
        let src_pos = src
            .iter()
            .position(|f| f.md5 == first.md5)
            .unwrap_or_else(|| panic!("{what}: first packet of stream {s} is not in the source"));
        let src_stream = &src[src_pos].stream;
        let srcs: Vec<&Frame> = src.iter().filter(|f| &f.stream == src_stream).collect();
        let start = srcs.iter().position(|f| f.md5 == first.md5).unwrap();
        for (i, r) in recv.iter().enumerate() {
            let last = i + 1 == recv.len();
            match srcs.get(start + i) {
                Some(sf) if sf.md5 == r.md5 => {}
                Some(_) if last => {} // cut short
                other => panic!(
                    "{what}: stream {s} packet {i} differs from source packet {}: {other:?} vs {r:?}",
                    start + i
                ),
            }
        }
        if src_stream == "0" {
            video = (recv.len(), srcs.len());
        }
    }
    video
}

/// Log lines from the library in test output (`RUST_LOG` overrides the default).
pub fn init_log() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("rtmpgate=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
