//! `/metrics`: the counters of [`crate::metrics`] and the live state (engine streams, tunnel
//! sessions, memory budget, process figures) in the Prometheus text format.
//!
//! Encoded with `prometheus-client`, the Prometheus project's own Rust client: maintained,
//! typed (counters, gauges and histograms are distinct types, names get their `_total`
//! suffix from the type), and without a global registry, so the registry is built here from
//! an explicit collector. The collector reads atomics and snapshots at scrape time; nothing
//! in the encoding runs on the data path.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::State;
use crate::metrics::{self, Refusal, TRANSPORTS};

pub use prometheus_client::registry::Registry;

/// The `Content-Type` of the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A registry holding the gateway's collector.
pub fn registry(state: Arc<State>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Gateway { state }));
    r
}

/// The text of one scrape.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Gateway {
    state: Arc<State>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("admin::State")
    }
}

/// A counter without labels (`name` without `_total`: the encoder adds it).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn counter_f(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// One labelled series per (label value, value).
fn family(
    e: &mut DescriptorEncoder,
    kind: MetricType,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, i64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in values {
        let labels = [(label, *value)];
        let mut f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => {
                let v = u64::try_from(*v).unwrap_or(0);
                f.encode_counter::<NoLabelSet, u64, u64>(&v, None)?
            }
            _ => f.encode_gauge(v)?,
        }
    }
    Ok(())
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Sessions and bytes by listener (`SCHEME://ADDR` as logged at bind): the listeners
/// configured now and any removed by a reload whose counters exist (a handful, chosen by
/// the operator).
fn listener_families(e: &mut DescriptorEncoder, st: &State) -> fmt::Result {
    let listeners = metrics::listeners();
    let mut open = vec![(0u64, 0u64); listeners.len()];
    for s in st.sessions.all() {
        if let Some(i) = listeners.iter().position(|(n, _)| *n == s.listener) {
            if let Some(slot) = open.get_mut(i) {
                slot.0 = slot.0.saturating_add(s.bytes_received());
                slot.1 = slot.1.saturating_add(s.bytes_sent());
            }
        }
    }
    let bytes: Vec<(u64, u64)> = listeners
        .iter()
        .zip(&open)
        .map(|((_, c), o)| c.totals(o.0, o.1))
        .collect();
    let series = |f: &dyn Fn(usize) -> i64| -> Vec<(&str, i64)> {
        listeners
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (&**n, f(i)))
            .collect()
    };
    let at = |i: usize| listeners.get(i).map(|(_, c)| c.clone());
    family(
        e,
        MetricType::Gauge,
        "rtmpgate_listener_sessions_open",
        "Client sessions open, by the listener that accepted them.",
        "listener",
        &series(&|i| at(i).map_or(0, |c| c.sessions_open.load(Relaxed))),
    )?;
    family(
        e,
        MetricType::Counter,
        "rtmpgate_listener_sessions",
        "Client sessions opened, by listener.",
        "listener",
        &series(&|i| at(i).map_or(0, |c| as_i64(c.sessions_total.load(Relaxed)))),
    )?;
    family(
        e,
        MetricType::Counter,
        "rtmpgate_listener_bytes_received",
        "Bytes received from clients (after TLS, tunnel and RTMPE decoding), by listener.",
        "listener",
        &series(&|i| bytes.get(i).map_or(0, |b| as_i64(b.0))),
    )?;
    family(
        e,
        MetricType::Counter,
        "rtmpgate_listener_bytes_sent",
        "Bytes sent to clients (before TLS, tunnel and RTMPE encoding), by listener.",
        "listener",
        &series(&|i| bytes.get(i).map_or(0, |b| as_i64(b.1))),
    )
}

impl Collector for Gateway {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let m = metrics::global();
        let st = &self.state;

        counter(
            &mut e,
            "rtmpgate_connections_accepted",
            "TCP connections accepted on the client listeners.",
            m.connections_accepted.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "rtmpgate_connections_open",
            "TCP connections open on the client listeners (tunnel requests included).",
            m.connections_open.load(Relaxed),
        )?;
        let bytes = st.sessions.bytes_by_transport();
        let per_bytes = |f: &dyn Fn(&(u64, u64)) -> u64| -> Vec<(&'static str, i64)> {
            TRANSPORTS
                .iter()
                .zip(&bytes)
                .map(|(t, b)| (t.scheme(), as_i64(f(b))))
                .collect()
        };
        let per = |f: &dyn Fn(&metrics::PerTransport) -> i64| -> Vec<(&'static str, i64)> {
            TRANSPORTS
                .iter()
                .map(|t| (t.scheme(), f(m.transport(*t))))
                .collect()
        };
        family(
            &mut e,
            MetricType::Gauge,
            "rtmpgate_sessions_open",
            "Client sessions open, by transport.",
            "transport",
            &per(&|p| p.sessions_open.load(Relaxed)),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "rtmpgate_sessions",
            "Client sessions opened, by transport.",
            "transport",
            &per(&|p| as_i64(p.sessions_total.load(Relaxed))),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "rtmpgate_bytes_received",
            "Bytes received from clients (after TLS, tunnel and RTMPE decoding), by transport.",
            "transport",
            &per_bytes(&|b| b.0),
        )?;
        family(
            &mut e,
            MetricType::Counter,
            "rtmpgate_bytes_sent",
            "Bytes sent to clients (before TLS, tunnel and RTMPE encoding), by transport.",
            "transport",
            &per_bytes(&|b| b.1),
        )?;
        listener_families(&mut e, st)?;
        let refused: Vec<(&str, i64)> = Refusal::ALL
            .iter()
            .map(|r| (r.as_str(), as_i64(m.refused_count(*r))))
            .collect();
        family(
            &mut e,
            MetricType::Counter,
            "rtmpgate_refused",
            "Connections or tunnel sessions turned away before becoming a session, by reason.",
            "reason",
            &refused,
        )?;
        crate::auth::metrics::encode(&mut e)?;
        counter(
            &mut e,
            "rtmpgate_sessions_kicked",
            "Sessions closed through DELETE /api/v1/sessions/{id}.",
            m.sessions_kicked.load(Relaxed),
        )?;

        counter(
            &mut e,
            "rtmpgate_tls_handshakes",
            "TLS handshakes completed on client listeners.",
            m.tls_handshakes.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_tls_handshake_failures",
            "TLS handshakes on client listeners that failed or timed out.",
            m.tls_failures.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_tls_handshakes_resumed",
            "Of the TLS handshakes completed on client listeners, those resumed with a session \
             ticket (no certificate signature).",
            m.tls_resumed.load(Relaxed),
        )?;
        let chains: Vec<(&str, i64)> = crate::metrics::ChainKey::ALL
            .iter()
            .map(|k| (k.as_str(), as_i64(m.tls_chains_chosen(*k))))
            .collect();
        family(
            &mut e,
            MetricType::Counter,
            "rtmpgate_tls_certificates_chosen",
            "ClientHellos answered on TLS listeners (client, admin, cluster), by the kind of key \
             of the certificate chain chosen (resumptions included: the chain is chosen first).",
            "key",
            &chains,
        )?;
        counter(
            &mut e,
            "rtmpgate_tls_handshake_steps_offloaded",
            "TLS handshake steps that signed with an RSA key on the blocking pool, because other \
             handshakes were under way (a burst of new clients).",
            m.tls_steps_offloaded.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_rtmpe_handshakes",
            "RTMPE handshakes completed (raw and tunnelled).",
            m.rtmpe_handshakes.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_rtmpe_handshake_failures",
            "RTMPE handshakes that failed or timed out.",
            m.rtmpe_failures.load(Relaxed),
        )?;
        counter_f(
            &mut e,
            "rtmpgate_rtmpe_handshake_cpu_seconds",
            "CPU time spent in RTMPE Diffie-Hellman work.",
            m.rtmpe_cpu_nanos.load(Relaxed) as f64 / 1e9,
        )?;

        gauge(
            &mut e,
            "rtmpgate_rtmpt_sessions_open",
            "RTMPT/RTMPTS tunnel sessions in the tunnel table.",
            st.tunnel().map_or(0, |t| t.sessions() as i64),
        )?;
        counter(
            &mut e,
            "rtmpgate_rtmpt_sessions_opened",
            "RTMPT/RTMPTS tunnel sessions opened (/open).",
            m.rtmpt_opened.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_rtmpt_sessions_reaped",
            "Tunnel sessions closed by the reaper (no request within limits.tunnel_reap_secs, no handshake in time).",
            m.rtmpt_reaped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "rtmpgate_rtmpt_not_found",
            "Tunnel requests answered 404 (unknown or ended session).",
            m.rtmpt_not_found.load(Relaxed),
        )?;

        if st.upstream().is_some() {
            counter(
                &mut e,
                "rtmpgate_upstream_connect_attempts",
                "Connects to the upstream (TCP, and TLS for rtmps://).",
                m.upstream_attempts.load(Relaxed),
            )?;
            counter(
                &mut e,
                "rtmpgate_upstream_connect_failures",
                "Upstream connects that failed or timed out.",
                m.upstream_failures.load(Relaxed),
            )?;
            let (sum, count, buckets) = m.upstream_connect.snapshot();
            let mut h = e.encode_descriptor(
                "rtmpgate_upstream_connect_duration_seconds",
                "Time to connect to the upstream (successful connects).",
                None,
                MetricType::Histogram,
            )?;
            h.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            gauge(
                &mut e,
                "rtmpgate_upstream_up",
                "1 if the last upstream connect (or probe) succeeded, 0 if it failed.",
                as_i64(m.upstream_up.load(Relaxed)),
            )?;
            crate::upstream::health::encode_metrics(&mut e)?;
        }

        crate::cluster::metrics::encode_metrics(&mut e)?;
        if let Some(engine) = &st.engine {
            if engine.edge().is_some() {
                crate::engine::edge::encode_metrics(&mut e)?;
            }
            crate::engine::restream::encode_metrics(&mut e, Some(engine.api_pushes()))?;
            crate::engine::record::encode_metrics(&mut e)?;
            let streams = engine.hub().snapshot();
            let publishers = streams.iter().filter(|s| s.publishing).count();
            let players: usize = streams.iter().map(|s| s.players).sum();
            let pushes: usize = streams.iter().map(|s| s.pushes).sum();
            let gop: usize = streams.iter().map(|s| s.gop_bytes).sum();
            gauge(
                &mut e,
                "rtmpgate_engine_streams",
                "Engine streams with a publisher or players.",
                streams.len() as i64,
            )?;
            gauge(
                &mut e,
                "rtmpgate_engine_publishers",
                "Engine streams being published.",
                publishers as i64,
            )?;
            gauge(
                &mut e,
                "rtmpgate_engine_players",
                "Players subscribed to engine streams (restream pushes not included).",
                players as i64,
            )?;
            gauge(
                &mut e,
                "rtmpgate_engine_pushes",
                "Restream pushes ([[engine.push]] and the admin API's) reading engine streams.",
                pushes as i64,
            )?;
            gauge(
                &mut e,
                "rtmpgate_engine_gop_cache_bytes",
                "Bytes held by the engine's GOP caches.",
                gop as i64,
            )?;
            counter(
                &mut e,
                "rtmpgate_engine_player_skips",
                "Times a slow player fell behind and skipped to the next keyframe.",
                m.player_skips.load(Relaxed),
            )?;
        }

        let budget = crate::budget::global();
        gauge(
            &mut e,
            "rtmpgate_memory_budget_used_bytes",
            "Bytes charged to the memory budget for peers' data (limits.max_memory).",
            budget.used() as i64,
        )?;
        gauge(
            &mut e,
            "rtmpgate_memory_budget_limit_bytes",
            "The memory budget (limits.max_memory).",
            i64::try_from(budget.limit()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "rtmpgate_memory_budget_address_max_used_bytes",
            "Bytes charged by the address group holding the most (limits.max_memory_per_ip).",
            i64::try_from(crate::budget::largest_address_use()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "rtmpgate_memory_budget_address_limit_bytes",
            "Each address group's share of the memory budget (limits.max_memory_per_ip).",
            i64::try_from(crate::budget::per_address_limit()).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut e,
            "rtmpgate_memory_budget_refused",
            "Charges refused because the memory budget or an address's share of it was spent \
             (each closed a connection).",
            budget.refused(),
        )?;
        counter(
            &mut e,
            "rtmpgate_access_log_dropped",
            "Access log lines dropped because the writer fell behind.",
            crate::access::dropped(),
        )?;
        gauge(
            &mut e,
            "rtmpgate_draining",
            "1 while shutting down (no new clients).",
            i64::from(st.draining()),
        )?;

        let p = process();
        if let Some(rss) = p.rss_bytes {
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                as_i64(rss),
            )?;
        }
        if let Some(fds) = p.open_fds {
            gauge(
                &mut e,
                "process_open_fds",
                "Open file descriptors.",
                as_i64(fds),
            )?;
        }
        if let Some(cpu) = p.cpu_seconds {
            counter_f(
                &mut e,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                cpu,
            )?;
        }
        Ok(())
    }
}

/// Figures about this process from /proc (Linux); None where not available.
#[derive(Debug, Default)]
pub struct Process {
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// Reads /proc/self. Clock ticks are taken as 100 per second (USER_HZ on every Linux
/// architecture rtmpgate builds for).
pub fn process() -> Process {
    let rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after the last ')'.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        });
    Process {
        rss_bytes,
        open_fds,
        cpu_seconds,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::sessions::Sessions;

    #[test]
    fn scrape_has_the_interface_names() {
        let state = State::new(Sessions::new(), None, None, None);
        let text = encode(&registry(state)).unwrap();
        for needle in [
            "# TYPE rtmpgate_connections_accepted_total counter",
            "rtmpgate_sessions_open{transport=\"rtmpte\"} ",
            "rtmpgate_bytes_received_total{transport=\"rtmps\"} ",
            "rtmpgate_bytes_sent_total{transport=\"rtmpt\"} ",
            "rtmpgate_refused_total{reason=\"max_connections_per_ip\"} ",
            "rtmpgate_memory_budget_used_bytes ",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        if cfg!(target_os = "linux") {
            assert!(text.contains("process_resident_memory_bytes "), "{text}");
            assert!(text.contains("process_cpu_seconds_total "), "{text}");
        }
    }
}
