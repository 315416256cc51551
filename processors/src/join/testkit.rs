//! Builders of spans as DeepFlow and OpenTelemetry SDKs export them, for the join's tests and the
//! `join` bench. Not a stable API.

use std::sync::Arc;

use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{Span as ProtoSpan, Status};
use tailweave_core::span::hex;
use tailweave_core::{Resource, Scope, Span, SpanKind};

pub fn kv_s(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

pub fn kv_i(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
    }
}

/// `df.capture_info.observation_point` as DeepFlow exports it (display names).
pub fn display_name(code: &str) -> &str {
    match code {
        "c-p" => "Client Process",
        "c" => "Client NIC",
        "c-nd" => "Client K8s Node",
        "c-hv" => "Client VM Hypervisor",
        "c-gw-hv" => "Client-side Gateway Hypervisor",
        "c-gw" => "Client-side Gateway",
        "s-gw" => "Server-side Gateway",
        "s-gw-hv" => "Server-side Gateway Hypervisor",
        "s-hv" => "Server VM Hypervisor",
        "s-nd" => "Server K8s Node",
        "s" => "Server NIC",
        "s-p" => "Server Process",
        "local" => "Local NIC",
        "rest" => "Other NIC",
        other => other,
    }
}

/// One DeepFlow `l7_flow_log` row, exported as DeepFlow's `EncodeToOtlp` would.
#[derive(Clone, Debug)]
pub struct DfRow {
    pub row_id: u64,
    pub tap: String,
    pub span_type: String,
    pub agent: String,
    /// The header trace id; `None` gives DeepFlow's fake id.
    pub trace: Option<[u8; 16]>,
    /// The header span id; `None` gives parent == self.
    pub header: Option<u64>,
    pub req_seq: u32,
    pub resp_seq: u32,
    pub sys_req: u64,
    pub sys_resp: u64,
    pub threads: [u32; 2],
    pub cap_seq: [u32; 2],
    pub pid: [u32; 2],
    pub pod: [Option<String>; 2],
    pub ns: [Option<String>; 2],
    pub l7: String,
    pub flow_id: u64,
    pub start_us: u64,
    pub end_us: u64,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status: i32,
    pub name: String,
    pub xreq: [Option<String>; 2],
    pub request_id: Option<i64>,
    pub extra_res: Vec<KeyValue>,
    pub extra_attrs: Vec<KeyValue>,
}

impl DfRow {
    pub fn new(row_id: u64, tap: &str, agent: &str) -> DfRow {
        DfRow {
            row_id,
            tap: tap.into(),
            span_type: "session".into(),
            agent: agent.into(),
            trace: None,
            header: None,
            req_seq: 0,
            resp_seq: 0,
            sys_req: 0,
            sys_resp: 0,
            threads: [0; 2],
            cap_seq: [0; 2],
            pid: [0; 2],
            pod: [None, None],
            ns: [Some("default".into()), Some("default".into())],
            l7: "HTTP".into(),
            flow_id: row_id ^ 0x5a5a,
            start_us: 0,
            end_us: 0,
            status: 1,
            name: "GET /".into(),
            xreq: [None, None],
            request_id: None,
            extra_res: Vec::new(),
            extra_attrs: Vec::new(),
        }
    }
    pub fn trace(mut self, t: [u8; 16], header: u64) -> Self {
        self.trace = Some(t);
        self.header = Some(header);
        self
    }
    pub fn seqs(mut self, req: u32, resp: u32) -> Self {
        self.req_seq = req;
        self.resp_seq = resp;
        self
    }
    pub fn sys(mut self, req: u64, resp: u64) -> Self {
        self.sys_req = req;
        self.sys_resp = resp;
        self
    }
    pub fn pids(mut self, p0: u32, p1: u32) -> Self {
        self.pid = [p0, p1];
        self
    }
    pub fn pods(mut self, p0: &str, p1: &str) -> Self {
        let o = |s: &str| (!s.is_empty()).then(|| s.to_string());
        self.pod = [o(p0), o(p1)];
        self
    }
    pub fn time_us(mut self, start: u64, end: u64) -> Self {
        self.start_us = start;
        self.end_us = end;
        self
    }
    pub fn kind(mut self, t: &str) -> Self {
        self.span_type = t.into();
        self
    }
    pub fn l7(mut self, p: &str, name: &str) -> Self {
        self.l7 = p.into();
        self.name = name.into();
        self
    }

    pub fn to_span(&self) -> Span {
        let mut res = vec![
            kv_s("telemetry.sdk.name", "deepflow"),
            kv_s("df.capture_info.observation_point", display_name(&self.tap)),
            kv_s("df.capture_info.agent", &self.agent),
            kv_s(
                "df.capture_info.signal_source",
                if self.tap.ends_with("-p") {
                    "eBPF"
                } else {
                    "Packet"
                },
            ),
            kv_s("df.application.l7_protocol", &self.l7),
            kv_i(
                "df.transport.client_port",
                40000 + (self.row_id % 20000) as i64,
            ),
            kv_i("df.transport.server_port", 8080),
            kv_i("df.flow_info.id", self.row_id as i64),
            kv_s("df.network.protocol", "TCP"),
        ];
        let side_local = if self.tap.starts_with('c') { 0 } else { 1 };
        let pod = &self.pod[side_local];
        let service = pod.as_deref().unwrap_or("unknown");
        res.push(kv_s("service.name", service));
        if self.req_seq != 0 {
            res.push(kv_i("df.transport.req_tcp_seq", self.req_seq as i64));
        }
        if self.resp_seq != 0 {
            res.push(kv_i("df.transport.resp_tcp_seq", self.resp_seq as i64));
        }
        if self.flow_id != 0 {
            res.push(kv_i("df.flow_info.flow_id", self.flow_id as i64));
        }
        for s in 0..2 {
            if self.pid[s] != 0 {
                res.push(kv_i(&format!("process.pid_{s}"), self.pid[s] as i64));
            }
            if let Some(p) = &self.pod[s] {
                res.push(kv_s(&format!("df.universal_tag.pod_{s}"), p));
            }
            if let Some(n) = &self.ns[s] {
                res.push(kv_s(&format!("df.universal_tag.pod_ns_{s}"), n));
            }
        }
        res.extend(self.extra_res.iter().cloned());
        let mut attrs = vec![kv_s("df.span.type", &self.span_type)];
        let mut put = |k: &str, v: u64| {
            if v != 0 {
                attrs.push(kv_i(k, v as i64));
            }
        };
        put("df.span.syscall_trace_id_request", self.sys_req);
        put("df.span.syscall_trace_id_response", self.sys_resp);
        put("df.span.syscall_thread_0", self.threads[0] as u64);
        put("df.span.syscall_thread_1", self.threads[1] as u64);
        put("df.span.syscall_cap_seq_0", self.cap_seq[0] as u64);
        put("df.span.syscall_cap_seq_1", self.cap_seq[1] as u64);
        for s in 0..2 {
            if let Some(x) = &self.xreq[s] {
                attrs.push(kv_s(&format!("df.span.x_request_id_{s}"), x));
            }
        }
        if let Some(r) = self.request_id {
            attrs.push(kv_i("df.global.request_id", r));
        }
        let id = self.row_id.to_be_bytes();
        let trace_id = match self.trace {
            Some(t) => {
                attrs.push(kv_s("df.span.native.trace_id", &hex(&t)));
                t.to_vec()
            }
            None => [id.to_vec(), vec![0; 8]].concat(),
        };
        let parent = match self.header {
            Some(h) => {
                attrs.push(kv_s("df.span.native.span_id", &hex(&h.to_be_bytes())));
                h.to_be_bytes().to_vec()
            }
            None => id.to_vec(),
        };
        attrs.extend(self.extra_attrs.iter().cloned());
        let resource = Resource::from_proto(
            &ProtoResource {
                attributes: res,
                ..Default::default()
            },
            "",
        );
        let scope = Scope::new(resource, Default::default(), Default::default());
        let p = ProtoSpan {
            trace_id,
            span_id: id.to_vec(),
            parent_span_id: parent,
            name: self.name.clone(),
            kind: if self.tap.starts_with('c') {
                3
            } else if self.tap.starts_with('s') {
                2
            } else {
                0
            },
            start_time_unix_nano: self.start_us * 1000,
            end_time_unix_nano: self.end_us * 1000,
            attributes: attrs,
            status: Some(Status {
                code: self.status,
                ..Default::default()
            }),
            ..Default::default()
        };
        Span::from_proto(scope, &p)
    }
}

/// The resource of an SDK-instrumented service instance.
pub fn sdk_scope(service: &str, pod: &str, namespace: &str) -> Arc<Scope> {
    let res = Resource::from_proto(
        &ProtoResource {
            attributes: vec![
                kv_s("service.name", service),
                kv_s("k8s.pod.name", pod),
                kv_s("k8s.namespace.name", namespace),
                kv_s("telemetry.sdk.name", "opentelemetry"),
            ],
            ..Default::default()
        },
        "",
    );
    Scope::new(res, Default::default(), Default::default())
}

/// An SDK span.
#[allow(clippy::too_many_arguments)]
pub fn sdk_span(
    scope: &Arc<Scope>,
    trace: [u8; 16],
    span: u64,
    parent: u64,
    kind: SpanKind,
    name: &str,
    start_us: u64,
    end_us: u64,
    attrs: Vec<KeyValue>,
) -> Span {
    let p = ProtoSpan {
        trace_id: trace.to_vec(),
        span_id: span.to_be_bytes().to_vec(),
        parent_span_id: if parent == 0 {
            Vec::new()
        } else {
            parent.to_be_bytes().to_vec()
        },
        name: name.into(),
        kind: kind as i32,
        start_time_unix_nano: start_us * 1000,
        end_time_unix_nano: end_us * 1000,
        attributes: attrs,
        status: Some(Status::default()),
        ..Default::default()
    };
    Span::from_proto(scope.clone(), &p)
}
