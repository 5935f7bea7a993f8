//! Fault injection per route, issue 4 §8: a fixed delay and/or an abort status for a
//! percentage of requests, for users' own chaos testing.

use std::time::Duration;

use crate::ConfigError;

/// Delay a share of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultDelay {
    /// How long to hold the request before forwarding it.
    pub delay: Duration,
    /// The share of requests delayed, 0–100.
    pub percent: f64,
}

/// Answer a share of requests with an error instead of forwarding them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultAbort {
    /// The HTTP status to answer with (the caller maps it to a gRPC status for gRPC).
    pub status: u16,
    /// The share of requests aborted, 0–100.
    pub percent: f64,
}

/// A route's fault injection. The delay and the abort are drawn independently, so with
/// both at 50% a quarter of requests are delayed and then aborted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fault {
    /// The delay fault, if any.
    pub delay: Option<FaultDelay>,
    /// The abort fault, if any.
    pub abort: Option<FaultAbort>,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultAction {
    /// Forward it untouched.
    None,
    /// Wait this long, then forward it.
    Delay(Duration),
    /// Answer with this status without forwarding it.
    Abort(u16),
    /// Wait this long, then answer with this status.
    DelayThenAbort(Duration, u16),
}

fn valid_percent(p: f64) -> bool {
    (0.0..=100.0).contains(&p)
}

impl Fault {
    /// Checks the percentages (0–100) and the abort status (200–599).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.delay.is_some_and(|d| !valid_percent(d.percent)) {
            return Err(ConfigError::new(
                "fault.delay.percent",
                "must be between 0 and 100",
            ));
        }
        if let Some(abort) = self.abort {
            if !valid_percent(abort.percent) {
                return Err(ConfigError::new(
                    "fault.abort.percent",
                    "must be between 0 and 100",
                ));
            }
            if !(200..=599).contains(&abort.status) {
                return Err(ConfigError::new(
                    "fault.abort.status",
                    "must be an HTTP status in 200..=599",
                ));
            }
        }
        Ok(())
    }

    /// Whether the route injects anything at all (skip the dice when not).
    pub fn is_active(&self) -> bool {
        self.delay.is_some_and(|d| d.percent > 0.0) || self.abort.is_some_and(|a| a.percent > 0.0)
    }

    /// Decides for one request, with the thread's random generator.
    pub fn decide(&self) -> FaultAction {
        self.decide_by(fastrand::f64)
    }

    /// Decides for one request with `rng` (seeded in tests).
    pub fn decide_with(&self, rng: &mut fastrand::Rng) -> FaultAction {
        self.decide_by(|| rng.f64())
    }

    fn decide_by(&self, mut uniform: impl FnMut() -> f64) -> FaultAction {
        // `uniform()` is in [0, 1): 0% never fires, 100% always does.
        let delay = self
            .delay
            .filter(|d| d.percent > 0.0 && uniform() * 100.0 < d.percent)
            .map(|d| d.delay);
        let abort = self
            .abort
            .filter(|a| a.percent > 0.0 && uniform() * 100.0 < a.percent)
            .map(|a| a.status);
        match (delay, abort) {
            (None, None) => FaultAction::None,
            (Some(d), None) => FaultAction::Delay(d),
            (None, Some(s)) => FaultAction::Abort(s),
            (Some(d), Some(s)) => FaultAction::DelayThenAbort(d, s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn fault(delay_pct: Option<f64>, abort_pct: Option<f64>) -> Fault {
        Fault {
            delay: delay_pct.map(|percent| FaultDelay {
                delay: SECOND,
                percent,
            }),
            abort: abort_pct.map(|percent| FaultAbort {
                status: 503,
                percent,
            }),
        }
    }

    fn tally(f: &Fault, n: usize, seed: u64) -> [usize; 4] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = [0; 4];
        for _ in 0..n {
            counts[match f.decide_with(&mut rng) {
                FaultAction::None => 0,
                FaultAction::Delay(_) => 1,
                FaultAction::Abort(_) => 2,
                FaultAction::DelayThenAbort(..) => 3,
            }] += 1;
        }
        counts
    }

    #[test]
    fn no_fault_does_nothing() {
        let f = Fault::default();
        assert!(!f.is_active());
        assert_eq!(tally(&f, 1_000, 1), [1_000, 0, 0, 0]);
        assert_eq!(
            tally(&fault(Some(0.0), Some(0.0)), 1_000, 1),
            [1_000, 0, 0, 0]
        );
    }

    #[test]
    fn hundred_percent_always_fires() {
        let f = fault(Some(100.0), Some(100.0));
        assert!(f.is_active());
        assert_eq!(tally(&f, 1_000, 2), [0, 0, 0, 1_000]);
        assert_eq!(f.decide(), FaultAction::DelayThenAbort(SECOND, 503));
        assert_eq!(
            fault(Some(100.0), None).decide(),
            FaultAction::Delay(SECOND)
        );
        assert_eq!(fault(None, Some(100.0)).decide(), FaultAction::Abort(503));
    }

    #[test]
    fn percentages_hold_statistically() {
        // 100,000 draws: the standard deviation of a 10% share is under 0.1%, so ±1% is
        // more than ten sigma; the fixed seed makes it deterministic anyway.
        let n = 100_000;
        let [none, delay, abort, both] = tally(&fault(Some(10.0), Some(30.0)), n, 42);
        let share = |c: usize| c as f64 * 100.0 / n as f64;
        assert!(
            (share(delay + both) - 10.0).abs() < 1.0,
            "delay {}",
            share(delay + both)
        );
        assert!(
            (share(abort + both) - 30.0).abs() < 1.0,
            "abort {}",
            share(abort + both)
        );
        assert!(
            (share(both) - 3.0).abs() < 0.5,
            "independent: {}",
            share(both)
        );
        assert_eq!(none + delay + abort + both, n);
    }

    #[test]
    fn validation() {
        assert!(fault(Some(50.0), Some(100.0)).validate().is_ok());
        assert!(fault(Some(101.0), None).validate().is_err());
        assert!(fault(None, Some(-1.0)).validate().is_err());
        assert!(fault(Some(f64::NAN), None).validate().is_err());
        let mut bad_status = fault(None, Some(5.0));
        if let Some(a) = bad_status.abort.as_mut() {
            a.status = 99;
        }
        assert!(bad_status.validate().is_err());
    }
}
