//! End-user authentication at the sidecar: the RequestAuthentication
//! policies that select this workload's service, compiled.
//!
//! For each inbound request (before authorization, as Istio's JWT filter runs
//! before RBAC):
//! - every header a rule copies claims into is removed first, so the
//!   application never sees one the client forged;
//! - the token is looked for where each rule says (`Authorization: Bearer`
//!   by default, other headers with a prefix, cookies); none found: the
//!   request goes on unauthenticated (an AuthorizationPolicy `when` on
//!   `request.auth.principal` is what requires one);
//! - a token found is checked against the rule of its issuer: signature by a
//!   key of the rule's JWK set (inline, or fetched from `jwksUri` by the
//!   control plane and pushed in the snapshot), `exp`, `nbf`, audiences. A
//!   token that does not verify gets 401 with `WWW-Authenticate`;
//! - a verified token's claims are copied into the configured headers, and
//!   the token is removed unless `forwardOriginalToken`.
//!
//! A verified token is kept (up to its `exp`) in a small sharded cache, so a
//! client that sends the same token on every request costs one signature
//! check, not one per request. The cache belongs to one compiled snapshot:
//! new keys start a new cache.

use crate::transport::error::ProxyError;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use parking_lot::Mutex;
use remora_proto::jwt::{self, Claims, Expected, KeySet};
use remora_proto::policy::RequestAuthenticationSpec;
use std::collections::HashMap;
use std::sync::Arc;

/// Who a verified token says the caller is.
#[derive(Debug)]
pub struct Principal {
    /// `<iss>/<sub>` (Istio's request principal).
    pub principal: String,
    pub claims: Claims,
    /// When the token expires (Unix seconds).
    exp: u64,
    /// The rule that verified it.
    rule: usize,
    /// Its claims as the rule's request headers, made once when the token
    /// is verified (a cached token costs one clone of each per request).
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Principal {
    #[cfg(test)]
    pub(crate) fn for_test(principal: &str, claims: serde_json::Value) -> Principal {
        Principal {
            principal: principal.to_string(),
            claims: match claims {
                serde_json::Value::Object(m) => m,
                _ => Claims::new(),
            },
            exp: u64::MAX,
            rule: 0,
            headers: Vec::new(),
        }
    }

    /// A claim's values as strings: a string claim is one value, a list
    /// claim each of its string, number or boolean elements; a number or a
    /// boolean its JSON text.
    pub fn claim_values(&self, name: &str) -> Vec<String> {
        match self.claims.get(name) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(list)) => list.iter().filter_map(scalar).collect(),
            Some(v) => scalar(v).into_iter().collect(),
        }
    }
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Debug)]
enum Source {
    Header { name: HeaderName, prefix: String },
    Cookie(String),
}

#[derive(Debug)]
struct Rule {
    expected: Expected,
    /// The keys, or why there are none yet (a `jwksUri` not fetched).
    keys: Result<Arc<KeySet>, String>,
    sources: Vec<Source>,
    forward: bool,
    claims_to_headers: Vec<(HeaderName, String)>,
}

/// The compiled RequestAuthentications of this workload.
#[derive(Debug, Default)]
pub struct Authn {
    rules: Vec<Rule>,
    /// Every header a rule writes: removed from each request first.
    outputs: Vec<HeaderName>,
    cache: Cache,
    realm: String,
}

/// A token found in a request: where, and for which rule.
struct Found<'a> {
    /// Borrowed from the request's headers: nothing is copied unless the
    /// token is verified (and cached) for the first time.
    token: &'a str,
    rule: usize,
    source: usize,
}

impl Authn {
    /// Compiles `specs`; `jwks` holds the sets the control plane fetched,
    /// by URI. `realm` names the service in challenges.
    pub fn compile<'a>(
        specs: impl IntoIterator<Item = &'a RequestAuthenticationSpec>,
        jwks: &HashMap<String, String>,
        realm: &str,
    ) -> Result<Authn, String> {
        let mut authn = Authn {
            realm: realm.to_string(),
            ..Authn::default()
        };
        for spec in specs {
            for (i, r) in spec.jwt_rules.iter().enumerate() {
                let at = |m: String| {
                    format!("RequestAuthentication {}: jwtRules[{i}]: {m}", spec.service)
                };
                let keys = match (&r.jwks, &r.jwks_uri) {
                    (Some(inline), _) => Ok(Arc::new(KeySet::parse(inline).map_err(at)?)),
                    (None, Some(uri)) => match jwks.get(uri) {
                        Some(text) => KeySet::parse(text)
                            .map(Arc::new)
                            .map_err(|e| format!("the JWK set of {uri} is unusable: {e}")),
                        None => Err(format!("the JWK set of {uri} has not been fetched yet")),
                    },
                    (None, None) => return Err(at("neither jwks nor jwksUri".into())),
                };
                let mut sources = Vec::new();
                for h in &r.from_headers {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|e| at(format!("fromHeaders {:?}: {e}", h.name)))?;
                    sources.push(Source::Header {
                        name,
                        prefix: h.prefix.clone().unwrap_or_default(),
                    });
                }
                for c in &r.from_cookies {
                    sources.push(Source::Cookie(c.clone()));
                }
                if sources.is_empty() {
                    sources.push(Source::Header {
                        name: AUTHORIZATION,
                        prefix: "Bearer ".into(),
                    });
                }
                let mut claims_to_headers = Vec::new();
                for o in &r.output_claim_to_headers {
                    let name = HeaderName::from_bytes(o.header.as_bytes())
                        .map_err(|e| at(format!("outputClaimToHeaders {:?}: {e}", o.header)))?;
                    if !authn.outputs.contains(&name) {
                        authn.outputs.push(name.clone());
                    }
                    claims_to_headers.push((name, o.claim.clone()));
                }
                authn.rules.push(Rule {
                    expected: Expected {
                        issuer: r.issuer.clone(),
                        audiences: r.audiences.clone(),
                    },
                    keys,
                    sources,
                    forward: r.forward_original_token,
                    claims_to_headers,
                });
            }
        }
        Ok(authn)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds and checks the request's token (see the module doc). `Ok(None)`:
    /// no token; `Err`: a 401.
    pub fn authenticate(
        &self,
        headers: &mut HeaderMap,
        metrics: &remora_telemetry::ServiceMetrics,
    ) -> Result<Option<Arc<Principal>>, ProxyError> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        for name in &self.outputs {
            headers.remove(name);
        }
        let (principal, found_rule, found_source) = {
            let Some(found) = self.find(headers) else {
                return Ok(None);
            };
            let now = now_unix();
            let principal = match self.cache.get(found.token, now) {
                Some(p) => {
                    metrics.jwt_cached();
                    p
                }
                None => {
                    let p = self.verify(&found, now).map_err(|(reason, why)| {
                        metrics.jwt_refused(reason);
                        ProxyError::unauthenticated(&self.realm, why)
                    })?;
                    metrics.jwt_verified();
                    let p = Arc::new(p);
                    self.cache.put(found.token.to_string(), p.clone(), now);
                    p
                }
            };
            (principal, found.rule, found.source)
        };
        for (name, value) in &principal.headers {
            headers.insert(name.clone(), value.clone());
        }
        if !self.rules[principal.rule].forward {
            // The source the token was read from, under the rule that found
            // it (the verifying rule has the same issuer).
            if let Some(source) = self.rules[found_rule].sources.get(found_source) {
                strip(headers, source);
            }
        }
        Ok(Some(principal))
    }

    /// The first token found, in rule order, then source order.
    fn find<'a>(&self, headers: &'a HeaderMap) -> Option<Found<'a>> {
        for (rule, r) in self.rules.iter().enumerate() {
            for (source, s) in r.sources.iter().enumerate() {
                if let Some(token) = read(headers, s) {
                    return Some(Found {
                        token,
                        rule,
                        source,
                    });
                }
            }
        }
        None
    }

    /// Verifies under the rule of the token's issuer (read, unverified,
    /// from its payload to choose the rule; the rule then checks it).
    /// Refusals: a short reason (a metric label) and the message.
    fn verify(&self, found: &Found, now: u64) -> Result<Principal, (&'static str, String)> {
        let refused = |e: jwt::JwtError| (e.reason(), e.to_string());
        if found.token.len() > jwt::MAX_TOKEN_BYTES {
            return Err(refused(jwt::JwtError::TooLarge));
        }
        let issuer = unverified_issuer(found.token);
        let index = self
            .rules
            .iter()
            .position(|r| Some(r.expected.issuer.as_str()) == issuer.as_deref())
            .unwrap_or(found.rule);
        let rule = &self.rules[index];
        let keys = rule
            .keys
            .as_ref()
            .map_err(|why| ("jwks_unavailable", why.clone()))?;
        let claims = jwt::verify(found.token, keys, &rule.expected, now).map_err(refused)?;
        let sub = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("");
        let exp = claims
            .get("exp")
            .and_then(|e| e.as_f64())
            .map(|e| e as u64)
            .unwrap_or(0);
        let mut principal = Principal {
            principal: format!("{}/{sub}", rule.expected.issuer),
            claims,
            exp,
            rule: index,
            headers: Vec::new(),
        };
        for (header, claim) in &rule.claims_to_headers {
            let values = principal.claim_values(claim);
            if values.is_empty() {
                continue;
            }
            if let Ok(v) = HeaderValue::from_str(&values.join(",")) {
                principal.headers.push((header.clone(), v));
            }
        }
        Ok(principal)
    }
}

fn read<'a>(headers: &'a HeaderMap, source: &Source) -> Option<&'a str> {
    match source {
        Source::Header { name, prefix } => {
            let v = headers.get(name)?.to_str().ok()?.trim();
            let token = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len()
                && v.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
            {
                v[prefix.len()..].trim_start()
            } else {
                return None;
            };
            (!token.is_empty()).then_some(token)
        }
        Source::Cookie(name) => headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name && !v.is_empty()).then_some(v)
            }),
    }
}

/// Removes the token from where it was found: the header, or the cookie
/// (the other cookies stay).
fn strip(headers: &mut HeaderMap, source: &Source) {
    match source {
        Source::Header { name, .. } => {
            headers.remove(name);
        }
        Source::Cookie(name) => {
            let kept: Vec<String> = headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|pair| {
                    !pair.is_empty() && pair.split_once('=').map(|(k, _)| k) != Some(name.as_str())
                })
                .map(str::to_string)
                .collect();
            headers.remove(COOKIE);
            if !kept.is_empty() {
                if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
                    headers.insert(COOKIE, v);
                }
            }
        }
    }
}

/// The `iss` of a token's payload, unverified (to pick the rule that will
/// verify it).
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&raw).ok()?.iss
}

/// Now, as Unix seconds (a JWT's `exp` and `nbf` are).
fn now_unix() -> u64 {
    u64::try_from(remora_proto::util::now_unix()).unwrap_or(0)
}

const SHARDS: usize = 8;
/// Verified tokens kept per shard.
const PER_SHARD: usize = 128;

/// Verified tokens, by their text, until they expire.
#[derive(Debug, Default)]
struct Cache {
    shards: [Mutex<HashMap<String, Arc<Principal>>>; SHARDS],
}

impl Cache {
    fn shard(&self, token: &str) -> &Mutex<HashMap<String, Arc<Principal>>> {
        // The signature's last bytes are as good as random.
        let tail = token.as_bytes().last().copied().unwrap_or(0);
        &self.shards[tail as usize % SHARDS]
    }

    fn get(&self, token: &str, now: u64) -> Option<Arc<Principal>> {
        let shard = self.shard(token).lock();
        let p = shard.get(token)?;
        (now < p.exp.saturating_add(jwt::LEEWAY_SECONDS)).then(|| p.clone())
    }

    fn put(&self, token: String, p: Arc<Principal>, now: u64) {
        let mut shard = self.shard(&token).lock();
        if shard.len() >= PER_SHARD {
            shard.retain(|_, p| now < p.exp.saturating_add(jwt::LEEWAY_SECONDS));
            if shard.len() >= PER_SHARD {
                shard.clear();
            }
        }
        shard.insert(token, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_proto::jwt::testing;
    use remora_proto::policy::{ClaimToHeader, JwtHeader, JwtRule};
    use serde_json::json;

    const ISS: &str = "https://idp.example.com";

    fn rule(jwks: &str) -> JwtRule {
        JwtRule {
            issuer: ISS.into(),
            audiences: vec!["api".into()],
            jwks: Some(jwks.into()),
            jwks_uri: None,
            from_headers: vec![],
            from_cookies: vec![],
            forward_original_token: false,
            output_claim_to_headers: vec![ClaimToHeader {
                header: "x-user".into(),
                claim: "sub".into(),
            }],
        }
    }

    fn authn(rules: Vec<JwtRule>) -> Authn {
        let spec = RequestAuthenticationSpec {
            service: "api".into(),
            jwt_rules: rules,
        };
        Authn::compile([&spec], &HashMap::new(), "api.shop").unwrap()
    }

    fn metrics() -> remora_telemetry::ServiceMetrics {
        remora_telemetry::ServiceMetrics::new("api.shop")
    }

    fn token(key: &testing::TestKey, sub: &str) -> String {
        let now = testing::now();
        testing::sign(
            key,
            &json!({"iss": ISS, "sub": sub, "aud": "api", "exp": now + 600, "groups": ["a", "b"]}),
        )
    }

    #[test]
    fn a_valid_token_sets_claim_headers_and_is_stripped() {
        let key = testing::ec("k");
        let a = authn(vec![rule(&testing::jwks(&[&key]))]);
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {}", token(&key, "alice")).parse().unwrap(),
        );
        h.insert("x-user", "forged".parse().unwrap());
        let p = a.authenticate(&mut h, &metrics()).unwrap().unwrap();
        assert_eq!(p.principal, format!("{ISS}/alice"));
        assert_eq!(p.claim_values("groups"), ["a", "b"]);
        assert_eq!(h["x-user"], "alice");
        assert!(h.get(AUTHORIZATION).is_none(), "not forwarded by default");
    }

    #[test]
    fn no_token_passes_unauthenticated_but_forged_headers_go() {
        let key = testing::ec("k");
        let a = authn(vec![rule(&testing::jwks(&[&key]))]);
        let mut h = HeaderMap::new();
        h.insert("x-user", "forged".parse().unwrap());
        assert!(a.authenticate(&mut h, &metrics()).unwrap().is_none());
        assert!(h.get("x-user").is_none());
    }

    #[test]
    fn a_bad_token_is_a_401_with_a_challenge() {
        let key = testing::ec("k");
        let other = testing::ec("k");
        let a = authn(vec![rule(&testing::jwks(&[&key]))]);
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {}", token(&other, "eve")).parse().unwrap(),
        );
        let e = a.authenticate(&mut h, &metrics()).unwrap_err();
        let resp = e.to_response(false);
        assert_eq!(resp.status(), 401);
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"api.shop\""),
            "{challenge}"
        );
        assert!(challenge.contains("signature"), "{challenge}");
    }

    #[test]
    fn cookies_and_custom_headers_are_read_and_the_token_cookie_removed() {
        let key = testing::rsa("r");
        let mut r = rule(&testing::jwks(&[&key]));
        r.from_headers = vec![JwtHeader {
            name: "x-token".into(),
            prefix: None,
        }];
        r.from_cookies = vec!["session".into()];
        let a = authn(vec![r]);
        let t = token(&key, "bob");
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("theme=dark; session={t}; lang=en").parse().unwrap(),
        );
        assert!(a.authenticate(&mut h, &metrics()).unwrap().is_some());
        assert_eq!(h[COOKIE], "theme=dark; lang=en");
        let mut h = HeaderMap::new();
        h.insert("x-token", t.parse().unwrap());
        assert!(a.authenticate(&mut h, &metrics()).unwrap().is_some());
        assert!(h.get("x-token").is_none());
        // The default Authorization header is not read when sources are set.
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        assert!(a.authenticate(&mut h, &metrics()).unwrap().is_none());
    }

    #[test]
    fn a_verified_token_is_cached() {
        let key = testing::rsa("r");
        let a = authn(vec![rule(&testing::jwks(&[&key]))]);
        let t = token(&key, "carol");
        let first = {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            a.authenticate(&mut h, &metrics()).unwrap().unwrap()
        };
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        let second = a.authenticate(&mut h, &metrics()).unwrap().unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second request reused the first check"
        );
    }

    #[test]
    fn an_unfetched_jwks_uri_refuses_its_tokens() {
        let key = testing::rsa("r");
        let mut r = rule("");
        r.jwks = None;
        r.jwks_uri = Some("https://idp.example.com/jwks".into());
        let a = authn(vec![r]);
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {}", token(&key, "d")).parse().unwrap(),
        );
        let e = a.authenticate(&mut h, &metrics()).unwrap_err();
        assert!(e.to_string().contains("not been fetched"), "{e}");
        let mut fetched = HashMap::new();
        fetched.insert(
            "https://idp.example.com/jwks".to_string(),
            testing::jwks(&[&key]),
        );
        let mut r = rule("");
        r.jwks = None;
        r.jwks_uri = Some("https://idp.example.com/jwks".into());
        let spec = RequestAuthenticationSpec {
            service: "api".into(),
            jwt_rules: vec![r],
        };
        let a = Authn::compile([&spec], &fetched, "api.shop").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {}", token(&key, "d")).parse().unwrap(),
        );
        assert!(a.authenticate(&mut h, &metrics()).unwrap().is_some());
    }
}
