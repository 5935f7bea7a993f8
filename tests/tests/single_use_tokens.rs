//! Single-use, short-lived bootstrap tokens with real proxies (issue 13,
//! item 7). Slow (~50 s): a proxy started with a `--uses 1 --ttl 30s` token
//! and one-minute certificates becomes ready; a second proxy process started
//! with a copy of the same token gets nothing (`token used up`, counted on the
//! control plane); the first one renews its certificate at ~70% of the minute,
//! after the token is both used up and expired, because a renewal is
//! authenticated by the certificate it holds.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use remora_tests::*;

fn full_stderr(proxy: &mut Proxy) -> String {
    std::fs::read_to_string(proxy.process().log_dir().join("stderr")).unwrap_or_default()
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// A sample of the control plane's `/metrics`.
async fn control_metric(cp: &ControlPlane, sample: &str) -> f64 {
    let response = raw_http::get(cp.http_addr(), "/metrics")
        .await
        .expect("the control plane's /metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} on the control plane's /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_starts_one_proxy_which_keeps_renewing_its_certificate() {
    let cp = ControlPlane::start().await;
    let app = App::start("backend", "v1", Mode::Http).await;
    let token = cp
        .cli_ok(&[
            "token",
            "create",
            "--service",
            "backend",
            "--namespace",
            "shop",
            "--uses",
            "1",
            "--ttl",
            "30s",
        ])
        .await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.trim()).expect("writing the token");
    let opts = ProxyOpts::new("backend", "shop", app.port())
        .token_file(&token_file)
        .args(&["--cert-lifetime", "1m"]);

    let mut first = Proxy::start(&cp, opts.clone()).await;
    let first_expiry = first
        .metric("remora_cert_expiry_timestamp_seconds")
        .await
        .expect("a certificate expiry once ready");

    // Another process with a copy of the token gets no certificate.
    let mut second = Proxy::start_unready(&cp, opts).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !full_stderr(&mut second).contains("token used up") {
        assert!(
            Instant::now() < deadline,
            "the second proxy was not refused for a used-up token:\n{}",
            second.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(second.ready_status().await, Some(503));
    assert!(
        control_metric(
            &cp,
            "remora_control_certificates_refused_total{reason=\"token_used_up\"}"
        )
        .await
            >= 1.0
    );

    // The first renews at ~70% of its minute (~42 s), by which time the
    // token is used up and 30 s past its creation.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let expiry = first.metric("remora_cert_expiry_timestamp_seconds").await;
        if expiry.is_some_and(|e| e > first_expiry) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not renew its certificate (expiry still {expiry:?}):\n{}",
            first.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let expiry = first
        .metric("remora_cert_expiry_timestamp_seconds")
        .await
        .expect("an expiry");
    assert!(
        expiry > now_unix() + 30.0,
        "the renewed certificate expires at {expiry}"
    );
    assert_eq!(first.ready_status().await, Some(200));
    assert!(
        control_metric(&cp, "remora_control_certificates_renewed_total").await >= 1.0,
        "the renewal was not authenticated by the certificate"
    );
    let logs = full_stderr(&mut first);
    assert!(
        logs.matches("certificate installed").count() >= 2,
        "{}",
        first.logs()
    );
    assert!(!logs.contains("renewal failed"), "{}", first.logs());
    // Still refused for anyone else.
    assert_eq!(second.ready_status().await, Some(503));
}
