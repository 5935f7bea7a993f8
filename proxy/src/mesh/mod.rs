//! The running configuration: a control-plane snapshot compiled into lookup
//! tables. A compiled [`Mesh`] is immutable; a new snapshot replaces it whole
//! (atomically, through `arc_swap`), so the request path never takes a lock.

pub mod authn;
pub mod authz;
pub mod destination;
pub mod route;

use crate::mesh::route::{Backends, Rule};
use crate::transport::pool::{EndpointPool, Pools};
use remora_proto::policy::{self, Document, Kind, Protocol, ServicePort, Spec};
use remora_proto::v1::Snapshot;
use remora_telemetry::RequestMetrics;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One instance of a service.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub instance_id: String,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub pool: Arc<EndpointPool>,
    /// Outlier detection, when the service's DestinationPolicy asks for it.
    pub breaker: Option<remora_resilience::Breaker>,
    pub breaker_gauge: Option<remora_telemetry::CircuitBreakerGauge>,
}

impl remora_resilience::Balanced for Endpoint {
    fn load(&self) -> &remora_resilience::Load {
        &self.pool.load
    }

    fn available(&self) -> bool {
        self.breaker.as_ref().is_none_or(|b| b.is_available())
    }
}

/// The endpoints a backend (a service, or a subset of it) resolves to.
#[derive(Debug)]
pub struct EndpointSet {
    /// "backend.shop" or "backend.shop{version=v2}", for logs and metrics.
    pub name: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl EndpointSet {
    /// Round robin over the endpoints, ignoring breakers (opaque TCP).
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints.get(i % self.endpoints.len())
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

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
    pub dest: Arc<crate::mesh::destination::Destination>,
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

/// The compiled snapshot.
#[derive(Debug)]
pub struct Mesh {
    pub version: String,
    pub policy_version: u64,
    pub snapshot: Snapshot,
    services: HashMap<(String, String), Arc<Service>>,
    hosts: HashMap<String, Arc<Service>>,
    addrs: HashMap<SocketAddr, Arc<Service>>,
    /// This proxy's own service, when the snapshot declares it.
    pub local: Option<Arc<Service>>,
    /// Who may call this workload.
    pub authz: crate::mesh::authz::Authz,
    /// Which end users' tokens this workload checks.
    pub authn: crate::mesh::authn::Authn,
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
            authz: crate::mesh::authz::Authz::default(),
            authn: crate::mesh::authn::Authn::default(),
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

    /// Compiles a snapshot. An invalid policy document fails the whole snapshot
    /// (the proxy NACKs it and keeps the previous one); an endpoint with an
    /// unusable address is skipped with a warning.
    pub fn compile(
        snapshot: Snapshot,
        own: (&str, &str),
        pools: &Pools,
        registry: &crate::mesh::destination::Registry,
    ) -> Result<Mesh, String> {
        let (own_ns, own_name) = own;
        let mut docs: BTreeMap<Kind, Vec<Document>> = BTreeMap::new();
        for r in &snapshot.resources {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.as_str() == r.kind)
                .ok_or_else(|| format!("{}/{}/{}: unknown kind", r.kind, r.namespace, r.name))?;
            let doc = Document::from_parts(kind, &r.namespace, &r.name, &r.spec_json)
                .map_err(|e| format!("{}/{}/{}: {e}", r.kind, r.namespace, r.name))?;
            docs.entry(kind).or_default().push(doc);
        }

        let dest_policies: HashMap<(String, String), &policy::DestinationPolicySpec> = docs
            .get(&Kind::DestinationPolicy)
            .into_iter()
            .flatten()
            .filter_map(|d| match &d.spec {
                Spec::DestinationPolicy(p) => {
                    Some(((d.metadata.namespace.clone(), p.service.clone()), p))
                }
                _ => None,
            })
            .collect();
        let mut destinations = HashMap::new();
        let mut dest_for =
            |ns: &str, name: &str| -> Result<Arc<crate::mesh::destination::Destination>, String> {
                let key = (ns.to_string(), name.to_string());
                if let Some(d) = destinations.get(&key) {
                    return Ok(Arc::clone(d));
                }
                let d = registry
                    .destination(&format!("{name}.{ns}"), dest_policies.get(&key).copied())?;
                destinations.insert(key, d.clone());
                Ok(d)
            };

        // Endpoints by service.
        let mut endpoints: HashMap<(String, String), Vec<Arc<Endpoint>>> = HashMap::new();
        for e in &snapshot.endpoints {
            let addr: SocketAddr = match e.address.parse() {
                Ok(a) => a,
                Err(_) => {
                    tracing::warn!(address = %e.address, instance = %e.instance_id,
                        "skipping endpoint with an address that is not ip:port");
                    continue;
                }
            };
            let dest = dest_for(&e.namespace, &e.service)?;
            let fqdn = format!("{}.{}", e.service, e.namespace);
            let breaker = dest
                .breaker
                .as_ref()
                .and_then(|cfg| registry.breaker(addr, &fqdn, cfg));
            let breaker_gauge = breaker.as_ref().map(|_| dest.metrics.circuit_breaker(addr));
            endpoints
                .entry((e.namespace.clone(), e.service.clone()))
                .or_default()
                .push(Arc::new(Endpoint {
                    addr,
                    instance_id: e.instance_id.clone(),
                    identity: e.identity.clone(),
                    labels: e
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    pool: pools.get(addr, crate::transport::tls::server_name_for(&e.identity)),
                    breaker,
                    breaker_gauge,
                }));
        }
        for list in endpoints.values_mut() {
            list.sort_by_key(|e| e.addr);
        }

        let mut sets = SetCache {
            endpoints: &endpoints,
            cache: HashMap::new(),
        };
        let mut routes: HashMap<(String, String), Vec<&Document>> = HashMap::new();
        for d in docs.get(&Kind::HttpRoute).into_iter().flatten() {
            if let Spec::HttpRoute(r) = &d.spec {
                routes
                    .entry((d.metadata.namespace.clone(), r.service.clone()))
                    .or_default()
                    .push(d);
            }
        }

        // Services: declared ones, plus any that only have endpoints.
        let mut declared: HashMap<(String, String), Vec<ServicePort>> = HashMap::new();
        let mut addresses: HashMap<(String, String), Vec<std::net::IpAddr>> = HashMap::new();
        for d in docs.get(&Kind::Service).into_iter().flatten() {
            if let Spec::Service(s) = &d.spec {
                let key = (d.metadata.namespace.clone(), d.metadata.name.clone());
                declared.insert(key.clone(), s.ports.clone());
                addresses.insert(key, s.addresses.clone());
            }
        }
        let mut keys: Vec<(String, String)> = declared.keys().cloned().collect();
        for k in endpoints.keys() {
            if !declared.contains_key(k) {
                keys.push(k.clone());
            }
        }

        let mut mesh = Mesh {
            version: snapshot.version.clone(),
            policy_version: snapshot.policy_version,
            snapshot: Snapshot::default(),
            services: HashMap::new(),
            hosts: HashMap::new(),
            addrs: HashMap::new(),
            local: None,
            authz: crate::mesh::authz::Authz::compile(
                docs.get(&Kind::AuthorizationPolicy)
                    .into_iter()
                    .flatten()
                    .filter(|d| d.metadata.namespace == own_ns)
                    .filter_map(|d| match &d.spec {
                        Spec::AuthorizationPolicy(p) if p.service == own_name => Some(p),
                        _ => None,
                    }),
                |rl| registry.rate_limiter(rl),
            ),
            authn: crate::mesh::authn::Authn::compile(
                docs.get(&Kind::RequestAuthentication)
                    .into_iter()
                    .flatten()
                    .filter(|d| d.metadata.namespace == own_ns)
                    .filter_map(|d| match &d.spec {
                        Spec::RequestAuthentication(a) if a.service == own_name => Some(a),
                        _ => None,
                    }),
                &snapshot.jwks,
                &format!("{own_name}.{own_ns}"),
            )?,
            telemetry: docs
                .get(&Kind::TelemetryPolicy)
                .into_iter()
                .flatten()
                .filter(|d| d.metadata.namespace == own_ns)
                .find_map(|d| match &d.spec {
                    Spec::TelemetryPolicy(t) => Some(t.clone()),
                    _ => None,
                }),
        };
        let trust_domain = if snapshot.trust_domain.is_empty() {
            "cluster.local"
        } else {
            snapshot.trust_domain.as_str()
        };
        for key in keys {
            let (ns, name) = (&key.0, &key.1);
            let fqdn = format!("{name}.{ns}");
            let identity = format!("spiffe://{trust_domain}/ns/{ns}/sa/{name}");
            let mut rules = Vec::new();
            for d in routes.get(&key).into_iter().flatten() {
                let Spec::HttpRoute(r) = &d.spec else {
                    continue;
                };
                for (i, rule) in r.rules.iter().enumerate() {
                    let rule_name = rule
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{}#{i}", d.metadata.name));
                    let metrics = Arc::new(RequestMetrics::new(
                        remora_telemetry::OUTBOUND,
                        &fqdn,
                        &rule_name,
                        &identity,
                    ));
                    rules.push(Rule::compile(rule, rule_name, ns, &mut sets, metrics)?);
                }
            }
            let svc = Arc::new(Service {
                name: name.clone(),
                namespace: ns.clone(),
                default_metrics: Arc::new(RequestMetrics::new(
                    remora_telemetry::OUTBOUND,
                    &fqdn,
                    "default",
                    &identity,
                )),
                identity: identity.into(),
                fqdn: fqdn.into(),
                ports: declared.get(&key).cloned().unwrap_or_default(),
                rules,
                all: Backends::single(sets.get(ns, name, &BTreeMap::new())),
                dest: dest_for(ns, name)?,
            });
            for host in [
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ] {
                mesh.hosts.insert(host, svc.clone());
            }
            if ns == own_ns {
                mesh.hosts
                    .entry(name.clone())
                    .or_insert_with(|| svc.clone());
            }
            for ip in addresses.get(&key).into_iter().flatten() {
                for p in &svc.ports {
                    mesh.addrs.insert(SocketAddr::new(*ip, p.port), svc.clone());
                }
            }
            for e in endpoints.get(&key).into_iter().flatten() {
                mesh.addrs.insert(e.addr, svc.clone());
            }
            if ns == own_ns && name == own_name {
                mesh.local = Some(svc.clone());
            }
            mesh.services.insert(key, svc);
        }
        let in_use: std::collections::HashSet<String> =
            mesh.services.values().map(|s| s.fqdn.to_string()).collect();
        registry.retain(&in_use);
        mesh.snapshot = snapshot;
        Ok(mesh)
    }
}

/// Builds each (service, subset) endpoint set once per snapshot, so weighted
/// backends that name the same subset share one balancer.
pub struct SetCache<'a> {
    endpoints: &'a HashMap<(String, String), Vec<Arc<Endpoint>>>,
    cache: HashMap<(String, String, BTreeMap<String, String>), Arc<EndpointSet>>,
}

impl SetCache<'_> {
    pub fn get(
        &mut self,
        ns: &str,
        service: &str,
        subset: &BTreeMap<String, String>,
    ) -> Arc<EndpointSet> {
        let key = (ns.to_string(), service.to_string(), subset.clone());
        if let Some(s) = self.cache.get(&key) {
            return s.clone();
        }
        let all = self
            .endpoints
            .get(&(ns.to_string(), service.to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let endpoints = all
            .iter()
            .filter(|e| subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            .cloned()
            .collect();
        let mut name = format!("{service}.{ns}");
        if !subset.is_empty() {
            let labels: Vec<String> = subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
            name = format!("{name}{{{}}}", labels.join(","));
        }
        let set = Arc::new(EndpointSet {
            name: name.into(),
            endpoints,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        });
        self.cache.insert(key, set.clone());
        set
    }
}

/// "host:port" → "host"; "[::1]:80" → "::1".
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}
