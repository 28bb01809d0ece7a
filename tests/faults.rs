//! Faults around a running rtmpgate: a backend that refuses, dies mid-stream and comes back;
//! clients killed mid-publish over each transport; a tunnel client that vanishes without
//! /close; SIGTERM with sessions open; TLS files missing at start. (RTMPT's own backend
//! faults are in tunnel_peers.rs; transports.rs checks fds after tunnel players are reaped.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;

const REAP_SECS: u64 = 2;

/// rtmpgate with an rtmp and an rtmps listener (each also serves its tunnel sibling), the
/// harness's dev certificate, a short tunnel reap time, and `extra` arguments.
fn gateway(config: &str, extra: &[&str]) -> Gateway {
    let c = dev_certs();
    let chain = c.chain.display().to_string();
    let key = c.key.display().to_string();
    let mut args = vec![
        "--listen",
        "rtmp://127.0.0.1:0",
        "--listen",
        "rtmps://127.0.0.1:0",
        "--tls-cert",
        &chain,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    Gateway::builder()
        .config(&format!(
            "{config}\n[limits]\ntunnel_reap_secs = {REAP_SECS}\n"
        ))
        .args(&args)
        .start()
}

/// Nothing listens where the backend should be: each client is closed promptly and the log
/// names the backend's address.
#[test]
fn backend_refuses() {
    let port = free_port();
    let upstream = format!("rtmp://127.0.0.1:{port}");
    let gw = gateway("", &["--upstream", &upstream]);
    let baseline = gw.fds();
    let src = source_flv(3);
    for scheme in ["rtmp", "rtmps"] {
        let started = Instant::now();
        let mut publ = publish(
            &peers().ffmpeg,
            &format!("{}/live/refused", gw.url(scheme)),
            &src,
        );
        let status = publ.wait_timeout(Duration::from_secs(15));
        let took = started.elapsed();
        eprintln!("{scheme}: publisher ended {status:?} after {took:?}");
        assert!(
            status.is_some_and(|s| !s.success()),
            "publishing over {scheme} to a refusing backend must fail promptly ({status:?})"
        );
        assert!(took < Duration::from_secs(10), "{scheme}: took {took:?}");
    }
    let needle = format!("127.0.0.1:{port}");
    assert!(
        gw.wait_log(&needle, Duration::from_secs(3)),
        "no log line names the backend {needle}; log:\n{}",
        gw.log()
    );
    let line = gw
        .log()
        .lines()
        .find(|l| l.contains(&needle) && !l.contains("forwarding every client"))
        .map(str::to_owned);
    eprintln!("log: {line:?}");
    assert!(line.is_some(), "no failure line names {needle}");
    gw.assert_fds_back_to(baseline, Duration::from_secs(10));
}

/// The backend dies while a publisher and two players are on it: every client is closed
/// within seconds; then it comes back on the same port and new sessions work at once,
/// without restarting rtmpgate.
#[test]
fn backend_dies_mid_stream_then_restarts() {
    let p = peers();
    let mut nginx = Nginx::start();
    let port = nginx.port();
    let gw = gateway("", &["--upstream", &nginx.upstream()]);
    let baseline = gw.fds();
    let dir = temp_dir();
    let long = source_flv(20);
    let key = "live/dies";
    let mut players = [
        play_ffmpeg(
            &format!("{}/{key}", gw.url("rtmps")),
            &dir.path().join("a.flv"),
        ),
        play_ffmpeg(
            &format!("{}/{key}", gw.url("rtmpt")),
            &dir.path().join("b.flv"),
        ),
    ];
    thread::sleep(Duration::from_secs(1));
    let mut publ = publish(&p.ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &long);
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::metadata(dir.path().join("a.flv")).is_ok_and(|m| m.len() > 50_000)
        }),
        "the rtmps player received nothing before the backend died"
    );
    let killed = Instant::now();
    nginx.kill();
    let publ_end = publ.wait_timeout(Duration::from_secs(10));
    eprintln!(
        "backend killed: publisher ended {publ_end:?} after {:?}",
        killed.elapsed()
    );
    assert!(
        publ_end.is_some(),
        "publisher still running 10 s after the backend died"
    );
    for pl in players.iter_mut() {
        let end = pl.wait_timeout(Duration::from_secs(PLAYER_IDLE_SECS + 5));
        eprintln!("{}: ended {end:?} after {:?}", pl.name(), killed.elapsed());
        assert!(
            end.is_some(),
            "{} still running after the backend died",
            pl.name()
        );
    }
    // Tunnel sessions end when reaped.
    gw.assert_fds_back_to(baseline, Duration::from_secs(REAP_SECS + 10));

    let nginx = Nginx::start_on_port(port);
    let src_file = source_flv(5);
    let src = framemd5(&src_file);
    let key = "live/again";
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/{key}", gw.url("rtmpts")),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, format!("{}/{key}", gw.url("rtmp"))),
            (PlayerKind::Rtmpdump, format!("{}/{key}", gw.url("rtmpt"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    gw.assert_fds_back_to(baseline, Duration::from_secs(REAP_SECS + 10));
    assert!(wait_until(Duration::from_secs(10), || nginx.clients() == 0));
}

/// A publisher killed with SIGKILL over each transport, through the engine: its session is
/// closed (at once for TCP, at the reap time for a tunnel), the key is free for the next
/// publisher, and the gateway's fds come back.
#[test]
fn client_killed_mid_publish_over_each_transport() {
    let p = peers();
    let gw = gateway("", &[]);
    let baseline = gw.fds();
    let long = source_flv(20);
    let short = source_flv(3);
    thread::scope(|s| {
        let gw = &gw;
        let handles: Vec<_> = ["rtmp", "rtmps", "rtmpt", "rtmpts"]
            .into_iter()
            .map(|scheme| {
                let long = &long;
                let short = &short;
                s.spawn(move || {
                    let key = format!("live/killed-{scheme}");
                    let url = format!("{}/{key}", gw.url(scheme));
                    let mut publ = publish(&p.ffmpeg, &url, long);
                    let role = format!("publish {key}");
                    assert!(
                        gw.wait_log(&role, Duration::from_secs(15)),
                        "{scheme}: publish never started"
                    );
                    thread::sleep(Duration::from_secs(2));
                    let killed = Instant::now();
                    publ.signal("KILL");
                    publ.wait_timeout(Duration::from_secs(5));
                    let closed = wait_until(Duration::from_secs(REAP_SECS + 10), || {
                        gw.log()
                            .lines()
                            .any(|l| l.contains("session close") && l.contains(&role))
                    });
                    let took = killed.elapsed();
                    assert!(closed, "{scheme}: killed publisher's session never closed");
                    eprintln!("{scheme}: killed publisher's session closed after {took:?}");
                    // The key is free again.
                    let mut again = publish(&p.ffmpeg, &url, short);
                    let st = again.wait_timeout(Duration::from_secs(30));
                    assert!(
                        st.is_some_and(|s| s.success()),
                        "{scheme}: a new publisher on the same key failed: {}",
                        again.log()
                    );
                    took
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a transport's check failed");
        }
    });
    assert!(!gw.log().contains("panicked"));
    gw.assert_fds_back_to(baseline, Duration::from_secs(REAP_SECS + 10));
}

/// A tunnel client opens a session, starts the handshake (so the backend leg is up), then
/// vanishes without /close: the session is reaped at tunnel_reap_secs and nginx sees its
/// connection closed.
#[test]
fn tunnel_client_vanishes_without_close() {
    let nginx = Nginx::start();
    let gw = gateway("", &["--upstream", &nginx.upstream()]);
    let baseline = gw.fds();
    let limit = Duration::from_secs(5);
    let mut c = connect_from(Ipv4Addr::LOCALHOST, gw.addr("rtmpt")).unwrap();
    let (status, reply) = http_raw(&mut c, &post("/open/1", b"\0"), limit);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let id = String::from_utf8_lossy(http_body(&reply))
        .trim()
        .to_string();
    let hs = rtmpgate::rtmp::handshake::ClientHandshake::new(false);
    let (status, _) = http_raw(&mut c, &post(&format!("/send/{id}/1"), &hs.c0c1()), limit);
    assert_eq!(status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || nginx.clients() == 1),
        "the backend leg never opened ({} connections on nginx)",
        nginx.clients()
    );
    let vanished = Instant::now();
    drop(c);
    assert!(
        wait_until(Duration::from_secs(REAP_SECS + 8), || nginx.clients() == 0),
        "nginx still has {} connection(s) from the gateway {:?} after the tunnel client vanished",
        nginx.clients(),
        vanished.elapsed()
    );
    let took = vanished.elapsed();
    eprintln!("backend leg closed {took:?} after the tunnel client vanished");
    assert!(took >= Duration::from_secs(REAP_SECS) - Duration::from_millis(300));
    assert!(
        gw.log_contains("tunnel_reap"),
        "no log line says the session was reaped:\n{}",
        gw.log()
    );
    assert!(
        !gw.log().contains(&id),
        "the full tunnel session id appears in the info log"
    );
    gw.assert_fds_back_to(baseline, Duration::from_secs(5));
}

/// SIGTERM with a publisher and a player on the engine: the listeners close at once, the
/// sessions go on through the drain, then rtmpgate exits 0.
#[test]
fn sigterm_drains_then_exits_0() {
    let p = peers();
    let mut gw = gateway("drain_secs = 3", &[]);
    let dir = temp_dir();
    let long = source_flv(20);
    let key = "live/drain";
    let addr = gw.addr("rtmp");
    let mut player = play_ffmpeg(
        &format!("{}/{key}", gw.url("rtmp")),
        &dir.path().join("p.flv"),
    );
    thread::sleep(Duration::from_millis(500));
    let mut publ = publish(&p.ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &long);
    assert!(gw.wait_log(&format!("publish {key}"), Duration::from_secs(15)));
    thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    gw.signal("TERM");
    assert!(
        gw.wait_log("no longer accepting", Duration::from_secs(3)),
        "no drain line after SIGTERM"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the listener still accepts after SIGTERM"
    );
    // The sessions carry on during the drain.
    thread::sleep(Duration::from_secs(1));
    assert!(publ.is_running(), "publisher cut before the drain ended");
    // Not gw.terminate(): a second SIGTERM means "close now".
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = gw.try_status();
        status.is_some()
    });
    let took = sent.elapsed();
    eprintln!("rtmpgate exited {status:?} {took:?} after SIGTERM");
    assert!(
        status.is_some_and(|s| s.success()),
        "rtmpgate did not exit 0 after the drain: {status:?}\n{}",
        gw.log()
    );
    assert!(
        took >= Duration::from_millis(2800),
        "exited before the drain: {took:?}\n{}",
        gw.log()
    );
    assert!(publ.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(player
        .wait_timeout(Duration::from_secs(PLAYER_IDLE_SECS + 5))
        .is_some());
}

/// A missing certificate or key file stops rtmpgate at start, with an error naming the file
/// and a non-zero exit status.
#[test]
fn missing_tls_file_fails_at_start_naming_it() {
    let c = dev_certs();
    let chain = c.chain.display().to_string();
    let key = c.key.display().to_string();
    let dir = temp_dir();
    let missing = dir.path().join("no-such-file.pem").display().to_string();
    for (which, cert, key) in [
        ("certificate", missing.as_str(), key.as_str()),
        ("key", chain.as_str(), missing.as_str()),
    ] {
        let (status, log) = Gateway::builder()
            .args(&[
                "--listen",
                "rtmps://127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--upstream",
                "rtmp://127.0.0.1:1",
            ])
            .run_to_exit(Duration::from_secs(10));
        eprintln!("missing {which}: {status:?}: {}", log.trim());
        assert!(
            status.is_some_and(|s| !s.success()),
            "missing {which}: expected a non-zero exit, got {status:?}"
        );
        assert!(
            log.contains(&missing),
            "missing {which}: the error does not name {missing}:\n{log}"
        );
        assert!(!log.contains("listening on"), "it started listening anyway");
        assert_eq!(
            log.matches("No such file").count(),
            1,
            "missing {which}: the OS error should be said once:\n{log}"
        );
    }
}
