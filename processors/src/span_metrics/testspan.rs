//! A small span builder for the unit tests of `span_metrics`, `propagate` and `extract`.
#![allow(dead_code)] // each test module uses a different part of the builder

use std::sync::Arc;

use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
use tailweave_core::{Resource, Scope, Span, SpanKind, TraceId};

pub fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

pub fn sv(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

pub fn tid(n: u8) -> TraceId {
    TraceId([n; 16])
}

pub fn scope(service: &str, res_attrs: Vec<KeyValue>) -> Arc<Scope> {
    let mut attributes = vec![kv("service.name", sv(service))];
    attributes.extend(res_attrs);
    let r = Resource::from_proto(
        &ProtoResource {
            attributes,
            ..Default::default()
        },
        "",
    );
    Arc::new(Scope {
        resource: r,
        ..Default::default()
    })
}

/// A span builder: trace `t`, span id `id`, parent id `parent` (0 = root).
pub struct B {
    pub scope: Arc<Scope>,
    pub p: ProtoSpan,
}

pub fn span(scope: &Arc<Scope>, t: u8, id: u64, parent: u64) -> B {
    B {
        scope: scope.clone(),
        p: ProtoSpan {
            trace_id: vec![t; 16],
            span_id: (id.max(1)).to_be_bytes().to_vec(),
            parent_span_id: if parent == 0 {
                Vec::new()
            } else {
                parent.to_be_bytes().to_vec()
            },
            name: "op".into(),
            kind: SpanKind::Internal as i32,
            start_time_unix_nano: 1_000_000_000,
            end_time_unix_nano: 1_001_000_000,
            ..Default::default()
        },
    }
}

impl B {
    pub fn name(mut self, n: &str) -> B {
        self.p.name = n.into();
        self
    }
    pub fn kind(mut self, k: SpanKind) -> B {
        self.p.kind = k as i32;
        self
    }
    pub fn error(mut self) -> B {
        self.p.status = Some(Status {
            message: String::new(),
            code: status::StatusCode::Error as i32,
        });
        self
    }
    pub fn attr(mut self, k: &str, v: any_value::Value) -> B {
        self.p.attributes.push(kv(k, v));
        self
    }
    /// Start and end, in milliseconds after the epoch second 1.
    pub fn times(mut self, start_ms: u64, end_ms: u64) -> B {
        self.p.start_time_unix_nano = 1_000_000_000 + start_ms * 1_000_000;
        self.p.end_time_unix_nano = 1_000_000_000 + end_ms * 1_000_000;
        self
    }
    pub fn build(self) -> Span {
        Span::from_proto(self.scope, &self.p)
    }
}

/// The string value of attribute `k` of `s`, read back from its bytes.
pub fn attr_str(s: &Span, k: &str) -> Option<String> {
    s.attr(k).map(|v| v.to_string_lossy())
}
