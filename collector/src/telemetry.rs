//! Self-telemetry: the Prometheus `/metrics` endpoint, the `health_check` extension, logs, and the
//! RSS sampler that feeds the memory budget.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tailweave_core::limiter::{current_rss, heap_in_use, MemoryLimiter};
use tailweave_core::names;
use tailweave_exporters::queue::EXPORTER_DECISION_TO_EXPORT_SECONDS;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::LogsConfig;

/// Where log lines go: stderr, or nowhere when stderr cannot take them (its reader is gone, a
/// closed pipe). A failed write is counted (`tailweave_log_lines_lost_total`) and the line
/// dropped: a collector whose log reader died must go on moving spans. tracing-subscriber's
/// default answer to a failed write is an `eprintln!`, which panics on a closed stderr: the
/// collector then died at start-up, and a task that logged while running ended (the e2e bench's
/// "exporter stopped" after the bench process holding the pipe was killed).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if std::io::stderr().lock().write_all(buf).is_err() {
            metrics::counter!(names::LOG_LINES_LOST).increment(1);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the global log subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logs(cfg: &LogsConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .log_internal_errors(false);
    let _ = if cfg.encoding == "json" {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ])
                .expect("static buckets are valid")
                // The decision-to-export latency is what the e2e bench reads a p99 from: with the
                // general buckets it could only say "between 100 and 250 ms".
                .set_buckets_for_metric(
                    Matcher::Full(EXPORTER_DECISION_TO_EXPORT_SECONDS.to_string()),
                    &[
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15,
                        0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
                        60.0,
                    ],
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, which this process never does.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves `/metrics` on a bound listener until `shutdown`.
pub fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = t.tick() => upkeep.run_upkeep(),
            }
        }
    });
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(handle);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    })
}

async fn render(State(h): State<PrometheusHandle>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], h.render())
}

/// Whether every pipeline is running; read by the health endpoint.
#[derive(Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves the health endpoint (`GET <path>`: 200 while healthy, 503 otherwise).
pub fn serve_health(
    listener: TcpListener,
    path: String,
    health: Health,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route(&path, get(health_status))
        .with_state(health);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    })
}

async fn health_status(State(h): State<Health>) -> impl IntoResponse {
    if h.get() {
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"status":"Server available"}"#,
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            r#"{"status":"Server not available"}"#,
        )
    }
}

/// Samples RSS and live heap bytes into their gauges and the memory budget.
pub fn sample_rss(
    limiter: Option<Arc<MemoryLimiter>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let every = if limiter.is_some() {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = t.tick() => {
                    if let Some(rss) = current_rss() {
                        metrics::gauge!(names::PROCESS_RSS_BYTES).set(rss as f64);
                        let heap = heap_in_use();
                        if let Some(h) = heap {
                            metrics::gauge!(names::PROCESS_HEAP_BYTES).set(h as f64);
                        }
                        if let Some(l) = &limiter {
                            let was = l.over_soft_limit();
                            l.observe_with_heap(rss, heap);
                            if l.over_soft_limit() != was {
                                tracing::warn!(rss_mib = rss >> 20, soft_limit_mib = l.soft_limit_bytes >> 20,
                                    refusing = !was, "memory budget {}", if was { "recovered: accepting again" } else { "exceeded: receivers refuse with retryable errors" });
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Binds a TCP listener, naming what it is for in the error.
pub async fn bind(what: &str, addr: &str) -> anyhow::Result<TcpListener> {
    let sa: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(addr)
            .await
            .map_err(|e| anyhow::anyhow!("{what}: cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{what}: {addr} resolves to no address"))?,
    };
    TcpListener::bind(sa)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: cannot bind {addr}: {e}"))
}
