//! The join state machine on a game-like scenario: about 21 spans a trace, half of them eBPF
//! rows as DeepFlow exports them (login -> shop -> payment with SDKs; MySQL and Redis seen only
//! by eBPF; one request/response split per trace). Throughput is in spans; before the timed runs
//! the bench prints the bytes held per buffered span.
//!
//! Run: `cargo bench --bench join`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tailweave_core::{Processor, Span, SpanBatch};
use tailweave_processors::join::testkit;
use tailweave_processors::join::{Join, JoinConfig};
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

/// One trace, normalized as the receivers would: (SDK spans, eBPF spans).
fn game_trace(i: u64) -> (Vec<Span>, Vec<Span>) {
    let (mut sdk, mut ebpf) = testkit::game_trace(i);
    normalize_spans(&mut sdk, Role::Shared);
    normalize_spans(&mut ebpf, Role::Ebpf);
    (sdk, ebpf)
}

/// Batches as they would arrive: SDK spans at once, eBPF rows of the same trace 2 s later, in
/// batches of about 500 spans; `ms_per_trace` of simulated time between traces.
fn workload(traces: u64, ms_per_trace: u64) -> Vec<(Duration, Vec<Span>)> {
    let mut sdk_all = Vec::new();
    let mut ebpf_all = Vec::new();
    for i in 0..traces {
        let (s, e) = game_trace(i);
        let at = Duration::from_millis(i * ms_per_trace);
        sdk_all.push((at, s));
        ebpf_all.push((at + Duration::from_secs(2), e));
    }
    let mut events: Vec<(Duration, Vec<Span>)> = sdk_all.into_iter().chain(ebpf_all).collect();
    events.sort_by_key(|(t, _)| *t);
    let mut out: Vec<(Duration, Vec<Span>)> = Vec::new();
    for (t, spans) in events {
        match out.last_mut() {
            Some((_, b)) if b.len() < 500 => b.extend(spans),
            _ => out.push((t, spans)),
        }
    }
    out
}

fn run(batches: Vec<(Duration, Vec<Span>)>) -> usize {
    let mut j = Join::new(JoinConfig::default());
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut emitted = 0;
    let mut last = Duration::ZERO;
    for (t, spans) in batches {
        j.process(t0 + t, SpanBatch::new(spans), &mut out);
        if t >= last + Duration::from_millis(250) {
            j.tick(t0 + t, &mut out);
            last = t;
        }
        emitted += out.drain(..).map(|b| b.len()).sum::<usize>();
    }
    j.shutdown(t0 + last, &mut out);
    emitted + out.drain(..).map(|b| b.len()).sum::<usize>()
}

/// User + system CPU seconds of this process, from /proc (0 where unavailable).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size from /proc (0 where unavailable).
fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<usize>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn report_memory() {
    let batches = workload(2000, 1);
    let spans: usize = batches.iter().map(|(_, b)| b.len()).sum();
    let encoded: usize = batches
        .iter()
        .flat_map(|(_, b)| b.iter())
        .map(|s| s.raw.len())
        .sum();
    let mut seen = HashSet::new();
    let mut resource_bytes = 0usize;
    for s in batches.iter().flat_map(|(_, b)| b.iter()) {
        if seen.insert(s.resource() as *const _ as usize) {
            resource_bytes += s.resource().raw.len();
        }
    }
    let rss0 = rss_bytes();
    let mut j = Join::new(JoinConfig::default());
    let t0 = Instant::now();
    let mut out = Vec::new();
    for (_, b) in batches {
        // One instant: nothing is due, everything stays buffered.
        j.process(t0, SpanBatch::new(b), &mut out);
    }
    let state = rss_bytes().saturating_sub(rss0);
    let held = j.pending_bytes();
    let n = j.pending_spans();
    println!(
        "join state beyond the spans themselves (slab, indexes, groups, timers; RSS delta): {:.0} B/span",
        state as f64 / n.max(1) as f64
    );
    println!(
        "join memory: {n} of {spans} spans buffered in {} groups; held_bytes {:.0} B/span; encoded span {:.0} B/span \
         (ratio {:.2}); unique resources {:.0} B/span more",
        j.pending_groups(),
        held as f64 / n.max(1) as f64,
        encoded as f64 / spans as f64,
        held as f64 / encoded.max(1) as f64,
        resource_bytes as f64 / spans as f64,
    );
    assert!(out.is_empty());
}

fn bench(c: &mut Criterion) {
    report_memory();
    let batches = workload(2000, 10);
    let spans: usize = batches.iter().map(|(_, b)| b.len()).sum();
    // Every span comes out; the one response row per trace is merged into its request row.
    assert_eq!(run(batches.clone()), spans - 2000);
    // CPU time of this process, less sensitive than wall time on a shared machine.
    let input = batches.clone();
    let (cpu0, started) = (cpu_seconds(), Instant::now());
    run(input);
    let (cpu, wall) = (cpu_seconds() - cpu0, started.elapsed());
    println!(
        "join one run: {spans} spans, wall {wall:?} ({:.0} spans/s), cpu {cpu:.3} s ({:.0} spans per CPU-second)",
        spans as f64 / wall.as_secs_f64(),
        spans as f64 / cpu.max(1e-9)
    );
    let mut g = c.benchmark_group("join");
    g.throughput(Throughput::Elements(spans as u64));
    g.sample_size(20);
    g.bench_function("game_2000_traces", |b| {
        b.iter_batched(|| batches.clone(), run, BatchSize::LargeInput)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
