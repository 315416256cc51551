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

/// One trace of the game scenario of the `join` bench, as received (not normalized): 10 SDK
/// spans (login -> shop -> payment) and 12 DeepFlow rows (process spans of each call, MySQL and
/// Redis seen only by eBPF, the payment server row split into request and response).
pub fn game_trace(i: u64) -> (Vec<Span>, Vec<Span>) {
    game_trace_skewed(i, [0; 4])
}

/// [`game_trace`] with each host's clock off by `skew_us` (login, shop, payment, database host):
/// SDK spans and eBPF rows of one host share its clock.
pub fn game_trace_skewed(i: u64, skew_us: [i64; 4]) -> (Vec<Span>, Vec<Span>) {
    let mut trace = [0u8; 16];
    trace[..8].copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_be_bytes());
    trace[8..].copy_from_slice(&(i ^ 0xdead_beef_cafe_f00d).to_be_bytes());
    let id = |k: u64| (i << 8) | k | (1 << 60);
    let row = |k: u64| (i << 8) | k | (3 << 60);
    let t = |ms: f64| 1_700_000_000_000_000 + i * 1000 + (ms * 1000.0) as u64;
    let seq = |k: u32| (i as u32).wrapping_mul(32).wrapping_add(k).max(1);
    let sys = |k: u64| i * 16 + k + 1;
    let (login, shop, pay) = (
        sdk_scope("login", "login-0", "game"),
        sdk_scope("shop", "shop-0", "game"),
        sdk_scope("payment", "payment-0", "game"),
    );
    let nginx_client = 0x0abc_0000_0000_0000 | i;
    let db = || vec![kv_s("db.system", "mysql")];
    let redis = || vec![kv_s("db.system", "redis")];
    let http = || vec![kv_s("http.method", "POST")];
    let sdk = vec![
        sdk_span(
            &login,
            trace,
            id(1),
            nginx_client,
            SpanKind::Server,
            "POST /login",
            t(0.0),
            t(40.0),
            http(),
        ),
        sdk_span(
            &login,
            trace,
            id(2),
            id(1),
            SpanKind::Internal,
            "check",
            t(0.5),
            t(39.0),
            vec![],
        ),
        sdk_span(
            &login,
            trace,
            id(3),
            id(2),
            SpanKind::Client,
            "SELECT users",
            t(1.0),
            t(5.0),
            db(),
        ),
        sdk_span(
            &login,
            trace,
            id(4),
            id(2),
            SpanKind::Client,
            "GET session",
            t(6.0),
            t(7.0),
            redis(),
        ),
        sdk_span(
            &login,
            trace,
            id(5),
            id(2),
            SpanKind::Client,
            "POST /shop",
            t(8.0),
            t(38.0),
            http(),
        ),
        sdk_span(
            &shop,
            trace,
            id(6),
            id(5),
            SpanKind::Server,
            "POST /shop",
            t(9.0),
            t(37.0),
            http(),
        ),
        sdk_span(
            &shop,
            trace,
            id(7),
            id(6),
            SpanKind::Internal,
            "cart",
            t(9.5),
            t(36.0),
            vec![],
        ),
        sdk_span(
            &shop,
            trace,
            id(8),
            id(7),
            SpanKind::Client,
            "SELECT items",
            t(10.0),
            t(14.0),
            db(),
        ),
        sdk_span(
            &shop,
            trace,
            id(9),
            id(7),
            SpanKind::Client,
            "POST /pay",
            t(15.0),
            t(35.0),
            http(),
        ),
        sdk_span(
            &pay,
            trace,
            id(10),
            id(9),
            SpanKind::Server,
            "POST /pay",
            t(16.0),
            t(34.0),
            http(),
        ),
    ];
    let mut ebpf = Vec::new();
    let r = |k, tap: &str, agent: &str, pods: (&str, &str), pids: (u32, u32)| {
        DfRow::new(row(k), tap, agent)
            .pods(pods.0, pods.1)
            .pids(pids.0, pids.1)
    };
    let ns = |mut d: DfRow| {
        d.ns = [Some("game".into()), Some("game".into())];
        d
    };
    // login's entry s-p (the nginx caller is outside the unit).
    ebpf.push(
        ns(r(1, "s-p", "node-1", ("nginx-0", "login-0"), (0, 100)))
            .trace(trace, nginx_client)
            .seqs(seq(1), seq(2))
            .sys(sys(1), sys(4))
            .time_us(t(-0.1), t(40.1)),
    );
    // login -> MySQL (no header), c-p and the server s-p.
    ebpf.push(
        ns(r(2, "c-p", "node-1", ("login-0", "mysql-0"), (100, 0)))
            .l7("MySQL", "SELECT users")
            .seqs(seq(3), seq(4))
            .sys(sys(1), sys(2))
            .time_us(t(1.1), t(4.9)),
    );
    ebpf.push(
        ns(r(3, "s-p", "node-db", ("login-0", "mysql-0"), (0, 300)))
            .l7("MySQL", "SELECT users")
            .seqs(seq(3), seq(4))
            .sys(sys(9), sys(9))
            .time_us(t(1.3), t(4.7)),
    );
    // login -> Redis.
    ebpf.push(
        ns(r(4, "c-p", "node-1", ("login-0", "redis-0"), (100, 0)))
            .l7("Redis", "GET")
            .seqs(seq(5), seq(6))
            .sys(sys(2), sys(3))
            .time_us(t(6.1), t(6.9)),
    );
    ebpf.push(
        ns(r(5, "s-p", "node-db", ("login-0", "redis-0"), (0, 301)))
            .l7("Redis", "GET")
            .seqs(seq(5), seq(6))
            .sys(sys(10), sys(10))
            .time_us(t(6.2), t(6.8)),
    );
    // login -> shop, header = login's CLIENT span.
    ebpf.push(
        ns(r(6, "c-p", "node-1", ("login-0", "shop-0"), (100, 0)))
            .trace(trace, id(5))
            .seqs(seq(7), seq(8))
            .sys(sys(3), sys(4))
            .time_us(t(8.1), t(37.9)),
    );
    ebpf.push(
        ns(r(7, "s-p", "node-2", ("login-0", "shop-0"), (0, 200)))
            .trace(trace, id(5))
            .seqs(seq(7), seq(8))
            .sys(sys(5), sys(7))
            .time_us(t(8.9), t(37.1)),
    );
    // shop -> MySQL.
    ebpf.push(
        ns(r(8, "c-p", "node-2", ("shop-0", "mysql-0"), (200, 0)))
            .l7("MySQL", "SELECT items")
            .seqs(seq(9), seq(10))
            .sys(sys(5), sys(6))
            .time_us(t(10.1), t(13.9)),
    );
    ebpf.push(
        ns(r(9, "s-p", "node-db", ("shop-0", "mysql-0"), (0, 300)))
            .l7("MySQL", "SELECT items")
            .seqs(seq(9), seq(10))
            .sys(sys(11), sys(11))
            .time_us(t(10.3), t(13.7)),
    );
    // shop -> payment, the payment s-p split into request and response rows.
    ebpf.push(
        ns(r(10, "c-p", "node-2", ("shop-0", "payment-0"), (200, 0)))
            .trace(trace, id(9))
            .seqs(seq(11), seq(12))
            .sys(sys(6), sys(7))
            .time_us(t(15.1), t(34.9)),
    );
    let mut q = ns(r(11, "s-p", "node-3", ("shop-0", "payment-0"), (0, 400)))
        .trace(trace, id(9))
        .kind("request")
        .seqs(seq(11), 0)
        .sys(sys(12), 0)
        .time_us(t(15.5), t(15.5));
    q.cap_seq = [10, 0];
    q.flow_id = 7000 + i;
    q.status = 0;
    let mut resp = ns(r(12, "s-p", "node-3", ("shop-0", "payment-0"), (0, 400)))
        .kind("response")
        .seqs(0, seq(12))
        .sys(0, sys(12))
        .time_us(t(34.5), t(34.5));
    resp.cap_seq = [0, 11];
    resp.flow_id = 7000 + i;
    ebpf.push(q);
    ebpf.push(resp);

    let shift = |t: u64, host: usize| t.saturating_add_signed(skew_us[host]);
    let mut sdk = sdk;
    for sp in sdk.iter_mut() {
        let host = match sp.service_name() {
            "login" => 0,
            "shop" => 1,
            _ => 2,
        };
        let _ = sp.edit(|p| {
            p.start_time_unix_nano = shift(p.start_time_unix_nano / 1000, host) * 1000;
            p.end_time_unix_nano = shift(p.end_time_unix_nano / 1000, host) * 1000;
        });
    }
    let ebpf = ebpf
        .into_iter()
        .map(|mut d| {
            let host = match d.agent.as_str() {
                "node-1" => 0,
                "node-2" => 1,
                "node-3" => 2,
                _ => 3,
            };
            d.start_us = shift(d.start_us, host);
            d.end_us = shift(d.end_us, host);
            d.to_span()
        })
        .collect();
    (sdk, ebpf)
}
