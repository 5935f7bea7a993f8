//! Spans reach a real OTLP/gRPC collector with their ids, parent, name, attributes and
//! resource; and when the collector is gone, slow or failing, submitting never waits,
//! drops are counted, and export resumes by itself.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tokio::time::Instant;

use remora_telemetry::context::hex;
use remora_telemetry::span::attr;
use remora_telemetry::testing::Collector;
use remora_telemetry::{
    extract, Exporter, ExporterConfig, ExporterHandle, Metrics, SpanKind, SpanRecord, TraceContext,
};

fn config(endpoint: String) -> ExporterConfig {
    ExporterConfig {
        endpoint,
        service_name: "frontend".into(),
        namespace: "shop".into(),
        instance_id: "frontend-7d9f".into(),
        interval: Duration::from_millis(50),
        export_timeout: Duration::from_secs(2),
        ..ExporterConfig::default()
    }
}

fn span(name: &'static str) -> SpanRecord {
    let ctx = TraceContext::new_root(true);
    let mut s = SpanRecord::start(SpanKind::Client, &ctx, None);
    s.name = name.into();
    s.set_attribute(attr::REMORA_ROUTE, "r");
    s.finish();
    s
}

/// An address nothing listens on.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn client_and_server_spans_arrive_with_ids_parent_attributes_and_resource() {
    let collector = Collector::start().await.unwrap();
    let exporter = Exporter::start(config(collector.endpoint())).unwrap();

    // An incoming request continues the caller's trace.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    headers.insert("tracestate", "rojo=1".parse().unwrap());
    let incoming = extract(&headers).unwrap();

    let client_ctx = incoming.child(true);
    let mut client = SpanRecord::start(SpanKind::Client, &client_ctx, Some(incoming.span_id));
    let req = http::Request::get("/api/users/42?x=1")
        .header("host", "users:8080")
        .body(())
        .unwrap();
    client.record_request(&req, Some("users-api"));
    client.record_remora(
        Some("users"),
        Some("spiffe://remora/ns/shop/sa/users"),
        None,
        Some("closed"),
    );
    client.record_retry(2, "5xx");
    client.record_status(200);
    client.finish();

    let server_ctx = client_ctx.child(true);
    let mut server = SpanRecord::start(SpanKind::Server, &server_ctx, Some(client_ctx.span_id));
    server.record_request(&req, Some("users-api"));
    server.record_error("upstream_unavailable");
    server.record_status(503);
    server.finish();

    exporter.submit(client.clone());
    exporter.submit(server.clone());
    let spans = collector.wait_for_spans(2, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 2);
    let got_client = spans.iter().find(|s| s.span.kind == 3).unwrap(); // CLIENT
    let got_server = spans.iter().find(|s| s.span.kind == 2).unwrap(); // SERVER

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(got_client.trace_id(), trace);
    assert_eq!(got_server.trace_id(), trace);
    assert_eq!(got_client.span_id(), hex(&client_ctx.span_id));
    assert_eq!(
        got_client.parent_span_id().as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(got_server.parent_span_id(), Some(got_client.span_id()));
    assert_eq!(got_client.span.trace_state, "rojo=1");

    assert_eq!(got_client.name(), "GET users-api");
    assert_eq!(
        got_client.attr(attr::HTTP_REQUEST_METHOD).as_deref(),
        Some("GET")
    );
    assert_eq!(
        got_client.attr(attr::URL_PATH).as_deref(),
        Some("/api/users/42")
    );
    assert_eq!(
        got_client.attr(attr::SERVER_ADDRESS).as_deref(),
        Some("users")
    );
    assert_eq!(got_client.attr(attr::SERVER_PORT).as_deref(), Some("8080"));
    assert_eq!(
        got_client.attr(attr::HTTP_RESPONSE_STATUS_CODE).as_deref(),
        Some("200")
    );
    assert_eq!(
        got_client.attr(attr::REMORA_ROUTE).as_deref(),
        Some("users-api")
    );
    assert_eq!(
        got_client.attr(attr::REMORA_DESTINATION).as_deref(),
        Some("users")
    );
    assert_eq!(got_client.attr(attr::REMORA_ATTEMPTS).as_deref(), Some("2"));
    assert_eq!(
        got_client.attr(attr::REMORA_CIRCUIT_STATE).as_deref(),
        Some("closed")
    );
    assert_eq!(got_client.span.events.len(), 1);
    assert_eq!(got_client.span.events[0].name, "retry");
    assert!(got_client.span.status.is_none(), "unset for a 200");

    let status = got_server.span.status.as_ref().unwrap();
    assert_eq!(status.code, 2); // ERROR
    assert_eq!(status.message, "upstream_unavailable");
    assert_eq!(
        got_server.attr(attr::REMORA_ERROR).as_deref(),
        Some("upstream_unavailable")
    );

    // Timestamps survive to the nanosecond.
    let nanos = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    };
    assert_eq!(got_client.span.start_time_unix_nano, nanos(client.start));
    assert_eq!(got_client.span.end_time_unix_nano, nanos(client.end));

    for s in &spans {
        assert_eq!(s.service_name().as_deref(), Some("frontend"));
        assert_eq!(
            s.resource.get("service.namespace").map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            s.resource.get("service.instance.id").map(String::as_str),
            Some("frontend-7d9f")
        );
    }
    let scope = collector.requests()[0].resource_spans[0].scope_spans[0]
        .scope
        .clone()
        .unwrap();
    assert_eq!(scope.name, remora_telemetry::SCOPE_NAME);
    eventually("exported count", Duration::from_secs(5), || {
        exporter.exported() == 2
    })
    .await;
    assert_eq!(exporter.dropped(), 0);
}

#[tokio::test]
async fn a_full_batch_goes_out_without_waiting_for_the_interval() {
    let collector = Collector::start().await.unwrap();
    let exporter = Exporter::start(ExporterConfig {
        max_batch: 10,
        interval: Duration::from_secs(3600),
        ..config(collector.endpoint())
    })
    .unwrap();
    for _ in 0..25 {
        exporter.submit(span("batched"));
    }
    let spans = collector.wait_for_spans(20, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 20, "two full batches; the partial one waits");
    assert!(collector
        .requests()
        .iter()
        .all(|r| r.resource_spans[0].scope_spans[0].spans.len() == 10));
    // Shutdown flushes the partial batch.
    assert!(exporter.shutdown(Duration::from_secs(5)).await);
    assert_eq!(collector.spans().len(), 25);
    // After shutdown, spans are refused and counted, never queued.
    exporter.submit(span("late"));
    assert_eq!(exporter.dropped(), 1);
}

async fn submit_timed(exporter: &ExporterHandle, n: usize) -> (Duration, Duration) {
    let spans: Vec<_> = (0..n).map(|_| span("load")).collect();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for s in spans {
        let t = Instant::now();
        exporter.submit(s);
        slowest = slowest.max(t.elapsed());
    }
    (started.elapsed(), slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_collector_submit_never_blocks_and_drops_are_counted() {
    let (recorder, metrics) = Metrics::new_local().unwrap();
    let exporter = metrics::with_local_recorder(&recorder, || {
        remora_telemetry::metrics::describe();
        Exporter::start(config(dead_endpoint())).unwrap()
    });
    let (total, slowest) = submit_timed(&exporter, 10_000).await;
    // A submit is a try_send: microseconds, even in a debug build.
    assert!(
        total < Duration::from_millis(500),
        "10,000 submits took {total:?}"
    );
    assert!(
        slowest < Duration::from_millis(50),
        "slowest submit took {slowest:?}"
    );
    assert!(exporter.dropped() > 0);
    // The queue (2048) is drained and its batches fail: in the end every span is
    // dropped and counted, none exported.
    eventually("all dropped", Duration::from_secs(20), || {
        exporter.dropped() == 10_000
    })
    .await;
    assert_eq!(exporter.exported(), 0);
    let text = metrics.render();
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0.0)
    };
    let full = value("remora_spans_dropped_total{reason=\"queue_full\"}");
    let failed = value("remora_spans_dropped_total{reason=\"export_failed\"}");
    assert!(full > 0.0 && failed > 0.0, "{text}");
    assert_eq!(full + failed, 10_000.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_collector_times_out_batches_and_requests_never_wait() {
    let collector = Collector::start().await.unwrap();
    collector.set_delay(Duration::from_secs(3));
    let exporter = Exporter::start(ExporterConfig {
        export_timeout: Duration::from_millis(200),
        queue_capacity: 100,
        max_batch: 50,
        ..config(collector.endpoint())
    })
    .unwrap();
    let (total, _) = submit_timed(&exporter, 1_000).await;
    assert!(
        total < Duration::from_millis(200),
        "1,000 submits took {total:?}"
    );
    eventually("timed-out batches dropped", Duration::from_secs(10), || {
        exporter.dropped() == 1_000
    })
    .await;
    assert_eq!(exporter.exported(), 0);
    // Once the collector is quick again, spans flow.
    collector.set_delay(Duration::ZERO);
    exporter.submit(span("after"));
    eventually("recovery", Duration::from_secs(10), || {
        exporter.exported() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_collector_counts_drops() {
    let collector = Collector::start().await.unwrap();
    collector.set_failing(true);
    let exporter = Exporter::start(config(collector.endpoint())).unwrap();
    for _ in 0..5 {
        exporter.submit(span("refused"));
    }
    eventually("drops", Duration::from_secs(10), || exporter.dropped() == 5).await;
    collector.set_failing(false);
    exporter.submit(span("accepted"));
    let spans = collector.wait_for_spans(1, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].name(), "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_resumes_by_itself_when_the_collector_comes_back() {
    let collector = Collector::start().await.unwrap();
    let addr: SocketAddr = collector.addr();
    let exporter = Exporter::start(config(collector.endpoint())).unwrap();
    exporter.submit(span("before"));
    assert_eq!(
        collector
            .wait_for_spans(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );

    collector.stop().await;
    exporter.submit(span("while-down"));
    eventually("drop while down", Duration::from_secs(10), || {
        exporter.dropped() == 1
    })
    .await;

    let collector = Collector::start_on(addr).await.unwrap();
    // Keep submitting until one gets through: the channel reconnects on its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    while collector.spans().is_empty() {
        assert!(Instant::now() < deadline, "no reconnect");
        exporter.submit(span("after"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(collector.spans().iter().all(|s| s.name() == "after"));
}
