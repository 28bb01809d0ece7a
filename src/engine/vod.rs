//! On-demand playback of FLV files from `[engine] vod_dir`: which play names are files
//! (confined to the directory), a file's duration, where a seek starts, and one reader task
//! per playing client that hands tags out at the file's own pace.
//!
//! Names: `NAME`, `NAME.flv` and `flv:NAME` all mean `vod_dir/NAME.flv` (ffmpeg and
//! rtmpdump send `NAME` for `rtmp://host/app/NAME.flv`; Flash, FMS and Red5 use `flv:NAME`).
//! A name with `..`, `.`, an empty component, a leading `/`, `\`, `%` or a NUL is refused
//! outright, and the file's canonical path (symlinks resolved) must lie inside the
//! canonical directory: nothing outside it can be opened, whatever links it holds.
//!
//! Memory: a reader holds its read buffer (64 KiB, or one tag of at most
//! `limits.max_vod_tag_bytes` while it is read) and at most [`QUEUE_TAGS`] tags waiting for
//! the session; both are charged to the client's memory budget before they are read. The
//! reader sleeps until each tag is due ([`LEAD`] early), so a file is never read faster than
//! it plays; a client that takes less than that holds the reader back (the queue is full)
//! rather than making it buffer more.

use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::flv_read::{self, FlvError, ReadLimits, Step, Tag, TagReader};
use crate::budget::{Charge, OverBudget, PeerBudget};
use crate::limits::Limits;
use crate::rtmp::amf::AmfLimits;

/// How far ahead of its timestamp a tag is sent: players buffer about this much (ffmpeg
/// asks for 3 s, Flash for 0.1-1 s), so a scheduling hiccup does not stall them.
pub const LEAD: Duration = Duration::from_millis(1000);
/// Tags read and waiting for the session to take them.
pub const QUEUE_TAGS: usize = 4;
/// Bytes asked of the file per read (more only when one tag is larger).
const READ_CHUNK: usize = 64 * 1024;
/// A jump forward between two tags' timestamps larger than this is a discontinuity (a
/// spliced or damaged file), not a wait: the clock restarts there.
const MAX_GAP_MS: u32 = 10_000;
/// Tags at the start of a file searched for onMetaData and the sequence headers.
const HEAD_TAGS: usize = 16;

/// What a play name is, against the VOD directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A regular file inside the directory.
    File {
        path: PathBuf,
        /// Named as a file (`x.flv`, `flv:x`): never a live stream.
        explicit: bool,
    },
    /// No such file: a live stream name (or, named as a file, not found).
    NotFile { explicit: bool },
    /// A name that tries to leave the directory: refused, with why (for the log).
    Refused(String),
}

/// Which file (if any) `name` (a play name without its query) means under `dir` (the
/// canonical VOD directory).
pub fn resolve(dir: &Path, name: &str) -> Resolved {
    let (stem, explicit) = match name.strip_prefix("flv:") {
        Some(rest) => (rest, true),
        None => match name.strip_suffix(".flv") {
            Some(rest) => (rest, true),
            None => (name, false),
        },
    };
    // Both forms at once ("flv:x.flv") name x.flv, as FMS does.
    let stem = stem.strip_suffix(".flv").unwrap_or(stem);
    if let Some(why) = unsafe_name(stem) {
        return Resolved::Refused(why);
    }
    if stem.contains(':') {
        // Another format's prefix (mp4:, mp3:): not ours.
        return Resolved::NotFile { explicit };
    }
    let candidate = dir.join(format!("{stem}.flv"));
    let Ok(real) = std::fs::canonicalize(&candidate) else {
        return Resolved::NotFile { explicit };
    };
    if !real.starts_with(dir) {
        return Resolved::Refused(format!(
            "{} resolves to {}, outside the VOD directory (a symlink out)",
            candidate.display(),
            real.display()
        ));
    }
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Resolved::File {
            path: real,
            explicit,
        },
        _ => Resolved::NotFile { explicit },
    }
}

/// Why `stem` may not be joined to the directory, if it may not.
fn unsafe_name(stem: &str) -> Option<String> {
    if stem.is_empty() {
        return Some("an empty file name".into());
    }
    if let Some(c) = stem.chars().find(|c| matches!(c, '\\' | '%' | '\0')) {
        return Some(format!(
            "{c:?} in the name (escapes are not decoded, never joined)"
        ));
    }
    if stem.starts_with('/') {
        return Some("an absolute path".into());
    }
    for part in stem.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Some(format!("a {part:?} path component"));
        }
    }
    // The components are plain names now; `Path` must agree (no root, no prefix).
    let plain = Path::new(stem)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    (!plain).then(|| "a path that is not a plain relative one".into())
}

/// Why a file cannot be played (on): said to the player (NetStream.Play.Failed) and logged.
#[derive(Debug, thiserror::Error)]
pub enum VodError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Flv {
        path: String,
        #[source]
        source: FlvError,
    },
    #[error("{0}")]
    OverBudget(#[from] OverBudget),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VodError + '_ {
    move |source| VodError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn flv_err(path: &Path, source: FlvError) -> VodError {
    VodError::Flv {
        path: path.display().to_string(),
        source,
    }
}

/// The readers' bounds, from [`Limits`].
#[derive(Clone, Copy, Debug)]
pub struct VodLimits {
    pub read: ReadLimits,
    pub amf: AmfLimits,
}

impl From<&Limits> for VodLimits {
    fn from(l: &Limits) -> Self {
        VodLimits {
            read: ReadLimits {
                max_tag_bytes: l.max_vod_tag_bytes,
                max_index_entries: l.max_vod_index_entries,
            },
            amf: l.into(),
        }
    }
}

/// Reads the tag whose header is at `offset`: its body only when `with_body` (else the
/// body is empty). Blocking (called from `spawn_blocking` or for one small read).
fn read_tag_at(
    f: &std::fs::File,
    path: &Path,
    offset: u64,
    file_len: u64,
    with_body: usize,
    limits: &ReadLimits,
) -> Result<Option<(Tag, u32)>, VodError> {
    if offset >= file_len {
        return Ok(None);
    }
    let mut h = [0u8; flv_read::TAG_HEADER_LEN];
    if file_len - offset < h.len() as u64 {
        return Err(flv_err(path, FlvError::Truncated { offset }));
    }
    f.read_exact_at(&mut h, offset).map_err(io_err(path))?;
    let th = flv_read::parse_tag_header(&h);
    let size = th.size as usize;
    if size > limits.max_tag_bytes {
        return Err(flv_err(
            path,
            FlvError::TagTooLarge {
                offset,
                size: th.size,
                max: limits.max_tag_bytes,
            },
        ));
    }
    let body_at = offset + h.len() as u64;
    if file_len - body_at < size as u64 {
        return Err(flv_err(path, FlvError::Truncated { offset }));
    }
    let take = size.min(with_body);
    let mut body = vec![0u8; take];
    f.read_exact_at(&mut body, body_at).map_err(io_err(path))?;
    let tag = Tag {
        tag_type: th.tag_type,
        timestamp: th.timestamp,
        body: body.into(),
        offset,
    };
    Ok(Some((tag, th.size)))
}

/// The next tag's offset after the one at `offset` with body `size`.
fn after(offset: u64, size: u32) -> u64 {
    offset
        .saturating_add((flv_read::TAG_HEADER_LEN + flv_read::PREV_SIZE_LEN) as u64)
        .saturating_add(u64::from(size))
}

/// What the start of a file says: where its tags begin, its metadata, and its headers.
struct Head {
    first_tag: u64,
    file_len: u64,
    meta: Option<flv_read::Metadata>,
    /// onMetaData and the first video and audio sequence headers, in file order.
    headers: Vec<Tag>,
}

/// Where the file's first tag is, and its length.
fn first_tag(f: &std::fs::File, path: &Path) -> Result<(u64, u64), VodError> {
    let file_len = f.metadata().map_err(io_err(path))?.len();
    // The file header and PreviousTagSize0: at most 1028 bytes (the header size is bounded).
    let mut hb = [0u8; 1028];
    let got = f.read_at(&mut hb, 0).map_err(io_err(path))?;
    let first = flv_read::parse_file_header(hb.get(..got).unwrap_or_default())
        .map_err(|e| flv_err(path, e))?
        .ok_or_else(|| flv_err(path, FlvError::Truncated { offset: 0 }))?;
    Ok((first, file_len))
}

/// The metadata and sequence headers among the file's first [`HEAD_TAGS`] tags (up to the
/// first media that is not a header). Only those tags' bodies are read whole, each charged
/// to `charge` first; of the others, 2 bytes (enough to classify them).
fn read_head(
    f: &std::fs::File,
    path: &Path,
    limits: &VodLimits,
    charge: &mut Charge,
) -> Result<Head, VodError> {
    use super::hub::{classify, FrameKind};
    let (first_tag, file_len) = first_tag(f, path)?;
    let mut meta = None;
    let mut headers = Vec::new();
    let (mut video, mut audio) = (false, false);
    let mut at = first_tag;
    for _ in 0..HEAD_TAGS {
        let Some((peek, size)) = read_tag_at(f, path, at, file_len, 2, &limits.read)? else {
            break;
        };
        let kind = if peek.tag_type == flv_read::TAG_SCRIPT {
            FrameKind::Meta
        } else {
            classify(peek.tag_type, &peek.body)
        };
        let wanted = match kind {
            FrameKind::Meta => meta.is_none(),
            FrameKind::VideoHeader => !std::mem::replace(&mut video, true),
            FrameKind::AudioHeader => !std::mem::replace(&mut audio, true),
            FrameKind::Audio | FrameKind::Video | FrameKind::VideoKey => break,
            FrameKind::Data => false,
        };
        if wanted {
            charge.try_grow(size as usize)?;
            if let Some((t, _)) = read_tag_at(f, path, at, file_len, size as usize, &limits.read)? {
                if kind == FrameKind::Meta {
                    meta = flv_read::parse_metadata(&t.body, &limits.amf, &limits.read);
                    if meta.is_none() {
                        // Another script tag (a cue point): not sent ahead of a seek.
                        charge.shrink(size as usize);
                        at = after(at, size);
                        continue;
                    }
                }
                headers.push(t);
            }
        }
        at = after(at, size);
    }
    Ok(Head {
        first_tag,
        file_len,
        meta,
        headers,
    })
}

/// Largest first tag read for its onMetaData duration by [`duration_ms`]: past it (a huge
/// keyframe index) the last tag's timestamp is used instead.
const DURATION_META_MAX: u32 = 64 * 1024;

/// The file's duration in milliseconds: onMetaData's (when the first tag is a metadata
/// tag of at most 64 KiB), else the last tag's timestamp (the file's last PreviousTagSize
/// points at it). Blocking, but a handful of reads of at most 64 KiB together.
pub fn duration_ms(path: &Path, limits: &VodLimits) -> Result<u64, VodError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let (first, len) = first_tag(&f, path)?;
    if let Some((peek, size)) = read_tag_at(&f, path, first, len, 0, &limits.read)? {
        if peek.tag_type == flv_read::TAG_SCRIPT && size <= DURATION_META_MAX {
            let body = read_tag_at(&f, path, first, len, size as usize, &limits.read)?;
            let meta = body
                .and_then(|(t, _)| flv_read::parse_metadata(&t.body, &limits.amf, &limits.read));
            if let Some(d) = meta.and_then(|m| m.duration_ms) {
                return Ok(d);
            }
        }
    }
    let mut tail = [0u8; 4];
    if len < first + 4 || f.read_exact_at(&mut tail, len - 4).is_err() {
        return Ok(0);
    }
    let size = u64::from(u32::from_be_bytes(tail));
    let Some(tag_at) = len.checked_sub(4).and_then(|x| x.checked_sub(size)) else {
        return Ok(0);
    };
    let mut h = [0u8; flv_read::TAG_HEADER_LEN];
    if f.read_exact_at(&mut h, tag_at).is_err() {
        return Ok(0);
    }
    // The size after the last tag must match that tag's own header to be believed.
    let th = flv_read::parse_tag_header(&h);
    let plausible = u64::from(th.size) + flv_read::TAG_HEADER_LEN as u64 == size
        && matches!(
            th.tag_type,
            flv_read::TAG_AUDIO | flv_read::TAG_VIDEO | flv_read::TAG_SCRIPT
        );
    Ok(if plausible {
        u64::from(th.timestamp)
    } else {
        0
    })
}

/// Where a play starts: the tags to send first (metadata, sequence headers), the file
/// offset of the first tag to read, and its timestamp.
#[derive(Debug)]
pub struct Plan {
    pub headers: Vec<Tag>,
    pub from: u64,
    pub ts: u32,
    /// How `from` was found (for the log).
    pub how: &'static str,
}

/// The plan for playing from `ms`: from the file's first tag when `ms` is 0, else from the
/// keyframe at or before `ms` (the onMetaData index when it has one that checks out,
/// else the tag headers scanned from the start: 13 bytes read per tag, nothing kept).
pub fn plan(
    path: &Path,
    ms: u32,
    limits: &VodLimits,
    charge: &mut Charge,
) -> Result<Plan, VodError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    if ms == 0 {
        let (from, _) = first_tag(&f, path)?;
        return Ok(Plan {
            headers: Vec::new(),
            from,
            ts: 0,
            how: "the start",
        });
    }
    let head = read_head(&f, path, limits, charge)?;
    let index = head.meta.as_ref().map_or(&[][..], |m| &m.keyframes[..]);
    // An index cut at max_index_entries says nothing about times past its last entry.
    let cut =
        index.len() >= limits.read.max_index_entries && index.last().is_some_and(|&(t, _)| ms > t);
    let from_index = (!cut)
        .then(|| flv_read::keyframe_at_or_before(index, ms))
        .flatten()
        .and_then(|(_, pos)| {
            // Trust an entry only when a keyframe is really there.
            read_tag_at(&f, path, pos, head.file_len, 2, &limits.read)
                .ok()
                .flatten()
                .map(|(t, _)| t)
                .filter(Tag::is_keyframe)
        });
    let (key, how) = match from_index {
        Some(t) => (Some(t), "the file's keyframe index"),
        None => (
            scan_for_keyframe(&f, path, &head, ms, limits)?,
            "a scan of its tags",
        ),
    };
    // No keyframe at all before `ms` (audio only, or a seek before the first): the start.
    let (from, ts) = key.map_or((head.first_tag, 0), |t| (t.offset, t.timestamp));
    let mut headers = head.headers;
    for h in &mut headers {
        // Sent as of the new position, so players see no jump back in time.
        h.timestamp = ts;
    }
    Ok(Plan {
        headers,
        from,
        ts,
        how,
    })
}

/// The last keyframe at or before `ms`, scanning tag headers from the file's start.
fn scan_for_keyframe(
    f: &std::fs::File,
    path: &Path,
    head: &Head,
    ms: u32,
    limits: &VodLimits,
) -> Result<Option<Tag>, VodError> {
    let mut at = head.first_tag;
    let mut best: Option<Tag> = None;
    // Bounded by the file: every step moves at least 15 bytes forward.
    while let Some((t, size)) = read_tag_at(f, path, at, head.file_len, 2, &limits.read)? {
        if t.timestamp > ms && best.is_some() {
            break;
        }
        if t.is_keyframe() {
            best = Some(t);
        }
        at = after(at, size);
    }
    Ok(best)
}

/// What a reader hands the session.
#[derive(Debug)]
pub enum Item {
    /// The play (or seek) is planned: media follows from the keyframe at `ts` ms.
    Started { ts: u32, how: &'static str },
    /// A tag due now (or within [`LEAD`]), with its memory charge (drop it once queued).
    Tag(Tag, Charge),
    /// The file ended where a tag ended.
    End,
    /// The file cannot be read on; the play ends with this.
    Failed(VodError),
}

/// A running reader: dropping it stops the task.
pub struct Reader {
    rx: mpsc::Receiver<Item>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reader {
    /// The next item; pending while none is due. After End or Failed, pending forever. A
    /// poll, so that its caller keeps no future between polls.
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Item> {
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(item)) => std::task::Poll::Ready(item),
            // The reader's task is done (it sends End or Failed last): nothing more comes.
            std::task::Poll::Ready(None) | std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// Where a reader starts.
pub enum Start {
    /// At `ms` (0: the start), after planning (in a blocking task).
    At(u32),
    /// Right after a tag already sent (a resume after pause): no headers, no search.
    Resume { from: u64, ts: u32 },
}

/// Starts the reader of `path` from `start`, charging to `budget`.
pub fn spawn(path: PathBuf, start: Start, limits: VodLimits, budget: &PeerBudget) -> Reader {
    let (tx, rx) = mpsc::channel(QUEUE_TAGS);
    let charge = budget.charge();
    let task = tokio::spawn(async move {
        let res = read_paced(&path, start, &limits, charge, &tx).await;
        let last = match res {
            Ok(true) => Item::End,
            Ok(false) => return,
            Err(e) => Item::Failed(e),
        };
        let _ = tx.send(last).await;
    });
    Reader { rx, task }
}

/// Sends `path`'s tags from `start` at their pace; Ok(true) at the end of the file,
/// Ok(false) when the session stopped listening.
async fn read_paced(
    path: &Path,
    start: Start,
    limits: &VodLimits,
    mut charge: Charge,
    tx: &mpsc::Sender<Item>,
) -> Result<bool, VodError> {
    // File IO runs on the blocking pool (positioned reads of an Arc'd file): a slow disk
    // holds up this reader only, never the session's or anyone else's task.
    let (p, l) = (path.to_owned(), *limits);
    let mut head_charge = charge.sibling();
    let (file, plan, head_charge) = blocking(path, move || {
        let f = std::fs::File::open(&p).map_err(io_err(&p))?;
        let plan = match start {
            Start::At(ms) => plan(&p, ms, &l, &mut head_charge)?,
            Start::Resume { from, ts } => Plan {
                headers: Vec::new(),
                from,
                ts,
                how: "a resume",
            },
        };
        Ok((Arc::new(f), plan, head_charge))
    })
    .await?;
    let clock = Instant::now();
    let started = Item::Started {
        ts: plan.ts,
        how: plan.how,
    };
    if tx.send(started).await.is_err() {
        return Ok(false);
    }
    for h in plan.headers {
        let c = charged(&charge, h.body.len())?;
        if tx.send(Item::Tag(h, c)).await.is_err() {
            return Ok(false);
        }
    }
    // The headers carry their own charges now.
    drop(head_charge);
    let mut pos = plan.from;
    let mut reader = TagReader::new(plan.from, limits.read);
    let mut buf = BytesMut::new();
    // The clock: tag timestamp `base_ts` is due at `base_at` (minus the lead).
    let (mut base_ts, mut base_at) = (plan.ts, clock);
    let mut last_ts = plan.ts;
    loop {
        let tag = match reader.next(&mut buf) {
            Ok(Step::Tag(t)) => t,
            Ok(Step::Need(n)) => {
                // n is bounded by max_vod_tag_bytes; charged before the read allocates it.
                let more = n.max(READ_CHUNK).saturating_sub(buf.len()).max(1);
                charge.try_set(buf.len().saturating_add(more))?;
                let (f, p) = (file.clone(), path.to_owned());
                let chunk = blocking(path, move || {
                    let mut v = vec![0u8; more];
                    let k = f.read_at(&mut v, pos).map_err(io_err(&p))?;
                    v.truncate(k);
                    Ok(v)
                })
                .await?;
                pos = pos.saturating_add(chunk.len() as u64);
                buf.extend_from_slice(&chunk);
                if chunk.is_empty() {
                    if buf.is_empty() {
                        return Ok(true);
                    }
                    let offset = reader.offset();
                    return Err(flv_err(path, FlvError::Truncated { offset }));
                }
                continue;
            }
            Err(e) => return Err(flv_err(path, e)),
        };
        if !matches!(
            tag.tag_type,
            flv_read::TAG_AUDIO | flv_read::TAG_VIDEO | flv_read::TAG_SCRIPT
        ) {
            continue;
        }
        if tag.timestamp < last_ts || tag.timestamp - last_ts > MAX_GAP_MS {
            // Backwards or a long jump: restart the clock here rather than wait or burst.
            base_ts = tag.timestamp;
            base_at = Instant::now();
        }
        last_ts = tag.timestamp;
        let due = base_at + Duration::from_millis(u64::from(tag.timestamp - base_ts));
        tokio::time::sleep_until(due.checked_sub(LEAD).unwrap_or(due)).await;
        let c = charged(&charge, tag.body.len())?;
        if tx.send(Item::Tag(tag, c)).await.is_err() {
            return Ok(false);
        }
    }
}

/// Runs `f` on the blocking pool; a pool that cannot run it is an IO error on `path`.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, VodError> + Send + 'static,
) -> Result<T, VodError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(path)(std::io::Error::other(e)))?
}

fn charged(sibling_of: &Charge, bytes: usize) -> Result<Charge, OverBudget> {
    let mut c = sibling_of.sibling();
    c.try_grow(bytes)?;
    Ok(c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_files_inside_the_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::write(dir.join("a.flv"), b"FLV").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b.flv"), b"FLV").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.flv"), b"FLV").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.flv"), dir.join("link.flv"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("out")).unwrap();
        let file = |p: &str, explicit| Resolved::File {
            path: dir.join(p),
            explicit,
        };
        assert_eq!(resolve(&dir, "a"), file("a.flv", false));
        assert_eq!(resolve(&dir, "a.flv"), file("a.flv", true));
        assert_eq!(resolve(&dir, "flv:a"), file("a.flv", true));
        assert_eq!(resolve(&dir, "flv:sub/b"), file("sub/b.flv", true));
        assert_eq!(
            resolve(&dir, "live1"),
            Resolved::NotFile { explicit: false }
        );
        assert_eq!(resolve(&dir, "x.flv"), Resolved::NotFile { explicit: true });
        assert_eq!(
            resolve(&dir, "mp4:a"),
            Resolved::NotFile { explicit: false }
        );
        assert_eq!(resolve(&dir, "sub"), Resolved::NotFile { explicit: false });
        for bad in [
            "../a",
            "flv:../../etc/passwd",
            "sub/../a",
            "./a",
            "flv:/etc/passwd",
            "%2e%2e/a",
            "a\\..\\b",
            "sub//b",
            "link",
            "out/secret",
            "flv:",
        ] {
            assert!(
                matches!(resolve(&dir, bad), Resolved::Refused(_)),
                "{bad}: {:?}",
                resolve(&dir, bad)
            );
        }
    }
}
