//! `balance = "hash"` with real peers: three nginx-rtmp backends in one hash group, three
//! streams each with an ffmpeg publisher and players over rtmp (ffmpeg) and rtmpt
//! (rtmpdump) through the gateway, and rtmpdump straight from the backend the hash names
//! (so each stream is proved to sit on that backend, where its players meet it); frames
//! compared with the source (framemd5, whole run). Then that backend is killed: the
//! stream's next publisher and players land together on the backend next in the stream's
//! order. And a PROXY v2 header per backend: a second rtmpgate accepting PROXY headers is
//! the backend, and logs the real client addresses the front gateway saw (players over
//! rtmp and rtmpe, frames); `[auth]` keys in
//! a hash group refuse a wrong key with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rtmpgate::net::url::parse_upstream;
use rtmpgate::upstream::pool::{hrw_score, stream_key};

const SECONDS: u32 = 5;

/// The gateway's order of `backends` for `live/NAME` (the same function, so the test
/// knows where each stream must be).
fn order(name: &str, backends: &[String]) -> Vec<usize> {
    let key = stream_key("live", name);
    let mut v: Vec<(f64, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let id = parse_upstream("k", b).unwrap().to_string();
            (hrw_score(&key, &id, 1), i)
        })
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    v.into_iter().map(|(_, i)| i).collect()
}

/// Publishes `live/NAME` through the gateway and plays it through the gateway over rtmp
/// (ffmpeg) and rtmpt (rtmpdump), and straight from `direct` (rtmpdump); every player gets
/// the whole source, frame for frame.
fn check_stream(gw_rtmp: &str, gw_rtmpt: &str, direct: &str, name: &str) {
    let p = peers();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{gw_rtmp}/live/{name}"),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, format!("{gw_rtmp}/live/{name}")),
            (PlayerKind::Rtmpdump, format!("{gw_rtmpt}/live/{name}")),
            (PlayerKind::Rtmpdump, format!("{direct}/live/{name}")),
        ],
    );
    assert_eq!(got.len(), 3);
    for r in &got {
        r.assert_run_of(&src);
    }
}

#[test]
fn hash_keeps_every_player_on_its_publishers_backend_and_moves_a_dead_ones_streams() {
    let mut nginx: Vec<Option<Nginx>> = (0..3).map(|_| Some(Nginx::start())).collect();
    let upstreams: Vec<String> = nginx.iter().flatten().map(|n| n.upstream()).collect();
    // One stream per backend, found with the gateway's own function.
    let names: Vec<String> = (0..3)
        .map(|b| {
            (0..1000)
                .map(|i| format!("cam{i}"))
                .find(|n| order(n, &upstreams)[0] == b)
                .unwrap()
        })
        .collect();
    let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nhealth_interval_secs = 1\n\n\
             [[upstreams]]\nname = \"origins\"\nbalance = \"hash\"\nhealth_check = \"off\"\n\
             backends = [{}]\n",
            list.join(", ")
        ))
        .start();
    assert!(gw.log_contains("relay = connect"), "{}", gw.log());
    let (rtmp, rtmpt) = (gw.url("rtmp"), gw.url("rtmpt"));
    // The three streams at once, each on its own backend.
    std::thread::scope(|s| {
        for (b, name) in names.iter().enumerate() {
            let direct = upstreams[b].clone();
            let (rtmp, rtmpt) = (&rtmp, &rtmpt);
            s.spawn(move || check_stream(rtmp, rtmpt, &direct, name));
        }
    });

    // The first stream's backend dies: its next publisher and players go to the stream's
    // second choice (the others' streams would not move: the pool unit test covers that).
    let gone = order(&names[0], &upstreams)[0];
    let next = order(&names[0], &upstreams)[1];
    nginx[gone].take().unwrap().kill();
    check_stream(&rtmp, &rtmpt, &upstreams[next], &names[0]);
    assert!(
        gw.expect_log(&format!("backend {} marked down", upstreams[gone])),
        "{}",
        gw.log()
    );
    // The gateway answered connect and createStream itself: its replies and the backend's
    // duplicates never confused a client (every run above is whole); nothing was refused.
    assert!(!gw.log_contains("refused the replayed"), "{}", gw.log());
}

/// The client ports in `log`'s "session opened: TRANSPORT 127.0.0.1:PORT" lines.
fn client_ports(log: &str) -> BTreeSet<u16> {
    log.lines()
        .filter_map(|l| l.split("session opened: ").nth(1))
        .filter_map(|l| l.split(" 127.0.0.1:").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn proxy_v2_per_backend_carries_the_client_address() {
    let p = peers();
    // The backend: rtmpgate's own engine, reading a PROXY header on every connection.
    let backend = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--accept-proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
    ]);
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .config(&format!(
            "[auth.publish_keys]\nlive = [\"pp\"]\n\n\
             [[upstreams]]\nname = \"h\"\nbalance = \"hash\"\n\
             backends = [{{ url = \"rtmp://{}\", weight = 2, proxy_protocol = \"v2\" }}]\n",
            backend.addr("rtmp")
        ))
        .start();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = format!("{}/live/pp", gw.url("rtmp"));
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url.clone()),
            (PlayerKind::Ffmpeg, url.clone()),
            // RTMPE: the gateway announces the large chunk size only to players there.
            (
                PlayerKind::StaticFfmpeg,
                format!("{}/live/pp", gw.url("rtmpe")),
            ),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    // Every client the front gateway saw (a publisher and three players) is named to the
    // backend by its own address and port, not the gateway's outgoing one.
    let front = client_ports(&gw.log());
    assert!(front.len() >= 4, "{}", gw.log());
    assert!(
        wait_until(Duration::from_secs(5), || client_ports(&backend.log())
            .is_superset(&front)),
        "front saw {front:?}, the backend {:?}\n{}",
        client_ports(&backend.log()),
        backend.log()
    );

    // `[auth]` in a hash group: a wrong key is refused with the reason, which ffmpeg reads
    // (the status is chunked at the size the gateway gave it).
    let (status, _, err) = run_capture(
        std::process::Command::new(&p.ffmpeg).args([
            "-nostdin",
            "-hide_banner",
            "-i",
            src_file.to_str().unwrap(),
            "-c",
            "copy",
            "-f",
            "flv",
            &format!("{}/live/wrong", gw.url("rtmp")),
        ]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&err);
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("stream key is not valid"),
        "ffmpeg did not get the reason:\n{err}"
    );
}
