//! The inbound side: traffic for the local application.
//!
//! In order: accept → find the application's address (the original
//! destination when iptables redirected it, else 127.0.0.1:app-port) →
//! detect TLS or plaintext (bounded by `--detect-timeout`). A peer sidecar
//! speaks mTLS: its certificate is verified against the trust bundle and its
//! SPIFFE identity read, and ALPN says what the connection carries (HTTP/2,
//! HTTP/1.1, or opaque TCP). Plaintext from outside the mesh is refused when
//! an AuthorizationPolicy says `mtls: strict`; else its protocol is the local
//! Service's declared one for that port, or detected (declared `tcp` skips
//! detection so server-speaks-first protocols are not held up). → Each HTTP
//! request is admitted (a well-formed head, an end user's token that
//! verifies, a caller the authorization policy allows, room in the rate
//! limit, an allowed upgrade) and goes to the application over a pooled
//! connection; an opaque TCP connection is relayed if the policy lets its
//! caller in.

use crate::data::observe::{Observed, TcpObserved};
use crate::data::state::State;
use crate::transport::body::ProxyBody;
use crate::transport::connect::{self, Connect};
use crate::transport::detect::{self, Detected};
use crate::transport::drain::Drain;
use crate::transport::error::{Cause, ProxyError, RetryClass};
use crate::transport::forward::{forward, restore_orig_proto};
use crate::transport::intercept;
use crate::transport::io::{Activity, Prefixed};
use crate::transport::pool::EndpointPool;
use crate::transport::serve::{serve_http, Builder, Speaks};
use crate::transport::tls::{self, Carry};
use http::{Request, Response};
use hyper::body::Incoming;
use remora_proto::policy::Protocol;
use remora_telemetry::{RequestMetrics, SpanKind, INBOUND};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// Accepts inbound connections until the drain starts.
pub async fn serve(state: Arc<State>, builder: Arc<Builder>, listener: TcpListener, drain: Drain) {
    crate::transport::serve::accept_loop(listener, drain, "inbound", move |stream, drain| {
        connection(state.clone(), builder.clone(), stream, drain)
    })
    .await
}

async fn connection(state: Arc<State>, builder: Arc<Builder>, mut stream: TcpStream, drain: Drain) {
    // Where the application is.
    let app = match intercept::redirected_destination(&stream) {
        Some(dst) => App {
            addr: dst,
            pool: state.pools.get(dst, None),
            explicit: false,
        },
        None => match (state.workload.app_port, &state.app_pool) {
            (Some(port), Some(pool)) => App {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                pool: pool.clone(),
                explicit: true,
            },
            _ => {
                tracing::warn!("inbound connection but no --app-port and not redirected; closing");
                return;
            }
        },
    };
    let limits = &state.limits;
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
        return mesh_connection(state, builder, io, activity, app, drain).await;
    }
    let mesh = state.mesh.load_full();
    if !mesh.authz.allows_plaintext() {
        tracing::info!(app = %app.addr, "refused a plaintext connection: mTLS is strict for this service");
        return;
    }
    let http = match mesh.local_protocol(app.addr.port(), app.explicit) {
        Some(Protocol::Tcp) => false,
        Some(_) => true,
        None => detected != Detected::Opaque,
    };
    if http {
        let speaks = Speaks::detected(detected);
        serve_requests(&state, &builder, io, speaks, activity, drain, app, None).await;
    } else if may_relay(&mesh, &app, None) {
        relay(&state, io, activity, &app, None).await;
    }
}

/// Whether an opaque TCP connection from `peer` (None: plaintext) may reach
/// the application: never on a port declared HTTP, nor past HTTP-level rules
/// (a rate limit, method or path rules) that a relay would skip.
fn may_relay(mesh: &crate::mesh::Mesh, app: &App, peer: Option<&str>) -> bool {
    let declared = mesh.local_protocol(app.addr.port(), app.explicit);
    let allowed = if declared.is_some_and(|p| p != Protocol::Tcp) {
        tracing::info!(app = %app.addr, "refused a TCP connection to a port declared HTTP");
        false
    } else if declared.is_none() && mesh.authz.has_http_rules() {
        tracing::info!(
            app = %app.addr,
            "refused a connection that does not speak HTTP: HTTP rules cover this workload"
        );
        false
    } else {
        mesh.authz.allows_connection(peer)
    };
    if !allowed {
        tracing::info!(app = %app.addr, ?peer, "denied a TCP connection");
    }
    allowed
}

/// Where inbound traffic is delivered.
struct App {
    addr: SocketAddr,
    pool: Arc<EndpointPool>,
    /// Explicit mode: the application is `--app-port`, not the connection's
    /// original destination.
    explicit: bool,
}

/// A connection from a peer proxy: mTLS, then what its ALPN says it carries.
async fn mesh_connection(
    state: Arc<State>,
    builder: Arc<Builder>,
    io: Prefixed<TcpStream>,
    activity: Arc<Activity>,
    app: App,
    drain: Drain,
) {
    let limits = &state.limits;
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
        Some(carry @ (Carry::H2 | Carry::Http1)) => {
            let speaks = if carry == Carry::H2 {
                Speaks::Http2
            } else {
                Speaks::Http1
            };
            serve_requests(&state, &builder, tls, speaks, activity, drain, app, peer).await;
        }
        Some(Carry::Tcp) => {
            if may_relay(&state.mesh.load(), &app, peer.as_deref()) {
                relay(&state, tls, activity, &app, peer).await;
            }
        }
        None => tracing::info!("TLS connection without a known ALPN protocol; closing"),
    }
}

/// Serves the HTTP requests of one inbound connection from `peer` (none:
/// plaintext) to the application behind `app`.
#[allow(clippy::too_many_arguments)]
async fn serve_requests<I>(
    state: &Arc<State>,
    builder: &Builder,
    io: I,
    speaks: Speaks,
    activity: Arc<Activity>,
    drain: Drain,
    app: App,
    peer: Option<Arc<str>>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        metrics: connection_metrics(state, peer.as_deref()),
        state: state.clone(),
        app,
        peer,
    });
    let idle = state.limits.idle_timeout;
    let handler = move |req| handle(conn.clone(), req);
    serve_http(builder, io, speaks, activity, idle, drain, handler).await;
}

/// What every request of one inbound connection shares: one reference to
/// clone per request, not four.
struct Conn {
    state: Arc<State>,
    app: App,
    /// The peer's SPIFFE identity (mTLS), or none (plaintext).
    peer: Option<Arc<str>>,
    metrics: Arc<RequestMetrics>,
}

/// Metrics for the requests of one inbound connection, labelled with its
/// peer (bounded: identities of the mesh's services).
fn connection_metrics(state: &State, peer: Option<&str>) -> Arc<RequestMetrics> {
    Arc::new(RequestMetrics::new(
        INBOUND,
        &state.workload.fqdn(),
        "inbound",
        peer.unwrap_or("unauthenticated"),
    ))
}

/// One inbound request: authorize, rate-limit, then deliver to the application.
async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let Conn {
        state,
        app,
        peer,
        metrics,
    } = &*conn;
    let mut obs = Observed::begin(&state.telemetry, SpanKind::Server, INBOUND, &mut req);
    obs.peer = peer.clone();
    obs.upstream = Some(app.addr);
    obs.routed(&req, "inbound", metrics.clone());
    let grpc = obs.grpc;
    let limits = &state.limits;
    let (h2_app, decision) = {
        let mesh = state.mesh.load();
        // The port's declared protocol decides what the application speaks.
        let h2_app = matches!(
            mesh.local_protocol(app.addr.port(), app.explicit),
            Some(Protocol::Http2 | Protocol::Grpc)
        );
        let decision = admit(&mesh, state, peer.as_deref(), &mut req);
        (h2_app, decision)
    };
    let result = match decision {
        Ok(()) => {
            restore_orig_proto(&mut req);
            let started = obs.times_upstream().then(tokio::time::Instant::now);
            let (head, body) = req.into_parts();
            let body = ProxyBody::Upload(obs.upload(body));
            let r = forward(
                Request::from_parts(head, body),
                &app.pool,
                &Connect::plain(limits.connect_timeout),
                limits.tcp_idle_timeout,
                h2_app,
            )
            .await;
            obs.upstream_time = started.map(|s| s.elapsed());
            r.map_err(|mut e| {
                if let Some(cause) = obs.client_failure() {
                    e.blame_client(cause);
                }
                e
            })
        }
        Err(e) => Err(e),
    };
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "inbound request failed");
            obs.error = Some(e.cause);
            let unreached = e.retry == RetryClass::ConnectFailure;
            let mut resp = e.to_response(grpc);
            if unreached {
                // The application is gone: withdraw this endpoint, and tell a
                // peer sidecar the request was never processed (it may try
                // another endpoint).
                state.app_health.unreachable(&e.to_string());
                if peer.is_some() {
                    resp.headers_mut().insert(
                        crate::transport::forward::UNREACHED,
                        http::HeaderValue::from_static("1"),
                    );
                }
            }
            resp
        }
    };
    obs.respond(resp)
}

/// Whether a request may go to the application: a well-formed head, an end
/// user's token (if it carries one) that verifies, a caller the
/// authorization policy allows, room in the rate limit, and an upgrade (if
/// it asks for one) the service's own routes allow.
fn admit<B>(
    mesh: &crate::mesh::Mesh,
    state: &State,
    peer: Option<&str>,
    req: &mut Request<B>,
) -> Result<(), ProxyError> {
    crate::transport::forward::check_http1_head(req)?;
    let user = mesh
        .authn
        .authenticate(req.headers_mut(), &state.local_metrics)?;
    let path = req.uri().path();
    if !mesh
        .authz
        .allows_request(peer, user.as_deref(), req.method(), path)
    {
        let who = match (&user, peer) {
            (Some(u), Some(p)) => format!("{p} (for {})", u.principal),
            (Some(u), None) => u.principal.clone(),
            (None, Some(p)) => p.to_string(),
            (None, None) => "an unauthenticated caller".to_string(),
        };
        return Err(ProxyError::new(
            Cause::Denied,
            format!("{who} may not {} {path}", req.method()),
        ));
    }
    mesh.authz.rate_limit(peer, path).map_err(|wait| {
        state.local_metrics.rate_limited();
        ProxyError::rate_limited(wait)
    })?;
    let rule = || {
        mesh.local.as_ref().and_then(|svc| {
            svc.rules
                .iter()
                .find(|r| r.matches(req.method(), path, req.headers()))
        })
    };
    crate::mesh::route::check_upgrade(rule, req)
}

async fn relay<I>(state: &State, io: I, activity: Arc<Activity>, app: &App, peer: Option<Arc<str>>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &state.limits;
    let mut obs = TcpObserved::begin(INBOUND, &state.workload.fqdn());
    obs.upstream = Some(app.addr);
    obs.peer = peer;
    let idle = state
        .mesh
        .load()
        .local_port(app.addr.port(), app.explicit)
        .and_then(|p| p.idle_timeout)
        .unwrap_or(limits.tcp_idle_timeout);
    match connect::tcp(app.addr, limits.connect_timeout).await {
        Ok(upstream) => {
            let r = crate::transport::tcp::relay_tracked(io, upstream, activity, idle).await;
            obs.finish_relay(&state.telemetry, r);
        }
        Err(e) => {
            tracing::debug!(error = %e, "inbound tcp: application unreachable");
            obs.finish(&state.telemetry, 0, 0, Some(e.to_string()));
        }
    }
}
