//! rtmpgate-bench's media: synthetic frames that carry a publisher index, a sequence number,
//! the send time and a checksum (made by publishers, checked by players), and FLV input.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use rtmpgate_proto::message::{self, Message};

use crate::stats::now_ns;

// Synthetic frames.
//
// A frame is an FLV AVC video tag whose body is well-formed AVCC (4-byte NAL lengths, as the
// sequence header's lengthSizeMinusOne = 3 says): an access unit delimiter, then one slice
// NAL (IDR on keyframes, non-IDR otherwise) that carries the bench header and filler. Servers
// that demux the NAL units (SRS refuses a frame whose NAL lengths overrun it) accept it; the
// slice data is not decodable H.264, which no server on the path decodes.
//
// The delimiter comes first so the tag body never starts 00 00 01 or 00 00 00 01 (its length
// is 2): SRS tries Annex B first and keeps the first framing that parses for the whole
// stream, and a slice of 256-511 bytes first would read as an Annex B start code.

pub const MAGIC: &[u8; 4] = b"RGB1";
/// FLV video tag header (frame type + codec, AVC packet type, composition time).
pub const TAG_HEAD: usize = 5;
/// The access unit delimiter NAL with its length: primary_pic_type 7 (any slice), stop bit.
const AUD: [u8; 6] = [0, 0, 0, 2, 0x09, 0xF0];
/// NAL header of the slice: nal_ref_idc 3, type 5 (IDR) / nal_ref_idc 2, type 1 (non-IDR).
const NAL_IDR: u8 = 0x65;
const NAL_NON_IDR: u8 = 0x41;
/// Where the slice's 4-byte length and its NAL header byte sit in the tag body.
const SLICE_LEN_AT: usize = TAG_HEAD + AUD.len();
const SLICE_NAL_AT: usize = SLICE_LEN_AT + 4;
/// Where the bench header starts in the tag body (after the AVC framing).
pub const BENCH_AT: usize = SLICE_NAL_AT + 1;
/// magic, publisher, seq, send time, length, checksum.
pub const BENCH_HEAD: usize = 4 + 4 + 8 + 8 + 4 + 8;
/// The smallest synthetic frame (tag body bytes).
pub const MIN_FRAME: usize = BENCH_AT + BENCH_HEAD;
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

/// Builds frame `seq` of publisher `publisher`: `len` bytes of video tag body in total (at
/// least [`MIN_FRAME`]).
pub fn synthetic_frame(publisher: u32, seq: u64, key: bool, len: usize, filler: &[u8]) -> Bytes {
    let len = len.max(MIN_FRAME);
    let mut b = BytesMut::with_capacity(len);
    b.put_u8(if key { 0x17 } else { 0x27 });
    b.put_slice(&[1, 0, 0, 0]);
    b.put_slice(&AUD);
    b.put_u32((len - SLICE_NAL_AT) as u32);
    b.put_u8(if key { NAL_IDR } else { NAL_NON_IDR });
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

/// Whether a frame's AVC framing is the one [`synthetic_frame`] wrote: the delimiter, a
/// slice length that ends at the end of the tag, the slice type the keyframe flag says.
fn avc_framing_ok(p: &[u8]) -> bool {
    let (Some(&flags), Some(aud), Some(slice_len), Some(&nal)) = (
        p.first(),
        p.get(TAG_HEAD..SLICE_LEN_AT),
        p.get(SLICE_LEN_AT..SLICE_NAL_AT),
        p.get(SLICE_NAL_AT),
    ) else {
        return false;
    };
    let key = flags >> 4 == 1;
    let slice_len = u32::from_be_bytes([slice_len[0], slice_len[1], slice_len[2], slice_len[3]]);
    aud == AUD
        && slice_len as usize == p.len() - SLICE_NAL_AT
        && nal == if key { NAL_IDR } else { NAL_NON_IDR }
}

pub enum Check {
    Ok { seq: u64, sent_ns: u64 },
    Corrupt,
    Foreign,
}

pub fn check_frame(p: &[u8], verify: bool) -> Check {
    let Some(h) = p.get(BENCH_AT..MIN_FRAME) else {
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
    if len != p.len() || !avc_framing_ok(p) {
        return Check::Corrupt;
    }
    if verify && u64_at(28) != checksum(&p[MIN_FRAME..]) ^ seq {
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
        let mut bad = f.to_vec();
        bad[SLICE_NAL_AT] = NAL_NON_IDR;
        assert!(matches!(check_frame(&bad, false), Check::Corrupt));
        assert!(matches!(
            check_frame(&[0x17, 1, 0, 0, 0, 1, 2], true),
            Check::Foreign
        ));
    }

    /// Splits an AVCC tag body (4-byte lengths) into its NAL units, as SRS's demuxer does:
    /// None when a length overruns the body.
    fn avcc_nal_units(body: &[u8]) -> Option<Vec<&[u8]>> {
        let mut rest = body.get(TAG_HEAD..)?;
        let mut units = Vec::new();
        while !rest.is_empty() {
            let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            units.push(rest.get(4..4 + n)?);
            rest = &rest[4 + n..];
        }
        Some(units)
    }

    /// What SRS needs of a video tag before it passes it on: NAL units that fill the body
    /// exactly, and a body that does not open with an Annex B start code (SRS tries Annex B
    /// first and keeps whichever framing parsed first for the rest of the stream).
    #[test]
    fn synthetic_frames_are_avcc_nal_units() {
        let filler: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        for len in (0..600).chain([833, 12_500, 65_536]) {
            for key in [true, false] {
                let f = synthetic_frame(0, 7, key, len, &filler);
                assert_eq!(f.len(), len.max(MIN_FRAME));
                let units = avcc_nal_units(&f).expect("NAL lengths overrun the frame");
                let types: Vec<u8> = units.iter().map(|u| u[0] & 0x1f).collect();
                assert_eq!(types, [9, if key { 5 } else { 1 }], "frame of {len} bytes");
                // SRS's test: two or more zero bytes, then 01.
                let body = &f[TAG_HEAD..];
                let zeros = body.iter().take_while(|&&b| b == 0).count();
                assert!(
                    zeros < 2 || body.get(zeros) != Some(&1),
                    "a {len}-byte frame opens with an Annex B start code"
                );
                assert!(matches!(check_frame(&f, true), Check::Ok { seq: 7, .. }));
            }
        }
    }
}
