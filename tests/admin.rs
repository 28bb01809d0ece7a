//! The admin listener against real peers: Prometheus metrics scraped with curl and parsed
//! with a real Prometheus text parser while ffmpeg publishes and plays over several
//! transports (counters checked against what the test did and against a byte-counting
//! proxy), the JSON API, kicking a session, health and readiness through an upstream outage
//! and a drain, the token rule, TLS on the admin listener, and the status page rendered by
//! headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An HTTP request with curl (bounded to 5 s): (status, body). Status 0: no answer.
fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "-k", "--max-time", "5", "-X", method]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd.args(["-w", "\n%{http_code}", url]);
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    http("GET", &format!("http://{admin}{path}"), None)
}

fn get_json(admin: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = get(admin, path);
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// One scrape of /metrics, parsed by prometheus-parse.
struct Metrics(Vec<prometheus_parse::Sample>);

impl Metrics {
    fn scrape(admin: SocketAddr) -> Metrics {
        let (code, body) = get(admin, "/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("the Prometheus text parser rejected /metrics");
        Metrics(scrape.samples)
    }

    /// The value of `name` with this label (or no label), failing if it is not exposed.
    fn value(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.try_value(name, label)
            .unwrap_or_else(|| panic!("{name} {label:?} is not in /metrics"))
    }

    fn try_value(&self, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.metric == name
                    && match label {
                        None => true,
                        Some((k, v)) => s.labels.get(k) == Some(v),
                    }
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    fn by_transport(&self, name: &str, transport: &str) -> u64 {
        self.value(name, Some(("transport", transport))) as u64
    }
}

/// A TCP proxy that counts the bytes it carries each way: an independent measure of what
/// a plain RTMP client and the gateway exchanged.
struct CountingProxy {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl CountingProxy {
    fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (u, d) = (up.clone(), down.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    u.clone(),
                );
                pipe(server, client, d.clone());
            }
        });
        CountingProxy { addr, up, down }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: Arc<AtomicU64>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        // Ends when either side closes; a read timeout bounds a side that never does.
        let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// Connects, sends `bytes`, and waits up to 10 s for the gateway to close the connection.
fn send_and_expect_close(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(bytes).unwrap();
    let mut buf = [0u8; 4096];
    let began = Instant::now();
    loop {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(
                began.elapsed() < Duration::from_secs(10),
                "the gateway kept the connection open"
            ),
        }
    }
}

/// A plain RTMP C0+C1 (version 3, zero time and zeros).
fn c0c1() -> Vec<u8> {
    let mut v = vec![0u8; 1537];
    v[0] = 3;
    v
}

/// Sum of "session closed: TRANSPORT ..., N bytes in, M bytes out" lines for a transport.
fn logged_bytes(gw: &Gateway, transport: &str) -> (u64, u64, usize) {
    let prefix = format!("session closed: {transport} ");
    let (mut i, mut o, mut n) = (0, 0, 0);
    for l in gw.log().lines().filter(|l| l.contains(&prefix)) {
        let nums: Vec<u64> = l
            .split(", ")
            .filter_map(|part| {
                let (v, what) = part.split_once(' ')?;
                what.starts_with("bytes").then(|| v.parse().ok())?
            })
            .collect();
        if let [a, b] = nums[..] {
            i += a;
            o += b;
            n += 1;
        }
    }
    (i, o, n)
}

fn within_1pct(what: &str, got: u64, want: u64) {
    let diff = got.abs_diff(want) as f64;
    assert!(
        diff <= want as f64 * 0.01,
        "{what}: metrics say {got}, expected {want} (off by {:.2}%, 1% allowed)",
        diff * 100.0 / want.max(1) as f64
    );
    println!("{what}: metrics {got}, measured {want}");
}

// ---------------------------------------------------------------------------------------------
// Metrics and API during a run over several transports
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_and_api_match_what_the_clients_did() {
    let gw = Gateway::builder()
        .rtmp_and_rtmps()
        .args(&["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&gw);
    let plain = gw.addr("rtmp");
    let tls = gw.addr("rtmps");

    // Refusals, by reason: 3 unknown protocols, 2 plain RTMP on the TLS listener, 1 broken
    // TLS handshake.
    for _ in 0..3 {
        send_and_expect_close(plain, b"\xff\xfe\xfd not a protocol\r\n\r\n");
    }
    let c0c1 = c0c1();
    for _ in 0..2 {
        send_and_expect_close(tls, &c0c1);
    }
    send_and_expect_close(tls, b"\x16\x03\x01\x00\x100123456789abcdef");

    // Plain RTMP goes through a counting proxy; the other transports connect directly.
    let proxy = CountingProxy::start(plain);
    let dir = temp_dir();
    let src = source_flv(5);
    let key = "admin-metrics";
    let players = [
        (
            PlayerKind::Ffmpeg,
            format!("rtmp://{}/live/{key}", proxy.addr),
        ),
        (
            PlayerKind::Ffmpeg,
            format!("{}/live/{key}", gw.url("rtmps")),
        ),
        (
            PlayerKind::Ffmpeg,
            format!("{}/live/{key}", gw.url("rtmpt")),
        ),
        (
            PlayerKind::StaticFfmpeg,
            format!("{}/live/{key}", gw.url("rtmpe")),
        ),
    ];
    let mut procs: Vec<Proc> = players
        .iter()
        .enumerate()
        .map(|(i, (kind, url))| kind.start(url, &dir.path().join(format!("p{i}.flv"))))
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || gw.count_log(": play live/")
            >= 4),
        "the 4 players did not all start playing; log:\n{}",
        gw.log()
    );
    let mut publisher = publish(
        &peers().ffmpeg,
        &format!("rtmp://{}/live/{key}", proxy.addr),
        &src,
    );

    // While it plays: sessions open per transport, engine gauges, and the API.
    let want_open = [("rtmp", 2), ("rtmps", 1), ("rtmpt", 1), ("rtmpe", 1)];
    let mut last = String::new();
    let live = wait_until(Duration::from_secs(10), || {
        let m = Metrics::scrape(admin);
        let streams = get_json(admin, "/api/v1/streams");
        let s = &streams["streams"][0];
        last = format!("{streams}");
        want_open
            .iter()
            .all(|(t, n)| m.by_transport("rtmpgate_sessions_open", t) == *n)
            && m.value("rtmpgate_engine_players", None) == 4.0
            && m.value("rtmpgate_engine_publishers", None) == 1.0
            && s["players"] == 4
            && s["publisher"]["transport"] == "rtmp"
            && s["video_codec"] == "h264"
            && s["audio_codec"] == "aac"
            && s["bitrate_in_bps"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        live,
        "metrics/API never showed the live run; last streams: {last}"
    );
    let sessions = get_json(admin, "/api/v1/sessions?limit=2");
    assert_eq!(sessions["total"], 5, "{sessions}");
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 2);
    let next = sessions["next_after"].as_u64().expect("a next page");
    let rest = get_json(admin, &format!("/api/v1/sessions?after={next}"));
    assert_eq!(rest["sessions"].as_array().unwrap().len(), 3, "{rest}");
    let all: Vec<serde_json::Value> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["sessions"].as_array().unwrap())
        .cloned()
        .collect();
    let roles: Vec<&str> = all.iter().filter_map(|s| s["role"].as_str()).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "player").count(),
        4,
        "{all:?}"
    );
    assert_eq!(roles.iter().filter(|r| **r == "publisher").count(), 1);
    assert!(all.iter().all(|s| s["name"] == key && s["app"] == "live"));

    // Everyone finishes.
    publisher
        .wait_timeout(Duration::from_secs(30))
        .expect("publisher did not finish in 30 s");
    for p in &mut procs {
        assert!(
            p.wait_timeout(Duration::from_secs(20)).is_some(),
            "{} did not stop after the publisher left",
            p.name()
        );
    }
    let closed = wait_until(Duration::from_secs(10), || {
        let m = Metrics::scrape(admin);
        ["rtmp", "rtmps", "rtmpt", "rtmpts", "rtmpe", "rtmpte"]
            .iter()
            .all(|t| m.by_transport("rtmpgate_sessions_open", t) == 0)
    });
    assert!(closed, "sessions still open after every client left");
    // The proxy's last bytes are counted by its threads a moment after the sockets close.
    thread::sleep(Duration::from_millis(300));

    let m = Metrics::scrape(admin);
    for (t, n) in [
        ("rtmp", 2),
        ("rtmps", 1),
        ("rtmpt", 1),
        ("rtmpe", 1),
        ("rtmpts", 0),
        ("rtmpte", 0),
    ] {
        assert_eq!(
            m.by_transport("rtmpgate_sessions_total", t),
            n,
            "sessions over {t}"
        );
        // Every byte counted per session is in the transport's total, and no other.
        let (bin, bout, lines) = logged_bytes(&gw, t);
        assert_eq!(lines, n as usize, "close lines for {t}");
        assert_eq!(
            m.by_transport("rtmpgate_bytes_received_total", t),
            bin,
            "{t} in"
        );
        assert_eq!(
            m.by_transport("rtmpgate_bytes_sent_total", t),
            bout,
            "{t} out"
        );
        if n > 0 {
            assert!(bout > 100_000, "{t} players got only {bout} bytes");
        }
    }
    // Plain RTMP against the proxy's independent count (handshakes included on both sides).
    within_1pct(
        "rtmp bytes received",
        m.by_transport("rtmpgate_bytes_received_total", "rtmp"),
        proxy.up.load(Ordering::Relaxed),
    );
    within_1pct(
        "rtmp bytes sent",
        m.by_transport("rtmpgate_bytes_sent_total", "rtmp"),
        proxy.down.load(Ordering::Relaxed),
    );
    for (reason, n) in [
        ("unknown_protocol", 3.0),
        ("wrong_listener", 2.0),
        ("tls_handshake", 1.0),
        ("max_connections", 0.0),
        ("rtmpe_disabled", 0.0),
    ] {
        assert_eq!(
            m.value("rtmpgate_refused_total", Some(("reason", reason))),
            n,
            "refusals for {reason}"
        );
    }
    assert_eq!(m.value("rtmpgate_tls_handshakes_total", None), 1.0);
    // The one TLS client took the ECDSA dev chain, fully, signing where it was (a lone
    // handshake, an ECDSA key).
    assert!(
        m.value(
            "rtmpgate_tls_certificates_chosen_total",
            Some(("key", "ecdsa"))
        ) >= 1.0
    );
    assert_eq!(
        m.value(
            "rtmpgate_tls_certificates_chosen_total",
            Some(("key", "rsa"))
        ),
        0.0
    );
    assert_eq!(m.value("rtmpgate_tls_handshakes_resumed_total", None), 0.0);
    assert_eq!(
        m.value("rtmpgate_tls_handshake_steps_offloaded_total", None),
        0.0
    );
    assert_eq!(m.value("rtmpgate_rtmpe_handshakes_total", None), 1.0);
    assert!(m.value("rtmpgate_rtmpe_handshake_cpu_seconds_total", None) > 0.0);
    assert!(m.value("rtmpgate_rtmpt_sessions_opened_total", None) >= 1.0);
    // 6 refused + 2 through the proxy + rtmps + rtmpe + at least one tunnel connection.
    let accepted = m.value("rtmpgate_connections_accepted_total", None);
    assert!(accepted >= 11.0, "{accepted} connections accepted");
    assert!(m.value("process_resident_memory_bytes", None) > 1e6);
    assert!(m.value("process_open_fds", None) > 3.0);
}

#[test]
fn a_session_is_kicked_through_the_api() {
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&gw);
    let mut tcp = TcpStream::connect(gw.addr("rtmp")).unwrap();
    let c0c1 = c0c1();
    tcp.write_all(&c0c1).unwrap();
    let mut s0s1s2 = vec![0u8; 3073];
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.read_exact(&mut s0s1s2).unwrap();
    let list = get_json(admin, "/api/v1/sessions");
    assert_eq!(list["total"], 1, "{list}");
    let id = list["sessions"][0]["id"].as_u64().unwrap();
    assert_eq!(list["sessions"][0]["transport"], "rtmp");
    assert_eq!(
        http("DELETE", &format!("http://{admin}/api/v1/sessions/x"), None).0,
        400
    );
    let (code, body) = http(
        "DELETE",
        &format!("http://{admin}/api/v1/sessions/{id}"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    let mut buf = [0u8; 16];
    assert!(
        matches!(tcp.read(&mut buf), Ok(0)),
        "the kicked client's connection is closed"
    );
    assert!(gw.wait_log(
        &format!("session {id} kicked at the request of 127.0.0.1:"),
        Duration::from_secs(5)
    ));
    assert_eq!(
        http(
            "DELETE",
            &format!("http://{admin}/api/v1/sessions/{id}"),
            None
        )
        .0,
        404
    );
    let m = Metrics::scrape(admin);
    assert_eq!(m.value("rtmpgate_sessions_kicked_total", None), 1.0);
}

// ---------------------------------------------------------------------------------------------
// Health and readiness
// ---------------------------------------------------------------------------------------------

#[test]
fn readiness_follows_the_upstream_and_the_drain() {
    let mut nginx = Nginx::start();
    let port = nginx.port();
    let mut gw = Gateway::builder()
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &nginx.upstream(),
            "--drain-secs",
            "30",
        ])
        .start();
    let admin = admin_addr(&gw);
    assert_eq!(get(admin, "/healthz").0, 200);
    assert_eq!(get(admin, "/readyz"), (200, r#"{"ready":true}"#.into()));

    // Upstream down: the next client's connect fails and readiness says so.
    nginx.kill();
    let c0c1 = c0c1();
    send_and_expect_close(gw.addr("rtmp"), &c0c1);
    let (code, body) = get(admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("upstream"), "{body}");
    assert_eq!(get(admin, "/healthz").0, 200, "alive while not ready");
    let m = Metrics::scrape(admin);
    assert_eq!(m.value("rtmpgate_upstream_up", None), 0.0);
    assert!(m.value("rtmpgate_upstream_connect_failures_total", None) >= 1.0);

    // Back up: the admin probe notices without any client.
    let _nginx = Nginx::start_on_port(port);
    assert!(
        wait_until(Duration::from_secs(10), || get(admin, "/readyz").0 == 200),
        "readiness did not recover after the upstream came back"
    );

    // A session keeps the drain going; meanwhile readiness is 503 and health stays 200.
    let mut held = TcpStream::connect(gw.addr("rtmp")).unwrap();
    held.write_all(&c0c1).unwrap();
    let mut s0 = [0u8; 1];
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    held.read_exact(&mut s0)
        .expect("nginx-rtmp answers through the gateway");
    let m = Metrics::scrape(admin);
    assert!(m.value("rtmpgate_upstream_connect_duration_seconds_count", None) >= 1.0);
    gw.signal("TERM");
    assert!(gw.wait_log("no longer accepting", Duration::from_secs(5)));
    let (code, body) = get(admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(get(admin, "/healthz").0, 200);
    drop(held);
    assert!(
        gw.terminate(Duration::from_secs(15)).is_some(),
        "the gateway did not exit after its last session closed"
    );
}

// ---------------------------------------------------------------------------------------------
// Token and TLS
// ---------------------------------------------------------------------------------------------

#[test]
fn admin_on_a_public_address_needs_a_token() {
    let (status, log) = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .run_to_exit(Duration::from_secs(10));
    let status = status.expect("rtmpgate kept running without a token");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("--admin: 0.0.0.0:0") && log.contains("token"),
        "{log}"
    );
    assert!(
        !log.contains("listening on"),
        "no client listener may start: {log}"
    );

    // With a token from the file, it starts; /metrics and /api/ need it, health does not.
    let c = dev_certs();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .config(&format!(
            "[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"t0k3n-for-tests\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.chain.display(),
            c.key.display()
        ))
        .start();
    assert!(gw.wait_log("admin listener on https://", Duration::from_secs(5)));
    let port = admin_addr(&gw).port();
    let base = format!("https://127.0.0.1:{port}");
    assert_eq!(http("GET", &format!("{base}/metrics"), None).0, 401);
    assert_eq!(
        http("GET", &format!("{base}/api/v1/sessions"), Some("wrong")).0,
        401
    );
    assert_eq!(http("GET", &format!("{base}/healthz"), None).0, 200);
    let (code, body) = http("GET", &format!("{base}/metrics"), Some("t0k3n-for-tests"));
    assert_eq!(code, 200);
    assert!(body.contains("rtmpgate_connections_accepted_total"));
    assert_eq!(
        http("GET", &format!("http://127.0.0.1:{port}/healthz"), None).0,
        0
    );
}

#[test]
fn default_admin_port_taken_is_a_warning_and_configured_one_an_error() {
    // The default port: the gateway starts anyway (tests and a second gateway on one
    // machine). If another test's gateway holds it already, it is taken all the same.
    let held = TcpListener::bind(rtmpgate::admin::DEFAULT_ADMIN).ok();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .start();
    if held.is_some() {
        assert!(
            gw.wait_log("admin listener not started", Duration::from_secs(5)),
            "{}",
            gw.log()
        );
    }
    drop(gw);
    drop(held);

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", &addr])
        .run_to_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("cannot bind the admin listener"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// The status page in a real browser
// ---------------------------------------------------------------------------------------------

fn chromium() -> PathBuf {
    which("chromium")
        .or_else(|| which("chromium-browser"))
        .expect("chromium is missing (Debian package chromium); run scripts/install-peers.sh")
}

/// Runs headless Chromium on `url` with these extra arguments; returns stdout.
fn run_chromium(url: &str, extra: &[&str], profile: &Path) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(60));
    assert!(
        status.is_some(),
        "chromium did not finish within 60 s: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The text inside the element with this id in a dumped DOM.
fn element_text<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(rest[start..end].trim())
}

#[test]
fn status_page_shows_the_stream_and_its_players_in_chromium() {
    let gw = Gateway::builder()
        .rtmp_and_rtmps()
        .args(&["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&gw);
    let dir = temp_dir();
    let key = "status-page";
    let src = source_flv(20);
    let mut publisher = publish(
        &peers().ffmpeg,
        &format!("{}/live/{key}", gw.url("rtmp")),
        &src,
    );
    assert!(gw.wait_log(&format!("publish live/{key}"), Duration::from_secs(15)));
    let mut players: Vec<Proc> = [
        (PlayerKind::Ffmpeg, "rtmp"),
        (PlayerKind::Ffmpeg, "rtmps"),
        (PlayerKind::Ffmpeg, "rtmpt"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (kind, scheme))| {
        kind.start(
            &format!("{}/live/{key}", gw.url(scheme)),
            &dir.path().join(format!("p{i}.flv")),
        )
    })
    .collect();
    assert!(
        wait_until(Duration::from_secs(15), || {
            get_json(admin, "/api/v1/streams")["streams"][0]["players"] == 3
        }),
        "the API never showed 3 players"
    );

    // The chart's samples are kept by the server (every 2 s).
    assert!(
        wait_until(Duration::from_secs(5), || {
            get_json(admin, "/api/v1/summary")["history"]
                .as_array()
                .is_some_and(|h| h.len() >= 2)
        }),
        "no bandwidth history in /api/v1/summary"
    );
    let profile = temp_dir();
    let url = format!("http://{admin}/");
    // The page polls every 2 s; 5 s of virtual time covers the first polls and a rate.
    let dom = run_chromium(
        &url,
        &["--virtual-time-budget=5000", "--dump-dom"],
        profile.path(),
    );
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page never loaded its data:\n{dom}"
    );
    assert_eq!(element_text(&dom, "stream-count"), Some("1"), "{dom}");
    assert_eq!(element_text(&dom, "player-count"), Some("3"), "{dom}");
    assert!(
        dom.contains(&format!("data-stream=\"live/{key}\" data-players=\"3\"")),
        "the streams table does not show live/{key} with 3 players:\n{dom}"
    );
    assert!(
        dom.contains("data-transport=\"rtmps\" data-open=\"1\""),
        "{dom}"
    );

    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/status.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        &[
            "--virtual-time-budget=7000",
            "--window-size=1100,900",
            &format!("--screenshot={}", shot.display()),
        ],
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("status page screenshot: {}", shot.display());

    publisher.kill();
    for p in &mut players {
        p.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The API with many sessions open
// ---------------------------------------------------------------------------------------------

/// GET with curl, returning (status, seconds curl measured for the transfer, body length).
fn timed_get(url: &str) -> (u16, f64, usize) {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "--max-time", "5", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{time_total} %{size_download}", url]);
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out).into_owned();
    let mut parts = text.split_whitespace();
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let secs = parts
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(f64::MAX);
    let len = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, secs, len)
}

#[test]
fn api_answers_within_100_ms_with_2000_sessions_open() {
    const N: usize = 2000;
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config("[limits]\nmax_connections_per_ip = 5000\n")
        .env(
            "RUST_LOG",
            "info,rtmpgate::sessions=warn,rtmpgate::engine=warn",
        )
        .start();
    let admin = admin_addr(&gw);
    let addr = gw.addr("rtmp");
    // 2,000 RTMP clients through the handshake, then quiet (the engine waits for connect).
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        let mut t = TcpStream::connect(addr).unwrap();
        t.write_all(&c0c1()).unwrap();
        conns.push(t);
    }
    let mut s0s1s2 = vec![0u8; 3073];
    for t in &mut conns {
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        t.read_exact(&mut s0s1s2).unwrap();
        t.write_all(&s0s1s2[1..1537]).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            get_json(admin, "/api/v1/sessions?limit=1")["total"] == N
        }),
        "the API never listed {N} sessions"
    );
    for path in [
        "/api/v1/sessions",
        "/api/v1/sessions?limit=500",
        "/api/v1/summary",
        "/api/v1/streams",
        "/metrics",
    ] {
        // The best of three, so one scheduling hiccup on a loaded machine is not a failure
        // while a slow endpoint still is.
        let runs: Vec<(u16, f64, usize)> = (0..3)
            .map(|_| timed_get(&format!("http://{admin}{path}")))
            .collect();
        let best = runs.iter().map(|r| r.1).fold(f64::MAX, f64::min);
        println!(
            "{path} with {N} sessions: best {:.1} ms of {:?}, {} bytes",
            best * 1000.0,
            runs.iter()
                .map(|r| (r.1 * 1000.0).round())
                .collect::<Vec<_>>(),
            runs[0].2
        );
        assert!(runs.iter().all(|r| r.0 == 200), "{path}: {runs:?}");
        assert!(
            best < 0.100,
            "{path} took {:.1} ms with {N} sessions open",
            best * 1000.0
        );
    }
    let m = Metrics::scrape(admin);
    assert_eq!(m.by_transport("rtmpgate_sessions_open", "rtmp"), N as u64);
    drop(conns);
}

// ---------------------------------------------------------------------------------------------
// The access log
// ---------------------------------------------------------------------------------------------

/// Opens an RTMP session (handshake only) and returns the connection.
fn rtmp_handshake(addr: SocketAddr) -> TcpStream {
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(&c0c1()).unwrap();
    let mut s0s1s2 = vec![0u8; 3073];
    t.read_exact(&mut s0s1s2).unwrap();
    t
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn access_log_has_a_line_per_session_and_reopens_on_sighup() {
    let dir = temp_dir();
    let log = dir.path().join("access.log");
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!("[log]\naccess = \"{}\"\n", log.display()))
        .start();
    let admin = admin_addr(&gw);
    drop(rtmp_handshake(gw.addr("rtmp")));
    assert!(
        wait_until(Duration::from_secs(5), || json_lines(&log).len() == 1),
        "no access log line after the first session: {:?}",
        std::fs::read_to_string(&log)
    );
    let first = &json_lines(&log)[0];
    assert_eq!(first["transport"], "rtmp");
    assert_eq!(first["end"], "closed");
    assert_eq!(first["bytes_received"], 1537, "{first}");
    assert_eq!(first["bytes_sent"], 3073, "{first}");
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");

    // logrotate: move the file, SIGHUP, and the next line goes to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal("HUP");
    assert!(gw.wait_log("access log", Duration::from_secs(5)));
    assert!(
        wait_until(Duration::from_secs(5), || gw.log_contains("reopened")),
        "{}",
        gw.log()
    );
    let held = rtmp_handshake(gw.addr("rtmp"));
    let id = get_json(admin, "/api/v1/sessions")["sessions"][0]["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        http(
            "DELETE",
            &format!("http://{admin}/api/v1/sessions/{id}"),
            None
        )
        .0,
        200
    );
    assert!(
        wait_until(Duration::from_secs(5), || json_lines(&log).len() == 1),
        "no line in the reopened access log"
    );
    assert_eq!(json_lines(&log)[0]["end"], "kicked");
    assert_eq!(json_lines(&log)[0]["id"], id);
    assert_eq!(
        json_lines(&rotated).len(),
        1,
        "the rotated file got more lines"
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_through_the_api_applies_certificates_and_refuses_a_bad_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = temp_dir();
    let cert = dir.path().join("fullchain.pem");
    let key = dir.path().join("privkey.pem");
    std::fs::copy(root.join("certs/localhost.pem"), &cert).unwrap();
    std::fs::copy(root.join("certs/localhost.key"), &key).unwrap();
    let config = dir.path().join("rtmpgate.toml");
    let text = format!(
        "listen = [\"rtmps://127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        cert.display(),
        key.display()
    );
    std::fs::write(&config, &text).unwrap();
    let gw = Gateway::builder()
        .args(&["--config", config.to_str().unwrap()])
        .listeners(1)
        .start();
    let admin = admin_addr(&gw);
    let reload = || http("POST", &format!("http://{admin}/api/v1/reload"), None);

    let (code, body) = reload();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["applied"], serde_json::json!(["tls certificates"]), "{v}");
    assert_eq!(v["listeners"]["added"], serde_json::json!([]), "{v}");
    assert_eq!(v["restart_needed"], serde_json::json!([]), "{v}");
    assert!(gw.wait_log("reloaded TLS certificates", Duration::from_secs(5)));

    // A file that does not parse is refused whole, with the reason.
    std::fs::write(&config, "listen = [\n").unwrap();
    let (code, body) = reload();
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("rtmpgate.toml"), "{body}");
    assert!(gw.wait_log("keeping the current configuration", Duration::from_secs(5)));

    // A changed limit is applied; a changed log level needs a restart: said so.
    std::fs::write(
        &config,
        format!("log_level = \"debug\"\n{text}[limits]\nmax_connections_per_ip = 7\n"),
    )
    .unwrap();
    let (code, body) = reload();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["applied"].as_array().unwrap().contains(&"limits".into()),
        "{v}"
    );
    assert_eq!(v["restart_needed"], serde_json::json!(["log_level"]), "{v}");

    // Still serving TLS after all that.
    let mut cmd = Command::new(&peers().openssl);
    cmd.args([
        "s_client",
        "-connect",
        &gw.addr("rtmps").to_string(),
        "-brief",
    ])
    .stdin(std::process::Stdio::null());
    let (_, out, err) = run_capture(&mut cmd, Duration::from_secs(10));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    assert!(text.contains("CONNECTION ESTABLISHED"), "{text}");
}

#[test]
fn reloads_under_load_lose_no_packet_on_any_transport() {
    let gw = Gateway::builder()
        .rtmp_and_rtmps()
        .args(&["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&gw);
    let pid = gw.pid();
    let dir = temp_dir();
    let src_file = source_flv(5);
    let src = framemd5(&src_file);
    let key = "reload-under-load";
    let players: Vec<(PlayerKind, String)> = ["rtmp", "rtmps", "rtmpt", "rtmpts"]
        .iter()
        .map(|s| (PlayerKind::Ffmpeg, format!("{}/live/{key}", gw.url(s))))
        .collect();
    // Reloads every 300 ms while the media flows, through the API and SIGHUP in turn.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloads = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if i % 2 == 0 {
                    let (code, body) = http("POST", &format!("http://{admin}/api/v1/reload"), None);
                    if code == 200 {
                        ok += 1;
                    } else {
                        failed.push(format!("{code} {body}"));
                    }
                } else {
                    signal(pid, "HUP");
                }
                i += 1;
                thread::sleep(Duration::from_millis(300));
            }
            (ok, i, failed)
        })
    };
    let got = publish_and_play_when(
        dir.path(),
        &peers().ffmpeg,
        &format!("{}/live/{key}", gw.url("rtmp")),
        &src_file,
        &players,
        || gw.count_log(&format!(": play live/{key}")) >= 4,
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, total, failed) = reloads.join().unwrap();
    assert!(failed.is_empty(), "reloads refused: {failed:?}");
    let logged = gw.count_log("reloaded TLS certificates");
    println!("{total} reloads ({ok} through the API), {logged} logged");
    assert!(
        ok >= 4 && logged >= total as usize - 1,
        "too few reloads ran: {ok} API, {logged} logged"
    );
    for r in &got {
        r.assert_run_of(&src);
    }
}
