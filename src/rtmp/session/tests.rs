//! A client session and a server session exchanging bytes in memory, on a fake clock: the
//! engine's command behaviour (every case `tests/engine_commands.rs` covers over TCP, and
//! the limits) checked without sockets. A tiny "hub" (the set of published keys) stands in
//! for the application's decisions, as the engine's hub makes them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;
use crate::amf0::Amf0Value;
use crate::chunk::{ChunkDecoder, ChunkLimits};
use crate::message::{self, Control, LimitType, Message, UserControl};

/// The published keys, shared by the pairs of one test.
#[derive(Default)]
struct Hub {
    published: HashSet<String>,
}

/// One client and one server session joined by two in-memory pipes.
struct Pair {
    now: Instant,
    client: ClientSession,
    server: ServerSession,
    to_server: BytesMut,
    to_client: BytesMut,
    /// What the client received since the last [`Pair::take`].
    got: Vec<ClientEvent>,
    /// Every event the server raised.
    server_events: Vec<ServerEvent>,
    /// Why the server session ended, once it has.
    ended: Option<ServerError>,
    /// The key this pair's server accepted a publish for.
    publishing: Option<(u32, String)>,
    /// The application refuses connects to this app.
    refuse_app: Option<&'static str>,
    /// Times the server stopped decoding for each reason.
    rate_limited: usize,
    replies_full: usize,
}

fn s(v: &str) -> Amf0Value {
    Amf0Value::string(v)
}

impl Pair {
    fn new() -> Pair {
        Pair::with(ServerConfig::default())
    }

    fn with(cfg: ServerConfig) -> Pair {
        let now = Instant::now();
        let dec = || ChunkDecoder::new(ChunkLimits::default());
        Pair {
            now,
            client: ClientSession::new(ClientConfig::default(), dec()),
            server: ServerSession::new(cfg, dec(), now),
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
            got: Vec::new(),
            server_events: Vec::new(),
            ended: None,
            publishing: None,
            refuse_app: None,
            rate_limited: 0,
            replies_full: 0,
        }
    }

    /// Moves bytes both ways until neither side has anything more to say; the server's
    /// requests are decided as the engine does (a key is published once).
    fn drive(&mut self, hub: &mut Hub) {
        for _ in 0..10_000 {
            let mut moved = false;
            if let Some(b) = self.client.take_output() {
                self.server.received(b.len());
                self.to_server.extend_from_slice(&b);
                moved = true;
            }
            if self.ended.is_none() {
                self.serve(hub);
            }
            if let Some(b) = self.server.take_output() {
                self.to_client.extend_from_slice(&b);
                self.server.flushed();
                moved = true;
            }
            while let Some(ev) = self.client.poll(&mut self.to_client).unwrap() {
                self.got.push(ev);
            }
            if !moved {
                return;
            }
        }
        panic!("the sessions never went quiet");
    }

    fn serve(&mut self, hub: &mut Hub) {
        loop {
            match self.server.poll(&mut self.to_server, self.now) {
                Ok(Poll::Event(ev)) => self.decide(ev, hub),
                Ok(Poll::NeedInput) => return,
                Ok(Poll::RateLimited(wait)) => {
                    // The fake clock moves on by exactly what the session asked.
                    self.rate_limited += 1;
                    self.now += wait;
                }
                Ok(Poll::RepliesFull) => {
                    // Written: as the engine does after its flush.
                    self.replies_full += 1;
                    if let Some(b) = self.server.take_output() {
                        self.to_client.extend_from_slice(&b);
                    }
                    self.server.flushed();
                }
                Ok(Poll::AwaitingDecision) => panic!("a request left undecided"),
                Err(e) => {
                    self.ended = Some(e);
                    return;
                }
            }
        }
    }

    fn decide(&mut self, ev: ServerEvent, hub: &mut Hub) {
        match &ev {
            ServerEvent::ConnectRequested(c) => {
                if self.refuse_app == Some(c.app.as_str()) {
                    self.server.reject(c.request_id, "not here");
                } else {
                    self.server.accept(c.request_id);
                }
            }
            ServerEvent::PublishRequested { request, .. } => {
                let key = format!("{}/{}", request.app, request.name);
                if hub.published.insert(key.clone()) {
                    self.publishing = Some((request.stream_id, key));
                    self.server.accept(request.request_id);
                } else {
                    let why = format!("{key} is already being published.");
                    self.server.reject(request.request_id, &why);
                }
            }
            ServerEvent::PlayRequested { request, .. } => {
                let key = format!("{}/{}", request.app, request.name);
                self.server.accept(request.request_id);
                if !hub.published.contains(&key) {
                    self.server.wait_for_publisher(self.now);
                }
            }
            ServerEvent::StreamDeleted { stream_id }
                if self.publishing.as_ref().map(|p| p.0) == Some(*stream_id) =>
            {
                if let Some((_, key)) = self.publishing.take() {
                    hub.published.remove(&key);
                }
            }
            _ => {}
        }
        self.server_events.push(ev);
    }

    /// What the client received since the last call.
    fn take(&mut self) -> Vec<ClientEvent> {
        std::mem::take(&mut self.got)
    }

    /// connect to `live` and drive; what the client received.
    fn connect(&mut self, hub: &mut Hub) -> Vec<ClientEvent> {
        self.client
            .connect("live", "rtmp://127.0.0.1/live", {
                let mut props = client::publisher_props();
                props.push(("objectEncoding", Amf0Value::Number(0.0)));
                props
            })
            .unwrap();
        self.drive(hub);
        self.take()
    }

    /// connect, createStream, publish `name`; the stream id.
    fn publish(&mut self, hub: &mut Hub, name: &str) -> u32 {
        self.connect(hub);
        self.client.create_stream().unwrap();
        self.drive(hub);
        let sid = created(&self.take());
        self.client.publish(sid, name);
        self.drive(hub);
        sid
    }
}

fn names(got: &[ClientEvent]) -> Vec<String> {
    got.iter().map(ClientEvent::describe).collect()
}

fn created(got: &[ClientEvent]) -> u32 {
    got.iter()
        .find_map(|e| match e {
            ClientEvent::StreamCreated { stream_id, .. } => Some(*stream_id),
            _ => None,
        })
        .expect("createStream _result with a stream id")
}

fn status<'a>(got: &'a [ClientEvent], code: &str) -> Option<(&'a str, u32)> {
    got.iter().find_map(|e| match e {
        ClientEvent::Status {
            code: c,
            level,
            stream_id,
            ..
        } if c == code => Some((level.as_str(), *stream_id)),
        _ => None,
    })
}

fn reply(got: &[ClientEvent], txn: f64) -> Option<(bool, Vec<Amf0Value>)> {
    got.iter().find_map(|e| match e {
        ClientEvent::Reply {
            txn: t, ok, values, ..
        } if *t == txn => Some((*ok, values.clone())),
        _ => None,
    })
}

// engine_commands.rs: commands_are_answered_like_fms, the connect part.
#[test]
fn connect_is_answered_like_fms_in_order() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    let got = p.connect(&mut hub);
    assert_eq!(
        names(&got),
        vec![
            format!("{:?}", Control::WindowAckSize(5_000_000)),
            format!(
                "{:?}",
                Control::SetPeerBandwidth {
                    size: 5_000_000,
                    limit: LimitType::Dynamic
                }
            ),
            format!("{:?}", Control::SetChunkSize(4096)),
            "_result".into(),
            "onBWDone".into(),
        ]
    );
    let (ok, values) = reply(&got, 1.0).expect("connect _result");
    assert!(ok);
    assert_eq!(
        values[0].get("fmsVer").and_then(Amf0Value::as_str),
        Some("FMS/3,5,7,7009")
    );
    assert_eq!(
        values[0].get("capabilities").and_then(Amf0Value::as_f64),
        Some(31.0)
    );
    assert_eq!(
        values[1].get("code").and_then(Amf0Value::as_str),
        Some("NetConnection.Connect.Success")
    );
    assert_eq!(
        values[1].get("objectEncoding").and_then(Amf0Value::as_f64),
        Some(0.0)
    );
    // The application saw what the client asked for.
    assert!(matches!(
        &p.server_events[0],
        ServerEvent::Command { name, txn, stream_id: 0 } if name == "connect" && *txn == 1.0
    ));
    let ServerEvent::ConnectRequested(c) = &p.server_events[1] else {
        panic!("no ConnectRequested: {:?}", p.server_events);
    };
    assert_eq!(c.app, "live");
    assert_eq!(c.query, "");
    assert_eq!(c.tc_url.as_deref(), Some("rtmp://127.0.0.1/live"));
    assert!(c
        .flash_ver
        .as_deref()
        .unwrap_or_default()
        .starts_with("FMLE"));
    assert_eq!(p.server.out_chunk_size(), 4096);
    assert!(p.ended.is_none());
}

// engine_commands.rs: commands_are_answered_like_fms, releaseStream/FCPublish/createStream,
// an unknown call, getStreamLength, _checkbw.
#[test]
fn publisher_preamble_and_unknown_calls() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    p.connect(&mut hub);
    let c = &mut p.client;
    let release = c
        .call(0, "releaseStream", &[Amf0Value::Null, s("k")])
        .unwrap();
    let fc = c.call(0, "FCPublish", &[Amf0Value::Null, s("k")]).unwrap();
    let create = c.create_stream().unwrap();
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(
        names(&got),
        vec![
            "_result",
            "onFCPublish NetStream.Publish.Start",
            "_result",
            "_result"
        ]
    );
    assert!(reply(&got, release).unwrap().0);
    assert!(reply(&got, fc).unwrap().0);
    assert!(matches!(
        got.last(),
        Some(ClientEvent::StreamCreated { txn, stream_id: 1 }) if *txn == create
    ));
    assert!(p
        .server_events
        .contains(&ServerEvent::ReleaseStream { name: "k".into() }));
    assert!(p
        .server_events
        .contains(&ServerEvent::FcPublish { name: "k".into() }));

    // An unknown call: _error with its transaction id, and the connection stays up.
    let t = p
        .client
        .call(0, "noSuchMethod", &[Amf0Value::Null])
        .unwrap();
    p.drive(&mut hub);
    let got = p.take();
    let (ok, values) = reply(&got, t).expect("_error");
    assert!(!ok);
    assert_eq!(
        values[1].get("code").and_then(Amf0Value::as_str),
        Some("NetConnection.Call.Failed")
    );
    let len = p
        .client
        .call(0, "getStreamLength", &[Amf0Value::Null, s("k")])
        .unwrap();
    let bw = p.client.call(0, "_checkbw", &[Amf0Value::Null]).unwrap();
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(reply(&got, len).unwrap().1[1].as_f64(), Some(0.0));
    assert!(reply(&got, bw).unwrap().0);
    assert!(p.ended.is_none());
}

// engine_commands.rs: commands_are_answered_like_fms, play/pause/seek/ping, then a
// publisher arriving, a second publisher refused, the first leaving.
#[test]
fn play_pause_seek_ping_and_publisher_notices() {
    let mut hub = Hub::default();
    let mut c = Pair::new();
    c.connect(&mut hub);
    // play on stream 1 of a key with no publisher yet: the FMS sequence, then waiting.
    let args = [Amf0Value::Null, s("k"), Amf0Value::Number(-2.0)];
    c.client.notify(1, "play", &args);
    c.drive(&mut hub);
    let got = c.take();
    assert_eq!(
        names(&got),
        vec![
            format!("{:?}", UserControl::StreamBegin(1)),
            "onStatus NetStream.Play.Reset".into(),
            "onStatus NetStream.Play.Start".into(),
            "|RtmpSampleAccess".into(),
            "onStatus NetStream.Data.Start".into(),
        ]
    );
    for e in &got[1..] {
        match e {
            ClientEvent::Status { stream_id, .. } | ClientEvent::Data { stream_id, .. } => {
                assert_eq!(*stream_id, 1, "{e:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(c.server.poll_timeout().is_some(), "waits for a publisher");

    for (paused, code) in [
        (true, "onStatus NetStream.Pause.Notify"),
        (false, "onStatus NetStream.Unpause.Notify"),
    ] {
        let args = [
            Amf0Value::Null,
            Amf0Value::Boolean(paused),
            Amf0Value::Number(0.0),
        ];
        c.client.notify(1, "pause", &args);
        c.drive(&mut hub);
        assert_eq!(names(&c.take()), vec![code.to_owned()]);
        assert_eq!(
            c.server_events.last(),
            Some(&ServerEvent::Pause {
                stream_id: 1,
                paused
            })
        );
    }
    c.client
        .notify(1, "seek", &[Amf0Value::Null, Amf0Value::Number(1000.0)]);
    c.drive(&mut hub);
    assert_eq!(names(&c.take()), vec!["onStatus NetStream.Seek.Notify"]);
    c.client
        .send(2, &UserControl::PingRequest(4242).to_message());
    c.drive(&mut hub);
    assert_eq!(
        c.take(),
        vec![ClientEvent::Control(Control::UserControl(
            UserControl::PingResponse(4242)
        ))]
    );

    // A publisher arrives: the waiting player is told with StreamBegin (the engine calls
    // publisher_started when its hub says so).
    let mut p = Pair::new();
    let sid = p.publish(&mut hub, "k");
    let got = p.take();
    assert_eq!(
        names(&got),
        vec![
            format!("{:?}", UserControl::StreamBegin(sid)),
            "onStatus NetStream.Publish.Start".into()
        ]
    );
    assert_eq!(
        status(&got, "NetStream.Publish.Start"),
        Some(("status", sid))
    );
    c.server.publisher_started(false);
    c.drive(&mut hub);
    assert_eq!(
        names(&c.take()),
        vec![format!("{:?}", UserControl::StreamBegin(1))]
    );
    assert!(
        c.server.poll_timeout().is_none(),
        "no wait with a publisher"
    );

    // A second publisher on the key: BadName (level error), and its connection answers.
    let mut q = Pair::new();
    let qsid = q.publish(&mut hub, "k");
    let got = q.take();
    assert_eq!(
        status(&got, "NetStream.Publish.BadName"),
        Some(("error", qsid))
    );
    let t = q
        .client
        .call(0, "getStreamLength", &[Amf0Value::Null, s("k")])
        .unwrap();
    q.drive(&mut hub);
    assert!(reply(&q.take(), t).unwrap().0);

    // The first publisher leaves: the player gets UnpublishNotify then StreamEOF, and
    // PublishNotify when the next one comes.
    p.client.delete_stream(sid);
    p.drive(&mut hub);
    assert!(hub.published.is_empty());
    c.server.publisher_stopped(c.now);
    c.drive(&mut hub);
    assert_eq!(
        names(&c.take()),
        vec![
            "onStatus NetStream.Play.UnpublishNotify".to_owned(),
            format!("{:?}", UserControl::StreamEof(1)),
        ]
    );
    assert!(c.server.poll_timeout().is_some());
    c.server.publisher_started(true);
    c.drive(&mut hub);
    assert_eq!(
        names(&c.take()),
        vec![
            format!("{:?}", UserControl::StreamBegin(1)),
            "onStatus NetStream.Play.PublishNotify".to_owned(),
        ]
    );
}

// engine_commands.rs: connect_without_an_app_is_refused_with_a_reason.
#[test]
fn connect_without_an_app_is_refused_with_a_reason() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    let obj = Amf0Value::object([("tcUrl", s("rtmp://x/"))]);
    p.client.call(0, "connect", &[obj]).unwrap();
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(
        status(&got, "NetConnection.Connect.Rejected"),
        Some(("error", 0))
    );
    assert!(matches!(p.ended, Some(ServerError::Rejected(_))));
    assert!(
        !p.server_events
            .iter()
            .any(|e| matches!(e, ServerEvent::ConnectRequested(_))),
        "no request for a bad app"
    );
}

// engine_commands.rs: a_player_waiting_too_long_gets_play_stop, on the fake clock.
#[test]
fn a_player_waiting_too_long_gets_play_stop() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        player_wait: Duration::from_millis(500),
        ..ServerConfig::default()
    });
    p.connect(&mut hub);
    p.client.play(1, "nobody");
    p.drive(&mut hub);
    p.take();
    let due = p.server.poll_timeout().expect("a deadline");
    assert_eq!(due, p.now + Duration::from_millis(500));
    // Not a moment early.
    p.server
        .handle_timeout(due - Duration::from_millis(1))
        .unwrap();
    p.drive(&mut hub);
    assert!(p.take().is_empty());
    let e = p.server.handle_timeout(due).unwrap_err();
    assert!(matches!(e, ServerError::NoPublisher(_)), "{e}");
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(names(&got), vec!["onStatus NetStream.Play.Stop"]);
    assert_eq!(status(&got, "NetStream.Play.Stop"), Some(("status", 1)));
}

#[test]
fn the_application_can_refuse_connect_publish_and_play() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    p.refuse_app = Some("live");
    let got = p.connect(&mut hub);
    // FMS style: `_error` of connect carrying Connect.Rejected.
    assert_eq!(names(&got), vec!["_error"]);
    let (ok, values) = reply(&got, 1.0).unwrap();
    assert!(!ok);
    assert_eq!(
        values[1].get("code").and_then(Amf0Value::as_str),
        Some("NetConnection.Connect.Rejected")
    );
    assert!(matches!(&p.ended, Some(ServerError::Rejected(d)) if d == "not here"));

    // Publish and play with a code of the application's choosing (authorization).
    let mut p = Pair::new();
    p.connect(&mut hub);
    p.client.publish(1, "k?token=bad");
    p.client.play(1, "k?token=worse");
    p.drive_manually(|ev, server| match ev {
        ServerEvent::PublishRequested { request, .. } => {
            assert_eq!(
                (request.name.as_str(), request.query.as_str()),
                ("k", "token=bad")
            );
            server.reject_with(request.request_id, "NetStream.Publish.Unauthorized", "no");
        }
        ServerEvent::PlayRequested { request, start, .. } => {
            assert_eq!(request.query, "token=worse");
            assert_eq!(*start, Some(-2.0));
            server.reject(request.request_id, "no");
        }
        _ => {}
    });
    let got = p.take();
    assert_eq!(
        names(&got),
        vec![
            "onStatus NetStream.Publish.Unauthorized",
            "onStatus NetStream.Play.Failed"
        ]
    );
    assert!(got
        .iter()
        .all(|e| matches!(e, ClientEvent::Status { level, .. } if level == "error")));
    // A rename (an authorization callback's redirect) carries the new name; an invalid
    // one is refused like an invalid name from the client.
    p.client.publish(1, "k");
    p.client.play(2, "k");
    p.drive_manually(|ev, server| match ev {
        ServerEvent::PublishRequested { request, .. } => {
            assert_eq!(
                server.rename(request.request_id, "other?x=1").as_deref(),
                Some("other")
            );
            server.accept(request.request_id);
        }
        ServerEvent::PlayRequested { request, .. } => {
            assert_eq!(server.rename(request.request_id, "?"), None);
            server.accept(request.request_id); // nothing pending any more: ignored
        }
        _ => {}
    });
    let got = p.take();
    assert_eq!(
        names(&got),
        vec![
            format!("{:?}", UserControl::StreamBegin(1)),
            "onStatus NetStream.Publish.Start".into(),
            "onStatus NetStream.Play.StreamNotFound".into(),
        ]
    );
    assert!(
        matches!(&got[1], ClientEvent::Status { description, .. } if description == "other is now published.")
    );
    let mut p = Pair::new();
    p.connect(&mut hub);
    // Nothing was accepted: media is not passed on.
    p.client
        .send_media(1, message::VIDEO, 0, Bytes::from_static(b"\x17\x01"));
    p.drive(&mut hub);
    assert!(!p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::Media(_))));
    assert!(p.ended.is_none());
}

impl Pair {
    /// Like [`Pair::drive`], with the test deciding each request.
    fn drive_manually(&mut self, mut decide: impl FnMut(&ServerEvent, &mut ServerSession)) {
        for _ in 0..1_000 {
            let mut moved = false;
            if let Some(b) = self.client.take_output() {
                self.to_server.extend_from_slice(&b);
                moved = true;
            }
            while let Ok(Poll::Event(ev)) = self.server.poll(&mut self.to_server, self.now) {
                decide(&ev, &mut self.server);
                self.server_events.push(ev);
            }
            if let Some(b) = self.server.take_output() {
                self.to_client.extend_from_slice(&b);
                moved = true;
            }
            while let Some(ev) = self.client.poll(&mut self.to_client).unwrap() {
                self.got.push(ev);
            }
            if !moved {
                return;
            }
        }
        panic!("the sessions never went quiet");
    }
}

#[test]
fn publish_and_play_need_connect_and_a_name() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    p.client.publish(1, "k");
    p.client.play(1, "k");
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(
        status(&got, "NetStream.Publish.BadName"),
        Some(("error", 1))
    );
    assert_eq!(
        status(&got, "NetStream.Play.StreamNotFound"),
        Some(("error", 1))
    );
    p.connect(&mut hub);
    p.client.publish(1, "?only=query");
    p.drive(&mut hub);
    assert!(status(&p.take(), "NetStream.Publish.BadName").is_some());
    // One publish per connection.
    p.client.publish(1, "a");
    p.client.publish(2, "b");
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(status(&got, "NetStream.Publish.Start"), Some(("status", 1)));
    assert_eq!(
        status(&got, "NetStream.Publish.BadName"),
        Some(("error", 2))
    );
    assert!(hub.published.contains("live/a") && !hub.published.contains("live/b"));
    assert!(p.server_events.iter().all(|e| !matches!(
        e,
        ServerEvent::ConnectRequested(_) | ServerEvent::PublishRequested { .. }
    ) || !format!("{e:?}").contains("only=query")));
}

#[test]
fn create_stream_is_bounded_per_connection() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        max_streams: 2,
        ..ServerConfig::default()
    });
    p.connect(&mut hub);
    for _ in 0..3 {
        p.client.create_stream().unwrap();
    }
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(names(&got), vec!["_result", "_result", "_error"]);
    let ids: Vec<u32> = got
        .iter()
        .filter_map(|e| match e {
            ClientEvent::StreamCreated { stream_id, .. } => Some(*stream_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[test]
fn media_and_metadata_reach_the_application_uncopied() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    // Media before an accepted publish is dropped.
    p.connect(&mut hub);
    p.client
        .send_media(1, message::AUDIO, 1, Bytes::from_static(b"\xaf\x01early"));
    let sid = p.publish(&mut hub, "k");
    let frame = Bytes::from(vec![0x17u8; 10_000]);
    p.client.send_media(sid, message::VIDEO, 40, frame.clone());
    // @setDataFrame onMetaData, as ffmpeg sends it: passed on as plain onMetaData.
    let meta = [
        s("@setDataFrame"),
        s("onMetaData"),
        Amf0Value::object([("width", Amf0Value::Number(640.0))]),
    ];
    p.client.send(
        4,
        &Message::new(message::DATA_AMF0, 0, sid, client::data_payload(&meta)),
    );
    p.drive(&mut hub);
    let media: Vec<&Message> = p
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Media(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(media.len(), 1, "{media:?}");
    assert_eq!(
        (media[0].msg_type, media[0].timestamp),
        (message::VIDEO, 40)
    );
    assert_eq!(media[0].payload, frame);
    let data = p
        .server_events
        .iter()
        .find_map(|e| match e {
            ServerEvent::Data { payload, .. } => Some(payload.clone()),
            _ => None,
        })
        .expect("metadata");
    assert_eq!(data, client::data_payload(&meta[1..]));
    // deleteStream ends the publish: later media is dropped.
    p.client.delete_stream(sid);
    p.client
        .send_media(sid, message::AUDIO, 80, Bytes::from_static(b"\xaf\x01late"));
    p.drive(&mut hub);
    assert!(p
        .server_events
        .contains(&ServerEvent::StreamDeleted { stream_id: sid }));
    let n = p
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::Media(_)))
        .count();
    assert_eq!(n, 1);
}

#[test]
fn malformed_messages_end_the_session_past_the_limit() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        limits: SessionLimits {
            max_protocol_errors: 3,
            ..SessionLimits::default()
        },
        ..ServerConfig::default()
    });
    p.connect(&mut hub);
    let junk = Message::new(message::COMMAND_AMF0, 0, 0, Bytes::from_static(&[0, 0, 0]));
    for _ in 0..3 {
        p.client.send(3, &junk);
    }
    p.drive(&mut hub);
    let malformed = p
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::Malformed(_)))
        .count();
    assert_eq!(malformed, 3);
    assert!(p.ended.is_none());
    p.client.send(3, &junk);
    p.drive(&mut hub);
    assert!(
        matches!(p.ended, Some(ServerError::ProtocolErrors { count: 4, .. })),
        "{:?}",
        p.ended
    );
}

#[test]
fn message_rate_pauses_decoding_on_the_callers_clock() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        limits: SessionLimits {
            max_messages_per_sec: 10,
            ..SessionLimits::default()
        },
        ..ServerConfig::default()
    });
    let start = p.now;
    for i in 0..30 {
        p.client.send(2, &UserControl::PingRequest(i).to_message());
    }
    p.drive(&mut hub);
    let pongs = p
        .take()
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Control(Control::UserControl(UserControl::PingResponse(_)))
            )
        })
        .count();
    assert_eq!(pongs, 30);
    assert!(p.rate_limited > 0);
    // 10 of burst, then 20 at 10 a second: about two seconds of the fake clock.
    let spent = p.now - start;
    assert!(
        spent >= Duration::from_millis(1900) && spent <= Duration::from_millis(2500),
        "{spent:?}"
    );
}

#[test]
fn replies_are_bounded_until_written() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        limits: SessionLimits {
            max_reply_queue: 100,
            ..SessionLimits::default()
        },
        ..ServerConfig::default()
    });
    for i in 0..100 {
        p.client.send(2, &UserControl::PingRequest(i).to_message());
    }
    // The first poll stops once 100 bytes of pongs (18 bytes each) are queued.
    let b = p.client.take_output().unwrap();
    p.to_server.extend_from_slice(&b);
    let first = p.server.poll(&mut p.to_server, p.now).unwrap();
    assert_eq!(first, Poll::RepliesFull);
    let out = p.server.take_output().unwrap();
    let n = out.len();
    assert!((100..100 + 18).contains(&n), "{n} bytes queued");
    assert!(!p.to_server.is_empty(), "the rest waits in the buffer");
    // Until told the replies are written, it decodes nothing more.
    assert_eq!(
        p.server.poll(&mut p.to_server, p.now).unwrap(),
        Poll::RepliesFull
    );
    p.server.flushed();
    p.to_client.extend_from_slice(&out);
    p.drive(&mut hub);
    let pongs = p
        .take()
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Control(Control::UserControl(UserControl::PingResponse(_)))
            )
        })
        .count();
    assert_eq!(pongs, 100);
}

#[test]
fn received_bytes_are_acknowledged_per_window() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    p.connect(&mut hub);
    // The client asks for an ack every 1000 bytes.
    p.client.send(2, &message::window_ack_size(1000));
    let sid = p.publish(&mut hub, "k");
    p.take();
    p.client
        .send_media(sid, message::VIDEO, 0, Bytes::from(vec![0x27u8; 3000]));
    p.drive(&mut hub);
    let acks: Vec<u32> = p
        .take()
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Control(Control::Ack(n)) => Some(*n),
            _ => None,
        })
        .collect();
    assert!(!acks.is_empty(), "no acknowledgement");
    assert!(acks.iter().all(|&n| n >= 1000), "{acks:?}");
}

#[test]
fn aggregates_split_into_media_events() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    let sid = p.publish(&mut hub, "k");
    let tag = |t: u8, ts: u32, data: &[u8]| {
        let mut v = vec![t];
        v.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        v.extend_from_slice(&ts.to_be_bytes()[1..]);
        v.push((ts >> 24) as u8);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(data);
        v.extend_from_slice(&((data.len() + 11) as u32).to_be_bytes());
        v
    };
    let mut body = tag(message::VIDEO, 0, b"v1");
    body.extend(tag(message::AUDIO, 20, b"a1"));
    p.client
        .send(6, &Message::new(message::AGGREGATE, 100, sid, body));
    // A broken one is a protocol error, not the end.
    p.client.send(
        6,
        &Message::new(message::AGGREGATE, 100, sid, vec![9u8, 0, 0]),
    );
    p.drive(&mut hub);
    let media: Vec<(u8, u32)> = p
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Media(m) => Some((m.msg_type, m.timestamp)),
            _ => None,
        })
        .collect();
    assert_eq!(media, vec![(message::VIDEO, 100), (message::AUDIO, 120)]);
    assert!(p
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::Malformed(_))));
    assert!(p.ended.is_none());
}

#[test]
fn a_second_play_replaces_the_first() {
    let mut hub = Hub::default();
    let mut p = Pair::new();
    p.connect(&mut hub);
    p.client.play(1, "a");
    p.client.play(1, "b");
    p.drive(&mut hub);
    let plays = p
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::PlayRequested { .. }))
        .count();
    assert_eq!(plays, 2);
    // play2 while playing does nothing; receiveVideo reaches the application.
    let obj = Amf0Value::object([("streamName", s("c"))]);
    p.client.notify(1, "play2", &[Amf0Value::Null, obj]);
    p.client.notify(
        1,
        "receiveVideo",
        &[Amf0Value::Null, Amf0Value::Boolean(false)],
    );
    p.drive(&mut hub);
    assert_eq!(
        p.server_events.last(),
        Some(&ServerEvent::ReceiveVideo {
            stream_id: 1,
            on: false
        })
    );
    let plays = p
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::PlayRequested { .. }))
        .count();
    assert_eq!(plays, 2);
    // The chunk size was announced once, at connect.
    let sets = p
        .take()
        .iter()
        .filter(|e| matches!(e, ClientEvent::Control(Control::SetChunkSize(_))))
        .count();
    assert_eq!(sets, 0);
}

#[test]
fn over_rtmpe_the_chunk_size_waits_for_play() {
    let mut hub = Hub::default();
    let mut p = Pair::with(ServerConfig {
        chunk_size_on_connect: false,
        ..ServerConfig::default()
    });
    let got = p.connect(&mut hub);
    assert!(!got
        .iter()
        .any(|e| matches!(e, ClientEvent::Control(Control::SetChunkSize(_)))));
    assert_eq!(p.server.out_chunk_size(), 128);
    p.client.play(1, "k");
    p.drive(&mut hub);
    let got = p.take();
    assert_eq!(
        got.first(),
        Some(&ClientEvent::Control(Control::SetChunkSize(4096)))
    );
    assert_eq!(p.server.out_chunk_size(), 4096);
}

#[test]
fn events_stay_small_and_inline() {
    // One is moved per media message; an idle connection holds two slots, no queue.
    assert!(std::mem::size_of::<ServerEvent>() <= 64);
    let mut e = server::Events::default();
    for i in 0..5 {
        e.push_back(ServerEvent::StreamDeleted { stream_id: i });
    }
    for i in 0..5 {
        assert_eq!(
            e.pop_front(),
            Some(ServerEvent::StreamDeleted { stream_id: i })
        );
    }
    assert_eq!(e.pop_front(), None);
    e.push_back(ServerEvent::StreamDeleted { stream_id: 9 });
    assert_eq!(
        e.pop_front(),
        Some(ServerEvent::StreamDeleted { stream_id: 9 })
    );
}
