//! Root rotation: both roots trusted, the control plane's own certificate
//! kept on the old root while it is trusted, and the old root retired only
//! once no certificate from it is in use: every connected proxy acked a
//! snapshot from the rotation on and runs a certificate from the new root,
//! and every certificate the old root issued was renewed, belongs to a
//! workload that left or to a revoked token, or expired. A proxy that was
//! away (disconnected, or not yet back after a control-plane restart) can
//! come back and renew; `ca rotate --finish` retires the old root at once
//! and names who was left behind.

mod common;

use common::*;
use remora_control::ca::fingerprint;
use remora_control::server::Running;
use remora_proto::v1::discovery_client::DiscoveryClient;
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::{
    Ack, CertifyRequest, Deregister, DiscoveryRequest, Register, RotateCaRequest, Snapshot,
    StatusRequest,
};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Streaming};

/// A simulated proxy: a bootstrap token, a workload certificate, the trust
/// bundle it knows, and (while connected) a Discovery stream.
struct Proxy {
    service: String,
    instance: String,
    token: String,
    cert: Workload,
    bundle: String,
    stream: Option<(mpsc::Sender<DiscoveryRequest>, Streaming<Snapshot>)>,
    /// The stream's last snapshot, complete (deltas are merged into it).
    base: Option<Snapshot>,
}

/// A TLS channel to `running` that trusts `bundle` only, presenting `cert`.
async fn channel_with(
    running: &Running,
    bundle: &str,
    cert: Option<&Workload>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name("remora-control");
    if let Some(w) = cert {
        tls = tls.identity(Identity::from_pem(&w.chain_pem, &w.key_pem));
    }
    Channel::from_shared(url(running))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

impl Proxy {
    /// Bootstraps with a new token and connects.
    async fn start(running: &Running, service: &str) -> Proxy {
        let (token, _) = running.tokens.create("shop", service, None).unwrap();
        let cert = certify_with(running, &token, &spiffe("shop", service), 0)
            .await
            .unwrap();
        let mut proxy = Proxy {
            service: service.into(),
            instance: format!("{service}-1"),
            bundle: cert.response.trust_bundle_pem.clone(),
            token,
            cert,
            stream: None,
            base: None,
        };
        proxy.connect(running).await.unwrap();
        proxy
    }

    /// Opens a Discovery stream with the certificate it holds, verifying the
    /// control plane with the bundle it knows.
    async fn connect(&mut self, running: &Running) -> Result<(), String> {
        let channel = channel_with(running, &self.bundle, Some(&self.cert))
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            kind: Some(Kind::Register(Register {
                service: self.service.clone(),
                namespace: "shop".into(),
                instance_id: self.instance.clone(),
                address: "127.0.0.1:9001".into(),
                ..Register::default()
            })),
        })
        .await
        .unwrap();
        let snapshots = DiscoveryClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{s:?}"))?
            .into_inner();
        self.stream = Some((tx, snapshots));
        self.base = None;
        Ok(())
    }

    /// Drops its stream (a network blip, a crash).
    fn disconnect(&mut self) {
        self.stream = None;
    }

    /// The next snapshot that satisfies `f` (complete: deltas are merged
    /// into the last one); follows its trust bundle.
    async fn until(&mut self, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let (_, snapshots) = self.stream.as_mut().expect("connected");
        let base = &mut self.base;
        let snapshot = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let wire = snapshots.message().await.unwrap().unwrap();
                let s = match base.take() {
                    Some(mut b) if remora_proto::delta::is_delta(&wire) => {
                        remora_proto::delta::apply(&mut b, wire).unwrap();
                        b
                    }
                    _ => wire,
                };
                *base = Some(s.clone());
                if f(&s) {
                    return s;
                }
            }
        })
        .await
        .expect("the expected snapshot in time");
        self.bundle = snapshot.trust_bundle_pem.clone();
        snapshot
    }

    async fn send(&self, kind: Kind) {
        let (tx, _) = self.stream.as_ref().expect("connected");
        tx.send(DiscoveryRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    /// ACKs `version`, reporting the proxy's current certificate.
    async fn ack(&self, version: &str) {
        self.send(Kind::Ack(Ack {
            version: version.into(),
            ok: true,
            error: String::new(),
            cert_signer_id: self.cert.response.signer_id.clone(),
            cert_not_after_unix: self.cert.response.not_after_unix,
        }))
        .await;
    }

    /// Renews as a proxy does: Certify over a connection presenting the
    /// certificate it holds, with its token.
    async fn renew(&mut self, running: &Running) -> Result<(), tonic::Status> {
        let channel = channel_with(running, &self.bundle, Some(&self.cert))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        let (key, csr_pem) = csr(&[&spiffe("shop", &self.service)]);
        let response = IdentityClient::new(channel)
            .certify(CertifyRequest {
                token: self.token.clone(),
                csr_pem,
                lifetime_seconds: 0,
            })
            .await?
            .into_inner();
        self.bundle = response.trust_bundle_pem.clone();
        self.cert = Workload {
            chain_pem: response.certificate_chain_pem.clone(),
            key_pem: key.serialize_pem(),
            response,
        };
        Ok(())
    }

    /// Renews and ACKs the latest snapshot it has seen, as a proxy does when
    /// a snapshot names a new signer.
    async fn move_to(&mut self, running: &Running, new_id: &str) {
        let rotated = self.until(|s| s.signer_id == new_id).await;
        self.renew(running).await.unwrap();
        assert_eq!(self.cert.response.signer_id, new_id);
        self.ack(&rotated.version).await;
    }
}

fn rotating(running: &Running) -> bool {
    running.authority.current().rotating()
}

async fn rotate(running: &Running) -> String {
    admin(running, &running.token)
        .await
        .rotate_ca(RotateCaRequest::default())
        .await
        .unwrap()
        .into_inner()
        .new_signer_id
}

/// The signer of the control plane's certificate, as a client sees it.
fn server_signer(running: &Running, roots_pem: &str) -> String {
    let leaf = running.tls.leaf().unwrap();
    let leaf = remora_control::ca::parse_cert(&leaf).unwrap();
    certs(roots_pem)
        .into_iter()
        .find(|root| {
            let root_parsed = remora_control::ca::parse_cert(root).unwrap();
            leaf.verify_signature(Some(root_parsed.public_key()))
                .is_ok()
        })
        .map(|root| fingerprint(&root))
        .unwrap_or_default()
}

/// Stays rotating for `d` (nothing retires the old root meanwhile).
async fn still_rotating_after(running: &Running, d: Duration, why: &str) {
    tokio::time::sleep(d).await;
    assert!(rotating(running), "the old root was retired although {why}");
}

async fn status(running: &Running) -> remora_proto::v1::StatusResponse {
    admin(running, &running.token)
        .await
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn the_old_root_is_retired_only_once_every_certificate_from_it_was_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let old_root = certs(&running.trust_bundle_pem())[0].clone();
    let old_id = fingerprint(&old_root);
    let old_server_leaf = running.tls.leaf().unwrap();

    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    let first = a.until(|s| s.endpoints.len() == 2).await;
    assert_eq!(first.signer_id, old_id);
    a.ack(&first.version).await;
    let first_b = b.until(|s| s.endpoints.len() == 2).await;
    b.ack(&first_b.version).await;

    let rotated = admin
        .rotate_ca(RotateCaRequest::default())
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
    let status = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            status.signer_id.as_str(),
            status.retiring_signer_id.as_str()
        ),
        (new_id.as_str(), old_id.as_str())
    );
    // Both proxies' certificates hold the rotation, and status says so.
    assert_eq!(status.rotation_waiting_for.len(), 2, "{status:?}");
    assert!(status.rotation_deadline_unix > 0);

    // The server's own certificate stays on the old root while it is
    // trusted: a proxy that knows only the old root can still verify it.
    assert_eq!(running.tls.leaf().unwrap(), old_server_leaf);
    assert_eq!(server_signer(&running, &bundle), old_id);

    // A second rotation waits for this one.
    let again = admin
        .rotate_ca(RotateCaRequest::default())
        .await
        .unwrap_err();
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
    still_rotating_after(&running, Duration::from_millis(200), "no proxy renewed").await;

    // An old-root certificate still connects during the rotation.
    assert!(try_channel(&running, Some(&a.cert)).await.is_ok());
    let old_cert_of_a = a.cert.clone();

    a.renew(&running).await.unwrap();
    assert_eq!(a.cert.response.signer_id, new_id);
    verify_chain(&a.cert.chain_pem, &remora_control::pem::cert_pem(&new_root)).unwrap();
    a.ack(&rot_a.version).await;
    still_rotating_after(
        &running,
        Duration::from_millis(200),
        "b runs an old certificate",
    )
    .await;
    let status = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let signers: Vec<&str> = status
        .proxies
        .iter()
        .map(|p| p.cert_signer_id.as_str())
        .collect();
    assert_eq!(signers, [new_id.as_str(), old_id.as_str()]);
    assert!(status.proxies[0].cert_not_after_unix > 0);
    assert_eq!(status.rotation_waiting_for.len(), 1, "{status:?}");
    assert!(
        status.rotation_waiting_for[0].contains("shop/b b-1"),
        "{status:?}"
    );

    b.renew(&running).await.unwrap();
    b.ack(&rot_b.version).await;
    eventually("the old root retires", || !rotating(&running)).await;

    let bundle = running.trust_bundle_pem();
    assert_eq!(certs(&bundle), vec![new_root.clone()]);
    assert_eq!(std::fs::read_to_string(&running.ca_file).unwrap(), bundle);
    assert_eq!(server_signer(&running, &bundle), new_id);
    let done = a.until(|s| certs(&s.trust_bundle_pem).len() == 1).await;
    assert_eq!(done.signer_id, new_id);
    let status = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.retiring_signer_id, "");
    assert!(status.rotation_waiting_for.is_empty());

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
    let mut a = Proxy::start(&running, "a").await;
    let before = a.until(|_| true).await;
    let new_id = rotate(&running).await;
    a.renew(&running).await.unwrap();
    // A new certificate, but the ack is for a snapshot before the rotation.
    a.ack(&before.version).await;
    still_rotating_after(
        &running,
        Duration::from_millis(200),
        "a acked an old snapshot",
    )
    .await;
    let rotated = a.until(|s| s.signer_id == new_id).await;
    a.ack(&rotated.version).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rotation_in_progress_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let old_bundle = running.trust_bundle_pem();
    let old_id = fingerprint(&certs(&old_bundle)[0]);
    let mut admin_client = admin(&running, &running.token).await;
    let rotated = admin_client
        .rotate_ca(RotateCaRequest::default())
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
    // The retiring root's key was kept: the control plane's certificate is
    // still from it, so the old bundle alone verifies the control plane.
    assert_eq!(server_signer(&running, &old_bundle), old_id);
    assert!(channel_with(&running, &old_bundle, None).await.is_ok());

    // One proxy on the new root finishes it.
    let mut a = Proxy::start(&running, "a").await;
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

/// Issue 14, item 2: a proxy that is disconnected while every connected one
/// moves to the new root is not locked out: the old root stays trusted (its
/// certificate is still in use), it reconnects with it, renews from the new
/// root, and only then is the old root retired.
#[tokio::test]
async fn a_proxy_away_during_the_rotation_comes_back_and_renews() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    let s = b.until(|_| true).await;
    b.ack(&s.version).await;
    b.disconnect();
    eventually("b's stream is gone", || {
        running.registry.proxies_connected() == 1
    })
    .await;

    let new_id = rotate(&running).await;
    a.move_to(&running, &new_id).await;
    still_rotating_after(
        &running,
        Duration::from_millis(500),
        "b, away, still holds a certificate from it",
    )
    .await;
    let waiting = status(&running).await.rotation_waiting_for;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0].contains("spiffe://cluster.local/ns/shop/sa/b")
            && waiting[0].contains("not connected"),
        "{waiting:?}"
    );

    // b comes back with its old certificate and the bundle it had.
    b.connect(&running).await.unwrap();
    b.move_to(&running, &new_id).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

/// Issue 14, item 2: a control-plane restart just before `ca rotate`; one
/// proxy is back before the rotation, the other after it has started. The
/// late one verifies the control plane with the only root it knows (the
/// old one) and catches up.
#[tokio::test]
async fn a_control_plane_restart_just_before_the_rotation_strands_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    for p in [&mut a, &mut b] {
        let s = p.until(|_| true).await;
        p.ack(&s.version).await;
        p.disconnect();
    }
    running.shutdown().await.unwrap();

    let running = start_in(dir.path()).await;
    a.connect(&running).await.unwrap();
    let new_id = rotate(&running).await;
    a.move_to(&running, &new_id).await;
    still_rotating_after(
        &running,
        Duration::from_millis(500),
        "b, not back yet, still holds a certificate from it",
    )
    .await;

    assert_eq!(certs(&b.bundle).len(), 1, "b knows only the old root");
    b.connect(&running).await.unwrap();
    b.move_to(&running, &new_id).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

/// `ca rotate --finish`: the old root goes at once, and the answer (and the
/// CLI's warning) names what still used it. That proxy can no longer use
/// its certificate and bootstraps again with its token.
#[tokio::test]
async fn ca_rotate_finish_retires_at_once_and_names_who_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let nothing = admin
        .rotate_ca(RotateCaRequest { finish: true })
        .await
        .unwrap_err();
    assert_eq!(nothing.code(), Code::FailedPrecondition);
    assert!(
        nothing.message().contains("no root rotation"),
        "{}",
        nothing.message()
    );

    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    b.disconnect();
    eventually("b's stream is gone", || {
        running.registry.proxies_connected() == 1
    })
    .await;
    let new_id = rotate(&running).await;
    a.move_to(&running, &new_id).await;
    still_rotating_after(&running, Duration::from_millis(200), "b is away").await;

    let out = run_cli(&running, dir.path(), &["ca", "rotate", "--finish"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("root rotation finished")
            && out.stdout.contains(&format!("signing with {new_id}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("warning: 1 certificate(s)")
            && out.stderr.contains("spiffe://cluster.local/ns/shop/sa/b")
            && out.stderr.contains("valid until"),
        "{}",
        out.stderr
    );
    assert!(!rotating(&running));
    assert_eq!(certs(&running.trust_bundle_pem()).len(), 1);

    // b's certificate is refused now; its token gets it a new one.
    assert!(b.renew(&running).await.is_err());
    let fresh = certify_with(&running, &b.token, &spiffe("shop", "b"), 0)
        .await
        .unwrap();
    assert_eq!(fresh.response.signer_id, new_id);
    running.shutdown().await.unwrap();
}

/// Issue 14, item 3: a workload whose token was revoked cannot renew, so
/// it never moves; it does not hold the rotation.
#[tokio::test]
async fn a_revoked_tokens_workload_does_not_hold_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    let s = b.until(|_| true).await;
    b.ack(&s.version).await;
    let id = b.token.split_once('.').unwrap().0.to_string();
    let out = run_cli(&running, dir.path(), &["token", "revoke", &id]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    let new_id = rotate(&running).await;
    let rotated = b.until(|s| s.signer_id == new_id).await;
    let refused = b.renew(&running).await.unwrap_err();
    assert_eq!(refused.message(), "revoked token");
    b.ack(&rotated.version).await;
    a.move_to(&running, &new_id).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

/// A proxy that deregistered and closed its stream left for good: its
/// certificate does not hold the rotation.
#[tokio::test]
async fn a_proxy_that_left_does_not_hold_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::start(&running, "a").await;
    let b = Proxy::start(&running, "b").await;
    b.send(Kind::Deregister(Deregister {})).await;
    eventually("b deregistered", || {
        running
            .registry
            .status()
            .iter()
            .any(|p| p.service == "b" && !p.endpoint_registered)
    })
    .await;
    drop(b);
    eventually("b is gone", || running.registry.proxies_connected() == 1).await;
    let new_id = rotate(&running).await;
    a.move_to(&running, &new_id).await;
    eventually("the old root retires", || !rotating(&running)).await;
    running.shutdown().await.unwrap();
}

/// An instance that comes back with a certificate not renewed from its
/// previous one restarted: its previous certificate is out of use.
#[tokio::test]
async fn a_restarted_instance_releases_its_previous_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut a = Proxy::start(&running, "a").await;
    let mut b = Proxy::start(&running, "b").await;
    b.disconnect();
    // The same instance id, a new process: a new key and certificate.
    let mut b2 = Proxy::start(&running, "b").await;
    let new_id = rotate(&running).await;
    a.move_to(&running, &new_id).await;
    b2.move_to(&running, &new_id).await;
    eventually("the old root retires", || !rotating(&running)).await;
    assert!(b.renew(&running).await.is_err());
    running.shutdown().await.unwrap();
}

/// The real CLI against `running`.
async fn run_cli(running: &Running, data: &Path, args: &[&str]) -> Out {
    let server = running.grpc_addr.to_string();
    let data_dir = dir_arg(data);
    let mut all = vec!["--server", server.as_str(), "--data-dir", data_dir.as_str()];
    all.extend_from_slice(args);
    run(&all, None).await
}
