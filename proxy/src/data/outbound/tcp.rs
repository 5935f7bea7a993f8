//! Opaque TCP on the outbound side: to an endpoint of a mesh service (over
//! mTLS, ALPN `remora-tcp`), or passed through to where the application
//! dialled when that is no mesh service.

use super::connect::connect_mtls;
use crate::data::observe::TcpObserved;
use crate::data::state::State;
use crate::mesh::{Endpoint, Service};
use crate::transport::connect;
use crate::transport::error::{Cause, ProxyError};
use crate::transport::io::Activity;
use crate::transport::tcp;
use crate::transport::tls::Carry;
use remora_telemetry::OUTBOUND;
use std::net::SocketAddr;
use std::sync::Arc;

/// Any endpoint of `svc`, round robin (opaque TCP has no balancer).
pub(super) fn pick_any(svc: &Service) -> Result<&Arc<Endpoint>, ProxyError> {
    svc.all.pick().and_then(|s| s.pick()).ok_or_else(|| {
        ProxyError::new(Cause::NoEndpoints, format!("no endpoints for {}", svc.fqdn))
    })
}

/// Opaque TCP to an endpoint of `svc`, dialled on `port`.
pub(super) async fn relay_to_service<I>(
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
    let limits = &state.limits;
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
            obs.finish_relay(&state.telemetry, r);
        }
        Err(e) => {
            tracing::debug!(error = %e, "outbound tcp connect failed");
            obs.finish(&state.telemetry, 0, 0, Some(e.to_string()));
        }
    }
}

/// Passthrough: opaque TCP to `addr`, which is no mesh service.
pub(super) async fn relay_to<I>(state: &State, io: I, activity: Arc<Activity>, addr: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = &state.limits;
    let mut obs = TcpObserved::begin(OUTBOUND, "passthrough");
    obs.upstream = Some(addr);
    match connect::tcp(addr, limits.connect_timeout).await {
        Ok(upstream) => {
            let r = tcp::relay_tracked(io, upstream, activity, limits.tcp_idle_timeout).await;
            obs.finish_relay(&state.telemetry, r);
        }
        Err(e) => {
            tracing::debug!(error = %e, "outbound tcp connect failed");
            obs.finish(&state.telemetry, 0, 0, Some(e.to_string()));
        }
    }
}
