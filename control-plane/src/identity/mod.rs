//! Workload identity: who a workload is and the certificates that prove it.
//!
//! - [`ca`]: the certificate authority (roots, signer, workload and server
//!   certificates); [`ca_store`]: where it comes from (generated, or the
//!   operator's files) and is kept; [`pem`].
//! - [`db`]: the identity database (redb): tokens, the CA record, the ledger.
//! - [`tokens`]: bootstrap tokens; [`kubernetes`]: Kubernetes ServiceAccount
//!   tokens beside them. Both are a `WorkloadAuthenticator`.
//! - [`certify`]: the `remora.v1.Identity` service (CSR signing);
//!   [`issued`]: the ledger of the certificates it issued; [`peer`]: the
//!   identity in a caller's client certificate.
//!
//! Root rotation, which makes the server's TLS and the snapshots follow a
//! new CA, sits above this, with the server ([`crate::server::rotation`]).

pub mod ca;
pub mod ca_store;
pub mod certify;
pub mod db;
pub mod issued;
pub mod kubernetes;
pub mod peer;
pub mod pem;
pub mod tokens;
