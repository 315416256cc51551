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

/// The join and the sampler with `storage: file` and the exporter's sending queue on disk, all
/// under `dir` (the queue, so that kept spans on their way to the sink when the process dies are
/// not lost with an in-memory queue); waits short enough that a first workload goes out before
/// the kill and long enough that a second one is still held.
fn durable_config(sink: &Sink, dir: &Path) -> String {
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
    wait: {{min: 10s, idle: 4s, max: 30s}}
    storage: file
    directory: {join}
  tail_sampling:
    decision_wait: 20s
    storage: file
    directory: {sampling}
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: slow, type: latency, latency: {{threshold_ms: 500}}}}
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
    sending_queue: {{storage: file, directory: {queue}}}
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
      processors: [join, tail_sampling]
      exporters: [otlp]
"#,
        sink = sink.endpoint(),
        join = dir.join("join").display(),
        sampling = dir.join("sampling").display(),
        queue = dir.join("queue").display(),
    )
}

/// Waits (bounded) until every error and slow trace of `truth` is whole at the sink: with the
/// sending queue on disk a batch can take longer than `drained`'s two looks to arrive.
fn wait_kept(sink: &Sink, truth: &[TraceTruth]) {
    let kept: Vec<TraceTruth> = truth
        .iter()
        .filter(|t| t.error || t.slow)
        .cloned()
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if compare(&kept, &observed(sink)).traces_complete == kept.len() as u64 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What became of one workload: its kept traces (error or slow) must be whole and once, the
/// others absent.
fn check_kept(
    what: &str,
    truth: &[TraceTruth],
    got: &[tailweave_core::proto::tonic::trace::v1::Span],
) -> usize {
    let kept: Vec<TraceTruth> = truth
        .iter()
        .filter(|t| t.error || t.slow)
        .cloned()
        .collect();
    assert!(
        !kept.is_empty(),
        "{what}: the workload has error and slow traces"
    );
    let cmp = compare(&kept, got);
    assert_eq!(
        cmp.traces_complete,
        kept.len() as u64,
        "{what}: every error and slow trace reaches the sink whole: {cmp:#?}"
    );
    assert_eq!(cmp.duplicate_spans, 0, "{what}: no unit twice: {cmp:#?}");
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|s| tailweave_suite::hex(&s.trace_id))
        .collect();
    let rest: Vec<&TraceTruth> = truth.iter().filter(|t| !t.error && !t.slow).collect();
    let leaked: Vec<&str> = rest
        .iter()
        .filter(|t| ids.contains(&t.trace_id))
        .map(|t| t.case.as_str())
        .collect();
    assert!(
        leaked.is_empty(),
        "{what}: traces the policies sample out reached the sink: {leaked:?}"
    );
    kept.len()
}

/// `kill -9` while the join holds traces, with the join's and the sampler's logs: after the
/// restart on the same directories and ports, every acknowledged span of a kept trace reaches
/// the sink, each kept trace whole and once, and nothing the policies drop does. A first
/// workload went out before the kill (its units' done records keep them from coming out again);
/// a second one was held by the join when the process died; a third is held at a graceful stop.
#[test]
fn kill_9_while_the_join_holds_traces_loses_no_acknowledged_span() {
    let sink = Sink::start_blocking();
    let state = tempfile::tempdir().unwrap();
    let yaml = durable_config(&sink, state.path());
    let ports = Ports::new();
    let mut c = Collector::start(&yaml, ports);
    let dir = tempfile::tempdir().unwrap();
    let args = |seed: &'static str| {
        [
            "--scenario",
            "game",
            "--count",
            "150",
            "--seed",
            seed,
            "--error-rate",
            "0.1",
            "--slow-rate",
            "0.1",
            "--ebpf-delay",
            "1s",
            "--rate",
            "150",
        ]
    };
    let first_dir = dir.path().join("first");
    std::fs::create_dir_all(&first_dir).unwrap();
    let (first, first_summary) = loadgen(&c, &first_dir, &args("31"));
    wait_kept(&sink, &first);
    drained(&c, &sink);
    let before = sink.span_count();
    assert!(before > 0, "the first workload went out before the kill");

    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let (second, summary) = loadgen(&c, &second_dir, &args("32"));
    // Every request was answered (loadgen checks no refusal, no failure). The kill comes once
    // the join has taken every accepted span (the receivers answer when it has; the wait only
    // keeps this test about the join's log, not about the receivers' answers) and holds them.
    let accepted = first_summary["accepted"].as_f64().unwrap_or(0.0)
        + summary["accepted"].as_f64().unwrap_or(0.0);
    let held = tailweave_suite::wait_for(
        "the join to take and hold the second workload",
        std::time::Duration::from_secs(30),
        || {
            let taken = c.metric("tailweave_join_incoming_spans_total", &[]);
            let n = c.metric("tailweave_join_pending_spans", &[]);
            (taken >= accepted && n > 0.0).then_some(n)
        },
    );
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let at_kill = sink.span_count();
    drop(c);

    let c = Collector::start(&yaml, ports);
    let log = c.log_text();
    assert!(log.contains("join state restored"), "{log}");
    let replayed = c.metric("tailweave_join_replayed_spans_total", &[]);
    assert!(replayed > 0.0, "the log held spans");
    wait_kept(&sink, &second);
    drained(&c, &sink);
    assert_eq!(
        c.metric("tailweave_join_storage_errors_total", &[]),
        0.0,
        "no log write failed"
    );
    let after_restart = sink.span_count();

    // A graceful stop while the join holds a third workload: it flushes the units, and once
    // downstream took them their done records empty the log (a background thread waits for
    // the acks; if the process exits first, the next start emits those units again).
    let third_dir = dir.path().join("third");
    std::fs::create_dir_all(&third_dir).unwrap();
    let (third, _) = loadgen(&c, &third_dir, &args("33"));
    let held_at_stop = c.metric("tailweave_join_pending_spans", &[]);
    let mut c = c;
    assert!(c.terminate().success());
    let log_after_stop =
        std::fs::metadata(state.path().join("join").join("traces_join.log")).map_or(0, |m| m.len());

    let got = observed(&sink);
    let kept_first = check_kept("first workload", &first, &got);
    let kept_second = check_kept("second workload", &second, &got);
    let kept_third = check_kept("third workload (SIGTERM)", &third, &got);
    eprintln!(
        "join_e2e: kill -9: {} spans at the sink before the second workload, {at_kill} at the kill, \
         {after_restart} after the restart; the join held {held} spans at the kill and replayed \
         {replayed}; SIGTERM with {held_at_stop} spans held, join log {log_after_stop} bytes after \
         the stop, {} spans at the sink; kept {kept_first} + {kept_second} + {kept_third} traces \
         whole; second workload: {summary}",
        before,
        got.len(),
    );
}
