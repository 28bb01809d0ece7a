//! RTMPE cryptography: Diffie-Hellman key exchange, RC4, XTEA and Blowfish signature transforms.
//!
//! Sans-IO. The server side ([`server_respond`]) turns an RTMPE C0+C1 (C0 = 6, 8 or 9) into
//! S0+S1+S2 and the pair of RC4 ciphers for everything after C2; the client side
//! ([`RtmpeClient`]) does the reverse, for tests and the load generator.
//!
//! RTMPE is legacy compatibility, not security: the key exchange is unauthenticated (the
//! HMAC keys are public), RC4 is broken, there is no integrity check. RTMPS protects a stream.
//!
//! What the clients expect (ffmpeg's rtmpproto.c/rtmpcrypt.c/rtmpdh.c, librtmp's handshake.h):
//! - C1 carries the client's digest and 128-byte public key in the key-first layout.
//! - S1 must be digest-first: ffmpeg publishing reads our key there without looking.
//! - Inbound RC4 key (client to server) = HMAC-SHA256(K, server public key)[..16], outbound =
//!   HMAC-SHA256(K, client public key)[..16]; both discard their first 1536 bytes.
//! - The shared secret K is used as a 128-byte HMAC key; clients encode a K with a zero top
//!   byte differently, so the server draws a new private key until K's top byte is non-zero.

use std::fmt;
use std::sync::OnceLock;

use blowfish::cipher::{BlockEncrypt, KeyInit};
use num_bigint::BigUint;
use rand::RngCore;
use thiserror::Error;

use super::handshake::{
    constant_time_eq, find_digest, fms_key, fms_key_short, fp_key, fp_key_short, hmac_sha256,
    random_packet, signature, split_c0c1, split_s0s1s2, write_digest, HandshakeError, Layout,
    DH_KEY_LEN, DIGEST_LEN, PACKET_LEN, S0S1S2_LEN, SERVER_VERSION,
};

/// C0 of RTMPE without a signature transform.
pub const TYPE_PLAIN: u8 = 6;
/// C0 of RTMPE whose C2/S2 signatures are XTEA-enciphered.
pub const TYPE_XTEA: u8 = 8;
/// C0 of RTMPE whose C2/S2 signatures are Blowfish-enciphered.
pub const TYPE_BLOWFISH: u8 = 9;

/// True for the C0 values this module answers.
pub fn is_rtmpe_version(c0: u8) -> bool {
    matches!(c0, TYPE_PLAIN | TYPE_XTEA | TYPE_BLOWFISH)
}

/// Keystream bytes both sides throw away before the first encrypted byte.
const RC4_DISCARD: usize = PACKET_LEN;
/// Private keys drawn before giving up on a shared secret with a non-zero top byte. Each
/// draw fails with probability 1/256, so reaching this means a broken RNG.
const MAX_KEY_DRAWS: usize = 16;
/// The version our RTMPE C1 announces, as ffmpeg's rtmpe:// does (128.0.3.2).
pub const RTMPE_CLIENT_VERSION: [u8; 4] = [128, 0, 3, 2];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RtmpeError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("rtmpe: version byte {0} is not RTMPE (6, 8 or 9)")]
    NotRtmpe(u8),
    #[error("rtmpe: the peer's Diffie-Hellman public key is outside [2, p-2]; the peer is broken or hostile")]
    BadPeerKey,
    #[error("rtmpe: no private key gave a usable shared secret in {MAX_KEY_DRAWS} draws; the random number generator is broken")]
    NoUsableKey,
    #[error("rtmpe: the server's S1 digest does not validate in either layout")]
    ServerDigest,
    #[error("rtmpe: the server's S2 signature does not match our C1 digest")]
    ServerSignature,
}

/// The 1024-bit MODP prime of RFC 2409 (Second Oakley Group); the generator is 2.
const P1024: [u8; DH_KEY_LEN] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xC9, 0x0F, 0xDA, 0xA2, 0x21, 0x68, 0xC2, 0x34,
    0xC4, 0xC6, 0x62, 0x8B, 0x80, 0xDC, 0x1C, 0xD1, 0x29, 0x02, 0x4E, 0x08, 0x8A, 0x67, 0xCC, 0x74,
    0x02, 0x0B, 0xBE, 0xA6, 0x3B, 0x13, 0x9B, 0x22, 0x51, 0x4A, 0x08, 0x79, 0x8E, 0x34, 0x04, 0xDD,
    0xEF, 0x95, 0x19, 0xB3, 0xCD, 0x3A, 0x43, 0x1B, 0x30, 0x2B, 0x0A, 0x6D, 0xF2, 0x5F, 0x14, 0x37,
    0x4F, 0xE1, 0x35, 0x6D, 0x6D, 0x51, 0xC2, 0x45, 0xE4, 0x85, 0xB5, 0x76, 0x62, 0x5E, 0x7E, 0xC6,
    0xF4, 0x4C, 0x42, 0xE9, 0xA6, 0x37, 0xED, 0x6B, 0x0B, 0xFF, 0x5C, 0xB6, 0xF4, 0x06, 0xB7, 0xED,
    0xEE, 0x38, 0x6B, 0xFB, 0x5A, 0x89, 0x9F, 0xA5, 0xAE, 0x9F, 0x24, 0x11, 0x7C, 0x4B, 0x1F, 0xE6,
    0x49, 0x28, 0x66, 0x51, 0xEC, 0xE6, 0x53, 0x81, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
];

fn prime() -> &'static BigUint {
    static P: OnceLock<BigUint> = OnceLock::new();
    P.get_or_init(|| BigUint::from_bytes_be(&P1024))
}

/// A Diffie-Hellman private exponent.
#[derive(Clone)]
pub struct DhPrivate(BigUint);

impl fmt::Debug for DhPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DhPrivate(..)")
    }
}

impl DhPrivate {
    /// A fresh exponent from the CSPRNG: 1023 random bits, so it is below p and full-size.
    pub fn random() -> Self {
        loop {
            let mut b = [0u8; DH_KEY_LEN];
            rand::thread_rng().fill_bytes(&mut b);
            b[0] &= 0x7F;
            let x = BigUint::from_bytes_be(&b);
            if x > BigUint::from(1u8) {
                return DhPrivate(x);
            }
        }
    }

    /// A chosen exponent (tests force edge cases with it).
    pub fn from_be_bytes(b: &[u8]) -> Self {
        DhPrivate(BigUint::from_bytes_be(b))
    }

    /// Our public key g^x mod p, 128 bytes big-endian, left-padded with zeros.
    pub fn public_key(&self) -> [u8; DH_KEY_LEN] {
        to_fixed(&BigUint::from(2u8).modpow(&self.0, prime()))
    }

    /// The shared secret y^x mod p for a peer's public key, 128 bytes big-endian.
    pub fn shared_secret(&self, peer: &[u8]) -> Result<[u8; DH_KEY_LEN], RtmpeError> {
        let y = parse_public_key(peer)?;
        Ok(to_fixed(&y.modpow(&self.0, prime())))
    }
}

/// A peer's public key, refused unless it lies in [2, p-2] (1 and p-1 give a trivial secret).
fn parse_public_key(peer: &[u8]) -> Result<BigUint, RtmpeError> {
    let y = BigUint::from_bytes_be(peer);
    let p_minus_1 = prime() - 1u8;
    if y < BigUint::from(2u8) || y >= p_minus_1 {
        return Err(RtmpeError::BadPeerKey);
    }
    Ok(y)
}

/// A number below p as 128 big-endian bytes, left-padded.
fn to_fixed(n: &BigUint) -> [u8; DH_KEY_LEN] {
    let b = n.to_bytes_be();
    let mut out = [0u8; DH_KEY_LEN];
    // Anything reduced mod p fits in 128 bytes; keep the low bytes if not, rather than panic.
    let take = b.len().min(DH_KEY_LEN);
    out[DH_KEY_LEN - take..].copy_from_slice(&b[b.len() - take..]);
    out
}

/// RC4, as RTMPE uses it after the handshake.
#[derive(Clone)]
pub struct Rc4 {
    s: [u8; 256],
    i: u8,
    j: u8,
}

impl fmt::Debug for Rc4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rc4(..)")
    }
}

impl Rc4 {
    /// The cipher keyed with `key` (RTMPE uses 16 bytes; an empty key acts as one zero byte).
    pub fn new(key: &[u8]) -> Self {
        let key: &[u8] = if key.is_empty() { &[0] } else { key };
        let mut s = [0u8; 256];
        for (i, v) in s.iter_mut().enumerate() {
            *v = i as u8;
        }
        let mut j = 0u8;
        for i in 0..256 {
            j = j.wrapping_add(s[i]).wrapping_add(key[i % key.len()]);
            s.swap(i, usize::from(j));
        }
        Rc4 { s, i: 0, j: 0 }
    }

    #[inline]
    fn next_byte(&mut self) -> u8 {
        self.i = self.i.wrapping_add(1);
        let si = self.s[usize::from(self.i)];
        self.j = self.j.wrapping_add(si);
        self.s.swap(usize::from(self.i), usize::from(self.j));
        let t = si.wrapping_add(self.s[usize::from(self.i)]);
        self.s[usize::from(t)]
    }

    /// Encrypt or decrypt in place.
    pub fn apply(&mut self, data: &mut [u8]) {
        for b in data {
            *b ^= self.next_byte();
        }
    }

    /// Encrypt or decrypt `src` into `dst` (the shorter length wins).
    pub fn apply_to(&mut self, src: &[u8], dst: &mut [u8]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s ^ self.next_byte();
        }
    }

    /// Throw away `n` keystream bytes.
    pub fn discard(&mut self, n: usize) {
        for _ in 0..n {
            self.next_byte();
        }
    }
}

/// The two RC4 ciphers of one side of an RTMPE connection.
#[derive(Clone, Debug)]
pub struct Rc4Pair {
    /// Decrypts what the peer sends us.
    pub inbound: Rc4,
    /// Encrypts what we send the peer.
    pub outbound: Rc4,
}

impl Rc4Pair {
    /// Derive both keys and skip the keystream both sides discard.
    /// `inbound_pub` is the public key whose HMAC keys what we receive.
    fn derive(secret: &[u8; DH_KEY_LEN], inbound_pub: &[u8], outbound_pub: &[u8]) -> Self {
        let kin = hmac_sha256(secret, &[inbound_pub]);
        let kout = hmac_sha256(secret, &[outbound_pub]);
        let mut inbound = Rc4::new(&kin[..16]);
        let mut outbound = Rc4::new(&kout[..16]);
        inbound.discard(RC4_DISCARD);
        outbound.discard(RC4_DISCARD);
        Rc4Pair { inbound, outbound }
    }
}

/// XTEA keys of type 8, one per `digest[i] % 15` (the sixteenth is never selected).
const XTEA_KEYS: [[u8; 16]; 16] = [
    [
        0xbf, 0xf0, 0x34, 0xb2, 0x11, 0xd9, 0x08, 0x1f, 0xcc, 0xdf, 0xb7, 0x95, 0x74, 0x8d, 0xe7,
        0x32,
    ],
    [
        0x08, 0x6a, 0x5e, 0xb6, 0x17, 0x43, 0x09, 0x0e, 0x6e, 0xf0, 0x5a, 0xb8, 0xfe, 0x5a, 0x39,
        0xe2,
    ],
    [
        0x7b, 0x10, 0x95, 0x6f, 0x76, 0xce, 0x05, 0x21, 0x23, 0x88, 0xa7, 0x3a, 0x44, 0x01, 0x49,
        0xa1,
    ],
    [
        0xa9, 0x43, 0xf3, 0x17, 0xeb, 0xf1, 0x1b, 0xb2, 0xa6, 0x91, 0xa5, 0xee, 0x17, 0xf3, 0x63,
        0x39,
    ],
    [
        0x7a, 0x30, 0xe0, 0x0a, 0xb5, 0x29, 0xe2, 0x2c, 0xa0, 0x87, 0xae, 0xa5, 0xc0, 0xcb, 0x79,
        0xac,
    ],
    [
        0xbd, 0xce, 0x0c, 0x23, 0x2f, 0xeb, 0xde, 0xff, 0x1c, 0xfa, 0xae, 0x16, 0x11, 0x23, 0x23,
        0x9d,
    ],
    [
        0x55, 0xdd, 0x3f, 0x7b, 0x77, 0xe7, 0xe6, 0x2e, 0x9b, 0xb8, 0xc4, 0x99, 0xc9, 0x48, 0x1e,
        0xe4,
    ],
    [
        0x40, 0x7b, 0xb6, 0xb4, 0x71, 0xe8, 0x91, 0x36, 0xa7, 0xae, 0xbf, 0x55, 0xca, 0x33, 0xb8,
        0x39,
    ],
    [
        0xfc, 0xf6, 0xbd, 0xc3, 0xb6, 0x3c, 0x36, 0x97, 0x7c, 0xe4, 0xf8, 0x25, 0x04, 0xd9, 0x59,
        0xb2,
    ],
    [
        0x28, 0xe0, 0x91, 0xfd, 0x41, 0x95, 0x4c, 0x4c, 0x7f, 0xb7, 0xdb, 0x00, 0xe3, 0xa0, 0x66,
        0xf8,
    ],
    [
        0x57, 0x84, 0x5b, 0x76, 0x4f, 0x25, 0x1b, 0x03, 0x46, 0xd4, 0x5b, 0xcd, 0xa2, 0xc3, 0x0d,
        0x29,
    ],
    [
        0x0a, 0xcc, 0xee, 0xf8, 0xda, 0x55, 0xb5, 0x46, 0x03, 0x47, 0x34, 0x52, 0x58, 0x63, 0x71,
        0x3b,
    ],
    [
        0xb8, 0x20, 0x75, 0xdc, 0xa7, 0x5f, 0x1f, 0xee, 0xd8, 0x42, 0x68, 0xe8, 0xa7, 0x2a, 0x44,
        0xcc,
    ],
    [
        0x07, 0xcf, 0x6e, 0x9e, 0xa1, 0x6d, 0x7b, 0x25, 0x9f, 0xa7, 0xae, 0x6c, 0xd9, 0x2f, 0x56,
        0x29,
    ],
    [
        0xfe, 0xb1, 0xea, 0xe4, 0x8c, 0x8c, 0x3c, 0xe1, 0x4e, 0x00, 0x64, 0xa7, 0x6a, 0x38, 0x7c,
        0x2a,
    ],
    [
        0x89, 0x3a, 0x94, 0x27, 0xcc, 0x30, 0x13, 0xa2, 0xf1, 0x06, 0x38, 0x5b, 0xa8, 0x29, 0xf9,
        0x27,
    ],
];

/// Blowfish keys of type 9, one per `digest[i] % 15`.
const BLOWFISH_KEYS: [[u8; 24]; 16] = [
    [
        0x79, 0x34, 0x77, 0x4c, 0x67, 0xd1, 0x38, 0x3a, 0xdf, 0xb3, 0x56, 0xbe, 0x8b, 0x7b, 0xd0,
        0x24, 0x38, 0xe0, 0x73, 0x58, 0x41, 0x5d, 0x69, 0x67,
    ],
    [
        0x46, 0xf6, 0xb4, 0xcc, 0x01, 0x93, 0xe3, 0xa1, 0x9e, 0x7d, 0x3c, 0x65, 0x55, 0x86, 0xfd,
        0x09, 0x8f, 0xf7, 0xb3, 0xc4, 0x6f, 0x41, 0xca, 0x5c,
    ],
    [
        0x1a, 0xe7, 0xe2, 0xf3, 0xf9, 0x14, 0x79, 0x94, 0xc0, 0xd3, 0x97, 0x43, 0x08, 0x7b, 0xb3,
        0x84, 0x43, 0x2f, 0x9d, 0x84, 0x3f, 0x21, 0x01, 0x9b,
    ],
    [
        0xd3, 0xe3, 0x54, 0xb0, 0xf7, 0x1d, 0xf6, 0x2b, 0x5a, 0x43, 0x4d, 0x04, 0x83, 0x64, 0x3e,
        0x0d, 0x59, 0x2f, 0x61, 0xcb, 0xb1, 0x6a, 0x59, 0x0d,
    ],
    [
        0xc8, 0xc1, 0xe9, 0xb8, 0x16, 0x56, 0x99, 0x21, 0x7b, 0x5b, 0x36, 0xb7, 0xb5, 0x9b, 0xdf,
        0x06, 0x49, 0x2c, 0x97, 0xf5, 0x95, 0x48, 0x85, 0x7e,
    ],
    [
        0xeb, 0xe5, 0xe6, 0x2e, 0xa4, 0xba, 0xd4, 0x2c, 0xf2, 0x16, 0xe0, 0x8f, 0x66, 0x23, 0xa9,
        0x43, 0x41, 0xce, 0x38, 0x14, 0x84, 0x95, 0x00, 0x53,
    ],
    [
        0x66, 0xdb, 0x90, 0xf0, 0x3b, 0x4f, 0xf5, 0x6f, 0xe4, 0x9c, 0x20, 0x89, 0x35, 0x5e, 0xd2,
        0xb2, 0xc3, 0x9e, 0x9f, 0x7f, 0x63, 0xb2, 0x28, 0x81,
    ],
    [
        0xbb, 0x20, 0xac, 0xed, 0x2a, 0x04, 0x6a, 0x19, 0x94, 0x98, 0x9b, 0xc8, 0xff, 0xcd, 0x93,
        0xef, 0xc6, 0x0d, 0x56, 0xa7, 0xeb, 0x13, 0xd9, 0x30,
    ],
    [
        0xbc, 0xf2, 0x43, 0x82, 0x09, 0x40, 0x8a, 0x87, 0x25, 0x43, 0x6d, 0xe6, 0xbb, 0xa4, 0xb9,
        0x44, 0x58, 0x3f, 0x21, 0x7c, 0x99, 0xbb, 0x3f, 0x24,
    ],
    [
        0xec, 0x1a, 0xaa, 0xcd, 0xce, 0xbd, 0x53, 0x11, 0xd2, 0xfb, 0x83, 0xb6, 0xc3, 0xba, 0xab,
        0x4f, 0x62, 0x79, 0xe8, 0x65, 0xa9, 0x92, 0x28, 0x76,
    ],
    [
        0xc6, 0x0c, 0x30, 0x03, 0x91, 0x18, 0x2d, 0x7b, 0x79, 0xda, 0xe1, 0xd5, 0x64, 0x77, 0x9a,
        0x12, 0xc5, 0xb1, 0xd7, 0x91, 0x4f, 0x96, 0x4c, 0xa3,
    ],
    [
        0xd7, 0x7c, 0x2a, 0xbf, 0xa6, 0xe7, 0x85, 0x7c, 0x45, 0xad, 0xff, 0x12, 0x94, 0xd8, 0xde,
        0xa4, 0x5c, 0x3d, 0x79, 0xa4, 0x44, 0x02, 0x5d, 0x22,
    ],
    [
        0x16, 0x19, 0x0d, 0x81, 0x6a, 0x4c, 0xc7, 0xf8, 0xb8, 0xf9, 0x4e, 0xcd, 0x2c, 0x9e, 0x90,
        0x84, 0xb2, 0x08, 0x25, 0x60, 0xe1, 0x1e, 0xae, 0x18,
    ],
    [
        0xe9, 0x7c, 0x58, 0x26, 0x1b, 0x51, 0x9e, 0x49, 0x82, 0x60, 0x61, 0xfc, 0xa0, 0xa0, 0x1b,
        0xcd, 0xf5, 0x05, 0xd6, 0xa6, 0x6d, 0x07, 0x88, 0xa3,
    ],
    [
        0x2b, 0x97, 0x11, 0x8b, 0xd9, 0x4e, 0xd9, 0xdf, 0x20, 0xe3, 0x9c, 0x10, 0xe6, 0xa1, 0x35,
        0x21, 0x11, 0xf9, 0x13, 0x0d, 0x0b, 0x24, 0x65, 0xb2,
    ],
    [
        0x53, 0x6a, 0x4c, 0x54, 0xac, 0x8b, 0x9b, 0xb8, 0x97, 0x29, 0xfc, 0x60, 0x2c, 0x5b, 0x3a,
        0x85, 0x68, 0xb5, 0xaa, 0x6a, 0x44, 0xcd, 0x3f, 0xa7,
    ],
];

/// XTEA, 32 rounds, on one 8-byte block read and written as little-endian words, with the
/// key's words big-endian.
fn xtea_le_encipher(block: &mut [u8; 8], key: &[u8; 16]) {
    const DELTA: u32 = 0x9E37_79B9;
    // The key table is written as bytes, but both clients read its words big-endian
    // (librtmp declares them as u32 constants); only the data words are little-endian.
    let k = [
        u32::from_be_bytes([key[0], key[1], key[2], key[3]]),
        u32::from_be_bytes([key[4], key[5], key[6], key[7]]),
        u32::from_be_bytes([key[8], key[9], key[10], key[11]]),
        u32::from_be_bytes([key[12], key[13], key[14], key[15]]),
    ];
    let mut v0 = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    let mut v1 = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let mut sum: u32 = 0;
    for _ in 0..32 {
        v0 = v0.wrapping_add(
            ((v1 << 4) ^ (v1 >> 5)).wrapping_add(v1) ^ sum.wrapping_add(k[(sum & 3) as usize]),
        );
        sum = sum.wrapping_add(DELTA);
        v1 = v1.wrapping_add(
            ((v0 << 4) ^ (v0 >> 5)).wrapping_add(v0)
                ^ sum.wrapping_add(k[((sum >> 11) & 3) as usize]),
        );
    }
    block[..4].copy_from_slice(&v0.to_le_bytes());
    block[4..].copy_from_slice(&v1.to_le_bytes());
}

/// Blowfish on one 8-byte block read and written as little-endian words.
fn blowfish_le_encipher(block: &mut [u8; 8], key: &[u8; 24]) {
    // Any key of 4..=56 bytes is accepted; 24 is always fine.
    if let Ok(c) = blowfish::BlowfishLE::new_from_slice(key) {
        c.encrypt_block(block.into());
    }
}

/// Encipher the 32-byte signature closing C2/S2 for RTMPE types 8 (XTEA) and 9 (Blowfish);
/// type 6 leaves it alone. Each 8-byte block `i` uses key table entry `key_digest[i] % 15`,
/// where `key_digest` is the HMAC key the signature was made with.
pub fn transform_signature(sig: &mut [u8; DIGEST_LEN], key_digest: &[u8; DIGEST_LEN], ty: u8) {
    for (i, chunk) in sig.chunks_exact_mut(8).enumerate() {
        let idx = usize::from(key_digest[i * 8] % 15);
        let mut block = [0u8; 8];
        block.copy_from_slice(chunk);
        match ty {
            TYPE_XTEA => xtea_le_encipher(&mut block, &XTEA_KEYS[idx]),
            TYPE_BLOWFISH => blowfish_le_encipher(&mut block, &BLOWFISH_KEYS[idx]),
            _ => return,
        }
        chunk.copy_from_slice(&block);
    }
}

/// Which S0 the server answers an RTMPE C0 with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AnswerPolicy {
    /// 6 to 6 and 8, 9 to 9: no XTEA on our side, which some ffmpeg builds got wrong.
    #[default]
    Recommended,
    /// Answer with the client's own C0.
    Mirror,
    /// Always this type (6, 8 or 9); for tests that check a client's transforms.
    Force(u8),
}

impl AnswerPolicy {
    fn answer(self, c0: u8) -> u8 {
        match self {
            AnswerPolicy::Recommended if c0 == TYPE_XTEA => TYPE_PLAIN,
            AnswerPolicy::Recommended | AnswerPolicy::Mirror => c0,
            AnswerPolicy::Force(t) if is_rtmpe_version(t) => t,
            AnswerPolicy::Force(_) => c0,
        }
    }
}

/// The server's side of a finished RTMPE exchange of C0C1 and S0S1S2.
#[derive(Debug)]
pub struct RtmpeServerReply {
    /// S0, S1 and S2, to send in one write.
    pub s0s1s2: Vec<u8>,
    /// Ciphers for everything after C2.
    pub keys: Rc4Pair,
    /// The client's C0.
    pub client_type: u8,
    /// Our S0.
    pub server_type: u8,
    /// The layout in which the client's digest validated (None: guessed key-first).
    pub client_layout: Option<Layout>,
}

/// Answer an RTMPE C0+C1 (exactly 1537 bytes, C0 = 6, 8 or 9) with S0+S1+S2.
///
/// CPU cost: two to four 1024-bit modular exponentiations; run it off the async executor.
pub fn server_respond(c0c1: &[u8], policy: AnswerPolicy) -> Result<RtmpeServerReply, RtmpeError> {
    server_respond_with(c0c1, policy, &mut DhPrivate::random)
}

/// [`server_respond`] with the private keys drawn from `draw` (tests choose them).
pub fn server_respond_with(
    c0c1: &[u8],
    policy: AnswerPolicy,
    draw: &mut dyn FnMut() -> DhPrivate,
) -> Result<RtmpeServerReply, RtmpeError> {
    let (c0, c1) = split_c0c1(c0c1)?;
    if !is_rtmpe_version(c0) {
        return Err(RtmpeError::NotRtmpe(c0));
    }
    // ffmpeg and librtmp sign C1 key-first. A client whose digest validates nowhere gets the
    // key-first guess: the handshake then fails on its side if the guess was wrong.
    let found = find_digest(c1, fp_key_short());
    let layout = found.map_or(Layout::KeyFirst, |(l, _)| l);
    let client_digest_pos = found.map_or_else(|| layout.digest_offset(c1), |(_, p)| p);
    let client_key_pos = layout.key_offset(c1);
    let client_pub = &c1[client_key_pos..client_key_pos + DH_KEY_LEN];
    let y = parse_public_key(client_pub)?;

    let mut chosen = None;
    for _ in 0..MAX_KEY_DRAWS {
        let x = draw();
        let secret = to_fixed(&y.modpow(&x.0, prime()));
        if secret[0] != 0 {
            chosen = Some((x, secret));
            break;
        }
    }
    let (x, secret) = chosen.ok_or(RtmpeError::NoUsableKey)?;
    let server_pub = x.public_key();

    let server_type = policy.answer(c0);
    let mut s1 = random_packet(0, SERVER_VERSION);
    let key_pos = Layout::DigestFirst.key_offset(&s1);
    s1[key_pos..key_pos + DH_KEY_LEN].copy_from_slice(&server_pub);
    write_digest(&mut s1, Layout::DigestFirst, fms_key_short());

    let client_digest = &c1[client_digest_pos..client_digest_pos + DIGEST_LEN];
    let s2 = signed_packet(&fms_key(), client_digest, server_type);

    let mut s0s1s2 = Vec::with_capacity(S0S1S2_LEN);
    s0s1s2.push(server_type);
    s0s1s2.extend_from_slice(&s1);
    s0s1s2.extend_from_slice(&s2);
    Ok(RtmpeServerReply {
        s0s1s2,
        // What the client sends is keyed by our public key, what we send by theirs.
        keys: Rc4Pair::derive(&secret, &server_pub, client_pub),
        client_type: c0,
        server_type,
        client_layout: found.map(|(l, _)| l),
    })
}

/// C2/S2 of RTMPE: random bytes, the signature over them, transformed for types 8 and 9.
fn signed_packet(full_key: &[u8], peer_digest: &[u8], ty: u8) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    rand::thread_rng().fill_bytes(&mut p);
    let sig = expected_signature(full_key, peer_digest, &p, ty);
    p[PACKET_LEN - DIGEST_LEN..].copy_from_slice(&sig);
    p
}

/// The (transformed) signature a C2/S2 must end with.
fn expected_signature(
    full_key: &[u8],
    peer_digest: &[u8],
    packet: &[u8; PACKET_LEN],
    ty: u8,
) -> [u8; DIGEST_LEN] {
    let key_digest = hmac_sha256(full_key, &[peer_digest]);
    let mut sig = signature(full_key, peer_digest, packet);
    transform_signature(&mut sig, &key_digest, ty);
    sig
}

/// The client side of RTMPE, shaped like ffmpeg's: key-first C1, checks S1 and S2.
pub struct RtmpeClient {
    c0: u8,
    c1: [u8; PACKET_LEN],
    private: DhPrivate,
    key_pos: usize,
    digest_pos: usize,
}

impl fmt::Debug for RtmpeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RtmpeClient").field("c0", &self.c0).finish()
    }
}

impl RtmpeClient {
    /// A client announcing `c0` (6, 8 or 9; anything else becomes 6).
    pub fn new(c0: u8) -> Self {
        let c0 = if is_rtmpe_version(c0) { c0 } else { TYPE_PLAIN };
        let private = DhPrivate::random();
        let mut c1 = random_packet(0, RTMPE_CLIENT_VERSION);
        let key_pos = Layout::KeyFirst.key_offset(&c1);
        c1[key_pos..key_pos + DH_KEY_LEN].copy_from_slice(&private.public_key());
        let digest_pos = write_digest(&mut c1, Layout::KeyFirst, fp_key_short());
        RtmpeClient {
            c0,
            c1,
            private,
            key_pos,
            digest_pos,
        }
    }

    /// C0 and C1, to send first.
    pub fn c0c1(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + PACKET_LEN);
        v.push(self.c0);
        v.extend_from_slice(&self.c1);
        v
    }

    /// Check S0+S1+S2 (exactly 3073 bytes) and produce C2 and our ciphers.
    pub fn finish(&self, s0s1s2: &[u8]) -> Result<(Vec<u8>, Rc4Pair), RtmpeError> {
        let (s0, s1, s2) = split_s0s1s2(s0s1s2)?;
        if !is_rtmpe_version(s0) {
            return Err(RtmpeError::NotRtmpe(s0));
        }
        let (layout, server_digest_pos) =
            find_digest(s1, fms_key_short()).ok_or(RtmpeError::ServerDigest)?;
        let server_key_pos = layout.key_offset(s1);
        let server_pub = &s1[server_key_pos..server_key_pos + DH_KEY_LEN];
        let secret = self.private.shared_secret(server_pub)?;

        let my_digest = &self.c1[self.digest_pos..self.digest_pos + DIGEST_LEN];
        let want = expected_signature(&fms_key(), my_digest, s2, s0);
        if !constant_time_eq(&s2[PACKET_LEN - DIGEST_LEN..], &want) {
            return Err(RtmpeError::ServerSignature);
        }
        let server_digest = &s1[server_digest_pos..server_digest_pos + DIGEST_LEN];
        let c2 = signed_packet(&fp_key(), server_digest, s0);
        let my_pub = &self.c1[self.key_pos..self.key_pos + DH_KEY_LEN];
        Ok((c2.to_vec(), Rc4Pair::derive(&secret, my_pub, server_pub)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rc4_known_vectors() {
        // RFC 6229 test vector: key 0x0102030405, first keystream bytes.
        let mut c = Rc4::new(&[1, 2, 3, 4, 5]);
        let mut z = [0u8; 16];
        c.apply(&mut z);
        assert_eq!(
            z,
            [
                0xb2, 0x39, 0x63, 0x05, 0xf0, 0x3d, 0xc0, 0x27, 0xcc, 0xc3, 0x52, 0x4a, 0x0a, 0x11,
                0x18, 0xa8
            ]
        );
        // Classic "Key"/"Plaintext" vector.
        let mut c = Rc4::new(b"Key");
        let mut p = *b"Plaintext";
        c.apply(&mut p);
        assert_eq!(p, [0xBB, 0xF3, 0x16, 0xE8, 0xD9, 0x40, 0xAF, 0x0A, 0xD3]);
    }

    #[test]
    fn rc4_continuity_across_splits() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut whole = data.clone();
        Rc4::new(b"0123456789abcdef").apply(&mut whole);
        for split in [1usize, 7, 1536, 4095] {
            let mut c = Rc4::new(b"0123456789abcdef");
            let mut out = vec![0u8; data.len()];
            for (src, dst) in data.chunks(split).zip(out.chunks_mut(split)) {
                c.apply_to(src, dst);
            }
            assert_eq!(out, whole, "split {split}");
        }
    }

    #[test]
    fn xtea_matches_reference_vector() {
        // Reference XTEA vector (big-endian words): key 00010203 04050607 08090a0b 0c0d0e0f,
        // plaintext 41424344 45464748, ciphertext 497df3d0 72612cb5. RTMPE reads the data
        // words little-endian (the key words big-endian), so feed the data byte-swapped.
        let key = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
        let mut block = [0x44, 0x43, 0x42, 0x41, 0x48, 0x47, 0x46, 0x45];
        xtea_le_encipher(&mut block, &key);
        assert_eq!(block, [0xd0, 0xf3, 0x7d, 0x49, 0xb5, 0x2c, 0x61, 0x72]);
    }

    #[test]
    fn public_key_is_a_quadratic_residue() {
        // ffmpeg refuses a server key with y^q mod p != 1; g = 2 is a residue mod this p,
        // so every g^x is too. Check it once for a random key.
        let x = DhPrivate::random();
        let y = BigUint::from_bytes_be(&x.public_key());
        let q = (prime() - 1u8) >> 1;
        assert_eq!(y.modpow(&q, prime()), BigUint::from(1u8));
    }

    #[test]
    fn client_and_server_agree_for_every_type() {
        for c0 in [TYPE_PLAIN, TYPE_XTEA, TYPE_BLOWFISH] {
            for policy in [
                AnswerPolicy::Recommended,
                AnswerPolicy::Mirror,
                AnswerPolicy::Force(TYPE_BLOWFISH),
                AnswerPolicy::Force(TYPE_XTEA),
            ] {
                let client = RtmpeClient::new(c0);
                let reply = server_respond(&client.c0c1(), policy).unwrap();
                assert_eq!(reply.client_layout, Some(Layout::KeyFirst));
                assert_eq!(reply.client_type, c0);
                assert_eq!(reply.s0s1s2[0], reply.server_type);
                let s1: &[u8; PACKET_LEN] = reply.s0s1s2[1..1537].try_into().unwrap();
                assert_eq!(
                    find_digest(s1, fms_key_short()).map(|(l, _)| l),
                    Some(Layout::DigestFirst)
                );
                let (c2, mut ckeys) = client.finish(&reply.s0s1s2).unwrap();
                assert_eq!(c2.len(), PACKET_LEN);
                let mut skeys = reply.keys;
                let mut msg = *b"connect('live') over rc4";
                ckeys.outbound.apply(&mut msg);
                skeys.inbound.apply(&mut msg);
                assert_eq!(&msg, b"connect('live') over rc4");
                skeys.outbound.apply(&mut msg);
                ckeys.inbound.apply(&mut msg);
                assert_eq!(&msg, b"connect('live') over rc4");
            }
        }
    }

    #[test]
    fn recommended_answers() {
        assert_eq!(AnswerPolicy::Recommended.answer(6), 6);
        assert_eq!(AnswerPolicy::Recommended.answer(8), 6);
        assert_eq!(AnswerPolicy::Recommended.answer(9), 9);
        assert_eq!(AnswerPolicy::Mirror.answer(8), 8);
        assert_eq!(AnswerPolicy::Force(3).answer(8), 8);
    }

    #[test]
    fn tampered_s2_is_refused_by_client() {
        let client = RtmpeClient::new(TYPE_BLOWFISH);
        let mut reply = server_respond(&client.c0c1(), AnswerPolicy::Mirror).unwrap();
        reply.s0s1s2[3060] ^= 0x80;
        assert_eq!(
            client.finish(&reply.s0s1s2).unwrap_err(),
            RtmpeError::ServerSignature
        );
    }

    /// A C0C1 whose public key is `client_pub`, signed key-first.
    fn c0c1_with_key(client_pub: &[u8; DH_KEY_LEN]) -> Vec<u8> {
        let mut c1 = random_packet(0, RTMPE_CLIENT_VERSION);
        let pos = Layout::KeyFirst.key_offset(&c1);
        c1[pos..pos + DH_KEY_LEN].copy_from_slice(client_pub);
        write_digest(&mut c1, Layout::KeyFirst, fp_key_short());
        let mut v = vec![TYPE_PLAIN];
        v.extend_from_slice(&c1);
        v
    }

    #[test]
    fn zero_top_byte_secret_is_redrawn() {
        // Client key 2^1000 and private key 1 give K = 2^1000, whose top byte is zero;
        // private key 2 gives K = 2^2000 mod p, whose top byte is 0xf0.
        let client_pub = to_fixed(&(BigUint::from(1u8) << 1000));
        let mut draws = vec![
            DhPrivate::from_be_bytes(&[2]),
            DhPrivate::from_be_bytes(&[1]),
        ];
        let mut count = 0;
        let reply = server_respond_with(
            &c0c1_with_key(&client_pub),
            AnswerPolicy::Recommended,
            &mut || {
                count += 1;
                draws.pop().unwrap()
            },
        )
        .unwrap();
        assert_eq!(count, 2, "the zero-top-byte secret must be refused");
        let s1: &[u8; PACKET_LEN] = reply.s0s1s2[1..1537].try_into().unwrap();
        let kpos = Layout::DigestFirst.key_offset(s1);
        // Our public key is 2^2 = 4.
        assert_eq!(s1[kpos + 127], 4);
        assert!(s1[kpos..kpos + 127].iter().all(|&b| b == 0));
    }

    #[test]
    fn always_zero_secret_gives_up() {
        let client_pub = to_fixed(&(BigUint::from(1u8) << 1000));
        let err = server_respond_with(
            &c0c1_with_key(&client_pub),
            AnswerPolicy::Recommended,
            &mut || DhPrivate::from_be_bytes(&[1]),
        )
        .unwrap_err();
        assert_eq!(err, RtmpeError::NoUsableKey);
    }

    #[test]
    fn degenerate_client_keys_are_refused() {
        let p_minus_1 = to_fixed(&(prime() - 1u8));
        for key in [
            [0u8; DH_KEY_LEN],
            to_fixed(&BigUint::from(1u8)),
            p_minus_1,
            P1024,
        ] {
            assert_eq!(
                server_respond(&c0c1_with_key(&key), AnswerPolicy::Recommended).unwrap_err(),
                RtmpeError::BadPeerKey
            );
        }
    }

    proptest::proptest! {
        // Each case costs a few 1024-bit exponentiations; a handful covers the parsing.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        #[test]
        fn any_rtmpe_c1_is_answered_or_refused(
            c0 in proptest::sample::select(vec![6u8, 8, 9]),
            c1 in proptest::collection::vec(proptest::num::u8::ANY, PACKET_LEN),
        ) {
            let mut v = vec![c0];
            v.extend_from_slice(&c1);
            match server_respond(&v, AnswerPolicy::Mirror) {
                Ok(r) => {
                    proptest::prop_assert_eq!(r.s0s1s2.len(), S0S1S2_LEN);
                    proptest::prop_assert_eq!(r.server_type, c0);
                    proptest::prop_assert_eq!(r.client_layout, None);
                }
                Err(e) => proptest::prop_assert_eq!(e, RtmpeError::BadPeerKey),
            }
        }
    }

    #[test]
    fn non_rtmpe_versions_are_refused() {
        let mut v = vec![3u8];
        v.extend_from_slice(&[0u8; PACKET_LEN]);
        assert_eq!(
            server_respond(&v, AnswerPolicy::Recommended).unwrap_err(),
            RtmpeError::NotRtmpe(3)
        );
        assert!(matches!(
            server_respond(&[6u8; 20], AnswerPolicy::Recommended).unwrap_err(),
            RtmpeError::Handshake(HandshakeError::WrongLength { .. })
        ));
    }
}
