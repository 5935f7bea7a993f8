//! The processes under test and beside them: the upstream, the control plane,
//! Remora's sidecars, nginx and HAProxy. Whatever is measured runs pinned to
//! core 1 (`taskset -c 1`); the bench itself and the upstream stay on core 0.

use anyhow::{bail, Context as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const NAMESPACE: &str = "bench";
/// The service behind the server sidecar, as clients name it.
pub const AUTHORITY: &str = "backend.bench:8080";

/// The bench's policies: the backend takes plaintext too (`permissive`, rule
/// `*`), so a client outside the mesh can make the one-hop measurement.
pub const POLICY: &str = "\
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: bench}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: frontend, namespace: bench}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: bench}
spec:
  service: backend
  mtls: permissive
  rules: [{from: [\"*\"]}]
";

/// The JWT-checked hop's policy (service `backend-jwt` with a
/// RequestAuthentication whose JWK set is inline) and a token it accepts
/// (ES256, valid for a day), made fresh for each run.
pub fn jwt_policy() -> (String, String) {
    use remora_proto::jwt::testing;
    let key = testing::ec("bench");
    let now = testing::now();
    let token = testing::sign(
        &key,
        &serde_json::json!({"iss": "https://idp.bench", "sub": "bench-user", "aud": "api",
            "exp": now + 86_400, "iat": now, "groups": ["bench"]}),
    );
    let jwks = testing::jwks(&[&key]);
    let policy = format!(
        "\
apiVersion: remora.dev/v1
kind: Service
metadata: {{name: backend-jwt, namespace: bench}}
spec:
  ports: [{{port: 8080, protocol: http}}]
---
apiVersion: remora.dev/v1
kind: RequestAuthentication
metadata: {{name: backend-jwt, namespace: bench}}
spec:
  service: backend-jwt
  jwtRules:
    - issuer: https://idp.bench
      audiences: [api]
      jwks: '{jwks}'
      outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: remora.dev/v1
kind: AuthorizationPolicy
metadata: {{name: backend-jwt, namespace: bench}}
spec:
  service: backend-jwt
  mtls: permissive
  rules: [{{from: [\"*\"], when: [{{key: request.auth.principal, values: [\"*\"]}}]}}]
"
    );
    (policy, token)
}

/// A port below the ephemeral range, free now and not handed out before.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut seed = u64::from(nanos ^ std::process::id());
    loop {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let port = 20_000 + ((seed >> 33) % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A child process, killed when dropped.
pub struct Child {
    child: std::process::Child,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // nginx's workers outlive a killed master (and keep serving, and
        // keep their CPU): they go too.
        let children = crate::resources::children(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !children.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(children.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The machine's online cores (`nproc --all`).
pub fn cores() -> usize {
    Command::new("nproc")
        .arg("--all")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(1)
}

/// Where binaries, configs and logs are.
pub struct Env {
    pub bin_dir: PathBuf,
    pub dir: tempfile::TempDir,
    /// Pin with taskset (only with two or more cores).
    pub pin: bool,
}

impl Env {
    pub fn new() -> anyhow::Result<Env> {
        let exe = std::env::current_exe()?;
        let bin_dir = exe.parent().context("the bench's directory")?.to_path_buf();
        for b in ["remora-control", "remora-proxy"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{} is missing: build the workspace first",
                    bin_dir.join(b).display()
                );
            }
        }
        // Every core of the machine, not only those this process may use.
        let pin = cores() >= 2 && Command::new("taskset").arg("-V").output().is_ok();
        let dir = tempfile::Builder::new().prefix("remora-bench-").tempdir()?;
        Ok(Env { bin_dir, dir, pin })
    }

    /// Keeps the logs and configs after the bench ends.
    pub fn keep(&self) {
        let _ = std::fs::write(self.path("KEEP"), "");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `program args` (pinned to `core` when pinning), output to `<name>.log`.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        core: u8,
    ) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.path(&format!("{name}.log")))?;
        let mut cmd = if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", &core.to_string()]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let child = cmd
            .args(args)
            .env_remove("REMORA_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Child { child })
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// GETs `path` on `addr`; the status code.
pub async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
}

/// Waits until `check` holds, or fails after `secs` naming `what`.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {secs}s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A `remora-control serve` on fresh ports and data dir.
pub struct ControlPlane {
    pub url: String,
    pub data_dir: PathBuf,
    pub proc: Child,
}

impl ControlPlane {
    pub async fn start(env: &Env, name: &str) -> anyhow::Result<ControlPlane> {
        let (grpc, http) = (local(free_port()), local(free_port()));
        let data_dir = env.path(name);
        std::fs::create_dir_all(&data_dir)?;
        let args = vec![
            "serve".into(),
            "--listen".into(),
            grpc.to_string(),
            "--http-listen".into(),
            http.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        let proc = env.spawn(name, &env.bin_dir.join("remora-control"), &args, 1)?;
        wait_for(30, "the control plane's /ready", || async {
            get_status(http, "/ready").await == Some(200)
        })
        .await
        .with_context(|| env.log_tail(name))?;
        Ok(ControlPlane {
            url: format!("http://{grpc}"),
            data_dir,
            proc,
        })
    }

    /// A replica of a control plane sharing `etcd` (`serve --store etcd`),
    /// the key-encryption key in `<env>/kek`.
    pub async fn start_replica(env: &Env, name: &str, etcd: &str) -> anyhow::Result<ControlPlane> {
        let (grpc, http) = (local(free_port()), local(free_port()));
        let data_dir = env.path(name);
        std::fs::create_dir_all(&data_dir)?;
        let kek = env.path("kek");
        if !kek.exists() {
            std::fs::write(
                &kek,
                "6b0e4d9c2a7f1b3e5d8c0a2f4e6b8d1c3a5e7f9b0d2c4e6a8f1b3d5c7e9a0b2d",
            )?;
        }
        let args: Vec<String> = [
            "serve",
            "--listen",
            &grpc.to_string(),
            "--http-listen",
            &http.to_string(),
            "--advertise-address",
            &grpc.to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            etcd,
            "--kek-file",
            &kek.display().to_string(),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let proc = env.spawn(name, &env.bin_dir.join("remora-control"), &args, 1)?;
        wait_for(30, "the replica's /ready", || async {
            get_status(http, "/ready").await == Some(200)
        })
        .await
        .with_context(|| env.log_tail(name))?;
        Ok(ControlPlane {
            url: format!("http://{grpc}"),
            data_dir,
            proc,
        })
    }

    /// `remora-control --server URL --data-dir DIR ARGS...`, its stdout.
    pub fn cli(&self, env: &Env, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(env.bin_dir.join("remora-control"))
            .env_remove("REMORA_ADMIN_TOKEN")
            .args(["--server", &self.url])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "remora-control {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn token(&self, env: &Env, service: &str) -> anyhow::Result<String> {
        self.cli(
            env,
            &[
                "token",
                "create",
                "--service",
                service,
                "--namespace",
                NAMESPACE,
            ],
        )
    }
}

/// One etcd member (Debian's `etcd`) for replicas to share.
pub struct Etcd {
    pub url: String,
    /// Killed when dropped.
    _proc: Child,
}

impl Etcd {
    pub async fn start(env: &Env) -> anyhow::Result<Etcd> {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("etcd not found (Debian: apt-get install etcd-server)")?;
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "bench",
            "--data-dir",
            &env.path("etcd.data").display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("bench={peer_url}"),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let proc = env.spawn("etcd", &etcd, &args, 0)?;
        let addr = local(client);
        wait_for(30, "etcd's /health", || async {
            get_status(addr, "/health").await == Some(200)
        })
        .await
        .with_context(|| env.log_tail("etcd"))?;
        Ok(Etcd { url, _proc: proc })
    }
}

/// A `remora-proxy run` in explicit mode.
pub struct Sidecar {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub proc: Child,
}

impl Sidecar {
    pub async fn start(
        env: &Env,
        cp: &ControlPlane,
        service: &str,
        app_port: u16,
    ) -> anyhow::Result<Sidecar> {
        let token_file = env.path(&format!("{service}.token"));
        std::fs::write(&token_file, cp.token(env, service)?)?;
        let [inbound, outbound, admin, health] = [(); 4].map(|()| free_port());
        let mut args: Vec<String> = ["run", "--control-plane", &cp.url, "--service", service]
            .into_iter()
            .map(String::from)
            .collect();
        for (flag, value) in [
            ("--namespace", NAMESPACE.to_string()),
            ("--app-port", app_port.to_string()),
            ("--inbound-port", inbound.to_string()),
            ("--advertise", format!("127.0.0.1:{inbound}")),
            ("--outbound-port", outbound.to_string()),
            ("--admin-port", admin.to_string()),
            ("--health-port", health.to_string()),
            ("--token-file", token_file.display().to_string()),
            (
                "--ca-file",
                cp.data_dir.join("trust-bundle.pem").display().to_string(),
            ),
            // Like nginx and HAProxy here: no access log, no tracing.
            ("--access-log", "false".into()),
            ("--trace-sampling", "0".into()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        let name = format!("proxy-{service}");
        let proc = env.spawn(&name, &env.bin_dir.join("remora-proxy"), &args, 1)?;
        let health = local(health);
        wait_for(30, &format!("{name}'s /ready"), || async {
            get_status(health, "/ready").await == Some(200)
        })
        .await
        .with_context(|| env.log_tail(&name))?;
        Ok(Sidecar {
            inbound: local(inbound),
            outbound: local(outbound),
            proc,
        })
    }
}

/// nginx or HAProxy as a plain reverse proxy to the upstream: an HTTP/1.1
/// port and a gRPC (h2c) port.
pub struct Reverse {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub proc: Child,
}

pub async fn nginx(env: &Env, upstream: u16) -> anyhow::Result<Reverse> {
    let (http, grpc) = (free_port(), free_port());
    let prefix = env.path("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = format!(
        "worker_processes 1;
daemon off;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{http};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}
  }}
  server {{
    listen 127.0.0.1:{grpc} http2;
    location / {{ grpc_pass grpc://up; }}
  }}
}}
",
        p = prefix.display()
    );
    let file = prefix.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let args = [
        "-p",
        &format!("{}/", prefix.display()),
        "-c",
        &file.display().to_string(),
    ]
    .map(String::from);
    let proc = env.spawn("nginx", Path::new("nginx"), &args, 1)?;
    reverse_ready(env, "nginx", proc, http, grpc).await
}

pub async fn haproxy(env: &Env, upstream: u16) -> anyhow::Result<Reverse> {
    let (http, grpc) = (free_port(), free_port());
    let conf = format!(
        "global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend http
  bind 127.0.0.1:{http}
  default_backend up
frontend grpc
  bind 127.0.0.1:{grpc} proto h2
  default_backend up_h2
backend up
  server up 127.0.0.1:{upstream}
backend up_h2
  server up 127.0.0.1:{upstream} proto h2
"
    );
    let file = env.path("haproxy.cfg");
    std::fs::write(&file, conf)?;
    let args = ["-db", "-f", &file.display().to_string()].map(String::from);
    let proc = env.spawn("haproxy", Path::new("haproxy"), &args, 1)?;
    reverse_ready(env, "haproxy", proc, http, grpc).await
}

async fn reverse_ready(
    env: &Env,
    name: &str,
    mut proc: Child,
    http: u16,
    grpc: u16,
) -> anyhow::Result<Reverse> {
    let (http, grpc) = (local(http), local(grpc));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_status(http, "/").await != Some(200) {
        if !proc.running() || Instant::now() > deadline {
            bail!("{name} did not start:\n{}", env.log_tail(name));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Reverse { http, grpc, proc })
}
