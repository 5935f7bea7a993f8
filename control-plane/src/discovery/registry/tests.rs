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

// ------------------------------------------------ incremental pushes

use crate::discovery::history::Outgoing;
use prost::Message;
use remora_proto::v1::{Endpoint, EndpointKey, Snapshot};

fn decoded(out: &Outgoing) -> Snapshot {
    Snapshot::decode(out.encoded().0).unwrap()
}

#[test]
fn a_stream_gets_a_complete_snapshot_then_deltas_in_proportion_to_the_change() {
    let registry = Registry::new("cluster.local", 1, &State::new());
    for i in 0..1000 {
        registry.register(
            reg(
                &format!("i{i}"),
                &format!("10.0.{}.{}:8080", i / 250, i % 250),
            ),
            1,
        );
    }
    let (id, _r) = registry.register(reg("me", ""), 1);
    let first = registry.next_message(id, None).unwrap();
    assert!(!first.is_delta());
    let complete = decoded(&first);
    assert_eq!(complete.endpoints.len(), 1000);
    assert!(complete.base_version.is_empty());
    let me = registry
        .status()
        .into_iter()
        .find(|p| p.instance_id == "me");
    assert_eq!(me.unwrap().sent_version, first.version());
    assert!(registry
        .next_message(id, Some(first.generation()))
        .is_none());

    registry.register(reg("new", "10.9.9.9:8080"), 1);
    let next = registry.next_message(id, Some(first.generation())).unwrap();
    assert!(next.is_delta());
    let bytes = next.encoded().0.len();
    assert!(bytes < 300, "one endpoint's delta is {bytes} bytes");
    let delta = decoded(&next);
    assert_eq!(delta.base_version, complete.version);
    assert_eq!(delta.endpoints.len(), 1);
    assert!(delta.resources.is_empty() && !delta.trust_changed && !delta.jwks_changed);
    let mut applied = complete.clone();
    remora_proto::delta::apply(&mut applied, delta).unwrap();
    assert_eq!(applied, registry.current_snapshot().snapshot());

    // A NACK changes nothing: the next delta is on the last one sent.
    registry.record_ack(
        id,
        &Ack {
            version: next.version().into(),
            ok: false,
            ..Ack::default()
        },
    );
    let (gone, _) = registry.register(reg("gone", "10.9.9.8:8080"), 1);
    registry.remove(gone);
    let third = registry.next_message(id, Some(next.generation())).unwrap();
    let composed = decoded(&third);
    assert_eq!(composed.base_version, next.version());
    remora_proto::delta::apply(&mut applied, composed).unwrap();
    assert_eq!(applied, registry.current_snapshot().snapshot());
    assert!(!applied.endpoints.iter().any(|e| e.instance_id == "gone"));
}

#[test]
fn policy_trust_and_jwks_changes_are_deltas_too() {
    let registry = Registry::new("cluster.local", 1, &State::new());
    let (id, _r) = registry.register(reg("me", "10.0.0.1:1"), 1);
    let first = registry.next_message(id, None).unwrap();
    let mut proxy = decoded(&first);
    let mut state = State::new();
    let doc: serde_json::Value = serde_json::json!({"spec": {"ports": [{"port": 80}]}});
    state.insert(
        remora_proto::policy::ResourceKey {
            kind: remora_proto::policy::Kind::Service,
            namespace: "shop".into(),
            name: "backend".into(),
        },
        doc,
    );
    registry.set_policy(2, &state);
    registry.set_trust(Trust {
        bundle_pem: "roots".into(),
        signer_id: "s2".into(),
    });
    registry.set_jwks(HashMap::from([(
        "https://idp".to_string(),
        "{}".to_string(),
    )]));
    let out = registry.next_message(id, Some(first.generation())).unwrap();
    let delta = decoded(&out);
    assert_eq!(delta.resources.len(), 1);
    assert!(delta.endpoints.is_empty());
    assert!(delta.trust_changed && delta.jwks_changed);
    assert_eq!(delta.signer_id, "s2");
    assert_eq!(out.version(), format!("2.{}", first.generation() + 3));
    remora_proto::delta::apply(&mut proxy, delta).unwrap();
    assert_eq!(proxy, registry.current_snapshot().snapshot());
    // The policy's document removed: a removal.
    registry.set_policy(3, &State::new());
    let out2 = registry.next_message(id, Some(out.generation())).unwrap();
    let delta = decoded(&out2);
    assert_eq!(delta.removed_resources.len(), 1);
    assert!(!delta.trust_changed && delta.signer_id.is_empty());
    remora_proto::delta::apply(&mut proxy, delta).unwrap();
    assert_eq!(proxy, registry.current_snapshot().snapshot());
}

#[test]
fn a_stream_too_far_behind_gets_a_complete_snapshot() {
    use crate::discovery::history::MAX_DELTAS;
    let registry = Registry::new("cluster.local", 1, &State::new());
    let (id, _r) = registry.register(reg("me", ""), 1);
    let first = registry.next_message(id, None).unwrap();
    for i in 0..(MAX_DELTAS + 1) {
        registry.set_serving(id, i % 2 == 0);
        registry.set_trust(Trust {
            bundle_pem: format!("b{i}"),
            signer_id: String::new(),
        });
    }
    let out = registry.next_message(id, Some(first.generation())).unwrap();
    assert!(!out.is_delta(), "past the log: complete");
    assert_eq!(registry.deltas_retained().0, MAX_DELTAS);
    // Far more deltas than the mesh is large: complete too.
    let g = out.generation();
    for i in 0..10 {
        registry.set_trust(Trust {
            bundle_pem: format!("a longer bundle than the snapshot itself {i}"),
            signer_id: String::new(),
        });
    }
    let out = registry.next_message(id, Some(g)).unwrap();
    assert!(!out.is_delta(), "larger than complete: complete");
}

// ------------------------------------------------ other replicas

fn remote(instance: &str, address: &str) -> Endpoint {
    Endpoint {
        service: "backend".into(),
        namespace: "shop".into(),
        instance_id: instance.into(),
        address: address.into(),
        identity: "spiffe://cluster.local/ns/shop/sa/backend".into(),
        ..Endpoint::default()
    }
}

fn addresses(registry: &Registry) -> Vec<(String, String)> {
    registry
        .current_snapshot()
        .endpoints
        .iter()
        .map(|e| (e.instance_id.clone(), e.address.clone()))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.into(), b.into())
}

#[test]
fn remote_endpoints_are_listed_and_replaced_per_replica() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    registry.set_remote_endpoints(
        "r2",
        vec![remote("a", "10.0.0.2:1"), remote("b", "10.0.0.3:1")],
    );
    registry.set_remote_endpoints("r3", vec![remote("c", "10.0.0.4:1")]);
    assert_eq!(addresses(&registry).len(), 3);
    let before = registry.current_snapshot().generation;
    registry.set_remote_endpoints("r2", vec![remote("b", "10.0.0.3:1")]);
    assert_eq!(
        addresses(&registry),
        [pair("b", "10.0.0.3:1"), pair("c", "10.0.0.4:1")]
    );
    assert_eq!(registry.current_snapshot().generation, before + 1);
    // The same report again publishes nothing.
    registry.set_remote_endpoints("r2", vec![remote("b", "10.0.0.3:1")]);
    assert_eq!(registry.current_snapshot().generation, before + 1);
    registry.upsert_remote_endpoint("r3", remote("d", "10.0.0.5:1"));
    registry.remove_remote_endpoint(
        "r3",
        &EndpointKey {
            namespace: "shop".into(),
            service: "backend".into(),
            instance_id: "c".into(),
        },
    );
    assert_eq!(
        addresses(&registry),
        [pair("b", "10.0.0.3:1"), pair("d", "10.0.0.5:1")]
    );
    // Remote endpoints are not local ones.
    assert!(registry.local_endpoints().is_empty());
    registry.set_remote_endpoints("r3", Vec::new());
    assert_eq!(addresses(&registry), [pair("b", "10.0.0.3:1")]);
}

#[test]
fn an_instance_moving_between_replicas_never_disappears() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    registry.set_replica_id("r1");
    // It was on r2; it connects here before r2 noticed it left.
    registry.set_remote_endpoints("r2", vec![remote("a", "10.0.0.2:1")]);
    let (id, _r) = registry.register(reg("a", "10.0.0.1:1"), 1);
    assert_eq!(
        addresses(&registry),
        [pair("a", "10.0.0.1:1")],
        "local wins"
    );
    let g = registry.current_snapshot().generation;
    registry.set_remote_endpoints("r2", Vec::new());
    assert_eq!(
        registry.current_snapshot().generation,
        g,
        "nothing listed changed"
    );
    // It moves back to r2: r2 reports it before its stream here ends, and
    // once that ends r2's report stands.
    registry.upsert_remote_endpoint("r2", remote("a", "10.0.0.2:1"));
    assert_eq!(addresses(&registry), [pair("a", "10.0.0.1:1")]);
    registry.remove(id);
    assert_eq!(addresses(&registry), [pair("a", "10.0.0.2:1")]);
    // Reports under this replica's own name are ignored.
    registry.set_remote_endpoints("r1", vec![remote("z", "10.0.0.9:1")]);
    assert_eq!(addresses(&registry).len(), 1);
}

#[test]
fn local_endpoints_are_followed_and_the_replica_named_in_status() {
    let registry = Registry::new("cluster.local", 0, &State::new());
    let mut changes = registry.subscribe_local_endpoints();
    let seen = |c: &mut watch::Receiver<u64>| {
        c.has_changed().unwrap() && {
            c.borrow_and_update();
            true
        }
    };
    let (id, _r) = registry.register(reg("a", "10.0.0.1:1"), 1);
    assert!(seen(&mut changes));
    let local = registry.local_endpoints();
    assert_eq!(local.len(), 1);
    assert_eq!(
        local[0].identity,
        "spiffe://cluster.local/ns/shop/sa/backend"
    );
    // No endpoint (no address): no change.
    let (other, _r2) = registry.register(reg("b", ""), 1);
    assert!(!seen(&mut changes));
    registry.set_serving(id, false);
    assert!(seen(&mut changes));
    assert!(registry.local_endpoints().is_empty());
    registry.set_serving(id, true);
    assert!(seen(&mut changes));
    registry.deregister_endpoint(id);
    assert!(seen(&mut changes));
    registry.remove(other);
    assert!(!seen(&mut changes));
    // Remote reports do not touch local endpoints.
    registry.set_remote_endpoints("r2", vec![remote("x", "10.0.0.2:1")]);
    assert!(!seen(&mut changes));

    assert_eq!(registry.status()[0].replica, "");
    registry.set_replica_id("cp-1");
    assert_eq!(registry.status()[0].replica, "cp-1");
}
