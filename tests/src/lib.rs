//! The harness behind Remora's mesh-level integration tests.
//!
//! Every test starts real processes — `remora-control`, `remora-proxy` and
//! `sample-app` from the workspace's target directory — on free ports of
//! 127.0.0.1, with its own control plane and data directory, so tests run in
//! parallel. Every child is killed when its handle drops; when a test panics, the
//! tail of each child's output is printed first.
//!
//! Build the binaries before running the tests:
//!
//! ```text
//! cargo build --workspace --bins && cargo test -p remora-tests
//! ```
//!
//! [`bin`] refuses a binary older than any file cargo built it from (its
//! dep-info), naming the file, so a test never runs a stale build.
#![forbid(unsafe_code)]
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test code: not a hot path, and its deadlines are real time"
)]

pub mod clients;
pub mod etcd;
pub mod faults;
pub mod inproc;
pub mod mesh;
pub mod netns;
pub mod observability;
pub mod pki;
pub mod process;
pub mod raw_http;
pub mod structure;
pub mod wire;

pub use clients::*;
pub use mesh::*;
pub use process::{bin, free_port};

use std::future::Future;
use std::time::Duration;

/// A test (or part of one) that cannot run here: prints why and lets the
/// caller skip, or, with `REMORA_STRICT_TESTS=1` (set by `scripts/test.sh`
/// when it runs as root, as in CI, after installing the tools), fails, so
/// nothing passes by skipping where it is meant to run.
pub fn skip_or_fail(what: &str, reason: &str) {
    if std::env::var_os("REMORA_STRICT_TESTS").is_some_and(|v| v == "1") {
        panic!("{what} cannot run, and REMORA_STRICT_TESTS=1 says it must: {reason}");
    }
    eprintln!("SKIPPED {what}: {reason}");
}

/// Polls `check` every 20 ms until it gives `Some`, or panics after `timeout`
/// naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version number in a `remora-control` answer such as `applied version 7`
/// or `rolled back to version 2 as version 7`: the first number after the last
/// word "version", else the first number at all.
pub fn parse_version(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let from = lower.rfind("version").map_or(0, |i| i + "version".len());
    let digits: String = lower[from..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Removes every `REMORA_*` variable from a child's environment, so the
/// developer's own settings (a token, a server URL) cannot leak into a test.
pub fn scrub_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REMORA_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `text` holds `n` as a whole number (not as part of a longer one).
pub fn contains_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|word| word.parse() == Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_cli_answers() {
        assert_eq!(parse_version("applied version 7 (2 documents)"), Some(7));
        assert_eq!(parse_version("Version: v12\n"), Some(12));
        assert_eq!(parse_version("3\n"), Some(3));
        assert_eq!(
            parse_version("rolled back to version 2 as version 7"),
            Some(7)
        );
        assert_eq!(parse_version("nothing"), None);
        assert!(contains_number("shop/backend 127.0.0.1:4000 acked 3", 3));
        assert!(!contains_number("acked 33", 3));
    }
}
