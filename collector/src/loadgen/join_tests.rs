//! The generator against the real normalizer and join state machine: with DeepFlow rows arriving
//! late, shuffled and one ResourceSpans a request, the join must rebuild every generated trace
//! as its ground truth. Time is injected; nothing sleeps.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tailweave_core::otlp::{decode_request, DecodeLimits};
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tailweave_core::proto::tonic::trace::v1::{ResourceSpans, Span as ProtoSpan};
use tailweave_core::{Processor, SpanBatch};
use tailweave_processors::join::{Join, JoinConfig};
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

use super::scenario::{generate, ScenarioConfig};
use super::truth::{compare, Comparison};

/// Decodes one request as a receiver would: the SDK port is shared (DeepFlow markers are
/// recognised), the eBPF port is dedicated.
fn receive(rs: ResourceSpans, role: Role) -> Vec<tailweave_core::Span> {
    let req = ExportTraceServiceRequest {
        resource_spans: vec![rs],
    };
    let mut spans = decode_request(Bytes::from(req.encode_to_vec()), &DecodeLimits::default())
        .expect("generated requests decode")
        .spans;
    normalize_spans(&mut spans, role);
    spans
}

/// Delivers every trace's SDK ResourceSpans at its start (`interval` apart) and each DeepFlow
/// row its generated delay later, ticking the join every 100 ms of simulated time.
fn run(cfg: &ScenarioConfig, seed: u64, interval: Duration) -> Comparison {
    let traces = generate(cfg, seed);
    let mut arrivals: Vec<(Duration, u64, ResourceSpans, Role)> = Vec::new();
    let mut seq = 0u64;
    for (i, t) in traces.iter().enumerate() {
        let at = interval * i as u32;
        for rs in &t.sdk {
            seq += 1;
            arrivals.push((at, seq, rs.clone(), Role::Shared));
        }
        for (rs, d) in t.ebpf.iter().zip(&t.ebpf_delay) {
            seq += 1;
            arrivals.push((at + *d, seq, rs.clone(), Role::Ebpf));
        }
    }
    arrivals.sort_by_key(|a| (a.0, a.1));

    let mut join = Join::new(JoinConfig::default());
    let t0 = Instant::now();
    let mut out = Vec::new();
    let tick = Duration::from_millis(100);
    let mut next_tick = tick;
    for (at, _, rs, role) in arrivals {
        while next_tick <= at {
            join.tick(t0 + next_tick, &mut out);
            next_tick += tick;
        }
        join.process(t0 + at, SpanBatch::new(receive(rs, role)), &mut out);
    }
    let end = next_tick + Duration::from_secs(120);
    while next_tick <= end {
        join.tick(t0 + next_tick, &mut out);
        next_tick += tick;
    }
    join.shutdown(t0 + end, &mut out);
    let observed: Vec<ProtoSpan> = out
        .iter()
        .flat_map(|b| b.spans.iter())
        .map(|s| s.decode().expect("emitted spans decode"))
        .collect();
    let truth: Vec<_> = traces.into_iter().map(|t| t.truth).collect();
    compare(&truth, &observed)
}

#[test]
fn clean_input_comes_out_as_the_ground_truth() {
    let cfg = ScenarioConfig {
        traces: 60,
        error_rate: 0.0,
        slow_rate: 0.0,
        timeout_rate: 0.0,
        split_rate: 0.0,
        ebpf_delay_ms: 0,
        shuffle: false,
        ..ScenarioConfig::default()
    };
    let c = run(&cfg, 1, Duration::from_millis(10));
    assert!(c.is_perfect(), "{c:#?}");
    assert_eq!(c.wrong_vias, 0, "{:?}", c.examples);
}

#[test]
fn skewed_late_shuffled_multi_tenant_input_keeps_its_trees() {
    let cfg = ScenarioConfig {
        traces: 300,
        error_rate: 0.05,
        slow_rate: 0.05,
        timeout_rate: 0.05,
        split_rate: 0.3,
        tenants: 3,
        clock_skew_ms: 10,
        ebpf_delay_ms: 10_000,
        ..ScenarioConfig::default()
    };
    let c = run(&cfg, 2, Duration::from_millis(20));
    assert_eq!(c.cross_tenant_spans, 0, "{:?}", c.examples);
    assert_eq!(c.missing_spans, 0, "{:?}", c.examples);
    assert!(c.parent_accuracy() >= 0.999, "{c:#?}");
    assert_eq!(c.wrong_merges, 0, "{:?}", c.examples);
}
