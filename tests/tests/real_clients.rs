//! The mesh with the third-party clients and servers users actually run:
//! PostgreSQL (pgbench, psql), gRPC on Python's grpcio, h2load against an
//! h2c-only nghttpd, redis-benchmark and redis-cli's SUBSCRIBE, WebSockets on
//! Python's `websockets`, and curl against a Python http.server app.
//!
//! Every test builds two pods (see `remora_tests::netns`): a client pod with
//! its sidecar and a server pod with the app and its sidecar, both with
//! transparent interception. The client program dials the server pod's IP and
//! knows nothing of the mesh; between the sidecars every byte is mTLS.
//!
//! Root only, like `pods.rs`: each test skips, saying why, when it is not root
//! or a tool is missing (and fails instead under `REMORA_STRICT_TESTS=1`).
//! `scripts/test.sh` installs what they need as root: the Debian packages
//! postgresql, nghttp2-client, nghttp2-server, redis-server, redis-tools and
//! curl, and the PyPI packages grpcio and websockets. The Python servers and
//! clients live in `tests/clients/`.
//!
//! ```text
//! cargo build --workspace --bins && sudo cargo test -p remora-tests --test real_clients
//! ```

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use remora_tests::netns::{
    self, clients_dir, must, postgres_bin_dir, python_skip_reason, wait_until, AppSpec, Cluster,
    MeshedPod, NsControlPlane, Pod,
};
use remora_tests::process::Proc;

const NS: &str = "real";

const SERVICES: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: client, namespace: real}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: db, namespace: real}
spec:
  ports: [{port: 5432, protocol: tcp}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: greeter, namespace: real}
spec:
  ports: [{port: 50051, protocol: grpc}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: h2c, namespace: real}
spec:
  ports: [{port: 8080, protocol: http2}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: cache, namespace: real}
spec:
  ports: [{port: 6379, protocol: tcp}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: ws, namespace: real}
spec:
  ports: [{port: 8765, protocol: http}]
---
apiVersion: remora.dev/v1
kind: Service
metadata: {name: web, namespace: real}
spec:
  ports: [{port: 8080, protocol: http}]
"#;

const GRPC: AppSpec = AppSpec::Python {
    script: "grpc_server.py",
    port: 50051,
};
const WS: AppSpec = AppSpec::Python {
    script: "ws_server.py",
    port: 8765,
};
const WEB: AppSpec = AppSpec::Python {
    script: "http_app.py",
    port: 8080,
};
const H2C: AppSpec = AppSpec::Nghttpd { port: 8080 };

/// The sidecars' HTTP/2 pings between them: every second, a second to answer.
const KEEPALIVE_1S: &[&str] = &[
    "--h2-keepalive-interval",
    "1s",
    "--h2-keepalive-timeout",
    "1s",
];

// ------------------------------------------------------------------ harness

/// Prints why `test` cannot run here (or fails under REMORA_STRICT_TESTS=1);
/// `true` when it is skipped. `tools` on PATH, Python `modules`, and, with
/// `postgres`, Debian's PostgreSQL server and its `postgres` user.
fn skip(test: &str, tools: &[&str], modules: &[&str], postgres: bool) -> bool {
    if netns::skip(test, &[&["timeout", "ss"], tools].concat()) {
        return true;
    }
    let mut reason = None;
    if !modules.is_empty() {
        reason = python_skip_reason(modules);
    }
    if postgres && reason.is_none() {
        if postgres_bin_dir().is_none() {
            reason = Some(
                "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin \
                 (Debian: apt-get install -y postgresql)"
                    .into(),
            );
        } else if !std::fs::read_to_string("/etc/passwd")
            .is_ok_and(|p| p.lines().any(|l| l.starts_with("postgres:")))
        {
            reason = Some("no `postgres` user (Debian's postgresql package makes it)".into());
        }
    }
    match reason {
        Some(reason) => {
            remora_tests::skip_or_fail(test, &reason);
            true
        }
        None => false,
    }
}

/// A server pod (the app and its sidecar) and a client pod (its sidecar, no
/// app), in their own cluster with its own control plane. Fields drop in
/// order: the processes go before the namespaces.
struct Mesh {
    client: MeshedPod,
    server: MeshedPod,
    _cp: NsControlPlane,
    _cluster: Cluster,
}

impl Mesh {
    /// `service`'s app `app` in the server pod; `server_args` and
    /// `client_args` go to each sidecar's `remora-proxy run`.
    fn start(
        test: &str,
        subnet: u8,
        service: &str,
        app: AppSpec,
        server_args: &[&str],
        client_args: &[&str],
    ) -> Mesh {
        let mut cluster = Cluster::new(test, subnet);
        let cp = NsControlPlane::start(&cluster);
        cp.apply(SERVICES);
        let server =
            MeshedPod::start_with(&cp, cluster.add_pod(), service, NS, Some(app), server_args);
        let client = MeshedPod::start_with(&cp, cluster.add_pod(), "client", NS, None, client_args);
        Mesh {
            client,
            server,
            _cp: cp,
            _cluster: cluster,
        }
    }

    /// The server pod's address: what every client dials.
    fn ip(&self) -> String {
        self.server.pod.ip.to_string()
    }

    fn logs(&self) -> String {
        format!("{}{}", self.client.logs(), self.server.logs())
    }

    /// Waits up to 30 s until `check` passes (the sidecars have their
    /// certificates and the client's knows the server's endpoint).
    fn wait_reachable(&self, what: &str, check: impl FnMut() -> bool) {
        wait_until(Duration::from_secs(30), what, check, || self.logs());
    }
}

/// `timeout -k 5 SECS PROGRAM ARGS...` in `pod`, as root (so intercepted),
/// with libpq's settings for psql and pgbench (no TLS or GSS of its own).
fn run(pod: &Pod, secs: u32, program: &str, args: &[&str]) -> Output {
    pod.command("timeout")
        .args(["-k", "5", &secs.to_string(), program])
        .args(args)
        .env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", pod.ns))
}

/// A program's exit status, stdout and stderr, for messages.
fn shown(out: &Output) -> String {
    let timed_out = if out.status.code() == Some(124) {
        " (killed by timeout)"
    } else {
        ""
    };
    format!(
        "{}{timed_out}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A script in `tests/clients` run by `python3` in `pod`.
fn python(pod: &Pod, secs: u32, script: &str, args: &[&str]) -> Output {
    let path = clients_dir().join(script);
    let path = path.to_string_lossy();
    run(pod, secs, "python3", &[&[path.as_ref()], args].concat())
}

/// Asserts a Python client run passed every case in `cases`.
fn assert_cases_passed(out: &Output, cases: &[&str], mesh: &Mesh) {
    let text = stdout(out);
    let missing: Vec<&&str> = cases
        .iter()
        .filter(|c| !text.lines().any(|l| l.starts_with(&format!("PASS {c} "))))
        .collect();
    assert!(
        out.status.success() && missing.is_empty(),
        "cases {missing:?} did not pass through the mesh: {}\n{}",
        shown(out),
        mesh.logs()
    );
    eprint!("{text}");
}

/// `n` random bytes in a new file `name` in `dir`.
fn random_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("a file"));
    let mut rng = fastrand::Rng::new();
    let mut block = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        rng.fill(&mut block);
        let k = left.min(block.len());
        f.write_all(&block[..k]).expect("writing random bytes");
        left -= k;
    }
    f.flush().expect("flushing");
    path
}

fn sha256_file(path: &Path) -> String {
    let out = must(std::process::Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .expect("sha256sum's answer")
        .to_owned()
}

/// The number just before ` <name>` in `line` (`2000 succeeded` -> 2000).
fn count_before(line: &str, name: &str) -> Option<u64> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == name)
        .and_then(|w| w[0].parse().ok())
}

// ------------------------------------------------------------------ PostgreSQL

fn conninfo(ip: &str) -> String {
    format!(
        "host={ip} port=5432 user=remora dbname=postgres sslmode=disable \
         gssencmode=disable connect_timeout=5"
    )
}

/// `psql -c SQL` from the client pod; its output.
fn psql(mesh: &Mesh, sql: &str) -> Output {
    let conn = conninfo(&mesh.ip());
    run(
        &mesh.client.pod,
        20,
        "psql",
        &[
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
            "-c",
            sql,
        ],
    )
}

fn wait_postgres(mesh: &Mesh) {
    let last = std::cell::RefCell::new(String::new());
    wait_until(
        Duration::from_secs(30),
        "psql SELECT 1 through the mesh",
        || {
            let out = psql(mesh, "select 1");
            *last.borrow_mut() = shown(&out);
            out.status.success() && stdout(&out).trim() == "1"
        },
        || format!("the last psql: {}\n{}", last.borrow(), mesh.logs()),
    );
}

/// One psql session kept open: queries written to its stdin one at a time,
/// each answer read from its stdout as it comes.
struct PsqlSession {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
}

impl PsqlSession {
    fn open(pod: &Pod, ip: &str) -> PsqlSession {
        let conn = conninfo(ip);
        // stdbuf: psql's stdout is a pipe, so line-buffer it.
        let mut child = pod
            .command("timeout")
            .args(["-k", "5", "120", "stdbuf", "-oL", "psql"])
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", &conn])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting psql");
        let lines = reader(child.stdout.take().expect("psql's stdout"));
        let stderr = reader(child.stderr.take().expect("psql's stderr"));
        PsqlSession {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// Sends `sql` and waits up to `timeout` for one line of answer.
    fn query(&mut self, sql: &str, timeout: Duration) -> Result<String, String> {
        let stdin = self.stdin.as_mut().expect("psql's stdin");
        writeln!(stdin, "{sql}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to psql: {e}"))?;
        self.lines
            .recv_timeout(timeout)
            .map_err(|e| format!("no answer from psql ({e})"))
    }

    /// Closes stdin and waits up to 10 s for psql to exit: its exit code and
    /// everything it wrote on stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.code(),
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let err: Vec<String> = self.stderr.try_iter().collect();
        (code, err.join("\n"))
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines from `r`, as they come, on a thread of their own.
fn reader(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn pgbench_through_two_sidecars_has_no_failed_transactions() {
    let test = "pgbench_through_two_sidecars_has_no_failed_transactions";
    if skip(test, &["pgbench", "psql"], &[], true) {
        return;
    }
    let mesh = Mesh::start("pgbench", 31, "db", AppSpec::Postgres, &[], &[]);
    wait_postgres(&mesh);
    let ip = mesh.ip();
    let base = ["-h", &ip, "-p", "5432", "-U", "remora"];

    let init = run(
        &mesh.client.pod,
        120,
        "pgbench",
        &[&["-i", "-q"], &base[..], &["postgres"]].concat(),
    );
    assert!(
        init.status.success(),
        "pgbench -i through the mesh failed: {}\n{}",
        shown(&init),
        mesh.logs()
    );

    let bench = run(
        &mesh.client.pod,
        120,
        "pgbench",
        &[
            &["-c", "8", "-j", "2", "-T", "10"],
            &base[..],
            &["postgres"],
        ]
        .concat(),
    );
    let text = format!(
        "{}{}",
        stdout(&bench),
        String::from_utf8_lossy(&bench.stderr)
    );
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.split('/').next()?.parse::<u64>().ok())
    };
    let processed = number("number of transactions actually processed:");
    let failed = number("number of failed transactions:");
    eprintln!("pgbench: processed {processed:?}, failed {failed:?}");
    assert!(
        bench.status.success() && !text.contains("aborted"),
        "pgbench -c 8 -T 10 through the mesh did not finish cleanly: {}\n{}",
        shown(&bench),
        mesh.logs()
    );
    assert_eq!(
        failed,
        Some(0),
        "pgbench reported failed transactions: {}",
        shown(&bench)
    );
    assert!(
        processed.is_some_and(|n| n > 0),
        "pgbench processed no transactions: {}",
        shown(&bench)
    );
    // Every one of those connections went through the client's sidecar: at
    // least the readiness probe's, pgbench -i's and the 8 clients'. A line is
    // written once its connection is closed on both sides, so it may lag.
    let relayed = || {
        mesh.client
            .access_log()
            .iter()
            .filter(|l| {
                l["direction"] == "outbound"
                    && l["protocol"] == "tcp"
                    && l["destination"] == "db.real"
            })
            .count()
    };
    wait_until(
        Duration::from_secs(10),
        "the client sidecar's access-log lines for pgbench's 8 connections and the 2 before",
        || relayed() >= 10,
        || format!("{} lines\n{}", relayed(), mesh.logs()),
    );
}

/// A psql session's query after it idled for `idle`: the answer, psql's exit
/// code and its stderr (its first query must have worked).
fn query_after_idling(
    mesh: &Mesh,
    idle: Duration,
) -> (Result<String, String>, Option<i32>, String) {
    wait_postgres(mesh);
    let mut session = PsqlSession::open(&mesh.client.pod, &mesh.ip());
    let before = session.query("select 'before-idle';", Duration::from_secs(15));
    assert_eq!(
        before.as_deref(),
        Ok("before-idle"),
        "the psql session's first query failed\n{}",
        mesh.logs()
    );
    std::thread::sleep(idle);
    let after = session.query("select 'after-idle';", Duration::from_secs(15));
    let (code, stderr) = session.finish();
    (after, code, stderr)
}

#[test]
fn an_idle_psql_session_outlives_the_http_idle_timeout() {
    let test = "an_idle_psql_session_outlives_the_http_idle_timeout";
    if skip(test, &["psql", "stdbuf"], &[], true) {
        return;
    }
    // --idle-timeout is for HTTP connections with no request in flight; an
    // opaque TCP connection keeps the default TCP idle timeout (1h).
    let idle = ["--idle-timeout", "2s"];
    let mesh = Mesh::start("pgidle", 32, "db", AppSpec::Postgres, &idle, &idle);
    let (after, code, stderr) = query_after_idling(&mesh, Duration::from_secs(6));
    assert_eq!(
        after.as_deref(),
        Ok("after-idle"),
        "after 6 s idle (3x the HTTP idle timeout) the psql session's query failed \
         (psql exit {code:?}, stderr: {stderr})\n{}",
        mesh.logs()
    );
    assert_eq!(code, Some(0), "psql: {stderr}");
}

#[test]
fn the_tcp_idle_timeout_closes_an_idle_psql_session_and_logs_its_bytes() {
    let test = "the_tcp_idle_timeout_closes_an_idle_psql_session_and_logs_its_bytes";
    if skip(test, &["psql", "stdbuf"], &[], true) {
        return;
    }
    let mesh = Mesh::start(
        "pgtcp",
        33,
        "db",
        AppSpec::Postgres,
        &[],
        &["--tcp-idle-timeout", "2s"],
    );
    let (after, code, stderr) = query_after_idling(&mesh, Duration::from_secs(6));
    assert!(
        after.is_err() && code != Some(0),
        "the session idle for 6 s was not closed by --tcp-idle-timeout 2s: \
         the query gave {after:?}, psql exited {code:?}\n{}",
        mesh.logs()
    );
    eprintln!("psql after the idle: exit {code:?}: {stderr}");

    let mut line = None;
    wait_until(
        Duration::from_secs(10),
        "the client sidecar's access-log line for the idle connection",
        || {
            line = mesh.client.access_log().into_iter().find(|l| {
                l["direction"] == "outbound"
                    && l["protocol"] == "tcp"
                    && l["error"]
                        .as_str()
                        .is_some_and(|e| e.to_ascii_lowercase().contains("idle"))
            });
            line.is_some()
        },
        || mesh.logs(),
    );
    let line = line.expect("the line");
    eprintln!("access log: {line}");
    // To the app (psql): authentication, parameters, the first result; from
    // it: the startup message and the first query.
    let sent = line["bytes_sent"].as_u64().unwrap_or(0);
    let received = line["bytes_received"].as_u64().unwrap_or(0);
    assert!(
        sent >= 200 && received >= 50,
        "the idle-closed connection's line has bytes_sent {sent} and bytes_received \
         {received}, not the session's real counts: {line}"
    );
}

// ------------------------------------------------------------------ gRPC

fn wait_grpc(mesh: &Mesh, target: &str) {
    mesh.wait_reachable("a grpcio unary call through the mesh", || {
        python(
            &mesh.client.pod,
            15,
            "grpc_client.py",
            &["--target", target, "unary"],
        )
        .status
        .success()
    });
}

#[test]
fn grpcio_unary_streaming_large_messages_metadata_and_status_cross_the_mesh() {
    let test = "grpcio_unary_streaming_large_messages_metadata_and_status_cross_the_mesh";
    if skip(test, &["python3"], &["grpc"], false) {
        return;
    }
    let mesh = Mesh::start("grpc", 34, "greeter", GRPC, &[], &[]);
    let target = format!("{}:50051", mesh.ip());
    wait_grpc(&mesh, &target);
    let cases = ["unary", "stream", "large", "metadata", "status"];
    let out = python(
        &mesh.client.pod,
        120,
        "grpc_client.py",
        &[&["--target", target.as_str()], &cases[..]].concat(),
    );
    assert_cases_passed(&out, &cases, &mesh);
}

#[test]
fn grpcio_deadlines_and_cancels_reach_the_server_through_the_mesh() {
    let test = "grpcio_deadlines_and_cancels_reach_the_server_through_the_mesh";
    if skip(test, &["python3"], &["grpc"], false) {
        return;
    }
    let mesh = Mesh::start("grpcdl", 35, "greeter", GRPC, &[], &[]);
    let target = format!("{}:50051", mesh.ip());
    wait_grpc(&mesh, &target);
    let cases = ["deadline", "cancel"];
    let out = python(
        &mesh.client.pod,
        60,
        "grpc_client.py",
        &[&["--target", target.as_str()], &cases[..]].concat(),
    );
    assert_cases_passed(&out, &cases, &mesh);
    // The cancelled call is logged and counted once, as the client's doing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = mesh.client.access_log();
        let cancelled = log
            .iter()
            .any(|l| l["protocol"] == "grpc" && l["error"] == "client-reset");
        if cancelled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client-reset line for the cancelled call: {log:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_grpcio_call_silent_for_three_keepalive_intervals_succeeds() {
    let test = "a_grpcio_call_silent_for_three_keepalive_intervals_succeeds";
    if skip(test, &["python3"], &["grpc"], false) {
        return;
    }
    // The sidecars ping each other every second; the server's sidecar must
    // never ping grpcio, which answers pings more often than every 5 min
    // without data with GOAWAY too_many_pings.
    let mesh = Mesh::start("grpcka", 36, "greeter", GRPC, KEEPALIVE_1S, KEEPALIVE_1S);
    let target = format!("{}:50051", mesh.ip());
    wait_grpc(&mesh, &target);
    let out = python(
        &mesh.client.pod,
        60,
        "grpc_client.py",
        &["--target", &target, "silent", "unary"],
    );
    assert_cases_passed(&out, &["silent", "unary"], &mesh);
}

// ------------------------------------------------------------------ HTTP/2

fn wait_h2c(mesh: &Mesh, url: &str) {
    mesh.wait_reachable("nghttpd's index through the mesh", || {
        let out = run(
            &mesh.client.pod,
            10,
            "curl",
            &["-sS", "--fail", "--http2-prior-knowledge", url],
        );
        stdout(&out) == "hello h2c\n"
    });
}

#[test]
fn h2load_against_an_h2c_server_through_the_mesh_has_no_errors() {
    let test = "h2load_against_an_h2c_server_through_the_mesh_has_no_errors";
    if skip(test, &["h2load", "nghttpd", "curl"], &[], false) {
        return;
    }
    let mesh = Mesh::start("h2load", 37, "h2c", H2C, &[], &[]);
    let url = format!("http://{}:8080/", mesh.ip());
    wait_h2c(&mesh, &url);
    let out = run(
        &mesh.client.pod,
        120,
        "h2load",
        &["-n", "2000", "-c", "10", "-m", "10", &url],
    );
    let text = stdout(&out);
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no requests: line from h2load: {}", shown(&out)));
    eprintln!("h2load: {requests}");
    let n = |name| count_before(requests, name);
    assert!(
        out.status.success()
            && n("total") == Some(2000)
            && n("succeeded") == Some(2000)
            && n("failed") == Some(0)
            && n("errored") == Some(0)
            && n("timeout") == Some(0),
        "h2load through the mesh: {requests}\n{}\n{}",
        shown(&out),
        mesh.logs()
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("status codes:") && count_before(l, "2xx") == Some(2000)),
        "not every answer was 2xx: {text}"
    );
}

#[test]
fn an_http1_client_reaches_an_h2c_only_server_through_the_mesh() {
    let test = "an_http1_client_reaches_an_h2c_only_server_through_the_mesh";
    if skip(test, &["nghttpd", "curl"], &[], false) {
        return;
    }
    let mesh = Mesh::start("h2h1", 38, "h2c", H2C, &[], &[]);
    let url = format!("http://{}:8080/", mesh.ip());
    wait_h2c(&mesh, &url);
    // The control: on loopback (not intercepted) the app refuses HTTP/1.1.
    let direct = run(
        &mesh.server.pod,
        10,
        "curl",
        &["-sS", "--http1.1", "http://127.0.0.1:8080/"],
    );
    assert!(
        !direct.status.success(),
        "nghttpd answered HTTP/1.1 itself, so this test proves nothing: {}",
        shown(&direct)
    );
    // Through the mesh the server's sidecar speaks HTTP/2 to it, as the
    // port is declared http2.
    let out = run(
        &mesh.client.pod,
        10,
        "curl",
        &[
            "-sS",
            "--http1.1",
            "-w",
            "\n%{http_code} %{http_version}",
            &url,
        ],
    );
    assert_eq!(
        stdout(&out),
        "hello h2c\n\n200 1.1",
        "curl --http1.1 to the h2c-only app through the mesh: {}\n{}",
        shown(&out),
        mesh.logs()
    );
}

// ------------------------------------------------------------------ Redis

fn redis_cli(pod: &Pod, host: &str, args: &[&str]) -> Output {
    run(
        pod,
        15,
        "redis-cli",
        &[&["-h", host, "-p", "6379"], args].concat(),
    )
}

fn wait_redis(mesh: &Mesh) {
    let ip = mesh.ip();
    mesh.wait_reachable("redis-cli PING through the mesh", || {
        stdout(&redis_cli(&mesh.client.pod, &ip, &["PING"])).trim() == "PONG"
    });
}

#[test]
fn redis_benchmark_pipelined_through_the_mesh_has_no_errors() {
    let test = "redis_benchmark_pipelined_through_the_mesh_has_no_errors";
    if skip(
        test,
        &["redis-server", "redis-cli", "redis-benchmark"],
        &[],
        false,
    ) {
        return;
    }
    let mesh = Mesh::start("rbench", 39, "cache", AppSpec::Redis, &[], &[]);
    wait_redis(&mesh);
    let ip = mesh.ip();
    let out = run(
        &mesh.client.pod,
        120,
        "redis-benchmark",
        &[
            "-h", &ip, "-p", "6379", "-q", "-n", "20000", "-P", "16", "-t", "set,get",
        ],
    );
    let text = stdout(&out).replace('\r', "\n");
    let results: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("requests per second"))
        .collect();
    eprintln!("redis-benchmark: {results:?}");
    let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success()
            && results.iter().any(|l| l.starts_with("SET:"))
            && results.iter().any(|l| l.starts_with("GET:"))
            && !all.to_ascii_lowercase().contains("error"),
        "redis-benchmark through the mesh: {}\n{}",
        shown(&out),
        mesh.logs()
    );
    // The server did see them all (asked on loopback, not intercepted).
    let info = stdout(&redis_cli(
        &mesh.server.pod,
        "127.0.0.1",
        &["INFO", "stats"],
    ));
    let processed: u64 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("total_commands_processed:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        processed >= 40_000,
        "the server processed {processed} commands, not the benchmark's 40,000"
    );
}

#[test]
fn redis_subscribe_receives_published_messages_through_the_mesh() {
    let test = "redis_subscribe_receives_published_messages_through_the_mesh";
    if skip(test, &["redis-server", "redis-cli"], &[], false) {
        return;
    }
    let mesh = Mesh::start("rsub", 40, "cache", AppSpec::Redis, &[], &[]);
    wait_redis(&mesh);
    let ip = mesh.ip();
    let subscriber = Proc::spawn(
        "redis-subscriber",
        mesh.client
            .pod
            .command("redis-cli")
            .args(["-h", &ip, "-p", "6379", "SUBSCRIBE", "news"]),
    );
    let received =
        || std::fs::read_to_string(subscriber.log_dir().join("stdout")).unwrap_or_default();
    // PUBLISH answers how many subscribers got the message: 1 once the
    // subscription is in place.
    let publish = |msg: &str| stdout(&redis_cli(&mesh.client.pod, &ip, &["PUBLISH", "news", msg]));
    mesh.wait_reachable("the subscription through the mesh", || {
        publish("warm-up").trim() == "1"
    });
    for i in 0..20 {
        let msg = format!("headline-{i}");
        let n = publish(&msg);
        assert_eq!(
            n.trim(),
            "1",
            "PUBLISH {msg} reached {n:?} subscribers\n{}",
            mesh.logs()
        );
    }
    wait_until(
        Duration::from_secs(10),
        "the subscriber to receive all 20 messages",
        || received().contains("headline-19"),
        || format!("subscriber:\n{}\n{}", received(), mesh.logs()),
    );
    let text = received();
    let lines: Vec<&str> = text.lines().collect();
    for i in 0..20 {
        let msg = format!("headline-{i}");
        assert!(
            lines
                .windows(3)
                .any(|w| w == ["message", "news", msg.as_str()]),
            "the subscriber did not get {msg}:\n{text}"
        );
    }
}

// ------------------------------------------------------------------ WebSocket

fn ws(mesh: &Mesh, secs: u32, cases: &[&str]) -> Output {
    let url = format!("ws://{}:8765/", mesh.ip());
    python(
        &mesh.client.pod,
        secs,
        "ws_client.py",
        &[&["--url", url.as_str()], cases].concat(),
    )
}

/// The WebSocket echo server behind its sidecar, answering through the mesh.
fn ws_mesh(test: &str, subnet: u8) -> Mesh {
    let mesh = Mesh::start(test, subnet, "ws", WS, &[], &[]);
    mesh.wait_reachable("a WebSocket echo through the mesh", || {
        ws(&mesh, 15, &["hello"]).status.success()
    });
    mesh
}

#[test]
fn websocket_echoes_and_a_one_mebibyte_message_cross_the_mesh_intact() {
    let test = "websocket_echoes_and_a_one_mebibyte_message_cross_the_mesh_intact";
    if skip(test, &["python3"], &["websockets.asyncio.client"], false) {
        return;
    }
    let mesh = ws_mesh("wsecho", 41);
    let cases = ["echoes", "large"];
    assert_cases_passed(&ws(&mesh, 120, &cases), &cases, &mesh);
}

#[test]
fn websocket_close_codes_are_seen_by_both_sides_through_the_mesh() {
    let test = "websocket_close_codes_are_seen_by_both_sides_through_the_mesh";
    if skip(test, &["python3"], &["websockets.asyncio.client"], false) {
        return;
    }
    let mesh = ws_mesh("wsclose", 42);
    let cases = ["client-close", "server-close"];
    assert_cases_passed(&ws(&mesh, 60, &cases), &cases, &mesh);
}

// ------------------------------------------------------------------ curl

fn web(test: &str, subnet: u8) -> Mesh {
    let mesh = Mesh::start(test, subnet, "web", WEB, &[], &[]);
    let url = format!("http://{}:8080/ok", mesh.ip());
    mesh.wait_reachable("the web app's /ok through the mesh", || {
        stdout(&run(&mesh.client.pod, 10, "curl", &["-sS", "--fail", &url])) == "ok\n"
    });
    mesh
}

/// The app's /stats, asked on loopback in its own pod (not intercepted).
fn app_stats(mesh: &Mesh) -> serde_json::Value {
    let out = run(
        &mesh.server.pod,
        10,
        "curl",
        &["-sS", "--fail", "http://127.0.0.1:8080/stats"],
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the app's /stats: {e}: {}", shown(&out)))
}

/// curl's `-w` values, split on spaces.
fn curl_w(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_expect_100_upload_reaches_the_app_which_alone_decides_to_accept_it() {
    let test = "an_expect_100_upload_reaches_the_app_which_alone_decides_to_accept_it";
    if skip(test, &["python3", "curl", "sha256sum"], &[], false) {
        return;
    }
    let mesh = web("expect", 43);
    let files = tempfile::tempdir().expect("a temp dir");
    let body = random_file(files.path(), "upload.bin", 20 << 20);
    let body_arg = body.to_string_lossy().into_owned();
    let ip = mesh.ip();

    // Refused: the app answers 401 without reading; curl, waiting up to 10 s
    // for a 100 Continue, must get the 401 before it sends any of the body.
    let refused = run(
        &mesh.client.pod,
        60,
        "curl",
        &[
            "-sS",
            "--expect100-timeout",
            "10",
            "-T",
            &body_arg,
            "-H",
            "Expect: 100-continue",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload} %{time_total}",
            &format!("http://{ip}:8080/refuse"),
        ],
    );
    let w = curl_w(&refused);
    eprintln!("refused upload: code, bytes uploaded, seconds: {w:?}");
    assert_eq!(
        w.first().map(String::as_str),
        Some("401"),
        "the refused upload: {}\n{}",
        shown(&refused),
        mesh.logs()
    );
    let uploaded: f64 = w.get(1).and_then(|n| n.parse().ok()).unwrap_or(f64::MAX);
    let stats = app_stats(&mesh);
    let app_read = stats["body_bytes"]["/refuse"].as_u64().unwrap_or(0);
    assert_eq!(
        stats["requests"]["/refuse"], 1,
        "the 401 did not come from the app: {stats}"
    );
    assert_eq!(app_read, 0, "the app read body bytes it refused: {stats}");
    assert!(
        uploaded < (1 << 20) as f64,
        "curl sent {uploaded} bytes of a body the app refused: something answered \
         100 Continue for the app\n{}",
        mesh.logs()
    );

    // Accepted: the app's 100 Continue comes back, the body goes, intact.
    let accepted = run(
        &mesh.client.pod,
        60,
        "curl",
        &[
            "-sS",
            "--expect100-timeout",
            "10",
            "-T",
            &body_arg,
            "-H",
            "Expect: 100-continue",
            "-w",
            "\n%{http_code} %{size_upload} %{time_total}",
            &format!("http://{ip}:8080/upload"),
        ],
    );
    let text = stdout(&accepted);
    let w = curl_w(&accepted);
    eprintln!("accepted upload: code, bytes uploaded, seconds: {w:?}");
    assert_eq!(
        w.first().map(String::as_str),
        Some("200"),
        "the accepted upload: {}\n{}",
        shown(&accepted),
        mesh.logs()
    );
    let answer: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or_default()).expect("the app's JSON");
    assert_eq!(answer["bytes"], 20 << 20, "{answer}");
    assert_eq!(answer["sha256"], sha256_file(&body).as_str(), "{answer}");
    let seconds: f64 = w.get(2).and_then(|n| n.parse().ok()).unwrap_or(f64::MAX);
    assert!(
        seconds < 9.0,
        "the accepted upload took {seconds} s: curl waited out its 10 s for a \
         100 Continue that the app did send"
    );
}

#[test]
fn head_204_and_304_responses_have_no_body_and_do_not_hang() {
    let test = "head_204_and_304_responses_have_no_body_and_do_not_hang";
    if skip(test, &["python3", "curl"], &[], false) {
        return;
    }
    let mesh = web("framing", 44);
    let base = format!("http://{}:8080", mesh.ip());
    let started = Instant::now();

    // Two HEADs in a row on one connection: headers only, Content-Length as GET's.
    let head = run(
        &mesh.client.pod,
        20,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "-I",
            &format!("{base}/file?size=1000"),
            &format!("{base}/file?size=1000"),
        ],
    );
    let text = stdout(&head).to_ascii_lowercase();
    assert!(
        head.status.success()
            && text.matches(" 200").count() == 2
            && text.matches("content-length: 1000").count() == 2,
        "HEAD through the mesh: {}\n{}",
        shown(&head),
        mesh.logs()
    );

    // 204 and 304 (which carries the representation's Content-Length, 1234)
    // between ordinary answers on one connection: no body, nothing waits.
    let urls = ["nocontent", "cached", "ok", "cached", "nocontent", "ok"];
    let mut args: Vec<String> = ["-sS", "--max-time", "10", "-H", "If-None-Match: \"v1\""]
        .map(String::from)
        .to_vec();
    args.extend(["-w".into(), "%{http_code} %{size_download}\n".into()]);
    for u in urls {
        args.extend(["-o".into(), "/dev/null".into(), format!("{base}/{u}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let seq = run(&mesh.client.pod, 20, "curl", &args);
    let got: Vec<String> = stdout(&seq).lines().map(str::to_owned).collect();
    assert_eq!(
        got,
        ["204 0", "304 0", "200 3", "304 0", "204 0", "200 3"],
        "204/304 through the mesh: {}\n{}",
        shown(&seq),
        mesh.logs()
    );
    assert!(seq.status.success(), "{}", shown(&seq));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "two HEADs, two 204s, two 304s and two 200s took {took:?}"
    );
}

#[test]
fn a_100mb_download_and_a_50mb_chunked_upload_cross_the_mesh_intact() {
    let test = "a_100mb_download_and_a_50mb_chunked_upload_cross_the_mesh_intact";
    if skip(test, &["python3", "curl", "sha256sum"], &[], false) {
        return;
    }
    let mesh = web("bulk", 45);
    let base = format!("http://{}:8080", mesh.ip());
    let files = tempfile::tempdir().expect("a temp dir");

    let served = random_file(mesh.server.scratch(), "big.bin", 100 << 20);
    let fetched = files.path().join("fetched.bin");
    let download = run(
        &mesh.client.pod,
        150,
        "curl",
        &[
            "-sS",
            "--max-time",
            "120",
            "-o",
            &fetched.to_string_lossy(),
            "-w",
            "%{http_code} %{size_download} %{speed_download}",
            &format!("{base}/files/big.bin"),
        ],
    );
    let w = curl_w(&download);
    eprintln!("100 MB download: code, bytes, bytes/s: {w:?}");
    assert!(
        download.status.success() && w.first().map(String::as_str) == Some("200"),
        "the 100 MB download: {}\n{}",
        shown(&download),
        mesh.logs()
    );
    assert_eq!(
        sha256_file(&fetched),
        sha256_file(&served),
        "the 100 MB download arrived changed ({} bytes)",
        std::fs::metadata(&fetched).map_or(0, |m| m.len())
    );

    let body = random_file(files.path(), "upload.bin", 50 << 20);
    let upload = run(
        &mesh.client.pod,
        150,
        "curl",
        &[
            "-sS",
            "--max-time",
            "120",
            "-T",
            &body.to_string_lossy(),
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect:",
            "-w",
            "\n%{http_code} %{size_upload} %{speed_upload}",
            &format!("{base}/upload"),
        ],
    );
    let w = curl_w(&upload);
    eprintln!("50 MB chunked upload: code, bytes, bytes/s: {w:?}");
    assert!(
        upload.status.success() && w.first().map(String::as_str) == Some("200"),
        "the 50 MB chunked upload: {}\n{}",
        shown(&upload),
        mesh.logs()
    );
    let text = stdout(&upload);
    let answer: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or_default()).expect("the app's JSON");
    assert_eq!(answer["bytes"], 50 << 20, "{answer}");
    assert_eq!(
        answer["sha256"],
        sha256_file(&body).as_str(),
        "the 50 MB upload arrived changed: {answer}"
    );
}

#[test]
fn response_trailers_reach_curl_when_it_sends_te_trailers() {
    let test = "response_trailers_reach_curl_when_it_sends_te_trailers";
    if skip(test, &["python3", "curl"], &[], false) {
        return;
    }
    let mesh = web("trailer", 46);
    let out = run(
        &mesh.client.pod,
        20,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--raw",
            "-H",
            "TE: trailers",
            &format!("http://{}:8080/trailers", mesh.ip()),
        ],
    );
    let text = stdout(&out);
    // After the last chunk (`0`), the trailer fields, then the empty line.
    let trailers: Vec<String> = text
        .rsplit_once("\r\n0\r\n")
        .or_else(|| text.strip_prefix("0\r\n").map(|t| ("", t)))
        .map(|(_, t)| {
            t.split("\r\n")
                .filter(|l| !l.is_empty())
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default();
    const DIGEST: &str = "e698bd2f595dc0ccad5e68f2e255570e2c6aad78041fcd8facd41c4cfc792b42";
    assert!(
        out.status.success()
            && text.contains("first chunk\n")
            && trailers.contains(&format!("x-checksum: {DIGEST}"))
            && trailers.contains(&"x-count: 3".to_owned()),
        "the trailers did not reach curl (trailer lines {trailers:?}): {}\n{}",
        shown(&out),
        mesh.logs()
    );
}
