//! What the types alone cannot check: [`validate`] and a `validate_*`
//! function per kind. Errors are "field: message".

use super::authn::{
    Condition, JwtRule, RequestAuthenticationSpec, MAX_CLAIM_HEADERS, MAX_CONDITION_VALUES,
    MAX_JWT_RULES,
};
use super::model::{
    AuthorizationPolicySpec, Backend, DestinationPolicySpec, HttpRouteSpec, ServiceSpec, Spec,
    RETRY_ON,
};
use super::Document;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check(cond: bool, field: impl FnOnce() -> String, msg: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("{}: {msg}", field()))
    }
}

fn check_percent(p: f64, field: &str) -> Result<(), String> {
    check(
        (0.0..=100.0).contains(&p),
        || field.to_string(),
        "must be between 0 and 100",
    )
}

/// Checks what the types alone cannot. Errors are "field: message".
pub fn validate(doc: &Document) -> Result<(), String> {
    check(
        is_dns_label(&doc.metadata.name),
        || "metadata.name".into(),
        "must be a DNS label (lowercase letters, digits, '-')",
    )?;
    check(
        is_dns_label(&doc.metadata.namespace),
        || "metadata.namespace".into(),
        "must be a DNS label (lowercase letters, digits, '-')",
    )?;
    match &doc.spec {
        Spec::Service(s) => validate_service(s),
        Spec::HttpRoute(r) => validate_route(r),
        Spec::DestinationPolicy(d) => validate_destination(d),
        Spec::AuthorizationPolicy(a) => validate_authorization(a),
        Spec::RequestAuthentication(r) => validate_request_authentication(r),
        Spec::TelemetryPolicy(t) => {
            if let Some(r) = t.sampling_rate {
                check(
                    (0.0..=1.0).contains(&r),
                    || "spec.samplingRate".into(),
                    "must be between 0 and 1",
                )?;
            }
            Ok(())
        }
    }
}

fn validate_service(s: &ServiceSpec) -> Result<(), String> {
    check(
        !s.ports.is_empty(),
        || "spec.ports".into(),
        "at least one port is required",
    )?;
    for (i, p) in s.ports.iter().enumerate() {
        check(
            p.port != 0,
            || format!("spec.ports[{i}].port"),
            "must be 1-65535",
        )?;
        check(
            p.target_port != Some(0),
            || format!("spec.ports[{i}].targetPort"),
            "must be 1-65535",
        )?;
        check(
            !s.ports[..i].iter().any(|q| q.port == p.port),
            || format!("spec.ports[{i}].port"),
            "duplicate port",
        )?;
    }
    Ok(())
}

fn validate_backend(b: &Backend, field: &str) -> Result<(), String> {
    check(
        is_dns_label(&b.service),
        || format!("{field}.service"),
        "must name a service (a DNS label)",
    )?;
    if let Some(ns) = &b.namespace {
        check(
            is_dns_label(ns),
            || format!("{field}.namespace"),
            "must be a DNS label",
        )?;
    }
    Ok(())
}

fn validate_route(r: &HttpRouteSpec) -> Result<(), String> {
    check(
        is_dns_label(&r.service),
        || "spec.service".into(),
        "must name a service",
    )?;
    check(
        !r.rules.is_empty(),
        || "spec.rules".into(),
        "at least one rule is required",
    )?;
    for (i, rule) in r.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mat = format!("{at}.matches[{j}]");
            if let Some(p) = &m.path {
                check(
                    p.exact.is_some() != p.prefix.is_some(),
                    || format!("{mat}.path"),
                    "exactly one of exact or prefix is required",
                )?;
                let s = p.exact.as_deref().or(p.prefix.as_deref()).unwrap_or("/");
                check(
                    s.starts_with('/'),
                    || format!("{mat}.path"),
                    "must start with '/'",
                )?;
            }
            for (k, h) in m.headers.iter().enumerate() {
                check(
                    http_header_name_ok(&h.name),
                    || format!("{mat}.headers[{k}].name"),
                    "not a valid header name",
                )?;
                // What a proxy can build a header value from: visible ASCII,
                // spaces and tabs (no control bytes, which every proxy would
                // refuse, keeping the whole mesh on its old snapshot).
                check(
                    h.value
                        .bytes()
                        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b)),
                    || format!("{mat}.headers[{k}].value"),
                    "must be visible ASCII, spaces or tabs (no control characters)",
                )?;
            }
            if let Some(method) = &m.method {
                check(
                    is_token(method),
                    || format!("{mat}.method"),
                    "not a valid method",
                )?;
            }
        }
        check(
            !rule.backends.is_empty(),
            || format!("{at}.backends"),
            "at least one backend is required",
        )?;
        for (j, b) in rule.backends.iter().enumerate() {
            validate_backend(b, &format!("{at}.backends[{j}]"))?;
        }
        check(
            rule.backends
                .iter()
                .map(|b| u64::from(b.weight))
                .sum::<u64>()
                > 0,
            || format!("{at}.backends"),
            "the weights must not all be 0",
        )?;
        if let Some(fb) = &rule.fallback {
            validate_backend(fb, &format!("{at}.fallback"))?;
        }
        if let Some(t) = rule.timeout {
            check(
                !t.is_zero(),
                || format!("{at}.timeout"),
                "must be more than 0",
            )?;
        }
        for (j, u) in rule.upgrades.iter().flatten().enumerate() {
            check(
                is_token(u),
                || format!("{at}.upgrades[{j}]"),
                "must be a protocol name such as websocket",
            )?;
            check(
                !u.eq_ignore_ascii_case("h2c"),
                || format!("{at}.upgrades[{j}]"),
                "h2c upgrades are never forwarded (use HTTP/2 with prior knowledge)",
            )?;
        }
        if let Some(retry) = &rule.retry {
            check(
                (1..=10).contains(&retry.attempts),
                || format!("{at}.retry.attempts"),
                "must be between 1 and 10",
            )?;
            for (j, on) in retry.on.iter().enumerate() {
                let ok = RETRY_ON.contains(&on.as_str())
                    || on.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
                check(
                    ok,
                    || format!("{at}.retry.on[{j}]"),
                    "must be an HTTP status code or one of connect-failure, refused-stream, \
                     reset, 5xx, gateway-error, unavailable, resource-exhausted, cancelled, \
                     deadline-exceeded",
                )?;
            }
            if let Some(b) = &retry.backoff {
                check(
                    b.base <= b.max,
                    || format!("{at}.retry.backoff"),
                    "base must not exceed max",
                )?;
            }
        }
        if let Some(f) = &rule.fault {
            if let Some(d) = &f.delay {
                check_percent(d.percent, &format!("{at}.fault.delay.percent"))?;
            }
            if let Some(a) = &f.abort {
                check_percent(a.percent, &format!("{at}.fault.abort.percent"))?;
                check(
                    (200..=599).contains(&a.status),
                    || format!("{at}.fault.abort.status"),
                    "must be an HTTP status 200-599",
                )?;
            }
        }
    }
    Ok(())
}

fn http_header_name_ok(s: &str) -> bool {
    is_token(s)
}

fn validate_destination(d: &DestinationPolicySpec) -> Result<(), String> {
    check(
        is_dns_label(&d.service),
        || "spec.service".into(),
        "must name a service",
    )?;
    if let Some(cb) = &d.circuit_breaker {
        check(
            cb.consecutive_failures.is_some() || cb.failure_rate.is_some(),
            || "spec.circuitBreaker".into(),
            "needs consecutiveFailures or failureRate",
        )?;
        check(
            cb.consecutive_failures != Some(0),
            || "spec.circuitBreaker.consecutiveFailures".into(),
            "must be at least 1",
        )?;
        if let Some(r) = cb.failure_rate {
            check(
                r > 0.0 && r <= 1.0,
                || "spec.circuitBreaker.failureRate".into(),
                "must be in (0, 1]",
            )?;
        }
        check(
            !cb.open_for.is_zero(),
            || "spec.circuitBreaker.openFor".into(),
            "must be more than 0",
        )?;
        if let Some(max) = cb.max_open_for {
            check(
                max >= cb.open_for,
                || "spec.circuitBreaker.maxOpenFor".into(),
                "must not be less than openFor",
            )?;
        }
        check(
            cb.half_open_requests >= 1,
            || "spec.circuitBreaker.halfOpenRequests".into(),
            "must be at least 1",
        )?;
    }
    if let Some(l) = &d.limits {
        if let Some(r) = l.critical_reserve {
            check(
                (0.0..1.0).contains(&r),
                || "spec.limits.criticalReserve".into(),
                "must be in [0, 1)",
            )?;
        }
    }
    if let Some(b) = &d.retry_budget {
        check(
            (0.0..=1.0).contains(&b.ratio),
            || "spec.retryBudget.ratio".into(),
            "must be between 0 and 1",
        )?;
    }
    Ok(())
}

fn validate_authorization(a: &AuthorizationPolicySpec) -> Result<(), String> {
    check(
        is_dns_label(&a.service),
        || "spec.service".into(),
        "must name a service",
    )?;
    for (i, rule) in a.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            check(
                from.starts_with("spiffe://") || from == "*",
                || format!("spec.rules[{i}].from[{j}]"),
                "must be a spiffe:// identity or *",
            )?;
        }
        for (j, to) in rule.to.iter().enumerate() {
            for (k, m) in to.methods.iter().enumerate() {
                check(
                    is_token(m),
                    || format!("spec.rules[{i}].to[{j}].methods[{k}]"),
                    "not a valid method",
                )?;
            }
            for (k, p) in to.paths.iter().enumerate() {
                check(
                    p.starts_with('/') || p == "*",
                    || format!("spec.rules[{i}].to[{j}].paths[{k}]"),
                    "must start with '/'",
                )?;
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            validate_condition(c, &format!("spec.rules[{i}].when[{j}]"))?;
        }
    }
    if let Some(rl) = &a.rate_limit {
        check(
            rl.requests_per_second > 0.0,
            || "spec.rateLimit.requestsPerSecond".into(),
            "must be more than 0",
        )?;
    }
    Ok(())
}

fn validate_condition(c: &Condition, at: &str) -> Result<(), String> {
    c.parsed_key().map_err(|e| format!("{at}.key: {e}"))?;
    check(
        !c.values.is_empty() || !c.not_values.is_empty(),
        || at.to_string(),
        "at least one of values or notValues is required",
    )?;
    for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
        check(
            list.len() <= MAX_CONDITION_VALUES,
            || format!("{at}.{name}"),
            &format!("at most {MAX_CONDITION_VALUES} values are allowed"),
        )?;
        for (k, v) in list.iter().enumerate() {
            check(
                !v.is_empty(),
                || format!("{at}.{name}[{k}]"),
                "must not be empty",
            )?;
        }
    }
    Ok(())
}

/// The longest `issuer` accepted.
const MAX_ISSUER_BYTES: usize = 512;
/// The longest `jwksUri` accepted.
const MAX_JWKS_URI_BYTES: usize = 2048;

/// Headers a claim may not be copied into: they frame the message, route it
/// or carry credentials.
const RESERVED_CLAIM_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "cookie",
];

fn validate_request_authentication(r: &RequestAuthenticationSpec) -> Result<(), String> {
    check(
        is_dns_label(&r.service),
        || "spec.service".into(),
        "must name a service",
    )?;
    check(
        !r.jwt_rules.is_empty(),
        || "spec.jwtRules".into(),
        "at least one rule is required",
    )?;
    check(
        r.jwt_rules.len() <= MAX_JWT_RULES,
        || "spec.jwtRules".into(),
        &format!("at most {MAX_JWT_RULES} rules are allowed"),
    )?;
    for (i, rule) in r.jwt_rules.iter().enumerate() {
        validate_jwt_rule(rule, &r.jwt_rules[..i], &format!("spec.jwtRules[{i}]"))?;
    }
    Ok(())
}

/// `earlier`: the rules before this one in the document.
fn validate_jwt_rule(rule: &JwtRule, earlier: &[JwtRule], at: &str) -> Result<(), String> {
    check(
        !rule.issuer.is_empty(),
        || format!("{at}.issuer"),
        "must not be empty",
    )?;
    check(
        rule.issuer.len() <= MAX_ISSUER_BYTES,
        || format!("{at}.issuer"),
        &format!("must be at most {MAX_ISSUER_BYTES} bytes"),
    )?;
    check(
        !earlier.iter().any(|e| e.issuer == rule.issuer),
        || format!("{at}.issuer"),
        "duplicate issuer (each rule must name a different one)",
    )?;
    match (&rule.jwks, &rule.jwks_uri) {
        (Some(jwks), None) => {
            check(
                jwks.len() <= crate::jwt::MAX_JWKS_BYTES,
                || format!("{at}.jwks"),
                &format!("must be at most {} bytes", crate::jwt::MAX_JWKS_BYTES),
            )?;
            crate::jwt::KeySet::parse(jwks).map_err(|e| format!("{at}.jwks: {e}"))?;
        }
        (None, Some(uri)) => {
            check(
                uri.len() <= MAX_JWKS_URI_BYTES,
                || format!("{at}.jwksUri"),
                &format!("must be at most {MAX_JWKS_URI_BYTES} bytes"),
            )?;
            check(
                is_http_url(uri),
                || format!("{at}.jwksUri"),
                "must be an absolute http:// or https:// URL with a host",
            )?;
        }
        _ => check(
            false,
            || at.to_string(),
            "exactly one of jwks or jwksUri is required",
        )?,
    }
    for (j, aud) in rule.audiences.iter().enumerate() {
        check(
            !aud.is_empty(),
            || format!("{at}.audiences[{j}]"),
            "must not be empty",
        )?;
    }
    for (j, h) in rule.from_headers.iter().enumerate() {
        check(
            http_header_name_ok(&h.name),
            || format!("{at}.fromHeaders[{j}].name"),
            "not a valid header name",
        )?;
    }
    for (j, c) in rule.from_cookies.iter().enumerate() {
        // RFC 6265: a cookie-name is an HTTP token.
        check(
            is_token(c),
            || format!("{at}.fromCookies[{j}]"),
            "not a valid cookie name",
        )?;
    }
    check(
        rule.output_claim_to_headers.len() <= MAX_CLAIM_HEADERS,
        || format!("{at}.outputClaimToHeaders"),
        &format!("at most {MAX_CLAIM_HEADERS} are allowed"),
    )?;
    for (j, o) in rule.output_claim_to_headers.iter().enumerate() {
        let field = || format!("{at}.outputClaimToHeaders[{j}].header");
        check(
            !o.header.starts_with(':'),
            field,
            "must not be a pseudo-header",
        )?;
        check(
            http_header_name_ok(&o.header),
            field,
            "not a valid header name",
        )?;
        let name = o.header.to_ascii_lowercase();
        check(
            !RESERVED_CLAIM_HEADERS.contains(&name.as_str()),
            field,
            "must not be host, authorization, content-length, transfer-encoding, connection, \
             te, upgrade or cookie",
        )?;
        check(
            !name.starts_with("x-remora-"),
            field,
            "must not start with x-remora- (the mesh's own headers)",
        )?;
        check(
            !o.claim.is_empty(),
            || format!("{at}.outputClaimToHeaders[{j}].claim"),
            "must not be empty",
        )?;
    }
    Ok(())
}

/// An absolute `http://` or `https://` URL (scheme in any case) whose host is
/// a name, an IPv4 address or a bracketed IPv6 address, with an optional
/// port and no user info, in visible ASCII.
fn is_http_url(s: &str) -> bool {
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let strip = |prefix: &str| {
        s.get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| &s[prefix.len()..])
    };
    let Some(rest) = strip("https://").or_else(|| strip("http://")) else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, port)) => (addr.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (host, port) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            (host.len() <= 253 && host.split('.').all(label_ok), port)
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n != 0)
        });
    host_ok && port_ok
}
