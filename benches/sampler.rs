//! The tail sampler's state machine alone: spans/s for 10-span traces under the mission's three
//! policies (errors, slow, 10% of the rest), and the memory held per buffered span at 100,000
//! traces in flight (printed, not timed).
//!
//! `cargo bench --bench sampler`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
use tailweave_core::{BuildContext, Processor, Resource, Scope, Span, SpanBatch};
use tailweave_processors::tail_sampling::{TailSampling, TailSamplingConfig};

const SPANS_PER_TRACE: usize = 10;
const TRACES: usize = 2_000;
const BATCH_SPANS: usize = 500;

fn sampler(extra: &str) -> TailSampling {
    let yaml = format!(
        r#"
{extra}
policies:
  - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
  - {{name: slow, type: latency, latency: {{threshold_ms: 500}}}}
  - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
"#
    );
    let v: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let c: TailSamplingConfig = tailweave_core::config::parse(v).expect("config");
    c.build(&BuildContext {
        id: "tail_sampling".into(),
        pipeline: "traces".into(),
        ..Default::default()
    })
    .expect("build")
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
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

fn scopes() -> Vec<Arc<Scope>> {
    (0..8)
        .map(|i| {
            let r = Resource::from_proto(
                &ProtoResource {
                    attributes: vec![
                        kv(
                            "service.name",
                            any_value::Value::StringValue(format!("svc-{i}")),
                        ),
                        kv(
                            "k8s.namespace.name",
                            any_value::Value::StringValue("shop".into()),
                        ),
                    ],
                    ..Default::default()
                },
                "",
            );
            Scope::new(r, Bytes::new(), Bytes::new())
        })
        .collect()
}

/// `traces` traces of 10 spans, typical HTTP attributes; 2% carry an error, 3% are slow. The
/// root comes last in each trace (the usual arrival order: the root span ends last).
fn traces(n: usize, seed: u64) -> Vec<Vec<Span>> {
    let scopes = scopes();
    let mut st = seed;
    (0..n)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&splitmix(&mut st).to_be_bytes());
            id[8..].copy_from_slice(&splitmix(&mut st).to_be_bytes());
            let error = i % 50 == 7;
            let slow = i % 33 == 3;
            let dur_ms = if slow { 900 } else { 40 };
            let t0 = 1_700_000_000_000_000_000u64 + i as u64 * 1_000_000;
            (0..SPANS_PER_TRACE)
                .map(|j| {
                    let root = j == SPANS_PER_TRACE - 1;
                    let p = ProtoSpan {
                        trace_id: id.to_vec(),
                        span_id: ((i * 16 + j + 1) as u64).to_be_bytes().to_vec(),
                        parent_span_id: if root {
                            Vec::new()
                        } else {
                            ((i * 16 + SPANS_PER_TRACE) as u64).to_be_bytes().to_vec()
                        },
                        name: format!("GET /api/items/{}", j),
                        kind: if root { 2 } else { 3 },
                        start_time_unix_nano: t0 + j as u64 * 1_000,
                        end_time_unix_nano: t0 + if root { dur_ms * 1_000_000 } else { 2_000_000 },
                        attributes: vec![
                            kv(
                                "http.request.method",
                                any_value::Value::StringValue("GET".into()),
                            ),
                            kv(
                                "http.route",
                                any_value::Value::StringValue("/api/items/{id}".into()),
                            ),
                            kv("http.response.status_code", any_value::Value::IntValue(200)),
                            kv(
                                "server.address",
                                any_value::Value::StringValue("items.shop.svc".into()),
                            ),
                            kv("net.peer.port", any_value::Value::IntValue(8080)),
                        ],
                        status: Some(Status {
                            message: String::new(),
                            code: if error && j == 3 {
                                status::StatusCode::Error as i32
                            } else {
                                status::StatusCode::Unset as i32
                            },
                        }),
                        ..Default::default()
                    };
                    Span::from_proto(scopes[j % scopes.len()].clone(), &p)
                })
                .collect()
        })
        .collect()
}

/// Spans interleaved across traces (as they arrive from many connections) cut into batches.
fn interleaved(ts: &[Vec<Span>]) -> Vec<SpanBatch> {
    let mut all = Vec::with_capacity(ts.len() * SPANS_PER_TRACE);
    // Round-robin over windows of 50 traces: each trace's spans spread over several batches.
    for window in ts.chunks(50) {
        for j in 0..SPANS_PER_TRACE {
            for t in window {
                all.push(t[j].clone());
            }
        }
    }
    all.chunks(BATCH_SPANS)
        .map(|c| SpanBatch::new(c.to_vec()))
        .collect()
}

fn bench_throughput(c: &mut Criterion) {
    let ts = traces(TRACES, 1);
    let batches = interleaved(&ts);
    let units: Vec<SpanBatch> = ts.iter().map(|t| SpanBatch::whole(t.clone())).collect();
    let mut g = c.benchmark_group("tail_sampling");
    g.throughput(Throughput::Elements((TRACES * SPANS_PER_TRACE) as u64));

    // Spans buffered per trace, decided by the after-root wait on a tick.
    g.bench_function("10_span_traces_3_policies/buffered", |b| {
        b.iter_batched(
            || (sampler(""), batches.clone()),
            |(mut s, batches)| {
                let now = Instant::now();
                let mut out = Vec::new();
                for batch in batches {
                    s.process(now, batch, &mut out);
                }
                s.tick(now + Duration::from_secs(3), &mut out);
                assert_eq!(s.traces_held(), 0);
                out
            },
            BatchSize::LargeInput,
        )
    });

    // Whole traces from the join, decided as they come.
    g.bench_function("10_span_traces_3_policies/whole", |b| {
        b.iter_batched(
            || (sampler(""), units.clone()),
            |(mut s, units)| {
                let now = Instant::now();
                let mut out = Vec::new();
                for u in units {
                    s.process(now, u, &mut out);
                }
                out
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// Bytes held per buffered span at 100,000 traces in flight, and per encoded span byte.
fn report_memory(_c: &mut Criterion) {
    const IN_FLIGHT: usize = 100_000;
    let mut s = sampler(
        "num_traces: 200000\nmax_memory_mib: 4096\ndecision_wait: 1h\ndecision_wait_after_root: 1h",
    );
    let ts = traces(IN_FLIGHT, 2);
    let encoded: usize = ts.iter().flatten().map(|sp| sp.raw.len()).sum();
    let now = Instant::now();
    let mut out = Vec::new();
    for batch in interleaved(&ts) {
        s.process(now, batch, &mut out);
    }
    drop(ts);
    assert!(out.is_empty(), "nothing is decided while the traces wait");
    let spans = s.spans_held();
    let bytes = s.bytes_held();
    println!(
        "tail_sampling memory: {} traces, {} spans held, {} bytes held = {:.1} bytes/span; \
         encoded span bytes {:.1}/span; {:.2} bytes held per encoded byte \
         (the shared copies of resources/scopes included; size_of::<Span>() = {})",
        s.traces_held(),
        spans,
        bytes,
        bytes as f64 / spans as f64,
        encoded as f64 / spans as f64,
        bytes as f64 / encoded as f64,
        std::mem::size_of::<Span>(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5));
    targets = report_memory, bench_throughput
}
criterion_main!(benches);
