//! Compiled policies and how a policy set votes on one whole trace.
//!
//! Votes follow the Collector: each policy says sampled, not sampled, or (for `drop`) dropped.
//! A drop vetoes every keep; otherwise the trace is kept when any policy sampled it. The adjusted
//! count of a kept trace is the smallest among the keeping policies: a trace that an error or
//! latency policy keeps for certain was kept with probability 1, whatever a probabilistic policy
//! said about it as well.

use std::time::{Duration, Instant};

use hashbrown::HashMap;
use regex::Regex;
use tailweave_core::{AttrValue, Resource, Span, StatusCode, TraceId};

use super::config::{parse_status, CompositeCfg, PolicyConfig, PolicyKind, DEFAULT_HASH_SALT};

/// Facts gathered while a trace's spans arrive, so the common policies need no scan.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Summary {
    pub min_start: u64,
    pub max_end: u64,
    /// Bit per effective status (`status_bit`): a timed-out eBPF call counts as ERROR.
    pub status_mask: u8,
    /// Spans added.
    pub spans: u32,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            min_start: u64::MAX,
            max_end: 0,
            status_mask: 0,
            spans: 0,
        }
    }
}

impl Summary {
    #[inline]
    pub fn add(&mut self, s: &Span) {
        self.min_start = self.min_start.min(s.start_ns);
        self.max_end = self.max_end.max(s.end_ns);
        self.status_mask |= status_bit(effective_status(s));
        self.spans = self.spans.saturating_add(1);
    }

    pub fn duration_ms(&self) -> i64 {
        if self.min_start == u64::MAX || self.max_end < self.min_start {
            return 0;
        }
        ((self.max_end - self.min_start) / 1_000_000) as i64
    }
}

fn effective_status(s: &Span) -> StatusCode {
    if s.is_error() {
        StatusCode::Error
    } else {
        s.status
    }
}

fn status_bit(s: StatusCode) -> u8 {
    match s {
        StatusCode::Unset => 1,
        StatusCode::Ok => 2,
        StatusCode::Error => 4,
    }
}

/// One trace as the policies see it.
pub(crate) struct TraceView<'a> {
    pub trace_id: TraceId,
    /// The spans, for the policies that read them ([`PolicySet::reads_spans`]); may be empty
    /// for a set that does not.
    pub spans: &'a [Span],
    /// How many spans the trace has.
    pub count: usize,
    pub summary: Summary,
}

/// A policy's vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Vote {
    Sampled { adjusted: f64 },
    NotSampled,
    Dropped,
}

/// A compiled policy.
pub(crate) enum Eval {
    Always,
    Latency {
        lo_ms: i64,
        hi_ms: i64,
    },
    Numeric {
        key: String,
        min: i64,
        max: i64,
        invert: bool,
    },
    Probabilistic(Probabilistic),
    Status {
        mask: u8,
    },
    Str(StringMatch),
    Bool {
        key: String,
        value: bool,
        invert: bool,
    },
    Rate(RateWindow),
    SpanCount {
        min: u64,
        max: u64,
    },
    TraceState {
        key: String,
        values: Vec<String>,
    },
    And(Vec<Eval>),
    Not(Box<Eval>),
    Drop(Vec<Eval>),
    Composite(Composite),
}

pub(crate) struct Probabilistic {
    salt_state: u64,
    threshold: u64,
    all: bool,
    adjusted: f64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a spreads its last bytes poorly over the high bits; the murmur3 finalizer evens that
/// out, so the kept fraction matches the percentage for any id pattern. Fixed constants: every
/// instance and every restart computes the same value.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

impl Probabilistic {
    pub fn new(salt: &str, percentage: f64) -> Self {
        let salt = if salt.is_empty() {
            DEFAULT_HASH_SALT
        } else {
            salt
        };
        let p = (percentage / 100.0).clamp(0.0, 1.0);
        Probabilistic {
            salt_state: fnv1a(FNV_OFFSET, salt.as_bytes()),
            // Saturating float-to-int cast; `all` covers p == 1 exactly.
            threshold: (p * 18_446_744_073_709_551_616.0) as u64,
            all: p >= 1.0,
            adjusted: if p > 0.0 { 1.0 / p } else { 0.0 },
        }
    }

    /// The trace's position in [0, 2^64): the same for the same salt and id everywhere.
    pub fn hash(&self, id: &TraceId) -> u64 {
        fmix64(fnv1a(self.salt_state, &id.0))
    }

    pub fn keeps(&self, id: &TraceId) -> bool {
        self.all || self.hash(id) < self.threshold
    }
}

pub(crate) struct StringMatch {
    key: String,
    exact: Vec<String>,
    regexes: Vec<Regex>,
    /// Regex results per attribute value, cleared when full (bounded).
    cache: Option<(HashMap<String, bool>, usize)>,
    invert: bool,
}

impl StringMatch {
    fn matches(&mut self, v: &str) -> bool {
        if self.regexes.is_empty() {
            return self.exact.iter().any(|e| e == v);
        }
        if let Some((cache, _)) = &self.cache {
            if let Some(&hit) = cache.get(v) {
                return hit;
            }
        }
        let hit = self.regexes.iter().any(|r| r.is_match(v));
        if let Some((cache, cap)) = &mut self.cache {
            if cache.len() >= *cap {
                cache.clear();
            }
            cache.insert(v.to_owned(), hit);
        }
        hit
    }
}

/// A per-second span budget, on injected time.
pub(crate) struct RateWindow {
    per_second: u64,
    start: Option<Instant>,
    used: u64,
}

impl RateWindow {
    fn new(per_second: u64) -> Self {
        RateWindow {
            per_second,
            start: None,
            used: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        match self.start {
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(1) => {}
            _ => {
                self.start = Some(now);
                self.used = 0;
            }
        }
    }

    fn has_room(&self, n: u64) -> bool {
        self.used.saturating_add(n) <= self.per_second
    }
}

pub(crate) struct Composite {
    total: RateWindow,
    subs: Vec<(Eval, RateWindow)>,
}

/// Something a policy can be asked about: the trace and the time of the decision.
pub(crate) struct Ctx {
    pub now: Instant,
}

/// Calls `pred` on every value of `key` among the spans' attributes and their resources'
/// attributes (each shared resource once in a row), until it returns true.
fn any_attr<'a>(spans: &'a [Span], key: &str, mut pred: impl FnMut(AttrValue<'a>) -> bool) -> bool {
    let mut last: Option<&Resource> = None;
    for s in spans {
        if let Some(v) = s.attr(key) {
            if pred(v) {
                return true;
            }
        }
        let r = s.resource();
        if last.is_some_and(|l| std::ptr::eq(l, r)) {
            continue;
        }
        last = Some(r);
        if let Some(v) = r.attr(key) {
            if pred(v) {
                return true;
            }
        }
    }
    false
}

fn flip(hit: bool, invert: bool) -> Vote {
    if hit != invert {
        Vote::Sampled { adjusted: 1.0 }
    } else {
        Vote::NotSampled
    }
}

impl Eval {
    pub fn compile(p: &PolicyConfig) -> Eval {
        match &p.kind {
            PolicyKind::AlwaysSample | PolicyKind::Unsupported(_) => Eval::Always,
            PolicyKind::Latency(c) => Eval::Latency {
                lo_ms: c.threshold_ms,
                hi_ms: c.upper_threshold_ms,
            },
            PolicyKind::NumericAttribute(c) => Eval::Numeric {
                key: c.key.clone(),
                min: c.min_value.unwrap_or(i64::MIN),
                max: c.max_value.unwrap_or(i64::MAX),
                invert: c.invert_match,
            },
            PolicyKind::Probabilistic(c) => {
                Eval::Probabilistic(Probabilistic::new(&c.hash_salt, c.sampling_percentage))
            }
            PolicyKind::StatusCode(c) => Eval::Status {
                mask: c
                    .status_codes
                    .iter()
                    .filter_map(|s| parse_status(s))
                    .fold(0, |m, s| m | status_bit(s)),
            },
            PolicyKind::StringAttribute(c) => {
                let regexes = if c.enabled_regex_matching {
                    c.values.iter().filter_map(|v| Regex::new(v).ok()).collect()
                } else {
                    Vec::new()
                };
                Eval::Str(StringMatch {
                    key: c.key.clone(),
                    exact: c.values.clone(),
                    regexes,
                    cache: (c.enabled_regex_matching && c.cache_max_size > 0)
                        .then(|| (HashMap::new(), c.cache_max_size)),
                    invert: c.invert_match,
                })
            }
            PolicyKind::BooleanAttribute(c) => Eval::Bool {
                key: c.key.clone(),
                value: c.value,
                invert: c.invert_match,
            },
            PolicyKind::RateLimiting(c) => Eval::Rate(RateWindow::new(c.spans_per_second)),
            PolicyKind::SpanCount(c) => Eval::SpanCount {
                min: c.min_spans,
                max: c.max_spans,
            },
            PolicyKind::TraceState(c) => Eval::TraceState {
                key: c.key.clone(),
                values: c.values.clone(),
            },
            PolicyKind::And(c) => Eval::And(c.and_sub_policy.iter().map(Eval::compile).collect()),
            PolicyKind::Not(c) => Eval::Not(Box::new(Eval::compile(&c.not_sub_policy))),
            PolicyKind::Drop(c) => {
                Eval::Drop(c.drop_sub_policy.iter().map(Eval::compile).collect())
            }
            PolicyKind::Composite(c) => Eval::Composite(compile_composite(c)),
        }
    }

    /// Whether the vote looks at the spans themselves (attributes, trace state), not only at
    /// the trace's summary, id and span count.
    fn reads_spans(&self) -> bool {
        match self {
            Eval::Numeric { .. } | Eval::Str(_) | Eval::Bool { .. } | Eval::TraceState { .. } => {
                true
            }
            Eval::Always
            | Eval::Latency { .. }
            | Eval::Probabilistic(_)
            | Eval::Status { .. }
            | Eval::Rate(_)
            | Eval::SpanCount { .. } => false,
            Eval::And(subs) | Eval::Drop(subs) => subs.iter().any(Eval::reads_spans),
            Eval::Not(sub) => sub.reads_spans(),
            Eval::Composite(c) => c.subs.iter().any(|(e, _)| e.reads_spans()),
        }
    }

    pub fn vote(&mut self, t: &TraceView<'_>, ctx: &Ctx) -> Vote {
        match self {
            Eval::Always => Vote::Sampled { adjusted: 1.0 },
            Eval::Latency { lo_ms, hi_ms } => {
                let d = t.summary.duration_ms();
                let hit = if *hi_ms == 0 {
                    d >= *lo_ms
                } else {
                    *lo_ms < d && d <= *hi_ms
                };
                flip(hit, false)
            }
            Eval::Numeric {
                key,
                min,
                max,
                invert,
            } => {
                let (lo, hi) = (*min, *max);
                let hit = any_attr(t.spans, key, |v| match v {
                    AttrValue::Int(i) => lo <= i && i <= hi,
                    AttrValue::Double(d) => lo as f64 <= d && d <= hi as f64,
                    _ => false,
                });
                flip(hit, *invert)
            }
            Eval::Probabilistic(p) => {
                if p.keeps(&t.trace_id) {
                    Vote::Sampled {
                        adjusted: p.adjusted,
                    }
                } else {
                    Vote::NotSampled
                }
            }
            Eval::Status { mask } => flip(t.summary.status_mask & *mask != 0, false),
            Eval::Str(m) => {
                let key = std::mem::take(&mut m.key);
                let hit = any_attr(t.spans, &key, |v| v.as_str().is_some_and(|s| m.matches(s)));
                m.key = key;
                flip(hit, m.invert)
            }
            Eval::Bool { key, value, invert } => {
                let want = *value;
                let hit = any_attr(
                    t.spans,
                    key,
                    |v| matches!(v, AttrValue::Bool(b) if b == want),
                );
                flip(hit, *invert)
            }
            Eval::Rate(w) => {
                w.roll(ctx.now);
                let n = t.count as u64;
                if w.has_room(n) {
                    w.used += n;
                    Vote::Sampled { adjusted: 1.0 }
                } else {
                    Vote::NotSampled
                }
            }
            Eval::SpanCount { min, max } => {
                let n = t.count as u64;
                flip(n >= *min && (*max == 0 || n <= *max), false)
            }
            Eval::TraceState { key, values } => {
                let hit = t.spans.iter().any(|s| {
                    trace_state_value(s.trace_state(), key)
                        .is_some_and(|v| values.iter().any(|w| w == v))
                });
                flip(hit, false)
            }
            Eval::And(subs) => {
                let mut adjusted = 1.0;
                for s in subs.iter_mut() {
                    match s.vote(t, ctx) {
                        Vote::Sampled { adjusted: a } => adjusted *= a,
                        _ => return Vote::NotSampled,
                    }
                }
                Vote::Sampled { adjusted }
            }
            Eval::Not(s) => match s.vote(t, ctx) {
                Vote::Sampled { .. } => Vote::NotSampled,
                _ => Vote::Sampled { adjusted: 1.0 },
            },
            Eval::Drop(subs) => {
                for s in subs.iter_mut() {
                    if !matches!(s.vote(t, ctx), Vote::Sampled { .. }) {
                        return Vote::NotSampled;
                    }
                }
                Vote::Dropped
            }
            Eval::Composite(c) => {
                c.total.roll(ctx.now);
                let n = t.count as u64;
                for (sub, budget) in c.subs.iter_mut() {
                    budget.roll(ctx.now);
                    if let Vote::Sampled { .. } = sub.vote(t, ctx) {
                        // As in the Collector, the first sub-policy that matches decides: over
                        // its share, the trace is not kept by this composite.
                        if budget.has_room(n) && c.total.has_room(n) {
                            budget.used += n;
                            c.total.used += n;
                            return Vote::Sampled { adjusted: 1.0 };
                        }
                        return Vote::NotSampled;
                    }
                }
                Vote::NotSampled
            }
        }
    }
}

fn compile_composite(c: &CompositeCfg) -> Composite {
    let total = c.max_total_spans_per_second as f64;
    let listed: f64 = c.rate_allocation.iter().map(|r| r.percent).sum();
    let unlisted = c
        .composite_sub_policy
        .iter()
        .filter(|p| !c.rate_allocation.iter().any(|r| r.policy == p.name))
        .count();
    let share_left = if unlisted > 0 {
        ((100.0 - listed).max(0.0)) / unlisted as f64
    } else {
        0.0
    };
    let mut order: Vec<&PolicyConfig> = c
        .policy_order
        .iter()
        .filter_map(|n| c.composite_sub_policy.iter().find(|p| &p.name == n))
        .collect();
    for p in &c.composite_sub_policy {
        if !order.iter().any(|o| o.name == p.name) {
            order.push(p);
        }
    }
    let subs = order
        .into_iter()
        .map(|p| {
            let pct = c
                .rate_allocation
                .iter()
                .find(|r| r.policy == p.name)
                .map_or(share_left, |r| r.percent);
            (
                Eval::compile(p),
                RateWindow::new((total * pct / 100.0).floor() as u64),
            )
        })
        .collect();
    Composite {
        total: RateWindow::new(c.max_total_spans_per_second),
        subs,
    }
}

/// The value of `key` in a W3C `tracestate` (`k1=v1,k2=v2`).
fn trace_state_value<'a>(ts: &'a str, key: &str) -> Option<&'a str> {
    ts.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// One top-level policy of a set.
pub(crate) struct Policy {
    /// Index into the processor's table of policy names (for stats and `sampling.policy`).
    pub id: u32,
    pub eval: Eval,
    pub is_drop: bool,
}

/// A compiled policy set (the default or one tenant's).
pub(crate) struct PolicySet {
    /// Drop policies first: a matching drop ends the evaluation.
    pub policies: Vec<Policy>,
    pub first_match: bool,
    /// Some policy reads the spans themselves (see `Eval::reads_spans`).
    pub reads_spans: bool,
}

/// The outcome of a set's vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Outcome {
    Kept {
        policy: u32,
        adjusted: f64,
    },
    /// Vetoed by a drop policy (`Some(id)`) or kept by none (`None`).
    Dropped {
        policy: Option<u32>,
    },
}

impl PolicySet {
    pub fn compile(
        policies: &[PolicyConfig],
        first_match: bool,
        mut id_of: impl FnMut(&str) -> u32,
    ) -> Self {
        let mut out: Vec<Policy> = policies
            .iter()
            .map(|p| Policy {
                id: id_of(&p.name),
                eval: Eval::compile(p),
                is_drop: matches!(p.kind, PolicyKind::Drop(_)),
            })
            .collect();
        // Stable: drops first, each group in config order.
        out.sort_by_key(|p| !p.is_drop);
        PolicySet {
            reads_spans: out.iter().any(|p| p.eval.reads_spans()),
            policies: out,
            first_match,
        }
    }

    pub fn decide(&mut self, t: &TraceView<'_>, ctx: &Ctx) -> Outcome {
        let mut best: Option<(u32, f64)> = None;
        for p in self.policies.iter_mut() {
            match p.eval.vote(t, ctx) {
                Vote::Dropped => return Outcome::Dropped { policy: Some(p.id) },
                Vote::Sampled { adjusted } => {
                    if best.is_none_or(|(_, a)| adjusted < a) {
                        best = Some((p.id, adjusted));
                    }
                    if self.first_match {
                        break;
                    }
                }
                Vote::NotSampled => {}
            }
        }
        match best {
            Some((policy, adjusted)) => Outcome::Kept { policy, adjusted },
            None => Outcome::Dropped { policy: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_state_lookup() {
        assert_eq!(
            trace_state_value("a=1, key3=value2", "key3"),
            Some("value2")
        );
        assert_eq!(trace_state_value("a=1", "key3"), None);
        assert_eq!(trace_state_value("", "key3"), None);
    }

    #[test]
    fn probabilistic_extremes() {
        let id = TraceId([7; 16]);
        assert!(Probabilistic::new("", 100.0).keeps(&id));
        assert!(!Probabilistic::new("", 0.0).keeps(&id));
        let p = Probabilistic::new("s", 25.0);
        assert_eq!(p.adjusted, 4.0);
        // Same salt, same id: same answer from a fresh instance.
        assert_eq!(p.hash(&id), Probabilistic::new("s", 25.0).hash(&id));
        assert_ne!(p.hash(&id), Probabilistic::new("t", 25.0).hash(&id));
    }
}
