//! The process's file-descriptor limit: the soft `RLIMIT_NOFILE` raised to the hard limit at
//! start, and checked against what the connection limits may need.
//!
//! Most systems start services with a soft limit of 1,024, far below what
//! `limits.max_connections` allows: without the raise, a few hundred connections make
//! `accept` fail with EMFILE for everyone.

use std::io;

use crate::limits::Limits;

/// Descriptors the process needs besides its clients: listeners, the runtime's epoll and
/// wakers, log pipes, certificate files being read.
pub const RESERVED_FDS: u64 = 64;

/// Descriptors the engine may hold for its streams' logs (`engine::log`, one per stream with
/// players, for the fan-out lane to send from); a stream past the bound is written from
/// memory instead.
pub const STREAM_LOG_FDS: u64 = 64;

/// The limit before and after the raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to the kernel's `fs.nr_open` when
/// the hard limit is unlimited).
#[cfg(unix)]
pub fn raise() -> io::Result<NoFile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses an unlimited soft NOFILE; fs.nr_open is the real ceiling.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target > lim.rlim_cur {
        let want = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = target;
    }
    Ok(NoFile {
        soft_before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

#[cfg(not(unix))]
pub fn raise() -> io::Result<NoFile> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no RLIMIT_NOFILE on this platform",
    ))
}

/// Descriptors one admitted client may hold: its socket, and with an upstream the backend
/// connection too. (An RTMPT session counts as a client of its own, so its backend
/// connection is covered the same way.)
pub fn fds_per_connection(upstream: bool) -> u64 {
    if upstream {
        2
    } else {
        1
    }
}

/// Descriptors the connection limits allow the process to need.
pub fn needed(limits: &Limits, upstream: bool) -> u64 {
    (limits.max_connections as u64)
        .saturating_mul(fds_per_connection(upstream))
        .saturating_add(RESERVED_FDS)
        .saturating_add(STREAM_LOG_FDS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_the_hard_limit() {
        let n = raise().unwrap();
        assert!(n.soft >= n.soft_before);
        assert!(n.soft <= n.hard || n.hard == libc::RLIM_INFINITY);
    }

    #[test]
    fn needed_counts_the_backend_leg() {
        let l = Limits {
            max_connections: 1000,
            ..Limits::default()
        };
        assert_eq!(needed(&l, false), 1000 + RESERVED_FDS + STREAM_LOG_FDS);
        assert_eq!(needed(&l, true), 2000 + RESERVED_FDS + STREAM_LOG_FDS);
    }
}
