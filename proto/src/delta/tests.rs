use super::*;
use proptest::collection::{btree_map, hash_map};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::collections::{BTreeMap, HashMap};

fn resource(kind: &str, namespace: &str, name: &str, spec: &str) -> Resource {
    Resource {
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        spec_json: spec.into(),
    }
}

fn endpoint(namespace: &str, service: &str, id: &str, address: &str) -> Endpoint {
    Endpoint {
        service: service.into(),
        namespace: namespace.into(),
        instance_id: id.into(),
        address: address.into(),
        labels: HashMap::new(),
        identity: format!("spiffe://td/ns/{namespace}/sa/{service}"),
    }
}

fn complete(version: &str) -> Snapshot {
    Snapshot {
        version: version.into(),
        policy_version: 1,
        trust_domain: "td".into(),
        trust_bundle_pem: "roots".into(),
        signer_id: "s1".into(),
        ..Snapshot::default()
    }
}

#[test]
fn a_delta_carries_only_the_changes() {
    let mut old = complete("1.1");
    old.resources = vec![
        resource("Service", "default", "a", "{}"),
        resource("HTTPRoute", "default", "a", "{}"),
    ];
    old.endpoints = vec![
        endpoint("default", "a", "a-1", "10.0.0.1:80"),
        endpoint("default", "a", "a-2", "10.0.0.2:80"),
    ];
    let mut new = old.clone();
    new.version = "1.2".into();
    new.endpoints.remove(0);
    new.endpoints
        .push(endpoint("default", "a", "a-3", "10.0.0.3:80"));
    new.resources[1].spec_json = "{\"x\":1}".into();

    let delta = diff(&old, &new);
    assert_eq!(delta.base_version, "1.1");
    assert_eq!(delta.version, "1.2");
    assert_eq!(delta.resources, vec![new.resources[1].clone()]);
    assert!(delta.removed_resources.is_empty());
    assert_eq!(
        delta.endpoints,
        vec![endpoint("default", "a", "a-3", "10.0.0.3:80")]
    );
    assert_eq!(delta.removed_endpoints.len(), 1);
    assert_eq!(delta.removed_endpoints[0].instance_id, "a-1");
    assert!(!delta.trust_changed && !delta.jwks_changed);
    assert!(delta.trust_bundle_pem.is_empty() && delta.signer_id.is_empty());
    assert_eq!(delta.trust_domain, "td");

    let mut applied = old.clone();
    apply(&mut applied, delta).unwrap();
    assert_eq!(applied, new);
}

#[test]
fn trust_and_jwks_travel_only_when_changed() {
    let old = complete("1.1");
    let mut new = old.clone();
    new.version = "1.2".into();
    new.signer_id = "s2".into();
    let delta = diff(&old, &new);
    assert!(delta.trust_changed && !delta.jwks_changed);
    assert_eq!(delta.trust_bundle_pem, "roots");
    assert_eq!(delta.signer_id, "s2");

    let mut newer = new.clone();
    newer.version = "1.3".into();
    newer.jwks.insert("https://idp/jwks".into(), "{}".into());
    let delta = diff(&new, &newer);
    assert!(!delta.trust_changed && delta.jwks_changed);
    assert_eq!(delta.jwks, newer.jwks);

    // JWK sets all gone: the flag says so, with an empty map.
    let mut gone = newer.clone();
    gone.version = "1.4".into();
    gone.jwks.clear();
    let delta = diff(&newer, &gone);
    assert!(delta.jwks_changed && delta.jwks.is_empty());
    let mut applied = newer.clone();
    apply(&mut applied, delta).unwrap();
    assert_eq!(applied, gone);
}

#[test]
fn a_delta_on_another_base_or_a_complete_snapshot_is_refused() {
    let old = complete("1.1");
    let mut new = old.clone();
    new.version = "1.2".into();
    let delta = diff(&old, &new);

    let mut other = complete("1.0");
    let err = apply(&mut other, delta.clone()).unwrap_err();
    assert!(err.contains("1.1"), "{err}");
    assert_eq!(other, complete("1.0"), "unchanged after a refusal");

    let mut none = Snapshot::default();
    assert!(apply(&mut none, delta).unwrap_err().contains("none"));

    let mut base = old.clone();
    let err = apply(&mut base, new).unwrap_err();
    assert!(err.contains("complete"), "{err}");
    assert_eq!(base, old);
}

#[test]
fn apply_keeps_the_canonical_order() {
    // Kinds in Kind::ALL's order, unknown ones after; then namespace, name.
    let mut old = complete("1.1");
    old.resources = vec![
        resource("Service", "b", "x", "{}"),
        resource("HTTPRoute", "a", "x", "{}"),
    ];
    sort_canonical(&mut old);
    assert_eq!(old.resources[0].kind, "Service");
    let delta = Snapshot {
        version: "1.2".into(),
        base_version: "1.1".into(),
        trust_domain: "td".into(),
        resources: vec![
            resource("Zeta", "a", "x", "{}"),
            resource("Service", "a", "x", "{}"),
            resource("TelemetryPolicy", "a", "x", "{}"),
        ],
        endpoints: vec![
            endpoint("b", "s", "1", "x:1"),
            endpoint("a", "s", "2", "x:1"),
            endpoint("a", "s", "1", "x:1"),
        ],
        ..Snapshot::default()
    };
    apply(&mut old, delta).unwrap();
    let kinds: Vec<(&str, &str)> = old
        .resources
        .iter()
        .map(|r| (r.kind.as_str(), r.namespace.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("Service", "a"),
            ("Service", "b"),
            ("HTTPRoute", "a"),
            ("TelemetryPolicy", "a"),
            ("Zeta", "a"),
        ]
    );
    let ids: Vec<(&str, &str)> = old
        .endpoints
        .iter()
        .map(|e| (e.namespace.as_str(), e.instance_id.as_str()))
        .collect();
    assert_eq!(ids, vec![("a", "1"), ("a", "2"), ("b", "1")]);
}

#[test]
fn removing_what_is_not_there_is_harmless() {
    let mut base = complete("1.1");
    base.endpoints = vec![endpoint("a", "s", "1", "x:1")];
    let delta = Snapshot {
        version: "1.2".into(),
        base_version: "1.1".into(),
        trust_domain: "td".into(),
        removed_endpoints: vec![
            EndpointKey {
                namespace: "a".into(),
                service: "s".into(),
                instance_id: "0".into(),
            },
            EndpointKey {
                namespace: "z".into(),
                service: "s".into(),
                instance_id: "1".into(),
            },
        ],
        ..Snapshot::default()
    };
    apply(&mut base, delta).unwrap();
    assert_eq!(base.endpoints, vec![endpoint("a", "s", "1", "x:1")]);
    assert_eq!(base.version, "1.2");
}

// ------------------------------------------------------------ properties

const KINDS: [&str; 4] = ["Service", "HTTPRoute", "TelemetryPolicy", "Other"];

/// Resources by key from a small key space, so that old and new share some.
fn resources() -> impl Strategy<Value = Vec<Resource>> {
    btree_map((0..KINDS.len(), "[ab]", "[a-c]"), "[xy]{0,2}", 0..12).prop_map(
        |m: BTreeMap<(usize, String, String), String>| {
            m.into_iter()
                .map(|((k, ns, name), spec)| resource(KINDS[k], &ns, &name, &spec))
                .collect()
        },
    )
}

fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    btree_map(
        ("[ab]", "[a-c]", "[0-4]"),
        ("[pq]", hash_map("[lm]", "[uv]", 0..2)),
        0..16,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|((ns, svc, id), (address, labels))| {
                let mut e = endpoint(&ns, &svc, &id, &address);
                e.labels = labels;
                e
            })
            .collect()
    })
}

fn snapshot(version: &'static str) -> impl Strategy<Value = Snapshot> {
    (
        resources(),
        endpoints(),
        "[rs]",
        "[rs]",
        hash_map("[ij]", "[kl]", 0..2),
        0u64..3,
    )
        .prop_map(
            move |(resources, endpoints, bundle, signer, jwks, policy_version)| {
                let mut s = Snapshot {
                    version: version.into(),
                    policy_version,
                    resources,
                    endpoints,
                    trust_bundle_pem: bundle,
                    trust_domain: "td".into(),
                    signer_id: signer,
                    jwks,
                    ..Snapshot::default()
                };
                // Canonical, as the registry publishes.
                sort_canonical(&mut s);
                s
            },
        )
}

fn config() -> Config {
    Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn apply_of_diff_gives_the_new_snapshot(old in snapshot("1.1"), new in snapshot("2.2")) {
        let delta = diff(&old, &new);
        prop_assert!(is_delta(&delta));
        // Only changes: nothing unchanged is sent again.
        for r in &delta.resources {
            prop_assert!(!old.resources.contains(r));
        }
        for e in &delta.endpoints {
            prop_assert!(!old.endpoints.contains(e));
        }
        let mut applied = old.clone();
        apply(&mut applied, delta).unwrap();
        prop_assert_eq!(&applied, &new);
    }

    #[test]
    fn a_chain_of_deltas_gives_the_last_snapshot(
        a in snapshot("1.1"), b in snapshot("1.2"), c in snapshot("1.3"),
    ) {
        let mut applied = a.clone();
        apply(&mut applied, diff(&a, &b)).unwrap();
        apply(&mut applied, diff(&b, &c)).unwrap();
        prop_assert_eq!(&applied, &c);
        // Diffing a snapshot with itself changes nothing but the version.
        let same = diff(&c, &c);
        prop_assert!(same.resources.is_empty() && same.endpoints.is_empty());
        prop_assert!(same.removed_resources.is_empty() && same.removed_endpoints.is_empty());
        prop_assert!(!same.trust_changed && !same.jwks_changed);
    }

    #[test]
    fn apply_sorts_unsorted_input(old in snapshot("1.1"), new in snapshot("1.2")) {
        // A base in any order still takes a delta; the result is canonical.
        let mut shuffled = old.clone();
        shuffled.resources.reverse();
        shuffled.endpoints.reverse();
        let mut delta = diff(&old, &new);
        delta.endpoints.reverse();
        delta.removed_endpoints.reverse();
        apply(&mut shuffled, delta).unwrap();
        prop_assert_eq!(&shuffled, &new);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_composed_delta_has_the_effect_of_its_parts(
        a in snapshot("1.1"), b in snapshot("1.2"), c in snapshot("1.3"), d in snapshot("1.4"),
    ) {
        let (ab, bc, cd) = (diff(&a, &b), diff(&b, &c), diff(&c, &d));
        let composed = compose(&[&ab, &bc, &cd]).unwrap();
        prop_assert_eq!(&composed.base_version, "1.1");
        prop_assert_eq!(&composed.version, "1.4");
        let mut applied = a.clone();
        apply(&mut applied, composed).unwrap();
        prop_assert_eq!(&applied, &d);
        prop_assert_eq!(compose(&[&ab]).unwrap(), ab.clone());
    }
}

#[test]
fn deltas_that_do_not_chain_are_not_composed() {
    let a = complete("1.1");
    let mut b = a.clone();
    b.version = "1.2".into();
    let mut c = b.clone();
    c.version = "1.3".into();
    assert!(compose(&[]).is_err());
    assert!(compose(&[&diff(&a, &b), &diff(&a, &c)])
        .unwrap_err()
        .contains("1.1"));
    assert!(compose(&[&b]).unwrap_err().contains("complete"));
}

#[test]
fn an_endpoint_added_then_removed_is_removed() {
    let a = complete("1.1");
    let mut b = a.clone();
    b.version = "1.2".into();
    b.endpoints = vec![endpoint("a", "s", "1", "x:1")];
    let mut c = a.clone();
    c.version = "1.3".into();
    let composed = compose(&[&diff(&a, &b), &diff(&b, &c)]).unwrap();
    assert!(composed.endpoints.is_empty());
    assert_eq!(composed.removed_endpoints.len(), 1);
    let (upserts, removed) = diff_resources(&[resource("Service", "a", "x", "{}")], &[]);
    assert!(upserts.is_empty());
    assert_eq!(removed[0].name, "x");
}
