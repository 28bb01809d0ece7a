//! Tells RTMP, RTMPE, TLS and HTTP apart from the first bytes of a connection.
//!
//! The decision needs at most [`MAX_SNIFF`] bytes: one for RTMP, RTMPE and TLS (their first
//! byte is unique), a whole method plus space for HTTP (`OPTIONS ` is the longest we accept).
//! [`sniff`] reads until [`classify`] decides, and hands back every byte it read so the
//! caller can replay them through [`crate::stream::Prefixed`].

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most bytes ever needed to decide (`OPTIONS ` is 8).
pub const MAX_SNIFF: usize = 8;

/// HTTP methods a tunnel client (or a browser, or a health check) may open with. Anything
/// else that looks like text is not ours.
const HTTP_METHODS: [&[u8]; 6] = [
    b"POST ",
    b"GET ",
    b"HEAD ",
    b"PUT ",
    b"OPTIONS ",
    b"DELETE ",
];

/// What the first bytes say the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// C0 = 0x03: a plain RTMP handshake.
    Rtmp,
    /// C0 = 0x06 (RTMPE), 0x08 (RTMPE with XTEA) or 0x09 (RTMPE with Blowfish).
    Rtmpe,
    /// 0x16: a TLS handshake record (a ClientHello).
    Tls,
    /// An HTTP request line: the RTMPT tunnel.
    Http,
    /// None of the above.
    Unknown,
}

/// The answer for the bytes seen so far: decided, or more bytes needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Is(Kind),
    NeedMore,
}

/// Classifies a connection from its first bytes. Pure, so it is tested without sockets.
pub fn classify(head: &[u8]) -> Verdict {
    let Some(&first) = head.first() else {
        return Verdict::NeedMore;
    };
    match first {
        0x03 => return Verdict::Is(Kind::Rtmp),
        0x06 | 0x08 | 0x09 => return Verdict::Is(Kind::Rtmpe),
        0x16 => return Verdict::Is(Kind::Tls),
        _ => {}
    }
    let mut could_be_http = false;
    for method in HTTP_METHODS {
        let n = head.len().min(method.len());
        if head[..n] == method[..n] {
            if head.len() >= method.len() {
                return Verdict::Is(Kind::Http);
            }
            could_be_http = true;
        }
    }
    if could_be_http {
        Verdict::NeedMore
    } else {
        Verdict::Is(Kind::Unknown)
    }
}

/// Reads from `io` until the first bytes can be classified or the peer stops sending.
///
/// Returns the kind and every byte read; one read may return more than [`MAX_SNIFF`] bytes
/// (a whole small request), and all of them are handed back for replay. A peer that closes
/// before deciding yields `Kind::Unknown` with what it sent (maybe nothing). The caller
/// bounds the wait with a timeout.
pub async fn sniff<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(Kind, Bytes)> {
    sniff_with(io, BytesMut::new()).await
}

/// Like [`sniff`], starting from bytes already read (what followed a PROXY header).
pub async fn sniff_with<S: AsyncRead + Unpin>(
    io: &mut S,
    mut buf: BytesMut,
) -> std::io::Result<(Kind, Bytes)> {
    buf.reserve(4096);
    loop {
        // classify decides once MAX_SNIFF bytes are in, and each read adds at least one, so
        // this loop runs at most MAX_SNIFF + 1 times.
        if let Verdict::Is(kind) = classify(&buf) {
            return Ok((kind, buf.freeze()));
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Ok((Kind::Unknown, buf.freeze()));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_kinds() {
        assert_eq!(classify(&[0x03]), Verdict::Is(Kind::Rtmp));
        assert_eq!(classify(&[0x06, 0, 0]), Verdict::Is(Kind::Rtmpe));
        assert_eq!(classify(&[0x08]), Verdict::Is(Kind::Rtmpe));
        assert_eq!(classify(&[0x09]), Verdict::Is(Kind::Rtmpe));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Verdict::Is(Kind::Tls));
        assert_eq!(classify(&[]), Verdict::NeedMore);
    }

    #[test]
    fn http_methods_need_the_space() {
        assert_eq!(classify(b"P"), Verdict::NeedMore);
        assert_eq!(classify(b"POST"), Verdict::NeedMore);
        assert_eq!(classify(b"POST "), Verdict::Is(Kind::Http));
        assert_eq!(
            classify(b"POST /open/1 HTTP/1.1\r\n"),
            Verdict::Is(Kind::Http)
        );
        assert_eq!(classify(b"GET /fcs/ident2"), Verdict::Is(Kind::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Verdict::Is(Kind::Http));
        assert_eq!(classify(b"PU"), Verdict::NeedMore);
    }

    #[test]
    fn other_text_is_unknown() {
        assert_eq!(classify(b"POSTX"), Verdict::Is(Kind::Unknown));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Verdict::Is(Kind::Unknown));
        assert_eq!(classify(b"PROXY TCP4"), Verdict::Is(Kind::Unknown));
        assert_eq!(classify(&[0x00]), Verdict::Is(Kind::Unknown));
        assert_eq!(classify(&[0x04]), Verdict::Is(Kind::Unknown));
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::Is(Kind::Unknown));
    }

    #[test]
    fn decided_within_max_sniff() {
        for b in 0u8..=255 {
            let mut head = vec![b];
            head.extend_from_slice(b"PTIONS ");
            assert!(matches!(classify(&head[..MAX_SNIFF]), Verdict::Is(_)));
        }
    }

    #[tokio::test]
    async fn sniff_reads_split_method_and_keeps_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"PO").await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(b"ST /open/1 HTTP/1.1\r\n").await.unwrap();
            client
        });
        let (kind, head) = sniff(&mut server).await.unwrap();
        assert_eq!(kind, Kind::Http);
        assert!(head.starts_with(b"POST "));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn sniff_eof_is_unknown() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (kind, head) = sniff(&mut server).await.unwrap();
        assert_eq!(kind, Kind::Unknown);
        assert!(head.is_empty());
    }
}
