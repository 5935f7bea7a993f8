//! A real etcd cluster for tests: `n` members of Debian's `etcd` (3.4) on free
//! ports of 127.0.0.1, bootstrapped statically (`--initial-cluster`), each
//! with its data dir and its log (stderr) in one temp dir.
//!
//! Heartbeat and election timeouts are short (50 ms and 500 ms) so a stopped
//! leader is replaced within about a second. Members can be stopped (SIGTERM),
//! killed (SIGKILL) and started again on their data dir, where they rejoin.
//! Every member is killed when the cluster drops; if the thread is panicking,
//! the tail of every member's log is printed first.
//!
//! ```no_run
//! # async fn demo() {
//! use remora_tests::etcd::{self, EtcdCluster};
//! if etcd::skip("my_test") {
//!     return;
//! }
//! let mut cluster = EtcdCluster::start(3).await;
//! let endpoints = cluster.endpoints_csv(); // http://127.0.0.1:P,...
//! cluster.stop(0).await;
//! assert!(cluster.put("k", "v").await.is_ok());
//! cluster.start_member(0).await;
//! # }
//! ```

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::free_port;

/// How long a cluster (or a restarted member) may take to become healthy.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `etcdctl` call may take in all.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of each member's log shown when something fails.
const LOG_TAIL: usize = 25;

/// `etcd` (or `etcdctl`): on `PATH`, else in `/usr/bin`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(Path::new("/usr/bin").join(name)).filter(|p| p.is_file()))
}

/// Whether `test` must be skipped because `etcd` is missing: prints why and
/// returns `true`. Fails instead in CI (`CI` set) or with
/// `REMORA_STRICT_TESTS=1` ([`crate::skip_or_fail`]), where it must run.
pub fn skip(test: &str) -> bool {
    skip_unless(test, &["etcd"])
}

/// [`skip`] for a test that needs every one of `tools` (such as `etcd` and
/// `etcdctl`).
pub fn skip_unless(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return false;
    }
    let reason = format!(
        "{} not found on PATH or in /usr/bin (Debian: apt-get install -y etcd-server etcd-client; \
         or run scripts/test.sh as root)",
        missing.join(", ")
    );
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!in_ci, "{test} cannot run, and CI must run it: {reason}");
    crate::skip_or_fail(test, &reason);
    true
}

/// One member: its ports, data dir, log file and process (while it runs).
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last [`LOG_TAIL`] lines of the member's log.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
        let mut out = format!(
            "----- etcd {} ({}) stderr, last {} lines of {} -----\n",
            self.name,
            self.client_url(),
            tail.len(),
            self.log.display()
        );
        for line in tail {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

/// A running etcd cluster. See the module's documentation.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    etcd: PathBuf,
    initial_cluster: String,
    token: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `members` members (at least 1) and waits until the cluster is
    /// healthy: a leader elected and every member serving reads; panics with
    /// every member's log tail after [`HEALTHY_TIMEOUT`]. Call [`skip`] first:
    /// this panics if `etcd` is missing.
    pub async fn start(members: usize) -> EtcdCluster {
        assert!(members >= 1, "an etcd cluster needs at least one member");
        let etcd = find_tool("etcd").unwrap_or_else(|| {
            panic!("etcd not found on PATH or in /usr/bin (call remora_tests::etcd::skip first)")
        });
        let dir = tempfile::Builder::new()
            .prefix("remora-etcd-")
            .tempdir()
            .expect("a temp dir for the etcd cluster");
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let token = format!(
            "remora-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = EtcdCluster {
            members,
            etcd,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        cluster.wait_healthy(HEALTHY_TIMEOUT).await;
        cluster
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, `http://127.0.0.1:PORT`, in member order
    /// (stopped members included).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// [`Self::endpoints`] joined with commas (for `--etcd-endpoints`,
    /// `etcdctl --endpoints`).
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].client_port))
    }

    /// The temp dir holding every member's data dir (`mI.data`) and log
    /// (`mI.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether member `i`'s process is running.
    pub fn running(&mut self, i: usize) -> bool {
        self.members[i].running()
    }

    /// Starts member `i`'s process (its data dir decides whether it
    /// bootstraps or rejoins).
    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap_or_else(|e| panic!("{}: {e}", m.log.display()));
        let mut cmd = Command::new(&self.etcd);
        crate::scrub_env(&mut cmd);
        // etcd reads ETCD_* too, and refuses one that shadows a flag.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(name);
            }
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url()])
            .args(["--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd {} ({cmd:?}): {e}", m.name));
        self.members[i].child = Some(child);
    }

    /// Starts member `i` again on its data dir (it rejoins the cluster). If
    /// the running members (with it) make a quorum, waits until it is healthy;
    /// otherwise returns at once (it cannot be, until more are started).
    /// Does nothing if it runs.
    pub async fn start_member(&mut self, i: usize) {
        if self.members[i].running() {
            return;
        }
        self.members[i].kill(); // reaps an exited process
        self.spawn(i);
        let running = (0..self.len()).filter(|&j| self.running(j)).count();
        if running > self.len() / 2 {
            let deadline = tokio::time::Instant::now() + HEALTHY_TIMEOUT;
            while !self.member_healthy(i).await {
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "etcd member {i} did not become healthy within {HEALTHY_TIMEOUT:?} after a restart\n{}",
                        self.logs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Stops member `i` (SIGTERM, waiting) and starts it again
    /// ([`Self::start_member`]).
    pub async fn restart(&mut self, i: usize) {
        self.stop(i).await;
        self.start_member(i).await;
    }

    /// Stops member `i` (SIGTERM) and waits for it to exit (SIGKILL after 10 s).
    pub async fn stop(&mut self, i: usize) {
        let m = &mut self.members[i];
        let Some(child) = m.child.as_mut() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!(
                    "etcd {} ignored SIGTERM for {STOP_TIMEOUT:?}: killing it",
                    m.name
                );
            }
        }
        m.kill();
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Stops every member (SIGTERM, all at once) and waits for them.
    pub async fn stop_all(&mut self) {
        for m in &mut self.members {
            if let Some(child) = m.child.as_mut() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for i in 0..self.len() {
            self.stop(i).await;
        }
    }

    /// Starts every stopped member and waits until the cluster is healthy.
    pub async fn start_all(&mut self) {
        for i in 0..self.len() {
            if !self.members[i].running() {
                self.members[i].kill();
                self.spawn(i);
            }
        }
        self.wait_healthy(HEALTHY_TIMEOUT).await;
    }

    /// Whether member `i` answers `GET /health` with `"health":"true"` (it
    /// knows a leader, and a quorum read through it succeeds).
    pub async fn member_healthy(&self, i: usize) -> bool {
        let addr = self.client_addr(i);
        let check = crate::raw_http::get(addr, "/health");
        match tokio::time::timeout(Duration::from_secs(3), check).await {
            Ok(Ok(resp)) => {
                resp.status == 200
                    && String::from_utf8_lossy(&resp.body)
                        .replace(' ', "")
                        .contains(r#""health":"true""#)
            }
            _ => false,
        }
    }

    /// The member that is the leader now, as the running members see it
    /// (etcd's gRPC gateway, `POST /v3/maintenance/status`); `None` if none
    /// answers or none of them is the leader.
    pub async fn leader(&mut self) -> Option<usize> {
        for i in 0..self.len() {
            if !self.members[i].running() {
                continue;
            }
            let addr = self.client_addr(i);
            let request = format!(
                "POST /v3/maintenance/status HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
            let exchange = crate::raw_http::exchange(addr, request.as_bytes());
            let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(3), exchange).await else {
                continue;
            };
            let Ok(status) = serde_json::from_slice::<serde_json::Value>(&resp.body) else {
                continue;
            };
            let (Some(me), Some(leader)) = (
                status["header"]["member_id"].as_str(),
                status["leader"].as_str(),
            ) else {
                continue;
            };
            if me == leader {
                return Some(i);
            }
        }
        None
    }

    /// Whether every member runs and is healthy ([`Self::member_healthy`]),
    /// so a leader is elected.
    pub async fn is_healthy(&mut self) -> bool {
        for i in 0..self.len() {
            if !self.members[i].running() || !self.member_healthy(i).await {
                return false;
            }
        }
        true
    }

    /// Waits until [`Self::is_healthy`]; panics after `timeout` with each
    /// member's state and log tail.
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_healthy().await {
            if tokio::time::Instant::now() >= deadline {
                let mut states = Vec::new();
                for i in 0..self.len() {
                    let state = if !self.members[i].running() {
                        "not running"
                    } else if self.member_healthy(i).await {
                        "healthy"
                    } else {
                        "running, unhealthy"
                    };
                    states.push(format!(
                        "{} {}: {state}",
                        self.members[i].name,
                        self.endpoint(i)
                    ));
                }
                panic!(
                    "the etcd cluster did not become healthy within {timeout:?} ({})\n{}",
                    states.join("; "),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Member `i`'s whole log (stderr, every run of it).
    pub fn log(&self, i: usize) -> io::Result<String> {
        std::fs::read_to_string(&self.members[i].log)
    }

    /// The tail of every member's log (stderr).
    pub fn logs(&self) -> String {
        self.members.iter().map(Member::log_tail).collect()
    }

    /// Runs `etcdctl --endpoints <all> ARGS...` (API v3, 1 s dial timeout,
    /// 3 s command timeout); panics if `etcdctl` is missing (see
    /// [`skip_unless`]) or hangs.
    pub async fn etcdctl(&self, args: &[&str]) -> Output {
        let etcdctl = find_tool("etcdctl").unwrap_or_else(|| {
            panic!("etcdctl not found on PATH or in /usr/bin (Debian package etcd-client)")
        });
        let mut cmd = Command::new(etcdctl);
        crate::scrub_env(&mut cmd);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCDCTL") {
                cmd.env_remove(name);
            }
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints_csv()])
            .args(["--dial-timeout", "1s", "--command-timeout", "3s"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcdctl {args:?}: {e}"));
        tokio::time::timeout(ETCDCTL_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("etcdctl {args:?} took more than {ETCDCTL_TIMEOUT:?}"))
            .expect("waiting for etcdctl")
    }

    /// `etcdctl put KEY VALUE`: Ok, or etcdctl's stderr.
    pub async fn put(&self, key: &str, value: &str) -> Result<(), String> {
        let out = self.etcdctl(&["put", "--", key, value]).await;
        if out.status.success() {
            Ok(())
        } else {
            Err(describe(&out))
        }
    }

    /// `etcdctl get KEY`: the value (`None` if there is no such key), or
    /// etcdctl's stderr.
    pub async fn get(&self, key: &str) -> Result<Option<String>, String> {
        let out = self
            .etcdctl(&["get", "--print-value-only", "--", key])
            .await;
        if !out.status.success() {
            return Err(describe(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(text.strip_suffix('\n').unwrap_or(&text).to_owned()))
    }
}

fn describe(out: &Output) -> String {
    format!(
        "etcdctl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for m in &mut self.members {
            m.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_skips_outside_ci() {
        let strict = std::env::var_os("REMORA_STRICT_TESTS").is_some_and(|v| v == "1");
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        let missing = &["remora-no-such-tool"];
        if strict || ci {
            assert!(std::panic::catch_unwind(|| skip_unless("t", missing)).is_err());
        } else {
            assert!(skip_unless("t", missing));
        }
        assert!(find_tool("remora-no-such-tool").is_none());
    }
}
