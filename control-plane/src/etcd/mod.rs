//! The etcd store (`serve --store etcd`): what replicas share.
//!
//! - [`client`]: the connection (timeouts, retries, the key prefix, the
//!   bridge for the synchronous stores).
//! - [`kek`]: the key-encryption key that seals secrets before they go to
//!   etcd.

pub mod client;
pub mod kek;

pub use client::{Etcd, EtcdError};
use std::path::PathBuf;

/// Where the control plane's state lives.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// redb files in the data directory: one control plane.
    #[default]
    Embedded,
    /// etcd, shared by every replica.
    Etcd(EtcdConfig),
}

/// `--etcd-*`, `--kek-file`, `--advertise-address`.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub prefix: String,
    pub kek_file: PathBuf,
    pub advertise_address: Option<String>,
}
