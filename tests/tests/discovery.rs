//! Endpoints follow the instances: one that joins gets traffic within a second
//! of being ready, one that leaves gracefully stops getting traffic without a
//! failed request, one killed disappears within two seconds; the mesh keeps
//! serving while the control plane is down and finds its state again after a
//! restart; a proxy that never reached its control plane is not ready.

use std::time::Duration;

use http::StatusCode;
use remora_tests::*;
use tokio::time::Instant;

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
---
# These tests are about endpoints joining and leaving: spread requests evenly
# so every instance is seen serving (P2C would rightly favour the faster one).
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  loadBalancer: round-robin
"#;

/// `x-version: v3` selects the v3 subset; everything else goes to v1.
const V3_ROUTE: &str = r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - matches: [{headers: [{name: x-version, value: v3}]}]
      backends: [{service: backend, subset: {version: v3}}]
    - backends: [{service: backend, subset: {version: v1}}]
"#;

const URL: &str = "http://backend.shop:8080/api/orders";

/// An instance of `backend` whose app answers as `APP_NAME/VERSION`.
async fn backend(cp: &ControlPlane, app_name: &str, version: &str) -> Sidecar {
    let app = App::start(app_name, version, Mode::Http).await;
    let opts = ProxyOpts::new("backend", "shop", app.port()).label("version", version);
    Sidecar::start_with(cp, app, opts).await
}

/// Two v1 instances (`backend-a`, `backend-b`) and a frontend, both instances
/// seen answering.
async fn two_instances(cp: &ControlPlane) -> (Sidecar, Sidecar, Sidecar, HttpClient) {
    cp.apply_ok(SHOP).await;
    let a = backend(cp, "backend-a", "v1").await;
    let b = backend(cp, "backend-b", "v1").await;
    let frontend = Sidecar::start(cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend-a/v1").await;
    wait_served(&client, URL, &[], "backend-b/v1").await;
    (a, b, frontend, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_gets_traffic_within_1s_of_ready() {
    let cp = ControlPlane::start().await;
    cp.apply_ok(&format!("{SHOP}---{V3_ROUTE}")).await;
    let _v1 = backend(&cp, "backend", "v1").await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;

    let v3_header = [("x-version", "v3")];
    let before = client.get_with(URL, &v3_header).await;
    assert_eq!(before.status, StatusCode::SERVICE_UNAVAILABLE, "no v3 yet");
    assert_eq!(before.header("x-remora-error"), Some("no-endpoints"));

    let app = App::start("backend", "v3", Mode::Http).await;
    let opts = ProxyOpts::new("backend", "shop", app.port()).label("version", "v3");
    let mut v3 = Proxy::start_unready(&cp, opts).await;
    v3.wait_ready().await;
    let ready = Instant::now();
    let mut last: String;
    loop {
        match client.try_get(URL, &v3_header).await {
            Ok(r) if r.served_by() == Some("backend/v3") => break,
            Ok(r) => last = format!("{} {:?}", r.status, r.header("x-remora-error")),
            Err(e) => last = e,
        }
        assert!(
            ready.elapsed() < Duration::from_secs(1),
            "v3 got no request within 1 s of being ready (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And it keeps getting them.
    for _ in 0..10 {
        let r = client.get_with(URL, &v3_header).await;
        assert_eq!(r.served_by(), Some("backend/v3"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_leaving_instance_loses_traffic_without_a_failed_request() {
    let cp = ControlPlane::start().await;
    let (_a, b, _frontend, client) = two_instances(&cp).await;

    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.proxy.sigterm();
    let sigterm = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_served_at_1s = b.app.requests_served().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = requests.stop().await;
    let b_served_at_end = b.app.requests_served().await;

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while an instance left, first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let to_b = |o: &&Outcome| o.result.as_deref() == Ok("backend-b/v1");
    assert!(
        outcomes
            .iter()
            .filter(|o| o.sent < sigterm)
            .any(|o| to_b(&o)),
        "backend-b got no traffic before SIGTERM, so the test proves nothing"
    );
    let late: Vec<_> = outcomes
        .iter()
        .filter(|o| o.sent >= sigterm + Duration::from_secs(1))
        .collect();
    assert!(late.len() > 20, "too few requests after the drain window");
    assert!(
        !late.iter().any(to_b),
        "backend-b still got requests more than 1 s after SIGTERM"
    );
    assert_eq!(
        b_served_at_1s, b_served_at_end,
        "backend-b's app served requests more than 1 s after its proxy got SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_disappears_from_status_and_routing_within_2s() {
    let cp = ControlPlane::start().await;
    let (a, mut b, _frontend, client) = two_instances(&cp).await;
    let b_addr = b.proxy.inbound();
    let status = cp.status().await;
    assert!(
        status.proxy(b_addr).is_some() && status.proxy(a.proxy.inbound()).is_some(),
        "`remora-control status` does not list both instances:\n{}",
        status.text
    );

    b.proxy.kill9();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(2),
        "the killed instance to leave `status`",
        || async { cp.status().await.proxy(b_addr).is_none().then_some(()) },
    )
    .await;
    // Whatever the client's proxy tried meanwhile, from 2 s on it routes around b.
    tokio::time::sleep((killed + Duration::from_secs(2)).saturating_duration_since(Instant::now()))
        .await;
    let b_served = b.app.requests_served().await;
    for i in 0..20 {
        let r = client
            .try_get(URL, &[])
            .await
            .unwrap_or_else(|e| panic!("request {i} 2 s after the kill: {e}"));
        assert_eq!(r.status, StatusCode::OK, "request {i} 2 s after the kill");
        assert_eq!(r.served_by(), Some("backend-a/v1"));
    }
    assert_eq!(b.app.requests_served().await, b_served);
    assert!(cp.status().await.proxy(a.proxy.inbound()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_control_plane_loss_and_a_restart_restores_its_state() {
    let data = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_with(data.path()).await;
    cp.apply_ok(SHOP).await;
    let version = cp.apply_ok(V3_ROUTE).await;
    let backend = backend(&cp, "backend", "v1").await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let client = http1_via_proxy(frontend.proxy.outbound());
    wait_served(&client, URL, &[], "backend/v1").await;
    let history = cp.cli_ok(&["history"]).await;
    let documents = cp.cli_ok(&["get", "-A", "-o", "yaml"]).await;
    assert!(contains_number(&history, version), "{history}");

    let requests = RequestLoop::start(client.clone(), URL, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(200)).await;
    cp.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes = requests.stop().await;
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while the control plane was down, first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let proxies = [&backend.proxy, &frontend.proxy];
    for p in proxies {
        assert_eq!(p.ready_status().await, Some(200), "a proxy lost readiness");
    }

    cp.restart().await;
    assert_eq!(cp.cli_ok(&["history"]).await, history, "history changed");
    assert_eq!(cp.cli_ok(&["get", "-A", "-o", "yaml"]).await, documents);

    // Every proxy reconnects, registers again and acks the current snapshot.
    for p in proxies {
        let addr = p.inbound();
        eventually(
            Duration::from_secs(10),
            &format!("the proxy at {addr} to ack the current snapshot in `status`"),
            || async {
                let status = cp.status().await;
                let row = status.proxy(addr)?;
                let current = status.snapshot_version.as_deref()?;
                (row.registered() && row.acked() == current).then_some(())
            },
        )
        .await;
    }
    let reply = client.get(URL).await;
    assert_eq!(reply.served_by(), Some("backend/v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_reached_its_control_plane_is_not_ready() {
    let app = App::start("backend", "v1", Mode::Http).await;
    // Nothing listens there.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let files = tempfile::tempdir().unwrap();
    let opts = unused_identity(ProxyOpts::new("backend", "shop", app.port()), files.path());
    let mut proxy = Proxy::spawn(&nowhere, opts);
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < Duration::from_secs(3) {
        assert!(
            proxy.process().running(),
            "the proxy exited without a control plane\n{}",
            proxy.logs()
        );
        if let Some(status) = proxy.ready_status().await {
            answers.push(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answers.contains(&503),
        "/ready never answered 503 (answers: {answers:?})"
    );
    assert!(
        answers.iter().all(|s| *s == 503),
        "/ready answered {answers:?} without a control plane"
    );
    let live = remora_examples::probe::get_status(proxy.health(), "/live", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        live, 200,
        "/live is about the process, not the control plane"
    );
}
