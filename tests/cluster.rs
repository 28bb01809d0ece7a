//! Several rtmpgate nodes behind a real HAProxy: RTMPT sessions whose requests the balancer
//! spreads over every node (each request to the next node, round robin) are served whole,
//! the other nodes forwarding each request to the session's node over the cluster link;
//! a killed node's sessions get 404 at once while the others carry on; and the recipe
//! without forwarding (examples/cluster/haproxy.cfg, routing by the session id's node
//! prefix) with the real haproxy. Media compared packet by packet (framemd5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "cluster-test-secret-0123456789";
const SECONDS: u32 = 5;
/// Tunnel sessions of players stopped by a signal (no /close) are reaped after this.
const REAP_SECS: u64 = 2;

/// A node: the gateway, its id, its cluster link port.
struct Node {
    gw: Gateway,
    id: String,
}

impl Node {
    /// The address its one listener (RTMP and RTMPT on one port) is bound to.
    fn addr(&self) -> SocketAddr {
        self.gw.addr("rtmp")
    }
}

/// `n` nodes n1..nN relaying to `origin`, each listing every node's link as a peer (its
/// own included: the same list on every node, as a deployment would have). `extra` goes
/// on every node's command line.
fn start_nodes(n: usize, origin: &Nginx, extra: &[&str]) -> Vec<Node> {
    let links: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (0..n)
        .map(|i| {
            let id = format!("n{}", i + 1);
            let admin = if extra.contains(&"--admin") {
                vec![]
            } else {
                vec!["--admin".to_string(), "off".to_string()]
            };
            let mut args: Vec<String> = vec![
                "--listen".into(),
                "rtmp://127.0.0.1:0".into(),
                "--upstream".into(),
                origin.upstream(),
                "--node-id".into(),
                id.clone(),
                "--cluster-listen".into(),
                format!("127.0.0.1:{}", links[i]),
                "--cluster-secret".into(),
                SECRET.into(),
            ];
            args.extend(admin);
            for port in &links {
                args.push("--peer".into());
                args.push(format!("http://127.0.0.1:{port}"));
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let gw = Gateway::builder()
                .config(&format!("[limits]\ntunnel_reap_secs = {REAP_SECS}\n"))
                .env("RUST_LOG", "info,rtmpgate::cluster=debug")
                .args(&refs)
                .start();
            Node { gw, id }
        })
        .collect()
}

/// HAProxy in HTTP mode, round robin per request: `http-server-close` closes the server
/// side after each answer, so every request of a session is balanced again and lands on
/// the next node. A refused connection (a dead node) is retried on another node. HAProxy
/// writes header names in lower case, which librtmp (rtmpdump) does not read: the
/// `h1-case-adjust` lines give it `Content-Length` back.
///
/// With `per_request` false, a client connection keeps its server connection
/// (`http-keep-alive`, `prefer-last-server`): connections are spread, not requests.
fn haproxy_round_robin(nodes: &[SocketAddr], per_request: bool) -> (Proc, tempfile::TempDir, u16) {
    let spread = if per_request {
        "option http-server-close\n  http-reuse never"
    } else {
        "option http-keep-alive\n  option prefer-last-server\n  http-reuse never"
    };
    let dir = temp_dir();
    let port = free_port();
    let mut conf = format!(
        "global\n  maxconn 1000\n  h1-case-adjust content-length Content-Length\n  \
         h1-case-adjust content-type Content-Type\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  \
         timeout server 60s\n  {spread}\n  retries 3\n  \
         option redispatch 1\n\
         frontend tunnel\n  bind 127.0.0.1:{port}\n  option h1-case-adjust-bogus-client\n  \
         default_backend nodes\n\
         backend nodes\n  balance roundrobin\n"
    );
    for (i, a) in nodes.iter().enumerate() {
        conf.push_str(&format!("  server s{i} {a}\n"));
    }
    start_haproxy(dir, &conf, port)
}

fn start_haproxy(dir: tempfile::TempDir, conf: &str, port: u16) -> (Proc, tempfile::TempDir, u16) {
    let path = dir.path().join("haproxy.cfg");
    fs::write(&path, conf).unwrap();
    let mut cmd = Command::new(&peers().haproxy);
    cmd.arg("-db").arg("-f").arg(&path);
    let mut proc = Proc::spawn("haproxy", cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until(START_TIMEOUT, || accepts(addr) || !proc.is_running()) && proc.is_running(),
        "haproxy did not start: {}\n{conf}",
        proc.log()
    );
    (proc, dir, port)
}

/// How many tunnel sessions each node has opened so far.
fn owners(nodes: &[Node]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| n.gw.count_log("RTMPT session opened"))
        .collect()
}

/// ffmpeg publishes over RTMPT through HAProxy, an ffmpeg and two rtmpdump players play
/// over RTMPT through it; every request goes to the next node. Every player gets the whole
/// stream, packet for packet, and the nodes did forward requests to each other.
#[test]
fn tunnel_sessions_survive_per_request_round_robin() {
    let p = peers();
    let origin = Nginx::start();
    let nodes = start_nodes(3, &origin, &["--admin", "127.0.0.1:0"]);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::addr).collect();
    let (_haproxy, _hdir, port) = haproxy_round_robin(&addrs, true);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = format!("rtmpt://127.0.0.1:{port}/live/cluster");
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[
            (PlayerKind::Ffmpeg, url.clone()),
            (PlayerKind::Rtmpdump, url.clone()),
            (PlayerKind::Rtmpdump, url.clone()),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    let opened = owners(&nodes);
    eprintln!("sessions opened per node: {opened:?}");
    assert_eq!(
        opened.iter().sum::<usize>(),
        4,
        "four tunnel sessions (a publisher, three players)"
    );
    // Every node forwarded requests for sessions it does not own. A node that owns every
    // session has none to forward: round robin per request may send all four /open to one
    // node (seen under load: [4, 0, 0]), so only nodes with a session elsewhere must.
    for (k, at) in nodes.iter().enumerate() {
        let n: usize = nodes
            .iter()
            .filter(|o| o.id != at.id)
            .map(|o| at.gw.count_log(&format!("to node {}", o.id)))
            .sum();
        let elsewhere: usize = (0..nodes.len())
            .filter(|&j| j != k)
            .map(|j| opened[j])
            .sum();
        eprintln!(
            "node {} forwarded {n} requests ({elsewhere} sessions on other nodes)",
            at.id
        );
        assert!(
            elsewhere == 0 || n > 0,
            "node {} forwarded no request: the balancer did not spread sessions' requests",
            at.id
        );
        // /metrics counts the same requests, by verb, with their latency.
        let text = scrape(&at.gw);
        let counted: u64 = ["send", "idle", "close"]
            .iter()
            .map(|v| {
                metric(
                    &text,
                    &format!("rtmpgate_cluster_forwarded_requests_total{{verb=\"{v}\"}}"),
                )
            })
            .sum();
        assert_eq!(counted, n as u64, "node {}: /metrics vs log lines", at.id);
        assert_eq!(metric(&text, "rtmpgate_cluster_forward_failures_total"), 0);
        let send_count = metric(
            &text,
            "rtmpgate_cluster_forward_duration_seconds_count{verb=\"send\"}",
        );
        // The smallest bucket holding 99% of the forwarded /send requests (a figure for the
        // report; latency bounds belong to bench/compare, not to a timed test).
        let p99 = [
            "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
        ]
        .iter()
        .find(|le| {
            let below = metric(
                &text,
                &format!(
                    "rtmpgate_cluster_forward_duration_seconds_bucket{{verb=\"send\",le=\"{le}\"}}"
                ),
            );
            send_count > 0 && below * 100 >= send_count * 99
        });
        eprintln!(
            "node {}: {send_count} forwarded /send, p99 within {} s",
            at.id,
            p99.unwrap_or(&">0.25")
        );
    }
}

/// GET /metrics from a node's admin listener (curl).
fn scrape(gw: &Gateway) -> String {
    let url = format!("http://{}/metrics", admin_addr(gw));
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "--max-time", "5", &url]);
    String::from_utf8_lossy(&run_ok(&mut cmd, Duration::from_secs(10))).into_owned()
}

/// The value of the sample named exactly `name` (with its labels), 0 if absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Finishes a player: once its file has not grown for 2 s, SIGINT (it writes out its
/// file), SIGKILL after 5 s more; at most `deadline`.
fn stop_player(proc: &mut Proc, out: &Path, deadline: Instant) {
    let size = || fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let mut last = (size(), Instant::now());
    while Instant::now() < deadline && proc.is_running() {
        let now = size();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            proc.signal("INT");
            if proc.wait_timeout(Duration::from_millis(300)).is_none() {
                proc.signal("INT");
            }
            proc.wait_or_kill(Duration::from_secs(5));
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    proc.kill();
}

/// Three nodes behind HAProxy spreading connections round robin, rtmpdump players over
/// RTMPT, the publisher straight to the origin. One node is killed mid-stream: the players
/// whose sessions it owned end within 2 s (the request in flight fails with the node), a
/// request for a session of the dead node sent to a live node is answered 404 within 1 s
/// (the link refuses; nothing waits), and the other players receive every packet.
#[test]
fn killed_node_sessions_end_at_once_others_carry_on() {
    let p = peers();
    let origin = Nginx::start();
    let nodes = start_nodes(3, &origin, &[]);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::addr).collect();
    // Connections spread, not requests: with every request of every session passing
    // through every node, a request in flight through the killed node is lost with it
    // (and its answer's bytes), whichever node owns the session.
    let (_haproxy, _hdir, port) = haproxy_round_robin(&addrs, false);
    let dir = temp_dir();
    let src_file = source_flv(8);
    let src = framemd5(&src_file);
    let url = format!("rtmpt://127.0.0.1:{port}/live/kill");
    // Players one at a time, noting the node that opened each one's session, until some
    // node owns at least one of them but not all.
    let mut players: Vec<(Proc, PathBuf, usize)> = Vec::new();
    let pick = |players: &[(Proc, PathBuf, usize)]| {
        (0..nodes.len()).find(|&k| {
            let on = players.iter().filter(|p| p.2 == k).count();
            on > 0 && on < players.len()
        })
    };
    let mut victim = None;
    for i in 0..8 {
        let before = owners(&nodes);
        let out = dir.path().join(format!("player{i}.flv"));
        let proc = PlayerKind::Rtmpdump.start(&url, &out);
        let mut owner = None;
        assert!(
            wait_until(START_TIMEOUT, || {
                let now = owners(&nodes);
                owner = (0..nodes.len()).find(|&k| now[k] > before[k]);
                owner.is_some()
            }),
            "player {i}'s session was not opened on any node"
        );
        let owner = owner.unwrap();
        assert!(
            wait_until(START_TIMEOUT, || proc
                .log_tail()
                .contains("Starting Live Stream")),
            "player {i} did not get to play: {}",
            proc.log()
        );
        players.push((proc, out, owner));
        if players.len() >= 3 {
            victim = pick(&players);
            if victim.is_some() {
                break;
            }
        }
    }
    let victim = victim.expect("no node owned some but not all player sessions in 8 tries");
    eprintln!(
        "player sessions on nodes {:?}; killing {}",
        players.iter().map(|p| p.2).collect::<Vec<_>>(),
        nodes[victim].id
    );
    thread::sleep(Duration::from_millis(300));
    let mut publisher = publish(&p.ffmpeg, &origin.url("live/kill"), &src_file);
    thread::sleep(Duration::from_secs(3));
    let killed_at = Instant::now();
    nodes[victim].gw.signal("KILL");
    for (proc, _, owner) in players.iter_mut().filter(|p| p.2 == victim) {
        let ended = proc.wait_timeout(Duration::from_secs(2));
        eprintln!(
            "a player of the killed node ended {:?} after the kill",
            ended.map(|_| killed_at.elapsed())
        );
        assert!(
            ended.is_some(),
            "a player whose session node {} owned was still running 2 s after the node \
             died: {}",
            *owner + 1,
            proc.log()
        );
    }
    // Any session id of the dead node, asked of a live node: 404 at once, not a hang.
    let live = nodes.iter().find(|n| n.id != nodes[victim].id).unwrap();
    let asked = Instant::now();
    let reply = curl_post(
        &format!(
            "http://{}/idle/{}-{}/1",
            live.addr(),
            nodes[victim].id,
            "0".repeat(32)
        ),
        b"",
    )
    .expect("no answer from a live node");
    let took = asked.elapsed();
    eprintln!(
        "a request for a session of the dead node: {} in {took:?}",
        reply.status
    );
    assert_eq!(
        reply.status,
        404,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(
        took < Duration::from_secs(1),
        "the 404 for a dead node's session took {took:?}"
    );
    let st = publisher.wait_timeout(Duration::from_secs(60));
    assert!(st.is_some_and(|s| s.success()), "{}", publisher.log());
    let deadline = Instant::now() + PLAYER_TAIL;
    for (proc, out, owner) in players.iter_mut().filter(|p| p.2 != victim) {
        stop_player(proc, out, deadline);
        let got = framemd5(out);
        assert_whole_run(
            &format!("rtmpdump on node n{}", *owner + 1),
            &src,
            &got,
            PlayerKind::Rtmpdump.max_tail_ms(),
        );
    }
}

/// The example recipe (examples/cluster/haproxy.cfg) with the real haproxy: tunnel
/// requests routed by the session id's node prefix (no forwarding: the nodes have no
/// link), /open/1 round robin, RTMP over L4 with PROXY v2, nodes accepting it from
/// HAProxy only. ffmpeg publishes over RTMP, ffmpeg and rtmpdump play over RTMPT; every
/// packet arrives.
#[test]
fn example_haproxy_recipe_routes_by_node_prefix() {
    let p = peers();
    let origin = Nginx::start();
    let nodes: Vec<Node> = (1..=3)
        .map(|i| {
            let id = format!("n{i}");
            let gw = Gateway::builder()
                .config(&format!("[limits]\ntunnel_reap_secs = {REAP_SECS}\n"))
                .args(&[
                    "--listen",
                    "rtmp://127.0.0.1:0",
                    "--admin",
                    "127.0.0.1:0",
                    "--upstream",
                    &origin.upstream(),
                    "--node-id",
                    &id,
                    "--accept-proxy-protocol",
                    "--trusted-proxy",
                    "127.0.0.1/32",
                ])
                .start();
            Node { gw, id }
        })
        .collect();
    let recipe = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/cluster/haproxy.cfg"
    ))
    .unwrap();
    let rtmp_port = free_port();
    let http_port = free_port();
    // Comments name example addresses; only the configuration lines are mapped.
    let recipe: String = recipe
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    // maxconn sized for a real host needs more descriptors than a test may open.
    let mut conf = recipe
        .replace("maxconn 100000", "maxconn 1000")
        .replace("bind :1935", &format!("bind 127.0.0.1:{rtmp_port}"))
        .replace("bind :80", &format!("bind 127.0.0.1:{http_port}"))
        // The RTMPS frontend is not used here (the compose recipe's test uses it).
        .replace("bind :443", &format!("bind 127.0.0.1:{}", free_port()));
    for (i, n) in nodes.iter().enumerate() {
        let a = n.addr().to_string();
        let admin = admin_addr(&n.gw).port();
        let host = format!("10.0.0.1{}:", i + 1);
        // Each node's health check goes to its own admin port.
        conf = conf
            .lines()
            .map(|l| {
                let l = if l.contains(&host) {
                    l.replace("port 9935", &format!("port {admin}"))
                } else {
                    l.to_string()
                };
                format!("{l}\n")
            })
            .collect::<String>()
            .replace(&format!("{host}1935"), &a)
            .replace(&format!("{host}8080"), &a)
            .replace(&format!("{host}8443"), &a);
    }
    assert!(
        !conf.contains("10.0.0."),
        "the recipe names a node address the test does not map: {conf}"
    );
    // The stats socket and log target of the recipe are for a real host.
    let conf: String = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("log ") && !l.contains("stats socket"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (_haproxy, _hdir, _) = start_haproxy(temp_dir(), &conf, http_port);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let tunnel = format!("rtmpt://127.0.0.1:{http_port}/live/prefix");
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("rtmp://127.0.0.1:{rtmp_port}/live/prefix"),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, tunnel.clone()),
            (PlayerKind::Rtmpdump, tunnel.clone()),
            (PlayerKind::Rtmpdump, tunnel.clone()),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    let opened = owners(&nodes);
    eprintln!("sessions opened per node: {opened:?}");
    assert_eq!(opened.iter().sum::<usize>(), 3, "three tunnel players");
    // The RTMP publisher's real address reached its node through PROXY v2.
    assert!(
        wait_until(LOG_LAG, || nodes
            .iter()
            .any(|n| n.gw.log_contains("rtmp 127.0.0.1:"))),
        "no node logged the publisher"
    );
}

/// `GET http://ADDR/PATH` with curl: the status code (0 when nothing answered).
fn http_get_status(addr: SocketAddr, path: &str) -> u16 {
    let mut cmd = Command::new(&peers().curl);
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "-w",
        "%{http_code}",
    ])
    .arg(format!("http://{addr}{path}"));
    let (_, out, _) = run_capture(&mut cmd, Duration::from_secs(10));
    String::from_utf8_lossy(&out).trim().parse().unwrap_or(0)
}

/// Draining a node with the link: two nodes behind per-request round-robin HAProxy, an
/// rtmpdump player over RTMPT, the publisher straight to the origin. SIGTERM to the node
/// that owns the player's session: its `/readyz` answers 503 at once; the session carries
/// on through the drain (its requests reach the draining node over the link from the
/// other node, its own listeners being closed); after `drain_secs` the session ends (the
/// player's next request gets 404) and the node exits 0.
#[test]
fn draining_node_keeps_its_tunnel_sessions_for_the_drain_then_404() {
    const DRAIN: Duration = Duration::from_secs(3);
    let p = peers();
    let origin = Nginx::start();
    let nodes = start_nodes(2, &origin, &["--drain-secs", "3", "--admin", "127.0.0.1:0"]);
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::addr).collect();
    let (_haproxy, _hdir, port) = haproxy_round_robin(&addrs, true);
    let dir = temp_dir();
    let src_file = source_flv(20);
    let url = format!("rtmpt://127.0.0.1:{port}/live/drain");
    let out = dir.path().join("player.flv");
    let mut player = PlayerKind::Rtmpdump.start(&url, &out);
    let mut owner = None;
    assert!(
        wait_until(START_TIMEOUT, || {
            owner = (0..nodes.len()).find(|&k| owners(&nodes)[k] > 0);
            owner.is_some()
        }),
        "the player's session was not opened on any node"
    );
    let owner = &nodes[owner.unwrap()];
    let mut publisher = publish(&p.ffmpeg, &origin.url("live/drain"), &src_file);
    let size = || fs::metadata(&out).map_or(0, |m| m.len());
    assert!(
        wait_until(Duration::from_secs(15), || size() > 50_000),
        "the stream did not start: {}",
        player.log()
    );
    let admin = admin_addr(&owner.gw);
    assert_eq!(http_get_status(admin, "/readyz"), 200);
    let t = Instant::now();
    owner.gw.signal("TERM");
    let ready = http_get_status(admin, "/readyz");
    let at_signal = size();
    eprintln!("/readyz answered {ready} {:?} after SIGTERM", t.elapsed());
    assert_eq!(
        ready, 503,
        "/readyz did not answer 503 at once when draining"
    );
    thread::sleep(DRAIN.saturating_sub(t.elapsed()) / 2);
    let mid = size();
    eprintln!(
        "the player got {} bytes in the first {:.1} s of the drain",
        mid - at_signal,
        t.elapsed().as_secs_f64()
    );
    assert!(
        mid > at_signal + 20_000,
        "the tunnel session did not carry on during the drain ({at_signal} bytes at the \
         signal, {mid} bytes {:?} later)",
        t.elapsed()
    );
    assert!(player.is_running(), "the player ended during the drain");
    let ended = player.wait_timeout(DRAIN + Duration::from_secs(3));
    eprintln!(
        "the player ended {:?} after SIGTERM (drain {DRAIN:?})",
        ended.map(|_| t.elapsed())
    );
    assert!(
        ended.is_some(),
        "the player was still running {:?} after SIGTERM with a {DRAIN:?} drain",
        t.elapsed()
    );
    assert!(
        t.elapsed() >= DRAIN - Duration::from_millis(200),
        "the session ended {:?} after SIGTERM, before the drain was over",
        t.elapsed()
    );
    publisher.kill();
}
