//! The fuzz targets of tailweave, as plain functions: `fuzz_targets/*.rs` hand them libFuzzer's
//! input, and [`replay`] runs them over the seed corpus (`corpus/<target>/`) and deterministic
//! mutations of it without libFuzzer or nightly: from `tests/replay.rs` here, and from the root
//! package's `tests/fuzz_smoke.rs`, which includes this file by `#[path]` so CI's
//! `cargo test --workspace` runs the smoke without building a second dependency tree. So this
//! file names its own items by relative paths only (no `crate::`), and needs nothing beyond the
//! root package's dev-dependencies.
//!
//! Each function must not panic on any input; where a property holds for every input (a decoded
//! request re-encodes to one that decodes to the same spans) it is asserted, so a violation is a
//! crash libFuzzer reports.
//!
//! # Layout
//! - [`Input`]: a reader of choices from the fuzzer's bytes (ids from small spaces, so spans
//!   collide into traces and joins, and times that go backwards).
//! - [`otlp_decode`], [`otlp_json`], [`config_load`]: the parsers of untrusted input.
//! - [`deepflow_normalize`], [`join`], [`tail_sampling`]: the eBPF normalizer and the two state
//!   machines, fed span sequences built from the input.
//! - [`replay`]: the target table, the seed reader and the deterministic mutator.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tailweave_core::otlp::{
    decode_json_request, decode_request, encode_json_request, encode_request, DecodeLimits,
};
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{Span as ProtoSpan, Status};
use tailweave_core::{Processor, Resource, Scope, Span, SpanBatch};
use tailweave_processors::join::testkit::DfRow;
use tailweave_processors::join::{Join, JoinConfig};
use tailweave_processors::tail_sampling::{TailSampling, TailSamplingConfig};
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

pub mod replay;

/// Limits small enough that the fuzzer reaches them.
fn limits() -> DecodeLimits {
    DecodeLimits {
        max_spans_per_request: 512,
        max_attributes_per_span: 64,
        max_value_depth: 8,
    }
}

/// Reads every accessor of a decoded span (each reads the encoded bytes lazily).
fn touch(s: &Span) -> usize {
    let mut n = s.name().len() + s.trace_state().len() + s.service_name().len() + s.held_bytes();
    for (k, v) in s.attrs() {
        n += k.len() + v.to_string_lossy().len();
    }
    for (k, _) in s.resource().attrs() {
        n += k.len();
    }
    n += s.scope.name().len();
    n + usize::from(s.is_root()) + usize::from(s.is_error())
}

/// The ids of a set of spans, in order.
fn ids(spans: &[Span]) -> Vec<(tailweave_core::TraceId, tailweave_core::SpanId)> {
    spans.iter().map(|s| (s.trace_id, s.span_id)).collect()
}

/// OTLP protobuf request decoding: never panics; what decodes re-encodes to the same spans.
pub fn otlp_decode(data: &[u8]) {
    let Ok(d) = decode_request(Bytes::copy_from_slice(data), &limits()) else {
        return;
    };
    let _ = d.partial_message();
    for s in &d.spans {
        std::hint::black_box(touch(s));
    }
    let again =
        decode_request(encode_request(&d.spans), &limits()).expect("a re-encoded request decodes");
    assert_eq!(again.rejected_total(), 0, "re-encoded spans were refused");
    assert_eq!(ids(&again.spans), ids(&d.spans));
    // Editing a span (decode, change, re-encode) keeps it readable.
    if let Some(mut s) = d.spans.first().cloned() {
        if s.edit(|p| p.name.push('!')).is_ok() {
            assert!(s.name().ends_with('!'));
        }
    }
}

/// OTLP/JSON decoding: never panics; what decodes re-encodes (as JSON) to the same spans.
pub fn otlp_json(data: &[u8]) {
    let Ok(d) = decode_json_request(data, &limits()) else {
        return;
    };
    for s in &d.spans {
        std::hint::black_box(touch(s));
    }
    let json = encode_json_request(&d.spans);
    let again = decode_json_request(&json, &limits()).expect("re-encoded JSON decodes");
    assert_eq!(ids(&again.spans), ids(&d.spans));
}

/// The config loader (YAML, `${env:X}` substitution, validation): never panics.
pub fn config_load(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let env = |name: &str| -> Option<String> {
        match name {
            "PORT" => Some("4317".into()),
            "HOST" => Some("127.0.0.1".into()),
            "NESTED" => Some("${env:PORT}".into()),
            "YAML" => Some("{a: [1, 2]}".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    };
    let _ = tailweave_collector::config::load_str(&text, "fuzz.yaml", env);
}

/// Choices read from the fuzzer's bytes; past the end, every read is zero.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn below(&mut self, n: u8) -> u8 {
        if n == 0 {
            0
        } else {
            self.byte() % n
        }
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::from(self.byte()) % items.len()]
    }
    /// A short string: one of `common`, or raw bytes (possibly not UTF-8, lossily converted).
    pub fn text(&mut self, common: &[&str]) -> String {
        if !self.byte().is_multiple_of(4) {
            return self.pick(common).to_string();
        }
        let n = usize::from(self.below(24));
        let raw: Vec<u8> = (0..n).map(|_| self.byte()).collect();
        String::from_utf8_lossy(&raw).into_owned()
    }
}

const DF_KEYS: &[&str] = &[
    "df.span.type",
    "df.capture_info.observation_point",
    "df.capture_info.signal_source",
    "df.application.l7_protocol",
    "df.transport.req_tcp_seq",
    "df.transport.resp_tcp_seq",
    "df.span.syscall_trace_id_request",
    "df.span.syscall_trace_id_response",
    "df.span.syscall_thread_0",
    "df.span.syscall_thread_1",
    "df.span.syscall_cap_seq_0",
    "df.span.syscall_cap_seq_1",
    "df.flow_info.flow_id",
    "df.flow_info.id",
    "df.global.request_id",
    "df.span.x_request_id_0",
    "df.span.native.trace_id",
    "df.span.native.span_id",
    "df.universal_tag.pod_0",
    "df.universal_tag.pod_1",
    "process.pid_0",
    "process.pid_1",
    "tenant.id",
    "http.status_code",
    "service.name",
];

const TAPS: &[&str] = &[
    "c-p", "s-p", "c", "s", "c-nd", "s-nd", "c-hv", "s-hv", "c-gw", "s-gw", "local", "rest", "x",
];
const SPAN_TYPES: &[&str] = &["session", "Process", "App", "Sys", "Network", "request", ""];
const PODS: &[&str] = &["frontend-0", "cart-1", "db-0", "", "a/b"];

fn value(input: &mut Input) -> any_value::Value {
    match input.below(6) {
        0 => any_value::Value::IntValue(input.u64() as i64),
        1 => any_value::Value::IntValue(i64::from(input.below(8))),
        2 => any_value::Value::BoolValue(input.byte() & 1 == 0),
        3 => any_value::Value::DoubleValue(f64::from_bits(input.u64())),
        _ => any_value::Value::StringValue(input.text(&[
            "Client Process",
            "Server NIC",
            "eBPF",
            "Packet",
            "HTTP",
            "12345",
            "-1",
            "0x10",
            "00000000000000000000000000000001",
            "ffffffffffffffff",
        ])),
    }
}

fn attrs(input: &mut Input, max: u8) -> Vec<KeyValue> {
    (0..input.below(max))
        .map(|_| KeyValue {
            key: input.text(DF_KEYS),
            value: Some(AnyValue {
                value: Some(value(input)),
            }),
            ..Default::default()
        })
        .collect()
}

/// A trace id from a small space (so spans share traces).
fn trace_id(input: &mut Input) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[15] = input.below(6);
    if input.byte().is_multiple_of(8) {
        t[0] = input.byte();
    }
    t
}

/// One span: an SDK span with random attributes, or a DeepFlow row (well-formed but with random
/// values, and random extra attributes), normalized as a shared receiver would.
pub fn span(input: &mut Input) -> Span {
    if input.byte() & 1 == 0 {
        let res = Resource::from_proto(
            &ProtoResource {
                attributes: attrs(input, 4),
                ..Default::default()
            },
            "",
        );
        let scope = Scope::new(res, Default::default(), Default::default());
        let start = u64::from(input.u16()) * 1_000_000;
        let p = ProtoSpan {
            trace_id: trace_id(input).to_vec(),
            span_id: u64::from(input.below(16) + 1).to_be_bytes().to_vec(),
            parent_span_id: match input.below(17) {
                0 => vec![],
                n => u64::from(n).to_be_bytes().to_vec(),
            },
            name: input.text(&["GET /", "SELECT", "rpc"]),
            kind: i32::from(input.below(7)),
            start_time_unix_nano: start,
            // Sometimes before the start.
            end_time_unix_nano: start.wrapping_add(u64::from(input.u16()) * 1000)
                - u64::from(input.below(2)) * start / 2,
            attributes: attrs(input, 6),
            status: Some(Status {
                code: i32::from(input.below(4)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut spans = [Span::from_proto(scope, &p)];
        normalize_spans(&mut spans, Role::Shared);
        let [s] = spans;
        return s;
    }
    let mut row = DfRow::new(
        u64::from(input.u16()),
        TAPS[usize::from(input.byte()) % TAPS.len()],
        &format!("agent-{}", input.below(3)),
    )
    .kind(SPAN_TYPES[usize::from(input.byte()) % SPAN_TYPES.len()])
    .seqs(u32::from(input.below(8)), u32::from(input.below(8)))
    .sys(u64::from(input.below(8)), u64::from(input.below(8)))
    .pids(u32::from(input.below(4)), u32::from(input.below(4)))
    .pods(
        PODS[usize::from(input.byte()) % PODS.len()],
        PODS[usize::from(input.byte()) % PODS.len()],
    );
    let start = u64::from(input.u16()) * 1000;
    row = row.time_us(start, start + u64::from(input.u16()));
    if input.byte() & 1 == 0 {
        row = row.trace(trace_id(input), u64::from(input.below(16) + 1));
    }
    row.threads = [u32::from(input.below(4)), u32::from(input.below(4))];
    row.cap_seq = [u32::from(input.below(8)), u32::from(input.below(8))];
    row.status = i32::from(input.below(4));
    row.extra_attrs = attrs(input, 3);
    let mut spans = [row.to_span()];
    normalize_spans(&mut spans, Role::Ebpf);
    let [s] = spans;
    s
}

/// The DeepFlow normalizer over spans built from the input: never panics, and a span keeps its
/// ids whatever its attributes say.
pub fn deepflow_normalize(data: &[u8]) {
    let mut input = Input::new(data);
    let mut spans = Vec::new();
    while !input.is_empty() && spans.len() < 64 {
        spans.push(span(&mut input));
    }
    let before = ids(&spans);
    // Again, as both roles: normalizing twice must be harmless.
    normalize_spans(&mut spans, Role::Ebpf);
    normalize_spans(&mut spans, Role::Shared);
    assert_eq!(ids(&spans), before);
    // The raw OTLP path: the input as a request, normalized as a dedicated DeepFlow receiver.
    if let Ok(mut d) = decode_request(Bytes::copy_from_slice(data), &limits()) {
        normalize_spans(&mut d.spans, Role::Ebpf);
    }
}

/// One step of a state-machine run.
enum Step {
    Batch(Vec<Span>, bool),
    Tick,
}

/// A run: batches of spans (sometimes marked whole), ticks, and time that moves by 0-65 s per
/// step, driven by the input. At most 64 steps of at most 16 spans.
fn steps(input: &mut Input) -> Vec<(Duration, Step)> {
    let mut out = Vec::new();
    while !input.is_empty() && out.len() < 64 {
        let advance = Duration::from_millis(u64::from(input.u16()));
        let step = if input.below(4) == 0 {
            Step::Tick
        } else {
            let n = usize::from(input.below(16)) + 1;
            let spans = (0..n).map(|_| span(input)).collect();
            Step::Batch(spans, input.below(4) == 0)
        };
        out.push((advance, step));
    }
    out
}

/// Drives a processor through the steps; returns (spans in, spans out).
fn drive(p: &mut dyn Processor, run: Vec<(Duration, Step)>) -> (usize, usize) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut out = Vec::new();
    let (mut n_in, mut n_out) = (0, 0);
    for (advance, step) in run {
        now += advance;
        match step {
            Step::Batch(spans, whole) => {
                n_in += spans.len();
                let b = if whole {
                    SpanBatch::whole(spans)
                } else {
                    SpanBatch::new(spans)
                };
                p.process(now, b, &mut out);
            }
            Step::Tick => p.tick(now, &mut out),
        }
        let _ = p.accepting();
        n_out += out.drain(..).map(|b| b.len()).sum::<usize>();
    }
    p.shutdown(now + Duration::from_secs(3600), &mut out);
    n_out += out.drain(..).map(|b| b.len()).sum::<usize>();
    (n_in, n_out)
}

/// The join fed arbitrary SDK and eBPF span sequences: never panics, and never emits more spans
/// than it was given (it may drop and count, never invent).
pub fn join(data: &[u8]) {
    let mut input = Input::new(data);
    let mut cfg = JoinConfig::default();
    // Small waits and budgets so the fuzzer reaches expiry and eviction.
    if input.byte() & 1 == 0 {
        cfg.max_spans_per_trace = usize::from(input.below(64)) + 1;
        cfg.max_pending_spans = usize::from(input.below(128)) + 1;
    }
    let run = steps(&mut input);
    let mut j = Join::new(cfg);
    let (n_in, n_out) = drive(&mut j, run);
    assert!(n_out <= n_in, "join emitted {n_out} spans from {n_in}");
}

/// The tail sampler (every policy kind the input picks) fed arbitrary traces: never panics, never
/// emits more spans than it was given.
pub fn tail_sampling(data: &[u8]) {
    let mut input = Input::new(data);
    let yaml = match input.below(4) {
        0 => "policies: [{name: all, type: always_sample}]",
        1 => {
            "decision_wait: 2s\nmax_spans_per_trace: 5\npolicies:\n  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}\n  - {name: slow, type: latency, latency: {threshold_ms: 500}}\n  - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}"
        }
        2 => "num_traces: 3\npolicies: [{name: p, type: probabilistic, probabilistic: {sampling_percentage: 50}}]",
        _ => "decision_wait: 1s\ndecision_wait_after_root_received: 0s\npolicies: [{name: all, type: always_sample}]",
    };
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("fixed yaml");
    let cfg: TailSamplingConfig = tailweave_core::config::parse(v).expect("fixed config parses");
    if !cfg.validate().is_empty() {
        return;
    }
    let run = steps(&mut input);
    let mut p = TailSampling::new(&cfg, "tail_sampling", "traces");
    let (n_in, n_out) = drive(&mut p, run);
    assert!(n_out <= n_in, "sampler emitted {n_out} spans from {n_in}");
}
