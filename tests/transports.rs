//! The cross-transport suite: real clients (ffmpeg, rtmpdump, curl) publish and play through
//! rtmpgate over every transport, with nginx-rtmp as the backend or the built-in engine, and
//! the media received is compared packet by packet with the source. Also the harness's own
//! checks and the baseline straight from nginx-rtmp that the other figures are judged by.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const SECONDS: u32 = 5;

// ---- the harness itself --------------------------------------------------------------------

fn fr(media: &str, hash: &str) -> Frame {
    Frame {
        media: media.into(),
        stream: u32::from(media == "audio"),
        dts: 0,
        size: 1,
        hash: hash.into(),
    }
}

#[test]
fn harness_parses_framemd5_lines_and_media_types() {
    let text = "#format: frame checksums\n#tb 0: 1/1000\n#media_type 0: video\n\
                #media_type 1: audio\n0,   0,   0,  33,  1234, abc\n1,  0, 0, 23, 10, def\n";
    let f = parse_framemd5(text);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0].media, "video");
    assert_eq!(f[1].media, "audio");
    assert_eq!(f[0].size, 1234);
    assert_eq!(f[1].hash, "def");
}

#[test]
fn harness_contiguous_run_accepts_a_middle_run_and_a_cut_last_packet() {
    let src: Vec<Frame> = ["a", "b", "c", "d"]
        .iter()
        .map(|h| fr("video", h))
        .collect();
    let got = vec![fr("video", "b"), fr("video", "c"), fr("video", "x")];
    let r = contiguous_run(&src, &got).expect("a run");
    assert!(r.cut_last);
    assert_eq!(r.streams["video"], (2, 4, 1));
    let gap = vec![fr("video", "a"), fr("video", "c"), fr("video", "d")];
    assert!(contiguous_run(&src, &gap).is_err());
    let cut_in_middle = vec![fr("video", "a"), fr("video", "x"), fr("video", "c")];
    assert!(contiguous_run(&src, &cut_in_middle).is_err());
    assert!(contiguous_run(&src, &[]).is_err());
}

#[test]
fn harness_parses_listening_lines() {
    let lines = vec![
        "2026-01-01T00:00:00Z  INFO rtmpgate::door: listening on rtmp://127.0.0.1:1935".into(),
        "listening on rtmps://[::1]:8443".into(),
    ];
    let l = parse_listening(&lines);
    assert_eq!(l.len(), 2);
    assert_eq!(l[1].0, "rtmps");
    assert_eq!(l[1].1.port(), 8443);
    assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m x"), "INFO x");
}

#[test]
fn harness_finds_every_peer_and_makes_certs() {
    let p = peers();
    eprintln!("{p:#?}");
    let c = dev_certs();
    for f in [&c.ca, &c.cert, &c.chain, &c.key] {
        assert!(f.is_file(), "{} missing", f.display());
    }
}

/// The yardstick: publish to nginx-rtmp directly (no gateway) and play with ffmpeg and
/// rtmpdump at once. The shares printed here are what the gateway's figures are compared to.
#[test]
fn baseline_nginx_direct() {
    let p = peers();
    let nginx = Nginx::start();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    assert!(src.len() > 100, "the source has only {} packets", src.len());
    let url = nginx.url("live/baseline");
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[
            (PlayerKind::Ffmpeg, url.clone()),
            (PlayerKind::Rtmpdump, url.clone()),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    let fds = fd_count(nginx.pid());
    eprintln!("nginx fds after the run: {fds}");
}

#[test]
fn baseline_nginx_direct_players_are_stopped_promptly() {
    // Once the stream is over, the harness stops players within a few seconds (not at
    // PLAYER_TAIL), so a run costs little more than the media's duration.
    let p = peers();
    let nginx = Nginx::start();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let url = nginx.url("live/prompt");
    let t = std::time::Instant::now();
    publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[(PlayerKind::Rtmpdump, url.clone())],
    );
    assert!(t.elapsed() < Duration::from_secs(u64::from(SECONDS) + 10));
}

// ---- relay: rtmpgate in front of nginx-rtmp -------------------------------------------------

const SCHEMES: [&str; 4] = ["rtmp", "rtmps", "rtmpt", "rtmpts"];

/// rtmpgate with one listener per scheme (the plain and TLS listeners sniff, so each also
/// serves its sibling) and the harness's dev certificate.
fn gateway_args(extra: &[&str]) -> Vec<String> {
    let c = dev_certs();
    let mut args: Vec<String> = SCHEMES
        .iter()
        .flat_map(|s| ["--listen".to_string(), format!("{s}://127.0.0.1:0")])
        .collect();
    args.extend([
        "--tls-cert".into(),
        c.chain.display().to_string(),
        "--tls-key".into(),
        c.key.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Seconds after which the test gateways reap a tunnel session without requests. Players
/// stopped by a signal (ffmpeg, rtmpdump) never send /close, so their sessions end this way.
const REAP_SECS: u64 = 2;

fn start_gateway(extra: &[&str]) -> Gateway {
    let args = gateway_args(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::builder()
        .config(&format!("[limits]\ntunnel_reap_secs = {REAP_SECS}\n"))
        .args(&refs)
        .start()
}

/// ffmpeg publishes through rtmpgate over `over`; ffmpeg plays through every transport and
/// rtmpdump over rtmp and rtmpt, all at once; every player's packets are an exact run of the
/// source's. Then the gateway's fds return to where they were before the first client.
fn relay_matrix(over: &str) {
    let p = peers();
    let nginx = Nginx::start();
    let upstream = nginx.upstream();
    let gw = start_gateway(&["--upstream", &upstream]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let key = format!("live/relay-{over}");
    let mut players: Vec<(PlayerKind, String)> = SCHEMES
        .iter()
        .map(|s| (PlayerKind::Ffmpeg, format!("{}/{key}", gw.url(s))))
        .collect();
    for s in ["rtmp", "rtmpt"] {
        players.push((PlayerKind::Rtmpdump, format!("{}/{key}", gw.url(s))));
    }
    let publish_url = format!("{}/{key}", gw.url(over));
    let got = publish_and_play(dir.path(), &p.ffmpeg, &publish_url, &src_file, &players);
    for r in &got {
        r.assert_run_of(&src);
    }
    let during = gw.usage();
    eprintln!("rtmpgate before: {before:?}, after the run: {during:?}");
    // Every client and every upstream leg is closed again (tunnel sessions once reaped).
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
    assert!(
        wait_until(Duration::from_secs(10), || nginx.clients() == 0),
        "nginx still has {} connections from the gateway after every client left",
        nginx.clients()
    );
}

#[test]
fn relay_publish_over_rtmp_play_over_all() {
    relay_matrix("rtmp");
}

#[test]
fn relay_publish_over_rtmps_play_over_all() {
    relay_matrix("rtmps");
}

#[test]
fn relay_publish_over_rtmpt_play_over_all() {
    relay_matrix("rtmpt");
}

#[test]
fn relay_publish_over_rtmpts_play_over_all() {
    relay_matrix("rtmpts");
}
