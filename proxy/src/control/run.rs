//! `remora-proxy run`: binds the listeners, starts the data plane on its own
//! runtime (see `runtime.rs`) and discovery, identity, admin and health on the
//! control side, and on SIGTERM, SIGINT or `/shutdown` leaves the mesh and
//! drains.
//!
//! Drain order: mark not ready and leave discovery (peers stop picking this
//! instance) → keep serving for `drain-delay` while that propagates → stop
//! accepting and close connections gracefully → exit once they are done or
//! `drain-grace` has passed.

use crate::control::admin::{self, LogReload};
use crate::control::certify::{self, Credentials};
use crate::control::config::Settings;
use crate::control::control_plane::ControlPlane;
use crate::control::discovery::{self, Discovery, Registration};
use crate::control::replicas::Replicas;
use crate::control::runtime::{bind_std, DataPlane};
use crate::data::app_health::{self, AppProbe};
use crate::data::observe::Telemetry;
use crate::data::state::{State, Workload};
use crate::data::{inbound, outbound};
use crate::transport::drain::Drainer;
use crate::transport::serve;
use crate::transport::tls::identity::Identity;
use anyhow::Context;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::reload;

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

fn init_logging(filter: &str) -> anyhow::Result<LogReload> {
    use tracing_subscriber::prelude::*;
    // `Targets` takes RUST_LOG's `level,target=level` form without a regex engine.
    let filter: Targets = filter.parse().context("invalid log filter")?;
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init()
        .ok();
    Ok(Arc::new(move |level: &str| {
        let f: Targets = level
            .parse()
            .map_err(|e| format!("invalid log filter: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

/// Runs the proxy until it has drained: the control side on this thread, the
/// data plane on its own runtime.
pub fn main(settings: Settings) -> anyhow::Result<()> {
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let data = DataPlane::start(settings.workers)?;
    let r = control.block_on(run(settings, &data));
    // Connections still open after the grace period end with the data plane.
    drop(data);
    r
}

async fn run(settings: Settings, data: &DataPlane) -> anyhow::Result<()> {
    let reload = init_logging(&settings.log)?;
    let current_log = Arc::new(ArcSwap::from_pointee(settings.log.clone()));
    let outbound_l = bind_std(settings.outbound_addr, "outbound")?;
    let inbound_l = bind_std(settings.inbound_addr, "inbound")?;
    let admin_l = bind(settings.admin_addr, "admin").await?;
    let health_l = bind(settings.health_addr, "health").await?;
    tracing::info!(
        service = %settings.service, namespace = %settings.namespace,
        instance = %settings.instance_id,
        outbound = %settings.outbound_addr, inbound = %settings.inbound_addr,
        admin = %settings.admin_addr, health = %settings.health_addr,
        workers = settings.workers,
        "remora-proxy starting"
    );
    let s = &settings;
    let identity = Identity::new(s.spiffe_id.clone());
    let workload = Workload {
        service: s.service.clone(),
        namespace: s.namespace.clone(),
        app_port: s.app_port,
    };
    let state = State::new(
        workload,
        s.limits.clone(),
        identity.clone(),
        start_telemetry(s),
    );
    let builder = Arc::new(serve::builder(&state.limits));
    let (drainer, drain) = Drainer::new();
    let shutdown = Arc::new(Notify::new());
    let (leave_tx, leave_rx) = watch::channel(false);

    // The data plane, on its own runtime.
    let (st, b, d) = (state.clone(), builder.clone(), drain.clone());
    data.spawn(async move {
        match tokio::net::TcpListener::from_std(outbound_l) {
            Ok(l) => outbound::serve(st, b, l, d).await,
            Err(e) => tracing::error!(error = %e, "outbound listener"),
        }
    });
    let (st, b, d) = (state.clone(), builder.clone(), drain.clone());
    data.spawn(async move {
        match tokio::net::TcpListener::from_std(inbound_l) {
            Ok(l) => inbound::serve(st, b, l, d).await,
            Err(e) => tracing::error!(error = %e, "inbound listener"),
        }
    });
    drop(drain);

    // The control side, here.
    tokio::spawn(admin::serve_health(state.clone(), health_l));
    tokio::spawn(admin::serve_admin(
        state.clone(),
        admin_l,
        shutdown.clone(),
        reload,
        current_log,
    ));
    let replicas = Replicas::new(s.control_plane.clone());
    tracing::info!(control_plane = %s.control_plane.join(","), "control-plane replicas");
    let control_plane = ControlPlane {
        replicas: Arc::new(replicas),
        name: s.control_plane_name.clone(),
        ca_file: Some(s.ca_file.clone()),
        identity,
    };
    let credentials = Credentials {
        token_file: Some(s.token_file.clone()),
        lifetime: s.cert_lifetime,
    };
    tokio::spawn(certify::run(control_plane.clone(), credentials));
    let me = Registration {
        service: s.service.clone(),
        namespace: s.namespace.clone(),
        instance_id: s.instance_id.clone(),
        labels: s.labels.clone(),
        advertise: s.advertise.clone(),
    };
    let discovery = Discovery {
        control_plane,
        me,
        data: state.clone(),
    };
    tokio::spawn(discovery::run(discovery, leave_rx));
    if let Some(target) = app_probe_target(s) {
        let probe = AppProbe {
            probe: s.app_probe.clone(),
            interval: s.app_probe_interval,
            timeout: s.limits.connect_timeout,
            target,
        };
        let st = state.clone();
        tokio::spawn(async move { app_health::run(&st.app_health, probe).await });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = shutdown.notified() => "/shutdown",
    };
    tracing::info!(reason = why, delay = ?s.drain_delay, grace = ?s.drain_grace, "draining");
    state.set_draining();
    let _ = leave_tx.send(true);
    tokio::time::sleep(s.drain_delay).await;
    let left = drainer.drain(s.drain_grace).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "grace period over; closing what is left"
        );
    } else {
        tracing::info!("drained");
    }
    drop(leave_tx);
    Ok(())
}

fn start_telemetry(s: &Settings) -> Telemetry {
    use remora_telemetry::{AccessLog, Exporter, ExporterConfig, Metrics};
    let metrics = Metrics::install()
        .map_err(|e| tracing::warn!(error = %e, "metrics disabled"))
        .ok();
    let exporter = s.otlp_endpoint.as_ref().and_then(|endpoint| {
        Exporter::start(ExporterConfig {
            endpoint: endpoint.clone(),
            service_name: s.service.clone(),
            namespace: s.namespace.clone(),
            instance_id: s.instance_id.clone(),
            ..Default::default()
        })
        .map_err(|e| tracing::warn!(error = %e, %endpoint, "trace export disabled"))
        .ok()
    });
    let access_log = AccessLog::start(s.access_log, remora_telemetry::access_log::DEFAULT_CAPACITY)
        .map_err(|e| tracing::warn!(error = %e, "access logs disabled"))
        .ok();
    Telemetry::new(
        metrics,
        exporter,
        access_log,
        s.trace_sampling,
        s.access_log,
    )
}

/// Where the application is probed: `--app-port` on 127.0.0.1 (explicit
/// mode), else the advertised address (transparent mode: the pod's IP and the
/// application's port). None when this instance is not an endpoint.
fn app_probe_target(s: &Settings) -> Option<std::net::SocketAddr> {
    let advertised = s.advertise.as_deref()?;
    match s.app_port {
        Some(port) => Some(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            port,
        ))),
        None => advertised.parse().ok(),
    }
}
