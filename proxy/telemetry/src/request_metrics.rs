//! Pre-resolved request metrics for one route as seen from one direction and peer:
//! created once (per route and connection), then each request costs a few atomic
//! operations and no registry lookup or allocation.

use std::time::Duration;

use metrics::{counter, histogram, Counter, Histogram, Label};

use crate::label_cache::CounterCache;
use crate::metrics::{REQUESTS_TOTAL, REQUEST_DURATION_SECONDS, RETRIES_TOTAL};

/// Distinct (status, gRPC status) pairs cached per handle.
const STATUS_SLOTS: usize = 16;
/// Distinct retry reasons cached per handle.
const REASON_SLOTS: usize = 8;

/// `direction` label value for requests the proxy received for its own workload.
pub const INBOUND: &str = "inbound";
/// `direction` label value for requests the workload sent out through the proxy.
pub const OUTBOUND: &str = "outbound";

/// Request counters and the duration histogram of one
/// (direction, service, route, peer identity), plus that route's retry counters.
///
/// Metric handles resolve against the recorder installed when this is created:
/// create it after [`crate::Metrics::install`].
pub struct RequestMetrics {
    /// direction, service, route (+ status labels) + peer_identity.
    labels: [Label; 4],
    duration: Histogram,
    requests: CounterCache<(u16, Option<u16>), STATUS_SLOTS>,
    retries: CounterCache<&'static str, REASON_SLOTS>,
}

impl RequestMetrics {
    /// Handles for `direction` ([`INBOUND`] or [`OUTBOUND`]), the destination
    /// `service`, the matched route's NAME (never a raw path) and the peer's identity
    /// (the mTLS identity of the client inbound, of the server outbound; empty when
    /// unknown).
    pub fn new(direction: &'static str, service: &str, route: &str, peer: &str) -> Self {
        let labels = [
            Label::from_static_parts("direction", direction),
            Label::new("service", service.to_owned()),
            Label::new("route", route.to_owned()),
            Label::new("peer_identity", peer.to_owned()),
        ];
        let duration = histogram!(REQUEST_DURATION_SECONDS, labels.iter());
        RequestMetrics {
            labels,
            duration,
            requests: CounterCache::new(),
            retries: CounterCache::new(),
        }
    }

    /// Counts one finished request with its HTTP status (and gRPC status, which adds a
    /// `grpc_status` label) and records its duration.
    pub fn record(&self, status: u16, grpc_status: Option<u16>, duration: Duration) {
        self.duration.record(duration.as_secs_f64());
        self.requests
            .increment((status, grpc_status), 1, |key| self.register_request(key));
    }

    /// Counts one retry of a request on this route; `reason` is a fixed word such as
    /// `5xx`, `reset`, `connect`, `timeout`.
    pub fn retry(&self, reason: &'static str) {
        self.retries
            .increment(reason, 1, |reason| self.register_retry(reason));
    }

    fn register_request(&self, (status, grpc_status): (u16, Option<u16>)) -> Counter {
        let [direction, service, route, peer] = &self.labels;
        let mut labels = Vec::with_capacity(6);
        labels.extend([direction.clone(), service.clone(), route.clone()]);
        labels.push(Label::new("status_code", status.to_string()));
        if let Some(grpc) = grpc_status {
            labels.push(Label::new("grpc_status", grpc.to_string()));
        }
        labels.push(peer.clone());
        counter!(REQUESTS_TOTAL, labels)
    }

    fn register_retry(&self, reason: &'static str) -> Counter {
        let [_, service, route, _] = &self.labels;
        let labels = vec![
            service.clone(),
            route.clone(),
            Label::from_static_parts("reason", reason),
        ];
        counter!(RETRIES_TOTAL, labels)
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}
