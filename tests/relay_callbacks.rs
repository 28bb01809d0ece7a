//! rtmpgate's callbacks and nginx-rtmp's own side by side behind the relay: app `live` is
//! routed to an nginx-rtmp with `on_publish` (nginx asks the auth service itself, rtmpgate
//! asks nothing for that app), app `gw` to a plain nginx-rtmp with rtmpgate's
//! `[auth.app.gw] on_publish` asking the same service (a real Python http.server). The same
//! stream names and token arguments get the same answers on both: allowed publishes arrive
//! frame for frame (played straight from the backend and through the gateway), denied ones
//! fail the way each server denies (nginx-rtmp closes the connection; rtmpgate answers
//! `NetStream.Publish.BadName` with the reason), and each call reaches the service once,
//! from the server that owns the decision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;
mod relay_support;

use auth_support::*;
use common::*;
use relay_support::{RawClient, StatNginx};

#[test]
fn nginx_on_publish_and_rtmpgate_auth_coexist_behind_the_relay() {
    let p = peers();
    let service = AuthService::start();
    let with_cb = StatNginx::start_with(
        &["live"],
        None,
        &format!("on_publish {};", service.url("/nginx/publish")),
    );
    let plain = StatNginx::start(&["gw"]);
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\n\n\
             [[upstreams]]\nname = \"nginx-auth\"\napps = [\"live\"]\nbackends = [\"{}\"]\n\n\
             [[upstreams]]\nname = \"gateway-auth\"\napps = [\"gw\"]\nbackends = [\"{}\"]\n\n\
             [auth.app.gw]\non_publish = \"{}\"\n",
            with_cb.upstream(),
            plain.upstream(),
            service.url("/gw/publish"),
        ))
        .start();
    let admin = admin_addr(&gw);
    let base = gw.url("rtmp");
    let src_file = source_flv(3);
    let src = framemd5(&src_file);
    let dir = temp_dir();

    // Allowed by nginx-rtmp's on_publish: frames exact on nginx and through the gateway.
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{base}/live/ok1?token=good"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, with_cb.url("live/ok1")),
            (PlayerKind::Rtmpdump, format!("{base}/live/ok1")),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    // Allowed by rtmpgate's on_publish: frames exact on the plain nginx and through the
    // gateway.
    let dir2 = temp_dir();
    let got = publish_and_play(
        dir2.path(),
        &p.ffmpeg,
        &format!("{base}/gw/ok2?token=good"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, plain.url("gw/ok2")),
            (PlayerKind::Rtmpdump, format!("{base}/gw/ok2")),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    // Denied by nginx-rtmp: it closes the connection, through the gateway as straight.
    let via_gw = ffmpeg_publish(&format!("{base}/live/deny1?token=good"));
    let direct = ffmpeg_publish(&with_cb.url("live/deny3?token=good"));
    eprintln!(
        "nginx's denial through the gateway: {:?} {}\nstraight to nginx: {:?} {}",
        via_gw.status,
        via_gw.stderr.trim(),
        direct.status,
        direct.stderr.trim()
    );
    for (what, out) in [("through the gateway", &via_gw), ("straight", &direct)] {
        assert!(
            !out.ok() && out.status.is_some(),
            "{what}: nginx-rtmp's on_publish denial did not end the publisher: {:?}\n{}",
            out.status,
            out.stderr
        );
        assert!(
            !out.stderr.contains("NetStream.Publish.BadName"),
            "{what}: rtmpgate answered for nginx-rtmp's app:\n{}",
            out.stderr
        );
    }
    // Denied by rtmpgate: the status and the reason.
    ffmpeg_publish(&format!("{base}/gw/deny2?token=good")).assert_denied(
        "rtmpgate's on_publish denial",
        "Server error: NetStream.Publish.BadName: publish denied (callback_denied): the \
         authorization server refused",
    );
    // The exact status each way, seen by a raw client: rtmpgate's BadName for its own app,
    // nginx-rtmp's hang-up (no status) for nginx's app, through the gateway as straight.
    let raw_publish = |addr: std::net::SocketAddr, app: &str, name: &str| {
        RawClient::connect(addr, app)
            .and_then(|mut c| c.publish(name))
            .unwrap_or_else(|e| e)
    };
    let gw_addr = gw.addr("rtmp");
    let gw_denial = raw_publish(gw_addr, "gw", "deny4?token=good");
    assert!(
        gw_denial
            .starts_with("onStatus NetStream.Publish.BadName NetStream.Publish.BadName: publish denied (callback_denied): the authorization server refused"),
        "{gw_denial}"
    );
    let nginx_via_gw = raw_publish(gw_addr, "live", "deny5?token=good");
    let nginx_direct = raw_publish(with_cb.addr(), "live", "deny6?token=good");
    eprintln!("raw publishers denied: rtmpgate: {gw_denial}; nginx-rtmp through the gateway: {nginx_via_gw}; straight: {nginx_direct}");
    assert_eq!(nginx_via_gw, "closed by the server");
    assert_eq!(nginx_direct, "closed by the server");
    assert_eq!(
        raw_publish(gw_addr, "live", "ok7?token=good"),
        "onStatus NetStream.Publish.Start Start publishing"
    );
    assert!(
        gw.wait_log("publish 'deny2", std::time::Duration::from_secs(5)),
        "{}",
        gw.log()
    );

    // Each decision was asked once, by its owner, with the stream name and the token.
    let names = |path: &str| -> Vec<(String, String)> {
        service
            .calls_to(path)
            .iter()
            .map(|c| {
                (
                    c.get("name").unwrap_or_default().to_owned(),
                    c.get("token").unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let pair = |n: &str| (n.to_owned(), "good".to_owned());
    assert_eq!(
        names("/nginx/publish"),
        [
            pair("ok1"),
            pair("deny1"),
            pair("deny3"),
            pair("deny5"),
            pair("deny6"),
            pair("ok7")
        ]
    );
    assert_eq!(
        names("/gw/publish"),
        [pair("ok2"), pair("deny2"), pair("deny4")]
    );
    let m = metrics_text(admin);
    assert_eq!(denied(&m, "publish", "callback_denied"), 2, "{m}");
}
