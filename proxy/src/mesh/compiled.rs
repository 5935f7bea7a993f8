//! The compiled snapshot: lookup tables by host, by address and by name,
//! and this workload's own service, authorization, authentication and
//! telemetry policy. Built by [`Mesh::compile`] (`compile.rs`).

use crate::mesh::authn::Authn;
use crate::mesh::authz::Authz;
use crate::mesh::service::Service;
use remora_proto::policy::{self, Protocol, ServicePort};
use remora_proto::v1::Snapshot;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The compiled snapshot.
#[derive(Debug)]
pub struct Mesh {
    pub version: String,
    pub policy_version: u64,
    pub snapshot: Snapshot,
    pub(super) services: HashMap<(String, String), Arc<Service>>,
    pub(super) hosts: HashMap<String, Arc<Service>>,
    pub(super) addrs: HashMap<SocketAddr, Arc<Service>>,
    /// This proxy's own service, when the snapshot declares it.
    pub local: Option<Arc<Service>>,
    /// Who may call this workload.
    pub authz: Authz,
    /// Which end users' tokens this workload checks.
    pub authn: Authn,
    /// The TelemetryPolicy of this proxy's namespace, if any.
    pub telemetry: Option<policy::TelemetryPolicySpec>,
}

impl Mesh {
    /// The empty mesh the proxy starts with (not ready until a real one arrives).
    pub fn empty() -> Mesh {
        Mesh {
            version: String::new(),
            policy_version: 0,
            snapshot: Snapshot::default(),
            services: HashMap::new(),
            hosts: HashMap::new(),
            addrs: HashMap::new(),
            local: None,
            authz: Authz::default(),
            authn: Authn::default(),
            telemetry: None,
        }
    }

    /// Finds a service by the host part of a Host header or `:authority`:
    /// `backend.shop`, `backend.shop.svc.cluster.local`, or `backend` in the
    /// proxy's own namespace. Case-insensitive; the port is ignored.
    pub fn by_host(&self, authority: &str) -> Option<&Arc<Service>> {
        let host = strip_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.hosts.get(&host.to_ascii_lowercase());
        }
        self.hosts.get(host)
    }

    /// Finds a service by the original destination of a redirected connection.
    pub fn by_addr(&self, addr: &SocketAddr) -> Option<&Arc<Service>> {
        self.addrs.get(addr)
    }

    /// The protocol this proxy's own service declares for application port
    /// `port` (inbound); see [`Mesh::local_port`].
    pub fn local_protocol(&self, port: u16, explicit: bool) -> Option<Protocol> {
        self.local_port(port, explicit).map(|p| p.protocol)
    }

    /// The port of this proxy's own service that delivers to application
    /// port `port` (inbound): the one whose target (or port) it is; in
    /// explicit mode (`explicit`), where `--app-port` is the application
    /// whatever number the Service gives it, else the service's only port.
    pub fn local_port(&self, port: u16, explicit: bool) -> Option<&ServicePort> {
        let ports = &self.local.as_ref()?.ports;
        let declared = ports.iter().find(|p| p.target() == port || p.port == port);
        match (declared, ports.as_slice()) {
            (None, [only]) if explicit => Some(only),
            _ => declared,
        }
    }
}

/// "host:port" → "host"; "[::1]:80" → "::1".
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}
