//! Root rotation: both roots trusted, the server certificate reissued, and the
//! old root retired only once every connected proxy acked a snapshot from the
//! rotation on and runs a certificate from the new root.

mod common;

use common::*;
use remora_control::ca::fingerprint;
use remora_control::server::Running;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::{Ack, DiscoveryRequest, Register, RotateCaRequest, Snapshot, StatusRequest};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// A simulated proxy: a workload certificate and a Discovery stream.
struct Proxy {
    service: String,
    tx: mpsc::Sender<DiscoveryRequest>,
    snapshots: Streaming<Snapshot>,
    cert: Workload,
}

impl Proxy {
    async fn connect(running: &Running, service: &str) -> Proxy {
        let cert = certify(running, "shop", service).await;
        let channel = try_channel(running, Some(&cert)).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Register(Register {
                service: service.into(),
                namespace: "shop".into(),
                instance_id: format!("{service}-1"),
                address: "127.0.0.1:9001".into(),
                ..Register::default()
            })),
        })
        .await
        .unwrap();
        let snapshots = DiscoveryClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Proxy {
            service: service.into(),
            tx,
            snapshots,
            cert,
        }
    }

    /// The next snapshot that satisfies `f`.
    async fn until(&mut self, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let s = self.snapshots.message().await.unwrap().unwrap();
                if f(&s) {
                    return s;
                }
            }
        })
        .await
        .expect("the expected snapshot in time")
    }

    /// ACKs `version`, reporting the proxy's current certificate.
    async fn ack(&self, version: &str) {
        self.tx
            .send(DiscoveryRequest {
                kind: Some(Kind::Ack(Ack {
                    version: version.into(),
                    ok: true,
                    error: String::new(),
                    cert_signer_id: self.cert.response.signer_id.clone(),
                    cert_not_after_unix: self.cert.response.not_after_unix,
                })),
            })
            .await
            .unwrap();
    }

    /// Renews its certificate (from the current signer).
    async fn renew(&mut self, running: &Running) {
        self.cert = certify(running, "shop", &self.service).await;
    }
}

fn rotating(running: &Running) -> bool {
    running.authority.current().rotating()
}

#[tokio::test]
async fn the_old_root_is_retired_only_when_every_proxy_runs_on_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let old_root = certs(&running.trust_bundle_pem())[0].clone();
    let old_id = fingerprint(&old_root);
    let old_server_leaf = running.tls.leaf().unwrap();

    let mut a = Proxy::connect(&running, "a").await;
    let mut b = Proxy::connect(&running, "b").await;
    let first = a.until(|s| s.endpoints.len() == 2).await;
    assert_eq!(first.signer_id, old_id);
    a.ack(&first.version).await;
    let first_b = b.until(|s| s.endpoints.len() == 2).await;
    b.ack(&first_b.version).await;

    let rotated = admin
        .rotate_ca(RotateCaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.old_signer_id, old_id);
    let new_id = rotated.new_signer_id.clone();
    assert_ne!(new_id, old_id);

    // Both roots are trusted, everywhere.
    let bundle = running.trust_bundle_pem();
    let roots = certs(&bundle);
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0], old_root);
    let new_root = roots[1].clone();
    assert_eq!(fingerprint(&new_root), new_id);
    assert_eq!(std::fs::read_to_string(&running.ca_file).unwrap(), bundle);
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            status.signer_id.as_str(),
            status.retiring_signer_id.as_str()
        ),
        (new_id.as_str(), old_id.as_str())
    );

    // The server's own certificate now comes from the new root.
    let leaf = running.tls.leaf().unwrap();
    assert_ne!(leaf, old_server_leaf);
    let parsed = remora_control::ca::parse_cert(&leaf).unwrap();
    let new_root_parsed = remora_control::ca::parse_cert(&new_root).unwrap();
    assert!(parsed
        .verify_signature(Some(new_root_parsed.public_key()))
        .is_ok());

    // A second rotation waits for this one.
    let again = admin.rotate_ca(RotateCaRequest {}).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(
        again.message().contains("already in progress"),
        "{}",
        again.message()
    );

    // Proxies get the new signer and both roots.
    let rot_a = a.until(|s| s.signer_id == new_id).await;
    assert_eq!(certs(&rot_a.trust_bundle_pem).len(), 2);
    let rot_b = b.until(|s| s.signer_id == new_id).await;

    // Acked, but still on old certificates: nothing retires.
    a.ack(&rot_a.version).await;
    b.ack(&rot_b.version).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rotating(&running));

    // An old-root certificate still connects during the rotation.
    assert!(try_channel(&running, Some(&a.cert)).await.is_ok());
    let old_cert_of_a = a.cert.clone();

    a.renew(&running).await;
    assert_eq!(a.cert.response.signer_id, new_id);
    verify_chain(&a.cert.chain_pem, &remora_control::pem::cert_pem(&new_root)).unwrap();
    a.ack(&rot_a.version).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rotating(&running), "b still runs an old certificate");
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    let signers: Vec<&str> = status
        .proxies
        .iter()
        .map(|p| p.cert_signer_id.as_str())
        .collect();
    assert_eq!(signers, [new_id.as_str(), old_id.as_str()]);
    assert!(status.proxies[0].cert_not_after_unix > 0);

    b.renew(&running).await;
    b.ack(&rot_b.version).await;
    eventually("the old root retires", || !rotating(&running)).await;

    let bundle = running.trust_bundle_pem();
    assert_eq!(certs(&bundle), vec![new_root.clone()]);
    assert_eq!(std::fs::read_to_string(&running.ca_file).unwrap(), bundle);
    let done = a.until(|s| certs(&s.trust_bundle_pem).len() == 1).await;
    assert_eq!(done.signer_id, new_id);
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.retiring_signer_id, "");

    // The old root's certificates are no longer accepted; new ones are.
    let old = try_channel(&running, Some(&old_cert_of_a)).await;
    let refused = match old {
        Err(_) => true,
        Ok(channel) => DiscoveryClient::new(channel)
            .stream(tokio_stream::empty())
            .await
            .is_err(),
    };
    assert!(
        refused,
        "an old-root certificate still works after retirement"
    );
    assert!(try_channel(&running, Some(&a.cert)).await.is_ok());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_ack_of_an_older_snapshot_does_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let mut a = Proxy::connect(&running, "a").await;
    let before = a.until(|_| true).await;
    let new_id = admin
        .rotate_ca(RotateCaRequest {})
        .await
        .unwrap()
        .into_inner()
        .new_signer_id;
    a.renew(&running).await;
    // A new certificate, but the ack is for a snapshot before the rotation.
    a.ack(&before.version).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rotating(&running));
    let rotated = a.until(|s| s.signer_id == new_id).await;
    a.ack(&rotated.version).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rotation_in_progress_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin_client = admin(&running, &running.token).await;
    let rotated = admin_client
        .rotate_ca(RotateCaRequest {})
        .await
        .unwrap()
        .into_inner();
    drop(admin_client);
    running.shutdown().await.unwrap();

    let running = start_in(dir.path()).await;
    let state = running.authority.current();
    assert_eq!(state.signer.id, rotated.new_signer_id);
    assert_eq!(state.retiring, rotated.old_signer_id);
    assert_eq!(state.roots.len(), 2);
    assert_eq!(
        certs(&std::fs::read_to_string(&running.ca_file).unwrap()).len(),
        2
    );

    // One proxy on the new root finishes it.
    let mut a = Proxy::connect(&running, "a").await;
    assert_eq!(a.cert.response.signer_id, rotated.new_signer_id);
    let s = a.until(|_| true).await;
    a.ack(&s.version).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
    let running = start_in(dir.path()).await;
    assert_eq!(running.authority.current().roots.len(), 1);
    assert!(!rotating(&running));
    running.shutdown().await.unwrap();
}
