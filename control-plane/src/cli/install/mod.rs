//! `remora-control install`: prints the control plane's Kubernetes manifests
//! (multi-document YAML on stdout), offline, for `kubectl apply -f -`.
//!
//! With `--store etcd` (the default) the control plane runs as `--replicas`
//! replicas (3) sharing the etcd cluster at `--etcd-endpoints`; with
//! `--store embedded` it is one replica whose state lives on a
//! PersistentVolumeClaim.
//!
//! The objects, in order: Namespace, ServiceAccount, (embedded: the
//! PersistentVolumeClaim), Service `remora-control` (gRPC 15012, the address
//! proxies dial: `remora-control.<ns>.svc:15012`; HTTP 15014), the headless
//! Service `remora-control-replicas` (a name resolving to every replica),
//! Deployment `remora-control`, and, with more than one replica, a
//! PodDisruptionBudget keeping all but one available.
//!
//! Key material is never generated or printed: the key-encryption key comes
//! from an existing Secret (`--kek-secret`, key `kek`: 64 hex digits), which
//! the output's opening comment says how to make.

mod objects;

use anyhow::bail;
use clap::{Args, ValueEnum};
use serde_yaml_ng::Value;

/// The control plane's image (the style of `inject`'s proxy image).
pub const DEFAULT_IMAGE: &str = "ghcr.io/remora-mesh/remora-control:0.1.0";
pub const DEFAULT_NAMESPACE: &str = "remora-system";
pub const DEFAULT_KEK_SECRET: &str = "remora-kek";
/// The name of the Deployment, its ServiceAccount and its Service.
pub const NAME: &str = "remora-control";
/// The headless Service: one DNS record per ready replica.
pub const REPLICAS_SERVICE: &str = "remora-control-replicas";
/// The embedded store's volume claim.
pub const DATA_CLAIM: &str = "remora-control-data";
pub const GRPC_PORT: u16 = 15012;
pub const HTTP_PORT: u16 = 15014;
/// The data dir in the container (the image's `REMORA_DATA_DIR`).
pub const DATA_DIR: &str = "/var/lib/remora";
/// Where the KEK Secret is mounted; the key-encryption key is `kek` in it.
pub const KEK_DIR: &str = "/etc/remora/kek";
/// Where the etcd client TLS Secret is mounted (`ca.crt`, `tls.crt`, `tls.key`).
pub const ETCD_TLS_DIR: &str = "/etc/remora/etcd-tls";

/// Where the control plane's state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum InstallStore {
    /// etcd (`--etcd-endpoints`), shared by every replica
    #[default]
    Etcd,
    /// redb files on a PersistentVolumeClaim: one replica
    Embedded,
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// Control plane replicas [default: 3 with --store etcd, 1 with --store
    /// embedded, which allows no more]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub replicas: Option<u32>,
    /// The namespace of every object
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE, value_name = "NS")]
    pub namespace: String,
    /// The control plane's image
    #[arg(long, default_value = DEFAULT_IMAGE, value_name = "IMAGE")]
    pub image: String,
    /// The SPIFFE trust domain of workload identities
    #[arg(long, default_value = "cluster.local", value_name = "NAME")]
    pub trust_domain: String,
    /// The cluster's DNS domain (for the Service names in the server
    /// certificate)
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub cluster_domain: String,
    /// Where the state lives: `etcd` (needs --etcd-endpoints) or `embedded`
    /// (one replica, a PersistentVolumeClaim)
    #[arg(long, value_enum, default_value = "etcd")]
    pub store: InstallStore,
    /// etcd's client URLs, comma-separated (http:// or https://)
    #[arg(long, value_delimiter = ',', value_name = "URL,URL,...")]
    pub etcd_endpoints: Vec<String>,
    /// An existing Secret (type kubernetes.io/tls or generic) with ca.crt,
    /// tls.crt and tls.key: the CA verifying etcd and the client certificate
    /// presented to it
    #[arg(long, value_name = "NAME")]
    pub etcd_tls_secret: Option<String>,
    /// The key prefix in etcd [default: the control plane's, /remora]
    #[arg(long, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// An existing Secret whose key `kek` holds the key-encryption key (64 hex
    /// digits) sealing the CA's key in etcd
    #[arg(long, default_value = DEFAULT_KEK_SECRET, value_name = "NAME")]
    pub kek_secret: String,
    /// The embedded store's volume size
    #[arg(long, default_value = "1Gi", value_name = "SIZE")]
    pub storage_size: String,
    /// The embedded store's StorageClass [default: the cluster's default]
    #[arg(long, value_name = "CLASS")]
    pub storage_class: Option<String>,
}

/// The settings of a manifest, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOptions {
    pub replicas: u32,
    pub namespace: String,
    pub image: String,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub store: StoreChoice,
}

/// The store, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    Etcd {
        endpoints: Vec<String>,
        tls_secret: Option<String>,
        prefix: Option<String>,
        kek_secret: String,
    },
    Embedded {
        storage_size: String,
        storage_class: Option<String>,
    },
}

impl InstallArgs {
    /// The options, or why they do not make a manifest.
    pub fn options(&self) -> anyhow::Result<InstallOptions> {
        check_dns_label("--namespace", &self.namespace)?;
        if self.image.trim().is_empty() || self.image.contains(char::is_whitespace) {
            bail!("--image {:?}: not an image reference", self.image);
        }
        remora_proto::identity::check_trust_domain(&self.trust_domain)
            .map_err(|e| anyhow::anyhow!("--trust-domain {:?}: {e}", self.trust_domain))?;
        check_dns_name("--cluster-domain", &self.cluster_domain)?;
        let store = match self.store {
            InstallStore::Etcd => {
                if self.etcd_endpoints.is_empty() {
                    bail!(
                        "--store etcd (the default) needs --etcd-endpoints URL,... (the etcd \
                         cluster every replica shares); for one replica without etcd use \
                         --store embedded"
                    );
                }
                for url in &self.etcd_endpoints {
                    check_endpoint(url)?;
                }
                if let Some(secret) = &self.etcd_tls_secret {
                    check_dns_name("--etcd-tls-secret", secret)?;
                }
                check_dns_name("--kek-secret", &self.kek_secret)?;
                if let Some(prefix) = &self.etcd_prefix {
                    if !prefix.starts_with('/') || prefix.contains(char::is_whitespace) {
                        bail!("--etcd-prefix {prefix:?}: must start with / and hold no spaces");
                    }
                }
                StoreChoice::Etcd {
                    endpoints: self.etcd_endpoints.clone(),
                    tls_secret: self.etcd_tls_secret.clone(),
                    prefix: self.etcd_prefix.clone(),
                    kek_secret: self.kek_secret.clone(),
                }
            }
            InstallStore::Embedded => {
                if let Some(n @ 2..) = self.replicas {
                    bail!(
                        "--store embedded runs one replica (its state is one process's files), \
                         not {n}: use --store etcd --etcd-endpoints URL,... for more"
                    );
                }
                let etcd_only = [
                    ("--etcd-endpoints", !self.etcd_endpoints.is_empty()),
                    ("--etcd-tls-secret", self.etcd_tls_secret.is_some()),
                    ("--etcd-prefix", self.etcd_prefix.is_some()),
                ];
                if let Some((flag, _)) = etcd_only.iter().find(|(_, given)| *given) {
                    bail!("{flag} is for --store etcd, not --store embedded");
                }
                check_quantity("--storage-size", &self.storage_size)?;
                if let Some(class) = &self.storage_class {
                    check_dns_name("--storage-class", class)?;
                }
                StoreChoice::Embedded {
                    storage_size: self.storage_size.clone(),
                    storage_class: self.storage_class.clone(),
                }
            }
        };
        let replicas = match store {
            StoreChoice::Etcd { .. } => self.replicas.unwrap_or(3),
            StoreChoice::Embedded { .. } => 1,
        };
        Ok(InstallOptions {
            replicas,
            namespace: self.namespace.clone(),
            image: self.image.clone(),
            trust_domain: self.trust_domain.clone(),
            cluster_domain: self.cluster_domain.clone(),
            store,
        })
    }
}

/// Prints the manifests.
pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let manifests = render(&args.options()?)?;
    crate::cli::output::out(manifests)?;
    Ok(())
}

/// The manifests: an opening comment, then the documents separated by `---`.
pub fn render(opts: &InstallOptions) -> anyhow::Result<String> {
    let mut text = header(opts);
    for (i, doc) in documents(opts).iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(&serde_yaml_ng::to_string(doc)?);
    }
    Ok(text)
}

/// Every object, in the order `kubectl apply` should create them.
pub fn documents(opts: &InstallOptions) -> Vec<Value> {
    let mut docs = vec![objects::namespace(opts), objects::service_account(opts)];
    if let StoreChoice::Embedded { .. } = opts.store {
        docs.push(objects::data_claim(opts));
    }
    docs.push(objects::service(opts));
    docs.push(objects::replicas_service(opts));
    docs.push(objects::deployment(opts));
    if opts.replicas > 1 {
        docs.push(objects::disruption_budget(opts));
    }
    docs
}

/// The opening comment: what must exist before `kubectl apply`, and how
/// proxies reach the control plane.
fn header(opts: &InstallOptions) -> String {
    let ns = &opts.namespace;
    let mut lines = vec![
        format!(
            "# Remora control plane: {} replica(s) in namespace {ns}.",
            opts.replicas
        ),
        "# Generated by `remora-control install`; apply with `kubectl apply -f -`.".to_owned(),
    ];
    match &opts.store {
        StoreChoice::Etcd {
            kek_secret,
            tls_secret,
            ..
        } => {
            lines.push("#".to_owned());
            lines.push(
                "# Before applying, create the key-encryption key (32 random bytes as 64 hex \
                 digits; every replica reads the same one; keep a copy: without it the CA \
                 sealed in etcd is lost):"
                    .to_owned(),
            );
            lines.push(format!("#   kubectl create namespace {ns}"));
            lines.push(format!(
                "#   kubectl -n {ns} create secret generic {kek_secret} --from-literal=kek=$(openssl rand -hex 32)"
            ));
            if let Some(tls) = tls_secret {
                lines.push(format!(
                    "# and the etcd client TLS Secret {tls} (keys ca.crt, tls.crt, tls.key):"
                ));
                lines.push(format!(
                    "#   kubectl -n {ns} create secret generic {tls} --from-file=ca.crt --from-file=tls.crt --from-file=tls.key"
                ));
            }
        }
        StoreChoice::Embedded { .. } => {
            lines.push("#".to_owned());
            lines.push(
                "# One replica (--store embedded): its state lives on the PersistentVolumeClaim \
                 remora-control-data."
                    .to_owned(),
            );
        }
    }
    lines.push("#".to_owned());
    lines.push(format!(
        "# Proxies dial {NAME}.{ns}.svc:{GRPC_PORT} (`remora-control inject \
         --control-plane-address {NAME}.{ns}.svc:{GRPC_PORT}`)."
    ));
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// A DNS-1123 label: a namespace.
fn check_dns_label(flag: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "{flag} {name:?}: not a DNS label (lowercase letters, digits and '-', at most 63, \
             starting and ending with a letter or digit)"
        );
    }
    Ok(())
}

/// A DNS-1123 subdomain: a Secret's or StorageClass's name, a DNS domain.
fn check_dns_name(flag: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        bail!("{flag} {name:?}: not a DNS name (lowercase letters, digits, '-' and '.')");
    }
    Ok(())
}

/// An etcd client URL: `http(s)://host:port`, nothing else in it.
fn check_endpoint(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let ok = rest.is_some_and(|hp| {
        !hp.is_empty()
            && !hp.contains(|c: char| c.is_whitespace() || matches!(c, '/' | ',' | '"' | '\''))
    });
    if !ok {
        bail!("--etcd-endpoints: {url:?} is not an etcd client URL (http://host:port or https://host:port)");
    }
    Ok(())
}

/// A Kubernetes quantity such as `1Gi` or `500M`.
fn check_quantity(flag: &str, q: &str) -> anyhow::Result<()> {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &q[digits.len()..];
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && [
            "", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ]
        .contains(&suffix);
    if !ok {
        bail!("{flag} {q:?}: not a quantity (such as 1Gi, 500Mi, 10G)");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
