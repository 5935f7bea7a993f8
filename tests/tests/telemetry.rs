//! Telemetry through a real mesh: trace spans exported over OTLP to a collector
//! in the test (client and server span of one trace, incoming W3C and B3
//! context continued, unsampled parents respected, export never in the request
//! path), Prometheus metrics (`promtool`-clean, exact counts, scraped by a real
//! Prometheus), JSON access logs carrying the span's trace id, `/shutdown`
//! draining, and a `TelemetryPolicy` changing the sampling rate at run time.
//!
//! Each test has its own control plane, ports and collector. The Prometheus
//! tests skip (with a printed reason) when `promtool` or `prometheus` (Debian
//! package `prometheus`) is not installed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use remora_telemetry::testing::{Collector, ReceivedSpan};
use remora_tests::observability::*;
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
/// OTLP `SpanKind` values.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
/// How long exported spans may take to reach the collector (the exporter sends
/// a partial batch every second).
const SPAN_TIMEOUT: Duration = Duration::from_secs(15);

/// A control plane with the shop's services; a backend and a frontend (the
/// client side) each behind its proxy.
struct Shop {
    cp: ControlPlane,
    frontend: Sidecar,
    backend: Sidecar,
}

impl Shop {
    /// Both proxies started with `args`; waits until a request reaches the backend.
    async fn start(args: &[&str]) -> Shop {
        let shop = Shop::start_quiet(args, args).await;
        wait_served(&shop.client(), &format!("{BACKEND}/"), &[], "backend/v1").await;
        shop
    }

    /// The proxies started with their own args; waits until the frontend's
    /// proxy knows the backend's endpoint, without sending any request.
    async fn start_quiet(frontend_args: &[&str], backend_args: &[&str]) -> Shop {
        let cp = ControlPlane::start().await;
        cp.apply_ok(SHOP).await;
        let backend = sidecar(&cp, "backend", backend_args).await;
        let frontend = sidecar(&cp, "frontend", frontend_args).await;
        let shop = Shop {
            cp,
            frontend,
            backend,
        };
        let admin = shop.frontend.proxy.admin();
        eventually(
            READY_TIMEOUT,
            "the frontend to know the backend",
            || async {
                let dump = config_dump(admin).await?;
                dump["endpoints"]
                    .as_array()?
                    .iter()
                    .any(|e| e["service"] == "backend")
                    .then_some(())
            },
        )
        .await;
        shop
    }

    /// HTTP/1.1 through the frontend's outbound listener.
    fn client(&self) -> HttpClient {
        http1_via_proxy(self.frontend.proxy.outbound())
    }

    /// `GET BACKEND{path}` with `headers`; panics unless the backend answers 200.
    /// The sample app's description of the request it saw.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
        let reply = self
            .client()
            .get_with(&format!("{BACKEND}{path}"), headers)
            .await;
        assert_eq!(
            reply.status,
            200,
            "GET {path} {headers:?}: x-remora-error {:?}, body {:?}",
            reply.header("x-remora-error"),
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.served_by(), Some("backend/v1"));
        reply.json()
    }

    /// Waits until both proxies run policy version `version` or later.
    async fn wait_policy(&self, version: u64) {
        for proxy in [&self.frontend.proxy, &self.backend.proxy] {
            let admin = proxy.admin();
            eventually(
                READY_TIMEOUT,
                &format!("policy version {version}"),
                || async {
                    let dump = config_dump(admin).await?;
                    (dump["policy_version"].as_u64()? >= version).then_some(())
                },
            )
            .await;
        }
    }
}

async fn sidecar(cp: &ControlPlane, service: &str, args: &[&str]) -> Sidecar {
    let app = App::start(service, "v1", Mode::Http).await;
    let opts = ProxyOpts::new(service, "shop", app.port())
        .label("version", "v1")
        .args(args);
    Sidecar::start_with(cp, app, opts).await
}

/// The proxy's `/config_dump` (admin port), if it answers JSON.
async fn config_dump(admin: SocketAddr) -> Option<serde_json::Value> {
    let resp = remora_tests::raw_http::get(admin, "/config_dump")
        .await
        .ok()?;
    (resp.status == 200).then(|| resp.json())
}

/// Proxy arguments that export every span to `collector`.
fn tracing_args(collector: &Collector) -> Vec<String> {
    vec![
        "--otlp-endpoint".into(),
        collector.endpoint(),
        "--trace-sampling".into(),
        "1".into(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The `traceparent` the application received, parsed.
fn app_traceparent(seen: &serde_json::Value) -> TraceParent {
    let value = seen["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the app got no traceparent: {seen}"));
    TraceParent::parse(value).unwrap_or_else(|| panic!("the app got traceparent {value:?}"))
}

/// One line per span, for assertion messages.
fn describe(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "  {} kind={} service={:?} trace={} span={} parent={:?}\n",
                s.name(),
                s.span.kind,
                s.service_name(),
                s.trace_id(),
                s.span_id(),
                s.parent_span_id()
            )
        })
        .collect()
}

/// Waits until the collector holds `count` spans of trace `trace_id` (or
/// [`SPAN_TIMEOUT`] passes) and returns those of that trace.
async fn trace(collector: &Collector, trace_id: &str, count: usize) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + SPAN_TIMEOUT;
    loop {
        let spans: Vec<ReceivedSpan> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect();
        if spans.len() >= count || Instant::now() >= deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client span (the frontend's outbound side) and the server span (the
/// backend's inbound side) of trace `trace_id`, exactly one of each.
async fn client_and_server(collector: &Collector, trace_id: &str) -> (ReceivedSpan, ReceivedSpan) {
    let spans = trace(collector, trace_id, 2).await;
    let one = |kind: i32, service: &str| {
        let found: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.span.kind == kind && s.service_name().as_deref() == Some(service))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "trace {trace_id}: expected one span of kind {kind} from {service}; got:\n{}",
            describe(&spans)
        );
        found[0].clone()
    };
    let client = one(CLIENT, "frontend");
    let server = one(SERVER, "backend");
    assert_eq!(
        spans.len(),
        2,
        "trace {trace_id}: more spans than expected:\n{}",
        describe(&spans)
    );
    (client, server)
}

// ------------------------------------------------------------------ traces

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_spans_share_a_trace_and_the_app_sees_the_server_span() {
    let collector = Collector::start().await.expect("a test collector");
    let shop = Shop::start(&strs(&tracing_args(&collector))).await;

    // No context in: the client's proxy starts the trace.
    let seen = shop.get("/orders/17?x=1", &[]).await;
    let at_app = app_traceparent(&seen);
    assert!(at_app.sampled(), "sampling rate 1: {at_app:?}");
    let (client, server) = client_and_server(&collector, &at_app.trace_id).await;

    assert_eq!(client.parent_span_id(), None, "the client span is the root");
    assert_eq!(
        server.parent_span_id().as_deref(),
        Some(client.span_id().as_str()),
        "the server span's parent is the client span"
    );
    assert_eq!(
        at_app.parent_id,
        server.span_id(),
        "the app's traceparent points at the server span"
    );
    for (span, namespace) in [(&client, "shop"), (&server, "shop")] {
        assert_eq!(
            span.resource.get("service.namespace").map(String::as_str),
            Some(namespace),
            "resource of {}: {:?}",
            span.name(),
            span.resource
        );
        assert!(
            span.span.end_time_unix_nano >= span.span.start_time_unix_nano
                && span.span.start_time_unix_nano > 0,
            "{} has no sensible times",
            span.name()
        );
        // HTTP semantic conventions: the method and the answer's status.
        let attrs = span.attributes();
        assert_eq!(
            attrs.get("http.request.method").map(String::as_str),
            Some("GET"),
            "{attrs:?}"
        );
        assert_eq!(
            attrs.get("http.response.status_code").map(String::as_str),
            Some("200"),
            "{attrs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_w3c_and_b3_contexts_are_continued() {
    let collector = Collector::start().await.expect("a test collector");
    let shop = Shop::start(&strs(&tracing_args(&collector))).await;

    // W3C traceparent (sampled) and tracestate.
    let (trace_id, parent) = (random_trace_id(), random_span_id());
    let seen = shop
        .get(
            "/w3c",
            &[
                ("traceparent", &traceparent(&trace_id, &parent, true)),
                ("tracestate", "vendor=opaque"),
            ],
        )
        .await;
    let (client, server) = client_and_server(&collector, &trace_id).await;
    assert_eq!(client.parent_span_id(), Some(parent.clone()), "W3C parent");
    assert_eq!(server.parent_span_id(), Some(client.span_id()));
    let at_app = app_traceparent(&seen);
    assert_eq!(
        (at_app.trace_id.as_str(), at_app.parent_id.as_str()),
        (trace_id.as_str(), server.span_id().as_str())
    );
    assert_eq!(seen["headers"]["tracestate"], "vendor=opaque", "{seen}");

    // B3 single header.
    let (trace_id, parent) = (random_trace_id(), random_span_id());
    let seen = shop
        .get("/b3-single", &[("b3", &format!("{trace_id}-{parent}-1"))])
        .await;
    let (client, server) = client_and_server(&collector, &trace_id).await;
    assert_eq!(client.parent_span_id(), Some(parent.clone()), "b3 parent");
    assert_eq!(server.parent_span_id(), Some(client.span_id()));
    let at_app = app_traceparent(&seen);
    assert_eq!(at_app.trace_id, trace_id);
    assert_eq!(at_app.parent_id, server.span_id());
    let b3 = seen["headers"]["b3"].as_str().unwrap_or_default();
    assert!(
        b3.starts_with(&format!("{trace_id}-{}", server.span_id())),
        "the app's b3 header {b3:?} should name the server span"
    );

    // B3 multi-header.
    let (trace_id, parent) = (random_trace_id(), random_span_id());
    let seen = shop
        .get(
            "/b3-multi",
            &[
                ("x-b3-traceid", &trace_id),
                ("x-b3-spanid", &parent),
                ("x-b3-sampled", "1"),
            ],
        )
        .await;
    let (client, server) = client_and_server(&collector, &trace_id).await;
    assert_eq!(client.parent_span_id(), Some(parent.clone()), "x-b3 parent");
    assert_eq!(server.parent_span_id(), Some(client.span_id()));
    let at_app = app_traceparent(&seen);
    assert_eq!(at_app.trace_id, trace_id);
    assert_eq!(at_app.parent_id, server.span_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_parent_produces_no_span_even_at_rate_one() {
    let collector = Collector::start().await.expect("a test collector");
    let shop = Shop::start(&strs(&tracing_args(&collector))).await;

    let unsampled = random_trace_id();
    let seen = shop
        .get(
            "/unsampled",
            &[(
                "traceparent",
                &traceparent(&unsampled, &random_span_id(), false),
            )],
        )
        .await;
    let at_app = app_traceparent(&seen);
    assert_eq!(at_app.trace_id, unsampled, "the trace goes on");
    assert!(!at_app.sampled(), "and stays unsampled: {at_app:?}");

    // A sampled request after it: once its spans are in, an export of the
    // unsampled one (queued earlier) would be too.
    let marker = random_trace_id();
    shop.get(
        "/marker",
        &[(
            "traceparent",
            &traceparent(&marker, &random_span_id(), true),
        )],
    )
    .await;
    client_and_server(&collector, &marker).await;
    let leaked: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id() == unsampled)
        .collect();
    assert!(
        leaked.is_empty(),
        "an unsampled parent produced spans:\n{}",
        describe(&leaked)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_its_pace_without_a_collector_drops_are_counted_and_export_resumes() {
    let collector = Collector::start().await.expect("a test collector");
    let shop = Shop::start(&strs(&tracing_args(&collector))).await;
    let client = shop.client();
    let url = format!("{BACKEND}/paced");

    /// Sends requests one after another for `span`: how many were answered 200,
    /// and the slowest.
    async fn run(client: &HttpClient, url: &str, span: Duration) -> (u32, Duration) {
        let (mut ok, mut slowest) = (0, Duration::ZERO);
        let end = Instant::now() + span;
        while Instant::now() < end {
            let started = Instant::now();
            let reply = client.get(url).await;
            assert_eq!(
                reply.status,
                200,
                "x-remora-error {:?}",
                reply.header("x-remora-error")
            );
            slowest = slowest.max(started.elapsed());
            ok += 1;
        }
        (ok, slowest)
    }

    // Longer than the exporter's 1 s batch interval, so exports happen meanwhile.
    let window = Duration::from_millis(2500);
    let (with, slowest_with) = run(&client, &url, window).await;
    let exported = shop
        .frontend
        .proxy
        .metric("remora_spans_exported_total")
        .await;
    assert!(
        exported.is_some_and(|n| n > 0.0),
        "spans were exported while the collector ran: {exported:?}"
    );

    let collector_addr = collector.addr();
    collector.stop().await;
    let (without, slowest_without) = run(&client, &url, window).await;
    eprintln!(
        "requests in {window:?}: {with} with a collector (slowest {slowest_with:?}), \
         {without} without (slowest {slowest_without:?})"
    );
    // Generous bounds (2 shared cores): the pace holds, no request waits for
    // an export (whose timeout is 5 s).
    assert!(
        without * 3 >= with,
        "throughput fell from {with} to {without} requests per {window:?} without a collector"
    );
    assert!(
        slowest_without < Duration::from_secs(1),
        "a request took {slowest_without:?} without a collector"
    );

    for (name, proxy) in [
        ("frontend", &shop.frontend.proxy),
        ("backend", &shop.backend.proxy),
    ] {
        let health = proxy.health();
        let dropped = eventually(SPAN_TIMEOUT, "spans dropped to be counted", || async {
            let m = scrape(health).await;
            let n = m.sum("remora_spans_dropped_total", &[]);
            (n > 0.0).then_some(m)
        })
        .await;
        eprintln!(
            "{name}: {}",
            dropped.show("remora_spans_dropped_total", &[]).trim()
        );
    }

    // A collector back on the same address gets the spans of new requests:
    // the exporter reconnects by itself.
    let collector = Collector::start_on(collector_addr)
        .await
        .expect("a collector on the old address");
    let seen = shop.get("/after-outage", &[]).await;
    client_and_server(&collector, &app_traceparent(&seen).trace_id).await;
}

// ------------------------------------------------------------------ metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_every_request_exactly() {
    let shop = Shop::start_quiet(&[], &[]).await;
    let client = shop.client();
    for i in 0..7 {
        let reply = client.get(&format!("{BACKEND}/ok/{i}")).await;
        assert_eq!(
            reply.status,
            200,
            "request {i}: x-remora-error {:?}",
            reply.header("x-remora-error")
        );
    }
    for i in 0..3 {
        let reply = client.get(&format!("{BACKEND}/status/503")).await;
        assert_eq!(reply.status, 503, "request {i}");
        assert_eq!(reply.served_by(), Some("backend/v1"), "the app's own 503");
    }

    let expect = |side: &str, health: SocketAddr, direction: &'static str, peer: &'static str| {
        let side = side.to_owned();
        async move {
            let base = [("direction", direction), ("service", "backend.shop")];
            let with = |extra: (&'static str, &'static str)| {
                let mut l = base.to_vec();
                l.push(extra);
                l
            };
            let want = [
                ("remora_requests_total", with(("status_code", "200")), 7.0),
                ("remora_requests_total", with(("status_code", "503")), 3.0),
                ("remora_requests_total", base.to_vec(), 10.0),
                ("remora_request_duration_seconds_count", base.to_vec(), 10.0),
                (
                    "remora_request_duration_seconds_bucket",
                    with(("le", "+Inf")),
                    10.0,
                ),
            ];
            // The counts are final once the answers are in; allow a moment anyway.
            let deadline = Instant::now() + Duration::from_secs(5);
            let m = loop {
                let m = scrape(health).await;
                let all = want.iter().all(|(n, l, v)| m.sum(n, l) == *v);
                if all || Instant::now() >= deadline {
                    break m;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            for (name, labels, value) in &want {
                assert_eq!(
                    m.sum(name, labels),
                    *value,
                    "{side}: {name} {labels:?}; samples:\n{}",
                    m.show(name, &base)
                );
            }
            // Bounded labels: the route's name and the peer's identity, never the path.
            for s in m.matching("remora_requests_total", &base) {
                assert_eq!(
                    s.labels.get("route").map(String::as_str),
                    Some(route_of(direction))
                );
                let id = s.labels.get("peer_identity").cloned().unwrap_or_default();
                assert!(
                    id.ends_with(peer),
                    "{side}: peer_identity {id:?}, want …{peer}"
                );
                assert!(!s.labels.values().any(|v| v.contains("/ok/")), "{s:?}");
            }
            m
        }
    };
    fn route_of(direction: &str) -> &'static str {
        if direction == "outbound" {
            "default"
        } else {
            "inbound"
        }
    }
    let front = expect(
        "the client's proxy",
        shop.frontend.proxy.health(),
        "outbound",
        "/ns/shop/sa/backend",
    )
    .await;
    let back = expect(
        "the server's proxy",
        shop.backend.proxy.health(),
        "inbound",
        "/ns/shop/sa/frontend",
    )
    .await;
    let control = {
        let resp = remora_tests::raw_http::get(shop.cp.http_addr(), "/metrics")
            .await
            .expect("the control plane's /metrics");
        assert_eq!(resp.status, 200);
        let text = String::from_utf8_lossy(&resp.body).into_owned();
        Exposition::parse(&text).unwrap_or_else(|e| panic!("control plane: {e}\n{text}"))
    };
    // The control plane's view of the same mesh.
    assert_eq!(control.sum("remora_control_proxies_connected", &[]), 2.0);
    assert!(control.sum("remora_control_pushes_total", &[]) >= 2.0);
    assert_eq!(
        control.sum("remora_control_certificates_issued_total", &[]),
        2.0
    );
    assert!(
        control.sum("remora_control_push_latency_seconds_count", &[]) >= 2.0,
        "every proxy acked at least one push:\n{}",
        control.text
    );

    let Some(promtool) = find_tool("promtool") else {
        remora_tests::skip_or_fail(
            "the promtool check",
            "`promtool` is not on PATH (Debian package `prometheus`)",
        );
        return;
    };
    for (what, m) in [
        ("the client proxy's /metrics", &front),
        ("the server proxy's /metrics", &back),
        ("the control plane's /metrics", &control),
    ] {
        if let Err(e) = promtool_check(&promtool, &m.text) {
            panic!("{what} fails promtool: {e}\n--- the text ---\n{}", m.text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_proxies() {
    let Some(prometheus) = find_tool("prometheus") else {
        remora_tests::skip_or_fail(
            "a_real_prometheus_scrapes_the_proxies",
            "`prometheus` is not on PATH (Debian package `prometheus`)",
        );
        return;
    };
    let shop = Shop::start(&[]).await;
    for i in 0..5 {
        shop.get(&format!("/scraped/{i}"), &[]).await;
    }
    let targets = [shop.frontend.proxy.health(), shop.backend.proxy.health()];
    let server = Prometheus::start(&prometheus, &targets, Duration::from_secs(1)).await;

    let query = r#"remora_requests_total{service="backend.shop"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let series = loop {
        let last = server.query(query).await;
        let directions: BTreeSet<String> = last
            .iter()
            .flatten()
            .filter_map(|s| s["metric"]["direction"].as_str().map(str::to_owned))
            .collect();
        if directions.contains("outbound") && directions.contains("inbound") {
            break last.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no {query} from both proxies after 20 s; last answer {last:?}\n\
             targets: {}\n{}",
            server.targets().await,
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for s in &series {
        let value: f64 = s["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a sample without a value: {s}"));
        assert!(value >= 1.0, "{s}");
        assert_eq!(s["metric"]["job"], "remora", "{s}");
    }
    // Every scrape of both proxies succeeded.
    let up = server.query(r#"up{job="remora"}"#).await.expect("up");
    assert_eq!(up.len(), 2, "{up:?}");
    for target in &up {
        assert_eq!(target["value"][1], "1", "a scrape failed: {target}");
    }

    // The Grafana dashboard's queries are valid PromQL over these metrics, and
    // its request-rate and latency panels show the backend.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docker/grafana-dashboard.json"),
        )
        .expect("docker/grafana-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            exprs.push((
                title,
                expr.replace("$direction", "inbound|outbound")
                    .replace("$service", "backend.shop")
                    .replace("$__rate_interval", "10s"),
            ));
        }
    }
    assert!(exprs.len() >= 4, "{exprs:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for (title, expr) in &exprs {
        let shows_backend = title == "Request rate" || title.starts_with("Latency");
        loop {
            let result = server
                .query(expr)
                .await
                .unwrap_or_else(|e| panic!("dashboard panel {title:?}: {expr}: {e}"));
            if !shows_backend || !result.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dashboard panel {title:?} shows nothing for backend.shop: {expr}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

// ------------------------------------------------------------------ access logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_and_carry_the_spans_trace_id() {
    let collector = Collector::start().await.expect("a test collector");
    let mut shop = Shop::start(&strs(&tracing_args(&collector))).await;

    let seen = shop.get("/logged?secret=1", &[]).await;
    let trace_id = app_traceparent(&seen).trace_id;
    let (client, server) = client_and_server(&collector, &trace_id).await;

    for (proxy, direction, span) in [
        (&mut shop.frontend.proxy, "outbound", &client),
        (&mut shop.backend.proxy, "inbound", &server),
    ] {
        let proc = proxy.process();
        let line = eventually(
            Duration::from_secs(10),
            &format!("the {direction} access-log line"),
            || async {
                stdout_json_lines(proc)
                    .into_iter()
                    .flatten()
                    .find(|l| l["path"] == "/logged" && l["direction"] == direction)
            },
        )
        .await;
        let bad: Vec<String> = stdout_json_lines(proc)
            .into_iter()
            .filter_map(Result::err)
            .collect();
        assert!(bad.is_empty(), "stdout lines that are not JSON: {bad:?}");

        assert_eq!(line["trace_id"], trace_id.as_str(), "{direction}: {line}");
        assert_eq!(
            line["trace_id"],
            span.trace_id().as_str(),
            "{direction}: {line}"
        );
        assert_eq!(
            line["span_id"],
            span.span_id().as_str(),
            "{direction}: {line}"
        );
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        // The client spoke HTTP/1.1; the hop between the proxies may be HTTP/2.
        let protocols: &[&str] = match direction {
            "outbound" => &["http/1.1"],
            _ => &["http/1.1", "http/2"],
        };
        assert!(
            protocols.iter().any(|p| line["protocol"] == *p),
            "{direction}: protocol {}",
            line["protocol"]
        );
        assert!(line["time"].is_string(), "{line}");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
        assert!(
            !line.to_string().contains("secret"),
            "the query string is not logged: {line}"
        );
    }
}

// ------------------------------------------------------------------ admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let mut shop = Shop::start_quiet(&["--drain-delay", "100ms"], &[]).await;
    wait_served(&shop.client(), &format!("{BACKEND}/"), &[], "backend/v1").await;
    let (outbound, inbound, admin) = (
        shop.frontend.proxy.outbound(),
        shop.frontend.proxy.inbound(),
        shop.frontend.proxy.admin(),
    );

    let client = shop.client();
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        client
            .try_get(&format!("{BACKEND}/slow?ms=1500"), &[])
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!slow.is_finished(), "the slow request is in flight");

    let resp = remora_tests::raw_http::exchange(
        admin,
        b"POST /shutdown HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("POST /shutdown");
    assert_eq!(
        resp.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&resp.body)
    );

    // After the drain delay, both listeners refuse new connections — while
    // the slow request is still being answered.
    let refused = |addr: SocketAddr| async move {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Ok(_) => false,
        }
    };
    eventually(
        Duration::from_secs(1),
        "the outbound and inbound listeners to refuse connections",
        || async { (refused(outbound).await && refused(inbound).await).then_some(()) },
    )
    .await;
    assert!(
        !slow.is_finished(),
        "listeners closed only after the in-flight request ended ({:?} after it began)",
        started.elapsed()
    );

    let reply = slow
        .await
        .expect("the slow request's task")
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200, "{:?}", reply.header("x-remora-error"));
    assert!(started.elapsed() >= Duration::from_millis(1500));

    let proc = shop.frontend.proxy.process();
    assert!(
        proc.wait_exit(Duration::from_secs(10)).await,
        "the proxy did not exit after draining\n{}",
        proc.logs()
    );
    let status = proc.exit_status().expect("an exit status");
    assert!(
        status.success(),
        "the proxy exited with {status}\n{}",
        proc.logs()
    );
}

// ------------------------------------------------------------------ TelemetryPolicy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_policy_changes_the_sampling_rate_at_run_time() {
    let collector = Collector::start().await.expect("a test collector");
    let mut shop = Shop::start(&strs(&tracing_args(&collector))).await;
    let pids = (shop.frontend.proxy.pid(), shop.backend.proxy.pid());
    let policy = |rate: &str| {
        format!(
            "apiVersion: remora.dev/v1\nkind: TelemetryPolicy\n\
             metadata: {{name: tracing, namespace: shop}}\nspec: {{samplingRate: {rate}}}\n"
        )
    };

    // Rate 0 (the flag said 1): new traces are not sampled.
    let version = shop.cp.apply_ok(&policy("0")).await;
    shop.wait_policy(version).await;
    let mut unsampled = Vec::new();
    for i in 0..5 {
        let at_app = app_traceparent(&shop.get(&format!("/rate0/{i}"), &[]).await);
        assert!(!at_app.sampled(), "rate 0 sampled a trace: {at_app:?}");
        unsampled.push(at_app.trace_id);
    }
    let marker = random_trace_id();
    shop.get(
        "/marker",
        &[(
            "traceparent",
            &traceparent(&marker, &random_span_id(), true),
        )],
    )
    .await;
    client_and_server(&collector, &marker).await;
    let leaked: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| unsampled.contains(&s.trace_id()))
        .collect();
    assert!(
        leaked.is_empty(),
        "spans at sampling rate 0:\n{}",
        describe(&leaked)
    );

    // Rate 1: every new trace is sampled, by the same processes.
    let version = shop.cp.apply_ok(&policy("1")).await;
    shop.wait_policy(version).await;
    for i in 0..3 {
        let at_app = app_traceparent(&shop.get(&format!("/rate1/{i}"), &[]).await);
        assert!(at_app.sampled(), "rate 1 did not sample: {at_app:?}");
        let (_, server) = client_and_server(&collector, &at_app.trace_id).await;
        assert_eq!(at_app.parent_id, server.span_id());
    }
    assert_eq!(
        (shop.frontend.proxy.pid(), shop.backend.proxy.pid()),
        pids,
        "no restart"
    );
    assert!(shop.frontend.proxy.process().running() && shop.backend.proxy.process().running());
}
