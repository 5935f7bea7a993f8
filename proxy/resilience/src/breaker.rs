//! Per-endpoint circuit breaker (outlier ejection), issue 4 §3.
//!
//! ```text
//!            N consecutive failures, or failure rate ≥ r
//!            over `window` with ≥ min_requests
//!   Closed ─────────────────────────────────────────────▶ Open (for open_for)
//!     ▲                                                    │ open time elapsed:
//!     │ half_open_requests probes                          │ next admit()
//!     │ all succeeded                                      ▼
//!     └──────────────────────────────────────────────── HalfOpen
//!                          any probe fails ──▶ Open again for twice as long
//!                                              (capped at max_open_for)
//! ```
//!
//! The whole state machine lives in one `AtomicU64` (state, backoff level, generation and
//! either the open deadline or the probe counts), so every transition is a single
//! compare-and-swap and `admit()` while closed is one atomic load. Consecutive failures
//! are an `AtomicU32`; the failure rate uses a lock-free rolling window of ten buckets.
//!
//! Every [`Admission`] carries the generation it was granted in; a result reported after
//! the breaker has since changed state (a slow request that started before the breaker
//! opened, say) is ignored, so it can neither re-open a fresh half-open period nor close
//! the breaker on stale news.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::window::RollingWindow;
use word::{Word, MAX_LEVEL};

mod word;
use crate::ConfigError;

/// When a breaker opens and how it recovers; the `circuitBreaker` block of a
/// `DestinationPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row (`None`: no consecutive-failure rule).
    pub consecutive_failures: Option<u32>,
    /// Open when the share of failures within `window` reaches this value, in (0, 1]
    /// (`None`: no failure-rate rule).
    pub failure_rate: Option<f64>,
    /// The failure-rate rule only applies once `window` holds at least this many results.
    pub min_requests: u32,
    /// How far back the failure-rate rule looks (kept in ten buckets).
    pub window: Duration,
    /// How long the breaker stays open the first time.
    pub open_for: Duration,
    /// The cap on the open time, which doubles each time a half-open probe fails.
    pub max_open_for: Duration,
    /// How many probes a half-open breaker lets through; all must succeed to close it.
    pub half_open_requests: u32,
}

impl Default for BreakerConfig {
    /// Five consecutive failures, no rate rule (20 requests over 10 s when one is set),
    /// open for 10 s doubling up to 5 min, one probe.
    fn default() -> Self {
        Self {
            consecutive_failures: Some(5),
            failure_rate: None,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(300),
            half_open_requests: 1,
        }
    }
}

/// The most probes a half-open breaker may allow (they are counted in 16 bits).
pub const MAX_HALF_OPEN_REQUESTS: u32 = u16::MAX as u32;

impl BreakerConfig {
    /// Checks every field; [`Breaker::new`] calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                "consecutiveFailures",
                "must be at least 1",
            ));
        }
        if let Some(rate) = self.failure_rate {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(ConfigError::new("failureRate", "must be in (0, 1]"));
            }
            if self.window < Duration::from_millis(10) {
                return Err(ConfigError::new("window", "must be at least 10ms"));
            }
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new("openFor", "must be positive"));
        }
        if self.max_open_for < self.open_for {
            return Err(ConfigError::new(
                "maxOpenFor",
                "must not be less than openFor",
            ));
        }
        if self.half_open_requests == 0 || self.half_open_requests > MAX_HALF_OPEN_REQUESTS {
            return Err(ConfigError::new("halfOpenRequests", "must be in 1..=65535"));
        }
        Ok(())
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests flow; results are counted.
    Closed,
    /// Requests are refused until the open time has passed (the next `admit` after that
    /// moves to half-open).
    Open,
    /// A limited number of probes are let through to test the endpoint.
    HalfOpen,
}

impl BreakerState {
    /// The state as a number for a gauge: 0 closed, 1 open, 2 half-open.
    pub const fn as_gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// A per-endpoint circuit breaker. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

struct Inner {
    /// 0: the consecutive-failure rule is off.
    consecutive_threshold: u32,
    failure_rate: Option<f64>,
    min_requests: u32,
    open_for_ms: u64,
    max_open_for_ms: u64,
    half_open_requests: u16,
    origin: Instant,
    word: AtomicU64,
    consecutive: AtomicU32,
    /// Present only when the failure-rate rule is on. Payload: failures in the upper 16
    /// bits, results in the lower 16 (both saturating at 65535 per bucket).
    window: Option<RollingWindow>,
    opened: AtomicU64,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state())
            .field("opened_total", &self.opened_total())
            .finish_non_exhaustive()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

const FAILURE: u32 = 1 << 16;
const RESULT: u32 = 1;

fn add_saturating_u16_pair(payload: u32, failed: bool) -> u32 {
    let failures = (payload >> 16)
        .saturating_add(u32::from(failed))
        .min(0xffff);
    let results = (payload & 0xffff).saturating_add(1).min(0xffff);
    failures * FAILURE + results * RESULT
}

impl Breaker {
    /// A closed breaker with `config`, refused if the config is out of range.
    pub fn new(config: &BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let window = config
            .failure_rate
            .map(|_| RollingWindow::new(config.window));
        Ok(Self {
            inner: Arc::new(Inner {
                consecutive_threshold: config.consecutive_failures.unwrap_or(0),
                failure_rate: config.failure_rate,
                min_requests: config.min_requests,
                open_for_ms: duration_ms(config.open_for),
                max_open_for_ms: duration_ms(config.max_open_for),
                half_open_requests: u16::try_from(config.half_open_requests).unwrap_or(u16::MAX),
                origin: Instant::now(),
                word: AtomicU64::new(Word::Closed { gen: 0 }.encode()),
                consecutive: AtomicU32::new(0),
                window,
                opened: AtomicU64::new(0),
            }),
        })
    }

    /// Asks to send one request. `None` means refused: the breaker is open, or half-open
    /// with every probe slot taken. The caller reports the result through the returned
    /// [`Admission`]. While closed this is one atomic load and an `Arc` clone.
    pub fn admit(&self) -> Option<Admission> {
        let inner = &*self.inner;
        let mut current = inner.word.load(Ordering::Acquire);
        loop {
            let next = match Word::decode(current) {
                Word::Closed { gen } => return Some(self.admission(gen, false)),
                Word::Open {
                    gen,
                    level,
                    until_ms,
                } => {
                    if inner.now_ms() < until_ms {
                        return None;
                    }
                    Word::HalfOpen {
                        gen: gen.wrapping_add(1),
                        level,
                        admitted: 1,
                        succeeded: 0,
                    }
                }
                Word::HalfOpen {
                    gen,
                    level,
                    admitted,
                    succeeded,
                } => {
                    if admitted >= inner.half_open_requests {
                        return None;
                    }
                    Word::HalfOpen {
                        gen,
                        level,
                        admitted: admitted + 1,
                        succeeded,
                    }
                }
            };
            match inner.word.compare_exchange_weak(
                current,
                next.encode(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(self.admission(next.gen(), true)),
                Err(actual) => current = actual,
            }
        }
    }

    fn admission(&self, gen: u16, probe: bool) -> Admission {
        Admission {
            breaker: self.clone(),
            gen,
            probe,
            reported: false,
        }
    }

    /// The current state. An open breaker whose time is up still reads `Open` until the
    /// next [`admit`](Self::admit) turns it half-open; use [`is_available`](Self::is_available)
    /// to ask whether a request would be let through.
    pub fn state(&self) -> BreakerState {
        match Word::decode(self.inner.word.load(Ordering::Acquire)) {
            Word::Closed { .. } => BreakerState::Closed,
            Word::Open { .. } => BreakerState::Open,
            Word::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether [`admit`](Self::admit) would let a request through right now: closed, open
    /// with its time up, or half-open with a free probe slot. One atomic load (plus a clock
    /// read while open), for the balancer to skip ejected endpoints.
    pub fn is_available(&self) -> bool {
        match Word::decode(self.inner.word.load(Ordering::Acquire)) {
            Word::Closed { .. } => true,
            Word::Open { until_ms, .. } => self.inner.now_ms() >= until_ms,
            Word::HalfOpen { admitted, .. } => admitted < self.inner.half_open_requests,
        }
    }

    /// How many times this breaker has opened (a counter for
    /// `remora_circuit_breaker_open`-style metrics).
    pub fn opened_total(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.origin)
                .as_millis(),
        )
        .unwrap_or(u64::MAX)
    }

    fn open_time_ms(&self, level: u8) -> u64 {
        let doubled = self
            .open_for_ms
            .checked_shl(u32::from(level))
            .filter(|v| v >> level == self.open_for_ms)
            .unwrap_or(u64::MAX);
        doubled.min(self.max_open_for_ms)
    }

    fn open_word(&self, gen: u16, level: u8) -> Word {
        Word::Open {
            gen: gen.wrapping_add(1),
            level,
            until_ms: self.now_ms().saturating_add(self.open_time_ms(level)),
        }
    }

    fn reset_counts(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(window) = &self.window {
            window.reset();
        }
    }

    /// A result from a request admitted while closed in generation `gen`.
    fn record_closed(&self, gen: u16, ok: bool) {
        let closed = Word::Closed { gen }.encode();
        if self.word.load(Ordering::Acquire) != closed {
            return; // the breaker has moved on; stale news
        }
        let mut trip = false;
        if self.consecutive_threshold > 0 {
            if ok {
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
            } else {
                let failures = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                trip = failures >= self.consecutive_threshold;
            }
        }
        if let (Some(window), Some(rate)) = (&self.window, self.failure_rate) {
            let epoch = window.epoch(Instant::now());
            window.update(epoch, |p| Some(add_saturating_u16_pair(p, !ok)));
            if !ok && !trip {
                let (failures, results) = window.fold(epoch, false, (0u32, 0u32), |(f, r), p| {
                    (f + (p >> 16), r + (p & 0xffff))
                });
                trip = results >= self.min_requests.max(1)
                    && f64::from(failures) >= rate * f64::from(results);
            }
        }
        if trip
            && self
                .word
                .compare_exchange(
                    closed,
                    self.open_word(gen, 0).encode(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.reset_counts();
        }
    }

    /// A probe's result (`None`: dropped unreported, which frees its slot).
    fn record_probe(&self, gen: u16, result: Option<bool>) {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let Word::HalfOpen {
                gen: now_gen,
                level,
                admitted,
                succeeded,
            } = Word::decode(current)
            else {
                return;
            };
            if now_gen != gen {
                return;
            }
            let next = match result {
                None => Word::HalfOpen {
                    gen,
                    level,
                    admitted: admitted.saturating_sub(1),
                    succeeded,
                },
                Some(true) if succeeded + 1 >= self.half_open_requests => Word::Closed {
                    gen: gen.wrapping_add(1),
                },
                Some(true) => Word::HalfOpen {
                    gen,
                    level,
                    admitted,
                    succeeded: succeeded + 1,
                },
                Some(false) => self.open_word(gen, level.saturating_add(1).min(MAX_LEVEL)),
            };
            match self.word.compare_exchange_weak(
                current,
                next.encode(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    match next {
                        Word::Closed { .. } => self.reset_counts(),
                        Word::Open { .. } => {
                            self.opened.fetch_add(1, Ordering::Relaxed);
                        }
                        Word::HalfOpen { .. } => {}
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// Permission to send one request through a [`Breaker`]; report how it went with
/// [`record`](Self::record).
///
/// Dropping an admission without recording it is **neutral**: it counts as neither
/// success nor failure (a cancelled request says nothing about the endpoint's health),
/// and if it was a half-open probe its slot is freed so another probe may go. Owns a
/// handle to the breaker, so it can travel with a response body until its trailers
/// (and `grpc-status`) arrive.
#[must_use = "report the result with record(); dropping it counts as neither success nor failure"]
pub struct Admission {
    breaker: Breaker,
    gen: u16,
    probe: bool,
    reported: bool,
}

impl Admission {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the request's result: `ok == false` for a failure the breaker should count
    /// (connect failure, reset, timeout, 5xx as the caller classifies them).
    pub fn record(mut self, ok: bool) {
        self.reported = true;
        self.report(Some(ok));
    }

    fn report(&self, result: Option<bool>) {
        let inner = &*self.breaker.inner;
        match (self.probe, result) {
            (true, result) => inner.record_probe(self.gen, result),
            (false, Some(ok)) => inner.record_closed(self.gen, ok),
            (false, None) => {}
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.reported {
            self.report(None);
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
