//! The front door and the upstream pump with real peers: ffmpeg and rtmpdump publish and play
//! through rtmpgate over rtmp:// and rtmps:// to nginx-rtmp, with an rtmps:// upstream behind
//! stunnel, PROXY protocol both ways, and the faults (upstream down, upstream killed
//! mid-stream, silent and foreign clients, shutdown).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const SECONDS: u32 = 5;

/// A plain RTMP C0+C1: version 3, then 1536 bytes (time, zero, filler).
fn c0c1() -> Vec<u8> {
    let mut v = vec![3u8];
    v.extend(std::iter::repeat(0x5a).take(1536));
    v
}

/// Connects and sends `bytes`; returns the stream with a read timeout set.
fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if !bytes.is_empty() {
        s.write_all(bytes).unwrap();
    }
    s
}

/// Reads until the peer closes; returns (bytes read, how long it took). A reset counts as a
/// close. Bounded by the socket's read timeout (then it panics: the gateway kept it open).
fn read_until_closed(s: &mut TcpStream) -> (usize, Duration) {
    let t = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, t.elapsed()),
            Ok(n) => total += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the gateway kept the connection open for {:?}", t.elapsed())
            }
            Err(_) => return (total, t.elapsed()),
        }
    }
}

#[test]
fn publish_and_play_over_rtmp_and_rtmps() {
    let p = peers();
    let nginx = Nginx::start();
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--listen",
        "rtmps://127.0.0.1:0",
        "--upstream",
        &nginx.upstream(),
    ]);
    let baseline = gw.fds();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);

    // Publish over rtmp; play over rtmps (ffmpeg) and rtmp (rtmpdump).
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/a", gw.url("rtmp")),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, format!("{}/live/a", gw.url("rtmps"))),
            (PlayerKind::Rtmpdump, format!("{}/live/a", gw.url("rtmp"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    // Publish over rtmps; play over rtmp.
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/b", gw.url("rtmps")),
        &src_file,
        &[(PlayerKind::Ffmpeg, format!("{}/live/b", gw.url("rtmp")))],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    assert!(gw.expect_log("session opened: rtmps 127.0.0.1:"));
    assert!(gw.expect_log("session closed: rtmp 127.0.0.1:"));
    assert!(gw.expect_log(" bytes in, "));
    gw.assert_fds_back_to(baseline, Duration::from_secs(10));
}

#[test]
fn rtmps_upstream_through_stunnel_with_private_ca() {
    let p = peers();
    let certs = dev_certs();
    let nginx = Nginx::start();
    let tls_front = Stunnel::start(nginx.addr(), TlsMode::Server);
    let upstream = format!("rtmps://127.0.0.1:{}", tls_front.port());
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--upstream",
        &upstream,
        "--upstream-ca",
        certs.ca.to_str().unwrap(),
    ]);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = format!("{}/live/s", gw.url("rtmp"));
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[(PlayerKind::Ffmpeg, url.clone())],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    // Without the private CA the backend's certificate is not trusted: the client is closed
    // at once and the log says why and what to do.
    let gw = Gateway::start(&["--listen", "rtmp://127.0.0.1:0", "--upstream", &upstream]);
    let mut s = send(gw.addr("rtmp"), &c0c1());
    let (_, took) = read_until_closed(&mut s);
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    assert!(
        gw.wait_log("--upstream-ca", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
}

/// haproxy in TCP mode reading a PROXY header (`accept-proxy`, v1 or v2) in front of `backend`:
/// nginx-rtmp only parses v1 itself, so v2 is checked against haproxy's parser.
fn haproxy_accepting_proxy(backend: SocketAddr) -> (Proc, TempDir, u16) {
    haproxy_tcp(backend, "accept-proxy", "")
}

#[test]
fn proxy_protocol_v1_to_nginx_and_v2_to_haproxy() {
    let p = peers();
    let nginx_pp = Nginx::start_with_listen_options("proxy_protocol");
    let nginx = Nginx::start();
    let (_haproxy, _dir, haproxy_port) = haproxy_accepting_proxy(nginx.addr());
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    for (version, upstream) in [
        ("v1", nginx_pp.upstream()),
        ("v2", format!("rtmp://127.0.0.1:{haproxy_port}")),
    ] {
        let gw = Gateway::start(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--upstream",
            &upstream,
            "--upstream-proxy-protocol",
            version,
        ]);
        let dir = temp_dir();
        let url = format!("{}/live/pp{version}", gw.url("rtmp"));
        let got = publish_and_play(
            dir.path(),
            &p.ffmpeg,
            &url,
            &src_file,
            &[(PlayerKind::Rtmpdump, url.clone())],
        );
        for r in &got {
            r.assert_run_of(&src);
        }
    }
}

#[test]
fn proxy_protocol_from_a_load_balancer_names_the_real_client() {
    let nginx = Nginx::start();
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--upstream",
        &nginx.upstream(),
        "--accept-proxy-protocol",
    ]);
    let mut bytes = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 1935\r\n".to_vec();
    bytes.extend(c0c1());
    let mut s = send(gw.addr("rtmp"), &bytes);
    // nginx answers S0+S1+S2 to the replayed C0+C1.
    let mut s0s1 = [0u8; 1537];
    s.read_exact(&mut s0s1).unwrap();
    assert_eq!(s0s1[0], 3);
    assert!(gw.wait_log(
        "session opened: rtmp 203.0.113.9:5555",
        Duration::from_secs(5)
    ));
    drop(s);

    // Without a header the connection is refused.
    let mut s = send(gw.addr("rtmp"), &c0c1());
    let (n, _) = read_until_closed(&mut s);
    assert_eq!(n, 0);
    assert!(gw.wait_log("no PROXY protocol header", Duration::from_secs(5)));
}

#[test]
fn upstream_down_closes_the_client_promptly() {
    let down = format!("rtmp://127.0.0.1:{}", free_port());
    let gw = Gateway::start(&["--listen", "rtmp://127.0.0.1:0", "--upstream", &down]);
    let baseline = gw.fds();
    for _ in 0..3 {
        let mut s = send(gw.addr("rtmp"), &c0c1());
        let (n, took) = read_until_closed(&mut s);
        assert_eq!(n, 0);
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
    }
    assert!(gw.wait_log("cannot connect to upstream", Duration::from_secs(5)));
    assert!(gw.log_contains(&down["rtmp://".len()..]));
    // The close line follows the socket's close by a moment.
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .count_log("session closed: rtmp")
            == 3),
        "{}",
        gw.log()
    );
    gw.assert_fds_back_to(baseline, Duration::from_secs(5));
}

#[test]
fn upstream_killed_mid_stream() {
    let p = peers();
    let mut nginx = Nginx::start();
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--upstream",
        &nginx.upstream(),
    ]);
    let baseline = gw.fds();
    // Far longer than the checks below: the publisher cannot end by itself in time.
    let src_file = source_flv(20);
    let mut publisher = publish(&p.ffmpeg, &format!("{}/live/k", gw.url("rtmp")), &src_file);
    assert!(gw.wait_log("session opened: rtmp", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    nginx.kill();
    // The gateway closes the client's side; ffmpeg notices on its next write and fails.
    assert!(
        gw.wait_log("session closed: rtmp", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let closed_after = killed.elapsed();
    // The publisher (sending in real time, 18 s of source left) fails on its next write.
    let status = publisher.wait_timeout(Duration::from_secs(2).saturating_sub(killed.elapsed()));
    eprintln!(
        "session closed {closed_after:?} after the backend died; publisher: {status:?} after \
         {:?}",
        killed.elapsed()
    );
    assert!(
        closed_after < Duration::from_secs(2),
        "the session was closed {closed_after:?} after the backend died (bound 2 s)"
    );
    assert!(
        status.is_some(),
        "the publisher is still running 2 s after the backend died"
    );
    gw.assert_fds_back_to(baseline, Duration::from_secs(5));

    // The gateway itself carries on: a new client is answered (and closed, backend is gone).
    let mut s = send(gw.addr("rtmp"), &c0c1());
    let (_, took) = read_until_closed(&mut s);
    assert!(took < Duration::from_secs(2));
}

#[test]
fn sniffing_refuses_foreign_and_silent_clients() {
    let down = format!("rtmp://127.0.0.1:{}", free_port());
    let gw = Gateway::builder()
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--listen",
            "rtmps://127.0.0.1:0",
            "--upstream",
            &down,
        ])
        .config("[limits]\nfirst_bytes_timeout_secs = 1\n")
        .start();
    let baseline = gw.fds();

    let mut s = send(gw.addr("rtmp"), b"SSH-2.0-OpenSSH_9.2\r\n");
    assert_eq!(read_until_closed(&mut s).0, 0);
    assert!(gw.wait_log(
        "neither RTMP nor HTTP (first bytes 53 53 48 2d",
        Duration::from_secs(5)
    ));

    // A TLS ClientHello on the plain listener.
    let mut s = send(
        gw.addr("rtmp"),
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0],
    );
    assert_eq!(read_until_closed(&mut s).0, 0);
    assert!(gw.wait_log("TLS handshake on a plain listener", Duration::from_secs(5)));

    // Plain RTMP on the TLS listener.
    let mut s = send(gw.addr("rtmps"), &c0c1());
    assert_eq!(read_until_closed(&mut s).0, 0);
    assert!(gw.wait_log("plain RTMP on a TLS listener", Duration::from_secs(5)));

    // A client that sends nothing is dropped after first_bytes_timeout_secs.
    for scheme in ["rtmp", "rtmps"] {
        let mut s = send(gw.addr(scheme), &[]);
        let (n, took) = read_until_closed(&mut s);
        assert_eq!(n, 0);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{scheme}: dropped after {took:?}"
        );
    }
    assert!(gw.wait_log(
        "sent nothing recognisable within 1 s",
        Duration::from_secs(5)
    ));
    gw.assert_fds_back_to(baseline, Duration::from_secs(5));
}

#[test]
fn check_config_bind_errors_and_shutdown() {
    let certs = dev_certs();
    // A valid configuration.
    let (status, log) = Gateway::builder()
        .args(&[
            "--check-config",
            "--listen",
            "rtmps://127.0.0.1:0",
            "--upstream",
            "rtmp://127.0.0.1:1935",
            "--tls-cert",
            certs.chain.to_str().unwrap(),
            "--tls-key",
            certs.key.to_str().unwrap(),
        ])
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("configuration is valid"), "{log}");

    // The key of another certificate: named, and exit code 2.
    let (status, log) = Gateway::builder()
        .args(&[
            "--check-config",
            "--listen",
            "rtmps://127.0.0.1:0",
            "--upstream",
            "rtmp://127.0.0.1:1935",
            "--tls-cert",
            certs.chain.to_str().unwrap(),
            "--tls-key",
            certs.dir.join("ca.key").to_str().unwrap(),
        ])
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(log.contains("does not match the certificate"), "{log}");

    // A typo in the file names the key.
    let (status, log) = Gateway::builder()
        .config("upstrem = 1\n")
        .args(&["--check-config"])
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert!(log.contains("upstrem"), "{log}");

    // A port in use gives a hint.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (status, log) = Gateway::builder()
        .args(&[
            "--listen",
            &format!("rtmp://127.0.0.1:{port}"),
            "--upstream",
            "rtmp://127.0.0.1:1935",
        ])
        .run_to_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{log}");
    assert!(log.contains("already listens on port"), "{log}");
    drop(taken);

    // SIGTERM with an open session: the session may finish for --drain-secs, then exit 0.
    let nginx = Nginx::start();
    let mut gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--upstream",
        &nginx.upstream(),
        "--drain-secs",
        "1",
    ]);
    let mut s = send(gw.addr("rtmp"), &c0c1());
    let mut s0s1 = [0u8; 1537];
    s.read_exact(&mut s0s1).unwrap();
    let t = Instant::now();
    let status = gw.terminate(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", gw.log());
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(gw.expect_log("still open after the drain"), "{}", gw.log());
}

/// The issuer line of the certificate a TLS listener serves, as openssl s_client prints it.
fn served_issuer(addr: SocketAddr) -> String {
    let mut cmd = std::process::Command::new(&peers().openssl);
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
    ]);
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    String::from_utf8_lossy(&out)
        .lines()
        .find(|l| l.starts_with("issuer="))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sighup_reloads_the_certificates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = temp_dir();
    let cert = dir.path().join("fullchain.pem");
    let key = dir.path().join("privkey.pem");
    std::fs::copy(root.join("certs/localhost.pem"), &cert).unwrap();
    std::fs::copy(root.join("certs/localhost.key"), &key).unwrap();
    let gw = Gateway::start(&[
        "--listen",
        "rtmps://127.0.0.1:0",
        "--upstream",
        &format!("rtmp://127.0.0.1:{}", free_port()),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let before = served_issuer(gw.addr("rtmps"));
    assert!(before.contains("rtmpgate dev CA"), "{before}");

    // A broken renewal: the old certificates stay.
    std::fs::write(&key, "not a key").unwrap();
    gw.signal("HUP");
    assert!(gw.wait_log("keeping the current configuration", Duration::from_secs(5)));
    assert_eq!(served_issuer(gw.addr("rtmps")), before);

    // A good one: new handshakes get the new chain.
    let certs = dev_certs();
    std::fs::copy(&certs.chain, &cert).unwrap();
    std::fs::copy(&certs.key, &key).unwrap();
    gw.signal("HUP");
    assert!(gw.wait_log("reloaded TLS certificates", Duration::from_secs(5)));
    let after = served_issuer(gw.addr("rtmps"));
    assert!(after.contains("rtmpgate test CA"), "{after}");
}
