//! Pods as network namespaces (root only), for the transparent-mode tests.
//!
//! A [`Cluster`] is a "node" namespace holding a bridge (`br0`, with the
//! node's address `10.213.X.1/24`) and one namespace per [`Pod`], joined to
//! the bridge by a veth pair (`vethN` on the node, `eth0` in the pod, address
//! `10.213.X.(10+N)`, default route via the node). Nothing touches the host's
//! own interfaces: the bridge, the veths and the addresses exist only inside
//! namespaces the test created, and dropping the cluster deletes them all.
//!
//! The control plane runs in the node namespace ([`NsControlPlane`]); each
//! meshed pod runs `remora-proxy init`, its app, and `remora-proxy run` as UID
//! 1337 (which the iptables rules exempt), through
//! `ip netns exec POD setpriv --reuid=1337 --regid=1337 --clear-groups`.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::process::{bin, Proc};

/// The UID and GID the proxy runs as.
pub const PROXY_UID: u32 = 1337;

/// Why the namespace tests cannot run here (not root, a tool missing, no
/// permission to create namespaces), or `None` when they can. `tools` are
/// checked on `PATH` besides `ip`, `iptables` and `setpriv`.
pub fn skip_reason(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    let mut missing: Vec<&str> = ["ip", "iptables", "setpriv"]
        .iter()
        .chain(tools)
        .copied()
        .filter(|t| !on_path(t))
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (Debian: apt-get install -y iproute2 iptables util-linux tcpdump redis-server \
                 redis-tools curl postgresql nghttp2-client nghttp2-server; or run scripts/test.sh as root)",
            missing.join(", ")
        ));
    }
    // Creating a namespace also needs CAP_SYS_ADMIN, which a container may lack.
    // The name is unique per call: tests probe in parallel.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("remora-probe-{}-{n}", std::process::id());
    let ok = quiet(Command::new("ip").args(["netns", "add", &probe]));
    let _ = quiet(Command::new("ip").args(["netns", "del", &probe]));
    if !ok {
        return Some("`ip netns add` is not permitted here".into());
    }
    None
}

/// Prints why a test is skipped; `true` when it is (see
/// [`crate::skip_or_fail`]: under `REMORA_STRICT_TESTS=1` it fails instead).
pub fn skip(test: &str, tools: &[&str]) -> bool {
    match skip_reason(tools) {
        Some(reason) => {
            crate::skip_or_fail(test, &reason);
            true
        }
        None => false,
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd`, panicking with its output unless it succeeds; its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 100 ms until it is true, or panics after `timeout`
/// naming `what` and showing `logs()`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node namespace, its bridge, and the pods attached to it.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    subnet: u8,
    node: String,
    pods: Vec<String>,
}

impl Cluster {
    /// A node `remora-<test>-node` with a bridge on `10.213.<subnet>.0/24`.
    /// `test` must be short (a few letters) and unique among concurrent tests.
    pub fn new(test: &str, subnet: u8) -> Cluster {
        let prefix = format!("remora-{test}");
        let node = format!("{prefix}-node");
        // Leftovers of an earlier, killed run of this test.
        for entry in std::fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = quiet(Command::new("ip").args(["netns", "del", &name]));
            }
        }
        let cluster = Cluster {
            prefix,
            subnet,
            node: node.clone(),
            pods: Vec::new(),
        };
        must(Command::new("ip").args(["netns", "add", &node]));
        let ip = |args: &[&str]| must(Command::new("ip").args(["-n", &node]).args(args));
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", "br0", "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", cluster.node_ip()),
            "dev",
            "br0",
        ]);
        ip(&["link", "set", "br0", "up"]);
        cluster
    }

    /// The node's address on the bridge: `10.213.X.1`.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// The node namespace's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A command run in the node namespace.
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.node, program)
    }

    /// Adds pod number `len + 1`: namespace `remora-<test>-<n>`, `eth0` at
    /// `10.213.X.(10+n)`, `lo` up, default route via the node.
    pub fn add_pod(&mut self) -> Pod {
        let n = self.pods.len() + 1;
        let ns = format!("{}-{n}", self.prefix);
        let veth = format!("veth{n}");
        let ip = Ipv4Addr::new(10, 213, self.subnet, 10 + n as u8);
        must(Command::new("ip").args(["netns", "add", &ns]));
        self.pods.push(ns.clone());
        let on_node = |args: &[&str]| must(Command::new("ip").args(["-n", &self.node]).args(args));
        on_node(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        on_node(&["link", "set", &veth, "master", "br0"]);
        on_node(&["link", "set", &veth, "up"]);
        let in_pod = |args: &[&str]| must(Command::new("ip").args(["-n", &ns]).args(args));
        in_pod(&["link", "set", "lo", "up"]);
        in_pod(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        in_pod(&["link", "set", "eth0", "up"]);
        in_pod(&[
            "route",
            "add",
            "default",
            "via",
            &self.node_ip().to_string(),
        ]);
        Pod { ns, ip, veth }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and so the pair.
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            let _ = quiet(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

/// A pod: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The namespace's name.
    pub ns: String,
    /// The pod's address on `eth0`.
    pub ip: Ipv4Addr,
    /// The node's end of the pod's veth pair (in the node namespace).
    pub veth: String,
}

impl Pod {
    /// `ip netns exec NS PROGRAM`, as root.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_ns(&self.ns, program)
    }

    /// `ip netns exec NS setpriv --reuid=UID --regid=UID --clear-groups PROGRAM`.
    pub fn command_as(&self, uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    /// Runs `program args` in the pod as root and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.ns))
    }

    /// Waits until something listens on TCP `port` in the pod (`ss`), or
    /// panics after `timeout` with `proc`'s output (and at once if it exited).
    pub fn wait_listening(&self, port: u16, timeout: Duration, proc: &mut Proc) {
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run("ss", &["-Hltn", &filter]);
            if out.status.success() && !out.stdout.is_empty() {
                return;
            }
            assert!(
                proc.running(),
                "the app meant to listen on port {port} in {} exited\n{}",
                self.ns,
                proc.logs()
            );
            assert!(
                Instant::now() < deadline,
                "nothing listens on port {port} in {} after {timeout:?}\n{}",
                self.ns,
                proc.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `iptables -t nat -S` in the pod.
    pub fn nat_rules(&self) -> String {
        must(self.command("iptables").args(["-t", "nat", "-S"]))
    }
}

fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

// ------------------------------------------------------------------ the mesh

/// `remora-control serve` in the node namespace, on the node's address.
#[derive(Debug)]
pub struct NsControlPlane {
    node: String,
    ip: Ipv4Addr,
    data: tempfile::TempDir,
    proc: Proc,
}

pub const CONTROL_PLANE_PORT: u16 = 15012;
pub const CONTROL_PLANE_HTTP_PORT: u16 = 15014;

impl NsControlPlane {
    pub fn start(cluster: &Cluster) -> NsControlPlane {
        let data = tempfile::Builder::new()
            .prefix("remora-ns-cp-")
            .tempdir()
            .expect("a data dir");
        let ip = cluster.node_ip();
        let proc = Proc::spawn(
            "remora-control",
            cluster
                .node_command(bin("remora-control"))
                .arg("serve")
                .args(["--listen", &format!("{ip}:{CONTROL_PLANE_PORT}")])
                .args(["--http-listen", &format!("{ip}:{CONTROL_PLANE_HTTP_PORT}")])
                .arg("--data-dir")
                .arg(data.path()),
        );
        let cp = NsControlPlane {
            node: cluster.node().to_owned(),
            ip,
            data,
            proc,
        };
        let url = format!("http://{ip}:{CONTROL_PLANE_HTTP_PORT}/ready");
        wait_until(
            Duration::from_secs(20),
            "the control plane's /ready",
            || {
                let out = in_ns(&cp.node, "curl")
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "1",
                        &url,
                    ])
                    .stdin(Stdio::null())
                    .output();
                out.is_ok_and(|o| o.stdout == b"200")
            },
            || cp.proc.logs(),
        );
        let mut cp = cp;
        assert!(
            cp.proc.running(),
            "the control plane exited\n{}",
            cp.proc.logs()
        );
        cp
    }

    /// What proxies dial: `https://10.213.X.1:15012`.
    pub fn url(&self) -> String {
        format!("https://{}:{CONTROL_PLANE_PORT}", self.ip)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// `remora-control --server URL --data-dir DIR ARGS...` in the node
    /// namespace; its stdout, or a panic with its stderr.
    pub fn cli(&self, args: &[&str]) -> String {
        must(
            in_ns(&self.node, bin("remora-control"))
                .args(["--server", &self.url()])
                .arg("--data-dir")
                .arg(self.data.path())
                .args(args)
                .env_remove("REMORA_CONTROL_PLANE")
                .env_remove("REMORA_ADMIN_TOKEN"),
        )
    }

    /// Applies `yaml` (through a file); the CLI's answer.
    pub fn apply(&self, yaml: &str) -> String {
        let file = self
            .data
            .path()
            .join(format!("apply-{}.yaml", fastrand::u64(..)));
        std::fs::write(&file, yaml).expect("writing the policy file");
        let out = self.cli(&["apply", "-f", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        out
    }

    /// A directory the proxy's UID can read, holding a fresh bootstrap token
    /// for `service` (`token`) and the trust bundle (`ca.pem`).
    pub fn identity(&self, service: &str, namespace: &str) -> Identity {
        let token = self.cli(&[
            "token",
            "create",
            "--service",
            service,
            "--namespace",
            namespace,
        ]);
        let dir = tempfile::Builder::new()
            .prefix("remora-ns-identity-")
            .tempdir()
            .expect("a temp dir");
        let bundle = std::fs::read(self.data.path().join("trust-bundle.pem"))
            .expect("the control plane's trust-bundle.pem");
        let token_file = dir.path().join("token");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&token_file, token.trim()).expect("writing the token");
        std::fs::write(&ca_file, bundle).expect("writing the trust bundle");
        for (path, mode) in [(dir.path(), 0o755), (&token_file, 0o644), (&ca_file, 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        Identity {
            token_file,
            ca_file,
            _dir: dir,
        }
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// A proxy's bootstrap credential and trust bundle, readable by UID 1337.
#[derive(Debug)]
pub struct Identity {
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a meshed pod's app is started.
#[derive(Debug, Clone)]
pub enum AppSpec {
    /// `sample-app --name SERVICE --version V --listen ADDR:8080`, on the
    /// pod's IP (`any = false`) or on 0.0.0.0 (`any = true`).
    Sample { version: &'static str, any: bool },
    /// `redis-server` on 0.0.0.0:6379, nothing saved.
    Redis,
    /// `sample-app --mode banner` on 0.0.0.0:7000: the server speaks first
    /// (`220 SERVICE/v1 ready`), then echoes lines.
    Banner,
    /// PostgreSQL (Debian's server binaries, see [`postgres_bin_dir`]) on
    /// 0.0.0.0:5432, run as the `postgres` user on a fresh data directory in
    /// the pod's scratch dir: superuser `remora`, trust authentication,
    /// nothing synced to disk.
    Postgres,
    /// `python3 tests/clients/SCRIPT --port PORT --dir SCRATCH`, listening on
    /// 0.0.0.0:PORT (the scripts there take `--port`; those that serve files
    /// take `--dir`, the pod's scratch dir).
    Python { script: &'static str, port: u16 },
    /// `nghttpd --no-tls PORT`: an h2c-only server (HTTP/2 with prior
    /// knowledge; an HTTP/1.1 request gets no answer), serving the pod's
    /// scratch dir, which starts with `index.html` = `hello h2c\n`.
    Nghttpd { port: u16 },
}

impl AppSpec {
    pub fn port(&self) -> u16 {
        match self {
            AppSpec::Sample { .. } => 8080,
            AppSpec::Redis => 6379,
            AppSpec::Banner => 7000,
            AppSpec::Postgres => 5432,
            AppSpec::Python { port, .. } | AppSpec::Nghttpd { port } => *port,
        }
    }
}

/// The directory of the test clients and servers (`tests/clients`).
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Debian's PostgreSQL server binaries (`/usr/lib/postgresql/<ver>/bin`,
/// the newest version), which are not on `PATH`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file())
                .then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, dir)| dir)
}

/// Why the Python test servers and clients cannot run here (no `python3`,
/// or one of `modules` not importable), or `None`.
pub fn python_skip_reason(modules: &[&str]) -> Option<String> {
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    match Command::new("python3")
        .args(["-c", &code])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Some(format!("cannot run python3: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "python3 cannot import {} (python3 -m pip install grpcio websockets): {}",
            modules.join(", "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// A pod with its app and, unless started bare, its init rules and proxy.
#[derive(Debug)]
pub struct MeshedPod {
    pub pod: Pod,
    pub service: String,
    // Dropped (killed) before the identity dir goes.
    pub proxy: Option<Proc>,
    pub app: Option<Proc>,
    _identity: Option<Identity>,
    _scratch: tempfile::TempDir,
}

impl MeshedPod {
    /// `remora-proxy init`, the app, then `remora-proxy run` as UID 1337
    /// advertising `<pod IP>:<app port>`; waits until the proxy is ready.
    pub fn start(
        cp: &NsControlPlane,
        pod: Pod,
        service: &str,
        namespace: &str,
        app: Option<AppSpec>,
    ) -> MeshedPod {
        MeshedPod::start_with(cp, pod, service, namespace, app, &[])
    }

    /// [`MeshedPod::start`], with `proxy_args` added to `remora-proxy run`'s
    /// command line (`--idle-timeout 2s`, ...).
    pub fn start_with(
        cp: &NsControlPlane,
        pod: Pod,
        service: &str,
        namespace: &str,
        app: Option<AppSpec>,
        proxy_args: &[&str],
    ) -> MeshedPod {
        must(pod.command(bin("remora-proxy")).arg("init"));
        let mut meshed = MeshedPod::bare(pod, service, app.clone());
        let identity = cp.identity(service, namespace);
        let mut cmd = meshed.pod.command_as(PROXY_UID, bin("remora-proxy"));
        cmd.arg("run")
            .args(["--control-plane", &cp.url()])
            .args(["--service", service, "--namespace", namespace])
            .args(["--outbound-bind", "127.0.0.1", "--inbound-bind", "0.0.0.0"])
            .arg("--token-file")
            .arg(&identity.token_file)
            .arg("--ca-file")
            .arg(&identity.ca_file);
        if let Some(app) = &app {
            cmd.args(["--advertise", &format!("{}:{}", meshed.pod.ip, app.port())]);
            if let AppSpec::Sample { version, .. } = app {
                cmd.args(["--label", &format!("version={version}")]);
            }
        }
        cmd.args(proxy_args);
        let proxy = Proc::spawn(&format!("remora-proxy-{service}"), &mut cmd);
        meshed.proxy = Some(proxy);
        meshed._identity = Some(identity);
        let ready = meshed
            .pod
            .command(bin("remora-proxy"))
            .args([
                "wait-ready",
                "--health",
                "127.0.0.1:15020",
                "--timeout",
                "30s",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("running remora-proxy wait-ready");
        assert!(
            ready.status.success(),
            "the proxy of {service} in {} was not ready: {}\n{}",
            meshed.pod.ns,
            String::from_utf8_lossy(&ready.stderr),
            meshed.logs()
        );
        meshed
    }

    /// A pod with only its app (no rules, no proxy), or nothing at all.
    pub fn bare(pod: Pod, service: &str, app: Option<AppSpec>) -> MeshedPod {
        let scratch = tempfile::Builder::new()
            .prefix("remora-ns-pod-")
            .tempdir()
            .expect("a temp dir");
        let app = app.map(|spec| {
            let mut cmd = match spec.clone() {
                AppSpec::Sample { version, any } => {
                    let host = if any { Ipv4Addr::UNSPECIFIED } else { pod.ip };
                    let mut c = pod.command(bin("sample-app"));
                    c.args(["--name", service, "--version", version])
                        .args(["--listen", &format!("{host}:8080")]);
                    c
                }
                AppSpec::Banner => {
                    let mut c = pod.command(bin("sample-app"));
                    c.args(["--name", service, "--version", "v1", "--mode", "banner"])
                        .args(["--listen", "0.0.0.0:7000"]);
                    c
                }
                AppSpec::Postgres => postgres_command(&pod, scratch.path()),
                AppSpec::Python { script, port } => {
                    let mut c = pod.command("python3");
                    c.arg(clients_dir().join(script))
                        .args(["--port", &port.to_string()])
                        .arg("--dir")
                        .arg(scratch.path());
                    c
                }
                AppSpec::Nghttpd { port } => {
                    std::fs::write(scratch.path().join("index.html"), "hello h2c\n")
                        .expect("writing index.html");
                    let mut c = pod.command("nghttpd");
                    c.args(["--no-tls", "-d"])
                        .arg(scratch.path())
                        .arg(port.to_string());
                    c
                }
                AppSpec::Redis => {
                    let mut c = pod.command("redis-server");
                    c.args([
                        "--port",
                        "6379",
                        "--bind",
                        "0.0.0.0",
                        "--protected-mode",
                        "no",
                    ])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(scratch.path());
                    c
                }
            };
            let mut proc = Proc::spawn(&format!("{service}-app"), &mut cmd);
            if !matches!(spec, AppSpec::Sample { .. } | AppSpec::Banner) {
                // Slower starters: wait until the app listens.
                pod.wait_listening(spec.port(), Duration::from_secs(30), &mut proc);
            }
            proc
        });
        MeshedPod {
            pod,
            service: service.to_owned(),
            proxy: None,
            app,
            _identity: None,
            _scratch: scratch,
        }
    }

    /// The pod's scratch dir (the app's files, such as what `/files/` serves).
    pub fn scratch(&self) -> &Path {
        self._scratch.path()
    }

    /// The proxy's JSON access-log lines so far (its stdout).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let Some(proxy) = &self.proxy else {
            return Vec::new();
        };
        std::fs::read_to_string(proxy.log_dir().join("stdout"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("direction").is_some())
            .collect()
    }

    /// The app's and the proxy's output.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for p in [&self.app, &self.proxy].into_iter().flatten() {
            text.push_str(&p.logs());
        }
        text
    }
}

/// PostgreSQL in `pod`: `initdb` (as the `postgres` user, which the server
/// binaries demand) on `scratch/pgdata`, then the `postgres` command to run,
/// listening on 0.0.0.0:5432 with its unix socket in `scratch/pgsock`.
fn postgres_command(pod: &Pod, scratch: &Path) -> Command {
    let bin_dir = postgres_bin_dir().expect("PostgreSQL's server binaries (Debian: postgresql)");
    let (data, sock) = (scratch.join("pgdata"), scratch.join("pgsock"));
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for dir in [&data, &sock] {
        std::fs::create_dir(dir).expect("a PostgreSQL dir");
        must(Command::new("chown").arg("postgres:postgres").arg(dir));
    }
    must(
        pod.command("setpriv")
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "remora", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"]),
    );
    // initdb trusts loopback only; the sidecar dials the app on the pod's IP.
    let hba = data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    rules.push_str("host all all 0.0.0.0/0 trust\n");
    std::fs::write(&hba, rules).expect("writing pg_hba.conf");
    let mut c = pod.command("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(bin_dir.join("postgres"))
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(&sock)
        .args(["-c", "listen_addresses=0.0.0.0", "-p", "5432"])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=50"]);
    c
}
