//! What every part of the running proxy shares: the settings, the current
//! compiled mesh (swapped atomically on each snapshot), the connection pools
//! and the readiness flags.

use crate::control::config::Settings;
use crate::data::observe::Telemetry;
use crate::mesh::Mesh;
use crate::transport::pool::{EndpointPool, PoolSettings, Pools};
use crate::transport::tls::identity::Identity;
use arc_swap::ArcSwap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct State {
    pub settings: Settings,
    pub identity: Arc<Identity>,
    pub mesh: ArcSwap<Mesh>,
    pub pools: Arc<Pools>,
    /// Breaker, budget and bulkhead state kept across snapshots.
    pub registry: crate::mesh::destination::Registry,
    pub telemetry: Arc<Telemetry>,
    /// Counters of this workload's own service (rate-limited answers).
    pub local_metrics: remora_telemetry::ServiceMetrics,
    /// The pool to the local application in explicit mode (127.0.0.1:app-port).
    pub app_pool: Option<Arc<EndpointPool>>,
    /// Whether the local application can be reached.
    pub app_health: crate::data::app_health::AppHealth,
    has_snapshot: AtomicBool,
    draining: AtomicBool,
}

impl State {
    pub fn new(settings: Settings, telemetry: Telemetry) -> Arc<State> {
        let local_metrics = remora_telemetry::ServiceMetrics::new(&format!(
            "{}.{}",
            settings.service, settings.namespace
        ));
        let identity = Identity::new(
            &settings.namespace,
            &settings.service,
            &settings.trust_domain,
        );
        let pools = Pools::new(PoolSettings {
            max_idle_per_endpoint: settings.limits.pool_max_idle,
            max_header_bytes: settings.limits.max_header_bytes,
            connect_timeout: settings.limits.connect_timeout,
            h2_connection_window: settings.limits.h2_connection_window(),
            h2_keepalive: (
                settings.limits.h2_keepalive_interval,
                settings.limits.h2_keepalive_timeout,
            ),
        });
        let app_pool = settings
            .app_port
            .map(|p| pools.get(SocketAddr::from((Ipv4Addr::LOCALHOST, p)), None));
        Arc::new(State {
            settings,
            identity,
            mesh: ArcSwap::from_pointee(Mesh::empty()),
            pools,
            registry: crate::mesh::destination::Registry::default(),
            local_metrics,
            telemetry: Arc::new(telemetry),
            app_pool,
            app_health: crate::data::app_health::AppHealth::default(),
            has_snapshot: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    /// Installs a compiled snapshot; from now on the proxy may be ready.
    pub fn install(&self, mesh: Mesh) {
        let t = mesh.telemetry.as_ref();
        self.telemetry.sampler.set_rate(
            t.and_then(|t| t.sampling_rate)
                .unwrap_or(self.settings.trace_sampling),
        );
        if let Some(log) = &self.telemetry.access_log {
            log.set_enabled(
                t.and_then(|t| t.access_logs)
                    .unwrap_or(self.settings.access_log),
            );
        }
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
