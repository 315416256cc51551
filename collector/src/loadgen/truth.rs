//! Ground truth of generated traces, and the comparison of a join's output with it.
//!
//! The truth of a trace lists every span the join should emit for it, with the parent the join
//! should give it (`shared/docs/join.md`). [`compare`] checks an observed output (the spans a
//! downstream sink received) against it; end-to-end tests assert on its counts.
//!
//! `tailweave loadgen --truth FILE` writes one [`TraceTruth`] per line ([`read_truth`] reads
//! it back), e.g. (spans shortened):
//!
//! ```text
//! {"trace_id":"6f1c…","tenant":"game-0","case":"mysql_error","error":true,"slow":false,
//!  "duration_us":24113,"spans":[
//!   {"span_id":"a3…","parent_span_id":null,"source":"sdk","tap_side":null,"via":null,
//!    "service":"game-client","name":"player checkout"},
//!   {"span_id":"b7…","parent_span_id":"a3…","source":"sdk","tap_side":null,"via":"span_id",
//!    "service":"game-client","name":"POST /api/checkout"},
//!   {"span_id":"6553f1000040001a","parent_span_id":"b7…","source":"ebpf","tap_side":"c-p",
//!    "via":"span_id","service":"game-client","name":"POST /api/checkout"},
//!   {"span_id":"6553f10000400031","parent_span_id":"…","source":"ebpf","tap_side":"s-p",
//!    "merged_span_ids":["6553f10000400032"],"via":"tcp_seq","service":"login",
//!    "name":"POST /login/verify"}, …]}
//! ```
//!
//! A trace's spans form one tree; eBPF spans take the SDK trace id; a merged span keeps the
//! request row's id and lists the response row in `merged_span_ids` (the response row itself
//! is not an expected span).

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tailweave_core::proto::tonic::common::v1::any_value::Value;
use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
use tailweave_core::span::{hex, unhex};

/// Where a span came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Sdk,
    Ebpf,
}

/// One span the join should emit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanTruth {
    /// 16 lower-hex digits. For a merged eBPF span, the request row's id (`join.md` §7c).
    pub span_id: String,
    /// The parent after the join, 16 lower-hex digits; `None` for the trace's root.
    pub parent_span_id: Option<String>,
    pub source: Source,
    /// Tap side code (`c-p`, `c`, `s-nd`, ...) of an eBPF span.
    pub tap_side: Option<String>,
    /// Row ids absorbed into this span by the request/response merge (`join.md` §3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_span_ids: Vec<String>,
    /// The relation that should place the span (`tailweave.join.via`); `None` for the root.
    pub via: Option<String>,
    /// Service name (resource `service.name`), for messages.
    pub service: String,
    /// Span name as sent (empty for DeepFlow rows of protocols without a name).
    pub name: String,
}

/// One generated trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceTruth {
    /// The SDK trace id (32 lower-hex), which the join gives every associated eBPF span.
    pub trace_id: String,
    /// The tenant (the `k8s.namespace.name` of every span of the trace).
    pub tenant: String,
    /// What was injected: `normal`, `payment_declined`, `mysql_error`, `slow_query`, `timeout`,
    /// `sdk_error`, `slow`.
    pub case: String,
    /// Some span has status ERROR, or some eBPF call timed out (request-only row, no response).
    pub error: bool,
    /// `duration_us` is over the configured slow threshold.
    pub slow: bool,
    /// Latest end minus earliest start over every span sent for the trace (host clocks as sent).
    pub duration_us: u64,
    pub spans: Vec<SpanTruth>,
}

impl TraceTruth {
    /// The span without a parent.
    pub fn root(&self) -> Option<&SpanTruth> {
        self.spans.iter().find(|s| s.parent_span_id.is_none())
    }
}

/// Reads a truth file written by `tailweave loadgen --truth FILE` (one JSON object a line).
pub fn read_truth(path: &Path) -> anyhow::Result<Vec<TraceTruth>> {
    use anyhow::Context;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a trace truth", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// The outcome of [`compare`]. Every expected span is counted in exactly one of
/// `missing_spans`, `correct_parents` or `wrong_parents`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub traces: u64,
    /// Every expected span present once, with its trace id, parent and merged ids, and no other
    /// span under the trace id.
    pub traces_complete: u64,
    /// Some but not all of the above.
    pub traces_partial: u64,
    /// No expected span of the trace observed.
    pub traces_missing: u64,
    pub expected_spans: u64,
    pub observed_spans: u64,
    /// Expected spans observed with the expected parent (and the expected trace id).
    pub correct_parents: u64,
    /// Expected spans observed with another parent, or under another trace id.
    pub wrong_parents: u64,
    /// Of `wrong_parents`: the trace id differs from the truth's.
    pub wrong_trace_ids: u64,
    /// Observed spans whose `tailweave.join.merged_span_ids` differs from the truth.
    pub wrong_merges: u64,
    /// Observed spans whose `tailweave.join.via` is present and differs from the truth's `via`
    /// (informational: not part of a trace being complete).
    pub wrong_vias: u64,
    pub missing_spans: u64,
    /// Observed spans that are no expected span (an unmerged response row, say).
    pub extra_spans: u64,
    /// Additional copies of an expected span.
    pub duplicate_spans: u64,
    /// Observed spans put under a trace id, or a parent, that belongs to another tenant.
    pub cross_tenant_spans: u64,
    /// The first few problems, for test failure messages.
    pub examples: Vec<String>,
}

impl Comparison {
    /// Correct parent links over expected spans (1.0 when nothing was expected).
    pub fn parent_accuracy(&self) -> f64 {
        if self.expected_spans == 0 {
            1.0
        } else {
            self.correct_parents as f64 / self.expected_spans as f64
        }
    }

    /// Every trace complete and nothing extra.
    pub fn is_perfect(&self) -> bool {
        self.traces_complete == self.traces
            && self.extra_spans == 0
            && self.duplicate_spans == 0
            && self.cross_tenant_spans == 0
    }

    fn note(&mut self, msg: impl FnOnce() -> String) {
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(msg());
        }
    }
}

const MAX_EXAMPLES: usize = 20;

/// The attribute the join writes on merged spans (`join.md` §7).
pub const MERGED_SPAN_IDS_ATTR: &str = "tailweave.join.merged_span_ids";
/// The attribute naming the relation that placed a span (`join.md` §7).
pub const VIA_ATTR: &str = "tailweave.join.via";

/// Compares the spans a sink received with the truth of the traces that were sent.
pub fn compare(truth: &[TraceTruth], observed: &[ProtoSpan]) -> Comparison {
    struct Want<'a> {
        trace: usize,
        span: &'a SpanTruth,
    }
    let mut c = Comparison {
        traces: truth.len() as u64,
        observed_spans: observed.len() as u64,
        ..Comparison::default()
    };
    let trace_ids: Vec<Option<Vec<u8>>> = truth.iter().map(|t| unhex(&t.trace_id)).collect();
    let mut trace_by_id: HashMap<&[u8], usize> = HashMap::new();
    for (i, id) in trace_ids.iter().enumerate() {
        if let Some(id) = id {
            trace_by_id.insert(id.as_slice(), i);
        }
    }
    let mut want: HashMap<Vec<u8>, Want<'_>> = HashMap::new();
    for (ti, t) in truth.iter().enumerate() {
        for s in &t.spans {
            c.expected_spans += 1;
            if let Some(id) = unhex(&s.span_id) {
                want.insert(id, Want { trace: ti, span: s });
            }
        }
    }

    let mut seen: HashSet<&[u8]> = HashSet::new();
    // Per trace: expected spans seen, spans correct, and whether anything spoils it.
    let mut seen_per_trace = vec![0u64; truth.len()];
    let mut good_per_trace = vec![0u64; truth.len()];
    let mut spoiled = vec![false; truth.len()];

    for o in observed {
        let tenant_of_trace = trace_by_id
            .get(o.trace_id.as_slice())
            .map(|&i| truth[i].tenant.as_str());
        let Some(w) = want.get(o.span_id.as_slice()) else {
            c.extra_spans += 1;
            if let Some(&ti) = trace_by_id.get(o.trace_id.as_slice()) {
                spoiled[ti] = true;
            }
            c.note(|| {
                format!(
                    "extra span {} under trace {}",
                    hex(&o.span_id),
                    hex(&o.trace_id)
                )
            });
            continue;
        };
        let t = &truth[w.trace];
        if !seen.insert(o.span_id.as_slice()) {
            c.duplicate_spans += 1;
            spoiled[w.trace] = true;
            c.note(|| format!("duplicate span {} ({})", w.span.span_id, w.span.name));
            continue;
        }
        seen_per_trace[w.trace] += 1;

        let parent_tenant = want
            .get(o.parent_span_id.as_slice())
            .map(|p| truth[p.trace].tenant.as_str());
        if tenant_of_trace.is_some_and(|x| x != t.tenant)
            || parent_tenant.is_some_and(|x| x != t.tenant)
        {
            c.cross_tenant_spans += 1;
            c.note(|| {
                format!(
                    "span {} of tenant {} joined across tenants",
                    w.span.span_id, t.tenant
                )
            });
        }

        let trace_ok = trace_ids[w.trace].as_deref() == Some(o.trace_id.as_slice());
        let expected_parent = w
            .span
            .parent_span_id
            .as_deref()
            .and_then(unhex)
            .unwrap_or_default();
        let parent_ok = o.parent_span_id == expected_parent;
        if trace_ok && parent_ok {
            c.correct_parents += 1;
        } else {
            c.wrong_parents += 1;
            if !trace_ok {
                c.wrong_trace_ids += 1;
            }
            c.note(|| {
                format!(
                    "span {} ({} {} {}) of trace {}: parent {} trace {}, expected parent {}",
                    w.span.span_id,
                    w.span.service,
                    w.span.tap_side.as_deref().unwrap_or("sdk"),
                    w.span.name,
                    t.trace_id,
                    hex(&o.parent_span_id),
                    hex(&o.trace_id),
                    w.span.parent_span_id.as_deref().unwrap_or("none"),
                )
            });
        }

        let merged_ok = merged_matches(o, &w.span.merged_span_ids);
        if !merged_ok {
            c.wrong_merges += 1;
            c.note(|| {
                format!(
                    "span {}: merged_span_ids differ from {:?}",
                    w.span.span_id, w.span.merged_span_ids
                )
            });
        }
        let via = o
            .attributes
            .iter()
            .find(|kv| kv.key == VIA_ATTR)
            .and_then(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                },
            );
        if let (Some(got), Some(want)) = (via, w.span.via.as_deref()) {
            if got != want {
                c.wrong_vias += 1;
                c.note(|| format!("span {}: via {got}, expected {want}", w.span.span_id));
            }
        }
        if trace_ok && parent_ok && merged_ok {
            good_per_trace[w.trace] += 1;
        }
    }

    for (ti, t) in truth.iter().enumerate() {
        let n = t.spans.len() as u64;
        c.missing_spans += n - seen_per_trace[ti];
        if seen_per_trace[ti] == 0 && n > 0 {
            c.traces_missing += 1;
        } else if good_per_trace[ti] == n && !spoiled[ti] {
            c.traces_complete += 1;
        } else {
            c.traces_partial += 1;
        }
    }
    for (id, w) in &want {
        if !seen.contains(id.as_slice()) {
            c.note(|| {
                format!(
                    "missing span {} ({} {})",
                    w.span.span_id, w.span.service, w.span.name
                )
            });
        }
    }
    c
}

/// [`compare`] over the spans of whole requests, as a test sink collects them.
pub fn compare_requests(
    truth: &[TraceTruth],
    observed: &[ExportTraceServiceRequest],
) -> Comparison {
    let spans: Vec<ProtoSpan> = observed
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.iter().cloned())
        .collect();
    compare(truth, &spans)
}

/// The observed `tailweave.join.merged_span_ids` (absent = empty) against the expected list,
/// ignoring order.
fn merged_matches(o: &ProtoSpan, expected: &[String]) -> bool {
    let mut got: Vec<String> = Vec::new();
    for kv in &o.attributes {
        if kv.key != MERGED_SPAN_IDS_ATTR {
            continue;
        }
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::ArrayValue(a)) => {
                for v in &a.values {
                    if let Some(Value::StringValue(s)) = &v.value {
                        got.push(s.to_ascii_lowercase());
                    }
                }
            }
            Some(Value::StringValue(s)) => got.push(s.to_ascii_lowercase()),
            _ => {}
        }
    }
    let mut want: Vec<String> = expected.to_vec();
    got.sort();
    want.sort();
    got == want
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::scenario::{generate, ScenarioConfig};
    use tailweave_core::proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue};

    fn truth() -> Vec<TraceTruth> {
        let cfg = ScenarioConfig {
            traces: 6,
            tenants: 2,
            split_rate: 1.0,
            ..ScenarioConfig::default()
        };
        let t: Vec<TraceTruth> = generate(&cfg, 21).into_iter().map(|g| g.truth).collect();
        let tenants: HashSet<&str> = t.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(tenants.len(), 2, "the fixture needs two tenants");
        t
    }

    /// What a perfect join would emit for the truth.
    fn perfect(truth: &[TraceTruth]) -> Vec<ProtoSpan> {
        let mut out = Vec::new();
        for t in truth {
            for s in &t.spans {
                let mut attributes = Vec::new();
                if !s.merged_span_ids.is_empty() {
                    attributes.push(KeyValue {
                        key: MERGED_SPAN_IDS_ATTR.to_string(),
                        value: Some(AnyValue {
                            value: Some(Value::ArrayValue(ArrayValue {
                                values: s
                                    .merged_span_ids
                                    .iter()
                                    .map(|m| AnyValue {
                                        value: Some(Value::StringValue(m.clone())),
                                    })
                                    .collect(),
                            })),
                        }),
                        ..KeyValue::default()
                    });
                }
                out.push(ProtoSpan {
                    trace_id: unhex(&t.trace_id).unwrap(),
                    span_id: unhex(&s.span_id).unwrap(),
                    parent_span_id: s
                        .parent_span_id
                        .as_deref()
                        .and_then(unhex)
                        .unwrap_or_default(),
                    attributes,
                    ..ProtoSpan::default()
                });
            }
        }
        out
    }

    #[test]
    fn a_perfect_output_is_perfect() {
        let t = truth();
        let c = compare(&t, &perfect(&t));
        assert!(c.is_perfect(), "{c:?}");
        assert_eq!(c.correct_parents, c.expected_spans);
        assert_eq!(c.traces_complete, 6);
        assert_eq!(c.parent_accuracy(), 1.0);
        assert!(c.examples.is_empty());
    }

    #[test]
    fn one_wrong_parent_is_counted_once() {
        let t = truth();
        let mut o = perfect(&t);
        // A non-root span of the second trace gets its grandparent... or any other span.
        let victim = t[1]
            .spans
            .iter()
            .position(|s| s.parent_span_id.is_some())
            .unwrap();
        let base: usize = t[0].spans.len();
        let root = unhex(&t[1].root().unwrap().span_id).unwrap();
        let idx = base + victim;
        o[idx].parent_span_id = if o[idx].parent_span_id == root {
            o[idx].span_id.clone()
        } else {
            root
        };
        let c = compare(&t, &o);
        assert_eq!(c.wrong_parents, 1);
        assert_eq!(c.correct_parents, c.expected_spans - 1);
        assert_eq!(
            (c.traces_complete, c.traces_partial, c.traces_missing),
            (5, 1, 0)
        );
        assert_eq!(c.missing_spans, 0);
        assert!(!c.is_perfect());
        assert_eq!(c.examples.len(), 1);
    }

    #[test]
    fn one_missing_span_makes_its_trace_partial() {
        let t = truth();
        let mut o = perfect(&t);
        o.remove(3);
        let c = compare(&t, &o);
        assert_eq!(c.missing_spans, 1);
        assert_eq!(c.wrong_parents, 0);
        assert_eq!((c.traces_complete, c.traces_partial), (5, 1));
        // A whole trace gone is missing, not partial.
        let n0 = t[0].spans.len();
        let c = compare(&t, &perfect(&t)[n0..]);
        assert_eq!((c.traces_complete, c.traces_missing), (5, 1));
        assert_eq!(c.missing_spans, n0 as u64);
    }

    #[test]
    fn extra_duplicate_unmerged_and_cross_tenant_spans_are_counted() {
        let t = truth();
        let mut o = perfect(&t);
        // An unmerged response row shows up as its own span, and the merged one lost its list.
        let (ti, si) = t
            .iter()
            .enumerate()
            .find_map(|(ti, tr)| {
                tr.spans
                    .iter()
                    .position(|s| !s.merged_span_ids.is_empty())
                    .map(|si| (ti, si))
            })
            .unwrap();
        let offset: usize = t[..ti].iter().map(|t| t.spans.len()).sum();
        let merged = &t[ti].spans[si];
        o[offset + si].attributes.clear();
        o.push(ProtoSpan {
            trace_id: unhex(&t[ti].trace_id).unwrap(),
            span_id: unhex(&merged.merged_span_ids[0]).unwrap(),
            parent_span_id: unhex(&merged.span_id).unwrap(),
            ..ProtoSpan::default()
        });
        o.push(o[0].clone());
        let c = compare(&t, &o);
        assert_eq!(c.extra_spans, 1);
        assert_eq!(c.duplicate_spans, 1);
        assert_eq!(c.wrong_merges, 1);
        assert_eq!(c.cross_tenant_spans, 0);

        // A span moved under a trace of the other tenant.
        let other = t.iter().position(|x| x.tenant != t[0].tenant).unwrap();
        let mut o = perfect(&t);
        o[1].trace_id = unhex(&t[other].trace_id).unwrap();
        let c = compare(&t, &o);
        assert_eq!(c.cross_tenant_spans, 1);
        assert_eq!(c.wrong_trace_ids, 1);
        assert_eq!(c.wrong_parents, 1);
    }

    #[test]
    fn truth_round_trips_through_json_lines() {
        let t = truth();
        let dir = std::env::temp_dir().join(format!("tailweave-truth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("truth.jsonl");
        let text: String = t
            .iter()
            .map(|x| serde_json::to_string(x).unwrap() + "\n")
            .collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(read_truth(&path).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
