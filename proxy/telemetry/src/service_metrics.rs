//! Pre-resolved per-service policy metrics: rate-limited and overloaded answers, and
//! circuit breaker state per endpoint.

use std::net::SocketAddr;

use metrics::{counter, gauge, Counter, Gauge, Label};

use crate::metrics::{
    CIRCUIT_BREAKER_OPEN, JWT_CHECKS_TOTAL, OVERLOADED_TOTAL, RATE_LIMITED_TOTAL,
};

/// Counters of one destination service's refusals. Cheap to clone.
#[derive(Clone)]
pub struct ServiceMetrics {
    service: String,
    rate_limited: Counter,
    overloaded: Counter,
    jwt_verified: Counter,
    jwt_cached: Counter,
}

impl ServiceMetrics {
    /// Handles for `service`. Create after [`crate::Metrics::install`].
    pub fn new(service: &str) -> Self {
        let labels = [Label::new("service", service.to_owned())];
        ServiceMetrics {
            service: service.to_owned(),
            rate_limited: counter!(RATE_LIMITED_TOTAL, labels.iter()),
            overloaded: counter!(OVERLOADED_TOTAL, labels.iter()),
            jwt_verified: jwt(service, "verified", ""),
            jwt_cached: jwt(service, "cached", ""),
        }
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.increment(1);
    }

    /// Counts an end user's token whose signature was checked.
    pub fn jwt_verified(&self) {
        self.jwt_verified.increment(1);
    }

    /// Counts an end user's token found among those verified earlier.
    pub fn jwt_cached(&self) {
        self.jwt_cached.increment(1);
    }

    /// Counts a refused token (`reason`: a short fixed label).
    pub fn jwt_refused(&self, reason: &'static str) {
        jwt(&self.service, "refused", reason).increment(1);
    }

    /// Counts a request refused because a concurrency limit or bulkhead was full.
    pub fn overloaded(&self) {
        self.overloaded.increment(1);
    }

    /// The circuit-breaker gauge of one endpoint of this service: create it with the
    /// breaker and set it on every state change.
    pub fn circuit_breaker(&self, endpoint: SocketAddr) -> CircuitBreakerGauge {
        let labels = [
            Label::new("service", self.service.clone()),
            Label::new("endpoint", endpoint.to_string()),
        ];
        CircuitBreakerGauge {
            gauge: gauge!(CIRCUIT_BREAKER_OPEN, labels.iter()),
        }
    }
}

/// `remora_circuit_breaker_open{service,endpoint}`.
#[derive(Clone)]
pub struct CircuitBreakerGauge {
    gauge: Gauge,
}

impl CircuitBreakerGauge {
    /// Records the breaker as open (1; half-open counts as open) or closed (0).
    pub fn set_open(&self, open: bool) {
        self.gauge.set(if open { 1.0 } else { 0.0 });
    }
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CircuitBreakerGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerGauge")
            .finish_non_exhaustive()
    }
}

fn jwt(service: &str, result: &'static str, reason: &'static str) -> Counter {
    let labels = [
        Label::new("service", service.to_owned()),
        Label::new("result", result),
        Label::new("reason", reason),
    ];
    counter!(JWT_CHECKS_TOTAL, labels.iter())
}
