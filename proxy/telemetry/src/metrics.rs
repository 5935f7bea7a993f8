//! Prometheus metrics: the recorder behind the `metrics` facade, the metric names and
//! their descriptions, and the process-wide gauges. Per-request handles live in
//! [`crate::request_metrics`], [`crate::tcp_metrics`] and [`crate::service_metrics`].
//!
//! Install the recorder (once per process, before any handle is created) and serve
//! [`Metrics::render`] on `/metrics` (port 15020 for the proxy).

use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Requests by `direction`, `service`, `route`, `status_code`, `peer_identity`
/// (and `grpc_status` for gRPC).
pub const REQUESTS_TOTAL: &str = "remora_requests_total";
/// Request duration histogram by `direction`, `service`, `route`, `peer_identity`.
pub const REQUEST_DURATION_SECONDS: &str = "remora_request_duration_seconds";
/// Open TCP connections by `direction`, `service`.
pub const TCP_CONNECTIONS_OPEN: &str = "remora_tcp_connections_open";
/// TCP connections opened by `direction`, `service`.
pub const TCP_CONNECTIONS_TOTAL: &str = "remora_tcp_connections_total";
/// TCP bytes by `direction`, `service`, `flow` (`sent` | `received`).
pub const TCP_BYTES_TOTAL: &str = "remora_tcp_bytes_total";
/// Retries by `service`, `route`, `reason`.
pub const RETRIES_TOTAL: &str = "remora_retries_total";
/// Circuit breaker state (1 open, 0 closed) by `service`, `endpoint`.
pub const CIRCUIT_BREAKER_OPEN: &str = "remora_circuit_breaker_open";
/// Requests refused by a rate limit, by `service`.
pub const RATE_LIMITED_TOTAL: &str = "remora_rate_limited_total";
/// End users' tokens checked under a RequestAuthentication, by `service`,
/// `result` (`verified`: signature checked; `cached`: a token verified
/// earlier; `refused`) and `reason` (why refused, else empty).
pub const JWT_CHECKS_TOTAL: &str = "remora_jwt_checks_total";
/// Requests refused because of overload (concurrency limit, bulkhead), by `service`.
pub const OVERLOADED_TOTAL: &str = "remora_overloaded_total";
/// Expiry of the workload certificate, as a Unix timestamp.
pub const CERT_EXPIRY_TIMESTAMP_SECONDS: &str = "remora_cert_expiry_timestamp_seconds";
/// 1 while the control-plane stream is up, else 0.
pub const CONTROL_PLANE_CONNECTED: &str = "remora_control_plane_connected";
/// Version of the configuration snapshot in use.
pub const CONFIG_VERSION: &str = "remora_config_version";
/// Spans dropped before export, by `reason` (`queue_full` | `export_failed`).
pub const SPANS_DROPPED_TOTAL: &str = "remora_spans_dropped_total";
/// Spans the collector accepted.
pub const SPANS_EXPORTED_TOTAL: &str = "remora_spans_exported_total";
/// Access-log lines dropped because the writer fell behind.
pub const ACCESS_LOGS_DROPPED_TOTAL: &str = "remora_access_logs_dropped_total";

/// Histogram buckets of [`REQUEST_DURATION_SECONDS`]: 0.5 ms to 30 s.
pub const DURATION_BUCKETS_SECONDS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    20.0, 30.0,
];

/// How often histogram samples are folded into their buckets between scrapes, so
/// memory stays bounded when nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why metrics could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus recorder could not be built or set as the global recorder
    /// (it can be installed only once per process).
    #[error("installing the Prometheus recorder: {0}")]
    Build(#[from] BuildError),
    /// The upkeep thread could not be started.
    #[error("starting the metrics upkeep thread: {0}")]
    Upkeep(#[from] std::io::Error),
}

/// The installed recorder's handle: renders the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the Prometheus recorder as the process's global `metrics` recorder,
    /// describes every Remora metric and starts the upkeep thread. Call it once, before
    /// creating any metric handle: handles created earlier record nothing.
    pub fn install() -> Result<Metrics, MetricsError> {
        let recorder = builder()?.build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| MetricsError::Build(BuildError::FailedToSetGlobalRecorder(e)))?;
        describe();
        let upkeep = handle.clone();
        thread::Builder::new()
            .name("remora-metrics-upkeep".into())
            .spawn(move || loop {
                thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            })?;
        Ok(Metrics { handle })
    }

    /// A recorder that is not installed, and its handle: for tests, which scope it
    /// with `metrics::with_local_recorder` (create the handles inside the scope; they
    /// keep recording into this recorder afterwards), then call [`describe`] inside it.
    pub fn new_local() -> Result<(PrometheusRecorder, Metrics), MetricsError> {
        let recorder = builder()?.build_recorder();
        let handle = recorder.handle();
        Ok((recorder, Metrics { handle }))
    }

    /// The metrics in Prometheus text exposition format, for `/metrics`
    /// (`Content-Type: text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full(REQUEST_DURATION_SECONDS.to_string()),
        &DURATION_BUCKETS_SECONDS,
    )
}

/// Registers HELP text and units of every Remora metric with the current recorder.
/// [`Metrics::install`] calls it.
pub fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests handled, by direction, service, route, status code and peer identity."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from the request's arrival to the end of its response, in seconds."
    );
    describe_gauge!(
        TCP_CONNECTIONS_OPEN,
        Unit::Count,
        "TCP connections open now."
    );
    describe_counter!(
        TCP_CONNECTIONS_TOTAL,
        Unit::Count,
        "TCP connections opened."
    );
    describe_counter!(
        TCP_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes proxied over TCP connections, by flow (sent or received)."
    );
    describe_counter!(
        RETRIES_TOTAL,
        Unit::Count,
        "Request retries, by service, route and reason."
    );
    describe_gauge!(
        CIRCUIT_BREAKER_OPEN,
        Unit::Count,
        "Whether an endpoint's circuit breaker is open (1) or closed (0)."
    );
    describe_counter!(
        JWT_CHECKS_TOTAL,
        Unit::Count,
        "End users' tokens checked under a RequestAuthentication, by result."
    );
    describe_counter!(
        RATE_LIMITED_TOTAL,
        Unit::Count,
        "Requests refused by a rate limit."
    );
    describe_counter!(
        OVERLOADED_TOTAL,
        Unit::Count,
        "Requests refused because a concurrency limit or bulkhead was full."
    );
    describe_gauge!(
        CERT_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Expiry of the workload certificate, as seconds since the Unix epoch."
    );
    describe_gauge!(
        CONTROL_PLANE_CONNECTED,
        Unit::Count,
        "Whether the proxy's stream to the control plane is up (1) or not (0)."
    );
    describe_gauge!(
        CONFIG_VERSION,
        Unit::Count,
        "Version of the configuration snapshot in use."
    );
    describe_counter!(
        SPANS_DROPPED_TOTAL,
        Unit::Count,
        "Trace spans dropped before reaching the collector, by reason."
    );
    describe_counter!(
        SPANS_EXPORTED_TOTAL,
        Unit::Count,
        "Trace spans the OTLP collector accepted."
    );
    describe_counter!(
        ACCESS_LOGS_DROPPED_TOTAL,
        Unit::Count,
        "Access-log lines dropped because the writer fell behind."
    );
}

/// Sets [`CERT_EXPIRY_TIMESTAMP_SECONDS`] to the certificate's `not_after`.
pub fn set_cert_expiry(not_after: SystemTime) {
    let secs = not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    gauge!(CERT_EXPIRY_TIMESTAMP_SECONDS).set(secs);
}

/// Sets [`CONTROL_PLANE_CONNECTED`].
pub fn set_control_plane_connected(connected: bool) {
    gauge!(CONTROL_PLANE_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

/// Sets [`CONFIG_VERSION`].
pub fn set_config_version(version: u64) {
    // Exact up to 2^53, far beyond any snapshot count.
    #[allow(clippy::cast_precision_loss)]
    gauge!(CONFIG_VERSION).set(version as f64);
}
