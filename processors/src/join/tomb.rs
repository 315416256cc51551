//! Tombstones of emitted units, so late spans follow their unit (join.md §5.5).
//!
//! Entries expire after `late_ttl` and are capped in number (oldest first), so a burst of traces
//! cannot grow them without bound. A key names the newest tombstone filed under it, except an
//! X-Request-ID, which names the newest few (`XREQ_CANDIDATES`): one id passes through several
//! hops, and a late span takes the nearest of them (join.md §4.5).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use tailweave_core::ebpf::{flags, EbpfSpan, TapSide};
use tailweave_core::{Span, SpanId};

use super::output::VIA;
use super::rules::{same_l7, Tol, Via};
use super::{CloneKeys, LateTarget};

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Trace(u32, [u8; 16]),
    Req(u32, u32),
    Resp(u32, u32),
    Sys(u32, Arc<str>, u64),
    Frag(u32, Arc<str>, u64, u8),
    /// An X-Request-ID value and the side it was seen on (0 request, 1 response).
    Xreq(u32, Arc<str>, u8),
    /// A gRPC/HTTP2 session by stream: agent, flow id, tap rank, request (stream) id.
    Stream(u32, Arc<str>, u64, u8, u64),
}

/// The compact copy of an emitted span that the §4 rules need, with the keys it is filed under.
#[derive(Clone, Debug)]
struct Tomb {
    trace_id: [u8; 16],
    span_id: SpanId,
    parent: SpanId,
    via: Via,
    tap: TapSide,
    agent: Arc<str>,
    pid: u32,
    start: u64,
    end: u64,
    dur_us: u64,
    expires: Instant,
    tenant: u32,
    /// Filed under `Key::Trace` (the unit's entry) rather than under span keys.
    unit: bool,
    req: u32,
    resp: u32,
    sys: [u64; 2],
    /// Request fragment filed under `Key::Frag` with this flow id (0: not).
    frag_flow: u64,
    flow: u64,
    /// X-Request-IDs seen in the request and in the response.
    xreq: [Option<Arc<str>>; 2],
    /// A gRPC/HTTP2 session that takes frame rows: its stream id and its own `via`.
    stream: Option<(u64, Via)>,
    l7: u8,
}

impl Tomb {
    fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        let t = self.tenant;
        let unit = self.unit.then_some(Key::Trace(t, self.trace_id));
        let req = (!self.unit && self.req != 0).then_some(Key::Req(t, self.req));
        let resp = (!self.unit && self.resp != 0).then_some(Key::Resp(t, self.resp));
        let sys = self
            .sys
            .into_iter()
            .filter(|id| *id != 0)
            .map(move |id| Key::Sys(t, self.agent.clone(), id));
        let frag = (self.frag_flow != 0)
            .then(|| Key::Frag(t, self.agent.clone(), self.frag_flow, self.tap.rank()));
        let xreq = (0..2u8).filter_map(move |side| {
            let v = self.xreq[side as usize]
                .as_ref()
                .filter(|v| !v.is_empty())?;
            Some(Key::Xreq(t, v.clone(), side))
        });
        let stream = self
            .stream
            .map(|(rid, _)| Key::Stream(t, self.agent.clone(), self.flow, self.tap.rank(), rid));
        unit.into_iter()
            .chain(req)
            .chain(resp)
            .chain(sys)
            .chain(frag)
            .chain(xreq)
            .chain(stream)
    }
}

/// Tombstones kept per (X-Request-ID, side): the hops one id passed through (a gateway chain
/// is a few deep); a hot id (a constant one, say) must not make a late span linear in them.
pub(super) const XREQ_CANDIDATES: usize = 4;

/// Tombstones in arrival order (which is expiry order: `late_ttl` is fixed), each stored once;
/// the key maps point into the ring by absolute position.
pub(super) struct Tombs {
    slots: VecDeque<Tomb>,
    /// Absolute position of `slots[0]`.
    base: u64,
    keys: HashMap<Key, u64>,
    /// `Key::Xreq` only: positions, oldest first, at most `XREQ_CANDIDATES`.
    xreq: HashMap<Key, Vec<u64>>,
    pub(super) cap: usize,
    /// The agent of a unit's own tombstone (none): one shared empty name, not an allocation
    /// per emitted unit.
    no_agent: Arc<str>,
}

impl Default for Tombs {
    fn default() -> Self {
        Tombs {
            slots: VecDeque::new(),
            base: 0,
            keys: HashMap::new(),
            xreq: HashMap::new(),
            cap: 1_000_000,
            no_agent: Arc::from(""),
        }
    }
}

fn via_of(s: &Span) -> Via {
    match s.attr(VIA).and_then(|v| v.as_str()) {
        Some("tcp_seq") => Via::TcpSeq,
        Some("syscall") => Via::Syscall,
        Some("x_request_id") => Via::XRequestId,
        Some("trace_id") => Via::TraceId,
        _ => Via::SpanId,
    }
}

impl Tombs {
    /// Tombstones held (a gauge for the operator; each is one span's compact copy).
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    fn put(&mut self, t: Tomb) {
        let pos = self.base + self.slots.len() as u64;
        for k in t.keys() {
            if matches!(k, Key::Xreq(..)) {
                let v = self.xreq.entry(k).or_default();
                if v.len() >= XREQ_CANDIDATES {
                    v.remove(0);
                }
                v.push(pos);
            } else {
                self.keys.insert(k, pos);
            }
        }
        self.slots.push_back(t);
        while self.slots.len() > self.cap {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        let Some(t) = self.slots.pop_front() else {
            return;
        };
        let pos = self.base;
        self.base += 1;
        for k in t.keys() {
            if matches!(k, Key::Xreq(..)) {
                if let Some(v) = self.xreq.get_mut(&k) {
                    v.retain(|p| *p != pos);
                    if v.is_empty() {
                        self.xreq.remove(&k);
                    }
                }
            // A newer tombstone may have taken the key over.
            } else if self.keys.get(&k) == Some(&pos) {
                self.keys.remove(&k);
            }
        }
    }

    /// Remembers an emitted unit: its trace and the correlation keys of its eBPF spans.
    pub(super) fn record(
        &mut self,
        tenant: u32,
        trace_id: [u8; 16],
        spans: &[Span],
        expires: Instant,
    ) {
        if trace_id == [0; 16] {
            return;
        }
        let root = spans
            .iter()
            .find(|s| s.parent_span_id.is_zero())
            .or(spans.first())
            .map_or(SpanId::ZERO, |s| s.span_id);
        self.put(Tomb {
            trace_id,
            span_id: root,
            parent: SpanId::ZERO,
            via: Via::TraceId,
            tap: TapSide::Unknown,
            agent: self.no_agent.clone(),
            pid: 0,
            start: 0,
            end: 0,
            dur_us: 0,
            expires,
            tenant,
            unit: true,
            req: 0,
            resp: 0,
            sys: [0; 2],
            frag_flow: 0,
            flow: 0,
            xreq: [None, None],
            stream: None,
            l7: 0,
        });
        for s in spans {
            let Some(e) = s.ebpf.as_deref() else { continue };
            if e.has(flags::NO_KEYS) {
                continue;
            }
            let request_only = e.is_request_only();
            let keys = e.clone_keys();
            let sys = if e.is_system() && e.syscall_req != e.syscall_resp {
                [e.syscall_req, e.syscall_resp]
            } else {
                [0; 2]
            };
            self.put(Tomb {
                trace_id,
                span_id: s.span_id,
                parent: s.parent_span_id,
                via: if request_only { via_of(s) } else { Via::TcpSeq },
                tap: e.tap_side.clone(),
                agent: e.agent.clone(),
                pid: e.local_pid(),
                start: e.start_ns,
                end: e.end_ns,
                dur_us: e.duration_us,
                expires,
                tenant,
                unit: false,
                req: e.req_tcp_seq,
                resp: e.resp_tcp_seq,
                sys,
                frag_flow: if request_only { e.flow_id } else { 0 },
                flow: e.flow_id,
                xreq: e.x_request_id.clone(),
                stream: keys.stream.then(|| (keys.request_id, via_of(s))),
                l7: e.l7_protocol,
            });
        }
    }

    pub(super) fn expire(&mut self, now: Instant) {
        while self.slots.front().is_some_and(|t| t.expires <= now) {
            self.pop_front();
        }
    }

    fn at(&self, pos: u64, now: Instant) -> Option<&Tomb> {
        let t = self.slots.get(pos.checked_sub(self.base)? as usize)?;
        (t.expires > now).then_some(t)
    }

    fn live(&self, k: &Key, now: Instant) -> Option<&Tomb> {
        self.at(*self.keys.get(k)?, now)
    }

    /// The live tombstones filed under an X-Request-ID key, newest first.
    fn live_xreq(&self, k: &Key, now: Instant) -> impl Iterator<Item = &Tomb> {
        self.xreq
            .get(k)
            .into_iter()
            .flat_map(|v| v.iter().rev())
            .filter_map(move |&p| self.at(p, now))
    }

    /// Where a late span goes, if it matches an emitted unit.
    pub(super) fn match_late(
        &self,
        tenant: u32,
        key: Option<[u8; 16]>,
        span: &Span,
        tol: &Tol,
        now: Instant,
    ) -> Option<LateTarget> {
        if self.slots.is_empty() {
            return None;
        }
        if let Some(k) = key {
            if let Some(t) = self.live(&Key::Trace(tenant, k), now) {
                return Some(match span.ebpf.as_deref() {
                    None => LateTarget {
                        trace_id: k,
                        parent: span.parent_span_id,
                        via: Via::SpanId,
                    },
                    Some(e) => match e.header_span_id {
                        Some(h) => LateTarget {
                            trace_id: t.trace_id,
                            parent: SpanId(h),
                            via: Via::SpanId,
                        },
                        None => LateTarget {
                            trace_id: t.trace_id,
                            parent: t.span_id,
                            via: Via::TraceId,
                        },
                    },
                });
            }
        }
        let e = span.ebpf.as_deref()?;
        if e.has(flags::NO_KEYS) || e.has(flags::NO_TIMESTAMPS) {
            return None;
        }
        if e.is_response_only() && e.flow_id != 0 {
            let k = Key::Frag(tenant, e.agent.clone(), e.flow_id, e.tap_side.rank());
            if let Some(t) = self.live(&k, now).filter(|t| t.start <= e.end_ns) {
                return Some(LateTarget {
                    trace_id: t.trace_id,
                    parent: t.parent,
                    via: t.via,
                });
            }
        }
        // A zero-duration gRPC/HTTP2 frame row of an emitted session's stream (join.md §3): it
        // cannot be merged any more, so it follows the session, beside it.
        let keys = e.clone_keys();
        if keys.frame {
            let k = Key::Stream(
                tenant,
                e.agent.clone(),
                e.flow_id,
                e.tap_side.rank(),
                keys.request_id,
            );
            let fits = |t: &&Tomb| same_l7(t.l7, e.l7_protocol) && t.start <= e.end_ns;
            if let Some(t) = self.live(&k, now).filter(fits) {
                if let Some((_, via)) = t.stream {
                    return Some(LateTarget {
                        trace_id: t.trace_id,
                        parent: t.parent,
                        via,
                    });
                }
            }
        }
        let dev = |t: &Tomb| {
            if t.agent == e.agent {
                tol.network_delay
            } else {
                tol.network_delay + tol.host_clock_offset
            }
        };
        let rank = e.tap_side.rank();
        let tcp = |t: &Tomb| LateTarget {
            trace_id: t.trace_id,
            parent: if t.tap.rank() < rank {
                t.span_id
            } else {
                t.parent
            },
            via: Via::TcpSeq,
        };
        if e.req_tcp_seq != 0 && !e.is_response_only() {
            if let Some(t) = self.live(&Key::Req(tenant, e.req_tcp_seq), now) {
                if t.start.abs_diff(e.start_ns) <= dev(t) {
                    return Some(tcp(t));
                }
            }
        }
        if e.resp_tcp_seq != 0 && !e.is_request_only() {
            if let Some(t) = self.live(&Key::Resp(tenant, e.resp_tcp_seq), now) {
                if t.end.abs_diff(e.end_ns) <= dev(t) {
                    return Some(tcp(t));
                }
            }
        }
        if e.is_system() && e.syscall_req != e.syscall_resp {
            for id in [e.syscall_req, e.syscall_resp] {
                if id == 0 {
                    continue;
                }
                let Some(t) = self.live(&Key::Sys(tenant, e.agent.clone(), id), now) else {
                    continue;
                };
                if t.pid != 0 && e.local_pid() != 0 && t.pid != e.local_pid() {
                    continue;
                }
                let covered = if t.dur_us == 0 {
                    t.start <= e.start_ns
                } else {
                    t.start <= e.start_ns && e.end_ns <= t.end
                };
                match (&t.tap, &e.tap_side) {
                    (TapSide::SP, TapSide::CP) if covered => {
                        return Some(LateTarget {
                            trace_id: t.trace_id,
                            parent: t.span_id,
                            via: Via::Syscall,
                        })
                    }
                    (TapSide::CP, TapSide::CP)
                        if t.start.abs_diff(e.start_ns) <= tol.syscall_ttl =>
                    {
                        return Some(LateTarget {
                            trace_id: t.trace_id,
                            parent: t.parent,
                            via: Via::Syscall,
                        })
                    }
                    _ => {}
                }
            }
        }
        self.match_xreq(tenant, e, now)
    }

    /// The x_request_id rules (join.md §4.5) against emitted spans: the newest few filed under
    /// each (value, side) are tested; passed through, the nearest hop above wins (the smallest
    /// duration that covers this span's), else the nearest below.
    fn match_xreq(&self, tenant: u32, e: &EbpfSpan, now: Instant) -> Option<LateTarget> {
        let x = |side: usize| e.x_request_id[side].as_ref().filter(|v| !v.is_empty());
        // At most `XREQ_CANDIDATES`, newest first.
        let found = |v: Option<&Arc<str>>, side: u8| -> Vec<&Tomb> {
            match v {
                Some(v) => self
                    .live_xreq(&Key::Xreq(tenant, v.clone(), side), now)
                    .collect(),
                None => Vec::new(),
            }
        };
        let covers = |p: (u64, u64), c: (u64, u64)| p.0 <= c.0 && c.1 <= p.1;
        let me = (e.start_ns, e.end_ns);
        // On one agent the upstream span must cover the downstream one.
        let may_lead = |t: &Tomb| t.agent != e.agent || covers((t.start, t.end), me);
        let may_follow = |t: &Tomb| t.agent != e.agent || covers(me, (t.start, t.end));
        let under = |t: &Tomb| LateTarget {
            trace_id: t.trace_id,
            parent: t.span_id,
            via: Via::XRequestId,
        };
        let beside = |t: &Tomb| LateTarget {
            trace_id: t.trace_id,
            parent: t.parent,
            via: Via::XRequestId,
        };
        // Inside one process: the emitted s-p above this c-p.
        if e.tap_side == TapSide::CP {
            for (v, side) in [(x(0), 0u8), (x(1), 1), (x(0), 1)] {
                for t in found(v, side) {
                    let same_process = t.agent == e.agent && t.pid != 0 && t.pid == e.local_pid();
                    if t.tap == TapSide::SP && same_process && covers((t.start, t.end), me) {
                        return Some(under(t));
                    }
                }
            }
        }
        // Injected: the gateway's inbound side answered with the id its outbound side sent.
        if let Some(t) = found(x(0), 1).into_iter().find(|t| may_lead(t)) {
            return Some(under(t));
        }
        if let Some(t) = found(x(1), 0).into_iter().find(|t| may_follow(t)) {
            return Some(beside(t));
        }
        // Passed through: the longer span is upstream; of several, the nearest hop.
        let mut up: Option<&Tomb> = None;
        let mut down: Option<&Tomb> = None;
        for side in 0..2u8 {
            for t in found(x(side as usize), side) {
                if t.dur_us >= e.duration_us && may_lead(t) {
                    if up.is_none_or(|u| t.dur_us < u.dur_us) {
                        up = Some(t);
                    }
                } else if e.duration_us >= t.dur_us
                    && may_follow(t)
                    && down.is_none_or(|d| t.dur_us > d.dur_us)
                {
                    down = Some(t);
                }
            }
        }
        up.map(under).or_else(|| down.map(beside))
    }
}
