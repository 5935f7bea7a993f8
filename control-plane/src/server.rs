//! `remora-control serve`: opens the store, binds the gRPC listener (Discovery,
//! Admin, health, reflection) and the HTTP listener (`/live`, `/ready`,
//! `/metrics`), and runs until told to stop.

use crate::admin::AdminService;
use crate::auth::{load_or_create_token, AdminAuth};
use crate::discovery::DiscoveryService;
use crate::http::{self, Health};
use crate::registry::Registry;
use crate::store::Store;
use anyhow::Context as _;
use remora_proto::v1::admin_server::AdminServer;
use remora_proto::v1::discovery_server::DiscoveryServer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// HTTP/2 keepalive: a proxy that stops answering pings for this long is gone,
/// and its stream (and endpoint) is removed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for connections to finish before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub trust_domain: String,
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    /// The bound gRPC address (useful when listening on port 0).
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The admin token the Admin API expects.
    pub token: String,
    pub registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends every discovery stream and waits (up to a grace
    /// period) for the servers to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.send_replace(true);
        self.registry.close();
        let grpc_abort = self.grpc.abort_handle();
        let http_abort = self.http.abort_handle();
        let finished = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let grpc = self.grpc.await;
            let _ = self.http.await;
            grpc
        })
        .await;
        match finished {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("gRPC server failed")),
            Ok(Err(e)) if e.is_cancelled() => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("gRPC server task failed: {e}")),
            Err(_) => {
                tracing::warn!(
                    "connections still open after the shutdown grace period; closing them"
                );
                grpc_abort.abort();
                http_abort.abort();
                Ok(())
            }
        }
    }
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Starts the control plane and returns once both listeners are bound and it
/// is ready.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    let data_dir = config.data_dir.clone();
    create_data_dir(&data_dir)?;
    let token = load_or_create_token(&data_dir).with_context(|| {
        format!(
            "cannot read or create the admin token in {}",
            data_dir.display()
        )
    })?;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir))
        .await
        .context("policy store task failed")?
        .with_context(|| {
            format!(
                "cannot open the policy store in {} (is another remora-control using it?)",
                config.data_dir.display()
            )
        })?;
    tracing::info!(
        version = store.version(),
        documents = store.current().len(),
        "policy store open"
    );

    let registry = Arc::new(Registry::new(
        &config.trust_domain,
        store.version(),
        &store.current(),
    ));
    let store = Arc::new(Mutex::new(store));

    let grpc_listener = bind(config.listen, "gRPC").await?;
    let http_listener = bind(config.http_listen, "HTTP").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<DiscoveryServer<DiscoveryService>>()
        .await;
    reporter
        .set_service_status("remora.v1.Admin", ServingStatus::Serving)
        .await;
    // v1 and, for older grpcurl releases, v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(remora_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("cannot build the reflection service")?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DiscoveryServer::new(DiscoveryService::new(
            registry.clone(),
        )))
        .add_service(AdminServer::with_interceptor(
            AdminService::new(store, registry.clone()),
            AdminAuth::new(&token),
        ));
    let incoming = TcpIncoming::from(grpc_listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)));
    let grpc_shutdown = signal(shutdown_rx.clone());
    let grpc = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, grpc_shutdown)
            .await
    });

    let health = Arc::new(Health {
        ready: Default::default(),
        registry: registry.clone(),
    });
    let http = tokio::spawn(http::serve(
        http_listener,
        health.clone(),
        signal(shutdown_rx),
    ));
    health.ready.store(true, Ordering::Release);

    Ok(Running {
        grpc_addr,
        http_addr,
        token,
        registry,
        shutdown,
        grpc,
        http,
    })
}

/// Runs the control plane until SIGTERM or SIGINT.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let running = start(config).await?;
    eprintln!("remora-control listening on {}", running.grpc_addr);
    tracing::info!(grpc = %running.grpc_addr, http = %running.http_addr, "ready");
    wait_for_signal().await?;
    tracing::info!("shutting down");
    running.shutdown().await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
