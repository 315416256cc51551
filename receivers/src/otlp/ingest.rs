//! What both transports do with a request once its bytes are read: decode, classify, hand to the
//! pipelines, count, and decide the answer. The transports only map an [`Answer`] to their own
//! status codes, so gRPC and HTTP refuse and count exactly alike.

use std::sync::Arc;

use bytes::Bytes;
use tailweave_core::names;
use tailweave_core::otlp::{
    decode_json_request, decode_request, DecodeError, DecodeLimits, Decoded,
};
use tailweave_core::{Ack, AckWait, Consumer, Refused, SpanBatch};

/// The refusal reason of spans a stage behind the receiver could not keep (full or stopping).
pub const DOWNSTREAM_REFUSED: &str = "downstream_refused";

use std::collections::HashMap;

use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::{Resource, Scope, Span};

use super::auth::{BearerAuth, Grant};
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

/// The refused-spans reason of spans whose resource names another tenant than the token's.
pub const TENANT_MISMATCH: &str = "tenant_mismatch";

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
#[derive(Debug)]
pub enum Answer {
    /// Accepted; `rejected > 0` means partial success with `message`. `taken` resolves when the
    /// stage that keeps the spans has them ([`Answer::settled`] waits for it).
    Accepted {
        rejected: u64,
        message: String,
        taken: Option<Taken>,
    },
    /// The pipelines took the batch but a stage could not keep it (the reason says which):
    /// retryable, like [`Answer::Refused`].
    NotTaken(String),
    /// The body is not a readable request (the message says where).
    Malformed(String),
    /// More spans than `limits.max_spans_per_request`.
    TooManySpans(String),
    /// The pipelines did not take the batch; `spans` were refused and counted.
    Refused { reason: Refused, spans: u64 },
    /// Every span was refused because the request's token may not write it (a tenant token
    /// and resources of another tenant).
    PermissionDenied(String),
}

/// The spans of an accepted request on their way to the stage that keeps them.
#[derive(Debug)]
pub struct Taken {
    wait: AckWait,
    spans: u64,
    transport: Transport,
}

/// Per-receiver state shared by every request of every transport.
pub struct Ingest {
    pub(crate) id: Arc<str>,
    /// `None`: every span is an SDK span (`source: sdk`).
    pub(crate) role: Option<Role>,
    pub(crate) limits: DecodeLimits,
    pub(crate) consumer: Consumer,
    pub(crate) auth: Option<BearerAuth>,
    /// The resource attribute tenant tokens pin.
    pub(crate) tenant_attribute: Arc<str>,
}

impl Ingest {
    pub fn new(id: &str, role: Option<Role>, limits: DecodeLimits, consumer: Consumer) -> Self {
        Ingest {
            id: id.into(),
            role,
            limits,
            consumer,
            auth: None,
            tenant_attribute: super::config::DEFAULT_TENANT_ATTRIBUTE.into(),
        }
    }

    pub fn with_auth(mut self, auth: Option<BearerAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// Sets the resource attribute tenant tokens pin (default `tenant`).
    pub fn with_tenant_attribute(mut self, key: &str) -> Self {
        self.tenant_attribute = key.into();
        self
    }

    /// Checks the `Authorization` header when auth is configured: what the request may write,
    /// or `None` (counted) when it is not authenticated.
    pub fn authorize(&self, transport: Transport, header: Option<&[u8]>) -> Option<Grant> {
        match &self.auth {
            None => Some(Grant::Any),
            Some(a) => {
                let g = a.check(header);
                if g.is_none() {
                    self.count_request(transport, "unauthenticated");
                }
                g
            }
        }
    }

    /// Counts a request that ended before decoding (size, media type, path, ...).
    pub fn count_request(&self, transport: Transport, outcome: &'static str) {
        metrics::counter!(REQUESTS, "receiver" => self.id.to_string(),
            "transport" => transport.as_str(), "outcome" => outcome)
        .increment(1);
    }

    /// Counts an accepted request: `partial_success` when some of its spans were rejected.
    fn count_accepted_request(&self, transport: Transport, rejected: u64) {
        let outcome = if rejected > 0 {
            "partial_success"
        } else {
            "success"
        };
        self.count_request(transport, outcome);
    }

    fn count_refused(&self, transport: Transport, reason: &'static str, n: u64) {
        if n > 0 {
            metrics::counter!(REFUSED_SPANS, "receiver" => self.id.to_string(),
                "transport" => transport.as_str(), "reason" => reason)
            .increment(n);
        }
    }

    /// Waits until the spans of an accepted request are held by the stage that keeps them (the
    /// end-to-end acknowledgement, see `tailweave_core::Ack`), so a client is told "accepted"
    /// only for what a `kill -9` of a collector with storage would not lose; counts the spans
    /// accepted then, or refused (`downstream_refused`) when a stage could not keep them.
    pub async fn settle(&self, answer: Answer) -> Answer {
        let Answer::Accepted {
            rejected,
            message,
            taken: Some(t),
        } = answer
        else {
            return answer;
        };
        match t.wait.await {
            Ok(()) => {
                metrics::counter!(ACCEPTED_SPANS, "receiver" => self.id.to_string(),
                    "transport" => t.transport.as_str())
                .increment(t.spans);
                self.count_accepted_request(t.transport, rejected);
                Answer::Accepted {
                    rejected,
                    message,
                    taken: None,
                }
            }
            Err(why) => {
                self.count_refused(t.transport, DOWNSTREAM_REFUSED, t.spans);
                self.count_request(t.transport, DOWNSTREAM_REFUSED);
                tracing::debug!(receiver = %self.id, transport = t.transport.as_str(),
                    spans = t.spans, reason = %why, "batch refused downstream");
                Answer::NotTaken(why)
            }
        }
    }

    /// Takes an `ExportTraceServiceRequest` in protobuf, sent with `grant`.
    pub fn ingest_protobuf(
        &self,
        transport: Transport,
        body: Bytes,
        hint: Option<Role>,
        grant: &Grant,
    ) -> Answer {
        let decoded = decode_request(body.clone(), &self.limits);
        let visible = match &decoded {
            Ok(_) => 0,
            Err(_) => visible_spans(&body),
        };
        self.ingest(transport, decoded, visible, hint, grant)
    }

    /// Takes an `ExportTraceServiceRequest` in OTLP/JSON, sent with `grant`.
    pub fn ingest_json(
        &self,
        transport: Transport,
        body: &[u8],
        hint: Option<Role>,
        grant: &Grant,
    ) -> Answer {
        let decoded = decode_json_request(body, &self.limits);
        self.ingest(transport, decoded, 0, hint, grant)
    }

    /// Takes a decoded request: classifies its spans, hands them on, counts, and answers.
    /// `visible` is how many spans a request that failed to decode showed before it stopped
    /// making sense (they are counted as refused). `role_hint` is the request's own claim (the
    /// source header) and only ever upgrades a shared receiver to eBPF. A tenant `grant` pins
    /// the tenant of every resource ([`pin_tenant`]).
    pub fn ingest(
        &self,
        transport: Transport,
        decoded: Result<Decoded, DecodeError>,
        visible: u64,
        role_hint: Option<Role>,
        grant: &Grant,
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
        let mut rejected = decoded.rejected_total();
        let mut message = if rejected > 0 {
            decoded.partial_message()
        } else {
            String::new()
        };
        let mut spans = decoded.spans;
        if let Some(tenant) = grant.tenant() {
            let (kept, foreign) = pin_tenant(spans, &self.tenant_attribute, tenant);
            spans = kept;
            if foreign > 0 {
                self.count_refused(transport, TENANT_MISMATCH, foreign);
                let why = format!(
                    "{foreign} span(s) refused: their resource's {:?} attribute names another tenant than the token's ({tenant:?})",
                    &*self.tenant_attribute
                );
                if spans.is_empty() && rejected == 0 {
                    self.count_request(transport, "permission_denied");
                    tracing::debug!(receiver = %self.id, transport = transport.as_str(),
                        spans = foreign, %tenant, "request refused: another tenant's resources");
                    return Answer::PermissionDenied(why);
                }
                rejected += foreign;
                message = if message.is_empty() {
                    why
                } else {
                    format!("{message}; {why}")
                };
            }
        }
        if let Some(role) = effective_role(self.role, role_hint) {
            normalize::normalize_spans(&mut spans, role);
        }
        let n = spans.len() as u64;
        if n > 0 {
            let (ack, wait) = Ack::new();
            if let Err(reason) = self.consumer.try_send(SpanBatch::new(spans).with_ack(ack)) {
                tracing::debug!(receiver = %self.id, transport = transport.as_str(), spans = n,
                    %reason, "batch refused");
                self.count_refused(transport, reason.as_str(), n);
                self.count_request(transport, reason.as_str());
                return Answer::Refused { reason, spans: n };
            }
            // Counted as accepted (or refused) by `settle`, when the keeping stage answered.
            return Answer::Accepted {
                rejected,
                message,
                taken: Some(Taken {
                    wait,
                    spans: n,
                    transport,
                }),
            };
        }
        self.count_accepted_request(transport, rejected);
        Answer::Accepted {
            rejected,
            message,
            taken: None,
        }
    }
}

/// Pins every span of a request to `tenant`: a resource without `key` (or with it empty) gets
/// `key = tenant` (re-encoded once per resource, the spans untouched); the spans of a resource
/// that names another tenant (or holds a non-string value there) are taken out. Returns the
/// spans kept and how many were taken out.
///
/// Spans share their scope and resource through `Arc`s; the rewritten resource and scopes are
/// shared the same way, one per original, so the exporter still frames them together.
pub fn pin_tenant(spans: Vec<Span>, key: &str, tenant: &str) -> (Vec<Span>, u64) {
    enum Verdict {
        Keep,
        Rewrite(Arc<Resource>),
        Refuse,
    }
    let mut resources: HashMap<*const Resource, Verdict> = HashMap::new();
    let mut scopes: HashMap<*const Scope, Arc<Scope>> = HashMap::new();
    let mut kept = Vec::with_capacity(spans.len());
    let mut refused = 0u64;
    for mut span in spans {
        let res = &span.scope.resource;
        let verdict = resources.entry(Arc::as_ptr(res)).or_insert_with(|| {
            match res.attr(key).map(|v| v.as_str()) {
                Some(Some(t)) if t == tenant => Verdict::Keep,
                None | Some(Some("")) => match with_tenant(res, key, tenant) {
                    Some(r) => Verdict::Rewrite(r),
                    // Unreadable: cannot be pinned, so it cannot pass.
                    None => Verdict::Refuse,
                },
                Some(_) => Verdict::Refuse,
            }
        });
        match verdict {
            Verdict::Keep => kept.push(span),
            Verdict::Refuse => refused += 1,
            Verdict::Rewrite(r) => {
                let scope = scopes
                    .entry(Arc::as_ptr(&span.scope))
                    .or_insert_with(|| {
                        Scope::new(
                            r.clone(),
                            span.scope.raw.clone(),
                            span.scope.schema_url.clone(),
                        )
                    })
                    .clone();
                span.scope = scope;
                kept.push(span);
            }
        }
    }
    (kept, refused)
}

/// `res` with `key = tenant` (any empty `key` removed first); `None` if it does not decode.
fn with_tenant(res: &Resource, key: &str, tenant: &str) -> Option<Arc<Resource>> {
    use prost::Message;
    let mut r = res.decode().ok()?;
    r.attributes.retain(|kv| kv.key != key);
    r.attributes.push(KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(tenant.to_string())),
        }),
        ..Default::default()
    });
    Some(Resource::new(
        Bytes::from(r.encode_to_vec()),
        res.schema_url.clone(),
    ))
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
    use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
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
        match ing.ingest_protobuf(
            Transport::Grpc,
            request(&[(1, 1), (0, 2), (1, 3)]),
            None,
            &Grant::Any,
        ) {
            Answer::Accepted {
                rejected, message, ..
            } => {
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
            ing.ingest_protobuf(Transport::Http, request(&[(0, 1)]), None, &Grant::Any),
            Answer::Accepted { rejected: 1, .. }
        ));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn accepted_is_answered_once_the_keeping_stage_lets_the_ack_go() {
        let (ing, mut rx) = ingest(4);
        let answer = ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None, &Grant::Any);
        let ing = std::sync::Arc::new(ing);
        let settled = tokio::spawn({
            let ing = ing.clone();
            async move { ing.settle(answer).await }
        });
        let batch = rx.recv().await.unwrap();
        assert_eq!(batch.acks.len(), 1);
        tokio::task::yield_now().await;
        assert!(
            !settled.is_finished(),
            "answered while a stage holds the ack"
        );
        drop(batch);
        assert!(matches!(
            settled.await.unwrap(),
            Answer::Accepted { rejected: 0, .. }
        ));
    }

    #[tokio::test]
    async fn a_stage_that_cannot_keep_the_spans_turns_the_answer_retryable() {
        let (ing, mut rx) = ingest(4);
        let answer = ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None, &Grant::Any);
        let batch = rx.recv().await.unwrap();
        batch.acks[0].fail("sending queue: disk full");
        drop(batch);
        match ing.settle(answer).await {
            Answer::NotTaken(why) => assert!(why.contains("disk full"), "{why}"),
            a => panic!("expected NotTaken, got {a:?}"),
        }
    }

    #[test]
    fn full_and_closed_are_refused_with_count() {
        let (ing, rx) = ingest(1);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None, &Grant::Any),
            Answer::Accepted { .. }
        ));
        assert!(matches!(
            ing.ingest_protobuf(
                Transport::Grpc,
                request(&[(1, 1), (1, 2)]),
                None,
                &Grant::Any
            ),
            Answer::Refused {
                reason: Refused::Full,
                spans: 2
            }
        ));
        drop(rx);
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, request(&[(1, 1)]), None, &Grant::Any),
            Answer::Refused {
                reason: Refused::Closed,
                spans: 1
            }
        ));
    }

    #[test]
    fn malformed_and_too_many() {
        let (mut ing, _rx) = ingest(1);
        assert!(matches!(
            ing.ingest_protobuf(
                Transport::Http,
                Bytes::from_static(b"\xff\xff\xff"),
                None,
                &Grant::Any
            ),
            Answer::Malformed(_)
        ));
        ing.limits.max_spans_per_request = 1;
        assert!(matches!(
            ing.ingest_protobuf(
                Transport::Http,
                request(&[(1, 1), (1, 2)]),
                None,
                &Grant::Any
            ),
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
            ing.ingest_protobuf(Transport::Grpc, Bytes::from(two), None, &Grant::Any),
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

    /// One resource per `(tenant claim, span ids)`; `None`: no tenant attribute.
    fn tenant_request(resources: &[(Option<&str>, &[u8])]) -> Bytes {
        use prost::Message;
        use tailweave_core::proto::tonic::resource::v1::Resource as PR;
        let resource_spans = resources
            .iter()
            .map(|(claim, ids)| ResourceSpans {
                resource: Some(PR {
                    attributes: claim
                        .iter()
                        .map(|t| KeyValue {
                            key: "tenant".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::StringValue(t.to_string())),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: ids
                        .iter()
                        .map(|&s| PS {
                            trace_id: vec![9; 16],
                            span_id: vec![s; 8],
                            name: "x".into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        Bytes::from(ExportTraceServiceRequest { resource_spans }.encode_to_vec())
    }

    fn tenant_of(s: &Span) -> Option<String> {
        s.resource()
            .attr("tenant")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }

    #[test]
    fn a_tenant_token_pins_unclaimed_resources_and_refuses_foreign_ones() {
        let (ing, mut rx) = ingest(4);
        let a = Grant::Tenant("team-a".into());
        let body = tenant_request(&[
            (None, &[1, 2]),
            (Some("team-b"), &[3]),
            (Some("team-a"), &[4]),
            (Some(""), &[5]),
        ]);
        match ing.ingest_protobuf(Transport::Grpc, body.clone(), None, &a) {
            Answer::Accepted {
                rejected, message, ..
            } => {
                assert_eq!(rejected, 1);
                assert!(message.contains("another tenant"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let out = rx.try_recv().unwrap().spans;
        let got: Vec<(u8, Option<String>)> =
            out.iter().map(|s| (s.span_id.0[0], tenant_of(s))).collect();
        let a_ = || Some("team-a".to_string());
        assert_eq!(got, vec![(1, a_()), (2, a_()), (4, a_()), (5, a_())]);
        // The two spans of one resource still share one (rewritten) resource.
        assert!(Arc::ptr_eq(&out[0].scope, &out[1].scope));
        // The pinned spans re-encode with exactly one tenant attribute per resource.
        let re = tailweave_core::otlp::to_proto_request(&out);
        for rs in &re.resource_spans {
            let n = rs.resource.as_ref().unwrap().attributes.len();
            assert_eq!(n, 1, "{rs:?}");
        }

        // A plain token (Grant::Any) passes everything unchanged.
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, body, None, &Grant::Any),
            Answer::Accepted { rejected: 0, .. }
        ));
        let out = rx.try_recv().unwrap().spans;
        assert_eq!(out.len(), 5);
        assert_eq!(tenant_of(&out[2]), Some("team-b".into()));
        assert_eq!(tenant_of(&out[0]), None);
    }

    #[test]
    fn only_foreign_spans_is_permission_denied_and_nothing_is_sent() {
        let (ing, mut rx) = ingest(4);
        let a = Grant::Tenant("team-a".into());
        let body = tenant_request(&[(Some("team-b"), &[1, 2])]);
        match ing.ingest_json(
            Transport::Http,
            &tailweave_core::otlp::encode_json_request(
                &tailweave_core::otlp::decode_request(body.clone(), &DecodeLimits::default())
                    .unwrap()
                    .spans,
            ),
            None,
            &a,
        ) {
            Answer::PermissionDenied(m) => assert!(m.contains("2 span(s)"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ing.ingest_protobuf(Transport::Grpc, body, None, &a),
            Answer::PermissionDenied(_)
        ));
        assert!(rx.try_recv().is_err());
        // Once pinned to team-a, the same spans are foreign to team-b's token.
        let spans = tailweave_core::otlp::decode_request(
            tenant_request(&[(None, &[1])]),
            &DecodeLimits::default(),
        )
        .unwrap()
        .spans;
        let (kept, refused) = pin_tenant(spans, "tenant", "team-a");
        assert_eq!((kept.len(), refused), (1, 0));
        let (kept, refused) = pin_tenant(kept, "tenant", "team-b");
        assert_eq!((kept.len(), refused), (0, 1));
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
