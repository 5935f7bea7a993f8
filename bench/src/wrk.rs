//! The one-core maximum with `wrk` (Debian's package), a C generator that
//! costs far less per request than the bench's own hyper client: on two cores
//! the generator and the upstream share one, so a cheap generator is what lets
//! the proxy, not core 0, be the limit.
//!
//! Its CPU is sampled from /proc while it runs (it is a child process; the
//! last sample before it exits is within 100 ms of its total).

use crate::loadgen::{Target, Throughput};
use anyhow::{bail, Context as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `wrk` is installed.
pub fn available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `conns` keep-alive connections from one wrk thread for `dur`, HTTP/1.1
/// GETs of `t` (its Host header sent as given, so an explicit proxy routes).
pub async fn closed_loop(t: &Target, conns: usize, dur: Duration) -> anyhow::Result<Throughput> {
    let host = t.host.to_str().context("the target's Host header")?;
    let path = t.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("http://{}{path}", t.addr);
    let secs = dur.as_secs().max(1);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s")])
        .args(["--timeout", "10s", "-H", &format!("Host: {host}")]);
    if let Some(auth) = &t.authorization {
        let auth = auth.to_str().context("the target's Authorization header")?;
        cmd.args(["-H", &format!("Authorization: {auth}")]);
    }
    let mut child = cmd
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk")?;
    let pid = child.id().to_string();
    let started = Instant::now();
    let mut cpu = 0.0;
    while child.try_wait()?.is_none() {
        cpu = crate::resources::cpu_seconds(&pid).max(cpu);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text, 100.0 * cpu / wall.max(1e-9))
}

/// The figures of wrk's summary.
fn parse(text: &str, gen_cpu: f64) -> anyhow::Result<Throughput> {
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .context("no Requests/sec in wrk's output")?
        .parse()
        .context("wrk's Requests/sec")?;
    let mut errors = 0u64;
    if let Some(bad) = field("Non-2xx or 3xx responses:") {
        errors += bad.parse::<u64>().unwrap_or(0);
    }
    if let Some(sock) = field("Socket errors:") {
        // "connect 0, read 0, write 0, timeout 0"
        errors += sock
            .split(',')
            .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(Throughput {
        rps,
        errors,
        gen_cpu,
        steal: 0.0,
        first_error: (errors > 0).then(|| format!("wrk: {errors} errors")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rate_and_errors_from_the_summary() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n\
                   Requests/sec:  45596.69\nTransfer/sec:      4.2MB\n";
        let t = parse(out, 50.0).unwrap();
        assert_eq!(t.rps, 45596.69);
        assert_eq!(t.errors, 0);
        let out = "  Socket errors: connect 0, read 3, write 0, timeout 2\n  \
                   Non-2xx or 3xx responses: 7\nRequests/sec:   100.00\n";
        let t = parse(out, 1.0).unwrap();
        assert_eq!(t.errors, 12);
        assert!(t.first_error.is_some());
        assert!(parse("garbage", 0.0).is_err());
    }
}
