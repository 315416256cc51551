//! The process-wide memory budget (`service.memory_limit_mib`, or a `memory_limiter` processor).
//!
//! A background task samples the process RSS; receivers ask `over_soft_limit()` (one atomic load)
//! before accepting a batch and answer with a retryable refusal above it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug)]
pub struct MemoryLimiter {
    pub limit_bytes: u64,
    pub soft_limit_bytes: u64,
    over: AtomicBool,
    last_rss: AtomicU64,
}

impl MemoryLimiter {
    pub fn new(limit_bytes: u64, spike_bytes: u64) -> Self {
        MemoryLimiter {
            limit_bytes,
            soft_limit_bytes: limit_bytes.saturating_sub(spike_bytes),
            over: AtomicBool::new(false),
            last_rss: AtomicU64::new(0),
        }
    }
    pub fn over_soft_limit(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }
    /// Records an RSS reading.
    pub fn observe(&self, rss: u64) {
        self.last_rss.store(rss, Ordering::Relaxed);
        self.over
            .store(rss >= self.soft_limit_bytes, Ordering::Relaxed);
    }
    pub fn last_rss(&self) -> u64 {
        self.last_rss.load(Ordering::Relaxed)
    }
}

/// The resident set size of this process, from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn current_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
