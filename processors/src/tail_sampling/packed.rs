//! How a waiting trace holds its spans: their encoded bytes copied into one buffer per trace,
//! and the scopes they sit under shared across traces.
//!
//! A span as it arrives is a 104-byte header plus a slice of its request buffer, and its scope
//! and resource are slices of that buffer too: one held span pins the whole request, however
//! much of it was decided already. For the seconds a trace waits, the sampler keeps instead:
//! - per span, a few bytes of framing and its encoded bytes, in its trace's buffer (grown
//!   exactly, so the buffer is as long as what it holds);
//! - per trace, the list of distinct scopes its spans came under;
//! - once per distinct resource + scope (byte-identical ones from many requests, as every batch
//!   of one SDK repeats its resource), a canonical copy in [`Scopes`].
//!
//! The request buffers are then released as soon as the batch is handled. The span headers are
//! parsed again from the bytes when the trace is decided (one walk of the span's top-level
//! fields), which costs less than keeping them: policies read most of what they need from the
//! trace's `Summary`.
//!
//! Spans that carry a normalized eBPF model are kept whole (the model is not in the bytes).

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use tailweave_core::span::SpanMarks;
use tailweave_core::wire::{put_varint, varint_len};
use tailweave_core::{Resource, Scope, Span, SpanSource};

const EBPF: u8 = 1;
const LATE: u8 = 2;
const TIMED_OUT: u8 = 4;
/// The span is the next entry of `Packed::whole`; no bytes follow.
const WHOLE: u8 = 8;

/// How many of a trace's most recent scopes are compared before a new one is added: spans of a
/// trace come from a few services, and a duplicate entry costs 8 bytes, a long scan more.
const SCOPE_SCAN: usize = 8;

/// The spans of one waiting trace. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    /// Per span: `flags u8 | varint scope index | varint length | encoded span`, or `flags`
    /// with `WHOLE` and a scope index of 0 and no bytes.
    buf: Vec<u8>,
    scopes: Vec<Arc<Scope>>,
    /// Boxed: rare, and the trace table holds one `Packed` per waiting trace.
    whole: Option<Box<[Span]>>,
    count: u32,
    /// Bytes of scopes that only this trace holds (not in [`Scopes`]).
    own_scope_bytes: u32,
}

/// One packed span, borrowed: what the log needs to write it.
pub(crate) struct Entry<'a> {
    pub scope: &'a Arc<Scope>,
    pub source: SpanSource,
    pub marks: SpanMarks,
    pub raw: &'a [u8],
}

fn flags(s: &Span) -> u8 {
    let mut f = 0;
    if s.source == SpanSource::Ebpf {
        f |= EBPF;
    }
    if s.marks.late {
        f |= LATE;
    }
    if s.marks.timed_out {
        f |= TIMED_OUT;
    }
    f
}

fn read_varint(b: &[u8], pos: &mut usize) -> usize {
    let mut out = 0usize;
    let mut shift = 0;
    while let Some(&x) = b.get(*pos) {
        *pos += 1;
        out |= ((x & 0x7f) as usize) << shift;
        if x < 0x80 {
            break;
        }
        shift += 7;
    }
    out
}

impl Packed {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Adds `span`, under `scope` (its canonical scope; `own_bytes` is what the scope costs if
    /// no other trace can share it).
    pub fn push(&mut self, span: Span, scope: Arc<Scope>, own_bytes: usize) {
        let si = match self
            .scopes
            .iter()
            .rev()
            .take(SCOPE_SCAN)
            .position(|s| Arc::ptr_eq(s, &scope))
        {
            Some(back) => self.scopes.len() - 1 - back,
            None => {
                self.scopes.reserve_exact(1);
                self.scopes.push(scope);
                self.own_scope_bytes = self.own_scope_bytes.saturating_add(own_bytes as u32);
                self.scopes.len() - 1
            }
        };
        self.count += 1;
        if span.ebpf.is_some() {
            self.buf.reserve_exact(1);
            self.buf.push(flags(&span) | WHOLE);
            let mut whole = self.whole.take().map(Vec::from).unwrap_or_default();
            whole.reserve_exact(1);
            whole.push(span);
            self.whole = Some(whole.into_boxed_slice());
            return;
        }
        let n = span.raw.len();
        let need = 1 + varint_len(si as u64) + varint_len(n as u64) + n;
        // Exact growth keeps the buffer as long as its spans (mimalloc reallocates in place
        // within a size class); past 64 KiB an eighth more is asked for, so a large trace
        // arriving span by span is not copied once per span.
        let extra = if self.buf.len() > 64 << 10 {
            need.max(self.buf.len() / 8)
        } else {
            need
        };
        if self.buf.capacity() - self.buf.len() < need {
            self.buf.reserve_exact(extra);
        }
        self.buf.push(flags(&span));
        put_varint(&mut self.buf, si as u64);
        put_varint(&mut self.buf, n as u64);
        self.buf.extend_from_slice(&span.raw);
    }

    /// Heap bytes this trace's spans occupy (its buffers at their capacity, the whole spans with
    /// what they hold, the scopes only it holds).
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity()
            + self.scopes.capacity() * std::mem::size_of::<Arc<Scope>>()
            + self
                .whole
                .as_ref()
                .map_or(0, |w| w.iter().map(|s| s.held_bytes()).sum::<usize>())
            + self.own_scope_bytes as usize
    }

    /// Every span, in arrival order, borrowed.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        let mut pos = 0usize;
        let mut whole = self.whole.iter().flat_map(|w| w.iter());
        std::iter::from_fn(move || {
            let f = *self.buf.get(pos)?;
            pos += 1;
            if f & WHOLE != 0 {
                let s = whole.next()?;
                return Some(Entry {
                    scope: &s.scope,
                    source: s.source,
                    marks: s.marks,
                    raw: &s.raw,
                });
            }
            let si = read_varint(&self.buf, &mut pos);
            let n = read_varint(&self.buf, &mut pos);
            let raw = self.buf.get(pos..pos + n)?;
            pos += n;
            Some(Entry {
                scope: self.scopes.get(si)?,
                source: if f & EBPF != 0 {
                    SpanSource::Ebpf
                } else {
                    SpanSource::Sdk
                },
                marks: SpanMarks {
                    late: f & LATE != 0,
                    timed_out: f & TIMED_OUT != 0,
                },
                raw,
            })
        })
    }

    /// The spans again, in arrival order: each one a slice of the trace's buffer with its header
    /// parsed from the bytes. `Err` counts spans whose bytes no longer parse (none should: they
    /// parsed when they arrived).
    pub fn into_spans(self) -> (Vec<Span>, usize) {
        let mut out = Vec::with_capacity(self.count as usize);
        let mut failed = 0;
        let buf = Bytes::from(self.buf);
        let mut whole = self.whole.map(Vec::from).unwrap_or_default().into_iter();
        let mut pos = 0usize;
        while let Some(&f) = buf.get(pos) {
            pos += 1;
            if f & WHOLE != 0 {
                out.extend(whole.next());
                continue;
            }
            let si = read_varint(&buf, &mut pos);
            let n = read_varint(&buf, &mut pos);
            let end = (pos + n).min(buf.len());
            let raw = buf.slice(pos..end);
            pos = end;
            let Some(scope) = self.scopes.get(si) else {
                failed += 1;
                continue;
            };
            match Span::from_raw(scope.clone(), raw) {
                Ok(mut s) => {
                    if f & EBPF != 0 {
                        s.source = SpanSource::Ebpf;
                    }
                    s.marks = SpanMarks {
                        late: f & LATE != 0,
                        timed_out: f & TIMED_OUT != 0,
                    };
                    out.push(s);
                }
                Err(_) => failed += 1,
            }
        }
        (out, failed)
    }
}

/// The canonical copy of each distinct resource + scope that waiting traces use, so thousands
/// of requests repeating one SDK's resource keep it once, and no request buffer stays pinned by
/// a scope. Bounded: past `max` entries a scope gets a copy of its own (still releasing the
/// request). Entries that no trace uses any more are purged by [`Scopes::purge`].
pub(crate) struct Scopes {
    map: hashbrown::HashMap<u64, Arc<Scope>>,
    hasher: hashbrown::DefaultHashBuilder,
    /// The last scope asked for and its answer: the spans of one `ScopeSpans` arrive together.
    last: Option<(Arc<Scope>, Arc<Scope>, usize)>,
    max: usize,
    bytes: usize,
    purged_at: usize,
}

/// Heap bytes of a scope copy and its resource.
fn scope_bytes(s: &Scope) -> usize {
    // Each `Arc` allocation holds two counts besides the value.
    2 * (2 * std::mem::size_of::<usize>())
        + std::mem::size_of::<Scope>()
        + std::mem::size_of::<Resource>()
        + s.raw.len()
        + s.schema_url.len()
        + s.resource.raw.len()
        + s.resource.schema_url.len()
}

fn same(a: &Scope, b: &Scope) -> bool {
    a.raw == b.raw
        && a.schema_url == b.schema_url
        && a.resource.raw == b.resource.raw
        && a.resource.schema_url == b.resource.schema_url
}

fn copy(s: &Scope) -> Arc<Scope> {
    let r = &s.resource;
    Scope::new(
        Resource::new(
            Bytes::copy_from_slice(&r.raw),
            Bytes::copy_from_slice(&r.schema_url),
        ),
        Bytes::copy_from_slice(&s.raw),
        Bytes::copy_from_slice(&s.schema_url),
    )
}

impl Scopes {
    pub fn new(max: usize) -> Self {
        Scopes {
            map: hashbrown::HashMap::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            last: None,
            max,
            bytes: 0,
            purged_at: 0,
        }
    }

    /// The canonical scope for `s`, and the bytes it costs the trace that takes it (0 when it is
    /// shared through this table).
    pub fn canon(&mut self, s: &Arc<Scope>) -> (Arc<Scope>, usize) {
        if let Some((asked, got, own)) = &self.last {
            if Arc::ptr_eq(asked, s) {
                return (got.clone(), *own);
            }
        }
        let mut h = self.hasher.build_hasher();
        s.raw.hash(&mut h);
        s.schema_url.hash(&mut h);
        s.resource.raw.hash(&mut h);
        s.resource.schema_url.hash(&mut h);
        let key = h.finish();
        let (got, own) = match self.map.get(&key) {
            Some(c) if Arc::ptr_eq(c, s) || same(c, s) => (c.clone(), 0),
            // Another scope with the same hash: this one goes unshared.
            Some(_) => {
                let c = copy(s);
                let n = scope_bytes(&c);
                (c, n)
            }
            None if self.map.len() < self.max => {
                let c = copy(s);
                self.bytes += scope_bytes(&c);
                self.map.insert(key, c.clone());
                (c, 0)
            }
            None => {
                let c = copy(s);
                let n = scope_bytes(&c);
                (c, n)
            }
        };
        self.last = Some((s.clone(), got.clone(), own));
        (got, own)
    }

    /// Ends a batch: the scope last asked for belongs to its request, which may go now.
    pub fn end_batch(&mut self) {
        self.last = None;
    }

    /// Forgets the scopes no trace holds any more, once the table has doubled since the last
    /// purge (so a steady table is not scanned on every tick).
    pub fn purge(&mut self) {
        let n = self.map.len();
        if n < self.max && n < 1024.max(2 * self.purged_at) {
            return;
        }
        self.purge_now();
    }

    pub fn purge_now(&mut self) {
        self.end_batch();
        let mut freed = 0;
        self.map.retain(|_, c| {
            let keep = Arc::strong_count(c) > 1;
            if !keep {
                freed += scope_bytes(c);
            }
            keep
        });
        self.bytes -= freed;
        self.purged_at = self.map.len();
        if self.map.capacity() > 4 * self.map.len().max(256) {
            self.map.shrink_to_fit();
        }
    }

    /// Heap bytes of the canonical scopes and the table.
    pub fn heap_bytes(&self) -> usize {
        self.bytes + self.map.capacity() * (std::mem::size_of::<(u64, Arc<Scope>)>() + 1)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;

    fn scope(service: &str) -> Arc<Scope> {
        let mut res = Vec::new();
        tailweave_core::wire::put_len_field(&mut res, 1, service.as_bytes());
        Scope::new(
            Resource::new(Bytes::from(res), Bytes::from_static(b"https://schema/r")),
            Bytes::from_static(b"\x0a\x03lib"),
            Bytes::new(),
        )
    }

    fn span(scope: &Arc<Scope>, id: u64, name: &str) -> Span {
        let p = ProtoSpan {
            trace_id: vec![7; 16],
            span_id: id.to_be_bytes().to_vec(),
            parent_span_id: if id == 1 {
                Vec::new()
            } else {
                vec![0, 0, 0, 0, 0, 0, 0, 1]
            },
            name: name.into(),
            kind: 2,
            start_time_unix_nano: 10 * id,
            end_time_unix_nano: 20 * id,
            ..Default::default()
        };
        Span::from_proto(scope.clone(), &p)
    }

    #[test]
    fn spans_come_back_as_they_went_in() {
        let (a, b) = (scope("a"), scope("b"));
        let mut p = Packed::default();
        let mut want = Vec::new();
        for i in 1..=300u64 {
            let sc = if i % 3 == 0 { &b } else { &a };
            // Names long enough that some spans need a two-byte length.
            let mut s = span(sc, i, &"n".repeat((i as usize * 7) % 200));
            s.marks.late = i % 5 == 0;
            s.marks.timed_out = i % 7 == 0;
            if i % 11 == 0 {
                s.source = SpanSource::Ebpf;
            }
            want.push(s.clone());
            p.push(s, sc.clone(), 0);
        }
        assert_eq!(p.len(), 300);
        // Two distinct scopes, each listed once.
        assert_eq!(p.scopes.len(), 2);
        let entries: Vec<_> = p
            .entries()
            .map(|e| (e.raw.to_vec(), e.source, e.marks))
            .collect();
        let (got, failed) = p.into_spans();
        assert_eq!(failed, 0);
        assert_eq!(got.len(), want.len());
        for ((g, w), e) in got.iter().zip(&want).zip(&entries) {
            assert_eq!(g.raw, w.raw);
            assert_eq!(
                (
                    g.trace_id,
                    g.span_id,
                    g.parent_span_id,
                    g.start_ns,
                    g.end_ns,
                    g.kind
                ),
                (
                    w.trace_id,
                    w.span_id,
                    w.parent_span_id,
                    w.start_ns,
                    w.end_ns,
                    w.kind
                )
            );
            assert_eq!((g.source, g.marks), (w.source, w.marks));
            assert!(Arc::ptr_eq(&g.scope, &w.scope));
            assert_eq!((&e.0[..], e.1, e.2), (&w.raw[..], w.source, w.marks));
        }
    }

    #[test]
    fn spans_with_an_ebpf_model_are_kept_whole_in_order() {
        let a = scope("a");
        let mut p = Packed::default();
        let mut e = span(&a, 2, "ebpf");
        e.source = SpanSource::Ebpf;
        e.ebpf = Some(Box::default());
        p.push(span(&a, 1, "sdk"), a.clone(), 0);
        p.push(e, a.clone(), 0);
        p.push(span(&a, 3, "sdk"), a.clone(), 0);
        let names: Vec<_> = p.entries().map(|e| e.raw.len()).collect();
        assert_eq!(names.len(), 3);
        let (got, _) = p.into_spans();
        let ids: Vec<u64> = got.iter().map(|s| s.span_id.as_u64()).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(got[1].ebpf.is_some() && got[0].ebpf.is_none());
        assert_eq!(got[1].name(), "ebpf");
    }

    #[test]
    fn the_buffer_is_as_long_as_what_it_holds() {
        let a = scope("a");
        let mut p = Packed::default();
        let mut raw = 0;
        for i in 1..=10u64 {
            let s = span(&a, i, "GET /api/items/{id}");
            raw += s.raw.len();
            p.push(s, a.clone(), 0);
        }
        // Three bytes of framing per span (flags, scope index, one-byte length).
        assert_eq!(p.buf.len(), raw + 30);
        assert_eq!(p.buf.capacity(), p.buf.len());
        assert_eq!(
            p.heap_bytes(),
            p.buf.len() + std::mem::size_of::<Arc<Scope>>()
        );
    }

    #[test]
    fn identical_scopes_from_different_requests_are_shared_and_purged_when_unused() {
        let mut sc = Scopes::new(10);
        let (a1, a2, b) = (scope("a"), scope("a"), scope("b"));
        let (c1, own1) = sc.canon(&a1);
        let (c2, own2) = sc.canon(&a2);
        let (c3, _) = sc.canon(&b);
        assert!(Arc::ptr_eq(&c1, &c2));
        assert!(!Arc::ptr_eq(&c1, &c3));
        assert_eq!((own1, own2), (0, 0));
        // The canonical copy is not the request's scope: it owns its bytes.
        assert!(!Arc::ptr_eq(&c1, &a1));
        assert_eq!(c1.resource.raw, a1.resource.raw);
        assert_eq!(c1.raw, a1.raw);
        assert_eq!(sc.len(), 2);
        let held = sc.heap_bytes();
        drop((c1, c2));
        sc.purge_now();
        assert_eq!(sc.len(), 1);
        assert!(sc.heap_bytes() < held);
        // A full table still copies (the request is released) but does not share.
        let mut full = Scopes::new(0);
        let (d, own) = full.canon(&a1);
        assert!(!Arc::ptr_eq(&d, &a1));
        assert!(own > 0);
        assert_eq!(
            Arc::strong_count(&a1),
            2,
            "remembered as the last scope asked for"
        );
        full.end_batch();
        assert_eq!(Arc::strong_count(&a1), 1);
    }
}
