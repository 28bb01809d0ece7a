//! Fuzzes the AMF0 decoder (and the AMF3 values behind its switch marker): no panic, and
//! whatever decodes re-encodes to bytes that decode and re-encode identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::rtmp::amf0::{decode_all, encode_all, AmfLimits};

fuzz_target!(|data: &[u8]| {
    let limits = AmfLimits::default();
    if let Ok(values) = decode_all(data, &limits) {
        let once = encode_all(&values);
        let again = decode_all(&once, &limits).expect("re-encoded AMF0 must decode");
        assert_eq!(encode_all(&again), once, "AMF0 encoding is not stable");
    }
});
