//! Fuzzes the AMF3 decoder: no panic, references checked, and whatever decodes
//! re-encodes to bytes that decode and re-encode identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::rtmp::amf0::AmfLimits;
use rtmpgate::rtmp::amf3::{decode_all, encode_all};

fuzz_target!(|data: &[u8]| {
    let limits = AmfLimits::default();
    if let Ok(values) = decode_all(data, &limits) {
        let once = encode_all(&values);
        let again = decode_all(&once, &limits).expect("re-encoded AMF3 must decode");
        assert_eq!(encode_all(&again), once, "AMF3 encoding is not stable");
    }
});
