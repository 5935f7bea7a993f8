//! The discovery client against a scripted control plane (a real TLS gRPC
//! server in this process that the test drives stream by stream): deltas are
//! merged into the last snapshot received and installed, a NACKed snapshot
//! is still the next delta's base, and a delta on another base is NACKed,
//! the stream ended from the proxy's side and a new one opened, on which a
//! complete snapshot is installed.
#![allow(
    clippy::disallowed_methods,
    reason = "test code: SystemTime for certificate validity"
)]

use crate::control::control_plane::ControlPlane;
use crate::control::discovery::{run, Discovery, Registration};
use crate::control::replicas::Replicas;
use crate::data::observe::Telemetry;
use crate::data::state::{State, Workload};
use crate::mesh::testing::{endpoint, resource};
use crate::transport::limits::Limits;
use crate::transport::tls;
use crate::transport::tls::identity::{Identity, WorkloadCert};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use remora_proto::v1::discovery_server::{self, DiscoveryServer};
use remora_proto::v1::{discovery_request, Ack, DiscoveryRequest, Snapshot};
use remora_proto::SpiffeId;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<Snapshot, Status>>;

/// A control plane that hands each stream to the test.
struct Scripted {
    streams: mpsc::UnboundedSender<(Streaming<DiscoveryRequest>, Outbound)>,
}

#[tonic::async_trait]
impl discovery_server::Discovery for Scripted {
    type StreamStream = ReceiverStream<Result<Snapshot, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let _ = self.streams.send((request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A CA, the control plane's server certificate (`remora-control`) and the
/// workload's certificate, all from it.
struct Pki {
    ca_pem: String,
    server: (String, String),
    workload: Option<WorkloadCert>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "test root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let leaf = |san: SanType| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        (params.signed_by(&key, &issuer).unwrap().pem(), key)
    };
    let (server_pem, server_key) = leaf(SanType::DnsName("remora-control".try_into().unwrap()));
    let spiffe = "spiffe://cluster.local/ns/shop/sa/frontend";
    let (chain_pem, key) = leaf(SanType::URI(spiffe.try_into().unwrap()));
    let chain = tls::certs_from_pem(&chain_pem);
    let signing = tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .unwrap();
    let not_after = tls::not_after_unix(&chain[0]).unwrap();
    let workload = WorkloadCert::new(
        chain_pem,
        key.serialize_pem(),
        Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
        not_after,
        "test-signer".into(),
    );
    Pki {
        ca_pem,
        server: (server_pem, server_key.serialize_pem()),
        workload: Some(workload),
    }
}

/// Starts the scripted control plane; its address and its streams.
async fn control_plane(
    pki: &Pki,
) -> (
    String,
    mpsc::UnboundedReceiver<(Streaming<DiscoveryRequest>, Outbound)>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    let tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(&pki.server.0, &pki.server.1),
    );
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(DiscoveryServer::new(Scripted { streams: tx }));
    tokio::spawn(server.serve_with_incoming(TcpListenerStream::new(listener)));
    (addr, rx)
}

/// The next message the proxy sends, within 5 s.
async fn next(inbound: &mut Streaming<DiscoveryRequest>) -> discovery_request::Kind {
    tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("a message within 5 s")
        .expect("the stream is up")
        .and_then(|m| m.kind)
        .expect("a message, not the end of the stream")
}

/// The next Ack, skipping health reports.
async fn ack(inbound: &mut Streaming<DiscoveryRequest>) -> Ack {
    loop {
        match next(inbound).await {
            discovery_request::Kind::Ack(ack) => return ack,
            discovery_request::Kind::Health(_) => continue,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
}

fn complete(version: &str, pki: &Pki) -> Snapshot {
    Snapshot {
        version: version.into(),
        policy_version: 1,
        resources: vec![resource(
            "Service",
            "backend",
            serde_json::json!({"ports": [{"port": 8080, "protocol": "http"}]}),
        )],
        endpoints: vec![endpoint("backend", "10.0.0.1:8080", "v1")],
        trust_bundle_pem: pki.ca_pem.clone(),
        trust_domain: "cluster.local".into(),
        signer_id: "test-signer".into(),
        ..Default::default()
    }
}

fn delta(version: &str, base: &str) -> Snapshot {
    Snapshot {
        version: version.into(),
        base_version: base.into(),
        policy_version: 1,
        trust_domain: "cluster.local".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_merge_and_one_on_another_base_restarts_the_stream() {
    let mut pki = pki();
    let (addr, mut streams) = control_plane(&pki).await;
    let ca_file = std::env::temp_dir().join(format!("remora-ca-{:016x}.pem", fastrand::u64(..)));
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let identity = Identity::new(SpiffeId::new("cluster.local", "shop", "frontend").unwrap());
    identity
        .install(pki.workload.take().unwrap(), pki.ca_pem.clone())
        .unwrap();
    let workload = Workload {
        service: "frontend".into(),
        namespace: "shop".into(),
        app_port: None,
    };
    let state = State::new(
        workload,
        Limits::default(),
        identity.clone(),
        Telemetry::disabled(),
    );
    let discovery = Discovery {
        control_plane: ControlPlane {
            replicas: Arc::new(Replicas::new(vec![addr])),
            name: "remora-control".into(),
            ca_file: Some(ca_file.clone()),
            identity,
        },
        me: Registration {
            service: "frontend".into(),
            namespace: "shop".into(),
            instance_id: "frontend-1".into(),
            labels: Vec::new(),
            advertise: None,
        },
        data: state.clone(),
    };
    let (_leave, leave_rx) = watch::channel(false);
    tokio::spawn(run(discovery, leave_rx));
    let endpoints = |state: &State| -> Vec<String> {
        let mesh = state.mesh.load();
        mesh.snapshot
            .endpoints
            .iter()
            .map(|e| e.address.clone())
            .collect()
    };

    let (mut inbound, out) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        next(&mut inbound).await,
        discovery_request::Kind::Register(_)
    ));
    out.send(Ok(complete("1.1", &pki))).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.1", true), "{}", a.error);

    // A delta on it: merged and installed.
    let mut d = delta("1.2", "1.1");
    d.endpoints = vec![endpoint("backend", "10.0.0.2:8080", "v1")];
    out.send(Ok(d)).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.2", true), "{}", a.error);
    assert_eq!(state.mesh.load().version, "1.2");
    assert_eq!(endpoints(&state), ["10.0.0.1:8080", "10.0.0.2:8080"]);

    // A delta the proxy refuses (a document it cannot read) is NACKed, the
    // previous snapshot stays installed, and it is the next delta's base.
    let mut d = delta("1.3", "1.2");
    d.resources = vec![resource(
        "Service",
        "broken",
        serde_json::json!("not a spec"),
    )];
    out.send(Ok(d)).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.3", false));
    assert_eq!(state.mesh.load().version, "1.2");
    let mut d = delta("1.4", "1.3");
    d.removed_resources = vec![remora_proto::v1::ResourceKey {
        kind: "Service".into(),
        namespace: "shop".into(),
        name: "broken".into(),
    }];
    d.removed_endpoints = vec![remora_proto::v1::EndpointKey {
        namespace: "shop".into(),
        service: "backend".into(),
        instance_id: "backend-10.0.0.1:8080".into(),
    }];
    out.send(Ok(d)).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.4", true), "{}", a.error);
    assert_eq!(endpoints(&state), ["10.0.0.2:8080"]);

    // A delta on a snapshot this stream never sent: NACKed, and the proxy
    // ends the stream, keeping what it has.
    out.send(Ok(delta("1.6", "1.5"))).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.6", false));
    assert!(
        a.error.contains("based on 1.5") && a.error.contains("complete snapshot"),
        "{}",
        a.error
    );
    let end = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("the proxy ends the stream");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(out);
    assert_eq!(state.mesh.load().version, "1.4");

    // A new stream, on which a complete snapshot is installed.
    let (mut inbound, out) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
        .await
        .expect("the proxy reconnects")
        .unwrap();
    match next(&mut inbound).await {
        discovery_request::Kind::Register(r) => assert_eq!(r.running_version, "1.4"),
        other => panic!("expected a Register, got {other:?}"),
    }
    // No base on a new stream: a delta before a complete snapshot is refused.
    out.send(Ok(delta("1.7", "1.4"))).await.unwrap();
    let a = ack(&mut inbound).await;
    assert!(
        !a.ok && a.error.contains("no snapshot was received"),
        "{}",
        a.error
    );
    let (mut inbound, out) = tokio::time::timeout(Duration::from_secs(5), streams.recv())
        .await
        .expect("the proxy reconnects again")
        .unwrap();
    assert!(matches!(
        next(&mut inbound).await,
        discovery_request::Kind::Register(_)
    ));
    out.send(Ok(complete("1.8", &pki))).await.unwrap();
    let a = ack(&mut inbound).await;
    assert_eq!((a.version.as_str(), a.ok), ("1.8", true), "{}", a.error);
    assert_eq!(endpoints(&state), ["10.0.0.1:8080"]);
    let _ = std::fs::remove_file(ca_file);
}
