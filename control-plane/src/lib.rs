//! `remora-control`: Remora's control plane and the operator's CLI.
//!
//! Its folders are its layers; each names only those below it (no import
//! circle among them, nor among the modules of any folder:
//! `cargo test -p remora-tests --test structure -- --ignored` checks it).
//!
//! - [`cli`]: the command line: `serve` and `inject` run here, the other
//!   commands call the Admin API of a running control plane.
//! - [`server`]: `serve`: TLS on the gRPC port and its connection slots, the
//!   Admin service and its token check, `/live`, `/ready`, `/metrics`, gRPC
//!   reflection, and root rotation (which makes the server's TLS, the trust
//!   bundle file and the snapshots follow a new CA).
//! - [`discovery`]: the registry of connected proxies and the current
//!   snapshot, the Discovery stream each proxy holds open, snapshots encoded
//!   once, the JWK sets fetched for RequestAuthentication.
//! - [`identity`]: the certificate authority and where it is kept, bootstrap
//!   and Kubernetes ServiceAccount tokens, the Identity service (CSR
//!   signing), the ledger of certificates issued.
//! - [`policy`]: the versioned, append-only policy store (redb) and what an
//!   apply, delete or rollback does to it.
//! - [`etcd`]: the store replicas share (`serve --store etcd`): etcd's
//!   client, the key-encryption key that seals the CA's key in it.
//! - [`metrics`]: each part's metrics, on recorders of their own.
//! - Shared by the server and the CLI: [`data_dir`] (the admin token and
//!   trust bundle files), [`human`] (sizes, times, YAML for people),
//!   [`secret`] (random tokens, compared in constant time).
//!
//! The workload identities themselves are `remora_proto::SpiffeId`s, and the
//! hex and clock helpers `remora_proto::util`'s.
#![forbid(unsafe_code)]

pub mod cli;
pub mod data_dir;
pub mod discovery;
pub mod etcd;
pub mod human;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod secret;
pub mod server;

// The old flat paths, kept for the tests and bench crates (the control
// plane's own integration tests in `control-plane/tests` use these).
pub use identity::{ca, ca_store, pem};
pub use server::http;

/// Kept for the tests and bench crates: `tokens::now_unix` is
/// [`remora_proto::util::now_unix`].
pub mod tokens {
    pub use remora_proto::util::now_unix;
}
