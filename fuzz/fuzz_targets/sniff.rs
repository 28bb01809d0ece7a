//! Fuzzes the front door's first-bytes decisions: the transport sniffer and the PROXY
//! protocol header parser. A sniffer verdict must not change as more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::door::sniff::{self, Verdict};
use rtmpgate::net::proxy_protocol::{self, Parsed};
use rtmpgate::net::short_hex;

fuzz_target!(|data: &[u8]| {
    let full = sniff::classify(data);
    for n in 0..data.len() {
        if let Verdict::Is(k) = sniff::classify(&data[..n]) {
            assert_eq!(full, Verdict::Is(k), "verdict changed after {n} bytes");
            break;
        }
    }
    let _ = short_hex(data);
    if let Ok(Parsed::Header { len, .. }) = proxy_protocol::parse(data) {
        assert!(len <= data.len());
    }
});
