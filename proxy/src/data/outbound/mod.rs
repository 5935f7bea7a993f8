//! The outbound side: the application's calls to other services.
//!
//! In order, for each connection and request:
//! 1. intercept: an iptables-redirected connection (transparent mode; the
//!    original destination from `SO_ORIGINAL_DST`) or one addressed to the
//!    proxy itself (explicit mode: absolute-form HTTP/1, h2c, `CONNECT`);
//! 2. route: the destination service (by Host/`:authority` or by original
//!    destination), then the HTTPRoute rule, then a weighted backend;
//! 3. policy: fault injection, the deadline (route timeout and `grpc-timeout`),
//!    the destination's bulkhead, then retries within the budget;
//! 4. balance: an endpoint of the chosen backend whose circuit is not open
//!    (P2C over peak-EWMA by default), or the route's fallback;
//! 5. connect: a pooled connection to the peer's inbound side; a new one is
//!    mTLS ([`connect_mtls`]): this workload's certificate, and the peer's
//!    checked for the identity its endpoint must have.
//!
//! This file holds the accept loop, interception and opaque TCP; `http.rs`
//! the HTTP request path (2–3) and `retry.rs` the attempts (3–5).

mod http;
mod retry;

use self::http::handle;

use crate::data::observe::TcpObserved;
use crate::data::state::State;
use crate::mesh::destination::Destination;
use crate::mesh::{Endpoint, Mesh, Service};
use crate::transport::body::ProxyBody;
use crate::transport::connect::{self, ConnLimit, Connect};
use crate::transport::drain::Drain;
use crate::transport::error::{Cause, ProxyError};
use crate::transport::io::{Activity, Prefixed};
use crate::transport::serve::{serve_http, Builder, Speaks};
use crate::transport::tls::Carry;
use crate::transport::{detect, intercept, tcp};
use ::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use remora_proto::policy::Protocol;
use remora_telemetry::OUTBOUND;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Where the requests of one connection go.
#[derive(Clone)]
pub(crate) enum Target {
    /// Explicit mode: each request names its service in Host/`:authority`.
    ByHost,
    /// Transparent mode: the connection was for this service ("name.namespace").
    Service(Arc<str>),
}

/// Accepts outbound connections until the drain starts.
pub async fn serve(state: Arc<State>, builder: Arc<Builder>, listener: TcpListener, drain: Drain) {
    crate::transport::serve::accept_loop(listener, drain, "outbound", move |stream, drain| {
        connection(state.clone(), builder.clone(), stream, drain)
    })
    .await
}

async fn connection(state: Arc<State>, builder: Arc<Builder>, mut stream: TcpStream, drain: Drain) {
    let activity = Activity::new();
    let limits = &state.settings.limits;
    let (target, declared) = match intercept::redirected_destination(&stream) {
        // Explicit mode: the application addressed the proxy; every request
        // names its service.
        None => (Target::ByHost, None),
        Some(dst) => {
            // Transparent: the application dialled `dst`, iptables sent it here.
            let mesh = state.mesh.load_full();
            let Some(svc) = mesh.by_addr(&dst).cloned() else {
                // Not a mesh service: pass the bytes through to where they were going.
                relay_to(&state, stream, activity, dst).await;
                return;
            };
            let protocol = svc.protocol(dst.port());
            if protocol == Some(Protocol::Tcp) {
                // Declared TCP is never held up by detection (server-speaks-first
                // protocols such as MySQL or SMTP).
                relay_to_service(&state, stream, activity, &svc, dst.port()).await;
                return;
            }
            (
                Target::Service(svc.fqdn.clone()),
                Some((svc, protocol, dst.port())),
            )
        }
    };
    // Clients speak first in HTTP: the first bytes tell HTTP/1, HTTP/2 or
    // (undeclared ports only) anything else.
    let (proto, prefix) = match detect::detect(&mut stream, limits.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "outbound detection failed");
            return;
        }
    };
    let io = Prefixed::new(prefix, stream);
    if let Some((svc, None, port)) = &declared {
        if proto == detect::Detected::Opaque {
            relay_to_service(&state, io, activity, svc, *port).await;
            return;
        }
    }
    let st = state.clone();
    let handler = move |req| handle(st.clone(), target.clone(), req);
    let speaks = Speaks::detected(proto);
    serve_http(
        &builder,
        io,
        speaks,
        activity,
        limits.idle_timeout,
        drain,
        handler,
    )
    .await;
}

/// `CONNECT host:port` in explicit mode: an opaque TCP tunnel to the service.
pub(crate) async fn connect_tunnel(
    state: &Arc<State>,
    mesh: &Mesh,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = self::http::authority(&req)
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
                finish_tcp(&state, obs, r);
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// Step 5, connect: how a new connection to a peer of `dest` is opened. TCP
/// within the destination's connect timeout, then mTLS ([`tls::connect`]):
/// this workload's certificate, the peer's checked against the trust bundle
/// and the identity its endpoint must have. A request's connection (not an
/// opaque TCP one) takes a permit from the destination's connection limit.
///
/// [`tls::connect`]: crate::transport::tls::connect
pub(crate) fn connect_mtls<'a>(
    state: &'a State,
    dest: &'a Destination,
    critical: bool,
) -> Connect<'a> {
    let limits = &state.settings.limits;
    let timeout = dest.connect_timeout.unwrap_or(limits.connect_timeout);
    let limit = dest
        .bulkhead
        .as_ref()
        .map(|bulkhead| ConnLimit { bulkhead, critical });
    Connect::mtls(&state.identity, timeout).limited(limit)
}

pub(crate) fn pick_any(svc: &Service) -> Result<&Arc<Endpoint>, ProxyError> {
    svc.all.pick().and_then(|s| s.pick()).ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no endpoints for {}", svc.fqdn))
    })
}

/// Opaque TCP to an endpoint of `svc`, dialled on `port`.
async fn relay_to_service<I>(
    state: &State,
    io: I,
    activity: Arc<Activity>,
    svc: &Service,
    port: u16,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let endpoint = match pick_any(svc) {
        Ok(e) => e,
        Err(e) => return tracing::debug!(error = %e, "outbound tcp: no endpoint"),
    };
    let limits = &state.settings.limits;
    let mut obs = TcpObserved::begin(OUTBOUND, &svc.fqdn);
    obs.upstream = Some(endpoint.addr);
    obs.peer = Some(svc.identity.clone());
    let idle = svc
        .tcp_idle_timeout(port)
        .unwrap_or(limits.tcp_idle_timeout);
    let connect = connect_mtls(state, &svc.dest, false);
    match endpoint.pool.open(Carry::Tcp, &connect).await {
        Ok(upstream) => {
            let r = tcp::relay_tracked(io, upstream, activity, idle).await;
            finish_tcp(state, obs, r);
        }
        Err(e) => {
            tracing::debug!(error = %e, "outbound tcp connect failed");
            obs.finish(&state.telemetry, 0, 0, Some(e.to_string()));
        }
    }
}

async fn relay_to<I>(state: &State, io: I, activity: Arc<Activity>, addr: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = &state.settings.limits;
    let mut obs = TcpObserved::begin(OUTBOUND, "passthrough");
    obs.upstream = Some(addr);
    match connect::tcp(addr, limits.connect_timeout).await {
        Ok(upstream) => {
            let r = tcp::relay_tracked(io, upstream, activity, limits.tcp_idle_timeout).await;
            finish_tcp(state, obs, r);
        }
        Err(e) => {
            tracing::debug!(error = %e, "outbound tcp connect failed");
            obs.finish(&state.telemetry, 0, 0, Some(e.to_string()));
        }
    }
}

/// Records a relayed connection's end, with the bytes it really carried.
pub(crate) fn finish_tcp(state: &State, obs: TcpObserved, r: tcp::Relayed) {
    if let Some(e) = &r.error {
        tracing::debug!(error = %e, "tcp relay ended");
    }
    let error = r.error.map(|e| e.to_string());
    obs.finish(&state.telemetry, r.to_client, r.from_client, error);
}
