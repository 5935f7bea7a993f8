//! The `remora-control` binary as an operator runs it, against an in-process
//! control plane: output, exit codes and error messages.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_history_diff_rollback_and_status() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    // A bare host:port works as --server; the token comes from --data-dir.
    let server = running.grpc_addr.to_string();
    let data_dir = dir_arg(data.path());
    let base = ["--server", server.as_str(), "--data-dir", data_dir.as_str()];
    let cli = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run_cli = |extra: &[&str], stdin: Option<&'static str>| {
        let args = cli(extra);
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&refs, stdin).await
        }
    };

    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("1-service.yaml"), SERVICE).unwrap();
    std::fs::write(policies.path().join("2-route.yml"), ROUTE).unwrap();
    std::fs::write(policies.path().join("README.md"), "not policy").unwrap();
    let policy_dir = dir_arg(policies.path());

    let out = run_cli(&["apply", "--dry-run", "-f", &policy_dir], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("dry run: valid, would change version 0\n"),
        "{}",
        out.stdout
    );

    let out = run_cli(&["apply", "-f", &policy_dir], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "applied version 1\nService/shop/backend created\nHTTPRoute/shop/backend created\n"
    );

    let out = run_cli(&["apply", "-f", "-"], Some(SERVICE)).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "unchanged at version 1\nService/shop/backend unchanged\n"
    );

    let bad: &'static str = Box::leak(ROUTE.replace("weight: 10", "weight: many").into_boxed_str());
    let out = run_cli(&["apply", "-f", "-"], Some(bad)).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with(
            "error: apply refused: <stdin>: document 1 (HTTPRoute shop/backend): spec.rules"
        ),
        "{}",
        out.stderr
    );

    let out = run_cli(&["get", "-A"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["KIND", "NAMESPACE", "NAME"]
    );
    assert_eq!(lines.len(), 3);

    let out = run_cli(
        &["get", "route", "backend", "-n", "shop", "-o", "json"],
        None,
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let docs: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(docs[0]["kind"], "HTTPRoute");
    assert_eq!(docs[0]["apiVersion"], "remora.dev/v1");
    assert_eq!(docs[0]["spec"]["rules"][0]["timeout"], "2s");

    let out = run_cli(&["get", "-A", "-o", "yaml"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.matches("\n---\n").count(), 1, "{}", out.stdout);

    let out = run_cli(&["get", "svc", "nope"], None).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    let out = run_cli(&["delete", "route", "backend", "-n", "shop"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "applied version 2\nHTTPRoute/shop/backend deleted\n"
    );

    let out = run_cli(&["delete", "route", "backend"], None).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("HTTPRoute/default/backend not found"),
        "{}",
        out.stderr
    );

    let out = run_cli(&["history"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("delete"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().count(), 3);

    let out = run_cli(&["diff", "1", "2"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("-kind: HTTPRoute"), "{}", out.stdout);

    let out = run_cli(&["rollback", "1"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("rolled back to version 1 as version 3\n"),
        "{}",
        out.stdout
    );

    let out = run_cli(&["rollback", "9"], None).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("version 9 does not exist"),
        "{}",
        out.stderr
    );

    let out = run_cli(&["status"], None).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("policy version 3 (snapshot 3."),
        "{}",
        out.stdout
    );

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_with_exit_1() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let url = url(&running);
    let ca_file = running.ca_file.display().to_string();
    let out = run(
        &[
            "status",
            "--server",
            &url,
            "--ca-file",
            &ca_file,
            "--admin-token",
            "wrong",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("refused the admin token"),
        "{}",
        out.stderr
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = format!("127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let root = remora_control::ca::generate_root("cluster.local", 0).unwrap();
    let ca_file = data.path().join("bundle.pem");
    std::fs::write(&ca_file, remora_control::pem::cert_pem(&root.cert)).unwrap();
    let ca_file = dir_arg(&ca_file);
    let out = run(
        &[
            "status",
            "--server",
            &server,
            "--ca-file",
            &ca_file,
            "--admin-token",
            "t",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.starts_with(&format!(
            "error: cannot reach the control plane at https://{server}: "
        )),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn usage_errors_exit_2_and_help_lists_every_command() {
    assert_eq!(run(&["frobnicate"], None).await.code, 2);
    assert_eq!(run(&["get", "-o", "xml"], None).await.code, 2);
    let help = run(&["--help"], None).await;
    assert_eq!(help.code, 0);
    for cmd in [
        "serve", "apply", "get", "delete", "history", "diff", "rollback", "status", "token", "ca",
    ] {
        assert!(
            help.stdout.contains(cmd),
            "{cmd} missing in {}",
            help.stdout
        );
    }
}

#[tokio::test]
async fn a_missing_token_file_says_how_to_pass_one() {
    let empty = tempfile::tempdir().unwrap();
    let dir = dir_arg(empty.path());
    let out = run(&["history", "--data-dir", &dir], None).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no admin token"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_delete_both_default_to_namespace_default() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let server = running.grpc_addr.to_string();
    let data_dir = dir_arg(data.path());
    let cli = |extra: &[&str]| {
        let args: Vec<String> = ["--server", server.as_str(), "--data-dir", data_dir.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&refs, None).await
        }
    };
    // The table's rows (without the header), sorted.
    let rows = |stdout: &str| -> Vec<Vec<String>> {
        let mut rows: Vec<Vec<String>> = stdout
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect();
        rows.sort();
        rows
    };
    let row = |kind: &str, ns: &str, name: &str| vec![kind.to_string(), ns.into(), name.into()];

    let policies = tempfile::tempdir().unwrap();
    let in_default = SERVICE.replace("namespace: shop", "namespace: default");
    let route_in_default = ROUTE.replace("namespace: shop", "namespace: default");
    std::fs::write(
        policies.path().join("all.yaml"),
        format!("{SERVICE}---\n{ROUTE}---\n{in_default}---\n{route_in_default}"),
    )
    .unwrap();
    let out = cli(&["apply", "-f", &dir_arg(policies.path())]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    // get: namespace default, -n NS, or -A / --all-namespaces.
    let out = cli(&["get"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        rows(&out.stdout),
        [
            row("HTTPRoute", "default", "backend"),
            row("Service", "default", "backend")
        ]
    );
    let out = cli(&["get", "-n", "shop"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        rows(&out.stdout).iter().all(|r| r[1] == "shop"),
        "{}",
        out.stdout
    );
    assert_eq!(rows(&out.stdout).len(), 2, "{}", out.stdout);
    for all in ["-A", "--all-namespaces"] {
        let out = cli(&["get", all]).await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(rows(&out.stdout).len(), 4, "{}", out.stdout);
    }
    assert_eq!(cli(&["get", "-A", "-n", "shop"]).await.code, 2);

    // delete: what `get` shows is what `delete` removes, with the same flags.
    let out = cli(&["get", "route", "backend"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(rows(&out.stdout), [row("HTTPRoute", "default", "backend")]);
    let out = cli(&["delete", "route", "backend"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "applied version 2\nHTTPRoute/default/backend deleted\n"
    );
    let out = cli(&["get", "route", "backend"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with("error: route backend in namespace default not found at version 2"),
        "{}",
        out.stderr
    );
    let out = cli(&["get", "route", "backend", "-A"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(rows(&out.stdout), [row("HTTPRoute", "shop", "backend")]);
    let out = cli(&["delete", "route", "backend", "-n", "shop"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);

    // An empty namespace says which one it looked in.
    let out = cli(&["get", "route"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains("no resources found in namespace default at version 3"),
        "{}",
        out.stderr
    );
    running.shutdown().await.unwrap();
}
