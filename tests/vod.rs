//! On-demand playback from `[engine] vod_dir` with real peers: ffmpeg and rtmpdump play a
//! file whole (frame by frame, at the file's pace), rtmpdump `--start` seeks (through the
//! onMetaData keyframe index and without one), a raw client on the proto crate's
//! `ClientSession` checks getStreamLength, the status sequence, pause, seek and the end,
//! and names that try to leave the directory and malformed files are refused.
//!
//! Margins (the machine may be a loaded 2-core CI box): the pace bound is a lower bound
//! only (a burst would finish in well under a second; load only makes a play slower), and
//! every wait is bounded by a timeout far above what the step needs.

// Test code may panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::chunk::{ChunkDecoder, ChunkLimits};
use rtmpgate::rtmp::handshake::{ClientHandshake, S0S1S2_LEN};
use rtmpgate::rtmp::message::{Control, UserControl, AUDIO, VIDEO};
use rtmpgate::rtmp::session::client::Call;
use rtmpgate::rtmp::session::{ClientConfig, ClientEvent, ClientSession};

/// Seconds of the test clip (a keyframe every second: testsrc2 at 30 fps, `-g 30`).
const CLIP_SECS: u32 = 8;
/// How far ahead of its timestamp the engine sends a tag (`engine::vod::LEAD`).
const LEAD_SECS: f64 = 1.0;

/// A gateway serving a VOD directory with the clip (no index), the clip remuxed with an
/// onMetaData keyframe index, a truncated copy, a file with an absurd tag size, and links
/// pointing out of the directory.
struct Vod {
    gw: Gateway,
    _dir: TempDir,
    _outside: TempDir,
    src: std::path::PathBuf,
}

impl Vod {
    fn start() -> Vod {
        let dir = temp_dir();
        let src = source_flv(CLIP_SECS);
        std::fs::copy(&src, dir.path().join("clip.flv")).unwrap();
        let mut remux = Command::new(&peers().ffmpeg);
        remux
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i"])
            .arg(&src)
            .args(["-c", "copy", "-flvflags", "add_keyframe_index", "-f", "flv"])
            .arg(dir.path().join("indexed.flv"));
        run_ok(&mut remux, Duration::from_secs(60));
        let bytes = std::fs::read(&src).unwrap();
        // About two seconds of media, cut in the middle of a tag.
        std::fs::write(dir.path().join("trunc.flv"), &bytes[..bytes.len() / 4 + 7]).unwrap();
        // A valid header, then a tag declaring 16 MiB - 1 (over max_vod_tag_bytes).
        let mut huge = bytes[..13].to_vec();
        huge.extend_from_slice(&[9, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x17, 1]);
        std::fs::write(dir.path().join("huge.flv"), huge).unwrap();
        std::fs::write(dir.path().join("notflv.flv"), b"GIF89a not a video").unwrap();
        let outside = temp_dir();
        std::fs::copy(&src, outside.path().join("secret.flv")).unwrap();
        symlink(
            outside.path().join("secret.flv"),
            dir.path().join("link.flv"),
        )
        .unwrap();
        symlink(outside.path(), dir.path().join("out")).unwrap();
        let gw = Gateway::builder()
            .args(&["--listen", "rtmp://127.0.0.1:0"])
            .config(&format!(
                "[engine]\nvod_dir = \"{}\"\n",
                dir.path().display()
            ))
            .start();
        Vod {
            gw,
            _dir: dir,
            _outside: outside,
            src,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/vod/{path}", self.gw.url("rtmp"))
    }

    fn addr(&self) -> SocketAddr {
        self.gw.addr("rtmp")
    }
}

/// The source's video packets in order: (dts in ms, keyframe), from ffprobe. FLV's dts is
/// the tag timestamp the engine seeks by (framemd5 may shift its dts; its order is this).
fn video_packets(file: &std::path::Path) -> Vec<(i64, bool)> {
    let mut cmd = Command::new(&peers().ffprobe);
    cmd.args(["-v", "error", "-select_streams", "v", "-show_entries"])
        .args(["packet=dts,flags", "-of", "csv=p=0"])
        .arg(file);
    let out = run_ok(&mut cmd, Duration::from_secs(30));
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| Some((l.split(',').next()?.trim().parse().ok()?, l.contains('K'))))
        .collect()
}

/// The index among `video_packets` and the dts of the last keyframe at or before `ms`.
fn keyframe_at_or_before(file: &std::path::Path, ms: i64) -> (usize, i64) {
    video_packets(file)
        .iter()
        .enumerate()
        .filter(|(_, (dts, key))| *key && *dts <= ms)
        .map(|(i, (dts, _))| (i, *dts))
        .next_back()
        .expect("a keyframe at or before the seek point")
}

/// Waits for `p` to exit (at most `within`); its exit status and when it exited.
fn finish(p: &mut Proc, within: Duration) -> (std::process::ExitStatus, Instant) {
    let st = p
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{} did not finish within {within:?}: {}", p.name(), p.log()));
    (st, Instant::now())
}

#[test]
fn ffmpeg_and_rtmpdump_play_a_file_whole_at_its_pace() {
    let v = Vod::start();
    let src = framemd5(&v.src);
    let out = temp_dir();
    let (ff_out, rd_out) = (out.path().join("ff.flv"), out.path().join("rd.flv"));
    let t0 = Instant::now();
    // ffmpeg and rtmpdump both strip ".flv" and play "clip": the bare name finds the file.
    let mut ff = play_ffmpeg(&v.url("clip.flv"), &ff_out);
    // Not `-v` (live): as a VOD download, so rtmpdump waits for the end of the file.
    let mut rd = {
        let mut cmd = Command::new(&peers().rtmpdump);
        cmd.args(["-m", &PLAYER_IDLE_SECS.to_string(), "-r"])
            .arg(v.url("clip.flv"))
            .arg("-o")
            .arg(&rd_out);
        Proc::spawn("rtmpdump player of clip.flv", cmd)
    };
    let limit = Duration::from_secs(60);
    let (ff_st, ff_end) = finish(&mut ff, limit);
    let (rd_st, rd_end) = finish(&mut rd, limit);
    assert!(ff_st.success(), "ffmpeg failed: {}", ff.log());
    // rtmpdump exits 2 ("may be incomplete") when the last timestamp is under 99.9% of
    // onMetaData's duration (here 8.00 of 8.03 s: the duration counts the last frame's
    // length): its own heuristic. What it wrote is checked frame by frame below.
    assert!(
        matches!(rd_st.code(), Some(0) | Some(2)),
        "rtmpdump failed: {rd_st:?} {}",
        rd.log()
    );
    for (what, file, end) in [("ffmpeg", &ff_out, ff_end), ("rtmpdump", &rd_out, rd_end)] {
        assert_whole_run(what, &src, &framemd5(file), 0);
        // Real time, give or take the lead: a burst would take well under a second. The
        // margin (1 s) only covers the players' own start; load makes a play slower.
        let took = end.duration_since(t0).as_secs_f64();
        let floor = f64::from(CLIP_SECS) - LEAD_SECS - 1.0;
        eprintln!("{what}: {CLIP_SECS} s file played in {took:.2} s");
        assert!(
            took >= floor,
            "{what}: played {CLIP_SECS} s in {took:.2} s (< {floor} s)"
        );
    }
    // ffprobe's duration comes from getStreamLength and onMetaData.
    let d = media_seconds(std::path::Path::new(&v.url("clip"))).expect("ffprobe duration");
    assert!((d - f64::from(CLIP_SECS)).abs() < 0.2, "duration {d}");
    assert!(v.gw.expect_log("play vod/clip (file "), "{}", v.gw.log());
    assert!(v.gw.expect_log("reached the end"), "{}", v.gw.log());
}

#[test]
fn rtmpdump_start_seeks_to_the_keyframe_at_or_before() {
    let v = Vod::start();
    let src = framemd5(&v.src);
    let at_ms = 5_500;
    let (want, key) = keyframe_at_or_before(&v.src, at_ms);
    let src_video: Vec<&Frame> = src.iter().filter(|f| f.media == "video").collect();
    let out = temp_dir();
    // clip.flv has no keyframe index (its tags are scanned); indexed.flv has one.
    let mut runs = Vec::new();
    for name in ["clip", "indexed"] {
        let file = out.path().join(format!("{name}.flv"));
        let mut cmd = Command::new(&peers().rtmpdump);
        // Not `-v`: rtmpdump ignores --start for a live stream.
        cmd.args(["-m", &PLAYER_IDLE_SECS.to_string(), "-r"])
            .arg(v.url(name))
            .args(["--start", &(at_ms as f64 / 1000.0).to_string(), "-o"])
            .arg(&file);
        runs.push((
            name,
            file,
            Proc::spawn(&format!("rtmpdump --start of {name}"), cmd),
        ));
    }
    for (name, file, mut p) in runs {
        let (st, _) = finish(&mut p, Duration::from_secs(60));
        assert!(
            matches!(st.code(), Some(0) | Some(2)),
            "{name}: {st:?} {}",
            p.log()
        );
        let got = framemd5(&file);
        let what = format!("rtmpdump --start {} of {name}", at_ms as f64 / 1000.0);
        let report = assert_contiguous_run(&what, &src, &got, 0.0);
        assert_eq!(
            report.start("video"),
            Some(want),
            "{what}: video must start at the keyframe at {key} ms ({report})"
        );
        assert_eq!(report.tail_ms.get("video"), Some(&0), "{what}: {report}");
        // Audio starts with the keyframe too (the first audio tag after it in the file),
        // compared on framemd5's own time line.
        let src_audio: Vec<&Frame> = src.iter().filter(|f| f.media == "audio").collect();
        let a0 = report
            .start("audio")
            .map(|i| src_audio[i].dts)
            .unwrap_or(-1);
        let v0 = src_video[want].dts;
        assert!(
            (a0 - v0).abs() <= 100,
            "{what}: audio starts at {a0} ms, video at {v0}"
        );
    }
    assert_eq!(v.gw.count_log("from 5500 ms"), 2, "{}", v.gw.log());
    // One through the index, one by scanning (the clip has none).
    for (name, how) in [
        ("clip", "a scan of its tags"),
        ("indexed", "the file's keyframe index"),
    ] {
        let line =
            format!("play vod/{name} (file) at 5500 ms: keyframe at {key} ms, found by {how}");
        assert!(v.gw.expect_log(&line), "{line} not in {}", v.gw.log());
    }
}

/// A raw RTMP client on one blocking socket (the proto crate's `ClientSession`).
struct Raw {
    sock: TcpStream,
    session: ClientSession,
    buf: BytesMut,
    /// Everything received, described, for failure messages.
    seen: Vec<String>,
}

/// Every wait of the raw client gives up after this long (a failure: steps take < 3 s).
const RAW_WAIT: Duration = Duration::from_secs(15);

impl Raw {
    fn connect(addr: SocketAddr, app: &str) -> Raw {
        let sock = TcpStream::connect_timeout(&addr, RAW_WAIT).unwrap();
        sock.set_nodelay(true).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut c = Raw {
            sock,
            session: ClientSession::new(
                ClientConfig::default(),
                ChunkDecoder::new(ChunkLimits::default()),
            ),
            buf: BytesMut::new(),
            seen: Vec::new(),
        };
        let hs = ClientHandshake::new(false);
        c.sock.write_all(&hs.c0c1()).unwrap();
        let mut s = vec![0u8; S0S1S2_LEN];
        c.sock.set_read_timeout(Some(RAW_WAIT)).unwrap();
        c.sock.read_exact(&mut s).unwrap();
        c.sock
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        c.sock.write_all(&hs.c2(&s).unwrap()).unwrap();
        c.session
            .connect(app, &format!("rtmp://{addr}/{app}"), Vec::new())
            .unwrap();
        c.flush();
        c.until("connect's _result", RAW_WAIT, |e| {
            matches!(
                e,
                ClientEvent::Reply {
                    call: Call::Connect,
                    ok: true,
                    ..
                }
            )
        });
        c
    }

    fn flush(&mut self) {
        if let Some(out) = self.session.take_output() {
            self.sock.write_all(&out).unwrap();
        }
    }

    /// The next event within `wait`, or None.
    fn next(&mut self, wait: Duration) -> Option<ClientEvent> {
        let deadline = Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(ev) = self.session.poll(&mut self.buf).unwrap() {
                self.flush();
                self.seen.push(ev.describe());
                return Some(ev);
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    /// Events until one matching `want` (returned last), within `wait`.
    fn until(
        &mut self,
        what: &str,
        wait: Duration,
        want: impl Fn(&ClientEvent) -> bool,
    ) -> Vec<ClientEvent> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(ev) = self.next(left) else {
                panic!("no {what} within {wait:?}; received: {:?}", self.tail());
            };
            let done = want(&ev);
            got.push(ev);
            if done {
                return got;
            }
        }
    }

    fn tail(&self) -> &[String] {
        &self.seen[self.seen.len().saturating_sub(40)..]
    }

    fn create_stream(&mut self) -> u32 {
        self.session.create_stream().unwrap();
        self.flush();
        match self
            .until("createStream's _result", RAW_WAIT, |e| {
                matches!(e, ClientEvent::StreamCreated { .. })
            })
            .pop()
        {
            Some(ClientEvent::StreamCreated { stream_id, .. }) => stream_id,
            other => panic!("{other:?}"),
        }
    }

    fn play(&mut self, sid: u32, name: &str, start: f64) {
        let args = [
            Amf0Value::Null,
            Amf0Value::string(name),
            Amf0Value::Number(start),
        ];
        self.session.notify(sid, "play", &args);
        self.flush();
    }

    fn status(&mut self, code: &str) -> Vec<ClientEvent> {
        let c = code.to_owned();
        self.until(
            code,
            RAW_WAIT,
            move |e| matches!(e, ClientEvent::Status { code, .. } if *code == c),
        )
    }
}

fn is_status(e: &ClientEvent, want: &str) -> bool {
    matches!(e, ClientEvent::Status { code, .. } if code == want)
}

fn media(e: &ClientEvent) -> Option<(u8, u32, u8)> {
    match e {
        ClientEvent::Media(m) if m.msg_type == AUDIO || m.msg_type == VIDEO => Some((
            m.msg_type,
            m.timestamp,
            m.payload.first().copied().unwrap_or(0),
        )),
        _ => None,
    }
}

#[test]
fn raw_client_length_status_sequence_pause_seek_and_end() {
    let v = Vod::start();
    let mut c = Raw::connect(v.addr(), "vod");

    // getStreamLength answers the file's duration (ffmpeg sends it before play).
    let txn = c
        .session
        .call(
            0,
            "getStreamLength",
            &[Amf0Value::Null, Amf0Value::string("clip")],
        )
        .unwrap();
    c.flush();
    let got = c.until(
        "getStreamLength's _result",
        RAW_WAIT,
        |e| matches!(e, ClientEvent::Reply { txn: t, .. } if *t == txn),
    );
    let secs = match got.last() {
        Some(ClientEvent::Reply {
            values, ok: true, ..
        }) => values.get(1).and_then(Amf0Value::as_f64),
        other => panic!("{other:?}"),
    };
    let secs = secs.expect("a length");
    assert!(
        (secs - f64::from(CLIP_SECS)).abs() < 0.2,
        "getStreamLength {secs}"
    );

    // play: StreamIsRecorded, StreamBegin, Play.Reset, Play.Start, |RtmpSampleAccess,
    // onMetaData, then media from the first keyframe.
    let sid = c.create_stream();
    c.play(sid, "flv:clip", -2.0);
    let got = c.until("the first video frame", RAW_WAIT, |e| {
        media(e).is_some_and(|m| m.0 == VIDEO)
    });
    let names: Vec<String> = got.iter().map(ClientEvent::describe).collect();
    let order = [
        format!("{:?}", UserControl::StreamIsRecorded(sid)),
        format!("{:?}", UserControl::StreamBegin(sid)),
        "onStatus NetStream.Play.Reset".into(),
        "onStatus NetStream.Play.Start".into(),
        "|RtmpSampleAccess".into(),
        "onMetaData".into(),
    ];
    let mut at = 0;
    for want in &order {
        at += names[at..]
            .iter()
            .position(|n| n == want)
            .unwrap_or_else(|| panic!("{want} missing or out of order in {names:?}"));
    }

    // About 1.5 s of media, then pause: after Pause.Notify, no media at all for 1.5 s.
    let t0 = Instant::now();
    let mut last_ts = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        if let Some(m) = c.next(Duration::from_millis(100)).as_ref().and_then(media) {
            last_ts = last_ts.max(m.1);
        }
    }
    c.session.notify(
        sid,
        "pause",
        &[
            Amf0Value::Null,
            Amf0Value::Boolean(true),
            Amf0Value::Number(f64::from(last_ts)),
        ],
    );
    c.flush();
    for e in c.status("NetStream.Pause.Notify") {
        if let Some(m) = media(&e) {
            last_ts = last_ts.max(m.1);
        }
    }
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(1500) {
        if let Some(e) = c.next(Duration::from_millis(100)) {
            assert!(media(&e).is_none(), "media while paused: {:?}", c.tail());
        }
    }
    // Unpause: media continues right after the last tag sent (no jump, no repeat).
    c.session.notify(
        sid,
        "pause",
        &[
            Amf0Value::Null,
            Amf0Value::Boolean(false),
            Amf0Value::Number(f64::from(last_ts)),
        ],
    );
    c.flush();
    c.status("NetStream.Unpause.Notify");
    let next = c.until("media after unpause", RAW_WAIT, |e| media(e).is_some());
    let first = next.iter().find_map(media).unwrap();
    assert!(
        first.1 >= last_ts && first.1 <= last_ts + 100,
        "resumed at {} ms after {last_ts} ms",
        first.1
    );

    // seek to 5.5 s: StreamEOF, StreamBegin, Seek.Notify, Play.Start, then video from the
    // keyframe at or before 5.5 s (every second in the clip: 5000 ms).
    let key = keyframe_at_or_before(&v.src, 5_500).1 as u32;
    c.session
        .notify(sid, "seek", &[Amf0Value::Null, Amf0Value::Number(5_500.0)]);
    c.flush();
    let got = c.status("NetStream.Seek.Notify");
    assert!(
        got.iter().any(|e| matches!(e, ClientEvent::Control(Control::UserControl(UserControl::StreamEof(s))) if *s == sid)),
        "no StreamEOF before Seek.Notify: {:?}",
        c.tail()
    );
    c.status("NetStream.Play.Start");
    let got = c.until("video after the seek", RAW_WAIT, |e| {
        media(e).is_some_and(|m| m.0 == VIDEO)
    });
    let video = got.iter().filter_map(media).find(|m| m.0 == VIDEO).unwrap();
    assert_eq!(
        video.1,
        key,
        "the first video after the seek: {:?}",
        c.tail()
    );
    assert_eq!(
        video.2 >> 4,
        1,
        "the first video after the seek is a keyframe"
    );
    assert!(
        got.iter().filter_map(media).all(|m| m.1 >= key),
        "media from before the seek point after Seek.Notify: {:?}",
        c.tail()
    );

    // The end (2.5 s of file left, less the lead): onPlayStatus Play.Complete, StreamEOF,
    // Play.Stop; the connection stays.
    let got = c.status("NetStream.Play.Stop");
    let names: Vec<String> = got.iter().map(ClientEvent::describe).collect();
    assert!(
        names
            .iter()
            .any(|n| n == "onPlayStatus NetStream.Play.Complete"),
        "{names:?}"
    );
    let last_media = got.iter().filter_map(media).map(|m| m.1).max().unwrap_or(0);
    assert!(
        last_media >= (CLIP_SECS - 1) * 1000,
        "ended at {last_media} ms"
    );
    c.session
        .call(
            0,
            "getStreamLength",
            &[Amf0Value::Null, Amf0Value::string("indexed")],
        )
        .unwrap();
    c.flush();
    c.until("a reply after the end", RAW_WAIT, |e| {
        matches!(e, ClientEvent::Reply { .. })
    });
}

#[test]
fn names_outside_the_directory_and_malformed_files_are_refused() {
    let v = Vod::start();
    let mut c = Raw::connect(v.addr(), "vod");
    let sid = c.create_stream();
    for name in [
        "../clip",
        "flv:../../etc/passwd",
        "sub/../clip",
        "flv:/etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "..%2fclip",
        "a\\..\\clip",
        "link",
        "out/secret",
        "flv:out/secret",
    ] {
        c.play(sid, name, -2.0);
        let got = c.until(name, RAW_WAIT, |e| matches!(e, ClientEvent::Status { .. }));
        assert!(
            is_status(got.last().unwrap(), "NetStream.Play.StreamNotFound"),
            "{name}: {:?}",
            c.tail()
        );
        assert!(got.iter().all(|e| media(e).is_none()), "{name}: media");
    }
    assert!(
        v.gw.wait_log(
            "only files inside the VOD directory are served",
            Duration::from_secs(5)
        ),
        "{}",
        v.gw.log()
    );
    // Named as a file but not there: StreamNotFound too (a bare unknown name waits for a
    // live publisher as before).
    c.play(sid, "missing.flv", -2.0);
    c.status("NetStream.Play.StreamNotFound");

    // Malformed files end that play with Play.Failed (and a line naming the file), never
    // the connection or the process.
    for (name, why) in [
        ("huge", "max_vod_tag_bytes"),
        ("notflv", "not an FLV file"),
        ("trunc", "truncated"),
    ] {
        c.play(sid, name, -2.0);
        let got = c.status("NetStream.Play.Failed");
        let desc = match got.last() {
            Some(ClientEvent::Status { description, .. }) => description.clone(),
            _ => String::new(),
        };
        assert!(desc.contains(why), "{name}: {desc}");
        if name == "trunc" {
            assert!(
                got.iter().filter_map(media).count() > 10,
                "{name}: no media before"
            );
        }
    }
    assert!(v.gw.expect_log("huge.flv"), "{}", v.gw.log());
    // Still serving: the same connection plays the good file.
    c.play(sid, "clip", -2.0);
    c.until("media", RAW_WAIT, |e| media(e).is_some());
}

/// `rtmpgate_memory_budget_used_bytes` from the admin listener.
fn budget_used(admin: SocketAddr) -> u64 {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "-m", "5", &format!("http://{admin}/metrics")]);
    let text = String::from_utf8_lossy(&run_ok(&mut cmd, Duration::from_secs(10))).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("rtmpgate_memory_budget_used_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or_else(|| panic!("no budget metric in {text}"), |v| v as u64)
}

#[test]
fn many_stalled_players_of_a_big_file_hold_bounded_charged_memory() {
    // 4 s of noise at about 2.7 MB/s: 11 MB a player if a file were loaded whole.
    let noise = noise_source_flv(4);
    let dir = temp_dir();
    std::fs::copy(&noise, dir.path().join("noise.flv")).unwrap();
    let file_len = std::fs::metadata(&noise).unwrap().len();
    let mut cmd = Command::new(&peers().ffprobe);
    cmd.args([
        "-v",
        "error",
        "-show_entries",
        "packet=size",
        "-of",
        "csv=p=0",
    ])
    .arg(&noise);
    let biggest: u64 = String::from_utf8_lossy(&run_ok(&mut cmd, Duration::from_secs(30)))
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .max()
        .unwrap();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[engine]\nvod_dir = \"{}\"\n",
            dir.path().display()
        ))
        .start();
    let admin = admin_addr(&gw);
    let addr = gw.addr("rtmp");
    let (used0, rss0) = (budget_used(admin), gw.rss_kb());
    const PLAYERS: usize = 20;
    // Players that play and then never read: their sockets fill, their sessions' writes
    // stall, and their readers must stop at the queue's bound.
    let mut stalled = Vec::new();
    for _ in 0..PLAYERS {
        let mut c = Raw::connect(addr, "vod");
        let sid = c.create_stream();
        c.play(sid, "noise", -2.0);
        c.status("NetStream.Play.Start");
        stalled.push(c);
    }
    // The whole file is due within 4 s (+1 s lead); give it 6 s.
    std::thread::sleep(Duration::from_secs(6));
    let (used, rss) = (budget_used(admin), gw.rss_kb());
    // Per player: the 64 KiB read buffer, one tag being read, 4 queued and 1 being written,
    // each at most `biggest` bytes (doubled: a tag is charged in the buffer and again once
    // queued). A whole-file load would be `file_len` per player.
    let per_player = 64 * 1024 + 2 * 6 * biggest;
    let bound = PLAYERS as u64 * per_player;
    let grew = used.saturating_sub(used0);
    let rss_grew = rss.saturating_sub(rss0) * 1024;
    eprintln!(
        "{PLAYERS} stalled players of a {file_len}-byte file (largest tag {biggest}): budget \
         +{grew} B (bound {bound}), RSS +{rss_grew} B"
    );
    assert!(
        grew > 0,
        "the readers' buffers are not charged to the budget"
    );
    assert!(
        grew <= bound,
        "charged {grew} B for {PLAYERS} players, over {bound}"
    );
    // RSS: the same bound plus 16 MiB of allocator and thread-stack slack; a whole-file
    // load would need PLAYERS x file_len.
    let rss_bound = bound + 16 * 1024 * 1024;
    assert!(
        rss_bound < PLAYERS as u64 * file_len,
        "the test could not tell the two apart"
    );
    assert!(
        rss_grew <= rss_bound,
        "RSS grew {rss_grew} B, over {rss_bound}"
    );
    drop(stalled);
    // Closed players return what they had charged.
    assert!(
        wait_until(Duration::from_secs(10), || budget_used(admin)
            <= used0 + 256 * 1024),
        "budget still at {} after the players left (was {used0})",
        budget_used(admin)
    );
}

/// Publishes synthetic H.264-shaped video on `APP/name` at 30 fps until `stop`: a sequence
/// header, then a keyframe every 15 frames; byte 5 of every frame is `mark`, so a player can
/// tell the renditions apart.
fn publish_marked(
    addr: SocketAddr,
    name: &'static str,
    mark: u8,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Raw::connect(addr, "vod");
        let sid = c.create_stream();
        c.session.publish(sid, name);
        c.flush();
        c.status("NetStream.Publish.Start");
        let header = bytes::Bytes::from(vec![0x17, 0, 0, 0, 0, mark, 1, 0x64, 0, 0x1f]);
        c.session.send_media(sid, VIDEO, 0, header);
        let t0 = Instant::now();
        let mut n: u32 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && t0.elapsed() < Duration::from_secs(60)
        {
            let head = if n % 15 == 0 { 0x17 } else { 0x27 };
            let mut body = vec![head, 1, 0, 0, 0, mark];
            body.extend_from_slice(&n.to_be_bytes());
            body.resize(200, mark);
            c.session.send_media(sid, VIDEO, n * 33, body.into());
            c.flush();
            n += 1;
            std::thread::sleep(Duration::from_millis(33));
        }
    })
}

/// Sends play2 with `transition: "switch"` to `name`.
fn switch_to(c: &mut Raw, sid: u32, name: &str, old: &str) {
    let opts = Amf0Value::object([
        ("streamName", Amf0Value::string(name)),
        ("oldStreamName", Amf0Value::string(old)),
        ("transition", Amf0Value::string("switch")),
        ("start", Amf0Value::Number(-2.0)),
        ("len", Amf0Value::Number(-1.0)),
        ("offset", Amf0Value::Number(0.0)),
    ]);
    c.session.notify(sid, "play2", &[Amf0Value::Null, opts]);
    c.flush();
}

/// After a switch: Play.Transition, then onPlayStatus TransitionComplete, then video that
/// starts with a keyframe; returns that first video payload's mark byte and the next 20's.
fn after_switch(c: &mut Raw, what: &str) -> Vec<(u8, u8)> {
    c.status("NetStream.Play.Transition");
    c.until("TransitionComplete", RAW_WAIT, |e| {
        matches!(e, ClientEvent::Data { values, .. }
            if values.first().and_then(Amf0Value::as_str) == Some("onPlayStatus")
                && values.get(1).and_then(|o| o.get("code")).and_then(Amf0Value::as_str)
                    == Some("NetStream.Play.TransitionComplete"))
    });
    let mut frames = Vec::new();
    while frames.len() < 20 {
        let Some(ev) = c.next(RAW_WAIT) else {
            panic!("{what}: video stopped after the switch: {:?}", c.tail());
        };
        if let ClientEvent::Media(m) = &ev {
            // Sequence headers (packet type 0) may come first; frames are what is checked.
            if m.msg_type == VIDEO && m.payload.get(1) == Some(&1) {
                frames.push((m.payload[0], m.payload.get(5).copied().unwrap_or(0)));
            }
        }
    }
    assert_eq!(
        frames[0].0, 0x17,
        "{what}: the first frame after TransitionComplete is not a keyframe: {frames:?}"
    );
    frames
}

#[test]
fn play2_switch_moves_a_player_between_renditions_at_a_keyframe() {
    let v = Vod::start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pubs = [
        publish_marked(v.addr(), "hi", b'H', stop.clone()),
        publish_marked(v.addr(), "lo", b'L', stop.clone()),
    ];
    let mut c = Raw::connect(v.addr(), "vod");
    let sid = c.create_stream();
    c.play(sid, "hi", -2.0);
    c.status("NetStream.Play.Start");
    c.until(
        "a frame of hi",
        RAW_WAIT,
        |e| matches!(e, ClientEvent::Media(m) if m.payload.get(5) == Some(&b'H')),
    );

    // Live to live: every frame after TransitionComplete is lo's, from a keyframe.
    switch_to(&mut c, sid, "lo", "hi");
    let frames = after_switch(&mut c, "hi -> lo");
    assert!(frames.iter().all(|f| f.1 == b'L'), "hi -> lo: {frames:?}");

    // Live to a VOD file: the file's frames (no mark) from a keyframe.
    switch_to(&mut c, sid, "clip", "lo");
    let frames = after_switch(&mut c, "lo -> clip");
    assert!(
        frames.iter().all(|f| f.1 != b'L' && f.1 != b'H'),
        "lo -> clip: {frames:?}"
    );

    // And back to live.
    switch_to(&mut c, sid, "hi", "clip");
    let frames = after_switch(&mut c, "clip -> hi");
    assert!(frames.iter().all(|f| f.1 == b'H'), "clip -> hi: {frames:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in pubs {
        p.join().unwrap();
    }
}
