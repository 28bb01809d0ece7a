//! The connect-aware relay (`relay = "connect"`): the gateway runs the RTMP handshake with
//! the client, reads its chunk stream up to `connect` (keeping every raw byte), asks the
//! guard, routes by app, runs its own handshake with the chosen backend (trying the
//! group's next backend on failure before the client sees anything), replays the client's
//! post-handshake bytes unchanged, and from then on forwards both ways.
//!
//! The backend is chosen at `connect`: a client waits for the connect `_result` before it
//! sends `createStream` and `publish`/`play`, so the stream name is not known yet when a
//! backend must answer. Groups with `balance = "hash"` are the exception: the gateway
//! answers the client itself until `publish` or `play` names the stream, and the backend's
//! side is re-chunked ([`super::hashed`]). Every later command passes through a [`Watch`]: the client's
//! bytes go through [`ChunkScanner`] (headers parsed, media skipped, command bodies kept),
//! and a `publish` or `play` the guard wants to see is held, with everything after it,
//! until its verdict.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::guard::{Action, RelayGuard, Request, Verdict, VerdictFuture};
use super::hashed::{self, Early, Rechunk};
use super::scan::ChunkScanner;
use super::settings::Balance;
use super::{Leg, Upstream, UpstreamError};
use crate::budget::{Charge, PeerBudget};
use crate::net::url::RtmpUrl;
use crate::rtmp::amf0::{Amf0Value, AmfLimits};
use crate::rtmp::chunk::ChunkEncoder;
use crate::rtmp::handshake::{self, ClientHandshake, HandshakeKind, C0C1_LEN, PACKET_LEN};
use crate::rtmp::message::{self, Command, Message};
use crate::sessions::{self, Role};
use crate::stream::{ClientStream, Prefixed, Transport};

/// How the gateway greets a backend: digest when the client used digest with us.
#[derive(Clone, Copy, Debug)]
pub struct BackendHandshake {
    pub digest: bool,
}

/// Runs the client side of the RTMP handshake with a backend.
pub async fn backend_handshake(
    leg: &mut Leg,
    url: &RtmpUrl,
    h: BackendHandshake,
) -> Result<(), UpstreamError> {
    let fail = |detail: String| UpstreamError::Handshake {
        url: url.clone(),
        detail,
    };
    let hs = ClientHandshake::new(h.digest);
    leg.write_all(&hs.c0c1())
        .await
        .map_err(|e| fail(format!("sending C0+C1: {e}")))?;
    leg.flush()
        .await
        .map_err(|e| fail(format!("sending C0+C1: {e}")))?;
    let mut s = vec![0u8; handshake::S0S1S2_LEN];
    leg.read_exact(&mut s)
        .await
        .map_err(|e| fail(format!("reading S0+S1+S2: {e}")))?;
    let c2 = hs.c2(&s).map_err(|e| fail(e.to_string()))?;
    leg.write_all(&c2)
        .await
        .map_err(|e| fail(format!("sending C2: {e}")))?;
    Ok(())
}

/// The server side of the handshake with the client; returns which kind it was.
async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<HandshakeKind, String> {
    let mut c0c1 = vec![0u8; C0C1_LEN];
    s.read_exact(&mut c0c1)
        .await
        .map_err(|e| format!("reading C0+C1: {e}"))?;
    let reply = handshake::server_reply(&c0c1).map_err(|e| e.to_string())?;
    s.write_all(&reply.s0s1s2)
        .await
        .map_err(|e| format!("sending S0+S1+S2: {e}"))?;
    s.flush()
        .await
        .map_err(|e| format!("sending S0+S1+S2: {e}"))?;
    let mut c2 = vec![0u8; PACKET_LEN];
    s.read_exact(&mut c2)
        .await
        .map_err(|e| format!("reading C2: {e}"))?;
    Ok(reply.kind)
}

/// What `connect` said.
struct Connect {
    command: Command,
    app: String,
    tc_url: Option<String>,
}

/// Reads the client's chunk stream into `raw` until `connect` is complete; returns it and
/// the number of bytes of `raw` up to its end. Everything read is charged to `charge` and
/// bounded by `limits.max_connect_bytes`.
async fn read_connect<S: AsyncRead + Unpin>(
    s: &mut S,
    scanner: &mut ChunkScanner,
    raw: &mut BytesMut,
    charge: &mut Charge,
    limits: &crate::limits::Limits,
) -> Result<(Connect, usize), String> {
    let amf = AmfLimits::from(limits);
    let mut scanned = 0usize;
    loop {
        while scanned < raw.len() {
            let (used, msg) = scanner
                .scan(raw.get(scanned..).unwrap_or_default())
                .map_err(|e| e.to_string())?;
            scanned += used;
            let Some(msg) = msg else { continue };
            let command = message::decode_command(&msg, &amf)
                .map_err(|e| format!("undecodable command before connect: {e}"))?;
            if command.name != "connect" {
                return Err(format!(
                    "'{}' before connect; a client must connect first",
                    short(&command.name)
                ));
            }
            let obj = command.object();
            let field = |k: &str| obj.and_then(|o| o.get(k)).and_then(Amf0Value::as_str);
            let Some(app) = field("app") else {
                return Err("connect without an app".to_string());
            };
            if app.len() > limits.max_name_len {
                return Err(format!(
                    "connect app of {} bytes exceeds limits.max_name_len ({})",
                    app.len(),
                    limits.max_name_len
                ));
            }
            let app = app.to_string();
            let tc_url = field("tcUrl")
                .filter(|t| t.len() <= limits.max_name_len)
                .map(str::to_string);
            return Ok((
                Connect {
                    command,
                    app,
                    tc_url,
                },
                scanned,
            ));
        }
        super::hashed::read_more(s, raw, charge, limits, "a complete connect").await?;
    }
}

/// A loggable, bounded rendering of a peer's string.
fn short(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_default).collect()
}

/// Answers `connect` with `_error` and closes: the client sees why.
async fn refuse_connect<S: AsyncWrite + Unpin>(s: &mut S, txn: f64, code: &str, why: &str) {
    let info = status_info(code, why);
    let msg = message::command_message(0, "_error", txn, &[Amf0Value::Null, info]);
    send_and_close(s, &msg, DEFAULT_CHUNK).await;
}

/// Answers a publish or play the gateway cannot serve with its error status and closes.
async fn refuse_stream<S: AsyncWrite + Unpin>(s: &mut S, e: &Early, why: &str) {
    let code = match e.action {
        Action::Publish => "NetStream.Publish.BadName",
        _ => "NetStream.Play.Failed",
    };
    let msg = message::command_message(
        e.stream_id,
        "onStatus",
        0.0,
        &[Amf0Value::Null, status_info(code, why)],
    );
    send_and_close(s, &msg, e.chunk_size).await;
}

/// An `onStatus` error on `stream_id`.
fn status_message(stream_id: u32, code: &str, why: &str) -> Message {
    message::command_message(
        stream_id,
        "onStatus",
        0.0,
        &[Amf0Value::Null, status_info(code, why)],
    )
}

/// Sends `msg` to a client whose read chunk size is unknown (the backend may have set one
/// the relay never saw: nginx-rtmp sets 4096 after connect, and a status chunked at 128 is
/// then misread, rtmpdump: "error decoding invoke packet"): a Set Chunk Size of
/// [`STATUS_CHUNK`] first, the status in one chunk, then a lingering close. An ffmpeg
/// publisher echoes the Set Chunk Size back before it reads the status; the lingering close
/// reads (and drops) what the client still sends, for at most [`LINGER_CLOSE`], so that
/// write does not fail on a closed socket before the status is read.
async fn send_status_and_linger<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &Message) {
    let mut out = BytesMut::new();
    let mut enc = ChunkEncoder::new();
    enc.write(
        CONTROL_CSID,
        &message::set_chunk_size(STATUS_CHUNK),
        &mut out,
    );
    enc.set_chunk_size(STATUS_CHUNK);
    enc.write(STATUS_CSID, msg, &mut out);
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 1024];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_CLOSE, drain).await;
}

/// The chunk size announced before a status sent by [`send_status_and_linger`]: more than
/// any status message the relay sends (a description is at most a few hundred bytes).
const STATUS_CHUNK: u32 = 4096;
/// The chunk stream of protocol control messages.
const CONTROL_CSID: u32 = 2;
/// How long a denied client may take to read its status and hang up.
const LINGER_CLOSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The info object of an error status.
fn status_info(code: &str, why: &str) -> Amf0Value {
    Amf0Value::object([
        ("level", Amf0Value::string("error")),
        ("code", Amf0Value::string(code)),
        ("description", Amf0Value::string(why)),
    ])
}

/// Sends one message with a full (fmt 0) header, chunked at `chunk_size` (the size the
/// client reads at), then closes the connection. (No Set Chunk Size first: an ffmpeg
/// publisher echoes one back, and fails on the closed socket before reading the status.)
async fn send_and_close<S: AsyncWrite + Unpin>(s: &mut S, msg: &Message, chunk_size: u32) {
    let mut out = BytesMut::new();
    let mut enc = ChunkEncoder::new();
    enc.set_chunk_size(chunk_size);
    enc.write(STATUS_CSID, msg, &mut out);
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// The chunk stream of the gateway's own status messages (a full header, so it does not
/// depend on the backend's header compression on that chunk stream).
const STATUS_CSID: u32 = 5;
/// The chunk size a client reads at before anyone changed it: a refused connect's.
const DEFAULT_CHUNK: u32 = 128;

/// A publish or play the guard refused: answered with onStatus after the relay stops.
#[derive(Debug, Clone)]
struct Denial {
    stream_id: u32,
    code: &'static str,
    reason: String,
}

/// Relays one client in connect mode.
pub async fn serve(up: &Upstream, mut client: ClientStream) {
    let label = client.label();
    let limits = &up.limits;
    sessions::tag_current(|t| t.role = Some(Role::Relay));
    let kind = match tokio::time::timeout(limits.handshake_timeout(), client_handshake(&mut client))
        .await
    {
        Ok(Ok(kind)) => kind,
        Ok(Err(e)) => {
            tracing::debug!("{label}: RTMP handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(
                "{label}: no RTMP handshake within {:?} (limits.handshake_timeout_secs)",
                limits.handshake_timeout()
            );
            return;
        }
    };
    let budget = PeerBudget::for_peer(client.peer.ip());
    let mut scanner = ChunkScanner::new(limits, budget.charge());
    let mut raw = BytesMut::new();
    let mut raw_charge = budget.charge();
    let read = read_connect(&mut client, &mut scanner, &mut raw, &mut raw_charge, limits);
    let (connect, used) = match tokio::time::timeout(limits.handshake_timeout(), read).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!("{label}: closing before connect: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(
                "{label}: closing: no connect within {:?} of the handshake (limits.handshake_timeout_secs)",
                limits.handshake_timeout()
            );
            return;
        }
    };
    let app = connect.app.clone();
    sessions::tag_current(|t| t.app = Some(app.clone()));
    let txn = connect.command.txn;
    let client_id = super::guard::next_client_id();
    let connect_cmd = Arc::new(connect.command);
    if up.guard.wants(Action::Connect) {
        let req = Request {
            action: Action::Connect,
            peer: client.peer,
            transport: client.transport,
            app: app.clone(),
            tc_url: connect.tc_url.clone(),
            stream: None,
            stream_id: 0,
            command: (*connect_cmd).clone(),
            connect: connect_cmd.clone(),
            client_id,
        };
        if let Verdict::Deny { code, reason } = up.guard.check(req).await {
            tracing::info!("{label}: connect to app '{}' denied: {reason}", short(&app));
            refuse_connect(&mut client, txn, code, &reason).await;
            return;
        }
    }
    let Some(group) = up.pools.route(&app) else {
        tracing::info!(
            "{label}: no upstream group serves app '{}' and there is no default group (one without apps); closing",
            short(&app)
        );
        refuse_connect(
            &mut client,
            txn,
            "NetConnection.Connect.Rejected",
            "no backend serves this app",
        )
        .await;
        return;
    };
    let early = if group.balance == Balance::Hash {
        let rtmpe = matches!(client.transport, Transport::Rtmpe | Transport::Rtmpte);
        let answer = hashed::answer_until_stream(
            &mut client,
            &mut raw,
            &mut raw_charge,
            limits,
            &budget,
            rtmpe,
        );
        match tokio::time::timeout(limits.handshake_timeout(), answer).await {
            Ok(Ok(e)) => {
                sessions::tag_current(|t| t.name = Some(short(&e.name)));
                Some(e)
            }
            Ok(Err(e)) => {
                tracing::info!("{label}: closing before publish or play: {e}");
                return;
            }
            Err(_) => {
                tracing::info!(
                    "{label}: closing: no publish or play within {:?} of connect (limits.handshake_timeout_secs)",
                    limits.handshake_timeout()
                );
                return;
            }
        }
    } else {
        None
    };
    let hs = BackendHandshake {
        digest: matches!(kind, HandshakeKind::Digest(_)),
    };
    let key = early.as_ref().map_or("", |e| e.key.as_str());
    let Some((mut leg, backend)) = up
        .open(group, (client.peer, client.local, &label), Some(hs), key)
        .await
    else {
        match &early {
            // The gateway already accepted connect: the stream is what fails.
            Some(e) => refuse_stream(&mut client, e, "no backend reachable").await,
            None => {
                refuse_connect(
                    &mut client,
                    txn,
                    "NetConnection.Connect.Failed",
                    "no backend reachable",
                )
                .await
            }
        }
        return;
    };
    let _active = backend.hold();
    match &early {
        Some(e) => tracing::debug!(
            "{label}: {} '{}' hashed to upstream {} backend {}",
            e.action.as_str(),
            short(&e.key),
            group.name,
            backend.connector.url
        ),
        None => tracing::debug!(
            "{label}: app '{}' relayed to upstream {} backend {}",
            short(&app),
            group.name,
            backend.connector.url
        ),
    }
    let head = raw.split_to(used.min(raw.len()));
    if let Err(e) = async {
        leg.write_all(&head).await?;
        leg.flush().await
    }
    .await
    {
        tracing::debug!("{label}: sending connect to {}: {e}", backend.connector.url);
        return;
    }
    drop(head);
    let denied = Arc::new(std::sync::Mutex::new(None));
    let watch = Watch {
        connect: connect_cmd,
        client_id,
        denied: denied.clone(),
        scanner,
        scanned: 0,
        allowed: 0,
        pending: None,
        guard: up.guard.clone(),
        peer: client.peer,
        transport: client.transport,
        app: connect.app,
        tc_url: connect.tc_url,
        amf: AmfLimits::from(limits),
        label: label.clone(),
    };
    // What was read past connect goes through the watch like every later byte.
    let rest = raw.freeze();
    drop(raw_charge);
    let mut client = Prefixed::new(rest, client);
    let watch = Some(Box::new(watch));
    // Hash groups know the size the client reads at; otherwise the backend may have set
    // one the relay never saw (it does not parse the backend's side).
    let known_chunk = early.as_ref().map(Rechunk::<Leg>::client_chunk_size);
    let result = match early {
        Some(e) => {
            let mut back = Rechunk::new(&mut leg, e, limits, &budget, &label);
            super::pump_watched(&mut client, &mut back, up.pump_times(), watch).await
        }
        None => super::pump_watched(&mut client, &mut leg, up.pump_times(), watch).await,
    };
    let denial = denied.lock().ok().and_then(|mut d| d.take());
    if let Some(d) = denial {
        // The backend's side is normally quiet while a client waits for its publish or
        // play to be answered, so the status lands between the backend's messages.
        let _ = leg.shutdown().await;
        let msg = status_message(d.stream_id, d.code, &d.reason);
        match known_chunk {
            Some(size) => send_and_close(&mut client, &msg, size).await,
            None => send_status_and_linger(&mut client, &msg).await,
        }
    }
    if let Err(e) = result {
        if e.kind() == io::ErrorKind::PermissionDenied || e.kind() == io::ErrorKind::InvalidData {
            tracing::info!("{label}: closing: {e}");
        } else {
            tracing::debug!(
                "{label}: forwarding to {} ended: {e}",
                backend.connector.url
            );
        }
    }
}

/// Watches the client's bytes after `connect`; see the module documentation.
pub struct Watch {
    scanner: ChunkScanner,
    /// Bytes of the current read buffer scanned, and allowed through.
    scanned: usize,
    allowed: usize,
    /// A held command's verdict, what it was (for the log) and its message stream.
    pending: Option<(VerdictFuture, String, u32)>,
    connect: Arc<Command>,
    client_id: u64,
    /// Set when a command is refused, for the status answer.
    denied: Arc<std::sync::Mutex<Option<Denial>>>,
    guard: Arc<dyn RelayGuard>,
    peer: SocketAddr,
    transport: Transport,
    app: String,
    tc_url: Option<String>,
    amf: AmfLimits,
    label: String,
}

impl Watch {
    /// A new read buffer: nothing of it scanned yet.
    pub(super) fn rewind(&mut self) {
        self.scanned = 0;
        self.allowed = 0;
    }

    /// Bytes of the read buffer that may be written to the backend.
    pub(super) fn allowed(&self) -> usize {
        self.allowed
    }

    /// Scans `buf` as far as it can: to its end, or to the end of a command held for a
    /// verdict (whose future is then registered with `cx`). A denial or a broken chunk
    /// stream is an error that ends the session.
    pub(super) fn advance(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> io::Result<()> {
        loop {
            if let Some((fut, what, stream_id)) = &mut self.pending {
                match fut.as_mut().poll(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Verdict::Allow) => {
                        self.pending = None;
                        self.allowed = self.scanned;
                    }
                    Poll::Ready(Verdict::Deny { code, reason }) => {
                        if let Ok(mut d) = self.denied.lock() {
                            *d = Some(Denial {
                                stream_id: *stream_id,
                                code,
                                reason: reason.clone(),
                            });
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            format!("{what} denied: {reason}"),
                        ));
                    }
                }
            }
            let rest = buf.get(self.scanned..).unwrap_or_default();
            if rest.is_empty() {
                self.allowed = self.scanned;
                return Ok(());
            }
            let (used, msg) = self.scanner.scan(rest).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk stream from the client: {e}"),
                )
            })?;
            self.scanned += used;
            match msg {
                None => self.allowed = self.scanned,
                Some(m) => self.command(&m)?,
            }
        }
    }

    /// One complete command: passes at once, or is held for the guard.
    fn command(&mut self, msg: &Message) -> io::Result<()> {
        let command = match message::decode_command(msg, &self.amf) {
            Ok(c) => c,
            Err(e) => {
                let any = [Action::Connect, Action::Publish, Action::Play];
                if any.iter().any(|a| self.guard.wants(*a)) {
                    // It might be a publish or play the backend can read: never pass it
                    // unchecked.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("undecodable command with authorization on: {e}"),
                    ));
                }
                self.allowed = self.scanned;
                return Ok(());
            }
        };
        let Some(action) = Action::of_command(&command.name) else {
            self.allowed = self.scanned;
            return Ok(());
        };
        let stream = command
            .arg(0)
            .and_then(Amf0Value::as_str)
            .map(|s| s.to_string());
        match action {
            Action::Publish | Action::Play => {
                let name = stream.clone().unwrap_or_default();
                sessions::tag_current(|t| {
                    t.name = Some(short(&name));
                });
                tracing::debug!(
                    "{}: {} '{}' on stream {}",
                    self.label,
                    action.as_str(),
                    short(&name),
                    msg.stream_id
                );
            }
            Action::Connect => {}
        }
        if !self.guard.wants(action) {
            self.allowed = self.scanned;
            return Ok(());
        }
        let what = format!(
            "{} '{}'",
            action.as_str(),
            short(stream.as_deref().unwrap_or(&self.app))
        );
        let req = Request {
            action,
            peer: self.peer,
            transport: self.transport,
            app: self.app.clone(),
            tc_url: self.tc_url.clone(),
            stream,
            stream_id: msg.stream_id,
            command,
            connect: self.connect.clone(),
            client_id: self.client_id,
        };
        self.pending = Some((self.guard.check(req), what, msg.stream_id));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    #[tokio::test]
    async fn a_status_at_an_unknown_chunk_size_announces_its_own_and_lingers() {
        let (mut gw, mut client) = tokio::io::duplex(64 * 1024);
        let why = "a token is required (?token=...&expires=...) ".repeat(4);
        let msg = status_message(1, "NetStream.Publish.BadName", &why);
        let send = tokio::spawn(async move { send_status_and_linger(&mut gw, &msg).await });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        // Still open for reading: what the client sends now (an echoed Set Chunk Size) is
        // taken, not refused.
        client.write_all(&[0u8; 16]).await.unwrap();
        drop(client);
        send.await.unwrap();
        // Read at 128 until the Set Chunk Size, then at its size, as a client does.
        let mut dec = crate::rtmp::chunk::ChunkDecoder::new(&Limits::default());
        let mut buf = BytesMut::from(&got[..]);
        let first = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(first.msg_type, message::SET_CHUNK_SIZE);
        assert_eq!(
            dec.chunk_size(),
            STATUS_CHUNK,
            "the decoder follows Set Chunk Size"
        );
        let status = dec.decode(&mut buf).unwrap().unwrap();
        let c = message::decode_command(&status, &AmfLimits::default()).unwrap();
        let desc = c
            .arg(0)
            .and_then(|o| o.get("description"))
            .and_then(Amf0Value::as_str);
        assert_eq!(desc, Some(why.as_str()));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn reads_exactly_up_to_connect() {
        let mut enc = ChunkEncoder::new();
        let mut bytes = BytesMut::new();
        let connect = message::command_message(
            0,
            "connect",
            1.0,
            &[Amf0Value::object([
                ("app", Amf0Value::string("live")),
                ("tcUrl", Amf0Value::string("rtmp://h/live")),
            ])],
        );
        enc.write(3, &connect, &mut bytes);
        let end = bytes.len();
        enc.write(
            3,
            &message::command_message(0, "createStream", 2.0, &[Amf0Value::Null]),
            &mut bytes,
        );
        let limits = Limits::default();
        let mut scanner = ChunkScanner::new(&limits, Charge::global());
        let mut raw = BytesMut::new();
        let mut charge = Charge::global();
        let mut src = &bytes[..];
        let (c, used) = read_connect(&mut src, &mut scanner, &mut raw, &mut charge, &limits)
            .await
            .unwrap();
        assert_eq!(c.app, "live");
        assert_eq!(c.tc_url.as_deref(), Some("rtmp://h/live"));
        assert_eq!(used, end);
        assert_eq!(&raw[..], &bytes[..raw.len()]);
    }

    #[tokio::test]
    async fn refuses_a_stream_without_connect() {
        let limits = Limits::default();
        let mut scanner = ChunkScanner::new(&limits, Charge::global());
        let mut raw = BytesMut::new();
        let mut charge = Charge::global();
        // Endless media: bounded by max_partial_bytes.
        let mut enc = ChunkEncoder::new();
        let mut bytes = BytesMut::new();
        for _ in 0..200 {
            enc.write(
                6,
                &Message::new(message::VIDEO, 0, 1, vec![0u8; 10_000]),
                &mut bytes,
            );
        }
        let mut src = &bytes[..];
        let e = read_connect(&mut src, &mut scanner, &mut raw, &mut charge, &limits)
            .await
            .err()
            .unwrap();
        assert!(e.contains("max_connect_bytes"), "{e}");
        assert!(raw.len() <= limits.max_connect_bytes);
    }
}
