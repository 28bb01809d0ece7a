//! The engine's stream logs (issue 13): however many streams have the two players that give
//! a stream a log, the gateway holds at most `fdlimit::STREAM_LOG_FDS` of them open (memory
//! files, counted once in the descriptors it needs); the streams past the bound are played
//! from memory, and every player of every stream gets the whole stream either way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rtmpgate::door::fdlimit::STREAM_LOG_FDS;

/// Streams published at once: two past the bound, so that two are played from memory.
const STREAMS: usize = STREAM_LOG_FDS as usize + 2;
/// A stream gets a log once it has this many players (`engine::log::MIN_PLAYERS`).
const PLAYERS_PER_STREAM: usize = 2;
/// Long enough for every publisher to be live at once on a loaded machine (66 ffmpeg
/// processes start side by side).
const SECONDS: u32 = 6;

/// The gateway's descriptors that are stream logs (`memfd:rtmpgate-log`).
fn open_logs(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:rtmpgate-log"))
        })
        .count()
}

#[test]
fn streams_past_the_bound_on_logs_are_played_from_memory_and_whole() {
    // The engine with its default merge window: the fan-out lane, hence logs.
    let gw = Gateway::start(&["--listen", "rtmp://127.0.0.1:0"]);
    let pid = gw.pid();
    let dir = temp_dir();
    let src_file = sized_source_flv(SECONDS, "160x90");
    let src = framemd5(&src_file);
    let url = |i: usize| format!("{}/live/cap{i}", gw.url("rtmp"));
    let mut players: Vec<(String, PathBuf, Proc)> = (0..STREAMS)
        .flat_map(|i| (0..PLAYERS_PER_STREAM).map(move |j| (i, j)))
        .map(|(i, j)| {
            let out = dir.path().join(format!("cap{i}-{j}.flv"));
            let proc = PlayerKind::Rtmpdump.start(&url(i), &out);
            (url(i), out, proc)
        })
        .collect();
    let marker = PlayerKind::Rtmpdump.ready_marker();
    for (url, _, proc) in players.iter_mut() {
        let asked = wait_until(START_TIMEOUT, || {
            proc.log_tail().contains(marker) || !proc.is_running()
        });
        assert!(
            asked && proc.is_running(),
            "the player of {url} did not ask to play (no `{marker}`); its output:\n{}",
            proc.log()
        );
    }
    // Every player is in the hub before the first frame, so each stream has its two players
    // at its first frame and asks for a log there.
    let want = STREAMS * PLAYERS_PER_STREAM;
    assert!(
        gw.wait_log_count("(waiting for a publisher)", want, START_TIMEOUT),
        "the gateway did not log {want} plays; its log:\n{}",
        gw.log()
    );

    // The logs of streams whose publisher has gone stay open while their players wait, so
    // the count only grows while the publishers run: sampled until they are done (bounded,
    // should an assertion below end the run early).
    let done = AtomicBool::new(false);
    let most = thread::scope(|s| {
        let sampler = s.spawn(|| {
            let until = Instant::now() + Duration::from_secs(180);
            let mut most = 0;
            while !done.load(Ordering::Acquire) && Instant::now() < until {
                most = most.max(open_logs(pid));
                thread::sleep(Duration::from_millis(20));
            }
            most
        });
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut publishers: Vec<(usize, Proc)> = (0..STREAMS)
                .map(|i| (i, publish(&peers().ffmpeg, &url(i), &src_file)))
                .collect();
            for (i, p) in publishers.iter_mut() {
                let st = p.wait_timeout(Duration::from_secs(120));
                assert!(
                    st.is_some_and(|s| s.success()),
                    "the publisher of {} ended with {st:?}; its output:\n{}",
                    url(*i),
                    p.log()
                );
            }
        }));
        done.store(true, Ordering::Release);
        let most = sampler.join().unwrap();
        if let Err(e) = run {
            std::panic::resume_unwind(e);
        }
        most
    });
    eprintln!("{STREAMS} streams x {PLAYERS_PER_STREAM} players: at most {most} logs open");
    assert!(
        most <= STREAM_LOG_FDS as usize,
        "{most} stream logs open at once, over the bound of {STREAM_LOG_FDS}; the gateway's \
         descriptors:\n{}",
        list_fds(pid)
    );
    // Every stream had two players at a frame: the bound was reached, so the streams past it
    // were played from memory.
    assert_eq!(most, STREAM_LOG_FDS as usize, "{}", list_fds(pid));

    let deadline = Instant::now() + PLAYER_TAIL;
    thread::scope(|s| {
        for (_, out, proc) in players.iter_mut() {
            s.spawn(move || finish_player(proc, out, deadline));
        }
    });
    // Every player of every stream, logged or not, got the whole stream.
    for (url, out, _) in &players {
        let got = framemd5(out);
        assert_whole_run(
            &format!("rtmpdump over {url}"),
            &src,
            &got,
            PlayerKind::Rtmpdump.max_tail_ms(),
        );
    }
    // With nobody left on them the streams go, and their logs with them.
    assert!(
        wait_until(Duration::from_secs(10), || open_logs(pid) == 0),
        "stream logs still open with no stream left:\n{}",
        list_fds(pid)
    );
}
