//! `mesh-demo`: the local mesh demo behind `./examples/demo.sh`.
//!
//! Starts `remora-control`, applies `examples/policies/shop.yaml`, starts three
//! sample apps (frontend v1, backend v1, backend v2) each beside its own
//! `remora-proxy`, sends traffic to `backend.shop` through the frontend's sidecar
//! (explicit proxy mode) and reports where it went. With `--hold` the mesh stays
//! up until Ctrl-C; every child process is stopped when the demo ends, however it
//! ends.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use remora_examples::explicit_proxy::ProxyConnector;
use remora_examples::probe;
use tokio::time::Instant;

/// The demo's policies, applied with `remora-control apply -f -`.
const SHOP_YAML: &str = include_str!("../../policies/shop.yaml");
const BACKEND_URL: &str = "http://backend.shop:8080/api/orders";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Parser)]
#[command(name = "mesh-demo", about = "Remora's local mesh demo")]
struct Args {
    /// Keep the mesh running after the report, until Ctrl-C.
    #[arg(long)]
    hold: bool,
    /// How many requests to send through the 90/10 split.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut mesh = Mesh::new()?;
    let outcome = tokio::select! {
        r = run(&args, &mut mesh) => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Ok(())
        }
    };
    mesh.stop();
    if outcome.is_err() {
        // Keep the children's output for whoever debugs the failure.
        mesh.dir.disable_cleanup(true);
        eprintln!("logs of every process are in {}", mesh.logs.display());
    }
    outcome
}

async fn run(args: &Args, mesh: &mut Mesh) -> anyhow::Result<()> {
    let cp_grpc = free_addr()?;
    let cp_http = free_addr()?;
    let cp_url = format!("http://{cp_grpc}");
    let data_dir = mesh.dir.path().join("control-plane");
    std::fs::create_dir_all(&data_dir)?;

    let control_bin = mesh.bin("remora-control");
    println!(
        "==> starting remora-control on {cp_grpc} (data in {})",
        data_dir.display()
    );
    mesh.spawn(
        "remora-control",
        Command::new(&control_bin)
            .arg("serve")
            .args(["--listen", &cp_grpc.to_string()])
            .args(["--http-listen", &cp_http.to_string()])
            .arg("--data-dir")
            .arg(&data_dir),
    )?;
    let control = |args: &[&str]| {
        let mut cmd = Command::new(&control_bin);
        // The token comes from the data dir, not from the caller's environment.
        cmd.env_remove("REMORA_ADMIN_TOKEN")
            .args(["--server", &cp_url])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args);
        cmd
    };
    wait_until(READY_TIMEOUT, "remora-control status", || async {
        let status = control(&["status"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        Ok(status.success())
    })
    .await?;

    println!("==> applying examples/policies/shop.yaml");
    let applied = run_with_stdin(control(&["apply", "-f", "-"]), SHOP_YAML)?;
    print!("{}", indent(&applied));

    // Each workload proves who it is with a bootstrap token; its proxy makes
    // its key in memory and gets a certificate for it.
    let mut identity = Vec::new();
    for service in ["backend", "frontend"] {
        let token = command_output(control(&[
            "token",
            "create",
            "--service",
            service,
            "--namespace",
            "shop",
        ]))?;
        let path = mesh.dir.path().join(format!("{service}.token"));
        std::fs::write(&path, token.trim())?;
        identity.push((service, path));
    }
    let token_of = |service: &str| {
        identity
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, p)| p.clone())
            .unwrap_or_default()
    };
    let ca_file = data_dir.join("trust-bundle.pem");
    let backend_v1 =
        mesh.start_sidecar(&cp_url, &token_of("backend"), &ca_file, "backend", "v1")?;
    let backend_v2 =
        mesh.start_sidecar(&cp_url, &token_of("backend"), &ca_file, "backend", "v2")?;
    let frontend =
        mesh.start_sidecar(&cp_url, &token_of("frontend"), &ca_file, "frontend", "v1")?;
    let sidecars = [&frontend, &backend_v1, &backend_v2];
    for s in sidecars {
        probe::wait_for_200(s.health, "/ready", READY_TIMEOUT)
            .await
            .with_context(|| format!("the proxy of {} never became ready", s.name))?;
    }
    println!("==> all proxies ready");

    let client: Client<ProxyConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(ProxyConnector::new(frontend.outbound));

    // The frontend's proxy learns both backend endpoints from the control plane;
    // wait until it routes to each before counting.
    wait_until(READY_TIMEOUT, "routing to backend v1 and v2", || async {
        let v1 = send(&client, 1, false).await;
        let v2 = send(&client, 1, true).await;
        Ok(v1.failed == 0 && v2.served.contains_key("backend/v2"))
    })
    .await?;
    println!(
        "==> sending {} requests to {BACKEND_URL} through the frontend's sidecar ({})",
        args.requests, frontend.outbound
    );
    let split = send(&client, args.requests, false).await;
    println!("==> sending 10 requests with x-canary: 1");
    let canary = send(&client, 10, true).await;

    let status = control(&["status"]).output()?;
    report(
        args.requests,
        &split,
        &canary,
        &String::from_utf8_lossy(&status.stdout),
        &sidecars,
    );
    // What the frontend's sidecar counted, straight from its /metrics.
    let metrics = http_get_text(frontend.health, "/metrics")
        .await
        .unwrap_or_default();
    println!("\nfrontend sidecar, remora_requests_total (outbound):");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("remora_requests_total{") && l.contains("outbound"))
    {
        println!("  {line}");
    }
    println!(
        "\naccess logs (one JSON line per request; kept while --hold runs): {}/frontend-v1-proxy.log",
        mesh.logs.display()
    );
    match std::env::var("REMORA_OTLP_ENDPOINT") {
        Ok(e) if !e.is_empty() => println!(
            "traces: exported to {e}; open Jaeger (http://localhost:16686) and pick service \"frontend\""
        ),
        _ => println!(
            "traces: run Jaeger (docker run -p 16686:16686 -p 4317:4317 jaegertracing/all-in-one) \
             and start the demo with REMORA_OTLP_ENDPOINT=http://127.0.0.1:4317 to see every call as \
             a client and a server span; docker/compose.yaml wires this up for you"
        ),
    }

    if args.hold {
        println!(
            "\nThe mesh is up (logs in {}). Ctrl-C to stop.",
            mesh.logs.display()
        );
        println!("Try: curl -x http://{} {BACKEND_URL}", frontend.outbound);
        tokio::signal::ctrl_c().await?;
    }
    if split.failed > 0 || canary.failed > 0 {
        bail!("{} requests failed", split.failed + canary.failed);
    }
    if canary.served.get("backend/v2") != Some(&10) {
        bail!("not every x-canary request reached backend/v2");
    }
    Ok(())
}

// ------------------------------------------------------------------ traffic

#[derive(Default)]
struct Tally {
    /// `x-served-by` → how many answers.
    served: BTreeMap<String, usize>,
    failed: usize,
    first_error: Option<String>,
}

async fn send(client: &Client<ProxyConnector, Empty<Bytes>>, n: usize, canary: bool) -> Tally {
    let answers = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut req = http::Request::get(BACKEND_URL);
            if canary {
                req = req.header("x-canary", "1");
            }
            let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = resp.status();
            let served_by = resp
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let error = resp
                .headers()
                .get("x-remora-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            resp.into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(served_by)
            } else {
                Err(format!("status {status} x-remora-error {error:?}"))
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut tally = Tally::default();
    for answer in answers {
        match answer {
            Ok(by) => *tally.served.entry(by).or_default() += 1,
            Err(e) => {
                tally.failed += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

fn report(n: usize, split: &Tally, canary: &Tally, status: &str, sidecars: &[&Sidecar]) {
    let share = |t: &Tally, who: &str| {
        let got = t.served.get(who).copied().unwrap_or(0);
        (got, 100.0 * got as f64 / n.max(1) as f64)
    };
    let (v1, v1_pct) = share(split, "backend/v1");
    let (v2, v2_pct) = share(split, "backend/v2");
    println!("\n==================== report ====================");
    println!("canary split (HTTPRoute backend: 90 → v1, 10 → v2), {n} requests:");
    println!("  backend/v1  {v1:>5}  {v1_pct:5.1}%   (expected 90%)");
    println!("  backend/v2  {v2:>5}  {v2_pct:5.1}%   (expected 10%)");
    for (who, count) in &split.served {
        if who != "backend/v1" && who != "backend/v2" {
            println!("  {who:<10}  {count:>5}  (unexpected)");
        }
    }
    if split.failed > 0 {
        println!(
            "  failed      {:>5}  first error: {}",
            split.failed,
            split.first_error.as_deref().unwrap_or("")
        );
    }
    let on_v2 = canary.served.get("backend/v2").copied().unwrap_or(0);
    let mark = if on_v2 == 10 { "✓" } else { "✗" };
    println!("x-canary: 1 → {on_v2}/10 on backend/v2 {mark}");
    if canary.failed > 0 {
        println!(
            "  failed {} first error: {}",
            canary.failed,
            canary.first_error.as_deref().unwrap_or("")
        );
    }
    println!("\nremora-control status:\n{}", indent(status));
    println!("metrics:");
    for s in sidecars {
        println!("  {:<12} http://{}/metrics", s.name, s.health);
    }
    println!("================================================");
}

// ------------------------------------------------------------------ processes

struct Sidecar {
    name: String,
    outbound: SocketAddr,
    health: SocketAddr,
}

/// The demo's child processes and scratch directory. Dropping it kills whatever
/// still runs, so a failure or a panic leaves nothing behind.
struct Mesh {
    bin_dir: PathBuf,
    dir: tempfile::TempDir,
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl Mesh {
    fn new() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding mesh-demo's own path")?;
        let bin_dir = exe
            .parent()
            .context("mesh-demo has no parent directory")?
            .to_path_buf();
        for name in ["remora-control", "remora-proxy", "sample-app"] {
            if !bin_dir.join(name).exists() {
                bail!(
                    "{} is missing: run `cargo build --workspace --bins` first",
                    bin_dir.join(name).display()
                );
            }
        }
        let dir = tempfile::Builder::new().prefix("remora-demo-").tempdir()?;
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Self {
            bin_dir,
            dir,
            logs,
            children: Vec::new(),
        })
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Starts a child with its stdout and stderr in `logs/NAME.log`.
    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
        let log = File::create(self.logs.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// A sample app and its sidecar, labelled `version=VERSION`.
    fn start_sidecar(
        &mut self,
        cp_url: &str,
        token_file: &std::path::Path,
        ca_file: &std::path::Path,
        service: &str,
        version: &str,
    ) -> anyhow::Result<Sidecar> {
        let name = format!("{service}-{version}");
        let [app, inbound, outbound, admin, health] = free_addrs()?;
        println!("==> starting {name}: app on {app}, proxy inbound {inbound}, outbound {outbound}");
        self.spawn(
            &name,
            Command::new(self.bin("sample-app"))
                .args(["--name", service, "--version", version])
                .args(["--listen", &app.to_string()]),
        )?;
        self.spawn(
            &format!("{name}-proxy"),
            Command::new(self.bin("remora-proxy"))
                .arg("run")
                .args(["--control-plane", cp_url])
                .args(["--service", service, "--namespace", "shop"])
                .args(["--label", &format!("version={version}")])
                .args(["--app-port", &app.port().to_string()])
                .args(["--inbound-port", &inbound.port().to_string()])
                .args(["--advertise", &inbound.to_string()])
                .args(["--outbound-port", &outbound.port().to_string()])
                .args(["--admin-port", &admin.port().to_string()])
                .args(["--health-port", &health.port().to_string()])
                .arg("--token-file")
                .arg(token_file)
                .arg("--ca-file")
                .arg(ca_file)
                // Every request is traced when a collector is configured
                // (REMORA_OTLP_ENDPOINT, e.g. Jaeger's http://127.0.0.1:4317).
                .args(["--trace-sampling", "1"]),
        )?;
        Ok(Sidecar {
            name,
            outbound,
            health,
        })
    }

    /// SIGTERM to every child (newest first), then SIGKILL to whatever is still up
    /// after a grace period.
    fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in self.children.iter_mut().rev() {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("{name} did not stop after SIGTERM; killing it");
            }
        }
        self.children.retain_mut(|(_, child)| {
            let _ = child.kill();
            let _ = child.wait();
            false
        });
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_with_stdin(mut cmd: Command, input: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "remora-control apply failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("`{what}` did not succeed within {timeout:?}")
}

/// Addresses on 127.0.0.1 that are free right now, all different, and never
/// handed out before by this demo. They come from below the kernel's
/// ephemeral range: a port the kernel gave out and took back can be given again
/// at once, to another listener or to an outgoing connection (a sidecar's to
/// the control plane), before the process meant to listen on it starts.
fn free_addrs<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    static GIVEN: parking_lot::Mutex<Vec<u16>> = parking_lot::const_mutex(Vec::new());
    let mut given = GIVEN.lock();
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (20_000u16, ephemeral_low.clamp(20_001, 32_768));
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); N];
    for addr in addrs.iter_mut() {
        let mut tries = 0;
        let port = loop {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let port = low + ((seed >> 33) % u64::from(high - low)) as u16;
            if !given.contains(&port) && TcpListener::bind(("0.0.0.0", port)).is_ok() {
                break port;
            }
            tries += 1;
            if tries > 10_000 {
                bail!("no free port between {low} and {high}");
            }
        };
        given.push(port);
        *addr = SocketAddr::from(([127, 0, 0, 1], port));
    }
    Ok(addrs)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    free_addrs::<1>().map(|[a]| a)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Runs a CLI command and returns its stdout, or an error with its stderr.
fn command_output(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A plain HTTP/1.1 GET, for the sidecar's own endpoints.
async fn http_get_text(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}
