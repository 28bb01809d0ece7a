//! The command line: every flag, its help text, and the listeners used when none is given.
//! Every flag has a key in the TOML file ([`super::file`]); `merge` puts them together.

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::net::proxy_protocol::ProxyVersion;

/// Listeners used when neither `--listen` nor `listen` in the file says otherwise.
pub const DEFAULT_LISTEN: [&str; 3] = [
    "rtmp://0.0.0.0:1935",
    "rtmpt://0.0.0.0:8080",
    "rtmps://0.0.0.0:8443",
];

const AFTER_HELP: &str = "\
Every listener sniffs the first bytes of each connection, so one port serves several
transports: a plain listener (rtmp://, rtmpt://) takes raw RTMP, RTMPE and the RTMPT HTTP
tunnel; a TLS listener (rtmps://, rtmpts://) takes RTMPS and RTMPTS.

Examples:
  rtmpgate
  rtmpgate --upstream rtmp://127.0.0.1:1936
  rtmpgate --listen rtmp://0.0.0.0:1935 --listen rtmps://0.0.0.0:443 \\
           --tls-cert /etc/letsencrypt/live/example.com/fullchain.pem \\
           --tls-key /etc/letsencrypt/live/example.com/privkey.pem \\
           --upstream rtmp://127.0.0.1:1936
  rtmpgate --config /etc/rtmpgate.toml --check-config
  rtmpgate token --app live --stream cam1 --ttl 3600 --config /etc/rtmpgate.toml

With no arguments: the built-in engine on rtmp://0.0.0.0:1935, rtmpt://0.0.0.0:8080 and
rtmps://0.0.0.0:8443 (also RTMPTS) with the dev certificate for localhost from certs/.";

/// Command-line flags. Every one of them can also be set in the TOML file.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "rtmpgate",
    version,
    about = "A front door for RTMP: accepts RTMP, RTMPS, RTMPT, RTMPTS and RTMPE on any port \
             and serves each client with the built-in RTMP engine, or forwards it byte for byte \
             to a backend RTMP server (--upstream).",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// TOML configuration file. Flags given on the command line override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept clients on, repeatable: rtmp://HOST:PORT or rtmpt://HOST:PORT
    /// (plain TCP) and rtmps://HOST:PORT or rtmpts://HOST:PORT (TLS). Use [::] for IPv6,
    /// port 0 for any free port. Replaces the file's `listen` list.
    #[arg(long, value_name = "URL")]
    pub listen: Vec<String>,

    /// PEM certificate chain for TLS listeners (leaf first, e.g. Let's Encrypt's
    /// fullchain.pem). Repeat it, with --tls-key in the same order, to serve an ECDSA chain
    /// beside an RSA one (each client gets the one it can take, ECDSA first). Without it, TLS
    /// listeners use the dev certificate from certs/.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Vec<PathBuf>,

    /// PEM private key matching --tls-cert (e.g. Let's Encrypt's privkey.pem), one per
    /// --tls-cert, in the same order.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Vec<PathBuf>,

    /// Backend RTMP server clients are relayed to: rtmp://HOST:PORT over TCP or
    /// rtmps://HOST:PORT over TLS (verified against the system roots and --upstream-ca).
    /// Repeat it for several backends: one group, tried in the order given (failover).
    /// Without it (and without [[upstreams]]) the built-in RTMP engine serves the clients.
    #[arg(long, value_name = "URL")]
    pub upstream: Vec<String>,

    /// Extra PEM CA certificate(s) trusted when verifying an rtmps:// upstream (a private CA).
    #[arg(long, value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,

    /// Send a PROXY protocol header (v1 text or v2 binary) to the upstream so it sees the
    /// real client address (nginx-rtmp: `listen ... proxy_protocol`).
    #[arg(long, value_name = "VERSION")]
    pub upstream_proxy_protocol: Option<ProxyVersion>,

    /// Seconds to wait for the upstream's TCP (and TLS) connect before giving up [default: 5].
    #[arg(long, value_name = "SECS")]
    pub upstream_timeout_secs: Option<u64>,

    /// Edge mode (`[upstream] mode = "edge"`): the --upstream URLs are origins; players are
    /// served here, one pull per stream from its origin; publishers are forwarded to it.
    #[arg(long)]
    pub edge: bool,

    /// Expect a PROXY protocol header (v1 or v2) from a load balancer on every listener and
    /// use the client address it carries. Connections without one are refused.
    #[arg(long)]
    pub accept_proxy_protocol: bool,

    /// With --accept-proxy-protocol: the load balancers' addresses (CIDR, e.g. 10.0.0.0/8 or
    /// 192.0.2.7); a connection from anywhere else is refused. Repeat for several; replaces
    /// the file's `trusted_proxies`. Unset: any source is trusted (a warning says so).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<String>,

    /// Refuse RTMPE (encrypted RTMP) handshakes instead of serving them.
    #[arg(long)]
    pub no_rtmpe: bool,

    /// Seconds open sessions may run on after SIGINT/SIGTERM before they are closed
    /// [default: 10].
    #[arg(long, value_name = "SECS")]
    pub drain_secs: Option<u64>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as
    /// "rtmpgate=debug". Overrides RUST_LOG and the file's log_level [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log lines as plain text or as JSON objects, one a line (timestamp, level, target,
    /// fields) [default: text].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Load and validate the configuration (including certificates and keys), print a
    /// summary and exit: 0 if it is valid, 2 if not.
    #[arg(long)]
    pub check_config: bool,

    /// Admin listener (metrics, health, JSON API, status page): HOST:PORT or off
    /// [default: 127.0.0.1:9935]. Any address but loopback needs a token.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Bearer token for the admin listener's /metrics and /api/ (prefer the environment
    /// variable or the file: a flag shows in the process list).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "RTMPGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Access log: one JSON line per session close, appended to this file (reopened on
    /// SIGHUP, for logrotate).
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,

    /// This node's id in a cluster: the prefix of every tunnel session id it issues
    /// (1-16 letters, digits, '_').
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// Another node's cluster link, http://HOST:PORT or https://HOST:PORT (repeatable).
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,

    /// The cluster link's shared secret (prefer the environment variable or the file).
    #[arg(
        long,
        value_name = "SECRET",
        env = "RTMPGATE_CLUSTER_SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,

    /// Where this node's cluster link listens, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub cluster_listen: Option<String>,
}

/// How log lines are written (`--log-format`, `log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}
