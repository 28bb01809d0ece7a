//! One RTMP client connection to an origin: TCP (and TLS for rtmps://), the handshake,
//! `connect` and `createStream` on the proto crate's sans-IO [`ClientSession`], then events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::budget::Charge;
use crate::limits::Limits;
use crate::net::url::RtmpUrl;
use crate::rtmp::chunk::ChunkDecoder;
use crate::rtmp::handshake::{ClientHandshake, S0S1S2_LEN};
use crate::rtmp::session::client::Call;
use crate::rtmp::session::{ClientConfig, ClientEvent, ClientSession};

/// Bytes asked of the socket per read (the decoder bounds what a message may hold).
const READ_STEP: usize = 16 * 1024;

/// Why a connection to an origin failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("origin {url}: cannot resolve or reach it: {detail}; is it running?")]
    Connect { url: String, detail: String },
    #[error("origin {url}: TLS handshake failed: {detail}; for a private CA set upstream.ca")]
    Tls { url: String, detail: String },
    #[error("origin {url}: {what} took longer than {secs} s")]
    Timeout {
        url: String,
        what: &'static str,
        secs: u64,
    },
    #[error("origin {url}: RTMP handshake failed: {detail}")]
    Handshake { url: String, detail: String },
    #[error("origin {url} refused {what}: {detail}")]
    Refused {
        url: String,
        what: String,
        detail: String,
    },
    #[error("origin {url}: connection error: {detail}")]
    Io { url: String, detail: String },
    #[error("origin {url} closed the connection")]
    Closed { url: String },
    #[error("origin {url}: bad RTMP from it: {detail}")]
    Protocol { url: String, detail: String },
    #[error("origin {url} sent nothing for {secs} s")]
    Silent { url: String, secs: u64 },
}

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// A connected, `connect`ed origin session with one message stream.
pub struct OriginConn {
    pub url: String,
    io: Box<dyn Duplex>,
    session: ClientSession,
    rbuf: BytesMut,
    /// The message stream createStream gave us.
    pub stream_id: u32,
    /// Bytes read from the origin (handshake included).
    pub bytes_in: u64,
    /// Bytes written to the origin (handshake included).
    pub bytes_out: u64,
    /// releaseStream and FCPublish already went out before createStream
    /// ([`OriginConn::open_publisher`]): [`OriginConn::publish`] does not repeat them.
    announced: bool,
}

async fn tcp_connect(url: &RtmpUrl) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| e.to_string())?
        .collect();
    let mut last = format!("{} resolved to no address", url.host);
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                crate::net::socket::tune_socket(&s);
                return Ok(s);
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

impl OriginConn {
    /// Connects to `url` (an origin, no app), runs the handshake, `connect` to `app` (with
    /// the role's properties: [`player_props`](crate::rtmp::session::client::player_props)
    /// or `publisher_props`, as ffmpeg sends them) and `createStream`, all within `timeout`.
    pub async fn open(
        url: &RtmpUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        app: &str,
        props: Vec<(&'static str, crate::rtmp::amf0::Amf0Value)>,
        limits: &Limits,
        timeout: Duration,
    ) -> Result<OriginConn, ConnError> {
        let id = url.to_string();
        let secs = timeout.as_secs();
        let t = |what| ConnError::Timeout {
            url: id.clone(),
            what,
            secs,
        };
        tokio::time::timeout(
            timeout,
            Self::open_inner(url, tls, app, props, limits, None),
        )
        .await
        .map_err(|_| t("connecting, handshake, connect and createStream"))?
    }

    /// As [`OriginConn::open`] for a publisher of `name`: connect, then releaseStream and
    /// FCPublish, then createStream, in the order ffmpeg and OBS send them (some platform
    /// ingests key their state on it). Follow with [`OriginConn::publish`].
    pub async fn open_publisher(
        url: &RtmpUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        app: &str,
        name: &str,
        limits: &Limits,
        timeout: Duration,
    ) -> Result<OriginConn, ConnError> {
        let props = crate::rtmp::session::client::publisher_props();
        let opened = Self::open_inner(url, tls, app, props, limits, Some(name));
        tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| ConnError::Timeout {
                url: url.to_string(),
                what: "connecting, handshake, connect, releaseStream, FCPublish and createStream",
                secs: timeout.as_secs(),
            })?
    }

    async fn open_inner(
        url: &RtmpUrl,
        tls: Option<&Arc<rustls::ClientConfig>>,
        app: &str,
        props: Vec<(&'static str, crate::rtmp::amf0::Amf0Value)>,
        limits: &Limits,
        publisher: Option<&str>,
    ) -> Result<OriginConn, ConnError> {
        let id = url.to_string();
        let tcp = tcp_connect(url)
            .await
            .map_err(|detail| ConnError::Connect {
                url: id.clone(),
                detail,
            })?;
        let io: Box<dyn Duplex> = match (url.scheme.is_tls(), tls) {
            (true, Some(cfg)) => {
                let name = ServerName::try_from(url.host.clone()).map_err(|e| ConnError::Tls {
                    url: id.clone(),
                    detail: e.to_string(),
                })?;
                let s = TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ConnError::Tls {
                        url: id.clone(),
                        detail: e.to_string(),
                    })?;
                Box::new(s)
            }
            _ => Box::new(tcp),
        };
        // The origin's partial messages count against the process's memory budget.
        let decoder = ChunkDecoder::with_charge(limits, Charge::global());
        let cfg = ClientConfig {
            amf: limits.into(),
            ..ClientConfig::default()
        };
        let mut c = OriginConn {
            url: id,
            io,
            session: ClientSession::new(cfg, decoder),
            rbuf: BytesMut::new(),
            stream_id: 0,
            bytes_in: 0,
            bytes_out: 0,
            announced: false,
        };
        c.handshake().await?;
        let tc_url = format!("{}/{app}", url);
        let proto = |e: crate::rtmp::session::ClientError| c_proto(&url.to_string(), e);
        c.session.connect(app, &tc_url, props).map_err(proto)?;
        c.flush().await?;
        loop {
            match c.next_event().await? {
                ClientEvent::Reply {
                    call: Call::Connect,
                    ok,
                    values,
                    ..
                } => {
                    if !ok {
                        return Err(c.refused("connect", &values));
                    }
                    break;
                }
                _ => c.flush().await?,
            }
        }
        if let Some(name) = publisher {
            c.announce(name).map_err(proto)?;
        }
        c.session.create_stream().map_err(proto)?;
        c.flush().await?;
        loop {
            match c.next_event().await? {
                ClientEvent::StreamCreated { stream_id, .. } => {
                    c.stream_id = stream_id;
                    return Ok(c);
                }
                ClientEvent::Reply {
                    call: Call::CreateStream,
                    values,
                    ..
                } => return Err(c.refused("createStream", &values)),
                _ => c.flush().await?,
            }
        }
    }

    /// Publishes `name` (live) on the stream createStream gave us, with releaseStream and
    /// FCPublish first unless [`OriginConn::open_publisher`] sent them already, and waits
    /// up to `timeout` for NetStream.Publish.Start. `what` names the publish in errors (the
    /// name itself may be a secret stream key, so it is never put in one).
    pub async fn publish(
        &mut self,
        name: &str,
        what: &str,
        timeout: Duration,
    ) -> Result<(), ConnError> {
        let sid = self.stream_id;
        if !self.announced {
            self.announce(name).map_err(|e| c_proto(&self.url, e))?;
        }
        self.session.publish(sid, name);
        self.flush().await?;
        let started = tokio::time::timeout(timeout, async {
            loop {
                match self.next_event().await? {
                    ClientEvent::Status {
                        code,
                        level,
                        description,
                        ..
                    } => {
                        if code == "NetStream.Publish.Start" {
                            return Ok(());
                        }
                        if level == "error" {
                            return Err(ConnError::Refused {
                                url: self.url.clone(),
                                what: what.to_owned(),
                                detail: format!("{code} {description}").chars().take(200).collect(),
                            });
                        }
                    }
                    _ => self.flush().await?,
                }
            }
        })
        .await;
        started.unwrap_or_else(|_| {
            Err(ConnError::Timeout {
                url: self.url.clone(),
                what: "waiting for NetStream.Publish.Start",
                secs: timeout.as_secs(),
            })
        })
    }

    /// Queues releaseStream and FCPublish of `name` (their answers, if any, are not waited
    /// for: servers differ, and publish's own status is what counts).
    fn announce(&mut self, name: &str) -> Result<(), crate::rtmp::session::ClientError> {
        use crate::rtmp::amf0::Amf0Value;
        let args = [Amf0Value::Null, Amf0Value::string(name)];
        for call in ["releaseStream", "FCPublish"] {
            self.session.call(0, call, &args)?;
        }
        self.announced = true;
        Ok(())
    }

    fn refused(&self, what: &str, values: &[crate::rtmp::amf0::Amf0Value]) -> ConnError {
        let detail = values
            .iter()
            .find_map(|v| v.get("description").or_else(|| v.get("code")))
            .and_then(|v| v.as_str())
            .unwrap_or("no reason given")
            .chars()
            .take(200)
            .collect();
        ConnError::Refused {
            url: self.url.clone(),
            what: what.to_owned(),
            detail,
        }
    }

    async fn handshake(&mut self) -> Result<(), ConnError> {
        let fail = |detail: String| ConnError::Handshake {
            url: self.url.clone(),
            detail,
        };
        let hs = ClientHandshake::new(true);
        self.io
            .write_all(&hs.c0c1())
            .await
            .map_err(|e| fail(format!("sending C0+C1: {e}")))?;
        self.io
            .flush()
            .await
            .map_err(|e| fail(format!("sending C0+C1: {e}")))?;
        let mut s = vec![0u8; S0S1S2_LEN];
        self.io
            .read_exact(&mut s)
            .await
            .map_err(|e| fail(format!("reading S0+S1+S2: {e}")))?;
        let c2 = hs.c2(&s).map_err(|e| fail(e.to_string()))?;
        self.io
            .write_all(&c2)
            .await
            .map_err(|e| fail(format!("sending C2: {e}")))?;
        self.bytes_in = S0S1S2_LEN as u64;
        self.bytes_out = (hs.c0c1().len() + c2.len()) as u64;
        Ok(())
    }

    /// The protocol state, to queue commands and media.
    pub fn session(&mut self) -> &mut ClientSession {
        &mut self.session
    }

    /// Writes what the session queued (acks, pongs, commands, media).
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        while let Some(b) = self.session.take_output() {
            self.write(b).await?;
        }
        self.io.flush().await.map_err(|e| self.io_error(e))
    }

    async fn write(&mut self, b: Bytes) -> Result<(), ConnError> {
        self.io.write_all(&b).await.map_err(|e| self.io_error(e))?;
        self.bytes_out = self.bytes_out.saturating_add(b.len() as u64);
        Ok(())
    }

    fn io_error(&self, e: std::io::Error) -> ConnError {
        ConnError::Io {
            url: self.url.clone(),
            detail: e.to_string(),
        }
    }

    /// The next message from the origin. Cancel-safe: bytes read are kept in the buffer
    /// (only the read awaits; nothing is written here, call [`OriginConn::flush`] after).
    pub async fn next_event(&mut self) -> Result<ClientEvent, ConnError> {
        loop {
            let polled = self
                .session
                .poll(&mut self.rbuf)
                .map_err(|e| c_proto(&self.url, e))?;
            if let Some(ev) = polled {
                return Ok(ev);
            }
            self.rbuf.reserve(READ_STEP);
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io_error(e))?;
            if n == 0 {
                return Err(ConnError::Closed {
                    url: self.url.clone(),
                });
            }
            self.bytes_in = self.bytes_in.saturating_add(n as u64);
        }
    }

    /// Ends the connection politely (bounded: a stuck origin is not waited for long).
    pub async fn close(mut self) {
        let sid = self.stream_id;
        self.session.delete_stream(sid);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

fn c_proto(url: &str, e: crate::rtmp::session::ClientError) -> ConnError {
    ConnError::Protocol {
        url: url.to_owned(),
        detail: e.to_string(),
    }
}
