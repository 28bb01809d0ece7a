//! A plain HTTP/1.x request head (the GET, HEAD and OPTIONS the door sees that are not the
//! RTMPT tunnel's POSTs), read within a byte and time bound, and short answers to it.
//!
//! Only what HTTP-FLV and its refusals need is kept: method, path, query, version and the
//! few headers we read (Host, Origin, Connection). The head is parsed by `httparse` from one
//! buffer of at most `max` bytes (`limits.max_http_header`) with at most [`MAX_HEADERS`]
//! header lines, so a peer makes us hold `max` bytes at worst, for at most the timeout
//! (`limits.http_header_timeout_secs`). Answers other than a stream are written with
//! `Connection: close` and the connection is closed: there is no keep-alive to bound.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Header lines a request may have; a request with more is refused (431).
pub const MAX_HEADERS: usize = 64;
/// Bytes kept of the Host and Origin headers (they are echoed in logs and CORS answers).
const MAX_KEPT_HEADER: usize = 256;

/// The request methods the door hands on; any other token is [`Method::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
    Post,
    Put,
    Delete,
    Other,
}

impl Method {
    fn parse(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            _ => Method::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other => "other",
        }
    }
}

/// What we keep of a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The path, as sent (percent-encoding kept), without the query.
    pub path: String,
    /// What followed `?`, or empty.
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// The Host header (cut to 256 bytes), if any.
    pub host: Option<String>,
    /// The Origin header (cut to 256 bytes), if any: a browser's cross-origin request.
    pub origin: Option<String>,
}

impl RequestHead {
    /// HTTP/1.1 (chunked bodies allowed); HTTP/1.0 gets a body delimited by the close.
    pub fn is_http11(&self) -> bool {
        self.minor_version >= 1
    }
}

/// Why a request head was refused; each maps to the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than limits.max_http_header ({0} bytes)")]
    TooLarge(usize),
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("no complete request head within limits.http_header_timeout_secs ({0:?})")]
    Timeout(Duration),
    #[error("the client closed before its request head was complete")]
    Closed,
    #[error("reading the request failed: {0}")]
    Io(String),
}

impl HeadError {
    /// The status a refusal is answered with (None: nobody to answer).
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders => {
                Some((431, "Request Header Fields Too Large"))
            }
            HeadError::Malformed(_) => Some((400, "Bad Request")),
            HeadError::Timeout(_) => Some((408, "Request Timeout")),
            HeadError::Closed | HeadError::Io(_) => None,
        }
    }
}

fn kept(v: &[u8]) -> String {
    let v = &v[..v.len().min(MAX_KEPT_HEADER)];
    String::from_utf8_lossy(v)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// Parses a complete head from `buf`: `Ok(None)` when more bytes are needed, else the head
/// and the bytes it took (anything after is a body or the next request).
pub fn parse(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    parse_request(buf, |req| {
        let method = Method::parse(req.method.unwrap_or_default());
        let target = req.path.unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut host = None;
        let mut origin = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("host") {
                host = Some(kept(h.value));
            } else if h.name.eq_ignore_ascii_case("origin") {
                origin = Some(kept(h.value));
            }
        }
        Ok(RequestHead {
            method,
            path: path.to_owned(),
            query: query.to_owned(),
            minor_version: req.version.unwrap_or(0),
            host,
            origin,
        })
    })
}

/// Runs httparse over `buf` with room for [`MAX_HEADERS`] header lines and hands a complete
/// request to `read`: `Ok(None)` while more bytes are needed, else what `read` made of it and
/// the bytes the head took. Every HTTP head the gateway parses itself ([`parse`] here, the
/// RTMPT tunnel's own server) maps httparse's errors in this one place.
pub fn parse_request<T>(
    buf: &[u8],
    read: impl FnOnce(&httparse::Request<'_, '_>) -> Result<T, HeadError>,
) -> Result<Option<(T, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    Ok(Some((read(&req)?, used)))
}

/// Reads a request head from `io`, starting from `buf` (bytes already read, e.g. by the
/// sniffer), holding at most `max` bytes, within `timeout` for the whole head.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    mut buf: Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<RequestHead, HeadError> {
    let read = async {
        loop {
            if let Some((head, _)) = parse(&buf)? {
                return Ok(head);
            }
            if buf.len() >= max {
                return Err(HeadError::TooLarge(max));
            }
            // Never more than `max` in all: the buffer is the bound.
            let mut chunk = [0u8; 2048];
            let room = max.saturating_sub(buf.len()).min(chunk.len());
            let n = io
                .read(&mut chunk[..room])
                .await
                .map_err(|e| HeadError::Io(e.to_string()))?;
            if n == 0 {
                return Err(HeadError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| HeadError::Timeout(timeout))?
}

/// A short, complete answer (`Connection: close`, `Content-Length`, plain text body unless
/// `headers` says otherwise). `head_only` leaves the body out (an answer to HEAD).
pub fn response(
    status: u16,
    reason: &str,
    headers: &[(&str, &str)],
    body: &str,
    head_only: bool,
) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
}

/// Writes `answer`, then closes the write side; both bounded by `timeout` (a client that
/// does not read its refusal is not waited for).
pub async fn answer<S: AsyncWrite + Unpin>(io: &mut S, answer: &[u8], timeout: Duration) {
    let _ = tokio::time::timeout(timeout, async {
        if io.write_all(answer).await.is_ok() {
            let _ = io.flush().await;
            let _ = io.shutdown().await;
        }
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_get_with_query_and_headers() {
        let raw = b"GET /live/cam.flv?token=abc&x=1 HTTP/1.1\r\nHost: example:8080\r\n\
                    Origin: http://page.test\r\nUser-Agent: t\r\n\r\nrest";
        let (h, used) = parse(raw).unwrap().unwrap();
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path, "/live/cam.flv");
        assert_eq!(h.query, "token=abc&x=1");
        assert!(h.is_http11());
        assert_eq!(h.host.as_deref(), Some("example:8080"));
        assert_eq!(h.origin.as_deref(), Some("http://page.test"));
        assert_eq!(&raw[used..], b"rest");
    }

    #[test]
    fn partial_heads_and_refusals() {
        assert_eq!(parse(b"GET /a HTTP/1.0\r\nHost: x\r\n").unwrap(), None);
        let (h, _) = parse(b"HEAD /a.flv HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            (h.method, h.is_http11(), h.query.as_str()),
            (Method::Head, false, "")
        );
        assert!(matches!(
            parse(b"GET /a HTTP/1.1\r\nBad Header\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(HeadError::TooManyHeaders));
        assert_eq!(
            HeadError::TooManyHeaders.status(),
            Some((431, "Request Header Fields Too Large"))
        );
    }

    #[test]
    fn kept_headers_are_cut_and_cleaned() {
        let long = format!("GET / HTTP/1.1\r\nOrigin: {}\r\n\r\n", "o".repeat(5000));
        let (h, _) = parse(long.as_bytes()).unwrap().unwrap();
        assert_eq!(h.origin.map(|o| o.len()), Some(MAX_KEPT_HEADER));
    }

    #[tokio::test]
    async fn read_head_is_bounded_in_bytes_and_time() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(format!("GET /{} HTTP/1.1\r\n", "a".repeat(10_000)).as_bytes())
            .await
            .unwrap();
        let r = read_head(&mut server, Vec::new(), 4096, Duration::from_secs(5)).await;
        assert_eq!(r, Err(HeadError::TooLarge(4096)));

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /x.flv HTTP/1.1\r\n").await.unwrap();
        let r = read_head(&mut server, b"".to_vec(), 4096, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(HeadError::Timeout(_))));

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"/x.flv HTTP/1.0\r\n\r\n").await.unwrap();
        let r = read_head(&mut server, b"GET ".to_vec(), 4096, Duration::from_secs(5)).await;
        assert_eq!(r.unwrap().path, "/x.flv");
    }

    #[test]
    fn short_answers() {
        let a = String::from_utf8(response(
            404,
            "Not Found",
            &[("Access-Control-Allow-Origin", "*")],
            "no such stream\n",
            false,
        ))
        .unwrap();
        assert!(a.starts_with("HTTP/1.1 404 Not Found\r\n"), "{a}");
        assert!(a.contains("Content-Length: 15\r\n"), "{a}");
        assert!(a.contains("Connection: close\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nno such stream\n"), "{a}");
        let h = String::from_utf8(response(404, "Not Found", &[], "body", true)).unwrap();
        assert!(
            h.ends_with("Content-Length: 4\r\nConnection: close\r\n\r\n"),
            "{h}"
        );
    }
}
