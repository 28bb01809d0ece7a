//! File descriptors (issue 9, item 5): the gateway raises its soft open-file limit to the
//! hard one at start and says so; with the hard limit itself low, running out of
//! descriptors (EMFILE) neither spins the accept loop nor floods the log, and accepting
//! resumes once descriptors are free again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// rtmpgate started under `prlimit --nofile=SOFT:HARD` (prlimit execs it: same pid), with
/// `args`, waiting for its listener.
fn gateway_with_nofile(soft: u64, hard: u64, args: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_rtmpgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    let proc = Proc::spawn("rtmpgate under prlimit", cmd);
    let mut addr = None;
    let ok = wait_until(START_TIMEOUT, || {
        addr = parse_listening(&proc.log_tail().lines())
            .first()
            .map(|(_, a)| *a);
        addr.is_some()
    });
    assert!(ok, "rtmpgate did not start: {}", proc.log());
    (proc, addr.unwrap())
}

/// The soft and hard "Max open files" of a process.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (f[0], f[1])
}

#[test]
fn soft_open_file_limit_is_raised_to_the_hard_limit() {
    let (proc, _) = gateway_with_nofile(256, 4096, &["--listen", "rtmp://127.0.0.1:0"]);
    assert_eq!(nofile_of(proc.pid()), (4096, 4096), "{}", proc.log());
    let log = proc.log();
    assert!(
        log.contains("open-file limit: soft 4096 (was 256), hard 4096"),
        "{log}"
    );
    // 10,000 connections (the default) need more than 4,096: the warning gives the numbers.
    assert!(
        log.contains("limits.max_connections = 10000 may need 10128 file descriptors"),
        "{log}"
    );
}

/// A plain RTMP handshake (C0+C1 out, S0+S1+S2 back) completes within 10 s.
fn handshake_completes(addr: SocketAddr) -> Result<(), String> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c0c1 = vec![3u8];
    c0c1.extend((0..1536).map(|i| (i % 251) as u8));
    c.write_all(&c0c1).map_err(|e| format!("write: {e}"))?;
    let mut s = vec![0u8; 1 + 1536 * 2];
    c.read_exact(&mut s)
        .map_err(|e| format!("reading S0S1S2: {e}"))?;
    if s[0] != 3 {
        return Err(format!("S0 is {}", s[0]));
    }
    Ok(())
}

#[test]
fn out_of_descriptors_backs_off_and_accepting_resumes() {
    // A hard limit of 64: some 40 connections in, accept fails with EMFILE.
    let (proc, addr) = gateway_with_nofile(64, 64, &["--listen", "rtmp://127.0.0.1:0"]);
    let pid = proc.pid();
    // Connections that send nothing are held for first_bytes_timeout_secs (10 s): enough
    // to hold the gateway out of descriptors for the measurement.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap());
    }
    let failing = wait_until(Duration::from_secs(5), || {
        proc.log().contains("accepting on rtmp://")
    });
    assert!(
        failing,
        "the gateway never ran out of descriptors: {}",
        proc.log()
    );
    assert!(
        proc.log().contains("out of file descriptors"),
        "{}",
        proc.log()
    );

    // While out of descriptors: CPU and log lines bounded.
    let lines_before = proc.log().matches("accepting on rtmp://").count();
    let cpu_before = cpu_ticks(pid);
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_ticks(pid) - cpu_before;
    let secs = measured.elapsed().as_secs_f64();
    let lines = proc.log().matches("accepting on rtmp://").count() - lines_before;
    eprintln!(
        "out of descriptors for {secs:.1} s: {cpu} CPU ticks (1/100 s), {lines} accept-failure \
         log lines"
    );
    // A spinning accept loop burns a whole core (about 100 ticks a second); backing off at
    // 100 ms costs well under 1% of one.
    assert!(
        cpu <= 30,
        "{cpu} CPU ticks in {secs:.1} s while out of descriptors"
    );
    assert!(
        lines <= 5,
        "{lines} accept-failure lines in {secs:.1} s (one a second at most)"
    );

    // Descriptors come back: the gateway accepts again.
    drop(held);
    let resumed = Instant::now();
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        match handshake_completes(addr) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert!(
        ok,
        "accepting did not resume after descriptors were freed ({last}): {}",
        proc.log()
    );
    eprintln!(
        "a handshake completed {:.2} s after the held connections closed",
        resumed.elapsed().as_secs_f64()
    );
}
