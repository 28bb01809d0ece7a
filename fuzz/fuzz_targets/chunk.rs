//! Fuzzes the chunk stream decoder, fed in pieces whose sizes come from the input, and
//! the message parsers on what it yields; then checks that the messages survive
//! re-chunking by the encoder.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::amf0::AmfLimits;
use rtmpgate::rtmp::chunk::{ChunkDecoder, ChunkEncoder};
use rtmpgate::rtmp::message::{self, Control, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_partial_bytes: 1 << 20,
        max_message_len: 1 << 20,
        // The codec itself must handle every chunk size; the default floor of 128 is policy.
        min_chunk_size: 1,
        ..Limits::default()
    };
    let amf = AmfLimits::from(&limits);
    let mut dec = ChunkDecoder::new(&limits);
    let mut buf = BytesMut::new();
    let mut got: Vec<Message> = Vec::new();
    let step = usize::from(split).max(1);
    'feed: for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(m)) => {
                    let _ = Control::decode(&m);
                    let _ = message::decode_command(&m, &amf);
                    let _ = message::decode_amf_payload(&m, &amf);
                    if m.msg_type == message::AGGREGATE {
                        let _ = message::split_aggregate(&m);
                    }
                    got.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    break 'feed;
                }
            }
        }
    }
    assert!(dec.partial_bytes() <= limits.max_partial_bytes);

    // Re-chunk what was decoded (less the messages that change chunk state) and decode
    // it again: the same messages must come back.
    let keep: Vec<Message> = got
        .into_iter()
        .filter(|m| !matches!(m.msg_type, message::SET_CHUNK_SIZE | message::ABORT))
        .collect();
    let mut enc = ChunkEncoder::new();
    enc.set_chunk_size(u32::from(split).max(1));
    let mut out = BytesMut::new();
    let scs = message::set_chunk_size(enc.chunk_size());
    let mut first = ChunkEncoder::new();
    first.write(2, &scs, &mut out);
    for (i, m) in keep.iter().enumerate() {
        enc.write(3 + (i as u32 % 3), m, &mut out);
    }
    let mut dec = ChunkDecoder::new(&limits);
    let mut back = Vec::new();
    while let Some(m) = dec.decode(&mut out).expect("re-chunked stream must decode") {
        back.push(m);
    }
    assert_eq!(back.first(), Some(&scs));
    assert_eq!(&back[1..], &keep[..]);
});
