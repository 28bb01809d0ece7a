//! Flags over the file, one part of the configuration at a time: listeners, TLS, upstream,
//! limits, PROXY protocol. A flag wins over its key; each part checks its values and names
//! the flag or key at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{check_duration, FileTls, FileUpstream};
use super::{invalid, Cli, Config, ConfigError, FileConfig, SniCert, TlsSettings, DEFAULT_LISTEN};
use crate::admin::AdminSettings;
use crate::engine::EngineConfig;
use crate::limits::Limits;
use crate::net::addr::Cidr;
use crate::net::tls::CertSource;
use crate::net::url::{parse_listen, parse_upstream, RtmpUrl};
use crate::upstream::UpstreamSettings;

impl Config {
    /// Merges flags over the file. `dev_cert` locates the dev certificate (a parameter so
    /// tests do not depend on the working directory).
    pub fn merge(
        cli: &Cli,
        file: FileConfig,
        base: Option<&Path>,
        dev_cert: impl FnOnce() -> Option<CertSource>,
    ) -> Result<Config, ConfigError> {
        let rel = |p: PathBuf| relative_to(base, p);

        let listen = listeners(cli, file.listen.as_deref())?;
        let tls = tls(cli, file.tls, &listen, &rel, dev_cert)?;
        let explicit_relay = file.upstream.relay;
        let edge_keys = crate::engine::edge::EdgeKeys {
            on: cli.edge,
            mode: file.upstream.mode,
            idle_secs: file.upstream.edge_idle_secs,
            reconnect_max_secs: file.upstream.edge_reconnect_max_secs,
        };
        let mut upstream = upstream(cli, file.upstream, &file.upstreams, &rel)?;
        // Edge mode: the upstream's default group are the origins, and the engine serves.
        let origins = upstream.as_ref().map(|up| {
            let default = up.groups.iter().find(|g| g.apps.is_empty());
            let origins = default
                .map(|g| {
                    g.backends
                        .iter()
                        .map(|b| crate::engine::edge::OriginSettings {
                            url: b.url.clone(),
                            weight: b.weight,
                        })
                        .collect()
                })
                .unwrap_or_default();
            crate::engine::edge::OriginList {
                origins,
                backup: default
                    .map(|g| g.backup.iter().map(|b| b.url.clone()).collect())
                    .unwrap_or_default(),
                connect_timeout: up.connect_timeout,
                ca: up.ca.clone(),
            }
        });
        let edge = crate::engine::edge::settings(edge_keys, origins)
            .map_err(|e| invalid(e.key, e.message))?;
        if edge.is_some() {
            upstream = None;
        }
        let admin = AdminSettings::merge(
            cli.admin.as_deref(),
            cli.admin_token.clone(),
            file.admin,
            base,
        )?;
        let cluster = crate::cluster::ClusterSettings::merge(
            crate::cluster::ClusterFlags {
                node_id: cli.node_id.clone(),
                peers: cli.peers.clone(),
                secret: cli.cluster_secret.clone(),
                listen: cli.cluster_listen.clone(),
            },
            file.cluster,
            base,
        )?;
        let mut warnings = Vec::new();
        if upstream.is_some() && file.engine.is_set() {
            warnings.push("the [engine] table is ignored: clients go to the upstream".to_string());
        }
        let mut engine = file.engine.apply(EngineConfig::default())?;
        let limits = limits(file.limits.unwrap_or_default())?;
        let auth = crate::auth::from_file(&file.auth, &limits)?;
        if let (Some(a), Some(up)) = (&auth, upstream.as_mut()) {
            // Authorization needs the commands: the connect-aware relay, unless bytes was
            // asked for explicitly (then nothing is checked, and the log says so).
            if explicit_relay == Some(crate::upstream::settings::RelayMode::Bytes) {
                warnings.push(
                    "[auth] is not enforced for relayed clients with relay = \"bytes\" (a byte copy never reads connect, publish or play); use relay = \"connect\""
                        .to_string(),
                );
            } else {
                up.relay = crate::upstream::settings::RelayMode::Connect;
                up.auth = Some(crate::upstream::AuthHandle(a.clone()));
            }
        }
        engine.auth = auth.clone();
        engine.edge = edge;
        for p in &mut engine.push {
            p.ca = p.ca.take().map(rel);
        }
        if let Some(r) = engine.record.as_mut() {
            std::sync::Arc::make_mut(r).dir = rel(r.dir.clone());
        }
        if let Some(d) = engine.vod_dir.take().map(rel) {
            // Canonical once here: a play's path is checked against the resolved directory.
            let dir = std::fs::canonicalize(&d)
                .ok()
                .filter(|c| c.is_dir())
                .ok_or_else(|| {
                    invalid(
                        "engine.vod_dir",
                        format!(
                            "{} is not a readable directory; create it or fix the path",
                            d.display()
                        ),
                    )
                })?;
            engine.vod_dir = Some(dir);
        }
        let accept_proxy_protocol =
            cli.accept_proxy_protocol || file.accept_proxy_protocol.unwrap_or(false);
        let trusted_proxies = trusted_proxies(cli, file.trusted_proxies)?;
        warnings.extend(proxy_warnings(accept_proxy_protocol, &trusted_proxies));

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
            auth,
            cluster,
        })
    }
}

/// `--listen` replaces the file's `listen` list; neither means [`DEFAULT_LISTEN`]. Two
/// listeners on one host and port are refused.
fn listeners(cli: &Cli, file: Option<&[String]>) -> Result<Vec<RtmpUrl>, ConfigError> {
    let listen: Vec<RtmpUrl> = if !cli.listen.is_empty() {
        cli.listen
            .iter()
            .map(|u| parse_listen("--listen", u))
            .collect::<Result<_, _>>()?
    } else if let Some(list) = file {
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
    Ok(listen)
}

/// The certificates for the TLS listeners (None when there is none): the flags' or the
/// file's default certificate, the SNI entries, and failing both the dev certificate.
fn tls(
    cli: &Cli,
    file: FileTls,
    listen: &[RtmpUrl],
    rel: &impl Fn(PathBuf) -> PathBuf,
    dev_cert: impl FnOnce() -> Option<CertSource>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let default_cert = match (cli.tls_cert.is_empty(), cli.tls_key.is_empty()) {
        (false, _) | (_, false) => paired(
            "--tls-cert",
            cli.tls_cert.clone(),
            "--tls-key",
            cli.tls_key.clone(),
            &|p| p,
        )?,
        (true, true) => paired("tls.cert", file.cert, "tls.key", file.key, rel)?,
    };
    let mut sni = Vec::with_capacity(file.certificates.len());
    for (i, c) in file.certificates.into_iter().enumerate() {
        if c.server_names.is_empty() || c.server_names.iter().any(|n| n.trim().is_empty()) {
            return Err(invalid(
                format!("tls.certificates[{i}].server_names"),
                "must list at least one non-empty name, e.g. [\"live.example.com\"]",
            ));
        }
        let sources = paired(
            &format!("tls.certificates[{i}].cert"),
            c.cert,
            &format!("tls.certificates[{i}].key"),
            c.key,
            rel,
        )?;
        if sources.is_empty() {
            return Err(invalid(
                format!("tls.certificates[{i}].cert"),
                "is an empty list; name the certificate chain and its key",
            ));
        }
        sni.push(SniCert {
            server_names: c.server_names,
            sources,
        });
    }
    if !listen.iter().any(|l| l.scheme.is_tls()) {
        return Ok(None);
    }
    let default = match (default_cert.is_empty(), sni.first()) {
        (false, _) => default_cert,
        // No default given: the first SNI entry serves unknown names.
        (true, Some(first)) => first.sources.clone(),
        (true, None) => vec![dev_cert().unwrap_or(CertSource::EmbeddedDev)],
    };
    Ok(Some(TlsSettings { default, sni }))
}

/// Certificate chains and their keys given as two lists, paired in order (`cert_key`'s
/// first file is the first chain's key...). Unequal lengths are an error naming both keys.
fn paired(
    cert_key: &str,
    certs: Vec<PathBuf>,
    key_key: &str,
    keys: Vec<PathBuf>,
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Vec<CertSource>, ConfigError> {
    if certs.len() != keys.len() {
        let (key, message) = match (certs.len(), keys.len()) {
            (_, 0) => (
                key_key,
                format!("{cert_key} is set but {key_key} is not; set both"),
            ),
            (0, _) => (
                cert_key,
                format!("{key_key} is set but {cert_key} is not; set both"),
            ),
            (c, k) => (
                key_key,
                format!(
                    "{cert_key} names {c} certificate chain(s) and {key_key} {k} key(s); \
                     give one key per chain, in the same order"
                ),
            ),
        };
        return Err(invalid(key, message));
    }
    Ok(certs
        .into_iter()
        .zip(keys)
        .map(|(cert, key)| CertSource::Files {
            cert: rel(cert),
            key: rel(key),
        })
        .collect())
}

/// The backend (None: the built-in engine serves). Also checks `--drain-secs`, as before
/// the split, so the first error reported stays the same.
fn upstream(
    cli: &Cli,
    file: FileUpstream,
    groups: &[crate::upstream::settings::FileGroup],
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Option<UpstreamSettings>, ConfigError> {
    let urls = match (cli.upstream.is_empty(), &file.url) {
        (false, _) => cli
            .upstream
            .iter()
            .map(|u| parse_upstream("--upstream", u))
            .collect::<Result<Vec<_>, _>>()?,
        (true, Some(u)) => vec![parse_upstream("upstream.url", u)?],
        (true, None) => Vec::new(),
    };
    let settings_error = |e: crate::upstream::settings::SettingsError| invalid(e.key, e.message);
    let (groups, relay) =
        crate::upstream::settings::groups(&urls, groups, file.relay).map_err(settings_error)?;
    let health = crate::upstream::settings::health(
        file.health_interval_secs,
        file.health_rise,
        file.health_fall,
    )
    .map_err(settings_error)?;
    // The first backend (of the default group if any), for status lines.
    let url = groups
        .iter()
        .find(|g| g.apps.is_empty())
        .or(groups.first())
        .and_then(|g| g.backends.first())
        .map(|b| b.url.clone());
    let ca = cli.upstream_ca.clone().or_else(|| file.ca.map(rel));
    let proxy_protocol = cli.upstream_proxy_protocol.or(file.proxy_protocol);
    let connect_secs = cli
        .upstream_timeout_secs
        .or(file.connect_timeout_secs)
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
    let write_batch = file
        .write_batch_ms
        .map_or(crate::upstream::DEFAULT_WRITE_BATCH, Duration::from_millis);
    if write_batch > Duration::from_secs(1) {
        let ms = write_batch.as_millis();
        return Err(invalid(
            "upstream.write_batch_ms",
            format!(
                "{ms} ms would delay every frame that long; use at most 1000 (0 to 100 is usual)"
            ),
        ));
    }
    match url {
        Some(url) => Ok(Some(UpstreamSettings {
            url,
            groups,
            relay,
            health,
            auth: None,
            ca,
            proxy_protocol,
            connect_timeout: Duration::from_secs(connect_secs),
            write_batch,
        })),
        None if ca.is_some() || proxy_protocol.is_some() => Err(invalid(
            "--upstream",
            "--upstream-ca / --upstream-proxy-protocol (upstream.ca / upstream.proxy_protocol) are set but no upstream URL is; add --upstream rtmp://HOST:PORT",
        )),
        None => Ok(None),
    }
}

/// `[limits]`, with the values that would make the door refuse everyone refused.
fn limits(limits: Limits) -> Result<Limits, ConfigError> {
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
    Ok(limits)
}

/// `--trusted-proxy` replaces the file's `trusted_proxies`.
fn trusted_proxies(cli: &Cli, file: Option<Vec<String>>) -> Result<Vec<Cidr>, ConfigError> {
    let list = if !cli.trusted_proxies.is_empty() {
        cli.trusted_proxies
            .iter()
            .map(|c| Cidr::parse("--trusted-proxy", c))
            .collect::<Result<_, _>>()?
    } else {
        file.unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, c)| Cidr::parse(&format!("trusted_proxies[{i}]"), c))
            .collect::<Result<_, _>>()?
    };
    Ok(list)
}

/// PROXY protocol settings that are valid but probably not what was meant.
fn proxy_warnings(accept: bool, trusted: &[Cidr]) -> Option<String> {
    if accept && trusted.is_empty() {
        return Some(
            "accept_proxy_protocol trusts a PROXY header from any address: anyone who can \
             reach a listener can claim any client address; list the load balancers in \
             trusted_proxies (--trusted-proxy CIDR)"
                .to_string(),
        );
    }
    if !accept && !trusted.is_empty() {
        return Some(
            "trusted_proxies is set but accept_proxy_protocol is off: the list is unused"
                .to_string(),
        );
    }
    None
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
