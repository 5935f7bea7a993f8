//! The commands that run in this process rather than against a running
//! control plane: `serve` (the server, until SIGTERM or SIGINT) and `inject`
//! (offline, so no server connection).

use crate::cli::args::{GlobalArgs, InjectArgs, ServeArgs};
use crate::cli::inject::{self, InjectOptions};
use crate::cli::output::{note, out};
use crate::identity::ca_store::OperatorCa;
use crate::server::serve::{start, ServeConfig};
use anyhow::Context as _;
use std::io::Read as _;

/// The server's settings from the command line.
pub fn serve_config(global: GlobalArgs, args: ServeArgs) -> ServeConfig {
    let kubernetes = args.kubernetes();
    let store = args.store.config();
    let operator_ca = match (args.ca_cert, args.ca_key) {
        (Some(cert), Some(key)) => Some(OperatorCa {
            cert,
            key,
            bundle: args.ca_bundle,
        }),
        _ => None,
    };
    ServeConfig {
        listen: args.listen,
        http_listen: args.http_listen,
        data_dir: global.data_dir,
        trust_domain: args.trust_domain,
        server_names: global.server_name,
        ca_file: global.ca_file,
        operator_ca,
        cert_lifetime: args.cert_lifetime,
        max_cert_lifetime: args.max_cert_lifetime,
        handshake_timeout: args.handshake_timeout,
        max_handshakes: args.max_handshakes as usize,
        max_handshakes_per_source: args.max_handshakes_per_source as usize,
        http_max_connections: args.http_max_connections as usize,
        http_header_read_timeout: args.http_header_read_timeout,
        max_apply_bytes: usize::try_from(args.max_apply_bytes).unwrap_or(usize::MAX),
        kubernetes,
        store,
    }
}

/// `serve`: runs the control plane until SIGTERM or SIGINT.
pub async fn serve(global: GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    let running = start(serve_config(global, args)).await?;
    note(format_args!(
        "remora-control listening on {} (TLS; trust bundle in {})",
        running.grpc_addr,
        running.ca_file.display()
    ));
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

/// `inject -f FILE`: prints the manifest with the mesh added.
pub fn inject(args: &InjectArgs) -> anyhow::Result<()> {
    let (name, text) = if args.file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the manifest from stdin")?;
        ("<stdin>".to_string(), s)
    } else {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file))?;
        (args.file.clone(), text)
    };
    let mut opts = InjectOptions::default();
    if let Some(i) = &args.proxy_image {
        opts.proxy_image = i.clone();
    }
    if let Some(c) = &args.control_plane_address {
        opts.control_plane = c.clone();
    }
    opts.otlp_endpoint = args.otlp_endpoint.clone();
    opts.token_source = args.token_source;
    opts.token_audience.clone_from(&args.token_audience);
    let injected = inject::inject(&text, &opts).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    out(injected)?;
    Ok(())
}
