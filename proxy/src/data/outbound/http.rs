//! One outbound HTTP request: route, then policy (fault injection, deadline,
//! bulkhead), then the attempts in `retry.rs`. Errors become the proxy's own
//! answers from one place, `ProxyError::to_response`.

use super::connect::connect_mtls;
use super::retry;
use super::tcp::pick_any;
use crate::data::observe::{Observed, TcpObserved};
use crate::data::state::State;
use crate::mesh::Mesh;
use crate::transport::body::ProxyBody;
use crate::transport::error::{fault_response, Cause, ProxyError};
use crate::transport::tcp;
use crate::transport::tls::Carry;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remora_resilience::{parse_grpc_timeout, Deadline, FaultAction, GRPC_TIMEOUT};
use remora_telemetry::{SpanKind, OUTBOUND};
use std::sync::Arc;

/// Where the requests of one connection go.
#[derive(Clone)]
pub(super) enum Target {
    /// Explicit mode: each request names its service in Host/`:authority`.
    ByHost,
    /// Transparent mode: the connection was for this service ("name.namespace").
    Service(Arc<str>),
}

/// One request: route and forward it, or make the proxy's own answer.
pub(super) async fn handle(
    state: Arc<State>,
    target: Target,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut obs = Observed::begin(&state.telemetry, SpanKind::Client, OUTBOUND, &mut req);
    let grpc = obs.grpc;
    let resp = match route_and_forward(&state, &target, req, grpc, &mut obs).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "outbound request failed");
            obs.error = Some(e.cause);
            e.to_response(grpc)
        }
    };
    obs.respond(resp)
}

async fn route_and_forward(
    state: &Arc<State>,
    target: &Target,
    req: Request<Incoming>,
    grpc: bool,
    obs: &mut Observed,
) -> Result<Response<ProxyBody>, ProxyError> {
    crate::transport::forward::check_http1_head(&req)?;
    let mesh = state.mesh.load_full();
    if req.method() == http::Method::CONNECT {
        return connect_tunnel(state, &mesh, req).await;
    }
    // Route: the service, then the rule.
    let svc = match target {
        Target::ByHost => {
            let authority = authority(&req)
                .ok_or_else(|| ProxyError::new(Cause::BadRequest, "no Host or :authority"))?;
            mesh.by_host(authority).ok_or_else(|| {
                ProxyError::new(
                    Cause::NoEndpoints,
                    format!("no service for host {authority}"),
                )
            })?
        }
        Target::Service(fqdn) => mesh.by_host(fqdn).ok_or_else(|| {
            ProxyError::new(Cause::NoEndpoints, format!("service {fqdn} is gone"))
        })?,
    };
    obs.destination = Some(svc.fqdn.clone());
    obs.peer = Some(svc.identity.clone());
    let rule = if svc.rules.is_empty() {
        None
    } else {
        Some(
            svc.rules
                .iter()
                .find(|r| r.matches(req.method(), req.uri().path(), req.headers()))
                .ok_or_else(|| {
                    ProxyError::new(
                        Cause::NoEndpoints,
                        format!("no route of {} matches", svc.fqdn),
                    )
                })?,
        )
    };
    match rule {
        Some(r) => obs.routed(&req, &r.name, r.metrics.clone()),
        None => obs.routed(&req, "default", svc.default_metrics.clone()),
    }
    crate::mesh::route::check_upgrade(|| rule, &req)?;

    // Policy: fault injection first (the user's chaos experiment).
    if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
        match fault.decide() {
            FaultAction::None => {}
            FaultAction::Delay(d) => tokio::time::sleep(d).await,
            FaultAction::Abort(status) => return Ok(fault_response(status, grpc)),
            FaultAction::DelayThenAbort(d, status) => {
                tokio::time::sleep(d).await;
                return Ok(fault_response(status, grpc));
            }
        }
    }
    // The deadline: the route's timeout, or less if the client's grpc-timeout says so.
    let incoming = req.headers().get(GRPC_TIMEOUT).and_then(parse_grpc_timeout);
    let deadline = Deadline::for_request(rule.and_then(|r| r.timeout), incoming);
    // The bulkhead: a slow destination cannot take every caller's capacity.
    let dest = &svc.dest;
    let permit = match &dest.bulkhead {
        Some(b) => Some(
            b.acquire_request(rule.is_some_and(|r| r.critical), dest.queue_timeout)
                .await
                .map_err(|e| {
                    dest.metrics.overloaded();
                    ProxyError::new(Cause::Overloaded, format!("{}: {e}", svc.fqdn))
                })?,
        ),
        None => None,
    };
    let attempts = retry::attempts(state, svc, rule, deadline.as_ref(), req, grpc, obs);
    let resp = match deadline {
        Some(d) => tokio::time::timeout_at(d.instant(), attempts)
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::new(
                    Cause::Timeout,
                    format!("{} did not answer within the deadline", svc.fqdn),
                ))
            })?,
        None => attempts.await?,
    };
    // The request stays in flight, for the bulkhead, until its response body ends.
    Ok(match permit {
        Some(p) => resp.map(|b| b.hold(p)),
        None => resp,
    })
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// `CONNECT host:port` in explicit mode: an opaque TCP tunnel to the service.
async fn connect_tunnel(
    state: &Arc<State>,
    mesh: &Mesh,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = authority(&req)
        .ok_or_else(|| ProxyError::new(Cause::BadRequest, "CONNECT without a target"))?
        .to_string();
    let svc = mesh.by_host(&authority).ok_or_else(|| {
        ProxyError::new(
            Cause::NoEndpoints,
            format!("no service for host {authority}"),
        )
    })?;
    let endpoint = pick_any(svc)?;
    let limits = &state.limits;
    let connect = connect_mtls(state, &svc.dest, false);
    let upstream = endpoint.pool.open(Carry::Tcp, &connect).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let idle = limits.tcp_idle_timeout;
    let mut obs = TcpObserved::begin(OUTBOUND, &svc.fqdn);
    obs.upstream = Some(endpoint.addr);
    obs.peer = Some(svc.identity.clone());
    let state = state.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let r = tcp::relay(TokioIo::new(up), upstream, idle).await;
                obs.finish_relay(&state.telemetry, r);
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
