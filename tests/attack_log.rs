//! Log and message-rate attacks (issue 9 item 2) against the real gateway binary: a peer's
//! bytes must not become log lines one for one, malformed messages close the connection after
//! `limits.max_protocol_errors`, zero-length messages are paced by
//! `limits.max_messages_per_sec`, and a normal publisher and player are served exactly
//! meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::amf0::Amf0Value;

/// Bytes of 0xC3 after the zero-length message: the 100 KB.
const ATTACK_BYTES: usize = 100_000;
/// Log lines the whole attack connection may cause: the door's open and close lines, the
/// engine's close line, one rate-limited warning, with room to spare. Before the fix it was
/// one line per attacker byte (100,001).
const MAX_ATTACK_LINES: usize = 20;
/// The message rate set for the pacing case, and the zero-length messages it sends.
const PACED_RATE: u32 = 1_000;
const PACED_MESSAGES: usize = 5_000;
/// Play commands sent in one write by one connection.
const PLAYS: usize = 1_000;

/// A fmt 0 header on chunk stream 3 for a message of `msg_type` with no payload, then
/// `repeat` fmt 3 headers on the same chunk stream (0xC3): each completes another empty
/// message of the same type.
fn zero_length_messages(msg_type: u8, repeat: usize) -> Vec<u8> {
    let mut b = vec![0x03, 0, 0, 0, 0, 0, 0, msg_type, 0, 0, 0, 0];
    b.resize(b.len() + repeat, 0xC3);
    b
}

/// Handshake from `ip`, then the bytes; the connection (writes that fail because the
/// gateway closed it are expected).
fn attack(addr: std::net::SocketAddr, ip: Ipv4Addr, bytes: &[u8]) -> TcpStream {
    let mut tcp = connect_from(ip, addr).expect("attacker connects");
    handshake(&mut tcp).expect("attacker handshake");
    let _ = tcp.write_all(bytes);
    tcp
}

/// Lines of the gateway's log that name this peer ("IP:PORT").
fn lines_about(gw: &Gateway, peer: &str) -> Vec<String> {
    gw.log()
        .lines()
        .filter(|l| l.contains(peer))
        .map(str::to_owned)
        .collect()
}

#[test]
fn one_log_line_per_attacker_byte_is_gone_and_a_normal_stream_is_served() {
    let p = peers();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .config(&format!("[limits]\nmax_messages_per_sec = {PACED_RATE}\n"))
        .start();
    let addr = gw.addr("rtmp");
    let dir = temp_dir();
    let src_file = source_flv(8);
    let src = framemd5(&src_file);
    let key = "live/normal";
    let players = vec![(PlayerKind::Ffmpeg, format!("{}/{key}", gw.url("rtmp")))];
    let publish_url = format!("{}/{key}", gw.url("rtmp"));

    let (received, (peer, closed, attack_took), (paced_took, paced_peer), plays_peer) =
        thread::scope(|s| {
            let normal = s.spawn(|| {
                publish_and_play(dir.path(), &p.ffmpeg, &publish_url, &src_file, &players)
            });
            assert!(
                wait_until(Duration::from_secs(30), || gw
                    .log_contains("publish live/normal")),
                "the normal publisher never started; log:\n{}",
                gw.log()
            );
            // 1. A zero-length command message, then 0xC3 repeated: one empty (undecodable)
            // command per byte.
            let attacker = s.spawn(|| {
                let started = Instant::now();
                let mut tcp = attack(
                    addr,
                    Ipv4Addr::new(127, 0, 0, 21),
                    &zero_length_messages(20, ATTACK_BYTES),
                );
                let peer = peer_label(&tcp);
                let closed = closed_within(&mut tcp, Duration::from_secs(15));
                (peer, closed, started.elapsed())
            });
            // 2. Zero-length audio messages are legal, but each is a message: they are paced.
            let paced = s.spawn(|| {
                let mut tcp = attack(
                    addr,
                    Ipv4Addr::new(127, 0, 0, 22),
                    &zero_length_messages(8, PACED_MESSAGES - 1),
                );
                let peer = peer_label(&tcp);
                let started = Instant::now();
                let mut inbox = Inbox::default();
                let answered = inbox.pong(&mut tcp, 7, Duration::from_secs(40));
                assert!(answered, "the paced connection never answered its ping");
                (started.elapsed(), peer)
            });
            // 3. A thousand play commands in one write (each would be a line).
            let plays = s.spawn(|| {
                let mut tcp = connect_from(Ipv4Addr::new(127, 0, 0, 23), addr).unwrap();
                handshake(&mut tcp).unwrap();
                let mut inbox = Inbox::default();
                connect_and_create_stream(&mut tcp, &mut inbox, addr, Duration::from_secs(10))
                    .unwrap();
                let play = chunked(
                    8,
                    &command(
                        1,
                        "play",
                        0.0,
                        &[Amf0Value::Null, Amf0Value::String("nobody".into())],
                    ),
                    128,
                );
                let burst: Vec<u8> = play.repeat(PLAYS);
                tcp.write_all(&burst).unwrap();
                assert!(
                    inbox.pong(&mut tcp, 3, Duration::from_secs(20)),
                    "plays not handled"
                );
                peer_label(&tcp)
            });
            (
                normal.join().expect("normal session"),
                attacker.join().expect("attacker"),
                paced.join().expect("paced"),
                plays.join().expect("plays"),
            )
        });
    // The play connection has closed (dropped in its thread): its close lines are in.
    assert!(wait_until(Duration::from_secs(10), || lines_about(
        &gw,
        &plays_peer
    )
    .iter()
    .any(|l| l.contains("session closed"))));
    let about_plays = lines_about(&gw, &plays_peer);
    eprintln!(
        "{PLAYS} play commands from {plays_peer}: {} log line(s):\n{}",
        about_plays.len(),
        about_plays.join("\n")
    );
    assert!(
        about_plays.len() <= MAX_ATTACK_LINES,
        "{} log lines for {PLAYS} play commands (at most {MAX_ATTACK_LINES})",
        about_plays.len()
    );

    let about = lines_about(&gw, &peer);
    eprintln!(
        "attack of {ATTACK_BYTES} bytes from {peer}: {} log line(s), closed {closed} after \
         {:.2} s:\n{}",
        about.len(),
        attack_took.as_secs_f64(),
        about.join("\n")
    );
    assert!(
        closed,
        "the attacker's connection was not closed within 15 s"
    );
    assert!(
        gw.expect_log("limits.max_protocol_errors"),
        "the attacker was not closed for its malformed messages; log:\n{}",
        gw.log()
    );
    assert!(
        about.len() <= MAX_ATTACK_LINES,
        "{} log lines for one attack connection (at most {MAX_ATTACK_LINES})",
        about.len()
    );
    // Everything else the gateway logged in the run is bounded as well (listeners, the
    // normal publisher and player, the paced connection): nothing near one per byte.
    let total = gw.log().lines().count();
    eprintln!("gateway log lines in the whole run: {total}");
    assert!(total <= 100, "the gateway logged {total} lines in this run");

    // The burst is one second's worth; the rest at PACED_RATE a second. A margin of a second
    // below the 4 s expected (a bound from below cannot be met by a fast machine).
    let expected = (PACED_MESSAGES as f64 - f64::from(PACED_RATE)) / f64::from(PACED_RATE);
    eprintln!(
        "{PACED_MESSAGES} zero-length messages from {paced_peer} at {PACED_RATE}/s: ping \
         answered after {:.2} s (expected about {expected:.1} s)",
        paced_took.as_secs_f64()
    );
    assert!(
        paced_took.as_secs_f64() >= expected - 1.0,
        "{PACED_MESSAGES} zero-length messages were taken in {paced_took:?}: not paced to \
         {PACED_RATE}/s"
    );

    for r in &received {
        r.assert_run_of(&src);
    }
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A log sink that takes nothing (stderr a pipe nobody reads, as with a stalled journald)
/// must not stall the runtime: with debug logging, a client sending 30,000 commands (one
/// debug line each) fills the pipe, yet another client's handshake and ping are answered at
/// once; once the pipe is read again the gateway reports how many lines it dropped.
/// With a blocking writer the worker threads hang in write(2) and the ping never comes back.
#[test]
fn a_stalled_log_sink_does_not_stall_clients() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let dir = temp_dir();
    let config = dir.path().join("rtmpgate.toml");
    // No pacing: the flood should be as fast as the gateway can log.
    std::fs::write(&config, "[limits]\nmax_messages_per_sec = 0\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rtmpgate"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--listen",
            "rtmp://127.0.0.1:0",
            "--log-level",
            "debug",
            "--config",
        ])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rtmpgate starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
    let _gw = Killed(child);
    // Read only up to the listening line.
    let mut addr = None;
    let mut line = String::new();
    while addr.is_none() {
        line.clear();
        let n = stderr.read_line(&mut line).expect("gateway stderr");
        assert!(n > 0, "rtmpgate exited before listening");
        addr = parse_listening(&[line.clone()]).first().map(|(_, a)| *a);
    }
    let addr = addr.unwrap();

    // The flood: 30,000 `_result` commands (no reply, one debug line each, ~2.4 MB of log).
    let cmd = chunked(3, &command(0, "_result", 1.0, &[]), 128);
    let flood: Vec<u8> = cmd.repeat(30_000);
    let mut f = connect_from(Ipv4Addr::new(127, 0, 0, 41), addr).unwrap();
    handshake(&mut f).unwrap();
    f.write_all(&flood).expect("the flood was not taken");
    // A ping after the flood is answered once every command before it was handled (and
    // logged, into a full pipe and then a full queue).
    let mut flood_inbox = Inbox::default();
    assert!(
        flood_inbox.pong(&mut f, 8, Duration::from_secs(30)),
        "the flood's own ping was not answered within 30 s"
    );

    // Meanwhile another client is served at once.
    let started = Instant::now();
    let mut probe = connect_from(Ipv4Addr::new(127, 0, 0, 42), addr).unwrap();
    handshake(&mut probe).expect("handshake while the log sink is stalled");
    let mut inbox = Inbox::default();
    assert!(
        inbox.pong(&mut probe, 9, Duration::from_secs(5)),
        "no ping answer within 5 s while the log sink was stalled"
    );
    eprintln!(
        "with stderr unread: handshake and ping answered in {:.3} s",
        started.elapsed().as_secs_f64()
    );

    // Read the log again: the drop report comes within its 10 s period (with a margin).
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut l = String::new();
        while stderr.read_line(&mut l).is_ok_and(|n| n > 0) {
            if l.contains("lines dropped") {
                let _ = tx.send(l.clone());
            }
            l.clear();
        }
    });
    let report = rx
        .recv_timeout(Duration::from_secs(25))
        .expect("no 'lines dropped' report within 25 s");
    eprintln!("{}", report.trim());
}
