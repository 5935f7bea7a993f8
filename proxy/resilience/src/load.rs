//! An endpoint's load as the balancers see it, issue 4 §6: requests in flight and a
//! peak-EWMA round-trip time (after Finagle's and Linkerd's `PeakEwma`).
//!
//! - A sample above the current estimate replaces it at once (the "peak"), so an endpoint
//!   that turns slow is avoided immediately.
//! - A sample below it pulls the estimate down with weight `1 − exp(−elapsed / decay)`,
//!   `elapsed` being the time since the previous sample, so recovery is gradual.
//! - With no samples the estimate itself decays toward zero (computed at read time,
//!   nothing is written), so an endpoint that was slow and then got no traffic is
//!   eventually tried again instead of being starved forever.
//! - Before the first sample the estimate is a default RTT (30 ms).
//!
//! `cost = estimate × (in_flight + 1)`.
//!
//! Everything is atomics: the in-flight count is an `AtomicU32`, and the estimate (an
//! `f32` of microseconds) and the time of its last update (milliseconds since the load
//! was created, wrapping after 49 days) share one `AtomicU64` updated by compare-and-swap.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// The RTT assumed before an endpoint's first sample.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast the peak-EWMA forgets: the time constant of its exponential decay.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// A stamp up to this far "ahead" of a reader's clock was written by a concurrent
/// thread that read the clock a moment later, not by wrapping.
const CLOCK_RACE_MS: u32 = 60_000;

/// The estimate word before the first sample.
const NO_SAMPLE: u64 = u64::MAX;

/// An endpoint's load. Cheap to clone: clones share the counts, so an [`InFlight`] guard
/// keeps counting against the endpoint even after it has left the endpoint set.
#[derive(Clone)]
pub struct Load {
    inner: Arc<Inner>,
}

struct Inner {
    in_flight: AtomicU32,
    /// f32 microseconds (upper 32 bits) | ms since `origin` of the last update (lower 32).
    estimate: AtomicU64,
    origin: Instant,
    default_rtt_us: f32,
    decay_ms: f64,
}

fn micros_f32(d: Duration) -> f32 {
    d.as_secs_f32() * 1e6
}

impl Default for Load {
    fn default() -> Self {
        Self::new()
    }
}

impl Load {
    /// A load with the default RTT (30 ms) and decay (10 s).
    pub fn new() -> Self {
        Self::with_config(DEFAULT_RTT, DEFAULT_DECAY)
    }

    /// A load with another default RTT and decay (a zero decay counts as 1 ms).
    pub fn with_config(default_rtt: Duration, decay: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                in_flight: AtomicU32::new(0),
                estimate: AtomicU64::new(NO_SAMPLE),
                origin: Instant::now(),
                default_rtt_us: micros_f32(default_rtt),
                decay_ms: (decay.as_secs_f64() * 1e3).max(1.0),
            }),
        }
    }

    /// Counts a request in flight until the returned guard is dropped; call
    /// [`InFlight::finish`] when its response arrives to record the RTT.
    pub fn start(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// The RTT estimate now (decayed since the last sample).
    pub fn rtt_estimate(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.estimate_us(self.now_ms())) / 1e6)
    }

    /// The peak-EWMA cost the P2C balancer compares: `estimate (µs) × (in_flight + 1)`.
    pub fn cost(&self) -> f64 {
        f64::from(self.estimate_us(self.now_ms())) * (f64::from(self.in_flight()) + 1.0)
    }

    fn now_ms(&self) -> u32 {
        // Wrapping on purpose: only differences of these stamps are used.
        Instant::now()
            .saturating_duration_since(self.inner.origin)
            .as_millis() as u32
    }

    fn decay_weight(&self, stamp: u32, now: u32) -> f64 {
        let mut elapsed = now.wrapping_sub(stamp);
        if elapsed > u32::MAX - CLOCK_RACE_MS {
            // Another thread stamped a slightly later millisecond than our `now`.
            elapsed = 0;
        }
        let elapsed = f64::from(elapsed);
        (-elapsed / self.inner.decay_ms).exp()
    }

    fn estimate_us(&self, now: u32) -> f32 {
        let word = self.inner.estimate.load(Ordering::Acquire);
        if word == NO_SAMPLE {
            return self.inner.default_rtt_us;
        }
        let (value, stamp) = unpack(word);
        (f64::from(value) * self.decay_weight(stamp, now)) as f32
    }

    /// Folds one RTT sample into the estimate.
    pub(crate) fn observe(&self, rtt: Duration) {
        let sample = micros_f32(rtt);
        let now = self.now_ms();
        let mut current = self.inner.estimate.load(Ordering::Acquire);
        loop {
            let next = if current == NO_SAMPLE {
                sample
            } else {
                let (value, stamp) = unpack(current);
                if sample > value {
                    sample
                } else {
                    let w = self.decay_weight(stamp, now);
                    (f64::from(value) * w + f64::from(sample) * (1.0 - w)) as f32
                }
            };
            match self.inner.estimate.compare_exchange_weak(
                current,
                pack(next, now),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

fn pack(value_us: f32, stamp_ms: u32) -> u64 {
    (u64::from(value_us.to_bits()) << 32) | u64::from(stamp_ms)
}

fn unpack(word: u64) -> (f32, u32) {
    (f32::from_bits((word >> 32) as u32), word as u32)
}

impl fmt::Debug for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Load")
            .field("in_flight", &self.in_flight())
            .field("rtt_estimate", &self.rtt_estimate())
            .finish()
    }
}

/// One request counted against an endpoint's [`Load`]. Dropping it (cancelled, failed
/// before a response) only stops counting it; [`finish`](Self::finish) also records its
/// RTT.
#[must_use = "the request stops counting as in flight as soon as this is dropped"]
pub struct InFlight {
    load: Load,
    started: Instant,
}

/// What a failed request costs an endpoint's estimate: failure is treated as
/// slowness (Finagle's and Linkerd's peak EWMA), so an endpoint that fails
/// fast never looks like the fastest. The estimate then decays as usual.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

impl InFlight {
    /// Records the time since [`Load::start`] as an RTT sample, and stops counting the
    /// request. Call it when the response head arrives.
    pub fn finish(self) {
        self.load.observe(self.started.elapsed());
    }

    /// Records a failure the endpoint caused (it could not be reached, reset,
    /// or answered a gateway error) as a sample of [`FAILURE_PENALTY`], or of
    /// the time it took if that was longer.
    pub fn fail(self) {
        self.load
            .observe(self.started.elapsed().max(FAILURE_PENALTY));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_failure_makes_an_endpoint_look_slow_not_fast() {
        let good = Load::with_config(Duration::ZERO, DEFAULT_DECAY);
        let dead = Load::with_config(Duration::ZERO, DEFAULT_DECAY);
        good.observe(Duration::from_millis(2));
        // An instant 502 from a dead endpoint.
        dead.start().fail();
        assert!(dead.rtt_estimate() >= Duration::from_millis(900));
        assert!(dead.cost() > good.cost() * 100.0);
        assert_eq!(dead.in_flight(), 0);
    }
    use tokio::time::advance;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(50)
    }

    async fn request(load: &Load, rtt: Duration) {
        let guard = load.start();
        advance(rtt).await;
        guard.finish();
    }

    #[tokio::test(start_paused = true)]
    async fn default_rtt_before_samples() {
        let load = Load::new();
        assert_eq!(load.rtt_estimate(), DEFAULT_RTT);
        assert!((load.cost() - 30_000.0).abs() < 1e-3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_sample_is_taken_at_once() {
        let load = Load::new();
        request(&load, ms(10)).await;
        assert!(close(load.rtt_estimate(), ms(10)));
        request(&load, ms(200)).await;
        assert!(close(load.rtt_estimate(), ms(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_faster_sample_pulls_the_estimate_down_gradually() {
        let load = Load::new();
        request(&load, ms(100)).await;
        // 10 ms sample 1 s after the last update: weight exp(-0.1) ≈ 0.905 on the old value.
        advance(ms(990)).await;
        request(&load, ms(10)).await;
        let w = (-0.1f64).exp();
        let expected = Duration::from_secs_f64(0.1 * w + 0.01 * (1.0 - w));
        assert!(
            close(load.rtt_estimate(), expected),
            "{:?}",
            load.rtt_estimate()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_estimate_decays_toward_zero() {
        let load = Load::new();
        request(&load, ms(100)).await;
        advance(Duration::from_secs(10)).await;
        let expected = Duration::from_secs_f64(0.1 * (-1.0f64).exp());
        assert!(
            close(load.rtt_estimate(), expected),
            "{:?}",
            load.rtt_estimate()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_counts_and_cost() {
        let load = Load::new();
        request(&load, ms(10)).await;
        let a = load.start();
        let b = load.start();
        assert_eq!(load.in_flight(), 2);
        assert!(
            (load.cost() - 10_000.0 * 3.0).abs() < 1.0,
            "{}",
            load.cost()
        );
        drop(a); // cancelled: no sample
        assert_eq!(load.in_flight(), 1);
        advance(ms(50)).await;
        b.finish();
        assert_eq!(load.in_flight(), 0);
        assert!(close(load.rtt_estimate(), ms(50)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stamp_slightly_ahead_does_not_zero_the_estimate() {
        let load = Load::new();
        request(&load, ms(100)).await;
        let now = load.now_ms();
        assert!((load.decay_weight(now + 1, now) - 1.0).abs() < 1e-12);
        assert!(load.decay_weight(now, now + 100_000) < 1e-4);
    }

    #[test]
    fn guards_outlive_a_dropped_endpoint() {
        let load = Load::new();
        let guard = load.start();
        let clone = load.clone();
        drop(load);
        assert_eq!(clone.in_flight(), 1);
        drop(guard);
        assert_eq!(clone.in_flight(), 0);
    }
}
