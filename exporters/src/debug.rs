//! The `debug` exporter: shows what reaches the end of a pipeline.
//!
//! `basic` logs one line per batch, `normal` one line per span, and `detailed` prints every trace
//! of the batch as an indented tree on stdout, so a newcomer sees how the join placed eBPF spans
//! under SDK spans. The tree is plain text on stdout rather than log lines, so the default log
//! level stays at one line per batch.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;

use async_trait::async_trait;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, ExportError, Exporter, Span, SpanId, SpanSource, TraceId};

use crate::queue::{self, ExportSettings, QueueConfig, RetryConfig};
use crate::RunningExporter;

/// The join's pre-order position of a span in its trace.
pub const ORDER_ATTR: &str = "tailweave.join.order";
/// The tap side code the join writes on eBPF spans.
pub const TAP_SIDE_ATTR: &str = "tailweave.join.tap_side";

/// How much the exporter shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verbosity {
    /// One log line per batch: span and trace counts.
    #[default]
    Basic,
    /// One log line per span.
    Normal,
    /// Each trace as an indented tree on stdout.
    Detailed,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugExporterConfig {
    /// `basic`, `normal` or `detailed`. Default `basic`.
    pub verbosity: Verbosity,
}

impl DebugExporterConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        Vec::new()
    }

    pub fn endpoints(&self) -> Vec<String> {
        Vec::new()
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        // One consumer keeps the output in batch order; nothing to retry on a local write.
        let settings = ExportSettings {
            retry: RetryConfig {
                enabled: false,
                ..Default::default()
            },
            queue: QueueConfig {
                num_consumers: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let exporter = DebugExporter {
            id: ctx.id.clone(),
            verbosity: self.verbosity,
        };
        Ok(queue::spawn_exporter(&ctx.id, &settings, exporter))
    }
}

struct DebugExporter {
    id: String,
    verbosity: Verbosity,
}

#[async_trait]
impl Exporter for DebugExporter {
    async fn export(&self, spans: &[Span]) -> Result<(), ExportError> {
        let traces = count_traces(spans);
        match self.verbosity {
            Verbosity::Basic => {
                tracing::info!(exporter = %self.id, spans = spans.len(), traces, "batch");
            }
            Verbosity::Normal => {
                tracing::info!(exporter = %self.id, spans = spans.len(), traces, "batch");
                for s in spans {
                    tracing::info!(
                        exporter = %self.id,
                        trace_id = %s.trace_id,
                        span_id = %s.span_id,
                        parent_span_id = %s.parent_span_id,
                        service = s.service_name(),
                        name = s.name(),
                        duration_ms = duration_ms(s),
                        status = status(s),
                        source = %source(s),
                        "span"
                    );
                }
            }
            Verbosity::Detailed => {
                let text = render_tree(spans);
                // stdout may be a slow pipe: write it off the async workers.
                tokio::task::spawn_blocking(move || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())?;
                    out.flush()
                })
                .await
                .map_err(|e| ExportError::permanent(format!("stdout writer: {e}")))?
                .map_err(|e| ExportError::permanent(format!("writing to stdout: {e}")))?;
            }
        }
        Ok(())
    }
}

fn count_traces(spans: &[Span]) -> usize {
    let mut ids: Vec<TraceId> = spans.iter().map(|s| s.trace_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

fn duration_ms(s: &Span) -> f64 {
    s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6
}

fn status(s: &Span) -> &'static str {
    use tailweave_core::StatusCode;
    if s.marks.timed_out {
        return "timeout";
    }
    match s.status {
        StatusCode::Unset => "unset",
        StatusCode::Ok => "ok",
        StatusCode::Error => "error",
    }
}

/// `sdk`, or `ebpf <tap side>`. After an OTLP hop the in-memory source is gone, so the join's
/// tap-side attribute also marks a span as eBPF.
fn source(s: &Span) -> String {
    let attr_tap = || {
        s.attr(TAP_SIDE_ATTR)
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    };
    let tap = s
        .ebpf
        .as_ref()
        .map(|e| e.tap_side.code().to_string())
        .filter(|t| !t.is_empty())
        .or_else(attr_tap);
    match (s.source, tap) {
        (_, Some(t)) => format!("ebpf {t}"),
        (SpanSource::Ebpf, None) => "ebpf".to_string(),
        (SpanSource::Sdk, None) => "sdk".to_string(),
    }
}

/// Sibling order: the join's order when the span has one, else start time (span id breaks ties).
fn sibling_key(s: &Span) -> (bool, i64, u64, SpanId) {
    let order = s.attr(ORDER_ATTR).and_then(|v| v.as_i64());
    (order.is_none(), order.unwrap_or(0), s.start_ns, s.span_id)
}

/// Renders every trace of `spans` as an indented tree, one line per span: service, name,
/// duration, status and source. Traces appear in first-seen order. A span whose parent is not in
/// the batch is shown at the top level; spans caught in a parent cycle are shown from the first
/// of them, each once.
pub fn render_tree(spans: &[Span]) -> String {
    let mut traces: Vec<(TraceId, Vec<usize>)> = Vec::new();
    let mut by_trace: HashMap<TraceId, usize> = HashMap::new();
    for (i, s) in spans.iter().enumerate() {
        let t = *by_trace.entry(s.trace_id).or_insert_with(|| {
            traces.push((s.trace_id, Vec::new()));
            traces.len() - 1
        });
        traces[t].1.push(i);
    }

    let mut out = String::new();
    let mut visited = vec![false; spans.len()];
    for (trace_id, members) in &traces {
        let _ = writeln!(out, "trace {trace_id} ({} spans)", members.len());
        let mut index: HashMap<SpanId, usize> = HashMap::new();
        for &i in members {
            index.entry(spans[i].span_id).or_insert(i);
        }
        let mut roots = Vec::new();
        let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
        for &i in members {
            let s = &spans[i];
            match index.get(&s.parent_span_id) {
                Some(&p) if !s.parent_span_id.is_zero() && p != i => {
                    children.entry(p).or_default().push(i)
                }
                _ => roots.push(i),
            }
        }
        let by_key = |v: &mut Vec<usize>| v.sort_by_key(|&i| sibling_key(&spans[i]));
        by_key(&mut roots);
        for v in children.values_mut() {
            by_key(v);
        }
        // Members never reached from a root sit on a parent cycle; start from them in order.
        let mut rest: Vec<usize> = members.clone();
        by_key(&mut rest);
        for start in roots.iter().copied().chain(rest) {
            if visited[start] {
                continue;
            }
            // Depth-first with an explicit stack: trace depth comes from the network.
            let mut stack = vec![(start, 1usize)];
            while let Some((i, depth)) = stack.pop() {
                if visited[i] {
                    continue;
                }
                visited[i] = true;
                write_line(&mut out, &spans[i], depth);
                if let Some(kids) = children.get(&i) {
                    stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
                }
            }
        }
    }
    out
}

fn write_line(out: &mut String, s: &Span, depth: usize) {
    for _ in 0..depth {
        out.push_str("  ");
    }
    let service = match s.service_name() {
        "" => "?",
        name => name,
    };
    let late = if s.marks.late { " late" } else { "" };
    let _ = writeln!(
        out,
        "{service} {:?} {:.3}ms {} {}{late}",
        s.name(),
        duration_ms(s),
        status(s),
        source(s)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tailweave_core::ebpf::{EbpfSpan, TapSide};
    use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use tailweave_core::proto::tonic::resource::v1::Resource as PR;
    use tailweave_core::proto::tonic::trace::v1::{status, Span as PS, Status};
    use tailweave_core::{Resource, Scope};

    fn scope(service: &str) -> Arc<Scope> {
        let r = Resource::from_proto(
            &PR {
                attributes: vec![kv(
                    "service.name",
                    any_value::Value::StringValue(service.into()),
                )],
                ..Default::default()
            },
            "",
        );
        Scope::new(r, Default::default(), Default::default())
    }

    fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    struct S {
        trace: u8,
        id: u8,
        parent: u8,
        start_ms: u64,
        dur_ms: u64,
        attrs: Vec<KeyValue>,
    }

    fn s(trace: u8, id: u8, parent: u8, start_ms: u64) -> S {
        S {
            trace,
            id,
            parent,
            start_ms,
            dur_ms: 2,
            attrs: Vec::new(),
        }
    }

    fn make(sc: &Arc<Scope>, x: S) -> Span {
        Span::from_proto(
            sc.clone(),
            &PS {
                trace_id: vec![x.trace; 16],
                span_id: vec![x.id; 8],
                parent_span_id: if x.parent == 0 {
                    vec![]
                } else {
                    vec![x.parent; 8]
                },
                name: format!("op{}", x.id),
                start_time_unix_nano: x.start_ms * 1_000_000,
                end_time_unix_nano: (x.start_ms + x.dur_ms) * 1_000_000,
                attributes: x.attrs,
                status: Some(Status {
                    message: String::new(),
                    code: if x.id == 4 {
                        status::StatusCode::Error as i32
                    } else {
                        status::StatusCode::Unset as i32
                    },
                }),
                ..Default::default()
            },
        )
    }

    fn order(n: i64) -> KeyValue {
        kv(ORDER_ATTR, any_value::Value::IntValue(n))
    }

    #[test]
    fn tree_nests_children_and_orders_by_start_time() {
        let fe = scope("frontend");
        let be = scope("backend");
        // Given out of order: children before parents, later siblings first.
        let spans = vec![
            make(&be, s(1, 3, 1, 20)),
            make(&fe, s(1, 2, 1, 10)),
            make(&fe, s(1, 1, 0, 0)),
            make(&be, s(1, 4, 3, 21)),
        ];
        let t = "0101010101010101".repeat(2);
        assert_eq!(
            render_tree(&spans),
            format!(
                "trace {t} (4 spans)\n\
                 \x20 frontend \"op1\" 2.000ms unset sdk\n\
                 \x20   frontend \"op2\" 2.000ms unset sdk\n\
                 \x20   backend \"op3\" 2.000ms unset sdk\n\
                 \x20     backend \"op4\" 2.000ms error sdk\n"
            )
        );
    }

    #[test]
    fn join_order_wins_over_start_time_and_ebpf_source_is_shown() {
        let sc = scope("svc");
        let mut a = s(1, 2, 1, 50);
        a.attrs = vec![order(1)];
        let mut b = s(1, 3, 1, 10);
        b.attrs = vec![
            order(2),
            kv(TAP_SIDE_ATTR, any_value::Value::StringValue("c".into())),
        ];
        let mut root = make(&sc, s(1, 1, 0, 0));
        root.source = SpanSource::Ebpf;
        root.ebpf = Some(Box::new(EbpfSpan {
            tap_side: TapSide::SP,
            ..Default::default()
        }));
        let spans = vec![make(&sc, b), make(&sc, a), root];
        let text = render_tree(&spans);
        let lines: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "svc \"op1\" 2.000ms unset ebpf s-p",
                "svc \"op2\" 2.000ms unset sdk",
                "svc \"op3\" 2.000ms unset ebpf c",
            ]
        );
    }

    #[test]
    fn orphans_are_top_level_and_traces_are_separate() {
        let sc = scope("svc");
        let spans = vec![
            make(&sc, s(2, 9, 0, 0)),
            make(&sc, s(1, 5, 7, 5)), // parent 7 is not in the batch
            make(&sc, s(1, 1, 0, 1)),
            make(&sc, s(1, 6, 5, 6)),
        ];
        let text = render_tree(&spans);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with(&format!("trace {} (1 spans)", "02".repeat(16))));
        assert!(lines[1].starts_with("  svc \"op9\""));
        assert!(lines[2].starts_with(&format!("trace {} (3 spans)", "01".repeat(16))));
        assert!(lines[3].starts_with("  svc \"op1\""));
        assert!(lines[4].starts_with("  svc \"op5\""));
        assert!(lines[5].starts_with("    svc \"op6\""));
    }

    #[test]
    fn parent_cycles_and_self_parents_print_each_span_once() {
        let sc = scope("svc");
        let spans = vec![
            make(&sc, s(1, 1, 2, 0)),
            make(&sc, s(1, 2, 1, 1)),
            make(&sc, s(1, 3, 3, 2)),
        ];
        let text = render_tree(&spans);
        for id in 1..=3 {
            assert_eq!(text.matches(&format!("\"op{id}\"")).count(), 1, "{text}");
        }
        // The self-parent is a root; the cycle starts from its earliest member.
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("  svc \"op3\""), "{text}");
        assert!(lines[1].starts_with("  svc \"op1\""), "{text}");
        assert!(lines[2].starts_with("    svc \"op2\""), "{text}");
    }

    #[test]
    fn verbosity_parses() {
        let c: DebugExporterConfig =
            tailweave_core::config::parse(serde_yaml::from_str("verbosity: detailed").unwrap())
                .unwrap();
        assert_eq!(c.verbosity, Verbosity::Detailed);
        let d: DebugExporterConfig =
            tailweave_core::config::parse(serde_yaml::Value::Null).unwrap();
        assert_eq!(d.verbosity, Verbosity::Basic);
        assert!(tailweave_core::config::parse::<DebugExporterConfig>(
            serde_yaml::from_str("verbosity: loud").unwrap()
        )
        .is_err());
    }

    #[tokio::test]
    async fn build_drains_every_verbosity() {
        for v in ["basic", "normal", "detailed"] {
            let c: DebugExporterConfig = tailweave_core::config::parse(
                serde_yaml::from_str(&format!("verbosity: {v}")).unwrap(),
            )
            .unwrap();
            let running = c
                .build(&BuildContext {
                    id: "debug".into(),
                    ..Default::default()
                })
                .unwrap();
            let sc = scope("svc");
            running
                .input
                .send(tailweave_core::SpanBatch::new(vec![make(
                    &sc,
                    s(1, 1, 0, 0),
                )]))
                .await
                .unwrap();
            drop(running.input);
            running.done.await.unwrap();
        }
    }
}
