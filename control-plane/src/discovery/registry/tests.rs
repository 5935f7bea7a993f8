//! Unit tests of [`super`] (the registry).

use super::*;
use crate::discovery::lease::{GenerationLease, LEASE_BLOCK};
use crate::identity::db::IdentityDb;
use crate::metrics::registry::*;

fn reg(instance: &str, address: &str) -> Register {
    Register {
        service: "backend".into(),
        namespace: "shop".into(),
        instance_id: instance.into(),
        address: address.into(),
        ..Register::default()
    }
}

#[test]
fn registration_publishes_an_endpoint_with_its_identity() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    let first = registry.current_snapshot();
    assert_eq!(first.version, "0.1");
    let (id, _replaced) = registry.register(reg("i1", "10.0.0.1:8080"), 1);
    let snap = registry.current_snapshot();
    assert_eq!(snap.version, "0.2");
    assert_eq!(snap.endpoints.len(), 1);
    assert_eq!(
        snap.endpoints[0].identity,
        "spiffe://cluster.local/ns/shop/sa/backend"
    );
    registry.deregister_endpoint(id);
    assert!(registry.current_snapshot().endpoints.is_empty());
    assert_eq!(registry.proxies_connected(), 1);
    registry.remove(id);
    assert_eq!(registry.proxies_connected(), 0);
}

#[test]
fn a_second_registration_of_an_instance_replaces_the_first() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    let (old, mut old_replaced) = registry.register(reg("i1", "10.0.0.1:1"), 1);
    let (new, _r) = registry.register(reg("i1", "10.0.0.2:1"), 2);
    assert!(old_replaced
        .try_recv()
        .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
    // The old stream ending must not remove the new registration.
    registry.remove(old);
    let snap = registry.current_snapshot();
    assert_eq!(snap.endpoints.len(), 1);
    assert_eq!(snap.endpoints[0].address, "10.0.0.2:1");
    registry.record_ack(
        new,
        &Ack {
            version: "0.3".into(),
            ok: false,
            error: "bad".into(),
            ..Ack::default()
        },
    );
    let status = registry.status();
    assert_eq!(status[0].last_nack_error, "bad");
    assert_eq!(registry.metrics.value(NACKS_TOTAL, ""), Some(1.0));
}

#[test]
fn older_policy_versions_are_not_published() {
    let registry = Registry::new("cluster.local", 5, &State::new());
    registry.set_policy(4, &State::new());
    assert_eq!(registry.current_snapshot().policy_version, 5);
    registry.set_policy(6, &State::new());
    assert_eq!(registry.current_snapshot().version, "6.2");
}

fn ack(version: &str, signer: &str) -> Ack {
    Ack {
        version: version.into(),
        ok: true,
        cert_signer_id: signer.into(),
        cert_not_after_unix: 42,
        ..Ack::default()
    }
}

#[test]
fn a_proxy_is_behind_until_it_acked_a_later_snapshot_on_the_new_signer() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    let behind = |registry: &Registry, marker| {
        let mut ids: Vec<String> = registry
            .behind("new", marker)
            .into_iter()
            .map(|b| b.instance_id)
            .collect();
        ids.sort();
        ids
    };
    assert!(behind(&registry, 0).is_empty(), "no proxies: nobody behind");
    let (a, _ra, _) = registry.register_with(reg("a", "10.0.0.1:1"), 1, "aa");
    let (b, _rb, _) = registry.register_with(reg("b", "10.0.0.2:1"), 1, "bb");
    let marker = registry.set_trust(Trust {
        bundle_pem: "roots".into(),
        signer_id: "new".into(),
    });
    let snapshot = registry.current_snapshot();
    assert_eq!(
        (
            snapshot.signer_id.as_str(),
            snapshot.trust_bundle_pem.as_str()
        ),
        ("new", "roots")
    );
    let version = snapshot.version.clone();
    registry.record_ack(a, &ack(&version, "new"));
    registry.record_ack(b, &ack("0.1", "new"));
    assert_eq!(
        behind(&registry, marker),
        ["b"],
        "b acked an older snapshot"
    );
    // A version this registry never published does not count.
    registry.record_ack(b, &ack("0.999", "new"));
    assert_eq!(behind(&registry, marker), ["b"]);
    registry.record_ack(b, &ack(&version, "old"));
    let late = registry.behind("new", marker);
    assert_eq!(
        (late[0].tls_serial.as_str(), late[0].cert_signer_id.as_str()),
        ("bb", "old"),
        "b runs an old certificate"
    );
    registry.record_ack(b, &ack(&version, "new"));
    assert!(behind(&registry, marker).is_empty());
    let status = registry.status();
    assert_eq!(status[0].cert_signer_id, "new");
    assert_eq!(status[0].cert_not_after_unix, 42);
    // Only a proxy that deregistered first leaves with its certificate.
    assert_eq!(registry.remove(b), None);
    registry.deregister_endpoint(a);
    assert_eq!(registry.remove(a).as_deref(), Some("aa"));
}

#[test]
fn an_instance_that_comes_back_with_another_certificate_is_told() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    let (a, _ra, previous) = registry.register_with(reg("a", "10.0.0.1:1"), 1, "s1");
    assert_eq!(previous, None);
    registry.remove(a);
    let (_, _ra, previous) = registry.register_with(reg("a", "10.0.0.1:1"), 2, "s1");
    assert_eq!(previous, None, "the same certificate");
    let (_, _ra, previous) = registry.register_with(reg("a", "10.0.0.1:1"), 3, "s2");
    assert_eq!(previous.as_deref(), Some("s1"));
}

#[test]
fn snapshot_versions_stay_unique_across_restarts_with_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let db = IdentityDb::open(dir.path()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _restart in 0..3 {
        let lease = GenerationLease::open(db.clone()).unwrap();
        let registry = Registry::with_lease(
            "cluster.local",
            1,
            &State::new(),
            Trust::default(),
            Some(lease),
        );
        for i in 0..5 {
            registry.register(reg(&format!("i{i}"), "10.0.0.1:1"), 1);
            assert!(
                seen.insert(registry.current_snapshot().version.clone()),
                "version {} again",
                registry.current_snapshot().version
            );
        }
    }
    // Past a block, the lease is extended.
    let lease = GenerationLease::open(db.clone()).unwrap();
    let start = lease.start;
    let registry = Registry::with_lease(
        "cluster.local",
        1,
        &State::new(),
        Trust::default(),
        Some(lease),
    );
    for i in 0..(LEASE_BLOCK + 5) {
        registry.set_serving(0, i % 2 == 0);
        registry.set_trust(Trust::default());
    }
    drop(registry);
    let again = GenerationLease::open(db).unwrap();
    assert!(
        again.start > start + LEASE_BLOCK,
        "{} {}",
        again.start,
        start
    );
}

#[test]
fn metrics_follow_proxies_pushes_and_acks() {
    let registry = Registry::new("cluster.local", 3, &State::new());
    let value = |name: &str| registry.metrics.value(name, "");
    assert_eq!(value(CONFIG_VERSION), Some(3.0));
    assert_eq!(value(PROXIES_CONNECTED), Some(0.0));
    let (id, _r) = registry.register(reg("i1", "10.0.0.1:1"), 1);
    assert_eq!(value(PROXIES_CONNECTED), Some(1.0));
    let version = registry.current_snapshot().version.clone();
    assert_eq!(value(SNAPSHOT_GENERATION), Some(2.0));
    registry.record_sent(id, &version);
    // An ACK of another version does not end the push.
    registry.record_ack(id, &ack("3.1", ""));
    let count = format!("{PUSH_LATENCY_SECONDS}_count");
    assert_eq!(value(&count), Some(0.0));
    registry.record_ack(id, &ack(&version, ""));
    assert_eq!(value(PUSHES_TOTAL), Some(1.0));
    assert_eq!(value(&count), Some(1.0));
    assert_eq!(value(NACKS_TOTAL), Some(0.0));
    // A repeated ACK is not measured twice.
    registry.record_ack(id, &ack(&version, ""));
    assert_eq!(value(&count), Some(1.0));
    registry.remove(id);
    assert_eq!(value(PROXIES_CONNECTED), Some(0.0));
}
