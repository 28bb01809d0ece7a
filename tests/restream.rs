//! Restream (`[[engine.push]]`) against real peers: one ffmpeg publish to the engine is
//! pushed to an nginx-rtmp destination over RTMP and another over RTMPS (stunnel in front
//! of nginx-rtmp, as a platform's RTMPS ingest), and players on both, and a local player,
//! get every frame (framemd5 against the source); a destination killed and restarted gets
//! the stream again after the backoff while the other destination and the local player
//! lose nothing, and a destination that accepts and never reads holds up nobody; one that
//! stops reading mid-stream (nginx SIGSTOPped, 2.7 MB/s of noise) skips to a keyframe
//! (counted) while the publisher keeps real time and the other destination gets every frame; the
//! destinations' stream keys appear neither in the log nor in /metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Every key below contains this: it must never be logged or exposed.
const SECRET: &str = "sEcReT";

fn gateway(push: &str) -> Gateway {
    Gateway::builder()
        .config(push)
        .env("RUST_LOG", "info")
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .start()
}

/// GET /metrics from the admin listener (HTTP/1.0: the body ends with the connection).
fn metrics(gw: &Gateway) -> String {
    let addr: SocketAddr = admin_addr(gw);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1."), "{body}");
    body
}

/// GET /api/v1/restream from the admin listener.
fn api_restream(gw: &Gateway) -> String {
    let addr: SocketAddr = admin_addr(gw);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/v1/restream HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
        "{body}"
    );
    body
}

/// The sample of `name` whose labels contain `dest` (0 when absent).
fn sample(metrics: &str, name: &str, dest: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(dest))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn assert_no_key(gw: &Gateway, metrics: &str) {
    let log = gw.log();
    assert!(!log.contains(SECRET), "a stream key is in the log:\n{log}");
    assert!(
        !metrics.contains(SECRET),
        "a stream key is in /metrics:\n{metrics}"
    );
}

fn wait_ok(p: &mut Proc, within: Duration) {
    let st = p
        .wait_timeout(within)
        .unwrap_or_else(|| panic!("{} did not finish within {within:?}", p.name()));
    assert!(st.success(), "{} failed: {}", p.name(), p.log());
}

/// A player on nginx-rtmp: ffmpeg does not end when nginx's publisher leaves (nor on a
/// signal while it waits in its read), so once its file has stopped growing for 2 s (at
/// most [`PLAYER_TAIL`]) its nginx is stopped and the player ends at the closed connection.
fn stop_when_idle(p: &mut Proc, out: &std::path::Path, server: &mut Nginx) {
    let size = || std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + PLAYER_TAIL;
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

fn wait_stopped(p: &mut Proc) {
    assert!(
        p.wait_timeout(PLAYER_TAIL).is_some(),
        "{} did not stop within {PLAYER_TAIL:?} after the publisher left",
        p.name()
    );
}

#[test]
fn one_publish_reaches_an_rtmp_and_an_rtmps_destination_and_a_local_player() {
    const SECONDS: u32 = 6;
    let mut plain = Nginx::start();
    let mut behind_tls = Nginx::start();
    let tls = Stunnel::start(behind_tls.addr(), TlsMode::Server);
    let ca = dev_certs().ca.display().to_string();
    let gw = gateway(&format!(
        "[[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{}/live/a_{SECRET}\"\n\
         [[engine.push]]\napp = \"li*\"\nurl = \"rtmps://127.0.0.1:{}/live/{{name}}_{SECRET}\"\nca = \"{ca}\"\n",
        plain.port(),
        tls.port()
    ));
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let outs = ["plain.flv", "tls.flv", "local.flv"].map(|n| dir.path().join(n));
    // Players first: each waits for its stream, so every frame of it is compared.
    let mut players = [
        play_ffmpeg(&plain.url(&format!("live/a_{SECRET}")), &outs[0]),
        play_ffmpeg(&behind_tls.url(&format!("live/s_{SECRET}")), &outs[1]),
        play_ffmpeg(&format!("{}/live/s", gw.url("rtmp")), &outs[2]),
    ];
    thread::sleep(Duration::from_millis(1500));
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/live/s", gw.url("rtmp")), &src);
    assert!(
        gw.wait_log_count("***: publishing", 2, Duration::from_secs(10)),
        "both destinations should be publishing:\n{}",
        gw.log()
    );
    let during = metrics(&gw);
    let api = api_restream(&gw);
    assert!(
        !api.contains(SECRET),
        "a stream key in /api/v1/restream: {api}"
    );
    let rtmps_api = format!(
        "\"destination\":\"rtmps://127.0.0.1:{}/live/***\"",
        tls.port()
    );
    assert!(api.contains(&rtmps_api), "{api}");
    assert_eq!(api.matches("\"publishing\":1").count(), 2, "{api}");
    wait_ok(&mut publisher, Duration::from_secs(u64::from(SECONDS) + 30));
    let [a, b, c] = &mut players;
    stop_when_idle(a, &outs[0], &mut plain);
    stop_when_idle(b, &outs[1], &mut behind_tls);
    wait_stopped(c);
    for (out, what) in outs
        .iter()
        .zip(["rtmp destination", "rtmps destination", "local player"])
    {
        assert_whole_run(what, &want, &framemd5(out), 700);
    }
    let rtmps = format!("rtmps://127.0.0.1:{}/live/***", tls.port());
    assert_eq!(
        sample(&during, "rtmpgate_restream_publishing", &rtmps),
        1.0,
        "{during}"
    );
    assert!(
        gw.wait_log_count("stopped (the publisher left)", 2, Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    let after = metrics(&gw);
    assert_eq!(
        sample(&after, "rtmpgate_restream_streams", &rtmps),
        0.0,
        "{after}"
    );
    assert!(
        sample(&after, "rtmpgate_restream_bytes_total", &rtmps) > 100_000.0,
        "{after}"
    );
    assert_no_key(&gw, &after);
}

#[test]
fn a_destination_restarted_gets_the_stream_again_and_a_stalled_one_holds_up_nobody() {
    const SECONDS: u32 = 12;
    let mut restarted = Nginx::start();
    let port = restarted.port();
    let mut steady = Nginx::start();
    // Accepts and never reads (nor answers the handshake): the publish to it never starts.
    let stall = TcpListener::bind("127.0.0.1:0").unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    let held = thread::spawn(move || {
        stall.set_nonblocking(true).unwrap();
        let mut conns = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && conns.len() < 64 {
            match stall.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
            if conns.len() >= 2 {
                break;
            }
        }
        conns.len()
    });
    let gw = gateway(&format!(
        "[limits]\nhandshake_timeout_secs = 2\n\
         [[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{port}/live/r_{SECRET}\"\n\
         [[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{}/live/s_{SECRET}\"\n\
         [[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{stall_port}/live/x_{SECRET}\"\n",
        steady.port()
    ));
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let outs = ["steady.flv", "local.flv", "after.flv"].map(|n| dir.path().join(n));
    let mut steady_player = play_ffmpeg(&steady.url(&format!("live/s_{SECRET}")), &outs[0]);
    let mut local = play_ffmpeg(&format!("{}/live/s", gw.url("rtmp")), &outs[1]);
    thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/live/s", gw.url("rtmp")), &src);
    assert!(
        gw.wait_log_count("***: publishing", 2, Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    thread::sleep(Duration::from_secs(2));
    restarted.kill();
    let restarted_dest = format!("rtmp://127.0.0.1:{port}/live/***");
    assert!(
        gw.wait_log(
            &format!("{restarted_dest}: dropped"),
            Duration::from_secs(5)
        ),
        "{}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(1000));
    let mut again = Nginx::start_on_port(port);
    let mut after_player = play_ffmpeg(&again.url(&format!("live/r_{SECRET}")), &outs[2]);
    let back = Instant::now();
    assert!(
        gw.wait_log_count("***: publishing", 3, Duration::from_secs(10)),
        "the restarted destination was not published to again:\n{}",
        gw.log()
    );
    eprintln!(
        "the restarted destination was published to again {:?} after it came back",
        back.elapsed()
    );
    wait_ok(&mut publisher, Duration::from_secs(u64::from(SECONDS) + 30));
    // Real time: the stalled destination did not slow the publisher.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(u64::from(SECONDS) + 8),
        "publishing {SECONDS} s of media took {took:?}"
    );
    wait_stopped(&mut local);
    stop_when_idle(&mut steady_player, &outs[0], &mut steady);
    stop_when_idle(&mut after_player, &outs[2], &mut again);
    assert_whole_run("steady destination", &want, &framemd5(&outs[0]), 700);
    assert_whole_run("local player", &want, &framemd5(&outs[1]), 700);
    // After the restart: a contiguous run of the source from a keyframe, a few seconds long.
    let got = framemd5(&outs[2]);
    let report = contiguous_run(&want, &got).unwrap_or_else(|e| panic!("after the restart: {e}"));
    eprintln!("after the restart: {report:?}");
    assert!(
        count_media(&got, "video") >= 30,
        "after the restart the destination got only {} video frames",
        count_media(&got, "video")
    );
    assert!(
        held.join().unwrap() >= 1,
        "the stalled destination was never connected to"
    );
    let stalled = format!("rtmp://127.0.0.1:{stall_port}/live/***");
    assert!(
        gw.expect_log(&format!("{stalled}: origin")),
        "no line about the stalled destination:\n{}",
        gw.log()
    );
    let m = metrics(&gw);
    assert!(
        sample(&m, "rtmpgate_restream_failures_total", &stalled) >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "rtmpgate_restream_connects_total", &restarted_dest),
        2.0,
        "{m}"
    );
    assert_no_key(&gw, &m);
}

#[test]
fn a_destination_that_stops_reading_mid_stream_skips_to_a_keyframe_and_slows_nobody() {
    // 2.7 MB/s of noise: a destination that stops reading fills the socket buffers within
    // a couple of seconds and then the ring (2 x max_lag_bytes = 4 MiB) overtakes it.
    const SECONDS: u32 = 9;
    let mut stopped = Nginx::start();
    let mut steady = Nginx::start();
    let gw = gateway(&format!(
        "[engine]\nmax_lag_bytes = 2097152\n\
         [[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{}/live/t_{SECRET}\"\n\
         [[engine.push]]\napp = \"live\"\nurl = \"rtmp://127.0.0.1:{}/live/u_{SECRET}\"\n",
        stopped.port(),
        steady.port()
    ));
    let src = noise_source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let outs = ["stopped.flv", "steady.flv"].map(|n| dir.path().join(n));
    let mut stopped_player = play_ffmpeg(&stopped.url(&format!("live/t_{SECRET}")), &outs[0]);
    let mut steady_player = play_ffmpeg(&steady.url(&format!("live/u_{SECRET}")), &outs[1]);
    thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/live/s", gw.url("rtmp")), &src);
    assert!(
        gw.wait_log_count("***: publishing", 2, Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(1000));
    stopped.proc.signal("STOP");
    thread::sleep(Duration::from_secs(4));
    stopped.proc.signal("CONT");
    wait_ok(&mut publisher, Duration::from_secs(u64::from(SECONDS) + 30));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(u64::from(SECONDS) + 6),
        "publishing {SECONDS} s of media took {took:?} with a destination stopped"
    );
    stop_when_idle(&mut steady_player, &outs[1], &mut steady);
    stop_when_idle(&mut stopped_player, &outs[0], &mut stopped);
    let stopped_dest = format!("rtmp://127.0.0.1:{}/live/***", stopped.port());
    let steady_dest = format!("rtmp://127.0.0.1:{}/live/***", steady.port());
    let m = metrics(&gw);
    eprintln!(
        "skips: stopped {}, steady {}",
        sample(&m, "rtmpgate_restream_skips_total", &stopped_dest),
        sample(&m, "rtmpgate_restream_skips_total", &steady_dest)
    );
    assert!(
        sample(&m, "rtmpgate_restream_skips_total", &stopped_dest) >= 1.0,
        "the stopped destination never skipped:\n{m}\n{}",
        gw.log()
    );
    assert_eq!(
        sample(&m, "rtmpgate_restream_skips_total", &steady_dest),
        0.0,
        "{m}"
    );
    assert_whole_run("steady destination", &want, &framemd5(&outs[1]), 700);
    // The stopped one resumed at a keyframe: its last part is a contiguous run of the source.
    let got = framemd5(&outs[0]);
    assert!(
        count_media(&got, "video") < count_media(&want, "video"),
        "the stopped destination got every frame: nothing was skipped"
    );
    assert_no_key(&gw, &m);
}
