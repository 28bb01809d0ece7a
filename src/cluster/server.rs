//! The server side of the internal link: other nodes' signed requests, served over
//! HTTP/1.1 (plain or TLS): `GET /cluster/v1/node` (this node's id, for their directory)
//! and `POST /cluster/v1/rtmpt/send|idle|close/ID/SEQ` (a tunnel request for a session
//! this node owns, answered exactly as if the client had sent it here).
//!
//! Bounds: connections (`limits.max_connections`, past it new ones are closed), request
//! head (`max_http_header`, `http_header_timeout_secs`), body (`max_http_body`, read within
//! `idle_timeout_secs`, charged to the memory budget while it is handled). A request whose
//! signature does not verify is answered 403 and logged at most once a second.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::auth;
use crate::budget::Charge;
use crate::door::rtmpt::{Reply, Tunnel};
use crate::limits::Limits;
use crate::throttle::LogThrottle;

/// The prefix of forwarded tunnel requests; the RTMPT path follows it.
pub const RTMPT_PREFIX: &str = "/cluster/v1/rtmpt";
/// Where a node tells its id.
pub const NODE_PATH: &str = "/cluster/v1/node";

static REFUSED: LogThrottle = LogThrottle::new();

pub struct Server {
    pub node_id: String,
    pub secret: Vec<u8>,
    pub limits: Arc<Limits>,
    pub tunnel: Weak<Tunnel>,
    /// The server's TLS configuration (TLS served by [`crate::net::tls_stream`]).
    pub tls: Option<crate::net::tls::TlsServer>,
}

impl Server {
    /// Accepts until the process ends.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(also) = REFUSED.should_log("like it") {
                        tracing::warn!("cluster link: accept failed: {e}{also}");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                if let Some(also) = REFUSED.should_log("like it") {
                    tracing::warn!(
                        %peer,
                        "cluster link: connection refused, limits.max_connections reached{also}"
                    );
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                match &this.tls {
                    Some(config) => {
                        let handshake = tokio::time::timeout(
                            this.limits.handshake_timeout(),
                            crate::net::tls_stream::TlsStream::accept(tcp, &[], config),
                        )
                        .await;
                        match handshake {
                            Ok(Ok(tls)) => this.serve(tls, peer).await,
                            _ => tracing::debug!(%peer, "cluster link: TLS handshake failed"),
                        }
                    }
                    None => this.serve(tcp, peer).await,
                }
                drop(slot);
            });
        }
    }

    async fn serve<I>(self: &Arc<Self>, io: I, peer: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let this = Arc::clone(self);
        let service = service_fn(move |req| {
            let this = Arc::clone(&this);
            async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.http_header_timeout())
            .max_header_size(self.limits.max_http_header)
            .keep_alive(true);
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(%peer, "cluster link connection ended: {e}");
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let (parts, body) = req.into_parts();
        let max = self.limits.max_http_body;
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body over limits.max_http_body\n",
            );
        }
        let mut charge = Charge::global();
        let read = read_body(body, max, &mut charge);
        let frames = match tokio::time::timeout(self.limits.idle_timeout(), read).await {
            Ok(Some(f)) => f,
            Ok(None) => return plain(StatusCode::BAD_REQUEST, "body unreadable or too large\n"),
            Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "body not received in time\n"),
        };
        let path = parts.uri.path();
        let header = parts
            .headers
            .get(auth::HEADER)
            .and_then(|v| v.to_str().ok());
        let slices: Vec<&[u8]> = frames.iter().map(|b| b.as_ref()).collect();
        if let Err(e) = auth::verify(&self.secret, header, parts.method.as_str(), path, &slices) {
            if let Some(also) = REFUSED.should_log("like it") {
                tracing::warn!(%peer, "cluster link: request refused: {e}{also}");
            }
            return plain(StatusCode::FORBIDDEN, "cluster link: not authenticated\n");
        }
        let reply = match (&parts.method, path) {
            (&Method::GET, NODE_PATH) => {
                plain(StatusCode::OK, "").map(|_| Full::new(Bytes::from(self.node_id.clone())))
            }
            (&Method::POST, p) if p.starts_with(RTMPT_PREFIX) => {
                let rtmpt = &p[RTMPT_PREFIX.len()..];
                match self.tunnel.upgrade() {
                    Some(t) => t.serve_forwarded(rtmpt, frames).await,
                    None => crate::door::rtmpt::unknown_session(),
                }
            }
            _ => plain(StatusCode::NOT_FOUND, "no such cluster endpoint\n"),
        };
        drop(charge);
        reply
    }
}

/// The body, at most `max` bytes, charged as it arrives; None when unreadable, too large
/// or over the budget.
async fn read_body(mut body: Incoming, max: usize, charge: &mut Charge) -> Option<Vec<Bytes>> {
    let mut frames = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        total = total.saturating_add(data.len());
        if total > max || frames.len() >= MAX_FRAMES {
            return None;
        }
        charge.try_grow(data.len()).ok()?;
        frames.push(data);
    }
    Some(frames)
}

/// Frames a forwarded body may come in: the link sends one; a peer sending thousands of
/// tiny chunks is refused rather than kept as thousands of handles.
const MAX_FRAMES: usize = 64;

fn plain(status: StatusCode, msg: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
