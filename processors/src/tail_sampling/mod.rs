//! The `tail_sampling` processor: holds every span of a trace until the trace is decided, then
//! forwards all of it or none of it.
//!
//! # Layout
//! - [`config`]: the config (the OpenTelemetry Collector's syntax plus tailweave's triggers,
//!   caps and tenants) and its validation.
//! - `policy`: compiled policies and how a policy set votes on one trace.
//! - `cache`: remembered decisions for late spans.
//! - `storage`: the optional restart-safe log (`storage: file`).
//! - this file: the state machine (`process`, `tick`, `shutdown`) and its self-metrics.
//!
//! # Triggers
//! A trace is decided at the first of: `decision_wait` since its first span; `decision_wait_after_root`
//! without a new span once its root has arrived; `max_spans_per_trace` / `max_trace_bytes`; a
//! [`SpanBatch`] marked `whole` (the join assembled it, so there is nothing to wait for); the caps
//! (`num_traces`, `max_memory_mib`, oldest first, unless `on_full: backpressure`); shutdown.
//!
//! # Example
//! ```yaml
//! tail_sampling:
//!   decision_wait: 30s
//!   decision_wait_after_root: 2s
//!   num_traces: 100000
//!   max_memory_mib: 512
//!   policies:
//!     - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
//!     - {name: slow, type: latency, latency: {threshold_ms: 500}}
//!     - {name: baseline, type: probabilistic, probabilistic: {sampling_percentage: 10}}
//!     - name: no-health-checks
//!       type: drop
//!       drop: {drop_sub_policy: [{name: probe, type: string_attribute,
//!              string_attribute: {key: http.route, values: [/healthz]}}]}
//! ```
//! Every kept span carries `sampling.policy` and `sampling.adjusted_count`.
//!
//! # Why it is shaped like this
//! Time is a parameter, so every trigger is tested without sleeping. Deadlines live in one
//! min-heap with lazy invalidation: a trace has at most two entries, and a deadline that moved
//! later (a new span after the root) is re-pushed when the old one comes due instead of being
//! searched for. An instance holds no global state, so the driver can shard traces by id across
//! instances (rate limits then apply per instance). Counters are plain integers on the hot path
//! and are handed to `metrics` on each tick.

pub mod config;

mod cache;
mod packed;
mod policy;
mod storage;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use hashbrown::HashMap;
use tailweave_core::config::BuildContext;
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::wire::put_len_field;
use tailweave_core::{ComponentError, Processor, Span, SpanBatch, TraceId};

pub use config::{OnFull, PolicyConfig, PolicyKind, StorageKind, TailSamplingConfig};

use cache::{Cached, DecisionCache};
use packed::{Packed, Scopes};
use policy::{Ctx, Outcome, PolicySet, Summary, TraceView};
use storage::Storage;

/// Span attribute naming the policy that kept the trace.
pub const ATTR_POLICY: &str = "sampling.policy";
/// Span attribute with the trace's adjusted count (1/p for a probabilistic keep, else 1).
pub const ATTR_ADJUSTED_COUNT: &str = "sampling.adjusted_count";

/// Traces decided, by `decision` (`kept`/`dropped`), `policy` (the keeping or vetoing policy,
/// `none` when no policy kept the trace) and `tenant`.
pub const METRIC_TRACES: &str = "tailweave_tail_sampling_traces_total";
/// Spans of decided traces, labelled like [`METRIC_TRACES`].
pub const METRIC_SPANS: &str = "tailweave_tail_sampling_spans_total";
/// Decisions by `trigger` (`decision_wait`, `after_root`, `whole`, `size`, `cap`, `memory`,
/// `shutdown`).
pub const METRIC_DECISIONS: &str = "tailweave_tail_sampling_decisions_total";
/// Traces decided before their wait ended, by `cause` (`size`, `cap`, `memory`, `shutdown`).
pub const METRIC_EARLY_DECISIONS: &str = "tailweave_tail_sampling_early_decisions_total";
/// Spans that arrived after their trace was decided, by `outcome` (`kept`/`dropped`).
pub const METRIC_LATE_SPANS: &str = "tailweave_tail_sampling_late_spans_total";
/// Undecided traces held.
pub const METRIC_TRACES_IN_MEMORY: &str = "tailweave_tail_sampling_traces_in_memory";
/// Spans of undecided traces held.
pub const METRIC_SPANS_IN_MEMORY: &str = "tailweave_tail_sampling_spans_in_memory";
/// Bytes held by undecided traces (spans, their headers, per-trace bookkeeping).
pub const METRIC_BYTES_HELD: &str = "tailweave_tail_sampling_bytes_held";
/// Seconds from a trace's first span to its decision.
pub const METRIC_DECISION_LATENCY: &str = "tailweave_tail_sampling_decision_latency_seconds";
/// Failed writes of the restart-safe log (the processor goes on in memory).
pub const METRIC_STORAGE_ERRORS: &str = "tailweave_tail_sampling_storage_errors_total";
/// Kept spans that could not be decoded to add the sampling attributes (forwarded as they were).
pub const METRIC_ANNOTATE_FAILED: &str = "tailweave_tail_sampling_annotate_failed_spans_total";

/// What decided a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    DecisionWait = 0,
    AfterRoot = 1,
    Whole = 2,
    Size = 3,
    Cap = 4,
    Memory = 5,
    Shutdown = 6,
}

impl Trigger {
    pub const ALL: [Trigger; 7] = [
        Trigger::DecisionWait,
        Trigger::AfterRoot,
        Trigger::Whole,
        Trigger::Size,
        Trigger::Cap,
        Trigger::Memory,
        Trigger::Shutdown,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::DecisionWait => "decision_wait",
            Trigger::AfterRoot => "after_root",
            Trigger::Whole => "whole",
            Trigger::Size => "size",
            Trigger::Cap => "cap",
            Trigger::Memory => "memory",
            Trigger::Shutdown => "shutdown",
        }
    }

    /// Decided before the trace's wait ended, on what it had.
    pub fn is_early(&self) -> bool {
        matches!(
            self,
            Trigger::Size | Trigger::Cap | Trigger::Memory | Trigger::Shutdown
        )
    }
}

/// Counts for one top-level policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounts {
    pub kept_traces: u64,
    pub kept_spans: u64,
    /// Traces vetoed by this (drop) policy.
    pub dropped_traces: u64,
    pub dropped_spans: u64,
}

/// Cumulative counts since start; the same numbers go to `metrics` on every tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TailSamplingStats {
    pub traces_kept: u64,
    pub spans_kept: u64,
    pub traces_dropped: u64,
    pub spans_dropped: u64,
    /// Dropped because no policy kept them (not vetoed).
    pub traces_not_kept: u64,
    pub spans_not_kept: u64,
    /// Per policy id (see [`TailSampling::policy_stats`]).
    pub per_policy: Vec<PolicyCounts>,
    /// Decisions per [`Trigger`], indexed by its value.
    pub decided_by: [u64; 7],
    pub late_spans_kept: u64,
    pub late_spans_dropped: u64,
    pub annotate_failed: u64,
    /// Spans of undecided traces read back from the log at start (`storage: file`).
    pub restored_spans: u64,
    /// Decisions read back from the log at start.
    pub restored_decisions: u64,
    /// Kept spans read back from the log that downstream had not taken: sent again.
    pub restored_kept_spans: u64,
    pub storage_errors: u64,
    /// Held spans whose bytes did not parse again when their trace was decided (none should:
    /// they parsed when they arrived); they are lost, and logged.
    pub unpack_failed: u64,
}

impl TailSamplingStats {
    pub fn decided(&self, t: Trigger) -> u64 {
        self.decided_by[t as usize]
    }
}

/// The name of a top-level policy and the set it belongs to.
#[derive(Clone, Debug)]
struct PolicyName {
    name: String,
    tenant: String,
}

#[derive(Debug)]
struct Trace {
    spans: Packed,
    summary: Summary,
    first: Instant,
    /// When its latest span came, as nanoseconds after `first` (half an `Instant`: the table
    /// holds one of these per waiting trace).
    last_ns: u64,
    root: bool,
    /// Heap bytes of its spans (`Packed::heap_bytes`).
    bytes: usize,
    /// Arrival order, to tell a live entry of `arrivals`/`timers` from a stale one.
    seq: u64,
    /// The deadline of the trace's current `timers` entry, as nanoseconds after `first`.
    scheduled_ns: u64,
}

impl Trace {
    fn since_first(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.first).as_nanos() as u64
    }
    fn last(&self) -> Instant {
        self.first + Duration::from_nanos(self.last_ns)
    }
    fn scheduled(&self) -> Instant {
        self.first + Duration::from_nanos(self.scheduled_ns)
    }
    fn set_scheduled(&mut self, d: Instant) {
        self.scheduled_ns = self.since_first(d);
    }
}

type TimerEntry = Reverse<(Instant, u64, TraceId)>;

/// A slot of the trace table: the entry and its control byte.
const SLOT_SIZE: usize = std::mem::size_of::<(TraceId, Trace)>() + 1;
/// What one held trace costs beyond its spans, at the tables' fullest load: what the memory cap
/// charges per trace.
const PER_TRACE: usize = SLOT_SIZE
    + SLOT_SIZE / 7
    + std::mem::size_of::<TimerEntry>()
    + std::mem::size_of::<(u64, TraceId)>();
/// Distinct resource + scope pairs shared by waiting traces (see `packed::Scopes`); past this
/// a trace keeps its own copy of a new one.
const MAX_SHARED_SCOPES: usize = 65_536;

/// Most decision-latency samples kept between two ticks (the rest are not recorded).
const MAX_LATENCY_SAMPLES: usize = 8192;

/// The state machine. See the module docs.
pub struct TailSampling {
    id: String,
    pipeline: String,
    decision_wait: Duration,
    after_root: Option<Duration>,
    num_traces: usize,
    max_bytes: usize,
    max_spans_per_trace: usize,
    max_trace_bytes: usize,
    on_full: OnFull,
    sets: Vec<PolicySet>,
    tenant_key: Option<String>,
    tenants: HashMap<String, usize>,
    names: Vec<PolicyName>,

    traces: HashMap<TraceId, Trace>,
    timers: BinaryHeap<TimerEntry>,
    arrivals: VecDeque<(u64, TraceId)>,
    next_seq: u64,
    cache: DecisionCache,
    /// Bytes of buffered spans (the sum of `Trace::bytes`); see `bytes_held` for the total.
    span_bytes: usize,
    spans_held: usize,

    stats: TailSamplingStats,
    flushed: TailSamplingStats,
    latencies: Vec<f64>,
    out_kept: Vec<Span>,
    out_late: Vec<Span>,
    scratch: Vec<TraceId>,
    /// Per-batch scratch of `process_whole`: each trace's run of spans and what became of it.
    runs: Vec<(u32, u32, Fate)>,
    seen: hashbrown::HashSet<TraceId>,
    storage: Option<Storage>,
    /// Deciding needs the spans themselves (a policy reads attributes or trace state, or the
    /// tenant comes from a resource), not only the trace's summary.
    votes_on_spans: bool,
    /// With `storage`: emitted batches of kept spans downstream has not taken yet.
    inflight: Vec<Inflight>,
    /// Kept spans read back from the log that downstream never took: sent again first.
    replay_out: Vec<Span>,
    scopes: Scopes,
}

/// A batch of kept spans on its way downstream (`storage: file`): its spans stay in the log (and
/// in a compaction) until `wait` resolves, then `delivered` records name its traces.
struct Inflight {
    wait: tailweave_core::AckWait,
    keys: Vec<u64>,
    spans: Vec<Span>,
}

/// Logs `delivered` for the batches of `inflight` downstream has taken, and forgets them.
fn note_taken(inflight: &mut Vec<Inflight>, st: &mut Storage) {
    inflight.retain_mut(|f| match f.wait.try_take() {
        None => true,
        // Taken, or refused downstream (counted there): either way not sent again.
        Some(_) => {
            for k in &f.keys {
                st.delivered(*k);
            }
            false
        }
    });
}

/// How long a stopping sampler waits, in the background, for downstream to take its last kept
/// batches before the log says so; a process gone sooner sends them again after its restart.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(10);

/// What `process_whole` did with one trace's run of spans.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Buffered and decided by the general path.
    General,
    Kept(u32, f64),
    Dropped,
    /// Decided before: the spans follow that decision.
    Late(Cached),
}

impl TailSamplingConfig {
    pub fn build(&self, ctx: &BuildContext) -> Result<TailSampling, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let msg = issues
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ComponentError::build(&ctx.id, msg));
        }
        TailSampling::open(self, &ctx.id, &ctx.pipeline, Instant::now()).map_err(|e| {
            let dir = self
                .directory
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            ComponentError::build(&ctx.id, format!("storage in {}: {e}", dir.display()))
        })
    }
}

impl TailSampling {
    /// Builds the state machine from a config that passed `validate`.
    pub fn new(cfg: &TailSamplingConfig, id: &str, pipeline: &str) -> Self {
        let mut names: Vec<PolicyName> = Vec::new();
        let mut compile = |policies: &[PolicyConfig], tenant: &str| {
            PolicySet::compile(policies, cfg.sample_on_first_match, |name| {
                names.push(PolicyName {
                    name: name.to_string(),
                    tenant: tenant.to_string(),
                });
                (names.len() - 1) as u32
            })
        };
        let mut sets = vec![compile(&cfg.policies, "default")];
        let mut tenants = HashMap::new();
        for (tenant, t) in &cfg.tenants {
            tenants.insert(tenant.clone(), sets.len());
            sets.push(compile(&t.policies, tenant));
        }
        let expected = (cfg.expected_new_traces_per_sec as f64 * cfg.decision_wait.as_secs_f64())
            .min(cfg.num_traces as f64) as usize;
        let votes_on_spans = cfg.tenant_key.is_some() || sets.iter().any(|s| s.reads_spans);
        let stats = TailSamplingStats {
            per_policy: vec![PolicyCounts::default(); names.len()],
            ..Default::default()
        };
        TailSampling {
            id: id.to_string(),
            pipeline: pipeline.to_string(),
            decision_wait: cfg.decision_wait,
            after_root: (!cfg.decision_wait_after_root.is_zero())
                .then_some(cfg.decision_wait_after_root),
            num_traces: cfg.num_traces,
            max_bytes: (cfg.max_memory_mib as usize).saturating_mul(1 << 20),
            max_spans_per_trace: cfg.max_spans_per_trace,
            max_trace_bytes: cfg.max_trace_bytes,
            on_full: cfg.effective_on_full(),
            sets,
            tenant_key: cfg.tenant_key.clone(),
            tenants,
            traces: HashMap::with_capacity(expected),
            timers: BinaryHeap::new(),
            arrivals: VecDeque::new(),
            next_seq: 0,
            cache: DecisionCache::new(
                cfg.decision_cache.sampled_cache_size,
                cfg.decision_cache.non_sampled_cache_size,
            ),
            span_bytes: 0,
            spans_held: 0,
            flushed: stats.clone(),
            stats,
            names,
            latencies: Vec::new(),
            out_kept: Vec::new(),
            out_late: Vec::new(),
            scratch: Vec::new(),
            runs: Vec::new(),
            seen: hashbrown::HashSet::new(),
            storage: None,
            votes_on_spans,
            inflight: Vec::new(),
            replay_out: Vec::new(),
            scopes: Scopes::new(MAX_SHARED_SCOPES),
        }
    }

    /// Builds the state machine and, with `storage: file`, replays its log: decisions go back
    /// into the cache and the spans of traces that were not decided are buffered again (their
    /// wait starts at `now`).
    pub fn open(
        cfg: &TailSamplingConfig,
        id: &str,
        pipeline: &str,
        now: Instant,
    ) -> std::io::Result<Self> {
        let mut ts = TailSampling::new(cfg, id, pipeline);
        let (StorageKind::File, Some(dir)) = (cfg.storage, cfg.directory.as_deref()) else {
            return Ok(ts);
        };
        let name: String = format!("{pipeline}_{id}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let (mut st, replayed) = Storage::open(dir, &name)?;
        if replayed.truncated > 0 {
            tracing::warn!(
                processor = id,
                bytes = replayed.truncated,
                "tail_sampling log ended in a torn record; cut it off"
            );
        }
        let mut decided = HashMap::new();
        for d in replayed.decisions {
            let c = match d.kept {
                Some((name, adjusted)) => Cached::Kept {
                    policy: ts.policy_id(&name),
                    adjusted,
                },
                None => Cached::Dropped,
            };
            ts.cache.remember_key(d.key, c);
            decided.insert(d.key, c);
            ts.stats.restored_decisions += 1;
        }
        let delivered: hashbrown::HashSet<u64> = replayed.delivered.into_iter().collect();
        for s in replayed.spans {
            let key = cache::key(&s.trace_id);
            match decided.get(&key) {
                None => {
                    ts.stats.restored_spans += 1;
                    ts.ingest(now, s);
                }
                // Kept before the crash, and downstream may not have had them: again.
                Some(&Cached::Kept { policy, adjusted }) if !delivered.contains(&key) => {
                    let mut s = s;
                    let a = Annotation::new(&ts.names[policy as usize].name, adjusted);
                    if !a.apply(&mut s) {
                        ts.stats.annotate_failed += 1;
                    }
                    ts.stats.restored_kept_spans += 1;
                    ts.replay_out.push(s);
                }
                Some(_) => {}
            }
        }
        tracing::info!(
            processor = id,
            spans = ts.stats.restored_spans,
            decisions = ts.stats.restored_decisions,
            kept_spans_sent_again = ts.stats.restored_kept_spans,
            "tail_sampling state restored"
        );
        compact(
            &mut st,
            &ts.traces,
            &ts.arrivals,
            &ts.cache,
            &ts.names,
            ts.replay_out.iter(),
        )?;
        ts.storage = Some(st);
        Ok(ts)
    }

    /// The id of a policy named in the log; a name the config no longer has gets a new entry
    /// (so late spans of its traces still carry it).
    fn policy_id(&mut self, name: &str) -> u32 {
        if let Some(i) = self.names.iter().position(|n| n.name == name) {
            return i as u32;
        }
        self.names.push(PolicyName {
            name: name.to_string(),
            tenant: "restored".to_string(),
        });
        self.stats.per_policy.push(PolicyCounts::default());
        self.flushed.per_policy.push(PolicyCounts::default());
        (self.names.len() - 1) as u32
    }

    /// Hands the log records to the OS (`sync`: to the disk), compacting when it has grown.
    fn persist(&mut self, sync: bool) {
        let Some(st) = &mut self.storage else {
            return;
        };
        let mut r = if sync { st.sync() } else { st.flush() };
        if r.is_ok() && sync && st.wants_compaction() {
            let unsent = self.inflight.iter().flat_map(|f| f.spans.iter());
            r = compact(
                st,
                &self.traces,
                &self.arrivals,
                &self.cache,
                &self.names,
                unsent.chain(self.replay_out.iter()),
            );
        }
        if let Err(e) = r {
            self.stats.storage_errors += 1;
            if self.stats.storage_errors == 1 {
                tracing::warn!(processor = %self.id, error = %e, "tail_sampling log write failed");
            }
        }
    }

    pub fn stats(&self) -> &TailSamplingStats {
        &self.stats
    }

    /// Counts of the top-level policy `name` (of the default set, or of `tenant`'s).
    pub fn policy_stats(&self, tenant: Option<&str>, name: &str) -> Option<&PolicyCounts> {
        let tenant = tenant.unwrap_or("default");
        let i = self
            .names
            .iter()
            .position(|n| n.name == name && n.tenant == tenant)?;
        self.stats.per_policy.get(i)
    }

    /// Undecided traces held.
    pub fn traces_held(&self) -> usize {
        self.traces.len()
    }

    /// Spans of undecided traces held.
    pub fn spans_held(&self) -> usize {
        self.spans_held
    }

    /// Bytes held for undecided traces: buffered spans plus the trace table, the timers and the
    /// arrival queue at their allocated capacity (what they occupy, not what they use).
    pub fn bytes_held(&self) -> usize {
        // hashbrown keeps at least one eighth of its buckets free.
        let slots = self.traces.capacity() + self.traces.capacity() / 7;
        self.span_bytes
            + self.scopes.heap_bytes()
            + slots * SLOT_SIZE
            + self.timers.capacity() * std::mem::size_of::<TimerEntry>()
            + self.arrivals.capacity() * std::mem::size_of::<(u64, TraceId)>()
    }

    /// Bytes of buffered spans alone (each trace's packed spans and the scopes only it holds).
    pub fn buffered_bytes(&self) -> usize {
        self.span_bytes
    }

    /// Decisions remembered for late spans: (kept, dropped).
    pub fn cached_decisions(&self) -> (usize, usize) {
        self.cache.len()
    }

    /// What the memory cap counts: the spans and the bookkeeping of the traces held. The
    /// tables' spare capacity is left out (it is bounded by `num_traces`, and counting it would
    /// let an empty but once-large table stop intake or force early decisions).
    fn charged_bytes(&self) -> usize {
        self.span_bytes + self.scopes.heap_bytes() + self.traces.len() * PER_TRACE
    }

    fn is_full(&self) -> bool {
        self.traces.len() >= self.num_traces || self.charged_bytes() >= self.max_bytes
    }

    fn ingest(&mut self, now: Instant, span: Span) {
        let id = span.trace_id;
        if let Some(t) = self.traces.get_mut(&id) {
            if let Some(st) = &mut self.storage {
                st.span(&span);
            }
            let before = t.bytes;
            add_span(
                t,
                now,
                span,
                self.after_root,
                &mut self.timers,
                &mut self.scopes,
            );
            self.span_bytes += t.bytes - before;
            self.spans_held += 1;
            if t.spans.len() >= self.max_spans_per_trace || t.bytes >= self.max_trace_bytes {
                self.decide(now, &id, Trigger::Size);
            }
        } else if let Some(c) = self.cache.get(&id) {
            self.late(span, c);
        } else {
            if self.on_full == OnFull::DecideEarly {
                while self.traces.len() >= self.num_traces {
                    if !self.decide_oldest(now, Trigger::Cap) {
                        break;
                    }
                }
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let deadline = now + self.decision_wait;
            let mut t = Trace {
                spans: Packed::default(),
                summary: Summary::default(),
                first: now,
                last_ns: 0,
                root: false,
                bytes: 0,
                seq,
                scheduled_ns: self.decision_wait.as_nanos() as u64,
            };
            self.timers.push(Reverse((deadline, seq, id)));
            self.arrivals.push_back((seq, id));
            if let Some(st) = &mut self.storage {
                st.span(&span);
            }
            add_span(
                &mut t,
                now,
                span,
                self.after_root,
                &mut self.timers,
                &mut self.scopes,
            );
            self.span_bytes += t.bytes;
            self.spans_held += 1;
            let size_reached =
                t.spans.len() >= self.max_spans_per_trace || t.bytes >= self.max_trace_bytes;
            self.traces.insert(id, t);
            if size_reached {
                self.decide(now, &id, Trigger::Size);
            }
        }
        if self.on_full == OnFull::DecideEarly {
            while self.charged_bytes() > self.max_bytes {
                if !self.decide_oldest(now, Trigger::Memory) {
                    break;
                }
            }
        }
    }

    /// A span of a trace decided earlier: it follows that decision.
    fn late(&mut self, mut span: Span, c: Cached) {
        match c {
            Cached::Kept { policy, adjusted } => {
                let a = Annotation::new(&self.names[policy as usize].name, adjusted);
                if !a.apply(&mut span) {
                    self.stats.annotate_failed += 1;
                }
                self.stats.late_spans_kept += 1;
                self.out_late.push(span);
            }
            Cached::Dropped => self.stats.late_spans_dropped += 1,
        }
    }

    /// Decides the trace that arrived first among those still undecided.
    fn decide_oldest(&mut self, now: Instant, why: Trigger) -> bool {
        while let Some((seq, id)) = self.arrivals.pop_front() {
            if self.traces.get(&id).is_some_and(|t| t.seq == seq) {
                self.decide(now, &id, why);
                return true;
            }
        }
        false
    }

    fn tenant_set(&self, spans: &[Span]) -> usize {
        let Some(key) = &self.tenant_key else {
            return 0;
        };
        spans
            .iter()
            .find_map(|s| s.resource().attr(key).and_then(|v| v.as_str()))
            .and_then(|v| self.tenants.get(v).copied())
            .unwrap_or(0)
    }

    fn decide(&mut self, now: Instant, id: &TraceId, why: Trigger) {
        let Some(t) = self.traces.remove(id) else {
            return;
        };
        self.span_bytes -= t.bytes;
        let count = t.spans.len();
        self.spans_held -= count;
        // The spans are parsed again only when a policy (or the tenant lookup) reads them, or
        // when the trace is kept: most traces are dropped on their summary alone.
        let unpack = |me: &mut Self, p: Packed| {
            let (spans, failed) = p.into_spans();
            if failed > 0 {
                me.stats.unpack_failed += failed as u64;
                tracing::error!(processor = %me.id, trace = %id, spans = failed, "held spans no longer parse; lost");
            }
            spans
        };
        if self.votes_on_spans {
            let spans = unpack(self, t.spans);
            if let Some((policy, adjusted)) = self.judge(now, id, &spans, t.summary, t.first, why) {
                self.keep(policy, adjusted, spans);
            }
        } else if let Some((policy, adjusted)) = self.judge(now, id, &[], t.summary, t.first, why) {
            let spans = unpack(self, t.spans);
            self.keep(policy, adjusted, spans);
        }
    }

    /// Annotates the spans of a kept trace and queues them for output.
    fn keep(&mut self, policy: u32, adjusted: f64, spans: impl IntoIterator<Item = Span>) {
        let a = Annotation::new(&self.names[policy as usize].name, adjusted);
        for mut s in spans {
            if !a.apply(&mut s) {
                self.stats.annotate_failed += 1;
            }
            self.out_kept.push(s);
        }
    }

    /// Votes on a trace that is no longer (or never was) held, counts the outcome and remembers
    /// it; the policy and adjusted count when it is kept.
    fn judge(
        &mut self,
        now: Instant,
        id: &TraceId,
        spans: &[Span],
        summary: Summary,
        first: Instant,
        why: Trigger,
    ) -> Option<(u32, f64)> {
        let count = summary.spans as usize;
        let set = self.tenant_set(spans);
        let view = TraceView {
            trace_id: *id,
            spans,
            count,
            summary,
        };
        let outcome = self.sets[set].decide(&view, &Ctx { now });
        let n = count as u64;
        self.stats.decided_by[why as usize] += 1;
        if self.latencies.len() < MAX_LATENCY_SAMPLES {
            self.latencies
                .push(now.saturating_duration_since(first).as_secs_f64());
        }
        match outcome {
            Outcome::Kept { policy, adjusted } => {
                self.stats.traces_kept += 1;
                self.stats.spans_kept += n;
                let pc = &mut self.stats.per_policy[policy as usize];
                pc.kept_traces += 1;
                pc.kept_spans += n;
                self.cache.remember(id, Cached::Kept { policy, adjusted });
                if let Some(st) = &mut self.storage {
                    st.decision(
                        cache::key(id),
                        Some((&self.names[policy as usize].name, adjusted)),
                    );
                }
                Some((policy, adjusted))
            }
            Outcome::Dropped { policy } => {
                self.stats.traces_dropped += 1;
                self.stats.spans_dropped += n;
                match policy {
                    Some(p) => {
                        let pc = &mut self.stats.per_policy[p as usize];
                        pc.dropped_traces += 1;
                        pc.dropped_spans += n;
                    }
                    None => {
                        self.stats.traces_not_kept += 1;
                        self.stats.spans_not_kept += n;
                    }
                }
                self.cache.remember(id, Cached::Dropped);
                if let Some(st) = &mut self.storage {
                    st.decision(cache::key(id), None);
                }
                None
            }
        }
    }

    /// A batch of whole traces (the join's units): each trace that is neither held nor decided
    /// already is decided on the spot, without entering the trace table, the timers or the
    /// arrival queue (that bookkeeping was most of the sampler's cost on the join's output).
    /// The rest, and any batch where a trace's spans are not in one run, take the general path.
    fn process_whole(&mut self, now: Instant, spans: Vec<Span>) {
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        let mut seen = std::mem::take(&mut self.seen);
        seen.clear();
        let mut a = 0;
        let mut contiguous = true;
        while a < spans.len() {
            let id = spans[a].trace_id;
            let b = a + spans[a..].iter().take_while(|s| s.trace_id == id).count();
            contiguous &= seen.insert(id);
            runs.push((a as u32, b as u32, Fate::General));
            a = b;
        }
        if !contiguous || self.storage.is_some() {
            self.process_general(now, spans, true);
        } else {
            for r in runs.iter_mut() {
                let run = &spans[r.0 as usize..r.1 as usize];
                let id = run[0].trace_id;
                let bytes: usize = run.iter().map(Span::held_bytes).sum();
                if self.traces.contains_key(&id)
                    || run.len() >= self.max_spans_per_trace
                    || bytes >= self.max_trace_bytes
                {
                    continue;
                }
                if let Some(c) = self.cache.get(&id) {
                    r.2 = Fate::Late(c);
                    continue;
                }
                let mut summary = Summary::default();
                for s in run {
                    summary.add(s);
                }
                r.2 = match self.judge(now, &id, run, summary, now, Trigger::Whole) {
                    Some((policy, adjusted)) => Fate::Kept(policy, adjusted),
                    None => Fate::Dropped,
                };
            }
            let mut it = spans.into_iter();
            for &(a, b, what) in runs.iter() {
                let run = it.by_ref().take((b - a) as usize);
                match what {
                    Fate::Kept(policy, adjusted) => self.keep(policy, adjusted, run),
                    // `run` borrows the one iterator over the batch: it must be used up.
                    Fate::Dropped => run.for_each(drop),
                    Fate::Late(c) => run.for_each(|s| self.late(s, c)),
                    Fate::General => {
                        let mut id = None;
                        for s in run {
                            id = Some(s.trace_id);
                            self.ingest(now, s);
                        }
                        if let Some(id) = id {
                            self.decide(now, &id, Trigger::Whole);
                        }
                    }
                }
            }
        }
        self.runs = runs;
        self.seen = seen;
    }

    /// Buffers every span; with `whole`, then decides each trace the batch touched.
    fn process_general(&mut self, now: Instant, spans: Vec<Span>, whole: bool) {
        if whole {
            let mut touched = std::mem::take(&mut self.scratch);
            for s in spans {
                if touched.last() != Some(&s.trace_id) {
                    touched.push(s.trace_id);
                }
                self.ingest(now, s);
            }
            for id in touched.drain(..) {
                self.decide(now, &id, Trigger::Whole);
            }
            self.scratch = touched;
        } else {
            for s in spans {
                self.ingest(now, s);
            }
        }
    }

    /// Runs every deadline that is due.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((d, seq, id))) = self.timers.peek().copied() {
            if d > now {
                break;
            }
            self.timers.pop();
            let Some(t) = self.traces.get_mut(&id) else {
                continue;
            };
            if t.seq != seq || t.scheduled() != d {
                continue;
            }
            let wait_end = t.first + self.decision_wait;
            let root_end = match (t.root, self.after_root) {
                (true, Some(w)) => Some(t.last() + w),
                _ => None,
            };
            let due = root_end.map_or(wait_end, |r| r.min(wait_end));
            if due <= now {
                let why = if root_end.is_some_and(|r| r < wait_end) {
                    Trigger::AfterRoot
                } else {
                    Trigger::DecisionWait
                };
                self.decide(now, &id, why);
            } else {
                t.set_scheduled(due);
                self.timers.push(Reverse((due, seq, id)));
            }
        }
        self.compact();
    }

    /// Drops stale bookkeeping entries once they outnumber the live traces.
    fn compact(&mut self) {
        let live = self.traces.len();
        if self.arrivals.len() > 2 * live + 1024 {
            let traces = &self.traces;
            self.arrivals
                .retain(|(seq, id)| traces.get(id).is_some_and(|t| t.seq == *seq));
            self.arrivals.shrink_to(2 * live + 1024);
        }
        if self.timers.len() > 3 * live + 1024 {
            let traces = &self.traces;
            self.timers.retain(|Reverse((d, seq, id))| {
                traces
                    .get(id)
                    .is_some_and(|t| t.seq == *seq && t.scheduled() == *d)
            });
            self.timers.shrink_to(3 * live + 1024);
        }
    }

    /// Hands kept spans on, stamped with the decision time so exporters can measure
    /// decision-to-export latency.
    /// With `storage`, each batch carries a fresh ack and stays in `inflight` (and its spans in
    /// the log) until downstream took it.
    fn emit(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        for spans in [
            std::mem::take(&mut self.replay_out),
            std::mem::take(&mut self.out_kept),
            std::mem::take(&mut self.out_late),
        ] {
            if spans.is_empty() {
                continue;
            }
            let mut b = SpanBatch::new(spans);
            b.decided_at = Some(now);
            if self.storage.is_some() {
                let (ack, wait) = tailweave_core::Ack::new();
                let mut keys: Vec<u64> = b.spans.iter().map(|s| cache::key(&s.trace_id)).collect();
                keys.sort_unstable();
                keys.dedup();
                self.inflight.push(Inflight {
                    wait,
                    keys,
                    spans: b.spans.clone(),
                });
                b.acks.push(ack);
            }
            out.push(b);
        }
    }

    /// Logs `delivered` for the emitted batches downstream has taken since the last look.
    fn settle_inflight(&mut self) {
        if let Some(st) = &mut self.storage {
            note_taken(&mut self.inflight, st);
        }
    }

    /// Hands the counts since the last flush to `metrics`.
    fn flush_metrics(&mut self) {
        let (id, pipeline) = (self.id.clone(), self.pipeline.clone());
        let s = &self.stats;
        let f = &self.flushed;
        for (i, (now, was)) in s.per_policy.iter().zip(&f.per_policy).enumerate() {
            let n = &self.names[i];
            let labels = |decision: &'static str| {
                [
                    ("processor", id.clone()),
                    ("pipeline", pipeline.clone()),
                    ("decision", decision.to_string()),
                    ("policy", n.name.clone()),
                    ("tenant", n.tenant.clone()),
                ]
            };
            if now.kept_traces > was.kept_traces {
                metrics::counter!(METRIC_TRACES, &labels("kept"))
                    .increment(now.kept_traces - was.kept_traces);
                metrics::counter!(METRIC_SPANS, &labels("kept"))
                    .increment(now.kept_spans - was.kept_spans);
            }
            if now.dropped_traces > was.dropped_traces {
                metrics::counter!(METRIC_TRACES, &labels("dropped"))
                    .increment(now.dropped_traces - was.dropped_traces);
                metrics::counter!(METRIC_SPANS, &labels("dropped"))
                    .increment(now.dropped_spans - was.dropped_spans);
            }
        }
        if s.traces_not_kept > f.traces_not_kept {
            let labels = [
                ("processor", id.clone()),
                ("pipeline", pipeline.clone()),
                ("decision", "dropped".to_string()),
                ("policy", "none".to_string()),
            ];
            metrics::counter!(METRIC_TRACES, &labels)
                .increment(s.traces_not_kept - f.traces_not_kept);
            metrics::counter!(METRIC_SPANS, &labels).increment(s.spans_not_kept - f.spans_not_kept);
        }
        let dropped_spans = s.spans_dropped + s.late_spans_dropped;
        let was_dropped = f.spans_dropped + f.late_spans_dropped;
        if dropped_spans > was_dropped {
            metrics::counter!(
                tailweave_core::names::PROCESSOR_DROPPED_SPANS,
                "processor" => id.clone(), "pipeline" => pipeline.clone(), "reason" => "sampled_out"
            )
            .increment(dropped_spans - was_dropped);
        }
        for t in Trigger::ALL {
            let d = s.decided(t) - f.decided(t);
            if d == 0 {
                continue;
            }
            metrics::counter!(METRIC_DECISIONS, "processor" => id.clone(), "pipeline" => pipeline.clone(), "trigger" => t.as_str())
                .increment(d);
            if t.is_early() {
                metrics::counter!(METRIC_EARLY_DECISIONS, "processor" => id.clone(), "pipeline" => pipeline.clone(), "cause" => t.as_str())
                    .increment(d);
            }
        }
        if s.late_spans_kept > f.late_spans_kept {
            metrics::counter!(METRIC_LATE_SPANS, "processor" => id.clone(), "pipeline" => pipeline.clone(), "outcome" => "kept")
                .increment(s.late_spans_kept - f.late_spans_kept);
        }
        if s.late_spans_dropped > f.late_spans_dropped {
            metrics::counter!(METRIC_LATE_SPANS, "processor" => id.clone(), "pipeline" => pipeline.clone(), "outcome" => "dropped")
                .increment(s.late_spans_dropped - f.late_spans_dropped);
        }
        if s.storage_errors > f.storage_errors {
            metrics::counter!(METRIC_STORAGE_ERRORS, "processor" => id.clone(), "pipeline" => pipeline.clone())
                .increment(s.storage_errors - f.storage_errors);
        }
        if s.annotate_failed > f.annotate_failed {
            metrics::counter!(METRIC_ANNOTATE_FAILED, "processor" => id.clone(), "pipeline" => pipeline.clone())
                .increment(s.annotate_failed - f.annotate_failed);
        }
        metrics::gauge!(METRIC_TRACES_IN_MEMORY, "processor" => id.clone(), "pipeline" => pipeline.clone())
            .set(self.traces.len() as f64);
        metrics::gauge!(METRIC_SPANS_IN_MEMORY, "processor" => id.clone(), "pipeline" => pipeline.clone())
            .set(self.spans_held as f64);
        metrics::gauge!(METRIC_BYTES_HELD, "processor" => id.clone(), "pipeline" => pipeline.clone())
            .set(self.bytes_held() as f64);
        let h =
            metrics::histogram!(METRIC_DECISION_LATENCY, "processor" => id, "pipeline" => pipeline);
        for l in self.latencies.drain(..) {
            h.record(l);
        }
        self.flushed = self.stats.clone();
    }
}

/// Rewrites the log from the live state: remembered decisions, then the spans of undecided
/// traces in arrival order, then `unsent` (kept spans downstream has not taken yet).
fn compact<'a>(
    st: &mut Storage,
    traces: &'a HashMap<TraceId, Trace>,
    arrivals: &VecDeque<(u64, TraceId)>,
    cache: &DecisionCache,
    names: &[PolicyName],
    unsent: impl Iterator<Item = &'a Span>,
) -> std::io::Result<()> {
    let spans = arrivals
        .iter()
        .filter_map(|(seq, id)| traces.get(id).filter(|t| t.seq == *seq))
        .flat_map(|t| t.spans.entries())
        .chain(unsent.map(|s| packed::Entry {
            scope: &s.scope,
            source: s.source,
            marks: s.marks,
            raw: &s.raw,
        }));
    let decisions = cache
        .iter()
        .map(|(k, c)| (k, storage::logged(c, |p| names[p as usize].name.as_str())));
    st.compact(spans, decisions)
}

/// Appends a span to its trace, keeping the summary, the byte count and the root deadline.
fn add_span(
    t: &mut Trace,
    now: Instant,
    span: Span,
    after_root: Option<Duration>,
    timers: &mut BinaryHeap<TimerEntry>,
    scopes: &mut Scopes,
) {
    t.summary.add(&span);
    t.last_ns = t.since_first(now);
    if span.is_root() && !t.root {
        t.root = true;
        if let Some(w) = after_root {
            let d = now + w;
            if d < t.scheduled() {
                t.set_scheduled(d);
                timers.push(Reverse((d, t.seq, span.trace_id)));
            }
        }
    }
    let (scope, own) = scopes.canon(&span.scope);
    t.spans.push(span, scope, own);
    t.bytes = t.spans.heap_bytes();
}

/// The two sampling attributes of a kept trace, encoded once per decision as `Span.attributes`
/// (field 9) entries.
struct Annotation<'a> {
    policy: &'a str,
    adjusted: f64,
    encoded: Vec<u8>,
}

impl<'a> Annotation<'a> {
    fn new(policy: &'a str, adjusted: f64) -> Self {
        let mut any = Vec::with_capacity(policy.len() + 4);
        put_len_field(&mut any, 1, policy.as_bytes()); // AnyValue.string_value
        let mut kv = Vec::with_capacity(any.len() + ATTR_POLICY.len() + 4);
        put_len_field(&mut kv, 1, ATTR_POLICY.as_bytes());
        put_len_field(&mut kv, 2, &any);
        let mut encoded = Vec::with_capacity(kv.len() + 48);
        put_len_field(&mut encoded, 9, &kv);
        let mut any = Vec::with_capacity(9);
        any.put_u8((4 << 3) | 1); // AnyValue.double_value, fixed64
        any.put_f64_le(adjusted);
        let mut kv = Vec::with_capacity(any.len() + ATTR_ADJUSTED_COUNT.len() + 4);
        put_len_field(&mut kv, 1, ATTR_ADJUSTED_COUNT.as_bytes());
        put_len_field(&mut kv, 2, &any);
        put_len_field(&mut encoded, 9, &kv);
        Annotation {
            policy,
            adjusted,
            encoded,
        }
    }

    /// Writes the attributes on `span`. Protobuf merges repeated fields wherever they appear,
    /// so when the span carries neither attribute yet (the usual case) they are appended to its
    /// bytes: one copy, no decode. A span that an upstream sampler already marked goes through
    /// `Span::edit` so that the old values are replaced, not duplicated.
    fn apply(&self, span: &mut Span) -> bool {
        let marked = span
            .raw_attrs()
            .any(|(k, _)| k == ATTR_POLICY.as_bytes() || k == ATTR_ADJUSTED_COUNT.as_bytes());
        if !marked {
            let mut b = BytesMut::with_capacity(span.raw.len() + self.encoded.len());
            b.extend_from_slice(&span.raw);
            b.extend_from_slice(&self.encoded);
            span.raw = b.freeze();
            return true;
        }
        span.edit(|p| {
            p.attributes
                .retain(|kv| kv.key != ATTR_POLICY && kv.key != ATTR_ADJUSTED_COUNT);
            p.attributes.push(KeyValue {
                key: ATTR_POLICY.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(self.policy.to_string())),
                }),
                ..Default::default()
            });
            p.attributes.push(KeyValue {
                key: ATTR_ADJUSTED_COUNT.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::DoubleValue(self.adjusted)),
                }),
                ..Default::default()
            });
        })
        .is_ok()
    }
}

impl Processor for TailSampling {
    fn process(&mut self, now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        let SpanBatch {
            spans, acks, whole, ..
        } = batch;
        let first_out = out.len();
        if whole {
            self.process_whole(now, spans);
        } else {
            self.process_general(now, spans, false);
        }
        self.persist(false);
        self.scopes.end_batch();
        // Whatever became of the spans (held, dropped by policy, or sent on), this stage took
        // them: in memory at once, with `storage: file` once `persist` handed the log records to
        // the OS. Spans sent on in this call (a late span of a kept trace is not logged) take
        // the acks with them, so the client waits for the next stage. A failed log write does
        // not fail the acks: the sampler goes on in memory (counted in `storage_errors`) rather
        // than refusing every request while the disk is full.
        self.emit(now, out);
        if let Some((last, rest)) = out[first_out..].split_last_mut() {
            for b in rest {
                b.acks.extend(acks.iter().cloned());
            }
            last.acks.extend(acks);
        }
    }

    fn holds_spans(&self) -> bool {
        true
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        self.settle_inflight();
        self.expire(now);
        self.scopes.purge();
        self.persist(true);
        self.emit(now, out);
        self.flush_metrics();
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }

    fn accepting(&self) -> bool {
        self.on_full == OnFull::DecideEarly || !self.is_full()
    }

    fn shutdown(&mut self, now: Instant, out: &mut Vec<SpanBatch>) {
        while self.decide_oldest(now, Trigger::Shutdown) {}
        self.settle_inflight();
        self.emit(now, out);
        self.persist(true);
        if let Some(st) = &mut self.storage {
            // Decisions, and the kept spans still on their way: the next start needs them.
            let unsent = self.inflight.iter().flat_map(|f| f.spans.iter());
            if let Err(e) = compact(
                st,
                &self.traces,
                &self.arrivals,
                &self.cache,
                &self.names,
                unsent,
            ) {
                self.stats.storage_errors += 1;
                tracing::warn!(processor = %self.id, error = %e, "tail_sampling log compaction failed");
            }
        }
        self.flush_metrics();
        // Downstream drains after this returns: note in the background what it took.
        if let (Some(mut st), false) = (self.storage.take(), self.inflight.is_empty()) {
            let mut inflight = std::mem::take(&mut self.inflight);
            let id = self.id.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + SHUTDOWN_ACK_WAIT;
                while !inflight.is_empty() && Instant::now() < deadline {
                    note_taken(&mut inflight, &mut st);
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Err(e) = st.sync() {
                    tracing::warn!(processor = %id, error = %e, "tail_sampling log write failed");
                }
            });
        }
    }
}
