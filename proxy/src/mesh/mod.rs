//! The compiled mesh: a control-plane snapshot compiled into lookup tables.
//! A compiled [`Mesh`] is immutable; a new snapshot replaces it whole
//! (atomically, through `arc_swap`), so the request path never takes a lock.

pub mod authn;
pub mod authz;
mod compile;
mod compiled;
pub mod destination;
pub mod endpoints;
pub mod route;
pub mod service;
#[cfg(test)]
pub(crate) mod testing;

pub use compiled::Mesh;
pub use endpoints::{Endpoint, EndpointSet};
pub use service::Service;
