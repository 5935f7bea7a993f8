//! The control plane's metrics. Each part records on a recorder of its own
//! ([`local_recorder`]), never the process-global one, so that several
//! control planes in one process (tests) count apart; their metric names are
//! disjoint, so `/metrics` concatenates their texts into one exposition
//! ([`crate::server::http::metrics`]).
//!
//! - [`registry`]: proxies, pushes, ACK latency, NACKs, versions, the CA's
//!   gauges;
//! - [`certs`]: certificates issued, renewed and refused.
//!
//! The listeners' connection slots render their own counters
//! ([`crate::server::conn_limit`]).

pub mod certs;
pub mod registry;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

/// A Prometheus recorder that is not installed globally: handles are created
/// from it with [`::metrics::with_local_recorder`] and keep recording into it.
/// `histograms` get these bucket bounds (seconds); other histograms would be
/// rendered as summaries.
pub fn local_recorder(histograms: &[(&str, &[f64])]) -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
            .expect("histogram buckets are not empty");
    }
    builder.build_recorder()
}

/// The value of the sample `name{labels}` (labels exactly as rendered, such as
/// `reason="csr_invalid"`, or "" for none) in a Prometheus text exposition.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|line| line.strip_prefix(wanted.as_str()))
        .and_then(|value| value.trim().parse().ok())
}

/// A count as a gauge value (exact far beyond any count here).
#[allow(clippy::cast_precision_loss)]
fn count(n: impl TryInto<u64>) -> f64 {
    n.try_into().unwrap_or(u64::MAX) as f64
}
