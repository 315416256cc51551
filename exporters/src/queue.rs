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
//!
//! With `sending_queue.storage: file` ([`spawn_persistent`]) the buffer is an on-disk log
//! ([`disk`]): a writer task takes batches from a one-slot `input` channel, appends them (encoded as
//! OTLP requests) and fsyncs before it takes the next group, so at most one batch in the channel
//! plus the group being written live only in memory. Consumers read, deliver and acknowledge; what
//! was not acknowledged is delivered again after a restart (at least once). When the log reaches
//! `max_size_mib` the append is refused (logged, counted in `tailweave_exporter_queue_full_total`)
//! and the writer waits for deliveries to free a segment, so the pipeline waits: backpressure,
//! never a silent drop.

use std::path::PathBuf;
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
use tailweave_core::otlp::{decode_request, encode_request, DecodeLimits};
use tailweave_core::{ComponentError, ExportError, Exporter, Span, SpanBatch};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::RunningExporter;

pub mod disk;
use disk::{DiskError, DiskQueue};

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

/// `reason` label: a batch larger than the whole on-disk queue (`sending_queue.max_size_mib`).
pub const REASON_TOO_LARGE_FOR_QUEUE: &str = "too_large_for_queue";
/// A send that panicked (caught, see `deliver_guarded`).
pub const REASON_PANIC: &str = "panic";
/// `reason` label: a record of the on-disk queue that no longer decodes as an OTLP request.
pub const REASON_UNREADABLE: &str = "unreadable";

/// Counter (label `exporter`): times an append to the on-disk queue was refused because it was
/// full; each time the pipeline waits until deliveries free room.
pub const EXPORTER_QUEUE_FULL: &str = "tailweave_exporter_queue_full_total";
/// Counter (labels `exporter`, `reason` = `truncated` | `checksum`): records of the on-disk queue
/// dropped as damaged: cut short by a crash mid-write, or failing their checksum.
pub const EXPORTER_QUEUE_CORRUPT_RECORDS: &str = "tailweave_exporter_queue_corrupt_records_total";
/// Gauge (label `exporter`): bytes of the on-disk queue's live segments.
pub const EXPORTER_QUEUE_DISK_BYTES: &str = "tailweave_exporter_queue_disk_bytes";
/// Gauge (label `exporter`): `sending_queue.max_size_mib` in bytes.
pub const EXPORTER_QUEUE_DISK_CAPACITY_BYTES: &str = "tailweave_exporter_queue_disk_capacity_bytes";

/// Default `sending_queue.max_size_mib`.
pub const DEFAULT_MAX_SIZE_MIB: u64 = 512;
/// Largest accepted `sending_queue.max_size_mib` (1 TiB).
const MAX_SIZE_MIB_LIMIT: u64 = 1 << 20;
/// Batches the file-backed queue's writer takes per fsync.
const DISK_GROUP: usize = 64;
/// Wait before retrying a failed disk operation (the pipeline waits meanwhile).
const DISK_RETRY: Duration = Duration::from_secs(1);

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

/// `sending_queue.storage`: where queued batches live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueStorage {
    /// In memory: lost on a crash or a restart past the shutdown deadline.
    #[default]
    Memory,
    /// In an fsynced log under `directory`: delivered after a restart, even after `kill -9`.
    File,
}

/// `sending_queue` of the exporters that can keep it on disk (`otlp`, `otlp_http`): the
/// in-memory settings plus the storage choice.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendingQueueConfig {
    /// Buffer batches and send them concurrently. Must be `true` with `storage: file`.
    /// Default `true`.
    pub enabled: bool,
    /// Concurrent senders. Default `10`.
    pub num_consumers: usize,
    /// Batches held in memory before the pipeline has to wait (`storage: memory` only; with
    /// `file` the bound is `max_size_mib`). Default `1000`.
    pub queue_size: usize,
    /// `memory` or `file`. Default `memory`.
    pub storage: QueueStorage,
    /// With `storage: file`: the queue directory; each exporter keeps its log in
    /// `<directory>/<exporter id>` (`/` in the id becomes `_`). It must not be shared with another
    /// running process. Required with `file`; default none.
    pub directory: Option<PathBuf>,
    /// With `storage: file`: the most bytes the log may take on disk. Default `512`.
    pub max_size_mib: u64,
}

impl Default for SendingQueueConfig {
    fn default() -> Self {
        let m = QueueConfig::default();
        SendingQueueConfig {
            enabled: m.enabled,
            num_consumers: m.num_consumers,
            queue_size: m.queue_size,
            storage: QueueStorage::Memory,
            directory: None,
            max_size_mib: DEFAULT_MAX_SIZE_MIB,
        }
    }
}

/// Where and how large an exporter's on-disk queue is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub directory: PathBuf,
    pub max_bytes: u64,
}

impl DiskConfig {
    /// The queue of one part of this exporter (the `load_balancing` exporter keeps one per
    /// backend): `<directory>/<name>` (`name` made a single path component), the same size bound.
    pub fn child(&self, name: &str) -> DiskConfig {
        DiskConfig {
            directory: self.directory.join(dir_component(name)),
            max_bytes: self.max_bytes,
        }
    }
}

/// An exporter id as a single path component.
fn dir_component(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match s.as_str() {
        "" | "." | ".." => format!("exporter{s}"),
        _ => s,
    }
}

impl SendingQueueConfig {
    /// The in-memory part, as [`ExportSettings`] holds it.
    pub fn memory(&self) -> QueueConfig {
        QueueConfig {
            enabled: self.enabled,
            num_consumers: self.num_consumers,
            queue_size: self.queue_size,
        }
    }

    /// The on-disk queue of exporter `id`, when `storage: file`.
    pub fn disk(&self, id: &str) -> Option<DiskConfig> {
        if self.storage != QueueStorage::File {
            return None;
        }
        let dir = self.directory.as_ref()?;
        Some(DiskConfig {
            directory: dir.join(dir_component(id)),
            max_bytes: self.max_size_mib.min(MAX_SIZE_MIB_LIMIT) << 20,
        })
    }

    /// Problems of the storage settings (the rest is checked by [`ExportSettings::validate`]),
    /// with key paths relative to the exporter.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        match self.storage {
            QueueStorage::File => {
                if !self.enabled {
                    out.push(ConfigIssue::new(
                        "sending_queue.enabled",
                        "storage: file needs the queue enabled",
                    ));
                }
                match &self.directory {
                    None => out.push(ConfigIssue::new(
                        "sending_queue.directory",
                        "required with storage: file",
                    )),
                    Some(d) if d.as_os_str().is_empty() => out.push(ConfigIssue::new(
                        "sending_queue.directory",
                        "must not be empty",
                    )),
                    Some(_) => {}
                }
                if self.max_size_mib == 0 || self.max_size_mib > MAX_SIZE_MIB_LIMIT {
                    out.push(ConfigIssue::new(
                        "sending_queue.max_size_mib",
                        format!("must be between 1 and {MAX_SIZE_MIB_LIMIT}"),
                    ));
                }
            }
            QueueStorage::Memory => {
                if self.directory.is_some() {
                    out.push(ConfigIssue::new(
                        "sending_queue.directory",
                        "only used with storage: file (set storage: file, or remove it)",
                    ));
                }
            }
        }
        out
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

/// Starts the queue around a destination with its batches kept in an on-disk log (see the module
/// docs). What an earlier run left unacknowledged in `disk.directory` is delivered first. Must run
/// inside a tokio runtime.
pub fn spawn_persistent(
    id: &str,
    settings: &ExportSettings,
    disk: &DiskConfig,
    dest: Arc<dyn Destination>,
) -> Result<(RunningExporter, Arc<QueueStats>), ComponentError> {
    let (q, recovered) = DiskQueue::open(&disk.directory, disk.max_bytes).map_err(|e| {
        ComponentError::build(
            id,
            format!("sending_queue.directory: cannot open the queue: {e}"),
        )
    })?;
    let q = Arc::new(q);
    let (_, consumers) = settings.shape();
    let stats = Arc::new(QueueStats::default());
    let shared = Arc::new(Shared {
        id: id.to_string(),
        settings: settings.clone(),
        dest,
        stats: stats.clone(),
    });
    if recovered.truncated_records > 0 {
        metrics::counter!(EXPORTER_QUEUE_CORRUPT_RECORDS, "exporter" => shared.id.clone(), "reason" => "truncated")
            .increment(recovered.truncated_records);
        tracing::warn!(
            exporter = %id,
            directory = %disk.directory.display(),
            records = recovered.truncated_records,
            bytes = recovered.truncated_bytes,
            "sending queue: dropped a record cut short by a crash mid-write"
        );
    }
    tracing::info!(
        exporter = %id,
        directory = %disk.directory.display(),
        pending_batches = recovered.records,
        pending_bytes = recovered.bytes,
        max_bytes = disk.max_bytes,
        "sending queue on disk opened"
    );
    metrics::gauge!(EXPORTER_QUEUE_DISK_CAPACITY_BYTES, "exporter" => shared.id.clone())
        .set(disk.max_bytes as f64);

    // One slot: the batches that are only in memory are the one waiting here and the group
    // being written.
    let (tx, rx) = mpsc::channel::<SpanBatch>(1);
    let writer = tokio::spawn(write_to_disk(shared.clone(), q.clone(), rx));
    let gauges = {
        let (q, id) = (q.clone(), shared.id.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                disk_gauges(&id, &q);
            }
        })
    };
    let reported_corrupt = Arc::new(AtomicU64::new(0));
    let done = tokio::spawn(async move {
        let mut workers = JoinSet::new();
        for _ in 0..consumers {
            workers.spawn(consume_disk(
                shared.clone(),
                q.clone(),
                reported_corrupt.clone(),
            ));
        }
        if let Err(e) = writer.await {
            tracing::error!(exporter = %shared.id, error = %e, "sending queue writer failed");
            q.close();
        }
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                tracing::error!(exporter = %shared.id, error = %e, "exporter sender task failed");
            }
        }
        gauges.abort();
        disk_gauges(&shared.id, &q);
        shared.dest.shutdown().await;
        tracing::debug!(exporter = %shared.id, pending = q.pending(), "exporter drained and stopped");
    });
    Ok((RunningExporter { input: tx, done }, stats))
}

fn disk_gauges(id: &str, q: &DiskQueue) {
    metrics::gauge!(EXPORTER_QUEUE_SIZE, "exporter" => id.to_string()).set(q.pending() as f64);
    metrics::gauge!(EXPORTER_QUEUE_DISK_BYTES, "exporter" => id.to_string())
        .set(q.used_bytes() as f64);
}

/// Makes everything appended durable and readable, retrying until the disk lets it.
async fn sync_disk(id: &str, q: &Arc<DiskQueue>) {
    loop {
        let q2 = q.clone();
        let r = tokio::task::spawn_blocking(move || q2.sync()).await;
        match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::error!(exporter = %id, error = %e, "sending queue: fsync failed, retrying")
            }
            Err(e) => {
                tracing::error!(exporter = %id, error = %e, "sending queue: fsync task failed, retrying")
            }
        }
        tokio::time::sleep(DISK_RETRY).await;
    }
}

async fn write_to_disk(shared: Arc<Shared>, q: Arc<DiskQueue>, mut rx: mpsc::Receiver<SpanBatch>) {
    let mut group = Vec::with_capacity(DISK_GROUP);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < DISK_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        // The receivers' answers wait for these: they go once the group is on disk.
        let mut acks = Vec::new();
        for mut b in group.drain(..) {
            if !b.is_empty() {
                let why = match append_waiting(&shared, &q, &b).await {
                    Appended::Written => None,
                    Appended::TooLarge => Some("batch too large for the sending queue"),
                    Appended::Full => Some("sending queue on disk full"),
                };
                if let Some(why) = why {
                    for a in &b.acks {
                        a.fail(why);
                    }
                }
            }
            acks.append(&mut b.acks);
        }
        sync_disk(&shared.id, &q).await;
        drop(acks);
    }
    q.close();
}

/// What became of a batch offered to the disk queue.
enum Appended {
    Written,
    /// Larger than the whole queue: dropped and counted.
    TooLarge,
    /// The queue is full and a client waits for this batch's answer: refused and counted (the
    /// client is answered with a retryable error and sends it again).
    Full,
}

/// Appends one batch, waiting (and so holding the pipeline) while the log is full or the disk
/// fails; a batch whose clients wait for their answer (it carries acks) is refused when the log
/// is full instead, so they learn it now. A batch that can never fit is given up on. Both are
/// counted.
async fn append_waiting(shared: &Shared, q: &Arc<DiskQueue>, batch: &SpanBatch) -> Appended {
    let payload = encode_request(&batch.spans);
    let mut refused = false;
    loop {
        let freed = q.space_freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match q.append(&payload, batch.decided_at) {
            Ok(_) => {
                if refused {
                    tracing::info!(exporter = %shared.id, "sending queue has room again");
                }
                return Appended::Written;
            }
            Err(e @ DiskError::Full { .. }) if !batch.acks.is_empty() => {
                metrics::counter!(EXPORTER_QUEUE_FULL, "exporter" => shared.id.clone())
                    .increment(1);
                metrics::counter!(tailweave_core::names::EXPORTER_ENQUEUE_FAILED_SPANS,
                    "exporter" => shared.id.clone(), "reason" => "queue_full")
                .increment(batch.len() as u64);
                tracing::debug!(exporter = %shared.id, spans = batch.len(), error = %e,
                    "sending queue full: batch refused, its clients answered with a retryable error");
                return Appended::Full;
            }
            Err(e @ DiskError::Full { .. }) => {
                if !refused {
                    refused = true;
                    metrics::counter!(EXPORTER_QUEUE_FULL, "exporter" => shared.id.clone())
                        .increment(1);
                    tracing::warn!(exporter = %shared.id, error = %e, "sending queue refused a batch; the pipeline waits until deliveries free room");
                }
                // What is appended but not synced cannot be delivered, and so cannot free room.
                sync_disk(&shared.id, q).await;
                freed.await;
            }
            Err(e @ DiskError::TooLarge { .. }) => {
                shared.count_failed(batch.len() as u64, REASON_TOO_LARGE_FOR_QUEUE);
                tracing::warn!(exporter = %shared.id, spans = batch.len(), error = %e, "dropping batch");
                return Appended::TooLarge;
            }
            Err(e @ DiskError::Io { .. }) => {
                tracing::error!(exporter = %shared.id, error = %e, "sending queue: write failed, retrying");
                tokio::time::sleep(DISK_RETRY).await;
            }
        }
    }
}

async fn consume_disk(shared: Arc<Shared>, q: Arc<DiskQueue>, reported_corrupt: Arc<AtomicU64>) {
    loop {
        let rec = match q.next().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(exporter = %shared.id, error = %e, "sending queue: read failed, retrying");
                tokio::time::sleep(DISK_RETRY).await;
                continue;
            }
        };
        let corrupt = q.corrupt_records();
        let before = reported_corrupt.fetch_max(corrupt, Ordering::Relaxed);
        if corrupt > before {
            metrics::counter!(EXPORTER_QUEUE_CORRUPT_RECORDS, "exporter" => shared.id.clone(), "reason" => "checksum")
                .increment(corrupt - before);
        }
        match decode_request(rec.payload.clone(), &DecodeLimits::default()) {
            Ok(d) => {
                let bad = d.rejected_total();
                if bad > 0 {
                    shared.count_failed(bad, REASON_UNREADABLE);
                }
                if !d.spans.is_empty() {
                    shared.deliver_guarded(&d.spans, rec.decided_at).await;
                }
            }
            Err(e) => {
                tracing::error!(exporter = %shared.id, error = %e, "sending queue: a stored batch does not decode; skipped");
                shared.count_failed(0, REASON_UNREADABLE);
            }
        }
        if let Err(e) = q.ack(rec.pos) {
            tracing::error!(exporter = %shared.id, error = %e, "sending queue: cannot record delivery; it will be repeated after a restart");
        }
    }
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
            shared.deliver_guarded(&batch.spans, batch.decided_at).await;
        }
    }
}

impl Shared {
    /// [`Shared::deliver`], with a panic in the destination caught: the batch is counted as
    /// failed (`reason="panic"`) and logged, and the sender task goes on. An uncaught panic ended
    /// the task; with every sender gone the queue's channel closed and what it held was lost.
    async fn deliver_guarded(&self, spans: &[Span], decided_at: Option<std::time::Instant>) {
        use futures::FutureExt;
        let r = std::panic::AssertUnwindSafe(self.deliver(spans, decided_at))
            .catch_unwind()
            .await;
        if r.is_err() {
            self.count_failed(spans.len() as u64, REASON_PANIC);
            tracing::error!(exporter = %self.id, spans = spans.len(), "dropping batch: the exporter panicked while sending it");
        }
    }

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

    fn disk_at(dir: &std::path::Path, max_bytes: u64) -> DiskConfig {
        DiskConfig {
            directory: dir.join("otlp_x"),
            max_bytes,
        }
    }

    fn segment_bytes(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("seg-"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Polls `cond` every 10 ms for at most 10 s.
    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn persistent_queue_delivers_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_at(dir.path(), 1 << 20);
        let batches = [3u8, 5, 4];
        let want: u64 = encode_request(&spans(3)).len() as u64
            + encode_request(&spans(5)).len() as u64
            + encode_request(&spans(4)).len() as u64
            + 3 * disk::RECORD_HEADER;
        {
            // The destination never answers: nothing is acknowledged.
            let stalled = Arc::new(Fake {
                gate: Some(tokio::sync::Semaphore::new(0)),
                ..Default::default()
            });
            let mut s = no_jitter();
            s.queue.num_consumers = 1;
            let (running, stats) = spawn_persistent("otlp/x", &s, &disk, stalled.clone()).unwrap();
            for n in batches {
                running.input.send(SpanBatch::new(spans(n))).await.unwrap();
            }
            assert!(
                eventually(|| segment_bytes(&disk.directory) == want && stalled.calls() == 1).await
            );
            // As after kill -9: the tasks stop where they are, nothing is closed or flushed.
            running.done.abort();
            drop(running.input);
            assert_eq!(stats.sent(), 0);
        }
        let fake = Fake::with(Vec::new());
        let (running, stats) =
            spawn_persistent("otlp/x", &no_jitter(), &disk, fake.clone()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent(), 3 + 5 + 4);
        let mut sizes: Vec<usize> = fake.calls.lock().unwrap().iter().map(|c| c.1).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, [3, 4, 5]);
        // Delivered: a third start finds nothing to send.
        let fake = Fake::with(Vec::new());
        let (running, stats) =
            spawn_persistent("otlp/x", &no_jitter(), &disk, fake.clone()).unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!((stats.sent(), fake.calls()), (0, 0));
    }

    #[tokio::test]
    async fn full_persistent_queue_holds_the_pipeline_then_delivers_everything() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_at(dir.path(), 1 << 20);
        let fake = Arc::new(Fake {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        });
        let mut s = no_jitter();
        s.queue.num_consumers = 2;
        let (running, stats) = spawn_persistent("otlp/x", &s, &disk, fake.clone()).unwrap();
        let per_batch = encode_request(&spans(200)).len() as u64 + disk::RECORD_HEADER;
        let mut accepted = 0u64;
        let mut blocked = false;
        for _ in 0..10_000 {
            let b = SpanBatch::new(spans(200));
            match tokio::time::timeout(Duration::from_millis(500), running.input.send(b)).await {
                Ok(r) => {
                    r.unwrap();
                    accepted += 1;
                }
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        assert!(blocked, "the pipeline never had to wait");
        // The disk bound, plus the batch the writer holds and the one in the one-slot channel.
        assert!(
            accepted * per_batch <= disk.max_bytes + 2 * per_batch,
            "{accepted} x {per_batch}"
        );
        assert!(segment_bytes(&disk.directory) <= disk.max_bytes);
        fake.gate.as_ref().unwrap().add_permits(1_000_000);
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!(stats.sent(), accepted * 200);
        assert_eq!(stats.failed(), 0);
    }

    /// Panics on its first send, then accepts.
    #[derive(Default)]
    struct PanicsOnce {
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl Destination for PanicsOnce {
        async fn send(&self, _spans: &[Span]) -> Result<Accepted, ExportError> {
            if self.calls.fetch_add(1, Ordering::Relaxed) == 0 {
                panic!("a destination bug");
            }
            Ok(Accepted::default())
        }
    }

    #[tokio::test]
    async fn a_panicking_send_is_counted_and_the_queue_goes_on() {
        let mut s = no_jitter();
        s.queue.num_consumers = 1;
        let (running, stats) = spawn("otlp/x", &s, Arc::new(PanicsOnce::default()));
        running.input.send(SpanBatch::new(spans(3))).await.unwrap();
        running.input.send(SpanBatch::new(spans(4))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();
        // The one sender task survived its panic and delivered the second batch.
        assert_eq!((stats.failed(), stats.sent()), (3, 4));
    }

    #[tokio::test]
    async fn a_batch_is_acknowledged_once_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_at(dir.path(), 1 << 20);
        // The destination never answers: only the disk write can let the ack go.
        let stalled = Arc::new(Fake {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        });
        let (running, _stats) = spawn_persistent("otlp/x", &no_jitter(), &disk, stalled).unwrap();
        let (ack, wait) = tailweave_core::Ack::new();
        let b = SpanBatch::new(spans(3)).with_ack(ack);
        let on_disk = encode_request(&b.spans).len() as u64 + disk::RECORD_HEADER;
        running.input.send(b).await.unwrap();
        assert_eq!(wait.await, Ok(()));
        assert_eq!(segment_bytes(&disk.directory), on_disk);
        running.done.abort();
    }

    #[tokio::test]
    async fn a_batch_the_disk_queue_cannot_hold_fails_its_ack() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_at(dir.path(), 100);
        let fake = Fake::with(Vec::new());
        let (running, _stats) = spawn_persistent("otlp/x", &no_jitter(), &disk, fake).unwrap();
        let (ack, wait) = tailweave_core::Ack::new();
        running
            .input
            .send(SpanBatch::new(spans(50)).with_ack(ack))
            .await
            .unwrap();
        let why = wait.await.unwrap_err();
        assert!(why.contains("too large"), "{why}");
        drop(running.input);
        running.done.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_disk_queue_refuses_a_batch_a_client_waits_for() {
        let dir = tempfile::tempdir().unwrap();
        let per_batch = encode_request(&spans(200)).len() as u64 + disk::RECORD_HEADER;
        let disk = disk_at(dir.path(), 64 << 10);
        let stalled = Arc::new(Fake {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        });
        let (running, _stats) = spawn_persistent("otlp/x", &no_jitter(), &disk, stalled).unwrap();
        // Answered batches until one is refused: the queue holds what it said it took.
        let mut taken = 0u64;
        let refused = loop {
            let (ack, wait) = tailweave_core::Ack::new();
            running
                .input
                .send(SpanBatch::new(spans(200)).with_ack(ack))
                .await
                .unwrap();
            match wait.await {
                Ok(()) => taken += 1,
                Err(why) => break why,
            }
            assert!(taken * per_batch <= disk.max_bytes, "never refused");
        };
        assert!(refused.contains("full"), "{refused}");
        assert!(taken > 0);
        assert_eq!(segment_bytes(&disk.directory), taken * per_batch);
        running.done.abort();
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_disk_queue_is_counted_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk_at(dir.path(), 100);
        let fake = Fake::with(Vec::new());
        let (running, stats) = spawn_persistent("otlp/x", &no_jitter(), &disk, fake).unwrap();
        running.input.send(SpanBatch::new(spans(50))).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();
        assert_eq!((stats.sent(), stats.failed()), (0, 50));
    }

    #[test]
    fn sending_queue_storage_settings_are_checked() {
        fn issues(yaml: &str) -> Vec<String> {
            let c: SendingQueueConfig =
                tailweave_core::config::parse(serde_yaml::from_str(yaml).unwrap()).unwrap();
            c.validate().into_iter().map(|i| i.path).collect()
        }
        assert!(issues("{}").is_empty());
        assert!(issues("{storage: file, directory: /var/lib/tw}").is_empty());
        assert_eq!(issues("{storage: file}"), ["sending_queue.directory"]);
        assert_eq!(
            issues("{storage: file, enabled: false, directory: '', max_size_mib: 0}"),
            [
                "sending_queue.enabled",
                "sending_queue.directory",
                "sending_queue.max_size_mib"
            ]
        );
        assert_eq!(issues("{directory: /x}"), ["sending_queue.directory"]);
        let c: SendingQueueConfig = tailweave_core::config::parse(
            serde_yaml::from_str("{storage: file, directory: /q, max_size_mib: 2}").unwrap(),
        )
        .unwrap();
        assert_eq!(
            c.disk("otlp/primary"),
            Some(DiskConfig {
                directory: "/q/otlp_primary".into(),
                max_bytes: 2 << 20
            })
        );
        assert_eq!(SendingQueueConfig::default().disk("otlp"), None);
        assert_eq!(dir_component(".."), "exporter..");
        assert_eq!(
            SendingQueueConfig::default().memory(),
            QueueConfig::default()
        );
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
