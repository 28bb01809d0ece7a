//! Edge mode (`[upstream] mode = "edge"`) against real nginx-rtmp origins: the players of a
//! stream on one edge share ONE pull from the origin (counted on the origin's socket table),
//! with every frame (framemd5 against the source); the pull ends after `edge_idle_secs`;
//! an origin restart is ridden out (the pull reconnects, the players stay and get the new
//! publish); with two origins every stream goes to its rendezvous-hashed origin and two
//! edges listing the origins in different orders agree (a publisher forwarded by one edge
//! is played through the other).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const SECONDS: u32 = 6;
const IDLE_SECS: u64 = 2;

/// An edge gateway in front of `origins` (rtmp://HOST:PORT each), one listener.
fn edge(origins: &[String]) -> Gateway {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "rtmp://127.0.0.1:0".into(),
        "--admin".into(),
        "off".into(),
        "--edge".into(),
    ];
    for o in origins {
        args.push("--upstream".into());
        args.push(o.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::builder()
        .config(&format!("[upstream]\nedge_idle_secs = {IDLE_SECS}\n"))
        .env("RUST_LOG", "info,rtmpgate::engine::edge=debug")
        .args(&refs)
        .start()
}

/// The README's rendezvous rule: the origin with the largest first 8 bytes (big-endian) of
/// SHA-256(origin URL, 0, app, 0, stream).
fn hashed_origin<'a>(origins: &'a [String], app: &str, name: &str) -> &'a str {
    origins
        .iter()
        .max_by_key(|o| {
            let mut h = Sha256::new();
            h.update(o.as_bytes());
            h.update([0]);
            h.update(app.as_bytes());
            h.update([0]);
            h.update(name.as_bytes());
            let d = h.finalize();
            u64::from_be_bytes(d[..8].try_into().unwrap())
        })
        .unwrap()
}

/// Waits (bounded) for every player to stop by itself, else kills it and fails.
fn wait_players(players: &mut [Proc], within: Duration) {
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

fn video(frames: &[Frame]) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| f.media == "video")
        .cloned()
        .collect()
}

#[test]
fn players_of_one_stream_share_one_pull_then_it_ends_when_idle() {
    let origin = Nginx::start();
    let gw = edge(&[origin.upstream()]);
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    // Ten players before the publisher: six over RTMP (ffmpeg and rtmpdump), four over RTMPT.
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for i in 0..10 {
        let out = dir.path().join(format!("p{i}.flv"));
        let scheme = if i < 6 { "rtmp" } else { "rtmpt" };
        let url = format!("{}/live/shared", gw.url(scheme));
        let p = if i % 2 == 0 {
            play_ffmpeg(&url, &out)
        } else {
            play_rtmpdump(&url, &out)
        };
        players.push(p);
        outs.push(out);
    }
    // The first player's pull is the only connection to the origin.
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("edge pull live/shared: playing from")),
        "no pull started: {}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        origin.clients(),
        1,
        "connections on the origin before the publisher"
    );
    let mut publisher = publish(&peers().ffmpeg, &origin.url("live/shared"), &src);
    // While the stream runs: the publisher and ONE pull, whatever the ten players do.
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(u64::from(SECONDS) - 2);
    while Instant::now() < until {
        most = most.max(origin.clients());
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        most, 2,
        "the origin saw {most} connections (publisher + pulls); want 1 pull"
    );
    assert!(publisher
        .wait_timeout(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    wait_players(&mut players, PLAYER_TAIL);
    // The players are gone: the pull ends edge_idle_secs later (plus a check period).
    let left = Instant::now();
    assert!(
        wait_until(Duration::from_secs(IDLE_SECS + 5), || origin.clients() == 0),
        "the pull still holds a connection to the origin {:?} after the last player: {}",
        left.elapsed(),
        gw.log()
    );
    let after = left.elapsed();
    eprintln!("pull closed {after:?} after the last player left (edge_idle_secs = {IDLE_SECS})");
    // The players' sessions close a moment before their processes are reaped here.
    assert!(
        after >= Duration::from_millis(IDLE_SECS * 1000 - 500),
        "the pull ended {after:?} after the last player, before edge_idle_secs = {IDLE_SECS}"
    );
    for (i, out) in outs.iter().enumerate() {
        let got = framemd5(out);
        let what = format!("player {i}");
        assert_whole_run(&what, &want, &got, 700);
    }
    assert!(
        gw.log().contains("edge pull live/shared: ended"),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.log()
            .matches("edge pull live/shared: playing from")
            .count(),
        1,
        "one pull for the whole run: {}",
        gw.log()
    );
}

/// The run of `got`'s video that starts at its LAST occurrence of the source's first video
/// frame (the second publish, after the origin came back).
fn after_restart(want_video: &[Frame], got: &[Frame]) -> Vec<Frame> {
    let v = video(got);
    let first = &want_video[0].hash;
    let at = v.iter().rposition(|f| &f.hash == first).unwrap_or(0);
    assert!(
        at > 0,
        "the source's first frame came only once: no second publish was played"
    );
    v[at..].to_vec()
}

#[test]
fn origin_restart_the_pull_reconnects_and_players_carry_on() {
    let origin = Nginx::start();
    let port = origin.port();
    let gw = edge(&[origin.upstream()]);
    let src = source_flv(SECONDS);
    let want = video(&framemd5(&src));
    let dir = temp_dir();
    let outs = [dir.path().join("a.flv"), dir.path().join("b.flv")];
    let mut players = vec![
        play_ffmpeg(&format!("{}/live/restart", gw.url("rtmp")), &outs[0]),
        play_rtmpdump(&format!("{}/live/restart", gw.url("rtmpt")), &outs[1]),
    ];
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("edge pull live/restart: playing from")));
    let mut first = publish(&peers().ffmpeg, &origin.url("live/restart"), &src);
    thread::sleep(Duration::from_secs(3));
    // The origin dies mid-stream (its publisher with it) and comes back on its port.
    let mut origin = origin;
    origin.kill();
    let _ = first.wait_timeout(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    let origin2 = Nginx::start_on_port(port);
    let mut second = publish(&peers().ffmpeg, &origin2.url("live/restart"), &src);
    assert!(second
        .wait_timeout(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    wait_players(&mut players, PLAYER_TAIL);
    for (i, out) in outs.iter().enumerate() {
        let got = framemd5(out);
        let run = after_restart(&want, &got);
        let r = assert_contiguous_run(&format!("player {i} after the restart"), &want, &run, 0.9);
        assert_eq!(r.start("video"), Some(0), "player {i}: {r}");
    }
    let log = gw.log();
    assert!(
        log.matches("edge pull live/restart: playing from").count() >= 2,
        "the pull did not reconnect: {log}"
    );
    assert_eq!(
        log.matches("edge pull live/restart: started").count(),
        1,
        "the players stayed on one pull: {log}"
    );
    drop(origin);
}

#[test]
fn two_origins_each_stream_goes_to_its_hashed_origin_and_edges_agree() {
    let oa = Nginx::start();
    let ob = Nginx::start();
    let origins = [oa.upstream(), ob.upstream()];
    // The two edges list the origins in different orders.
    let e1 = edge(&origins);
    let e2 = edge(&[ob.upstream(), oa.upstream()]);
    let pick = |o: &str| {
        (0..200)
            .map(|i| format!("s{i}"))
            .find(|n| hashed_origin(&origins, "live", n) == o)
            .unwrap()
    };
    let (na, nb) = (pick(&origins[0]), pick(&origins[1]));
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let (out_a, out_b) = (dir.path().join("a.flv"), dir.path().join("b.flv"));
    // Each stream is played through one edge and published through the other.
    let mut players = vec![
        play_ffmpeg(&format!("{}/live/{na}", e2.url("rtmp")), &out_a),
        play_rtmpdump(&format!("{}/live/{nb}", e1.url("rtmpt")), &out_b),
    ];
    assert!(wait_until(Duration::from_secs(10), || {
        e2.log()
            .contains(&format!("edge pull live/{na}: playing from"))
            && e1
                .log()
                .contains(&format!("edge pull live/{nb}: playing from"))
    }));
    let mut pa = publish(
        &peers().ffmpeg,
        &format!("{}/live/{na}", e1.url("rtmp")),
        &src,
    );
    let mut pb = publish(
        &peers().ffmpeg,
        &format!("{}/live/{nb}", e2.url("rtmp")),
        &src,
    );
    for p in [&mut pa, &mut pb] {
        assert!(
            p.wait_timeout(Duration::from_secs(30))
                .is_some_and(|s| s.success()),
            "{}",
            p.log()
        );
    }
    wait_players(&mut players, PLAYER_TAIL);
    assert_whole_run(
        "player of the stream hashed to origin A",
        &want,
        &framemd5(&out_a),
        700,
    );
    assert_whole_run(
        "player of the stream hashed to origin B",
        &want,
        &framemd5(&out_b),
        700,
    );
    let (l1, l2) = (e1.log(), e2.log());
    for (log, line) in [
        (
            &l1,
            format!("edge forward live/{na}: publishing to {}", origins[0]),
        ),
        (
            &l2,
            format!("edge pull live/{na}: playing from {}", origins[0]),
        ),
        (
            &l2,
            format!("edge forward live/{nb}: publishing to {}", origins[1]),
        ),
        (
            &l1,
            format!("edge pull live/{nb}: playing from {}", origins[1]),
        ),
    ] {
        assert!(log.contains(&line), "missing '{line}' in:\n{log}");
    }
}
