//! One edge node SIGKILLed mid-stream behind the compose recipe's HAProxy (three edge nodes,
//! two nginx-rtmp origins, all natively on 127.0.0.x): the dead node's players are closed
//! within 1 s of the kill (measured per player, far below their own 60 s give-up), they
//! reconnect through HAProxy, land on the other nodes and get frames; the players on the other
//! nodes lose no packet (framemd5 of the whole run). And the publisher's own node killed:
//! the publisher is closed within 1 s, every player ends (closed, or the origin's
//! UnpublishNotify), players and publisher come back through HAProxy once it has marked the
//! node down, and every player on the two live nodes gets the new publish whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod edge_support;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use edge_support::*;

const SECONDS: u32 = 14;
const STREAM: &str = "live/failover";
/// What the issue promises for the dead node's players (process exit, which comes after the
/// close, so this is the stricter measure).
const CLOSED_WITHIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
struct Kind {
    scheme: &'static str,
    rtmpdump: bool,
}

impl Kind {
    fn start(self, c: &Compose, out: &std::path::Path) -> Proc {
        let url = c.url(self.scheme, STREAM);
        if self.rtmpdump {
            play_rtmpdump(&url, out)
        } else {
            play_ffmpeg(&url, out)
        }
    }

    fn name(self) -> String {
        let tool = if self.rtmpdump { "rtmpdump" } else { "ffmpeg" };
        format!("{} {tool}", self.scheme)
    }
}

/// Starts a player of `kind` again and again (a real client's retry: HAProxy may still send
/// a connection to the dead node until its health check marks it down, 1 s) until one is
/// still running after 1.5 s without a failed request; bounded attempts.
fn reconnect(c: &Compose, kind: Kind, dir: &std::path::Path, i: usize) -> (Proc, PathBuf) {
    for attempt in 0..12 {
        let out = dir.join(format!("r{i}-{attempt}.flv"));
        let mut p = kind.start(c, &out);
        if p.wait_timeout(Duration::from_millis(1500)).is_none() && !tunnel_failed(&p) {
            return (p, out);
        }
        p.kill();
        thread::sleep(Duration::from_millis(200));
    }
    panic!("{} could not reconnect through HAProxy", kind.name());
}

/// ffmpeg's RTMPT client, once a request of its tunnel session is refused (HAProxy's 503 for
/// the dead node's session), never gives up by itself before its own 60 s `-rw_timeout`: it
/// polls the dead session every 50 ms. For it the refusal is the close, logged at once.
fn tunnel_failed(p: &Proc) -> bool {
    p.log().contains("HTTP error")
}

/// Waits (bounded: its health check runs every second, one failure marks a node down) until
/// HAProxy has marked node `n` (0-based) down in the three balanced backends: until then a
/// new connection may still go to it (and wait out HAProxy's retries 1 s apart).
fn wait_marked_down(c: &Compose, n: usize) {
    let lines: Vec<String> = ["rtmp_nodes", "rtmps_nodes", "rtmpt_nodes"]
        .iter()
        .map(|b| format!("Server {b}/n{} is DOWN", n + 1))
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let log = c.haproxy.log();
            lines.iter().all(|l| log.contains(l))
        }),
        "HAProxy did not mark n{} down within 5 s",
        n + 1
    );
}

#[test]
fn killed_edge_node_its_players_reconnect_and_the_others_lose_nothing() {
    let c = Compose::start(&recipe("haproxy.cfg"), &recipe("rtmpgate-node.toml"));
    let src = source_flv(SECONDS);
    let want = framemd5(&src);
    let dir = temp_dir();
    // Three of each: HAProxy spreads each frontend's clients over the three nodes.
    let kinds = [
        Kind {
            scheme: "rtmp",
            rtmpdump: false,
        },
        Kind {
            scheme: "rtmp",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmp",
            rtmpdump: false,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: false,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: true,
        },
    ];
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.flv"));
        players.push(k.start(&c, &out));
        outs.push(out);
    }
    let waiting = format!("play {STREAM} (");
    let plays = |n: &Gateway| n.count_log(&waiting);
    assert!(
        wait_until(Duration::from_secs(15), || c
            .nodes
            .iter()
            .map(plays)
            .sum::<usize>()
            == kinds.len()),
        "not every player reached a node"
    );
    let mut publisher = publish(&peers().ffmpeg, &c.url("rtmps", STREAM), &src);
    let forward = format!("edge forward {STREAM}: publishing to");
    assert!(
        wait_until(Duration::from_secs(10), || c
            .nodes
            .iter()
            .any(|n| n.log_contains(&forward))),
        "the publisher reached no node: {}",
        publisher.log()
    );
    let on_pub = c
        .nodes
        .iter()
        .position(|n| n.log_contains(&forward))
        .unwrap();
    let per_node: Vec<usize> = c.nodes.iter().map(plays).collect();
    // The node to kill: one with players and without the publisher.
    let victim = (0..3)
        .filter(|&i| i != on_pub)
        .max_by_key(|&i| per_node[i])
        .unwrap();
    assert!(
        per_node[victim] > 0,
        "HAProxy put no player on a node without the publisher: {per_node:?}"
    );
    thread::sleep(Duration::from_secs(3));
    c.nodes[victim].signal("KILL");
    let killed = Instant::now();
    // Each player's exit, polled every 10 ms for 3 s (three times the bound).
    let mut closed: Vec<Option<Duration>> = vec![None; players.len()];
    while killed.elapsed() < Duration::from_secs(3) {
        for (p, at) in players.iter_mut().zip(closed.iter_mut()) {
            if at.is_none() && (p.try_status().is_some() || tunnel_failed(p)) {
                *at = Some(killed.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let dead: Vec<usize> = (0..players.len())
        .filter(|&i| closed[i].is_some())
        .collect();
    eprintln!(
        "players per node {per_node:?}, publisher on n{}, killed n{}; closed after {:?}",
        on_pub + 1,
        victim + 1,
        dead.iter()
            .map(|&i| (kinds[i].name(), closed[i].unwrap()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        dead.len(),
        per_node[victim],
        "{} players were closed, the killed node had {}",
        dead.len(),
        per_node[victim]
    );
    for &i in &dead {
        let after = closed[i].unwrap();
        assert!(
            after <= CLOSED_WITHIN,
            "{} was closed {after:?} after the kill, more than {CLOSED_WITHIN:?}",
            kinds[i].name()
        );
    }
    let before: Vec<usize> = c.nodes.iter().map(plays).collect();
    let mut again = Vec::new();
    for &i in &dead {
        players[i].kill();
        again.push((i, reconnect(&c, kinds[i], dir.path(), i)));
    }
    assert!(
        publisher
            .wait_timeout(Duration::from_secs(40))
            .is_some_and(|s| s.success()),
        "{}",
        publisher.log()
    );
    let survivors: Vec<usize> = (0..players.len()).filter(|i| !dead.contains(i)).collect();
    for &i in &survivors {
        let p = &mut players[i];
        assert!(
            p.wait_timeout(PLAYER_TAIL).is_some(),
            "{} did not stop: {}",
            p.name(),
            p.log()
        );
        assert_whole_run(
            &format!("{} on a live node", kinds[i].name()),
            &want,
            &framemd5(&outs[i]),
            700,
        );
    }
    for (i, (p, out)) in &mut again {
        assert!(
            p.wait_timeout(PLAYER_TAIL).is_some(),
            "{} did not stop: {}",
            p.name(),
            p.log()
        );
        let run = assert_contiguous_run(
            &format!("{} reconnected", kinds[*i].name()),
            &want,
            &framemd5(out),
            0.1,
        );
        assert!(run.start("video").is_some_and(|s| s > 0), "{run}");
    }
    let after: Vec<usize> = c.nodes.iter().map(plays).collect();
    let landed: usize = (0..3)
        .filter(|&n| n != victim)
        .map(|n| after[n] - before[n])
        .sum();
    assert_eq!(
        landed,
        dead.len(),
        "the reconnected players did not all land on the live nodes: {before:?} -> {after:?}"
    );
}

/// The publisher's own node SIGKILLed: the publisher (over RTMPS through HAProxy) is closed,
/// publishes again through HAProxy onto a live node, and the players of the live nodes get
/// the new publish (a contiguous run of it from its first video frame).
#[test]
fn killed_publisher_node_the_publisher_reconnects_and_the_stream_resumes_everywhere() {
    let c = Compose::start(&recipe("haproxy.cfg"), &recipe("rtmpgate-node.toml"));
    let src = source_flv(8);
    let want = video(&framemd5(&src));
    let dir = temp_dir();
    let kinds = [
        Kind {
            scheme: "rtmp",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmp",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmp",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: true,
        },
        Kind {
            scheme: "rtmpt",
            rtmpdump: true,
        },
    ];
    let waiting = format!("play {STREAM} (");
    let mut players = Vec::new();
    let mut outs = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.flv"));
        players.push(k.start(&c, &out));
        outs.push(out);
    }
    assert!(
        wait_until(Duration::from_secs(15), || c
            .nodes
            .iter()
            .map(|n| n.count_log(&waiting))
            .sum::<usize>()
            == kinds.len()),
        "not every player reached a node"
    );
    let mut first = publish(&peers().ffmpeg, &c.url("rtmps", STREAM), &src);
    let forward = format!("edge forward {STREAM}: publishing to");
    assert!(wait_until(Duration::from_secs(10), || c
        .nodes
        .iter()
        .any(|n| n.log_contains(&forward))));
    let on_pub = c
        .nodes
        .iter()
        .position(|n| n.log_contains(&forward))
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    c.nodes[on_pub].signal("KILL");
    let killed = Instant::now();
    assert!(
        first.wait_timeout(CLOSED_WITHIN).is_some(),
        "the publisher was not closed within {CLOSED_WITHIN:?} of its node's death"
    );
    eprintln!(
        "publisher on n{} closed after {:?}",
        on_pub + 1,
        killed.elapsed()
    );
    // Every player ends: the dead node's are closed with it, the others get the origin's
    // UnpublishNotify (rtmpdump stops on it, as players do when a publisher leaves).
    wait_players(&mut players, Duration::from_secs(5));
    // They all come back through HAProxy (onto the live nodes) before the publisher does.
    wait_marked_down(&c, on_pub);
    let before: Vec<usize> = c.nodes.iter().map(|n| n.count_log(&waiting)).collect();
    let mut again = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        again.push(reconnect(&c, *k, dir.path(), i));
    }
    let after: Vec<usize> = c.nodes.iter().map(|n| n.count_log(&waiting)).collect();
    eprintln!(
        "plays per node {before:?} -> {after:?} (n{} dead)",
        on_pub + 1
    );
    assert_eq!(after[on_pub], before[on_pub]);
    assert!(
        (0..3)
            .filter(|&n| n != on_pub)
            .all(|n| after[n] > before[n]),
        "the players did not come back on both live nodes: {before:?} -> {after:?}"
    );
    let mut second = None;
    for _ in 0..12 {
        let mut p = publish(&peers().ffmpeg, &c.url("rtmps", STREAM), &src);
        if p.wait_timeout(Duration::from_millis(1500)).is_none() {
            second = Some(p);
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let mut second = second.expect("the publisher could not publish again through HAProxy");
    assert!(
        second
            .wait_timeout(Duration::from_secs(40))
            .is_some_and(|s| s.success()),
        "{}",
        second.log()
    );
    for ((p, out), k) in again.iter_mut().zip(&kinds) {
        assert!(
            p.wait_timeout(PLAYER_TAIL).is_some(),
            "{} did not stop",
            p.name()
        );
        let got = video(&framemd5(out));
        let r = assert_contiguous_run(
            &format!("{} back after the publisher's node died", k.name()),
            &want,
            &got,
            0.9,
        );
        assert_eq!(r.start("video"), Some(0), "{r}");
    }
}
