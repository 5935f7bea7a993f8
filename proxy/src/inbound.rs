//! The inbound side: traffic for the local application.
//!
//! In order: accept → find the application's address (the original
//! destination when iptables redirected it, else 127.0.0.1:app-port) → the
//! protocol (the local Service's declared one for that port, else detected with
//! a bounded timeout; declared `tcp` skips detection so server-speaks-first
//! protocols are not held up) → HTTP to the application over a pooled
//! connection, or an opaque TCP relay. (mTLS termination and authorization
//! plug in between accept and protocol.)

use crate::body::ProxyBody;
use crate::detect::{self, Detected};
use crate::drain::Drain;
use crate::error::{Cause, ProxyError};
use crate::forward::{forward, is_grpc, restore_orig_proto};
use crate::intercept;
use crate::io::{Activity, Prefixed};
use crate::pool::{self, EndpointPool};
use crate::serve::{serve_http, Builder};
use crate::state::State;
use crate::tls::{self, Carry};
use http::{Request, Response};
use hyper::body::Incoming;
use remora_proto::policy::Protocol;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// Accepts inbound connections until the drain starts.
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
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = drain.signaled() => return,
        }
    }
}

async fn connection(state: Arc<State>, builder: Arc<Builder>, mut stream: TcpStream, drain: Drain) {
    // Where the application is.
    let (app, pool) = match intercept::redirected_destination(&stream) {
        Some(dst) => (dst, state.pools.get(dst, None)),
        None => match (state.settings.app_port, &state.app_pool) {
            (Some(port), Some(pool)) => {
                (SocketAddr::from((Ipv4Addr::LOCALHOST, port)), pool.clone())
            }
            _ => {
                tracing::warn!("inbound connection but no --app-port and not redirected; closing");
                return;
            }
        },
    };
    let limits = &state.settings.limits;
    let activity = Activity::new();
    // A peer proxy speaks TLS first; anything else is plaintext from outside the mesh.
    let (detected, prefix) = match detect::detect(&mut stream, limits.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "inbound detection failed");
            return;
        }
    };
    let io = Prefixed::new(prefix, stream);
    if detected == Detected::Tls {
        return mesh_connection(state, builder, io, activity, app, pool, drain).await;
    }
    let mesh = state.mesh.load_full();
    if !mesh.authz.allows_plaintext() {
        tracing::info!(%app, "refused a plaintext connection: mTLS is strict for this service");
        return;
    }
    let http = match mesh.local_protocol(app.port()) {
        Some(Protocol::Tcp) => false,
        Some(_) => true,
        None => detected != Detected::Opaque,
    };
    if http {
        let st = state.clone();
        let handler = move |req| handle(st.clone(), pool.clone(), None, req);
        serve_http(&builder, io, activity, limits.idle_timeout, drain, handler).await;
    } else if mesh.authz.allows_connection(None) {
        relay(&state, io, activity, app).await;
    } else {
        tracing::info!(%app, "denied a plaintext TCP connection");
    }
}

/// A connection from a peer proxy: mTLS, then what its ALPN says it carries.
async fn mesh_connection(
    state: Arc<State>,
    builder: Arc<Builder>,
    io: Prefixed<TcpStream>,
    activity: Arc<Activity>,
    app: SocketAddr,
    pool: Arc<EndpointPool>,
    drain: Drain,
) {
    let limits = &state.settings.limits;
    let Some(configs) = state.identity.configs() else {
        tracing::warn!("TLS connection before this workload has a certificate; closing");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(configs.server.clone());
    let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "refused a TLS connection");
            return;
        }
        Err(_) => {
            tracing::info!("TLS handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let peer: Option<Arc<str>> = tls::peer_identity(conn.peer_certificates()).map(Arc::from);
    match Carry::from_alpn(conn.alpn_protocol()) {
        Some(Carry::H2 | Carry::Http1) => {
            let st = state.clone();
            let handler = move |req| handle(st.clone(), pool.clone(), peer.clone(), req);
            serve_http(&builder, tls, activity, limits.idle_timeout, drain, handler).await;
        }
        Some(Carry::Tcp) => {
            if state.mesh.load().authz.allows_connection(peer.as_deref()) {
                relay(&state, tls, activity, app).await;
            } else {
                tracing::info!(peer = ?peer, "denied a TCP connection by authorization policy");
            }
        }
        None => tracing::info!("TLS connection without a known ALPN protocol; closing"),
    }
}

async fn handle(
    state: Arc<State>,
    app: Arc<EndpointPool>,
    peer: Option<Arc<str>>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let grpc = is_grpc(&req);
    let limits = &state.settings.limits;
    let allowed =
        state
            .mesh
            .load()
            .authz
            .allows_request(peer.as_deref(), req.method(), req.uri().path());
    let result = if allowed {
        restore_orig_proto(&mut req);
        forward(req, &app, limits.connect_timeout, limits.idle_timeout).await
    } else {
        Err(ProxyError::new(
            Cause::Denied,
            format!(
                "{} may not {} {}",
                peer.as_deref().unwrap_or("an unauthenticated caller"),
                req.method(),
                req.uri().path()
            ),
        ))
    };
    match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "inbound request failed");
            e.to_response(grpc)
        }
    }
}

async fn relay<I>(state: &State, io: I, activity: Arc<Activity>, app: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &state.settings.limits;
    let upstream = match pool::connect(app, limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let e: ProxyError = e;
            tracing::debug!(error = %e, "inbound tcp: application unreachable");
            return;
        }
    };
    if let Err(e) = crate::tcp::relay_tracked(io, upstream, activity, limits.idle_timeout).await {
        tracing::debug!(error = %e, "inbound tcp ended");
    }
}
