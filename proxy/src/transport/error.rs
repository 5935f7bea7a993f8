//! The data path's one error type and the one table of the answers the proxy
//! makes itself. Each error knows its cause (its row of the table below:
//! `x-remora-error`, HTTP status, gRPC status), which side caused it (the
//! client, the upstream or the proxy: only the upstream's failures count
//! against an endpoint), whether a retry may help, and the I/O, TLS or HTTP
//! error it wraps ([`std::error::Error::source`]).
//!
//! | cause | HTTP | gRPC | side |
//! | --- | --- | --- | --- |
//! | `no-endpoints`, `circuit-open`, `overloaded` | 503 | 14 | proxy |
//! | `upstream-failure`, `upstream-reset` | 502 | 14 | upstream |
//! | `timeout` | 504 | 4 | upstream |
//! | `denied` | 403 | 7 | proxy |
//! | `unauthenticated` | 401 | 16 | client |
//! | `rate-limited` | 429 | 8 | proxy |
//! | `bad-request` | 400 | 13 | client |
//! | `uri-too-long` | 414 | 13 | client |
//! | `client-reset` | 499 (recorded, never sent) | 1 | client |
//!
//! A route's injected abort is answered here too ([`fault_response`]), with
//! the status it configures.

use crate::transport::body::{ProxyBody, UploadFailure};
use http::{HeaderValue, Response, StatusCode};
use std::fmt;

/// What went wrong: a row of the table above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    NoEndpoints,
    CircuitOpen,
    Overloaded,
    UpstreamFailure,
    Timeout,
    Denied,
    /// The request carried an end user's token that does not verify (401).
    Unauthenticated,
    RateLimited,
    BadRequest,
    /// The request target is longer than the proxy takes (414).
    UriTooLong,
    /// The client went away, or reset its request, before the answer ended
    /// (recorded, never answered: the client is gone).
    ClientReset,
    /// The upstream broke its response off after the head was sent.
    UpstreamReset,
}

/// Who a failure belongs to (Pingora's `ErrorSource`). Only the upstream's
/// count against it (breakers, ejection, the balancer, retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Proxy,
}

impl Cause {
    /// The `x-remora-error` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NoEndpoints => "no-endpoints",
            Cause::CircuitOpen => "circuit-open",
            Cause::Overloaded => "overloaded",
            Cause::UpstreamFailure => "upstream-failure",
            Cause::Timeout => "timeout",
            Cause::Denied => "denied",
            Cause::Unauthenticated => "unauthenticated",
            Cause::RateLimited => "rate-limited",
            Cause::BadRequest => "bad-request",
            Cause::UriTooLong => "uri-too-long",
            Cause::ClientReset => "client-reset",
            Cause::UpstreamReset => "upstream-reset",
        }
    }

    /// Who caused it.
    pub fn side(self) -> Side {
        match self {
            Cause::BadRequest | Cause::UriTooLong | Cause::ClientReset | Cause::Unauthenticated => {
                Side::Client
            }
            Cause::UpstreamFailure | Cause::UpstreamReset | Cause::Timeout => Side::Upstream,
            Cause::NoEndpoints
            | Cause::CircuitOpen
            | Cause::Overloaded
            | Cause::Denied
            | Cause::RateLimited => Side::Proxy,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Cause::NoEndpoints | Cause::CircuitOpen | Cause::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Cause::UpstreamFailure | Cause::UpstreamReset => StatusCode::BAD_GATEWAY,
            // nginx's "client closed request": recorded, never sent.
            Cause::ClientReset => CLIENT_CLOSED_REQUEST,
            Cause::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Cause::Denied => StatusCode::FORBIDDEN,
            Cause::Unauthenticated => StatusCode::UNAUTHORIZED,
            Cause::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Cause::BadRequest => StatusCode::BAD_REQUEST,
            Cause::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    /// The gRPC status code (`grpc-status`).
    pub fn grpc_code(self) -> u8 {
        match self {
            Cause::NoEndpoints | Cause::CircuitOpen | Cause::Overloaded => 14,
            Cause::UpstreamFailure | Cause::UpstreamReset => 14,
            Cause::ClientReset => 1,
            Cause::Timeout => 4,
            Cause::Denied => 7,
            Cause::Unauthenticated => 16,
            Cause::RateLimited => 8,
            Cause::BadRequest | Cause::UriTooLong => 13,
        }
    }
}

impl From<UploadFailure> for Cause {
    /// A client's request body that failed is the client's failure.
    fn from(f: UploadFailure) -> Cause {
        match f {
            UploadFailure::Aborted => Cause::ClientReset,
            UploadFailure::Malformed => Cause::BadRequest,
        }
    }
}

/// The status recorded for a request whose client went away (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Whether a failed attempt may be tried again, and under which condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Never sent: the connection could not be made (safe for any method).
    ConnectFailure,
    /// The peer refused the stream before processing it (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// Sent, or maybe sent, then the connection failed.
    Reset,
    /// The attempt ran out of time.
    Timeout,
    /// Not worth retrying.
    Never,
}

/// An error on the data path.
#[derive(Debug)]
pub struct ProxyError {
    pub cause: Cause,
    pub retry: RetryClass,
    detail: String,
    /// For `rate-limited`: when to come back (`Retry-After`).
    retry_after: Option<std::time::Duration>,
    /// For `unauthenticated`: the `WWW-Authenticate` challenge.
    challenge: Option<HeaderValue>,
    /// The I/O, TLS or HTTP error this one wraps.
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750): the realm is the
/// service, the description says why the token was refused.
pub fn bearer_challenge(realm: &str, description: &str) -> HeaderValue {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
            .take(200)
            .collect()
    };
    let text = format!(
        "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
        clean(realm),
        clean(description)
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}

impl ProxyError {
    pub fn new(cause: Cause, detail: impl Into<String>) -> Self {
        ProxyError {
            cause,
            retry: RetryClass::Never,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    pub fn connect(detail: impl Into<String>) -> Self {
        ProxyError {
            cause: Cause::UpstreamFailure,
            retry: RetryClass::ConnectFailure,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    pub fn refused(detail: impl Into<String>) -> Self {
        ProxyError {
            cause: Cause::UpstreamFailure,
            retry: RetryClass::RefusedStream,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    pub fn timeout(detail: impl Into<String>) -> Self {
        ProxyError {
            cause: Cause::Timeout,
            retry: RetryClass::Timeout,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    /// A rate limit's refusal; `wait` becomes `Retry-After`.
    pub fn rate_limited(wait: std::time::Duration) -> Self {
        ProxyError {
            cause: Cause::RateLimited,
            retry: RetryClass::Never,
            detail: format!(
                "rate limited; retry after {}s",
                remora_resilience::retry_after_secs(wait)
            ),
            retry_after: None,
            challenge: None,
            source: None,
        }
        .with_retry_after(wait)
    }

    /// An end user's token refused (401 with a Bearer challenge).
    pub fn unauthenticated(realm: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let challenge = bearer_challenge(realm, &detail);
        let mut e = ProxyError::new(Cause::Unauthenticated, detail);
        e.challenge = Some(challenge);
        e
    }

    pub fn upstream(detail: impl Into<String>) -> Self {
        ProxyError {
            cause: Cause::UpstreamFailure,
            retry: RetryClass::Reset,
            detail: detail.into(),
            retry_after: None,
            challenge: None,
            source: None,
        }
    }

    /// Keeps `source`, the error this one wraps, as its
    /// [`source`](std::error::Error::source).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Who caused it: the client, the upstream, or the proxy itself.
    pub fn side(&self) -> Side {
        self.cause.side()
    }

    /// The failure was the client's after all (its request body was cut off
    /// or malformed): never retried, never counted against the upstream.
    pub fn blame_client(&mut self, cause: Cause) {
        self.cause = cause;
        self.retry = RetryClass::Never;
        self.detail = match cause {
            Cause::BadRequest => "malformed request body".into(),
            _ => "the client ended its request body early".into(),
        };
    }

    fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// The answer the proxy makes itself: an HTTP error with `x-remora-error`,
    /// or a trailers-only gRPC answer for a gRPC request.
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        let mut resp = local_response(self.cause, grpc, &self.detail);
        if let Some(wait) = self.retry_after {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(remora_resilience::retry_after_secs(wait)),
            );
        }
        if let Some(challenge) = &self.challenge {
            resp.headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cause.as_str(), self.detail)
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Builds the proxy's own answer for `cause`.
pub fn local_response(cause: Cause, grpc: bool, detail: &str) -> Response<ProxyBody> {
    let mut resp = if grpc {
        trailers_only(
            u16::from(cause.grpc_code()),
            Some(&grpc_message(cause, detail)),
        )
    } else {
        let body = format!("{}: {detail}\n", cause.as_str());
        let mut r = Response::new(ProxyBody::full(body));
        *r.status_mut() = cause.http_status();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert("x-remora-error", HeaderValue::from_static(cause.as_str()));
    if matches!(cause, Cause::BadRequest | Cause::UriTooLong) {
        // The framing can't be trusted: don't read another request from it.
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The answer of a route's injected abort (fault injection, the user's
/// chaos experiment): the configured HTTP `status`, or for a gRPC request
/// its gRPC equivalent ([`grpc_code_for_http`]), marked
/// `x-remora-fault: abort`. The proxy did not fail, so no `x-remora-error`.
pub fn fault_response(status: u16, grpc: bool) -> Response<ProxyBody> {
    let mut resp = if grpc {
        trailers_only(grpc_code_for_http(status), None)
    } else {
        let mut r = Response::new(ProxyBody::full(format!("fault injected: {status}\n")));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        r
    };
    resp.headers_mut()
        .insert("x-remora-fault", HeaderValue::from_static("abort"));
    resp
}

/// The gRPC status for an HTTP status, as the gRPC spec maps them
/// ("HTTP to gRPC Status Code Mapping").
pub fn grpc_code_for_http(status: u16) -> u16 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// A trailers-only gRPC answer: HTTP 200 with `grpc-status` (and
/// `grpc-message`) in the headers, and no body.
fn trailers_only(code: u16, message: Option<&str>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Some(v) = message.and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert("grpc-message", v);
    }
    r
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn grpc_message(cause: Cause, detail: &str) -> String {
    let mut out = String::with_capacity(detail.len() + 24);
    for b in format!("{}: {detail}", cause.as_str()).bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_maps_to_its_row_of_the_table() {
        use Side::{Client, Proxy, Upstream};
        let table = [
            (Cause::NoEndpoints, 503, 14, "no-endpoints", Proxy),
            (Cause::CircuitOpen, 503, 14, "circuit-open", Proxy),
            (Cause::Overloaded, 503, 14, "overloaded", Proxy),
            (
                Cause::UpstreamFailure,
                502,
                14,
                "upstream-failure",
                Upstream,
            ),
            (Cause::Timeout, 504, 4, "timeout", Upstream),
            (Cause::Denied, 403, 7, "denied", Proxy),
            (Cause::Unauthenticated, 401, 16, "unauthenticated", Client),
            (Cause::RateLimited, 429, 8, "rate-limited", Proxy),
            (Cause::BadRequest, 400, 13, "bad-request", Client),
            (Cause::UriTooLong, 414, 13, "uri-too-long", Client),
            (Cause::ClientReset, 499, 1, "client-reset", Client),
            (Cause::UpstreamReset, 502, 14, "upstream-reset", Upstream),
        ];
        for (cause, http, grpc, name, side) in table {
            assert_eq!(cause.side(), side, "{name}");
            assert_eq!(ProxyError::new(cause, "x").side(), side, "{name}");
            let r = local_response(cause, false, "x");
            assert_eq!(r.status().as_u16(), http);
            assert_eq!(r.headers()["x-remora-error"], name);
            let g = local_response(cause, true, "ünïcode %");
            assert_eq!(g.status(), StatusCode::OK);
            assert_eq!(g.headers()["grpc-status"], grpc.to_string().as_str());
            let msg = g.headers()["grpc-message"].to_str().unwrap();
            assert!(msg.contains("%C3%BC") && msg.contains("%25"), "{msg}");
        }
    }

    #[test]
    fn an_injected_abort_has_its_configured_status_and_no_error_header() {
        let r = fault_response(418, false);
        assert_eq!(r.status().as_u16(), 418);
        assert_eq!(r.headers()["x-remora-fault"], "abort");
        assert!(!r.headers().contains_key("x-remora-error"));
        for (http, grpc) in [
            (400, "13"),
            (401, "16"),
            (403, "7"),
            (404, "12"),
            (429, "14"),
            (503, "14"),
            (418, "2"),
        ] {
            let g = fault_response(http, true);
            assert_eq!(g.status(), StatusCode::OK);
            assert_eq!(g.headers()["content-type"], "application/grpc");
            assert_eq!(g.headers()["grpc-status"], grpc, "{http}");
            assert_eq!(g.headers()["x-remora-fault"], "abort");
        }
    }

    #[test]
    fn a_wrapped_error_is_kept_as_the_source() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = ProxyError::connect("connect 10.0.0.1:80: refused").with_source(io);
        let source = e.source().expect("a source");
        assert_eq!(source.to_string(), "refused");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
        assert!(ProxyError::new(Cause::Denied, "no").source().is_none());
    }
}
