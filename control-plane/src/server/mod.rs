//! `remora-control serve`: the control plane's server.
//!
//! - [`serve`]: [`start`] opens the stores, loads the CA and runs the
//!   listeners; [`Running`] is the running server.
//! - [`tls`]: TLS on the gRPC port; [`conn_limit`]: the listeners'
//!   connection slots; [`reflection`]: what gRPC reflection describes;
//!   [`http`]: `/live`, `/ready`, `/metrics`.
//! - [`admin`]: the `remora.v1.Admin` service, its bearer-token check
//!   ([`admin::auth`]) and its token and rotation RPCs ([`admin::identity`]).
//! - [`rotation`]: root rotation, and everything that follows a change of
//!   the CA (the server's TLS, the trust bundle file, the snapshots).

pub mod admin;
pub mod conn_limit;
pub mod http;
pub mod reflection;
pub mod replica;
pub mod rotation;
pub mod serve;
pub mod tls;

pub use serve::{start, Running, ServeConfig};
