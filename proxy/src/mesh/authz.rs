//! Inbound authorization: who may call this workload, compiled from the
//! AuthorizationPolicies that select its service.
//!
//! - No policy: mesh traffic is allowed, and plaintext too (permissive).
//! - Once any policy selects the service, what no rule allows is denied.
//! - `mtls: strict` (in any selecting policy) refuses plaintext connections;
//!   `permissive` accepts them as unauthenticated callers.
//! - A rule's `from` lists SPIFFE identities (empty: any authenticated peer;
//!   `*`: anyone, plaintext included); its `to` lists methods and paths (empty:
//!   everything). A path ending in `*` is a prefix.
//! - A rule's `when` conditions are about the end user's verified token (see
//!   `authn`): `request.auth.principal` (`<iss>/<sub>`) and
//!   `request.auth.claims[NAME]`; every condition must hold. A request
//!   without a token satisfies none, so `when: [{key: request.auth.principal,
//!   values: ["*"]}]` requires one.

use crate::mesh::authn::Principal;
use http::Method;
use remora_proto::policy::{AuthorizationPolicySpec, ConditionKey, MtlsMode};

#[derive(Debug, Default)]
pub struct Authz {
    /// Whether any policy selects this service.
    pub present: bool,
    pub strict: bool,
    rules: Vec<Rule>,
    /// Rate limits, each for some paths (or all).
    limits: Vec<(Vec<PathPattern>, std::sync::Arc<RateLimiter>)>,
}

/// A token bucket for the whole service, or one per source identity.
#[derive(Debug)]
pub enum RateLimiter {
    Service(remora_resilience::TokenBucket),
    PerIdentity(remora_resilience::KeyedRateLimiter<String>),
}

impl RateLimiter {
    pub fn new(spec: &remora_proto::policy::RateLimit) -> Result<RateLimiter, String> {
        let burst = spec
            .burst
            .unwrap_or_else(|| spec.requests_per_second.ceil().max(1.0) as u32);
        if spec.per_identity {
            remora_resilience::KeyedRateLimiter::new(
                spec.requests_per_second,
                burst,
                remora_resilience::ratelimit::DEFAULT_MAX_KEYS,
            )
            .map(RateLimiter::PerIdentity)
        } else {
            remora_resilience::TokenBucket::new(spec.requests_per_second, burst)
                .map(RateLimiter::Service)
        }
        .map_err(|e| format!("rateLimit: {e}"))
    }

    fn try_acquire(&self, peer: Option<&str>) -> Result<(), std::time::Duration> {
        match self {
            RateLimiter::Service(b) => b.try_acquire(),
            RateLimiter::PerIdentity(k) => k.try_acquire(peer.unwrap_or("")),
        }
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<String>,
    any_caller: bool,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// One `when` condition, compiled.
#[derive(Debug)]
struct Condition {
    key: ConditionKey,
    values: Vec<ValuePattern>,
    not_values: Vec<ValuePattern>,
}

/// `*` (any), `prefix*`, `*suffix` or an exact value.
#[derive(Debug)]
enum ValuePattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl ValuePattern {
    fn parse(v: &str) -> ValuePattern {
        if v == "*" {
            ValuePattern::Any
        } else if let Some(p) = v.strip_suffix('*') {
            ValuePattern::Prefix(p.to_string())
        } else if let Some(s) = v.strip_prefix('*') {
            ValuePattern::Suffix(s.to_string())
        } else {
            ValuePattern::Exact(v.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            ValuePattern::Any => true,
            ValuePattern::Exact(e) => e == v,
            ValuePattern::Prefix(p) => v.starts_with(p.as_str()),
            ValuePattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

impl Condition {
    /// Holds if some value of the key matches `values` (when given) and
    /// none matches `notValues`. Without a token nothing holds.
    fn holds(&self, auth: Option<&Principal>) -> bool {
        let Some(auth) = auth else {
            return false;
        };
        let present: Vec<String> = match &self.key {
            ConditionKey::Principal => vec![auth.principal.clone()],
            ConditionKey::Claim(name) => auth.claim_values(name),
        };
        let any = |patterns: &[ValuePattern]| {
            present
                .iter()
                .any(|v| patterns.iter().any(|p| p.matches(v)))
        };
        (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
    }
}

#[derive(Debug)]
struct Operation {
    methods: Vec<Method>,
    paths: Vec<PathPattern>,
}

#[derive(Debug)]
enum PathPattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    fn parse(p: &str) -> PathPattern {
        if p == "*" {
            PathPattern::Any
        } else if let Some(prefix) = p.strip_suffix('*') {
            PathPattern::Prefix(prefix.to_string())
        } else {
            PathPattern::Exact(p.to_string())
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Any => true,
            PathPattern::Exact(p) => p == path,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

impl Authz {
    /// `limiter` makes (or reuses, across snapshots) the bucket of a rate limit.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AuthorizationPolicySpec>,
        mut limiter: impl FnMut(&remora_proto::policy::RateLimit) -> Option<std::sync::Arc<RateLimiter>>,
    ) -> Authz {
        let mut authz = Authz::default();
        for p in policies {
            authz.present = true;
            if let Some(rl) = &p.rate_limit {
                if let Some(l) = limiter(rl) {
                    authz
                        .limits
                        .push((rl.paths.iter().map(|p| PathPattern::parse(p)).collect(), l));
                }
            }
            authz.strict |= p.mtls == MtlsMode::Strict;
            for r in &p.rules {
                let when = r
                    .when
                    .iter()
                    .filter_map(|c| {
                        // Validated by the control plane and again on
                        // receipt: a key that does not parse cannot hold.
                        let key = c.parsed_key().ok()?;
                        Some(Condition {
                            key,
                            values: c.values.iter().map(|v| ValuePattern::parse(v)).collect(),
                            not_values: c
                                .not_values
                                .iter()
                                .map(|v| ValuePattern::parse(v))
                                .collect(),
                        })
                    })
                    .collect::<Vec<_>>();
                if when.len() != r.when.len() {
                    continue;
                }
                authz.rules.push(Rule {
                    when,
                    any_caller: r.from.iter().any(|f| f == "*"),
                    from: r.from.iter().filter(|f| *f != "*").cloned().collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| Operation {
                            methods: t
                                .methods
                                .iter()
                                .filter_map(|m| {
                                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok()
                                })
                                .collect(),
                            paths: t.paths.iter().map(|p| PathPattern::parse(p)).collect(),
                        })
                        .collect(),
                });
            }
        }
        authz
    }

    /// Takes a token from every rate limit that covers `path`; on refusal,
    /// how long until one is available (for `Retry-After`).
    pub fn rate_limit(&self, peer: Option<&str>, path: &str) -> Result<(), std::time::Duration> {
        for (paths, limiter) in &self.limits {
            if paths.is_empty() || paths.iter().any(|p| p.matches(path)) {
                limiter.try_acquire(peer)?;
            }
        }
        Ok(())
    }

    /// Whether any rule is about HTTP (a rate limit, methods, paths or
    /// token conditions): a connection that does not speak HTTP would pass
    /// them unchecked.
    pub fn has_http_rules(&self) -> bool {
        !self.limits.is_empty() || self.rules.iter().any(|r| r.is_http())
    }

    /// Whether a plaintext (non-mesh) connection may be served at all.
    pub fn allows_plaintext(&self) -> bool {
        !self.strict
    }

    /// Whether `peer` (None: plaintext), with the end user `auth` proved by
    /// a token (if any), may make this request.
    pub fn allows_request(
        &self,
        peer: Option<&str>,
        auth: Option<&Principal>,
        method: &Method,
        path: &str,
    ) -> bool {
        if !self.present {
            return true;
        }
        self.rules.iter().any(|r| {
            r.caller_matches(peer)
                && r.when.iter().all(|c| c.holds(auth))
                && (r.to.is_empty()
                    || r.to.iter().any(|op| {
                        (op.methods.is_empty() || op.methods.contains(method))
                            && (op.paths.is_empty() || op.paths.iter().any(|p| p.matches(path)))
                    }))
        })
    }

    /// Whether `peer` may open an opaque TCP connection (rules with `to`
    /// operations or `when` conditions are about HTTP and do not allow TCP).
    pub fn allows_connection(&self, peer: Option<&str>) -> bool {
        !self.present
            || self
                .rules
                .iter()
                .any(|r| !r.is_http() && r.caller_matches(peer))
    }
}

impl Rule {
    fn is_http(&self) -> bool {
        !self.to.is_empty() || !self.when.is_empty()
    }

    fn caller_matches(&self, peer: Option<&str>) -> bool {
        if self.any_caller {
            return true;
        }
        match peer {
            None => false,
            Some(id) => self.from.is_empty() || self.from.iter().any(|f| f == id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::policy::{AuthorizationRule, AuthorizationTo};

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

    fn policy(mtls: MtlsMode, rules: Vec<AuthorizationRule>) -> AuthorizationPolicySpec {
        AuthorizationPolicySpec {
            service: "backend".into(),
            mtls,
            rules,
            rate_limit: None,
        }
    }

    #[test]
    fn rate_limits_apply_to_their_paths_and_identities() {
        let spec = remora_proto::policy::RateLimit {
            requests_per_second: 1.0,
            burst: Some(2),
            per_identity: true,
            paths: vec!["/api/*".into()],
        };
        let mut p = policy(MtlsMode::Permissive, vec![]);
        p.rate_limit = Some(spec);
        let a = Authz::compile([&p], |rl| {
            RateLimiter::new(rl).ok().map(std::sync::Arc::new)
        });
        assert!(a.rate_limit(Some(FRONTEND), "/api/a").is_ok());
        assert!(a.rate_limit(Some(FRONTEND), "/api/b").is_ok());
        let wait = a.rate_limit(Some(FRONTEND), "/api/c").unwrap_err();
        assert!(wait > std::time::Duration::ZERO);
        assert!(
            a.rate_limit(Some(OTHER), "/api/a").is_ok(),
            "buckets are per identity"
        );
        assert!(
            a.rate_limit(Some(FRONTEND), "/health").is_ok(),
            "other paths are not limited"
        );
    }

    #[test]
    fn no_policy_allows_everything() {
        let a = Authz::compile([], |_| None);
        assert!(a.allows_plaintext());
        assert!(a.allows_request(None, None, &Method::GET, "/"));
        assert!(a.allows_connection(Some(OTHER)));
    }

    #[test]
    fn a_policy_denies_what_it_does_not_allow() {
        let p = policy(
            MtlsMode::Strict,
            vec![AuthorizationRule {
                from: vec![FRONTEND.into()],
                when: vec![],
                to: vec![AuthorizationTo {
                    methods: vec!["GET".into(), "post".into()],
                    paths: vec!["/api/*".into()],
                }],
            }],
        );
        let a = Authz::compile([&p], |_| None);
        assert!(!a.allows_plaintext());
        assert!(a.allows_request(Some(FRONTEND), None, &Method::GET, "/api/orders"));
        assert!(a.allows_request(Some(FRONTEND), None, &Method::POST, "/api/x"));
        assert!(!a.allows_request(Some(FRONTEND), None, &Method::DELETE, "/api/x"));
        assert!(!a.allows_request(Some(FRONTEND), None, &Method::GET, "/admin"));
        assert!(!a.allows_request(Some(OTHER), None, &Method::GET, "/api/orders"));
        assert!(!a.allows_request(None, None, &Method::GET, "/api/orders"));
        assert!(
            !a.allows_connection(Some(FRONTEND)),
            "HTTP-only rules do not open TCP"
        );
    }

    #[test]
    fn when_conditions_match_the_verified_token() {
        use remora_proto::policy::Condition;
        let cond = |key: &str, values: &[&str], not: &[&str]| Condition {
            key: key.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
            not_values: not.iter().map(|v| v.to_string()).collect(),
        };
        let p = policy(
            MtlsMode::Permissive,
            vec![AuthorizationRule {
                from: vec!["*".into()],
                to: vec![],
                when: vec![
                    cond("request.auth.principal", &["https://idp/*"], &[]),
                    cond(
                        "request.auth.claims[groups]",
                        &["admin", "ops"],
                        &["banned"],
                    ),
                    cond("request.auth.claims[aud]", &["*"], &[]),
                ],
            }],
        );
        let a = Authz::compile([&p], |_| None);
        let user = |sub: &str, groups: serde_json::Value| {
            Principal::for_test(
                &format!("https://idp/{sub}"),
                serde_json::json!({"sub": sub, "aud": "api", "groups": groups}),
            )
        };
        let get = |auth: Option<&Principal>| a.allows_request(None, auth, &Method::GET, "/");
        assert!(get(Some(&user(
            "alice",
            serde_json::json!(["dev", "admin"])
        ))));
        assert!(
            get(Some(&user("olga", serde_json::json!("ops")))),
            "a string claim"
        );
        assert!(
            !get(Some(&user("bob", serde_json::json!(["dev"])))),
            "not in a listed group"
        );
        assert!(
            !get(Some(&user("eve", serde_json::json!(["admin", "banned"])))),
            "notValues wins"
        );
        assert!(!get(None), "no token: no condition holds");
        let other = Principal::for_test(
            "https://other/x",
            serde_json::json!({"aud": "api", "groups": ["admin"]}),
        );
        assert!(!get(Some(&other)), "another issuer's principal");
        assert!(
            a.has_http_rules() && !a.allows_connection(None),
            "when is HTTP-only"
        );
    }

    #[test]
    fn permissive_star_admits_plaintext_callers() {
        let p = policy(
            MtlsMode::Permissive,
            vec![AuthorizationRule {
                from: vec!["*".into()],
                to: vec![],
                when: vec![],
            }],
        );
        let a = Authz::compile([&p], |_| None);
        assert!(a.allows_plaintext());
        assert!(a.allows_request(None, None, &Method::GET, "/"));
        assert!(a.allows_connection(None));
        let empty_from = policy(
            MtlsMode::Permissive,
            vec![AuthorizationRule {
                from: vec![],
                to: vec![],
                when: vec![],
            }],
        );
        let a = Authz::compile([&empty_from], |_| None);
        assert!(a.allows_request(Some(OTHER), None, &Method::GET, "/"));
        assert!(
            !a.allows_request(None, None, &Method::GET, "/"),
            "empty from = authenticated only"
        );
    }
}
