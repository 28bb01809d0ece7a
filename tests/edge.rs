//! Edge mode (`[upstream] mode = "edge"`) against real nginx-rtmp origins: the players of a
//! stream on one edge share ONE pull from the origin (counted on the origin's socket table),
//! with every frame (framemd5 against the source); the pull ends after `edge_idle_secs`;
//! an origin restart is ridden out (the pull reconnects, the players stay and get the new
//! publish); with two origins every stream goes to its rendezvous-hashed origin and two
//! edges listing the origins in different orders agree (a publisher forwarded by one edge
//! is played through the other).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod edge_support;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use edge_support::*;

const SECONDS: u32 = 6;
const IDLE_SECS: u64 = 2;

/// An edge gateway in front of `origins` (rtmp://HOST:PORT each), one listener.
fn edge(origins: &[String]) -> Gateway {
    edge_with(origins, "")
}

/// The same with more of the config file (`extra` follows the `[upstream]` table).
fn edge_with(origins: &[String], extra: &str) -> Gateway {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "rtmp://127.0.0.1:0".into(),
        "--admin".into(),
        "off".into(),
        "--edge".into(),
    ];
    for o in origins {
        args.push("--upstream".into());
        args.push(o.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::builder()
        .config(&format!(
            "[upstream]\nedge_idle_secs = {IDLE_SECS}\n{extra}"
        ))
        .env("RUST_LOG", "info,rtmpgate::engine::edge=debug")
        .args(&refs)
        .start()
}

#[test]
fn players_of_one_stream_share_one_pull_then_it_ends_when_idle() {
    let origin = Nginx::start();
    let gw = edge(&[origin.upstream()]);
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    // Ten players before the publisher: six over RTMP (ffmpeg and rtmpdump), four over RTMPT.
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for i in 0..10 {
        let out = dir.path().join(format!("p{i}.flv"));
        let scheme = if i < 6 { "rtmp" } else { "rtmpt" };
        let url = format!("{}/live/shared", gw.url(scheme));
        let p = if i % 2 == 0 {
            play_ffmpeg(&url, &out)
        } else {
            play_rtmpdump(&url, &out)
        };
        players.push(p);
        outs.push(out);
    }
    // The first player's pull is the only connection to the origin.
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("edge pull live/shared: playing from")),
        "no pull started: {}",
        gw.log()
    );
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        origin.clients(),
        1,
        "connections on the origin before the publisher"
    );
    let mut publisher = publish(&peers().ffmpeg, &origin.url("live/shared"), &src);
    // While the stream runs: the publisher and ONE pull, whatever the ten players do.
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(u64::from(SECONDS) - 2);
    while Instant::now() < until {
        most = most.max(origin.clients());
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        most, 2,
        "the origin saw {most} connections (publisher + pulls); want 1 pull"
    );
    assert!(publisher
        .wait_timeout(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    wait_players(&mut players, PLAYER_TAIL);
    // The players are gone: the pull ends edge_idle_secs later (plus a check period).
    let left = Instant::now();
    assert!(
        wait_until(Duration::from_secs(IDLE_SECS + 5), || origin.clients() == 0),
        "the pull still holds a connection to the origin {:?} after the last player: {}",
        left.elapsed(),
        gw.log()
    );
    let after = left.elapsed();
    eprintln!("pull closed {after:?} after the last player left (edge_idle_secs = {IDLE_SECS})");
    // The players' sessions close a moment before their processes are reaped here.
    assert!(
        after >= Duration::from_millis(IDLE_SECS * 1000 - 500),
        "the pull ended {after:?} after the last player, before edge_idle_secs = {IDLE_SECS}"
    );
    for (i, out) in outs.iter().enumerate() {
        let got = framemd5(out);
        let what = format!("player {i}");
        assert_whole_run(&what, &want, &got, 700);
    }
    // Logged as the connection closes; the log reader may be a moment behind.
    assert!(
        gw.wait_log("edge pull live/shared: ended", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.log()
            .matches("edge pull live/shared: playing from")
            .count(),
        1,
        "one pull for the whole run: {}",
        gw.log()
    );
}

/// The run of `got`'s video that starts at its LAST occurrence of the source's first video
/// frame (the second publish, after the origin came back).

#[test]
fn origin_restart_the_pull_reconnects_and_players_carry_on() {
    let origin = Nginx::start();
    let port = origin.port();
    let gw = edge(&[origin.upstream()]);
    let src = source_flv(SECONDS);
    let want = video(&framemd5(&src));
    let dir = temp_dir();
    let outs = [dir.path().join("a.flv"), dir.path().join("b.flv")];
    let mut players = vec![
        play_ffmpeg(&format!("{}/live/restart", gw.url("rtmp")), &outs[0]),
        play_rtmpdump(&format!("{}/live/restart", gw.url("rtmpt")), &outs[1]),
    ];
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("edge pull live/restart: playing from")));
    let mut first = publish(&peers().ffmpeg, &origin.url("live/restart"), &src);
    thread::sleep(Duration::from_secs(3));
    // The origin dies mid-stream (its publisher with it) and comes back on its port.
    let mut origin = origin;
    origin.kill();
    let _ = first.wait_timeout(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    let origin2 = Nginx::start_on_port(port);
    let mut second = publish(&peers().ffmpeg, &origin2.url("live/restart"), &src);
    assert!(second
        .wait_timeout(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    wait_players(&mut players, PLAYER_TAIL);
    for (i, out) in outs.iter().enumerate() {
        let got = framemd5(out);
        let run = after_restart(&want, &got);
        let r = assert_contiguous_run(&format!("player {i} after the restart"), &want, &run, 0.9);
        assert_eq!(r.start("video"), Some(0), "player {i}: {r}");
    }
    let log = gw.log();
    assert!(
        log.matches("edge pull live/restart: playing from").count() >= 2,
        "the pull did not reconnect: {log}"
    );
    assert_eq!(
        log.matches("edge pull live/restart: started").count(),
        1,
        "the players stayed on one pull: {log}"
    );
    drop(origin);
}

#[test]
fn two_origins_each_stream_goes_to_its_hashed_origin_and_edges_agree() {
    let oa = Nginx::start();
    let ob = Nginx::start();
    let origins = [oa.upstream(), ob.upstream()];
    // The two edges list the origins in different orders.
    let e1 = edge(&origins);
    let e2 = edge(&[ob.upstream(), oa.upstream()]);
    let pick = |o: &str| {
        (0..200)
            .map(|i| format!("s{i}"))
            .find(|n| hashed_origin(&origins, "live", n) == o)
            .unwrap()
    };
    let (na, nb) = (pick(&origins[0]), pick(&origins[1]));
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let (out_a, out_b) = (dir.path().join("a.flv"), dir.path().join("b.flv"));
    // Each stream is played through one edge and published through the other.
    let mut players = vec![
        play_ffmpeg(&format!("{}/live/{na}", e2.url("rtmp")), &out_a),
        play_rtmpdump(&format!("{}/live/{nb}", e1.url("rtmpt")), &out_b),
    ];
    assert!(wait_until(Duration::from_secs(10), || {
        e2.log()
            .contains(&format!("edge pull live/{na}: playing from"))
            && e1
                .log()
                .contains(&format!("edge pull live/{nb}: playing from"))
    }));
    let mut pa = publish(
        &peers().ffmpeg,
        &format!("{}/live/{na}", e1.url("rtmp")),
        &src,
    );
    let mut pb = publish(
        &peers().ffmpeg,
        &format!("{}/live/{nb}", e2.url("rtmp")),
        &src,
    );
    for p in [&mut pa, &mut pb] {
        assert!(
            p.wait_timeout(Duration::from_secs(30))
                .is_some_and(|s| s.success()),
            "{}",
            p.log()
        );
    }
    wait_players(&mut players, PLAYER_TAIL);
    assert_whole_run(
        "player of the stream hashed to origin A",
        &want,
        &framemd5(&out_a),
        700,
    );
    assert_whole_run(
        "player of the stream hashed to origin B",
        &want,
        &framemd5(&out_b),
        700,
    );
    let (l1, l2) = (e1.log(), e2.log());
    for (log, line) in [
        (
            &l1,
            format!("edge forward live/{na}: publishing to {}", origins[0]),
        ),
        (
            &l2,
            format!("edge pull live/{na}: playing from {}", origins[0]),
        ),
        (
            &l2,
            format!("edge forward live/{nb}: publishing to {}", origins[1]),
        ),
        (
            &l1,
            format!("edge pull live/{nb}: playing from {}", origins[1]),
        ),
    ] {
        assert!(log.contains(&line), "missing '{line}' in:\n{log}");
    }
}

/// The compose file, parsed by PyYAML (anchors and merge keys resolved) into JSON.
fn compose() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster/docker-compose.yml");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg("import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))")
        .arg(&path);
    let (status, out, err) = run_capture(&mut cmd, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "python3 could not parse {} (PyYAML missing? run scripts/install-peers.sh): {}",
        path.display(),
        String::from_utf8_lossy(&err)
    );
    serde_json::from_slice(&out).unwrap()
}

/// The structure the recipe promises: three nodes with their ids and addresses, HAProxy
/// and two origins, each mounting a file of examples/cluster that exists, and the
/// addresses the mounted configs name.
fn check_compose(haproxy: &str, node: &str) {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["haproxy", "n1", "n2", "n3", "origin-a", "origin-b"]);
    let ip = |s: &str| {
        services[s]["networks"]["cluster"]["ipv4_address"]
            .as_str()
            .unwrap_or_else(|| panic!("{s} has no fixed address"))
            .to_string()
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster");
    for (s, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let local = v.split(':').next().unwrap();
            if local != "./certs" {
                assert!(
                    dir.join(local).is_file(),
                    "{s} mounts {local}, which is not in examples/cluster"
                );
            }
        }
    }
    let mounts = |s: &str, file: &str| {
        services[s]["volumes"].as_array().is_some_and(|v| {
            v.iter()
                .any(|m| m.as_str().is_some_and(|m| m.starts_with(file)))
        })
    };
    assert!(mounts(
        "haproxy",
        "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg"
    ));
    assert_eq!(ip("haproxy"), "10.0.0.10");
    assert!(node.contains("trusted_proxies = [\"10.0.0.10/32\"]"));
    for i in 1..=3 {
        let n = format!("n{i}");
        assert!(
            mounts(&n, "./rtmpgate-node.toml:/etc/rtmpgate/rtmpgate.toml"),
            "{n}"
        );
        let cmd: Vec<&str> = services[&n]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            cmd,
            [
                "--config",
                "/etc/rtmpgate/rtmpgate.toml",
                "--node-id",
                n.as_str()
            ]
        );
        let addr = ip(&n);
        assert_eq!(addr, format!("10.0.0.1{i}"));
        for port in [1935, 8443, 8080] {
            assert!(
                haproxy.contains(&format!("server {n} {addr}:{port} send-proxy-v2")),
                "haproxy.cfg has no {n} on {addr}:{port}"
            );
        }
        assert!(node.contains(&format!("http://{addr}:7935")));
        let env = &services[&n]["environment"];
        assert!(
            env["RTMPGATE_ADMIN_TOKEN"].is_string() && env["RTMPGATE_CLUSTER_SECRET"].is_string()
        );
    }
    for (s, addr) in [("origin-a", "10.0.0.21"), ("origin-b", "10.0.0.22")] {
        assert_eq!(ip(s), addr);
        assert!(
            mounts(s, "./nginx-origin.conf:/etc/nginx/nginx.conf"),
            "{s}"
        );
        assert!(
            node.contains(&format!("rtmp://{addr}:1935")),
            "the nodes do not name {s}"
        );
    }
    assert_eq!(
        c["networks"]["cluster"]["ipam"]["config"][0]["subnet"],
        "10.0.0.0/24"
    );
}

/// A real Compose implementation validates the recipe (schema, anchors, interpolation)
/// without a Docker engine: `docker-compose config` (Debian's 1.29, from
/// scripts/install-peers.sh). With the two secrets set it passes; without them it refuses,
/// naming the variable (the file's `${VAR:?...}` guard).
#[test]
fn compose_file_validates_with_docker_compose() {
    let bin = which("docker-compose").expect(
        "docker-compose is missing: run scripts/install-peers.sh (Debian package docker-compose)",
    );
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster/docker-compose.yml");
    let config = |with_secrets: bool| {
        let mut cmd = Command::new(&bin);
        cmd.arg("-f").arg(&file).args(["config", "-q"]);
        cmd.env_remove("RTMPGATE_ADMIN_TOKEN")
            .env_remove("RTMPGATE_CLUSTER_SECRET");
        if with_secrets {
            cmd.env("RTMPGATE_ADMIN_TOKEN", "t".repeat(64))
                .env("RTMPGATE_CLUSTER_SECRET", "s".repeat(64));
        }
        run_capture(&mut cmd, Duration::from_secs(60))
    };
    let (status, _, err) = config(true);
    assert!(
        status.is_some_and(|s| s.success()),
        "docker-compose config refused the recipe: {}",
        String::from_utf8_lossy(&err)
    );
    let (status, _, err) = config(false);
    let err = String::from_utf8_lossy(&err);
    assert!(
        status.is_some_and(|s| !s.success()) && err.contains("set RTMPGATE_ADMIN_TOKEN"),
        "the recipe ran without its secrets: {status:?} {err}"
    );
}

#[test]
fn compose_recipe_three_edges_behind_haproxy_and_two_origins() {
    let haproxy_cfg = recipe("haproxy.cfg");
    let node_toml = recipe("rtmpgate-node.toml");
    check_compose(&haproxy_cfg, &node_toml);
    let c = Compose::start(&haproxy_cfg, &node_toml);
    let nodes = &c.nodes;
    let (p_rtmp, p_rtmps, p_http) = (c.p_rtmp, c.p_rtmps, c.p_http);
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let base = |scheme: &str, port: u16| format!("{scheme}://127.0.0.10:{port}/live/compose");
    let kinds = [
        ("rtmp ffmpeg", base("rtmp", p_rtmp), false),
        ("rtmp rtmpdump", base("rtmp", p_rtmp), true),
        ("rtmps ffmpeg", base("rtmps", p_rtmps), false),
        ("rtmpt rtmpdump", base("rtmpt", p_http), true),
        ("rtmpt ffmpeg", base("rtmpt", p_http), false),
        ("rtmp rtmpdump 2", base("rtmp", p_rtmp), true),
        // RTMPTS: the tunnel inside TLS, through the RTMPS frontend (L4, TLS passthrough).
        ("rtmpts ffmpeg", base("rtmpts", p_rtmps), false),
    ];
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for (i, (_, url, dump)) in kinds.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.flv"));
        players.push(if *dump {
            play_rtmpdump(url, &out)
        } else {
            play_ffmpeg(url, &out)
        });
        outs.push(out);
    }
    let plays = || {
        nodes
            .iter()
            .map(|n| n.log().matches("play live/compose (waiting").count())
            .sum::<usize>()
    };
    assert!(
        wait_until(Duration::from_secs(15), || plays() == kinds.len()),
        "{} of {} players reached a node",
        plays(),
        kinds.len()
    );
    let origins = [
        "rtmp://127.0.0.21:1935".to_string(),
        "rtmp://127.0.0.22:1935".to_string(),
    ];
    let hashed = hashed_origin(&origins, "live", "compose");
    let (on, off) = if hashed.contains("127.0.0.21") {
        ([127, 0, 0, 21], [127, 0, 0, 22])
    } else {
        ([127, 0, 0, 22], [127, 0, 0, 21])
    };
    // The publisher over RTMPS through the balancer.
    let mut publisher = publish(&peers().ffmpeg, &base("rtmps", p_rtmps), &src);
    let (mut most_on, mut most_off) = (0, 0);
    let until = Instant::now() + Duration::from_secs(u64::from(SECONDS) - 2);
    while Instant::now() < until {
        most_on = most_on.max(established_at(on, 1935));
        most_off = most_off.max(established_at(off, 1935));
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        publisher
            .wait_timeout(Duration::from_secs(40))
            .is_some_and(|s| s.success()),
        "{}",
        publisher.log()
    );
    wait_players(&mut players, PLAYER_TAIL);
    for ((what, _, _), out) in kinds.iter().zip(&outs) {
        assert_whole_run(what, &want, &framemd5(out), 700);
    }
    let pulls: Vec<usize> = nodes
        .iter()
        .map(|n| n.log().matches("edge pull live/compose: started").count())
        .collect();
    let with_players = nodes
        .iter()
        .filter(|n| n.log().contains("play live/compose"))
        .count();
    eprintln!(
        "players per node {:?}, pulls per node {pulls:?}, most connections on the hashed origin {most_on} (publisher + pulls), on the other {most_off}",
        nodes.iter().map(|n| n.log().matches("play live/compose (waiting").count()).collect::<Vec<_>>()
    );
    assert!(
        pulls.iter().all(|&p| p <= 1),
        "a node pulled the stream twice: {pulls:?}"
    );
    assert_eq!(pulls.iter().sum::<usize>(), with_players);
    assert!(
        most_on <= 1 + with_players,
        "{most_on} connections on the origin"
    );
    assert!(
        most_on >= 2,
        "the hashed origin never had the publisher and a pull: {most_on}"
    );
    assert_eq!(most_off, 0, "the other origin was used");
    // PROXY v2 from HAProxy: the nodes see the clients' address, not HAProxy's.
    assert!(nodes.iter().all(|n| !n.log().contains("rtmp 127.0.0.10:")));
    assert!(nodes.iter().any(|n| n.log().contains("rtmps 127.0.0.1:")));
}

#[test]
fn killed_origin_its_streams_move_to_the_other_and_the_edge_re_pulls() {
    let mut oa = Nginx::start();
    let ob = Nginx::start();
    let origins = [oa.upstream(), ob.upstream()];
    let e = edge(&origins);
    let name = (0..200)
        .map(|i| format!("m{i}"))
        .find(|n| hashed_origin(&origins, "live", n) == origins[0])
        .unwrap();
    let src = source_flv(SECONDS);
    let want = video(&framemd5(&src));
    let dir = temp_dir();
    let out = dir.path().join("p.flv");
    let url = format!("{}/live/{name}", e.url("rtmp"));
    let mut player = play_rtmpdump(&url, &out);
    assert!(wait_until(Duration::from_secs(10), || e.log().contains(
        &format!("edge pull live/{name}: playing from {}", origins[0])
    )));
    let mut first = publish(&peers().ffmpeg, &url, &src);
    assert!(wait_until(Duration::from_secs(10), || e.log().contains(
        &format!("edge forward live/{name}: publishing to {}", origins[0])
    )));
    thread::sleep(Duration::from_millis(2500));
    // Origin A dies: the forwarded publisher is closed (ffmpeg gives up) and publishes
    // again; both the forward and the pull now go to B.
    oa.kill();
    let st = first.wait_timeout(Duration::from_secs(15));
    assert!(
        st.is_some(),
        "the publisher was not closed when its origin died"
    );
    let mut second = publish(&peers().ffmpeg, &url, &src);
    assert!(
        second
            .wait_timeout(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        second.log()
    );
    wait_players(std::slice::from_mut(&mut player), PLAYER_TAIL);
    let run = after_restart(&want, &framemd5(&out));
    let r = assert_contiguous_run("player after origin A died", &want, &run, 0.9);
    assert_eq!(r.start("video"), Some(0), "{r}");
    let log = e.log();
    for line in [
        format!("edge forward live/{name}: publishing to {}", origins[1]),
        format!("edge pull live/{name}: playing from {}", origins[1]),
    ] {
        assert!(log.contains(&line), "missing '{line}' in:\n{log}");
    }
    assert_eq!(
        log.matches(&format!("edge pull live/{name}: started"))
            .count(),
        1
    );
}

#[test]
fn auth_applies_to_edge_players_and_a_denied_play_starts_no_pull() {
    let origin = Nginx::start();
    let gw = edge_with(
        &[origin.upstream()],
        "[auth]\nplay_keys = { live = [\"k1\"] }\n",
    );
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let (denied_out, allowed_out) = (dir.path().join("d.flv"), dir.path().join("a.flv"));
    let mut denied = play_rtmpdump(&format!("{}/live/guarded", gw.url("rtmp")), &denied_out);
    assert!(
        denied.wait_timeout(Duration::from_secs(10)).is_some(),
        "the player without a key was not refused"
    );
    // The log is read by another thread: the line may come a moment after the client ended.
    assert!(
        gw.wait_log("play denied by [auth]", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    assert!(
        !gw.log().contains("edge pull live/guarded"),
        "a denied play started a pull"
    );
    assert_eq!(origin.clients(), 0);
    let mut allowed = play_ffmpeg(
        &format!("{}/live/guarded?key=k1", gw.url("rtmp")),
        &allowed_out,
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("edge pull live/guarded: playing from")));
    let mut publisher = publish(&peers().ffmpeg, &origin.url("live/guarded"), &src);
    assert!(publisher
        .wait_timeout(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    wait_players(std::slice::from_mut(&mut allowed), PLAYER_TAIL);
    assert_whole_run("player with the key", &want, &framemd5(&allowed_out), 700);
}

#[test]
fn a_relay_hash_group_and_an_edge_send_a_stream_to_the_same_origin() {
    let oa = Nginx::start();
    let ob = Nginx::start();
    let origins = [oa.upstream(), ob.upstream()];
    // A stream each origin wins, so that agreeing by chance on one origin cannot pass.
    let names: Vec<String> = origins
        .iter()
        .map(|o| {
            (0..200)
                .map(|i| format!("h{i}"))
                .find(|n| hashed_origin(&origins, "live", n) == o)
                .unwrap()
        })
        .collect();
    let relay = Gateway::builder()
        .config(&format!(
            "[[upstreams]]\nname = \"origins\"\nbalance = \"hash\"\nbackends = [\"{}\", \"{}\"]\n",
            origins[1], origins[0]
        ))
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "off"])
        .start();
    let e = edge(&origins);
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.flv"));
        players.push(play_ffmpeg(&format!("{}/live/{n}", e.url("rtmp")), &out));
        outs.push(out);
    }
    assert!(wait_until(Duration::from_secs(10), || names.iter().all(
        |n| e
            .log()
            .contains(&format!("edge pull live/{n}: playing from"))
    )));
    // Publishers through the relay's hash group.
    let mut pubs: Vec<Proc> = names
        .iter()
        .map(|n| {
            publish(
                &peers().ffmpeg,
                &format!("{}/live/{n}", relay.url("rtmp")),
                &src,
            )
        })
        .collect();
    for p in &mut pubs {
        assert!(
            p.wait_timeout(Duration::from_secs(30))
                .is_some_and(|s| s.success()),
            "{}",
            p.log()
        );
    }
    wait_players(&mut players, PLAYER_TAIL);
    for (n, out) in names.iter().zip(&outs) {
        assert_whole_run(&format!("edge player of {n}"), &want, &framemd5(out), 700);
    }
    for (n, o) in names.iter().zip(&origins) {
        let line = format!("edge pull live/{n}: playing from {o}");
        assert!(e.log().contains(&line), "missing '{line}' in:\n{}", e.log());
    }
}

#[test]
fn rtmps_origin_pull_and_forward_over_tls_with_a_private_ca() {
    let origin = Nginx::start();
    let tls_front = Stunnel::start(origin.addr(), TlsMode::Server);
    let certs = dev_certs();
    let upstream = format!("rtmps://127.0.0.1:{}", tls_front.port());
    let gw = Gateway::builder()
        .config(&format!("[upstream]\nedge_idle_secs = {IDLE_SECS}\n"))
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--admin",
            "off",
            "--edge",
            "--upstream",
            &upstream,
            "--upstream-ca",
            certs.ca.to_str().unwrap(),
        ])
        .start();
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    let out = dir.path().join("p.flv");
    let url = format!("{}/live/tls", gw.url("rtmp"));
    let mut player = play_rtmpdump(&url, &out);
    assert!(wait_until(Duration::from_secs(10), || gw.log().contains(
        &format!("edge pull live/tls: playing from {upstream}")
    )));
    // The publisher is forwarded by the same edge, over TLS too.
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    assert!(
        publisher
            .wait_timeout(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        publisher.log()
    );
    wait_players(std::slice::from_mut(&mut player), PLAYER_TAIL);
    assert_whole_run(
        "player through an rtmps:// origin",
        &want,
        &framemd5(&out),
        700,
    );
    assert!(gw
        .log()
        .contains(&format!("edge forward live/tls: publishing to {upstream}")));
}
