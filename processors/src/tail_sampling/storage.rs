//! Restart-safe state (`storage: file`): an append-only log of the spans of undecided traces and
//! of every decision, so a restart neither loses buffered traces nor decides a trace again.
//!
//! The framing, the scope records and the file handling are `crate::record_log`'s; the span,
//! decision and delivered records are this module's.
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
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use tailweave_core::span::SpanMarks;
use tailweave_core::{Scope, Span, SpanSource};

use super::cache::Cached;
use super::packed::Entry;
use crate::record_log::{self, bad, get_bytes, put_bytes, RecordLog, TAG_SCOPE};

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
    log: RecordLog,
}

impl Storage {
    /// Opens (creating if needed) the log `name` in `dir` and reads what it holds. A torn last
    /// record is cut off.
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
        write_entry(&mut self.log, e);
    }

    /// Logs a decision.
    pub fn decision(&mut self, key: u64, kept: Option<(&str, f64)>) {
        write_decision(&mut self.log, key, kept);
    }

    /// Logs that downstream took the kept spans of trace `key` sent so far.
    pub fn delivered(&mut self, key: u64) {
        self.log.record(TAG_DELIVERED, |b| b.put_u64_le(key));
    }

    /// Hands the records written so far to the OS.
    pub fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }

    /// Flushes and makes the log durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync()
    }

    #[cfg(test)]
    pub fn set_compact_min(&mut self, bytes: u64) {
        self.log.set_compact_min(bytes);
    }

    pub fn wants_compaction(&self) -> bool {
        self.log.wants_compaction()
    }

    /// Replaces the log with `decisions` and `spans`.
    pub fn compact<'a>(
        &mut self,
        spans: impl Iterator<Item = Entry<'a>>,
        decisions: impl Iterator<Item = (u64, Option<(&'a str, f64)>)>,
    ) -> io::Result<()> {
        self.log.rewrite(|log| {
            for (key, kept) in decisions {
                write_decision(log, key, kept);
            }
            for e in spans {
                write_entry(log, e);
            }
        })
    }
}

fn write_entry(log: &mut RecordLog, e: Entry<'_>) {
    let scope = log.scope_id(e.scope);
    log.record(TAG_SPAN, |b| {
        b.put_u32_le(scope);
        b.put_u8(match e.source {
            SpanSource::Sdk => 0,
            SpanSource::Ebpf => 1,
        });
        b.put_u8(e.marks.late as u8 | (e.marks.timed_out as u8) << 1);
        put_bytes(b, e.raw);
    });
}

fn write_decision(log: &mut RecordLog, key: u64, kept: Option<(&str, f64)>) {
    log.record(TAG_DECISION, |b| {
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

/// Reads records until the end or the first damaged one; returns them and the good length.
pub(super) fn replay(data: Bytes) -> (Replayed, u64) {
    let mut out = Replayed::default();
    let mut scopes: StdHashMap<u32, Arc<Scope>> = StdHashMap::new();
    let good = record_log::records(data, |tag, payload| {
        apply(tag, payload, &mut scopes, &mut out)
    });
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
            let (id, scope) = record_log::read_scope(&mut p)?;
            scopes.insert(id, scope);
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
