//! The command line: `remora-control serve` and the operator's commands, which
//! talk to a running control plane through its Admin API only.
//!
//! | option | env | default |
//! | --- | --- | --- |
//! | `--server URL` | `REMORA_CONTROL_PLANE` | `http://127.0.0.1:15012` |
//! | `--admin-token TOKEN` | `REMORA_ADMIN_TOKEN` | read from `<data-dir>/admin.token` |
//! | `--data-dir DIR` | `REMORA_DATA_DIR` | `./remora-data` |
//! | `serve --listen ADDR` | `REMORA_LISTEN` | `127.0.0.1:15012` |
//! | `serve --http-listen ADDR` | `REMORA_HTTP_LISTEN` | `127.0.0.1:15014` |
//! | `serve --trust-domain NAME` | `REMORA_TRUST_DOMAIN` | `cluster.local` |

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15012";

#[derive(Debug, Parser)]
#[command(
    name = "remora-control",
    version,
    about = "Remora's control plane: the policy store and discovery server, and the operator's CLI"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The control plane's gRPC address (a bare host:port means http://host:port)
    #[arg(long, global = true, env = "REMORA_CONTROL_PLANE", value_name = "URL")]
    pub server: Option<String>,
    /// The Admin API token (default: read <data-dir>/admin.token)
    #[arg(
        long,
        global = true,
        env = "REMORA_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,
    /// The server's data directory (policy store and admin token)
    #[arg(
        long,
        global = true,
        env = "REMORA_DATA_DIR",
        default_value = "./remora-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane server
    Serve(ServeArgs),
    /// Validate, store and push policy documents; prints the new version
    Apply(ApplyArgs),
    /// Show policy documents
    Get(GetArgs),
    /// Delete a policy document (a new version)
    Delete(DeleteArgs),
    /// List every stored version
    History,
    /// Show a unified diff between two versions (0 is the empty version)
    Diff {
        #[arg(value_name = "V1")]
        from: u64,
        #[arg(value_name = "V2")]
        to: u64,
    },
    /// Restore an earlier version's documents (as a new version)
    Rollback {
        #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u64).range(1..))]
        version: u64,
    },
    /// Show the connected proxies, their acked versions and NACKs
    Status,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address (Discovery, Admin, health, reflection)
    #[arg(
        long,
        env = "REMORA_LISTEN",
        default_value = "127.0.0.1:15012",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// HTTP listen address (/live, /ready, /metrics)
    #[arg(
        long,
        env = "REMORA_HTTP_LISTEN",
        default_value = "127.0.0.1:15014",
        value_name = "ADDR"
    )]
    pub http_listen: SocketAddr,
    /// The SPIFFE trust domain of workload identities
    #[arg(
        long,
        env = "REMORA_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_parser = parse_trust_domain
    )]
    pub trust_domain: String,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A YAML file, a directory (every *.yaml and *.yml in it) or - for stdin
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    pub files: Vec<String>,
    /// Validate and report only; store and push nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Service, HTTPRoute (route), DestinationPolicy, AuthorizationPolicy, TelemetryPolicy
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Only this namespace (default: every namespace)
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Show an earlier version (default: the current one)
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub kind: String,
    pub name: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

/// A trust domain is a DNS-like name: lowercase letters, digits, `.`, `-`, `_`.
fn parse_trust_domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(s.to_string())
    } else {
        Err("a trust domain has only lowercase letters, digits, '.', '-' and '_'".into())
    }
}

/// The server URL with a scheme (`host:port` becomes `http://host:port`).
pub fn server_url(server: Option<&str>) -> String {
    match server {
        None => DEFAULT_SERVER.to_string(),
        Some(s) if s.contains("://") => s.to_string(),
        Some(s) => format!("http://{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_urls_get_a_scheme() {
        assert_eq!(server_url(None), DEFAULT_SERVER);
        assert_eq!(server_url(Some("cp:15012")), "http://cp:15012");
        assert_eq!(server_url(Some("https://cp:15012")), "https://cp:15012");
    }

    #[test]
    fn get_takes_kind_name_namespace_output_and_version() {
        let cli = Cli::try_parse_from([
            "remora-control",
            "get",
            "route",
            "backend",
            "-n",
            "shop",
            "-o",
            "yaml",
            "--version",
            "3",
        ])
        .unwrap();
        let Command::Get(get) = cli.command else {
            panic!("not get")
        };
        assert_eq!(get.kind.as_deref(), Some("route"));
        assert_eq!(get.name.as_deref(), Some("backend"));
        assert_eq!(get.namespace.as_deref(), Some("shop"));
        assert_eq!(get.output, Output::Yaml);
        assert_eq!(get.version, Some(3));
    }

    #[test]
    fn bad_trust_domains_and_rollback_to_zero_are_usage_errors() {
        assert!(Cli::try_parse_from(["remora-control", "serve", "--trust-domain", "A B"]).is_err());
        assert!(Cli::try_parse_from(["remora-control", "rollback", "0"]).is_err());
    }
}
