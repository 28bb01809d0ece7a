//! PROXY protocol (HAProxy's v1 text and v2 binary headers): written towards a backend so it
//! sees the real client address, and read from a load balancer in front of rtmpgate.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature that opens every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 line is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 address block (with TLVs) we accept from a load balancer.
const V2_MAX_BODY: usize = 1024;

/// Which PROXY protocol header to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...`), understood by nginx, haproxy and most servers.
    V1,
    /// The binary header, smaller and unambiguous.
    V2,
}

/// Puts both addresses in one family, mapping IPv4 into IPv6 when they differ.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    fn to_v6(a: SocketAddr) -> SocketAddr {
        match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        }
    }
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (to_v6(src), to_v6(dst))
    }
}

/// The header announcing a connection from `src` (the client) to `dst` (where it connected).
pub fn encode(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            // Version 2, command PROXY.
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // AF_INET, STREAM
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let s6 = match s {
                        IpAddr::V6(v6) => v6,
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    };
                    let d6 = match d {
                        IpAddr::V6(v6) => v6,
                        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    };
                    out.push(0x21); // AF_INET6, STREAM
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&s6.octets());
                    out.extend_from_slice(&d6.octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// Why a load balancer's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection closed before a complete PROXY protocol header")]
    Closed,
    #[error("no PROXY protocol header (first bytes {0}); the listener expects one from its load balancer (accept_proxy_protocol)")]
    Missing(String),
    #[error("malformed PROXY protocol v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    BadV2(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// What a parsed header says.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Incomplete,
    /// A header of `len` bytes; `Some(addr)` is the real client, `None` means keep the
    /// socket's own address (v1 UNKNOWN, v2 LOCAL health checks, non-IP families).
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyHeaderError::Missing(crate::net::short_hex(buf)))
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::BadV1("no CRLF within 107 bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line =
        std::str::from_utf8(&window[..cr]).map_err(|_| ProxyHeaderError::BadV1("not ASCII"))?;
    let len = cr + 2;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let family = parts.next().ok_or(ProxyHeaderError::BadV1("no family"))?;
    if family == "UNKNOWN" {
        return Ok(Parsed::Header { len, client: None });
    }
    let (Some(src), Some(_dst), Some(sport), Some(_dport), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ProxyHeaderError::BadV1("expected 6 fields"));
    };
    let ip: IpAddr = src
        .parse()
        .map_err(|_| ProxyHeaderError::BadV1("bad source address"))?;
    match (family, ip) {
        ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => {}
        _ => return Err(ProxyHeaderError::BadV1("family does not match address")),
    }
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyHeaderError::BadV1("bad source port"))?;
    Ok(Parsed::Header {
        len,
        client: Some(SocketAddr::new(ip, port)),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::BadV2("version is not 2"));
    }
    let fam = buf[13];
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body_len > V2_MAX_BODY {
        return Err(ProxyHeaderError::BadV2("address block too long"));
    }
    let len = 16 + body_len;
    let Some(body) = buf.get(16..len) else {
        return Ok(Parsed::Incomplete);
    };
    let client = match (ver_cmd & 0x0f, fam) {
        // LOCAL: the balancer's own health check.
        (0, _) => None,
        (1, 0x11) => {
            let b: &[u8; 12] = body
                .get(..12)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyHeaderError::BadV2("IPv4 block too short"))?;
            let ip = std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([b[8], b[9]]),
            ))
        }
        (1, 0x21) => {
            let b: &[u8; 36] = body
                .get(..36)
                .and_then(|s| s.try_into().ok())
                .ok_or(ProxyHeaderError::BadV2("IPv6 block too short"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                u16::from_be_bytes([b[32], b[33]]),
            ))
        }
        (1, _) => None,
        _ => return Err(ProxyHeaderError::BadV2("unknown command")),
    };
    Ok(Parsed::Header { len, client })
}

/// Reads a PROXY header from a load balancer. Returns the real client (if the header names
/// one) and any bytes read past the header, which belong to the client's stream.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<(Option<SocketAddr>, BytesMut), ProxyHeaderError> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match parse(&buf)? {
            Parsed::Header { len, client } => {
                buf.advance(len);
                return Ok((client, buf));
            }
            Parsed::Incomplete => {
                if buf.len() >= 16 + V2_MAX_BODY {
                    return Err(ProxyHeaderError::BadV2("header too long"));
                }
                if io.read_buf(&mut buf).await? == 0 {
                    return Err(ProxyHeaderError::Closed);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4() {
        let h = encode(ProxyVersion::V1, a("192.0.2.7:50000"), a("10.0.0.1:1935"));
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.0.0.1 50000 1935\r\n");
    }

    #[test]
    fn v1_ipv6_and_mixed() {
        let h = encode(ProxyVersion::V1, a("[2001:db8::1]:4000"), a("[::1]:1935"));
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 4000 1935\r\n");
        let h = encode(ProxyVersion::V1, a("192.0.2.7:4000"), a("[::1]:1935"));
        assert_eq!(h, b"PROXY TCP6 ::ffff:192.0.2.7 ::1 4000 1935\r\n");
    }

    #[test]
    fn v2_ipv4_bytes() {
        let h = encode(ProxyVersion::V2, a("192.0.2.7:50000"), a("10.0.0.1:1935"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[192, 0, 2, 7, 10, 0, 0, 1]);
        want.extend_from_slice(&[0xc3, 0x50, 0x07, 0x8f]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_bytes() {
        let h = encode(ProxyVersion::V2, a("[2001:db8::1]:1"), a("[::1]:2"));
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(h[16], 0x20);
        assert_eq!(h[16 + 31], 1);
        assert_eq!(&h[48..52], &[0, 1, 0, 2]);
    }

    #[test]
    fn round_trips() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            for (src, dst) in [
                ("192.0.2.7:50000", "10.0.0.1:1935"),
                ("[2001:db8::1]:4000", "[::1]:443"),
            ] {
                let mut h = encode(v, a(src), a(dst));
                let len = h.len();
                h.extend_from_slice(&[3, 0, 0]);
                assert_eq!(
                    parse(&h).unwrap(),
                    Parsed::Header {
                        len,
                        client: Some(a(src))
                    }
                );
                for cut in 0..len {
                    assert_eq!(parse(&h[..cut]).unwrap(), Parsed::Incomplete, "{v:?} {cut}");
                }
            }
        }
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            parse(&[3, 0, 0]),
            Err(ProxyHeaderError::Missing(_))
        ));
        assert!(parse(b"PROXY TCP4 1.2.3.4\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Parsed::Header {
                len: 15,
                client: None
            }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&local).unwrap(),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(parse(&huge).is_err());
    }

    #[tokio::test]
    async fn read_header_keeps_the_rest() {
        let mut bytes = encode(ProxyVersion::V2, a("192.0.2.7:5"), a("10.0.0.1:6"));
        bytes.extend_from_slice(&[3, 1, 2, 3]);
        let mut io = &bytes[..];
        let (client, rest) = read_header(&mut io).await.unwrap();
        assert_eq!(client, Some(a("192.0.2.7:5")));
        assert_eq!(&rest[..], &[3, 1, 2, 3]);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }
    }
}
