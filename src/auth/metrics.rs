//! `/metrics` series of authorization: `rtmpgate_auth_denied_total{action,reason}` (every
//! action and reason, zeros included, so a dashboard's rate() has a series from the
//! start) and `rtmpgate_auth_allowed_total{action}`.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::{allowed_count, denied_count, Action, DenyReason};

pub fn encode(e: &mut DescriptorEncoder) -> fmt::Result {
    let mut m = e.encode_descriptor(
        "rtmpgate_auth_denied",
        "Connects, publishes and plays denied by [auth], by action and reason.",
        None,
        MetricType::Counter,
    )?;
    for action in Action::DECIDED {
        for reason in DenyReason::ALL {
            let labels = [("action", action.as_str()), ("reason", reason.as_str())];
            let v = denied_count(action, reason);
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
        }
    }
    let mut m = e.encode_descriptor(
        "rtmpgate_auth_allowed",
        "Connects, publishes and plays [auth] allowed (renamed ones included; the relay denies renames), by action.",
        None,
        MetricType::Counter,
    )?;
    for action in Action::DECIDED {
        let labels = [("action", action.as_str())];
        let v = allowed_count(action);
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
    }
    Ok(())
}
