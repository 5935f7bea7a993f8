//! Opening an upstream connection: TCP, then, to a peer sidecar, mTLS with
//! this workload's certificate ([`tls::connect`]). The caller says how, in a
//! [`Connect`]: the outbound path asks for mTLS, the inbound path (to the
//! local application) for plain TCP. A pool opens a connection this way only
//! when it has none ready.

use crate::transport::error::{Cause, ProxyError};
use crate::transport::tls::identity::Identity;
use crate::transport::tls::{self, Carry};
use rustls::pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How to open a new upstream connection.
pub struct Connect<'a> {
    /// Time to establish the TCP connection.
    pub timeout: Duration,
    /// The destination's connection limit, for a connection a request opens.
    pub limit: Option<ConnLimit<'a>>,
    /// The certificate presented to a mesh peer (mTLS); None: plaintext only.
    pub mtls: Option<&'a Identity>,
}

/// The destination's connection limit (its bulkhead's `maxConnections`).
pub struct ConnLimit<'a> {
    pub bulkhead: &'a remora_resilience::Bulkhead,
    pub critical: bool,
}

impl<'a> Connect<'a> {
    /// Plain TCP within `timeout` (the local application, a passthrough).
    pub fn plain(timeout: Duration) -> Connect<'static> {
        Connect {
            timeout,
            limit: None,
            mtls: None,
        }
    }

    /// TCP within `timeout`, then mTLS with `identity`'s certificate to a
    /// peer that must prove the identity its address is expected to have.
    pub fn mtls(identity: &'a Identity, timeout: Duration) -> Connect<'a> {
        Connect {
            timeout,
            limit: None,
            mtls: Some(identity),
        }
    }

    /// A new connection takes a permit from `limit` first.
    pub fn limited(mut self, limit: Option<ConnLimit<'a>>) -> Connect<'a> {
        self.limit = limit;
        self
    }

    /// A permit for one more connection, held until it closes.
    pub fn permit(&self) -> Result<Option<remora_resilience::ConnPermit>, ProxyError> {
        let Some(l) = &self.limit else {
            return Ok(None);
        };
        l.bulkhead
            .try_acquire_connection(l.critical)
            .map(Some)
            .map_err(|e| ProxyError::new(Cause::Overloaded, format!("connections: {e}")))
    }

    /// Opens a connection to `addr`: TCP, then mTLS for a mesh `peer` (the
    /// TLS server name that carries the identity it must prove), the
    /// handshake within `handshake_timeout`, carrying what `carry` says.
    pub async fn open(
        &self,
        addr: SocketAddr,
        peer: Option<&ServerName<'static>>,
        carry: Carry,
        handshake_timeout: Duration,
    ) -> Result<Conn, ProxyError> {
        let tcp = tcp(addr, self.timeout).await?;
        let Some(peer) = peer else {
            return Ok(Conn::Plain(tcp));
        };
        let identity = self.mtls.ok_or_else(|| {
            ProxyError::connect(format!("{addr}: a mesh peer, and no mTLS to reach it"))
        })?;
        let configs = identity
            .configs()
            .ok_or_else(|| ProxyError::connect("no workload certificate yet"))?;
        let stream = tls::connect(tcp, addr, peer, &configs, carry, handshake_timeout).await?;
        Ok(Conn::Tls(Box::new(stream)))
    }
}

/// Opens a TCP connection within `timeout` (no delay, keep-alive on).
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            crate::transport::io::keepalive(&s);
            Ok(s)
        }
        Ok(Err(e)) => Err(ProxyError::connect(format!("connect {addr}: {e}")).with_source(e)),
        Err(_) => Err(ProxyError::connect(format!(
            "connect {addr}: timed out after {timeout:?}"
        ))),
    }
}

/// An upstream connection: plaintext (the local app, a passthrough) or mTLS
/// (a mesh peer).
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}
