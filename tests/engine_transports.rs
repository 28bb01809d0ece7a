//! The engine behind the real front door: ffmpeg publishes over one transport, players over
//! the others, and every player's frames are one contiguous run of the source's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::time::Duration;

use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;

#[derive(Clone, Copy)]
enum Tool {
    Ffmpeg,
    Rtmpdump,
}

fn publish_and_play(key: &str, publish_over: &str, players: &[(Tool, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(5);
    let want = framemd5(&src);
    let srv = DoorServer::start(
        EngineConfig::default(),
        &["rtmp", "rtmpt", "rtmps", "rtmpts"],
    );
    let mut procs = Vec::new();
    let mut outs = Vec::new();
    for (i, (tool, scheme)) in players.iter().enumerate() {
        let url = srv.url(scheme, key);
        let out = dir.path().join(format!("p{i}-{scheme}.flv"));
        procs.push(match tool {
            Tool::Ffmpeg => play_ffmpeg(&url, &out),
            Tool::Rtmpdump => play_rtmpdump(&url, &out),
        });
        outs.push(out);
    }
    std::thread::sleep(Duration::from_millis(2000));
    let mut publisher = publish(&peers().ffmpeg, &srv.url(publish_over, key), &src);
    let st = publisher
        .wait_timeout(Duration::from_secs(30))
        .expect("publisher did not finish in 30 s");
    assert!(
        st.success(),
        "publisher over {publish_over} failed: {}",
        publisher.log()
    );
    for p in &mut procs {
        if p.wait_timeout(Duration::from_secs(15)).is_none() {
            panic!("{} did not stop after the publisher left", p.name());
        }
    }
    for (p, out) in procs.iter().zip(&outs) {
        let got = framemd5(out);
        let (got_video, want_video) = (count_media(&got, "video"), count_media(&want, "video"));
        let run = contiguous_run(&want, &got)
            .unwrap_or_else(|e| panic!("{}: {e}; output: {}", p.name(), p.log()));
        println!("{} (publisher over {publish_over}): {run}", p.name());
        assert_eq!(
            run.start("video"),
            Some(0),
            "{} missed the first video frames",
            p.name()
        );
        assert!(
            got_video * 100 >= want_video * 85,
            "{} got only {got_video} of {want_video} video frames",
            p.name()
        );
    }
}

#[test]
fn publish_over_rtmpt_play_over_rtmp_rtmps_and_rtmpt() {
    publish_and_play(
        "via-rtmpt",
        "rtmpt",
        &[
            (Tool::Ffmpeg, "rtmp"),
            (Tool::Ffmpeg, "rtmps"),
            (Tool::Rtmpdump, "rtmpt"),
        ],
    );
}

#[test]
fn publish_over_rtmps_play_over_rtmpts_rtmpt_and_rtmp() {
    publish_and_play(
        "via-rtmps",
        "rtmps",
        &[
            (Tool::Ffmpeg, "rtmpts"),
            (Tool::Ffmpeg, "rtmpt"),
            (Tool::Rtmpdump, "rtmp"),
        ],
    );
}

#[test]
fn publish_over_rtmp_play_over_rtmpe() {
    // Debian's ffmpeg has no RTMPE; rtmpdump (librtmp) does.
    publish_and_play(
        "via-rtmp",
        "rtmp",
        &[(Tool::Rtmpdump, "rtmpe"), (Tool::Ffmpeg, "rtmp")],
    );
}

#[test]
fn publish_over_rtmp_play_over_rtmpte() {
    publish_and_play("via-rtmpte", "rtmp", &[(Tool::Rtmpdump, "rtmpte")]);
}
