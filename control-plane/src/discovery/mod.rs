//! Discovery: what every proxy is told, and how.
//!
//! - [`registry`]: the connected proxies, their endpoints and the snapshots
//!   published; [`endpoints`]: the endpoints listed, local and other
//!   replicas', kept by key; [`history`]: the recent deltas and the complete
//!   snapshot, and which a stream sends next; [`lease`]: snapshot generations
//!   that stay unique across restarts.
//! - [`service`]: the `remora.v1.Discovery` stream each proxy holds open
//!   (mTLS: only a workload with a certificate for its identity registers).
//! - [`push`]: each snapshot and delta encoded once for every stream;
//!   [`grpc`]: the server that sends those bytes without a copy per stream.
//! - [`jwks`]: the JWK sets RequestAuthentication rules name, fetched and
//!   published in the snapshots.

pub mod endpoints;
pub mod grpc;
pub mod history;
pub mod jwks;
pub mod lease;
pub mod push;
pub mod registry;
pub mod service;
