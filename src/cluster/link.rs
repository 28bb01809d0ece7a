//! The client side of the internal link: signed HTTP/1.1 requests to other nodes over
//! pooled keep-alive connections (plain or TLS), with a bounded connect time, a bounded
//! total time and a bounded answer size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::auth;
use crate::stream::ByteStream;

/// Idle connections kept per peer; more are closed when their request ends.
const MAX_IDLE_PER_PEER: usize = 32;

/// One address of a peer's cluster link.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    pub tls: bool,
    /// The name to check its certificate against (the host as configured).
    pub host: String,
    pub addr: SocketAddr,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// A peer's answer.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// Why a request over the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no connection within {0:?} (cluster.connect_timeout_ms)")]
    ConnectTimeout(Duration),
    #[error("TLS to the peer failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("an https:// peer, but no TLS client is set up (list the peer as https:// in cluster.peers, or set cluster.tls with cluster.peers_dns)")]
    NoTls,
    #[error("'{host}' is not a name a TLS certificate can be checked against")]
    BadName {
        host: String,
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("a request path of {0} bytes that is not a valid URI")]
    Path(usize),
    #[error("answer larger than {0} bytes, or cut short")]
    Answer(usize),
}

type Sender = SendRequest<Full<Bytes>>;

/// Signs and sends requests; keeps idle connections per peer address.
pub struct Link {
    node_id: String,
    secret: Vec<u8>,
    /// None when no peer is https:// (start refuses an https:// set-up whose client failed).
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
    idle: Mutex<HashMap<PeerAddr, Vec<Sender>>>,
}

impl Link {
    pub fn new(
        node_id: String,
        secret: Vec<u8>,
        tls: Option<TlsConnector>,
        connect_timeout: Duration,
    ) -> Link {
        Link {
            node_id,
            secret,
            tls,
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one signed request and reads the whole answer (at most `max_answer` bytes),
    /// all within `timeout` (plus the connect time when a new connection is needed).
    pub async fn request(
        &self,
        peer: &PeerAddr,
        method: Method,
        path: &str,
        body: Vec<Bytes>,
        timeout: Duration,
        max_answer: usize,
    ) -> Result<Answer, LinkError> {
        let parts: Vec<&[u8]> = body.iter().map(|b| b.as_ref()).collect();
        let signature = auth::sign(&self.secret, &self.node_id, method.as_str(), path, &parts);
        let body = join(body);
        let mut sender = match self.take_idle(peer) {
            Some(s) => s,
            None => self.connect(peer).await?,
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().map_err(|_| LinkError::Path(path.len()))?;
        let headers = req.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&peer.addr.to_string()) {
            headers.insert(HOST, v);
        }
        if let Ok(v) = HeaderValue::from_str(&signature) {
            headers.insert(auth::HEADER, v);
        }
        let exchange = async {
            let resp = sender.send_request(req).await.map_err(LinkError::Http)?;
            let status = resp.status();
            let content_type = resp.headers().get(CONTENT_TYPE).cloned();
            let body = Limited::new(resp.into_body(), max_answer)
                .collect()
                .await
                .map_err(|_| LinkError::Answer(max_answer))?
                .to_bytes();
            Ok::<_, LinkError>(Answer {
                status,
                content_type,
                body,
            })
        };
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| LinkError::Timeout(timeout))??;
        self.put_idle(peer, sender);
        Ok(answer)
    }

    fn take_idle(&self, peer: &PeerAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(peer)?;
        while let Some(s) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, peer: &PeerAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(peer.clone()).or_default();
        if list.len() < MAX_IDLE_PER_PEER {
            list.push(sender);
        }
    }

    /// Drops the idle connections to `peer` (it failed: they are most likely dead too).
    pub fn forget(&self, peer: &PeerAddr) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.remove(peer);
    }

    async fn connect(&self, peer: &PeerAddr) -> Result<Sender, LinkError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer.addr))
            .await
            .map_err(|_| LinkError::ConnectTimeout(self.connect_timeout))?
            .map_err(LinkError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn ByteStream> = if peer.tls {
            let connector = self.tls.as_ref().ok_or(LinkError::NoTls)?;
            let name =
                ServerName::try_from(peer.host.clone()).map_err(|source| LinkError::BadName {
                    host: peer.host.clone(),
                    source,
                })?;
            let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| LinkError::ConnectTimeout(self.connect_timeout))?
                .map_err(LinkError::Tls)?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(LinkError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("cluster link connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// One buffer from a body's frames (no copy for the usual single frame).
fn join(mut frames: Vec<Bytes>) -> Bytes {
    if frames.len() <= 1 {
        return frames.pop().unwrap_or_default();
    }
    let total = frames.iter().map(Bytes::len).sum();
    let mut buf = BytesMut::with_capacity(total);
    for f in frames {
        buf.extend_from_slice(&f);
    }
    buf.freeze()
}

/// A TLS connector trusting the system roots plus `ca`.
pub fn tls_connector(
    ca: Option<&std::path::Path>,
) -> Result<TlsConnector, crate::net::tls::TlsError> {
    crate::net::tls::client_config(ca).map(|c| TlsConnector::from(Arc::clone(&c)))
}
