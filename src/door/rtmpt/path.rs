//! RTMPT request paths: `/fcs/ident2`, `/open/1`, `/send|idle|close/<id>/<seq>`.
//!
//! Parsing is strict and allocation-free: a path is matched against the five shapes
//! clients use, and anything else is rejected before a session is looked up.

use thiserror::Error;

/// Longest session id we accept in a path. Our own ids are 32 characters; ffmpeg refuses
/// ids of 64 bytes or more, so nothing longer can be a session a client got from us.
pub const MAX_ID_LEN: usize = 63;

/// Longest sequence number, in decimal digits. 18 digits stay below `u64::MAX`, so the
/// parse cannot overflow and `seq + window` arithmetic has room.
const MAX_SEQ_DIGITS: usize = 18;

/// What an RTMPT request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `/fcs/ident2`: Flash's probe before opening; clients ignore the answer.
    Ident,
    /// `/open/1`: create a session.
    Open,
    /// `/send/<id>/<seq>`: client-to-server RTMP bytes, reply carries server bytes.
    Send { id: &'a str, seq: u64 },
    /// `/idle/<id>/<seq>`: a poll for server bytes.
    Idle { id: &'a str, seq: u64 },
    /// `/close/<id>/<seq>`: the client ends the session.
    Close { id: &'a str, seq: u64 },
}

/// Why a path is not an RTMPT request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("not an RTMPT path (expected /open/1, /send|idle|close/<id>/<seq> or /fcs/ident2)")]
    Unknown,
    #[error("malformed RTMPT session id (expected 1..={MAX_ID_LEN} characters of [A-Za-z0-9_-])")]
    BadId,
    #[error("malformed RTMPT sequence number (expected 1..={MAX_SEQ_DIGITS} decimal digits)")]
    BadSeq,
}

/// Parse the path part of a request URI (no query string).
pub fn parse(path: &str) -> Result<Command<'_>, PathError> {
    match path {
        "/fcs/ident2" => return Ok(Command::Ident),
        "/open/1" => return Ok(Command::Open),
        _ => {}
    }
    let rest = path.strip_prefix('/').ok_or(PathError::Unknown)?;
    let mut parts = rest.split('/');
    let verb = parts.next().ok_or(PathError::Unknown)?;
    if !matches!(verb, "send" | "idle" | "close") {
        return Err(PathError::Unknown);
    }
    let id = parts.next().ok_or(PathError::Unknown)?;
    let seq = parts.next().ok_or(PathError::Unknown)?;
    if parts.next().is_some() {
        return Err(PathError::Unknown);
    }
    let id = parse_id(id)?;
    let seq = parse_seq(seq)?;
    Ok(match verb {
        "send" => Command::Send { id, seq },
        "idle" => Command::Idle { id, seq },
        _ => Command::Close { id, seq },
    })
}

fn parse_id(id: &str) -> Result<&str, PathError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(PathError::BadId)
    }
}

fn parse_seq(seq: &str) -> Result<u64, PathError> {
    if seq.is_empty() || seq.len() > MAX_SEQ_DIGITS || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PathError::BadSeq);
    }
    seq.parse().map_err(|_| PathError::BadSeq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixed_paths() {
        assert_eq!(parse("/fcs/ident2"), Ok(Command::Ident));
        assert_eq!(parse("/open/1"), Ok(Command::Open));
        assert_eq!(parse("/open/2"), Err(PathError::Unknown));
        assert_eq!(parse("/open/1/"), Err(PathError::Unknown));
        assert_eq!(parse("/"), Err(PathError::Unknown));
        assert_eq!(parse(""), Err(PathError::Unknown));
        assert_eq!(parse("open/1"), Err(PathError::Unknown));
    }

    #[test]
    fn session_paths() {
        assert_eq!(
            parse("/send/abc123/0"),
            Ok(Command::Send {
                id: "abc123",
                seq: 0
            })
        );
        assert_eq!(
            parse("/idle/a-b_C/17"),
            Ok(Command::Idle {
                id: "a-b_C",
                seq: 17
            })
        );
        assert_eq!(
            parse("/close/x/999999999999999999"),
            Ok(Command::Close {
                id: "x",
                seq: 999_999_999_999_999_999
            })
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse("/send/abc"), Err(PathError::Unknown));
        assert_eq!(parse("/send/abc/1/2"), Err(PathError::Unknown));
        assert_eq!(parse("/poll/abc/1"), Err(PathError::Unknown));
        assert_eq!(parse("/send//1"), Err(PathError::BadId));
        assert_eq!(parse("/send/a.b/1"), Err(PathError::BadId));
        assert_eq!(parse("/send/a%2F/1"), Err(PathError::BadId));
        assert_eq!(
            parse(&format!("/send/{}/1", "a".repeat(64))),
            Err(PathError::BadId)
        );
        assert_eq!(parse("/send/abc/"), Err(PathError::BadSeq));
        assert_eq!(parse("/send/abc/-1"), Err(PathError::BadSeq));
        assert_eq!(parse("/send/abc/+1"), Err(PathError::BadSeq));
        assert_eq!(parse("/send/abc/1x"), Err(PathError::BadSeq));
        assert_eq!(
            parse("/send/abc/1000000000000000000"),
            Err(PathError::BadSeq)
        );
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn round_trips(id in "[A-Za-z0-9_-]{1,63}", seq in 0u64..1_000_000_000_000_000_000) {
            let path = format!("/idle/{id}/{seq}");
            prop_assert_eq!(parse(&path), Ok(Command::Idle { id: &id, seq }));
        }
    }
}
