//! Fuzzes both sides of the plain handshake on arbitrary peer bytes: the server's answer
//! to C0+C1 and the client's answer to S0+S1+S2, at the exact lengths (so the digest
//! search runs) and at the raw length (so length checks run). RTMPE, whose DH makes
//! each run slow, has its own target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::rtmp::handshake::{self, ClientHandshake};

#[path = "../handshake_input.rs"]
mod handshake_input;
use handshake_input::{padded, C0C1, S0S1S2};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let _ = handshake::server_reply(rest);
    let _ = ClientHandshake::new(false).c2(rest);
    let c0c1 = padded::<C0C1>(3, rest);
    if let Ok(r) = handshake::server_reply(&c0c1) {
        assert_eq!(r.s0s1s2.len(), S0S1S2);
    }
    let s = padded::<S0S1S2>(3, rest);
    let _ = ClientHandshake::new(sel & 4 != 0).c2(&s);
});
