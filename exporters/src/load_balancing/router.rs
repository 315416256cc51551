//! The routing state machine: which backend each span goes to. Synchronous, time passed in.
//!
//! A span with a trace id goes to the owner of that trace on the ring, or, when the owner is down,
//! to the next backend on the ring that is up. An eBPF span without a trace id (`span.ebpf` with
//! `trace_key == None`: a MySQL call, a request whose headers had no `traceparent`) has no trace to
//! follow, so the router learns, from the eBPF spans that do carry one, which trace each
//! association key (agent + syscall trace id, TCP sequence numbers, X-Request-ID) belongs to, and
//! sends the span where that trace went. A span whose keys are not known yet waits up to
//! `association.wait` for a span that names them; then it is routed by its own key, so the spans
//! sharing that key still meet on one backend, and counted.
//!
//! With affinity on ([`AffinityConfig`]), the router also remembers, for `affinity.ttl` from its
//! first span, the backend each trace went to, and sends the trace's later spans there even when
//! the ring would now choose another one: when its owner went down after its first spans were
//! queued there (they wait in that queue, and so do the later ones), when its owner is back while
//! it is still being sent to the successor, or when the backend set changed. A trace is then never
//! split between two gateways by a switch in the middle of it. Only a forced re-route (a down
//! backend whose queue is full) moves a trace, and its later spans follow it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tailweave_core::config::ConfigIssue;
use tailweave_core::ebpf::EbpfSpan;
use tailweave_core::{Span, TraceId};

use super::ring::{hash, mix, Ring};

/// `association`: placing eBPF spans that carry no trace id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssociationConfig {
    /// Association keys remembered at most. The oldest is forgotten first. Default `100000`.
    pub max_entries: usize,
    /// How long a key is remembered after its trace was first seen with it. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a span without a trace id waits for a span that places it; `0s` routes it by its
    /// own key at once. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// Spans waiting at most; past it the oldest is routed by its key at once. Default `10000`.
    pub max_pending: usize,
}

impl Default for AssociationConfig {
    fn default() -> Self {
        AssociationConfig {
            max_entries: 100_000,
            ttl: Duration::from_secs(30),
            wait: Duration::from_secs(1),
            max_pending: 10_000,
        }
    }
}

impl AssociationConfig {
    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        if self.max_entries == 0 {
            out.push(ConfigIssue::new(
                "association.max_entries",
                "must be greater than 0",
            ));
        }
        if self.ttl.is_zero() {
            out.push(ConfigIssue::new(
                "association.ttl",
                "must be greater than 0",
            ));
        }
        if self.wait > self.ttl {
            out.push(ConfigIssue::new(
                "association.wait",
                "must not be longer than association.ttl",
            ));
        }
        if self.max_pending == 0 {
            out.push(ConfigIssue::new(
                "association.max_pending",
                "must be greater than 0",
            ));
        }
    }
}

/// `affinity`: keeping the later spans of a trace on the backend its first spans went to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffinityConfig {
    /// How long, from its first span, a trace stays on the backend that span went to; `0s` turns
    /// affinity off (every span follows the ring as it is at that moment). Set it to the time a
    /// trace's spans keep arriving: the gateways' join and sampler waits. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Traces remembered at most; past it the oldest is forgotten first (and its later spans go
    /// where the ring says). About 64 bytes each. Default `100000`.
    pub max_traces: usize,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            ttl: Duration::from_secs(30),
            max_traces: 100_000,
        }
    }
}

impl AffinityConfig {
    /// No affinity: each span goes where the ring says at that moment.
    pub fn off() -> Self {
        AffinityConfig {
            ttl: Duration::ZERO,
            ..AffinityConfig::default()
        }
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    pub fn validate(&self, out: &mut Vec<ConfigIssue>) {
        if self.enabled() && self.max_traces == 0 {
            out.push(ConfigIssue::new(
                "affinity.max_traces",
                "must be greater than 0 (or turn affinity off with ttl: 0s)",
            ));
        }
    }
}

/// Counts since the router started (the driver publishes them as metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouterStats {
    /// Spans with a trace id.
    pub by_trace: u64,
    /// Spans without a trace id placed with the trace of one of their keys.
    pub associated: u64,
    /// Spans without a trace id routed by their own key after waiting.
    pub by_key: u64,
    /// Of `by_key`: routed at once because the wait buffer was full.
    pub by_key_overflow: u64,
    /// Spans sent to another backend than the ring's owner of their trace (or key): because the
    /// owner was down, or because their trace went elsewhere while it was (affinity).
    pub rerouted: u64,
    /// Spans that followed their trace's earlier spans to a backend other than the one the ring
    /// chose for them at that moment (owner down since, back since, or the set changed).
    pub affinity: u64,
}

/// Spans per backend, indexed like [`Ring::nodes`].
pub type Routed = Vec<Vec<Span>>;

/// Key → trace, bounded, each entry living `ttl` from when it was learned.
#[derive(Debug, Default)]
struct Index {
    map: HashMap<u64, (TraceId, Instant)>,
    order: VecDeque<(Instant, u64)>,
}

impl Index {
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((t, k)) = self.order.front().copied() {
            if now.saturating_duration_since(t) < ttl {
                break;
            }
            self.order.pop_front();
            self.map.remove(&k);
        }
    }

    /// Learns `key → trace`; `true` if the key is new.
    fn learn(&mut self, now: Instant, key: u64, trace: TraceId, max: usize) -> bool {
        if let Some(e) = self.map.get_mut(&key) {
            // The latest trace wins; the entry keeps its age so the index stays short-lived.
            e.0 = trace;
            return false;
        }
        while self.map.len() >= max {
            match self.order.pop_front() {
                Some((_, k)) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
        self.map.insert(key, (trace, now));
        self.order.push_back((now, key));
        true
    }

    fn get(&self, key: u64) -> Option<TraceId> {
        self.map.get(&key).map(|(t, _)| *t)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Trace → the backend its first span went to, bounded, each entry living `ttl` from then.
#[derive(Debug, Default)]
struct Affinity {
    map: HashMap<TraceId, (usize, Instant)>,
    order: VecDeque<(Instant, TraceId)>,
}

impl Affinity {
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((t, id)) = self.order.front().copied() {
            if now.saturating_duration_since(t) < ttl {
                break;
            }
            self.order.pop_front();
            // Only the entry this order slot was made for (a re-pinned trace keeps its first age).
            if self.map.get(&id).is_some_and(|(_, at)| *at == t) {
                self.map.remove(&id);
            }
        }
    }

    fn get(&self, id: &TraceId) -> Option<usize> {
        self.map.get(id).map(|(b, _)| *b)
    }

    fn pin(&mut self, now: Instant, id: TraceId, backend: usize, max: usize) {
        if let Some(e) = self.map.get_mut(&id) {
            e.0 = backend;
            return;
        }
        while self.map.len() >= max {
            match self.order.pop_front() {
                Some((t, old)) => {
                    if self.map.get(&old).is_some_and(|(_, at)| *at == t) {
                        self.map.remove(&old);
                    }
                }
                None => break,
            }
        }
        self.map.insert(id, (backend, now));
        self.order.push_back((now, id));
    }

    /// The ring changed from `old` to `new` (both sorted names): keep the entries of backends
    /// still there, under their new index; forget the others.
    fn remap(&mut self, old: &[String], new: &[String]) {
        let to: Vec<Option<usize>> = old.iter().map(|n| new.binary_search(n).ok()).collect();
        self.map
            .retain(|_, (b, _)| match to.get(*b).copied().flatten() {
                Some(n) => {
                    *b = n;
                    true
                }
                None => false,
            });
        let map = &self.map;
        self.order
            .retain(|(t, id)| map.get(id).is_some_and(|(_, at)| at == t));
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The association keys of an eBPF span, most specific first, each hashed with its kind.
pub fn association_keys(m: &EbpfSpan) -> Vec<u64> {
    let mut keys = Vec::with_capacity(6);
    for id in [m.syscall_req, m.syscall_resp] {
        if id != 0 {
            let mut b = b"syscall\0".to_vec();
            b.extend_from_slice(m.agent.as_bytes());
            b.push(0);
            b.extend_from_slice(&id.to_be_bytes());
            keys.push(hash(&b));
        }
    }
    for x in m.x_request_id.iter().flatten() {
        let mut b = b"x-request-id\0".to_vec();
        b.extend_from_slice(x.as_bytes());
        keys.push(hash(&b));
    }
    for seq in [m.req_tcp_seq, m.resp_tcp_seq] {
        if seq != 0 {
            let mut b = b"tcp_seq\0".to_vec();
            b.extend_from_slice(&seq.to_be_bytes());
            keys.push(hash(&b));
        }
    }
    keys.dedup();
    keys
}

/// The trace a span belongs to, when it names one.
pub fn trace_of(span: &Span) -> Option<TraceId> {
    match span.ebpf.as_deref() {
        Some(m) => m.trace_key.map(TraceId),
        None => (!span.trace_id.is_zero()).then_some(span.trace_id),
    }
}

/// Rounds of "a placed span teaches its keys" per batch; chains in DeepFlow rows are short.
const MAX_ASSOCIATION_PASSES: usize = 4;

fn trace_hash(t: &TraceId) -> u64 {
    hash(&t.0)
}

/// The routing state: ring, association index, waiting spans.
pub struct Router {
    ring: Ring,
    cfg: AssociationConfig,
    index: Index,
    affinity_cfg: AffinityConfig,
    affinity: Affinity,
    /// Spans without a trace id waiting for one of their keys, oldest first, with their deadline.
    pending: VecDeque<(Instant, Span)>,
    pub stats: RouterStats,
}

impl Router {
    /// A router without affinity (see [`Router::with_affinity`]).
    pub fn new(backends: &[String], cfg: AssociationConfig) -> Router {
        Router {
            ring: Ring::new(backends),
            cfg,
            index: Index::default(),
            affinity_cfg: AffinityConfig::off(),
            affinity: Affinity::default(),
            pending: VecDeque::new(),
            stats: RouterStats::default(),
        }
    }

    /// Keeps each trace on the backend its first span went to, for `cfg.ttl`.
    pub fn with_affinity(mut self, cfg: AffinityConfig) -> Router {
        self.affinity_cfg = cfg;
        self
    }

    pub fn backends(&self) -> &[String] {
        self.ring.nodes()
    }

    /// Replaces the backend set. Only keys whose owner changed move (that is the ring's job);
    /// traces in flight stay where they went while affinity holds them and their backend stays.
    pub fn set_backends(&mut self, backends: &[String]) {
        let ring = Ring::new(backends);
        self.affinity.remap(self.ring.nodes(), ring.nodes());
        self.ring = ring;
    }

    /// Traces affinity remembers.
    pub fn affinity_len(&self) -> usize {
        self.affinity.len()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    fn empty(&self) -> Routed {
        vec![Vec::new(); self.ring.nodes().len()]
    }

    /// Puts a span of trace `t` on its backend. `forced`: the trace's affinity yields to
    /// `is_down` (a re-route of spans a down backend's queue refused) and moves with it.
    fn place_trace(
        &mut self,
        now: Instant,
        t: TraceId,
        span: Span,
        out: &mut Routed,
        is_down: &dyn Fn(usize) -> bool,
        forced: bool,
    ) {
        let Some((owner, choice)) = self.choose(trace_hash(&t), is_down) else {
            return;
        };
        let mut node = choice;
        if self.affinity_cfg.enabled() {
            match self.affinity.get(&t) {
                Some(b) if b < out.len() && !(forced && is_down(b)) => {
                    if b != choice {
                        self.stats.affinity += 1;
                    }
                    node = b;
                }
                _ => self
                    .affinity
                    .pin(now, t, choice, self.affinity_cfg.max_traces),
            }
        }
        if node != owner {
            self.stats.rerouted += 1;
        }
        out[node].push(span);
    }

    /// Puts a span without a trace on the backend of `key`.
    fn place_key(
        &mut self,
        key: u64,
        span: Span,
        out: &mut Routed,
        is_down: &dyn Fn(usize) -> bool,
    ) {
        let Some((owner, node)) = self.choose(mix(key), is_down) else {
            return;
        };
        if node != owner {
            self.stats.rerouted += 1;
        }
        out[node].push(span);
    }

    /// (owner, where the ring sends it now): the owner, or its first successor that is up.
    fn choose(&self, key: u64, is_down: &dyn Fn(usize) -> bool) -> Option<(usize, usize)> {
        let owner = self.ring.owner(key)?;
        let node = if is_down(owner) {
            // Every backend down: the owner's queue retries, as good as any.
            self.ring.owner_where(key, |n| !is_down(n)).unwrap_or(owner)
        } else {
            owner
        };
        Some((owner, node))
    }

    /// Routes one batch. `is_down(i)` says whether backend `i` (of [`Router::backends`]) is down.
    /// Spans waiting for their trace are not in the output; [`Router::tick`] releases them.
    pub fn route(
        &mut self,
        now: Instant,
        spans: Vec<Span>,
        is_down: &dyn Fn(usize) -> bool,
    ) -> Routed {
        let mut out = self.empty();
        if self.ring.is_empty() {
            return out;
        }
        self.index.expire(now, self.cfg.ttl);
        self.affinity.expire(now, self.affinity_cfg.ttl);
        let mut learned = false;
        let mut unplaced = Vec::new();
        // Learn first: a span naming its trace may come after one that needs it in the same batch.
        for span in spans {
            match trace_of(&span) {
                Some(t) => {
                    if let Some(m) = span.ebpf.as_deref() {
                        for k in association_keys(m) {
                            learned |= self.index.learn(now, k, t, self.cfg.max_entries);
                        }
                    }
                    self.stats.by_trace += 1;
                    self.place_trace(now, t, span, &mut out, is_down, false);
                }
                None => unplaced.push(span),
            }
        }
        // Spans placed through a key teach their other keys too (a MySQL `s-p` row shares only
        // a TCP sequence with the `c-p` row that shares the syscall id with the keyed call), so
        // the waiting and the new spans are tried again while placing them teaches something.
        let mut waiting: Vec<(Option<Instant>, Span)> = Vec::new();
        if learned {
            waiting.extend(
                std::mem::take(&mut self.pending)
                    .into_iter()
                    .map(|(d, s)| (Some(d), s)),
            );
        }
        waiting.extend(unplaced.into_iter().map(|s| (None, s)));
        for _ in 0..MAX_ASSOCIATION_PASSES {
            let mut progress = false;
            let mut rest = Vec::with_capacity(waiting.len());
            for (deadline, span) in waiting {
                match self.lookup(&span) {
                    Some(t) => {
                        if let Some(m) = span.ebpf.as_deref() {
                            for k in association_keys(m) {
                                progress |= self.index.learn(now, k, t, self.cfg.max_entries);
                            }
                        }
                        self.stats.associated += 1;
                        self.place_trace(now, t, span, &mut out, is_down, false);
                    }
                    None => rest.push((deadline, span)),
                }
            }
            waiting = rest;
            if !progress {
                break;
            }
        }
        // Spans that waited before keep their place in the queue; new ones join at its end.
        let (old, new): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(d, _)| d.is_some());
        let mut requeue: VecDeque<(Instant, Span)> = old
            .into_iter()
            .filter_map(|(d, s)| d.map(|d| (d, s)))
            .collect();
        requeue.extend(std::mem::take(&mut self.pending));
        self.pending = requeue;
        for (_, span) in new {
            if self.cfg.wait.is_zero() {
                self.by_key(span, &mut out, is_down);
            } else {
                if self.pending.len() >= self.cfg.max_pending {
                    if let Some((_, old)) = self.pending.pop_front() {
                        self.stats.by_key_overflow += 1;
                        self.by_key(old, &mut out, is_down);
                    }
                }
                self.pending.push_back((now + self.cfg.wait, span));
            }
        }
        out
    }

    /// Releases the spans whose wait is over, routed by their own key.
    pub fn tick(&mut self, now: Instant, is_down: &dyn Fn(usize) -> bool) -> Routed {
        let mut out = self.empty();
        self.index.expire(now, self.cfg.ttl);
        if self.ring.is_empty() {
            return out;
        }
        while self.pending.front().is_some_and(|(d, _)| *d <= now) {
            if let Some((_, span)) = self.pending.pop_front() {
                self.by_key(span, &mut out, is_down);
            }
        }
        out
    }

    /// Input has ended: every waiting span goes now.
    pub fn flush(&mut self, is_down: &dyn Fn(usize) -> bool) -> Routed {
        let mut out = self.empty();
        if self.ring.is_empty() {
            return out;
        }
        while let Some((_, span)) = self.pending.pop_front() {
            self.by_key(span, &mut out, is_down);
        }
        out
    }

    /// Re-routes spans already given to backend `down` (whose queue refused them), treating it as
    /// down whatever its health says. Their traces' affinity moves with them.
    pub fn reroute(
        &mut self,
        now: Instant,
        spans: Vec<Span>,
        down: usize,
        is_down: &dyn Fn(usize) -> bool,
    ) -> Routed {
        let forced = |i: usize| i == down || is_down(i);
        let mut out = self.empty();
        for span in spans {
            match trace_of(&span).or_else(|| self.lookup(&span)) {
                Some(t) => self.place_trace(now, t, span, &mut out, &forced, true),
                None => {
                    let k = own_key(&span);
                    self.place_key(k, span, &mut out, &forced);
                }
            }
        }
        out
    }

    fn lookup(&self, span: &Span) -> Option<TraceId> {
        let m = span.ebpf.as_deref()?;
        association_keys(m)
            .into_iter()
            .find_map(|k| self.index.get(k))
    }

    fn by_key(&mut self, span: Span, out: &mut Routed, is_down: &dyn Fn(usize) -> bool) {
        self.stats.by_key += 1;
        let k = own_key(&span);
        self.place_key(k, span, out, is_down);
    }
}

/// The key a span without a trace is routed by: its most specific association key, so spans
/// sharing it still meet; else its flow; else its row.
fn own_key(span: &Span) -> u64 {
    match span.ebpf.as_deref() {
        Some(m) => association_keys(m).first().copied().unwrap_or_else(|| {
            if m.flow_id != 0 {
                hash(&m.flow_id.to_be_bytes())
            } else {
                hash(&span.span_id.0)
            }
        }),
        None => hash(&span.trace_id.0),
    }
}
