//! The RED (rate, errors, duration) series that the `span_metrics` processor writes and the
//! `prometheus` and `prometheus_remote_write` exporters read.
//!
//! Processors and exporters live in crates that do not depend on each other, and the collector
//! builds them separately from their configs, so they meet here: [`RedRegistry::global`] is the one
//! registry of a process. Each `span_metrics` component registers one [`RedSet`] under its id (the
//! same component in two pipelines shares its set); exporters render every set.
//!
//! A set is bounded: at most `max_series` label combinations, plus one overflow series
//! (`otel_metric_overflow="true"`) that absorbs every span of a combination beyond the limit.
//!
//! # Exemplars
//! `span_metrics` sits before `tail_sampling` and sees every span, but an exemplar is only useful if
//! its trace was kept. So a recorded span only becomes a *candidate* (a bounded FIFO of recent
//! trace ids, `max_pending_traces`); an exporter placed after the sampler calls
//! [`RedRegistry::mark_kept`] with the trace ids that reached it, and only then do that trace's
//! candidates become the exemplars of their buckets. Each bucket shows the most recent kept one.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use hashbrown::{Equivalent, HashMap};

use crate::span::{SpanId, TraceId};

/// Label of the series that absorbs spans beyond `max_series`, as the Collector names it.
pub const OVERFLOW_LABEL: &str = "otel_metric_overflow";
/// Candidates kept per pending trace: enough for the distinct buckets one trace usually touches.
const MAX_CANDIDATES_PER_TRACE: usize = 8;

/// The unit of the duration histogram; it also names the metric, as the Collector's Prometheus
/// translation does (`duration` in `ms` becomes `duration_milliseconds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DurationUnit {
    #[default]
    Milliseconds,
    Seconds,
}

impl DurationUnit {
    pub fn suffix(&self) -> &'static str {
        match self {
            DurationUnit::Milliseconds => "milliseconds",
            DurationUnit::Seconds => "seconds",
        }
    }
    /// Converts nanoseconds to this unit.
    pub fn from_ns(&self, ns: u64) -> f64 {
        match self {
            DurationUnit::Milliseconds => ns as f64 / 1e6,
            DurationUnit::Seconds => ns as f64 / 1e9,
        }
    }
}

/// How one set is shaped. `bounds` are in `unit`, strictly increasing.
#[derive(Clone, Debug, PartialEq)]
pub struct RedSetConfig {
    /// Metric name prefix, already a valid Prometheus name part (`traces_span_metrics`); may be empty.
    pub namespace: String,
    pub unit: DurationUnit,
    pub bounds: Vec<f64>,
    /// Label names, in the order the values of an [`Observation`] come in.
    pub label_names: Vec<String>,
    pub max_series: usize,
    pub exemplars: bool,
    /// Traces whose candidates wait for a kept mark; the oldest is forgotten first.
    pub max_pending_traces: usize,
}

impl RedSetConfig {
    /// `{namespace}_calls_total`.
    pub fn calls_name(&self) -> String {
        join_name(&self.namespace, "calls_total")
    }
    /// `{namespace}_calls` (the OpenMetrics family name of the counter).
    pub fn calls_family(&self) -> String {
        join_name(&self.namespace, "calls")
    }
    /// `{namespace}_duration_{unit}`; samples add `_bucket`, `_sum`, `_count`.
    pub fn duration_name(&self) -> String {
        join_name(&self.namespace, &format!("duration_{}", self.unit.suffix()))
    }
}

fn join_name(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}_{name}")
    }
}

/// Why a set could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedError {
    #[error(
        "{id} and {other} both write metrics named {namespace:?}; give one a different namespace"
    )]
    NamespaceTaken {
        id: String,
        other: String,
        namespace: String,
    },
    #[error("{id} is already registered with a different configuration")]
    Conflict { id: String },
}

/// Every RED set of a process.
#[derive(Default)]
pub struct RedRegistry {
    sets: Mutex<Vec<Arc<RedSet>>>,
}

impl RedRegistry {
    pub fn new() -> Arc<RedRegistry> {
        Arc::new(RedRegistry::default())
    }

    /// The registry the collector's components share.
    pub fn global() -> Arc<RedRegistry> {
        static GLOBAL: OnceLock<Arc<RedRegistry>> = OnceLock::new();
        GLOBAL.get_or_init(RedRegistry::new).clone()
    }

    fn sets(&self) -> MutexGuard<'_, Vec<Arc<RedSet>>> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The set of component `id`, created on first call. A second call with the same id (the
    /// same processor in another pipeline) returns the same set.
    pub fn register(&self, id: &str, cfg: RedSetConfig) -> Result<Arc<RedSet>, RedError> {
        let mut sets = self.sets();
        if let Some(s) = sets.iter().find(|s| s.id == id) {
            if s.cfg != cfg {
                return Err(RedError::Conflict { id: id.to_string() });
            }
            return Ok(s.clone());
        }
        if let Some(s) = sets.iter().find(|s| s.cfg.namespace == cfg.namespace) {
            return Err(RedError::NamespaceTaken {
                id: id.to_string(),
                other: s.id.clone(),
                namespace: cfg.namespace,
            });
        }
        let set = Arc::new(RedSet::new(id, cfg));
        sets.push(set.clone());
        Ok(set)
    }

    /// Every registered set, in registration order.
    pub fn all(&self) -> Vec<Arc<RedSet>> {
        self.sets().clone()
    }

    /// These traces were kept (they reached an exporter after the sampler): their pending
    /// candidates become exemplars.
    pub fn mark_kept(&self, ids: &[TraceId]) {
        if ids.is_empty() {
            return;
        }
        for s in self.all() {
            s.mark_kept(ids);
        }
    }

    /// A consistent copy of every set, each locked only while it is copied.
    pub fn snapshot(&self) -> Vec<SetSnapshot> {
        self.all().iter().map(|s| s.snapshot()).collect()
    }
}

/// One exemplar: a span that fell into a bucket and whose trace was kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The span's duration, in the set's unit.
    pub value: f64,
    /// The span's end time, Unix nanoseconds.
    pub time_unix_ns: u64,
}

/// One span as the set sees it.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    /// One value per label name of the set; `None` leaves the label out.
    pub labels: &'a [Option<Cow<'a, str>>],
    /// In the set's unit.
    pub duration: f64,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub end_unix_ns: u64,
}

/// The series of one `span_metrics` component.
pub struct RedSet {
    pub id: String,
    pub cfg: RedSetConfig,
    table: Mutex<Table>,
}

#[derive(Clone, Debug)]
struct Series {
    calls: u64,
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<u64>,
    sum: f64,
    exemplars: Vec<Option<Exemplar>>,
}

impl Series {
    fn new(n: usize) -> Series {
        Series {
            calls: 0,
            buckets: vec![0; n],
            sum: 0.0,
            exemplars: vec![None; n],
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    series: u32,
    bucket: u16,
    value: f64,
    span_id: SpanId,
    time_unix_ns: u64,
}

/// Series index used for the overflow series in candidates.
const OVERFLOW_INDEX: u32 = u32::MAX;

struct Table {
    index: HashMap<SeriesKey, u32>,
    keys: Vec<SeriesKey>,
    series: Vec<Series>,
    overflow: Option<Series>,
    overflowed_spans: u64,
    pending: HashMap<TraceId, (u64, Vec<Candidate>)>,
    order: VecDeque<(TraceId, u64)>,
    generation: u64,
}

/// Label values of one series. Hashed like [`KeyRef`] so lookups need no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SeriesKey(Box<[Option<Box<str>>]>);

fn hash_values<'a, H: Hasher>(vals: impl ExactSizeIterator<Item = Option<&'a str>>, h: &mut H) {
    h.write_usize(vals.len());
    for v in vals {
        match v {
            None => h.write_u8(0),
            Some(s) => {
                h.write_u8(1);
                s.hash(h);
            }
        }
    }
}

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_values(self.0.iter().map(|v| v.as_deref()), h)
    }
}

struct KeyRef<'a, 'b>(&'a [Option<Cow<'b, str>>]);

impl Hash for KeyRef<'_, '_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_values(self.0.iter().map(|v| v.as_deref()), h)
    }
}

impl Equivalent<SeriesKey> for KeyRef<'_, '_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.0.len() == key.0.len()
            && self
                .0
                .iter()
                .zip(key.0.iter())
                .all(|(a, b)| a.as_deref() == b.as_deref())
    }
}

/// What recording one span did, for the processor's own counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Series,
    /// The span went to the overflow series.
    Overflow,
}

/// The set, locked for a batch of observations.
pub struct RedWriter<'a> {
    cfg: &'a RedSetConfig,
    t: MutexGuard<'a, Table>,
}

impl RedWriter<'_> {
    pub fn observe(&mut self, o: &Observation<'_>) -> Recorded {
        let cfg = self.cfg;
        let n = cfg.bounds.len() + 1;
        let bucket = bucket_of(&cfg.bounds, o.duration);
        let t = &mut *self.t;
        let existing = t.index.get(&KeyRef(o.labels)).copied();
        let (idx, recorded) = match existing {
            Some(i) => (i, Recorded::Series),
            None if t.series.len() < cfg.max_series => {
                let key = SeriesKey(
                    o.labels
                        .iter()
                        .map(|v| v.as_deref().map(Box::from))
                        .collect(),
                );
                let i = t.series.len() as u32;
                t.index.insert(key.clone(), i);
                t.keys.push(key);
                t.series.push(Series::new(n));
                (i, Recorded::Series)
            }
            None => {
                t.overflowed_spans += 1;
                (OVERFLOW_INDEX, Recorded::Overflow)
            }
        };
        let s = if idx == OVERFLOW_INDEX {
            t.overflow.get_or_insert_with(|| Series::new(n))
        } else {
            &mut t.series[idx as usize]
        };
        s.calls += 1;
        s.buckets[bucket] += 1;
        if o.duration.is_finite() {
            s.sum += o.duration;
        }
        if cfg.exemplars && cfg.max_pending_traces > 0 && !o.trace_id.is_zero() {
            t.add_candidate(
                o.trace_id,
                Candidate {
                    series: idx,
                    bucket: bucket as u16,
                    value: o.duration,
                    span_id: o.span_id,
                    time_unix_ns: o.end_unix_ns,
                },
                cfg.max_pending_traces,
            );
        }
        recorded
    }
}

impl Table {
    fn add_candidate(&mut self, trace: TraceId, c: Candidate, cap: usize) {
        if let Some((_, list)) = self.pending.get_mut(&trace) {
            if let Some(same) = list
                .iter_mut()
                .find(|x| x.series == c.series && x.bucket == c.bucket)
            {
                *same = c;
            } else if list.len() < MAX_CANDIDATES_PER_TRACE {
                list.push(c);
            }
            return;
        }
        self.generation += 1;
        let g = self.generation;
        self.pending.insert(trace, (g, vec![c]));
        self.order.push_back((trace, g));
        // `order` also holds entries of traces already marked kept; bounding it at twice the
        // map keeps both bounded.
        while self.pending.len() > cap || self.order.len() > cap.saturating_mul(2) {
            let Some((old, og)) = self.order.pop_front() else {
                break;
            };
            if self.pending.get(&old).is_some_and(|(g, _)| *g == og) {
                self.pending.remove(&old);
            }
        }
    }
}

fn bucket_of(bounds: &[f64], v: f64) -> usize {
    // Prometheus buckets are `le`: a value equal to a bound belongs to that bound's bucket.
    bounds.partition_point(|b| *b < v)
}

impl RedSet {
    fn new(id: &str, cfg: RedSetConfig) -> RedSet {
        RedSet {
            id: id.to_string(),
            cfg,
            table: Mutex::new(Table {
                index: HashMap::new(),
                keys: Vec::new(),
                series: Vec::new(),
                overflow: None,
                overflowed_spans: 0,
                pending: HashMap::new(),
                order: VecDeque::new(),
                generation: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the set once for a batch of observations.
    pub fn writer(&self) -> RedWriter<'_> {
        RedWriter {
            cfg: &self.cfg,
            t: self.lock(),
        }
    }

    /// Series currently held, not counting the overflow series.
    pub fn series_count(&self) -> usize {
        self.lock().series.len()
    }

    /// Traces whose exemplar candidates wait for a kept mark.
    pub fn pending_traces(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn mark_kept(&self, ids: &[TraceId]) {
        let mut t = self.lock();
        let t = &mut *t;
        for id in ids {
            let Some((_, list)) = t.pending.remove(id) else {
                continue;
            };
            for c in list {
                let s = if c.series == OVERFLOW_INDEX {
                    t.overflow.as_mut()
                } else {
                    t.series.get_mut(c.series as usize)
                };
                let Some(slot) = s.and_then(|s| s.exemplars.get_mut(c.bucket as usize)) else {
                    continue;
                };
                if slot.is_none_or(|e| e.time_unix_ns <= c.time_unix_ns) {
                    *slot = Some(Exemplar {
                        trace_id: *id,
                        span_id: c.span_id,
                        value: c.value,
                        time_unix_ns: c.time_unix_ns,
                    });
                }
            }
        }
    }

    /// A copy of every series, sorted by labels so that output is stable.
    pub fn snapshot(&self) -> SetSnapshot {
        let t = self.lock();
        let mut series: Vec<SeriesSnapshot> = t
            .keys
            .iter()
            .zip(t.series.iter())
            .map(|(k, s)| SeriesSnapshot {
                labels: self
                    .cfg
                    .label_names
                    .iter()
                    .zip(k.0.iter())
                    .filter_map(|(n, v)| v.as_ref().map(|v| (n.clone(), v.to_string())))
                    .collect(),
                calls: s.calls,
                buckets: s.buckets.clone(),
                sum: s.sum,
                exemplars: s.exemplars.clone(),
            })
            .collect();
        series.sort_by(|a, b| a.labels.cmp(&b.labels));
        if let Some(s) = &t.overflow {
            series.push(SeriesSnapshot {
                labels: vec![(OVERFLOW_LABEL.to_string(), "true".to_string())],
                calls: s.calls,
                buckets: s.buckets.clone(),
                sum: s.sum,
                exemplars: s.exemplars.clone(),
            });
        }
        SetSnapshot {
            id: self.id.clone(),
            cfg: self.cfg.clone(),
            series,
            overflowed_spans: t.overflowed_spans,
        }
    }
}

/// A copy of one set.
#[derive(Clone, Debug)]
pub struct SetSnapshot {
    pub id: String,
    pub cfg: RedSetConfig,
    pub series: Vec<SeriesSnapshot>,
    /// Spans recorded into the overflow series so far.
    pub overflowed_spans: u64,
}

/// A copy of one series.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesSnapshot {
    /// The labels that have a value, in the set's label order.
    pub labels: Vec<(String, String)>,
    pub calls: u64,
    /// Per bucket, not cumulative; the last one is `+Inf`.
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub exemplars: Vec<Option<Exemplar>>,
}

impl SeriesSnapshot {
    /// `(upper bound, cumulative count, exemplar)` per bucket, ending with `+Inf`.
    pub fn cumulative<'a>(
        &'a self,
        bounds: &'a [f64],
    ) -> impl Iterator<Item = (f64, u64, Option<&'a Exemplar>)> + 'a {
        let mut acc = 0u64;
        self.buckets.iter().enumerate().map(move |(i, c)| {
            acc += c;
            let le = bounds.get(i).copied().unwrap_or(f64::INFINITY);
            (le, acc, self.exemplars.get(i).and_then(|e| e.as_ref()))
        })
    }
}

/// Makes a string a valid Prometheus metric or label name part: every character outside
/// `[a-zA-Z0-9_]` becomes `_`, and a leading digit gets a `_` in front.
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_series: usize) -> RedSetConfig {
        RedSetConfig {
            namespace: "traces_span_metrics".into(),
            unit: DurationUnit::Milliseconds,
            bounds: vec![10.0, 100.0],
            label_names: vec!["service_name".into(), "span_name".into()],
            max_series,
            exemplars: true,
            max_pending_traces: 4,
        }
    }

    fn obs<'a>(labels: &'a [Option<Cow<'a, str>>], d: f64, t: u8, end: u64) -> Observation<'a> {
        Observation {
            labels,
            duration: d,
            trace_id: TraceId([t; 16]),
            span_id: SpanId([t; 8]),
            end_unix_ns: end,
        }
    }

    fn labels(s: &'static str, n: &'static str) -> Vec<Option<Cow<'static, str>>> {
        vec![Some(Cow::Borrowed(s)), Some(Cow::Borrowed(n))]
    }

    #[test]
    fn buckets_are_le_and_series_are_keyed_by_labels() {
        let reg = RedRegistry::new();
        let set = reg.register("span_metrics", cfg(10)).unwrap();
        let a = labels("a", "GET");
        let b = vec![Some(Cow::Borrowed("a")), None];
        {
            let mut w = set.writer();
            for d in [10.0, 10.5, 500.0, 1.0] {
                assert_eq!(w.observe(&obs(&a, d, 1, 1)), Recorded::Series);
            }
            w.observe(&obs(&b, 3.0, 2, 1));
        }
        let snap = set.snapshot();
        assert_eq!(snap.series.len(), 2);
        let sa = snap
            .series
            .iter()
            .find(|s| s.labels.len() == 2)
            .expect("series a");
        assert_eq!(sa.calls, 4);
        assert_eq!(sa.buckets, vec![2, 1, 1]);
        assert_eq!(sa.sum, 521.5);
        let cum: Vec<(f64, u64)> = sa
            .cumulative(&snap.cfg.bounds)
            .map(|(le, c, _)| (le, c))
            .collect();
        assert_eq!(cum, vec![(10.0, 2), (100.0, 3), (f64::INFINITY, 4)]);
        let sb = snap.series.iter().find(|s| s.labels.len() == 1).unwrap();
        assert_eq!(sb.labels, vec![("service_name".into(), "a".into())]);
    }

    #[test]
    fn series_beyond_the_limit_go_to_the_overflow_series() {
        let reg = RedRegistry::new();
        let set = reg.register("span_metrics", cfg(2)).unwrap();
        let names = ["a", "b", "c", "d", "c"];
        let mut w = set.writer();
        let got: Vec<Recorded> = names
            .iter()
            .map(|n| w.observe(&obs(&labels("svc", n), 1.0, 1, 1)))
            .collect();
        drop(w);
        assert_eq!(
            got,
            vec![
                Recorded::Series,
                Recorded::Series,
                Recorded::Overflow,
                Recorded::Overflow,
                Recorded::Overflow
            ]
        );
        let snap = set.snapshot();
        assert_eq!(snap.overflowed_spans, 3);
        let last = snap.series.last().unwrap();
        assert_eq!(last.labels, vec![(OVERFLOW_LABEL.into(), "true".into())]);
        assert_eq!(last.calls, 3);
        assert_eq!(set.series_count(), 2);
    }

    #[test]
    fn exemplars_appear_only_for_kept_traces() {
        let reg = RedRegistry::new();
        let set = reg.register("span_metrics", cfg(10)).unwrap();
        let a = labels("a", "GET");
        {
            let mut w = set.writer();
            w.observe(&obs(&a, 5.0, 1, 100));
            w.observe(&obs(&a, 6.0, 2, 200));
            w.observe(&obs(&a, 50.0, 3, 300));
        }
        assert!(set.snapshot().series[0]
            .exemplars
            .iter()
            .all(|e| e.is_none()));
        // Trace 1 kept, trace 2 dropped by the sampler: bucket 0 shows trace 1 even though
        // trace 2 was more recent.
        reg.mark_kept(&[TraceId([1; 16])]);
        let s = &set.snapshot().series[0];
        assert_eq!(s.exemplars[0].map(|e| e.trace_id), Some(TraceId([1; 16])));
        assert_eq!(s.exemplars[0].map(|e| e.value), Some(5.0));
        assert_eq!(s.exemplars[1], None);
        // A later kept trace replaces an older exemplar in the same bucket.
        reg.mark_kept(&[TraceId([2; 16]), TraceId([3; 16])]);
        let s = &set.snapshot().series[0];
        assert_eq!(s.exemplars[0].map(|e| e.trace_id), Some(TraceId([2; 16])));
        assert_eq!(s.exemplars[1].map(|e| e.trace_id), Some(TraceId([3; 16])));
        assert_eq!(set.pending_traces(), 0);
    }

    #[test]
    fn pending_candidates_are_bounded_oldest_first() {
        let reg = RedRegistry::new();
        let set = reg.register("span_metrics", cfg(10)).unwrap();
        let a = labels("a", "GET");
        {
            let mut w = set.writer();
            for t in 1..=6u8 {
                w.observe(&obs(&a, 1.0, t, t as u64));
            }
        }
        assert_eq!(set.pending_traces(), 4);
        // Traces 1 and 2 were forgotten: marking them kept adds nothing.
        reg.mark_kept(&[TraceId([1; 16]), TraceId([2; 16])]);
        assert_eq!(set.snapshot().series[0].exemplars[0], None);
        reg.mark_kept(&[TraceId([3; 16])]);
        assert_eq!(
            set.snapshot().series[0].exemplars[0].map(|e| e.trace_id),
            Some(TraceId([3; 16]))
        );
    }

    #[test]
    fn registration_shares_by_id_and_refuses_clashes() {
        let reg = RedRegistry::new();
        let a = reg.register("span_metrics", cfg(10)).unwrap();
        let again = reg.register("span_metrics", cfg(10)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert!(matches!(
            reg.register("span_metrics", cfg(11)),
            Err(RedError::Conflict { .. })
        ));
        assert!(matches!(
            reg.register("span_metrics/other", cfg(10)),
            Err(RedError::NamespaceTaken { .. })
        ));
        assert_eq!(reg.all().len(), 1);
    }

    #[test]
    fn names() {
        assert_eq!(sanitize_name("traces.span.metrics"), "traces_span_metrics");
        assert_eq!(sanitize_name("1abc-d"), "_1abc_d");
        let c = cfg(1);
        assert_eq!(c.calls_name(), "traces_span_metrics_calls_total");
        assert_eq!(
            c.duration_name(),
            "traces_span_metrics_duration_milliseconds"
        );
    }
}
