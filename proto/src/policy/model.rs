//! The document types: [`Kind`], [`Metadata`], [`Document`], [`Spec`],
//! [`ResourceKey`] and the spec of every kind.

use super::authn::{Condition, RequestAuthenticationSpec};
use super::{duration, opt_duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub const API_VERSION: &str = "remora.dev/v1";

/// The kinds of policy document, in the order they are listed and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    DestinationPolicy,
    AuthorizationPolicy,
    RequestAuthentication,
    TelemetryPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::HttpRoute,
        Kind::DestinationPolicy,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::TelemetryPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::DestinationPolicy => "DestinationPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::TelemetryPolicy => "TelemetryPolicy",
        }
    }

    /// Parses a kind as written in a document or on the command line
    /// (case-insensitive; `route` and `httproute` both name HTTPRoute,
    /// `requestauthn` and `requestauthentication` RequestAuthentication).
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let l = l.trim_end_matches('s');
        Some(match l {
            "service" | "svc" => Kind::Service,
            "httproute" | "route" => Kind::HttpRoute,
            "destinationpolicy" | "destinationpolicie" => Kind::DestinationPolicy,
            "authorizationpolicy" | "authorizationpolicie" => Kind::AuthorizationPolicy,
            "requestauthentication" | "requestauthn" => Kind::RequestAuthentication,
            "telemetrypolicy" | "telemetrypolicie" => Kind::TelemetryPolicy,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// One validated policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Service(ServiceSpec),
    HttpRoute(HttpRouteSpec),
    DestinationPolicy(DestinationPolicySpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
    RequestAuthentication(RequestAuthenticationSpec),
    TelemetryPolicy(TelemetryPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Service(_) => Kind::Service,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::DestinationPolicy(_) => Kind::DestinationPolicy,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::RequestAuthentication(_) => Kind::RequestAuthentication,
            Spec::TelemetryPolicy(_) => Kind::TelemetryPolicy,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::Service(s) => serde_json::to_value(s),
            Spec::HttpRoute(s) => serde_json::to_value(s),
            Spec::DestinationPolicy(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
            Spec::RequestAuthentication(s) => serde_json::to_value(s),
            Spec::TelemetryPolicy(s) => serde_json::to_value(s),
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

impl Document {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind(),
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
        }
    }

    /// The spec alone, as canonical JSON (what a snapshot's `Resource.spec_json` holds).
    pub fn spec_json(&self) -> String {
        self.spec.to_json().to_string()
    }

    /// The whole document as a JSON value (apiVersion, kind, metadata, spec).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": self.kind().as_str(),
            "metadata": self.metadata,
            "spec": self.spec.to_json(),
        })
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.to_value()).unwrap_or_default()
    }
}

/// Identifies a document in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

// ------------------------------------------------------------------ specs

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    /// Virtual addresses (like a ClusterIP) that transparent-mode clients may dial;
    /// the endpoints' own addresses always match too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    /// The application's port behind this service port (defaults to `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An opaque TCP (or upgraded) connection on this port with no bytes
    /// either way for this long is closed (default: the proxy's
    /// `--tcp-idle-timeout`, 1h).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<Duration>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub service: String,
    /// Only this service port, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one match selects the rule; no matches selects every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Critical routes get a reserved share of the destination's capacity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub critical: bool,
    /// Used when the primary backends have no healthy endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Backend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultInjection>,
    /// The protocols a request of this rule may upgrade its connection to
    /// (HTTP/1.1 `Upgrade`). Unset: `[websocket]`; `[]`: no upgrade at all.
    /// `h2c` is never forwarded (its `Upgrade` header is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<Vec<String>>,
}

/// What a rule allows when it names no `upgrades`.
pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backend {
    pub service: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Endpoint labels that select a subset, such as `{version: v2}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (Gateway API's and Istio's meaning): a
    /// request is tried at most `attempts + 1` times.
    pub attempts: u32,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Conditions: names from [`RETRY_ON`] or HTTP status codes (`503` or `"503"`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strings_or_numbers"
    )]
    pub on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Retry non-idempotent methods after the request was sent, too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_idempotent: bool,
}

fn strings_or_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        S(String),
        N(u64),
    }
    let items = Vec::<Item>::deserialize(d)?;
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::S(s) => s,
            Item::N(n) => n.to_string(),
        })
        .collect())
}

/// The retry conditions a route may name, besides HTTP status codes (100-599).
pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "unavailable",
    "resource-exhausted",
    "cancelled",
    "deadline-exceeded",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    #[serde(with = "duration")]
    pub base: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "duration")]
    pub fixed: Duration,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    pub status: u16,
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    #[default]
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationPolicySpec {
    pub service: String,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreaker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    #[serde(with = "duration")]
    pub open_for: Duration,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_open_for: Option<Duration>,
    #[serde(default = "one")]
    pub half_open_requests: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Share (0..1) of the limits reserved for `critical` routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical_reserve: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    pub ratio: f64,
    #[serde(default)]
    pub min_per_second: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub service: String,
    #[serde(default)]
    pub mtls: MtlsMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Source SPIFFE identities; empty means any authenticated identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// Allowed operations; empty means every operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthorizationTo>,
    /// Conditions on the request's validated token (see
    /// `RequestAuthentication`): the rule matches only if every one holds.
    /// Empty: no condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationTo {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Separate buckets per source identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_identity: bool,
    /// Only requests to these paths (`/api/*` prefixes allowed) count against
    /// this limit: a per-route limit. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetryPolicySpec {
    /// Trace sampling rate for requests without a sampled parent (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_logs: Option<bool>,
}
