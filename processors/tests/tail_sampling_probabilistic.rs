//! The probabilistic policy is a pure function of the salt and the trace id: two instances keep
//! the same traces, and over many random ids the kept fraction is the configured percentage.

use std::collections::BTreeSet;
use std::time::Instant;

use bytes::Bytes;
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
use tailweave_core::{BuildContext, Processor, Resource, Scope, Span, SpanBatch, TraceId};
use tailweave_processors::tail_sampling::{TailSampling, TailSamplingConfig};

/// Deterministic pseudo-random ids (splitmix64), so the test always sees the same sample.
struct Ids(u64);

impl Iterator for Ids {
    type Item = TraceId;
    fn next(&mut self) -> Option<TraceId> {
        let mut half = || {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let (a, b) = (half(), half());
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&a.to_be_bytes());
        id[8..].copy_from_slice(&b.to_be_bytes());
        Some(TraceId(id))
    }
}

fn sampler(pct: f64, salt: &str) -> TailSampling {
    let yaml = format!(
        "policies: [{{name: p, type: probabilistic, probabilistic: {{sampling_percentage: {pct}, hash_salt: '{salt}'}}}}]"
    );
    let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let c: TailSamplingConfig = tailweave_core::config::parse(v).expect("parses");
    let ctx = BuildContext {
        id: "tail_sampling".into(),
        pipeline: "traces".into(),
        ..Default::default()
    };
    c.build(&ctx).expect("builds")
}

fn root(id: TraceId) -> Span {
    let scope = Scope::new(
        Resource::from_proto(&ProtoResource::default(), ""),
        Bytes::new(),
        Bytes::new(),
    );
    let p = ProtoSpan {
        trace_id: id.0.to_vec(),
        span_id: vec![1; 8],
        name: "op".into(),
        start_time_unix_nano: 1,
        end_time_unix_nano: 2,
        ..Default::default()
    };
    Span::from_proto(scope, &p)
}

/// The ids `s` keeps out of `ids`, each sent as a whole one-span trace.
fn kept(s: &mut TailSampling, ids: &[TraceId]) -> BTreeSet<TraceId> {
    let now = Instant::now();
    let mut out = Vec::new();
    for chunk in ids.chunks(100) {
        let batch = SpanBatch::whole(chunk.iter().map(|&id| root(id)).collect());
        s.process(now, batch, &mut out);
    }
    s.shutdown(now, &mut out);
    out.into_iter()
        .flat_map(|b| b.spans)
        .map(|sp| sp.trace_id)
        .collect()
}

#[test]
fn two_instances_keep_exactly_the_same_ids() {
    let ids: Vec<_> = Ids(42).take(5_000).collect();
    let a = kept(&mut sampler(10.0, "salt"), &ids);
    let b = kept(&mut sampler(10.0, "salt"), &ids);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    // A different salt picks a different set of the same size class.
    let c = kept(&mut sampler(10.0, "other"), &ids);
    assert_ne!(a, c);
}

#[test]
fn kept_fraction_is_within_a_binomial_interval() {
    let n = 20_000usize;
    let ids: Vec<_> = Ids(7).take(n).collect();
    for pct in [1.0, 10.0, 50.0] {
        let k = kept(&mut sampler(pct, ""), &ids).len() as f64;
        let p = pct / 100.0;
        let mean = n as f64 * p;
        // 99.9% two-sided normal approximation of the binomial (z = 3.29).
        let half_width = 3.29 * (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (k - mean).abs() <= half_width,
            "{pct}%: kept {k} of {n}, expected {mean} ± {half_width:.0}"
        );
    }
}

#[test]
fn a_lower_rate_keeps_a_subset_of_a_higher_rate() {
    let ids: Vec<_> = Ids(9).take(5_000).collect();
    let low = kept(&mut sampler(5.0, "s"), &ids);
    let high = kept(&mut sampler(20.0, "s"), &ids);
    assert!(low.is_subset(&high));
    assert!(low.len() < high.len());
}
