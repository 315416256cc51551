//! The consistent-hash ring: each backend owns many points on a 64-bit circle, and a key belongs to
//! the backend owning the first point at or after the key's hash. Adding or removing one of `n`
//! backends moves about `1/n` of the keys, and only those whose owner changed.
//!
//! The hash is FNV-1a with a 64-bit finalizer, written here rather than taken from `std` so that
//! every load-balancing instance, of any build, places a trace on the same backend.

/// Points per backend: enough that three backends share the circle within a few percent.
pub const POINTS_PER_BACKEND: usize = 160;

/// FNV-1a over `bytes`, then the splitmix64 finalizer (FNV alone clusters short, similar inputs).
pub fn hash(bytes: &[u8]) -> u64 {
    mix(fnv1a(bytes))
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Backends by name (`host:port`), placed on the circle.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    /// Sorted by point.
    points: Vec<(u64, usize)>,
    nodes: Vec<String>,
}

impl Ring {
    /// A ring over `nodes`; duplicates are ignored and order does not matter.
    pub fn new<S: AsRef<str>>(nodes: &[S]) -> Ring {
        let mut names: Vec<String> = nodes.iter().map(|n| n.as_ref().to_string()).collect();
        names.sort();
        names.dedup();
        let mut points = Vec::with_capacity(names.len() * POINTS_PER_BACKEND);
        for (i, n) in names.iter().enumerate() {
            for p in 0..POINTS_PER_BACKEND {
                points.push((hash(format!("{n}#{p}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring {
            points,
            nodes: names,
        }
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn start(&self, key: u64) -> usize {
        let i = self.points.partition_point(|(p, _)| *p < key);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The owner of `key`, as an index into [`Ring::nodes`].
    pub fn owner(&self, key: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        Some(self.points[self.start(key)].1)
    }

    /// The first node from `key`'s position on for which `usable` holds (the owner if it does):
    /// the successor that takes a down owner's keys. `None` if no node is usable.
    pub fn owner_where(&self, key: u64, mut usable: impl FnMut(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.start(key);
        let mut tried = vec![false; self.nodes.len()];
        let mut left = self.nodes.len();
        for k in 0..self.points.len() {
            let node = self.points[(start + k) % self.points.len()].1;
            if tried[node] {
                continue;
            }
            if usable(node) {
                return Some(node);
            }
            tried[node] = true;
            left -= 1;
            if left == 0 {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u64) -> impl Iterator<Item = u64> {
        // Trace ids are random: their hash is what the ring sees.
        (0..n).map(|i| hash(&i.to_be_bytes()))
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:4317", i + 1)).collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let ring = Ring::new(&names(3));
        let mut count = [0u64; 3];
        let n = 30_000;
        for k in keys(n) {
            count[ring.owner(k).unwrap()] += 1;
        }
        for c in count {
            let share = c as f64 / n as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.06, "shares {count:?}");
        }
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_keys_and_only_to_it() {
        let before = Ring::new(&names(3));
        let after = Ring::new(&names(4));
        let added = after
            .nodes()
            .iter()
            .position(|n| n == "10.0.0.4:4317")
            .unwrap();
        let n = 40_000;
        let mut moved = 0;
        for k in keys(n) {
            let a = &before.nodes()[before.owner(k).unwrap()];
            let b = &after.nodes()[after.owner(k).unwrap()];
            if a != b {
                moved += 1;
                assert_eq!(after.owner(k), Some(added), "a key moved between old nodes");
            }
        }
        let frac = moved as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.06, "moved {frac}");
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let before = Ring::new(&names(4));
        let after = Ring::new(&names(4)[1..]);
        let gone = "10.0.0.1:4317";
        for k in keys(10_000) {
            let a = &before.nodes()[before.owner(k).unwrap()];
            let b = &after.nodes()[after.owner(k).unwrap()];
            if a != gone {
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let a = Ring::new(&["b:1", "a:1", "c:1"]);
        let b = Ring::new(&["c:1", "a:1", "b:1", "a:1"]);
        for k in keys(1000) {
            assert_eq!(
                a.nodes()[a.owner(k).unwrap()],
                b.nodes()[b.owner(k).unwrap()]
            );
        }
        assert_eq!(Ring::new::<&str>(&[]).owner(1), None);
    }

    #[test]
    fn successor_takes_a_down_nodes_keys() {
        let ring = Ring::new(&names(3));
        for k in keys(2000) {
            let owner = ring.owner(k).unwrap();
            assert_eq!(ring.owner_where(k, |_| true), Some(owner));
            let next = ring.owner_where(k, |n| n != owner).unwrap();
            assert_ne!(next, owner);
            // The successor is the same whichever other node is down, as long as it is up.
            let third = (0..3).find(|n| *n != owner && *n != next).unwrap();
            assert_eq!(
                ring.owner_where(k, |n| n != owner && n != third),
                Some(next)
            );
        }
        assert_eq!(ring.owner_where(1, |_| false), None);
    }

    #[test]
    fn hash_matches_the_published_vectors() {
        // Pinned to the reference values, so that a change of the hash (which would move every
        // trace between releases) cannot pass unnoticed.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        // splitmix64 seeded with 0: its first output is the finalizer of the golden gamma.
        assert_eq!(mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
    }
}
