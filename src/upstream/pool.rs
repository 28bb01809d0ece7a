//! Backend groups: which group serves an app, the order in which a client tries a group's
//! backends (balance, backups last, backends marked down after those up), and each
//! backend's up/down state (from health checks and from clients' connects).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use super::settings::{AppPattern, Balance, GroupSettings, HealthKind};
use super::Connector;

/// One backend of a group.
#[derive(Debug)]
pub struct Backend {
    pub group: String,
    pub connector: Connector,
    /// Tried only when no primary backend of the group is up.
    pub backup: bool,
    up: AtomicBool,
    /// Consecutive failed and successful checks, for the rise/fall thresholds.
    fails: AtomicU32,
    oks: AtomicU32,
    /// Clients relayed to it right now (least-connections, admin).
    active: AtomicUsize,
}

/// Holds a backend's active-client count for one client.
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl Backend {
    pub fn new(group: &str, connector: Connector, backup: bool) -> Backend {
        Backend {
            group: group.to_string(),
            connector,
            backup,
            up: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            active: AtomicUsize::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// Counts one client on this backend until the guard drops.
    pub fn hold(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }

    /// A health check's result: down after `fall` failures in a row, up after `rise`
    /// successes in a row. Transitions are logged.
    pub fn checked(&self, ok: bool, rise: u32, fall: u32, detail: &str) {
        if ok {
            self.fails.store(0, Relaxed);
            let oks = self.oks.fetch_add(1, Relaxed).saturating_add(1);
            if !self.is_up() && oks >= rise {
                self.mark(true, &format!("{oks} health check(s) in a row passed"));
            }
        } else {
            self.oks.store(0, Relaxed);
            let fails = self.fails.fetch_add(1, Relaxed).saturating_add(1);
            if self.is_up() && fails >= fall {
                self.mark(
                    false,
                    &format!("{fails} health check(s) in a row failed, the last: {detail}"),
                );
            }
        }
    }

    /// A client's connect to the backend: a failure marks it down at once (a refused or
    /// timed-out connect is conclusive, and the next client should not wait on it again);
    /// a success marks it up.
    pub fn connected(&self, ok: bool, detail: &str) {
        if ok {
            self.fails.store(0, Relaxed);
            if !self.is_up() {
                self.mark(true, "a client's connect succeeded");
            }
        } else {
            self.oks.store(0, Relaxed);
            self.fails.fetch_add(1, Relaxed);
            if self.is_up() {
                self.mark(false, &format!("a client's connect failed: {detail}"));
            }
        }
    }

    fn mark(&self, up: bool, why: &str) {
        if self.up.swap(up, Relaxed) == up {
            return;
        }
        let url = &self.connector.url;
        if up {
            tracing::info!("upstream {} backend {url} marked up: {why}", self.group);
        } else {
            tracing::warn!(
                "upstream {} backend {url} marked down: {why}; new clients go to the group's other backends",
                self.group
            );
        }
    }
}

/// One group of backends and the apps it serves.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    apps: Vec<AppPattern>,
    pub backends: Vec<Arc<Backend>>,
    balance: Balance,
    pub health: HealthKind,
    next: AtomicUsize,
}

impl Group {
    pub fn new(settings: &GroupSettings, connectors: Vec<(Connector, bool)>) -> Group {
        Group {
            name: settings.name.clone(),
            apps: settings.apps.clone(),
            backends: connectors
                .into_iter()
                .map(|(c, backup)| Arc::new(Backend::new(&settings.name, c, backup)))
                .collect(),
            balance: settings.balance,
            health: settings.health,
            next: AtomicUsize::new(0),
        }
    }

    /// The group serves every app not claimed by another (no `apps` given).
    pub fn is_default(&self) -> bool {
        self.apps.is_empty()
    }

    pub fn serves(&self, app: &str) -> bool {
        self.apps.iter().any(|p| p.matches(app))
    }

    /// The order in which one client tries the backends: primaries that are up (rotated
    /// for round-robin, by fewest clients for least-connections, as configured for
    /// first), then backups that are up, then everything marked down in the same order
    /// (a check may not have noticed a recovery yet; trying is better than refusing).
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        let mut order: Vec<Arc<Backend>> = match self.balance {
            Balance::First => self.backends.clone(),
            Balance::RoundRobin => {
                let primaries = self.backends.iter().filter(|b| !b.backup).count().max(1);
                let start = self.next.fetch_add(1, Relaxed) % primaries;
                let mut v: Vec<Arc<Backend>> = Vec::with_capacity(n);
                let prim: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| !b.backup).collect();
                for i in 0..prim.len() {
                    if let Some(b) = prim.get((start + i) % prim.len()) {
                        v.push((*b).clone());
                    }
                }
                v.extend(self.backends.iter().filter(|b| b.backup).cloned());
                v
            }
            Balance::LeastConnections => {
                let mut v = self.backends.clone();
                // Stable: ties keep the configured order.
                v.sort_by_key(|b| b.active());
                v
            }
        };
        // Stable sorts: up before down, then primaries before backups.
        order.sort_by_key(|b| (!b.is_up(), b.backup));
        order
    }
}

/// Every group, as configured.
#[derive(Debug)]
pub struct Pools {
    pub groups: Vec<Group>,
    pub rise: u32,
    pub fall: u32,
}

impl Pools {
    /// The group for `app` (query stripped): the first whose apps match, else the default.
    pub fn route(&self, app: &str) -> Option<&Group> {
        let app = app.split('?').next().unwrap_or_default();
        self.groups
            .iter()
            .find(|g| g.serves(app))
            .or_else(|| self.groups.iter().find(|g| g.is_default()))
    }

    /// The default group (the one bytes mode uses).
    pub fn default_group(&self) -> Option<&Group> {
        self.groups
            .iter()
            .find(|g| g.is_default())
            .or_else(|| self.groups.first())
    }

    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.groups.iter().flat_map(|g| g.backends.iter())
    }
}

/// The pools the running relay uses, for the metrics endpoint.
static CURRENT: Mutex<Option<Weak<Pools>>> = Mutex::new(None);

pub fn set_current(pools: &Arc<Pools>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some(Arc::downgrade(pools));
    }
}

/// (group, backend URL, up, active clients) for each backend of the running relay.
pub fn snapshot() -> Vec<(String, String, bool, usize)> {
    let pools = CURRENT.lock().ok().and_then(|c| c.as_ref()?.upgrade());
    let Some(pools) = pools else {
        return Vec::new();
    };
    pools
        .backends()
        .map(|b| {
            (
                b.group.clone(),
                b.connector.url.to_string(),
                b.is_up(),
                b.active(),
            )
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::net::url::parse_upstream;

    fn group(balance: Balance, urls: &[&str], backup: &[&str]) -> Group {
        let parse =
            |l: &[&str]| -> Vec<_> { l.iter().map(|u| parse_upstream("k", u).unwrap()).collect() };
        let settings = GroupSettings {
            name: "g".into(),
            apps: Vec::new(),
            backends: parse(urls),
            backup: parse(backup),
            balance,
            health: HealthKind::Off,
        };
        let connectors = settings
            .backends
            .iter()
            .map(|u| (u, false))
            .chain(settings.backup.iter().map(|u| (u, true)))
            .map(|(u, b)| (Connector::new(u, None, None).unwrap(), b))
            .collect();
        Group::new(&settings, connectors)
    }

    fn ports(v: &[Arc<Backend>]) -> Vec<u16> {
        v.iter().map(|b| b.connector.url.port).collect()
    }

    #[test]
    fn round_robin_rotates_primaries_and_keeps_backups_and_down_last() {
        let g = group(
            Balance::RoundRobin,
            &["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"],
            &["rtmp://h:9"],
        );
        assert_eq!(ports(&g.candidates()), [1, 2, 3, 9]);
        assert_eq!(ports(&g.candidates()), [2, 3, 1, 9]);
        assert_eq!(ports(&g.candidates()), [3, 1, 2, 9]);
        // A failed connect marks 1 down: it goes after the backup.
        g.backends[0].connected(false, "refused");
        assert_eq!(ports(&g.candidates()), [2, 3, 9, 1]);
        // Health checks bring it back after `rise` passes.
        g.backends[0].checked(true, 2, 2, "");
        assert!(!g.backends[0].is_up());
        g.backends[0].checked(true, 2, 2, "");
        assert!(g.backends[0].is_up());
        // And take one down after `fall` failures.
        g.backends[1].checked(false, 2, 2, "x");
        assert!(g.backends[1].is_up());
        g.backends[1].checked(false, 2, 2, "x");
        assert!(!g.backends[1].is_up());
    }

    #[test]
    fn first_and_least_connections() {
        let g = group(Balance::First, &["rtmp://h:1", "rtmp://h:2"], &[]);
        assert_eq!(ports(&g.candidates()), [1, 2]);
        assert_eq!(ports(&g.candidates()), [1, 2]);
        let g = group(
            Balance::LeastConnections,
            &["rtmp://h:1", "rtmp://h:2"],
            &[],
        );
        let _held = g.backends[0].hold();
        assert_eq!(ports(&g.candidates()), [2, 1]);
        drop(_held);
        assert_eq!(g.backends[0].active(), 0);
        assert_eq!(ports(&g.candidates()), [1, 2]);
    }

    #[test]
    fn routes_by_app_then_default() {
        let mut a = group(Balance::First, &["rtmp://h:1"], &[]);
        a.apps = vec![AppPattern("cam*".into())];
        a.name = "a".into();
        let d = group(Balance::First, &["rtmp://h:2"], &[]);
        let pools = Pools {
            groups: vec![a, d],
            rise: 2,
            fall: 2,
        };
        assert_eq!(pools.route("cam1?token=x").unwrap().name, "a");
        assert_eq!(pools.route("live").unwrap().name, "g");
    }
}
