//! The simulated world (hosts, services, pods) and the two encoders: SDK spans as an OpenTelemetry
//! SDK exports them, and DeepFlow rows as DeepFlow's OTLP exporter writes them
//! (`shared/docs/ebpf-spans.md` §2-§6).

use bytes::Bytes;
use tailweave_core::proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use tailweave_core::proto::tonic::resource::v1::Resource;
use tailweave_core::proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span, Status};
use tailweave_core::span::hex;

use super::super::wire::{put_varint, varint_len, Encoded};

/// Nodes of the simulated cluster. Every tenant's pods share them, as namespaces share nodes.
pub const HOSTS: [&str; 7] = [
    "node-client",
    "node-edge",
    "node-gw",
    "node-app-1",
    "node-app-2",
    "node-app-3",
    "node-db",
];

/// A service of the simulated backend.
#[derive(Clone, Copy, Debug)]
pub struct Svc {
    pub name: &'static str,
    /// Index into [`HOSTS`].
    pub host: usize,
    pub port: u16,
    /// Kernel process name (`thread.name_x`).
    pub proc_name: &'static str,
    /// SDK language, `None` for uninstrumented services.
    pub sdk_lang: Option<&'static str>,
    /// Distinguishes pids and IPs of the services of one tenant.
    pub idx: u32,
}

pub const CLIENT: Svc = Svc {
    name: "game-client",
    host: 0,
    port: 0,
    proc_name: "game-client",
    sdk_lang: Some("cpp"),
    idx: 0,
};
pub const NGINX: Svc = Svc {
    name: "nginx",
    host: 1,
    port: 80,
    proc_name: "nginx",
    sdk_lang: None,
    idx: 1,
};
pub const GATEWAY: Svc = Svc {
    name: "api-gateway",
    host: 2,
    port: 8080,
    proc_name: "envoy",
    sdk_lang: None,
    idx: 2,
};
pub const LOGIN: Svc = Svc {
    name: "login",
    host: 3,
    port: 8081,
    proc_name: "java",
    sdk_lang: Some("java"),
    idx: 3,
};
pub const SHOP: Svc = Svc {
    name: "shop",
    host: 4,
    port: 8082,
    proc_name: "shop",
    sdk_lang: Some("go"),
    idx: 4,
};
pub const PAYMENT: Svc = Svc {
    name: "payment",
    host: 5,
    port: 8083,
    proc_name: "python3",
    sdk_lang: Some("python"),
    idx: 5,
};
pub const MYSQL: Svc = Svc {
    name: "mysql",
    host: 6,
    port: 3306,
    proc_name: "mysqld",
    sdk_lang: None,
    idx: 6,
};
pub const REDIS: Svc = Svc {
    name: "redis",
    host: 6,
    port: 6379,
    proc_name: "redis-server",
    sdk_lang: None,
    idx: 7,
};
/// The single service of the `sdk` scenario.
pub const BENCH: Svc = Svc {
    name: "bench-svc",
    host: 3,
    port: 8080,
    proc_name: "bench",
    sdk_lang: Some("rust"),
    idx: 8,
};

/// One service's pod in one tenant.
#[derive(Clone, Debug)]
pub struct Pod {
    pub svc: Svc,
    pub ns: String,
    pub pod: String,
    pub host: &'static str,
    pub ip: String,
    pub pid: u32,
}

pub fn tenant_ns(tenant: usize) -> String {
    format!("game-{tenant}")
}

pub fn pod(svc: Svc, tenant: usize) -> Pod {
    let t = tenant as u32;
    Pod {
        svc,
        ns: tenant_ns(tenant),
        pod: format!(
            "{}-{}-{:04x}",
            svc.name,
            tenant,
            (t * 7919 + svc.idx * 104_729) & 0xffff
        ),
        host: HOSTS[svc.host],
        // Unique per (tenant, service) for up to 65536 tenants.
        ip: format!("10.{}.{}.{}", 16 + svc.idx, (t >> 8) & 0xff, t & 0xff),
        pid: 1000 + t * 16 + svc.idx,
    }
}

/// The DeepFlow agent (vtap) name of a host.
pub fn agent_name(host: &str) -> String {
    format!("{host}-V{}", host.len())
}

// ---------------------------------------------------------------------------------------------
// Attribute helpers

pub fn kv_str(k: &str, v: impl Into<String>) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
    }
}

pub fn kv_int(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(Value::IntValue(v)),
        }),
    }
}

pub fn kv_bool(k: &str, v: bool) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        key_strindex: 0,
        value: Some(AnyValue {
            value: Some(Value::BoolValue(v)),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// SDK spans

/// The resource an SDK in `pod` sends.
pub fn sdk_resource(pod: &Pod) -> Resource {
    Resource {
        attributes: vec![
            kv_str("service.name", pod.svc.name),
            kv_str("service.namespace", "game"),
            kv_str("service.instance.id", format!("{}-{}", pod.pod, pod.pid)),
            kv_str("k8s.namespace.name", pod.ns.clone()),
            kv_str("k8s.pod.name", pod.pod.clone()),
            kv_str("host.name", pod.host),
            kv_int("process.pid", pod.pid as i64),
            kv_str("telemetry.sdk.name", "opentelemetry"),
            kv_str(
                "telemetry.sdk.language",
                pod.svc.sdk_lang.unwrap_or("unknown"),
            ),
            kv_str("telemetry.sdk.version", "1.40.0"),
        ],
        ..Resource::default()
    }
}

pub fn sdk_scope(svc: &Svc) -> InstrumentationScope {
    InstrumentationScope {
        name: format!("{}.instrumentation", svc.name),
        version: "1.0.0".to_string(),
        ..InstrumentationScope::default()
    }
}

pub const KIND_INTERNAL: i32 = span::SpanKind::Internal as i32;
pub const KIND_SERVER: i32 = span::SpanKind::Server as i32;
pub const KIND_CLIENT: i32 = span::SpanKind::Client as i32;

/// OTLP status codes.
pub const STATUS_UNSET: i32 = 0;
pub const STATUS_OK: i32 = 1;
pub const STATUS_ERROR: i32 = 2;

#[allow(clippy::too_many_arguments)]
pub fn sdk_span(
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: &str,
    kind: i32,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<KeyValue>,
    status: (i32, &str),
) -> Span {
    let mut events = Vec::new();
    if status.0 == STATUS_ERROR {
        events.push(span::Event {
            time_unix_nano: end_ns,
            name: "exception".to_string(),
            attributes: vec![kv_str("exception.message", status.1)],
            dropped_attributes_count: 0,
        });
    }
    Span {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: 0x101, // sampled, and the parent's remoteness is known
        name: name.to_string(),
        kind,
        start_time_unix_nano: start_ns,
        end_time_unix_nano: end_ns,
        attributes,
        events,
        status: Some(Status {
            message: status.1.to_string(),
            code: status.0,
        }),
        ..Span::default()
    }
}

// ---------------------------------------------------------------------------------------------
// DeepFlow rows

/// Observation points the generator uses (`ebpf-spans.md` §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tap {
    CP,
    C,
    CNd,
    SNd,
    S,
    SP,
}

impl Tap {
    pub fn code(self) -> &'static str {
        match self {
            Tap::CP => "c-p",
            Tap::C => "c",
            Tap::CNd => "c-nd",
            Tap::SNd => "s-nd",
            Tap::S => "s",
            Tap::SP => "s-p",
        }
    }
    /// The display name DeepFlow exports in `df.capture_info.observation_point`.
    pub fn display(self) -> &'static str {
        match self {
            Tap::CP => "Client Process",
            Tap::C => "Client NIC",
            Tap::CNd => "Client K8s Node",
            Tap::SNd => "Server K8s Node",
            Tap::S => "Server NIC",
            Tap::SP => "Server Process",
        }
    }
    pub fn is_client(self) -> bool {
        matches!(self, Tap::CP | Tap::C | Tap::CNd)
    }
    pub fn is_process(self) -> bool {
        matches!(self, Tap::CP | Tap::SP)
    }
}

/// `df.span.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowType {
    Request,
    Response,
    Session,
}

impl RowType {
    fn as_str(self) -> &'static str {
        match self {
            RowType::Request => "request",
            RowType::Response => "response",
            RowType::Session => "session",
        }
    }
}

/// DeepFlow's `response_status` (`ebpf-spans.md` §2.4).
pub mod response_status {
    pub const SUCCESS: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const TIMEOUT: u8 = 2;
    pub const SERVER_ERROR: u8 = 3;
    pub const CLIENT_ERROR: u8 = 4;
    pub const UNKNOWN: u8 = 5;

    /// The OTLP status code DeepFlow writes for a response status.
    pub fn otlp(status: u8) -> i32 {
        match status {
            SUCCESS => super::STATUS_OK,
            ERROR | SERVER_ERROR | CLIENT_ERROR => super::STATUS_ERROR,
            _ => super::STATUS_UNSET,
        }
    }
}

/// The L7 content of a call.
#[derive(Clone, Debug)]
pub enum L7 {
    Http {
        method: &'static str,
        path: &'static str,
        domain: &'static str,
        status_code: u16,
    },
    Mysql {
        command: &'static str,
        table: &'static str,
        statement: String,
    },
    Redis {
        command: &'static str,
        key: String,
    },
}

impl L7 {
    fn protocol(&self) -> &'static str {
        match self {
            L7::Http { .. } => "HTTP",
            L7::Mysql { .. } => "MySQL",
            L7::Redis { .. } => "Redis",
        }
    }
    /// The span name DeepFlow gives a row with the request side (`ebpf-spans.md` §2.6).
    pub fn span_name(&self) -> String {
        match self {
            L7::Http { method, path, .. } => format!("{method} {path}"),
            L7::Mysql { command, table, .. } => format!("{command} {table}"),
            L7::Redis { command, .. } => command.to_string(),
        }
    }
    /// `response_status` of a completed call.
    pub fn response_status(&self) -> u8 {
        match self {
            L7::Http { status_code, .. } if *status_code >= 500 => response_status::SERVER_ERROR,
            L7::Http { status_code, .. } if *status_code >= 400 => response_status::CLIENT_ERROR,
            _ => response_status::SUCCESS,
        }
    }
}

/// Syscall-level keys of a system span (`ebpf-spans.md` §3, `join.md` §4.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sys {
    pub req: u64,
    pub resp: u64,
    pub thread: [u32; 2],
    pub cap_seq: [u32; 2],
}

/// One DeepFlow row before encoding. Times are on the capturing agent's clock, in µs.
#[derive(Clone, Debug)]
pub struct Row {
    pub row_id: u64,
    pub tap: Tap,
    pub row_type: RowType,
    pub client: Pod,
    pub server: Pod,
    pub client_port: u16,
    pub flow_id: u64,
    /// The trace id and caller span id the agent parsed from `traceparent`, if the request
    /// carried one (and this row holds the request side).
    pub header: Option<([u8; 16], [u8; 8])>,
    pub l7: L7,
    pub start_us: u64,
    pub end_us: u64,
    pub req_tcp_seq: u32,
    pub resp_tcp_seq: u32,
    /// `Some` for `c-p` / `s-p`.
    pub sys: Option<Sys>,
    pub status: u8,
    pub exception: Option<String>,
}

impl Row {
    /// The pod whose agent captured the row.
    pub fn local(&self) -> &Pod {
        if self.tap.is_client() {
            &self.client
        } else {
            &self.server
        }
    }

    pub fn has_request(&self) -> bool {
        self.row_type != RowType::Response
    }

    pub fn has_response(&self) -> bool {
        self.row_type != RowType::Request
    }

    pub fn name(&self) -> String {
        if self.has_request() {
            self.l7.span_name()
        } else {
            // The request columns of a response-only row are empty, so DeepFlow's name is too.
            String::new()
        }
    }

    /// The OTLP trace id DeepFlow exports: the header's, else the fake id of §2.2.
    pub fn otlp_trace_id(&self) -> [u8; 16] {
        match self.header {
            Some((t, _)) => t,
            None => fake_trace_id(self.row_id),
        }
    }

    /// Splits a session row into its request-only and response-only halves, as an agent that
    /// could not pair them emits them (`ebpf-spans.md` §1). The response half has no header.
    pub fn split(&self, response_row_id: u64) -> (Row, Row) {
        let mut q = self.clone();
        q.row_type = RowType::Request;
        q.end_us = q.start_us;
        q.resp_tcp_seq = 0;
        q.status = response_status::UNKNOWN;
        q.exception = None;
        if let Some(s) = q.sys.as_mut() {
            s.resp = 0;
            s.thread[1] = 0;
            s.cap_seq[1] = 0;
        }
        let mut r = self.clone();
        r.row_id = response_row_id;
        r.row_type = RowType::Response;
        r.start_us = r.end_us;
        r.req_tcp_seq = 0;
        r.header = None;
        if let Some(s) = r.sys.as_mut() {
            s.req = 0;
            s.thread[0] = 0;
            s.cap_seq[0] = 0;
        }
        (q, r)
    }

    /// The resource attributes DeepFlow writes for the row (`ebpf-spans.md` §3).
    fn resource_attrs(&self, sdk_version: &str, a: &mut impl AttrSink) {
        let local = self.local();
        a.str(&["service.name"], local.svc.name);
        a.str(&["service.instance.id"], &local.pod);
        if self.tap == Tap::CP {
            a.int(&["process.pid_0"], self.client.pid as i64);
            a.str(&["thread.name_0"], self.client.svc.proc_name);
        }
        if self.tap == Tap::SP {
            a.int(&["process.pid_1"], self.server.pid as i64);
            a.str(&["thread.name_1"], self.server.svc.proc_name);
        }
        a.int(&["df.flow_info.id"], self.row_id as i64);
        a.int(&["df.flow_info.time"], (self.end_us * 1000) as i64);
        a.int_nz(&["df.flow_info.flow_id"], self.flow_id as i64);
        let signal = if self.tap.is_process() {
            "eBPF"
        } else {
            "Packet"
        };
        a.str(&["df.capture_info.signal_source"], signal);
        a.str(&["df.capture_info.observation_point"], self.tap.display());
        a.str(&["df.capture_info.agent"], &agent_name(local.host));
        a.boolean(&["df.network.is_ipv4"], true);
        a.str(&["df.network.ip_0"], &self.client.ip);
        a.str(&["df.network.ip_1"], &self.server.ip);
        a.str(&["df.network.protocol"], "TCP");
        a.int_nz(&["df.transport.client_port"], self.client_port as i64);
        a.int_nz(&["df.transport.server_port"], self.server.svc.port as i64);
        a.int_nz(&["df.transport.req_tcp_seq"], self.req_tcp_seq as i64);
        a.int_nz(&["df.transport.resp_tcp_seq"], self.resp_tcp_seq as i64);
        a.str(&["df.application.l7_protocol"], self.l7.protocol());
        a.str(&["telemetry.sdk.name"], "deepflow");
        a.str(&["telemetry.sdk.version"], sdk_version);
        for (pod, sfx) in [(&self.client, "_0"), (&self.server, "_1")] {
            a.str(&["df.universal_tag.host", sfx], pod.host);
            a.str(&["df.universal_tag.pod_node", sfx], pod.host);
            a.str(&["df.universal_tag.pod_ns", sfx], &pod.ns);
            a.str(&["df.universal_tag.pod", sfx], &pod.pod);
            a.str(&["df.universal_tag.pod_service", sfx], pod.svc.name);
            a.str(&["df.universal_tag.auto_instance", sfx], &pod.pod);
            a.str(&["df.universal_tag.auto_service", sfx], pod.svc.name);
            a.str(&["df.custom_tag.k8s.labels.app", sfx], pod.svc.name);
        }
    }

    /// The span attributes DeepFlow writes for the row (`ebpf-spans.md` §3).
    fn span_attrs(&self, a: &mut impl AttrSink) {
        a.str(&["df.span.type"], self.row_type.as_str());
        if let (true, L7::Http { path, .. }) = (self.has_request(), &self.l7) {
            a.str(&["df.span.endpoint"], path);
        }
        if let Some((t, s)) = self.header {
            a.str(&["df.span.native.trace_id"], &hex(&t));
            a.str(&["df.span.native.span_id"], &hex(&s));
        }
        if let Some(sys) = self.sys {
            // u64 written as int64 (`ebpf-spans.md` §6): large ids arrive negative.
            a.int_nz(&["df.span.syscall_trace_id_request"], sys.req as i64);
            a.int_nz(&["df.span.syscall_trace_id_response"], sys.resp as i64);
            a.int_nz(&["df.span.syscall_thread_0"], sys.thread[0] as i64);
            a.int_nz(&["df.span.syscall_thread_1"], sys.thread[1] as i64);
            a.int_nz(&["df.span.syscall_cap_seq_0"], sys.cap_seq[0] as i64);
            a.int_nz(&["df.span.syscall_cap_seq_1"], sys.cap_seq[1] as i64);
        }
        // Orientation of net.*: SERVER kind describes side 1 as the host (§3).
        let client_side = self.tap.is_client();
        let (host, peer) = if client_side {
            (&self.client, &self.server)
        } else {
            (&self.server, &self.client)
        };
        a.str(&["net.host.name"], host.host);
        match &self.l7 {
            // HTTP overwrites net.peer.name with the request domain.
            L7::Http { domain, .. } => a.str(&["net.peer.name"], domain),
            _ => a.str(&["net.peer.name"], peer.host),
        }
        let (host_port, peer_port) = if client_side {
            (self.client_port, self.server.svc.port)
        } else {
            (self.server.svc.port, self.client_port)
        };
        a.int_nz(&["net.host.port"], host_port as i64);
        a.int_nz(&["net.peer.port"], peer_port as i64);
        a.str(&["net.sock.host.addr"], &host.ip);
        a.str(&["net.sock.peer.addr"], &peer.ip);
        match &self.l7 {
            L7::Http {
                method,
                path,
                status_code,
                ..
            } => {
                a.str(&["http.flavor"], "1.1");
                if self.has_request() {
                    a.str(&["http.method"], method);
                    a.str(&["df.http.path"], path);
                }
                if self.has_response() {
                    a.int(&["http.status_code"], *status_code as i64);
                }
            }
            L7::Mysql {
                command, statement, ..
            } => {
                a.str(&["db.system"], "mysql");
                if self.has_request() {
                    a.str(&["db.operation"], command);
                    a.str(&["db.statement"], statement);
                }
            }
            L7::Redis { command, key } => {
                a.str(&["db.system"], "redis");
                if self.has_request() {
                    a.str(&["db.operation"], command);
                    a.str(&["db.statement"], &format!("{command} {key}"));
                }
            }
        }
        if self.has_request() {
            a.int_nz(
                &["df.metrics.request_length"],
                64 + self.name().len() as i64,
            );
        }
        if self.has_response() {
            a.int_nz(&["df.metrics.response_length"], 128);
        }
        if self.row_type == RowType::Session {
            let d = self.end_us.saturating_sub(self.start_us) as i64;
            a.int_nz(&["df.metrics.response_duration_us"], d);
        }
    }

    fn parent_id(&self) -> [u8; 8] {
        match self.header {
            Some((_, s)) => s,
            // No header span id: DeepFlow sets parent = self (deepflow issue #4252).
            None => self.row_id.to_be_bytes(),
        }
    }

    fn kind(&self) -> i32 {
        if self.tap.is_client() {
            KIND_CLIENT
        } else {
            KIND_SERVER
        }
    }

    /// One ResourceSpans holding this row as DeepFlow's `EncodeToOtlp` writes it.
    pub fn encode(&self, sdk_version: &str) -> ResourceSpans {
        let mut ra = Vec::new();
        self.resource_attrs(sdk_version, &mut ra);
        let mut sa = Vec::new();
        self.span_attrs(&mut sa);
        let events = self
            .exception
            .iter()
            .map(|e| span::Event {
                // DeepFlow writes the exception as one event named by its text.
                time_unix_nano: self.end_us * 1000,
                name: e.clone(),
                attributes: Vec::new(),
                dropped_attributes_count: 0,
            })
            .collect();
        let span = Span {
            trace_id: self.otlp_trace_id().to_vec(),
            span_id: self.row_id.to_be_bytes().to_vec(),
            parent_span_id: self.parent_id().to_vec(),
            name: self.name(),
            kind: self.kind(),
            start_time_unix_nano: self.start_us * 1000,
            end_time_unix_nano: self.end_us * 1000,
            attributes: sa,
            events,
            status: Some(Status {
                message: String::new(),
                code: response_status::otlp(self.status),
            }),
            ..Span::default()
        };
        ResourceSpans {
            resource: Some(Resource {
                attributes: ra,
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope::default()),
                spans: vec![span],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }
    }

    /// The same ResourceSpans as [`Row::encode`], written straight to protobuf bytes as one
    /// `resource_spans` field: no attribute is allocated, which makes the sender's generation
    /// several times cheaper.
    pub fn encode_field(&self, sdk_version: &str) -> Encoded {
        let mut res = Vec::with_capacity(1536);
        self.resource_attrs(sdk_version, &mut WireAttrs::new(&mut res, 0x0a));
        let mut sp = Vec::with_capacity(1024);
        sp.extend_from_slice(&[0x0a, 16]);
        sp.extend_from_slice(&self.otlp_trace_id());
        sp.extend_from_slice(&[0x12, 8]);
        sp.extend_from_slice(&self.row_id.to_be_bytes());
        sp.extend_from_slice(&[0x22, 8]);
        sp.extend_from_slice(&self.parent_id());
        let name = self.name();
        if !name.is_empty() {
            sp.push(0x2a);
            put_varint(&mut sp, name.len() as u64);
            sp.extend_from_slice(name.as_bytes());
        }
        sp.push(0x30);
        put_varint(&mut sp, self.kind() as u64);
        if self.start_us != 0 {
            sp.push(0x39);
            sp.extend_from_slice(&(self.start_us * 1000).to_le_bytes());
        }
        if self.end_us != 0 {
            sp.push(0x41);
            sp.extend_from_slice(&(self.end_us * 1000).to_le_bytes());
        }
        self.span_attrs(&mut WireAttrs::new(&mut sp, 0x4a));
        if let Some(e) = &self.exception {
            let ev_len = 9 + 1 + varint_len(e.len() as u64) + e.len();
            sp.push(0x5a);
            put_varint(&mut sp, ev_len as u64);
            sp.push(0x09);
            sp.extend_from_slice(&(self.end_us * 1000).to_le_bytes());
            sp.push(0x12);
            put_varint(&mut sp, e.len() as u64);
            sp.extend_from_slice(e.as_bytes());
        }
        let code = response_status::otlp(self.status) as u64;
        sp.push(0x7a);
        if code == 0 {
            sp.push(0);
        } else {
            sp.push(1 + varint_len(code) as u8);
            sp.push(0x18);
            put_varint(&mut sp, code);
        }
        // ScopeSpans: an empty scope, then the span.
        let ss_len = 2 + 1 + varint_len(sp.len() as u64) + sp.len();
        let rs_len =
            1 + varint_len(res.len() as u64) + res.len() + 1 + varint_len(ss_len as u64) + ss_len;
        let mut out = Vec::with_capacity(rs_len + 11);
        out.push(0x0a);
        put_varint(&mut out, rs_len as u64);
        out.push(0x0a);
        put_varint(&mut out, res.len() as u64);
        out.extend_from_slice(&res);
        out.push(0x12);
        put_varint(&mut out, ss_len as u64);
        out.extend_from_slice(&[0x0a, 0x00, 0x12]);
        put_varint(&mut out, sp.len() as u64);
        out.extend_from_slice(&sp);
        Encoded::from_field(Bytes::from(out), 1)
    }
}

/// Where a row's attributes go: proto `KeyValue`s ([`Row::encode`]) or protobuf bytes
/// ([`Row::encode_field`]); one attribute list serves both. A key is the concatenation of its
/// parts, so suffixed keys (`..._0`) need no formatting.
pub trait AttrSink {
    fn str(&mut self, key: &[&str], v: &str);
    fn int(&mut self, key: &[&str], v: i64);
    fn boolean(&mut self, key: &[&str], v: bool);
    /// DeepFlow omits zero values (`ebpf-spans.md` §3).
    fn int_nz(&mut self, key: &[&str], v: i64) {
        if v != 0 {
            self.int(key, v);
        }
    }
}

impl AttrSink for Vec<KeyValue> {
    fn str(&mut self, key: &[&str], v: &str) {
        self.push(kv_str(&key.concat(), v));
    }
    fn int(&mut self, key: &[&str], v: i64) {
        self.push(kv_int(&key.concat(), v));
    }
    fn boolean(&mut self, key: &[&str], v: bool) {
        self.push(kv_bool(&key.concat(), v));
    }
}

/// Writes each attribute as a `KeyValue` field with tag `tag` (0x0a in a Resource, 0x4a in a
/// Span).
pub struct WireAttrs<'a> {
    buf: &'a mut Vec<u8>,
    tag: u8,
}

impl<'a> WireAttrs<'a> {
    pub fn new(buf: &'a mut Vec<u8>, tag: u8) -> WireAttrs<'a> {
        WireAttrs { buf, tag }
    }

    /// KeyValue { 1: key, 2: AnyValue of `any_len` bytes written by `any` }.
    fn kv(&mut self, key: &[&str], any_len: usize, any: impl FnOnce(&mut Vec<u8>)) {
        let klen: usize = key.iter().map(|k| k.len()).sum();
        let kv_len = 1 + varint_len(klen as u64) + klen + 1 + varint_len(any_len as u64) + any_len;
        self.buf.push(self.tag);
        put_varint(self.buf, kv_len as u64);
        self.buf.push(0x0a);
        put_varint(self.buf, klen as u64);
        for k in key {
            self.buf.extend_from_slice(k.as_bytes());
        }
        self.buf.push(0x12);
        put_varint(self.buf, any_len as u64);
        any(self.buf);
    }
}

impl AttrSink for WireAttrs<'_> {
    fn str(&mut self, key: &[&str], v: &str) {
        let n = v.len();
        self.kv(key, 1 + varint_len(n as u64) + n, |b| {
            b.push(0x0a);
            put_varint(b, n as u64);
            b.extend_from_slice(v.as_bytes());
        });
    }
    fn int(&mut self, key: &[&str], v: i64) {
        self.kv(key, 1 + varint_len(v as u64), |b| {
            b.push(0x18);
            put_varint(b, v as u64);
        });
    }
    fn boolean(&mut self, key: &[&str], v: bool) {
        self.kv(key, 2, |b| {
            b.push(0x10);
            b.push(v as u8);
        });
    }
}

/// DeepFlow's fake trace id for a row without one: `_id` big-endian, then eight zero bytes.
pub fn fake_trace_id(row_id: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&row_id.to_be_bytes());
    t
}

/// DeepFlow's row id: `end_time_s << 32 | (analyzer_id & 0x3ff) << 22 | counter & 0x3fffff`
/// (`genID`). The generator's counter runs over the analyzer bits too, so ids stay unique for
/// 2^32 rows ending in one second.
pub fn row_id(end_us: u64, counter: u64) -> u64 {
    let end_s = end_us / 1_000_000;
    (end_s << 32) | (((counter >> 22) & 0x3ff) << 22) | (counter & 0x3f_ffff)
}
