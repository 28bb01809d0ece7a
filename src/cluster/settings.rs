//! `[cluster]` as written in the file and on the command line, and the validated
//! [`ClusterSettings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::net::tls::CertSource;
use crate::net::url::{split_host_port, UrlError};

/// Longest node id. A session id is `NODE-` plus 32 hex digits and must stay under the
/// 64 bytes ffmpeg accepts (rtmphttp.c's client_id buffer).
pub const MAX_NODE_ID: usize = 16;

/// Shortest shared secret accepted: 16 characters (`openssl rand -hex 16` gives 32).
const MIN_SECRET: usize = 16;

/// How long a connection to a peer's cluster link may take by default. A node that is gone
/// usually refuses at once; this bounds the wait for one that vanished from the network.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1000;

/// `[cluster]` in the TOML file.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// This node's id: the prefix of every tunnel session id it issues.
    pub node_id: Option<String>,
    /// `HOST:PORT` for the internal link (other nodes forward tunnel requests here).
    pub listen: Option<String>,
    /// The other nodes' cluster links, `http://HOST:PORT` or `https://HOST:PORT` (this
    /// node's own may be listed too: the same list can go on every node).
    pub peers: Option<Vec<String>>,
    /// One DNS name, `NAME:PORT`, whose addresses are the nodes' cluster links.
    pub peers_dns: Option<String>,
    /// The shared secret that authenticates the link (HMAC-SHA256 of every request).
    pub secret: Option<String>,
    /// PEM certificate chain and key: serve the link over TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for `https://` peers (besides the system's).
    pub ca: Option<PathBuf>,
    /// How long connecting to a peer may take (default 1000).
    pub connect_timeout_ms: Option<u64>,
}

/// The cluster flags (`--node-id`, `--peer`, `--cluster-secret`, `--cluster-listen`).
#[derive(Debug, Default, Clone)]
pub struct ClusterFlags {
    pub node_id: Option<String>,
    pub peers: Vec<String>,
    pub secret: Option<String>,
    pub listen: Option<String>,
}

/// A peer's cluster link.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The validated `[cluster]` settings; present when a node id is set.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub node_id: String,
    /// Where the internal link listens; None: this node forwards but is not forwarded to.
    pub listen: Option<SocketAddr>,
    pub peers: Vec<PeerUrl>,
    /// `NAME:PORT`, resolved again at every directory refresh.
    pub peers_dns: Option<(String, u16)>,
    pub secret: Option<String>,
    /// Serve the link over TLS with this certificate.
    pub tls: Option<CertSource>,
    pub ca: Option<PathBuf>,
    pub connect_timeout: Duration,
}

/// A mistake in `[cluster]` or the cluster flags: the key at fault and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ClusterSettingsError {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: String) -> ClusterSettingsError {
    ClusterSettingsError {
        key: key.to_string(),
        message,
    }
}

/// True for a valid node id: 1 to 16 of `[A-Za-z0-9_]` (no `-`: it separates the node id
/// from the random part of a session id).
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_peer(text: &str) -> Result<PeerUrl, ClusterSettingsError> {
    let bad = || {
        invalid(
            "cluster.peers",
            format!(
                "'{text}' is not a peer's cluster link; write http://HOST:PORT or \
                 https://HOST:PORT (the other node's cluster.listen)"
            ),
        )
    };
    let (tls, rest) = if let Some(r) = text.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = text.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = host_and_port("cluster.peers", text, rest).map_err(|_| bad())?;
    Ok(PeerUrl { tls, host, port })
}

/// `HOST:PORT` or `[V6]:PORT` held by setting `key` (inside `text`), with a non-empty host
/// and a port other than 0: the net layer's one host:port splitter, plus "a port is required".
fn host_and_port(key: &str, text: &str, authority: &str) -> Result<(String, u16), UrlError> {
    let (host, port) = split_host_port(key, text, authority, "http://[::1]:7935")?;
    match port {
        Some(port) if port != 0 && !host.contains('/') => Ok((host.to_string(), port)),
        _ => Err(UrlError {
            key: key.to_string(),
            message: format!("'{text}' needs a port from 1 to 65535 after the host"),
        }),
    }
}

impl ClusterSettings {
    /// Flags win over the file. None when no node id is set anywhere (and nothing else is:
    /// cluster settings without a node id are an error).
    pub fn merge(
        flags: ClusterFlags,
        file: FileCluster,
        base: Option<&Path>,
    ) -> Result<Option<ClusterSettings>, ClusterSettingsError> {
        let node_id = flags.node_id.or(file.node_id);
        let peers_text: Vec<String> = if flags.peers.is_empty() {
            file.peers.unwrap_or_default()
        } else {
            flags.peers
        };
        let secret = flags.secret.or(file.secret);
        let listen_text = flags.listen.or(file.listen);
        let Some(node_id) = node_id else {
            if !peers_text.is_empty()
                || file.peers_dns.is_some()
                || listen_text.is_some()
                || secret.is_some()
            {
                return Err(invalid(
                    "cluster.node_id",
                    "cluster peers, listen or secret are set but no node id; set \
                     cluster.node_id (or --node-id) to a short name unique in the cluster, \
                     e.g. n1"
                        .into(),
                ));
            }
            return Ok(None);
        };
        if !valid_node_id(&node_id) {
            return Err(invalid(
                "cluster.node_id",
                format!(
                    "'{node_id}' is not a node id; use 1 to {MAX_NODE_ID} letters, digits or \
                     '_' (it prefixes every tunnel session id)"
                ),
            ));
        }
        let peers = peers_text
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<Vec<_>, _>>()?;
        let peers_dns = match file.peers_dns {
            Some(text) => Some(
                host_and_port("cluster.peers_dns", &text, &text).map_err(|_| {
                    invalid(
                        "cluster.peers_dns",
                        format!("'{text}' is not NAME:PORT (a DNS name and the nodes' link port)"),
                    )
                })?,
            ),
            None => None,
        };
        let listen = match listen_text {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "cluster.listen",
                    format!("'{text}' is not IP:PORT, e.g. 10.0.0.5:7935 or 127.0.0.1:0"),
                )
            })?),
            None => None,
        };
        let linked = listen.is_some() || !peers.is_empty() || peers_dns.is_some();
        match &secret {
            None if linked => {
                return Err(invalid(
                    "cluster.secret",
                    "the cluster link needs a shared secret (the same on every node); \
                     generate one with `openssl rand -hex 32` and set cluster.secret or \
                     RTMPGATE_CLUSTER_SECRET"
                        .into(),
                ))
            }
            Some(s)
                if s.len() < MIN_SECRET
                    || s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                return Err(invalid(
                    "cluster.secret",
                    format!(
                        "must be at least {MIN_SECRET} characters without spaces; generate one \
                         with `openssl rand -hex 32`"
                    ),
                ))
            }
            _ => {}
        }
        let tls = CertSource::pair(file.cert, file.key, base).map_err(|_| {
            invalid(
                "cluster.cert",
                "cluster.cert and cluster.key go together (PEM chain and its key)".into(),
            )
        })?;
        let connect_timeout = Duration::from_millis(
            file.connect_timeout_ms
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS)
                .clamp(10, 60_000),
        );
        Ok(Some(ClusterSettings {
            node_id,
            listen,
            peers,
            peers_dns,
            secret,
            tls,
            ca: file.ca.map(|p| crate::net::tls::relative_to(base, p)),
            connect_timeout,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn flags(node: &str) -> ClusterFlags {
        ClusterFlags {
            node_id: Some(node.into()),
            ..ClusterFlags::default()
        }
    }

    #[test]
    fn no_node_id_no_cluster() {
        assert!(
            ClusterSettings::merge(ClusterFlags::default(), FileCluster::default(), None)
                .unwrap()
                .is_none()
        );
        let file = FileCluster {
            peers: Some(vec!["http://127.0.0.1:7935".into()]),
            ..FileCluster::default()
        };
        assert!(ClusterSettings::merge(ClusterFlags::default(), file, None).is_err());
    }

    #[test]
    fn node_ids_are_short_and_plain() {
        assert!(valid_node_id("n1"));
        assert!(valid_node_id("edge_07"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a-b"));
        assert!(!valid_node_id("a/b"));
        assert!(!valid_node_id(&"x".repeat(17)));
        assert!(ClusterSettings::merge(flags("a-b"), FileCluster::default(), None).is_err());
    }

    #[test]
    fn peers_parse_and_need_a_secret() {
        let mut f = flags("n1");
        f.peers = vec!["http://127.0.0.1:7001".into(), "https://[::1]:7002/".into()];
        assert!(ClusterSettings::merge(f.clone(), FileCluster::default(), None).is_err());
        f.secret = Some("short".into());
        assert!(ClusterSettings::merge(f.clone(), FileCluster::default(), None).is_err());
        f.secret = Some("0123456789abcdef0123".into());
        let s = ClusterSettings::merge(f, FileCluster::default(), None)
            .unwrap()
            .unwrap();
        assert_eq!(s.peers[0].to_string(), "http://127.0.0.1:7001");
        assert_eq!(s.peers[1].to_string(), "https://[::1]:7002");
        assert!(s.peers[1].tls);
        for bad in [
            "127.0.0.1:7001",
            "http://127.0.0.1",
            "http://:7",
            "rtmp://a:1",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
        let file = FileCluster {
            peers_dns: Some("rtmpgate.internal:7935".into()),
            secret: Some("0123456789abcdef0123".into()),
            ..FileCluster::default()
        };
        let s = ClusterSettings::merge(flags("n2"), file, None)
            .unwrap()
            .unwrap();
        assert_eq!(s.peers_dns, Some(("rtmpgate.internal".into(), 7935)));
    }
}
