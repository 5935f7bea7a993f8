//! Single-use and short-lived bootstrap tokens (issue 13, item 7): a token
//! created with `token create --uses 1` certifies once and is refused after,
//! also once the control plane has restarted; one past its `--ttl` certifies
//! nothing new; a workload that holds a valid certificate renews with it
//! (its mTLS client certificate) whatever the token's uses and TTL, but not
//! once the token is revoked, and not for another identity.

mod common;

use common::*;
use remora_control::server::start;
use remora_proto::v1::identity_client::IdentityClient;
use remora_proto::v1::CertifyRequest;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

/// `remora-control --server ... --data-dir ... ARGS` (the real CLI).
async fn cli(running: &remora_control::server::Running, data: &Path, args: &[&str]) -> Out {
    let server = running.grpc_addr.to_string();
    let data_dir = dir_arg(data);
    let mut all = vec!["--server", server.as_str(), "--data-dir", data_dir.as_str()];
    all.extend_from_slice(args);
    run(&all, None).await
}

async fn create(running: &remora_control::server::Running, data: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "token",
        "create",
        "--service",
        "backend",
        "--namespace",
        "shop",
    ];
    args.extend_from_slice(extra);
    let out = cli(running, data, &args).await;
    assert_eq!(out.code, 0, "token create {extra:?}: {}", out.stderr);
    out.stdout.trim().to_string()
}

/// Certify over a connection presenting `holder`'s certificate (a renewal).
async fn renew_as(
    running: &remora_control::server::Running,
    holder: &Workload,
    token: &str,
    uri: &str,
) -> Result<Workload, tonic::Status> {
    let (key, csr_pem) = csr(&[uri]);
    let channel = try_channel(running, Some(holder)).await.unwrap();
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            token: token.into(),
            csr_pem,
            lifetime_seconds: 0,
        })
        .await?
        .into_inner();
    Ok(Workload {
        chain_pem: response.certificate_chain_pem.clone(),
        key_pem: key.serialize_pem(),
        response,
    })
}

fn uses_column(list: &str, token: &str) -> String {
    let id = token.split_once('.').unwrap().0;
    let row = list
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no row for {id} in\n{list}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // ID IDENTITY CREATED(2 words) EXPIRES(2 words or "never") USES REVOKED
    cells[cells.len() - 2].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_certifies_once_even_across_a_restart_and_renewals_still_pass() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let uri = spiffe("shop", "backend");
    let token = create(&running, data.path(), &["--uses", "1"]).await;

    let first = certify_with(&running, &token, &uri, 0)
        .await
        .expect("the first certificate");
    let second = certify_with(&running, &token, &uri, 0).await.unwrap_err();
    assert_eq!(second.code(), Code::Unauthenticated);
    assert!(
        second.message().starts_with("token used up"),
        "{}",
        second.message()
    );
    assert_eq!(running.cert_metrics.refused("token_used_up"), 1);
    let list = cli(&running, data.path(), &["token", "list"]).await;
    assert_eq!(uses_column(&list.stdout, &token), "1/1", "{}", list.stdout);

    // The workload renews with its certificate: no use is counted.
    let renewed = renew_as(&running, &first, &token, &uri)
        .await
        .expect("a renewal by the certificate holder");
    renew_as(&running, &renewed, &token, &uri)
        .await
        .expect("a renewal by the renewed certificate");
    assert_eq!(running.cert_metrics.renewed(), 2);
    assert_eq!(running.cert_metrics.issued(), 3);

    // A restart does not give the token its use back.
    running.shutdown().await.unwrap();
    let running = start_in(data.path()).await;
    let again = certify_with(&running, &token, &uri, 0).await.unwrap_err();
    assert!(
        again.message().starts_with("token used up"),
        "{}",
        again.message()
    );
    let text = remora_control::http::metrics(&remora_control::http::Health {
        ready: Default::default(),
        registry: running.registry.clone(),
        certs: running.cert_metrics.clone(),
        authority: running.authority.clone(),
        listeners: Vec::new(),
    });
    assert!(
        text.contains("remora_control_certificates_refused_total{reason=\"token_used_up\"} 1"),
        "{text}"
    );
    // The renewal path survives the restart too.
    renew_as(&running, &renewed, &token, &uri)
        .await
        .expect("a renewal after the restart");
    let list = cli(&running, data.path(), &["token", "list"]).await;
    assert_eq!(uses_column(&list.stdout, &token), "1/1", "{}", list.stdout);

    // A token of three uses certifies three times.
    let three = create(&running, data.path(), &["--uses", "3"]).await;
    for _ in 0..3 {
        certify_with(&running, &three, &uri, 0).await.unwrap();
    }
    assert!(certify_with(&running, &three, &uri, 0).await.is_err());
    let out = cli(
        &running,
        data.path(),
        &[
            "token",
            "create",
            "--service",
            "backend",
            "--namespace",
            "shop",
            "--uses",
            "0",
        ],
    )
    .await;
    assert_eq!(out.code, 2, "--uses 0 is a usage error: {}", out.stderr);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_certifies_nothing_new_but_its_workload_renews_until_revoked() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let uri = spiffe("shop", "backend");
    // Expiry is kept in whole seconds from the creation's second: a 1 s TTL
    // created late in a second could end before the first Certify. 2 s
    // leaves at least one whole second for it.
    let token = create(&running, data.path(), &["--ttl", "2s"]).await;
    let holder = certify_with(&running, &token, &uri, 0)
        .await
        .expect("a certificate within the TTL");
    tokio::time::sleep(Duration::from_millis(3100)).await;

    let late = certify_with(&running, &token, &uri, 0).await.unwrap_err();
    assert_eq!(late.code(), Code::Unauthenticated);
    assert_eq!(late.message(), "expired token");
    assert_eq!(running.cert_metrics.refused("token_expired"), 1);

    // Its workload renews with the certificate it holds...
    let renewed = renew_as(&running, &holder, &token, &uri)
        .await
        .expect("a renewal after the TTL");

    // ... but only for its own identity ...
    let frontend = certify(&running, "shop", "frontend").await;
    let other = renew_as(&running, &frontend, &token, &uri)
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(
        other.message().contains("the client certificate is for"),
        "{}",
        other.message()
    );
    // ... and with a genuine token.
    let last = if token.ends_with('0') { '1' } else { '0' };
    let wrong_secret = format!("{}{last}", &token[..token.len() - 1]);
    let wrong = renew_as(&running, &renewed, &wrong_secret, &uri)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    // Revoking the token ends its renewals.
    let id = token.split_once('.').unwrap().0;
    let out = cli(&running, data.path(), &["token", "revoke", id]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let revoked = renew_as(&running, &renewed, &token, &uri)
        .await
        .unwrap_err();
    assert_eq!(revoked.message(), "revoked token");
    running.shutdown().await.unwrap();
}

/// The limit is a field of CreateTokenRequest (it travelled as request
/// metadata before); the answer confirms it, which the CLI checks, and
/// ListTokens reports uses and limit. 0 is no limit.
#[tokio::test]
async fn the_admin_api_takes_confirms_and_lists_a_uses_limit() {
    let data = tempfile::tempdir().unwrap();
    let running = start(config(data.path())).await.unwrap();
    let mut admin = admin(&running, &running.token).await;
    let request = |max_uses| remora_proto::v1::CreateTokenRequest {
        service: "backend".into(),
        namespace: "shop".into(),
        ttl_seconds: 0,
        max_uses,
    };
    let limited = admin.create_token(request(2)).await.unwrap().into_inner();
    assert_eq!(limited.max_uses, 2);
    let record = running.tokens.get(&limited.token_id).unwrap().unwrap();
    assert_eq!((record.max_uses, record.uses), (2, 0));
    let unlimited = admin.create_token(request(0)).await.unwrap().into_inner();
    assert_eq!(unlimited.max_uses, 0);
    let record = running.tokens.get(&unlimited.token_id).unwrap().unwrap();
    assert_eq!(record.max_uses, 0);

    certify_with(&running, &limited.token, &spiffe("shop", "backend"), 0)
        .await
        .unwrap();
    let listed = admin
        .list_tokens(remora_proto::v1::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let uses = |id: &str| {
        listed
            .iter()
            .find(|t| t.token_id == id)
            .map(|t| (t.uses, t.max_uses))
    };
    assert_eq!(uses(&limited.token_id), Some((1, 2)));
    assert_eq!(uses(&unlimited.token_id), Some((0, 0)));
    running.shutdown().await.unwrap();
}
