//! The fan-out lane: players whose media flows steadily are written on the merge window's
//! ticks by one task per shard, with non-blocking vectored writes straight to their sockets,
//! instead of each player's own task being woken for every tick (a timer, a task wake-up and
//! a poll of every branch of its `select!`, per player per tick: about half of the engine's
//! user-space time with 1,000 players, see bench/RESULTS.md).
//!
//! A player's session hands its ring receiver to the lane once it is in steady state (plain
//! TCP, live, nothing of its own queued, not skipping, paused or filtering) and keeps reading
//! its client meanwhile. The lane gives the receiver back (ejects it) whenever the session is
//! needed: a write the socket did not take whole (the unwritten rest goes back with it and
//! the session writes it under its write timeout, so a slow player is handled exactly as
//! before), an event other than a frame, a frame too far behind live (the session starts
//! skipping), or a drain that reached its bound. The session takes it back itself before it
//! writes anything of its own (a reply must follow the media already sent) or ends. Handing
//! over happens under the shard's lock, which a tick holds while it writes one chunk of
//! players, so a player is never written by both at once and never mid-message when it
//! changes hands.
//!
//! A tick writes its players in chunks of [`CHUNK`] and lets the runtime run other tasks
//! between chunks, with the lock released: one uninterrupted tick over a thousand players
//! (about 10 ms) kept the publisher's socket unread meanwhile, so a frame arriving then
//! reached every player a window late (p99 at 1,000 players rose from 96 to 110-118 ms).
//! To keep each player written exactly once per tick, in the same order every tick (so its
//! writes stay one window apart), a player leaving between chunks leaves a hole in its place
//! instead of moving another player into it; holes are compacted when the tick ends, and a
//! player joining mid-tick is added after the others.
//!
//! A frame of a stream that keeps a log ([`super::log`]: streams with players, when the
//! engine has a merge window) is sent from there with `sendfile`: the socket gets references
//! to the log's pages instead of a copy of the frame per player (the copy was a quarter of
//! the engine's samples at 1,000 players; without it the engine takes 0.83x the CPU at
//! 1,000 players and 3 Mb/s, 0.95x at 1.6 Mb/s, where writes are smaller: bench/RESULTS.md).
//! The frames of a tick follow each other in the log, so a
//! player's tick is one `sendfile`, as it was one `sendmsg`; the lane holds the frames until
//! the call returns, which keeps their bytes in the log. What a socket does not take goes back
//! to the session as plain bytes, as before.
//!
//! The lane writes to the descriptor of the session's own socket (no second descriptor: an
//! engine client costs one, as the door's descriptor budget assumes). That is sound because
//! a player is in a lane only while its session holds its [`Seat`], whose drop takes it out
//! under the lock (waiting for a chunk being written), and the seat is dropped before the
//! socket: the session leaves its lane when it stops serving, and the connection state
//! holding the seat is a local of the session's async fn, which drops its locals before its
//! parameters (the socket) whether it returns or is cancelled. The lane looks a player up
//! again under the lock for every write and keeps no descriptor across the pause between
//! chunks, so a seat dropped during that pause leaves a hole that is never written.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tokio::sync::oneshot;

use super::hub::{Event, Frame, LagProbe};
use super::tick;
use crate::rtmp::message::VIDEO;
use crate::stream::SentHook;

/// Events a lane drains for one player per tick, and bytes it queues, before it writes them
/// and hands the player back to its session (which drains the rest at once): the same bounds
/// as a session's own drain.
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;
/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Bytes asked of one `sendfile` (a drain queues at most about `BATCH_BYTES` anyway).
const SENDFILE_MAX: usize = 2 * BATCH_BYTES;
/// Players a tick writes before it lets other tasks run (the publisher's reads among them):
/// a few hundred microseconds of writes, against a window of tens of milliseconds.
const CHUNK: usize = 32;
/// Bytes written before they are added to the session table's counters: adding every write
/// touches a cold cache line per player per tick (6% of the engine's samples at 1,000
/// players); the counters lag by at most this much per player (and are exact once the
/// player leaves the lane).
const SENT_BATCH: usize = 256 * 1024;

/// What a player's session hands the lane.
pub(crate) struct Join {
    /// The player's socket ([`crate::stream::ClientStream::socket_fd`]), non-blocking; open
    /// for as long as the [`Seat`] (see the module's note).
    pub sock: RawFd,
    pub rx: broadcast::Receiver<Event>,
    pub lag: LagProbe,
    /// The player's message stream and chunk size, and the hub's (see `Frame::chunks_for`).
    pub stream_id: u32,
    pub chunk_size: u32,
    pub shared_chunk_size: u32,
    pub max_lag_bytes: u64,
    pub has_video: bool,
    /// Counts the bytes written for the session table (the lane bypasses the counted stream).
    pub sent: Option<SentHook>,
}

/// What the lane hands back to a player's session.
pub(crate) struct Returned {
    pub rx: broadcast::Receiver<Event>,
    /// Bytes of a write the socket did not take whole: the session writes them first.
    pub leftover: Vec<Bytes>,
    /// The event the lane stopped at, for the session to handle as its own.
    pub event: Option<Result<Event, RecvError>>,
    /// The drain reached its bound: the ring holds more.
    pub more: bool,
    pub has_video: bool,
    /// Bytes the lane wrote to the client.
    pub written: u64,
}

/// Bytes queued for one player: a frame's chunked bytes (or what is left of them), with the
/// frame itself when they can be sent from its stream's log ([`super::log`]): holding the
/// frame keeps its bytes in the log until the write is done.
struct Piece {
    bytes: Bytes,
    frame: Option<Arc<Frame>>,
}

impl Piece {
    /// Where `bytes` sit in the frame's log, and the log.
    fn in_log(&self) -> Option<(&Arc<super::log::Log>, u64)> {
        let f = self.frame.as_ref()?;
        let range = f.log.as_ref()?;
        // `bytes` is the end of `chunked` (a write that took part of it cut the front).
        let skip = f.chunked.len().checked_sub(self.bytes.len())?;
        Some((range.log(), range.at().checked_add(skip as u64)?))
    }
}

struct Entry {
    id: u64,
    join: Join,
    written: u64,
    /// Written but not yet added to the session table's counters (`SENT_BATCH`).
    unsent: usize,
    back: oneshot::Sender<Returned>,
}

impl Entry {
    fn count_sent(&mut self) {
        if let (Some(sent), n) = (&self.join.sent, self.unsent) {
            if n > 0 {
                sent.count_sent(n);
            }
        }
        self.unsent = 0;
    }

    fn into_returned(
        mut self,
        leftover: Vec<Bytes>,
        event: Option<Result<Event, RecvError>>,
        more: bool,
    ) -> (oneshot::Sender<Returned>, Returned) {
        self.count_sent();
        let ret = Returned {
            rx: self.join.rx,
            leftover,
            event,
            more,
            has_video: self.join.has_video,
            written: self.written,
        };
        (self.back, ret)
    }

    /// Drains this player's ring and writes what it holds; Some when the player goes back
    /// to its session (with the unwritten bytes, the event stopped at, and whether more is
    /// left).
    #[allow(clippy::type_complexity)]
    fn tick(
        &mut self,
        bufs: &mut VecDeque<Piece>,
    ) -> Option<(Vec<Bytes>, Option<Result<Event, RecvError>>, bool)> {
        bufs.clear();
        let j = &mut self.join;
        let mut queued = 0usize;
        let mut event = None;
        let mut more = true;
        for _ in 0..BATCH_EVENTS {
            if queued >= BATCH_BYTES {
                break;
            }
            let ev = match j.rx.try_recv() {
                Ok(ev) => ev,
                Err(TryRecvError::Empty) => {
                    more = false;
                    break;
                }
                Err(TryRecvError::Closed) => {
                    more = false;
                    event = Some(Err(RecvError::Closed));
                    break;
                }
                Err(TryRecvError::Lagged(n)) => {
                    more = false;
                    event = Some(Err(RecvError::Lagged(n)));
                    break;
                }
            };
            match ev {
                Event::Frame(f) => {
                    // Past the lag bound the session starts skipping, exactly as it would.
                    if !f.kind.is_header() && j.lag.lag_bytes(&f) > j.max_lag_bytes {
                        more = false;
                        event = Some(Ok(Event::Frame(f)));
                        break;
                    }
                    if f.msg_type == VIDEO {
                        j.has_video = true;
                    }
                    let (head, body) = f.chunks_for(j.stream_id, j.chunk_size, j.shared_chunk_size);
                    // The shared chunking as is: from the log, when the stream keeps one.
                    let shared = head.is_none() && f.log.is_some();
                    queued = queued.saturating_add(body.len());
                    if let Some(h) = head.filter(|h| !h.is_empty()) {
                        queued = queued.saturating_add(h.len());
                        bufs.push_back(Piece {
                            bytes: h,
                            frame: None,
                        });
                    }
                    if !body.is_empty() {
                        bufs.push_back(Piece {
                            bytes: body,
                            frame: shared.then_some(f),
                        });
                    }
                }
                Event::Filler => {}
                other => {
                    more = false;
                    event = Some(Ok(other));
                    break;
                }
            }
        }
        let stuck = self.write(bufs);
        if stuck || event.is_some() || more {
            return Some((bufs.drain(..).map(|p| p.bytes).collect(), event, more));
        }
        None
    }

    /// Writes `bufs` without waiting; true when the socket did not take all of it (full, or
    /// failed: the session's own write of the rest meets the error and ends the session).
    /// Bytes that follow each other in a log go in one `sendfile`, the others in one vectored
    /// `sendmsg`.
    fn write(&mut self, bufs: &mut VecDeque<Piece>) -> bool {
        while let Some(front) = bufs.front() {
            // SAFETY: the descriptor stays open while this entry is in its lane (the module's
            // note: the seat that removes it is dropped before the socket is).
            let fd = unsafe { BorrowedFd::borrow_raw(self.join.sock) };
            let sent = if let Some((log, at)) = front.in_log() {
                // The run of pieces that continue each other in the same log.
                let mut len = front.bytes.len();
                for p in bufs.iter().skip(1) {
                    match p.in_log() {
                        Some((l, a))
                            if Arc::ptr_eq(l, log)
                                && Some(a) == at.checked_add(len as u64)
                                && len < SENDFILE_MAX =>
                        {
                            len = len.saturating_add(p.bytes.len());
                        }
                        _ => break,
                    }
                }
                log.send_to(fd, at, len.min(SENDFILE_MAX))
            } else {
                let mut iov = [IoSlice::new(&[]); IOV_MAX];
                let mut k = 0;
                for (slot, p) in iov.iter_mut().zip(bufs.iter()) {
                    if p.in_log().is_some() {
                        break;
                    }
                    *slot = IoSlice::new(&p.bytes);
                    k += 1;
                }
                // sendmsg rather than writev: the socket call skips the file layer's work
                // (vfs_writev, fdget_pos: 8% of the engine's samples at 1,000 players).
                let sock = socket2::SockRef::from(&fd);
                sock.send_vectored_with_flags(iov.get(..k).unwrap_or(&[]), SEND_FLAGS)
            };
            let n = match sent {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            };
            self.written = self.written.saturating_add(n as u64);
            self.unsent = self.unsent.saturating_add(n);
            if self.unsent >= SENT_BATCH {
                self.count_sent();
            }
            let mut left = n;
            while left > 0 {
                let Some(front) = bufs.front_mut() else {
                    break;
                };
                if front.bytes.len() <= left {
                    left -= front.bytes.len();
                    bufs.pop_front();
                } else {
                    let _ = front.bytes.split_to(left);
                    left = 0;
                }
            }
        }
        false
    }
}

/// Never wait (the socket is non-blocking anyway), and a closed peer is an error, not a
/// SIGPIPE.
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;

struct LaneState {
    /// In the order they are written; None where a player left since the last tick's end
    /// (see the module's note).
    entries: Vec<Option<Entry>>,
    /// The shard's task is running (it ends when its last player leaves).
    running: bool,
}

struct Lane {
    state: Mutex<LaneState>,
}

fn lock(m: &Mutex<LaneState>) -> MutexGuard<'_, LaneState> {
    // A panic while holding the lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lane {
    async fn run(self: Arc<Lane>, window: Duration) {
        let mut bufs: VecDeque<Piece> = VecDeque::new();
        loop {
            let due = tick::next_after(Instant::now(), window);
            tokio::time::sleep_until(due.into()).await;
            if !self.tick_starts() {
                return;
            }
            let mut at = 0;
            while !self.write_chunk(&mut at, &mut bufs) {
                // The lock is not held here: the publisher's frames are read meanwhile (and
                // reach the players after this one in this very tick), sessions take their
                // players back, new ones join.
                tokio::task::yield_now().await;
            }
            self.tick_ends();
        }
    }

    /// A tick begins: false (and the lane's task ends) when it has no player left.
    fn tick_starts(&self) -> bool {
        let mut st = lock(&self.state);
        if st.entries.iter().all(Option::is_none) {
            st.entries.clear();
            st.running = false;
            return false;
        }
        true
    }

    /// Writes the next [`CHUNK`] places from `*at` on; true when the tick has reached the
    /// end. The players are written in the same order every tick (a few ms for a thousand),
    /// so each one is written one window after the last time and a frame waits at most one
    /// window whatever the player's place. (Moving the start each tick made the gaps uneven:
    /// up to a window plus the tick's length.)
    fn write_chunk(&self, at: &mut usize, bufs: &mut VecDeque<Piece>) -> bool {
        let mut st = lock(&self.state);
        let end = at.saturating_add(CHUNK).min(st.entries.len());
        while *at < end {
            let slot = st.entries.get_mut(*at);
            *at += 1;
            let Some(slot) = slot else {
                break;
            };
            let Some(e) = slot else {
                continue;
            };
            let Some((leftover, event, more)) = e.tick(bufs) else {
                continue;
            };
            // Handed back: its place becomes a hole, so no other player moves this tick.
            let Some(e) = slot.take() else {
                continue;
            };
            let (back, ret) = e.into_returned(leftover, event, more);
            // A session that has gone drops its seat, which removes its entry: a closed
            // channel here cannot happen, and would only drop the receiver.
            let _ = back.send(ret);
        }
        *at >= st.entries.len()
    }

    /// The tick is over: the places of the players that left close up, in order.
    fn tick_ends(&self) {
        lock(&self.state).entries.retain(Option::is_some);
    }

    /// Takes the player out, leaving a hole in its place.
    fn take(&self, id: u64) -> Option<Entry> {
        let mut st = lock(&self.state);
        st.entries
            .iter_mut()
            .find(|e| e.as_ref().is_some_and(|e| e.id == id))
            .and_then(Option::take)
    }
}

/// The engine's lanes: one shard per worker thread, so players are written in parallel on a
/// multi-core machine (a shard's tick runs on one thread at a time).
pub(crate) struct Lanes {
    shards: Vec<Arc<Lane>>,
    window: Duration,
}

impl Lanes {
    pub fn new(window: Duration) -> Lanes {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Lanes {
            shards: (0..n)
                .map(|_| {
                    Arc::new(Lane {
                        state: Mutex::new(LaneState {
                            entries: Vec::new(),
                            running: false,
                        }),
                    })
                })
                .collect(),
            window,
        }
    }

    /// The lane writes this player from its next tick on; None when there is no window
    /// (every frame is written as it comes) or no runtime to tick on.
    pub fn join(&self, id: u64, join: Join) -> Result<Seat, Join> {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(join);
        };
        if self.window.is_zero() || self.shards.is_empty() {
            return Err(join);
        }
        let at = usize::try_from(id).unwrap_or(0) % self.shards.len();
        let Some(lane) = self.shards.get(at).cloned() else {
            return Err(join);
        };
        let (back, returned) = oneshot::channel();
        let mut st = lock(&lane.state);
        st.entries.push(Some(Entry {
            id,
            join,
            written: 0,
            unsent: 0,
            back,
        }));
        if !st.running {
            st.running = true;
            rt.spawn(lane.clone().run(self.window));
        }
        drop(st);
        Ok(Seat { lane, id, returned })
    }
}

/// A player's place in a lane, held by its session; dropping it removes the player.
pub(crate) struct Seat {
    lane: Arc<Lane>,
    id: u64,
    returned: oneshot::Receiver<Returned>,
}

impl Seat {
    /// Completes when the lane hands the player back (Err: the lane is gone, never in
    /// practice: entries leave only through a return or this seat's drop).
    pub async fn returned(&mut self) -> Result<Returned, oneshot::error::RecvError> {
        (&mut self.returned).await
    }

    /// Takes the player back now: from the lane, or (when a tick handed it back a moment
    /// ago) from the channel. None only if the lane is gone.
    pub fn reclaim(mut self) -> Option<Returned> {
        match self.lane.take(self.id) {
            Some(e) => Some(e.into_returned(Vec::new(), None, false).1),
            None => self.returned.try_recv().ok(),
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(mut e) = self.lane.take(self.id) {
            e.count_sent();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::engine::hub::{Hub, HubConfig, StreamKey, SHARED_STREAM_ID};
    use crate::rtmp::message::AUDIO;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A hub that keeps its streams' logs, as the engine's does with a merge window: the
    /// lane sends from them. Counted apart from other tests' logs, so the bound on open logs
    /// never leaves these streams without one.
    fn logged_hub() -> Arc<Hub> {
        Hub::new(HubConfig {
            log: Some(Arc::default()),
            ..HubConfig::default()
        })
    }

    /// A connected pair: the server's end (non-blocking, as tokio's sockets are) and the
    /// client's.
    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    fn read_n(c: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut got).unwrap();
        got
    }

    /// What a player's session hands the lane for `server`: the player's ring receiver
    /// (an idle one left in its place) and the hub's chunk size.
    fn join_for(
        server: &TcpStream,
        player: &mut crate::engine::hub::Player,
        max_lag_bytes: u64,
        has_video: bool,
        sent: Option<SentHook>,
    ) -> Join {
        let (_, idle) = broadcast::channel(1);
        Join {
            sock: std::os::fd::AsRawFd::as_raw_fd(server),
            rx: std::mem::replace(&mut player.rx, idle),
            lag: player.lag_probe(),
            stream_id: SHARED_STREAM_ID,
            chunk_size: 4096,
            shared_chunk_size: 4096,
            max_lag_bytes,
            has_video,
            sent,
        }
    }

    #[tokio::test]
    async fn writes_frames_on_ticks_and_hands_the_player_back_at_an_event() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "s");
        let publisher = hub.publish(&key).unwrap();
        let mut player = hub.play(&key);
        let (server, mut client) = pair();
        let counted = Arc::new(AtomicUsize::new(0));
        let c2 = counted.clone();
        let lanes = Lanes::new(Duration::from_millis(10));
        let join = join_for(
            &server,
            &mut player,
            1 << 20,
            false,
            Some(Arc::new(move |n| {
                c2.fetch_add(n, Ordering::Relaxed);
            })),
        );
        let Ok(mut seat) = lanes.join(7, join) else {
            panic!("no lane");
        };
        // Two frames, written as the hub chunked them, by the lane's next tick.
        let mut want = Vec::new();
        let mut sub = hub.play(&key);
        for i in 0..2u8 {
            publisher
                .push(AUDIO, u32::from(i) * 20, Bytes::from(vec![0xaf, 1, i]))
                .unwrap();
            if let Ok(Event::Frame(f)) = sub.rx.recv().await {
                want.extend_from_slice(&f.chunked);
            }
        }
        let got = tokio::task::spawn_blocking(move || {
            let got = read_n(&mut client, want.len());
            (got, want, client)
        })
        .await
        .unwrap();
        assert_eq!(got.0, got.1);
        // The publisher leaving is an event for the session: the player comes back with it.
        drop(publisher);
        let ret = tokio::time::timeout(Duration::from_secs(5), seat.returned())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ret.event, Some(Ok(Event::Unpublished))));
        assert!(ret.leftover.is_empty());
        assert_eq!(ret.written as usize, got.1.len());
        // Counted once it left the lane.
        assert_eq!(counted.load(Ordering::Relaxed), got.1.len());
        drop(got);
    }

    #[tokio::test]
    async fn a_full_socket_hands_the_unwritten_rest_back() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "full");
        let publisher = hub.publish(&key).unwrap();
        let mut player = hub.play(&key);
        let (server, client) = pair();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let lanes = Lanes::new(Duration::from_millis(10));
        let join = join_for(&server, &mut player, 64 << 20, false, None);
        let Ok(mut seat) = lanes.join(1, join) else {
            panic!("no lane");
        };
        // Far more than the socket's buffers take while the client reads nothing.
        for i in 0..64u32 {
            publisher
                .push(AUDIO, i * 20, Bytes::from(vec![0xaf; 64 * 1024]))
                .unwrap();
        }
        let ret = tokio::time::timeout(Duration::from_secs(5), seat.returned())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !ret.leftover.is_empty(),
            "the rest comes back to the session"
        );
        assert!(ret.event.is_none());
        drop(client);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_log_sends_and_what_comes_back_are_the_frames_in_order() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "order");
        let publisher = hub.publish(&key).unwrap();
        let mut player = hub.play(&key);
        let mut sub = hub.play(&key);
        let (server, mut client) = pair();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(8192)
            .unwrap();
        let lanes = Lanes::new(Duration::from_millis(10));
        let mut join = join_for(&server, &mut player, 64 << 20, false, None);
        // A reader on another thread with a small socket buffer between: the lane's writes
        // end part-way through a frame and, the reader having made room meanwhile, go on
        // from there; or the socket is full and the player comes back with the rest.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            client
                .set_read_timeout(Some(Duration::from_millis(1000)))
                .unwrap();
            while let Ok(n) = client.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let frames = tokio::spawn(async move {
            let mut want = Vec::new();
            for i in 0..100u32 {
                let len = 20_000 + (i as usize * 7919) % 60_000;
                publisher
                    .push(AUDIO, i * 20, Bytes::from(vec![(i % 250) as u8; len]))
                    .unwrap();
                loop {
                    match sub.rx.recv().await {
                        Ok(Event::Frame(f)) => {
                            assert!(f.log.is_some(), "the frame is in the log");
                            want.extend_from_slice(&f.chunked);
                            break;
                        }
                        // The ring's byte bound pushing old frames out.
                        Ok(Event::Filler) => {}
                        other => panic!("{other:?}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            want
        });
        // The session's part: write what came back, and hand the player to the lane again,
        // until the publisher has gone.
        let mut returns = 0;
        loop {
            let Ok(mut seat) = lanes.join(1, join) else {
                panic!("no lane");
            };
            let ret = tokio::time::timeout(Duration::from_secs(10), seat.returned())
                .await
                .unwrap()
                .unwrap();
            drop(seat);
            returns += 1;
            server.set_nonblocking(false).unwrap();
            for b in &ret.leftover {
                (&server).write_all(b).unwrap();
            }
            server.set_nonblocking(true).unwrap();
            if matches!(ret.event, Some(Ok(Event::Unpublished))) {
                break;
            }
            assert!(ret.event.is_none(), "{:?}", ret.event);
            let (_, idle) = broadcast::channel(1);
            join = join_for(&server, &mut player, 64 << 20, false, None);
            join.rx = ret.rx;
            drop(std::mem::replace(&mut player.rx, idle));
        }
        let want = frames.await.unwrap();
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got.len(), want.len(), "after {returns} returns");
        assert!(got == want, "the bytes differ from the frames");
    }

    #[tokio::test]
    async fn reclaim_takes_the_player_back_between_ticks() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "back");
        let _publisher = hub.publish(&key).unwrap();
        let mut player = hub.play(&key);
        let (server, _client) = pair();
        let lanes = Lanes::new(Duration::from_millis(10));
        let join = join_for(&server, &mut player, 1 << 20, true, None);
        let Ok(seat) = lanes.join(3, join) else {
            panic!("no lane");
        };
        tokio::time::sleep(Duration::from_millis(25)).await;
        let ret = seat.reclaim().expect("back from the lane");
        assert!(ret.event.is_none() && ret.leftover.is_empty() && !ret.more);
        assert!(ret.has_video);
        // Without a window there is no lane.
        let none = Lanes::new(Duration::ZERO);
        let (server, _c) = pair();
        let join = join_for(&server, &mut player, 1 << 20, false, None);
        assert!(none.join(4, join).is_err());
    }

    /// Many players of one stream in one lane whose task never ticks on its own (an hour's
    /// window), so a test can drive a tick chunk by chunk: their seats, their clients, and
    /// the lane.
    struct Crowd {
        seats: Vec<Option<Seat>>,
        clients: Vec<TcpStream>,
        // The server ends stay open for the whole test (a seat's drop must keep the lane
        // off them by itself).
        _servers: Vec<TcpStream>,
        lane: Arc<Lane>,
        lanes: Lanes,
    }

    fn seat_player(
        lanes: &Lanes,
        hub: &Arc<Hub>,
        key: &StreamKey,
        id: u64,
    ) -> (Seat, TcpStream, TcpStream) {
        let mut player = hub.play(key);
        let (server, client) = pair();
        let join = join_for(&server, &mut player, 1 << 20, false, None);
        let Ok(seat) = lanes.join(id, join) else {
            panic!("no lane");
        };
        client.set_nonblocking(true).unwrap();
        (seat, server, client)
    }

    fn crowd(hub: &Arc<Hub>, key: &StreamKey, n: usize) -> Crowd {
        let lanes = Lanes::new(Duration::from_secs(3600));
        let mut c = Crowd {
            seats: Vec::new(),
            clients: Vec::new(),
            _servers: Vec::new(),
            lane: lanes.shards[0].clone(),
            lanes,
        };
        for i in 0..n {
            // Every id on the first shard, whatever the machine's thread count.
            let id = (i * c.lanes.shards.len()) as u64;
            let (seat, server, client) = seat_player(&c.lanes, hub, key, id);
            c.seats.push(Some(seat));
            c._servers.push(server);
            c.clients.push(client);
        }
        c
    }

    /// What a client has received so far (the lane's writes reach a loopback peer before
    /// `sendmsg` returns).
    fn received(c: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    /// Publishes one audio frame; its bytes as the lane writes them.
    async fn frame(
        publisher: &crate::engine::hub::Publisher,
        sub: &mut crate::engine::hub::Player,
        ts: u32,
    ) -> Vec<u8> {
        publisher
            .push(AUDIO, ts, Bytes::from(vec![0xaf, 1, ts as u8, 7]))
            .unwrap();
        match sub.rx.recv().await {
            Ok(Event::Frame(f)) => f.chunked.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_player_leaving_mid_tick_is_not_written_after_its_seat_drops() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "leave");
        let publisher = hub.publish(&key).unwrap();
        let mut sub = hub.play(&key);
        let n = 3 * CHUNK + 5;
        let mut c = crowd(&hub, &key, n);
        let a = frame(&publisher, &mut sub, 0).await;
        let mut bufs = VecDeque::new();
        assert!(c.lane.tick_starts());
        let mut at = 0;
        assert!(
            !c.lane.write_chunk(&mut at, &mut bufs),
            "more than one chunk"
        );
        assert_eq!(at, CHUNK);
        // Between chunks: players written already and players not yet written leave (their
        // seats drop, or their sessions take them back), the last one among them.
        let gone = [3, CHUNK + 1, 2 * CHUNK + 7, n - 1];
        for &i in &gone {
            if i % 2 == 0 {
                drop(c.seats[i].take());
            } else {
                let ret = c.seats[i].take().unwrap().reclaim().expect("taken back");
                assert!(ret.leftover.is_empty() && ret.event.is_none());
            }
        }
        let before: Vec<Vec<u8>> = gone.iter().map(|&i| received(&mut c.clients[i])).collect();
        while !c.lane.write_chunk(&mut at, &mut bufs) {}
        c.lane.tick_ends();
        for (k, &i) in gone.iter().enumerate() {
            let after = received(&mut c.clients[i]);
            assert!(after.is_empty(), "player {i} was written after it left");
            // Written in this tick only if its chunk came before it left.
            let want: &[u8] = if i < CHUNK { &a } else { &[] };
            assert_eq!(before[k], want, "player {i}");
        }
        for i in (0..n).filter(|i| !gone.contains(i)) {
            assert_eq!(received(&mut c.clients[i]), a, "player {i}");
        }
        // Another tick writes the others and nobody who left.
        let b = frame(&publisher, &mut sub, 20).await;
        assert!(c.lane.tick_starts());
        let mut at = 0;
        while !c.lane.write_chunk(&mut at, &mut bufs) {}
        c.lane.tick_ends();
        assert_eq!(
            lock(&c.lane.state).entries.len(),
            n - gone.len(),
            "holes compacted"
        );
        for i in 0..n {
            let got = received(&mut c.clients[i]);
            if gone.contains(&i) {
                assert!(got.is_empty(), "player {i} was written after it left");
            } else {
                assert_eq!(got, b, "player {i}");
            }
        }
    }

    #[tokio::test]
    async fn every_player_is_written_once_per_tick_whoever_leaves_or_joins_mid_tick() {
        let hub = logged_hub();
        let key = StreamKey::new("live", "once");
        let publisher = hub.publish(&key).unwrap();
        let mut sub = hub.play(&key);
        let n = 3 * CHUNK + 5;
        let mut c = crowd(&hub, &key, n);
        // A late joiner, subscribed now: it joins the lane in the middle of the tick.
        let late_id = (n * c.lanes.shards.len()) as u64;
        let mut late_player = hub.play(&key);
        let a = frame(&publisher, &mut sub, 0).await;
        let mut bufs = VecDeque::new();
        assert!(c.lane.tick_starts());
        let mut at = 0;
        let mut chunks = 0;
        let mut gone = Vec::new();
        let mut frames = vec![a];
        let mut late = None;
        loop {
            let done = c.lane.write_chunk(&mut at, &mut bufs);
            chunks += 1;
            if done {
                break;
            }
            // A frame between every two chunks: a player written twice in this tick would
            // get it, a player skipped would miss everything.
            let ts = 20 * chunks as u32;
            frames.push(frame(&publisher, &mut sub, ts).await);
            // A player before the cursor and one after it leave, which must move nobody.
            for i in [at - 2, at + 1] {
                if i < n && c.seats[i].is_some() {
                    drop(c.seats[i].take());
                    gone.push((i, i < at));
                }
            }
            if late.is_none() {
                let (server, client) = pair();
                client.set_nonblocking(true).unwrap();
                let join = join_for(&server, &mut late_player, 1 << 20, false, None);
                let Ok(seat) = c.lanes.join(late_id, join) else {
                    panic!("no lane");
                };
                late = Some((seat, server, client));
            }
        }
        c.lane.tick_ends();
        assert_eq!(
            chunks, 4,
            "{n} players in chunks of {CHUNK}, plus the late joiner"
        );
        // Player i was written once, by chunk i / CHUNK, with every frame published before.
        for i in 0..n {
            let got = received(&mut c.clients[i]);
            let k = i / CHUNK;
            // A player that left before its chunk got nothing.
            let want = if gone.contains(&(i, false)) {
                Vec::new()
            } else {
                frames[..=k].concat()
            };
            assert_eq!(got, want, "player {i} (chunk {k})");
        }
        // The late joiner, added after the others, was written once at the tick's end.
        let (late_seat, _late_server, mut late_client) = late.unwrap();
        assert_eq!(received(&mut late_client), frames.concat());
        drop(late_seat);
        assert_eq!(gone.len(), 6);
    }
}
