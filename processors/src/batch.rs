//! The `batch` processor: groups spans into larger batches so exporters send fewer, larger requests.
//!
//! A batch is sent when it reaches `send_batch_size` spans or when `timeout` has passed since its
//! first span; `send_batch_max_size` splits larger inputs. Batches the join marked whole are kept
//! apart from the rest so the mark stays true. Everything held is flushed on shutdown. Spans are
//! acknowledged to their receiver when buffered (see `holds_spans`).

use std::time::{Duration, Instant};

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Processor, Span, SpanBatch};

/// `processors.batch`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Spans that trigger a send. Default 8192.
    #[serde(default = "default_size")]
    pub send_batch_size: usize,
    /// Upper bound of one batch; 0 = no bound. Default 0.
    #[serde(default)]
    pub send_batch_max_size: usize,
    /// Longest a span waits for its batch to fill. Default `200ms`; `0s` sends at once.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_size() -> usize {
    8192
}
fn default_timeout() -> Duration {
    Duration::from_millis(200)
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            send_batch_size: default_size(),
            send_batch_max_size: 0,
            timeout: default_timeout(),
        }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut v = Vec::new();
        if self.send_batch_size == 0 {
            v.push(ConfigIssue::new("send_batch_size", "must be at least 1"));
        }
        if self.send_batch_max_size != 0 && self.send_batch_max_size < self.send_batch_size {
            v.push(ConfigIssue::new(
                "send_batch_max_size",
                "must be 0 or at least send_batch_size",
            ));
        }
        v
    }

    pub fn build(&self, _ctx: &BuildContext) -> Result<Batch, ComponentError> {
        Ok(Batch {
            cfg: self.clone(),
            open: [Pending::default(), Pending::default()],
        })
    }
}

#[derive(Default)]
struct Pending {
    spans: Vec<Span>,
    since: Option<Instant>,
    decided_at: Option<Instant>,
}

/// The running `batch` processor.
pub struct Batch {
    cfg: BatchConfig,
    /// [0]: ordinary spans; [1]: spans of whole traces.
    open: [Pending; 2],
}

impl Batch {
    fn flush(&mut self, i: usize, out: &mut Vec<SpanBatch>) {
        let p = &mut self.open[i];
        p.since = None;
        if p.spans.is_empty() {
            return;
        }
        let spans = std::mem::take(&mut p.spans);
        out.push(SpanBatch {
            spans,
            acks: Vec::new(),
            whole: i == 1,
            decided_at: p.decided_at.take(),
        });
    }
}

impl Processor for Batch {
    /// Buffered spans are acknowledged when buffered (their acks are dropped here), as the
    /// Collector's batch processor does: holding a client's answer for `timeout` would cap an SDK
    /// that sends one request at a time at a few requests per second.
    fn holds_spans(&self) -> bool {
        true
    }

    fn process(&mut self, now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        let i = usize::from(batch.whole);
        let max = match self.cfg.send_batch_max_size {
            0 => usize::MAX,
            m => m,
        };
        let p = &mut self.open[i];
        p.decided_at = match (p.decided_at, batch.decided_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if p.spans.is_empty() {
            p.since = Some(now);
            if batch.spans.len() >= self.cfg.send_batch_size && batch.spans.len() <= max {
                // Already big enough: pass it on without copying.
                p.since = None;
                p.decided_at = None;
                out.push(batch);
                return;
            }
        }
        let mut rest = batch.spans;
        while !rest.is_empty() {
            let p = &mut self.open[i];
            // A whole trace is never split across batches unless it alone exceeds the bound.
            let room = max.saturating_sub(p.spans.len());
            if i == 1 && rest.len() > room && !p.spans.is_empty() {
                self.flush(i, out);
                self.open[i].since = Some(now);
                continue;
            }
            let take = rest.len().min(room.max(1));
            let tail = rest.split_off(take);
            let p = &mut self.open[i];
            if p.since.is_none() {
                p.since = Some(now);
            }
            p.spans.append(&mut rest);
            rest = tail;
            if p.spans.len() >= self.cfg.send_batch_size || p.spans.len() >= max {
                self.flush(i, out);
            }
        }
        if self.cfg.timeout.is_zero() {
            self.flush(i, out);
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        for i in 0..2 {
            if self.open[i]
                .since
                .is_some_and(|t| now.duration_since(t) >= self.cfg.timeout)
            {
                self.flush(i, out);
            }
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some((self.cfg.timeout / 2).clamp(Duration::from_millis(1), Duration::from_millis(100)))
    }

    fn shutdown(&mut self, _now: Instant, out: &mut Vec<SpanBatch>) {
        self.flush(0, out);
        self.flush(1, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tailweave_core::proto::tonic::trace::v1::Span as PS;
    use tailweave_core::Scope;

    fn spans(n: usize) -> Vec<Span> {
        (0..n)
            .map(|i| {
                Span::from_proto(
                    Arc::new(Scope::default()),
                    &PS {
                        trace_id: vec![1; 16],
                        span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn batcher(size: usize, max: usize, timeout_ms: u64) -> Batch {
        BatchConfig {
            send_batch_size: size,
            send_batch_max_size: max,
            timeout: Duration::from_millis(timeout_ms),
        }
        .build(&BuildContext::default())
        .unwrap()
    }

    #[test]
    fn sends_at_size_and_at_timeout() {
        let mut b = batcher(10, 0, 100);
        let t0 = Instant::now();
        let mut out = Vec::new();
        b.process(t0, SpanBatch::new(spans(4)), &mut out);
        b.process(t0, SpanBatch::new(spans(4)), &mut out);
        assert!(out.is_empty());
        b.process(t0, SpanBatch::new(spans(4)), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 12);
        out.clear();
        b.process(t0, SpanBatch::new(spans(3)), &mut out);
        b.tick(t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty());
        b.tick(t0 + Duration::from_millis(100), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), 3);
    }

    #[test]
    fn max_size_splits_and_whole_batches_stay_apart() {
        let mut b = batcher(4, 5, 100);
        let t0 = Instant::now();
        let mut out = Vec::new();
        b.process(t0, SpanBatch::new(spans(12)), &mut out);
        let sizes: Vec<usize> = out.iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![5, 5]);
        out.clear();
        b.process(t0, SpanBatch::whole(spans(2)), &mut out);
        b.shutdown(t0, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().any(|b| b.whole && b.len() == 2));
        assert!(out.iter().any(|b| !b.whole && b.len() == 2));
    }
}
