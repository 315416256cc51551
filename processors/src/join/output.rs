//! Writing a unit (join.md §7): adopted trace ids, rebuilt parents, provenance attributes.

use bytes::BytesMut;
use tailweave_core::ebpf::flags;
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use tailweave_core::proto::tonic::trace::v1::{status, Span as ProtoSpan, Status};
use tailweave_core::span::hex;
use tailweave_core::wire::{len_field_size, put_len_field, put_len_header, put_varint, varint_len};
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
    let mut hexbuf = [0u8; 32];
    let room: usize = members
        .iter()
        .map(|m| m.span.raw.len() + APPEND_SLACK)
        .sum();
    let mut out_buf = BytesMut::with_capacity(room);
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
            frames,
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
        // Cloning the tap side shares its name: no allocation per span.
        let tap = span.ebpf.as_deref().map(|e| e.tap_side.clone());
        let merged_end = span.ebpf.as_deref().map(|e| e.end_ns);
        let received_parent = span.parent_span_id;
        let received_trace = span.trace_id;
        let clears_parent = new_parent == Some(SpanId::ZERO) && !received_parent.is_zero();
        // DeepFlow rows never carry `tailweave.join.*`; SDK spans may (an upstream tailweave).
        let fast = absorbed.is_empty()
            && frames.is_empty()
            && !timed_out
            && !clears_parent
            && (is_ebpf || !has_join_attrs(&span));
        if fast {
            let mut f = Appender::new(&span, &mut out_buf);
            if is_ebpf {
                if received_trace.0 != trace_id {
                    f.attr_str(ORIGINAL_TRACE_ID, hex16(&received_trace.0, &mut hexbuf));
                    f.trace_id(trace_id);
                    span.trace_id = tailweave_core::TraceId(trace_id);
                }
                if let Some(np) = new_parent.filter(|p| *p != received_parent) {
                    f.parent(np);
                    span.parent_span_id = np;
                }
                if let Some(t) = &tap {
                    f.attr_str(TAP_SIDE, t.code());
                }
                if emit_offset && offset != 0 {
                    f.attr_int(CLOCK_OFFSET, offset);
                }
            } else if let Some(np) = new_parent.filter(|p| *p != received_parent) {
                let orig = if received_parent.is_zero() {
                    String::new()
                } else {
                    received_parent.to_hex()
                };
                f.attr_str(ORIGINAL_PARENT, &orig);
                f.parent(np);
                span.parent_span_id = np;
            }
            f.attr_int(ORDER, order as i64);
            if let Some(v) = via {
                f.attr_str(VIA, v.as_str());
            }
            if !other_traces.is_empty() {
                f.attr_strs(OTHER_TRACE_IDS, other_traces.iter().map(|t| hex(t)));
            }
            span.raw = f.finish();
        } else {
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
                        set_attr(p, kv_str(TAP_SIDE, t.code().to_string()));
                    }
                    for r in &absorbed {
                        merge_response(p, r);
                    }
                    if let Some(end) = merged_end {
                        p.end_time_unix_nano = p.end_time_unix_nano.max(end);
                    }
                    if !absorbed.is_empty() {
                        set_attr(p, kv_str("df.span.type", "session".into()));
                    }
                    if !absorbed.is_empty() || !frames.is_empty() {
                        let ids = absorbed.iter().chain(&frames).map(|r| r.span_id.to_hex());
                        set_attr(p, kv_strs(MERGED_SPAN_IDS, ids));
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
        }
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

/// Lower-case hex of a trace id into `buf` (the fast path writes it without a `String`).
fn hex16<'a>(id: &[u8; 16], buf: &'a mut [u8; 32]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in id.iter().enumerate() {
        buf[2 * i] = DIGITS[(b >> 4) as usize];
        buf[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    // Only ASCII digits were written.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Whether the span already carries `tailweave.join.*` attributes (appending would duplicate keys).
fn has_join_attrs(span: &Span) -> bool {
    span.attrs().any(|(k, _)| k.starts_with("tailweave.join."))
}

/// Rewrites a span by appending fields to its encoded bytes instead of decoding and re-encoding
/// it. Protobuf concatenates repeated fields and keeps the last value of a singular one, so an
/// appended `attributes` entry, `trace_id` or non-empty `parent_span_id` gives the same message
/// as a rewrite (prost, Go and Java decoders all follow that rule). Used only when no attribute
/// key is duplicated and no field is cleared; everything else goes through `Span::edit`.
///
/// The spans of a unit are written one after another into one buffer (`apply` sizes it), and
/// each is split off frozen: one allocation per unit instead of one per span. The unit travels
/// and is decided as one piece, so its spans also live about as long as each other.
struct Appender<'a> {
    buf: &'a mut BytesMut,
}

/// Room for the fields a unit appends to one span (ids, order, via, tap side).
const APPEND_SLACK: usize = 160;

impl<'a> Appender<'a> {
    fn new(span: &Span, buf: &'a mut BytesMut) -> Appender<'a> {
        buf.reserve(span.raw.len() + APPEND_SLACK);
        buf.extend_from_slice(&span.raw);
        Appender { buf }
    }
    fn trace_id(&mut self, t: [u8; 16]) {
        put_len_field(&mut self.buf, 1, &t);
    }
    fn parent(&mut self, p: SpanId) {
        put_len_field(&mut self.buf, 4, &p.0);
    }
    /// `KeyValue { key, value: AnyValue { string_value } }` as attribute field 9.
    fn attr_str(&mut self, key: &str, v: &str) {
        let any = len_field_size(1, v.len());
        let kv = len_field_size(1, key.len()) + len_field_size(2, any);
        put_len_header(&mut self.buf, 9, kv);
        put_len_field(&mut self.buf, 1, key.as_bytes());
        put_len_header(&mut self.buf, 2, any);
        put_len_field(&mut self.buf, 1, v.as_bytes());
    }
    fn attr_int(&mut self, key: &str, v: i64) {
        let any = 1 + varint_len(v as u64);
        let kv = len_field_size(1, key.len()) + len_field_size(2, any);
        put_len_header(&mut self.buf, 9, kv);
        put_len_field(&mut self.buf, 1, key.as_bytes());
        put_len_header(&mut self.buf, 2, any);
        put_varint(&mut self.buf, 3 << 3);
        put_varint(&mut self.buf, v as u64);
    }
    fn attr_strs(&mut self, key: &str, vs: impl Iterator<Item = String>) {
        let mut arr = Vec::new();
        for v in vs {
            put_len_header(&mut arr, 1, len_field_size(1, v.len()));
            put_len_field(&mut arr, 1, v.as_bytes());
        }
        let any = len_field_size(5, arr.len());
        let kv = len_field_size(1, key.len()) + len_field_size(2, any);
        put_len_header(&mut self.buf, 9, kv);
        put_len_field(&mut self.buf, 1, key.as_bytes());
        put_len_header(&mut self.buf, 2, any);
        put_len_field(&mut self.buf, 5, &arr);
    }
    fn finish(self) -> bytes::Bytes {
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
    use tailweave_core::Scope;

    #[test]
    fn hex16_matches_the_core_hex() {
        let id: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0xa5);
        let mut buf = [0u8; 32];
        assert_eq!(hex16(&id, &mut buf), hex(&id));
    }

    #[test]
    fn appended_fields_decode_as_a_rewrite() {
        let p = ProtoSpan {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "x".into(),
            attributes: vec![kv_str("a", "b".into())],
            ..Default::default()
        };
        let span = Span::from_proto(std::sync::Arc::new(Scope::default()), &p);
        let mut buf = BytesMut::new();
        let mut f = Appender::new(&span, &mut buf);
        f.trace_id([9; 16]);
        f.parent(SpanId([7; 8]));
        f.attr_str(VIA, "tcp_seq");
        f.attr_int(ORDER, -3);
        f.attr_int("big", i64::MAX);
        f.attr_strs(
            MERGED_SPAN_IDS,
            ["00aa".to_string(), "00bb".to_string()].into_iter(),
        );
        let out = Span::from_raw(span.scope.clone(), f.finish()).unwrap();
        let got = out.decode().unwrap();
        let mut want = p.clone();
        want.trace_id = vec![9; 16];
        want.parent_span_id = vec![7; 8];
        want.attributes.push(kv_str(VIA, "tcp_seq".into()));
        want.attributes
            .push(kv(ORDER, any_value::Value::IntValue(-3)));
        want.attributes
            .push(kv("big", any_value::Value::IntValue(i64::MAX)));
        want.attributes.push(kv_strs(
            MERGED_SPAN_IDS,
            ["00aa".to_string(), "00bb".to_string()],
        ));
        assert_eq!(got, want);
        // The header parser agrees (last value wins).
        assert_eq!(out.parent_span_id, SpanId([7; 8]));
        assert_eq!(out.trace_id.0, [9; 16]);
    }
}
