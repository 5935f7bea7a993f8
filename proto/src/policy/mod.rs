//! The policy documents (`apiVersion: remora.dev/v1`), their parsing from
//! multi-document YAML and their validation.
//!
//! The control plane validates every document before it stores anything; the
//! proxy parses the same types out of each snapshot and NACKs one it cannot use.
//! An error names the file, the document and the field.

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
    TelemetryPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::HttpRoute,
        Kind::DestinationPolicy,
        Kind::AuthorizationPolicy,
        Kind::TelemetryPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::HttpRoute => "HTTPRoute",
            Kind::DestinationPolicy => "DestinationPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::TelemetryPolicy => "TelemetryPolicy",
        }
    }

    /// Parses a kind as written in a document or on the command line
    /// (case-insensitive; `route` and `httproute` both name HTTPRoute).
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let l = l.trim_end_matches('s');
        Some(match l {
            "service" | "svc" => Kind::Service,
            "httproute" | "route" => Kind::HttpRoute,
            "destinationpolicy" | "destinationpolicie" => Kind::DestinationPolicy,
            "authorizationpolicy" | "authorizationpolicie" => Kind::AuthorizationPolicy,
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
    TelemetryPolicy(TelemetryPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Service(_) => Kind::Service,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::DestinationPolicy(_) => Kind::DestinationPolicy,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Spec::TelemetryPolicy(_) => Kind::TelemetryPolicy,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::Service(s) => serde_json::to_value(s),
            Spec::HttpRoute(s) => serde_json::to_value(s),
            Spec::DestinationPolicy(s) => serde_json::to_value(s),
            Spec::AuthorizationPolicy(s) => serde_json::to_value(s),
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

    /// Rebuilds a document from a kind, its metadata and its spec as JSON (the
    /// form the store and the snapshot carry), validating it again.
    pub fn from_parts(
        kind: Kind,
        namespace: &str,
        name: &str,
        spec_json: &str,
    ) -> Result<Document, String> {
        let spec: serde_json::Value =
            serde_json::from_str(spec_json).map_err(|e| format!("spec: {e}"))?;
        let metadata = Metadata {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels: BTreeMap::new(),
        };
        let doc = Document {
            spec: parse_spec(kind, spec)?,
            metadata,
        };
        validate(&doc)?;
        Ok(doc)
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
    #[serde(default, skip_serializing_if = "is_false")]
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

fn is_false(b: &bool) -> bool {
    !*b
}

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
    #[serde(default, skip_serializing_if = "is_false")]
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
    #[serde(default, skip_serializing_if = "is_false")]
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

// ------------------------------------------------------------------ parsing

/// Why a document was refused: where it is and which field is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: document {document}{what}: {field}: {message}")]
pub struct ValidationError {
    pub file: String,
    /// 1-based index of the document within its file.
    pub document: usize,
    /// " (Kind namespace/name)" when known.
    pub what: String,
    pub field: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<serde_json::Value>,
    spec: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// How deep a policy document may nest mappings and sequences (flow or
/// block). Real documents need fewer than ten levels; the limit keeps the
/// YAML scanner, whose cost grows with the square of the flow nesting, in
/// linear time.
pub const MAX_NESTING_DEPTH: usize = 64;

mod flow_depth;

/// Parses every document of one YAML file. The first invalid document fails the
/// whole file. A key given twice in one mapping is refused (YAML forbids it),
/// and so is nesting deeper than [`MAX_NESTING_DEPTH`]; both errors name the
/// field and the limit.
///
/// CPU-bound (a megabyte takes tens of milliseconds): async callers should run
/// it on a blocking thread.
pub fn parse_documents(file: &str, content: &str) -> Result<Vec<Document>, ValidationError> {
    if let Err(at) = flow_depth::check(content, MAX_NESTING_DEPTH) {
        return Err(ValidationError {
            file: file.to_string(),
            document: document_at_line(content, at.line),
            what: String::new(),
            field: "(yaml)".into(),
            message: format!(
                "flow collections ([...] and {{...}}) nested more than {MAX_NESTING_DEPTH} deep \
                 at line {} column {} (the nesting limit is {MAX_NESTING_DEPTH})",
                at.line, at.column
            ),
        });
    }
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(content).enumerate() {
        let index = i + 1;
        let err = |what: &str, field: &str, message: String| ValidationError {
            file: file.to_string(),
            document: index,
            what: what.to_string(),
            field: field.to_string(),
            message,
        };
        let path = std::cell::RefCell::new(Vec::new());
        let problem = std::cell::RefCell::new(None);
        let seed = JsonSeed {
            depth: 0,
            path: &path,
            problem: &problem,
        };
        let value: serde_json::Value = match serde::de::DeserializeSeed::deserialize(seed, de) {
            Ok(v) => v,
            Err(e) => {
                // The position the YAML library gives is where the
                // collection being read starts.
                let at = e
                    .location()
                    .map(|l| {
                        format!(
                            " (in the collection at line {} column {})",
                            l.line(),
                            l.column()
                        )
                    })
                    .unwrap_or_default();
                let field = render_path(&path.borrow());
                return Err(match problem.take() {
                    Some(message) => err("", &field, format!("{message}{at}")),
                    None if e.to_string().starts_with("recursion limit exceeded") => err(
                        "",
                        &field,
                        format!(
                            "nested more than {MAX_NESTING_DEPTH} deep{at} (the nesting limit \
                             is {MAX_NESTING_DEPTH})"
                        ),
                    ),
                    None => err("", "(yaml)", e.to_string()),
                });
            }
        };
        if value.is_null() {
            continue; // an empty document, such as after a trailing `---`
        }
        let raw: RawDocument = serde_json::from_value(value)
            .map_err(|e| err("", "(document)", format!("not a mapping: {e}")))?;
        if let Some(extra) = raw.rest.keys().next() {
            return Err(err("", extra, "unknown top-level field".into()));
        }
        match raw.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(err(
                    "",
                    "apiVersion",
                    format!("expected {API_VERSION}, got {other}"),
                ))
            }
            None => return Err(err("", "apiVersion", "missing".into())),
        }
        let kind_s = raw.kind.ok_or_else(|| err("", "kind", "missing".into()))?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_s)
            .ok_or_else(|| {
                err(
                    "",
                    "kind",
                    format!(
                        "unknown kind {kind_s:?} (one of {})",
                        Kind::ALL.map(|k| k.as_str()).join(", ")
                    ),
                )
            })?;
        let metadata: Metadata = match raw.metadata {
            None => return Err(err("", "metadata", "missing".into())),
            Some(m) => serde_path_to_error::deserialize(m)
                .map_err(|e| err("", &format!("metadata.{}", e.path()), e.inner().to_string()))?,
        };
        let what = format!(" ({kind} {}/{})", metadata.namespace, metadata.name);
        let spec = raw
            .spec
            .ok_or_else(|| err(&what, "spec", "missing".into()))?;
        let spec = parse_spec(kind, spec).map_err(|m| split_field(&what, m, &err))?;
        let doc = Document { metadata, spec };
        validate(&doc).map_err(|m| split_field(&what, m, &err))?;
        docs.push(doc);
    }
    Ok(docs)
}

/// The 1-based index of the document that holds 1-based `line`: one more than
/// the `---` lines before it that separate documents (a `---` on the first
/// content line only starts the first one).
fn document_at_line(content: &str, line: usize) -> usize {
    let mut document = 1;
    let mut content_seen = false;
    for text in content.lines().take(line.saturating_sub(1)) {
        let marker = text == "---" || text.starts_with("--- ") || text.starts_with("---\t");
        if marker && content_seen {
            document += 1;
        }
        if !marker && !text.trim().is_empty() && !text.trim_start().starts_with('#') {
            content_seen = true;
        }
    }
    document
}

/// One step of the path to a value: a mapping key or a sequence index.
enum Step {
    Key(String),
    Index(usize),
}

/// `spec.rules[1].backends`, as field names are shown elsewhere.
fn render_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        "(document)".into()
    } else {
        out
    }
}

/// Builds a `serde_json::Value` from YAML as `serde_json::Value::deserialize`
/// does, but refuses a key given twice in one mapping (where that would keep
/// the last value silently) and nesting deeper than [`MAX_NESTING_DEPTH`].
/// `path` follows the value being built, so after an error it names where;
/// `problem` holds the error's own message (the YAML library adds its path
/// and position to whatever a visitor reports).
struct JsonSeed<'a> {
    depth: usize,
    path: &'a std::cell::RefCell<Vec<Step>>,
    problem: &'a std::cell::RefCell<Option<String>>,
}

impl JsonSeed<'_> {
    fn nested(&self) -> Self {
        JsonSeed {
            depth: self.depth + 1,
            path: self.path,
            problem: self.problem,
        }
    }

    fn enter<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.depth >= MAX_NESTING_DEPTH {
            let message =
                format!("nested more than {MAX_NESTING_DEPTH} deep (the nesting limit is {MAX_NESTING_DEPTH})");
            *self.problem.borrow_mut() = Some(message.clone());
            return Err(E::custom(message));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonSeed<'_> {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonSeed<'_> {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v)
            .map_or(serde_json::Value::Null, serde_json::Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.enter()?;
        let mut out = Vec::new();
        loop {
            self.path.borrow_mut().push(Step::Index(out.len()));
            match seq.next_element_seed(self.nested())? {
                Some(v) => out.push(v),
                None => {
                    self.path.borrow_mut().pop();
                    return Ok(serde_json::Value::Array(out));
                }
            }
            self.path.borrow_mut().pop();
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.enter()?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let duplicate = out.contains_key(&key);
            self.path.borrow_mut().push(Step::Key(key.clone()));
            if duplicate {
                let message = format!(
                    "duplicate key {key:?}: it is given more than once in the same mapping"
                );
                *self.problem.borrow_mut() = Some(message.clone());
                return Err(serde::de::Error::custom(message));
            }
            let value = map.next_value_seed(self.nested())?;
            self.path.borrow_mut().pop();
            out.insert(key, value);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Messages from `parse_spec`/`validate` are "field: message".
fn split_field(
    what: &str,
    m: String,
    err: &dyn Fn(&str, &str, String) -> ValidationError,
) -> ValidationError {
    match m.split_once(": ") {
        Some((field, msg)) => err(what, field, msg.to_string()),
        None => err(what, "spec", m),
    }
}

fn parse_spec(kind: Kind, spec: serde_json::Value) -> Result<Spec, String> {
    fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_string()
            } else {
                format!("spec.{path}")
            };
            format!("{field}: {}", e.inner())
        })
    }
    Ok(match kind {
        Kind::Service => Spec::Service(de(spec)?),
        Kind::HttpRoute => Spec::HttpRoute(de(spec)?),
        Kind::DestinationPolicy => Spec::DestinationPolicy(de(spec)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(de(spec)?),
        Kind::TelemetryPolicy => Spec::TelemetryPolicy(de(spec)?),
    })
}

// ------------------------------------------------------------------ validation

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

// ------------------------------------------------------------------ durations

/// Durations are written as in Kubernetes and Envoy: `500ms`, `2s`, `5m`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string().replace(' ', ""))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

pub mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s)
                .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: remora.dev/v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  ports: [{port: 8080, protocol: http}]
---
apiVersion: remora.dev/v1
kind: HTTPRoute
metadata: {name: backend, namespace: shop}
spec:
  service: backend
  rules:
    - matches: [{path: {prefix: /api}, headers: [{name: x-canary, value: "1"}]}]
      backends: [{service: backend, subset: {version: v2}}]
    - backends:
        - {service: backend, subset: {version: v1}, weight: 90}
        - {service: backend, subset: {version: v2}, weight: 10}
      timeout: 2s
      retry: {attempts: 3, perTryTimeout: 500ms, on: [connect-failure, gateway-error, 503], backoff: {base: 25ms, max: 250ms}}
---
"#;

    #[test]
    fn parses_the_design_examples() {
        let docs = parse_documents("f.yaml", GOOD).unwrap();
        assert_eq!(docs.len(), 2);
        let Spec::HttpRoute(r) = &docs[1].spec else {
            panic!("not a route")
        };
        assert_eq!(r.rules[1].timeout, Some(Duration::from_secs(2)));
        assert_eq!(r.rules[1].backends[0].weight, 90);
        // Round trip through the snapshot form.
        let again =
            Document::from_parts(Kind::HttpRoute, "shop", "backend", &docs[1].spec_json()).unwrap();
        assert_eq!(again.spec, docs[1].spec);
    }

    #[test]
    fn names_file_document_and_field() {
        let bad = GOOD.replace("weight: 10", "weight: ten");
        let e = parse_documents("shop.yaml", &bad).unwrap_err();
        assert_eq!(e.file, "shop.yaml");
        assert_eq!(e.document, 2);
        assert_eq!(e.field, "spec.rules[1].backends[1].weight");
        assert!(e.to_string().contains("HTTPRoute shop/backend"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let bad = GOOD.replace("attempts: 3", "attempts: 0");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert_eq!(e.field, "spec.rules[1].retry.attempts");
        let bad = GOOD.replace("prefix: /api", "prefix: api");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].matches[0].path");
        let bad = GOOD.replace("protocol: http}", "protocol: smtp}");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert_eq!(
            (e.document, e.field.as_str()),
            (1, "spec.ports[0].protocol")
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let bad = GOOD.replace("timeout: 2s", "timeuot: 2s");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert!(e.field.starts_with("spec.rules[1]"), "{e}");
        assert!(e.message.contains("timeuot"), "{e}");
        let bad = GOOD.replace("kind: Service", "kind: Servcie");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert_eq!(e.field, "kind");
        let e = parse_documents("x.yaml", "a: [").unwrap_err();
        assert_eq!(e.field, "(yaml)");
    }

    #[test]
    fn a_key_given_twice_is_refused_and_named() {
        let bad = GOOD.replace("timeout: 2s", "timeout: 2s\n      timeout: 5s");
        let e = parse_documents("x.yaml", &bad).unwrap_err();
        assert_eq!(
            (e.document, e.field.as_str()),
            (2, "spec.rules[1].timeout"),
            "{e}"
        );
        assert!(e.message.starts_with("duplicate key \"timeout\""), "{e}");
        let e = parse_documents("x.yaml", "kind: Service\nkind: HTTPRoute\n").unwrap_err();
        assert_eq!(e.field, "kind", "{e}");
        let e = parse_documents("x.yaml", "metadata: {name: a, name: b}\n").unwrap_err();
        assert_eq!(e.field, "metadata.name", "{e}");
        // The same key in two mappings is fine.
        assert!(parse_documents("x.yaml", GOOD).is_ok());
    }

    #[test]
    fn nesting_past_the_limit_is_refused_quickly_and_named() {
        let started = std::time::Instant::now();
        let flow = format!("spec:\n  ports: {}", "[".repeat(200 * 1024));
        let e = parse_documents("x.yaml", &flow).unwrap_err();
        assert_eq!(e.field, "(yaml)");
        assert!(
            e.message
                .contains("nested more than 64 deep at line 2 column 74"),
            "{e}"
        );
        assert!(e.message.contains("nesting limit is 64"), "{e}");
        let maps = format!("---\na: 1\n---\nspec: {}1\n", "{a: ".repeat(100_000));
        let e = parse_documents("x.yaml", &maps).unwrap_err();
        assert_eq!(e.document, 2, "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));

        // Block nesting is held to the same limit, after parsing.
        let mut block = String::from("spec:\n");
        for i in 0..70 {
            block.push_str(&" ".repeat(i + 1));
            block.push_str("a:\n");
        }
        let e = parse_documents("x.yaml", &block).unwrap_err();
        assert!(e.message.starts_with("nested more than 64 deep"), "{e}");
        assert!(e.field.starts_with("spec.a.a.a."), "{e}");
        // 64 levels are fine (as far as nesting goes).
        let ok = format!("a: {}1{}\n", "[".repeat(63), "]".repeat(63));
        let e = parse_documents("x.yaml", &ok).unwrap_err();
        assert!(!e.message.contains("nest"), "{e}");
    }
}
