//! The command line: `remora-control serve` and the operator's commands.
//!
//! - [`args`]: the commands and their options (clap), with the table of
//!   options and their environment variables.
//! - [`local`]: the commands that run in this process: `serve` and
//!   `inject` ([`inject`]: the manifest rewriting).
//! - [`client`]: the commands that call the Admin API of a running control
//!   plane (policy, status); [`identity_commands`]: `token` and `ca`;
//!   [`connect`]: how they reach it (always TLS, the admin token).
//! - [`output`]: how answers are shown, and where every line goes.
//!
//! The CLI uses the server only through [`crate::server::start`]; what both
//! sides read is in [`crate::data_dir`] and [`crate::human`].

pub mod args;
pub mod client;
pub mod connect;
pub mod identity_commands;
pub mod inject;
pub mod install;
pub mod local;
pub mod output;
pub mod store_args;
