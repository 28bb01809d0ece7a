//! Attack: a flood of connections that each send a few garbage bytes (or nothing) from one
//! address. Each costs the attacker a TCP handshake and a few bytes; the door's line about
//! each closed connection is limited to one a second per address and reason (with a count),
//! so the flood cannot write the log at the accept rate, while another address's lines
//! still appear.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn connect_from(to: SocketAddr, from: IpAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(from, 0).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    s.into()
}

#[test]
fn garbage_connection_flood_writes_a_line_a_second_per_address() {
    let gw = Gateway::start(&["--listen", "rtmp://127.0.0.1:0"]);
    let addr = gw.addr("rtmp");
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let began = Instant::now();
    for _ in 0..3000 {
        let mut c = connect_from(addr, attacker);
        let _ = c.write_all(b"\0garbage");
    }
    // Another address, once: its line is written.
    let mut c = connect_from(addr, "127.0.0.3".parse().unwrap());
    c.write_all(b"\0garbage").unwrap();
    assert!(
        gw.wait_log("127.0.0.3", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
    let secs = began.elapsed().as_secs_f64();
    let from_attacker = gw.count_log("closing 127.0.0.2:");
    eprintln!("3,000 garbage connections from 127.0.0.2 in {secs:.1} s: {from_attacker} log lines");
    assert!(
        from_attacker as f64 <= secs + 2.0,
        "{from_attacker} lines for 3,000 connections in {secs:.1} s"
    );
    assert!(
        from_attacker == 1 || gw.expect_log("more like it from this address"),
        "{}",
        gw.log()
    );
}
