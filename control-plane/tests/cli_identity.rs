//! The CLI's identity commands and TLS, as an operator runs them: `token
//! create|revoke|list`, `ca rotate`, `status` columns, trust bundle errors,
//! and `serve` keeping its CA across `kill -9`.

mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;

/// `--server ADDR --data-dir DIR` for `running`.
fn base_args(running: &remora_control::server::Running, data: &Path) -> Vec<String> {
    vec![
        "--server".into(),
        running.grpc_addr.to_string(),
        "--data-dir".into(),
        dir_arg(data),
    ]
}

async fn run_with(base: &[String], extra: &[&str]) -> Out {
    let args: Vec<&str> = base
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect();
    run(&args, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_prints_only_the_token_and_revoke_ends_it() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let base = base_args(&running, data.path());

    let out = run_with(
        &base,
        &[
            "token",
            "create",
            "--service",
            "backend",
            "--namespace",
            "shop",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let token = out.stdout.strip_suffix('\n').expect("one line");
    let (id, secret) = token.split_once('.').expect("<id>.<secret>");
    assert_eq!((id.len(), secret.len()), (16, 64), "{:?}", out.stdout);
    assert!(token
        .bytes()
        .all(|b| b == b'.' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let uri = spiffe("shop", "backend");
    certify_with(&running, token, &uri, 0).await.unwrap();

    let out = run_with(
        &base,
        &[
            "token",
            "create",
            "--service",
            "web",
            "-n",
            "shop",
            "--ttl",
            "1h",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    let out = run_with(&base, &["token", "list"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "IDENTITY", "CREATED", "EXPIRES", "USES", "REVOKED"]
    );
    assert_eq!(lines.len(), 3);
    let row = lines.iter().find(|l| l.starts_with(id)).unwrap();
    assert!(
        row.contains(&uri) && row.contains("never") && row.ends_with("no"),
        "{row}"
    );
    assert!(!out.stdout.contains(secret));

    let out = run_with(&base, &["token", "revoke", id]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, format!("token {id} revoked\n"));
    let err = certify_with(&running, token, &uri, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(err.message(), "revoked token");
    let out = run_with(&base, &["token", "list"]).await;
    assert!(out
        .stdout
        .lines()
        .any(|l| l.starts_with(id) && l.ends_with("yes")));

    let out = run_with(&base, &["token", "revoke", "0123456789abcdef"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let out = run_with(
        &base,
        &["token", "create", "--service", "a/b", "--namespace", "shop"],
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("invalid service"), "{}", out.stderr);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotate_and_status_show_signers_and_certificates() {
    use remora_proto::v1::discovery_request::Kind;
    use remora_proto::v1::{Ack, DiscoveryRequest, Register};
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let base = base_args(&running, data.path());

    // A proxy with a certificate that reports it in its ACK.
    let workload = certify(&running, "shop", "backend").await;
    let channel = try_channel(&running, Some(&workload)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            service: "backend".into(),
            namespace: "shop".into(),
            instance_id: "b-1".into(),
            address: "127.0.0.1:9001".into(),
            ..Register::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = remora_proto::v1::discovery_client::DiscoveryClient::new(channel)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Ack(Ack {
            version: first.version,
            ok: true,
            error: String::new(),
            cert_signer_id: workload.response.signer_id.clone(),
            cert_not_after_unix: workload.response.not_after_unix,
        })),
    })
    .await
    .unwrap();
    let signer = workload.response.signer_id.clone();
    eventually("the ack is recorded", || {
        running.registry.status()[0].cert_signer_id == signer
    })
    .await;

    let out = run_with(&base, &["ca", "rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("root rotation started: new signer "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("retiring {signer}")),
        "{}",
        out.stdout
    );
    let new = running.authority.current().signer.id.clone();

    // The CLI trusts the rewritten bundle; status names what the rotation
    // waits for.
    let out = run_with(&base, &["status"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "root rotation in progress: retiring {}, signing with {}; 1 of 1 connected proxies",
            &signer[..12],
            &new[..12]
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("`remora-control ca rotate --finish`")
            && out.stdout.contains("  - proxy shop/backend "),
        "{}",
        out.stdout
    );
    let header = out
        .stdout
        .lines()
        .find(|l| l.starts_with("SERVICE"))
        .unwrap();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "SERVICE",
            "NAMESPACE",
            "INSTANCE",
            "ADDRESS",
            "LABELS",
            "ACKED",
            "CERT-EXPIRES",
            "SIGNER",
            "NACK"
        ]
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("backend"))
        .unwrap();
    assert!(row.contains(&signer[..12]), "{row}");
    assert!(!row.contains(&signer[..13]), "12 characters only: {row}");

    let out = run_with(&base, &["ca", "rotate"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("already in progress"), "{}", out.stderr);
    drop(tx);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_trust_bundle_says_how_to_pass_one() {
    let empty = tempfile::tempdir().unwrap();
    let dir = dir_arg(empty.path());
    let out = run(&["status", "--data-dir", &dir, "--admin-token", "t"], None).await;
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        format!(
            "error: no trust bundle at {}: pass --ca-file or --data-dir\n",
            empty.path().join("trust-bundle.pem").display()
        )
    );
    let out = run(
        &[
            "status",
            "--ca-file",
            "/nonexistent/b.pem",
            "--admin-token",
            "t",
        ],
        None,
    )
    .await;
    assert!(
        out.stderr.contains("no trust bundle at /nonexistent/b.pem"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_or_bundle_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let mut base = base_args(&running, data.path());
    let out = run_with(&base, &["--server-name", "other.example", "history"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("cannot reach the control plane at https://")
            && out.stderr.contains("a name in its certificate"),
        "{}",
        out.stderr
    );
    let out = run_with(&base, &["--server-name", "localhost", "history"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    let other = tempfile::tempdir().unwrap();
    let root = remora_control::ca::generate_root("cluster.local", 0).unwrap();
    let foreign = other.path().join("foreign.pem");
    std::fs::write(&foreign, remora_control::pem::cert_pem(&root.cert)).unwrap();
    base.extend(["--ca-file".to_string(), dir_arg(&foreign)]);
    let out = run_with(&base, &["history"]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    running.shutdown().await.unwrap();
}

/// Starts `remora-control serve` on ephemeral ports; returns it once listening.
async fn serve(data: &Path) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_remora-control"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .env_remove("REMORA_CA_FILE")
        .env("REMORA_LOG", "warn")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("remora-control listening on") {
                return;
            }
        }
        panic!("serve exited");
    })
    .await
    .expect("serve listens within 10s");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_survives_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let mut first = serve(data.path()).await;
    let bundle = std::fs::read_to_string(data.path().join("trust-bundle.pem")).unwrap();
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let mut second = serve(data.path()).await;
    let again = std::fs::read_to_string(data.path().join("trust-bundle.pem")).unwrap();
    assert_eq!(bundle, again);
    assert_eq!(certs(&again).len(), 1);
    second.start_kill().unwrap();
    second.wait().await.unwrap();
}
