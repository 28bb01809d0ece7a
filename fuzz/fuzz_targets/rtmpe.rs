//! Fuzzes the RTMPE handshake (types 6, 8, 9) on arbitrary peer bytes: the server's
//! answer to C0+C1 and the client's answer to S0+S1+S2. Each run does 1024-bit DH, so
//! this target is slow (tens of runs a second); run it longer than the others.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtmpgate::rtmp::rtmpe::{self, AnswerPolicy, DhPrivate, RtmpeClient};

#[path = "../handshake_input.rs"]
mod handshake_input;
use handshake_input::{padded, C0C1, S0S1S2};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let c0 = [6u8, 8, 9, 6][usize::from(sel & 3)];
    if sel & 4 == 0 {
        let _ = rtmpe::server_respond_with(rest, AnswerPolicy::default(), &mut || {
            DhPrivate::from_be_bytes(&[0x5a; 128])
        });
        let c0c1 = padded::<C0C1>(c0, rest);
        let mut draw = || DhPrivate::from_be_bytes(&[0x5a; 128]);
        let _ = rtmpe::server_respond_with(&c0c1, AnswerPolicy::default(), &mut draw);
    } else {
        let s = padded::<S0S1S2>(c0, rest);
        let _ = RtmpeClient::new(c0).finish(&s);
    }
});
