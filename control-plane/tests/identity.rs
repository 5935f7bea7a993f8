//! Identity.Certify over a real server: tokens from the Admin API, CSR
//! checks, lifetimes, refusals and their counters.

mod common;

use common::*;
use remora_proto::v1::{
    CertifyRequest, CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, StatusRequest,
};
use std::time::Duration;
use tonic::Code;

fn now() -> i64 {
    remora_control::tokens::now_unix()
}

#[tokio::test]
async fn a_good_token_gets_a_chain_that_verifies_against_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let created = admin
        .create_token(CreateTokenRequest {
            service: "backend".into(),
            namespace: "shop".into(),
            ttl_seconds: 0,
            max_uses: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.spiffe_id, spiffe("shop", "backend"));
    assert_eq!(created.expires_unix, 0);
    let (id, secret) = created.token.split_once('.').unwrap();
    assert_eq!((id, secret.len()), (created.token_id.as_str(), 64));

    let w = certify_with(&running, &created.token, &created.spiffe_id, 0)
        .await
        .unwrap();
    let bundle = running.trust_bundle_pem();
    assert_eq!(w.response.trust_bundle_pem, bundle);
    assert_eq!(std::fs::read_to_string(&running.ca_file).unwrap(), bundle);
    verify_chain(&w.chain_pem, &bundle).expect("the chain verifies");
    let chain = certs(&w.chain_pem);
    assert_eq!(chain.len(), 1, "a root signer: the leaf only");
    assert_eq!(
        remora_control::ca::uri_sans(&chain[0]).unwrap(),
        vec![spiffe("shop", "backend")]
    );
    let leaf = remora_control::ca::parse_cert(&chain[0]).unwrap();
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
    let lifetime = w.response.not_after_unix - now();
    assert!(
        (24 * 3600 - 10..=24 * 3600).contains(&lifetime),
        "{lifetime}"
    );
    assert_eq!(
        leaf.validity().not_after.timestamp(),
        w.response.not_after_unix
    );
    assert!(leaf.validity().not_before.timestamp() <= now() - 55);

    let root = &certs(&bundle)[0];
    let signer = remora_control::ca::fingerprint(root);
    assert_eq!(w.response.signer_id, signer);
    let status = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.signer_id, signer);
    assert_eq!(status.retiring_signer_id, "");
    assert_eq!(
        running.registry.current_snapshot().signer_id,
        signer,
        "snapshots carry the signer"
    );
    assert_eq!(running.registry.current_snapshot().trust_bundle_pem, bundle);

    // Lifetimes are clamped to [1 minute, 24 hours].
    let short = certify_with(&running, &created.token, &created.spiffe_id, 5)
        .await
        .unwrap();
    let lifetime = short.response.not_after_unix - now();
    assert!((50..=60).contains(&lifetime), "{lifetime}");
    let long = certify_with(&running, &created.token, &created.spiffe_id, 30 * 86_400)
        .await
        .unwrap();
    let lifetime = long.response.not_after_unix - now();
    assert!((86_390..=86_400).contains(&lifetime), "{lifetime}");
    assert_eq!(running.cert_metrics.issued(), 3);

    let list = admin
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].token_id, created.token_id);
    assert!(!list[0].revoked);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn tokens_that_prove_nothing_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let id = spiffe("shop", "backend");

    let refused = |token: String| {
        let running = &running;
        let id = id.clone();
        async move { certify_with(running, &token, &id, 0).await.err().unwrap() }
    };
    let unknown = refused(format!("{}.{}", "0".repeat(16), "1".repeat(64))).await;
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(unknown.message(), "unknown token");

    let malformed = refused("not-a-token".into()).await;
    assert_eq!(malformed.code(), Code::Unauthenticated);
    assert!(
        malformed.message().starts_with("malformed token"),
        "{}",
        malformed.message()
    );
    let empty = refused(String::new()).await;
    assert!(
        empty.message().starts_with("malformed token"),
        "{}",
        empty.message()
    );

    let created = admin
        .create_token(CreateTokenRequest {
            service: "backend".into(),
            namespace: "shop".into(),
            ttl_seconds: 3600,
            max_uses: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.expires_unix >= now() + 3590);
    certify_with(&running, &created.token, &id, 0)
        .await
        .unwrap();
    admin
        .revoke_token(RevokeTokenRequest {
            token_id: created.token_id.clone(),
        })
        .await
        .unwrap();
    let revoked = refused(created.token.clone()).await;
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert_eq!(revoked.message(), "revoked token");
    let missing = admin
        .revoke_token(RevokeTokenRequest {
            token_id: "ffffffffffffffff".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let (expired, _) = running
        .tokens
        .create("shop", "backend", Some(Duration::ZERO))
        .unwrap();
    let expired = refused(expired).await;
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert_eq!(expired.message(), "expired token");

    let m = &running.cert_metrics;
    assert_eq!(m.refused("token_unknown"), 1);
    assert_eq!(m.refused("token_malformed"), 2);
    assert_eq!(m.refused("token_revoked"), 1);
    assert_eq!(m.refused("token_expired"), 1);
    let text = remora_control::http::metrics(&remora_control::http::Health {
        ready: Default::default(),
        registry: running.registry.clone(),
        certs: running.cert_metrics.clone(),
        authority: running.authority.clone(),
        listeners: Vec::new(),
    });
    assert!(
        text.contains("remora_control_certificates_refused_total{reason=\"token_revoked\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("remora_control_certificates_issued_total 1"),
        "{text}"
    );

    let bad_name = admin
        .create_token(CreateTokenRequest {
            service: "a/b".into(),
            namespace: "shop".into(),
            ttl_seconds: 0,
            max_uses: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_csr_must_ask_for_exactly_the_identity_the_token_proves() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let (token, _) = running.tokens.create("shop", "backend", None).unwrap();
    let client = identity(&running).await;
    let send = |csr_pem: String| {
        let token = token.clone();
        let mut client = client.clone();
        async move {
            client
                .certify(CertifyRequest {
                    token,
                    csr_pem,
                    lifetime_seconds: 0,
                })
                .await
        }
    };

    let (_, other) = csr(&[&spiffe("shop", "frontend")]);
    let err = send(other).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().starts_with(&format!(
            "the CSR asks for {}, the token proves {}",
            spiffe("shop", "frontend"),
            spiffe("shop", "backend")
        )),
        "{}",
        err.message()
    );
    let (_, two) = csr(&[&spiffe("shop", "backend"), &spiffe("shop", "frontend")]);
    assert_eq!(send(two).await.unwrap_err().code(), Code::PermissionDenied);
    let (_, none) = csr(&[]);
    let err = send(none).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("asks for no name"),
        "{}",
        err.message()
    );

    let garbage = send(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    )
    .await
    .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);

    // A CSR whose self-signature does not verify.
    let (_, good) = csr(&[&spiffe("shop", "backend")]);
    let mut der = rustls::pki_types::pem::PemObject::from_pem_slice(good.as_bytes())
        .map(|d: rustls::pki_types::CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
        .unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let tampered =
        remora_control::pem::cert_pem(&der).replace("CERTIFICATE", "CERTIFICATE REQUEST");
    let err = send(tampered).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("Invalid CSR signature"),
        "{}",
        err.message()
    );

    let huge = send("x".repeat(17 * 1024)).await.unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert!(huge.message().contains("larger than"), "{}", huge.message());

    assert!(send(good).await.is_ok());
    assert_eq!(running.cert_metrics.refused("identity_mismatch"), 3);
    assert_eq!(running.cert_metrics.refused("csr_invalid"), 3);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn certify_needs_no_client_certificate_and_lifetimes_follow_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.cert_lifetime = Duration::from_secs(600);
    config.max_cert_lifetime = Duration::from_secs(3600);
    let running = remora_control::server::start(config).await.unwrap();
    let (token, _) = running.tokens.create("shop", "backend", None).unwrap();
    let id = spiffe("shop", "backend");
    let default = certify_with(&running, &token, &id, 0).await.unwrap();
    let lifetime = default.response.not_after_unix - now();
    assert!((590..=600).contains(&lifetime), "{lifetime}");
    let capped = certify_with(&running, &token, &id, 7200).await.unwrap();
    let lifetime = capped.response.not_after_unix - now();
    assert!((3590..=3600).contains(&lifetime), "{lifetime}");
    running.shutdown().await.unwrap();

    let mut bad = common::config(dir.path());
    bad.cert_lifetime = Duration::from_secs(7200);
    bad.max_cert_lifetime = Duration::from_secs(3600);
    let err = remora_control::server::start(bad).await.unwrap_err();
    assert!(format!("{err:#}").contains("longer than"), "{err:#}");
}
