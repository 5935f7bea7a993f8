//! How an attempt went, in the terms of the breaker, the balancer and the
//! retry conditions: [`upstream_ok`] says whether it counts for or against
//! its endpoint (only what the upstream caused does), [`classify`] what
//! went wrong for a retry to consider, [`reason`] how spans, logs and
//! metrics name it.

use crate::transport::body::ProxyBody;
use crate::transport::error::{ProxyError, RetryClass, Side};
use http::Response;
use remora_resilience::{grpc_status_of, Outcome};

/// Whether an attempt went well for its endpoint: `None` when the failure
/// was not the upstream's (the client's, or the proxy's own answer). With
/// only the default ejection (no circuitBreaker policy), only gateway errors
/// count: a 500 is the application's answer, a 502/503/504 or a failed
/// exchange says the endpoint is unwell.
pub(super) fn upstream_ok(
    result: &Result<Response<ProxyBody>, ProxyError>,
    gateway_only: bool,
) -> Option<bool> {
    match result {
        Err(e) if e.cause.side() != Side::Upstream => None,
        Err(_) => Some(false),
        Ok(r) => {
            let status = r.status();
            let failed = if gateway_only {
                matches!(status.as_u16(), 502..=504)
            } else {
                status.is_server_error()
            };
            Some(!(failed || grpc_status_of(r.headers()) == Some(14)))
        }
    }
}

/// What went wrong, if anything, in the terms retry conditions use.
pub(super) fn classify(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<Outcome> {
    match result {
        Ok(resp) => {
            if let Some(code) = grpc_status_of(resp.headers()).filter(|c| *c != 0) {
                return Some(Outcome::Grpc(code));
            }
            let status = resp.status().as_u16();
            (status >= 400).then_some(Outcome::Status(status))
        }
        Err(e) => match e.retry {
            RetryClass::ConnectFailure => Some(Outcome::ConnectFailure),
            RetryClass::RefusedStream => Some(Outcome::RefusedStream),
            RetryClass::Reset => Some(Outcome::Reset),
            RetryClass::Timeout => Some(Outcome::Timeout),
            RetryClass::Never => None,
        },
    }
}

/// The retry reason for spans, logs and metrics.
pub(super) fn reason(o: Outcome) -> &'static str {
    match o {
        Outcome::ConnectFailure => "connect-failure",
        Outcome::RefusedStream => "refused-stream",
        Outcome::Reset => "reset",
        Outcome::Timeout => "timeout",
        Outcome::Status(_) => "status",
        Outcome::Grpc(_) => "grpc-status",
    }
}
