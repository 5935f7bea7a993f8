//! Issue 14, item 4: no policy document can freeze the control plane. A
//! document nested past the limit is refused at once (the YAML scanner's cost
//! grows with the square of the nesting, so it is measured first, in linear
//! time) while status, certificates and discovery keep answering; an apply
//! over the size limit gets the control plane's own error naming the limit
//! (gRPC's decoder is set far above it); a key given twice is refused with
//! the field named.

mod common;

use common::*;
use remora_control::server::{start, Running};
use remora_proto::v1::discovery_request::Kind;
use remora_proto::v1::{ApplyRequest, DiscoveryRequest, Register, StatusRequest};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const HEAD: &str = "apiVersion: remora.dev/v1\nkind: Service\nmetadata: {name: a, namespace: shop}\nspec:\n  ports: ";

async fn apply(running: &Running, name: &str, content: &str) -> Result<u64, tonic::Status> {
    admin(running, &running.token)
        .await
        .apply(ApplyRequest {
            files: vec![file(name, content)],
            dry_run: false,
        })
        .await
        .map(|r| r.into_inner().version)
}

/// 200 KB of nested flow collections (the shape that took 57 s before),
/// four at once, while status, Certify and a new discovery stream are timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_refused_at_once_while_the_control_plane_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let hostile = format!("{HEAD}{}1\n", "[a: ".repeat(50_000));
    assert!(hostile.len() > 200_000);

    let started = Instant::now();
    let mut refusals = Vec::new();
    for i in 0..4 {
        let mut admin = admin(&running, &running.token).await;
        let hostile = hostile.clone();
        refusals.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = admin
                .apply(ApplyRequest {
                    files: vec![file(&format!("nested-{i}.yaml"), &hostile)],
                    dry_run: false,
                })
                .await;
            (r, t.elapsed())
        }));
    }

    // Meanwhile: status, a certificate, a discovery stream and its snapshot.
    let mut admin_client = admin(&running, &running.token).await;
    for _ in 0..5 {
        let t = Instant::now();
        admin_client.status(StatusRequest::default()).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "status took {:?}",
            t.elapsed()
        );
    }
    let t = Instant::now();
    let workload = certify(&running, "shop", "backend").await;
    let channel = try_channel(&running, Some(&workload)).await.unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Register(Register {
            service: "backend".into(),
            namespace: "shop".into(),
            instance_id: "backend-1".into(),
            address: "127.0.0.1:9001".into(),
            ..Register::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = remora_proto::v1::discovery_client::DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let snapshot = stream.message().await.unwrap().unwrap();
    assert_eq!(snapshot.endpoints.len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "discovery took {:?}",
        t.elapsed()
    );

    for refusal in refusals {
        let (r, took) = refusal.await.unwrap();
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(
                "nested more than 64 deep at line 5 column 266 (the nesting limit is 64)"
            ),
            "{}",
            status.message()
        );
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(tx);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_apply_over_the_size_limit_gets_the_control_planes_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    // 10 MB: more than gRPC's default 4 MiB, far more than the 1 MiB limit.
    let big = format!(
        "{HEAD}[{{port: 80, protocol: http}}]\n# {}\n",
        "x".repeat(10_000_000)
    );
    let refused = apply(&running, "big.yaml", &big).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("9.5 MiB")
            && refused.message().contains("limit of 1.0 MiB per apply")
            && refused.message().contains("--max-apply-bytes"),
        "{}",
        refused.message()
    );
    assert!(!refused.message().contains("message length too large"));

    // The CLI says the same.
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, &big).unwrap();
    let server = running.grpc_addr.to_string();
    let data = dir_arg(dir.path());
    let out = run(
        &[
            "--server",
            &server,
            "--data-dir",
            &data,
            "apply",
            "-f",
            &path.display().to_string(),
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("apply refused: the files are 9.5 MiB")
            && out.stderr.contains("--max-apply-bytes"),
        "{}",
        out.stderr
    );
    running.shutdown().await.unwrap();

    // The limit is the operator's to set.
    let dir = tempfile::tempdir().unwrap();
    let mut small = config(dir.path());
    small.max_apply_bytes = 16 * 1024;
    let running = start(small).await.unwrap();
    let doc = format!(
        "{HEAD}[{{port: 80, protocol: http}}]\n# {}\n",
        "x".repeat(20_000)
    );
    let refused = apply(&running, "a.yaml", &doc).await.unwrap_err();
    assert!(
        refused.message().contains("limit of 16.0 KiB per apply"),
        "{}",
        refused.message()
    );
    let fits = format!("{HEAD}[{{port: 80, protocol: http}}]\n");
    assert_eq!(apply(&running, "a.yaml", &fits).await.unwrap(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_key_given_twice_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let doc = "apiVersion: remora.dev/v1\nkind: HTTPRoute\nmetadata: {name: b, namespace: shop}\n\
               spec:\n  service: b\n  rules:\n    - backends: [{service: b}]\n      timeout: 2s\n      timeout: 30s\n";
    let refused = apply(&running, "route.yaml", doc).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with(
            "route.yaml: document 1: spec.rules[0].timeout: duplicate key \"timeout\""
        ),
        "{}",
        refused.message()
    );
    let fixed = doc.replace("      timeout: 30s\n", "");
    assert_eq!(apply(&running, "route.yaml", &fixed).await.unwrap(), 1);
    running.shutdown().await.unwrap();
}
