//! Engine-only pieces of the engine tests: the engine in-process on a port bound to 0 (alone or
//! behind the real front door), its log lines, and raw RTMP clients. Peers, processes, media and
//! frame comparison come from tests/common, which every engine test also includes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rtmpgate::engine::{Engine, EngineConfig};
use rtmpgate::limits::Limits;
use rtmpgate::stream::ClientStream;

/// Log lines of every engine in this test binary (tests use distinct stream names).
pub fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("rtmpgate=info")
            .with_writer(move || LogWriter(w.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        // Kept, not echoed: tests print the lines they check (set ENGINE_TEST_LOGS=1 to echo).
        if std::env::var_os("ENGINE_TEST_LOGS").is_some() {
            std::io::stderr().write_all(b)?;
        }
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines containing every one of `needles`.
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// The runtime an in-process engine runs on (two workers, as on the test machine), with the
/// log capture installed.
fn runtime() -> tokio::runtime::Runtime {
    logs();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An engine serving plain RTMP on 127.0.0.1, port chosen by the OS.
pub struct Server {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start(cfg: EngineConfig) -> Server {
        Server::start_with(cfg, None)
    }

    /// Like `start`, with the send buffer of every accepted socket set to `sndbuf` bytes (so a
    /// client that stops reading stalls the server's writes quickly).
    pub fn start_with(cfg: EngineConfig, sndbuf: Option<usize>) -> Server {
        let rt = runtime();
        let engine = Engine::new(Limits::default(), cfg);
        let handler = engine.handler();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                if let Some(n) = sndbuf {
                    let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(n);
                }
                let local = tcp.local_addr().unwrap_or(addr);
                // As the door makes it: the engine may write to the socket directly.
                let stream = ClientStream::tcp(tcp, peer, local);
                tokio::spawn(handler(stream));
            }
        });
        Server {
            addr,
            engine,
            rt: Some(rt),
        }
    }

    pub fn url(&self, key: &str) -> String {
        format!("rtmp://{}/live/{key}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// AMF0 by hand, so the raw client below depends on nothing but the handshake.
pub fn amf_str(out: &mut Vec<u8>, s: &str) {
    out.push(0x02);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub fn amf_num(out: &mut Vec<u8>, n: f64) {
    out.push(0x00);
    out.extend_from_slice(&n.to_be_bytes());
}

/// One message as fmt 0 + fmt 3 chunks of 128 bytes (the chunk size before any Set Chunk Size).
pub fn chunk_message(csid: u8, msg_type: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![csid & 0x3f, 0, 0, 0];
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(msg_type);
    out.extend_from_slice(&stream_id.to_le_bytes());
    for (i, c) in payload.chunks(128).enumerate() {
        if i > 0 {
            out.push(0xc0 | (csid & 0x3f));
        }
        out.extend_from_slice(c);
    }
    out
}

/// The client's `connect` (app `app`, `tcUrl` `tc_url`), `createStream` and `play` of `key`
/// on stream 1, chunked, ready to send after the handshake.
pub fn play_commands(tc_url: &str, app: &str, key: &str) -> Vec<u8> {
    let mut connect = Vec::new();
    amf_str(&mut connect, "connect");
    amf_num(&mut connect, 1.0);
    connect.push(0x03);
    for (k, v) in [("app", app), ("tcUrl", tc_url)] {
        connect.extend_from_slice(&(k.len() as u16).to_be_bytes());
        connect.extend_from_slice(k.as_bytes());
        amf_str(&mut connect, v);
    }
    connect.extend_from_slice(&[0, 0, 9]);
    let mut create = Vec::new();
    amf_str(&mut create, "createStream");
    amf_num(&mut create, 2.0);
    create.push(0x05);
    let mut play = Vec::new();
    amf_str(&mut play, "play");
    amf_num(&mut play, 0.0);
    play.push(0x05);
    amf_str(&mut play, key);
    let mut bytes = chunk_message(3, 20, 0, &connect);
    bytes.extend(chunk_message(3, 20, 0, &create));
    bytes.extend(chunk_message(8, 20, 1, &play));
    bytes
}

/// A player that handshakes, connects and plays `app/key`, then never reads again; its
/// receive buffer is made small so the server's writes stall quickly.
pub fn stalled_player(addr: SocketAddr, app: &str, key: &str) -> std::net::TcpStream {
    use std::io::Read;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let mut tcp: std::net::TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hs = rtmpgate::rtmp::handshake::ClientHandshake::new(false);
    tcp.write_all(&hs.c0c1()).unwrap();
    let mut s0s1s2 = vec![0u8; 3073];
    tcp.read_exact(&mut s0s1s2).unwrap();
    tcp.write_all(&hs.c2(&s0s1s2).unwrap()).unwrap();
    let bytes = play_commands(&format!("rtmp://{addr}/{app}"), app, key);
    tcp.write_all(&bytes).unwrap();
    tcp
}

/// The engine behind the real front door: one listener per scheme given, on ports bound to 0.
pub struct DoorServer {
    pub addrs: Vec<(String, SocketAddr)>,
    pub engine: Arc<Engine>,
    _shutdown: tokio::sync::watch::Sender<bool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl DoorServer {
    pub fn start(cfg: EngineConfig, schemes: &[&str]) -> DoorServer {
        use rtmpgate::door::listener::{Door, DoorOptions};
        use rtmpgate::net::tls::{self, CertSource, SniResolver};
        use rtmpgate::net::url::parse_listen;
        let rt = runtime();
        let limits = Arc::new(Limits::default());
        let engine = Engine::new((*limits).clone(), cfg);
        let key = tls::load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let tls = tls::server_config(SniResolver::new(key)).unwrap();
        let urls: Vec<_> = schemes
            .iter()
            .map(|s| parse_listen("listen", &format!("{s}://127.0.0.1:0")).unwrap())
            .collect();
        let opts = DoorOptions {
            limits,
            tls: Some(tls),
            rtmpe: true,
            accept_proxy_protocol: false,
            trusted_proxies: Vec::new(),
        };
        let door = rt
            .block_on(Door::bind(&urls, opts, engine.handler()))
            .unwrap();
        let addrs = door
            .local_addrs()
            .into_iter()
            .map(|(s, a)| (s.as_str().to_owned(), a))
            .collect();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let _guard = rt.enter();
        door.start(rx);
        DoorServer {
            addrs,
            engine,
            _shutdown: tx,
            rt: Some(rt),
        }
    }

    /// `scheme://127.0.0.1:PORT/live/KEY` on the listener for `scheme` (rtmpe rides on rtmp,
    /// rtmpte on rtmpt).
    pub fn url(&self, scheme: &str, key: &str) -> String {
        let listener = match scheme {
            "rtmpe" => "rtmp",
            "rtmpte" => "rtmpt",
            s => s,
        };
        let addr = self
            .addrs
            .iter()
            .find(|(s, _)| s == listener)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {listener} listener"));
        format!("{scheme}://{addr}/live/{key}")
    }
}

impl Drop for DoorServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A scripted RTMP client built on the crate's codec: commands out, messages in.
pub struct RawClient {
    pub tcp: std::net::TcpStream,
    enc: rtmpgate::rtmp::chunk::ChunkEncoder,
    dec: rtmpgate::rtmp::chunk::ChunkDecoder,
    buf: bytes::BytesMut,
}

impl RawClient {
    /// TCP connect and the plain handshake.
    pub fn connect(addr: SocketAddr) -> RawClient {
        use std::io::Read;
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let hs = rtmpgate::rtmp::handshake::ClientHandshake::new(true);
        tcp.write_all(&hs.c0c1()).unwrap();
        let mut s0s1s2 = vec![0u8; 3073];
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.read_exact(&mut s0s1s2).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.write_all(&hs.c2(&s0s1s2).unwrap()).unwrap();
        RawClient {
            tcp,
            enc: rtmpgate::rtmp::chunk::ChunkEncoder::new(),
            dec: rtmpgate::rtmp::chunk::ChunkDecoder::new(&Limits::default()),
            buf: bytes::BytesMut::new(),
        }
    }

    pub fn send(&mut self, csid: u32, msg: &rtmpgate::rtmp::message::Message) {
        let mut out = bytes::BytesMut::new();
        self.enc.write(csid, msg, &mut out);
        self.tcp.write_all(&out).unwrap();
    }

    pub fn command(
        &mut self,
        stream_id: u32,
        name: &str,
        txn: f64,
        values: &[rtmpgate::rtmp::amf0::Amf0Value],
    ) {
        let m = rtmpgate::rtmp::message::command_message(stream_id, name, txn, values);
        self.send(3, &m);
    }

    /// Messages until `done` says stop (given everything so far), at most `limit`.
    pub fn recv_until(
        &mut self,
        limit: Duration,
        done: impl Fn(&[rtmpgate::rtmp::message::Message]) -> bool,
    ) -> Vec<rtmpgate::rtmp::message::Message> {
        use std::io::Read;
        let end = Instant::now() + limit;
        let mut got = Vec::new();
        let mut tmp = vec![0u8; 65536];
        loop {
            while let Some(m) = self.dec.decode(&mut self.buf).unwrap() {
                got.push(m);
            }
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < end,
                "timed out after {limit:?}; got {:?}",
                got.iter().map(describe).collect::<Vec<_>>()
            );
            match self.tcp.read(&mut tmp) {
                Ok(0) => panic!(
                    "server closed; got {:?}",
                    got.iter().map(describe).collect::<Vec<_>>()
                ),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(_) => {}
            }
        }
    }
}

/// A command or data message as (name, values), for assertions.
pub fn amf_values(
    m: &rtmpgate::rtmp::message::Message,
) -> Option<Vec<rtmpgate::rtmp::amf0::Amf0Value>> {
    use rtmpgate::rtmp::message;
    if !matches!(m.msg_type, message::COMMAND_AMF0 | message::DATA_AMF0) {
        return None;
    }
    message::decode_amf_payload(m, &Default::default()).ok()
}

/// `name`, or `name code` for onStatus, or the message type: short, for assertions.
pub fn describe(m: &rtmpgate::rtmp::message::Message) -> String {
    use rtmpgate::rtmp::message::UserControl;
    if let Some(v) = amf_values(m) {
        let name = v.first().and_then(|n| n.as_str()).unwrap_or("?").to_owned();
        let code = v
            .iter()
            .find_map(|x| x.get("code").and_then(|c| c.as_str()).map(str::to_owned));
        return match code {
            Some(c) => format!("{name} {c}"),
            None => name,
        };
    }
    match m.msg_type {
        4 => format!("{:?}", UserControl::decode(&m.payload)),
        t => format!("type {t}"),
    }
}
