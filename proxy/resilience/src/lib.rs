//! Remora's resilience primitives: the pure, tested building blocks that the proxy's
//! request path composes for issue 4 ("Resilience policies").
//!
//! Nothing here does I/O or owns a task. Every type is built from a policy once (an
//! invalid setting is refused with a [`ConfigError`]) and then used per request with
//! atomics only: no lock on the hot path (the keyed rate limiter's per-shard map is the
//! one exception, held for a hash probe), nothing held across an await, no allocation per
//! call. Time is `tokio::time::Instant`, so tests run on a paused clock.
//!
//! | issue 4 section | module | what it gives the request path |
//! | --- | --- | --- |
//! | §1 Timeouts | [`deadline`] | `grpc-timeout` parse/format, [`effective_deadline`], [`Deadline`] for what is left per attempt |
//! | §2 Retries | [`retry`] | [`RetryOn`] (the route's `on` list), [`Outcome`], [`is_idempotent`], [`grpc_status_of`] |
//! | §2 Retries | [`backoff`] | [`Backoff`]: exponential with full jitter; [`Attempts`] for a client that reconnects |
//! | §2 Retry budget | [`budget`] | [`RetryBudget`]: ratio of requests plus a floor per second |
//! | §3 Circuit breakers | [`breaker`] | [`Breaker`]: per-endpoint outlier ejection, [`Admission`] per request |
//! | §4 Bulkheads | [`bulkhead`] | [`Bulkhead`]: in-flight, pending and connection limits with a critical reserve |
//! | §5 Rate limits | [`ratelimit`] | [`TokenBucket`], [`KeyedRateLimiter`] per identity, [`retry_after_secs`] |
//! | §6 Load balancing | [`load`], [`balance`] | [`Load`] (in flight + peak-EWMA), [`Balancer`]: P2C-EWMA, round robin, least request |
//! | §8 Fault injection | [`fault`] | [`Fault::decide`] → [`FaultAction`] |
//!
//! §7 (fallbacks) needs no primitive of its own: the caller tries the fallback backend
//! when [`Balancer::pick`] returns `None` for the primary.
//!
//! A sketch of one outbound request, in the order the lead's request path applies them:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use remora_resilience::*;
//! # struct Ep { load: Load, breaker: Breaker }
//! # impl Balanced for Ep {
//! #     fn load(&self) -> &Load { &self.load }
//! #     fn available(&self) -> bool { self.breaker.is_available() }
//! # }
//! # async fn send(_: &Ep, _: Duration) -> Outcome { Outcome::Status(200) }
//! # async fn example(eps: &[Ep], balancer: &Balancer, bulkhead: &Bulkhead,
//! #                  budget: &RetryBudget, on: &RetryOn, backoff: Backoff) -> Result<(), Overloaded> {
//! let deadline = Deadline::for_request(Some(Duration::from_secs(2)), None);
//! let _slot = bulkhead.acquire_request(false, Duration::from_millis(100)).await?;
//! budget.deposit();
//! for attempt in 0u32..3 {
//!     let Some(ep) = balancer.pick(eps) else { break }; // circuit-open, or the fallback
//!     let Some(admission) = ep.breaker.admit() else { break };
//!     let in_flight = ep.load.start();
//!     let timeout = deadline.map_or(Duration::from_millis(500), |d| d.attempt_timeout(Some(Duration::from_millis(500))));
//!     let outcome = send(ep, timeout).await;
//!     in_flight.finish();
//!     let ok = !matches!(outcome, Outcome::Status(500..=599) | Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout);
//!     admission.record(ok);
//!     if ok || !on.should_retry(outcome, true, true, false) || !budget.try_withdraw() {
//!         break;
//!     }
//!     tokio::time::sleep(backoff.delay(attempt)).await;
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod bulkhead;
pub mod deadline;
mod error;
pub mod fault;
pub mod load;
pub mod ratelimit;
pub mod retry;
mod window;

pub use backoff::{Attempts, Backoff};
pub use balance::{Balanced, Balancer, LeastRequest, P2cEwma, RoundRobin};
pub use breaker::{Admission, Breaker, BreakerConfig, BreakerState};
pub use budget::RetryBudget;
pub use bulkhead::{Bulkhead, BulkheadConfig, ConnPermit, Overloaded, RequestPermit};
pub use deadline::{
    effective_deadline, format_grpc_timeout, parse_grpc_timeout, Deadline, GRPC_TIMEOUT,
};
pub use error::ConfigError;
pub use fault::{Fault, FaultAbort, FaultAction, FaultDelay};
pub use load::{InFlight, Load};
pub use ratelimit::{retry_after_secs, KeyedRateLimiter, TokenBucket};
pub use retry::{grpc_status_of, is_idempotent, Outcome, ParseRetryOnError, RetryOn};
