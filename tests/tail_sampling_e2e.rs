//! End-to-end tests of whole-trace tail sampling (issue 4) through the real binary.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tailweave_collector::loadgen::truth::{read_truth, TraceTruth};
use tailweave_suite::{hex, Collector, Ports, Sink};

const POLICIES: &str = r#"
      - name: errors
        type: status_code
        status_code:
          status_codes: [ERROR]
      - name: slow
        type: latency
        latency:
          threshold_ms: 500
      - name: ten-percent
        type: probabilistic
        probabilistic:
          sampling_percentage: 10
"#;

fn config(sink: &Sink, policies: &str) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
processors:
  tail_sampling:
    decision_wait: 4s
    decision_wait_after_root: 2s
    policies:
{policies}
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
extensions:
  health_check:
    endpoint: 127.0.0.1:{{HEALTH}}
service:
  extensions: [health_check]
  telemetry:
    metrics:
      address: 127.0.0.1:{{METRICS}}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [tail_sampling]
      exporters: [otlp]
"#,
        sink = sink.endpoint()
    )
}

fn loadgen(c: &Collector, dir: &Path, args: &[&str]) -> Vec<TraceTruth> {
    read_truth(&c.loadgen(dir, args).0).expect("truth")
}

fn drained(c: &Collector, sink: &Sink) {
    c.wait_drained(sink, "tailweave_tail_sampling_traces_in_memory");
}

/// Spans received per trace id.
fn by_trace(sink: &Sink) -> HashMap<String, HashSet<String>> {
    let mut m: HashMap<String, HashSet<String>> = HashMap::new();
    for r in sink.spans() {
        m.entry(hex(&r.span.trace_id))
            .or_default()
            .insert(hex(&r.span.span_id));
    }
    m
}

#[test]
fn ten_thousand_traces_keep_every_error_and_slow_trace_whole_and_ten_percent_of_the_rest() {
    let sink = Sink::start_blocking();
    let c = Collector::start(&config(&sink, POLICIES), Ports::new());
    let dir = tempfile::tempdir().unwrap();
    let truth = loadgen(
        &c,
        dir.path(),
        &[
            "--scenario",
            "sdk",
            "--spans",
            "10",
            "--count",
            "10000",
            "--rate",
            "0",
            "--seed",
            "3",
            "--error-rate",
            "0.05",
            "--slow-rate",
            "0.05",
            "--batch-size",
            "8",
            "--shuffle",
            "true",
        ],
    );
    drained(&c, &sink);
    let got = by_trace(&sink);
    let mut partial = 0;
    let (mut normal, mut normal_kept) = (0u64, 0u64);
    for t in &truth {
        let want: HashSet<String> = t.spans.iter().map(|s| s.span_id.clone()).collect();
        let have = got.get(&t.trace_id);
        if let Some(h) = have {
            if *h != want {
                partial += 1;
            }
        }
        if t.error || t.slow {
            assert_eq!(
                have,
                Some(&want),
                "error/slow trace {} must be kept whole",
                t.trace_id
            );
        } else {
            normal += 1;
            normal_kept += u64::from(have.is_some());
        }
    }
    assert_eq!(partial, 0, "no trace is partial");
    assert!(truth.iter().filter(|t| t.error).count() > 100);
    assert!(truth.iter().filter(|t| t.slow).count() > 100);
    // 99% binomial interval around 10%: mean ± 2.576 sd.
    let p = 0.10;
    let mean = normal as f64 * p;
    let sd = (normal as f64 * p * (1.0 - p)).sqrt();
    let k = normal_kept as f64;
    assert!(
        (k - mean).abs() <= 2.576 * sd,
        "kept {normal_kept} of {normal} normal traces; expected {mean:.0} ± {:.0}",
        2.576 * sd
    );
}

#[test]
fn two_instances_with_the_same_probabilistic_config_keep_the_same_traces() {
    let policy = "      - name: third\n        type: probabilistic\n        probabilistic:\n          sampling_percentage: 30\n          hash_salt: fleet";
    let mut kept = Vec::new();
    for _ in 0..2 {
        let sink = Sink::start_blocking();
        let c = Collector::start(&config(&sink, policy), Ports::new());
        let dir = tempfile::tempdir().unwrap();
        let truth = loadgen(
            &c,
            dir.path(),
            &[
                "--scenario",
                "sdk",
                "--count",
                "2000",
                "--rate",
                "0",
                "--seed",
                "99",
            ],
        );
        drained(&c, &sink);
        let ids: HashSet<String> = by_trace(&sink).into_keys().collect();
        assert!(
            ids.len() > 400 && ids.len() < 800,
            "about 30% of 2000 kept: {}",
            ids.len()
        );
        assert!(ids.iter().all(|id| truth.iter().any(|t| &t.trace_id == id)));
        kept.push(ids);
    }
    assert_eq!(
        kept[0], kept[1],
        "both instances keep exactly the same trace ids"
    );
}
