//! One RTMPT session: request bodies put back in sequence order, server bytes waiting for
//! the next poll, the adaptive polling byte, and [`TunnelPipe`], the byte stream the
//! consumer (upstream pump or engine) sees.
//!
//! Both sides meet under one short-held mutex. The consumer side is poll-based (wakers);
//! the HTTP side waits on a [`Notify`] that fires on every change, with deadlines.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::budget::{Charge, OverBudget};
use crate::limits::Limits;

/// Polling byte values, as Red5 sends them: 1 while data flows, growing after runs of
/// empty replies. Only Flash honours them (larger = poll less often).
const POLL_DELAYS: [u8; 6] = [1, 3, 5, 9, 17, 33];

/// Empty replies in a row before the polling byte steps up.
const EMPTY_RUN: u32 = 10;

/// Bytes each way of a complete RTMP (or RTMPE) handshake: C0/S0, then C1/S1 and C2/S2 of
/// 1536 bytes each. A session that has not moved this much both ways has not finished it.
const HANDSHAKE_BYTES: u64 = 1 + 1536 + 1536;

/// The per-session bounds, copied out of [`Limits`] once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Bytes queued each way (server-to-client pending, client-to-server unread) before
    /// the producer waits.
    pub pending: usize,
    /// Request bodies held while an earlier sequence number is missing.
    pub reorder: usize,
    /// Bytes in those held bodies.
    pub reorder_bytes: usize,
}

impl Bounds {
    pub(crate) fn from_limits(limits: &Limits) -> Self {
        Bounds {
            pending: limits.max_tunnel_pending.max(1),
            reorder: limits.max_tunnel_reorder.max(1),
            reorder_bytes: limits
                .max_tunnel_reorder_bytes
                .min(limits.max_http_body)
                .max(1),
        }
    }
}

/// What one request contributes to the session, applied in sequence order.
#[derive(Debug)]
pub(crate) enum Op {
    /// A `/send` body, kept as the frames hyper produced (no copy).
    Send(Vec<Bytes>),
    /// An `/idle`: nothing to apply, but it takes a sequence number.
    Idle,
    /// A `/close`: the client's end of the stream.
    Close,
}

impl Op {
    fn len(&self) -> usize {
        match self {
            Op::Send(frames) => frames.iter().map(Bytes::len).sum(),
            Op::Idle | Op::Close => 0,
        }
    }
}

/// Where a request's sequence number put it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Queued in order (perhaps applied already).
    Queued,
    /// A number already seen: its body is ignored, the request is still answered.
    Duplicate,
}

/// Why a request could not be placed.
#[derive(Debug)]
pub(crate) enum PlaceError {
    /// The number is too far ahead of the next expected one (or a first number above 1).
    TooFar { next: Option<u64> },
    /// The hold for out-of-order bodies is full; the op is handed back to retry later.
    Full(Op),
}

/// Sequence-number ordering of request bodies, whichever TCP connection they came on.
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// The next number to apply; `None` until the first request (0 or 1) fixes the start.
    next: Option<u64>,
    held: BTreeMap<u64, Op>,
    held_bytes: usize,
}

impl Order {
    /// True once the op with this number has been applied.
    pub(crate) fn applied(&self, seq: u64) -> bool {
        self.next.is_some_and(|n| n > seq)
    }

    pub(crate) fn place(
        &mut self,
        seq: u64,
        op: Op,
        bounds: &Bounds,
    ) -> Result<Placed, PlaceError> {
        // ffmpeg and librtmp start at 0, Flash with idle/0 (which send/1 may overtake on
        // another connection), Red5's client at 1. So a fresh session waits for 0 and
        // holds later numbers; `start_late` gives up on 0 after a short grace.
        if self.next.is_none() && seq == 0 {
            self.next = Some(0);
        }
        let next = self.next.unwrap_or(0);
        if seq < next || self.held.contains_key(&seq) {
            return Ok(Placed::Duplicate);
        }
        let ahead = seq.saturating_sub(next);
        if ahead >= bounds.reorder as u64 {
            return Err(PlaceError::TooFar { next: Some(next) });
        }
        let len = op.len();
        // The op that fills the gap is always taken (it unblocks the others); later ones
        // wait in their own request while the hold is full, even a lone early body larger
        // than the hold: it is taken once the gap before it is filled.
        let full = self.held.len() >= bounds.reorder
            || self.held_bytes.saturating_add(len) > bounds.reorder_bytes;
        if ahead > 0 && full {
            return Err(PlaceError::Full(op));
        }
        self.held_bytes = self.held_bytes.saturating_add(len);
        self.held.insert(seq, op);
        Ok(Placed::Queued)
    }

    /// Called when a fresh session's first requests have waited a grace period for
    /// number 0: start at 1 if it is here. A late 0 is then a duplicate, which is harmless
    /// for Flash's idle/0 (no data).
    pub(crate) fn start_late(&mut self) {
        if self.next.is_none() && self.held.contains_key(&1) {
            self.next = Some(1);
        }
    }

    /// The next op, if it is here and `room` allows it (a send needs room for its body).
    fn pop_ready(&mut self, room: bool) -> Option<Op> {
        let next = self.next?;
        let entry = self.held.first_entry()?;
        if *entry.key() != next {
            return None;
        }
        if matches!(entry.get(), Op::Send(_)) && !room {
            return None;
        }
        let op = entry.remove();
        if self.held.is_empty() {
            // An emptied BTreeMap keeps its root node (~370 bytes here); a session that
            // waits holds none.
            self.held = BTreeMap::new();
        }
        self.held_bytes = self.held_bytes.saturating_sub(op.len());
        self.next = Some(next.saturating_add(1));
        Some(op)
    }

    /// Bodies held, for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }
}

/// The adaptive polling byte.
#[derive(Debug, Default)]
pub(crate) struct PollDelay {
    step: usize,
    empty_run: u32,
}

impl PollDelay {
    /// The byte for a reply that carries data (`true`) or nothing (`false`).
    pub(crate) fn next(&mut self, has_data: bool) -> Bytes {
        if has_data {
            self.step = 0;
            self.empty_run = 0;
        } else {
            self.empty_run = self.empty_run.saturating_add(1);
            if self.empty_run >= EMPTY_RUN {
                self.empty_run = 0;
                self.step = (self.step + 1).min(POLL_DELAYS.len() - 1);
            }
        }
        match POLL_DELAYS.get(self.step..=self.step) {
            Some(b) => Bytes::from_static(b),
            None => Bytes::from_static(&[1]),
        }
    }
}

/// Everything both sides share, behind the session mutex.
pub(crate) struct State {
    /// Client-to-server bytes applied in order, not yet read by the consumer.
    inbound: VecDeque<Bytes>,
    inbound_len: usize,
    reader: Option<Waker>,
    pub(crate) order: Order,
    /// Server-to-client bytes for the next reply. When not empty, byte 0 is a placeholder
    /// for the polling byte, so a reply is one `split().freeze()` with no copy.
    outbound: BytesMut,
    writer: Option<Waker>,
    poll: PollDelay,
    /// The client closed, or the session was reaped or shut down: the consumer reads the
    /// rest and then EOF, and its writes fail.
    pub(crate) client_closed: bool,
    /// The consumer shut down or dropped its end: no more server bytes will come.
    pub(crate) backend_gone: bool,
    /// When the last request began or ended (reaper clock).
    pub(crate) last_request: Instant,
    /// Requests being answered right now (a session in use is never reaped).
    pub(crate) active_requests: usize,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// What the buffers above hold, charged to the process's memory budget.
    charge: Charge,
}

impl State {
    fn new(now: Instant) -> Self {
        State {
            inbound: VecDeque::new(),
            inbound_len: 0,
            reader: None,
            order: Order::default(),
            outbound: BytesMut::new(),
            writer: None,
            poll: PollDelay::default(),
            client_closed: false,
            backend_gone: false,
            last_request: now,
            active_requests: 0,
            bytes_in: 0,
            bytes_out: 0,
            charge: Charge::global(),
        }
    }

    /// Bytes buffered in this session: unread inbound, held out-of-order bodies, and
    /// server bytes waiting for a reply.
    fn buffered(&self) -> usize {
        self.inbound_len
            .saturating_add(self.order.held_bytes)
            .saturating_add(self.outbound.len())
    }

    /// Charges what the session buffers now; refused when the budget is spent (the caller
    /// ends the session).
    pub(crate) fn account(&mut self) -> Result<(), OverBudget> {
        let b = self.buffered();
        self.charge.try_set(b)
    }

    /// Returns to the budget what the buffers no longer hold (never refused).
    pub(crate) fn release(&mut self) {
        let b = self.buffered();
        if b < self.charge.bytes() {
            self.charge.shrink(self.charge.bytes() - b);
        }
    }

    /// True once the client sent and was sent a whole handshake's worth of bytes.
    pub(crate) fn handshake_done(&self) -> bool {
        self.bytes_in >= HANDSHAKE_BYTES && self.bytes_out >= HANDSHAKE_BYTES
    }

    /// Server bytes waiting for a reply.
    pub(crate) fn pending(&self) -> usize {
        self.outbound.len().saturating_sub(1)
    }

    /// True when the consumer is blocked because the pending bytes reached the bound.
    pub(crate) fn writer_blocked(&self, bounds: &Bounds) -> bool {
        self.pending() >= bounds.pending
    }

    /// Apply every op that is next in order and fits. Returns true if anything changed.
    pub(crate) fn drain(&mut self, bounds: &Bounds) -> bool {
        let mut changed = false;
        loop {
            // With the consumer gone, bodies are dropped, so they never wait for room.
            let room = self.backend_gone || self.inbound_len < bounds.pending;
            let Some(op) = self.order.pop_ready(room) else {
                break;
            };
            changed = true;
            match op {
                Op::Send(frames) => {
                    if self.backend_gone || self.client_closed {
                        continue;
                    }
                    for f in frames.into_iter().filter(|f| !f.is_empty()) {
                        self.inbound_len = self.inbound_len.saturating_add(f.len());
                        self.bytes_in = self.bytes_in.saturating_add(f.len() as u64);
                        self.inbound.push_back(f);
                    }
                    wake(&mut self.reader);
                }
                Op::Idle => {}
                Op::Close => self.close(),
            }
        }
        changed
    }

    /// End the client side: the consumer reads what is queued, then EOF.
    pub(crate) fn close(&mut self) {
        self.client_closed = true;
        wake(&mut self.reader);
        wake(&mut self.writer);
    }

    /// The body of a send or idle reply: the polling byte, then every pending byte.
    pub(crate) fn take_reply(&mut self) -> Bytes {
        let has_data = self.pending() > 0;
        let poll = self.poll.next(has_data);
        if !has_data {
            return poll;
        }
        if let Some(first) = self.outbound.first_mut() {
            *first = poll.first().copied().unwrap_or(1);
        }
        // The whole buffer goes with the reply: `split` would leave its spare capacity
        // behind, and the buffer (3 KiB after the handshake) would stay with an idle session.
        let body = std::mem::take(&mut self.outbound).freeze();
        self.bytes_out = self
            .bytes_out
            .saturating_add(body.len().saturating_sub(1) as u64);
        wake(&mut self.writer);
        body
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// One session's shared state.
pub(crate) struct TunnelSession {
    state: Mutex<State>,
    /// Fired on every change either side makes; HTTP handlers wait on it.
    changed: Notify,
    pub(crate) bounds: Bounds,
}

impl TunnelSession {
    pub(crate) fn new(bounds: Bounds) -> Arc<Self> {
        Arc::new(TunnelSession {
            state: Mutex::new(State::new(Instant::now())),
            changed: Notify::new(),
            bounds,
        })
    }

    /// Charges the session's buffers to `budget` (the opening client's address's share as
    /// well as the process's budget) from now on; called once, before anything is buffered.
    pub(crate) fn charge_to(&self, budget: &crate::budget::PeerBudget) {
        let mut st = self.lock();
        if st.charge.bytes() == 0 {
            st.charge = budget.charge();
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Run `check` under the lock until it returns `Some`, waiting for changes in
    /// between, up to `deadline` (then `None`).
    pub(crate) async fn wait_until<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Option<T> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a change between check and await is not lost.
            notified.as_mut().enable();
            let found = {
                let mut st = self.lock();
                check(&mut st)
            };
            if found.is_some() {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// The consumer's end of this session.
    pub(crate) fn pipe(self: &Arc<Self>) -> TunnelPipe {
        TunnelPipe {
            session: Arc::clone(self),
        }
    }
}

/// The consumer's byte stream for one tunnel session: reads yield the client's `/send`
/// bodies in sequence order, writes queue bytes for the next `/send` or `/idle` reply
/// (bounded; a full queue makes the writer wait).
pub struct TunnelPipe {
    session: Arc<TunnelSession>,
}

impl TunnelPipe {
    fn backend_done(&self) {
        {
            let mut st = self.session.lock();
            st.backend_gone = true;
            // Nobody will read these any more.
            st.inbound = VecDeque::new();
            st.inbound_len = 0;
            let bounds = self.session.bounds;
            st.drain(&bounds);
            st.release();
        }
        self.session.notify();
    }
}

impl AsyncRead for TunnelPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let bounds = self.session.bounds;
        let mut st = self.session.lock();
        if st.inbound.is_empty() {
            if st.client_closed || st.backend_gone {
                return Poll::Ready(Ok(()));
            }
            park(&mut st.reader, cx);
            return Poll::Pending;
        }
        while buf.remaining() > 0 {
            let Some(front) = st.inbound.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                st.inbound.pop_front();
            }
            st.inbound_len = st.inbound_len.saturating_sub(n);
        }
        if st.inbound.is_empty() {
            // Its ring keeps its capacity otherwise; a waiting session holds none.
            st.inbound = VecDeque::new();
        }
        // Room may have opened for bodies that were waiting.
        st.drain(&bounds);
        st.release();
        drop(st);
        self.session.notify();
        Poll::Ready(Ok(()))
    }
}

impl TunnelPipe {
    fn write_slices(&self, cx: &Context<'_>, bufs: &[&[u8]]) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let bounds = self.session.bounds;
        let mut st = self.session.lock();
        if st.client_closed || st.backend_gone {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "RTMPT session closed by the client or reaped",
            )));
        }
        let room = bounds.pending.saturating_sub(st.pending());
        if room == 0 {
            park(&mut st.writer, cx);
            return Poll::Pending;
        }
        let n = room.min(total);
        let grown = st
            .buffered()
            .saturating_add(n)
            .saturating_add(usize::from(st.outbound.is_empty()));
        if let Err(e) = st.charge.try_set(grown) {
            // The consumer ends on this error, and the session with it.
            return Poll::Ready(Err(io::Error::other(format!(
                "RTMPT session's reply not queued: {e}"
            ))));
        }
        if st.outbound.is_empty() {
            st.outbound.reserve(n.saturating_add(1));
            st.outbound.put_u8(0);
        }
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = b.len().min(left);
            st.outbound.extend_from_slice(&b[..take]);
            left -= take;
        }
        drop(st);
        self.session.notify();
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for TunnelPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_slices(cx, &[buf])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let slices: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.write_slices(cx, &slices)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes are visible to the next poll as soon as they are written.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.backend_done();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelPipe {
    fn drop(&mut self) {
        self.backend_done();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn bounds() -> Bounds {
        Bounds {
            pending: 8,
            reorder: 4,
            reorder_bytes: 100,
        }
    }

    fn send(b: &'static [u8]) -> Op {
        Op::Send(vec![Bytes::from_static(b)])
    }

    fn inbound(st: &State) -> Vec<u8> {
        st.inbound.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn polling_byte_grows_after_empty_runs_and_resets_on_data() {
        let mut p = PollDelay::default();
        let mut seen = Vec::new();
        for _ in 0..70 {
            seen.push(p.next(false)[0]);
        }
        let mut steps: Vec<u8> = seen.clone();
        steps.dedup();
        assert_eq!(steps, vec![1, 3, 5, 9, 17, 33]);
        assert_eq!(seen[8], 1);
        assert_eq!(seen[9], 3);
        assert_eq!(*seen.last().unwrap(), 33);
        assert_eq!(p.next(true)[0], 1);
        assert_eq!(p.next(false)[0], 1);
    }

    #[test]
    fn applies_in_sequence_order_whatever_the_arrival_order() {
        let b = bounds();
        let mut st = State::new(Instant::now());
        assert_eq!(st.order.place(0, send(b"a"), &b).unwrap(), Placed::Queued);
        st.drain(&b);
        assert_eq!(st.order.place(3, send(b"d"), &b).unwrap(), Placed::Queued);
        assert_eq!(st.order.place(2, send(b"c"), &b).unwrap(), Placed::Queued);
        st.drain(&b);
        assert_eq!(inbound(&st), b"a");
        assert!(!st.order.applied(2));
        assert_eq!(st.order.place(1, send(b"b"), &b).unwrap(), Placed::Queued);
        st.drain(&b);
        assert_eq!(inbound(&st), b"abcd");
        assert!(st.order.applied(3));
        assert_eq!(st.order.held(), 0);
    }

    #[test]
    fn first_sequence_number_may_be_zero_or_one() {
        let b = bounds();
        // 1 arrives first: held for 0, which then comes and goes first.
        let mut st = State::new(Instant::now());
        st.order.place(1, send(b"b"), &b).unwrap();
        st.drain(&b);
        assert!(!st.order.applied(1));
        st.order.place(0, send(b"a"), &b).unwrap();
        st.drain(&b);
        assert_eq!(inbound(&st), b"ab");

        // A client that starts at 1: after the grace, 1 is the start.
        let mut st = State::new(Instant::now());
        st.order.place(1, send(b"x"), &b).unwrap();
        st.order.start_late();
        st.drain(&b);
        assert_eq!(inbound(&st), b"x");
        // A late idle/0 (Flash) is a harmless duplicate.
        assert_eq!(st.order.place(0, Op::Idle, &b).unwrap(), Placed::Duplicate);

        let mut st = State::new(Instant::now());
        assert!(matches!(
            st.order.place(4, send(b"x"), &b),
            Err(PlaceError::TooFar { next: Some(0) })
        ));
    }

    #[test]
    fn duplicates_are_ignored_and_far_skips_refused() {
        let b = bounds();
        let mut st = State::new(Instant::now());
        st.order.place(0, send(b"a"), &b).unwrap();
        st.drain(&b);
        assert_eq!(
            st.order.place(0, send(b"a"), &b).unwrap(),
            Placed::Duplicate
        );
        st.order.place(2, send(b"c"), &b).unwrap();
        assert_eq!(
            st.order.place(2, send(b"c"), &b).unwrap(),
            Placed::Duplicate
        );
        // next is 1, window 4: 1..=4 are fine, 5 is too far.
        assert!(matches!(
            st.order.place(5, Op::Idle, &b),
            Err(PlaceError::TooFar { next: Some(1) })
        ));
        st.drain(&b);
        assert_eq!(inbound(&st), b"a");
    }

    #[test]
    fn a_lone_early_body_over_the_hold_waits_for_the_gap() {
        let b = bounds();
        let mut st = State::new(Instant::now());
        st.order.place(0, Op::Idle, &b).unwrap();
        st.drain(&b);
        assert!(matches!(
            st.order
                .place(2, Op::Send(vec![Bytes::from(vec![1; 101])]), &b),
            Err(PlaceError::Full(_))
        ));
        assert_eq!(st.order.held(), 0);
        st.order.place(1, send(b"a"), &b).unwrap();
        st.drain(&b);
        // Now next in order: taken whatever its size.
        st.order
            .place(2, Op::Send(vec![Bytes::from(vec![1; 101])]), &b)
            .unwrap();
    }

    #[test]
    fn held_bodies_are_bounded_but_the_gap_filler_always_fits() {
        let b = bounds();
        let mut st = State::new(Instant::now());
        st.order.place(0, Op::Idle, &b).unwrap();
        st.drain(&b);
        st.order
            .place(2, Op::Send(vec![Bytes::from(vec![1; 60])]), &b)
            .unwrap();
        // 60 + 60 > 100 held bytes: the later body waits...
        assert!(matches!(
            st.order
                .place(3, Op::Send(vec![Bytes::from(vec![2; 60])]), &b),
            Err(PlaceError::Full(_))
        ));
        // ...but the one that fills the gap is taken.
        st.order
            .place(1, Op::Send(vec![Bytes::from(vec![3; 60])]), &b)
            .unwrap();
        st.drain(&b);
        // Inbound bound is 8 bytes: body 1 went in (one body may overshoot), body 2 waits.
        assert_eq!(st.inbound_len, 60);
        assert!(st.order.applied(1));
        assert!(!st.order.applied(2));
    }

    #[tokio::test]
    async fn pipe_reads_in_order_and_sees_eof_after_close() {
        let s = TunnelSession::new(bounds());
        let mut pipe = s.pipe();
        {
            let mut st = s.lock();
            st.order.place(0, send(b"hel"), &s.bounds).unwrap();
            st.order.place(1, send(b"lo"), &s.bounds).unwrap();
            st.order.place(2, Op::Close, &s.bounds).unwrap();
            st.drain(&s.bounds);
        }
        let mut got = Vec::new();
        pipe.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        assert!(pipe.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn writes_are_bounded_and_resume_when_a_reply_takes_them() {
        let s = TunnelSession::new(bounds());
        let mut pipe = s.pipe();
        let writer = tokio::spawn(async move {
            pipe.write_all(b"0123456789abcdef").await.unwrap();
            pipe
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished());
        assert_eq!(s.lock().pending(), 8);
        let first = s.lock().take_reply();
        assert_eq!(&first[..], b"\x0101234567");
        let _pipe = writer.await.unwrap();
        let second = s.lock().take_reply();
        assert_eq!(&second[..], b"\x0189abcdef");
        // Nothing pending: the reply is the polling byte alone, never empty.
        assert_eq!(&s.lock().take_reply()[..], b"\x01");
    }

    #[tokio::test]
    async fn consumer_drop_keeps_pending_bytes_for_the_next_poll() {
        let s = TunnelSession::new(bounds());
        let mut pipe = s.pipe();
        pipe.write_all(b"bye").await.unwrap();
        drop(pipe);
        let mut st = s.lock();
        assert!(st.backend_gone);
        assert_eq!(&st.take_reply()[..], b"\x01bye");
        assert_eq!(st.pending(), 0);
    }

    #[tokio::test]
    async fn reads_make_room_for_waiting_bodies() {
        let s = TunnelSession::new(bounds());
        let mut pipe = s.pipe();
        {
            let mut st = s.lock();
            st.order
                .place(0, Op::Send(vec![Bytes::from(vec![7; 10])]), &s.bounds)
                .unwrap();
            st.order.place(1, send(b"z"), &s.bounds).unwrap();
            st.drain(&s.bounds);
            assert!(!st.order.applied(1));
        }
        let mut buf = [0u8; 10];
        pipe.read_exact(&mut buf).await.unwrap();
        assert!(s.lock().order.applied(1));
        let mut z = [0u8; 1];
        pipe.read_exact(&mut z).await.unwrap();
        assert_eq!(&z, b"z");
    }

    use std::time::Duration;

    proptest::proptest! {
        /// Whatever the arrival order, with repeats, bodies come out in sequence order.
        #[test]
        fn any_arrival_order_yields_sequence_order(
            n in 1usize..24,
            order in proptest::collection::vec(0usize..1000, 1..80),
            first in 0u64..2,
        ) {
            let b = Bounds { pending: 1 << 20, reorder: 32, reorder_bytes: 1 << 20 };
            let mut st = State::new(Instant::now());
            let body = |i: usize| Bytes::from(format!("<{i}>"));
            // Every number appears at least once; `order` adds repeats and shuffles.
            let mut arrivals: Vec<usize> = (0..n).collect();
            for (k, r) in order.iter().enumerate() {
                arrivals.insert(r % (arrivals.len() + 1), k % n);
            }
            for &i in &arrivals {
                let seq = first + i as u64;
                let _ = st.order.place(seq, Op::Send(vec![body(i)]), &b);
                st.drain(&b);
            }
            // A client starting at 1 never sends 0: the grace period starts it at 1.
            st.order.start_late();
            st.drain(&b);
            let want: Vec<u8> = (0..n).flat_map(|i| body(i).to_vec()).collect();
            proptest::prop_assert_eq!(inbound(&st), want);
        }
    }
}
