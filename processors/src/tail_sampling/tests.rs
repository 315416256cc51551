//! State-machine tests with injected time: every trigger, every policy type, the combinations,
//! late spans after each kind of decision, the caps, shutdown and tenants.

use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::Bytes;
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
use tailweave_core::{AttrValue, Processor, Resource, Scope, Span, SpanBatch, TraceId};

use super::policy::Probabilistic;
use super::*;

// ---------------------------------------------------------------- helpers

/// A trace id with random-looking bits (splitmix64 of `n`), as real ids have.
fn tid(n: u64) -> TraceId {
    let a = splitmix(n.wrapping_mul(2).wrapping_add(1));
    let b = splitmix(a);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_be_bytes());
    id[8..].copy_from_slice(&b.to_be_bytes());
    TraceId(id)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// Builds one span.
#[derive(Clone)]
struct B {
    trace: TraceId,
    id: u64,
    parent: u64,
    start_ms: u64,
    end_ms: u64,
    status: i32,
    attrs: Vec<KeyValue>,
    res: Vec<KeyValue>,
    trace_state: String,
    timed_out: bool,
}

/// A root span of trace `t` lasting `ms`.
fn root(t: TraceId, ms: u64) -> B {
    B {
        trace: t,
        id: 1,
        parent: 0,
        start_ms: 1_000,
        end_ms: 1_000 + ms,
        status: 0,
        attrs: Vec::new(),
        res: Vec::new(),
        trace_state: String::new(),
        timed_out: false,
    }
}

/// A child span `id` of trace `t`.
fn child(t: TraceId, id: u64) -> B {
    B {
        id,
        parent: 1,
        start_ms: 1_001,
        end_ms: 1_002,
        ..root(t, 0)
    }
}

impl B {
    fn error(mut self) -> B {
        self.status = status::StatusCode::Error as i32;
        self
    }
    fn ok(mut self) -> B {
        self.status = status::StatusCode::Ok as i32;
        self
    }
    fn attr(mut self, k: &str, v: any_value::Value) -> B {
        self.attrs.push(kv(k, v));
        self
    }
    fn res(mut self, k: &str, v: any_value::Value) -> B {
        self.res.push(kv(k, v));
        self
    }
    fn times(mut self, start_ms: u64, end_ms: u64) -> B {
        self.start_ms = start_ms;
        self.end_ms = end_ms;
        self
    }
    fn state(mut self, ts: &str) -> B {
        self.trace_state = ts.into();
        self
    }
    fn timed_out(mut self) -> B {
        self.timed_out = true;
        self
    }
    fn build(self) -> Span {
        let res = Resource::from_proto(
            &ProtoResource {
                attributes: self.res,
                ..Default::default()
            },
            "",
        );
        let scope = Scope::new(res, Bytes::new(), Bytes::new());
        let p = ProtoSpan {
            trace_id: self.trace.0.to_vec(),
            span_id: self.id.to_be_bytes().to_vec(),
            parent_span_id: if self.parent == 0 {
                Vec::new()
            } else {
                self.parent.to_be_bytes().to_vec()
            },
            trace_state: self.trace_state,
            name: "op".into(),
            start_time_unix_nano: self.start_ms * 1_000_000,
            end_time_unix_nano: self.end_ms * 1_000_000,
            attributes: self.attrs,
            status: Some(Status {
                message: String::new(),
                code: self.status,
            }),
            ..Default::default()
        };
        let mut s = Span::from_proto(scope, &p);
        s.marks.timed_out = self.timed_out;
        s
    }
}

fn config(yaml: &str) -> TailSamplingConfig {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("test yaml");
    tailweave_core::config::parse(v).expect("test config parses")
}

fn sampler(yaml: &str) -> TailSampling {
    let c = config(yaml);
    let issues = c.validate();
    assert!(issues.is_empty(), "{issues:?}");
    TailSampling::new(&c, "tail_sampling", "traces")
}

/// Errors, slow (>= 500ms), 10% of the rest: the mission's default case.
const MISSION: &str = r#"
policies:
  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
  - {name: slow, type: latency, latency: {threshold_ms: 500}}
  - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
"#;

struct Run {
    p: TailSampling,
    t0: Instant,
}

impl Run {
    fn new(yaml: &str) -> Run {
        Run {
            p: sampler(yaml),
            t0: Instant::now(),
        }
    }
    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
    fn send(&mut self, ms: u64, spans: Vec<B>) -> Vec<Span> {
        let mut out = Vec::new();
        let now = self.at(ms);
        self.p.process(
            now,
            SpanBatch::new(spans.into_iter().map(B::build).collect()),
            &mut out,
        );
        flat(out)
    }
    fn send_whole(&mut self, ms: u64, spans: Vec<B>) -> Vec<Span> {
        let mut out = Vec::new();
        let now = self.at(ms);
        self.p.process(
            now,
            SpanBatch::whole(spans.into_iter().map(B::build).collect()),
            &mut out,
        );
        flat(out)
    }
    fn tick(&mut self, ms: u64) -> Vec<Span> {
        let mut out = Vec::new();
        let now = self.at(ms);
        self.p.tick(now, &mut out);
        flat(out)
    }
    fn shutdown(&mut self, ms: u64) -> Vec<Span> {
        let mut out = Vec::new();
        let now = self.at(ms);
        self.p.shutdown(now, &mut out);
        flat(out)
    }
    /// Sends one two-span trace and lets its root wait pass; returns whether it was kept.
    fn decide_one(&mut self, ms: u64, spans: Vec<B>) -> bool {
        let n = spans.len();
        let mut out = self.send_whole(ms, spans);
        out.extend(self.tick(ms + 1));
        assert!(out.is_empty() || out.len() == n, "partial trace: {out:?}");
        !out.is_empty()
    }
}

fn flat(out: Vec<SpanBatch>) -> Vec<Span> {
    out.into_iter().flat_map(|b| b.spans).collect()
}

fn attr_str(s: &Span, k: &str) -> Option<String> {
    s.attr(k).and_then(|v| v.as_str().map(str::to_string))
}

fn adjusted(s: &Span) -> Option<f64> {
    match s.attr(ATTR_ADJUSTED_COUNT) {
        Some(AttrValue::Double(d)) => Some(d),
        _ => None,
    }
}

const ALWAYS: &str = "policies: [{name: all, type: always_sample}]";

// ---------------------------------------------------------------- triggers

#[test]
fn decision_wait_decides_a_rootless_trace_after_30s() {
    let mut r = Run::new(ALWAYS);
    let t = tid(1);
    assert!(r.send(0, vec![child(t, 2), child(t, 3)]).is_empty());
    assert!(r.tick(29_999).is_empty());
    assert_eq!(r.p.traces_held(), 1);
    let out = r.tick(30_000);
    assert_eq!(out.len(), 2);
    assert_eq!(r.p.stats().decided(Trigger::DecisionWait), 1);
    assert_eq!(r.p.traces_held(), 0);
    assert_eq!(r.p.spans_held(), 0);
    assert_eq!(r.p.buffered_bytes(), 0);
}

#[test]
fn decision_wait_counts_from_the_first_span_not_the_last() {
    let mut r = Run::new(ALWAYS);
    let t = tid(1);
    r.send(0, vec![child(t, 2)]);
    r.send(20_000, vec![child(t, 3)]);
    assert!(r.tick(29_999).is_empty());
    assert_eq!(r.tick(30_000).len(), 2);
}

#[test]
fn after_root_decides_once_the_trace_is_quiet_for_2s() {
    let mut r = Run::new(ALWAYS);
    let t = tid(1);
    r.send(0, vec![root(t, 10)]);
    r.send(1_500, vec![child(t, 2)]);
    // The child moved the deadline to 3.5s.
    assert!(r.tick(2_000).is_empty());
    assert!(r.tick(3_499).is_empty());
    let out = r.tick(3_500);
    assert_eq!(out.len(), 2);
    assert_eq!(r.p.stats().decided(Trigger::AfterRoot), 1);
}

#[test]
fn root_arriving_last_starts_the_short_wait() {
    let mut r = Run::new(ALWAYS);
    let t = tid(1);
    r.send(0, vec![child(t, 2), child(t, 3)]);
    assert!(r.tick(9_000).is_empty());
    r.send(10_000, vec![root(t, 10)]);
    assert!(r.tick(11_999).is_empty());
    assert_eq!(r.tick(12_000).len(), 3);
    assert_eq!(r.p.stats().decided(Trigger::AfterRoot), 1);
}

#[test]
fn after_root_zero_turns_the_short_wait_off() {
    let mut r = Run::new(
        "decision_wait: 5s\ndecision_wait_after_root_received: 0s\npolicies: [{name: all, type: always_sample}]",
    );
    let t = tid(1);
    r.send(0, vec![root(t, 10)]);
    assert!(r.tick(4_999).is_empty());
    assert_eq!(r.tick(5_000).len(), 1);
    assert_eq!(r.p.stats().decided(Trigger::DecisionWait), 1);
}

#[test]
fn max_spans_per_trace_decides_at_once_and_later_spans_follow() {
    let mut r = Run::new("max_spans_per_trace: 3\npolicies: [{name: all, type: always_sample}]");
    let t = tid(1);
    assert!(r.send(0, vec![child(t, 2), child(t, 3)]).is_empty());
    let out = r.send(10, vec![child(t, 4), child(t, 5)]);
    // Three decided together, the fourth followed the decision at once.
    assert_eq!(out.len(), 4);
    assert_eq!(r.p.stats().decided(Trigger::Size), 1);
    assert_eq!(r.p.stats().late_spans_kept, 1);
}

#[test]
fn max_trace_bytes_decides_at_once() {
    let mut r = Run::new("max_trace_bytes: 2000\npolicies: [{name: all, type: always_sample}]");
    let t = tid(1);
    assert!(r.send(0, vec![child(t, 2)]).is_empty());
    let big = child(t, 3).attr("blob", s(&"x".repeat(2000)));
    assert_eq!(r.send(1, vec![big]).len(), 2);
    assert_eq!(r.p.stats().decided(Trigger::Size), 1);
}

#[test]
fn whole_batches_are_decided_without_waiting() {
    let mut r = Run::new(MISSION);
    let (a, b) = (tid(1), tid(2));
    let out = r.send_whole(
        0,
        vec![
            root(a, 10).error(),
            child(a, 2),
            root(b, 900),
            child(b, 2),
            child(b, 3),
        ],
    );
    assert_eq!(out.len(), 5);
    assert_eq!(r.p.stats().decided(Trigger::Whole), 2);
    assert_eq!(r.p.traces_held(), 0);
}

/// The whole-batch fast path decides exactly as buffering every span and then deciding each
/// touched trace did: same kept spans (bytes and all), same counts, on batches that mix new
/// traces, traces already buffering, traces decided earlier, interleaved traces and a trace
/// over the size limit.
#[test]
fn whole_fast_path_agrees_with_buffering_every_span() {
    const CFG: &str = r#"
max_spans_per_trace: 6
policies:
  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
  - {name: vip, type: string_attribute, string_attribute: {key: tier, values: [vip]}}
  - {name: half, type: probabilistic, probabilistic: {sampling_percentage: 50}}
"#;
    let mut fast = Run::new(CFG);
    let mut slow = Run::new(CFG);
    let mut rnd = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rnd = splitmix(rnd);
        rnd % n
    };
    let (mut out_fast, mut out_slow) = (Vec::new(), Vec::new());
    let mut paths = [0usize; 4];
    for round in 0..200u64 {
        let ms = round * 10;
        let mut batch: Vec<B> = Vec::new();
        for k in 0..(1 + next(6)) {
            // Ids repeat across rounds, so some traces were decided already.
            let t = tid(next(400));
            let n = 1 + next(8);
            let mut spans: Vec<B> = (0..n)
                .map(|i| {
                    let b = if i == 0 { root(t, 5) } else { child(t, i + 1) };
                    match next(10) {
                        0 => b.error(),
                        1 => b.attr("tier", s("vip")),
                        _ => b,
                    }
                })
                .collect();
            if k == 0 && next(8) == 0 {
                // A trace that already has a span buffered.
                let first = spans.remove(0);
                out_fast.extend(fast.send(ms, vec![first.clone()]));
                out_slow.extend(slow.send(ms, vec![first]));
                paths[0] += 1;
            }
            batch.extend(spans);
        }
        if next(10) == 0 && batch.len() > 2 {
            // Interleave: the last span moves to the front.
            let last = batch.pop().expect("non-empty");
            batch.insert(0, last);
            paths[1] += 1;
        }
        paths[2] += usize::from(batch.len() >= 6);
        out_fast.extend(fast.send_whole(ms, batch.clone()));
        let now = slow.at(ms);
        slow.p
            .process_general(now, batch.into_iter().map(B::build).collect(), true);
        let mut o = Vec::new();
        slow.p.emit(now, &mut o);
        out_slow.extend(flat(o));
        out_fast.extend(fast.tick(ms + 5));
        out_slow.extend(slow.tick(ms + 5));
    }
    paths[3] = fast.p.stats().late_spans_kept as usize + fast.p.stats().late_spans_dropped as usize;
    assert!(
        paths.iter().all(|&n| n > 0),
        "every path exercised: {paths:?}"
    );
    let key = |v: &[Span]| {
        let mut k: Vec<(TraceId, u64, Vec<u8>)> = v
            .iter()
            .map(|s| (s.trace_id, s.span_id.as_u64(), s.raw.to_vec()))
            .collect();
        k.sort();
        k
    };
    assert!(!out_fast.is_empty());
    let (kf, ks) = (key(&out_fast), key(&out_slow));
    let only = |a: &[(TraceId, u64, Vec<u8>)], b: &[(TraceId, u64, Vec<u8>)]| {
        a.iter()
            .filter(|x| !b.contains(x))
            .map(|x| (x.0, x.1))
            .take(4)
            .collect::<Vec<_>>()
    };
    let first_diff = (only(&kf, &ks), only(&ks, &kf));
    assert!(
        kf == ks,
        "{} kept spans on the fast path, {} buffering; first difference {first_diff:?}",
        kf.len(),
        ks.len()
    );
    let (f, w) = (fast.p.stats(), slow.p.stats());
    assert_eq!(
        (
            f.traces_kept,
            f.spans_kept,
            f.traces_dropped,
            f.spans_dropped
        ),
        (
            w.traces_kept,
            w.spans_kept,
            w.traces_dropped,
            w.spans_dropped
        )
    );
    assert_eq!(
        (f.late_spans_kept, f.late_spans_dropped, f.decided_by),
        (w.late_spans_kept, w.late_spans_dropped, w.decided_by)
    );
    assert_eq!(fast.p.traces_held(), slow.p.traces_held());
}

#[test]
fn whole_batch_completes_a_trace_that_was_already_buffering() {
    let mut r = Run::new(ALWAYS);
    let t = tid(1);
    r.send(0, vec![child(t, 2)]);
    let out = r.send_whole(5, vec![root(t, 10), child(t, 3)]);
    assert_eq!(out.len(), 3);
}

// ---------------------------------------------------------------- policies

#[test]
fn status_code_keeps_errors_and_timed_out_ebpf_calls() {
    let mut r =
        Run::new("policies: [{name: e, type: status_code, status_code: {status_codes: [ERROR]}}]");
    assert!(r.decide_one(0, vec![root(tid(1), 1), child(tid(1), 2).error()]));
    assert!(!r.decide_one(10, vec![root(tid(2), 1).ok(), child(tid(2), 2)]));
    assert!(r.decide_one(20, vec![root(tid(3), 1), child(tid(3), 2).timed_out()]));
    let mut r = Run::new(
        "policies: [{name: e, type: status_code, status_code: {status_codes: [OK, UNSET]}}]",
    );
    assert!(r.decide_one(0, vec![root(tid(1), 1).ok()]));
    assert!(r.decide_one(10, vec![root(tid(2), 1)]));
    assert!(!r.decide_one(20, vec![root(tid(3), 1).error()]));
    // A timed-out call is an error, not UNSET.
    assert!(!r.decide_one(30, vec![root(tid(4), 1).timed_out()]));
}

#[test]
fn latency_uses_earliest_start_to_latest_end() {
    let mut r = Run::new("policies: [{name: slow, type: latency, latency: {threshold_ms: 500}}]");
    let t = tid(1);
    // No single span is 500ms long; the trace is.
    assert!(r.decide_one(
        0,
        vec![
            root(t, 100).times(1_000, 1_100),
            child(t, 2).times(1_400, 1_500)
        ]
    ));
    assert!(!r.decide_one(10, vec![root(tid(2), 499)]));
    assert!(r.decide_one(20, vec![root(tid(3), 500)]));
}

#[test]
fn latency_upper_threshold_bounds_the_range() {
    let mut r = Run::new(
        "policies: [{name: mid, type: latency, latency: {threshold_ms: 100, upper_threshold_ms: 200}}]",
    );
    assert!(!r.decide_one(0, vec![root(tid(1), 100)]));
    assert!(r.decide_one(10, vec![root(tid(2), 150)]));
    assert!(r.decide_one(20, vec![root(tid(3), 200)]));
    assert!(!r.decide_one(30, vec![root(tid(4), 201)]));
}

#[test]
fn probabilistic_keeps_what_the_hash_says_with_adjusted_count() {
    let mut r = Run::new(
        "policies: [{name: p, type: probabilistic, probabilistic: {sampling_percentage: 25, hash_salt: s1}}]",
    );
    let h = Probabilistic::new("s1", 25.0);
    let mut kept = 0;
    for n in 0..400 {
        let t = tid(n);
        let mut out = r.send_whole(n, vec![root(t, 1)]);
        out.extend(r.tick(n));
        assert_eq!(!out.is_empty(), h.keeps(&t), "trace {n}");
        if let Some(s) = out.first() {
            kept += 1;
            assert_eq!(attr_str(s, ATTR_POLICY).as_deref(), Some("p"));
            assert_eq!(adjusted(s), Some(4.0));
        }
    }
    assert!((60..=140).contains(&kept), "kept {kept} of 400 at 25%");
}

#[test]
fn string_attribute_exact_regex_invert_and_resource() {
    let y = "policies: [{name: s, type: string_attribute, string_attribute: {key: route, values: [/a, /b]}}]";
    let mut r = Run::new(y);
    assert!(r.decide_one(
        0,
        vec![root(tid(1), 1), child(tid(1), 2).attr("route", s("/b"))]
    ));
    assert!(!r.decide_one(1, vec![root(tid(2), 1).attr("route", s("/c"))]));
    // A resource attribute counts as well.
    assert!(r.decide_one(2, vec![root(tid(3), 1).res("route", s("/a"))]));
    // Only string values match.
    assert!(!r.decide_one(
        3,
        vec![root(tid(4), 1).attr("route", any_value::Value::IntValue(1))]
    ));

    let y = "policies: [{name: s, type: string_attribute, string_attribute: {key: route, values: ['^/api/.*'], enabled_regex_matching: true, cache_max_size: 2}}]";
    let mut r = Run::new(y);
    for n in 0..5 {
        let v = format!("/api/{n}");
        assert!(r.decide_one(n * 10, vec![root(tid(n), 1).attr("route", s(&v))]));
    }
    assert!(!r.decide_one(100, vec![root(tid(9), 1).attr("route", s("/health"))]));

    let y = "policies: [{name: s, type: string_attribute, string_attribute: {key: route, values: [/health], invert_match: true}}]";
    let mut r = Run::new(y);
    assert!(!r.decide_one(
        0,
        vec![
            root(tid(1), 1),
            child(tid(1), 2).attr("route", s("/health"))
        ]
    ));
    assert!(r.decide_one(1, vec![root(tid(2), 1).attr("route", s("/x"))]));
    // No span has the key: kept, as in the Collector.
    assert!(r.decide_one(2, vec![root(tid(3), 1)]));
}

#[test]
fn numeric_attribute_ranges_and_invert() {
    let mut r = Run::new(
        "policies: [{name: n, type: numeric_attribute, numeric_attribute: {key: code, min_value: 500, max_value: 599}}]",
    );
    let int = any_value::Value::IntValue;
    assert!(r.decide_one(
        0,
        vec![root(tid(1), 1), child(tid(1), 2).attr("code", int(503))]
    ));
    assert!(!r.decide_one(1, vec![root(tid(2), 1).attr("code", int(404))]));
    assert!(r.decide_one(2, vec![root(tid(3), 1).res("code", int(500))]));
    assert!(r.decide_one(
        3,
        vec![root(tid(4), 1).attr("code", any_value::Value::DoubleValue(599.0))]
    ));

    let mut r = Run::new(
        "policies: [{name: n, type: numeric_attribute, numeric_attribute: {key: code, min_value: 500}}]",
    );
    assert!(r.decide_one(0, vec![root(tid(1), 1).attr("code", int(10_000))]));
    assert!(!r.decide_one(1, vec![root(tid(2), 1).attr("code", int(499))]));

    let mut r = Run::new(
        "policies: [{name: n, type: numeric_attribute, numeric_attribute: {key: code, max_value: 399, invert_match: true}}]",
    );
    assert!(!r.decide_one(0, vec![root(tid(1), 1).attr("code", int(200))]));
    assert!(r.decide_one(1, vec![root(tid(2), 1).attr("code", int(500))]));
}

#[test]
fn boolean_attribute_value_and_invert() {
    let b = any_value::Value::BoolValue;
    let mut r = Run::new(
        "policies: [{name: b, type: boolean_attribute, boolean_attribute: {key: vip, value: true}}]",
    );
    assert!(r.decide_one(
        0,
        vec![root(tid(1), 1), child(tid(1), 2).attr("vip", b(true))]
    ));
    assert!(!r.decide_one(1, vec![root(tid(2), 1).attr("vip", b(false))]));
    // The string "true" is not a boolean.
    assert!(!r.decide_one(2, vec![root(tid(3), 1).attr("vip", s("true"))]));
    assert!(r.decide_one(3, vec![root(tid(4), 1).res("vip", b(true))]));

    let mut r = Run::new(
        "policies: [{name: b, type: boolean_attribute, boolean_attribute: {key: probe, value: true, invert_match: true}}]",
    );
    assert!(!r.decide_one(0, vec![root(tid(1), 1).attr("probe", b(true))]));
    assert!(r.decide_one(1, vec![root(tid(2), 1)]));
}

#[test]
fn span_count_min_and_max() {
    let mut r = Run::new(
        "policies: [{name: c, type: span_count, span_count: {min_spans: 2, max_spans: 3}}]",
    );
    let t = |n| tid(n);
    assert!(!r.decide_one(0, vec![root(t(1), 1)]));
    assert!(r.decide_one(1, vec![root(t(2), 1), child(t(2), 2)]));
    assert!(r.decide_one(2, vec![root(t(3), 1), child(t(3), 2), child(t(3), 3)]));
    assert!(!r.decide_one(
        3,
        vec![
            root(t(4), 1),
            child(t(4), 2),
            child(t(4), 3),
            child(t(4), 4)
        ]
    ));
}

#[test]
fn trace_state_key_values() {
    let mut r = Run::new(
        "policies: [{name: ts, type: trace_state, trace_state: {key: key3, values: [value1, value2]}}]",
    );
    assert!(r.decide_one(
        0,
        vec![root(tid(1), 1), child(tid(1), 2).state("a=b,key3=value2")]
    ));
    assert!(!r.decide_one(1, vec![root(tid(2), 1).state("key3=value9")]));
    assert!(!r.decide_one(2, vec![root(tid(3), 1)]));
}

#[test]
fn rate_limiting_spends_a_budget_per_second_of_injected_time() {
    let mut r = Run::new(
        "policies: [{name: rl, type: rate_limiting, rate_limiting: {spans_per_second: 5}}]",
    );
    let three = |n: u64| vec![root(tid(n), 1), child(tid(n), 2), child(tid(n), 3)];
    let two = |n: u64| vec![root(tid(n), 1), child(tid(n), 2)];
    assert!(r.decide_one(0, three(1)));
    assert!(r.decide_one(100, two(2)));
    // Budget of 5 spent within this second.
    assert!(!r.decide_one(200, two(3)));
    // A new second, a new budget.
    assert!(r.decide_one(1_100, three(4)));
}

#[test]
fn always_sample_keeps_everything_with_count_one() {
    let mut r = Run::new(ALWAYS);
    let out = r.send_whole(0, vec![root(tid(1), 1), child(tid(1), 2)]);
    assert_eq!(out.len(), 2);
    for s in &out {
        assert_eq!(attr_str(s, ATTR_POLICY).as_deref(), Some("all"));
        assert_eq!(adjusted(s), Some(1.0));
    }
}

#[test]
fn and_needs_every_sub_policy() {
    let mut r = Run::new(
        r#"
policies:
  - name: slow-errors
    type: and
    and:
      and_sub_policy:
        - {name: e, type: status_code, status_code: {status_codes: [ERROR]}}
        - {name: l, type: latency, latency: {threshold_ms: 100}}
"#,
    );
    assert!(r.decide_one(0, vec![root(tid(1), 200).error()]));
    assert!(!r.decide_one(1, vec![root(tid(2), 200)]));
    assert!(!r.decide_one(2, vec![root(tid(3), 50).error()]));
}

#[test]
fn and_with_probabilistic_carries_its_adjusted_count() {
    let mut r = Run::new(
        r#"
policies:
  - name: half-of-checkout
    type: and
    and:
      and_sub_policy:
        - {name: route, type: string_attribute, string_attribute: {key: route, values: [/checkout]}}
        - {name: half, type: probabilistic, probabilistic: {sampling_percentage: 50}}
"#,
    );
    let h = Probabilistic::new("", 50.0);
    let n = (0..100)
        .find(|n| h.keeps(&tid(*n)))
        .expect("some id is kept at 50%");
    let out = r.send_whole(0, vec![root(tid(n), 1).attr("route", s("/checkout"))]);
    assert_eq!(out.len(), 1);
    assert_eq!(adjusted(&out[0]), Some(2.0));
    assert_eq!(
        attr_str(&out[0], ATTR_POLICY).as_deref(),
        Some("half-of-checkout")
    );
}

#[test]
fn not_inverts_its_sub_policy() {
    let mut r = Run::new(
        r#"
policies:
  - name: not-health
    type: not
    not:
      not_sub_policy: {name: h, type: string_attribute, string_attribute: {key: route, values: [/health]}}
"#,
    );
    assert!(!r.decide_one(0, vec![root(tid(1), 1).attr("route", s("/health"))]));
    assert!(r.decide_one(1, vec![root(tid(2), 1).attr("route", s("/api"))]));
}

#[test]
fn drop_vetoes_every_keep_even_an_error() {
    let mut r = Run::new(
        r#"
policies:
  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
  - {name: all, type: always_sample}
  - name: no-probes
    type: drop
    drop:
      drop_sub_policy:
        - {name: probe, type: string_attribute, string_attribute: {key: route, values: [/health]}}
        - {name: short, type: latency, latency: {upper_threshold_ms: 1000}}
"#,
    );
    // Both drop conditions hold: dropped despite the error and always_sample.
    assert!(!r.decide_one(0, vec![root(tid(1), 5).error().attr("route", s("/health"))]));
    // Only one holds: the drop does not apply.
    assert!(r.decide_one(1, vec![root(tid(2), 5_000).attr("route", s("/health"))]));
    assert!(r.decide_one(2, vec![root(tid(3), 5).error()]));
    let st = r.p.stats();
    assert_eq!(
        r.p.policy_stats(None, "no-probes").unwrap().dropped_traces,
        1
    );
    assert_eq!(st.traces_dropped, 1);
    assert_eq!(st.traces_not_kept, 0);
}

#[test]
fn composite_spends_each_share_in_policy_order() {
    let mut r = Run::new(
        r#"
policies:
  - name: budget
    type: composite
    composite:
      max_total_spans_per_second: 10
      policy_order: [vip, rest]
      composite_sub_policy:
        - {name: rest, type: always_sample}
        - {name: vip, type: boolean_attribute, boolean_attribute: {key: vip, value: true}}
      rate_allocation:
        - {policy: vip, percent: 60}
"#,
    );
    let vip = |n: u64| {
        vec![
            root(tid(n), 1).attr("vip", any_value::Value::BoolValue(true)),
            child(tid(n), 2),
        ]
    };
    let plain = |n: u64| vec![root(tid(n), 1), child(tid(n), 2)];
    // vip gets 6 spans/s, the rest 4.
    assert!(r.decide_one(0, vip(1)));
    assert!(r.decide_one(1, vip(2)));
    assert!(r.decide_one(2, vip(3)));
    // vip's share is spent; the first matching sub-policy decides, so no fallback to `rest`.
    assert!(!r.decide_one(3, vip(4)));
    assert!(r.decide_one(4, plain(5)));
    assert!(r.decide_one(5, plain(6)));
    assert!(!r.decide_one(6, plain(7)));
    // Next second: budgets are back.
    assert!(r.decide_one(1_010, vip(8)));
    assert!(r.decide_one(1_011, plain(9)));
}

#[test]
fn smallest_adjusted_count_names_the_trace_unless_first_match() {
    let y = |first: bool| {
        format!(
            "sample_on_first_match: {first}\npolicies:\n  - {{name: half, type: probabilistic, probabilistic: {{sampling_percentage: 50}}}}\n  - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}\n"
        )
    };
    let h = Probabilistic::new("", 50.0);
    let n = (0..100)
        .find(|n| h.keeps(&tid(*n)))
        .expect("some id is kept");
    let mut r = Run::new(&y(false));
    let out = r.send_whole(0, vec![root(tid(n), 1).error()]);
    assert_eq!(attr_str(&out[0], ATTR_POLICY).as_deref(), Some("errors"));
    assert_eq!(adjusted(&out[0]), Some(1.0));
    let mut r = Run::new(&y(true));
    let out = r.send_whole(0, vec![root(tid(n), 1).error()]);
    assert_eq!(attr_str(&out[0], ATTR_POLICY).as_deref(), Some("half"));
    assert_eq!(adjusted(&out[0]), Some(2.0));
}

#[test]
fn sampling_attributes_replace_upstream_ones_and_keep_the_rest() {
    let mut r = Run::new(ALWAYS);
    let out = r.send_whole(
        0,
        vec![root(tid(1), 1)
            .attr(ATTR_POLICY, s("upstream"))
            .attr("http.route", s("/x"))],
    );
    let kept = &out[0];
    let policies: Vec<_> = kept.attrs().filter(|(k, _)| *k == ATTR_POLICY).collect();
    assert_eq!(policies, vec![(ATTR_POLICY, AttrValue::Str("all"))]);
    assert_eq!(attr_str(kept, "http.route").as_deref(), Some("/x"));
}

// ---------------------------------------------------------------- late spans

#[test]
fn late_span_of_a_kept_trace_goes_out_at_once_with_the_decision() {
    let mut r = Run::new(MISSION);
    let t = tid(1);
    r.send(0, vec![root(t, 10).error()]);
    assert_eq!(r.tick(2_000).len(), 1);
    let late = r.send(60_000, vec![child(t, 7)]);
    assert_eq!(late.len(), 1);
    assert_eq!(attr_str(&late[0], ATTR_POLICY).as_deref(), Some("errors"));
    assert_eq!(adjusted(&late[0]), Some(1.0));
    assert_eq!(r.p.stats().late_spans_kept, 1);
    assert_eq!(r.p.traces_held(), 0);
}

#[test]
fn late_span_of_a_dropped_trace_is_dropped_even_if_it_is_an_error() {
    let mut r =
        Run::new("policies: [{name: e, type: status_code, status_code: {status_codes: [ERROR]}}]");
    let t = tid(1);
    r.send(0, vec![root(t, 10)]);
    assert!(r.tick(2_000).is_empty());
    // Re-deciding on this fragment would keep it; the decision stands.
    assert!(r.send(3_000, vec![child(t, 2).error()]).is_empty());
    assert_eq!(r.p.stats().late_spans_dropped, 1);
    assert_eq!(r.p.traces_held(), 0);
    assert_eq!(r.p.stats().traces_dropped, 1);
}

#[test]
fn late_spans_after_whole_cap_and_shutdown_decisions() {
    let mut r = Run::new("num_traces: 1\npolicies: [{name: all, type: always_sample}]");
    let (a, b, c) = (tid(1), tid(2), tid(3));
    assert_eq!(r.send_whole(0, vec![root(a, 1)]).len(), 1);
    assert_eq!(r.send(1, vec![child(a, 2)]).len(), 1);
    r.send(2, vec![child(b, 2)]);
    // c pushes b out early (cap); b's next span follows.
    assert_eq!(r.send(3, vec![child(c, 2)]).len(), 1);
    assert_eq!(r.p.stats().decided(Trigger::Cap), 1);
    assert_eq!(r.send(4, vec![child(b, 3)]).len(), 1);
    assert_eq!(r.shutdown(5).len(), 1);
    assert_eq!(r.send(6, vec![child(c, 3)]).len(), 1);
    assert_eq!(r.p.stats().late_spans_kept, 3);
}

#[test]
fn with_the_cache_off_a_late_span_starts_a_new_trace() {
    let mut r = Run::new(
        "decision_cache: {sampled_cache_size: 0, non_sampled_cache_size: 0}\npolicies: [{name: all, type: always_sample}]",
    );
    let t = tid(1);
    r.send_whole(0, vec![root(t, 1)]);
    assert!(r.send(1, vec![child(t, 2)]).is_empty());
    assert_eq!(r.p.traces_held(), 1);
}

// ---------------------------------------------------------------- caps and shutdown

#[test]
fn num_traces_cap_decides_the_oldest_early() {
    let mut r = Run::new("num_traces: 3\npolicies: [{name: all, type: always_sample}]");
    for n in 0..3 {
        assert!(r.send(n, vec![child(tid(n), 2)]).is_empty());
    }
    let out = r.send(10, vec![child(tid(3), 2)]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].trace_id, tid(0));
    assert_eq!(r.p.traces_held(), 3);
    assert_eq!(r.p.stats().decided(Trigger::Cap), 1);
    // A span of a held trace does not push anything out.
    assert!(r.send(11, vec![child(tid(1), 3)]).is_empty());
}

#[test]
fn memory_cap_decides_the_oldest_early() {
    let mut r = Run::new("max_memory_mib: 1\npolicies: [{name: all, type: always_sample}]");
    let blob = "x".repeat(300_000);
    for n in 0..3 {
        assert!(r
            .send(n, vec![child(tid(n), 2).attr("b", s(&blob))])
            .is_empty());
    }
    let out = r.send(10, vec![child(tid(3), 2).attr("b", s(&blob))]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].trace_id, tid(0));
    assert!(r.p.bytes_held() <= 1 << 20);
    assert_eq!(r.p.stats().decided(Trigger::Memory), 1);
}

#[test]
fn backpressure_refuses_intake_until_room_frees_and_drops_nothing() {
    let mut r = Run::new(
        "num_traces: 2\non_full: backpressure\ndecision_wait: 1s\npolicies: [{name: all, type: always_sample}]",
    );
    r.send(0, vec![child(tid(1), 2)]);
    assert!(r.p.accepting());
    r.send(0, vec![child(tid(2), 2)]);
    assert!(!r.p.accepting());
    // A batch that was already on its way is still taken, not dropped.
    assert!(r.send(1, vec![child(tid(3), 2)]).is_empty());
    assert_eq!(r.p.traces_held(), 3);
    assert_eq!(r.p.stats().decided(Trigger::Cap), 0);
    assert_eq!(r.tick(1_000).len(), 2);
    assert!(r.p.accepting());
    assert_eq!(r.tick(1_001).len(), 1);
}

#[test]
fn spare_table_capacity_neither_blocks_intake_nor_forces_early_decisions() {
    // The pre-sized trace table alone occupies more than the 1 MiB budget.
    for mode in ["backpressure", "decide_early"] {
        let mut r = Run::new(&format!(
            "max_memory_mib: 1\nexpected_new_traces_per_sec: 100000\non_full: {mode}\ndecision_wait: 1s\npolicies: [{{name: all, type: always_sample}}]"
        ));
        assert!(r.p.bytes_held() > 1 << 20);
        for n in 0..100 {
            assert!(r.p.accepting(), "{mode}");
            assert!(r.send(0, vec![child(tid(n), 2)]).is_empty(), "{mode}");
        }
        assert_eq!(r.p.traces_held(), 100);
        assert_eq!(r.tick(1_000).len(), 100);
    }
}

#[test]
fn block_on_overflow_is_backpressure() {
    let c = config("block_on_overflow: true\npolicies: [{name: all, type: always_sample}]");
    assert_eq!(c.effective_on_full(), OnFull::Backpressure);
}

#[test]
fn shutdown_decides_and_flushes_every_pending_trace() {
    let mut r = Run::new(MISSION);
    r.send(0, vec![root(tid(1), 10).error(), child(tid(1), 2)]);
    r.send(1, vec![child(tid(2), 2).times(0, 2_000)]);
    r.send(2, vec![root(tid(3), 1)]);
    let out = r.shutdown(3);
    let kept: std::collections::HashSet<_> = out.iter().map(|s| s.trace_id).collect();
    assert!(kept.contains(&tid(1)) && kept.contains(&tid(2)));
    assert_eq!(r.p.traces_held(), 0);
    assert_eq!(r.p.stats().decided(Trigger::Shutdown), 3);
    let st = r.p.stats();
    assert_eq!(st.traces_kept + st.traces_dropped, 3);
}

#[test]
fn every_span_is_accounted_for() {
    let mut r = Run::new(MISSION);
    let mut sent = 0u64;
    let mut got = 0u64;
    for n in 0..300u64 {
        let t = tid(n);
        let mut spans = vec![child(t, 2), child(t, 3)];
        if n % 7 == 0 {
            spans.push(child(t, 4).error());
        }
        if n % 2 == 0 {
            spans.push(root(t, n * 3));
        }
        sent += spans.len() as u64;
        got += r.send(n * 10, spans).len() as u64;
        got += r.tick(n * 10).len() as u64;
    }
    got += r.shutdown(10_000).len() as u64;
    let st = r.p.stats();
    assert_eq!(got, st.spans_kept + st.late_spans_kept);
    assert_eq!(sent, st.spans_kept + st.spans_dropped);
    assert_eq!(r.p.buffered_bytes(), 0);
}

#[test]
fn held_traces_release_their_request_buffers_and_share_resources() {
    let mut r = Run::new(MISSION);
    // Two requests from one SDK: byte-identical resources and scopes, distinct buffers.
    let spans = |t: TraceId, first: u64| -> Vec<Span> {
        (first..first + 3)
            .map(|i| child(t, i).res("service.name", s("shop")).build())
            .collect()
    };
    let mut reqs = Vec::new();
    let mut encoded = 0;
    for (n, first) in [(1u64, 2u64), (2, 2), (1, 5)] {
        let buf = tailweave_core::otlp::encode_request(&spans(tid(n), first));
        let d = tailweave_core::otlp::decode_request(buf.clone(), &Default::default())
            .expect("decodes");
        encoded += d.spans.iter().map(|s| s.raw.len()).sum::<usize>();
        let mut out = Vec::new();
        r.p.process(r.at(0), SpanBatch::new(d.spans), &mut out);
        assert!(out.is_empty());
        reqs.push(buf);
    }
    assert_eq!((r.p.traces_held(), r.p.spans_held()), (2, 9));
    // Nothing held points into the requests any more.
    for b in &mut reqs {
        assert!(b.is_unique(), "a request buffer is still referenced");
    }
    assert_eq!(r.p.scopes.len(), 1);
    // Per span: its bytes and three bytes of framing; per trace, one scope pointer.
    let scopes = 2 * std::mem::size_of::<Arc<Scope>>();
    assert_eq!(r.p.buffered_bytes(), encoded + 9 * 3 + scopes);
    // Decided later, the spans are what was sent.
    let out = r.shutdown(1);
    let st = r.p.stats();
    assert_eq!(st.spans_kept + st.spans_dropped, 9);
    assert_eq!(st.unpack_failed, 0);
    for sp in &out {
        assert_eq!(sp.resource().service_name(), Some("shop"));
        assert_eq!(sp.name(), "op");
    }
    assert_eq!(r.p.buffered_bytes(), 0);
}

#[test]
fn only_policies_that_read_spans_make_a_decision_unpack_them() {
    assert!(!sampler(MISSION).votes_on_spans);
    assert!(
        !sampler("policies: [{name: n, type: span_count, span_count: {min_spans: 2}}]")
            .votes_on_spans
    );
    for yaml in [
        "policies: [{name: s, type: string_attribute, string_attribute: {key: k, values: [v]}}]",
        "policies: [{name: n, type: not, not: {not_sub_policy: {name: t, type: trace_state, trace_state: {key: a, values: [b]}}}}]",
        "tenant_key: tenant\npolicies: [{name: all, type: always_sample}]",
    ] {
        assert!(sampler(yaml).votes_on_spans, "{yaml}");
    }
    // Decided on the summary alone, a kept trace still goes out whole and a dropped one is
    // counted with all its spans.
    let mut r = Run::new("policies: [{name: n, type: span_count, span_count: {min_spans: 3}}]");
    r.send(0, vec![root(tid(1), 1), child(tid(1), 2), child(tid(1), 3)]);
    r.send(0, vec![root(tid(2), 1), child(tid(2), 2)]);
    let out = r.tick(3_000);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|s| s.trace_id == tid(1)));
    assert_eq!(r.p.stats().spans_dropped, 2);
}

// ---------------------------------------------------------------- tenants

#[test]
fn tenant_key_selects_the_policy_set() {
    let mut r = Run::new(
        r#"
tenant_key: k8s.namespace.name
policies:
  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
tenants:
  checkout:
    policies:
      - {name: everything, type: always_sample}
"#,
    );
    let ns = |v: &str| s(v);
    let out = r.send_whole(
        0,
        vec![root(tid(1), 1).res("k8s.namespace.name", ns("checkout"))],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(
        attr_str(&out[0], ATTR_POLICY).as_deref(),
        Some("everything")
    );
    assert!(r
        .send_whole(
            1,
            vec![root(tid(2), 1).res("k8s.namespace.name", ns("search"))]
        )
        .is_empty());
    assert_eq!(
        r.send_whole(
            2,
            vec![root(tid(3), 1)
                .error()
                .res("k8s.namespace.name", ns("search"))]
        )
        .len(),
        1
    );
    assert_eq!(
        r.p.policy_stats(Some("checkout"), "everything")
            .unwrap()
            .kept_traces,
        1
    );
    assert_eq!(r.p.policy_stats(None, "errors").unwrap().kept_traces, 1);
}

// ---------------------------------------------------------------- config

fn parse_err(yaml: &str) -> String {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("yaml");
    tailweave_core::config::parse::<TailSamplingConfig>(v)
        .map(|_| ())
        .expect_err("should not parse")
        .to_string()
}

fn issues(yaml: &str) -> Vec<String> {
    config(yaml)
        .validate()
        .iter()
        .map(|i| i.to_string())
        .collect()
}

#[test]
fn defaults_and_durations() {
    let c = config("decision_wait: 10s\npolicies: [{name: all, type: always_sample}]");
    assert_eq!(c.decision_wait, Duration::from_secs(10));
    assert_eq!(c.decision_wait_after_root, Duration::from_secs(2));
    assert_eq!(c.decision_cache.sampled_cache_size, 300_000);
    assert!(c.validate().is_empty());
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    assert!(parse_err("bogus: 1").contains("bogus"));
    let e = parse_err("policies: [{name: l, type: latency, latency: {threshold: 5}}]");
    assert!(e.contains("threshold") && e.contains("policy `l`"), "{e}");
    let e = parse_err("policies: [{name: l, type: latency, extra: {}}]");
    assert!(e.contains("extra"), "{e}");
    let e = parse_err("decision_cache: {size: 1}");
    assert!(e.contains("size"), "{e}");
}

#[test]
fn unsupported_type_is_named_with_its_path() {
    let i = issues("policies: [{name: o, type: ottl_condition, ottl_condition: {span: [x]}}]");
    assert_eq!(i.len(), 1, "{i:?}");
    assert!(
        i[0].starts_with("policies[0].type") && i[0].contains("`ottl_condition`"),
        "{i:?}"
    );
    let i = issues(
        "policies: [{name: a, type: and, and: {and_sub_policy: [{name: x, type: bytes_limiting}]}}]",
    );
    assert!(
        i[0].starts_with("policies[0].and.and_sub_policy[0].type")
            && i[0].contains("bytes_limiting"),
        "{i:?}"
    );
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let i = issues(
        r#"
num_traces: 0
policies:
  - {name: n, type: numeric_attribute, numeric_attribute: {key: k, min_value: 5, max_value: 1}}
  - {name: n, type: probabilistic, probabilistic: {sampling_percentage: 150}}
  - {name: s, type: status_code, status_code: {status_codes: [BAD]}}
  - {name: r, type: string_attribute, string_attribute: {key: k, values: ['('], enabled_regex_matching: true}}
  - name: c
    type: composite
    composite:
      max_total_spans_per_second: 10
      policy_order: [missing]
      composite_sub_policy: [{name: a, type: always_sample}]
      rate_allocation: [{policy: a, percent: 120}]
tenants:
  x: {policies: []}
"#,
    );
    let want = [
        "num_traces",
        "policies[0].numeric_attribute.min_value",
        "policies[1].name",
        "policies[1].probabilistic.sampling_percentage",
        "policies[2].status_code.status_codes[0]",
        "policies[3].string_attribute.values[0]",
        "policies[4].composite.policy_order[0]",
        "policies[4].composite.rate_allocation[0].percent",
        "tenants",
        "tenants.x.policies",
    ];
    for w in want {
        assert!(
            i.iter().any(|m| m.starts_with(&format!("{w}:"))),
            "missing {w} in {i:?}"
        );
    }
    assert!(issues("{}").iter().any(|m| m.starts_with("policies:")));
}

#[test]
fn build_refuses_an_invalid_config() {
    let c = config("policies: [{name: x, type: nope}]");
    let ctx = BuildContext {
        id: "tail_sampling".into(),
        ..Default::default()
    };
    let e = c.build(&ctx).err().expect("invalid").to_string();
    assert!(e.contains("nope"), "{e}");
    let c = config(ALWAYS);
    assert!(c.build(&ctx).is_ok());
}

#[test]
fn appended_attributes_decode_like_an_edit() {
    let mut fast = root(tid(1), 1).attr("http.route", s("/x")).build();
    let mut slow = fast.clone();
    assert!(Annotation::new("p", 4.0).apply(&mut fast));
    slow.edit(|p| {
        p.attributes.push(kv(ATTR_POLICY, s("p")));
        p.attributes
            .push(kv(ATTR_ADJUSTED_COUNT, any_value::Value::DoubleValue(4.0)));
    })
    .expect("decodes");
    assert_eq!(fast.decode().expect("valid"), slow.decode().expect("valid"));
    // The header is untouched.
    assert_eq!((fast.trace_id, fast.span_id), (slow.trace_id, slow.span_id));
}

// ---------------------------------------------------------------- restart-safe storage

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tailweave-ts-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn log(&self) -> std::path::PathBuf {
        self.0.join("traces_tail_sampling.log")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stored(dir: &TempDir, policies: &str) -> String {
    format!("storage: file\ndirectory: {}\n{policies}", dir.0.display())
}

fn open(yaml: &str, now: Instant) -> TailSampling {
    let c = config(yaml);
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    TailSampling::open(&c, "tail_sampling", "traces", now).expect("opens")
}

#[test]
fn storage_file_needs_a_directory() {
    let i = issues("storage: file\npolicies: [{name: all, type: always_sample}]");
    assert!(i.iter().any(|m| m.starts_with("directory:")), "{i:?}");
}

#[test]
fn a_restart_keeps_buffered_traces_and_decisions() {
    let dir = TempDir::new("restart");
    let y = stored(
        &dir,
        "policies: [{name: e, type: status_code, status_code: {status_codes: [ERROR]}}]",
    );
    let t0 = Instant::now();
    let (pending, kept, dropped) = (tid(1), tid(2), tid(3));
    {
        let mut a = open(&y, t0);
        let mut out = Vec::new();
        let spans = vec![
            root(pending, 1).error().res("service.name", s("a")).build(),
            child(pending, 2).build(),
        ];
        a.process(t0, SpanBatch::new(spans), &mut out);
        let whole = vec![root(kept, 1).error().build(), root(dropped, 1).build()];
        a.process(t0, SpanBatch::whole(whole), &mut out);
        assert_eq!(flat(out).len(), 1);
        // Downstream took the kept span; the next tick logs it.
        let mut none = Vec::new();
        a.tick(t0, &mut none);
        assert!(none.is_empty());
        // Dropped here without shutdown: as after `kill -9`.
    }
    let t1 = t0 + Duration::from_secs(100);
    let mut b = open(&y, t1);
    assert_eq!(b.traces_held(), 1);
    assert_eq!(b.spans_held(), 2);
    assert_eq!(b.stats().restored_spans, 2);
    assert_eq!(b.stats().restored_decisions, 2);
    let mut out = Vec::new();
    // Late spans follow the decisions made before the restart, and are not decided again.
    let late = vec![child(kept, 5).build(), child(dropped, 5).error().build()];
    b.process(t1, SpanBatch::new(late), &mut out);
    let out = flat(out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].trace_id, kept);
    assert_eq!(attr_str(&out[0], ATTR_POLICY).as_deref(), Some("e"));
    // The restored trace waits again from the restart and keeps its resource.
    let mut out = Vec::new();
    b.tick(t1 + Duration::from_secs(2), &mut out);
    let out = flat(out);
    assert_eq!(out.len(), 2);
    assert!(out.iter().any(|s| s.resource().service_name() == Some("a")));
}

#[test]
fn a_torn_last_record_is_cut_off_and_the_rest_replayed() {
    let dir = TempDir::new("torn");
    let y = stored(&dir, ALWAYS);
    let t0 = Instant::now();
    {
        let mut a = open(&y, t0);
        let mut out = Vec::new();
        a.process(t0, SpanBatch::new(vec![child(tid(1), 2).build()]), &mut out);
    }
    let len = std::fs::metadata(dir.log()).expect("log").len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.log())
            .expect("log");
        // A span record whose payload never made it to disk.
        f.write_all(&[2, 200, 0, 0, 0, 1, 2, 3]).expect("write");
    }
    let b = open(&y, t0);
    assert_eq!(b.traces_held(), 1);
    assert!(std::fs::metadata(dir.log()).expect("log").len() >= len);
    drop(b);
    // A flipped byte in the middle fails its check: replay stops before it.
    let mut data = std::fs::read(dir.log()).expect("log");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(dir.log(), &data).expect("write");
    let c = open(&y, t0);
    assert_eq!(c.traces_held(), 0);
}

/// Span ids and decision keys in the log as it is on disk now (read without opening it for
/// writing, so the processor that owns it is left alone).
fn logged_now(dir: &TempDir) -> (Vec<(TraceId, tailweave_core::SpanId)>, Vec<u64>) {
    let data = std::fs::read(dir.log()).expect("log");
    let (r, _) = storage::replay(Bytes::from(data));
    (
        r.spans.iter().map(|s| (s.trace_id, s.span_id)).collect(),
        r.decisions.iter().map(|d| d.key).collect(),
    )
}

#[test]
fn with_storage_an_ack_resolves_once_its_spans_are_in_the_log() {
    let dir = TempDir::new("ack");
    let y = stored(
        &dir,
        "policies: [{name: e, type: status_code, status_code: {status_codes: [ERROR]}}]",
    );
    let t0 = Instant::now();
    let mut a = open(&y, t0);
    assert!(a.holds_spans());
    let (pending, kept, dropped) = (tid(1), tid(2), tid(3));
    let mut out = Vec::new();

    let (ack, mut wait) = tailweave_core::Ack::new();
    let spans = vec![root(pending, 1).build(), child(pending, 2).build()];
    a.process(t0, SpanBatch::new(spans).with_ack(ack), &mut out);
    assert_eq!(wait.try_take(), Some(Ok(())));
    let (spans, _) = logged_now(&dir);
    assert!(spans.contains(&(pending, tailweave_core::SpanId::from_u64(1))));
    assert!(spans.contains(&(pending, tailweave_core::SpanId::from_u64(2))));

    // Whole units decided on the spot: the spans and both decisions are logged by then.
    let (ack, mut wait) = tailweave_core::Ack::new();
    let whole = vec![root(kept, 1).error().build(), root(dropped, 1).build()];
    a.process(t0, SpanBatch::whole(whole).with_ack(ack), &mut out);
    let (spans, decisions) = logged_now(&dir);
    assert!(spans.contains(&(kept, tailweave_core::SpanId::from_u64(1))));
    assert!(spans.contains(&(dropped, tailweave_core::SpanId::from_u64(1))));
    assert!(decisions.contains(&cache::key(&kept)));
    assert!(decisions.contains(&cache::key(&dropped)));
    assert!(!decisions.contains(&cache::key(&pending)));

    // The kept trace went on with the input's ack and the sampler's own: the client is
    // answered when the next stage has the spans.
    assert_eq!(flat_acks(&out), 2);
    assert_eq!(wait.try_take(), None);
    assert_eq!(flat(out).len(), 1);
    assert_eq!(wait.try_take(), Some(Ok(())));
}

#[test]
fn kept_spans_downstream_never_took_are_sent_again_after_a_crash() {
    let dir = TempDir::new("unsent");
    let y = stored(
        &dir,
        "policies: [{name: e, type: status_code, status_code: {status_codes: [ERROR]}}]",
    );
    let t0 = Instant::now();
    let (taken, unsent) = (tid(1), tid(2));
    let held_downstream;
    {
        let mut a = open(&y, t0);
        let mut out = Vec::new();
        let b = vec![root(taken, 1).error().build(), child(taken, 2).build()];
        a.process(t0, SpanBatch::new(b), &mut out);
        a.tick(t0 + Duration::from_secs(40), &mut out);
        assert_eq!(flat(std::mem::take(&mut out)).len(), 2, "first trace kept");
        // Downstream took the first batch; the next tick says so in the log.
        a.tick(t0 + Duration::from_secs(41), &mut out);
        let b = vec![root(unsent, 1).error().build(), child(unsent, 2).build()];
        a.process(t0 + Duration::from_secs(42), SpanBatch::new(b), &mut out);
        a.tick(t0 + Duration::from_secs(90), &mut out);
        assert_eq!(
            out.iter().map(|b| b.len()).sum::<usize>(),
            2,
            "second trace kept"
        );
        // `kill -9` while the second batch is still on its way downstream.
        held_downstream = out;
    }
    let t1 = t0 + Duration::from_secs(100);
    let mut b = open(&y, t1);
    assert_eq!(b.stats().restored_kept_spans, 2);
    let mut out = Vec::new();
    b.tick(t1, &mut out);
    let again = flat(out);
    assert_eq!(again.len(), 2);
    assert!(
        again.iter().all(|s| s.trace_id == unsent),
        "only the untaken trace again"
    );
    assert!(again
        .iter()
        .all(|s| attr_str(s, ATTR_POLICY).as_deref() == Some("e")));
    drop(held_downstream);
    // Taken this time: a third start sends nothing again.
    let mut out = Vec::new();
    b.tick(t1 + Duration::from_secs(1), &mut out);
    drop(b);
    let mut c = open(&y, t1);
    assert_eq!(c.stats().restored_kept_spans, 0);
    c.tick(t1, &mut out);
    assert!(flat(out).is_empty());
}

#[test]
fn without_storage_an_ack_resolves_when_the_spans_are_taken() {
    let mut r = Run::new(MISSION);
    assert!(r.p.holds_spans());
    let (ack, mut wait) = tailweave_core::Ack::new();
    let (ack2, mut wait2) = tailweave_core::Ack::new();
    let mut out = Vec::new();
    let now = r.at(0);
    let b = SpanBatch::new(vec![child(tid(7), 2).build()]).with_ack(ack);
    r.p.process(now, b, &mut out);
    let b = SpanBatch::whole(vec![root(tid(8), 1).error().build()]).with_ack(ack2);
    r.p.process(now, b, &mut out);
    assert_eq!(r.p.traces_held(), 1);
    assert_eq!(wait.try_take(), Some(Ok(())));
    // The kept unit went on in the same call, carrying its input's ack (and no other).
    assert_eq!(flat_acks(&out), 1);
    assert_eq!(wait2.try_take(), None);
    assert_eq!(flat(out).len(), 1);
    assert_eq!(wait2.try_take(), Some(Ok(())));
}

fn flat_acks(out: &[SpanBatch]) -> usize {
    out.iter().map(|b| b.acks.len()).sum()
}

#[test]
fn shutdown_compacts_the_log_to_decisions() {
    let dir = TempDir::new("compact");
    let y = stored(&dir, ALWAYS);
    let t0 = Instant::now();
    let mut a = open(&y, t0);
    let mut out = Vec::new();
    let blob = "x".repeat(10_000);
    for n in 0..20 {
        let spans = vec![child(tid(n), 2).attr("b", s(&blob)).build()];
        a.process(t0, SpanBatch::new(spans), &mut out);
    }
    let before = std::fs::metadata(dir.log()).expect("log").len();
    assert!(before > 200_000);
    a.shutdown(t0, &mut out);
    drop(a);
    // Until downstream took them, the kept spans stay in the log with the decisions.
    let (spans, decisions) = logged_now(&dir);
    assert_eq!((spans.len(), decisions.len()), (20, 20));
    assert_eq!(flat(out).len(), 20);
    // Taken: the stopped sampler's background wait logs it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let data = std::fs::read(dir.log()).expect("log");
        let (r, _) = storage::replay(Bytes::from(data));
        if r.delivered.len() == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} delivered records",
            r.delivered.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = open(&y, t0);
    assert_eq!(b.traces_held(), 0);
    assert_eq!(b.stats().restored_kept_spans, 0);
    assert_eq!(b.cached_decisions(), (20, 0));
    // The start compacted the log down to the decisions.
    let after = std::fs::metadata(dir.log()).expect("log").len();
    assert!(after < 2_000, "log still {after} bytes");
}

// ---------------------------------------------------------------- self-metrics

/// Records what the processor reports, keyed `name{k=v,...}` with labels sorted.
#[derive(Default)]
struct TestRecorder {
    counters: std::sync::Mutex<std::collections::BTreeMap<String, Arc<Cell>>>,
}

#[derive(Default)]
struct Cell(std::sync::Mutex<f64>);

impl metrics::CounterFn for Cell {
    fn increment(&self, v: u64) {
        *self.0.lock().unwrap() += v as f64;
    }
    fn absolute(&self, v: u64) {
        *self.0.lock().unwrap() = v as f64;
    }
}
impl metrics::GaugeFn for Cell {
    fn increment(&self, v: f64) {
        *self.0.lock().unwrap() += v;
    }
    fn decrement(&self, v: f64) {
        *self.0.lock().unwrap() -= v;
    }
    fn set(&self, v: f64) {
        *self.0.lock().unwrap() = v;
    }
}
impl metrics::HistogramFn for Cell {
    // A histogram cell counts its samples.
    fn record(&self, _v: f64) {
        *self.0.lock().unwrap() += 1.0;
    }
}

impl TestRecorder {
    fn cell(&self, key: &metrics::Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .filter(|l| l.key() != "processor" && l.key() != "pipeline")
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let k = format!("{}{{{}}}", key.name(), labels.join(","));
        self.counters.lock().unwrap().entry(k).or_default().clone()
    }
    fn get(&self, k: &str) -> f64 {
        self.counters
            .lock()
            .unwrap()
            .get(k)
            .map_or(0.0, |c| *c.0.lock().unwrap())
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.cell(key))
    }
}

#[test]
fn self_metrics_report_decisions_late_spans_and_memory() {
    let rec = TestRecorder::default();
    metrics::with_local_recorder(&rec, || {
        let mut r = Run::new(&format!("num_traces: 2\n{MISSION}"));
        let h = Probabilistic::new("", 10.0);
        let plain = (0..100)
            .find(|n| !h.keeps(&tid(*n)))
            .expect("some id is not kept");
        r.send_whole(0, vec![root(tid(1000), 1).error(), child(tid(1000), 2)]);
        r.send_whole(1, vec![root(tid(plain), 1)]);
        r.send(2, vec![child(tid(1000), 3), child(tid(plain), 3)]);
        r.send(
            3,
            vec![
                child(tid(2001), 2),
                child(tid(2002), 2),
                child(tid(2003), 2),
            ],
        );
        r.tick(4);
        assert_eq!(rec.get("tailweave_tail_sampling_traces_in_memory{}"), 2.0);
        assert_eq!(rec.get("tailweave_tail_sampling_spans_in_memory{}"), 2.0);
        assert!(rec.get("tailweave_tail_sampling_bytes_held{}") > 0.0);
        r.shutdown(5);
    });
    let t = "tailweave_tail_sampling_traces_total";
    assert_eq!(
        rec.get(&format!(
            "{t}{{decision=kept,policy=errors,tenant=default}}"
        )),
        1.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_spans_total{decision=kept,policy=errors,tenant=default}"),
        2.0
    );
    // tid(2001) pushed out by the cap is not an error and likely not in the 10%: either way it
    // is counted once, in kept or dropped.
    let decided = rec.get(&format!("{t}{{decision=dropped,policy=none}}"))
        + rec.get(&format!(
            "{t}{{decision=kept,policy=baseline,tenant=default}}"
        ))
        + rec.get(&format!(
            "{t}{{decision=kept,policy=errors,tenant=default}}"
        ));
    assert_eq!(decided, 5.0);
    assert_eq!(
        rec.get("tailweave_tail_sampling_late_spans_total{outcome=kept}"),
        1.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_late_spans_total{outcome=dropped}"),
        1.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_decisions_total{trigger=whole}"),
        2.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_early_decisions_total{cause=cap}"),
        1.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_early_decisions_total{cause=shutdown}"),
        2.0
    );
    assert_eq!(
        rec.get("tailweave_tail_sampling_decision_latency_seconds{}"),
        5.0
    );
    assert_eq!(rec.get("tailweave_tail_sampling_traces_in_memory{}"), 0.0);
}

#[test]
fn the_module_doc_example_is_a_valid_config() {
    let docs = include_str!("mod.rs");
    let yaml: String = docs
        .lines()
        .skip_while(|l| !l.starts_with("//! ```yaml"))
        .skip(1)
        .take_while(|l| !l.starts_with("//! ```"))
        .map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or("")))
        .collect();
    let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("example is YAML");
    let c: TailSamplingConfig =
        tailweave_core::config::parse(v.get("tail_sampling").cloned().expect("block"))
            .expect("example parses");
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    assert_eq!(c.policies.len(), 4);
}

/// Random interleavings of many traces, root first or last, some as join units. With tight
/// caps every trigger is in play (caps, size, root wait, decision wait, whole, shutdown) and
/// each trace still comes out whole or not at all, every span counted once. With caps and
/// waits that do not bind, every error trace and every slow trace comes out as well.
#[test]
fn random_arrivals_never_split_a_trace_or_lose_an_error() {
    for (seed, tight) in (0..8u64).map(|s| (s, s % 2 == 0)) {
        let mut rng = seed.wrapping_mul(0x1234_5678_9abc_def1) | 1;
        let mut next = move |n: u64| {
            rng = splitmix(rng);
            rng % n
        };
        let limits = if tight {
            "num_traces: 12\nmax_spans_per_trace: 12\ndecision_wait: 5s"
        } else {
            "decision_wait: 1h\ndecision_wait_after_root: 0s"
        };
        let mut r = Run::new(&format!("{limits}\n{MISSION}"));
        let mut sent: std::collections::HashMap<TraceId, (usize, bool)> = Default::default();
        let mut pending: Vec<B> = Vec::new();
        let mut got: std::collections::HashMap<TraceId, usize> = Default::default();
        let mut ms = 0;
        for n in 0..400u64 {
            let t = tid(seed * 10_000 + n);
            let spans = 1 + next(15) as usize;
            let error = next(10) == 0;
            let slow = next(10) == 0;
            let mut trace: Vec<B> = (0..spans as u64)
                .map(|j| {
                    let b = if j == 0 {
                        root(t, if slow { 800 } else { 20 })
                    } else {
                        child(t, j + 1)
                    };
                    if error && j == spans as u64 - 1 {
                        b.error()
                    } else {
                        b
                    }
                })
                .collect();
            sent.insert(t, (spans, error || slow));
            if next(5) == 0 {
                // A unit from the join.
                for s in r.send_whole(ms, trace) {
                    *got.entry(s.trace_id).or_default() += 1;
                }
                continue;
            }
            // Root first or last, the rest shuffled into what is pending.
            if next(2) == 0 {
                trace.reverse();
            }
            for b in trace {
                let at = next(pending.len() as u64 + 1) as usize;
                pending.insert(at, b);
            }
            while pending.len() > 30 {
                let k = 1 + next(10) as usize;
                let batch: Vec<B> = pending.drain(..k.min(pending.len())).collect();
                ms += next(300);
                for s in r.send(ms, batch).into_iter().chain(r.tick(ms)) {
                    *got.entry(s.trace_id).or_default() += 1;
                }
            }
        }
        while !pending.is_empty() {
            let batch: Vec<B> = pending.drain(..pending.len().min(7)).collect();
            ms += 100;
            for s in r.send(ms, batch).into_iter().chain(r.tick(ms)) {
                *got.entry(s.trace_id).or_default() += 1;
            }
        }
        for s in r.shutdown(ms + 1) {
            *got.entry(s.trace_id).or_default() += 1;
        }
        for (t, (n, must)) in &sent {
            let k = got.get(t).copied().unwrap_or(0);
            assert!(
                k == 0 || k == *n,
                "seed {seed}: trace {t} split: {k} of {n}"
            );
            if *must && !tight {
                assert_eq!(k, *n, "seed {seed}: error/slow trace {t} lost");
            }
        }
        let st = r.p.stats();
        let total: usize = sent.values().map(|(n, _)| n).sum();
        assert_eq!(
            total as u64,
            st.spans_kept + st.spans_dropped + st.late_spans_kept + st.late_spans_dropped,
            "seed {seed}"
        );
        if tight {
            assert!(
                st.decided(Trigger::Cap) > 0 && st.decided(Trigger::Size) > 0,
                "seed {seed}: {:?}",
                st.decided_by
            );
            assert!(st.decided(Trigger::AfterRoot) > 0 && st.decided(Trigger::Whole) > 0);
        } else {
            let early = st.decided(Trigger::Cap) + st.decided(Trigger::Size);
            assert_eq!(early, 0, "seed {seed}");
        }
    }
}

#[test]
fn a_grown_log_is_compacted_on_tick_and_still_replays() {
    let dir = TempDir::new("tick-compact");
    let y = stored(&dir, MISSION);
    let t0 = Instant::now();
    let mut a = open(&y, t0);
    if let Some(st) = &mut a.storage {
        st.set_compact_min(50_000);
    }
    let mut out = Vec::new();
    let blob = "x".repeat(1_000);
    // 200 traces decided (whole), then 3 left waiting.
    for n in 0..200 {
        let spans = vec![root(tid(n), 1).attr("b", s(&blob)).build()];
        a.process(t0, SpanBatch::whole(spans), &mut out);
    }
    for n in 200..203 {
        a.process(t0, SpanBatch::new(vec![child(tid(n), 2).build()]), &mut out);
    }
    let grown = std::fs::metadata(dir.log()).expect("log").len();
    assert!(grown > 200_000, "{grown}");
    // Downstream took the kept traces: the tick logs that, then compacts without them.
    out.clear();
    a.tick(t0 + Duration::from_millis(100), &mut out);
    let compacted = std::fs::metadata(dir.log()).expect("log").len();
    assert!(compacted < 20_000, "log {compacted} bytes after compaction");
    let kept_before = a.cached_decisions();
    drop(a);
    let b = open(&y, t0);
    assert_eq!(b.traces_held(), 3);
    assert_eq!(b.cached_decisions(), kept_before);
}
