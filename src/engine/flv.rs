//! The FLV container, written: file header, tags, and the `onMetaData` script tag (sans-IO).
//!
//! Shared by HTTP-FLV playback and recording. The layout (Adobe's FLV
//! file format, version 10.1, annex E) is:
//!
//! ```text
//! header      "FLV" 0x01 flags(u8: 0x04 audio | 0x01 video) data_offset(u32 BE = 9)
//! PreviousTagSize0 (u32 BE = 0)
//! per tag:    type(u8: 8 audio, 9 video, 18 script) data_size(u24 BE)
//!             timestamp(u24 BE: low 24 bits) timestamp_extended(u8: bits 24-31)
//!             stream_id(u24 = 0) body(data_size bytes)
//!             PreviousTagSize(u32 BE = 11 + data_size)
//! ```
//!
//! A tag's body is exactly an RTMP message's payload (audio, video, AMF0 data): the engine's
//! frames go in without a copy. The timestamp is split as FLV requires: a 32-bit millisecond
//! time as its low 24 bits, then the high 8 bits in the extended byte, so a stream longer
//! than 4.66 hours (2^24 ms) keeps counting instead of wrapping.

use bytes::{BufMut, Bytes, BytesMut};

use crate::rtmp::amf0::Amf0Value;

/// The file header and PreviousTagSize0: what [`header`] returns.
pub const HEADER_LEN: usize = 13;
/// A tag's header (type, size, timestamp, stream id).
pub const TAG_HEADER_LEN: usize = 11;
/// The PreviousTagSize that follows each tag's body.
pub const PREV_TAG_SIZE_LEN: usize = 4;
/// The largest tag body: its size is a 24-bit field.
pub const MAX_BODY_LEN: usize = 0xFF_FFFF;

/// What a tag carries; the values are FLV's TagType (and RTMP's message types 8, 9, 18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagKind {
    Audio = 8,
    Video = 9,
    /// AMF0 script data (`onMetaData`, cue points).
    Script = 18,
}

impl TagKind {
    /// The tag kind of an RTMP message type (8, 9, 18); None for anything FLV cannot hold
    /// (AMF3 data, commands, control messages).
    pub fn from_msg_type(msg_type: u8) -> Option<TagKind> {
        match msg_type {
            8 => Some(TagKind::Audio),
            9 => Some(TagKind::Video),
            18 => Some(TagKind::Script),
            _ => None,
        }
    }
}

/// A tag body over [`MAX_BODY_LEN`] bytes: FLV's size field cannot say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("FLV tag body of {0} bytes is over the format's 16,777,215-byte limit")]
pub struct BodyTooLarge(pub usize);

/// The FLV file header followed by PreviousTagSize0: the first 13 bytes of every FLV file
/// or HTTP-FLV response. The flags tell a player which decoders to set up; players such as
/// flv.js/mpegts.js wait for a track that a flag announces, so set only what the stream has.
pub fn header(has_audio: bool, has_video: bool) -> [u8; HEADER_LEN] {
    let flags = (u8::from(has_audio) << 2) | u8::from(has_video);
    [b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0]
}

/// A tag's 11-byte header for a body of `body_len` bytes at `timestamp_ms` (the whole
/// 32 bits: low 24 in the timestamp field, high 8 in the extended byte).
pub fn tag_header(
    kind: TagKind,
    timestamp_ms: u32,
    body_len: usize,
) -> Result<[u8; TAG_HEADER_LEN], BodyTooLarge> {
    if body_len > MAX_BODY_LEN {
        return Err(BodyTooLarge(body_len));
    }
    let size = (body_len as u32).to_be_bytes();
    let ts = timestamp_ms.to_be_bytes();
    Ok([
        kind as u8, size[1], size[2], size[3], // DataSize, 24 bits
        ts[1], ts[2], ts[3], // Timestamp: the low 24 bits
        ts[0], // TimestampExtended: the high 8 bits
        0, 0, 0, // StreamID, always 0
    ])
}

/// The PreviousTagSize after a tag whose body is `body_len` bytes (header + body).
/// `body_len` is at most [`MAX_BODY_LEN`] wherever [`tag_header`] accepted it.
pub fn prev_tag_size(body_len: usize) -> [u8; PREV_TAG_SIZE_LEN] {
    let n = u32::try_from(body_len.saturating_add(TAG_HEADER_LEN)).unwrap_or(u32::MAX);
    n.to_be_bytes()
}

/// Bytes one tag takes in the file (header, body, PreviousTagSize).
pub fn tag_len(body_len: usize) -> usize {
    body_len
        .saturating_add(TAG_HEADER_LEN)
        .saturating_add(PREV_TAG_SIZE_LEN)
}

/// Appends one whole tag (header, `body`, PreviousTagSize) to `out`; nothing is appended
/// when the body is too large for FLV.
pub fn write_tag(
    kind: TagKind,
    timestamp_ms: u32,
    body: &[u8],
    out: &mut BytesMut,
) -> Result<(), BodyTooLarge> {
    let head = tag_header(kind, timestamp_ms, body.len())?;
    out.reserve(tag_len(body.len()));
    out.put_slice(&head);
    out.put_slice(body);
    out.put_slice(&prev_tag_size(body.len()));
    Ok(())
}

/// One tag as three buffers, the body shared (not copied): for vectored writes of frames
/// many players or a recorder hold at once.
pub fn tag_parts(
    kind: TagKind,
    timestamp_ms: u32,
    body: &Bytes,
) -> Result<[Bytes; 3], BodyTooLarge> {
    let head = tag_header(kind, timestamp_ms, body.len())?;
    Ok([
        Bytes::copy_from_slice(&head),
        body.clone(),
        Bytes::copy_from_slice(&prev_tag_size(body.len())),
    ])
}

/// The body of an `onMetaData` script tag: the AMF0 string `onMetaData`, then `props` as an
/// ECMA array (what players read `duration`, `width`, `keyframes` and the codec ids from).
pub fn on_metadata(props: Vec<(String, Amf0Value)>) -> Bytes {
    crate::rtmp::amf0::encode_all(&[Amf0Value::string("onMetaData"), Amf0Value::EcmaArray(props)])
}

/// The script tag body for a data message as the engine keeps it. The hub already holds
/// metadata as plain `onMetaData` (the protocol removes a publisher's `@setDataFrame`
/// wrapper), which is what FLV files carry; a payload still wrapped (from another source)
/// is unwrapped here, since players look for `onMetaData` as the tag's first value.
pub fn script_body(payload: &Bytes) -> Bytes {
    const SET_DATA_FRAME: &[u8] = b"\x02\x00\x0d@setDataFrame";
    if payload.starts_with(SET_DATA_FRAME) {
        payload.slice(SET_DATA_FRAME.len()..)
    } else {
        payload.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::amf::AmfLimits;
    use crate::rtmp::amf0;

    #[test]
    fn header_flags_and_first_previous_tag_size() {
        assert_eq!(
            header(true, true),
            [b'F', b'L', b'V', 1, 5, 0, 0, 0, 9, 0, 0, 0, 0]
        );
        assert_eq!(header(true, false)[4], 4);
        assert_eq!(header(false, true)[4], 1);
        assert_eq!(header(false, false)[4], 0);
    }

    #[test]
    fn tag_layout_and_previous_tag_size() {
        let mut out = BytesMut::new();
        write_tag(TagKind::Video, 0x0012_3456, &[0x17, 1, 2], &mut out).unwrap();
        assert_eq!(
            &out[..],
            &[
                9, 0, 0, 3, // video, 3 bytes
                0x12, 0x34, 0x56, 0, // timestamp, extended 0
                0, 0, 0, // stream id
                0x17, 1, 2, // body
                0, 0, 0, 14 // 11 + 3
            ]
        );
        assert_eq!(out.len(), tag_len(3));
    }

    #[test]
    fn timestamps_past_24_bits_use_the_extended_byte() {
        // 0xAB123456 ms: low 24 bits in the timestamp field, 0xAB in the extended byte.
        let h = tag_header(TagKind::Audio, 0xAB12_3456, 0).unwrap();
        assert_eq!(&h[4..8], &[0x12, 0x34, 0x56, 0xAB]);
        // A reader rebuilds the time as extended << 24 | timestamp.
        let back = (u32::from(h[7]) << 24)
            | (u32::from(h[4]) << 16)
            | (u32::from(h[5]) << 8)
            | u32::from(h[6]);
        assert_eq!(back, 0xAB12_3456);
        // Just past the 24-bit wrap (4.66 hours).
        let h = tag_header(TagKind::Audio, 0x0100_0000, 0).unwrap();
        assert_eq!(&h[4..8], &[0, 0, 0, 1]);
    }

    #[test]
    fn bodies_over_24_bits_are_refused_and_nothing_written() {
        let big = vec![0u8; MAX_BODY_LEN + 1];
        let mut out = BytesMut::new();
        assert_eq!(
            write_tag(TagKind::Video, 0, &big, &mut out),
            Err(BodyTooLarge(MAX_BODY_LEN + 1))
        );
        assert!(out.is_empty());
        assert!(tag_header(TagKind::Video, 0, MAX_BODY_LEN).is_ok());
        assert_eq!(prev_tag_size(MAX_BODY_LEN), 0x0100_000Au32.to_be_bytes());
    }

    #[test]
    fn tag_parts_equal_write_tag_and_share_the_body() {
        let body = Bytes::from_static(b"\xaf\x01abc");
        let parts = tag_parts(TagKind::Audio, 70_000, &body).unwrap();
        let mut joined = BytesMut::new();
        for p in &parts {
            joined.extend_from_slice(p);
        }
        let mut out = BytesMut::new();
        write_tag(TagKind::Audio, 70_000, &body, &mut out).unwrap();
        assert_eq!(joined, out);
        assert_eq!(parts[1].as_ptr(), body.as_ptr());
    }

    #[test]
    fn on_metadata_reads_back_as_a_script_tag_body() {
        let body = on_metadata(vec![
            ("duration".into(), Amf0Value::Number(12.5)),
            ("videocodecid".into(), Amf0Value::Number(7.0)),
        ]);
        let v = amf0::decode_all(&body, &AmfLimits::default()).unwrap();
        assert_eq!(v[0].as_str(), Some("onMetaData"));
        assert_eq!(v[1].get("duration").and_then(Amf0Value::as_f64), Some(12.5));
        assert_eq!(
            crate::engine::hub::classify(18, &body),
            crate::engine::hub::FrameKind::Meta
        );
    }

    #[test]
    fn script_body_removes_set_data_frame_only() {
        let meta = on_metadata(vec![("width".into(), Amf0Value::Number(640.0))]);
        let mut wrapped = amf0::encode_all(&[Amf0Value::string("@setDataFrame")]).to_vec();
        wrapped.extend_from_slice(&meta);
        assert_eq!(script_body(&Bytes::from(wrapped)), meta);
        assert_eq!(script_body(&meta), meta);
        let cue = amf0::encode_all(&[Amf0Value::string("onCuePoint")]);
        assert_eq!(script_body(&cue), cue);
    }

    #[test]
    fn kinds_from_rtmp_message_types() {
        assert_eq!(TagKind::from_msg_type(8), Some(TagKind::Audio));
        assert_eq!(TagKind::from_msg_type(9), Some(TagKind::Video));
        assert_eq!(TagKind::from_msg_type(18), Some(TagKind::Script));
        assert_eq!(TagKind::from_msg_type(15), None);
        assert_eq!(TagKind::from_msg_type(20), None);
    }
}
