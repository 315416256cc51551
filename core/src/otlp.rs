//! OTLP trace requests: zero-copy decoding into [`Span`]s and re-framing spans into requests.
//!
//! `decode_request` walks `ExportTraceServiceRequest` bytes once. Each span becomes a slice of the
//! request buffer plus its parsed header; resources and scopes are shared by `Arc`. Spans with an
//! invalid trace or span id are refused one by one (OTLP partial success) and the rest pass.
//! `encode_request` writes spans back under their resource and scope without re-encoding them.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use crate::span::{parse_span_header, Resource, Scope, Span};
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
        check_message(resource_raw, 0, limits.max_value_depth).map_err(at)?;
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
    check_message(scope_raw, 0, limits.max_value_depth)?;
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
        let h = match parse_span_header(sb) {
            Ok(h) => h,
            Err(e) => {
                out.reject(RejectReason::Malformed, || format!("span is malformed: {e}"));
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
        match check_span(sb, limits) {
            Ok(()) => {}
            Err(r) => {
                out.reject(r, || format!("span {}: {}", h.span_id, r.as_str()));
                continue;
            }
        }
        out.spans
            .push(Span::with_header(scope.clone(), wire::slice_ref(buf, sb), &h));
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

/// Checks a span's nested messages are well formed, so what we forward decodes downstream.
fn check_span(sb: &[u8], limits: &DecodeLimits) -> Result<(), RejectReason> {
    let mut attrs = 0usize;
    for f in Reader::new(sb) {
        let (field, v, _) = f.map_err(|_| RejectReason::Malformed)?;
        if let Value::Len(b) = v {
            match field {
                9 => {
                    attrs += 1;
                    if attrs > limits.max_attributes_per_span {
                        return Err(RejectReason::TooManyAttributes);
                    }
                    check_key_value(b, 0, limits.max_value_depth)?;
                }
                11 | 13 | 15 => check_message(b, 0, limits.max_value_depth).map_err(|e| {
                    if matches!(e, WireError::TooDeep(_)) {
                        RejectReason::TooDeep
                    } else {
                        RejectReason::Malformed
                    }
                })?,
                _ => {}
            }
        }
    }
    Ok(())
}

fn check_key_value(b: &[u8], depth: usize, max: usize) -> Result<(), RejectReason> {
    check_message(b, depth, max).map_err(|e| match e {
        WireError::TooDeep(_) => RejectReason::TooDeep,
        _ => RejectReason::Malformed,
    })
}

/// Walks a message generically: every length-delimited field that itself parses as a message is
/// walked too (bounded by `max` levels), so truncation anywhere is found. Strings that happen to
/// parse as messages are harmless to walk.
fn check_message(b: &[u8], depth: usize, max: usize) -> Result<(), WireError> {
    if depth > max {
        return Err(WireError::TooDeep(max));
    }
    for f in Reader::new(b) {
        let (_, v, _) = f?;
        if let Value::Len(inner) = v {
            // Only recurse where the bytes look like a message; a string or bytes field that does
            // not parse is legal and stays unchecked.
            if !inner.is_empty() && Reader::new(inner).all(|r| r.is_ok()) {
                if let Err(WireError::TooDeep(m)) = check_message(inner, depth + 1, max) {
                    return Err(WireError::TooDeep(m));
                }
            }
        }
    }
    Ok(())
}

/// Encodes spans as an `ExportTraceServiceRequest`, grouped under their resource and scope
/// (first-appearance order), copying each span's bytes once.
pub fn encode_request(spans: &[Span]) -> Bytes {
    // Group: resources in first-seen order, each with scopes in first-seen order.
    struct ScopeGroup<'a> {
        scope: &'a Scope,
        spans: Vec<&'a Span>,
        body: usize,
    }
    struct ResGroup<'a> {
        res: &'a Resource,
        scopes: Vec<ScopeGroup<'a>>,
        body: usize,
    }
    let mut groups: Vec<ResGroup> = Vec::new();
    for s in spans {
        let rp = Arc::as_ptr(&s.scope.resource);
        let gi = match groups.iter().rposition(|g| std::ptr::eq(g.res, rp)) {
            Some(i) => i,
            None => {
                groups.push(ResGroup {
                    res: &s.scope.resource,
                    scopes: Vec::new(),
                    body: 0,
                });
                groups.len() - 1
            }
        };
        let g = &mut groups[gi];
        let sp = Arc::as_ptr(&s.scope);
        match g.scopes.iter().rposition(|x| std::ptr::eq(x.scope, sp)) {
            Some(i) => g.scopes[i].spans.push(s),
            None => g.scopes.push(ScopeGroup {
                scope: &s.scope,
                spans: vec![s],
                body: 0,
            }),
        }
    }
    let mut total = 0usize;
    for g in &mut groups {
        let mut body = len_field_size(1, g.res.raw.len());
        if !g.res.schema_url.is_empty() {
            body += len_field_size(3, g.res.schema_url.len());
        }
        for sg in &mut g.scopes {
            let mut sbody = len_field_size(1, sg.scope.raw.len());
            if !sg.scope.schema_url.is_empty() {
                sbody += len_field_size(3, sg.scope.schema_url.len());
            }
            for s in &sg.spans {
                sbody += len_field_size(2, s.raw.len());
            }
            sg.body = sbody;
            body += len_field_size(2, sbody);
        }
        g.body = body;
        total += len_field_size(1, body);
    }
    let mut out = BytesMut::with_capacity(total);
    for g in &groups {
        put_len_header(&mut out, 1, g.body);
        put_len_field(&mut out, 1, &g.res.raw);
        for sg in &g.scopes {
            put_len_header(&mut out, 2, sg.body);
            put_len_field(&mut out, 1, &sg.scope.raw);
            for s in &sg.spans {
                put_len_field(&mut out, 2, &s.raw);
            }
            if !sg.scope.schema_url.is_empty() {
                put_len_field(&mut out, 3, &sg.scope.schema_url);
            }
        }
        if !g.res.schema_url.is_empty() {
            put_len_field(&mut out, 3, &g.res.schema_url);
        }
    }
    debug_assert_eq!(out.len(), total);
    out.freeze()
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
        assert!(decode_request(Bytes::from_static(b"not protobuf at all"), &DecodeLimits::default()).is_err());
    }

    #[test]
    fn json_roundtrip() {
        let r = req(vec![span(0xab, 0xcd)]);
        let j = serde_json::to_vec(&r).unwrap();
        let d = decode_json_request(&j, &DecodeLimits::default()).unwrap();
        assert_eq!(d.spans[0].trace_id.to_hex(), "ab".repeat(16));
    }
}
