//! The join's restart-safe log (`storage: file`): the spans it holds and which of them went out
//! in units that downstream took.
//!
//! The framing, the scope records (a scope with its resource, written once and referenced by
//! id) and the file handling are `crate::record_log`'s, shared with `tail_sampling`. This log's
//! own records:
//! - span: a log id (growing with arrival), the scope id, source, marks, the encoded span and
//!   the normalized eBPF model, which the join's rules read and which the span's attributes
//!   alone cannot always give back (the native `ebpf` receiver fills it directly);
//! - done: the log ids of spans that left the join for good (their unit was taken downstream,
//!   or they were dropped by rule).
//!
//! A replay keeps the spans with no done record, in log id order.

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use hashbrown::HashSet;
use tailweave_core::ebpf::{EbpfSpan, Signal, TapSide};
use tailweave_core::span::SpanMarks;
use tailweave_core::{Scope, Span, SpanSource};

use crate::record_log::{self, bad, put_bytes, RecordLog, TAG_SCOPE};

const TAG_SPAN: u8 = 2;
const TAG_DONE: u8 = 3;

/// What a replay found.
#[derive(Default)]
pub(crate) struct Replayed {
    /// Spans without a done record, by log id (ascending: arrival order).
    pub spans: Vec<(u64, Span)>,
    /// The largest log id seen (done records included), so new ids never repeat one.
    pub max_lid: u64,
    /// Bytes cut from the end of the log (a torn or damaged record).
    pub truncated: u64,
}

pub(crate) struct Storage {
    pub(super) log: RecordLog,
}

/// Reads fields of one record; every read is checked, a short record is an error.
struct Rd<'a> {
    p: Bytes,
    strs: &'a mut StdHashMap<Bytes, Arc<str>>,
}

impl Rd<'_> {
    fn need(&self, n: usize) -> io::Result<()> {
        if self.p.remaining() < n {
            return Err(bad("short record"));
        }
        Ok(())
    }
    fn u8(&mut self) -> io::Result<u8> {
        self.need(1)?;
        Ok(self.p.get_u8())
    }
    fn u16(&mut self) -> io::Result<u16> {
        self.need(2)?;
        Ok(self.p.get_u16_le())
    }
    fn u32(&mut self) -> io::Result<u32> {
        self.need(4)?;
        Ok(self.p.get_u32_le())
    }
    fn u64(&mut self) -> io::Result<u64> {
        self.need(8)?;
        Ok(self.p.get_u64_le())
    }
    fn bytes(&mut self) -> io::Result<Bytes> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.p.split_to(n))
    }
    fn arr<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.p.copy_to_slice(&mut a);
        Ok(a)
    }
    /// Strings repeat across spans (agents, hosts, namespaces): one allocation each per replay.
    fn str(&mut self) -> io::Result<Arc<str>> {
        let b = self.bytes()?;
        if let Some(s) = self.strs.get(&b) {
            return Ok(s.clone());
        }
        let s: Arc<str> = Arc::from(String::from_utf8_lossy(&b).as_ref());
        self.strs.insert(b, s.clone());
        Ok(s)
    }
    fn opt_str(&mut self) -> io::Result<Option<Arc<str>>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.str()?),
        })
    }
    fn ip(&mut self) -> io::Result<Option<IpAddr>> {
        Ok(match self.u8()? {
            0 => None,
            4 => Some(IpAddr::from(self.arr::<4>()?)),
            6 => Some(IpAddr::from(self.arr::<16>()?)),
            _ => return Err(bad("bad address")),
        })
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_bytes(b, s.as_bytes());
}

fn put_opt_str(b: &mut Vec<u8>, s: &Option<Arc<str>>) {
    match s {
        None => b.put_u8(0),
        Some(s) => {
            b.put_u8(1);
            put_str(b, s);
        }
    }
}

fn put_ip(b: &mut Vec<u8>, ip: &Option<IpAddr>) {
    match ip {
        None => b.put_u8(0),
        Some(IpAddr::V4(a)) => {
            b.put_u8(4);
            b.put_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            b.put_u8(6);
            b.put_slice(&a.octets());
        }
    }
}

/// Writes every field of the model; `decode_model` reads them back in the same order.
pub(crate) fn encode_model(b: &mut Vec<u8>, e: &EbpfSpan) {
    b.put_u64_le(e.row_id);
    b.put_u32_le(e.merged_row_ids.len() as u32);
    for r in &e.merged_row_ids {
        b.put_u64_le(*r);
    }
    b.put_slice(&e.otlp_trace_id);
    match e.trace_key {
        None => b.put_u8(0),
        Some(k) => {
            b.put_u8(1);
            b.put_slice(&k);
        }
    }
    match e.header_span_id {
        None => b.put_u8(0),
        Some(h) => {
            b.put_u8(1);
            b.put_slice(&h);
        }
    }
    b.put_u64_le(e.flow_id);
    b.put_u8(match e.signal {
        Signal::Ebpf => 0,
        Signal::Packet => 1,
        Signal::Other => 2,
    });
    put_str(b, e.tap_side.code());
    put_str(b, &e.agent);
    b.put_u8(e.l7_protocol);
    b.put_u8(e.is_tls as u8);
    b.put_u8(e.l4_protocol);
    match e.request_id {
        None => b.put_u8(0),
        Some(r) => {
            b.put_u8(1);
            b.put_u64_le(r);
        }
    }
    put_opt_str(b, &e.endpoint);
    b.put_u32_le(e.req_tcp_seq);
    b.put_u32_le(e.resp_tcp_seq);
    b.put_u64_le(e.syscall_req);
    b.put_u64_le(e.syscall_resp);
    for side in 0..2 {
        b.put_u32_le(e.syscall_thread[side]);
        b.put_u32_le(e.syscall_cap_seq[side]);
        put_opt_str(b, &e.x_request_id[side]);
        b.put_u32_le(e.pid[side]);
        put_opt_str(b, &e.process_name[side]);
        put_opt_str(b, &e.instance[side]);
        put_opt_str(b, &e.host[side]);
        put_opt_str(b, &e.namespace[side]);
        put_ip(b, &e.ip[side]);
        b.put_u16_le(e.port[side]);
    }
    b.put_u64_le(e.start_ns);
    b.put_u64_le(e.end_ns);
    b.put_u64_le(e.duration_us);
    b.put_u16_le(e.flags);
}

fn decode_model(r: &mut Rd<'_>) -> io::Result<EbpfSpan> {
    let mut e = EbpfSpan {
        row_id: r.u64()?,
        ..Default::default()
    };
    let n = r.u32()? as usize;
    r.need(n.saturating_mul(8))?;
    e.merged_row_ids = (0..n).map(|_| r.p.get_u64_le()).collect();
    e.otlp_trace_id = r.arr()?;
    e.trace_key = match r.u8()? {
        0 => None,
        _ => Some(r.arr()?),
    };
    e.header_span_id = match r.u8()? {
        0 => None,
        _ => Some(r.arr()?),
    };
    e.flow_id = r.u64()?;
    e.signal = match r.u8()? {
        0 => Signal::Ebpf,
        1 => Signal::Packet,
        _ => Signal::Other,
    };
    e.tap_side = TapSide::parse(&r.str()?);
    e.agent = r.str()?;
    e.l7_protocol = r.u8()?;
    e.is_tls = r.u8()? != 0;
    e.l4_protocol = r.u8()?;
    e.request_id = match r.u8()? {
        0 => None,
        _ => Some(r.u64()?),
    };
    e.endpoint = r.opt_str()?;
    e.req_tcp_seq = r.u32()?;
    e.resp_tcp_seq = r.u32()?;
    e.syscall_req = r.u64()?;
    e.syscall_resp = r.u64()?;
    for side in 0..2 {
        e.syscall_thread[side] = r.u32()?;
        e.syscall_cap_seq[side] = r.u32()?;
        e.x_request_id[side] = r.opt_str()?;
        e.pid[side] = r.u32()?;
        e.process_name[side] = r.opt_str()?;
        e.instance[side] = r.opt_str()?;
        e.host[side] = r.opt_str()?;
        e.namespace[side] = r.opt_str()?;
        e.ip[side] = r.ip()?;
        e.port[side] = r.u16()?;
    }
    e.start_ns = r.u64()?;
    e.end_ns = r.u64()?;
    e.duration_us = r.u64()?;
    e.flags = r.u16()?;
    Ok(e)
}

impl Storage {
    /// Opens (creating if needed) the log `name` in `dir` and reads what it holds. A torn or
    /// damaged record and everything after it are cut off.
    pub fn open(dir: &Path, name: &str) -> io::Result<(Storage, Replayed)> {
        let (log, replayed, truncated) = RecordLog::open(dir, name, replay)?;
        Ok((
            Storage { log },
            Replayed {
                truncated,
                ..replayed
            },
        ))
    }

    /// Logs a span the join now holds, under log id `lid`.
    pub fn span(&mut self, lid: u64, s: &Span) {
        write_span(&mut self.log, lid, s);
    }

    /// Logs that the spans `lids` left the join for good.
    pub fn done(&mut self, lids: impl ExactSizeIterator<Item = u64>) {
        if lids.len() == 0 {
            return;
        }
        self.log.record(TAG_DONE, |b| {
            b.put_u32_le(lids.len() as u32);
            for l in lids {
                b.put_u64_le(l);
            }
        });
    }

    /// Hands the records written so far to the OS (they survive `kill -9` from here on).
    pub fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }

    /// Flushes and makes the log durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync()
    }

    pub fn wants_compaction(&self) -> bool {
        self.log.wants_compaction()
    }

    /// Replaces the log with `spans`.
    pub fn compact<'a>(&mut self, spans: impl Iterator<Item = (u64, &'a Span)>) -> io::Result<()> {
        self.log.rewrite(|log| {
            for (lid, s) in spans {
                write_span(log, lid, s);
            }
        })
    }
}

fn write_span(log: &mut RecordLog, lid: u64, s: &Span) {
    let scope = log.scope_id(&s.scope);
    log.record(TAG_SPAN, |b| {
        b.put_u64_le(lid);
        b.put_u32_le(scope);
        b.put_u8(match s.source {
            SpanSource::Sdk => 0,
            SpanSource::Ebpf => 1,
        });
        b.put_u8(s.marks.late as u8 | (s.marks.timed_out as u8) << 1);
        put_bytes(b, &s.raw);
        match s.ebpf.as_deref() {
            None => b.put_u8(0),
            Some(e) => {
                b.put_u8(1);
                encode_model(b, e);
            }
        }
    });
}

/// Reads records until the end or the first damaged one; returns what they say and the good
/// length.
pub(crate) fn replay(data: Bytes) -> (Replayed, u64) {
    let mut scopes: StdHashMap<u32, Arc<Scope>> = StdHashMap::new();
    let mut strs: StdHashMap<Bytes, Arc<str>> = StdHashMap::new();
    let mut spans: Vec<(u64, Span)> = Vec::new();
    let mut done: HashSet<u64> = HashSet::new();
    let mut max_lid = 0u64;
    let good = record_log::records(data, |tag, payload| {
        let mut r = Rd {
            p: payload,
            strs: &mut strs,
        };
        match tag {
            TAG_SCOPE => record_log::read_scope(&mut r.p).map(|(id, s)| {
                scopes.insert(id, s);
            }),
            TAG_SPAN => read_span(&mut r, &scopes).map(|(lid, s)| {
                max_lid = max_lid.max(lid);
                spans.push((lid, s));
            }),
            TAG_DONE => read_done(&mut r).map(|lids| {
                for l in lids {
                    max_lid = max_lid.max(l);
                    done.insert(l);
                }
            }),
            _ => Err(bad("unknown record")),
        }
    });
    spans.retain(|(lid, _)| !done.contains(lid));
    spans.sort_by_key(|(lid, _)| *lid);
    // A span logged twice (never by this code, but a log is input) is held once.
    spans.dedup_by_key(|(lid, _)| *lid);
    (
        Replayed {
            spans,
            max_lid,
            truncated: 0,
        },
        good,
    )
}

fn read_span(r: &mut Rd<'_>, scopes: &StdHashMap<u32, Arc<Scope>>) -> io::Result<(u64, Span)> {
    let lid = r.u64()?;
    let scope = scopes
        .get(&r.u32()?)
        .cloned()
        .ok_or_else(|| bad("unknown scope"))?;
    let source = match r.u8()? {
        1 => SpanSource::Ebpf,
        _ => SpanSource::Sdk,
    };
    let m = r.u8()?;
    let raw = r.bytes()?;
    let mut s = Span::from_raw(scope, raw).map_err(|_| bad("bad span"))?;
    s.source = source;
    s.marks = SpanMarks {
        late: m & 1 != 0,
        timed_out: m & 2 != 0,
    };
    if r.u8()? != 0 {
        s.ebpf = Some(Box::new(decode_model(r)?));
    }
    Ok((lid, s))
}

fn read_done(r: &mut Rd<'_>) -> io::Result<Vec<u64>> {
    let n = r.u32()? as usize;
    r.need(n.saturating_mul(8))?;
    Ok((0..n).map(|_| r.p.get_u64_le()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field named (no `..Default::default()`): a field added to the model fails to
    /// compile here until the codec writes it too.
    #[test]
    fn every_field_of_the_model_round_trips() {
        let s = |v: &str| Some(Arc::<str>::from(v));
        let e = EbpfSpan {
            row_id: 7,
            merged_row_ids: vec![8, 9],
            otlp_trace_id: [3; 16],
            trace_key: Some([4; 16]),
            header_span_id: Some([5; 8]),
            flow_id: 11,
            signal: Signal::Packet,
            tap_side: TapSide::Other("weird".into()),
            agent: "agent-1".into(),
            l7_protocol: 21,
            is_tls: true,
            l4_protocol: 6,
            request_id: Some(13),
            endpoint: s("/login"),
            req_tcp_seq: 17,
            resp_tcp_seq: 19,
            syscall_req: 23,
            syscall_resp: 29,
            syscall_thread: [31, 37],
            syscall_cap_seq: [41, 43],
            x_request_id: [s("x0"), None],
            pid: [47, 53],
            process_name: [None, s("mysqld")],
            instance: [s("i0"), s("i1")],
            host: [s("h0"), None],
            namespace: [s("game"), s("game")],
            ip: [
                Some(IpAddr::from([10, 0, 0, 1])),
                Some(IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, 1])),
            ],
            port: [40000, 3306],
            start_ns: 59,
            end_ns: 61,
            duration_us: 67,
            flags: 0x1ff,
        };
        let mut b = Vec::new();
        encode_model(&mut b, &e);
        let mut strs = StdHashMap::new();
        let mut r = Rd {
            p: Bytes::from(b.clone()),
            strs: &mut strs,
        };
        assert_eq!(decode_model(&mut r).unwrap(), e);
        assert_eq!(r.p.remaining(), 0);
        for cut in 0..b.len() {
            let mut r = Rd {
                p: Bytes::copy_from_slice(&b[..cut]),
                strs: &mut strs,
            };
            assert!(
                decode_model(&mut r).is_err(),
                "a model cut at {cut} is refused"
            );
        }
    }

    #[test]
    fn garbage_never_panics_and_replays_nothing() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in [0usize, 1, 8, 9, 64, 4096] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let (r, good) = replay(Bytes::from(data));
            assert_eq!((r.spans.len(), good), (0, 0));
        }
    }
}
