//! Configuration a hostile or careless operator could write (issue 9, item 7): huge
//! durations are refused at load and by `--check-config`, naming the key, instead of
//! panicking later when a deadline (now + duration) overflows the clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn huge_durations_are_refused_by_check_config_naming_the_key() {
    for (toml, key) in [
        (
            "[limits]\nhandshake_timeout_secs = 9223372036854775807\n",
            "limits.handshake_timeout_secs",
        ),
        (
            "[limits]\ntunnel_order_wait_ms = 9223372036854775807\n",
            "limits.tunnel_order_wait_ms",
        ),
        (
            "[engine]\nwrite_timeout_secs = 9223372036854775807\n",
            "engine.write_timeout_secs",
        ),
    ] {
        for check in [true, false] {
            let mut b = Gateway::builder()
                .config(toml)
                .args(&["--listen", "rtmp://127.0.0.1:0"]);
            if check {
                b = b.args(&["--check-config"]);
            }
            let (status, log) = b.run_to_exit(Duration::from_secs(20));
            let status = status.expect("rtmpgate kept running with an invalid duration");
            assert!(!status.success(), "{key} accepted: {log}");
            assert!(
                log.contains(&format!("{key}: ")) && log.contains("at most 31536000"),
                "the error does not name {key}: {log}"
            );
            assert!(!log.contains("panicked"), "{log}");
        }
    }
}
