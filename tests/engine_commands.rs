//! Every command the engine answers, as a scripted client sees the replies: connect's
//! `_result`, the FC* notices, createStream, play and publish statuses, pause, seek, ping,
//! `_error` for an unknown call with the connection kept, BadName on a busy key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engine_support;

use std::time::Duration;

use engine_support::*;
use rtmpgate::engine::EngineConfig;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::message::{self, Message, UserControl};

const T: Duration = Duration::from_secs(5);

fn s(v: &str) -> Amf0Value {
    Amf0Value::string(v)
}

fn has(got: &[Message], what: &str) -> bool {
    got.iter().any(|m| describe(m) == what)
}

fn connect(c: &mut RawClient, addr: std::net::SocketAddr) -> Vec<Message> {
    let obj = Amf0Value::object([
        ("app", s("live")),
        ("tcUrl", s(&format!("rtmp://{addr}/live"))),
        ("objectEncoding", Amf0Value::Number(0.0)),
    ]);
    c.command(0, "connect", 1.0, &[obj]);
    c.recv_until(T, |g| has(g, "onBWDone"))
}

#[test]
fn commands_are_answered_like_fms() {
    let srv = Server::start(EngineConfig::default());
    let mut c = RawClient::connect(srv.addr);
    let got = connect(&mut c, srv.addr);
    let types: Vec<u8> = got.iter().map(|m| m.msg_type).collect();
    for t in [
        message::WINDOW_ACK_SIZE,
        message::SET_PEER_BANDWIDTH,
        message::SET_CHUNK_SIZE,
    ] {
        assert!(types.contains(&t), "no control message {t} in {types:?}");
    }
    let result = got
        .iter()
        .find_map(|m| amf_values(m).filter(|v| v[0].as_str() == Some("_result")))
        .expect("connect _result");
    assert_eq!(result[1].as_f64(), Some(1.0));
    assert_eq!(
        result[2].get("fmsVer").and_then(|v| v.as_str()),
        Some("FMS/3,5,7,7009")
    );
    assert_eq!(
        result[2].get("capabilities").and_then(|v| v.as_f64()),
        Some(31.0)
    );
    assert_eq!(
        result[3].get("code").and_then(|v| v.as_str()),
        Some("NetConnection.Connect.Success")
    );
    assert_eq!(
        result[3].get("objectEncoding").and_then(|v| v.as_f64()),
        Some(0.0)
    );

    c.command(0, "releaseStream", 2.0, &[Amf0Value::Null, s("k")]);
    c.command(0, "FCPublish", 3.0, &[Amf0Value::Null, s("k")]);
    c.command(0, "createStream", 4.0, &[Amf0Value::Null]);
    let got = c.recv_until(T, |g| {
        g.iter().filter(|m| describe(m) == "_result").count() >= 3
    });
    assert!(has(&got, "onFCPublish NetStream.Publish.Start"));
    let sid = got
        .iter()
        .filter_map(amf_values)
        .find(|v| v[1].as_f64() == Some(4.0))
        .and_then(|v| v[3].as_f64())
        .expect("createStream _result with a stream id");
    assert_eq!(sid, 1.0);

    // An unknown call: _error with its transaction id, and the connection stays up.
    c.command(0, "noSuchMethod", 7.0, &[Amf0Value::Null]);
    let got = c.recv_until(T, |g| !g.is_empty());
    let err = amf_values(&got[0]).unwrap();
    assert_eq!(err[0].as_str(), Some("_error"));
    assert_eq!(err[1].as_f64(), Some(7.0));
    assert_eq!(
        err[3].get("code").and_then(|v| v.as_str()),
        Some("NetConnection.Call.Failed")
    );
    c.command(0, "getStreamLength", 8.0, &[Amf0Value::Null, s("k")]);
    c.command(0, "_checkbw", 9.0, &[Amf0Value::Null]);
    c.recv_until(T, |g| {
        g.iter().filter(|m| describe(m) == "_result").count() >= 2
    });

    // play on stream 1 of a key with no publisher yet: the FMS sequence, then waiting.
    c.command(
        1,
        "play",
        0.0,
        &[Amf0Value::Null, s("k"), Amf0Value::Number(-2.0)],
    );
    let got = c.recv_until(T, |g| has(g, "onStatus NetStream.Data.Start"));
    let seq: Vec<String> = got.iter().map(describe).collect();
    assert_eq!(
        seq,
        vec![
            format!("{:?}", Ok::<_, ()>(UserControl::StreamBegin(1))),
            "onStatus NetStream.Play.Reset".into(),
            "onStatus NetStream.Play.Start".into(),
            "|RtmpSampleAccess".into(),
            "onStatus NetStream.Data.Start".into(),
        ]
    );
    assert!(got.iter().skip(1).all(|m| m.stream_id == 1));

    c.command(
        1,
        "pause",
        0.0,
        &[
            Amf0Value::Null,
            Amf0Value::Boolean(true),
            Amf0Value::Number(0.0),
        ],
    );
    c.recv_until(T, |g| has(g, "onStatus NetStream.Pause.Notify"));
    c.command(
        1,
        "pause",
        0.0,
        &[
            Amf0Value::Null,
            Amf0Value::Boolean(false),
            Amf0Value::Number(0.0),
        ],
    );
    c.recv_until(T, |g| has(g, "onStatus NetStream.Unpause.Notify"));
    c.command(
        1,
        "seek",
        0.0,
        &[Amf0Value::Null, Amf0Value::Number(1000.0)],
    );
    c.recv_until(T, |g| has(g, "onStatus NetStream.Seek.Notify"));
    c.send(2, &UserControl::PingRequest(4242).to_message());
    c.recv_until(T, |g| {
        g.iter().any(|m| {
            m.msg_type == message::USER_CONTROL
                && UserControl::decode(&m.payload) == Ok(UserControl::PingResponse(4242))
        })
    });

    // A publisher arrives: the waiting player is told with StreamBegin.
    let mut p = RawClient::connect(srv.addr);
    connect(&mut p, srv.addr);
    p.command(0, "createStream", 2.0, &[Amf0Value::Null]);
    p.recv_until(T, |g| has(g, "_result"));
    p.command(1, "publish", 3.0, &[Amf0Value::Null, s("k"), s("live")]);
    p.recv_until(T, |g| has(g, "onStatus NetStream.Publish.Start"));
    c.recv_until(T, |g| {
        g.iter()
            .any(|m| UserControl::decode(&m.payload) == Ok(UserControl::StreamBegin(1)))
    });

    // A second publisher on the key: BadName, and its connection still answers.
    let mut q = RawClient::connect(srv.addr);
    connect(&mut q, srv.addr);
    q.command(0, "createStream", 2.0, &[Amf0Value::Null]);
    q.recv_until(T, |g| has(g, "_result"));
    q.command(1, "publish", 3.0, &[Amf0Value::Null, s("k"), s("live")]);
    let got = q.recv_until(T, |g| has(g, "onStatus NetStream.Publish.BadName"));
    let bad = got
        .iter()
        .filter_map(amf_values)
        .find(|v| v[0].as_str() == Some("onStatus"))
        .unwrap();
    assert_eq!(bad[3].get("level").and_then(|v| v.as_str()), Some("error"));
    q.command(0, "getStreamLength", 4.0, &[Amf0Value::Null, s("k")]);
    q.recv_until(T, |g| has(g, "_result"));

    // The first publisher leaves: the player gets UnpublishNotify then StreamEOF.
    drop(p);
    let got = c.recv_until(T, |g| {
        g.iter()
            .any(|m| UserControl::decode(&m.payload) == Ok(UserControl::StreamEof(1)))
    });
    assert!(has(&got, "onStatus NetStream.Play.UnpublishNotify"));
}

#[test]
fn connect_without_an_app_is_refused_with_a_reason() {
    let srv = Server::start(EngineConfig::default());
    let mut c = RawClient::connect(srv.addr);
    c.command(
        0,
        "connect",
        1.0,
        &[Amf0Value::object([("tcUrl", s("rtmp://x/"))])],
    );
    let got = c.recv_until(T, |g| has(g, "onStatus NetConnection.Connect.Rejected"));
    assert!(!got.is_empty());
}

#[test]
fn a_player_waiting_too_long_gets_play_stop() {
    let srv = Server::start(EngineConfig {
        player_wait: Duration::from_millis(500),
        ..EngineConfig::default()
    });
    let mut c = RawClient::connect(srv.addr);
    connect(&mut c, srv.addr);
    c.command(1, "play", 0.0, &[Amf0Value::Null, s("nobody")]);
    c.recv_until(T, |g| has(g, "onStatus NetStream.Play.Stop"));
}
