//! A hyper-util connector for a proxy in explicit mode: every connection goes to
//! the proxy, and the connection is marked as proxied so that HTTP/1 requests keep
//! their absolute-form target (`GET http://backend.shop:8080/ HTTP/1.1`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Dials the proxy whatever the request's URI names.
#[derive(Debug, Clone, Copy)]
pub struct ProxyConnector {
    proxy: SocketAddr,
}

impl ProxyConnector {
    pub fn new(proxy: SocketAddr) -> Self {
        Self { proxy }
    }
}

impl tower::Service<Uri> for ProxyConnector {
    type Response = TokioIo<ProxiedTcp>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let proxy = self.proxy;
        Box::pin(async move {
            let tcp = TcpStream::connect(proxy).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(ProxiedTcp(tcp)))
        })
    }
}

/// A TCP connection to a proxy.
#[derive(Debug)]
pub struct ProxiedTcp(pub TcpStream);

impl Connection for ProxiedTcp {
    fn connected(&self) -> Connected {
        Connected::new().proxy(true)
    }
}

impl AsyncRead for ProxiedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxiedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
