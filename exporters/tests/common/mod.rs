//! Shared by the exporter integration tests: a realistic request and its spans.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tailweave_core::config::BuildContext;
use tailweave_core::otlp::{decode_request, DecodeLimits};
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tailweave_core::proto::tonic::common::v1::{
    any_value, AnyValue, InstrumentationScope, KeyValue,
};
use tailweave_core::proto::tonic::resource::v1::Resource;
use tailweave_core::proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use tailweave_core::Span as CoreSpan;
use tailweave_exporters::{ExporterConfig, RunningExporter};

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn span(trace: u8, id: u8, parent: u8) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: vec![id; 8],
        parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
        name: format!("op-{id}"),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000 + id as u64,
        end_time_unix_nano: 1_700_000_000_000_500_000 + id as u64,
        attributes: vec![
            kv("http.method", any_value::Value::StringValue("GET".into())),
            kv("n", any_value::Value::IntValue(id as i64)),
            kv("ratio", any_value::Value::DoubleValue(0.25)),
            kv("ok", any_value::Value::BoolValue(id & 1 == 0)),
        ],
        events: vec![span::Event {
            time_unix_nano: 5,
            name: "ev".into(),
            ..Default::default()
        }],
        links: vec![span::Link {
            trace_id: vec![9; 16],
            span_id: vec![9; 8],
            ..Default::default()
        }],
        status: Some(Status {
            message: if id == 3 {
                "boom".into()
            } else {
                String::new()
            },
            code: if id == 3 {
                status::StatusCode::Error as i32
            } else {
                status::StatusCode::Ok as i32
            },
        }),
        ..Default::default()
    }
}

/// Two resources, three scopes, six spans over two traces.
pub fn request() -> ExportTraceServiceRequest {
    let res = |svc: &str| Resource {
        attributes: vec![kv(
            "service.name",
            any_value::Value::StringValue(svc.into()),
        )],
        ..Default::default()
    };
    let scope = |name: &str| InstrumentationScope {
        name: name.into(),
        version: "1.0".into(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![
            ResourceSpans {
                resource: Some(res("frontend")),
                scope_spans: vec![
                    ScopeSpans {
                        scope: Some(scope("http")),
                        spans: vec![span(1, 1, 0), span(1, 2, 1)],
                        schema_url: "https://opentelemetry.io/schemas/1.21.0".into(),
                    },
                    ScopeSpans {
                        scope: Some(scope("db")),
                        spans: vec![span(1, 3, 2)],
                        schema_url: String::new(),
                    },
                ],
                schema_url: "https://opentelemetry.io/schemas/1.21.0".into(),
            },
            ResourceSpans {
                resource: Some(res("backend")),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope("rpc")),
                    spans: vec![span(2, 4, 0), span(2, 5, 4), span(1, 6, 2)],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            },
        ],
    }
}

/// The spans of [`request`], decoded the way a receiver does.
pub fn spans() -> Vec<CoreSpan> {
    let bytes = Bytes::from(request().encode_to_vec());
    decode_request(bytes, &DecodeLimits::default())
        .expect("valid request")
        .spans
}

pub fn build(kind: &str, yaml: &str) -> RunningExporter {
    let cfg = ExporterConfig::parse(kind, serde_yaml::from_str(yaml).expect("yaml"))
        .expect("parses")
        .expect("known kind");
    let issues = cfg.validate();
    assert!(issues.is_empty(), "{issues:?}");
    let ctx = BuildContext {
        id: format!("{kind}/test"),
        ..Default::default()
    };
    cfg.build(&ctx).expect("builds")
}

/// Closes the input and waits (bounded) for the exporter to drain.
pub async fn finish(running: RunningExporter) {
    drop(running.input);
    tokio::time::timeout(Duration::from_secs(20), running.done)
        .await
        .expect("exporter drained in time")
        .expect("exporter task");
}

/// Waits (bounded) until `cond` holds.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
