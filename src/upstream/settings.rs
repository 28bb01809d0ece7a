//! The relay's settings: relay mode, backend groups (`[[upstreams]]`), balance policy and
//! health checks, as read from the file and the command line and validated.

use std::time::Duration;

use serde::Deserialize;

use crate::net::url::{parse_upstream, RtmpUrl};

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

/// One `[[upstreams]]` table as written.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileGroup {
    pub name: String,
    #[serde(default)]
    pub apps: Vec<String>,
    pub backends: Vec<String>,
    #[serde(default)]
    pub backup: Vec<String>,
    #[serde(default)]
    pub balance: Option<Balance>,
    #[serde(default)]
    pub health_check: Option<HealthKind>,
}

/// One validated group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSettings {
    pub name: String,
    /// Empty: the default group.
    pub apps: Vec<AppPattern>,
    pub backends: Vec<RtmpUrl>,
    pub backup: Vec<RtmpUrl>,
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
            backends: cli_urls.to_vec(),
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
        let parse = |what: &str, list: &[String]| -> Result<Vec<RtmpUrl>, SettingsError> {
            list.iter()
                .map(|u| {
                    parse_upstream(&format!("{key}.{what}"), u)
                        .map_err(|e| invalid(&format!("{key}.{what}"), e.to_string()))
                })
                .collect()
        };
        let backends = parse("backends", &g.backends)?;
        let backup = parse("backup", &g.backup)?;
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
    // Routing by app needs the connect: it is the default then, and bytes mode refused.
    let routes = out.iter().any(|g| !g.apps.is_empty());
    let mode = match (relay, routes) {
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
            backends: backends.iter().map(|s| s.to_string()).collect(),
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
}
