#![forbid(unsafe_code)]

use clap::Parser;
use remora_control::ca_store::OperatorCa;
use remora_control::cli::{Cli, Command};
use remora_control::output::{note, out, WriteError};
use remora_control::{client, server};
use std::io::IsTerminal as _;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn init_logging(default_level: &str) {
    let filter = EnvFilter::try_from_env("REMORA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit 2 here (clap's default).
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logging("info");
            let kubernetes = args.kubernetes();
            let operator_ca = match (args.ca_cert, args.ca_key) {
                (Some(cert), Some(key)) => Some(OperatorCa {
                    cert,
                    key,
                    bundle: args.ca_bundle,
                }),
                _ => None,
            };
            server::serve(server::ServeConfig {
                listen: args.listen,
                http_listen: args.http_listen,
                data_dir: cli.global.data_dir,
                trust_domain: args.trust_domain,
                server_names: cli.global.server_name,
                ca_file: cli.global.ca_file,
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
            })
            .await
        }
        Command::Inject(args) => inject(&args),
        command => {
            init_logging("warn");
            client::run(&cli.global, command).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of the output went away (`... | head -1`): what it
        // wanted it has; not an error, and nothing to say.
        Err(e) if closed_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            note(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` is a write to stdout that failed because the reader closed
/// its end of the pipe.
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<WriteError>())
        .any(WriteError::is_closed_pipe)
}

/// `inject -f FILE`: offline, so no server connection.
fn inject(args: &remora_control::cli::InjectArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Read as _;
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
    let mut opts = remora_control::inject::InjectOptions::default();
    if let Some(i) = &args.proxy_image {
        opts.proxy_image = i.clone();
    }
    if let Some(c) = &args.control_plane_address {
        opts.control_plane = c.clone();
    }
    opts.otlp_endpoint = args.otlp_endpoint.clone();
    opts.token_source = args.token_source;
    opts.token_audience.clone_from(&args.token_audience);
    let injected =
        remora_control::inject::inject(&text, &opts).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    out(injected)?;
    Ok(())
}
