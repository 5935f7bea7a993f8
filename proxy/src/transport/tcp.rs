//! Opaque TCP: bytes copied both ways until both sides are done, the
//! connection has been idle for the idle timeout, or the proxy drains and the
//! grace period ends (the process exits).

use crate::transport::io::{Activity, Counts, Tracked, Watched};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

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
    // The upstream side's bytes are counted, so a connection that ends in
    // an error still reports what it carried.
    let mut b = Watched::new(b, Counts::default());
    let error = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024) => r.err(),
        _ = activity.idle(idle_timeout) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {idle_timeout:?}"),
        )),
    };
    let carried = *b.watch();
    Relayed {
        from_client: carried.written,
        to_client: carried.read,
        error,
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
