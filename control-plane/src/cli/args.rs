//! The command line: `remora-control serve` and the operator's commands, which
//! talk to a running control plane through its Admin API only.
//!
//! | option | env | default |
//! | --- | --- | --- |
//! | `--server URL` | `REMORA_CONTROL_PLANE` | `https://127.0.0.1:15012` (always TLS) |
//! | `--admin-token TOKEN` | `REMORA_ADMIN_TOKEN` | read from `<data-dir>/admin.token` |
//! | `--data-dir DIR` | `REMORA_DATA_DIR` | `./remora-data` |
//! | `--ca-file FILE` | `REMORA_CA_FILE` | `<data-dir>/trust-bundle.pem` (serve writes it, clients verify with it) |
//! | `--server-name NAME` | `REMORA_SERVER_NAME` | `remora-control` (serve: extra certificate names; clients: the name verified) |
//! | `get`, `delete` `-n NS` | | `default` (`get -A`: every namespace) |
//! | `serve --listen ADDR` | `REMORA_LISTEN` | `127.0.0.1:15012` |
//! | `serve --http-listen ADDR` | `REMORA_HTTP_LISTEN` | `127.0.0.1:15014` |
//! | `serve --trust-domain NAME` | `REMORA_TRUST_DOMAIN` | `cluster.local` |
//! | `serve --ca-cert F --ca-key F [--ca-bundle F]` | `REMORA_CA_CERT`, `REMORA_CA_KEY`, `REMORA_CA_BUNDLE` | a generated root |
//! | `serve --cert-lifetime DUR` | `REMORA_CERT_LIFETIME` | `24h` |
//! | `serve --max-cert-lifetime DUR` | `REMORA_MAX_CERT_LIFETIME` | `24h` |
//! | `serve --handshake-timeout DUR` | `REMORA_HANDSHAKE_TIMEOUT` | `3s` |
//! | `serve --max-handshakes N` | `REMORA_MAX_HANDSHAKES` | `1024` |
//! | `serve --max-handshakes-per-source N` | `REMORA_MAX_HANDSHAKES_PER_SOURCE` | `64` |
//! | `serve --http-max-connections N` | `REMORA_HTTP_MAX_CONNECTIONS` | `64` |
//! | `serve --http-header-read-timeout DUR` | `REMORA_HTTP_HEADER_READ_TIMEOUT` | `5s` |
//! | `serve --max-apply-bytes N` | `REMORA_MAX_APPLY_BYTES` | `1048576` (1 MiB) |
//! | `serve --kubernetes-issuer URL --kubernetes-jwks FILE` | `REMORA_KUBERNETES_ISSUER`, `REMORA_KUBERNETES_JWKS` | bootstrap tokens only |
//! | `serve --kubernetes-audience AUD` | `REMORA_KUBERNETES_AUDIENCE` | `remora` |
//! | `inject --token-source projected\|secret` | | `projected` |
//! | `inject --token-audience AUD` | | `remora` |

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_SERVER: &str = "https://127.0.0.1:15012";
/// The namespace `get` and `delete` use without `-n` (as kubectl does).
pub const DEFAULT_NAMESPACE: &str = "default";
/// The name clients verify in the control plane's certificate by default.
pub const DEFAULT_SERVER_NAME: &str = "remora-control";

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
    /// The control plane's gRPC address: https://host:port or host:port
    /// (http://host:port is accepted too, but the connection always uses TLS)
    #[arg(long, global = true, env = "REMORA_CONTROL_PLANE", value_name = "URL")]
    pub server: Option<String>,
    /// The trust bundle (PEM roots): serve writes it, the other commands verify
    /// the server with it [default: <data-dir>/trust-bundle.pem]
    #[arg(long, global = true, env = "REMORA_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// serve: an extra name (DNS or IP) for its certificate, repeatable;
    /// other commands: the name to verify in the server's certificate
    /// [default: remora-control]
    #[arg(
        long,
        global = true,
        env = "REMORA_SERVER_NAME",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub server_name: Vec<String>,
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
    Serve(Box<ServeArgs>),
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
    /// Show the connected proxies, their acked versions, NACKs and certificates
    Status,
    /// Bootstrap tokens: each proves one workload identity to Identity.Certify
    #[command(subcommand)]
    Token(TokenCommand),
    /// The certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print a Kubernetes manifest with the mesh added (init container,
    /// native-sidecar proxy, volumes); works offline
    Inject(InjectArgs),
    /// Print the control plane's Kubernetes manifests (Deployment, Service,
    /// what they need); works offline
    Install(crate::cli::install::InstallArgs),
}

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The manifest (multi-document YAML), or - for stdin
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: String,
    /// The proxy image (also runs the init container)
    #[arg(long, value_name = "IMAGE")]
    pub proxy_image: Option<String>,
    /// The control plane the injected proxies dial
    #[arg(long, value_name = "HOST:PORT")]
    pub control_plane_address: Option<String>,
    /// OTLP/gRPC collector for the proxies' spans
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// What proves the proxy's identity: a projected ServiceAccount token
    /// (the pod runs as ServiceAccount <service>, added when missing; the
    /// control plane needs --kubernetes-issuer), or the Secret
    /// remora-token-<service> holding a bootstrap token
    #[arg(long, value_enum, default_value = "projected", value_name = "SOURCE")]
    pub token_source: crate::cli::inject::TokenSource,
    /// The audience of the projected ServiceAccount token (the control
    /// plane's --kubernetes-audience)
    #[arg(
        long,
        default_value = crate::identity::kubernetes::DEFAULT_AUDIENCE,
        value_name = "AUD",
        value_parser = NonEmptyStringValueParser::new()
    )]
    pub token_audience: String,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints only the token (`... > token-file` works)
    Create {
        #[arg(long, value_name = "S")]
        service: String,
        #[arg(short = 'n', long, value_name = "N")]
        namespace: String,
        /// How long the token may bootstrap new certificates (e.g. 10m, 7d);
        /// workloads it bootstrapped keep renewing after it [default: no expiry]
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many certificates the token may bootstrap (each proxy start
        /// takes one; renewals take none) [default: no limit]
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
    },
    /// Revoke a token: Identity.Certify refuses it from now on, for new
    /// certificates and for renewals; the certificates it got stay valid
    /// until they expire, and hold no root rotation back
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// List every token (never their secrets)
    List,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Start a root rotation: a new root signs from now on; the old one is
    /// retired once no certificate from it is in use (each proxy renewed,
    /// left, or its certificate expired)
    Rotate {
        /// Retire the old root of the rotation in progress now, whoever
        /// still uses it (they are named; they must bootstrap again)
        #[arg(long)]
        finish: bool,
    },
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
    /// Sign with the operator's CA certificate (a root, or an intermediate
    /// optionally followed by the intermediates above it) instead of a
    /// generated root
    #[arg(long, env = "REMORA_CA_CERT", value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The --ca-cert's unencrypted PKCS#8 key
    #[arg(long, env = "REMORA_CA_KEY", value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The trusted root(s) above an intermediate --ca-cert [default: the --ca-cert itself]
    #[arg(
        long,
        env = "REMORA_CA_BUNDLE",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    pub ca_bundle: Option<PathBuf>,
    /// The lifetime of a workload certificate whose request names none
    #[arg(
        long,
        env = "REMORA_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DUR",
        value_parser = parse_duration
    )]
    pub cert_lifetime: Duration,
    /// The longest workload certificate lifetime granted (at least 1m)
    #[arg(
        long,
        env = "REMORA_MAX_CERT_LIFETIME",
        default_value = "24h",
        value_name = "DUR",
        value_parser = parse_duration
    )]
    pub max_cert_lifetime: Duration,
    /// gRPC port: the time a client has to finish its TLS handshake
    #[arg(
        long,
        env = "REMORA_HANDSHAKE_TIMEOUT",
        default_value = "3s",
        value_name = "DUR",
        value_parser = parse_positive_duration
    )]
    pub handshake_timeout: Duration,
    /// gRPC port: TLS handshakes in progress at once; at the cap the source
    /// holding the most gives up its oldest
    #[arg(
        long,
        env = "REMORA_MAX_HANDSHAKES",
        default_value = "1024",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_handshakes: u32,
    /// gRPC port: TLS handshakes in progress from one source (an IPv4
    /// address, an IPv6 /64); more closes that source's oldest
    #[arg(
        long,
        env = "REMORA_MAX_HANDSHAKES_PER_SOURCE",
        default_value = "64",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_handshakes_per_source: u32,
    /// HTTP port: connections held at once; at the cap the oldest idle one
    /// is closed for a new one
    #[arg(
        long,
        env = "REMORA_HTTP_MAX_CONNECTIONS",
        default_value = "64",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub http_max_connections: u32,
    /// HTTP port: the time to send a request head (an idle keep-alive
    /// connection is closed after it too)
    #[arg(
        long,
        env = "REMORA_HTTP_HEADER_READ_TIMEOUT",
        default_value = "5s",
        value_name = "DUR",
        value_parser = parse_positive_duration
    )]
    pub http_header_read_timeout: Duration,
    /// The most an apply may carry (all its files together, in bytes);
    /// larger ones are refused with a message naming this limit
    #[arg(
        long,
        env = "REMORA_MAX_APPLY_BYTES",
        default_value = "1048576",
        value_name = "BYTES",
        value_parser = clap::value_parser!(u64).range(1024..=(1u64 << 30))
    )]
    pub max_apply_bytes: u64,
    /// Accept Kubernetes ServiceAccount tokens (beside bootstrap tokens)
    /// issued by this issuer: the `issuer` of the cluster's
    /// /.well-known/openid-configuration
    #[arg(
        long,
        env = "REMORA_KUBERNETES_ISSUER",
        value_name = "URL",
        requires = "kubernetes_jwks",
        value_parser = NonEmptyStringValueParser::new()
    )]
    pub kubernetes_issuer: Option<String>,
    /// The issuer's public keys: the JWK set the cluster serves at
    /// /openid/v1/jwks (re-read when the file changes)
    #[arg(
        long,
        env = "REMORA_KUBERNETES_JWKS",
        value_name = "FILE",
        requires = "kubernetes_issuer"
    )]
    pub kubernetes_jwks: Option<PathBuf>,
    /// The audience a ServiceAccount token must be for [default: remora]
    #[arg(
        long,
        env = "REMORA_KUBERNETES_AUDIENCE",
        value_name = "AUD",
        requires = "kubernetes_issuer",
        value_parser = NonEmptyStringValueParser::new()
    )]
    pub kubernetes_audience: Option<String>,
    #[command(flatten)]
    pub store: crate::cli::store_args::StoreArgs,
}

impl ServeArgs {
    /// The Kubernetes ServiceAccount token settings, if any were given.
    pub fn kubernetes(&self) -> Option<crate::identity::kubernetes::KubernetesConfig> {
        let (issuer, jwks) = (
            self.kubernetes_issuer.as_ref()?,
            self.kubernetes_jwks.as_ref()?,
        );
        let mut config = crate::identity::kubernetes::KubernetesConfig::new(issuer, jwks);
        if let Some(audience) = &self.kubernetes_audience {
            config.audience.clone_from(audience);
        }
        Some(config)
    }
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d => Ok(d),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 10m, 24h, 7d)"))
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
    /// The namespace [default: default]
    #[arg(short = 'n', long, value_name = "NS", value_parser = NonEmptyStringValueParser::new())]
    pub namespace: Option<String>,
    /// Every namespace
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Show an earlier version (default: the current one)
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
}

impl GetArgs {
    /// The namespace to look in: `-n`, else `default`; None with `-A`
    /// (every namespace).
    pub fn selected_namespace(&self) -> Option<&str> {
        if self.all_namespaces {
            None
        } else {
            Some(self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE))
        }
    }
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub kind: String,
    pub name: String,
    /// The namespace
    #[arg(
        short = 'n',
        long,
        value_name = "NS",
        default_value = DEFAULT_NAMESPACE,
        value_parser = NonEmptyStringValueParser::new()
    )]
    pub namespace: String,
}

/// A trust domain is a DNS-like name: lowercase letters, digits, `.`, `-`, `_`
/// ([`remora_proto::identity::check_trust_domain`]).
fn parse_trust_domain(s: &str) -> Result<String, String> {
    remora_proto::identity::check_trust_domain(s).map(|()| s.to_string())
}

/// The server URL, always `https://`: `host:port` and `http://host:port`
/// both become `https://host:port`.
pub fn server_url(server: Option<&str>) -> Result<String, String> {
    let Some(s) = server else {
        return Ok(DEFAULT_SERVER.to_string());
    };
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("https://") {
        Ok(format!("https://{rest}"))
    } else if let Some(rest) = s.strip_prefix("http://") {
        Ok(format!("https://{rest}"))
    } else if s.contains("://") {
        Err(format!(
            "invalid --server {s:?}: use https://host:port or host:port"
        ))
    } else {
        Ok(format!("https://{s}"))
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
    fn server_urls_always_use_tls() {
        assert_eq!(server_url(None).unwrap(), DEFAULT_SERVER);
        assert_eq!(server_url(Some("cp:15012")).unwrap(), "https://cp:15012");
        assert_eq!(
            server_url(Some("http://cp:15012")).unwrap(),
            "https://cp:15012"
        );
        assert_eq!(
            server_url(Some("https://cp:15012")).unwrap(),
            "https://cp:15012"
        );
        assert!(server_url(Some("ftp://cp")).is_err());
    }

    #[test]
    fn token_and_ca_commands_parse() {
        let cli = Cli::try_parse_from([
            "remora-control",
            "token",
            "create",
            "--service",
            "b",
            "--namespace",
            "shop",
            "--ttl",
            "1h",
        ])
        .unwrap();
        let Command::Token(TokenCommand::Create { ttl, .. }) = cli.command else {
            panic!("not token create")
        };
        assert_eq!(ttl, Some(Duration::from_secs(3600)));
        assert!(Cli::try_parse_from(["remora-control", "ca", "rotate"]).is_ok());
        let cli = Cli::try_parse_from(["remora-control", "ca", "rotate", "--finish"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Ca(CaCommand::Rotate { finish: true })
        ));
        assert!(Cli::try_parse_from(["remora-control", "serve", "--ca-key", "k"]).is_err());
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
    fn get_and_delete_default_to_namespace_default() {
        let get = |args: &[&str]| {
            let cli = Cli::try_parse_from(["remora-control", "get"].iter().chain(args))?;
            let Command::Get(get) = cli.command else {
                panic!("not get")
            };
            Ok::<_, clap::Error>(get.selected_namespace().map(str::to_string))
        };
        assert_eq!(get(&[]).unwrap().as_deref(), Some("default"));
        assert_eq!(get(&["-n", "shop"]).unwrap().as_deref(), Some("shop"));
        assert_eq!(get(&["-A"]).unwrap(), None);
        assert_eq!(get(&["--all-namespaces"]).unwrap(), None);
        assert!(get(&["-A", "-n", "shop"]).is_err());
        assert!(get(&["-n", ""]).is_err());

        let cli = Cli::try_parse_from(["remora-control", "delete", "route", "backend"]).unwrap();
        let Command::Delete(delete) = cli.command else {
            panic!("not delete")
        };
        assert_eq!(delete.namespace, DEFAULT_NAMESPACE);
        assert!(Cli::try_parse_from(["remora-control", "delete", "route", "b", "-A"]).is_err());
    }

    #[test]
    fn kubernetes_issuer_and_jwks_come_together() {
        let serve = |args: &[&str]| {
            let cli = Cli::try_parse_from(["remora-control", "serve"].iter().chain(args))?;
            let Command::Serve(serve) = cli.command else {
                panic!("not serve")
            };
            Ok::<_, clap::Error>(serve.kubernetes())
        };
        assert_eq!(serve(&[]).unwrap(), None);
        let issuer = ["--kubernetes-issuer", "https://kubernetes.default.svc"];
        let jwks = ["--kubernetes-jwks", "/etc/remora/jwks.json"];
        let both = serve(&[issuer, jwks].concat()).unwrap().unwrap();
        assert_eq!(both.issuer, "https://kubernetes.default.svc");
        assert_eq!(both.jwks_file, PathBuf::from("/etc/remora/jwks.json"));
        assert_eq!(both.audience, "remora");
        let aud = serve(&[&issuer[..], &jwks, &["--kubernetes-audience", "mesh"]].concat());
        assert_eq!(aud.unwrap().unwrap().audience, "mesh");
        for alone in [&issuer[..], &jwks, &["--kubernetes-audience", "mesh"]] {
            let err = serve(alone).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
            assert!(err.to_string().contains("--kubernetes-"), "{err}");
        }
        assert!(serve(&["--kubernetes-issuer", "", "--kubernetes-jwks", "f"]).is_err());
    }

    #[test]
    fn inject_takes_a_token_source_and_audience() {
        let inject = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(["remora-control", "inject", "-f", "-"].iter().chain(args))?;
            let Command::Inject(inject) = cli.command else {
                panic!("not inject")
            };
            Ok::<_, clap::Error>((inject.token_source, inject.token_audience))
        };
        use crate::cli::inject::TokenSource;
        assert_eq!(
            inject(&[]).unwrap(),
            (TokenSource::Projected, "remora".to_string())
        );
        assert_eq!(
            inject(&["--token-source", "secret"]).unwrap().0,
            TokenSource::Secret
        );
        assert_eq!(
            inject(&["--token-audience", "mesh"]).unwrap().1,
            "mesh".to_string()
        );
        assert!(inject(&["--token-source", "file"]).is_err());
        assert!(inject(&["--token-audience", ""]).is_err());
    }

    #[test]
    fn bad_trust_domains_and_rollback_to_zero_are_usage_errors() {
        assert!(Cli::try_parse_from(["remora-control", "serve", "--trust-domain", "A B"]).is_err());
        assert!(Cli::try_parse_from(["remora-control", "rollback", "0"]).is_err());
    }
}
