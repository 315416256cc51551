//! The `propagate` processor: copies trace-level attributes (a user id, a player id, a tenant) from
//! one span of a trace onto every span of it, eBPF-derived spans included, so a backend can find
//! every span of everything one user did.
//!
//! ```yaml
//! propagate:
//!   rules:
//!     - attributes: [user.id, player.id]
//!       from: entry        # the trace's entry span (default)
//!     - attributes: [tenant]
//!       from: any          # whichever span has it
//!       overwrite: false   # spans that have their own value keep it (default)
//! ```
//!
//! The entry span is the root (the earliest one if a broken trace has several), else the earliest
//! SERVER span. `from: any` takes the entry span's value if it has one, else the earliest span that
//! has the attribute. A value is read from the span's attributes, else its resource's, and written
//! as a span attribute with its type kept. When an uninstrumented edge (an nginx `s-p` eBPF span)
//! is the root of the joined trace, the entry span has no application attributes: use `from: any`.
//!
//! Place it after the join: the join emits each trace as one batch (`SpanBatch.whole`), so every
//! span of the trace is seen together. A batch that is not whole (no join upstream, or spans that
//! arrive after their trace was emitted) is handled per batch, helped by a bounded memory of the
//! values found per trace (`remember_traces`): spans of a remembered trace get its values even in
//! a later batch, but spans that went out *before* the source span was seen are not revisited.

use std::collections::VecDeque;
use std::time::Instant;

use hashbrown::HashMap;
use prost::Message;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, KeyValue, KeyValueList,
};
use tailweave_core::{AttrValue, ComponentError, Processor, Span, SpanBatch, SpanKind, TraceId};

/// Spans rewritten with at least one propagated attribute.
pub const EDITED_SPANS: &str = "tailweave_propagate_edited_spans_total";
/// Spans that could not be rewritten (their bytes did not decode); they pass unchanged.
pub const FAILED_SPANS: &str = "tailweave_propagate_failed_spans_total";

/// Which span of the trace a rule takes its values from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The entry span only.
    #[default]
    Entry,
    /// The entry span, else the earliest span that has the attribute.
    Any,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Attribute keys to copy. Required.
    pub attributes: Vec<String>,
    /// `entry` or `any`. Default `entry`.
    #[serde(default)]
    pub from: Source,
    /// Replace the value a span already has (as a span or resource attribute). Default `false`.
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PropagateConfig {
    /// Applied in order; a later rule does not see what an earlier one copied. Required.
    pub rules: Vec<Rule>,
    /// Traces whose found values are remembered for spans arriving in later batches; the oldest
    /// is forgotten first. `0` turns the memory off. Default `10000`.
    pub remember_traces: usize,
}

impl Default for PropagateConfig {
    fn default() -> Self {
        PropagateConfig {
            rules: Vec::new(),
            remember_traces: 10_000,
        }
    }
}

impl PropagateConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        if self.rules.is_empty() {
            out.push(ConfigIssue::new("rules", "at least one rule is required"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.attributes.is_empty() {
                out.push(ConfigIssue::new(
                    format!("rules[{i}].attributes"),
                    "at least one attribute is required",
                ));
            }
            for (j, a) in r.attributes.iter().enumerate() {
                let path = format!("rules[{i}].attributes[{j}]");
                if a.trim().is_empty() {
                    out.push(ConfigIssue::new(path, "must not be empty"));
                } else if r.attributes[..j].contains(a) {
                    out.push(ConfigIssue::new(path, format!("{a:?} is listed twice")));
                }
            }
        }
        out
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<Propagate, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(&ctx.id, all.join("; ")));
        }
        Ok(Propagate {
            id: ctx.id.clone(),
            rules: self.rules.clone(),
            memory: Memory::new(self.remember_traces),
        })
    }
}

/// One value to write: key, value, and whether it replaces an existing one.
#[derive(Clone, Debug, PartialEq)]
struct Found {
    key: String,
    value: AnyValue,
    overwrite: bool,
}

/// Bounded per-trace memory of found values, oldest first out.
struct Memory {
    cap: usize,
    map: HashMap<TraceId, Vec<Found>>,
    order: VecDeque<TraceId>,
}

impl Memory {
    fn new(cap: usize) -> Memory {
        Memory {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
    fn get(&self, t: &TraceId, key: &str) -> Option<&Found> {
        self.map.get(t)?.iter().find(|f| f.key == key)
    }
    fn remember(&mut self, t: TraceId, found: &[Found]) {
        if self.cap == 0 || found.is_empty() {
            return;
        }
        match self.map.get_mut(&t) {
            Some(v) => {
                for f in found {
                    match v.iter_mut().find(|x| x.key == f.key) {
                        Some(x) => *x = f.clone(),
                        None => v.push(f.clone()),
                    }
                }
            }
            None => {
                self.map.insert(t, found.to_vec());
                self.order.push_back(t);
                while self.map.len() > self.cap {
                    let Some(old) = self.order.pop_front() else {
                        break;
                    };
                    self.map.remove(&old);
                }
            }
        }
    }
}

pub struct Propagate {
    id: String,
    rules: Vec<Rule>,
    memory: Memory,
}

/// The entry span among `idx`: the earliest root, else the earliest SERVER span.
fn entry_span(spans: &[Span], idx: &[usize]) -> Option<usize> {
    let earliest = |f: &dyn Fn(&Span) -> bool| {
        idx.iter()
            .copied()
            .filter(|&i| f(&spans[i]))
            .min_by_key(|&i| (spans[i].start_ns, i))
    };
    earliest(&|s| s.is_root()).or_else(|| earliest(&|s| s.kind == SpanKind::Server))
}

/// Converts a value read from the wire into the proto type, keeping its type.
pub fn to_any(v: AttrValue<'_>) -> Option<AnyValue> {
    use any_value::Value as V;
    let value = match v {
        AttrValue::Str(s) => V::StringValue(s.to_string()),
        AttrValue::Bool(b) => V::BoolValue(b),
        AttrValue::Int(i) => V::IntValue(i),
        AttrValue::Double(d) => V::DoubleValue(d),
        AttrValue::Bytes(b) => V::BytesValue(b.to_vec()),
        AttrValue::Array(b) => V::ArrayValue(ArrayValue::decode(b).ok()?),
        AttrValue::KvList(b) => V::KvlistValue(KeyValueList::decode(b).ok()?),
        AttrValue::Empty => return None,
    };
    Some(AnyValue { value: Some(value) })
}

impl Propagate {
    /// The values the rules find in one trace of the batch.
    fn find(&self, spans: &[Span], idx: &[usize], trace: &TraceId) -> Vec<Found> {
        let entry = entry_span(spans, idx);
        let mut found = Vec::new();
        for r in &self.rules {
            for key in &r.attributes {
                let from_entry = entry.and_then(|e| spans[e].attr_or_resource(key));
                let v = match (from_entry, r.from) {
                    (Some(v), _) => Some(v),
                    (None, Source::Entry) => None,
                    (None, Source::Any) => idx
                        .iter()
                        .copied()
                        .filter_map(|i| spans[i].attr_or_resource(key).map(|v| (i, v)))
                        .min_by_key(|(i, _)| (spans[*i].start_ns, *i))
                        .map(|(_, v)| v),
                };
                let value = v
                    .and_then(to_any)
                    .or_else(|| self.memory.get(trace, key).map(|f| f.value.clone()));
                if let Some(value) = value {
                    if !found.iter().any(|f: &Found| &f.key == key) {
                        found.push(Found {
                            key: key.clone(),
                            value,
                            overwrite: r.overwrite,
                        });
                    }
                }
            }
        }
        found
    }
}

/// Whether `span` needs `f` written.
fn needs(span: &Span, f: &Found) -> bool {
    match span.attr_or_resource(&f.key) {
        None => true,
        Some(v) => f.overwrite && to_any(v).as_ref() != Some(&f.value),
    }
}

impl Processor for Propagate {
    fn process(&mut self, _now: Instant, mut batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        let mut traces: HashMap<TraceId, Vec<usize>> = HashMap::new();
        let mut order = Vec::new();
        for (i, s) in batch.spans.iter().enumerate() {
            traces
                .entry(s.trace_id)
                .or_insert_with(|| {
                    order.push(s.trace_id);
                    Vec::new()
                })
                .push(i);
        }
        let (mut edited, mut failed) = (0u64, 0u64);
        for t in order {
            let idx = &traces[&t];
            let found = self.find(&batch.spans, idx, &t);
            if found.is_empty() {
                continue;
            }
            for &i in idx {
                let span = &mut batch.spans[i];
                let todo: Vec<&Found> = found.iter().filter(|f| needs(span, f)).collect();
                if todo.is_empty() {
                    continue;
                }
                let r = span.edit(|p| {
                    for f in &todo {
                        match p.attributes.iter_mut().find(|kv| kv.key == f.key) {
                            Some(kv) => kv.value = Some(f.value.clone()),
                            None => p.attributes.push(KeyValue {
                                key: f.key.clone(),
                                value: Some(f.value.clone()),
                                ..Default::default()
                            }),
                        }
                    }
                });
                match r {
                    Ok(()) => edited += 1,
                    Err(_) => failed += 1,
                }
            }
            self.memory.remember(t, &found);
        }
        if edited > 0 {
            metrics::counter!(EDITED_SPANS, "processor" => self.id.clone()).increment(edited);
        }
        if failed > 0 {
            metrics::counter!(FAILED_SPANS, "processor" => self.id.clone()).increment(failed);
        }
        out.push(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span_metrics::testspan::{attr_str, kv, scope, span, sv, tid};
    use tailweave_core::config::parse;
    use tailweave_core::SpanSource;

    fn build(yaml: &str) -> Propagate {
        let c: PropagateConfig = parse(serde_yaml::from_str(yaml).unwrap()).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c.build(&BuildContext::default()).unwrap()
    }

    fn run(p: &mut Propagate, b: SpanBatch) -> Vec<Span> {
        let mut out = Vec::new();
        p.process(Instant::now(), b, &mut out);
        out.into_iter().flat_map(|b| b.spans).collect()
    }

    #[test]
    fn the_entry_spans_user_id_reaches_every_span_of_the_trace() {
        let mut p = build("rules: [{attributes: [user.id, player.id]}]");
        let web = scope("web", vec![]);
        let db = scope("mysql", vec![]);
        let root = span(&web, 1, 1, 0)
            .attr("user.id", sv("u-42"))
            .attr("player.id", any_value::Value::IntValue(7))
            .build();
        let child = span(&web, 1, 2, 1).times(1, 2).build();
        let mut ebpf = span(&db, 1, 3, 2).times(1, 2).build();
        ebpf.source = SpanSource::Ebpf;
        let other = span(&web, 2, 1, 0).build();
        let root_raw = root.raw.clone();
        let out = run(&mut p, SpanBatch::whole(vec![root, child, ebpf, other]));
        assert_eq!(out[0].raw, root_raw, "the entry span is left as it is");
        for s in &out[..3] {
            assert_eq!(attr_str(s, "user.id").as_deref(), Some("u-42"));
            assert_eq!(s.attr("player.id"), Some(AttrValue::Int(7)), "type kept");
        }
        assert_eq!(out[2].source, SpanSource::Ebpf, "source survives the edit");
        assert_eq!(attr_str(&out[3], "user.id"), None, "other traces untouched");
    }

    #[test]
    fn entry_falls_back_to_the_earliest_server_span() {
        let mut p = build("rules: [{attributes: [user.id]}]");
        let s = scope("web", vec![]);
        let client = span(&s, 1, 5, 9).kind(SpanKind::Client).times(0, 9).build();
        let late_server = span(&s, 1, 6, 9)
            .kind(SpanKind::Server)
            .times(5, 6)
            .attr("user.id", sv("late"))
            .build();
        let server = span(&s, 1, 7, 9)
            .kind(SpanKind::Server)
            .times(1, 8)
            .attr("user.id", sv("first"))
            .build();
        let out = run(&mut p, SpanBatch::whole(vec![client, late_server, server]));
        assert_eq!(attr_str(&out[0], "user.id").as_deref(), Some("first"));
        assert_eq!(
            attr_str(&out[1], "user.id").as_deref(),
            Some("late"),
            "own value kept"
        );
    }

    #[test]
    fn from_entry_ignores_other_spans_and_from_any_uses_them() {
        let s = scope("web", vec![]);
        let spans = || {
            vec![
                span(&s, 1, 1, 0).build(),
                span(&s, 1, 2, 1)
                    .times(3, 4)
                    .attr("tenant", sv("acme"))
                    .build(),
                span(&s, 1, 3, 1).times(1, 2).build(),
            ]
        };
        let mut entry = build("rules: [{attributes: [tenant], from: entry}]");
        let out = run(&mut entry, SpanBatch::whole(spans()));
        assert_eq!(attr_str(&out[0], "tenant"), None);
        assert_eq!(attr_str(&out[2], "tenant"), None);
        let mut any = build("rules: [{attributes: [tenant], from: any}]");
        let out = run(&mut any, SpanBatch::whole(spans()));
        for s in &out {
            assert_eq!(attr_str(s, "tenant").as_deref(), Some("acme"));
        }
    }

    #[test]
    fn resource_values_count_and_overwrite_replaces() {
        let with_res = scope("web", vec![kv("tenant", sv("from-resource"))]);
        let plain = scope("web", vec![]);
        let root = span(&with_res, 1, 1, 0).build();
        let child = span(&plain, 1, 2, 1).attr("tenant", sv("own")).build();
        let mut keep = build("rules: [{attributes: [tenant]}]");
        let out = run(
            &mut keep,
            SpanBatch::whole(vec![root.clone(), child.clone()]),
        );
        assert_eq!(attr_str(&out[1], "tenant").as_deref(), Some("own"));
        let mut over = build("rules: [{attributes: [tenant], overwrite: true}]");
        let out = run(&mut over, SpanBatch::whole(vec![root, child]));
        assert_eq!(
            attr_str(&out[1], "tenant").as_deref(),
            Some("from-resource")
        );
        assert_eq!(
            out[1].decode().unwrap().attributes.len(),
            1,
            "replaced, not added"
        );
    }

    #[test]
    fn later_batches_of_a_remembered_trace_get_the_values() {
        let s = scope("web", vec![]);
        let mut p = build("rules: [{attributes: [user.id]}]");
        run(
            &mut p,
            SpanBatch::new(vec![span(&s, 1, 1, 0).attr("user.id", sv("u1")).build()]),
        );
        let out = run(&mut p, SpanBatch::new(vec![span(&s, 1, 2, 1).build()]));
        assert_eq!(attr_str(&out[0], "user.id").as_deref(), Some("u1"));
        let mut forgetful = build("rules: [{attributes: [user.id]}]\nremember_traces: 0");
        run(
            &mut forgetful,
            SpanBatch::new(vec![span(&s, 1, 1, 0).attr("user.id", sv("u1")).build()]),
        );
        let out = run(
            &mut forgetful,
            SpanBatch::new(vec![span(&s, 1, 2, 1).build()]),
        );
        assert_eq!(attr_str(&out[0], "user.id"), None);
        assert_eq!(out[0].trace_id, tid(1));
    }

    #[test]
    fn validate_paths() {
        let c: PropagateConfig = parse(
            serde_yaml::from_str("rules: [{attributes: []}, {attributes: [a, '', a]}]").unwrap(),
        )
        .unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            vec![
                "rules[0].attributes",
                "rules[1].attributes[1]",
                "rules[1].attributes[2]"
            ]
        );
        assert_eq!(PropagateConfig::default().validate()[0].path, "rules");
        let bad: Result<PropagateConfig, _> =
            parse(serde_yaml::from_str("rules: [{attributes: [a], from: root}]").unwrap());
        assert!(bad.unwrap_err().path.starts_with("rules[0]"));
    }
}
