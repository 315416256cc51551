//! OTLP trace requests: zero-copy decoding into [`Span`]s and re-framing spans into requests.
//!
//! `decode_request` walks `ExportTraceServiceRequest` bytes once. Each span becomes a slice of the
//! request buffer plus its parsed header; resources and scopes are shared by `Arc`. Spans with an
//! invalid trace or span id are refused one by one (OTLP partial success) and the rest pass.
//! `encode_request` writes spans back under their resource and scope without re-encoding them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::span::{Resource, Scope, Span, SpanHeader};
use crate::wire::{self, len_field_size, put_len_field, put_len_header, Reader, Value, WireError};

/// Limits applied while decoding one request.
#[derive(Clone, Debug)]
pub struct DecodeLimits {
    /// Spans per request; beyond it the request is refused.
    pub max_spans_per_request: usize,
    /// Attributes per span; a span over it is refused.
    pub max_attributes_per_span: usize,
    /// Nesting depth of `AnyValue` arrays and maps.
    pub max_value_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_spans_per_request: 1_000_000,
            max_attributes_per_span: 10_000,
            max_value_depth: 32,
        }
    }
}

/// Why a whole request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed ExportTraceServiceRequest: {0}")]
    Wire(#[from] WireError),
    #[error("malformed ExportTraceServiceRequest: {path}: {source}")]
    At { path: String, source: WireError },
    #[error("request holds more than {0} spans")]
    TooManySpans(usize),
    #[error("malformed OTLP/JSON body: {0}")]
    Json(String),
}

/// Why one span was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidTraceId,
    InvalidSpanId,
    InvalidParentSpanId,
    Malformed,
    TooManyAttributes,
    TooDeep,
}

impl RejectReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::InvalidTraceId => "invalid_trace_id",
            RejectReason::InvalidSpanId => "invalid_span_id",
            RejectReason::InvalidParentSpanId => "invalid_parent_span_id",
            RejectReason::Malformed => "malformed_span",
            RejectReason::TooManyAttributes => "too_many_attributes",
            RejectReason::TooDeep => "value_too_deep",
        }
    }
}

/// The outcome of decoding one request.
#[derive(Debug, Default)]
pub struct Decoded {
    pub spans: Vec<Span>,
    /// Refused spans, by reason, in first-seen order.
    pub rejected: Vec<(RejectReason, u64)>,
    /// Human-readable description of the first refusal.
    pub first_error: Option<String>,
}

impl Decoded {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }
    fn reject(&mut self, r: RejectReason, msg: impl FnOnce() -> String) {
        if let Some(e) = self.rejected.iter_mut().find(|(k, _)| *k == r) {
            e.1 += 1;
        } else {
            self.rejected.push((r, 1));
        }
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }
    /// The OTLP `partial_success.error_message`.
    pub fn partial_message(&self) -> String {
        let counts: Vec<String> = self
            .rejected
            .iter()
            .map(|(r, n)| format!("{n} {}", r.as_str()))
            .collect();
        format!(
            "{} span(s) refused ({}); first: {}",
            self.rejected_total(),
            counts.join(", "),
            self.first_error.as_deref().unwrap_or("")
        )
    }
}

/// Decodes an `ExportTraceServiceRequest` without copying span bytes.
pub fn decode_request(buf: Bytes, limits: &DecodeLimits) -> Result<Decoded, DecodeError> {
    let mut out = Decoded::default();
    for (ri, f) in Reader::new(&buf).enumerate() {
        let (field, v, _) = f?;
        let Value::Len(rs) = v else { continue };
        if field != 1 {
            continue;
        }
        let at = |e: WireError| DecodeError::At {
            path: format!("resource_spans[{ri}]"),
            source: e,
        };
        let mut resource_raw: &[u8] = &[];
        let mut schema: &[u8] = &[];
        for f in Reader::new(rs) {
            match f.map_err(at)? {
                (1, Value::Len(b), _) => resource_raw = b,
                (3, Value::Len(b), _) => schema = b,
                _ => {}
            }
        }
        check_nested(resource_raw, Msg::Resource, 0, limits.max_value_depth).map_err(at)?;
        let resource = Resource::new(
            wire::slice_ref(&buf, resource_raw),
            wire::slice_ref(&buf, schema),
        );
        for (si, f) in Reader::new(rs).enumerate() {
            let (field, v, _) = f.map_err(at)?;
            let (2, Value::Len(ss)) = (field, v) else {
                continue;
            };
            decode_scope_spans(&buf, ss, &resource, limits, &mut out).map_err(|e| {
                DecodeError::At {
                    path: format!("resource_spans[{ri}].scope_spans[{si}]"),
                    source: e,
                }
            })?;
            if out.spans.len() > limits.max_spans_per_request {
                return Err(DecodeError::TooManySpans(limits.max_spans_per_request));
            }
        }
    }
    Ok(out)
}

fn decode_scope_spans(
    buf: &Bytes,
    ss: &[u8],
    resource: &Arc<Resource>,
    limits: &DecodeLimits,
    out: &mut Decoded,
) -> Result<(), WireError> {
    let mut scope_raw: &[u8] = &[];
    let mut schema: &[u8] = &[];
    for f in Reader::new(ss) {
        match f? {
            (1, Value::Len(b), _) => scope_raw = b,
            (3, Value::Len(b), _) => schema = b,
            _ => {}
        }
    }
    check_nested(scope_raw, Msg::Scope, 0, limits.max_value_depth)?;
    let scope = Scope::new(
        resource.clone(),
        wire::slice_ref(buf, scope_raw),
        wire::slice_ref(buf, schema),
    );
    for f in Reader::new(ss) {
        let (field, v, _) = f?;
        let (2, Value::Len(sb)) = (field, v) else {
            continue;
        };
        let (h, checked) = match scan_span(sb, limits) {
            Ok(r) => r,
            Err(e) => {
                out.reject(RejectReason::Malformed, || {
                    format!("span is malformed: {e}")
                });
                continue;
            }
        };
        if h.trace_id_len != 16 || h.trace_id.is_zero() {
            out.reject(RejectReason::InvalidTraceId, || {
                format!(
                    "span {}: trace_id must be 16 bytes and not all zero (got {} bytes)",
                    crate::span::hex(&sb_span_id(sb)),
                    h.trace_id_len
                )
            });
            continue;
        }
        if h.span_id_len != 8 || h.span_id.is_zero() {
            out.reject(RejectReason::InvalidSpanId, || {
                format!(
                    "span in trace {}: span_id must be 8 bytes and not all zero (got {} bytes)",
                    h.trace_id, h.span_id_len
                )
            });
            continue;
        }
        if h.parent_len != 0 && h.parent_len != 8 {
            out.reject(RejectReason::InvalidParentSpanId, || {
                format!(
                    "span {}: parent_span_id must be empty or 8 bytes (got {} bytes)",
                    h.span_id, h.parent_len
                )
            });
            continue;
        }
        if let Err(r) = checked {
            out.reject(r, || format!("span {}: {}", h.span_id, r.as_str()));
            continue;
        }
        out.spans.push(Span::with_header(
            scope.clone(),
            wire::slice_ref(buf, sb),
            &h,
        ));
    }
    Ok(())
}

fn sb_span_id(sb: &[u8]) -> Vec<u8> {
    Reader::new(sb)
        .map_while(Result::ok)
        .find(|(f, _, _)| *f == 2)
        .and_then(|(_, v, _)| v.as_bytes())
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

/// Reads a span's header and checks the span is well formed (so what we forward decodes
/// downstream), in one walk of its fields. A field that does not parse is the header's error
/// (`Err`); otherwise the first problem of the check, in field order.
fn scan_span(
    sb: &[u8],
    limits: &DecodeLimits,
) -> Result<(SpanHeader, Result<(), RejectReason>), WireError> {
    let mut h = SpanHeader::default();
    let mut checked = Ok(());
    let mut attrs = 0usize;
    for f in Reader::new(sb) {
        let (field, v, _) = f?;
        h.read_field(field, v)?;
        if checked.is_err() {
            continue;
        }
        if !Msg::Span.wire_type_ok(field, v) {
            checked = Err(RejectReason::Malformed);
            continue;
        }
        let Value::Len(b) = v else { continue };
        checked = match field {
            9 => {
                attrs += 1;
                if attrs > limits.max_attributes_per_span {
                    Err(RejectReason::TooManyAttributes)
                } else {
                    check_value(b, Msg::KeyValue, 0, limits.max_value_depth)
                }
            }
            11 => check_value(b, Msg::Event, 0, limits.max_value_depth),
            13 => check_value(b, Msg::Link, 0, limits.max_value_depth),
            15 => check_value(b, Msg::Status, 0, limits.max_value_depth),
            _ => Ok(()),
        };
    }
    Ok((h, checked))
}

fn check_value(b: &[u8], msg: Msg, depth: usize, max: usize) -> Result<(), RejectReason> {
    check_nested(b, msg, depth, max).map_err(|e| match e {
        WireError::TooDeep(_) => RejectReason::TooDeep,
        _ => RejectReason::Malformed,
    })
}

/// The OTLP trace messages, for the well-formedness check: which wire type each known field has
/// and which fields hold messages (`opentelemetry-proto` 0.33).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Msg {
    Span,
    Status,
    Event,
    Link,
    Resource,
    EntityRef,
    Scope,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

/// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn wire_type(v: Value<'_>) -> u8 {
    match v {
        Value::Varint(_) => VARINT,
        Value::Fixed64(_) => FIXED64,
        Value::Len(_) => LEN,
        Value::Fixed32(_) => FIXED32,
    }
}

impl Msg {
    /// The wire type of known field `field`; `None` for a field this version does not know.
    #[inline]
    fn wire_type(self, field: u32) -> Option<u8> {
        use Msg::*;
        Some(match (self, field) {
            (Span, 1..=5 | 9 | 11 | 13 | 15) => LEN,
            (Span, 6 | 10 | 12 | 14) => VARINT,
            (Span, 7 | 8) => FIXED64,
            (Span, 16) => FIXED32,
            (Status, 2) => LEN,
            (Status, 3) => VARINT,
            (Event, 1) => FIXED64,
            (Event, 2 | 3) => LEN,
            (Event, 4) => VARINT,
            (Link, 1..=4) => LEN,
            (Link, 5) => VARINT,
            (Link, 6) => FIXED32,
            (Resource, 1 | 3) => LEN,
            (Resource, 2) => VARINT,
            (EntityRef, 1..=4) => LEN,
            (Scope, 1..=3) => LEN,
            (Scope, 4) => VARINT,
            (KeyValue, 1 | 2) => LEN,
            (KeyValue, 3) => VARINT,
            (AnyValue, 1 | 5..=7) => LEN,
            (AnyValue, 2 | 3 | 8) => VARINT,
            (AnyValue, 4) => FIXED64,
            (ArrayValue | KeyValueList, 1) => LEN,
            _ => return None,
        })
    }

    #[inline]
    fn wire_type_ok(self, field: u32, v: Value<'_>) -> bool {
        self.wire_type(field).is_none_or(|w| w == wire_type(v))
    }

    /// The message type of `field`, if it holds one (the status and the span's own attribute,
    /// event and link lists are checked by `scan_span`).
    #[inline]
    fn child(self, field: u32) -> Option<Msg> {
        use Msg::*;
        match (self, field) {
            (Resource, 1) | (Scope, 3) | (Event, 3) | (Link, 4) | (KeyValueList, 1) => {
                Some(KeyValue)
            }
            (Resource, 3) => Some(EntityRef),
            (KeyValue, 2) | (ArrayValue, 1) => Some(AnyValue),
            (AnyValue, 5) => Some(ArrayValue),
            (AnyValue, 6) => Some(KeyValueList),
            _ => None,
        }
    }
}

/// Checks that `b` is a well-formed `msg` and so are the messages it holds, nested at most `max`
/// levels below `depth` (every message level counts: an attribute one array deep is a
/// `KeyValue`, an `AnyValue`, an `ArrayValue` and an `AnyValue`). Known fields must have their
/// wire type, as for a full decoder; strings and bytes are not looked into, and unknown fields
/// are skipped, as protobuf does. (String contents are not checked for UTF-8.)
fn check_nested(b: &[u8], msg: Msg, depth: usize, max: usize) -> Result<(), WireError> {
    if depth > max {
        return Err(WireError::TooDeep(max));
    }
    for f in Reader::new(b) {
        let (field, v, at) = f?;
        if !msg.wire_type_ok(field, v) {
            return Err(WireError::BadWireType {
                field,
                wire_type: wire_type(v),
                at,
            });
        }
        if let (Some(child), Value::Len(inner)) = (msg.child(field), v) {
            if !inner.is_empty() {
                check_nested(inner, child, depth + 1, max)?;
            }
        }
    }
    Ok(())
}

/// Encodes spans as an `ExportTraceServiceRequest`, grouped under their resource and scope
/// (first-appearance order), copying each span's bytes once.
pub fn encode_request(spans: &[Span]) -> Bytes {
    // Groups are found by `Arc` identity. The spans of one scope usually come in a run, so the
    // last group is tried first; otherwise a map finds it (a trace's spans interleave a few
    // scopes, and a sampler's output holds thousands: a scan per span would be quadratic).
    struct ScopeGroup<'a> {
        scope: &'a Scope,
        res: u32,
        spans: u32,
        body: usize,
    }
    struct ResGroup<'a> {
        res: &'a Resource,
        scopes: u32,
        body: usize,
    }
    let mut scopes: Vec<ScopeGroup> = Vec::new();
    let mut resources: Vec<ResGroup> = Vec::new();
    let mut scope_at: HashMap<usize, u32, PtrHash> = HashMap::default();
    let mut res_at: HashMap<usize, u32, PtrHash> = HashMap::default();
    let mut group_of: Vec<u32> = Vec::with_capacity(spans.len());
    let mut last: Option<(usize, u32)> = None;
    for s in spans {
        let sp = Arc::as_ptr(&s.scope) as usize;
        let gi = match last {
            Some((p, gi)) if p == sp => gi,
            _ => {
                let gi = *scope_at.entry(sp).or_insert_with(|| {
                    let rp = Arc::as_ptr(&s.scope.resource) as usize;
                    let ri = *res_at.entry(rp).or_insert_with(|| {
                        resources.push(ResGroup {
                            res: &s.scope.resource,
                            scopes: 0,
                            body: 0,
                        });
                        (resources.len() - 1) as u32
                    });
                    resources[ri as usize].scopes += 1;
                    scopes.push(ScopeGroup {
                        scope: &s.scope,
                        res: ri,
                        spans: 0,
                        body: 0,
                    });
                    (scopes.len() - 1) as u32
                });
                last = Some((sp, gi));
                gi
            }
        };
        let g = &mut scopes[gi as usize];
        g.spans += 1;
        g.body += len_field_size(2, s.raw.len());
        group_of.push(gi);
    }
    for g in &mut resources {
        g.body = len_field_size(1, g.res.raw.len());
        if !g.res.schema_url.is_empty() {
            g.body += len_field_size(3, g.res.schema_url.len());
        }
    }
    for sg in &mut scopes {
        sg.body += len_field_size(1, sg.scope.raw.len());
        if !sg.scope.schema_url.is_empty() {
            sg.body += len_field_size(3, sg.scope.schema_url.len());
        }
        resources[sg.res as usize].body += len_field_size(2, sg.body);
    }
    let total: usize = resources.iter().map(|g| len_field_size(1, g.body)).sum();
    // Scope groups by resource, spans by scope group: stable counting sorts, so first-seen order
    // holds at both levels.
    let scope_order = counting_sort(
        scopes.iter().map(|g| g.res),
        resources.iter().map(|g| g.scopes),
    );
    let span_order = counting_sort(group_of.iter().copied(), scopes.iter().map(|g| g.spans));
    // Where each scope group's spans start in `span_order` (scope groups in first-seen order,
    // which is not the order they are written in once grouped by resource).
    let span_start: Vec<usize> = scopes
        .iter()
        .scan(0usize, |acc, g| {
            let at = *acc;
            *acc += g.spans as usize;
            Some(at)
        })
        .collect();
    let mut out = BytesMut::with_capacity(total);
    let mut next_scope = 0usize;
    for g in &resources {
        put_len_header(&mut out, 1, g.body);
        put_len_field(&mut out, 1, &g.res.raw);
        for &si in &scope_order[next_scope..next_scope + g.scopes as usize] {
            let sg = &scopes[si as usize];
            put_len_header(&mut out, 2, sg.body);
            put_len_field(&mut out, 1, &sg.scope.raw);
            let at = span_start[si as usize];
            for &i in &span_order[at..at + sg.spans as usize] {
                put_len_field(&mut out, 2, &spans[i as usize].raw);
            }
            if !sg.scope.schema_url.is_empty() {
                put_len_field(&mut out, 3, &sg.scope.schema_url);
            }
        }
        next_scope += g.scopes as usize;
        if !g.res.schema_url.is_empty() {
            put_len_field(&mut out, 3, &g.res.schema_url);
        }
    }
    debug_assert_eq!(out.len(), total);
    out.freeze()
}

/// The positions of `keys` ordered by key, stable; `counts[k]` is how many times `k` occurs.
fn counting_sort(
    keys: impl ExactSizeIterator<Item = u32>,
    counts: impl Iterator<Item = u32>,
) -> Vec<u32> {
    let mut next: Vec<u32> = counts
        .scan(0u32, |acc, c| {
            let at = *acc;
            *acc += c;
            Some(at)
        })
        .collect();
    let mut order = vec![0u32; keys.len()];
    for (i, k) in keys.enumerate() {
        let slot = &mut next[k as usize];
        order[*slot as usize] = i as u32;
        *slot += 1;
    }
    order
}

/// Hashes `Arc` addresses: distinct live allocations, so a multiply spreads them well enough.
#[derive(Default, Clone, Copy)]
struct PtrHash;

impl std::hash::BuildHasher for PtrHash {
    type Hasher = PtrHasher;
    fn build_hasher(&self) -> PtrHasher {
        PtrHasher(0)
    }
}

struct PtrHasher(u64);

impl std::hash::Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, v: usize) {
        self.0 = (v as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}

/// Spans as a full proto request (for JSON output and tests).
pub fn to_proto_request(spans: &[Span]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest::decode(encode_request(spans))
        .expect("encode_request writes valid protobuf")
}

/// Reads a full proto request into spans, with the same validation as the wire path.
pub fn from_proto_request(
    req: &ExportTraceServiceRequest,
    limits: &DecodeLimits,
) -> Result<Decoded, DecodeError> {
    decode_request(Bytes::from(req.encode_to_vec()), limits)
}

/// Decodes an OTLP/JSON body (hex ids, enums as integers or names are accepted by the proto serde).
pub fn decode_json_request(body: &[u8], limits: &DecodeLimits) -> Result<Decoded, DecodeError> {
    let req: ExportTraceServiceRequest =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    from_proto_request(&req, limits)
}

/// Encodes spans as an OTLP/JSON body.
pub fn encode_json_request(spans: &[Span]) -> Vec<u8> {
    serde_json::to_vec(&to_proto_request(spans)).expect("proto request serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource as PR;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as PS};

    fn span(tid: u8, sid: u8) -> PS {
        PS {
            trace_id: vec![tid; 16],
            span_id: vec![sid; 8],
            name: format!("s{sid}"),
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            ..Default::default()
        }
    }

    fn req(spans: Vec<PS>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(PR::default()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lib".into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: "s".into(),
                }],
                schema_url: "r".into(),
            }],
        }
    }

    #[test]
    fn roundtrip_is_exact() {
        let r = req(vec![span(1, 1), span(1, 2), span(2, 3)]);
        let d = from_proto_request(&r, &DecodeLimits::default()).unwrap();
        assert_eq!(d.spans.len(), 3);
        assert_eq!(to_proto_request(&d.spans), r);
    }

    #[test]
    fn invalid_ids_refused_one_by_one() {
        let mut bad = span(1, 9);
        bad.trace_id = vec![0; 16];
        let mut short = span(1, 8);
        short.span_id = vec![1, 2];
        let r = req(vec![span(1, 1), bad, short, span(1, 2)]);
        let d = from_proto_request(&r, &DecodeLimits::default()).unwrap();
        assert_eq!(d.spans.len(), 2);
        assert_eq!(d.rejected_total(), 2);
        assert!(d.partial_message().contains("invalid_trace_id"));
    }

    #[test]
    fn truncated_request_is_an_error() {
        let b = req(vec![span(1, 1)]).encode_to_vec();
        let cut = Bytes::copy_from_slice(&b[..b.len() - 3]);
        assert!(decode_request(cut, &DecodeLimits::default()).is_err());
        assert!(decode_request(
            Bytes::from_static(b"not protobuf at all"),
            &DecodeLimits::default()
        )
        .is_err());
    }

    #[test]
    fn encode_groups_interleaved_spans_by_resource_then_scope_in_first_seen_order() {
        let r1 = Resource::new(Bytes::from_static(b"\x0a\x00"), Bytes::from_static(b"r1"));
        let r2 = Resource::new(Bytes::new(), Bytes::new());
        let s1 = Scope::new(r1.clone(), Bytes::from_static(b"\x0a\x01a"), Bytes::new());
        let s2 = Scope::new(r2.clone(), Bytes::new(), Bytes::from_static(b"s2"));
        let s3 = Scope::new(r1.clone(), Bytes::from_static(b"\x0a\x01c"), Bytes::new());
        let mk = |sc: &Arc<Scope>, sid: u8| Span::from_proto(sc.clone(), &span(1, sid));
        let spans = vec![
            mk(&s1, 1),
            mk(&s2, 2),
            mk(&s3, 3),
            mk(&s1, 4),
            mk(&s2, 5),
            mk(&s3, 6),
        ];
        let got = to_proto_request(&spans);
        let ids = |rs: usize, ss: usize| -> Vec<u8> {
            got.resource_spans[rs].scope_spans[ss]
                .spans
                .iter()
                .map(|s| s.span_id[0])
                .collect()
        };
        assert_eq!(got.resource_spans.len(), 2);
        assert_eq!(got.resource_spans[0].schema_url, "r1");
        assert_eq!(got.resource_spans[0].scope_spans.len(), 2);
        assert_eq!(
            got.resource_spans[0].scope_spans[0]
                .scope
                .as_ref()
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(
            got.resource_spans[0].scope_spans[1]
                .scope
                .as_ref()
                .unwrap()
                .name,
            "c"
        );
        assert_eq!(ids(0, 0), vec![1, 4]);
        assert_eq!(ids(0, 1), vec![3, 6]);
        assert_eq!(got.resource_spans[1].scope_spans[0].schema_url, "s2");
        assert_eq!(ids(1, 0), vec![2, 5]);
        assert!(encode_request(&[]).is_empty());
    }

    #[test]
    fn nesting_limit_counts_message_levels_only() {
        use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
        // An attribute whose value is `levels` arrays deep.
        let nested = |levels: usize| {
            let mut v = AnyValue {
                value: Some(any_value::Value::StringValue("leaf".into())),
            };
            for _ in 0..levels {
                v = AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
                };
            }
            let mut s = span(1, 1);
            s.attributes.push(KeyValue {
                key: "k".into(),
                value: Some(v),
                ..Default::default()
            });
            req(vec![s])
        };
        let limits = DecodeLimits {
            max_value_depth: 8,
            ..DecodeLimits::default()
        };
        let fits = (0..20)
            .take_while(|&n| {
                from_proto_request(&nested(n), &limits)
                    .unwrap()
                    .rejected
                    .is_empty()
            })
            .count();
        assert!((2..20).contains(&fits), "{fits}");
        let d = from_proto_request(&nested(fits), &limits).unwrap();
        assert_eq!(d.rejected, vec![(RejectReason::TooDeep, 1)]);
        // A string value that is not a message is never walked.
        let mut s = span(1, 2);
        s.name = "\u{7}\u{7}".into();
        assert_eq!(
            from_proto_request(&req(vec![s]), &limits)
                .unwrap()
                .spans
                .len(),
            1
        );
    }

    /// A span with every nested message type: attributes of each value kind (arrays and maps
    /// nested), events and links with attributes, a status; under a resource and scope with
    /// attributes.
    fn rich_request() -> ExportTraceServiceRequest {
        use opentelemetry_proto::tonic::common::v1::{
            any_value::Value as V, AnyValue, ArrayValue, KeyValue, KeyValueList,
        };
        use opentelemetry_proto::tonic::trace::v1::{span, Status};
        let kv = |k: &str, v: V| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        let mut nested = V::StringValue("leaf".into());
        for i in 0..3 {
            nested = if i % 2 == 0 {
                V::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(nested),
                    }],
                })
            } else {
                V::KvlistValue(KeyValueList {
                    values: vec![kv("in", nested)],
                })
            };
        }
        let attrs = vec![
            kv("s", V::StringValue("GET /x".into())),
            kv("i", V::IntValue(-3)),
            kv("d", V::DoubleValue(0.5)),
            kv("b", V::BoolValue(true)),
            kv("y", V::BytesValue(vec![1, 2, 3])),
            kv("n", nested),
        ];
        let mut s = span(3, 4);
        s.attributes = attrs.clone();
        s.events = vec![span::Event {
            time_unix_nano: 5,
            name: "e".into(),
            attributes: attrs[..2].to_vec(),
            dropped_attributes_count: 1,
        }];
        s.links = vec![span::Link {
            trace_id: vec![9; 16],
            span_id: vec![8; 8],
            trace_state: "a=b".into(),
            attributes: attrs[2..4].to_vec(),
            dropped_attributes_count: 2,
            flags: 1,
        }];
        s.status = Some(Status {
            message: "bad".into(),
            code: 2,
        });
        s.flags = 0x101;
        let mut r = req(vec![s, span(3, 5)]);
        r.resource_spans[0].resource = Some(PR {
            attributes: attrs[..3].to_vec(),
            ..Default::default()
        });
        if let Some(sc) = r.resource_spans[0].scope_spans[0].scope.as_mut() {
            sc.attributes = attrs[3..].to_vec();
        }
        r
    }

    /// What the check accepts, a full decoder decodes (strings aside: their UTF-8 is not
    /// checked), on requests mutated at random.
    #[test]
    fn accepted_spans_decode_in_full_on_mutated_requests() {
        let base = rich_request().encode_to_vec();
        let clean = decode_request(Bytes::from(base.clone()), &DecodeLimits::default()).unwrap();
        assert_eq!((clean.spans.len(), clean.rejected_total()), (2, 0));
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut accepted, mut refused, mut utf8) = (0, 0, 0);
        let mut disagreements = Vec::new();
        for round in 0..4000 {
            let mut b = base.clone();
            for _ in 0..(1 + round % 3) {
                let i = (rnd() as usize) % b.len();
                b[i] = rnd() as u8;
            }
            let limits = DecodeLimits {
                max_value_depth: [1, 3, 8, 32][round % 4],
                ..DecodeLimits::default()
            };
            let Ok(d) = decode_request(Bytes::from(b), &limits) else {
                continue;
            };
            refused += d.rejected_total();
            for s in &d.spans {
                let full = [
                    PS::decode(s.raw.clone()).err(),
                    PR::decode(s.resource().raw.clone()).err(),
                    InstrumentationScope::decode(s.scope.raw.clone()).err(),
                ];
                match full.iter().flatten().next() {
                    None => accepted += 1,
                    Some(e) if e.to_string().contains("UTF-8") => utf8 += 1,
                    Some(e) => disagreements.push((round, e.to_string())),
                }
            }
        }
        assert!(
            disagreements.is_empty(),
            "{} accepted spans do not decode, e.g. {:?}",
            disagreements.len(),
            &disagreements[..disagreements.len().min(3)]
        );
        // The mutations must exercise both answers.
        assert!(
            accepted > 500 && refused > 200,
            "{accepted} {refused} {utf8}"
        );
    }

    #[test]
    fn json_roundtrip() {
        let r = req(vec![span(0xab, 0xcd)]);
        let j = serde_json::to_vec(&r).unwrap();
        let d = decode_json_request(&j, &DecodeLimits::default()).unwrap();
        assert_eq!(d.spans[0].trace_id.to_hex(), "ab".repeat(16));
    }
}
