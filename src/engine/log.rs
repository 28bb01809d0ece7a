//! A stream's frames as chunked, in an append-only memory file (`memfd`), so the fan-out lane
//! can hand a player's socket references to the file's pages (`sendfile`) instead of copying
//! every frame into every player's socket: the copy was a quarter of the engine's samples at
//! 1,000 players (bench/RESULTS.md), and a loopback or NIC path can carry page references
//! as far as the reader's own copy.
//!
//! A page the kernel has handed to a socket must never change while the socket holds it, so
//! nothing already written is ever overwritten: frames are appended at ever larger offsets,
//! and memory is given back by punching holes (`fallocate`), which takes the pages out of the
//! file without touching their contents (a socket still holding one keeps it as it was).
//! A range is punched only when no frame with bytes in it is alive: the file is counted in
//! segments of [`SEGMENT`] bytes, each frame's [`LogRange`] counts itself in every segment it
//! touches for as long as it lives, and a segment with no live frame behind the append point
//! is punched. The lane writes a frame from the log only while it holds that frame, so what
//! it sends was written whole and is still there.
//!
//! That holds for the base page size only: a hole punched through part of a larger page
//! (transparent huge pages on tmpfs) zeroes that part in place, under whatever socket still
//! holds it. So there is no log where the system could give the file pages larger than
//! [`SEGMENT`] ([`huge_pages_off`]); the players are then written from memory.
//!
//! The file holds the live frames' bytes a second time (the chunked `Bytes` stay for the
//! session's own writes): the hub charges them to the memory budget with the frame.

use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::door::fdlimit::STREAM_LOG_FDS;

/// The unit in which the log's pages are kept or given back: small enough that the few
/// frames a stream keeps for its life (codec headers, metadata) pin little, large enough that
/// a stream punches a few times a second, not per frame.
pub(crate) const SEGMENT: u64 = 16 * 1024;

/// A stream gets a log once it has this many players: with one, sending from the log costs
/// the copy into the log and saves none.
pub(crate) const MIN_PLAYERS: usize = 2;

/// The logs open against [`STREAM_LOG_FDS`]: each is a descriptor, and the process counts that
/// many for logs in the descriptors it needs (`fdlimit::needed`), so a stream past the bound
/// is written from memory. The engine's hub counts on [`LogFds::process`]; a test's hub may
/// count on one of its own, so that tests opening logs side by side do not take each
/// other's room.
#[derive(Debug, Default)]
pub struct LogFds {
    open: AtomicU64,
}

impl LogFds {
    /// The process's count, shared by every hub that takes it (the bound is on the process's
    /// descriptors).
    pub fn process() -> Arc<LogFds> {
        static PROCESS: OnceLock<Arc<LogFds>> = OnceLock::new();
        PROCESS.get_or_init(Arc::default).clone()
    }

    /// Whether another log may open now (no syscall: the hub asks on every frame of a stream
    /// that has none).
    pub(crate) fn room(&self) -> bool {
        self.open.load(Ordering::Acquire) < STREAM_LOG_FDS
    }

    /// Takes one place; None when all [`STREAM_LOG_FDS`] are taken.
    fn take(self: &Arc<Self>) -> Option<Place> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < STREAM_LOG_FDS).then_some(n + 1)
            })
            .ok()?;
        Some(Place(self.clone()))
    }

    /// Logs open now (tests).
    #[cfg(test)]
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Acquire)
    }
}

/// One place taken on a [`LogFds`], given back when dropped.
struct Place(Arc<LogFds>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One stream's log file.
pub(crate) struct Log {
    fd: OwnedFd,
    state: Mutex<LogState>,
    /// Declared after `fd`, as fields drop in order: the descriptor is closed before its
    /// place is given back, so not even for a moment are more than the bound open.
    _place: Place,
}

struct LogState {
    /// Where the next frame goes.
    end: u64,
    /// Live frames per segment (index = offset / SEGMENT); a segment with none has no entry.
    live: BTreeMap<u64, u32>,
}

fn lock(m: &Mutex<LogState>) -> MutexGuard<'_, LogState> {
    // A panic while holding the lock leaves plain counters behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A frame's bytes in its stream's log; dropping it gives the segments back.
pub(crate) struct LogRange {
    log: Arc<Log>,
    at: u64,
    len: u64,
}

impl fmt::Debug for LogRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogRange({}+{})", self.at, self.len)
    }
}

impl LogRange {
    /// Where the frame's bytes start in the log.
    pub fn at(&self) -> u64 {
        self.at
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The frame's bytes as the log holds them (tests).
    #[cfg(test)]
    #[allow(clippy::expect_used)]
    pub(crate) fn read(&self) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(format!("/proc/self/fd/{}", self.log.fd.as_raw_fd()))
            .expect("the log's file");
        let mut got = vec![0u8; usize::try_from(self.len).expect("a test frame's length")];
        file.read_exact_at(&mut got, self.at)
            .expect("the frame's bytes");
        got
    }
}

/// The segments `[at, at + len)` touches.
fn segments(at: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    let last = at.saturating_add(len.max(1)).saturating_sub(1);
    (at / SEGMENT)..=(last / SEGMENT)
}

impl Log {
    /// A new, empty log counted on `fds`; None when [`STREAM_LOG_FDS`] are open there
    /// already, or where the system has no memory files (or no descriptor left): the stream's
    /// players are then written from memory, as without a log.
    pub fn new(fds: &Arc<LogFds>) -> Option<Arc<Log>> {
        if !huge_pages_off() {
            return None;
        }
        // Taken first: the descriptor is made only within the bound (and the place goes back
        // if it cannot be made).
        let place = fds.take()?;
        Some(Arc::new(Log {
            fd: sys::memfd()?,
            state: Mutex::new(LogState {
                end: 0,
                live: BTreeMap::new(),
            }),
            _place: place,
        }))
    }

    /// Appends `bytes`; None (and nothing kept) when the file could not take them.
    pub fn append(self: &Arc<Log>, bytes: &[u8]) -> Option<LogRange> {
        let len = u64::try_from(bytes.len()).ok()?;
        if len == 0 {
            return None;
        }
        let range = {
            let mut st = lock(&self.state);
            let at = st.end;
            let end = at.checked_add(len)?;
            for s in segments(at, len) {
                let n = st.live.entry(s).or_insert(0);
                *n = n.saturating_add(1);
            }
            // (A segment emptied while the end was inside it is not passed by this append
            // without this frame counting in it: it is punched when its last frame goes.)
            st.end = end;
            LogRange {
                log: self.clone(),
                at,
                len,
            }
        };
        // Written after the segments are counted (nobody punches them) and before the frame
        // reaches any player (the caller sends it on afterwards).
        sys::write_all_at(&self.fd, bytes, range.at).ok()?;
        Some(range)
    }

    /// Writes up to `len` bytes of the log from `at` to `sock` without waiting; the bytes
    /// written (0: the socket is full).
    pub fn send_to(&self, sock: BorrowedFd<'_>, at: u64, len: usize) -> std::io::Result<usize> {
        sys::sendfile(sock, self.fd.as_raw_fd(), at, len)
    }

    /// Gives back the pages of `segs` (sorted), adjacent ones in one call.
    fn punch(&self, segs: &[u64]) {
        let mut i = 0;
        while let Some(&first) = segs.get(i) {
            let mut last = first;
            i += 1;
            while segs.get(i) == Some(&last.saturating_add(1)) {
                last += 1;
                i += 1;
            }
            let n = last - first + 1;
            // A failure leaves the pages in the file: memory held longer, nothing wrong sent.
            let _ = sys::punch(&self.fd, first * SEGMENT, n * SEGMENT);
        }
    }

    /// Bytes appended so far (tests).
    #[cfg(test)]
    fn end(&self) -> u64 {
        lock(&self.state).end
    }
}

/// The policy selected in a sysfs THP setting ("always [never] advise" -> "never").
fn selected(setting: &str) -> Option<&str> {
    let start = setting.find('[')?;
    let rest = setting.get(start + 1..)?;
    rest.get(..rest.find(']')?)
}

/// Whether `top` (transparent_hugepage/shmem_enabled) and `sizes` (each
/// hugepages-<size>kB/shmem_enabled with its size in KiB) keep a memory file written with
/// `pwrite` in pages no larger than a segment: no policy that gives such writes large pages,
/// for any size above [`SEGMENT`] (`inherit` follows `top`). Unreadable settings count as
/// no huge pages (a kernel without them has no files).
fn huge_pages_safe(top: Option<&str>, sizes: &[(u64, Option<&str>)]) -> bool {
    let gives = |p: Option<&str>| matches!(p, Some("always" | "within_size" | "force"));
    if gives(top) {
        return false;
    }
    !sizes
        .iter()
        .any(|&(kib, p)| kib.saturating_mul(1024) > SEGMENT && gives(p))
}

/// [`huge_pages_safe`] for this system, read once.
fn huge_pages_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| {
        let dir = std::path::Path::new("/sys/kernel/mm/transparent_hugepage");
        let top = std::fs::read_to_string(dir.join("shmem_enabled")).ok();
        let mut sizes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(kib) = name
                    .strip_prefix("hugepages-")
                    .and_then(|n| n.strip_suffix("kB"))
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                sizes.push((
                    kib,
                    std::fs::read_to_string(e.path().join("shmem_enabled")).ok(),
                ));
            }
        }
        let sizes: Vec<(u64, Option<&str>)> = sizes
            .iter()
            .map(|(k, s)| (*k, s.as_deref().and_then(selected)))
            .collect();
        huge_pages_safe(top.as_deref().and_then(selected), &sizes)
    })
}

impl Drop for LogRange {
    fn drop(&mut self) {
        let mut freed = Vec::new();
        {
            let mut st = lock(&self.log.state);
            let end = st.end;
            for s in segments(self.at, self.len) {
                let Some(n) = st.live.get_mut(&s) else {
                    continue;
                };
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.live.remove(&s);
                    // A segment the end has not passed yet may still take frames: it is
                    // punched when an append passes it.
                    if (s + 1).saturating_mul(SEGMENT) <= end {
                        freed.push(s);
                    }
                }
            }
        }
        self.log.punch(&freed);
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

    pub fn memfd() -> Option<OwnedFd> {
        // SAFETY: a constant NUL-terminated name; the call returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"rtmpgate-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor just made, owned by nobody else.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn write_all_at(fd: &OwnedFd, mut bytes: &[u8], mut at: u64) -> io::Result<()> {
        while !bytes.is_empty() {
            let off = libc::off_t::try_from(at).map_err(|_| io::Error::other("log too long"))?;
            // SAFETY: `bytes` is a live slice of the given length; the descriptor is open.
            let n =
                unsafe { libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), off) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            bytes = bytes.get(n..).unwrap_or(&[]);
            at = at.saturating_add(n as u64);
        }
        Ok(())
    }

    pub fn sendfile(sock: BorrowedFd<'_>, file: RawFd, at: u64, len: usize) -> io::Result<usize> {
        let mut off = libc::off_t::try_from(at).map_err(|_| io::Error::other("log too long"))?;
        // A closed peer makes this EPIPE; SIGPIPE is ignored in a Rust program (the standard
        // library sets it so before main), so it is an error here and nothing else.
        // SAFETY: both descriptors are open for the call (the caller's note); `off` is ours.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file, &mut off, len) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub fn punch(fd: &OwnedFd, at: u64, len: u64) -> io::Result<()> {
        let (Ok(at), Ok(len)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else {
            return Err(io::Error::other("log too long"));
        };
        // SAFETY: plain integers on an open descriptor.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

    pub fn memfd() -> Option<OwnedFd> {
        None
    }
    pub fn write_all_at(_: &OwnedFd, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn sendfile(_: BorrowedFd<'_>, _: RawFd, _: u64, _: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn punch(_: &OwnedFd, _: u64, _: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// Bytes of the log's file that hold data (not holes), from /proc's block count.
    fn resident(log: &Log) -> u64 {
        let st = std::fs::metadata(format!("/proc/self/fd/{}", log.fd.as_raw_fd())).unwrap();
        std::os::unix::fs::MetadataExt::blocks(&st) * 512
    }

    #[test]
    fn a_frame_sent_from_the_log_arrives_whole_and_segments_are_given_back() {
        let log = Log::new(&Arc::default()).expect("memfd");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let a: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..5_000u32).map(|i| (i % 13) as u8).collect();
        let ra = log.append(&a).unwrap();
        let rb = log.append(&b).unwrap();
        assert_eq!(rb.at(), a.len() as u64);
        let n = log
            .send_to(server.as_fd(), ra.at() + 1000, a.len() - 1000 + b.len())
            .unwrap();
        assert_eq!(n, a.len() - 1000 + b.len());
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got[..a.len() - 1000], &a[1000..]);
        assert_eq!(&got[a.len() - 1000..], &b[..]);
        // `c` takes the end past the third segment, which `a` shares with `b`.
        let c = vec![7u8; 20_000];
        let rc = log.append(&c).unwrap();
        assert!(resident(&log) >= 65_000);
        // The first two segments hold only `a`: gone with it. The third and fourth stay.
        drop(ra);
        let after = resident(&log);
        assert!(after <= 2 * SEGMENT, "{after} bytes still held");
        // `b` still reads back as written (its segment, passed and shared with `a`, kept).
        let n = log.send_to(server.as_fd(), rb.at(), b.len()).unwrap();
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b);
        // The segment the end is in stays while appends may still go there.
        drop(rb);
        drop(rc);
        assert_eq!(log.end(), 65_000);
        let held = resident(&log);
        assert!(held <= SEGMENT, "{held} bytes held with no live frame");
    }

    #[test]
    fn no_log_where_the_file_could_get_pages_larger_than_a_segment() {
        assert_eq!(
            selected("always inherit within_size advise [never]"),
            Some("never")
        );
        assert_eq!(selected("[always] never"), Some("always"));
        assert_eq!(selected("never"), None);
        let never = Some("never");
        assert!(huge_pages_safe(
            never,
            &[(2048, Some("inherit")), (64, never)]
        ));
        assert!(huge_pages_safe(Some("advise"), &[(2048, Some("advise"))]));
        assert!(huge_pages_safe(None, &[]));
        assert!(!huge_pages_safe(Some("always"), &[]));
        assert!(!huge_pages_safe(Some("within_size"), &[]));
        assert!(!huge_pages_safe(Some("force"), &[]));
        assert!(!huge_pages_safe(never, &[(64, Some("always"))]));
        assert!(!huge_pages_safe(never, &[(2048, Some("within_size"))]));
        // Pages no larger than a segment are never cut by a punch.
        assert!(huge_pages_safe(
            never,
            &[(16, Some("always")), (8, Some("always"))]
        ));
    }

    #[test]
    fn segments_cover_a_range() {
        assert_eq!(segments(0, 1), 0..=0);
        assert_eq!(segments(0, SEGMENT), 0..=0);
        assert_eq!(segments(SEGMENT - 1, 2), 0..=1);
        assert_eq!(segments(3 * SEGMENT, 0), 3..=3);
    }
}
