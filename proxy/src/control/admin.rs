//! The proxy's own small HTTP endpoints.
//! - health (default 0.0.0.0:15020): `/ready`, `/live`, `/metrics`;
//! - admin (127.0.0.1:15000 only): `/config_dump`, `/logging`, `/shutdown`.
//!
//! Neither touches the data path, and neither can be starved or exhausted by
//! connections that say nothing: each holds at most [`HEALTH_MAX_CONNECTIONS`]
//! / [`ADMIN_MAX_CONNECTIONS`] connections, a new connection at the cap takes
//! the place of the oldest idle one (no request being answered), and a request
//! head must arrive within [`HEAD_READ_TIMEOUT`] of the connection opening or
//! of the previous answer, so a probe or a scrape always gets through.

use crate::data::state::State;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Connections the health listener holds at once (probes, scrapes).
pub const HEALTH_MAX_CONNECTIONS: usize = 64;
/// Connections the admin listener (127.0.0.1 only) holds at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;
/// Time to send a request head, from the connection's start or the previous
/// answer (so an idle keep-alive connection is closed after it too).
pub const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is kept, whatever it does.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

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

/// The connections of one small listener: at most `max`; at the cap a new
/// one evicts the oldest idle one, and is refused only when all are busy.
struct Slots {
    max: usize,
    inner: Mutex<SlotsInner>,
}

#[derive(Default)]
struct SlotsInner {
    next_id: u64,
    /// By id, which is also by age: whether busy, and how to evict it.
    conns: BTreeMap<u64, (bool, Arc<Notify>)>,
}

/// One connection's place; freed when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evict: Arc<Notify>,
}

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotsInner> {
        self.inner.lock()
    }

    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.lock();
        if inner.conns.len() >= self.max {
            let oldest_idle = inner
                .conns
                .iter()
                .find(|(_, (busy, _))| !busy)
                .map(|(id, _)| *id)?;
            if let Some((_, evict)) = inner.conns.remove(&oldest_idle) {
                // Kept as a permit if its task is not waiting yet.
                evict.notify_one();
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = Arc::new(Notify::new());
        inner.conns.insert(id, (false, evict.clone()));
        Some(Slot {
            slots: self.clone(),
            id,
            evict,
        })
    }
}

impl Slot {
    fn set_busy(&self, busy: bool) {
        if let Some(conn) = self.slots.lock().conns.get_mut(&self.id) {
            conn.0 = busy;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().conns.remove(&self.id);
    }
}

/// Marks a slot idle again when a request's answer is done (or dropped).
struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set_busy(false);
    }
}

/// Serves a small HTTP/1.1 endpoint: at most `max_connections` connections,
/// idle ones evicted first, request heads read within [`HEAD_READ_TIMEOUT`].
async fn serve_small<F, Fut>(listener: TcpListener, max_connections: usize, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let slots = Slots::new(max_connections);
    loop {
        // Accepts at once, never waiting for a free slot: a new connection
        // takes an idle one's place.
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(slot) = slots.admit() else {
            tracing::debug!(%peer, "every connection is busy; refused");
            continue;
        };
        let slot = Arc::new(slot);
        let handler = handler.clone();
        tokio::spawn(async move {
            let in_service = slot.clone();
            let svc = hyper::service::service_fn(move |req| {
                in_service.set_busy(true);
                let busy = Busy(in_service.clone());
                let fut = handler(req);
                async move {
                    let reply = fut.await;
                    drop(busy);
                    Ok::<_, Infallible>(reply)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = slot.evict.notified() => {
                    tracing::debug!(%peer, "idle connection closed to make room");
                }
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
        });
    }
}

pub async fn serve_health(state: Arc<State>, listener: TcpListener) {
    serve_small(listener, HEALTH_MAX_CONNECTIONS, move |req| {
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
    current_log: Arc<ArcSwap<String>>,
) {
    serve_small(listener, ADMIN_MAX_CONNECTIONS, move |req| {
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
                        "service": state.workload.service,
                        "namespace": state.workload.namespace,
                        "resources": resources,
                        "endpoints": endpoints,
                    });
                    reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
                }
                (&Method::GET, "/logging") => {
                    let level = current_log.load_full();
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
                            current_log.store(Arc::new(level.clone()));
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
