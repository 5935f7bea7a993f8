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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::error::Cause;
    use remora_resilience::Outcome;

    type Result = std::result::Result<Response<ProxyBody>, ProxyError>;

    fn answer(status: u16, grpc_status: Option<&str>) -> Result {
        let mut r = Response::builder().status(status);
        if let Some(g) = grpc_status {
            r = r.header("grpc-status", g);
        }
        Ok(r.body(ProxyBody::empty()).unwrap())
    }

    #[test]
    fn answers_are_classified_by_status_then_grpc_status() {
        assert_eq!(classify(&answer(200, None)), None);
        assert_eq!(classify(&answer(302, None)), None);
        assert_eq!(classify(&answer(404, None)), Some(Outcome::Status(404)));
        assert_eq!(classify(&answer(503, None)), Some(Outcome::Status(503)));
        assert_eq!(classify(&answer(200, Some("14"))), Some(Outcome::Grpc(14)));
        assert_eq!(classify(&answer(200, Some("0"))), None, "gRPC OK");
    }

    #[test]
    fn failures_are_classified_by_how_far_the_request_got() {
        let cases = [
            (
                ProxyError::connect("refused"),
                Some(Outcome::ConnectFailure),
            ),
            (ProxyError::refused("stream"), Some(Outcome::RefusedStream)),
            (ProxyError::upstream("reset"), Some(Outcome::Reset)),
            (ProxyError::timeout("slow"), Some(Outcome::Timeout)),
            (ProxyError::new(Cause::Denied, "no"), None),
            (ProxyError::new(Cause::Overloaded, "full"), None),
        ];
        for (e, want) in cases {
            let what = e.to_string();
            assert_eq!(classify(&Err(e)), want, "{what}");
        }
        // A failure found to be the client's is never retried.
        let mut e = ProxyError::upstream("reset");
        e.blame_client(Cause::ClientReset);
        assert_eq!(classify(&Err(e)), None);
    }

    #[test]
    fn only_what_the_upstream_caused_counts_against_it() {
        assert_eq!(upstream_ok(&answer(200, None), false), Some(true));
        assert_eq!(upstream_ok(&answer(500, None), false), Some(false));
        assert_eq!(upstream_ok(&answer(200, Some("14")), false), Some(false));
        assert_eq!(
            upstream_ok(&Err(ProxyError::connect("x")), false),
            Some(false)
        );
        assert_eq!(
            upstream_ok(&Err(ProxyError::timeout("x")), true),
            Some(false)
        );
        // The client's or the proxy's own failures say nothing of it.
        for cause in [
            Cause::BadRequest,
            Cause::ClientReset,
            Cause::Overloaded,
            Cause::Denied,
        ] {
            assert_eq!(upstream_ok(&Err(ProxyError::new(cause, "x")), false), None);
        }
    }

    #[test]
    fn the_default_ejection_counts_only_gateway_errors() {
        assert_eq!(upstream_ok(&answer(500, None), true), Some(true));
        for status in [502, 503, 504] {
            assert_eq!(upstream_ok(&answer(status, None), true), Some(false));
        }
    }

    #[test]
    fn reasons_name_the_outcome() {
        let names = [
            (Outcome::ConnectFailure, "connect-failure"),
            (Outcome::RefusedStream, "refused-stream"),
            (Outcome::Reset, "reset"),
            (Outcome::Timeout, "timeout"),
            (Outcome::Status(503), "status"),
            (Outcome::Grpc(14), "grpc-status"),
        ];
        for (o, name) in names {
            assert_eq!(reason(o), name);
        }
    }
}
