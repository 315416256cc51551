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

/// The end-to-end acknowledgement of one received request: a receiver answers its client only
/// once every clone of the request's `Ack` is gone, so "accepted" means "held by the stage that
/// keeps it": an in-memory stage (the join and the sampler without `storage`, the batch
/// processor, an in-memory sending queue) when it took the spans, a stage with storage (the
/// sampler's log, a sending queue on disk) when its write reached the file, and any stage that
/// drops spans by rule (self_filter, sampled out) when it dropped them (counted there).
///
/// Stages that pass spans on carry their input's acks on the batches they produce
/// ([`SpanBatch::acks`]); a batch split in two carries a clone in each part, batches merged carry
/// all. A stage that cannot take the spans calls [`Ack::fail`]: the receiver then answers with a
/// retryable error.
#[derive(Clone, Debug)]
pub struct Ack(Arc<AckInner>);

#[derive(Debug)]
struct AckInner {
    done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    failure: std::sync::OnceLock<String>,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(match self.failure.take() {
                Some(why) => Err(why),
                None => Ok(()),
            });
        }
    }
}

impl Ack {
    /// An acknowledgement and what its receiver waits on.
    pub fn new() -> (Ack, AckWait) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = AckInner {
            done: Some(tx),
            failure: std::sync::OnceLock::new(),
        };
        (Ack(Arc::new(inner)), AckWait(rx))
    }

    /// Marks the request as not taken (the first reason wins); the receiver learns it when the
    /// last clone is gone.
    pub fn fail(&self, why: impl Into<String>) {
        let _ = self.0.failure.set(why.into());
    }
}

/// Resolves when the last clone of its [`Ack`] is gone: `Ok` when every stage took its part,
/// `Err` with the first reason given to [`Ack::fail`].
#[derive(Debug)]
pub struct AckWait(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl std::future::Future for AckWait {
    type Output = Result<(), String>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(r) => r,
            // Unreachable: the sender is only dropped by `AckInner::drop`, which sends first.
            Err(_) => Ok(()),
        })
    }
}

impl AckWait {
    /// `Some` once resolved, without waiting (for stages that poll their own acks on a tick).
    pub fn try_take(&mut self) -> Option<Result<(), String>> {
        match self.0.try_recv() {
            Ok(r) => Some(r),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Ok(())),
        }
    }
}

/// A batch of spans moving between stages.
#[derive(Clone, Debug, Default)]
pub struct SpanBatch {
    pub spans: Vec<Span>,
    /// The acknowledgements of the requests these spans came from (see [`Ack`]). Dropping them
    /// says "taken"; a stage that holds spans durably keeps them until its write is done.
    pub acks: Vec<Ack>,
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
            acks: Vec::new(),
            whole: false,
            decided_at: None,
        }
    }
    pub fn whole(spans: Vec<Span>) -> Self {
        SpanBatch {
            spans,
            acks: Vec::new(),
            whole: true,
            decided_at: None,
        }
    }
    /// `self` carrying `ack`.
    pub fn with_ack(mut self, ack: Ack) -> Self {
        self.acks.push(ack);
        self
    }
    /// Takes `other`'s spans and acks (spans keep their order; the earliest `decided_at` stays).
    pub fn absorb(&mut self, other: SpanBatch) {
        self.decided_at = match (self.decided_at, other.decided_at) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        self.spans.extend(other.spans);
        self.acks.extend(other.acks);
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

    /// `true` for a stage that keeps spans across calls (the batch processor, the join, the
    /// sampler): it gets its input's [`Ack`]s and decides when to let them go. For every other
    /// stage the driver moves the acks of the input it handed over onto the output it got back,
    /// so the acknowledgement follows the spans to the stage that keeps them.
    fn holds_spans(&self) -> bool {
        false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ack_resolves_when_its_last_clone_is_gone() {
        let (ack, mut wait) = Ack::new();
        let b = SpanBatch::default().with_ack(ack);
        let copy = b.clone();
        drop(b);
        assert!(wait.try_take().is_none(), "a clone still holds it");
        drop(copy);
        assert_eq!(wait.await, Ok(()));
    }

    #[tokio::test]
    async fn a_failed_part_fails_the_request() {
        let (ack, wait) = Ack::new();
        let mut a = SpanBatch::default().with_ack(ack.clone());
        let b = SpanBatch::default().with_ack(ack);
        b.acks[0].fail("sending queue full");
        a.absorb(b);
        assert_eq!(a.acks.len(), 2);
        a.acks[1].fail("second reason");
        drop(a);
        assert_eq!(wait.await, Err("sending queue full".to_string()));
    }
}
