//! Transparent interception: the destination an application dialled before
//! iptables redirected the connection to the proxy (`SO_ORIGINAL_DST` for IPv4,
//! `IP6T_SO_ORIGINAL_DST` for IPv6).

use socket2::SockRef;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// The original destination of a redirected connection; `None` when the
/// connection was addressed to the listener itself (explicit mode) or the
/// kernel keeps no NAT record for it.
pub fn redirected_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let sock = SockRef::from(stream);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    let dst = orig.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}
