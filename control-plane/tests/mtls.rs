//! TLS on the gRPC port and who may open a Discovery stream: only a client
//! certificate from the trust bundle whose SPIFFE ID is the Register's.

mod common;

use common::*;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::{DiscoveryRequest, Register};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;

fn register(service: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            service: service.into(),
            namespace: "shop".into(),
            instance_id: format!("{service}-1"),
            address: "127.0.0.1:9001".into(),
            ..Register::default()
        })),
    }
}

/// Opens a stream, registers as `service`, and returns the first answer.
async fn first_answer(
    mut client: DiscoveryClient<Channel>,
    service: &str,
) -> Result<remora_proto::v1::Snapshot, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(register(service)).await.unwrap();
    let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer within 5s")?;
    drop(tx);
    Ok(answer.expect("a snapshot"))
}

#[tokio::test]
async fn a_discovery_stream_needs_a_certificate_for_the_registered_service() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;

    let anonymous = DiscoveryClient::new(channel(&running).await);
    let err = first_answer(anonymous, "backend").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("needs a client certificate"),
        "{}",
        err.message()
    );

    let frontend = discovery_as(&running, "shop", "frontend").await;
    let err = first_answer(frontend, "backend").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        format!(
            "the client certificate is for {}, but the Register claims {}",
            spiffe("shop", "frontend"),
            spiffe("shop", "backend")
        )
    );
    assert_eq!(running.registry.proxies_connected(), 0);
    assert!(running.registry.current_snapshot().endpoints.is_empty());

    let backend = discovery_as(&running, "shop", "backend").await;
    let snapshot = first_answer(backend, "backend").await.unwrap();
    assert_eq!(snapshot.endpoints.len(), 1);
    assert_eq!(snapshot.endpoints[0].identity, spiffe("shop", "backend"));
    running.shutdown().await.unwrap();
}

/// Whether a health check over `channel` (if it connected) succeeds.
async fn works(channel: Result<Channel, tonic::transport::Error>) -> bool {
    let Ok(channel) = channel else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

#[tokio::test]
async fn foreign_certificates_plaintext_and_wrong_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;

    // A workload certificate from another CA fails the TLS handshake.
    let now = remora_control::tokens::now_unix();
    let foreign = remora_control::ca::generate_root("cluster.local", now).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = foreign
        .sign_workload(
            &key,
            &spiffe("shop", "backend"),
            Duration::from_secs(600),
            now,
        )
        .unwrap();
    let forged = Workload {
        chain_pem: issued.chain_pem,
        key_pem: key.serialize_pem(),
        response: Default::default(),
    };
    assert!(!works(try_channel(&running, Some(&forged)).await).await);
    // Its own certificate works.
    let real = certify(&running, "shop", "backend").await;
    assert!(works(try_channel(&running, Some(&real)).await).await);

    // Plaintext HTTP/2 gets nowhere.
    let plain = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    assert!(!works(plain).await);

    // The server's certificate names remora-control, localhost, 127.0.0.1.
    let named = |name: &str| {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(running.trust_bundle_pem()))
            .domain_name(name);
        let url = url(&running);
        async move {
            Channel::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
        }
    };
    assert!(works(named("localhost").await).await);
    assert!(works(named("127.0.0.1").await).await);
    assert!(!works(named("evil.example").await).await);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn extra_server_names_are_in_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.server_names = vec!["cp.mesh.internal".into(), "10.1.2.3".into()];
    let running = remora_control::server::start(config).await.unwrap();
    let leaf = running.tls.leaf().unwrap();
    let cert = remora_control::ca::parse_cert(&leaf).unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "DNSName(remora-control)",
            "DNSName(localhost)",
            "IPAddress(7f:00:00:01)",
            "DNSName(cp.mesh.internal)",
            "IPAddress(0a:01:02:03)"
        ]
    );
    running.shutdown().await.unwrap();
}
