//! rtmpgate-bench's media: synthetic frames that carry a publisher index, a sequence number,
//! the send time and a checksum (made by publishers, checked by players), and FLV input.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use rtmpgate_proto::message::{self, Message};

use crate::stats::now_ns;

// Synthetic frames.

pub const MAGIC: &[u8; 4] = b"RGB1";
/// FLV video tag header (frame type + codec, AVC packet type, composition time).
pub const TAG_HEAD: usize = 5;
/// magic, publisher, seq, send time, length, checksum.
pub const BENCH_HEAD: usize = 4 + 4 + 8 + 8 + 4 + 8;
/// An AVCDecoderConfigurationRecord (x264, 640x360), sent once as the sequence header.
pub const AVC_SEQUENCE_HEADER: &str =
    "17000000000164001effe1001a6764001eacd940a02ff970110000030001\
000003003c0f162d9601000668ebe3cb22c0fdf8f800";

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// A fast 64-bit checksum (word-wise multiply-rotate); not cryptographic.
pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15 ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a))
            .wrapping_mul(0x0100_0000_01B3)
            .rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    h
}

/// Builds frame `seq` of publisher `publisher`: `len` bytes of video tag body in total.
pub fn synthetic_frame(publisher: u32, seq: u64, key: bool, len: usize, filler: &[u8]) -> Bytes {
    let len = len.max(TAG_HEAD + BENCH_HEAD);
    let mut b = BytesMut::with_capacity(len);
    b.put_u8(if key { 0x17 } else { 0x27 });
    b.put_slice(&[1, 0, 0, 0]);
    b.put_slice(MAGIC);
    b.put_u32(publisher);
    b.put_u64(seq);
    b.put_u64(now_ns());
    b.put_u32(len as u32);
    let sum_at = b.len();
    b.put_u64(0);
    let rest = len - b.len();
    let off = (seq as usize % 61) % filler.len().max(1);
    let fill = filler.get(off..off + rest).unwrap_or_default();
    b.put_slice(fill);
    b.resize(len, 0xA5);
    let sum = checksum(&b[sum_at + 8..]) ^ seq;
    b[sum_at..sum_at + 8].copy_from_slice(&sum.to_be_bytes());
    b.freeze()
}

pub enum Check {
    Ok { seq: u64, sent_ns: u64 },
    Corrupt,
    Foreign,
}

pub fn check_frame(p: &[u8], verify: bool) -> Check {
    let Some(h) = p.get(TAG_HEAD..TAG_HEAD + BENCH_HEAD) else {
        return Check::Foreign;
    };
    if &h[..4] != MAGIC {
        return Check::Foreign;
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_be_bytes(a)
    };
    let seq = u64_at(8);
    let sent_ns = u64_at(16);
    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    if len != p.len() {
        return Check::Corrupt;
    }
    if verify && u64_at(28) != checksum(&p[TAG_HEAD + BENCH_HEAD..]) ^ seq {
        return Check::Corrupt;
    }
    Check::Ok { seq, sent_ns }
}

// ---------------------------------------------------------------------------------------
// FLV input.

/// Audio, video and data tags of an FLV file, with their timestamps.
pub fn read_flv(path: &PathBuf) -> Result<Vec<Message>> {
    let d = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if d.get(..3) != Some(b"FLV") {
        bail!("{} is not an FLV file (no FLV signature)", path.display());
    }
    let mut at = d
        .get(5..9)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(9)
        .saturating_add(4);
    let mut out = Vec::new();
    while let Some(h) = d.get(at..at + 11) {
        let ty = h[0];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let Some(body) = d.get(at + 11..at + 11 + size) else {
            break;
        };
        if matches!(ty, message::AUDIO | message::VIDEO | message::DATA_AMF0) {
            out.push(Message::new(ty, ts, 0, Bytes::copy_from_slice(body)));
        }
        at += 11 + size + 4;
    }
    if !out.iter().any(|m| m.msg_type == message::VIDEO) {
        bail!("{} holds no video tags", path.display());
    }
    Ok(out)
}

/// Metadata and codec configuration (AVC/HEVC sequence header, AAC config): sent once.
pub fn is_flv_header(tag: &Message) -> bool {
    let p = &tag.payload;
    match tag.msg_type {
        message::DATA_AMF0 => true,
        message::VIDEO => matches!(p.first(), Some(b) if b & 0x0f >= 7) && p.get(1) == Some(&0),
        message::AUDIO => matches!(p.first(), Some(b) if b >> 4 == 10) && p.get(1) == Some(&0),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_verify_and_detect_corruption() {
        let filler: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let f = synthetic_frame(3, 42, true, 12_500, &filler);
        assert_eq!(f.len(), 12_500);
        assert_eq!(f[0], 0x17);
        match check_frame(&f, true) {
            Check::Ok { seq, .. } => assert_eq!(seq, 42),
            _ => panic!("frame did not verify"),
        }
        let mut bad = f.to_vec();
        bad[9000] ^= 1;
        assert!(matches!(check_frame(&bad, true), Check::Corrupt));
        assert!(matches!(check_frame(&bad[..9000], false), Check::Corrupt));
        assert!(matches!(
            check_frame(&[0x17, 1, 0, 0, 0, 1, 2], true),
            Check::Foreign
        ));
    }
}
