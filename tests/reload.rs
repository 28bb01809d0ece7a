//! Hot reload with changes, against real peers: while ffmpeg publishes to the engine and
//! ffmpeg and rtmpdump play over RTMP, RTMPS, RTMPT and RTMPTS, the configuration is
//! reloaded several times with a listener added and one removed, a limit changed, the
//! certificates swapped, and with an invalid file and a port that cannot be bound in
//! between. Every player must get every packet (framemd5, whole runs); the removed listener
//! must refuse new connections while the session it accepted carries on; the added one must
//! accept; a refused reload must change nothing. Smaller tests check that a changed limit,
//! the admin token and the upstream apply to what starts after the reload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

/// An HTTP request with curl (bounded to 5 s): (status, body). Status 0: no answer.
fn http(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "--max-time", "5", "-X", method]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd.args(["-w", "\n%{http_code}", url]);
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn reload(admin: SocketAddr, token: Option<&str>) -> (u16, String) {
    http("POST", &format!("http://{admin}/api/v1/reload"), token)
}

/// True if a TCP connection to `port` on loopback is accepted within 2 s.
fn accepts(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// The config file text: these listeners, this certificate, the admin listener on an
/// ephemeral port, and `extra` TOML at the end.
fn config_text(listen: &[String], cert: &Path, key: &Path, extra: &str) -> String {
    let list: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
    format!(
        "listen = [{}]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}",
        list.join(", "),
        cert.display(),
        key.display()
    )
}

/// One parsed scrape of /metrics (prometheus-parse, the text format's Rust parser).
fn scrape(admin: SocketAddr) -> Vec<prometheus_parse::Sample> {
    scrape_with(admin, None)
}

fn scrape_with(admin: SocketAddr, token: Option<&str>) -> Vec<prometheus_parse::Sample> {
    let (code, body) = http("GET", &format!("http://{admin}/metrics"), token);
    assert_eq!(code, 200, "/metrics: {body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus text parser rejected /metrics")
        .samples
}

fn metric(samples: &[prometheus_parse::Sample], name: &str, label: (&str, &str)) -> f64 {
    samples
        .iter()
        .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("{name} {label:?} is not in /metrics"))
}

#[test]
fn reloads_with_changes_under_load_lose_no_packet_on_any_transport() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = temp_dir();
    let cert = files.path().join("fullchain.pem");
    let key = files.path().join("privkey.pem");
    let use_dev_cert = || {
        std::fs::copy(root.join("certs/localhost.pem"), &cert).unwrap();
        std::fs::copy(root.join("certs/localhost.key"), &key).unwrap();
    };
    let use_test_cert = || {
        std::fs::copy(&dev_certs().chain, &cert).unwrap();
        std::fs::copy(&dev_certs().key, &key).unwrap();
    };
    use_dev_cert();
    // Two fixed ports: B is configured at start and removed; C is added.
    let (port_b, port_c) = (free_port(), free_port());
    let base = [
        "rtmp://127.0.0.1:0".to_string(),
        "rtmps://127.0.0.1:0".into(),
    ];
    let with = |port: u16| -> Vec<String> {
        let mut l = base.to_vec();
        l.push(format!("rtmp://127.0.0.1:{port}"));
        l
    };
    let admin_toml = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let gw = Gateway::builder()
        .config(&config_text(&with(port_b), &cert, &key, admin_toml))
        .listeners(3)
        .start();
    let config = gw.dir().join("rtmpgate.toml");
    let admin = admin_addr(&gw);
    assert!(accepts(port_b) && !accepts(port_c));

    let src_file = source_flv(6);
    let src = framemd5(&src_file);
    let key_name = "reload-with-changes";
    let mut players: Vec<(PlayerKind, String)> = ["rtmp", "rtmps", "rtmpt", "rtmpts"]
        .iter()
        .map(|s| (PlayerKind::Ffmpeg, format!("{}/live/{key_name}", gw.url(s))))
        .collect();
    // This one's listener is removed under it: its session must carry on.
    players.push((
        PlayerKind::Rtmpdump,
        format!("rtmp://127.0.0.1:{port_b}/live/{key_name}"),
    ));

    // A port the gateway cannot bind: a reload adding it is refused whole.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();

    let stop = AtomicBool::new(false);
    let (with_b, with_c) = (with(port_b), with(port_c));
    let mut with_b_and_held = with(port_b);
    with_b_and_held.push(format!("rtmp://127.0.0.1:{held_port}"));
    let playing = || gw.count_log(&format!(": play live/{key_name}")) >= players.len();
    let write = |text: String| std::fs::write(&config, text).unwrap();
    let ((cycles, failed), got) = thread::scope(|scope| {
        let reloads = scope.spawn(|| {
            let mut failed: Vec<String> = Vec::new();
            let mut check = |ok: bool, what: String| {
                if !ok {
                    failed.push(what);
                }
            };
            // Once every player plays (the rtmpdump one through B), until the media is over.
            wait_until(START_TIMEOUT, || playing() || stop.load(Ordering::Relaxed));
            let mut cycles = 0u32;
            while !stop.load(Ordering::Relaxed) && cycles < 100 {
                let step = format!("cycle {cycles}");
                // 1. C added, B removed, the test CA's certificate, a changed limit.
                use_test_cert();
                let extra = format!(
                    "{admin_toml}[limits]\nmax_connections_per_ip = {}\n",
                    900 + cycles
                );
                write(config_text(&with_c, &cert, &key, &extra));
                let (code, body) = reload(admin, None);
                check(code == 200, format!("{step}: swap to C: {code} {body}"));
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let applied = v["applied"].to_string();
                check(
                    ["listeners", "tls certificates", "limits"]
                        .iter()
                        .all(|a| applied.contains(a)),
                    format!("{step}: applied {applied}"),
                );
                check(
                    v["listeners"]["added"]
                        == serde_json::json!([format!("rtmp://127.0.0.1:{port_c}")])
                        && v["listeners"]["removed"]
                            == serde_json::json!([format!("rtmp://127.0.0.1:{port_b}")]),
                    format!("{step}: listeners {}", v["listeners"]),
                );
                check(
                    accepts(port_c),
                    format!("{step}: the added listener refuses"),
                );
                check(
                    !accepts(port_b),
                    format!("{step}: the removed listener accepts"),
                );

                // 2. A file that does not validate: refused whole, with the reason.
                write(format!(
                    "{}[limits]\nmax_connections = \"many\"\n",
                    config_text(&with_b, &cert, &key, admin_toml)
                ));
                let (code, body) = reload(admin, None);
                check(
                    code == 422 && body.contains("max_connections"),
                    format!("{step}: invalid config: {code} {body}"),
                );
                check(
                    accepts(port_c) && !accepts(port_b),
                    format!("{step}: an invalid config changed the listeners"),
                );

                // 3. A listener that cannot bind: refused whole, B stays unbound.
                write(config_text(&with_b_and_held, &cert, &key, admin_toml));
                let (code, body) = reload(admin, None);
                check(
                    code == 422 && body.contains(&held_port.to_string()),
                    format!("{step}: bind failure: {code} {body}"),
                );
                check(
                    accepts(port_c) && !accepts(port_b),
                    format!("{step}: a failed bind changed the listeners"),
                );

                // 4. Back: B again, C removed, the dev certificate.
                use_dev_cert();
                write(config_text(&with_b, &cert, &key, admin_toml));
                let (code, body) = reload(admin, None);
                check(code == 200, format!("{step}: back to B: {code} {body}"));
                check(
                    accepts(port_b) && !accepts(port_c),
                    format!("{step}: back to B: listeners"),
                );
                cycles += 1;
                // Spread over the whole run rather than bunched at its start.
                thread::sleep(Duration::from_millis(150));
            }
            (cycles, failed)
        });
        let dir = temp_dir();
        let got = publish_and_play_when(
            dir.path(),
            &peers().ffmpeg,
            &format!("{}/live/{key_name}", gw.url("rtmp")),
            &src_file,
            &players,
            playing,
        );
        stop.store(true, Ordering::Relaxed);
        (reloads.join().unwrap(), got)
    });
    println!("{cycles} reload cycles (4 reloads each) during the run");
    assert!(failed.is_empty(), "reload checks failed: {failed:#?}");
    assert!(
        cycles >= 2,
        "only {cycles} reload cycles ran during the media"
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    drop(held);

    // Sessions by listener: the rtmpdump player came in through B, which is gone by now.
    let m = scrape(admin);
    let b_label = format!("rtmp://127.0.0.1:{port_b}");
    assert!(
        metric(
            &m,
            "rtmpgate_listener_sessions_total",
            ("listener", &b_label)
        ) >= 1.0,
        "no session counted on {b_label}"
    );
    assert!(
        metric(
            &m,
            "rtmpgate_listener_bytes_sent_total",
            ("listener", &b_label)
        ) > 0.0
    );
    let tls_label = format!("rtmps://{}", gw.addr("rtmps"));
    assert!(
        metric(
            &m,
            "rtmpgate_listener_sessions_total",
            ("listener", &tls_label)
        ) >= 2.0,
        "the rtmps and rtmpts players were not counted on {tls_label}"
    );
}

/// Sends C0 and C1 (a plain RTMP handshake start) on a new connection to the gateway.
fn rtmp_client(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c0c1 = vec![0u8; 1 + 1536];
    c0c1[0] = 3;
    c.write_all(&c0c1).unwrap();
    c
}

/// True if the gateway closed `c` (EOF or reset) within its read timeout.
fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(c.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn a_reload_applies_upstream_limits_and_token_to_what_starts_after_it() {
    let backend = |name: &str| {
        let b = Gateway::start(&["--listen", "rtmp://127.0.0.1:0", "--admin", "off"]);
        eprintln!("backend {name} on {}", b.addr("rtmp"));
        b
    };
    let (one, two) = (backend("one"), backend("two"));
    let text = |upstream: &Gateway, extra: &str| {
        format!(
            "listen = [\"rtmp://127.0.0.1:0\"]\n{extra}[upstream]\nurl = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            upstream.url("rtmp")
        )
    };
    let gw = Gateway::builder()
        .config(&text(&one, ""))
        .listeners(1)
        .start();
    let config = gw.dir().join("rtmpgate.toml");
    let admin = admin_addr(&gw);
    let port = gw.addr("rtmp").port();

    // A 2 KiB RTMPT body to an unknown session: 404 under the default max_http_body.
    let body = gw.dir().join("body.bin");
    std::fs::write(&body, vec![7u8; 2048]).unwrap();
    let tunnel_send = || {
        let mut cmd = Command::new(&peers().curl);
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", "Content-Type: application/x-fcs", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("http://127.0.0.1:{port}/send/no-such-session/1"));
        let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
        String::from_utf8_lossy(&out).trim().to_string()
    };
    assert_eq!(tunnel_send(), "404");

    // A relayed session to backend one, open across the reload.
    let mut first = rtmp_client(port);
    assert!(one.wait_log("session opened", Duration::from_secs(10)));

    std::fs::write(
        &config,
        text(&two, "[limits]\nmax_connections_per_ip = 2\n")
            .replace("[admin]\n", "[admin]\ntoken = \"reload-test-token\"\n"),
    )
    .unwrap();
    let (code, body) = reload(admin, None);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for what in ["limits", "upstream", "admin token"] {
        assert!(
            v["applied"].as_array().unwrap().contains(&what.into()),
            "{what} not applied: {v}"
        );
    }

    // The new session goes to backend two; the open one still talks to backend one (its
    // handshake answer, S0 S1 S2, comes through after the reload).
    let second = rtmp_client(port);
    assert!(two.wait_log("session opened", Duration::from_secs(10)));
    let mut s0s1s2 = vec![0u8; 1 + 1536 + 1536];
    first.read_exact(&mut s0s1s2).unwrap();
    assert_eq!(s0s1s2[0], 3, "S0 from backend one");
    assert_eq!(one.count_log("session opened"), 1);

    // The lowered limit: two connections from 127.0.0.1 are open, the third is refused.
    let mut third = rtmp_client(port);
    assert!(
        closed(&mut third),
        "a third connection was admitted past max_connections_per_ip = 2"
    );
    let m = scrape_with(admin, Some("reload-test-token"));
    assert!(
        metric(
            &m,
            "rtmpgate_refused_total",
            ("reason", "max_connections_per_ip")
        ) >= 1.0
    );

    // The new token guards the API from now on.
    let sessions = format!("http://{admin}/api/v1/sessions");
    assert_eq!(http("GET", &sessions, None).0, 401);
    assert_eq!(http("GET", &sessions, Some("reload-test-token")).0, 200);

    // Raised again: a third connection is served. A tunnel limit applies to the next
    // request.
    std::fs::write(&config, text(&two, "[limits]\nmax_http_body = 1024\n")).unwrap();
    let (code, body) = reload(admin, Some("reload-test-token"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        tunnel_send(),
        "413",
        "max_http_body = 1024 not applied to the tunnel"
    );
    let mut third = rtmp_client(port);
    let mut s0 = [0u8; 1];
    third.read_exact(&mut s0).unwrap();
    assert_eq!(s0[0], 3);

    // SIGHUP does the same: a listener added by a signal accepts.
    let added = free_port();
    std::fs::write(
        &config,
        text(&two, "[limits]\nmax_http_body = 1024\n").replace(
            "listen = [\"rtmp://127.0.0.1:0\"]",
            &format!("listen = [\"rtmp://127.0.0.1:0\", \"rtmp://127.0.0.1:{added}\"]"),
        ),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        gw.wait_log(
            &format!("listening on rtmp://127.0.0.1:{added}"),
            Duration::from_secs(10)
        ),
        "SIGHUP did not add the listener"
    );
    assert!(accepts(added));
    drop((first, second, third));
}
