//! The figures, as a Markdown table and the same numbers as JSON, and the
//! verdict against issue 7's targets. Every figure is the median over the runs
//! with the spread (min–max) beside it when there was more than one run.

use crate::discovery_sim::{EndpointChange, Propagation};
use crate::loadgen::{Latency, Throughput};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// A generator above this share of its core may be what limits a figure.
const GEN_SATURATED: f64 = 85.0;

#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    n: usize,
}

pub fn spread(values: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread::default();
    }
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
        n: v.len(),
    }
}

impl Spread {
    fn show(&self, decimals: usize) -> String {
        if self.n > 1 {
            format!(
                "{:.d$} ({:.d$}–{:.d$})",
                self.median,
                self.min,
                self.max,
                d = decimals
            )
        } else {
            format!("{:.d$}", self.median, d = decimals)
        }
    }
    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

pub struct LatencyRow {
    pub path: String,
    pub proto: &'static str,
    pub rate: u64,
    pub runs: Vec<Latency>,
    /// Per run: p50, p90, p99, p99.9 minus the direct path's in the same round.
    pub added: Vec<[f64; 4]>,
}

pub struct MaxRow {
    pub path: String,
    /// Per run: the throughput and the measured processes' CPU (% of a core).
    pub runs: Vec<(Throughput, f64)>,
}

pub struct LoadSample {
    pub cpu_per_1k: f64,
    pub peak_mib: f64,
    pub rss_mib: f64,
    pub gen_cpu: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

pub struct ResourceRow {
    pub path: String,
    pub idle_rss_mib: f64,
    pub idle_cpu_ms_per_s: f64,
    pub runs: Vec<LoadSample>,
}

pub struct HandshakeRow {
    pub path: String,
    /// Per run: the throughput and the proxies' CPU milliseconds per connection.
    pub runs: Vec<(Throughput, f64)>,
}

pub struct PropagationRow {
    pub runs: Vec<Propagation>,
    /// Discovery streams that broke and reconnected while this row was measured.
    pub reconnects: usize,
    /// The most of: with the proxies connected and quiet, after the runs.
    pub control_plane_rss_mib: f64,
    /// One more endpoint, as every other proxy got it.
    pub endpoint_change: Option<EndpointChange>,
    /// Control-plane replicas the proxies were spread over (sharing etcd);
    /// the RSS is the largest replica's.
    pub replicas: usize,
}

#[derive(Default)]
pub struct Report {
    pub meta: Value,
    pub latency: Vec<LatencyRow>,
    pub max: Vec<MaxRow>,
    pub resources: Vec<ResourceRow>,
    pub handshakes: Vec<HandshakeRow>,
    pub propagation: Vec<PropagationRow>,
    pub notes: Vec<String>,
}

/// Requests per second per core of proxy CPU in one closed-loop run.
fn per_core((t, cpu): &(Throughput, f64)) -> f64 {
    t.rps / (cpu / 100.0).max(0.01)
}

fn lat_spread(rows: &[Latency], f: impl Fn(&Latency) -> f64) -> Spread {
    spread(rows.iter().map(f))
}

impl Report {
    fn find_latency(&self, path: &str, proto: &str, rate: u64) -> Option<&LatencyRow> {
        self.latency
            .iter()
            .find(|r| r.path == path && r.proto == proto && r.rate == rate)
    }

    fn max_rps(&self, path: &str) -> Option<f64> {
        let r = self.max.iter().find(|r| r.path == path)?;
        Some(spread(r.runs.iter().map(|(t, _)| t.rps)).median)
    }

    fn max_per_core(&self, path: &str) -> Option<f64> {
        let r = self.max.iter().find(|r| r.path == path)?;
        Some(spread(r.runs.iter().map(per_core)).median)
    }

    /// Issue 7's targets, each with the figures it was judged on.
    pub fn verdict(&self) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        let rates: Vec<u64> = {
            let mut r: Vec<u64> = self.latency.iter().map(|r| r.rate).collect();
            r.dedup();
            r.sort_unstable();
            r.dedup();
            r
        };
        for &rate in &rates {
            for proto in ["HTTP/1.1", "gRPC"] {
                let added = |p: &str, i: usize| {
                    self.find_latency(p, proto, rate)
                        .map(|r| spread(r.added.iter().map(|a| a[i])).median)
                };
                for (i, q) in [(0, "p50"), (2, "p99")] {
                    let nginx = added("nginx", i);
                    for (path, per) in [("remora 1 hop", 1.0), ("remora mesh (2 hops)", 2.0)] {
                        if let (Some(r), Some(n)) = (added(path, i), nginx) {
                            let per_hop = r / per;
                            out.push((
                                per_hop <= n,
                                format!("{path}: {proto} {q} added per hop at {rate} rps {per_hop:.0} µs vs nginx {n:.0} µs"),
                            ));
                        }
                    }
                }
            }
        }
        for rate in rates {
            let added = |p: &str, i: usize| {
                self.find_latency(p, "HTTP/1.1", rate)
                    .map(|r| spread(r.added.iter().map(|a| a[i])).median)
            };
            if let (Some(j50), Some(p50), Some(j99), Some(p99)) = (
                added("remora 1 hop + JWT", 0),
                added("remora 1 hop", 0),
                added("remora 1 hop + JWT", 2),
                added("remora 1 hop", 2),
            ) {
                // Informative: what checking a token adds to the same hop.
                out.push((
                    true,
                    format!(
                        "JWT-checked route vs plain route, HTTP/1.1 at {rate} rps: p50 {:+.0} µs, p99 {:+.0} µs",
                        j50 - p50,
                        j99 - p99
                    ),
                ));
            }
        }
        if let (Some(r), Some(n)) = (self.max_rps("remora 1 hop"), self.max_rps("nginx")) {
            out.push((
                r >= n,
                format!("one core: remora {r:.0} rps vs nginx (1 worker) {n:.0} rps"),
            ));
        }
        if let (Some(r), Some(n)) = (
            self.max_per_core("remora 1 hop"),
            self.max_per_core("nginx"),
        ) {
            out.push((
                r >= n,
                format!(
                    "one core, per core-second of proxy CPU: remora {r:.0} rps vs nginx {n:.0} rps"
                ),
            ));
        }
        if let Some(r) = self.resources.iter().find(|r| r.path == "remora 1 hop") {
            // The targets are in MB (10^6 bytes); the tables show MiB.
            let mb = |mib: f64| mib * 1024.0 * 1024.0 / 1e6;
            let idle = r.idle_rss_mib;
            out.push((
                mb(idle) < 10.0,
                format!(
                    "idle RSS {idle:.1} MiB = {:.1} MB (target < 10 MB)",
                    mb(idle)
                ),
            ));
            let peak = spread(r.runs.iter().map(|s| s.peak_mib)).median;
            out.push((
                mb(peak) < 20.0,
                format!(
                    "peak RSS at 1,000 rps over 100 connections {peak:.1} MiB = {:.1} MB (target < 20 MB)",
                    mb(peak)
                ),
            ));
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.meta;
        let _ = writeln!(md, "# Remora benchmark\n");
        let _ = writeln!(
            md,
            "`{}` — {} mode, {} run(s) per figure, shown as median (min–max). {}; load average at start {}; \
             the hypervisor took {:.1} % of the machine's CPU time during the run (steal: a noisy neighbour; \
             the tables show it per run, and a run with more than {} % is repeated, up to twice). Responses \
             are 1 KiB; latencies in µs.\n",
            m["command"].as_str().unwrap_or(""),
            m["mode"].as_str().unwrap_or(""),
            m["runs"],
            m["placement"].as_str().unwrap_or(""),
            m["loadavg"].as_str().unwrap_or("?"),
            m["steal_pct"].as_f64().unwrap_or(0.0),
            m["steal_limit_pct"],
        );
        let _ = writeln!(
            md,
            "## Latency added over direct\n\nOpen loop: request i is due at t0 + i/rate and timed from then \
             (corrects coordinated omission); {} keep-alive connections (gRPC: one HTTP/2 connection, as many \
             streams). `+pNN` is the path's percentile minus direct's from the same round.\n",
            m["latency_connections"]
        );
        md.push_str("| path | proto | rate | p50 | p90 | p99 | p99.9 | +p50 | +p90 | +p99 | +p99.9 | rps done | errors | gen CPU % | steal % |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.latency {
            let a = |i: usize| spread(r.added.iter().map(|a| a[i])).show(0);
            let errors: u64 = r.runs.iter().map(|l| l.errors).sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                r.proto,
                r.rate,
                lat_spread(&r.runs, |l| l.p50).show(0),
                lat_spread(&r.runs, |l| l.p90).show(0),
                lat_spread(&r.runs, |l| l.p99).show(0),
                lat_spread(&r.runs, |l| l.p999).show(0),
                a(0),
                a(1),
                a(2),
                a(3),
                lat_spread(&r.runs, |l| l.rps).show(0),
                errors,
                lat_spread(&r.runs, |l| l.gen_cpu).show(0),
                lat_spread(&r.runs, |l| l.steal).show(1),
            );
        }
        let _ = writeln!(
            md,
            "\n## Highest rate on one core\n\n{} run(s) per path. Closed loop ({}), {} connections, HTTP/1.1, for {} s; the proxy (both \
             sidecars for the mesh path) pinned to core 1, the generator and the upstream to core 0. \
             `proxy CPU` near 100 % means the proxy was the limit; `rps per proxy core` is rps divided by the \
             proxy's share of a core, its cost per request however busy the generator was.\n",
            m["max_runs"],
            m["max_generator"].as_str().unwrap_or("closed loop"),
            m["max_connections"],
            m["max_seconds"]
        );
        md.push_str(
            "| path | rps | proxy CPU % | rps per proxy core | gen CPU % | steal % | errors |\n|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.max {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                spread(r.runs.iter().map(|(t, _)| t.rps)).show(0),
                spread(r.runs.iter().map(|(_, c)| *c)).show(0),
                if r.path == "direct" {
                    "".to_string()
                } else {
                    spread(r.runs.iter().map(per_core)).show(0)
                },
                spread(r.runs.iter().map(|(t, _)| t.gen_cpu)).show(0),
                spread(r.runs.iter().map(|(t, _)| t.steal)).show(1),
                r.runs.iter().map(|(t, _)| t.errors).sum::<u64>(),
            );
        }
        let _ = writeln!(
            md,
            "\n## CPU and memory\n\nIdle: after start-up, before any traffic. Under load: 1,000 rps (open loop) \
             over 100 connections for {} s, HTTP/1.1; peak RSS is VmHWM reset just before the run. nginx counts \
             master + worker.\n",
            m["resource_seconds"]
        );
        md.push_str("| path | idle RSS MiB | idle CPU ms/s | CPU s per 1k req | peak RSS MiB | RSS after MiB | gen CPU % | errors |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.resources {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.2} | {} | {} | {} | {} | {} |",
                r.path,
                r.idle_rss_mib,
                r.idle_cpu_ms_per_s,
                spread(r.runs.iter().map(|s| s.cpu_per_1k)).show(4),
                spread(r.runs.iter().map(|s| s.peak_mib)).show(1),
                spread(r.runs.iter().map(|s| s.rss_mib)).show(1),
                spread(r.runs.iter().map(|s| s.gen_cpu)).show(0),
                r.runs.iter().map(|s| s.errors).sum::<u64>(),
            );
        }
        let _ = writeln!(
            md,
            "\n## New connections per second\n\n{} closed-loop clients for {} s, each opening a new connection per \
             request. Mesh: `CONNECT {}` to the client sidecar, which opens a new mTLS connection to the server \
             sidecar for every tunnel (no pooling for tunnels), then one `GET` through it; so each completed \
             tunnel is one proxy-to-proxy mTLS handshake (plus two plain TCP connects). Direct: a plain TCP \
             connection and one `GET` to the upstream, the floor.\n",
            m["handshake_concurrency"],
            m["handshake_seconds"],
            crate::targets::AUTHORITY
        );
        md.push_str("| path | connections/s | proxies' CPU ms per connection | gen CPU % | errors |\n|---|---:|---:|---:|---:|\n");
        for r in &self.handshakes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                r.path,
                spread(r.runs.iter().map(|(t, _)| t.rps)).show(0),
                spread(r.runs.iter().map(|(_, c)| *c)).show(3),
                spread(r.runs.iter().map(|(t, _)| t.gen_cpu)).show(0),
                r.runs.iter().map(|(t, _)| t.errors).sum::<u64>(),
            );
        }
        md.push_str(
            "\n## Policy propagation\n\nSimulated proxies (each its own mTLS connection and Discovery stream, an \
             endpoint each) ACK every snapshot on arrival. Timed from the Admin `Apply` call to the last ACK of \
             the new version. One more endpoint: the message each other proxy got when one more registered \
             (a delta; the new proxy's complete snapshot beside it).\n\n",
        );
        md.push_str("| proxies | replicas | first ACK ms | median ms | p99 ms | all ACKed ms | apply bytes | one more endpoint: bytes per proxy | complete snapshot bytes | control-plane RSS MiB (largest replica) | stream reconnects |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.propagation {
            let s = |f: fn(&Propagation) -> f64| spread(r.runs.iter().map(f));
            let e = r.endpoint_change.as_ref();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
                r.runs.first().map_or(0, |p| p.proxies),
                r.replicas,
                s(|p| p.first_ms).show(1),
                s(|p| p.p50_ms).show(1),
                s(|p| p.p99_ms).show(1),
                s(|p| p.all_ms).show(1),
                r.runs.iter().map(|p| p.snapshot_bytes).max().unwrap_or(0),
                e.map_or("–".into(), |e| format!(
                    "{} (max {})",
                    e.p50_bytes, e.max_bytes
                )),
                e.map_or("–".into(), |e| e.complete_bytes.to_string()),
                r.control_plane_rss_mib,
                r.reconnects,
            );
        }
        md.push_str("\n## Verdict\n\n");
        for (ok, line) in self.verdict() {
            let _ = writeln!(md, "- {} {line}", if ok { "PASS" } else { "FAIL" });
        }
        let mut notes = self.notes.clone();
        let saturated = self
            .latency
            .iter()
            .flat_map(|r| r.runs.iter())
            .any(|l| l.gen_cpu > GEN_SATURATED)
            || self
                .max
                .iter()
                .flat_map(|r| r.runs.iter())
                .any(|(t, _)| t.gen_cpu > GEN_SATURATED);
        if saturated {
            notes.push(format!("the load generator used more than {GEN_SATURATED}% of its core in some runs: those figures may be the generator's limit"));
        }
        // The direct path's maximum is what the generator and the upstream on
        // core 0 can do; a proxy that comes close to it may be faster than shown.
        if let Some(floor) = self.max_rps("direct") {
            for r in self.max.iter().filter(|r| r.path != "direct") {
                let rps = spread(r.runs.iter().map(|(t, _)| t.rps)).median;
                if rps > 0.9 * floor {
                    notes.push(format!(
                        "one core: {} reached {rps:.0} rps, within 10 % of direct ({floor:.0}): core 0 (generator + upstream) was the limit, so this is a lower bound",
                        r.path
                    ));
                }
            }
        }
        if !notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for n in notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    pub fn json(&self) -> Value {
        let lat: Vec<Value> = self
            .latency
            .iter()
            .map(|r| {
                let q = |f: fn(&Latency) -> f64| lat_spread(&r.runs, f).json();
                let a = |i: usize| spread(r.added.iter().map(|a| a[i])).json();
                json!({
                    "path": r.path, "proto": r.proto, "rate": r.rate,
                    "p50_us": q(|l| l.p50), "p90_us": q(|l| l.p90), "p99_us": q(|l| l.p99),
                    "p999_us": q(|l| l.p999), "max_us": q(|l| l.max),
                    "added_p50_us": a(0), "added_p90_us": a(1), "added_p99_us": a(2), "added_p999_us": a(3),
                    "achieved_rps": q(|l| l.rps), "gen_cpu_pct": q(|l| l.gen_cpu),
                    "steal_pct": q(|l| l.steal),
                    "requests": r.runs.iter().map(|l| l.ok).sum::<u64>(),
                    "errors": r.runs.iter().map(|l| l.errors).sum::<u64>(),
                    "first_error": r.runs.iter().find_map(|l| l.first_error.clone()),
                })
            })
            .collect();
        let max: Vec<Value> = self
            .max
            .iter()
            .map(|r| {
                json!({
                    "path": r.path,
                    "rps": spread(r.runs.iter().map(|(t, _)| t.rps)).json(),
                    "proxy_cpu_pct": spread(r.runs.iter().map(|(_, c)| *c)).json(),
                    "rps_per_proxy_core": spread(r.runs.iter().map(per_core)).json(),
                    "steal_pct": spread(r.runs.iter().map(|(t, _)| t.steal)).json(),
                    "gen_cpu_pct": spread(r.runs.iter().map(|(t, _)| t.gen_cpu)).json(),
                    "errors": r.runs.iter().map(|(t, _)| t.errors).sum::<u64>(),
                    "first_error": r.runs.iter().find_map(|(t, _)| t.first_error.clone()),
                })
            })
            .collect();
        let res: Vec<Value> = self
            .resources
            .iter()
            .map(|r| {
                json!({
                    "path": r.path, "idle_rss_mib": r.idle_rss_mib, "idle_cpu_ms_per_s": r.idle_cpu_ms_per_s,
                    "cpu_s_per_1k_requests": spread(r.runs.iter().map(|s| s.cpu_per_1k)).json(),
                    "peak_rss_mib_under_load": spread(r.runs.iter().map(|s| s.peak_mib)).json(),
                    "rss_mib_after_load": spread(r.runs.iter().map(|s| s.rss_mib)).json(),
                    "gen_cpu_pct": spread(r.runs.iter().map(|s| s.gen_cpu)).json(),
                    "errors": r.runs.iter().map(|s| s.errors).sum::<u64>(),
                    "first_error": r.runs.iter().find_map(|s| s.first_error.clone()),
                })
            })
            .collect();
        let hs: Vec<Value> = self
            .handshakes
            .iter()
            .map(|r| {
                json!({
                    "path": r.path,
                    "connections_per_s": spread(r.runs.iter().map(|(t, _)| t.rps)).json(),
                    "proxy_cpu_ms_per_connection": spread(r.runs.iter().map(|(_, c)| *c)).json(),
                    "gen_cpu_pct": spread(r.runs.iter().map(|(t, _)| t.gen_cpu)).json(),
                    "errors": r.runs.iter().map(|(t, _)| t.errors).sum::<u64>(),
                    "first_error": r.runs.iter().find_map(|(t, _)| t.first_error.clone()),
                })
            })
            .collect();
        let prop: Vec<Value> = self
            .propagation
            .iter()
            .map(|r| {
                let s = |f: fn(&Propagation) -> f64| spread(r.runs.iter().map(f)).json();
                json!({
                    "proxies": r.runs.first().map_or(0, |p| p.proxies),
                    "replicas": r.replicas,
                    "first_ack_ms": s(|p| p.first_ms), "median_ack_ms": s(|p| p.p50_ms),
                    "p99_ack_ms": s(|p| p.p99_ms),
                    "all_acked_ms": s(|p| p.all_ms),
                    "endpoint_change": r.endpoint_change.as_ref().map(|e| json!({
                        "p50_bytes": e.p50_bytes, "max_bytes": e.max_bytes, "deltas": e.deltas,
                        "all_ms": e.all_ms, "complete_bytes": e.complete_bytes,
                    })),
                    "snapshot_bytes": r.runs.iter().map(|p| p.snapshot_bytes).max().unwrap_or(0),
                    "control_plane_rss_mib": r.control_plane_rss_mib,
                    "stream_reconnects": r.reconnects,
                })
            })
            .collect();
        let verdict: Vec<Value> = self
            .verdict()
            .into_iter()
            .map(|(ok, what)| json!({"pass": ok, "what": what}))
            .collect();
        json!({
            "meta": self.meta, "latency": lat, "max_rps_one_core": max, "resources": res,
            "new_connections": hs, "propagation": prop, "verdict": verdict, "notes": self.notes,
        })
    }
}
