//! The mesh's processes: the control plane, sample apps and proxies.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use remora_examples::probe;
use tokio::io::AsyncWriteExt;

use crate::process::{bin, free_addr, free_port, Proc};
use crate::raw_http;

/// How long a control plane or a proxy may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `remora-control` CLI call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ control plane

/// A `remora-control serve` with its own ports and data dir.
#[derive(Debug)]
pub struct ControlPlane {
    grpc: SocketAddr,
    http: SocketAddr,
    data_dir: PathBuf,
    proc: Option<Proc>,
    _owned_dir: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// Starts a control plane on a fresh data dir and waits for `/ready`.
    pub async fn start() -> ControlPlane {
        let dir = tempfile::Builder::new()
            .prefix("remora-cp-data-")
            .tempdir()
            .expect("a temp data dir");
        let mut cp = ControlPlane::start_with(dir.path()).await;
        cp._owned_dir = Some(dir);
        cp
    }

    /// Starts a control plane on `data_dir` (which the caller keeps).
    pub async fn start_with(data_dir: &Path) -> ControlPlane {
        let mut cp = ControlPlane {
            grpc: free_addr(),
            http: free_addr(),
            data_dir: data_dir.to_path_buf(),
            proc: None,
            _owned_dir: None,
        };
        cp.spawn_and_wait().await;
        cp
    }

    async fn spawn_and_wait(&mut self) {
        let proc = Proc::spawn(
            "remora-control",
            Command::new(bin("remora-control"))
                .arg("serve")
                .args(["--listen", &self.grpc.to_string()])
                .args(["--http-listen", &self.http.to_string()])
                .arg("--data-dir")
                .arg(&self.data_dir),
        );
        let proc = self.proc.insert(proc);
        if let Err(e) = probe::wait_for_200(self.http, "/ready", READY_TIMEOUT).await {
            panic!("the control plane never became ready: {e}\n{}", proc.logs());
        }
    }

    /// The gRPC address proxies and the CLI use: `http://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The HTTP address (`/ready`, `/metrics`).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs `remora-control --server URL --data-dir DIR ARGS...`.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None).await
    }

    /// Runs the CLI with `stdin` on its standard input.
    pub async fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_control(&self.url(), &self.data_dir, args, stdin).await
    }

    /// `apply -f -` with `yaml` on stdin.
    pub async fn apply_yaml(&self, yaml: &str) -> Output {
        self.cli_with_stdin(&["apply", "-f", "-"], Some(yaml)).await
    }

    /// Applies `yaml`, panicking if it is refused; the new version.
    pub async fn apply_ok(&self, yaml: &str) -> u64 {
        let out = self.apply_yaml(yaml).await;
        let stdout = expect_success(&out, "apply");
        crate::parse_version(&stdout)
            .unwrap_or_else(|| panic!("no version in the answer to apply: {stdout:?}"))
    }

    /// Runs the CLI and returns its stdout, panicking unless it succeeded.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        expect_success(&out, &args.join(" "))
    }

    /// `remora-control status`, parsed.
    pub async fn status(&self) -> Status {
        Status::parse(&self.cli_ok(&["status"]).await)
    }

    /// Kills the control plane with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
    }

    /// Starts the control plane again on the same ports and data dir.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn_and_wait().await;
    }

    pub fn logs(&self) -> String {
        self.proc.as_ref().map(Proc::logs).unwrap_or_default()
    }
}

/// Runs `remora-control --server URL --data-dir DIR ARGS...` with a deadline.
pub async fn run_control(url: &str, data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(bin("remora-control"));
    crate::scrub_env(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.args(["--server", url])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting remora-control {args:?}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .expect("writing the CLI's stdin");
        drop(pipe);
    }
    tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("remora-control {args:?} took more than {CLI_TIMEOUT:?}"))
        .expect("waiting for remora-control")
}

/// The stdout of a successful command; panics with its stderr otherwise.
pub fn expect_success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "`remora-control {what}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `remora-control status` shows: a line `policy version P (snapshot S)`,
/// then a table with a row per connected proxy.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub text: String,
    pub policy_version: Option<u64>,
    pub snapshot_version: Option<String>,
    pub proxies: Vec<ProxyRow>,
}

/// One proxy in `status`: cells by column name (`SERVICE`, `ADDRESS`, `ACKED`...).
#[derive(Debug, Clone, Default)]
pub struct ProxyRow {
    pub cells: std::collections::BTreeMap<String, String>,
}

impl ProxyRow {
    pub fn cell(&self, column: &str) -> &str {
        self.cells.get(column).map_or("", String::as_str)
    }

    /// The advertised address, without a `(deregistered)` note.
    pub fn address(&self) -> &str {
        self.cell("ADDRESS").split_whitespace().next().unwrap_or("")
    }

    /// Whether the proxy is an endpoint (not deregistered).
    pub fn registered(&self) -> bool {
        !self.cell("ADDRESS").contains("deregistered")
    }

    pub fn acked(&self) -> &str {
        self.cell("ACKED")
    }
}

impl Status {
    pub fn parse(text: &str) -> Status {
        let mut status = Status {
            text: text.to_owned(),
            ..Status::default()
        };
        let mut header: Option<Vec<String>> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("policy version ") {
                status.policy_version = rest.split_whitespace().next().and_then(|v| v.parse().ok());
                status.snapshot_version = rest
                    .split_once("(snapshot ")
                    .and_then(|(_, s)| s.split_once(')'))
                    .map(|(s, _)| s.trim().to_owned());
                continue;
            }
            // Columns are separated by at least three spaces; cells hold at most one.
            let cells: Vec<String> = line
                .split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            match &header {
                None if cells.first().is_some_and(|c| c == "SERVICE") => header = Some(cells),
                Some(names) if !cells.is_empty() => status.proxies.push(ProxyRow {
                    cells: names.iter().cloned().zip(cells).collect(),
                }),
                _ => {}
            }
        }
        status
    }

    /// The row of the proxy advertising `addr`.
    pub fn proxy(&self, addr: SocketAddr) -> Option<&ProxyRow> {
        let addr = addr.to_string();
        self.proxies.iter().find(|p| p.address() == addr)
    }
}

// ------------------------------------------------------------------ sample apps

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// HTTP/1.1 + h2c + the gRPC Echo service.
    Http,
    /// Raw TCP echo.
    TcpEcho,
    /// Server speaks first: `220 NAME/V ready\r\n`, then echoes lines.
    Banner,
}

impl Mode {
    fn as_arg(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::TcpEcho => "tcp-echo",
            Mode::Banner => "banner",
        }
    }
}

/// A `sample-app` on a free port of 127.0.0.1.
#[derive(Debug)]
pub struct App {
    addr: SocketAddr,
    served_by: String,
    proc: Proc,
}

impl App {
    /// Starts `sample-app --name NAME --version V --mode MODE` and waits until it
    /// accepts connections.
    pub async fn start(name: &str, version: &str, mode: Mode) -> App {
        let addr = free_addr();
        let mut proc = Proc::spawn(
            &format!("sample-app-{name}-{version}"),
            Command::new(bin("sample-app"))
                .args(["--name", name, "--version", version])
                .args(["--listen", &addr.to_string()])
                .args(["--mode", mode.as_arg()]),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                proc.running() && tokio::time::Instant::now() < deadline,
                "sample-app {name}/{version} did not start listening on {addr}\n{}",
                proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        App {
            addr,
            served_by: format!("{name}/{version}"),
            proc,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What the app puts in `x-served-by`: `NAME/V`.
    pub fn served_by(&self) -> &str {
        &self.served_by
    }

    /// How many requests the app has served (its `/stats`, asked directly).
    pub async fn requests_served(&self) -> u64 {
        let resp = raw_http::get(self.addr, "/stats")
            .await
            .expect("GET /stats on the app");
        let stats: serde_json::Value =
            serde_json::from_slice(&resp.body).expect("/stats answers JSON");
        stats["requests"].as_u64().expect("/stats has requests")
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Kills the app with SIGKILL (its sidecar lives on).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

// ------------------------------------------------------------------ proxies

/// Fills in a proxy's identity: a bootstrap token from the control plane
/// (unless the test chose one) and the control plane's trust bundle.
async fn with_identity(
    cp: &ControlPlane,
    mut opts: ProxyOpts,
) -> (ProxyOpts, Option<tempfile::TempDir>) {
    if opts.ca_file.is_none() {
        opts.ca_file = Some(cp.data_dir().join("trust-bundle.pem"));
    }
    if opts.token_file.is_some() {
        return (opts, None);
    }
    let token = cp
        .cli_ok(&[
            "token",
            "create",
            "--service",
            &opts.service,
            "--namespace",
            &opts.namespace,
        ])
        .await;
    let dir = tempfile::Builder::new()
        .prefix("remora-identity-")
        .tempdir()
        .expect("a temp dir for the token");
    let path = dir.path().join("token");
    std::fs::write(&path, token.trim()).expect("writing the token");
    opts.token_file = Some(path);
    (opts, Some(dir))
}

/// `opts` with a token file and a trust bundle that are never used (both
/// flags are required): for a proxy whose control plane never answers.
pub fn unused_identity(mut opts: ProxyOpts, dir: &Path) -> ProxyOpts {
    let (token, ca) = (dir.join("token"), dir.join("ca.pem"));
    std::fs::write(&token, "unused\n").expect("writing a token file");
    std::fs::write(&ca, "unused\n").expect("writing a trust bundle");
    opts.ca_file = Some(ca);
    opts.token_file(&token)
}

/// What a `remora-proxy run` is started with, besides its ports.
#[derive(Debug, Clone)]
pub struct ProxyOpts {
    pub service: String,
    pub namespace: String,
    pub labels: Vec<(String, String)>,
    pub app_port: u16,
    pub extra_args: Vec<String>,
    /// The bootstrap token file; `Proxy::start` makes one with
    /// `remora-control token create` when this is None.
    pub token_file: Option<PathBuf>,
    /// The trust bundle that verifies the control plane; defaults to the
    /// control plane's `<data-dir>/trust-bundle.pem`.
    pub ca_file: Option<PathBuf>,
    /// The address peers are told to dial (`--advertise`); defaults to the
    /// proxy's own inbound listener.
    pub advertise: Option<String>,
}

impl ProxyOpts {
    pub fn new(service: &str, namespace: &str, app_port: u16) -> ProxyOpts {
        ProxyOpts {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            labels: Vec::new(),
            app_port,
            extra_args: Vec::new(),
            token_file: None,
            ca_file: None,
            advertise: None,
        }
    }

    /// Advertises `addr` (`host:port`) to peers instead of the inbound
    /// listener, e.g. a relay in front of it.
    pub fn advertise(mut self, addr: &str) -> ProxyOpts {
        self.advertise = Some(addr.to_owned());
        self
    }

    /// Starts the proxy with this token file (which may be missing or wrong).
    pub fn token_file(mut self, path: &Path) -> ProxyOpts {
        self.token_file = Some(path.to_path_buf());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> ProxyOpts {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Extra command-line arguments, such as `["--idle-timeout", "1s"]`.
    pub fn args(mut self, args: &[&str]) -> ProxyOpts {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }
}

/// A `remora-proxy run` in explicit mode on four free ports.
#[derive(Debug)]
pub struct Proxy {
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    health: SocketAddr,
    proc: Proc,
    _identity_dir: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Starts a proxy of `cp` with a fresh bootstrap token for its identity
    /// and waits until its `/ready` answers 200.
    pub async fn start(cp: &ControlPlane, opts: ProxyOpts) -> Proxy {
        let (opts, dir) = with_identity(cp, opts).await;
        let mut proxy = Proxy::spawn(&cp.url(), opts);
        proxy._identity_dir = dir;
        proxy.wait_ready().await;
        proxy
    }

    /// Starts a proxy of `cp` (with a token, as `start`) without waiting.
    pub async fn start_unready(cp: &ControlPlane, opts: ProxyOpts) -> Proxy {
        let (opts, dir) = with_identity(cp, opts).await;
        let mut proxy = Proxy::spawn(&cp.url(), opts);
        proxy._identity_dir = dir;
        proxy
    }

    /// Starts a proxy of the control plane at `control_plane` without waiting.
    pub fn spawn(control_plane: &str, opts: ProxyOpts) -> Proxy {
        let [inbound, outbound, admin, health] = [(); 4].map(|()| free_port());
        let mut cmd = Command::new(bin("remora-proxy"));
        cmd.arg("run")
            .args(["--control-plane", control_plane])
            .args(["--service", &opts.service])
            .args(["--namespace", &opts.namespace]);
        for (k, v) in &opts.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        cmd.args(["--app-port", &opts.app_port.to_string()])
            .args(["--inbound-port", &inbound.to_string()])
            .args([
                "--advertise",
                &opts
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("127.0.0.1:{inbound}")),
            ])
            .args(["--outbound-port", &outbound.to_string()])
            .args(["--admin-port", &admin.to_string()])
            .args(["--health-port", &health.to_string()]);
        if let Some(t) = &opts.token_file {
            cmd.arg("--token-file").arg(t);
        }
        if let Some(c) = &opts.ca_file {
            cmd.arg("--ca-file").arg(c);
        }
        cmd.args(&opts.extra_args);
        let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Proxy {
            inbound: local(inbound),
            outbound: local(outbound),
            admin: local(admin),
            health: local(health),
            proc: Proc::spawn(&format!("remora-proxy-{}", opts.service), &mut cmd),
            _identity_dir: None,
        }
    }

    /// Waits until `/ready` answers 200; panics (with the proxy's output) if it
    /// does not within [`READY_TIMEOUT`] or the proxy exits.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.ready_status().await == Some(200) {
                return;
            }
            assert!(
                self.proc.running(),
                "the proxy exited before it was ready\n{}",
                self.logs()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy was not ready within {READY_TIMEOUT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The status `/ready` answers now, if it answers.
    pub async fn ready_status(&self) -> Option<u16> {
        probe::get_status(self.health, "/ready", Duration::from_secs(1))
            .await
            .ok()
    }

    /// The explicit-proxy listener (127.0.0.1).
    pub fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// The inbound listener, which is also the address this instance
    /// advertises unless [`ProxyOpts::advertise`] chose another.
    pub fn inbound(&self) -> SocketAddr {
        self.inbound
    }

    /// `/ready`, `/live`, `/metrics`.
    pub fn health(&self) -> SocketAddr {
        self.health
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn sigterm(&self) {
        self.proc.sigterm();
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The value of an unlabelled (or first-listed) sample of `metric` on
    /// `/metrics`.
    pub async fn metric(&self, metric: &str) -> Option<f64> {
        let resp = raw_http::get(self.health, "/metrics").await.ok()?;
        let text = String::from_utf8_lossy(&resp.body);
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// A sample app and the proxy in front of it.
#[derive(Debug)]
pub struct Sidecar {
    pub app: App,
    pub proxy: Proxy,
}

impl Sidecar {
    /// App `SERVICE/VERSION` with a proxy for `SERVICE` in `namespace`, labelled
    /// `version=VERSION`.
    pub async fn start(
        cp: &ControlPlane,
        namespace: &str,
        service: &str,
        version: &str,
        mode: Mode,
    ) -> Sidecar {
        let app = App::start(service, version, mode).await;
        let opts = ProxyOpts::new(service, namespace, app.port()).label("version", version);
        Sidecar::start_with(cp, app, opts).await
    }

    /// A proxy started with `opts` in front of `app`.
    pub async fn start_with(cp: &ControlPlane, app: App, opts: ProxyOpts) -> Sidecar {
        let proxy = Proxy::start(cp, opts).await;
        Sidecar { app, proxy }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_parsed_by_column() {
        let text = "policy version 3 (snapshot 3.7)\n\
            SERVICE   NAMESPACE   INSTANCE   ADDRESS                          LABELS       ACKED   NACK\n\
            backend   shop        b-1        127.0.0.1:4000                   version=v1   3.7     -\n\
            backend   shop        b-2        127.0.0.1:4001 (deregistered)    version=v2   3.6     -\n";
        let status = Status::parse(text);
        assert_eq!(status.policy_version, Some(3));
        assert_eq!(status.snapshot_version.as_deref(), Some("3.7"));
        assert_eq!(status.proxies.len(), 2);
        let a = status.proxy("127.0.0.1:4000".parse().unwrap()).unwrap();
        assert_eq!((a.acked(), a.registered()), ("3.7", true));
        let b = status.proxy("127.0.0.1:4001".parse().unwrap()).unwrap();
        assert_eq!((b.acked(), b.registered()), ("3.6", false));
        assert!(status.proxy("127.0.0.1:400".parse().unwrap()).is_none());
    }
}
