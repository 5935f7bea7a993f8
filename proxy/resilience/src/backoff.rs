//! Exponential backoff with full jitter between retry attempts, issue 4 §2
//! (`retry.backoff: {base, max}`), and the same between the attempts of a
//! long-lived client that keeps reconnecting ([`Attempts`]: the sidecar's
//! discovery stream and certificate renewals).

use std::time::Duration;

/// Exponential backoff with full jitter: before retry number `attempt` (0 for the first
/// retry) wait a uniformly random time in `[0, min(max, base × 2^attempt)]`.
///
/// Full jitter (rather than a fixed exponential delay) spreads the retries of many
/// clients that failed at the same moment, so they do not return in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// The largest ceiling; also caps `base`.
    pub max: Duration,
}

impl Default for Backoff {
    /// 25 ms, doubling up to 250 ms.
    fn default() -> Self {
        Self::new(Duration::from_millis(25), Duration::from_millis(250))
    }
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The upper bound of the delay before retry `attempt`: `min(max, base × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doubled = 2u32
            .checked_pow(attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .unwrap_or(Duration::MAX);
        doubled.min(self.max)
    }

    /// A random delay before retry `attempt`, from the thread's generator.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.jitter(attempt, fastrand::u64(..=u64::MAX))
    }

    /// A random delay before retry `attempt`, from `rng` (for reproducible tests).
    pub fn delay_with(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        self.jitter(attempt, rng.u64(..=u64::MAX))
    }

    /// The delays of a series of attempts: before the first retry, the second, and so
    /// on, until [`Attempts::reset`] starts the series again.
    pub const fn attempts(self) -> Attempts {
        Attempts {
            backoff: self,
            attempt: 0,
        }
    }

    fn jitter(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        // Map a uniform u64 onto [0, ceiling] without modulo bias.
        let nanos = (u128::from(random) * (u128::from(ceiling) + 1)) >> 64;
        Duration::from_nanos(nanos as u64)
    }
}

/// A [`Backoff`] that counts its own attempts, for a client that reconnects until it
/// succeeds and starts over once it has (see [`Backoff::attempts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    backoff: Backoff,
    /// Retries made since the last reset.
    attempt: u32,
}

impl Attempts {
    /// The delay before the next attempt: [`Backoff::delay`] of the attempts made so far.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The ceiling of the next delay ([`Backoff::ceiling`]).
    pub fn next_ceiling(&self) -> Duration {
        self.backoff.ceiling(self.attempt)
    }

    /// An attempt succeeded: the next delay is the shortest again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_and_caps() {
        let b = Backoff::new(ms(25), ms(250));
        let ceilings: Vec<_> = (0..6).map(|a| b.ceiling(a)).collect();
        assert_eq!(
            ceilings,
            [ms(25), ms(50), ms(100), ms(200), ms(250), ms(250)]
        );
        assert_eq!(b.ceiling(u32::MAX), ms(250));
        assert_eq!(Backoff::new(ms(500), ms(100)).ceiling(0), ms(100));
        assert_eq!(
            Backoff::new(Duration::MAX, Duration::MAX).ceiling(40),
            Duration::MAX
        );
    }

    #[test]
    fn delays_stay_under_the_ceiling_and_are_spread() {
        let b = Backoff::default();
        let mut rng = fastrand::Rng::with_seed(7);
        for attempt in 0..8 {
            let ceiling = b.ceiling(attempt);
            let delays: Vec<_> = (0..2_000)
                .map(|_| b.delay_with(attempt, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling));
            // Full jitter: the mean is about half the ceiling, and both halves are used.
            let mean = delays.iter().sum::<Duration>() / 2_000;
            assert!(
                mean > ceiling * 2 / 5 && mean < ceiling * 3 / 5,
                "{mean:?} vs {ceiling:?}"
            );
            assert!(delays.iter().any(|d| *d < ceiling / 10));
            assert!(delays.iter().any(|d| *d > ceiling * 9 / 10));
        }
        assert!(b.delay(3) <= ms(200));
    }

    #[test]
    fn zero_base_means_no_wait() {
        let b = Backoff::new(Duration::ZERO, ms(100));
        assert_eq!(b.delay(5), Duration::ZERO);
    }

    #[test]
    fn attempts_grow_to_the_cap_and_start_over_after_a_reset() {
        let mut a = Backoff::new(ms(100), ms(10_000)).attempts();
        for n in 0..40u32 {
            let ceiling = a.next_ceiling();
            assert_eq!(
                ceiling,
                ms(100).saturating_mul(1 << n.min(20)).min(ms(10_000))
            );
            assert!(a.next_delay() <= ceiling, "attempt {n}");
        }
        assert_eq!(
            a.next_ceiling(),
            ms(10_000),
            "capped, however many attempts"
        );
        a.reset();
        assert_eq!(a.next_ceiling(), ms(100));
        assert!(a.next_delay() <= ms(100));
        assert_eq!(a.next_ceiling(), ms(200));
    }

    #[test]
    fn attempts_are_jittered() {
        let mut a = Backoff::new(ms(1_000), ms(1_000)).attempts();
        let delays: Vec<Duration> = (0..200).map(|_| a.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= ms(1_000)));
        assert!(delays.iter().any(|d| *d < ms(500)) && delays.iter().any(|d| *d > ms(500)));
    }
}
