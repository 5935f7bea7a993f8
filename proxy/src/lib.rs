//! `remora-proxy`: the Remora sidecar. Read `outbound.rs` and `inbound.rs` for
//! the request path in order; everything else is a piece they compose.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app_health;
pub mod authn;
pub mod authz;
pub mod body;
pub mod certify;
pub mod config;
pub mod connect;
pub mod control_plane;
pub mod destination;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod error;
pub mod expect;
pub mod forward;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod intercept;
pub mod io;
pub mod mesh;
pub mod observe;
pub mod outbound;
pub mod pool;
pub mod refusals;
pub mod replay;
pub mod route;
pub mod run;
pub mod runtime;
pub mod serve;
pub mod state;
pub mod tcp;
pub mod tls;
