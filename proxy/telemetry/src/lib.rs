//! Remora's telemetry building blocks for the proxy's request path: trace context
//! propagation (W3C and B3), head sampling, spans exported over OTLP/gRPC through a
//! bounded queue, Prometheus metrics with pre-resolved handles, and JSON access logs.
//!
//! Nothing here blocks the request path: queues are bounded and drop (and count)
//! when full, metric handles are resolved once, and the rate is an atomic.
//!
//! Start order: [`Metrics::install`] first (handles and exporters created before it
//! record nothing), then [`Exporter::start`] and [`AccessLog::start`].
//!
//! Per request:
//!
//! ```text
//! let parent = extract(req.headers());
//! let sampled = sampler.decide(parent.as_ref());
//! let ctx = TraceContext::next(parent.as_ref(), sampled);
//! inject(req.headers_mut(), &ctx);                  // forwarded request
//! let mut span = sampled.then(|| SpanRecord::start(kind, &ctx, parent.and_then(|p| p.as_parent())));
//! // ... span.record_request(&req, Some(route_name)), record_retry, record_status ...
//! // end: span.finish(); exporter.submit(span); route_metrics.record(..); access_log.log(..)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod context;
pub mod exporter;
mod label_cache;
pub mod metrics;
mod otlp;
pub mod request_metrics;
pub mod sampler;
pub mod service_metrics;
pub mod span;
pub mod tcp_metrics;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;

pub use access_log::{AccessLog, AccessLogEntry, AccessLogHandle};
pub use context::{extract, inject, new_span_id, new_trace_id, Format, TraceContext};
pub use exporter::{Exporter, ExporterConfig, ExporterError, ExporterHandle};
pub use metrics::{Metrics, MetricsError};
pub use otlp::SCOPE_NAME;
pub use request_metrics::{RequestMetrics, INBOUND, OUTBOUND};
pub use sampler::Sampler;
pub use service_metrics::{CircuitBreakerGauge, ServiceMetrics};
pub use span::{AttributeValue, SpanEvent, SpanKind, SpanRecord, SpanStatus};
pub use tcp_metrics::{OpenConnection, TcpMetrics};

#[cfg(test)]
mod tests {
    /// Everything the request path shares across tasks is Send + Sync.
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::RequestMetrics>();
        check::<crate::TcpMetrics>();
        check::<crate::ServiceMetrics>();
        check::<crate::Sampler>();
        check::<crate::ExporterHandle>();
        check::<crate::AccessLogHandle>();
        check::<crate::Metrics>();
        check::<crate::TraceContext>();
        check::<crate::SpanRecord>();
    }
}
