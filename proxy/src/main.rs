//! The `remora-proxy` command.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use remora_proxy::control::config::{RunArgs, Settings};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "remora-proxy", version, about = "Remora's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy beside an application.
    Run(Box<RunArgs>),
    /// Install the iptables interception rules in this network namespace (init container).
    Init(remora_proxy::control::init::InitArgs),
    /// Block until the local proxy answers /ready (for an app's entrypoint).
    WaitReady {
        /// The proxy's health address.
        #[arg(long, env = "REMORA_HEALTH_ADDR", default_value = "127.0.0.1:15020")]
        health: String,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => Settings::resolve(*args).and_then(remora_proxy::control::run::main),
        Command::Init(args) => remora_proxy::control::init::init(&args),
        Command::WaitReady { health, timeout } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(wait_ready(&health, timeout))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Polls `GET /ready` until it answers 200.
async fn wait_ready(health: &str, timeout: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(health).await?;
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<bool, std::io::Error>(buf.starts_with(b"HTTP/1.1 200"))
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the proxy at {health} was not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
