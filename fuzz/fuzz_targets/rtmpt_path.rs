//! Fuzzes RTMPT request routing: the path parser that picks open/send/idle/close.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::door::rtmpt::path;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = path::parse(&s);
});
