//! The sending queue and retry wrapped around every exporter, like the Collector's exporterhelper.
//!
//! A batch travels: the exporter's `input` (a bounded channel of `sending_queue.queue_size`
//! batches; a full channel makes the pipeline wait, which is its backpressure) -> one of
//! `sending_queue.num_consumers` senders -> one delivery attempt bounded by `timeout` -> on a
//! retryable failure, exponential backoff with jitter (or the destination's Retry-After, whichever
//! is longer) until `retry_on_failure.max_elapsed_time` is spent. Permanent failures and exhausted
//! retries are counted per span and logged once per batch.
//!
//! When every sender of `input` is dropped, the consumers drain what is still queued (retrying as
//! usual), then the destination's `shutdown` runs and `done` completes. The collector bounds that
//! drain with its own deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tailweave_core::config::ConfigIssue;
use tailweave_core::names::{
    EXPORTER_FAILED_SPANS, EXPORTER_QUEUE_CAPACITY, EXPORTER_QUEUE_SIZE, EXPORTER_RETRIES,
    EXPORTER_SENT_SPANS,
};
use tailweave_core::{ExportError, Exporter, Span, SpanBatch};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::RunningExporter;

/// `reason` label of the failed-spans counter: the destination refused the batch for good.
pub const REASON_PERMANENT: &str = "permanent";
/// `reason` label: retryable failures went on past `max_elapsed_time`.
pub const REASON_RETRIES_EXHAUSTED: &str = "retries_exhausted";
/// `reason` label: a retryable failure with `retry_on_failure.enabled: false`.
pub const REASON_RETRY_DISABLED: &str = "retry_disabled";
/// `reason` label: spans the destination refused inside an otherwise accepted request
/// (OTLP `partial_success.rejected_spans`).
pub const REASON_REJECTED: &str = "rejected";

/// Histogram (seconds, label `exporter`): from the tail sampler's decision to keep a batch to the
/// destination's acknowledgement of it. Recorded only for batches that carry `decided_at`.
pub const EXPORTER_DECISION_TO_EXPORT_SECONDS: &str =
    "tailweave_exporter_decision_to_export_seconds";

/// Default per-attempt timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest accepted `num_consumers`: each is a task with a request in flight.
const MAX_CONSUMERS: usize = 4096;
/// How often the queue-size gauge is sampled, so it shows a queue filling while every consumer
/// is stuck retrying.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// `retry_on_failure`: what to do when a delivery attempt fails with a retryable error.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retry failures the destination may accept later. Default `true`.
    pub enabled: bool,
    /// Wait before the first retry. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Upper bound of the wait between retries (before jitter). Default `30s`.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Give up on a batch after retrying this long; `0s` retries forever. Default `300s`.
    #[serde(with = "humantime_serde")]
    pub max_elapsed_time: Duration,
    /// Each wait is the previous one times this. Default `1.5`.
    pub multiplier: f64,
    /// Each wait is drawn uniformly within this fraction around its nominal value. Default `0.5`.
    pub randomization_factor: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            enabled: true,
            initial_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
            multiplier: 1.5,
            randomization_factor: 0.5,
        }
    }
}

/// `sending_queue`: the bounded buffer between the pipeline and the destination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Buffer batches and send them concurrently. `false`: one batch in flight and one waiting,
    /// so the pipeline waits for every send. Default `true`.
    pub enabled: bool,
    /// Concurrent senders. Default `10`.
    pub num_consumers: usize,
    /// Batches the queue holds before the pipeline has to wait. Default `1000`.
    pub queue_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            num_consumers: 10,
            queue_size: 1000,
        }
    }
}

/// The `timeout`, `retry_on_failure` and `sending_queue` settings of one exporter.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    /// Bound of one attempt; zero means none (as in the Collector).
    pub timeout: Duration,
    pub retry: RetryConfig,
    pub queue: QueueConfig,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            timeout: DEFAULT_TIMEOUT,
            retry: RetryConfig::default(),
            queue: QueueConfig::default(),
        }
    }
}

impl ExportSettings {
    /// Every problem, with key paths relative to the exporter.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let r = &self.retry;
        if r.enabled {
            if r.initial_interval.is_zero() {
                out.push(ConfigIssue::new(
                    "retry_on_failure.initial_interval",
                    "must be greater than 0",
                ));
            }
            if r.max_interval < r.initial_interval {
                out.push(ConfigIssue::new(
                    "retry_on_failure.max_interval",
                    format!(
                        "must be at least initial_interval ({})",
                        humantime::format_duration(r.initial_interval)
                    ),
                ));
            }
            if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
                out.push(ConfigIssue::new(
                    "retry_on_failure.multiplier",
                    "must be a number of at least 1",
                ));
            }
            if !(0.0..=1.0).contains(&r.randomization_factor) {
                out.push(ConfigIssue::new(
                    "retry_on_failure.randomization_factor",
                    "must be between 0 and 1",
                ));
            }
        }
        let q = &self.queue;
        if q.enabled {
            if q.num_consumers == 0 || q.num_consumers > MAX_CONSUMERS {
                out.push(ConfigIssue::new(
                    "sending_queue.num_consumers",
                    format!("must be between 1 and {MAX_CONSUMERS}"),
                ));
            }
            if q.queue_size == 0 {
                out.push(ConfigIssue::new(
                    "sending_queue.queue_size",
                    "must be greater than 0",
                ));
            }
        }
        out
    }

    /// (channel capacity, consumers) as the queue will run.
    fn shape(&self) -> (usize, usize) {
        if self.queue.enabled {
            (
                self.queue.queue_size.max(1),
                self.queue.num_consumers.clamp(1, MAX_CONSUMERS),
            )
        } else {
            (1, 1)
        }
    }
}

/// What a destination answered for a batch it took.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Spans the destination refused inside the accepted request (OTLP partial success).
    pub rejected: u64,
    /// The destination's explanation, when it gave one.
    pub message: Option<String>,
}

/// One delivery attempt, with the richer answer OTLP destinations give (partial success).
/// Every [`Exporter`] is a destination through [`spawn_exporter`].
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError>;

    /// Called once after the last send.
    async fn shutdown(&self) {}
}

struct PlainExporter<E>(E);

#[async_trait]
impl<E: Exporter> Destination for PlainExporter<E> {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
        self.0.export(spans).await.map(|()| Accepted::default())
    }
    async fn shutdown(&self) {
        self.0.shutdown().await
    }
}

/// Counts kept beside the metrics, for callers and tests that need the numbers of one exporter.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub sent_spans: AtomicU64,
    pub failed_spans: AtomicU64,
    pub retries: AtomicU64,
}

impl QueueStats {
    pub fn sent(&self) -> u64 {
        self.sent_spans.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed_spans.load(Ordering::Relaxed)
    }
    pub fn retried(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// Starts the queue around a plain [`Exporter`].
pub fn spawn_exporter<E: Exporter>(
    id: &str,
    settings: &ExportSettings,
    exporter: E,
) -> RunningExporter {
    spawn(id, settings, Arc::new(PlainExporter(exporter))).0
}

/// Starts the queue around a destination. Must run inside a tokio runtime.
pub fn spawn(
    id: &str,
    settings: &ExportSettings,
    dest: Arc<dyn Destination>,
) -> (RunningExporter, Arc<QueueStats>) {
    let (capacity, consumers) = settings.shape();
    let (tx, rx) = mpsc::channel::<SpanBatch>(capacity);
    let stats = Arc::new(QueueStats::default());
    let shared = Arc::new(Shared {
        id: id.to_string(),
        settings: settings.clone(),
        dest,
        stats: stats.clone(),
    });
    metrics::gauge!(EXPORTER_QUEUE_CAPACITY, "exporter" => shared.id.clone()).set(capacity as f64);

    let weak = tx.downgrade();
    let gauge_id = shared.id.clone();
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(GAUGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A short-lived upgrade: it cannot keep the channel open past this block.
            let Some(tx) = weak.upgrade() else { break };
            let queued = tx.max_capacity() - tx.capacity();
            drop(tx);
            metrics::gauge!(EXPORTER_QUEUE_SIZE, "exporter" => gauge_id.clone()).set(queued as f64);
        }
    });

    let rx = Arc::new(Mutex::new(rx));
    let done = tokio::spawn(async move {
        let mut workers = JoinSet::new();
        for _ in 0..consumers {
            workers.spawn(consume(shared.clone(), rx.clone()));
        }
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                tracing::error!(exporter = %shared.id, error = %e, "exporter sender task failed");
            }
        }
        sampler.abort();
        metrics::gauge!(EXPORTER_QUEUE_SIZE, "exporter" => shared.id.clone()).set(0.0);
        shared.dest.shutdown().await;
        tracing::debug!(exporter = %shared.id, "exporter drained and stopped");
    });
    (RunningExporter { input: tx, done }, stats)
}

struct Shared {
    id: String,
    settings: ExportSettings,
    dest: Arc<dyn Destination>,
    stats: Arc<QueueStats>,
}

async fn consume(shared: Arc<Shared>, rx: Arc<Mutex<mpsc::Receiver<SpanBatch>>>) {
    loop {
        // One consumer waits on the channel at a time; the others wait for the lock. The lock is
        // released before sending, so sends run concurrently.
        let batch = {
            let mut rx = rx.lock().await;
            let b = rx.recv().await;
            metrics::gauge!(EXPORTER_QUEUE_SIZE, "exporter" => shared.id.clone())
                .set(rx.len() as f64);
            b
        };
        let Some(batch) = batch else { break };
        if !batch.is_empty() {
            shared.deliver(&batch.spans, batch.decided_at).await;
        }
    }
}

impl Shared {
    async fn deliver(&self, spans: &[Span], decided_at: Option<std::time::Instant>) {
        let n = spans.len() as u64;
        let id = &self.id;
        let on_retry = |e: &ExportError, wait: Duration| {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(EXPORTER_RETRIES, "exporter" => id.clone()).increment(1);
            tracing::debug!(exporter = %id, spans = n, error = %e, wait = ?wait, "export failed, retrying");
        };
        match send_with_retry(&*self.dest, spans, &self.settings, on_retry).await {
            Ok(acc) => {
                if let Some(t) = decided_at {
                    // The sampler stamps `decided_at` from the std clock, so measure with it too
                    // (tokio's clock may be paused in tests, which must not skew this).
                    let latency = std::time::Instant::now().saturating_duration_since(t);
                    metrics::histogram!(EXPORTER_DECISION_TO_EXPORT_SECONDS, "exporter" => id.clone())
                        .record(latency.as_secs_f64());
                }
                let rejected = acc.rejected.min(n);
                self.count_sent(n - rejected);
                if rejected > 0 {
                    self.count_failed(rejected, REASON_REJECTED);
                    tracing::warn!(
                        exporter = %id,
                        spans = n,
                        rejected,
                        message = acc.message.as_deref().unwrap_or(""),
                        "destination refused part of a batch"
                    );
                }
            }
            Err(f) => {
                self.count_failed(n, f.reason);
                tracing::warn!(
                    exporter = %id,
                    spans = n,
                    reason = f.reason,
                    attempts = f.attempts,
                    error = %f.error,
                    "dropping batch: export failed"
                );
            }
        }
    }

    fn count_sent(&self, n: u64) {
        if n > 0 {
            self.stats.sent_spans.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(EXPORTER_SENT_SPANS, "exporter" => self.id.clone()).increment(n);
        }
    }

    fn count_failed(&self, n: u64, reason: &'static str) {
        self.stats.failed_spans.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(EXPORTER_FAILED_SPANS, "exporter" => self.id.clone(), "reason" => reason)
            .increment(n);
    }
}

/// A batch given up on.
#[derive(Debug, Clone)]
pub struct Failure {
    /// One of the `REASON_*` labels.
    pub reason: &'static str,
    pub attempts: u32,
    /// The last error.
    pub error: ExportError,
}

/// Sends one batch, retrying as `settings` say. `on_retry` sees each retryable error and the wait
/// chosen after it. Uses tokio's clock, so tests run it under paused time.
pub async fn send_with_retry(
    dest: &dyn Destination,
    spans: &[Span],
    settings: &ExportSettings,
    mut on_retry: impl FnMut(&ExportError, Duration),
) -> Result<Accepted, Failure> {
    let start = Instant::now();
    let mut backoff = Backoff::new(&settings.retry);
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let attempt = if settings.timeout.is_zero() {
            Ok(dest.send(spans).await)
        } else {
            tokio::time::timeout(settings.timeout, dest.send(spans)).await
        };
        let error = match attempt {
            Ok(Ok(acc)) => return Ok(acc),
            Ok(Err(e)) => e,
            Err(_) => ExportError::retryable(format!(
                "no answer within {}",
                humantime::format_duration(settings.timeout)
            )),
        };
        let fail = |reason| Failure {
            reason,
            attempts,
            error: error.clone(),
        };
        if !error.retryable {
            return Err(fail(REASON_PERMANENT));
        }
        if !settings.retry.enabled {
            return Err(fail(REASON_RETRY_DISABLED));
        }
        let mut wait = backoff.next_delay(rand::random::<f64>());
        if let Some(asked) = error.retry_after {
            wait = wait.max(asked);
        }
        let budget = settings.retry.max_elapsed_time;
        // Saturating: `retry_after` comes from the network and may be absurd.
        if !budget.is_zero() && start.elapsed().saturating_add(wait) > budget {
            return Err(fail(REASON_RETRIES_EXHAUSTED));
        }
        on_retry(&error, wait);
        tokio::time::sleep(wait).await;
    }
}

/// Exponential backoff: each wait is drawn within `randomization_factor` around a nominal
/// interval that starts at `initial_interval` and grows by `multiplier` up to `max_interval`.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: f64,
    max: f64,
    multiplier: f64,
    randomization: f64,
}

impl Backoff {
    pub fn new(cfg: &RetryConfig) -> Self {
        Backoff {
            current: cfg.initial_interval.as_secs_f64(),
            max: cfg.max_interval.as_secs_f64(),
            multiplier: cfg.multiplier.max(1.0),
            randomization: cfg.randomization_factor.clamp(0.0, 1.0),
        }
    }

    /// The next wait. `unit` is a uniform draw in `[0, 1)`; passing it in keeps this pure.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let delta = self.randomization * self.current;
        let low = self.current - delta;
        let wait = low + unit * 2.0 * delta;
        self.current = (self.current * self.multiplier).min(self.max);
        Duration::try_from_secs_f64(wait.max(0.0)).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex as StdMutex;
    use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
    use tailweave_core::Scope;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn spans(n: u8) -> Vec<Span> {
        let scope = Arc::new(Scope::default());
        (1..=n)
            .map(|i| {
                Span::from_proto(
                    scope.clone(),
                    &ProtoSpan {
                        trace_id: vec![1; 16],
                        span_id: vec![i; 8],
                        name: format!("s{i}"),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    enum Step {
        Fail(ExportError),
        Hang,
        Accept(u64),
    }

    /// A scripted destination: each call takes the next step (an empty script accepts).
    #[derive(Default)]
    struct Fake {
        script: StdMutex<VecDeque<Step>>,
        calls: StdMutex<Vec<(Instant, usize)>>,
        shutdowns: StdMutex<Vec<usize>>,
        gate: Option<tokio::sync::Semaphore>,
    }

    impl Fake {
        fn with(steps: Vec<Step>) -> Arc<Fake> {
            Arc::new(Fake {
                script: StdMutex::new(steps.into()),
                ..Default::default()
            })
        }
        fn call_times(&self) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            let t0 = calls.first().map(|c| c.0);
            calls.iter().map(|c| c.0 - t0.unwrap()).collect()
        }
        fn calls(&self) -> usize {
            self.calls.lock().unwrap().len()
        }
    }

    #[async_trait]
    impl Destination for Fake {
        async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
            self.calls
                .lock()
                .unwrap()
                .push((Instant::now(), spans.len()));
            if let Some(g) = &self.gate {
                g.acquire().await.expect("gate open").forget();
            }
            let step = self.script.lock().unwrap().pop_front();
            match step {
                None => Ok(Accepted::default()),
                Some(Step::Accept(r)) => Ok(Accepted {
                    rejected: r,
                    message: Some("bad spans".into()),
                }),
                Some(Step::Fail(e)) => Err(e),
                Some(Step::Hang) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(Accepted::default())
                }
            }
        }
        async fn shutdown(&self) {
            let n = self.calls();
            self.shutdowns.lock().unwrap().push(n);
        }
    }

    fn no_jitter() -> ExportSettings {
        let mut s = ExportSettings::default();
        s.retry.randomization_factor = 0.0;
        s
    }

    async fn run(fake: &Arc<Fake>, settings: &ExportSettings, n: u8) -> Result<Accepted, Failure> {
        send_with_retry(&**fake, &spans(n), settings, |_, _| {}).await
    }

    #[test]
    fn backoff_grows_by_multiplier_up_to_max() {
        let cfg = RetryConfig::default();
        let mut b = Backoff::new(&cfg);
        // unit 0.5 is the midpoint of the jitter range: the nominal interval.
        let got: Vec<f64> = (0..7).map(|_| b.next_delay(0.5).as_secs_f64()).collect();
        let want = [5.0, 7.5, 11.25, 16.875, 25.3125, 30.0, 30.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?}");
        }
    }

    #[test]
    fn backoff_jitter_spans_the_randomization_range() {
        let cfg = RetryConfig::default();
        assert_eq!(Backoff::new(&cfg).next_delay(0.0), secs(2.5));
        assert_eq!(Backoff::new(&cfg).next_delay(1.0), secs(7.5));
        assert_eq!(Backoff::new(&cfg).next_delay(f64::NAN), secs(5.0));
        let flat = RetryConfig {
            randomization_factor: 0.0,
            ..cfg
        };
        assert_eq!(Backoff::new(&flat).next_delay(0.9), secs(5.0));
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_failures_back_off_then_deliver() {
        let fake = Fake::with(vec![
            Step::Fail(ExportError::retryable("down")),
            Step::Fail(ExportError::retryable("still down")),
        ]);
        let r = run(&fake, &no_jitter(), 3).await;
        assert!(r.is_ok());
        assert_eq!(fake.call_times(), vec![secs(0.0), secs(5.0), secs(12.5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_longer_than_backoff_is_honoured() {
        let fake = Fake::with(vec![
            Step::Fail(ExportError::retryable("throttled").with_retry_after(Some(secs(20.0)))),
            // Shorter than the backoff: the backoff wins.
            Step::Fail(ExportError::retryable("throttled").with_retry_after(Some(secs(1.0)))),
        ]);
        run(&fake, &no_jitter(), 1).await.unwrap();
        assert_eq!(fake.call_times(), vec![secs(0.0), secs(20.0), secs(27.5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_retry_after_gives_up_without_waiting() {
        let fake = Fake::with(vec![Step::Fail(
            ExportError::retryable("throttled").with_retry_after(Some(Duration::MAX)),
        )]);
        let start = Instant::now();
        let f = run(&fake, &no_jitter(), 1).await.unwrap_err();
        assert_eq!(f.reason, REASON_RETRIES_EXHAUSTED);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_error_is_not_retried() {
        let fake = Fake::with(vec![Step::Fail(ExportError::permanent("bad request"))]);
        let f = run(&fake, &no_jitter(), 2).await.unwrap_err();
        assert_eq!(f.reason, REASON_PERMANENT);
        assert_eq!((f.attempts, fake.calls()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_max_elapsed_time_would_pass() {
        let fake = Fake::with(
            (0..10)
                .map(|_| Step::Fail(ExportError::retryable("down")))
                .collect(),
        );
        let mut s = no_jitter();
        s.retry.max_elapsed_time = secs(20.0);
        let f = run(&fake, &s, 1).await.unwrap_err();
        // Attempts at 0, 5 and 12.5 s; the next wait (11.25 s) would end past 20 s.
        assert_eq!(f.reason, REASON_RETRIES_EXHAUSTED);
        assert_eq!(fake.call_times(), vec![secs(0.0), secs(5.0), secs(12.5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_elapsed_time_retries_until_success() {
        let fake = Fake::with(
            (0..30)
                .map(|_| Step::Fail(ExportError::retryable("down")))
                .collect(),
        );
        let mut s = no_jitter();
        s.retry.max_elapsed_time = Duration::ZERO;
        run(&fake, &s, 1).await.unwrap();
        assert_eq!(fake.calls(), 31);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_disabled_fails_at_first_retryable_error() {
        let fake = Fake::with(vec![Step::Fail(ExportError::retryable("down"))]);
        let mut s = no_jitter();
        s.retry.enabled = false;
        let f = run(&fake, &s, 1).await.unwrap_err();
        assert_eq!((f.reason, fake.calls()), (REASON_RETRY_DISABLED, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_timeout_is_retried() {
        let fake = Fake::with(vec![Step::Hang]);
        let mut s = no_jitter();
        s.timeout = secs(2.0);
        run(&fake, &s, 1).await.unwrap();
        // 2 s timeout, then the 5 s backoff.
        assert_eq!(fake.call_times(), vec![secs(0.0), secs(7.0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_timeout_waits_for_the_answer() {
        let fake = Fake::with(vec![Step::Hang]);
        let mut s = no_jitter();
        s.timeout = Duration::ZERO;
        let start = Instant::now();
        run(&fake, &s, 1).await.unwrap();
        assert_eq!(fake.calls(), 1);
        assert_eq!(start.elapsed(), secs(3600.0));
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_waits_stay_in_range() {
        let fake = Fake::with(
            (0..5)
                .map(|_| Step::Fail(ExportError::retryable("down")))
                .collect(),
        );
        let mut waits = Vec::new();
        send_with_retry(&*fake, &spans(1), &ExportSettings::default(), |_, w| {
            waits.push(w)
        })
        .await
        .unwrap();
        let nominal = [5.0, 7.5, 11.25, 16.875, 25.3125];
        assert_eq!(waits.len(), 5);
        for (w, n) in waits.iter().zip(nominal) {
            assert!(*w >= secs(n * 0.5) && *w <= secs(n * 1.5), "{w:?} vs {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn queue_counts_sent_failed_and_rejected() {
        let fake = Fake::with(vec![
            Step::Fail(ExportError::permanent("no")),
            Step::Accept(2),
        ]);
        let mut s = no_jitter();
        s.queue.num_consumers = 1;
        let (running, stats) = spawn("test", &s, fake.clone());
        running.input.send(SpanBatch::new(spans(3))).await.unwrap();
        running.input.send(SpanBatch::new(spans(5))).await.unwrap();
        running.input.send(SpanBatch::new(spans(4))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();
        // 3 failed permanently; 5 with 2 rejected; 4 sent.
        assert_eq!(stats.sent(), 3 + 4);
        assert_eq!(stats.failed(), 3 + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn close_drains_queue_with_retries_then_shuts_down() {
        let fake = Fake::with(vec![Step::Fail(ExportError::retryable("down"))]);
        let mut s = no_jitter();
        s.queue.num_consumers = 2;
        let (running, stats) = spawn("test", &s, fake.clone());
        for _ in 0..6 {
            running.input.send(SpanBatch::new(spans(2))).await.unwrap();
        }
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent(), 12);
        assert_eq!(stats.retried(), 1);
        // Shutdown ran once, after all 7 attempts.
        assert_eq!(*fake.shutdowns.lock().unwrap(), vec![7]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_holds_the_pipeline() {
        let fake = Arc::new(Fake {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        });
        let mut s = no_jitter();
        s.queue.num_consumers = 1;
        s.queue.queue_size = 2;
        let (running, stats) = spawn("test", &s, fake.clone());
        running.input.send(SpanBatch::new(spans(1))).await.unwrap();
        while fake.calls() == 0 {
            tokio::task::yield_now().await;
        }
        // One batch in flight (stalled), two queued, then the channel is full.
        running.input.try_send(SpanBatch::new(spans(1))).unwrap();
        running.input.try_send(SpanBatch::new(spans(1))).unwrap();
        assert!(matches!(
            running.input.try_send(SpanBatch::new(spans(1))),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        fake.gate.as_ref().unwrap().add_permits(3);
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn plain_exporter_is_wrapped() {
        struct Counting(Arc<AtomicU64>);
        #[async_trait]
        impl Exporter for Counting {
            async fn export(&self, spans: &[Span]) -> Result<(), ExportError> {
                self.0.fetch_add(spans.len() as u64, Ordering::Relaxed);
                Ok(())
            }
        }
        let n = Arc::new(AtomicU64::new(0));
        let running = spawn_exporter("plain", &no_jitter(), Counting(n.clone()));
        running.input.send(SpanBatch::new(spans(4))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_are_labelled_by_exporter_and_reason() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        // A current-thread runtime: every task of the queue records on this thread.
        let _guard = metrics::set_default_local_recorder(&recorder);
        let fake = Fake::with(vec![
            Step::Fail(ExportError::retryable("down")),
            Step::Fail(ExportError::permanent("no")),
        ]);
        let mut s = no_jitter();
        s.queue.num_consumers = 1;
        s.queue.queue_size = 7;
        let (running, _) = spawn("otlp/x", &s, fake);
        // The first batch fails retryably, then permanently on its retry; the second is sent.
        running.input.send(SpanBatch::new(spans(3))).await.unwrap();
        running.input.send(SpanBatch::new(spans(2))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();

        let mut got: Vec<(String, Vec<String>, String)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let key = k.key();
                let labels = key
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                let v = match v {
                    DebugValue::Counter(c) => c.to_string(),
                    DebugValue::Gauge(g) => g.to_string(),
                    DebugValue::Histogram(h) => format!("{h:?}"),
                };
                (key.name().to_string(), labels, v)
            })
            .collect();
        got.sort();
        let ex = || "exporter=otlp/x".to_string();
        let mut want = vec![
            (
                EXPORTER_FAILED_SPANS.to_string(),
                vec![ex(), "reason=permanent".to_string()],
                "3".to_string(),
            ),
            (
                EXPORTER_QUEUE_CAPACITY.to_string(),
                vec![ex()],
                "7".to_string(),
            ),
            (EXPORTER_QUEUE_SIZE.to_string(), vec![ex()], "0".to_string()),
            (EXPORTER_RETRIES.to_string(), vec![ex()], "1".to_string()),
            (EXPORTER_SENT_SPANS.to_string(), vec![ex()], "2".to_string()),
        ];
        want.sort();
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn decision_to_export_latency_is_recorded_for_delivered_decided_batches() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let fake = Fake::with(vec![Step::Fail(ExportError::permanent("no"))]);
        let mut s = no_jitter();
        s.queue.num_consumers = 1;
        let (running, _) = spawn("otlp/d", &s, fake);
        let decided = std::time::Instant::now()
            .checked_sub(secs(2.0))
            .expect("clock past 2 s");
        let decided_batch = |n| SpanBatch {
            decided_at: Some(decided),
            ..SpanBatch::new(spans(n))
        };
        // Failed (permanent): no latency. Then delivered with a decision, then without one.
        running.input.send(decided_batch(1)).await.unwrap();
        running.input.send(decided_batch(2)).await.unwrap();
        running.input.send(SpanBatch::new(spans(3))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();

        let samples: Vec<f64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, _, _, _)| k.key().name() == EXPORTER_DECISION_TO_EXPORT_SECONDS)
            .flat_map(|(k, _, _, v)| {
                let labels: Vec<String> = k
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                assert_eq!(labels, ["exporter=otlp/d"]);
                match v {
                    DebugValue::Histogram(h) => {
                        h.into_iter().map(|x| x.into_inner()).collect::<Vec<f64>>()
                    }
                    other => panic!("not a histogram: {other:?}"),
                }
            })
            .collect();
        assert_eq!(samples.len(), 1, "{samples:?}");
        assert!(samples[0] >= 2.0 && samples[0] < 60.0, "{samples:?}");
    }

    #[test]
    fn defaults_and_durations_parse() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Holder {
            #[serde(default)]
            retry_on_failure: RetryConfig,
            #[serde(default)]
            sending_queue: QueueConfig,
        }
        let h: Holder = tailweave_core::config::parse(serde_yaml::Value::Null).unwrap();
        assert_eq!(h.retry_on_failure, RetryConfig::default());
        assert_eq!(h.sending_queue, QueueConfig::default());
        let v = serde_yaml::from_str(
            "retry_on_failure: {initial_interval: 250ms, max_elapsed_time: 0s}\nsending_queue: {num_consumers: 2}",
        )
        .unwrap();
        let h: Holder = tailweave_core::config::parse(v).unwrap();
        assert_eq!(
            h.retry_on_failure.initial_interval,
            Duration::from_millis(250)
        );
        assert_eq!(h.retry_on_failure.max_elapsed_time, Duration::ZERO);
        assert_eq!(h.retry_on_failure.max_interval, secs(30.0));
        assert_eq!(h.sending_queue.num_consumers, 2);
        let bad = serde_yaml::from_str("retry_on_failure: {initial: 1s}").unwrap();
        let e = tailweave_core::config::parse::<Holder>(bad).err().unwrap();
        assert!(e.path.starts_with("retry_on_failure"), "{e:?}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let s = ExportSettings {
            timeout: Duration::ZERO,
            retry: RetryConfig {
                initial_interval: secs(10.0),
                max_interval: secs(1.0),
                multiplier: 0.5,
                randomization_factor: 2.0,
                ..Default::default()
            },
            queue: QueueConfig {
                num_consumers: 0,
                queue_size: 0,
                ..Default::default()
            },
        };
        let paths: Vec<String> = s.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            [
                "retry_on_failure.max_interval",
                "retry_on_failure.multiplier",
                "retry_on_failure.randomization_factor",
                "sending_queue.num_consumers",
                "sending_queue.queue_size",
            ]
        );
        assert!(ExportSettings::default().validate().is_empty());
    }
}
