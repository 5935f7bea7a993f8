//! What the data path shares: this workload's own names and limits, the
//! current compiled mesh (swapped atomically on each snapshot), the
//! connection pools, the certificate slot, telemetry, the application's
//! health and the readiness flags. The control side builds it, installs each
//! snapshot in it, and reads whether the proxy is ready.

use crate::data::app_health::AppHealth;
use crate::data::observe::Telemetry;
use crate::mesh::destination::Registry;
use crate::mesh::Mesh;
use crate::transport::limits::Limits;
use crate::transport::pool::{EndpointPool, PoolSettings, Pools};
use crate::transport::tls::identity::Identity;
use arc_swap::ArcSwap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// This workload, as the data path knows it.
#[derive(Debug, Clone)]
pub struct Workload {
    pub service: String,
    pub namespace: String,
    /// Explicit mode: where inbound traffic goes (127.0.0.1:app-port).
    pub app_port: Option<u16>,
}

impl Workload {
    /// `service.namespace`, as metrics and logs name it.
    pub fn fqdn(&self) -> String {
        format!("{}.{}", self.service, self.namespace)
    }
}

pub struct State {
    pub workload: Workload,
    pub limits: Limits,
    pub identity: Arc<Identity>,
    pub mesh: ArcSwap<Mesh>,
    pub pools: Arc<Pools>,
    /// Breaker, budget and bulkhead state kept across snapshots.
    pub registry: Registry,
    pub telemetry: Arc<Telemetry>,
    /// Counters of this workload's own service (rate-limited answers).
    pub local_metrics: remora_telemetry::ServiceMetrics,
    /// The pool to the local application in explicit mode (127.0.0.1:app-port).
    pub app_pool: Option<Arc<EndpointPool>>,
    /// Whether the local application can be reached.
    pub app_health: AppHealth,
    has_snapshot: AtomicBool,
    draining: AtomicBool,
}

impl State {
    pub fn new(
        workload: Workload,
        limits: Limits,
        identity: Arc<Identity>,
        telemetry: Telemetry,
    ) -> Arc<State> {
        let local_metrics = remora_telemetry::ServiceMetrics::new(&workload.fqdn());
        let pools = Pools::new(PoolSettings::from(&limits));
        let app_pool = workload
            .app_port
            .map(|p| pools.get(SocketAddr::from((Ipv4Addr::LOCALHOST, p)), None));
        Arc::new(State {
            workload,
            limits,
            identity,
            mesh: ArcSwap::from_pointee(Mesh::empty()),
            pools,
            registry: Registry::default(),
            local_metrics,
            telemetry: Arc::new(telemetry),
            app_pool,
            app_health: AppHealth::default(),
            has_snapshot: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// Installs a compiled snapshot; from now on the proxy may be ready.
    pub fn install(&self, mesh: Mesh) {
        self.telemetry.apply(mesh.telemetry.as_ref());
        remora_telemetry::metrics::set_config_version(mesh.policy_version);
        self.mesh.store(Arc::new(mesh));
        self.has_snapshot.store(true, Ordering::Release);
    }

    /// Ready: holds a snapshot and a certificate the mesh trusts (unexpired,
    /// chaining to the trust bundle in force, not refused by the control
    /// plane), and is not draining.
    pub fn is_ready(&self) -> bool {
        self.has_snapshot.load(Ordering::Acquire)
            && self.identity.in_mesh()
            && !self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}
