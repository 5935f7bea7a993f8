//! A tiny lock-free cache of resolved counters keyed by a small label value (a status
//! code, a retry reason), so the request path looks up the registry (and builds the
//! label set) only the first time it sees a value.

use std::sync::OnceLock;

use metrics::Counter;

/// Up to `N` counters, each claimed once by the first key that needs a slot. Slots
/// are never freed; a key seen when all slots are taken goes to the registry each time
/// (correct, just slower).
pub(crate) struct CounterCache<K, const N: usize> {
    slots: [OnceLock<(K, Counter)>; N],
}

impl<K: Copy + Eq, const N: usize> CounterCache<K, N> {
    pub(crate) fn new() -> Self {
        CounterCache {
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Adds `value` to the counter of `key`, resolving it with `register` the first
    /// time.
    ///
    /// Slots are scanned in order and each is claimed atomically, so two threads with
    /// the same new key settle on the same slot: a key is never cached twice.
    pub(crate) fn increment(&self, key: K, value: u64, register: impl Fn(K) -> Counter) {
        for slot in &self.slots {
            let (k, counter) = slot.get_or_init(|| (key, register(key)));
            if *k == key {
                counter.increment(value);
                return;
            }
        }
        register(key).increment(value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn registers_once_per_key_and_falls_back_when_full() {
        let registrations = AtomicUsize::new(0);
        let cells: Vec<Arc<std::sync::atomic::AtomicU64>> = (0..4)
            .map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)))
            .collect();
        let register = |k: usize| {
            registrations.fetch_add(1, Ordering::SeqCst);
            Counter::from_arc(cells[k].clone())
        };
        let cache: CounterCache<usize, 2> = CounterCache::new();
        for _ in 0..10 {
            cache.increment(0, 1, register);
            cache.increment(1, 2, register);
        }
        assert_eq!(registrations.load(Ordering::SeqCst), 2);
        for _ in 0..10 {
            cache.increment(3, 1, register);
        }
        assert_eq!(registrations.load(Ordering::SeqCst), 12, "no slot left");
        let values: Vec<u64> = cells.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        assert_eq!(values, [10, 20, 0, 10]);
    }
}
