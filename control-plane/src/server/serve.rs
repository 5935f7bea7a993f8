//! `remora-control serve`: opens the stores, loads (or creates) the CA, writes
//! the trust bundle file, binds the gRPC listener over TLS (Discovery,
//! Identity, Admin, health, reflection) and the HTTP listener (`/live`,
//! `/ready`, `/metrics`), and runs until told to stop.

use crate::discovery::lease::GenerationLease;
use crate::discovery::push::DiscoveryServer;
use crate::discovery::registry::Registry;
use crate::discovery::service::DiscoveryService;
use crate::etcd::{Etcd, StoreConfig};
use crate::identity::ca::{Authority, LifetimePolicy, MIN_CERT_LIFETIME};
use crate::identity::ca_store::{self, OperatorCa};
use crate::identity::certify::IdentityService;
use crate::identity::db::IdentityDb;
use crate::identity::issued::Ledger;
use crate::identity::kubernetes::{
    CompositeAuthenticator, KubernetesAuthenticator, KubernetesConfig,
};
use crate::identity::tokens::{TokenStore, WorkloadAuthenticator};
use crate::metrics::certs::CertMetrics;
use crate::policy::store::Store;
use crate::server::admin::auth::{load_or_create_token, shared_token, AdminAuth};
use crate::server::admin::{AdminIdentity, AdminService};
use crate::server::conn_limit::{ConnLimiter, Limits};
use crate::server::http::{self, Health};
use crate::server::reflection;
use crate::server::replica::Replica;
use crate::server::rotation::{trust_of, Rotation};
use crate::server::tls::ServerTls;
use anyhow::Context as _;
use remora_proto::util::now_unix;
use remora_proto::v1::admin_server::AdminServer;
use remora_proto::v1::identity_server::IdentityServer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tonic::server::NamedService;
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
    /// Extra names (DNS or IP) in the server certificate, besides
    /// `remora-control`, `localhost` and `127.0.0.1`.
    pub server_names: Vec<String>,
    /// Where the trust bundle is written (default `<data-dir>/trust-bundle.pem`).
    pub ca_file: Option<PathBuf>,
    /// The operator's CA; None: the generated one.
    pub operator_ca: Option<OperatorCa>,
    /// Workload certificates: the default and the longest lifetime.
    pub cert_lifetime: Duration,
    pub max_cert_lifetime: Duration,
    /// The gRPC port: how long a client has to finish its TLS handshake, and
    /// how many handshakes may be in progress, in all and from one source.
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    pub max_handshakes_per_source: usize,
    /// The HTTP port: connections held at once, and the time to send a
    /// request head.
    pub http_max_connections: usize,
    pub http_header_read_timeout: Duration,
    /// The most one apply may carry, all its files together (bytes).
    pub max_apply_bytes: usize,
    /// Kubernetes ServiceAccount tokens accepted beside bootstrap tokens
    /// (`--kubernetes-issuer`, `--kubernetes-jwks`); None: bootstrap tokens only.
    pub kubernetes: Option<KubernetesConfig>,
    /// Where the state lives: the data directory, or etcd (shared by replicas).
    pub store: StoreConfig,
}

/// The default workload certificate lifetime (and longest).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl ServeConfig {
    /// The defaults, on 127.0.0.1:15012 and :15014, over `data_dir`.
    pub fn new(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15012)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 15014)),
            data_dir: data_dir.to_path_buf(),
            trust_domain: "cluster.local".into(),
            server_names: Vec::new(),
            ca_file: None,
            operator_ca: None,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            max_cert_lifetime: DEFAULT_CERT_LIFETIME,
            handshake_timeout: crate::server::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: crate::server::tls::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: crate::server::tls::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            http_max_connections: http::DEFAULT_MAX_CONNECTIONS,
            http_header_read_timeout: http::DEFAULT_HEADER_READ_TIMEOUT,
            max_apply_bytes: crate::server::admin::DEFAULT_MAX_APPLY_BYTES,
            kubernetes: None,
            store: StoreConfig::Embedded,
        }
    }

    fn lifetimes(&self) -> anyhow::Result<LifetimePolicy> {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        if self.max_cert_lifetime < MIN_CERT_LIFETIME || self.cert_lifetime < MIN_CERT_LIFETIME {
            anyhow::bail!(
                "certificate lifetimes must be at least {}",
                human(MIN_CERT_LIFETIME)
            );
        }
        if self.cert_lifetime > self.max_cert_lifetime {
            anyhow::bail!(
                "--cert-lifetime {} is longer than --max-cert-lifetime {}",
                human(self.cert_lifetime),
                human(self.max_cert_lifetime)
            );
        }
        Ok(LifetimePolicy {
            default: self.cert_lifetime,
            max: self.max_cert_lifetime,
        })
    }
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
    /// Where the trust bundle is written.
    pub ca_file: PathBuf,
    pub authority: Arc<Authority>,
    pub tls: Arc<ServerTls>,
    pub rotation: Arc<Rotation>,
    pub tokens: Arc<TokenStore>,
    pub cert_metrics: Arc<CertMetrics>,
    /// The certificates issued and not yet expired.
    pub ledger: Arc<Ledger>,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<()>,
    rotation_task: JoinHandle<()>,
}

impl Running {
    /// The trust bundle in force (every trusted root, PEM).
    pub fn trust_bundle_pem(&self) -> String {
        self.authority.current().bundle_pem()
    }
}

impl Running {
    /// Stops accepting, ends every discovery stream and waits (up to a grace
    /// period) for the servers to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.send_replace(true);
        self.registry.close();
        self.rotation_task.abort();
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

/// Loads the CA (the operator's, or the generated one, created on first use).
async fn load_ca(
    config: &ServeConfig,
    db: &IdentityDb,
) -> anyhow::Result<crate::identity::ca::CaState> {
    let operator = config.operator_ca.clone();
    let db = db.clone();
    let trust_domain = config.trust_domain.clone();
    let state = tokio::task::spawn_blocking(move || match operator {
        Some(files) => ca_store::load_operator(&files),
        None => ca_store::load_or_generate(&db, &trust_domain),
    })
    .await
    .context("CA task failed")??;
    tracing::info!(
        signer_id = %state.signer.id,
        roots = state.roots.len(),
        operator = state.operator,
        rotating = state.rotating(),
        "CA loaded"
    );
    Ok(state)
}

/// Starts the control plane and returns once both listeners are bound and it
/// is ready.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    let lifetimes = config.lifetimes()?;
    // Every workload identity is a SPIFFE ID in it.
    remora_proto::identity::check_trust_domain(&config.trust_domain).map_err(anyhow::Error::msg)?;
    // Before anything is created: a key file that cannot be used stops the start.
    let kubernetes = match &config.kubernetes {
        None => None,
        Some(k) => {
            let authenticator = KubernetesAuthenticator::open(k, &config.trust_domain)
                .map_err(anyhow::Error::msg)?;
            tracing::info!(issuer = %k.issuer, audience = %k.audience,
                jwks = %k.jwks_file.display(), kids = ?authenticator.kids(),
                "Kubernetes ServiceAccount tokens accepted");
            Some(Arc::new(authenticator))
        }
    };
    let data_dir = config.data_dir.clone();
    create_data_dir(&data_dir)?;
    let shared = match &config.store {
        StoreConfig::Embedded => None,
        StoreConfig::Etcd(etcd) => {
            if etcd.advertise_address.is_none() && config.listen.ip().is_unspecified() {
                anyhow::bail!(
                    "--store etcd with --listen {} needs --advertise-address HOST:PORT: the \
                     address the other replicas reach this one at",
                    config.listen
                );
            }
            let connected = Etcd::connect(etcd).await?;
            tracing::info!(endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix,
                "state shared through etcd");
            Some(connected)
        }
    };
    let token = match &shared {
        Some(etcd) => shared_token(etcd, &data_dir)
            .await
            .context("cannot read or store the shared admin token in etcd")?,
        None => load_or_create_token(&data_dir).with_context(|| {
            format!(
                "cannot read or create the admin token in {}",
                data_dir.display()
            )
        })?,
    };
    let store_etcd = shared.clone();
    let store = tokio::task::spawn_blocking(move || match store_etcd {
        Some(etcd) => Store::open_etcd(etcd),
        None => Store::open(&data_dir),
    })
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
    let identity_dir = config.data_dir.clone();
    let identity_db = match &shared {
        Some(etcd) => IdentityDb::etcd(etcd.clone()),
        None => tokio::task::spawn_blocking(move || IdentityDb::open(&identity_dir))
            .await
            .context("identity database task failed")?
            .with_context(|| {
                format!(
                    "cannot open the identity database in {}",
                    config.data_dir.display()
                )
            })?,
    };
    let ca = load_ca(&config, &identity_db).await?;
    let ledger_db = identity_db.clone();
    let (ledger, lease) = tokio::task::spawn_blocking(move || {
        let ledger = Ledger::open(ledger_db.clone(), now_unix())?;
        let lease = GenerationLease::open(ledger_db)?;
        Ok::<_, crate::identity::db::DbError>((ledger, lease))
    })
    .await
    .context("identity database task failed")?
    .context("cannot read the certificate ledger or the snapshot generation")?;
    let ledger = Arc::new(ledger);
    let ca_file = config
        .ca_file
        .clone()
        .unwrap_or_else(|| crate::data_dir::default_bundle_path(&config.data_dir));
    ca_store::write_bundle_file(&ca_file, &ca.bundle_pem())?;
    let tls = Arc::new(
        ServerTls::new(&ca, &config.server_names).context("cannot set up TLS for the gRPC port")?,
    );

    tracing::info!(
        first_generation = lease.start + 1,
        "snapshot versions continue"
    );
    let registry = Arc::new(Registry::with_lease(
        &config.trust_domain,
        store.version(),
        &store.current(),
        trust_of(&ca),
        Some(lease),
    ));
    let store = Arc::new(Mutex::new(store));
    let authority = Arc::new(Authority::new(ca, &config.trust_domain, lifetimes));
    let tokens = Arc::new(TokenStore::new(identity_db.clone(), &config.trust_domain));
    let identity_db_for_replica = identity_db.clone();
    let rotation = Arc::new(Rotation::new(
        authority.clone(),
        registry.clone(),
        tls.clone(),
        identity_db,
        ledger.clone(),
        tokens.clone(),
        ca_file.clone(),
    ));
    let cert_metrics = Arc::new(CertMetrics::default());

    let grpc_listener = bind(config.listen, "gRPC").await?;
    let http_listener = bind(config.http_listen, "HTTP").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<DiscoveryServer<DiscoveryService>>()
        .await;
    reporter
        .set_serving::<IdentityServer<IdentityService>>()
        .await;
    reporter
        .set_service_status("remora.v1.Admin", ServingStatus::Serving)
        .await;
    // Reflection describes the services served here, not every file of
    // remora-proto (its set also holds the examples' Echo).
    let served = [
        <DiscoveryServer<DiscoveryService> as NamedService>::NAME,
        <IdentityServer<IdentityService> as NamedService>::NAME,
        <AdminServer<AdminService> as NamedService>::NAME,
    ];
    let descriptors = reflection::served_descriptors(remora_proto::FILE_DESCRIPTOR_SET, &served)
        .context("cannot pick the descriptors for gRPC reflection")?;
    // v1 and, for older grpcurl releases, v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&descriptors)
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

    let authenticator: Arc<dyn WorkloadAuthenticator> = match kubernetes {
        None => tokens.clone(),
        Some(k) => Arc::new(CompositeAuthenticator::new(tokens.clone(), k)),
    };
    let identity = IdentityService::new(
        authenticator,
        authority.clone(),
        cert_metrics.clone(),
        ledger.clone(),
    );
    let replica = shared.as_ref().map(|etcd| {
        let address = etcd
            .config
            .advertise_address
            .clone()
            .unwrap_or_else(|| grpc_addr.to_string());
        let id = crate::secret::random_hex(6).unwrap_or_else(|_| format!("{}", std::process::id()));
        let replica = Replica::new(etcd.clone(), registry.clone(), id, address);
        rotation.set_cluster(replica.clone());
        replica.start(
            store.clone(),
            rotation.clone(),
            identity_db_for_replica.clone(),
        );
        tracing::info!(replica = %replica.id, address = %replica.address, "replica started");
        replica
    });
    let admin = AdminService::new(
        store,
        registry.clone(),
        AdminIdentity {
            tokens: tokens.clone(),
            rotation: rotation.clone(),
            authority: authority.clone(),
        },
        config.max_apply_bytes,
    );
    let admin = match &replica {
        Some(r) => admin.with_replica(r.clone(), &token),
        None => admin,
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DiscoveryServer::new(DiscoveryService::new(
            registry.clone(),
            ledger.clone(),
        )))
        .add_service(IdentityServer::new(identity))
        // Decodes far more than an apply may carry (after the token check),
        // so that an oversized apply gets the service's answer naming the
        // limit rather than the codec's.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AdminServer::new(admin).max_decoding_message_size(
                crate::server::admin::max_decoding_bytes(config.max_apply_bytes),
            ),
            AdminAuth::new(&token),
        ));
    let handshake_slots = ConnLimiter::new(
        "grpc",
        Limits {
            max: config.max_handshakes,
            max_per_source: config.max_handshakes_per_source,
        },
    );
    let http_slots = ConnLimiter::new(
        "http",
        Limits {
            max: config.http_max_connections,
            max_per_source: config.http_max_connections,
        },
    );
    let incoming = tls.incoming(
        grpc_listener,
        handshake_slots.clone(),
        config.handshake_timeout,
    );
    let grpc_shutdown = signal(shutdown_rx.clone());
    let grpc = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, grpc_shutdown)
            .await
    });
    let rotation_task = tokio::spawn(rotation.clone().run(signal(shutdown_rx.clone())));
    // Ends with the others on shutdown; nothing waits for it.
    tokio::spawn(crate::discovery::jwks::run(
        registry.clone(),
        signal(shutdown_rx.clone()),
    ));

    let health = Arc::new(Health {
        ready: Default::default(),
        registry: registry.clone(),
        certs: cert_metrics.clone(),
        authority: authority.clone(),
        listeners: vec![handshake_slots, http_slots.clone()],
    });
    let http = tokio::spawn(http::serve(
        http_listener,
        health.clone(),
        http_slots,
        config.http_header_read_timeout,
        signal(shutdown_rx),
    ));
    health.ready.store(true, Ordering::Release);

    Ok(Running {
        grpc_addr,
        http_addr,
        token,
        registry,
        ca_file,
        authority,
        tls,
        rotation,
        tokens,
        cert_metrics,
        ledger,
        shutdown,
        grpc,
        http,
        rotation_task,
    })
}
