//! The data path's one error type. Each error knows its cause (which row of the
//! status table in design.md it maps to) and whether a retry may help; this is
//! the one place that turns an error into the answer the proxy makes itself.

use crate::transport::body::{ProxyBody, UploadFailure};
use http::{HeaderValue, Response, StatusCode};
use std::fmt;

/// What went wrong, as the status table in design.md names it.
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

/// Who a failure belongs to. Only the upstream's count against it (breakers,
/// ejection, the balancer, retries).
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
        // Trailers-only: HTTP 200 with grpc-status in the headers, no body.
        let mut r = Response::new(ProxyBody::empty());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(cause.grpc_code())),
        );
        if let Ok(v) = HeaderValue::from_str(&grpc_message(cause, detail)) {
            h.insert("grpc-message", v);
        }
        r
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
    fn every_cause_maps_to_the_design_table() {
        let table = [
            (Cause::NoEndpoints, 503, 14, "no-endpoints"),
            (Cause::CircuitOpen, 503, 14, "circuit-open"),
            (Cause::Overloaded, 503, 14, "overloaded"),
            (Cause::UpstreamFailure, 502, 14, "upstream-failure"),
            (Cause::Timeout, 504, 4, "timeout"),
            (Cause::Denied, 403, 7, "denied"),
            (Cause::Unauthenticated, 401, 16, "unauthenticated"),
            (Cause::RateLimited, 429, 8, "rate-limited"),
            (Cause::BadRequest, 400, 13, "bad-request"),
            (Cause::UriTooLong, 414, 13, "uri-too-long"),
            (Cause::ClientReset, 499, 1, "client-reset"),
            (Cause::UpstreamReset, 502, 14, "upstream-reset"),
        ];
        for (cause, http, grpc, name) in table {
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
}
