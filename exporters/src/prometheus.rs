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
//! # Layout
//! The pure part ([`render`], [`series_name`], [`label_set`]) is shared with
//! `prometheus_remote_write`; the server is a plain hyper HTTP/1 loop on a socket bound at build.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::red::{sanitize_name, RedRegistry, SeriesSnapshot, SetSnapshot};
use tailweave_core::{ComponentError, SpanBatch, TraceId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::RunningExporter;

/// The content type of the Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Scrapes answered.
pub const SCRAPES: &str = "tailweave_prometheus_exporter_scrapes_total";
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
}

impl Default for PrometheusExporterConfig {
    fn default() -> Self {
        PrometheusExporterConfig {
            endpoint: String::new(),
            namespace: String::new(),
            const_labels: BTreeMap::new(),
            enable_open_metrics: true,
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
        out
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
        tracing::info!(exporter = %ctx.id, addr = %local, "serving span metrics on /metrics");

        let opts = Arc::new(RenderOptions {
            namespace: sanitize_name(&self.namespace),
            const_labels: self
                .const_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            registry.clone(),
            opts,
            self.enable_open_metrics,
            ctx.id.clone(),
            stop.clone(),
        ));
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

async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<RedRegistry>,
    opts: Arc<RenderOptions>,
    open_metrics: bool,
    id: String,
    stop: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            c = listener.accept() => c,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                // Accept errors (too many open files) are transient; keep serving.
                tracing::warn!(exporter = %id, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let opts = opts.clone();
        let id = id.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req, &registry, &opts, open_metrics, &id);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
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

    async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(a) = accept {
            req.push_str(&format!("Accept: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let ctype = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or("")
            .to_string();
        (status, ctype, body.to_string())
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
}
