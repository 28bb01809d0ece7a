//! Backend pools with real peers: round-robin spreads 300 RTMP clients over three
//! nginx-rtmp backends (counted by the gateway's metrics and by each nginx's own stat page),
//! a fourth backend that refuses connections taking no share (not even its successor's);
//! `health_check = "rtmp"` marks down listeners that accept TCP but do not speak RTMP (one
//! silent, one answering the handshake with garbage after it) while `tcp` keeps them up,
//! sends no client to them, and marks one up again once a real nginx-rtmp takes its port,
//! with the transitions counted; a reload keeps the up/down state, counters and client
//! counts of the backends it keeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod relay_support;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use relay_support::*;

const CLIENTS: usize = 300;

#[test]
fn round_robin_spreads_300_clients_within_10_percent() {
    let backends: Vec<StatNginx> = (0..3).map(|_| StatNginx::start(&["live"])).collect();
    let urls: Vec<String> = backends.iter().map(StatNginx::upstream).collect();
    // Down from the first client sent to it (refused), between the first and the second:
    // its turns must be shared by all three (given all to the second, that one would
    // serve about 150 of the 300).
    let dead = format!("rtmp://127.0.0.1:{}", free_port());
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\nhealth_interval_secs = 60\n\n\
             [[upstreams]]\nname = \"rr\"\napps = [\"live\"]\nbalance = \"round-robin\"\n\
             health_check = \"tcp\"\nbackends = [\"{}\", \"{dead}\", \"{}\", \"{}\"]\n",
            urls[0], urls[1], urls[2]
        ))
        .start();
    let admin = admin_addr(&gw);
    let addr = gw.addr("rtmp");
    let started = Instant::now();
    // Ten at a time (nginx-rtmp's replies wait on delayed ACKs, ~40 ms per client).
    let clients: Vec<RawClient> = thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|t| {
                scope.spawn(move || {
                    (0..CLIENTS / 10)
                        .map(|k| {
                            let i = t * (CLIENTS / 10) + k;
                            let mut c = RawClient::connect(addr, "live")
                                .unwrap_or_else(|e| panic!("client {i}: {e}"));
                            c.play(&format!("s{}", i % 7))
                                .unwrap_or_else(|e| panic!("client {i} play: {e}"));
                            c
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a client thread failed"))
            .collect()
    });
    eprintln!(
        "{CLIENTS} clients connected and playing through the relay in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Every client is in a stream on some backend (nginx lists a play a moment after it).
    let on_backends = || {
        backends
            .iter()
            .map(StatNginx::stream_clients)
            .collect::<Vec<_>>()
    };
    let mut nginx_counts = on_backends();
    assert!(
        wait_until(Duration::from_secs(10), || {
            nginx_counts = on_backends();
            nginx_counts.iter().sum::<usize>() == CLIENTS
        }),
        "the backends' stat pages list {nginx_counts:?} clients, not {CLIENTS} in all"
    );
    let m = metrics(admin);
    let gw_counts: Vec<u64> = urls
        .iter()
        .map(|u| backend_clients(&m, "rr", u).unwrap_or_else(|| panic!("no series for {u}:\n{m}")))
        .collect();
    let tcp_counts: Vec<usize> = backends.iter().map(|b| established_on(b.port)).collect();
    eprintln!(
        "per backend: gateway metrics {gw_counts:?}, nginx stat pages {nginx_counts:?}, \
         established TCP connections {tcp_counts:?}"
    );
    let fair = CLIENTS / 3;
    for (i, n) in nginx_counts.iter().enumerate() {
        assert!(
            n.abs_diff(fair) * 10 <= fair,
            "backend {i} serves {n} clients, more than 10% away from {fair}: {nginx_counts:?}"
        );
        assert_eq!(
            gw_counts[i] as usize, *n,
            "the gateway counts {} clients on backend {i}, its stat page {n}",
            gw_counts[i]
        );
        assert_eq!(tcp_counts[i], *n, "established connections on backend {i}");
    }
    assert_eq!(
        backend_up(&m, "rr", &dead),
        Some(0),
        "{dead} not marked down:\n{m}"
    );
    assert_eq!(
        backend_clients(&m, "rr", &dead),
        Some(0),
        "clients on {dead}:\n{m}"
    );
    // The clients leave: the gateway's counts go back to zero.
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = metrics(admin);
            urls.iter().all(|u| backend_clients(&m, "rr", u) == Some(0))
        }),
        "client counts did not go back to 0:\n{}",
        metrics(admin)
    );
}

/// A group with `health_check = "rtmp"` over a silent listener, one that answers the
/// handshake and then garbage, and a real nginx-rtmp; a second group checks the same two
/// listeners with `tcp` only. The rtmp check marks both down (the garbage one past its
/// handshake, at `connect`), tcp keeps them up; clients all reach nginx without a single
/// failover; once a real nginx-rtmp takes the silent listener's port, `health_rise` passing
/// checks mark it up and clients reach it. Transitions are counted.
#[test]
fn rtmp_health_check_marks_non_rtmp_listeners_down_and_a_real_server_up() {
    let mut silent = FakeBackend::start(Fake::Silent);
    let garbage = FakeBackend::start(Fake::Garbage);
    let real = StatNginx::start(&["live"]);
    // A real nginx-rtmp that does not serve the app the check connects to.
    let wrong_app = StatNginx::start(&["other"]);
    let (s_url, g_url, r_url) = (silent.upstream(), garbage.upstream(), real.upstream());
    let w_url = wrong_app.upstream();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\nconnect_timeout_secs = 5\n\
             health_interval_secs = 1\nhealth_rise = 2\nhealth_fall = 2\n\n\
             [[upstreams]]\nname = \"checked\"\napps = [\"live\"]\nbalance = \"round-robin\"\n\
             health_check = \"rtmp\"\nbackends = [\"{s_url}\", \"{g_url}\", \"{w_url}\", \"{r_url}\"]\n\n\
             [[upstreams]]\nname = \"tcp\"\napps = [\"other\"]\nhealth_check = \"tcp\"\n\
             backends = [\"{s_url}\", \"{g_url}\"]\n"
        ))
        .start();
    let admin = admin_addr(&gw);
    for url in [&s_url, &g_url, &w_url] {
        assert!(
            gw.wait_log(
                &format!("upstream checked backend {url} marked down"),
                Duration::from_secs(10)
            ),
            "{url} was not marked down by the rtmp check:\n{}",
            gw.log()
        );
    }
    let log = gw.log();
    let why = |url: &str| {
        log.lines()
            .find(|l| l.contains(&format!("backend {url} marked down")))
            .unwrap_or_default()
            .to_string()
    };
    eprintln!("silent: {}\ngarbage: {}", why(&s_url), why(&g_url));
    assert!(why(&s_url).contains("no answer within"), "{}", why(&s_url));
    // The garbage listener completes the handshake: only the connect step catches it.
    assert!(why(&g_url).contains("answer to connect"), "{}", why(&g_url));
    // A real RTMP server without the app: the connect step catches it too.
    assert!(
        why(&w_url).contains("closed without answering connect to app 'live'"),
        "{}",
        why(&w_url)
    );
    // Several more intervals: the tcp check keeps both up, nginx stays up.
    std::thread::sleep(Duration::from_secs(3));
    let m = metrics(admin);
    assert_eq!(backend_up(&m, "checked", &s_url), Some(0), "{m}");
    assert_eq!(backend_up(&m, "checked", &g_url), Some(0), "{m}");
    assert_eq!(backend_up(&m, "checked", &r_url), Some(1), "{m}");
    assert_eq!(backend_up(&m, "tcp", &s_url), Some(1), "{m}");
    assert_eq!(backend_up(&m, "tcp", &g_url), Some(1), "{m}");
    assert_eq!(transitions(&m, "checked", &s_url, "down"), Some(1), "{m}");
    assert_eq!(transitions(&m, "checked", &r_url, "down"), Some(0), "{m}");
    assert_eq!(transitions(&m, "tcp", &s_url, "down"), Some(0), "{m}");

    // Clients are not sent to them: each gets its connect answered by nginx at once (one
    // sent to the silent listener would wait connect_timeout_secs before failing over).
    let addr = gw.addr("rtmp");
    let mut clients = Vec::new();
    for i in 0..6 {
        let t = Instant::now();
        let c = RawClient::connect(addr, "live").unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "client {i} waited {:?} for its connect",
            t.elapsed()
        );
        clients.push(c);
    }
    let m = metrics(admin);
    assert_eq!(backend_clients(&m, "checked", &r_url), Some(6), "{m}");
    assert_eq!(backend_clients(&m, "checked", &s_url), Some(0), "{m}");
    assert_eq!(backend_clients(&m, "checked", &g_url), Some(0), "{m}");
    assert_eq!(backend_clients(&m, "checked", &w_url), Some(0), "{m}");
    assert_eq!(established_on(real.port), 6);
    assert_eq!(
        gw.count_log("trying the group's next backend"),
        0,
        "{}",
        gw.log()
    );

    // A real nginx-rtmp replaces the silent listener on its port: marked up after rise.
    let port = silent.port;
    silent.stop();
    let replaced = StatNginx::start_with(&["live"], Some(port), "");
    let up_line =
        format!("upstream checked backend {s_url} marked up: 2 health check(s) in a row passed");
    assert!(
        gw.wait_log(&up_line, Duration::from_secs(10)),
        "{s_url} was not marked up after 2 passing checks:\n{}",
        gw.log()
    );
    let m = metrics(admin);
    assert_eq!(backend_up(&m, "checked", &s_url), Some(1), "{m}");
    assert_eq!(transitions(&m, "checked", &s_url, "up"), Some(1), "{m}");
    assert_eq!(transitions(&m, "checked", &s_url, "down"), Some(1), "{m}");
    for i in 0..6 {
        let c = RawClient::connect(addr, "live").unwrap_or_else(|e| panic!("client {i}: {e}"));
        clients.push(c);
    }
    let m = metrics(admin);
    let on_replaced = backend_clients(&m, "checked", &s_url).unwrap_or(0);
    // Round-robin gives a down backend's turns to the next one up, so shares are uneven.
    assert!(
        on_replaced >= 1,
        "the replaced backend got {on_replaced} of 6 new clients:\n{m}"
    );
    assert_eq!(backend_clients(&m, "checked", &g_url), Some(0), "{m}");
    assert_eq!(established_on(replaced.port) as u64, on_replaced);
    eprintln!(
        "after the replacement: {on_replaced} of 6 new clients on it, {} on the first nginx",
        backend_clients(&m, "checked", &r_url).unwrap_or(0) - 6
    );
}

/// A reload (SIGHUP) that changes the relay keeps what it knows of the backends it keeps:
/// a backend marked down stays down (the new settings would take 2 failed checks a minute
/// apart to find out again), its transition counters go on from where they were, clients
/// relayed before the reload still count; a backend the reload adds starts up.
#[test]
fn reload_keeps_the_health_state_of_unchanged_backends() {
    let n1 = StatNginx::start(&["live"]);
    let n2 = StatNginx::start(&["live"]);
    let dead = format!("rtmp://127.0.0.1:{}", free_port());
    let config = |interval: u32, fall: u32, backends: &[&str]| {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        format!(
            "[upstream]\nrelay = \"connect\"\nhealth_interval_secs = {interval}\n\
             health_rise = 2\nhealth_fall = {fall}\n\n\
             [[upstreams]]\nname = \"g\"\napps = [\"live\"]\nbalance = \"first\"\n\
             health_check = \"tcp\"\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    let (u1, u2) = (n1.upstream(), n2.upstream());
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&config(1, 1, &[&dead, &u1]))
        .start();
    let admin = admin_addr(&gw);
    assert!(
        gw.wait_log(
            &format!("backend {dead} marked down"),
            Duration::from_secs(10)
        ),
        "{}",
        gw.log()
    );
    let addr = gw.addr("rtmp");
    let _clients: Vec<RawClient> = (0..2)
        .map(|_| RawClient::connect(addr, "live").unwrap())
        .collect();
    let before = metrics(admin);
    assert_eq!(backend_up(&before, "g", &dead), Some(0), "{before}");
    assert_eq!(backend_clients(&before, "g", &u1), Some(2), "{before}");
    let down_before = transitions(&before, "g", &dead, "down").unwrap();

    // Checks a minute apart needing 2 failures, and a backend added.
    fs::write(
        gw.dir().join("rtmpgate.toml"),
        config(60, 2, &[&dead, &u1, &u2]),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        gw.wait_log("configuration reloaded", Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    assert!(
        gw.expect_log("2 backend(s) keep their up/down state"),
        "{}",
        gw.log()
    );
    let after = metrics(admin);
    eprintln!(
        "after the reload:\n{}",
        after
            .lines()
            .filter(|l| l.starts_with("rtmpgate_upstream_backend"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(backend_up(&after, "g", &dead), Some(0), "{after}");
    assert_eq!(
        transitions(&after, "g", &dead, "down"),
        Some(down_before),
        "{after}"
    );
    assert_eq!(backend_clients(&after, "g", &u1), Some(2), "{after}");
    assert_eq!(backend_up(&after, "g", &u2), Some(1), "{after}");
    assert_eq!(transitions(&after, "g", &u2, "down"), Some(0), "{after}");
    // New clients skip the dead backend at once (balance first: it is first in the list).
    let t = Instant::now();
    let _c = RawClient::connect(addr, "live").unwrap();
    let m = metrics(admin);
    assert_eq!(backend_clients(&m, "g", &u1), Some(3), "{m}");
    assert_eq!(
        gw.count_log(&format!("backend {dead} marked down")),
        1,
        "the reload forgot the dead backend and found out again:\n{}",
        gw.log()
    );
    eprintln!(
        "a new client's connect after the reload took {:?}",
        t.elapsed()
    );
}
