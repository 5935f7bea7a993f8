//! Protocol detection: read a client's first bytes, within a bounded time, to
//! tell HTTP/2 (prior knowledge), HTTP/1 and anything else (opaque TCP). A
//! client that sends nothing in time (a server-speaks-first protocol) is opaque.

use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello (record type 22, version 3.x).
    Tls,
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Enough for the HTTP/2 preface and the longest method.
const PEEK: usize = 24;

/// What `bytes` can still turn out to be.
fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(0x03) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut maybe = false;
    for m in METHODS {
        let k = bytes.len().min(m.len());
        if bytes[..k] == m[..k] {
            if k == m.len() {
                return Some(Detected::Http1);
            }
            maybe = true;
        }
    }
    if maybe {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Reads until the protocol is known, EOF, or `timeout`. Returns what was
/// read, to be replayed in front of the stream.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> std::io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        if buf.len() >= PEEK {
            return Ok((Detected::Opaque, buf.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok((Detected::Opaque, buf.freeze())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * HTTP"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tls));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x10"), Some(Detected::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING"), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let (d, b) = detect(&mut server, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(b.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn bytes_split_across_reads_are_kept() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            client.write_all(b"PO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (d, b) = detect(&mut server, Duration::from_secs(2)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(b.starts_with(b"POST "));
    }
}
