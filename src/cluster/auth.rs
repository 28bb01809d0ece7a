//! Authentication of the internal link: every request carries
//! `X-Rtmpgate-Cluster: v1 NODE UNIX_MS HEX`, HEX being HMAC-SHA256 under the shared secret
//! of the method, the path, the time, the sending node and the body. The receiver checks
//! the MAC in constant time (`Mac::verify_slice`) and the time within [`MAX_SKEW_MS`], so a
//! recorded request cannot be replayed later; within the window a replayed tunnel request
//! is a duplicate sequence number, which the session ignores.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const HEADER: &str = "x-rtmpgate-cluster";

/// How far the sender's clock may be from ours. Nodes run NTP; 30 s is generous.
pub const MAX_SKEW_MS: u64 = 30_000;

/// Longest header value we parse (a 16-character node id, 20 digits, 64 hex digits).
const MAX_HEADER: usize = 128;

type HmacSha256 = Hmac<Sha256>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mac(secret: &[u8], method: &str, path: &str, ms: u64, node: &str) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(secret).ok()?;
    m.update(method.as_bytes());
    m.update(b"\n");
    m.update(path.as_bytes());
    m.update(b"\n");
    m.update(ms.to_string().as_bytes());
    m.update(b"\n");
    m.update(node.as_bytes());
    m.update(b"\n");
    Some(m)
}

/// The header value for a request from `node`.
pub fn sign(secret: &[u8], node: &str, method: &str, path: &str, body: &[&[u8]]) -> String {
    let ms = now_ms();
    let mut hex = String::with_capacity(64);
    if let Some(mut m) = mac(secret, method, path, ms, node) {
        for part in body {
            m.update(part);
        }
        for b in m.finalize().into_bytes() {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
    }
    format!("v1 {node} {ms} {hex}")
}

/// Why a request's signature was refused (for a log line).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no X-Rtmpgate-Cluster header")]
    Missing,
    #[error("malformed X-Rtmpgate-Cluster header")]
    Malformed,
    #[error("request time differs from ours by more than {MAX_SKEW_MS} ms (check NTP)")]
    Skew,
    #[error("signature does not match (is cluster.secret the same on every node?)")]
    BadMac,
}

/// Checks a request; on success returns the sending node's id.
pub fn verify<'a>(
    secret: &[u8],
    header: Option<&'a str>,
    method: &str,
    path: &str,
    body: &[&[u8]],
) -> Result<&'a str, AuthError> {
    let h = header.ok_or(AuthError::Missing)?;
    if h.len() > MAX_HEADER {
        return Err(AuthError::Malformed);
    }
    let mut parts = h.split(' ');
    let (Some("v1"), Some(node), Some(ms), Some(hex), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(AuthError::Malformed);
    };
    let ms: u64 = ms.parse().map_err(|_| AuthError::Malformed)?;
    let given = decode_hex(hex).ok_or(AuthError::Malformed)?;
    if now_ms().abs_diff(ms) > MAX_SKEW_MS {
        return Err(AuthError::Skew);
    }
    let mut m = mac(secret, method, path, ms, node).ok_or(AuthError::BadMac)?;
    for part in body {
        m.update(part);
    }
    m.verify_slice(&given).map_err(|_| AuthError::BadMac)?;
    Ok(node)
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(*b.get(2 * i)?)? << 4 | digit(*b.get(2 * i + 1)?)?;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_and_tampering_fails() {
        let k = b"0123456789abcdef0123";
        let h = sign(
            k,
            "n1",
            "POST",
            "/cluster/v1/rtmpt/idle/n2-ab/3",
            &[b"xy", b"z"],
        );
        assert_eq!(
            verify(
                k,
                Some(&h),
                "POST",
                "/cluster/v1/rtmpt/idle/n2-ab/3",
                &[b"xyz"]
            ),
            Ok("n1")
        );
        assert_eq!(
            verify(
                k,
                Some(&h),
                "POST",
                "/cluster/v1/rtmpt/idle/n2-ab/4",
                &[b"xyz"]
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            verify(
                k,
                Some(&h),
                "POST",
                "/cluster/v1/rtmpt/idle/n2-ab/3",
                &[b"xyZ"]
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            verify(
                b"another secret 12345",
                Some(&h),
                "POST",
                "/cluster/v1/rtmpt/idle/n2-ab/3",
                &[b"xyz"]
            ),
            Err(AuthError::BadMac)
        );
        assert_eq!(verify(k, None, "POST", "/", &[]), Err(AuthError::Missing));
        assert_eq!(
            verify(k, Some("v1 n1 1 00"), "POST", "/", &[]),
            Err(AuthError::Malformed)
        );
        let old = format!("v1 n1 1000 {}", "0".repeat(64));
        assert_eq!(
            verify(k, Some(&old), "POST", "/", &[]),
            Err(AuthError::Skew)
        );
        let forged = h.replace("v1 n1", "v1 n3");
        assert_eq!(
            verify(
                k,
                Some(&forged),
                "POST",
                "/cluster/v1/rtmpt/idle/n2-ab/3",
                &[b"xyz"]
            ),
            Err(AuthError::BadMac)
        );
    }
}
