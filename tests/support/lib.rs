//! Test support for the end-to-end tests and benches: start the real `tailweave` binary on free
//! loopback ports and poll its readiness, an in-process OTLP/gRPC sink that can be stalled, a small
//! HTTP client, `/metrics` scraping, and the Python OpenTelemetry SDK environment.
//!
//! Nothing here sleeps for a fixed time to wait for readiness: every wait polls a condition with a
//! bounded deadline.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `tailweave` binary, built once per test process (`cargo build` is a no-op when fresh).
pub fn tailweave_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("TAILWEAVE_BIN") {
            return PathBuf::from(p);
        }
        if std::env::var("TAILWEAVE_TEST_RELEASE").is_err() {
            build_tailweave(&[]);
            return target_dir().join("debug").join("tailweave");
        }
        // Its own target directory: `cargo bench` builds the same crates under the same
        // profile with the suite's features, and sharing `target/release` made each of the two
        // builds undo the other (minutes of rebuild per bench run).
        let dir = target_dir().join("bench-bin");
        let dir = dir.to_str().expect("a UTF-8 target directory");
        build_tailweave(&["--release", "--target-dir", dir]);
        Path::new(dir).join("release").join("tailweave")
    })
    .clone()
}

/// `cargo build -q -p tailweave-collector --bin tailweave` with `extra` arguments (e.g.
/// `--release`, `--features ...`), from the workspace root; panics if the build fails.
pub fn build_tailweave(extra: &[&str]) {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args([
            "build",
            "-q",
            "-p",
            "tailweave-collector",
            "--bin",
            "tailweave",
        ])
        .args(extra)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "cargo build of tailweave {extra:?} failed");
}

/// The shared cargo target directory (`CARGO_TARGET_DIR`, else `target/` at the root).
pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768-60999 by default). A port the
/// kernel hands out for `bind(0)` can be taken by any outgoing connection's source port before
/// the collector binds it (CI saw "Address already in use" so); ports here are only ever taken by
/// an explicit bind.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A port that was free a moment ago on 127.0.0.1, never the same twice in one test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    // Test processes running side by side start far apart.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = PORT_RANGE.start + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?} on 127.0.0.1")
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Async version of [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Free ports for one collector instance.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub grpc: u16,
    pub http: u16,
    pub metrics: u16,
    pub health: u16,
    pub extra: [u16; 4],
}

impl Ports {
    pub fn new() -> Ports {
        Ports {
            grpc: free_port(),
            http: free_port(),
            metrics: free_port(),
            health: free_port(),
            extra: [free_port(), free_port(), free_port(), free_port()],
        }
    }
}

impl Default for Ports {
    fn default() -> Self {
        Ports::new()
    }
}

/// A running `tailweave` process. Killed on drop if still running.
pub struct Collector {
    pub child: Child,
    pub ports: Ports,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    /// Starts `tailweave --config <yaml>` and waits until the health endpoint answers 200.
    /// The YAML must enable `health_check` on `ports.health` and metrics on `ports.metrics`;
    /// `{GRPC}`, `{HTTP}`, `{METRICS}`, `{HEALTH}`, `{EXTRA0..3}` and `{DIR}` are replaced.
    pub fn start(yaml: &str, ports: Ports) -> Collector {
        Self::spawn(yaml, ports, true)
    }

    /// [`Collector::start`] with the reading ends of the collector's stdout and stderr closed
    /// at once, as when the process that read its logs died: every line it writes fails. Logs at
    /// debug level, so it writes often.
    pub fn start_without_log_reader(yaml: &str, ports: Ports) -> Collector {
        Self::spawn(yaml, ports, false)
    }

    fn spawn(yaml: &str, ports: Ports, read_logs: bool) -> Collector {
        let dir = tempfile::tempdir().expect("tempdir");
        let yaml = fill(yaml, &ports, dir.path());
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, yaml).expect("write config");
        let mut child = Command::new(tailweave_bin())
            .arg("--config")
            .arg(&cfg)
            .env(
                "RUST_LOG",
                match read_logs {
                    true => std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
                    // Lines on every retry and request: writes that fail all the time.
                    false => "debug".into(),
                },
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tailweave");
        let log = Arc::new(Mutex::new(Vec::new()));
        let streams = [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in streams.into_iter().filter(|_| read_logs) {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var("TEST_ECHO").is_ok() {
                        eprintln!("[tailweave] {line}");
                    }
                    log.lock().expect("log").push(line);
                }
            });
        }
        let mut c = Collector {
            child,
            ports,
            dir,
            log,
        };
        let health = format!("127.0.0.1:{}", ports.health);
        wait_for("tailweave health endpoint", Duration::from_secs(60), || {
            if let Ok(Some(st)) = c.child.try_wait() {
                panic!("tailweave exited early with {st}; log:\n{}", c.log_text());
            }
            match http_request(&health, "GET", "/", &[], &[]) {
                Ok((200, _, _)) => Some(()),
                _ => None,
            }
        });
        c
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.grpc)
    }
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// The current `/metrics` text.
    pub fn metrics(&self) -> String {
        let (st, _, body) = http_request(
            &format!("127.0.0.1:{}", self.ports.metrics),
            "GET",
            "/metrics",
            &[],
            &[],
        )
        .expect("scrape /metrics");
        assert_eq!(st, 200);
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` pairs).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// Runs `tailweave loadgen` at this collector's gRPC endpoint with `args` after the defaults
    /// (4 connections), writing the ground truth to `dir/truth.jsonl`. Asserts the sender saw no
    /// refusal and no failure; returns the truth file and the summary.
    pub fn loadgen(&self, dir: &Path, args: &[&str]) -> (PathBuf, serde_json::Value) {
        let truth = dir.join("truth.jsonl");
        let summary = dir.join("summary.json");
        let st = Command::new(tailweave_bin())
            .arg("loadgen")
            .args(["--endpoint", &self.grpc_endpoint(), "--connections", "4"])
            .args(args)
            .arg("--truth")
            .arg(&truth)
            .arg("--summary")
            .arg(&summary)
            .stdout(Stdio::null())
            .status()
            .expect("run loadgen");
        assert!(st.success(), "loadgen failed");
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&summary).expect("summary"))
                .expect("summary JSON");
        assert_eq!(s["refused"], 0, "loadgen saw refusals: {s}");
        assert_eq!(s["failed"], 0, "loadgen saw failures: {s}");
        (truth, s)
    }

    /// Waits until the gauge `held` (what a stateful stage still holds) is 0 and the sink has
    /// stopped growing between two looks.
    pub fn wait_drained(&self, sink: &Sink, held: &str) {
        let mut last = usize::MAX;
        wait_for(
            &format!("{held} to reach 0"),
            Duration::from_secs(120),
            || {
                let h = self.metric(held, &[]);
                let n = sink.span_count();
                let stable = n == last && h == 0.0;
                last = n;
                std::thread::sleep(Duration::from_millis(300));
                stable.then_some(())
            },
        );
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "tailweave did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces the port and dir placeholders of a config template.
pub fn fill(yaml: &str, p: &Ports, dir: &Path) -> String {
    yaml.replace("{GRPC}", &p.grpc.to_string())
        .replace("{HTTP}", &p.http.to_string())
        .replace("{METRICS}", &p.metrics.to_string())
        .replace("{HEALTH}", &p.health.to_string())
        .replace("{EXTRA0}", &p.extra[0].to_string())
        .replace("{EXTRA1}", &p.extra[1].to_string())
        .replace("{EXTRA2}", &p.extra[2].to_string())
        .replace("{EXTRA3}", &p.extra[3].to_string())
        .replace("{DIR}", &dir.display().to_string())
}

/// Sum of the samples of `name` with all `labels`, from Prometheus text.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

/// An HTTP answer: status, lower-cased header names with values, body.
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// A blocking HTTP/1.1 request over a fresh connection.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    http_exchange(s, addr, method, path, headers, body)
}

/// One HTTP/1.1 request and its answer over `s` (plain TCP, or a TLS stream a test made), with
/// `host` as the `Host` header; the connection is closed after the answer.
pub fn http_exchange(
    mut s: impl std::io::Read + std::io::Write,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok((status, hdrs, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..nl])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = nl + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
}

/// How the sink answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkMode {
    Accept,
    /// Answer UNAVAILABLE (a downstream outage).
    Unavailable,
    /// Hold every call open until the mode changes (a stalled downstream).
    Stall,
}

#[derive(Default)]
struct SinkState {
    requests: Vec<ExportTraceServiceRequest>,
    mode: Option<SinkMode>,
    calls: u64,
    /// Spans of the accepted requests.
    spans: usize,
    /// Counts requests without keeping them ([`Sink::start_counting_blocking`]).
    count_only: bool,
}

/// An in-process OTLP/gRPC sink on 127.0.0.1 collecting what it receives.
#[derive(Clone)]
pub struct Sink {
    state: Arc<Mutex<SinkState>>,
    changed: Arc<tokio::sync::Notify>,
    pub addr: SocketAddr,
}

struct SinkSvc(Sink);

#[tonic::async_trait]
impl TraceService for SinkSvc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        loop {
            let notified = self.0.changed.notified();
            let mode = self.0.mode();
            match mode {
                SinkMode::Accept => break,
                SinkMode::Unavailable => {
                    self.0.state.lock().expect("sink").calls += 1;
                    return Err(tonic::Status::unavailable("sink is down"));
                }
                SinkMode::Stall => notified.await,
            }
        }
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        let mut st = self.0.state.lock().expect("sink");
        st.calls += 1;
        st.spans += n;
        if !st.count_only {
            st.requests.push(req);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Sink {
    /// Starts a sink on a free port of the current tokio runtime.
    pub async fn start() -> Sink {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let addr = l.local_addr().expect("addr");
        let sink = Sink {
            state: Arc::new(Mutex::new(SinkState::default())),
            changed: Arc::new(tokio::sync::Notify::new()),
            addr,
        };
        let svc = TraceServiceServer::new(SinkSvc(sink.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(256 << 20);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream_from(l))
                .await;
        });
        sink
    }

    /// Starts a sink on its own runtime thread (for synchronous tests).
    pub fn start_blocking() -> Sink {
        Self::blocking(false)
    }

    /// [`Sink::start_blocking`] for benchmarks: counts spans and drops the requests (a sink that
    /// kept a million decoded game spans grew to 10 GB and became the bottleneck of the run).
    pub fn start_counting_blocking() -> Sink {
        Self::blocking(true)
    }

    fn blocking(count_only: bool) -> Sink {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let s = Sink::start().await;
                s.state.lock().expect("sink").count_only = count_only;
                tx.send(s).expect("send sink");
                std::future::pending::<()>().await;
            });
        });
        rx.recv().expect("sink started")
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    pub fn mode(&self) -> SinkMode {
        self.state
            .lock()
            .expect("sink")
            .mode
            .unwrap_or(SinkMode::Accept)
    }

    pub fn set_mode(&self, m: SinkMode) {
        self.state.lock().expect("sink").mode = Some(m);
        self.changed.notify_waiters();
    }

    pub fn calls(&self) -> u64 {
        self.state.lock().expect("sink").calls
    }

    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.state.lock().expect("sink").requests.clone()
    }

    /// Every span received, with its resource attributes and scope name.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let mut out = Vec::new();
        for r in self.requests() {
            for rs in r.resource_spans {
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        out.push(ReceivedSpan {
                            resource: rs.resource.clone().unwrap_or_default(),
                            scope: ss.scope.clone().unwrap_or_default(),
                            span: s,
                        });
                    }
                }
            }
        }
        out
    }

    /// Spans of every accepted request (counted on receipt: no copy of what the sink holds).
    pub fn span_count(&self) -> usize {
        self.state.lock().expect("sink").spans
    }
}

/// One span as the sink saw it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub resource: opentelemetry_proto::tonic::resource::v1::Resource,
    pub scope: opentelemetry_proto::tonic::common::v1::InstrumentationScope,
    pub span: ProtoSpan,
}

fn tokio_stream_from(
    l: tokio::net::TcpListener,
) -> impl futures_core_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_core_stream::unfold(l)
}

/// A tiny `Stream` over accepted connections, so the sink needs no extra crates.
mod futures_core_stream {
    pub use tokio_stream::Stream;

    pub fn unfold(
        l: tokio::net::TcpListener,
    ) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        tokio_stream::wrappers::TcpListenerStream::new(l)
    }
}

/// The Python interpreter of a venv with the OpenTelemetry SDK and OTLP exporters, created once
/// under `target/pyenv` (a file lock guards concurrent test binaries).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Ok(p) = std::env::var("TAILWEAVE_PYTHON") {
            return PathBuf::from(p);
        }
        let dir = root().join("target").join("pyenv");
        std::fs::create_dir_all(root().join("target")).expect("target dir");
        let lock =
            std::fs::File::create(root().join("target").join("pyenv.lock")).expect("lock file");
        lock.lock().expect("lock pyenv");
        let py = dir.join("bin").join("python");
        let marker = dir.join(".ready");
        if !marker.exists() {
            let st = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .status()
                .expect("python3 -m venv");
            assert!(st.success(), "python3 -m venv failed");
            let st = Command::new(&py)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(root().join("tests").join("python").join("requirements.txt"))
                .status()
                .expect("pip install");
            assert!(st.success(), "pip install of the OpenTelemetry SDK failed");
            std::fs::write(&marker, b"ok").expect("marker");
        }
        let _ = lock.unlock();
        py
    })
    .clone()
}

/// Runs a script from `tests/python/` with args; returns its stdout, panicking with stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests").join("python").join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The `extensions:` and `service:` end of a test config: the health check on `{HEALTH}` that
/// [`Collector::start`] waits for, the self-telemetry on `{METRICS}` that [`Collector::metrics`]
/// scrapes, and one `traces` pipeline. Empty `processors` leave the key out.
pub fn service_yaml(receivers: &[&str], processors: &[&str], exporters: &[&str]) -> String {
    let mut out = String::from(
        "extensions:\n  health_check:\n    endpoint: 127.0.0.1:{HEALTH}\n\
         service:\n  extensions: [health_check]\n  telemetry:\n    metrics:\n      \
         address: 127.0.0.1:{METRICS}\n  pipelines:\n    traces:\n",
    );
    out.push_str(&format!("      receivers: [{}]\n", receivers.join(", ")));
    if !processors.is_empty() {
        out.push_str(&format!("      processors: [{}]\n", processors.join(", ")));
    }
    out.push_str(&format!("      exporters: [{}]\n", exporters.join(", ")));
    out
}

/// `receivers:` with the OTLP receiver on gRPC only, on `{GRPC}`.
pub const OTLP_GRPC_RECEIVER: &str = "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{GRPC}
";

/// `receivers:` of a joining collector: SDK spans over OTLP/gRPC on `{GRPC}`, DeepFlow's spans
/// on `{EXTRA0}` (where the loadgen scenarios send their eBPF halves).
pub const SDK_AND_DEEPFLOW_RECEIVERS: &str = "receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{GRPC}
  deepflow:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{EXTRA0}
";

/// A `join` entry (to put under `processors:`) for the loadgen game scenario: tenants from the
/// namespace on both sides, and waits long enough for a trace's eBPF half sent after its SDK
/// half on a loaded 2-core machine.
pub const GAME_JOIN: &str = "  join:
    tenant:
      sdk_keys: [k8s.namespace.name]
      ebpf_keys: [df.universal_tag.pod_ns]
    wait:
      min: 2s
      idle: 1s
      max: 20s
";

/// What a finished command printed, as text.
#[derive(Debug)]
pub struct Output {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout then stderr, for assertions that do not care where a message went.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Asserts a refused config: exit code 64 (EX_USAGE) and every one of `mentions` (key
    /// paths, file names) somewhere in the output.
    pub fn assert_config_error(&self, mentions: &[&str]) {
        let text = self.text();
        assert_eq!(self.code, Some(64), "{text}");
        for m in mentions {
            assert!(text.contains(m), "{m} missing from:\n{text}");
        }
    }
}

/// Runs `cmd` to the end, capturing its output.
pub fn run_output(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tailweave validate --config <path>`.
pub fn validate_file(path: &Path) -> Output {
    run_output(
        Command::new(tailweave_bin())
            .args(["validate", "--config"])
            .arg(path),
    )
}

/// `tailweave validate` of a config given as text (written to a temporary file).
pub fn validate_config(yaml: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    validate_file(&path)
}

/// A string attribute.
pub fn str_kv(key: &str, value: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// A throwaway CA (`ca.pem`), a server certificate for `localhost` (`server.pem`, `server.key`)
/// and a client certificate (`client.pem`, `client.key`), as PEM files made with the `openssl`
/// CLI (this crate has no certificate library).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=tailweave test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        for (stem, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
            ),
            (
                "client",
                "subjectAltName=DNS:client\nextendedKeyUsage=clientAuth",
            ),
        ] {
            std::fs::write(d.join(format!("{stem}.ext")), ext).unwrap();
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{stem}.key"),
                "-out",
                &format!("{stem}.csr"),
                "-subj",
                &format!("/CN={stem}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{stem}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{stem}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{stem}.ext"),
            ]);
        }
        Pki { dir }
    }
    /// A file of this PKI, e.g. `ca.pem`.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
