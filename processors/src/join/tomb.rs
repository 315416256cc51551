//! Tombstones of emitted units, so late spans follow their unit (join.md §5.5).
//!
//! Entries expire after `late_ttl` and are capped in number (oldest first), so a burst of traces
//! cannot grow them without bound.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use tailweave_core::ebpf::{flags, TapSide};
use tailweave_core::{Span, SpanId};

use super::output::VIA;
use super::rules::{Tol, Via};
use super::LateTarget;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Key {
    Trace(u32, [u8; 16]),
    Req(u32, u32),
    Resp(u32, u32),
    Sys(u32, Arc<str>, u64),
    Frag(u32, Arc<str>, u64, u8),
}

/// The compact copy of an emitted span that the §4 rules need.
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
}

pub(super) struct Tombs {
    map: HashMap<Key, Tomb>,
    queue: VecDeque<(Instant, Key)>,
    pub(super) cap: usize,
}

impl Default for Tombs {
    fn default() -> Self {
        Tombs {
            map: HashMap::new(),
            queue: VecDeque::new(),
            cap: 1_000_000,
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
    fn put(&mut self, k: Key, t: Tomb) {
        self.queue.push_back((t.expires, k.clone()));
        self.map.insert(k, t);
        while self.queue.len() > self.cap {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((t, k)) = self.queue.pop_front() {
            if self.map.get(&k).is_some_and(|x| x.expires == t) {
                self.map.remove(&k);
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
        let base = Tomb {
            trace_id,
            span_id: root,
            parent: SpanId::ZERO,
            via: Via::TraceId,
            tap: TapSide::Unknown,
            agent: Arc::from(""),
            pid: 0,
            start: 0,
            end: 0,
            dur_us: 0,
            expires,
        };
        self.put(Key::Trace(tenant, trace_id), base);
        for s in spans {
            let Some(e) = s.ebpf.as_deref() else { continue };
            if e.has(flags::NO_KEYS) {
                continue;
            }
            let request_only = e.is_request_only();
            let t = Tomb {
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
            };
            if e.req_tcp_seq != 0 {
                self.put(Key::Req(tenant, e.req_tcp_seq), t.clone());
            }
            if e.resp_tcp_seq != 0 {
                self.put(Key::Resp(tenant, e.resp_tcp_seq), t.clone());
            }
            if e.is_system() {
                for id in [e.syscall_req, e.syscall_resp] {
                    if id != 0 && e.syscall_req != e.syscall_resp {
                        self.put(Key::Sys(tenant, e.agent.clone(), id), t.clone());
                    }
                }
            }
            if request_only && e.flow_id != 0 {
                self.put(
                    Key::Frag(tenant, e.agent.clone(), e.flow_id, e.tap_side.rank()),
                    t,
                );
            }
        }
    }

    pub(super) fn expire(&mut self, now: Instant) {
        while self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.pop_front();
        }
    }

    fn live(&self, k: &Key, now: Instant) -> Option<&Tomb> {
        self.map.get(k).filter(|t| t.expires > now)
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
        if self.map.is_empty() {
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
        None
    }
}
