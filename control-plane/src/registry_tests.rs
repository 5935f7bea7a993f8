//! Unit tests of [`super`] (the registry).

use super::*;

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
fn a_rotation_is_done_when_every_proxy_acked_a_later_snapshot_on_the_new_signer() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    assert!(!registry.all_on_signer("new", 0), "no proxies: not done");
    let (a, _ra) = registry.register(reg("a", "10.0.0.1:1"), 1);
    let (b, _rb) = registry.register(reg("b", "10.0.0.2:1"), 1);
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
    assert!(
        !registry.all_on_signer("new", marker),
        "b acked an older snapshot"
    );
    // A version this registry never published does not count.
    registry.record_ack(b, &ack("0.999", "new"));
    assert!(!registry.all_on_signer("new", marker));
    registry.record_ack(b, &ack(&version, "old"));
    assert!(
        !registry.all_on_signer("new", marker),
        "b runs an old certificate"
    );
    registry.record_ack(b, &ack(&version, "new"));
    assert!(registry.all_on_signer("new", marker));
    let status = registry.status();
    assert_eq!(status[0].cert_signer_id, "new");
    assert_eq!(status[0].cert_not_after_unix, 42);
    registry.remove(b);
    assert!(registry.all_on_signer("new", marker));
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
