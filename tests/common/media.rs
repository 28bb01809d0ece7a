//! Media and clients: the test media made once per run, publishers, players, frame-by-frame comparison.

use super::*;

/// An FLV test source of `seconds` seconds (testsrc2 640x360 at 30 fps, H.264 with a keyframe
/// every 30 frames, and a sine tone in AAC), made once and cached in target/test-media.
pub fn source_flv(seconds: u32) -> PathBuf {
    sized_source_flv(seconds, "640x360")
}

/// [`source_flv`] at another picture size (`WxH`): a small one for tests that publish many
/// streams at once.
pub fn sized_source_flv(seconds: u32, size: &str) -> PathBuf {
    let name = match size {
        "640x360" => format!("src-{seconds}s.flv"),
        _ => format!("src-{seconds}s-{size}.flv"),
    };
    let dest = media_dir().join(name);
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args([
                "-f",
                "lavfi",
                "-i",
                &format!("testsrc2=size={size}:rate=30"),
            ])
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", &seconds.to_string()])
            .args(["-c:v", "libx264", "-g", "30", "-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

/// A heavy FLV source of `seconds` seconds: random noise at 320x240, 30 fps, H.264 at a low
/// quantiser (about 22 Mb/s, 2.7 MB a second: no encoder can shrink noise), a keyframe every
/// 30 frames, and a sine tone. For bounds that an unbounded queue must visibly break.
pub fn noise_source_flv(seconds: u32) -> PathBuf {
    let dest = media_dir().join(format!("noise-{seconds}s.flv"));
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i"])
            .arg("nullsrc=s=320x240:r=30,geq=lum='random(1)*255':cb=128:cr=128")
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", &seconds.to_string()])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-qp",
                "12",
                "-g",
                "30",
            ])
            .args(["-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

/// Publishes `file` in real time with `ffmpeg -re -i FILE -c copy -f flv URL`; `ffmpeg` is
/// `&peers().ffmpeg` or `&peers().static_ffmpeg`.
pub fn publish(ffmpeg: &Path, url: &str, file: &Path) -> Proc {
    let mut cmd = Command::new(ffmpeg);
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-i",
    ])
    .arg(file)
    .args(["-c", "copy", "-f", "flv", url]);
    Proc::spawn(&format!("ffmpeg publisher to {url}"), cmd)
}

/// Plays `url` with Debian's ffmpeg into `out` (FLV, packets copied).
pub fn play_ffmpeg(url: &str, out: &Path) -> Proc {
    play_ffmpeg_with(&peers().ffmpeg, url, out)
}

/// Plays `url` with this ffmpeg into `out`. It gives up after PLAYER_IDLE_SECS without data
/// (`-rw_timeout`), so a stalled stream ends the player rather than the test's patience.
pub fn play_ffmpeg_with(ffmpeg: &Path, url: &str, out: &Path) -> Proc {
    let mut cmd = Command::new(ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "warning", "-y"])
        .args(["-rw_timeout", &(PLAYER_IDLE_SECS * 1_000_000).to_string()])
        .args(["-i", url, "-c", "copy", "-f", "flv"])
        .arg(out);
    Proc::spawn(&format!("ffmpeg player of {url}"), cmd)
}

/// Plays `url` (live) with rtmpdump into `out`; it gives up after PLAYER_IDLE_SECS without
/// data.
///
/// rtmpdump writes its file through stdio, 4 KiB at a time, so a player the harness has to
/// SIGKILL loses up to 4 KiB it had received (the last packets, the last one cut short).
/// Over RTMPT that happens: librtmp's wait for the next reply loops on the tunnel's answered
/// idle polls without looking at its Ctrl-C flag, so a SIGINT that lands between two polls
/// rather than inside a blocking recv is never acted on (seen once in CI: 93 ms of audio
/// missing, the player killed). Its output therefore goes to stdout, unbuffered by
/// `stdbuf -o0` (every RTMP_Read is written at once), into `out`: whatever it received is in
/// the file however it ends.
pub fn play_rtmpdump(url: &str, out: &Path) -> Proc {
    let file = fs::File::create(out)
        .unwrap_or_else(|e| panic!("cannot create {} for rtmpdump: {e}", out.display()));
    let mut cmd = Command::new("stdbuf");
    cmd.arg("-o0").arg(&peers().rtmpdump).args([
        "-v",
        "-m",
        &PLAYER_IDLE_SECS.to_string(),
        "-r",
        url,
        "-o",
        "-",
    ]);
    Proc::spawn_to(&format!("rtmpdump player of {url}"), cmd, file)
}

/// Waits for `publisher` to finish (at most `within`) with success, then for `player` to stop
/// by itself (at most [`PLAYER_TAIL`]); `what` names the run in the failure messages.
pub fn wait_publisher_then_player(
    publisher: &mut Proc,
    player: &mut Proc,
    within: Duration,
    what: &str,
) {
    let st = publisher
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{what}: the publisher did not finish within {within:?}"));
    assert!(
        st.success(),
        "{what}: the publisher failed: {}",
        publisher.log()
    );
    assert!(
        player.wait_timeout(PLAYER_TAIL).is_some(),
        "{what}: the player did not stop within {PLAYER_TAIL:?} after the publisher left"
    );
}

/// The duration of a media file in seconds (ffprobe), if it can be read.
pub fn media_seconds(file: &Path) -> Option<f64> {
    let mut cmd = Command::new(&peers().ffprobe);
    cmd.args([
        "-v",
        "error",
        "-show_entries",
        "format=duration",
        "-of",
        "csv=p=0",
    ])
    .arg(file);
    let (status, out, _) = run_capture(&mut cmd, Duration::from_secs(20));
    if !status.is_some_and(|s| s.success()) {
        return None;
    }
    String::from_utf8_lossy(&out).trim().parse().ok()
}

/// One packet of a media file, as `ffmpeg -f framemd5` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// "video" or "audio" (from the framemd5 header), so files whose streams were found in a
    /// different order still compare.
    pub media: String,
    pub stream: u32,
    pub dts: i64,
    pub size: u64,
    pub hash: String,
}

/// The packets of `file` (`ffmpeg -i FILE -c copy -f framemd5 -`). A missing or unreadable
/// file gives no packets (the comparison then says so).
pub fn framemd5(file: &Path) -> Vec<Frame> {
    if !file.exists() {
        eprintln!("framemd5: {} does not exist", file.display());
        return Vec::new();
    }
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
        .arg(file)
        .args(["-c", "copy", "-f", "framemd5", "-"]);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(60));
    if !status.is_some_and(|s| s.success()) {
        eprintln!(
            "framemd5 of {} ended with {status:?}: {}",
            file.display(),
            String::from_utf8_lossy(&err).trim()
        );
    }
    parse_framemd5(&String::from_utf8_lossy(&out))
}

/// Parses framemd5 text: `#media_type N: video` headers, then
/// `stream, dts, pts, duration, size, hash` lines.
pub fn parse_framemd5(text: &str) -> Vec<Frame> {
    let mut media: BTreeMap<u32, String> = BTreeMap::new();
    let mut frames = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#media_type ") {
            if let Some((idx, kind)) = rest.split_once(':') {
                if let Ok(i) = idx.trim().parse() {
                    media.insert(i, kind.trim().to_string());
                }
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 6 {
            continue;
        }
        let (Ok(stream), Ok(dts), Ok(size)) = (f[0].parse(), f[1].parse(), f[4].parse()) else {
            continue;
        };
        frames.push(Frame {
            media: media
                .get(&stream)
                .cloned()
                .unwrap_or_else(|| format!("stream{stream}")),
            stream,
            dts,
            size,
            hash: f[5].to_string(),
        });
    }
    frames
}

/// How a received file compares with its source.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Per media type: (received packets that match, source packets, index in the source where
    /// the run starts).
    pub streams: BTreeMap<String, (usize, usize, usize)>,
    /// Matching packets over source packets, all streams together.
    pub fraction: f64,
    /// True if the last received packet was cut short (allowed, not counted as matching).
    pub cut_last: bool,
    /// Per media type: how much of the source's end is missing after the last matching
    /// packet, in ms of dts (FLV's time base is 1/1000).
    pub tail_ms: BTreeMap<String, i64>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}% of the source", self.fraction * 100.0)?;
        for (media, (got, of, start)) in &self.streams {
            let tail = self.tail_ms.get(media).copied().unwrap_or(0);
            write!(
                f,
                "; {media} {got}/{of} from #{start}, {tail} ms short of the end"
            )?;
        }
        if self.cut_last {
            write!(f, "; last packet cut short")?;
        }
        Ok(())
    }
}

impl RunReport {
    /// The index in the source where the received `media` ("video", "audio") packets start.
    pub fn start(&self, media: &str) -> Option<usize> {
        self.streams.get(media).map(|s| s.2)
    }
}

/// How many of `frames` are `media` ("video", "audio") packets.
pub fn count_media(frames: &[Frame], media: &str) -> usize {
    frames.iter().filter(|f| f.media == media).count()
}

/// Asserts that, for each stream, the received packets are one contiguous run of the source's
/// packets (same payload hashes, in order, nothing skipped or repeated), allowing only the
/// very last received packet to be cut short; and that at least `min_fraction` of the source
/// arrived. Prints the figures, labelled with `what`, and returns them.
pub fn assert_contiguous_run(
    what: &str,
    src: &[Frame],
    got: &[Frame],
    min_fraction: f64,
) -> RunReport {
    let report = match contiguous_run(src, got) {
        Ok(r) => r,
        Err(e) => panic!("{what}: received packets are not a contiguous run of the source: {e}"),
    };
    eprintln!("{what}: {report}");
    assert!(
        report.fraction >= min_fraction,
        "{what}: received {:.1}% of the source, below the expected {:.1}% ({report})",
        report.fraction * 100.0,
        min_fraction * 100.0
    );
    report
}

/// The README's "frames": for each stream, the received packets are one contiguous run of the
/// source's that starts at its first packet (the players start before the publisher, so a
/// late start is a loss) and ends at most `max_tail_ms` before its last packet (the same
/// player's shortfall straight from nginx-rtmp, see [`PlayerKind::max_tail_ms`]).
pub fn assert_whole_run(what: &str, src: &[Frame], got: &[Frame], max_tail_ms: i64) -> RunReport {
    let report = assert_contiguous_run(what, src, got, 0.0);
    for (media, (_, _, start)) in &report.streams {
        assert_eq!(
            *start, 0,
            "{what}: the {media} run starts at source packet #{start}, not the first ({report})"
        );
        let tail = report.tail_ms.get(media).copied().unwrap_or(0);
        assert!(
            tail <= max_tail_ms,
            "{what}: the {media} run ends {tail} ms before the source's end, more than the \
             {max_tail_ms} ms allowed for this player ({report})"
        );
    }
    report
}

/// Asserts a player during an attack got a contiguous run of `want` that starts at the first
/// video frame and holds at least 85% of the video frames; `what` names the player in failures.
pub fn assert_attack_run(want: &[Frame], got: &[Frame], what: &str, log: &str) {
    let run = contiguous_run(want, got).unwrap_or_else(|e| panic!("{what}: {e}; {log}"));
    eprintln!("{what}: {run}");
    assert_eq!(run.start("video"), Some(0), "{what} missed the start");
    assert!(
        count_media(got, "video") * 100 >= count_media(want, "video") * 85,
        "{what} got {} of {} video frames",
        count_media(got, "video"),
        count_media(want, "video")
    );
}

/// The comparison behind [`assert_contiguous_run`], without the assertions.
pub fn contiguous_run(src: &[Frame], got: &[Frame]) -> Result<RunReport, String> {
    if got.is_empty() {
        return Err(format!(
            "nothing received (source has {} packets)",
            src.len()
        ));
    }
    let by_media = |frames: &[Frame]| {
        let mut m: BTreeMap<String, Vec<Frame>> = BTreeMap::new();
        for f in frames {
            m.entry(f.media.clone()).or_default().push(f.clone());
        }
        m
    };
    let src_m = by_media(src);
    let mut got_m = by_media(got);
    let last = got.last().cloned();

    let mut streams = BTreeMap::new();
    let mut tail_ms = BTreeMap::new();
    let mut cut_last = false;
    for (media, s) in &src_m {
        let Some(g) = got_m.get_mut(media) else {
            return Err(format!("no {media} packets received"));
        };
        let start = match find_run(s, g) {
            Some(k) => k,
            None => {
                // The last packet of the whole file may be cut short: retry without it.
                let is_last =
                    g.last().map(|f| (&f.hash, f.dts)) == last.as_ref().map(|f| (&f.hash, f.dts));
                let k = if is_last && g.len() > 1 {
                    let mut shorter = g.clone();
                    shorter.pop();
                    find_run(s, &shorter)
                } else {
                    None
                };
                match k {
                    Some(k) => {
                        g.pop();
                        cut_last = true;
                        k
                    }
                    None => return Err(describe_mismatch(media, s, g)),
                }
            }
        };
        let last_matched = (start + g.len()).checked_sub(1).and_then(|i| s.get(i));
        let tail = match (s.last(), last_matched) {
            (Some(end), Some(last)) => end.dts - last.dts,
            _ => 0,
        };
        tail_ms.insert(media.clone(), tail);
        streams.insert(media.clone(), (g.len(), s.len(), start));
    }
    if let Some(extra) = got_m.keys().find(|m| !src_m.contains_key(*m)) {
        return Err(format!(
            "received a {extra} stream the source does not have"
        ));
    }
    let matched: usize = streams.values().map(|v| v.0).sum();
    let total: usize = src_m.values().map(Vec::len).sum();
    Ok(RunReport {
        streams,
        fraction: if total == 0 {
            0.0
        } else {
            matched as f64 / total as f64
        },
        cut_last,
        tail_ms,
    })
}

/// The first source index where `got` matches as a contiguous run.
pub(crate) fn find_run(src: &[Frame], got: &[Frame]) -> Option<usize> {
    let first = got.first()?;
    (0..src.len()).find(|&k| {
        src[k].hash == first.hash
            && src.len() - k >= got.len()
            && src[k..k + got.len()]
                .iter()
                .zip(got)
                .all(|(a, b)| a.hash == b.hash)
    })
}

pub(crate) fn describe_mismatch(media: &str, src: &[Frame], got: &[Frame]) -> String {
    let Some(first) = got.first() else {
        return format!("no {media} packets received");
    };
    let Some(k) = src.iter().position(|f| f.hash == first.hash) else {
        return format!(
            "the first {media} packet received (dts {}, {} bytes) is not in the source",
            first.dts, first.size
        );
    };
    let same = src[k..]
        .iter()
        .zip(got)
        .take_while(|(a, b)| a.hash == b.hash)
        .count();
    match (src.get(k + same), got.get(same)) {
        (Some(want), Some(have)) => format!(
            "{media}: {same} packets match from source #{k}, then received #{same} (dts {}, {} \
             bytes) where the source has #{} (dts {}, {} bytes); received {} {media} packets",
            have.dts,
            have.size,
            k + same,
            want.dts,
            want.size,
            got.len()
        ),
        (None, Some(_)) => format!(
            "{media}: received {} packets, more than the source has after #{k}",
            got.len()
        ),
        _ => format!("{media}: mismatch after {same} packets from source #{k}"),
    }
}
