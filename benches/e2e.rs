//! End-to-end benchmark (issue 6): `cargo bench --bench e2e`.
//!
//! Builds the release binary, starts it with a benchmark pipeline, drives it with `tailweave loadgen`
//! (a separate process, several gRPC connections, as fast as it accepts), and reports per run: input
//! spans/s, tailweave CPU-seconds (utime + stime from `/proc/<pid>/stat`) and so spans per
//! CPU-second (and encoded request bytes per span and per CPU-second: a game row's span, with its
//! own resource and DeepFlow's attributes, is several times an SDK span), peak RSS (`VmHWM`), and
//! the p99 decision-to-export latency (from tailweave's own
//! histogram). A last phase holds traces in the sampler and reports bytes of RSS per encoded byte of
//! buffered span. Each configuration runs `E2E_RUNS` times (default 3); the table shows the median.
//!
//! Environment: `E2E_TRACES` (traces per run, default 100000), `E2E_RUNS`, `E2E_CONNECTIONS` (4),
//! `E2E_HOLD_TRACES` (traces held for the memory phase, default 50000; 0 skips it), `E2E_ONLY`
//! (comma-separated `pipeline-scenario` rows to run, e.g. `relay-sdk,full-sdk`; default all).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;
use tailweave_suite::{wait_for, Collector, Ports, Sink};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15 (1-based).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f[11].parse().expect("utime");
    let stime: f64 = f[12].parse().expect("stime");
    let hz = 100.0; // USER_HZ is 100 on Linux.
    (utime + stime) / hz
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn template(name: &str, sink: &Sink) -> String {
    let p = tailweave_suite::root()
        .join("benches")
        .join("e2e")
        .join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .replace("{SINK}", &sink.endpoint())
}

fn loadgen(args: &[String], summary: &Path) -> serde_json::Value {
    let st = Command::new(tailweave_suite::tailweave_bin())
        .arg("loadgen")
        .args(args)
        .arg("--summary")
        .arg(summary)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run loadgen");
    assert!(st.success(), "loadgen failed");
    serde_json::from_slice(&std::fs::read(summary).expect("summary")).expect("summary JSON")
}

/// p99 of a Prometheus histogram (upper bound of the bucket holding the 99th percentile).
fn p99(metrics: &str, name: &str) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
    {
        let le = l.split("le=\"").nth(1)?.split('"').next()?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += v,
            None => buckets.push((le, v)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= 0.99 * total)
        .map(|(b, _)| *b)
}

struct RunResult {
    spans_per_s: f64,
    /// Encoded request bytes per accepted span.
    bytes_per_span: f64,
    cpu_s: f64,
    spans_per_cpu_s: f64,
    peak_rss_mib: f64,
    p99_ms: Option<f64>,
    delivered: usize,
}

/// Longer than the longest wait of the bench pipelines (join `wait.max` 5 s; the sampler decides the
/// join's whole units at once) plus the exporter's flush.
const HELD_WAIT: Duration = Duration::from_secs(7);

fn run_once(pipeline: &str, scenario: &[&str], traces: u64, conns: u64) -> RunResult {
    let sink = Sink::start_counting_blocking();
    let ports = Ports::new();
    let c = Collector::start(&template(pipeline, &sink), ports);
    let pid = c.child.id();
    let dir = tempfile::tempdir().unwrap();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let mut args: Vec<String> = scenario.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--endpoint".into(),
        c.grpc_endpoint(),
        "--rate".into(),
        "0".into(),
        "--count".into(),
        traces.to_string(),
        "--connections".into(),
        conns.to_string(),
        "--ebpf-delay".into(),
        "0s".into(),
    ]);
    let summary = loadgen(&args, &dir.path().join("summary.json"));
    let elapsed = t0.elapsed().as_secs_f64();
    let accepted = summary["accepted"].as_u64().unwrap_or(0) as f64;
    let accepted_bytes = summary["accepted_bytes"].as_u64().unwrap_or(0) as f64;
    // CPU while ingesting, and the work on held traces afterwards: the join and the sampler hold
    // the last traces for their waits (benches/e2e/full.yaml: at most 5 s) while the process is
    // nearly idle, so "CPU stopped moving" alone would stop counting before that work is done.
    // Wait out the longest wait, then until neither CPU nor the sink moves.
    std::thread::sleep(HELD_WAIT);
    let settle = Instant::now();
    let mut last = (cpu_seconds(pid), sink.span_count());
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = (cpu_seconds(pid), sink.span_count());
        if (now.0 - last.0 < 0.01 && now.1 == last.1) || settle.elapsed() > Duration::from_secs(60)
        {
            break;
        }
        last = now;
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let metrics = c.metrics();
    let p99_s = p99(&metrics, "tailweave_exporter_decision_to_export_seconds");
    let rss = status_kib(pid, "VmHWM") as f64 / 1024.0;
    RunResult {
        spans_per_s: accepted / elapsed,
        bytes_per_span: accepted_bytes / accepted.max(1.0),
        cpu_s: cpu,
        spans_per_cpu_s: accepted / cpu.max(1e-9),
        peak_rss_mib: rss,
        p99_ms: p99_s.map(|s| s * 1000.0),
        delivered: sink.span_count(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What the memory phase measured.
struct Held {
    spans: u64,
    /// Encoded bytes of the held spans (their `Span` messages).
    encoded: u64,
    /// RSS growth while the spans went in.
    rss: u64,
    /// Live heap growth (`tailweave_process_memory_heap_bytes`): RSS minus this is what the
    /// allocator keeps without it being in use.
    heap: u64,
    /// What the sampler itself counts (`tailweave_tail_sampling_bytes_held`).
    counted: u64,
}

fn hold_phase(traces: u64) -> Held {
    let sink = Sink::start_counting_blocking();
    let c = Collector::start(&template("hold.yaml", &sink), Ports::new());
    let pid = c.child.id();
    let dir = tempfile::tempdir().unwrap();
    let rss0 = status_kib(pid, "VmRSS") * 1024;
    let heap0 = c.metric("tailweave_process_memory_heap_bytes", &[]) as u64;
    let args: Vec<String> = [
        "--scenario",
        "sdk",
        "--spans",
        "10",
        "--rate",
        "0",
        "--connections",
        "4",
        "--seed",
        "7",
        "--count",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([traces.to_string(), "--endpoint".into(), c.grpc_endpoint()])
    .collect();
    let summary = loadgen(&args, &dir.path().join("summary.json"));
    let args: Vec<String> = args;
    let spans = summary["accepted"].as_u64().unwrap_or(0);
    wait_for("spans held in the sampler", Duration::from_secs(60), || {
        (c.metric("tailweave_tail_sampling_spans_in_memory", &[]) as u64 >= spans).then_some(())
    });
    // The heap gauge is refreshed once a second and the last batches may still be moving:
    // read until RSS and the gauge both hold still across a refresh.
    let settle = Instant::now();
    let read = || {
        (
            status_kib(pid, "VmRSS") * 1024,
            c.metric("tailweave_process_memory_heap_bytes", &[]) as u64,
        )
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let now = read();
        let still = |a: u64, b: u64| a.abs_diff(b) * 200 <= a.max(b);
        if (still(now.0, last.0) && still(now.1, last.1))
            || settle.elapsed() > Duration::from_secs(20)
        {
            last = now;
            break;
        }
        last = now;
    }
    let (rss1, heap1) = last;
    let counted = c.metric("tailweave_tail_sampling_bytes_held", &[]) as u64;
    // The encoded size of the same seeded spans, regenerated here from the same arguments.
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: tailweave_collector::loadgen::LoadgenArgs,
    }
    let parsed =
        <Wrap as clap::Parser>::parse_from(std::iter::once("loadgen".to_string()).chain(args));
    let cfg = parsed.args.scenario_config(0);
    let mut generator =
        tailweave_collector::loadgen::scenario::Generator::new(cfg, parsed.args.seed);
    let mut encoded: u64 = 0;
    for _ in 0..traces {
        let t = generator.next_trace();
        for rs in t.sdk.iter().chain(t.ebpf.iter()) {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    encoded += s.encoded_len() as u64;
                }
            }
        }
    }
    Held {
        spans,
        encoded,
        rss: rss1.saturating_sub(rss0),
        heap: heap1.saturating_sub(heap0),
        counted,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e: benchmark");
        return;
    }
    std::env::set_var("TAILWEAVE_TEST_RELEASE", "1");
    let traces = env_or("E2E_TRACES", 100_000);
    let runs = env_or("E2E_RUNS", 3);
    let conns = env_or("E2E_CONNECTIONS", 4);
    println!(
        "tailweave e2e benchmark: {traces} traces per run, {runs} runs, {conns} gRPC connections, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    // The SDK rows replay a pool of generated traces with fresh ids (`--replay-pool`): generating
    // each trace cost the sender more CPU than tailweave spent on it, and on two cores the sender
    // then set the input rate.
    const SDK: &[&str] = &[
        "--scenario",
        "sdk",
        "--spans",
        "10",
        "--replay-pool",
        "2000",
    ];
    let configs: [(&str, &str, &[&str]); 4] = [
        ("relay", "relay.yaml", SDK),
        ("full", "full.yaml", SDK),
        ("relay", "relay.yaml", &["--scenario", "game"]),
        ("full", "full.yaml", &["--scenario", "game"]),
    ];
    println!(
        "| pipeline | scenario | input spans/s | CPU-s | spans per CPU-s | bytes per span | MB per CPU-s | peak RSS MiB | p99 decision->export ms | delivered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    for (name, file, scenario) in configs {
        let row = format!("{name}-{}", scenario[1]);
        if !only.is_empty() && !only.split(',').any(|o| o.trim() == row) {
            continue;
        }
        let results: Vec<RunResult> = (0..runs)
            .map(|_| {
                run_once(
                    file,
                    scenario,
                    traces / if scenario.contains(&"game") { 2 } else { 1 },
                    conns,
                )
            })
            .collect();
        println!(
            "| {name} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {:.0} | {} | {} |",
            scenario[1],
            median(results.iter().map(|r| r.spans_per_s).collect()),
            median(results.iter().map(|r| r.cpu_s).collect()),
            median(results.iter().map(|r| r.spans_per_cpu_s).collect()),
            median(results.iter().map(|r| r.bytes_per_span).collect()),
            median(
                results
                    .iter()
                    .map(|r| r.spans_per_cpu_s * r.bytes_per_span / 1e6)
                    .collect()
            ),
            median(results.iter().map(|r| r.peak_rss_mib).collect()),
            median(
                results
                    .iter()
                    .map(|r| r.p99_ms.unwrap_or(f64::NAN))
                    .collect()
            ),
            results[results.len() / 2].delivered,
        );
    }
    let hold = env_or("E2E_HOLD_TRACES", 50_000);
    if hold == 0 {
        return;
    }
    let h = hold_phase(hold);
    let per = |b: u64, n: u64| b as f64 / n.max(1) as f64;
    println!(
        "memory: {} spans held in tail_sampling: {:.0} bytes of RSS per buffered span, {:.2} bytes per encoded byte \
         ({:.1} encoded bytes per span; live heap {:.2}, counted by the sampler {:.2} bytes per encoded byte)",
        h.spans,
        per(h.rss, h.spans),
        per(h.rss, h.encoded),
        per(h.encoded, h.spans),
        per(h.heap, h.encoded),
        per(h.counted, h.encoded),
    );
}
