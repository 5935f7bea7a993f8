//! Pre-resolved TCP connection metrics of one (direction, service).

use metrics::{counter, gauge, Counter, Gauge, Label};

use crate::metrics::{TCP_BYTES_TOTAL, TCP_CONNECTIONS_OPEN, TCP_CONNECTIONS_TOTAL};

/// Connection gauge and counters of one (direction, service). Cheap to clone.
#[derive(Clone)]
pub struct TcpMetrics {
    open: Gauge,
    opened: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpMetrics {
    /// Handles for `direction` (`inbound` | `outbound`) and `service`. Create after
    /// [`crate::Metrics::install`].
    pub fn new(direction: &'static str, service: &str) -> Self {
        let labels = [
            Label::from_static_parts("direction", direction),
            Label::new("service", service.to_owned()),
        ];
        let flow = |flow: &'static str| {
            let mut l = labels.to_vec();
            l.push(Label::from_static_parts("flow", flow));
            counter!(TCP_BYTES_TOTAL, l)
        };
        TcpMetrics {
            open: gauge!(TCP_CONNECTIONS_OPEN, labels.iter()),
            opened: counter!(TCP_CONNECTIONS_TOTAL, labels.iter()),
            sent: flow("sent"),
            received: flow("received"),
        }
    }

    /// Counts a new connection; it counts as open until the guard is dropped.
    pub fn open(&self) -> OpenConnection {
        self.opened.increment(1);
        self.open.increment(1.0);
        OpenConnection {
            open: self.open.clone(),
        }
    }

    /// Adds bytes sent to the peer.
    pub fn sent(&self, bytes: u64) {
        self.sent.increment(bytes);
    }

    /// Adds bytes received from the peer.
    pub fn received(&self, bytes: u64) {
        self.received.increment(bytes);
    }
}

/// Decrements the open-connections gauge when dropped.
#[must_use = "the connection counts as open until this is dropped"]
pub struct OpenConnection {
    open: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}
