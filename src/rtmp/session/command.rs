//! RTMP commands (connect, createStream, publish, play...) and the replies FMS clients expect.
//!
//! Clients wait on specific replies before they go on: ffmpeg publishes after the `_result`
//! of createStream and streams once it sees `NetStream.Publish.Start`; as a player it reads
//! media once it sees `NetStream.Play.Start`, and stops at `NetStream.Play.UnpublishNotify`
//! or `NetStream.Play.Stop`. librtmp (rtmpdump, OBS) starts on `Play.Start`/`Publish.Start`
//! too and reads `_result` of createStream as `_result, txn, null, number`. An `onStatus`
//! with level `error` makes both give up, so only refusals use it.

use crate::amf0::{self, Amf0Value};
use crate::message::{self, Message};

/// What connect's `_result` announces; every client accepts these FMS 3.5 values.
pub const FMS_VERSION: &str = "FMS/3,5,7,7009";
pub const FMS_CAPABILITIES: f64 = 31.0;

/// Chunk stream ids for protocol control and for commands.
pub const CSID_CONTROL: u32 = 2;
pub const CSID_COMMAND: u32 = 3;

fn s(v: &str) -> Amf0Value {
    Amf0Value::string(v)
}

fn obj(fields: Vec<(&str, Amf0Value)>) -> Amf0Value {
    Amf0Value::object(fields)
}

fn command(stream_id: u32, name: &str, txn: f64, values: Vec<Amf0Value>) -> Message {
    message::command_message(stream_id, name, txn, &values)
}

fn data(stream_id: u32, values: &[Amf0Value]) -> Message {
    Message::new(message::DATA_AMF0, 0, stream_id, amf0::encode_all(values))
}

/// `_result` of connect: FMS version and capabilities, then the Connect.Success info object.
pub fn connect_result(txn: f64, object_encoding: f64) -> Message {
    command(
        0,
        "_result",
        txn,
        vec![
            obj(vec![
                ("fmsVer", s(FMS_VERSION)),
                ("capabilities", Amf0Value::Number(FMS_CAPABILITIES)),
                ("mode", Amf0Value::Number(1.0)),
            ]),
            obj(vec![
                ("level", s("status")),
                ("code", s("NetConnection.Connect.Success")),
                ("description", s("Connection succeeded.")),
                ("objectEncoding", Amf0Value::Number(object_encoding)),
            ]),
        ],
    )
}

/// FMS sends this after connect; ffmpeg answers with `_checkbw`, librtmp may too.
pub fn on_bw_done() -> Message {
    command(
        0,
        "onBWDone",
        0.0,
        vec![Amf0Value::Null, Amf0Value::Number(8192.0)],
    )
}

/// `_result` with a null command object and the given values.
pub fn result(txn: f64, values: Vec<Amf0Value>) -> Message {
    let mut all = Vec::with_capacity(values.len().saturating_add(1));
    all.push(Amf0Value::Null);
    all.extend(values);
    command(0, "_result", txn, all)
}

/// `_error` for a call we cannot serve; the connection stays up.
pub fn call_failed(txn: f64, method: &str) -> Message {
    command(
        0,
        "_error",
        txn,
        vec![
            Amf0Value::Null,
            obj(vec![
                ("level", s("error")),
                ("code", s("NetConnection.Call.Failed")),
                ("description", s(&format!("Method not found ({method})."))),
            ]),
        ],
    )
}

/// `_error` of a call the server refuses (a connect: NetConnection.Connect.Rejected).
pub fn error(txn: f64, code: &str, description: &str) -> Message {
    command(
        0,
        "_error",
        txn,
        vec![
            Amf0Value::Null,
            obj(vec![
                ("level", s("error")),
                ("code", s(code)),
                ("description", s(description)),
            ]),
        ],
    )
}

/// `onStatus` on a message stream.
pub fn on_status(
    stream_id: u32,
    level: &str,
    code: &str,
    description: &str,
    details: Option<&str>,
) -> Message {
    let mut info = vec![
        ("level", s(level)),
        ("code", s(code)),
        ("description", s(description)),
    ];
    if let Some(d) = details {
        info.push(("details", s(d)));
        info.push(("clientid", Amf0Value::Number(1.0)));
    }
    command(stream_id, "onStatus", 0.0, vec![Amf0Value::Null, obj(info)])
}

/// `onFCPublish`, `onFCUnpublish`, `onFCSubscribe`: FMS's notices for the FC* calls.
pub fn on_fc(name: &str, code: &str, description: &str) -> Message {
    command(
        0,
        name,
        0.0,
        vec![
            Amf0Value::Null,
            obj(vec![("code", s(code)), ("description", s(description))]),
        ],
    )
}

/// `|RtmpSampleAccess`: lets a Flash player read the decoded audio and video.
pub fn sample_access(stream_id: u32) -> Message {
    data(
        stream_id,
        &[
            s("|RtmpSampleAccess"),
            Amf0Value::Boolean(true),
            Amf0Value::Boolean(true),
        ],
    )
}

/// `onStatus` NetStream.Data.Start, sent as a data message like FMS does.
pub fn data_start(stream_id: u32) -> Message {
    data(
        stream_id,
        &[
            s("onStatus"),
            obj(vec![("code", s("NetStream.Data.Start"))]),
        ],
    )
}

/// `onPlayStatus` NetStream.Play.Complete, a data message as FMS sends it at the end of a
/// recorded stream: librtmp (rtmpdump) ends its download on it.
pub fn play_complete(stream_id: u32, duration_ms: u64, bytes: u64) -> Message {
    data(
        stream_id,
        &[
            s("onPlayStatus"),
            obj(vec![
                ("level", s("status")),
                ("code", s("NetStream.Play.Complete")),
                ("duration", Amf0Value::Number(duration_ms as f64 / 1000.0)),
                ("bytes", Amf0Value::Number(bytes as f64)),
            ]),
        ],
    )
}

/// `onPlayStatus` NetStream.Play.TransitionComplete: a play2 switch reached the new
/// rendition (FMS sends it as a data message, like Play.Complete).
pub fn transition_complete(stream_id: u32, name: &str) -> Message {
    data(
        stream_id,
        &[
            s("onPlayStatus"),
            obj(vec![
                ("level", s("status")),
                ("code", s("NetStream.Play.TransitionComplete")),
                ("details", s(name)),
            ]),
        ],
    )
}

/// An app or stream name as a hub key: the part before any `?query` (tokens, auth), and
/// only if it is non-empty, within `max_len` and free of control characters.
pub fn clean_name(raw: &str, max_len: usize) -> Option<String> {
    let name = raw.split('?').next().unwrap_or_default().trim_matches('/');
    if name.is_empty() || name.len() > max_len || name.chars().any(char::is_control) {
        return None;
    }
    Some(name.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_query_and_reject_junk() {
        assert_eq!(clean_name("live?token=1", 64).as_deref(), Some("live"));
        assert_eq!(clean_name("key", 64).as_deref(), Some("key"));
        assert_eq!(clean_name("", 64), None);
        assert_eq!(clean_name("?x", 64), None);
        assert_eq!(clean_name("a\nb", 64), None);
        assert_eq!(clean_name("abcdef", 3), None);
    }

    #[test]
    fn connect_result_carries_fms_fields() {
        let m = connect_result(1.0, 0.0);
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        for needle in [
            "_result",
            "fmsVer",
            FMS_VERSION,
            "capabilities",
            "NetConnection.Connect.Success",
            "objectEncoding",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }
}
