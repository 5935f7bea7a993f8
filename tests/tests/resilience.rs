//! Issue 4 end to end: the resilience policies of `HTTPRoute`,
//! `DestinationPolicy` and `AuthorizationPolicy.rateLimit`, exercised through
//! real proxies against sample apps whose faults the test controls
//! (`/control/fail`, `/control/slow`, `/control/reset`, or no app at all).
//!
//! Every test has its own control plane and ports. Timing assertions leave
//! room for a loaded two-core machine; each bound is named where it is made.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use remora_proto::examples::EchoRequest;
use remora_tests::faults::*;
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
"#;

const BACKEND: &str = "http://backend.shop:8080";

/// Tests that compare latencies run alone: every other test of this file
/// holds this lock shared, and they hold it exclusively, so what they measure
/// is the proxy, not the tests running beside them on a two-core machine.
static QUIET: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A control plane with `policy` applied (after the two services), then the
/// backend (v1) and the frontend whose outbound listener the tests call.
struct Shop {
    cp: ControlPlane,
    backend: Sidecar,
    frontend: Sidecar,
    /// When the frontend's proxy was started (its destinations' budgets and
    /// buckets are younger than this).
    started: Instant,
}

impl Shop {
    async fn start(policy: &str) -> Shop {
        let cp = ControlPlane::start().await;
        cp.apply_ok(&format!("{SHOP}---{policy}")).await;
        let backend = Sidecar::start(&cp, "shop", "backend", "v1", Mode::Http).await;
        let started = Instant::now();
        let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
        Shop {
            cp,
            backend,
            frontend,
            started,
        }
    }

    fn client(&self) -> HttpClient {
        http1_via_proxy(self.frontend.proxy.outbound())
    }

    fn proxy(&self) -> &Proxy {
        &self.frontend.proxy
    }

    async fn served(&self) -> u64 {
        self.backend.app.requests_served().await
    }
}

/// `GET url` until the app `served_by` answers 2xx; how many requests that took
/// (every one of them counts against the destination's budget).
async fn warm_up(client: &HttpClient, url: &str, served_by: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    loop {
        sent += 1;
        match client.try_get(url, &[]).await {
            Ok(r) if r.status.is_success() && r.served_by() == Some(served_by) => return sent,
            other => assert!(
                Instant::now() < deadline,
                "{url} was never served by {served_by}; last answer: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request with `body` and `method` through `client`.
async fn send_body(client: &HttpClient, method: Method, url: &str, body: Vec<u8>) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(full(body))
        .unwrap();
    client
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// `remora_retries_total` of one route of backend.shop.
async fn retries(proxy: &Proxy, route: &str) -> f64 {
    metric_sum(
        proxy,
        "remora_retries_total",
        &[("service", "backend.shop"), ("route", route)],
    )
    .await
}

/// `remora_circuit_breaker_open` of the endpoint `endpoint` of `service`.
async fn breaker_gauge(proxy: &Proxy, service: &str, endpoint: SocketAddr) -> f64 {
    metric_sum(
        proxy,
        "remora_circuit_breaker_open",
        &[("service", service), ("endpoint", &endpoint.to_string())],
    )
    .await
}

fn remora_error(reply: &Reply) -> Option<&str> {
    reply.header("x-remora-error")
}

// ------------------------------------------------------------------ retries

const RETRY_ROUTE: &str = r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - name: strict
      matches: [{path: {prefix: /strict}}]
      backends: [{service: backend}]
      retry: {attempts: 2, on: [5xx], backoff: {base: 10ms, max: 50ms}}
    - name: retry
      backends: [{service: backend}]
      retry: {attempts: 2, on: [5xx], backoff: {base: 10ms, max: 50ms}, allowNonIdempotent: true}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_succeeds_on_the_third_attempt_and_a_large_body_is_never_replayed() {
    let _quiet = QUIET.read().await;
    let shop = Shop::start(RETRY_ROUTE).await;
    let client = shop.client();
    let url = format!("{BACKEND}/api/orders");
    warm_up(&client, &url, "backend/v1").await;
    assert_eq!(retries(shop.proxy(), "retry").await, 0.0);

    // Two failures, then success: the client sees only the success.
    let before = shop.served().await;
    fail_next(&shop.backend.app, 2, 503).await;
    let reply = client.get(&url).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.served_by(), Some("backend/v1"));
    assert_eq!(
        shop.served().await - before,
        3,
        "three attempts reached the app"
    );
    assert_eq!(
        retries(shop.proxy(), "retry").await,
        2.0,
        "both failed attempts are counted in remora_retries_total"
    );

    // A POST with a small body is replayed (this route allows non-idempotent
    // retries)...
    let before = shop.served().await;
    fail_next(&shop.backend.app, 1, 503).await;
    let reply = send_body(&client, Method::POST, &url, vec![b's'; 1024]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.json()["body_bytes"],
        1024,
        "the replayed body is whole"
    );
    assert_eq!(shop.served().await - before, 2);
    assert_eq!(retries(shop.proxy(), "retry").await, 3.0);

    // ...but one with 1 MiB, beyond the replay buffer, is sent once: the
    // client gets the upstream's 503.
    let before = shop.served().await;
    fail_next(&shop.backend.app, 1, 503).await;
    let reply = send_body(&client, Method::POST, &url, vec![b'L'; 1 << 20]).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the 1 MiB POST was answered {} (x-remora-error {:?}): {:?}",
        reply.status,
        remora_error(&reply),
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.served_by(), Some("backend/v1"), "the app's own 503");
    assert_eq!(
        shop.served().await - before,
        1,
        "the 1 MiB POST reached the app exactly once"
    );
    assert_eq!(
        retries(shop.proxy(), "retry").await,
        3.0,
        "no retry counted"
    );

    // A connection the upstream closes without an answer is retried too.
    let before = shop.served().await;
    reset_next(&shop.backend.app, 1).await;
    let reply = client.get(&url).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(shop.served().await - before, 2);
    assert_eq!(app_stats(&shop.backend.app).await["reset"], 1);
    assert_eq!(retries(shop.proxy(), "retry").await, 4.0);

    // Without allowNonIdempotent, a POST that reached the app is not retried
    // (a GET on the same route is).
    let strict = format!("{BACKEND}/strict/orders");
    let before = shop.served().await;
    fail_next(&shop.backend.app, 1, 503).await;
    let reply = send_body(&client, Method::POST, &strict, b"small".to_vec()).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shop.served().await - before, 1);
    fail_next(&shop.backend.app, 1, 503).await;
    assert_eq!(client.get(&strict).await.status, StatusCode::OK);
    assert_eq!(shop.served().await - before, 3);
    assert_eq!(retries(shop.proxy(), "strict").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_against_an_always_failing_upstream_stay_within_the_budget() {
    let _quiet = QUIET.read().await;
    const RATIO: f64 = 0.2;
    const MIN_PER_SECOND: f64 = 5.0;
    let policy = format!(
        "{RETRY_ROUTE}---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {{name: backend, namespace: shop}}
spec:
  service: backend
  retryBudget: {{ratio: {RATIO}, minPerSecond: {MIN_PER_SECOND}}}
"
    );
    let shop = Shop::start(&policy).await;
    let client = shop.client();
    let url = format!("{BACKEND}/api/orders");
    // Only the last warm-up request reached the app (the others found no
    // endpoint yet, and are not retried).
    let warm = warm_up(&client, &url, "backend/v1").await;

    fail_next(&shop.backend.app, 1_000_000, 503).await;
    let sent = Arc::new(AtomicU64::new(warm));
    let load_for = Duration::from_secs(3);
    let end = Instant::now() + load_for;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, sent) = (client.clone(), url.clone(), sent.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let reply = client.get(&url).await;
                    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let seconds = shop.started.elapsed().as_secs_f64();
    let requests = sent.load(Ordering::Relaxed) as f64;
    let attempts = shop.served().await as f64;
    let retried = retries(shop.proxy(), "retry").await;
    // The bound of the retry budget (proxy/resilience/src/budget.rs), with its
    // documented slack of one second's worth of the floor.
    let bound = requests * (1.0 + RATIO) + MIN_PER_SECOND * (seconds + 1.0);
    eprintln!(
        "{requests} requests, {attempts} attempts, {retried} retries in {seconds:.1}s; bound {bound:.0}"
    );
    assert!(
        attempts <= bound,
        "{attempts} attempts for {requests} requests in {seconds:.1}s exceed the budget's {bound:.0}"
    );
    assert!(
        attempts > requests,
        "the budget allowed no retry at all ({attempts} attempts, {requests} requests)"
    );
    assert!(
        attempts < requests * 2.0,
        "{attempts} attempts for {requests} requests: the budget did not stop the retry storm"
    );
    assert_eq!(
        retried,
        attempts - (requests - (warm - 1) as f64),
        "every retry (and only those) is counted in remora_retries_total"
    );
}

// ------------------------------------------------------------------ circuit breakers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_answers_fast_probes_when_half_open_and_closes_on_recovery() {
    let _quiet = QUIET.read().await;
    let policy = r#"
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  circuitBreaker: {consecutiveFailures: 3, openFor: 1s, maxOpenFor: 10s, halfOpenRequests: 1}
"#;
    let shop = Shop::start(policy).await;
    let client = shop.client();
    let url = format!("{BACKEND}/");
    warm_up(&client, &url, "backend/v1").await;
    let endpoint = shop.backend.proxy.inbound();
    let proxy = shop.proxy();
    assert_eq!(breaker_gauge(proxy, "backend.shop", endpoint).await, 0.0);

    // Three failures in a row open the circuit.
    fail_next(&shop.backend.app, 3, 503).await;
    for i in 0..3 {
        let reply = client.get(&url).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "failure {i}");
        assert_eq!(
            remora_error(&reply),
            None,
            "failure {i} is the app's own 503"
        );
    }
    let opened = Instant::now();
    assert_eq!(
        breaker_gauge(proxy, "backend.shop", endpoint).await,
        1.0,
        "remora_circuit_breaker_open after 3 failures"
    );

    // Open: answered at once by the proxy, nothing reaches the app.
    let served = shop.served().await;
    for i in 0..5 {
        let sent = Instant::now();
        let reply = client.get(&url).await;
        let took = sent.elapsed();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "open {i}");
        assert_eq!(remora_error(&reply), Some("circuit-open"), "open {i}");
        assert!(took < Duration::from_millis(200), "open {i} took {took:?}");
    }
    assert!(
        opened.elapsed() < Duration::from_secs(1),
        "too slow to test the open state"
    );
    assert_eq!(shop.served().await, served, "a request reached the app");

    // After openFor, one probe goes through; it fails, so the circuit opens
    // again (for twice as long).
    fail_next(&shop.backend.app, 1, 503).await;
    tokio::time::sleep_until(opened + Duration::from_millis(1300)).await;
    let reply = client.get(&url).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        remora_error(&reply),
        None,
        "the half-open probe reached the app"
    );
    let reopened = Instant::now();
    assert_eq!(shop.served().await, served + 1);
    let reply = client.get(&url).await;
    assert_eq!(remora_error(&reply), Some("circuit-open"), "open again");
    assert_eq!(shop.served().await, served + 1);
    assert_eq!(breaker_gauge(proxy, "backend.shop", endpoint).await, 1.0);

    // The upstream has recovered: after the (doubled) open time the probe
    // succeeds and the circuit closes.
    tokio::time::sleep_until(reopened + Duration::from_millis(2300)).await;
    let reply = client.get(&url).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(shop.served().await, served + 2);
    assert_eq!(
        breaker_gauge(proxy, "backend.shop", endpoint).await,
        0.0,
        "remora_circuit_breaker_open after the circuit closed"
    );
    for _ in 0..5 {
        assert_eq!(client.get(&url).await.status, StatusCode::OK);
    }
    assert_eq!(shop.served().await, served + 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_takes_over_when_the_primary_circuit_opens() {
    let _quiet = QUIET.read().await;
    let policy = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backup, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - name: main
      backends: [{service: backend}]
      fallback: {service: backup}
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  circuitBreaker: {consecutiveFailures: 2, openFor: 30s}
"#;
    let shop = Shop::start(policy).await;
    let backup = Sidecar::start(&shop.cp, "shop", "backup", "v1", Mode::Http).await;
    let client = shop.client();
    let url = format!("{BACKEND}/api");
    warm_up(&client, "http://backup.shop:8080/", "backup/v1").await;
    warm_up(&client, &url, "backend/v1").await;
    let backup_before = backup.app.requests_served().await;

    fail_next(&shop.backend.app, 2, 503).await;
    for _ in 0..2 {
        let reply = client.get(&url).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.served_by(), Some("backend/v1"));
    }
    assert_eq!(
        breaker_gauge(shop.proxy(), "backend.shop", shop.backend.proxy.inbound()).await,
        1.0
    );
    let served = shop.served().await;
    for i in 0..10 {
        let reply = client.get(&url).await;
        assert_eq!(
            (reply.status, reply.served_by()),
            (StatusCode::OK, Some("backup/v1")),
            "request {i} with the primary's circuit open: x-remora-error {:?}",
            remora_error(&reply)
        );
    }
    assert_eq!(shop.served().await, served, "the primary got no request");
    assert_eq!(backup.app.requests_served().await - backup_before, 10);
}

// ------------------------------------------------------------------ bulkheads

/// `n` GETs of `url` one after the other; each one's latency (all must be 200).
async fn latencies(client: &HttpClient, url: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sent = Instant::now();
        let reply = client.get(url).await;
        out.push(sent.elapsed());
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i} to {url}: {reply:?}"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_destination_does_not_slow_calls_to_a_healthy_one() {
    let _quiet = QUIET.write().await;
    let policy = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: stalled, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: stalled, namespace: shop}
spec:
  service: stalled
  limits: {maxRequests: 4, maxPendingRequests: 0}
"#;
    let shop = Shop::start(policy).await;
    let stalled = Sidecar::start(&shop.cp, "shop", "stalled", "v1", Mode::Http).await;
    let client = shop.client();
    let healthy = format!("{BACKEND}/healthy");
    let stalled_url = "http://stalled.shop:8080/work";
    warm_up(&client, stalled_url, "stalled/v1").await;
    warm_up(&client, &healthy, "backend/v1").await;

    latencies(&client, &healthy, 50).await; // connections and caches warm
    let baseline = latencies(&client, &healthy, 300).await;
    let baseline_p99 = percentile(&baseline, 99.0);

    // Stall the other destination and keep it under concurrent load.
    set_slow(&stalled.app, 5_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let overloaded = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..12)
        .map(|_| {
            let client = client.clone();
            let (stop, overloaded) = (stop.clone(), overloaded.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = client.try_get(stalled_url, &[]).await {
                        if r.header("x-remora-error") == Some("overloaded") {
                            overloaded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Enough to keep the bulkhead full (its 4 slots are held for
                    // 5 s), not so much that the 503s themselves load the proxy.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "the stalled destination's bulkhead to fill",
        || async { (overloaded.load(Ordering::Relaxed) > 0).then_some(()) },
    )
    .await;
    let stalled_at = stalled.app.requests_served().await;

    // Sub-millisecond baselines are scheduler noise on a shared two-core
    // machine, so the baseline counts as at least 2 ms. Noise only ever adds
    // latency, so the best of up to three windows is the estimate: a stall
    // that really slowed the healthy calls would slow every window.
    let allowed = baseline_p99.max(Duration::from_millis(2)) * 2;
    let mut during_p99 = Duration::MAX;
    let mut windows = 0;
    while windows < 3 && during_p99 > allowed {
        let during = latencies(&client, &healthy, 300).await;
        during_p99 = during_p99.min(percentile(&during, 99.0));
        windows += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for l in &load {
        l.abort();
    }
    let stalled_after = stalled.app.requests_served().await;
    eprintln!(
        "healthy p99: {baseline_p99:?} before the stall, {during_p99:?} during (best of {windows}); \
         {} overloaded answers",
        overloaded.load(Ordering::Relaxed)
    );
    assert!(
        stalled_after - stalled_at <= 4,
        "the bulkhead let {} more requests through to the stalled app",
        stalled_after - stalled_at
    );
    assert!(
        during_p99 <= allowed,
        "the healthy destination's p99 went from {baseline_p99:?} to {during_p99:?} (allowed {allowed:?})"
    );
    assert!(
        metric_sum(
            shop.proxy(),
            "remora_overloaded_total",
            &[("service", "stalled.shop")]
        )
        .await
            >= 1.0
    );
    clear_faults(&stalled.app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_traffic_is_served_while_non_critical_traffic_is_over_its_limit() {
    let _quiet = QUIET.read().await;
    let policy = r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - name: critical
      matches: [{headers: [{name: x-priority, value: critical}]}]
      backends: [{service: backend}]
      critical: true
    - name: normal
      backends: [{service: backend}]
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  limits: {maxRequests: 4, maxPendingRequests: 0, criticalReserve: 0.5}
"#;
    let shop = Shop::start(policy).await;
    let client = shop.client();
    warm_up(&client, &format!("{BACKEND}/"), "backend/v1").await;

    // Non-critical traffic takes its whole share (4 − 2 reserved).
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get(&format!("{BACKEND}/slow?ms=3000")).await })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "two slow requests in flight",
        || async { (path_count(&shop.backend.app, "/slow").await == 2).then_some(()) },
    )
    .await;

    let sent = Instant::now();
    let reply = client.get(&format!("{BACKEND}/normal")).await;
    let took = sent.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(remora_error(&reply), Some("overloaded"));
    assert!(
        took < Duration::from_millis(500),
        "overloaded after {took:?}"
    );

    // Critical traffic to the same destination still gets through, up to the
    // reserve (both reserved slots at once).
    let critical = [("x-priority", "critical")];
    let url = format!("{BACKEND}/slow?ms=300");
    let (a, b) = tokio::join!(
        client.get_with(&url, &critical),
        client.get_with(&url, &critical)
    );
    for reply in [a, b] {
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "critical: x-remora-error {:?}",
            remora_error(&reply)
        );
    }
    // And still not the non-critical.
    let reply = client.get(&format!("{BACKEND}/normal")).await;
    assert_eq!(remora_error(&reply), Some("overloaded"));
    assert!(
        metric_sum(
            shop.proxy(),
            "remora_overloaded_total",
            &[("service", "backend.shop")]
        )
        .await
            >= 2.0
    );
    for h in hogs {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    // Once the slow ones are done, non-critical traffic flows again.
    assert_eq!(
        client.get(&format!("{BACKEND}/normal")).await.status,
        StatusCode::OK
    );
}

// ------------------------------------------------------------------ rate limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_429_with_retry_after_per_identity() {
    let _quiet = QUIET.read().await;
    let cp = ControlPlane::start().await;
    cp.apply_ok(
        r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
"#,
    )
    .await;
    let server = Sidecar::start(&cp, "shop", "server", "v1", Mode::Http).await;
    let alpha = Sidecar::start(&cp, "shop", "alpha", "v1", Mode::Http).await;
    let beta = Sidecar::start(&cp, "shop", "beta", "v1", Mode::Http).await;
    let url = "http://server.shop:8080/api/items";
    let (a, b) = (
        http1_via_proxy(alpha.proxy.outbound()),
        http1_via_proxy(beta.proxy.outbound()),
    );
    warm_up(&a, url, "server/v1").await;
    warm_up(&b, url, "server/v1").await;

    let version = cp
        .apply_ok(
            r#"
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: shop}
spec:
  service: server
  rules: [{}]
  rateLimit: {requestsPerSecond: 1, burst: 3, perIdentity: true}
"#,
        )
        .await;
    wait_config_version(&server.proxy, version).await;

    // alpha spends its burst...
    for i in 0..3 {
        let reply = a.get(url).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "alpha's request {i}: {reply:?}"
        );
    }
    let served = server.app.requests_served().await;
    let limited = a.get(url).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "alpha's 4th request: {limited:?}"
    );
    assert_eq!(remora_error(&limited), Some("rate-limited"));
    let retry_after: u64 = limited
        .header("retry-after")
        .unwrap_or_else(|| panic!("a 429 without Retry-After: {limited:?}"))
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=2).contains(&retry_after),
        "Retry-After {retry_after} for 1 request per second"
    );
    assert_eq!(
        server.app.requests_served().await,
        served,
        "the 429 reached the app"
    );

    // ...while beta, another identity, has its own bucket.
    for i in 0..3 {
        let reply = b.get(url).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "beta's request {i}: {reply:?}"
        );
    }
    assert_eq!(a.get(url).await.status, StatusCode::TOO_MANY_REQUESTS);

    // Retry-After is honest: after that long alpha is served again.
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    assert_eq!(a.get(url).await.status, StatusCode::OK);

    assert!(
        metric_sum(&server.proxy, "remora_rate_limited_total", &[]).await >= 2.0,
        "remora_rate_limited_total on the server's proxy counts the 429s"
    );
}

// ------------------------------------------------------------------ load balancing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_most_traffic_away_from_a_ten_times_slower_endpoint() {
    let _quiet = QUIET.write().await;
    let shop = Shop::start(
        r#"
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  loadBalancer: p2c-ewma
"#,
    )
    .await;
    let slow = Sidecar::start(&shop.cp, "shop", "backend", "v2", Mode::Http).await;
    let client = shop.client();
    let url = format!("{BACKEND}/");
    // Both instances known to the frontend's proxy.
    eventually(Duration::from_secs(10), "both backends to answer", || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                if let Ok(r) = client.try_get(&url, &[]).await {
                    seen.extend(r.served_by().map(str::to_owned));
                }
            }
            (seen.len() == 2).then_some(())
        }
    })
    .await;

    set_slow(&shop.backend.app, 5).await;
    set_slow(&slow.app, 50).await;
    let fast_before = shop.served().await;
    let slow_before = slow.app.requests_served().await;
    let answers: Vec<Reply> = futures_util::stream::iter(0..400)
        .map(|_| client.get(&url))
        .buffer_unordered(4)
        .collect()
        .await;
    let mut fast = 0;
    for reply in &answers {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        if reply.served_by() == Some("backend/v1") {
            fast += 1;
        }
    }
    let to_slow = answers.len() - fast;
    eprintln!("{fast} requests to the fast endpoint, {to_slow} to the ten times slower one");
    assert_eq!(shop.served().await - fast_before, fast as u64);
    assert_eq!(
        slow.app.requests_served().await - slow_before,
        to_slow as u64
    );
    assert!(
        fast >= 320,
        "only {fast} of 400 requests went to the fast endpoint"
    );
}

// ------------------------------------------------------------------ run-time changes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_timeout_takes_effect_on_the_next_request_without_a_restart() {
    let _quiet = QUIET.read().await;
    let route = |timeout: &str| {
        format!(
            r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {{name: backend, namespace: shop}}
spec:
  service: backend
  rules:
    - name: api
      backends: [{{service: backend}}]
      timeout: {timeout}
"#
        )
    };
    let mut shop = Shop::start(&route("5s")).await;
    let client = shop.client();
    let url = format!("{BACKEND}/slow?ms=600");
    warm_up(&client, &format!("{BACKEND}/"), "backend/v1").await;
    let pid = shop.frontend.proxy.pid();

    // A request in flight while the endpoints change (backend/v2 joins) is
    // not dropped.
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(&format!("{BACKEND}/slow?ms=3000")).await }
    });
    let _v2 = Sidecar::start(&shop.cp, "shop", "backend", "v2", Mode::Http).await;
    let frontend = shop.frontend.proxy.inbound();
    eventually(
        Duration::from_secs(10),
        "the frontend's proxy to ack the snapshot with backend/v2",
        || async {
            let status = shop.cp.status().await;
            let current = status.snapshot_version.as_deref()?;
            let v2_known = status
                .proxies
                .iter()
                .any(|p| p.cell("LABELS").contains("version=v2"));
            (v2_known && status.proxy(frontend)?.acked() == current).then_some(())
        },
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "too slow to change the endpoints during the request"
    );
    let reply = in_flight.await.unwrap();
    assert_eq!(
        (reply.status, reply.served_by()),
        (StatusCode::OK, Some("backend/v1")),
        "the request in flight while backend/v2 joined: x-remora-error {:?}",
        remora_error(&reply)
    );

    let reply = client.get(&url).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "with a 5 s timeout: {reply:?}"
    );

    let version = shop.cp.apply_ok(&route("200ms")).await;
    wait_config_version(shop.proxy(), version).await;
    let sent = Instant::now();
    let reply = client.get(&url).await;
    let took = sent.elapsed();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "the first request after the change: {reply:?}"
    );
    assert_eq!(remora_error(&reply), Some("timeout"));
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(550),
        "timed out after {took:?}, expected about 200 ms"
    );

    // And back.
    let version = shop.cp.apply_ok(&route("2s")).await;
    wait_config_version(shop.proxy(), version).await;
    assert_eq!(client.get(&url).await.status, StatusCode::OK);
    assert_eq!(shop.frontend.proxy.pid(), pid);
    assert!(
        shop.frontend.proxy.process().running(),
        "the proxy was not restarted"
    );
}

// ------------------------------------------------------------------ fault injection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_and_delays_the_configured_requests() {
    let _quiet = QUIET.read().await;
    let shop = Shop::start(
        r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - name: abort
      matches: [{path: {prefix: /abort}}]
      backends: [{service: backend}]
      fault: {abort: {status: 418, percent: 100}}
    - name: delay
      matches: [{path: {prefix: /delay}}]
      backends: [{service: backend}]
      fault: {delay: {fixed: 400ms, percent: 100}}
    - name: rest
      backends: [{service: backend}]
"#,
    )
    .await;
    let client = shop.client();
    warm_up(&client, &format!("{BACKEND}/"), "backend/v1").await;

    let served = shop.served().await;
    for _ in 0..5 {
        let reply = client.get(&format!("{BACKEND}/abort/me")).await;
        assert_eq!(reply.status.as_u16(), 418, "{reply:?}");
        assert_eq!(reply.header("x-remora-fault"), Some("abort"));
    }
    assert_eq!(
        shop.served().await,
        served,
        "an aborted request reached the app"
    );

    for _ in 0..3 {
        let sent = Instant::now();
        let reply = client.get(&format!("{BACKEND}/delay/me")).await;
        let took = sent.elapsed();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.served_by(), Some("backend/v1"));
        assert!(took >= Duration::from_millis(400), "delayed only {took:?}");
    }
    assert_eq!(shop.served().await, served + 3);

    let sent = Instant::now();
    assert_eq!(
        client.get(&format!("{BACKEND}/other")).await.status,
        StatusCode::OK
    );
    assert!(
        sent.elapsed() < Duration::from_millis(400),
        "other routes are not delayed"
    );
}

// ------------------------------------------------------------------ gRPC

const ECHO: &str = "http://echo.shop:50051";

type EchoClient = remora_proto::examples::echo_client::EchoClient<tonic::transport::Channel>;

fn grpc_services(extra: &str) -> String {
    format!(
        r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {{name: frontend, namespace: shop}}
spec:
  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {{name: echo, namespace: shop}}
spec:
  ports: [{{port: 50051, protocol: grpc}}]
---
{extra}"#
    )
}

/// A unary Echo call with `metadata`; the status and the error header.
async fn unary(
    client: &mut EchoClient,
    metadata: &[(&'static str, &'static str)],
) -> Result<String, (tonic::Code, Option<String>, String)> {
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
        count: 0,
    });
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    match client.unary(req).await {
        Ok(r) => Ok(r.into_inner().served_by),
        Err(s) => Err((
            s.code(),
            s.metadata()
                .get("x-remora-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            s.message().to_owned(),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_see_unavailable_for_no_endpoints_upstream_failures_open_circuits_and_overload(
) {
    let _quiet = QUIET.read().await;
    let cp = ControlPlane::start().await;
    cp.apply_ok(&grpc_services(
        r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: ghost, namespace: shop}
spec:
  ports: [{port: 50051, protocol: grpc}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: dead, namespace: shop}
spec:
  ports: [{port: 50051, protocol: grpc}]
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  limits: {maxRequests: 1, maxPendingRequests: 0}
---
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: dead, namespace: shop}
spec:
  service: dead
  circuitBreaker: {consecutiveFailures: 2, openFor: 30s}
"#,
    ))
    .await;
    let echo = Sidecar::start(&cp, "shop", "echo", "v1", Mode::Http).await;
    // A workload whose application drops every connection without an answer
    // (one that refused connections would have its endpoint withdrawn by its
    // own sidecar, and the caller would see no-endpoints).
    let dead = Sidecar::start(&cp, "shop", "dead", "v1", Mode::Http).await;
    reset_next(&dead.app, 1000).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let outbound = frontend.proxy.outbound();
    let mut client = grpc_via_proxy(outbound, ECHO).await;
    eventually(Duration::from_secs(10), "a unary call to echo", || {
        let mut client = client.clone();
        async move { unary(&mut client, &[]).await.ok() }
    })
    .await;

    // The upstream's own UNAVAILABLE passes through.
    fail_next_grpc(&echo.app, 1, 14).await;
    let (code, error, message) = unary(&mut client, &[]).await.unwrap_err();
    assert_eq!(code, tonic::Code::Unavailable, "{message}");
    assert_eq!(error, None, "the app's own status: {message}");
    assert_eq!(unary(&mut client, &[]).await.unwrap(), "echo/v1");

    // No endpoints.
    let mut ghost = grpc_via_proxy(outbound, "http://ghost.shop:50051").await;
    let (code, error, message) = unary(&mut ghost, &[]).await.unwrap_err();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("no-endpoints")),
        "{message}"
    );

    // The upstream drops the calls: UNAVAILABLE from the proxy, twice,
    // which opens dead's circuit; then UNAVAILABLE circuit-open.
    let mut dead_client = grpc_via_proxy(outbound, "http://dead.shop:50051").await;
    let failures = eventually(
        Duration::from_secs(10),
        "dead.shop to be known to the frontend",
        || {
            let mut c = dead_client.clone();
            async move {
                match unary(&mut c, &[]).await {
                    Err((_, Some(e), _)) if e == "no-endpoints" => None,
                    other => Some(other),
                }
            }
        },
    )
    .await;
    let (code, error, message) = failures.unwrap_err();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("upstream-failure")),
        "{message}"
    );
    let (code, error, message) = unary(&mut dead_client, &[]).await.unwrap_err();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("upstream-failure")),
        "{message}"
    );
    let (code, error, message) = unary(&mut dead_client, &[]).await.unwrap_err();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("circuit-open")),
        "{message}\n{}",
        dead.proxy.logs()
    );

    // Overloaded: echo allows one call in flight.
    set_slow(&echo.app, 1500).await;
    let path = "/remora.examples.v1.Echo/Unary";
    let before = path_count(&echo.app, path).await;
    let slow_call = tokio::spawn({
        let mut c = client.clone();
        async move { unary(&mut c, &[]).await }
    });
    eventually(
        Duration::from_secs(5),
        "the slow call to reach echo",
        || async { (path_count(&echo.app, path).await > before).then_some(()) },
    )
    .await;
    let sent = Instant::now();
    let (code, error, message) = unary(&mut client, &[]).await.unwrap_err();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("overloaded")),
        "{message}"
    );
    assert!(sent.elapsed() < Duration::from_millis(500));
    set_slow(&echo.app, 0).await;
    assert_eq!(slow_call.await.unwrap().unwrap(), "echo/v1");
}

/// A ServerStream call asking for two replies: how many came, or the status
/// and the error header.
async fn server_stream(client: &mut EchoClient) -> Result<usize, (tonic::Code, Option<String>)> {
    let req = EchoRequest {
        message: "s".into(),
        count: 2,
    };
    match client.server_stream(req).await {
        Ok(r) => Ok(r.into_inner().collect::<Vec<_>>().await.len()),
        Err(s) => Err((
            s.code(),
            s.metadata()
                .get("x-remora-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_holds_its_bulkhead_slot_until_it_ends() {
    let _quiet = QUIET.read().await;
    let cp = ControlPlane::start().await;
    cp.apply_ok(&grpc_services(
        r#"
apiVersion: remora.dev/v1
kind: DestinationPolicy
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  limits: {maxRequests: 1, maxPendingRequests: 0}
"#,
    ))
    .await;
    let _echo = Sidecar::start(&cp, "shop", "echo", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let mut client = grpc_via_proxy(frontend.proxy.outbound(), ECHO).await;
    eventually(Duration::from_secs(10), "a unary call to echo", || {
        let mut client = client.clone();
        async move { unary(&mut client, &[]).await.ok() }
    })
    .await;

    // A bidirectional stream: its answer's head comes at once, its body
    // lasts as long as the client keeps sending.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let hello = |message: &str| EchoRequest {
        message: message.into(),
        count: 0,
    };
    tx.send(hello("one")).await.unwrap();
    let mut replies = client.bidi_stream(outgoing).await.unwrap().into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert_eq!(first.message, "one");

    // While it is open, it is the one request in flight.
    let during = unary(&mut client, &[]).await;
    tx.send(hello("two")).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().message, "two");
    drop(tx);
    while replies.message().await.unwrap().is_some() {}
    let (code, error, message) = during.expect_err(
        "a unary call was served while a stream held echo's only in-flight slot (maxRequests: 1)",
    );
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::Unavailable, Some("overloaded")),
        "{message}"
    );
    // Once the stream has ended, the slot is free again.
    assert_eq!(unary(&mut client, &[]).await.unwrap(), "echo/v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_from_the_upstream_is_retried_when_the_route_lists_it() {
    let _quiet = QUIET.read().await;
    let cp = ControlPlane::start().await;
    cp.apply_ok(&grpc_services(
        r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  rules:
    - name: retry
      backends: [{service: echo}]
      retry: {attempts: 2, on: [unavailable], backoff: {base: 10ms, max: 50ms}}
"#,
    ))
    .await;
    let echo = Sidecar::start(&cp, "shop", "echo", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let mut client = grpc_via_proxy(frontend.proxy.outbound(), ECHO).await;
    eventually(Duration::from_secs(10), "a unary call to echo", || {
        let mut client = client.clone();
        async move { unary(&mut client, &[]).await.ok() }
    })
    .await;

    // UNAVAILABLE from the upstream is retried on a route that says so; the
    // client sees the third attempt's success...
    let unary_path = "/remora.examples.v1.Echo/Unary";
    let before = path_count(&echo.app, unary_path).await;
    fail_next_grpc(&echo.app, 2, 14).await;
    assert_eq!(unary(&mut client, &[]).await, Ok("echo/v1".to_owned()));
    assert_eq!(path_count(&echo.app, unary_path).await - before, 3);
    // ...and the upstream's last status when every attempt fails.
    fail_next_grpc(&echo.app, 3, 14).await;
    let (code, error, _) = unary(&mut client, &[]).await.unwrap_err();
    assert_eq!((code, error), (tonic::Code::Unavailable, None));
    assert_eq!(path_count(&echo.app, unary_path).await - before, 6);
}

/// A gRPC frame holding an `EchoRequest { message }` (field 1, a string).
fn echo_request_frame(message: &str) -> Vec<u8> {
    let mut msg = vec![0x0a, message.len() as u8];
    msg.extend_from_slice(message.as_bytes());
    let mut frame = vec![0];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend(msg);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_see_deadline_exceeded_and_resource_exhausted() {
    let _quiet = QUIET.read().await;
    let cp = ControlPlane::start().await;
    cp.apply_ok(&grpc_services(
        r#"
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  rules:
    - name: short
      matches: [{headers: [{name: x-case, value: short}]}]
      backends: [{service: echo}]
      timeout: 300ms
    - name: rest
      backends: [{service: echo}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: echo, namespace: shop}
spec:
  service: echo
  rules: [{}]
  rateLimit: {requestsPerSecond: 0.1, burst: 2, paths: [/remora.examples.v1.Echo/ServerStream]}
"#,
    ))
    .await;
    let echo = Sidecar::start(&cp, "shop", "echo", "v1", Mode::Http).await;
    let frontend = Sidecar::start(&cp, "shop", "frontend", "v1", Mode::Http).await;
    let outbound = frontend.proxy.outbound();
    let mut client = grpc_via_proxy(outbound, ECHO).await;
    eventually(Duration::from_secs(10), "a unary call to echo", || {
        let mut client = client.clone();
        async move { unary(&mut client, &[]).await.ok() }
    })
    .await;

    // Rate limited (only ServerStream is limited): RESOURCE_EXHAUSTED.
    assert_eq!(server_stream(&mut client).await, Ok(2));
    assert_eq!(server_stream(&mut client).await, Ok(2));
    assert_eq!(
        server_stream(&mut client).await,
        Err((
            tonic::Code::ResourceExhausted,
            Some("rate-limited".to_owned())
        ))
    );
    assert!(
        unary(&mut client, &[]).await.is_ok(),
        "Unary is not limited"
    );

    // The route's timeout: DEADLINE_EXCEEDED.
    set_slow(&echo.app, 1500).await;
    let sent = Instant::now();
    let (code, error, message) = unary(&mut client, &[("x-case", "short")])
        .await
        .unwrap_err();
    let took = sent.elapsed();
    assert_eq!(
        (code, error.as_deref()),
        (tonic::Code::DeadlineExceeded, Some("timeout")),
        "{message}"
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(900),
        "the 300 ms route timeout fired after {took:?}"
    );

    // The client's own grpc-timeout, shorter than any route timeout, is
    // honoured: the proxy answers DEADLINE_EXCEEDED when it expires.
    let h2 = h2c_via_proxy(outbound);
    let req = Request::post(format!("{ECHO}/remora.examples.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "400m")
        .body(full(Bytes::from(echo_request_frame("deadline"))))
        .unwrap();
    let sent = Instant::now();
    let reply = h2.send(req).await.unwrap();
    let took = sent.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "gRPC answers are HTTP 200");
    assert_eq!(
        (reply.header("grpc-status"), remora_error(&reply)),
        (Some("4"), Some("timeout")),
        "{reply:?}"
    );
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1000),
        "grpc-timeout 400m answered after {took:?}"
    );

    // The same with tonic's own deadline (the proxy answers no later than the
    // client gives up).
    let mut req = tonic::Request::new(EchoRequest {
        message: "t".into(),
        count: 0,
    });
    req.set_timeout(Duration::from_millis(400));
    let sent = Instant::now();
    let status = client.unary(req).await.unwrap_err();
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "a 400 ms client deadline answered after {took:?}"
    );
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    set_slow(&echo.app, 0).await;
}
