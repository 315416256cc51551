//! Writing a unit (join.md §7): adopted trace ids, rebuilt parents, provenance attributes.

use tailweave_core::ebpf::flags;
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
use tailweave_core::span::hex;
use tailweave_core::{Span, SpanId, SpanSource};

use super::tree::{Member, Parent, Plan};
use super::LateTarget;

pub const ORIGINAL_TRACE_ID: &str = "tailweave.join.original_trace_id";
pub const ORIGINAL_PARENT: &str = "tailweave.join.original_parent_span_id";
pub const MERGED_SPAN_IDS: &str = "tailweave.join.merged_span_ids";
pub const ORDER: &str = "tailweave.join.order";
pub const VIA: &str = "tailweave.join.via";
pub const TAP_SIDE: &str = "tailweave.join.tap_side";
pub const OTHER_TRACE_IDS: &str = "tailweave.join.other_trace_ids";
pub const LATE: &str = "tailweave.join.late";
pub const CLOCK_OFFSET: &str = "tailweave.join.clock_offset_us";

/// Status message given to a request that never saw its response.
pub const TIMEOUT_MESSAGE: &str = "timeout: request without response (tailweave.join)";

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}
fn kv_str(k: &str, v: String) -> KeyValue {
    kv(k, any_value::Value::StringValue(v))
}
fn kv_strs(k: &str, v: impl IntoIterator<Item = String>) -> KeyValue {
    kv(
        k,
        any_value::Value::ArrayValue(ArrayValue {
            values: v
                .into_iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s)),
                })
                .collect(),
        }),
    )
}

fn set_attr(p: &mut ProtoSpan, a: KeyValue) {
    match p.attributes.iter_mut().find(|x| x.key == a.key) {
        Some(x) => *x = a,
        None => p.attributes.push(a),
    }
}

/// Response-side content a merged span takes from its response row (join.md §3).
fn response_side(key: &str) -> bool {
    key == "http.status_code"
        || key.ends_with("response_code")
        || key.ends_with("response_status")
        || key.ends_with("response_result")
        || key.starts_with("df.metrics.response")
        || key.starts_with("df.span.syscall_")
            && (key.ends_with("_1") || key.ends_with("_response"))
        || key == "df.span.x_request_id_1"
}

/// Rewrites the members of a unit. Returns the unit's spans (in `order`) and the pruned eBPF
/// spans as received (for `unassociated_ebpf`).
pub fn apply(
    members: Vec<Member>,
    plan: &Plan,
    unit_trace: [u8; 16],
    emit_offset: bool,
) -> (Vec<Span>, Vec<Span>) {
    let _ = unit_trace;
    let ids: Vec<SpanId> = members.iter().map(|m| m.span.span_id).collect();
    let mut unit: Vec<(u32, Span)> = Vec::with_capacity(members.len());
    let mut dropped = Vec::new();
    for (i, m) in members.into_iter().enumerate() {
        if !plan.kept[i] {
            dropped.extend(m.into_original_spans());
            continue;
        }
        let new_parent = match plan.parent[i] {
            Parent::Node(p) => Some(ids[p]),
            Parent::Dangling(h) => Some(h),
            Parent::Root => Some(SpanId::ZERO),
            Parent::Own => None,
        };
        let order = plan.order[i];
        let via = plan.via[i];
        let Member {
            mut span,
            absorbed,
            other_traces,
            ..
        } = m;
        let is_ebpf = span.source == SpanSource::Ebpf || span.ebpf.is_some();
        let trace_id = plan.trace_id;
        let offset = plan.offset_us[i];
        let timed_out = span
            .ebpf
            .as_deref()
            .is_some_and(|e| e.has(flags::TIMED_OUT));
        let tap = span.ebpf.as_deref().map(|e| e.tap_side.code().to_string());
        let merged_end = span.ebpf.as_deref().map(|e| e.end_ns);
        let received_parent = span.parent_span_id;
        let received_trace = span.trace_id;
        // Decoding a span that decoded on receipt cannot fail; if it did, the span goes out as is.
        let _ = span.edit(|p| {
            if is_ebpf {
                if received_trace.0 != trace_id {
                    set_attr(
                        p,
                        kv_str(super::output::ORIGINAL_TRACE_ID, hex(&received_trace.0)),
                    );
                    p.trace_id = trace_id.to_vec();
                }
                if let Some(np) = new_parent {
                    p.parent_span_id = if np.is_zero() {
                        Vec::new()
                    } else {
                        np.0.to_vec()
                    };
                }
                if let Some(t) = &tap {
                    set_attr(p, kv_str(TAP_SIDE, t.clone()));
                }
                for r in &absorbed {
                    merge_response(p, r);
                }
                if let Some(end) = merged_end {
                    p.end_time_unix_nano = p.end_time_unix_nano.max(end);
                }
                if !absorbed.is_empty() {
                    set_attr(p, kv_str("df.span.type", "session".into()));
                    set_attr(
                        p,
                        kv_strs(MERGED_SPAN_IDS, absorbed.iter().map(|r| r.span_id.to_hex())),
                    );
                }
                if timed_out {
                    p.status = Some(Status {
                        message: TIMEOUT_MESSAGE.into(),
                        code: status::StatusCode::Error as i32,
                    });
                }
                if emit_offset && offset != 0 {
                    set_attr(p, kv(CLOCK_OFFSET, any_value::Value::IntValue(offset)));
                }
            } else if let Some(np) = new_parent {
                if np != received_parent {
                    let orig = if received_parent.is_zero() {
                        String::new()
                    } else {
                        received_parent.to_hex()
                    };
                    set_attr(p, kv_str(ORIGINAL_PARENT, orig));
                    p.parent_span_id = if np.is_zero() {
                        Vec::new()
                    } else {
                        np.0.to_vec()
                    };
                }
            }
            set_attr(p, kv(ORDER, any_value::Value::IntValue(order as i64)));
            if let Some(v) = via {
                set_attr(p, kv_str(VIA, v.as_str().into()));
            }
            if !other_traces.is_empty() {
                set_attr(
                    p,
                    kv_strs(OTHER_TRACE_IDS, other_traces.iter().map(|t| hex(t))),
                );
            }
        });
        span.marks.timed_out = timed_out;
        unit.push((order, span));
    }
    unit.sort_unstable_by_key(|(o, _)| *o);
    (unit.into_iter().map(|(_, s)| s).collect(), dropped)
}

/// Takes the response row's status, response-side attributes and events; fills what is empty.
fn merge_response(p: &mut ProtoSpan, r: &Span) {
    let Ok(rp) = r.decode() else { return };
    if rp.status.as_ref().is_some_and(|s| s.code != 0) || p.status.is_none() {
        p.status = rp.status.clone();
    }
    for a in rp.attributes {
        if response_side(&a.key) {
            set_attr(p, a);
        } else if !p.attributes.iter().any(|x| x.key == a.key) {
            p.attributes.push(a);
        }
    }
    p.events.extend(rp.events);
    if p.name.is_empty() {
        p.name = rp.name;
    }
}

/// A span that arrived after its unit (join.md §5.5).
pub fn late_span(mut span: Span, t: &LateTarget) -> Span {
    let is_ebpf = span.ebpf.is_some();
    let tap = span.ebpf.as_deref().map(|e| e.tap_side.code().to_string());
    let received = span.trace_id;
    let _ = span.edit(|p| {
        if is_ebpf {
            if received.0 != t.trace_id {
                set_attr(p, kv_str(ORIGINAL_TRACE_ID, hex(&received.0)));
                p.trace_id = t.trace_id.to_vec();
            }
            p.parent_span_id = if t.parent.is_zero() {
                Vec::new()
            } else {
                t.parent.0.to_vec()
            };
            if let Some(tap) = tap {
                set_attr(p, kv_str(TAP_SIDE, tap));
            }
            set_attr(p, kv_str(VIA, t.via.as_str().into()));
        }
        set_attr(p, kv(LATE, any_value::Value::BoolValue(true)));
    });
    span.marks.late = true;
    span
}
