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
use crate::control::runtime::{bind_std, DataPlane};
use crate::data::state::State;
use crate::data::{inbound, outbound};
use crate::transport::drain::Drainer;
use crate::transport::serve;
use anyhow::Context;
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
    let current_log = Arc::new(std::sync::Mutex::new(settings.log.clone()));
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
    let telemetry = start_telemetry(&settings);
    let state = State::new(settings, telemetry);
    let builder = Arc::new(serve::builder(&state.settings.limits));
    let (drainer, drain) = Drainer::new();
    let shutdown = Arc::new(Notify::new());
    let (leave_tx, leave_rx) = watch::channel(false);

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
    tokio::spawn(admin::serve_health(state.clone(), health_l));
    tokio::spawn(admin::serve_admin(
        state.clone(),
        admin_l,
        shutdown.clone(),
        reload,
        current_log,
    ));
    let control_plane = ControlPlane {
        address: state.settings.control_plane.clone(),
        name: state.settings.control_plane_name.clone(),
        ca_file: state.settings.ca_file.clone(),
        identity: state.identity.clone(),
    };
    let credentials = Credentials {
        token_file: state.settings.token_file.clone(),
        lifetime: state.settings.cert_lifetime,
    };
    tokio::spawn(certify::run(control_plane.clone(), credentials));
    let me = Registration {
        service: state.settings.service.clone(),
        namespace: state.settings.namespace.clone(),
        instance_id: state.settings.instance_id.clone(),
        labels: state.settings.labels.clone(),
        advertise: state.settings.advertise.clone(),
    };
    let discovery = Discovery {
        control_plane,
        me,
        data: state.clone(),
    };
    tokio::spawn(discovery::run(discovery, leave_rx));
    if let Some(target) = app_probe_target(&state.settings) {
        tokio::spawn(crate::data::app_health::run(state.clone(), target));
    }
    drop(drain);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = shutdown.notified() => "/shutdown",
    };
    let s = &state.settings;
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

fn start_telemetry(s: &Settings) -> crate::data::observe::Telemetry {
    use remora_telemetry::{AccessLog, Exporter, ExporterConfig, Metrics, RequestMetrics, Sampler};
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
    crate::data::observe::Telemetry {
        metrics,
        exporter,
        access_log,
        sampler: Sampler::new(s.trace_sampling),
        unrouted: std::sync::Arc::new(RequestMetrics::new(
            remora_telemetry::OUTBOUND,
            "unknown",
            "unknown",
            "unknown",
        )),
    }
}

/// Where the application is probed: `--app-port` on 127.0.0.1 (explicit
/// mode), else the advertised address (transparent mode: the pod's IP and the
/// application's port). None when this instance is not an endpoint.
fn app_probe_target(s: &crate::control::config::Settings) -> Option<std::net::SocketAddr> {
    let advertised = s.advertise.as_deref()?;
    match s.app_port {
        Some(port) => Some(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            port,
        ))),
        None => advertised.parse().ok(),
    }
}
