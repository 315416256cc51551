//! Reliability of the real `tailweave` binary (issue 7): an exporter outage, `kill -9` with the
//! persistent sending queue and restart-safe tail sampling, and overload under a memory budget.
//!
//! The outage and `kill -9` senders are a tonic client that numbers every span (span id =
//! trace number << 20 | index), so "accepted" (an OK answer with nothing rejected) and
//! "delivered" (seen by the sink) are sets that can be compared span by span. The overload is
//! driven by `tailweave loadgen`, whose counts (accepted, refused, failed) are compared with the
//! distinct spans the sink saw. Each test prints its numbers on `reliability:` lines.
//!
//! Durations are the issue's by default: a 60 s outage (`TAILWEAVE_OUTAGE_SECS`) and 60 s of
//! load at ten times the capacity measured first (`TAILWEAVE_OVERLOAD_SECS`,
//! `TAILWEAVE_OVERLOAD_FACTOR`, `TAILWEAVE_CALIBRATE_SECS`, default 12 s). The whole file takes
//! 1.5 to 3 minutes on two cores (the three tests overlap; the overload waits up to 60 s for the
//! collector to accept again).
//!
//! The memory budget reads RSS and the live heap (the binary's counting allocator): RSS alone
//! stays above the soft limit after an overload because allocators keep freed pages, and a limiter
//! on RSS alone refused for good afterwards (seen: 12 s, 55 s, more than 60 s); this test's
//! "serves normally afterwards" check is what caught it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use tailweave_suite::{
    http_request, metric_sum, tailweave_bin, wait_for_async, Collector, Ports, Sink, SinkMode,
};
use tonic::transport::Channel;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// The id of span `i` (from 1) of trace `no`.
fn span_id(no: u64, i: u64) -> u64 {
    (no << 20) | i
}

/// The trace a numbered span belongs to.
fn trace_of(id: u64) -> u64 {
    id >> 20
}

/// Spans `range` of trace `no` (span 1 is the root, the others its children); span `error_at`
/// has status ERROR.
fn spans(no: u64, range: std::ops::Range<u64>, error_at: Option<u64>) -> Vec<Span> {
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&no.to_be_bytes());
    trace_id[8..].copy_from_slice(&0x7461_696c_7765_6176u64.to_be_bytes());
    range
        .map(|i| {
            let id = span_id(no, i);
            Span {
                trace_id: trace_id.to_vec(),
                span_id: id.to_be_bytes().to_vec(),
                parent_span_id: if i == 1 {
                    vec![]
                } else {
                    span_id(no, 1).to_be_bytes().to_vec()
                },
                name: format!("GET /item/{}", i % 17),
                kind: 2,
                start_time_unix_nano: 1_700_000_000_000_000_000 + id,
                end_time_unix_nano: 1_700_000_000_001_000_000 + id,
                attributes: vec![kv("http.method", "GET"), kv("http.route", "/item/:id")],
                status: (error_at == Some(i)).then(|| Status {
                    code: 2,
                    message: "declined".into(),
                }),
                ..Default::default()
            }
        })
        .collect()
}

fn request_of(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "reliability")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "reliability".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Request `no` with `n` spans: one whole trace, span ids `no << 20 | i + 1`.
fn request(no: u64, n: usize) -> ExportTraceServiceRequest {
    request_of(spans(no, 1..n as u64 + 1, None))
}

/// What a sender saw.
#[derive(Debug, Default)]
struct Tally {
    /// Span ids answered OK.
    accepted: Vec<u64>,
    /// Span ids of requests not answered OK: refused, or cut off without an answer. Only a
    /// refusal the server sent is known not to be in the pipeline; after a `kill -9` a cut
    /// request may have been taken.
    not_ok: Vec<u64>,
    /// Spans refused with a retryable code, by code.
    refused: HashMap<String, u64>,
    /// Requests that failed without an answer (connection refused or cut).
    failed_requests: u64,
}

impl Tally {
    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
    fn merge(&mut self, o: Tally) {
        self.accepted.extend(o.accepted);
        self.not_ok.extend(o.not_ok);
        for (k, v) in o.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.failed_requests += o.failed_requests;
    }
}

async fn client(endpoint: &str) -> TraceServiceClient<Channel> {
    let ch = Channel::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect_lazy();
    TraceServiceClient::new(ch).max_decoding_message_size(16 << 20)
}

/// Sends `req` once and records the outcome of its spans.
async fn send_req(
    c: &mut TraceServiceClient<Channel>,
    req: ExportTraceServiceRequest,
    t: &mut Tally,
) {
    let ids: Vec<u64> = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| u64::from_be_bytes(s.span_id.as_slice().try_into().expect("8-byte id")))
        .collect();
    let n = ids.len() as u64;
    match tokio::time::timeout(Duration::from_secs(30), c.export(req)).await {
        Ok(Ok(resp)) => {
            let rejected = resp
                .into_inner()
                .partial_success
                .map(|p| p.rejected_spans)
                .unwrap_or(0);
            assert_eq!(rejected, 0, "valid spans were rejected");
            t.accepted.extend(ids);
        }
        Ok(Err(status)) => {
            match status.code() {
                tonic::Code::ResourceExhausted | tonic::Code::Unavailable => {
                    *t.refused.entry(format!("{:?}", status.code())).or_default() += n;
                }
                // The connection died under the request (kill -9): the client does not know.
                tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal => {
                    t.failed_requests += 1
                }
                other => panic!("unexpected answer {other:?}: {}", status.message()),
            }
            t.not_ok.extend(ids);
        }
        Err(_) => {
            t.failed_requests += 1;
            t.not_ok.extend(ids);
        }
    }
}

/// Sends request `no` (one trace of `n` spans) once and records the outcome.
async fn send(c: &mut TraceServiceClient<Channel>, no: u64, n: usize, t: &mut Tally) {
    send_req(c, request(no, n), t).await
}

/// How often the sink received each (numbered) span id.
fn delivered(sink: &Sink) -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    for s in sink.spans() {
        let id = u64::from_be_bytes(s.span.span_id.as_slice().try_into().expect("8-byte id"));
        *out.entry(id).or_default() += 1;
    }
    out
}

fn missing(accepted: &[u64], got: &HashMap<u64, u32>) -> usize {
    accepted.iter().filter(|id| !got.contains_key(id)).count()
}

/// Waits (bounded) until every accepted span reached the sink. With `c`, first waits for the
/// exporter's sent counter to reach their number, which is cheaper to poll than the sink's copy
/// of everything it received.
async fn all_delivered(
    c: Option<&Collector>,
    sink: &Sink,
    accepted: &[u64],
    within: Duration,
) -> HashMap<u64, u32> {
    if let Some(c) = c {
        let want = accepted.len() as f64;
        wait_for_async("the exporter to send every accepted span", within, || {
            let sent = c.metric("tailweave_exporter_sent_spans_total", &[]);
            async move { (sent >= want).then_some(()) }
        })
        .await;
    }
    let sink2 = sink.clone();
    wait_for_async("every accepted span at the sink", within, || {
        let got = delivered(&sink2);
        let ok = missing(accepted, &got) == 0;
        async move { ok.then_some(()) }
    })
    .await;
    delivered(sink)
}

/// `VmHWM` (peak RSS) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM")
}

fn start(yaml: &str) -> Collector {
    tokio::task::block_in_place(|| Collector::start(yaml, Ports::new()))
}

fn config(sink: &Sink, service: &str, queue: &str) -> String {
    config_with(sink, service, queue, "", "")
}

/// A gRPC receiver to one `otlp` exporter at the sink; `processors` is the body of the
/// `processors:` section and `chain` the pipeline's processor list (both may be empty).
fn config_with(sink: &Sink, service: &str, queue: &str, processors: &str, chain: &str) -> String {
    let processors = if processors.is_empty() {
        String::new()
    } else {
        format!("processors:\n{processors}\n")
    };
    let chain = if chain.is_empty() {
        String::new()
    } else {
        format!("      processors: [{chain}]\n")
    };
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
{processors}exporters:
  otlp:
    endpoint: {sink}
    tls: {{insecure: true}}
    compression: none
    retry_on_failure: {{initial_interval: 100ms, max_interval: 1s, max_elapsed_time: 600s}}
    sending_queue: {queue}
extensions:
  health_check:
    endpoint: 127.0.0.1:{{HEALTH}}
service:
  extensions: [health_check]
  telemetry:
    metrics:
      address: 127.0.0.1:{{METRICS}}
{service}
  pipelines:
    traces:
      receivers: [otlp]
{chain}      exporters: [otlp]
"#,
        sink = sink.endpoint()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_every_accepted_span_is_delivered_once_after_recovery() {
    let outage = env_secs("TAILWEAVE_OUTAGE_SECS", 60);
    let sink = Sink::start().await;
    sink.set_mode(SinkMode::Unavailable);
    let c = start(&config(&sink, "", "{num_consumers: 4, queue_size: 100000}"));
    let mut cl = client(&c.grpc_endpoint()).await;
    let mut t = Tally::default();
    let started = Instant::now();
    let mut no = 0;
    // A steady 10 requests of 100 spans a second while the destination is down.
    while started.elapsed() < outage {
        no += 1;
        send(&mut cl, no, 100, &mut t).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls_during_outage = sink.calls();
    assert!(calls_during_outage > 0, "the exporter never tried");
    assert_eq!(sink.span_count(), 0);
    let retries = c.metric("tailweave_exporter_retries_total", &[("exporter", "otlp")]);
    sink.set_mode(SinkMode::Accept);
    let recovered = Instant::now();
    let got = all_delivered(Some(&c), &sink, &t.accepted, Duration::from_secs(120)).await;
    let drain = recovered.elapsed();
    let dups = got.values().filter(|&&n| n > 1).count();
    eprintln!(
        "reliability: outage {}s: accepted {} spans ({} requests) during the outage, refused {}, \
         delivered {} distinct after recovery, duplicates {dups}, exporter attempts refused by the \
         destination {calls_during_outage}, retries {retries}, all delivered {:.1}s after recovery",
        outage.as_secs(),
        t.accepted.len(),
        no,
        t.refused_total(),
        got.len(),
        drain.as_secs_f64(),
    );
    assert_eq!(t.refused_total(), 0, "{:?}", t.refused);
    // Exactly once: nothing twice, nothing that was not accepted.
    assert_eq!(dups, 0);
    assert_eq!(got.len(), t.accepted.len());
    assert_eq!(
        c.metric("tailweave_exporter_send_failed_spans_total", &[]),
        0.0
    );
}

/// Spans per trace in the `kill -9` test, sent in two halves `KILL_LAG` requests apart.
const KILL_TRACE_SPANS: u64 = 100;
/// Requests between the first and the second half of a trace: at one request per 20-40 ms,
/// more than the sampler's 1 s decision wait, so the second half comes after the decision on
/// the first and must follow it.
const KILL_LAG: u64 = 60;

/// Where trace `no` of the `kill -9` test has its ERROR span: in the first half (the sampler
/// keeps the trace), in the second (the decision on the first half drops the trace, and the
/// late half must be dropped too), or nowhere (dropped).
fn kill_error_at(no: u64) -> Option<u64> {
    match no % 3 {
        0 => Some(KILL_TRACE_SPANS),
        1 => Some(2),
        _ => None,
    }
}

/// Spans of the second half of trace `no`.
fn kill_second_half(no: u64) -> Vec<Span> {
    let half = KILL_TRACE_SPANS / 2;
    spans(
        no,
        half + 1..KILL_TRACE_SPANS + 1,
        kill_error_at(no).filter(|&i| i > half),
    )
}

/// Request `k` of the `kill -9` sender: the first half of trace `k` and the second half of
/// trace `k - KILL_LAG`.
fn kill_request(k: u64) -> ExportTraceServiceRequest {
    let half = KILL_TRACE_SPANS / 2;
    let mut s = spans(k, 1..half + 1, kill_error_at(k).filter(|&i| i <= half));
    if k > KILL_LAG {
        s.extend(kill_second_half(k - KILL_LAG));
    }
    request_of(s)
}

/// The second halves the `kill -9` sender had not sent when it stopped after request `last`,
/// ten traces to a request.
fn kill_remaining(last: u64) -> Vec<ExportTraceServiceRequest> {
    let first = last.saturating_sub(KILL_LAG) + 1;
    let traces: Vec<u64> = (first..=last).collect();
    traces
        .chunks(10)
        .map(|chunk| request_of(chunk.iter().flat_map(|&no| kill_second_half(no)).collect()))
        .collect()
}

/// Traces of the `kill -9` test by what reached the sink.
#[derive(Debug, Default)]
struct Verdict {
    /// Traces with spans at the sink.
    kept: usize,
    /// Traces with none.
    dropped: usize,
    /// Kept traces missing some of their accepted spans.
    partial: usize,
    /// Traces the policy keeps (an error in an accepted first half) with nothing at the sink.
    lost: usize,
    /// Traces without an error with spans at the sink.
    wrongly_kept: usize,
    /// Spans at the sink that were never sent.
    invented: usize,
}

/// Judges the sink's spans against what the sender saw. A span of a request cut by the kill
/// may or may not have been taken, so it may arrive but need not. `before_kill` is how long
/// before the kill each trace's first half was answered. With `tell`, prints each bad trace.
///
/// No window is excused: a first half answered OK is in the sampler's log whenever the kill
/// came (the receiver waited for it), and kept spans stay in that log until the disk queue has
/// them.
fn judge(
    t: &Tally,
    got: &HashMap<u64, u32>,
    before_kill: &HashMap<u64, Duration>,
    tell: bool,
) -> Verdict {
    let accepted: HashSet<u64> = t.accepted.iter().copied().collect();
    let unknown: HashSet<u64> = t.not_ok.iter().copied().collect();
    let mut traces: HashMap<u64, (Vec<u64>, HashSet<u64>)> = HashMap::new();
    for &id in &accepted {
        traces.entry(trace_of(id)).or_default().0.push(id);
    }
    let mut v = Verdict::default();
    for &id in got.keys() {
        if !accepted.contains(&id) && !unknown.contains(&id) {
            v.invented += 1;
        }
        traces.entry(trace_of(id)).or_default().1.insert(id);
    }
    for (no, (acc, del)) in &traces {
        if del.is_empty() {
            v.dropped += 1;
            // An error in an accepted first half keeps the trace, whatever its second half.
            if kill_error_at(*no) == Some(2) && acc.contains(&span_id(*no, 2)) {
                // Answered OK means in the sampler's log (end-to-end acknowledgement): no
                // window here.
                v.lost += 1;
                if tell {
                    eprintln!(
                        "trace {no}: error in its accepted first half, nothing delivered \
                         (first half answered {:?} before the kill)",
                        before_kill.get(no)
                    );
                }
            }
            continue;
        }
        v.kept += 1;
        if kill_error_at(*no).is_none() {
            v.wrongly_kept += 1;
            if tell {
                eprintln!("trace {no}: no error, {} spans delivered", del.len());
            }
        }
        let acc_delivered = acc.iter().filter(|id| del.contains(id)).count();
        if acc_delivered != acc.len() {
            // Decided twice differently (a late half decided afresh), or spans lost.
            v.partial += 1;
            if tell {
                eprintln!(
                    "trace {no}: kept with {acc_delivered} of its {} accepted spans (first half \
                     answered {:?} before the kill)",
                    acc.len(),
                    before_kill.get(no)
                );
            }
        }
    }
    v
}

/// What the sampler's "state restored" log line says (`spans=N decisions=M`), without the
/// terminal colours.
fn restore_line(log: &str) -> String {
    let Some(line) = log
        .lines()
        .find(|l| l.contains("tail_sampling state restored"))
    else {
        return "nothing (no restore line)".into();
    };
    let mut plain = String::new();
    let mut in_escape = false;
    for ch in line.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (false, c) => plain.push(c),
            _ => {}
        }
    }
    plain
        .split_whitespace()
        .filter(|w| w.starts_with("spans=") || w.starts_with("decisions="))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_the_persistent_queue_and_sampling_log_loses_nothing_accepted() {
    let qdir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let queue = format!(
        "{{storage: file, directory: {}, max_size_mib: 512, num_consumers: 4}}",
        qdir.path().join("queue").display()
    );
    // Keep the traces with an error; decide 1 s after a trace's first span.
    // `TAILWEAVE_SAMPLING_STORAGE=none` shows what the log is for: the test then fails (traces
    // lost with the undecided state, late halves decided afresh).
    let storage = std::env::var("TAILWEAVE_SAMPLING_STORAGE").unwrap_or_else(|_| "file".into());
    let sampling = format!(
        "  tail_sampling:\n    decision_wait: 1s\n    decision_wait_after_root: 0s\n    storage: {storage}\n    \
         directory: {}\n    policies: [{{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}]",
        qdir.path().join("sampling").display()
    );
    let yaml = config_with(&sink, "", &queue, &sampling, "tail_sampling");
    let mut c = start(&yaml);

    // Steady load from its own task, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let answered = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
    let sender = {
        let (stop, tally, endpoint) = (stop.clone(), tally.clone(), c.grpc_endpoint());
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut cl = client(&endpoint).await;
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let mut t = Tally::default();
                send_req(&mut cl, kill_request(k), &mut t).await;
                answered.lock().unwrap().push((k, Instant::now()));
                tally.lock().unwrap().merge(t);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            k
        })
    };
    let accepted = |t: &Mutex<Tally>| t.lock().unwrap().accepted.len();
    // Delivering for a while, then the destination goes down so kept batches pile up on disk
    // while the sampler goes on deciding.
    wait_for_async(
        "spans delivered before the outage",
        Duration::from_secs(60),
        || {
            let n = sink.span_count();
            async move { (n >= 3000).then_some(()) }
        },
    )
    .await;
    sink.set_mode(SinkMode::Unavailable);
    let before_outage = accepted(&tally);
    wait_for_async(
        "spans queued during the outage",
        Duration::from_secs(60),
        || {
            let n = accepted(&tally);
            async move { (n >= before_outage + 15_000).then_some(()) }
        },
    )
    .await;
    // SIGKILL in the middle of the load.
    let killed_at = Instant::now();
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let last = sender.await.unwrap();
    let before_kill: HashMap<u64, Duration> = answered
        .lock()
        .unwrap()
        .iter()
        .map(|&(k, at)| (k, killed_at.saturating_duration_since(at)))
        .collect();
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    let accepted_before_kill = t.accepted.len();
    let delivered_before = delivered(&sink);
    drop(c);

    sink.set_mode(SinkMode::Accept);
    let restarted = Instant::now();
    let c2 = start(&yaml);
    // The second halves of the traces whose first half went out last: late spans of traces
    // decided before the kill, or of traces the log held undecided.
    let mut cl = client(&c2.grpc_endpoint()).await;
    for req in kill_remaining(last) {
        send_req(&mut cl, req, &mut t).await;
    }
    assert_eq!(t.refused_total(), 0, "refused: {:?}", t.refused);
    // The sampler decides what the log held undecided and the disk queue delivers its
    // backlog: wait until every trace is whole or absent (bounded), then judge.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = judge(&t, &delivered(&sink), &before_kill, false);
        let held = c2.metric("tailweave_tail_sampling_traces_in_memory", &[]);
        if (held == 0.0 && v.partial == 0 && v.lost == 0) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One more look after a pause: nothing more arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = delivered(&sink);
    let drained = restarted.elapsed();
    let v = judge(&t, &got, &before_kill, true);
    let Verdict {
        kept,
        dropped,
        partial,
        lost,
        wrongly_kept,
        invented,
    } = v;
    let dups: u32 = got.values().map(|&n| n.saturating_sub(1)).sum();
    let after = got.len() - delivered_before.len();
    let log = c2.log_text();
    let restored = restore_line(&log);
    eprintln!(
        "reliability: kill -9: accepted {accepted_before_kill} spans before the kill ({} requests cut by it), \
         {} delivered before it, {after} more delivered after the restart (drained {:.1}s after it), \
         {} second-half spans accepted after the restart; traces: {kept} kept, {dropped} dropped, \
         {partial} partial, {lost} lost, {wrongly_kept} kept without an error; duplicates {dups}; \
         sampler restored {restored}",
        t.failed_requests,
        delivered_before.len(),
        drained.as_secs_f64(),
        t.accepted.len() - accepted_before_kill,
    );
    assert!(after > 0, "nothing was left for the restart to deliver");
    assert_eq!(invented, 0, "spans delivered that were never sent");
    assert!(log.contains("sending queue on disk opened"), "{log}");
    if storage == "file" {
        assert!(log.contains("tail_sampling state restored"), "{log}");
    }
    assert!(
        kept > 0 && dropped > 0,
        "the sampler kept {kept}, dropped {dropped}"
    );
    assert_eq!(wrongly_kept, 0, "traces without an error were kept");
    // No kept trace is partial, and so no trace was decided twice differently: a late half
    // decided afresh after the restart would make its trace partial.
    assert_eq!(partial, 0, "partial traces");
    // Nothing accepted is lost: every trace the policy must keep reached the sink.
    assert_eq!(lost, 0, "kept traces lost");
}

/// The end-to-end acknowledgement through the binary: a relay with its sending queue on disk,
/// four senders with no pause between requests (so requests are always in flight inside the
/// pipeline), and `kill -9`: after the restart every span answered OK is delivered, with no
/// window. Before the receivers waited for the disk write, batches answered while still in the
/// in-memory channels were lost by such a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_relay_loses_no_span_it_answered_ok() {
    let qdir = tempfile::tempdir().unwrap();
    let sink = Sink::start().await;
    let queue = format!(
        "{{storage: file, directory: {}, max_size_mib: 512, num_consumers: 2}}",
        qdir.path().join("queue").display()
    );
    let yaml = config(&sink, "", &queue);
    let mut c = start(&yaml);
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for s in 0..4u64 {
        let (stop, endpoint) = (stop.clone(), c.grpc_endpoint());
        senders.push(tokio::spawn(async move {
            let mut cl = client(&endpoint).await;
            let mut t = Tally::default();
            let mut no = s << 32;
            while !stop.load(Ordering::Relaxed) {
                no += 1;
                send(&mut cl, no, 50, &mut t).await;
            }
            t
        }));
    }
    // Delivering, then the destination refuses so the backlog is on disk at the kill.
    wait_for_async("spans delivered", Duration::from_secs(60), || {
        let n = sink.span_count();
        async move { (n >= 2000).then_some(()) }
    })
    .await;
    sink.set_mode(SinkMode::Unavailable);
    let queued_from = c.metric("tailweave_receiver_accepted_spans_total", &[]);
    wait_for_async("spans queued on disk", Duration::from_secs(60), || {
        let n = c.metric("tailweave_receiver_accepted_spans_total", &[]);
        async move { (n >= queued_from + 5000.0).then_some(()) }
    })
    .await;
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut t = Tally::default();
    for s in senders {
        t.merge(s.await.unwrap());
    }
    drop(c);
    let delivered_before = delivered(&sink).len();
    sink.set_mode(SinkMode::Accept);
    let c2 = start(&yaml);
    let got = all_delivered(None, &sink, &t.accepted, Duration::from_secs(90)).await;
    let unknown: HashSet<u64> = t.not_ok.iter().copied().collect();
    let accepted: HashSet<u64> = t.accepted.iter().copied().collect();
    let invented = got
        .keys()
        .filter(|id| !accepted.contains(id) && !unknown.contains(id))
        .count();
    eprintln!(
        "reliability: kill -9 of a relay: {} spans answered OK before the kill ({} requests cut by it), \
         {delivered_before} delivered before it, all {} delivered after the restart, {} duplicates",
        t.accepted.len(),
        t.failed_requests,
        t.accepted.len(),
        got.values().map(|&n| n.saturating_sub(1)).sum::<u32>(),
    );
    assert_eq!(missing(&t.accepted, &got), 0);
    assert_eq!(invented, 0, "spans delivered that were never sent");
    assert!(
        c2.log_text().contains("sending queue on disk opened"),
        "no queue reopened"
    );
}

/// The process that reads a collector's logs dies (the e2e bench did once, killed by the OOM
/// killer, and with it the pipes of the collector it had started): every log line then fails
/// to write. The collector must go on as before, not panic: it used to die at start-up, and
/// a task that logged while running ended with it (the exporter's senders: "exporter stopped").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_whose_log_reader_died_serves_and_delivers_everything() {
    let sink = Sink::start().await;
    sink.set_mode(SinkMode::Unavailable);
    let yaml = config(&sink, "", "{num_consumers: 4, queue_size: 1000}");
    let mut c =
        tokio::task::block_in_place(|| Collector::start_without_log_reader(&yaml, Ports::new()));
    let mut cl = client(&c.grpc_endpoint()).await;
    let mut t = Tally::default();
    for no in 1..=20 {
        send(&mut cl, no, 50, &mut t).await;
    }
    // The exporter retries, logging each retry, while the destination refuses.
    wait_for_async("export attempts refused", Duration::from_secs(30), || {
        let n = sink.calls();
        async move { (n >= 20).then_some(()) }
    })
    .await;
    sink.set_mode(SinkMode::Accept);
    for no in 21..=40 {
        send(&mut cl, no, 50, &mut t).await;
    }
    let got = all_delivered(Some(&c), &sink, &t.accepted, Duration::from_secs(60)).await;
    let lost_lines = c.metric("tailweave_log_lines_lost_total", &[]);
    eprintln!(
        "reliability: log reader gone: {} spans accepted, {} delivered, {} export attempts refused \
         by the destination, {lost_lines} log lines lost",
        t.accepted.len(),
        got.len(),
        sink.calls()
    );
    assert_eq!(t.refused_total(), 0, "{:?}", t.refused);
    assert_eq!(t.accepted.len(), 2000);
    assert_eq!(missing(&t.accepted, &got), 0);
    assert_eq!(
        c.metric("tailweave_exporter_send_failed_spans_total", &[]),
        0.0
    );
    assert!(lost_lines > 0.0, "no log line failed to write");
    assert!(
        c.child.try_wait().unwrap().is_none(),
        "the collector exited"
    );
    let st = tokio::task::block_in_place(|| c.terminate());
    assert!(st.success(), "{st}");
}

/// The destination's duty cycle in the overload test: stalled, then open.
const STALL: Duration = Duration::from_millis(1970);
const OPEN: Duration = Duration::from_millis(30);

/// The exporter's delivered-spans counter.
const SENT: &str = "tailweave_exporter_sent_spans_total";

/// The sum of `name` on a collector's `/metrics` (0 when it cannot be read).
fn scrape(addr: &str, name: &str) -> f64 {
    match http_request(addr, "GET", "/metrics", &[], &[]) {
        Ok((200, _, body)) => metric_sum(&String::from_utf8_lossy(&body), name, &[]),
        _ => 0.0,
    }
}

/// Runs `tailweave loadgen` (SDK traces of 10 spans) at `endpoint` and returns its summary.
/// `rate` is in traces per second, 0 = as fast as answers come. Refused requests are not
/// retried, so each refusal is counted once.
fn loadgen(endpoint: &str, dir: &Path, seed: u64, rate: f64, dur: Duration) -> serde_json::Value {
    let summary = dir.join(format!("summary-{seed}.json"));
    let st = Command::new(tailweave_bin())
        .arg("loadgen")
        .args(["--endpoint", endpoint, "--connections", "4"])
        .args([
            "--scenario",
            "sdk",
            "--spans",
            "10",
            "--replay-pool",
            "2000",
        ])
        .args(["--batch-size", "100", "--max-retries", "0"])
        .args(["--seed", &seed.to_string(), "--rate", &rate.to_string()])
        .args(["--duration", &format!("{}ms", dur.as_millis())])
        .arg("--summary")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run loadgen");
    assert!(st.success(), "loadgen failed");
    serde_json::from_slice(&std::fs::read(&summary).expect("summary")).expect("summary JSON")
}

fn count(s: &serde_json::Value, key: &str) -> u64 {
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no {key}: {s}"))
}

/// The distinct (trace id, span id) pairs the sink received, and the receptions in all.
fn distinct_spans(sink: &Sink) -> (usize, usize) {
    let all = sink.spans();
    let n = all.len();
    let set: HashSet<(Vec<u8>, Vec<u8>)> = all
        .into_iter()
        .map(|s| (s.span.trace_id, s.span.span_id))
        .collect();
    (set.len(), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_ten_times_capacity_stays_under_the_memory_limit_and_recovers() {
    const LIMIT_MIB: u64 = 96;
    let load = env_secs("TAILWEAVE_OVERLOAD_SECS", 60);
    let calibrate = env_secs("TAILWEAVE_CALIBRATE_SECS", 12);
    let factor: f64 = std::env::var("TAILWEAVE_OVERLOAD_FACTOR")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let sink = Sink::start().await;
    let service = format!("  memory_limit_mib: {LIMIT_MIB}");
    let c = start(&config(
        &sink,
        &service,
        "{num_consumers: 2, queue_size: 100000}",
    ));
    let pid = c.child.id();
    let baseline = peak_rss(pid);
    let dir = tempfile::tempdir().unwrap();
    let sent = |c: &Collector| c.metric(SENT, &[]);

    // The destination takes data 30 ms of every 2 s: that, not the CPU, is what the pipeline
    // can process, so the offered load can be a multiple of it on a small machine. The exporter's
    // sent counter is read at the end of every open window.
    let cycling = Arc::new(AtomicBool::new(true));
    let cycles = Arc::new(Mutex::new(Vec::<(Instant, f64)>::new()));
    let metrics_addr = format!("127.0.0.1:{}", c.ports.metrics);
    let duty = {
        let (sink, cycling, cycles) = (sink.clone(), cycling.clone(), cycles.clone());
        tokio::spawn(async move {
            while cycling.load(Ordering::Relaxed) {
                sink.set_mode(SinkMode::Stall);
                tokio::time::sleep(STALL).await;
                sink.set_mode(SinkMode::Accept);
                tokio::time::sleep(OPEN).await;
                let addr = metrics_addr.clone();
                let n = tokio::task::spawn_blocking(move || scrape(&addr, SENT))
                    .await
                    .unwrap();
                cycles.lock().unwrap().push((Instant::now(), n));
            }
            sink.set_mode(SinkMode::Accept);
        })
    };

    // Calibration: as fast as answers come, so a backlog forms and the delivery rate is the
    // capacity: spans sent per cycle, over whole cycles, leaving out the first two (they carry
    // the start-up burst).
    let endpoint = c.grpc_endpoint();
    let calib = {
        let (endpoint, dir) = (endpoint.clone(), dir.path().to_path_buf());
        tokio::task::spawn_blocking(move || loadgen(&endpoint, &dir, 1, 0.0, calibrate))
    };
    let calib = calib.await.unwrap();
    let (capacity, measured_cycles) = {
        let cyc = cycles.lock().unwrap();
        assert!(
            cyc.len() >= 4,
            "calibration saw {} duty cycles; TAILWEAVE_CALIBRATE_SECS is too short",
            cyc.len()
        );
        let ((t0, s0), (t1, s1)) = (cyc[1], cyc[cyc.len() - 1]);
        ((s1 - s0) / (t1 - t0).as_secs_f64(), cyc.len() - 2)
    };
    assert!(capacity > 0.0, "nothing delivered during calibration");

    // The load: `factor` times the capacity, in 10-span traces.
    let target = capacity * factor;
    let started = Instant::now();
    let sent_before = sent(&c);
    let run = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || loadgen(&endpoint, &dir, 2, target / 10.0, load))
    };
    let summary = run.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let delivered_during = sent(&c) - sent_before;
    let peak_load = peak_rss(pid);
    cycling.store(false, Ordering::Relaxed);
    duty.await.unwrap();

    let accepted = count(&calib, "accepted") + count(&summary, "accepted");
    let refused = count(&calib, "refused") + count(&summary, "refused");
    let failed = count(&calib, "failed") + count(&summary, "failed");
    let offered = count(&summary, "spans_sent");
    let offered_rate = offered as f64 / elapsed;

    // Every accepted span arrives: the wait is on the exporter's counter, then one look at the
    // sink.
    let drain_from = Instant::now();
    wait_for_async(
        "the exporter to send every accepted span",
        Duration::from_secs(300),
        || {
            let s = sent(&c);
            async move { (s >= accepted as f64).then_some(()) }
        },
    )
    .await;
    let drain = drain_from.elapsed();
    let refused_metric = c.metric("tailweave_receiver_refused_spans_total", &[]);
    eprintln!(
        "reliability: overload drained: accepted {accepted}, refused {refused} (receiver counted \
         {refused_metric}), offered {offered} ({offered_rate:.0}/s) in the load, capacity {capacity:.0}/s, \
         peak RSS {} MiB, RSS now {} MiB, live heap now {} MiB",
        peak_rss(pid) >> 20,
        c.metric("tailweave_process_memory_rss_bytes", &[]) as u64 >> 20,
        c.metric("tailweave_process_memory_heap_bytes", &[]) as u64 >> 20,
    );

    // Serves normally afterwards: a new request is accepted (once memory is back under the soft
    // limit) and delivered.
    let mut cl = client(&c.grpc_endpoint()).await;
    let mut after = Tally::default();
    for attempt in 0..600u64 {
        send(&mut cl, (9 << 40) + attempt, 100, &mut after).await;
        if !after.accepted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !after.accepted.is_empty(),
        "refused for 60 s after the load, with everything delivered: RSS {} MiB against a soft \
         limit of {} MiB (the limit less the default 20 % spike), live heap {} MiB",
        c.metric("tailweave_process_memory_rss_bytes", &[]) as u64 >> 20,
        c.metric("tailweave_process_memory_heap_bytes", &[]) as u64 >> 20,
        LIMIT_MIB * 4 / 5,
    );
    all_delivered(None, &sink, &after.accepted, Duration::from_secs(60)).await;
    let (distinct, receptions) = distinct_spans(&sink);
    let peak = peak_rss(pid);
    eprintln!(
        "reliability: overload calibration {:.0}s: capacity {capacity:.0} spans/s delivered (destination open \
         {}ms of every {}ms, {} cycles); {} spans accepted, {} refused",
        calibrate.as_secs_f64(),
        OPEN.as_millis(),
        (STALL + OPEN).as_millis(),
        measured_cycles,
        count(&calib, "accepted"),
        count(&calib, "refused"),
    );
    eprintln!(
        "reliability: overload {elapsed:.0}s at {:.1}x capacity: offered {offered} spans ({offered_rate:.0}/s, \
         target {target:.0}/s), accepted {} ({:.0}/s), refused {}, failed {failed}, delivered during the load \
         {delivered_during:.0} ({:.0}/s); both phases: accepted {accepted}, refused {refused} (receiver \
         counted {refused_metric}), delivered {distinct} distinct ({} duplicates), all delivered {:.1}s after \
         the load; peak RSS {} MiB (baseline {} MiB, at the end of the load {} MiB) vs limit {LIMIT_MIB} MiB; \
         a new request accepted after {} refusals 100 ms apart",
        offered_rate / capacity,
        count(&summary, "accepted"),
        count(&summary, "accepted") as f64 / elapsed,
        count(&summary, "refused"),
        delivered_during / elapsed,
        receptions - distinct,
        drain.as_secs_f64(),
        peak >> 20,
        baseline >> 20,
        peak_load >> 20,
        after.refused_total() / 100,
    );
    // The load was what the issue asks for (within 10 % of the target), and above capacity.
    assert!(
        offered_rate >= 0.9 * target,
        "offered only {offered_rate:.0} spans/s of {target:.0}"
    );
    assert!(refused > 0, "the load never exceeded capacity");
    assert!(peak < LIMIT_MIB << 20, "peak RSS {} MiB", peak >> 20);
    // Every span offered is accepted-and-delivered or refused-and-counted (the documented rule:
    // refusals are retryable answers, counted in tailweave_receiver_refused_spans_total). The
    // sink can only have spans the senders counted as accepted (a refusal comes before decoding,
    // and no request failed), so as many distinct spans as were accepted means every one of them.
    assert_eq!(failed, 0, "requests failed without an answer");
    assert_eq!(distinct as u64, accepted + after.accepted.len() as u64);
    // The receiver's counter also holds the refusals of the requests after the load.
    let refused_in_the_end = c.metric("tailweave_receiver_refused_spans_total", &[]);
    assert_eq!(refused_metric as u64, refused);
    assert_eq!(refused_in_the_end as u64, refused + after.refused_total());
}
