#![forbid(unsafe_code)]

use clap::Parser;
use remora_control::cli::args::{Cli, Command};
use remora_control::cli::output::{note, WriteError};
use remora_control::cli::{client, local};
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
            local::serve(cli.global, *args).await
        }
        Command::Inject(args) => local::inject(&args),
        Command::Install(args) => remora_control::cli::install::install(&args),
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
