//! The span as tailweave holds it: the encoded bytes as received plus the few parsed fields that
//! routing, the join and the sampler read.
//!
//! A span keeps its `raw` protobuf bytes (a zero-copy slice of the request buffer) and shares its
//! resource and scope through an `Arc`, so buffering a span costs its encoded size plus one small
//! header. Only the stages that must change a span (the join's parent rewrite, propagated attributes)
//! decode it into the full `opentelemetry-proto` type, edit it, and store the re-encoded bytes.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use prost::Message;

use crate::ebpf::EbpfSpan;
use crate::wire::{Reader, Value, WireError};

/// A 16-byte trace id. All zeros is invalid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id. All zeros means "none".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub const ZERO: TraceId = TraceId([0; 16]);
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
    pub fn from_slice(b: &[u8]) -> Option<TraceId> {
        b.try_into().ok().map(TraceId)
    }
    /// The low 64 bits; trace ids are random, so these bits are the hash.
    pub fn low_u64(&self) -> u64 {
        u64::from_be_bytes(self.0[8..16].try_into().expect("8 bytes"))
    }
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
    pub fn from_hex(s: &str) -> Option<TraceId> {
        let v = unhex(s)?;
        TraceId::from_slice(&v)
    }
}

impl SpanId {
    pub const ZERO: SpanId = SpanId([0; 8]);
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 8]
    }
    pub fn from_slice(b: &[u8]) -> Option<SpanId> {
        b.try_into().ok().map(SpanId)
    }
    pub fn as_u64(&self) -> u64 {
        u64::from_be_bytes(self.0)
    }
    pub fn from_u64(v: u64) -> SpanId {
        SpanId(v.to_be_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
    pub fn from_hex(s: &str) -> Option<SpanId> {
        let v = unhex(s)?;
        SpanId::from_slice(&v)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let val = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    s.chunks(2)
        .map(|p| Some((val(p[0])? << 4) | val(p[1])?))
        .collect()
}

/// OTLP span kind (the proto enum values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum SpanKind {
    #[default]
    Unspecified = 0,
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

impl SpanKind {
    pub fn from_i32(v: i64) -> SpanKind {
        match v {
            1 => SpanKind::Internal,
            2 => SpanKind::Server,
            3 => SpanKind::Client,
            4 => SpanKind::Producer,
            5 => SpanKind::Consumer,
            _ => SpanKind::Unspecified,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            SpanKind::Unspecified => "SPAN_KIND_UNSPECIFIED",
            SpanKind::Internal => "SPAN_KIND_INTERNAL",
            SpanKind::Server => "SPAN_KIND_SERVER",
            SpanKind::Client => "SPAN_KIND_CLIENT",
            SpanKind::Producer => "SPAN_KIND_PRODUCER",
            SpanKind::Consumer => "SPAN_KIND_CONSUMER",
        }
    }
}

/// OTLP status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum StatusCode {
    #[default]
    Unset = 0,
    Ok = 1,
    Error = 2,
}

impl StatusCode {
    pub fn from_i32(v: i64) -> StatusCode {
        match v {
            1 => StatusCode::Ok,
            2 => StatusCode::Error,
            _ => StatusCode::Unset,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            StatusCode::Unset => "STATUS_CODE_UNSET",
            StatusCode::Ok => "STATUS_CODE_OK",
            StatusCode::Error => "STATUS_CODE_ERROR",
        }
    }
}

/// Where a span came from (`ebpf-spans.md` §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SpanSource {
    #[default]
    Sdk,
    Ebpf,
}

/// A resource as received: its encoded `Resource` message and the `ResourceSpans.schema_url`.
/// Shared by every span of the `ResourceSpans` it came in.
#[derive(Debug, Default)]
pub struct Resource {
    pub raw: Bytes,
    pub schema_url: Bytes,
}

impl Resource {
    pub fn new(raw: Bytes, schema_url: Bytes) -> Arc<Resource> {
        Arc::new(Resource { raw, schema_url })
    }
    pub fn from_proto(r: &ProtoResource, schema_url: &str) -> Arc<Resource> {
        Resource::new(
            Bytes::from(r.encode_to_vec()),
            Bytes::copy_from_slice(schema_url.as_bytes()),
        )
    }
    pub fn decode(&self) -> Result<ProtoResource, prost::DecodeError> {
        ProtoResource::decode(self.raw.clone())
    }
    /// Looks up a resource attribute without decoding the resource.
    pub fn attr(&self, key: &str) -> Option<AttrValue<'_>> {
        find_attr(&self.raw, 1, key)
    }
    /// Iterates over every resource attribute.
    pub fn attrs(&self) -> AttrIter<'_> {
        AttrIter::new(&self.raw, 1)
    }
    /// Iterates over every resource attribute as raw key bytes and encoded value, for scans that
    /// compare keys and parse only the values they want.
    pub fn raw_attrs(&self) -> RawAttrIter<'_> {
        RawAttrIter::new(&self.raw, 1)
    }
    pub fn service_name(&self) -> Option<&str> {
        self.attr("service.name").and_then(|v| v.as_str())
    }
}

/// An instrumentation scope as received, with the resource it sits under.
#[derive(Debug, Default)]
pub struct Scope {
    pub resource: Arc<Resource>,
    pub raw: Bytes,
    pub schema_url: Bytes,
}

impl Scope {
    pub fn new(resource: Arc<Resource>, raw: Bytes, schema_url: Bytes) -> Arc<Scope> {
        Arc::new(Scope {
            resource,
            raw,
            schema_url,
        })
    }
    pub fn from_proto(
        resource: Arc<Resource>,
        s: &InstrumentationScope,
        schema_url: &str,
    ) -> Arc<Scope> {
        Scope::new(
            resource,
            Bytes::from(s.encode_to_vec()),
            Bytes::copy_from_slice(schema_url.as_bytes()),
        )
    }
    pub fn decode(&self) -> Result<InstrumentationScope, prost::DecodeError> {
        InstrumentationScope::decode(self.raw.clone())
    }
    /// The scope name (field 1), read from the bytes.
    pub fn name(&self) -> &str {
        Reader::new(&self.raw)
            .filter_map(Result::ok)
            .find(|(f, _, _)| *f == 1)
            .and_then(|(_, v, _)| v.as_bytes())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

/// Per-span marks that travel with the span between stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanMarks {
    /// The join emitted this span after its trace unit (`tailweave.join.late`).
    pub late: bool,
    /// For eBPF spans: the call timed out (`ebpf-spans.md` §7.3). The sampler counts it as an error.
    pub timed_out: bool,
}

/// One span: encoded bytes plus the parsed header.
#[derive(Clone, Debug)]
pub struct Span {
    pub scope: Arc<Scope>,
    /// The encoded `opentelemetry.proto.trace.v1.Span` message.
    pub raw: Bytes,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `SpanId::ZERO` when the span has no parent.
    pub parent_span_id: SpanId,
    pub start_ns: u64,
    pub end_ns: u64,
    pub kind: SpanKind,
    pub status: StatusCode,
    pub source: SpanSource,
    pub marks: SpanMarks,
    /// The normalized eBPF model, for eBPF-derived spans that parsed as such.
    pub ebpf: Option<Box<EbpfSpan>>,
}

/// The parsed header of an encoded span, before it is attached to a scope.
#[derive(Clone, Debug, Default)]
pub struct SpanHeader {
    pub trace_id_len: usize,
    pub span_id_len: usize,
    pub parent_len: usize,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: SpanId,
    pub start_ns: u64,
    pub end_ns: u64,
    pub kind: SpanKind,
    pub status: StatusCode,
}

/// Reads the header fields of an encoded span.
pub fn parse_span_header(raw: &[u8]) -> Result<SpanHeader, WireError> {
    let mut h = SpanHeader::default();
    for f in Reader::new(raw) {
        let (field, v, _) = f?;
        h.read_field(field, v)?;
    }
    Ok(h)
}

impl SpanHeader {
    /// Takes one top-level field of an encoded span into the header (the last occurrence wins,
    /// as in protobuf). Only the status message is looked into; its errors are the span's.
    #[inline]
    pub(crate) fn read_field(&mut self, field: u32, v: Value<'_>) -> Result<(), WireError> {
        match (field, v) {
            (1, Value::Len(b)) => {
                self.trace_id_len = b.len();
                if let Some(t) = TraceId::from_slice(b) {
                    self.trace_id = t;
                }
            }
            (2, Value::Len(b)) => {
                self.span_id_len = b.len();
                if let Some(s) = SpanId::from_slice(b) {
                    self.span_id = s;
                }
            }
            (4, Value::Len(b)) => {
                self.parent_len = b.len();
                if let Some(s) = SpanId::from_slice(b) {
                    self.parent_span_id = s;
                }
            }
            (6, Value::Varint(k)) => self.kind = SpanKind::from_i32(k as i64),
            (7, Value::Fixed64(t)) => self.start_ns = t,
            (8, Value::Fixed64(t)) => self.end_ns = t,
            (15, Value::Len(b)) => {
                for sf in Reader::new(b) {
                    if let (3, Value::Varint(c), _) = sf? {
                        self.status = StatusCode::from_i32(c as i64);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Span {
    /// Builds a span from its encoded bytes. Ids are taken as they are; validation is the receiver's.
    pub fn from_raw(scope: Arc<Scope>, raw: Bytes) -> Result<Span, WireError> {
        let h = parse_span_header(&raw)?;
        Ok(Span::with_header(scope, raw, &h))
    }

    pub fn with_header(scope: Arc<Scope>, raw: Bytes, h: &SpanHeader) -> Span {
        Span {
            scope,
            raw,
            trace_id: h.trace_id,
            span_id: h.span_id,
            parent_span_id: h.parent_span_id,
            start_ns: h.start_ns,
            end_ns: h.end_ns,
            kind: h.kind,
            status: h.status,
            source: SpanSource::Sdk,
            marks: SpanMarks::default(),
            ebpf: None,
        }
    }

    /// Encodes a full proto span.
    pub fn from_proto(scope: Arc<Scope>, p: &ProtoSpan) -> Span {
        let raw = Bytes::from(p.encode_to_vec());
        let h = parse_span_header(&raw).expect("prost output is valid protobuf");
        Span::with_header(scope, raw, &h)
    }

    pub fn resource(&self) -> &Resource {
        &self.scope.resource
    }

    /// Decodes the full span, for stages that rewrite it.
    pub fn decode(&self) -> Result<ProtoSpan, prost::DecodeError> {
        ProtoSpan::decode(self.raw.clone())
    }

    /// Replaces the span with an edited version and refreshes the parsed header.
    /// Source, marks and the eBPF model are kept.
    pub fn set_proto(&mut self, p: &ProtoSpan) {
        let raw = Bytes::from(p.encode_to_vec());
        let h = parse_span_header(&raw).expect("prost output is valid protobuf");
        self.raw = raw;
        self.trace_id = h.trace_id;
        self.span_id = h.span_id;
        self.parent_span_id = h.parent_span_id;
        self.start_ns = h.start_ns;
        self.end_ns = h.end_ns;
        self.kind = h.kind;
        self.status = h.status;
    }

    /// Decodes, lets `f` edit, and re-encodes.
    pub fn edit(&mut self, f: impl FnOnce(&mut ProtoSpan)) -> Result<(), prost::DecodeError> {
        let mut p = self.decode()?;
        f(&mut p);
        self.set_proto(&p);
        Ok(())
    }

    /// The span name, read from the bytes.
    pub fn name(&self) -> &str {
        self.len_field(5)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    /// The W3C trace state string.
    pub fn trace_state(&self) -> &str {
        self.len_field(3)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    fn len_field(&self, field: u32) -> Option<&[u8]> {
        Reader::new(&self.raw)
            .map_while(Result::ok)
            .find(|(f, _, _)| *f == field)
            .and_then(|(_, v, _)| v.as_bytes())
    }

    /// Looks up a span attribute without decoding the span.
    pub fn attr(&self, key: &str) -> Option<AttrValue<'_>> {
        find_attr(&self.raw, 9, key)
    }

    /// Iterates over every span attribute.
    pub fn attrs(&self) -> AttrIter<'_> {
        AttrIter::new(&self.raw, 9)
    }

    /// Iterates over every span attribute as raw key bytes and encoded value (see
    /// [`RawAttrIter`]).
    pub fn raw_attrs(&self) -> RawAttrIter<'_> {
        RawAttrIter::new(&self.raw, 9)
    }

    /// A span attribute, else the resource attribute of the same key.
    pub fn attr_or_resource(&self, key: &str) -> Option<AttrValue<'_>> {
        self.attr(key).or_else(|| self.resource().attr(key))
    }

    pub fn service_name(&self) -> &str {
        self.resource().service_name().unwrap_or("")
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_zero()
    }

    pub fn is_error(&self) -> bool {
        self.status == StatusCode::Error || self.marks.timed_out
    }

    /// Bytes this span keeps alive while buffered: its encoded bytes, its header, and its eBPF model.
    /// The resource and scope are shared and counted once per batch by the stages that care.
    pub fn held_bytes(&self) -> usize {
        self.raw.len()
            + std::mem::size_of::<Span>()
            + self.ebpf.as_ref().map_or(0, |e| e.held_bytes())
    }
}

/// An attribute value read from the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AttrValue<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    /// Encoded `ArrayValue`.
    Array(&'a [u8]),
    /// Encoded `KeyValueList`.
    KvList(&'a [u8]),
    Empty,
}

impl<'a> AttrValue<'a> {
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            AttrValue::Int(i) => Some(i),
            AttrValue::Double(d) if d.fract() == 0.0 => Some(d as i64),
            AttrValue::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            AttrValue::Int(i) => Some(i as f64),
            AttrValue::Double(d) => Some(d),
            AttrValue::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            AttrValue::Bool(b) => Some(b),
            AttrValue::Str(s) => s.parse().ok(),
            _ => None,
        }
    }
    /// The value as text, as the Collector's string policies see it.
    pub fn to_string_lossy(&self) -> String {
        match *self {
            AttrValue::Str(s) => s.to_string(),
            AttrValue::Bool(b) => b.to_string(),
            AttrValue::Int(i) => i.to_string(),
            AttrValue::Double(d) => d.to_string(),
            AttrValue::Bytes(b) => hex(b),
            AttrValue::Array(_) | AttrValue::KvList(_) | AttrValue::Empty => String::new(),
        }
    }

    /// Parses an encoded `AnyValue`.
    pub fn parse(b: &'a [u8]) -> AttrValue<'a> {
        let mut out = AttrValue::Empty;
        for f in Reader::new(b) {
            let Ok((field, v, _)) = f else {
                return AttrValue::Empty;
            };
            out = match (field, v) {
                (1, Value::Len(s)) => match std::str::from_utf8(s) {
                    Ok(s) => AttrValue::Str(s),
                    Err(_) => AttrValue::Bytes(s),
                },
                (2, Value::Varint(x)) => AttrValue::Bool(x != 0),
                (3, Value::Varint(x)) => AttrValue::Int(x as i64),
                (4, Value::Fixed64(x)) => AttrValue::Double(f64::from_bits(x)),
                (5, Value::Len(s)) => AttrValue::Array(s),
                (6, Value::Len(s)) => AttrValue::KvList(s),
                (7, Value::Len(s)) => AttrValue::Bytes(s),
                _ => out,
            };
        }
        out
    }
}

/// Iterates over the `KeyValue`s in repeated field `field` of an encoded message.
pub struct AttrIter<'a> {
    r: Reader<'a>,
    field: u32,
}

impl<'a> AttrIter<'a> {
    pub fn new(msg: &'a [u8], field: u32) -> Self {
        AttrIter {
            r: Reader::new(msg),
            field,
        }
    }
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (&'a str, AttrValue<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (f, v, _) = self.r.next_field()?.ok()?;
            if f != self.field {
                continue;
            }
            let Value::Len(kv) = v else { continue };
            let mut key = "";
            let mut val = AttrValue::Empty;
            for e in Reader::new(kv) {
                match e {
                    Ok((1, Value::Len(k), _)) => key = std::str::from_utf8(k).unwrap_or(""),
                    Ok((2, Value::Len(a), _)) => val = AttrValue::parse(a),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            return Some((key, val));
        }
    }
}

/// Iterates over the `KeyValue`s in repeated field `field` as `(key bytes, encoded AnyValue)`,
/// without checking that keys are UTF-8 or parsing values: most scans look for a few keys, and
/// validating every key and value was most of their cost. `AttrValue::parse` reads a value.
/// A missing value is empty bytes (it parses as [`AttrValue::Empty`]); the walk ends at the first
/// malformed field, as [`AttrIter`]'s does.
pub struct RawAttrIter<'a> {
    r: Reader<'a>,
    field: u32,
}

impl<'a> RawAttrIter<'a> {
    pub fn new(msg: &'a [u8], field: u32) -> Self {
        RawAttrIter {
            r: Reader::new(msg),
            field,
        }
    }
}

impl<'a> Iterator for RawAttrIter<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (f, v, _) = self.r.next_field()?.ok()?;
            let (true, Value::Len(kv)) = (f == self.field, v) else {
                continue;
            };
            let mut key: &[u8] = &[];
            let mut val: &[u8] = &[];
            for e in Reader::new(kv) {
                match e {
                    Ok((1, Value::Len(k), _)) => key = k,
                    Ok((2, Value::Len(a), _)) => val = a,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            return Some((key, val));
        }
    }
}

fn find_attr<'a>(msg: &'a [u8], field: u32, key: &str) -> Option<AttrValue<'a>> {
    if key.is_empty() {
        // A key that is not UTF-8 reads as "": only the general walk gets that right.
        return AttrIter::new(msg, field)
            .find(|(k, _)| k.is_empty())
            .map(|(_, v)| v);
    }
    // The same walk as `AttrIter`, but keys are compared as bytes and only the matching value
    // is parsed: most lookups miss, and validating every key and value was most of their cost.
    let mut r = Reader::new(msg);
    loop {
        let (f, v, _) = r.next_field()?.ok()?;
        let (true, Value::Len(kv)) = (f == field, v) else {
            continue;
        };
        let mut k: &[u8] = &[];
        let mut val: Option<&[u8]> = None;
        for e in Reader::new(kv) {
            match e {
                Ok((1, Value::Len(b), _)) => k = b,
                Ok((2, Value::Len(a), _)) => val = Some(a),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if k == key.as_bytes() {
            return Some(val.map_or(AttrValue::Empty, AttrValue::parse));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::{status, Status};

    fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    #[test]
    fn header_and_attrs_read_from_bytes() {
        let p = ProtoSpan {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "GET /x".into(),
            kind: 2,
            start_time_unix_nano: 10,
            end_time_unix_nano: 20,
            attributes: vec![
                kv("s", any_value::Value::StringValue("v".into())),
                kv("i", any_value::Value::IntValue(-5)),
                kv("d", any_value::Value::DoubleValue(1.5)),
                kv("b", any_value::Value::BoolValue(true)),
            ],
            status: Some(Status {
                message: "bad".into(),
                code: status::StatusCode::Error as i32,
            }),
            ..Default::default()
        };
        let s = Span::from_proto(Arc::new(Scope::default()), &p);
        assert_eq!(s.trace_id, TraceId([1; 16]));
        assert_eq!(s.parent_span_id, SpanId([3; 8]));
        assert_eq!((s.start_ns, s.end_ns), (10, 20));
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.status, StatusCode::Error);
        assert_eq!(s.name(), "GET /x");
        assert_eq!(s.attr("s"), Some(AttrValue::Str("v")));
        assert_eq!(s.attr("i"), Some(AttrValue::Int(-5)));
        assert_eq!(s.attr("d"), Some(AttrValue::Double(1.5)));
        assert_eq!(s.attr("b"), Some(AttrValue::Bool(true)));
        assert_eq!(s.attr("nope"), None);
        assert_eq!(s.decode().unwrap(), p);
    }

    #[test]
    fn attr_lookup_matches_the_iterator() {
        let p = ProtoSpan {
            attributes: vec![
                kv("a", any_value::Value::StringValue("1".into())),
                kv("dup", any_value::Value::IntValue(1)),
                kv("dup", any_value::Value::IntValue(2)),
                KeyValue {
                    key: "novalue".into(),
                    value: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = Span::from_proto(Arc::new(Scope::default()), &p);
        for key in ["a", "dup", "novalue", "missing", ""] {
            let want = s.attrs().find(|(k, _)| *k == key).map(|(_, v)| v);
            assert_eq!(s.attr(key), want, "{key}");
        }
        assert_eq!(s.attr("dup"), Some(AttrValue::Int(1)));
        assert_eq!(s.attr("novalue"), Some(AttrValue::Empty));
        // A key that is not UTF-8 reads as "" in both.
        let mut raw = Vec::new();
        crate::wire::put_len_field(&mut raw, 9, &[0x0a, 0x01, 0xff]);
        let odd = Span::from_raw(Arc::new(Scope::default()), Bytes::from(raw)).unwrap();
        assert_eq!(odd.attr(""), Some(AttrValue::Empty));
        assert_eq!(odd.attr("x"), None);
    }

    #[test]
    fn raw_attrs_agree_with_attrs() {
        let p = ProtoSpan {
            attributes: vec![
                kv("a", any_value::Value::StringValue("1".into())),
                kv("i", any_value::Value::IntValue(7)),
                KeyValue {
                    key: "novalue".into(),
                    value: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = Span::from_proto(Arc::new(Scope::default()), &p);
        let raw: Vec<(&str, AttrValue<'_>)> = s
            .raw_attrs()
            .map(|(k, v)| (std::str::from_utf8(k).unwrap(), AttrValue::parse(v)))
            .collect();
        let parsed: Vec<(&str, AttrValue<'_>)> = s.attrs().collect();
        assert_eq!(raw, parsed);
        assert_eq!(raw.len(), 3);
    }

    #[test]
    fn hex_roundtrip() {
        let t = TraceId([0xab; 16]);
        assert_eq!(TraceId::from_hex(&t.to_hex()), Some(t));
        assert_eq!(TraceId::from_hex("zz"), None);
    }
}
