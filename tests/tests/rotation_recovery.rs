//! Issue 14, items 2 and 3: a root rotation never locks a proxy out for
//! good, and neither a revoked workload nor an absent one keeps it from
//! finishing.
//!
//! - A proxy that is away during `ca rotate` (stopped with SIGSTOP, so its
//!   discovery stream dies, as in a network partition) keeps the old root
//!   trusted while its certificate is in use; when it comes back it
//!   reconnects with that certificate, renews from the new root and serves
//!   again, and only then is the old root retired.
//! - The same when the control plane was restarted just before the rotation
//!   and the proxy had not reconnected yet.
//! - `ca rotate --finish` retires the old root at once and names who was left
//!   behind; such a proxy is not `/ready` while it cannot get a certificate
//!   the mesh trusts (its single-use token is spent), and recovers on its own
//!   once it can (a new token in its token file).
//! - A workload whose token was revoked cannot renew; the rotation finishes
//!   without it, and then it is not ready.
//!
//! Each test waits for the control plane to notice a stopped proxy (HTTP/2
//! keep-alive, about 10 s): about 30 s each.

use std::time::Duration;

use remora_tests::*;

const SHOP: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: frontend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
"#;

const URL: &str = "http://backend.shop:8080/api/orders";

async fn shop() -> ControlPlane {
    let cp = ControlPlane::start().await;
    cp.apply_ok(SHOP).await;
    cp
}

/// A process stopped with SIGSTOP until this is dropped (SIGCONT).
struct Stopped(u32);

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {sig} {pid}");
}

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// `ca rotate`; the new signer's short id (as `status` shows it).
async fn rotate(cp: &ControlPlane) -> String {
    let out = cp.cli_ok(&["ca", "rotate"]).await;
    let signer = out
        .split("new signer ")
        .nth(1)
        .and_then(|s| s.split([',', ' ', '\n']).next())
        .unwrap_or_else(|| panic!("no new signer in the answer to `ca rotate`: {out}"));
    signer[..12].to_owned()
}

fn rotating(status: &Status) -> bool {
    status.text.contains("root rotation in progress")
}

/// Waits until `service`'s proxy is connected and reports a certificate
/// from `signer`.
async fn on_signer(cp: &ControlPlane, service: &str, signer: &str) {
    eventually(
        Duration::from_secs(60),
        &format!("{service}'s proxy to run a certificate from {signer}"),
        || async {
            let status = cp.status().await;
            status
                .proxies
                .iter()
                .any(|p| p.cell("SERVICE") == service && p.cell("SIGNER") == signer)
                .then_some(())
        },
    )
    .await;
}

/// Waits until only `service`'s proxy is connected.
async fn only(cp: &ControlPlane, service: &str) {
    eventually(
        Duration::from_secs(40),
        &format!("the control plane to see only {service}'s proxy"),
        || async {
            let status = cp.status().await;
            (status.proxies.len() == 1 && status.proxies[0].cell("SERVICE") == service)
                .then_some(())
        },
    )
    .await;
}

/// Waits for the rotation to finish on its own.
async fn rotation_finishes(cp: &ControlPlane) {
    eventually(
        Duration::from_secs(60),
        "the root rotation to finish",
        || async { (!rotating(&cp.status().await)).then_some(()) },
    )
    .await;
}

/// Stays in progress for a few seconds once every connected proxy moved.
async fn still_rotating(cp: &ControlPlane, why: &str) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cp.status().await;
    assert!(
        rotating(&status),
        "the old root was retired although {why}:\n{}",
        status.text
    );
    assert!(
        status
            .text
            .contains("spiffe://cluster.local/ns/shop/sa/backend"),
        "status does not name the certificate the rotation waits for:\n{}",
        status.text
    );
}

async fn token_file(
    cp: &ControlPlane,
    dir: &std::path::Path,
    extra: &[&str],
) -> (String, std::path::PathBuf) {
    let mut args = vec![
        "token",
        "create",
        "--service",
        "backend",
        "--namespace",
        "shop",
    ];
    args.extend_from_slice(extra);
    let token = cp.cli_ok(&args).await.trim().to_owned();
    let path = dir.join("token");
    std::fs::write(&path, &token).unwrap();
    (token, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_away_during_ca_rotate_reconnects_and_serves_again() {
    let cp = shop().await;
    let backend = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;

    let away = Stopped::new(backend.proxy.pid());
    only(&cp, "frontend").await;
    let signer = rotate(&cp).await;
    on_signer(&cp, "frontend", &signer).await;
    still_rotating(&cp, "the backend, away, still holds a certificate from it").await;

    drop(away);
    on_signer(&cp, "backend", &signer).await;
    rotation_finishes(&cp).await;
    wait_served(&client, URL, &[], "backend/v1").await;
    assert_eq!(backend.proxy.ready_status().await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_by_a_control_plane_restart_just_before_ca_rotate_catches_up() {
    let mut cp = shop().await;
    let backend = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;

    let away = Stopped::new(backend.proxy.pid());
    cp.restart().await;
    // The frontend is back first; the rotation starts before the backend is.
    only(&cp, "frontend").await;
    let signer = rotate(&cp).await;
    on_signer(&cp, "frontend", &signer).await;
    still_rotating(&cp, "the backend is not back yet").await;

    drop(away);
    on_signer(&cp, "backend", &signer).await;
    rotation_finishes(&cp).await;
    wait_served(&client, URL, &[], "backend/v1").await;
    assert_eq!(backend.proxy.ready_status().await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_left_behind_by_ca_rotate_finish_is_not_ready_until_it_bootstraps_again() {
    let cp = shop().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = token_file(&cp, dir.path(), &["--uses", "1"]).await;
    let app = App::start("backend", "v1", Mode::Http).await;
    let opts = ProxyOpts::new("backend", "shop", app.port())
        .label("version", "v1")
        .token_file(&path);
    let mut backend = Sidecar::start_with(&cp, app, opts).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;

    let away = Stopped::new(backend.proxy.pid());
    only(&cp, "frontend").await;
    let signer = rotate(&cp).await;
    on_signer(&cp, "frontend", &signer).await;
    let finish = cp.cli(&["ca", "rotate", "--finish"]).await;
    let warning = String::from_utf8_lossy(&finish.stderr).into_owned();
    assert!(finish.status.success(), "{warning}");
    assert!(
        warning.contains("warning: 1 certificate(s) from the retired root were still in use")
            && warning.contains("spiffe://cluster.local/ns/shop/sa/backend"),
        "{warning}"
    );
    assert!(!rotating(&cp.status().await));

    // Back, with a certificate from the retired root and a spent token: it
    // cannot be part of the mesh, so it must not say it is ready.
    drop(away);
    eventually(
        Duration::from_secs(40),
        "the backend proxy to stop reporting ready",
        || async { (backend.proxy.ready_status().await != Some(200)).then_some(()) },
    )
    .await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let ready = backend.proxy.ready_status().await;
        assert_ne!(
            ready,
            Some(200),
            "ready without a trusted certificate\n{}",
            backend.proxy.logs()
        );
    }
    let logs = std::fs::read_to_string(backend.proxy.process().log_dir().join("stderr"))
        .unwrap_or_default();
    assert!(
        logs.contains("the control plane refuses this workload's certificate")
            && logs.contains("token used up"),
        "{}",
        backend.proxy.logs()
    );

    // A new token in its token file: it bootstraps again on its own.
    token_file(&cp, dir.path(), &[]).await;
    eventually(
        Duration::from_secs(60),
        "the backend proxy to bootstrap again and be ready",
        || async { (backend.proxy.ready_status().await == Some(200)).then_some(()) },
    )
    .await;
    on_signer(&cp, "backend", &signer).await;
    wait_served(&client, URL, &[], "backend/v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_workload_does_not_hold_ca_rotate() {
    let cp = shop().await;
    let dir = tempfile::tempdir().unwrap();
    let (token, path) = token_file(&cp, dir.path(), &[]).await;
    let app = App::start("backend", "v1", Mode::Http).await;
    let opts = ProxyOpts::new("backend", "shop", app.port())
        .label("version", "v1")
        .token_file(&path);
    let backend = Sidecar::start_with(&cp, app, opts).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;

    let id = token.split_once('.').unwrap().0;
    cp.cli_ok(&["token", "revoke", id]).await;
    // The revoked workload keeps serving on its certificate meanwhile.
    wait_served(&client, URL, &[], "backend/v1").await;
    let signer = rotate(&cp).await;
    on_signer(&cp, "frontend", &signer).await;
    rotation_finishes(&cp).await;
    // Its certificate's root is retired: it is out of the mesh, and says so.
    eventually(
        Duration::from_secs(20),
        "the revoked backend to stop reporting ready",
        || async { (backend.proxy.ready_status().await != Some(200)).then_some(()) },
    )
    .await;
}
