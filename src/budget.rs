//! The process-wide memory budget: bytes held on behalf of peers, charged before allocating.
//!
//! Per-connection limits bound what one peer can make us hold, but a thousand peers each at
//! their limit can still exhaust the machine. Everything a peer can make the gateway buffer
//! (partial chunk messages, tunnel buffers, fan-out rings, GOP caches) takes a [`Charge`]
//! from one [`MemoryBudget`] before it grows; when the budget is spent the charge is refused,
//! the caller closes the offending connection with a log line, and healthy sessions, whose
//! memory is already charged, carry on. A charge is returned when it is dropped.
//!
//! Lock-free (one atomic add per charge), so it sits on the data path without a mutex.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A budget of bytes; [`global()`] is the process's.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
    refused: AtomicU64,
}

static GLOBAL: MemoryBudget = MemoryBudget::new(usize::MAX);

/// The process's budget. Unlimited until [`MemoryBudget::set_limit`] is called at start-up
/// (from `limits.max_memory`).
pub fn global() -> &'static MemoryBudget {
    &GLOBAL
}

/// A charge was refused: taking `requested` more bytes would pass the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub struct OverBudget {
    pub requested: usize,
    pub used: usize,
    pub limit: usize,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory budget spent: {} more bytes wanted, {} of {} in use \
             (limits.max_memory; raise it if the machine has room)",
            self.requested, self.used, self.limit
        )
    }
}

impl MemoryBudget {
    pub const fn new(limit: usize) -> Self {
        MemoryBudget {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Sets the limit. Charges already held stay held even if they now exceed it; only new
    /// charges are refused.
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges refused since start (for metrics).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` or refuses without reserving anything.
    fn reserve(&self, bytes: usize) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        let limit = self.limit();
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = match used.checked_add(bytes) {
                Some(n) if n <= limit => n,
                _ => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(OverBudget {
                        requested: bytes,
                        used,
                        limit,
                    });
                }
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Takes `bytes` from the budget; they return when the charge is dropped.
    pub fn try_charge(&'static self, bytes: usize) -> Result<Charge, OverBudget> {
        self.reserve(bytes)?;
        Ok(Charge {
            budget: self,
            bytes,
        })
    }

    /// An empty charge to grow later.
    pub fn empty(&'static self) -> Charge {
        Charge {
            budget: self,
            bytes: 0,
        }
    }
}

/// Bytes held from a budget; returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: &'static MemoryBudget,
    bytes: usize,
}

impl Charge {
    /// An empty charge on the global budget.
    pub fn global() -> Charge {
        global().empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes `more` bytes, or refuses and keeps what it had.
    pub fn try_grow(&mut self, more: usize) -> Result<(), OverBudget> {
        self.budget.reserve(more)?;
        self.bytes = self.bytes.saturating_add(more);
        Ok(())
    }

    /// Returns up to `less` bytes.
    pub fn shrink(&mut self, less: usize) {
        let less = less.min(self.bytes);
        self.bytes -= less;
        self.budget.release(less);
    }

    /// Makes the charge exactly `bytes` (growing may be refused; shrinking never is).
    pub fn try_set(&mut self, bytes: usize) -> Result<(), OverBudget> {
        if bytes > self.bytes {
            self.try_grow(bytes - self.bytes)
        } else {
            self.shrink(self.bytes - bytes);
            Ok(())
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// The default budget when `limits.max_memory` is 0 (auto): half of the memory this process
/// may use, the smaller of the machine's (`MemTotal`) and its cgroup's limit (`memory.max`),
/// so the kernel's OOM killer is never the one to say no. Unknown: 4 GiB.
pub fn default_limit() -> usize {
    const FALLBACK: u64 = 4 << 30;
    let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb.saturating_mul(1024))
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let avail = match (mem_total, cgroup) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => FALLBACK.saturating_mul(2),
    };
    usize::try_from(avail / 2).unwrap_or(usize::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn budget(limit: usize) -> &'static MemoryBudget {
        Box::leak(Box::new(MemoryBudget::new(limit)))
    }

    #[test]
    fn charges_are_refused_past_the_limit_and_returned_on_drop() {
        let b = budget(100);
        let a = b.try_charge(60).unwrap();
        let err = b.try_charge(41).unwrap_err();
        assert_eq!((err.requested, err.used, err.limit), (41, 60, 100));
        assert_eq!(b.refused(), 1);
        let c = b.try_charge(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_charge_grows_shrinks_and_is_set() {
        let b = budget(100);
        let mut c = b.empty();
        c.try_grow(70).unwrap();
        assert!(c.try_grow(31).is_err());
        assert_eq!(c.bytes(), 70);
        c.shrink(500);
        assert_eq!((c.bytes(), b.used()), (0, 0));
        c.try_set(90).unwrap();
        c.try_set(10).unwrap();
        assert_eq!(b.used(), 10);
        assert!(c.try_set(101).is_err());
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn overflowing_requests_are_refused() {
        let b = budget(usize::MAX);
        let _a = b.try_charge(usize::MAX - 1).unwrap();
        assert!(b.try_charge(usize::MAX).is_err());
    }

    #[test]
    fn default_limit_is_plausible() {
        let d = default_limit();
        assert!(d >= 64 << 20, "{d}");
    }
}
