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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::destination::Registry;
    use crate::mesh::testing::{endpoint, pools, resource};
    use crate::mesh::Mesh;
    use remora_proto::v1;
    use serde_json::json;

    /// backend (v1 at .1, v2 at .2; route `v2` to v2 alone, route `all`
    /// with the fallback `spare` at .9), `empty` without endpoints, and
    /// `extra` resources.
    fn mesh(extra: Vec<v1::Resource>) -> Mesh {
        let mut resources = vec![resource(
            "HTTPRoute",
            "backend",
            json!({"service": "backend", "rules": [
                {"name": "v2", "matches": [{"path": {"prefix": "/v2"}}],
                 "backends": [{"service": "backend", "subset": {"version": "v2"}}]},
                {"name": "all", "backends": [{"service": "backend"}],
                 "fallback": {"service": "spare"}},
            ]}),
        )];
        resources.extend(extra);
        let snapshot = v1::Snapshot {
            resources,
            endpoints: vec![
                endpoint("backend", "10.0.0.1:80", "v1"),
                endpoint("backend", "10.0.0.2:80", "v2"),
                endpoint("spare", "10.0.0.9:80", "v1"),
            ],
            ..v1::Snapshot::default()
        };
        Mesh::compile(
            snapshot,
            ("shop", "frontend"),
            &pools(),
            &Registry::default(),
        )
        .unwrap()
    }

    /// A DestinationPolicy for backend: round robin, one failure opens a
    /// circuit for a minute.
    fn strict_breaker() -> v1::Resource {
        resource(
            "DestinationPolicy",
            "backend",
            json!({"service": "backend", "loadBalancer": "round-robin",
                   "circuitBreaker": {"consecutiveFailures": 1, "openFor": "60s"}}),
        )
    }

    fn fail(e: &Endpoint, times: usize) {
        for _ in 0..times {
            e.breaker.as_ref().unwrap().admit().unwrap().record(false);
        }
    }

    fn addr(chosen: &Result<(Arc<Endpoint>, Option<Admission>), ProxyError>) -> String {
        chosen.as_ref().unwrap().0.addr.to_string()
    }

    fn rule<'a>(svc: &'a Service, name: &str) -> &'a Rule {
        svc.rules.iter().find(|r| &*r.name == name).unwrap()
    }

    #[test]
    fn the_routes_backend_decides_the_endpoints() {
        let mesh = mesh(vec![]);
        let svc = mesh.by_host("backend.shop").unwrap();
        for _ in 0..20 {
            assert_eq!(
                addr(&choose(svc, Some(rule(svc, "v2")), None)),
                "10.0.0.2:80"
            );
        }
        let mut seen: Vec<String> = (0..50).map(|_| addr(&choose(svc, None, None))).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, ["10.0.0.1:80", "10.0.0.2:80"]);
    }

    #[test]
    fn a_retry_goes_to_another_endpoint_where_there_is_one() {
        let mesh = mesh(vec![strict_breaker()]);
        let svc = mesh.by_host("backend.shop").unwrap();
        let first = choose(svc, None, None).unwrap().0;
        for _ in 0..10 {
            let next = choose(svc, None, Some(&first)).unwrap().0;
            assert!(!Arc::ptr_eq(&next, &first));
        }
        // The only endpoint of its backend is tried again.
        let only = choose(svc, Some(rule(svc, "v2")), None).unwrap().0;
        let again = choose(svc, Some(rule(svc, "v2")), Some(&only)).unwrap().0;
        assert!(Arc::ptr_eq(&again, &only));
    }

    #[test]
    fn an_open_circuit_keeps_requests_away_then_the_fallback_takes_them() {
        let mesh = mesh(vec![strict_breaker()]);
        let svc = mesh.by_host("backend.shop").unwrap();
        let all = rule(svc, "all");
        let ends = &svc.all.pick().unwrap().endpoints;
        fail(&ends[0], 1);
        for _ in 0..10 {
            assert_eq!(addr(&choose(svc, Some(all), None)), "10.0.0.2:80");
        }
        assert_eq!(
            state_name(ends[0].breaker.as_ref().unwrap().state()),
            "open"
        );
        fail(&ends[1], 1);
        assert_eq!(addr(&choose(svc, Some(all), None)), "10.0.0.9:80");
        // Without a fallback: circuit-open.
        let e = choose(svc, None, None).unwrap_err();
        assert_eq!(e.cause, Cause::CircuitOpen);
        assert!(e.to_string().contains("backend.shop"), "{e}");
    }

    #[test]
    fn endpoints_ejected_by_the_default_outlier_detection_are_never_all_out() {
        let mesh = mesh(vec![]);
        let svc = mesh.by_host("backend.shop").unwrap();
        assert!(svc.dest.ejection_only);
        for e in &svc.all.pick().unwrap().endpoints {
            // Five gateway errors in a row eject an endpoint.
            fail(e, 5);
            assert_eq!(state_name(e.breaker.as_ref().unwrap().state()), "open");
        }
        // Panic mode: the balancer chooses among all of them, unadmitted.
        let (e, admission) = choose(svc, None, None).unwrap();
        assert!(admission.is_none());
        assert!(svc
            .all
            .pick()
            .unwrap()
            .endpoints
            .iter()
            .any(|x| Arc::ptr_eq(x, &e)));
    }

    #[test]
    fn a_service_without_endpoints_has_none_to_choose() {
        let mesh = mesh(vec![resource(
            "Service",
            "empty",
            json!({"ports": [{"port": 80, "protocol": "http"}]}),
        )]);
        let svc = mesh.by_host("empty.shop").unwrap();
        let e = choose(svc, None, None).unwrap_err();
        assert_eq!(e.cause, Cause::NoEndpoints);
        assert_eq!(e.to_string(), "no-endpoints: no endpoints for empty.shop");
    }
}
