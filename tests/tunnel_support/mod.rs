//! The RTMPT tests' own pieces: the tunnel on a loopback listener (plain or behind TLS) with a
//! byte pump to a backend, and async process helpers. nginx, peers, media and frame
//! comparison come from tests/common, which the test file also includes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rtmpgate::door::rtmpt::Tunnel;
use rtmpgate::limits::Limits;
use rtmpgate::stream::{ClientStream, StreamHandler};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::common::{assert_whole_run, count_media, Frame};

/// Tests that run real encoders and servers take turns: the machine is small.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
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
        use rtmpgate::door::sniff;
        use rtmpgate::net::tls;
        let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let tunnel = Tunnel::new(Arc::new(limits), pump_to(backend));
        let key = tls::load_certified_key(&tls::CertSource::EmbeddedDev).unwrap();
        let config = tls::server_config(tls::SniResolver::new(key)).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config.config);
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

/// ffmpeg playing `url` into `out` (FLV, packets copied); killed if dropped.
pub fn ffmpeg_player(url: &str, out: &Path) -> Child {
    Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i", url, "-c", "copy", "-f", "flv"])
        .arg(out)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// ffmpeg publishing `src` to `url` in real time (`-re`), within `limit`: (success, stderr).
pub async fn publish_realtime(src: &Path, url: &str, limit: Duration) -> (bool, String) {
    run(
        Command::new("ffmpeg")
            .args(["-v", "error", "-re", "-i"])
            .arg(src)
            .args(["-c", "copy", "-f", "flv", url]),
        limit,
    )
    .await
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
pub async fn interrupt(mut child: Child, grace: Duration) -> bool {
    // ffmpeg takes the first SIGINT as "finish up" but only interrupts a blocking read on
    // the second (as tests/common's harness does); killed instead, it would lose what it
    // still had buffered and end further from the source's end than its baseline.
    for _ in 0..2 {
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await;
        }
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(300), child.wait()).await
        {
            return status.success();
        }
    }
    finish(child, grace).await
}

/// Checks that `got` is the README's "frames" of `src`: one contiguous run from the source's
/// first packet, ending at most `max_tail_ms` before its end (tests/common's
/// `assert_whole_run`; the last packet may be cut short). Returns (received, source) video
/// packet counts.
pub fn check_contiguous(
    src: &[Frame],
    got: &[Frame],
    what: &str,
    max_tail_ms: i64,
) -> (usize, usize) {
    assert_whole_run(what, src, got, max_tail_ms);
    (count_media(got, "video"), count_media(src, "video"))
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
