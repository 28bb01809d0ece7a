//! `[auth]` HTTP callbacks against a real HTTP service (Python's http.server, started by the
//! test): one auth service serves nginx-rtmp and rtmpgate unchanged (the same publisher and
//! player through both, the form fields each sent compared), and the callback's answers
//! allow, deny, rename and time out, with the client seeing the status, the other sessions
//! carrying on while one waits, positive answers cached, and `on_done` sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;

use std::thread;
use std::time::{Duration, Instant};

use auth_support::*;
use common::*;

fn gateway(config: &str) -> Gateway {
    let c = dev_certs();
    let (chain, key) = (c.chain.display().to_string(), c.key.display().to_string());
    Gateway::builder()
        .args(&[
            "--admin",
            "127.0.0.1:0",
            "--tls-cert",
            &chain,
            "--tls-key",
            &key,
            "--listen",
            "rtmp://127.0.0.1:0",
            "--listen",
            "rtmps://127.0.0.1:0",
            "--listen",
            "rtmpt://127.0.0.1:0",
        ])
        .config(config)
        .start()
}

/// The calls of one kind (`call=` value) in the order received.
fn of_call<'a>(calls: &'a [Call], call: &str) -> Vec<&'a Call> {
    calls
        .iter()
        .filter(|c| c.get("call") == Some(call))
        .collect()
}

/// The fields two servers' calls must agree on: every field, in order, except the ones
/// that differ by nature (`clientid`, `epoch`: per connection; `tcurl`: the server's port;
/// `flashver`: nginx-rtmp cuts it to 31 bytes; play's `start`/`duration`/`reset`: nginx
/// reports the client's values, rtmpgate RTMP's defaults).
fn comparable(c: &Call) -> Vec<(String, String)> {
    c.fields
        .iter()
        .map(|(k, v)| {
            let v = match k.as_str() {
                "clientid" | "epoch" | "start" | "duration" | "reset" => "*".to_owned(),
                "tcurl" => v
                    .split_once("/live")
                    .map_or(v.clone(), |(_, rest)| rest.to_owned()),
                "flashver" => v.chars().take(31).collect(),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[test]
fn one_auth_service_serves_nginx_rtmp_and_rtmpgate_unchanged() {
    let service = AuthService::start();
    let nginx = NginxWithCallbacks::start(&service);
    let gw = gateway(&format!(
        "[auth]\non_connect = \"{}\"\non_publish = \"{}\"\non_play = \"{}\"\non_done = \"{}\"\n",
        service.url("/gw/connect"),
        service.url("/gw/publish"),
        service.url("/gw/play"),
        service.url("/gw/done"),
    ));
    let servers = [
        (
            "nginx-rtmp",
            "/nginx/",
            format!("rtmp://127.0.0.1:{}", nginx.port),
        ),
        ("rtmpgate", "/gw/", gw.url("rtmp")),
    ];
    for (what, _, base) in &servers {
        // A query on the app (the tcUrl) and on the stream name: both reach the service.
        let publisher = format!("{base}/live?tcq=1/ok1?token=abc&x=y%20z");
        let src = source_flv(3);
        let dir = temp_dir();
        let mut publ = common::publish(&peers().ffmpeg, &publisher, &src);
        let mut player = play_rtmpdump(
            &format!("{base}/live/ok1?tok=5"),
            &dir.path().join("out.flv"),
        );
        assert!(
            publ.wait_timeout(Duration::from_secs(30))
                .is_some_and(|s| s.success()),
            "{what}: the allowed publisher failed: {}",
            publ.log()
        );
        // Its media is not what this test is about (auth_callback's other test and auth.rs
        // compare frames): stopped once the publisher has left.
        thread::sleep(Duration::from_millis(300));
        player.kill();
        // Denied by the service: both servers refuse the publisher.
        let out = ffmpeg_publish(&format!("{base}/live/deny1"));
        assert!(
            !out.ok(),
            "{what} let a publisher the service denied through"
        );
    }
    // nginx-rtmp sends on_done after the close: wait for both servers' done calls.
    assert!(
        wait_until(Duration::from_secs(10), || {
            ["/nginx/", "/gw/"]
                .iter()
                .all(|p| of_call(&service.calls_to(p), "done").len() >= 2)
        }),
        "on_done calls missing: {:#?}",
        service.calls()
    );
    let nginx_calls = service.calls_to("/nginx/");
    let gw_calls = service.calls_to("/gw/");
    for call in ["connect", "publish", "play", "done"] {
        let n = of_call(&nginx_calls, call);
        let g = of_call(&gw_calls, call);
        assert!(!n.is_empty(), "nginx-rtmp sent no {call} call");
        assert_eq!(
            n.len(),
            g.len(),
            "{call} calls: nginx {n:#?}\nrtmpgate {g:#?}"
        );
        // Compared as sets: the two done notices (publisher, player) may arrive in either
        // order from either server.
        let mut nf: Vec<_> = n.iter().map(|c| comparable(c)).collect();
        let mut gf: Vec<_> = g.iter().map(|c| comparable(c)).collect();
        nf.sort();
        gf.sort();
        for (a, b) in nf.iter().zip(&gf) {
            assert_eq!(
                a, b,
                "the {call} callbacks differ:\nnginx-rtmp {a:#?}\nrtmpgate {b:#?}"
            );
        }
        for c in &g {
            assert_eq!(c.content_type, "application/x-www-form-urlencoded");
        }
        eprintln!(
            "{call}: the same {} fields from both",
            comparable(g[0]).len()
        );
    }
    // The fields the issue names are there.
    let p = of_call(&gw_calls, "publish")[0];
    for k in [
        "call", "addr", "app", "name", "tcurl", "swfurl", "pageurl", "flashver",
    ] {
        assert!(p.get(k).is_some(), "no {k} in {p:#?}");
    }
    assert_eq!(p.get("token"), Some("abc"));
    assert_eq!(p.get("x"), Some("y z"));
    assert!(
        of_call(&gw_calls, "connect")
            .iter()
            .any(|c| c.get("tcq") == Some("1")),
        "the tcUrl's query did not reach on_connect: {gw_calls:#?}"
    );
}

#[test]
fn callback_allows_denies_renames_times_out_and_caches() {
    let service = AuthService::start();
    let gw = gateway(&format!(
        "[auth]\non_publish = \"{p}\"\non_play = \"{pl}\"\non_done = \"{d}\"\n\
         callback_timeout_ms = 1000\ncallback_cache_secs = 30\n\
         [auth.app.down]\non_publish = \"http://127.0.0.1:1/auth\"\n",
        p = service.url("/gw/publish"),
        pl = service.url("/gw/play"),
        d = service.url("/gw/done"),
    ));
    let admin = admin_addr(&gw);
    let (rtmp, rtmps, rtmpt) = (gw.url("rtmp"), gw.url("rtmps"), gw.url("rtmpt"));

    // A slow service: the publisher is denied after the timeout (not the service's 4 s),
    // while a publisher and players on other sessions are served every frame.
    let slow_url = format!("{rtmp}/live/slow1");
    let slow = thread::spawn(move || {
        let t = Instant::now();
        let out = ffmpeg_publish(&slow_url);
        (out, t.elapsed())
    });
    // Renamed by the service (302 Location: renamed): published over RTMPS as rename1, played
    // as live/renamed over RTMP and the RTMPT tunnel.
    let dir = temp_dir();
    let src = source_flv(4);
    let want = framemd5(&src);
    let got = publish_and_play(
        dir.path(),
        &peers().ffmpeg,
        &format!("{rtmps}/live/rename1"),
        &src,
        &[
            (PlayerKind::Rtmpdump, format!("{rtmp}/live/renamed")),
            (PlayerKind::Ffmpeg, format!("{rtmpt}/live/renamed")),
        ],
    );
    for r in &got {
        r.assert_run_of(&want);
    }
    let (slow_out, took) = slow.join().unwrap();
    slow_out.assert_denied(
        "a callback slower than the timeout",
        "publish denied (callback_timeout)",
    );
    assert!(
        took < Duration::from_millis(4_000),
        "the slow callback held the publisher {took:?}: the 1 s timeout did not bound it"
    );
    assert!(
        gw.log().contains("publish live/renamed"),
        "the renamed stream was not published: {}",
        gw.log()
    );

    ffmpeg_publish(&format!("{rtmpt}/live/deny1"))
        .assert_denied("denied by the service (403)", "NetStream.Publish.BadName");
    rtmpdump_play(&format!("{rtmp}/live/deny2"))
        .assert_denied("play denied by the service", "NetStream.Play.Failed");
    ffmpeg_publish(&format!("{rtmp}/down/x"))
        .assert_denied("the service unreachable", "publish denied (callback_error)");

    // Positive answers are cached: three plays of one stream, one call.
    let before = of_call(&service.calls(), "play").len();
    for _ in 0..3 {
        let out = rtmpdump_play_for(&format!("{rtmp}/live/cached1?k=v"), 1);
        // No publisher: rtmpdump gives up after its timeout, but it was allowed to play.
        assert!(
            !out.stderr.contains("NetStream.Play.Failed"),
            "an allowed play was refused: {}",
            out.stderr
        );
    }
    let plays: Vec<Call> = service
        .calls()
        .into_iter()
        .filter(|c| c.get("call") == Some("play"))
        .skip(before)
        .collect();
    assert_eq!(
        plays.len(),
        1,
        "cached answers were asked again: {plays:#?}"
    );

    // on_done for the renamed publisher and its players.
    assert!(
        wait_until(Duration::from_secs(5), || {
            of_call(&service.calls(), "done")
                .iter()
                .any(|c| c.get("name") == Some("rename1"))
        }),
        "no on_done for the publisher: {:#?}",
        service.calls()
    );

    let m = metrics_text(admin);
    for (action, reason, n) in [
        ("publish", "callback_timeout", 1),
        ("publish", "callback_denied", 1),
        ("publish", "callback_error", 1),
        ("play", "callback_denied", 1),
    ] {
        assert_eq!(denied(&m, action, reason), n, "{action}/{reason}:\n{m}");
    }
}

/// `limits.max_auth_callbacks = 1`: three publishers asked about at once, the service slower
/// than the timeout: it never sees two calls at once (each starts at least a timeout after
/// the one before), and every publisher is denied (timed out, or no slot in time).
#[test]
fn callbacks_in_flight_are_bounded() {
    let service = AuthService::start();
    let gw = gateway(&format!(
        "[limits]\nmax_auth_callbacks = 1\n[auth]\non_publish = \"{}\"\ncallback_timeout_ms = 1000\n",
        service.url("/gw/publish"),
    ));
    let admin = admin_addr(&gw);
    let rtmp = gw.url("rtmp");
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let url = format!("{rtmp}/live/slow{i}");
            thread::spawn(move || ffmpeg_publish(&url))
        })
        .collect();
    for c in clients {
        let out = c.join().unwrap();
        out.assert_denied(
            "a publisher behind a slow service",
            "NetStream.Publish.BadName",
        );
    }
    // Each call's span at the service: from its arrival to the gateway hanging up.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let c = service.calls_to("/gw/");
            let ends = c.iter().filter(|c| c.path.ends_with("#end")).count();
            ends * 2 == c.len()
        }),
        "the service did not see every call end: {:#?}",
        service.calls()
    );
    let all = service.calls_to("/gw/");
    let calls: Vec<&Call> = all.iter().filter(|c| !c.path.ends_with("#end")).collect();
    let mut spans: Vec<(f64, f64)> = all
        .iter()
        .filter(|c| c.path.ends_with("#end"))
        .map(|c| (c.start, c.t))
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(!calls.is_empty() && calls.len() <= 3, "{all:#?}");
    for w in spans.windows(2) {
        // The next call comes only after the one before was given up. The service notes
        // a hang-up when its thread wakes, late on a loaded machine: 0.3 s allowed (without
        // the bound the calls overlap by the whole 1 s timeout).
        assert!(
            w[1].0 >= w[0].1 - 0.3,
            "two callbacks in flight at once with one slot: {spans:?}"
        );
        // Held for the timeout, not the service's 4 s.
        assert!(
            w[0].1 - w[0].0 < 2.0,
            "a callback outlived its timeout: {spans:?}"
        );
    }
    let m = metrics_text(admin);
    let timeout = denied(&m, "publish", "callback_timeout");
    let busy = denied(&m, "publish", "callback_busy");
    eprintln!(
        "3 publishers, 1 slot: {} calls, {timeout} timed out, {busy} found no slot",
        calls.len()
    );
    assert_eq!(timeout + busy, 3, "{m}");
    // Every call the service saw timed out. Not the converse: a publisher that got the slot
    // just before its own deadline times out before its request reaches the service (seen
    // once under load: 3 timed out, 2 calls seen), so the counts need not be equal.
    assert!(calls.len() <= timeout as usize, "{m}");
}
