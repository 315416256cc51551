//! Remembered decisions, so a late span follows its trace's decision instead of starting a new
//! trace that would be decided on a fragment.
//!
//! Two bounded rings (kept and dropped), each a hash map plus the insertion order; the oldest
//! id is forgotten when a ring is full. Keys are the two halves of the trace id folded into
//! 64 bits: trace ids are random, so a false hit needs a 64-bit collision with a trace decided
//! in the last few minutes (about 2^-43 per lookup at two million entries).

use std::collections::VecDeque;

use hashbrown::HashMap;
use tailweave_core::TraceId;

/// What the cache remembers about a decided trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Cached {
    Kept { policy: u32, adjusted: f64 },
    Dropped,
}

struct Ring<V> {
    map: HashMap<u64, V>,
    order: VecDeque<u64>,
    cap: usize,
}

impl<V: Copy> Ring<V> {
    fn new(cap: usize) -> Self {
        Ring {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn insert(&mut self, k: u64, v: V) {
        if self.cap == 0 {
            return;
        }
        // Each key sits in `order` once: a repeated insert only refreshes the value.
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
            if self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, k: u64) -> Option<V> {
        self.map.get(&k).copied()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Oldest first.
    fn iter(&self) -> impl Iterator<Item = (u64, V)> + '_ {
        self.order
            .iter()
            .filter_map(|k| self.map.get(k).map(|v| (*k, *v)))
    }
}

pub(crate) struct DecisionCache {
    kept: Ring<(u32, f64)>,
    dropped: Ring<()>,
}

pub(crate) fn key(id: &TraceId) -> u64 {
    let (hi, lo) = id.0.split_at(8);
    let hi = u64::from_be_bytes(hi.try_into().unwrap_or([0; 8]));
    let lo = u64::from_be_bytes(lo.try_into().unwrap_or([0; 8]));
    hi ^ lo.rotate_left(32)
}

impl DecisionCache {
    pub fn new(kept: usize, dropped: usize) -> Self {
        DecisionCache {
            kept: Ring::new(kept),
            dropped: Ring::new(dropped),
        }
    }

    pub fn remember(&mut self, id: &TraceId, c: Cached) {
        self.remember_key(key(id), c)
    }

    pub fn remember_key(&mut self, k: u64, c: Cached) {
        match c {
            Cached::Kept { policy, adjusted } => self.kept.insert(k, (policy, adjusted)),
            Cached::Dropped => self.dropped.insert(k, ()),
        }
    }

    pub fn get(&self, id: &TraceId) -> Option<Cached> {
        let k = key(id);
        if let Some((policy, adjusted)) = self.kept.get(k) {
            return Some(Cached::Kept { policy, adjusted });
        }
        self.dropped.get(k).map(|()| Cached::Dropped)
    }

    /// Every remembered decision by key, each ring oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Cached)> + '_ {
        self.dropped
            .iter()
            .map(|(k, ())| (k, Cached::Dropped))
            .chain(
                self.kept
                    .iter()
                    .map(|(k, (policy, adjusted))| (k, Cached::Kept { policy, adjusted })),
            )
    }

    /// (kept, dropped) ids remembered.
    pub fn len(&self) -> (usize, usize) {
        (self.kept.len(), self.dropped.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> TraceId {
        let mut b = [0u8; 16];
        b[8..].copy_from_slice(&n.to_be_bytes());
        b[0] = 1;
        TraceId(b)
    }

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut c = DecisionCache::new(2, 1);
        for n in 1..=3 {
            c.remember(
                &id(n),
                Cached::Kept {
                    policy: n as u32,
                    adjusted: 1.0,
                },
            );
        }
        assert_eq!(c.get(&id(1)), None);
        assert_eq!(
            c.get(&id(3)),
            Some(Cached::Kept {
                policy: 3,
                adjusted: 1.0
            })
        );
        c.remember(&id(10), Cached::Dropped);
        c.remember(&id(11), Cached::Dropped);
        assert_eq!(c.get(&id(10)), None);
        assert_eq!(c.get(&id(11)), Some(Cached::Dropped));
        assert_eq!(c.len(), (2, 1));
    }

    #[test]
    fn size_zero_turns_a_ring_off() {
        let mut c = DecisionCache::new(0, 0);
        c.remember(&id(1), Cached::Dropped);
        assert_eq!(c.get(&id(1)), None);
    }
}
