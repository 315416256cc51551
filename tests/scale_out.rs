//! Scale-out by trace id (issue 5) and the deployment manifests.
//!
//! - `deploy_configs_*`: every tailweave config embedded in `deploy/` passes `tailweave validate`,
//!   and the Kubernetes workloads around them match them (memory limit above the memory cap,
//!   probes on the health endpoint's port).
//! - `scale_out_*`: sidecar-mode instances -> one load-balancing instance -> three gateways -> a
//!   sink, on loopback, the real binary throughout; the game workload (SDK spans and DeepFlow rows,
//!   with ground truth) through join and tail sampling, also across a gateway restart.
//! - `load_balancer_queues_on_disk_survive_kill_9`: the load balancer's per-backend queues with
//!   `sending_queue.storage: file`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use serde_yaml::Value;
use tailweave_suite::{hex, root, tailweave_bin, wait_for_async, Collector, Ports, Sink};

// ---------------------------------------------------------------------------------------------
// deploy/: embedded configs

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml") | Some("yml")
        ) {
            out.push(p);
        }
    }
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_yaml::from_str(&cur)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            if !v.is_null() {
                out.push(v);
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    out
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path).and_then(|v| v.as_str()).unwrap_or("")
}

/// `2Gi`, `512Mi`, `128M` as MiB.
fn mib(q: &str) -> f64 {
    let (n, unit) = q
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((q, ""), |i| q.split_at(i));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    match unit {
        "Gi" => n * 1024.0,
        "Mi" => n,
        "Ki" => n / 1024.0,
        "G" => n * 1e9 / 1048576.0,
        "M" => n * 1e6 / 1048576.0,
        "" => n / 1048576.0,
        u => panic!("unit {u} in {q}"),
    }
}

struct Embedded {
    /// `file: ConfigMap/key`.
    name: String,
    configmap: String,
    text: String,
}

fn embedded_configs() -> (Vec<Embedded>, Vec<(PathBuf, Value)>) {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    let mut configs = Vec::new();
    let mut all = Vec::new();
    for f in files {
        for d in docs(&f) {
            if s(&d, &["kind"]) == "ConfigMap" {
                let cm = s(&d, &["metadata", "name"]).to_string();
                if let Some(Value::Mapping(data)) = d.get("data") {
                    for (k, v) in data {
                        let k = k.as_str().unwrap_or("");
                        if k.ends_with(".yaml") || k.ends_with(".yml") {
                            configs.push(Embedded {
                                name: format!(
                                    "{}: ConfigMap {cm} key {k}",
                                    f.strip_prefix(root()).unwrap_or(&f).display()
                                ),
                                configmap: cm.clone(),
                                text: v.as_str().unwrap_or("").to_string(),
                            });
                        }
                    }
                }
            }
            all.push((f.clone(), d));
        }
    }
    (configs, all)
}

fn validate(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tailweave.yaml");
    std::fs::write(&p, text).unwrap();
    let mut cmd = Command::new(tailweave_bin());
    cmd.arg("--config").arg(&p).arg("validate");
    // The configs' ${env:...:-default} must stand on their defaults.
    for (k, _) in std::env::vars() {
        if k.starts_with("TAILWEAVE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn deploy_configs_pass_tailweave_validate() {
    let (configs, _) = embedded_configs();
    assert!(
        configs.len() >= 3,
        "expected the gateway, load-balancer and sidecar configs, found {}",
        configs.len()
    );
    let mut failures = Vec::new();
    for c in &configs {
        let (ok, out) = validate(&c.text);
        if !ok || !out.contains("configuration is valid") {
            failures.push(format!("{}:\n{out}", c.name));
        }
        // Every deployed pipeline that can receive eBPF-derived spans filters them first.
        let v: Value = serde_yaml::from_str(&c.text).unwrap();
        if get(&v, &["receivers", "deepflow"]).is_some() {
            let pipelines = get(&v, &["service", "pipelines"])
                .unwrap()
                .as_mapping()
                .unwrap();
            for (id, p) in pipelines {
                let procs = p["processors"].as_sequence().cloned().unwrap_or_default();
                assert_eq!(
                    procs.first().and_then(|x| x.as_str()),
                    Some("self_filter"),
                    "{}: pipeline {id:?} receives eBPF spans but does not start with self_filter",
                    c.name
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn deploy_workloads_match_their_configs() {
    let (configs, all) = embedded_configs();
    let by_cm: HashMap<&str, Value> = configs
        .iter()
        .map(|c| (c.configmap.as_str(), serde_yaml::from_str(&c.text).unwrap()))
        .collect();
    let mut checked = 0;
    for (file, d) in &all {
        if !matches!(s(d, &["kind"]), "Deployment" | "StatefulSet") {
            continue;
        }
        let spec = get(d, &["spec", "template", "spec"]).unwrap();
        let volumes: BTreeMap<String, String> = spec["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    s(v, &["name"]).to_string(),
                    get(v, &["configMap", "name"])?.as_str()?.to_string(),
                ))
            })
            .collect();
        for c in spec["containers"].as_sequence().unwrap() {
            let Some(cfg) = c["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|m| volumes.get(s(m, &["name"])))
                .find_map(|cm| by_cm.get(cm.as_str()))
            else {
                continue;
            };
            let what = format!(
                "{} {}/{}",
                file.display(),
                s(d, &["metadata", "name"]),
                s(c, &["name"])
            );
            // The memory cap sits below the container limit, with headroom for what it does not
            // count, and not so far below that the limit is wasted.
            let cap = get(cfg, &["service", "memory_limit_mib"])
                .and_then(|v| v.as_f64())
                .unwrap_or_else(|| panic!("{what}: the config sets no service.memory_limit_mib"));
            let limit = mib(s(c, &["resources", "limits", "memory"]));
            assert!(
                cap < limit && cap >= 0.6 * limit,
                "{what}: memory_limit_mib {cap} does not match the container limit {limit} MiB"
            );
            // Probes on the health endpoint's port.
            let health_port: u64 = s(cfg, &["extensions", "health_check", "endpoint"])
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no health_check endpoint"));
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = get(c, &[probe, "httpGet", "port"])
                    .unwrap_or_else(|| panic!("{what}: no {probe}"));
                let n = match port {
                    Value::Number(n) => n.as_u64().unwrap(),
                    Value::String(name) => c["ports"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .find(|p| s(p, &["name"]) == name)
                        .and_then(|p| p["containerPort"].as_u64())
                        .unwrap_or_else(|| panic!("{what}: {probe} names unknown port {name}")),
                    _ => panic!("{what}: {probe} port"),
                };
                assert_eq!(n, health_port, "{what}: {probe} is not on the health port");
                let path = match s(cfg, &["extensions", "health_check", "path"]) {
                    "" => "/",
                    p => p,
                };
                assert_eq!(
                    s(c, &[probe, "httpGet", "path"]),
                    path,
                    "{what}: {probe} path"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "checked {checked} workloads");
}

// ---------------------------------------------------------------------------------------------
// Scale-out on loopback

/// Spans per trace: a root and a child from the frontend (through sidecar A), two children from
/// the cart service (through sidecar B), as two services with a sidecar each report one trace.
const SPANS_PER_TRACE: usize = 4;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// A small deterministic generator (splitmix64), so two runs send the same traces.
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[derive(Clone)]
struct Trace {
    id: [u8; 16],
    error: bool,
    /// [frontend part, cart part].
    parts: [Vec<Span>; 2],
}

fn traces(seed: u64, n: usize) -> Vec<Trace> {
    let mut ids = Ids(seed);
    (0..n)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&ids.next().to_be_bytes());
            id[8..].copy_from_slice(&ids.next().to_be_bytes());
            let sid: Vec<Vec<u8>> = (0..SPANS_PER_TRACE)
                .map(|_| ids.next().to_be_bytes().to_vec())
                .collect();
            let error = i % 7 == 3;
            let t0 = 1_700_000_000_000_000_000u64 + i as u64 * 1_000_000;
            let span = |k: usize, parent: Option<usize>, name: &str, err: bool| Span {
                trace_id: id.to_vec(),
                span_id: sid[k].clone(),
                parent_span_id: parent.map(|p| sid[p].clone()).unwrap_or_default(),
                name: name.into(),
                kind: if parent.is_none() { 2 } else { 1 },
                start_time_unix_nano: t0 + k as u64 * 1000,
                end_time_unix_nano: t0 + 50_000_000,
                status: err.then(|| opentelemetry_proto::tonic::trace::v1::Status {
                    code: 2,
                    message: "out of stock".into(),
                }),
                ..Default::default()
            };
            Trace {
                id,
                error,
                parts: [
                    vec![
                        span(0, None, "GET /checkout", false),
                        span(1, Some(0), "render", false),
                    ],
                    vec![
                        span(2, Some(1), "POST /cart", false),
                        span(3, Some(2), "reserve", error),
                    ],
                ],
            }
        })
        .collect()
}

fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

const TELEMETRY: &str = r#"
extensions:
  health_check:
    endpoint: 127.0.0.1:{HEALTH}
service:
  extensions: [health_check]
  telemetry:
    metrics:
      address: 127.0.0.1:{METRICS}
"#;

fn sidecar_config(upstream: u16) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
processors:
  batch:
    send_batch_size: 256
    timeout: 50ms
exporters:
  otlp:
    endpoint: 127.0.0.1:{upstream}
    tls: {{insecure: true}}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms, max_elapsed_time: 0s}}
{TELEMETRY}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp]
"#
    )
}

fn lb_config(gateways: &[u16], reroute_after: &str) -> String {
    let hosts: Vec<String> = gateways.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
exporters:
  loadbalancing:
    routing_key: traceID
    protocol:
      otlp:
        tls: {{insecure: true}}
        timeout: 2s
        retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms, max_elapsed_time: 0s}}
    resolver:
      static:
        hostnames: [{hosts}]
    reroute_after: {reroute_after}
{TELEMETRY}
  pipelines:
    traces:
      receivers: [otlp]
      processors: []
      exporters: [loadbalancing]
"#,
        hosts = hosts.join(", ")
    )
}

/// A gateway: tail sampling (every error, 30% of the rest by trace id) when `sample`, else a
/// plain relay, to its own sink. The sampler waits longer than any test runs: the tests decide
/// by stopping the gateways once every span arrived ([`stop_all`]), so what they compare does not
/// depend on how fast a loaded machine moves spans.
fn gateway_config(sink: &Sink, sample: bool) -> String {
    let (section, list) = if sample {
        (
            r#"processors:
  tail_sampling:
    decision_wait: 300s
    decision_wait_after_root: 300s
    policies:
      - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
      - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 30}}
"#,
            "[tail_sampling]",
        )
    } else {
        ("", "[]")
    };
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
{section}
exporters:
  otlp:
    endpoint: {sink}
    tls: {{insecure: true}}
{TELEMETRY}
  pipelines:
    traces:
      receivers: [otlp]
      processors: {list}
      exporters: [otlp]
"#,
        sink = sink.endpoint()
    )
}

async fn start(yaml: String, ports: Ports) -> std::sync::Arc<Collector> {
    let c = tokio::task::spawn_blocking(move || Collector::start(&yaml, ports))
        .await
        .unwrap();
    std::sync::Arc::new(c)
}

async fn metric(
    c: &std::sync::Arc<Collector>,
    name: &'static str,
    labels: Vec<(String, String)>,
) -> f64 {
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        let l: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        c.metric(name, &l)
    })
    .await
    .unwrap()
}

/// Sends every trace, the frontend part to `a` and the cart part to `b`, in requests of 50.
async fn send(a: u16, b: u16, traces: &[Trace]) {
    let mut ca = TraceServiceClient::connect(format!("http://127.0.0.1:{a}"))
        .await
        .unwrap();
    let mut cb = TraceServiceClient::connect(format!("http://127.0.0.1:{b}"))
        .await
        .unwrap();
    for chunk in traces.chunks(50) {
        let fa: Vec<Span> = chunk.iter().flat_map(|t| t.parts[0].clone()).collect();
        let fb: Vec<Span> = chunk.iter().flat_map(|t| t.parts[1].clone()).collect();
        ca.export(request("frontend", fa)).await.unwrap();
        cb.export(request("cart", fb)).await.unwrap();
    }
}

/// Span ids per trace id (hex), at one sink.
fn by_trace(sink: &Sink) -> HashMap<String, HashSet<String>> {
    let mut m: HashMap<String, HashSet<String>> = HashMap::new();
    for r in sink.spans() {
        m.entry(hex(&r.span.trace_id))
            .or_default()
            .insert(hex(&r.span.span_id));
    }
    m
}

/// Waits until the gateways have decided every span sent, then until their sinks hold every
/// kept span.
/// Waits until the gateways' samplers hold all `sent_spans`, then stops them (SIGTERM: the
/// sampler decides every trace it holds and the exporter drains before the process exits).
/// Returns the number of traces each gateway held just before the stop.
async fn settle(gateways: Vec<std::sync::Arc<Collector>>, sent_spans: u64) -> Vec<u64> {
    let held = wait_for_async(
        "gateways hold every span",
        Duration::from_secs(60),
        || async {
            let (mut spans, mut traces) = (0.0, Vec::new());
            for g in &gateways {
                spans += metric(g, "tailweave_tail_sampling_spans_in_memory", vec![]).await;
                traces.push(
                    metric(g, "tailweave_tail_sampling_traces_in_memory", vec![]).await as u64,
                );
            }
            (spans as u64 >= sent_spans).then_some(traces)
        },
    )
    .await;
    stop_all(gateways).await;
    held
}

/// Stops every collector with SIGTERM, all at once, and checks each exited cleanly: a stopping
/// join emits every trace it holds, the sampler decides them, the exporter drains.
async fn stop_all(collectors: Vec<std::sync::Arc<Collector>>) {
    let mut stops = Vec::new();
    for c in collectors {
        stops.push(tokio::task::spawn_blocking(move || {
            let mut c =
                std::sync::Arc::try_unwrap(c).unwrap_or_else(|_| panic!("collector shared"));
            c.terminate()
        }));
    }
    for s in stops {
        let status = s.await.unwrap();
        assert!(status.success(), "a gateway did not exit cleanly: {status}");
    }
}

/// The tests that start a topology of collectors run one after another: each starts up to seven
/// processes, and the restart test paces its load against the load balancer's timers, which a
/// machine shared with three other topologies would stretch.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const N_TRACES: usize = 600;
const SEED: u64 = 20261201;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_out_matches_the_single_gateway_run() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let all = traces(SEED, N_TRACES);
    let sent_spans = (N_TRACES * SPANS_PER_TRACE) as u64;

    // Single gateway: two sidecars straight to it.
    let single_sink = Sink::start().await;
    let gp = Ports::new();
    let single = start(gateway_config(&single_sink, true), gp).await;
    let (sa, sb) = (Ports::new(), Ports::new());
    let side_a = start(sidecar_config(gp.grpc), sa).await;
    let side_b = start(sidecar_config(gp.grpc), sb).await;
    send(sa.grpc, sb.grpc, &all).await;
    settle(vec![single], sent_spans).await;
    let single_result = by_trace(&single_sink);
    drop((side_a, side_b));

    // Scale-out: two sidecars -> one load balancer -> three gateways, each with its own sink.
    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let gports = [Ports::new(), Ports::new(), Ports::new()];
    let mut gateways = Vec::new();
    for (s, p) in sinks.iter().zip(gports) {
        gateways.push(start(gateway_config(s, true), p).await);
    }
    let lp = Ports::new();
    let lb = start(lb_config(&gports.map(|p| p.grpc), "30s"), lp).await;
    let (sa, sb) = (Ports::new(), Ports::new());
    let _side_a = start(sidecar_config(lp.grpc), sa).await;
    let _side_b = start(sidecar_config(lp.grpc), sb).await;
    send(sa.grpc, sb.grpc, &all).await;
    let held = settle(gateways, sent_spans).await;
    let routed = metric(&lb, "tailweave_loadbalancer_routed_spans_total", vec![]).await;
    assert_eq!(routed as u64, sent_spans);

    // Each trace went to one gateway, and each gateway had a share.
    assert!(
        held.iter().all(|n| *n > 0),
        "a gateway received no trace: {held:?}"
    );
    assert_eq!(
        held.iter().sum::<u64>() as usize,
        N_TRACES,
        "a trace was split over gateways: {held:?}"
    );
    // Every kept trace is at exactly one sink, complete.
    let per_sink: Vec<HashMap<String, HashSet<String>>> = sinks.iter().map(by_trace).collect();
    let mut union: HashMap<String, HashSet<String>> = HashMap::new();
    for m in &per_sink {
        for (t, spans) in m {
            assert!(
                union.insert(t.clone(), spans.clone()).is_none(),
                "trace {t} at two sinks"
            );
            assert_eq!(spans.len(), SPANS_PER_TRACE, "partial trace {t}");
        }
    }
    // The same traces as the single gateway kept, every error among them.
    assert_eq!(union.len(), single_result.len());
    assert_eq!(
        union, single_result,
        "scale-out kept other traces than one gateway"
    );
    for t in all.iter().filter(|t| t.error) {
        assert!(
            union.contains_key(&hex(&t.id)),
            "error trace {} not kept",
            hex(&t.id)
        );
    }
    let kept_rest = all
        .iter()
        .filter(|t| !t.error && union.contains_key(&hex(&t.id)))
        .count();
    let rest = all.iter().filter(|t| !t.error).count();
    let share = kept_rest as f64 / rest as f64;
    assert!(
        (0.2..0.4).contains(&share),
        "kept {share} of the non-error traces, configured 30%"
    );
    // The load balancer spread the traces.
    for s in &sinks {
        assert!(s.span_count() > 0);
    }
    eprintln!(
        "scale-out: {N_TRACES} traces, single gateway kept {}, three gateways kept {} (per sink {:?} spans), {:.1}% of the non-error traces",
        single_result.len(),
        union.len(),
        sinks.iter().map(|s| s.span_count()).collect::<Vec<_>>(),
        share * 100.0
    );
}

// ---------------------------------------------------------------------------------------------
// The game workload with ground truth: join and tail sampling on the gateways

use tailweave_collector::loadgen::scenario::{generate, GeneratedTrace, ScenarioConfig};
use tailweave_collector::loadgen::truth::{compare, Comparison, TraceTruth};

fn join_gateway_config(sink: &Sink) -> String {
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
  self_filter:
  join:
    wait: {{min: 5s, idle: 4s, max: 30s}}
  tail_sampling:
    decision_wait: 25s
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: slow, type: latency, latency: {{threshold_ms: 500}}}}
      - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: 30}}}}
exporters:
  otlp:
    endpoint: {sink}
    tls: {{insecure: true}}
{TELEMETRY}
  pipelines:
    traces:
      receivers: [otlp, deepflow]
      processors: [self_filter, join, tail_sampling]
      exporters: [otlp]
"#,
        sink = sink.endpoint()
    )
}

/// [`join_gateway_config`] waiting longer than any test runs: a test using it decides by stopping
/// the gateways once every span arrived ([`stop_all`]), so the join sees every span of a trace
/// however slowly a loaded machine moves them, and what the test compares is the join and the
/// sampler, not the timing.
fn join_gateway_config_held(sink: &Sink) -> String {
    let yaml = join_gateway_config(sink);
    let held = yaml
        .replace(
            "wait: {min: 5s, idle: 4s, max: 30s}",
            "wait: {min: 300s, idle: 300s, max: 300s}",
        )
        .replace("decision_wait: 25s", "decision_wait: 600s");
    assert_ne!(held, yaml);
    held
}

/// The load balancer of the game run: SDK spans from the sidecars, DeepFlow rows on its own port.
fn join_lb_config(gateways: &[u16]) -> String {
    join_lb_config_rerouting(gateways, "30s")
}

fn join_lb_config_rerouting(gateways: &[u16], reroute_after: &str) -> String {
    lb_config(gateways, reroute_after).replace(
        "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{GRPC}\n",
        "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{GRPC}\n  deepflow:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:{EXTRA0}\n",
    )
    .replace("receivers: [otlp]", "receivers: [otlp, deepflow]")
}

fn service_of(rs: &ResourceSpans) -> String {
    rs.resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// SDK spans to the two sidecars (each service has its own, by name) and the DeepFlow rows to
/// `deepflow` as DeepFlow's server exporter sends them (batches of 32 rows), 20 traces at a time
/// so the rows of a trace arrive within the join's wait.
async fn send_game(sidecars: [u16; 2], deepflow: u16, traces: &[GeneratedTrace]) {
    let mut s = GameSender::connect(sidecars, deepflow).await;
    for group in traces.chunks(20) {
        s.send(group).await;
    }
}

/// The clients [`send_game`] uses, kept for a paced sender.
struct GameSender {
    sidecars: Vec<TraceServiceClient<tonic::transport::Channel>>,
    deepflow: TraceServiceClient<tonic::transport::Channel>,
}

impl GameSender {
    async fn connect(sidecars: [u16; 2], deepflow: u16) -> GameSender {
        let mut clients = Vec::new();
        for p in sidecars {
            clients.push(
                TraceServiceClient::connect(format!("http://127.0.0.1:{p}"))
                    .await
                    .unwrap(),
            );
        }
        let deepflow = TraceServiceClient::connect(format!("http://127.0.0.1:{deepflow}"))
            .await
            .unwrap();
        GameSender {
            sidecars: clients,
            deepflow,
        }
    }

    /// One group of traces: their SDK spans to the sidecars, then their rows.
    async fn send(&mut self, group: &[GeneratedTrace]) {
        let mut per: [Vec<ResourceSpans>; 2] = [Vec::new(), Vec::new()];
        for t in group {
            for rs in &t.sdk {
                let h = tailweave_exporters::load_balancing::ring::hash(service_of(rs).as_bytes());
                per[(h % 2) as usize].push(rs.clone());
            }
        }
        for (side, list) in per.into_iter().enumerate() {
            if !list.is_empty() {
                self.sidecars[side]
                    .export(ExportTraceServiceRequest {
                        resource_spans: list,
                    })
                    .await
                    .unwrap();
            }
        }
        let rows: Vec<ResourceSpans> = group.iter().flat_map(|t| t.ebpf.clone()).collect();
        for chunk in rows.chunks(32) {
            self.deepflow
                .export(ExportTraceServiceRequest {
                    resource_spans: chunk.to_vec(),
                })
                .await
                .unwrap();
        }
    }
}

/// Waits until the gateways took every span, hold nothing, and their sinks hold every kept span.
async fn settle_game(gateways: &[std::sync::Arc<Collector>], sinks: &[Sink], sent: u64) {
    settle_game_after(gateways, sinks, sent, 0).await
}

/// [`settle_game`] when `sent` spans are still to come to `gateways` and the sinks already hold
/// `at_sinks` spans from gateways no longer running.
async fn settle_game_after(
    gateways: &[std::sync::Arc<Collector>],
    sinks: &[Sink],
    sent: u64,
    at_sinks: usize,
) {
    took_every_span(gateways, sent).await;
    wait_for_async(
        "join and sampler empty",
        Duration::from_secs(90),
        || async {
            let mut held = 0.0;
            for g in gateways {
                held += metric(g, "tailweave_join_pending_spans", vec![]).await;
                held += metric(g, "tailweave_tail_sampling_spans_in_memory", vec![]).await;
            }
            (held == 0.0).then_some(())
        },
    )
    .await;
    wait_for_async("kept spans delivered", Duration::from_secs(60), || async {
        let mut kept = 0.0;
        for g in gateways {
            kept += metric(
                g,
                "tailweave_tail_sampling_spans_total",
                vec![("decision".into(), "kept".into())],
            )
            .await;
        }
        let got: usize = sinks.iter().map(|s| s.span_count()).sum();
        (got as u64 >= kept as u64 + at_sinks as u64).then_some(())
    })
    .await;
}

/// Spans the joins of `gateways` took.
/// Waits until the gateways' joins took `sent` spans.
async fn took_every_span(gateways: &[std::sync::Arc<Collector>], sent: u64) {
    wait_for_async(
        "gateways took every span",
        Duration::from_secs(60),
        || async { (join_incoming(gateways).await >= sent).then_some(()) },
    )
    .await;
}

async fn join_incoming(gateways: &[std::sync::Arc<Collector>]) -> u64 {
    let mut n = 0.0;
    for g in gateways {
        n += metric(g, "tailweave_join_incoming_spans_total", vec![]).await;
    }
    n as u64
}

struct GameRun {
    cmp: Comparison,
    kept: HashSet<String>,
    /// Trace ids found at more than one sink.
    at_several: usize,
}

fn judge(truth: &[TraceTruth], sinks: &[Sink]) -> GameRun {
    judge_except(truth, sinks, &HashSet::new())
}

/// [`judge`], leaving out the spans of the traces in `unsent` (generated, not sent in this run).
fn judge_except(truth: &[TraceTruth], sinks: &[Sink], unsent: &HashSet<String>) -> GameRun {
    let known: HashSet<&str> = truth.iter().map(|t| t.trace_id.as_str()).collect();
    let mut kept = HashSet::new();
    let mut at_several = 0;
    let mut observed = Vec::new();
    let mut seen_at: HashMap<String, usize> = HashMap::new();
    for (i, s) in sinks.iter().enumerate() {
        for r in s.spans() {
            let t = hex(&r.span.trace_id);
            if unsent.contains(&t) {
                continue;
            }
            if known.contains(t.as_str()) {
                kept.insert(t.clone());
            }
            match seen_at.get(&t) {
                Some(j) if *j != i => at_several += 1,
                _ => {
                    seen_at.insert(t, i);
                }
            }
            observed.push(r.span);
        }
    }
    let kept_truth: Vec<TraceTruth> = truth
        .iter()
        .filter(|t| kept.contains(&t.trace_id))
        .cloned()
        .collect();
    GameRun {
        cmp: compare(&kept_truth, &observed),
        kept,
        at_several,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_out_of_the_game_workload_matches_the_single_gateway_run() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let cfg = ScenarioConfig {
        traces: 300,
        error_rate: 0.05,
        slow_rate: 0.05,
        timeout_rate: 0.0,
        ebpf_delay_ms: 0,
        shuffle: true,
        ..ScenarioConfig::default()
    };
    let game = generate(&cfg, 42);
    let truth: Vec<TraceTruth> = game.iter().map(|t| t.truth.clone()).collect();
    let sent: u64 = game
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();

    // Single gateway, on the same path (sidecars and DeepFlow -> load balancer -> gateway), so
    // the runs differ only in the number of gateways.
    let single_sink = Sink::start().await;
    let gp = Ports::new();
    let single = start(join_gateway_config_held(&single_sink), gp).await;
    let lp1 = Ports::new();
    let lb1 = start(join_lb_config(&[gp.grpc]), lp1).await;
    let (sa, sb) = (Ports::new(), Ports::new());
    let a = start(sidecar_config(lp1.grpc), sa).await;
    let b = start(sidecar_config(lp1.grpc), sb).await;
    send_game([sa.grpc, sb.grpc], lp1.extra[0], &game).await;
    took_every_span(std::slice::from_ref(&single), sent).await;
    stop_all(vec![single]).await;
    let one = judge(&truth, std::slice::from_ref(&single_sink));
    drop((a, b, lb1));

    // Two sidecars and DeepFlow -> one load balancer -> three gateways -> three sinks.
    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let gports = [Ports::new(), Ports::new(), Ports::new()];
    let mut gateways = Vec::new();
    for (s, p) in sinks.iter().zip(gports) {
        gateways.push(start(join_gateway_config_held(s), p).await);
    }
    let lp = Ports::new();
    let lb = start(join_lb_config(&gports.map(|p| p.grpc)), lp).await;
    let (sa, sb) = (Ports::new(), Ports::new());
    let _a = start(sidecar_config(lp.grpc), sa).await;
    let _b = start(sidecar_config(lp.grpc), sb).await;
    send_game([sa.grpc, sb.grpc], lp.extra[0], &game).await;
    took_every_span(&gateways, sent).await;
    stop_all(gateways).await;
    let three = judge(&truth, &sinks);
    let by_key = metric(
        &lb,
        "tailweave_loadbalancer_unkeyed_spans_total",
        vec![("outcome".into(), "by_key".into())],
    )
    .await;
    let associated = metric(
        &lb,
        "tailweave_loadbalancer_unkeyed_spans_total",
        vec![("outcome".into(), "associated".into())],
    )
    .await;
    eprintln!(
        "game: {} traces, {sent} spans; single gateway kept {} ({} complete, {} partial, parents {:.4}); three gateways kept {} ({} complete, {} partial, parents {:.4}, {} spans at a second sink); unkeyed eBPF spans: {} associated, {} by key",
        truth.len(),
        one.kept.len(),
        one.cmp.traces_complete,
        one.cmp.traces_partial,
        one.cmp.parent_accuracy(),
        three.kept.len(),
        three.cmp.traces_complete,
        three.cmp.traces_partial,
        three.cmp.parent_accuracy(),
        three.at_several,
        associated as u64,
        by_key as u64,
    );

    // Every error and slow trace kept, whole, by both.
    for run in [&one, &three] {
        for t in truth.iter().filter(|t| t.error || t.slow) {
            assert!(
                run.kept.contains(&t.trace_id),
                "{} ({}) not kept",
                t.trace_id,
                t.case
            );
        }
        let rest: Vec<&TraceTruth> = truth.iter().filter(|t| !t.error && !t.slow).collect();
        let share = rest
            .iter()
            .filter(|t| run.kept.contains(&t.trace_id))
            .count() as f64
            / rest.len() as f64;
        assert!(
            (0.2..0.4).contains(&share),
            "kept {share} of the rest, configured 30%"
        );
    }
    assert_eq!(three.at_several, 0, "a trace reached two gateways' sinks");
    assert_eq!(
        three.kept, one.kept,
        "three gateways kept other traces than one"
    );
    assert_eq!(three.cmp.traces_partial, 0, "{:?}", three.cmp.examples);
    assert_eq!(
        three.cmp, one.cmp,
        "three gateways joined otherwise than one"
    );
}

/// The game workload through the same topology while one gateway of three is stopped (SIGTERM,
/// so it flushes what its join holds) and started again, with the load flowing across the load
/// balancer's switches (the victim down after `reroute_after`, back after its restart). Checked
/// from the ground truth against a single gateway given the same traces: every trace sent is
/// kept complete at exactly one sink or dropped by the sampler's decision (the single gateway's
/// decision for it), every error and slow trace is kept whole, no span is lost or duplicated on
/// the way, and the spans sent away from their owner are counted on the load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_out_of_the_game_workload_across_a_gateway_restart_loses_and_splits_no_trace() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tailweave_exporters::load_balancing::ring::{hash, Ring};

    const GROUP: usize = 10;
    const FIRST: usize = 100;
    let cfg = ScenarioConfig {
        traces: 500,
        error_rate: 0.05,
        slow_rate: 0.05,
        timeout_rate: 0.0,
        ebpf_delay_ms: 0,
        shuffle: true,
        ..ScenarioConfig::default()
    };
    let game = generate(&cfg, 4242);
    let spans_of = |t: &GeneratedTrace| (t.sdk_span_count() + t.ebpf_span_count()) as u64;

    // The decisions of one gateway for every trace of the pool.
    let single_sink = Sink::start().await;
    {
        let gp = Ports::new();
        let single = start(join_gateway_config(&single_sink), gp).await;
        let lp = Ports::new();
        let _lb = start(join_lb_config(&[gp.grpc]), lp).await;
        let (sa, sb) = (Ports::new(), Ports::new());
        let _a = start(sidecar_config(lp.grpc), sa).await;
        let _b = start(sidecar_config(lp.grpc), sb).await;
        send_game([sa.grpc, sb.grpc], lp.extra[0], &game).await;
        let all: u64 = game.iter().map(spans_of).sum();
        settle_game(
            std::slice::from_ref(&single),
            std::slice::from_ref(&single_sink),
            all,
        )
        .await;
    }

    let sinks = [
        Sink::start().await,
        Sink::start().await,
        Sink::start().await,
    ];
    let gports = [Ports::new(), Ports::new(), Ports::new()];
    let mut gateways = Vec::new();
    for (s, p) in sinks.iter().zip(gports) {
        gateways.push(Some(start(join_gateway_config(s), p).await));
    }
    let lp = Ports::new();
    let lb = start(join_lb_config_rerouting(&gports.map(|p| p.grpc), "1s"), lp).await;
    let (sa, sb) = (Ports::new(), Ports::new());
    let _a = start(sidecar_config(lp.grpc), sa).await;
    let _b = start(sidecar_config(lp.grpc), sb).await;
    let names: Vec<String> = gports
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.grpc))
        .collect();
    let ring = Ring::new(&names);
    let owner = |t: &GeneratedTrace| {
        let id = tailweave_core::span::unhex(&t.truth.trace_id).unwrap();
        let n = &ring.nodes()[ring.owner(hash(&id)).unwrap()];
        names.iter().position(|x| x == n).unwrap()
    };
    let victim = 1usize;
    let victim_up = |want: f64| {
        let lb = lb.clone();
        let name = names[victim].clone();
        async move {
            wait_for_async(
                "victim health on the load balancer",
                Duration::from_secs(60),
                || async {
                    let v = metric(
                        &lb,
                        "tailweave_loadbalancer_backend_up",
                        vec![("backend".into(), name.clone())],
                    )
                    .await;
                    (v == want).then_some(())
                },
            )
            .await
        }
    };
    let t0 = std::time::Instant::now();

    // First traces with every gateway up, all taken by the gateways (so no trace is in flight
    // when the victim stops; its join still holds its share, which SIGTERM flushes).
    send_game([sa.grpc, sb.grpc], lp.extra[0], &game[..FIRST]).await;
    let first_spans: u64 = game[..FIRST].iter().map(spans_of).sum();
    let live: Vec<_> = gateways.iter().flatten().cloned().collect();
    wait_for_async("first traces taken", Duration::from_secs(60), || async {
        (join_incoming(&live).await >= first_spans).then_some(())
    })
    .await;
    drop(live);
    let g = gateways[victim].take().unwrap();
    let victim_took = join_incoming(std::slice::from_ref(&g)).await;
    let held = metric(&g, "tailweave_join_pending_spans", vec![]).await;
    let status = tokio::task::spawn_blocking(move || {
        let mut g = std::sync::Arc::try_unwrap(g).unwrap_or_else(|_| panic!("victim shared"));
        g.terminate()
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the victim did not exit cleanly: {status}"
    );
    // What its first life delivered (its exporter drains before it exits).
    let victim_first_out = sinks[victim].span_count();

    // The rest, paced, while the load balancer sees the victim fail, reroutes, and sees it back.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let groups_sent = std::sync::Arc::new(AtomicUsize::new(0));
    let rest: Vec<GeneratedTrace> = game[FIRST..].to_vec();
    let sender = {
        let (stop, groups_sent) = (stop.clone(), groups_sent.clone());
        tokio::spawn(async move {
            let mut s = GameSender::connect([sa.grpc, sb.grpc], lp.extra[0]).await;
            for group in rest.chunks(GROUP) {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                s.send(group).await;
                groups_sent.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    victim_up(0.0).await;
    let at_down = groups_sent.load(Ordering::Acquire);
    // Down for a few groups: their traces owned by the victim start at its successors.
    wait_for_async(
        "groups while the victim is down",
        Duration::from_secs(60),
        || async {
            let n = groups_sent.load(Ordering::Acquire);
            (n >= at_down + 5 || sender.is_finished()).then_some(())
        },
    )
    .await;
    gateways[victim] = Some(start(join_gateway_config(&sinks[victim]), gports[victim]).await);
    victim_up(1.0).await;
    let at_up = groups_sent.load(Ordering::Acquire);
    // A few more groups after the victim is back, then stop.
    wait_for_async(
        "groups after the restart",
        Duration::from_secs(60),
        || async {
            let n = groups_sent.load(Ordering::Acquire);
            (n >= at_up + 8 || sender.is_finished()).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Release);
    sender.await.unwrap();
    let sent_traces = FIRST + groups_sent.load(Ordering::Acquire) * GROUP;
    let sent_traces = sent_traces.min(game.len());
    assert!(
        at_down > 0 && at_up > at_down && sent_traces > FIRST + at_up * GROUP,
        "the switches did not happen while traces were sent: down after {at_down} groups, up after {at_up}, {sent_traces} traces sent"
    );
    let sent = &game[..sent_traces];
    let sent_spans: u64 = sent.iter().map(spans_of).sum();
    let live: Vec<_> = gateways.iter().flatten().cloned().collect();
    settle_game_after(&live, &sinks, sent_spans - victim_took, victim_first_out).await;
    eprintln!(
        "restart run settled {:?} after the first send",
        t0.elapsed()
    );

    // Nothing lost or duplicated between the load balancer and the gateways.
    let taken = join_incoming(&live).await + victim_took;
    assert_eq!(
        taken, sent_spans,
        "spans lost or duplicated on the way to the gateways"
    );
    let routed = metric(&lb, "tailweave_loadbalancer_routed_spans_total", vec![]).await;
    assert_eq!(routed as u64, sent_spans);
    let failed = metric(&lb, "tailweave_exporter_send_failed_spans_total", vec![]).await;
    assert_eq!(failed, 0.0);

    // Judged from the ground truth, against the single gateway's decisions for the same traces.
    let truth: Vec<TraceTruth> = sent.iter().map(|t| t.truth.clone()).collect();
    let unsent: HashSet<String> = game[sent_traces..]
        .iter()
        .map(|t| t.truth.trace_id.clone())
        .collect();
    let one = judge_except(&truth, std::slice::from_ref(&single_sink), &unsent);
    let run = judge_except(&truth, &sinks, &unsent);
    let rerouted = metric(&lb, "tailweave_loadbalancer_rerouted_spans_total", vec![]).await;
    let affinity = metric(&lb, "tailweave_loadbalancer_affinity_spans_total", vec![]).await;
    // Where each kept trace ended: off its owner only if it started while the victim was down.
    let mut off_owner = 0usize;
    let mut off_owner_spans = 0u64;
    let at: Vec<HashSet<String>> = sinks
        .iter()
        .map(|s| s.spans().iter().map(|r| hex(&r.span.trace_id)).collect())
        .collect();
    for (i, t) in sent.iter().enumerate() {
        let holders: Vec<usize> = (0..3)
            .filter(|s| at[*s].contains(&t.truth.trace_id))
            .collect();
        if holders.is_empty() {
            continue;
        }
        assert_eq!(
            holders.len(),
            1,
            "trace {} at sinks {holders:?}",
            t.truth.trace_id
        );
        if holders[0] != owner(t) {
            assert_eq!(
                owner(t),
                victim,
                "trace {} moved off a healthy owner",
                t.truth.trace_id
            );
            assert!(
                i >= FIRST,
                "trace {} of the first traces moved",
                t.truth.trace_id
            );
            off_owner += 1;
            off_owner_spans += spans_of(t);
        }
    }
    let victim_share = sent.iter().filter(|t| owner(t) == victim).count();
    eprintln!(
        "restart: {sent_traces} traces sent ({FIRST} before the stop, victim down after {at_down} more groups of {GROUP}, back after {at_up}); victim owned {victim_share}, its first life took {victim_took} spans ({held} held in its join at SIGTERM) and delivered {victim_first_out}; kept {} ({} complete, {} partial, parents {:.4}), single gateway kept {}; {off_owner} kept traces ({off_owner_spans} spans) away from their owner; load balancer: {} spans rerouted, {} kept with their trace against the ring",
        run.kept.len(),
        run.cmp.traces_complete,
        run.cmp.traces_partial,
        run.cmp.parent_accuracy(),
        one.kept.len(),
        rerouted as u64,
        affinity as u64,
    );
    assert_eq!(run.at_several, 0, "a trace reached two gateways' sinks");
    assert_eq!(run.cmp.traces_partial, 0, "{:?}", run.cmp.examples);
    for t in truth.iter().filter(|t| t.error || t.slow) {
        assert!(
            run.kept.contains(&t.trace_id),
            "{} ({}) not kept",
            t.trace_id,
            t.case
        );
    }
    assert_eq!(
        run.kept, one.kept,
        "kept other traces than one gateway given the same traces"
    );
    assert_eq!(run.cmp, one.cmp, "joined otherwise than one gateway");
    assert!(
        off_owner > 0,
        "no trace went to a successor while the victim was down"
    );
    assert!(
        rerouted as u64 >= off_owner_spans,
        "{rerouted} spans counted as rerouted, {off_owner_spans} spans of kept traces away from their owner"
    );
}

/// Total bytes of the files under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// `sending_queue: {storage: file}` on the load balancer: with both gateways down, the traces wait
/// in the per-backend queues on disk; the load balancer is killed (SIGKILL) and started again;
/// once the gateways are up, every span is delivered once, each trace whole at its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_balancer_queues_on_disk_survive_kill_9() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    use tailweave_exporters::load_balancing::ring::{hash, Ring};
    let all = traces(SEED + 7, 200);
    let sent = all.len() * SPANS_PER_TRACE;
    let qdir = tempfile::tempdir().unwrap();
    let sinks = [Sink::start().await, Sink::start().await];
    let gports = [Ports::new(), Ports::new()];
    let config = lb_config(&gports.map(|p| p.grpc), "0s").replace(
        "        timeout: 2s\n",
        &format!(
            "        timeout: 2s\n        sending_queue: {{storage: file, directory: {}, max_size_mib: 16}}\n",
            qdir.path().display()
        ),
    );
    assert!(config.contains("storage: file"));
    let lp = Ports::new();
    let lb = start(config.clone(), lp).await;
    // No gateway yet: every send fails and the batches stay queued.
    send(lp.grpc, lp.grpc, &all).await;
    wait_for_async("spans routed", Duration::from_secs(30), || async {
        let r = metric(&lb, "tailweave_loadbalancer_routed_spans_total", vec![]).await;
        (r as usize == sent).then_some(())
    })
    .await;
    // Read back from disk and tried: the queue holds them. Then the writer is idle.
    wait_for_async("queued on disk", Duration::from_secs(30), || async {
        let retries = metric(&lb, "tailweave_exporter_retries_total", vec![]).await;
        let before = bytes_under(qdir.path());
        tokio::time::sleep(Duration::from_millis(200)).await;
        (retries > 0.0 && before > 0 && bytes_under(qdir.path()) == before).then_some(())
    })
    .await;
    let on_disk = bytes_under(qdir.path());
    drop(lb); // SIGKILL: nothing is drained, nothing flushed.

    let mut gateways = Vec::new();
    for (s, p) in sinks.iter().zip(gports) {
        gateways.push(start(gateway_config(s, false), p).await);
    }
    let _lb = start(config, Ports::new()).await;
    let delivered = |sinks: &[Sink]| sinks.iter().map(|s| s.span_count()).sum::<usize>();
    wait_for_async(
        "queued spans delivered",
        Duration::from_secs(60),
        || async { (delivered(&sinks) >= sent).then_some(()) },
    )
    .await;
    assert_eq!(delivered(&sinks), sent, "spans duplicated");
    let names: Vec<String> = gports
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.grpc))
        .collect();
    let ring = Ring::new(&names);
    let at: Vec<HashMap<String, HashSet<String>>> = sinks.iter().map(by_trace).collect();
    for t in &all {
        let id = hex(&t.id);
        let own = &ring.nodes()[ring.owner(hash(&t.id)).unwrap()];
        let own = names.iter().position(|n| n == own).unwrap();
        assert_eq!(
            at[own].get(&id).map(|s| s.len()),
            Some(SPANS_PER_TRACE),
            "trace {id} not whole at its owner"
        );
    }
    eprintln!(
        "load balancer on disk: {sent} spans queued ({on_disk} bytes) survived SIGKILL and were delivered once each"
    );
}
