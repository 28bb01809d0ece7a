//! Attack: RTMPT `/open` requests pipelined over one keep-alive connection from one address
//! (issue 9, item 3). Tunnel sessions count against `max_connections_per_ip` like raw
//! connections, sessions that never finish the RTMP handshake are reaped after
//! `handshake_timeout_secs`, and a real RTMPT publisher and player from another loopback
//! address are served exactly (frames compared) while the flood goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Places per address; the flooding connection itself takes one of them.
const PER_IP: usize = 40;
/// The global table: smaller than the flood, so without the per-address count the flood
/// would fill it and every other RTMPT client would get 503.
const TUNNEL_SESSIONS: usize = 60;
const HANDSHAKE_SECS: u64 = 4;

/// One keep-alive HTTP connection from a chosen source address.
struct Conn {
    write: TcpStream,
    read: BufReader<TcpStream>,
}

impl Conn {
    fn open(to: SocketAddr, from: IpAddr) -> Conn {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_secs(5))
            .unwrap();
        let tcp: TcpStream = s.into();
        // Every wait is bounded: a stuck gateway fails the test instead of hanging it.
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn {
            write: tcp.try_clone().unwrap(),
            read: BufReader::new(tcp),
        }
    }

    /// Pipelines `n` `POST /open/1` requests (written by a second thread while the replies
    /// are read, so neither side's buffers stall) and returns (opened, refused).
    fn open_burst(&mut self, n: usize) -> (usize, usize) {
        let (ids, refused) = self.open_ids(n);
        (ids.len(), refused)
    }

    /// Like `open_burst`, returning the ids of the sessions opened.
    fn open_ids(&mut self, n: usize) -> (Vec<String>, usize) {
        let req = b"POST /open/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-fcs\r\n\
                    Content-Length: 1\r\n\r\n\0";
        let mut w = self.write.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let mut batch = Vec::with_capacity(req.len() * 100);
            let mut left = n;
            while left > 0 {
                let k = left.min(100);
                batch.clear();
                for _ in 0..k {
                    batch.extend_from_slice(req);
                }
                if w.write_all(&batch).is_err() {
                    return;
                }
                left -= k;
            }
        });
        let (mut ids, mut refused) = (Vec::new(), 0);
        for _ in 0..n {
            match self.response() {
                Some((200, body)) => ids.push(String::from_utf8(body).unwrap().trim().to_string()),
                Some((503, _)) => refused += 1,
                Some((other, _)) => panic!("unexpected status {other} to /open/1"),
                None => panic!("the gateway closed the flooding connection"),
            }
        }
        writer.join().unwrap();
        (ids, refused)
    }

    /// One request with a body; the reply's status.
    fn post(&mut self, path: &str, body: &[u8]) -> Option<u16> {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-fcs\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.write.write_all(&req).ok()?;
        self.response().map(|(status, _)| status)
    }

    /// Reads one response: (status, body).
    fn response(&mut self) -> Option<(u16, Vec<u8>)> {
        let mut line = String::new();
        self.read.read_line(&mut line).ok()?;
        let status = line.get(9..12)?.parse().ok()?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.read.read_line(&mut h).ok()?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().ok()?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.read.read_exact(&mut body).ok()?;
        Some((status, body))
    }
}

/// Replays the gateway's log: for sessions opened from `ip`, the most held at once, how
/// many were opened, and how many have ended.
fn sessions_from(log: &str, ip: &str) -> (usize, usize, usize) {
    let label = |l: &str| {
        l.split("session=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    let mut live: HashMap<String, ()> = HashMap::new();
    let (mut most, mut opened, mut reaped) = (0, 0, 0);
    let from = format!("peer={ip}:");
    for l in log.lines() {
        if l.contains("RTMPT session opened") && l.contains(&from) {
            if let Some(s) = label(l) {
                live.insert(s, ());
                opened += 1;
                most = most.max(live.len());
            }
        } else if l.contains("RTMPT session ended") {
            if let Some(s) = label(l) {
                if live.remove(&s).is_some() {
                    reaped += 1;
                }
            }
        }
    }
    (most, opened, reaped)
}

#[test]
fn pipelined_open_flood_is_capped_per_address_and_rtmpt_clients_are_served() {
    let dir = temp_dir();
    let src = source_flv(5);
    let want = framemd5(&src);
    let gw = Gateway::builder()
        .args(["--listen", "rtmp://127.0.0.1:0"].as_slice())
        .config(&format!(
            "[limits]\nmax_connections_per_ip = {PER_IP}\nmax_tunnel_sessions = {TUNNEL_SESSIONS}\n\
             handshake_timeout_secs = {HANDSHAKE_SECS}\n"
        ))
        .start();
    let addr = gw.addr("rtmpt");
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();

    // 10,000 /open/1 pipelined over one connection from one address.
    let mut flood = Conn::open(addr, attacker);
    let started = Instant::now();
    let (ok, refused) = flood.open_burst(10_000);
    eprintln!(
        "burst of 10,000 /open/1 from 127.0.0.2: {ok} opened, {refused} refused in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    // The flooding connection holds one place; its sessions get the rest, no more.
    assert_eq!(ok, PER_IP - 1, "sessions one address may hold");
    assert_eq!(ok + refused, 10_000);

    // Keep the address full while real clients from 127.0.0.1 publish and play over
    // RTMPT: each reaped flood session is replaced at once.
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let (stop, reopened) = (stop.clone(), reopened.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (ok, _) = flood.open_burst(200);
                reopened.fetch_add(ok, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
            flood
        })
    };

    let key = "live/under-flood";
    let url = format!("{}/{key}", gw.url("rtmpt"));
    let out = dir.path().join("player.flv");
    let mut player = play_rtmpdump(&url, &out);
    thread::sleep(Duration::from_millis(2000));
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    wait_publisher_then_player(
        &mut publisher,
        &mut player,
        Duration::from_secs(40),
        "RTMPT during the flood",
    );
    stop.store(true, Ordering::Relaxed);
    let flood = flooder.join().unwrap();

    let got = framemd5(&out);
    assert_attack_run(
        &want,
        &got,
        "RTMPT player from 127.0.0.1 during the flood",
        &player.log(),
    );

    // Sessions that never shook hands are reaped, and never more than the cap were held.
    drop(flood);
    let reopened = reopened.load(Ordering::Relaxed);
    let all = ok + reopened;
    let reaped_all = wait_until(Duration::from_secs(HANDSHAKE_SECS + 10), || {
        sessions_from(&gw.log(), "127.0.0.2").2 >= all
    });
    let (most, opened, reaped) = sessions_from(&gw.log(), "127.0.0.2");
    eprintln!(
        "flood sessions from 127.0.0.2: {opened} opened in all, at most {most} at once, \
         {reaped} ended (none shook hands; handshake timeout {HANDSHAKE_SECS} s)"
    );
    assert_eq!(opened, all, "the log's opened lines match the 200 replies");
    assert!(
        most < PER_IP,
        "{most} flood sessions at once from one address (limit {PER_IP} with its connection)"
    );
    assert!(
        reaped_all,
        "only {reaped} of {all} handshake-less sessions were reaped"
    );
}

/// With `--upstream`, every tunnel session that sends C0 opens a backend connection: the
/// flood from one address gets at most its per-address share of them, and they close when
/// the sessions are reaped for not finishing the handshake.
#[test]
fn open_flood_with_upstream_opens_at_most_the_cap_of_backend_connections() {
    let nginx = Nginx::start();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--upstream", &nginx.upstream()])
        .config(&format!(
            "[limits]\nmax_connections_per_ip = {PER_IP}\nhandshake_timeout_secs = {HANDSHAKE_SECS}\n"
        ))
        .start();
    let addr = gw.addr("rtmpt");
    let backend_before = established_on(nginx.port());
    let mut flood = Conn::open(addr, "127.0.0.2".parse().unwrap());
    let (ids, refused) = flood.open_ids(2_000);
    let mut c0c1 = vec![3u8];
    c0c1.extend((0..1536).map(|i| (i % 251) as u8));
    for id in &ids {
        assert_eq!(flood.post(&format!("/send/{id}/0"), &c0c1), Some(200));
    }
    // Each C0 makes the gateway dial the backend: count them at their peak.
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        peak = peak.max(established_on(nginx.port()).saturating_sub(backend_before));
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "2,000 /open/1 from 127.0.0.2 with --upstream: {} opened, {refused} refused; \
         backend connections at the peak: {peak}",
        ids.len()
    );
    assert_eq!(ids.len(), PER_IP - 1);
    assert!(peak < PER_IP, "{peak} backend connections for one address");
    // None of them finished the handshake: reaped, and their backend legs closed.
    let closed = wait_until(Duration::from_secs(HANDSHAKE_SECS + 10), || {
        established_on(nginx.port()) <= backend_before
    });
    assert!(
        closed,
        "{} backend connections still open after the handshake timeout",
        established_on(nginx.port())
    );
    drop(flood);
}

/// Tunnel request bodies are charged to the process's memory budget as they arrive: with a
/// 2 MiB budget a 3 MiB body (under `max_http_body`) is refused with 503 and a log line,
/// and once it is gone the budget serves the next client.
#[test]
fn tunnel_bodies_are_charged_to_the_memory_budget() {
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        // The process's budget, not an address's share of it (tests/attack_budget_ip.rs).
        .config("[limits]\nmax_memory = 2097152\nmax_memory_per_ip = 2097152\n")
        .start();
    let addr = gw.addr("rtmpt");
    let mut c = Conn::open(addr, "127.0.0.1".parse().unwrap());
    let (ids, _) = c.open_ids(1);
    let id = &ids[0];
    assert_eq!(
        c.post(&format!("/send/{id}/0"), &vec![3u8; 3 << 20]),
        Some(503)
    );
    assert!(
        gw.wait_log("memory budget spent", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    // The refused body's charge was returned: a small body goes through.
    let mut c2 = Conn::open(addr, "127.0.0.1".parse().unwrap());
    let (ids, _) = c2.open_ids(1);
    assert_eq!(
        c2.post(&format!("/send/{}/0", ids[0]), &[3u8; 1537]),
        Some(200)
    );
}
