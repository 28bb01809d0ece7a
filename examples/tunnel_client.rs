//! A small RTMPT client: open a tunnel session, send C0+C1, idle until S0+S1+S2 are back,
//! close. Prints each step. Speaks raw HTTP/1.1 over one kept-alive TCP connection, the way
//! ffmpeg and librtmp do.
//!
//! ```text
//! cargo run --example tunnel_client -- 127.0.0.1:8080
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// S0 + S1 + S2.
const HANDSHAKE_REPLY: usize = 1 + 1536 + 1536;
/// Give up after this many idle polls.
const MAX_POLLS: u32 = 100;
/// Every request must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply body this client accepts.
const MAX_BODY: usize = 16 * 1024 * 1024;

struct Client {
    tcp: TcpStream,
    host: String,
    buf: Vec<u8>,
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Client {
    async fn post(&mut self, path: &str, body: &[u8]) -> Result<Reply> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rtmpgate-tunnel-client\r\n\
             Content-Type: application/x-fcs\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        timeout(REQUEST_TIMEOUT, async {
            self.tcp.write_all(&req).await?;
            self.read_reply().await
        })
        .await
        .with_context(|| format!("no reply to POST {path} within {REQUEST_TIMEOUT:?}"))?
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(())
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 64 * 1024 {
                bail!("reply head larger than 64 KiB");
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(self.buf.get(..end).unwrap_or_default()).into_owned();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {head:?}"))?;
        // librtmp matches `Content-` case-sensitively; check the server is friendly to it.
        let len: usize = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .with_context(|| format!("no `Content-Length: ` header (librtmp needs it): {head:?}"))?
            .trim()
            .parse()
            .context("bad Content-Length")?;
        if len > MAX_BODY {
            bail!("reply body of {len} bytes is larger than {MAX_BODY}");
        }
        let total = end.checked_add(len).context("reply length overflows")?;
        while self.buf.len() < total {
            self.fill().await?;
        }
        let body = self.buf.get(end..total).unwrap_or_default().to_vec();
        self.buf.drain(..total);
        Ok(Reply { status, body })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let target = target
        .trim_start_matches("http://")
        .trim_start_matches("rtmpt://")
        .trim_end_matches('/')
        .to_string();
    let tcp = timeout(REQUEST_TIMEOUT, TcpStream::connect(&target))
        .await
        .with_context(|| format!("connecting to {target} timed out"))?
        .with_context(|| format!("cannot connect to {target}; is an RTMPT listener there?"))?;
    tcp.set_nodelay(true)?;
    let mut c = Client {
        tcp,
        host: target.clone(),
        buf: Vec::new(),
    };
    let started = Instant::now();

    let r = c.post("/fcs/ident2", &[0]).await?;
    println!("ident2: HTTP {} (clients ignore this)", r.status);

    let r = c.post("/open/1", &[0]).await?;
    let id = String::from_utf8(r.body.clone()).context("session id is not UTF-8")?;
    let Some(id) = id.strip_suffix('\n') else {
        bail!(
            "open: HTTP {}, reply {:?} lacks the trailing newline",
            r.status,
            id
        );
    };
    println!(
        "open: HTTP {}, session id {id:?} ({} chars)",
        r.status,
        id.len()
    );
    if r.status != 200 {
        bail!("open failed with HTTP {}", r.status);
    }

    // C0 = 3 (plain RTMP); C1 = time, four zero bytes, 1528 bytes of filler.
    let mut c0c1 = vec![3u8, 0, 0, 0, 0, 0, 0, 0, 0];
    c0c1.extend((0..1528u32).map(|i| (i.wrapping_mul(31) % 251) as u8));
    let mut seq = 0u32;
    let r = c.post(&format!("/send/{id}/{seq}"), &c0c1).await?;
    seq += 1;
    let (poll, data) = r.body.split_first().context("empty send reply")?;
    println!(
        "send C0+C1 ({} bytes): HTTP {}, polling byte {poll}, {} server bytes",
        c0c1.len(),
        r.status,
        data.len()
    );
    let mut server = data.to_vec();

    while server.len() < HANDSHAKE_REPLY {
        if seq > MAX_POLLS {
            bail!(
                "no S0+S1+S2 after {MAX_POLLS} polls ({} bytes)",
                server.len()
            );
        }
        let r = c.post(&format!("/idle/{id}/{seq}"), &[0]).await?;
        seq += 1;
        if r.status != 200 {
            bail!("idle: HTTP {} (session gone?)", r.status);
        }
        let (poll, data) = r.body.split_first().context("empty idle reply")?;
        println!(
            "idle: HTTP {}, polling byte {poll}, {} server bytes",
            r.status,
            data.len()
        );
        server.extend_from_slice(data);
    }
    let s0 = server.first().copied().unwrap_or_default();
    let echoed = server.get(1537 + 8..HANDSHAKE_REPLY) == c0c1.get(9..);
    println!(
        "S0 = {s0} (RTMP version), S1+S2 = {} bytes, S2 echoes C1: {echoed}",
        server.len() - 1
    );

    let r = c.post(&format!("/close/{id}/{seq}"), &[0]).await?;
    println!("close: HTTP {}, body {:02x?}", r.status, r.body);
    let r = c.post(&format!("/idle/{id}/{}", seq + 1), &[0]).await?;
    println!("idle after close: HTTP {} (expected 404)", r.status);
    println!("done in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
