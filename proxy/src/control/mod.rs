//! The control side: the process and its two runtimes (`run`, `runtime`),
//! the settings, the control-plane clients (discovery, certificates and
//! their refusal probe), the admin and health endpoints, and `init`.

pub mod admin;
pub mod certify;
pub mod config;
pub mod control_plane;
pub mod discovery;
pub mod init;
pub mod refusals;
pub mod run;
pub mod runtime;
