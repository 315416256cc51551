//! The `prometheus_remote_write` exporter (alias `prometheusremotewrite`): pushes the span metrics
//! (RED) of the process to a Prometheus remote-write endpoint every `push_interval`.
//!
//! The request is a remote-write 1.0 `WriteRequest` (protobuf, the message types written out below
//! with `prost` derives), snappy block-compressed, with `Content-Encoding: snappy`,
//! `Content-Type: application/x-protobuf` and `X-Prometheus-Remote-Write-Version: 0.1.0`. Samples
//! are the cumulative values at push time, so a push that is given up on loses nothing but
//! resolution: the next one carries the newer totals. 5xx and 429 answers and connection errors are
//! retried with exponential backoff (honouring `Retry-After`) for up to
//! `retry_on_failure.max_elapsed_time`; other answers are final. Every given-up push is counted.
//! With `send_exemplars: true` each histogram bucket also carries its exemplar (a kept trace's id);
//! the receiving Prometheus stores them only with `--enable-feature=exemplar-storage`.
//!
//! Like `prometheus`, it marks the trace ids of the spans that reach it as kept. When its input
//! ends (shutdown) it pushes one last time, so the final counts reach the destination.
//!
//! # TLS
//! An `https://` endpoint is dialled over TLS with the `tls` block of the `otlp_http` exporter
//! (`ca_file`, else the system roots; `cert_file` + `key_file` for mTLS; `server_name_override`)
//! and the same connector, so both exporters verify a destination the same way. A handshake that
//! fails (an untrusted certificate, a refused client certificate) is a connection error: retried
//! like one, then counted as a failed push. The files are read at build (a missing one stops the
//! start-up) and again before every push: when their bytes changed, the next connections use
//! them (a rotated client certificate or CA needs no restart; counted by
//! `tailweave_tls_reloads_total`). A rotation that does not load (e.g. caught between the
//! certificate and the key being written) keeps the previous config, is counted by
//! `tailweave_tls_reload_failures_total` and is tried again at the next push.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::red::{sanitize_name, RedRegistry, SetSnapshot};
use tailweave_core::tls::{ALPN_HTTP1, TLS_RELOADS, TLS_RELOAD_FAILURES};
use tailweave_core::{ComponentError, ExportError, SpanBatch};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::otlp::{Connector, TlsConfig};
use crate::otlp_http::{causes, parse_retry_after};
use crate::prometheus::{check_label_names, fmt_float, label_set, note_kept, series_name};
use crate::queue::{Backoff, RetryConfig};
use crate::RunningExporter;

/// Pushes, by `outcome` (`sent`, `failed`).
pub const PUSHES: &str = "tailweave_prometheus_remote_write_pushes_total";
/// Samples accepted by the destination.
pub const SENT_SAMPLES: &str = "tailweave_prometheus_remote_write_sent_samples_total";
/// Retried attempts.
pub const RETRIES: &str = "tailweave_prometheus_remote_write_retries_total";
/// The protocol version header value.
pub const REMOTE_WRITE_VERSION: &str = "0.1.0";
const MAX_RESPONSE_BYTES: usize = 64 << 10;
const INPUT_CAPACITY: usize = 64;

/// The remote-write 1.0 messages (`prometheus/prompb/remote.proto`, `types.proto`).
pub mod prompb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
        #[prost(message, repeated, tag = "3")]
        pub metadata: Vec<MetricMetadata>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        /// Sorted by name, `__name__` included.
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub exemplars: Vec<Exemplar>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Exemplar {
        /// `trace_id`, `span_id`.
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(double, tag = "2")]
        pub value: f64,
        /// Unix milliseconds.
        #[prost(int64, tag = "3")]
        pub timestamp: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(double, tag = "1")]
        pub value: f64,
        /// Unix milliseconds.
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricMetadata {
        /// `MetricType`: 1 counter, 3 histogram.
        #[prost(int32, tag = "1")]
        pub r#type: i32,
        #[prost(string, tag = "2")]
        pub metric_family_name: String,
        #[prost(string, tag = "4")]
        pub help: String,
        #[prost(string, tag = "5")]
        pub unit: String,
    }

    pub const COUNTER: i32 = 1;
    pub const HISTOGRAM: i32 = 3;
}

fn default_retry() -> RetryConfig {
    // Short waits: a push that is late is worth less than the next one.
    RetryConfig {
        initial_interval: Duration::from_millis(50),
        max_interval: Duration::from_secs(5),
        max_elapsed_time: Duration::from_secs(60),
        ..RetryConfig::default()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusRemoteWriteExporterConfig {
    /// The remote-write URL, e.g. `http://prometheus:9090/api/v1/write`; `https://` for TLS.
    /// Required.
    pub endpoint: String,
    /// TLS settings for an `https://` endpoint (`ca_file`, `cert_file`, `key_file`,
    /// `server_name_override`), as in the `otlp_http` exporter; the URL's scheme decides whether
    /// TLS is used. The files are read again before each push and changed ones take effect for
    /// new connections. Default: system roots, no client certificate.
    pub tls: TlsConfig,
    /// Prefix added to every metric name, before the `span_metrics` namespace. Default none.
    pub namespace: String,
    /// Labels added to every series (the ones a series already has win). Default none.
    pub external_labels: BTreeMap<String, String>,
    /// HTTP headers sent with every request (e.g. `authorization`). Default none.
    pub headers: BTreeMap<String, String>,
    /// How often the current totals are pushed. Default `15s`.
    #[serde(with = "humantime_serde")]
    pub push_interval: Duration,
    /// Bound of one attempt. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Retry with backoff on 5xx, 429 and connection errors. Default initial `50ms`, max `5s`,
    /// given up after `60s`.
    pub retry_on_failure: RetryConfig,
    /// Most time series in one request; a push of more is split into several requests (each
    /// retried on its own). Default `5000`.
    pub max_series_per_request: usize,
    /// Send the histogram buckets' exemplars (trace ids of kept traces). The receiving Prometheus
    /// stores them only with `--enable-feature=exemplar-storage`. Default `false`.
    pub send_exemplars: bool,
}

impl Default for PrometheusRemoteWriteExporterConfig {
    fn default() -> Self {
        PrometheusRemoteWriteExporterConfig {
            endpoint: String::new(),
            tls: TlsConfig::default(),
            namespace: String::new(),
            external_labels: BTreeMap::new(),
            headers: BTreeMap::new(),
            push_interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
            retry_on_failure: default_retry(),
            max_series_per_request: 5000,
            send_exemplars: false,
        }
    }
}

impl PrometheusRemoteWriteExporterConfig {
    fn url(&self) -> Result<Uri, ConfigIssue> {
        let raw = self.endpoint.trim();
        if raw.is_empty() {
            return Err(ConfigIssue::new(
                "endpoint",
                "required: a URL such as http://prometheus:9090/api/v1/write",
            ));
        }
        let uri = Uri::from_str(raw)
            .map_err(|e| ConfigIssue::new("endpoint", format!("{raw:?} is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(ConfigIssue::new(
                "endpoint",
                format!("{raw:?}: the URL must start with http:// or https://"),
            ));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(ConfigIssue::new(
                "endpoint",
                format!("{raw:?}: a host is required"),
            ));
        }
        Ok(uri)
    }

    fn header_map(&self) -> Result<HeaderMap, Vec<ConfigIssue>> {
        let mut map = HeaderMap::new();
        let mut issues = Vec::new();
        for (k, v) in &self.headers {
            match (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                (Ok(n), Ok(v)) => {
                    map.insert(n, v);
                }
                _ => issues.push(ConfigIssue::new(
                    format!("headers.{k}"),
                    "not a valid HTTP header name or value",
                )),
            }
        }
        if issues.is_empty() {
            Ok(map)
        } else {
            Err(issues)
        }
    }

    /// Whether the endpoint is dialled over TLS (only meaningful when `url()` is valid).
    fn encrypts(&self) -> bool {
        self.url().is_ok_and(|u| u.scheme_str() == Some("https"))
    }

    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        match self.url() {
            Err(i) => out.push(i),
            Ok(u) => {
                out.extend(self.tls.validate("tls"));
                match u.scheme_str() {
                    Some("http") if self.tls.has_tls_settings() => out.push(ConfigIssue::new(
                        "endpoint",
                        "http:// means plaintext, so the tls settings would be ignored; use https://",
                    )),
                    Some("https") if self.tls.insecure => out.push(ConfigIssue::new(
                        "tls.insecure",
                        "https:// needs TLS; remove insecure: true or use http://",
                    )),
                    _ => {}
                }
            }
        }
        if let Err(i) = self.header_map() {
            out.extend(i);
        }
        out.extend(check_label_names("external_labels", &self.external_labels));
        if self.push_interval.is_zero() {
            out.push(ConfigIssue::new("push_interval", "must be above 0s"));
        }
        if self.timeout.is_zero() {
            out.push(ConfigIssue::new("timeout", "must be above 0s"));
        }
        if self.max_series_per_request == 0 {
            out.push(ConfigIssue::new(
                "max_series_per_request",
                "must be at least 1",
            ));
        }
        let r = &self.retry_on_failure;
        if r.enabled && (r.initial_interval.is_zero() || r.multiplier < 1.0) {
            out.push(ConfigIssue::new(
                "retry_on_failure",
                "initial_interval must be above 0s and multiplier at least 1",
            ));
        }
        out
    }

    pub fn endpoints(&self) -> Vec<String> {
        let Ok(uri) = self.url() else {
            return Vec::new();
        };
        let Some(host) = uri.host() else {
            return Vec::new();
        };
        let default_port = if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        vec![format!("{host}:{}", uri.port_u16().unwrap_or(default_port))]
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        self.build_with(ctx, RedRegistry::global()).map(|(r, _)| r)
    }

    /// Builds against a given registry; also returns the push counters.
    pub fn build_with(
        &self,
        ctx: &BuildContext,
        registry: Arc<RedRegistry>,
    ) -> Result<(RunningExporter, Arc<PushStats>), ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(&ctx.id, all.join("; ")));
        }
        let url = self
            .url()
            .map_err(|i| ComponentError::build(&ctx.id, i.to_string()))?;
        let headers = self
            .header_map()
            .map_err(|_| ComponentError::build(&ctx.id, "headers: invalid HTTP header"))?;
        // Reads the TLS files now, so a missing or broken one stops the start-up with its key.
        let tls_files = self.encrypts().then(|| {
            std::sync::Mutex::new(TlsFiles {
                contents: read_tls_files(&self.tls),
                settings: self.tls.clone(),
                timeout: self.timeout,
            })
        });
        let connector =
            crate::otlp::connector(&self.tls, self.encrypts(), ALPN_HTTP1, self.timeout)
                .map_err(|m| ComponentError::build(&ctx.id, m))?;
        let pusher = Arc::new(Pusher {
            id: ctx.id.clone(),
            url,
            headers,
            client: std::sync::Mutex::new(http_client(connector)),
            tls_files,
            opts: Encoding {
                namespace: sanitize_name(&self.namespace),
                external_labels: self
                    .external_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                exemplars: self.send_exemplars,
            },
            timeout: self.timeout,
            retry: self.retry_on_failure.clone(),
            registry: registry.clone(),
            stats: Arc::new(PushStats::default()),
            max_per_request: self.max_series_per_request,
            last_ms: AtomicI64::new(i64::MIN),
        });
        tracing::info!(exporter = %ctx.id, url = %pusher.url, "prometheus_remote_write exporter ready");
        let stats = pusher.stats.clone();
        let stop = CancellationToken::new();
        let interval = self.push_interval;
        let push_task = tokio::spawn(pusher.clone().run(interval, stop.clone()));
        let (tx, rx) = mpsc::channel::<SpanBatch>(INPUT_CAPACITY);
        let done = tokio::spawn(async move {
            note_kept(rx, &registry).await;
            stop.cancel();
            let _ = push_task.await;
        });
        Ok((RunningExporter { input: tx, done }, stats))
    }
}

/// Counts of one exporter, beside the metrics.
#[derive(Debug, Default)]
pub struct PushStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Why the last given-up push failed.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl PushStats {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Exporter-level naming of the pushed series.
#[derive(Debug, Clone, Default)]
pub struct Encoding {
    pub namespace: String,
    pub external_labels: Vec<(String, String)>,
    /// Attach bucket exemplars.
    pub exemplars: bool,
}

fn series(
    name: String,
    labels: &[(String, String)],
    extra: Option<(&str, String)>,
    value: f64,
    ts: i64,
) -> prompb::TimeSeries {
    let mut l: Vec<prompb::Label> = Vec::with_capacity(labels.len() + 2);
    l.push(prompb::Label {
        name: "__name__".into(),
        value: name,
    });
    l.extend(labels.iter().map(|(k, v)| prompb::Label {
        name: k.clone(),
        value: v.clone(),
    }));
    if let Some((k, v)) = extra {
        l.push(prompb::Label {
            name: k.into(),
            value: v,
        });
    }
    // Remote write requires labels sorted by name.
    l.sort_by(|a, b| a.name.cmp(&b.name));
    prompb::TimeSeries {
        labels: l,
        samples: vec![prompb::Sample {
            value,
            timestamp: ts,
        }],
        exemplars: Vec::new(),
    }
}

/// The `WriteRequest` of the current totals, stamped `now_ms`.
pub fn write_request(sets: &[SetSnapshot], enc: &Encoding, now_ms: i64) -> prompb::WriteRequest {
    let mut req = prompb::WriteRequest::default();
    for set in sets.iter().filter(|s| !s.series.is_empty()) {
        let calls = series_name(&enc.namespace, &set.cfg.calls_name());
        let dur = series_name(&enc.namespace, &set.cfg.duration_name());
        req.metadata.push(prompb::MetricMetadata {
            r#type: prompb::COUNTER,
            metric_family_name: calls.clone(),
            help: format!("Spans seen by {}.", set.id),
            unit: String::new(),
        });
        req.metadata.push(prompb::MetricMetadata {
            r#type: prompb::HISTOGRAM,
            metric_family_name: dur.clone(),
            help: format!("Span durations seen by {}.", set.id),
            unit: set.cfg.unit.suffix().into(),
        });
        for s in &set.series {
            let labels = label_set(s, &enc.external_labels);
            req.timeseries
                .push(series(calls.clone(), &labels, None, s.calls as f64, now_ms));
            for (le, count, ex) in s.cumulative(&set.cfg.bounds) {
                let mut ts = series(
                    format!("{dur}_bucket"),
                    &labels,
                    Some(("le", fmt_float(le))),
                    count as f64,
                    now_ms,
                );
                if let (true, Some(e)) = (enc.exemplars, ex) {
                    ts.exemplars.push(prompb::Exemplar {
                        labels: vec![
                            prompb::Label {
                                name: "span_id".into(),
                                value: e.span_id.to_hex(),
                            },
                            prompb::Label {
                                name: "trace_id".into(),
                                value: e.trace_id.to_hex(),
                            },
                        ],
                        value: e.value,
                        timestamp: (e.time_unix_ns / 1_000_000) as i64,
                    });
                }
                req.timeseries.push(ts);
            }
            req.timeseries
                .push(series(format!("{dur}_sum"), &labels, None, s.sum, now_ms));
            req.timeseries.push(series(
                format!("{dur}_count"),
                &labels,
                None,
                s.calls as f64,
                now_ms,
            ));
        }
    }
    req
}

/// Splits a request into requests of at most `max` time series; the metadata goes with the first.
/// An empty request gives no request at all.
pub fn split(req: prompb::WriteRequest, max: usize) -> Vec<prompb::WriteRequest> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut metadata = req.metadata;
    let mut ts = req.timeseries.into_iter().peekable();
    while ts.peek().is_some() {
        out.push(prompb::WriteRequest {
            timeseries: ts.by_ref().take(max).collect(),
            metadata: std::mem::take(&mut metadata),
        });
    }
    out
}

/// Protobuf, then snappy's block format (not the framed one), as remote write wants.
pub fn encode_body(req: &prompb::WriteRequest) -> Result<Bytes, snap::Error> {
    let raw = req.encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .map(Bytes::from)
}

type HttpClient = Client<Connector, Full<Bytes>>;

fn http_client(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The TLS settings of an `https://` endpoint and the bytes of their files when the current
/// client was built.
struct TlsFiles {
    settings: TlsConfig,
    timeout: Duration,
    contents: Vec<Option<Vec<u8>>>,
}

/// The bytes of `ca_file`, `cert_file` and `key_file` (`None`: not set, or unreadable now).
fn read_tls_files(tls: &TlsConfig) -> Vec<Option<Vec<u8>>> {
    [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .map(|p| p.as_ref().and_then(|p| std::fs::read(p).ok()))
        .collect()
}

struct Pusher {
    id: String,
    url: Uri,
    headers: HeaderMap,
    /// Replaced (with a fresh connection pool) when the TLS files change.
    client: std::sync::Mutex<HttpClient>,
    /// `None` for plaintext.
    tls_files: Option<std::sync::Mutex<TlsFiles>>,
    opts: Encoding,
    timeout: Duration,
    retry: RetryConfig,
    registry: Arc<RedRegistry>,
    stats: Arc<PushStats>,
    max_per_request: usize,
    /// The timestamp of the last push: each push gets a later one, because Prometheus refuses a
    /// second, different sample at the same millisecond (the final push may follow a tick's).
    last_ms: AtomicI64,
}

impl Pusher {
    async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.push_once().await,
            }
        }
        // The last totals, after every span has been counted.
        self.push_once().await;
    }

    /// Rebuilds the client when the TLS files changed since it was built.
    fn reload_tls(&self) {
        let Some(files) = &self.tls_files else {
            return;
        };
        let mut f = files.lock().unwrap_or_else(|p| p.into_inner());
        let now = read_tls_files(&f.settings);
        if now == f.contents {
            return;
        }
        let path = f
            .settings
            .cert_file
            .as_ref()
            .or(f.settings.ca_file.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        match crate::otlp::connector(&f.settings, true, ALPN_HTTP1, f.timeout) {
            Ok(connector) => {
                *self.client.lock().unwrap_or_else(|p| p.into_inner()) = http_client(connector);
                f.contents = now;
                metrics::counter!(TLS_RELOADS, "path" => path.clone()).increment(1);
                tracing::info!(exporter = %self.id, file = %path, "TLS files changed; new connections use them");
            }
            Err(e) => {
                metrics::counter!(TLS_RELOAD_FAILURES, "path" => path.clone()).increment(1);
                tracing::warn!(exporter = %self.id, error = %e, "TLS reload failed; keeping the previous config");
            }
        }
    }

    async fn push_once(&self) {
        self.reload_tls();
        let sets = self.registry.snapshot();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let prev = self.last_ms.load(Ordering::Relaxed);
        let now_ms = wall.max(prev.saturating_add(1));
        self.last_ms.store(now_ms, Ordering::Relaxed);
        let req = write_request(&sets, &self.opts, now_ms);
        for part in split(req, self.max_per_request) {
            self.push_request(&part).await;
        }
    }

    async fn push_request(&self, req: &prompb::WriteRequest) {
        let samples = req.timeseries.len() as u64;
        let body = match encode_body(req) {
            Ok(b) => b,
            Err(e) => {
                self.failed(&ExportError::permanent(format!("snappy: {e}")), 1);
                return;
            }
        };
        let mut backoff = Backoff::new(&self.retry);
        let start = tokio::time::Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match tokio::time::timeout(self.timeout, self.send(body.clone())).await {
                Ok(Ok(())) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(PUSHES, "exporter" => self.id.clone(), "outcome" => "sent")
                        .increment(1);
                    metrics::counter!(SENT_SAMPLES, "exporter" => self.id.clone())
                        .increment(samples);
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => ExportError::retryable(format!(
                    "{}: no answer within {:?}",
                    self.url, self.timeout
                )),
            };
            if !err.retryable || !self.retry.enabled {
                self.failed(&err, attempts);
                return;
            }
            let mut wait = backoff.next_delay(rand::random::<f64>());
            if let Some(asked) = err.retry_after {
                wait = wait.max(asked);
            }
            let budget = self.retry.max_elapsed_time;
            if !budget.is_zero() && start.elapsed() + wait > budget {
                self.failed(&err, attempts);
                return;
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(RETRIES, "exporter" => self.id.clone()).increment(1);
            tracing::debug!(exporter = %self.id, error = %err, ?wait, "remote write failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn failed(&self, err: &ExportError, attempts: u32) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(err.to_string());
        metrics::counter!(PUSHES, "exporter" => self.id.clone(), "outcome" => "failed")
            .increment(1);
        tracing::warn!(exporter = %self.id, error = %err, attempts, "remote write push given up");
    }

    async fn send(&self, body: Bytes) -> Result<(), ExportError> {
        let mut req = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/x-protobuf")
            .header(CONTENT_ENCODING, "snappy")
            .header("X-Prometheus-Remote-Write-Version", REMOTE_WRITE_VERSION)
            .body(Full::new(body))
            .map_err(|e| ExportError::permanent(format!("building the request: {e}")))?;
        for (k, v) in &self.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let resp = client
            .request(req)
            .await
            .map_err(|e| ExportError::retryable(format!("{}: {}", self.url, causes(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text: String = String::from_utf8_lossy(&body)
            .trim()
            .chars()
            .take(256)
            .collect();
        let message = format!("{}: HTTP {status}: {text}", self.url);
        if status.as_u16() == 429 || status.is_server_error() {
            Err(ExportError::retryable(message).with_retry_after(retry_after))
        } else {
            Err(ExportError::permanent(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::sync::Mutex;
    use tailweave_core::red::{DurationUnit, Observation, RedSetConfig};
    use tailweave_core::{SpanId, TraceId};

    fn registry() -> Arc<RedRegistry> {
        let reg = RedRegistry::new();
        let set = reg
            .register(
                "span_metrics",
                RedSetConfig {
                    namespace: "traces_span_metrics".into(),
                    unit: DurationUnit::Milliseconds,
                    bounds: vec![10.0],
                    label_names: vec!["service_name".into(), "status_code".into()],
                    max_series: 10,
                    exemplars: false,
                    max_pending_traces: 0,
                },
            )
            .unwrap();
        let mut w = set.writer();
        for (st, d) in [
            ("STATUS_CODE_UNSET", 5.0),
            ("STATUS_CODE_UNSET", 20.0),
            ("STATUS_CODE_ERROR", 1.0),
        ] {
            w.observe(&Observation {
                labels: &[Some(Cow::Borrowed("cart")), Some(Cow::Borrowed(st))],
                duration: d,
                trace_id: TraceId([1; 16]),
                span_id: SpanId([1; 8]),
                end_unix_ns: 0,
            });
        }
        drop(w);
        reg
    }

    fn find<'a>(
        req: &'a prompb::WriteRequest,
        want: &[(&str, &str)],
    ) -> Vec<&'a prompb::TimeSeries> {
        req.timeseries
            .iter()
            .filter(|t| {
                want.iter()
                    .all(|(k, v)| t.labels.iter().any(|l| l.name == *k && l.value == *v))
            })
            .collect()
    }

    #[test]
    fn write_request_holds_counters_and_histograms_with_sorted_labels() {
        let enc = Encoding {
            namespace: String::new(),
            external_labels: vec![
                ("cluster".into(), "eu1".into()),
                ("service_name".into(), "ignored".into()),
            ],
            exemplars: false,
        };
        let req = write_request(&registry().snapshot(), &enc, 1234);
        // 2 series x (calls + 2 buckets + sum + count)
        assert_eq!(req.timeseries.len(), 10);
        for t in &req.timeseries {
            let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted);
            assert_eq!(t.samples[0].timestamp, 1234);
            assert!(t
                .labels
                .iter()
                .any(|l| l.name == "cluster" && l.value == "eu1"));
            assert!(
                !t.labels.iter().any(|l| l.value == "ignored"),
                "a series' own label wins"
            );
        }
        let errors = find(
            &req,
            &[
                ("__name__", "traces_span_metrics_calls_total"),
                ("status_code", "STATUS_CODE_ERROR"),
            ],
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].samples[0].value, 1.0);
        let inf = find(
            &req,
            &[
                (
                    "__name__",
                    "traces_span_metrics_duration_milliseconds_bucket",
                ),
                ("status_code", "STATUS_CODE_UNSET"),
                ("le", "+Inf"),
            ],
        );
        assert_eq!(inf[0].samples[0].value, 2.0);
        let le10 = find(
            &req,
            &[
                (
                    "__name__",
                    "traces_span_metrics_duration_milliseconds_bucket",
                ),
                ("status_code", "STATUS_CODE_UNSET"),
                ("le", "10"),
            ],
        );
        assert_eq!(le10[0].samples[0].value, 1.0);
        // The body round-trips through snappy and protobuf.
        let body = encode_body(&req).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        assert_eq!(prompb::WriteRequest::decode(raw.as_slice()).unwrap(), req);
    }

    #[test]
    fn exemplars_of_kept_traces_ride_on_their_buckets_when_asked() {
        let reg = RedRegistry::new();
        let set = reg
            .register(
                "span_metrics",
                RedSetConfig {
                    namespace: "m".into(),
                    unit: DurationUnit::Milliseconds,
                    bounds: vec![10.0],
                    label_names: vec!["service_name".into()],
                    max_series: 10,
                    exemplars: true,
                    max_pending_traces: 10,
                },
            )
            .unwrap();
        let mut w = set.writer();
        for (t, d) in [(1u8, 5.0), (2, 50.0)] {
            w.observe(&Observation {
                labels: &[Some(Cow::Borrowed("cart"))],
                duration: d,
                trace_id: TraceId([t; 16]),
                span_id: SpanId([t; 8]),
                end_unix_ns: 7_000_000,
            });
        }
        drop(w);
        reg.mark_kept(&[TraceId([2; 16])]);
        let mut enc = Encoding {
            exemplars: true,
            ..Default::default()
        };
        let req = write_request(&reg.snapshot(), &enc, 1);
        let with: Vec<&prompb::TimeSeries> = req
            .timeseries
            .iter()
            .filter(|t| !t.exemplars.is_empty())
            .collect();
        assert_eq!(with.len(), 1, "only the bucket of the kept trace");
        assert!(with[0]
            .labels
            .iter()
            .any(|l| l.name == "le" && l.value == "+Inf"));
        let e = &with[0].exemplars[0];
        assert_eq!((e.value, e.timestamp), (50.0, 7));
        assert!(e
            .labels
            .iter()
            .any(|l| l.name == "trace_id" && l.value == TraceId([2; 16]).to_hex()));
        enc.exemplars = false;
        let req = write_request(&reg.snapshot(), &enc, 1);
        assert!(req.timeseries.iter().all(|t| t.exemplars.is_empty()));
    }

    #[test]
    fn large_pushes_are_split_with_metadata_in_the_first_request() {
        let req = write_request(&registry().snapshot(), &Encoding::default(), 1);
        let all = req.timeseries.clone();
        let parts = split(req, 4);
        assert_eq!(
            parts.iter().map(|p| p.timeseries.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(parts[0].metadata.len(), 2);
        assert!(parts[1..].iter().all(|p| p.metadata.is_empty()));
        let joined: Vec<_> = parts.into_iter().flat_map(|p| p.timeseries).collect();
        assert_eq!(joined, all);
        assert!(split(prompb::WriteRequest::default(), 4).is_empty());
    }

    #[test]
    fn validate_paths() {
        let c = PrometheusRemoteWriteExporterConfig {
            endpoint: "ftp://x".into(),
            external_labels: [("0bad".to_string(), "v".to_string())].into(),
            push_interval: Duration::ZERO,
            ..Default::default()
        };
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec!["endpoint", "external_labels.0bad", "push_interval"]
        );
        let ok = PrometheusRemoteWriteExporterConfig {
            endpoint: "http://127.0.0.1:9090/api/v1/write".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_empty());
        assert_eq!(ok.endpoints(), vec!["127.0.0.1:9090"]);
    }

    #[derive(Default)]
    struct Seen {
        answers: Vec<u16>,
        requests: Vec<(http::HeaderMap, prompb::WriteRequest)>,
    }

    /// Answers the remote-write requests of one connection: records each, then answers with the
    /// next of `answers` (204 when none is left).
    async fn serve<IO>(io: IO, seen: Arc<Mutex<Seen>>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
                let wr = prompb::WriteRequest::decode(raw.as_slice()).unwrap();
                let mut st = seen.lock().unwrap();
                st.requests.push((parts.headers, wr));
                let code = if st.answers.is_empty() {
                    204
                } else {
                    st.answers.remove(0)
                };
                let mut r = http::Response::new(Full::new(Bytes::from_static(b"nope")));
                *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                Ok::<_, std::convert::Infallible>(r)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    }

    /// A remote-write receiver answering with `answers` in turn, then 204.
    async fn receiver(answers: Vec<u16>) -> (String, Arc<Mutex<Seen>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen {
            answers,
            ..Default::default()
        }));
        let s2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                tokio::spawn(serve(stream, s2.clone()));
            }
        });
        (format!("http://{addr}/api/v1/write"), seen)
    }

    fn cfg(url: String) -> PrometheusRemoteWriteExporterConfig {
        PrometheusRemoteWriteExporterConfig {
            endpoint: url,
            external_labels: [("cluster".to_string(), "eu1".to_string())].into(),
            // Long enough that only the final push (at shutdown) happens in these tests.
            push_interval: Duration::from_secs(3600),
            retry_on_failure: RetryConfig {
                initial_interval: Duration::from_millis(1),
                max_interval: Duration::from_millis(5),
                max_elapsed_time: Duration::from_secs(30),
                ..RetryConfig::default()
            },
            ..Default::default()
        }
    }

    fn ctx() -> BuildContext {
        BuildContext {
            id: "prometheus_remote_write".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn retries_5xx_and_429_then_delivers_with_the_protocol_headers() {
        let (url, seen) = receiver(vec![503, 429]).await;
        let (running, stats) = cfg(url).build_with(&ctx(), registry()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!((stats.sent(), stats.retries(), stats.failed()), (1, 2, 0));
        let st = seen.lock().unwrap();
        assert_eq!(st.requests.len(), 3);
        let (h, wr) = st.requests.last().unwrap();
        assert_eq!(h["content-encoding"], "snappy");
        assert_eq!(h["content-type"], "application/x-protobuf");
        assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
        assert_eq!(wr.timeseries.len(), 10);
    }

    #[tokio::test]
    async fn a_4xx_answer_is_final_and_counted() {
        let (url, seen) = receiver(vec![400]).await;
        let (running, stats) = cfg(url).build_with(&ctx(), registry()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!((stats.sent(), stats.retries(), stats.failed()), (0, 0, 1));
        assert_eq!(seen.lock().unwrap().requests.len(), 1);
    }

    #[tokio::test]
    async fn retries_stop_after_max_elapsed_time() {
        let (url, seen) = receiver(vec![500; 1000]).await;
        let mut c = cfg(url);
        c.retry_on_failure.max_elapsed_time = Duration::from_millis(30);
        let (running, stats) = c.build_with(&ctx(), registry()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent(), 0);
        assert_eq!(stats.failed(), 1);
        let n = seen.lock().unwrap().requests.len() as u64;
        assert!(
            n >= 2 && n == stats.retries() + 1,
            "{n} requests, {} retries",
            stats.retries()
        );
    }

    #[tokio::test]
    async fn every_push_is_stamped_later_than_the_one_before() {
        let (url, seen) = receiver(vec![]).await;
        let mut c = cfg(url);
        c.push_interval = Duration::from_millis(1);
        let (running, stats) = c.build_with(&ctx(), registry()).unwrap();
        while stats.sent() < 5 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(running.input);
        running.done.await.unwrap();
        let st = seen.lock().unwrap();
        let stamps: Vec<i64> = st
            .requests
            .iter()
            .map(|(_, wr)| wr.timeseries[0].samples[0].timestamp)
            .collect();
        assert!(stamps.len() >= 6, "{stamps:?}");
        assert!(stamps.windows(2).all(|w| w[1] > w[0]), "{stamps:?}");
    }

    #[tokio::test]
    async fn nothing_is_pushed_without_series() {
        let (url, seen) = receiver(vec![]).await;
        let (running, stats) = cfg(url).build_with(&ctx(), RedRegistry::new()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent() + stats.failed(), 0);
        assert!(seen.lock().unwrap().requests.is_empty());
    }

    // ---- TLS ----------------------------------------------------------------------------------

    use crate::test_pki::Pki;
    use std::path::Path;
    use tailweave_core::tls::{ServerTls, ServerTlsSettings};

    /// What a TLS receiver saw besides the requests: the DER of the first certificate each
    /// client presented (`None`: none), per finished handshake.
    type Handshakes = Arc<Mutex<Vec<Option<Vec<u8>>>>>;

    /// A remote-write receiver over TLS with `pki`'s `server` leaf (for `127.0.0.1`), asking for
    /// client certificates signed by `client_ca` when given. Always answers 204.
    async fn tls_receiver(
        pki: &Pki,
        client_ca: Option<&Path>,
    ) -> (String, Arc<Mutex<Seen>>, Handshakes) {
        let (c, k) = pki.leaf("server", &["127.0.0.1"]);
        let mut settings = ServerTlsSettings::new(c, k);
        settings.client_ca_file = client_ca.map(Path::to_path_buf);
        let tls = Arc::new(ServerTls::new(settings, &[ALPN_HTTP1]).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shakes = Handshakes::default();
        let (s2, h2) = (seen.clone(), shakes.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (tls, seen, shakes) = (tls.clone(), s2.clone(), h2.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    shakes.lock().unwrap().push(peer);
                    serve(stream, seen).await;
                });
            }
        });
        (format!("https://{addr}/api/v1/write"), seen, shakes)
    }

    fn tls_cfg(url: String, tls: TlsConfig) -> PrometheusRemoteWriteExporterConfig {
        let mut c = cfg(url);
        c.tls = tls;
        // Enough for a couple of attempts: a refused handshake is retried as a connection error.
        c.retry_on_failure.max_elapsed_time = Duration::from_millis(30);
        c
    }

    fn trusting(pki: &Pki) -> TlsConfig {
        TlsConfig {
            ca_file: Some(pki.path("ca.pem")),
            ..Default::default()
        }
    }

    /// Builds, lets the final push run, and returns `(sent, failed)` and the last error.
    async fn push_err(c: &PrometheusRemoteWriteExporterConfig) -> ((u64, u64), String) {
        let (running, stats) = c.build_with(&ctx(), registry()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        (
            (stats.sent(), stats.failed()),
            stats.last_error().unwrap_or_default(),
        )
    }

    async fn push(c: &PrometheusRemoteWriteExporterConfig) -> (u64, u64) {
        push_err(c).await.0
    }

    #[tokio::test]
    async fn https_delivers_to_a_trusted_ca_and_refuses_an_untrusted_server() {
        let pki = Pki::new("remote write ca");
        let (url, seen, shakes) = tls_receiver(&pki, None).await;

        assert_eq!(push(&tls_cfg(url.clone(), trusting(&pki))).await, (1, 0));
        {
            let st = seen.lock().unwrap();
            assert_eq!(st.requests.len(), 1);
            let (h, wr) = &st.requests[0];
            assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
            assert_eq!(wr.timeseries.len(), 10);
        }
        assert_eq!(
            *shakes.lock().unwrap(),
            vec![None],
            "no client certificate asked"
        );

        // A server whose certificate another CA signed: no handshake, nothing delivered, the push
        // counted as failed.
        let other = Pki::new("someone else's ca");
        let (counts, e) = push_err(&tls_cfg(url.clone(), trusting(&other))).await;
        assert_eq!(counts, (0, 1));
        assert!(e.contains("UnknownIssuer"), "the cause is logged: {e}");
        // Plaintext to the TLS port: the server sees no ClientHello and drops the connection.
        let plain = url.replacen("https://", "http://", 1);
        assert_eq!(push(&tls_cfg(plain, TlsConfig::default())).await, (0, 1));
        assert_eq!(
            seen.lock().unwrap().requests.len(),
            1,
            "only the trusted push"
        );
        assert_eq!(shakes.lock().unwrap().len(), 1);

        // The name checked is the URL's host unless overridden: a certificate for 127.0.0.1
        // does not pass as `collector.internal`.
        let mut wrong_name = trusting(&pki);
        wrong_name.server_name_override = Some("collector.internal".into());
        assert_eq!(push(&tls_cfg(url, wrong_name)).await, (0, 1));
        assert_eq!(seen.lock().unwrap().requests.len(), 1);
    }

    #[tokio::test]
    async fn mtls_presents_the_client_certificate_when_configured() {
        let pki = Pki::new("remote write ca");
        let (url, seen, shakes) = tls_receiver(&pki, Some(&pki.path("ca.pem"))).await;

        // Without a client certificate the server refuses the handshake.
        assert_eq!(push(&tls_cfg(url.clone(), trusting(&pki))).await, (0, 1));
        assert!(seen.lock().unwrap().requests.is_empty());
        assert!(shakes.lock().unwrap().is_empty());

        // A client certificate from another CA is refused too.
        let other = Pki::new("someone else's ca");
        let (oc, ok) = other.leaf("client", &["client"]);
        let foreign = TlsConfig {
            cert_file: Some(oc),
            key_file: Some(ok),
            ..trusting(&pki)
        };
        assert_eq!(push(&tls_cfg(url.clone(), foreign)).await, (0, 1));
        assert!(seen.lock().unwrap().requests.is_empty());

        let (cc, ck) = pki.leaf("client", &["client"]);
        let with_cert = TlsConfig {
            cert_file: Some(cc.clone()),
            key_file: Some(ck),
            ..trusting(&pki)
        };
        assert_eq!(push(&tls_cfg(url, with_cert)).await, (1, 0));
        assert_eq!(seen.lock().unwrap().requests.len(), 1);
        let pem = std::fs::read(&cc).unwrap();
        let want = tailweave_core::tls::parse_certs(&pem, &cc).unwrap();
        assert_eq!(
            *shakes.lock().unwrap(),
            vec![Some(want[0].as_ref().to_vec())],
            "the server saw our client certificate"
        );
    }

    #[test]
    fn tls_settings_are_validated_with_key_paths() {
        let parse = |y: &str| -> PrometheusRemoteWriteExporterConfig {
            tailweave_core::config::parse(serde_yaml::from_str(y).unwrap()).unwrap()
        };
        let paths =
            |y: &str| -> Vec<String> { parse(y).validate().into_iter().map(|i| i.path).collect() };
        let https = "endpoint: https://prom.example:9090/api/v1/write";
        assert!(paths(https).is_empty());
        assert_eq!(parse(https).endpoints(), ["prom.example:9090"]);
        assert_eq!(
            parse("endpoint: https://prom.example/api/v1/write").endpoints(),
            ["prom.example:443"]
        );
        assert_eq!(
            paths("endpoint: http://prom:9090/w\ntls: {ca_file: /ca.pem}"),
            ["endpoint"],
            "tls settings on a plaintext URL"
        );
        assert_eq!(
            paths(&format!("{https}\ntls: {{insecure: true}}")),
            ["tls.insecure"]
        );
        assert_eq!(
            paths(&format!("{https}\ntls: {{cert_file: /c.pem, ca_file: ''}}")),
            ["tls.ca_file", "tls.key_file"]
        );
        assert_eq!(
            paths(&format!(
                "{https}\ntls: {{server_name_override: 'not a name!'}}"
            )),
            ["tls.server_name_override"]
        );
        assert_eq!(paths("endpoint: ftp://prom/w"), ["endpoint"]);
        let unknown = tailweave_core::config::parse::<PrometheusRemoteWriteExporterConfig>(
            serde_yaml::from_str(&format!("{https}\ntls: {{ca: /x}}")).unwrap(),
        )
        .unwrap_err();
        assert!(unknown.path.starts_with("tls"), "{unknown:?}");

        // A CA file that is not there stops the build, naming the key and the path.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-ca.pem");
        let c = parse(&format!("{https}\ntls: {{ca_file: {}}}", missing.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(async { c.build_with(&ctx(), registry()).map(|_| ()) })
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls") && e.contains("missing-ca.pem"), "{e}");
    }

    /// Polls `done` every few milliseconds; panics after 20 s (a bound, not a timing assertion).
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_rotated_client_certificate_is_used_from_the_next_push() {
        let pki = Pki::new("remote write ca");
        let (url, seen, shakes) = tls_receiver(&pki, Some(&pki.path("ca.pem"))).await;
        // The exporter's own files, which the rotation overwrites in place.
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        let other = Pki::new("someone else's ca");
        let (oc, ok) = other.leaf("client", &["client"]);
        std::fs::copy(&oc, &cert).unwrap();
        std::fs::copy(&ok, &key).unwrap();
        let mut c = tls_cfg(
            url,
            TlsConfig {
                cert_file: Some(cert.clone()),
                key_file: Some(key.clone()),
                ..trusting(&pki)
            },
        );
        c.push_interval = Duration::from_millis(10);
        c.retry_on_failure.enabled = false;
        let (running, stats) = c.build_with(&ctx(), registry()).unwrap();
        until("a push refused for the foreign certificate", || {
            stats.failed() >= 1
        })
        .await;
        assert_eq!(stats.sent(), 0);
        assert!(seen.lock().unwrap().requests.is_empty());

        let (gc, gk) = pki.leaf("client", &["client"]);
        std::fs::copy(&gk, &key).unwrap();
        std::fs::copy(&gc, &cert).unwrap();
        until("a push with the rotated certificate", || stats.sent() >= 1).await;
        drop(running.input);
        running.done.await.unwrap();
        assert!(!seen.lock().unwrap().requests.is_empty());
        let pem = std::fs::read(&gc).unwrap();
        let want = tailweave_core::tls::parse_certs(&pem, &gc).unwrap();
        let shakes = shakes.lock().unwrap();
        assert!(!shakes.is_empty());
        assert!(
            shakes
                .iter()
                .all(|s| s.as_deref() == Some(want[0].as_ref())),
            "every accepted handshake presented the rotated certificate"
        );
    }
}
