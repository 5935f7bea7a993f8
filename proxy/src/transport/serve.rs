//! Serving one downstream HTTP connection with the proxy's limits, the idle
//! timeout and graceful drain. A connection whose protocol is known (detected
//! from its first bytes, or agreed by ALPN) is served by hyper's HTTP/1 or
//! HTTP/2 server directly; only an unknown one goes through the auto builder,
//! which reads the preface itself and keeps a rewind layer under every read.

use crate::transport::body::ProxyBody;
use crate::transport::drain::Drain;
use crate::transport::io::{Activity, Tracked};
use crate::transport::limits::Limits;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

/// The HTTP server settings every listener uses, per protocol.
pub struct Builder {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// Which HTTP a connection speaks, as far as the proxy knows before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http1,
    Http2,
    /// Not known: hyper tells from the preface.
    Either,
}

impl Speaks {
    /// What protocol detection found; opaque bytes are left to hyper to refuse.
    pub fn detected(d: crate::transport::detect::Detected) -> Speaks {
        match d {
            crate::transport::detect::Detected::Http1 => Speaks::Http1,
            crate::transport::detect::Detected::Http2 => Speaks::Http2,
            _ => Speaks::Either,
        }
    }
}

/// The HTTP/1 settings, for hyper's own builder and the auto builder's (two
/// types with the same methods).
macro_rules! http1_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes)
            .keep_alive(true)
    };
}

/// The HTTP/2 settings, likewise.
macro_rules! http2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($limits.h2_max_concurrent_streams)
            .max_pending_accept_reset_streams($limits.h2_max_pending_reset_streams)
            .max_header_list_size($limits.max_header_bytes as u32)
            .keep_alive_interval($limits.h2_keepalive_interval)
            .keep_alive_timeout($limits.h2_keepalive_timeout)
            .initial_stream_window_size(crate::transport::limits::H2_STREAM_WINDOW)
            .initial_connection_window_size($limits.h2_connection_window())
    };
}

/// The HTTP server settings every listener uses.
pub fn builder(limits: &Limits) -> Builder {
    let mut h1 = http1::Builder::new();
    http1_settings!(h1, limits);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    http2_settings!(h2, limits);
    let mut auto = auto::Builder::new(TokioExecutor::new());
    http1_settings!(auto.http1(), limits);
    http2_settings!(auto.http2(), limits);
    Builder { h1, h2, auto }
}

/// Serves `io` until the client is done, the connection is idle for
/// `idle_timeout`, or a drain finishes it gracefully.
pub async fn serve_http<I, F, Fut>(
    builder: &Builder,
    io: I,
    speaks: Speaks,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    drain: Drain,
    handler: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let requests = activity.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        // In flight until its response body ends: the connection may be
        // silent meanwhile (a quiet gRPC call) without being idle.
        let in_flight = Some(requests.start_request());
        // The request's future (route, policy, retries, forwarding) is several
        // KiB. HTTP/2 moves each stream's future into a task of its own, so it
        // is boxed there and a pointer moves; HTTP/1 keeps it in a slot the
        // connection reuses, so boxing would only add an allocation.
        if req.version() == http::Version::HTTP_2 {
            Handled::Boxed {
                fut: Box::pin(handler(req)),
                in_flight,
            }
        } else {
            Handled::Inline {
                fut: handler(req),
                in_flight,
            }
        }
    });
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    // The drain and the idle timer are watched on a task of their own: the
    // connection's task, woken several times per request, then polls one
    // oneshot beside hyper instead of a watch channel and a timer.
    let (stop, watchdog) = watchdog(activity, idle_timeout, drain.clone());
    match speaks {
        Speaks::Http1 => {
            let conn = builder.h1.serve_connection(io, svc).with_upgrades();
            drive(conn, stop, |c| c.graceful_shutdown()).await
        }
        Speaks::Http2 => {
            let conn = builder.h2.serve_connection(io, svc);
            drive(conn, stop, |c| c.graceful_shutdown()).await
        }
        Speaks::Either => {
            let conn = builder.auto.serve_connection_with_upgrades(io, svc);
            drive(conn, stop, |c| c.graceful_shutdown()).await
        }
    }
    watchdog.abort();
    // Held until here: the drain waits for this connection, not for its watchdog.
    drop(drain);
}

/// Why a connection is ended from outside.
enum Stop {
    Drain,
    Idle,
}

fn watchdog(
    activity: Arc<Activity>,
    idle_timeout: Duration,
    mut drain: Drain,
) -> (oneshot::Receiver<Stop>, tokio::task::AbortHandle) {
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let why = tokio::select! {
            _ = drain.signaled() => Stop::Drain,
            _ = activity.idle(idle_timeout) => Stop::Idle,
        };
        let _ = tx.send(why);
    });
    (rx, task.abort_handle())
}

/// Drives `conn` to its end, or until the watchdog stops it: gracefully for
/// a drain (in-flight requests finish), at once when idle.
async fn drive<C, E>(conn: C, stop: oneshot::Receiver<Stop>, graceful: impl FnOnce(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let done = tokio::select! {
        biased;
        r = conn.as_mut() => Some(r),
        why = stop => match why {
            Ok(Stop::Drain) => {
                graceful(conn.as_mut());
                Some(conn.await)
            }
            Ok(Stop::Idle) => {
                tracing::debug!("closing idle http connection");
                None
            }
            // The watchdog cannot end without a word; serve on regardless.
            Err(_) => Some(conn.await),
        },
    };
    if let Some(Err(e)) = done {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

pin_project_lite::pin_project! {
    /// One request's answer, its future inline or on the heap, and the
    /// request's place among the connection's requests in flight (moved into
    /// the response body, which holds it until it ends).
    #[project = HandledProj]
    enum Handled<F> {
        Inline { #[pin] fut: F, in_flight: Option<crate::transport::io::InFlight> },
        Boxed { fut: std::pin::Pin<Box<F>>, in_flight: Option<crate::transport::io::InFlight> },
    }
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Handled<F> {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let (poll, in_flight) = match self.project() {
            HandledProj::Inline { fut, in_flight } => (fut.poll(cx), in_flight),
            HandledProj::Boxed { fut, in_flight } => (fut.as_mut().poll(cx), in_flight),
        };
        poll.map(|mut resp| {
            if let Some(tail) = resp.body_mut().tail() {
                tail.in_flight = in_flight.take();
            }
            Ok(resp)
        })
    }
}

/// Accepts connections until the drain starts, each served by `connection`
/// on a task of its own (which holds a [`Drain`] so the drain waits for it).
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    mut drain: Drain,
    side: &'static str,
    connection: F,
) where
    F: Fn(tokio::net::TcpStream, Drain) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    crate::transport::io::keepalive(&stream);
                    tokio::spawn(connection(stream, drain.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off, keep serving.
                    tracing::warn!(error = %e, side, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.signaled() => return,
        }
    }
}
