//! The operator's side of the control plane: invalid policies are refused whole
//! and named precisely; apply, get, delete, history, diff and rollback behave; an
//! accepted apply survives `kill -9`; `--help` lists every subcommand; the admin
//! API refuses a wrong token.

use std::process::Output;

use remora_tests::*;

const SERVICE_8080: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
"#;

const SERVICE_8081_AND_ROUTE: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8081, protocol: http}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - backends: [{service: backend, subset: {version: v1}}]
      timeout: 2s
"#;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether `value` holds the number `n` anywhere.
fn json_has_number(value: &serde_json::Value, n: u64) -> bool {
    match value {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Array(items) => items.iter().any(|v| json_has_number(v, n)),
        serde_json::Value::Object(map) => map.values().any(|v| json_has_number(v, n)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_refused_whole_naming_file_document_and_field() {
    let cp = ControlPlane::start().await;
    cp.apply_ok(SERVICE_8080).await;
    let history = cp.cli_ok(&["history"]).await;

    // Document 1 is valid, document 2 has a weight that is not a number.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad-route.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  ports: [{port: 9090, protocol: grpc}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - backends: [{service: backend, subset: {version: v1}, weight: heavy}]
"#,
    )
    .unwrap();
    let out = cp.cli(&["apply", "-f", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("bad-route.yaml"),
        "the file is not named: {err}"
    );
    assert!(
        err.contains("document 2"),
        "the document is not named: {err}"
    );
    assert!(
        err.contains("spec.rules[0].backends[0].weight"),
        "the field is not named: {err}"
    );

    assert_eq!(
        cp.cli_ok(&["history"]).await,
        history,
        "a version was added"
    );
    let payments = cp.cli(&["get", "service", "payments", "-n", "shop"]).await;
    assert!(
        !payments.status.success(),
        "the valid document of the refused file was stored: {}",
        stdout(&payments)
    );

    // Semantic errors too, and from stdin.
    let bad =
        SERVICE_8081_AND_ROUTE.replace("timeout: 2s", "timeout: 2s\n      retry: {attempts: 0}");
    let out = cp.apply_yaml(&bad).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.rules[0].retry.attempts"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        cp.cli_ok(&["history"]).await,
        history,
        "a version was added"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_delete_history_diff_and_rollback() {
    let cp = ControlPlane::start().await;
    let v1 = cp.apply_ok(SERVICE_8080).await;
    let v2 = cp.apply_ok(SERVICE_8081_AND_ROUTE).await;
    assert!(v2 > v1, "versions must grow: {v1} then {v2}");

    let yaml = cp
        .cli_ok(&["get", "service", "backend", "-n", "shop", "-o", "yaml"])
        .await;
    assert!(yaml.contains("8081") && !yaml.contains("8080"), "{yaml}");
    let json = cp
        .cli_ok(&["get", "service", "backend", "-n", "shop", "-o", "json"])
        .await;
    let json: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("-o json is not JSON ({e}): {json}"));
    assert!(json_has_number(&json, 8081), "{json}");
    let all = cp.cli_ok(&["get", "-A"]).await;
    assert!(all.contains("backend"), "{all}");
    let route = cp
        .cli_ok(&["get", "httproute", "backend", "-n", "shop", "-o", "yaml"])
        .await;
    assert!(route.contains("2s"), "{route}");

    cp.cli_ok(&["delete", "httproute", "backend", "-n", "shop"])
        .await;
    let gone = cp.cli(&["get", "httproute", "backend", "-n", "shop"]).await;
    assert!(!gone.status.success(), "a deleted route is still there");

    let history = cp.cli_ok(&["history"]).await;
    for v in [v1, v2] {
        assert!(
            contains_number(&history, v),
            "version {v} missing: {history}"
        );
    }
    let diff = cp.cli_ok(&["diff", &v1.to_string(), &v2.to_string()]).await;
    assert!(diff.contains("8080") && diff.contains("8081"), "{diff}");
    assert!(
        diff.contains("HTTPRoute") || diff.contains("httproute"),
        "{diff}"
    );

    let rolled = cp.cli_ok(&["rollback", &v1.to_string()]).await;
    let v4 = parse_version(&rolled).expect("rollback prints the new version");
    assert!(v4 > v2, "a rollback is a new version: {rolled}");
    let yaml = cp
        .cli_ok(&["get", "service", "backend", "-n", "shop", "-o", "yaml"])
        .await;
    assert!(yaml.contains("8080") && !yaml.contains("8081"), "{yaml}");
    let history = cp.cli_ok(&["history"]).await;
    assert!(contains_number(&history, v4), "{history}");
    // Nothing is forgotten: the rolled-back-from version still diffs.
    let diff = cp.cli_ok(&["diff", &v2.to_string(), &v4.to_string()]).await;
    assert!(diff.contains("8081"), "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_apply_survives_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_with(data.path()).await;
    let version = cp.apply_ok(SERVICE_8081_AND_ROUTE).await;
    cp.kill9();
    cp.restart().await;
    let history = cp.cli_ok(&["history"]).await;
    assert!(contains_number(&history, version), "{history}");
    let yaml = cp
        .cli_ok(&["get", "service", "backend", "-n", "shop", "-o", "yaml"])
        .await;
    assert!(yaml.contains("8081"), "{yaml}");
    cp.cli_ok(&["get", "httproute", "backend", "-n", "shop"])
        .await;
    // And the restarted server keeps working.
    let next = cp.apply_ok(SERVICE_8080).await;
    assert!(next > version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_subcommand() {
    for (binary, subcommands) in [
        (
            "remora-control",
            &[
                "serve", "apply", "get", "delete", "history", "rollback", "diff", "status",
                "token", "inject",
            ][..],
        ),
        ("remora-proxy", &["run", "init", "wait-ready"][..]),
    ] {
        let out = tokio::process::Command::new(bin(binary))
            .arg("--help")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{binary} --help failed");
        let help = stdout(&out);
        for sub in subcommands {
            assert!(
                help.lines()
                    .any(|l| l.split_whitespace().next() == Some(sub)),
                "`{binary} --help` does not list {sub}:\n{help}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_with_a_wrong_token_are_refused() {
    let cp = ControlPlane::start().await;
    cp.apply_ok(SERVICE_8080).await;
    let history = cp.cli_ok(&["history"]).await;

    // Everything the CLI reads from the data dir, except a wrong token (the store
    // itself stays with the server).
    let wrong = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(cp.data_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_file() && !name.to_string_lossy().ends_with(".redb") {
            std::fs::copy(entry.path(), wrong.path().join(&name)).unwrap();
        }
    }
    std::fs::write(wrong.path().join("admin.token"), "not-the-token\n").unwrap();

    for args in [
        &["get"][..],
        &["history"],
        &["status"],
        &["apply", "-f", "-"],
    ] {
        let stdin = (args[0] == "apply").then_some(SERVICE_8081_AND_ROUTE);
        let out = run_control(&cp.url(), wrong.path(), args, stdin).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "`{}` with a wrong token: stdout {} stderr {}",
            args.join(" "),
            stdout(&out),
            stderr(&out)
        );
        assert!(!stderr(&out).trim().is_empty(), "a refusal says why");
    }
    assert_eq!(cp.cli_ok(&["history"]).await, history);
    let yaml = cp
        .cli_ok(&["get", "service", "backend", "-n", "shop", "-o", "yaml"])
        .await;
    assert!(yaml.contains("8080"), "{yaml}");
}
