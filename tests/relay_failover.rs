//! Failover timings with real peers: a backend killed mid-stream has every client relayed to
//! it closed within 1 s (raw clients whose own read timeout is 10 s, an ffmpeg publisher and
//! an rtmpdump player), the publisher's reconnection lands on the surviving nginx-rtmp and
//! the stream plays again frame for frame; with no health check at all, backends that refuse
//! the TCP connect or close right after accepting it are skipped by the client's own connect
//! without the client noticing. (tests/relay_routing.rs covers the health checker marking a
//! killed backend down and a restarted one up.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod relay_support;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use relay_support::*;

/// The bound on closing a dead backend's clients.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

#[test]
fn killed_backend_closes_its_clients_within_1s_and_the_publisher_reconnects_to_the_survivor() {
    let p = peers();
    let mut b1 = StatNginx::start(&["live"]);
    let b2 = StatNginx::start(&["live"]);
    let (u1, u2) = (b1.upstream(), b2.upstream());
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\nhealth_interval_secs = 1\nhealth_rise = 2\nhealth_fall = 1\n\n\
             [[upstreams]]\nname = \"pool\"\napps = [\"live\"]\nbalance = \"first\"\n\
             health_check = \"rtmp\"\nbackends = [\"{u1}\", \"{u2}\"]\n"
        ))
        .start();
    let admin = admin_addr(&gw);
    let url = format!("{}/live/f", gw.url("rtmp"));
    let dir = temp_dir();

    // On backend 1: an ffmpeg publisher, an rtmpdump player, 3 raw players, 3 raw clients
    // that only connected.
    let long = source_flv(20);
    let mut publisher = publish(&p.ffmpeg, &url, &long);
    let mut player = play_rtmpdump(&url, &dir.path().join("before.flv"));
    let addr = gw.addr("rtmp");
    let mut raw: Vec<RawClient> = (0..6)
        .map(|i| {
            let mut c = RawClient::connect(addr, "live").unwrap();
            if i < 3 {
                c.play("f").unwrap();
            }
            c
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || b1.stream_clients() == 5),
        "backend 1 does not list the publisher and 4 players:\n{}",
        b1.stat()
    );
    let before = dir.path().join("before.flv");
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::metadata(&before)
            .is_ok_and(|m| m.len() > 50_000)),
        "the player through the gateway received nothing: {}",
        player.log()
    );
    assert!(raw.iter().all(|c| !c.is_closed()));
    let m = metrics(admin);
    assert_eq!(backend_clients(&m, "pool", &u1), Some(8), "{m}");

    // Backend 1 dies.
    let killed_at = thread::scope(|scope| {
        let waits: Vec<_> = raw
            .iter_mut()
            .map(|c| scope.spawn(move || c.wait_closed()))
            .collect();
        // The readers are blocked in read() before the kill.
        thread::sleep(Duration::from_millis(200));
        let killed_at = Instant::now();
        b1.kill();
        let closed: Vec<Duration> = waits
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let at = w
                    .join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("raw client {i}: {e}"));
                at.saturating_duration_since(killed_at)
            })
            .collect();
        eprintln!("raw clients closed after {closed:?}");
        for (i, d) in closed.iter().enumerate() {
            assert!(
                *d <= CLOSE_WITHIN,
                "raw client {i} was closed {d:?} after its backend died, over {CLOSE_WITHIN:?}"
            );
        }
        killed_at
    });
    // The real peers see their connection end as promptly: each exits within 1 s of the
    // close plus 1 s for the program itself to notice and quit (ffmpeg has no timeout set
    // here and would wait for ever, rtmpdump's own is 60 s).
    let publisher_exit = publisher.wait_timeout(CLOSE_WITHIN + Duration::from_secs(1));
    let publisher_took = killed_at.elapsed();
    assert!(
        publisher_exit.is_some(),
        "the ffmpeg publisher still runs {publisher_took:?} after its backend died: {}",
        publisher.log()
    );
    let player_exit = player.wait_timeout(CLOSE_WITHIN + Duration::from_secs(1));
    let player_took = killed_at.elapsed();
    assert!(
        player_exit.is_some(),
        "the rtmpdump player still runs {player_took:?} after its backend died"
    );
    eprintln!(
        "ffmpeg publisher exited ({publisher_exit:?}) by {publisher_took:?}, rtmpdump player \
         ({player_exit:?}) by {player_took:?} after the kill"
    );
    assert!(
        gw.wait_log(&format!("backend {u1} marked down"), Duration::from_secs(5)),
        "{}",
        gw.log()
    );

    // The encoder reconnects (the test plays its reconnect loop): it lands on backend 2,
    // where a player straight from backend 2 and one through the gateway get every frame.
    let src_file = source_flv(5);
    let src = framemd5(&src_file);
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[
            (PlayerKind::Rtmpdump, b2.url("live/f")),
            (PlayerKind::Ffmpeg, url.clone()),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    let m = metrics(admin);
    assert_eq!(backend_up(&m, "pool", &u1), Some(0), "{m}");
    assert_eq!(transitions(&m, "pool", &u1, "down"), Some(1), "{m}");
    assert_eq!(transitions(&m, "pool", &u2, "down"), Some(0), "{m}");
}

/// No health check: only clients' own connects find out. The group's first backend
/// refuses the TCP connect, the second accepts and closes at once, the third is nginx-rtmp;
/// the player (first to connect) is carried past both to nginx, the publisher after it goes
/// straight there (both now marked down); frames exact, nothing shown to either client.
#[test]
fn backends_refusing_at_connect_are_skipped_without_the_client_noticing() {
    let p = peers();
    let refused = format!("rtmp://127.0.0.1:{}", free_port());
    let closer = FakeBackend::start(Fake::Close);
    let real = StatNginx::start(&["live"]);
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\n\n\
             [[upstreams]]\nname = \"pool\"\napps = [\"live\"]\nbalance = \"first\"\n\
             health_check = \"off\"\nbackends = [\"{refused}\", \"{}\", \"{}\"]\n",
            closer.upstream(),
            real.upstream()
        ))
        .start();
    let admin = admin_addr(&gw);
    let src_file = source_flv(3);
    let src = framemd5(&src_file);
    let url = format!("{}/live/t", gw.url("rtmp"));
    let dir = temp_dir();
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[(PlayerKind::Rtmpdump, url.clone())],
    );
    for r in &got {
        r.assert_run_of(&src);
        assert!(!r.frames.is_empty());
    }
    let log = gw.log();
    for u in [&refused, &closer.upstream()] {
        assert!(
            log.contains(&format!(
                "backend {u} marked down: a client's connect failed"
            )),
            "{u}:\n{log}"
        );
    }
    assert!(closer.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let m = metrics(admin);
    assert_eq!(backend_up(&m, "pool", &refused), Some(0), "{m}");
    assert_eq!(backend_up(&m, "pool", &closer.upstream()), Some(0), "{m}");
    assert_eq!(backend_up(&m, "pool", &real.upstream()), Some(1), "{m}");
}
