//! FLV file reading without IO: the file header, tags taken off the front of a buffer the
//! caller fills, and what `onMetaData` says (duration, keyframe index) for seeking.
//!
//! Everything here works on bytes the caller read from a VOD file, which may be truncated or
//! hostile (a file someone dropped into the VOD directory): every size is checked against
//! [`ReadLimits`] before the caller is asked to read that much, no arithmetic can overflow,
//! and a malformed file is an [`FlvError`] naming the byte offset, never a panic. The fuzz
//! target and the unit tests below drive it with arbitrary bytes.

use bytes::{Bytes, BytesMut};

use crate::rtmp::amf::AmfLimits;
use crate::rtmp::amf0::{self, Amf0Value};

/// Bytes of the FLV file header ("FLV", version, flags, header size) as FLV 1 defines it.
pub const FILE_HEADER_LEN: usize = 9;
// The tag header and PreviousTagSize lengths are the writer's (`super::flv`): one format.
pub use super::flv::{PREV_TAG_SIZE_LEN as PREV_SIZE_LEN, TAG_HEADER_LEN};
/// A header size field larger than this is not an FLV file (FLV 1 writes 9; the field
/// exists for extensions nobody made).
const MAX_HEADER_SIZE: u32 = 1024;

/// FLV tag types (the same numbers as the RTMP message types they become).
pub const TAG_AUDIO: u8 = super::flv::TagKind::Audio as u8;
pub const TAG_VIDEO: u8 = super::flv::TagKind::Video as u8;
pub const TAG_SCRIPT: u8 = super::flv::TagKind::Script as u8;

/// What one file may make the reader hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest tag body accepted (`limits.max_vod_tag_bytes`); a larger declared size ends
    /// the play before anything that size is allocated.
    pub max_tag_bytes: usize,
    /// Entries of an `onMetaData` keyframe index used (`limits.max_vod_index_entries`).
    pub max_index_entries: usize,
}

/// Why a file cannot be read (on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    #[error("not an FLV file (it does not start with \"FLV\")")]
    NotFlv,
    #[error("FLV version {0} is not supported (only version 1 exists)")]
    BadVersion(u8),
    #[error("FLV header size {0} is out of range (9 to 1024)")]
    BadHeaderSize(u32),
    #[error(
        "tag at byte {offset} declares {size} bytes, more than limits.max_vod_tag_bytes ({max})"
    )]
    TagTooLarge { offset: u64, size: u32, max: usize },
    #[error("tag at byte {offset} is encrypted (FLV filter flag); encrypted files are not played")]
    Encrypted { offset: u64 },
    #[error("the file ends inside the tag at byte {offset} (truncated)")]
    Truncated { offset: u64 },
}

/// One tag's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagHeader {
    pub tag_type: u8,
    pub filtered: bool,
    pub size: u32,
    /// Milliseconds: the 24-bit field with the extension byte as its top 8 bits.
    pub timestamp: u32,
}

/// One tag of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    pub tag_type: u8,
    pub timestamp: u32,
    pub body: Bytes,
    /// Byte offset of the tag's header in the file.
    pub offset: u64,
}

impl Tag {
    /// Offset of the next tag's header (after this tag and its PreviousTagSize).
    pub fn end(&self) -> u64 {
        self.offset
            .saturating_add((TAG_HEADER_LEN + PREV_SIZE_LEN) as u64)
            .saturating_add(self.body.len() as u64)
    }

    /// A video tag a decoder can start at (frame type 1), not a sequence header.
    pub fn is_keyframe(&self) -> bool {
        self.tag_type == TAG_VIDEO && is_video_keyframe(&self.body)
    }
}

/// A video tag body's frame type says keyframe, and it is not an AVC/HEVC/AV1 sequence
/// header or an enhanced-RTMP sequence start (those carry frame type 1 too).
pub fn is_video_keyframe(body: &[u8]) -> bool {
    let Some(&b0) = body.first() else {
        return false;
    };
    if (b0 >> 4) & 0x07 != 1 {
        return false;
    }
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: low nibble is the packet type; 0 and 4 are sequence starts.
        return !matches!(b0 & 0x0f, 0 | 4);
    }
    let codec = b0 & 0x0f;
    !(matches!(codec, 7 | 12 | 13) && body.get(1) == Some(&0))
}

/// The offset of the first tag, when `buf` holds the file header and the PreviousTagSize0
/// after it; `Ok(None)` when more bytes are needed.
pub fn parse_file_header(buf: &[u8]) -> Result<Option<u64>, FlvError> {
    if buf.len() < 3 {
        return Ok(None);
    }
    if buf.get(..3) != Some(b"FLV") {
        return Err(FlvError::NotFlv);
    }
    let Some(head) = buf.get(..FILE_HEADER_LEN) else {
        return Ok(None);
    };
    if head[3] != 1 {
        return Err(FlvError::BadVersion(head[3]));
    }
    let size = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    if !(FILE_HEADER_LEN as u32..=MAX_HEADER_SIZE).contains(&size) {
        return Err(FlvError::BadHeaderSize(size));
    }
    let first = u64::from(size) + PREV_SIZE_LEN as u64;
    // `first` is at most 1028: the header and PreviousTagSize0 fit any buffer we read.
    if (buf.len() as u64) < first {
        return Ok(None);
    }
    Ok(Some(first))
}

/// A tag header from its 11 bytes.
pub fn parse_tag_header(h: &[u8; TAG_HEADER_LEN]) -> TagHeader {
    TagHeader {
        tag_type: h[0] & 0x1f,
        filtered: h[0] & 0x20 != 0,
        size: u32::from_be_bytes([0, h[1], h[2], h[3]]),
        timestamp: u32::from_be_bytes([h[7], h[4], h[5], h[6]]),
    }
}

/// What [`TagReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Tag(Tag),
    /// The buffer must hold this many bytes (from its start) before the next tag can be
    /// taken; never more than a tag header, `max_tag_bytes` and its PreviousTagSize.
    Need(usize),
}

/// Takes tags off the front of a buffer that holds the file from [`TagReader::offset`] on.
#[derive(Debug)]
pub struct TagReader {
    offset: u64,
    limits: ReadLimits,
}

impl TagReader {
    /// A reader whose buffer starts at file offset `offset` (a tag header).
    pub fn new(offset: u64, limits: ReadLimits) -> TagReader {
        TagReader { offset, limits }
    }

    /// The file offset of the next tag (the first byte the buffer must hold).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next whole tag at the front of `buf` (taken off it), or how many bytes `buf`
    /// must hold first. Tag types other than audio, video and script data are skipped
    /// (returned too: the caller ignores them, and they count against its bounds).
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Step, FlvError> {
        let Some(head) = buf.get(..TAG_HEADER_LEN) else {
            return Ok(Step::Need(TAG_HEADER_LEN));
        };
        let mut h = [0u8; TAG_HEADER_LEN];
        h.copy_from_slice(head);
        let th = parse_tag_header(&h);
        if th.filtered {
            return Err(FlvError::Encrypted {
                offset: self.offset,
            });
        }
        let size = th.size as usize;
        if size > self.limits.max_tag_bytes {
            return Err(FlvError::TagTooLarge {
                offset: self.offset,
                size: th.size,
                max: self.limits.max_tag_bytes,
            });
        }
        // At most 16 MiB + 15 (the size field has 24 bits): no overflow.
        let whole = TAG_HEADER_LEN + size + PREV_SIZE_LEN;
        if buf.len() < whole {
            return Ok(Step::Need(whole));
        }
        let mut tag = buf.split_to(whole);
        let _ = tag.split_to(TAG_HEADER_LEN);
        tag.truncate(size);
        let out = Tag {
            tag_type: th.tag_type,
            timestamp: th.timestamp,
            body: tag.freeze(),
            offset: self.offset,
        };
        // The PreviousTagSize is not checked: writers get it wrong and nothing needs it.
        self.offset = out.end();
        Ok(Step::Tag(out))
    }
}

/// What a file's `onMetaData` says that playing it needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    /// `duration`, in milliseconds, when present and sane.
    pub duration_ms: Option<u64>,
    /// `keyframes.times` (ms) and `keyframes.filepositions`, sorted by time, only entries
    /// that make sense (finite, non-negative, both in order), at most `max_index_entries`.
    pub keyframes: Vec<(u32, u64)>,
}

/// Reads `onMetaData` from a script tag body; None when the tag is not `onMetaData`.
pub fn parse_metadata(body: &[u8], amf: &AmfLimits, limits: &ReadLimits) -> Option<Metadata> {
    let values = amf0::decode_all(body, amf).ok()?;
    let mut it = values.iter();
    if it.next()?.as_str()? != "onMetaData" {
        return None;
    }
    let obj = it.next()?;
    let duration_ms = obj
        .get("duration")
        .and_then(Amf0Value::as_f64)
        .and_then(secs_to_ms)
        .map(u64::from);
    let mut keyframes = Vec::new();
    if let Some(kf) = obj.get("keyframes") {
        let times = kf.get("times").and_then(strict_numbers);
        let pos = kf.get("filepositions").and_then(strict_numbers);
        if let (Some(times), Some(pos)) = (times, pos) {
            let n = times.len().min(pos.len()).min(limits.max_index_entries);
            keyframes.reserve(n);
            let mut last = (0u32, 0u64);
            for (t, p) in times.iter().zip(pos).take(n) {
                let (Some(t), Some(p)) = (secs_to_ms(*t), bytes_pos(p)) else {
                    continue;
                };
                // An index out of order is not trusted past the first disorder.
                if !keyframes.is_empty() && (t < last.0 || p <= last.1) {
                    break;
                }
                last = (t, p);
                keyframes.push((t, p));
            }
        }
    }
    Some(Metadata {
        duration_ms,
        keyframes,
    })
}

fn strict_numbers(v: &Amf0Value) -> Option<Vec<f64>> {
    match v {
        Amf0Value::StrictArray(a) => Some(a.iter().filter_map(Amf0Value::as_f64).collect()),
        _ => None,
    }
}

/// Seconds (as FLV metadata writes them) to milliseconds, if finite and within 32 bits.
pub fn secs_to_ms(s: f64) -> Option<u32> {
    let ms = (s * 1000.0).round();
    (ms.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&ms)).then_some(ms as u32)
}

fn bytes_pos(p: f64) -> Option<u64> {
    // 2^53: past it an f64 no longer holds every integer.
    (p.is_finite() && (0.0..9.0e15).contains(&p) && p.fract() == 0.0).then_some(p as u64)
}

/// The index entry at or before `ms` (the first one when `ms` is before it).
pub fn keyframe_at_or_before(index: &[(u32, u64)], ms: u32) -> Option<(u32, u64)> {
    let after = index.partition_point(|&(t, _)| t <= ms);
    index.get(after.saturating_sub(1)).copied()
}

/// The timestamp of the last tag, from the file's last bytes: its PreviousTagSize points at
/// that tag's header. `tail` is the file's end, `tail_offset` where it starts, `file_len`
/// the file's length. None when the tail does not hold a plausible last tag.
pub fn last_timestamp(tail: &[u8], tail_offset: u64, file_len: u64) -> Option<u32> {
    let n = tail.len();
    let prev = tail.get(n.checked_sub(PREV_SIZE_LEN)?..)?;
    let size = u64::from(u32::from_be_bytes([prev[0], prev[1], prev[2], prev[3]]));
    let tag_start = file_len
        .checked_sub(PREV_SIZE_LEN as u64)?
        .checked_sub(size)?;
    let at = usize::try_from(tag_start.checked_sub(tail_offset)?).ok()?;
    let head = tail.get(at..at.checked_add(TAG_HEADER_LEN)?)?;
    let mut h = [0u8; TAG_HEADER_LEN];
    h.copy_from_slice(head);
    let th = parse_tag_header(&h);
    let body_ok = u64::from(th.size) + TAG_HEADER_LEN as u64 == size;
    (body_ok && matches!(th.tag_type, TAG_AUDIO | TAG_VIDEO | TAG_SCRIPT)).then_some(th.timestamp)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const LIMITS: ReadLimits = ReadLimits {
        max_tag_bytes: 1 << 20,
        max_index_entries: 1000,
    };

    fn header() -> Vec<u8> {
        let mut v = b"FLV\x01\x05\x00\x00\x00\x09".to_vec();
        v.extend_from_slice(&[0, 0, 0, 0]);
        v
    }

    fn tag(t: u8, ts: u32, body: &[u8]) -> Vec<u8> {
        let size = body.len() as u32;
        let mut v = vec![t];
        v.extend_from_slice(&size.to_be_bytes()[1..]);
        v.extend_from_slice(&ts.to_be_bytes()[1..]);
        v.push((ts >> 24) as u8);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(body);
        v.extend_from_slice(&(size + 11).to_be_bytes());
        v
    }

    fn meta(duration: f64, times: &[f64], pos: &[f64]) -> Vec<u8> {
        let nums =
            |a: &[f64]| Amf0Value::StrictArray(a.iter().map(|x| Amf0Value::Number(*x)).collect());
        amf0::encode_all(&[
            Amf0Value::string("onMetaData"),
            Amf0Value::EcmaArray(vec![
                ("duration".into(), Amf0Value::Number(duration)),
                (
                    "keyframes".into(),
                    Amf0Value::object([("filepositions", nums(pos)), ("times", nums(times))]),
                ),
            ]),
        ])
        .to_vec()
    }

    #[test]
    fn reads_header_and_tags_across_partial_buffers() {
        let mut file = header();
        file.extend(tag(TAG_VIDEO, 0, &[0x17, 1, 0, 0, 0, 1]));
        file.extend(tag(TAG_AUDIO, 0x0100_0002, &[0xaf, 1, 9]));
        let first = parse_file_header(&file).unwrap().unwrap();
        assert_eq!(first, 13);
        assert_eq!(parse_file_header(&file[..5]).unwrap(), None);
        let mut r = TagReader::new(first, LIMITS);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        // One byte at a time: every partial state must ask for more, never fail.
        for b in &file[13..] {
            buf.extend_from_slice(&[*b]);
            while let Step::Tag(t) = r.next(&mut buf).unwrap() {
                got.push(t);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(got[0].is_keyframe());
        assert_eq!(got[1].timestamp, 0x0100_0002);
        assert_eq!(&got[1].body[..], &[0xaf, 1, 9]);
        assert_eq!(got[1].offset, got[0].end());
        assert_eq!(r.offset(), file.len() as u64);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_junk_and_absurd_sizes_before_reading_them() {
        assert_eq!(parse_file_header(b"GIF89a..."), Err(FlvError::NotFlv));
        assert_eq!(
            parse_file_header(b"FLV\x02\x05\0\0\0\x09"),
            Err(FlvError::BadVersion(2))
        );
        assert_eq!(
            parse_file_header(b"FLV\x01\x05\xff\xff\xff\xff"),
            Err(FlvError::BadHeaderSize(u32::MAX))
        );
        let mut buf = BytesMut::from(&tag(TAG_VIDEO, 0, &[0; 16])[..11]);
        buf[1..4].copy_from_slice(&[0xff, 0xff, 0xff]);
        let mut r = TagReader::new(13, LIMITS);
        assert!(matches!(
            r.next(&mut buf),
            Err(FlvError::TagTooLarge { offset: 13, .. })
        ));
        let mut enc = BytesMut::from(&tag(TAG_VIDEO | 0x20, 0, &[1])[..]);
        assert!(matches!(
            TagReader::new(0, LIMITS).next(&mut enc),
            Err(FlvError::Encrypted { .. })
        ));
        // A declared size within the limit asks for exactly that much, never more.
        let mut short = BytesMut::from(&tag(TAG_AUDIO, 0, &[7; 100])[..20]);
        assert_eq!(
            TagReader::new(0, LIMITS).next(&mut short),
            Ok(Step::Need(115))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: pseudo-random buffers through every entry point.
        let mut x: u32 = 0x1234_5678;
        for len in 0..600usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = parse_file_header(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut r = TagReader::new(0, LIMITS);
            for _ in 0..64 {
                match r.next(&mut buf) {
                    Ok(Step::Tag(_)) => {}
                    _ => break,
                }
            }
            let _ = parse_metadata(&bytes, &AmfLimits::default(), &LIMITS);
            let _ = last_timestamp(&bytes, 0, bytes.len() as u64);
            let _ = last_timestamp(&bytes, 7, u64::MAX);
        }
    }

    #[test]
    fn metadata_duration_and_keyframe_index() {
        let body = meta(10.5, &[0.0, 1.0, 2.0, 3.0], &[13.0, 900.0, 1800.0, 2700.0]);
        let m = parse_metadata(&body, &AmfLimits::default(), &LIMITS).unwrap();
        assert_eq!(m.duration_ms, Some(10_500));
        assert_eq!(m.keyframes.len(), 4);
        assert_eq!(
            keyframe_at_or_before(&m.keyframes, 2_500),
            Some((2_000, 1800))
        );
        assert_eq!(keyframe_at_or_before(&m.keyframes, 0), Some((0, 13)));
        assert_eq!(
            keyframe_at_or_before(&m.keyframes, 99_000),
            Some((3_000, 2700))
        );
        assert_eq!(keyframe_at_or_before(&[], 5), None);
        // Out of order or absurd entries end the index there; NaN durations are ignored.
        let bad = meta(f64::NAN, &[0.0, 2.0, 1.0], &[13.0, 50.0, 60.0]);
        let m = parse_metadata(&bad, &AmfLimits::default(), &LIMITS).unwrap();
        assert_eq!(m.duration_ms, None);
        assert_eq!(m.keyframes, vec![(0, 13), (2_000, 50)]);
        let small = ReadLimits {
            max_index_entries: 2,
            ..LIMITS
        };
        let m = parse_metadata(&body, &AmfLimits::default(), &small).unwrap();
        assert_eq!(m.keyframes.len(), 2);
        assert!(parse_metadata(
            &amf0::encode_all(&[Amf0Value::string("onCuePoint")]),
            &AmfLimits::default(),
            &LIMITS
        )
        .is_none());
    }

    #[test]
    fn last_timestamp_from_the_tail() {
        let mut file = header();
        file.extend(tag(TAG_VIDEO, 40, &[0x27, 1, 0, 0, 0]));
        file.extend(tag(TAG_AUDIO, 9_876, &[0xaf, 1, 2, 3]));
        let len = file.len() as u64;
        assert_eq!(last_timestamp(&file, 0, len), Some(9_876));
        let tail = &file[file.len() - 20..];
        assert_eq!(last_timestamp(tail, len - 20, len), Some(9_876));
        // A tail too short for the last tag's header, or a lying size: nothing.
        assert_eq!(last_timestamp(&file[file.len() - 8..], len - 8, len), None);
        let mut lie = file.clone();
        let n = lie.len();
        lie[n - 1] = 3;
        assert_eq!(last_timestamp(&lie, 0, len), None);
    }
}
