//! I/O wrappers used on every proxied connection: [`Watched`] reports the
//! bytes each read and write moves ([`Tracked`]: that bytes moved lately,
//! for the idle timeout; [`Counts`]: how many), and [`Prefixed`] replays
//! bytes already read by protocol detection.

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a connection has moved a byte lately, in either direction, and
/// how many of its requests are in flight. Each read or write bumps a counter
/// (no clock read per I/O); the watchdog samples it every half timeout, so
/// idleness is noticed between one and one and a half timeouts after the last
/// byte. A connection with a request in flight is never idle: a quiet gRPC
/// call or long poll may go minutes without a byte.
#[derive(Debug, Default)]
pub struct Activity {
    ticks: AtomicU64,
    in_flight: AtomicU32,
}

/// One request in flight on a connection; the connection cannot be idle
/// until it is dropped (when the response body ends or is abandoned).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity::default())
    }

    #[inline]
    pub fn touch(&self) {
        // Only this connection's task writes it: no read-modify-write needed.
        let t = self.ticks.load(Ordering::Relaxed);
        self.ticks.store(t.wrapping_add(1), Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Resolves once no byte has moved for `timeout` with no request in flight.
    pub async fn idle(&self, timeout: Duration) {
        let step = (timeout / 2).max(Duration::from_millis(1));
        let mut last = self.ticks.load(Ordering::Relaxed);
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(step).await;
            let now = self.ticks.load(Ordering::Relaxed);
            if now == last && self.in_flight.load(Ordering::Relaxed) == 0 {
                quiet += step;
                if quiet >= timeout {
                    return;
                }
            } else {
                last = now;
                quiet = Duration::ZERO;
            }
        }
    }
}

/// TCP keep-alive on a proxied connection: a peer that vanished (its host
/// died, a NAT forgot the flow) is found within about two minutes, so a
/// long idle timeout never leaves a dead socket held open for its length.
pub fn keepalive(stream: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "could not set TCP keep-alive");
    }
}

/// What an I/O wrapper ([`Watched`]) is told: how many bytes each read
/// and each write moved.
pub trait OnBytes {
    fn read(&mut self, n: usize);
    fn written(&mut self, n: usize);
}

pin_project! {
    /// An I/O object whose reads and writes are reported to `watch`.
    pub struct Watched<T, W> {
        #[pin]
        inner: T,
        watch: W,
    }
}

/// An I/O object that records its activity (for the idle timeout).
pub type Tracked<T> = Watched<T, Arc<Activity>>;

impl OnBytes for Arc<Activity> {
    #[inline]
    fn read(&mut self, n: usize) {
        if n > 0 {
            self.touch();
        }
    }

    #[inline]
    fn written(&mut self, n: usize) {
        if n > 0 {
            self.touch();
        }
    }
}

/// The bytes read from and written to an I/O object.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub written: u64,
}

impl OnBytes for Counts {
    fn read(&mut self, n: usize) {
        self.read += n as u64;
    }

    fn written(&mut self, n: usize) {
        self.written += n as u64;
    }
}

impl<T, W> Watched<T, W> {
    pub fn new(inner: T, watch: W) -> Self {
        Watched { inner, watch }
    }

    /// What was reported so far.
    pub fn watch(&self) -> &W {
        &self.watch
    }
}

impl<T: AsyncRead, W: OnBytes> AsyncRead for Watched<T, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        this.watch.read(buf.filled().len() - before);
        r
    }
}

impl<T: AsyncWrite, W: OnBytes> AsyncWrite for Watched<T, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.watch.written(n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.watch.written(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project! {
    /// Replays `prefix` before reading from `inner`.
    pub struct Prefixed<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    #[tokio::test]
    async fn idle_resolves_only_after_silence() {
        let act = Activity::new();
        let (a, _b) = tokio::io::duplex(64);
        let mut t = Tracked::new(a, act.clone());
        let start = tokio::time::Instant::now();
        t.write_all(b"x").await.unwrap();
        act.idle(Duration::from_millis(200)).await;
        assert!(start.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn a_request_in_flight_keeps_a_silent_connection_from_idling() {
        let act = Activity::new();
        let request = act.start_request();
        let quiet = tokio::time::timeout(
            Duration::from_millis(500),
            act.idle(Duration::from_millis(100)),
        );
        assert!(quiet.await.is_err(), "idle while a request was in flight");
        drop(request);
        let start = tokio::time::Instant::now();
        act.idle(Duration::from_millis(100)).await;
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
