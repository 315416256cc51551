//! Replays the fuzz targets without libFuzzer: every seed of `corpus/<target>/`, then a fixed
//! number of deterministic mutations of them. Two callers share it, so the bodies and the
//! mutator exist once: `fuzz/tests/replay.rs` (`cd fuzz && cargo test`, the fuzz workspace) and
//! the root package's `tests/fuzz_smoke.rs`, which includes this crate by `#[path]` so the smoke
//! runs under the main workspace's `cargo test --workspace` with the dependencies already built
//! there (no nightly, no second build of the dependency tree).
//!
//! Everything here is deterministic: the same corpus gives the same inputs on every run, so a
//! crash seen in CI reproduces locally, and the written crash file can be added to the corpus.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A fuzz target body: must not panic on any input.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/<name>.rs` and `corpus/<name>/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("otlp_decode", super::otlp_decode),
    ("otlp_json", super::otlp_json),
    ("config_load", super::config_load),
    ("deepflow_normalize", super::deepflow_normalize),
    ("join", super::join),
    ("tail_sampling", super::tail_sampling),
];

/// Mutations per target of `fuzz/tests/replay.rs` when `FUZZ_REPLAY_ROUNDS` does not say
/// otherwise.
pub const DEFAULT_ROUNDS: usize = 300;

/// `FUZZ_REPLAY_ROUNDS`, or `default` when unset or not a number.
pub fn rounds_from_env(default: usize) -> usize {
    std::env::var("FUZZ_REPLAY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The body of a target by name.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The seed directory of `target` under a corpus root (`fuzz/corpus`).
pub fn corpus_dir(root: &Path, target: &str) -> PathBuf {
    root.join(target)
}

/// The seeds of `target`, sorted by path so the mutation sequence does not depend on the order
/// the file system lists them in. A missing directory is an empty corpus.
pub fn corpus(root: &Path, target: &str) -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = corpus_dir(root, target);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let path = e?.path();
        if path.is_file() {
            let data = fs::read(&path)?;
            out.push((path, data));
        }
    }
    out.sort();
    Ok(out)
}

/// xorshift64*: a fixed sequence per seed.
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose sequence depends on `name` (FNV-1a), so targets get different mutations.
    pub fn for_name(name: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // xorshift never leaves zero.
        Rng(h | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n`; 0 when `n == 0`.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that often sit on a parser's edge: varint continuation, the largest lengths, JSON and
/// YAML structure, `${` of env substitution.
const INTERESTING: &[&[u8]] = &[
    &[0x00],
    &[0xff],
    &[0x80],
    &[0x7f],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    b"{",
    b"}",
    b"[",
    b"\"",
    b":",
    b"\n  ",
    b"${env:",
    b"${env:NESTED}",
    b"-1",
    b"1e999",
];

/// One to five edits of `seed`: bit flips, random bytes, truncation, duplicating a slice, a
/// splice from another seed (`other`), an interesting token, or an appended byte.
pub fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            3 if !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(v.len()));
                let (lo, hi) = (a.min(b), a.max(b));
                let chunk = v[lo..hi].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, chunk);
            }
            4 if !other.is_empty() => {
                let (a, b) = (rng.below(other.len()), rng.below(other.len()));
                let (lo, hi) = (a.min(b), a.max(b));
                let at = rng.below(v.len() + 1);
                v.splice(at..at, other[lo..hi].iter().copied());
            }
            5 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(v.len() + 1);
                v.splice(at..at, tok.iter().copied());
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// What a replay ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Seeds run as they are.
    pub seeds: usize,
    /// Mutated inputs run.
    pub mutations: usize,
    pub elapsed: Duration,
}

impl Report {
    /// Every input the target was run on.
    pub fn executions(&self) -> usize {
        self.seeds + self.mutations
    }
}

/// Why a replay stopped.
#[derive(Debug)]
pub enum ReplayError {
    /// The target has no seeds: a replay would test nothing.
    NoCorpus { dir: PathBuf },
    /// The corpus could not be read.
    Io { dir: PathBuf, error: std::io::Error },
    /// The target panicked; the input was written to `written` (when writing worked).
    Crash {
        target: String,
        /// The seed (or the seed a mutation came from).
        from: PathBuf,
        /// `None` for the seed itself, else the mutation's round.
        round: Option<usize>,
        written: Option<PathBuf>,
    },
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::NoCorpus { dir } => write!(f, "no seed corpus in {}", dir.display()),
            ReplayError::Io { dir, error } => write!(f, "reading {}: {error}", dir.display()),
            ReplayError::Crash {
                target,
                from,
                round,
                written,
            } => {
                match round {
                    None => write!(f, "{target} crashed on seed {}", from.display())?,
                    Some(r) => write!(f, "{target} crashed on mutation {r} of {}", from.display())?,
                }
                match written {
                    Some(p) => write!(f, " (input written to {})", p.display()),
                    None => write!(f, " (input could not be written)"),
                }
            }
        }
    }
}

impl std::error::Error for ReplayError {}

fn crash(
    target: &str,
    from: &Path,
    round: Option<usize>,
    input: &[u8],
    crash_dir: &Path,
) -> ReplayError {
    let name = match round {
        None => format!("crash-{target}-seed"),
        Some(r) => format!("crash-{target}-{r}"),
    };
    let out = crash_dir.join(name);
    let written = fs::write(&out, input).ok().map(|_| out);
    ReplayError::Crash {
        target: target.to_string(),
        from: from.to_path_buf(),
        round,
        written,
    }
}

/// Runs `f` on every seed of `name` under `root`, then on `rounds` mutations (round `i` mutates
/// seed `i % seeds`, splicing from seed `(i * 7 + 3) % seeds`). Stops at the first panic and
/// writes the input that caused it into `crash_dir`.
pub fn replay(
    root: &Path,
    name: &str,
    f: Target,
    rounds: usize,
    crash_dir: &Path,
) -> Result<Report, ReplayError> {
    let started = Instant::now();
    let seeds = corpus(root, name).map_err(|error| ReplayError::Io {
        dir: corpus_dir(root, name),
        error,
    })?;
    if seeds.is_empty() {
        return Err(ReplayError::NoCorpus {
            dir: corpus_dir(root, name),
        });
    }
    for (path, data) in &seeds {
        if catch_unwind(AssertUnwindSafe(|| f(data))).is_err() {
            return Err(crash(name, path, None, data, crash_dir));
        }
    }
    let mut rng = Rng::for_name(name);
    for i in 0..rounds {
        let (path, seed) = &seeds[i % seeds.len()];
        let other = &seeds[(i * 7 + 3) % seeds.len()].1;
        let input = mutate(seed, other, &mut rng);
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            return Err(crash(name, path, Some(i), &input, crash_dir));
        }
    }
    Ok(Report {
        seeds: seeds.len(),
        mutations: rounds,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_differ_by_target() {
        let seed = b"receivers: {otlp: {}}";
        let run = |name: &str| {
            let mut rng = Rng::for_name(name);
            (0..20)
                .map(|_| mutate(seed, b"other", &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run("join"), run("join"));
        assert_ne!(run("join"), run("otlp_json"));
        assert!(run("join").iter().any(|m| m.as_slice() != seed));
    }

    fn panics_on_bang(data: &[u8]) {
        assert!(
            !data.contains(&b'!'),
            "deliberate panic: the replay harness's own test of crash reporting"
        );
    }

    #[test]
    fn a_panicking_input_is_reported_and_written() {
        let dir = std::env::temp_dir().join(format!("tw-replay-{}", std::process::id()));
        let corpus = dir.join("corpus").join("t");
        fs::create_dir_all(&corpus).unwrap();
        fs::write(corpus.join("ok"), b"fine").unwrap();
        fs::write(corpus.join("zz-bad"), b"bad!").unwrap();
        let err = replay(&dir.join("corpus"), "t", panics_on_bang, 5, &dir).unwrap_err();
        match err {
            ReplayError::Crash {
                round: None,
                written: Some(p),
                ..
            } => assert_eq!(fs::read(p).unwrap(), b"bad!"),
            other => panic!("unexpected {other}"),
        }
        fs::remove_file(corpus.join("zz-bad")).unwrap();
        let r = replay(&dir.join("corpus"), "t", |_| {}, 5, &dir).unwrap();
        assert_eq!((r.seeds, r.mutations, r.executions()), (1, 5, 6));
        let missing = replay(&dir.join("corpus"), "none", |_| {}, 5, &dir).unwrap_err();
        assert!(matches!(missing, ReplayError::NoCorpus { .. }));
        let _ = fs::remove_dir_all(&dir);
    }
}
