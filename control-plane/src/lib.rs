//! `remora-control`: Remora's control plane and the operator's CLI.
//!
//! - [`store`]: the versioned, append-only policy store (redb).
//! - [`changes`]: what an apply, delete or rollback does to the policy state.
//! - [`admin`]: the Admin gRPC service; [`auth`]: its bearer-token check.
//! - [`registry`]: connected proxies, endpoints and the current snapshot;
//!   [`discovery`]: the Discovery stream each proxy holds open.
//! - [`server`]: `serve`; [`http`]: `/live`, `/ready`, `/metrics`;
//!   `reflection`: what gRPC reflection describes; [`conn_limit`]: the
//!   listeners' connection slots.
//! - [`ca`]: the certificate authority; [`ca_store`]: where it comes from and
//!   is kept; [`identity_db`]: tokens and the CA record (redb); [`pem`].
//! - [`tokens`]: bootstrap tokens; [`kubernetes`]: Kubernetes ServiceAccount
//!   tokens beside them; [`identity`]: the Identity service (CSR
//!   signing); [`issued`]: the ledger of certificates issued;
//!   [`admin_identity`]: the token and rotation Admin RPCs;
//!   [`rotation`]: root rotation; [`tls`]: TLS on the gRPC port.
//! - [`cli`], [`client`], [`connect`], [`output`]: the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_identity;
pub mod auth;
pub mod ca;
pub mod ca_store;
pub mod changes;
pub mod cli;
pub mod client;
pub mod conn_limit;
pub mod connect;
pub mod data_dir;
pub mod discovery;
pub mod http;
pub mod human;
pub mod identity;
mod identity_commands;
pub mod identity_db;
pub mod inject;
pub mod issued;
pub mod jwks;
pub mod kubernetes;
pub mod metrics;
pub mod output;
pub mod pem;
pub mod push;
mod reflection;
pub mod registry;
pub mod rotation;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod tokens;
