//! The proxy's own small HTTP endpoints.
//! - health (default 0.0.0.0:15020): `/ready`, `/live`, `/metrics`;
//! - admin (127.0.0.1:15000 only): `/config_dump`, `/logging`, `/shutdown`.
//!
//! Both read with a timeout and answer from the shared state; neither touches
//! the data path.

use crate::state::State;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Serves a small HTTP/1.1 endpoint with a header read timeout.
async fn serve_small<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

pub async fn serve_health(state: Arc<State>, listener: TcpListener) {
    serve_small(listener, move |req| {
        let state = state.clone();
        async move {
            match req.uri().path() {
                "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
                "/ready" if state.is_ready() => reply(StatusCode::OK, "text/plain", "ready\n"),
                "/ready" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
                "/metrics" => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    state.telemetry.render_metrics(),
                ),
                _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        }
    })
    .await
}

/// Changes the log filter at run time.
pub type LogReload = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub async fn serve_admin(
    state: Arc<State>,
    listener: TcpListener,
    shutdown: Arc<Notify>,
    reload: LogReload,
    current_log: Arc<std::sync::Mutex<String>>,
) {
    serve_small(listener, move |req| {
        let state = state.clone();
        let shutdown = shutdown.clone();
        let reload = reload.clone();
        let current_log = current_log.clone();
        async move {
            match (req.method(), req.uri().path()) {
                (&Method::GET, "/config_dump") => {
                    let mesh = state.mesh.load();
                    let snap = &mesh.snapshot;
                    let resources: Vec<serde_json::Value> = snap
                        .resources
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "kind": r.kind, "namespace": r.namespace, "name": r.name,
                                "spec": serde_json::from_str::<serde_json::Value>(&r.spec_json)
                                    .unwrap_or(serde_json::Value::Null),
                            })
                        })
                        .collect();
                    let endpoints: Vec<serde_json::Value> = snap
                        .endpoints
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "service": e.service, "namespace": e.namespace,
                                "instance_id": e.instance_id, "address": e.address,
                                "labels": e.labels, "identity": e.identity,
                            })
                        })
                        .collect();
                    let body = serde_json::json!({
                        "version": mesh.version,
                        "policy_version": mesh.policy_version,
                        "service": state.settings.service,
                        "namespace": state.settings.namespace,
                        "resources": resources,
                        "endpoints": endpoints,
                    });
                    reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
                }
                (&Method::GET, "/logging") => {
                    let level = current_log.lock().map(|l| l.clone()).unwrap_or_default();
                    reply(StatusCode::OK, "text/plain", format!("{level}\n"))
                }
                (&Method::POST | &Method::PUT, "/logging") => {
                    let level = req
                        .uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
                        .unwrap_or("")
                        .to_string();
                    match reload(&level) {
                        Ok(()) => {
                            if let Ok(mut l) = current_log.lock() {
                                *l = level.clone();
                            }
                            reply(StatusCode::OK, "text/plain", format!("{level}\n"))
                        }
                        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                    }
                }
                (&Method::POST, "/shutdown") => {
                    shutdown.notify_one();
                    reply(StatusCode::OK, "text/plain", "draining\n")
                }
                _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        }
    })
    .await
}
