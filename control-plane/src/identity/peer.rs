//! Who called: the workload identity and certificate serial in the client
//! certificate of a gRPC request, which the TLS layer verified against the
//! trust bundle ([`crate::server::tls`]). The Identity and Discovery services
//! both ask.

use crate::identity::ca;
use tonic::{Request, Status};

/// The serial (lowercase hex) of the client certificate of a request, if it
/// presented one.
pub fn peer_serial<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    ca::serial_hex(certs.first()?).ok()
}

/// The SPIFFE ID in the client certificate of a request: `None` when the
/// client presented no certificate. The TLS layer already verified the chain
/// against the trust bundle; a certificate without exactly one URI SAN is
/// refused.
pub fn peer_spiffe_id<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(certs) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    let uris = ca::uri_sans(leaf)
        .map_err(|e| Status::unauthenticated(format!("cannot read the client certificate: {e}")))?;
    match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(Some(one.clone())),
        _ => Err(Status::unauthenticated(format!(
            "the client certificate must carry exactly one spiffe:// URI SAN (it has {uris:?})"
        ))),
    }
}
