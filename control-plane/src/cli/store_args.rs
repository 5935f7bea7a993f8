//! `serve`'s store options: where the control plane's state lives.

use crate::etcd::{EtcdConfig, StoreConfig};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// redb files in --data-dir: one control plane
    Embedded,
    /// etcd, shared by every replica
    Etcd,
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Where the control plane's state lives: `embedded` (in --data-dir, one
    /// replica) or `etcd` (shared by every replica)
    #[arg(long, value_enum, env = "REMORA_STORE", default_value = "embedded")]
    pub store: StoreKind,
    /// etcd's client URLs (comma-separated), with `--store etcd`
    #[arg(
        long,
        env = "REMORA_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL,URL,...",
        required_if_eq("store", "etcd")
    )]
    pub etcd_endpoints: Vec<String>,
    /// The CA that verifies etcd's server certificates (https endpoints)
    #[arg(long, env = "REMORA_ETCD_CA_FILE", value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// The client certificate presented to etcd (with --etcd-key-file)
    #[arg(
        long,
        env = "REMORA_ETCD_CERT_FILE",
        value_name = "FILE",
        requires = "etcd_key_file"
    )]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key
    #[arg(
        long,
        env = "REMORA_ETCD_KEY_FILE",
        value_name = "FILE",
        requires = "etcd_cert_file"
    )]
    pub etcd_key_file: Option<PathBuf>,
    /// The key prefix every key of this control plane lives under
    #[arg(
        long,
        env = "REMORA_ETCD_PREFIX",
        default_value = "/remora",
        value_name = "PREFIX"
    )]
    pub etcd_prefix: String,
    /// The key-encryption key (32 bytes, as 64 hex digits) that seals the CA's
    /// private key in etcd; every replica reads the same one. Required with
    /// `--store etcd`.
    #[arg(
        long,
        env = "REMORA_KEK_FILE",
        value_name = "FILE",
        required_if_eq("store", "etcd")
    )]
    pub kek_file: Option<PathBuf>,
    /// Where the other replicas and the CLI reach this replica's gRPC port
    /// (`host:port`) [default: --listen]
    #[arg(long, env = "REMORA_ADVERTISE_ADDRESS", value_name = "HOST:PORT")]
    pub advertise_address: Option<String>,
}

impl StoreArgs {
    /// The store these options name.
    pub fn config(&self) -> StoreConfig {
        match self.store {
            StoreKind::Embedded => StoreConfig::Embedded,
            StoreKind::Etcd => StoreConfig::Etcd(EtcdConfig {
                endpoints: self.etcd_endpoints.clone(),
                ca_file: self.etcd_ca_file.clone(),
                cert_file: self.etcd_cert_file.clone(),
                key_file: self.etcd_key_file.clone(),
                prefix: self.etcd_prefix.clone(),
                kek_file: self.kek_file.clone().unwrap_or_default(),
                advertise_address: self.advertise_address.clone(),
            }),
        }
    }
}
