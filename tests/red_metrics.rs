//! RED metrics end to end (issue 8): the real `tailweave` binary with `span_metrics` before
//! `tail_sampling`, pushing to a REAL Prometheus server over remote write and serving `/metrics`
//! with exemplars; a seeded `loadgen` workload; PromQL over Prometheus's HTTP API must return the
//! request and error counts the ground truth (the spans sent) predicts. Remote write also goes to
//! a Prometheus that serves TLS and requires client certificates (issue 7): pushes with our
//! certificate arrive, pushes without one or trusting another CA are counted as failed and never
//! reach it.
//!
//! Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, see `.ci/run`). Without
//! it the test fails and says so: a RED test that silently passes would prove nothing.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde_json::Value as Json;
use tailweave_collector::loadgen::scenario::{generate, ScenarioConfig, ScenarioKind};
use tailweave_core::tls::rustls;
use tailweave_core::tls::rustls::pki_types::ServerName;
use tailweave_core::tls::{ClientTlsSettings, ALPN_HTTP1};
use tailweave_exporters::prometheus_remote_write::PUSHES;
use tailweave_suite::{
    free_port, hex, http_exchange, http_request, service_yaml, wait_for, Collector, HttpResponse,
    Pki, Ports, Sink, GAME_JOIN, OTLP_GRPC_RECEIVER, SDK_AND_DEEPFLOW_RECEIVERS,
};

/// A Prometheus server with the remote-write receiver on, on a free loopback port.
struct Prometheus {
    child: Child,
    addr: String,
    port: u16,
    /// The client side when Prometheus serves TLS (its API as well as remote write).
    tls: Option<Arc<rustls::ClientConfig>>,
    _dir: tempfile::TempDir,
}

/// A TLS stream whose peer may close without `close_notify`: the end of the answer either way.
struct EofIsEnd<S>(S);

impl<S: Read> Read for EofIsEnd<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            r => r,
        }
    }
}

impl<S: Write> Write for EofIsEnd<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn prometheus_bin() -> PathBuf {
    let bin = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    match Command::new(&bin).arg("--version").output() {
        Ok(o) if o.status.success() => PathBuf::from(bin),
        _ => panic!(
            "the `prometheus` binary was not found ({bin}): install prometheus (see .ci/run: \
             apt-get install -y prometheus), or set PROMETHEUS_BIN"
        ),
    }
}

impl Prometheus {
    /// Starts Prometheus receiving remote write and scraping `scrape` (the `prometheus`
    /// exporter) every second with exemplar storage on, so it parses our OpenMetrics exemplars.
    fn start(scrape: &str) -> Prometheus {
        Prometheus::launch(scrape, None)
    }

    /// [`Prometheus::start`], serving TLS with `pki`'s `localhost` certificate and asking every
    /// client for a certificate signed by `pki`'s CA (its web config's `tls_server_config`).
    fn start_mtls(scrape: &str, pki: &Pki) -> Prometheus {
        Prometheus::launch(scrape, Some(pki))
    }

    fn launch(scrape: &str, mtls: Option<&Pki>) -> Prometheus {
        let bin = prometheus_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tailweave\n    \
                 static_configs:\n      - targets: ['{scrape}']\n"
            ),
        )
        .expect("write");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        let mut tls = None;
        if let Some(pki) = mtls {
            let web = dir.path().join("web.yml");
            std::fs::write(
                &web,
                format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  \
                     client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
                    pki.path("server.pem").display(),
                    pki.path("server.key").display(),
                    pki.path("ca.pem").display(),
                ),
            )
            .expect("write web config");
            cmd.arg(format!("--web.config.file={}", web.display()));
            let client = ClientTlsSettings {
                ca_file: Some(pki.path("ca.pem")),
                cert_file: Some(pki.path("client.pem")),
                key_file: Some(pki.path("client.key")),
                ..Default::default()
            };
            tls = Some(Arc::new(
                client.client_config(&[ALPN_HTTP1]).expect("client TLS"),
            ));
        }
        let child = cmd
            .arg("--web.enable-remote-write-receiver")
            .arg("--enable-feature=exemplar-storage")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg(format!("--config.file={}", cfg.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            child,
            addr,
            port,
            tls,
            _dir: dir,
        };
        wait_for("prometheus /-/ready", Duration::from_secs(60), || {
            match p.get("/-/ready") {
                Ok((200, _, _)) => Some(()),
                _ => None,
            }
        });
        p
    }

    /// A GET of its HTTP API, over TLS with a client certificate when it serves TLS.
    fn get(&self, path: &str) -> io::Result<HttpResponse> {
        let Some(cfg) = &self.tls else {
            return http_request(&self.addr, "GET", path, &[], &[]);
        };
        let tcp = TcpStream::connect(&self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let name = ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
        let s = EofIsEnd(rustls::StreamOwned::new(conn, tcp));
        http_exchange(s, &self.addr, "GET", path, &[], &[])
    }

    /// An instant query: `(labels, value)` per series of the result vector.
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (st, _, body) = self.get(&path).expect("query");
        let j: Json = serde_json::from_slice(&body).expect("json answer");
        assert_eq!(st, 200, "query {promql}: {j}");
        j["data"]["result"]
            .as_array()
            .expect("vector result")
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .expect("metric")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect();
                let v = r["value"][1]
                    .as_str()
                    .expect("value")
                    .parse()
                    .expect("float");
                (labels, v)
            })
            .collect()
    }

    fn scalar(&self, promql: &str) -> Option<f64> {
        self.query(promql).first().map(|(_, v)| *v)
    }

    /// The `trace_id` label of every stored exemplar of the series `promql` selects.
    fn exemplar_trace_ids(&self, promql: &str) -> Vec<String> {
        let path = format!(
            "/api/v1/query_exemplars?query={}&start=2000-01-01T00:00:00Z&end=2100-01-01T00:00:00Z",
            urlencode(promql)
        );
        let (st, _, body) = self.get(&path).expect("query");
        let j: Json = serde_json::from_slice(&body).expect("json answer");
        assert_eq!(st, 200, "exemplar query {promql}: {j}");
        j["data"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["labels"]["trace_id"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the spans sent predict, keyed like the `calls_total` series.
#[derive(Default, Debug)]
struct Truth {
    /// (service_name, span_name, span_kind, status_code) -> calls
    calls: BTreeMap<(String, String, String, String), u64>,
    /// Spans of at most 50 ms (the `le="50"` bucket).
    le_50ms: u64,
    spans: u64,
    /// Traces with an error span: the ones the sampler keeps.
    error_traces: HashSet<String>,
}

const KINDS: [&str; 6] = [
    "SPAN_KIND_UNSPECIFIED",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_CONSUMER",
];

fn truth_of(sent: &[ResourceSpans]) -> Truth {
    let mut t = Truth::default();
    for rs in sent {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            let code = s.status.as_ref().map_or(0, |st| st.code);
            let status = match code {
                1 => "STATUS_CODE_OK",
                2 => "STATUS_CODE_ERROR",
                _ => "STATUS_CODE_UNSET",
            };
            if code == 2 {
                t.error_traces.insert(hex(&s.trace_id));
            }
            let kind = KINDS.get(s.kind as usize).copied().unwrap_or(KINDS[0]);
            *t.calls
                .entry((service.clone(), s.name.clone(), kind.into(), status.into()))
                .or_default() += 1;
            let dur_ns = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano);
            if dur_ns <= 50_000_000 {
                t.le_50ms += 1;
            }
            t.spans += 1;
        }
    }
    t
}

fn config(prom: &Prometheus, sink: &Sink) -> String {
    format!(
        r#"
{OTLP_GRPC_RECEIVER}processors:
  span_metrics:
    histogram:
      explicit:
        buckets: [5ms, 50ms, 500ms]
  tail_sampling:
    decision_wait: 2s
    decision_wait_after_root: 200ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
  prometheus:
    endpoint: 127.0.0.1:{{EXTRA0}}
    const_labels: {{source: e2e}}
  prometheus_remote_write:
    endpoint: http://{prom}/api/v1/write
    push_interval: 500ms
    external_labels: {{cluster: e2e}}
    send_exemplars: true
{service}"#,
        sink = sink.endpoint(),
        prom = prom.addr,
        service = service_yaml(
            &["otlp"],
            &["span_metrics", "tail_sampling"],
            &["otlp", "prometheus", "prometheus_remote_write"],
        ),
    )
}

/// Sends the SDK spans of a seeded game workload; returns what was sent.
fn send_workload(c: &Collector, seed: u64) -> Vec<ResourceSpans> {
    let cfg = ScenarioConfig {
        scenario: ScenarioKind::Game,
        traces: 300,
        error_rate: 0.2,
        slow_rate: 0.1,
        ..Default::default()
    };
    let traces = generate(&cfg, seed);
    let sent: Vec<ResourceSpans> = traces.iter().flat_map(|t| t.sdk.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut client = TraceServiceClient::connect(c.grpc_endpoint())
            .await
            .expect("connect");
        for chunk in traces.chunks(20) {
            let req = ExportTraceServiceRequest {
                resource_spans: chunk.iter().flat_map(|t| t.sdk.clone()).collect(),
            };
            client.export(req).await.expect("export accepted");
        }
    });
    sent
}

#[test]
fn red_counts_in_a_real_prometheus_equal_the_ground_truth_and_exemplars_point_at_kept_traces() {
    let ports = Ports::new();
    let metrics_addr = format!("127.0.0.1:{}", ports.extra[0]);
    let prom = Prometheus::start(&metrics_addr);
    let sink = Sink::start_blocking();
    let mut c = Collector::start(&config(&prom, &sink), ports);
    let sent = send_workload(&c, 8);
    let truth = truth_of(&sent);
    assert!(
        truth.spans > 1000,
        "a workload worth measuring: {}",
        truth.spans
    );
    assert!(!truth.error_traces.is_empty(), "the workload has errors");

    // Every span is counted: the sampler's drops do not bias the metrics.
    let total = format!(
        "sum(traces_span_metrics_calls_total{{cluster=\"e2e\"}}) == {}",
        truth.spans
    );
    wait_for(
        "Prometheus to hold every span's count",
        Duration::from_secs(60),
        || prom.scalar(&total),
    );

    let got: BTreeMap<(String, String, String, String), u64> = prom
        .query("sum by (service_name, span_name, span_kind, status_code) (traces_span_metrics_calls_total{cluster=\"e2e\"})")
        .into_iter()
        .map(|(l, v)| {
            let g = |k: &str| l.get(k).cloned().unwrap_or_default();
            (
                (g("service_name"), g("span_name"), g("span_kind"), g("status_code")),
                v as u64,
            )
        })
        .collect();
    assert_eq!(
        got, truth.calls,
        "calls per service, operation, kind and status"
    );

    let errors: u64 = truth
        .calls
        .iter()
        .filter(|(k, _)| k.3 == "STATUS_CODE_ERROR")
        .map(|(_, v)| v)
        .sum();
    assert!(errors > 0);
    let got_errors = prom
        .scalar("sum(traces_span_metrics_calls_total{cluster=\"e2e\",status_code=\"STATUS_CODE_ERROR\"})")
        .expect("error series");
    assert_eq!(got_errors as u64, errors);
    let count = prom
        .scalar("sum(traces_span_metrics_duration_milliseconds_count{cluster=\"e2e\"})")
        .expect("histogram count");
    assert_eq!(count as u64, truth.spans);
    let le50 = prom
        .scalar("sum(traces_span_metrics_duration_milliseconds_bucket{cluster=\"e2e\",le=\"50\"})")
        .expect("le=50 bucket");
    assert_eq!(le50 as u64, truth.le_50ms);

    // The sampler kept only error traces; the exporter after it saw them and only them.
    let kept: HashSet<String> =
        wait_for("kept traces at the sink", Duration::from_secs(30), || {
            let ids: HashSet<String> = sink.spans().iter().map(|s| hex(&s.span.trace_id)).collect();
            (ids == truth.error_traces).then_some(ids)
        });
    assert!(
        sink.span_count() < truth.spans as usize,
        "the sampler dropped traces"
    );

    let exemplars = wait_for("exemplars on /metrics", Duration::from_secs(30), || {
        let (st, hdrs, body) = http_request(
            &metrics_addr,
            "GET",
            "/metrics",
            &[("Accept", "application/openmetrics-text; version=1.0.0")],
            &[],
        )
        .ok()?;
        assert_eq!(st, 200);
        assert!(hdrs
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/openmetrics-text")));
        let text = String::from_utf8_lossy(&body).into_owned();
        assert!(text.contains("source=\"e2e\""), "const label");
        let ids: Vec<String> = text
            .lines()
            .filter_map(|l| {
                l.split_once(" # {trace_id=\"")
                    .map(|(_, r)| r[..32].to_string())
            })
            .collect();
        (!ids.is_empty()).then_some(ids)
    });
    for id in &exemplars {
        assert!(kept.contains(id), "exemplar {id} is not a kept trace");
    }

    // The real Prometheus scraped the same counts and stored the exemplars it parsed.
    let scraped = format!(
        "sum(traces_span_metrics_calls_total{{job=\"tailweave\",source=\"e2e\"}}) == {}",
        truth.spans
    );
    wait_for("the scraped counts", Duration::from_secs(60), || {
        prom.scalar(&scraped)
    });
    let stored = wait_for(
        "exemplars stored by Prometheus",
        Duration::from_secs(60),
        || {
            let ids = prom.exemplar_trace_ids(
                "traces_span_metrics_duration_milliseconds_bucket{job=\"tailweave\"}",
            );
            (!ids.is_empty()).then_some(ids)
        },
    );
    for id in &stored {
        assert!(
            kept.contains(id),
            "stored exemplar {id} is not a kept trace"
        );
    }
    let pushed = wait_for(
        "exemplars pushed by remote write",
        Duration::from_secs(60),
        || {
            let ids = prom.exemplar_trace_ids(
                "traces_span_metrics_duration_milliseconds_bucket{cluster=\"e2e\"}",
            );
            (!ids.is_empty()).then_some(ids)
        },
    );
    for id in &pushed {
        assert!(
            kept.contains(id),
            "pushed exemplar {id} is not a kept trace"
        );
    }

    // A plain scrape gets the text format without exemplars.
    let (_, _, body) = http_request(&metrics_addr, "GET", "/metrics", &[], &[]).expect("scrape");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("# TYPE traces_span_metrics_calls_total counter"));
    assert!(!text.contains("trace_id="));

    assert!(c.terminate().success());
}

#[test]
fn ebpf_spans_of_joined_traces_give_red_series_per_service_and_protocol() {
    let ports = Ports::new();
    // Prometheus also scrapes tailweave's own telemetry here; only remote write is asserted.
    let prom = Prometheus::start(&format!("127.0.0.1:{}", ports.metrics));
    let yaml = format!(
        r#"
{SDK_AND_DEEPFLOW_RECEIVERS}processors:
{GAME_JOIN}  span_metrics:
exporters:
  prometheus_remote_write:
    endpoint: http://{prom}/api/v1/write
    push_interval: 500ms
    external_labels: {{cluster: joined}}
{service}"#,
        prom = prom.addr,
        service = service_yaml(
            &["otlp", "deepflow"],
            &["join", "span_metrics"],
            &["prometheus_remote_write"],
        ),
    );
    let mut c = Collector::start(&yaml, ports);
    let cfg = ScenarioConfig {
        scenario: ScenarioKind::Game,
        traces: 60,
        shuffle: false,
        clock_skew_ms: 0,
        ..Default::default()
    };
    let traces = generate(&cfg, 5);
    // The ground truth of the join: every span it emits, by service and source.
    let mut want: BTreeMap<(String, bool), u64> = BTreeMap::new();
    for t in &traces {
        for s in &t.truth.spans {
            let ebpf = s.source == tailweave_collector::loadgen::truth::Source::Ebpf;
            *want.entry((s.service.clone(), ebpf)).or_default() += 1;
        }
    }
    let total: u64 = want.values().sum();
    assert!(
        want.keys().any(|(_, ebpf)| *ebpf),
        "the workload has eBPF spans"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut sdk = TraceServiceClient::connect(c.grpc_endpoint())
            .await
            .expect("connect otlp");
        let mut df = TraceServiceClient::connect(format!("http://127.0.0.1:{}", ports.extra[0]))
            .await
            .expect("connect deepflow");
        for t in &traces {
            sdk.export(ExportTraceServiceRequest {
                resource_spans: t.sdk.clone(),
            })
            .await
            .expect("sdk export");
        }
        for t in &traces {
            df.export(ExportTraceServiceRequest {
                resource_spans: t.ebpf.clone(),
            })
            .await
            .expect("deepflow export");
        }
    });

    let q = format!("sum(traces_span_metrics_calls_total{{cluster=\"joined\"}}) == {total}");
    wait_for("every joined span counted", Duration::from_secs(90), || {
        prom.scalar(&q)
    });
    let by = |sel: &str| -> BTreeMap<String, u64> {
        prom.query(&format!(
            "sum by (service_name) (traces_span_metrics_calls_total{{cluster=\"joined\",{sel}}})"
        ))
        .into_iter()
        .map(|(l, v)| (l.get("service_name").cloned().unwrap_or_default(), v as u64))
        .collect()
    };
    let got_sdk = by("protocol=\"\"");
    let got_ebpf = by("protocol!=\"\"");
    let want_of = |ebpf: bool| -> BTreeMap<String, u64> {
        want.iter()
            .filter(|((_, e), _)| *e == ebpf)
            .map(|((s, _), n)| (s.clone(), *n))
            .collect()
    };
    assert_eq!(got_sdk, want_of(false), "SDK spans per service");
    assert_eq!(got_ebpf, want_of(true), "eBPF spans per service");
    // Uninstrumented services are keyed by their protocol.
    let protocols: HashSet<String> = prom
        .query("count by (protocol) (traces_span_metrics_calls_total{cluster=\"joined\",protocol!=\"\"})")
        .into_iter()
        .filter_map(|(l, _)| l.get("protocol").cloned())
        .collect();
    for p in ["MySQL", "Redis"] {
        assert!(protocols.contains(p), "{p} in {protocols:?}");
    }
    assert!(c.terminate().success());
}

#[test]
fn remote_write_over_mtls_reaches_a_real_prometheus_and_untrusted_or_anonymous_pushes_fail() {
    let ports = Ports::new();
    let (pki, other) = (Pki::new(), Pki::new());
    let prom = Prometheus::start_mtls(&format!("127.0.0.1:{}", ports.metrics), &pki);
    let url = format!("https://localhost:{}/api/v1/write", prom.port);
    let file = |p: &Pki, f: &str| p.path(f).display().to_string();
    let (ca, cert, key) = (
        file(&pki, "ca.pem"),
        file(&pki, "client.pem"),
        file(&pki, "client.key"),
    );
    // The same totals pushed three ways: with our client certificate (accepted), without one
    // (Prometheus refuses the handshake), and trusting another CA (we refuse Prometheus).
    let yaml = format!(
        r#"
{OTLP_GRPC_RECEIVER}processors:
  span_metrics:
exporters:
  prometheus_remote_write/mtls:
    endpoint: {url}
    push_interval: 500ms
    external_labels: {{cluster: mtls}}
    tls: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}
  prometheus_remote_write/anonymous:
    endpoint: {url}
    push_interval: 500ms
    external_labels: {{cluster: anonymous}}
    retry_on_failure: {{enabled: false}}
    tls: {{ca_file: {ca}}}
  prometheus_remote_write/untrusted:
    endpoint: {url}
    push_interval: 500ms
    external_labels: {{cluster: untrusted}}
    retry_on_failure: {{enabled: false}}
    tls: {{ca_file: {other_ca}, cert_file: {cert}, key_file: {key}}}
{service}"#,
        other_ca = file(&other, "ca.pem"),
        service = service_yaml(
            &["otlp"],
            &["span_metrics"],
            &[
                "prometheus_remote_write/mtls",
                "prometheus_remote_write/anonymous",
                "prometheus_remote_write/untrusted",
            ],
        ),
    );
    let mut c = Collector::start(&yaml, ports);
    let truth = truth_of(&send_workload(&c, 3));
    let total = format!(
        "sum(traces_span_metrics_calls_total{{cluster=\"mtls\"}}) == {}",
        truth.spans
    );
    wait_for(
        "every span counted in Prometheus over mTLS",
        Duration::from_secs(60),
        || prom.scalar(&total),
    );
    let errors: u64 = truth
        .calls
        .iter()
        .filter(|(k, _)| k.3 == "STATUS_CODE_ERROR")
        .map(|(_, v)| v)
        .sum();
    let got_errors = prom
        .scalar("sum(traces_span_metrics_calls_total{cluster=\"mtls\",status_code=\"STATUS_CODE_ERROR\"})")
        .expect("error series");
    assert_eq!(got_errors as u64, errors);

    for name in ["anonymous", "untrusted"] {
        let id = format!("prometheus_remote_write/{name}");
        wait_for(
            &format!("{id}'s pushes counted as failed"),
            Duration::from_secs(30),
            || (c.metric(PUSHES, &[("exporter", &id), ("outcome", "failed")]) >= 1.0).then_some(()),
        );
        assert_eq!(
            c.metric(PUSHES, &[("exporter", &id), ("outcome", "sent")]),
            0.0,
            "{id} delivered"
        );
    }
    let mtls_sent = c.metric(
        PUSHES,
        &[
            ("exporter", "prometheus_remote_write/mtls"),
            ("outcome", "sent"),
        ],
    );
    assert!(mtls_sent >= 1.0, "{mtls_sent}");
    assert!(
        prom.query("traces_span_metrics_calls_total{cluster=~\"anonymous|untrusted\"}")
            .is_empty(),
        "a push without a good certificate reached Prometheus"
    );
    // Prometheus's API itself wants a client certificate: a plain client gets no answer.
    assert!(http_request(&prom.addr, "GET", "/-/ready", &[], &[]).map_or(true, |r| r.0 != 200));
    assert!(c.terminate().success());
}
