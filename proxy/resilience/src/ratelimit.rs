//! Token-bucket rate limits for the inbound side, issue 4 §5 (`AuthorizationPolicy.rateLimit`).
//!
//! The bucket is kept as a GCRA "theoretical arrival time" (TAT): the instant at which
//! the bucket would be full again. Taking a token moves the TAT one emission interval
//! (`1 / rate`) later; a token is available while the TAT stays within `burst` intervals
//! of now. That is exactly a token bucket of capacity `burst` refilled at `rate`, but
//! its whole state is one `u64`, so [`TokenBucket`] is a single compare-and-swap and
//! [`KeyedRateLimiter`] stores eight bytes per key.

use parking_lot::Mutex;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::ConfigError;

/// The longest emission interval we represent (about 31 years per token).
const MAX_INTERVAL_NS: u64 = 1 << 60;

/// A bucket's constants: nanoseconds per token and per full bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    interval_ns: u64,
    capacity_ns: u64,
}

impl Gcra {
    fn new(rate: f64, burst: u32) -> Result<Self, ConfigError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ConfigError::new(
                "requestsPerSecond",
                "must be a positive number",
            ));
        }
        if burst == 0 {
            return Err(ConfigError::new("burst", "must be at least 1"));
        }
        // Both casts saturate; the clamp keeps interval × burst far from overflow in practice.
        let interval_ns = ((1e9 / rate).round() as u64).clamp(1, MAX_INTERVAL_NS);
        Ok(Self {
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(u64::from(burst)),
        })
    }

    /// Takes one token from a bucket whose TAT is `tat` at time `now` (both in ns since
    /// the limiter's origin): the new TAT, or how long until a token is available.
    fn take(self, tat: u64, now: u64) -> Result<u64, Duration> {
        let next = tat.max(now).saturating_add(self.interval_ns);
        let limit = now.saturating_add(self.capacity_ns);
        if next <= limit {
            Ok(next)
        } else {
            Err(Duration::from_nanos(next - limit))
        }
    }
}

fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(Instant::now().saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// `Retry-After` seconds for a refusal's wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A lock-free token bucket: `burst` tokens, refilled at `rate` per second, starting full.
pub struct TokenBucket {
    gcra: Gcra,
    origin: Instant,
    tat: AtomicU64,
}

impl TokenBucket {
    /// A full bucket; `rate` must be positive and finite, `burst` at least 1.
    pub fn new(rate: f64, burst: u32) -> Result<Self, ConfigError> {
        let gcra = Gcra::new(rate, burst)?;
        Ok(Self {
            gcra,
            origin: Instant::now(),
            tat: AtomicU64::new(0),
        })
    }

    /// Takes a token, or says how long until one is available (for `Retry-After`, see
    /// [`retry_after_secs`]). A refusal takes nothing.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = nanos_since(self.origin);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = self.gcra.take(tat, now)?;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("interval_ns", &self.gcra.interval_ns)
            .field("capacity_ns", &self.gcra.capacity_ns)
            .finish_non_exhaustive()
    }
}

/// Token buckets per key (a source identity, a route), all with the same `rate` and
/// `burst`, holding at most `max_keys` keys.
///
/// The keys live in a few mutex-guarded shards (16 once `max_keys` ≥ 1024); a lookup
/// holds one shard's lock for a hash probe and an integer update, never across an await.
/// A key already present costs no allocation (look up a `String` key with a `&str`).
///
/// **Cap and eviction.** When a new key arrives at a full shard, every bucket that has
/// refilled completely is dropped first; that loses nothing, as a full bucket is
/// indistinguishable from a new one. Only if every key in the shard is still partly
/// drained is one evicted: the one closest to full (the least recently busy). That key's
/// next request then starts from a full bucket, so a flood of identities beyond the cap
/// can loosen the limit for the quietest keys but can never grow memory past `max_keys`.
/// Eviction costs one scan of the shard (`max_keys / 16` entries), only when a new key
/// meets a full shard.
pub struct KeyedRateLimiter<K> {
    gcra: Gcra,
    origin: Instant,
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    shard_cap: usize,
    hasher: RandomState,
}

/// The default cap on the keys a [`KeyedRateLimiter`] holds.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

impl<K: Hash + Eq> KeyedRateLimiter<K> {
    /// A limiter giving each key `burst` tokens refilled at `rate` per second, holding at
    /// most `max_keys` (≥ 1) keys.
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Result<Self, ConfigError> {
        let gcra = Gcra::new(rate, burst)?;
        if max_keys == 0 {
            return Err(ConfigError::new("maxKeys", "must be at least 1"));
        }
        let shard_count = if max_keys >= 1024 { 16 } else { 1 };
        let shards = (0..shard_count)
            .map(|_| Mutex::new(HashMap::new()))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(Self {
            gcra,
            origin: Instant::now(),
            shards,
            shard_cap: max_keys / shard_count,
            hasher: RandomState::new(),
        })
    }

    /// Takes a token from `key`'s bucket (creating it full if new), or says how long until
    /// one is available.
    pub fn try_acquire<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned + ?Sized,
        Q::Owned: Into<K>,
    {
        let now = nanos_since(self.origin);
        let index = (self.hasher.hash_one(key) >> 32) as usize % self.shards.len();
        let mut shard = self.shards[index].lock();
        if let Some(tat) = shard.get_mut(key) {
            *tat = self.gcra.take(*tat, now)?;
            return Ok(());
        }
        if shard.len() >= self.shard_cap {
            evict(&mut shard, now);
        }
        let tat = self.gcra.take(0, now)?;
        shard.insert(key.to_owned().into(), tat);
        Ok(())
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes room for one key: drops every full bucket, else the one closest to full.
fn evict<K>(shard: &mut HashMap<K, u64>, now: u64) {
    let mut any_full = false;
    let mut oldest = u64::MAX;
    for &tat in shard.values() {
        any_full |= tat <= now;
        oldest = oldest.min(tat);
    }
    if any_full {
        shard.retain(|_, tat| *tat > now);
    } else {
        let mut evicted = false;
        shard.retain(|_, tat| {
            let keep = evicted || *tat != oldest;
            evicted |= !keep;
            keep
        });
    }
}

impl<K> fmt::Debug for KeyedRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("interval_ns", &self.gcra.interval_ns)
            .field("capacity_ns", &self.gcra.capacity_ns)
            .field("shards", &self.shards.len())
            .field("shard_cap", &self.shard_cap)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn drain(bucket: &TokenBucket) -> usize {
        std::iter::from_fn(|| bucket.try_acquire().ok()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refusal_with_the_wait() {
        let bucket = TokenBucket::new(10.0, 20).unwrap();
        assert_eq!(drain(&bucket), 20);
        assert_eq!(bucket.try_acquire(), Err(Duration::from_millis(100)));
        advance(Duration::from_millis(40)).await;
        assert_eq!(bucket.try_acquire(), Err(Duration::from_millis(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn refills_at_the_rate_up_to_the_burst() {
        let bucket = TokenBucket::new(100.0, 10).unwrap();
        assert_eq!(drain(&bucket), 10);
        advance(Duration::from_millis(50)).await;
        assert_eq!(drain(&bucket), 5);
        // Sustained: one token every 10 ms, over 1 s = 100 tokens.
        let mut taken = 0;
        for _ in 0..100 {
            advance(Duration::from_millis(10)).await;
            taken += drain(&bucket);
        }
        assert_eq!(taken, 100);
        // Idle for a long time: capped at the burst.
        advance(Duration::from_secs(60)).await;
        assert_eq!(drain(&bucket), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rates_work() {
        let bucket = TokenBucket::new(0.5, 1).unwrap();
        assert!(bucket.try_acquire().is_ok());
        let wait = bucket.try_acquire().unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(retry_after_secs(wait), 2);
        advance(Duration::from_secs(2)).await;
        assert!(bucket.try_acquire().is_ok());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
    }

    #[test]
    fn invalid_settings_are_refused() {
        assert!(TokenBucket::new(0.0, 1).is_err());
        assert!(TokenBucket::new(-1.0, 1).is_err());
        assert!(TokenBucket::new(f64::NAN, 1).is_err());
        assert!(TokenBucket::new(f64::INFINITY, 1).is_err());
        assert!(TokenBucket::new(1.0, 0).is_err());
        assert!(KeyedRateLimiter::<String>::new(1.0, 1, 0).is_err());
        assert!(TokenBucket::new(1e-30, 1).is_ok());
        assert!(TokenBucket::new(1e30, u32::MAX).is_ok());
    }

    #[test]
    fn concurrent_takers_never_exceed_the_burst() {
        let bucket = TokenBucket::new(1e-3, 1000).unwrap();
        let taken: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| drain(&bucket))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(taken, 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_isolated() {
        let limiter = KeyedRateLimiter::<String>::new(1.0, 2, 100).unwrap();
        let a = "spiffe://cluster.local/ns/shop/sa/frontend";
        let b = "spiffe://cluster.local/ns/shop/sa/checkout";
        assert!(limiter.try_acquire(a).is_ok());
        assert!(limiter.try_acquire(a).is_ok());
        assert_eq!(limiter.try_acquire(a), Err(Duration::from_secs(1)));
        assert!(limiter.try_acquire(b).is_ok(), "b has its own bucket");
        assert!(limiter.try_acquire(b).is_ok());
        assert!(limiter.try_acquire(b).is_err());
        advance(Duration::from_secs(1)).await;
        assert!(limiter.try_acquire(a).is_ok());
        assert!(limiter.try_acquire(a).is_err());
        assert_eq!(limiter.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_key_count_is_capped() {
        for max_keys in [50, 5_000] {
            let limiter = KeyedRateLimiter::<u64>::new(1.0, 5, max_keys).unwrap();
            // A flood of distinct identities, each still draining (rate 1/s, no time passes).
            for id in 0..(max_keys as u64 * 3) {
                assert!(limiter.try_acquire(&id).is_ok(), "a new key starts full");
                assert!(limiter.len() <= max_keys);
            }
            assert!(limiter.len() <= max_keys);
            assert!(limiter.len() >= max_keys / 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_evicted_before_busy_ones() {
        let limiter = KeyedRateLimiter::<u64>::new(1.0, 3, 4).unwrap();
        // Key 0 drains its bucket; keys 1..4 take one token each.
        for _ in 0..3 {
            assert!(limiter.try_acquire(&0).is_ok());
        }
        for id in 1..4 {
            assert!(limiter.try_acquire(&id).is_ok());
        }
        // After 1 s keys 1..4 are full again (lossless to drop); key 0 is not.
        advance(Duration::from_secs(1)).await;
        assert!(limiter.try_acquire(&99).is_ok());
        assert_eq!(limiter.len(), 2);
        // Key 0 kept its state: one token refilled, then refused.
        assert!(limiter.try_acquire(&0).is_ok());
        assert!(limiter.try_acquire(&0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_full_bucket_the_closest_to_full_is_evicted() {
        let limiter = KeyedRateLimiter::<u64>::new(1.0, 3, 2).unwrap();
        for _ in 0..3 {
            assert!(limiter.try_acquire(&0).is_ok()); // drained
        }
        assert!(limiter.try_acquire(&1).is_ok()); // one token used
        assert!(limiter.try_acquire(&2).is_ok()); // evicts key 1, not the drained key 0
        assert_eq!(limiter.len(), 2);
        assert!(limiter.try_acquire(&0).is_err(), "key 0 is still limited");
    }
}
