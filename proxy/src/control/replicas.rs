//! The control plane's replicas, as `--control-plane` names them: a
//! comma-separated list of addresses (`host:port`, `http://…` or
//! `https://…`), any of which may be a DNS name that resolves to several.
//! Every address resolved is a candidate, resolved again at each connection
//! attempt (so a DNS name follows the replicas as they come and go).
//!
//! Discovery and certificates share one rotation: each proxy starts at a
//! random candidate (so proxies spread over the replicas), stays on it while
//! it answers, and moves to the next when it is unreachable or its stream is
//! lost. Two clients that see the same replica fail move the rotation once,
//! not twice (see [`Replicas::failed`]).

use parking_lot::Mutex;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The port of an address given without one: the control plane's default.
pub const DEFAULT_PORT: u16 = 15012;

/// `--control-plane` → its entries as `host:port`, in order (a scheme and a
/// path are dropped: the connection is always TLS, gRPC's paths are fixed).
pub fn parse_list(list: &str) -> Result<Vec<String>, String> {
    let entries = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(authority)
        .collect::<Result<Vec<_>, _>>()?;
    if entries.is_empty() {
        return Err("no address: expected host:port[,host:port...]".into());
    }
    Ok(entries)
}

/// One entry (`host:port`, `http://host:port`, `https://host:port/…`) →
/// `host:port`.
fn authority(entry: &str) -> Result<String, String> {
    let rest = entry
        .strip_prefix("https://")
        .or_else(|| entry.strip_prefix("http://"))
        .unwrap_or(entry);
    let host_port = rest.split('/').next().unwrap_or_default();
    let bad = |why: &str| Err(format!("{entry:?}: {why}"));
    if host_port.is_empty() || host_port.contains(['@', '?', '#', ' ']) {
        return bad("expected host:port");
    }
    // `[v6]:port`, `[v6]`, `host:port` or `host`.
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, "")) => (format!("[{ip}]"), None),
            Some((ip, port)) => match port.strip_prefix(':') {
                Some(port) => (format!("[{ip}]"), Some(port)),
                None => return bad("expected [address]:port"),
            },
            None => return bad("unclosed ["),
        },
        None => match host_port.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return bad("an IPv6 address goes in brackets: [address]:port")
            }
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (host_port.to_string(), None),
        },
    };
    if host.is_empty() || host == "[]" {
        return bad("no host");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return bad("the port must be a number from 1 to 65535"),
        },
        None => DEFAULT_PORT,
    };
    Ok(format!("{host}:{port}"))
}

/// One candidate: an address to dial, and the entry it was resolved from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub addr: SocketAddr,
    /// The `--control-plane` entry (`host:port`) it came from.
    pub entry: String,
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entry == self.addr.to_string() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} ({})", self.addr, self.entry)
        }
    }
}

/// The candidate chosen for one connection attempt.
#[derive(Debug, Clone)]
pub struct Pick {
    pub replica: Replica,
    /// How many candidates there were.
    pub count: usize,
    /// The rotation's position when it was chosen.
    turn: usize,
}

/// The replicas and the rotation over them.
#[derive(Debug)]
pub struct Replicas {
    entries: Vec<String>,
    /// Grows by one for each replica found failing; the candidate is
    /// `turn % count`.
    turn: AtomicUsize,
    /// The last candidate chosen, for [`Replicas::current`].
    current: Mutex<Option<Replica>>,
}

impl Replicas {
    /// The replicas of `entries` (from [`parse_list`]), starting at a random
    /// one.
    pub fn new(entries: Vec<String>) -> Replicas {
        // Any start works: the candidate is taken modulo their count.
        Replicas::starting_at(entries, fastrand::usize(..1 << 20))
    }

    /// Starting at `turn` (for tests).
    pub fn starting_at(entries: Vec<String>, turn: usize) -> Replicas {
        Replicas {
            entries,
            turn: AtomicUsize::new(turn),
            current: Mutex::new(None),
        }
    }

    /// The `--control-plane` entries.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// The last candidate chosen, else the first entry: `host:port`.
    pub fn current(&self) -> String {
        match &*self.current.lock() {
            Some(r) => r.addr.to_string(),
            None => self.entries.first().cloned().unwrap_or_default(),
        }
    }

    /// Every candidate now: the entries in order, each resolved (its
    /// addresses sorted, so the rotation is stable whatever order the
    /// resolver answers in), without repeats. An entry that does not
    /// resolve is left out; none resolving is an error.
    pub async fn resolve(&self) -> Result<Vec<Replica>, String> {
        let mut all: Vec<Replica> = Vec::new();
        let mut errors = Vec::new();
        for entry in &self.entries {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    for addr in addrs {
                        if !all.iter().any(|r| r.addr == addr) {
                            all.push(Replica {
                                addr,
                                entry: entry.clone(),
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(%entry, error = %e, "control-plane address does not resolve");
                    errors.push(format!("{entry}: {e}"));
                }
            }
        }
        if all.is_empty() {
            return Err(format!(
                "no control-plane address resolves ({})",
                errors.join("; ")
            ));
        }
        Ok(all)
    }

    /// The candidate to try now: resolves the entries and takes the
    /// rotation's one.
    pub async fn pick(&self) -> Result<Pick, String> {
        let candidates = self.resolve().await?;
        Ok(self.choose(candidates))
    }

    fn choose(&self, mut candidates: Vec<Replica>) -> Pick {
        let turn = self.turn.load(Ordering::Acquire);
        let count = candidates.len();
        let replica = candidates.swap_remove(turn % count.max(1));
        *self.current.lock() = Some(replica.clone());
        Pick {
            replica,
            count,
            turn,
        }
    }

    /// `pick`'s replica failed: the rotation moves to the next candidate,
    /// unless it has moved since `pick` (another client saw the same
    /// failure, or moved on for its own).
    pub fn failed(&self, pick: &Pick) {
        let _ = self.turn.compare_exchange(
            pick.turn,
            pick.turn.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_takes_every_form_of_address() {
        assert_eq!(
            parse_list("127.0.0.1:15012").unwrap(),
            vec!["127.0.0.1:15012"]
        );
        assert_eq!(
            parse_list(" http://a:1 , https://b.remora:2/x,c:3,, ").unwrap(),
            vec!["a:1", "b.remora:2", "c:3"]
        );
        assert_eq!(
            parse_list("cp.remora,[::1]:7,[fe80::1]").unwrap(),
            vec!["cp.remora:15012", "[::1]:7", "[fe80::1]:15012"]
        );
    }

    #[test]
    fn a_bad_list_says_which_address() {
        for (list, why) in [
            ("", "no address"),
            (" , ", "no address"),
            ("a:1,b:x", "\"b:x\": the port"),
            ("a:0", "the port"),
            ("a:70000", "the port"),
            ("::1:5", "brackets"),
            ("[::1", "unclosed"),
            ("[::1]5", "[address]:port"),
            (":5", "no host"),
            ("http://", "expected host:port"),
            ("user@a:1", "expected host:port"),
        ] {
            let e = parse_list(list).unwrap_err();
            assert!(e.contains(why), "{list:?}: {e}");
        }
    }

    fn local(n: u8, port: u16) -> String {
        format!("127.0.0.{n}:{port}")
    }

    #[tokio::test]
    async fn the_rotation_moves_on_once_per_failure_and_wraps() {
        let replicas = Replicas::starting_at(vec![local(1, 1), local(2, 2), local(3, 3)], 1);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let pick = replicas.pick().await.unwrap();
            assert_eq!(pick.count, 3);
            assert_eq!(replicas.current(), pick.replica.addr.to_string());
            seen.push(pick.replica.addr.to_string());
            replicas.failed(&pick);
        }
        assert_eq!(seen, [local(2, 2), local(3, 3), local(1, 1), local(2, 2)]);
    }

    #[tokio::test]
    async fn a_replica_that_answers_is_kept() {
        let replicas = Replicas::starting_at(vec![local(1, 1), local(2, 2)], 0);
        for _ in 0..3 {
            assert_eq!(
                replicas.pick().await.unwrap().replica.addr.to_string(),
                local(1, 1)
            );
        }
    }

    #[tokio::test]
    async fn two_clients_failing_on_one_replica_move_the_rotation_once() {
        let replicas = Replicas::starting_at(vec![local(1, 1), local(2, 2)], 0);
        let discovery = replicas.pick().await.unwrap();
        let certify = replicas.pick().await.unwrap();
        replicas.failed(&discovery);
        replicas.failed(&certify);
        let next = replicas.pick().await.unwrap();
        assert_eq!(next.replica.addr.to_string(), local(2, 2));
    }

    #[test]
    fn the_start_is_random_and_any_start_is_in_range() {
        let starts: std::collections::HashSet<usize> = (0..64)
            .map(|_| {
                Replicas::new(vec![local(1, 1)])
                    .turn
                    .load(Ordering::Relaxed)
                    % 2
            })
            .collect();
        assert_eq!(
            starts.len(),
            2,
            "64 proxies all started on one of two replicas"
        );
        let replicas = Replicas::starting_at(vec![local(1, 1)], usize::MAX);
        let pick = replicas.choose(vec![Replica {
            addr: "127.0.0.1:1".parse().unwrap(),
            entry: local(1, 1),
        }]);
        replicas.failed(&pick);
        assert_eq!(replicas.turn.load(Ordering::Relaxed), 0, "wraps");
    }

    #[tokio::test]
    async fn a_name_is_every_address_it_resolves_to_and_unresolvable_ones_are_skipped() {
        let replicas = Replicas::starting_at(
            vec![
                "localhost:15012".into(),
                "no-such-host.invalid:1".into(),
                local(1, 15012),
            ],
            0,
        );
        let all = replicas.resolve().await.unwrap();
        assert!(
            all.iter()
                .any(|r| r.addr.ip().is_loopback() && r.entry == "localhost:15012"),
            "{all:?}"
        );
        // 127.0.0.1:15012 came from localhost first: not repeated.
        assert_eq!(
            all.iter()
                .filter(|r| r.addr.to_string() == local(1, 15012))
                .count(),
            1
        );
        assert!(!all.iter().any(|r| r.entry.contains("invalid")));
        let shown = all[0].to_string();
        assert!(shown.ends_with("(localhost:15012)"), "{shown}");

        let none = Replicas::starting_at(vec!["no-such-host.invalid:1".into()], 0);
        let e = none.resolve().await.unwrap_err();
        assert!(e.starts_with("no control-plane address resolves"), "{e}");
    }
}
