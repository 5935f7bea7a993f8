//! Serving one downstream HTTP connection (HTTP/1.1 or HTTP/2, told apart by
//! hyper's auto builder) with the proxy's limits, the idle timeout and graceful
//! drain.

use crate::body::ProxyBody;
use crate::config::Limits;
use crate::drain::Drain;
use crate::io::{Activity, Tracked};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub type Builder = auto::Builder<TokioExecutor>;

/// The HTTP server settings every listener uses.
pub fn builder(limits: &Limits) -> Builder {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Serves `io` until the client is done, the connection is idle for
/// `idle_timeout`, or a drain finishes it gracefully.
pub async fn serve_http<I, F, Fut>(
    builder: &Builder,
    io: I,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    mut drain: Drain,
    handler: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        // The request's future (route, policy, retries, forwarding) is several
        // KiB. HTTP/2 moves each stream's future into a task of its own, so it
        // is boxed there and a pointer moves; HTTP/1 keeps it in a slot the
        // connection reuses, so boxing would only add an allocation.
        if req.version() == http::Version::HTTP_2 {
            Handled::Boxed {
                fut: Box::pin(handler(req)),
            }
        } else {
            Handled::Inline { fut: handler(req) }
        }
    });
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        _ = activity.idle(idle_timeout) => {
            tracing::debug!(?idle_timeout, "closing idle http connection");
        }
    }
}

pin_project_lite::pin_project! {
    /// One request's answer, its future inline or on the heap.
    #[project = HandledProj]
    enum Handled<F> {
        Inline { #[pin] fut: F },
        Boxed { fut: std::pin::Pin<Box<F>> },
    }
}

impl<F: Future<Output = Response<ProxyBody>>> Future for Handled<F> {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            HandledProj::Inline { fut } => fut.poll(cx).map(Ok),
            HandledProj::Boxed { fut } => fut.as_mut().poll(cx).map(Ok),
        }
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
