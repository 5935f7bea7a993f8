//! A lock-free rolling window of counters, shared by the circuit breaker's failure rate
//! and the retry budget.
//!
//! The window is split into [`SLOTS`] slots of `window / SLOTS` each. Every slot is one
//! `AtomicU64` holding the slot's epoch (the number of slot lengths since the window was
//! created, upper 32 bits) and a 32-bit payload whose meaning belongs to the caller. A
//! slot whose epoch is older than the window is stale and reads as zero; it is reused in
//! place by the next write, so there is no background task and no lock. Epochs wrap after
//! 2^32 slot lengths (136 years for one-second slots); a slot left untouched for exactly
//! a multiple of that could be misread as live, which we accept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How many slots a window has.
pub(crate) const SLOTS: usize = 10;

#[derive(Debug)]
pub(crate) struct RollingWindow {
    origin: Instant,
    slot_nanos: u64,
    slots: [AtomicU64; SLOTS],
}

const fn pack(epoch: u32, payload: u32) -> u64 {
    ((epoch as u64) << 32) | payload as u64
}

const fn epoch_of(word: u64) -> u32 {
    (word >> 32) as u32
}

const fn payload_of(word: u64) -> u32 {
    word as u32
}

/// How many epochs old `stored` is when the current epoch is `now`; negative when a
/// concurrent caller already wrote a newer epoch.
fn age(now: u32, stored: u32) -> i64 {
    i64::from(now.wrapping_sub(stored) as i32)
}

impl RollingWindow {
    /// A window of `window` total length (at least one nanosecond per slot).
    pub(crate) fn new(window: Duration) -> Self {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Self {
            origin: Instant::now(),
            slot_nanos: (nanos / SLOTS as u64).max(1),
            slots: Default::default(),
        }
    }

    /// The epoch of `now`.
    pub(crate) fn epoch(&self, now: Instant) -> u32 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        (since / u128::from(self.slot_nanos)) as u32
    }

    fn slot(&self, epoch: u32) -> &AtomicU64 {
        &self.slots[epoch as usize % SLOTS]
    }

    /// Applies `f` to the payload of `epoch`'s slot (zero if the slot held an older epoch)
    /// with a compare-and-swap loop. `f` returns `None` to give up; the result says whether
    /// the slot was written.
    pub(crate) fn update(&self, epoch: u32, mut f: impl FnMut(u32) -> Option<u32>) -> bool {
        let slot = self.slot(epoch);
        let mut current = slot.load(Ordering::Acquire);
        loop {
            let stored = epoch_of(current);
            let (keep_epoch, payload) = if age(epoch, stored) > 0 {
                (epoch, 0)
            } else {
                // Same epoch, or a newer one a concurrent caller already opened: add to it.
                (stored, payload_of(current))
            };
            let Some(next) = f(payload) else {
                return false;
            };
            match slot.compare_exchange_weak(
                current,
                pack(keep_epoch, next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Folds `f` over the payloads of the live slots (the last [`SLOTS`] epochs up to and
    /// including `epoch`), optionally skipping `epoch`'s own slot.
    pub(crate) fn fold<T>(
        &self,
        epoch: u32,
        skip_current: bool,
        init: T,
        mut f: impl FnMut(T, u32) -> T,
    ) -> T {
        let current_index = epoch as usize % SLOTS;
        let mut acc = init;
        for (index, slot) in self.slots.iter().enumerate() {
            if skip_current && index == current_index {
                continue;
            }
            let word = slot.load(Ordering::Acquire);
            if age(epoch, epoch_of(word)) < SLOTS as i64 {
                acc = f(acc, payload_of(word));
            }
        }
        acc
    }

    /// Forgets every count.
    pub(crate) fn reset(&self) {
        for slot in &self.slots {
            slot.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(window: &RollingWindow, now: Instant) -> u32 {
        window.fold(window.epoch(now), false, 0, |acc, p| acc + p)
    }

    fn add(window: &RollingWindow, n: u32) {
        let epoch = window.epoch(Instant::now());
        assert!(window.update(epoch, |p| Some(p + n)));
    }

    #[tokio::test(start_paused = true)]
    async fn counts_expire_after_the_window() {
        let window = RollingWindow::new(Duration::from_secs(10));
        add(&window, 3);
        tokio::time::advance(Duration::from_secs(5)).await;
        add(&window, 4);
        assert_eq!(total(&window, Instant::now()), 7);
        tokio::time::advance(Duration::from_millis(5_500)).await;
        // The first slot (epoch 0) is now 10 epochs old: gone. The second is still live.
        assert_eq!(total(&window, Instant::now()), 4);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(total(&window, Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_slot_starts_from_zero() {
        let window = RollingWindow::new(Duration::from_secs(10));
        add(&window, 5);
        // Same slot index, ten epochs later.
        tokio::time::advance(Duration::from_secs(10)).await;
        add(&window, 1);
        assert_eq!(total(&window, Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn update_can_refuse_and_fold_can_skip_current() {
        let window = RollingWindow::new(Duration::from_secs(10));
        add(&window, 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        add(&window, 3);
        let epoch = window.epoch(Instant::now());
        assert!(!window.update(epoch, |_| None));
        assert_eq!(window.fold(epoch, true, 0, |a, p| a + p), 2);
        window.reset();
        assert_eq!(total(&window, Instant::now()), 0);
    }
}
