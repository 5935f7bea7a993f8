//! Request authentication: the `RequestAuthentication` kind (which JWTs a
//! service accepts, where they are read from, what is passed on), and the
//! `when` conditions an `AuthorizationPolicy` rule places on what a validated
//! token says.

use serde::{Deserialize, Serialize};

/// The end-user tokens (JWTs) a service's sidecar validates: one rule per
/// issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub service: String,
    /// One rule per issuer (at most [`MAX_JWT_RULES`]).
    pub jwt_rules: Vec<JwtRule>,
}

/// The most `jwtRules` one document may hold.
pub const MAX_JWT_RULES: usize = 16;
/// The most `outputClaimToHeaders` one rule may hold.
pub const MAX_CLAIM_HEADERS: usize = 32;
/// The most `values` (and, apart, `notValues`) one condition may hold.
pub const MAX_CONDITION_VALUES: usize = 64;

/// The tokens of one issuer, and how to check them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    /// The token's `iss` must equal this.
    pub issuer: String,
    /// The token's `aud` must name one of these. Empty: `aud` is not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The issuer's public keys inline: a JWK set as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Or where the control plane fetches them (exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Headers the token is read from. With `fromCookies` also empty, it is
    /// read from `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Cookies the token is read from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Pass the token on to the application (default: it is not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// Claims copied into request headers for the application.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

/// A header that carries a token, after an optional prefix (`"Bearer "`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Copies a claim of a validated token into a request header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// One condition of an `AuthorizationPolicy` rule's `when`: it holds if the
/// value under `key` equals one of `values` (when any are given) and none of
/// `notValues`; `*` matches any present value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// `request.auth.principal` or `request.auth.claims[NAME]`.
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// What a [`Condition`] looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConditionKey {
    /// `request.auth.principal`: `<iss>/<sub>` of the validated token.
    Principal,
    /// `request.auth.claims[NAME]`: the token's top-level claim `NAME` (a
    /// string, or any element of a list of strings).
    Claim(String),
}

impl ConditionKey {
    pub const PRINCIPAL: &'static str = "request.auth.principal";
    const CLAIMS_PREFIX: &'static str = "request.auth.claims[";

    /// Parses a condition key as written in a document.
    pub fn parse(key: &str) -> Result<ConditionKey, String> {
        if key == Self::PRINCIPAL {
            return Ok(ConditionKey::Principal);
        }
        let name = key
            .strip_prefix(Self::CLAIMS_PREFIX)
            .and_then(|rest| rest.strip_suffix(']'))
            .ok_or_else(|| {
                "must be request.auth.principal or request.auth.claims[NAME]".to_string()
            })?;
        if name.is_empty() {
            return Err("the claim name in request.auth.claims[NAME] must not be empty".into());
        }
        if name.contains(['[', ']']) {
            return Err(
                "the claim name in request.auth.claims[NAME] must not contain '[' or ']'".into(),
            );
        }
        Ok(ConditionKey::Claim(name.to_string()))
    }
}

impl Condition {
    /// The key, parsed (validation refuses a document whose key does not parse).
    pub fn parsed_key(&self) -> Result<ConditionKey, String> {
        ConditionKey::parse(&self.key)
    }
}
