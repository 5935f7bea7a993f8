//! What the proxy records about each request and TCP connection: the trace
//! context it continues and passes on, its span, its metrics and its access-log
//! line. The request path calls [`Observed::begin`] first and
//! [`Observed::respond`] with the answer, which records it at once, or when
//! its streamed body ends (a `body::OnEnd` hook on the answer's body);
//! everything in between fills in what it learns (route, destination,
//! endpoint, attempts, error cause).

use crate::transport::body::{End, OnEnd, ProxyBody, Tally, Upload};
use crate::transport::error::Cause;
use crate::transport::tcp::Relayed;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use remora_proto::policy::TelemetryPolicySpec;
use remora_telemetry::{
    AccessLogEntry, AccessLogHandle, ExporterHandle, Metrics, RequestMetrics, Sampler, SpanKind,
    SpanRecord, TraceContext,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The proxy's telemetry sinks.
pub struct Telemetry {
    pub metrics: Option<Metrics>,
    pub exporter: Option<ExporterHandle>,
    pub access_log: Option<AccessLogHandle>,
    pub sampler: Sampler,
    /// For requests that fail before they are routed.
    pub unrouted: Arc<RequestMetrics>,
    /// `--trace-sampling` and `--access-log`: what holds until a
    /// TelemetryPolicy says otherwise.
    defaults: (f64, bool),
}

impl Telemetry {
    /// The proxy's sinks; spans are sampled at `sampling` and access logs
    /// written when `access_logs`, until a TelemetryPolicy says otherwise.
    pub fn new(
        metrics: Option<Metrics>,
        exporter: Option<ExporterHandle>,
        access_log: Option<AccessLogHandle>,
        sampling: f64,
        access_logs: bool,
    ) -> Telemetry {
        Telemetry {
            metrics,
            exporter,
            access_log,
            sampler: Sampler::new(sampling),
            unrouted: Arc::new(RequestMetrics::new(
                remora_telemetry::OUTBOUND,
                "unknown",
                "unknown",
                "unknown",
            )),
            defaults: (sampling, access_logs),
        }
    }

    /// Sinks that record nothing (unit tests).
    pub fn disabled() -> Telemetry {
        Telemetry::new(None, None, None, 0.0, false)
    }

    /// The TelemetryPolicy of this proxy's namespace, from a new snapshot
    /// (none: the flags' settings again).
    pub fn apply(&self, policy: Option<&TelemetryPolicySpec>) {
        let (sampling, access_logs) = self.defaults;
        self.sampler
            .set_rate(policy.and_then(|t| t.sampling_rate).unwrap_or(sampling));
        if let Some(log) = &self.access_log {
            log.set_enabled(policy.and_then(|t| t.access_logs).unwrap_or(access_logs));
        }
    }

    pub fn render_metrics(&self) -> String {
        self.metrics
            .as_ref()
            .map(Metrics::render)
            .unwrap_or_default()
    }

    fn logging(&self) -> Option<&AccessLogHandle> {
        self.access_log.as_ref().filter(|l| l.enabled())
    }
}

/// One request in flight. Recorded exactly once, whatever ends it: its
/// answer's end, a broken response, or the client going away (the request's
/// future or its response body dropped), which is recorded as `client-reset`.
pub struct Observed {
    telemetry: Arc<Telemetry>,
    started: Instant,
    direction: &'static str,
    ctx: TraceContext,
    // Boxed: only sampled requests have a span, only logged ones a log line,
    // and `Observed` moves with every request (into the response body's tail).
    span: Option<Box<SpanRecord>>,
    log: Option<Box<AccessLogEntry>>,
    pub metrics: Option<Arc<RequestMetrics>>,
    pub attempts: u32,
    pub error: Option<Cause>,
    pub upstream: Option<SocketAddr>,
    pub upstream_time: Option<Duration>,
    pub destination: Option<Arc<str>>,
    pub peer: Option<Arc<str>>,
    pub circuit_state: Option<&'static str>,
    /// A gRPC call (`content-type: application/grpc...`): answered with gRPC
    /// statuses, and its `grpc-status` recorded.
    pub grpc: bool,
    /// The client's request body as it streamed (none: it had none).
    upload: Option<Arc<Tally>>,
    recorded: bool,
}

impl Observed {
    /// Continues (or starts) the trace and passes the proxy's own span on as
    /// the parent of the next hop.
    pub fn begin<B>(
        telemetry: &Arc<Telemetry>,
        kind: SpanKind,
        direction: &'static str,
        req: &mut Request<B>,
    ) -> Observed {
        let tel = telemetry;
        let grpc = remora_telemetry::span::is_grpc(req.headers());
        let parent = remora_telemetry::extract(req.headers());
        let sampled = tel.sampler.decide(parent.as_ref());
        let ctx = TraceContext::next(parent.as_ref(), sampled);
        remora_telemetry::inject(req.headers_mut(), &ctx);
        let span = (sampled && tel.exporter.is_some()).then(|| {
            let mut span =
                SpanRecord::start(kind, &ctx, parent.as_ref().and_then(|p| p.as_parent()));
            // Named again once routed; a request that fails first keeps this.
            span.record_request(req, None);
            Box::new(span)
        });
        let log = tel.logging().map(|_| {
            let protocol = if grpc {
                "grpc"
            } else if req.version() == http::Version::HTTP_2 {
                "http/2"
            } else {
                "http/1.1"
            };
            let mut e = AccessLogEntry::new(direction, protocol);
            e.method = Some(req.method().clone());
            e.authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
                req.headers()
                    .get(http::header::HOST)?
                    .to_str()
                    .ok()
                    .map(str::to_string)
            });
            e.path = Some(req.uri().path().to_string());
            Box::new(e)
        });
        Observed {
            telemetry: telemetry.clone(),
            started: Instant::now(),
            direction,
            ctx,
            span,
            log,
            metrics: None,
            attempts: 0,
            error: None,
            upstream: None,
            upstream_time: None,
            destination: None,
            peer: None,
            circuit_state: None,
            grpc,
            upload: None,
            recorded: false,
        }
    }

    /// The client's request body, counted as it streams upstream.
    pub fn upload(&mut self, body: Incoming) -> Upload {
        let tally = (!body.is_end_stream()).then(|| Arc::new(Tally::default()));
        self.upload = tally.clone();
        Upload::new(body, tally)
    }

    /// How the client's request body failed, if it did: a failed exchange is
    /// then the client's, not the upstream's.
    pub fn client_failure(&self) -> Option<Cause> {
        self.upload.as_ref()?.failure().map(Cause::from)
    }

    /// Whether anything records the upstream's own time (the access log).
    pub fn times_upstream(&self) -> bool {
        self.log.is_some()
    }

    /// The request has been routed: name the span after the route.
    pub fn routed<B>(&mut self, req: &Request<B>, route: &str, metrics: Arc<RequestMetrics>) {
        if let Some(span) = self.span.as_mut() {
            span.record_request(req, Some(route));
        }
        if let Some(log) = self.log.as_mut() {
            log.route = Some(Arc::from(route));
        }
        self.metrics = Some(metrics);
    }

    /// Records one more attempt after the first, with why it was retried.
    pub fn retried(&mut self, reason: &'static str) {
        self.attempts += 1;
        if let Some(span) = self.span.as_mut() {
            span.record_retry(self.attempts, reason);
        }
        if let Some(m) = &self.metrics {
            m.retry(reason);
        }
    }

    /// The answer's head is known: record now if its body is the proxy's own
    /// or empty, else when the streamed body ends (its duration, bytes and
    /// trailers) or is abandoned.
    pub fn respond(self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        let grpc_status = if self.grpc {
            remora_resilience::grpc_status_of(resp.headers())
        } else {
            None
        };
        let size = resp.body().size_hint().exact();
        match resp.body_mut().tail() {
            Some(tail) if !tail.ended() => tail.on_end(Box::new(Pending {
                obs: self,
                status,
                grpc_status,
                bytes: 0,
            })),
            _ => self.complete(status, grpc_status, size.unwrap_or(0)),
        }
        resp
    }

    /// Records everything about the finished request.
    pub fn complete(mut self, status: u16, grpc_status: Option<u16>, bytes_sent: u64) {
        self.record(status, grpc_status, bytes_sent);
    }

    fn record(&mut self, status: u16, grpc_status: Option<u16>, bytes_sent: u64) {
        self.recorded = true;
        let tel = &*self.telemetry;
        let elapsed = self.started.elapsed();
        let metrics = self.metrics.take().unwrap_or_else(|| tel.unrouted.clone());
        metrics.record(status, grpc_status, elapsed);
        let attempts = self.attempts.max(1);
        if let (Some(mut span), Some(exporter)) = (self.span.take(), tel.exporter.as_ref()) {
            if span.name.is_empty() {
                span.name = "proxy".into();
            }
            span.record_status(status);
            if let Some(g) = grpc_status {
                span.record_grpc_status(g);
            }
            if let Some(c) = self.error {
                span.record_error(c.as_str());
            }
            span.record_remora(
                self.destination.as_deref(),
                self.peer.as_deref(),
                Some(attempts),
                self.circuit_state,
            );
            span.finish();
            exporter.submit(*span);
        }
        if let (Some(mut e), Some(log)) = (self.log.take(), tel.logging()) {
            e.trace_id = Some(self.ctx.trace_id);
            e.span_id = Some(self.ctx.span_id);
            e.source_identity = match self.direction {
                remora_telemetry::INBOUND => self.peer.clone(),
                _ => None,
            };
            e.destination = self.destination.clone();
            e.upstream = self.upstream;
            e.status = Some(status);
            e.grpc_status = grpc_status;
            e.bytes_sent = bytes_sent;
            e.bytes_received = self.upload.as_ref().map_or(0, |t| t.bytes());
            e.duration = elapsed;
            e.upstream_duration = self.upstream_time;
            e.attempts = attempts;
            e.error = self.error.map(|c| c.as_str().into());
            log.log_boxed(e);
        }
    }
}

impl Drop for Observed {
    /// Dropped unrecorded: the client went away before an answer (hyper drops
    /// the request's future when its connection closes or its stream is reset).
    fn drop(&mut self) {
        if !self.recorded {
            self.error = Some(Cause::ClientReset);
            let grpc_status = self
                .grpc
                .then_some(u16::from(Cause::ClientReset.grpc_code()));
            self.record(Cause::ClientReset.http_status().as_u16(), grpc_status, 0);
        }
    }
}

/// Records a finished opaque TCP connection: metrics, an access-log line and,
/// when sampled, a span of its own.
pub struct TcpObserved {
    started: Instant,
    direction: &'static str,
    metrics: remora_telemetry::TcpMetrics,
    _open: remora_telemetry::OpenConnection,
    pub destination: Arc<str>,
    pub upstream: Option<SocketAddr>,
    pub peer: Option<Arc<str>>,
}

impl TcpObserved {
    pub fn begin(direction: &'static str, destination: &str) -> TcpObserved {
        let metrics = remora_telemetry::TcpMetrics::new(direction, destination);
        let open = metrics.open();
        TcpObserved {
            started: Instant::now(),
            direction,
            metrics,
            _open: open,
            destination: Arc::from(destination),
            upstream: None,
            peer: None,
        }
    }

    /// Records a relayed connection's end, with the bytes it really carried.
    pub fn finish_relay(self, tel: &Telemetry, r: Relayed) {
        if let Some(e) = &r.error {
            tracing::debug!(error = %e, "tcp relay ended");
        }
        let error = r.error.map(|e| e.to_string());
        self.finish(tel, r.to_client, r.from_client, error);
    }

    /// `sent` went to the client, `received` came from it.
    pub fn finish(self, tel: &Telemetry, sent: u64, received: u64, error: Option<String>) {
        self.metrics.sent(sent);
        self.metrics.received(received);
        let elapsed = self.started.elapsed();
        if let (Some(exporter), Some(upstream)) = (tel.exporter.as_ref(), self.upstream) {
            if tel.sampler.decide(None) {
                let kind = if self.direction == remora_telemetry::INBOUND {
                    SpanKind::Server
                } else {
                    SpanKind::Client
                };
                let ctx = TraceContext::new_root(true);
                let mut span = SpanRecord::start(kind, &ctx, None);
                span.start = std::time::SystemTime::now() - elapsed;
                span.record_tcp(upstream, &self.destination);
                span.record_remora(None, self.peer.as_deref(), None, None);
                if let Some(e) = &error {
                    span.record_error(e.clone());
                }
                span.finish();
                exporter.submit(span);
            }
        }
        if let Some(log) = tel.logging() {
            let mut e = AccessLogEntry::new(self.direction, "tcp");
            e.time = std::time::SystemTime::now() - elapsed;
            e.destination = Some(self.destination.clone());
            e.upstream = self.upstream;
            // The peer is the caller inbound, the destination outbound.
            e.source_identity = match self.direction {
                remora_telemetry::INBOUND => self.peer.clone(),
                _ => None,
            };
            e.duration = elapsed;
            e.bytes_sent = sent;
            e.bytes_received = received;
            e.attempts = 1;
            e.error = error.map(Into::into);
            log.log(e);
        }
    }
}

/// A request whose response body is still streaming: recorded when it ends.
struct Pending {
    obs: Observed,
    status: u16,
    grpc_status: Option<u16>,
    bytes: u64,
}

impl OnEnd for Pending {
    fn on_frame(&mut self, frame: &http_body::Frame<bytes::Bytes>) {
        if let Some(d) = frame.data_ref() {
            self.bytes += d.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            // gRPC puts its status in the trailers.
            if let Some(g) = remora_resilience::grpc_status_of(t) {
                self.grpc_status = Some(g);
            }
        }
    }

    /// The answer's body ended: cleanly, broken off by the upstream, or
    /// abandoned by the client.
    fn ended(self: Box<Self>, end: End) {
        let Pending {
            mut obs,
            status,
            grpc_status,
            bytes,
        } = *self;
        match end {
            End::Complete => {}
            End::Broken => obs.error = Some(Cause::UpstreamReset),
            End::Abandoned => obs.error = Some(Cause::ClientReset),
        }
        obs.complete(status, grpc_status, bytes);
    }
}
