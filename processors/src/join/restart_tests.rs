//! `storage: file`: the join's log survives a crash (the state machine dropped without
//! `shutdown`, its directory opened again) without losing a span or emitting a taken unit twice.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tailweave_core::{Ack, Processor, Span, SpanBatch, SpanId, TraceId};
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

use super::testkit::game_trace;
use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tailweave-join-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn log(&self) -> PathBuf {
        self.0.join(format!("{}.log", log_name("traces", "join")))
    }
    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log()).map_or(0, |m| m.len())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg(dir: Option<&TempDir>) -> JoinConfig {
    let mut c = JoinConfig::default();
    if let Some(d) = dir {
        c.storage = StorageKind::File;
        c.directory = Some(d.0.clone());
    }
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    c
}

fn open(dir: Option<&TempDir>, now: Instant) -> Join {
    Join::open(cfg(dir), "join", "traces", now).expect("opens")
}

/// The game traces `from..to`: SDK spans and normalized DeepFlow rows, as separate batches.
fn traces(from: u64, to: u64) -> Vec<Vec<Span>> {
    let mut out = Vec::new();
    for i in from..to {
        let (sdk, mut ebpf) = game_trace(i);
        normalize_spans(&mut ebpf, Role::Ebpf);
        out.push(sdk);
        out.push(ebpf);
    }
    out
}

fn feed(j: &mut Join, now: Instant, batches: Vec<Vec<Span>>) -> Vec<SpanBatch> {
    let mut out = Vec::new();
    for b in batches {
        j.process(now, SpanBatch::new(b), &mut out);
    }
    out
}

fn tick(j: &mut Join, now: Instant) -> Vec<SpanBatch> {
    let mut out = Vec::new();
    j.tick(now, &mut out);
    out
}

/// Every wait of the default config has passed.
const LATER: Duration = Duration::from_secs(70);

/// A unit as a comparable value: its spans' ids and bytes, in output order.
type Unit = Vec<(TraceId, SpanId, SpanId, Bytes)>;

fn units(out: &[SpanBatch]) -> Vec<Unit> {
    let mut v: Vec<Unit> = out
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| {
            b.spans
                .iter()
                .map(|s| (s.trace_id, s.span_id, s.parent_span_id, s.raw.clone()))
                .collect()
        })
        .collect();
    v.sort();
    v
}

fn uninterrupted(n: u64) -> Vec<Unit> {
    let t0 = Instant::now();
    let mut j = open(None, t0);
    assert!(feed(&mut j, t0, traces(0, n)).is_empty());
    let u = units(&tick(&mut j, t0 + LATER));
    assert_eq!(u.len(), n as usize);
    u
}

#[test]
fn replay_after_a_crash_emits_the_units_of_an_uninterrupted_run() {
    let want = uninterrupted(12);
    let dir = TempDir::new("crash");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    // Half the traces go out and are taken downstream (their batches dropped), then the rest
    // arrives and the process dies while the join holds it.
    assert!(feed(&mut j, t0, traces(0, 6)).is_empty());
    let first = tick(&mut j, t0 + LATER);
    assert_eq!(first.len(), 6);
    let mut got = units(&first);
    drop(first);
    tick(&mut j, t0 + LATER);
    let t1 = t0 + LATER + Duration::from_secs(1);
    assert!(feed(&mut j, t1, traces(6, 12)).is_empty());
    assert_eq!(j.pending_spans(), 6 * 22);
    drop(j);

    let t2 = t1 + Duration::from_secs(1);
    let mut j = open(Some(&dir), t2);
    assert_eq!(j.pending_spans(), 6 * 22, "the held traces, and only those");
    assert!(
        tick(&mut j, t2 + Duration::from_secs(1)).is_empty(),
        "waits restart"
    );
    let second = tick(&mut j, t2 + LATER);
    got.extend(units(&second));
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn a_torn_tail_is_cut_and_the_records_before_it_replay() {
    let dir = TempDir::new("torn");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 2));
    drop(j);
    let whole = dir.log_len();
    assert!(whole > 0);
    // A crash in the middle of the last record: half of it reached the file.
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(2, 3));
    drop(j);
    let longer = dir.log_len();
    let data = std::fs::read(dir.log()).unwrap();
    let torn = longer - 7;
    std::fs::write(dir.log(), &data[..torn as usize]).unwrap();

    let mut j = open(Some(&dir), t0);
    // Trace 2's SDK batch is whole; its last eBPF row is torn, so that row alone is lost
    // (the crash came before its write was done, so its request was not answered).
    assert_eq!(j.pending_spans(), 2 * 22 + 10 + 11);
    let (r, good) = storage::replay(Bytes::from(std::fs::read(dir.log()).unwrap()));
    assert_eq!(
        good,
        dir.log_len(),
        "the open cut the tail: every byte left reads"
    );
    assert_eq!(r.spans.len(), 2 * 22 + 21);
    let out = tick(&mut j, t0 + LATER);
    assert_eq!(out.len(), 3);
}

#[test]
fn damaged_bytes_in_a_record_end_the_replay_there() {
    let dir = TempDir::new("damaged");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 1));
    drop(j);
    let mut data = std::fs::read(dir.log()).unwrap();
    let n = data.len();
    data[n - 20] ^= 0xff;
    let (r, good) = storage::replay(Bytes::from(data));
    assert!(good < n as u64);
    assert_eq!(r.spans.len(), 21, "every record before the damaged one");
}

#[test]
fn units_taken_downstream_are_not_emitted_again_after_a_restart() {
    let dir = TempDir::new("taken");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 4));
    let out = tick(&mut j, t0 + LATER);
    assert_eq!(out.len(), 4);
    assert!(
        out.iter().all(|b| b.acks.len() == 1),
        "each unit carries one ack"
    );
    drop(out);
    // The done records are written on the tick after downstream took the units.
    tick(&mut j, t0 + LATER);
    drop(j);
    let mut j = open(Some(&dir), t0 + LATER);
    assert_eq!(j.pending_spans(), 0);
    assert!(tick(&mut j, t0 + 3 * LATER).is_empty());
}

#[test]
fn units_not_taken_before_the_crash_are_emitted_again() {
    let dir = TempDir::new("untaken");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 4));
    let out = tick(&mut j, t0 + LATER);
    let (mut taken, mut lost) = (Vec::new(), Vec::new());
    for (i, b) in out.into_iter().enumerate() {
        if i % 2 == 0 {
            taken.push(b);
        } else {
            lost.push(b);
        }
    }
    let lost_units = units(&lost);
    drop(taken);
    tick(&mut j, t0 + LATER);
    // The process dies with two units still in the channel to the sampler.
    drop(j);
    drop(lost);
    let mut j = open(Some(&dir), t0 + LATER);
    assert_eq!(j.pending_spans(), 2 * 22);
    let again = tick(&mut j, t0 + 3 * LATER);
    assert_eq!(units(&again), lost_units);
}

#[test]
fn compaction_keeps_the_live_state_and_shrinks_the_log() {
    let dir = TempDir::new("compact");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 20));
    let out = tick(&mut j, t0 + LATER);
    assert_eq!(out.len(), 20);
    // From here on any growth is enough (64 MiB otherwise).
    j.durable.as_mut().unwrap().log.log.set_compact_min(1);
    // One unit stays in flight downstream; three traces are still held.
    let mut out = out.into_iter();
    let in_flight = out.next().unwrap();
    drop(out);
    let t1 = t0 + LATER;
    feed(&mut j, t1, traces(20, 23));
    let before = dir.log_len();
    tick(&mut j, t1);
    let after = dir.log_len();
    assert!(
        after * 4 < before,
        "the log shrank from {before} to {after} bytes"
    );
    let log = std::fs::read(dir.log()).unwrap();
    let (r, good) = storage::replay(Bytes::from(log));
    assert_eq!(good, after);
    assert_eq!(
        r.spans.len(),
        22 + 3 * 22,
        "in flight and held, nothing else"
    );
    let want = units(std::slice::from_ref(&in_flight));
    drop(j);
    let mut j = open(Some(&dir), t1);
    let again = tick(&mut j, t1 + LATER);
    assert_eq!(again.len(), 4);
    assert!(units(&again).contains(&want[0]));
    drop(in_flight);
}

#[test]
fn the_input_ack_resolves_once_its_spans_are_in_the_file() {
    let dir = TempDir::new("ack");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    assert!(j.holds_spans());
    let (ack, mut wait) = Ack::new();
    let mut batches = traces(0, 1).into_iter();
    let sdk = batches.next().unwrap();
    let mut out = Vec::new();
    let b = SpanBatch::new(sdk.clone()).with_ack(ack);
    assert!(wait.try_take().is_none());
    j.process(t0, b, &mut out);
    assert_eq!(wait.try_take(), Some(Ok(())));
    // What the file holds at the moment the ack resolved: every span of the batch.
    let (r, _) = storage::replay(Bytes::from(std::fs::read(dir.log()).unwrap()));
    let ids: Vec<SpanId> = r.spans.iter().map(|(_, s)| s.span_id).collect();
    assert_eq!(ids, sdk.iter().map(|s| s.span_id).collect::<Vec<_>>());
    assert!(out.is_empty());
}

#[test]
fn spans_that_pass_straight_through_keep_the_input_ack_until_downstream_has_them() {
    let dir = TempDir::new("late");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    let mut batches = traces(0, 1).into_iter();
    let mut sdk = batches.next().unwrap();
    let late = sdk.pop().unwrap();
    feed(&mut j, t0, vec![sdk]);
    let unit = tick(&mut j, t0 + LATER);
    assert_eq!(unit.len(), 1);
    // A late SDK span follows its unit at once; its request is answered when the sampler has it.
    let (ack, mut wait) = Ack::new();
    let mut out = Vec::new();
    j.process(
        t0 + LATER,
        SpanBatch::new(vec![late]).with_ack(ack),
        &mut out,
    );
    assert_eq!(out.len(), 1);
    assert!(out[0].spans[0].marks.late);
    assert!(
        wait.try_take().is_none(),
        "the late span is not held by the join"
    );
    drop(out);
    assert_eq!(wait.try_take(), Some(Ok(())));
}

#[test]
fn without_storage_acks_resolve_when_the_spans_are_taken_and_units_carry_none() {
    let t0 = Instant::now();
    let mut j = open(None, t0);
    assert!(j.holds_spans());
    let (ack, mut wait) = Ack::new();
    let mut out = Vec::new();
    let sdk = traces(0, 1).into_iter().next().unwrap();
    j.process(t0, SpanBatch::new(sdk).with_ack(ack), &mut out);
    assert_eq!(wait.try_take(), Some(Ok(())));
    let out = tick(&mut j, t0 + LATER);
    assert_eq!(out.len(), 1);
    assert!(out[0].acks.is_empty());
}

#[test]
fn after_a_graceful_shutdown_the_log_is_emptied_once_downstream_took_everything() {
    let dir = TempDir::new("shutdown");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 3));
    let mut out = Vec::new();
    j.shutdown(t0, &mut out);
    assert_eq!(out.len(), 3);
    drop(j);
    assert!(dir.log_len() > 0, "the units are not taken yet");
    drop(out);
    // The settling thread runs in the background; poll with a deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.log_len() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dir.log_len(), 0);
    let j = open(Some(&dir), t0);
    assert_eq!(j.pending_spans(), 0);
}

#[test]
fn the_ebpf_model_survives_the_log_field_for_field() {
    let dir = TempDir::new("model");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    let ebpf = traces(0, 1).into_iter().nth(1).unwrap();
    feed(&mut j, t0, vec![ebpf.clone()]);
    drop(j);
    let (r, _) = storage::replay(Bytes::from(std::fs::read(dir.log()).unwrap()));
    assert_eq!(r.spans.len(), ebpf.len());
    for ((_, got), want) in r.spans.iter().zip(&ebpf) {
        assert_eq!(got.raw, want.raw);
        assert_eq!(got.source, want.source);
        assert_eq!(got.marks, want.marks);
        assert!(want.ebpf.is_some());
        assert_eq!(got.ebpf, want.ebpf);
        assert_eq!(got.resource().raw, want.resource().raw);
        assert_eq!(got.scope.raw, want.scope.raw);
    }
}

fn ctx() -> tailweave_core::BuildContext {
    tailweave_core::BuildContext {
        id: "join".into(),
        pipeline: "traces".into(),
        self_info: std::sync::Arc::new(Default::default()),
    }
}

#[test]
fn build_refuses_a_directory_that_cannot_hold_the_log_and_a_config_that_fails_validation() {
    let dir = TempDir::new("notadir");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let mut c = JoinConfig {
        storage: StorageKind::File,
        directory: Some(file.clone()),
        ..Default::default()
    };
    let e = c.build(&ctx()).err().expect("a file is no directory");
    let msg = e.to_string();
    assert!(
        msg.contains("storage in") && msg.contains("plain-file"),
        "{msg}"
    );
    c.directory = None;
    let msg = c.build(&ctx()).err().expect("no directory").to_string();
    assert!(msg.contains("directory"), "{msg}");
    c.directory = Some(dir.0.join("fresh"));
    let j = c.build(&ctx()).expect("a new directory is made");
    assert!(j.durable.is_some());
    assert!(dir.0.join("fresh").join("traces_join.log").exists());
}

#[test]
fn units_and_late_spans_the_replay_emits_are_handed_out_at_the_first_call_and_tracked() {
    let dir = TempDir::new("stash");
    let t0 = Instant::now();
    let mut j = open(Some(&dir), t0);
    feed(&mut j, t0, traces(0, 2));
    drop(j);
    // Restarted with a smaller cap: each trace reaches it while the log is read back, and the
    // rest of its spans follow as late spans.
    let small = || {
        let mut c = cfg(Some(&dir));
        c.max_spans_per_trace = 10;
        c.max_pending_spans = 10;
        c
    };
    let mut j = Join::open(small(), "join", "traces", t0).expect("opens");
    let out = tick(&mut j, t0);
    assert!(out.iter().any(|b| b.spans[0].marks.late), "late spans too");
    assert!(
        out.iter().all(|b| b.acks.len() == 1),
        "each tracked by an ack: {:?}",
        out.iter()
            .map(|b| (b.len(), b.acks.len(), b.spans[0].marks.late))
            .collect::<Vec<_>>()
    );
    let first: Vec<SpanId> = out
        .iter()
        .flat_map(|b| &b.spans)
        .map(|s| s.span_id)
        .collect();
    assert!(tick(&mut j, t0).is_empty(), "handed out once");
    drop(out);
    tick(&mut j, t0);
    drop(j);
    // Taken downstream before the next crash: none of them comes out again.
    let mut j = Join::open(small(), "join", "traces", t0).expect("opens");
    let mut out = tick(&mut j, t0);
    out.extend(tick(&mut j, t0 + LATER));
    let again: Vec<SpanId> = out
        .iter()
        .flat_map(|b| &b.spans)
        .map(|s| s.span_id)
        .filter(|id| first.contains(id))
        .collect();
    assert!(again.is_empty(), "emitted twice: {again:?}");
}
