//! Configuration reload (SIGHUP, `POST /api/v1/reload`): re-reads the configuration and
//! applies it without dropping a session.
//!
//! Everything that can fail is prepared first (the file parsed and validated, certificates
//! loaded, the upstream's TLS set up, new listeners bound); if any step fails the reload is
//! refused whole, the running configuration kept, and the reason logged and returned. Then
//! the changes are switched in: listeners added and removed (a removed one stops accepting,
//! its sessions carry on), certificates, limits and the door's options for new connections,
//! the engine's settings or the upstream for new sessions, the admin token, the memory
//! budget. What only a restart can change is named in the answer (`restart_needed`).

use std::sync::Arc;

use anyhow::Context as _;
use serde_json::json;

use crate::admin;
use crate::config::{Cli, Config, TlsSettings};
use crate::door::listener::{DoorOptions, Listening};
use crate::engine::Engine;
use crate::limits::Limits;
use crate::live::Live;
use crate::net::tls::{self, Reloadable, SniResolver};
use crate::stream::StreamHandler;
use crate::upstream::Upstream;
use rustls::sign::CertifiedKey;

/// Limits a reload cannot change: the address grouping keys the connection, rate and
/// memory tables of every open connection. A change is named in `restart_needed`. Every
/// other limit applies to connections, tunnel requests and sessions that start after the
/// reload.
pub const RESTART_LIMITS: [&str; 1] = ["ipv6_prefix_len"];

/// What the running gateway is made of, as far as a reload changes it.
pub struct Parts {
    /// The handler new sessions get (behind the session accounting).
    pub handler: Arc<Live<StreamHandler>>,
    /// The engine generation new sessions get (None with an upstream).
    pub engine: Option<Arc<Engine>>,
    /// The certificates of the TLS listeners, if any is configured.
    pub resolver: Option<Arc<Reloadable>>,
    pub listening: Arc<Listening>,
    pub admin: Arc<admin::State>,
}

/// Applies reloads, one at a time.
pub struct Reloader {
    cli: Cli,
    /// The configuration the process started with: what `restart_needed` compares with.
    started: Config,
    runtime: tokio::runtime::Handle,
    current: tokio::sync::Mutex<Current>,
}

struct Current {
    config: Config,
    engine: Option<Arc<Engine>>,
    resolver: Option<Arc<Reloadable>>,
    handler: Arc<Live<StreamHandler>>,
    listening: Arc<Listening>,
    admin: Arc<admin::State>,
}

impl Reloader {
    /// `runtime` is the gateway's runtime: listeners bound by a reload are served there.
    pub fn new(
        cli: Cli,
        config: Config,
        runtime: tokio::runtime::Handle,
        parts: Parts,
    ) -> Arc<Reloader> {
        Arc::new(Reloader {
            cli,
            started: config.clone(),
            runtime,
            current: tokio::sync::Mutex::new(Current {
                config,
                engine: parts.engine,
                resolver: parts.resolver,
                handler: parts.handler,
                listening: parts.listening,
                admin: parts.admin,
            }),
        })
    }

    /// The drain time of the configuration in effect.
    pub fn drain(&self) -> std::time::Duration {
        match self.current.try_lock() {
            Ok(c) => c.config.drain,
            Err(_) => self.started.drain,
        }
    }

    /// Re-reads and applies the configuration; `via` names who asked (logged). Blocks until
    /// done: call it off the gateway's executor threads (the admin thread, a blocking task).
    /// Ok(what was applied), Err(why the configuration was refused).
    pub fn reload(self: &Arc<Self>, via: &str) -> Result<serde_json::Value, String> {
        let me = self.clone();
        let via = via.to_string();
        // A thread of its own: `block_on` may not run inside the admin thread's runtime.
        std::thread::Builder::new()
            .name("rtmpgate-reload".into())
            .spawn(move || me.runtime.block_on(me.apply(&via)))
            .map_err(|e| format!("cannot start the reload thread: {e}"))?
            .join()
            .unwrap_or_else(|_| Err("the reload failed unexpectedly; nothing was changed".into()))
    }

    async fn apply(&self, via: &str) -> Result<serde_json::Value, String> {
        let mut cur = self.current.lock().await;
        let refuse = |why: String| {
            tracing::error!("{via}: refused, keeping the current configuration: {why}");
            why
        };
        let mut applied: Vec<&str> = Vec::new();
        if cur.config.access_log.is_some() {
            crate::access::reopen();
            applied.push("access log reopened");
        }
        let fresh = Config::load(&self.cli).map_err(|e| refuse(e.to_string()))?;
        for warning in &fresh.warnings {
            tracing::warn!("{via}: {warning}");
        }
        let mut restart = needs_restart(&self.started, &fresh);

        // 1. Prepare everything that can fail; nothing running changes yet.
        if let (Some(running), None) = (self.started.admin.listen, &fresh.admin.token) {
            if !running.ip().is_loopback() && self.started.admin.token.is_some() {
                return Err(refuse(format!(
                    "admin.token: the admin listener runs on {running}, not a loopback address, \
                     so it keeps requiring a token; set one or restart with a loopback address"
                )));
            }
        }
        let mut resolver = match &fresh.tls {
            Some(settings) => Some(build_resolver(settings).map_err(|e| refuse(report(&e)))?),
            None => None,
        };
        // TLS for new connections: the running resolver gets the new certificates; a first
        // TLS listener gets a resolver of its own.
        let mut tls_config = cur.listening.options().tls.clone();
        let mut new_reloadable = None;
        if cur.resolver.is_none() {
            if let Some(r) = resolver.take() {
                let reloadable = Reloadable::new(r);
                tls_config = Some(
                    tls::server_config_with(reloadable.clone())
                        .map_err(|e| refuse(e.to_string()))?,
                );
                new_reloadable = Some(reloadable);
            }
        }
        let limits_changed = format!("{:?}", cur.config.limits) != format!("{:?}", fresh.limits);
        let engine_changed = format!("{:?}", cur.config.engine) != format!("{:?}", fresh.engine);
        let upstream_changed = cur.config.upstream != fresh.upstream;
        let mut handler: Option<(StreamHandler, Option<Arc<Engine>>)> = None;
        // The new relay goes live (health checks, metrics) only once nothing can fail.
        let mut relay: Option<Arc<Upstream>> = None;
        match (&cur.engine, &fresh.upstream) {
            (Some(engine), None) if limits_changed || engine_changed => {
                let next = engine.reconfigured(fresh.limits.clone(), fresh.engine.clone());
                handler = Some((next.handler(), Some(next)));
            }
            (None, Some(up)) if limits_changed || upstream_changed => {
                let upstream = Upstream::new(up, &fresh.limits)
                    .with_context(|| format!("upstream {}", up.url))
                    .map_err(|e| refuse(report(&e)))?;
                relay = Some(Arc::new(upstream));
            }
            (Some(_), Some(_)) | (None, None) => {
                restart.push("upstream (switching between the built-in engine and an upstream)")
            }
            _ => {}
        }
        let opts = DoorOptions {
            limits: Arc::new(fresh.limits.clone()),
            tls: tls_config,
            rtmpe: fresh.rtmpe,
            accept_proxy_protocol: fresh.accept_proxy_protocol,
            trusted_proxies: fresh.trusted_proxies.clone(),
        };
        let before = cur.listening.labels();
        // Binds the new listeners (a failure refuses the whole reload), then switches the
        // door's options and stops the removed listeners.
        let change = cur
            .listening
            .apply(&fresh.listen, opts)
            .await
            .map_err(|e| refuse(e.to_string()))?;

        // 2. Switch in the rest (none of it can fail).
        if change.listening != before {
            applied.push("listeners");
        }
        if let (Some(r), Some(running)) = (resolver, &cur.resolver) {
            running.replace(r);
            applied.push("tls certificates");
        } else if new_reloadable.is_some() {
            cur.resolver = new_reloadable;
            applied.push("tls certificates");
        }
        if let (true, Some(settings)) = (applied.contains(&"tls certificates"), &fresh.tls) {
            tracing::info!(
                "{via}: reloaded TLS certificates ({})",
                settings.default_named()
            );
        }
        if limits_changed {
            let budget = fresh.limits.memory_budget();
            crate::budget::global().set_limit(budget);
            crate::budget::set_per_address_limit(
                fresh.limits.memory_budget_per_ip(budget),
                self.started.limits.ipv6_prefix_len,
            );
            applied.push("limits");
            for name in changed_limits(&self.started.limits, &fresh.limits) {
                if let Some(n) = RESTART_LIMITS.iter().find(|n| **n == name) {
                    restart.push(*n);
                }
            }
        }
        if let Some(relay) = relay {
            handler = Some((relay.handler(), None));
        }
        if let Some((next, engine)) = handler {
            cur.handler.set(Arc::new(next));
            if engine.is_some() {
                cur.engine = engine;
            }
        }
        if engine_changed && cur.engine.is_some() {
            applied.push("engine");
        }
        if upstream_changed && fresh.upstream.is_some() && cur.engine.is_none() {
            cur.admin.set_upstream(fresh.upstream.clone());
            applied.push("upstream");
        }
        if cur.config.admin.token != fresh.admin.token {
            cur.admin.set_token(fresh.admin.token.clone());
            applied.push("admin token");
        }
        if cur.config.rtmpe != fresh.rtmpe
            || cur.config.accept_proxy_protocol != fresh.accept_proxy_protocol
            || cur.config.trusted_proxies != fresh.trusted_proxies
        {
            applied.push("door options (rtmpe, proxy protocol)");
        }
        if cur.config.drain != fresh.drain {
            applied.push("drain_secs");
        }
        restart.sort_unstable();
        restart.dedup();
        tracing::info!(
            "{via}: configuration reloaded; applied: {}; listening on {}",
            if applied.is_empty() {
                "nothing changed".to_string()
            } else {
                applied.join(", ")
            },
            change.listening.join(", ")
        );
        if !restart.is_empty() {
            tracing::warn!(
                "{via}: changed settings that take effect at the next restart only: {}",
                restart.join(", ")
            );
        }
        cur.config = fresh;
        Ok(json!({
            "applied": applied,
            "restart_needed": restart,
            "listeners": change,
        }))
    }
}

/// Loads every certificate and key the TLS settings name.
pub fn build_resolver(settings: &TlsSettings) -> anyhow::Result<SniResolver> {
    let mut default = load_kinds(&settings.default)?.into_iter();
    let Some(first) = default.next() else {
        anyhow::bail!(
            "no default TLS certificate: set [tls] cert and key (or --tls-cert and --tls-key)"
        );
    };
    let mut resolver = SniResolver::new(first);
    default.for_each(|key| resolver.add_default(key));
    for entry in &settings.sni {
        for key in load_kinds(&entry.sources)? {
            for name in &entry.server_names {
                resolver.add(name, key.clone());
            }
        }
    }
    Ok(resolver)
}

/// Loads the chains given together for the same names, one per kind of key: a second chain
/// of a kind already listed would silently replace the first, so it is refused.
fn load_kinds(sources: &[tls::CertSource]) -> anyhow::Result<Vec<Arc<CertifiedKey>>> {
    let mut keys: Vec<(Arc<CertifiedKey>, &tls::CertSource)> = Vec::with_capacity(sources.len());
    for source in sources {
        let key = tls::load_certified_key(source)?;
        let kind = key.key.algorithm();
        if let Some((_, other)) = keys.iter().find(|(k, _)| k.key.algorithm() == kind) {
            anyhow::bail!(
                "{source} and {other} both hold {kind:?} keys for the same names; list one \
                 chain per kind of key (e.g. one RSA and one ECDSA), or give the other names \
                 an entry of their own"
            );
        }
        keys.push((key, source));
    }
    Ok(keys.into_iter().map(|(k, _)| k).collect())
}

/// The error and its causes on one line, skipping a cause its parent's message already
/// quotes (most of ours name their source in their own message).
pub fn report(e: &anyhow::Error) -> String {
    // Compared with runs of whitespace as one space: a parent may quote its cause indented
    // (a TOML error's lines under the file name).
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if squash(&out).contains(&squash(&text)) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The names of the limits that differ (from their `Debug` form: every field is a number).
pub fn changed_limits(old: &Limits, new: &Limits) -> Vec<String> {
    fn fields(l: &Limits) -> Vec<(String, String)> {
        let text = format!("{l:?}");
        let inner = text
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map_or("", |(body, _)| body);
        inner
            .split(',')
            .filter_map(|kv| kv.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }
    let old = fields(old);
    fields(new)
        .into_iter()
        .filter(|kv| !old.contains(kv))
        .map(|(k, _)| k)
        .collect()
}

/// The settings that differ between the start configuration and `new` and that no reload
/// applies.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.admin.listen != new.admin.listen || old.admin.tls != new.admin.tls {
        out.push("admin.listen / admin.tls (the admin listener's own socket)");
    }
    if old.log_level != new.log_level {
        out.push("log_level");
    }
    if format!("{:?}", old.log_format) != format!("{:?}", new.log_format) {
        out.push("log_format");
    }
    if old.access_log != new.access_log {
        out.push("log.access (the file's path; the file itself is reopened)");
    }
    if format!("{:?}", old.cluster) != format!("{:?}", new.cluster) {
        out.push("cluster (node id, link and peers)");
    }
    let (a, b) = (&old.engine, &new.engine);
    if a.edge != b.edge {
        out.push("edge mode and its origins (upstream.mode, the origins, edge_*: the running pulls keep them)");
    }
    if a.chunk_size != b.chunk_size
        || a.queue_messages != b.queue_messages
        || a.gop_cache != b.gop_cache
        || a.gop_max_bytes != b.gop_max_bytes
        || a.gop_max_messages != b.gop_max_messages
        || a.max_lag_bytes != b.max_lag_bytes
    {
        out.push(
            "engine chunk_size / queue_messages / gop_* / max_lag_bytes (the hub's streams are built with them)",
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn two_chains_of_one_kind_for_the_same_names_are_refused() {
        use crate::config::SniCert;
        let dev = || tls::CertSource::EmbeddedDev;
        let twice = TlsSettings {
            default: vec![dev(), dev()],
            sni: vec![],
        };
        let e = report(&build_resolver(&twice).unwrap_err());
        assert!(e.contains("both hold ECDSA keys"), "{e}");
        let sni = TlsSettings {
            default: vec![dev()],
            sni: vec![SniCert {
                server_names: vec!["live.example.com".into()],
                sources: vec![dev(), dev()],
            }],
        };
        assert!(build_resolver(&sni).is_err());
        // One of each kind, or one, is fine.
        let one = TlsSettings {
            default: vec![dev()],
            sni: vec![],
        };
        assert!(build_resolver(&one).is_ok());
    }

    #[test]
    fn changed_limits_are_named() {
        let a = Limits::default();
        let b = Limits {
            max_connections: 7,
            tunnel_reap_secs: 3,
            ..Limits::default()
        };
        let mut names = changed_limits(&a, &b);
        names.sort();
        assert_eq!(names, ["max_connections", "tunnel_reap_secs"]);
        assert!(changed_limits(&a, &a).is_empty());
    }

    #[test]
    fn a_cause_the_message_quotes_is_not_repeated() {
        // ConfigError::Parse keeps the TOML error as its source and quotes it indented.
        let path = std::path::Path::new("/etc/rtmpgate.toml");
        let e = crate::config::parse_file("[limits]\nmax_connections = \"x\"\n", path)
            .map(|_| ())
            .unwrap_err();
        assert!(std::error::Error::source(&e).is_some());
        let line = report(&anyhow::Error::from(e).context("reload refused"));
        assert_eq!(line.matches("max_connections").count(), 1, "{line}");
        assert!(
            line.starts_with("reload refused: config file /etc/rtmpgate.toml:"),
            "{line}"
        );
    }
}
