//! `[auth]` in front of an nginx-rtmp backend (the relay in connect mode): a publisher with a
//! signed token over rtmps reaches nginx-rtmp frame for frame, players with the token over
//! rtmp, rtmpt and rtmpts get every frame through the gateway (and straight from nginx); a
//! missing, wrong or expired token, a denied address and the HTTP callback's deny, rename and
//! timeout are each answered with their reason before nginx-rtmp sees the publish or play,
//! and counted. The denied clients come and go while the allowed stream runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;
mod relay_support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use auth_support::*;
use common::*;
use relay_support::StatNginx;

const SECRET: &str = "relay-secret-for-tests-0123456789";

/// `rtmpgate token` with the secret in the environment.
fn mint(app: &str, stream: &str, ttl: i64) -> String {
    let mut cmd = Command::new(rtmpgate_bin());
    cmd.args(["token", "--app", app, "--stream", stream])
        .args(["--ttl", &ttl.to_string()])
        .env("RTMPGATE_TOKEN_SECRET", SECRET);
    String::from_utf8(run_ok(&mut cmd, Duration::from_secs(10)))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn tokens_addresses_and_callbacks_through_the_relay() {
    let service = AuthService::start();
    let backend = StatNginx::start(&["tok", "closed", "cb"]);
    let c = dev_certs();
    let (chain, key) = (c.chain.display().to_string(), c.key.display().to_string());
    let gw = Gateway::builder()
        .args(&[
            "--admin",
            "127.0.0.1:0",
            "--tls-cert",
            &chain,
            "--tls-key",
            &key,
        ])
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--listen",
            "rtmps://127.0.0.1:0",
        ])
        .args(&["--upstream", &backend.upstream()])
        .config(&format!(
            "[auth]\ntoken_secret = \"{SECRET}\"\ncallback_timeout_ms = 1000\n\n\
             [auth.app.tok]\ntoken_required = [\"publish\", \"play\"]\n\n\
             [auth.app.closed]\ndeny_publish = [\"127.0.0.0/8\"]\n\n\
             [auth.app.cb]\non_publish = \"{}\"\n",
            service.url("/gw/publish")
        ))
        .start();
    assert!(gw.log_contains("relay = connect"), "{}", gw.log());
    let admin = admin_addr(&gw);
    let (rtmp, rtmps) = (gw.url("rtmp"), gw.url("rtmps"));
    let (rtmpt, rtmpts) = (gw.url("rtmpt"), gw.url("rtmpts"));

    // Denied clients one after another on a thread, while the allowed stream runs.
    let (r1, r2, r3) = (rtmp.clone(), rtmpt.clone(), rtmps.clone());
    let denials = thread::spawn(move || {
        let no_token = ffmpeg_publish(&format!("{r3}/tok/cam"));
        let other = mint("tok", "other", 600).replacen("other", "cam", 1);
        let wrong = ffmpeg_publish(&format!("{r1}/tok/{other}"));
        let expired = ffmpeg_publish(&format!("{r2}/tok/{}", mint("tok", "cam", -60)));
        let address = ffmpeg_publish(&format!("{r1}/closed/x"));
        let play_no_token = rtmpdump_play(&format!("{r1}/tok/cam"));
        let cb_deny = ffmpeg_publish(&format!("{r1}/cb/deny1"));
        let cb_rename = ffmpeg_publish(&format!("{r1}/cb/rename1"));
        let t = Instant::now();
        let cb_slow = ffmpeg_publish(&format!("{r1}/cb/slow1"));
        let slow_took = t.elapsed();
        let cb_ok = ffmpeg_publish(&format!("{r1}/cb/ok1"));
        (
            [
                // The engine's wording (one function words both): the status code, the
                // action, the reason's label, what failed and what to do.
                (
                    "no token over rtmps",
                    no_token,
                    "Server error: NetStream.Publish.BadName: publish denied (token_missing): \
                     a token is required",
                ),
                (
                    "another stream's token",
                    wrong,
                    "publish denied (token_invalid): the token is not valid for this stream",
                ),
                (
                    "an expired token over rtmpt",
                    expired,
                    "publish denied (token_expired): the token has expired",
                ),
                (
                    "a denied address",
                    address,
                    "publish denied (address): your address is not allowed to do this",
                ),
                (
                    "rtmpdump playing without a token",
                    play_no_token,
                    "NetStream.Play.Failed",
                ),
                (
                    "the callback's 403",
                    cb_deny,
                    "publish denied (callback_denied): the authorization server refused",
                ),
                // A relay cannot rename (it forwards the client's bytes): the client is told
                // so and what to do instead.
                (
                    "the callback's 302 (a relay cannot rename)",
                    cb_rename,
                    "publish denied (rename_unsupported): the authorization server renamed the \
                     stream, which the relay cannot do",
                ),
                (
                    "the callback's timeout",
                    cb_slow,
                    "publish denied (callback_timeout): the authorization server did not \
                     answer in time",
                ),
            ],
            slow_took,
            cb_ok,
        )
    });

    // Allowed: the publisher over rtmps with its token; players with theirs over rtmp
    // (rtmpdump), rtmpt and rtmpts (ffmpeg), and straight from nginx-rtmp (rtmpdump).
    let token = mint("tok", "cam", 600);
    let src = source_flv(5);
    let want = framemd5(&src);
    let dir = temp_dir();
    let got = publish_and_play(
        dir.path(),
        &peers().ffmpeg,
        &format!("{rtmps}/tok/{token}"),
        &src,
        &[
            (PlayerKind::Rtmpdump, format!("{rtmp}/tok/{token}")),
            (PlayerKind::Ffmpeg, format!("{rtmpt}/tok/{token}")),
            (PlayerKind::Ffmpeg, format!("{rtmpts}/tok/{token}")),
            (PlayerKind::Rtmpdump, backend.url("tok/cam")),
        ],
    );
    for r in &got {
        r.assert_run_of(&want);
    }

    let (denied_runs, slow_took, cb_ok) = denials.join().expect("the denial thread failed");
    for (what, out, needle) in &denied_runs {
        out.assert_denied(what, needle);
    }
    // What to do instead of a rename, whole (ffmpeg prints at most 255 characters).
    let (what, rename, _) = &denied_runs[6];
    assert!(what.contains("302"), "{what}");
    rename.assert_denied(
        what,
        "serve this app from the engine, or have the callback answer 2xx.",
    );
    // The callback's timeout (1 s) answered the publisher well before the service's 4 s.
    assert!(
        slow_took < Duration::from_secs(4),
        "the slow callback's publisher took {slow_took:?}"
    );
    cb_ok.assert_ok("a publisher the callback allows");
    let m = metrics_text(admin);
    for (reason, n) in [
        ("token_missing", 2),
        ("token_invalid", 1),
        ("token_expired", 1),
        ("address", 1),
        ("callback_denied", 1),
        // The 302 is a denial through the relay, counted as one (not as allowed).
        ("rename_unsupported", 1),
        ("callback_timeout", 1),
    ] {
        let action_n = |a| denied(&m, a, reason);
        assert_eq!(
            action_n("publish") + action_n("play"),
            n,
            "{reason}:\n{}",
            m.lines()
                .filter(|l| l.starts_with("rtmpgate_auth_denied_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Allowed publishes: the token's and the callback's 2xx (the 302 is not among them).
    let allowed = m
        .lines()
        .find_map(|l| l.strip_prefix("rtmpgate_auth_allowed_total{action=\"publish\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(allowed, Some(2), "rtmpgate_auth_allowed_total:\n{m}");
    // The callback was asked about each cb publish; nginx-rtmp saw only the allowed ones.
    let asked: Vec<String> = service
        .calls_to("/gw/publish")
        .iter()
        .filter_map(|c| c.get("name").map(str::to_owned))
        .collect();
    assert_eq!(asked, ["deny1", "rename1", "slow1", "ok1"]);
    let nginx_log = backend.error_log();
    for name in ["cam", "ok1"] {
        assert!(
            nginx_log.contains(&format!("publish: name='{name}'")),
            "nginx-rtmp did not log the publish of {name}:\n{nginx_log}"
        );
    }
    for name in ["x", "deny1", "rename1", "slow1"] {
        assert!(
            !nginx_log.contains(&format!("name='{name}'")),
            "nginx-rtmp saw the denied {name}:\n{nginx_log}"
        );
    }
    let log = gw.log();
    assert!(!log.contains(SECRET), "the log holds the token secret");
    assert!(
        !log.contains(token.split("token=").nth(1).unwrap_or("none")),
        "the log holds a token"
    );
}
