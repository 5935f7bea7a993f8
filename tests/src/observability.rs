//! Helpers for the telemetry tests: the Prometheus text format (parsing,
//! `promtool check metrics`), a real Prometheus server, trace ids and
//! `traceparent` headers, and the JSON access-log lines a proxy writes on its
//! stdout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{free_addr, Proc};
use crate::raw_http;

// ------------------------------------------------------------------ Prometheus text

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the text exposition format (comments skipped); an unparsable
    /// sample line is an error naming it.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).ok_or_else(|| format!("unparsable sample line {l:?}")))
            .collect::<Result<_, _>>()?;
        Ok(Exposition {
            text: text.to_owned(),
            samples,
        })
    }

    /// The samples of `name` carrying every label of `labels` (others allowed).
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
            })
            .collect()
    }

    /// The sum of [`Exposition::matching`] (0 when none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// The matching samples, one per line, for assertion messages.
    pub fn show(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for s in self.matching(name, labels) {
            let _ = writeln!(out, "{} {:?} {}", s.name, s.labels, s.value);
        }
        if out.is_empty() {
            out.push_str("(no such sample)\n");
        }
        out
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let close;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    close = i;
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    let (_, quote) = chars.next()?;
                    if quote != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
        rest = &body[close + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `GET /metrics` on `addr`, parsed; panics unless it answers 200 with
/// parsable text.
pub async fn scrape(addr: SocketAddr) -> Exposition {
    let resp = raw_http::get(addr, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET /metrics on {addr}: {e}"));
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(resp.status, 200, "GET /metrics on {addr}: {text}");
    Exposition::parse(&text).unwrap_or_else(|e| panic!("/metrics of {addr}: {e}\n{text}"))
}

/// `name` found on `PATH`, if it is there.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Runs `promtool check metrics` on `text`: `Ok` with its output when it finds
/// no problem, else `Err` with what it said.
pub fn promtool_check(promtool: &Path, text: &str) -> Result<String, String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", promtool.display()))?;
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .map_err(|e| format!("writing to promtool: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(format!("promtool check metrics: {}\n{said}", out.status))
    }
}

// ------------------------------------------------------------------ a Prometheus server

/// A `prometheus` server on a free port of 127.0.0.1 with its own storage,
/// scraping `targets` (their `/metrics`) at a fixed interval. Killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    addr: SocketAddr,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `binary` and waits (up to 30 s) until `/-/ready` answers 200.
    pub async fn start(binary: &Path, targets: &[SocketAddr], every: Duration) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("remora-prometheus-")
            .tempdir()
            .expect("a temp dir for prometheus");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let interval = format!("{}ms", every.as_millis());
        let config = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n\
             scrape_configs:\n  - job_name: remora\n    static_configs:\n      \
             - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("writing prometheus.yml");
        let addr = free_addr();
        let mut proc = Proc::spawn(
            "prometheus",
            Command::new(binary)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn"),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = raw_http::get(addr, "/-/ready").await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                proc.running() && tokio::time::Instant::now() < deadline,
                "prometheus did not become ready on {addr}\n{}",
                proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Prometheus {
            addr,
            proc,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /api/v1/query?query=PROMQL`: the answer's `data.result` array.
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let resp = raw_http::get(self.addr, &path)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let body = String::from_utf8_lossy(&resp.body).into_owned();
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if resp.status != 200 || json["status"] != "success" {
            return Err(format!("{}: {body}", resp.status));
        }
        json["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no data.result in {body}"))
    }

    /// `GET /api/v1/targets`, for an assertion message.
    pub async fn targets(&self) -> String {
        raw_http::get(self.addr, "/api/v1/targets")
            .await
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_else(|e| e.to_string())
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ------------------------------------------------------------------ trace context

/// A random trace id: 32 lowercase hex digits, never all zero.
pub fn random_trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

/// A random span id: 16 lowercase hex digits, never all zero.
pub fn random_span_id() -> String {
    format!("{:016x}", fastrand::u64(1..))
}

/// A W3C `traceparent` value.
pub fn traceparent(trace_id: &str, parent_id: &str, sampled: bool) -> String {
    format!(
        "00-{trace_id}-{parent_id}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// A `traceparent` value's parts: (trace id, parent id, flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub flags: String,
}

impl TraceParent {
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        (version == "00" && hex(trace_id, 32) && hex(parent_id, 16) && hex(flags, 2)).then(|| {
            TraceParent {
                trace_id: trace_id.to_owned(),
                parent_id: parent_id.to_owned(),
                flags: flags.to_owned(),
            }
        })
    }

    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }
}

// ------------------------------------------------------------------ access logs

/// A process's stdout as lines: each JSON line parsed, and every line that is
/// not JSON (as `Err`).
pub fn stdout_json_lines(proc: &Proc) -> Vec<Result<serde_json::Value, String>> {
    let text = std::fs::read_to_string(proc.log_dir().join("stdout")).unwrap_or_default();
    // The last line may still be being written: only complete lines count.
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{e}: {l:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_labels_and_escapes_are_parsed() {
        let text = "# HELP x y\n# TYPE x counter\n\
            remora_requests_total{direction=\"outbound\",service=\"a.b\",peer_identity=\"spiffe://c/ns/d\"} 7\n\
            up 1\n\
            h_bucket{le=\"+Inf\",q=\"a\\\"b,c\"} 3\n\
            g -1.5e-3 1700000000\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.samples.len(), 4);
        assert_eq!(e.sum("remora_requests_total", &[("service", "a.b")]), 7.0);
        assert_eq!(
            e.matching("remora_requests_total", &[])[0].labels["peer_identity"],
            "spiffe://c/ns/d"
        );
        assert_eq!(e.sum("up", &[]), 1.0);
        assert_eq!(e.matching("h_bucket", &[("q", "a\"b,c")]).len(), 1);
        assert_eq!(e.sum("g", &[]), -0.0015);
        assert_eq!(e.sum("nothing", &[]), 0.0);
        assert!(Exposition::parse("x{a=b} 1").is_err());
    }

    #[test]
    fn traceparents_round_trip() {
        let (t, s) = (random_trace_id(), random_span_id());
        let tp = TraceParent::parse(&traceparent(&t, &s, true)).unwrap();
        assert_eq!(
            (tp.trace_id.as_str(), tp.parent_id.as_str()),
            (t.as_str(), s.as_str())
        );
        assert!(tp.sampled());
        assert!(!TraceParent::parse(&traceparent(&t, &s, false))
            .unwrap()
            .sampled());
        assert!(TraceParent::parse("00-xyz-abc-01").is_none());
        assert_eq!(percent_encode("a{b=\"c\"}"), "a%7Bb%3D%22c%22%7D");
    }
}
