//! `--log-format json` (issue 10 item 6): every line the gateway writes to stderr is one JSON
//! object with a timestamp, level, target and fields, session lines included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::amf0::Amf0Value;

fn json_lines(log: &str) -> Vec<Result<serde_json::Value, String>> {
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).map_err(|e| format!("{e}: {l}")))
        .collect()
}

fn message(v: &serde_json::Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or_default()
}

#[test]
fn every_stderr_line_is_a_json_object() {
    let mut gw = Gateway::builder()
        .args(&["--log-format", "json", "--listen", "rtmp://127.0.0.1:0"])
        // The harness looks for text lines; this test finds the listener in the JSON.
        .listeners(0)
        .start();
    let mut addr: Option<SocketAddr> = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            addr = json_lines(&gw.log()).iter().flatten().find_map(|v| {
                message(v)
                    .strip_prefix("listening on rtmp://")
                    .and_then(|a| a.trim_end_matches('/').parse().ok())
            });
            addr.is_some()
        }),
        "no JSON `listening on` line; log:\n{}",
        gw.log()
    );
    let addr = addr.unwrap();

    // A session with a malformed command, for session lines and a warning with fields.
    let mut tcp = connect_from(Ipv4Addr::new(127, 0, 0, 31), addr).unwrap();
    handshake(&mut tcp).unwrap();
    let mut inbox = Inbox::default();
    connect_and_create_stream(&mut tcp, &mut inbox, addr, Duration::from_secs(10)).unwrap();
    tcp.write_all(&chunked(3, &command(0, "", 3.0, &[Amf0Value::Null]), 128))
        .unwrap();
    tcp.write_all(&[0x03, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0])
        .unwrap();
    assert!(inbox.pong(&mut tcp, 1, Duration::from_secs(10)));
    drop(tcp);
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log_contains("session closed")),
        "no session close line; log:\n{}",
        gw.log()
    );
    assert!(gw.terminate(Duration::from_secs(20)).is_some());

    let log = gw.log();
    let lines = json_lines(&log);
    assert!(lines.len() >= 5, "too few lines:\n{log}");
    let bad: Vec<&String> = lines.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(bad.is_empty(), "lines that are not JSON: {bad:#?}");
    for v in lines.iter().flatten() {
        for key in ["timestamp", "level", "target"] {
            assert!(v[key].is_string(), "no {key} in {v}");
        }
        assert!(
            v["fields"]["message"].is_string(),
            "no fields.message in {v}"
        );
    }
    let values: Vec<&serde_json::Value> = lines.iter().flatten().collect();
    // The engine's lines carry the session id as a field, not only in the text.
    let warn = values
        .iter()
        .find(|v| v["level"] == "WARN" && message(v).contains("undecodable command"))
        .unwrap_or_else(|| panic!("no warning for the malformed command:\n{log}"));
    assert!(warn["fields"]["session"].is_u64(), "{warn}");
    assert!(values
        .iter()
        .any(|v| message(v).starts_with("session close") && v["fields"]["session"].is_u64()));
}
