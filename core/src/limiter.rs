//! The process-wide memory budget (`service.memory_limit_mib`, or a `memory_limiter` processor).
//!
//! A background task samples the process RSS and the bytes the heap has handed out; receivers ask
//! `over_soft_limit()` (one atomic load) before accepting a batch and answer with a retryable
//! refusal above it.
//!
//! RSS alone cannot say when to accept again: allocators keep freed pages, so after an overload RSS
//! can stay above the soft limit with the pipeline empty, and a limiter on RSS alone would refuse
//! for good. The binary's allocator therefore counts live heap bytes (`set_heap_probe`); the budget
//! is exceeded when RSS is at the soft limit *and* at least half of it is live heap. Retained but
//! free memory is what new data reuses first, so accepting while the live heap is low does not
//! grow RSS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

static HEAP_PROBE: OnceLock<fn() -> u64> = OnceLock::new();

/// Installs the function that reports live heap bytes (the binary's counting allocator). Only the
/// first call counts.
pub fn set_heap_probe(probe: fn() -> u64) {
    let _ = HEAP_PROBE.set(probe);
}

/// Live heap bytes, when the binary installed a probe.
pub fn heap_in_use() -> Option<u64> {
    HEAP_PROBE.get().map(|probe| probe())
}

#[derive(Debug)]
pub struct MemoryLimiter {
    pub limit_bytes: u64,
    pub soft_limit_bytes: u64,
    over: AtomicBool,
    last_rss: AtomicU64,
    last_heap: AtomicU64,
}

impl MemoryLimiter {
    pub fn new(limit_bytes: u64, spike_bytes: u64) -> Self {
        MemoryLimiter {
            limit_bytes,
            soft_limit_bytes: limit_bytes.saturating_sub(spike_bytes),
            over: AtomicBool::new(false),
            last_rss: AtomicU64::new(0),
            last_heap: AtomicU64::new(0),
        }
    }
    pub fn over_soft_limit(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }
    /// Records an RSS reading with no heap figure (RSS decides alone).
    pub fn observe(&self, rss: u64) {
        self.observe_with_heap(rss, None);
    }
    /// Records an RSS reading and, when known, the live heap bytes.
    pub fn observe_with_heap(&self, rss: u64, heap: Option<u64>) {
        self.last_rss.store(rss, Ordering::Relaxed);
        self.last_heap.store(heap.unwrap_or(0), Ordering::Relaxed);
        let in_use = heap.is_none_or(|h| h >= self.soft_limit_bytes / 2);
        self.over
            .store(rss >= self.soft_limit_bytes && in_use, Ordering::Relaxed);
    }
    pub fn last_rss(&self) -> u64 {
        self.last_rss.load(Ordering::Relaxed)
    }
    pub fn last_heap(&self) -> u64 {
        self.last_heap.load(Ordering::Relaxed)
    }
}

/// The resident set size of this process, from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn current_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rss_alone_decides_without_a_heap_figure() {
        let l = MemoryLimiter::new(100 * MIB, 20 * MIB);
        l.observe(79 * MIB);
        assert!(!l.over_soft_limit());
        l.observe(80 * MIB);
        assert!(l.over_soft_limit());
    }

    #[test]
    fn retained_but_free_memory_does_not_keep_refusing() {
        let l = MemoryLimiter::new(100 * MIB, 20 * MIB);
        // Under load: RSS at the soft limit and most of it live.
        l.observe_with_heap(85 * MIB, Some(70 * MIB));
        assert!(l.over_soft_limit());
        // Drained: the allocator keeps the pages, the live heap is small again.
        l.observe_with_heap(85 * MIB, Some(12 * MIB));
        assert!(!l.over_soft_limit());
        // Filling up again: refused once half of the soft limit is live.
        l.observe_with_heap(85 * MIB, Some(40 * MIB));
        assert!(l.over_soft_limit());
        // Below the soft limit RSS never refuses, whatever the heap says.
        l.observe_with_heap(70 * MIB, Some(70 * MIB));
        assert!(!l.over_soft_limit());
    }
}
