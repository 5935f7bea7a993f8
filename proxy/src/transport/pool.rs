//! Upstream connections, pooled per endpoint address.
//!
//! HTTP/1.1: a bounded stack of idle connections; a connection goes back on it
//! once its response has been read completely. HTTP/2: one multiplexed
//! connection per endpoint, shared by every request. A request that failed
//! before any byte of it was written (the pooled connection had just been
//! closed by the peer) is sent again on a fresh connection.
//!
//! Pools outlive configuration snapshots: [`Pools::get`] hands the same pool to
//! every snapshot that names the address, so a config push keeps connections.
//!
//! A pool for a mesh endpoint (one with an expected identity) opens its
//! connections the way its caller's [`Connect`] says: mTLS, on the outbound
//! path. Every HTTP request then goes over one multiplexed HTTP/2 connection
//! (ALPN `h2`), upgrades over HTTP/1.1 (ALPN `http/1.1`), opaque TCP with
//! ALPN `remora-tcp`.

use crate::transport::body::{Checkin, Home, ProxyBody};
use crate::transport::connect::{Conn, Connect};
use crate::transport::error::ProxyError;
use crate::transport::limits::Limits;
use crate::transport::tls::Carry;
use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Idle HTTP/1 connections older than this are not reused.
const MAX_IDLE_AGE: Duration = Duration::from_secs(90);

/// Settings shared by every pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_idle_per_endpoint: usize,
    pub max_header_bytes: usize,
    /// Bounds a TLS handshake (the TCP connect has its caller's time limit).
    pub connect_timeout: Duration,
    /// An HTTP/2 connection's receive window (see `Limits::h2_connection_window`).
    pub h2_connection_window: u32,
    /// HTTP/2 pings to a peer sidecar: interval, then how long one may go
    /// unanswered. The local application is never pinged (gRPC servers count
    /// pings without data as abuse and answer GOAWAY `too_many_pings`).
    pub h2_keepalive: (Duration, Duration),
}

impl From<&Limits> for PoolSettings {
    fn from(limits: &Limits) -> PoolSettings {
        PoolSettings {
            max_idle_per_endpoint: limits.pool_max_idle,
            max_header_bytes: limits.max_header_bytes,
            connect_timeout: limits.connect_timeout,
            h2_connection_window: limits.h2_connection_window(),
            h2_keepalive: (limits.h2_keepalive_interval, limits.h2_keepalive_timeout),
        }
    }
}

/// Which HTTP version to speak upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Http1,
    Http2,
}

/// The registry of pools, keyed by address. Only touched when a snapshot is
/// compiled, never per request.
pub struct Pools {
    settings: PoolSettings,
    pools: Mutex<HashMap<PoolKey, Weak<EndpointPool>>>,
}

type PoolKey = (SocketAddr, Option<ServerName<'static>>);

impl Pools {
    pub fn new(settings: PoolSettings) -> Arc<Pools> {
        Arc::new(Pools {
            settings,
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// The pool for `addr`; `peer` is the TLS server name carrying the
    /// identity a mesh endpoint must prove (None: plaintext, e.g. the app).
    pub fn get(&self, addr: SocketAddr, peer: Option<ServerName<'static>>) -> Arc<EndpointPool> {
        let mut pools = self.pools.lock();
        let key = (addr, peer);
        if let Some(p) = pools.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        // Forget pools that no snapshot uses any more.
        pools.retain(|_, w| w.strong_count() > 0);
        let p = Arc::new(EndpointPool {
            addr,
            peer: key.1.clone(),
            settings: self.settings.clone(),
            h1_idle: Mutex::new(Vec::new()),
            h2: ArcSwapOption::empty(),
            h2_connecting: tokio::sync::Mutex::new(()),
            // An endpoint with no sample yet looks fast, so a new instance is tried
            // promptly; its first response sets its real estimate.
            load: remora_resilience::Load::with_config(
                Duration::ZERO,
                remora_resilience::load::DEFAULT_DECAY,
            ),
        });
        pools.insert(key, Arc::downgrade(&p));
        p
    }
}

struct IdleH1 {
    sender: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// The connections to one upstream address.
pub struct EndpointPool {
    addr: SocketAddr,
    peer: Option<ServerName<'static>>,
    settings: PoolSettings,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    h2_connecting: tokio::sync::Mutex<()>,
    /// In-flight requests and peak-EWMA latency, for the balancer.
    pub load: remora_resilience::Load,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.addr)
            .finish()
    }
}

impl EndpointPool {
    /// Whether this is a mesh endpoint, reached over mTLS.
    pub fn is_mesh(&self) -> bool {
        self.peer.is_some()
    }

    /// Opens a new connection as `connect` says: TCP, then, to a mesh
    /// endpoint, mTLS carrying what `carry` says.
    pub async fn open(&self, carry: Carry, connect: &Connect<'_>) -> Result<Conn, ProxyError> {
        connect
            .open(
                self.addr,
                self.peer.as_ref(),
                carry,
                self.settings.connect_timeout,
            )
            .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` and returns the response head; the body streams on. A new
    /// connection, if one is needed, is opened as `connect` says, first
    /// taking a permit from its limit (the destination's `maxConnections`),
    /// held until the connection closes.
    /// An HTTP/1 connection comes back as a [`Checkin`], to be returned to the
    /// pool when the response body has been read to its end.
    /// `upgrade`: the request asks to switch protocols (its connection is then
    /// never pooled again).
    pub async fn send(
        self: &Arc<Self>,
        req: http::Request<ProxyBody>,
        version: Upstream,
        upgrade: bool,
        connect: &Connect<'_>,
    ) -> Result<(http::Response<Incoming>, Option<Checkin>), ProxyError> {
        match version {
            Upstream::Http1 => self.send_h1(req, upgrade, connect).await,
            Upstream::Http2 => Ok((self.send_h2(req, connect).await?, None)),
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        req: http::Request<ProxyBody>,
        upgrade: bool,
        connect: &Connect<'_>,
    ) -> Result<(http::Response<Incoming>, Option<Checkin>), ProxyError> {
        let upgrade = upgrade || req.method() == http::Method::CONNECT;
        // Connecting is boxed: it is rare (a pooled connection is the rule), and
        // its TLS handshake would otherwise make every request's future
        // kilobytes larger, to be moved and allocated on each request.
        let (mut sender, pooled) = match self.checkout_h1() {
            Some(s) => (s, true),
            None => (Box::pin(self.connect_h1(connect)).await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // Never written: the pooled connection was closing. Try a new one.
                Some(req) if pooled => {
                    sender = Box::pin(self.connect_h1(connect)).await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| exchange_error(self.addr, e))?
                }
                _ => return Err(exchange_error(self.addr, e.into_error())),
            },
        };
        let checkin =
            (!upgrade && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then(|| {
                let home: Weak<EndpointPool> = Arc::downgrade(self);
                Checkin::new(home, sender)
            });
        Ok((resp, checkin))
    }

    /// A connection ready for a request. Closed or stale ones are dropped; one
    /// still finishing its last response (checked in at the response's end,
    /// before hyper marks it idle) stays for the next checkout.
    fn checkout_h1(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.h1_idle.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.sender.is_closed() || c.since.elapsed() >= MAX_IDLE_AGE {
                idle.swap_remove(i);
            } else if c.sender.is_ready() {
                return Some(idle.swap_remove(i).sender);
            }
        }
        None
    }
}

impl Home for EndpointPool {
    /// An HTTP/1 connection whose response was read whole: idle again.
    fn check_in(&self, sender: http1::SendRequest<ProxyBody>) {
        let mut idle = self.h1_idle.lock();
        if idle.len() < self.settings.max_idle_per_endpoint {
            idle.push(IdleH1 {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl EndpointPool {
    async fn connect_h1(
        &self,
        connect: &Connect<'_>,
    ) -> Result<http1::SendRequest<ProxyBody>, ProxyError> {
        let permit = connect.permit()?;
        let io = self.open(Carry::Http1, connect).await?;
        let head_limit = self
            .settings
            .max_header_bytes
            .max(crate::transport::limits::MIN_HEADER_BYTES);
        // The response head's limit is checked on the parsed head, so it does
        // not depend on how the bytes happened to arrive; the read buffer has
        // room beyond it so a head just over the limit is parsed and refused.
        let (sender, conn) = http1::Builder::new()
            .max_header_size(head_limit)
            .max_buf_size(head_limit + 16 * 1024)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                ProxyError::connect(format!("{}: handshake: {e}", self.addr)).with_source(e)
            })?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream http/1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn send_h2(
        &self,
        req: http::Request<ProxyBody>,
        connect: &Connect<'_>,
    ) -> Result<http::Response<Incoming>, ProxyError> {
        let mut sender = self.h2_sender(connect).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    // The shared connection went away before the request was sent.
                    self.h2.store(None);
                    let mut sender = self.h2_sender(connect).await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| exchange_error(self.addr, e))
                }
                None => Err(exchange_error(self.addr, e.into_error())),
            },
        }
    }

    async fn h2_sender(
        &self,
        connect: &Connect<'_>,
    ) -> Result<http2::SendRequest<ProxyBody>, ProxyError> {
        if let Some(s) = self.h2.load().as_deref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        // Boxed for the reason given in `send_h1`.
        Box::pin(self.h2_connect(connect)).await
    }

    async fn h2_connect(
        &self,
        connect: &Connect<'_>,
    ) -> Result<http2::SendRequest<ProxyBody>, ProxyError> {
        // One connection attempt at a time; the others wait for its result.
        let _guard = self.h2_connecting.lock().await;
        if let Some(s) = self.h2.load().as_deref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let permit = connect.permit()?;
        let io = self.open(Carry::H2, connect).await?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(self.settings.max_header_bytes as u32)
            .initial_stream_window_size(crate::transport::limits::H2_STREAM_WINDOW)
            .initial_connection_window_size(self.settings.h2_connection_window);
        if self.is_mesh() {
            // A peer sidecar accepts pings at any rate; they find a dead peer
            // that TCP keep-alive would take minutes to notice.
            let (interval, timeout) = self.settings.h2_keepalive;
            builder
                .keep_alive_interval(interval)
                .keep_alive_timeout(timeout);
        }
        let (sender, conn) = builder.handshake(TokioIo::new(io)).await.map_err(|e| {
            ProxyError::connect(format!("{}: h2 handshake: {e}", self.addr)).with_source(e)
        })?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        self.h2.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}

/// An error from an upstream exchange, classified for retries: a stream the
/// server refused (HTTP/2 REFUSED_STREAM) was never processed.
fn exchange_error(addr: SocketAddr, e: hyper::Error) -> ProxyError {
    let refused = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        == Some(h2::Reason::REFUSED_STREAM);
    if refused {
        ProxyError::refused(format!("{addr}: stream refused")).with_source(e)
    } else {
        ProxyError::upstream(format!("{addr}: {e}")).with_source(e)
    }
}
