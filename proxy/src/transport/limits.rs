//! Limits on every connection the proxy serves or opens: head sizes and
//! read times, HTTP/2 streams and windows, keep-alive, idle and connect
//! timeouts, idle connections kept. Set by `remora-proxy run`'s flags.

use std::time::Duration;

/// Limits on every connection the proxy serves or opens.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_reset_streams: usize,
    pub detect_timeout: Duration,
    /// HTTP connections with no request in flight.
    pub idle_timeout: Duration,
    /// Opaque TCP and upgraded connections (a Service port may override it).
    pub tcp_idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_max_idle: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 20,
            detect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(300),
            // Envoy's TCP proxy default; database pools and subscribers idle
            // for minutes, and keep-alive probes find dead peers meanwhile.
            tcp_idle_timeout: Duration::from_secs(3600),
            h2_keepalive_interval: Duration::from_secs(20),
            h2_keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            pool_max_idle: 64,
        }
    }
}

/// Each HTTP/2 stream's receive window. A stream whose reader stops (a client
/// that never reads its download, an app that never reads its upload) holds
/// at most this much of its connection's window.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;

impl Limits {
    /// An HTTP/2 connection's receive window: room for every stream it may
    /// carry to be stalled at once, so stalled streams can never starve the
    /// others on the connection (head-of-line blocking between sidecars).
    pub fn h2_connection_window(&self) -> u32 {
        H2_STREAM_WINDOW.saturating_mul(self.h2_max_concurrent_streams.max(1))
    }
}

/// hyper's HTTP/1 reader needs at least this much buffer.
pub const MIN_HEADER_BYTES: usize = 8192;
