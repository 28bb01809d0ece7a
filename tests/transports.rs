//! The cross-transport suite: real clients (ffmpeg, rtmpdump, curl) publish and play through
//! rtmpgate over every transport, with nginx-rtmp as the backend or the built-in engine, and
//! the media received is compared packet by packet with the source. Also the harness's own
//! checks and the baseline straight from nginx-rtmp that the other figures are judged by.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
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
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[
            (PlayerKind::Ffmpeg, url.clone()),
            (PlayerKind::Rtmpdump, url.clone()),
        ],
        || nginx.clients() >= 2,
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
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &publish_url,
        &src_file,
        &players,
        || nginx.clients() >= players.len(),
    );
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

// ---- faults ---------------------------------------------------------------------------------

/// How long the gateway may take to close a client, measured from the player's start (so
/// ffmpeg's own start-up and, over a tunnel, its first polls are included) or from the
/// backend's death. The gateway takes well under 0.5 s (the figures are printed); the rest
/// is room for a loaded 2-core machine. The players' own give-up (PLAYER_IDLE_SECS, 60 s)
/// is far beyond it, so only the gateway can end them in time.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// A client of rtmpgate whose upstream refuses connections is closed at once, over every
/// transport, with a log line naming the upstream; nothing is left behind.
#[test]
fn fault_upstream_down_closes_clients_promptly() {
    let dead = format!("rtmp://127.0.0.1:{}", free_port());
    let gw = start_gateway(&["--upstream", &dead]);
    let before = gw.usage();
    let dir = temp_dir();
    for (i, scheme) in SCHEMES.iter().enumerate() {
        let url = format!("{}/live/down", gw.url(scheme));
        let t = std::time::Instant::now();
        let mut player = PlayerKind::Ffmpeg.start(&url, &dir.path().join(format!("{i}.flv")));
        let status = player.wait_timeout(CLOSE_BOUND);
        let took = t.elapsed();
        eprintln!(
            "ffmpeg over {scheme} with the upstream down: {status:?} after {:.2} s",
            took.as_secs_f64()
        );
        assert!(
            status.is_some_and(|s| !s.success()),
            "ffmpeg over {scheme} was not turned away within {CLOSE_BOUND:?} of its start \
             (status {status:?}); its output:\n{}",
            player.log()
        );
    }
    assert!(
        gw.expect_log(&format!("cannot connect to upstream {dead}")),
        "no log line names the refused upstream {dead}"
    );
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

/// The backend dies mid-stream: the publisher and players over every transport are closed
/// within CLOSE_BOUND, nothing is left behind, and once the backend is back new sessions work
/// without restarting rtmpgate.
#[test]
fn fault_upstream_dies_mid_stream_then_restarts() {
    let p = peers();
    let mut nginx = Nginx::start();
    let port = nginx.port();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let before = gw.usage();
    let dir = temp_dir();
    // Long enough that the publisher is still sending when the backend dies and for
    // CLOSE_BOUND after: its own end cannot pass for being closed.
    let long_src = source_flv(20);
    let key = "live/dies";
    let mut players: Vec<(String, Proc)> = SCHEMES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let url = format!("{}/{key}", gw.url(s));
            let pl = PlayerKind::Ffmpeg.start(&url, &dir.path().join(format!("p{i}.flv")));
            (format!("ffmpeg over {s}"), pl)
        })
        .collect();
    players.push((
        "rtmpdump over rtmpt".into(),
        PlayerKind::Rtmpdump.start(
            &format!("{}/{key}", gw.url("rtmpt")),
            &dir.path().join("rd.flv"),
        ),
    ));
    let mut publisher = publish(&p.ffmpeg, &format!("{}/{key}", gw.url("rtmps")), &long_src);
    assert!(
        wait_until(Duration::from_secs(10), || fs::metadata(
            dir.path().join("rd.flv")
        )
        .is_ok_and(|m| m.len() > 100_000)),
        "the stream did not reach rtmpdump through the gateway"
    );
    for (name, pl) in players.iter_mut() {
        assert!(pl.is_running(), "{name} ended before the backend died");
    }
    nginx.kill();
    let t = std::time::Instant::now();
    let deadline = t + CLOSE_BOUND;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let st = publisher.wait_timeout(left());
    assert!(
        st.is_some(),
        "the publisher was not closed within {CLOSE_BOUND:?} of the backend dying"
    );
    eprintln!(
        "publisher closed {:.2} s after the backend died",
        t.elapsed().as_secs_f64()
    );
    for (name, pl) in players.iter_mut() {
        let st = pl.wait_timeout(left());
        assert!(
            st.is_some(),
            "{name} still running {CLOSE_BOUND:?} after the backend died"
        );
        eprintln!(
            "{name} closed {:.2} s after the backend died",
            t.elapsed().as_secs_f64()
        );
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));

    // The backend comes back on the same port: new sessions work at once.
    let nginx = Nginx::start_on_port(port);
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/back", gw.url(s));
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url("rtmpt"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url("rtmp")),
            (PlayerKind::Ffmpeg, url("rtmps")),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    drop(nginx);
}

/// Tunnel clients that open a session, start a handshake and vanish without /close, over
/// rtmpt and rtmpts (curl): each session is reaped after the configured time, its upstream
/// connection closed, and a late request for it gets 404; meanwhile a stream through the same
/// gateway carries on undisturbed.
#[test]
fn fault_tunnel_client_vanishes_session_reaped() {
    let p = peers();
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let before = gw.usage();
    let reaped = "no request within limits.tunnel_reap_secs";
    let mut abandoned = Vec::new();
    for scheme in ["rtmpt", "rtmpts"] {
        let web = if scheme == "rtmpt" { "http" } else { "https" };
        let base = gw.url(scheme).replacen(scheme, web, 1);
        let open = curl_post(&format!("{base}/open/1"), &[0]).expect("no reply to /open/1");
        assert_eq!(open.status, 200, "/open/1 over {scheme}: {open:?}");
        let id = String::from_utf8_lossy(&open.body).trim().to_string();
        assert!(
            id.len() >= 32,
            "session id '{id}' is shorter than 128 bits of hex"
        );
        let mut c0c1 = vec![3u8];
        c0c1.extend((0..1536u32).map(|i| (i * 7 % 251) as u8));
        let send = curl_post(&format!("{base}/send/{id}/0"), &c0c1).expect("no reply to /send");
        assert_eq!(send.status, 200, "/send over {scheme}: {send:?}");
        abandoned.push((scheme, base, id));
    }
    let last_request = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || nginx.clients() == 2),
        "the two tunnel sessions do not have their upstream connections ({} open)",
        nginx.clients()
    );
    // Their labels, from the only two "opened" lines so far: the reap lines must name these
    // two (the stream's own tunnel sessions below may end too).
    let field = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("session="))
            .map(str::to_string)
    };
    let labels: Vec<String> = gw
        .log()
        .lines()
        .filter(|l| l.contains("RTMPT session opened"))
        .filter_map(field)
        .collect();
    assert_eq!(labels.len(), 2, "two tunnel sessions opened: {labels:?}");
    // Now those clients are gone: no /idle, no /close. A stream runs meanwhile.
    let t = std::time::Instant::now();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let url = |s: &str| format!("{}/live/carries-on", gw.url(s));
    let got = std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            publish_and_play(
                dir.path(),
                &p.ffmpeg,
                &url("rtmpt"),
                &src_file,
                &[(PlayerKind::Rtmpdump, url("rtmp"))],
            )
        });
        let ok = wait_until(Duration::from_secs(REAP_SECS + 3), || {
            let log = gw.log();
            labels.iter().all(|label| {
                log.lines()
                    .any(|l| l.contains(reaped) && field(l).as_deref() == Some(label.as_str()))
            })
        });
        assert!(
            ok,
            "the abandoned sessions were not both reaped within {:?}",
            t.elapsed()
        );
        // Not before their time either: reaped at least tunnel_reap_secs after the last
        // request (seen here a little after the reap itself).
        assert!(
            last_request.elapsed() >= Duration::from_secs(REAP_SECS),
            "the abandoned sessions were reaped {:?} after their last request, before \
             tunnel_reap_secs ({REAP_SECS} s)",
            last_request.elapsed()
        );
        eprintln!(
            "abandoned rtmpt and rtmpts sessions reaped {:.2} s after their last request \
             (reap time {REAP_SECS} s)",
            t.elapsed().as_secs_f64()
        );
        stream.join().expect("the stream's thread panicked")
    });
    let src = framemd5(&src_file);
    for r in &got {
        r.assert_run_of(&src);
    }
    for (scheme, base, id) in &abandoned {
        let late = curl_post(&format!("{base}/idle/{id}/1"), &[0]).expect("no reply to /idle");
        assert_eq!(late.status, 404, "idle on a reaped session over {scheme}");
    }
    assert!(
        wait_until(Duration::from_secs(REAP_SECS + 10), || nginx.clients() == 0),
        "nginx still has {} connections from the gateway",
        nginx.clients()
    );
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

/// examples/curl-walkthrough.sh through rtmpgate to nginx-rtmp: open, C0+C1, idle until
/// S0+S1+S2, close; every step answered.
#[test]
fn curl_walkthrough_through_the_gateway() {
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let base = gw.url("rtmpt").replacen("rtmpt", "http", 1);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/curl-walkthrough.sh");
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script).arg(&base);
    let out = String::from_utf8_lossy(&run_ok(&mut cmd, Duration::from_secs(60))).into_owned();
    eprintln!("{out}");
    assert!(out.contains("session id"), "no session id in:\n{out}");
    assert!(
        out.contains("server bytes so far: 3073") && out.contains("handshake answered"),
        "the handshake did not come back through the tunnel:\n{out}"
    );
    // Step 5 closes the session; step 6 polls it again and must find it gone. (Step 1's
    // probe also prints a 404, so each reply is read under its own step.)
    let step = |n: &str| -> String {
        let from = out.find(&format!("\n{n}. ")).map(|i| i + 1);
        let from = from.unwrap_or_else(|| panic!("no step {n} in:\n{out}"));
        let rest = &out[from..];
        let to = rest[3..].find("\n6. ").map_or(rest.len(), |i| i + 3);
        rest[..to].to_string()
    };
    let close = step("5");
    assert!(
        close.contains("/close/") && close.contains("-> HTTP 200, body: 00"),
        "/close was not answered 200 with the polling byte 00:\n{close}"
    );
    let after = step("6");
    assert!(
        after.contains("/idle/") && after.contains("-> HTTP 404"),
        "an /idle after /close did not find the session gone (404):\n{after}"
    );
}

/// `--upstream rtmps://` to nginx-rtmp behind stunnel, trusted through `--upstream-ca`.
#[test]
fn relay_to_an_rtmps_upstream_through_stunnel() {
    let p = peers();
    let nginx = Nginx::start();
    let tls = Stunnel::start(nginx.addr(), TlsMode::Server);
    let upstream = format!("rtmps://127.0.0.1:{}", tls.port());
    let ca = dev_certs().ca.display().to_string();
    let gw = start_gateway(&["--upstream", &upstream, "--upstream-ca", &ca]);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/tls-upstream", gw.url(s));
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url("rtmp"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url("rtmpt")),
            (PlayerKind::Ffmpeg, url("rtmps")),
        ],
        || nginx.clients() >= 2,
    );
    for r in &got {
        r.assert_run_of(&src);
    }
}

/// An upstream whose certificate is not trusted is refused (no --upstream-ca): the client is
/// closed and the log says the TLS handshake failed and what to do.
#[test]
fn fault_rtmps_upstream_untrusted_is_refused() {
    let nginx = Nginx::start();
    let tls = Stunnel::start(nginx.addr(), TlsMode::Server);
    let upstream = format!("rtmps://127.0.0.1:{}", tls.port());
    let gw = start_gateway(&["--upstream", &upstream]);
    let dir = temp_dir();
    let mut player = PlayerKind::Ffmpeg.start(
        &format!("{}/live/x", gw.url("rtmp")),
        &dir.path().join("x.flv"),
    );
    assert!(
        player.wait_timeout(Duration::from_secs(10)).is_some(),
        "the client of an untrusted upstream was not closed"
    );
    assert!(
        gw.wait_log("--upstream-ca", Duration::from_secs(5)),
        "the log does not point at --upstream-ca"
    );
    assert_eq!(nginx.clients(), 0);
}

/// SIGTERM with sessions open: rtmpgate stops accepting at once, lets the open sessions run
/// on for the drain time (the player keeps receiving), then closes them and exits 0. A
/// gateway that exits at once, or stops the stream at the signal, or keeps accepting, fails.
#[test]
fn sigterm_drains_then_exits_zero() {
    const DRAIN: Duration = Duration::from_secs(3);
    let p = peers();
    let nginx = Nginx::start();
    let mut gw = start_gateway(&[
        "--upstream",
        &nginx.upstream(),
        "--drain-secs",
        &DRAIN.as_secs().to_string(),
    ]);
    let dir = temp_dir();
    // Longer than the drain: the stream is still running when the drain ends.
    let src_file = source_flv(20);
    let key = "live/drain";
    let out = dir.path().join("rd.flv");
    let mut player = PlayerKind::Rtmpdump.start(&format!("{}/{key}", gw.url("rtmp")), &out);
    let mut publisher = publish(&p.ffmpeg, &format!("{}/{key}", gw.url("rtmp")), &src_file);
    let size = || fs::metadata(&out).map_or(0, |m| m.len());
    assert!(
        wait_until(Duration::from_secs(10), || size() > 50_000),
        "the stream did not start"
    );
    let addr = gw.addr("rtmp");
    let t = std::time::Instant::now();
    gw.signal("TERM");
    // Listeners close at once; the process and its sessions carry on.
    assert!(
        wait_until(Duration::from_secs(1), || !accepts(addr)),
        "rtmpgate still accepts 1 s after SIGTERM"
    );
    let at_refusal = size();
    std::thread::sleep(DRAIN.saturating_sub(t.elapsed()) / 2);
    assert!(
        gw.try_status().is_none(),
        "rtmpgate exited {:.2} s after SIGTERM, before the {DRAIN:?} drain",
        t.elapsed().as_secs_f64()
    );
    let mid_drain = size();
    assert!(
        mid_drain > at_refusal + 20_000,
        "the open session did not carry on during the drain ({at_refusal} bytes at the \
         signal, {mid_drain} bytes {:.2} s later)",
        t.elapsed().as_secs_f64()
    );
    assert!(
        publisher.is_running(),
        "the publisher was cut during the drain"
    );
    let status = gw.wait_exit(DRAIN + Duration::from_secs(5));
    let took = t.elapsed();
    eprintln!(
        "rtmpgate exited {status:?} {:.2} s after SIGTERM (drain {DRAIN:?}); the player got \
         {} bytes during the drain",
        took.as_secs_f64(),
        mid_drain - at_refusal
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "rtmpgate did not exit 0 within 5 s after a {DRAIN:?} drain: {status:?}"
    );
    assert!(
        took >= DRAIN - Duration::from_millis(100),
        "rtmpgate exited after {took:?}, before the {DRAIN:?} drain was over"
    );
    assert!(
        gw.expect_log("closing 2 session(s) still open after the drain"),
        "the log does not say the two open sessions were closed after the drain"
    );
    assert!(
        player.wait_timeout(CLOSE_BOUND).is_some(),
        "the player was not closed when rtmpgate exited"
    );
}

/// RTMPE through rtmpgate to nginx-rtmp (which does not know it): rtmpdump and the static
/// ffmpeg play over rtmpe while Debian's ffmpeg publishes over rtmp. (ffmpeg cannot publish
/// over rtmpe to a server that sends Set Chunk Size, as nginx-rtmp does: it encrypts the
/// packet it echoes in place, then reads the size from the ciphertext. See rtmpe_nginx.rs.)
#[test]
fn relay_rtmpe() {
    let p = peers();
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/encrypted", gw.url(s));
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url("rtmp"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url("rtmpe")),
            (PlayerKind::StaticFfmpeg, url("rtmpe")),
        ],
        || nginx.clients() >= 2,
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

// ---- the README stays accurate --------------------------------------------------------------

/// Every command-line flag (from `rtmpgate --help`) and every `[limits]` key (from
/// src/limits.rs) appears in README.md's configuration reference.
#[test]
fn readme_documents_every_flag_and_limit() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut help = std::process::Command::new(env!("CARGO_BIN_EXE_rtmpgate"));
    help.arg("--help");
    let help = String::from_utf8_lossy(&run_ok(&mut help, Duration::from_secs(10))).into_owned();
    let mut missing = Vec::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        let flag = word.trim_end_matches(['.', ':', ')', '=']);
        let Some(name) = flag.strip_prefix("--") else {
            continue;
        };
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            || ["help", "version"].contains(&name)
        {
            continue;
        }
        if !readme.contains(flag) && !missing.contains(&flag.to_string()) {
            missing.push(flag.to_string());
        }
    }
    let limits = fs::read_to_string(root.join("src/limits.rs")).expect("src/limits.rs");
    let body = limits
        .split("pub struct Limits")
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .unwrap_or_default();
    for line in body.lines() {
        if let Some(field) = line
            .trim()
            .strip_prefix("pub ")
            .and_then(|f| f.split(':').next())
        {
            if !readme.contains(&format!("`{field}`")) {
                missing.push(format!("limits.{field}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README.md's configuration reference does not mention: {missing:?}"
    );

    // And each limit's default in the README is the one in `impl Default for Limits`.
    let defaults = limits
        .split("impl Default for Limits")
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .unwrap_or_default();
    let mut wrong = Vec::new();
    for line in defaults.lines() {
        let Some((field, expr)) = line.trim().trim_end_matches(',').split_once(": ") else {
            continue;
        };
        let Some(code) = product(expr) else {
            continue;
        };
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{field}` |")));
        let doc = row
            .and_then(|r| r.split('|').nth(2))
            .map(str::trim)
            .unwrap_or_default();
        if readme_size(doc) != Some(code) {
            wrong.push(format!("{field}: code {code}, README '{doc}'"));
        }
    }
    assert!(
        wrong.is_empty(),
        "README.md's limit defaults are stale: {wrong:?}"
    );
}

/// `16 * 1024 * 1024` or `10_000` as a number.
fn product(expr: &str) -> Option<u64> {
    expr.split('*')
        .map(|f| f.trim().replace('_', "").parse::<u64>().ok())
        .try_fold(1u64, |acc, f| f.and_then(|f| acc.checked_mul(f)))
}

/// `16 MiB`, `16 KiB` or `10000` as a number.
fn readme_size(doc: &str) -> Option<u64> {
    let (n, unit) = doc.split_once(' ').unwrap_or((doc, ""));
    let n: u64 = n.parse().ok()?;
    match unit {
        "" => Some(n),
        "KiB" => n.checked_mul(1024),
        "MiB" => n.checked_mul(1024 * 1024),
        _ => None,
    }
}

/// A publisher killed mid-stream over each transport at once (four keys): the gateway closes
/// each one's upstream leg (tunnel sessions once reaped) while the players stay connected,
/// and when the players leave too every fd is released.
#[test]
fn fault_publishers_killed_mid_stream_over_each_transport() {
    let p = peers();
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let mut players = Vec::new();
    let mut publishers = Vec::new();
    for s in SCHEMES {
        let url = format!("{}/live/killed-{s}", gw.url("rtmp"));
        let out = dir.path().join(format!("{s}.flv"));
        players.push((PlayerKind::Rtmpdump.start(&url, &out), out));
    }
    for (pl, _) in players.iter_mut() {
        assert!(wait_until(START_TIMEOUT, || pl
            .log_tail()
            .contains("Starting Live Stream")));
    }
    for s in SCHEMES {
        let url = format!("{}/live/killed-{s}", gw.url(s));
        publishers.push(publish(&p.ffmpeg, &url, &src_file));
    }
    let flowing = wait_until(Duration::from_secs(10), || {
        players
            .iter()
            .all(|(_, out)| fs::metadata(out).is_ok_and(|m| m.len() > 50_000))
    });
    assert!(flowing, "not every stream reached its player");
    assert_eq!(
        nginx.clients(),
        8,
        "4 publishers and 4 players through the gateway"
    );
    for pb in publishers.iter_mut() {
        pb.kill();
    }
    let t = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(REAP_SECS + 8), || nginx.clients() == 4),
        "the killed publishers' upstream legs are still open: {} connections to nginx",
        nginx.clients()
    );
    eprintln!(
        "the killed publishers' upstream legs closed within {:.2} s (tunnels reap after {REAP_SECS} s)",
        t.elapsed().as_secs_f64()
    );
    for (pl, _) in players.iter_mut() {
        assert!(
            pl.is_running(),
            "a player was dropped with its publisher's leg"
        );
        pl.kill();
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

// ---- the built-in engine (no --upstream) ----------------------------------------------------

/// ffmpeg publishes to rtmpgate's own engine over `over`; three players at once over other
/// transports receive an exact run of the source's packets; nothing is left behind.
fn engine_matrix(over: &str, players: &[(PlayerKind, &str)]) {
    let p = peers();
    let gw = start_gateway(&[]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let key = format!("live/engine-{over}");
    let players: Vec<(PlayerKind, String)> = players
        .iter()
        .map(|(k, s)| (*k, format!("{}/{key}", gw.url(s))))
        .collect();
    let publish_url = format!("{}/{key}", gw.url(over));
    let n = players.len();
    let plays = format!(": play {key}");
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &publish_url,
        &src_file,
        &players,
        || gw.count_log(&plays) >= n,
    );
    // Players that were waiting when the publisher began get the whole stream from the engine
    // (it flushes their queues before the unpublish notice), every packet of it.
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
    eprintln!(
        "rtmpgate before: {before:?}, after the run: {:?}",
        gw.usage()
    );
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

#[test]
fn engine_publish_over_rtmp() {
    engine_matrix(
        "rtmp",
        &[
            (PlayerKind::Ffmpeg, "rtmps"),
            (PlayerKind::Ffmpeg, "rtmpts"),
            (PlayerKind::Rtmpdump, "rtmpt"),
        ],
    );
}

#[test]
fn engine_publish_over_rtmps() {
    engine_matrix(
        "rtmps",
        &[
            (PlayerKind::Ffmpeg, "rtmp"),
            (PlayerKind::Ffmpeg, "rtmpt"),
            (PlayerKind::Rtmpdump, "rtmpe"),
        ],
    );
}

#[test]
fn engine_publish_over_rtmpt() {
    engine_matrix(
        "rtmpt",
        &[
            (PlayerKind::Ffmpeg, "rtmps"),
            (PlayerKind::Ffmpeg, "rtmp"),
            (PlayerKind::Rtmpdump, "rtmp"),
        ],
    );
}

#[test]
fn engine_publish_over_rtmpts() {
    engine_matrix(
        "rtmpts",
        &[
            (PlayerKind::Ffmpeg, "rtmpt"),
            (PlayerKind::Rtmpdump, "rtmpt"),
            (PlayerKind::StaticFfmpeg, "rtmpe"),
        ],
    );
}

/// The README's first command: with no arguments rtmpgate serves RTMP and RTMPT on 1935 and
/// 8080 and RTMPS and RTMPTS on 8443 (dev certificate), from its own engine. Uses those fixed
/// ports, so it fails if something else holds them.
#[test]
fn default_run_serves_every_transport_on_its_ports() {
    let p = peers();
    let gw = Gateway::builder()
        .config(&format!("[limits]\ntunnel_reap_secs = {REAP_SECS}\n"))
        .start();
    let ports: Vec<(String, u16)> = gw
        .listeners()
        .iter()
        .map(|(s, a)| (s.clone(), a.port()))
        .collect();
    assert_eq!(
        ports,
        [
            ("rtmp".to_string(), 1935),
            ("rtmpt".to_string(), 8080),
            ("rtmps".to_string(), 8443)
        ]
    );
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        "rtmp://127.0.0.1:1935/live/test",
        &src_file,
        &[
            (
                PlayerKind::Ffmpeg,
                "rtmpt://127.0.0.1:8080/live/test".into(),
            ),
            (
                PlayerKind::Ffmpeg,
                "rtmps://127.0.0.1:8443/live/test".into(),
            ),
            (
                PlayerKind::Ffmpeg,
                "rtmpts://127.0.0.1:8443/live/test".into(),
            ),
            (
                PlayerKind::Rtmpdump,
                "rtmp://127.0.0.1:1935/live/test".into(),
            ),
        ],
        || gw.count_log(": play live/test") >= 4,
    );
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
}

/// Through the engine: a publisher killed mid-stream over each transport at once; each key's
/// player is told and ends promptly (tunnel publishers once their session is reaped), while
/// an untouched stream on the same gateway carries on to the last packet; nothing is left
/// behind.
#[test]
fn engine_publishers_killed_mid_stream_others_carry_on() {
    let p = peers();
    let gw = start_gateway(&[]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let healthy = format!("{}/live/healthy", gw.url("rtmp"));
    let got = std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            let out = dir.path().join("healthy");
            fs::create_dir_all(&out).expect("dir");
            publish_and_play_when(
                &out,
                &p.ffmpeg,
                &healthy,
                &src_file,
                &[(PlayerKind::Rtmpdump, healthy.clone())],
                || gw.count_log(": play live/healthy") >= 1,
            )
        });
        let mut players = Vec::new();
        for s in SCHEMES {
            let url = format!("{}/live/killed-{s}", gw.url("rtmp"));
            let out = dir.path().join(format!("{s}.flv"));
            players.push((s, PlayerKind::Rtmpdump.start(&url, &out), out));
        }
        let publishers: Vec<Proc> = SCHEMES
            .iter()
            .map(|s| {
                let url = format!("{}/live/killed-{s}", gw.url(s));
                publish(&p.ffmpeg, &url, &src_file)
            })
            .collect();
        let flowing = wait_until(Duration::from_secs(10), || {
            players
                .iter()
                .all(|(_, _, out)| fs::metadata(out).is_ok_and(|m| m.len() > 50_000))
        });
        assert!(flowing, "not every stream reached its player");
        for (s, pl, _) in players.iter_mut() {
            assert!(pl.is_running(), "the player of {s} ended before the kill");
        }
        drop(publishers); // SIGKILL, mid-stream
        let t = std::time::Instant::now();
        for (s, pl, _) in players.iter_mut() {
            // TCP publishers are gone at once; a tunnel publisher once its session is reaped.
            let bound = if s.starts_with("rtmpt") {
                Duration::from_secs(REAP_SECS) + CLOSE_BOUND
            } else {
                CLOSE_BOUND
            };
            let ended = pl.wait_timeout(bound.saturating_sub(t.elapsed())).is_some();
            assert!(
                ended,
                "the player of the publisher killed over {s} was not told within {bound:?}"
            );
            eprintln!(
                "player of the publisher killed over {s} ended {:.2} s after the kill",
                t.elapsed().as_secs_f64()
            );
        }
        stream.join().expect("the healthy stream's thread panicked")
    });
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

/// RTMPTE (RTMPE inside the HTTP tunnel) through rtmpgate to nginx-rtmp: rtmpdump and the
/// static ffmpeg play over rtmpte while Debian's ffmpeg publishes over rtmpt.
#[test]
fn relay_rtmpte() {
    let p = peers();
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/encrypted-tunnel", gw.url(s));
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url("rtmpt"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url("rtmpte")),
            (PlayerKind::StaticFfmpeg, url("rtmpte")),
        ],
        || nginx.clients() >= 2,
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

/// Through the engine: the static ffmpeg publishes over rtmpe (the engine sends no Set Chunk
/// Size to RTMPE publishers); rtmpdump and the static ffmpeg play over rtmpte, rtmpdump over
/// rtmpe, all at once, every packet.
#[test]
fn engine_rtmpe_publish_rtmpte_and_rtmpe_play() {
    let p = peers();
    let gw = start_gateway(&[]);
    let before = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/engine-encrypted", gw.url(s));
    let got = publish_and_play_when(
        dir.path(),
        &p.static_ffmpeg,
        &url("rtmpe"),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, url("rtmpte")),
            (PlayerKind::StaticFfmpeg, url("rtmpte")),
            (PlayerKind::Rtmpdump, url("rtmpe")),
        ],
        || gw.count_log(": play live/engine-encrypted") >= 3,
    );
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
    gw.assert_fds_back_to(before.fds, Duration::from_secs(REAP_SECS + 10));
}

/// IPv6: listeners on [::1] (plain and TLS), publish and play over every transport through
/// the engine. ffmpeg only: rtmpdump 2.4 cannot parse an IPv6 literal in its URL.
#[test]
fn ipv6_listeners_serve_every_transport() {
    let p = peers();
    let c = dev_certs();
    let (chain, key) = (c.chain.display().to_string(), c.key.display().to_string());
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://[::1]:0",
        "--listen",
        "rtmps://[::1]:0",
        "--tls-cert",
        &chain,
        "--tls-key",
        &key,
    ]);
    assert!(gw.addr("rtmp").is_ipv6() && gw.addr("rtmps").is_ipv6());
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/live/v6", gw.url(s));
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url("rtmpts"),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, url("rtmp")),
            (PlayerKind::Ffmpeg, url("rtmps")),
            (PlayerKind::Ffmpeg, url("rtmpt")),
        ],
        || gw.count_log(": play live/v6") >= 3,
    );
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
}

/// A plain client reaching a TLS listener through stunnel in client mode (what a user with an
/// RTMP-only client would do): rtmpdump plays over rtmp into stunnel, which speaks TLS to
/// rtmpgate's rtmps listener; ffmpeg publishes over rtmp; engine. (rtmpdump's own rtmps
/// fails its RTMP handshake even against stunnel in front of nginx-rtmp, so it is not used.)
#[test]
fn plain_client_through_stunnel_into_the_rtmps_listener() {
    let p = peers();
    let gw = start_gateway(&[]);
    let tls = Stunnel::start(gw.addr("rtmps"), TlsMode::Client);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let key = "live/tls-clients";
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/{key}", gw.url("rtmp")),
        &src_file,
        &[(
            PlayerKind::Rtmpdump,
            format!("rtmp://127.0.0.1:{}/{key}", tls.port()),
        )],
        || gw.count_log(&format!(": play {key}")) >= 1,
    );
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
    assert!(
        gw.log_contains("rtmps 127.0.0.1"),
        "the player did not arrive over rtmps"
    );
}

/// ffmpeg publishes `key` over rtmps to `gw`; ffmpeg plays it over rtmps and rtmpts, and
/// `more` players as given; every copy compared with the source frame by frame.
fn rtmps_publish_and_play(gw: &Gateway, key: &str, more: &[(PlayerKind, String)]) {
    let p = peers();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = |s: &str| format!("{}/{key}", gw.url(s));
    let mut players = vec![
        (PlayerKind::Ffmpeg, url("rtmps")),
        (PlayerKind::Ffmpeg, url("rtmpts")),
    ];
    players.extend_from_slice(more);
    let got = publish_and_play_when(
        dir.path(),
        &p.ffmpeg,
        &url("rtmps"),
        &src_file,
        &players,
        || gw.count_log(&format!(": play {key}")) >= players.len(),
    );
    for r in &got {
        assert_contiguous_run(&r.label, &src, &r.frames, 1.0);
    }
}

/// An RSA 2048 certificate (most certificates in use; the harness's other one is ECDSA): its
/// handshakes sign off the executor (net::tls_stream), so every TLS client here goes through
/// that path. ffmpeg (GnuTLS) publishes over rtmps and plays over rtmps and rtmpts, rtmpdump
/// plays through stunnel (OpenSSL) into the rtmps listener; every player gets an exact run
/// of the source's packets.
#[test]
fn engine_over_tls_with_an_rsa_certificate() {
    let p = peers();
    let gw = Gateway::builder().rtmp_and_rtmps_with(rsa_certs()).start();
    let tls = Stunnel::start(gw.addr("rtmps"), TlsMode::Client);
    let key = "live/rsa";
    let through_stunnel = format!("rtmp://127.0.0.1:{}/{key}", tls.port());
    rtmps_publish_and_play(&gw, key, &[(PlayerKind::Rtmpdump, through_stunnel)]);
    assert!(
        gw.log_contains("rtmps 127.0.0.1"),
        "no client arrived over rtmps"
    );
    // TLS 1.2 too (its ServerKeyExchange is the signed step there): curl (OpenSSL) asks the
    // tunnel's first request over it and gets the tunnel's answer.
    let mut cmd = std::process::Command::new(&p.curl);
    cmd.args([
        "-s",
        "-v",
        "-k",
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "--max-time",
        "10",
    ])
    .args(["-X", "POST", "--data-binary", "x", "-o", "/dev/null"])
    .args(["-w", "%{http_code}"])
    .arg(format!(
        "https://localhost:{}/fcs/ident2",
        gw.addr("rtmps").port()
    ));
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(15));
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    assert!(
        status.is_some_and(|s| s.success()) && out.trim() != "000",
        "curl over TLS 1.2 got no reply: {out} {err}"
    );
    assert!(
        err.contains("TLSv1.2") && err.contains("RSA"),
        "curl did not settle on TLS 1.2 with an RSA suite: {err}"
    );
}

/// An RSA chain and an ECDSA chain for the same names, as haproxy and nginx serve them (the
/// README's "Two certificates"): each real client gets the one it can take, ECDSA whenever
/// it can, so a deployment whose CA issued RSA pays the RSA signature only for clients that
/// cannot do ECDSA. Which chain a client got is told by having it verify against one CA at a
/// time (the two chains come from two CAs), the media frame by frame.
#[test]
fn engine_over_tls_with_rsa_and_ecdsa_chains() {
    let p = peers();
    let (rsa, ec) = (rsa_certs(), dev_certs());
    // RSA given first: the order given does not decide, the client does.
    let gw = Gateway::builder()
        .rtmp_and_rtmps_with_chains(&[rsa, ec])
        .start();
    rtmps_publish_and_play(&gw, "live/dual", &[]);
    let port = gw.addr("rtmps").port();
    let t = Duration::from_secs(20);
    // ffmpeg (GnuTLS) verifying the chain: it publishes trusting the ECDSA CA alone, and
    // refuses the server trusting the RSA CA alone.
    let short = source_flv(1);
    let ffmpeg_publish = |ca: &Path| {
        let mut cmd = std::process::Command::new(&p.ffmpeg);
        cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
            .arg(&short)
            .args(["-c", "copy", "-f", "flv", "-tls_verify", "1", "-ca_file"])
            .arg(ca)
            .arg(format!("rtmps://localhost:{port}/live/dual-check"));
        let (status, _, err) = run_capture(&mut cmd, t);
        (
            status.is_some_and(|s| s.success()),
            String::from_utf8_lossy(&err).into_owned(),
        )
    };
    let (ok, err) = ffmpeg_publish(&ec.ca);
    assert!(ok, "ffmpeg did not get the ECDSA chain: {err}");
    let (ok, err) = ffmpeg_publish(&rsa.ca);
    assert!(
        !ok && err.contains("verification"),
        "ffmpeg trusting the RSA CA alone was not refused: {err}"
    );
    // OpenSSL's s_client offering RSA signatures alone (a client without ECDSA) gets the RSA
    // chain, TLS 1.3; offering everything, the ECDSA one.
    let s_client = |extra: &[&str], ca: &Path| {
        let mut cmd = std::process::Command::new(&p.openssl);
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args([
                "-servername",
                "localhost",
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(ca)
            .args(extra)
            .stdin(std::process::Stdio::null());
        let (status, out, err) = run_capture(&mut cmd, t);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        (status.is_some_and(|s| s.success()), text)
    };
    let (ok, text) = s_client(&["-sigalgs", "RSA-PSS+SHA256:RSA+SHA256"], &rsa.ca);
    assert!(
        ok && text.contains("Server public key is 2048 bit") && text.contains("TLSv1.3"),
        "s_client offering RSA alone did not get the RSA chain over TLS 1.3: {text}"
    );
    let (ok, text) = s_client(&[], &ec.ca);
    assert!(
        ok && text.contains("Peer signature type: ECDSA"),
        "s_client offering everything did not get the ECDSA chain: {text}"
    );
    // curl (OpenSSL) on TLS 1.2 with RSA suites alone gets the RSA chain and the tunnel's
    // answer; with its defaults, the ECDSA chain.
    let curl = |extra: &[&str], ca: &Path| {
        let mut cmd = std::process::Command::new(&p.curl);
        cmd.args(["-s", "--max-time", "10", "--cacert"])
            .arg(ca)
            .args(extra)
            .args(["-X", "POST", "--data-binary", "x", "-o", "/dev/null"])
            .args(["-w", "%{http_code}"])
            .arg(format!("https://localhost:{port}/fcs/ident2"));
        let (status, out, _) = run_capture(&mut cmd, t);
        let code = String::from_utf8_lossy(&out).trim().to_string();
        status.is_some_and(|s| s.success()) && code != "000"
    };
    let rsa_suites = [
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "--ciphers",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ];
    assert!(
        curl(&rsa_suites, &rsa.ca),
        "curl with RSA suites alone did not get the RSA chain"
    );
    assert!(curl(&[], &ec.ca), "curl did not get the ECDSA chain");
    assert!(
        !curl(&[], &rsa.ca),
        "curl with its defaults got the RSA chain, not the ECDSA one"
    );
}

/// The table's "fails" and "crashes" cells, kept honest: each client failure the README
/// names is reproduced here with a stream running that a fixed client would receive, so
/// the day a client is fixed this test fails and the cell must change. rtmpdump 2.4's own
/// rtmps fails its RTMP handshake even against stunnel in front of nginx-rtmp (no rtmpgate);
/// rtmpdump 2.4 in rtmpts mode crashes (SIGSEGV) against rtmpgate's rtmpts listener; the
/// static ffmpeg cannot publish over rtmpe through rtmpgate to nginx-rtmp, which sends Set
/// Chunk Size (ffmpeg decrypts it in place and reads a garbage size: "Incorrect chunk size",
/// or a reset once the garbage desynchronises the stream).
#[test]
fn client_failures_named_in_the_readme_still_happen() {
    use std::os::unix::process::ExitStatusExt;
    let p = peers();
    let nginx = Nginx::start();
    let gw = start_gateway(&["--upstream", &nginx.upstream()]);
    let tls = Stunnel::start(nginx.addr(), TlsMode::Server);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let key = "live/known-failures";
    let rtmps_out = dir.path().join("rtmps.flv");
    let rtmpts_out = dir.path().join("rtmpts.flv");
    let mut rtmps = PlayerKind::Rtmpdump.start(
        &format!("rtmps://127.0.0.1:{}/{key}", tls.port()),
        &rtmps_out,
    );
    let mut rtmpts =
        PlayerKind::Rtmpdump.start(&format!("{}/{key}", gw.url("rtmpts")), &rtmpts_out);
    let mut publisher = publish(&p.ffmpeg, &nginx.url(key), &src_file);
    let mut rtmpe_pub = publish(
        &p.static_ffmpeg,
        &format!("rtmpe://{}/live/known-failures-rtmpe", gw.addr("rtmp")),
        &src_file,
    );
    // Each failure comes within a second or two on a quiet machine; the bound is generous
    // because one run under load 40 needed more than 15 s (the waits end as soon as the
    // client does, so a longer bound costs nothing when the failure happens).
    let bound = Duration::from_secs(40);

    let st = rtmps.wait_timeout(bound);
    assert!(
        st.is_some_and(|s| !s.success()) && rtmps.log().contains("handshake failed"),
        "rtmpdump's own rtmps no longer fails its handshake against stunnel + nginx-rtmp \
         ({st:?}): update the README's rtmpdump rtmps cell; its output:\n{}",
        rtmps.log()
    );
    let st = rtmpts.wait_timeout(bound);
    assert!(
        st.is_some_and(|s| s.signal() == Some(11)),
        "rtmpdump in rtmpts mode no longer crashes with SIGSEGV ({st:?}): update the README's \
         rtmpdump rtmpts cell; its output:\n{}",
        rtmpts.log()
    );
    let st = rtmpe_pub.wait_timeout(bound);
    assert!(
        st.is_some_and(|s| !s.success()),
        "the static ffmpeg no longer fails to publish over rtmpe to nginx-rtmp ({st:?}): \
         update the README's cell; its output:\n{}",
        rtmpe_pub.log()
    );
    // The stream was there to be had: the plain publisher ran to its end.
    let st = publisher.wait_timeout(Duration::from_secs(u64::from(SECONDS) + 20));
    assert!(
        st.is_some_and(|s| s.success()),
        "the plain publisher to nginx-rtmp failed: {}",
        publisher.log()
    );
    for out in [&rtmps_out, &rtmpts_out] {
        assert!(
            framemd5(out).is_empty(),
            "{} received packets after all",
            out.display()
        );
    }
}
