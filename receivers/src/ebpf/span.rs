//! From [`Call`]s to spans in the model the `deepflow` normalizer produces.
//!
//! Each call becomes one span under its own resource, as a DeepFlow row does (`ebpf-spans.md`
//! §2.1), carrying the same `df.*` attributes a DeepFlow export with every category would, and
//! `ebpf = Some(EbpfSpan)` filled directly (a test reads the attributes back through the
//! normalizer and checks both agree). Differences from DeepFlow, on purpose: a call without a
//! `traceparent` has no parent (DeepFlow sets parent = self, issue #4252), and only the local
//! side's pid, process name and host are known.
//!
//! Trace identity: with a valid `traceparent` the trace id is its trace id and the parent (the
//! header span id) its parent id, the caller's client span; without one the trace id is
//! DeepFlow's fake form (row id, zero padded), so the span has no trace key and the join
//! associates it by TCP sequence and syscall trace id.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prost::Message;

use tailweave_core::ebpf::{flags, EbpfSpan, Signal, TapSide};
use tailweave_core::proto::tonic::common::v1::{
    any_value, AnyValue, InstrumentationScope, KeyValue,
};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{span, status, Span as ProtoSpan, Status};
use tailweave_core::span::hex;
use tailweave_core::{Resource, Scope, Span, SpanSource};

use super::proto::http::parse_traceparent;
use super::proto::L7;
use super::session::{Call, Role};

/// The instrumentation scope of every span this receiver makes.
pub const SCOPE_NAME: &str = "tailweave.ebpf";

/// Builds spans; holds what every span shares and the row id counter.
pub struct SpanBuilder {
    agent: Arc<str>,
    host: Arc<str>,
    /// Low 32 bits of the next row id; the high 32 are the end time in seconds (DeepFlow's `_id`
    /// layout), so ids stay unique across restarts more than a second apart.
    counter: u32,
    /// Encoded per-socket resource attributes, by flow id (bounded: cleared when full).
    fixed: HashMap<(u64, u8, bool), Bytes>,
    /// The encoded instrumentation scope every span shares.
    scope: Bytes,
}

/// Sockets whose fixed resource part is kept encoded.
const MAX_CACHED_RESOURCES: usize = 8192;

impl SpanBuilder {
    pub fn new(agent: &str, host: &str) -> SpanBuilder {
        SpanBuilder {
            agent: agent.into(),
            host: host.into(),
            counter: 0,
            fixed: HashMap::new(),
            scope: Bytes::from(
                InstrumentationScope {
                    name: SCOPE_NAME.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        }
    }

    fn row_id(&mut self, end_ns: u64) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        let id = ((end_ns / 1_000_000_000) << 32) | self.counter as u64;
        id.max(1)
    }

    /// The resource attributes that stay the same for every call of one socket.
    fn fixed_attrs(
        &self,
        c: &Call,
        tap: &TapSide,
        side: usize,
        client: (std::net::IpAddr, u16),
        server: (std::net::IpAddr, u16),
    ) -> Vec<KeyValue> {
        vec![
            s("service.name", &c.comm),
            s("telemetry.sdk.name", "tailweave-ebpf"),
            s("df.capture_info.signal_source", "eBPF"),
            s("df.capture_info.observation_point", tap.code()),
            s("df.capture_info.agent", &self.agent),
            s("df.application.l7_protocol", c.l7.name()),
            s("df.network.protocol", "TCP"),
            kv(
                "df.network.is_ipv4",
                any_value::Value::BoolValue(client.0.is_ipv4()),
            ),
            s("df.network.ip_0", &client.0.to_string()),
            s("df.network.ip_1", &server.0.to_string()),
            i("df.transport.client_port", client.1 as i64),
            i("df.transport.server_port", server.1 as i64),
            i("df.flow_info.flow_id", c.flow_id as i64),
            i(&format!("process.pid_{side}"), c.pid as i64),
            s(&format!("thread.name_{side}"), &c.comm),
            s(&format!("df.universal_tag.host_{side}"), &self.host),
        ]
    }

    pub fn build(&mut self, c: &Call) -> Span {
        let (tap, side, kind) = match c.role {
            Role::Client => (TapSide::CP, 0usize, span::SpanKind::Client),
            Role::Server => (TapSide::SP, 1usize, span::SpanKind::Server),
        };
        let req = c.request.as_ref();
        let resp = c.response.as_ref();
        let start_ns = req
            .map(|(m, _)| m.ts_ns)
            .or(resp.map(|(m, _)| m.ts_ns))
            .unwrap_or(0);
        let end_ns = resp.map_or(start_ns, |(m, _)| m.ts_ns).max(start_ns);
        let row_id = self.row_id(end_ns);

        let tp = req
            .and_then(|(_, r)| r.traceparent.as_deref())
            .and_then(parse_traceparent);
        let mut f = match (req, resp) {
            (Some(_), Some(_)) => flags::SESSION,
            (Some((_, r)), None) if r.one_way => flags::SESSION,
            (Some(_), None) => flags::REQUEST_ONLY,
            _ => flags::RESPONSE_ONLY,
        };
        let error = resp.is_some_and(|(_, r)| r.error);
        if error {
            f |= flags::ERROR;
        }
        if f & flags::REQUEST_ONLY != 0 {
            // Status stays Unset: the call got no answer (ebpf-spans.md §7.3).
            f |= flags::TIMED_OUT;
        }
        let (trace_id, parent, trace_key) = match tp {
            Some((t, s)) => (t, Some(s), Some(t)),
            None => {
                f |= flags::FAKE_TRACE_ID;
                let mut t = [0u8; 16];
                t[..8].copy_from_slice(&row_id.to_be_bytes());
                (t, None, None)
            }
        };

        let (client, server) = match c.role {
            Role::Client => (c.local, c.remote),
            Role::Server => (c.remote, c.local),
        };
        let req_seq = req.map_or(0, |(m, _)| m.seq);
        let resp_seq = resp.map_or(0, |(m, _)| m.seq);
        let x_req = req
            .and_then(|(_, r)| r.x_request_id.as_deref())
            .map(Arc::<str>::from);
        let x_resp = resp
            .and_then(|(_, r)| r.x_request_id.as_deref())
            .map(Arc::<str>::from);
        let endpoint: Option<Arc<str>> = req
            .map(|(_, r)| match c.l7 {
                L7::Http1 => r.resource.split('?').next().unwrap_or("").to_string(),
                L7::Redis => r.method.clone(),
                L7::Mysql => String::new(),
            })
            .filter(|e| !e.is_empty())
            .map(Arc::from);
        let duration_us = end_ns.saturating_sub(start_ns) / 1000;

        let mut m = EbpfSpan {
            row_id,
            otlp_trace_id: trace_id,
            trace_key,
            header_span_id: parent,
            flow_id: c.flow_id,
            signal: Signal::Ebpf,
            tap_side: tap.clone(),
            agent: self.agent.clone(),
            l7_protocol: c.l7.id(),
            // The kernel side captures TCP sockets only.
            l4_protocol: 6,
            endpoint: endpoint.clone(),
            req_tcp_seq: req_seq,
            resp_tcp_seq: resp_seq,
            syscall_req: req.map_or(0, |(m, _)| m.trace_id),
            syscall_resp: resp.map_or(0, |(m, _)| m.trace_id),
            syscall_thread: [
                req.map_or(0, |(m, _)| m.tid),
                resp.map_or(0, |(m, _)| m.tid),
            ],
            syscall_cap_seq: [
                req.map_or(0, |(m, _)| m.cap_seq),
                resp.map_or(0, |(m, _)| m.cap_seq),
            ],
            x_request_id: [x_req.clone(), x_resp.clone()],
            ip: [Some(client.0), Some(server.0)],
            port: [client.1, server.1],
            start_ns,
            end_ns,
            duration_us,
            flags: f,
            ..EbpfSpan::default()
        };
        m.pid[side] = c.pid;
        m.process_name[side] = Some(c.comm.clone());
        m.host[side] = Some(self.host.clone());

        // The resource: what DeepFlow writes per row (§3), local side only. The part fixed for
        // the socket is encoded once per socket; the per-row part is appended (repeated fields
        // concatenate).
        let cache_key = (c.flow_id, c.l7.id(), c.role == Role::Client);
        let fixed = match self.fixed.get(&cache_key) {
            Some(b) => b.clone(),
            None => {
                let b = Bytes::from(
                    ProtoResource {
                        attributes: self.fixed_attrs(c, &tap, side, client, server),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                );
                if self.fixed.len() >= MAX_CACHED_RESOURCES {
                    self.fixed.clear();
                }
                self.fixed.insert(cache_key, b.clone());
                b
            }
        };
        // Resource.attributes is field 1.
        let mut ra = Attrs::new(1, 96);
        ra.i("df.flow_info.id", row_id as i64);
        ra.opt_i("df.transport.req_tcp_seq", req_seq as u64);
        ra.opt_i("df.transport.resp_tcp_seq", resp_seq as u64);
        let mut raw = BytesMut::with_capacity(fixed.len() + ra.buf.len());
        raw.extend_from_slice(&fixed);
        raw.extend_from_slice(&ra.buf);
        let resource = Resource::new(raw.freeze(), Bytes::new());
        let scope = Scope::new(resource, self.scope.clone(), Bytes::new());
        let span_type = if f & flags::SESSION != 0 {
            "session"
        } else if f & flags::REQUEST_ONLY != 0 {
            "request"
        } else {
            "response"
        };
        // Span.attributes is field 9.
        let mut sa = Attrs::new(9, 1024);
        sa.s("df.span.type", span_type);
        sa.opt_i("df.span.syscall_trace_id_request", m.syscall_req);
        sa.opt_i("df.span.syscall_trace_id_response", m.syscall_resp);
        sa.opt_i("df.span.syscall_thread_0", m.syscall_thread[0] as u64);
        sa.opt_i("df.span.syscall_thread_1", m.syscall_thread[1] as u64);
        sa.opt_i("df.span.syscall_cap_seq_0", m.syscall_cap_seq[0] as u64);
        sa.opt_i("df.span.syscall_cap_seq_1", m.syscall_cap_seq[1] as u64);
        sa.opt_i("df.metrics.response_duration_us", duration_us);
        if let Some(ep) = &endpoint {
            sa.s("df.span.endpoint", ep);
        }
        if let Some((tid, sid)) = tp {
            sa.s("df.span.native.trace_id", &hex(&tid));
            sa.s("df.span.native.span_id", &hex(&sid));
        }
        if let Some(x) = &x_req {
            sa.s("df.span.x_request_id_0", x);
        }
        if let Some(x) = &x_resp {
            sa.s("df.span.x_request_id_1", x);
        }
        let name = match (c.l7, req) {
            (L7::Http1, Some((_, r))) => {
                sa.s("http.method", &r.method);
                sa.s("df.http.path", &r.resource);
                if !r.version.is_empty() {
                    sa.s("http.flavor", &r.version);
                }
                if let Some(ts) = &r.tracestate {
                    sa.s("df.http.tracestate", ts);
                }
                format!("{} {}", r.method, endpoint.as_deref().unwrap_or(""))
            }
            (L7::Redis, Some((_, r))) => {
                sa.s("db.system", "redis");
                sa.s("db.operation", &r.method);
                sa.s("db.statement", &r.statement);
                r.method.clone()
            }
            (L7::Mysql, Some((_, r))) => {
                sa.s("db.system", "mysql");
                sa.s("df.mysql.request_type", &r.method);
                if !r.statement.is_empty() {
                    sa.s("db.statement", &r.statement);
                }
                sql_name(&r.method, &r.statement)
            }
            (l7, None) => l7.name().to_string(),
        };
        if let Some((_, r)) = resp {
            if let Some(code) = r.code {
                let key = if c.l7 == L7::Http1 {
                    "http.status_code"
                } else {
                    "df.response_code"
                };
                sa.i(key, code as i64);
            }
            if let Some(ra_) = r.affected_rows {
                sa.opt_i("df.metrics.sql_affected_rows", ra_);
            }
        }
        let mut events = Vec::new();
        if let Some(msg) = resp.and_then(|(_, r)| r.message.clone()) {
            events.push(span::Event {
                time_unix_nano: end_ns,
                name: msg,
                ..Default::default()
            });
        }
        let status = if f & flags::REQUEST_ONLY != 0 {
            status::StatusCode::Unset
        } else if error {
            status::StatusCode::Error
        } else {
            status::StatusCode::Ok
        };

        let p = ProtoSpan {
            trace_id: trace_id.to_vec(),
            span_id: row_id.to_be_bytes().to_vec(),
            parent_span_id: parent.map_or(Vec::new(), |p| p.to_vec()),
            name,
            kind: kind as i32,
            start_time_unix_nano: start_ns,
            end_time_unix_nano: end_ns,
            attributes: Vec::new(),
            events,
            status: Some(Status {
                code: status as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        // Fields may come in any order: the attributes follow the rest, encoded without building
        // a KeyValue (two Strings) per attribute.
        let mut buf = Vec::with_capacity(p.encoded_len() + sa.buf.len());
        p.encode_raw(&mut buf);
        buf.extend_from_slice(&sa.buf);
        let mut span = match Span::from_raw(scope.clone(), Bytes::from(buf)) {
            Ok(span) => span,
            // Unreachable with prost's output plus well-formed attributes; stay total anyway.
            Err(_) => Span::from_proto(scope, &p),
        };
        span.source = SpanSource::Ebpf;
        span.marks.timed_out = m.has(flags::TIMED_OUT);
        m.otlp_trace_id = trace_id;
        span.ebpf = Some(Box::new(m));
        span
    }
}

/// `"{COMMAND} {table}"` as DeepFlow names SQL spans (`SELECT orders`); the command name when
/// there is no statement.
fn sql_name(method: &str, sql: &str) -> String {
    let mut words = sql.split_whitespace();
    let Some(verb) = words.next() else {
        return method.to_string();
    };
    let verb = verb.to_ascii_uppercase();
    let table = match verb.as_str() {
        "SELECT" | "DELETE" => words.skip_while(|w| !w.eq_ignore_ascii_case("from")).nth(1),
        "INSERT" | "REPLACE" => words.skip_while(|w| !w.eq_ignore_ascii_case("into")).nth(1),
        "UPDATE" => words.next(),
        _ => None,
    };
    match table {
        Some(t) => format!(
            "{verb} {}",
            t.trim_matches(|c: char| c == '`' || c == '(' || c == ';' || c == ',')
        ),
        None => verb,
    }
}

/// Repeated `KeyValue` attributes of one field, encoded straight into bytes as prost would
/// encode them.
struct Attrs {
    field: u32,
    buf: Vec<u8>,
}

enum AttrVal<'a> {
    Str(&'a str),
    Int(i64),
}

impl Attrs {
    fn new(field: u32, capacity: usize) -> Attrs {
        Attrs {
            field,
            buf: Vec::with_capacity(capacity),
        }
    }

    fn s(&mut self, k: &str, v: &str) {
        self.put(k, AttrVal::Str(v));
    }

    fn i(&mut self, k: &str, v: i64) {
        self.put(k, AttrVal::Int(v));
    }

    /// Zero means absent for these counters and ids.
    fn opt_i(&mut self, k: &str, v: u64) {
        if v != 0 {
            self.put(k, AttrVal::Int(v as i64));
        }
    }

    fn put(&mut self, k: &str, v: AttrVal<'_>) {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
        // AnyValue: string_value = 1, int_value = 3.
        let value_len = match v {
            AttrVal::Str(s) => key_len(1) + encoded_len_varint(s.len() as u64) + s.len(),
            AttrVal::Int(n) => key_len(3) + encoded_len_varint(n as u64),
        };
        // KeyValue: key = 1, value = 2.
        let kv_len = key_len(1)
            + encoded_len_varint(k.len() as u64)
            + k.len()
            + key_len(2)
            + encoded_len_varint(value_len as u64)
            + value_len;
        let b = &mut self.buf;
        encode_key(self.field, WireType::LengthDelimited, b);
        encode_varint(kv_len as u64, b);
        encode_key(1, WireType::LengthDelimited, b);
        encode_varint(k.len() as u64, b);
        b.extend_from_slice(k.as_bytes());
        encode_key(2, WireType::LengthDelimited, b);
        encode_varint(value_len as u64, b);
        match v {
            AttrVal::Str(s) => {
                encode_key(1, WireType::LengthDelimited, b);
                encode_varint(s.len() as u64, b);
                b.extend_from_slice(s.as_bytes());
            }
            AttrVal::Int(n) => {
                encode_key(3, WireType::Varint, b);
                encode_varint(n as u64, b);
            }
        }
    }
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}
fn s(k: &str, v: &str) -> KeyValue {
    kv(k, any_value::Value::StringValue(v.into()))
}
fn i(k: &str, v: i64) -> KeyValue {
    kv(k, any_value::Value::IntValue(v))
}

#[cfg(test)]
mod tests {
    use super::super::proto::{Request, Response, SegMeta};
    use super::*;
    use crate::deepflow::normalize::{read_span, AgentCache};
    use tailweave_core::{SpanKind, StatusCode};

    fn meta(ts: u64, seq: u32, trace_id: u64, cap: u32) -> SegMeta {
        SegMeta {
            ts_ns: ts,
            seq,
            tid: 4242,
            trace_id,
            cap_seq: cap,
        }
    }

    fn http_call(role: Role, traceparent: Option<&str>, code: u32) -> Call {
        Call {
            l7: L7::Http1,
            role,
            pid: 901,
            comm: "nginx".into(),
            local: ("127.0.0.1".parse().unwrap(), 8080),
            remote: ("127.0.0.2".parse().unwrap(), 51000),
            flow_id: 17,
            request: Some((
                meta(1_700_000_000_100_000_000, 1001, 55, 3),
                Request {
                    method: "GET".into(),
                    resource: "/api/cart?id=1".into(),
                    version: "1.1".into(),
                    traceparent: traceparent.map(String::from),
                    x_request_id: Some("rid-9".into()),
                    ..Request::default()
                },
            )),
            response: Some((
                meta(1_700_000_000_142_000_000, 2002, 56, 4),
                Response {
                    code: Some(code),
                    error: code >= 400,
                    ..Response::default()
                },
            )),
        }
    }

    /// The model built directly equals what the DeepFlow normalizer reads from the attributes.
    fn assert_matches_normalizer(span: &Span) {
        let mut agents = AgentCache::default();
        let read = read_span(span, &mut agents).expect("normalizer reads it");
        assert_eq!(&read, span.ebpf.as_deref().expect("ebpf model"));
    }

    #[test]
    fn server_span_with_traceparent() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut b = SpanBuilder::new("node-1", "node-1");
        let sp = b.build(&http_call(Role::Server, Some(tp), 200));
        assert_eq!(sp.source, SpanSource::Ebpf);
        assert_eq!(sp.kind, SpanKind::Server);
        assert_eq!(sp.status, StatusCode::Ok);
        assert_eq!(sp.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sp.parent_span_id.to_hex(), "b7ad6b7169203331");
        assert_eq!(sp.name(), "GET /api/cart");
        let e = sp.ebpf.as_deref().unwrap();
        assert_eq!(e.tap_side, TapSide::SP);
        assert_eq!(e.trace_key, Some(sp.trace_id.0));
        assert_eq!(e.header_span_id, Some(sp.parent_span_id.0));
        // Server side: the remote end is the client.
        assert_eq!(e.port, [51000, 8080]);
        assert_eq!(e.pid, [0, 901]);
        assert_eq!((e.req_tcp_seq, e.resp_tcp_seq), (1001, 2002));
        assert_eq!((e.syscall_req, e.syscall_resp), (55, 56));
        assert_eq!(e.syscall_cap_seq, [3, 4]);
        assert_eq!(e.x_request_id[0].as_deref(), Some("rid-9"));
        assert_eq!(e.duration_us, 42_000);
        assert!(e.has(flags::SESSION) && !e.has(flags::FAKE_TRACE_ID));
        assert_matches_normalizer(&sp);
    }

    #[test]
    fn client_span_without_traceparent_has_no_trace_key() {
        let mut b = SpanBuilder::new("node-1", "node-1");
        let sp = b.build(&http_call(Role::Client, None, 503));
        assert_eq!(sp.kind, SpanKind::Client);
        assert_eq!(sp.status, StatusCode::Error);
        assert!(sp.parent_span_id.is_zero());
        let e = sp.ebpf.as_deref().unwrap();
        assert_eq!(e.trace_key, None);
        assert!(e.has(flags::FAKE_TRACE_ID) && e.has(flags::ERROR));
        assert_eq!(e.pid, [901, 0]);
        assert_eq!(e.port, [8080, 51000]);
        assert_eq!(
            sp.attr("http.status_code").and_then(|v| v.as_i64()),
            Some(503)
        );
        assert_matches_normalizer(&sp);
        // Row ids are unique.
        let sp2 = b.build(&http_call(Role::Client, None, 200));
        assert_ne!(sp.span_id, sp2.span_id);
    }

    #[test]
    fn request_only_redis_and_mysql() {
        let mut b = SpanBuilder::new("a", "h");
        let mut c = http_call(Role::Client, None, 200);
        c.l7 = L7::Redis;
        c.response = None;
        c.request = Some((
            meta(5_000, 77, 1, 1),
            Request {
                method: "GET".into(),
                resource: "cart:1".into(),
                statement: "GET cart:1".into(),
                ..Request::default()
            },
        ));
        let sp = b.build(&c);
        assert_eq!(sp.status, StatusCode::Unset);
        assert_eq!(sp.name(), "GET");
        assert!(sp.marks.timed_out);
        let e = sp.ebpf.as_deref().unwrap();
        assert!(e.is_request_only() && e.has(flags::TIMED_OUT));
        assert_eq!(e.resp_tcp_seq, 0);
        assert_matches_normalizer(&sp);

        c.l7 = L7::Mysql;
        c.request = Some((
            meta(5_000, 77, 1, 1),
            Request {
                method: "COM_QUERY".into(),
                statement: "select id from `orders` where id = 1".into(),
                ..Request::default()
            },
        ));
        c.response = Some((
            meta(9_000, 900, 2, 2),
            Response {
                code: Some(1146),
                error: true,
                message: Some("Table 'shop.orders' doesn't exist".into()),
                ..Response::default()
            },
        ));
        let sp = b.build(&c);
        assert_eq!(sp.name(), "SELECT orders");
        assert_eq!(sp.status, StatusCode::Error);
        assert_eq!(
            sp.decode().unwrap().events[0].name,
            "Table 'shop.orders' doesn't exist"
        );
        assert_matches_normalizer(&sp);
    }

    #[test]
    fn attrs_encode_as_prost_does() {
        let long = "x".repeat(300);
        let key = "k".repeat(130);
        let mut a = Attrs::new(9, 0);
        a.s("http.method", "GET");
        a.s(&key, &long);
        a.s("empty", "");
        a.i("n", -5);
        a.i("big", i64::MAX);
        a.opt_i("zero", 0);
        a.opt_i("seq", 4_000_000_000);
        let want = ProtoSpan {
            attributes: vec![
                s("http.method", "GET"),
                s(&key, &long),
                s("empty", ""),
                i("n", -5),
                i("big", i64::MAX),
                i("seq", 4_000_000_000),
            ],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(a.buf, want);
    }

    #[test]
    fn sql_names() {
        assert_eq!(
            sql_name("COM_QUERY", "INSERT INTO t (a) VALUES (1)"),
            "INSERT t"
        );
        assert_eq!(sql_name("COM_QUERY", "update t set a=1"), "UPDATE t");
        assert_eq!(sql_name("COM_QUERY", "BEGIN"), "BEGIN");
        assert_eq!(sql_name("COM_PING", ""), "COM_PING");
    }
}
