//! Opaque TCP: bytes copied both ways until both sides are done, the
//! connection has been idle for the idle timeout, or the proxy drains and the
//! grace period ends (the process exits).

use crate::io::{Activity, Tracked};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Copies between `a` and `b`. Returns the bytes sent each way (a→b, b→a).
pub async fn relay<A, B>(a: A, b: B, idle_timeout: Duration) -> std::io::Result<(u64, u64)>
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
) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Tracked::new(a, activity.clone());
    let mut b = b;
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024) => r,
        _ = activity.idle(idle_timeout) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("idle for {idle_timeout:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_ends_on_idle() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(proxy_a, proxy_b, Duration::from_millis(200)));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Then silence: the relay gives up after the idle timeout.
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
