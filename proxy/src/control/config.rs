//! Every setting of `remora-proxy run`, next to its default and its environment
//! name. Precedence: built-in default < config file (`--config`, YAML with the
//! flags' long names as keys) < `REMORA_*` environment < flag.
//!
//! clap reads flags and the environment (a flag beats its variable); the file
//! fills what neither set; [`Settings::resolve`] applies the defaults.

use crate::data::app_health::Probe;
use crate::transport::limits::{Limits, MIN_HEADER_BYTES};
use anyhow::{bail, Context};
use clap::Args;
use remora_proto::SpiffeId;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `remora-proxy run`. Every field is optional here so that a config
/// file can fill what the command line and environment left unset.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// YAML file with any of these options (long names as keys).
    #[arg(long, env = "REMORA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The control plane's gRPC addresses: a comma-separated list of its
    /// replicas (host:port, http://… or https://…; always TLS), any of them
    /// a DNS name that may resolve to several. The proxy starts on a random
    /// one and fails over to the next (default http://127.0.0.1:15012).
    #[arg(long, env = "REMORA_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// This workload's service name.
    #[arg(long, env = "REMORA_SERVICE")]
    pub service: Option<String>,
    /// This workload's namespace (default "default").
    #[arg(long, env = "REMORA_NAMESPACE")]
    pub namespace: Option<String>,
    /// Endpoint labels, such as version=v2 (repeatable).
    #[arg(
        long = "label",
        value_name = "K=V",
        env = "REMORA_LABELS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub labels: Vec<String>,
    /// A unique id for this instance (default: service-random).
    #[arg(long, env = "REMORA_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The application's port on 127.0.0.1 where inbound traffic is delivered
    /// (explicit mode; transparent mode delivers to the original destination).
    #[arg(long, env = "REMORA_APP_PORT")]
    pub app_port: Option<u16>,
    /// The address peers dial to reach this instance (host:port). Without it the
    /// instance is not registered as an endpoint.
    #[arg(long, env = "REMORA_ADVERTISE")]
    pub advertise: Option<String>,
    /// Token file (required): proves this workload's identity to the
    /// control plane, a bootstrap token or a Kubernetes ServiceAccount token
    /// (read again for each certificate request).
    #[arg(long, env = "REMORA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust bundle (PEM, required) that verifies the control plane.
    #[arg(long, env = "REMORA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The name the control plane's certificate carries (default remora-control).
    #[arg(long, env = "REMORA_CONTROL_PLANE_NAME")]
    pub control_plane_name: Option<String>,
    /// The mesh's trust domain (default cluster.local).
    #[arg(long, env = "REMORA_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Requested workload certificate lifetime (default 24h; at least 1m).
    #[arg(long, env = "REMORA_CERT_LIFETIME", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub cert_lifetime: Option<Duration>,
    /// Outbound listener port (default 15001).
    #[arg(long, env = "REMORA_OUTBOUND_PORT")]
    pub outbound_port: Option<u16>,
    /// Outbound listener address (default 127.0.0.1).
    #[arg(long, env = "REMORA_OUTBOUND_BIND")]
    pub outbound_bind: Option<IpAddr>,
    /// Inbound listener port (default 15006).
    #[arg(long, env = "REMORA_INBOUND_PORT")]
    pub inbound_port: Option<u16>,
    /// Inbound listener address (default 0.0.0.0).
    #[arg(long, env = "REMORA_INBOUND_BIND")]
    pub inbound_bind: Option<IpAddr>,
    /// Admin port on 127.0.0.1 (default 15000).
    #[arg(long, env = "REMORA_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// Health and metrics port (default 15020).
    #[arg(long, env = "REMORA_HEALTH_PORT")]
    pub health_port: Option<u16>,
    /// Health listener address (default 0.0.0.0).
    #[arg(long, env = "REMORA_HEALTH_BIND")]
    pub health_bind: Option<IpAddr>,
    /// Largest request or response head, in bytes (default 65536, at least 8192).
    #[arg(long, env = "REMORA_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time a client has to send a complete request head (default 10s).
    #[arg(long, env = "REMORA_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub header_read_timeout: Option<Duration>,
    /// HTTP/2 streams a client may open at once on one connection (default 256).
    #[arg(long, env = "REMORA_H2_MAX_CONCURRENT_STREAMS")]
    pub h2_max_concurrent_streams: Option<u32>,
    /// HTTP/2 streams reset by the client before they were served, per
    /// connection, before it is closed with ENHANCE_YOUR_CALM (default 20).
    #[arg(long, env = "REMORA_H2_MAX_PENDING_RESET_STREAMS")]
    pub h2_max_pending_reset_streams: Option<usize>,
    /// How long protocol detection waits for a client's first bytes (default 1s).
    #[arg(long, env = "REMORA_DETECT_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub detect_timeout: Option<Duration>,
    /// An HTTP connection with no request in flight and no bytes in either
    /// direction for this long is closed (default 5m).
    #[arg(long, env = "REMORA_IDLE_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// An opaque TCP connection (and an upgraded one, such as a WebSocket) with
    /// no bytes in either direction for this long is closed (default 1h; a
    /// Service port's `idleTimeout` overrides it). TCP keep-alive finds dead
    /// peers sooner.
    #[arg(long, env = "REMORA_TCP_IDLE_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub tcp_idle_timeout: Option<Duration>,
    /// How often an HTTP/2 connection between sidecars (and to HTTP/2 clients)
    /// is pinged when no frame arrived (default 20s). The local application is
    /// never pinged: gRPC servers answer pings without data with GOAWAY.
    #[arg(long, env = "REMORA_H2_KEEPALIVE_INTERVAL", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub h2_keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is closed (default 10s).
    #[arg(long, env = "REMORA_H2_KEEPALIVE_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub h2_keepalive_timeout: Option<Duration>,
    /// Time to establish an upstream TCP connection (default 1s; a DestinationPolicy may override).
    #[arg(long, env = "REMORA_CONNECT_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Idle upstream HTTP/1 connections kept per endpoint (default 64).
    #[arg(long, env = "REMORA_POOL_MAX_IDLE")]
    pub pool_max_idle: Option<usize>,
    /// After SIGTERM, how long the proxy keeps serving after it left discovery,
    /// so peers stop picking it before it stops accepting (default 1s).
    #[arg(long, env = "REMORA_DRAIN_DELAY", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub drain_delay: Option<Duration>,
    /// How long in-flight requests and connections may take to finish after the
    /// proxy stops accepting, before it exits anyway (default 10s).
    #[arg(long, env = "REMORA_DRAIN_GRACE", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub drain_grace: Option<Duration>,
    /// How the application's health is probed: tcp (a connect), http:/PATH
    /// (a GET answered 2xx/3xx, e.g. the pod's readiness path), or none
    /// (only failed requests mark it down). An unreachable application's
    /// endpoint is withdrawn until it answers again (default tcp).
    #[arg(long, env = "REMORA_APP_PROBE")]
    pub app_probe: Option<String>,
    /// How often the application is probed while it is serving (default 5s;
    /// every 1s while it is not).
    #[arg(long, env = "REMORA_APP_PROBE_INTERVAL", value_parser = parse_duration)]
    #[serde(default, with = "remora_proto::policy::opt_duration")]
    pub app_probe_interval: Option<Duration>,
    /// OTLP/gRPC collector for trace spans, e.g. http://jaeger:4317 (none: no spans).
    #[arg(long, env = "REMORA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Trace sampling rate for requests without a sampled parent, until a
    /// TelemetryPolicy sets one (default 0.01).
    #[arg(long, env = "REMORA_TRACE_SAMPLING")]
    pub trace_sampling: Option<f64>,
    /// JSON access logs on stdout (default true; a TelemetryPolicy may change it).
    #[arg(long, env = "REMORA_ACCESS_LOG")]
    pub access_log: Option<bool>,
    /// Log filter, as RUST_LOG (default info).
    #[arg(long, env = "REMORA_LOG")]
    pub log: Option<String>,
    /// Data-plane threads (default 1, a sidecar's usual one-core limit; 0: one
    /// per core the process may run on).
    #[arg(long, env = "REMORA_WORKERS")]
    pub workers: Option<usize>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The resolved settings the proxy runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The control plane's replicas, `host:port` each (`--control-plane`).
    pub control_plane: Vec<String>,
    pub service: String,
    pub namespace: String,
    pub labels: Vec<(String, String)>,
    pub instance_id: String,
    pub app_port: Option<u16>,
    pub advertise: Option<String>,
    /// The workload's credential (a bootstrap or ServiceAccount token).
    pub token_file: PathBuf,
    /// The trust bundle that verifies the control plane.
    pub ca_file: PathBuf,
    pub control_plane_name: String,
    /// This workload's identity, from `--trust-domain`, `--namespace` and
    /// `--service`.
    pub spiffe_id: SpiffeId,
    /// What to ask the control plane for; None: its own default.
    pub cert_lifetime: Option<Duration>,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub limits: Limits,
    pub app_probe: Probe,
    pub app_probe_interval: Duration,
    pub drain_delay: Duration,
    pub drain_grace: Duration,
    pub otlp_endpoint: Option<String>,
    pub trace_sampling: f64,
    pub access_log: bool,
    pub log: String,
    /// Data-plane worker threads (resolved: at least 1).
    pub workers: usize,
}

impl Settings {
    /// Merges flags/environment with the config file and the defaults.
    pub fn resolve(args: RunArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                serde_yaml_from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => RunArgs::default(),
        };
        let a = args;
        let f = file;
        macro_rules! pick {
            ($field:ident) => {
                a.$field.clone().or(f.$field.clone())
            };
        }
        let d = Limits::default();
        let limits = Limits {
            max_header_bytes: pick!(max_header_bytes).unwrap_or(d.max_header_bytes),
            header_read_timeout: pick!(header_read_timeout).unwrap_or(d.header_read_timeout),
            h2_max_concurrent_streams: pick!(h2_max_concurrent_streams)
                .unwrap_or(d.h2_max_concurrent_streams),
            h2_max_pending_reset_streams: pick!(h2_max_pending_reset_streams)
                .unwrap_or(d.h2_max_pending_reset_streams),
            detect_timeout: pick!(detect_timeout).unwrap_or(d.detect_timeout),
            idle_timeout: pick!(idle_timeout).unwrap_or(d.idle_timeout),
            tcp_idle_timeout: pick!(tcp_idle_timeout).unwrap_or(d.tcp_idle_timeout),
            h2_keepalive_interval: pick!(h2_keepalive_interval).unwrap_or(d.h2_keepalive_interval),
            h2_keepalive_timeout: pick!(h2_keepalive_timeout).unwrap_or(d.h2_keepalive_timeout),
            connect_timeout: pick!(connect_timeout).unwrap_or(d.connect_timeout),
            pool_max_idle: pick!(pool_max_idle).unwrap_or(d.pool_max_idle),
        };
        if pick!(cert_lifetime).is_some_and(|d| d < Duration::from_secs(60)) {
            bail!("--cert-lifetime must be at least 1m");
        }
        if limits.h2_keepalive_interval.is_zero() || limits.h2_keepalive_timeout.is_zero() {
            bail!("--h2-keepalive-interval and --h2-keepalive-timeout must be longer than 0s");
        }
        if limits.max_header_bytes < MIN_HEADER_BYTES {
            bail!("--max-header-bytes must be at least {MIN_HEADER_BYTES}");
        }
        let Some(service) = pick!(service) else {
            bail!("--service is required (or REMORA_SERVICE)");
        };
        let namespace = pick!(namespace).unwrap_or_else(|| "default".into());
        let trust_domain = pick!(trust_domain).unwrap_or_else(|| "cluster.local".into());
        let spiffe_id = SpiffeId::new(&trust_domain, &namespace, &service).map_err(|e| {
            anyhow::anyhow!(
                "--trust-domain, --namespace and --service make this workload's SPIFFE ID: {e}"
            )
        })?;

        let labels_raw = if a.labels.is_empty() {
            f.labels
        } else {
            a.labels
        };
        let mut labels = Vec::new();
        for l in labels_raw {
            let Some((k, v)) = l.split_once('=') else {
                bail!("--label {l:?}: expected K=V");
            };
            labels.push((k.trim().to_string(), v.trim().to_string()));
        }
        // Without either the proxy could never be ready: refuse to start
        // rather than run unready, saying what is missing.
        let Some(ca_file) = pick!(ca_file) else {
            bail!(
                "--ca-file is required (or REMORA_CA_FILE): the trust bundle that verifies \
                 the control plane (its data dir's trust-bundle.pem)"
            );
        };
        let Some(token_file) = pick!(token_file) else {
            bail!(
                "--token-file is required (or REMORA_TOKEN_FILE): the token that proves this \
                 workload's identity (`remora-control token create`, or a Kubernetes \
                 ServiceAccount token)"
            );
        };
        let instance_id =
            pick!(instance_id).unwrap_or_else(|| format!("{service}-{:08x}", fastrand::u32(..)));
        let control_plane = pick!(control_plane).unwrap_or_else(|| "http://127.0.0.1:15012".into());
        let control_plane = crate::control::replicas::parse_list(&control_plane)
            .map_err(|e| anyhow::anyhow!("--control-plane {e}"))?;
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Ok(Settings {
            control_plane,
            service,
            namespace,
            labels,
            instance_id,
            app_port: pick!(app_port),
            advertise: pick!(advertise),
            token_file,
            ca_file,
            control_plane_name: pick!(control_plane_name)
                .unwrap_or_else(|| "remora-control".into()),
            spiffe_id,
            cert_lifetime: pick!(cert_lifetime),
            outbound_addr: SocketAddr::new(
                pick!(outbound_bind).unwrap_or(local),
                pick!(outbound_port).unwrap_or(15001),
            ),
            inbound_addr: SocketAddr::new(
                pick!(inbound_bind).unwrap_or(any),
                pick!(inbound_port).unwrap_or(15006),
            ),
            admin_addr: SocketAddr::new(local, pick!(admin_port).unwrap_or(15000)),
            health_addr: SocketAddr::new(
                pick!(health_bind).unwrap_or(any),
                pick!(health_port).unwrap_or(15020),
            ),
            limits,
            app_probe: match pick!(app_probe) {
                Some(p) => p.parse().map_err(|e| anyhow::anyhow!("--app-probe {e}"))?,
                None => Probe::Tcp,
            },
            app_probe_interval: pick!(app_probe_interval).unwrap_or(Duration::from_secs(5)),
            drain_delay: pick!(drain_delay).unwrap_or(Duration::from_secs(1)),
            drain_grace: pick!(drain_grace).unwrap_or(Duration::from_secs(10)),
            otlp_endpoint: pick!(otlp_endpoint).filter(|e| !e.is_empty()),
            trace_sampling: pick!(trace_sampling).unwrap_or(0.01).clamp(0.0, 1.0),
            access_log: pick!(access_log).unwrap_or(true),
            log: pick!(log).unwrap_or_else(|| "info".into()),
            workers: crate::control::runtime::workers(pick!(workers).unwrap_or(1)),
        })
    }
}

fn serde_yaml_from_str(text: &str) -> anyhow::Result<RunArgs> {
    // The config file is small and flat; JSON is valid YAML's subset we also take.
    let value: serde_json::Value = serde_yaml_ng::from_str(text)?;
    Ok(serde_json::from_value(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The least a proxy runs with: its service and the control plane's
    /// trust bundle.
    fn minimal(service: &str) -> RunArgs {
        RunArgs {
            service: Some(service.into()),
            ca_file: Some("/var/run/remora/ca.pem".into()),
            token_file: Some("/var/run/remora/token".into()),
            ..Default::default()
        }
    }

    fn config_file(yaml: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("remora-cfg-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let path = config_file(
            "service: from-file\nnamespace: shop\nidle-timeout: 7s\nmax-header-bytes: 9000\n",
        );
        let args = RunArgs {
            config: Some(path),
            max_header_bytes: Some(10000),
            ..minimal("from-flag")
        };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(s.service, "from-flag");
        assert_eq!(s.namespace, "shop");
        assert_eq!(s.spiffe_id, "spiffe://cluster.local/ns/shop/sa/from-flag");
        assert_eq!(s.limits.idle_timeout, Duration::from_secs(7));
        assert_eq!(s.limits.max_header_bytes, 10000);
        assert_eq!(s.limits.detect_timeout, Duration::from_secs(1));
        assert_eq!(s.outbound_addr.port(), 15001);
        assert_eq!(s.workers, 1, "one data-plane thread unless asked");
        assert_eq!(s.token_file, PathBuf::from("/var/run/remora/token"));
    }

    #[test]
    fn the_control_plane_is_a_list_of_replicas() {
        let s = Settings::resolve(minimal("a")).unwrap();
        assert_eq!(s.control_plane, ["127.0.0.1:15012"]);
        let args = RunArgs {
            control_plane: Some("https://cp-0.remora:15012, cp-1.remora:15012,10.0.0.7".into()),
            ..minimal("a")
        };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(
            s.control_plane,
            ["cp-0.remora:15012", "cp-1.remora:15012", "10.0.0.7:15012"]
        );
        let path = config_file("service: a\ncontrol-plane: a:1,b:2\n");
        let s = Settings::resolve(RunArgs {
            config: Some(path),
            ..minimal("a")
        })
        .unwrap();
        assert_eq!(s.control_plane, ["a:1", "b:2"]);
        let args = RunArgs {
            control_plane: Some("a:1,b:port".into()),
            ..minimal("a")
        };
        let e = Settings::resolve(args).unwrap_err().to_string();
        assert!(e.starts_with("--control-plane \"b:port\": the port"), "{e}");
    }

    #[test]
    fn workers_zero_means_every_core_and_a_file_can_set_them() {
        let args = RunArgs {
            workers: Some(0),
            ..minimal("a")
        };
        let s = Settings::resolve(args).unwrap();
        assert_eq!(
            s.workers,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let path = config_file(
            "service: a\nworkers: 3\nca-file: /etc/remora/ca.pem\ntoken-file: /etc/remora/token\n",
        );
        let s = Settings::resolve(RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.workers, 3);
        assert_eq!(s.ca_file, PathBuf::from("/etc/remora/ca.pem"));
        assert_eq!(s.token_file, PathBuf::from("/etc/remora/token"));
    }

    #[test]
    fn refuses_too_small_header_limit_and_bad_labels() {
        let args = RunArgs {
            max_header_bytes: Some(100),
            ..minimal("a")
        };
        let e = Settings::resolve(args).unwrap_err().to_string();
        assert!(e.contains("--max-header-bytes"), "{e}");
        let args = RunArgs {
            labels: vec!["novalue".into()],
            ..minimal("a")
        };
        let e = Settings::resolve(args).unwrap_err().to_string();
        assert!(e.contains("--label"), "{e}");
    }

    #[test]
    fn a_proxy_without_its_identity_flags_is_refused_saying_which() {
        let e = Settings::resolve(RunArgs {
            token_file: None,
            ..minimal("a")
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--token-file is required"), "{e}");
        let e = Settings::resolve(RunArgs {
            ca_file: None,
            ..minimal("a")
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--ca-file is required"), "{e}");
        assert!(Settings::resolve(minimal("a")).is_ok());
    }

    #[test]
    fn names_no_spiffe_id_can_hold_are_refused() {
        for (td, ns, svc) in [
            ("Cluster", "shop", "a"),
            ("td", "shop", "a/b"),
            ("td", "..", "a"),
        ] {
            let args = RunArgs {
                trust_domain: Some(td.into()),
                namespace: Some(ns.into()),
                ..minimal(svc)
            };
            let e = Settings::resolve(args).unwrap_err().to_string();
            assert!(e.contains("SPIFFE ID"), "{td} {ns} {svc}: {e}");
        }
    }
}
