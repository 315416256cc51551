//! End-to-end tests of the join (issue 3) through the real binary: `tailweave loadgen` sends a
//! seeded game workload (SDK spans to the `otlp` receiver, DeepFlow rows to the `deepflow`
//! receiver), tailweave joins, an OTLP sink receives, and the result is compared with the
//! generator's ground truth.

use std::path::Path;

use tailweave_collector::loadgen::truth::{compare, read_truth, TraceTruth};
use tailweave_suite::{Collector, Ports, Sink};

fn config(sink: &Sink, wait: &str, after_join: &str) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
  deepflow:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{EXTRA0}}
processors:
  join:
    tenant:
      sdk_keys: [k8s.namespace.name]
      ebpf_keys: [df.universal_tag.pod_ns]
    wait:
{wait}
{after_join}
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
      receivers: [otlp, deepflow]
      processors: [join{procs}]
      exporters: [otlp]
"#,
        sink = sink.endpoint(),
        procs = if after_join.is_empty() {
            ""
        } else {
            ", tail_sampling"
        },
    )
}

/// Runs `tailweave loadgen`: SDK spans to the otlp receiver, DeepFlow rows to the deepflow one.
fn loadgen(c: &Collector, dir: &Path, args: &[&str]) -> (Vec<TraceTruth>, serde_json::Value) {
    let ebpf = format!("http://127.0.0.1:{}", c.ports.extra[0]);
    let mut all = vec!["--ebpf-endpoint", ebpf.as_str()];
    all.extend_from_slice(args);
    let (truth, summary) = c.loadgen(dir, &all);
    (read_truth(&truth).expect("truth"), summary)
}

/// Waits until the join holds nothing and the sink has stopped growing.
fn drained(c: &Collector, sink: &Sink) {
    c.wait_drained(sink, "tailweave_join_pending_spans");
}

fn observed(sink: &Sink) -> Vec<tailweave_core::proto::tonic::trace::v1::Span> {
    sink.spans().into_iter().map(|r| r.span).collect()
}

#[test]
fn clean_input_comes_out_exactly_as_the_ground_truth() {
    let sink = Sink::start_blocking();
    let c = Collector::start(
        &config(&sink, "      min: 2s\n      idle: 1s\n      max: 20s", ""),
        Ports::new(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (truth, summary) = loadgen(
        &c,
        dir.path(),
        &[
            "--scenario",
            "game",
            "--count",
            "300",
            "--seed",
            "42",
            "--shuffle",
            "false",
            "--clock-skew-ms",
            "0",
            "--ebpf-delay",
            "500ms",
            "--tenants",
            "2",
        ],
    );
    drained(&c, &sink);
    let cmp = compare(&truth, &observed(&sink));
    assert!(
        cmp.is_perfect(),
        "clean input must come out as the truth: {cmp:#?}\nsummary: {summary}"
    );
    assert_eq!(cmp.cross_tenant_spans, 0);
    assert_eq!(cmp.missing_spans, 0);
}

#[test]
fn skewed_shuffled_late_input_keeps_999_permille_of_parent_links() {
    let sink = Sink::start_blocking();
    let c = Collector::start(
        &config(&sink, "      min: 12s\n      idle: 4s\n      max: 40s", ""),
        Ports::new(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (truth, summary) = loadgen(
        &c,
        dir.path(),
        &[
            "--scenario",
            "game",
            "--count",
            "500",
            "--seed",
            "7",
            "--shuffle",
            "true",
            "--clock-skew-ms",
            "10",
            "--ebpf-delay",
            "10s",
            "--tenants",
            "3",
            "--rate",
            "100",
        ],
    );
    drained(&c, &sink);
    let cmp = compare(&truth, &observed(&sink));
    assert!(
        cmp.parent_accuracy() >= 0.999,
        "parent accuracy {:.5}: {cmp:#?}\nsummary: {summary}",
        cmp.parent_accuracy()
    );
    assert_eq!(cmp.cross_tenant_spans, 0, "{cmp:#?}");
    // Zero spans lost: every expected span is out, or counted as dropped by config.
    let dropped = c.metric("tailweave_join_unassociated_total", &[("action", "drop")]);
    assert!(
        cmp.missing_spans as f64 <= dropped,
        "{} spans missing but only {dropped} counted as dropped: {cmp:#?}",
        cmp.missing_spans
    );
}

#[test]
fn an_error_seen_only_by_ebpf_makes_the_joined_trace_an_error_trace() {
    let sink = Sink::start_blocking();
    let sampling = "  tail_sampling:\n    policies:\n      - name: errors\n        type: status_code\n        status_code:\n          status_codes: [ERROR]";
    let c = Collector::start(
        &config(
            &sink,
            "      min: 2s\n      idle: 1s\n      max: 20s",
            sampling,
        ),
        Ports::new(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (truth, _) = loadgen(
        &c,
        dir.path(),
        &[
            "--scenario",
            "game",
            "--count",
            "300",
            "--seed",
            "11",
            "--error-rate",
            "0.2",
            "--slow-rate",
            "0",
            "--timeout-rate",
            "0",
            "--ebpf-delay",
            "500ms",
        ],
    );
    drained(&c, &sink);
    let got = observed(&sink);
    let mysql: Vec<&TraceTruth> = truth.iter().filter(|t| t.case == "mysql_error").collect();
    assert!(
        !mysql.is_empty(),
        "the workload has MySQL errors seen only by eBPF"
    );
    let kept: Vec<TraceTruth> = mysql.iter().map(|t| (*t).clone()).collect();
    let cmp = compare(&kept, &got);
    assert_eq!(
        cmp.traces_complete,
        kept.len() as u64,
        "every trace with an eBPF-only MySQL error is kept whole: {cmp:#?}"
    );
    let normal: Vec<&TraceTruth> = truth.iter().filter(|t| !t.error).collect();
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|s| tailweave_suite::hex(&s.trace_id))
        .collect();
    assert!(
        normal.iter().all(|t| !ids.contains(&t.trace_id)),
        "traces without errors are not kept by an errors-only policy"
    );
}
