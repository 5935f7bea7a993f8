//! The retry budget per destination, issue 4 §2: retries may add at most `ratio` of the
//! original requests, plus `min_per_second` so quiet clients can still retry.
//!
//! Two parts:
//!
//! - **Ratio credit** in a 10-second sliding window (ten 1-second buckets, lock-free).
//!   Every original request deposits `ratio` of a retry (kept in thousandths, so 0.2 is
//!   exact); every retry withdraws one; credit older than 10 s expires with its bucket.
//!   A withdrawal is a compare-and-swap on the current bucket that only succeeds if the
//!   window's balance stays ≥ 0, and a withdrawal always expires no earlier than the
//!   deposits that paid for it, so the ratio part allows at most `ratio × deposits`
//!   retries over any span of time, concurrency included.
//! - **A floor** of `min_per_second`: a token bucket with that rate and a burst of one
//!   second's worth, used only when the ratio credit is spent.
//!
//! Hence, over `T` seconds with `N` deposits:
//! `retries ≤ N × ratio + min_per_second × (T + 1)`.
//!
//! Why not `tower::retry::budget::TpsBudget`: it takes a `std::sync::Mutex` on every
//! deposit, panics (`assert!`) on out-of-range settings, and turns the ratio into an
//! integer withdrawal cost (`(1 / ratio) as isize`), so a ratio of 0.7 behaves as 1.0 and
//! 0.3 as 0.33. Its floor is a reserve of `min_per_second × ttl` available at once, a
//! burst of ten seconds' worth.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::window::RollingWindow;
use crate::{ConfigError, TokenBucket};

/// How long a deposit counts.
pub const BUDGET_TTL: Duration = Duration::from_secs(10);

/// The highest ratio accepted (ten retries per request).
pub const MAX_RATIO: f64 = 10.0;

/// One retry, in the window's fixed-point unit.
const RETRY: i32 = 1000;

/// A destination's retry budget; share one per destination (behind an `Arc`).
pub struct RetryBudget {
    /// Thousandths of a retry deposited per request (0: no ratio credit).
    credit: i32,
    window: RollingWindow,
    floor: Option<TokenBucket>,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request (0 ..= 10) plus `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> Result<Self, ConfigError> {
        if !(0.0..=MAX_RATIO).contains(&ratio) {
            return Err(ConfigError::new("ratio", "must be between 0 and 10"));
        }
        let floor = match min_per_second {
            0 => None,
            n => Some(TokenBucket::new(f64::from(n), n)?),
        };
        Ok(Self {
            credit: (ratio * f64::from(RETRY)).round() as i32,
            window: RollingWindow::new(BUDGET_TTL),
            floor,
        })
    }

    /// Records one original request (call it once per request, not per attempt).
    pub fn deposit(&self) {
        if self.credit == 0 {
            return;
        }
        let epoch = self.window.epoch(Instant::now());
        self.window.update(epoch, |p| {
            Some((p as i32).saturating_add(self.credit) as u32)
        });
    }

    /// Asks to send one retry; `false` means the budget is spent and the caller must give
    /// up (and answer with the last attempt's result).
    pub fn try_withdraw(&self) -> bool {
        self.withdraw_credit() || self.floor.as_ref().is_some_and(|f| f.try_acquire().is_ok())
    }

    fn withdraw_credit(&self) -> bool {
        if self.credit == 0 {
            return false;
        }
        let epoch = self.window.epoch(Instant::now());
        let others = self
            .window
            .fold(epoch, true, 0i64, |acc, p| acc + i64::from(p as i32));
        self.window.update(epoch, |p| {
            let after = (p as i32).saturating_sub(RETRY);
            (others + i64::from(after) >= 0).then_some(after as u32)
        })
    }

    /// The ratio credit currently available, in retries (may be negative right after old
    /// deposits expired). For the admin dump and tests.
    pub fn balance(&self) -> f64 {
        let epoch = self.window.epoch(Instant::now());
        let milli = self
            .window
            .fold(epoch, false, 0i64, |acc, p| acc + i64::from(p as i32));
        milli as f64 / f64::from(RETRY)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &(f64::from(self.credit) / f64::from(RETRY)))
            .field("balance", &self.balance())
            .field("floor", &self.floor)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn withdraw_all(budget: &RetryBudget) -> usize {
        std::iter::from_fn(|| budget.try_withdraw().then_some(())).count()
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact() {
        for (ratio, deposits, expected) in
            [(0.2, 100, 20), (0.7, 10, 7), (0.3, 10, 3), (2.0, 5, 10)]
        {
            let budget = RetryBudget::new(ratio, 0).unwrap();
            for _ in 0..deposits {
                budget.deposit();
            }
            assert_eq!(withdraw_all(&budget), expected, "ratio {ratio}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn empty_budget_refuses() {
        let budget = RetryBudget::new(0.2, 0).unwrap();
        assert!(!budget.try_withdraw());
        budget.deposit();
        budget.deposit();
        budget.deposit();
        budget.deposit();
        assert!(!budget.try_withdraw(), "0.8 of a retry is not a retry");
        budget.deposit();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_ten_seconds() {
        let budget = RetryBudget::new(1.0, 0).unwrap();
        for _ in 0..5 {
            budget.deposit();
        }
        advance(Duration::from_millis(9_500)).await;
        assert!(budget.try_withdraw(), "still within the window");
        advance(Duration::from_secs(1)).await;
        assert!(!budget.try_withdraw(), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_min_per_second_without_traffic() {
        let budget = RetryBudget::new(0.2, 10).unwrap();
        assert_eq!(withdraw_all(&budget), 10);
        advance(Duration::from_millis(500)).await;
        assert_eq!(withdraw_all(&budget), 5);
        advance(Duration::from_secs(30)).await;
        assert_eq!(
            withdraw_all(&budget),
            10,
            "the floor bursts at most one second"
        );
    }

    /// Issue 4's budget test at unit level: an upstream that always fails, clients that
    /// would retry every failure up to 3 times; retries stay within
    /// `N × ratio + min_per_second × (T + 1)`.
    #[tokio::test(start_paused = true)]
    async fn always_failing_upstream_stays_within_the_budget() {
        for (ratio, min_per_second, rps, seconds) in [
            (0.2, 10, 100, 60),
            (0.2, 10, 5, 30),
            (0.5, 0, 1000, 20),
            (0.1, 3, 50, 45),
        ] {
            let budget = RetryBudget::new(ratio, min_per_second).unwrap();
            let mut requests = 0u64;
            let mut retries = 0u64;
            let step = Duration::from_secs(1) / rps;
            for _ in 0..rps * seconds {
                budget.deposit();
                requests += 1;
                for _attempt in 0..3 {
                    if !budget.try_withdraw() {
                        break;
                    }
                    retries += 1;
                }
                advance(step).await;
            }
            let bound =
                requests as f64 * ratio + f64::from(min_per_second) * (f64::from(seconds) + 1.0);
            assert!(
                retries as f64 <= bound,
                "ratio {ratio}, min {min_per_second}: {retries} retries for {requests} requests > {bound}"
            );
            // And the budget is actually used, not just refused.
            assert!(retries as f64 >= requests as f64 * ratio * 0.9, "{retries}");
        }
    }

    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        let budget = RetryBudget::new(0.5, 0).unwrap();
        for _ in 0..1000 {
            budget.deposit();
        }
        let taken: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| withdraw_all(&budget))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 500);
        assert!(budget.balance().abs() < 1e-9);
    }

    #[test]
    fn invalid_ratios_are_refused() {
        assert!(RetryBudget::new(-0.1, 1).is_err());
        assert!(RetryBudget::new(10.5, 1).is_err());
        assert!(RetryBudget::new(f64::NAN, 1).is_err());
        assert!(RetryBudget::new(0.0, 0).is_ok());
    }
}
