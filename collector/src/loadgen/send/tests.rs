use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use super::*;
use crate::loadgen::scenario::{generate, span_count, ScenarioConfig};
use tailweave_core::proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use tailweave_core::proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest,
};

/// What the in-process collector saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    spans: u64,
    /// trace id -> request numbers that carried its spans
    requests_of_trace: HashMap<Vec<u8>, HashSet<u64>>,
    peers: HashSet<SocketAddr>,
    ebpf_headers: u64,
    auth_headers: u64,
    gzip_requests: u64,
}

/// Answers the first `refuse_first` requests with `refuse_code`, then accepts, rejecting
/// `reject_per_request` spans of each through partial success.
struct Sink {
    seen: Arc<Mutex<Seen>>,
    refuse_first: u64,
    refuse_code: tonic::Code,
    reject_per_request: i64,
    calls: AtomicU64,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.refuse_first {
            return Err(tonic::Status::new(self.refuse_code, "busy"));
        }
        let peer = request.remote_addr();
        let ebpf = request.metadata().get(EBPF_SOURCE_HEADER.0).is_some();
        let gzip = request
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            == Some("gzip");
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some("Bearer t0k");
        let req = request.into_inner();
        let mut seen = self.seen.lock().unwrap();
        seen.requests += 1;
        let nr = seen.requests;
        if let Some(p) = peer {
            seen.peers.insert(p);
        }
        if ebpf {
            seen.ebpf_headers += 1;
        }
        if auth {
            seen.auth_headers += 1;
        }
        if gzip {
            seen.gzip_requests += 1;
        }
        for rs in &req.resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    seen.spans += 1;
                    seen.requests_of_trace
                        .entry(s.trace_id.clone())
                        .or_default()
                        .insert(nr);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: (self.reject_per_request > 0).then(|| ExportTracePartialSuccess {
                rejected_spans: self.reject_per_request,
                error_message: "rejected some".to_string(),
            }),
        }))
    }
}

async fn serve(sink: Sink) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let h = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                TraceServiceServer::new(sink)
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (format!("http://{addr}"), h)
}

fn sink(seen: &Arc<Mutex<Seen>>) -> Sink {
    Sink {
        seen: seen.clone(),
        refuse_first: 0,
        refuse_code: tonic::Code::Unavailable,
        reject_per_request: 0,
        calls: AtomicU64::new(0),
    }
}

fn cfg(endpoint: &str) -> SendConfig {
    SendConfig {
        endpoint: endpoint.to_string(),
        connections: 3,
        batch_size: 8,
        retry_initial_backoff: Duration::from_millis(1),
        retry_max_backoff: Duration::from_millis(5),
        sdk_flush_interval: Duration::from_millis(5),
        ebpf_flush_interval: Duration::from_millis(5),
        ..SendConfig::default()
    }
}

fn traces(n: usize) -> Vec<GeneratedTrace> {
    generate(
        &ScenarioConfig {
            traces: n,
            ebpf_delay_ms: 20,
            ..ScenarioConfig::default()
        },
        5,
    )
}

#[tokio::test]
async fn every_span_arrives_over_several_connections_and_requests() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let ts = traces(40);
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let ids: Vec<Vec<u8>> = ts
        .iter()
        .map(|t| tailweave_core::span::unhex(&t.truth.trace_id).unwrap())
        .collect();
    let mut truth_lines = 0;
    let c = SendConfig {
        headers: vec![("authorization".to_string(), "Bearer t0k".to_string())],
        ..cfg(&ep)
    };
    let s = send(
        &c,
        ts,
        |_| {
            truth_lines += 1;
            Ok(())
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(truth_lines, 40);
    assert_eq!(s.traces, 40);
    assert_eq!(s.sdk_spans + s.ebpf_spans, total);
    assert_eq!(
        (s.spans_sent, s.accepted, s.refused, s.failed),
        (total, total, 0, 0)
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.spans, total);
    assert_eq!(seen.requests, s.requests);
    assert!(
        seen.peers.len() >= 2,
        "one connection only: {:?}",
        seen.peers
    );
    assert!(seen.ebpf_headers > 0 && seen.ebpf_headers < seen.requests);
    assert_eq!(seen.auth_headers, seen.requests);
    assert_eq!(seen.gzip_requests, 0);
    // Every trace's spans came in more than one request.
    for id in &ids {
        assert!(seen.requests_of_trace[id].len() > 1);
    }
    server.abort();
}

#[tokio::test]
async fn count_stops_an_endless_stream() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let gen = crate::loadgen::scenario::Generator::new(
        ScenarioConfig {
            scenario: crate::loadgen::scenario::ScenarioKind::Sdk,
            ..ScenarioConfig::default()
        },
        1,
    );
    let c = SendConfig {
        count: Some(25),
        ..cfg(&ep)
    };
    let s = send(&c, gen, |_| Ok(()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.traces, 25);
    assert_eq!(s.accepted, 250);
    assert_eq!(seen.lock().unwrap().spans, 250);
    server.abort();
}

#[tokio::test]
async fn refused_requests_are_retried_then_accepted() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(Sink {
        refuse_first: 3,
        ..sink(&seen)
    })
    .await;
    let ts = traces(10);
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let s = send(&cfg(&ep), ts, |_| Ok(()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.retries, 3);
    assert_eq!((s.accepted, s.refused), (total, 0));
    assert_eq!(seen.lock().unwrap().spans, total);
    server.abort();
}

#[tokio::test]
async fn refusals_beyond_the_retry_bound_and_partial_success_are_counted_refused() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(Sink {
        refuse_first: u64::MAX,
        refuse_code: tonic::Code::ResourceExhausted,
        ..sink(&seen)
    })
    .await;
    let ts = traces(5);
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let c = SendConfig {
        max_retries: 2,
        ..cfg(&ep)
    };
    let s = send(&c, ts, |_| Ok(()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((s.accepted, s.refused, s.failed), (0, total, 0));
    // Each batch: one try and two retries.
    assert_eq!(s.requests, 3 * (s.requests - s.retries));
    server.abort();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(Sink {
        reject_per_request: 1,
        ..sink(&seen)
    })
    .await;
    let ts = traces(5);
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let s = send(&cfg(&ep), ts, |_| Ok(()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(s.refused, s.requests);
    assert_eq!(s.accepted, total - s.requests);
    server.abort();
}

#[tokio::test]
async fn a_stopped_run_still_delivers_what_it_holds() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let ts = generate(
        &ScenarioConfig {
            traces: 5,
            // Far beyond the test's patience: the stop must release the rows at once.
            ebpf_delay_ms: 3_600_000,
            ..ScenarioConfig::default()
        },
        2,
    );
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    let mut n = 0;
    let s = send(
        &cfg(&ep),
        ts,
        move |_| {
            n += 1;
            if n == 5 {
                stopper.cancel();
            }
            Ok(())
        },
        stop,
    )
    .await
    .unwrap();
    assert_eq!(s.traces, 5);
    assert_eq!(s.accepted, total);
    server.abort();
}

/// An OTLP/HTTP endpoint that answers its first request 503 and counts the spans of the rest
/// (gunzipping bodies marked gzip) and the gzipped requests.
async fn http_sink() -> (
    String,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(AtomicU64::new(0));
    let gzipped = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (sp, gz) = (spans.clone(), gzipped.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (sp, gz, ca) = (sp.clone(), gz.clone(), calls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (sp, gz, ca) = (sp.clone(), gz.clone(), ca.clone());
                    async move {
                        let n = ca.fetch_add(1, Ordering::SeqCst);
                        let ok_path = req.uri().path() == "/v1/traces"
                            && req.headers().get("content-type").map(|v| v.as_bytes())
                                == Some(b"application/x-protobuf".as_slice());
                        let gzip = req.headers().get("content-encoding").map(|v| v.as_bytes())
                            == Some(b"gzip".as_slice());
                        let mut body = req.into_body().collect().await.unwrap().to_bytes();
                        if gzip {
                            use std::io::Read;
                            let mut out = Vec::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_end(&mut out)
                                .unwrap();
                            body = Bytes::from(out);
                        }
                        let status = if !ok_path {
                            400
                        } else if n == 0 {
                            503
                        } else {
                            let r = ExportTraceServiceRequest::decode(body).unwrap();
                            sp.fetch_add(span_count(&r.resource_spans) as u64, Ordering::SeqCst);
                            gz.fetch_add(gzip as u64, Ordering::SeqCst);
                            200
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("retry-after", "0")
                                .body(Full::new(Bytes::from(
                                    ExportTraceServiceResponse::default().encode_to_vec(),
                                )))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("{addr}"), spans, gzipped, server)
}

#[tokio::test]
async fn http_protocol_posts_protobuf_and_retries_503() {
    for compression in [Compression::None, Compression::Gzip] {
        let (addr, spans, gzipped, server) = http_sink().await;
        let ts = traces(8);
        let total: u64 = ts
            .iter()
            .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
            .sum();
        let c = SendConfig {
            protocol: Protocol::Http,
            endpoint: addr,
            compression,
            ..cfg("")
        };
        let s = send(&c, ts, |_| Ok(()), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            (s.accepted, s.refused, s.failed, s.retries),
            (total, 0, 0, 1)
        );
        assert_eq!(spans.load(Ordering::SeqCst), total);
        // Every accepted request (all but the refused first one) was gzipped, or none was.
        let want = if compression == Compression::Gzip {
            s.requests - 1
        } else {
            0
        };
        assert_eq!(gzipped.load(Ordering::SeqCst), want);
        server.abort();
    }
}

#[tokio::test]
async fn grpc_gzip_reaches_a_collector_that_accepts_it() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let ts = traces(6);
    let total: u64 = ts
        .iter()
        .map(|t| (t.sdk_span_count() + t.ebpf_span_count()) as u64)
        .sum();
    let c = SendConfig {
        compression: Compression::Gzip,
        ..cfg(&ep)
    };
    let s = send(&c, ts, |_| Ok(()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((s.accepted, s.failed), (total, 0));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.spans, total);
    assert_eq!(seen.gzip_requests, seen.requests);
    server.abort();
}

#[test]
fn endpoints_are_checked_and_completed() {
    assert!(matches!(
        Target::parse(Protocol::Http, "127.0.0.1:4318").unwrap(),
        Target::Http(u) if u == "http://127.0.0.1:4318/v1/traces"
    ));
    assert!(matches!(
        Target::parse(Protocol::Http, "http://h:1/custom").unwrap(),
        Target::Http(u) if u.path() == "/custom"
    ));
    assert!(matches!(
        Target::parse(Protocol::Grpc, "localhost:4317").unwrap(),
        Target::Grpc(u) if u == "http://localhost:4317"
    ));
    assert!(Target::parse(Protocol::Grpc, "http://").is_err());
}

#[tokio::test]
async fn backoff_doubles_within_bounds_and_honours_retry_after() {
    let mut w = Worker {
        client: Client::new(
            &Target::Grpc("http://127.0.0.1:1".to_string()),
            &[],
            Duration::from_secs(1),
            Compression::None,
        )
        .unwrap_or_else(|_| unreachable!()),
        counters: Arc::default(),
        max_retries: 5,
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        rng: Rng::new(3),
    };
    for attempt in 0..8 {
        let base = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
        let d = w.backoff(attempt, None);
        assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?}");
    }
    assert_eq!(
        w.backoff(0, Some(Duration::from_secs(1))),
        Duration::from_secs(1)
    );
    assert_eq!(
        w.backoff(0, Some(Duration::from_secs(60))),
        Duration::from_secs(2)
    );
}

#[tokio::test]
async fn a_malformed_header_is_an_error_before_anything_is_sent() {
    for protocol in [Protocol::Grpc, Protocol::Http] {
        let c = SendConfig {
            protocol,
            headers: vec![("bad header".to_string(), "x".to_string())],
            ..cfg("127.0.0.1:1")
        };
        let r = send(&c, traces(1), |_| Ok(()), CancellationToken::new()).await;
        assert!(matches!(r, Err(SendError::Header { .. })), "{protocol:?}");
    }
}

#[tokio::test]
async fn the_command_writes_truth_and_summary_files() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::loadgen::LoadgenArgs,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let dir = std::env::temp_dir().join(format!("tailweave-loadgen-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (truth, summary) = (dir.join("truth.jsonl"), dir.join("summary.json"));
    let args = Cli::parse_from([
        "loadgen",
        "--endpoint",
        &ep,
        "--count",
        "12",
        "--rate",
        "0",
        "--ebpf-delay",
        "10ms",
        "--truth",
        truth.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
    ])
    .args;
    crate::loadgen::run(args).await.unwrap();
    let t = crate::loadgen::truth::read_truth(&truth).unwrap();
    assert_eq!(t.len(), 12);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["traces"], 12);
    assert_eq!(s["accepted"], seen.lock().unwrap().spans);
    assert_eq!(s["refused"], 0);
    // Every truth trace id arrived.
    for tr in &t {
        let id = tailweave_core::span::unhex(&tr.trace_id).unwrap();
        assert!(seen.lock().unwrap().requests_of_trace.contains_key(&id));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    server.abort();
}

#[tokio::test]
async fn the_command_replays_with_distinct_trace_ids() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::loadgen::LoadgenArgs,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ep, server) = serve(sink(&seen)).await;
    let dir = std::env::temp_dir().join(format!("tailweave-loadgen-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (truth, summary) = (dir.join("truth.jsonl"), dir.join("summary.json"));
    let args = Cli::parse_from([
        "loadgen",
        "--endpoint",
        &ep,
        "--scenario",
        "sdk",
        "--replay-pool",
        "4",
        "--count",
        "12",
        "--rate",
        "0",
        "--ebpf-delay",
        "10ms",
        "--truth",
        truth.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
    ])
    .args;
    crate::loadgen::run(args).await.unwrap();
    let t = crate::loadgen::truth::read_truth(&truth).unwrap();
    assert_eq!(t.len(), 12);
    let ids: HashSet<&str> = t.iter().map(|x| x.trace_id.as_str()).collect();
    assert_eq!(ids.len(), 12);
    assert_eq!(seen.lock().unwrap().spans, 120);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["traces"], 12);
    assert_eq!(s["accepted"], seen.lock().unwrap().spans);
    assert_eq!(s["refused"], 0);
    // Every truth trace id arrived.
    for tr in &t {
        let id = tailweave_core::span::unhex(&tr.trace_id).unwrap();
        assert!(seen.lock().unwrap().requests_of_trace.contains_key(&id));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    server.abort();
}
