//! The association rules of join.md §3 and §4, as pure functions over two spans.
//!
//! The streaming part (`state`) uses them to decide which spans belong to one group; the tree
//! builder (`tree`) uses them again, on the merged models, to place the spans.

use tailweave_core::ebpf::{flags, EbpfSpan, TapSide};
use tailweave_core::{AttrValue, Span};

/// The tolerances in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub network_delay: u64,
    pub host_clock_offset: u64,
    pub app_slack: u64,
    pub syscall_ttl: u64,
}

impl Tol {
    /// `dev(a, b)` of join.md §1.
    pub fn dev(&self, a: &EbpfSpan, b: &EbpfSpan) -> u64 {
        if a.agent == b.agent {
            self.network_delay
        } else {
            self.network_delay + self.host_clock_offset
        }
    }
}

/// The relation that placed a span (`tailweave.join.via`), strongest first (join.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    TcpSeq,
    SpanId,
    Syscall,
    XRequestId,
    TraceId,
}

impl Via {
    pub fn as_str(&self) -> &'static str {
        match self {
            Via::TcpSeq => "tcp_seq",
            Via::SpanId => "span_id",
            Via::Syscall => "syscall",
            Via::XRequestId => "x_request_id",
            Via::TraceId => "trace_id",
        }
    }
}

fn absdiff(a: u64, b: u64) -> u64 {
    a.abs_diff(b)
}

/// `covers(p, c)` of join.md §1 (callers use it only on one agent or host).
pub fn covers(p: &EbpfSpan, c: &EbpfSpan) -> bool {
    p.start_ns <= c.start_ns && c.end_ns <= p.end_ns
}

fn timed(e: &EbpfSpan) -> bool {
    !e.has(flags::NO_TIMESTAMPS)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Frag {
    Request,
    Response,
    Session,
}

pub fn frag(e: &EbpfSpan) -> Frag {
    if e.has(flags::REQUEST_ONLY) {
        Frag::Request
    } else if e.has(flags::RESPONSE_ONLY) {
        Frag::Response
    } else {
        Frag::Session
    }
}

/// HTTP2 (21) and gRPC (41) count as one protocol when rows are compared.
pub fn same_l7(a: u8, b: u8) -> bool {
    let n = |p: u8| if p == 41 { 21 } else { p };
    n(a) == n(b)
}

/// The tcp_seq relation of join.md §4.3 (DeepFlow's `L7NetworkMeta.is_relate`).
pub fn tcp_related(sa: &Span, a: &EbpfSpan, sb: &Span, b: &EbpfSpan, tol: &Tol) -> bool {
    if !timed(a) || !timed(b) || a.has(flags::NO_KEYS) || b.has(flags::NO_KEYS) {
        return false;
    }
    let dev = tol.dev(a, b);
    let ok = match (frag(a), frag(b)) {
        (Frag::Session, Frag::Session) => {
            a.req_tcp_seq == b.req_tcp_seq
                && a.resp_tcp_seq == b.resp_tcp_seq
                && (a.req_tcp_seq != 0 || a.resp_tcp_seq != 0)
                && absdiff(a.start_ns, b.start_ns) <= dev
                && absdiff(a.end_ns, b.end_ns) <= dev
        }
        (Frag::Request, Frag::Response) | (Frag::Response, Frag::Request) => false,
        (Frag::Request, _) | (_, Frag::Request) => {
            a.req_tcp_seq != 0
                && a.req_tcp_seq == b.req_tcp_seq
                && absdiff(a.start_ns, b.start_ns) <= dev
        }
        _ => {
            a.resp_tcp_seq != 0
                && a.resp_tcp_seq == b.resp_tcp_seq
                && absdiff(a.end_ns, b.end_ns) <= dev
        }
    };
    ok && !field_conflict(sa, a, sb, b)
}

/// Span attributes compared by §4.3 when the trace ids cannot decide, in slots so each span's
/// attributes are scanned once per comparison.
const SLOTS: usize = 17;
/// Slots below this index are compared only when the protocols are equal (resource, endpoint).
const RESOURCE_SLOTS: std::ops::Range<usize> = 10..14;

fn slot(key: &str) -> Option<usize> {
    Some(match key {
        "df.http.proxy_client" => 0,
        "http.flavor" => 1,
        "http.method" => 2,
        "rpc.method" => 3,
        "df.mysql.request_type" => 4,
        "df.postgresql.request_type" => 5,
        "df.dns.request_type" => 6,
        "df.request_domain" => 7,
        "df.kafka.request_domain" => 8,
        "df.mqtt.request_domain" => 9,
        "df.http.path" => 10,
        "rpc.service" => 11,
        "db.statement" => 12,
        "df.global.request_resource" => 13,
        "http.status_code" => 14,
        "df.response_code" => 15,
        "df.dns.response_result" => 16,
        _ => return None,
    })
}

fn compared_attrs(s: &Span) -> [Option<AttrValue<'_>>; SLOTS] {
    let mut out = [None; SLOTS];
    for (k, v) in s.attrs() {
        if let Some(i) = slot(k) {
            out[i] = Some(v);
        }
    }
    out
}

fn attr_eq(x: AttrValue<'_>, y: AttrValue<'_>, limit: usize) -> bool {
    match (x, y) {
        (AttrValue::Str(a), AttrValue::Str(b)) => {
            a.as_bytes()[..a.len().min(limit)] == b.as_bytes()[..b.len().min(limit)]
        }
        (a, b) => a == b,
    }
}

/// "No field conflict" of join.md §4.3.
pub fn field_conflict(sa: &Span, a: &EbpfSpan, sb: &Span, b: &EbpfSpan) -> bool {
    if let (Some(ka), Some(kb)) = (a.trace_key, b.trace_key) {
        return ka != kb || a.header_span_id != b.header_span_id;
    }
    let both = |x: &Option<std::sync::Arc<str>>, y: &Option<std::sync::Arc<str>>| matches!((x, y), (Some(p), Some(q)) if p != q);
    if both(&a.x_request_id[0], &b.x_request_id[0]) || both(&a.x_request_id[1], &b.x_request_id[1])
    {
        return true;
    }
    if matches!((a.request_id, b.request_id), (Some(x), Some(y)) if x != y) {
        return true;
    }
    let mut same_proto = true;
    if a.l7_protocol != 0 && b.l7_protocol != 0 {
        if !same_l7(a.l7_protocol, b.l7_protocol) {
            return true;
        }
        same_proto = a.l7_protocol == b.l7_protocol;
    }
    if same_proto && both(&a.endpoint, &b.endpoint) {
        return true;
    }
    if a.l4_protocol != 0 && b.l4_protocol != 0 && a.l4_protocol != b.l4_protocol {
        return true;
    }
    let (xa, xb) = (compared_attrs(sa), compared_attrs(sb));
    (0..SLOTS).any(|i| {
        if RESOURCE_SLOTS.contains(&i) && !same_proto {
            return false;
        }
        let limit = if RESOURCE_SLOTS.contains(&i) {
            1024
        } else {
            usize::MAX
        };
        matches!((xa[i], xb[i]), (Some(x), Some(y)) if !attr_eq(x, y, limit))
    })
}

/// Same process (join.md §1): same agent and local pid, or local instance when a pid is missing.
pub fn same_process(a: &EbpfSpan, b: &EbpfSpan) -> bool {
    if a.agent != b.agent {
        return false;
    }
    match (a.local_pid(), b.local_pid()) {
        (0, _) | (_, 0) => {
            matches!((a.local_instance(), b.local_instance()), (Some(x), Some(y)) if x == y)
        }
        (x, y) => x == y,
    }
}

/// What a syscall edge says (join.md §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysRel {
    /// `a` (`s-p`) is the process-level parent of `b` (`c-p`). `same_side` tells the id pairing.
    Parent { same_side: bool },
    /// `a` and `b` are `c-p` siblings, `a` first.
    Before,
}

/// The syscall relation between `a` and `b` in that orientation, with `true` if the threads on
/// the matched ids differ (the thread guard decides). Callers test both orientations.
pub fn syscall_rel(a: &EbpfSpan, b: &EbpfSpan, tol: &Tol) -> Option<(SysRel, bool)> {
    if !a.is_system() || !b.is_system() || !timed(a) || !timed(b) {
        return None;
    }
    if a.has(flags::NO_KEYS) || b.has(flags::NO_KEYS) {
        return None;
    }
    let terminal = |e: &EbpfSpan| e.syscall_req == e.syscall_resp;
    if terminal(a) || terminal(b) || !same_process(a, b) {
        return None;
    }
    if absdiff(a.start_ns, b.start_ns) > tol.syscall_ttl {
        return None;
    }
    let eq = |x: u64, y: u64| x != 0 && x == y;
    let thr = |i: usize, j: usize| {
        let (x, y) = (a.syscall_thread[i], b.syscall_thread[j]);
        x != 0 && y != 0 && x != y
    };
    match (&a.tap_side, &b.tap_side) {
        (TapSide::SP, TapSide::CP) => {
            let timing = if a.duration_us == 0 || a.end_ns <= a.start_ns {
                a.start_ns <= b.start_ns
            } else {
                covers(a, b)
            };
            if !timing {
                return None;
            }
            if eq(a.syscall_req, b.syscall_req) {
                Some((SysRel::Parent { same_side: true }, thr(0, 0)))
            } else if eq(a.syscall_resp, b.syscall_resp) {
                Some((SysRel::Parent { same_side: true }, thr(1, 1)))
            } else if eq(a.syscall_req, b.syscall_resp) {
                Some((SysRel::Parent { same_side: false }, thr(0, 1)))
            } else if eq(a.syscall_resp, b.syscall_req) {
                Some((SysRel::Parent { same_side: false }, thr(1, 0)))
            } else {
                None
            }
        }
        (TapSide::CP, TapSide::CP) => {
            if eq(a.syscall_resp, b.syscall_req) && a.end_ns <= b.start_ns {
                Some((SysRel::Before, thr(1, 0)))
            } else if a.syscall_resp == 0
                && eq(a.syscall_req, b.syscall_req)
                && a.start_ns <= b.start_ns
            {
                Some((SysRel::Before, thr(0, 0)))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The x_request_id relation (join.md §4.5), `a` upstream of `b`.
pub fn xreq_upstream(a: &EbpfSpan, b: &EbpfSpan) -> bool {
    if a.has(flags::NO_KEYS) || b.has(flags::NO_KEYS) {
        return false;
    }
    let eq = |x: &Option<std::sync::Arc<str>>, y: &Option<std::sync::Arc<str>>| matches!((x, y), (Some(p), Some(q)) if p == q && !p.is_empty());
    let (ax, bx) = (&a.x_request_id, &b.x_request_id);
    if a.agent == b.agent && timed(a) && timed(b) && !covers(a, b) {
        return false;
    }
    if a.tap_side == TapSide::SP && b.tap_side == TapSide::CP && same_process(a, b) {
        return (eq(&ax[0], &bx[0]) || eq(&ax[1], &bx[1]) || eq(&ax[1], &bx[0])) && covers(a, b);
    }
    eq(&ax[1], &bx[0])
        || ((eq(&ax[0], &bx[0]) || eq(&ax[1], &bx[1])) && a.duration_us >= b.duration_us)
}

/// Whether response fragment `r` may pair with request fragment `q` (join.md §3), or `Stop` when
/// the scan must end (same request id, different protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pair {
    Yes,
    No,
    Stop,
}

pub fn pairs(q: &EbpfSpan, r: &EbpfSpan) -> Pair {
    let mysql = q.l7_protocol == 60 || r.l7_protocol == 60;
    if !mysql && q.request_id != r.request_id {
        return Pair::No;
    }
    if q.l7_protocol != r.l7_protocol {
        return Pair::Stop;
    }
    if q.start_ns > r.end_ns {
        return Pair::No;
    }
    if q.is_system() && q.syscall_cap_seq[0].wrapping_add(1) != r.syscall_cap_seq[1] {
        return Pair::No;
    }
    if let (Some(a), Some(b)) = (q.trace_key, r.trace_key) {
        if a != b {
            return Pair::No;
        }
    }
    Pair::Yes
}

/// Whether zero-duration frame row `f` belongs to gRPC/HTTP2 session `s` of the same stream
/// (join.md §3; the caller matched agent, flow, tap side and request id). A frame cannot come
/// before its stream opened, and the trace keys must not conflict.
pub fn frame_of(s: &EbpfSpan, f: &EbpfSpan) -> bool {
    let keys_agree = match (s.trace_key, f.trace_key) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    same_l7(s.l7_protocol, f.l7_protocol) && s.start_ns <= f.end_ns && keys_agree
}

/// The merged session of request fragment `q` and response fragment `r` (join.md §3).
pub fn merge_models(q: &EbpfSpan, r: &EbpfSpan) -> EbpfSpan {
    let mut m = q.clone();
    m.merged_row_ids.push(r.row_id);
    m.merged_row_ids.extend_from_slice(&r.merged_row_ids);
    m.end_ns = q.end_ns.max(r.end_ns);
    m.duration_us = m.end_ns.saturating_sub(m.start_ns) / 1000;
    m.resp_tcp_seq = r.resp_tcp_seq;
    m.syscall_resp = r.syscall_resp;
    m.syscall_thread[1] = r.syscall_thread[1];
    m.syscall_cap_seq[1] = r.syscall_cap_seq[1];
    m.x_request_id[1] = r.x_request_id[1].clone();
    if m.trace_key.is_none() {
        m.trace_key = r.trace_key;
        m.header_span_id = r.header_span_id;
    }
    if m.endpoint.is_none() {
        m.endpoint = r.endpoint.clone();
    }
    if m.request_id.is_none() {
        m.request_id = r.request_id;
    }
    for side in 0..2 {
        if m.pid[side] == 0 {
            m.pid[side] = r.pid[side];
        }
        if m.instance[side].is_none() {
            m.instance[side] = r.instance[side].clone();
        }
        if m.host[side].is_none() {
            m.host[side] = r.host[side].clone();
        }
    }
    m.flags &= !(flags::REQUEST_ONLY | flags::RESPONSE_ONLY | flags::TIMED_OUT | flags::ERROR);
    m.flags |= flags::SESSION | (r.flags & flags::ERROR);
    m
}
