//! The sender: delivers generated traces over OTLP the way production delivers them.
//!
//! SDK spans go out at once; DeepFlow rows are held for their delay, shuffled, and dealt to
//! their own connections in turn, as DeepFlow's exporter deals batches to its 4 queues
//! (`ebpf-spans.md` §1 item 5). The ResourceSpans of one trace are dealt round-robin over the
//! connections too, so a trace's spans arrive in several requests over several connections.
//!
//! One producer (rate control, delays, batching) feeds one bounded channel per connection
//! worker; a full channel blocks the producer, so a slow collector slows the generator instead
//! of growing a queue. Workers retry refused requests (gRPC UNAVAILABLE / RESOURCE_EXHAUSTED,
//! HTTP 429 / 503) with exponential backoff up to a bound, and count what stays refused.
//!
//! Each ResourceSpans is encoded once when it enters a lane, and a request body is the
//! concatenation of its ResourceSpans fields, so neither batching nor a retry copies or
//! re-encodes spans. That is why the gRPC client is `tonic::client::Grpc` with a pass-through
//! codec on the OTLP `Export` method rather than the generated `TraceServiceClient`, which would
//! need an owned `ExportTraceServiceRequest` (a deep copy) for every attempt.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use serde::Serialize;
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::rng::Rng;
use super::scenario::{GeneratedTrace, WireTrace};
pub use super::wire::Encoded;

/// Spans handed to the endpoint, by outcome (`outcome` = accepted | refused | failed).
pub const LOADGEN_SPANS: &str = "tailweave_loadgen_spans_total";
/// Export requests made, including retries.
pub const LOADGEN_REQUESTS: &str = "tailweave_loadgen_requests_total";

/// The gRPC metadata DeepFlow's exporter sends through `extra-headers` in the recommended
/// profile (`ebpf-spans.md` §8), set on every eBPF request.
pub const EBPF_SOURCE_HEADER: (&str, &str) = ("x-tailweave-source", "deepflow");

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST /v1/traces`).
    Http,
}

/// Request body compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    /// gRPC message compression / HTTP `Content-Encoding: gzip`.
    Gzip,
}

/// How to send.
#[derive(Clone, Debug)]
pub struct SendConfig {
    pub protocol: Protocol,
    /// Where SDK spans go, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// Where DeepFlow rows go; `None`: `endpoint`.
    pub ebpf_endpoint: Option<String>,
    /// Connections per endpoint kind (SDK and eBPF each get this many).
    pub connections: usize,
    /// ResourceSpans per request.
    pub batch_size: usize,
    /// Traces per second; 0 = as fast as the endpoint takes them.
    pub rate: f64,
    /// Stop generating after this long.
    pub duration: Option<Duration>,
    /// Stop generating after this many traces.
    pub count: Option<u64>,
    /// Attempts after the first for a refused request.
    pub max_retries: u32,
    /// First backoff; doubles per attempt up to `retry_max_backoff`.
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    /// Deadline of one export call.
    pub request_timeout: Duration,
    /// A partial SDK batch is sent after this long (an SDK batch processor's schedule delay).
    pub sdk_flush_interval: Duration,
    /// A partial eBPF batch is sent after this long (DeepFlow's 1 s queue tick).
    pub ebpf_flush_interval: Duration,
    /// DeepFlow rows waiting for their delay, at most; beyond it the generator pauses.
    pub max_delayed_rows: usize,
    /// Shuffle the rows released together before batching them.
    pub shuffle: bool,
    /// Seeds the shuffle and the retry jitter.
    pub seed: u64,
    /// Sent with every request (gRPC metadata / HTTP headers), e.g. `authorization`.
    pub headers: Vec<(String, String)>,
    /// Sent with DeepFlow rows only, after `headers` and [`EBPF_SOURCE_HEADER`].
    pub ebpf_headers: Vec<(String, String)>,
    pub compression: Compression,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            protocol: Protocol::Grpc,
            endpoint: "http://127.0.0.1:4317".to_string(),
            ebpf_endpoint: None,
            connections: 4,
            batch_size: 32,
            rate: 0.0,
            duration: None,
            count: None,
            max_retries: 5,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            sdk_flush_interval: Duration::from_millis(200),
            ebpf_flush_interval: Duration::from_secs(1),
            max_delayed_rows: 200_000,
            shuffle: true,
            seed: 1,
            headers: Vec::new(),
            ebpf_headers: Vec::new(),
            compression: Compression::None,
        }
    }
}

/// What happened, printed at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub traces: u64,
    pub sdk_spans: u64,
    pub ebpf_spans: u64,
    /// Spans handed to the workers (each counted once, however often retried).
    pub spans_sent: u64,
    pub accepted: u64,
    /// Encoded bytes (uncompressed request bodies) of the requests answered OK.
    pub accepted_bytes: u64,
    /// Refused after the last retry, or rejected through partial success.
    pub refused: u64,
    /// Failed for another reason (connection error after retries, invalid argument, ...).
    pub failed: u64,
    pub retries: u64,
    pub requests: u64,
    /// From the first trace to the last answer, including the wait for delayed rows.
    pub elapsed_s: f64,
    /// From the first trace to the end of generation.
    pub generating_s: f64,
    /// Traces generated per second of `generating_s`: the rate achieved.
    pub traces_per_s: f64,
    /// Spans accepted per second of `elapsed_s`.
    pub spans_per_s: f64,
}

/// Why sending could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("invalid header {header:?}: {reason}")]
    Header { header: String, reason: String },
    #[error("writing the ground truth: {0}")]
    Truth(#[from] std::io::Error),
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    accepted_bytes: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    requests: AtomicU64,
}

impl Counters {
    fn add(&self, c: &AtomicU64, n: u64, outcome: Option<&'static str>) {
        c.fetch_add(n, Ordering::Relaxed);
        if let Some(o) = outcome {
            metrics::counter!(LOADGEN_SPANS, "outcome" => o).increment(n);
        }
    }
}

/// Sends `traces` as `cfg` says, calling `on_trace` for each trace before its spans go out
/// (the truth writer). Stops at `cfg.count` / `cfg.duration`, at the end of `traces`, or when
/// `stop` is cancelled; then delivers what is still held (at once if stopped) and returns the
/// summary once every worker is done.
pub async fn send<I, F>(
    cfg: &SendConfig,
    traces: I,
    mut on_trace: F,
    stop: CancellationToken,
) -> Result<Summary, SendError>
where
    I: IntoIterator,
    I::Item: Outgoing,
    F: FnMut(&I::Item) -> std::io::Result<()>,
{
    let counters = Arc::new(Counters::default());
    let n = cfg.connections.max(1);
    let mut seed = Rng::new(cfg.seed ^ 0x5EED_5EED);
    let sdk_ep = Target::parse(cfg.protocol, &cfg.endpoint)?;
    let ebpf_ep = match &cfg.ebpf_endpoint {
        Some(e) => Target::parse(cfg.protocol, e)?,
        None => sdk_ep.clone(),
    };
    let mut workers = Vec::new();
    let sdk_headers = cfg.headers.clone();
    let mut ebpf_headers = cfg.headers.clone();
    ebpf_headers.push((
        EBPF_SOURCE_HEADER.0.to_string(),
        EBPF_SOURCE_HEADER.1.to_string(),
    ));
    ebpf_headers.extend(cfg.ebpf_headers.iter().cloned());
    let mut lanes = |target: &Target,
                     headers: &[(String, String)],
                     seed: &mut Rng|
     -> Result<Lanes, SendError> {
        let mut txs = Vec::new();
        for _ in 0..n {
            // Two batches in flight per connection: enough to keep it busy, small enough that
            // backpressure reaches the generator quickly.
            let (tx, rx) = mpsc::channel(2);
            txs.push(tx);
            let client = Client::new(target, headers, cfg.request_timeout, cfg.compression)?;
            let w = Worker {
                client,
                counters: counters.clone(),
                max_retries: cfg.max_retries,
                initial: cfg.retry_initial_backoff,
                max: cfg.retry_max_backoff,
                rng: Rng::new(seed.next_u64()),
            };
            workers.push(tokio::spawn(w.run(rx)));
        }
        Ok(Lanes::new(txs, cfg.batch_size.max(1)))
    };
    let mut sdk = lanes(&sdk_ep, &sdk_headers, &mut seed)?;
    let mut ebpf = lanes(&ebpf_ep, &ebpf_headers, &mut seed)?;
    let mut delayed: BinaryHeap<Delayed> = BinaryHeap::new();
    let mut delayed_seq = 0u64;
    let mut shuffle_rng = Rng::new(seed.next_u64());
    let mut summary = Summary::default();

    let start = Instant::now();
    let mut traces = traces.into_iter();
    'gen: loop {
        if stop.is_cancelled()
            || cfg.count.is_some_and(|c| summary.traces >= c)
            || cfg.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        let due = (cfg.rate > 0.0)
            .then(|| start + Duration::from_secs_f64(summary.traces as f64 / cfg.rate));
        // Wait for the trace's due time, or for room among the delayed rows, doing the
        // releases and timed flushes that fall in between.
        loop {
            let now = Instant::now();
            release(
                now,
                &mut delayed,
                &mut ebpf,
                cfg.shuffle.then_some(&mut shuffle_rng),
            )
            .await;
            sdk.flush_due(now, cfg.sdk_flush_interval).await;
            ebpf.flush_due(now, cfg.ebpf_flush_interval).await;
            let full = delayed.len() >= cfg.max_delayed_rows.max(1);
            let waiting = due.is_some_and(|d| d > now);
            if !full && !waiting {
                break;
            }
            let mut wake = now + cfg.sdk_flush_interval.min(cfg.ebpf_flush_interval);
            if let Some(d) = due.filter(|_| !full) {
                wake = wake.min(d);
            }
            if let Some(top) = delayed.peek() {
                wake = wake.min(top.due);
            }
            if let Some(d) = cfg.duration {
                wake = wake.min(start + d);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.cancelled() => break 'gen,
            }
            if cfg.duration.is_some_and(|d| start.elapsed() >= d) {
                break 'gen;
            }
        }
        let Some(trace) = traces.next() else { break };
        on_trace(&trace)?;
        let (sdk_parts, ebpf_parts) = trace.into_wire();
        summary.traces += 1;
        summary.sdk_spans += sdk_parts.iter().map(|p| p.spans).sum::<u64>();
        summary.ebpf_spans += ebpf_parts.iter().map(|p| p.0.spans).sum::<u64>();
        for rs in sdk_parts {
            sdk.push(rs).await;
        }
        let now = Instant::now();
        for (rs, delay) in ebpf_parts {
            delayed_seq += 1;
            delayed.push(Delayed {
                due: now + delay,
                seq: delayed_seq,
                rs,
            });
        }
    }

    let generating = start.elapsed().as_secs_f64();
    // Deliver what is held: rows at their due time, or at once when stopped.
    sdk.flush_all().await;
    while let Some(top) = delayed.peek() {
        if !stop.is_cancelled() {
            let due = top.due;
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.cancelled() => {}
            }
        }
        let now = if stop.is_cancelled() {
            Instant::now() + Duration::from_secs(86_400 * 365)
        } else {
            Instant::now()
        };
        release(
            now,
            &mut delayed,
            &mut ebpf,
            cfg.shuffle.then_some(&mut shuffle_rng),
        )
        .await;
    }
    ebpf.flush_all().await;
    drop(sdk);
    drop(ebpf);
    for w in workers {
        // A worker that panicked has already lost its batch; its spans stay uncounted.
        let _ = w.await;
    }

    let elapsed = start.elapsed().as_secs_f64();
    summary.spans_sent = counters.sent.load(Ordering::Relaxed);
    summary.accepted = counters.accepted.load(Ordering::Relaxed);
    summary.accepted_bytes = counters.accepted_bytes.load(Ordering::Relaxed);
    summary.refused = counters.refused.load(Ordering::Relaxed);
    summary.failed = counters.failed.load(Ordering::Relaxed);
    summary.retries = counters.retries.load(Ordering::Relaxed);
    summary.requests = counters.requests.load(Ordering::Relaxed);
    summary.elapsed_s = elapsed;
    summary.generating_s = generating;
    if generating > 0.0 {
        summary.traces_per_s = summary.traces as f64 / generating;
    }
    if elapsed > 0.0 {
        summary.spans_per_s = summary.accepted as f64 / elapsed;
    }
    Ok(summary)
}

/// Moves every delayed row due by `now` to the eBPF lanes, shuffled among themselves.
async fn release(
    now: Instant,
    delayed: &mut BinaryHeap<Delayed>,
    lanes: &mut Lanes,
    shuffle: Option<&mut Rng>,
) {
    let mut ready = Vec::new();
    while delayed.peek().is_some_and(|d| d.due <= now) {
        if let Some(d) = delayed.pop() {
            ready.push(d.rs);
        }
    }
    if let Some(rng) = shuffle {
        rng.shuffle(&mut ready);
    }
    for rs in ready {
        lanes.push(rs).await;
    }
}

/// A trace the sender can deliver: its SDK ResourceSpans and its DeepFlow rows with their
/// delays, encoded.
pub trait Outgoing {
    #[allow(clippy::type_complexity)]
    fn into_wire(self) -> (Vec<Encoded>, Vec<(Encoded, Duration)>);
}

impl Outgoing for WireTrace {
    fn into_wire(self) -> (Vec<Encoded>, Vec<(Encoded, Duration)>) {
        (self.sdk, self.ebpf)
    }
}

impl Outgoing for GeneratedTrace {
    fn into_wire(self) -> (Vec<Encoded>, Vec<(Encoded, Duration)>) {
        let sdk = self.sdk.iter().map(Encoded::new).collect();
        let ebpf = self
            .ebpf
            .iter()
            .map(Encoded::new)
            .zip(self.ebpf_delay)
            .collect();
        (sdk, ebpf)
    }
}

/// An encoded `ExportTraceServiceRequest` and the spans in it.
struct Batch {
    body: Bytes,
    spans: u64,
}

/// A DeepFlow row waiting for its delivery time. Ordered so that the heap's top is the earliest.
struct Delayed {
    due: Instant,
    seq: u64,
    rs: Encoded,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One pending batch per connection; ResourceSpans are dealt to them in turn.
struct Lanes {
    bufs: Vec<Vec<Encoded>>,
    since: Vec<Option<Instant>>,
    txs: Vec<mpsc::Sender<Batch>>,
    next: usize,
    batch_size: usize,
}

impl Lanes {
    fn new(txs: Vec<mpsc::Sender<Batch>>, batch_size: usize) -> Lanes {
        Lanes {
            bufs: txs.iter().map(|_| Vec::new()).collect(),
            since: vec![None; txs.len()],
            txs,
            next: 0,
            batch_size,
        }
    }

    async fn push(&mut self, rs: Encoded) {
        let i = self.next;
        self.next = (self.next + 1) % self.txs.len();
        self.bufs[i].push(rs);
        self.since[i].get_or_insert_with(Instant::now);
        if self.bufs[i].len() >= self.batch_size {
            self.flush(i).await;
        }
    }

    async fn flush(&mut self, i: usize) {
        self.since[i] = None;
        let parts = std::mem::take(&mut self.bufs[i]);
        if !parts.is_empty() {
            let mut body = Vec::with_capacity(parts.iter().map(|p| p.field.len()).sum());
            for p in &parts {
                body.extend_from_slice(&p.field);
            }
            let batch = Batch {
                body: Bytes::from(body),
                spans: parts.iter().map(|p| p.spans).sum(),
            };
            // The worker lives until the channel closes, so a send error cannot happen while
            // this side is alive; if it did, the batch is lost and stays uncounted.
            let _ = self.txs[i].send(batch).await;
        }
    }

    async fn flush_due(&mut self, now: Instant, interval: Duration) {
        for i in 0..self.txs.len() {
            if self.since[i].is_some_and(|s| s + interval <= now) {
                self.flush(i).await;
            }
        }
    }

    async fn flush_all(&mut self) {
        for i in 0..self.txs.len() {
            self.flush(i).await;
        }
    }
}

/// An endpoint, checked once.
#[derive(Clone, Debug)]
enum Target {
    Grpc(String),
    Http(http::Uri),
}

impl Target {
    fn parse(protocol: Protocol, endpoint: &str) -> Result<Target, SendError> {
        let err = |reason: String| SendError::Endpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let with_scheme = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let uri: http::Uri = with_scheme.parse().map_err(|e| err(format!("{e}")))?;
        if uri.host().is_none() {
            return Err(err("no host".to_string()));
        }
        match protocol {
            Protocol::Grpc => Ok(Target::Grpc(with_scheme)),
            Protocol::Http => {
                let path = uri.path();
                if path.is_empty() || path == "/" {
                    let s = format!("{}/v1/traces", with_scheme.trim_end_matches('/'));
                    Ok(Target::Http(s.parse().map_err(|e| err(format!("{e}")))?))
                } else {
                    Ok(Target::Http(uri))
                }
            }
        }
    }
}

/// One connection's client.
// One per connection, built once and never moved on the hot path: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Client {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            Full<Bytes>,
        >,
        uri: http::Uri,
        timeout: Duration,
        headers: http::HeaderMap,
        gzip: bool,
    },
}

/// How one export attempt ended.
enum Outcome {
    /// Accepted, with this many spans rejected through partial success.
    Done {
        rejected: u64,
    },
    /// Refused in a way the OTLP spec says to retry.
    Retry {
        after: Option<Duration>,
        why: String,
    },
    Failed(String),
}

impl Client {
    fn new(
        target: &Target,
        headers: &[(String, String)],
        timeout: Duration,
        compression: Compression,
    ) -> Result<Client, SendError> {
        let gzip = compression == Compression::Gzip;
        let bad = |(k, v): &(String, String), reason: String| SendError::Header {
            header: format!("{k}={v}"),
            reason,
        };
        match target {
            Target::Grpc(ep) => {
                let endpoint = tonic::transport::Endpoint::from_shared(ep.clone())
                    .map_err(|e| SendError::Endpoint {
                        endpoint: ep.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(timeout);
                // Lazy: a collector that starts after the loadgen is retried, not fatal. Each
                // client gets its own channel, hence its own HTTP/2 connection.
                let channel = endpoint.connect_lazy();
                let mut metadata = tonic::metadata::MetadataMap::new();
                for h in headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(h.0.as_bytes())
                        .map_err(|e| bad(h, e.to_string()))?;
                    let value = tonic::metadata::MetadataValue::try_from(h.1.as_str())
                        .map_err(|e| bad(h, e.to_string()))?;
                    metadata.append(key, value);
                }
                let mut client = tonic::client::Grpc::new(channel)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(usize::MAX);
                if gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Ok(Client::Grpc { client, metadata })
            }
            Target::Http(uri) => {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_max_idle_per_host(1)
                .build_http();
                let mut map = http::HeaderMap::new();
                for h in headers {
                    let key = http::HeaderName::from_bytes(h.0.as_bytes())
                        .map_err(|e| bad(h, e.to_string()))?;
                    let value =
                        http::HeaderValue::from_str(&h.1).map_err(|e| bad(h, e.to_string()))?;
                    map.append(key, value);
                }
                if gzip {
                    map.insert(
                        http::header::CONTENT_ENCODING,
                        http::HeaderValue::from_static("gzip"),
                    );
                }
                Ok(Client::Http {
                    client,
                    uri: uri.clone(),
                    timeout,
                    headers: map,
                    gzip,
                })
            }
        }
    }

    /// The body as this client sends it: gzip for HTTP is applied once per batch, not per
    /// attempt (gRPC compresses inside tonic).
    fn prepare(&self, body: Bytes) -> Bytes {
        match self {
            Client::Http { gzip: true, .. } => {
                use std::io::Write as _;
                let mut e = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 4),
                    flate2::Compression::fast(),
                );
                // Writing into a Vec cannot fail.
                let _ = e.write_all(&body);
                e.finish().map(Bytes::from).unwrap_or(body)
            }
            _ => body,
        }
    }

    async fn export(&mut self, body: &Bytes) -> Outcome {
        match self {
            Client::Grpc { client, metadata } => {
                if let Err(e) = client.ready().await {
                    return Outcome::Retry {
                        after: None,
                        why: format!("connection: {e}"),
                    };
                }
                let mut r = tonic::Request::new(body.clone());
                *r.metadata_mut() = metadata.clone();
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match client.unary(r, path, RawCodec).await {
                    Ok(resp) => Outcome::Done {
                        rejected: rejected(&resp.into_inner()),
                    },
                    Err(s) => grpc_outcome(&s),
                }
            }
            Client::Http {
                client,
                uri,
                timeout,
                headers,
                ..
            } => {
                let mut b = http::Request::builder()
                    .method(http::Method::POST)
                    .uri(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                if let Some(h) = b.headers_mut() {
                    h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                let request = match b.body(Full::new(body.clone())) {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(e.to_string()),
                };
                let resp = match tokio::time::timeout(*timeout, client.request(request)).await {
                    Err(_) => {
                        return Outcome::Retry {
                            after: None,
                            why: "request timed out".to_string(),
                        }
                    }
                    Ok(Err(e)) => {
                        return Outcome::Retry {
                            after: None,
                            why: format!("connection: {e}"),
                        }
                    }
                    Ok(Ok(r)) => r,
                };
                let status = resp.status();
                let after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = match tokio::time::timeout(*timeout, resp.into_body().collect()).await {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => Bytes::new(),
                };
                http_outcome(status, after, &body)
            }
        }
    }
}

/// The OTLP trace export method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends an already encoded `ExportTraceServiceRequest` as is and decodes the response.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("malformed export response: {e}")))
    }
}

fn rejected(resp: &ExportTraceServiceResponse) -> u64 {
    resp.partial_success
        .as_ref()
        .map_or(0, |p| p.rejected_spans.max(0) as u64)
}

fn grpc_outcome(s: &tonic::Status) -> Outcome {
    use tonic::Code;
    match s.code() {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled => Outcome::Retry {
            after: None,
            why: format!("{:?}: {}", s.code(), s.message()),
        },
        c => Outcome::Failed(format!("{c:?}: {}", s.message())),
    }
}

fn http_outcome(status: http::StatusCode, after: Option<Duration>, body: &[u8]) -> Outcome {
    if status.is_success() {
        let rejected = ExportTraceServiceResponse::decode(body)
            .map(|r| rejected(&r))
            .unwrap_or(0);
        return Outcome::Done { rejected };
    }
    match status.as_u16() {
        429 | 502 | 503 | 504 => Outcome::Retry {
            after,
            why: format!("HTTP {status}"),
        },
        _ => Outcome::Failed(format!("HTTP {status}")),
    }
}

struct Worker {
    client: Client,
    counters: Arc<Counters>,
    max_retries: u32,
    initial: Duration,
    max: Duration,
    rng: Rng,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut failures_logged = 0u32;
        while let Some(batch) = rx.recv().await {
            let n = batch.spans;
            let size = batch.body.len() as u64;
            let body = self.client.prepare(batch.body);
            let c = self.counters.clone();
            c.add(&c.sent, n, None);
            let mut attempt = 0u32;
            loop {
                c.add(&c.requests, 1, None);
                metrics::counter!(LOADGEN_REQUESTS).increment(1);
                match self.client.export(&body).await {
                    Outcome::Done { rejected } => {
                        let rejected = rejected.min(n);
                        c.add(&c.accepted, n - rejected, Some("accepted"));
                        c.add(&c.accepted_bytes, size, None);
                        c.add(&c.refused, rejected, Some("refused"));
                        break;
                    }
                    Outcome::Retry { after, why } => {
                        if attempt >= self.max_retries {
                            c.add(&c.refused, n, Some("refused"));
                            if failures_logged < 5 {
                                failures_logged += 1;
                                tracing::warn!(spans = n, %why, "export refused after retries");
                            }
                            break;
                        }
                        c.add(&c.retries, 1, None);
                        let backoff = self.backoff(attempt, after);
                        attempt += 1;
                        tokio::time::sleep(backoff).await;
                    }
                    Outcome::Failed(why) => {
                        c.add(&c.failed, n, Some("failed"));
                        if failures_logged < 5 {
                            failures_logged += 1;
                            tracing::warn!(spans = n, %why, "export failed");
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Exponential backoff with full jitter in its upper half; a server's Retry-After wins when
    /// longer, capped at `max`.
    fn backoff(&mut self, attempt: u32, after: Option<Duration>) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let half = base / 2;
        let jitter = Duration::from_nanos(self.rng.below(half.as_nanos() as u64 + 1));
        let d = half + jitter;
        after.map_or(d, |a| a.max(d)).min(self.max)
    }
}

#[cfg(test)]
mod tests;
