//! Step 4, balance: the endpoint for one attempt. The route's backend is
//! drawn by weight, then the destination's balancer (P2C over peak-EWMA by
//! default) picks among its endpoints whose circuit is not open, avoiding
//! the one that just failed where there is another; else the route's
//! fallback; else `no-endpoints` or `circuit-open`.

use crate::mesh::route::Rule;
use crate::mesh::{Endpoint, Service};
use crate::transport::error::{Cause, ProxyError};
use remora_resilience::{Admission, BreakerState};
use std::sync::Arc;

/// An endpoint of the chosen backend whose circuit is not open (another
/// than `avoid`, the one that just failed, where there is one), with its
/// breaker's admission; else one of the route's fallback; else
/// `no-endpoints` or `circuit-open`. Endpoints ejected only by the default
/// outlier detection are never all out: with none left, any is used.
pub(super) fn choose(
    svc: &Service,
    rule: Option<&Rule>,
    avoid: Option<&Arc<Endpoint>>,
) -> Result<(Arc<Endpoint>, Option<Admission>), ProxyError> {
    let dest = &svc.dest;
    let backends = rule.map_or(&svc.all, |r| &r.backends);
    let set = backends.pick().ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no backends for {}", svc.fqdn))
    })?;
    let mut candidate = None;
    for _ in 0..3 {
        let Some(e) = dest.balancer.pick(&set.endpoints) else {
            break;
        };
        let again = avoid.is_some_and(|a| Arc::ptr_eq(a, e)) && set.endpoints.len() > 1;
        if let Some(admission) = admit(e) {
            if !again {
                return Ok((e.clone(), admission));
            }
            candidate.get_or_insert((e.clone(), admission));
        }
    }
    if let Some(c) = candidate {
        return Ok(c);
    }
    if let Some(fallback) = rule.and_then(|r| r.fallback.as_ref()) {
        if let Some(e) = dest.balancer.pick(&fallback.endpoints) {
            if let Some(admission) = admit(e) {
                return Ok((e.clone(), admission));
            }
        }
    }
    if set.is_empty() {
        return Err(ProxyError::new(
            Cause::NoEndpoints,
            format!("no endpoints for {}", set.name),
        ));
    }
    if dest.ejection_only {
        // Panic mode: every endpoint is ejected by outlier detection alone,
        // so none is; the balancer chooses among all of them.
        let all: Vec<Ignoring<'_>> = set.endpoints.iter().map(Ignoring).collect();
        if let Some(e) = dest.balancer.pick(&all) {
            return Ok((e.0.clone(), None));
        }
    }
    Err(circuit_open(svc))
}

/// The breaker's admission for a request to `e`: `Some(None)` for an
/// endpoint with no breaker, `None` when a half-open breaker has no probe
/// slot left (then another endpoint is chosen).
#[allow(clippy::option_option)]
fn admit(e: &Arc<Endpoint>) -> Option<Option<Admission>> {
    match &e.breaker {
        None => Some(None),
        Some(b) => b.admit().map(Some),
    }
}

/// An endpoint seen as available whatever its breaker says (panic mode).
struct Ignoring<'a>(&'a Arc<Endpoint>);

impl remora_resilience::Balanced for Ignoring<'_> {
    fn load(&self) -> &remora_resilience::Load {
        &self.0.pool.load
    }

    fn available(&self) -> bool {
        true
    }
}

fn circuit_open(svc: &Service) -> ProxyError {
    ProxyError::new(
        Cause::CircuitOpen,
        format!("every endpoint of {} has its circuit open", svc.fqdn),
    )
}

/// The breaker state as spans name it.
pub(super) fn state_name(s: BreakerState) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
    }
}
