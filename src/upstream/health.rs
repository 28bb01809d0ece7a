//! Active health checks: every `health_interval_secs`, each backend of a group with
//! `health_check = "tcp"` or `"rtmp"` gets a TCP (and TLS) connect; `rtmp` goes on with an
//! RTMP handshake and a `connect`, and passes only on the backend's `_result` (a listener
//! that accepts and never answers, or answers anything but RTMP, fails it). `health_fall`
//! failures in a row mark a backend down, `health_rise` successes up. Transitions are
//! logged and counted; the state is in `rtmpgate_upstream_backend_up` and
//! `rtmpgate_upstream_backend_transitions_total`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pool::{Backend, Pools};
use super::relay::{backend_handshake, BackendHandshake};
use super::settings::{HealthKind, HealthSettings};
use super::Leg;
use crate::budget::Charge;
use crate::limits::Limits;
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::chunk::ChunkDecoder;
use crate::rtmp::session::client::Call;
use crate::rtmp::session::{ClientConfig, ClientEvent, ClientSession};

/// The app an `rtmp` check connects to when neither the backend's URL nor the group names
/// one (nginx-rtmp closes a connect to an app it does not serve, so it must exist there).
pub const DEFAULT_PROBE_APP: &str = "live";

/// What one backend's checks need.
struct Probe {
    kind: HealthKind,
    /// The app of the `rtmp` check's connect.
    app: String,
    limits: Arc<Limits>,
}

/// Starts one task per checked backend; each ends once `pools` is no longer the running
/// relay's (a reload replaced it) or is dropped.
pub fn spawn(pools: &Arc<Pools>, health: HealthSettings, timeout: Duration, limits: &Limits) {
    let limits = Arc::new(limits.clone());
    for group in &pools.groups {
        if group.health == HealthKind::Off {
            continue;
        }
        for backend in &group.backends {
            let app = Some(backend.connector.url.app.as_str())
                .filter(|a| !a.is_empty())
                .or(group.literal_app())
                .unwrap_or(DEFAULT_PROBE_APP)
                .to_string();
            let probe = Probe {
                kind: group.health,
                app,
                limits: limits.clone(),
            };
            let weak = Arc::downgrade(pools);
            let backend = Arc::downgrade(backend);
            tokio::spawn(run(weak, backend, probe, health, timeout));
        }
    }
}

async fn run(
    pools: Weak<Pools>,
    backend: Weak<Backend>,
    probe: Probe,
    health: HealthSettings,
    timeout: Duration,
) {
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(pools), Some(backend)) = (pools.upgrade(), backend.upgrade()) else {
            return;
        };
        // A reload replaced these pools: the new ones check the backends they kept (their
        // state is shared, so checking here too would count each result twice).
        if !super::pool::is_current(&pools) {
            return;
        }
        drop(pools);
        let r = tokio::time::timeout(timeout.min(health.interval), check(&backend, &probe)).await;
        let r = r.unwrap_or_else(|_| {
            Err(format!(
                "no answer within {:?}",
                timeout.min(health.interval)
            ))
        });
        match r {
            Ok(()) => backend.checked(true, health.rise, health.fall, ""),
            Err(e) => backend.checked(false, health.rise, health.fall, &e),
        }
    }
}

/// One check of one backend.
async fn check(backend: &Backend, probe: &Probe) -> Result<(), String> {
    let c = &backend.connector;
    // The probe's own addresses stand in for a client's in a PROXY header.
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut leg = c.connect(local, local).await.map_err(|e| e.to_string())?;
    if probe.kind == HealthKind::Rtmp {
        backend_handshake(&mut leg, &c.url, BackendHandshake { digest: false })
            .await
            .map_err(|e| e.to_string())?;
        rtmp_connect(&mut leg, backend, probe).await?;
    }
    let _ = leg.shutdown().await;
    Ok(())
}

/// Sends `connect` to the probe's app and waits for its answer: `_result` passes; `_error`,
/// a close, or bytes that are not an RTMP chunk stream fail. What the backend may send is
/// bounded by `limits.max_connect_bytes` (as a client's bytes before its connect are) and
/// charged to the memory budget.
async fn rtmp_connect(leg: &mut Leg, backend: &Backend, probe: &Probe) -> Result<(), String> {
    let limits = &*probe.limits;
    let mut tc_url = backend.connector.url.clone();
    tc_url.app = probe.app.clone();
    tc_url.stream = String::new();
    let decoder = ChunkDecoder::with_charge(limits, Charge::global());
    let cfg = ClientConfig {
        amf: limits.into(),
        ..ClientConfig::default()
    };
    let mut session = ClientSession::new(cfg, decoder);
    session
        .connect(&probe.app, &tc_url.to_string(), Vec::new())
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut charge = Charge::global();
    let mut read = 0usize;
    loop {
        if let Some(out) = session.take_output() {
            leg.write_all(&out)
                .await
                .map_err(|e| format!("sending connect: {e}"))?;
            leg.flush()
                .await
                .map_err(|e| format!("sending connect: {e}"))?;
        }
        while let Some(event) = session
            .poll(&mut buf)
            .map_err(|e| format!("not an RTMP answer to connect: {e}"))?
        {
            match event {
                ClientEvent::Reply {
                    call: Call::Connect,
                    ok: true,
                    ..
                } => return Ok(()),
                ClientEvent::Reply {
                    call: Call::Connect,
                    ok: false,
                    values,
                    ..
                } => {
                    let field = |k: &str| {
                        values
                            .iter()
                            .find_map(|v| v.get(k).and_then(Amf0Value::as_str))
                            .map(|s| s.chars().take(64).collect::<String>())
                            .unwrap_or_default()
                    };
                    return Err(format!(
                        "connect to app '{}' answered _error {} {} (the rtmp check connects to the app in the backend's URL, rtmp://HOST:PORT/APP, else the group's first app)",
                        probe.app,
                        field("code"),
                        field("description")
                    ));
                }
                _ => {}
            }
        }
        let room = limits.max_connect_bytes.saturating_sub(read).min(4096);
        if room == 0 {
            return Err(format!(
                "{read} bytes without an answer to connect (limits.max_connect_bytes)"
            ));
        }
        charge
            .try_grow(room)
            .map_err(|e| format!("over the memory budget: {e}"))?;
        buf.reserve(room);
        let n = leg
            .read_buf(&mut (&mut buf).limit(room))
            .await
            .map_err(|e| format!("reading the answer to connect: {e}"))?;
        charge.shrink(room.saturating_sub(n));
        if n == 0 {
            return Err(format!(
                "closed without answering connect to app '{}' (nginx-rtmp closes a connect to an app it does not serve; name one it serves in the backend's URL, rtmp://HOST:PORT/APP)",
                probe.app
            ));
        }
        read = read.saturating_add(n);
    }
}

/// `rtmpgate_upstream_backend_up{upstream, backend}`,
/// `rtmpgate_upstream_backend_clients{upstream, backend}` and
/// `rtmpgate_upstream_backend_transitions_total{upstream, backend, to}` for the running relay.
pub fn encode_metrics(e: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
    use prometheus_client::encoding::NoLabelSet;
    use prometheus_client::metrics::MetricType;
    let backends = super::pool::snapshot();
    let mut m = e.encode_descriptor(
        "rtmpgate_upstream_backend_up",
        "1 while a backend is marked up (health checks, clients' connects), 0 while down.",
        None,
        MetricType::Gauge,
    )?;
    for b in &backends {
        let labels = [("upstream", b.group.as_str()), ("backend", b.url.as_str())];
        m.encode_family(&labels)?.encode_gauge(&i64::from(b.up))?;
    }
    let mut m = e.encode_descriptor(
        "rtmpgate_upstream_backend_clients",
        "Clients relayed to a backend right now.",
        None,
        MetricType::Gauge,
    )?;
    for b in &backends {
        let labels = [("upstream", b.group.as_str()), ("backend", b.url.as_str())];
        let n = i64::try_from(b.active).unwrap_or(i64::MAX);
        m.encode_family(&labels)?.encode_gauge(&n)?;
    }
    let mut m = e.encode_descriptor(
        "rtmpgate_upstream_backend_transitions",
        "Times a backend was marked down (to=\"down\") or up again (to=\"up\"), by health checks or clients' connects; kept across reloads that keep the backend.",
        None,
        MetricType::Counter,
    )?;
    for b in &backends {
        for (to, n) in [("down", b.went_down), ("up", b.went_up)] {
            let labels = [
                ("upstream", b.group.as_str()),
                ("backend", b.url.as_str()),
                ("to", to),
            ];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&n, None)?;
        }
    }
    Ok(())
}
