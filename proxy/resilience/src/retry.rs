//! Retry decisions, issue 4 §2: which outcomes a route retries (`retry.on`), and which
//! requests may be replayed at all.
//!
//! The conditions follow Envoy's `retry_on` where the names overlap: `5xx` and
//! `gateway-error` also cover connect failures, refused streams, resets and per-try
//! timeouts, since the proxy would answer those with a 502 or 504 itself.
//! Whether a body may be replayed (buffered within its cap) and how many attempts remain
//! are the caller's checks; this module answers "does this outcome warrant another try".

use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, Method};

/// What one attempt came to, as the retry policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The TCP or TLS connection to the endpoint could not be made: nothing was sent.
    ConnectFailure,
    /// HTTP/2 `REFUSED_STREAM` (or GOAWAY past the stream): the upstream did not process it.
    RefusedStream,
    /// The connection or stream was reset after the request (or part of it) was sent.
    Reset,
    /// The per-try timeout expired before a response arrived (treated like a 504).
    Timeout,
    /// An HTTP response with this status.
    Status(u16),
    /// A gRPC response (or trailers) with this `grpc-status` code.
    Grpc(u16),
}

impl Outcome {
    /// Whether the failure happened before any of the request reached the upstream, so
    /// even a non-idempotent request can be replayed safely.
    pub const fn before_request_sent(self) -> bool {
        matches!(self, Self::ConnectFailure | Self::RefusedStream)
    }
}

/// gRPC status codes the retry conditions name.
pub mod grpc_code {
    /// `CANCELLED`
    pub const CANCELLED: u16 = 1;
    /// `DEADLINE_EXCEEDED`
    pub const DEADLINE_EXCEEDED: u16 = 4;
    /// `RESOURCE_EXHAUSTED`
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    /// `UNAVAILABLE`
    pub const UNAVAILABLE: u16 = 14;
}

const CONNECT_FAILURE: u16 = 1 << 0;
const REFUSED_STREAM: u16 = 1 << 1;
const RESET: u16 = 1 << 2;
const STATUS_5XX: u16 = 1 << 3;
const GATEWAY_ERROR: u16 = 1 << 4;
const GRPC_CANCELLED: u16 = 1 << 5;
const GRPC_DEADLINE_EXCEEDED: u16 = 1 << 6;
const GRPC_RESOURCE_EXHAUSTED: u16 = 1 << 7;
const GRPC_UNAVAILABLE: u16 = 1 << 8;

const NAMES: [(&str, u16); 9] = [
    ("connect-failure", CONNECT_FAILURE),
    ("refused-stream", REFUSED_STREAM),
    ("reset", RESET),
    ("5xx", STATUS_5XX),
    ("gateway-error", GATEWAY_ERROR),
    ("cancelled", GRPC_CANCELLED),
    ("deadline-exceeded", GRPC_DEADLINE_EXCEEDED),
    ("resource-exhausted", GRPC_RESOURCE_EXHAUSTED),
    ("unavailable", GRPC_UNAVAILABLE),
];

/// A route's parsed `retry.on` list: named conditions as bit flags plus explicit HTTP
/// status codes (sorted, for a binary search).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RetryOn {
    flags: u16,
    statuses: Box<[u16]>,
}

/// A `retry.on` entry that is neither a known condition nor an HTTP status code (100–599).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown retry condition {0:?}: expected connect-failure, refused-stream, reset, 5xx, gateway-error, cancelled, deadline-exceeded, resource-exhausted, unavailable or an HTTP status code")]
pub struct ParseRetryOnError(pub String);

impl RetryOn {
    /// Parses the conditions of a route's `retry.on` list (case-insensitive; `_` may stand
    /// for `-`).
    pub fn parse<I, S>(conditions: I) -> Result<Self, ParseRetryOnError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut flags = 0;
        let mut statuses = Vec::new();
        for condition in conditions {
            let raw = condition.as_ref().trim();
            let name = raw.to_ascii_lowercase().replace('_', "-");
            if let Some(&(_, flag)) = NAMES.iter().find(|(n, _)| *n == name) {
                flags |= flag;
            } else if let Some(code) = name
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c) && name.len() == 3)
            {
                statuses.push(code);
            } else {
                return Err(ParseRetryOnError(raw.to_owned()));
            }
        }
        statuses.sort_unstable();
        statuses.dedup();
        Ok(Self {
            flags,
            statuses: statuses.into_boxed_slice(),
        })
    }

    /// Whether no condition is set (such a route never retries).
    pub fn is_empty(&self) -> bool {
        self.flags == 0 && self.statuses.is_empty()
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn lists(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
    }

    /// Whether `outcome` matches one of the conditions, regardless of the method.
    pub fn matches(&self, outcome: Outcome) -> bool {
        let any_5xx = self.has(STATUS_5XX | GATEWAY_ERROR);
        match outcome {
            Outcome::ConnectFailure => self.has(CONNECT_FAILURE) || any_5xx,
            Outcome::RefusedStream => self.has(REFUSED_STREAM) || any_5xx,
            Outcome::Reset => self.has(RESET) || any_5xx,
            Outcome::Timeout => any_5xx || self.lists(504),
            Outcome::Status(status) => {
                (self.has(STATUS_5XX) && (500..=599).contains(&status))
                    || (self.has(GATEWAY_ERROR) && matches!(status, 502..=504))
                    || self.lists(status)
            }
            Outcome::Grpc(code) => match code {
                grpc_code::CANCELLED => self.has(GRPC_CANCELLED),
                grpc_code::DEADLINE_EXCEEDED => self.has(GRPC_DEADLINE_EXCEEDED),
                grpc_code::RESOURCE_EXHAUSTED => self.has(GRPC_RESOURCE_EXHAUSTED),
                grpc_code::UNAVAILABLE => self.has(GRPC_UNAVAILABLE),
                _ => false,
            },
        }
    }

    /// Whether to retry after `outcome`.
    ///
    /// - `idempotent`: the method is idempotent ([`is_idempotent`]).
    /// - `request_sent`: any part of the request may have reached the upstream. A
    ///   [`ConnectFailure`](Outcome::ConnectFailure) or
    ///   [`RefusedStream`](Outcome::RefusedStream) counts as not sent whatever is passed.
    /// - `allow_non_idempotent`: the route allows replaying non-idempotent requests
    ///   after they were sent.
    ///
    /// A non-idempotent request is retried only when it was not sent, unless allowed.
    pub fn should_retry(
        &self,
        outcome: Outcome,
        idempotent: bool,
        request_sent: bool,
        allow_non_idempotent: bool,
    ) -> bool {
        let safe =
            idempotent || allow_non_idempotent || !request_sent || outcome.before_request_sent();
        safe && self.matches(outcome)
    }
}

impl FromStr for RetryOn {
    type Err = ParseRetryOnError;

    /// Parses a comma-separated list (`"connect-failure,gateway-error,503"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.split(',').map(str::trim).filter(|c| !c.is_empty()))
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = NAMES
            .iter()
            .filter(|(_, flag)| self.has(*flag))
            .map(|(name, _)| (*name).to_owned());
        let codes = self.statuses.iter().map(u16::to_string);
        let all: Vec<String> = names.chain(codes).collect();
        f.write_str(&all.join(","))
    }
}

/// Whether `method` is idempotent per RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT,
/// DELETE.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The `grpc-status` in a header or trailer map, if present and numeric.
pub fn grpc_status_of(headers: &HeaderMap) -> Option<u16> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn on(s: &str) -> RetryOn {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_condition_and_codes() {
        let all = on("connect-failure, refused-stream,reset,5xx,gateway-error,unavailable,resource-exhausted,cancelled,deadline-exceeded,503,409,503");
        assert_eq!(
            all.to_string(),
            "connect-failure,refused-stream,reset,5xx,gateway-error,cancelled,deadline-exceeded,resource-exhausted,unavailable,409,503"
        );
        assert_eq!(
            RetryOn::parse(["Connect_Failure", "GATEWAY-ERROR"]).unwrap(),
            on("connect-failure,gateway-error")
        );
        assert!(on("").is_empty());
    }

    #[test]
    fn refuses_unknown_conditions() {
        for bad in ["retriable-4xx", "5xxx", "600", "99", "0503", "+503", "grpc"] {
            let err = bad.parse::<RetryOn>().unwrap_err();
            assert_eq!(err.0, bad);
        }
    }

    #[test]
    fn five_xx_covers_every_5xx_and_transport_failures() {
        let r = on("5xx");
        for s in [500, 501, 502, 503, 504, 599] {
            assert!(r.matches(Outcome::Status(s)), "{s}");
        }
        for s in [200, 404, 429, 499] {
            assert!(!r.matches(Outcome::Status(s)), "{s}");
        }
        for o in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Reset,
            Outcome::Timeout,
        ] {
            assert!(r.matches(o), "{o:?}");
        }
        assert!(!r.matches(Outcome::Grpc(grpc_code::UNAVAILABLE)));
    }

    #[test]
    fn gateway_error_is_502_503_504_and_transport_failures() {
        let r = on("gateway-error");
        assert!(!r.matches(Outcome::Status(500)));
        assert!(r.matches(Outcome::Status(502)));
        assert!(r.matches(Outcome::Status(503)));
        assert!(r.matches(Outcome::Status(504)));
        assert!(!r.matches(Outcome::Status(505)));
        assert!(r.matches(Outcome::ConnectFailure));
        assert!(r.matches(Outcome::Timeout));
    }

    #[test]
    fn narrow_conditions_match_only_themselves() {
        let r = on("connect-failure");
        assert!(r.matches(Outcome::ConnectFailure));
        assert!(!r.matches(Outcome::RefusedStream));
        assert!(!r.matches(Outcome::Reset));
        assert!(!r.matches(Outcome::Timeout));
        assert!(!r.matches(Outcome::Status(503)));
        let r = on("reset,refused-stream");
        assert!(r.matches(Outcome::Reset));
        assert!(r.matches(Outcome::RefusedStream));
        assert!(!r.matches(Outcome::ConnectFailure));
    }

    #[test]
    fn listed_status_codes() {
        let r = on("409,503");
        assert!(r.matches(Outcome::Status(409)));
        assert!(r.matches(Outcome::Status(503)));
        assert!(!r.matches(Outcome::Status(502)));
        assert!(!r.matches(Outcome::Timeout));
        assert!(on("504").matches(Outcome::Timeout));
    }

    #[test]
    fn grpc_codes() {
        let r = on("unavailable,resource-exhausted,cancelled,deadline-exceeded");
        for code in [1, 4, 8, 14] {
            assert!(r.matches(Outcome::Grpc(code)), "{code}");
        }
        for code in [0, 2, 3, 5, 7, 13, 16] {
            assert!(!r.matches(Outcome::Grpc(code)), "{code}");
        }
        assert!(!on("unavailable").matches(Outcome::Grpc(grpc_code::CANCELLED)));
        assert!(!r.matches(Outcome::Status(503)));
    }

    #[test]
    fn non_idempotent_requests_only_retry_before_sending() {
        let r = on("connect-failure,refused-stream,reset,5xx");
        // POST, sent: never on a post-send failure.
        assert!(!r.should_retry(Outcome::Status(503), false, true, false));
        assert!(!r.should_retry(Outcome::Reset, false, true, false));
        assert!(!r.should_retry(Outcome::Timeout, false, true, false));
        // POST, failed before sending: fine.
        assert!(r.should_retry(Outcome::ConnectFailure, false, true, false));
        assert!(r.should_retry(Outcome::RefusedStream, false, true, false));
        assert!(r.should_retry(Outcome::Reset, false, false, false));
        // POST on a route that allows it.
        assert!(r.should_retry(Outcome::Status(503), false, true, true));
        // GET: anything that matches.
        assert!(r.should_retry(Outcome::Status(503), true, true, false));
        assert!(r.should_retry(Outcome::Reset, true, true, false));
        // Never what does not match.
        assert!(!r.should_retry(Outcome::Status(404), true, false, true));
        assert!(!RetryOn::default().should_retry(Outcome::ConnectFailure, true, false, true));
    }

    #[test]
    fn idempotent_methods_per_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn reads_grpc_status() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status_of(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(grpc_status_of(&h), Some(14));
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(grpc_status_of(&h), Some(0));
        for bad in ["", "-1", "x", "1 4", "999999"] {
            h.insert("grpc-status", HeaderValue::from_static(bad));
            assert_eq!(grpc_status_of(&h), None, "{bad:?}");
        }
    }
}
