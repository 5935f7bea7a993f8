//! Startup and shutdown order for platforms without native sidecars:
//! `remora-proxy wait-ready` blocks an app's entrypoint until the local proxy
//! is ready, and gives up (exit 1) when it never becomes ready.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use remora_tests::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

async fn wait_ready(
    health: std::net::SocketAddr,
    timeout: &str,
) -> (std::process::ExitStatus, String, Duration) {
    let start = Instant::now();
    let out = tokio::process::Command::new(bin("remora-proxy"))
        .args([
            "wait-ready",
            "--health",
            &health.to_string(),
            "--timeout",
            timeout,
        ])
        .env_remove("REMORA_HEALTH_ADDR")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running remora-proxy wait-ready");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_returns_once_the_proxy_is_ready() {
    let cp = ControlPlane::start().await;
    let app = App::start("backend", "v1", Mode::Http).await;
    // Started without waiting: wait-ready is what waits.
    let proxy = Proxy::start_unready(&cp, ProxyOpts::new("backend", "shop", app.port())).await;
    let (status, stderr, _) = wait_ready(proxy.health(), "20s").await;
    assert!(
        status.success(),
        "wait-ready failed: {stderr}\n{}",
        proxy.logs()
    );
    // It returned because the proxy is ready, not by accident.
    assert_eq!(proxy.ready_status().await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_gives_up_on_a_proxy_that_never_gets_ready() {
    let app = App::start("backend", "v1", Mode::Http).await;
    // No control plane there: no certificate, no snapshot, never ready.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let files = tempfile::tempdir().unwrap();
    let opts = unused_identity(ProxyOpts::new("backend", "shop", app.port()), files.path());
    let proxy = Proxy::spawn(&nowhere, opts);
    let (status, stderr, took) = wait_ready(proxy.health(), "1500ms").await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not ready"), "{stderr}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
    // And with nothing listening at all.
    let (status, _, _) = wait_ready(
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        "300ms",
    )
    .await;
    assert_eq!(status.code(), Some(1));
}
