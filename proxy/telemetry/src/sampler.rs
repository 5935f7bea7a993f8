//! Head sampling: follow the parent's decision, else draw against a rate the control
//! plane's `TelemetryPolicy` sets at run time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::context::TraceContext;

/// Sampling rate used until the control plane sets one: 1%.
pub const DEFAULT_SAMPLING_RATE: f64 = 0.01;

/// Decides whether a request's trace is recorded. Lock-free; share it by reference or
/// in an `Arc`.
#[derive(Debug)]
pub struct Sampler {
    /// The rate in [0, 1], stored as `f64` bits.
    rate: AtomicU64,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new(DEFAULT_SAMPLING_RATE)
    }
}

impl Sampler {
    /// A sampler with `rate` (clamped to [0, 1]; NaN counts as 0).
    pub fn new(rate: f64) -> Self {
        Sampler {
            rate: AtomicU64::new(clamp(rate).to_bits()),
        }
    }

    /// Changes the rate for the decisions that follow (clamped to [0, 1]; NaN counts
    /// as 0).
    pub fn set_rate(&self, rate: f64) {
        self.rate.store(clamp(rate).to_bits(), Ordering::Relaxed);
    }

    /// The current rate.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Samples or not: the parent's decision when there is one (and it made one),
    /// else a draw against the rate.
    pub fn decide(&self, parent: Option<&TraceContext>) -> bool {
        match parent {
            Some(parent) if !parent.deferred => parent.sampled,
            _ => {
                let rate = self.rate();
                rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
            }
        }
    }
}

fn clamp(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rate_is_one_percent() {
        assert_eq!(Sampler::default().rate(), 0.01);
    }

    #[test]
    fn follows_the_parent() {
        let s = Sampler::new(0.0);
        let mut parent = TraceContext::new_root(true);
        assert!(s.decide(Some(&parent)));
        s.set_rate(1.0);
        parent.sampled = false;
        assert!(!s.decide(Some(&parent)));
    }

    #[test]
    fn deferred_parent_draws_against_the_rate() {
        let s = Sampler::new(1.0);
        let mut parent = TraceContext::new_root(false);
        parent.deferred = true;
        assert!(s.decide(Some(&parent)));
        s.set_rate(0.0);
        assert!(!s.decide(Some(&parent)));
    }

    #[test]
    fn rate_bounds_and_changes_at_run_time() {
        let s = Sampler::new(0.0);
        assert!((0..10_000).all(|_| !s.decide(None)));
        s.set_rate(1.0);
        assert!((0..10_000).all(|_| s.decide(None)));
        s.set_rate(7.0);
        assert_eq!(s.rate(), 1.0);
        s.set_rate(-1.0);
        assert_eq!(s.rate(), 0.0);
        s.set_rate(f64::NAN);
        assert_eq!(s.rate(), 0.0);
    }

    #[test]
    fn rate_is_roughly_honoured() {
        let s = Sampler::new(0.25);
        let n = 100_000;
        let hits = (0..n).filter(|_| s.decide(None)).count();
        // 0.25 ± 0.01: more than 10 standard deviations (~0.0014) of slack.
        assert!((24_000..=26_000).contains(&hits), "{hits} of {n}");
    }
}
