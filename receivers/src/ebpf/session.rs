//! Per-socket state: protocol detection, the two direction parsers, and request/response
//! pairing. Events in, [`Call`]s out; pure (time comes from the events and from `tick`).
//!
//! A socket's role follows from the first message it moves: writing a request (or reading a
//! response) makes this process the client (`c-p`), reading a request makes it the server
//! (`s-p`). Responses pair with the oldest waiting request, which is right for HTTP/1
//! (pipelined answers come in order), RESP and MySQL. A request still waiting after
//! `request_timeout`, or when its socket closes, leaves request-only; a response with nothing
//! waiting leaves response-only. Both kinds of state are bounded and what falls off is counted.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use super::event::{Dir, Event, Kind};
use super::proto::{
    self, Carries, Message, ParseStats, Parsed, Parser, Request, Response, SegMeta, L7,
};

/// Which end of the connection this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `c-p`
    Client,
    /// `s-p`
    Server,
}

/// One request and its response (either may be missing) on one socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub l7: L7,
    pub role: Role,
    pub pid: u32,
    pub comm: Arc<str>,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    /// Stable per socket (and per observation point): DeepFlow's `flow_id`.
    pub flow_id: u64,
    pub request: Option<(SegMeta, Request)>,
    pub response: Option<(SegMeta, Response)>,
}

/// Tracker limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_sockets: usize,
    pub max_pending: usize,
    pub request_timeout_ns: u64,
    /// Segments tried for protocol detection before a socket is ignored.
    pub detect_tries: u32,
}

/// What the tracker dropped or could not use, for the receiver's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Sockets given up on: no known protocol in their first segments.
    pub unknown_protocol: u64,
    /// Sockets evicted at `max_sockets` (their waiting requests left request-only).
    pub evicted_sockets: u64,
    /// Requests pushed out at `max_pending` (left request-only).
    pub pending_overflow: u64,
    /// Requests that waited past `request_timeout`.
    pub timed_out: u64,
}

#[derive(Debug)]
enum Proto {
    Detecting {
        tries: u32,
    },
    Active {
        l7: L7,
        role: Role,
        /// Indexed by [`Dir`]; boxed so sockets still detecting stay small.
        parsers: Box<[Parser; 2]>,
    },
    Ignored,
}

#[derive(Debug)]
struct Socket {
    pid: u32,
    comm: Arc<str>,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
    flow_id: u64,
    proto: Proto,
    pending: VecDeque<(SegMeta, Request)>,
    cap_seq: u32,
    last_ns: u64,
}

/// Key: (pid, socket address). The address alone is reused after the socket is freed.
type Key = (u32, u64);

pub struct Tracker {
    sockets: HashMap<Key, Socket>,
    limits: Limits,
    /// Added to the kernel's CLOCK_MONOTONIC to get Unix time.
    mono_to_unix_ns: i128,
    next_flow: u64,
    /// Folded-in parser counters of sockets already gone, per protocol.
    done: HashMap<L7, ParseStats>,
    pub stats: TrackerStats,
    parsed: Vec<Parsed>,
}

impl Tracker {
    pub fn new(limits: Limits, mono_to_unix_ns: i128) -> Tracker {
        Tracker {
            sockets: HashMap::new(),
            limits,
            mono_to_unix_ns,
            next_flow: 1,
            done: HashMap::new(),
            stats: TrackerStats::default(),
            parsed: Vec::new(),
        }
    }

    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    fn unix_ns(&self, mono: u64) -> u64 {
        (mono as i128 + self.mono_to_unix_ns).clamp(0, u64::MAX as i128) as u64
    }

    /// Handles one kernel event; finished calls are appended to `out`.
    pub fn on_event(&mut self, ev: &Event<'_>, out: &mut Vec<Call>) {
        let key = (ev.tgid, ev.sk);
        let now = self.unix_ns(ev.mono_ns);
        if ev.kind == Kind::Close {
            if let Some(s) = self.sockets.remove(&key) {
                self.retire(s, out);
            }
            return;
        }
        if !self.sockets.contains_key(&key) {
            if self.sockets.len() >= self.limits.max_sockets.max(1) {
                self.evict(out);
            }
            let flow_id = self.next_flow;
            self.next_flow += 1;
            self.sockets.insert(
                key,
                Socket {
                    pid: ev.tgid,
                    comm: Arc::from(ev.comm),
                    local: ev.local,
                    remote: ev.remote,
                    flow_id,
                    proto: Proto::Detecting { tries: 0 },
                    pending: VecDeque::new(),
                    cap_seq: 0,
                    last_ns: now,
                },
            );
        }
        let Some(s) = self.sockets.get_mut(&key) else {
            return;
        };
        s.cap_seq = s.cap_seq.wrapping_add(1);
        s.last_ns = now;
        let meta = SegMeta {
            ts_ns: now,
            seq: ev.seq,
            tid: ev.tid,
            trace_id: ev.trace_id,
            cap_seq: s.cap_seq,
        };
        if let Proto::Detecting { tries } = &mut s.proto {
            match proto::detect(ev.data) {
                Some((l7, carries)) => {
                    let role = match (ev.dir, carries) {
                        (Dir::Egress, Carries::Requests) | (Dir::Ingress, Carries::Responses) => {
                            Role::Client
                        }
                        _ => Role::Server,
                    };
                    let (egress, ingress) = match role {
                        Role::Client => (Carries::Requests, Carries::Responses),
                        Role::Server => (Carries::Responses, Carries::Requests),
                    };
                    s.proto = Proto::Active {
                        l7,
                        role,
                        parsers: Box::new([Parser::new(l7, egress), Parser::new(l7, ingress)]),
                    };
                }
                None => {
                    *tries += 1;
                    if *tries >= self.limits.detect_tries {
                        s.proto = Proto::Ignored;
                        s.pending.clear();
                        self.stats.unknown_protocol += 1;
                    }
                    return;
                }
            }
        }
        let Proto::Active { l7, role, parsers } = &mut s.proto else {
            return;
        };
        let (l7, role) = (*l7, *role);
        let missing = (ev.total_len as u64).saturating_sub(ev.data.len() as u64);
        self.parsed.clear();
        parsers[ev.dir as usize].feed(meta, ev.data, missing, &mut self.parsed);
        for p in self.parsed.drain(..) {
            match p.msg {
                Message::Request(r) if r.one_way => {
                    out.push(call(s, l7, role, Some((p.meta, r)), None));
                }
                Message::Request(r) => {
                    if s.pending.len() >= self.limits.max_pending.max(1) {
                        if let Some(old) = s.pending.pop_front() {
                            self.stats.pending_overflow += 1;
                            out.push(call(s, l7, role, Some(old), None));
                        }
                    }
                    s.pending.push_back((p.meta, r));
                }
                Message::Response(r) => {
                    let req = s.pending.pop_front();
                    out.push(call(s, l7, role, req, Some((p.meta, r))));
                }
            }
        }
    }

    /// Requests waiting past the timeout leave request-only; sockets idle for ten timeouts
    /// (closed without the kernel side seeing it) are forgotten.
    pub fn tick(&mut self, now_unix_ns: u64, out: &mut Vec<Call>) {
        let timeout = self.limits.request_timeout_ns;
        let mut idle = Vec::new();
        for (k, s) in self.sockets.iter_mut() {
            if let Proto::Active { l7, role, .. } = s.proto {
                while s
                    .pending
                    .front()
                    .is_some_and(|(m, _)| now_unix_ns.saturating_sub(m.ts_ns) >= timeout)
                {
                    if let Some(old) = s.pending.pop_front() {
                        self.stats.timed_out += 1;
                        out.push(call(s, l7, role, Some(old), None));
                    }
                }
            }
            if now_unix_ns.saturating_sub(s.last_ns) >= timeout.saturating_mul(10) {
                idle.push(*k);
            }
        }
        for k in idle {
            if let Some(s) = self.sockets.remove(&k) {
                self.retire(s, out);
            }
        }
    }

    /// Everything still waiting leaves request-only (shutdown).
    pub fn flush(&mut self, out: &mut Vec<Call>) {
        let keys: Vec<Key> = self.sockets.keys().copied().collect();
        for k in keys {
            if let Some(s) = self.sockets.remove(&k) {
                self.retire(s, out);
            }
        }
    }

    /// Drops the least recently used eighth of the sockets.
    fn evict(&mut self, out: &mut Vec<Call>) {
        let mut ages: Vec<(u64, Key)> = self.sockets.iter().map(|(k, s)| (s.last_ns, *k)).collect();
        ages.sort_unstable();
        let n = (ages.len() / 8).max(1);
        for (_, k) in ages.into_iter().take(n) {
            if let Some(s) = self.sockets.remove(&k) {
                self.stats.evicted_sockets += 1;
                self.retire(s, out);
            }
        }
    }

    fn retire(&mut self, mut s: Socket, out: &mut Vec<Call>) {
        if let Proto::Active { l7, role, parsers } = &s.proto {
            let (l7, role) = (*l7, *role);
            let acc = self.done.entry(l7).or_default();
            for p in parsers.iter() {
                add(acc, p.stats());
            }
            while let Some(r) = s.pending.pop_front() {
                out.push(call(&s, l7, role, Some(r), None));
            }
        }
    }

    /// Parser counters per protocol, live sockets included.
    pub fn parse_stats(&self) -> HashMap<L7, ParseStats> {
        let mut all = self.done.clone();
        for s in self.sockets.values() {
            if let Proto::Active { l7, parsers, .. } = &s.proto {
                let acc = all.entry(*l7).or_default();
                for p in parsers.iter() {
                    add(acc, p.stats());
                }
            }
        }
        all
    }
}

fn add(acc: &mut ParseStats, s: ParseStats) {
    acc.messages += s.messages;
    acc.truncated += s.truncated;
    acc.garbage += s.garbage;
    acc.lost += s.lost;
}

fn call(
    s: &Socket,
    l7: L7,
    role: Role,
    request: Option<(SegMeta, Request)>,
    response: Option<(SegMeta, Response)>,
) -> Call {
    Call {
        l7,
        role,
        pid: s.pid,
        comm: s.comm.clone(),
        local: s.local,
        remote: s.remote,
        flow_id: s.flow_id,
        request,
        response,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn limits() -> Limits {
        Limits {
            max_sockets: 4,
            max_pending: 2,
            request_timeout_ns: 1_000_000_000,
            detect_tries: 2,
        }
    }

    pub struct Ev {
        pub sk: u64,
        pub tgid: u32,
        pub dir: Dir,
        pub seq: u32,
        pub ts: u64,
        pub trace_id: u64,
        pub data: Vec<u8>,
        pub total: u32,
    }

    pub fn ev(sk: u64, dir: Dir, seq: u32, ts: u64, data: &[u8]) -> Ev {
        Ev {
            sk,
            tgid: 100,
            dir,
            seq,
            ts,
            trace_id: 0,
            data: data.to_vec(),
            total: data.len() as u32,
        }
    }

    impl Ev {
        pub fn event(&self) -> Event<'_> {
            Event {
                mono_ns: self.ts,
                sk: self.sk,
                trace_id: self.trace_id,
                tgid: self.tgid,
                tid: self.tgid + 1,
                fd: 3,
                seq: self.seq,
                total_len: self.total,
                kind: Kind::Data,
                dir: self.dir,
                local: ("127.0.0.1".parse().unwrap(), 8080),
                remote: ("127.0.0.1".parse().unwrap(), 40001),
                comm: "nginx",
                data: &self.data,
            }
        }
    }

    #[test]
    fn server_pairs_keep_alive_requests_in_order() {
        let mut t = Tracker::new(limits(), 0);
        let mut out = Vec::new();
        let get = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        t.on_event(&ev(1, Dir::Ingress, 500, 10, get).event(), &mut out);
        assert!(out.is_empty());
        t.on_event(&ev(1, Dir::Egress, 9000, 20, resp).event(), &mut out);
        t.on_event(
            &ev(1, Dir::Egress, 9038, 30, b"HTTP/1.1 404 Not Found\r\n\r\n").event(),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|c| c.role == Role::Server && c.l7 == L7::Http1));
        let (qm, q) = out[0].request.as_ref().unwrap();
        let (rm, r) = out[0].response.as_ref().unwrap();
        assert_eq!(
            (q.resource.as_str(), qm.seq, qm.ts_ns, qm.cap_seq),
            ("/a", 500, 10, 1)
        );
        assert_eq!(
            (r.code, rm.seq, rm.ts_ns, rm.cap_seq),
            (Some(200), 9000, 20, 2)
        );
        let (qm2, q2) = out[1].request.as_ref().unwrap();
        assert_eq!((q2.resource.as_str(), qm2.seq), ("/b", 500 + 19));
        assert_eq!(out[1].response.as_ref().unwrap().1.code, Some(404));
        assert_eq!(out[0].flow_id, out[1].flow_id);
    }

    #[test]
    fn client_role_timeouts_overflow_and_close() {
        let mut t = Tracker::new(limits(), 0);
        let mut out = Vec::new();
        let cmd = b"*1\r\n$4\r\nPING\r\n";
        // Three pipelined commands with room for two: the first leaves request-only.
        for i in 0..3 {
            t.on_event(
                &ev(2, Dir::Egress, 100 + 14 * i, 10 + i as u64, cmd).event(),
                &mut out,
            );
        }
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats.pending_overflow, 1);
        assert!(out[0].response.is_none() && out[0].role == Role::Client && out[0].l7 == L7::Redis);
        out.clear();
        // One answer pairs with the oldest still waiting; the last times out on tick.
        t.on_event(&ev(2, Dir::Ingress, 7, 50, b"+PONG\r\n").event(), &mut out);
        assert_eq!(out[0].request.as_ref().unwrap().0.seq, 114);
        out.clear();
        t.tick(999_999_999, &mut out);
        assert!(out.is_empty());
        t.tick(1_000_000_012, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.stats.timed_out, 1);
        // A close retires the socket with its waiting requests.
        out.clear();
        t.on_event(&ev(2, Dir::Egress, 200, 60, cmd).event(), &mut out);
        let mut close = ev(2, Dir::Egress, 0, 70, b"");
        close.total = 0;
        let mut e = close.event();
        e.kind = Kind::Close;
        t.on_event(&e, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.sockets(), 0);
    }

    #[test]
    fn unknown_protocols_are_given_up_and_sockets_bounded() {
        let mut t = Tracker::new(limits(), 0);
        let mut out = Vec::new();
        for i in 0..3 {
            t.on_event(
                &ev(3, Dir::Ingress, i, i as u64, b"\x16\x03\x01garbage").event(),
                &mut out,
            );
        }
        assert_eq!(t.stats.unknown_protocol, 1);
        for sk in 10..20u64 {
            t.on_event(
                &ev(sk, Dir::Ingress, 1, sk, b"GET / HTTP/1.1\r\n\r\n").event(),
                &mut out,
            );
        }
        assert!(t.sockets() <= 4);
        assert!(t.stats.evicted_sockets >= 6);
        // The evicted sockets' requests left request-only.
        assert_eq!(out.len() as u64, t.stats.evicted_sockets - 1);
        let resp = ev(3, Dir::Egress, 1, 100, b"HTTP/1.1 200 OK\r\n\r\n");
        t.on_event(&resp.event(), &mut out);
    }

    #[test]
    fn response_without_request_and_clock_offset() {
        let mut t = Tracker::new(limits(), 1_700_000_000_000_000_000);
        let mut out = Vec::new();
        t.on_event(
            &ev(4, Dir::Ingress, 1, 5, b"HTTP/1.1 500 Oops\r\n\r\n").event(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert!(out[0].request.is_none());
        assert_eq!(out[0].role, Role::Client);
        assert_eq!(
            out[0].response.as_ref().unwrap().0.ts_ns,
            1_700_000_000_000_000_005
        );
    }
}

#[cfg(test)]
mod throughput {
    use super::tests::ev;
    use super::*;
    use crate::ebpf::span::SpanBuilder;

    /// Spans per second one core turns kernel events into (decode, parse, pair, build).
    /// A measurement, not a check: `cargo test --release -p tailweave-receivers throughput --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; run with --ignored --nocapture"]
    fn spans_per_second_on_one_core() {
        let limits = Limits {
            max_sockets: 65536,
            max_pending: 64,
            request_timeout_ns: u64::MAX / 4,
            detect_tries: 8,
        };
        let mut t = Tracker::new(limits, 0);
        let mut b = SpanBuilder::new("node", "node");
        let req = b"GET /api/cart/42?x=1 HTTP/1.1\r\nHost: shop\r\nUser-Agent: wrk\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Request-ID: 7f3a\r\n\r\n";
        let resp = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok";
        let n = 200_000u64;
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..256u64)
            .map(|sk| {
                let q = ev(sk, Dir::Ingress, 1, 1, req).event().encode();
                let r = ev(sk, Dir::Egress, 1, 2, resp).event().encode();
                (q, r)
            })
            .collect();
        let mut calls = Vec::new();
        let mut spans = 0u64;
        let mut build_time = std::time::Duration::ZERO;
        let start = std::time::Instant::now();
        for i in 0..n {
            let (q, r) = &records[(i % 256) as usize];
            for rec in [q, r] {
                if let Ok(e) = Event::decode(rec) {
                    t.on_event(&e, &mut calls);
                }
            }
            let bt = std::time::Instant::now();
            for c in calls.drain(..) {
                let s = b.build(&c);
                spans += s.raw.len().min(1) as u64;
            }
            build_time += bt.elapsed();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{spans} spans from {} events in {secs:.3}s: {:.0} spans/s on one core \
             ({:.3}s of it building spans)",
            2 * n,
            spans as f64 / secs,
            build_time.as_secs_f64()
        );
        assert_eq!(spans, n);
    }
}
