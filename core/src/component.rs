//! The component traits: what a receiver, a processor and an exporter are to the pipeline.
//!
//! Receivers push [`SpanBatch`]es into a [`Consumer`] (the bounded channels of the pipelines they
//! feed). Processors are synchronous state machines driven by one async loop each (in `collector`),
//! with time passed in, so the join and the sampler are tested without a runtime. Exporters make one
//! delivery attempt per call; queueing and retry are wrapped around them by `exporters::queue`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{ComponentError, ExportError};
use crate::limiter::MemoryLimiter;
use crate::span::Span;

/// A batch of spans moving between stages.
#[derive(Clone, Debug, Default)]
pub struct SpanBatch {
    pub spans: Vec<Span>,
    /// Every trace in this batch is complete: the join assembled it as one unit, so the sampler
    /// decides it at once with no second wait.
    pub whole: bool,
    /// When the tail sampler decided these spans (kept), so exporters can measure decision-to-export
    /// latency. Stages that merge batches keep the earliest.
    pub decided_at: Option<Instant>,
}

impl SpanBatch {
    pub fn new(spans: Vec<Span>) -> Self {
        SpanBatch {
            spans,
            whole: false,
            decided_at: None,
        }
    }
    pub fn whole(spans: Vec<Span>) -> Self {
        SpanBatch {
            spans,
            whole: true,
            decided_at: None,
        }
    }
    pub fn len(&self) -> usize {
        self.spans.len()
    }
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// A synchronous pipeline stage. The collector's driver calls `process` for each input batch,
/// `tick` every `tick_interval`, and `shutdown` once after the input has ended.
pub trait Processor: Send + 'static {
    /// Handles one batch; output goes to `out` (possibly nothing, possibly several batches).
    fn process(&mut self, now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>);

    /// Time-driven work: expire waits, flush timers.
    fn tick(&mut self, _now: Instant, _out: &mut Vec<SpanBatch>) {}

    /// How often `tick` should run; `None` for stateless stages.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// `false` asks the driver to stop reading input until a tick frees room (backpressure).
    fn accepting(&self) -> bool {
        true
    }

    /// Input has ended: flush everything held.
    fn shutdown(&mut self, _now: Instant, _out: &mut Vec<SpanBatch>) {}
}

/// One delivery attempt to a destination.
#[async_trait]
pub trait Exporter: Send + Sync + 'static {
    async fn export(&self, spans: &[Span]) -> Result<(), ExportError>;

    /// Called once after the last export, before the process exits.
    async fn shutdown(&self) {}
}

/// A receiver with its sockets already bound.
#[async_trait]
pub trait Receiver: Send + 'static {
    /// Serves until `shutdown` is cancelled, then stops accepting and returns.
    async fn run(
        self: Box<Self>,
        out: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), ComponentError>;
}

/// Why a consumer refused a batch. Each maps to a retryable protocol answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("pipeline is full")]
    Full,
    #[error("memory limit reached")]
    MemoryLimit,
    #[error("pipeline is shutting down")]
    Closed,
}

impl Refused {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refused::Full => "pipeline_full",
            Refused::MemoryLimit => "memory_limit",
            Refused::Closed => "shutting_down",
        }
    }
}

/// The inputs of the pipelines one receiver feeds. A batch goes to all of them or to none.
#[derive(Clone)]
pub struct Consumer {
    targets: Arc<[mpsc::Sender<SpanBatch>]>,
    limiter: Option<Arc<MemoryLimiter>>,
}

impl Consumer {
    pub fn new(targets: Vec<mpsc::Sender<SpanBatch>>, limiter: Option<Arc<MemoryLimiter>>) -> Self {
        Consumer {
            targets: targets.into(),
            limiter,
        }
    }

    /// Hands the batch to every pipeline without waiting, or refuses it whole.
    pub fn try_send(&self, batch: SpanBatch) -> Result<(), Refused> {
        if let Some(l) = &self.limiter {
            if l.over_soft_limit() {
                return Err(Refused::MemoryLimit);
            }
        }
        let mut permits = Vec::with_capacity(self.targets.len());
        for t in self.targets.iter() {
            match t.try_reserve() {
                Ok(p) => permits.push(p),
                Err(mpsc::error::TrySendError::Full(())) => return Err(Refused::Full),
                Err(mpsc::error::TrySendError::Closed(())) => return Err(Refused::Closed),
            }
        }
        let n = permits.len();
        let mut batch = Some(batch);
        for (i, p) in permits.into_iter().enumerate() {
            let b = if i + 1 == n {
                batch.take().expect("last")
            } else {
                batch.as_ref().expect("not last").clone()
            };
            p.send(b);
        }
        Ok(())
    }

    /// Hands the batch to every pipeline, waiting for room (for sources that cannot refuse).
    pub async fn send(&self, batch: SpanBatch) -> Result<(), Refused> {
        let n = self.targets.len();
        let mut batch = Some(batch);
        for (i, t) in self.targets.iter().enumerate() {
            let b = if i + 1 == n {
                batch.take().expect("last")
            } else {
                batch.as_ref().expect("not last").clone()
            };
            t.send(b).await.map_err(|_| Refused::Closed)?;
        }
        Ok(())
    }

    /// Room left in the fullest target (for receivers that report queue state).
    pub fn capacity(&self) -> usize {
        self.targets.iter().map(|t| t.capacity()).min().unwrap_or(0)
    }
}
