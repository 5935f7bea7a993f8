//! Opaque TCP: bytes copied both ways until both sides are done, the
//! connection has been idle for the idle timeout, or the proxy drains and the
//! grace period ends (the process exits).

use crate::transport::io::{Activity, Tracked};
use pin_project_lite::pin_project;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a relayed connection went: the bytes that really moved each way,
/// however it ended, and why it ended if not cleanly.
#[derive(Debug)]
pub struct Relayed {
    /// From the client (`a`) to the upstream (`b`).
    pub from_client: u64,
    /// From the upstream to the client.
    pub to_client: u64,
    pub error: Option<io::Error>,
}

/// Copies between `a` and `b` (the client and the upstream).
pub async fn relay<A, B>(a: A, b: B, idle_timeout: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    relay_tracked(a, b, activity, idle_timeout).await
}

/// As [`relay`], with an activity record shared with the caller's connection.
pub async fn relay_tracked<A, B>(
    a: A,
    b: B,
    activity: Arc<Activity>,
    idle_timeout: Duration,
) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Tracked::new(a, activity.clone());
    let mut b = Counted {
        inner: b,
        read: 0,
        written: 0,
    };
    let error = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024) => r.err(),
        _ = activity.idle(idle_timeout) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {idle_timeout:?}"),
        )),
    };
    Relayed {
        from_client: b.written,
        to_client: b.read,
        error,
    }
}

pin_project! {
    /// Counts the bytes read from and written to the upstream side, so a
    /// connection that ends in an error still reports what it carried.
    struct Counted<T> {
        #[pin]
        inner: T,
        read: u64,
        written: u64,
    }
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        *this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            *this.written += n as u64;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_ends_on_idle_with_the_bytes_it_carried() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(proxy_a, proxy_b, Duration::from_millis(200)));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong!").await.unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong!");
        // Then silence: the relay gives up after the idle timeout, and still
        // says what it carried.
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.error.unwrap().kind(), io::ErrorKind::TimedOut);
        assert_eq!((r.from_client, r.to_client), (4, 5));
    }

    #[tokio::test]
    async fn a_reset_midway_still_reports_the_bytes_carried() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(proxy_a, proxy_b, Duration::from_secs(30)));
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"abc").await.unwrap();
        client.read_exact(&mut [0u8; 3]).await.unwrap();
        drop(server);
        drop(client);
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((r.from_client, r.to_client), (5, 3));
    }
}
