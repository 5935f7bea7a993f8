//! [`Mesh::compile`]: a snapshot, one step at a time, into a [`Mesh`]. An
//! invalid policy document fails the whole snapshot (the proxy NACKs it and
//! keeps the previous one); an endpoint with an unusable address is skipped
//! with a warning.
//!
//! The steps, in order: the documents parsed and checked; the endpoints,
//! each with its pool, breaker and destination; the services (declared ones,
//! plus any that only have endpoints), each with its routing rules; this
//! workload's own authorization, authentication and telemetry policies; the
//! lookup tables by host, by address and by name.

use crate::mesh::authn::Authn;
use crate::mesh::authz::Authz;
use crate::mesh::compiled::Mesh;
use crate::mesh::destination::{Destination, Registry};
use crate::mesh::endpoints::{Endpoint, SetCache};
use crate::mesh::route::{Backends, Rule};
use crate::mesh::service::Service;
use crate::transport::pool::Pools;
use crate::transport::tls;
use remora_proto::policy::{self, Document, Kind, ServicePort, Spec};
use remora_proto::v1::{self, Snapshot};
use remora_proto::SpiffeId;
use remora_telemetry::RequestMetrics;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// A service's (namespace, name).
type Key = (String, String);

/// The documents of a snapshot, by kind.
type Documents = BTreeMap<Kind, Vec<Document>>;

impl Mesh {
    /// Compiles `snapshot` for the workload `own` (namespace, service).
    /// Pools and the state kept across snapshots (breakers, budgets,
    /// bulkheads, rate limits) come from `pools` and `registry`.
    pub fn compile(
        snapshot: Snapshot,
        own: (&str, &str),
        pools: &Pools,
        registry: &Registry,
    ) -> Result<Mesh, String> {
        let docs = documents(&snapshot)?;
        let mut destinations = Destinations::new(registry, &docs);
        let endpoints = endpoints(&snapshot.endpoints, &mut destinations, pools, registry)?;
        let mut sets = SetCache::new(&endpoints);
        let routes = routes(&docs);
        let declared = declared_services(&docs);
        let mut mesh = Mesh {
            version: snapshot.version.clone(),
            policy_version: snapshot.policy_version,
            snapshot: Snapshot::default(),
            services: HashMap::new(),
            hosts: HashMap::new(),
            addrs: HashMap::new(),
            local: None,
            authz: own_authz(&docs, own, registry),
            authn: own_authn(&docs, own, &snapshot.jwks)?,
            telemetry: own_telemetry(&docs, own.0),
        };
        let trust_domain = trust_domain(&snapshot);
        for key in service_keys(&declared, &endpoints) {
            let rules = rules(&key, trust_domain, routes.get(&key), &mut sets)?;
            let svc = Arc::new(Service {
                default_metrics: metrics(&key, "default", trust_domain),
                identity: identity(trust_domain, &key).into(),
                fqdn: fqdn(&key).into(),
                name: key.1.clone(),
                namespace: key.0.clone(),
                ports: declared
                    .get(&key)
                    .map(|d| d.ports.clone())
                    .unwrap_or_default(),
                rules,
                all: Backends::single(sets.get(&key.0, &key.1, &BTreeMap::new())),
                dest: destinations.get(&key.0, &key.1)?,
            });
            let addresses = declared.get(&key).map_or(&[][..], |d| &d.addresses);
            let instances = endpoints.get(&key).map_or(&[][..], Vec::as_slice);
            index(&mut mesh, key, svc, addresses, instances, own);
        }
        let in_use: HashSet<String> = mesh.services.values().map(|s| s.fqdn.to_string()).collect();
        registry.retain(&in_use);
        mesh.snapshot = snapshot;
        Ok(mesh)
    }
}

/// `name.namespace`, as logs, metrics and the registry name a service.
fn fqdn((ns, name): &Key) -> String {
    format!("{name}.{ns}")
}

/// The SPIFFE identity the endpoints of the service `key` carry; none
/// (empty) for a name no SPIFFE ID can hold, which no endpoint can prove.
fn identity(trust_domain: &str, (ns, name): &Key) -> String {
    SpiffeId::new(trust_domain, ns, name)
        .map(SpiffeId::into_string)
        .unwrap_or_default()
}

/// Every resource parsed and checked, by kind: an unknown kind or an
/// invalid document fails the snapshot.
fn documents(snapshot: &Snapshot) -> Result<Documents, String> {
    let mut docs = Documents::new();
    for r in &snapshot.resources {
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == r.kind)
            .ok_or_else(|| format!("{}/{}/{}: unknown kind", r.kind, r.namespace, r.name))?;
        let doc = Document::from_parts(kind, &r.namespace, &r.name, &r.spec_json)
            .map_err(|e| format!("{}/{}/{}: {e}", r.kind, r.namespace, r.name))?;
        docs.entry(kind).or_default().push(doc);
    }
    Ok(docs)
}

/// The documents of `kind`.
fn of_kind(docs: &Documents, kind: Kind) -> impl Iterator<Item = &Document> {
    docs.get(&kind).into_iter().flatten()
}

/// Each service's compiled DestinationPolicy, made once per snapshot (and
/// reused from the registry while the policy is unchanged).
struct Destinations<'a> {
    registry: &'a Registry,
    policies: HashMap<Key, &'a policy::DestinationPolicySpec>,
    made: HashMap<Key, Arc<Destination>>,
}

impl<'a> Destinations<'a> {
    fn new(registry: &'a Registry, docs: &'a Documents) -> Destinations<'a> {
        let policies = of_kind(docs, Kind::DestinationPolicy)
            .filter_map(|d| match &d.spec {
                Spec::DestinationPolicy(p) => {
                    Some(((d.metadata.namespace.clone(), p.service.clone()), p))
                }
                _ => None,
            })
            .collect();
        Destinations {
            registry,
            policies,
            made: HashMap::new(),
        }
    }

    fn get(&mut self, ns: &str, name: &str) -> Result<Arc<Destination>, String> {
        let key = (ns.to_string(), name.to_string());
        if let Some(d) = self.made.get(&key) {
            return Ok(Arc::clone(d));
        }
        let d = self
            .registry
            .destination(&fqdn(&key), self.policies.get(&key).copied())?;
        self.made.insert(key, d.clone());
        Ok(d)
    }
}

/// The endpoints of each service, in address order, each with its pool
/// (mTLS to the identity it must prove) and, when its destination has
/// one, its breaker.
fn endpoints(
    list: &[v1::Endpoint],
    destinations: &mut Destinations<'_>,
    pools: &Pools,
    registry: &Registry,
) -> Result<HashMap<Key, Vec<Arc<Endpoint>>>, String> {
    let mut endpoints: HashMap<Key, Vec<Arc<Endpoint>>> = HashMap::new();
    for e in list {
        let Ok(addr) = e.address.parse::<SocketAddr>() else {
            tracing::warn!(address = %e.address, instance = %e.instance_id,
                "skipping endpoint with an address that is not ip:port");
            continue;
        };
        let dest = destinations.get(&e.namespace, &e.service)?;
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
                pool: pools.get(addr, tls::server_name_for(&e.identity)),
                breaker,
                breaker_gauge,
            }));
    }
    for list in endpoints.values_mut() {
        list.sort_by_key(|e| e.addr);
    }
    Ok(endpoints)
}

/// The HTTPRoutes of each service, in snapshot order.
fn routes(docs: &Documents) -> HashMap<Key, Vec<&Document>> {
    let mut routes: HashMap<Key, Vec<&Document>> = HashMap::new();
    for d in of_kind(docs, Kind::HttpRoute) {
        if let Spec::HttpRoute(r) = &d.spec {
            routes
                .entry((d.metadata.namespace.clone(), r.service.clone()))
                .or_default()
                .push(d);
        }
    }
    routes
}

/// What a Service document declares.
#[derive(Debug, Default)]
struct Declared {
    ports: Vec<ServicePort>,
    /// Virtual addresses transparent-mode clients may dial.
    addresses: Vec<IpAddr>,
}

fn declared_services(docs: &Documents) -> HashMap<Key, Declared> {
    of_kind(docs, Kind::Service)
        .filter_map(|d| match &d.spec {
            Spec::Service(s) => Some((
                (d.metadata.namespace.clone(), d.metadata.name.clone()),
                Declared {
                    ports: s.ports.clone(),
                    addresses: s.addresses.clone(),
                },
            )),
            _ => None,
        })
        .collect()
}

/// Every service: the declared ones, and those that only have endpoints;
/// in order, so that the tables are built the same way every time.
fn service_keys<T, U>(declared: &HashMap<Key, T>, endpoints: &HashMap<Key, U>) -> Vec<Key> {
    let mut keys: Vec<Key> = declared.keys().chain(endpoints.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The snapshot's trust domain (`cluster.local` when it names none).
fn trust_domain(snapshot: &Snapshot) -> &str {
    if snapshot.trust_domain.is_empty() {
        "cluster.local"
    } else {
        snapshot.trust_domain.as_str()
    }
}

/// The metrics of the requests to the service `key` that `route` governs.
fn metrics(key: &Key, route: &str, trust_domain: &str) -> Arc<RequestMetrics> {
    Arc::new(RequestMetrics::new(
        remora_telemetry::OUTBOUND,
        &fqdn(key),
        route,
        &identity(trust_domain, key),
    ))
}

/// The routing rules of the service `key`, in the order of its HTTPRoutes
/// and of their rules; a rule without a name is `<route>#<index>`.
fn rules(
    key: &Key,
    trust_domain: &str,
    routes: Option<&Vec<&Document>>,
    sets: &mut SetCache<'_>,
) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for d in routes.into_iter().flatten() {
        let Spec::HttpRoute(r) = &d.spec else {
            continue;
        };
        for (i, rule) in r.rules.iter().enumerate() {
            let name = rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{}#{i}", d.metadata.name));
            let metrics = metrics(key, &name, trust_domain);
            rules.push(Rule::compile(rule, name, &key.0, sets, metrics)?);
        }
    }
    Ok(rules)
}

/// The AuthorizationPolicies of this workload's own service.
fn own_authz(docs: &Documents, (own_ns, own_name): (&str, &str), registry: &Registry) -> Authz {
    Authz::compile(
        of_kind(docs, Kind::AuthorizationPolicy)
            .filter(|d| d.metadata.namespace == own_ns)
            .filter_map(|d| match &d.spec {
                Spec::AuthorizationPolicy(p) if p.service == own_name => Some(p),
                _ => None,
            }),
        |rl| registry.rate_limiter(rl),
    )
}

/// The RequestAuthentications of this workload's own service, with the JWK
/// sets the control plane fetched.
fn own_authn(
    docs: &Documents,
    (own_ns, own_name): (&str, &str),
    jwks: &HashMap<String, String>,
) -> Result<Authn, String> {
    Authn::compile(
        of_kind(docs, Kind::RequestAuthentication)
            .filter(|d| d.metadata.namespace == own_ns)
            .filter_map(|d| match &d.spec {
                Spec::RequestAuthentication(a) if a.service == own_name => Some(a),
                _ => None,
            }),
        jwks,
        &format!("{own_name}.{own_ns}"),
    )
}

/// The TelemetryPolicy of this workload's namespace, if any (the first).
fn own_telemetry(docs: &Documents, own_ns: &str) -> Option<policy::TelemetryPolicySpec> {
    of_kind(docs, Kind::TelemetryPolicy)
        .filter(|d| d.metadata.namespace == own_ns)
        .find_map(|d| match &d.spec {
            Spec::TelemetryPolicy(t) => Some(t.clone()),
            _ => None,
        })
}

/// Adds `svc` to the tables: by its host names (`name.ns`, `name.ns.svc`,
/// `name.ns.svc.cluster.local`, and `name` alone in this workload's own
/// namespace), by its virtual addresses on each of its ports and by its
/// endpoints' addresses, and as the local service when it is this
/// workload's own.
fn index(
    mesh: &mut Mesh,
    key: Key,
    svc: Arc<Service>,
    addresses: &[IpAddr],
    endpoints: &[Arc<Endpoint>],
    (own_ns, own_name): (&str, &str),
) {
    let (ns, name) = (&key.0, &key.1);
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
    for ip in addresses {
        for p in &svc.ports {
            mesh.addrs.insert(SocketAddr::new(*ip, p.port), svc.clone());
        }
    }
    for e in endpoints {
        mesh.addrs.insert(e.addr, svc.clone());
    }
    if ns == own_ns && name == own_name {
        mesh.local = Some(svc.clone());
    }
    mesh.services.insert(key, svc);
}

#[cfg(test)]
mod tests;
