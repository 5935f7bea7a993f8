//! Child processes: finding the workspace's binaries, free ports, and a handle
//! that captures a child's output and kills it on drop.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The workspace binary `target/<profile>/<name>`, found from the test binary's
/// own path (`target/<profile>/deps/<test>`), and checked to be as new as
/// every file cargo built it from ([`check_fresh`]): a test must not run a
/// stale binary.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut dir = exe
        .parent()
        .expect("the test binary's directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    // Checked once per binary and test process.
    static CHECKED: Mutex<Option<HashMap<PathBuf, Result<(), String>>>> = Mutex::new(None);
    let verdict = CHECKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .entry(path.clone())
        .or_insert_with(|| check_fresh(&path))
        .clone();
    if let Err(stale) = verdict {
        panic!("{stale}");
    }
    path
}

/// Whether the binary at `bin` is at least as new as every file cargo built
/// it from: the sources, build scripts, `.proto` files and generated code
/// listed in its dep-info file (`<bin>.d`, written by cargo beside it). Those
/// are exactly the files whose change makes cargo rebuild it, so the error,
/// `run `cargo build --workspace --bins`: <bin> is older than <file>`, goes
/// away with that command. A binary without a dep-info file (not built by
/// cargo) passes.
pub fn check_fresh(bin: &Path) -> Result<(), String> {
    let rebuild = "run `cargo build --workspace --bins`";
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let mut dep_info = bin.as_os_str().to_owned();
    dep_info.push(".d");
    let Ok(text) = std::fs::read_to_string(&dep_info) else {
        return Ok(());
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"));
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for dep in dep_info_files(&text) {
        let dep = root.join(dep);
        match std::fs::metadata(&dep).and_then(|m| m.modified()) {
            Ok(t) if t > built && newest.as_ref().is_none_or(|(n, _)| t > *n) => {
                newest = Some((t, dep));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "{rebuild}: {} was built from {}, which is gone",
                    bin.display(),
                    dep.display()
                ));
            }
        }
    }
    match newest {
        Some((_, dep)) => Err(format!(
            "{rebuild}: {} is older than {}",
            bin.display(),
            dep.display()
        )),
        None => Ok(()),
    }
}

/// The prerequisites of the rules in a Makefile-style dep-info file
/// (`target: a.rs b\ c.rs`, a backslash escaping a space), comments skipped.
fn dep_info_files(text: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((_, deps)) = line.split_once(": ") else {
            continue;
        };
        let mut current = String::new();
        let mut chars = deps.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => current.extend(chars.next()),
                ' ' => {
                    if !current.is_empty() {
                        files.push(PathBuf::from(std::mem::take(&mut current)));
                    }
                }
                _ => current.push(c),
            }
        }
        if !current.is_empty() {
            files.push(PathBuf::from(current));
        }
    }
    files
}

/// A port free on every local address right now, never handed out before by
/// this process.
///
/// Ports come from below the kernel's ephemeral range, so one released here
/// is not taken meanwhile by some client's outgoing connection (a port from
/// `bind(0)` would be from that range).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (20_000u16, ephemeral_low.min(32_768));
    if high > low {
        for _ in 0..1000 {
            let port = fastrand::u16(low..high);
            if !given.contains(&port) && TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("binding 127.0.0.1:0")
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A running child whose stdout and stderr go to files in its own temp dir.
/// Killed (SIGKILL) on drop; if the thread is panicking, its output's tail is
/// printed first.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    logs: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let logs = tempfile::Builder::new()
            .prefix(&format!("remora-{name}-"))
            .tempdir()
            .expect("a temp dir for logs");
        let out = File::create(logs.path().join("stdout")).expect("stdout file");
        let err = File::create(logs.path().join("stderr")).expect("stderr file");
        let child = crate::scrub_env(cmd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, once it has (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the process to stop (SIGTERM); does not wait.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit; whether it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.running() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// The last 40 lines of the process's stdout and stderr.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for stream in ["stdout", "stderr"] {
            let content =
                std::fs::read_to_string(self.logs.path().join(stream)).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            text.push_str(&format!(
                "----- {} {stream} (last {} lines) -----\n",
                self.name,
                tail.len()
            ));
            for line in tail {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn touch(path: &Path, at: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }

    /// A binary `app` built at `built` from `lib.rs` and `my file.rs`, in a
    /// temp dir.
    fn built(built: SystemTime) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (bin, lib, spaced) = (
            dir.path().join("app"),
            dir.path().join("lib.rs"),
            dir.path().join("my file.rs"),
        );
        for f in [&bin, &lib, &spaced] {
            std::fs::write(f, "x").unwrap();
        }
        let escaped = spaced.display().to_string().replace(' ', "\\ ");
        std::fs::write(
            dir.path().join("app.d"),
            format!(
                "{}: {} {escaped}\n\n# env-dep:X=1\n",
                bin.display(),
                lib.display()
            ),
        )
        .unwrap();
        let before = built - Duration::from_secs(60);
        touch(&lib, before);
        touch(&spaced, before);
        touch(&bin, built);
        (dir, bin, spaced)
    }

    #[test]
    fn a_binary_newer_than_its_sources_is_fresh() {
        let (_dir, bin, _) = built(SystemTime::now());
        assert_eq!(check_fresh(&bin), Ok(()));
    }

    #[test]
    fn a_source_changed_after_the_build_names_itself() {
        let now = SystemTime::now();
        let (_dir, bin, spaced) = built(now - Duration::from_secs(30));
        touch(&spaced, now);
        assert_eq!(
            check_fresh(&bin),
            Err(format!(
                "run `cargo build --workspace --bins`: {} is older than {}",
                bin.display(),
                spaced.display()
            ))
        );
    }

    #[test]
    fn a_source_gone_since_the_build_is_stale_too() {
        let (_dir, bin, spaced) = built(SystemTime::now());
        std::fs::remove_file(&spaced).unwrap();
        let err = check_fresh(&bin).unwrap_err();
        assert!(err.ends_with("my file.rs, which is gone"), "{err}");
    }

    #[test]
    fn a_binary_cargo_did_not_build_is_taken_as_it_is() {
        let (dir, bin, _) = built(SystemTime::now());
        std::fs::remove_file(dir.path().join("app.d")).unwrap();
        assert_eq!(check_fresh(&bin), Ok(()));
    }

    #[test]
    fn cargos_own_dep_info_files_are_read() {
        // Whatever this test binary was built with, its own dep-info file
        // (`deps/<name>-<hash>.d`) has the same shape as a binary's.
        let exe = std::env::current_exe().unwrap();
        let mut d = exe.as_os_str().to_owned();
        d.push(".d");
        let text = std::fs::read_to_string(PathBuf::from(d)).unwrap();
        let files = dep_info_files(&text);
        assert!(
            files.iter().any(|f| f.ends_with("tests/src/process.rs")),
            "{files:?}"
        );
    }
}
