//! `remora-control`: Remora's control plane and the operator's CLI.
//!
//! - [`store`]: the versioned, append-only policy store (redb).
//! - [`changes`]: what an apply, delete or rollback does to the policy state.
//! - [`admin`]: the Admin gRPC service; [`auth`]: its bearer-token check.
//! - [`registry`]: connected proxies, endpoints and the current snapshot;
//!   [`discovery`]: the Discovery stream each proxy holds open.
//! - [`server`]: `serve`; [`http`]: `/live`, `/ready`, `/metrics`.
//! - [`cli`], [`client`], [`output`]: the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod changes;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod http;
pub mod output;
pub mod registry;
pub mod server;
pub mod store;
