//! Where the CLI's output goes: a reader that stops early (`| head -1`) ends
//! the command quietly with exit 0; any other write error (a full disk) is an
//! error message and exit 1; never a panic.

mod common;

use common::*;
use std::io::BufRead as _;
use std::process::{Command, Stdio};

/// More output than a pipe holds (64 KiB on Linux), so the command is still
/// writing when the reader goes away.
const DEPLOYMENTS: usize = 300;
const SERVICES: usize = 2000;

fn deployments() -> String {
    let mut manifest = String::new();
    for i in 0..DEPLOYMENTS {
        manifest.push_str(&format!(
            "---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app-{i}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: app-{i}}}}}
  template:
    metadata: {{labels: {{app: app-{i}}}}}
    spec:
      containers: [{{name: app, image: example/app:1}}]
"
        ));
    }
    manifest
}

fn services() -> String {
    let mut policy = String::new();
    for i in 0..SERVICES {
        policy.push_str(&format!(
            "---
apiVersion: remora.dev/v1
kind: Service
metadata: {{name: a-service-with-a-rather-long-name-{i:05}, namespace: shop}}
spec:
  ports: [{{port: 8080, protocol: http}}]
"
        ));
    }
    policy
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remora-control"));
    cmd.args(args)
        .env_remove("REMORA_CONTROL_PLANE")
        .env_remove("REMORA_ADMIN_TOKEN")
        .env_remove("REMORA_DATA_DIR")
        .env_remove("REMORA_CA_FILE")
        .env_remove("REMORA_SERVER_NAME")
        .env_remove("REMORA_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the binary like `... | head -n LINES`: reads `lines` lines of its
/// stdout, closes the pipe and waits. The exit code, the lines read and stderr.
fn run_until_reader_closes(args: &[&str], lines: usize) -> (Option<i32>, Vec<String>, String) {
    let mut child = command(args).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    let mut read = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        read.push(line);
    }
    drop(reader);
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        read,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the binary with its stdout on /dev/full (every write: ENOSPC).
fn run_into_dev_full(args: &[&str]) -> (Option<i32>, String) {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let output = command(args).stdout(full).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn inject_into_a_reader_that_stops_after_one_line_exits_0_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("many.yaml");
    std::fs::write(&manifest, deployments()).unwrap();
    let manifest = dir_arg(&manifest);
    // The whole output, for comparison: far more than a pipe holds.
    let whole = command(&["inject", "-f", &manifest])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(whole.status.code(), Some(0));
    assert!(whole.stdout.len() > 256 * 1024, "{}", whole.stdout.len());

    let (code, lines, stderr) = run_until_reader_closes(&["inject", "-f", &manifest], 1);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
    let first = String::from_utf8_lossy(&whole.stdout);
    assert_eq!(Some(lines[0].as_str()), first.split_inclusive('\n').next());
}

#[test]
fn inject_into_a_full_disk_exits_1_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("many.yaml");
    std::fs::write(&manifest, deployments()).unwrap();
    let (code, stderr) = run_into_dev_full(&["inject", "-f", &dir_arg(&manifest)]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: cannot write the output: ")
            && stderr.contains("No space left on device"),
        "stderr: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_dry_run_into_a_reader_that_stops_after_two_lines_exits_0_quietly() {
    let data = tempfile::tempdir().unwrap();
    let running = start_in(data.path()).await;
    let policy = data.path().join("many-services.yaml");
    std::fs::write(&policy, services()).unwrap();
    let args: Vec<String> = [
        "--server",
        &running.grpc_addr.to_string(),
        "--data-dir",
        &dir_arg(data.path()),
        "apply",
        "--dry-run",
        "-f",
        &dir_arg(&policy),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    let (code, lines, stderr) = tokio::task::spawn_blocking({
        let args = args.clone();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_until_reader_closes(&args, 2)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
    assert_eq!(
        lines,
        [
            "dry run: valid, would change version 0\n",
            "Service/shop/a-service-with-a-rather-long-name-00000 created\n"
        ]
    );

    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_into_dev_full(&args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: cannot write the output: ") && !stderr.contains("panicked"),
        "stderr: {stderr}"
    );
    running.shutdown().await.unwrap();
}
