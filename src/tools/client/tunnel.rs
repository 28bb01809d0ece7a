//! The client side of the RTMPT tunnel: HTTP/1.1 POSTs (`/open/1`, `/send/ID/SEQ`,
//! `/idle/ID/SEQ`, `/close/ID/SEQ`) over one kept-alive connection (TCP or TLS), turned
//! back into a byte stream by a pump task, the way ffmpeg's rtmphttp does it.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

use super::{ClientError, PollHint};
use rtmpgate::stream::ByteStream;

/// Bytes buffered between the RTMP connection and the pump, each way.
const PIPE_BYTES: usize = 256 * 1024;
/// Most RTMP bytes carried by one `/send` body.
const MAX_SEND: usize = 128 * 1024;
/// Largest reply body accepted (a server replies with what it has pending).
const MAX_REPLY_BODY: usize = 16 * 1024 * 1024;
/// Largest reply head accepted.
const MAX_REPLY_HEAD: usize = 16 * 1024;
/// Every request must be answered within this (servers hold idles well under it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A lazily polling client (a streaming publisher) still asks this often.
const LAZY_POLL: Duration = Duration::from_secs(1);
/// After a `/send`, how long to wait for more outgoing bytes before polling with `/idle`.
/// The RTMP side usually answers within a millisecond (C2 after S0S1S2, the next command
/// after a reply), and an idle sent first would be held by the server while those bytes
/// wait behind it on this one connection.
const LINGER_AFTER_SEND: Duration = Duration::from_millis(5);

/// One HTTP/1.1 connection carrying the tunnel's requests in turn.
struct Http {
    io: Box<dyn ByteStream>,
    host: String,
    buf: BytesMut,
    req: Vec<u8>,
}

impl Http {
    /// POSTs `body` to `path`; returns the status and reply body.
    async fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, BytesMut), ClientError> {
        self.req.clear();
        self.req.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rtmpgate-bench\r\n\
                 Content-Type: application/x-fcs\r\nContent-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.req.extend_from_slice(body);
        let fut = async {
            self.io.write_all(&self.req).await?;
            self.io.flush().await?;
            self.read_reply().await
        };
        match timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.map_err(|e| match e {
                ClientError::Io(e) => ClientError::Tunnel(format!("POST {path}: {e}")),
                other => other,
            }),
            Err(_) => Err(ClientError::Tunnel(format!(
                "POST {path}: no reply within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        self.buf.reserve(64 * 1024);
        let n = self.io.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(ClientError::Tunnel(
                "the server closed the HTTP connection".into(),
            ));
        }
        Ok(())
    }

    async fn read_reply(&mut self) -> Result<(u16, BytesMut), ClientError> {
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > MAX_REPLY_HEAD {
                return Err(ClientError::Tunnel("reply head too large".into()));
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status: u16 = head
            .strip_prefix("HTTP/1.")
            .and_then(|h| h.get(2..5))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Tunnel(format!("not an HTTP reply: {head:?}")))?;
        let len = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .ok_or_else(|| {
                ClientError::Tunnel(format!("reply without Content-Length: {head:?}"))
            })?;
        if len > MAX_REPLY_BODY {
            return Err(ClientError::Tunnel(format!(
                "reply body of {len} bytes exceeds {MAX_REPLY_BODY}"
            )));
        }
        let total = head_end.saturating_add(len);
        while self.buf.len() < total {
            self.fill().await?;
        }
        self.buf.advance(head_end);
        Ok((status, self.buf.split_to(len)))
    }
}

/// Opens a tunnel session over `io` and returns the RTMP byte stream it carries. The
/// session is pumped by a task that ends when either side closes.
pub async fn open(
    io: Box<dyn ByteStream>,
    host: String,
    hint: PollHint,
) -> Result<DuplexStream, ClientError> {
    let mut http = Http {
        io,
        host,
        buf: BytesMut::new(),
        req: Vec::new(),
    };
    let (status, body) = http.post("/open/1", &[0]).await?;
    if status != 200 {
        return Err(ClientError::Tunnel(format!(
            "/open/1 answered HTTP {status}"
        )));
    }
    let id = std::str::from_utf8(&body)
        .ok()
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ClientError::Tunnel(format!("/open/1 gave a bad session id {body:?}")))?
        .to_owned();
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(async move {
        if let Err(e) = pump(http, id, theirs, hint).await {
            tracing::debug!("tunnel pump ended: {e}");
        }
    });
    Ok(ours)
}

/// Moves bytes between the RTMP side and the HTTP requests until either ends.
async fn pump(
    mut http: Http,
    id: String,
    pipe: DuplexStream,
    hint: PollHint,
) -> Result<(), ClientError> {
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let mut out = vec![0u8; MAX_SEND];
    let mut seq: u64 = 0;
    let mut last_had_data = true;
    let mut last_was_send = false;
    loop {
        let mut n = match rd.read(&mut out).now_or_never() {
            Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => n,
            None => 0,
        };
        let wait = if n > 0 {
            None
        } else if !last_had_data && !hint.eager() {
            Some(LAZY_POLL)
        } else if last_was_send {
            Some(LINGER_AFTER_SEND)
        } else {
            None
        };
        if let Some(wait) = wait {
            match timeout(wait, rd.read(&mut out)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(k)) => n = k,
                Err(_) => {}
            }
        }
        let (path, body) = if n > 0 {
            (format!("/send/{id}/{seq}"), &out[..n])
        } else {
            (format!("/idle/{id}/{seq}"), &[0u8][..])
        };
        seq = seq.wrapping_add(1);
        last_was_send = n > 0;
        let (status, mut reply) = http.post(&path, body).await?;
        if status != 200 {
            // 404: the session ended on the server; the RTMP side sees end of stream.
            return Ok(());
        }
        if reply.is_empty() {
            return Err(ClientError::Tunnel(format!("{path}: empty reply body")));
        }
        reply.advance(1); // the polling byte
        last_had_data = !reply.is_empty();
        if last_had_data && wr.write_all(&reply).await.is_err() {
            break;
        }
    }
    let _ = http.post(&format!("/close/{id}/{seq}"), &[0]).await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use rtmpgate::door::rtmpt::Tunnel;
    use rtmpgate::limits::Limits;
    use rtmpgate::stream::{ClientStream, StreamHandler};

    /// The project's tunnel server on a loopback port, echoing every session's bytes.
    async fn echo_tunnel() -> u16 {
        let echo: StreamHandler = Arc::new(|client: ClientStream| {
            Box::pin(async move {
                let (mut r, mut w) = tokio::io::split(client);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            })
        });
        let tunnel = Tunnel::new(Arc::new(Limits::default()), echo);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let local = tcp.local_addr().unwrap();
                let t = Arc::clone(&tunnel);
                tokio::spawn(async move { t.serve_connection(tcp, peer, local, false).await });
            }
        });
        port
    }

    #[tokio::test]
    async fn bytes_cross_the_tunnel_both_ways_in_order() {
        let port = echo_tunnel().await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let hint = PollHint::default();
        hint.set_eager(true);
        let pipe = open(Box::new(tcp), format!("127.0.0.1:{port}"), hint)
            .await
            .unwrap();
        let (mut r, mut w) = tokio::io::split(pipe);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w
        });
        let mut got = vec![0u8; data.len()];
        tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut got))
            .await
            .expect("echo within 20 s")
            .unwrap();
        assert!(got == data, "echoed bytes differ");
        drop(writer.await.unwrap());
    }
}
