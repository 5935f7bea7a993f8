//! The registry's metrics, and the CA's gauges (read from the authority when
//! `/metrics` is scraped).

use super::{count, local_recorder, sample};
use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;

/// Proxies with an open discovery stream.
pub const PROXIES_CONNECTED: &str = "remora_control_proxies_connected";
/// The policy version in force.
pub const CONFIG_VERSION: &str = "remora_config_version";
/// The generation of the current snapshot (its version is `<policy>.<generation>`).
pub const SNAPSHOT_GENERATION: &str = "remora_control_snapshot_generation";
/// Snapshots sent to proxies.
pub const PUSHES_TOTAL: &str = "remora_control_pushes_total";
/// From a snapshot's publication (or the proxy's connection, if later) to the
/// proxy's ACK of it, in seconds.
pub const PUSH_LATENCY_SECONDS: &str = "remora_control_push_latency_seconds";
/// Snapshots refused by proxies.
pub const NACKS_TOTAL: &str = "remora_control_nacks_total";
/// 1 while an old root is being retired.
pub const CA_ROTATION_IN_PROGRESS: &str = "remora_control_ca_rotation_in_progress";
/// Roots in the trust bundle.
pub const CA_TRUSTED_ROOTS: &str = "remora_control_ca_trusted_roots";

/// Bucket bounds of [`PUSH_LATENCY_SECONDS`].
const PUSH_LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The registry's metrics (and the CA's gauges), on this control plane's own
/// recorder: see [`crate::metrics`].
pub struct RegistryMetrics {
    handle: PrometheusHandle,
    proxies_connected: Gauge,
    config_version: Gauge,
    snapshot_generation: Gauge,
    pushes: Counter,
    push_latency: Histogram,
    nacks: Counter,
    ca_rotation_in_progress: Gauge,
    ca_trusted_roots: Gauge,
}

impl Default for RegistryMetrics {
    fn default() -> RegistryMetrics {
        let recorder = local_recorder(&[(PUSH_LATENCY_SECONDS, &PUSH_LATENCY_BUCKETS)]);
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe_gauge!(
                PROXIES_CONNECTED,
                Unit::Count,
                "Proxies with an open discovery stream."
            );
            describe_gauge!(CONFIG_VERSION, Unit::Count, "The policy version in force.");
            describe_gauge!(
                SNAPSHOT_GENERATION,
                Unit::Count,
                "The generation of the current snapshot (version <policy>.<generation>)."
            );
            describe_counter!(PUSHES_TOTAL, Unit::Count, "Snapshots sent to proxies.");
            describe_histogram!(
                PUSH_LATENCY_SECONDS,
                Unit::Seconds,
                "Time from a snapshot's publication (or the proxy's connection, if later) \
                 to the proxy's ACK of it, in seconds."
            );
            describe_counter!(NACKS_TOTAL, Unit::Count, "Snapshots refused by proxies.");
            describe_gauge!(
                CA_ROTATION_IN_PROGRESS,
                Unit::Count,
                "1 while an old root is being retired."
            );
            describe_gauge!(CA_TRUSTED_ROOTS, Unit::Count, "Roots in the trust bundle.");
            RegistryMetrics {
                handle: handle.clone(),
                proxies_connected: gauge!(PROXIES_CONNECTED),
                config_version: gauge!(CONFIG_VERSION),
                snapshot_generation: gauge!(SNAPSHOT_GENERATION),
                pushes: counter!(PUSHES_TOTAL),
                push_latency: histogram!(PUSH_LATENCY_SECONDS),
                nacks: counter!(NACKS_TOTAL),
                ca_rotation_in_progress: gauge!(CA_ROTATION_IN_PROGRESS),
                ca_trusted_roots: gauge!(CA_TRUSTED_ROOTS),
            }
        })
    }
}

impl std::fmt::Debug for RegistryMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryMetrics").finish_non_exhaustive()
    }
}

impl RegistryMetrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The recorder's handle (rendering, upkeep).
    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }

    /// The value of `name{labels}` now (labels as rendered; "" for none).
    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        sample(&self.render(), name, labels)
    }

    /// Sets the CA's gauges (read from the authority when scraped).
    pub fn set_ca(&self, rotating: bool, trusted_roots: usize) {
        self.ca_rotation_in_progress
            .set(if rotating { 1.0 } else { 0.0 });
        self.ca_trusted_roots.set(count(trusted_roots));
    }

    /// Proxies with an open discovery stream now.
    pub fn set_proxies_connected(&self, n: usize) {
        self.proxies_connected.set(count(n));
    }

    /// A snapshot was sent.
    pub fn pushed(&self) {
        self.pushes.increment(1);
    }

    /// A snapshot was refused.
    pub fn nacked(&self) {
        self.nacks.increment(1);
    }

    /// A snapshot was acked `latency` after its push began.
    pub fn acked_after(&self, latency: Duration) {
        self.push_latency.record(latency.as_secs_f64());
    }

    /// The policy version in force and the current snapshot's generation.
    pub fn set_versions(&self, policy_version: u64, generation: u64) {
        self.config_version.set(count(policy_version));
        self.snapshot_generation.set(count(generation));
    }
}
