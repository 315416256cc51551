//! Per-stage throughput of the hot path (issue 6), in spans/s: receiver decode
//! (`decode_request`), `self_filter`, `join`, `tail_sampling` (errors + slow + 10%, as in
//! `benches/e2e/full.yaml`) and exporter encode (`encode_request`).
//!
//! The workload is the e2e one: SDK-only traces of 10 spans from the loadgen generator, dealt
//! into requests of 32 ResourceSpans as `tailweave loadgen` sends them. The processors are built
//! from the same YAML as the e2e benchmark and driven with simulated time, so every run decides
//! and emits every trace.
//!
//! Run: `cargo bench --bench stages` (env `STAGES_TRACES`, default 20000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tailweave_collector::loadgen::scenario::{Generator, ScenarioConfig, ScenarioKind};
use tailweave_core::config::{BuildContext, SelfInfo};
use tailweave_core::otlp::{decode_request, encode_request, DecodeLimits};
use tailweave_core::{Processor, Span, SpanBatch};
use tailweave_processors::ProcessorConfig;
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

/// ResourceSpans per request, as `tailweave loadgen` sends them (`--batch-size` default).
const PER_REQUEST: usize = 32;

fn traces() -> usize {
    std::env::var("STAGES_TRACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Request bodies: concatenations of encoded `resource_spans` fields.
fn requests(traces: usize) -> Vec<Bytes> {
    scenario_requests(ScenarioKind::Sdk, traces)
}

/// Request bodies of a scenario's traces: the SDK spans, or for the game scenario only its eBPF
/// rows (DeepFlow's export: one ResourceSpans per row, dozens of `df.*` attributes).
fn scenario_requests(kind: ScenarioKind, traces: usize) -> Vec<Bytes> {
    let cfg = ScenarioConfig {
        scenario: kind,
        sdk_spans: 10,
        // As `tailweave loadgen --rate 0` generates them.
        trace_interval_us: 50,
        ..ScenarioConfig::default()
    };
    let mut g = Generator::new(cfg, 7);
    let mut fields = Vec::new();
    for _ in 0..traces {
        let w = g.next_wire();
        match kind {
            ScenarioKind::Game => fields.extend(w.ebpf.into_iter().map(|(e, _)| e)),
            _ => fields.extend(w.sdk),
        }
    }
    fields
        .chunks(PER_REQUEST)
        .map(|c| {
            let mut b = BytesMut::new();
            for e in c {
                b.put_slice(e.field());
            }
            b.freeze()
        })
        .collect()
}

fn decode_all(reqs: &[Bytes]) -> Vec<Vec<Span>> {
    let limits = DecodeLimits::default();
    reqs.iter()
        .map(|r| {
            decode_request(r.clone(), &limits)
                .expect("generated requests decode")
                .spans
        })
        .collect()
}

fn processor(kind: &str, yaml: &str) -> Box<dyn Processor> {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("bench YAML");
    let cfg = ProcessorConfig::parse(kind, value)
        .expect("bench config parses")
        .expect("known processor");
    assert!(cfg.validate().is_empty(), "{kind}: {:?}", cfg.validate());
    let ctx = BuildContext {
        id: kind.into(),
        pipeline: "traces".into(),
        self_info: Arc::new(SelfInfo {
            listen_ports: vec![4317, 4318, 8888, 13133],
            exporter_endpoints: vec!["127.0.0.1:14317".into()],
            pid: 4242,
            process_name: "tailweave".into(),
            host_name: "bench-host".into(),
            pod_name: None,
            service_name: "tailweave".into(),
        }),
    };
    cfg.build(&ctx).expect("bench processor builds")
}

const JOIN: &str = "wait: {min: 1s, idle: 1s, max: 5s}";
const SAMPLER: &str = r#"
decision_wait: 5s
policies:
  - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
  - {name: slow, type: latency, latency: {threshold_ms: 500}}
  - {name: ten-percent, type: probabilistic, probabilistic: {sampling_percentage: 10}}
"#;

/// Feeds every batch through `p` with simulated time (1 ms per request), ticking as the driver
/// would, then shuts it down; returns the spans it emitted.
fn run(p: &mut dyn Processor, batches: Vec<SpanBatch>) -> Vec<SpanBatch> {
    let t0 = Instant::now();
    let tick = p.tick_interval().unwrap_or(Duration::from_millis(100));
    let mut out = Vec::new();
    let mut next_tick = t0 + tick;
    let mut now = t0;
    for b in batches {
        now += Duration::from_millis(1);
        p.process(now, b, &mut out);
        if now >= next_tick {
            p.tick(now, &mut out);
            next_tick = now + tick;
        }
    }
    // Let every wait expire, then flush what is left.
    for _ in 0..100 {
        now += tick;
        p.tick(now, &mut out);
    }
    p.shutdown(now, &mut out);
    out
}

fn span_total(batches: &[Vec<Span>]) -> usize {
    batches.iter().map(Vec::len).sum()
}

fn stages(c: &mut Criterion) {
    let reqs = requests(traces());
    let decoded = decode_all(&reqs);
    let spans = span_total(&decoded);
    let input = || -> Vec<SpanBatch> { decoded.iter().cloned().map(SpanBatch::new).collect() };
    // What each stage sees in the full pipeline: the join's output feeds the sampler, and the
    // sampler's kept spans feed the exporter.
    let joined = run(processor("join", JOIN).as_mut(), input());
    let joined_spans: usize = joined.iter().map(SpanBatch::len).sum();
    let kept = run(processor("tail_sampling", SAMPLER).as_mut(), joined.clone());
    let kept: Vec<Vec<Span>> = kept.into_iter().map(|b| b.spans).collect();
    let kept_spans = span_total(&kept);
    println!(
        "stages: {} requests, {spans} spans; join emitted {joined_spans}, sampler kept {kept_spans} in {} batches",
        reqs.len(),
        kept.len()
    );

    let mut g = c.benchmark_group("stages");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(spans as u64));
    g.bench_function("receiver_decode", |b| b.iter(|| decode_all(&reqs)));
    // A shared `otlp` receiver tells DeepFlow rows from SDK spans (ebpf-spans.md §7.1): on SDK
    // spans this is the marker test alone.
    g.bench_function("deepflow_detect_sdk", |b| {
        b.iter_batched(
            || decoded.clone(),
            |mut batches| {
                for b in &mut batches {
                    normalize_spans(b, Role::Shared);
                }
                batches
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("self_filter", |b| {
        b.iter_batched(
            || (processor("self_filter", "{}"), input()),
            |(mut p, batches)| run(p.as_mut(), batches),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("join", |b| {
        b.iter_batched(
            || (processor("join", JOIN), input()),
            |(mut p, batches)| run(p.as_mut(), batches),
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Elements(joined_spans as u64));
    g.bench_function("tail_sampling", |b| {
        b.iter_batched(
            || (processor("tail_sampling", SAMPLER), joined.clone()),
            |(mut p, batches)| run(p.as_mut(), batches),
            BatchSize::LargeInput,
        )
    });
    // Encoding in spans exported; both the requests as received (relay) and the sampler's kept
    // batches (full pipeline).
    g.throughput(Throughput::Elements(spans as u64));
    g.bench_function("exporter_encode_relay", |b| {
        b.iter(|| {
            decoded
                .iter()
                .map(|s| encode_request(s).len())
                .sum::<usize>()
        })
    });
    g.throughput(Throughput::Elements(kept_spans.max(1) as u64));
    g.bench_function("exporter_encode_kept", |b| {
        b.iter(|| kept.iter().map(|s| encode_request(s).len()).sum::<usize>())
    });
    g.finish();

    // DeepFlow rows: reading them into the eBPF model (the otlp/deepflow receivers do it on
    // receipt), and the self-filter's rules on the rows read.
    let rows = decode_all(&scenario_requests(ScenarioKind::Game, traces() / 10));
    let row_spans = span_total(&rows);
    let normalized: Vec<Vec<Span>> = rows
        .iter()
        .cloned()
        .map(|mut b| {
            normalize_spans(&mut b, Role::Ebpf);
            b
        })
        .collect();
    let mut g = c.benchmark_group("stages_ebpf_rows");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(row_spans as u64));
    g.bench_function("deepflow_normalize", |b| {
        b.iter_batched(
            || rows.clone(),
            |mut batches| {
                for b in &mut batches {
                    normalize_spans(b, Role::Ebpf);
                }
                batches
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("self_filter", |b| {
        b.iter_batched(
            || {
                (
                    processor("self_filter", "{}"),
                    normalized.iter().cloned().map(SpanBatch::new).collect(),
                )
            },
            |(mut p, batches)| run(p.as_mut(), batches),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
