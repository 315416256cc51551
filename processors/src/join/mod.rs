//! The `join` processor: SDK spans and DeepFlow eBPF spans into one trace tree per
//! (tenant, trace id) (`shared/docs/join.md`).
//!
//! # Layout
//! - [`config`]: `JoinConfig` (join.md §8) and its validation.
//! - [`rules`]: the merge and association rules (join.md §3, §4) as pure functions.
//! - this module: the streaming state machine (join.md §5): spans go into a slab, union-find
//!   groups them through indexes keyed by tenant, deadlines flush the groups, tombstones catch
//!   late spans.
//! - [`tree`]: builds one unit's tree at flush (join.md §6).
//! - [`output`]: rewrites the spans of a unit (join.md §7).
//! - `storage`: the restart-safe log of `storage: file`.
//!
//! Grouping happens as spans arrive (each span is tested against what is indexed, later spans
//! against it), so no query loop is needed; placement happens once, at flush, on the merged models.
//!
//! Timeouts: a request row that no response row merged into keeps `marks.timed_out` and is given
//! ERROR status in the output (with a status message saying so), so both a `status_code` policy
//! and a policy reading `Span::is_error` keep the trace.
//!
//! # Acknowledgements and `storage: file`
//! The join holds spans ([`Processor::holds_spans`]). Without storage, an input batch's acks are
//! let go at the end of `process`: the spans are in memory. Spans that pass straight through
//! (late spans following an emitted unit, keyless rows) carry clones of their input's acks, so
//! their request is answered when the next stage has them.
//!
//! With `storage: file` every span the join holds is appended to a checked log in `directory`
//! (`<pipeline>_<id>.log`, together with its normalized eBPF model) before `process` returns,
//! and the log is handed to the OS then, so the input's acks are let go only once their spans
//! would survive `kill -9`; each tick syncs it to the disk. An emitted unit carries a fresh
//! ack; once it resolves (the sampler logged the unit, or an exporter queue took it) the next
//! tick writes a done record for its spans. Spans dropped by rule (unassociated eBPF rows) are
//! done at once. On start the log is read back: a torn last record is cut (with a warning),
//! and every span without a done record is held again in arrival order, as if it had just
//! arrived, so a unit that had not reached downstream is emitted again after the restart, and
//! one that had is not. Whether such a re-emitted unit is kept is then the sampler's logged
//! decision, so no trace is decided twice differently. The log is rewritten from the live
//! state (held spans and units in flight) when it has doubled since the last compaction and
//! is at least 64 MiB. After a graceful `shutdown` a background thread waits up to 10 s for
//! the last units' acks and empties the log when all came back.
//!
//! Counted: `tailweave_join_storage_errors_total` (a failed write or compaction: the spans stay
//! in memory and the request is still answered; they would not survive a crash),
//! `tailweave_join_replayed_spans_total`, `tailweave_join_emit_failed_units_total` (a unit whose
//! ack came back failed: the stage that refused it counted its spans; it is not emitted again),
//! and the gauge `tailweave_join_unacknowledged_units`.
//!
//! Not kept across a restart: the waits (they restart at the replay, so a replayed trace is
//! emitted up to `wait.min` later than it would have been) and the tombstones of emitted units,
//! so a span arriving after the restart for a unit emitted before it is not a late span: an
//! SDK span forms a unit of its own (the sampler follows its logged decision for the trace),
//! an eBPF row that associates with nothing is unassociated. A unit the sampler logged but whose
//! done record the crash cut off (up to one tick, 250 ms) is emitted again: the sampler's log
//! treats it as late spans of a decided trace, so a kept trace's spans may be exported twice.
//!
//! # Where this differs from join.md
//! - A bridging span whose keys reach two traces stays in the group it joined first (arrival
//!   order), not the one with the stronger edge; the other trace id is still recorded.
//! - A trace reaching `max_spans_per_trace` is emitted at once (outcome `limit`); its later spans
//!   follow as `late` units.
//! - B4 links a c-p to an s-p of its own process by an equal trace key too (B4.2), so C3 between
//!   two eBPF spans with one header applies to c-p rows of other processes (sidecars, proxies).
//! - Tombstones keep the newest four emitted spans per (X-Request-ID, side), so a late span
//!   makes §4.5's "smallest parent dur" choice among those four only. A gRPC/HTTP2 frame row
//!   arriving after its session was emitted is not merged into it (the session is gone): it
//!   follows as a late span beside the session (the session's trace id, parent and `via`), and
//!   its id is not in the session's `merged_span_ids`.
//! - Units are written by appending fields to the encoded spans (see `output`); `Span::edit` is
//!   used where a field must be cleared or merged.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use tailweave_core::config::BuildContext;
use tailweave_core::ebpf::{flags, EbpfSpan};
use tailweave_core::{Ack, AckWait, ComponentError, Processor, Span, SpanBatch, SpanId};

pub mod config;
pub mod output;
pub mod rules;
mod storage;
#[doc(hidden)]
pub mod testkit;
pub mod tree;

pub use config::{JoinConfig, StorageKind, ThreadCheck, Unassociated, UnknownTenant};
use rules::{Pair, Tol, Via};

/// Units emitted, by `outcome` (`complete`, `expired`, `forced`, `limit`, `shutdown`).
pub const UNITS: &str = "tailweave_join_units_total";
/// Spans emitted in units, by `source` (`sdk`/`ebpf`) and `via`.
pub const SPANS: &str = "tailweave_join_spans_total";
/// Spans received, by `source`.
pub const SPANS_IN: &str = "tailweave_join_incoming_spans_total";
/// Unassociated eBPF spans, by `action` (`drop`/`passthrough`).
pub const UNASSOCIATED: &str = "tailweave_join_unassociated_total";
/// Request and response rows merged into one span, and HTTP/2 frame rows merged into their session.
pub const MERGED_FRAGMENTS: &str = "tailweave_join_merged_fragments_total";
/// Traces emitted early or unions refused because of `max_spans_per_trace`.
pub const LIMIT: &str = "tailweave_join_limit_total";
/// Groups emitted early because of `max_pending_spans`.
pub const FORCED_FLUSH: &str = "tailweave_join_forced_flush_total";
/// Spans emitted after their unit (`tailweave.join.late`).
pub const LATE: &str = "tailweave_join_late_total";
/// Groups waiting.
pub const PENDING_GROUPS: &str = "tailweave_join_pending_groups";
/// Spans held.
pub const PENDING_SPANS: &str = "tailweave_join_pending_spans";
/// Bytes held by the spans waiting (`Span::held_bytes`).
pub const PENDING_BYTES: &str = "tailweave_join_pending_bytes";
/// Spans dropped for other reasons than being unassociated, by `reason` (`unknown_tenant`).
pub const DROPPED: &str = "tailweave_join_dropped_spans_total";
/// Tombstones of emitted units kept for late spans (one per emitted eBPF span, plus one per unit).
pub const TOMBSTONES: &str = "tailweave_join_tombstones";
/// Unions refused because the groups carry different trace ids.
pub const REFUSED_UNIONS: &str = "tailweave_join_refused_unions_total";
/// Failed writes (or compactions) of the `storage: file` log.
pub const STORAGE_ERRORS: &str = "tailweave_join_storage_errors_total";
/// Spans read back from the `storage: file` log at start and held again.
pub const REPLAYED_SPANS: &str = "tailweave_join_replayed_spans_total";
/// Emitted units whose acknowledgement came back failed from downstream (`storage: file`):
/// the stage that refused them counted their spans.
pub const EMIT_FAILED: &str = "tailweave_join_emit_failed_units_total";
/// Emitted units downstream has not acknowledged yet (`storage: file`).
pub const UNACKED_UNITS: &str = "tailweave_join_unacknowledged_units";

impl JoinConfig {
    pub fn build(&self, ctx: &BuildContext) -> Result<Join, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let msg = issues
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ComponentError::build(&ctx.id, msg));
        }
        Join::open(self.clone(), &ctx.id, &ctx.pipeline, Instant::now()).map_err(|e| {
            let dir = self
                .directory
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            ComponentError::build(&ctx.id, format!("storage in {}: {e}", dir.display()))
        })
    }
}

/// The log file's name for a processor: `<pipeline>_<id>`, with anything but ASCII letters,
/// digits and `-` written as `_`.
pub fn log_name(pipeline: &str, id: &str) -> String {
    format!("{pipeline}_{id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The `storage: file` state: the log, and the units emitted that downstream has not taken yet.
struct Durable {
    log: storage::Storage,
    /// Emitted units, oldest first, with the spans they were made of as they came in: until
    /// downstream takes a unit, a compaction must write them again.
    waits: Vec<Unacked>,
    /// The next log id (ids grow with arrival; 0 means "not logged").
    next_lid: u64,
    /// Set while the log is replayed: those spans are in the log already.
    replaying: bool,
    /// Units produced while replaying, handed out at the first call.
    stash: Vec<SpanBatch>,
    /// `shutdown` ran: on drop, the last waits are settled in the background.
    shut: bool,
    errors: u64,
    id: String,
}

struct Unacked {
    wait: AckWait,
    originals: Vec<(u64, Span)>,
}

impl Durable {
    fn error(&mut self, what: &str, e: &std::io::Error) {
        self.errors += 1;
        metrics::counter!(STORAGE_ERRORS).increment(1);
        // The first and then every 1000th: a full disk must not flood the log.
        if self.errors % 1000 == 1 {
            tracing::warn!(processor = %self.id, error = %e, errors = self.errors, "join log {what} failed");
        }
    }

    /// Writes done records for the units downstream took (or refused).
    fn settle(&mut self) {
        let log = &mut self.log;
        self.waits.retain_mut(|u| match u.wait.try_take() {
            None => true,
            Some(r) => {
                if r.is_err() {
                    metrics::counter!(EMIT_FAILED).increment(1);
                }
                log.done(u.originals.iter().map(|(l, _)| *l));
                false
            }
        });
        metrics::gauge!(UNACKED_UNITS).set(self.waits.len() as f64);
    }
}

impl Drop for Join {
    /// After a graceful `shutdown` the last units are still on their way downstream; a thread
    /// waits (bounded) for their acks so the next start does not emit them again. A drop
    /// without `shutdown` is a crash as far as the log is concerned: nothing more is written.
    fn drop(&mut self) {
        let Some(d) = self.durable.take() else {
            return;
        };
        if !d.shut {
            return;
        }
        let id = d.id.clone();
        let spawned = std::thread::Builder::new()
            .name("join-log-drain".into())
            .spawn(move || drain_after_shutdown(d));
        if let Err(e) = spawned {
            tracing::warn!(processor = %id, error = %e, "join log: no thread to settle the last units");
        }
    }
}

/// How long the thread started by `Durable::drop` waits for downstream.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

fn drain_after_shutdown(mut d: Durable) {
    let deadline = Instant::now() + DRAIN_WAIT;
    loop {
        d.settle();
        if d.waits.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = if d.waits.is_empty() {
        // Nothing is held or in flight: the next start has nothing to replay.
        d.log.compact(std::iter::empty())
    } else {
        d.log.sync()
    };
    if let Err(e) = r {
        d.error("write", &e);
    }
}

/// The join state machine.
pub struct Join {
    cfg: JoinConfig,
    tol: Tol,
    ebpf_keys: [Vec<String>; 2],
    nodes: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    bytes: usize,
    groups: HashMap<u32, Group>,
    tenants: HashMap<Arc<str>, u32>,
    agents: HashMap<Arc<str>, u32>,
    trace_idx: HashMap<(u32, [u8; 16]), u32>,
    req_idx: HashMap<(u32, u32), IdList>,
    resp_idx: HashMap<(u32, u32), IdList>,
    sys_idx: HashMap<(u32, u32, u64), IdList>,
    xreq_idx: HashMap<(u32, Arc<str>), IdList>,
    merge_idx: HashMap<(u32, u32, u64, u8), IdList>,
    /// HTTP/2 and gRPC sessions by stream: (tenant, agent, flow_id, tap rank, request_id).
    stream_idx: HashMap<(u32, u32, u64, u8, u64), IdList>,
    /// Zero-duration HTTP/2 frame rows waiting for their session, same key.
    frame_idx: HashMap<(u32, u32, u64, u8, u64), IdList>,
    /// Group deadlines, one FIFO per wait class (see [`Timers`]).
    timers: Timers,
    m: Handles,
    arrivals: VecDeque<(u32, u32)>,
    tombs: tomb::Tombs,
    /// Tenant lookups by resource: spans of one ResourceSpans share it.
    seq: u64,
    /// `tenant.ebpf_keys` is the default `[df.universal_tag.pod_ns]`, which the model carries.
    default_ebpf_key: bool,
    scratch: Vec<u32>,
    scratch_pass: Vec<(u32, bool)>,
    /// (resource address, tenant); the address is only compared, never dereferenced.
    last_tenant: Option<(usize, Option<u32>)>,
    /// `storage: file`.
    durable: Option<Durable>,
    /// The acks of the batch `process` is handling: spans that pass straight through (late
    /// spans, keyless rows) carry them, so their request is answered once downstream has them.
    input_acks: Vec<Ack>,
}

struct Slot {
    gen: u32,
    node: Option<Node>,
}

struct Node {
    span: Span,
    tenant: u32,
    agent: u32,
    uf: u32,
    /// A fragment merged into the request fragment with this id, or a frame row into its session.
    merged_into: Option<u32>,
    /// `merged_into` is an HTTP/2 frame merge (only the end and the merged ids change).
    frame: bool,
    /// Arrival sequence: units keep the order spans came in.
    seq: u64,
    /// Next member of the group's list.
    next: u32,
    other_traces: Vec<[u8; 16]>,
    /// Log id with `storage: file` (0: not logged).
    lid: u64,
}

struct Group {
    tenant: u32,
    trace_key: Option<[u8; 16]>,
    has_sdk: bool,
    /// Members with an eBPF model: none, and the unit leaves as it came (no tree to build).
    modeled: usize,
    first_sdk: Option<Instant>,
    first_any: Instant,
    last_seen: Instant,
    /// Members as an intrusive list through `Node::next` (no allocation per span).
    head: u32,
    tail: u32,
    count: usize,
    bytes: usize,
    /// The `min`/`max` timers of the first SDK span are queued.
    sdk_timed: bool,
    /// The `orphan_ttl` timer is queued.
    orphan_timed: bool,
    /// The `last_seen` whose `idle` timer is queued last.
    idle_at: Option<Instant>,
}

/// Wait classes of [`Timers`]: each adds a fixed wait to the instant that starts it.
const T_MIN: usize = 0;
const T_IDLE: usize = 1;
const T_MAX: usize = 2;
const T_ORPHAN: usize = 3;

/// Group deadlines without a heap. A group is due at `max(first_sdk + min, last_seen + idle)`,
/// at `first_sdk + max`, or (no SDK span) at `first_any + orphan_ttl`: each term is an arrival
/// instant plus a constant of its class, and arrival instants only grow, so each class is a FIFO
/// whose deadlines are already in order. A timer names a member node (with its slot generation);
/// when it fires, the node's current group is checked against its real deadline, so timers of
/// groups that merged or moved on are harmless.
#[derive(Default)]
struct Timers {
    q: [VecDeque<(Instant, u32, u32)>; 4],
}

impl Timers {
    fn push(&mut self, class: usize, due: Instant, node: u32, gen: u32) {
        let q = &mut self.q[class];
        // A clock that stepped back must not break the order: such a timer fires a little late.
        let due = q.back().map_or(due, |b| b.0.max(due));
        q.push_back((due, node, gen));
    }
    /// The earliest timer due at `now`, removed.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, u32, u32)> {
        let mut best: Option<(usize, Instant)> = None;
        for (c, q) in self.q.iter().enumerate() {
            if let Some(&(t, _, _)) = q.front() {
                if t <= now && best.is_none_or(|(_, b)| t < b) {
                    best = Some((c, t));
                }
            }
        }
        self.q[best?.0].pop_front()
    }
    fn clear(&mut self) {
        self.q.iter_mut().for_each(|q| q.clear());
    }
}

/// Metric handles, resolved once at build: a lookup per span showed in the profile (issue 6).
struct Handles {
    spans_in: [metrics::Counter; 2],
    unknown_tenant: metrics::Counter,
    late: metrics::Counter,
    limit: metrics::Counter,
    forced: metrics::Counter,
    merged: metrics::Counter,
    refused: metrics::Counter,
    unassociated_drop: metrics::Counter,
    unassociated_passthrough: metrics::Counter,
    /// By `Outcome`.
    units: [metrics::Counter; 5],
    /// By source (sdk, ebpf), then by `VIA_LABELS`.
    spans: [[metrics::Counter; 6]; 2],
    /// SDK spans of units with no eBPF span (`via` = `none`).
    spans_sdk_only: metrics::Counter,
    pending_spans: metrics::Gauge,
    pending_bytes: metrics::Gauge,
    pending_groups: metrics::Gauge,
    tombstones: metrics::Gauge,
}

impl Handles {
    fn new() -> Handles {
        let src = ["sdk", "ebpf"];
        let outcomes = [
            Outcome::Complete,
            Outcome::Expired,
            Outcome::Forced,
            Outcome::Limit,
            Outcome::Shutdown,
        ];
        Handles {
            spans_in: src.map(|s| metrics::counter!(SPANS_IN, "source" => s)),
            unknown_tenant: metrics::counter!(DROPPED, "reason" => "unknown_tenant"),
            late: metrics::counter!(LATE),
            limit: metrics::counter!(LIMIT),
            forced: metrics::counter!(FORCED_FLUSH),
            merged: metrics::counter!(MERGED_FRAGMENTS),
            refused: metrics::counter!(REFUSED_UNIONS),
            unassociated_drop: metrics::counter!(UNASSOCIATED, "action" => "drop"),
            unassociated_passthrough: metrics::counter!(UNASSOCIATED, "action" => "passthrough"),
            units: outcomes.map(|o| metrics::counter!(UNITS, "outcome" => o.as_str())),
            spans: src
                .map(|s| VIA_LABELS.map(|v| metrics::counter!(SPANS, "source" => s, "via" => v))),
            spans_sdk_only: metrics::counter!(SPANS, "source" => "sdk", "via" => "none"),
            pending_spans: metrics::gauge!(PENDING_SPANS),
            pending_bytes: metrics::gauge!(PENDING_BYTES),
            pending_groups: metrics::gauge!(PENDING_GROUPS),
            tombstones: metrics::gauge!(TOMBSTONES),
        }
    }
}

/// A few node ids per key, inline for the common single entry.
#[derive(Debug)]
enum IdList {
    One(u32),
    Many(Vec<u32>),
}

impl IdList {
    fn push(&mut self, id: u32) {
        match self {
            IdList::One(x) => *self = IdList::Many(vec![*x, id]),
            IdList::Many(v) => v.push(id),
        }
    }
    fn as_slice(&self) -> &[u32] {
        match self {
            IdList::One(x) => std::slice::from_ref(x),
            IdList::Many(v) => v,
        }
    }
    /// Removes `id`; `true` when the list is now empty.
    fn remove(&mut self, id: u32) -> bool {
        match self {
            IdList::One(x) => *x == id,
            IdList::Many(v) => {
                v.retain(|x| *x != id);
                v.is_empty()
            }
        }
    }
}

fn idx_push<K: std::hash::Hash + Eq>(m: &mut HashMap<K, IdList>, k: K, id: u32) {
    match m.get_mut(&k) {
        Some(l) => l.push(id),
        None => {
            m.insert(k, IdList::One(id));
        }
    }
}

fn idx_remove<K: std::hash::Hash + Eq>(m: &mut HashMap<K, IdList>, k: &K, id: u32) {
    if let Some(l) = m.get_mut(k) {
        if l.remove(id) {
            m.remove(k);
        }
    }
}

const NONE: u32 = u32::MAX;

/// At most this many candidates per key are tested, newest first: a hot key (seq reuse, a
/// gateway's X-Request-ID) must not make each arrival linear in the state.
const MAX_CANDIDATES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Complete,
    Expired,
    Forced,
    Limit,
    Shutdown,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Expired => "expired",
            Outcome::Forced => "forced",
            Outcome::Limit => "limit",
            Outcome::Shutdown => "shutdown",
        }
    }
}

impl Join {
    pub fn new(mut cfg: JoinConfig) -> Join {
        // `validate` refuses longer waits; clamping here keeps `Instant` arithmetic from
        // overflowing even for a config that skipped validation.
        let day = Duration::from_secs(86_400);
        let w = &mut cfg.wait;
        for d in [&mut w.min, &mut w.idle, &mut w.max, &mut w.late_ttl] {
            *d = (*d).min(day);
        }
        w.orphan_ttl = w.orphan_ttl.map(|d| d.min(day));
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        let tol = Tol {
            network_delay: ns(cfg.tolerance.network_delay),
            host_clock_offset: ns(cfg.tolerance.host_clock_offset),
            app_slack: ns(cfg.tolerance.app_slack),
            syscall_ttl: ns(cfg.syscall.ttl),
        };
        let sfx = |s: &str| {
            cfg.tenant
                .ebpf_keys
                .iter()
                .map(|k| format!("{k}_{s}"))
                .collect()
        };
        let mut j = Join {
            ebpf_keys: [sfx("0"), sfx("1")],
            tol,
            cfg,
            nodes: Vec::new(),
            free: Vec::new(),
            live: 0,
            bytes: 0,
            groups: HashMap::new(),
            tenants: HashMap::new(),
            agents: HashMap::new(),
            trace_idx: HashMap::new(),
            req_idx: HashMap::new(),
            resp_idx: HashMap::new(),
            sys_idx: HashMap::new(),
            xreq_idx: HashMap::new(),
            merge_idx: HashMap::new(),
            stream_idx: HashMap::new(),
            frame_idx: HashMap::new(),
            timers: Timers::default(),
            m: Handles::new(),
            arrivals: VecDeque::new(),
            tombs: tomb::Tombs::default(),
            last_tenant: None,
            seq: 0,
            default_ebpf_key: false,
            scratch: Vec::new(),
            scratch_pass: Vec::new(),
            durable: None,
            input_acks: Vec::new(),
        };
        j.tombs.cap = j.cfg.max_pending_spans;
        j.default_ebpf_key = j.cfg.tenant.ebpf_keys == ["df.universal_tag.pod_ns"];
        j
    }

    /// Builds the state machine and, with `storage: file`, opens its log in `cfg.directory` and
    /// holds again every span of it that has no done record, in arrival order, as if it had
    /// just arrived (waits restart at `now`). Units that replay emits (a trace at
    /// `max_spans_per_trace`) are handed out at the first `process` or `tick`.
    pub fn open(cfg: JoinConfig, id: &str, pipeline: &str, now: Instant) -> std::io::Result<Join> {
        let dir = match (cfg.storage, cfg.directory.clone()) {
            (StorageKind::File, Some(dir)) => dir,
            _ => return Ok(Join::new(cfg)),
        };
        let mut j = Join::new(cfg);
        let (log, replayed) = storage::Storage::open(&dir, &log_name(pipeline, id))?;
        if replayed.truncated > 0 {
            tracing::warn!(
                processor = id,
                bytes = replayed.truncated,
                "join log ended in a torn record; cut it off"
            );
        }
        j.durable = Some(Durable {
            log,
            waits: Vec::new(),
            next_lid: replayed.max_lid,
            replaying: true,
            stash: Vec::new(),
            shut: false,
            errors: 0,
            id: id.to_string(),
        });
        let n = replayed.spans.len();
        let mut out = Vec::new();
        for (lid, span) in replayed.spans {
            j.add_logged(now, span, lid, &mut out);
        }
        j.last_tenant = None;
        metrics::counter!(REPLAYED_SPANS).increment(n as u64);
        tracing::info!(processor = id, spans = n, "join state restored");
        let d = j.durable.as_mut().expect("durable");
        d.replaying = false;
        d.stash = out;
        j.compact()?;
        Ok(j)
    }

    /// Hands out the units replay produced.
    fn unstash(&mut self, out: &mut Vec<SpanBatch>) {
        if let Some(d) = &mut self.durable {
            out.append(&mut d.stash);
        }
    }

    /// Rewrites the log from the live state: the spans held and those of units not yet taken.
    fn compact(&mut self) -> std::io::Result<()> {
        let Some(d) = &mut self.durable else {
            return Ok(());
        };
        let mut spans: Vec<(u64, &Span)> = self
            .nodes
            .iter()
            .filter_map(|s| s.node.as_ref())
            .filter(|n| n.lid != 0)
            .map(|n| (n.lid, &n.span))
            .chain(
                d.waits
                    .iter()
                    .flat_map(|u| u.originals.iter().map(|(l, s)| (*l, s))),
            )
            .collect();
        spans.sort_unstable_by_key(|(l, _)| *l);
        d.log.compact(spans.into_iter())
    }

    /// Hands the log records to the OS (`sync`: to the disk, compacting when it has grown).
    fn persist(&mut self, sync: bool) {
        let Some(d) = &mut self.durable else {
            return;
        };
        let r = if sync { d.log.sync() } else { d.log.flush() };
        if let Err(e) = r {
            d.error("write", &e);
            return;
        }
        if sync && d.log.wants_compaction() {
            if let Err(e) = self.compact() {
                if let Some(d) = &mut self.durable {
                    d.error("compaction", &e);
                }
            }
        }
    }

    /// What the state holds, on `/metrics`: once per call of the stage, not per span or unit.
    fn publish_gauges(&self) {
        self.m.pending_spans.set(self.live as f64);
        self.m.pending_bytes.set(self.bytes as f64);
        self.m.pending_groups.set(self.groups.len() as f64);
    }

    /// Spans held.
    pub fn pending_spans(&self) -> usize {
        self.live
    }
    /// Bytes held (`Span::held_bytes` of every held span).
    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }
    pub fn pending_groups(&self) -> usize {
        self.groups.len()
    }

    fn intern(map: &mut HashMap<Arc<str>, u32>, s: &str) -> u32 {
        if let Some(v) = map.get(s) {
            return *v;
        }
        let id = map.len() as u32;
        map.insert(Arc::from(s), id);
        id
    }

    /// join.md §2. `None`: unknown tenant and `unknown: drop`.
    fn tenant_of(&mut self, span: &Span) -> Option<u32> {
        let found: Option<&str> = match span.ebpf.as_deref() {
            None => {
                let ptr = span.resource() as *const tailweave_core::Resource as usize;
                if let Some((p, t)) = self.last_tenant {
                    if p == ptr {
                        return t;
                    }
                }
                let r = span.resource();
                let v = self
                    .cfg
                    .tenant
                    .sdk_keys
                    .iter()
                    .find_map(|k| r.attr(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()));
                let t = self.tenant_id(v);
                self.last_tenant = Some((ptr, t));
                return t;
            }
            Some(e) => {
                // The normalizer reads the default key on receipt; other producers of the model
                // may not fill it, so the resource is read when it is empty.
                let from_model = || match e.local_side() {
                    Some(side) => e.namespace[side].as_deref(),
                    None => match (&e.namespace[0], &e.namespace[1]) {
                        (Some(a), Some(b)) if a == b => Some(&**a),
                        _ => None,
                    },
                };
                let r = span.resource();
                let read = |keys: &[String]| {
                    keys.iter()
                        .find_map(|k| r.attr(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()))
                };
                let from_resource = || match e.local_side() {
                    Some(side) => read(&self.ebpf_keys[side]),
                    None => match (read(&self.ebpf_keys[0]), read(&self.ebpf_keys[1])) {
                        (Some(a), Some(b)) if a == b => Some(a),
                        _ => None,
                    },
                };
                match self.default_ebpf_key {
                    true => from_model().or_else(from_resource),
                    false => from_resource(),
                }
            }
        };
        self.tenant_id(found)
    }

    fn tenant_id(&mut self, v: Option<&str>) -> Option<u32> {
        match v {
            Some(s) => Some(Self::intern(&mut self.tenants, s)),
            None if self.cfg.tenant.unknown == UnknownTenant::Isolate => {
                Some(Self::intern(&mut self.tenants, ""))
            }
            None => None,
        }
    }

    fn node(&self, id: u32) -> &Node {
        self.nodes[id as usize].node.as_ref().expect("live node")
    }
    fn node_mut(&mut self, id: u32) -> &mut Node {
        self.nodes[id as usize].node.as_mut().expect("live node")
    }
    fn model(&self, id: u32) -> Option<&EbpfSpan> {
        self.node(id).span.ebpf.as_deref()
    }

    fn members_of(&self, g: &Group) -> Vec<u32> {
        let mut v = Vec::with_capacity(g.count);
        let mut x = g.head;
        while x != NONE && v.len() < g.count {
            v.push(x);
            x = self.node(x).next;
        }
        v
    }

    fn find(&mut self, mut x: u32) -> u32 {
        let mut root = x;
        while self.node(root).uf != root {
            root = self.node(root).uf;
        }
        while x != root {
            let next = self.node(x).uf;
            self.node_mut(x).uf = root;
            x = next;
        }
        root
    }

    fn deadline(&self, g: &Group) -> Instant {
        let w = &self.cfg.wait;
        match g.first_sdk {
            Some(f) => (f + w.min).max(g.last_seen + w.idle).min(f + w.max),
            None => g.first_any + w.orphan_ttl(),
        }
    }

    /// Queues the timers the group of `root` does not have yet (see [`Timers`]).
    fn arm(&mut self, root: u32) {
        let gen = self.nodes[root as usize].gen;
        let w = &self.cfg.wait;
        let Some(g) = self.groups.get_mut(&root) else {
            return;
        };
        match g.first_sdk {
            Some(f) => {
                if !g.sdk_timed {
                    g.sdk_timed = true;
                    self.timers.push(T_MIN, f + w.min, root, gen);
                    self.timers.push(T_MAX, f + w.max, root, gen);
                }
                if g.idle_at != Some(g.last_seen) {
                    g.idle_at = Some(g.last_seen);
                    self.timers.push(T_IDLE, g.last_seen + w.idle, root, gen);
                }
            }
            None if !g.orphan_timed => {
                g.orphan_timed = true;
                self.timers
                    .push(T_ORPHAN, g.first_any + w.orphan_ttl(), root, gen);
            }
            None => {}
        }
    }

    /// Unites the groups of `a` and `b` under the §5.3 guards. `false` if refused.
    fn union(&mut self, a: u32, b: u32) -> bool {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return true;
        }
        let (ga, gb) = (&self.groups[&ra], &self.groups[&rb]);
        if let (Some(ka), Some(kb)) = (ga.trace_key, gb.trace_key) {
            if ka != kb && !self.cfg.allow_multiple_trace_ids {
                self.m.refused.increment(1);
                // The arriving span `a` bridges to another trace: say so on it.
                let other = if self.find(a) == ra { kb } else { ka };
                let n = self.node_mut(a);
                if !n.other_traces.contains(&other) {
                    n.other_traces.push(other);
                }
                return false;
            }
        }
        if ga.count + gb.count > self.cfg.max_spans_per_trace {
            self.m.limit.increment(1);
            return false;
        }
        let (keep, gone) = if ga.count >= gb.count {
            (ra, rb)
        } else {
            (rb, ra)
        };
        let g2 = self.groups.remove(&gone).expect("group");
        self.node_mut(gone).uf = keep;
        let tail = self.groups[&keep].tail;
        self.node_mut(tail).next = g2.head;
        let g = self.groups.get_mut(&keep).expect("group");
        g.tail = g2.tail;
        g.count += g2.count;
        g.bytes += g2.bytes;
        g.modeled += g2.modeled;
        g.trace_key = g.trace_key.or(g2.trace_key);
        g.has_sdk |= g2.has_sdk;
        g.first_sdk = match (g.first_sdk, g2.first_sdk) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        g.first_any = g.first_any.min(g2.first_any);
        g.last_seen = g.last_seen.max(g2.last_seen);
        g.sdk_timed |= g2.sdk_timed;
        g.orphan_timed |= g2.orphan_timed;
        g.idle_at = g.idle_at.max(g2.idle_at);
        true
    }

    /// A node for `span` in a group of its own.
    fn insert_node(&mut self, span: Span, tenant: u32, agent: u32, now: Instant) -> u32 {
        let id = self.new_node(span, tenant, agent);
        let n = self.node(id);
        let held = n.span.held_bytes();
        let is_sdk = n.span.ebpf.is_none();
        let key = match n.span.ebpf.as_deref() {
            None => Some(n.span.trace_id.0),
            Some(e) => e.trace_key,
        };
        self.groups.insert(
            id,
            Group {
                tenant,
                trace_key: key,
                has_sdk: is_sdk,
                modeled: usize::from(!is_sdk),
                first_sdk: is_sdk.then_some(now),
                first_any: now,
                last_seen: now,
                head: id,
                tail: id,
                count: 1,
                bytes: held,
                sdk_timed: false,
                orphan_timed: false,
                idle_at: None,
            },
        );
        id
    }

    /// An SDK span of the live trace whose group is rooted at `root`: linked into that group
    /// directly. What [`Join::insert_node`] and a [`Join::union`] with the trace's group would
    /// do, without a group of one made and merged away per span (the common case: every span
    /// of a trace after its first). The span back, nothing done, where the union's guards
    /// could refuse it.
    fn append_sdk(
        &mut self,
        span: Span,
        tenant: u32,
        root: u32,
        now: Instant,
    ) -> Result<u32, Span> {
        let Some(g) = self.groups.get(&root) else {
            return Err(span);
        };
        let k = span.trace_id.0;
        let other_trace = g.trace_key.is_some_and(|gk| gk != k);
        if (other_trace && !self.cfg.allow_multiple_trace_ids)
            || g.count + 1 > self.cfg.max_spans_per_trace
        {
            return Err(span);
        }
        let id = self.new_node(span, tenant, 0);
        let held = self.node(id).span.held_bytes();
        let g = self.groups.get_mut(&root).expect("group");
        let tail = g.tail;
        g.tail = id;
        g.count += 1;
        g.bytes += held;
        g.trace_key = g.trace_key.or(Some(k));
        g.has_sdk = true;
        g.first_sdk = Some(g.first_sdk.map_or(now, |f| f.min(now)));
        g.first_any = g.first_any.min(now);
        g.last_seen = g.last_seen.max(now);
        self.node_mut(tail).next = id;
        self.node_mut(id).uf = root;
        Ok(id)
    }

    /// A slot for `span`, not yet in a group (its `uf` names itself).
    fn new_node(&mut self, span: Span, tenant: u32, agent: u32) -> u32 {
        self.seq += 1;
        let node = Node {
            span,
            tenant,
            agent,
            uf: 0,
            merged_into: None,
            frame: false,
            seq: self.seq,
            next: NONE,
            other_traces: Vec::new(),
            lid: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                let slot = &mut self.nodes[id as usize];
                slot.gen = slot.gen.wrapping_add(1);
                slot.node = Some(node);
                id
            }
            None => {
                self.nodes.push(Slot {
                    gen: 0,
                    node: Some(node),
                });
                (self.nodes.len() - 1) as u32
            }
        };
        let n = self.node_mut(id);
        n.uf = id;
        let held = n.span.held_bytes();
        self.live += 1;
        self.bytes += held;
        let gen = self.nodes[id as usize].gen;
        self.arrivals.push_back((id, gen));
        id
    }

    /// Logs a span about to be held (`storage: file`); its log id, or 0.
    fn log_span(&mut self, span: &Span) -> u64 {
        match &mut self.durable {
            Some(d) if !d.replaying => {
                d.next_lid += 1;
                d.log.span(d.next_lid, span);
                d.next_lid
            }
            _ => 0,
        }
    }

    /// Gives the batches a span passed straight through in (`out[from..]`) the input's acks.
    /// A span from the log (`lid` != 0, a replay) is tracked as a unit of its own instead: its
    /// request was answered before the restart, and its done record waits for downstream.
    fn pass_acks(&mut self, out: &mut [SpanBatch], lid: u64, original: Option<Span>) {
        let (Some(d), Some(original)) = (&mut self.durable, original.filter(|_| lid != 0)) else {
            for b in out {
                b.acks.extend(self.input_acks.iter().cloned());
            }
            return;
        };
        if out.iter().all(|b| b.is_empty()) {
            d.log.done(std::iter::once(lid));
            return;
        }
        let (ack, wait) = Ack::new();
        for b in out {
            b.acks.push(ack.clone());
        }
        d.waits.push(Unacked {
            wait,
            originals: vec![(lid, original)],
        });
    }

    fn add(&mut self, now: Instant, span: Span, out: &mut Vec<SpanBatch>) {
        self.add_logged(now, span, 0, out)
    }

    /// [`Join::add`] of a span that is in the log already under `lid` (a replay), or not (0).
    fn add_logged(&mut self, now: Instant, span: Span, lid: u64, out: &mut Vec<SpanBatch>) {
        self.m.spans_in[usize::from(span.ebpf.is_some())].increment(1);
        let Some(tenant) = self.tenant_of(&span) else {
            self.m.unknown_tenant.increment(1);
            if let (Some(d), true) = (&mut self.durable, lid != 0) {
                d.log.done(std::iter::once(lid));
            }
            return;
        };
        let key = match span.ebpf.as_deref() {
            None => Some(span.trace_id.0),
            Some(e) => e.trace_key,
        };
        let live_group = key.and_then(|k| self.trace_idx.get(&(tenant, k)).copied());

        // Late arrivals (join.md §5.5): the unit has gone, a tombstone remembers it.
        if live_group.is_none() {
            if let Some(late) = self.tombs.match_late(tenant, key, &span, &self.tol, now) {
                self.m.late.increment(1);
                let original = (lid != 0).then(|| span.clone());
                out.push(SpanBatch::whole(vec![output::late_span(span, &late)]));
                let n = out.len();
                self.pass_acks(&mut out[n - 1..], lid, original);
                return;
            }
        }

        let agent = match span.ebpf.as_deref() {
            Some(e) => Self::intern(&mut self.agents, &e.agent),
            None => 0,
        };
        let no_keys = span.ebpf.as_deref().is_some_and(|e| e.has(flags::NO_KEYS));
        if no_keys && key.is_none() {
            let from = out.len();
            let original = (lid != 0).then(|| span.clone());
            self.unassociated(vec![span], out);
            self.pass_acks(&mut out[from..], lid, original);
            return;
        }
        let lid = if lid != 0 { lid } else { self.log_span(&span) };
        // An SDK span of a live trace joins its group directly; anything else gets a group of
        // its own, united with the trace's under the guards.
        let appended = match live_group.filter(|_| span.ebpf.is_none()) {
            Some(other) => {
                let root = self.find(other);
                self.append_sdk(span, tenant, root, now)
            }
            None => Err(span),
        };
        let id = match appended {
            Ok(id) => id,
            Err(span) => {
                let id = self.insert_node(span, tenant, agent, now);
                match (live_group, key) {
                    (Some(other), _) => {
                        self.union(id, other);
                    }
                    (None, Some(k)) => {
                        self.trace_idx.insert((tenant, k), id);
                    }
                    (None, None) => {}
                }
                id
            }
        };
        self.node_mut(id).lid = lid;
        if self.model(id).is_some() && !no_keys {
            self.associate(id);
        }
        let root = self.find(id);
        if let Some(g) = self.groups.get_mut(&root) {
            g.last_seen = now;
        }
        self.arm(root);

        let size = self.groups.get(&root).map_or(0, |g| g.count);
        if size >= self.cfg.max_spans_per_trace {
            self.m.limit.increment(1);
            self.flush(root, now, Outcome::Limit, out);
        }
        while self.live > self.cfg.max_pending_spans {
            let Some((oldest, gen)) = self.arrivals.pop_front() else {
                break;
            };
            let slot = &self.nodes[oldest as usize];
            if slot.gen != gen || slot.node.is_none() {
                continue;
            }
            let r = self.find(oldest);
            self.m.forced.increment(1);
            self.flush(r, now, Outcome::Forced, out);
        }
    }

    /// Tests the new eBPF node against the indexes, unites what relates, then indexes it.
    fn associate(&mut self, id: u32) {
        let tenant = self.node(id).tenant;
        let agent = self.node(id).agent;
        let e = self.model(id).expect("eBPF").clone_keys();
        // Scratch buffers live in the state: no allocation per span.
        let mut cands = std::mem::take(&mut self.scratch);
        let mut pass = std::mem::take(&mut self.scratch_pass);
        cands.clear();
        pass.clear();

        // §3 merge of request/response fragments.
        if e.fragment && e.flow_id != 0 && e.rank != 0 {
            let mk = (tenant, agent, e.flow_id, e.rank);
            let mut partner = None;
            if let Some(list) = self.merge_idx.get(&mk) {
                for &c in list.as_slice().iter().rev() {
                    let (me, other) = (self.model(id).expect("eBPF"), self.model(c).expect("eBPF"));
                    let (q, r) = if me.is_request_only() {
                        (me, other)
                    } else {
                        (other, me)
                    };
                    if me.is_request_only() == other.is_request_only() {
                        continue;
                    }
                    match rules::pairs(q, r) {
                        Pair::Yes => {
                            partner = Some(c);
                            break;
                        }
                        Pair::Stop => break,
                        Pair::No => {}
                    }
                }
            }
            match partner {
                Some(c) if self.union(id, c) => {
                    idx_remove(&mut self.merge_idx, &mk, c);
                    if let Some(fk) = e.frame_key(tenant, agent) {
                        idx_remove(&mut self.frame_idx, &fk, c);
                    }
                    let req_is_me = self.model(id).expect("eBPF").is_request_only();
                    let (q, r) = if req_is_me { (id, c) } else { (c, id) };
                    self.node_mut(r).merged_into = Some(q);
                    self.m.merged.increment(1);
                }
                _ => match e.frame_key(tenant, agent) {
                    Some(fk) if self.absorb_frame(id, &fk) => {
                        // Absorbed: its seqs and ids are the session's (join.md §3), so
                        // it is neither indexed nor associated on its own.
                        self.scratch = cands;
                        self.scratch_pass = pass;
                        return;
                    }
                    Some(fk) => {
                        idx_push(&mut self.merge_idx, mk, id);
                        idx_push(&mut self.frame_idx, fk, id);
                    }
                    None => idx_push(&mut self.merge_idx, mk, id),
                },
            }
        }
        // §3: a gRPC/HTTP2 session takes the frame rows of its stream that came first.
        if let Some(sk) = e.stream_key(tenant, agent) {
            if let Some(list) = self.frame_idx.get(&sk) {
                cands.extend_from_slice(list.as_slice());
            }
            for &f in &cands {
                let ok = {
                    let (es, ef) = (self.model(id).expect("eBPF"), self.model(f).expect("eBPF"));
                    self.node(f).merged_into.is_none() && rules::frame_of(es, ef)
                };
                if ok && self.union(id, f) {
                    let n = self.node_mut(f);
                    n.merged_into = Some(id);
                    n.frame = true;
                    idx_remove(&mut self.frame_idx, &sk, f);
                    let mk = (tenant, agent, e.flow_id, e.rank);
                    idx_remove(&mut self.merge_idx, &mk, f);
                    self.m.merged.increment(1);
                }
            }
            cands.clear();
            idx_push(&mut self.stream_idx, sk, id);
        }

        // §4.3 tcp_seq
        for (seq, is_req) in [(e.req_seq, true), (e.resp_seq, false)] {
            if seq == 0 {
                continue;
            }
            let idx = if is_req {
                &self.req_idx
            } else {
                &self.resp_idx
            };
            if let Some(list) = idx.get(&(tenant, seq)) {
                cands.extend(list.as_slice().iter().rev().take(MAX_CANDIDATES));
            }
        }
        cands.sort_unstable();
        cands.dedup();
        for &c in &cands {
            let (a, b) = (self.node(id), self.node(c));
            let (ea, eb) = (
                a.span.ebpf.as_deref().expect("e"),
                b.span.ebpf.as_deref().expect("e"),
            );
            if rules::tcp_related(&a.span, ea, &b.span, eb, &self.tol) {
                self.union(id, c);
            }
        }

        // §4.4 syscall, with the thread guard.
        if e.system {
            cands.clear();
            for sid in [e.sys_req, e.sys_resp] {
                if sid == 0 {
                    continue;
                }
                if let Some(list) = self.sys_idx.get(&(tenant, agent, sid)) {
                    cands.extend(list.as_slice().iter().rev().take(MAX_CANDIDATES));
                }
            }
            cands.sort_unstable();
            cands.dedup();
            for &c in &cands {
                let (ea, eb) = (self.model(id).expect("e"), self.model(c).expect("e"));
                let r = rules::syscall_rel(ea, eb, &self.tol)
                    .or_else(|| rules::syscall_rel(eb, ea, &self.tol));
                if let Some((_, mismatch)) = r {
                    pass.push((c, mismatch));
                }
            }
            let n = pass.len();
            for &(c, mismatch) in &pass {
                let ok =
                    !mismatch || (self.cfg.syscall.thread_check == ThreadCheck::Lenient && n == 1);
                if ok {
                    self.union(id, c);
                }
            }
        }

        // §4.5 x_request_id
        cands.clear();
        for x in e.xreq.iter().flatten() {
            if let Some(list) = self.xreq_idx.get(&(tenant, x.clone())) {
                cands.extend(list.as_slice().iter().rev().take(MAX_CANDIDATES));
            }
        }
        cands.sort_unstable();
        cands.dedup();
        for &c in &cands {
            let (ea, eb) = (self.model(id).expect("e"), self.model(c).expect("e"));
            if rules::xreq_upstream(ea, eb) || rules::xreq_upstream(eb, ea) {
                self.union(id, c);
            }
        }

        // Index the new node.
        if e.req_seq != 0 {
            idx_push(&mut self.req_idx, (tenant, e.req_seq), id);
        }
        if e.resp_seq != 0 {
            idx_push(&mut self.resp_idx, (tenant, e.resp_seq), id);
        }
        if e.system {
            for sid in [e.sys_req, e.sys_resp] {
                if sid != 0 {
                    idx_push(&mut self.sys_idx, (tenant, agent, sid), id);
                }
            }
            if e.sys_req == e.sys_resp && e.sys_req != 0 {
                // Entered once is enough.
                idx_remove(&mut self.sys_idx, &(tenant, agent, e.sys_req), id);
                idx_push(&mut self.sys_idx, (tenant, agent, e.sys_req), id);
            }
        }
        for x in e.xreq.into_iter().flatten() {
            idx_push(&mut self.xreq_idx, (tenant, x), id);
        }
        self.scratch = cands;
        self.scratch_pass = pass;
    }

    /// Merges frame row `id` into a live session of its stream (join.md §3); `false` if none fits.
    fn absorb_frame(&mut self, id: u32, key: &(u32, u32, u64, u8, u64)) -> bool {
        let Some(list) = self.stream_idx.get(key) else {
            return false;
        };
        // Newest session first; stream ids are not reused on one connection, so there is
        // usually one.
        let found = list.as_slice().iter().rev().copied().find(|&s| {
            let (es, ef) = (self.model(s).expect("eBPF"), self.model(id).expect("eBPF"));
            rules::frame_of(es, ef)
        });
        match found {
            Some(s) if self.union(id, s) => {
                let n = self.node_mut(id);
                n.merged_into = Some(s);
                n.frame = true;
                self.m.merged.increment(1);
                true
            }
            _ => false,
        }
    }

    fn unindex(&mut self, id: u32) {
        let n = self.node(id);
        let (tenant, agent) = (n.tenant, n.agent);
        let Some(e) = n.span.ebpf.as_deref().map(|e| e.clone_keys()) else {
            return;
        };
        if e.req_seq != 0 {
            idx_remove(&mut self.req_idx, &(tenant, e.req_seq), id);
        }
        if e.resp_seq != 0 {
            idx_remove(&mut self.resp_idx, &(tenant, e.resp_seq), id);
        }
        for sid in [e.sys_req, e.sys_resp] {
            if sid != 0 {
                idx_remove(&mut self.sys_idx, &(tenant, agent, sid), id);
            }
        }
        if e.fragment {
            idx_remove(&mut self.merge_idx, &(tenant, agent, e.flow_id, e.rank), id);
        }
        if let Some(k) = e.frame_key(tenant, agent) {
            idx_remove(&mut self.frame_idx, &k, id);
        }
        if let Some(k) = e.stream_key(tenant, agent) {
            idx_remove(&mut self.stream_idx, &k, id);
        }
        for x in e.xreq.into_iter().flatten() {
            idx_remove(&mut self.xreq_idx, &(tenant, x), id);
        }
    }

    /// Emits (or drops) eBPF spans that joined no SDK trace (join.md §7 e).
    fn unassociated(&mut self, spans: Vec<Span>, out: &mut Vec<SpanBatch>) {
        let n = spans.len() as u64;
        match self.cfg.unassociated_ebpf {
            Unassociated::Drop => {
                self.m.unassociated_drop.increment(n);
            }
            Unassociated::Passthrough => {
                self.m.unassociated_passthrough.increment(n);
                out.extend(spans.into_iter().map(|s| SpanBatch::whole(vec![s])));
            }
        }
    }

    /// Emits the group of `root`; with `storage: file` the batches carry a fresh ack, and the
    /// spans get their done record once it resolves (see [`Durable::settle`]).
    fn flush(&mut self, root: u32, now: Instant, outcome: Outcome, out: &mut Vec<SpanBatch>) {
        if self.durable.is_none() {
            return self.flush_unit(root, now, outcome, out);
        }
        let Some(g) = self.groups.get(&root) else {
            return;
        };
        let originals: Vec<(u64, Span)> = self
            .members_of(g)
            .into_iter()
            .map(|m| self.node(m))
            .filter(|n| n.lid != 0)
            .map(|n| (n.lid, n.span.clone()))
            .collect();
        let from = out.len();
        self.flush_unit(root, now, outcome, out);
        let Some(d) = &mut self.durable else {
            return;
        };
        if originals.is_empty() {
            return;
        }
        let emitted = &mut out[from..];
        if emitted.iter().all(|b| b.is_empty()) {
            // Dropped by rule (unassociated): gone for good now.
            d.log.done(originals.iter().map(|(l, _)| *l));
            return;
        }
        let (ack, wait) = Ack::new();
        for b in emitted.iter_mut() {
            b.acks.push(ack.clone());
        }
        d.waits.push(Unacked { wait, originals });
    }

    fn flush_unit(&mut self, root: u32, now: Instant, outcome: Outcome, out: &mut Vec<SpanBatch>) {
        let Some(g) = self.groups.remove(&root) else {
            return;
        };
        let mut ids = self.members_of(&g);
        {
            let nodes = &self.nodes;
            ids.sort_unstable_by_key(|&m| nodes[m as usize].node.as_ref().map_or(0, |n| n.seq));
        }
        if let Some(k) = g.trace_key {
            self.trace_idx.remove(&(g.tenant, k));
        }
        if g.modeled == 0 {
            return self.flush_sdk_only(&g, ids, now, outcome, out);
        }
        // Take the nodes out; absorbed fragments go to their request fragment.
        let mut members: Vec<tree::Member> = Vec::with_capacity(ids.len());
        let mut pos: HashMap<u32, usize> = HashMap::with_capacity(ids.len());
        let mut absorbed: Vec<(u32, Span, bool)> = Vec::new();
        for &id in &ids {
            self.unindex(id);
            let slot = &mut self.nodes[id as usize];
            let n = slot.node.take().expect("live node");
            self.free.push(id);
            self.live -= 1;
            self.bytes -= n.span.held_bytes();
            match n.merged_into {
                Some(q) => absorbed.push((q, n.span, n.frame)),
                None => {
                    pos.insert(id, members.len());
                    members.push(tree::Member::new(n.span, n.other_traces));
                }
            }
        }
        for (q, r, frame) in absorbed {
            match pos.get(&q) {
                Some(&i) if frame => members[i].absorb_frame(r),
                Some(&i) => members[i].absorb(r),
                // Cannot happen (a merge unites the groups), but never lose a span.
                None => members.push(tree::Member::new(r, Vec::new())),
            }
        }

        if !g.has_sdk {
            let spans = members
                .into_iter()
                .flat_map(|m| m.into_original_spans())
                .collect();
            self.unassociated(spans, out);
            return;
        }
        self.m.units[outcome as usize].increment(1);
        // At least one member has a model here: units without are `flush_sdk_only`'s.
        let unit_trace = g.trace_key.unwrap_or_default();
        let plan = tree::build(
            &mut members,
            unit_trace,
            &self.tol,
            self.cfg.allow_multiple_trace_ids,
        );
        // Counted from the plan: reading the attributes back would rescan every span.
        let mut counts: [[u64; 6]; 2] = [[0; 6]; 2];
        for (i, m) in members.iter().enumerate() {
            if plan.kept[i] {
                let src = usize::from(m.model().is_some());
                counts[src][plan.via[i].map_or(5, |v| v as usize)] += 1;
            }
        }
        for (src, row) in counts.iter().enumerate() {
            for (v, &n) in row.iter().enumerate() {
                if n > 0 {
                    self.m.spans[src][v].increment(n);
                }
            }
        }
        let (unit, dropped) = output::apply(members, &plan, unit_trace, self.cfg.emit_clock_offset);
        self.tombs
            .record(g.tenant, plan.trace_id, &unit, now + self.cfg.wait.late_ttl);
        if !unit.is_empty() {
            out.push(SpanBatch::whole(unit));
        }
        if !dropped.is_empty() {
            self.unassociated(dropped, out);
        }
    }

    /// [`Join::flush_unit`] of a unit without eBPF spans: its spans leave as they came, in
    /// arrival order (`ids`), with no tree to build, nothing indexed to remove and nothing
    /// merged into another member.
    fn flush_sdk_only(
        &mut self,
        g: &Group,
        ids: Vec<u32>,
        now: Instant,
        outcome: Outcome,
        out: &mut Vec<SpanBatch>,
    ) {
        let mut spans = Vec::with_capacity(ids.len());
        for id in ids {
            let n = self.nodes[id as usize].node.take().expect("live node");
            self.free.push(id);
            self.live -= 1;
            self.bytes -= n.span.held_bytes();
            spans.push(n.span);
        }
        self.m.units[outcome as usize].increment(1);
        self.m.spans_sdk_only.increment(spans.len() as u64);
        let unit_trace = g.trace_key.unwrap_or_default();
        self.tombs
            .record(g.tenant, unit_trace, &spans, now + self.cfg.wait.late_ttl);
        out.push(SpanBatch::whole(spans));
    }

    fn due(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        while let Some((_, node, gen)) = self.timers.pop_due(now) {
            let slot = &self.nodes[node as usize];
            if slot.gen != gen || slot.node.is_none() {
                continue;
            }
            let root = self.find(node);
            let Some(g) = self.groups.get(&root) else {
                continue;
            };
            // Not due yet: a later timer of the group (idle, or min) covers it.
            if self.deadline(g) > now {
                continue;
            }
            let w = &self.cfg.wait;
            let outcome = match g.first_sdk {
                Some(f) if now >= (f + w.min).max(g.last_seen + w.idle) => Outcome::Complete,
                _ => Outcome::Expired,
            };
            self.flush(root, now, outcome, out);
        }
        self.tombs.expire(now);
        self.m.tombstones.set(self.tombs.len() as f64);
        if self.arrivals.len() > 2 * self.live + 1024 {
            let nodes = &self.nodes;
            self.arrivals.retain(|&(id, gen)| {
                nodes[id as usize].gen == gen && nodes[id as usize].node.is_some()
            });
        }
    }
}

/// `via` labels in `Via` order, then the main root.
const VIA_LABELS: [&str; 6] = [
    "tcp_seq",
    "span_id",
    "syscall",
    "x_request_id",
    "trace_id",
    "root",
];

/// The keys of an eBPF span the indexes use, copied out so the state can be borrowed mutably.
struct Keys {
    fragment: bool,
    flow_id: u64,
    rank: u8,
    req_seq: u32,
    resp_seq: u32,
    system: bool,
    sys_req: u64,
    sys_resp: u64,
    xreq: [Option<Arc<str>>; 2],
    /// A zero-duration gRPC/HTTP2 fragment (a frame row, join.md §3).
    frame: bool,
    /// A gRPC/HTTP2 session that takes frame rows.
    stream: bool,
    request_id: u64,
}

impl Keys {
    fn frame_key(&self, tenant: u32, agent: u32) -> Option<(u32, u32, u64, u8, u64)> {
        self.frame
            .then_some((tenant, agent, self.flow_id, self.rank, self.request_id))
    }
    fn stream_key(&self, tenant: u32, agent: u32) -> Option<(u32, u32, u64, u8, u64)> {
        self.stream
            .then_some((tenant, agent, self.flow_id, self.rank, self.request_id))
    }
}

trait CloneKeys {
    fn clone_keys(&self) -> Keys;
}

impl CloneKeys for EbpfSpan {
    fn clone_keys(&self) -> Keys {
        let keyless = self.has(flags::NO_KEYS);
        let fragment = (self.is_request_only() || self.is_response_only()) && !keyless;
        let h2 = self.l7_protocol != 0 && rules::same_l7(self.l7_protocol, 21);
        let per_stream = h2
            && self.request_id.is_some()
            && self.flow_id != 0
            && self.tap_side.rank() != 0
            && !keyless
            && !self.has(flags::NO_TIMESTAMPS);
        Keys {
            frame: per_stream && fragment && self.start_ns == self.end_ns,
            stream: per_stream && !fragment && self.has(flags::SESSION),
            request_id: self.request_id.unwrap_or(0),
            fragment,
            flow_id: self.flow_id,
            rank: self.tap_side.rank(),
            req_seq: if keyless { 0 } else { self.req_tcp_seq },
            resp_seq: if keyless { 0 } else { self.resp_tcp_seq },
            system: self.is_system() && !keyless,
            sys_req: self.syscall_req,
            sys_resp: self.syscall_resp,
            xreq: if keyless {
                [None, None]
            } else {
                self.x_request_id.clone()
            },
        }
    }
}

impl Processor for Join {
    fn process(&mut self, now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        self.unstash(out);
        self.input_acks = batch.acks;
        for span in batch.spans {
            self.add(now, span, out);
        }
        self.last_tenant = None;
        self.publish_gauges();
        // With storage the spans are in the file from here: only now is the request taken.
        self.persist(false);
        self.input_acks.clear();
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        self.unstash(out);
        self.due(now, out);
        self.publish_gauges();
        if let Some(d) = &mut self.durable {
            d.settle();
        }
        self.persist(true);
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(250))
    }

    fn holds_spans(&self) -> bool {
        true
    }

    fn shutdown(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        self.unstash(out);
        let roots: Vec<u32> = self.groups.keys().copied().collect();
        let mut roots: Vec<(Instant, u32)> = roots
            .into_iter()
            .map(|r| (self.groups[&r].first_any, r))
            .collect();
        roots.sort_unstable();
        for (_, r) in roots {
            self.flush(r, now, Outcome::Shutdown, out);
        }
        self.tombs = tomb::Tombs::default();
        self.timers.clear();
        self.arrivals.clear();
        self.publish_gauges();
        if let Some(d) = &mut self.durable {
            d.settle();
            d.shut = true;
        }
        self.persist(true);
    }
}

/// Identity of a span in a unit, for tombstones and late spans.
#[derive(Clone, Copy, Debug)]
pub struct LateTarget {
    pub trace_id: [u8; 16],
    pub parent: SpanId,
    pub via: Via,
}

mod tomb;

#[cfg(test)]
mod restart_tests;
#[cfg(test)]
mod tests;
