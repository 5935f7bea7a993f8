//! The attempts of one outbound request: balance over the endpoints whose
//! circuit is not open (or the route's fallback), send, classify the outcome,
//! and retry when the route allows it, the body can be sent again, and the
//! destination's retry budget has room, with exponential backoff and jitter.
//!
//! Breakers and the balancer's latency record the response head: a gRPC error
//! that only arrives in trailers is not counted against the endpoint.

use crate::body::{ProxyBody, Upload};
use crate::error::{Cause, ProxyError, RetryClass, Side};
use crate::forward::{forward, is_upgrade};
use crate::mesh::{Endpoint, Service};
use crate::observe::Observed;
use crate::pool::ConnLimit;
use crate::replay::{Replay, DEFAULT_CAP};
use crate::route::Rule;
use crate::state::State;
use http::request::Parts;
use http::{Request, Response};
use hyper::body::Incoming;
use remora_resilience::{
    grpc_status_of, is_idempotent, BreakerState, Deadline, Outcome, GRPC_TIMEOUT,
};
use std::sync::Arc;
use std::time::Instant;

/// The request body: streamed once, or replayable for retries.
enum Body {
    Once(Option<Upload>),
    Replay(Replay<Upload>),
}

pub(super) async fn attempts(
    state: &State,
    svc: &Service,
    rule: Option<&Rule>,
    deadline: Option<&Deadline>,
    req: Request<Incoming>,
    grpc: bool,
    obs: &mut Observed,
) -> Result<Response<ProxyBody>, ProxyError> {
    let dest = &svc.dest;
    let limits = &state.settings.limits;
    let connect_timeout = dest.connect_timeout.unwrap_or(limits.connect_timeout);
    // Upgrades (WebSocket) carry a connection, not a request: never retried.
    let retry = rule
        .and_then(|r| r.retry.as_ref())
        .filter(|_| !is_upgrade(&req));
    if let Some(b) = &dest.budget {
        b.deposit();
    }
    let (parts, body) = req.into_parts();
    let body = obs.upload(body);
    let idempotent = is_idempotent(&parts.method);
    let mut parts = Some(parts);
    let mut body = match retry {
        Some(_) => Body::Replay(Replay::new(body, DEFAULT_CAP)),
        None => Body::Once(Some(body)),
    };
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        obs.attempts = attempt;
        let endpoint = choose(svc, rule)?;
        let admission = match &endpoint.breaker {
            Some(b) => Some(b.admit().ok_or_else(|| circuit_open(svc))?),
            None => None,
        };
        obs.upstream = Some(endpoint.addr);
        obs.circuit_state = endpoint.breaker.as_ref().map(|b| state_name(b.state()));

        let (mut head, this_body) = match &mut body {
            Body::Once(b) => (
                parts.take().ok_or_else(internal)?,
                ProxyBody::Upload(b.take().ok_or_else(internal)?),
            ),
            Body::Replay(r) => (
                clone_head(parts.as_ref().ok_or_else(internal)?),
                ProxyBody::Replay(r.body()),
            ),
        };
        if grpc {
            // Pass the remaining deadline on.
            if let Some(d) = deadline {
                head.headers.insert(GRPC_TIMEOUT, d.grpc_timeout());
            }
        }
        let per_try = retry
            .and_then(|r| r.per_try_timeout)
            .map(|t| deadline.map_or(t, |d| d.attempt_timeout(Some(t))));
        let in_flight = endpoint.pool.load.start();
        let started = Instant::now();
        let conn_limit = dest.bulkhead.as_ref().map(|bulkhead| ConnLimit {
            bulkhead,
            critical: rule.is_some_and(|r| r.critical),
        });
        let send = forward(
            Request::from_parts(head, this_body),
            &endpoint.pool,
            connect_timeout,
            limits.tcp_idle_timeout,
            conn_limit.as_ref(),
            false,
        );
        let mut result = match per_try {
            Some(t) => tokio::time::timeout(t, send).await.unwrap_or_else(|_| {
                Err(ProxyError::timeout(format!(
                    "{} attempt {attempt} took longer than {t:?}",
                    endpoint.addr
                )))
            }),
            None => send.await,
        };
        obs.upstream_time = Some(started.elapsed());
        if let Err(e) = &mut result {
            // The client's body broke off or was malformed: its failure,
            // never retried and never counted against the endpoint.
            if let Some(cause) = obs.client_failure() {
                e.blame_client(cause);
            }
        }

        // Record the outcome for the breaker and the balancer: only what
        // the upstream caused counts against it.
        let outcome = classify(&result);
        let ok = match &result {
            Err(e) if e.cause.side() != Side::Upstream => None,
            Err(_) => Some(false),
            Ok(r) => {
                Some(!(r.status().is_server_error() || grpc_status_of(r.headers()) == Some(14)))
            }
        };
        if result.is_ok() {
            in_flight.finish();
        }
        if let (Some(a), Some(ok)) = (admission, ok) {
            a.record(ok);
        }
        if let (Some(b), Some(g)) = (&endpoint.breaker, &endpoint.breaker_gauge) {
            g.set_open(b.state() == BreakerState::Open);
        }

        // Retry?
        let (Some(outcome), Some(r)) = (outcome, retry) else {
            return result;
        };
        let replayable = matches!(&body, Body::Replay(rp) if rp.can_replay());
        let sent = !outcome.before_request_sent();
        // Listing a gRPC status is the route's consent to replay a gRPC call
        // that answered with it (gRPC's own retry design), though every gRPC
        // call is a POST.
        let consent = r.allow_non_idempotent || (grpc && matches!(outcome, Outcome::Grpc(_)));
        // `attempts` counts retries, as Gateway API and Istio do: the
        // first try is not one of them.
        if attempt > r.attempts
            || !r.on.should_retry(outcome, idempotent, sent, consent)
            || !replayable
            || !dest.budget.as_ref().is_none_or(|b| b.try_withdraw())
        {
            return result;
        }
        tracing::debug!(attempt, reason = reason(outcome), upstream = %endpoint.addr, "retrying");
        obs.retried(reason(outcome));
        drop(result);
        tokio::time::sleep(r.backoff.delay(attempt - 1)).await;
    }
}

/// An endpoint of the chosen backend whose circuit is not open; else one of
/// the route's fallback; else `no-endpoints` or `circuit-open`.
fn choose(svc: &Service, rule: Option<&Rule>) -> Result<Arc<Endpoint>, ProxyError> {
    let backends = rule.map_or(&svc.all, |r| &r.backends);
    let set = backends.pick().ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no backends for {}", svc.fqdn))
    })?;
    if let Some(e) = svc.dest.balancer.pick(&set.endpoints) {
        return Ok(e.clone());
    }
    if let Some(fallback) = rule.and_then(|r| r.fallback.as_ref()) {
        if let Some(e) = svc.dest.balancer.pick(&fallback.endpoints) {
            return Ok(e.clone());
        }
    }
    if set.is_empty() {
        Err(ProxyError::new(
            Cause::NoEndpoints,
            format!("no endpoints for {}", set.name),
        ))
    } else {
        Err(circuit_open(svc))
    }
}

fn circuit_open(svc: &Service) -> ProxyError {
    ProxyError::new(
        Cause::CircuitOpen,
        format!("every endpoint of {} has its circuit open", svc.fqdn),
    )
}

fn internal() -> ProxyError {
    ProxyError::new(Cause::UpstreamFailure, "internal: request already sent")
}

/// A copy of a request head for another attempt.
fn clone_head(p: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// What went wrong, if anything, in the terms retry conditions use.
fn classify(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<Outcome> {
    match result {
        Ok(resp) => {
            if let Some(code) = grpc_status_of(resp.headers()).filter(|c| *c != 0) {
                return Some(Outcome::Grpc(code));
            }
            let status = resp.status().as_u16();
            (status >= 400).then_some(Outcome::Status(status))
        }
        Err(e) => match e.retry {
            RetryClass::ConnectFailure => Some(Outcome::ConnectFailure),
            RetryClass::RefusedStream => Some(Outcome::RefusedStream),
            RetryClass::Reset => Some(Outcome::Reset),
            RetryClass::Timeout => Some(Outcome::Timeout),
            RetryClass::Never => None,
        },
    }
}

fn reason(o: Outcome) -> &'static str {
    match o {
        Outcome::ConnectFailure => "connect-failure",
        Outcome::RefusedStream => "refused-stream",
        Outcome::Reset => "reset",
        Outcome::Timeout => "timeout",
        Outcome::Status(_) => "status",
        Outcome::Grpc(_) => "grpc-status",
    }
}

fn state_name(s: BreakerState) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
    }
}
