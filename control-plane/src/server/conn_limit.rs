//! Bounds on the connections a listener holds before they have proved useful
//! (a TLS handshake in progress, an HTTP connection waiting for a request
//! head), so that a flood of connections that say nothing cannot take every
//! slot from the clients that do.
//!
//! The listener accepts every connection at once (a full accept queue would
//! hold the operator's connection back behind the flood) and asks
//! [`ConnLimiter::admit`] for a slot:
//!
//! - a source (an IPv4 address, an IPv6 /64) that already holds
//!   `max_per_source` slots gives up its oldest evictable one to the new
//!   connection;
//! - when every slot is taken, the source holding the most slots gives up its
//!   oldest evictable one;
//! - when no slot can be evicted (every connection is busy serving a
//!   request), the new connection is refused (closed at once).
//!
//! Evicting the oldest favours the connection that has just arrived: a client
//! that completes its handshake or sends its request in milliseconds is
//! through long before a flood of new connections reaches it, while a
//! connection that has been silent longest is the likeliest to be an attack.
//! Evictions and refusals are counted for `/metrics`.

use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// How many connections may hold a slot, in all and from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    pub max_per_source: usize,
}

/// The slots of one listener. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct ConnLimiter {
    /// `listener` label of its metrics: `grpc`, `http`.
    name: &'static str,
    limits: Limits,
    state: Mutex<State>,
    evicted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// By id, which is also by age (oldest first).
    slots: BTreeMap<u64, Slot>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
}

#[derive(Debug)]
struct Slot {
    source: IpAddr,
    evictable: bool,
    evict: Arc<Notify>,
}

/// The source a connection is counted against: its IPv4 address (IPv4-mapped
/// IPv6 included), or the /64 of its IPv6 address (one host usually has a
/// whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

impl ConnLimiter {
    pub fn new(name: &'static str, limits: Limits) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            name,
            limits: Limits {
                max: limits.max.max(1),
                max_per_source: limits.max_per_source.clamp(1, limits.max.max(1)),
            },
            state: Mutex::default(),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A slot for a connection from `peer`, evicting another connection if
    /// need be; None: refused (every slot is busy).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admitted> {
        let source = source_of(peer);
        let mut state = self.lock();
        let held = state.by_source.get(&source).map_or(0, BTreeSet::len);
        if held >= self.limits.max_per_source {
            let Some(victim) = state.oldest_evictable_of(source) else {
                drop(state);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            state.evict(victim);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        if state.slots.len() >= self.limits.max {
            let Some(victim) = state.victim_of_busiest_source() else {
                drop(state);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            state.evict(victim);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = state.next_id;
        state.next_id += 1;
        let evict = Arc::new(Notify::new());
        state.slots.insert(
            id,
            Slot {
                source,
                evictable: true,
                evict: evict.clone(),
            },
        );
        state.by_source.entry(source).or_default().insert(id);
        Some(Admitted {
            limiter: self.clone(),
            id,
            evict,
        })
    }

    /// Slots held now.
    pub fn held(&self) -> usize {
        self.lock().slots.len()
    }

    /// Connections closed to make room for newer ones.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Connections refused because every slot was busy.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed because they missed their deadline (a handshake,
    /// a request head); counted by the listener.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    pub fn count_timeout(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends this listener's samples of
    /// `remora_control_connections_shed_total` (the HELP and TYPE lines are
    /// [`render_header`]'s).
    pub fn render(&self, out: &mut String) {
        for (reason, n) in [
            ("evicted", self.evicted()),
            ("refused", self.refused()),
            ("timeout", self.timed_out()),
        ] {
            out.push_str(&format!(
                "{CONNECTIONS_SHED_TOTAL}{{listener=\"{}\",reason=\"{reason}\"}} {n}\n",
                self.name
            ));
        }
    }
}

/// Connections a control-plane listener closed or refused to stay available.
pub const CONNECTIONS_SHED_TOTAL: &str = "remora_control_connections_shed_total";

/// The HELP and TYPE lines of [`CONNECTIONS_SHED_TOTAL`].
pub fn render_header(out: &mut String) {
    out.push_str(&format!(
        "# HELP {CONNECTIONS_SHED_TOTAL} Connections closed or refused to keep a listener \
         available: evicted (oldest idle or handshaking connection, for a newer one), refused \
         (every slot busy), timeout (handshake or request head too slow).\n\
         # TYPE {CONNECTIONS_SHED_TOTAL} counter\n"
    ));
}

impl State {
    fn oldest_evictable_of(&self, source: IpAddr) -> Option<u64> {
        self.by_source
            .get(&source)?
            .iter()
            .copied()
            .find(|id| self.slots.get(id).is_some_and(|slot| slot.evictable))
    }

    /// The oldest evictable slot of the source holding the most slots (among
    /// sources with an evictable one).
    fn victim_of_busiest_source(&self) -> Option<u64> {
        let mut best: Option<(usize, u64)> = None;
        let mut seen = std::collections::HashSet::new();
        // Oldest first, so the first evictable slot met per source is its oldest.
        for (id, slot) in &self.slots {
            if !slot.evictable || !seen.insert(slot.source) {
                continue;
            }
            let held = self.by_source.get(&slot.source).map_or(0, BTreeSet::len);
            if best.is_none_or(|(most, _)| held > most) {
                best = Some((held, *id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&slot.source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&slot.source);
            }
        }
        Some(slot)
    }

    fn evict(&mut self, id: u64) {
        if let Some(slot) = self.remove(id) {
            // Stored as a permit if its task is not waiting yet.
            slot.evict.notify_one();
        }
    }
}

/// A connection's slot; freed when dropped.
#[derive(Debug)]
pub struct Admitted {
    limiter: Arc<ConnLimiter>,
    id: u64,
    evict: Arc<Notify>,
}

impl Admitted {
    /// Resolves when this connection has been evicted to make room: its task
    /// should close it.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// Busy connections (serving a request) are never evicted; idle ones
    /// (waiting for a request head) are.
    pub fn set_busy(&self, busy: bool) {
        if let Some(slot) = self.limiter.lock().slots.get_mut(&self.id) {
            slot.evictable = !busy;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limiter.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    async fn is_evicted(slot: &Admitted) -> bool {
        tokio::time::timeout(Duration::from_millis(10), slot.evicted())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_source_at_its_bound_gives_up_its_oldest_slot() {
        let limiter = ConnLimiter::new(
            "t",
            Limits {
                max: 10,
                max_per_source: 2,
            },
        );
        let a1 = limiter.admit(ip("10.0.0.1")).unwrap();
        let a2 = limiter.admit(ip("10.0.0.1")).unwrap();
        let b1 = limiter.admit(ip("10.0.0.2")).unwrap();
        let a3 = limiter.admit(ip("10.0.0.1")).unwrap();
        assert!(is_evicted(&a1).await);
        assert!(!is_evicted(&a2).await);
        assert!(!is_evicted(&b1).await);
        assert!(!is_evicted(&a3).await);
        assert_eq!(limiter.held(), 3);
        assert_eq!(limiter.evicted(), 1);
        drop(a1);
        assert_eq!(limiter.held(), 3, "an evicted slot was already freed");
        drop((a2, a3, b1));
        assert_eq!(limiter.held(), 0);
    }

    #[tokio::test]
    async fn when_full_the_busiest_source_gives_up_a_slot_and_busy_ones_are_kept() {
        let limiter = ConnLimiter::new(
            "t",
            Limits {
                max: 4,
                max_per_source: 4,
            },
        );
        let b1 = limiter.admit(ip("10.0.0.2")).unwrap();
        let flood: Vec<_> = (0..3)
            .map(|_| limiter.admit(ip("10.0.0.1")).unwrap())
            .collect();
        // b1 is the oldest, but 10.0.0.1 holds the most.
        let c1 = limiter.admit(ip("10.0.0.3")).unwrap();
        assert!(is_evicted(&flood[0]).await);
        assert!(!is_evicted(&b1).await);
        assert!(!is_evicted(&c1).await);
        // Busy slots are never evicted; when all are busy, newcomers are refused.
        for slot in [&b1, &flood[1], &flood[2], &c1] {
            slot.set_busy(true);
        }
        assert!(limiter.admit(ip("10.0.0.4")).is_none());
        assert_eq!(limiter.refused(), 1);
        flood[2].set_busy(false);
        let d1 = limiter.admit(ip("10.0.0.4")).unwrap();
        assert!(is_evicted(&flood[2]).await);
        assert!(!is_evicted(&d1).await);
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            source_of(ip("2001:db8:1:2:aaaa::1")),
            source_of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:2::1")),
            source_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }
}
