//! `[auth]`'s local rules with real clients: static keys, signed tokens (minted by
//! `rtmpgate token` and by the README's shell recipe), expiry, address lists (IPv4, IPv6,
//! IPv4-mapped IPv6) per app and action. Allowed publishers and players over rtmp, rtmps and
//! the rtmpt tunnel get every frame while denied clients come and go; denied ones see the
//! status (ffmpeg and rtmpdump print it), and each denial is counted by action and reason
//! and logged without the key or token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth_support;
mod common;

use std::process::Command;
use std::thread;
use std::time::Duration;

use auth_support::*;
use common::*;

const SECRET: &str = "s3cret-for-tests-0123456789";

const CONFIG: &str = r#"
[auth]
token_secret = "s3cret-for-tests-0123456789"
publish_keys = { keyed = ["k-secret-1"] }

[auth.app.tok]
token_required = ["publish", "play"]

[auth.app.closed]
deny_connect = ["127.0.0.0/8"]

[auth.app.noplay]
allow_play = ["192.0.2.0/24", "2001:db8::/32"]
"#;

/// `rtmpgate token` with the secret in the environment.
fn mint(app: &str, stream: &str, ttl: i64) -> String {
    let mut cmd = Command::new(rtmpgate_bin());
    cmd.args([
        "token",
        "--app",
        app,
        "--stream",
        stream,
        "--ttl",
        &ttl.to_string(),
    ])
    .env("RTMPGATE_TOKEN_SECRET", SECRET);
    let out = run_ok(&mut cmd, Duration::from_secs(10));
    String::from_utf8(out).unwrap().trim().to_owned()
}

fn gateway(config: &str, listen: &[&str]) -> Gateway {
    let c = dev_certs();
    let (chain, key) = (c.chain.display().to_string(), c.key.display().to_string());
    let mut args = vec![
        "--admin",
        "127.0.0.1:0",
        "--tls-cert",
        &chain,
        "--tls-key",
        &key,
    ];
    for l in listen {
        args.push("--listen");
        args.push(l);
    }
    Gateway::builder().args(&args).config(config).start()
}

#[test]
fn keys_tokens_and_addresses_with_real_clients() {
    let gw = gateway(
        CONFIG,
        &[
            "rtmp://127.0.0.1:0",
            "rtmps://127.0.0.1:0",
            "rtmpt://127.0.0.1:0",
        ],
    );
    let admin = admin_addr(&gw);
    let rtmp = gw.url("rtmp");
    let rtmps = gw.url("rtmps");
    let rtmpt = gw.url("rtmpt");

    // Denied clients, one after another, on a thread of their own while the allowed
    // publisher and players run below (the other sessions must not notice).
    let (r1, r2, r3) = (rtmp.clone(), rtmpt.clone(), rtmps.clone());
    let denials = thread::spawn(move || {
        let wrong_key = ffmpeg_publish(&format!("{r1}/keyed/cam?key=wrong-key-9"));
        let no_token = ffmpeg_publish(&format!("{r3}/tok/cam"));
        let other_stream = mint("tok", "other", 600);
        let wrong_stream = ffmpeg_publish(&format!(
            "{r1}/tok/{}",
            other_stream.replacen("other", "cam", 1)
        ));
        let expired = ffmpeg_publish(&format!("{r2}/tok/{}", mint("tok", "cam", -60)));
        let closed = ffmpeg_publish(&format!("{r2}/closed/x"));
        let closed_dump = rtmpdump_play(&format!("{r1}/closed/x"));
        let noplay_dump = rtmpdump_play(&format!("{r1}/noplay/x"));
        let noplay_ffmpeg = ffmpeg_play(&format!("{r2}/noplay/x"));
        let play_no_token = rtmpdump_play(&format!("{r1}/tok/cam"));
        (
            wrong_key,
            no_token,
            wrong_stream,
            expired,
            closed,
            closed_dump,
            noplay_dump,
            noplay_ffmpeg,
            play_no_token,
        )
    });

    // Allowed: a publisher over RTMPS with a token from `rtmpgate token`, players with the
    // same token over RTMP (rtmpdump) and the RTMPT tunnel (ffmpeg): every frame.
    let token = mint("tok", "cam", 600);
    assert!(token.starts_with("cam?token="), "{token}");
    let dir = temp_dir();
    let src = source_flv(4);
    let want = framemd5(&src);
    let got = publish_and_play(
        dir.path(),
        &peers().ffmpeg,
        &format!("{rtmps}/tok/{token}"),
        &src,
        &[
            (PlayerKind::Rtmpdump, format!("{rtmp}/tok/{token}")),
            (PlayerKind::Ffmpeg, format!("{rtmpt}/tok/{token}")),
        ],
    );
    for r in &got {
        r.assert_run_of(&want);
    }

    let (
        wrong_key,
        no_token,
        wrong_stream,
        expired,
        closed,
        closed_dump,
        noplay_dump,
        noplay_ffmpeg,
        play_no_token,
    ) = denials.join().unwrap();
    wrong_key.assert_denied(
        "wrong ?key=",
        "NetStream.Publish.BadName: publish denied (key)",
    );
    no_token.assert_denied("no token over rtmps", "publish denied (token_missing)");
    wrong_stream.assert_denied(
        "a token for another stream",
        "publish denied (token_invalid)",
    );
    expired.assert_denied(
        "an expired token over rtmpt",
        "publish denied (token_expired)",
    );
    closed.assert_denied(
        "connect from a denied address",
        "NetConnection.Connect.Rejected",
    );
    closed_dump.assert_denied(
        "rtmpdump connect from a denied address",
        "rtmp server sent error",
    );
    noplay_dump.assert_denied(
        "rtmpdump play outside allow_play",
        "Closing connection: NetStream.Play.Failed",
    );
    noplay_ffmpeg.assert_denied("ffmpeg play outside allow_play", "NetStream.Play.Failed");
    play_no_token.assert_denied("play without a token", "NetStream.Play.Failed");

    // A token on the tcUrl (connect's app) instead of the stream name: allowed.
    let query = mint("tok", "cam", 600).replacen("cam?", "", 1);
    ffmpeg_publish(&format!("{rtmp}/tok?{query}/cam")).assert_ok("a token on the tcUrl");

    // The right key as ?key=, and a key as the stream name: allowed.
    ffmpeg_publish(&format!("{rtmp}/keyed/cam?key=k-secret-1")).assert_ok("?key=");
    ffmpeg_publish(&format!("{rtmpt}/keyed/k-secret-1")).assert_ok("key as the name");

    let m = metrics_text(admin);
    for (action, reason, n) in [
        ("publish", "key", 1),
        ("publish", "token_missing", 1),
        ("publish", "token_invalid", 1),
        ("publish", "token_expired", 1),
        ("connect", "address", 2),
        ("play", "address", 2),
        ("play", "token_missing", 1),
        ("publish", "address", 0),
    ] {
        assert_eq!(
            denied(&m, action, reason),
            n,
            "rtmpgate_auth_denied_total{{action={action},reason={reason}}}:\n{m}"
        );
    }
    // Allowed: 2 + 2 publishes, 2 plays.
    assert_eq!(
        metric(&m, "rtmpgate_auth_allowed_total{action=\"publish\"}"),
        4
    );
    assert_eq!(
        metric(&m, "rtmpgate_auth_allowed_total{action=\"play\"}"),
        2
    );

    // Logged, and never with the key or the token.
    let log = gw.log();
    assert!(log.contains("publish denied by [auth] (key)"), "{log}");
    assert!(log.contains("connect denied by [auth] (address)"), "{log}");
    let token_hex = token
        .split("token=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    for secret in ["wrong-key-9", "?key=", token_hex, SECRET] {
        assert!(!log.contains(secret), "the log shows {secret:?}:\n{log}");
    }
}

/// The README's token recipe (openssl in a shell) mints tokens the gateway accepts, and
/// the README's example `[auth]` table is a valid config.
#[test]
fn readme_token_recipe_and_example_config() {
    let readme = readme();
    let block = readme
        .split("<!-- token-recipe -->")
        .nth(1)
        .and_then(|b| b.split("```sh\n").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("README has no token recipe block");
    // Its first line sets the inputs: ours replace it.
    let (first, rest) = block.split_once('\n').unwrap();
    assert!(first.starts_with("APP="), "{first}");
    let gw = gateway(CONFIG, &["rtmp://127.0.0.1:0"]);
    let host = gw.addr("rtmp").to_string();
    let run = |ttl: i64| {
        let script = format!("APP=tok STREAM=cam1 TTL={ttl} SECRET='{SECRET}'\n{rest}");
        let mut cmd = Command::new("bash");
        cmd.args(["-euc", &script]);
        let url = String::from_utf8(run_ok(&mut cmd, Duration::from_secs(10))).unwrap();
        url.trim().replace("HOST", &host)
    };
    ffmpeg_publish(&run(3600)).assert_ok("README recipe");
    ffmpeg_publish(&run(-60)).assert_denied("README recipe, expired", "(token_expired)");

    // The example [auth] table (with the listeners of a test).
    let example = readme
        .split("## Authorization")
        .nth(1)
        .and_then(|s| s.split("```toml\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("README's Authorization section has no TOML example");
    let dir = temp_dir();
    let path = dir.path().join("example.toml");
    std::fs::write(&path, example).unwrap();
    let mut cmd = Command::new(rtmpgate_bin());
    cmd.arg("--config")
        .arg(&path)
        .args(["--listen", "rtmp://127.0.0.1:0", "--check-config"]);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the README's [auth] example is refused: {}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
}

/// IPv6 clients against IPv6 ranges, and an IPv4 client on a dual-stack listener (seen as
/// ::ffff:127.0.0.1) against an IPv4 range.
#[test]
fn address_rules_ipv6_and_ipv4_mapped() {
    let config = r#"
[auth]
deny_publish = ["127.0.0.0/8"]
allow_play = ["::1/128"]
"#;
    let gw = gateway(config, &["rtmp://[::]:0"]);
    let port = gw.addr("rtmp").port();
    let v6 = format!("rtmp://[::1]:{port}");
    let v4 = format!("rtmp://127.0.0.1:{port}");
    // ::1 may publish (deny_publish is IPv4 only) and play (allow_play).
    ffmpeg_publish(&format!("{v6}/live/a")).assert_ok("publish from ::1");
    rtmpdump_play(&format!("{v4}/live/a")).assert_denied(
        "play from ::ffff:127.0.0.1 outside allow_play ::1/128",
        "NetStream.Play.Failed",
    );
    // 127.0.0.1 reaches the dual-stack socket as ::ffff:127.0.0.1 and still matches
    // 127.0.0.0/8.
    ffmpeg_publish(&format!("{v4}/live/b"))
        .assert_denied("publish from mapped 127.0.0.1", "publish denied (address)");
    let log = gw.log();
    assert!(log.contains("publish denied by [auth] (address)"), "{log}");
}

/// `[auth]` changes apply to new sessions on a reload (SIGHUP), like the engine's settings.
#[test]
fn auth_rules_follow_a_reload() {
    let gw = gateway(
        "[auth]\ndeny_publish = [\"127.0.0.0/8\"]\n",
        &["rtmp://127.0.0.1:0"],
    );
    let url = format!("{}/live/r", gw.url("rtmp"));
    ffmpeg_publish(&url).assert_denied("before the reload", "publish denied (address)");
    std::fs::write(
        gw.dir().join("rtmpgate.toml"),
        "[auth]\npublish_keys = { live = [\"k-after-reload\"] }\n",
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        gw.wait_log("configuration reloaded", Duration::from_secs(10)),
        "no reload line: {}",
        gw.log()
    );
    ffmpeg_publish(&url).assert_denied("after the reload, without the key", "publish denied (key)");
    ffmpeg_publish(&format!("{url}?key=k-after-reload"))
        .assert_ok("after the reload, with the key");
}
