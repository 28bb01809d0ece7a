//! Configuration: TOML file plus command-line flags, merged into one validated `Config`.
//!
//! Every flag has a key in the file; a flag given on the command line wins over the file.
//! Relative paths in the file are taken relative to the file's directory. Errors name the
//! flag or key at fault and say how to fix it.
//!
//! | file | role |
//! | --- | --- |
//! | [`cli`] | the flags (clap) and the default listeners |
//! | [`file`] | the TOML tables as written, unknown keys refused, durations bounded |
//! | `merge` | flags over the file, part by part (listeners, TLS, upstream, limits, PROXY), validated |
//!
//! The settings types live with the modules they configure ([`crate::admin::AdminSettings`],
//! [`crate::upstream::UpstreamSettings`], [`crate::engine::EngineConfig`], [`Limits`]); URLs
//! and address ranges are parsed by [`crate::net`]. This module only parses and merges.

pub mod cli;
pub mod file;
mod merge;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cli::{Cli, LogFormat, DEFAULT_LISTEN};
pub use file::{parse_file, FileConfig};
pub use merge::find_dev_cert;

use crate::admin::{AdminSettings, AdminSettingsError};
use crate::engine::EngineConfig;
use crate::limits::Limits;
use crate::net::addr::{Cidr, CidrError};
use crate::net::tls::CertSource;
use crate::net::url::{RtmpUrl, UrlError};
use crate::upstream::UpstreamSettings;

/// A configuration mistake, naming the flag or key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {}", file::toml_message(.source))]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error(transparent)]
    Cidr(#[from] CidrError),
    #[error(transparent)]
    Admin(#[from] AdminSettingsError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterSettingsError),
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// An SNI entry, validated: its names and chains (several: one per kind of key, e.g. RSA
/// and ECDSA; each client gets the one it can take).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniCert {
    pub server_names: Vec<String>,
    pub sources: Vec<CertSource>,
}

/// TLS settings for the TLS listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The chains served when no SNI entry matches (at least one).
    pub default: Vec<CertSource>,
    pub sni: Vec<SniCert>,
}

impl TlsSettings {
    /// The default chains, for a log line: "a.pem (key a.key), b.pem (key b.key)".
    pub fn default_named(&self) -> String {
        named(&self.default)
    }
}

impl SniCert {
    /// Its chains, for a log line.
    pub fn sources_named(&self) -> String {
        named(&self.sources)
    }
}

fn named(sources: &[CertSource]) -> String {
    sources
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The validated, merged configuration the program runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<RtmpUrl>,
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
    pub admin: AdminSettings,
    /// The access log file, if any.
    pub access_log: Option<PathBuf>,
    /// `[auth]`: who may connect, publish and play (None: everyone).
    pub auth: Option<std::sync::Arc<crate::auth::Auth>>,
    /// `[cluster]`: present when this node has a node id.
    pub cluster: Option<crate::cluster::ClusterSettings>,
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
}
