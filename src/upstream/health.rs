//! Active health checks: every `health_interval_secs`, each backend of a group with
//! `health_check = "tcp"` or `"rtmp"` gets a TCP (and TLS) connect, plus an RTMP handshake
//! for `rtmp`; `health_fall` failures in a row mark it down, `health_rise` successes up.
//! Transitions are logged; the state is in `rtmpgate_upstream_backend_up`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::pool::{Backend, Pools};
use super::relay::{backend_handshake, BackendHandshake};
use super::settings::{HealthKind, HealthSettings};

/// Starts one task per checked backend; each ends once `pools` is dropped (a reload
/// replaced the relay and its last client is gone).
pub fn spawn(pools: &Arc<Pools>, health: HealthSettings, timeout: Duration) {
    for group in &pools.groups {
        if group.health == HealthKind::Off {
            continue;
        }
        for backend in &group.backends {
            let weak = Arc::downgrade(pools);
            let backend = Arc::downgrade(backend);
            tokio::spawn(run(weak, backend, group.health, health, timeout));
        }
    }
}

async fn run(
    pools: Weak<Pools>,
    backend: Weak<Backend>,
    kind: HealthKind,
    health: HealthSettings,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(_pools), Some(backend)) = (pools.upgrade(), backend.upgrade()) else {
            return;
        };
        let r = tokio::time::timeout(timeout.min(health.interval), check(&backend, kind)).await;
        let r = r.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        match r {
            Ok(()) => backend.checked(true, health.rise, health.fall, ""),
            Err(e) => backend.checked(false, health.rise, health.fall, &e),
        }
    }
}

/// One check of one backend.
async fn check(backend: &Backend, kind: HealthKind) -> Result<(), String> {
    let c = &backend.connector;
    // The probe's own addresses stand in for a client's in a PROXY header.
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut leg = c.connect(local, local).await.map_err(|e| e.to_string())?;
    if kind == HealthKind::Rtmp {
        backend_handshake(&mut leg, &c.url, BackendHandshake { digest: false })
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = leg.shutdown().await;
    Ok(())
}

/// `rtmpgate_upstream_backend_up{upstream, backend}` and
/// `rtmpgate_upstream_backend_clients{upstream, backend}` for the running relay.
pub fn encode_metrics(e: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
    use prometheus_client::metrics::MetricType;
    let backends = super::pool::snapshot();
    let mut m = e.encode_descriptor(
        "rtmpgate_upstream_backend_up",
        "1 while a backend is marked up (health checks, clients' connects), 0 while down.",
        None,
        MetricType::Gauge,
    )?;
    for (group, url, up, _) in &backends {
        let labels = [("upstream", group.as_str()), ("backend", url.as_str())];
        m.encode_family(&labels)?.encode_gauge(&i64::from(*up))?;
    }
    let mut m = e.encode_descriptor(
        "rtmpgate_upstream_backend_clients",
        "Clients relayed to a backend right now.",
        None,
        MetricType::Gauge,
    )?;
    for (group, url, _, n) in &backends {
        let labels = [("upstream", group.as_str()), ("backend", url.as_str())];
        let n = i64::try_from(*n).unwrap_or(i64::MAX);
        m.encode_family(&labels)?.encode_gauge(&n)?;
    }
    Ok(())
}
