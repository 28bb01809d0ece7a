//! Recording (`[engine] record`) against real peers: ffmpeg publishes the test source through
//! the gateway and the recorded FLV holds every packet of it (framemd5), an `onMetaData` whose
//! `duration` ffprobe reports and whose keyframe index is the file's own keyframe tags (parsed
//! here), and seeks with `ffmpeg -ss` like the source; only the listed apps are recorded;
//! `record_max_secs` splits into files that join up; a record_dir that cannot be created, a
//! read-only one and a full disk (a 256 KiB tmpfs in a mount namespace, or
//! a file size limit where namespaces are not allowed) stop the recording with one log line
//! while a player gets every frame; and a gateway shut down mid-publish finalizes the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rtmpgate::rtmp::amf::AmfLimits;
use rtmpgate::rtmp::amf0::{self, Amf0Value};

fn gateway_with(builder: GatewayBuilder, record: &str, dir: &Path) -> Gateway {
    builder
        .config(&format!(
            "[engine]\nrecord = {record}\nrecord_dir = \"{}\"\n",
            dir.display()
        ))
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .start()
}

fn gateway(record: &str, dir: &Path) -> Gateway {
    gateway_with(Gateway::builder(), record, dir)
}

/// GET `path` from the admin listener (HTTP/1.0: the body ends with the connection).
fn http_get(gw: &Gateway, path: &str) -> String {
    let addr: SocketAddr = admin_addr(gw);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{path}: {body}"
    );
    body
}

/// The value of the sample `line` (`name{labels}`) in /metrics (None when absent).
fn metric(gw: &Gateway, line: &str) -> Option<f64> {
    http_get(gw, "/metrics")
        .lines()
        .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_ok(p: &mut Proc, within: Duration) {
    let st = p
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{} did not finish within {within:?}", p.name()));
    assert!(st.success(), "{} failed: {}", p.name(), p.log());
}

/// The files in `dir` whose names end with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits (at most 20 s: a finalize copies the file, ~1 MB here) for `dir` to hold finished
/// recordings only, and returns them.
fn finished_recordings(dir: &Path) -> Vec<PathBuf> {
    let done = wait_until(Duration::from_secs(20), || {
        !files_ending(dir, ".flv").is_empty()
            && files_ending(dir, ".part").is_empty()
            && files_ending(dir, ".tmp").is_empty()
    });
    let all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(done, "no finished recording in {}: {all:?}", dir.display());
    files_ending(dir, ".flv")
}

/// One FLV tag as found in the file.
struct Tag {
    kind: u8,
    ts: u32,
    offset: u64,
    body: Vec<u8>,
}

/// Walks an FLV file tag by tag, checking every PreviousTagSize on the way.
fn flv_tags(data: &[u8]) -> Vec<Tag> {
    assert!(data.len() >= 13 && &data[..3] == b"FLV", "not an FLV file");
    let mut p = 13usize;
    let mut tags = Vec::new();
    while p < data.len() {
        assert!(p + 11 <= data.len(), "a tag header cut short at {p}");
        let len = u32::from_be_bytes([0, data[p + 1], data[p + 2], data[p + 3]]) as usize;
        let ts = u32::from_be_bytes([data[p + 7], data[p + 4], data[p + 5], data[p + 6]]);
        let end = p + 11 + len;
        assert!(end + 4 <= data.len(), "the tag at {p} runs past the end");
        let prev = u32::from_be_bytes(data[end..end + 4].try_into().unwrap()) as usize;
        assert_eq!(prev, 11 + len, "PreviousTagSize after the tag at {p}");
        tags.push(Tag {
            kind: data[p],
            ts,
            offset: p as u64,
            body: data[p + 11..end].to_vec(),
        });
        p = end + 4;
    }
    tags
}

/// (seconds, file offset) of each H.264 keyframe tag with a picture (AVC NALU packets of
/// frame type 1; not the sequence header nor the end of sequence).
fn keyframe_tags(tags: &[Tag]) -> Vec<(f64, u64)> {
    tags.iter()
        .filter(|t| t.kind == 9 && t.body.len() > 1 && t.body[0] == 0x17 && t.body[1] == 1)
        .map(|t| (f64::from(t.ts) / 1000.0, t.offset))
        .collect()
}

/// The first tag's onMetaData properties.
fn metadata(tags: &[Tag]) -> Vec<(String, Amf0Value)> {
    let first = tags.first().expect("an empty FLV file");
    assert_eq!(first.kind, 18, "the first tag is not a script tag");
    let v = amf0::decode_all(&first.body, &AmfLimits::default()).expect("onMetaData decodes");
    assert_eq!(v.first().and_then(|s| s.as_str()), Some("onMetaData"));
    match v.into_iter().nth(1) {
        Some(Amf0Value::EcmaArray(p)) | Some(Amf0Value::Object(p)) => p,
        other => panic!("onMetaData holds {other:?}"),
    }
}

fn prop<'a>(props: &'a [(String, Amf0Value)], key: &str) -> &'a Amf0Value {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("onMetaData has no {key}"))
}

fn numbers(v: &Amf0Value) -> Vec<f64> {
    match v {
        Amf0Value::StrictArray(items) => items.iter().map(|i| i.as_f64().unwrap()).collect(),
        other => panic!("not a strict array: {other:?}"),
    }
}

/// Asserts `file`'s onMetaData has a duration (the last tag's time) and a keyframe index that
/// is exactly the file's keyframe tags; returns the duration.
fn assert_seekable(file: &Path, min_keyframes: usize) -> f64 {
    let data = std::fs::read(file).unwrap();
    let tags = flv_tags(&data);
    let props = metadata(&tags);
    let duration = prop(&props, "duration").as_f64().unwrap();
    let last = tags.iter().map(|t| t.ts).max().unwrap();
    assert!(
        (duration - f64::from(last) / 1000.0).abs() < 0.0005,
        "duration {duration} s, last tag at {last} ms"
    );
    assert_eq!(
        prop(&props, "filesize").as_f64(),
        Some(data.len() as f64),
        "filesize"
    );
    let index = match prop(&props, "keyframes") {
        Amf0Value::Object(p) => p.clone(),
        other => panic!("keyframes is {other:?}"),
    };
    let times = numbers(prop(&index, "times"));
    let positions = numbers(prop(&index, "filepositions"));
    let want = keyframe_tags(&tags);
    assert!(
        want.len() >= min_keyframes,
        "only {} keyframes in {}",
        want.len(),
        file.display()
    );
    let got: Vec<(f64, u64)> = times
        .iter()
        .zip(&positions)
        .map(|(t, p)| (*t, *p as u64))
        .collect();
    assert_eq!(times.len(), positions.len());
    assert_eq!(
        got, want,
        "the keyframe index is not the file's keyframe tags"
    );
    eprintln!(
        "{}: {} bytes, duration {duration} s, {} keyframes indexed at {:?}",
        file.display(),
        data.len(),
        got.len(),
        got
    );
    duration
}

/// The packets `ffmpeg -ss AT -i FILE -c copy` gives (a seek with the demuxer's index).
fn seek_frames(file: &Path, at: &str) -> Vec<Frame> {
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-ss",
        at,
        "-i",
    ])
    .arg(file)
    .args(["-c", "copy", "-f", "framemd5", "-"]);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "ffmpeg -ss {at} -i {}: {}",
        file.display(),
        String::from_utf8_lossy(&err)
    );
    parse_framemd5(&String::from_utf8_lossy(&out))
}

#[test]
fn records_every_packet_with_duration_and_a_seekable_keyframe_index() {
    let rec = temp_dir();
    let gw = gateway("[\"live\", \"ev*\"]", rec.path());
    let src = source_flv(5);
    let want = framemd5(&src);
    let url = gw.url("rtmp");
    let mut recorded = publish(&peers().ffmpeg, &format!("{url}/live/s"), &src);
    let mut other = publish(&peers().ffmpeg, &format!("{url}/other/s"), &src);
    // While it runs the API lists it (and only it).
    let listed = wait_until(Duration::from_secs(15), || {
        http_get(&gw, "/api/v1/recordings").contains("\"stream\":\"live/s\"")
    });
    let api = http_get(&gw, "/api/v1/recordings");
    assert!(listed, "live/s is not listed: {api}");
    assert!(!api.contains("other/s"), "other/s is recorded: {api}");
    wait_ok(&mut recorded, Duration::from_secs(60));
    wait_ok(&mut other, Duration::from_secs(60));

    let files = finished_recordings(rec.path());
    assert_eq!(files.len(), 1, "one file for live/s only: {files:?}");
    let file = &files[0];
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("live_s_")
            && name.ends_with("Z.flv")
            && name.len() == "live_s_20261202T054808Z.flv".len(),
        "{name}"
    );

    // Every packet of the source, in order, with the source's timestamps.
    let got = framemd5(file);
    assert_whole_run("the recording", &want, &got, 0);
    assert_eq!(
        got, want,
        "the recording's packets differ from the source's"
    );

    // The metadata: duration and index, as ffprobe and the file's own tags say.
    let duration = assert_seekable(file, 5);
    let probed = media_seconds(file).expect("ffprobe reads the recording");
    assert!(
        (probed - duration).abs() < 0.0005,
        "ffprobe says {probed} s, the metadata {duration} s"
    );
    let src_secs = media_seconds(&src).unwrap();
    assert!(
        (probed - src_secs).abs() < 0.1,
        "{probed} s recorded of {src_secs} s"
    );

    // A seek lands where it lands in the source: on the same keyframe, then the same packets.
    for at in ["2.5", "4.2"] {
        let from_rec = seek_frames(file, at);
        let from_src = seek_frames(&src, at);
        assert!(
            !from_rec.is_empty() && count_media(&from_rec, "video") < count_media(&want, "video"),
            "-ss {at}: {} packets",
            from_rec.len()
        );
        assert_eq!(
            from_rec, from_src,
            "-ss {at} on the recording and on the source"
        );
    }

    assert_eq!(metric(&gw, "rtmpgate_record_files_total"), Some(1.0));
    assert_eq!(metric(&gw, "rtmpgate_record_started_total"), Some(1.0));
    assert_eq!(metric(&gw, "rtmpgate_record_active"), Some(0.0));
    assert_eq!(metric(&gw, "rtmpgate_record_skips_total"), Some(0.0));
    for stage in ["open", "write", "finalize"] {
        assert_eq!(
            metric(
                &gw,
                &format!("rtmpgate_record_failures_total{{stage=\"{stage}\"}}")
            ),
            Some(0.0)
        );
    }
    assert!(gw.expect_log("recording live/s: finished "), "{}", gw.log());
}

/// A player gets the whole stream (rtmpdump: every packet) while the recording of it fails.
fn play_while_recording_fails(gw: &Gateway) {
    let src = source_flv(5);
    let want = framemd5(&src);
    let out = temp_dir();
    let url = format!("{}/live/s", gw.url("rtmp"));
    let received = publish_and_play(
        out.path(),
        &peers().ffmpeg,
        &url,
        &src,
        &[(PlayerKind::Rtmpdump, url.clone())],
    );
    received[0].assert_run_of(&want);
}

#[test]
fn a_record_dir_that_cannot_be_created_stops_the_recording_not_the_stream() {
    // A path under a regular file: refused even to root (chmod is not, tests may run as root).
    let tmp = temp_dir();
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let gw = gateway("\"all\"", &blocker.join("rec"));
    play_while_recording_fails(&gw);
    let log = gw.log();
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("recording live/s stopped: "))
            .unwrap_or("no `stopped` line")
    );
    assert_eq!(gw.count_log("recording live/s stopped: "), 1, "{log}");
    assert!(
        log.contains("creating the directory")
            && log.contains("Not a directory")
            && log.contains("engine.record_dir must be a directory"),
        "the log does not say what failed, where and what to do:\n{log}"
    );
    assert_eq!(
        metric(&gw, "rtmpgate_record_failures_total{stage=\"open\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&gw, "rtmpgate_record_active"), Some(0.0));
}

#[test]
fn a_read_only_record_dir_stops_the_recording_not_the_stream() {
    // Read-only for root too: a read-only bind mount of the directory onto itself, in a
    // user+mount namespace of the gateway's own. Where namespaces are not allowed, a
    // directory without write permission does it for a non-root user; root, whom no mode
    // denies, gets the directory under a regular file instead (the test above).
    let rec = temp_dir();
    let dir = rec.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.display().to_string();
    let script = "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\"";
    let ns = |script: &str| -> Vec<String> {
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            &d,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let probe = ns(script);
    let namespaces = Command::new(&probe[0])
        .args(&probe[1..])
        .status()
        .is_ok_and(|s| s.success());
    let (builder, record_dir, error) = if namespaces {
        let wrap = ns(&format!("{script} && exec \"$@\""));
        let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
        (
            Gateway::builder().wrap(&wrap),
            dir.clone(),
            "Read-only file system",
        )
    } else if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        (Gateway::builder(), dir.clone(), "Permission denied")
    } else {
        eprintln!("root without namespaces: a directory under a regular file stands in");
        let blocker = rec.path().join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        (Gateway::builder(), blocker.join("rec"), "Not a directory")
    };
    let gw = gateway_with(builder, "\"all\"", &record_dir);
    play_while_recording_fails(&gw);
    let log = gw.log();
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("recording live/s stopped: "))
            .unwrap_or("no `stopped` line")
    );
    assert_eq!(gw.count_log("recording live/s stopped: "), 1, "{log}");
    assert!(
        log.contains(error) && log.contains("the stream goes on without recording"),
        "the log does not say what failed ({error}):\n{log}"
    );
    if error != "Not a directory" {
        assert!(
            log.contains("make engine.record_dir writable by the gateway's user"),
            "{log}"
        );
    }
    assert_eq!(
        metric(&gw, "rtmpgate_record_failures_total{stage=\"open\"}"),
        Some(1.0)
    );
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// How the disk-full test fills a disk: a 256 KiB tmpfs mounted in a mount namespace of the
/// gateway's own (a real ENOSPC), or, where user namespaces are not allowed, a 256 KiB file
/// size limit (EFBIG, the same write path).
fn full_disk_wrapper(dir: &Path) -> (Vec<String>, &'static str) {
    let mount = "mount -t tmpfs -o size=256k tmpfs \"$0\" && exec \"$@\"";
    let unshare = |script: &str| -> Vec<String> {
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            &dir.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let probe = unshare("mount -t tmpfs -o size=256k tmpfs \"$0\"");
    let works = Command::new(&probe[0])
        .args(&probe[1..])
        .status()
        .is_ok_and(|s| s.success());
    if works {
        (unshare(mount), "No space left on device")
    } else {
        eprintln!(
            "user namespaces are not allowed here: a file size limit stands in for a full disk"
        );
        (
            vec!["prlimit".into(), "--fsize=262144".into()],
            "File too large",
        )
    }
}

#[test]
fn a_full_disk_stops_the_recording_not_the_stream() {
    let rec = temp_dir();
    let (wrap, error) = full_disk_wrapper(rec.path());
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let gw = gateway_with(Gateway::builder().wrap(&wrap), "\"all\"", rec.path());
    play_while_recording_fails(&gw);
    let log = gw.log();
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("recording live/s stopped: "))
            .unwrap_or("no `stopped` line")
    );
    assert_eq!(gw.count_log("recording live/s stopped: "), 1, "{log}");
    assert!(
        log.contains("recording live/s stopped: writing ")
            && log.contains(error)
            && log.contains("the stream goes on without recording"),
        "the log does not say what failed, where and what to do:\n{log}"
    );
    assert_eq!(
        metric(&gw, "rtmpgate_record_failures_total{stage=\"write\"}"),
        Some(1.0)
    );
    // It failed while writing (the file was created), within the disk's 256 KiB (a batch
    // that fits is counted; on a loaded machine the first batch may already not fit).
    let bytes = metric(&gw, "rtmpgate_record_bytes_total").unwrap_or(0.0);
    assert!(bytes < 262_144.0, "{bytes} bytes recorded");
    assert_eq!(metric(&gw, "rtmpgate_record_active"), Some(0.0));
}

#[test]
fn shutting_down_mid_publish_finalizes_the_recording() {
    let rec = temp_dir();
    let gw_builder = Gateway::builder().args(&["--drain-secs", "1"]);
    let mut gw = gateway_with(gw_builder, "\"all\"", rec.path());
    let src = source_flv(20);
    let want = framemd5(&src);
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/live/s", gw.url("rtmp")), &src);
    // Three keyframes at least (one a second) before the gateway is stopped.
    let recording = wait_until(Duration::from_secs(20), || {
        http_get(&gw, "/api/v1/recordings").contains("\"keyframes\":3")
    });
    assert!(recording, "{}", http_get(&gw, "/api/v1/recordings"));
    let stopped = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(40));
    assert!(status.is_some(), "the gateway did not exit: {}", gw.log());
    eprintln!(
        "exited {:.1} s after SIGTERM",
        stopped.elapsed().as_secs_f64()
    );
    publisher.kill();
    let log = gw.log();
    assert!(log.contains("finalizing 1 recording(s)"), "{log}");
    let files = finished_recordings(rec.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let duration = assert_seekable(&files[0], 3);
    assert!((2.0..20.0).contains(&duration), "{duration} s");
    // What was recorded is the source from its start, packet for packet.
    let got = framemd5(&files[0]);
    let run = assert_contiguous_run("the recording", &want, &got, 0.1);
    for media in ["video", "audio"] {
        assert_eq!(run.start(media), Some(0), "{media}: {run}");
    }
}

#[test]
fn record_max_secs_splits_at_keyframes_into_files_that_join_up() {
    let rec = temp_dir();
    let gw = Gateway::builder()
        .config(&format!(
            "[engine]\nrecord = \"all\"\nrecord_dir = \"{}\"\nrecord_max_secs = 2\n",
            rec.path().display()
        ))
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .start();
    let src = source_flv(5);
    let want = framemd5(&src);
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/live/s", gw.url("rtmp")), &src);
    wait_ok(&mut publisher, Duration::from_secs(60));
    let files = finished_recordings(rec.path());
    // Keyframes every second: files start at 0, 2 and 4 s (the names sort by start time, and
    // two files started within the same second would be named _2, which sorts after).
    assert_eq!(files.len(), 3, "{files:?}\n{}", gw.log());
    let mut next: Option<(usize, usize)> = None;
    let mut total = (0, 0);
    for f in &files {
        let duration = assert_seekable(f, 1);
        assert!(duration <= 2.1, "{}: {duration} s", f.display());
        // Each file is a run of the source from a keyframe, starting where the last ended
        // (audio that arrived before the keyframe stays in the previous file).
        let got = framemd5(f);
        let run = assert_contiguous_run(&f.display().to_string(), &want, &got, 0.0);
        let (v, a) = (count_media(&got, "video"), count_media(&got, "audio"));
        if let Some((nv, na)) = next {
            assert_eq!(run.start("video"), Some(nv), "{}: video", f.display());
            assert_eq!(run.start("audio"), Some(na), "{}: audio", f.display());
        }
        let (sv, sa) = (run.start("video").unwrap(), run.start("audio").unwrap());
        next = Some((sv + v, sa + a));
        total = (total.0 + v, total.1 + a);
    }
    assert_eq!(
        total,
        (count_media(&want, "video"), count_media(&want, "audio")),
        "the files together hold the source"
    );
    assert_eq!(metric(&gw, "rtmpgate_record_files_total"), Some(3.0));
    assert_eq!(metric(&gw, "rtmpgate_record_started_total"), Some(1.0));
}
