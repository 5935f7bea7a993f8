//! Step 1: the outbound listener. Each connection is either redirected by
//! iptables (transparent mode: its original destination from
//! `SO_ORIGINAL_DST` names the service, or is passed through) or addressed
//! to the proxy itself (explicit mode: each request names its service).

use super::http::{handle, Target};
use super::tcp::{relay_to, relay_to_service};
use crate::data::state::State;
use crate::transport::detect;
use crate::transport::drain::Drain;
use crate::transport::intercept;
use crate::transport::io::{Activity, Prefixed};
use crate::transport::serve::{accept_loop, serve_http, Builder, Speaks};
use remora_proto::policy::Protocol;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Accepts outbound connections until the drain starts.
pub async fn serve(state: Arc<State>, builder: Arc<Builder>, listener: TcpListener, drain: Drain) {
    accept_loop(listener, drain, "outbound", move |stream, drain| {
        connection(state.clone(), builder.clone(), stream, drain)
    })
    .await
}

async fn connection(state: Arc<State>, builder: Arc<Builder>, mut stream: TcpStream, drain: Drain) {
    let activity = Activity::new();
    let limits = &state.limits;
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
