//! A service as the proxy routes to it: its ports, HTTP routing rules,
//! endpoints, destination policy and identity.

use crate::mesh::destination::Destination;
use crate::mesh::route::{Backends, Rule};
use remora_proto::policy::{Protocol, ServicePort};
use remora_telemetry::RequestMetrics;
use std::sync::Arc;

/// A service as the proxy routes to it.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// "name.namespace", used in logs.
    pub fqdn: Arc<str>,
    pub ports: Vec<ServicePort>,
    /// HTTP routing rules, in order. Empty: every request goes to `all`.
    pub rules: Vec<Rule>,
    /// Every endpoint of the service.
    pub all: Backends,
    pub dest: Arc<Destination>,
    /// The SPIFFE identity its endpoints carry (the `peer_identity` label).
    pub identity: Arc<str>,
    /// Metrics of requests that no HTTPRoute governs.
    pub default_metrics: Arc<RequestMetrics>,
}

impl Service {
    pub fn protocol(&self, port: u16) -> Option<Protocol> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.protocol)
    }

    /// The idle timeout the Service declares for opaque TCP on `port`.
    pub fn tcp_idle_timeout(&self, port: u16) -> Option<std::time::Duration> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.idle_timeout)
    }
}
