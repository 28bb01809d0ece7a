//! `[engine] publisher_takeover`: with "replace" a second ffmpeg publisher on a busy key takes
//! it over (the first is closed) while an ffmpeg player keeps running and receives the
//! newcomer's packets, exact, on a continuous timeline; with "deny" (the default) the second
//! publisher is refused and the first carries on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use engine_support::*;
use rtmpgate::engine::hub::PublisherTakeover;
use rtmpgate::engine::EngineConfig;

/// A second source that differs from `source_flv` in every video packet (testsrc instead of
/// testsrc2), same size, codec and GOP: what the newcomer publishes.
fn other_source_flv(seconds: u32) -> PathBuf {
    let dest = media_dir().join(format!("takeover-src-{seconds}s.flv"));
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30"])
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", &seconds.to_string()])
            .args(["-c:v", "libx264", "-g", "30", "-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

fn video(frames: &[Frame]) -> Vec<Frame> {
    frames
        .iter()
        .filter(|f| f.media == "video")
        .cloned()
        .collect()
}

fn publishing(srv: &Server) -> bool {
    srv.engine.hub().snapshot().iter().any(|s| s.publishing)
}

#[test]
fn replace_hands_the_key_to_the_new_publisher_and_players_carry_on() {
    let a_src = source_flv(20);
    let b_src = other_source_flv(5);
    let srv = Server::start(EngineConfig {
        publisher_takeover: PublisherTakeover::Replace,
        ..EngineConfig::default()
    });
    let url = srv.url("takeover");
    let dir = temp_dir();
    let out = dir.path().join("player.flv");

    let a_started = Instant::now();
    let mut a = publish(&peers().ffmpeg, &url, &a_src);
    assert!(
        wait_until(Duration::from_secs(15), || publishing(&srv)),
        "publisher A did not start: {}",
        a.log()
    );
    let mut player = play_ffmpeg(&url, &out);
    // The player has A's media flowing (its output grows past the GOP it started with).
    assert!(
        wait_until(Duration::from_secs(15), || std::fs::metadata(&out)
            .is_ok_and(|m| m.len() > 200_000)),
        "the player got no media from A: {}",
        player.log()
    );

    let mut b = publish(&peers().ffmpeg, &url, &b_src);
    // A is closed long before its 20 s source ends.
    let a_status = a.wait_timeout(Duration::from_secs(10));
    assert!(
        a_status.is_some(),
        "publisher A was not closed within 10 s of B's publish"
    );
    assert!(
        a_started.elapsed() < Duration::from_secs(17),
        "publisher A ran {:?}: it ended with its source, not by the takeover",
        a_started.elapsed()
    );
    assert!(
        !log_lines(&["another publisher took live/takeover over"]).is_empty(),
        "no close line for A's session"
    );
    assert!(
        player.is_running(),
        "the player stopped when A was replaced: {}",
        player.log()
    );
    let b_status = b
        .wait_timeout(Duration::from_secs(30))
        .expect("publisher B did not finish its 5 s source within 30 s");
    assert!(b_status.success(), "publisher B failed: {}", b.log());
    // The player was still playing while B published: it ends only now that B has left.
    assert!(
        player.wait_timeout(PLAYER_TAIL).is_some(),
        "the player did not stop within {PLAYER_TAIL:?} after B left"
    );

    let got = video(&framemd5(&out));
    let want_a = video(&framemd5(&a_src));
    let want_b = video(&framemd5(&b_src));
    let a_hashes: HashSet<&str> = want_a.iter().map(|f| f.hash.as_str()).collect();
    let b_hashes: HashSet<&str> = want_b.iter().map(|f| f.hash.as_str()).collect();
    let switch = got
        .iter()
        .position(|f| b_hashes.contains(f.hash.as_str()))
        .unwrap_or_else(|| panic!("no packet of B reached the player ({} packets)", got.len()));
    let (from_a, from_b) = got.split_at(switch);
    assert!(
        from_a.len() >= 30,
        "only {} packets of A before B",
        from_a.len()
    );
    assert!(
        from_a.iter().all(|f| a_hashes.contains(f.hash.as_str())),
        "packets before B's are not all A's"
    );
    // B's packets arrive exact and in order from its first one (its keyframe), with at most
    // the last second lost as the player stops.
    for (i, (g, w)) in from_b.iter().zip(&want_b).enumerate() {
        assert_eq!(
            (g.size, &g.hash),
            (w.size, &w.hash),
            "B's video packet #{i} differs at the player"
        );
    }
    assert!(
        from_b.len() + 30 >= want_b.len() && from_b.len() <= want_b.len(),
        "the player got {} of B's {} video packets",
        from_b.len(),
        want_b.len()
    );
    // One timeline: B continues after A, without a jump back or a long gap.
    let last_a = from_a.last().unwrap().dts;
    let first_b = from_b.first().unwrap().dts;
    assert!(
        first_b > last_a && first_b - last_a < 1000,
        "timeline: A's last packet at {last_a}, B's first at {first_b}"
    );
    assert!(
        got.windows(2).all(|w| w[1].dts > w[0].dts),
        "video timestamps do not increase throughout"
    );
    eprintln!(
        "takeover: {} packets of A, then {} of B's {}; A {last_a} -> B {first_b}",
        from_a.len(),
        from_b.len(),
        want_b.len()
    );
}

#[test]
fn deny_refuses_the_second_publisher_and_keeps_the_first() {
    let a_src = source_flv(20);
    let b_src = other_source_flv(5);
    let srv = Server::start(EngineConfig::default());
    let url = srv.url("denied");
    let mut a = publish(&peers().ffmpeg, &url, &a_src);
    assert!(
        wait_until(Duration::from_secs(15), || publishing(&srv)),
        "publisher A did not start: {}",
        a.log()
    );
    let mut b = publish(&peers().ffmpeg, &url, &b_src);
    let st = b
        .wait_timeout(Duration::from_secs(15))
        .expect("the refused publisher B did not end within 15 s");
    assert!(!st.success(), "publisher B was not refused: {}", b.log());
    assert!(
        !log_lines(&["publish live/denied refused"]).is_empty(),
        "no refusal line for B"
    );
    assert!(a.is_running(), "publisher A stopped: {}", a.log());
    assert!(publishing(&srv));
    a.kill();
}
