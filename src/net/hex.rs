//! Bytes a peer sent, shown in a log line: short and bounded whatever the peer sent.

use std::fmt::Write as _;

/// The first bytes as short hex for a log line: `16 03 01 02 00 01 00 01` (at most 16).
pub fn short_hex(bytes: &[u8]) -> String {
    const SHOWN: usize = 16;
    let mut out = String::with_capacity(SHOWN * 3 + 4);
    for (i, b) in bytes.iter().take(SHOWN).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{b:02x}");
    }
    if bytes.len() > SHOWN {
        out.push_str(" ...");
    }
    if bytes.is_empty() {
        out.push_str("(nothing)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_short() {
        assert_eq!(short_hex(&[0x16, 0x03, 0x01]), "16 03 01");
        assert_eq!(short_hex(&[]), "(nothing)");
        assert!(short_hex(&[0u8; 40]).ends_with(" ..."));
    }
}
