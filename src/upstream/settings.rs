//! The relay's settings: relay mode, backend groups (`[[upstreams]]`), balance policy and
//! health checks, as read from the file and the command line and validated.

use std::time::Duration;

use serde::Deserialize;

use crate::net::proxy_protocol::ProxyVersion;
use crate::net::url::{parse_upstream, RtmpUrl};

/// Largest `weight` of one backend: a round-robin cycle is as long as the group's weights
/// summed, so this bounds it (with [`MAX_GROUP_BACKENDS`]) at 100 * 64 steps.
pub const MAX_WEIGHT: u32 = 100;
/// Most backends (primaries and backups) in one group.
pub const MAX_GROUP_BACKENDS: usize = 64;

/// A wrong relay setting: the key at fault and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

/// How a relayed client's bytes reach the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// The gateway runs the RTMP handshake itself, reads `connect` (and watches every
    /// later command), picks the backend by app, then forwards the client's chunk stream
    /// unchanged.
    Connect,
    /// A blind byte copy, handshake included, to the default group.
    #[default]
    Bytes,
}

impl RelayMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayMode::Connect => "connect",
            RelayMode::Bytes => "bytes",
        }
    }
}

/// The order a group's backends are tried in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Each client starts at the next backend.
    #[default]
    RoundRobin,
    /// The backend with the fewest relayed clients first.
    LeastConnections,
    /// Always in the configured order: the first one up takes every client (failover).
    First,
    /// Weighted rendezvous hashing of app and stream name: every client of a stream (its
    /// publisher and every player) reaches the same backend, the same on every gateway;
    /// the gateway answers `connect` and `createStream` itself until `publish` or `play`
    /// names the stream.
    Hash,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::First => "first",
            Balance::Hash => "hash",
        }
    }
}

/// How a group's backends are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect (and the TLS handshake for rtmps://).
    Tcp,
    /// A TCP (TLS) connect and an RTMP handshake.
    Rtmp,
    /// No active check; clients' connects still mark a backend down and up.
    Off,
}

impl HealthKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthKind::Tcp => "tcp",
            HealthKind::Rtmp => "rtmp",
            HealthKind::Off => "off",
        }
    }
}

/// An app name, or a glob with `*` (any run of characters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppPattern(pub String);

impl AppPattern {
    pub fn matches(&self, app: &str) -> bool {
        glob(self.0.as_bytes(), app.as_bytes())
    }
}

/// `*`-only glob match, linear in the text length times the number of stars (patterns
/// come from the config file, the text from a peer and is bounded by `max_name_len`).
fn glob(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

/// One entry of `backends` or `backup` as written: a URL, or a table with a weight and a
/// PROXY protocol header of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileBackend {
    Url(String),
    Table(FileBackendTable),
}

impl<'de> Deserialize<'de> for FileBackend {
    /// A string or a table; a table's own errors (an unknown key, a wrong type) are
    /// reported as they are, not as "matches no variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FileBackend;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a backend URL, or a table { url = \"rtmp://HOST:PORT\", weight = N, proxy_protocol = \"v1\" | \"v2\" | \"off\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileBackend, E> {
                Ok(FileBackend::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<FileBackend, A::Error> {
                FileBackendTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(FileBackend::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// `{ url = "rtmp://...", weight = 3, proxy_protocol = "v2" }`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileBackendTable {
    pub url: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub proxy_protocol: Option<ProxyChoice>,
}

/// A backend's PROXY protocol header: a version, or `off` to send none even when
/// `upstream.proxy_protocol` is set.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyChoice {
    V1,
    V2,
    Off,
}

impl From<&str> for FileBackend {
    fn from(s: &str) -> Self {
        FileBackend::Url(s.to_string())
    }
}

/// One `[[upstreams]]` table as written.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileGroup {
    pub name: String,
    #[serde(default)]
    pub apps: Vec<String>,
    pub backends: Vec<FileBackend>,
    #[serde(default)]
    pub backup: Vec<FileBackend>,
    #[serde(default)]
    pub balance: Option<Balance>,
    #[serde(default)]
    pub health_check: Option<HealthKind>,
}

/// One validated backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    pub url: RtmpUrl,
    /// 1..=[`MAX_WEIGHT`]: its share of a round-robin cycle, of a hash group's streams, and
    /// the divisor of its client count for least-connections.
    pub weight: u32,
    /// Its own PROXY header choice (`None`: `upstream.proxy_protocol` applies).
    pub proxy_protocol: Option<ProxyChoice>,
}

impl BackendSettings {
    /// A backend of weight 1 with the group-wide PROXY setting.
    pub fn plain(url: RtmpUrl) -> Self {
        BackendSettings {
            url,
            weight: 1,
            proxy_protocol: None,
        }
    }

    /// The PROXY header this backend gets, given `upstream.proxy_protocol`.
    pub fn proxy(&self, default: Option<ProxyVersion>) -> Option<ProxyVersion> {
        match self.proxy_protocol {
            None => default,
            Some(ProxyChoice::V1) => Some(ProxyVersion::V1),
            Some(ProxyChoice::V2) => Some(ProxyVersion::V2),
            Some(ProxyChoice::Off) => None,
        }
    }
}

/// One validated group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSettings {
    pub name: String,
    /// Empty: the default group.
    pub apps: Vec<AppPattern>,
    pub backends: Vec<BackendSettings>,
    pub backup: Vec<BackendSettings>,
    pub balance: Balance,
    pub health: HealthKind,
}

/// Health check timing, from `[upstream]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    /// Successes in a row that mark a down backend up.
    pub rise: u32,
    /// Failures in a row that mark an up backend down.
    pub fall: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Duration::from_secs(5),
            rise: 2,
            fall: 2,
        }
    }
}

fn invalid(key: &str, msg: String) -> SettingsError {
    SettingsError {
        key: key.to_string(),
        message: msg,
    }
}

/// Validates the health check timing keys of `[upstream]`.
pub fn health(
    interval_secs: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
) -> Result<HealthSettings, SettingsError> {
    let d = HealthSettings::default();
    let interval = interval_secs.unwrap_or(d.interval.as_secs());
    if interval == 0 || interval > 3600 {
        return Err(invalid(
            "upstream.health_interval_secs",
            format!("{interval}: must be 1 to 3600 seconds"),
        ));
    }
    let count = |key: &str, v: Option<u32>, def: u32| match v.unwrap_or(def) {
        n @ 1..=100 => Ok(n),
        n => Err(invalid(key, format!("{n}: must be 1 to 100 checks"))),
    };
    Ok(HealthSettings {
        interval: Duration::from_secs(interval),
        rise: count("upstream.health_rise", rise, d.rise)?,
        fall: count("upstream.health_fall", fall, d.fall)?,
    })
}

/// Validates one backend entry (`key` names it in errors).
fn backend(key: &str, b: &FileBackend) -> Result<BackendSettings, SettingsError> {
    let (url, weight, proxy_protocol) = match b {
        FileBackend::Url(u) => (u, None, None),
        FileBackend::Table(t) => (&t.url, t.weight, t.proxy_protocol),
    };
    let url = parse_upstream(key, url).map_err(|e| invalid(key, e.to_string()))?;
    let weight = match weight.unwrap_or(1) {
        w @ 1..=MAX_WEIGHT => w,
        w => {
            return Err(invalid(
                &format!("{key}.weight"),
                format!("{w}: a weight is 1 to {MAX_WEIGHT}"),
            ))
        }
    };
    Ok(BackendSettings {
        url,
        weight,
        proxy_protocol,
    })
}

/// Builds the groups: the `--upstream` URLs (or `[upstream] url`) form the group
/// `default`; each `[[upstreams]]` table adds one. Returns them and the relay mode.
pub fn groups(
    cli_urls: &[RtmpUrl],
    file: &[FileGroup],
    relay: Option<RelayMode>,
) -> Result<(Vec<GroupSettings>, RelayMode), SettingsError> {
    let mut out = Vec::new();
    // A single backend has nothing to fail over to: passive marking (and the admin probe)
    // is enough, and no probe connection shows up in the backend's client list.
    let default_health = |n: usize| {
        if n > 1 {
            HealthKind::Tcp
        } else {
            HealthKind::Off
        }
    };
    if !cli_urls.is_empty() {
        out.push(GroupSettings {
            name: "default".to_string(),
            apps: Vec::new(),
            backends: cli_urls
                .iter()
                .cloned()
                .map(BackendSettings::plain)
                .collect(),
            backup: Vec::new(),
            balance: Balance::First,
            health: default_health(cli_urls.len()),
        });
    }
    for (i, g) in file.iter().enumerate() {
        let key = format!("upstreams[{i}]");
        if g.name.is_empty() || out.iter().any(|o: &GroupSettings| o.name == g.name) {
            return Err(invalid(
                &format!("{key}.name"),
                format!(
                    "'{}': each upstream group needs a name of its own (the default group from --upstream / upstream.url is called 'default')",
                    g.name
                ),
            ));
        }
        if g.backends.is_empty() {
            return Err(invalid(
                &format!("{key}.backends"),
                format!(
                    "upstream group '{}' lists no backend; add backends = [\"rtmp://HOST:PORT\"]",
                    g.name
                ),
            ));
        }
        let parse =
            |what: &str, list: &[FileBackend]| -> Result<Vec<BackendSettings>, SettingsError> {
                list.iter()
                    .enumerate()
                    .map(|(j, b)| backend(&format!("{key}.{what}[{j}]"), b))
                    .collect()
            };
        let backends = parse("backends", &g.backends)?;
        let backup = parse("backup", &g.backup)?;
        if backends.len() + backup.len() > MAX_GROUP_BACKENDS {
            return Err(invalid(
                &format!("{key}.backends"),
                format!(
                    "upstream group '{}' lists {} backends; at most {MAX_GROUP_BACKENDS} (split it into groups by app)",
                    g.name,
                    backends.len() + backup.len()
                ),
            ));
        }
        if g.apps.is_empty() && out.iter().any(|o| o.apps.is_empty()) {
            return Err(invalid(
                &format!("{key}.apps"),
                format!(
                    "upstream group '{}' has no apps, so it would be a second default group; give it apps = [...] (or drop --upstream / upstream.url)",
                    g.name
                ),
            ));
        }
        let n = backends.len() + backup.len();
        out.push(GroupSettings {
            name: g.name.clone(),
            apps: g.apps.iter().map(|a| AppPattern(a.clone())).collect(),
            backends,
            backup,
            balance: g.balance.unwrap_or_default(),
            health: g.health_check.unwrap_or(default_health(n)),
        });
    }
    // Routing by app (or by stream name, for hash) needs the connect: it is the default
    // then, and bytes mode refused.
    let hashes = out.iter().any(|g| g.balance == Balance::Hash);
    let routes = hashes || out.iter().any(|g| !g.apps.is_empty());
    let mode = match (relay, routes) {
        (Some(RelayMode::Bytes), true) if hashes => {
            return Err(invalid(
                "upstream.relay",
                "relay = \"bytes\" cannot balance by hash (the stream name is inside the RTMP publish or play, which a byte copy never reads); use relay = \"connect\" or another balance".to_string(),
            ))
        }
        (Some(RelayMode::Bytes), true) => {
            return Err(invalid(
                "upstream.relay",
                "relay = \"bytes\" cannot route by app (the app is inside the RTMP connect, which a byte copy never reads); use relay = \"connect\" or drop the apps of [[upstreams]]".to_string(),
            ))
        }
        (Some(m), _) => m,
        (None, true) => RelayMode::Connect,
        (None, false) => RelayMode::Bytes,
    };
    Ok((out, mode))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let p = |s: &str| AppPattern(s.to_string());
        assert!(p("live").matches("live"));
        assert!(!p("live").matches("live2"));
        assert!(p("live*").matches("live2"));
        assert!(p("*cam*").matches("frontcam1"));
        assert!(!p("*cam").matches("frontcam1"));
        assert!(p("*").matches(""));
        assert!(!p("a*b*c").matches(&"ab".repeat(5000)));
    }

    fn fg(name: &str, apps: &[&str], backends: &[&str]) -> FileGroup {
        FileGroup {
            name: name.into(),
            apps: apps.iter().map(|s| s.to_string()).collect(),
            backends: backends.iter().map(|s| FileBackend::from(*s)).collect(),
            backup: Vec::new(),
            balance: None,
            health_check: None,
        }
    }

    #[test]
    fn groups_and_mode() {
        let u = parse_upstream("k", "rtmp://127.0.0.1:1936").unwrap();
        let (g, m) = groups(std::slice::from_ref(&u), &[], None).unwrap();
        assert_eq!(m, RelayMode::Bytes);
        assert_eq!(g[0].health, HealthKind::Off);
        let file = [fg("a", &["live"], &["rtmp://h1", "rtmp://h2"])];
        let (g, m) = groups(std::slice::from_ref(&u), &file, None).unwrap();
        assert_eq!(m, RelayMode::Connect);
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].health, HealthKind::Tcp);
        let e = groups(std::slice::from_ref(&u), &file, Some(RelayMode::Bytes)).unwrap_err();
        assert!(e.to_string().contains("relay = \\\"bytes\\\"") || e.to_string().contains("bytes"));
        let e = groups(&[u], &[fg("b", &[], &["rtmp://h"])], None).unwrap_err();
        assert!(e.to_string().contains("second default group"), "{e}");
        let e = groups(&[], &[fg("b", &[], &[])], None).unwrap_err();
        assert!(e.to_string().contains("no backend"), "{e}");
    }

    #[test]
    fn backend_tables_weights_and_proxy() {
        #[derive(Deserialize)]
        struct F {
            upstreams: Vec<FileGroup>,
        }
        let f: F = toml::from_str(
            r#"
            [[upstreams]]
            name = "h"
            balance = "hash"
            backends = ["rtmp://a:1935", { url = "rtmp://b:1935", weight = 3, proxy_protocol = "v2" }]
            backup = [{ url = "rtmp://c:1935", proxy_protocol = "off" }]
            "#,
        )
        .unwrap();
        let (g, m) = groups(&[], &f.upstreams, None).unwrap();
        assert_eq!(m, RelayMode::Connect, "hash needs the connect-aware relay");
        assert_eq!(g[0].balance, Balance::Hash);
        let w: Vec<u32> = g[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 3]);
        assert_eq!(
            g[0].backends[0].proxy(Some(ProxyVersion::V1)),
            Some(ProxyVersion::V1)
        );
        assert_eq!(g[0].backends[1].proxy(None), Some(ProxyVersion::V2));
        assert_eq!(g[0].backup[0].proxy(Some(ProxyVersion::V1)), None);
        let e = groups(&[], &f.upstreams, Some(RelayMode::Bytes)).unwrap_err();
        assert!(e.to_string().contains("hash"), "{e}");
        let bad: F = toml::from_str(
            r#"
            [[upstreams]]
            name = "h"
            backends = [{ url = "rtmp://b:1935", weight = 0 }]
            "#,
        )
        .unwrap();
        let e = groups(&[], &bad.upstreams, None).unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
        assert!(toml::from_str::<F>(
            r#"
            [[upstreams]]
            name = "h"
            backends = [{ url = "rtmp://b:1935", wieght = 2 }]
            "#
        )
        .is_err());
    }
}
