//! What both transports do with a request once its bytes are read: decode, classify, hand to the
//! pipelines, count, and decide the answer. The transports only map an [`Answer`] to their own
//! status codes, so gRPC and HTTP refuse and count exactly alike.

use std::sync::Arc;

use bytes::Bytes;
use tailweave_core::names;
use tailweave_core::otlp::{
    decode_json_request, decode_request, DecodeError, DecodeLimits, Decoded,
};
use tailweave_core::{Consumer, Refused, SpanBatch};

use super::auth::BearerAuth;
use crate::deepflow::normalize::{self, Role};

/// Spans accepted into the pipelines (`receiver`, `transport`).
pub const ACCEPTED_SPANS: &str = names::RECEIVER_ACCEPTED_SPANS;
/// Spans refused (`receiver`, `transport`, `reason`): `pipeline_full`, `memory_limit`,
/// `shutting_down`, the per-span reasons of `decode_request` (`invalid_trace_id`, ...),
/// `too_many_spans`, and `malformed_request` (the spans visible in a protobuf request that does
/// not parse, a span cut short included; nothing for JSON). Requests refused before their body is read (`too_large`,
/// `unauthenticated`, ...) carry no span count and appear only in [`REQUESTS`].
pub const REFUSED_SPANS: &str = names::RECEIVER_REFUSED_SPANS;
/// Requests by `outcome` (`receiver`, `transport`, `outcome`): `success`, `partial_success`,
/// the [`Refused`] reasons, `malformed_request`, `too_large`, `too_many_spans`,
/// `unauthenticated`, and for HTTP `not_found`, `method_not_allowed`, `unsupported_media_type`.
pub const REQUESTS: &str = names::RECEIVER_REQUESTS;

/// How long a refused client is asked to wait before retrying (HTTP `Retry-After`, seconds).
pub const RETRY_AFTER_SECS: u64 = 1;

/// The transport a request came in on (the `transport` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// The result of one request, independent of the transport.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Accepted; `rejected > 0` means partial success with `message`.
    Accepted { rejected: u64, message: String },
    /// The body is not a readable request (the message says where).
    Malformed(String),
    /// More spans than `limits.max_spans_per_request`.
    TooManySpans(String),
    /// The pipelines did not take the batch; `spans` were refused and counted.
    Refused { reason: Refused, spans: u64 },
}

/// Per-receiver state shared by every request of every transport.
pub struct Ingest {
    pub(crate) id: Arc<str>,
    /// `None`: every span is an SDK span (`source: sdk`).
    pub(crate) role: Option<Role>,
    pub(crate) limits: DecodeLimits,
    pub(crate) consumer: Consumer,
    pub(crate) auth: Option<BearerAuth>,
}

impl Ingest {
    pub fn new(id: &str, role: Option<Role>, limits: DecodeLimits, consumer: Consumer) -> Self {
        Ingest {
            id: id.into(),
            role,
            limits,
            consumer,
            auth: None,
        }
    }

    pub fn with_auth(mut self, auth: Option<BearerAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// Checks the `Authorization` header when auth is configured; a refusal is counted.
    pub fn authorized(&self, transport: Transport, header: Option<&[u8]>) -> bool {
        match &self.auth {
            None => true,
            Some(a) if a.allows(header) => true,
            Some(_) => {
                self.count_request(transport, "unauthenticated");
                false
            }
        }
    }

    /// Counts a request that ended before decoding (size, media type, path, ...).
    pub fn count_request(&self, transport: Transport, outcome: &'static str) {
        metrics::counter!(REQUESTS, "receiver" => self.id.to_string(),
            "transport" => transport.as_str(), "outcome" => outcome)
        .increment(1);
    }

    fn count_refused(&self, transport: Transport, reason: &'static str, n: u64) {
        if n > 0 {
            metrics::counter!(REFUSED_SPANS, "receiver" => self.id.to_string(),
                "transport" => transport.as_str(), "reason" => reason)
            .increment(n);
        }
    }

    /// Takes an `ExportTraceServiceRequest` in protobuf.
    pub fn ingest_protobuf(&self, transport: Transport, body: Bytes, hint: Option<Role>) -> Answer {
        let decoded = decode_request(body.clone(), &self.limits);
        let visible = match &decoded {
            Ok(_) => 0,
            Err(_) => visible_spans(&body),
        };
        self.ingest(transport, decoded, visible, hint)
    }

    /// Takes an `ExportTraceServiceRequest` in OTLP/JSON.
    pub fn ingest_json(&self, transport: Transport, body: &[u8], hint: Option<Role>) -> Answer {
        self.ingest(transport, decode_json_request(body, &self.limits), 0, hint)
    }

    /// Takes a decoded request: classifies its spans, hands them on, counts, and answers.
    /// `visible` is how many spans a request that failed to decode showed before it stopped
    /// making sense (they are counted as refused). `role_hint` is the request's own claim (the
    /// source header) and only ever upgrades a shared receiver to eBPF.
    pub fn ingest(
        &self,
        transport: Transport,
        decoded: Result<Decoded, DecodeError>,
        visible: u64,
        role_hint: Option<Role>,
    ) -> Answer {
        let decoded = match decoded {
            Ok(d) => d,
            Err(DecodeError::TooManySpans(max)) => {
                self.count_request(transport, "too_many_spans");
                self.count_refused(transport, "too_many_spans", visible);
                return Answer::TooManySpans(format!(
                    "request holds more than {max} spans (limits.max_spans_per_request)"
                ));
            }
            Err(e) => {
                self.count_request(transport, "malformed_request");
                self.count_refused(transport, "malformed_request", visible);
                let m = e.to_string();
                tracing::debug!(receiver = %self.id, transport = transport.as_str(), error = %m,
                    "request refused");
                return Answer::Malformed(m);
            }
        };
        for (reason, n) in &decoded.rejected {
            self.count_refused(transport, reason.as_str(), *n);
        }
        let rejected = decoded.rejected_total();
        let message = if rejected > 0 {
            decoded.partial_message()
        } else {
            String::new()
        };
        let mut spans = decoded.spans;
        if let Some(role) = effective_role(self.role, role_hint) {
            normalize::normalize_spans(&mut spans, role);
        }
        let n = spans.len() as u64;
        if n > 0 {
            if let Err(reason) = self.consumer.try_send(SpanBatch::new(spans)) {
                tracing::debug!(receiver = %self.id, transport = transport.as_str(), spans = n,
                    %reason, "batch refused");
                self.count_refused(transport, reason.as_str(), n);
                self.count_request(transport, reason.as_str());
                return Answer::Refused { reason, spans: n };
            }
            metrics::counter!(ACCEPTED_SPANS, "receiver" => self.id.to_string(),
                "transport" => transport.as_str())
            .increment(n);
        }
        self.count_request(
            transport,
            if rejected > 0 {
                "partial_success"
            } else {
                "success"
            },
        );
        Answer::Accepted { rejected, message }
    }
}

/// The spans a request shows before its bytes stop making sense (a span cut short counts): what
/// a refused request carried, for the refused-spans counter.
pub fn visible_spans(buf: &[u8]) -> u64 {
    let mut n = 0;
    for (field, rs) in lenient_len_fields(buf) {
        if field != 1 {
            continue;
        }
        for (field, ss) in lenient_len_fields(rs) {
            if field != 2 {
                continue;
            }
            n += lenient_len_fields(ss)
                .iter()
                .filter(|(field, _)| *field == 2)
                .count() as u64;
        }
    }
    n
}

/// The length-delimited fields of a message, read leniently: a field cut short yields the bytes
/// that are there, and anything unreadable ends the walk.
fn lenient_len_fields(buf: &[u8]) -> Vec<(u64, &[u8])> {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let Some(key) = varint(buf, &mut i) else {
            break;
        };
        let skip = match key & 7 {
            0 => match varint(buf, &mut i) {
                Some(_) => 0,
                None => break,
            },
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(buf, &mut i) else {
                    break;
                };
                let end =
                    usize::try_from(len).map_or(buf.len(), |l| i.saturating_add(l).min(buf.len()));
                out.push((key >> 3, &buf[i..end]));
                i = end;
                0
            }
            _ => break,
        };
        i = i.saturating_add(skip);
    }
    out
}

/// A request's claim to come from DeepFlow turns a shared receiver into an eBPF one for that
/// request; it never changes an `sdk` or an `ebpf` receiver.
fn effective_role(receiver: Option<Role>, hint: Option<Role>) -> Option<Role> {
    match (receiver, hint) {
        (Some(Role::Shared), Some(Role::Ebpf)) => Some(Role::Ebpf),
        (r, _) => r,
    }
}

/// Reads the source header's value as a role claim: DeepFlow's exporter is configured to send
/// `x-tailweave-source: deepflow` (`ebpf-spans.md` §8).
pub fn role_from_header(value: Option<&[u8]>) -> Option<Role> {
    let v = value?;
    if v.eq_ignore_ascii_case(b"deepflow") || v.eq_ignore_ascii_case(b"ebpf") {
        Some(Role::Ebpf)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use tailweave_core::proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span as PS};
    use tokio::sync::mpsc;

    fn request(ids: &[(u8, u8)]) -> Bytes {
        use prost::Message;
        let spans = ids
            .iter()
            .map(|&(t, s)| PS {
                trace_id: vec![t; 16],
                span_id: vec![s; 8],
                name: "x".into(),
                ..Default::default()
            })
            .collect();
        let r = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        Bytes::from(r.encode_to_vec())
    }

    fn ingest(cap: usize) -> (Ingest, mpsc::Receiver<SpanBatch>) {
        let (tx, rx) = mpsc::channel(cap);
        let c = Consumer::new(vec![tx], None);
        (
            Ingest::new("otlp", Some(Role::Shared), DecodeLimits::default(), c),
            rx,
        )
    }

    #[test]
    fn accepted_and_partial() {
        let (ing, mut rx) = ingest(4);
        match ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1), (0, 2), (1, 3)]), None) {
            Answer::Accepted { rejected, message } => {
                assert_eq!(rejected, 1);
                assert!(message.contains("invalid_trace_id"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(rx.try_recv().unwrap().spans.len(), 2);
    }

    #[test]
    fn nothing_valid_sends_nothing() {
        let (ing, mut rx) = ingest(4);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Http, request(&[(0, 1)]), None),
            Answer::Accepted { rejected: 1, .. }
        ));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn full_and_closed_are_refused_with_count() {
        let (ing, rx) = ingest(1);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None),
            Answer::Accepted { .. }
        ));
        assert_eq!(
            ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1), (1, 2)]), None),
            Answer::Refused {
                reason: Refused::Full,
                spans: 2
            }
        );
        drop(rx);
        assert_eq!(
            ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None),
            Answer::Refused {
                reason: Refused::Closed,
                spans: 1
            }
        );
    }

    #[test]
    fn malformed_and_too_many() {
        let (mut ing, _rx) = ingest(1);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Http, Bytes::from_static(b"\xff\xff\xff"), None),
            Answer::Malformed(_)
        ));
        ing.limits.max_spans_per_request = 1;
        assert!(matches!(
            ing.ingest_protobuf(Transport::Http, request(&[(1, 1), (1, 2)]), None),
            Answer::TooManySpans(_)
        ));
    }

    #[test]
    fn visible_spans_of_broken_requests() {
        let whole = request(&[(1, 1), (1, 2), (1, 3)]);
        assert_eq!(visible_spans(&whole), 3);
        assert_eq!(visible_spans(b"not protobuf"), 0);
        // Cut inside the last span: that span still counts.
        assert_eq!(visible_spans(&whole[..whole.len() - 2]), 3);
        let one = request(&[(1, 1)]);
        assert_eq!(visible_spans(&one[..6]), 1);
        assert_eq!(visible_spans(&one[..4]), 0, "cut before the span's field");
        let (ing, _rx) = ingest(1);
        let mut two = request(&[(1, 1)]).to_vec();
        two.extend_from_slice(&request(&[(1, 2), (1, 3)]));
        two.extend_from_slice(b"\x0a\x05ab");
        assert_eq!(visible_spans(&two), 3);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, Bytes::from(two), None),
            Answer::Malformed(_)
        ));
    }

    #[test]
    fn visible_spans_never_panics() {
        let whole = request(&[(1, 1), (2, 2)]);
        for cut in 0..whole.len() {
            assert!(visible_spans(&whole[..cut]) <= 2);
        }
        // Deterministic noise, including over-long varints and huge lengths.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut b = Vec::new();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push((x >> 24) as u8);
            }
            visible_spans(&b);
        }
        visible_spans(&[
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        visible_spans(&[0x0a; 11]);
    }

    #[test]
    fn header_roles() {
        assert_eq!(role_from_header(Some(b"DeepFlow")), Some(Role::Ebpf));
        assert_eq!(role_from_header(Some(b"ebpf")), Some(Role::Ebpf));
        assert_eq!(role_from_header(Some(b"sdk")), None);
        assert_eq!(role_from_header(None), None);
        let e = Some(Role::Ebpf);
        assert_eq!(effective_role(Some(Role::Shared), e), e);
        assert_eq!(effective_role(Some(Role::Shared), None), Some(Role::Shared));
        assert_eq!(effective_role(None, e), None);
        assert_eq!(effective_role(e, None), e);
    }
}
