//! The Admin API over a real gRPC server: apply, validation, get, delete,
//! history, diff, rollback, authentication, durability across restarts.

mod common;

use common::*;
use remora_proto::v1::{
    ApplyRequest, DeleteRequest, DiffRequest, GetRequest, HistoryRequest, RollbackRequest,
    StatusRequest,
};
use tonic::Code;

fn apply_req(files: Vec<remora_proto::v1::SourceFile>) -> ApplyRequest {
    ApplyRequest {
        files,
        dry_run: false,
    }
}

#[tokio::test]
async fn apply_stores_a_version_and_reports_each_document() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;

    let content = format!("{SERVICE}---\n{ROUTE}");
    let r = admin
        .apply(apply_req(vec![file("shop.yaml", &content)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 1);
    assert!(r.changed);
    assert_eq!(
        r.results,
        vec![
            "Service/shop/backend created",
            "HTTPRoute/shop/backend created"
        ]
    );

    // The same files again change nothing.
    let again = admin
        .apply(apply_req(vec![file("shop.yaml", &content)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.version, again.changed), (1, false));
    assert_eq!(again.results[0], "Service/shop/backend unchanged");

    let got = admin
        .get(GetRequest {
            kind: "route".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version, 1);
    assert_eq!(got.resources.len(), 1);
    assert_eq!(got.resources[0].kind, "HTTPRoute");
    let spec: serde_json::Value = serde_json::from_str(&got.resources[0].spec_json).unwrap();
    assert_eq!(spec["rules"][0]["timeout"], "2s");

    // The snapshot follows the store.
    assert_eq!(running.registry.current_snapshot().policy_version, 1);
    assert_eq!(running.registry.current_snapshot().resources.len(), 2);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_invalid_apply_is_refused_whole_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;

    let bad_route = ROUTE.replace("weight: 10", "weight: -1");
    let err = admin
        .apply(apply_req(vec![
            file("svc.yaml", SERVICE),
            file("shop.yaml", &format!("{SERVICE}---\n{bad_route}")),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("shop.yaml: document 2 (HTTPRoute shop/backend): spec.rules"),
        "{}",
        err.message()
    );

    let dup = admin
        .apply(apply_req(vec![
            file("a.yaml", SERVICE),
            file("b.yaml", SERVICE),
        ]))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::InvalidArgument);
    assert!(
        dup.message()
            .contains("Service/shop/backend is defined twice"),
        "{}",
        dup.message()
    );

    let empty = admin
        .apply(apply_req(vec![file("e.yaml", "")]))
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let dry = admin
        .apply(ApplyRequest {
            files: vec![file("svc.yaml", SERVICE)],
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.version, dry.changed), (0, true));
    assert_eq!(dry.results, vec!["Service/shop/backend created"]);

    let history = admin.history(HistoryRequest {}).await.unwrap().into_inner();
    assert!(history.entries.is_empty());
    let got = admin.get(GetRequest::default()).await.unwrap().into_inner();
    assert!(got.resources.is_empty());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn history_diff_delete_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;

    admin
        .apply(apply_req(vec![file("svc.yaml", SERVICE)]))
        .await
        .unwrap();
    let v2 = admin
        .apply(apply_req(vec![file("route.yaml", ROUTE)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);
    let changed_route = ROUTE.replace("timeout: 2s", "timeout: 3s");
    admin
        .apply(apply_req(vec![file("route.yaml", &changed_route)]))
        .await
        .unwrap();
    let deleted = admin
        .delete(DeleteRequest {
            kind: "Service".into(),
            name: "backend".into(),
            namespace: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.version, 4);
    assert_eq!(deleted.results, vec!["Service/shop/backend deleted"]);
    let missing = admin
        .delete(DeleteRequest {
            kind: "Service".into(),
            name: "backend".into(),
            namespace: "shop".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let history = admin
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    let rows: Vec<_> = history
        .iter()
        .map(|e| {
            (
                e.version,
                e.action.as_str(),
                e.summary.as_str(),
                e.resource_count,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "apply", "Service/shop/backend created", 1),
            (2, "apply", "HTTPRoute/shop/backend created", 2),
            (3, "apply", "HTTPRoute/shop/backend configured", 2),
            (4, "delete", "Service/shop/backend deleted", 1),
        ]
    );

    let diff = admin
        .diff(DiffRequest {
            from_version: 2,
            to_version: 3,
        })
        .await
        .unwrap()
        .into_inner()
        .diff;
    assert!(
        diff.contains("-    timeout: 2s") && diff.contains("+    timeout: 3s"),
        "{diff}"
    );
    let unknown = admin
        .diff(DiffRequest {
            from_version: 1,
            to_version: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let old = admin
        .get(GetRequest {
            version: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((old.version, old.resources.len()), (1, 1));

    let rolled = admin
        .rollback(RollbackRequest { version: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.version, 5);
    assert_eq!(
        rolled.results,
        vec![
            "Service/shop/backend created",
            "HTTPRoute/shop/backend configured"
        ]
    );
    let history = admin
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(history[4].action, "rollback to 2");
    let same = admin
        .diff(DiffRequest {
            from_version: 2,
            to_version: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.diff, "");
    assert_eq!(
        admin
            .rollback(RollbackRequest { version: 42 })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        admin
            .rollback(RollbackRequest { version: 0 })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let status = admin
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.policy_version, 5);
    assert!(status.snapshot_version.starts_with("5."));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn get_filters_and_refuses_unknown_kinds_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut admin = admin(&running, &running.token).await;
    let other = SERVICE.replace("namespace: shop", "namespace: other");
    admin
        .apply(apply_req(vec![file(
            "a.yaml",
            &format!("{SERVICE}---\n{other}---\n{ROUTE}"),
        )]))
        .await
        .unwrap();
    let count = |r: remora_proto::v1::GetResponse| r.resources.len();
    let get = |kind: &str, name: &str, namespace: &str| {
        let req = GetRequest {
            kind: kind.into(),
            name: name.into(),
            namespace: namespace.into(),
            version: 0,
        };
        let mut admin = admin.clone();
        async move { admin.get(req).await }
    };
    assert_eq!(count(get("", "", "").await.unwrap().into_inner()), 3);
    assert_eq!(count(get("svc", "", "").await.unwrap().into_inner()), 2);
    assert_eq!(count(get("", "", "shop").await.unwrap().into_inner()), 2);
    assert_eq!(
        count(
            get("Service", "backend", "other")
                .await
                .unwrap()
                .into_inner()
        ),
        1
    );
    assert_eq!(count(get("", "nope", "").await.unwrap().into_inner()), 0);
    assert_eq!(
        get("gizmo", "", "").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let unknown = admin
        .get(GetRequest {
            version: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_calls_need_the_right_token() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let mut wrong = admin(&running, "not-the-token").await;
    let err = wrong.status(StatusRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = wrong
        .apply(apply_req(vec![file("svc.yaml", SERVICE)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let channel = channel(&running).await;
    let mut anonymous = remora_proto::v1::admin_client::AdminClient::new(channel);
    let err = anonymous.history(HistoryRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The token on disk is the one the server expects.
    let on_disk = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    assert_eq!(on_disk.trim(), running.token);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_store_and_token_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_in(dir.path()).await;
    let token = running.token.clone();
    let mut admin_client = admin(&running, &token).await;
    admin_client
        .apply(apply_req(vec![file("svc.yaml", SERVICE)]))
        .await
        .unwrap();
    admin_client
        .apply(apply_req(vec![file("route.yaml", ROUTE)]))
        .await
        .unwrap();
    drop(admin_client);
    running.shutdown().await.unwrap();

    let running = start_in(dir.path()).await;
    assert_eq!(running.token, token);
    assert_eq!(running.registry.current_snapshot().policy_version, 2);
    let mut admin_client = admin(&running, &token).await;
    let got = admin_client
        .get(GetRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.version, got.resources.len()), (2, 2));
    let history = admin_client
        .history(HistoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.entries.len(), 2);
    running.shutdown().await.unwrap();
}
