//! A backend's health state: up or down, the rise/fall streaks, the clients relayed to it
//! now, and how often it was marked up and down. Shared by reference, so a reload that keeps
//! a backend (same group, same URL, same check) keeps its state: a backend marked down stays
//! down, its counters keep counting, and clients relayed before the reload still count.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// One backend's state; see the module documentation.
#[derive(Debug, Default)]
pub struct BackendState {
    /// Marked down (a backend starts up: trying it is the only way to know).
    down: AtomicBool,
    /// Consecutive failed and successful checks, for the rise/fall thresholds.
    fails: AtomicU32,
    oks: AtomicU32,
    /// Clients relayed to it right now (least-connections, admin).
    active: AtomicUsize,
    /// Transitions, for `rtmpgate_upstream_backend_transitions_total`.
    went_up: AtomicU64,
    went_down: AtomicU64,
}

/// What a check or a client's connect did to the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Marked up; the streak that did it.
    Up(u32),
    /// Marked down; the streak that did it.
    Down(u32),
}

impl BackendState {
    pub fn is_up(&self) -> bool {
        !self.down.load(Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    pub fn add_client(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    pub fn remove_client(&self) {
        // Never below zero, whatever the order of drops.
        let _ = self
            .active
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// (times marked up, times marked down) since the backend was first configured.
    pub fn transitions(&self) -> (u64, u64) {
        (self.went_up.load(Relaxed), self.went_down.load(Relaxed))
    }

    /// A health check's result: down after `fall` failures in a row, up after `rise`
    /// successes in a row.
    pub fn checked(&self, ok: bool, rise: u32, fall: u32) -> Transition {
        if ok {
            self.fails.store(0, Relaxed);
            let oks = self.oks.fetch_add(1, Relaxed).saturating_add(1);
            if oks >= rise && self.set(true) {
                return Transition::Up(oks);
            }
        } else {
            self.oks.store(0, Relaxed);
            let fails = self.fails.fetch_add(1, Relaxed).saturating_add(1);
            if fails >= fall && self.set(false) {
                return Transition::Down(fails);
            }
        }
        Transition::None
    }

    /// A client's connect: a failure marks the backend down at once (a refused or timed-out
    /// connect is conclusive, and the next client should not wait on it again); a success
    /// marks it up.
    pub fn connected(&self, ok: bool) -> Transition {
        if ok {
            self.fails.store(0, Relaxed);
            if self.set(true) {
                return Transition::Up(1);
            }
        } else {
            self.oks.store(0, Relaxed);
            let fails = self.fails.fetch_add(1, Relaxed).saturating_add(1);
            if self.set(false) {
                return Transition::Down(fails);
            }
        }
        Transition::None
    }

    /// Sets up or down; true (and counted) if that changed it.
    fn set(&self, up: bool) -> bool {
        let was_down = self.down.swap(!up, Relaxed);
        if was_down != up {
            // Already what it is being set to.
            return false;
        }
        if up {
            self.went_up.fetch_add(1, Relaxed);
        } else {
            self.went_down.fetch_add(1, Relaxed);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_fall_and_counted_transitions() {
        let s = BackendState::default();
        assert!(s.is_up());
        assert_eq!(s.checked(false, 2, 2), Transition::None);
        assert_eq!(s.checked(false, 2, 2), Transition::Down(2));
        assert_eq!(s.checked(false, 2, 2), Transition::None);
        assert!(!s.is_up());
        assert_eq!(s.checked(true, 2, 2), Transition::None);
        // A failure breaks the streak.
        assert_eq!(s.checked(false, 2, 2), Transition::None);
        assert_eq!(s.checked(true, 2, 2), Transition::None);
        assert_eq!(s.checked(true, 2, 2), Transition::Up(2));
        assert_eq!(s.connected(false), Transition::Down(1));
        assert_eq!(s.connected(false), Transition::None);
        assert_eq!(s.connected(true), Transition::Up(1));
        assert_eq!(s.transitions(), (2, 2));
        s.add_client();
        s.remove_client();
        s.remove_client();
        assert_eq!(s.active(), 0);
    }
}
