//! Fuzzes the VOD FLV reader: the file header, tags taken off a buffer, onMetaData's
//! duration and keyframe index, and the last-tag lookup (a file in the VOD directory can
//! hold any bytes).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rtmpgate::engine::flv_read::{self, ReadLimits, Step, TagReader};

fuzz_target!(|data: &[u8]| {
    let limits = ReadLimits {
        max_tag_bytes: 1 << 20,
        max_index_entries: 1000,
    };
    let _ = flv_read::parse_file_header(data);
    let mut buf = BytesMut::from(data);
    let mut r = TagReader::new(0, limits);
    // Every step takes a whole tag (at least 15 bytes) or stops.
    while let Ok(Step::Tag(t)) = r.next(&mut buf) {
        if t.tag_type == flv_read::TAG_SCRIPT {
            let _ = flv_read::parse_metadata(&t.body, &Default::default(), &limits);
        }
        let _ = t.is_keyframe();
    }
    let _ = flv_read::last_timestamp(data, 0, data.len() as u64);
});
