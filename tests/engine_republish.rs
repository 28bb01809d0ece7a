//! A player that outlives its publisher: UnpublishNotify and StreamEOF, then, when a new
//! encoder publishes on the same key, StreamBegin, PublishNotify and media whose timestamps
//! continue after what it already had.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::io::Read;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::chunk::ChunkDecoder;
use rtmpgate::rtmp::message::{self, Message, UserControl};

/// What the raw player saw, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Status(String),
    Begin,
    Eof,
    Media(u32),
}

fn status_code(msg: &Message) -> Option<String> {
    let cmd = message::decode_command(msg, &Default::default()).ok()?;
    if cmd.name != "onStatus" {
        return None;
    }
    Some(cmd.arg(0)?.get("code")?.as_str()?.to_owned())
}

#[test]
fn a_waiting_player_continues_across_a_republish() {
    let src = source_flv(3);
    let srv = Server::start(EngineConfig::default());
    let url = srv.url("again");
    let mut tcp = stalled_player(srv.addr, "live", "again");
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut dec = ChunkDecoder::new(&Limits::default());
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let mut read_until = |seen: &mut Vec<Seen>, done: &dyn Fn(&[Seen]) -> bool, limit: Duration| {
        let end = Instant::now() + limit;
        let mut tmp = vec![0u8; 65536];
        while !done(seen) {
            assert!(Instant::now() < end, "timed out; saw {seen:?}");
            match tcp.read(&mut tmp) {
                Ok(0) => panic!("server closed the player; saw {seen:?}"),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
                Err(_) => continue,
            }
            while let Some(msg) = dec.decode(&mut buf).unwrap() {
                match msg.msg_type {
                    message::AUDIO | message::VIDEO => seen.push(Seen::Media(msg.timestamp)),
                    message::USER_CONTROL => match UserControl::decode(&msg.payload) {
                        Ok(UserControl::StreamBegin(_)) => seen.push(Seen::Begin),
                        Ok(UserControl::StreamEof(_)) => seen.push(Seen::Eof),
                        _ => {}
                    },
                    message::COMMAND_AMF0 => {
                        if let Some(code) = status_code(&msg) {
                            seen.push(Seen::Status(code));
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    let has = |code: &'static str| {
        move |s: &[Seen]| s.iter().any(|x| *x == Seen::Status(code.to_owned()))
    };
    read_until(
        &mut seen,
        &has("NetStream.Play.Start"),
        Duration::from_secs(5),
    );
    let mut first = publish(&peers().ffmpeg, &url, &src);
    read_until(
        &mut seen,
        &has("NetStream.Play.UnpublishNotify"),
        Duration::from_secs(20),
    );
    assert!(first
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .success());
    read_until(
        &mut seen,
        &|s| s.last() == Some(&Seen::Eof),
        Duration::from_secs(5),
    );
    let last_ts = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Media(t) => Some(*t),
            _ => None,
        })
        .max()
        .expect("media from the first publisher");
    let before = seen.len();
    let mut second = publish(&peers().ffmpeg, &url, &src);
    read_until(
        &mut seen,
        &|s| {
            s.iter()
                .skip(before)
                .filter(|x| matches!(x, Seen::Media(_)))
                .count()
                > 20
        },
        Duration::from_secs(20),
    );
    second.kill();
    let after = &seen[before..];
    assert_eq!(after[0], Seen::Begin, "saw {after:?}");
    assert_eq!(
        after[1],
        Seen::Status("NetStream.Play.PublishNotify".into())
    );
    let resumed: Vec<u32> = after
        .iter()
        .filter_map(|s| match s {
            Seen::Media(t) => Some(*t),
            _ => None,
        })
        .collect();
    assert!(
        resumed.iter().all(|t| *t > last_ts),
        "timestamps went back: first publish ended at {last_ts}, second starts {resumed:?}"
    );
}
