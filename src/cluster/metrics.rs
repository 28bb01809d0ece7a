//! The cluster link's forwarding, for `/metrics`: tunnel requests forwarded to their
//! session's node (per verb), how long each took end to end (the node lookup, the link
//! request and the owner's answer; an `/idle` includes the owner's hold of an idle poll),
//! link failures, and requests for sessions of a node nobody knows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::metrics::Histogram;

/// The verbs a forwarded request can carry, in label order.
const VERBS: [&str; 3] = ["send", "idle", "close"];

struct LinkMetrics {
    /// Set when a cluster starts: the metrics are listed only then.
    on: AtomicBool,
    forwarded: [AtomicU64; 3],
    duration: [Histogram; 3],
    failures: AtomicU64,
    unknown_node: AtomicU64,
}

static M: LinkMetrics = LinkMetrics {
    on: AtomicBool::new(false),
    forwarded: [const { AtomicU64::new(0) }; 3],
    duration: [const { Histogram::new() }; 3],
    failures: AtomicU64::new(0),
    unknown_node: AtomicU64::new(0),
};

/// The label index of a tunnel path's verb (`/send/ID/SEQ` -> send).
fn verb(path: &str) -> usize {
    let v = path.trim_start_matches('/').split('/').next().unwrap_or("");
    VERBS.iter().position(|x| *x == v).unwrap_or(2)
}

pub(super) fn started() {
    M.on.store(true, Relaxed);
}

/// A request forwarded and answered by its owner after `took`.
pub(super) fn forwarded(path: &str, took: Duration) {
    let i = verb(path);
    if let (Some(c), Some(h)) = (M.forwarded.get(i), M.duration.get(i)) {
        c.fetch_add(1, Relaxed);
        h.observe(took);
    }
}

/// The link to the owner failed (the client got 404).
pub(super) fn failed() {
    M.failures.fetch_add(1, Relaxed);
}

/// A request for a session of a node that is not known (404 at once).
pub(super) fn unknown_node() {
    M.unknown_node.fetch_add(1, Relaxed);
}

/// `rtmpgate_cluster_*`, when this process runs a cluster link.
pub fn encode_metrics(e: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
    use prometheus_client::encoding::NoLabelSet;
    use prometheus_client::metrics::MetricType;
    if !M.on.load(Relaxed) {
        return Ok(());
    }
    let mut d = e.encode_descriptor(
        "rtmpgate_cluster_forwarded_requests",
        "Tunnel requests forwarded over the link to the node owning their session, answered.",
        None,
        MetricType::Counter,
    )?;
    for (v, c) in VERBS.iter().zip(&M.forwarded) {
        d.encode_family(&[("verb", *v)])?
            .encode_counter::<NoLabelSet, _, u64>(&c.load(Relaxed), None)?;
    }
    let mut d = e.encode_descriptor(
        "rtmpgate_cluster_forward_duration_seconds",
        "Time from a tunnel request's arrival to its owner's answer over the link (an idle poll includes the owner's hold).",
        None,
        MetricType::Histogram,
    )?;
    for (v, h) in VERBS.iter().zip(&M.duration) {
        let (sum, count, buckets) = h.snapshot();
        d.encode_family(&[("verb", *v)])?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    for (name, help, v) in [
        (
            "rtmpgate_cluster_forward_failures",
            "Forwarded tunnel requests whose link to the owning node failed (answered 404).",
            &M.failures,
        ),
        (
            "rtmpgate_cluster_unknown_node_requests",
            "Tunnel requests for a session of a node no peer answers for (answered 404 at once).",
            &M.unknown_node,
        ),
    ] {
        e.encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(verb("/send/n1-abc/3"), 0);
        assert_eq!(verb("/idle/n1-abc/4"), 1);
        assert_eq!(verb("/close/n1-abc/5"), 2);
        assert_eq!(verb("/other"), 2);
    }
}
