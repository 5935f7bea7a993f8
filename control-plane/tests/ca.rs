//! The CA across restarts, the trust bundle file, and operator-provided CAs
//! (a root, or an intermediate under a root in `--ca-bundle`).

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use remora_control::ca::fingerprint;
use remora_control::ca_store::OperatorCa;
use remora_control::server::start;
use remora_proto::v1::RotateCaRequest;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use tonic::Code;

#[tokio::test]
async fn the_generated_ca_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let signer = running.authority.current().signer.id.clone();
    let bundle_path = dir.path().join("trust-bundle.pem");
    assert_eq!(running.ca_file, bundle_path);
    let bundle = std::fs::read_to_string(&bundle_path).unwrap();
    assert_eq!(certs(&bundle).len(), 1);
    assert_eq!(fingerprint(&certs(&bundle)[0]), signer);
    let mode = std::fs::metadata(dir.path().join("identity.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is in identity.redb");
    let before = certify(&running, "shop", "backend").await;
    running.shutdown().await.unwrap();

    // The bundle file is rewritten on start even if it was removed.
    std::fs::remove_file(&bundle_path).unwrap();
    let running = start_in(dir.path()).await;
    assert_eq!(running.authority.current().signer.id, signer);
    assert_eq!(std::fs::read_to_string(&bundle_path).unwrap(), bundle);
    // Certificates from before the restart still verify; new ones too.
    verify_chain(&before.chain_pem, &running.trust_bundle_pem()).unwrap();
    let after = certify(&running, "shop", "backend").await;
    assert_eq!(after.response.signer_id, signer);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_bundle_goes_where_ca_file_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let path = dir.path().join("elsewhere/roots.pem");
    config.ca_file = Some(path.clone());
    let running = start(config).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        running.trust_bundle_pem()
    );
    assert!(!dir.path().join("trust-bundle.pem").exists());
    running.shutdown().await.unwrap();
}

/// A root and an intermediate under it, written as PEM files in `dir`.
struct OperatorFiles {
    root_pem: String,
    intermediate_der: Vec<u8>,
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn write_operator_ca(dir: &Path) -> OperatorFiles {
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("Operator Root", None);
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate().unwrap();
    let inter = ca_params("Operator Intermediate", Some(0))
        .signed_by(&inter_key, &Issuer::new(root_params, &root_key))
        .unwrap();
    std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("root.key"), root_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("inter.pem"), inter.pem()).unwrap();
    std::fs::write(dir.join("inter.key"), inter_key.serialize_pem()).unwrap();
    OperatorFiles {
        root_pem: root.pem(),
        intermediate_der: inter.der().to_vec(),
    }
}

#[tokio::test]
async fn an_operator_intermediate_signs_and_cannot_be_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let op = write_operator_ca(files.path());
    let mut config = config(dir.path());
    config.operator_ca = Some(OperatorCa {
        cert: files.path().join("inter.pem"),
        key: files.path().join("inter.key"),
        bundle: Some(files.path().join("root.pem")),
    });
    let running = start(config).await.unwrap();
    let bundle = running.trust_bundle_pem();
    assert_eq!(
        certs(&bundle),
        certs(&op.root_pem),
        "the bundle holds the root only"
    );
    assert_eq!(std::fs::read_to_string(&running.ca_file).unwrap(), bundle);

    let w = certify(&running, "shop", "backend").await;
    let chain = certs(&w.chain_pem);
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    assert_eq!(chain[1].as_ref(), op.intermediate_der.as_slice());
    assert_eq!(w.response.signer_id, fingerprint(&op.intermediate_der));
    verify_chain(&w.chain_pem, &bundle).unwrap();
    // The server's own chain verifies against the root too: clients connect.
    let mut admin = admin(&running, &running.token).await;
    let err = admin
        .rotate_ca(RotateCaRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("provided by the operator"),
        "{}",
        err.message()
    );
    // Nothing of the operator's CA is stored.
    running.shutdown().await.unwrap();
    let generated = start_in(dir.path()).await;
    assert_ne!(
        generated.authority.current().signer.id,
        fingerprint(&op.intermediate_der)
    );
    generated.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_operator_root_alone_is_its_own_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let op = write_operator_ca(files.path());
    let mut config = config(dir.path());
    config.operator_ca = Some(OperatorCa {
        cert: files.path().join("root.pem"),
        key: files.path().join("root.key"),
        bundle: None,
    });
    let running = start(config).await.unwrap();
    assert_eq!(certs(&running.trust_bundle_pem()), certs(&op.root_pem));
    let w = certify(&running, "shop", "backend").await;
    assert_eq!(certs(&w.chain_pem).len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mismatched_or_unchained_operator_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    write_operator_ca(files.path());
    let attempt = |cert: &str, key: &str, bundle: Option<&str>| {
        let mut config = config(dir.path());
        config.operator_ca = Some(OperatorCa {
            cert: files.path().join(cert),
            key: files.path().join(key),
            bundle: bundle.map(|b| files.path().join(b)),
        });
        start(config)
    };
    let err = attempt("inter.pem", "root.key", Some("root.pem"))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("does not belong to the CA certificate"),
        "{err:#}"
    );
    // An intermediate whose bundle does not hold its root.
    let other = tempfile::tempdir().unwrap();
    write_operator_ca(other.path());
    std::fs::copy(
        other.path().join("root.pem"),
        files.path().join("other-root.pem"),
    )
    .unwrap();
    let err = attempt("inter.pem", "inter.key", Some("other-root.pem"))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("does not lead to a root"),
        "{err:#}"
    );
    let err = attempt("missing.pem", "inter.key", None).await.unwrap_err();
    assert!(format!("{err:#}").contains("--ca-cert"), "{err:#}");
}
