//! Reads DeepFlow rows (OTLP spans with `df.*` attributes) into the eBPF model of
//! `shared/docs/ebpf-spans.md` §7.
//!
//! Every span of a batch is classified (§7.1). An eBPF-derived span gets `source = Ebpf` and
//! `ebpf = Some(..)`; one whose join keys do not parse (a non-numeric sequence number, an unknown
//! observation point, a syscall id out of range, a missing `df.span.type` on a DeepFlow receiver)
//! stays a plain span and is counted in [`EBPF_MALFORMED`] with the reason: a request never fails
//! because of one bad row. Only the few spans whose name DeepFlow left empty are re-encoded (§2.6);
//! everything else is read from the bytes in place.

use std::net::IpAddr;
use std::sync::Arc;

use tailweave_core::ebpf::{flags, EbpfSpan, Signal, TapSide};
use tailweave_core::{AttrValue, Resource, Span, SpanKind, SpanSource, StatusCode};

/// eBPF-derived spans that were passed on as plain spans, by `reason`.
pub const EBPF_MALFORMED: &str = "tailweave_ebpf_malformed_total";
/// eBPF-derived spans lacking a DeepFlow export category the join needs, by `category`
/// (`ebpf-spans.md` §7.3).
pub const EBPF_MISSING_CATEGORY: &str = "tailweave_ebpf_missing_category_total";
/// eBPF-derived spans normalized, by `signal` (`ebpf` / `packet` / `other`).
pub const EBPF_SPANS: &str = "tailweave_ebpf_spans_total";

/// How the receiver that took the spans relates to DeepFlow (`ebpf-spans.md` §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A receiver dedicated to DeepFlow: every span is eBPF-derived.
    Ebpf,
    /// A shared receiver: spans are eBPF-derived when they carry DeepFlow markers.
    Shared,
}

/// Why an eBPF-derived span could not be read into the model (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// `df.span.type` absent on a span that is otherwise eBPF-derived.
    MissingSpanType,
    /// `df.span.type` is not `request`/`response`/`session`/`other`.
    SpanType,
    /// `df.capture_info.observation_point` is neither a known display name nor a known code.
    ObservationPoint,
    /// A TCP sequence number that is not a u32.
    TcpSeq,
    /// A syscall trace id that is not a 64-bit integer.
    SyscallTraceId,
    /// Another integer key (thread, cap seq, pid, flow id, request id) out of range or not numeric.
    Integer,
}

impl Malformed {
    pub fn as_str(&self) -> &'static str {
        match self {
            Malformed::MissingSpanType => "missing_span_type",
            Malformed::SpanType => "span_type",
            Malformed::ObservationPoint => "observation_point",
            Malformed::TcpSeq => "tcp_seq",
            Malformed::SyscallTraceId => "syscall_trace_id",
            Malformed::Integer => "integer",
        }
    }
}

/// Classifies each span and fills `source` and `ebpf` for eBPF-derived ones. Malformed eBPF
/// attributes never fail: such a span passes on as a plain span and a counter says why.
pub fn normalize_spans(spans: &mut [Span], role: Role) {
    // Resources are shared by the spans of one ResourceSpans: remember the last verdict.
    let mut last_res: Option<(*const Resource, bool)> = None;
    let mut agents = AgentCache::default();
    for span in spans.iter_mut() {
        let ebpf = match role {
            Role::Ebpf => true,
            Role::Shared => {
                // The resource's verdict first: it is cached for the run of spans sharing it,
                // while the span's own marker costs a walk of its attributes.
                let ptr: *const Resource = span.resource();
                let res = match last_res {
                    Some((p, v)) if p == ptr => v,
                    _ => {
                        let v = resource_is_deepflow(span.resource());
                        last_res = Some((ptr, v));
                        v
                    }
                };
                res || has_span_type(span)
            }
        };
        if !ebpf {
            continue;
        }
        match read_span(span, &mut agents) {
            Ok(model) => apply(span, model),
            Err(reason) => {
                metrics::counter!(EBPF_MALFORMED, "reason" => reason.as_str()).increment(1);
            }
        }
    }
}

/// §7.1 rule 2, span half: a `df.span.type` attribute. A span whose bytes do not hold the key
/// cannot have the attribute (protobuf stores a string's bytes as they are, whatever the framing
/// around them), so a substring search settles it for nearly every SDK span of a shared receiver;
/// a hit (the attribute, or the same bytes inside some value) is settled by the attribute walk.
/// The walk alone, for every SDK span, was 5% of the full pipeline's CPU.
fn has_span_type(span: &Span) -> bool {
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"df.span.type"));
    KEY.find(&span.raw).is_some() && span.attr("df.span.type").is_some()
}

/// §7.1 rule 2, resource half: `telemetry.sdk.name == deepflow` or any `df.` key.
pub fn resource_is_deepflow(r: &Resource) -> bool {
    // Keys compared as bytes and only the SDK name's value parsed: this runs for every resource
    // of a shared receiver, and SDK resources (the usual case) have no DeepFlow key at all.
    r.raw_attrs().any(|(k, v)| {
        k.starts_with(b"df.")
            || (k == b"telemetry.sdk.name" && AttrValue::parse(v).as_str() == Some("deepflow"))
    })
}

fn apply(span: &mut Span, model: EbpfSpan) {
    let signal = match model.signal {
        Signal::Ebpf => "ebpf",
        Signal::Packet => "packet",
        Signal::Other => "other",
    };
    metrics::counter!(EBPF_SPANS, "signal" => signal).increment(1);
    if model.has(flags::NO_TIMESTAMPS) {
        metrics::counter!(EBPF_MISSING_CATEGORY, "category" => "flow_info").increment(1);
    }
    if span.name().is_empty() {
        // §2.6: DNS, TLS, MongoDB, ... arrive unnamed.
        let proto = span
            .resource()
            .attr("df.application.l7_protocol")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let name = match (&model.endpoint, proto.is_empty()) {
            (Some(ep), false) => format!("{proto} {ep}"),
            (Some(ep), true) => ep.to_string(),
            (None, _) => proto.to_string(),
        };
        if !name.is_empty() {
            // The span decoded once already (its header parsed), so this cannot fail in practice;
            // if it did, the span keeps its empty name.
            let _ = span.edit(|p| p.name = name);
        }
    }
    span.source = SpanSource::Ebpf;
    // Provisional (§7.3): the join clears it when a response row is merged in.
    span.marks.timed_out = model.has(flags::TIMED_OUT);
    span.ebpf = Some(Box::new(model));
}

/// Interns the repeated strings of a batch (agent, pod, host, process, endpoint names): rows of
/// one batch come from few agents and pods, so most lookups hit and share one `Arc`.
#[derive(Default)]
pub struct AgentCache {
    recent: Vec<Arc<str>>,
    next: usize,
}

impl AgentCache {
    const SIZE: usize = 32;

    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.recent.iter().find(|a| &***a == s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        if self.recent.len() < Self::SIZE {
            self.recent.push(a.clone());
        } else {
            self.recent[self.next] = a.clone();
            self.next = (self.next + 1) % Self::SIZE;
        }
        a
    }

    fn opt(&mut self, v: Option<&str>) -> Option<Arc<str>> {
        v.map(|s| self.get(s))
    }
}

fn str_of<'a>(v: Option<AttrValue<'a>>) -> Option<&'a str> {
    v.and_then(|v| v.as_str()).filter(|s| !s.is_empty())
}

fn arc_of(v: Option<AttrValue<'_>>) -> Option<Arc<str>> {
    str_of(v).map(Arc::from)
}

/// An integer attribute as i128 (so both i64 and u64 string forms fit); `Ok(None)` if absent.
fn int_of(v: Option<AttrValue<'_>>) -> Result<Option<i128>, ()> {
    match v {
        None | Some(AttrValue::Empty) => Ok(None),
        Some(AttrValue::Int(i)) => Ok(Some(i as i128)),
        Some(AttrValue::Double(d)) if d.fract() == 0.0 && d.abs() < 1.9e19 => Ok(Some(d as i128)),
        Some(AttrValue::Str(s)) if s.trim().is_empty() => Ok(None),
        Some(AttrValue::Str(s)) => s.trim().parse::<i128>().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

fn u32_of(v: Option<AttrValue<'_>>, why: Malformed) -> Result<u32, Malformed> {
    match int_of(v).map_err(|_| why)? {
        None => Ok(0),
        Some(i) => u32::try_from(i).map_err(|_| why),
    }
}

/// §6: u64 ids travel as int64; a negative value is a large id.
fn u64_of(v: Option<AttrValue<'_>>, why: Malformed) -> Result<u64, Malformed> {
    match int_of(v).map_err(|_| why)? {
        None => Ok(0),
        Some(i) if (i64::MIN as i128..0).contains(&i) => Ok(i as i64 as u64),
        Some(i) => u64::try_from(i).map_err(|_| why),
    }
}

/// L7 protocol id (§5) from the exported name; `_TLS` suffix sets the TLS flag.
pub fn l7_protocol_id(name: &str) -> (u8, bool) {
    let (base, tls) = match name.strip_suffix("_TLS") {
        Some(b) => (b, true),
        None => (name, false),
    };
    const TABLE: &[(&str, u8)] = &[
        ("http", 20),
        ("http1", 20),
        ("http2", 21),
        ("dubbo", 40),
        ("grpc", 41),
        ("sofarpc", 43),
        ("fastcgi", 44),
        ("brpc", 45),
        ("tars", 46),
        ("some/ip", 47),
        ("iso8583", 48),
        ("iso-8583", 48),
        ("triple", 49),
        ("netsign", 50),
        ("mysql", 60),
        ("postgresql", 61),
        ("oracle", 62),
        ("dameng", 63),
        ("redis", 80),
        ("mongodb", 81),
        ("memcached", 82),
        ("kafka", 100),
        ("mqtt", 101),
        ("amqp", 102),
        ("openwire", 103),
        ("nats", 104),
        ("pulsar", 105),
        ("zmtp", 106),
        ("rocketmq", 107),
        ("webspheremq", 108),
        ("dns", 120),
        ("tls", 121),
        ("custom", 127),
    ];
    let id = TABLE
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(base))
        .map_or(0, |(_, id)| *id);
    (id, tls || id == 121)
}

fn hex_nibbles(s: &str) -> Option<Vec<u8>> {
    tailweave_core::span::unhex(s)
}

/// §2.2: the real trace id, or `None` when the row carries none.
pub fn trace_key(
    otlp_trace: &[u8; 16],
    span_id: &[u8; 8],
    native: Option<&str>,
) -> Option<[u8; 16]> {
    if let Some(n) = native {
        let n = n.trim().to_ascii_lowercase();
        let key = match n.len() {
            32 => hex_nibbles(&n).and_then(|v| <[u8; 16]>::try_from(v).ok()),
            16 => hex_nibbles(&n).map(|v| {
                let mut k = [0u8; 16];
                k[8..].copy_from_slice(&v);
                k
            }),
            _ => None,
        };
        let key = key.unwrap_or(*otlp_trace);
        return (key != [0; 16]).then_some(key);
    }
    if is_fake_trace_id(otlp_trace, span_id) || *otlp_trace == [0; 16] {
        return None;
    }
    Some(*otlp_trace)
}

/// The fake trace id test of §2.2 (without the `native` condition, which the caller checks).
pub fn is_fake_trace_id(trace: &[u8; 16], span_id: &[u8; 8]) -> bool {
    trace[8..] == [0; 8] && trace[..8] == span_id[..]
}

/// Reads one eBPF-derived span into the model; `agents` interns agent names across calls.
pub fn read_span(span: &Span, agents: &mut AgentCache) -> Result<EbpfSpan, Malformed> {
    // One pass over each attribute list: a lookup per key would rescan the list each time.
    let ra = Attrs::collect(span.resource().raw_attrs(), &RES_KEYS);
    let sa = Attrs::collect(span.raw_attrs(), &SPAN_KEYS);
    let mut m = EbpfSpan::default();
    let mut f = 0u16;
    match str_of(sa.attr("df.span.type")) {
        None => return Err(Malformed::MissingSpanType),
        Some("request") => f |= flags::REQUEST_ONLY,
        Some("response") => f |= flags::RESPONSE_ONLY,
        Some("session") | Some("other") => f |= flags::SESSION,
        Some(_) => return Err(Malformed::SpanType),
    }
    m.tap_side = match str_of(ra.attr("df.capture_info.observation_point")) {
        None => TapSide::Unknown,
        Some(s) => match TapSide::parse(s) {
            TapSide::Other(_) => return Err(Malformed::ObservationPoint),
            t => t,
        },
    };

    // identity
    m.row_id = span.span_id.as_u64();
    m.otlp_trace_id = span.trace_id.0;
    let native = str_of(sa.attr("df.span.native.trace_id"));
    m.trace_key = trace_key(&span.trace_id.0, &span.span_id.0, native);
    if native.is_none() && is_fake_trace_id(&span.trace_id.0, &span.span_id.0) {
        f |= flags::FAKE_TRACE_ID;
    }
    if span.parent_span_id == span.span_id {
        f |= flags::SELF_PARENT;
    } else if !span.parent_span_id.is_zero() {
        m.header_span_id = Some(span.parent_span_id.0);
    }
    m.flow_id = u64_of(ra.attr("df.flow_info.flow_id"), Malformed::Integer)?;
    m.signal = match str_of(ra.attr("df.capture_info.signal_source")) {
        Some(s) if s.eq_ignore_ascii_case("ebpf") => Signal::Ebpf,
        Some(s) if s.eq_ignore_ascii_case("packet") => Signal::Packet,
        Some(_) => Signal::Other,
        None if m.tap_side.is_process() => Signal::Ebpf,
        None => Signal::Packet,
    };
    m.agent = agents.get(str_of(ra.attr("df.capture_info.agent")).unwrap_or(""));
    let (l7, tls) =
        str_of(ra.attr("df.application.l7_protocol")).map_or((0, false), l7_protocol_id);
    m.l7_protocol = l7;
    m.l4_protocol = match str_of(ra.attr("df.network.protocol")) {
        Some(p) if p.eq_ignore_ascii_case("tcp") => 6,
        Some(p) if p.eq_ignore_ascii_case("udp") => 17,
        _ => 0,
    };
    m.is_tls = tls;
    m.request_id = match int_of(sa.attr("df.global.request_id")) {
        Ok(None) => None,
        Ok(Some(i)) => Some(u64::try_from(i).map_err(|_| Malformed::Integer)?),
        Err(()) => return Err(Malformed::Integer),
    };
    m.endpoint = agents.opt(str_of(sa.attr("df.span.endpoint")));

    // correlation keys
    m.req_tcp_seq = u32_of(ra.attr("df.transport.req_tcp_seq"), Malformed::TcpSeq)?;
    m.resp_tcp_seq = u32_of(ra.attr("df.transport.resp_tcp_seq"), Malformed::TcpSeq)?;
    m.syscall_req = u64_of(
        sa.attr("df.span.syscall_trace_id_request"),
        Malformed::SyscallTraceId,
    )?;
    m.syscall_resp = u64_of(
        sa.attr("df.span.syscall_trace_id_response"),
        Malformed::SyscallTraceId,
    )?;
    m.syscall_thread = [
        u32_of(sa.attr("df.span.syscall_thread_0"), Malformed::Integer)?,
        u32_of(sa.attr("df.span.syscall_thread_1"), Malformed::Integer)?,
    ];
    m.syscall_cap_seq = [
        u32_of(sa.attr("df.span.syscall_cap_seq_0"), Malformed::Integer)?,
        u32_of(sa.attr("df.span.syscall_cap_seq_1"), Malformed::Integer)?,
    ];
    m.x_request_id = [
        arc_of(sa.attr("df.span.x_request_id_0")),
        arc_of(sa.attr("df.span.x_request_id_1")),
    ];

    // placement
    m.pid = [
        u32_of(ra.attr("process.pid_0"), Malformed::Integer)?,
        u32_of(ra.attr("process.pid_1"), Malformed::Integer)?,
    ];
    let mut key = String::with_capacity(48);
    for side in 0..2 {
        let mut sfx = |base: &str| -> Option<&str> {
            key.clear();
            key.push_str(base);
            key.push('_');
            key.push(if side == 0 { '0' } else { '1' });
            str_of(ra.attr(&key))
        };
        let process = sfx("thread.name");
        let instance =
            sfx("df.universal_tag.pod").or_else(|| sfx("df.universal_tag.auto_instance"));
        let host = sfx("df.universal_tag.host")
            .or_else(|| sfx("df.universal_tag.chost"))
            .or_else(|| sfx("df.universal_tag.pod_node"));
        m.process_name[side] = agents.opt(process);
        m.instance[side] = agents.opt(instance);
        m.host[side] = agents.opt(host);
        m.namespace[side] = agents.opt(sfx("df.universal_tag.pod_ns"));
    }
    m.ip = [
        str_of(ra.attr("df.network.ip_0")).and_then(|s| s.parse::<IpAddr>().ok()),
        str_of(ra.attr("df.network.ip_1")).and_then(|s| s.parse::<IpAddr>().ok()),
    ];
    let port = |k: &str| {
        int_of(ra.attr(k))
            .ok()
            .flatten()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0)
    };
    m.port = [
        port("df.transport.client_port"),
        port("df.transport.server_port"),
    ];

    // time
    m.start_ns = span.start_ns;
    m.end_ns = span.end_ns;
    let dur = span
        .attr("df.metrics.response_duration_us")
        .and_then(|v| v.as_f64())
        .filter(|d| *d > 0.0)
        .map(|d| d as u64);
    m.duration_us = dur.unwrap_or(span.end_ns.saturating_sub(span.start_ns) / 1000);
    if span.start_ns == 0 && span.end_ns == 0 {
        f |= flags::NO_TIMESTAMPS;
    }

    // §7.3 and §2.3: kind and ids exist only with tracing_info, seqs and ports only with
    // transport_layer. Without them the span cannot be associated by key.
    if span.kind == SpanKind::Unspecified && m.tap_side.local_side().is_some() {
        metrics::counter!(EBPF_MISSING_CATEGORY, "category" => "tracing_info").increment(1);
        f |= flags::NO_KEYS;
    }
    let has_transport = ["df.transport.client_port", "df.transport.server_port"]
        .iter()
        .any(|k| ra.attr(k).is_some())
        || m.req_tcp_seq != 0
        || m.resp_tcp_seq != 0;
    if !has_transport {
        metrics::counter!(EBPF_MISSING_CATEGORY, "category" => "transport_layer").increment(1);
        f |= flags::NO_KEYS;
    }

    match span.status {
        StatusCode::Error => f |= flags::ERROR,
        StatusCode::Unset if f & flags::REQUEST_ONLY != 0 => f |= flags::TIMED_OUT,
        _ => {}
    }
    m.flags = f;
    Ok(m)
}

/// The resource keys the normalizer reads.
static RES_KEYS: KeySet = KeySet::new(&[
    "df.capture_info.observation_point",
    "df.capture_info.agent",
    "df.capture_info.signal_source",
    "df.application.l7_protocol",
    "df.flow_info.flow_id",
    "df.transport.req_tcp_seq",
    "df.transport.resp_tcp_seq",
    "df.transport.client_port",
    "df.transport.server_port",
    "process.pid_0",
    "process.pid_1",
    "thread.name_0",
    "thread.name_1",
    "df.universal_tag.pod_0",
    "df.universal_tag.pod_1",
    "df.universal_tag.auto_instance_0",
    "df.universal_tag.auto_instance_1",
    "df.universal_tag.host_0",
    "df.universal_tag.host_1",
    "df.universal_tag.chost_0",
    "df.universal_tag.chost_1",
    "df.universal_tag.pod_node_0",
    "df.universal_tag.pod_node_1",
    "df.universal_tag.pod_ns_0",
    "df.universal_tag.pod_ns_1",
    "df.network.ip_0",
    "df.network.ip_1",
    "df.network.protocol",
]);

/// The span keys the normalizer reads.
static SPAN_KEYS: KeySet = KeySet::new(&[
    "df.span.type",
    "df.span.native.trace_id",
    "df.global.request_id",
    "df.span.endpoint",
    "df.span.syscall_trace_id_request",
    "df.span.syscall_trace_id_response",
    "df.span.syscall_thread_0",
    "df.span.syscall_thread_1",
    "df.span.syscall_cap_seq_0",
    "df.span.syscall_cap_seq_1",
    "df.span.x_request_id_0",
    "df.span.x_request_id_1",
    "df.metrics.response_duration_us",
]);

/// A fixed key list, with its keys indexed by length: an attribute whose key has no wanted length
/// (most of a DeepFlow row's) is passed over without a comparison, and one that has is compared
/// with the few keys of that length only. (A scan of the whole list per attribute, each a
/// `memcmp` through the long shared `df.universal_tag.` prefixes, was a fifth of the row's cost.)
struct KeySet {
    keys: &'static [&'static str],
    /// Bit `i` of `by_len[n]`: `keys[i]` is `n` bytes long.
    by_len: [u32; KEY_LEN_LIMIT],
}

/// Keys are shorter than this.
const KEY_LEN_LIMIT: usize = 64;

impl KeySet {
    const fn new(keys: &'static [&'static str]) -> KeySet {
        assert!(keys.len() <= MAX_KEYS, "more keys than Attrs holds");
        let mut by_len = [0u32; KEY_LEN_LIMIT];
        let mut i = 0;
        while i < keys.len() {
            let n = keys[i].len();
            assert!(n < KEY_LEN_LIMIT, "a key too long for the index");
            by_len[n] |= 1 << i;
            i += 1;
        }
        KeySet { keys, by_len }
    }

    #[inline]
    fn index(&self, k: &[u8]) -> Option<usize> {
        let mut m = *self.by_len.get(k.len())?;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            if self.keys[i].as_bytes() == k {
                return Some(i);
            }
            m &= m - 1;
        }
        None
    }
}

const MAX_KEYS: usize = 32;

/// The values of a fixed key list, read in one pass over an attribute list.
struct Attrs<'a> {
    keys: &'static KeySet,
    vals: [Option<AttrValue<'a>>; MAX_KEYS],
}

impl<'a> Attrs<'a> {
    /// Takes raw `(key, value)` pairs: keys are compared as bytes and only the values of wanted
    /// keys are parsed (a DeepFlow row has dozens of attributes; validating every key as UTF-8
    /// and parsing every value was the largest part of the relay's cost on eBPF rows).
    fn collect(iter: impl Iterator<Item = (&'a [u8], &'a [u8])>, keys: &'static KeySet) -> Self {
        let mut vals = [None; MAX_KEYS];
        for (k, v) in iter {
            if let Some(i) = keys.index(k) {
                // The first occurrence wins, as with a lookup.
                if vals[i].is_none() {
                    vals[i] = Some(AttrValue::parse(v));
                }
            }
        }
        Attrs { keys, vals }
    }

    fn attr(&self, key: &str) -> Option<AttrValue<'a>> {
        let i = self.keys.index(key.as_bytes());
        debug_assert!(i.is_some(), "{key} missing from the key list");
        i.and_then(|i| self.vals[i])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
    use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
    use tailweave_core::Scope;

    #[test]
    fn a_key_set_finds_each_of_its_keys_and_nothing_else() {
        for set in [&RES_KEYS, &SPAN_KEYS] {
            for (i, k) in set.keys.iter().enumerate() {
                assert_eq!(set.index(k.as_bytes()), Some(i), "{k}");
                // Same length, one byte off: not a key of the set.
                let mut other = k.as_bytes().to_vec();
                *other.last_mut().unwrap() ^= 0x20;
                assert_eq!(set.index(&other), None, "{k}");
                // A prefix is found only if it is a key itself.
                let prefix = &k.as_bytes()[..k.len() - 1];
                let by_scan = set.keys.iter().position(|x| x.as_bytes() == prefix);
                assert_eq!(set.index(prefix), by_scan, "{k}");
            }
            assert_eq!(set.index(b""), None);
            assert_eq!(set.index(&[b'x'; 200]), None);
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

    struct Row {
        res: Vec<KeyValue>,
        attrs: Vec<KeyValue>,
        trace: Vec<u8>,
        span: u64,
        parent: Vec<u8>,
        name: String,
        kind: i32,
        status: i32,
        start_ns: u64,
        end_ns: u64,
    }

    fn row() -> Row {
        Row {
            res: vec![
                s("telemetry.sdk.name", "deepflow"),
                s("df.capture_info.observation_point", "Client Process"),
                s("df.capture_info.agent", "node-a"),
                s("df.capture_info.signal_source", "eBPF"),
                s("df.application.l7_protocol", "HTTP"),
                i("df.transport.client_port", 40000),
                i("df.transport.server_port", 80),
                i("df.transport.req_tcp_seq", 1001),
                i("df.transport.resp_tcp_seq", 2001),
                i("df.flow_info.flow_id", 77),
                i("process.pid_0", 410),
                i("process.pid_1", 900),
                s("df.universal_tag.pod_0", "web-1"),
                s("df.universal_tag.pod_node_1", "node-b"),
            ],
            attrs: vec![s("df.span.type", "session")],
            trace: vec![0xab; 16],
            span: 0x6553_f100_0040_0001,
            parent: vec![0xcd; 8],
            name: "GET /x".into(),
            kind: 3,
            status: 1,
            start_ns: 5_100_000,
            end_ns: 44_900_000,
        }
    }

    fn build(r: &Row) -> Span {
        let res = Resource::from_proto(
            &ProtoResource {
                attributes: r.res.clone(),
                ..Default::default()
            },
            "",
        );
        let scope = Scope::new(res, Default::default(), Default::default());
        let p = ProtoSpan {
            trace_id: r.trace.clone(),
            span_id: r.span.to_be_bytes().to_vec(),
            parent_span_id: r.parent.clone(),
            name: r.name.clone(),
            kind: r.kind,
            start_time_unix_nano: r.start_ns,
            end_time_unix_nano: r.end_ns,
            attributes: r.attrs.clone(),
            status: Some(Status {
                code: r.status,
                ..Default::default()
            }),
            ..Default::default()
        };
        Span::from_proto(scope, &p)
    }

    fn norm(r: &Row, role: Role) -> Span {
        let mut v = vec![build(r)];
        normalize_spans(&mut v, role);
        v.pop().unwrap()
    }

    fn model(r: &Row) -> EbpfSpan {
        *norm(r, Role::Ebpf).ebpf.expect("eBPF model")
    }

    #[test]
    fn reads_identity_and_keys() {
        let mut r = row();
        r.attrs.extend([
            i("df.span.syscall_trace_id_request", 31),
            i("df.span.syscall_trace_id_response", -2),
            i("df.span.syscall_thread_0", 11),
            i("df.span.syscall_thread_1", 12),
            i("df.span.syscall_cap_seq_0", 40),
            i("df.span.syscall_cap_seq_1", 41),
            s("df.span.x_request_id_0", "xa"),
            s("df.span.x_request_id_1", "xb"),
            i("df.global.request_id", 0),
        ]);
        r.status = status::StatusCode::Error as i32;
        let m = model(&r);
        assert_eq!(m.row_id, 0x6553_f100_0040_0001);
        assert_eq!(m.tap_side, TapSide::CP);
        assert_eq!(m.signal, Signal::Ebpf);
        assert_eq!(&*m.agent, "node-a");
        assert_eq!(m.trace_key, Some([0xab; 16]));
        assert_eq!(m.header_span_id, Some([0xcd; 8]));
        assert_eq!((m.req_tcp_seq, m.resp_tcp_seq), (1001, 2001));
        assert_eq!(m.syscall_req, 31);
        assert_eq!(
            m.syscall_resp,
            u64::MAX - 1,
            "negative int64 is a large u64"
        );
        assert_eq!(m.syscall_thread, [11, 12]);
        assert_eq!(m.syscall_cap_seq, [40, 41]);
        assert_eq!(m.x_request_id[0].as_deref(), Some("xa"));
        assert_eq!(m.x_request_id[1].as_deref(), Some("xb"));
        assert_eq!(m.request_id, Some(0), "request id 0 is kept");
        assert_eq!(m.pid, [410, 900]);
        assert_eq!(m.local_pid(), 410);
        assert_eq!(m.instance[0].as_deref(), Some("web-1"));
        assert_eq!(m.host[1].as_deref(), Some("node-b"));
        assert_eq!(m.port, [40000, 80]);
        assert_eq!(m.flow_id, 77);
        assert_eq!(m.l7_protocol, 20);
        assert_eq!(
            (m.start_ns, m.end_ns, m.duration_us),
            (5_100_000, 44_900_000, 39_800)
        );
        assert!(m.has(flags::SESSION));
        assert!(m.has(flags::ERROR));
        assert!(!m.has(flags::NO_KEYS));
    }

    #[test]
    fn fake_trace_id_and_self_parent() {
        let mut r = row();
        let id = r.span.to_be_bytes();
        r.trace = [id.to_vec(), vec![0; 8]].concat();
        r.parent = id.to_vec();
        let m = model(&r);
        assert_eq!(m.trace_key, None);
        assert!(m.has(flags::FAKE_TRACE_ID));
        assert!(m.has(flags::SELF_PARENT));
        assert_eq!(m.header_span_id, None);
        // The same bytes with a native trace id are a real (if odd) id.
        r.attrs.push(s(
            "df.span.native.trace_id",
            &tailweave_core::span::hex(&r.trace),
        ));
        let m = model(&r);
        assert!(!m.has(flags::FAKE_TRACE_ID));
        assert!(m.trace_key.is_some());
    }

    #[test]
    fn native_trace_id_forms() {
        let mut r = row();
        r.attrs
            .push(s("df.span.native.trace_id", "0123456789ABCDEF"));
        let m = model(&r);
        let mut want = [0u8; 16];
        want[8..].copy_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(m.trace_key, Some(want), "64-bit ids are left-padded");
        let mut r = row();
        r.attrs.push(s("df.span.native.trace_id", "not-hex-sw8-id"));
        assert_eq!(
            model(&r).trace_key,
            Some([0xab; 16]),
            "other forms keep the OTLP bytes"
        );
        let mut r = row();
        let hex32 = "00112233445566778899aabbccddeeff";
        r.attrs.push(s("df.span.native.trace_id", hex32));
        assert_eq!(
            model(&r).trace_key.map(|k| tailweave_core::span::hex(&k)),
            Some(hex32.to_string())
        );
    }

    #[test]
    fn tap_side_display_names_and_codes() {
        for (name, code, side) in [
            ("Client Process", "c-p", Some(0)),
            ("Client NIC", "c", Some(0)),
            ("Client K8s Node", "c-nd", Some(0)),
            ("Server K8s Node", "s-nd", Some(1)),
            ("Server NIC", "s", Some(1)),
            ("Server Process", "s-p", Some(1)),
            ("Local NIC", "local", None),
            ("rest", "rest", None),
        ] {
            let mut r = row();
            r.res[1] = s("df.capture_info.observation_point", name);
            let m = model(&r);
            assert_eq!(m.tap_side.code(), code);
            assert_eq!(m.local_side(), side);
        }
    }

    #[test]
    fn request_fragment_is_provisionally_timed_out() {
        let mut r = row();
        r.attrs = vec![s("df.span.type", "request")];
        r.status = 0;
        let sp = norm(&r, Role::Ebpf);
        let m = sp.ebpf.as_ref().unwrap();
        assert!(m.is_request_only() && m.has(flags::TIMED_OUT));
        assert!(sp.marks.timed_out);
        // A response fragment and an OK request are not timeouts.
        r.attrs = vec![s("df.span.type", "response")];
        assert!(!norm(&r, Role::Ebpf).marks.timed_out);
        r.attrs = vec![s("df.span.type", "request")];
        r.status = status::StatusCode::Ok as i32;
        assert!(!norm(&r, Role::Ebpf).marks.timed_out);
    }

    #[test]
    fn malformed_rows_pass_as_plain_spans() {
        type Case = (Box<dyn Fn(&mut Row)>, Malformed);
        let cases: Vec<Case> = vec![
            (Box::new(|r| r.attrs.clear()), Malformed::MissingSpanType),
            (
                Box::new(|r| r.attrs[0] = s("df.span.type", "half")),
                Malformed::SpanType,
            ),
            (
                Box::new(|r| r.res[1] = s("df.capture_info.observation_point", "Moon NIC")),
                Malformed::ObservationPoint,
            ),
            (
                Box::new(|r| r.res[7] = s("df.transport.req_tcp_seq", "abc")),
                Malformed::TcpSeq,
            ),
            (
                Box::new(|r| r.res[7] = i("df.transport.req_tcp_seq", 1 << 40)),
                Malformed::TcpSeq,
            ),
            (
                Box::new(|r| {
                    r.attrs.push(s(
                        "df.span.syscall_trace_id_request",
                        "99999999999999999999999",
                    ))
                }),
                Malformed::SyscallTraceId,
            ),
            (
                Box::new(|r| r.res[10] = i("process.pid_0", -1)),
                Malformed::Integer,
            ),
        ];
        for (edit, want) in cases {
            let mut r = row();
            edit(&mut r);
            let sp = build(&r);
            assert_eq!(read_span(&sp, &mut Default::default()).err(), Some(want));
            let sp = norm(&r, Role::Ebpf);
            assert!(sp.ebpf.is_none());
            assert_eq!(sp.source, SpanSource::Sdk);
        }
    }

    #[test]
    fn detection_on_shared_receiver() {
        // Marker on the span.
        assert!(norm(&row(), Role::Shared).ebpf.is_some());
        // Resource marker only (telemetry.sdk.name) still counts, but lacks df.span.type.
        let mut r = row();
        r.attrs.clear();
        let sp = norm(&r, Role::Shared);
        assert!(
            sp.ebpf.is_none(),
            "no df.span.type: malformed, passed on plain"
        );
        // A plain SDK span is untouched.
        let mut r = row();
        r.attrs.clear();
        r.res = vec![
            s("service.name", "web"),
            s("telemetry.sdk.name", "opentelemetry"),
        ];
        let before = build(&r);
        let sp = norm(&r, Role::Shared);
        assert!(sp.ebpf.is_none());
        assert_eq!(sp.source, SpanSource::Sdk);
        assert_eq!(sp.raw, before.raw);
        assert!(resource_is_deepflow(
            row_resource(&[s("df.flow_info.id", "1")]).as_ref()
        ));
        assert!(!resource_is_deepflow(
            row_resource(&[s("service.name", "x")]).as_ref()
        ));
        // The key's bytes in a value or a name are not the marker.
        let mut r = row();
        r.res = vec![s("service.name", "web")];
        r.attrs = vec![s("note", "df.span.type"), s("df.span.typo", "request")];
        r.name = "df.span.type".into();
        assert!(norm(&r, Role::Shared).ebpf.is_none());
        // The marker among other attributes is found.
        r.attrs.push(s("df.span.type", "request"));
        assert!(norm(&r, Role::Shared).ebpf.is_some());
    }

    fn row_resource(kvs: &[KeyValue]) -> Arc<Resource> {
        Resource::from_proto(
            &ProtoResource {
                attributes: kvs.to_vec(),
                ..Default::default()
            },
            "",
        )
    }

    #[test]
    fn empty_names_are_filled() {
        let mut r = row();
        r.name.clear();
        r.res[4] = s("df.application.l7_protocol", "DNS");
        r.attrs.push(s("df.span.endpoint", "example.com"));
        let sp = norm(&r, Role::Ebpf);
        assert_eq!(sp.name(), "DNS example.com");
        assert_eq!(sp.ebpf.as_ref().unwrap().l7_protocol, 120);
        let mut r = row();
        r.name.clear();
        r.res[4] = s("df.application.l7_protocol", "TLS");
        assert_eq!(norm(&r, Role::Ebpf).name(), "TLS");
        // A named span is not rewritten.
        let r = row();
        assert_eq!(norm(&r, Role::Ebpf).raw, build(&r).raw);
    }

    #[test]
    fn missing_categories_flag_the_span() {
        let mut r = row();
        r.kind = 0;
        assert!(
            model(&r).has(flags::NO_KEYS),
            "no kind: tracing_info missing"
        );
        let mut r = row();
        r.res.retain(|k| !k.key.starts_with("df.transport."));
        assert!(model(&r).has(flags::NO_KEYS), "no transport_layer");
        let mut r = row();
        r.start_ns = 0;
        r.end_ns = 0;
        assert!(model(&r).has(flags::NO_TIMESTAMPS));
    }

    #[test]
    fn l7_names() {
        assert_eq!(l7_protocol_id("HTTP2_TLS"), (21, true));
        assert_eq!(l7_protocol_id("gRPC"), (41, false));
        assert_eq!(l7_protocol_id("MySQL"), (60, false));
        assert_eq!(l7_protocol_id("whatever"), (0, false));
    }

    #[test]
    fn duration_prefers_response_duration() {
        let mut r = row();
        r.attrs.push(i("df.metrics.response_duration_us", 1234));
        assert_eq!(model(&r).duration_us, 1234);
    }
}
