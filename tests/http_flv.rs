//! HTTP-FLV playback (`GET /APP/STREAM.flv`) against real clients: ffmpeg and curl over
//! plain HTTP and HTTPS (frames compared with the source), a late joiner that starts from the
//! cached GOP, `[auth]` denials (403 with the reason), unknown streams and odd requests, the
//! relay's 501, a stalled HTTP reader beside an RTMP player, and headless Chromium playing
//! `examples/httpflv/index.html` with the vendored mpegts.js.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The gateway with an rtmp and an rtmps listener and this `[engine]` text.
fn gateway(engine: &str) -> Gateway {
    Gateway::builder()
        .config(&format!("[engine]\n{engine}\n"))
        .rtmp_and_rtmps()
        .start()
}

fn http_url(gw: &Gateway, app_key: &str) -> String {
    format!("http://{}/{app_key}.flv", gw.addr("rtmp"))
}

fn https_url(gw: &Gateway, app_key: &str) -> String {
    format!("https://{}/{app_key}.flv", gw.addr("rtmps"))
}

/// curl writing the response body to `out`; `extra` are more flags (`--http1.0`).
fn curl_play(url: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-sS", "-N", "--fail", "--max-time", "120"])
        .arg("--cacert")
        .arg(&dev_certs().ca)
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(url);
    Proc::spawn(&format!("curl {}", extra.join(" ")), cmd)
}

/// ffmpeg reading `url` (https verified against the dev CA) into `out` as FLV, packets copied.
fn ffmpeg_play(url: &str, out: &Path) -> Proc {
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "warning", "-y"])
        .args(["-rw_timeout", &(PLAYER_IDLE_SECS * 1_000_000).to_string()]);
    if url.starts_with("https") {
        cmd.args(["-tls_verify", "1", "-ca_file"])
            .arg(&dev_certs().ca);
    }
    cmd.args(["-i", url, "-c", "copy", "-f", "flv"]).arg(out);
    Proc::spawn(&format!("ffmpeg player of {url}"), cmd)
}

/// One raw request; the status, the head and the body (read to the close, at most 10 s).
fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    raw_http_from(None, addr, request)
}

fn raw_http_from(local: Option<&str>, addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(ip) = local {
        let from: SocketAddr = format!("{ip}:0").parse().unwrap();
        sock.bind(&from.into()).unwrap();
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let mut c: TcpStream = sock.into();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(request);
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(all.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, all[split..].to_vec())
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// The gateway's log lines holding every one of `needles`.
fn lines_with(gw: &Gateway, needles: &[&str]) -> Vec<String> {
    gw.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Frames over plain HTTP and HTTPS
// ---------------------------------------------------------------------------------------------

/// ffmpeg and curl start before the publisher (the request waits for it), over HTTP/1.1
/// (chunked) and HTTP/1.0 (ended by the close), plain and TLS. Each gets the whole source
/// packet for packet, and each ends by itself when the publisher leaves (the gateway ends
/// the body: curl's exit status 0 says the chunked body was well terminated).
#[test]
fn ffmpeg_and_curl_get_every_packet_over_http_and_https() {
    let gw = gateway("http_flv_wait_ms = 60000");
    let dir = temp_dir();
    let src = source_flv(5);
    let want = framemd5(&src);
    let key = "live/whole";
    let players: Vec<(&str, String, Proc, PathBuf)> = [
        ("ffmpeg http", http_url(&gw, key), false),
        ("ffmpeg https", https_url(&gw, key), false),
        ("curl http/1.0", http_url(&gw, key), true),
        ("curl https http/1.1", https_url(&gw, key), true),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (what, url, curl))| {
        let out = dir.path().join(format!("p{i}.flv"));
        let p = if curl {
            let extra: &[&str] = if what.contains("1.0") {
                &["--http1.0"]
            } else {
                &["--http1.1"]
            };
            curl_play(&url, &out, extra)
        } else {
            ffmpeg_play(&url, &out)
        };
        (what, url, p, out)
    })
    .collect();
    assert!(
        gw.wait_log_count("(http-flv, waiting up to", 4, START_TIMEOUT),
        "the four HTTP players did not all reach the gateway:\n{}",
        gw.log()
    );
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &src);
    let st = publisher.wait_timeout(Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "publisher: {st:?} {}",
        publisher.log()
    );
    for (what, url, mut p, out) in players {
        let st = p.wait_timeout(PLAYER_TAIL);
        assert!(
            st.is_some_and(|s| s.success()),
            "{what} ({url}) did not end by itself with success within {PLAYER_TAIL:?} after \
             the publisher left: {st:?}\n{}\ngateway:\n{}",
            p.log(),
            gw.log()
        );
        let got = framemd5(&out);
        // Both read to the end of the body: nothing of the source may be missing, but the
        // one packet rtmpdump-like readers are allowed to lose at the very end (50 ms).
        assert_whole_run(&format!("{what} over {url}"), &want, &got, 50);
    }
    assert_eq!(
        lines_with(&gw, &["(http-flv)", "the publisher left"]).len(),
        4,
        "{}",
        gw.log()
    );
}

// ---------------------------------------------------------------------------------------------
// A late joiner starts at once from the cached GOP
// ---------------------------------------------------------------------------------------------

/// 12 s at 320x240, 30 fps, one keyframe every 150 frames (5 s), and a tone.
fn long_gop_source() -> PathBuf {
    let dest = media_dir().join("gop5s-12s.flv");
    cached(&dest, |staging| {
        let mut cmd = Command::new(&peers().ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30"])
            .args(["-f", "lavfi", "-i", "sine"])
            .args(["-t", "12", "-c:v", "libx264", "-preset", "veryfast"])
            .args(["-g", "150", "-keyint_min", "150", "-sc_threshold", "0"])
            .args(["-c:a", "aac", "-f", "flv"])
            .arg(staging);
        run_ok(&mut cmd, Duration::from_secs(120));
    })
}

/// Joining 7 s into a stream whose keyframes are 5 s apart (at 0, 5, 10 s): with the GOP
/// cache the player starts at the 5 s keyframe at once; without it, it would wait ~3 s for
/// the one at 10 s. The bound, 1500 ms to the first frame, is far from both (measured: 0-7
/// ms at load 14-18); the start must be video packet #150 exactly (the join may be 2 s early
/// or 3 s late on a loaded machine and still be in that GOP), then every packet in order.
#[test]
fn a_late_joiner_starts_at_once_from_the_cached_keyframe() {
    let gw = Gateway::builder()
        .rtmp_and_rtmps()
        .args(&["--admin", "127.0.0.1:0"])
        .start();
    let dir = temp_dir();
    let src = long_gop_source();
    let want = framemd5(&src);
    let key = "live/late";
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &src);
    assert!(
        gw.wait_log(&format!("publish {key}"), START_TIMEOUT),
        "{}",
        gw.log()
    );
    // ffmpeg -re paces the media by the wall clock from its start, just before the publish.
    thread::sleep(Duration::from_millis(7000));
    let out = dir.path().join("late.flv");
    let mut curl = curl_play(&http_url(&gw, key), &out, &["--max-time", "3"]);
    // curl's own --max-time (exit 28) ends it; 20 s is the bound on that.
    assert!(curl.wait_timeout(Duration::from_secs(20)).is_some());
    let first = lines_with(
        &gw,
        &["http 127.0.0.1", &format!("first frame of {key} after")],
    );
    let ms: u64 = first
        .first()
        .and_then(|l| l.split("after ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no first-frame line for the HTTP player:\n{}", gw.log()));
    let got = framemd5(&out);
    let run = assert_contiguous_run("the late HTTP player", &want, &got, 0.0);
    eprintln!("late joiner: first frame after {ms} ms; {run}");
    assert_eq!(
        run.start("video"),
        Some(150),
        "the late player should start at the 5 s keyframe (video packet #150): {run}"
    );
    assert!(
        ms <= 1500,
        "the late player's first frame took {ms} ms (bound 1500 ms; the next keyframe was ~3 s away)"
    );
    // HEAD of a live stream: 200, the stream's type, no body.
    let (status, head, body) = raw_http(
        gw.addr("rtmp"),
        format!("HEAD /{key}.flv HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("Content-Type: video/x-flv"), "{head}");
    assert!(body.is_empty(), "{} bytes of body", body.len());
    // Both requests are sessions of transport http in the metrics.
    let mut curl = Command::new(&peers().curl);
    curl.args(["-s", "--max-time", "10"])
        .arg(format!("http://{}/metrics", admin_addr(&gw)));
    let metrics = String::from_utf8_lossy(&run_ok(&mut curl, Duration::from_secs(15))).into_owned();
    assert!(
        metrics.contains("rtmpgate_sessions_total{transport=\"http\"} 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("sessions_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    publisher.kill();
}

// ---------------------------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------------------------

/// A tiny `on_play` service: 403 for the stream `bad`, 200 otherwise; keeps each body.
fn callback_service() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            c.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Head, then Content-Length bytes of form body.
            while let Ok(n) = c.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
            let deny = body.split('&').any(|kv| kv == "name=bad");
            kept.lock().unwrap().push(body);
            let status = if deny { "403 Forbidden" } else { "200 OK" };
            let _ = c.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (addr, seen)
}

/// `[auth]` rules apply to HTTP-FLV as to `play`: a key from the query string, an address
/// rule, and an `on_play` callback (which sees `call=play` and the stream's name). A denial
/// is 403 with the reason; an allowed request for a stream nobody publishes is 404 (with
/// `http_flv_wait_ms = 0`, at once).
#[test]
fn auth_rules_and_callbacks_answer_403_with_the_reason() {
    let (svc, seen) = callback_service();
    let gw = Gateway::builder()
        .config(&format!(
            "[engine]\nhttp_flv_wait_ms = 0\n\n[auth]\ndeny_play = [\"127.0.0.2/32\"]\n\
             play_keys = {{ live = [\"k1\"] }}\n\n[auth.app.cb]\non_play = \"http://{svc}/play\"\n"
        ))
        .rtmp_and_rtmps()
        .start();
    let addr = gw.addr("rtmp");

    let (status, _, body) = raw_http(addr, &get("/live/x.flv"));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("play denied (key)"), "{body}");

    let (status, _, body) = raw_http(addr, &get("/live/x.flv?key=k1"));
    assert_eq!(
        status,
        404,
        "with its key the play is allowed (and the stream absent): {}",
        String::from_utf8_lossy(&body)
    );

    let (status, _, body) = raw_http_from(Some("127.0.0.2"), addr, &get("/live/x.flv?key=k1"));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("play denied (address)"), "{body}");

    let (status, _, body) = raw_http(addr, &get("/cb/bad.flv?tok=1"));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("(callback_denied)"), "{body}");
    let (status, _, _) = raw_http(addr, &get("/cb/good.flv"));
    assert_eq!(status, 404);
    let calls = seen.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .any(|b| b.contains("call=play") && b.contains("name=bad") && b.contains("tok=1")),
        "the callback never saw the play of cb/bad with its query: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|b| b.contains("call=play") && b.contains("name=good")),
        "{calls:?}"
    );
    // Denials are counted and logged like RTMP ones.
    assert!(
        gw.expect_log("auth: play live/(stream name withheld)"),
        "{}",
        gw.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Unknown streams, odd requests, CORS, relay mode
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_streams_odd_requests_and_cors_get_clear_answers() {
    let gw = gateway("http_flv_wait_ms = 300\nhttp_flv_cors = \"https://page.example\"");
    let addr = gw.addr("rtmp");

    // An unknown stream: 404 after the configured wait, with a body saying why.
    let t0 = Instant::now();
    let (status, head, body) = raw_http(addr, &get("/live/nobody.flv"));
    let took = t0.elapsed();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{head}{body}");
    assert!(
        body.contains("live/nobody is not being published"),
        "{body}"
    );
    assert!(
        head.contains("Access-Control-Allow-Origin: https://page.example"),
        "{head}"
    );
    // 300 ms of wait; 5 s bounds a loaded machine's answer.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Not an HTTP-FLV path.
    let (status, _, body) = raw_http(addr, &get("/live/x.mp4"));
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("/APP/STREAM.flv"));
    // An RTMPT path asked with GET: the tunnel's own answer, 405.
    let (status, head, _) = raw_http(addr, &get("/open/1"));
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("Allow: POST"), "{head}");
    // Another method.
    let (status, head, _) = raw_http(addr, b"DELETE /live/x.flv HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("Allow: GET, HEAD, OPTIONS"), "{head}");
    // A CORS preflight.
    let (status, head, _) = raw_http(
        addr,
        b"OPTIONS /live/x.flv HTTP/1.1\r\nHost: t\r\nOrigin: https://page.example\r\n\
          Access-Control-Request-Method: GET\r\n\r\n",
    );
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("Access-Control-Allow-Methods: GET, HEAD, OPTIONS"),
        "{head}"
    );
    // A head over limits.max_http_header (16 KiB): 431, and the connection closed.
    let big = format!(
        "GET /live/x.flv HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(20 * 1024)
    );
    let (status, _, _) = raw_http(addr, big.as_bytes());
    assert_eq!(status, 431);
    // Over TLS too (curl, verified against the dev CA).
    let mut curl = Command::new(&peers().curl);
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ])
    .arg("--cacert")
    .arg(&dev_certs().ca)
    .arg(https_url(&gw, "live/nobody"));
    let out = run_ok(&mut curl, Duration::from_secs(15));
    assert_eq!(String::from_utf8_lossy(&out), "404");
}

/// A relaying gateway (`--upstream`) has no hub to play from: the GET is answered 501 with
/// the reason at once, never left hanging.
#[test]
fn a_relaying_gateway_answers_501_at_once() {
    // A port nobody listens on: the relay never gets as far as the backend for HTTP.
    let port = free_port();
    let upstream = format!("rtmp://127.0.0.1:{port}");
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--upstream", &upstream])
        .start();
    let t0 = Instant::now();
    let (status, _, body) = raw_http(gw.addr("rtmp"), &get("/live/x.flv"));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("needs rtmpgate's built-in engine"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// A stalled HTTP reader
// ---------------------------------------------------------------------------------------------

/// An HTTP player that sends its GET and never reads (4 KiB receive buffer) beside an
/// rtmpdump player of the same 22 Mb/s stream: the publisher runs in real time, rtmpdump gets
/// every packet, and the stalled one is dropped as too slow after `write_timeout_secs` (4 s,
/// under the 8 s source: the drop happens during the publish). The ring and the lag allowance
/// (256 messages, 8 MiB: about 3 s of this stream) let rtmpdump lag on a loaded machine
/// without a skip; the stalled reader falls out of both within seconds.
#[test]
fn a_stalled_http_reader_does_not_delay_an_rtmp_player() {
    const SECS: u32 = 8;
    let gw = gateway(
        "http_flv_wait_ms = 60000\nqueue_messages = 256\nmax_lag_bytes = 8388608\n\
         write_timeout_secs = 4\ngop_cache = false",
    );
    let dir = temp_dir();
    let src = noise_source_flv(SECS);
    let want = framemd5(&src);
    let key = "live/stall";
    let out = dir.path().join("ok.flv");
    let mut good = play_rtmpdump(&format!("{}/{key}", gw.url("rtmp")), &out);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect_timeout(&gw.addr("rtmp").into(), Duration::from_secs(5))
        .unwrap();
    let mut stalled: TcpStream = sock.into();
    stalled.write_all(&get(&format!("/{key}.flv"))).unwrap();
    assert!(
        gw.wait_log("(http-flv, waiting up to", START_TIMEOUT)
            && wait_until(START_TIMEOUT, || good
                .log()
                .contains("Starting Live Stream")
                || gw.log_contains(&format!("play {key} (waiting"))),
        "players not ready:\n{}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &src);
    let st = publisher.wait_timeout(Duration::from_secs(60));
    let took = t0.elapsed();
    assert!(st.is_some_and(|s| s.success()), "{}", publisher.log());
    // Real time plus 4 s for a loaded machine's start: nobody waited for the stalled reader.
    assert!(
        took < Duration::from_secs(u64::from(SECS) + 4),
        "publishing took {took:?}"
    );
    assert!(
        good.wait_timeout(PLAYER_TAIL).is_some(),
        "rtmpdump did not end"
    );
    let got = framemd5(&out);
    let run = assert_contiguous_run("the rtmpdump player", &want, &got, 0.0);
    assert_eq!(run.start("video"), Some(0), "{run}");
    assert!(run.fraction >= 0.99, "rtmpdump got only {run}");
    let dropped = wait_until(Duration::from_secs(10), || {
        !lines_with(&gw, &["session close: http", "dropped as too slow"]).is_empty()
    });
    assert!(
        dropped,
        "the stalled HTTP reader was never dropped:\n{}",
        gw.log()
    );
    drop(stalled);
}

// ---------------------------------------------------------------------------------------------
// The example page in headless Chromium
// ---------------------------------------------------------------------------------------------

/// What the page posted: its progress reports and its one frame.
#[derive(Default)]
struct Posted {
    reports: Vec<serde_json::Value>,
    shot: Option<String>,
}

/// A loopback static server for examples/httpflv (GET) that keeps the page's POSTs.
fn page_server(posted: Arc<Mutex<Posted>>) -> SocketAddr {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/httpflv");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(c) = conn else { return };
            let root = root.clone();
            let posted = posted.clone();
            thread::spawn(move || serve_page_request(c, &root, &posted));
        }
    });
    addr
}

fn serve_page_request(mut c: TcpStream, root: &Path, posted: &Mutex<Posted>) {
    c.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head_end, len) = loop {
        let Ok(n) = c.read(&mut chunk) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0usize);
            break (p + 4, len);
        }
        if buf.len() > 1 << 20 {
            return;
        }
    };
    while buf.len() < head_end + len && buf.len() < 16 << 20 {
        let Ok(n) = c.read(&mut chunk) else { return };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let path = words.next().unwrap_or("/").split('?').next().unwrap_or("/");
    let (status, ctype, content): (&str, &str, Vec<u8>) = match (method, path) {
        ("POST", "/report") => {
            if let Ok(v) = serde_json::from_str(&body) {
                posted.lock().unwrap().reports.push(v);
            }
            ("204 No Content", "text/plain", Vec::new())
        }
        ("POST", "/shot") => {
            posted.lock().unwrap().shot = Some(body);
            ("204 No Content", "text/plain", Vec::new())
        }
        ("GET", "/index.html") => (
            "200 OK",
            "text/html",
            std::fs::read(root.join("index.html")).unwrap(),
        ),
        ("GET", "/mpegts.js") => (
            "200 OK",
            "application/javascript",
            std::fs::read(root.join("mpegts.js")).unwrap(),
        ),
        _ => ("404 Not Found", "text/plain", b"not here".to_vec()),
    };
    let _ = c.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            content.len()
        )
        .as_bytes(),
    );
    let _ = c.write_all(&content);
}

/// The example page, served from its own loopback origin, plays the gateway's HTTP-FLV in
/// headless Chromium: the video element's currentTime passes 2 s and then keeps advancing,
/// frames are decoded, and a frame drawn from the video is saved as target/httpflv.png.
/// Debian's Chromium decodes H.264 in MSE (`MediaSource.isTypeSupported('video/mp4;
/// codecs="avc1.64001f"')` is true there), so the test source (H.264 + AAC) plays as is.
#[test]
fn chromium_plays_the_example_page() {
    // The page's request waits for the publisher, which starts once it is there: however
    // long the browser takes to start, the whole 20 s stream is ahead of it.
    let gw = gateway("http_flv_wait_ms = 60000");
    let src = source_flv(20);
    let key = "live/browser";
    let posted = Arc::new(Mutex::new(Posted::default()));
    let page = page_server(posted.clone());
    let url = format!(
        "http://{page}/index.html?report=1&src={}",
        http_url(&gw, key)
    );
    let profile = temp_dir();
    let chromium = which("chromium")
        .or_else(|| which("chromium-browser"))
        .expect("chromium is missing (Debian package chromium); run scripts/install-peers.sh");
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--autoplay-policy=no-user-gesture-required",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(&url);
    let mut browser = Proc::spawn("chromium", cmd);
    // 45 s bounds a loaded machine's browser start (a few seconds idle).
    assert!(
        gw.wait_log("(http-flv, waiting up to", Duration::from_secs(45)),
        "the page never asked for the stream:\n{}\n{}",
        gw.log(),
        browser.log()
    );
    let mut publisher = publish(&peers().ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &src);
    // Real time: currentTime reaches 2 s about 2 s after the first frames; 30 s of margin.
    let time = |p: &Posted| {
        p.reports
            .iter()
            .filter_map(|r| r["currentTime"].as_f64())
            .fold(0.0f64, f64::max)
    };
    let played = wait_until(Duration::from_secs(30), || {
        time(&posted.lock().unwrap()) >= 2.0
    });
    let at_two = time(&posted.lock().unwrap());
    // And it keeps going: one more second of reports must show it further on.
    let advancing = played
        && wait_until(Duration::from_secs(10), || {
            time(&posted.lock().unwrap()) >= at_two + 1.0
        });
    let shot = wait_until(Duration::from_secs(10), || {
        posted.lock().unwrap().shot.is_some()
    });
    browser.kill();
    publisher.kill();
    let p = posted.lock().unwrap();
    let last = p.reports.last().cloned().unwrap_or_default();
    eprintln!(
        "chromium: {} reports, currentTime up to {:.2} s; last report {last}",
        p.reports.len(),
        time(&p)
    );
    assert!(
        played && advancing,
        "the video's currentTime did not pass 2 s and advance (reports: {:?})\ngateway:\n{}\nchromium:\n{}",
        p.reports,
        gw.log(),
        browser.log()
    );
    assert!(last["error"].as_str().unwrap_or("").is_empty(), "{last}");
    assert_eq!(
        (last["width"].as_f64(), last["height"].as_f64()),
        (Some(640.0), Some(360.0))
    );
    assert!(shot, "the page sent no frame");
    let data = p.shot.clone().unwrap_or_default();
    let b64 = data
        .trim()
        .strip_prefix("data:image/png;base64,")
        .unwrap_or("");
    let png = base64_decode(b64);
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/httpflv.png");
    std::fs::write(&file, &png).unwrap();
    eprintln!("a frame as Chromium decoded it: {}", file.display());
    // Counted as a player of the stream, over transport http, in the session close line.
    assert!(
        wait_until(Duration::from_secs(10), || !lines_with(
            &gw,
            &["session close: http", &format!("play {key} (http-flv)")]
        )
        .is_empty()),
        "{}",
        gw.log()
    );
}

/// Standard base64 (the page's PNG data URL), without a crate for it.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Edge mode
// ---------------------------------------------------------------------------------------------

/// In edge mode (`--edge`, an nginx-rtmp origin) an HTTP-FLV request pulls the stream from
/// the origin like an RTMP play: curl, started before the publisher, gets every packet the
/// publisher sent to the origin, and its body ends when the origin says the stream stopped.
#[test]
fn an_edge_serves_http_flv_pulled_from_its_origin() {
    let origin = Nginx::start();
    let upstream = origin.upstream();
    let gw = Gateway::builder()
        .config("[engine]\nhttp_flv_wait_ms = 60000\n")
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--admin",
            "off",
            "--edge",
            "--upstream",
            &upstream,
        ])
        .start();
    let dir = temp_dir();
    let src = source_flv(5);
    let want = framemd5(&src);
    let out = dir.path().join("edge.flv");
    let mut curl = curl_play(&http_url(&gw, "live/edged"), &out, &["--http1.1"]);
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .log()
            .contains("edge pull live/edged: playing from")),
        "the HTTP request started no pull:\n{}",
        gw.log()
    );
    let mut publisher = publish(&peers().ffmpeg, &origin.url("live/edged"), &src);
    assert!(publisher
        .wait_timeout(Duration::from_secs(60))
        .is_some_and(|s| s.success()));
    let st = curl.wait_timeout(PLAYER_TAIL);
    assert!(
        st.is_some_and(|s| s.success()),
        "curl did not end with success after the origin's publisher left: {st:?} {}\n{}",
        curl.log(),
        gw.log()
    );
    assert_whole_run("curl from an edge", &want, &framemd5(&out), 50);
}
