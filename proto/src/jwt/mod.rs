//! JSON Web Tokens, checked the same way by the control plane (Kubernetes
//! ServiceAccount tokens presented to `Identity.Certify`) and by the sidecar
//! (end users' access tokens under a `RequestAuthentication` policy).
//!
//! The `jsonwebtoken` crate splits and decodes the token and checks its
//! signature; its cryptography is ring's (the workspace's TLS provider),
//! through the [`CryptoProvider`] installed here once per process. The claims
//! are checked here, strictly typed: `exp` must be a number, so must `nbf` and
//! `iat` when present, `iss` a string equal to the expected issuer, `aud` a
//! string or a list of strings. A claim of the wrong type refuses the token
//! rather than being skipped.
//!
//! Refused always: `alg: none`, HMAC algorithms (`HS256` and kin: a JWK set
//! holds public keys, and a token "signed" with one as an HMAC secret is the
//! classic confusion attack), keys of an unsupported type or curve, tokens
//! over [`MAX_TOKEN_BYTES`].

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::fmt;

pub use jsonwebtoken;

/// A token's claims, as JSON.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// The longest token looked at (Istio's and Envoy's default is the header
/// limit; access tokens with many groups reach a few KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The largest JWK set accepted (inline, from a file or fetched).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// The most keys one set may hold.
pub const MAX_KEYS: usize = 64;
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECONDS: u64 = 60;

/// The algorithms a token may be signed with.
const ALLOWED: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Why a token proves nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    TooLarge,
    Malformed(String),
    Algorithm(String),
    UnknownKey(Option<String>),
    Signature,
    Expired,
    NotYetValid,
    Issuer(String),
    Audience,
    Claim(String),
}

impl JwtError {
    /// A short label for metrics (`reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "jwt_too_large",
            JwtError::Malformed(_) => "jwt_malformed",
            JwtError::Algorithm(_) => "jwt_algorithm",
            JwtError::UnknownKey(_) => "jwt_unknown_key",
            JwtError::Signature => "jwt_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::Issuer(_) => "jwt_issuer",
            JwtError::Audience => "jwt_audience",
            JwtError::Claim(_) => "jwt_claim",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtError::TooLarge => write!(f, "the token is longer than {MAX_TOKEN_BYTES} bytes"),
            JwtError::Malformed(m) => write!(f, "malformed token: {m}"),
            JwtError::Algorithm(a) => write!(
                f,
                "the token's algorithm {a} is not accepted (RS256/384/512, PS256/384/512, ES256/384 are)"
            ),
            JwtError::UnknownKey(Some(kid)) => write!(f, "no key with kid {kid:?} in the JWK set"),
            JwtError::UnknownKey(None) => write!(f, "no key in the JWK set verifies the token"),
            JwtError::Signature => write!(f, "the token's signature does not verify"),
            JwtError::Expired => write!(f, "the token has expired"),
            JwtError::NotYetValid => write!(f, "the token is not valid yet (nbf or iat in the future)"),
            JwtError::Issuer(iss) => write!(f, "the token's issuer {iss:?} is not the expected one"),
            JwtError::Audience => write!(f, "the token is not meant for this audience"),
            JwtError::Claim(m) => write!(f, "invalid claim: {m}"),
        }
    }
}

impl std::error::Error for JwtError {}

/// Whether a credential has the shape of a JWT (three base64url segments).
pub fn looks_like_jwt(s: &str) -> bool {
    let mut parts = 0;
    for part in s.split('.') {
        parts += 1;
        if part.is_empty()
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    parts == 3
}

/// One usable public key of a set.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The algorithm the set pins the key to, if it does.
    alg: Option<Algorithm>,
    rsa: bool,
    curve: Option<Algorithm>,
    key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|pinned| pinned != alg) {
            return false;
        }
        match alg {
            Algorithm::ES256 | Algorithm::ES384 => self.curve == Some(alg),
            _ => self.rsa,
        }
    }
}

/// A JWK set's usable keys (RSA, EC P-256 and P-384 public keys).
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| k.kid.as_deref()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    /// Parses a JWK set (`{"keys": [...]}`). Keys of a type this cannot use
    /// (symmetric, OKP, P-521, encryption keys) are skipped; a set left with
    /// none is an error, as is anything malformed.
    pub fn parse(json: &str) -> Result<KeySet, String> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(format!("the JWK set is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let set: JwkSet = serde_json::from_str(json).map_err(|e| format!("not a JWK set: {e}"))?;
        if set.keys.len() > MAX_KEYS {
            return Err(format!("the JWK set holds more than {MAX_KEYS} keys"));
        }
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if let Some(key) = usable(jwk)? {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(
                "the JWK set has no usable key (RSA, or EC on P-256/P-384, for signatures)".into(),
            );
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, for logs.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }
}

fn usable(jwk: &Jwk) -> Result<Option<Key>, String> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        // KeyAlgorithm's names are the JOSE ones ("RS256").
        Some(a) => match format!("{a:?}").parse::<Algorithm>() {
            Ok(a) if ALLOWED.contains(&a) => Some(a),
            // A key pinned to an algorithm never accepted (HS256, EdDSA,
            // RSA1_5...) is of no use here.
            _ => return Ok(None),
        },
        None => None,
    };
    let kid = jwk.common.key_id.clone();
    let bad = |e: jsonwebtoken::errors::Error| {
        format!("key {}: {e}", kid.as_deref().unwrap_or("without kid"))
    };
    let (rsa, curve) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (true, None),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (false, Some(Algorithm::ES256)),
            EllipticCurve::P384 => (false, Some(Algorithm::ES384)),
            _ => return Ok(None),
        },
        _ => return Ok(None),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(bad)?;
    Ok(Some(Key {
        kid,
        alg,
        rsa,
        curve,
        key,
    }))
}

/// What a token must say to be accepted.
#[derive(Debug, Clone)]
pub struct Expected {
    pub issuer: String,
    /// The token's `aud` must name one of these; empty: not checked.
    pub audiences: Vec<String>,
}

/// Checks `token`: its size and shape, its algorithm, its signature by a key
/// of `keys` (the one its `kid` names, else each key that fits the
/// algorithm), then `iss`, `aud`, `exp` (required), `nbf` and `iat`.
pub fn verify(
    token: &str,
    keys: &KeySet,
    expected: &Expected,
    now_unix: u64,
) -> Result<Claims, JwtError> {
    install_provider();
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    if !looks_like_jwt(token) {
        return Err(JwtError::Malformed(
            "not three base64url segments separated by dots".into(),
        ));
    }
    let (alg, kid) = header(token)?;
    let candidates: Vec<&Key> = match &kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
            .collect(),
        None => keys.keys.iter().collect(),
    };
    let candidates: Vec<&Key> = candidates.into_iter().filter(|k| k.fits(alg)).collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey(kid));
    }
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut last = JwtError::Signature;
    for key in candidates {
        match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => {
                check_claims(&data.claims, expected, now_unix)?;
                return Ok(data.claims);
            }
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::InvalidSignature => JwtError::Signature,
                    ErrorKind::Json(e) => JwtError::Malformed(format!("claims: {e}")),
                    ErrorKind::Base64(e) => JwtError::Malformed(format!("base64: {e}")),
                    ErrorKind::Utf8(e) => JwtError::Malformed(format!("utf-8: {e}")),
                    other => JwtError::Malformed(format!("{other:?}")),
                };
                if !matches!(last, JwtError::Signature) {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

/// The header's `alg` and `kid`, read strictly: `none` and HMAC refused.
fn header(token: &str) -> Result<(Algorithm, Option<String>), JwtError> {
    let segment = token.split('.').next().unwrap_or_default();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    let Some(alg) = value.get("alg").and_then(|a| a.as_str()) else {
        return Err(JwtError::Malformed("header: no alg".into()));
    };
    let parsed = match alg.parse::<Algorithm>() {
        Ok(a) if ALLOWED.contains(&a) => a,
        _ => return Err(JwtError::Algorithm(alg.chars().take(16).collect())),
    };
    if value.get("crit").is_some() {
        return Err(JwtError::Malformed(
            "header: crit extensions are not understood".into(),
        ));
    }
    let kid = match value.get("kid") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed("header: kid is not a string".into())),
    };
    Ok((parsed, kid))
}

fn number(claims: &Claims, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n as u64)),
            _ => Err(JwtError::Claim(format!("{name} is not a NumericDate"))),
        },
    }
}

fn check_claims(claims: &Claims, expected: &Expected, now: u64) -> Result<(), JwtError> {
    match claims.get("iss") {
        Some(serde_json::Value::String(iss)) if *iss == expected.issuer => {}
        Some(serde_json::Value::String(iss)) => {
            return Err(JwtError::Issuer(iss.chars().take(128).collect()))
        }
        Some(_) => return Err(JwtError::Claim("iss is not a string".into())),
        None => return Err(JwtError::Issuer(String::new())),
    }
    let Some(exp) = number(claims, "exp")? else {
        return Err(JwtError::Claim("exp is missing".into()));
    };
    if now >= exp.saturating_add(LEEWAY_SECONDS) {
        return Err(JwtError::Expired);
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = number(claims, name)? {
            if t > now.saturating_add(LEEWAY_SECONDS) {
                return Err(JwtError::NotYetValid);
            }
        }
    }
    if !expected.audiences.is_empty() {
        let aud = audiences(claims)?;
        if !aud
            .iter()
            .any(|a| expected.audiences.iter().any(|e| e == a))
        {
            return Err(JwtError::Audience);
        }
    }
    Ok(())
}

/// The token's `aud` as a list (a string is a list of one).
pub fn audiences(claims: &Claims) -> Result<Vec<&str>, JwtError> {
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(serde_json::Value::String(a)) => Ok(vec![a.as_str()]),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|a| {
                a.as_str()
                    .ok_or_else(|| JwtError::Claim("aud holds a non-string".into()))
            })
            .collect(),
        Some(_) => Err(JwtError::Claim("aud is neither a string nor a list".into())),
    }
}

mod provider;
pub use provider::install_provider;

/// Keys and tokens made for tests (behind the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;

    const ISS: &str = "https://idp.example.com";

    fn expected() -> Expected {
        Expected {
            issuer: ISS.into(),
            audiences: vec!["api".into()],
        }
    }

    fn claims(now: u64) -> serde_json::Value {
        json!({"iss": ISS, "sub": "alice", "aud": ["api", "other"], "exp": now + 600, "iat": now, "groups": ["admin"]})
    }

    #[test]
    fn valid_rs256_and_es256_tokens_verify() {
        let now = now();
        let rsa = rsa("r1");
        let ec = ec("e1");
        let keys = KeySet::parse(&jwks(&[&rsa, &ec])).unwrap();
        assert_eq!(keys.len(), 2);
        for key in [&rsa, &ec] {
            let token = sign(key, &claims(now));
            let c = verify(&token, &keys, &expected(), now).unwrap();
            assert_eq!(c["sub"], "alice");
        }
    }

    #[test]
    fn each_bad_token_is_refused_for_its_reason() {
        let now = now();
        let rsa = rsa("r1");
        let keys = KeySet::parse(&jwks(&[&rsa])).unwrap();
        let reason = |token: &str| verify(token, &keys, &expected(), now).unwrap_err().reason();
        let with = |patch: serde_json::Value| {
            let mut c = claims(now);
            for (k, v) in patch.as_object().unwrap() {
                c[k] = v.clone();
            }
            sign(&rsa, &c)
        };
        assert_eq!(reason(&with(json!({"exp": now - 3600}))), "jwt_expired");
        assert_eq!(
            reason(&with(json!({"nbf": now + 3600}))),
            "jwt_not_yet_valid"
        );
        assert_eq!(reason(&with(json!({"aud": "elsewhere"}))), "jwt_audience");
        assert_eq!(reason(&with(json!({"iss": "https://evil"}))), "jwt_issuer");
        // CVE-2026-25537's shape: a string nbf must not be skipped.
        assert_eq!(reason(&with(json!({"nbf": "99999999999"}))), "jwt_claim");
        assert_eq!(reason(&with(json!({"exp": "99999999999"}))), "jwt_claim");
        let mut no_exp = claims(now);
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(reason(&sign(&rsa, &no_exp)), "jwt_claim");
        // Signed by another key under the same kid.
        let wrong = rsa_other("r1");
        assert_eq!(reason(&sign(&wrong, &claims(now))), "jwt_signature");
        // A kid the set does not hold.
        let unknown = rsa_other("r9");
        assert_eq!(reason(&sign(&unknown, &claims(now))), "jwt_unknown_key");
        // alg: none, unsigned.
        let none = raw(&json!({"alg": "none", "kid": "r1"}), &claims(now), b"");
        assert_eq!(reason(&none), "jwt_malformed"); // empty third segment
        let none = raw(&json!({"alg": "none", "kid": "r1"}), &claims(now), b"x");
        assert_eq!(reason(&none), "jwt_algorithm");
        // HS256 "signed" with the public key's bytes.
        let public = serde_json::to_vec(&rsa.jwk).unwrap();
        assert_eq!(reason(&hs256(&public, "r1", &claims(now))), "jwt_algorithm");
        // Tampered payload: another subject under the original signature.
        let good = sign(&rsa, &claims(now));
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut forged = claims(now);
        forged["sub"] = json!("mallory");
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
        parts[1] = &payload;
        assert_eq!(reason(&parts.join(".")), "jwt_signature");
        // Oversized.
        let big = with(json!({"pad": "x".repeat(MAX_TOKEN_BYTES)}));
        assert_eq!(reason(&big), "jwt_too_large");
        assert_eq!(reason("not a token"), "jwt_malformed");
    }

    #[test]
    fn a_set_of_no_usable_key_or_garbage_is_refused() {
        assert!(KeySet::parse("{}").is_err());
        assert!(KeySet::parse("{\"keys\": []}").is_err());
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(KeySet::parse(oct).unwrap_err().contains("no usable key"));
        assert!(KeySet::parse(&"x".repeat(MAX_JWKS_BYTES + 1)).is_err());
    }

    #[test]
    fn without_kid_each_fitting_key_is_tried() {
        let now = now();
        let a = rsa("a");
        let b = rsa_other("b");
        let keys = KeySet::parse(&jwks(&[&a, &b])).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = None;
        let token = jsonwebtoken::encode(&header, &claims(now), &b.encoding).unwrap();
        assert!(verify(&token, &keys, &expected(), now).is_ok());
    }

    #[test]
    fn audiences_unchecked_when_none_expected() {
        let now = now();
        let k = ec("e");
        let keys = KeySet::parse(&jwks(&[&k])).unwrap();
        let mut c = claims(now);
        c["aud"] = json!("whatever");
        let exp = Expected {
            issuer: ISS.into(),
            audiences: vec![],
        };
        assert!(verify(&sign(&k, &c), &keys, &exp, now).is_ok());
    }
}
