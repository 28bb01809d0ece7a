//! The RTMP handshake, server and client side: simple and digest ("complex").
//!
//! Sans-IO: the caller reads C0+C1 (1537 bytes), asks [`server_reply`] for S0+S1+S2 (3073
//! bytes) and sends them at once; it then reads C2 (1536 bytes) and ignores its content,
//! because clients disagree on what C2 holds. The client side ([`ClientHandshake`]) is for
//! the load generator and for talking to a plain backend.
//!
//! The digest handshake is the one Flash Player introduced in version 9: C1 and S1 carry an
//! HMAC-SHA256 digest at a position derived from their own bytes, in one of two layouts
//! ([`Layout`]). The HMAC keys are public, so the digest proves nothing; it exists only
//! because some clients (ffmpeg playing, librtmp) refuse a server that does not sign.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use thiserror::Error;

/// Bytes in C1, S1, C2 and S2.
pub const PACKET_LEN: usize = 1536;
/// Bytes a client sends first: C0 and C1.
pub const C0C1_LEN: usize = 1 + PACKET_LEN;
/// Bytes a server answers with: S0, S1 and S2.
pub const S0S1S2_LEN: usize = 1 + 2 * PACKET_LEN;
/// C0/S0 of plain RTMP.
pub const VERSION_PLAIN: u8 = 3;

/// Bytes in an HMAC-SHA256 digest.
pub const DIGEST_LEN: usize = 32;
/// Bytes in an RTMPE Diffie-Hellman public key.
pub const DH_KEY_LEN: usize = 128;

/// The key tail both Adobe keys share.
const KEY_TAIL: [u8; 32] = [
    0xF0, 0xEE, 0xC2, 0x4A, 0x80, 0x68, 0xBE, 0xE8, 0x2E, 0x00, 0xD0, 0xD1, 0x02, 0x9E, 0x7E, 0x57,
    0x6E, 0xEC, 0x5D, 0x2D, 0x29, 0x80, 0x6F, 0xAB, 0x93, 0xB8, 0xE6, 0x36, 0xCF, 0xEB, 0x31, 0xAE,
];
const FP_NAME: &[u8; 30] = b"Genuine Adobe Flash Player 001";
const FMS_NAME: &[u8; 36] = b"Genuine Adobe Flash Media Server 001";

/// The Flash Player key: its 30-byte name signs C1, the whole 62 bytes derive C2's key.
pub fn fp_key() -> [u8; 62] {
    let mut k = [0u8; 62];
    k[..30].copy_from_slice(FP_NAME);
    k[30..].copy_from_slice(&KEY_TAIL);
    k
}

/// The Flash Media Server key: its 36-byte name signs S1, the whole 68 bytes derive S2's key.
pub fn fms_key() -> [u8; 68] {
    let mut k = [0u8; 68];
    k[..36].copy_from_slice(FMS_NAME);
    k[36..].copy_from_slice(&KEY_TAIL);
    k
}

/// The short (name-only) keys that sign C1 and S1.
pub fn fp_key_short() -> &'static [u8] {
    FP_NAME
}
pub fn fms_key_short() -> &'static [u8] {
    FMS_NAME
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("handshake: expected {expected} bytes, got {got} (a caller bug: read exactly that many first)")]
    WrongLength { expected: usize, got: usize },
    #[error("handshake: version byte {0} is not plain RTMP (3); RTMPE (6, 8, 9) goes through the RTMPE layer")]
    UnsupportedVersion(u8),
    #[error("handshake: the server's S1 digest does not validate in either layout; the server is not speaking the digest handshake correctly")]
    ServerDigest,
    #[error("handshake: the server's S2 signature does not match our C1 digest; the server is not speaking the digest handshake correctly")]
    ServerSignature,
}

/// Where the digest and the Diffie-Hellman key sit in a 1536-byte C1/S1.
///
/// After the 8-byte header come two 764-byte blocks; in each, a 4-byte offset field is summed
/// to place the digest (or key) somewhere inside the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Digest block first (bytes 8..772), key block second. ffmpeg's plain rtmp:// uses it.
    DigestFirst,
    /// Key block first (bytes 8..772), digest block second. ffmpeg and librtmp use it for
    /// RTMPE.
    KeyFirst,
}

impl Layout {
    /// Both layouts, in the order a server tries them.
    pub const ALL: [Layout; 2] = [Layout::DigestFirst, Layout::KeyFirst];

    /// Offset of the 32-byte digest inside a 1536-byte packet (always <= 1504 - 0).
    pub fn digest_offset(self, packet: &[u8; PACKET_LEN]) -> usize {
        match self {
            Layout::DigestFirst => sum4(packet, 8) % 728 + 12,
            Layout::KeyFirst => sum4(packet, 772) % 728 + 776,
        }
    }

    /// Offset of the 128-byte Diffie-Hellman public key inside a 1536-byte packet.
    pub fn key_offset(self, packet: &[u8; PACKET_LEN]) -> usize {
        match self {
            Layout::DigestFirst => sum4(packet, 1532) % 632 + 772,
            Layout::KeyFirst => sum4(packet, 768) % 632 + 8,
        }
    }
}

/// Sum of four unsigned bytes from `at`; callers pass constants well inside the packet.
fn sum4(packet: &[u8; PACKET_LEN], at: usize) -> usize {
    packet[at..at + 4].iter().map(|&b| usize::from(b)).sum()
}

/// HMAC-SHA256 of `data` with `key`.
pub fn hmac_sha256(key: &[u8], data: &[&[u8]]) -> [u8; DIGEST_LEN] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for part in data {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> ! {
    // `Hmac::new_from_slice` only fails for fixed-key-size MACs, which HMAC is not.
    unreachable!("HMAC takes keys of any length")
}

/// The digest a packet should carry at `pos`: HMAC over the packet with those 32 bytes cut out.
pub fn packet_digest(packet: &[u8; PACKET_LEN], pos: usize, key: &[u8]) -> [u8; DIGEST_LEN] {
    let end = pos.saturating_add(DIGEST_LEN).min(PACKET_LEN);
    let start = pos.min(end);
    hmac_sha256(key, &[&packet[..start], &packet[end..]])
}

/// The layout and digest offset under which `packet` carries a valid digest signed with
/// `key`, trying digest-first then key-first.
pub fn find_digest(packet: &[u8; PACKET_LEN], key: &[u8]) -> Option<(Layout, usize)> {
    Layout::ALL.into_iter().find_map(|layout| {
        let pos = layout.digest_offset(packet);
        let want = packet_digest(packet, pos, key);
        constant_time_eq(&packet[pos..pos + DIGEST_LEN], &want).then_some((layout, pos))
    })
}

/// Write the digest of `packet` under `layout` with `key`; returns the digest's offset.
/// Everything else in the packet (time, version, DH key) must already be in place.
pub fn write_digest(packet: &mut [u8; PACKET_LEN], layout: Layout, key: &[u8]) -> usize {
    let pos = layout.digest_offset(packet);
    let d = packet_digest(packet, pos, key);
    packet[pos..pos + DIGEST_LEN].copy_from_slice(&d);
    pos
}

/// The signature closing C2 or S2: HMAC(HMAC(full key, the peer's digest), first 1504 bytes).
pub fn signature(full_key: &[u8], peer_digest: &[u8], packet: &[u8; PACKET_LEN]) -> [u8; 32] {
    let k = hmac_sha256(full_key, &[peer_digest]);
    hmac_sha256(&k, &[&packet[..PACKET_LEN - DIGEST_LEN]])
}

/// Compare without an early exit (the keys are public, but there is no reason to leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh packet: 4-byte time, 4-byte version, then random bytes.
pub fn random_packet(time: u32, version: [u8; 4]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    rand::thread_rng().fill_bytes(&mut p[8..]);
    p[..4].copy_from_slice(&time.to_be_bytes());
    p[4..8].copy_from_slice(&version);
    p
}

/// The version our digest S1 announces. ffmpeg checks S1 only when its first byte is >= 3,
/// and then insists on a valid digest, which we provide.
pub const SERVER_VERSION: [u8; 4] = [3, 5, 1, 1];
/// The version our digest C1 announces, as ffmpeg's rtmp:// does (Flash 9.0.124.2).
pub const CLIENT_VERSION: [u8; 4] = [9, 0, 124, 2];

/// Which handshake a server answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    /// S1 with version 0 and S2 = C1: no cryptography.
    Simple,
    /// The client's C1 carried a valid digest in this layout; S1 and S2 are signed.
    Digest(Layout),
}

/// A server's answer to C0+C1.
#[derive(Clone, Debug)]
pub struct ServerReply {
    /// S0, S1 and S2: send them in one write.
    pub s0s1s2: Vec<u8>,
    pub kind: HandshakeKind,
}

/// Answer a plain (C0 = 3) C0+C1 with S0+S1+S2.
///
/// A C1 with a valid Flash Player digest gets a signed S1 (same layout) and S2; any other C1
/// gets the simple answer. The C2 that follows is never checked.
pub fn server_reply(c0c1: &[u8]) -> Result<ServerReply, HandshakeError> {
    let (c0, c1) = split_c0c1(c0c1)?;
    if c0 != VERSION_PLAIN {
        return Err(HandshakeError::UnsupportedVersion(c0));
    }
    let mut out = Vec::with_capacity(S0S1S2_LEN);
    out.push(VERSION_PLAIN);
    let digest = if c1[4..8] == [0; 4] {
        None
    } else {
        find_digest(c1, fp_key_short())
    };
    match digest {
        None => {
            out.extend_from_slice(&random_packet(0, [0; 4]));
            out.extend_from_slice(c1);
            Ok(ServerReply {
                s0s1s2: out,
                kind: HandshakeKind::Simple,
            })
        }
        Some((layout, pos)) => {
            let mut s1 = random_packet(0, SERVER_VERSION);
            write_digest(&mut s1, layout, fms_key_short());
            let s2 = signed_reply_packet(&fms_key(), &c1[pos..pos + DIGEST_LEN]);
            out.extend_from_slice(&s1);
            out.extend_from_slice(&s2);
            Ok(ServerReply {
                s0s1s2: out,
                kind: HandshakeKind::Digest(layout),
            })
        }
    }
}

/// C2 or S2 of a digest handshake: 1504 random bytes and their signature.
pub fn signed_reply_packet(full_key: &[u8], peer_digest: &[u8]) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    rand::thread_rng().fill_bytes(&mut p[..PACKET_LEN - DIGEST_LEN]);
    let sig = signature(full_key, peer_digest, &p);
    p[PACKET_LEN - DIGEST_LEN..].copy_from_slice(&sig);
    p
}

/// Split exactly 1537 bytes into C0 and C1.
pub fn split_c0c1(c0c1: &[u8]) -> Result<(u8, &[u8; PACKET_LEN]), HandshakeError> {
    let wrong = || HandshakeError::WrongLength {
        expected: C0C1_LEN,
        got: c0c1.len(),
    };
    let (&c0, c1) = c0c1.split_first().ok_or_else(wrong)?;
    let c1: &[u8; PACKET_LEN] = c1.try_into().map_err(|_| wrong())?;
    Ok((c0, c1))
}

/// Split exactly 3073 bytes into S0, S1 and S2.
pub fn split_s0s1s2(
    s0s1s2: &[u8],
) -> Result<(u8, &[u8; PACKET_LEN], &[u8; PACKET_LEN]), HandshakeError> {
    let wrong = || HandshakeError::WrongLength {
        expected: S0S1S2_LEN,
        got: s0s1s2.len(),
    };
    if s0s1s2.len() != S0S1S2_LEN {
        return Err(wrong());
    }
    let (&s0, rest) = s0s1s2.split_first().ok_or_else(wrong)?;
    let (s1, s2) = rest.split_at(PACKET_LEN);
    let s1: &[u8; PACKET_LEN] = s1.try_into().map_err(|_| wrong())?;
    let s2: &[u8; PACKET_LEN] = s2.try_into().map_err(|_| wrong())?;
    Ok((s0, s1, s2))
}

/// The client side of a plain RTMP handshake.
#[derive(Clone)]
pub struct ClientHandshake {
    c1: [u8; PACKET_LEN],
    /// Offset of our digest in C1, when we signed it.
    digest_pos: Option<usize>,
}

impl ClientHandshake {
    /// A client; with `digest`, C1 is signed like Flash Player 9 (digest-first layout).
    pub fn new(digest: bool) -> Self {
        if digest {
            let mut c1 = random_packet(0, CLIENT_VERSION);
            let pos = write_digest(&mut c1, Layout::DigestFirst, fp_key_short());
            ClientHandshake {
                c1,
                digest_pos: Some(pos),
            }
        } else {
            ClientHandshake {
                c1: random_packet(0, [0; 4]),
                digest_pos: None,
            }
        }
    }

    /// C0 and C1, to send first.
    pub fn c0c1(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(C0C1_LEN);
        v.push(VERSION_PLAIN);
        v.extend_from_slice(&self.c1);
        v
    }

    /// C2, given the server's S0+S1+S2 (exactly 3073 bytes).
    ///
    /// A simple server (S1 version 0, or no valid digest) gets S1 back. When we signed C1 and
    /// S1 carries a valid digest, S2 must be signed over our digest, and C2 is signed over
    /// the server's digest as Flash Player does.
    pub fn c2(&self, s0s1s2: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let (s0, s1, s2) = split_s0s1s2(s0s1s2)?;
        if s0 != VERSION_PLAIN {
            return Err(HandshakeError::UnsupportedVersion(s0));
        }
        let Some(my_pos) = self.digest_pos else {
            return Ok(s1.to_vec());
        };
        if s1[4..8] == [0; 4] {
            return Ok(s1.to_vec());
        }
        let Some((_, server_pos)) = find_digest(s1, fms_key_short()) else {
            // A non-zero version without a digest: treat the server as simple, as ffmpeg
            // does when publishing.
            return Ok(s1.to_vec());
        };
        let want = signature(&fms_key(), &self.c1[my_pos..my_pos + DIGEST_LEN], s2);
        if !constant_time_eq(&s2[PACKET_LEN - DIGEST_LEN..], &want) {
            return Err(HandshakeError::ServerSignature);
        }
        let c2 = signed_reply_packet(&fp_key(), &s1[server_pos..server_pos + DIGEST_LEN]);
        Ok(c2.to_vec())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// An independent digest checker, written from the description rather than the helpers
    /// above: offsets computed by hand, HMAC over the two halves.
    fn independent_digest_ok(p: &[u8], key: &[u8], digest_first: bool) -> bool {
        let base = if digest_first { 8 } else { 772 };
        let off: usize =
            p[base..base + 4].iter().map(|&b| b as usize).sum::<usize>() % 728 + base + 4;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
        mac.update(&p[..off]);
        mac.update(&p[off + 32..]);
        mac.verify_slice(&p[off..off + 32]).is_ok()
    }

    /// C1 built the way ffmpeg's rtmp_handshake_imprint_with_digest does for rtmp://.
    fn ffmpeg_like_c0c1() -> Vec<u8> {
        let mut c1 = [0u8; PACKET_LEN];
        // A deterministic pseudo-random filler (ffmpeg uses its LFG).
        let mut x: u32 = 0x1234_5678;
        for b in c1.iter_mut() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        c1[..4].copy_from_slice(&[0; 4]);
        c1[4..8].copy_from_slice(&[9, 0, 124, 2]);
        let off = (c1[8] as usize + c1[9] as usize + c1[10] as usize + c1[11] as usize) % 728 + 12;
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(b"Genuine Adobe Flash Player 001").unwrap();
        mac.update(&c1[..off]);
        mac.update(&c1[off + 32..]);
        let d = mac.finalize().into_bytes();
        c1[off..off + 32].copy_from_slice(&d);
        let mut v = vec![3u8];
        v.extend_from_slice(&c1);
        v
    }

    #[test]
    fn ffmpeg_c1_gets_signed_answer() {
        let c0c1 = ffmpeg_like_c0c1();
        let r = server_reply(&c0c1).unwrap();
        assert_eq!(r.kind, HandshakeKind::Digest(Layout::DigestFirst));
        assert_eq!(r.s0s1s2.len(), S0S1S2_LEN);
        assert_eq!(r.s0s1s2[0], 3);
        let s1 = &r.s0s1s2[1..1537];
        let s2 = &r.s0s1s2[1537..];
        assert!(s1[4] >= 3, "ffmpeg checks S1 only when byte 4 >= 3");
        let fms36 = b"Genuine Adobe Flash Media Server 001";
        assert!(independent_digest_ok(s1, fms36, true));
        // S2: K = HMAC(full FMS key, client digest), sig = HMAC(K, S2[..1504]).
        let c1 = &c0c1[1..];
        let coff = (c1[8] as usize + c1[9] as usize + c1[10] as usize + c1[11] as usize) % 728 + 12;
        let mut full = fms36.to_vec();
        full.extend_from_slice(&KEY_TAIL);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&full).unwrap();
        mac.update(&c1[coff..coff + 32]);
        let k = mac.finalize().into_bytes();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k).unwrap();
        mac.update(&s2[..1504]);
        mac.verify_slice(&s2[1504..]).unwrap();
    }

    #[test]
    fn key_first_c1_is_found() {
        let mut c1 = random_packet(0, [128, 0, 3, 2]);
        write_digest(&mut c1, Layout::KeyFirst, fp_key_short());
        assert!(independent_digest_ok(&c1, fp_key_short(), false));
        let mut v = vec![3u8];
        v.extend_from_slice(&c1);
        let r = server_reply(&v).unwrap();
        assert_eq!(r.kind, HandshakeKind::Digest(Layout::KeyFirst));
        assert!(independent_digest_ok(
            &r.s0s1s2[1..1537],
            fms_key_short(),
            false
        ));
    }

    #[test]
    fn simple_fallback_echoes_c1() {
        // Non-zero version but garbage where the digest would be: simple answer.
        let mut v = vec![3u8];
        let c1 = random_packet(7, [9, 0, 124, 2]);
        v.extend_from_slice(&c1);
        let r = server_reply(&v).unwrap();
        assert_eq!(r.kind, HandshakeKind::Simple);
        assert_eq!(r.s0s1s2[0], 3);
        assert_eq!(&r.s0s1s2[5..9], &[0, 0, 0, 0]);
        assert_eq!(&r.s0s1s2[1537..], &c1[..]);
        // Zero version: simple, whatever the bytes.
        let mut v = vec![3u8];
        v.extend_from_slice(&random_packet(0, [0; 4]));
        assert_eq!(server_reply(&v).unwrap().kind, HandshakeKind::Simple);
    }

    #[test]
    fn wrong_input_is_an_error() {
        assert_eq!(
            server_reply(&[3u8; 10]).unwrap_err(),
            HandshakeError::WrongLength {
                expected: 1537,
                got: 10
            }
        );
        assert!(server_reply(&[]).is_err());
        let mut v = vec![6u8];
        v.extend_from_slice(&[0u8; PACKET_LEN]);
        assert_eq!(
            server_reply(&v).unwrap_err(),
            HandshakeError::UnsupportedVersion(6)
        );
    }

    #[test]
    fn client_and_server_agree_digest() {
        let client = ClientHandshake::new(true);
        let c0c1 = client.c0c1();
        assert!(independent_digest_ok(&c0c1[1..], fp_key_short(), true));
        let r = server_reply(&c0c1).unwrap();
        assert_eq!(r.kind, HandshakeKind::Digest(Layout::DigestFirst));
        let c2 = client.c2(&r.s0s1s2).unwrap();
        assert_eq!(c2.len(), PACKET_LEN);
        // C2 is signed over the server's digest with the full FP key.
        let s1: &[u8; PACKET_LEN] = r.s0s1s2[1..1537].try_into().unwrap();
        let (_, spos) = find_digest(s1, fms_key_short()).unwrap();
        let c2a: &[u8; PACKET_LEN] = c2.as_slice().try_into().unwrap();
        let want = signature(&fp_key(), &s1[spos..spos + 32], c2a);
        assert_eq!(&c2[1504..], &want);
    }

    #[test]
    fn client_rejects_bad_s2() {
        let client = ClientHandshake::new(true);
        let mut r = server_reply(&client.c0c1()).unwrap();
        r.s0s1s2[3072] ^= 1;
        assert_eq!(
            client.c2(&r.s0s1s2).unwrap_err(),
            HandshakeError::ServerSignature
        );
    }

    #[test]
    fn client_simple_echoes_s1() {
        let client = ClientHandshake::new(false);
        let c0c1 = client.c0c1();
        assert_eq!(&c0c1[5..9], &[0; 4]);
        let r = server_reply(&c0c1).unwrap();
        assert_eq!(r.kind, HandshakeKind::Simple);
        assert_eq!(client.c2(&r.s0s1s2).unwrap(), r.s0s1s2[1..1537].to_vec());
        // A digest client facing a simple server echoes too.
        let digest_client = ClientHandshake::new(true);
        assert_eq!(
            digest_client.c2(&r.s0s1s2).unwrap(),
            r.s0s1s2[1..1537].to_vec()
        );
        assert!(client.c2(&r.s0s1s2[..100]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_c0c1_is_answered(c1 in proptest::collection::vec(proptest::num::u8::ANY, PACKET_LEN)) {
            let mut v = vec![3u8];
            v.extend_from_slice(&c1);
            let r = server_reply(&v).unwrap();
            proptest::prop_assert_eq!(r.s0s1s2.len(), S0S1S2_LEN);
        }
    }
}
