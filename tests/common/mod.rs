//! Shared harness for rtmpgate's integration tests: finds the real peers (ffmpeg, rtmpdump,
//! nginx-rtmp, stunnel, curl), starts the gateway and peers on loopback ports chosen at run
//! time, makes test media once per run, and compares received media with the source packet by
//! packet.
//!
//! Use it from a test file with `mod common;`. Every process it starts is killed when its
//! guard is dropped, and every wait is bounded: a test fails, it never hangs. A missing peer
//! fails the test (it is not skipped), with a message saying to run scripts/install-peers.sh,
//! because a silently skipped test would hide a broken install.

// Each test binary uses a different part of the harness (so some of the re-exports below go
// unused in each); test code may panic by design.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

mod curl;
pub mod delay;
mod fanout;
mod gateway;
mod haproxy;
mod helpers;
mod media;
mod nginx;
mod peers;
mod process;
mod tls;

pub use curl::*;
pub use fanout::*;
pub use gateway::*;
pub use haproxy::*;
pub use helpers::*;
pub use media::*;
pub use nginx::*;
pub use peers::*;
pub use process::*;
pub use tls::*;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// How long a gateway or peer may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a test waits for a log line an event it saw has caused ([`Gateway::expect_log`]).
/// The gateway's log reaches the test through another thread reading its stderr; on a loaded
/// machine that thread ran behind: http_flv's 403 test saw its client denied, and a line
/// logged 12 ms before the check was not there yet.
pub const LOG_LAG: Duration = Duration::from_secs(10);
/// How long a player may run on after its publisher finished, before it is killed.
pub const PLAYER_TAIL: Duration = Duration::from_secs(20);
/// Seconds of silence after which an ffmpeg or rtmpdump player gives up on its own. Far
/// longer than any bound a test asserts (closing a client takes well under 5 s): when a
/// test waits for a player to be closed, only the gateway can end it in time, never the
/// player's own give-up. Players of a healthy stream are stopped by the harness
/// ([`PLAYER_QUIET`]), so this costs nothing when things work.
pub const PLAYER_IDLE_SECS: u64 = 60;
/// How long a player's output may stay the same size, after its publisher finished, before the
/// harness decides the stream is over and stops it.
pub const PLAYER_QUIET: Duration = Duration::from_secs(2);

const INSTALL_HINT: &str = "run scripts/install-peers.sh (as root, or with passwordless sudo) \
                            to install them; CI does this before the tests";
