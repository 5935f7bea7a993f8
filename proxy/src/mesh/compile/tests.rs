//! The steps of `Mesh::compile`, one by one, and the tables they make.

use super::*;
use crate::mesh::testing::{endpoint, pools, resource};

fn key(ns: &str, name: &str) -> Key {
    (ns.into(), name.into())
}

fn service(name: &str, ports: serde_json::Value) -> v1::Resource {
    resource(
        "Service",
        name,
        serde_json::json!({ "ports": ports, "addresses": ["10.96.0.7"] }),
    )
}

fn shop() -> Snapshot {
    Snapshot {
        version: "7.1".into(),
        policy_version: 7,
        resources: vec![
            service(
                "backend",
                serde_json::json!([{"port": 8080, "protocol": "http"}]),
            ),
            service(
                "frontend",
                serde_json::json!([{"port": 80, "protocol": "http"}]),
            ),
            resource(
                "HTTPRoute",
                "backend",
                serde_json::json!({"service": "backend", "rules": [
                    {"name": "v2", "matches": [{"path": {"prefix": "/v2"}}],
                     "backends": [{"service": "backend", "subset": {"version": "v2"}}]},
                    {"backends": [{"service": "backend"}]},
                ]}),
            ),
            resource(
                "TelemetryPolicy",
                "default",
                serde_json::json!({"samplingRate": 0.5}),
            ),
            v1::Resource {
                namespace: "other".into(),
                ..resource(
                    "TelemetryPolicy",
                    "default",
                    serde_json::json!({"samplingRate": 1.0}),
                )
            },
        ],
        endpoints: vec![
            endpoint("backend", "10.0.0.2:8080", "v2"),
            endpoint("backend", "10.0.0.1:8080", "v1"),
            endpoint("backend", "not-an-address", "v1"),
            endpoint("payments", "10.0.0.9:9000", "v1"),
        ],
        ..Snapshot::default()
    }
}

fn compile(snapshot: Snapshot) -> Result<Mesh, String> {
    Mesh::compile(
        snapshot,
        ("shop", "frontend"),
        &pools(),
        &Registry::default(),
    )
}

#[test]
fn documents_of_an_unknown_kind_or_an_invalid_spec_fail_the_snapshot() {
    let mut s = shop();
    s.resources
        .push(resource("Gateway", "g", serde_json::json!({})));
    let err = compile(s).unwrap_err();
    assert_eq!(err, "Gateway/shop/g: unknown kind");

    let mut s = shop();
    s.resources
        .push(resource("Service", "bad", serde_json::json!({"ports": 7})));
    let err = compile(s).unwrap_err();
    assert!(err.starts_with("Service/shop/bad: "), "{err}");

    let docs = documents(&shop()).unwrap();
    assert_eq!(docs[&Kind::Service].len(), 2);
    assert_eq!(docs[&Kind::TelemetryPolicy].len(), 2);
    assert!(!docs.contains_key(&Kind::AuthorizationPolicy));
}

#[test]
fn endpoints_are_grouped_by_service_in_address_order_and_bad_addresses_skipped() {
    let s = shop();
    let registry = Registry::default();
    let docs = documents(&s).unwrap();
    let mut destinations = Destinations::new(&registry, &docs);
    let eps = endpoints(&s.endpoints, &mut destinations, &pools(), &registry).unwrap();
    let backend: Vec<String> = eps[&key("shop", "backend")]
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(backend, ["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert_eq!(eps[&key("shop", "payments")].len(), 1);
    // Each endpoint's pool speaks mTLS to the identity it must prove.
    assert!(eps[&key("shop", "backend")]
        .iter()
        .all(|e| e.pool.is_mesh()));
    // The default outlier detection gives every endpoint a breaker.
    assert!(eps[&key("shop", "backend")]
        .iter()
        .all(|e| e.breaker.is_some()));
}

#[test]
fn services_are_the_declared_ones_and_those_with_only_endpoints() {
    let declared: HashMap<Key, ()> = [(key("shop", "b"), ()), (key("shop", "a"), ())].into();
    let endpoints: HashMap<Key, ()> = [(key("shop", "a"), ()), (key("x", "c"), ())].into();
    assert_eq!(
        service_keys(&declared, &endpoints),
        [key("shop", "a"), key("shop", "b"), key("x", "c")]
    );
}

#[test]
fn the_trust_domain_defaults_to_cluster_local() {
    let mut s = Snapshot::default();
    assert_eq!(trust_domain(&s), "cluster.local");
    s.trust_domain = "corp.example".into();
    assert_eq!(trust_domain(&s), "corp.example");
    assert_eq!(
        identity("corp.example", &key("shop", "backend")),
        "spiffe://corp.example/ns/shop/sa/backend"
    );
}

#[test]
fn rules_keep_their_order_and_unnamed_ones_are_named_after_their_route() {
    let s = shop();
    let docs = documents(&s).unwrap();
    let routes = routes(&docs);
    let eps = HashMap::new();
    let mut sets = SetCache::new(&eps);
    let backend = key("shop", "backend");
    let compiled = rules(&backend, "cluster.local", routes.get(&backend), &mut sets).unwrap();
    let names: Vec<&str> = compiled.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["v2", "backend#1"]);
    assert!(
        rules(&key("shop", "frontend"), "cluster.local", None, &mut sets)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn own_policies_are_those_of_this_workloads_namespace_and_service() {
    let mut s = shop();
    s.resources.push(resource(
        "AuthorizationPolicy",
        "frontend",
        serde_json::json!({"service": "frontend", "mtls": "strict"}),
    ));
    s.resources.push(resource(
        "AuthorizationPolicy",
        "backend",
        serde_json::json!({"service": "backend"}),
    ));
    let docs = documents(&s).unwrap();
    let registry = Registry::default();
    let authz = own_authz(&docs, ("shop", "frontend"), &registry);
    assert!(authz.present && authz.strict);
    let authz = own_authz(&docs, ("other", "frontend"), &registry);
    assert!(!authz.present);
    let t = own_telemetry(&docs, "shop").unwrap();
    assert_eq!(t.sampling_rate, Some(0.5));
    assert!(own_telemetry(&docs, "nowhere").is_none());
    assert!(own_authn(&docs, ("shop", "frontend"), &HashMap::new())
        .unwrap()
        .is_empty());
}

#[test]
fn services_are_found_by_host_address_and_as_the_local_one() {
    let mesh = compile(shop()).unwrap();
    assert_eq!((mesh.version.as_str(), mesh.policy_version), ("7.1", 7));
    for host in [
        "backend.shop",
        "backend.shop.svc",
        "backend.shop.svc.cluster.local",
        "backend",
        "BACKEND.shop:8080",
    ] {
        let svc = mesh.by_host(host).unwrap_or_else(|| panic!("{host}"));
        assert_eq!(&*svc.fqdn, "backend.shop");
    }
    let svc = mesh.by_host("backend.shop").unwrap();
    assert_eq!(&*svc.identity, "spiffe://cluster.local/ns/shop/sa/backend");
    assert_eq!(svc.rules.len(), 2);
    assert_eq!(svc.all.pick().unwrap().endpoints.len(), 2);
    // Declared virtual addresses on the service's ports, and endpoints.
    for addr in ["10.96.0.7:8080", "10.0.0.1:8080", "10.0.0.2:8080"] {
        let svc = mesh.by_addr(&addr.parse().unwrap()).unwrap();
        assert_eq!(&*svc.fqdn, "backend.shop", "{addr}");
    }
    // A service with endpoints and no Service document.
    let payments = mesh.by_host("payments.shop").unwrap();
    assert!(payments.ports.is_empty());
    assert_eq!(mesh.local.as_ref().unwrap().name, "frontend");
    assert_eq!(mesh.local_protocol(80, false), Some(policy::Protocol::Http));
    assert_eq!(mesh.telemetry.as_ref().unwrap().sampling_rate, Some(0.5));
    assert_eq!(mesh.snapshot.version, "7.1");
}

#[test]
fn a_short_name_is_only_for_this_workloads_namespace() {
    let mut s = shop();
    s.endpoints.push(v1::Endpoint {
        namespace: "other".into(),
        ..endpoint("cart", "10.0.1.1:80", "v1")
    });
    let mesh = compile(s).unwrap();
    assert!(mesh.by_host("cart.other").is_some());
    assert!(mesh.by_host("cart").is_none());
}
