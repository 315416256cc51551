//! The self-traffic feedback loop of `ebpf-spans.md` §9, for real: the `tailweave` binary with an
//! `otlp` and a `deepflow` receiver exports over `otlp` to a helper that plays the eBPF agent.
//! Every export call reaching the helper is answered OK and recorded as one DeepFlow row (client
//! = tailweave's pid and process, server port = the helper's, path = the OTLP export path), which
//! the helper sends back to tailweave's deepflow port at the next flush, one request per row as
//! DeepFlow's queues deal them. Each round the test sends one SDK request and the helper flushes.
//!
//! Without `self_filter` every export call begets a row that begets another call, so the spans
//! reaching the helper grow by one per round; with it none of those rows passes and the volume
//! stays at the input rate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tailweave_suite::{wait_for_async, Collector, Ports};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Spans in each round's SDK request.
const INPUT_SPANS: usize = 5;
const ROUNDS: usize = 6;

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}
fn s(k: &str, v: &str) -> KeyValue {
    kv(k, any_value::Value::StringValue(v.into()))
}
fn i(k: &str, v: i64) -> KeyValue {
    kv(k, any_value::Value::IntValue(v))
}

/// The host name tailweave derives for itself (`collector::service::self_info`), which is what an
/// agent on the same host reports as `df.universal_tag.host_0`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[derive(Default)]
struct AgentState {
    /// Rows recorded and not yet sent back.
    pending: Vec<ExportTraceServiceRequest>,
    calls: u64,
    spans: u64,
    /// Spans received that are rows this helper made (they passed tailweave's filter).
    echoes_received: u64,
    rows_made: u64,
}

/// The helper: an OTLP destination that plays the DeepFlow agent watching tailweave's exports.
#[derive(Clone)]
struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
    port: u16,
    tailweave_pid: Arc<Mutex<u32>>,
    host: String,
}

impl FakeAgent {
    /// One DeepFlow row (`ebpf-spans.md` §2-§3) for an Export call from tailweave to this helper:
    /// a `c-p` session row with a fake trace id, as a span without a header trace id arrives.
    fn row(&self, n: u64, pid: u32) -> ExportTraceServiceRequest {
        let row_id: u64 = (1_700_000_000u64 << 32) | (1 << 22) | n;
        let mut trace_id = row_id.to_be_bytes().to_vec();
        trace_id.extend_from_slice(&[0; 8]);
        let start = 1_700_000_000_000_000_000u64 + n * 1_000_000;
        let resource = Resource {
            attributes: vec![
                s("telemetry.sdk.name", "deepflow"),
                s("df.capture_info.signal_source", "eBPF"),
                s("df.capture_info.observation_point", "Client Process"),
                s("df.capture_info.agent", "agent-on-this-host"),
                s("df.application.l7_protocol", "gRPC"),
                s("df.network.ip_0", "127.0.0.1"),
                s("df.network.ip_1", "127.0.0.1"),
                i("df.transport.client_port", 40_000 + (n % 20_000) as i64),
                i("df.transport.server_port", i64::from(self.port)),
                i("df.transport.req_tcp_seq", 1000 + n as i64),
                i("df.transport.resp_tcp_seq", 2000 + n as i64),
                i("df.flow_info.id", row_id as i64),
                i("df.flow_info.flow_id", 500 + n as i64),
                i("process.pid_0", i64::from(pid)),
                s("thread.name_0", "tailweave"),
                s("df.universal_tag.host_0", &self.host),
                s("service.name", "tailweave"),
            ],
            ..Default::default()
        };
        let span = Span {
            trace_id,
            span_id: row_id.to_be_bytes().to_vec(),
            parent_span_id: row_id.to_be_bytes().to_vec(),
            name: "opentelemetry.proto.collector.trace.v1.TraceService/POST".into(),
            kind: 3,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 800_000,
            attributes: vec![
                s("df.span.type", "session"),
                s("df.span.endpoint", EXPORT_PATH),
                s("rpc.system", "grpc"),
                s(
                    "rpc.service",
                    "opentelemetry.proto.collector.trace.v1.TraceService",
                ),
                s("rpc.method", "Export"),
                i("net.peer.port", i64::from(self.port)),
                i("df.global.request_id", n as i64),
                i("df.span.syscall_trace_id_request", 9_000 + n as i64),
            ],
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn snapshot(&self) -> (u64, u64, u64) {
        let st = self.state.lock().unwrap();
        (st.calls, st.spans, st.echoes_received)
    }

    /// Sends every pending row to tailweave's deepflow port, one request each; returns how many.
    async fn flush(&self, deepflow: &mut TraceServiceClient<tonic::transport::Channel>) -> u64 {
        let rows = std::mem::take(&mut self.state.lock().unwrap().pending);
        let n = rows.len() as u64;
        for r in rows {
            deepflow
                .export(r)
                .await
                .expect("deepflow receiver takes the row");
        }
        n
    }
}

#[tonic::async_trait]
impl TraceService for FakeAgent {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let pid = *self.tailweave_pid.lock().unwrap();
        let mut st = self.state.lock().unwrap();
        st.calls += 1;
        for rs in &req.resource_spans {
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    st.spans += 1;
                    if sp.attributes.iter().any(|a| a.key == "df.span.type") {
                        st.echoes_received += 1;
                    }
                }
            }
        }
        // The call that just reached us, as the agent on tailweave's host records it.
        st.rows_made += 1;
        let n = st.rows_made;
        let row = self.row(n, pid);
        st.pending.push(row);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_agent() -> FakeAgent {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = FakeAgent {
        state: Arc::default(),
        port: l.local_addr().unwrap().port(),
        tailweave_pid: Arc::default(),
        host: host_name(),
    };
    let svc = TraceServiceServer::new(agent.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    agent
}

fn config(agent_port: u16, filter: bool) -> String {
    let (section, list) = if filter {
        ("processors:\n  self_filter:\n", "[self_filter]")
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
  deepflow:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{EXTRA0}}
{section}
exporters:
  otlp:
    endpoint: 127.0.0.1:{agent_port}
    tls:
      insecure: true
    retry_on_failure:
      enabled: false
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
      processors: {list}
      exporters: [otlp]
"#
    )
}

fn sdk_request(round: usize) -> ExportTraceServiceRequest {
    let spans = (0..INPUT_SPANS)
        .map(|k| Span {
            trace_id: [round as u8 + 1; 16].to_vec(),
            span_id: [(round * 16 + k + 1) as u8; 8].to_vec(),
            name: format!("GET /item/{k}"),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_100_000_000,
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![s("service.name", "shop")],
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

struct Run {
    /// Spans that reached the helper in each round.
    volume: Vec<u64>,
    /// Rows sent back to tailweave over the whole run.
    rows_sent: u64,
    echoes_passed: u64,
    dropped_own_process: f64,
    dropped_total: f64,
}

async fn run(filter: bool) -> Run {
    let agent = start_agent().await;
    let ports = Ports::new();
    let yaml = config(agent.port, filter);
    let c = tokio::task::spawn_blocking(move || Collector::start(&yaml, ports))
        .await
        .unwrap();
    let c = Arc::new(c);
    *agent.tailweave_pid.lock().unwrap() = c.child.id();
    let mut sdk = TraceServiceClient::connect(format!("http://127.0.0.1:{}", ports.grpc))
        .await
        .unwrap();
    let mut deepflow = TraceServiceClient::connect(format!("http://127.0.0.1:{}", ports.extra[0]))
        .await
        .unwrap();

    let dropped = |c: Arc<Collector>| async move {
        tokio::task::spawn_blocking(move || {
            c.metric("tailweave_self_filter_dropped_spans_total", &[])
        })
        .await
        .unwrap()
    };

    let mut volume = Vec::new();
    let mut sent_total = 0u64;
    let mut rows_sent = 0u64;
    let mut seen_before = 0u64;
    for round in 0..ROUNDS {
        let rows = agent.flush(&mut deepflow).await;
        rows_sent += rows;
        sdk.export(sdk_request(round)).await.unwrap();
        sent_total += rows + INPUT_SPANS as u64;
        // The round is over when every span tailweave took has reached the helper or was dropped.
        let (agent2, c2) = (agent.clone(), c.clone());
        let seen = wait_for_async("round settles", Duration::from_secs(30), || {
            let (agent, c) = (agent2.clone(), c2.clone());
            async move {
                let (_, spans, _) = agent.snapshot();
                let d = dropped(c).await as u64;
                (spans + d == sent_total).then_some(spans)
            }
        })
        .await;
        volume.push(seen - seen_before);
        seen_before = seen;
    }
    let (_, _, echoes_passed) = agent.snapshot();
    let c2 = c.clone();
    let (own, total) = tokio::task::spawn_blocking(move || {
        (
            c2.metric(
                "tailweave_self_filter_dropped_spans_total",
                &[("rule", "own_process")],
            ),
            c2.metric("tailweave_self_filter_dropped_spans_total", &[]),
        )
    })
    .await
    .unwrap();
    Run {
        volume,
        rows_sent,
        echoes_passed,
        dropped_own_process: own,
        dropped_total: total,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_filter_the_loop_grows_round_after_round() {
    let r = run(false).await;
    // Round 1 carries the input; each later round also carries one row per export call of the
    // round before, and each of those calls begets a row of its own: one more span per round.
    let expected: Vec<u64> = (0..ROUNDS as u64).map(|k| INPUT_SPANS as u64 + k).collect();
    assert_eq!(r.volume, expected, "spans reaching the helper per round");
    assert!(r.volume.windows(2).all(|w| w[1] > w[0]));
    assert_eq!(r.echoes_passed, r.rows_sent, "every row came back out");
    assert_eq!(r.dropped_total, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_filter_the_volume_stays_at_the_input_rate() {
    let r = run(true).await;
    assert_eq!(r.volume, vec![INPUT_SPANS as u64; ROUNDS]);
    assert_eq!(
        r.echoes_passed, 0,
        "no row describing tailweave's own call passed"
    );
    // One export call per round, so one row per round, all but the last sent back and dropped.
    assert_eq!(r.rows_sent, ROUNDS as u64 - 1);
    assert_eq!(r.dropped_total, r.rows_sent as f64);
    assert_eq!(
        r.dropped_own_process, r.rows_sent as f64,
        "dropped as tailweave's own process"
    );
}
