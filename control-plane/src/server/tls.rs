//! TLS on the gRPC port: TLS 1.3 only, ALPN `h2`, a server certificate issued
//! by the CA, and client certificates optional at the TLS layer but verified
//! against the current trust bundle when presented.
//!
//! The server certificate comes from [`CaState::server_signer`]: during a
//! root rotation that is still the old root, so a proxy that trusts only the
//! old root (it missed the rotation's start) can verify the control plane,
//! present its old certificate (trusted until the old root is retired) and
//! renew from the new root.
//!
//! The `rustls::ServerConfig` sits behind an `ArcSwap`: a root rotation (or
//! the server certificate's renewal) builds a new one and every later
//! handshake uses it, without a restart and without touching open
//! connections. Every connection is accepted at once and its handshake runs
//! in a task of its own, bounded in time (`--handshake-timeout`) and in
//! number, in all and per source ([`crate::server::conn_limit`]: a source at its
//! bound, or the busiest one when all slots are taken, gives up its oldest
//! pending handshake), so connections that never finish a handshake cannot
//! keep anyone else from connecting. Finished `tokio_rustls` streams feed
//! tonic's `serve_with_incoming`, whose `Connected` impl for them puts the
//! peer's certificates in each request (`Request::peer_certs`).

use crate::identity::ca::{self, CaState, ServerCert};
use crate::server::conn_limit::ConnLimiter;
use arc_swap::ArcSwap;
use parking_lot::{Mutex, MutexGuard};
use remora_proto::util::now_unix;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// The names every server certificate carries, besides `--server-name`s.
pub const DEFAULT_SERVER_NAMES: [&str; 3] = ["remora-control", "localhost", "127.0.0.1"];
/// How long a client has to finish its handshake (`--handshake-timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in progress at once (`--max-handshakes`).
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress from one source (`--max-handshakes-per-source`).
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 64;
/// Finished connections waiting for the gRPC server to take them.
const ACCEPTED_QUEUE: usize = 64;
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gRPC port's TLS: the current config, and the certificate in it.
pub struct ServerTls {
    names: Vec<String>,
    config: ArcSwap<ServerConfig>,
    /// Serializes rebuilds, and keeps the certificate when only trust changes.
    cert: Mutex<ServerCert>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn build_config(state: &CaState, cert: &ServerCert) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls_err = |e: &dyn std::fmt::Display| TlsError::Rustls(e.to_string());
    let mut roots = RootCertStore::empty();
    for root in &state.roots {
        roots.add(root.clone()).map_err(|e| rustls_err(&e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls_err(&e))?;
    let key = PrivateKeyDer::Pkcs8(cert.key.clone_key());
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| rustls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), key)
        .map_err(|e| rustls_err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl ServerTls {
    /// Issues the server certificate for the default names plus `extra_names`.
    pub fn new(state: &CaState, extra_names: &[String]) -> Result<ServerTls, TlsError> {
        let mut names: Vec<String> = DEFAULT_SERVER_NAMES.map(String::from).to_vec();
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let cert = state.server_signer().sign_server(&names, now_unix())?;
        let config = build_config(state, &cert)?;
        Ok(ServerTls {
            names,
            config: ArcSwap::new(config),
            cert: Mutex::new(cert),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ServerCert> {
        self.cert.lock()
    }

    /// Follows a new CA state: reissues the certificate when its signer
    /// ([`CaState::server_signer`]) changed or a third of its lifetime is
    /// left, and trusts `state.roots`. Returns whether the certificate was
    /// reissued.
    pub fn reload(&self, state: &CaState) -> Result<bool, TlsError> {
        let now = now_unix();
        let mut cert = self.lock();
        let left = cert.not_after_unix - now;
        let lifetime = (cert.not_after_unix - cert.not_before_unix).max(1);
        let signer = state.server_signer();
        let reissue = cert.signer_id != signer.id || left * 3 < lifetime;
        let next = if reissue {
            Some(signer.sign_server(&self.names, now)?)
        } else {
            None
        };
        let config = build_config(state, next.as_ref().unwrap_or(&cert))?;
        if let Some(next) = next {
            tracing::info!(signer_id = %next.signer_id, "issued a new server certificate");
            *cert = next;
        }
        self.config.store(config);
        Ok(reissue)
    }

    /// The server's current leaf certificate.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.lock().chain.first().cloned()
    }

    /// The names in the server certificate.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Accepts TCP connections and completes their TLS handshakes, each
    /// within `timeout` and holding a slot of `slots`; yields the finished
    /// streams. Ends (closing the listener) when the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        slots: Arc<ConnLimiter>,
        timeout: Duration,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(accept_loop(self.clone(), listener, tx, slots, timeout));
        ReceiverStream::new(rx)
    }
}

type Accepted = mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>;

async fn accept_loop(
    tls: Arc<ServerTls>,
    listener: TcpListener,
    tx: Accepted,
    slots: Arc<ConnLimiter>,
    timeout: Duration,
) {
    loop {
        // Never waits for a handshake slot: pending handshakes must not keep
        // a new connection in the accept queue.
        let (tcp, peer) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            tracing::debug!(%peer, "every handshake slot is busy; connection refused");
            continue;
        };
        configure_tcp(&tcp);
        let acceptor = TlsAcceptor::from(tls.config.load_full());
        let tx = tx.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let stream = tokio::select! {
                _ = slot.evicted() => {
                    tracing::debug!(%peer, "pending TLS handshake closed to make room");
                    return;
                }
                stream = handshake(acceptor, tcp, peer, timeout, &slots) => stream,
            };
            // The slot is for the handshake only.
            drop(slot);
            if let Some(stream) = stream {
                let _ = tx.send(Ok(stream)).await;
            }
        });
    }
}

fn configure_tcp(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    slots: &ConnLimiter,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            // Counted on /metrics; a flood would flood the log.
            slots.count_timeout();
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
