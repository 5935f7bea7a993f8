//! After a known number of recorded events, `/metrics` shows exactly those counter
//! values and histogram counts, described, with bounded labels only.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use remora_telemetry::metrics as m;
use remora_telemetry::{Metrics, RequestMetrics, ServiceMetrics, TcpMetrics, INBOUND, OUTBOUND};

/// `name{k="v",...}` → value, labels sorted.
type Samples = BTreeMap<String, f64>;

/// A careful parser of the text exposition format (as this exporter writes it).
fn parse(text: &str) -> (Samples, BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut samples = Samples::new();
    let mut help = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap();
            help.insert(name.to_string(), text.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let key = match series.split_once('{') {
            None => series.to_string(),
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap();
                let mut pairs = Vec::new();
                let mut rest = labels;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").unwrap();
                    let end = after.find('"').unwrap();
                    pairs.push(format!("{k}=\"{}\"", &after[..end]));
                    rest = after[end + 1..].trim_start_matches(',');
                }
                pairs.sort();
                format!("{name}{{{}}}", pairs.join(","))
            }
        };
        assert!(
            samples.insert(key, value).is_none(),
            "duplicate series {line:?}"
        );
    }
    (samples, help, types)
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    pairs.sort();
    if pairs.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", pairs.join(","))
    }
}

const PEER: &str = "spiffe://remora.local/ns/default/sa/web";

#[test]
fn counters_and_histograms_have_exactly_the_recorded_values() {
    let (recorder, metrics) = Metrics::new_local().unwrap();
    let (route, other_conn, tcp, svc) = metrics::with_local_recorder(&recorder, || {
        m::describe();
        m::set_config_version(42);
        m::set_control_plane_connected(true);
        m::set_cert_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        (
            RequestMetrics::new(OUTBOUND, "users", "users-api", PEER),
            // A second connection from the same peer: same series.
            RequestMetrics::new(OUTBOUND, "users", "users-api", PEER),
            TcpMetrics::new(INBOUND, "db"),
            ServiceMetrics::new("users"),
        )
    });
    // Handles for status codes and retry reasons resolve on first use, against the
    // recorder in scope: in the proxy, the global one.
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..7 {
            route.record(200, None, Duration::from_micros(800)); // ≤ 1 ms
        }
        for _ in 0..3 {
            other_conn.record(503, None, Duration::from_millis(40)); // ≤ 50 ms
        }
        route.record(200, Some(14), Duration::from_secs(2)); // ≤ 2.5 s
        route.record(200, Some(14), Duration::from_secs(45)); // beyond the last bucket
        route.retry("5xx");
        route.retry("5xx");
        route.retry("reset");
        tcp.sent(100);
        tcp.received(50);
        svc.rate_limited();
        svc.rate_limited();
        svc.overloaded();
        let breaker = svc.circuit_breaker("10.1.2.3:8080".parse().unwrap());
        breaker.set_open(true);
    });
    let mut conns: Vec<_> = (0..3).map(|_| tcp.open()).collect();
    drop(conns.pop()); // closed: 2 stay open

    let text = metrics.render();
    let (samples, help, types) = parse(&text);

    let base = [
        ("direction", "outbound"),
        ("service", "users"),
        ("route", "users-api"),
        ("peer_identity", PEER),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut l = base.to_vec();
        l.extend_from_slice(extra);
        l
    };
    let expect = |k: String, v: f64| {
        assert_eq!(samples.get(&k), Some(&v), "{k}\n---\n{text}");
    };
    expect(
        key(m::REQUESTS_TOTAL, &with(&[("status_code", "200")])),
        7.0,
    );
    expect(
        key(m::REQUESTS_TOTAL, &with(&[("status_code", "503")])),
        3.0,
    );
    expect(
        key(
            m::REQUESTS_TOTAL,
            &with(&[("status_code", "200"), ("grpc_status", "14")]),
        ),
        2.0,
    );
    let requests_series = samples
        .keys()
        .filter(|k| k.starts_with("remora_requests_total{"))
        .count();
    assert_eq!(requests_series, 3);

    let hist = |suffix: &str, extra: &[(&'static str, &'static str)]| {
        key(
            &format!("{}{suffix}", m::REQUEST_DURATION_SECONDS),
            &with(extra),
        )
    };
    expect(hist("_count", &[]), 12.0);
    expect(hist("_bucket", &[("le", "0.0005")]), 0.0);
    expect(hist("_bucket", &[("le", "0.001")]), 7.0);
    expect(hist("_bucket", &[("le", "0.025")]), 7.0);
    expect(hist("_bucket", &[("le", "0.05")]), 10.0);
    expect(hist("_bucket", &[("le", "2.5")]), 11.0);
    expect(hist("_bucket", &[("le", "30")]), 11.0);
    expect(hist("_bucket", &[("le", "+Inf")]), 12.0);
    let sum = samples[&hist("_sum", &[])];
    let want = 7.0 * 0.0008 + 3.0 * 0.04 + 2.0 + 45.0;
    assert!((sum - want).abs() < 1e-9, "sum {sum} want {want}");
    let buckets = samples
        .keys()
        .filter(|k| k.starts_with("remora_request_duration_seconds_bucket{"))
        .count();
    assert_eq!(buckets, m::DURATION_BUCKETS_SECONDS.len() + 1);

    let retry = |reason: &'static str| {
        key(
            m::RETRIES_TOTAL,
            &[
                ("service", "users"),
                ("route", "users-api"),
                ("reason", reason),
            ],
        )
    };
    expect(retry("5xx"), 2.0);
    expect(retry("reset"), 1.0);

    let tcp_labels = [("direction", "inbound"), ("service", "db")];
    expect(key(m::TCP_CONNECTIONS_OPEN, &tcp_labels), 2.0);
    expect(key(m::TCP_CONNECTIONS_TOTAL, &tcp_labels), 3.0);
    expect(
        key(
            m::TCP_BYTES_TOTAL,
            &[tcp_labels[0], tcp_labels[1], ("flow", "sent")],
        ),
        100.0,
    );
    expect(
        key(
            m::TCP_BYTES_TOTAL,
            &[tcp_labels[0], tcp_labels[1], ("flow", "received")],
        ),
        50.0,
    );
    expect(key(m::RATE_LIMITED_TOTAL, &[("service", "users")]), 2.0);
    expect(key(m::OVERLOADED_TOTAL, &[("service", "users")]), 1.0);
    expect(
        key(
            m::CIRCUIT_BREAKER_OPEN,
            &[("service", "users"), ("endpoint", "10.1.2.3:8080")],
        ),
        1.0,
    );
    expect(key(m::CONFIG_VERSION, &[]), 42.0);
    expect(key(m::CONTROL_PLANE_CONNECTED, &[]), 1.0);
    expect(key(m::CERT_EXPIRY_TIMESTAMP_SECONDS, &[]), 1_900_000_000.0);

    // Every rendered metric is described and typed.
    for (name, kind) in [
        (m::REQUESTS_TOTAL, "counter"),
        (m::REQUEST_DURATION_SECONDS, "histogram"),
        (m::RETRIES_TOTAL, "counter"),
        (m::TCP_CONNECTIONS_OPEN, "gauge"),
        (m::TCP_CONNECTIONS_TOTAL, "counter"),
        (m::TCP_BYTES_TOTAL, "counter"),
        (m::RATE_LIMITED_TOTAL, "counter"),
        (m::OVERLOADED_TOTAL, "counter"),
        (m::CIRCUIT_BREAKER_OPEN, "gauge"),
        (m::CONFIG_VERSION, "gauge"),
        (m::CONTROL_PLANE_CONNECTED, "gauge"),
        (m::CERT_EXPIRY_TIMESTAMP_SECONDS, "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        assert!(
            help.get(name).is_some_and(|h| !h.is_empty()),
            "{name} has no HELP"
        );
    }
    // No label carries a raw path or an id.
    assert!(!text.contains("/api"), "{text}");
    drop(conns);

    // Later requests keep adding to the same series, resolved handles need no recorder
    // in scope.
    route.record(200, None, Duration::from_millis(1));
    let (samples, _, _) = parse(&metrics.render());
    assert_eq!(
        samples[&key(m::REQUESTS_TOTAL, &with(&[("status_code", "200")]))],
        8.0
    );
}

#[test]
fn many_status_codes_beyond_the_cache_still_count() {
    let (recorder, metrics) = Metrics::new_local().unwrap();
    let route =
        metrics::with_local_recorder(&recorder, || RequestMetrics::new(INBOUND, "api", "all", ""));
    // 40 distinct codes: more than the per-handle cache holds. Counting the ones past
    // it needs the recorder in scope, as it would be globally installed in the proxy.
    metrics::with_local_recorder(&recorder, || {
        for code in 200..240u16 {
            for _ in 0..2 {
                route.record(code, None, Duration::from_millis(1));
            }
        }
    });
    let (samples, _, _) = parse(&metrics.render());
    for code in 200..240u16 {
        let code = code.to_string();
        let k = key(
            m::REQUESTS_TOTAL,
            &[
                ("direction", "inbound"),
                ("service", "api"),
                ("route", "all"),
                ("peer_identity", ""),
                ("status_code", &code),
            ],
        );
        assert_eq!(samples.get(&k), Some(&2.0), "{k}");
    }
}

#[test]
fn rendered_text_passes_promtool_check_metrics() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let (recorder, metrics) = Metrics::new_local().unwrap();
    metrics::with_local_recorder(&recorder, || {
        m::describe();
        m::set_config_version(7);
        m::set_control_plane_connected(false);
        m::set_cert_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let route = RequestMetrics::new(INBOUND, "api", "all", PEER);
        route.record(200, None, Duration::from_millis(3));
        route.record(200, Some(0), Duration::from_millis(3));
        route.retry("5xx");
        let tcp = TcpMetrics::new(OUTBOUND, "db");
        let _open = tcp.open();
        tcp.sent(1);
        tcp.received(1);
        let svc = ServiceMetrics::new("api");
        svc.rate_limited();
        svc.overloaded();
        svc.circuit_breaker("127.0.0.1:1".parse().unwrap())
            .set_open(false);
        metrics::counter!(m::SPANS_DROPPED_TOTAL, "reason" => "queue_full").increment(1);
        metrics::counter!(m::SPANS_EXPORTED_TOTAL).increment(1);
        metrics::counter!(m::ACCESS_LOGS_DROPPED_TOTAL).increment(1);
    });
    let text = metrics.render();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        // scripts/test.sh sets REMORA_STRICT_TESTS=1 as root, having installed it.
        assert!(
            std::env::var_os("REMORA_STRICT_TESTS").is_none_or(|v| v != "1"),
            "promtool (Debian package `prometheus`) is missing and REMORA_STRICT_TESTS=1"
        );
        eprintln!(
            "SKIPPED the promtool check: promtool not installed (Debian package `prometheus`)"
        );
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
