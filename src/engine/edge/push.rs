//! A publisher on an edge, forwarded to its origin: the engine session hands each message
//! to a bounded queue ([`Forward::send`]); a task of its own connects to the stream's origin
//! (rendezvous ranking, the next origin when one fails), publishes, and writes the queue
//! out. A queue that fills (an origin slower than the publisher) or an origin that refuses
//! or drops the stream ends the publisher's session with a line saying which: the encoder
//! reconnects, and nothing else on the node waits for that origin.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::conn::{ConnError, OriginConn};
use super::{metrics, Edge};
use crate::budget::{Charge, OverBudget, PeerBudget};
use crate::engine::hub::StreamKey;
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::message::{Message, AUDIO, DATA_AMF0, VIDEO};
use crate::rtmp::session::ClientEvent;

/// Chunk stream for data messages sent to the origin.
const DATA_CSID: u32 = 5;

/// One message on its way to the origin, holding its bytes on the memory budget.
struct Outgoing {
    msg_type: u8,
    timestamp: u32,
    payload: Bytes,
    _charge: Charge,
}

/// Why a forwarded publisher must stop.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the origin connection for {0} ended (see the edge forward line before this one)")]
    Closed(String),
    #[error("the origin takes {0}'s media slower than it comes ({1} messages queued, limits.max_edge_forward_queue)")]
    Full(String, usize),
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
}

/// The publisher's end of a forward: dropping it ends the origin connection.
pub struct Forward {
    key: StreamKey,
    tx: mpsc::Sender<Outgoing>,
    cap: usize,
}

impl Forward {
    /// Queues one audio, video or data message (data as a type 18 body without
    /// `@setDataFrame`) for the origin, charged to `budget` while queued.
    pub fn send(
        &self,
        budget: &PeerBudget,
        msg_type: u8,
        timestamp: u32,
        payload: Bytes,
    ) -> Result<(), ForwardError> {
        let charge = budget.try_charge(payload.len())?;
        let out = Outgoing {
            msg_type,
            timestamp,
            payload,
            _charge: charge,
        };
        self.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ForwardError::Full(self.key.to_string(), self.cap)
            }
            mpsc::error::TrySendError::Closed(_) => ForwardError::Closed(self.key.to_string()),
        })
    }

    /// Completes when the origin side has ended (refused, dropped, unreachable). Owns a
    /// sender of its own, so a session can keep it with the publish: the channel then closes
    /// for the origin side once both are dropped (they are, together, with the publish).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let tx = self.tx.clone();
        async move { tx.closed().await }
    }

    pub fn key(&self) -> &StreamKey {
        &self.key
    }
}

pub(super) fn start(edge: Arc<Edge>, app: &str, name: &str, query: &str) -> Forward {
    let cap = edge.limits.max_edge_forward_queue.max(1);
    let (tx, rx) = mpsc::channel(cap);
    let key = StreamKey::new(app, name);
    let published = if query.is_empty() {
        name.to_owned()
    } else {
        format!("{name}?{query}")
    };
    let task_key = key.clone();
    tokio::spawn(async move {
        let m = metrics();
        m.forwards_active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = run(&edge, &task_key, &published, rx).await {
            m.forward_failures.fetch_add(1, Ordering::Relaxed);
            warn!("edge forward {task_key}: {e}; the publisher is closed (it may reconnect)");
        }
        m.forwards_active.fetch_sub(1, Ordering::Relaxed);
    });
    Forward { key, tx, cap }
}

/// Connects to the first origin in the key's ranking that takes the publish, then writes
/// the queue until the publisher leaves (Ok) or the origin fails.
async fn run(
    edge: &Edge,
    key: &StreamKey,
    published: &str,
    mut rx: mpsc::Receiver<Outgoing>,
) -> Result<(), ConnError> {
    let mut last = None;
    let mut conn = None;
    for origin in edge.ranked(key) {
        match open(edge, &origin.url, key, published).await {
            Ok(c) => {
                origin.mark(true);
                conn = Some(c);
                break;
            }
            Err(e) => {
                // A refusal is the origin's answer, not a failure of the origin.
                origin.mark(matches!(e, ConnError::Refused { .. }));
                warn!("edge forward {key}: {e}");
                last = Some(e);
            }
        }
    }
    let Some(mut conn) = conn else {
        return Err(last.unwrap_or_else(|| ConnError::Connect {
            url: "-".into(),
            detail: "no origin configured".into(),
        }));
    };
    metrics().forward_connects.fetch_add(1, Ordering::Relaxed);
    info!("edge forward {key}: publishing to {}", conn.url);
    let m = metrics();
    let mut counted = conn.bytes_out;
    let sid = conn.stream_id;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else {
                    // The publisher left.
                    conn.close().await;
                    return Ok(());
                };
                queue(&mut conn, sid, out);
                // Take whatever else is queued into the same write.
                while let Ok(out) = rx.try_recv() {
                    queue(&mut conn, sid, out);
                }
                conn.flush().await?;
                m.bytes_forwarded.fetch_add(conn.bytes_out.saturating_sub(counted), Ordering::Relaxed);
                counted = conn.bytes_out;
            }
            ev = conn.next_event() => {
                if let ClientEvent::Status { level, code, description, .. } = ev? {
                    if level == "error" {
                        return Err(ConnError::Refused {
                            url: conn.url.clone(),
                            what: format!("publish {key}"),
                            detail: format!("{code} {description}").chars().take(200).collect(),
                        });
                    }
                }
                conn.flush().await?;
            }
        }
    }
}

fn queue(conn: &mut OriginConn, sid: u32, out: Outgoing) {
    match out.msg_type {
        AUDIO | VIDEO => conn
            .session()
            .send_media(sid, out.msg_type, out.timestamp, out.payload),
        _ => {
            // Publishers send metadata wrapped in @setDataFrame; servers store it as is.
            let mut body =
                crate::rtmp::amf0::encode_all(&[Amf0Value::string("@setDataFrame")]).to_vec();
            body.extend_from_slice(&out.payload);
            let msg = Message::new(DATA_AMF0, out.timestamp, sid, Bytes::from(body));
            conn.session().send(DATA_CSID, &msg);
        }
    }
}

/// One origin: connect, createStream, publish, and wait for NetStream.Publish.Start.
async fn open(
    edge: &Edge,
    url: &crate::net::url::RtmpUrl,
    key: &StreamKey,
    published: &str,
) -> Result<OriginConn, ConnError> {
    let timeout = edge.settings.connect_timeout;
    // releaseStream and FCPublish before createStream, as the encoder itself sends them.
    let mut c = OriginConn::open_publisher(
        url,
        edge.tls.as_ref(),
        &key.app,
        published,
        &edge.limits,
        timeout,
    )
    .await?;
    c.publish(published, &format!("publish {key}"), timeout)
        .await?;
    Ok(c)
}
