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
use crate::error::ProxyError;
use crate::forward::{check_framing, forward, is_grpc};
use crate::intercept;
use crate::io::{Activity, Prefixed};
use crate::pool::{self, EndpointPool};
use crate::serve::{serve_http, Builder};
use crate::state::State;
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
        Some(dst) => (dst, state.pools.get(dst)),
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
    let declared = state.mesh.load().local_protocol(app.port());
    let detected = match declared {
        Some(Protocol::Tcp) => None,
        Some(_) => Some((Detected::Http1, bytes::Bytes::new())),
        None => match detect::detect(&mut stream, limits.detect_timeout).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!(error = %e, "inbound detection failed");
                return;
            }
        },
    };
    match detected {
        None => relay(&state, stream, activity, app).await,
        Some((Detected::Opaque, prefix)) => {
            relay(&state, Prefixed::new(prefix, stream), activity, app).await
        }
        Some((_, prefix)) => {
            let io = Prefixed::new(prefix, stream);
            let st = state.clone();
            let handler = move |req| handle(st.clone(), pool.clone(), req);
            serve_http(&builder, io, activity, limits.idle_timeout, drain, handler).await;
        }
    }
}

async fn handle(
    state: Arc<State>,
    app: Arc<EndpointPool>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let grpc = is_grpc(&req);
    let limits = &state.settings.limits;
    let result = match check_framing(&req) {
        Ok(()) => forward(req, &app, limits.connect_timeout, limits.idle_timeout).await,
        Err(e) => Err(e),
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
