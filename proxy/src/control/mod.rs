//! The control side.
pub mod admin;
pub mod certify;
pub mod config;
pub mod control_plane;
pub mod discovery;
pub mod init;
pub mod refusals;
pub mod run;
pub mod runtime;
