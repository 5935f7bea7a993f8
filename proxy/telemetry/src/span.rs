//! A span as the proxy records it: one per request on each side (client outbound,
//! server inbound) and one per sampled TCP connection, named and attributed after
//! OpenTelemetry's HTTP and RPC semantic conventions plus Remora's own attributes.
//!
//! Only sampled requests build a `SpanRecord`; the exporter converts it to OTLP on its
//! own task, so the request path pays for a few small allocations and nothing more.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::SystemTime;

use http::{header, HeaderMap, HeaderValue, Method, Request, Uri, Version};

use crate::context::TraceContext;

/// Semantic-convention attribute keys.
pub mod attr {
    /// HTTP request method (`GET`).
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    /// HTTP response status code.
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    /// Request path, without the query.
    pub const URL_PATH: &str = "url.path";
    /// Host the request is addressed to.
    pub const SERVER_ADDRESS: &str = "server.address";
    /// Port the request is addressed to.
    pub const SERVER_PORT: &str = "server.port";
    /// `1.0`, `1.1` or `2`.
    pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
    /// `tcp` on TCP connection spans.
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    /// Peer address of a TCP connection.
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    /// Peer port of a TCP connection.
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    /// `grpc` on gRPC spans.
    pub const RPC_SYSTEM: &str = "rpc.system";
    /// Full gRPC service name (`pkg.Service`).
    pub const RPC_SERVICE: &str = "rpc.service";
    /// gRPC method name.
    pub const RPC_METHOD: &str = "rpc.method";
    /// gRPC status code.
    pub const RPC_GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
    /// The matched route's name.
    pub const REMORA_ROUTE: &str = "remora.route";
    /// The destination service.
    pub const REMORA_DESTINATION: &str = "remora.destination";
    /// The peer's mTLS identity.
    pub const REMORA_PEER_IDENTITY: &str = "remora.peer.identity";
    /// Attempts made (1 without retries).
    pub const REMORA_ATTEMPTS: &str = "remora.attempts";
    /// Circuit breaker state of the endpoint used (`closed` | `open` | `half_open`).
    pub const REMORA_CIRCUIT_STATE: &str = "remora.circuit_state";
    /// The `x-remora-error` cause.
    pub const REMORA_ERROR: &str = "remora.error";
    /// On a `retry` event: the attempt number (2 for the first retry).
    pub const REMORA_ATTEMPT: &str = "remora.attempt";
    /// On a `retry` event: why the previous attempt was retried.
    pub const REMORA_RETRY_REASON: &str = "remora.retry.reason";
}

/// Span kind: which side of the call this span records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// The outbound side: the proxy calls the destination.
    Client,
    /// The inbound side: the proxy receives the call for its workload.
    Server,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue {
    /// A string.
    Str(Cow<'static, str>),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
}

impl From<&'static str> for AttributeValue {
    fn from(v: &'static str) -> Self {
        AttributeValue::Str(Cow::Borrowed(v))
    }
}
impl From<String> for AttributeValue {
    fn from(v: String) -> Self {
        AttributeValue::Str(Cow::Owned(v))
    }
}
impl From<Cow<'static, str>> for AttributeValue {
    fn from(v: Cow<'static, str>) -> Self {
        AttributeValue::Str(v)
    }
}
impl From<i64> for AttributeValue {
    fn from(v: i64) -> Self {
        AttributeValue::Int(v)
    }
}
impl From<u32> for AttributeValue {
    fn from(v: u32) -> Self {
        AttributeValue::Int(i64::from(v))
    }
}
impl From<u16> for AttributeValue {
    fn from(v: u16) -> Self {
        AttributeValue::Int(i64::from(v))
    }
}
impl From<bool> for AttributeValue {
    fn from(v: bool) -> Self {
        AttributeValue::Bool(v)
    }
}

/// A timestamped event within a span, e.g. `retry`.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanEvent {
    /// Event name.
    pub name: &'static str,
    /// When it happened.
    pub time: SystemTime,
    /// Its attributes.
    pub attributes: Vec<(&'static str, AttributeValue)>,
}

/// Span status.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SpanStatus {
    /// Nothing to report (the OpenTelemetry default for successful calls).
    #[default]
    Unset,
    /// Explicitly successful.
    Ok,
    /// Failed, with a message.
    Error(Cow<'static, str>),
}

/// A span, built while the request runs and submitted to the exporter when it ends.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    /// `GET route-name`, `pkg.Service/Method`, `tcp destination`.
    pub name: Cow<'static, str>,
    /// Client or server.
    pub kind: SpanKind,
    /// Trace id.
    pub trace_id: [u8; 16],
    /// This span's id.
    pub span_id: [u8; 8],
    /// The parent span's id, if any.
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C tracestate of the trace, if any.
    pub tracestate: Option<HeaderValue>,
    /// Start time.
    pub start: SystemTime,
    /// End time (set by [`SpanRecord::finish`]).
    pub end: SystemTime,
    /// Attributes, each key at most once.
    pub attributes: Vec<(&'static str, AttributeValue)>,
    /// Events in time order.
    pub events: Vec<SpanEvent>,
    /// Status.
    pub status: SpanStatus,
}

impl SpanRecord {
    /// A span starting now. `ctx` is this span's own context (its `span_id` is this
    /// span's id); `parent_span_id` is the caller's span, `None` for a root span.
    pub fn start(kind: SpanKind, ctx: &TraceContext, parent_span_id: Option<[u8; 8]>) -> Self {
        let now = SystemTime::now();
        SpanRecord {
            name: Cow::Borrowed(""),
            kind,
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent_span_id,
            tracestate: ctx.tracestate.clone(),
            start: now,
            end: now,
            attributes: Vec::with_capacity(16),
            events: Vec::new(),
            status: SpanStatus::Unset,
        }
    }

    /// Sets an attribute, replacing an earlier value of the same key.
    pub fn set_attribute(&mut self, key: &'static str, value: impl Into<AttributeValue>) {
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.attributes.push((key, value)),
        }
    }

    /// The value of an attribute.
    pub fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// Names and attributes the span after a request: HTTP (`GET route`, method,
    /// path, server address and port, protocol version) or, for gRPC
    /// (`content-type: application/grpc*`), RPC (`pkg.Service/Method`, `rpc.*`).
    /// `route` is the matched route's NAME, never the raw path.
    pub fn record_request<B>(&mut self, req: &Request<B>, route: Option<&str>) {
        self.record_request_parts(req.method(), req.uri(), req.version(), req.headers(), route);
    }

    /// [`SpanRecord::record_request`] from the request's parts.
    pub fn record_request_parts(
        &mut self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        route: Option<&str>,
    ) {
        let path = uri.path();
        let grpc = if is_grpc(headers) {
            grpc_service_method(path)
        } else {
            None
        };
        self.name = match (grpc, route) {
            (Some((service, method)), _) => Cow::Owned(format!("{service}/{method}")),
            (None, Some(route)) if !route.is_empty() => Cow::Owned(format!("{method} {route}")),
            (None, _) => Cow::Owned(method.as_str().to_owned()),
        };
        if let Some((service, rpc_method)) = grpc {
            self.set_attribute(attr::RPC_SYSTEM, "grpc");
            self.set_attribute(attr::RPC_SERVICE, service.to_owned());
            self.set_attribute(attr::RPC_METHOD, rpc_method.to_owned());
        }
        self.set_attribute(attr::HTTP_REQUEST_METHOD, method_value(method));
        self.set_attribute(attr::URL_PATH, path.to_owned());
        if let Some((host, port)) = server_address(uri, headers) {
            self.set_attribute(attr::SERVER_ADDRESS, host);
            if let Some(port) = port {
                self.set_attribute(attr::SERVER_PORT, port);
            }
        }
        if let Some(v) = protocol_version(version) {
            self.set_attribute(attr::NETWORK_PROTOCOL_VERSION, v);
        }
        if let Some(route) = route {
            self.set_attribute(attr::REMORA_ROUTE, route.to_owned());
        }
    }

    /// Names and attributes the span after a TCP connection to `destination`.
    pub fn record_tcp(&mut self, peer: SocketAddr, destination: &str) {
        self.name = Cow::Owned(format!("tcp {destination}"));
        self.set_attribute(attr::NETWORK_TRANSPORT, "tcp");
        self.set_attribute(attr::NETWORK_PEER_ADDRESS, peer.ip().to_string());
        self.set_attribute(attr::NETWORK_PEER_PORT, peer.port());
        self.set_attribute(attr::REMORA_DESTINATION, destination.to_owned());
    }

    /// Records the HTTP status; 5xx (and 4xx on a client span) set the status to
    /// Error, per the HTTP semantic conventions.
    pub fn record_status(&mut self, status: u16) {
        self.set_attribute(attr::HTTP_RESPONSE_STATUS_CODE, status);
        let error = status >= 500 || (self.kind == SpanKind::Client && status >= 400);
        if error && self.status == SpanStatus::Unset {
            self.status = SpanStatus::Error(Cow::Owned(format!("HTTP {status}")));
        }
    }

    /// Records the gRPC status; per the RPC semantic conventions any non-OK code is an
    /// error on a client span, and UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
    /// UNAVAILABLE and DATA_LOSS on a server span.
    pub fn record_grpc_status(&mut self, code: u16) {
        self.set_attribute(attr::RPC_GRPC_STATUS_CODE, code);
        let error = match self.kind {
            SpanKind::Client => code != 0,
            SpanKind::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
        };
        if error && !matches!(self.status, SpanStatus::Error(_)) {
            self.status = SpanStatus::Error(Cow::Owned(format!("gRPC status {code}")));
        }
    }

    /// Records the `x-remora-error` cause and marks the span as failed with it.
    pub fn record_error(&mut self, cause: impl Into<Cow<'static, str>>) {
        let cause = cause.into();
        self.set_attribute(attr::REMORA_ERROR, cause.clone());
        self.status = SpanStatus::Error(cause);
    }

    /// Records a retry: a `retry` event with the number of the attempt about to be
    /// made (2 for the first retry) and the reason, and `remora.attempts`.
    pub fn record_retry(&mut self, attempt: u32, reason: &'static str) {
        self.events.push(SpanEvent {
            name: "retry",
            time: SystemTime::now(),
            attributes: vec![
                (attr::REMORA_ATTEMPT, attempt.into()),
                (attr::REMORA_RETRY_REASON, reason.into()),
            ],
        });
        self.set_attribute(attr::REMORA_ATTEMPTS, attempt);
    }

    /// Sets `remora.destination`, `remora.peer.identity`, `remora.attempts` and
    /// `remora.circuit_state` where given.
    pub fn record_remora(
        &mut self,
        destination: Option<&str>,
        peer_identity: Option<&str>,
        attempts: Option<u32>,
        circuit_state: Option<&'static str>,
    ) {
        if let Some(d) = destination {
            self.set_attribute(attr::REMORA_DESTINATION, d.to_owned());
        }
        if let Some(p) = peer_identity {
            self.set_attribute(attr::REMORA_PEER_IDENTITY, p.to_owned());
        }
        if let Some(a) = attempts {
            self.set_attribute(attr::REMORA_ATTEMPTS, a);
        }
        if let Some(c) = circuit_state {
            self.set_attribute(attr::REMORA_CIRCUIT_STATE, c);
        }
    }

    /// Ends the span now.
    pub fn finish(&mut self) {
        self.end = SystemTime::now();
    }
}

/// Whether the request is gRPC (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
pub fn grpc_service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let ok = |s: &str| !s.is_empty() && !s.contains('/');
    (ok(service) && ok(method)).then_some((service, method))
}

/// The method for `http.request.method`: known methods as is, others `_OTHER`
/// (bounded, per semconv).
fn method_value(method: &Method) -> AttributeValue {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    if KNOWN.contains(method) {
        AttributeValue::Str(Cow::Owned(method.as_str().to_owned()))
    } else {
        AttributeValue::from("_OTHER")
    }
}

fn protocol_version(version: Version) -> Option<&'static str> {
    match version {
        Version::HTTP_10 => Some("1.0"),
        Version::HTTP_11 => Some("1.1"),
        Version::HTTP_2 => Some("2"),
        Version::HTTP_3 => Some("3"),
        _ => None,
    }
}

/// Host and port from the URI's authority, else from the `Host` header.
fn server_address(uri: &Uri, headers: &HeaderMap) -> Option<(String, Option<u16>)> {
    if let Some(authority) = uri.authority() {
        return Some((authority.host().to_owned(), authority.port_u16()));
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = host.parse().ok()?;
    Some((authority.host().to_owned(), authority.port_u16()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_attr(span: &SpanRecord, key: &str) -> Option<String> {
        match span.attribute(key)? {
            AttributeValue::Str(s) => Some(s.to_string()),
            AttributeValue::Int(i) => Some(i.to_string()),
            AttributeValue::Bool(b) => Some(b.to_string()),
        }
    }

    #[test]
    fn http_span_named_after_method_and_route_name() {
        let ctx = TraceContext::new_root(true);
        let mut span = SpanRecord::start(SpanKind::Client, &ctx, None);
        let req = Request::get("/api/users/42?token=secret")
            .header("host", "users.default:8080")
            .body(())
            .unwrap();
        span.record_request(&req, Some("users-api"));
        assert_eq!(span.name, "GET users-api");
        assert_eq!(str_attr(&span, attr::HTTP_REQUEST_METHOD).unwrap(), "GET");
        assert_eq!(str_attr(&span, attr::URL_PATH).unwrap(), "/api/users/42");
        assert_eq!(
            str_attr(&span, attr::SERVER_ADDRESS).unwrap(),
            "users.default"
        );
        assert_eq!(str_attr(&span, attr::SERVER_PORT).unwrap(), "8080");
        assert_eq!(
            str_attr(&span, attr::NETWORK_PROTOCOL_VERSION).unwrap(),
            "1.1"
        );
        assert_eq!(str_attr(&span, attr::REMORA_ROUTE).unwrap(), "users-api");
        assert_eq!(span.attribute(attr::RPC_SYSTEM), None);

        let mut span = SpanRecord::start(SpanKind::Server, &ctx, None);
        let req = Request::builder()
            .method("PURGE")
            .uri("http://cache:80/x")
            .body(())
            .unwrap();
        span.record_request(&req, None);
        assert_eq!(span.name, "PURGE");
        assert_eq!(
            str_attr(&span, attr::HTTP_REQUEST_METHOD).unwrap(),
            "_OTHER"
        );
        assert_eq!(str_attr(&span, attr::SERVER_ADDRESS).unwrap(), "cache");
    }

    #[test]
    fn grpc_span_named_after_service_and_method() {
        let ctx = TraceContext::new_root(true);
        let mut span = SpanRecord::start(SpanKind::Server, &ctx, Some([1; 8]));
        let req = Request::post("/remora.v1.Echo/Say")
            .version(Version::HTTP_2)
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        span.record_request(&req, Some("echo"));
        assert_eq!(span.name, "remora.v1.Echo/Say");
        assert_eq!(str_attr(&span, attr::RPC_SYSTEM).unwrap(), "grpc");
        assert_eq!(
            str_attr(&span, attr::RPC_SERVICE).unwrap(),
            "remora.v1.Echo"
        );
        assert_eq!(str_attr(&span, attr::RPC_METHOD).unwrap(), "Say");
        assert_eq!(
            str_attr(&span, attr::NETWORK_PROTOCOL_VERSION).unwrap(),
            "2"
        );

        span.record_grpc_status(5); // NOT_FOUND: not a server error
        assert_eq!(span.status, SpanStatus::Unset);
        span.record_grpc_status(14);
        assert!(matches!(span.status, SpanStatus::Error(_)));

        let mut client = SpanRecord::start(SpanKind::Client, &ctx, None);
        client.record_grpc_status(5);
        assert!(matches!(client.status, SpanStatus::Error(_)));
    }

    #[test]
    fn grpc_detection_and_path_parsing() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web"),
        );
        assert!(!is_grpc(&h));
        assert_eq!(grpc_service_method("/a.B/C"), Some(("a.B", "C")));
        for bad in ["", "/", "/a.B", "/a.B/", "//C", "/a/B/C", "a.B/C"] {
            assert_eq!(grpc_service_method(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_rules_follow_semconv() {
        let ctx = TraceContext::new_root(true);
        let mut server = SpanRecord::start(SpanKind::Server, &ctx, None);
        server.record_status(404);
        assert_eq!(server.status, SpanStatus::Unset);
        server.record_status(503);
        assert!(matches!(server.status, SpanStatus::Error(_)));

        let mut client = SpanRecord::start(SpanKind::Client, &ctx, None);
        client.record_status(404);
        assert!(matches!(client.status, SpanStatus::Error(_)));

        let mut failed = SpanRecord::start(SpanKind::Client, &ctx, None);
        failed.record_error("upstream_timeout");
        failed.record_status(504);
        assert_eq!(failed.status, SpanStatus::Error("upstream_timeout".into()));
        assert_eq!(
            str_attr(&failed, attr::REMORA_ERROR).unwrap(),
            "upstream_timeout"
        );
    }

    #[test]
    fn retries_become_events() {
        let ctx = TraceContext::new_root(true);
        let mut span = SpanRecord::start(SpanKind::Client, &ctx, None);
        span.record_retry(2, "5xx");
        span.record_retry(3, "reset");
        span.record_remora(
            Some("users"),
            Some("spiffe://x/ns/a/sa/b"),
            None,
            Some("closed"),
        );
        span.finish();
        assert_eq!(span.events.len(), 2);
        assert_eq!(span.events[1].name, "retry");
        assert_eq!(
            span.events[1].attributes,
            vec![
                (attr::REMORA_ATTEMPT, AttributeValue::Int(3)),
                (attr::REMORA_RETRY_REASON, AttributeValue::from("reset")),
            ]
        );
        assert_eq!(str_attr(&span, attr::REMORA_ATTEMPTS).unwrap(), "3");
        assert_eq!(
            str_attr(&span, attr::REMORA_CIRCUIT_STATE).unwrap(),
            "closed"
        );
        assert!(span.end >= span.start);
        // Keys stay unique.
        let keys: Vec<_> = span.attributes.iter().map(|(k, _)| *k).collect();
        let mut dedup = keys.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(keys.len(), dedup.len());
    }

    #[test]
    fn tcp_span() {
        let ctx = TraceContext::new_root(true);
        let mut span = SpanRecord::start(SpanKind::Client, &ctx, None);
        span.record_tcp("10.0.0.7:5432".parse().unwrap(), "db");
        assert_eq!(span.name, "tcp db");
        assert_eq!(str_attr(&span, attr::NETWORK_PEER_PORT).unwrap(), "5432");
        assert_eq!(
            str_attr(&span, attr::NETWORK_PEER_ADDRESS).unwrap(),
            "10.0.0.7"
        );
    }
}
