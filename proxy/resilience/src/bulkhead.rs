//! Bulkheads per destination service, issue 4 §4: separate limits on requests in flight,
//! requests waiting for a slot, and upstream connections, so a slow dependency cannot take
//! the capacity that calls to the others need.
//!
//! **Critical reserve.** `critical_reserve` is a share of each limit that only routes
//! marked `critical` may use: `reserve = ceil(limit × share)`, and non-critical traffic
//! is capped at `limit − reserve`. Critical traffic may use the whole limit.
//!
//! - In-flight requests use two tokio semaphores, *shared* (`limit − reserve` permits)
//!   and *reserved* (`reserve`), and only critical requests ever touch the reserved one,
//!   so non-critical traffic cannot take the reserved share even momentarily. A critical
//!   request takes a shared permit when one is free and falls back to a reserved one.
//! - Pending requests and connections are plain atomic counters, checked against the
//!   caller's class cap with one compare-and-swap.
//!
//! **Queueing.** A request that finds no free slot may wait only if fewer than its
//! class's `max_pending` requests are already waiting, and then for at most `max_wait`;
//! otherwise the answer is an immediate [`Overloaded`], never an unbounded queue.
//! Waiters are served first come, first served within the semaphore.
//!
//! **Run-time changes.** Limits are fixed per `Bulkhead`; a new policy means a new
//! `Bulkhead` swapped in (an `ArcSwap` in the caller). Permits already handed out return
//! to the bulkhead they came from, so for as long as those requests last the sum of old
//! and new in-flight counts may exceed the new limit; the new limit is exact once they
//! finish.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::ConfigError;

/// A destination's limits: the `limits` block of a `DestinationPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkheadConfig {
    /// Requests in flight at once.
    pub max_requests: u32,
    /// Requests allowed to wait for an in-flight slot; more are refused at once.
    pub max_pending: u32,
    /// Upstream connections open at once.
    pub max_connections: u32,
    /// The share of each limit (0 ..= 1) kept for routes marked `critical`.
    pub critical_reserve: f64,
}

impl Default for BulkheadConfig {
    /// 1024 of each, no reserve.
    fn default() -> Self {
        Self {
            max_requests: 1024,
            max_pending: 1024,
            max_connections: 1024,
            critical_reserve: 0.0,
        }
    }
}

/// Which limit refused a request or connection; the caller answers 503 `overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Overloaded {
    /// No in-flight slot became free within the allowed wait (or no wait was allowed).
    #[error("too many requests in flight to the destination")]
    Requests,
    /// The queue of requests waiting for a slot is full.
    #[error("too many requests waiting for the destination")]
    Pending,
    /// The destination's connection limit is reached.
    #[error("too many connections to the destination")]
    Connections,
}

/// A destination's bulkhead. Cheap to clone: clones share the same limits and counts.
#[derive(Clone)]
pub struct Bulkhead {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Semaphore,
    reserved: Semaphore,
    shared_total: usize,
    reserved_total: usize,
    pending: AtomicU32,
    pending_caps: Caps,
    connections: AtomicU32,
    connection_caps: Caps,
}

/// A limit split by traffic class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    normal: u32,
    critical: u32,
}

impl Caps {
    fn new(limit: u32, share: f64) -> Self {
        Self {
            normal: limit - reserve_of(limit, share),
            critical: limit,
        }
    }

    fn get(self, critical: bool) -> u32 {
        if critical {
            self.critical
        } else {
            self.normal
        }
    }
}

/// `ceil(limit × share)`, at most `limit`.
fn reserve_of(limit: u32, share: f64) -> u32 {
    if share <= 0.0 {
        return 0;
    }
    let reserve = (f64::from(limit) * share).ceil();
    if reserve >= f64::from(limit) {
        limit
    } else {
        reserve as u32
    }
}

fn take(counter: &AtomicU32, cap: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .is_ok()
}

impl Bulkhead {
    /// A bulkhead with `config`; refused if `critical_reserve` is outside 0 ..= 1.
    pub fn new(config: &BulkheadConfig) -> Result<Self, ConfigError> {
        let share = config.critical_reserve;
        if !(0.0..=1.0).contains(&share) {
            return Err(ConfigError::new(
                "criticalReserve",
                "must be between 0 and 1",
            ));
        }
        let requests = Caps::new(config.max_requests, share);
        let shared_total = (requests.normal as usize).min(Semaphore::MAX_PERMITS);
        let reserved_total =
            ((requests.critical - requests.normal) as usize).min(Semaphore::MAX_PERMITS);
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Semaphore::new(shared_total),
                reserved: Semaphore::new(reserved_total),
                shared_total,
                reserved_total,
                pending: AtomicU32::new(0),
                pending_caps: Caps::new(config.max_pending, share),
                connections: AtomicU32::new(0),
                connection_caps: Caps::new(config.max_connections, share),
            }),
        })
    }

    /// Takes an in-flight slot if one is free now, without waiting.
    pub fn try_acquire_request(&self, critical: bool) -> Result<RequestPermit, Overloaded> {
        let inner = &*self.inner;
        if let Ok(permit) = inner.shared.try_acquire() {
            permit.forget();
            return Ok(self.request_permit(false));
        }
        if critical {
            if let Ok(permit) = inner.reserved.try_acquire() {
                permit.forget();
                return Ok(self.request_permit(true));
            }
        }
        Err(Overloaded::Requests)
    }

    /// Takes an in-flight slot, waiting up to `max_wait` for one if the pending queue has
    /// room. Refuses at once with [`Overloaded::Pending`] when the queue is full, and with
    /// [`Overloaded::Requests`] if no slot frees up in time. Cancel-safe: dropping the
    /// future leaves the queue.
    pub async fn acquire_request(
        &self,
        critical: bool,
        max_wait: Duration,
    ) -> Result<RequestPermit, Overloaded> {
        if let Ok(permit) = self.try_acquire_request(critical) {
            return Ok(permit);
        }
        let inner = &*self.inner;
        if !take(&inner.pending, inner.pending_caps.get(critical)) {
            return Err(Overloaded::Pending);
        }
        let _waiting = PendingGuard(inner);
        if max_wait.is_zero() {
            return Err(Overloaded::Requests);
        }
        let wait = async {
            if critical {
                tokio::select! {
                    biased;
                    permit = inner.shared.acquire() => permit.map(|p| { p.forget(); false }),
                    permit = inner.reserved.acquire() => permit.map(|p| { p.forget(); true }),
                }
            } else {
                inner.shared.acquire().await.map(|p| {
                    p.forget();
                    false
                })
            }
        };
        match tokio::time::timeout(max_wait, wait).await {
            Ok(Ok(reserved)) => Ok(self.request_permit(reserved)),
            // The semaphores are never closed, so only the timeout ends up here.
            Ok(Err(_)) | Err(_) => Err(Overloaded::Requests),
        }
    }

    fn request_permit(&self, reserved: bool) -> RequestPermit {
        RequestPermit {
            bulkhead: self.clone(),
            reserved,
        }
    }

    /// Counts one more upstream connection, or refuses with [`Overloaded::Connections`].
    /// The pool keeps the permit with the connection; dropping it frees the slot.
    pub fn try_acquire_connection(&self, critical: bool) -> Result<ConnPermit, Overloaded> {
        let inner = &*self.inner;
        if take(&inner.connections, inner.connection_caps.get(critical)) {
            Ok(ConnPermit {
                bulkhead: self.clone(),
            })
        } else {
            Err(Overloaded::Connections)
        }
    }

    /// Requests in flight now (a gauge).
    pub fn in_flight(&self) -> usize {
        let inner = &*self.inner;
        (inner.shared_total - inner.shared.available_permits().min(inner.shared_total))
            + (inner.reserved_total - inner.reserved.available_permits().min(inner.reserved_total))
    }

    /// Requests waiting for a slot now (a gauge).
    pub fn pending(&self) -> u32 {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Connections counted now (a gauge).
    pub fn connections(&self) -> u32 {
        self.inner.connections.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("in_flight", &self.in_flight())
            .field("pending", &self.pending())
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

struct PendingGuard<'a>(&'a Inner);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One in-flight slot; released when dropped (keep it until the response body ends).
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct RequestPermit {
    bulkhead: Bulkhead,
    reserved: bool,
}

impl RequestPermit {
    /// Whether the slot came from the critical reserve.
    pub fn is_reserved(&self) -> bool {
        self.reserved
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        let inner = &*self.bulkhead.inner;
        if self.reserved {
            inner.reserved.add_permits(1);
        } else {
            inner.shared.add_permits(1);
        }
    }
}

impl fmt::Debug for RequestPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestPermit")
            .field("reserved", &self.reserved)
            .finish()
    }
}

/// One counted upstream connection; released when dropped.
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct ConnPermit {
    bulkhead: Bulkhead,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.bulkhead
            .inner
            .connections
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for ConnPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnPermit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const NO_WAIT: Duration = Duration::ZERO;
    const WAIT: Duration = Duration::from_secs(5);

    fn bulkhead(max_requests: u32, max_pending: u32, reserve: f64) -> Bulkhead {
        Bulkhead::new(&BulkheadConfig {
            max_requests,
            max_pending,
            max_connections: max_requests,
            critical_reserve: reserve,
        })
        .unwrap()
    }

    #[test]
    fn reserve_is_rounded_up_and_capped() {
        assert_eq!(reserve_of(10, 0.2), 2);
        assert_eq!(reserve_of(10, 0.25), 3);
        assert_eq!(reserve_of(1000, 0.1), 100);
        assert_eq!(reserve_of(3, 0.01), 1);
        assert_eq!(reserve_of(3, 1.0), 3);
        assert_eq!(reserve_of(0, 0.5), 0);
        assert_eq!(reserve_of(10, 0.0), 0);
        assert_eq!(reserve_of(u32::MAX, 0.5), u32::MAX / 2 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn non_critical_is_capped_below_the_reserve_while_critical_gets_through() {
        let b = bulkhead(10, 0, 0.2);
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(b.acquire_request(false, WAIT).await.unwrap());
        }
        // Non-critical is over its share: refused at once (the pending queue is 0).
        let start = Instant::now();
        assert_eq!(
            b.acquire_request(false, WAIT).await.unwrap_err(),
            Overloaded::Pending
        );
        assert_eq!(Instant::now(), start);
        // Critical still gets the reserved two.
        for _ in 0..2 {
            let p = b.acquire_request(true, WAIT).await.unwrap();
            assert!(p.is_reserved());
            held.push(p);
        }
        assert_eq!(b.in_flight(), 10);
        assert!(b.try_acquire_request(true).is_err());
        // A critical request holds a shared slot when one is free, keeping the reserve.
        drop(held.remove(0));
        let p = b.try_acquire_request(true).unwrap();
        assert!(!p.is_reserved());
    }

    #[tokio::test(start_paused = true)]
    async fn non_critical_never_takes_a_freed_reserved_slot() {
        let b = bulkhead(2, 10, 0.5);
        let shared = b.acquire_request(false, WAIT).await.unwrap();
        let reserved = b.acquire_request(true, WAIT).await.unwrap();
        assert!(reserved.is_reserved());
        // A non-critical waiter queues first, then a critical one.
        let normal_waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire_request(false, WAIT).await }
        });
        let critical_waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire_request(true, WAIT).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.pending(), 2);
        drop(reserved);
        let got = critical_waiter.await.unwrap().unwrap();
        assert!(
            got.is_reserved(),
            "the freed reserved slot went to critical traffic"
        );
        assert_eq!(b.pending(), 1);
        // The non-critical waiter gets the shared slot once it is freed.
        drop(shared);
        assert!(!normal_waiter.await.unwrap().unwrap().is_reserved());
        assert_eq!(b.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_pending_queue_refuses_at_once() {
        let b = bulkhead(1, 2, 0.0);
        let held = b.acquire_request(false, WAIT).await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.acquire_request(false, WAIT).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(b.pending(), 2);
        let start = Instant::now();
        assert_eq!(
            b.acquire_request(false, WAIT).await.unwrap_err(),
            Overloaded::Pending
        );
        assert_eq!(Instant::now(), start, "no waiting when the queue is full");
        drop(held);
        // The waiters are served one after the other as permits come back.
        let mut served = 0;
        for w in waiters {
            let permit = w.await.unwrap().unwrap();
            served += 1;
            drop(permit);
        }
        assert_eq!(served, 2);
        assert_eq!((b.pending(), b.in_flight()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_by_max_wait() {
        let b = bulkhead(1, 5, 0.0);
        let _held = b.acquire_request(false, WAIT).await.unwrap();
        let start = Instant::now();
        assert_eq!(
            b.acquire_request(false, Duration::from_millis(250))
                .await
                .unwrap_err(),
            Overloaded::Requests
        );
        assert_eq!(Instant::now() - start, Duration::from_millis(250));
        assert_eq!(b.pending(), 0, "the timed-out waiter left the queue");
        assert_eq!(
            b.acquire_request(false, NO_WAIT).await.unwrap_err(),
            Overloaded::Requests
        );
        assert_eq!(b.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let b = bulkhead(1, 1, 0.0);
        let _held = b.acquire_request(false, WAIT).await.unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire_request(false, WAIT).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.pending(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(b.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_are_released_on_drop() {
        let b = bulkhead(3, 0, 0.0);
        let permits: Vec<_> = (0..3)
            .map(|_| b.try_acquire_request(false).unwrap())
            .collect();
        assert_eq!(b.in_flight(), 3);
        assert!(b.try_acquire_request(false).is_err());
        drop(permits);
        assert_eq!(b.in_flight(), 0);
        assert!(b.try_acquire_request(false).is_ok());

        let conns: Vec<_> = (0..3)
            .map(|_| b.try_acquire_connection(false).unwrap())
            .collect();
        assert_eq!(b.connections(), 3);
        assert_eq!(
            b.try_acquire_connection(true).unwrap_err(),
            Overloaded::Connections
        );
        drop(conns);
        assert_eq!(b.connections(), 0);
    }

    #[test]
    fn connections_keep_a_critical_reserve() {
        let b = Bulkhead::new(&BulkheadConfig {
            max_connections: 4,
            critical_reserve: 0.25,
            ..BulkheadConfig::default()
        })
        .unwrap();
        let normal: Vec<_> = (0..3)
            .map(|_| b.try_acquire_connection(false).unwrap())
            .collect();
        assert!(b.try_acquire_connection(false).is_err());
        let critical = b.try_acquire_connection(true).unwrap();
        assert!(b.try_acquire_connection(true).is_err());
        drop(critical);
        drop(normal);
        assert_eq!(b.connections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn pending_keeps_a_critical_reserve() {
        let b = bulkhead(4, 4, 0.25);
        let _held: Vec<_> = (0..4)
            .map(|_| b.try_acquire_request(true).unwrap())
            .collect();
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let b = b.clone();
            waiters.push(tokio::spawn(
                async move { b.acquire_request(false, WAIT).await },
            ));
        }
        tokio::task::yield_now().await;
        assert_eq!(b.pending(), 3);
        assert_eq!(
            b.acquire_request(false, WAIT).await.unwrap_err(),
            Overloaded::Pending
        );
        // A critical request may still queue (it uses the reserved pending slot).
        let critical = tokio::spawn({
            let b = b.clone();
            async move { b.acquire_request(true, Duration::from_millis(10)).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.pending(), 4);
        assert_eq!(critical.await.unwrap().unwrap_err(), Overloaded::Requests);
        for w in waiters {
            w.abort();
        }
    }

    #[test]
    fn invalid_reserve_is_refused_and_huge_limits_are_fine() {
        for share in [-0.1, 1.1, f64::NAN] {
            assert!(Bulkhead::new(&BulkheadConfig {
                critical_reserve: share,
                ..BulkheadConfig::default()
            })
            .is_err());
        }
        let b = Bulkhead::new(&BulkheadConfig {
            max_requests: u32::MAX,
            max_pending: u32::MAX,
            max_connections: u32::MAX,
            critical_reserve: 0.5,
        })
        .unwrap();
        assert!(b.try_acquire_request(false).is_ok());
    }
}
