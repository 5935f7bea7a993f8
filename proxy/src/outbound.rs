//! The outbound side: the application's calls to other services.
//!
//! In order, for each connection and request:
//! 1. intercept: an iptables-redirected connection (transparent mode; the
//!    original destination from `SO_ORIGINAL_DST`) or one addressed to the
//!    proxy itself (explicit mode: absolute-form HTTP/1, h2c, `CONNECT`);
//! 2. route: the destination service (by Host/`:authority` or by original
//!    destination), then the HTTPRoute rule, then a weighted backend;
//! 3. policy: the rule's timeout (resilience policies plug in here);
//! 4. balance: an endpoint of the chosen backend;
//! 5. connect: a pooled upstream connection to the peer's inbound side.

use crate::body::ProxyBody;
use crate::drain::Drain;
use crate::error::{Cause, ProxyError};
use crate::forward::{forward, is_grpc};
use crate::io::{Activity, Prefixed};
use crate::mesh::{Endpoint, Mesh, Service};
use crate::serve::{serve_http, Builder};
use crate::state::State;
use crate::tls::Carry;
use crate::{detect, intercept, pool, tcp};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remora_proto::policy::Protocol;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Where the requests of one connection go.
#[derive(Clone)]
enum Target {
    /// Explicit mode: each request names its service in Host/`:authority`.
    ByHost,
    /// Transparent mode: the connection was for this service ("name.namespace").
    Service(Arc<str>),
}

/// Accepts outbound connections until the drain starts.
pub async fn serve(
    state: Arc<State>,
    builder: Arc<Builder>,
    listener: TcpListener,
    mut drain: Drain,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(state.clone(), builder.clone(), stream, drain.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = drain.signaled() => return,
        }
    }
}

async fn connection(state: Arc<State>, builder: Arc<Builder>, stream: TcpStream, drain: Drain) {
    let activity = Activity::new();
    let limits = &state.settings.limits;
    let Some(dst) = intercept::redirected_destination(&stream) else {
        let st = state.clone();
        let handler = move |req| handle(st.clone(), Target::ByHost, req);
        serve_http(
            &builder,
            stream,
            activity,
            limits.idle_timeout,
            drain,
            handler,
        )
        .await;
        return;
    };
    // Transparent: the application dialled `dst`, iptables sent it here.
    let mesh = state.mesh.load_full();
    let Some(svc) = mesh.by_addr(&dst).cloned() else {
        // Not a mesh service: pass the bytes through to where they were going.
        relay_to(&state, stream, activity, dst).await;
        return;
    };
    let protocol = svc.protocol(dst.port());
    let target = Target::Service(svc.fqdn.clone());
    match protocol {
        Some(Protocol::Tcp) => relay_to_service(&state, stream, activity, &svc).await,
        Some(_) => {
            let st = state.clone();
            let handler = move |req| handle(st.clone(), target.clone(), req);
            serve_http(
                &builder,
                stream,
                activity,
                limits.idle_timeout,
                drain,
                handler,
            )
            .await;
        }
        None => {
            let mut stream = stream;
            let (proto, prefix) = match detect::detect(&mut stream, limits.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "outbound detection failed");
                    return;
                }
            };
            let io = Prefixed::new(prefix, stream);
            if proto == detect::Detected::Opaque {
                relay_to_service(&state, io, activity, &svc).await;
            } else {
                let st = state.clone();
                let handler = move |req| handle(st.clone(), target.clone(), req);
                serve_http(&builder, io, activity, limits.idle_timeout, drain, handler).await;
            }
        }
    }
}

/// One request: route and forward it, or make the proxy's own answer.
async fn handle(state: Arc<State>, target: Target, req: Request<Incoming>) -> Response<ProxyBody> {
    let grpc = is_grpc(&req);
    match route_and_forward(&state, &target, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "outbound request failed");
            e.to_response(grpc)
        }
    }
}

/// The request path: route → policy → balance → connect.
async fn route_and_forward(
    state: &State,
    target: &Target,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
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
    let (backends, timeout) = if svc.rules.is_empty() {
        (&svc.all, None)
    } else {
        let rule = svc
            .rules
            .iter()
            .find(|r| r.matches(req.method(), req.uri().path(), req.headers()))
            .ok_or_else(|| {
                ProxyError::new(
                    Cause::NoEndpoints,
                    format!("no route of {} matches", svc.fqdn),
                )
            })?;
        (&rule.backends, rule.timeout)
    };
    // Balance.
    let endpoint = backends.pick().and_then(|set| set.pick()).ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no endpoints for {}", svc.fqdn))
    })?;
    // Connect and forward, within the route's timeout.
    let limits = &state.settings.limits;
    let connect_timeout = svc.connect_timeout.unwrap_or(limits.connect_timeout);
    let fut = forward(req, &endpoint.pool, connect_timeout, limits.idle_timeout);
    match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(ProxyError::new(
                Cause::Timeout,
                format!("{} did not answer within {t:?}", svc.fqdn),
            ))
        }),
        None => fut.await,
    }
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// `CONNECT host:port` in explicit mode: an opaque TCP tunnel to the service.
async fn connect_tunnel(
    state: &State,
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
    let limits = &state.settings.limits;
    let upstream = endpoint
        .pool
        .open(
            Carry::Tcp,
            svc.connect_timeout.unwrap_or(limits.connect_timeout),
        )
        .await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let idle = limits.idle_timeout;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                if let Err(e) = tcp::relay(TokioIo::new(up), upstream, idle).await {
                    tracing::debug!(error = %e, "tunnel ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

fn pick_any(svc: &Service) -> Result<&Arc<Endpoint>, ProxyError> {
    svc.all.pick().and_then(|s| s.pick()).ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no endpoints for {}", svc.fqdn))
    })
}

/// Opaque TCP to an endpoint of `svc`.
async fn relay_to_service<I>(state: &State, io: I, activity: Arc<Activity>, svc: &Service)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let endpoint = match pick_any(svc) {
        Ok(e) => e,
        Err(e) => return tracing::debug!(error = %e, "outbound tcp: no endpoint"),
    };
    let limits = &state.settings.limits;
    let timeout = svc.connect_timeout.unwrap_or(limits.connect_timeout);
    match endpoint.pool.open(Carry::Tcp, timeout).await {
        Ok(upstream) => {
            if let Err(e) = tcp::relay_tracked(io, upstream, activity, limits.idle_timeout).await {
                tracing::debug!(error = %e, "outbound tcp ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "outbound tcp connect failed"),
    }
}

async fn relay_to<I>(state: &State, io: I, activity: Arc<Activity>, addr: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = &state.settings.limits;
    match pool::connect(addr, limits.connect_timeout).await {
        Ok(upstream) => {
            if let Err(e) = tcp::relay_tracked(io, upstream, activity, limits.idle_timeout).await {
                tracing::debug!(error = %e, %addr, "outbound tcp ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "outbound tcp connect failed"),
    }
}
