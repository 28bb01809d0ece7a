//! The TOML file as written: one struct per table, unknown keys refused, and the check that
//! no duration overflows the clock. Validation of the values is `merge`'s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, LogFormat};
use crate::admin::FileAdmin;
use crate::engine::EngineConfig;
use crate::limits::{Limits, MAX_DURATION_SECS};
use crate::net::proxy_protocol::ProxyVersion;

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
    /// `[[upstreams]]`: backend groups and the apps they serve.
    #[serde(default)]
    pub upstreams: Vec<crate::upstream::settings::FileGroup>,
    pub limits: Option<Limits>,
    #[serde(default)]
    pub engine: FileEngine,
    #[serde(default)]
    pub admin: FileAdmin,
    #[serde(default)]
    pub cluster: crate::cluster::FileCluster,
    #[serde(default)]
    pub log: FileLog,
    #[serde(default)]
    pub auth: crate::auth::FileAuth,
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
    pub write_batch_ms: Option<u64>,
    /// `"deny"` or `"replace"`.
    pub publisher_takeover: Option<crate::engine::hub::PublisherTakeover>,
    /// `[[engine.push]]`: restream destinations.
    #[serde(default)]
    pub push: Vec<FilePush>,
    /// HTTP-FLV's `Access-Control-Allow-Origin`: `"*"`, one origin, or `""` for none.
    pub http_flv_cors: Option<String>,
    /// HTTP-FLV: how long a request for an unpublished stream waits before its 404.
    pub http_flv_wait_ms: Option<u64>,
    /// `"off"`, `"all"`, or a list of apps (names or `*` globs) to record.
    pub record: Option<FileRecord>,
    pub record_dir: Option<PathBuf>,
    pub record_max_secs: Option<u64>,
    pub record_max_bytes: Option<u64>,
    /// Directory of FLV files served on demand.
    pub vod_dir: Option<PathBuf>,
}

/// `[engine] record`: a word (`"off"`, `"all"`) or a list of apps.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum FileRecord {
    Word(String),
    Apps(Vec<String>),
}

/// One `[[engine.push]]` table: streams published to `app` (a name or a `*` glob) are
/// pushed to `url` (`rtmp://` or `rtmps://HOST[:PORT]/APP/KEY`, `{name}` replaced by the
/// published name); `ca` adds trusted CA certificates for an rtmps:// destination.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct FilePush {
    pub app: String,
    pub url: String,
    pub ca: Option<PathBuf>,
}

impl FileEngine {
    pub(super) fn is_set(&self) -> bool {
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
            || self.write_batch_ms.is_some()
            || self.publisher_takeover.is_some()
            || !self.push.is_empty()
            || self.http_flv_cors.is_some()
            || self.http_flv_wait_ms.is_some()
            || self.record.is_some()
            || self.record_dir.is_some()
            || self.record_max_secs.is_some()
            || self.record_max_bytes.is_some()
            || self.vod_dir.is_some()
    }

    /// The engine's configuration with these keys applied, checked.
    pub(super) fn apply(&self, mut cfg: EngineConfig) -> Result<EngineConfig, ConfigError> {
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
        if let Some(v) = self.write_batch_ms {
            if v > 1000 {
                return Err(invalid(
                    "engine.write_batch_ms",
                    format!("{v} ms would delay every frame that long; use at most 1000 (0 to 100 is usual)"),
                ));
            }
            cfg.write_batch = Duration::from_millis(v);
        }
        if let Some(v) = self.publisher_takeover {
            cfg.publisher_takeover = v;
        }
        if let Some(v) = &self.http_flv_cors {
            // Echoed in a header: one line of visible ASCII, bounded.
            let ok = v.len() <= 1024 && v.bytes().all(|b| (0x20..0x7f).contains(&b));
            if !ok {
                return Err(invalid(
                    "engine.http_flv_cors",
                    "use \"*\", one origin such as \"https://example.com\", or \"\" for no CORS \
                     header (printable ASCII, at most 1024 bytes)",
                ));
            }
            cfg.http_flv_cors = (!v.trim().is_empty()).then(|| v.trim().to_owned());
        }
        if let Some(v) = self.http_flv_wait_ms {
            if v > 600_000 {
                return Err(invalid(
                    "engine.http_flv_wait_ms",
                    format!("{v} ms would hold a request for a missing stream over 10 minutes; use at most 600000 (0 answers 404 at once)"),
                ));
            }
            cfg.http_flv_wait = Duration::from_millis(v);
        }
        // Made absolute (relative to the file) and checked by `merge`.
        cfg.vod_dir.clone_from(&self.vod_dir);
        for (i, p) in self.push.iter().enumerate() {
            let dest = crate::engine::restream::Destination::parse(&p.url)
                .map_err(|e| invalid(format!("engine.push[{i}].url"), e.0))?;
            if p.app.is_empty() || p.app.len() > 256 {
                return Err(invalid(
                    format!("engine.push[{i}].app"),
                    "name an app (or a glob such as \"live*\"), at most 256 bytes",
                ));
            }
            cfg.push.push(crate::engine::restream::PushTarget {
                app: p.app.clone(),
                dest,
                ca: p.ca.clone(),
            });
        }
        cfg.record = self.record_settings()?.map(std::sync::Arc::new);
        Ok(cfg)
    }
}

impl FileEngine {
    /// `record`, `record_dir`, `record_max_*` checked together (None: nothing recorded).
    fn record_settings(
        &self,
    ) -> Result<Option<crate::engine::record::RecordSettings>, ConfigError> {
        use crate::engine::record::{RecordApps, RecordSettings};
        let usage = "write \"off\", \"all\", or a list of apps such as [\"live\", \"event*\"]";
        let apps = match &self.record {
            None => None,
            Some(FileRecord::Word(w)) => match w.as_str() {
                "off" => None,
                "all" => Some(RecordApps::All),
                other => {
                    return Err(invalid(
                        "engine.record",
                        format!(
                            "\"{}\" is not a choice; {usage}",
                            other.chars().take(64).collect::<String>()
                        ),
                    ))
                }
            },
            Some(FileRecord::Apps(list)) => {
                if let Some(bad) = list.iter().find(|a| a.is_empty() || a.len() > 256) {
                    return Err(invalid(
                        "engine.record",
                        format!(
                            "app name of {} bytes; name each app (or glob) in 1 to 256 bytes",
                            bad.len()
                        ),
                    ));
                }
                // An empty list records nothing, as "off" does.
                (!list.is_empty()).then(|| RecordApps::Apps(list.clone()))
            }
        };
        let Some(apps) = apps else {
            return Ok(None);
        };
        let Some(dir) = self.record_dir.clone() else {
            return Err(invalid(
                "engine.record_dir",
                "recording is on (engine.record) but no directory is set; set record_dir to the directory the FLV files go to",
            ));
        };
        Ok(Some(RecordSettings {
            apps,
            dir,
            max_secs: self.record_max_secs.unwrap_or(0),
            max_bytes: self.record_max_bytes.unwrap_or(0),
        }))
    }
}

/// `[tls]`. `cert` and `key` take one file or a list (an RSA chain and an ECDSA one for the
/// same names, paired in order: each client gets the one it can take, ECDSA first).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    #[serde(default, deserialize_with = "one_or_more")]
    pub cert: Vec<PathBuf>,
    #[serde(default, deserialize_with = "one_or_more")]
    pub key: Vec<PathBuf>,
    #[serde(default)]
    pub certificates: Vec<FileSniCert>,
}

/// One `[[tls.certificates]]` entry: chains served to clients asking for these names (one
/// file or a list, as in `[tls]`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileSniCert {
    pub server_names: Vec<String>,
    #[serde(deserialize_with = "one_or_more")]
    pub cert: Vec<PathBuf>,
    #[serde(deserialize_with = "one_or_more")]
    pub key: Vec<PathBuf>,
}

/// A path or a list of paths, as a list.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    struct Paths;
    impl<'de> serde::de::Visitor<'de> for Paths {
        type Value = Vec<PathBuf>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a file path or a list of file paths")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![PathBuf::from(v)])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            // The list is the file's own; its length is bounded by the file's size.
            let mut paths = Vec::new();
            while let Some(p) = seq.next_element::<PathBuf>()? {
                paths.push(p);
            }
            Ok(paths)
        }
    }
    d.deserialize_any(Paths)
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub url: Option<String>,
    pub ca: Option<PathBuf>,
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout_secs: Option<u64>,
    pub relay: Option<crate::upstream::settings::RelayMode>,
    /// `relay` (default) or `edge`.
    pub mode: Option<crate::engine::edge::UpstreamMode>,
    pub edge_idle_secs: Option<u64>,
    pub edge_reconnect_max_secs: Option<u64>,
    pub health_interval_secs: Option<u64>,
    pub health_rise: Option<u32>,
    pub health_fall: Option<u32>,
    pub write_batch_ms: Option<u64>,
}

/// A TOML error's text (several lines: the key, the line with a caret), indented under the
/// file's name.
pub(crate) fn toml_message(e: &toml::de::Error) -> String {
    e.to_string().trim_end().replace('\n', "\n  ")
}

/// Parses the TOML text of a config file.
pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    let parse_error = |source: toml::de::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
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
pub(super) fn check_duration(key: &str, secs: u64) -> Result<(), ConfigError> {
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
