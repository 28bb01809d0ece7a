//! Recording (`[engine] record`): every stream published to a recorded app is written to
//! one FLV file per publish in `record_dir`, and finalized with an `onMetaData` that holds
//! the duration and a keyframe index (`keyframes: { times, filepositions }`) so players
//! can seek.
//!
//! Off the data path: the recorder is one more subscriber of the hub, like a player. What
//! it has not written yet waits in the stream's bounded fan-out ring; a recorder that falls
//! out of the ring or more than `max_lag_bytes` behind (a slow disk) skips to the next
//! keyframe (counted), and the publisher never waits for it. File IO runs on tokio's
//! blocking threads, a batch at a time (at most [`BATCH_BYTES`], or what came within
//! [`BATCH_WAIT`]).
//!
//! Layout, and why a copy at the end: while recording, the tags go to `NAME.flv.part`
//! (an FLV header, the publisher's `onMetaData` when it came first, then the tags as they
//! come), which a player can read as it is should the process die. The keyframe index is
//! only known at the end, and its size grows with the recording, so it cannot be written
//! in place without reserving space for the largest index (hundreds of KiB in every file)
//! or rewriting the file. At the end the final file is written beside it as `NAME.flv.tmp`:
//! the FLV header, the new `onMetaData`, then the `.part`'s tags copied after its own head
//! (`std::io::copy`, which Linux does in the kernel with `copy_file_range`), synced, and
//! renamed to `NAME.flv`; then the `.part` is removed. A crash at any point leaves either
//! the `.part` (playable, no index) or the finished file, never a half-written `NAME.flv`.
//! The AMF0 numbers of the index are fixed-size doubles, so the head's length is known
//! before the offsets in it are filled in.
//!
//! Errors on disk (no space, a file size limit, permission, a read-only or missing
//! directory) stop that recording with one log line (what failed, where, what to do) and
//! `rtmpgate_record_failures_total{stage}`; the stream and the other recordings go on.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::flv::{self, TagKind};
use super::hub::{Event, Frame, FrameKind, Hub, Player, StreamKey};
use crate::limits::Limits;
use crate::rtmp::amf::AmfLimits;
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::message::{AUDIO, VIDEO};

/// Frame bytes gathered before a write is handed to a blocking thread.
pub const BATCH_BYTES: usize = 256 * 1024;
/// The longest a frame waits for its batch before it is written (a crash loses at most
/// this much of the recording, beyond what the OS had not flushed).
pub const BATCH_WAIT: Duration = Duration::from_millis(250);
/// Longest stream or app name part of a file name, in bytes (names are sanitized first).
pub const NAME_PART_MAX: usize = 64;
/// File names tried for one recording start when the first ones are taken.
const NAME_TRIES: u32 = 100;
/// How often a recorder that keeps falling behind says so (each skip is counted).
const SKIP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which apps are recorded (`record = "all"` or a list of names and `*` globs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordApps {
    All,
    /// App names, or globs with `*` (as `[[engine.push]]`'s `app`).
    Apps(Vec<String>),
}

impl RecordApps {
    pub fn matches(&self, app: &str) -> bool {
        match self {
            RecordApps::All => true,
            RecordApps::Apps(list) => list.iter().any(|p| super::restream::app_matches(p, app)),
        }
    }
}

/// `[engine] record*`: what is recorded, where, and when a file is split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSettings {
    pub apps: RecordApps,
    /// Where the files go (created at the first recording if missing).
    pub dir: PathBuf,
    /// A file is closed and the next started at the first keyframe past this many seconds
    /// (0: no split on time).
    pub max_secs: u64,
    /// ... or past this many bytes (0: no split on size).
    pub max_bytes: u64,
}

// ---------------------------------------------------------------------------------------
// Naming

/// `s` made safe as part of a file name: ASCII letters, digits, `-` and `_` kept, anything
/// else (path separators, dots, so no `..` and no hidden file, spaces, non-ASCII) becomes
/// `_`; at most [`NAME_PART_MAX`] bytes; never empty.
pub fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(NAME_PART_MAX)
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// `20261202T054800Z`: ISO 8601's basic format in UTC (no `:`, which some filesystems and
/// tools refuse), sortable as text.
pub fn utc_stamp(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (eras of 400 years, each
/// 146,097 days, with March as the first month so the leap day ends a year).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `APP_STREAM_STAMP` (+ `_N` for the N-th try when the name is taken), without extension.
pub fn file_stem(key: &StreamKey, unix_secs: u64, attempt: u32) -> String {
    let mut s = format!(
        "{}_{}_{}",
        sanitize(&key.app),
        sanitize(&key.name),
        utc_stamp(unix_secs)
    );
    if attempt > 0 {
        s.push_str(&format!("_{}", attempt + 1));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Registry: active recordings (admin API), counters (metrics), shutdown.

/// One recording as the admin API shows it.
struct RecInfo {
    stream: String,
    started_at: u64,
    /// The file being written now (its final name).
    file: Mutex<String>,
    bytes: AtomicU64,
    files: AtomicU64,
    keyframes: AtomicU64,
    skips: AtomicU64,
}

#[derive(Default)]
struct Totals {
    started: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
    skips: AtomicU64,
    fail_open: AtomicU64,
    fail_write: AtomicU64,
    fail_finalize: AtomicU64,
}

struct Registry {
    active: Mutex<BTreeMap<u64, Arc<RecInfo>>>,
    next_id: AtomicU64,
    /// Files being finalized by a task that has already left `active` (a split).
    finalizing: AtomicUsize,
    /// Notified whenever a recording or a finalize ends.
    idle: Notify,
    /// True once the gateway shuts down: every recording finalizes now.
    shutdown: watch::Sender<bool>,
    totals: Totals,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        active: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(1),
        finalizing: AtomicUsize::new(0),
        idle: Notify::new(),
        shutdown: watch::channel(false).0,
        totals: Totals::default(),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps a recording in the registry; removing it on drop wakes [`finish_all`].
struct Active(u64);

impl Drop for Active {
    fn drop(&mut self) {
        let r = registry();
        lock(&r.active).remove(&self.0);
        r.idle.notify_waiters();
    }
}

/// A finalize in flight (counted for [`finish_all`]).
struct Finalizing;

impl Finalizing {
    fn new() -> Finalizing {
        registry().finalizing.fetch_add(1, Ordering::Relaxed);
        Finalizing
    }
}

impl Drop for Finalizing {
    fn drop(&mut self) {
        let r = registry();
        r.finalizing.fetch_sub(1, Ordering::Relaxed);
        r.idle.notify_waiters();
    }
}

/// How long shutdown waits for the recordings to be finalized (each one copies its file).
pub const FINISH_WAIT: Duration = Duration::from_secs(30);

/// A write past the process's file size limit (`ulimit -f`, systemd's `LimitFSIZE`) raises
/// SIGXFSZ, whose default action ends the process: ignored, the write fails with EFBIG
/// instead and stops only that recording.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Gateway shutdown: every recording writes what the hub holds for it and finalizes; waits
/// (at most `within`) for them. Returns how many were still unfinished.
pub async fn finish_all(within: Duration) -> usize {
    let r = registry();
    r.shutdown.send_replace(true);
    let pending = || lock(&r.active).len() + r.finalizing.load(Ordering::Relaxed);
    let n = pending();
    if n == 0 {
        return 0;
    }
    info!(
        "finalizing {n} recording(s) (at most {} s)",
        within.as_secs()
    );
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let woken = r.idle.notified();
        let left = pending();
        if left == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            let left = pending();
            if left > 0 {
                warn!(
                    "{left} recording(s) not finalized within {} s; their .flv.part files are \
                     playable without a keyframe index",
                    within.as_secs()
                );
            }
            return left;
        }
    }
}

/// `rtmpgate_record_*` for `/metrics`.
pub fn encode_metrics(e: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
    use prometheus_client::encoding::NoLabelSet;
    use prometheus_client::metrics::MetricType;
    let r = registry();
    let t = &r.totals;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let active = i64::try_from(lock(&r.active).len()).unwrap_or(i64::MAX);
    e.encode_descriptor(
        "rtmpgate_record_active",
        "Streams being recorded right now.",
        None,
        MetricType::Gauge,
    )?
    .encode_gauge(&active)?;
    let counters: [(&str, &str, u64); 4] = [
        (
            "rtmpgate_record_started",
            "Recordings started (one per publish of a recorded app).",
            n(&t.started),
        ),
        (
            "rtmpgate_record_files",
            "Recorded files finalized (with duration and keyframe index).",
            n(&t.files),
        ),
        (
            "rtmpgate_record_bytes",
            "Bytes of tags written to recordings.",
            n(&t.bytes),
        ),
        (
            "rtmpgate_record_skips",
            "Times a recording fell behind (a slow disk) and skipped to the next keyframe.",
            n(&t.skips),
        ),
    ];
    for (name, help, v) in counters {
        e.encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    let mut d = e.encode_descriptor(
        "rtmpgate_record_failures",
        "Recordings stopped by a disk error, by stage (open: creating the file; write; finalize: writing the final file).",
        None,
        MetricType::Counter,
    )?;
    for (stage, v) in [
        ("open", n(&t.fail_open)),
        ("write", n(&t.fail_write)),
        ("finalize", n(&t.fail_finalize)),
    ] {
        d.encode_family(&[("stage", stage)])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// `GET /api/v1/recordings`: the recordings in progress and the totals.
pub fn snapshot() -> serde_json::Value {
    let r = registry();
    let now = unix_now();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let list: Vec<serde_json::Value> = lock(&r.active)
        .values()
        .map(|i| {
            serde_json::json!({
                "stream": i.stream,
                "file": *lock(&i.file),
                "started_at": i.started_at,
                "duration_secs": now.saturating_sub(i.started_at),
                "bytes": n(&i.bytes),
                "files": n(&i.files),
                "keyframes": n(&i.keyframes),
                "skips": n(&i.skips),
            })
        })
        .collect();
    let t = &r.totals;
    serde_json::json!({
        "recordings": list,
        "started": n(&t.started),
        "files": n(&t.files),
        "bytes": n(&t.bytes),
        "skips": n(&t.skips),
        "failures": {
            "open": n(&t.fail_open),
            "write": n(&t.fail_write),
            "finalize": n(&t.fail_finalize),
        },
    })
}

// ---------------------------------------------------------------------------------------
// The recorder task.

/// Held with a publish: dropping it (the publisher left, or was replaced) finalizes the
/// recording after what the hub already holds for it is written.
pub struct Recording {
    _stop: watch::Sender<()>,
}

/// Starts recording `key` (just published on `hub`) if its app is recorded. Call it right
/// after the publish took the key: the recorder subscribes here, before the first frame.
pub fn start(
    settings: Option<&Arc<RecordSettings>>,
    hub: &Arc<Hub>,
    limits: &Limits,
    key: &StreamKey,
) -> Option<Recording> {
    let settings = settings?;
    if !settings.apps.matches(&key.app) {
        return None;
    }
    let r = registry();
    if *r.shutdown.borrow() {
        return None;
    }
    let id = r.next_id.fetch_add(1, Ordering::Relaxed);
    let info = Arc::new(RecInfo {
        stream: key.to_string(),
        started_at: unix_now(),
        file: Mutex::new(String::new()),
        bytes: AtomicU64::new(0),
        files: AtomicU64::new(0),
        keyframes: AtomicU64::new(0),
        skips: AtomicU64::new(0),
    });
    lock(&r.active).insert(id, info.clone());
    r.totals.started.fetch_add(1, Ordering::Relaxed);
    let ctx = Ctx {
        key: key.clone(),
        settings: settings.clone(),
        max_keyframes: limits.max_record_keyframes.max(2),
        amf: limits.into(),
        max_lag: hub.config().max_lag_bytes,
        hub: hub.clone(),
        info,
    };
    let player = hub.play(key);
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::spawn(run(ctx, Active(id), player, stop_rx));
    Some(Recording { _stop: stop_tx })
}

struct Ctx {
    key: StreamKey,
    settings: Arc<RecordSettings>,
    max_keyframes: usize,
    amf: AmfLimits,
    max_lag: u64,
    /// To read the stream's current headers after a skip.
    hub: Arc<Hub>,
    info: Arc<RecInfo>,
}

/// The file being written, on the async side: what the finalize needs and where the next
/// tag lands (known without waiting for the write: every tag's size is known).
struct Current {
    /// None while a blocking write has it.
    out: Option<FileOut>,
    /// The stream timestamp that is 0 in this file.
    base_ts: u32,
    /// The largest file timestamp written.
    last_ts: u32,
    /// (file timestamp in ms, offset of the keyframe's tag in the `.part`).
    index: Vec<(u32, u64)>,
    head_meta: Option<Arc<Frame>>,
    has_audio: bool,
    has_video: bool,
    opened: Instant,
    /// Bytes of the `.part` once everything queued is written.
    pos: u64,
    /// Tags waiting for the next write.
    batch: Vec<Tag>,
    batch_bytes: usize,
    batch_since: Option<tokio::time::Instant>,
}

/// One tag waiting to be written.
struct Tag {
    kind: TagKind,
    /// On the file's timeline.
    ts: u32,
    body: bytes::Bytes,
    /// Holds the frame's charge on the memory budget until the tag is written.
    _frame: Arc<Frame>,
}

/// The recorder's position in the stream.
struct State {
    cur: Option<Current>,
    has_video: bool,
    /// Fell behind: waiting for a keyframe (audio only: the next audio frame).
    skipping: bool,
    last_skip_log: Option<Instant>,
    /// Frames were lost (the ring overtook the recorder): headers among them may have
    /// changed, so they are read again from the hub where the recording resumes.
    resync: bool,
    skips_unlogged: u64,
    /// The latest metadata and sequence headers: a split file starts with them.
    meta: Option<Arc<Frame>>,
    video_header: Option<Arc<Frame>>,
    audio_header: Option<Arc<Frame>>,
}

/// Why the recording loop ended.
enum End {
    /// The publisher left, was replaced, or the gateway shuts down: finalize.
    Finished,
    /// A disk error (already logged and counted): finalize what was written, if possible.
    Failed,
}

async fn run(ctx: Ctx, _active: Active, mut player: Player, mut stop: watch::Receiver<()>) {
    let mut shutdown = registry().shutdown.subscribe();
    let mut st = State {
        cur: None,
        has_video: player.has_video,
        skipping: player.live && player.has_video && !player.has_keyframe,
        last_skip_log: None,
        resync: false,
        skips_unlogged: 0,
        meta: None,
        video_header: None,
        audio_header: None,
    };
    info!("recording {} into {}", ctx.key, ctx.settings.dir.display());
    let end = 'run: {
        // Nothing was published before the subscription, normally; a replacing publisher's
        // recorder can find the hub's caches here.
        for f in std::mem::take(&mut player.start) {
            if !take_frame(&ctx, &mut st, &player, &f).await {
                break 'run End::Failed;
            }
        }
        loop {
            let flush_at = st
                .cur
                .as_ref()
                .and_then(|c| c.batch_since)
                .map(|t| t + BATCH_WAIT);
            let finished = tokio::select! {
                ev = player.rx.recv() => match on_event(&ctx, &mut st, &player, ev).await {
                    Step::Go => false,
                    Step::End => true,
                    Step::Failed => break 'run End::Failed,
                },
                () = sleep_until(flush_at) => {
                    if !write_batch(&ctx, &mut st).await {
                        break 'run End::Failed;
                    }
                    false
                }
                _ = stop.changed() => true,
                () = shutting_down(&mut shutdown) => true,
            };
            if finished {
                break;
            }
        }
        // The publisher left (or the gateway stops): what the ring still holds for us, up
        // to the end of this publish (bounded by the ring).
        loop {
            let ev = match player.rx.try_recv() {
                Ok(ev) => Ok(ev),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(_) => break,
            };
            match on_event(&ctx, &mut st, &player, ev).await {
                Step::Go => {}
                Step::End => break,
                Step::Failed => break 'run End::Failed,
            }
        }
        End::Finished
    };
    // Not a subscriber any more while the file is finalized.
    drop(player);
    match end {
        End::Finished => {
            if write_batch(&ctx, &mut st).await {
                if let Some(cur) = st.cur.take() {
                    finalize(&ctx, cur).await;
                }
            }
        }
        End::Failed => {}
    }
    info!("recording {} ended", ctx.key);
}

/// Completes once the gateway shuts down.
async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    let down = rx.wait_for(|s| *s).await.is_ok();
    if !down {
        // The registry's sender lives as long as the process: never here.
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Step {
    Go,
    /// The publish ended (Unpublished, a takeover's Published, or the ring closed).
    End,
    Failed,
}

async fn on_event(
    ctx: &Ctx,
    st: &mut State,
    player: &Player,
    ev: Result<Event, RecvError>,
) -> Step {
    match ev {
        Ok(Event::Frame(f)) => {
            if take_frame(ctx, st, player, &f).await {
                Step::Go
            } else {
                Step::Failed
            }
        }
        // A Published after ours: another publisher took the key over (it records itself).
        Ok(Event::Unpublished) | Ok(Event::Published) | Err(RecvError::Closed) => Step::End,
        Ok(Event::Filler) => Step::Go,
        Err(RecvError::Lagged(n)) => {
            skipped(ctx, st, &format!("fell {n} messages behind"));
            st.resync = true;
            Step::Go
        }
    }
}

/// Counts a skip (and logs it, at most once per [`SKIP_LOG_EVERY`]).
fn skipped(ctx: &Ctx, st: &mut State, why: &str) {
    if st.skipping {
        return;
    }
    st.skipping = true;
    ctx.info.skips.fetch_add(1, Ordering::Relaxed);
    registry().totals.skips.fetch_add(1, Ordering::Relaxed);
    st.skips_unlogged += 1;
    if st
        .last_skip_log
        .map_or(true, |t| t.elapsed() >= SKIP_LOG_EVERY)
    {
        warn!(
            "recording {}: {why} (the disk is slower than the stream); skipping to the next \
             keyframe ({} skip(s) since the last line; rtmpgate_record_skips_total)",
            ctx.key, st.skips_unlogged
        );
        st.last_skip_log = Some(Instant::now());
        st.skips_unlogged = 0;
    }
}

/// The FLV tag of a hub frame: its kind and body (None: nothing FLV can carry).
fn tag_of(f: &Frame) -> Option<(TagKind, bytes::Bytes)> {
    let kind = TagKind::from_msg_type(f.msg_type)?;
    let body = match kind {
        TagKind::Script => flv::script_body(&f.payload),
        _ => f.payload.clone(),
    };
    // RTMP's own length field is 24 bits too: never over, but not written if it were.
    (body.len() <= flv::MAX_BODY_LEN).then_some((kind, body))
}

/// A keyframe a player can start decoding at: what the index lists. The hub's `VideoKey`
/// also covers a keyframe-flagged end of sequence (AVC packet type 2, which ffmpeg sends
/// last; enhanced RTMP's SequenceEnd), which holds no picture: a seek to it finds nothing.
fn is_seek_point(f: &Frame) -> bool {
    if f.kind != FrameKind::VideoKey {
        return false;
    }
    let p = &f.payload;
    let Some(&b0) = p.first() else {
        return false;
    };
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: CodedFrames (1) or CodedFramesX (3).
        return matches!(b0 & 0x0f, 1 | 3);
    }
    // AVC and the legacy HEVC/AV1 ids: NALU packets (1) only; other codecs have no type.
    !matches!(b0 & 0x0f, 7 | 12 | 13) || p.get(1) == Some(&1)
}

/// After lost frames, at the keyframe the recording resumes at: the stream's metadata and
/// sequence headers as the hub has them now (a new one may have been among the lost
/// frames: an encoder changing resolution), queued before the keyframe where they differ
/// from the last ones recorded. A subscription taken and dropped at once (rare: a skip).
fn resync_headers(ctx: &Ctx, st: &mut State, ts: u32) {
    let now = ctx.hub.play(&ctx.key);
    for h in now.start.iter().filter(|f| f.kind.is_header()) {
        let last = match h.kind {
            FrameKind::Meta => &mut st.meta,
            FrameKind::VideoHeader => &mut st.video_header,
            _ => &mut st.audio_header,
        };
        if last.as_ref().is_some_and(|l| l.payload == h.payload) {
            continue;
        }
        *last = Some(h.clone());
        if let (Some(cur), Some(tag)) = (st.cur.as_ref(), tag_of(h)) {
            let at = ts.saturating_sub(cur.base_ts);
            queue(ctx, st, h, tag, at);
        }
    }
}

/// Queues one frame (opening, splitting and writing files as needed); false on a disk
/// error (logged and counted: the recording stops).
async fn take_frame(ctx: &Ctx, st: &mut State, player: &Player, f: &Arc<Frame>) -> bool {
    let Some(tag) = tag_of(f) else {
        return true;
    };
    match f.kind {
        FrameKind::Meta => st.meta = Some(f.clone()),
        FrameKind::VideoHeader => st.video_header = Some(f.clone()),
        FrameKind::AudioHeader => st.audio_header = Some(f.clone()),
        _ => {}
    }
    if f.msg_type == VIDEO {
        st.has_video = true;
    }
    if !f.kind.is_header() {
        let lag = player.lag_bytes(f);
        if lag > ctx.max_lag {
            skipped(ctx, st, &format!("{lag} bytes behind live"));
        }
        if st.skipping {
            let resume = f.kind == FrameKind::VideoKey || (!st.has_video && f.msg_type == AUDIO);
            if !resume || lag > ctx.max_lag {
                return true;
            }
            st.skipping = false;
            if std::mem::take(&mut st.resync) {
                resync_headers(ctx, st, f.timestamp);
            }
        }
    }
    // A new file starts at a keyframe (audio only: any audio frame) once the current one is
    // past its time, size or index bound.
    let boundary = is_seek_point(f) || (!st.has_video && f.msg_type == AUDIO);
    if boundary {
        if let Some(cur) = &st.cur {
            let s = &ctx.settings;
            let secs = u64::from(f.timestamp.wrapping_sub(cur.base_ts) / 1000);
            let full = cur.index.len() >= ctx.max_keyframes
                || (s.max_secs > 0 && secs >= s.max_secs)
                || (s.max_bytes > 0 && cur.pos >= s.max_bytes);
            if full {
                if !write_batch(ctx, st).await {
                    return false;
                }
                if let Some(old) = st.cur.take() {
                    // Finalized beside the next file (its copy must not hold the stream up).
                    let fin = Finalizing::new();
                    let ctx2 = FinalizeCtx::of(ctx);
                    tokio::spawn(async move {
                        finalize_with(&ctx2, old).await;
                        drop(fin);
                    });
                }
            }
        }
    }
    if st.cur.is_none() {
        // The file opens at the first frame to write; its timeline starts there.
        let head_meta = if f.kind == FrameKind::Meta {
            Some(f.clone())
        } else {
            st.meta.clone()
        };
        let Some(cur) = open(ctx, f.timestamp, head_meta).await else {
            return false;
        };
        st.cur = Some(cur);
        if f.kind == FrameKind::Meta {
            return true;
        }
        // A split file: the headers first, at its time 0.
        if f.kind != FrameKind::VideoHeader && f.kind != FrameKind::AudioHeader {
            for h in [st.video_header.clone(), st.audio_header.clone()]
                .into_iter()
                .flatten()
            {
                if let Some(tag) = tag_of(&h) {
                    queue(ctx, st, &h, tag, 0);
                }
            }
        }
    }
    let ts = st
        .cur
        .as_ref()
        .map_or(0, |c| f.timestamp.saturating_sub(c.base_ts));
    queue(ctx, st, f, tag, ts);
    let due = st
        .cur
        .as_ref()
        .is_some_and(|c| c.batch_bytes >= BATCH_BYTES);
    if due {
        return write_batch(ctx, st).await;
    }
    true
}

/// Adds one tag to the current file's batch.
fn queue(ctx: &Ctx, st: &mut State, f: &Arc<Frame>, tag: (TagKind, bytes::Bytes), ts: u32) {
    let Some(cur) = st.cur.as_mut() else {
        return;
    };
    if is_seek_point(f) && cur.index.len() < ctx.max_keyframes {
        cur.index.push((ts, cur.pos));
        ctx.info.keyframes.fetch_add(1, Ordering::Relaxed);
    }
    match f.msg_type {
        AUDIO => cur.has_audio = true,
        VIDEO => cur.has_video = true,
        _ => {}
    }
    cur.last_ts = cur.last_ts.max(ts);
    let len = flv::tag_len(tag.1.len());
    cur.pos = cur.pos.saturating_add(len as u64);
    cur.batch_bytes = cur.batch_bytes.saturating_add(len);
    cur.batch.push(Tag {
        kind: tag.0,
        ts,
        body: tag.1,
        _frame: f.clone(),
    });
    cur.batch_since
        .get_or_insert_with(tokio::time::Instant::now);
}

/// The part of the settings a finalize needs, owned (a split's finalize outlives nothing
/// but runs beside the recorder).
struct FinalizeCtx {
    key: StreamKey,
    amf: AmfLimits,
    info: Arc<RecInfo>,
}

impl FinalizeCtx {
    fn of(ctx: &Ctx) -> FinalizeCtx {
        FinalizeCtx {
            key: ctx.key.clone(),
            amf: ctx.amf,
            info: ctx.info.clone(),
        }
    }
}

/// Creates the `.part` file (and the directory), with the header and the metadata.
async fn open(ctx: &Ctx, base_ts: u32, head_meta: Option<Arc<Frame>>) -> Option<Current> {
    let dir = ctx.settings.dir.clone();
    let key = ctx.key.clone();
    let meta = head_meta.clone();
    let opened = tokio::task::spawn_blocking(move || FileOut::create(&dir, &key, meta.as_deref()))
        .await
        .unwrap_or_else(|e| Err(Failure::join(e)));
    match opened {
        Ok(out) => {
            *lock(&ctx.info.file) = out.dest.display().to_string();
            info!("recording {}: writing {}", ctx.key, out.part.display());
            Some(Current {
                pos: out.pos,
                out: Some(out),
                base_ts,
                last_ts: 0,
                index: Vec::new(),
                head_meta,
                has_audio: false,
                has_video: false,
                opened: Instant::now(),
                batch: Vec::new(),
                batch_bytes: 0,
                batch_since: None,
            })
        }
        Err(e) => {
            registry().totals.fail_open.fetch_add(1, Ordering::Relaxed);
            warn!(
                "recording {} stopped: {}; the stream goes on without recording \
                 (rtmpgate_record_failures_total{{stage=\"open\"}})",
                ctx.key, e
            );
            None
        }
    }
}

/// Writes the batch on a blocking thread; false on a disk error (logged and counted; the
/// `.part` is kept as far as it was written).
async fn write_batch(ctx: &Ctx, st: &mut State) -> bool {
    let Some(cur) = st.cur.as_mut() else {
        return true;
    };
    if cur.batch.is_empty() {
        return true;
    }
    let Some(mut out) = cur.out.take() else {
        return false;
    };
    let batch = std::mem::take(&mut cur.batch);
    let bytes = std::mem::take(&mut cur.batch_bytes);
    cur.batch_since = None;
    let (out, res) = match tokio::task::spawn_blocking(move || {
        let r = out.write_tags(&batch);
        (out, r)
    })
    .await
    {
        Ok((out, r)) => (Some(out), r),
        Err(e) => (None, Err(Failure::join(e))),
    };
    match res {
        Ok(()) => {
            cur.out = out;
            let b = bytes as u64;
            ctx.info.bytes.fetch_add(b, Ordering::Relaxed);
            registry().totals.bytes.fetch_add(b, Ordering::Relaxed);
            true
        }
        Err(e) => {
            registry().totals.fail_write.fetch_add(1, Ordering::Relaxed);
            let part = out
                .map(|o| o.part.display().to_string())
                .unwrap_or_default();
            warn!(
                "recording {} stopped: {}; the stream goes on without recording; what was \
                 written is kept as {part} (playable, no keyframe index) \
                 (rtmpgate_record_failures_total{{stage=\"write\"}})",
                ctx.key, e
            );
            st.cur = None;
            false
        }
    }
}

async fn finalize(ctx: &Ctx, cur: Current) {
    finalize_with(&FinalizeCtx::of(ctx), cur).await;
}

/// Writes the final file (header, new onMetaData, the `.part`'s tags) and removes the
/// `.part`; logs the outcome.
async fn finalize_with(ctx: &FinalizeCtx, mut cur: Current) {
    let Some(out) = cur.out.take() else {
        return;
    };
    let plan = Plan {
        meta: cur.head_meta.take(),
        index: std::mem::take(&mut cur.index),
        duration_ms: cur.last_ts,
        has_audio: cur.has_audio,
        has_video: cur.has_video,
        amf: ctx.amf,
    };
    let took = cur.opened.elapsed();
    let part = out.part.clone();
    let res = tokio::task::spawn_blocking(move || out.finish(plan))
        .await
        .unwrap_or_else(|e| Err(Failure::join(e)));
    match res {
        Ok((dest, size, keyframes)) => {
            ctx.info.files.fetch_add(1, Ordering::Relaxed);
            registry().totals.files.fetch_add(1, Ordering::Relaxed);
            info!(
                "recording {}: finished {} ({size} bytes, {:.1} s of media, {keyframes} \
                 keyframes indexed, recorded over {:.1} s)",
                ctx.key,
                dest.display(),
                f64::from(cur.last_ts) / 1000.0,
                took.as_secs_f64()
            );
        }
        Err(e) => {
            registry()
                .totals
                .fail_finalize
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                "recording {}: finalizing failed: {}; the recording is kept as {} (playable, \
                 no keyframe index) (rtmpgate_record_failures_total{{stage=\"finalize\"}})",
                ctx.key,
                e,
                part.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The file side (blocking threads only).

/// A disk error, said for a person: what failed, where, and what to do.
#[derive(Debug)]
struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Failure {
    fn io(what: &str, path: &Path, e: &io::Error) -> Failure {
        let hint = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                "free space on that disk, or set engine.record_max_bytes / another engine.record_dir"
            }
            Some(libc::EFBIG) => {
                "the process's file size limit (ulimit -f, systemd LimitFSIZE) was reached: raise it or set engine.record_max_bytes below it"
            }
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                "make engine.record_dir writable by the gateway's user (or point it elsewhere)"
            }
            Some(libc::ENOTDIR) | Some(libc::ENOENT) => {
                "engine.record_dir must be a directory (or a path where one can be created)"
            }
            _ => "check engine.record_dir and the disk under it",
        };
        Failure(format!("{what} {} failed: {e}; {hint}", path.display()))
    }

    fn join(e: tokio::task::JoinError) -> Failure {
        Failure(format!("the file task ended unexpectedly: {e}"))
    }
}

/// A `.part` file being written.
struct FileOut {
    w: BufWriter<File>,
    part: PathBuf,
    /// The final name, chosen free at creation.
    dest: PathBuf,
    /// Bytes written (or buffered) so far.
    pos: u64,
    /// The header and metadata at the start of the `.part` (replaced in the final file).
    prefix: u64,
}

/// What a finalize writes into the new head.
struct Plan {
    meta: Option<Arc<Frame>>,
    index: Vec<(u32, u64)>,
    duration_ms: u32,
    has_audio: bool,
    has_video: bool,
    amf: AmfLimits,
}

impl FileOut {
    fn create(dir: &Path, key: &StreamKey, meta: Option<&Frame>) -> Result<FileOut, Failure> {
        std::fs::create_dir_all(dir).map_err(|e| Failure::io("creating the directory", dir, &e))?;
        let now = unix_now();
        let mut last_err = None;
        for attempt in 0..NAME_TRIES {
            let stem = file_stem(key, now, attempt);
            let dest = dir.join(format!("{stem}.flv"));
            let part = dir.join(format!("{stem}.flv.part"));
            if dest.exists() {
                continue;
            }
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&part)
            {
                Ok(file) => {
                    let mut out = FileOut {
                        w: BufWriter::with_capacity(64 * 1024, file),
                        part,
                        dest,
                        pos: 0,
                        prefix: 0,
                    };
                    out.write_head(meta)
                        .map_err(|e| Failure::io("writing", &out.part, &e))?;
                    return Ok(out);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    last_err = Some(Failure::io("creating", &part, &e));
                    break;
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Failure(format!(
                "creating a file for it in {} failed: {NAME_TRIES} names were taken; remove old files",
                dir.display()
            ))
        }))
    }

    /// The FLV header (both streams announced: which come is not known yet) and the
    /// publisher's metadata.
    fn write_head(&mut self, meta: Option<&Frame>) -> io::Result<()> {
        let mut head = bytes::BytesMut::from(&flv::header(true, true)[..]);
        if let Some(m) = meta {
            flv::write_tag(TagKind::Script, 0, &flv::script_body(&m.payload), &mut head)
                .map_err(io::Error::other)?;
        }
        self.w.write_all(&head)?;
        self.pos = head.len() as u64;
        self.prefix = self.pos;
        Ok(())
    }

    fn write_tags(&mut self, tags: &[Tag]) -> Result<(), Failure> {
        for t in tags {
            let head = flv::tag_header(t.kind, t.ts, t.body.len())
                .map_err(|e| Failure(format!("writing {}: {e}", self.part.display())))?;
            let tail = flv::prev_tag_size(t.body.len());
            self.w
                .write_all(&head)
                .and_then(|()| self.w.write_all(&t.body))
                .and_then(|()| self.w.write_all(&tail))
                .map_err(|e| Failure::io("writing", &self.part, &e))?;
            self.pos = self.pos.saturating_add(flv::tag_len(t.body.len()) as u64);
        }
        // Pushed to the OS each batch: a disk error shows now, and a crash loses one batch.
        self.w
            .flush()
            .map_err(|e| Failure::io("writing", &self.part, &e))
    }

    /// The final file: returns its path, size and the keyframes indexed.
    fn finish(mut self, plan: Plan) -> Result<(PathBuf, u64, usize), Failure> {
        self.w
            .flush()
            .map_err(|e| Failure::io("writing", &self.part, &e))?;
        let data_len = self.pos.saturating_sub(self.prefix);
        let head = final_head(&plan, self.prefix, data_len);
        let tmp = self.dest.with_extension("flv.tmp");
        let written = (|| -> Result<u64, Failure> {
            let mut part: &File = self.w.get_ref();
            part.seek(SeekFrom::Start(self.prefix))
                .map_err(|e| Failure::io("reading", &self.part, &e))?;
            let mut dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| Failure::io("creating", &tmp, &e))?;
            dst.write_all(&head)
                .map_err(|e| Failure::io("writing", &tmp, &e))?;
            let copied =
                io::copy(&mut part, &mut dst).map_err(|e| Failure::io("writing", &tmp, &e))?;
            if copied != data_len {
                return Err(Failure(format!(
                    "copying {} into {} gave {copied} bytes where {data_len} were written; the disk is failing or the file was changed",
                    self.part.display(),
                    tmp.display()
                )));
            }
            dst.sync_all()
                .map_err(|e| Failure::io("syncing", &tmp, &e))?;
            Ok(head.len() as u64 + copied)
        })();
        let size = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if self.dest.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Failure(format!(
                "{} appeared meanwhile (another process writes into engine.record_dir?)",
                self.dest.display()
            )));
        }
        std::fs::rename(&tmp, &self.dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Failure::io("renaming into", &self.dest, &e)
        })?;
        drop(self.w);
        if let Err(e) = std::fs::remove_file(&self.part) {
            warn!(
                "recording: removing {} failed: {e}; it is a copy of {}",
                self.part.display(),
                self.dest.display()
            );
        }
        Ok((self.dest, size, plan.index.len()))
    }
}

/// Keys of the publisher's metadata that the final head replaces (they describe the file,
/// which the encoder did not know).
const REPLACED_KEYS: &[&str] = &[
    "duration",
    "filesize",
    "keyframes",
    "hasKeyframes",
    "hasMetadata",
    "canSeekToEnd",
    "lasttimestamp",
    "lastkeyframetimestamp",
    "lastkeyframelocation",
    "datasize",
    "audiosize",
    "videosize",
];

/// The final file's head: FLV header and the new onMetaData tag, with the keyframe offsets
/// moved from the `.part` (head `prefix` bytes) to the final file.
fn final_head(plan: &Plan, prefix: u64, data_len: u64) -> Vec<u8> {
    let mut props: Vec<(String, Amf0Value)> = plan
        .meta
        .as_ref()
        .and_then(|m| crate::rtmp::amf0::decode_all(&flv::script_body(&m.payload), &plan.amf).ok())
        .and_then(|v| {
            v.into_iter().nth(1).and_then(|o| match o {
                Amf0Value::Object(p) | Amf0Value::EcmaArray(p) => Some(p),
                _ => None,
            })
        })
        .unwrap_or_default();
    props.retain(|(k, _)| !REPLACED_KEYS.contains(&k.as_str()));
    let build = |head_len: u64| -> Vec<u8> {
        let mut p = props.clone();
        let secs = |ms: u32| Amf0Value::Number(f64::from(ms) / 1000.0);
        p.push(("duration".into(), secs(plan.duration_ms)));
        p.push((
            "filesize".into(),
            Amf0Value::Number(head_len.saturating_add(data_len) as f64),
        ));
        p.push((
            "hasKeyframes".into(),
            Amf0Value::Boolean(!plan.index.is_empty()),
        ));
        if let Some(&(ts, pos)) = plan.index.last() {
            p.push(("lastkeyframetimestamp".into(), secs(ts)));
            p.push((
                "lastkeyframelocation".into(),
                Amf0Value::Number((pos + head_len).saturating_sub(prefix) as f64),
            ));
        }
        p.push((
            "keyframes".into(),
            Amf0Value::Object(vec![
                (
                    "times".into(),
                    Amf0Value::StrictArray(plan.index.iter().map(|&(ts, _)| secs(ts)).collect()),
                ),
                (
                    "filepositions".into(),
                    Amf0Value::StrictArray(
                        plan.index
                            .iter()
                            .map(|&(_, pos)| {
                                Amf0Value::Number((pos + head_len).saturating_sub(prefix) as f64)
                            })
                            .collect(),
                    ),
                ),
            ]),
        ));
        let body = flv::on_metadata(p);
        let mut head = bytes::BytesMut::from(&flv::header(plan.has_audio, plan.has_video)[..]);
        // The index is bounded (limits.max_record_keyframes): far below FLV's 16 MiB body.
        if flv::write_tag(TagKind::Script, 0, &body, &mut head).is_err() {
            head.truncate(flv::HEADER_LEN);
        }
        head.to_vec()
    };
    // Every number is an 8-byte double: the length does not depend on the offsets.
    let len = build(0).len() as u64;
    build(len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_bounded() {
        assert_eq!(sanitize("cam1"), "cam1");
        assert_eq!(sanitize("../../etc/passwd"), "______etc_passwd");
        assert_eq!(sanitize(".."), "__");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize("a b/c\\d\0é"), "a_b_c_d__");
        assert_eq!(sanitize(&"x".repeat(500)).len(), NAME_PART_MAX);
        let stem = file_stem(&StreamKey::new("live/sub", "../s"), 0, 0);
        assert_eq!(stem, "live_sub____s_19700101T000000Z");
        assert!(!stem.contains('/') && !stem.contains(".."));
        assert_eq!(
            file_stem(&StreamKey::new("a", "b"), 86_399, 2),
            "a_b_19700101T235959Z_3"
        );
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2000-02-29 12:34:56 (a leap day in a year divisible by 400).
        assert_eq!(utc_stamp(951_827_696), "20000229T123456Z");
        // 2026-12-02 05:48:08.
        assert_eq!(utc_stamp(1_796_190_488), "20261202T054808Z");
        assert_eq!(utc_stamp(4_102_444_800), "21000101T000000Z");
    }

    /// The tags of an FLV file: (type, timestamp, first body byte, offset).
    fn tags(data: &[u8]) -> Vec<(u8, u32, u8, u64)> {
        let mut p = flv::HEADER_LEN;
        let mut out = Vec::new();
        while p + 11 <= data.len() {
            let len = u32::from_be_bytes([0, data[p + 1], data[p + 2], data[p + 3]]) as usize;
            let ts = u32::from_be_bytes([data[p + 7], data[p + 4], data[p + 5], data[p + 6]]);
            out.push((
                data[p],
                ts,
                data.get(p + 11).copied().unwrap_or(0),
                p as u64,
            ));
            p += flv::tag_len(len);
        }
        out
    }

    #[test]
    fn a_recorder_that_falls_behind_skips_to_the_next_keyframe_and_counts_it() {
        use crate::engine::hub::HubConfig;
        const AVC_HEADER: &[u8] = &[0x17, 0, 0, 0, 0, 1, 2];
        const AVC_KEY: &[u8] = &[0x17, 1, 0, 0, 0, 9];
        const AVC_INTER: &[u8] = &[0x27, 1, 0, 0, 0, 8];
        // A new decoder configuration (another resolution) among the frames lost.
        const AVC_HEADER_2: &[u8] = &[0x17, 0, 0, 0, 0, 1, 3];
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let skips_before = registry().totals.skips.load(Ordering::Relaxed);
        rt.block_on(async {
            let hub = Hub::new(HubConfig {
                queue_messages: 16,
                ..HubConfig::default()
            });
            let key = StreamKey::new("live", "slow");
            let p = hub.publish(&key).unwrap();
            let settings = Arc::new(RecordSettings {
                apps: RecordApps::All,
                dir: dir.path().to_path_buf(),
                max_secs: 0,
                max_bytes: 0,
            });
            let rec = start(Some(&settings), &hub, &Limits::default(), &key).unwrap();
            let push = |ts: u32, b: &'static [u8]| {
                p.push(VIDEO, ts, bytes::Bytes::from_static(b)).unwrap()
            };
            push(0, AVC_HEADER);
            push(0, AVC_KEY);
            // The recorder (on this thread) takes them and opens its file: wait (at most
            // 10 s) until it has queued the keyframe.
            let queued = || {
                lock(&registry().active)
                    .values()
                    .any(|i| i.stream == "live/slow" && i.keyframes.load(Ordering::Relaxed) == 1)
            };
            for _ in 0..200 {
                if queued() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(queued(), "the recorder did not take the first keyframe");
            // Then it cannot run while 100 frames come: a disk that slow. The ring (16) laps
            // and the publisher never waits.
            for i in 1..=100u32 {
                push(i * 33, if i == 50 { AVC_HEADER_2 } else { AVC_INTER });
            }
            push(3400, AVC_KEY);
            for i in 1..=5u32 {
                push(3400 + i * 33, AVC_INTER);
            }
            // The publisher stays until the recorder has resumed (its headers are the hub's
            // while it publishes).
            let keyframes = || {
                lock(&registry().active)
                    .values()
                    .find(|i| i.stream == "live/slow")
                    .map_or(0, |i| i.keyframes.load(Ordering::Relaxed))
            };
            for _ in 0..200 {
                if keyframes() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            drop(p);
            drop(rec);
            for _ in 0..200 {
                let done = std::fs::read_dir(dir.path())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().ends_with("Z.flv"));
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        assert!(registry().totals.skips.load(Ordering::Relaxed) > skips_before);
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().ends_with("Z.flv"))
            .expect("the recording was finalized")
            .path();
        let data = std::fs::read(&file).unwrap();
        let t = tags(&data);
        // onMetaData, header, keyframe; then the next keyframe and what follows it: the
        // frames in between, which the ring no longer held, are skipped, not half-written.
        let video: Vec<(u32, u8)> = t.iter().filter(|x| x.0 == 9).map(|x| (x.1, x.2)).collect();
        // The new header comes back from the hub before the keyframe the recording resumes at.
        let mut want = vec![(0, 0x17), (0, 0x17), (3400, 0x17), (3400, 0x17)];
        want.extend((1..=5u32).map(|i| (3400 + i * 33, 0x27)));
        assert_eq!(video, want);
        assert_eq!(t[0].0, flv::TagKind::Script as u8);
        // The index lists the two keyframes written, at their offsets (the 0x17 video tags
        // are: header, keyframe, new header, keyframe).
        let k: Vec<f64> = t
            .iter()
            .filter(|x| x.0 == 9 && x.2 == 0x17)
            .map(|x| x.3 as f64)
            .collect();
        let keys = vec![k[1], k[3]];
        let body =
            &data[flv::HEADER_LEN + flv::TAG_HEADER_LEN..usize::try_from(t[1].3).unwrap() - 4];
        let meta = crate::rtmp::amf0::decode_all(body, &AmfLimits::default()).unwrap();
        let index = meta[1].get("keyframes").unwrap();
        let positions: Vec<f64> = match index.get("filepositions").unwrap() {
            Amf0Value::StrictArray(v) => v.iter().filter_map(Amf0Value::as_f64).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(positions, keys);
    }

    #[test]
    fn apps_and_globs() {
        let a = RecordApps::Apps(vec!["live".into(), "event*".into()]);
        assert!(a.matches("live") && a.matches("event-1"));
        assert!(!a.matches("live2") && !a.matches("other"));
        assert!(RecordApps::All.matches("anything"));
    }
}
