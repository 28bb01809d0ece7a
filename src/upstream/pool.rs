//! Backend groups: which group serves an app, the order in which a client tries a group's
//! backends (balance and weights, backups last, backends marked down after those up), and
//! each backend's up/down state (from health checks and from clients' connects).
//!
//! `hash` uses weighted rendezvous (highest random weight) hashing: each backend scores
//! `weight / -ln(u)`, `u` a uniform draw in (0, 1) from a fixed hash of the stream key and
//! the backend's URL, and the highest score wins. Every gateway computes the same order
//! without talking to the others (the configured order does not matter either), a backend
//! gets its weight's share of the streams, and when one is down only its streams move,
//! each to its own next-highest backend.

use std::sync::{Arc, Mutex, PoisonError, Weak};

#[cfg(test)]
use super::settings::BackendSettings;
use super::settings::{AppPattern, Balance, GroupSettings, HealthKind};
use super::state::{BackendState, Transition};
use super::Connector;

/// One backend of a group.
#[derive(Debug)]
pub struct Backend {
    pub group: String,
    pub connector: Connector,
    /// Tried only when no primary backend of the group is up.
    pub backup: bool,
    /// 1..=MAX_WEIGHT, see [`super::settings::BackendSettings::weight`].
    pub weight: u32,
    /// Up/down, streaks, clients, transitions: kept across a reload ([`Pools::inherit`]).
    state: Arc<BackendState>,
}

/// Holds a backend's active-client count for one client.
pub struct ActiveGuard(Arc<BackendState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.remove_client();
    }
}

impl Backend {
    pub fn new(group: &str, connector: Connector, backup: bool) -> Backend {
        Self::weighted(group, connector, backup, 1)
    }

    pub fn weighted(group: &str, connector: Connector, backup: bool, weight: u32) -> Backend {
        Backend {
            group: group.to_string(),
            connector,
            backup,
            weight: weight.max(1),
            state: Arc::default(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.state.is_up()
    }

    pub fn active(&self) -> usize {
        self.state.active()
    }

    /// (times marked up, times marked down).
    pub fn transitions(&self) -> (u64, u64) {
        self.state.transitions()
    }

    /// Counts one client on this backend until the guard drops.
    pub fn hold(self: &Arc<Self>) -> ActiveGuard {
        self.state.add_client();
        ActiveGuard(self.state.clone())
    }

    /// A health check's result: down after `fall` failures in a row, up after `rise`
    /// successes in a row. Transitions are logged.
    pub fn checked(&self, ok: bool, rise: u32, fall: u32, detail: &str) {
        match self.state.checked(ok, rise, fall) {
            Transition::Up(n) => self.log(true, &format!("{n} health check(s) in a row passed")),
            Transition::Down(n) => self.log(
                false,
                &format!("{n} health check(s) in a row failed, the last: {detail}"),
            ),
            Transition::None => {}
        }
    }

    /// A client's connect to the backend: a failure marks it down at once, a success up.
    pub fn connected(&self, ok: bool, detail: &str) {
        match self.state.connected(ok) {
            Transition::Up(_) => self.log(true, "a client's connect succeeded"),
            Transition::Down(_) => self.log(false, &format!("a client's connect failed: {detail}")),
            Transition::None => {}
        }
    }

    fn log(&self, up: bool, why: &str) {
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
    pub balance: Balance,
    pub health: HealthKind,
    /// Round-robin's turn among the primaries that are up.
    rotation: Mutex<Rotation>,
}

/// Smooth weighted round-robin (as nginx spreads upstream weights) over the primaries
/// that are up: each turn every one of them gains its weight, the largest total is picked
/// and loses the sum. Weights 3, 1, 1 give 0, 1, 0, 2, 0 (never three in a row). A
/// backend that is down takes no turn, so its share goes to the others in proportion to
/// their weights (not all to the one after it).
#[derive(Debug, Default)]
struct Rotation {
    /// Which primaries took part in the last turn; when that changes the totals restart
    /// from zero (they then stay within the weights' sum either way).
    up: Vec<bool>,
    /// Each primary's running total.
    current: Vec<i64>,
}

impl Rotation {
    /// The primary (index into `weights`) whose turn it is among those `up`; None when
    /// none is.
    fn pick(&mut self, weights: &[u32], up: &[bool]) -> Option<usize> {
        if self.up != up || self.current.len() != weights.len() {
            self.up = up.to_vec();
            self.current = vec![0; weights.len()];
        }
        let total: i64 = weights
            .iter()
            .zip(up)
            .filter(|(_, &u)| u)
            .map(|(&w, _)| i64::from(w))
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for (i, ((c, &w), &u)) in self.current.iter_mut().zip(weights).zip(up).enumerate() {
            if !u {
                continue;
            }
            *c += i64::from(w);
            match best {
                Some((_, v)) if *c <= v => {}
                _ => best = Some((i, *c)),
            }
        }
        let (i, _) = best?;
        if let Some(c) = self.current.get_mut(i) {
            *c -= total;
        }
        Some(i)
    }
}

impl Group {
    /// `connectors`: (connector, backup, weight) in the configured order.
    pub fn new(settings: &GroupSettings, connectors: Vec<(Connector, bool, u32)>) -> Group {
        let backends: Vec<Arc<Backend>> = connectors
            .into_iter()
            .map(|(c, backup, w)| Arc::new(Backend::weighted(&settings.name, c, backup, w)))
            .collect();
        Group {
            name: settings.name.clone(),
            apps: settings.apps.clone(),
            backends,
            balance: settings.balance,
            health: settings.health,
            rotation: Mutex::default(),
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
    /// for round-robin, by fewest clients per weight for least-connections, as configured
    /// for first, by score for hash), then backups that are up, then everything marked
    /// down in the same order (a check may not have noticed a recovery yet; trying is
    /// better than refusing). A hash group without a stream key (bytes mode, health
    /// checks) orders as hash of the empty key.
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        self.candidates_for("")
    }

    /// [`Group::candidates`] for the stream `key` (app/stream; used by hash only).
    pub fn candidates_for(&self, key: &str) -> Vec<Arc<Backend>> {
        let mut order: Vec<Arc<Backend>> = match self.balance {
            Balance::First => self.backends.clone(),
            Balance::RoundRobin => {
                let prim: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| !b.backup).collect();
                let weights: Vec<u32> = prim.iter().map(|b| b.weight).collect();
                let mut up: Vec<bool> = prim.iter().map(|b| b.is_up()).collect();
                if !up.contains(&true) {
                    // All down: rotate over all of them (one may be back before its check).
                    up.fill(true);
                }
                // The rotation holds only counters: a panic elsewhere cannot break it.
                let start = self
                    .rotation
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pick(&weights, &up)
                    .unwrap_or(0);
                let mut v: Vec<Arc<Backend>> = Vec::with_capacity(self.backends.len());
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
                // Fewest clients per unit of weight (cross-multiplied, no division);
                // stable: ties keep the configured order.
                v.sort_by(|a, b| {
                    let l = (a.active() as u128) * u128::from(b.weight);
                    let r = (b.active() as u128) * u128::from(a.weight);
                    l.cmp(&r)
                });
                v
            }
            Balance::Hash => {
                let mut v: Vec<(f64, Arc<Backend>)> = self
                    .backends
                    .iter()
                    .map(|b| {
                        (
                            hrw_score(key, &b.connector.url.to_string(), b.weight),
                            b.clone(),
                        )
                    })
                    .collect();
                v.sort_by(|a, b| b.0.total_cmp(&a.0));
                v.into_iter().map(|(_, b)| b).collect()
            }
        };
        // Stable sorts: up before down, then primaries before backups.
        order.sort_by_key(|b| (!b.is_up(), b.backup));
        order
    }
}

// The rendezvous score and the stream key live in the net layer, shared with edge mode's
// choice of origin (the same stream goes to the same server either way).
pub use crate::net::rendezvous::{hrw_score, stream_key};

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

    /// Takes over the state of each backend `old` has in a group of the same name, with the
    /// same URL and the same kind of check (a reload that keeps a backend keeps whether it
    /// is up, its streaks, its client count and its transition counters). Call it before
    /// the pools are shared; returns how many backends kept their state.
    pub fn inherit(&mut self, old: &Pools) -> usize {
        let mut kept = 0;
        for group in &mut self.groups {
            let Some(before) = old
                .groups
                .iter()
                .find(|g| g.name == group.name && g.health == group.health)
            else {
                continue;
            };
            for backend in &mut group.backends {
                let url = backend.connector.url.to_string();
                let Some(prev) = before
                    .backends
                    .iter()
                    .find(|b| b.connector.url.to_string() == url)
                else {
                    continue;
                };
                // Fresh pools hold the only reference to each backend.
                if let Some(b) = Arc::get_mut(backend) {
                    b.state = prev.state.clone();
                    kept += 1;
                }
            }
        }
        kept
    }
}

impl Group {
    /// The app a health check's `connect` names: the group's first app that is not a glob,
    /// if any (a backend may close a connect to an app it does not serve).
    pub fn literal_app(&self) -> Option<&str> {
        self.apps
            .iter()
            .map(|p| p.0.as_str())
            .find(|a| !a.contains('*'))
    }
}

/// The pools the running relay uses, for the metrics endpoint, the health checks (a
/// replaced relay's checks stop) and a reload (which keeps backends' state).
static CURRENT: Mutex<Option<Weak<Pools>>> = Mutex::new(None);

pub fn set_current(pools: &Arc<Pools>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = Some(Arc::downgrade(pools));
    }
}

/// The running relay's pools, if there is one.
pub fn current() -> Option<Arc<Pools>> {
    CURRENT.lock().ok().and_then(|c| c.as_ref()?.upgrade())
}

/// True while `pools` are the running relay's.
pub fn is_current(pools: &Arc<Pools>) -> bool {
    current().is_some_and(|c| Arc::ptr_eq(&c, pools))
}

/// One backend of the running relay, for `/metrics`.
pub struct BackendView {
    pub group: String,
    pub url: String,
    pub up: bool,
    pub active: usize,
    pub went_up: u64,
    pub went_down: u64,
}

/// Each backend of the running relay.
pub fn snapshot() -> Vec<BackendView> {
    let Some(pools) = current() else {
        return Vec::new();
    };
    pools
        .backends()
        .map(|b| {
            let (went_up, went_down) = b.transitions();
            BackendView {
                group: b.group.clone(),
                url: b.connector.url.to_string(),
                up: b.is_up(),
                active: b.active(),
                went_up,
                went_down,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::net::url::parse_upstream;

    fn group(balance: Balance, urls: &[&str], backup: &[&str]) -> Group {
        let w: Vec<u32> = urls.iter().map(|_| 1).collect();
        weighted(balance, urls, &w, backup)
    }

    fn weighted(balance: Balance, urls: &[&str], weights: &[u32], backup: &[&str]) -> Group {
        let parse = |l: &[&str], w: &[u32]| -> Vec<BackendSettings> {
            l.iter()
                .enumerate()
                .map(|(i, u)| BackendSettings {
                    url: parse_upstream("k", u).unwrap(),
                    weight: w.get(i).copied().unwrap_or(1),
                    proxy_protocol: None,
                })
                .collect()
        };
        let settings = GroupSettings {
            name: "g".into(),
            apps: Vec::new(),
            backends: parse(urls, weights),
            backup: parse(backup, &[]),
            balance,
            health: HealthKind::Off,
        };
        let connectors = settings
            .backends
            .iter()
            .map(|u| (u, false))
            .chain(settings.backup.iter().map(|u| (u, true)))
            .map(|(u, b)| (Connector::new(&u.url, None, None).unwrap(), b, u.weight))
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

    #[test]
    fn weighted_round_robin_and_least_connections() {
        let g = weighted(
            Balance::RoundRobin,
            &["rtmp://h:1", "rtmp://h:2"],
            &[3, 1],
            &[],
        );
        let firsts: Vec<u16> = (0..8).map(|_| ports(&g.candidates())[0]).collect();
        assert_eq!(firsts, [1, 1, 2, 1, 1, 1, 2, 1]);
        let mut r = Rotation::default();
        let turns: Vec<usize> = (0..5)
            .filter_map(|_| r.pick(&[3, 1, 1], &[true; 3]))
            .collect();
        assert_eq!(turns, [0, 1, 0, 2, 0]);
        let g = weighted(
            Balance::LeastConnections,
            &["rtmp://h:1", "rtmp://h:2"],
            &[1, 3],
            &[],
        );
        // 2 clients on a weight-3 backend still count less than 1 on a weight-1 one.
        let _a = g.backends[1].hold();
        let _b = g.backends[1].hold();
        let _c = g.backends[0].hold();
        assert_eq!(ports(&g.candidates()), [2, 1]);
        let _d = g.backends[1].hold();
        let _e = g.backends[1].hold();
        assert_eq!(ports(&g.candidates()), [1, 2]);
    }

    #[test]
    fn hash_is_stable_weighted_and_moves_only_a_dead_backends_streams() {
        let urls = ["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"];
        let g = weighted(Balance::Hash, &urls, &[1, 1, 2], &["rtmp://h:9"]);
        // The order does not depend on the configured order (every gateway agrees).
        let rev = weighted(
            Balance::Hash,
            &["rtmp://h:3", "rtmp://h:1", "rtmp://h:2"],
            &[2, 1, 1],
            &["rtmp://h:9"],
        );
        let n = 4000;
        let mut counts = [0usize; 3];
        let mut before = Vec::new();
        for i in 0..n {
            let key = stream_key("live", &format!("cam{i}?token=x"));
            let order = ports(&g.candidates_for(&key));
            assert_eq!(order, ports(&rev.candidates_for(&key)));
            assert_eq!(order[3], 9, "backup last");
            // The same stream always goes to the same backend.
            assert_eq!(order, ports(&g.candidates_for(&key)));
            counts[usize::from(order[0]) - 1] += 1;
            before.push(order);
        }
        // Weights 1:1:2: expected 1000, 1000, 2000; allow 10% either way.
        for (i, want) in [1000.0, 1000.0, 2000.0].iter().enumerate() {
            let got = counts[i] as f64;
            assert!(
                (got - want).abs() <= want * 0.1,
                "backend {}: {got} of {n} ({counts:?})",
                i + 1
            );
        }
        // The query does not matter: a publisher's token and a player's differ.
        assert_eq!(
            stream_key("live?a=1", "cam1?token=x"),
            stream_key("live", "cam1")
        );
        // Backend 3 goes down: its streams move (each to its own second choice), no other moves.
        g.backends[2].connected(false, "refused");
        for (i, was) in before.iter().enumerate() {
            let key = stream_key("live", &format!("cam{i}"));
            let now = ports(&g.candidates_for(&key));
            if was[0] == 3 {
                assert_eq!(now[0], was[1], "moves to its next-highest backend");
            } else {
                assert_eq!(now[0], was[0], "a live backend's stream never moves");
            }
            assert_eq!(*now.last().unwrap(), 3, "the dead one is tried last");
        }
    }

    /// The first choice of `n` clients, counted by port.
    fn firsts(g: &Group, n: usize) -> std::collections::BTreeMap<u16, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            *counts.entry(ports(&g.candidates())[0]).or_insert(0) += 1;
        }
        counts
    }

    /// Asserts each port's share of `n` first choices within 3% of `n` of its expected one.
    fn assert_shares(counts: &std::collections::BTreeMap<u16, usize>, want: &[(u16, f64)]) {
        let n: usize = counts.values().sum();
        assert_eq!(counts.len(), want.len(), "{counts:?}");
        for &(port, share) in want {
            let got = counts.get(&port).copied().unwrap_or(0) as f64;
            let expected = share * n as f64;
            assert!(
                (got - expected).abs() <= 0.03 * n as f64,
                "backend {port}: {got} of {n} first choices, expected {expected} ({counts:?})"
            );
        }
    }

    #[test]
    fn round_robin_shares_a_down_backends_turns_among_the_others() {
        let g = group(
            Balance::RoundRobin,
            &["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"],
            &["rtmp://h:9"],
        );
        assert_shares(
            &firsts(&g, 300),
            &[(1, 1. / 3.), (2, 1. / 3.), (3, 1. / 3.)],
        );
        // 2 is down: 1 and 3 share its turns (not 3 taking them all: 1/3 and 2/3).
        g.backends[1].connected(false, "refused");
        let counts = firsts(&g, 3000);
        assert_shares(&counts, &[(1, 0.5), (3, 0.5)]);
        // Every order still tries the other survivor, then the backup, then 2.
        assert!(matches!(
            ports(&g.candidates())[..],
            [1, 3, 9, 2] | [3, 1, 9, 2]
        ));
        // Back up: three equal shares again.
        g.backends[1].connected(true, "");
        assert_shares(
            &firsts(&g, 300),
            &[(1, 1. / 3.), (2, 1. / 3.), (3, 1. / 3.)],
        );
        // Weights are kept among the backends that are up: 3:1:1 with the 1 in the
        // middle down is 3:1 (not 3:2 to the one after the down backend).
        let g = weighted(
            Balance::RoundRobin,
            &["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"],
            &[3, 1, 1],
            &[],
        );
        g.backends[1].connected(false, "refused");
        assert_shares(&firsts(&g, 4000), &[(1, 0.75), (3, 0.25)]);
        // And 1:1:3 with the 3 down splits evenly between the other two.
        let g = weighted(
            Balance::RoundRobin,
            &["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"],
            &[1, 1, 3],
            &[],
        );
        g.backends[2].connected(false, "refused");
        assert_shares(&firsts(&g, 4000), &[(1, 0.5), (2, 0.5)]);
        // All down: the rotation turns over all of them (one may be back before its check).
        g.backends[0].connected(false, "refused");
        g.backends[1].connected(false, "refused");
        assert_shares(&firsts(&g, 500), &[(1, 0.2), (2, 0.2), (3, 0.6)]);
    }

    #[test]
    fn inherit_keeps_the_state_of_backends_with_the_same_url() {
        let pools = |urls: &[&str], health: HealthKind| {
            let mut g = group(Balance::RoundRobin, urls, &[]);
            g.health = health;
            Pools {
                groups: vec![g],
                rise: 2,
                fall: 2,
            }
        };
        let old = pools(&["rtmp://h:1", "rtmp://h:2"], HealthKind::Tcp);
        old.groups[0].backends[0].connected(false, "refused");
        let _client = old.groups[0].backends[1].hold();
        let mut new = pools(&["rtmp://h:1", "rtmp://h:2", "rtmp://h:3"], HealthKind::Tcp);
        assert_eq!(new.inherit(&old), 2);
        let b = &new.groups[0].backends;
        assert!(!b[0].is_up());
        assert_eq!(b[0].transitions(), (0, 1));
        assert_eq!(b[1].active(), 1);
        assert!(b[2].is_up());
        // Another kind of check starts afresh.
        let mut other = pools(&["rtmp://h:1"], HealthKind::Rtmp);
        assert_eq!(other.inherit(&old), 0);
        assert!(other.groups[0].backends[0].is_up());
    }
}
