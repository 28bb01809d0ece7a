//! The RTMPT tunnel against real clients and a real backend: ffmpeg publishes and plays,
//! rtmpdump plays, curl walks a session, all through `Tunnel` in front of nginx-rtmp.
//! Frames are compared with `ffmpeg -f framemd5`. A missing peer fails the test (tests/common).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tunnel_support;

use std::time::{Duration, Instant};

use common::{framemd5, free_port, source_flv, Nginx};
use rtmpgate::limits::Limits;
use tokio::process::Command;
use tunnel_support::*;

/// How far before the source's end this file's ffmpeg players (`-v error`, stopped 3 s after
/// the publisher ends) may stop: they end 1.50 s (6 s source, rtmpt) and 1.73 s (4 s source,
/// rtmpts) short in every run measured, while rtmpdump in the same run receives the whole
/// stream, so the stream reached nginx-rtmp whole and the shortfall is ffmpeg's. 2 s allowed.
const FFMPEG_TAIL_MS: i64 = 2000;
/// rtmpdump here misses the source's last 3-4 audio packets (70-93 ms; video complete) in
/// every run measured, where through the gateway binary (tests/transports.rs) it receives
/// every packet. Not explained yet (the in-process tunnel's end of a publish, or this
/// harness's stop): an open question, held to the measured figure so it cannot grow.
const RTMPDUMP_TAIL_MS: i64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_publishes_and_ffmpeg_and_rtmpdump_play_over_rtmpt() {
    let _turn = serial().await;
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(6);
    let nginx = Nginx::start();
    // Players do not leave by themselves after the unpublish notice (not even straight to
    // nginx), and killed clients never send /close: a short reap clears them.
    let limits = Limits {
        tunnel_reap_secs: 3,
        ..Limits::default()
    };
    let gw = Gateway::start(nginx.port(), limits).await;
    let url = gw.url("x");

    let ff_out = dir.path().join("ffplay.flv");
    let ffmpeg_player = ffmpeg_player(&url, &ff_out);
    let rd_out = dir.path().join("rtmpdump.flv");
    let rtmpdump = Command::new("rtmpdump")
        .args(["-q", "-v", "-r", &url, "-o"])
        .arg(&rd_out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Let both players get through connect/play before the stream starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        gw.tunnel.sessions(),
        2,
        "both players hold a tunnel session"
    );

    let started = Instant::now();
    let (ok, err) = publish_realtime(&src, &url, Duration::from_secs(60)).await;
    assert!(ok, "ffmpeg publishing over rtmpt failed: {err}");
    println!(
        "publish over rtmpt took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Give the players time to drain what nginx sent, then make them vanish without /close.
    tokio::time::sleep(Duration::from_secs(3)).await;
    interrupt(ffmpeg_player, Duration::from_secs(5)).await;
    // rtmpdump finishes its file on SIGINT; killed, it would cut its last packets.
    interrupt(rtmpdump, Duration::from_secs(5)).await;

    let src_frames = framemd5(&src);
    // From the first packet, to within RTMPDUMP_TAIL_MS and FFMPEG_TAIL_MS of the end.
    let (n, of) = check_contiguous(
        &src_frames,
        &framemd5(&rd_out),
        "rtmpdump",
        RTMPDUMP_TAIL_MS,
    );
    println!("rtmpdump over rtmpt: {n} of {of} video packets, contiguous");
    let (n, of) = check_contiguous(
        &src_frames,
        &framemd5(&ff_out),
        "ffmpeg player",
        FFMPEG_TAIL_MS,
    );
    println!("ffmpeg player over rtmpt: {n} of {of} video packets, contiguous");

    let left = gw.wait_no_sessions(Duration::from_secs(10)).await;
    assert_eq!(left, 0, "sessions of vanished clients were not reaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_walkthrough_completes_a_handshake() {
    let _turn = serial().await;
    init_log();
    let nginx = Nginx::start();
    let gw = Gateway::start(nginx.port(), Limits::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/curl-walkthrough.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", gw.port))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("walk-through timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("S0 (version): 03"), "{text}");
    assert!(text.contains("S2 echoes C1's random bytes"), "{text}");
    assert!(text.contains("-> HTTP 200, body: 00"), "{text}");
    assert!(text.trim_end().ends_with("-> HTTP 404"), "{text}");
    assert_eq!(gw.wait_no_sessions(Duration::from_secs(5)).await, 0);
}

/// One RTMPT session's throughput: ffmpeg publishes a high-bitrate file as fast as it can
/// through the tunnel; the same file straight to nginx gives the baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmpt_session_throughput() {
    let _turn = serial().await;
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.flv");
    // Random noise, lossless: about 250 Mb/s of H.264 that costs little to make.
    let (ok, err) = run(
        Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "nullsrc=size=640x360:rate=30,geq=random(1)*255:128:128",
                "-t",
                "4",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-qp",
                "0",
                "-g",
                "30",
                "-f",
                "flv",
            ])
            .arg(&big),
        Duration::from_secs(120),
    )
    .await;
    assert!(ok, "could not make the high-bitrate file: {err}");
    let bytes = std::fs::metadata(&big).unwrap().len();
    let nginx = Nginx::start();
    let gw = Gateway::start(nginx.port(), Limits::default()).await;

    let rate = |url: String| {
        let big = big.clone();
        async move {
            let started = Instant::now();
            let (ok, err) = run(
                Command::new("ffmpeg")
                    .args(["-v", "error", "-i"])
                    .arg(&big)
                    .args(["-c", "copy", "-f", "flv", &url]),
                Duration::from_secs(120),
            )
            .await;
            assert!(ok, "publishing to {url} failed: {err}");
            let secs = started.elapsed().as_secs_f64();
            (secs, bytes as f64 * 8.0 / secs / 1e6)
        }
    };
    let (t_direct, direct) = rate(format!("rtmp://127.0.0.1:{}/live/direct", nginx.port())).await;
    let (t_tunnel, tunnel) = rate(gw.url("tunnel")).await;
    println!(
        "throughput, one session, {:.1} MB file: rtmpt through the tunnel {tunnel:.0} Mb/s \
         ({t_tunnel:.2} s); plain rtmp straight to nginx {direct:.0} Mb/s ({t_direct:.2} s)",
        bytes as f64 / 1e6
    );
    // A debug build on a shared machine: only catch collapses here; the figure is printed.
    assert!(
        tunnel > 20.0,
        "rtmpt throughput collapsed: {tunnel:.0} Mb/s"
    );
    assert_eq!(gw.wait_no_sessions(Duration::from_secs(10)).await, 0);
}

/// Not a test: a tunnel in front of nginx for trying clients by hand.
/// `RTMPT_MANUAL_SECS=120 cargo test --test tunnel_peers manual -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn manual_gateway() {
    init_log();
    let secs: u64 = std::env::var("RTMPT_MANUAL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let nginx = Nginx::start();
    let gw = Gateway::start(nginx.port(), Limits::default()).await;
    println!(
        "MANUAL nginx rtmp://127.0.0.1:{}/live  tunnel {}",
        nginx.port(),
        gw.url("x")
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// Faults: a backend that refuses, a backend that dies mid-stream. The client gets an error
/// promptly, and no session or task is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_or_dying_ends_the_client_promptly_and_leaves_nothing() {
    let _turn = serial().await;
    init_log();
    let src = source_flv(6);
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();

    // Nothing listens on the backend port.
    {
        let gw = Gateway::start(free_port(), Limits::default()).await;
        let started = Instant::now();
        let (ok, err) = publish_realtime(&src, &gw.url("down"), Duration::from_secs(20)).await;
        let took = started.elapsed();
        println!(
            "backend down: ffmpeg failed={} in {took:?}: {}",
            !ok,
            err.trim()
        );
        assert!(!ok, "publishing to a dead backend must fail");
        // ffmpeg has no give-up of its own here: only the gateway ends it (else it would
        // poll until publish_realtime's 20 s limit). Measured well under 1 s.
        assert!(
            took < Duration::from_secs(2),
            "client not told within 2 s: {took:?}"
        );
        assert_eq!(gw.wait_no_sessions(Duration::from_secs(5)).await, 0);
    }

    // The backend dies two seconds into a publish.
    {
        let nginx = Nginx::start();
        let gw = Gateway::start(nginx.port(), Limits::default()).await;
        let publisher = Command::new("ffmpeg")
            .args(["-v", "error", "-re", "-stream_loop", "-1", "-i"])
            .arg(&src)
            .args(["-c", "copy", "-f", "flv", &gw.url("dies")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(gw.tunnel.sessions(), 1);
        let started = Instant::now();
        drop(nginx);
        // The source loops for ever: only the gateway can end the publisher.
        let exited = tokio::time::timeout(Duration::from_secs(2), async {
            let mut p = publisher;
            p.wait().await
        })
        .await;
        println!(
            "backend died: ffmpeg exited {:?} after {:?}",
            exited.as_ref().map(|r| r.as_ref().map(|s| s.code())),
            started.elapsed()
        );
        assert!(
            exited.is_ok(),
            "publisher still running 2 s after the backend died"
        );
        assert_eq!(gw.wait_no_sessions(Duration::from_secs(5)).await, 0);
    }

    // Every connection and session task is gone (allow the runtime a moment to reap).
    let mut tasks_after = metrics.num_alive_tasks();
    for _ in 0..50 {
        if tasks_after <= tasks_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tasks_after = metrics.num_alive_tasks();
    }
    assert!(
        tasks_after <= tasks_before,
        "tasks left behind: {tasks_before} before, {tasks_after} after"
    );
}

/// RTMPTS: the same tunnel inside TLS. ffmpeg publishes and plays over rtmpts (rtmpdump
/// 2.4 crashes in rtmpts mode, so it is not used here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_publishes_and_plays_over_rtmpts() {
    let _turn = serial().await;
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(4);
    let nginx = Nginx::start();
    let limits = Limits {
        tunnel_reap_secs: 3,
        ..Limits::default()
    };
    let gw = Gateway::start_tls(nginx.port(), limits).await;
    let url = gw.url_tls("s");

    let out = dir.path().join("play.flv");
    let player = ffmpeg_player(&url, &out);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        gw.tunnel.sessions(),
        1,
        "the player holds an rtmpts session"
    );
    let started = Instant::now();
    let (ok, err) = publish_realtime(&src, &url, Duration::from_secs(60)).await;
    assert!(ok, "ffmpeg publishing over rtmpts failed: {err}");
    println!(
        "publish over rtmpts took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    interrupt(player, Duration::from_secs(5)).await;
    let (n, of) = check_contiguous(
        &framemd5(&src),
        &framemd5(&out),
        "rtmpts player",
        FFMPEG_TAIL_MS,
    );
    println!("ffmpeg player over rtmpts: {n} of {of} video packets, contiguous");
    assert_eq!(gw.wait_no_sessions(Duration::from_secs(10)).await, 0);
}

/// The tunnel's own ceiling, one session, without ffmpeg or nginx in the way: a raw
/// HTTP/1.1 client posting 256 KiB /send bodies to a handler that discards them, then
/// idling to drain what a handler writes as fast as it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmpt_tunnel_ceiling_each_way() {
    use rtmpgate::door::rtmpt::Tunnel;
    use rtmpgate::stream::{ClientStream, StreamHandler};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOTAL: usize = 256 * 1024 * 1024;
    let _turn = serial().await;
    let handler: StreamHandler = Arc::new(|mut s: ClientStream| {
        Box::pin(async move {
            // The first byte says which way: 'u' = sink everything, 'd' = send TOTAL bytes.
            let mut way = [0u8; 1];
            if s.read_exact(&mut way).await.is_err() {
                return;
            }
            if way[0] == b'u' {
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            } else {
                let chunk = vec![0x5a; 64 * 1024];
                for _ in 0..TOTAL / chunk.len() {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
            }
        })
    });
    let tunnel = Tunnel::new(Arc::new(Limits::default()), handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Arc::clone(&tunnel);
    let accept = tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.serve_connection(tcp, peer, addr, false).await });
        }
    });

    struct C {
        tcp: tokio::net::TcpStream,
        buf: Vec<u8>,
    }
    impl C {
        async fn open(&mut self) -> String {
            let head = "POST /open/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n\0";
            self.tcp.write_all(head.as_bytes()).await.unwrap();
            let mut b = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"\n") || !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = self.tcp.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            }
            let text = String::from_utf8(got).unwrap();
            text.rsplit("\r\n\r\n").next().unwrap().trim().to_string()
        }

        async fn post(&mut self, path: &str, body: &[u8]) -> (u16, usize) {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            self.tcp.write_all(head.as_bytes()).await.unwrap();
            self.tcp.write_all(body).await.unwrap();
            let end = loop {
                if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                let mut b = [0u8; 65536];
                let n = self.tcp.read(&mut b).await.unwrap();
                assert!(n > 0);
                self.buf.extend_from_slice(&b[..n]);
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            self.buf.drain(..end);
            while self.buf.len() < len {
                let mut b = vec![0u8; 1 << 20];
                let n = self.tcp.read(&mut b).await.unwrap();
                assert!(n > 0);
                self.buf.extend_from_slice(&b[..n]);
            }
            self.buf.drain(..len);
            (status, len)
        }
    }
    let mut c = C {
        tcp: tokio::net::TcpStream::connect(addr).await.unwrap(),
        buf: Vec::new(),
    };
    c.tcp.set_nodelay(true).unwrap();

    // Upload.
    let id = c.open().await;
    let body = vec![0xa5u8; 256 * 1024];
    let started = Instant::now();
    let (status, _) = c.post(&format!("/send/{id}/0"), b"u").await;
    assert_eq!(status, 200);
    let mut seq = 1;
    let mut sent = 0;
    while sent < TOTAL {
        assert_eq!(c.post(&format!("/send/{id}/{seq}"), &body).await.0, 200);
        sent += body.len();
        seq += 1;
    }
    let up = sent as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6;
    c.post(&format!("/close/{id}/{seq}"), &[0]).await;

    // Download.
    let id = c.open().await;
    let started = Instant::now();
    let (_, first) = c.post(&format!("/send/{id}/0"), b"d").await;
    let mut received = first - 1;
    let mut seq = 1;
    loop {
        let (status, len) = c.post(&format!("/idle/{id}/{seq}"), &[0]).await;
        seq += 1;
        if status == 404 {
            break;
        }
        received += len - 1;
    }
    let down = received as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6;
    assert_eq!(received, TOTAL);
    println!(
        "tunnel ceiling, one session, {} MiB each way: client-to-server {up:.0} Mb/s \
         (256 KiB /send bodies), server-to-client {down:.0} Mb/s ({seq} polls)",
        TOTAL >> 20
    );
    accept.abort();
    tunnel.shutdown();
}
