//! Step 5, connect: a pooled connection to the peer's inbound side, and how
//! a new one is made.

use crate::data::state::State;
use crate::mesh::destination::Destination;
use crate::transport::connect::{ConnLimit, Connect};

/// Step 5, connect: how a new connection to a peer of `dest` is opened. TCP
/// within the destination's connect timeout, then mTLS ([`tls::connect`]):
/// this workload's certificate, the peer's checked against the trust bundle
/// and the identity its endpoint must have. A request's connection (not an
/// opaque TCP one) takes a permit from the destination's connection limit.
///
/// [`tls::connect`]: crate::transport::tls::connect
pub(super) fn connect_mtls<'a>(
    state: &'a State,
    dest: &'a Destination,
    critical: bool,
) -> Connect<'a> {
    let limits = &state.limits;
    let timeout = dest.connect_timeout.unwrap_or(limits.connect_timeout);
    let limit = dest
        .bulkhead
        .as_ref()
        .map(|bulkhead| ConnLimit { bulkhead, critical });
    Connect::mtls(&state.identity, timeout).limited(limit)
}
