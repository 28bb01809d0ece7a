//! The door's configuration under attack (issue 9, item 7): with `accept_proxy_protocol`,
//! only the `trusted_proxies` may connect (a forged PROXY header from elsewhere is refused,
//! while a real haproxy with `send-proxy-v2` in the list is served exactly); and huge
//! durations are refused at load and by `--check-config`, naming the key, instead of
//! panicking later when a deadline (now + duration) overflows the clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
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

/// haproxy in TCP mode on 127.0.0.1, forwarding to `backend` with a PROXY v2 header.
fn haproxy_sending_proxy_v2(backend: SocketAddr) -> (Proc, TempDir, u16) {
    haproxy_tcp(backend, "", "send-proxy-v2")
}

/// A PROXY v2 header claiming `client` (TCP over IPv4), then a plain C0+C1.
fn forged_v2(client: [u8; 4]) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0, 12]);
    b.extend_from_slice(&client);
    b.extend_from_slice(&[127, 0, 0, 1]);
    b.extend_from_slice(&4242u16.to_be_bytes());
    b.extend_from_slice(&1935u16.to_be_bytes());
    b.push(3);
    b.extend((0..1536).map(|i| (i % 251) as u8));
    b
}

/// Sends `bytes` from `from` and returns how many bytes came back before the close.
fn answer_from(to: SocketAddr, from: IpAddr, bytes: &[u8]) -> usize {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let mut tcp: TcpStream = s.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = tcp.write_all(bytes);
    let mut got = 0;
    let mut buf = [0u8; 4096];
    // The gateway either closes (refused) or answers S0+S1+S2 and waits for C2.
    while got < 3073 {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

#[test]
fn proxy_headers_only_from_trusted_proxies() {
    let dir = temp_dir();
    let src = source_flv(4);
    let want = framemd5(&src);
    let gw = Gateway::start(&[
        "--listen",
        "rtmp://127.0.0.1:0",
        "--accept-proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1/32",
    ]);
    let addr = gw.addr("rtmp");

    // From 127.0.0.2, not a trusted proxy: a forged header claiming 203.0.113.9 is refused
    // before it is read, so the address is never believed.
    let outsider: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(answer_from(addr, outsider, &forged_v2([203, 0, 113, 9])), 0);
    assert!(
        gw.wait_log("not a trusted proxy", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert!(!gw.log_contains("203.0.113.9"), "{}", gw.log());
    // The same header from the trusted address is believed.
    let trusted: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(
        answer_from(addr, trusted, &forged_v2([198, 51, 100, 7])),
        3073
    );
    assert!(gw.wait_log("198.51.100.7:4242", Duration::from_secs(5)));

    // A real haproxy (send-proxy-v2) on the trusted address: publish and play through it.
    let (_haproxy, _hdir, port) = haproxy_sending_proxy_v2(addr);
    let url = format!("rtmp://127.0.0.1:{port}/live/via-haproxy");
    let out = dir.path().join("player.flv");
    let mut player = play_rtmpdump(&url, &out);
    std::thread::sleep(Duration::from_millis(1500));
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    wait_publisher_then_player(
        &mut publisher,
        &mut player,
        Duration::from_secs(30),
        "through haproxy",
    );
    let got = framemd5(&out);
    let run = contiguous_run(&want, &got)
        .unwrap_or_else(|e| panic!("player through haproxy: {e}; {}", player.log()));
    eprintln!("player through haproxy send-proxy-v2: {run}");
    assert_eq!(run.start("video"), Some(0));
    assert!(count_media(&got, "video") * 100 >= count_media(&want, "video") * 85);
    // Refusals: one line however many outsiders knock.
    for _ in 0..50 {
        answer_from(addr, outsider, &forged_v2([203, 0, 113, 9]));
    }
    assert!(
        gw.count_log("not a trusted proxy") <= 4,
        "{}",
        gw.count_log("not a trusted proxy")
    );
}
