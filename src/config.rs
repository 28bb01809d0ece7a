//! Configuration: TOML file plus command-line flags, merged into one validated `Config`.
//!
//! Every flag has a key in the file; a flag given on the command line wins over the file.
//! Relative paths in the file are taken relative to the file's directory. Errors name the
//! flag or key at fault and say how to fix it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::door::proxy_protocol::ProxyVersion;
use crate::door::tls::CertSource;
use crate::engine::EngineConfig;
use crate::limits::{Limits, MAX_DURATION_SECS};

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
    /// fullchain.pem). Without it, TLS listeners use the dev certificate from certs/.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert (e.g. Let's Encrypt's privkey.pem).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Backend RTMP server each client is forwarded to, byte for byte:
    /// rtmp://HOST:PORT over TCP or rtmps://HOST:PORT over TLS (verified against the system
    /// roots and --upstream-ca). Without it the built-in RTMP engine serves the clients.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,

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
}

/// The TOML file, as written. Unknown keys are errors, so typos do not go unnoticed.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub drain_secs: Option<u64>,
    pub rtmpe: Option<bool>,
    pub accept_proxy_protocol: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    pub tls: FileTls,
    #[serde(default)]
    pub upstream: FileUpstream,
    pub limits: Option<Limits>,
    #[serde(default)]
    pub engine: FileEngine,
    #[serde(default)]
    pub admin: crate::admin::FileAdmin,
    #[serde(default)]
    pub log: FileLog,
}

/// `[log]`: the access log.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub access: Option<PathBuf>,
}

/// `[engine]`: how the built-in engine serves clients (ignored with an upstream). Each key
/// maps onto a field of [`EngineConfig`]; absent keys keep the engine's defaults.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    pub player_wait_secs: Option<u64>,
    pub queue_messages: Option<usize>,
    pub max_lag_bytes: Option<u64>,
    pub gop_cache: Option<bool>,
    pub gop_max_bytes: Option<usize>,
    pub gop_max_messages: Option<usize>,
    pub chunk_size: Option<u32>,
    pub window_ack_size: Option<u32>,
    pub peer_bandwidth: Option<u32>,
    pub write_timeout_secs: Option<u64>,
    pub max_streams_per_connection: Option<u32>,
}

impl FileEngine {
    fn is_set(&self) -> bool {
        self.player_wait_secs.is_some()
            || self.queue_messages.is_some()
            || self.max_lag_bytes.is_some()
            || self.gop_cache.is_some()
            || self.gop_max_bytes.is_some()
            || self.gop_max_messages.is_some()
            || self.chunk_size.is_some()
            || self.window_ack_size.is_some()
            || self.peer_bandwidth.is_some()
            || self.write_timeout_secs.is_some()
            || self.max_streams_per_connection.is_some()
    }

    /// The engine's configuration with these keys applied, checked.
    fn apply(&self, mut cfg: EngineConfig) -> Result<EngineConfig, ConfigError> {
        fn at_least<T: PartialOrd + fmt::Display + Copy>(
            key: &str,
            v: Option<T>,
            min: T,
        ) -> Result<Option<T>, ConfigError> {
            match v {
                Some(v) if v < min => Err(invalid(
                    format!("engine.{key}"),
                    format!("{v} is too small; use at least {min}"),
                )),
                v => Ok(v),
            }
        }
        if let Some(v) = at_least("player_wait_secs", self.player_wait_secs, 0)? {
            cfg.player_wait = Duration::from_secs(v);
        }
        if let Some(v) = at_least("queue_messages", self.queue_messages, 16)? {
            cfg.queue_messages = v;
        }
        if let Some(v) = at_least("max_lag_bytes", self.max_lag_bytes, 65_536)? {
            cfg.max_lag_bytes = v;
        }
        if let Some(v) = self.gop_cache {
            cfg.gop_cache = v;
        }
        if let Some(v) = self.gop_max_bytes {
            cfg.gop_max_bytes = v;
        }
        if let Some(v) = self.gop_max_messages {
            cfg.gop_max_messages = v;
        }
        if let Some(v) = at_least("chunk_size", self.chunk_size, 128)? {
            if v > 0x00ff_ffff {
                return Err(invalid(
                    "engine.chunk_size",
                    format!("{v} is larger than clients accept; use at most 16777215 (4096 to 65536 is usual)"),
                ));
            }
            cfg.chunk_size = v;
        }
        if let Some(v) = at_least("window_ack_size", self.window_ack_size, 4096)? {
            cfg.window_ack_size = v;
        }
        if let Some(v) = at_least("peer_bandwidth", self.peer_bandwidth, 4096)? {
            cfg.peer_bandwidth = v;
        }
        if let Some(v) = at_least("write_timeout_secs", self.write_timeout_secs, 1)? {
            cfg.write_timeout = Duration::from_secs(v);
        }
        if let Some(v) = at_least(
            "max_streams_per_connection",
            self.max_streams_per_connection,
            1,
        )? {
            cfg.max_streams_per_connection = v;
        }
        Ok(cfg)
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub certificates: Vec<FileSniCert>,
}

/// One `[[tls.certificates]]` entry: a chain served to clients asking for these names.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileSniCert {
    pub server_names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub url: Option<String>,
    pub ca: Option<PathBuf>,
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout_secs: Option<u64>,
}

/// The transports a listener URL may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenScheme {
    Rtmp,
    Rtmpt,
    Rtmps,
    Rtmpts,
}

impl ListenScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenScheme::Rtmp => "rtmp",
            ListenScheme::Rtmpt => "rtmpt",
            ListenScheme::Rtmps => "rtmps",
            ListenScheme::Rtmpts => "rtmpts",
        }
    }

    /// TLS listeners run the TLS handshake before sniffing.
    pub fn is_tls(self) -> bool {
        matches!(self, ListenScheme::Rtmps | ListenScheme::Rtmpts)
    }

    fn default_port(self) -> u16 {
        match self {
            ListenScheme::Rtmp => 1935,
            ListenScheme::Rtmpt => 80,
            ListenScheme::Rtmps | ListenScheme::Rtmpts => 443,
        }
    }
}

/// A parsed `--listen` URL: scheme, host (IP literal or name) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenUrl {
    pub scheme: ListenScheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for ListenUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.scheme.as_str(),
                self.host,
                self.port
            )
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

/// Upstream URL schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamScheme {
    Rtmp,
    Rtmps,
}

/// A parsed `--upstream` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            UpstreamScheme::Rtmp => "rtmp",
            UpstreamScheme::Rtmps => "rtmps",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A configuration mistake, naming the flag or key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// An SNI certificate, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniCert {
    pub server_names: Vec<String>,
    pub source: CertSource,
}

/// TLS settings for the TLS listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate served when no SNI entry matches.
    pub default: CertSource,
    pub sni: Vec<SniCert>,
}

/// Upstream settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub url: UpstreamUrl,
    pub ca: Option<PathBuf>,
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout: Duration,
}

/// The validated, merged configuration the program runs with.
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

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<ListenUrl>,
    /// Present whenever some listener uses TLS.
    pub tls: Option<TlsSettings>,
    pub upstream: Option<UpstreamSettings>,
    /// A tracing filter directive, or None to use RUST_LOG (then "info").
    pub log_level: Option<String>,
    pub log_format: LogFormat,
    pub drain: Duration,
    pub rtmpe: bool,
    pub accept_proxy_protocol: bool,
    /// Where PROXY headers may come from; empty: anywhere.
    pub trusted_proxies: Vec<Cidr>,
    pub limits: Limits,
    /// The built-in engine's settings (used when there is no upstream).
    pub engine: EngineConfig,
    /// Settings that are valid but probably not what was meant (logged at start).
    pub warnings: Vec<String>,
    /// The admin listener (metrics, health, API, status page).
    pub admin: crate::admin::AdminSettings,
    /// The access log file, if any.
    pub access_log: Option<PathBuf>,
}

/// Splits `scheme://host[:port][/]` into its parts; the host may be `[v6]`.
fn split_url<'a>(key: &str, url: &'a str) -> Result<(&'a str, &'a str, Option<u16>), ConfigError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        invalid(
            key,
            format!(
                "'{url}' is not a URL; write it as scheme://host:port, e.g. rtmp://0.0.0.0:1935"
            ),
        )
    })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(invalid(
            key,
            format!("'{url}' has a path, query or user part; give only scheme://host:port (the client's app and stream names pass through unchanged)"),
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| {
            invalid(
                key,
                format!("'{url}': IPv6 address is missing its closing ']'"),
            )
        })?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| invalid(key, format!("'{url}': expected ':PORT' after ']'")))?,
            ),
        };
        (host, port)
    } else if rest.matches(':').count() > 1 {
        return Err(invalid(
            key,
            format!("'{url}': put an IPv6 address in brackets, e.g. rtmp://[::]:1935"),
        ));
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(
            key,
            format!("'{url}' has no host; use 0.0.0.0 (all IPv4), [::] (all) or a name"),
        ));
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| {
            invalid(
                key,
                format!("'{url}': port '{p}' is not a number from 0 to 65535"),
            )
        })?),
    };
    Ok((scheme, host, port))
}

/// Parses one listener URL.
pub fn parse_listen(key: &str, url: &str) -> Result<ListenUrl, ConfigError> {
    let (scheme, host, port) = split_url(key, url)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "rtmp" => ListenScheme::Rtmp,
        "rtmpt" => ListenScheme::Rtmpt,
        "rtmps" => ListenScheme::Rtmps,
        "rtmpts" => ListenScheme::Rtmpts,
        "rtmpe" | "rtmpte" => {
            return Err(invalid(
                key,
                format!("'{url}': RTMPE is recognised on every rtmp:// and rtmpt:// listener; listen with rtmp:// instead"),
            ))
        }
        other => {
            return Err(invalid(
                key,
                format!("'{url}': unknown scheme '{other}'; use rtmp, rtmpt, rtmps or rtmpts"),
            ))
        }
    };
    Ok(ListenUrl {
        scheme,
        host: host.to_string(),
        port: port.unwrap_or(scheme.default_port()),
    })
}

/// Parses the upstream URL.
pub fn parse_upstream(key: &str, url: &str) -> Result<UpstreamUrl, ConfigError> {
    let (scheme, host, port) = split_url(key, url)?;
    let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "rtmp" => (UpstreamScheme::Rtmp, 1935),
        "rtmps" => (UpstreamScheme::Rtmps, 443),
        other => {
            return Err(invalid(
                key,
                format!("'{url}': the upstream scheme must be rtmp or rtmps, not '{other}'"),
            ))
        }
    };
    let port = port.unwrap_or(default_port);
    if port == 0 {
        return Err(invalid(
            key,
            format!("'{url}': port 0 cannot be connected to"),
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        host: host.to_string(),
        port,
    })
}

/// Resolves a path from the file against the file's directory.
fn relative_to(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

/// Where the dev certificate is on disk, if it is: certs/ under the current directory, or
/// near the executable (target/debug/.. -> the source tree). None means use the built-in one.
pub fn find_dev_cert() -> Option<CertSource> {
    let mut dirs = vec![PathBuf::from("certs")];
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..4 {
            let Some(d) = dir else { break };
            dirs.push(d.join("certs"));
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    dirs.into_iter().find_map(|d| {
        let cert = d.join("localhost.pem");
        let key = d.join("localhost.key");
        (cert.is_file() && key.is_file()).then_some(CertSource::Files { cert, key })
    })
}

impl Config {
    /// Reads the file named by `--config` (if any) and merges the flags over it.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (file, base) = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                (
                    parse_file(&text, path)?,
                    path.parent().map(Path::to_path_buf),
                )
            }
            None => (FileConfig::default(), None),
        };
        Config::merge(cli, file, base.as_deref(), find_dev_cert)
    }

    /// Merges flags over the file. `dev_cert` locates the dev certificate (a parameter so
    /// tests do not depend on the working directory).
    pub fn merge(
        cli: &Cli,
        file: FileConfig,
        base: Option<&Path>,
        dev_cert: impl FnOnce() -> Option<CertSource>,
    ) -> Result<Config, ConfigError> {
        let rel = |p: PathBuf| relative_to(base, p);

        // listen: flags replace the file's list; neither means the defaults.
        let listen: Vec<ListenUrl> = if !cli.listen.is_empty() {
            cli.listen
                .iter()
                .map(|u| parse_listen("--listen", u))
                .collect::<Result<_, _>>()?
        } else if let Some(list) = &file.listen {
            if list.is_empty() {
                return Err(invalid(
                    "listen",
                    "the list is empty; add at least one URL such as \"rtmp://0.0.0.0:1935\" or remove the key for the defaults",
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, u)| parse_listen(&format!("listen[{i}]"), u))
                .collect::<Result<_, _>>()?
        } else {
            DEFAULT_LISTEN
                .iter()
                .map(|u| parse_listen("default listener", u))
                .collect::<Result<_, _>>()?
        };
        for (i, a) in listen.iter().enumerate() {
            if a.port != 0
                && listen[..i]
                    .iter()
                    .any(|b| b.host == a.host && b.port == a.port)
            {
                return Err(invalid(
                    "listen",
                    format!("{a} is listed twice (same host and port); one listener already serves every transport of its kind (plain or TLS)"),
                ));
            }
        }

        // TLS.
        let default_cert = match (cli.tls_cert.clone(), cli.tls_key.clone()) {
            (Some(cert), Some(key)) => Some(CertSource::Files { cert, key }),
            (Some(_), None) => {
                return Err(invalid("--tls-cert", "given without --tls-key; pass both"))
            }
            (None, Some(_)) => {
                return Err(invalid("--tls-key", "given without --tls-cert; pass both"))
            }
            (None, None) => match (file.tls.cert, file.tls.key) {
                (Some(cert), Some(key)) => Some(CertSource::Files {
                    cert: rel(cert),
                    key: rel(key),
                }),
                (Some(_), None) => {
                    return Err(invalid(
                        "tls.key",
                        "tls.cert is set but tls.key is not; set both",
                    ))
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "tls.cert",
                        "tls.key is set but tls.cert is not; set both",
                    ))
                }
                (None, None) => None,
            },
        };
        let mut sni = Vec::with_capacity(file.tls.certificates.len());
        for (i, c) in file.tls.certificates.into_iter().enumerate() {
            if c.server_names.is_empty() || c.server_names.iter().any(|n| n.trim().is_empty()) {
                return Err(invalid(
                    format!("tls.certificates[{i}].server_names"),
                    "must list at least one non-empty name, e.g. [\"live.example.com\"]",
                ));
            }
            sni.push(SniCert {
                server_names: c.server_names,
                source: CertSource::Files {
                    cert: rel(c.cert),
                    key: rel(c.key),
                },
            });
        }
        let tls = if listen.iter().any(|l| l.scheme.is_tls()) {
            let default = match default_cert {
                Some(d) => d,
                // No default given: the first SNI entry serves unknown names.
                None => match sni.first() {
                    Some(first) => first.source.clone(),
                    None => dev_cert().unwrap_or(CertSource::EmbeddedDev),
                },
            };
            Some(TlsSettings { default, sni })
        } else {
            None
        };

        // Upstream.
        let upstream_url = match (&cli.upstream, &file.upstream.url) {
            (Some(u), _) => Some(parse_upstream("--upstream", u)?),
            (None, Some(u)) => Some(parse_upstream("upstream.url", u)?),
            (None, None) => None,
        };
        let ca = cli
            .upstream_ca
            .clone()
            .or_else(|| file.upstream.ca.map(&rel));
        let proxy_protocol = cli.upstream_proxy_protocol.or(file.upstream.proxy_protocol);
        let connect_secs = cli
            .upstream_timeout_secs
            .or(file.upstream.connect_timeout_secs)
            .unwrap_or(5);
        check_duration("--upstream-timeout-secs", connect_secs)?;
        if let Some(d) = cli.drain_secs {
            check_duration("--drain-secs", d)?;
        }
        if connect_secs == 0 {
            return Err(invalid(
                "upstream.connect_timeout_secs",
                "must be at least 1 second",
            ));
        }
        let upstream = match upstream_url {
            Some(url) => Some(UpstreamSettings {
                url,
                ca,
                proxy_protocol,
                connect_timeout: Duration::from_secs(connect_secs),
            }),
            None => {
                if ca.is_some() || proxy_protocol.is_some() {
                    return Err(invalid(
                        "--upstream",
                        "--upstream-ca / --upstream-proxy-protocol (upstream.ca / upstream.proxy_protocol) are set but no upstream URL is; add --upstream rtmp://HOST:PORT",
                    ));
                }
                None
            }
        };

        let admin = crate::admin::AdminSettings::merge(
            cli.admin.as_deref(),
            cli.admin_token.clone(),
            file.admin,
            base,
        )?;
        let mut warnings = Vec::new();
        if upstream.is_some() && file.engine.is_set() {
            warnings.push("the [engine] table is ignored: clients go to the upstream".to_string());
        }
        let engine = file.engine.apply(EngineConfig::default())?;
        let limits = file.limits.unwrap_or_default();
        if limits.first_bytes_timeout_secs == 0 {
            return Err(invalid(
                "limits.first_bytes_timeout_secs",
                "must be at least 1 second",
            ));
        }
        if limits.ipv6_prefix_len > 128 {
            return Err(invalid(
                "limits.ipv6_prefix_len",
                "an IPv6 prefix is 0 to 128 bits long (64: one subscriber's network)",
            ));
        }
        if limits.max_connections == 0 || limits.max_connections_per_ip == 0 {
            return Err(invalid(
                "limits.max_connections",
                "max_connections and max_connections_per_ip must be at least 1",
            ));
        }

        let accept_proxy_protocol =
            cli.accept_proxy_protocol || file.accept_proxy_protocol.unwrap_or(false);
        let trusted_proxies: Vec<Cidr> = if !cli.trusted_proxies.is_empty() {
            cli.trusted_proxies
                .iter()
                .map(|c| Cidr::parse("--trusted-proxy", c))
                .collect::<Result<_, _>>()?
        } else {
            file.trusted_proxies
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, c)| Cidr::parse(&format!("trusted_proxies[{i}]"), c))
                .collect::<Result<_, _>>()?
        };
        if accept_proxy_protocol && trusted_proxies.is_empty() {
            warnings.push(
                "accept_proxy_protocol trusts a PROXY header from any address: anyone who can \
                 reach a listener can claim any client address; list the load balancers in \
                 trusted_proxies (--trusted-proxy CIDR)"
                    .to_string(),
            );
        }
        if !accept_proxy_protocol && !trusted_proxies.is_empty() {
            warnings.push(
                "trusted_proxies is set but accept_proxy_protocol is off: the list is unused"
                    .to_string(),
            );
        }

        Ok(Config {
            listen,
            tls,
            upstream,
            log_level: cli.log_level.clone().or(file.log_level),
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            drain: Duration::from_secs(cli.drain_secs.or(file.drain_secs).unwrap_or(10)),
            rtmpe: !cli.no_rtmpe && file.rtmpe.unwrap_or(true),
            accept_proxy_protocol,
            trusted_proxies,
            limits,
            engine,
            warnings,
            admin,
            access_log: cli.access_log.clone().or(file.log.access.map(&rel)),
        })
    }

    /// The socket address to bind for a literal IP host, if the host is one.
    pub fn literal_addr(url: &ListenUrl) -> Option<SocketAddr> {
        url.host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, url.port))
    }
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or `ADDR`; `key` names the setting in the error.
    pub fn parse(key: &str, text: &str) -> Result<Cidr, ConfigError> {
        let bad = |why: &str| {
            invalid(
                key,
                format!("{text:?} {why}; write an address range such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7"),
            )
        };
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad("is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(&format!("has a prefix length that is not 0 to {max}")))?,
            None => max,
        };
        Ok(Cidr {
            net: mask(net, prefix),
            prefix,
        })
    }

    /// True when `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.net.is_ipv4() && mask(ip, self.prefix) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

/// Parses the TOML text of a config file.
pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    let parse_error = |e: toml::de::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    };
    let file: FileConfig = toml::from_str(text).map_err(parse_error)?;
    let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
    check_durations("", &table)?;
    Ok(file)
}

/// Every `*_secs` and `*_ms` key, at any depth, is at most [`MAX_DURATION_SECS`]: a
/// deadline computed as now + a huge duration would overflow the clock and panic.
fn check_durations(prefix: &str, table: &toml::Table) -> Result<(), ConfigError> {
    for (key, value) in table {
        let name = format!("{prefix}{key}");
        match value {
            toml::Value::Table(t) => check_durations(&format!("{name}."), t)?,
            toml::Value::Array(items) => {
                for t in items.iter().filter_map(toml::Value::as_table) {
                    check_durations(&format!("{name}."), t)?;
                }
            }
            toml::Value::Integer(n) => {
                let secs = if key.ends_with("_secs") {
                    *n
                } else if key.ends_with("_ms") {
                    n / 1000
                } else {
                    continue;
                };
                check_duration(&name, u64::try_from(secs).unwrap_or(0))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A duration setting of `secs` seconds is at most [`MAX_DURATION_SECS`].
fn check_duration(key: &str, secs: u64) -> Result<(), ConfigError> {
    if secs > MAX_DURATION_SECS {
        return Err(invalid(
            key,
            format!(
                "{secs} seconds is too long: durations are at most {MAX_DURATION_SECS} \
                 (one year); use a smaller value (0 where the key allows it turns it off)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["rtmpgate"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap()
    }

    fn merge(args: &[&str], toml_text: &str) -> Result<Config, ConfigError> {
        let file = parse_file(toml_text, Path::new("test.toml"))?;
        Config::merge(&cli(args), file, Some(Path::new("/etc/rtmpgate")), || None)
    }

    #[test]
    fn defaults() {
        let c = merge(&[], "").unwrap();
        let urls: Vec<String> = c.listen.iter().map(ToString::to_string).collect();
        assert_eq!(urls, DEFAULT_LISTEN);
        assert_eq!(c.tls.unwrap().default, CertSource::EmbeddedDev);
        assert!(c.upstream.is_none());
        assert!(c.rtmpe);
        assert_eq!(c.drain, Duration::from_secs(10));
    }

    #[test]
    fn listen_urls() {
        let l = parse_listen("k", "rtmps://[::1]:0").unwrap();
        assert_eq!(l.scheme, ListenScheme::Rtmps);
        assert_eq!(l.host, "::1");
        assert_eq!(l.to_string(), "rtmps://[::1]:0");
        assert_eq!(parse_listen("k", "rtmpt://0.0.0.0").unwrap().port, 80);
        assert_eq!(parse_listen("k", "RTMP://localhost/").unwrap().port, 1935);
        for bad in [
            "0.0.0.0:1935",
            "http://0.0.0.0:80",
            "rtmp://::1:1935",
            "rtmp://:1935",
            "rtmp://0.0.0.0:99999",
            "rtmp://0.0.0.0:1935/live",
            "rtmpe://0.0.0.0:1935",
        ] {
            let err = parse_listen("--listen", bad).unwrap_err().to_string();
            assert!(err.starts_with("--listen: "), "{err}");
        }
    }

    #[test]
    fn log_format_from_file_and_flag() {
        let c = merge(&[], "log_format = \"json\"").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let c = merge(&["--log-format", "text"], "log_format = \"json\"").unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(merge(&[], "").unwrap().log_format, LogFormat::Text);
        assert!(merge(&[], "log_format = \"xml\"").is_err());
    }

    #[test]
    fn upstream_urls() {
        let u = parse_upstream("k", "rtmps://backend.example.com").unwrap();
        assert_eq!(u.scheme, UpstreamScheme::Rtmps);
        assert_eq!(u.port, 443);
        assert!(parse_upstream("k", "rtmpt://x:80").is_err());
        assert!(parse_upstream("k", "rtmp://x:0").is_err());
    }

    #[test]
    fn flags_win_over_file() {
        let toml_text = r#"
            listen = ["rtmp://127.0.0.1:1935"]
            log_level = "debug"
            drain_secs = 30
            rtmpe = true
            [upstream]
            url = "rtmp://10.0.0.1:1935"
            proxy_protocol = "v1"
            [limits]
            max_connections = 5
        "#;
        let c = merge(
            &[
                "--listen",
                "rtmps://127.0.0.1:0",
                "--upstream",
                "rtmps://10.0.0.2",
                "--upstream-proxy-protocol",
                "v2",
                "--drain-secs",
                "3",
                "--no-rtmpe",
            ],
            toml_text,
        )
        .unwrap();
        assert_eq!(c.listen.len(), 1);
        assert_eq!(c.listen[0].scheme, ListenScheme::Rtmps);
        let up = c.upstream.unwrap();
        assert_eq!(up.url.host, "10.0.0.2");
        assert_eq!(up.proxy_protocol, Some(ProxyVersion::V2));
        assert_eq!(c.drain, Duration::from_secs(3));
        assert!(!c.rtmpe);
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(
            c.limits.max_connections_per_ip,
            Limits::default().max_connections_per_ip
        );
    }

    #[test]
    fn file_only_and_relative_paths() {
        let toml_text = r#"
            listen = ["rtmps://0.0.0.0:443", "rtmp://0.0.0.0:1935"]
            [tls]
            cert = "fullchain.pem"
            key = "/abs/privkey.pem"
            [[tls.certificates]]
            server_names = ["live.example.com", "*.cdn.example.com"]
            cert = "live/fullchain.pem"
            key = "live/privkey.pem"
            [upstream]
            url = "rtmp://127.0.0.1:1936"
            ca = "ca.pem"
        "#;
        let c = merge(&[], toml_text).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            tls.default,
            CertSource::Files {
                cert: "/etc/rtmpgate/fullchain.pem".into(),
                key: "/abs/privkey.pem".into()
            }
        );
        assert_eq!(tls.sni.len(), 1);
        assert_eq!(tls.sni[0].server_names.len(), 2);
        assert_eq!(
            c.upstream.unwrap().ca,
            Some(PathBuf::from("/etc/rtmpgate/ca.pem"))
        );
    }

    #[test]
    fn flag_cert_wins() {
        let c = merge(
            &[
                "--listen",
                "rtmps://0.0.0.0:0",
                "--tls-cert",
                "a.pem",
                "--tls-key",
                "b.pem",
            ],
            "[tls]\ncert = \"x.pem\"\nkey = \"y.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.tls.unwrap().default,
            CertSource::Files {
                cert: "a.pem".into(),
                key: "b.pem".into()
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = merge(&[], "listen = []").unwrap_err().to_string();
        assert!(e.starts_with("listen: "), "{e}");
        let e = merge(&[], "[tls]\ncert = \"a.pem\"")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls.key: "), "{e}");
        let e = merge(&[], "listen = [\"rtmp://0.0.0.0:1935\", \"tcp://x\"]")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("listen[1]: "), "{e}");
        let e = merge(&[], "lisen = []").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = merge(&[], "[limits]\nmax_conections = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_conections"), "{e}");
        let e = merge(&[], "[upstream]\nproxy_protocol = \"v3\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("v3") || e.contains("variant"), "{e}");
        let e = merge(&["--upstream-ca", "ca.pem"], "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--upstream: "), "{e}");
        let e = merge(
            &[
                "--listen",
                "rtmp://0.0.0.0:1935",
                "--listen",
                "rtmps://0.0.0.0:1935",
            ],
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = merge(
            &[],
            "[[tls.certificates]]\nserver_names = []\ncert = \"a\"\nkey = \"b\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tls.certificates[0].server_names"), "{e}");
    }

    #[test]
    fn engine_table() {
        let c = merge(
            &[],
            "[engine]\nplayer_wait_secs = 5\ngop_cache = false\nchunk_size = 60000\n",
        )
        .unwrap();
        assert_eq!(c.engine.player_wait, Duration::from_secs(5));
        assert!(!c.engine.gop_cache);
        assert_eq!(c.engine.chunk_size, 60000);
        assert_eq!(
            c.engine.queue_messages,
            EngineConfig::default().queue_messages
        );
        let e = merge(&[], "[engine]\nchunk_size = 64\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("engine.chunk_size: "), "{e}");
        let e = merge(&[], "[engine]\ngop = 1\n").unwrap_err().to_string();
        assert!(e.contains("gop"), "{e}");
    }

    #[test]
    fn tls_only_when_needed() {
        let c = merge(&["--listen", "rtmp://127.0.0.1:0"], "").unwrap();
        assert!(c.tls.is_none());
    }

    #[test]
    fn huge_durations_are_refused_naming_the_key() {
        for (toml_text, key) in [
            (
                "[limits]\nidle_timeout_secs = 9223372036854775807\n",
                "limits.idle_timeout_secs",
            ),
            (
                "[limits]\ntunnel_order_wait_ms = 9223372036854775807\n",
                "limits.tunnel_order_wait_ms",
            ),
            ("drain_secs = 100000000000\n", "drain_secs"),
            (
                "[engine]\nplayer_wait_secs = 18446744073\n",
                "engine.player_wait_secs",
            ),
            (
                "[upstream]\nconnect_timeout_secs = 40000000\n",
                "upstream.connect_timeout_secs",
            ),
        ] {
            let e = merge(&[], toml_text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
            assert!(e.contains("at most 31536000"), "{e}");
        }
        let e = merge(&["--drain-secs", "99999999999"], "").unwrap_err();
        assert!(e.to_string().starts_with("--drain-secs: "), "{e}");
        // One year is still accepted.
        assert!(merge(&[], "[limits]\nidle_timeout_secs = 31536000\n").is_ok());
        let e = merge(&[], "[limits]\nipv6_prefix_len = 129\n").unwrap_err();
        assert!(e.to_string().starts_with("limits.ipv6_prefix_len: "), "{e}");
    }

    #[test]
    fn trusted_proxies_are_cidr_ranges() {
        let c = merge(
            &["--accept-proxy-protocol"],
            "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\n",
        )
        .unwrap();
        let t = &c.trusted_proxies;
        let has = |ip: &str| t.iter().any(|c| c.contains(ip.parse().unwrap()));
        assert!(has("10.200.3.4") && has("::ffff:10.0.0.1") && has("192.0.2.7"));
        assert!(has("2001:db8:ffff::1"));
        assert!(!has("11.0.0.1") && !has("192.0.2.8") && !has("2001:db9::1"));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // Flags replace the file's list.
        let c = merge(
            &["--accept-proxy-protocol", "--trusted-proxy", "127.0.0.1"],
            "trusted_proxies = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 1);
        assert_eq!(c.trusted_proxies[0].to_string(), "127.0.0.1/32");
        // No list: trusted from anywhere, with a warning.
        let c = merge(&["--accept-proxy-protocol"], "").unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("trusted_proxies")));
        for bad in ["10.0.0.0/33", "banana", "::/129", "10.0.0.0/x"] {
            let e = merge(&[], &format!("trusted_proxies = [\"{bad}\"]\n")).unwrap_err();
            assert!(e.to_string().starts_with("trusted_proxies[0]: "), "{e}");
        }
        let e = merge(&["--trusted-proxy", "10.1.2.3/40"], "").unwrap_err();
        assert!(e.to_string().starts_with("--trusted-proxy: "), "{e}");
    }

    #[test]
    fn clap_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["rtmpgate", "--tls-cert", "a.pem"]).is_err());
        assert!(Cli::try_parse_from(["rtmpgate", "--upstream-proxy-protocol", "v3"]).is_err());
    }
}
