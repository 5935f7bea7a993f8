//! Load balancers over a destination's endpoints, issue 4 §6: power of two choices over
//! peak-EWMA (the default), round robin, and least request.
//!
//! A balancer picks from a slice of anything [`Balanced`]: the caller's endpoint type
//! exposes its [`Load`] and whether it may take traffic (its circuit breaker's
//! [`is_available`](crate::Breaker::is_available)). Unavailable endpoints are never
//! picked; `None` means none is available, and the caller answers `circuit-open` (or
//! `no-endpoints` for an empty set) or tries the route's fallback. Picking allocates
//! nothing and reads atomics only: O(1) for P2C when both sampled endpoints are
//! available, O(endpoints) otherwise and for round robin's skip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::Load;

/// An endpoint a balancer can pick.
pub trait Balanced {
    /// Its load (requests in flight, RTT estimate).
    fn load(&self) -> &Load;
    /// Whether it may take a request now (for example, its breaker is not open).
    fn available(&self) -> bool;
}

impl<T: Balanced + ?Sized> Balanced for &T {
    fn load(&self) -> &Load {
        (**self).load()
    }
    fn available(&self) -> bool {
        (**self).available()
    }
}

impl<T: Balanced + ?Sized> Balanced for Arc<T> {
    fn load(&self) -> &Load {
        (**self).load()
    }
    fn available(&self) -> bool {
        (**self).available()
    }
}

/// Power of two random choices, the cheaper by peak-EWMA [`Load::cost`] wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct P2cEwma;

/// Each available endpoint in turn. An unavailable endpoint's turn passes to the next
/// available one, so while some are ejected their neighbours take a larger share.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

/// Power of two random choices, the one with fewer requests in flight wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastRequest;

impl P2cEwma {
    /// Picks an available endpoint, or `None` if none is.
    pub fn pick<'a, E: Balanced>(&self, endpoints: &'a [E]) -> Option<&'a E> {
        p2c(endpoints, |e| e.load().cost())
    }
}

impl LeastRequest {
    /// Picks an available endpoint, or `None` if none is.
    pub fn pick<'a, E: Balanced>(&self, endpoints: &'a [E]) -> Option<&'a E> {
        p2c(endpoints, |e| f64::from(e.load().in_flight()))
    }
}

impl RoundRobin {
    /// A round robin starting at the first endpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks an available endpoint, or `None` if none is.
    pub fn pick<'a, E: Balanced>(&self, endpoints: &'a [E]) -> Option<&'a E> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        endpoints[start..]
            .iter()
            .chain(&endpoints[..start])
            .find(|e| e.available())
    }
}

/// Two distinct random indices below `n` (n ≥ 2).
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

fn cheaper<'a, E>(a: &'a E, b: &'a E, cost: impl Fn(&E) -> f64) -> &'a E {
    if cost(b) < cost(a) {
        b
    } else {
        a
    }
}

fn p2c<E: Balanced>(endpoints: &[E], cost: impl Fn(&E) -> f64) -> Option<&E> {
    match endpoints {
        [] => None,
        [only] => only.available().then_some(only),
        _ => {
            // Fast path: both samples available (the common case), uniformly chosen.
            let (a, b) = two_distinct(endpoints.len());
            let (ea, eb) = (&endpoints[a], &endpoints[b]);
            if ea.available() && eb.available() {
                return Some(cheaper(ea, eb, cost));
            }
            // Otherwise sample among the available ones only.
            let available = || endpoints.iter().filter(|e| e.available());
            match available().count() {
                0 => None,
                1 => available().next(),
                n => {
                    let (a, b) = two_distinct(n);
                    match (available().nth(a), available().nth(b)) {
                        (Some(ea), Some(eb)) => Some(cheaper(ea, eb, cost)),
                        // Availability changed under us: take any that is still there.
                        (ea, eb) => ea.or(eb).or_else(|| available().next()),
                    }
                }
            }
        }
    }
}

/// A destination's balancer, chosen by the `loadBalancer` field of its policy.
#[derive(Debug)]
pub enum Balancer {
    /// `p2c-ewma` (the default).
    P2cEwma(P2cEwma),
    /// `round-robin`.
    RoundRobin(RoundRobin),
    /// `least-request`.
    LeastRequest(LeastRequest),
}

impl Default for Balancer {
    fn default() -> Self {
        Self::P2cEwma(P2cEwma)
    }
}

impl Balancer {
    /// The balancer a policy names (`p2c-ewma`, `round-robin`, `least-request`), `None`
    /// for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "p2c-ewma" => Some(Self::P2cEwma(P2cEwma)),
            "round-robin" => Some(Self::RoundRobin(RoundRobin::new())),
            "least-request" => Some(Self::LeastRequest(LeastRequest)),
            _ => None,
        }
    }

    /// The policy name of this balancer.
    pub fn name(&self) -> &'static str {
        match self {
            Self::P2cEwma(_) => "p2c-ewma",
            Self::RoundRobin(_) => "round-robin",
            Self::LeastRequest(_) => "least-request",
        }
    }

    /// Picks an available endpoint, or `None` if none is.
    pub fn pick<'a, E: Balanced>(&self, endpoints: &'a [E]) -> Option<&'a E> {
        match self {
            Self::P2cEwma(b) => b.pick(endpoints),
            Self::RoundRobin(b) => b.pick(endpoints),
            Self::LeastRequest(b) => b.pick(endpoints),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[derive(Debug, Default)]
    struct Endpoint {
        id: usize,
        load: Load,
        up: AtomicBool,
    }

    impl Balanced for Endpoint {
        fn load(&self) -> &Load {
            &self.load
        }
        fn available(&self) -> bool {
            self.up.load(Ordering::Relaxed)
        }
    }

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|id| {
                Arc::new(Endpoint {
                    id,
                    load: Load::new(),
                    up: AtomicBool::new(true),
                })
            })
            .collect()
    }

    fn counts(balancer: &Balancer, eps: &[Arc<Endpoint>], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; eps.len()];
        for _ in 0..picks {
            counts[balancer.pick(eps).expect("an endpoint").id] += 1;
        }
        counts
    }

    fn all() -> [Balancer; 3] {
        ["p2c-ewma", "round-robin", "least-request"].map(|n| Balancer::from_name(n).unwrap())
    }

    /// Issue 4: peak-EWMA sends most traffic away from an endpoint ten times slower.
    /// Concurrent clients on a paused clock; each request takes its endpoint's latency.
    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_avoids_a_ten_times_slower_endpoint() {
        let eps = endpoints(3);
        let latency = |id: usize| Duration::from_millis(if id == 0 { 100 } else { 10 });
        let balancer = Arc::new(Balancer::default());
        let picks: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (eps, balancer, picks) = (eps.clone(), balancer.clone(), picks.clone());
                tokio::spawn(async move {
                    for _ in 0..500 {
                        let ep = balancer.pick(&eps).expect("an endpoint");
                        picks[ep.id].fetch_add(1, Ordering::Relaxed);
                        let guard = ep.load.start();
                        tokio::time::sleep(latency(ep.id)).await;
                        guard.finish();
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        let picks: Vec<_> = picks.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        let total: usize = picks.iter().sum();
        let slow_share = picks[0] as f64 / total as f64;
        assert!(
            slow_share <= 0.2,
            "slow endpoint got {slow_share:.3} of {picks:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_prefers_the_cheaper_of_two() {
        let eps = endpoints(2);
        let slow = eps[0].load.start();
        tokio::time::advance(Duration::from_millis(300)).await;
        slow.finish();
        let fast = eps[1].load.start();
        tokio::time::advance(Duration::from_millis(30)).await;
        fast.finish();
        assert_eq!(counts(&Balancer::default(), &eps, 1_000), [0, 1_000]);
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        let eps = endpoints(6);
        for id in [0, 2, 3, 5] {
            eps[id].up.store(false, Ordering::Relaxed);
        }
        for balancer in all() {
            let c = counts(&balancer, &eps, 3_000);
            assert_eq!(
                (c[0], c[2], c[3], c[5]),
                (0, 0, 0, 0),
                "{}: {c:?}",
                balancer.name()
            );
            assert!(c[1] > 1_000 && c[4] > 1_000, "{}: {c:?}", balancer.name());
        }
        eps[1].up.store(false, Ordering::Relaxed);
        for balancer in all() {
            assert_eq!(counts(&balancer, &eps, 100)[4], 100, "{}", balancer.name());
        }
    }

    #[test]
    fn none_when_nothing_is_available() {
        let eps = endpoints(3);
        for e in &eps {
            e.up.store(false, Ordering::Relaxed);
        }
        let none: &[Arc<Endpoint>] = &[];
        for balancer in all() {
            assert!(balancer.pick(&eps).is_none(), "{}", balancer.name());
            assert!(balancer.pick(none).is_none(), "{}", balancer.name());
            assert!(balancer.pick(&eps[..1]).is_none(), "{}", balancer.name());
            eps[0].up.store(true, Ordering::Relaxed);
            assert_eq!(balancer.pick(&eps[..1]).map(|e| e.id), Some(0));
            eps[0].up.store(false, Ordering::Relaxed);
        }
    }

    #[test]
    fn round_robin_is_even() {
        let eps = endpoints(4);
        let balancer = Balancer::from_name("round-robin").unwrap();
        assert_eq!(counts(&balancer, &eps, 4_000), [1_000; 4]);
        let order: Vec<_> = (0..5).map(|_| balancer.pick(&eps).unwrap().id).collect();
        assert_eq!(order, [0, 1, 2, 3, 0]);
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let eps = endpoints(3);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].load.start()).collect();
        let _also_busy = eps[1].load.start();
        let c = counts(&Balancer::from_name("least-request").unwrap(), &eps, 3_000);
        // Endpoint 2 wins whenever it is sampled (2 pairs in 3), endpoint 0 never.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[2] > 1_800, "{c:?}");
        // With two endpoints, the idle one always wins.
        let c = counts(
            &Balancer::from_name("least-request").unwrap(),
            &eps[..2],
            500,
        );
        assert_eq!(c[..2], [0, 500]);
    }

    #[test]
    fn p2c_spreads_evenly_across_equal_endpoints() {
        let eps = endpoints(4);
        for balancer in [
            Balancer::default(),
            Balancer::from_name("least-request").unwrap(),
        ] {
            let c = counts(&balancer, &eps, 40_000);
            // Equal costs: ties go to the first sample, uniformly random.
            assert!(c.iter().all(|&n| (9_000..11_000).contains(&n)), "{c:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for balancer in all() {
            assert_eq!(
                Balancer::from_name(balancer.name()).unwrap().name(),
                balancer.name()
            );
        }
        assert!(Balancer::from_name("random").is_none());
    }
}
