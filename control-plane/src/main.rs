#![forbid(unsafe_code)]

use clap::Parser;
use remora_control::ca_store::OperatorCa;
use remora_control::cli::{Cli, Command};
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
            })
            .await
        }
        command => {
            init_logging("warn");
            client::run(&cli.global, command).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
