//! Fuzz smoke for CI (issue 7): every fuzz target of `fuzz/` over its seed corpus
//! (`fuzz/corpus/<target>/`) and a few hundred deterministic mutations of it, on the stable
//! toolchain, without libFuzzer.
//!
//! `fuzz/` is its own cargo workspace (cargo-fuzz builds it with sanitizer flags), so building it
//! from here would mean a second build of every dependency. Instead its library, which holds the
//! target bodies and the replay harness, is compiled into this test by `#[path]`: the bodies
//! `cargo fuzz run` drives are the ones this runs, against the crates this workspace already
//! built. One test per target, so they run in parallel and each reports its executions.
//!
//! `FUZZ_REPLAY_ROUNDS=N` changes the mutations per target (default [`SMOKE_ROUNDS`]). A crash writes its
//! input to the temp dir; copied into `fuzz/corpus/<target>/` it stays a regression test.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod tailweave_fuzz;

use std::path::{Path, PathBuf};

use tailweave_fuzz::replay;

/// Mutations per target: about 1.5 s for the slowest targets (the state machines) in a debug
/// build on one core, a few milliseconds for the decoders.
const SMOKE_ROUNDS: usize = 1000;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

fn smoke(name: &str) {
    let f = replay::target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    let rounds = replay::rounds_from_env(SMOKE_ROUNDS);
    let r = replay::replay(&corpus_root(), name, f, rounds, &std::env::temp_dir())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.mutations, rounds);
    eprintln!(
        "fuzz smoke: {name}: {} executions ({} seeds + {} mutations) in {:.2}s, 0 crashes",
        r.executions(),
        r.seeds,
        r.mutations,
        r.elapsed.as_secs_f64()
    );
}

#[test]
fn every_fuzz_target_has_a_smoke_test_here() {
    let here = [
        "otlp_decode",
        "otlp_json",
        "config_load",
        "deepflow_normalize",
        "join",
        "tail_sampling",
    ];
    let targets: Vec<&str> = replay::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(targets, here, "a target was added: give it a smoke test");
    // Every target binary of fuzz/Cargo.toml is in the table (and so in the smoke).
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    let bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "tailweave-fuzz")
        .collect();
    assert_eq!(bins, here, "fuzz/Cargo.toml targets");
}

#[test]
fn otlp_decode() {
    smoke("otlp_decode");
}

#[test]
fn otlp_json() {
    smoke("otlp_json");
}

#[test]
fn config_load() {
    smoke("config_load");
}

#[test]
fn deepflow_normalize() {
    smoke("deepflow_normalize");
}

#[test]
fn join() {
    smoke("join");
}

#[test]
fn tail_sampling() {
    smoke("tail_sampling");
}
