//! Faults around a running rtmpgate not covered elsewhere: a publisher SIGKILLed over each
//! transport leaves its key free for the next one at once, and TLS files missing at start
//! stop rtmpgate with an error naming the file.
//!
//! Covered elsewhere, so not repeated here: backend refused, dying mid-stream and
//! restarting, a tunnel client vanishing without /close, SIGTERM draining, publishers killed
//! with their players told (tests/transports.rs, tests/door_upstream.rs,
//! tests/tunnel_peers.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const REAP_SECS: u64 = 2;

/// rtmpgate with an rtmp and an rtmps listener (each also serves its tunnel sibling), the
/// harness's dev certificate, a short tunnel reap time, and `extra` arguments.
fn gateway(config: &str, extra: &[&str]) -> Gateway {
    Gateway::builder()
        .config(&format!(
            "{config}\n[limits]\ntunnel_reap_secs = {REAP_SECS}\n"
        ))
        .rtmp_and_rtmps()
        .args(extra)
        .start()
}

/// A publisher killed with SIGKILL over each transport, through the engine: its session is
/// closed (at once for TCP, at the reap time for a tunnel) and the key is free for the next
/// publisher at once (a stale publisher entry would answer it BadName), and the gateway's
/// fds come back.
#[test]
fn client_killed_mid_publish_over_each_transport() {
    let p = peers();
    let gw = gateway("", &[]);
    let baseline = gw.fds();
    let long = source_flv(20);
    let short = source_flv(3);
    thread::scope(|s| {
        let gw = &gw;
        let handles: Vec<_> = ["rtmp", "rtmps", "rtmpt", "rtmpts"]
            .into_iter()
            .map(|scheme| {
                let long = &long;
                let short = &short;
                s.spawn(move || {
                    let key = format!("live/killed-{scheme}");
                    let url = format!("{}/{key}", gw.url(scheme));
                    let mut publ = publish(&p.ffmpeg, &url, long);
                    let role = format!("publish {key}");
                    // "publish live/killed-rtmp" is a prefix of the rtmps and rtmpt keys:
                    // match the key as a whole word, so one transport's line cannot stand
                    // in for another's.
                    let names_role = |l: &str| {
                        l.match_indices(&role).any(|(i, _)| {
                            l[i + role.len()..]
                                .chars()
                                .next()
                                .map_or(true, char::is_whitespace)
                        })
                    };
                    assert!(
                        wait_until(Duration::from_secs(15), || gw
                            .log()
                            .lines()
                            .any(|l| !l.contains("session close") && names_role(l))),
                        "{scheme}: publish never started"
                    );
                    thread::sleep(Duration::from_secs(2));
                    let killed = Instant::now();
                    publ.signal("KILL");
                    publ.wait_timeout(Duration::from_secs(5));
                    // At once over TCP; a tunnel session once it is reaped. The margin is
                    // room for a loaded machine (the figures are printed).
                    let bound = if scheme.starts_with("rtmpt") {
                        Duration::from_secs(REAP_SECS + 2)
                    } else {
                        Duration::from_secs(2)
                    };
                    let closed = wait_until(bound, || {
                        gw.log()
                            .lines()
                            .any(|l| l.contains("session close") && names_role(l))
                    });
                    let took = killed.elapsed();
                    assert!(
                        closed,
                        "{scheme}: killed publisher's session not closed within {bound:?}"
                    );
                    eprintln!("{scheme}: killed publisher's session closed after {took:?}");
                    // The key is free again.
                    let mut again = publish(&p.ffmpeg, &url, short);
                    let st = again.wait_timeout(Duration::from_secs(30));
                    assert!(
                        st.is_some_and(|s| s.success()),
                        "{scheme}: a new publisher on the same key failed: {}",
                        again.log()
                    );
                    took
                })
            })
            .collect();
        for h in handles {
            h.join().expect("a transport's check failed");
        }
    });
    assert!(!gw.log().contains("panicked"));
    gw.assert_fds_back_to(baseline, Duration::from_secs(REAP_SECS + 10));
}

/// A missing certificate or key file stops rtmpgate at start, with an error naming the file
/// and a non-zero exit status.
#[test]
fn missing_tls_file_fails_at_start_naming_it() {
    let c = dev_certs();
    let chain = c.chain.display().to_string();
    let key = c.key.display().to_string();
    let dir = temp_dir();
    let missing = dir.path().join("no-such-file.pem").display().to_string();
    for (which, cert, key) in [
        ("certificate", missing.as_str(), key.as_str()),
        ("key", chain.as_str(), missing.as_str()),
    ] {
        let (status, log) = Gateway::builder()
            .args(&[
                "--listen",
                "rtmps://127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--upstream",
                "rtmp://127.0.0.1:1",
            ])
            .run_to_exit(Duration::from_secs(10));
        eprintln!("missing {which}: {status:?}: {}", log.trim());
        assert!(
            status.is_some_and(|s| !s.success()),
            "missing {which}: expected a non-zero exit, got {status:?}"
        );
        assert!(
            log.contains(&missing),
            "missing {which}: the error does not name {missing}:\n{log}"
        );
        assert!(!log.contains("listening on"), "it started listening anyway");
        assert_eq!(
            log.matches("No such file").count(),
            1,
            "missing {which}: the OS error should be said once:\n{log}"
        );
    }
}
