//! A player that stops reading: bounded memory, dropped after the write timeout, and the
//! other players get every frame as if it were not there. Memory is measured with a counting
//! allocator (this test binary's own): the peak of live heap bytes in the process, which the
//! in-process engine's queues are part of, without the noise of resident-set figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn add(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed).saturating_add(n);
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: delegates to the system allocator; the counters are atomics (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size());
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        add(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SOURCE_SECS: u32 = 8;
/// Peak heap the publish may add with one player stalled through it: the fan-out ring (64
/// messages: under a second of this source, up to 3 MB), each player's write batch (up to
/// 1 MiB each) and the frames being read and chunked. A queue that kept what the stalled
/// player did not take would add most of the source (8 s at 2.7 MB/s: 21 MB).
const PEAK_BOUND: usize = 8 << 20;

#[test]
fn a_stalled_player_is_bounded_and_does_not_delay_others() {
    let dir = tempfile::tempdir().unwrap();
    let src = noise_source_flv(SOURCE_SECS);
    let src_kb = std::fs::metadata(&src).unwrap().len() / 1024;
    let want = framemd5(&src);
    // The write timeout outlasts the source, so the stalled player stays connected (and
    // anything queued for it stays queued) for the whole publish.
    let write_timeout = Duration::from_secs(u64::from(SOURCE_SECS) + 2);
    let cfg = EngineConfig {
        // Sized for this 2.7 MB/s source (frames up to 100 KB): a ring of about a second and
        // a lag allowance of a few frames, so a player reading at the live edge never skips.
        queue_messages: 64,
        max_lag_bytes: 1024 * 1024,
        write_timeout,
        // The players start before the publisher: no GOP cache to count.
        gop_cache: false,
        ..EngineConfig::default()
    };
    // Default socket buffers: a 16 KiB send buffer would make even the good player fall
    // behind a 22 Mb/s stream. The heap figure does not count the kernel's buffers.
    let srv = Server::start_with(cfg, None);
    let url = srv.url("stall");
    let out = dir.path().join("ok.flv");
    // rtmpdump, which does not decode: it keeps up with 22 Mb/s.
    let mut good = play_rtmpdump(&url, &out);
    let mut stalled = stalled_player(srv.addr, "live", "stall");
    std::thread::sleep(Duration::from_millis(1000));
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    let st = publisher.wait_timeout(Duration::from_secs(30));
    let published_in = t0.elapsed();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    let st = st.expect("publisher did not finish within 30 s");
    assert!(st.success(), "publisher failed: {}", publisher.log());
    eprintln!(
        "peak heap during the publish: +{} KiB (bound {} KiB; source {src_kb} KiB); \
         published in {published_in:?}",
        peak / 1024,
        PEAK_BOUND / 1024
    );
    assert!(
        src_kb as usize > 2 * PEAK_BOUND / 1024,
        "the source ({src_kb} KiB) is too small for the bound to mean anything"
    );
    assert!(
        peak < PEAK_BOUND,
        "with one player stalled the heap grew by {} KiB, over the {} KiB bound",
        peak / 1024,
        PEAK_BOUND / 1024
    );
    assert!(
        good.wait_timeout(Duration::from_secs(10)).is_some(),
        "the good player did not end 10 s after its publisher"
    );
    // The publisher ran in real time: nobody waited on the stalled player.
    assert!(
        published_in < Duration::from_secs(u64::from(SOURCE_SECS) + 4),
        "publishing took {published_in:?}"
    );
    // The good player got every packet, from the first, as if the stalled one were not there.
    let got = framemd5(&out);
    let report = assert_contiguous_run("the good player", &want, &got, 0.0);
    assert_eq!(report.start("video"), Some(0), "{report}");
    assert_eq!(report.start("audio"), Some(0), "{report}");
    assert!(report.fraction >= 0.99, "the good player got only {report}");
    // Dropped once the write timeout has passed without progress.
    let dropped = wait_until(write_timeout + Duration::from_secs(5), || {
        !log_lines(&["play live/stall", "too slow"]).is_empty()
    });
    assert!(dropped, "the stalled player was not dropped as too slow");
    println!("{}", log_lines(&["play live/stall", "too slow"])[0]);
    // Its socket is closed by the server: draining it reaches end of stream. Read timeouts
    // (the socket's own 5 s) are not an end: only EOF or a reset is.
    let mut sink = vec![0u8; 65536];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match stalled.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the stalled socket: {e}"),
        }
        assert!(
            Instant::now() < end,
            "the stalled player's socket is still open 10 s after it was dropped"
        );
    }
}
