//! The run-time side of a DestinationPolicy (and of each route's retry and
//! fault settings): the balancer, the retry budget, the bulkhead and each
//! endpoint's circuit breaker.
//!
//! State that must outlive a snapshot (a breaker that is open, a budget's
//! window, the bulkhead's in-flight count) is kept in [`Registry`] and handed
//! to each new snapshot as long as the policy that shaped it is unchanged, so
//! an endpoint joining elsewhere does not reset a breaker here.

use parking_lot::Mutex;
use remora_proto::policy::{DestinationPolicySpec, FaultInjection, LoadBalancer, RetryPolicy};
use remora_resilience::{
    Backoff, Balancer, Breaker, BreakerConfig, Bulkhead, BulkheadConfig, Fault, FaultAbort,
    FaultDelay, RetryBudget, RetryOn,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A destination service's policy, compiled.
#[derive(Debug)]
pub struct Destination {
    pub balancer: Balancer,
    pub budget: Option<RetryBudget>,
    pub bulkhead: Option<Bulkhead>,
    pub breaker: Option<BreakerConfig>,
    /// The breaker is the default outlier detection, not a policy's: it
    /// counts only gateway errors, and never ejects every endpoint.
    pub ejection_only: bool,
    pub connect_timeout: Option<Duration>,
    /// How long a request may wait for an in-flight slot before `overloaded`.
    pub queue_timeout: Duration,
    pub metrics: remora_telemetry::ServiceMetrics,
}

impl Destination {
    fn compile(fqdn: &str, p: Option<&DestinationPolicySpec>) -> Result<Destination, String> {
        let metrics = remora_telemetry::ServiceMetrics::new(fqdn);
        let Some(p) = p else {
            return Ok(Destination {
                balancer: Balancer::default(),
                budget: default_budget(),
                bulkhead: None,
                breaker: Some(default_ejection()),
                ejection_only: true,
                connect_timeout: None,
                queue_timeout: Duration::from_secs(1),
                metrics,
            });
        };
        let balancer = match p.load_balancer {
            LoadBalancer::P2cEwma => Balancer::from_name("p2c-ewma"),
            LoadBalancer::RoundRobin => Balancer::from_name("round-robin"),
            LoadBalancer::LeastRequest => Balancer::from_name("least-request"),
        }
        .unwrap_or_default();
        let budget = match &p.retry_budget {
            Some(b) => Some(
                RetryBudget::new(b.ratio, b.min_per_second)
                    .map_err(|e| format!("{fqdn}: retryBudget: {e}"))?,
            ),
            None => default_budget(),
        };
        let bulkhead = match &p.limits {
            Some(l) => {
                let d = BulkheadConfig::default();
                Some(
                    Bulkhead::new(&BulkheadConfig {
                        max_requests: l.max_requests.unwrap_or(d.max_requests),
                        max_pending: l.max_pending_requests.unwrap_or(d.max_pending),
                        max_connections: l.max_connections.unwrap_or(d.max_connections),
                        critical_reserve: l.critical_reserve.unwrap_or(0.0),
                    })
                    .map_err(|e| format!("{fqdn}: limits: {e}"))?,
                )
            }
            None => None,
        };
        let breaker = match &p.circuit_breaker {
            Some(cb) => {
                let d = BreakerConfig::default();
                let cfg = BreakerConfig {
                    consecutive_failures: cb.consecutive_failures,
                    failure_rate: cb.failure_rate,
                    min_requests: cb.min_requests.unwrap_or(d.min_requests),
                    window: cb.window.unwrap_or(d.window),
                    open_for: cb.open_for,
                    max_open_for: cb.max_open_for.unwrap_or(cb.open_for.max(d.max_open_for)),
                    half_open_requests: cb.half_open_requests,
                };
                // Validate now, so a bad policy is NACKed rather than ignored.
                Breaker::new(&cfg).map_err(|e| format!("{fqdn}: circuitBreaker: {e}"))?;
                Some(cfg)
            }
            None => None,
        };
        let ejection_only = breaker.is_none();
        Ok(Destination {
            balancer,
            budget,
            bulkhead,
            breaker: breaker.or_else(|| Some(default_ejection())),
            ejection_only,
            connect_timeout: p.connect_timeout,
            queue_timeout: p.connect_timeout.unwrap_or(Duration::from_secs(1)),
            metrics,
        })
    }
}

/// Outlier detection every destination has unless its policy sets a
/// circuitBreaker: five gateway errors in a row eject an endpoint for 5 s,
/// doubling while it keeps failing, up to 5 min (Envoy's and Linkerd's
/// defaults are of this kind).
fn default_ejection() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(5),
        open_for: Duration::from_secs(5),
        ..BreakerConfig::default()
    }
}

/// Linkerd's default: retries may add 20% to the load, plus 10 per second.
fn default_budget() -> Option<RetryBudget> {
    RetryBudget::new(0.2, 10).ok()
}

type PolicyAndDestination = (Option<DestinationPolicySpec>, Arc<Destination>);

/// Keeps destination and breaker state across snapshots.
#[derive(Default)]
pub struct Registry {
    destinations: Mutex<HashMap<String, PolicyAndDestination>>,
    breakers: Mutex<HashMap<(std::net::SocketAddr, String), (BreakerConfig, Breaker)>>,
    rate_limits: Mutex<
        Vec<(
            remora_proto::policy::RateLimit,
            Arc<crate::mesh::authz::RateLimiter>,
        )>,
    >,
}

impl Registry {
    /// The destination for `fqdn` under policy `p`, reused while `p` is unchanged.
    pub fn destination(
        &self,
        fqdn: &str,
        p: Option<&DestinationPolicySpec>,
    ) -> Result<Arc<Destination>, String> {
        let mut map = self.destinations.lock();
        if let Some((old, d)) = map.get(fqdn) {
            if old.as_ref() == p {
                return Ok(d.clone());
            }
        }
        let d = Arc::new(Destination::compile(fqdn, p)?);
        map.insert(fqdn.to_string(), (p.cloned(), d.clone()));
        Ok(d)
    }

    /// The breaker of one endpoint of `fqdn`, reused while its config is unchanged.
    pub fn breaker(
        &self,
        addr: std::net::SocketAddr,
        fqdn: &str,
        cfg: &BreakerConfig,
    ) -> Option<Breaker> {
        let mut map = self.breakers.lock();
        let key = (addr, fqdn.to_string());
        if let Some((old, b)) = map.get(&key) {
            if old == cfg {
                return Some(b.clone());
            }
        }
        let b = Breaker::new(cfg).ok()?;
        map.insert(key, (cfg.clone(), b.clone()));
        Some(b)
    }

    /// The buckets of a rate limit, reused while its spec is unchanged (so a
    /// snapshot for an unrelated change does not refill them).
    pub fn rate_limiter(
        &self,
        spec: &remora_proto::policy::RateLimit,
    ) -> Option<Arc<crate::mesh::authz::RateLimiter>> {
        let mut list = self.rate_limits.lock();
        if let Some((_, l)) = list.iter().find(|(s, _)| s == spec) {
            return Some(l.clone());
        }
        match crate::mesh::authz::RateLimiter::new(spec) {
            Ok(l) => {
                let l = Arc::new(l);
                list.push((spec.clone(), l.clone()));
                // Bounded: the few limits of this workload's own policies.
                if list.len() > 64 {
                    list.remove(0);
                }
                Some(l)
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unusable rate limit");
                None
            }
        }
    }

    /// Forgets state that no snapshot uses (called after each compile).
    pub fn retain(&self, fqdns: &std::collections::HashSet<String>) {
        self.destinations.lock().retain(|k, _| fqdns.contains(k));
        self.breakers.lock().retain(|(_, k), _| fqdns.contains(k));
    }
}

/// A route's retry policy, compiled.
#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub on: RetryOn,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Backoff,
    pub allow_non_idempotent: bool,
}

impl Retry {
    pub fn compile(p: &RetryPolicy) -> Result<Retry, String> {
        let on = if p.on.is_empty() {
            RetryOn::parse(["connect-failure", "refused-stream", "unavailable"])
        } else {
            RetryOn::parse(p.on.iter())
        }
        .map_err(|e| format!("retry.on: {e}"))?;
        let backoff = match &p.backoff {
            Some(b) => Backoff {
                base: b.base,
                max: b.max,
            },
            None => Backoff::default(),
        };
        Ok(Retry {
            attempts: p.attempts.max(1),
            on,
            per_try_timeout: p.per_try_timeout,
            backoff,
            allow_non_idempotent: p.allow_non_idempotent,
        })
    }
}

/// A route's fault injection, compiled.
pub fn compile_fault(f: &FaultInjection) -> Fault {
    Fault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            delay: d.fixed,
            percent: d.percent,
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            status: a.status,
            percent: a.percent,
        }),
    }
}
