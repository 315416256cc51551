//! One downstream instance: an OTLP exporter with its own queue and retry, and a health record
//! its sends keep, which the router reads to re-route a down backend's traces.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tailweave_core::{ExportError, Span, SpanBatch};
use tokio::sync::mpsc;

use tailweave_core::ComponentError;

use crate::queue::{self, Accepted, Destination, DiskConfig, ExportSettings, QueueStats};

/// The file in a backend's queue directory that names the backend (`host:port`), so a restart
/// that no longer resolves it can still drain what it queued there.
pub const NAME_FILE: &str = "backend";

/// Whether a backend answers. Failing means: the last attempt failed with a retryable error
/// (unreachable, timed out, overloaded) and nothing has succeeded since.
#[derive(Debug, Default)]
pub struct Health {
    failing_since: Mutex<Option<Instant>>,
    probing: AtomicBool,
}

impl Health {
    pub fn record_ok(&self) {
        if let Ok(mut f) = self.failing_since.lock() {
            *f = None;
        }
    }

    pub fn record_failure(&self, now: Instant) {
        if let Ok(mut f) = self.failing_since.lock() {
            f.get_or_insert(now);
        }
    }

    pub fn failing_since(&self) -> Option<Instant> {
        self.failing_since.lock().ok().and_then(|f| *f)
    }

    /// Failing for at least `after` (`after == 0` never counts as down).
    pub fn is_down(&self, now: Instant, after: Duration) -> bool {
        !after.is_zero()
            && self
                .failing_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= after)
    }
}

/// Wraps a destination so that every attempt updates the backend's health.
pub struct Tracked {
    inner: Arc<dyn Destination>,
    pub health: Arc<Health>,
}

#[async_trait]
impl Destination for Tracked {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
        let r = self.inner.send(spans).await;
        match &r {
            Ok(_) => self.health.record_ok(),
            Err(e) if e.retryable => self
                .health
                .record_failure(tokio::time::Instant::now().into_std()),
            // A permanent refusal is about the data, not about the backend being there.
            Err(_) => self.health.record_ok(),
        }
        r
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

/// A started backend.
pub struct Backend {
    pub name: String,
    pub input: mpsc::Sender<SpanBatch>,
    pub done: tokio::task::JoinHandle<()>,
    pub health: Arc<Health>,
    pub stats: Arc<QueueStats>,
    /// The on-disk queue's directory, with `storage: file`.
    pub queue_dir: Option<std::path::PathBuf>,
    dest: Arc<Tracked>,
}

impl Backend {
    /// Starts the queue around `dest`: in memory, or, with `disk`, the on-disk queue of
    /// `sending_queue.storage: file` (what an earlier run left there is delivered first). `id`
    /// names the queue's metrics (`lb_id/backend`).
    pub fn spawn(
        id: &str,
        name: &str,
        settings: &ExportSettings,
        dest: Arc<dyn Destination>,
        disk: Option<&DiskConfig>,
    ) -> Result<Backend, ComponentError> {
        let health = Arc::new(Health::default());
        let tracked = Arc::new(Tracked {
            inner: dest,
            health: health.clone(),
        });
        let (running, stats) = match disk {
            Some(d) => {
                let (running, stats) = queue::spawn_persistent(id, settings, d, tracked.clone())?;
                // After the open, which made the directory.
                let f = d.directory.join(NAME_FILE);
                if let Err(e) = std::fs::write(&f, name) {
                    tracing::warn!(exporter = %id, file = %f.display(), error = %e, "cannot record the backend's name beside its queue; a restart that no longer resolves it will not drain it");
                }
                (running, stats)
            }
            None => queue::spawn(id, settings, tracked.clone()),
        };
        Ok(Backend {
            name: name.to_string(),
            input: running.input,
            done: running.done,
            health,
            stats,
            queue_dir: disk.map(|d| d.directory.clone()),
            dest: tracked,
        })
    }

    /// One empty export, so a backend with nothing queued still learns it is back. At most one
    /// probe runs at a time.
    pub fn probe(&self, timeout: Duration) {
        if self.health.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let dest = self.dest.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, dest.send(&[])).await.is_err() {
                dest.health
                    .record_failure(tokio::time::Instant::now().into_std());
            }
            dest.health.probing.store(false, Ordering::Release);
        });
    }
}
