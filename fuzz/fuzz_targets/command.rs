//! Fuzzes command decoding (types 20 and 17) and the other message parsers on raw
//! payloads.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rtmpgate::rtmp::amf0::AmfLimits;
use rtmpgate::rtmp::message::{self, Control, Message, UserControl};

fuzz_target!(|data: &[u8]| {
    let limits = AmfLimits::default();
    let payload = Bytes::copy_from_slice(data);
    for t in [message::COMMAND_AMF0, message::COMMAND_AMF3] {
        let m = Message::new(t, 0, 1, payload.clone());
        if let Ok(c) = message::decode_command(&m, &limits) {
            // A decoded command re-encodes to one that decodes the same way.
            let body = message::command_payload(&c.name, c.txn, &c.args);
            let m2 = Message::new(message::COMMAND_AMF0, 0, 1, body);
            let c2 = message::decode_command(&m2, &limits).expect("re-encoded command");
            assert_eq!(c2.name, c.name);
            assert_eq!(c2.args.len(), c.args.len());
        }
    }
    for t in 1..=6 {
        let _ = Control::decode(&Message::new(t, 0, 0, payload.clone()));
    }
    if let Ok(u) = UserControl::decode(data) {
        assert_eq!(UserControl::decode(&u.encode()).ok(), Some(u));
    }
    let _ = message::split_aggregate(&Message::new(message::AGGREGATE, 7, 1, payload));
});
