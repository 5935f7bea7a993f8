//! The outbound side: the application's calls to other services.
//!
//! In order, for each connection and request:
//! 1. intercept: an iptables-redirected connection (transparent mode; the
//!    original destination from `SO_ORIGINAL_DST`) or one addressed to the
//!    proxy itself (explicit mode: absolute-form HTTP/1, h2c, `CONNECT`);
//! 2. route: the destination service (by Host/`:authority` or by original
//!    destination), then the HTTPRoute rule, then a weighted backend;
//! 3. policy: fault injection, the deadline (route timeout and `grpc-timeout`),
//!    the destination's bulkhead, then retries within the budget;
//! 4. balance: an endpoint of the chosen backend whose circuit is not open
//!    (P2C over peak-EWMA by default), or the route's fallback;
//! 5. connect: a pooled connection to the peer's inbound side; a new one is
//!    mTLS (`connect::connect_mtls`): this workload's certificate, and the peer's
//!    checked for the identity its endpoint must have.
//!
//! `listener.rs` holds the accept loop and interception (1), `tcp.rs` opaque
//! TCP, `http.rs` the HTTP request path (2–3), `retry.rs` the attempts (3–5)
//! with `balance.rs` choosing each one's endpoint and `classify.rs` judging
//! its outcome, and `connect.rs` the connect step (5).

mod balance;
mod classify;
mod connect;
mod http;
mod listener;
mod retry;
mod tcp;

pub use listener::serve;
