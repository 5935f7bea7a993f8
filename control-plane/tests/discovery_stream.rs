//! The Discovery stream over a real gRPC server: registration, snapshots
//! (complete, then deltas), ACK/NACK, deregistration, removal when a stream
//! closes, pushes on apply.

mod common;

use common::*;
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::{
    Ack, ApplyRequest, Deregister, DiscoveryRequest, Register, Snapshot, StatusRequest,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

struct Proxy {
    tx: mpsc::Sender<DiscoveryRequest>,
    snapshots: Streaming<Snapshot>,
    /// The last snapshot received, complete (deltas are merged into it).
    base: Option<Snapshot>,
    /// What the last message was on the wire.
    last_wire: Option<Snapshot>,
}

impl Proxy {
    async fn connect(
        running: &remora_control::server::Running,
        instance: &str,
        address: &str,
    ) -> Proxy {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Register(Register {
                service: "backend".into(),
                namespace: "shop".into(),
                instance_id: instance.into(),
                labels: HashMap::from([("version".to_string(), "v1".to_string())]),
                address: address.into(),
                proxy_version: "test".into(),
                running_version: String::new(),
            })),
        })
        .await
        .unwrap();
        let snapshots = discovery(running)
            .await
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Proxy {
            tx,
            snapshots,
            base: None,
            last_wire: None,
        }
    }

    /// The next snapshot, complete: a delta is merged into the last one.
    async fn next(&mut self) -> Snapshot {
        let wire = tokio::time::timeout(Duration::from_secs(5), self.snapshots.message())
            .await
            .expect("a snapshot within 5s")
            .unwrap()
            .expect("the stream is open");
        self.last_wire = Some(wire.clone());
        let complete = match self.base.take() {
            Some(mut base) if remora_proto::delta::is_delta(&wire) => {
                remora_proto::delta::apply(&mut base, wire).expect("a delta on the last snapshot");
                base
            }
            _ => {
                assert!(
                    !remora_proto::delta::is_delta(&wire),
                    "the first snapshot is complete"
                );
                wire
            }
        };
        self.base = Some(complete.clone());
        complete
    }

    /// Waits (at most `within`) for a snapshot that satisfies `f`.
    async fn until(&mut self, within: Duration, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
        tokio::time::timeout(within, async {
            loop {
                let s = self.next().await;
                if f(&s) {
                    return s;
                }
            }
        })
        .await
        .expect("the expected snapshot in time")
    }

    async fn send(&self, kind: Kind) {
        self.tx
            .send(DiscoveryRequest { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn has_endpoint(s: &Snapshot, instance: &str) -> bool {
    s.endpoints.iter().any(|e| e.instance_id == instance)
}

#[tokio::test]
async fn a_registered_proxy_gets_its_endpoint_and_acks_show_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;

    let mut a = Proxy::connect(&running, "a-1", "127.0.0.1:9001").await;
    let first = a.next().await;
    assert_eq!(first.trust_domain, "cluster.local");
    let endpoint = first
        .endpoints
        .iter()
        .find(|e| e.instance_id == "a-1")
        .expect("its own endpoint");
    assert_eq!(endpoint.address, "127.0.0.1:9001");
    assert_eq!(
        endpoint.identity,
        "spiffe://cluster.local/ns/shop/sa/backend"
    );
    assert_eq!(endpoint.labels["version"], "v1");

    a.send(Kind::Ack(Ack {
        version: first.version.clone(),
        ok: true,
        error: String::new(),
        ..Ack::default()
    }))
    .await;
    // An apply pushes a new snapshot with the new policy version.
    admin
        .apply(ApplyRequest {
            files: vec![file("svc.yaml", SERVICE)],
            dry_run: false,
        })
        .await
        .unwrap();
    let pushed = a
        .until(Duration::from_secs(2), |s| s.policy_version == 1)
        .await;
    assert_eq!(pushed.resources.len(), 1);
    // On the wire: only the new document, on the last snapshot sent.
    let wire = a.last_wire.clone().unwrap();
    assert_eq!(wire.base_version, first.version);
    assert_eq!(wire.resources.len(), 1);
    assert!(wire.endpoints.is_empty() && !wire.trust_changed);
    a.send(Kind::Ack(Ack {
        version: pushed.version.clone(),
        ok: false,
        error: "cannot use it".into(),
        ..Ack::default()
    }))
    .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let status = admin
            .status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.proxies.len(), 1);
        let p = &status.proxies[0];
        assert_eq!(
            (p.service.as_str(), p.instance_id.as_str()),
            ("backend", "a-1")
        );
        if p.last_nack_version == pushed.version {
            assert_eq!(p.acked_version, first.version);
            assert_eq!(p.last_nack_error, "cannot use it");
            assert_eq!(p.sent_version, pushed.version);
            assert!(p.endpoint_registered);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NACK not recorded: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_closed_stream_loses_its_endpoint_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::connect(&running, "a-1", "127.0.0.1:9001").await;
    a.next().await;
    let mut b = Proxy::connect(&running, "b-1", "127.0.0.1:9002").await;
    b.until(Duration::from_secs(1), |s| {
        has_endpoint(s, "a-1") && has_endpoint(s, "b-1")
    })
    .await;

    drop(a);
    let s = b
        .until(Duration::from_secs(1), |s| !has_endpoint(s, "a-1"))
        .await;
    assert!(has_endpoint(&s, "b-1"));
    assert_eq!(running.registry.proxies_connected(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn deregister_removes_the_endpoint_but_keeps_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::connect(&running, "a-1", "127.0.0.1:9001").await;
    a.next().await;
    a.send(Kind::Deregister(Deregister {})).await;
    let s = a
        .until(Duration::from_secs(1), |s| !has_endpoint(s, "a-1"))
        .await;
    assert!(s.endpoints.is_empty());
    assert_eq!(running.registry.proxies_connected(), 1);
    // It still receives config.
    running.registry.set_policy(9, &Default::default());
    a.until(Duration::from_secs(1), |s| s.policy_version == 9)
        .await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_new_registration_of_an_instance_replaces_the_old_stream() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut old = Proxy::connect(&running, "a-1", "127.0.0.1:9001").await;
    old.next().await;
    let mut new = Proxy::connect(&running, "a-1", "127.0.0.1:9009").await;
    let s = new.next().await;
    assert_eq!(s.endpoints.len(), 1);
    assert_eq!(s.endpoints[0].address, "127.0.0.1:9009");
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match old.snapshots.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ended, Code::Aborted);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_first_message_must_be_a_register() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Ack(Ack::default())),
    })
    .await
    .unwrap();
    let mut responses = discovery(&running)
        .await
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = responses.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must be a Register"),
        "{}",
        err.message()
    );
    assert_eq!(running.registry.proxies_connected(), 0);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_register_may_follow_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let (tx, rx) = mpsc::channel(1);
    let mut responses = discovery_as(&running, "shop", "late")
        .await
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            service: "late".into(),
            namespace: "shop".into(),
            instance_id: "late-1".into(),
            address: "127.0.0.1:9003".into(),
            ..Register::default()
        })),
    })
    .await
    .unwrap();
    let s = responses.message().await.unwrap().unwrap();
    assert!(has_endpoint(&s, "late-1"));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_register_without_an_instance_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            service: "backend".into(),
            namespace: "shop".into(),
            ..Register::default()
        })),
    })
    .await
    .unwrap();
    let mut responses = discovery(&running)
        .await
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = responses.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("instance_id"), "{}", err.message());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::connect(&running, "a-1", "").await;
    let s = a.next().await;
    assert!(s.endpoints.is_empty(), "no address, no endpoint");
    tokio::time::timeout(Duration::from_secs(3), running.shutdown())
        .await
        .expect("shutdown within the grace period")
        .unwrap();
}

#[tokio::test]
async fn an_endpoint_change_costs_each_proxy_the_change_not_the_mesh() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut proxies = Vec::new();
    for i in 0..50 {
        proxies.push(
            Proxy::connect(
                &running,
                &format!("m-{i}"),
                &format!("127.0.0.1:{}", 10000 + i),
            )
            .await,
        );
    }
    let mut a = Proxy::connect(&running, "a", "").await;
    let first = a
        .until(Duration::from_secs(5), |s| s.endpoints.len() == 50)
        .await;
    let complete_len = first.encoded_len();
    let _b = Proxy::connect(&running, "b", "127.0.0.1:9999").await;
    let s = a
        .until(Duration::from_secs(2), |s| s.endpoints.len() == 51)
        .await;
    let wire = a.last_wire.clone().unwrap();
    assert!(remora_proto::delta::is_delta(&wire));
    assert_eq!(wire.endpoints.len(), 1);
    assert_eq!(wire.endpoints[0].instance_id, "b");
    let delta_len = wire.encoded_len();
    assert!(
        delta_len < 300 && delta_len * 20 < complete_len,
        "a delta of {delta_len} bytes beside a complete snapshot of {complete_len}"
    );
    assert_ne!(s.version, first.version);
    // And a departure is a removal.
    drop(proxies.pop());
    let s = a
        .until(Duration::from_secs(2), |s| s.endpoints.len() == 50)
        .await;
    let wire = a.last_wire.clone().unwrap();
    assert_eq!(wire.removed_endpoints.len(), 1);
    assert_eq!(wire.removed_endpoints[0].instance_id, "m-49");
    assert!(!s.endpoints.iter().any(|e| e.instance_id == "m-49"));
    running.shutdown().await.unwrap();
}
