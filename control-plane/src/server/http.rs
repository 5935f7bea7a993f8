//! The control plane's small HTTP server (default 127.0.0.1:15014):
//! `/live`, `/ready` and `/metrics` (Prometheus text).

use crate::discovery::registry::Registry;
use crate::identity::ca::Authority;
use crate::metrics::certs::CertMetrics;
use crate::server::conn_limit::ConnLimiter;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client may take to send a request head, counted from when
/// the connection is accepted or its previous answer was sent (so an idle
/// keep-alive connection is closed after it too): `--http-header-read-timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most HTTP connections held at once (`--http-max-connections`); at the
/// cap, the oldest idle one (no request being answered) is closed for a new
/// one, so idle connections cannot keep a scrape or a probe out.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// What the HTTP endpoints report on.
#[derive(Debug)]
pub struct Health {
    pub ready: AtomicBool,
    pub registry: Arc<Registry>,
    pub certs: Arc<CertMetrics>,
    pub authority: Arc<Authority>,
    /// The listeners' connection slots (`remora_control_connections_shed_total`).
    pub listeners: Vec<Arc<ConnLimiter>>,
}

/// Serves until `shutdown` resolves; each connection holds a slot of `slots`
/// and must send each request head within `header_read_timeout`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    slots: Arc<ConnLimiter>,
    header_read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let upkeep = tokio::spawn(upkeep(vec![
        health.registry.metrics.handle(),
        health.certs.handle(),
    ]));
    let _stop_upkeep = AbortOnDrop(upkeep);
    tokio::pin!(shutdown);
    loop {
        // Never waits for a free slot before accepting: a new connection
        // takes the slot of an idle one instead.
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            tracing::debug!(%peer, "every HTTP connection is busy; connection refused");
            continue;
        };
        let health = health.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let in_service = slot.clone();
            let service = service_fn(move |req| {
                // Busy while answering; idle (evictable) while waiting for
                // the next request head.
                in_service.set_busy(true);
                let response = respond(&health, &req);
                in_service.set_busy(false);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = slot.evicted() => {
                    tracing::debug!(%peer, "idle http connection closed to make room");
                }
                result = connection => match result {
                    Err(e) if e.is_timeout() => slots.count_timeout(),
                    Err(e) => tracing::debug!(error = %e, "http connection ended"),
                    Ok(()) => {}
                },
            }
        });
    }
}

/// Aborts a task when dropped (when `serve` returns or is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn respond(health: &Health, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if health.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => text(StatusCode::OK, metrics(health)),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The Prometheus text exposition of the control plane's metrics.
///
/// Each part of one control plane records on its own `metrics` recorder (the
/// registry, the Identity service), never the process-global one, so several
/// control planes in one process (tests) count apart; the parts' metric names
/// are disjoint, so their texts concatenate into one valid exposition.
pub fn metrics(health: &Health) -> String {
    let ca = health.authority.current();
    let registry = &health.registry;
    registry.metrics.set_ca(ca.rotating(), ca.roots.len());
    let mut out = registry.metrics.render();
    health.certs.render(&mut out);
    if !health.listeners.is_empty() {
        crate::server::conn_limit::render_header(&mut out);
        for listener in &health.listeners {
            listener.render(&mut out);
        }
    }
    out
}

/// How often recorded histogram samples are folded into their buckets when
/// nobody scrapes, so memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the upkeep of `handles` every [`UPKEEP_INTERVAL`] until the task ends.
async fn upkeep(handles: Vec<PrometheusHandle>) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for handle in &handles {
            handle.run_upkeep();
        }
    }
}
