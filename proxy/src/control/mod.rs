//! The control side: the process and its two runtimes (`run`, `runtime`),
//! the settings, the control-plane clients (its replicas, discovery and the
//! incremental snapshots it merges, certificates and their refusal probe),
//! the admin and health endpoints, and `init`.

pub mod admin;
pub mod certify;
pub mod config;
pub mod control_plane;
pub mod discovery;
#[cfg(test)]
mod discovery_tests;
pub mod incremental;
pub mod init;
pub mod refusals;
pub mod replicas;
pub mod run;
pub mod runtime;
