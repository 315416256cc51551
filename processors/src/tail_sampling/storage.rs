//! Restart-safe state (`storage: file`): an append-only log of the spans of undecided traces and
//! of every decision, so a restart neither loses buffered traces nor decides a trace again.
//!
//! Each record is `tag u8 | len u32 | payload | check u32` (little endian; the check is FNV-1a
//! over tag and payload), so a record torn by a crash is recognised and the log is cut there.
//! Scopes (with their resource) are written once and referenced by id from span records; the
//! map that remembers which scopes were written holds `Weak`s, so it keeps no request buffer
//! alive and a freed scope's address cannot be mistaken for a new one.
//!
//! Records are handed to the OS at the end of every `process`/`tick` call (they survive
//! `kill -9`) and synced to disk on each tick. When the log has grown past twice its size after
//! the last compaction (and at least `COMPACT_MIN_BYTES`), it is rewritten from the live state:
//! the spans of undecided traces and the remembered decisions.
//!
//! Kept spans stay in the log until downstream took them: every batch the sampler emits carries
//! a fresh ack, and once it resolves a `delivered` record names its traces. A replay sends the
//! logged spans of kept traces with no such record again (at least once: a `kill -9` between
//! the decision and the next stage's write loses nothing), and compaction keeps them.
//!
//! Not kept: the normalized eBPF model of a span (`Span::ebpf`), and a trace's wait, which
//! restarts when the log is replayed.

use std::collections::HashMap as StdHashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use bytes::{Buf, BufMut, Bytes};
use tailweave_core::span::SpanMarks;
use tailweave_core::{Resource, Scope, Span, SpanSource};

use super::cache::Cached;
use super::packed::Entry;

/// The log is rewritten only once it holds at least this much.
pub(crate) const COMPACT_MIN_BYTES: u64 = 64 << 20;
/// Scopes remembered as written before the map starts afresh (ids are never reused).
const MAX_SCOPE_IDS: usize = 65_536;

const TAG_SCOPE: u8 = 1;
const TAG_SPAN: u8 = 2;
const TAG_DECISION: u8 = 3;
/// The kept spans of a trace reached the stage after the sampler (its ack resolved): a replay
/// need not send them again.
const TAG_DELIVERED: u8 = 4;

/// A decision as logged: the cache key of the trace and the policy by name (ids change with
/// the config).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LoggedDecision {
    pub key: u64,
    pub kept: Option<(String, f64)>,
}

/// What a replay found, in log order.
#[derive(Default)]
pub(crate) struct Replayed {
    pub spans: Vec<Span>,
    pub decisions: Vec<LoggedDecision>,
    /// Keys of kept traces whose spans downstream took.
    pub delivered: Vec<u64>,
    /// Bytes cut from the end of the log (a torn record).
    pub truncated: u64,
}

pub(crate) struct Storage {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    scopes: StdHashMap<usize, (u32, Weak<Scope>)>,
    next_scope: u32,
    len: u64,
    compacted_len: u64,
    /// No compaction below this size (`COMPACT_MIN_BYTES`; smaller in tests).
    compact_min: u64,
    dirty: bool,
}

fn check(tag: u8, payload: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in std::iter::once(&tag).chain(payload) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.put_u32_le(v.len() as u32);
    b.put_slice(v);
}

fn get_bytes(p: &mut Bytes) -> io::Result<Bytes> {
    if p.remaining() < 4 {
        return Err(bad("short field"));
    }
    let n = p.get_u32_le() as usize;
    if p.remaining() < n {
        return Err(bad("short field"));
    }
    Ok(p.split_to(n))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Appends one framed record to `out`.
fn frame(out: &mut Vec<u8>, tag: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.put_u8(tag);
    out.put_u32_le(0);
    payload(out);
    let len = out.len() - start - 5;
    out[start + 1..start + 5].copy_from_slice(&(len as u32).to_le_bytes());
    let c = check(tag, &out[start + 5..]);
    out.put_u32_le(c);
}

impl Storage {
    /// Opens (creating if needed) the log `name` in `dir` and reads what it holds. A torn last
    /// record is cut off.
    pub fn open(dir: &Path, name: &str) -> io::Result<(Storage, Replayed)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.log"));
        let mut data = Vec::new();
        if let Ok(mut f) = File::open(&path) {
            f.read_to_end(&mut data)?;
        }
        let total = data.len() as u64;
        let (replayed, good) = replay(Bytes::from(data));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.set_len(good)?;
        let mut st = Storage {
            path,
            file,
            buf: Vec::new(),
            scopes: StdHashMap::new(),
            next_scope: 0,
            len: good,
            compacted_len: good,
            compact_min: COMPACT_MIN_BYTES,
            dirty: false,
        };
        st.seek_end()?;
        Ok((
            st,
            Replayed {
                truncated: total - good,
                ..replayed
            },
        ))
    }

    fn seek_end(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(self.len))?;
        Ok(())
    }

    fn scope_id(&mut self, scope: &Arc<Scope>) -> u32 {
        let addr = Arc::as_ptr(scope) as usize;
        if let Some((id, w)) = self.scopes.get(&addr) {
            if w.strong_count() > 0 {
                return *id;
            }
        }
        if self.scopes.len() >= MAX_SCOPE_IDS {
            self.scopes.clear();
        }
        let id = self.next_scope;
        self.next_scope = self.next_scope.wrapping_add(1);
        self.scopes.insert(addr, (id, Arc::downgrade(scope)));
        let r = &scope.resource;
        frame(&mut self.buf, TAG_SCOPE, |b| {
            b.put_u32_le(id);
            put_bytes(b, &r.raw);
            put_bytes(b, &r.schema_url);
            put_bytes(b, &scope.raw);
            put_bytes(b, &scope.schema_url);
        });
        id
    }

    /// Logs a span that is now buffered.
    pub fn span(&mut self, s: &Span) {
        self.entry(Entry {
            scope: &s.scope,
            source: s.source,
            marks: s.marks,
            raw: &s.raw,
        });
    }

    /// Logs a held span from its parts.
    pub fn entry(&mut self, e: Entry<'_>) {
        let scope = self.scope_id(e.scope);
        frame(&mut self.buf, TAG_SPAN, |b| {
            b.put_u32_le(scope);
            b.put_u8(match e.source {
                SpanSource::Sdk => 0,
                SpanSource::Ebpf => 1,
            });
            b.put_u8(e.marks.late as u8 | (e.marks.timed_out as u8) << 1);
            put_bytes(b, e.raw);
        });
    }

    /// Logs a decision.
    pub fn decision(&mut self, key: u64, kept: Option<(&str, f64)>) {
        frame(&mut self.buf, TAG_DECISION, |b| {
            b.put_u64_le(key);
            match kept {
                Some((policy, adjusted)) => {
                    b.put_u8(1);
                    b.put_f64_le(adjusted);
                    put_bytes(b, policy.as_bytes());
                }
                None => b.put_u8(0),
            }
        });
    }

    /// Logs that downstream took the kept spans of trace `key` sent so far.
    pub fn delivered(&mut self, key: u64) {
        frame(&mut self.buf, TAG_DELIVERED, |b| b.put_u64_le(key));
    }

    /// Hands the records written so far to the OS.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf)?;
        self.len += self.buf.len() as u64;
        self.buf.clear();
        self.dirty = true;
        Ok(())
    }

    /// Flushes and makes the log durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn set_compact_min(&mut self, bytes: u64) {
        self.compact_min = bytes;
    }

    pub fn len(&self) -> u64 {
        self.len + self.buf.len() as u64
    }

    pub fn wants_compaction(&self) -> bool {
        self.len() > self.compact_min.max(2 * self.compacted_len)
    }

    /// Replaces the log with `spans` and `decisions` (written to a new file, synced, renamed).
    pub fn compact<'a>(
        &mut self,
        spans: impl Iterator<Item = Entry<'a>>,
        decisions: impl Iterator<Item = (u64, Option<(&'a str, f64)>)>,
    ) -> io::Result<()> {
        self.buf.clear();
        self.scopes.clear();
        for (key, kept) in decisions {
            self.decision(key, kept);
        }
        for e in spans {
            self.entry(e);
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&self.buf)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        self.len = self.buf.len() as u64;
        self.compacted_len = self.len;
        self.buf.clear();
        self.file = OpenOptions::new().write(true).open(&self.path)?;
        self.seek_end()?;
        self.dirty = false;
        Ok(())
    }
}

/// Reads records until the end or the first damaged one; returns them and the good length.
pub(super) fn replay(mut data: Bytes) -> (Replayed, u64) {
    let mut out = Replayed::default();
    let mut scopes: StdHashMap<u32, Arc<Scope>> = StdHashMap::new();
    let mut good = 0u64;
    while data.remaining() >= 9 {
        let tag = data[0];
        let len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data.remaining() < 9 + len {
            break;
        }
        let payload = data.slice(5..5 + len);
        let c = u32::from_le_bytes([data[5 + len], data[6 + len], data[7 + len], data[8 + len]]);
        if c != check(tag, &payload) {
            break;
        }
        if apply(tag, payload, &mut scopes, &mut out).is_err() {
            break;
        }
        data.advance(9 + len);
        good += 9 + len as u64;
    }
    (out, good)
}

fn apply(
    tag: u8,
    mut p: Bytes,
    scopes: &mut StdHashMap<u32, Arc<Scope>>,
    out: &mut Replayed,
) -> io::Result<()> {
    match tag {
        TAG_SCOPE => {
            if p.remaining() < 4 {
                return Err(bad("short scope"));
            }
            let id = p.get_u32_le();
            let rraw = get_bytes(&mut p)?;
            let rschema = get_bytes(&mut p)?;
            let sraw = get_bytes(&mut p)?;
            let sschema = get_bytes(&mut p)?;
            scopes.insert(id, Scope::new(Resource::new(rraw, rschema), sraw, sschema));
        }
        TAG_SPAN => {
            if p.remaining() < 6 {
                return Err(bad("short span"));
            }
            let scope = scopes
                .get(&p.get_u32_le())
                .cloned()
                .ok_or_else(|| bad("unknown scope"))?;
            let source = if p.get_u8() == 1 {
                SpanSource::Ebpf
            } else {
                SpanSource::Sdk
            };
            let m = p.get_u8();
            let raw = get_bytes(&mut p)?;
            let mut s = Span::from_raw(scope, raw).map_err(|_| bad("bad span"))?;
            s.source = source;
            s.marks = SpanMarks {
                late: m & 1 != 0,
                timed_out: m & 2 != 0,
            };
            out.spans.push(s);
        }
        TAG_DECISION => {
            if p.remaining() < 9 {
                return Err(bad("short decision"));
            }
            let key = p.get_u64_le();
            let kept = if p.get_u8() == 1 {
                if p.remaining() < 8 {
                    return Err(bad("short decision"));
                }
                let adjusted = p.get_f64_le();
                let name = get_bytes(&mut p)?;
                Some((String::from_utf8_lossy(&name).into_owned(), adjusted))
            } else {
                None
            };
            out.decisions.push(LoggedDecision { key, kept });
        }
        TAG_DELIVERED => {
            if p.remaining() < 8 {
                return Err(bad("short delivered"));
            }
            out.delivered.push(p.get_u64_le());
        }
        _ => return Err(bad("unknown record")),
    }
    Ok(())
}

/// `Cached` with the policy named, for the log.
pub(crate) fn logged<'a>(c: Cached, name: impl FnOnce(u32) -> &'a str) -> Option<(&'a str, f64)> {
    match c {
        Cached::Kept { policy, adjusted } => Some((name(policy), adjusted)),
        Cached::Dropped => None,
    }
}
