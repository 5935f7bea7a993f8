//! The control plane's small HTTP server (default 127.0.0.1:15014):
//! `/live`, `/ready` and `/metrics` (Prometheus text).

use crate::ca::Authority;
use crate::identity::CertMetrics;
use crate::registry::Registry;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most HTTP connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

/// What the HTTP endpoints report on.
#[derive(Debug)]
pub struct Health {
    pub ready: AtomicBool,
    pub registry: Arc<Registry>,
    pub certs: Arc<CertMetrics>,
    pub authority: Arc<Authority>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
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
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(respond(&health, &req)) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended");
            }
            drop(permit);
        });
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
pub fn metrics(health: &Health) -> String {
    let registry = &health.registry;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "remora_control_proxies_connected",
        "gauge",
        "Proxies with an open discovery stream.",
        registry.proxies_connected() as u64,
    );
    metric(
        "remora_config_version",
        "gauge",
        "The policy version in force.",
        registry.policy_version(),
    );
    metric(
        "remora_control_pushes_total",
        "counter",
        "Snapshots sent to proxies.",
        registry.counters.pushes.load(Ordering::Relaxed),
    );
    metric(
        "remora_control_nacks_total",
        "counter",
        "Snapshots refused by proxies.",
        registry.counters.nacks.load(Ordering::Relaxed),
    );
    let ca = health.authority.current();
    metric(
        "remora_control_ca_rotation_in_progress",
        "gauge",
        "1 while an old root is being retired.",
        u64::from(ca.rotating()),
    );
    metric(
        "remora_control_ca_trusted_roots",
        "gauge",
        "Roots in the trust bundle.",
        ca.roots.len() as u64,
    );
    health.certs.render(&mut out);
    out
}
