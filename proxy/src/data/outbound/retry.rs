//! The attempts of one outbound request: balance over the endpoints whose
//! circuit is not open (or the route's fallback), send, classify the outcome,
//! and retry when the route allows it, the body can be sent again, and the
//! destination's retry budget has room, with exponential backoff and jitter.
//!
//! Breakers and the balancer's latency record the response head: a gRPC error
//! that only arrives in trailers is not counted against the endpoint.

use super::balance::{choose, state_name};
use super::classify::{classify, reason, upstream_ok};
use super::connect::connect_mtls;
use crate::data::observe::Observed;
use crate::data::state::State;
use crate::mesh::route::Rule;
use crate::mesh::{Endpoint, Service};
use crate::transport::body::{ProxyBody, Upload};
use crate::transport::error::{Cause, ProxyError};
use crate::transport::forward::{forward, is_upgrade};
use crate::transport::replay::{Replay, DEFAULT_CAP};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use remora_resilience::{is_idempotent, BreakerState, Deadline, Outcome, GRPC_TIMEOUT};
use std::sync::Arc;
use tokio::time::Instant;

/// The request body: streamed once, replayable for retries, or none at all
/// (then the head is copied for each attempt when a retry may need it).
enum Body {
    Once(Option<Upload>),
    Replay(Replay<Upload>),
    Empty { keep_head: bool },
}

/// Retries made without a route asking, for requests that never reached an
/// application (a failed connect, a refused stream, a peer whose application
/// is gone): each goes to another endpoint.
const DEFAULT_RETRIES: u32 = 2;

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
    let limits = &state.limits;
    // Upgrades (WebSocket) carry a connection, not a request: never retried.
    let retry = rule
        .and_then(|r| r.retry.as_ref())
        .filter(|_| !is_upgrade(&req));
    if let Some(b) = &dest.budget {
        b.deposit();
    }
    let upgrade = is_upgrade(&req);
    let (parts, body) = req.into_parts();
    let idempotent = is_idempotent(&parts.method);
    let mut parts = Some(parts);
    // A request that never reached an application can go to another
    // endpoint: its head (and a small body) is kept only where there is one.
    let another = !upgrade && svc.all.pick().is_some_and(|s| s.endpoints.len() > 1);
    let small = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= DEFAULT_CAP as u64);
    let mut body = match retry {
        Some(_) => Body::Replay(Replay::new(obs.upload(body), DEFAULT_CAP)),
        None if body.is_end_stream() && !upgrade => Body::Empty { keep_head: another },
        None if another && small => Body::Replay(Replay::new(obs.upload(body), DEFAULT_CAP)),
        None => Body::Once(Some(obs.upload(body))),
    };
    let mut attempt: u32 = 0;
    let mut last: Option<Arc<Endpoint>> = None;
    loop {
        attempt += 1;
        obs.attempts = attempt;
        let (endpoint, admission) = choose(svc, rule, last.as_ref())?;
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
            Body::Empty { keep_head: true } => (
                clone_head(parts.as_ref().ok_or_else(internal)?),
                ProxyBody::empty(),
            ),
            Body::Empty { keep_head: false } => {
                (parts.take().ok_or_else(internal)?, ProxyBody::empty())
            }
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
        let connect = connect_mtls(state, dest, rule.is_some_and(|r| r.critical));
        let send = forward(
            Request::from_parts(head, this_body),
            &endpoint.pool,
            &connect,
            limits.tcp_idle_timeout,
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
        // the upstream caused counts against it, and a failure costs it as
        // much as a slow answer.
        let outcome = classify(&result);
        let ok = upstream_ok(&result, dest.ejection_only);
        match ok {
            Some(true) => in_flight.finish(),
            Some(false) => in_flight.fail(),
            None => drop(in_flight),
        }
        if let (Some(a), Some(ok)) = (admission, ok) {
            a.record(ok);
        }
        if let (Some(b), Some(g)) = (&endpoint.breaker, &endpoint.breaker_gauge) {
            g.set_open(b.state() == BreakerState::Open);
        }

        // Retry?
        let Some(outcome) = outcome else {
            return result;
        };
        let Some(r) = retry else {
            // No route retry: only what never reached an application, on
            // another endpoint, within the budget.
            let unsent = matches!(outcome, Outcome::ConnectFailure | Outcome::RefusedStream);
            let again = match &body {
                Body::Empty { keep_head } => *keep_head,
                Body::Replay(rp) => rp.can_replay(),
                Body::Once(_) => false,
            };
            if !unsent
                || attempt > DEFAULT_RETRIES
                || !again
                || !dest.budget.as_ref().is_none_or(|b| b.try_withdraw())
            {
                return result;
            }
            tracing::debug!(attempt, reason = reason(outcome), upstream = %endpoint.addr, "retrying on another endpoint");
            obs.retried(reason(outcome));
            last = Some(endpoint);
            continue;
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
        last = Some(endpoint);
        tokio::time::sleep(r.backoff.delay(attempt - 1)).await;
    }
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
