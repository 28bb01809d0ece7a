//! Restream destinations added and removed through the admin API, against real peers: an
//! ffmpeg publish to the engine; a destination (nginx-rtmp) added before the publish gets
//! the whole run, one added while the stream is live gets a contiguous run from a keyframe,
//! and DELETE ends that push at once while the local player and the other destination carry
//! on; the pushes are counted apart from players; the publish sequence the destination sees
//! is connect, releaseStream, FCPublish, createStream, publish (nginx-rtmp's debug log);
//! the API needs the token, refuses bad bodies saying what to fix, is bounded by
//! `limits.max_api_pushes`, keeps its destinations over a reload, and the stream keys are
//! never in the log, the API's answers or /metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Every key below contains this: it must never be logged or exposed.
const SECRET: &str = "sEcReT";
const TOKEN: &str = "t0k3n-restream";

fn gateway(extra: &str) -> Gateway {
    Gateway::builder()
        .config(&format!("[admin]\ntoken = \"{TOKEN}\"\n{extra}"))
        .env("RUST_LOG", "info")
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .start()
}

/// An admin request with curl (bounded to 5 s): (status, body). Status 0: no answer.
fn http(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: bool,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "--max-time", "5", "-X", method]);
    if token {
        cmd.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    cmd.args(["-w", "\n%{http_code}", &format!("http://{admin}{path}")]);
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn add(admin: SocketAddr, app: &str, stream: &str, url: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"app": app, "stream": stream, "url": url}).to_string();
    let (code, text) = http(admin, "POST", "/api/v1/restream", true, Some(&body));
    assert!(!text.contains(SECRET), "a stream key in the answer: {text}");
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

fn get_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = http(admin, "GET", path, true, None);
    assert_eq!(code, 200, "GET {path}: {body}");
    assert!(!body.contains(SECRET), "a stream key in GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// The value of the first sample line of `name` in /metrics (0 when absent).
fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (code, body) = http(admin, "GET", "/metrics", true, None);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(SECRET), "a stream key in /metrics:\n{body}");
    body.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// nginx-rtmp as [`Nginx::start`], logging at debug level (every AMF command it handles).
fn nginx_debug() -> Nginx {
    let (proc, dir, port) = spawn_nginx_rtmp(None, |d, port| {
        format!(
            "load_module {module};\n\
             worker_processes 1; daemon off; master_process off;\n\
             error_log {d}/error.log debug; pid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n  \
             application live {{ live on; record off; }} }} }}\n",
            module = peers().nginx_rtmp_module.display(),
            d = d.display(),
        )
    });
    Nginx { proc, dir, port }
}

/// The AMF commands nginx-rtmp's debug log shows per connection (`*N`), in order, repeats
/// (one line per handler) folded.
fn commands_by_connection(log: &str) -> Vec<Vec<String>> {
    let mut conns: Vec<(String, Vec<String>)> = Vec::new();
    for line in log.lines() {
        let name = ["AMF func '", "AMF cmd '"]
            .iter()
            .find_map(|p| line.split_once(p).and_then(|(_, r)| r.split_once('\'')))
            .map(|(n, _)| n.to_string());
        let (Some(name), Some(conn)) = (
            name,
            line.split_whitespace()
                .find(|w| w.starts_with('*'))
                .map(str::to_string),
        ) else {
            continue;
        };
        let at = match conns.iter().position(|(c, _)| *c == conn) {
            Some(at) => at,
            None => {
                conns.push((conn, Vec::new()));
                conns.len() - 1
            }
        };
        let cmds = &mut conns[at].1;
        if cmds.last() != Some(&name) {
            cmds.push(name);
        }
    }
    conns.into_iter().map(|(_, c)| c).collect()
}

/// A player on nginx-rtmp ends only when its nginx does: once its file has stopped growing
/// for 2 s (at most 20 s), the nginx is killed and the player ends.
fn stop_when_idle(p: &mut Proc, out: &std::path::Path, server: &mut Nginx) {
    let size = || std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut last, mut since) = (size(), Instant::now());
    while Instant::now() < deadline && since.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(200));
        let now = size();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    server.kill();
    assert!(
        p.wait_timeout(Duration::from_secs(10)).is_some(),
        "{} did not stop when its nginx did",
        p.name()
    );
}

fn wait_ok(p: &mut Proc, within: Duration) {
    let st = p
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{} did not finish within {within:?}", p.name()));
    assert!(st.success(), "{} failed: {}", p.name(), p.log());
}

#[test]
fn destinations_added_before_and_during_a_publish_and_one_removed() {
    const SECONDS: u32 = 10;
    let mut before = nginx_debug();
    let mut during = Nginx::start();
    let gw = gateway("");
    let admin = admin_addr(&gw);
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let outs = ["before.flv", "during.flv", "local.flv"].map(|n| dir.path().join(n));
    let mut before_player = play_ffmpeg(&before.url(&format!("live/b_{SECRET}")), &outs[0]);
    let mut during_player = play_ffmpeg(&during.url(&format!("live/d_{SECRET}")), &outs[1]);
    let mut local = play_ffmpeg(&format!("{}/live/cam1", gw.url("rtmp")), &outs[2]);
    // Added before the stream exists: it waits for the publish.
    let (code, v) = add(
        admin,
        "live",
        "cam1",
        &before.url(&format!("live/b_{SECRET}")),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["live"], false, "{v}");
    let before_dest = format!("rtmp://127.0.0.1:{}/live/***", before.port());
    assert_eq!(v["destination"], before_dest.as_str(), "{v}");
    thread::sleep(Duration::from_millis(1500));
    let mut publisher = publish(
        &peers().ffmpeg,
        &format!("{}/live/cam1", gw.url("rtmp")),
        &src,
    );
    assert!(
        gw.wait_log(
            &format!("{before_dest}: publishing"),
            Duration::from_secs(10)
        ),
        "{}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(1500));
    // Added while live: it starts at once, from the hub's caches.
    let (code, v) = add(
        admin,
        "live",
        "cam1",
        &during.url(&format!("live/d_{SECRET}")),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["live"], true, "{v}");
    let during_id = v["id"].as_u64().unwrap();
    let during_dest = format!("rtmp://127.0.0.1:{}/live/***", during.port());
    assert!(
        gw.wait_log(
            &format!("{during_dest}: publishing"),
            Duration::from_secs(10)
        ),
        "{}",
        gw.log()
    );
    // Two pushes, one player: counted apart.
    let streams = get_json(admin, "/api/v1/streams");
    let s = &streams["streams"][0];
    assert_eq!(
        (s["players"].as_u64(), s["pushes"].as_u64()),
        (Some(1), Some(2)),
        "{streams}"
    );
    assert_eq!(metric(admin, "rtmpgate_engine_players"), 1.0);
    assert_eq!(metric(admin, "rtmpgate_engine_pushes"), 2.0);
    let list = get_json(admin, "/api/v1/restream");
    let rows = list["destinations"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(
        rows.iter()
            .all(|r| r["source"] == "api" && r["publishing"] == 1),
        "{list}"
    );
    thread::sleep(Duration::from_secs(2));
    // Removed: its push ends at once (nginx is left with its player only).
    assert_eq!(
        during.clients(),
        2,
        "the push and the player on the second nginx"
    );
    let (code, text) = http(
        admin,
        "DELETE",
        &format!("/api/v1/restream/{during_id}"),
        true,
        None,
    );
    assert_eq!(code, 200, "{text}");
    let removed_at = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || during.clients() == 1),
        "the removed push still holds its connection: {} clients",
        during.clients()
    );
    eprintln!(
        "the removed push's connection closed {:?} after the DELETE",
        removed_at.elapsed()
    );
    assert!(
        gw.expect_log(&format!(
            "{during_dest}: removed through the admin API by 127.0.0.1:"
        )),
        "{}",
        gw.log()
    );
    assert!(
        gw.expect_log(&format!(
            "{during_dest}: stopped (removed through the admin API)"
        )),
        "{}",
        gw.log()
    );
    let (code, _) = http(
        admin,
        "DELETE",
        &format!("/api/v1/restream/{during_id}"),
        true,
        None,
    );
    assert_eq!(code, 404);
    wait_ok(&mut publisher, Duration::from_secs(u64::from(SECONDS) + 30));
    assert!(
        local.wait_timeout(Duration::from_secs(20)).is_some(),
        "the local player did not stop after the publisher left"
    );
    stop_when_idle(&mut during_player, &outs[1], &mut during);
    stop_when_idle(&mut before_player, &outs[0], &mut before);
    assert_whole_run(
        "destination added before the publish",
        &want,
        &framemd5(&outs[0]),
        700,
    );
    assert_whole_run("local player", &want, &framemd5(&outs[2]), 700);
    let got = framemd5(&outs[1]);
    let report =
        contiguous_run(&want, &got).unwrap_or_else(|e| panic!("destination added while live: {e}"));
    eprintln!("destination added while live, removed 2 s later: {report:?}");
    assert!(
        count_media(&got, "video") >= 20,
        "only {} video frames",
        count_media(&got, "video")
    );
    assert!(
        count_media(&got, "video") < count_media(&want, "video"),
        "the removed destination got the whole run"
    );
    // The sequence of the push the destination saw, as ffmpeg and OBS send it.
    let nginx_log = before.error_log();
    let pushes: Vec<Vec<String>> = commands_by_connection(&nginx_log)
        .into_iter()
        .filter(|c| c.iter().any(|n| n == "publish"))
        .collect();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    // nginx-rtmp logs the names lower-cased.
    let order: Vec<&str> = pushes[0]
        .iter()
        .map(String::as_str)
        .filter(|n| {
            [
                "connect",
                "releasestream",
                "fcpublish",
                "createstream",
                "publish",
            ]
            .contains(n)
        })
        .collect();
    assert_eq!(
        order,
        [
            "connect",
            "releasestream",
            "fcpublish",
            "createstream",
            "publish"
        ],
        "{pushes:?}"
    );
    let log = gw.log();
    assert!(!log.contains(SECRET), "a stream key is in the log:\n{log}");
}

#[test]
fn the_api_needs_the_token_refuses_bad_bodies_is_bounded_and_survives_a_reload() {
    let gw = gateway("[limits]\nmax_api_pushes = 2\n");
    let admin = admin_addr(&gw);
    let body =
        format!(r#"{{"app":"live","stream":"s","url":"rtmp://127.0.0.1:1/live/k_{SECRET}"}}"#);
    let (code, text) = http(admin, "POST", "/api/v1/restream", false, Some(&body));
    assert_eq!(code, 401, "{text}");
    let (code, _) = http(admin, "GET", "/api/v1/restream", false, None);
    assert_eq!(code, 401);
    let (code, _) = http(admin, "DELETE", "/api/v1/restream/1", false, None);
    assert_eq!(code, 401);
    let long_stream = "x".repeat(2000);
    let bad: [(String, u16, &str); 7] = [
        (
            format!(r#"{{"app":"live","url":"rtmp://h/live/{SECRET}""#),
            400,
            "not JSON",
        ),
        (format!(r#"["{SECRET}"]"#), 422, "JSON object"),
        (
            r#"{"app":"live","stream":"s"}"#.to_string(),
            422,
            "`url` is missing",
        ),
        (
            format!(r#"{{"app":"live","stream":"s","url":"rtmpt://h/live/{SECRET}"}}"#),
            422,
            "cannot be pushed to",
        ),
        (
            r#"{"app":"live","stream":"s","url":"rtmp://h/live/"}"#.to_string(),
            422,
            "no stream key",
        ),
        (
            format!(r#"{{"app":"live","stream":"{long_stream}","url":"rtmp://h/live/{SECRET}"}}"#),
            422,
            "max_name_len",
        ),
        (
            format!(
                r#"{{"app":"live","stream":"s","url":"rtmp://h/live/{}"}}"#,
                "k".repeat(9000)
            ),
            413,
            "larger than",
        ),
    ];
    for (body, status, says) in &bad {
        let (code, text) = http(admin, "POST", "/api/v1/restream", true, Some(body));
        assert_eq!(code, *status, "{text}");
        assert!(text.contains(says), "{text} should say {says}");
        assert!(!text.contains(SECRET), "{text}");
    }
    let (code, v) = add(
        admin,
        "live",
        "s",
        &format!("rtmp://127.0.0.1:1/live/a_{SECRET}"),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = add(
        admin,
        "live",
        "s",
        &format!("rtmp://127.0.0.1:1/live/a_{SECRET}"),
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("already added"),
        "{v}"
    );
    let (code, v) = add(
        admin,
        "live",
        "t",
        &format!("rtmp://127.0.0.1:1/live/b_{SECRET}"),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = add(
        admin,
        "live",
        "u",
        &format!("rtmp://127.0.0.1:1/live/c_{SECRET}"),
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("max_api_pushes"),
        "{v}"
    );
    let (code, text) = http(admin, "DELETE", "/api/v1/restream/x", true, None);
    assert_eq!(code, 400, "{text}");
    // A reload keeps them (they are runtime state, not configuration).
    let (code, text) = http(admin, "POST", "/api/v1/reload", true, None);
    assert_eq!(code, 200, "{text}");
    let list = get_json(admin, "/api/v1/restream");
    assert_eq!(
        list["destinations"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    assert!(
        list.to_string().contains("\"added_by\":\"127.0.0.1:"),
        "{list}"
    );
    let log = gw.log();
    assert!(!log.contains(SECRET), "a stream key is in the log:\n{log}");
}
