//! The `prometheus` exporter: serves the span metrics (RED) of the process on `/metrics`.
//!
//! What it serves is the [`RedRegistry`] that `span_metrics` processors write, not the spans of its
//! own pipeline. Spans still reach it: it notes the trace id of every span it receives as *kept*
//! ([`RedRegistry::mark_kept`]) and otherwise drops them. Placed after `tail_sampling`, that makes
//! the histogram exemplars point only at traces the backend has (see `processors::span_metrics`
//! and `examples/red-metrics.yaml`).
//!
//! The Prometheus text format (0.0.4) is the default answer. A scraper that asks for
//! `application/openmetrics-text` (Prometheus does when exemplar storage is on) gets OpenMetrics
//! 1.0 with exemplars (`# {trace_id="...",span_id="..."} value timestamp`), unless
//! `enable_open_metrics: false`.
//!
//! With a `tls` block (the receivers' [`ServerTlsSettings`]: `cert_file`, `key_file`,
//! `client_ca_file` for mTLS, `reload_interval`, `handshake_timeout`) `/metrics` is served over
//! HTTPS only. The files are loaded at build, so a missing or broken one stops the start-up with
//! its key (`tls.cert_file`, ...); they are read again every `reload_interval` at the next
//! handshake, and a rotation that does not load keeps the previous certificate. Each handshake
//! runs in the connection's own task, bounded by `handshake_timeout` and, in number, by
//! [`MAX_PENDING_HANDSHAKES`], so a stalled or plaintext client never holds the accept loop; a
//! failed one is counted ([`TLS_HANDSHAKE_FAILURES`]) and the listener goes on.
//!
//! # Layout
//! The pure part ([`render`], [`series_name`], [`label_set`]) is shared with
//! `prometheus_remote_write`; the server is a plain hyper HTTP/1 loop on a socket bound at build,
//! over TCP or over TLS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

/// Longest a connection may take to send its request head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::red::{sanitize_name, RedRegistry, SeriesSnapshot, SetSnapshot};
use tailweave_core::tls::{ServerTls, ServerTlsSettings, ALPN_HTTP1};
use tailweave_core::{ComponentError, SpanBatch, TraceId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::RunningExporter;

/// The content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Scrapes answered.
pub const SCRAPES: &str = "tailweave_prometheus_exporter_scrapes_total";
/// Counter (`exporter`, `reason`: `timeout` or `error`): TLS handshakes on the scrape port that
/// failed (plaintext scrapers, missing or untrusted client certificates, stalled clients).
pub const TLS_HANDSHAKE_FAILURES: &str = "tailweave_exporter_tls_handshake_failures_total";
/// Handshakes in progress at once, at most; at the bound the loop stops accepting and the
/// kernel's backlog holds further scrapers. A scrape port sees a handful of scrapers, not fleets.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Batches the input holds before the pipeline waits; the input task only reads trace ids.
const INPUT_CAPACITY: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusExporterConfig {
    /// `host:port` to serve `/metrics` on. Required (the Collector's usual one is `0.0.0.0:8889`).
    pub endpoint: String,
    /// Prefix added to every metric name, before the `span_metrics` namespace. Default none.
    pub namespace: String,
    /// Labels added to every series. Default none.
    pub const_labels: BTreeMap<String, String>,
    /// Answer OpenMetrics with exemplars when the scraper asks for it. Default `true`.
    pub enable_open_metrics: bool,
    /// Serve `/metrics` over HTTPS with this certificate (`cert_file`, `key_file`, optional
    /// `client_ca_file` for mTLS, `reload_interval`, `handshake_timeout`), as the receivers do.
    /// Default none: plain HTTP.
    pub tls: Option<ServerTlsSettings>,
}

impl Default for PrometheusExporterConfig {
    fn default() -> Self {
        PrometheusExporterConfig {
            endpoint: String::new(),
            namespace: String::new(),
            const_labels: BTreeMap::new(),
            enable_open_metrics: true,
            tls: None,
        }
    }
}

/// Checks a `host:port` without resolving it (validation is pure).
pub(crate) fn check_host_port(key: &str, v: &str) -> Option<ConfigIssue> {
    let v = v.trim();
    if v.is_empty() {
        return Some(ConfigIssue::new(
            key,
            "required: host:port, e.g. 0.0.0.0:8889",
        ));
    }
    let Some((host, port)) = v.rsplit_once(':') else {
        return Some(ConfigIssue::new(key, format!("{v:?} is not host:port")));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Some(ConfigIssue::new(key, format!("{v:?} is not host:port")));
    }
    None
}

/// Checks the names of extra labels.
pub(crate) fn check_label_names(key: &str, labels: &BTreeMap<String, String>) -> Vec<ConfigIssue> {
    labels
        .keys()
        .filter(|k| !valid_label_name(k))
        .map(|k| {
            ConfigIssue::new(
                format!("{key}.{k}"),
                "a label name is [a-zA-Z_][a-zA-Z0-9_]* and does not start with __",
            )
        })
        .collect()
}

fn valid_label_name(k: &str) -> bool {
    let mut chars = k.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.starts_with("__")
}

impl PrometheusExporterConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        out.extend(check_host_port("endpoint", &self.endpoint));
        out.extend(check_label_names("const_labels", &self.const_labels));
        if let Some(t) = &self.tls {
            // The settings, then (when they are complete) whether the files are there, as the
            // receivers do: a missing certificate is the likely mistake, and `validate` catches it.
            let found = t.validate("tls");
            if found.is_empty() {
                out.extend(t.check_files("tls"));
            }
            out.extend(found);
        }
        out
    }

    /// Loads the certificate files, reporting a missing one with its key first (the loader's
    /// own error names only the path).
    fn load_tls(&self, id: &str) -> Result<Option<Arc<ServerTls>>, ComponentError> {
        let Some(t) = &self.tls else {
            return Ok(None);
        };
        let missing = t.check_files("tls");
        if !missing.is_empty() {
            let all: Vec<String> = missing.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(id, all.join("; ")));
        }
        ServerTls::new(t.clone(), &[ALPN_HTTP1])
            .map(|t| Some(Arc::new(t)))
            .map_err(|e| ComponentError::build(id, format!("tls: {e}")))
    }

    /// The listening address, so the self-filter recognises scrapes of it.
    pub fn endpoints(&self) -> Vec<String> {
        if self.endpoint.trim().is_empty() {
            Vec::new()
        } else {
            vec![self.endpoint.trim().to_string()]
        }
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        self.build_with(ctx, RedRegistry::global()).map(|(r, _)| r)
    }

    /// Builds against a given registry; also returns the bound address (tests bind port 0).
    pub fn build_with(
        &self,
        ctx: &BuildContext,
        registry: Arc<RedRegistry>,
    ) -> Result<(RunningExporter, SocketAddr), ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(&ctx.id, all.join("; ")));
        }
        // Before binding: a bad certificate must not leave a half-started listener behind.
        let tls = self.load_tls(&ctx.id)?;
        let addr = self.endpoint.trim().to_string();
        let bind_err = |source| ComponentError::Bind {
            component: ctx.id.clone(),
            addr: addr.clone(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(&addr).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let local = std_listener.local_addr().map_err(bind_err)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?;
        tracing::info!(exporter = %ctx.id, addr = %local, tls = tls.is_some(),
            "serving span metrics on /metrics");

        let opts = RenderOptions {
            namespace: sanitize_name(&self.namespace),
            const_labels: self
                .const_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let scrape = Arc::new(Scrape {
            registry: registry.clone(),
            opts,
            open_metrics: self.enable_open_metrics,
            id: ctx.id.clone(),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, tls, scrape, stop.clone()));
        let (tx, rx) = mpsc::channel::<SpanBatch>(INPUT_CAPACITY);
        let done = tokio::spawn(async move {
            note_kept(rx, &registry).await;
            stop.cancel();
            let _ = server.await;
        });
        Ok((RunningExporter { input: tx, done }, local))
    }
}

/// Reads the pipeline's spans only for their trace ids: those traces were kept.
pub(crate) async fn note_kept(mut rx: mpsc::Receiver<SpanBatch>, registry: &RedRegistry) {
    let mut ids: Vec<TraceId> = Vec::new();
    while let Some(batch) = rx.recv().await {
        ids.clear();
        ids.extend(batch.spans.iter().map(|s| s.trace_id));
        ids.sort_unstable();
        ids.dedup();
        registry.mark_kept(&ids);
    }
}

/// What every connection needs to answer a scrape.
struct Scrape {
    registry: Arc<RedRegistry>,
    opts: RenderOptions,
    open_metrics: bool,
    id: String,
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<ServerTls>>,
    scrape: Arc<Scrape>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = match &tls {
            None => None,
            Some(_) => tokio::select! {
                _ = stop.cancelled() => break,
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
            },
        };
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        let (stream, peer) = match conn {
            Ok(c) => c,
            Err(e) => {
                // Accept errors (too many open files) are transient; keep serving.
                tracing::warn!(exporter = %scrape.id, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, scrape, stop) = (tls.clone(), scrape.clone(), stop.clone());
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(stream, scrape, stop).await;
            };
            let handshake = tokio::select! {
                _ = stop.cancelled() => return,
                h = tls.accept(stream) => h,
            };
            drop(permit);
            match handshake {
                Ok(s) => serve_connection(s, scrape, stop).await,
                Err(e) => {
                    let reason = if e.kind() == std::io::ErrorKind::TimedOut {
                        "timeout"
                    } else {
                        "error"
                    };
                    metrics::counter!(TLS_HANDSHAKE_FAILURES,
                        "exporter" => scrape.id.clone(), "reason" => reason)
                    .increment(1);
                    // Debug, not warn: a port scanner must not flood the log.
                    tracing::debug!(exporter = %scrape.id, %peer, error = %e,
                        "TLS handshake failed");
                }
            }
        });
    }
}

/// Answers the scrapes of one connection (plain or decrypted) until it closes or the exporter
/// stops.
async fn serve_connection<IO>(io: IO, scrape: Arc<Scrape>, stop: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = answer(
            &req,
            &scrape.registry,
            &scrape.opts,
            scrape.open_metrics,
            &scrape.id,
        );
        async move { Ok::<_, Infallible>(resp) }
    });
    // A scraper that connects and then sends its request slowly holds a task, not the listener;
    // the header-read timeout bounds it.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop.cancelled() => {}
    }
}

fn answer(
    req: &Request<Incoming>,
    registry: &RedRegistry,
    opts: &RenderOptions,
    open_metrics: bool,
    id: &str,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let wants_om = open_metrics
        && req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("application/openmetrics-text"));
    metrics::counter!(SCRAPES, "exporter" => id.to_string()).increment(1);
    let body = render(&registry.snapshot(), opts, wants_om);
    let ctype = if wants_om {
        OPENMETRICS_CONTENT_TYPE
    } else {
        TEXT_CONTENT_TYPE
    };
    reply(StatusCode::OK, ctype, body)
}

/// The exporter-level naming: a prefix and constant labels.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Already sanitized; may be empty.
    pub namespace: String,
    pub const_labels: Vec<(String, String)>,
}

/// `{exporter namespace}_{name}`.
pub fn series_name(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}_{name}")
    }
}

/// The labels of a series: its own, then the constant ones it does not already have.
pub fn label_set(s: &SeriesSnapshot, extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut labels = s.labels.clone();
    for (k, v) in extra {
        if !labels.iter().any(|(n, _)| n == k) {
            labels.push((k.clone(), v.clone()));
        }
    }
    labels
}

/// A float as Prometheus writes it.
pub fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_labels(out: &mut String, labels: &[(String, String)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(le.map(|l| ("le", l)))
    {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape(v, out);
        out.push('"');
    }
    out.push('}');
}

/// Renders every set as Prometheus text, or as OpenMetrics with exemplars.
pub fn render(sets: &[SetSnapshot], opts: &RenderOptions, open_metrics: bool) -> String {
    let mut out = String::new();
    for set in sets.iter().filter(|s| !s.series.is_empty()) {
        let calls = series_name(&opts.namespace, &set.cfg.calls_name());
        let family = if open_metrics {
            series_name(&opts.namespace, &set.cfg.calls_family())
        } else {
            calls.clone()
        };
        let _ = writeln!(
            out,
            "# HELP {family} Spans seen by {}, per service, operation, kind and status (errors: status_code=\"STATUS_CODE_ERROR\").",
            set.id
        );
        let _ = writeln!(out, "# TYPE {family} counter");
        for s in &set.series {
            out.push_str(&calls);
            write_labels(&mut out, &label_set(s, &opts.const_labels), None);
            let _ = writeln!(out, " {}", s.calls);
        }
        let dur = series_name(&opts.namespace, &set.cfg.duration_name());
        let _ = writeln!(
            out,
            "# HELP {dur} Span durations in {} seen by {}.",
            set.cfg.unit.suffix(),
            set.id
        );
        let _ = writeln!(out, "# TYPE {dur} histogram");
        for s in &set.series {
            let labels = label_set(s, &opts.const_labels);
            for (le, count, ex) in s.cumulative(&set.cfg.bounds) {
                let _ = write!(out, "{dur}_bucket");
                write_labels(&mut out, &labels, Some(&fmt_float(le)));
                let _ = write!(out, " {count}");
                if let (true, Some(e)) = (open_metrics, ex) {
                    let _ = write!(
                        out,
                        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {:.3}",
                        e.trace_id.to_hex(),
                        e.span_id.to_hex(),
                        fmt_float(e.value),
                        e.time_unix_ns as f64 / 1e9
                    );
                }
                out.push('\n');
            }
            let _ = write!(out, "{dur}_sum");
            write_labels(&mut out, &labels, None);
            let _ = writeln!(out, " {}", fmt_float(s.sum));
            let _ = write!(out, "{dur}_count");
            write_labels(&mut out, &labels, None);
            let _ = writeln!(out, " {}", s.calls);
        }
    }
    if open_metrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use tailweave_core::red::{DurationUnit, Observation, RedSetConfig};
    use tailweave_core::SpanId;

    fn registry() -> Arc<RedRegistry> {
        let reg = RedRegistry::new();
        let set = reg
            .register(
                "span_metrics",
                RedSetConfig {
                    namespace: "traces_span_metrics".into(),
                    unit: DurationUnit::Milliseconds,
                    bounds: vec![2.0, 10.0],
                    label_names: vec!["service_name".into(), "span_name".into()],
                    max_series: 10,
                    exemplars: true,
                    max_pending_traces: 100,
                },
            )
            .unwrap();
        let mut w = set.writer();
        let labels = [
            Some(Cow::Borrowed("cart")),
            Some(Cow::Borrowed("GET \"x\"")),
        ];
        for (t, d) in [(1u8, 1.5), (2, 5.0), (3, 50.0)] {
            w.observe(&Observation {
                labels: &labels,
                duration: d,
                trace_id: TraceId([t; 16]),
                span_id: SpanId([t; 8]),
                end_unix_ns: 1_700_000_000_500_000_000,
            });
        }
        drop(w);
        reg
    }

    #[test]
    fn renders_prometheus_text_with_namespace_and_const_labels() {
        let reg = registry();
        let opts = RenderOptions {
            namespace: "tw".into(),
            const_labels: vec![("region".into(), "eu".into())],
        };
        let text = render(&reg.snapshot(), &opts, false);
        let want = [
            "# TYPE tw_traces_span_metrics_calls_total counter",
            r#"tw_traces_span_metrics_calls_total{service_name="cart",span_name="GET \"x\"",region="eu"} 3"#,
            "# TYPE tw_traces_span_metrics_duration_milliseconds histogram",
            r#"tw_traces_span_metrics_duration_milliseconds_bucket{service_name="cart",span_name="GET \"x\"",region="eu",le="2"} 1"#,
            r#"tw_traces_span_metrics_duration_milliseconds_bucket{service_name="cart",span_name="GET \"x\"",region="eu",le="10"} 2"#,
            r#"tw_traces_span_metrics_duration_milliseconds_bucket{service_name="cart",span_name="GET \"x\"",region="eu",le="+Inf"} 3"#,
            r#"tw_traces_span_metrics_duration_milliseconds_sum{service_name="cart",span_name="GET \"x\"",region="eu"} 56.5"#,
            r#"tw_traces_span_metrics_duration_milliseconds_count{service_name="cart",span_name="GET \"x\"",region="eu"} 3"#,
        ];
        for w in want {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in\n{text}");
        }
        assert!(
            !text.contains("trace_id"),
            "no exemplars in the text format"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_shows_exemplars_of_kept_traces_only() {
        let reg = registry();
        reg.mark_kept(&[TraceId([2; 16])]);
        let text = render(&reg.snapshot(), &RenderOptions::default(), true);
        assert!(text.contains("# TYPE traces_span_metrics_calls counter"));
        let with_ex: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(with_ex.len(), 1, "{text}");
        assert_eq!(
            with_ex[0],
            format!(
                r#"traces_span_metrics_duration_milliseconds_bucket{{service_name="cart",span_name="GET \"x\"",le="10"}} 2 # {{trace_id="{}",span_id="{}"}} 5 1700000000.500"#,
                TraceId([2; 16]).to_hex(),
                SpanId([2; 8]).to_hex()
            )
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn validate_paths() {
        let c = PrometheusExporterConfig {
            endpoint: "nope".into(),
            const_labels: [("bad-name".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, vec!["endpoint", "const_labels.bad-name"]);
        let ok = PrometheusExporterConfig {
            endpoint: "127.0.0.1:0".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_empty());
    }

    /// One `GET` over an open stream; `Err` when the server closed it without an answer.
    async fn get_over<S>(
        mut s: S,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(u16, String, String), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(a) = accept {
            req.push_str(&format!("Accept: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // TLS 1.3 reports a refused client certificate only at the first read.
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        let ctype = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or("")
            .to_string();
        Ok((status, ctype, body.to_string()))
    }

    async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        get_over(s, path, accept).await.unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_and_marks_traces_that_reach_it_as_kept() {
        let reg = registry();
        let cfg = PrometheusExporterConfig {
            endpoint: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let ctx = BuildContext {
            id: "prometheus".into(),
            ..Default::default()
        };
        let (running, addr) = cfg.build_with(&ctx, reg.clone()).unwrap();
        let (st, ctype, body) = get(addr, "/metrics", None).await;
        assert_eq!(st, 200);
        assert_eq!(ctype, TEXT_CONTENT_TYPE);
        assert!(body.contains("traces_span_metrics_calls_total{"));
        assert_eq!(get(addr, "/other", None).await.0, 404);

        // A kept span of trace 3 reaches the exporter: its exemplar appears.
        let scope = Arc::new(tailweave_core::Scope::default());
        let p = tailweave_core::proto::tonic::trace::v1::Span {
            trace_id: vec![3; 16],
            span_id: vec![3; 8],
            ..Default::default()
        };
        running
            .input
            .send(SpanBatch::new(vec![tailweave_core::Span::from_proto(
                scope, &p,
            )]))
            .await
            .unwrap();
        let want = TraceId([3; 16]).to_hex();
        let mut seen = false;
        for _ in 0..200 {
            let (_, ctype, body) =
                get(addr, "/metrics", Some("application/openmetrics-text")).await;
            assert_eq!(ctype, OPENMETRICS_CONTENT_TYPE);
            if body.contains(&want) {
                seen = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(seen, "exemplar of the kept trace never appeared");
        drop(running.input);
        running.done.await.unwrap();
        // The listener is gone once the exporter is done.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    mod tls {
        use super::*;
        use crate::test_pki::Pki;
        use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
        use std::path::PathBuf;
        use tailweave_core::tls::tokio_rustls::TlsConnector;
        use tailweave_core::tls::ClientTlsSettings;

        fn start(reg: Arc<RedRegistry>, tls: ServerTlsSettings) -> (RunningExporter, SocketAddr) {
            let cfg = PrometheusExporterConfig {
                endpoint: "127.0.0.1:0".into(),
                tls: Some(tls),
                ..Default::default()
            };
            let ctx = BuildContext {
                id: "prometheus/tls".into(),
                ..Default::default()
            };
            cfg.build_with(&ctx, reg).unwrap()
        }

        /// `/metrics` over HTTPS as `client` sees it.
        async fn https_get(
            addr: SocketAddr,
            client: &ClientTlsSettings,
        ) -> Result<(u16, String, String), String> {
            let cfg = client
                .client_config(&[ALPN_HTTP1])
                .map_err(|e| e.to_string())?;
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = client.server_name("localhost").map_err(|e| e.to_string())?;
            let s = TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            get_over(s, "/metrics", None).await
        }

        fn failures(snap: &Snapshotter, reason: &str) -> u64 {
            snap.snapshot()
                .into_vec()
                .into_iter()
                .filter(|(k, _, _, _)| {
                    let key = k.key();
                    key.name() == TLS_HANDSHAKE_FAILURES
                        && key
                            .labels()
                            .any(|l| l.key() == "exporter" && l.value() == "prometheus/tls")
                        && key
                            .labels()
                            .any(|l| l.key() == "reason" && l.value() == reason)
                })
                .map(|(_, _, _, v)| match v {
                    DebugValue::Counter(n) => n,
                    _ => 0,
                })
                .sum()
        }

        /// Polls the failure count until `total` reaches `want`, for a bounded number of
        /// rounds: the count is made in the server's connection task. A snapshot drains the
        /// recorder's counters, so `total` adds them up across calls.
        async fn wait_failures(snap: &Snapshotter, total: &mut u64, want: u64) {
            for _ in 0..500 {
                *total += failures(snap, "error");
                if *total >= want {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(*total, want, "handshake failures counted");
        }

        // A current-thread runtime (the default of `tokio::test`): every task of the exporter
        // records on this thread, into this test's recorder.
        #[tokio::test]
        async fn https_scrape_is_served_and_a_plaintext_one_refused_without_stopping() {
            let recorder = DebuggingRecorder::new();
            let snap = recorder.snapshotter();
            let _guard = metrics::set_default_local_recorder(&recorder);
            let pki = Pki::new("scrape ca");
            let (c, k) = pki.leaf("server", &["localhost"]);
            let (running, addr) = start(registry(), ServerTlsSettings::new(c, k));

            let (st, ctype, body) = https_get(addr, &pki.trusted_by_client()).await.unwrap();
            assert_eq!((st, ctype.as_str()), (200, TEXT_CONTENT_TYPE));
            assert!(body.contains("traces_span_metrics_calls_total{"), "{body}");
            let mut total = 0;
            wait_failures(&snap, &mut total, 0).await;

            // Plaintext to the TLS port: read as a bad ClientHello, closed without an answer.
            let plain = tokio::net::TcpStream::connect(addr).await.unwrap();
            let e = get_over(plain, "/metrics", None).await.unwrap_err();
            assert!(!e.contains("traces_span_metrics"), "{e}");
            wait_failures(&snap, &mut total, 1).await;

            // A scraper that trusts another CA refuses the server; that is a failure too.
            let other = Pki::new("other ca");
            let e = https_get(addr, &other.trusted_by_client())
                .await
                .unwrap_err();
            assert!(
                e.contains("certificate") || e.contains("Certificate"),
                "{e}"
            );
            wait_failures(&snap, &mut total, 2).await;

            // The listener kept serving.
            let (st, _, body) = https_get(addr, &pki.trusted_by_client()).await.unwrap();
            assert_eq!(st, 200);
            assert!(body.contains("traces_span_metrics_duration_milliseconds_bucket{"));

            drop(running.input);
            running.done.await.unwrap();
            assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        }

        #[tokio::test]
        async fn a_stalled_handshake_holds_only_its_own_connection_and_times_out() {
            let recorder = DebuggingRecorder::new();
            let snap = recorder.snapshotter();
            let _guard = metrics::set_default_local_recorder(&recorder);
            let pki = Pki::new("scrape ca");
            let (c, k) = pki.leaf("server", &["localhost"]);

            // A client that connects and never says hello, under the default 10s bound: were
            // the handshake run by the accept loop, the scrape would wait for it; the generous
            // deadline only turns that hang into a failure.
            let (running, addr) = start(registry(), ServerTlsSettings::new(&c, &k));
            let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
            let client = pki.trusted_by_client();
            let scrape = https_get(addr, &client);
            let (st, _, _) = tokio::time::timeout(std::time::Duration::from_secs(8), scrape)
                .await
                .expect("the scrape waited for the stalled handshake")
                .unwrap();
            assert_eq!(st, 200);
            drop(running.input);
            running.done.await.unwrap();

            // Under a short bound the server drops the stalled client and counts it as such.
            let mut settings = ServerTlsSettings::new(&c, &k);
            settings.handshake_timeout = std::time::Duration::from_millis(100);
            let (running, addr) = start(registry(), settings);
            let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::new();
            let _ = stalled.read_to_end(&mut buf).await;
            assert!(buf.is_empty(), "{buf:?}");
            let mut timeouts = 0;
            for _ in 0..500 {
                timeouts += failures(&snap, "timeout");
                if timeouts > 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert_eq!(timeouts, 1);
            assert_eq!(failures(&snap, "error"), 0);
            assert_eq!(
                https_get(addr, &pki.trusted_by_client()).await.unwrap().0,
                200
            );
            drop(running.input);
            running.done.await.unwrap();
        }

        #[tokio::test]
        async fn mtls_refuses_a_scraper_without_a_good_client_certificate() {
            let pki = Pki::new("scrape ca");
            let (c, k) = pki.leaf("server", &["localhost"]);
            let (cc, ck) = pki.leaf("scraper", &["scraper"]);
            let mut settings = ServerTlsSettings::new(c, k);
            settings.client_ca_file = Some(pki.path("ca.pem"));
            let (running, addr) = start(registry(), settings);

            let e = https_get(addr, &pki.trusted_by_client()).await.unwrap_err();
            assert!(
                e.contains("certificate") || e.contains("Certificate"),
                "{e}"
            );

            let other = Pki::new("other ca");
            let (oc, ok) = other.leaf("scraper", &["scraper"]);
            let foreign = ClientTlsSettings {
                cert_file: Some(oc),
                key_file: Some(ok),
                ..pki.trusted_by_client()
            };
            assert!(https_get(addr, &foreign).await.is_err());

            let good = ClientTlsSettings {
                cert_file: Some(cc),
                key_file: Some(ck),
                ..pki.trusted_by_client()
            };
            let (st, _, body) = https_get(addr, &good).await.unwrap();
            assert_eq!(st, 200);
            assert!(body.contains("traces_span_metrics_calls_total{"), "{body}");
            drop(running.input);
            running.done.await.unwrap();
        }

        #[tokio::test]
        async fn a_rotated_certificate_is_served_after_reload_interval() {
            let old = Pki::new("old ca");
            let (c, k) = old.leaf("server", &["localhost"]);
            let mut settings = ServerTlsSettings::new(&c, &k);
            // The shortest interval there is: every handshake after a millisecond re-reads.
            settings.reload_interval = std::time::Duration::from_millis(1);
            let (running, addr) = start(registry(), settings);
            assert_eq!(
                https_get(addr, &old.trusted_by_client()).await.unwrap().0,
                200
            );
            let new = Pki::new("new ca");
            assert!(https_get(addr, &new.trusted_by_client()).await.is_err());

            // Rotate in place. A handshake between the two copies sees a mismatched pair, keeps
            // the old certificate and re-reads at a later one.
            let (nc, nk) = new.leaf("server", &["localhost"]);
            std::fs::copy(&nc, &c).unwrap();
            std::fs::copy(&nk, &k).unwrap();
            let mut served = false;
            for _ in 0..500 {
                if https_get(addr, &new.trusted_by_client()).await.is_ok() {
                    served = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(served, "the rotated certificate was never served");
            assert!(https_get(addr, &old.trusted_by_client()).await.is_err());

            // A broken rotation keeps the working certificate.
            std::fs::write(&k, "not a key").unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert_eq!(
                https_get(addr, &new.trusted_by_client()).await.unwrap().0,
                200
            );
            drop(running.input);
            running.done.await.unwrap();
        }

        #[test]
        fn tls_settings_are_validated_with_their_keys() {
            let cfg = |yaml: &str| -> PrometheusExporterConfig {
                tailweave_core::config::parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
            };
            let paths = |c: &PrometheusExporterConfig| -> Vec<String> {
                c.validate().into_iter().map(|i| i.path).collect()
            };
            assert_eq!(
                paths(&cfg("{endpoint: '127.0.0.1:0', tls: {cert_file: c.pem}}")),
                ["tls.key_file"]
            );
            assert_eq!(
                paths(&cfg("{endpoint: '127.0.0.1:0', tls: {key_file: k.pem}}")),
                ["tls.cert_file"]
            );
            assert_eq!(
                paths(&cfg(
                    "{endpoint: x, tls: {cert_file: '', key_file: k, client_ca_file: '', handshake_timeout: 0s}}"
                )),
                [
                    "endpoint",
                    "tls.cert_file",
                    "tls.client_ca_file",
                    "tls.handshake_timeout"
                ]
            );
            let full = cfg(
                "{endpoint: '127.0.0.1:0', tls: {cert_file: c, key_file: k, client_ca_file: ca, reload_interval: 1m}}",
            );
            // Complete settings: `validate` then checks the files, which are not there.
            assert_eq!(
                paths(&full),
                ["tls.cert_file", "tls.key_file", "tls.client_ca_file"]
            );
            let tls = full.tls.unwrap();
            assert_eq!(tls.reload_interval, std::time::Duration::from_secs(60));
            assert_eq!(tls.client_ca_file, Some(PathBuf::from("ca")));
            // Without a tls block: plain HTTP, nothing to check.
            assert!(cfg("{endpoint: '127.0.0.1:0'}").tls.is_none());
            // Unknown keys in the block are refused.
            assert!(tailweave_core::config::parse::<PrometheusExporterConfig>(
                serde_yaml::from_str(
                    "{endpoint: '127.0.0.1:0', tls: {cert_file: c, key_file: k, ca_file: x}}"
                )
                .unwrap()
            )
            .is_err());
        }

        #[tokio::test]
        async fn bad_certificate_files_fail_the_build_with_their_key() {
            let pki = Pki::new("ca");
            let (c, k) = pki.leaf("server", &["localhost"]);
            let ctx = BuildContext {
                id: "prometheus".into(),
                ..Default::default()
            };
            let build = |tls: ServerTlsSettings| {
                PrometheusExporterConfig {
                    endpoint: "127.0.0.1:0".into(),
                    tls: Some(tls),
                    ..Default::default()
                }
                .build_with(&ctx, registry())
                .map(|_| ())
                .unwrap_err()
                .to_string()
            };
            let e = build(ServerTlsSettings::new(pki.path("missing.pem"), &k));
            assert!(
                e.contains("tls.cert_file") && e.contains("missing.pem"),
                "{e}"
            );
            let e = build(ServerTlsSettings::new(&c, pki.path("missing.key")));
            assert!(
                e.contains("tls.key_file") && e.contains("missing.key"),
                "{e}"
            );
            let mut with_ca = ServerTlsSettings::new(&c, &k);
            with_ca.client_ca_file = Some(pki.path("missing-ca.pem"));
            let e = build(with_ca);
            assert!(e.contains("tls.client_ca_file"), "{e}");
            // The files are there but the key file holds a certificate.
            let e = build(ServerTlsSettings::new(&c, &c));
            assert!(
                e.starts_with("prometheus: tls:") && e.contains("private key"),
                "{e}"
            );
            // A settings problem fails the build before any file is read.
            let e = build(ServerTlsSettings {
                key_file: None,
                ..ServerTlsSettings::new(&c, &k)
            });
            assert!(e.contains("tls.key_file"), "{e}");
        }
    }
}
