//! Upstreams the test controls and what the resilience tests read back: the
//! sample app's fault controls (`/control/*`, sent to the app's own port, never
//! through the mesh), its `/stats`, Prometheus samples by label, and latency
//! percentiles.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::mesh::{App, Proxy};
use crate::raw_http;

/// `POST path_and_query` on the app's own port; panics unless it answers 200.
pub async fn control(app: &App, path_and_query: &str) {
    let addr = app.addr();
    let req = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    let resp = raw_http::exchange(addr, req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("POST {path_and_query} on the app at {addr}: {e}"));
    assert_eq!(
        resp.status,
        200,
        "POST {path_and_query} on the app: {:?}",
        String::from_utf8_lossy(&resp.body)
    );
}

/// The app's next `count` ordinary requests answer `status`.
pub async fn fail_next(app: &App, count: u64, status: u16) {
    control(app, &format!("/control/fail?count={count}&status={status}")).await;
}

/// The app's next `count` gRPC calls answer `grpc-status: code`.
pub async fn fail_next_grpc(app: &App, count: u64, code: u32) {
    control(
        app,
        &format!("/control/fail?count={count}&status=503&grpc={code}"),
    )
    .await;
}

/// Every ordinary request waits `ms` first (0: no more delay).
pub async fn set_slow(app: &App, ms: u64) {
    control(app, &format!("/control/slow?ms={ms}")).await;
}

/// The app's next `count` ordinary requests have their connection closed
/// without an answer.
pub async fn reset_next(app: &App, count: u64) {
    control(app, &format!("/control/reset?count={count}")).await;
}

/// Every fault control back to normal.
pub async fn clear_faults(app: &App) {
    control(app, "/control/clear").await;
}

/// The app's `/stats`: `requests`, `paths`, `failed`, `reset`.
pub async fn app_stats(app: &App) -> serde_json::Value {
    let resp = raw_http::get(app.addr(), "/stats")
        .await
        .expect("GET /stats on the app");
    serde_json::from_slice(&resp.body).expect("/stats answers JSON")
}

/// How many requests for `path` the app has seen.
pub async fn path_count(app: &App, path: &str) -> u64 {
    app_stats(app).await["paths"][path].as_u64().unwrap_or(0)
}

/// One sample of Prometheus text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus text exposition (comments skipped; escapes in label
/// values are kept as written except `\"`).
pub fn parse_samples(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    samples
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, next)) = chars.next() {
                        value.push(next);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(name.trim().trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// Every sample of the proxy's `/metrics` now.
pub async fn samples(proxy: &Proxy) -> Vec<Sample> {
    let resp = raw_http::get(proxy.health(), "/metrics")
        .await
        .expect("GET /metrics on the proxy");
    parse_samples(&String::from_utf8_lossy(&resp.body))
}

/// The sum of every sample of `name` whose labels include all of `labels`
/// (0 when there is none).
pub async fn metric_sum(proxy: &Proxy, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_of(&samples(proxy).await, name, labels)
}

/// The sum of every sample of `name` in `samples` with all of `labels`.
pub fn sum_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Waits (up to 10 s) until the proxy has applied policy version `version`
/// (its `remora_config_version`).
pub async fn wait_config_version(proxy: &Proxy, version: u64) {
    crate::eventually(
        Duration::from_secs(10),
        &format!("the proxy to apply policy version {version}"),
        || async {
            let v = metric_sum(proxy, "remora_config_version", &[]).await;
            (v >= version as f64).then_some(())
        },
    )
    .await;
}

/// The `p`-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_their_labels() {
        let text = "# TYPE remora_retries_total counter\n\
            remora_retries_total{service=\"backend.shop\",route=\"retry\",reason=\"status\"} 2\n\
            remora_config_version 7\n\
            odd{a=\"x\\\"y,z\"} 1.5\n";
        let s = parse_samples(text);
        assert_eq!(s.len(), 3);
        assert_eq!(
            sum_of(&s, "remora_retries_total", &[("route", "retry")]),
            2.0
        );
        assert_eq!(sum_of(&s, "remora_retries_total", &[("route", "x")]), 0.0);
        assert_eq!(sum_of(&s, "remora_config_version", &[]), 7.0);
        assert_eq!(s[2].labels["a"], "x\"y,z");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&ms, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&ms, 100.0), Duration::from_millis(100));
    }
}
