//! Conversion of [`SpanRecord`]s into OTLP protobuf messages. Runs on the exporter's
//! task, never on the request path.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};

use crate::span::{AttributeValue, SpanKind, SpanRecord, SpanStatus};

/// Name of the instrumentation scope of every span.
pub const SCOPE_NAME: &str = "remora-proxy";

/// The resource of every span: the workload's service, namespace and instance.
pub(crate) fn resource(service_name: &str, namespace: &str, instance_id: &str) -> Resource {
    let mut attributes = vec![
        string_kv("service.name", service_name),
        string_kv("telemetry.sdk.name", "remora"),
        string_kv("telemetry.sdk.language", "rust"),
        string_kv("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
    ];
    if !namespace.is_empty() {
        attributes.push(string_kv("service.namespace", namespace));
    }
    if !instance_id.is_empty() {
        attributes.push(string_kv("service.instance.id", instance_id));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

/// One export request holding `spans` under `resource`.
pub(crate) fn request(resource: &Resource, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The OTLP form of a span.
pub(crate) fn span(record: SpanRecord) -> Span {
    let kind = match record.kind {
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Server => span::SpanKind::Server,
    };
    let status = match record.status {
        SpanStatus::Unset => None,
        SpanStatus::Ok => Some(Status {
            message: String::new(),
            code: status::StatusCode::Ok as i32,
        }),
        SpanStatus::Error(message) => Some(Status {
            message: message.into_owned(),
            code: status::StatusCode::Error as i32,
        }),
    };
    Span {
        trace_id: record.trace_id.to_vec(),
        span_id: record.span_id.to_vec(),
        trace_state: record
            .tracestate
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        parent_span_id: record
            .parent_span_id
            .map(|p| p.to_vec())
            .unwrap_or_default(),
        flags: 0,
        name: record.name.into_owned(),
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(record.start),
        end_time_unix_nano: unix_nanos(record.end),
        attributes: record.attributes.into_iter().map(kv).collect(),
        dropped_attributes_count: 0,
        events: record
            .events
            .into_iter()
            .map(|e| span::Event {
                time_unix_nano: unix_nanos(e.time),
                name: e.name.to_owned(),
                attributes: e.attributes.into_iter().map(kv).collect(),
                dropped_attributes_count: 0,
            })
            .collect(),
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status,
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kv((key, value): (&'static str, AttributeValue)) -> KeyValue {
    let value = match value {
        AttributeValue::Str(s) => any_value::Value::StringValue(s.into_owned()),
        AttributeValue::Int(i) => any_value::Value::IntValue(i),
        AttributeValue::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..KeyValue::default()
    }
}
