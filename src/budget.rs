//! The process-wide memory budget: bytes held on behalf of peers, charged before allocating.
//!
//! Per-connection limits bound what one peer can make us hold, but a thousand peers each at
//! their limit can still exhaust the machine. Everything a peer can make the gateway buffer
//! (partial chunk messages, tunnel buffers, fan-out rings, GOP caches) takes a [`Charge`]
//! from one [`MemoryBudget`] before it grows; when the budget is spent the charge is refused,
//! the caller closes the offending connection with a log line, and healthy sessions, whose
//! memory is already charged, carry on. A charge is returned when it is dropped.
//!
//! Each address group (IPv6 by `ipv6_prefix_len`, as the connection counts) also has a share
//! of the budget (`limits.max_memory_per_ip`): a charge taken for a peer's connection counts
//! against both and is refused when either is spent, so one address cannot spend the whole
//! budget and turn every other client away.
//!
//! Lock-free (one atomic add per charge, two with a share), so it sits on the data path
//! without a mutex; the map of shares is touched only when a connection starts.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use dashmap::DashMap;

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

pub use crate::rtmp::budget::OverBudget;

/// What a refusal's log line tells the operator to do (the protocol crate's [`OverBudget`]
/// knows no configuration; the gateway names its own keys).
const RAISE_MAX_MEMORY: &str = "limits.max_memory; raise it if the machine has room";
const RAISE_MAX_MEMORY_PER_IP: &str =
    "limits.max_memory_per_ip; raise it if one address legitimately carries many large streams";

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
                        per_address: false,
                        remedy: RAISE_MAX_MEMORY,
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
            share: None,
            bytes,
        })
    }

    /// An empty charge to grow later.
    pub fn empty(&'static self) -> Charge {
        Charge {
            budget: self,
            share: None,
            bytes: 0,
        }
    }
}

/// One address group's share of the process's budget. It lives while a charge (or a
/// [`PeerBudget`]) on it does; the last one gone, it leaves the map, so the map holds at most
/// one entry per address group with a connection open.
#[derive(Debug)]
pub struct AddressShare {
    group: IpAddr,
    budget: MemoryBudget,
    /// The map it is listed in.
    shares: Option<&'static Shares>,
}

impl AddressShare {
    /// Bytes charged to this address group now.
    pub fn used(&self) -> usize {
        self.budget.used()
    }

    pub fn limit(&self) -> usize {
        self.budget.limit()
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        // A newer share for the same group may have replaced this one's entry already: only
        // a dead entry is removed.
        if let Some(s) = self.shares {
            s.map.remove_if(&self.group, |_, w| w.strong_count() == 0);
        }
    }
}

/// The per-address shares: their limit and grouping are set once at start-up.
#[derive(Debug)]
struct Shares {
    map: DashMap<IpAddr, Weak<AddressShare>>,
    limit: AtomicUsize,
    v6_prefix: AtomicU8,
}

fn shares() -> &'static Shares {
    static SHARES: OnceLock<Shares> = OnceLock::new();
    SHARES.get_or_init(|| Shares {
        map: DashMap::new(),
        limit: AtomicUsize::new(usize::MAX),
        v6_prefix: AtomicU8::new(64),
    })
}

/// Sets every address's share (`limits.max_memory_per_ip`, resolved) and how IPv6 addresses
/// are grouped (`limits.ipv6_prefix_len`). `usize::MAX`: no shares, only the global budget.
/// Shares already handed out keep their limit until their connections end.
pub fn set_per_address_limit(bytes: usize, ipv6_prefix_len: u8) {
    let s = shares();
    s.limit.store(bytes, Ordering::Relaxed);
    s.v6_prefix
        .store(ipv6_prefix_len.min(128), Ordering::Relaxed);
}

/// The share of `ip`'s address group, if shares are on.
pub fn address_share(ip: IpAddr) -> Option<Arc<AddressShare>> {
    shares().share(ip)
}

impl Shares {
    fn share(&'static self, ip: IpAddr) -> Option<Arc<AddressShare>> {
        let s = self;
        let limit = s.limit.load(Ordering::Relaxed);
        if limit == usize::MAX {
            return None;
        }
        let group = crate::net::addr::group(ip, s.v6_prefix.load(Ordering::Relaxed));
        let mut entry = s.map.entry(group).or_default();
        if let Some(share) = entry.upgrade() {
            return Some(share);
        }
        let share = Arc::new(AddressShare {
            group,
            budget: MemoryBudget::new(limit),
            shares: Some(s),
        });
        *entry = Arc::downgrade(&share);
        drop(entry);
        Some(share)
    }

    fn used_by(&self, ip: IpAddr) -> usize {
        let group = crate::net::addr::group(ip, self.v6_prefix.load(Ordering::Relaxed));
        let weak = self.map.get(&group).map(|w| w.clone());
        weak.and_then(|w| w.upgrade()).map_or(0, |a| a.used())
    }
}

/// The per-address share's limit (`usize::MAX`: shares off).
pub fn per_address_limit() -> usize {
    shares().limit.load(Ordering::Relaxed)
}

/// The most bytes any one address group holds now (for metrics: how close the hungriest
/// address is to its share). One pass over the map, at most one entry per address group with
/// a connection open.
pub fn largest_address_use() -> usize {
    shares()
        .map
        .iter()
        .filter_map(|e| e.value().upgrade())
        .map(|a| a.used())
        .max()
        .unwrap_or(0)
}

/// Bytes `ip`'s address group holds now (0 when it holds none or shares are off).
pub fn used_by_address(ip: IpAddr) -> usize {
    shares().used_by(ip)
}

/// What a connection charges to: the process's budget and its address's share. Cheap to
/// clone; every charge it makes holds the share alive.
#[derive(Clone, Debug, Default)]
pub struct PeerBudget {
    share: Option<Arc<AddressShare>>,
}

impl PeerBudget {
    /// The budget of a connection from `ip`.
    pub fn for_peer(ip: IpAddr) -> PeerBudget {
        PeerBudget {
            share: address_share(ip),
        }
    }

    /// The global budget alone (no address known: tests, internal streams).
    pub fn global_only() -> PeerBudget {
        PeerBudget { share: None }
    }

    /// An empty charge on the global budget and this address's share.
    pub fn charge(&self) -> Charge {
        Charge {
            budget: global(),
            share: self.share.clone(),
            bytes: 0,
        }
    }

    /// Takes `bytes` from both, or refuses without taking anything.
    pub fn try_charge(&self, bytes: usize) -> Result<Charge, OverBudget> {
        let mut c = self.charge();
        c.try_grow(bytes)?;
        Ok(c)
    }
}

/// Bytes held from a budget (and an address's share); returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: &'static MemoryBudget,
    share: Option<Arc<AddressShare>>,
    bytes: usize,
}

impl Charge {
    /// An empty charge on the global budget.
    pub fn global() -> Charge {
        global().empty()
    }

    /// An empty charge on `budget` and `share` (tests use their own budgets).
    pub fn with_share(budget: &'static MemoryBudget, share: Option<Arc<AddressShare>>) -> Charge {
        Charge {
            budget,
            share,
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// An empty charge on the same budget and share (a copy of what this charge pays for).
    pub fn sibling(&self) -> Charge {
        Charge {
            budget: self.budget,
            share: self.share.clone(),
            bytes: 0,
        }
    }

    /// Takes `more` bytes, or refuses and keeps what it had. The process's budget is asked
    /// first (what a share holds is also in it, so when both are spent the line names
    /// `max_memory`), then the address's share; refused there, the first is given back.
    pub fn try_grow(&mut self, more: usize) -> Result<(), OverBudget> {
        self.budget.reserve(more)?;
        if let Some(share) = &self.share {
            if let Err(e) = share.budget.reserve(more) {
                self.budget.release(more);
                // Counted in the process's refusals too (the metric is "charges refused").
                self.budget.refused.fetch_add(1, Ordering::Relaxed);
                return Err(OverBudget {
                    per_address: true,
                    remedy: RAISE_MAX_MEMORY_PER_IP,
                    ..e
                });
            }
        }
        self.bytes = self.bytes.saturating_add(more);
        Ok(())
    }

    /// Returns up to `less` bytes.
    pub fn shrink(&mut self, less: usize) {
        let less = less.min(self.bytes);
        self.bytes -= less;
        self.budget.release(less);
        if let Some(share) = &self.share {
            share.budget.release(less);
        }
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

/// The codec's view of a charge: the chunk decoder grows it before a partial message grows.
impl crate::rtmp::budget::BufferCharge for Charge {
    fn try_grow(&mut self, more: usize) -> Result<(), OverBudget> {
        Charge::try_grow(self, more)
    }

    fn shrink(&mut self, less: usize) {
        Charge::shrink(self, less)
    }

    fn bytes(&self) -> usize {
        Charge::bytes(self)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
        if let Some(share) = &self.share {
            share.budget.release(self.bytes);
        }
    }
}

/// The default share when `limits.max_memory_per_ip` is 0 (auto): a quarter of the process's
/// budget. One address then needs company (at least three others doing the same) to spend it
/// all, while an address that carries several large streams legitimately (a NAT, a relay)
/// still has room for them.
pub fn default_per_address_limit(process_budget: usize) -> usize {
    process_budget / 4
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
    fn a_charge_with_a_share_is_refused_when_either_is_spent() {
        let b = budget(100);
        let share = Arc::new(AddressShare {
            group: "192.0.2.1".parse().unwrap(),
            budget: MemoryBudget::new(30),
            shares: None,
        });
        let mut c = Charge::with_share(b, Some(share.clone()));
        c.try_grow(30).unwrap();
        let err = c.try_grow(1).unwrap_err();
        assert!(err.per_address);
        assert_eq!((err.used, err.limit), (30, 30));
        // The gateway's line names the key to raise (the protocol crate's message does not).
        assert!(err
            .to_string()
            .contains("(limits.max_memory_per_ip; raise it"));
        // Nothing was taken from the process's budget by the refused charge.
        assert_eq!((b.used(), share.used(), b.refused()), (30, 30, 1));
        let _other = b.try_charge(70).unwrap();
        c.shrink(20);
        let _more = b.try_charge(20).unwrap();
        let err = c.try_grow(5).unwrap_err();
        assert!(!err.per_address);
        assert!(err.to_string().contains("(limits.max_memory; raise it"));
        // The share's reservation was returned when the process's budget refused.
        assert_eq!((b.used(), share.used()), (100, 10));
        drop(c);
        assert_eq!((b.used(), share.used()), (90, 0));
    }

    #[test]
    fn address_shares_are_grouped_and_leave_the_map_with_their_last_holder() {
        let s: &'static Shares = Box::leak(Box::new(Shares {
            map: DashMap::new(),
            limit: AtomicUsize::new(1000),
            v6_prefix: AtomicU8::new(64),
        }));
        let a = PeerBudget {
            share: s.share("2001:db8:77::1".parse().unwrap()),
        };
        let b = PeerBudget {
            share: s.share("2001:db8:77::2".parse().unwrap()),
        };
        let c1 = a.try_charge(600).unwrap();
        assert!(b.try_charge(401).unwrap_err().per_address);
        let c2 = b.try_charge(400).unwrap();
        assert_eq!(s.used_by("2001:db8:77::99".parse().unwrap()), 1000);
        assert_eq!(s.used_by("2001:db8:78::1".parse().unwrap()), 0);
        let key: IpAddr = "2001:db8:77::".parse().unwrap();
        assert!(s.map.contains_key(&key));
        drop((a, b, c1, c2));
        assert!(!s.map.contains_key(&key));
        assert_eq!(s.used_by("2001:db8:77::1".parse().unwrap()), 0);
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
