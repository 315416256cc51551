//! The checked append-only log under `storage: file` of `join` and `tail_sampling`: the framing,
//! the scope records both write, appending, syncing, and rewriting from live state. What the
//! records mean is each processor's own (`join/storage.rs`, `tail_sampling/storage.rs`).
//!
//! Each record is `tag u8 | len u32 | payload | check u32` (little endian; the check is FNV-1a
//! over tag and payload), so a record torn by a crash is recognised and the log is cut there.
//! Scopes (with their resource) are written once, as tag [`TAG_SCOPE`], and referenced by id;
//! the map that remembers which scopes were written holds `Weak`s, so it keeps no request buffer
//! alive and a freed scope's address cannot be mistaken for a new one.

use std::collections::HashMap as StdHashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use bytes::{Buf, BufMut, Bytes};
use tailweave_core::{Resource, Scope};

/// The log is rewritten only once it holds at least this much.
pub(crate) const COMPACT_MIN_BYTES: u64 = 64 << 20;
/// Scopes remembered as written before the map starts afresh (ids are never reused).
const MAX_SCOPE_IDS: usize = 65_536;
/// The tag of a scope record, the same in every log.
pub(crate) const TAG_SCOPE: u8 = 1;

fn check(tag: u8, payload: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in std::iter::once(&tag).chain(payload) {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub(crate) fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A length-prefixed byte field.
pub(crate) fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.put_u32_le(v.len() as u32);
    b.put_slice(v);
}

/// Reads a field written by [`put_bytes`].
pub(crate) fn get_bytes(p: &mut Bytes) -> io::Result<Bytes> {
    if p.remaining() < 4 {
        return Err(bad("short field"));
    }
    let n = p.get_u32_le() as usize;
    if p.remaining() < n {
        return Err(bad("short field"));
    }
    Ok(p.split_to(n))
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

/// Reads the payload of a [`TAG_SCOPE`] record: its id and the scope with its resource.
pub(crate) fn read_scope(p: &mut Bytes) -> io::Result<(u32, Arc<Scope>)> {
    if p.remaining() < 4 {
        return Err(bad("short scope"));
    }
    let id = p.get_u32_le();
    let rraw = get_bytes(p)?;
    let rschema = get_bytes(p)?;
    let sraw = get_bytes(p)?;
    let sschema = get_bytes(p)?;
    Ok((id, Scope::new(Resource::new(rraw, rschema), sraw, sschema)))
}

/// Hands each record of `data` (tag, payload) to `apply`, in order, until the end, the first
/// torn or damaged record, or the first one `apply` refuses; returns the length of the good part.
pub(crate) fn records(mut data: Bytes, mut apply: impl FnMut(u8, Bytes) -> io::Result<()>) -> u64 {
    let mut good = 0u64;
    while data.remaining() >= 9 {
        let tag = data[0];
        let len = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
        if data.remaining() - 9 < len {
            break;
        }
        let payload = data.slice(5..5 + len);
        let c = u32::from_le_bytes([data[5 + len], data[6 + len], data[7 + len], data[8 + len]]);
        if c != check(tag, &payload) || apply(tag, payload).is_err() {
            break;
        }
        data.advance(9 + len);
        good += 9 + len as u64;
    }
    good
}

/// One log file: records are framed into a buffer, handed to the OS by [`RecordLog::flush`]
/// (they survive `kill -9` from there), made durable by [`RecordLog::sync`].
pub(crate) struct RecordLog {
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

impl RecordLog {
    /// Opens (creating if needed) the log `name` in `dir`, hands what it holds to `replay` (which
    /// returns what it read and the good length), and cuts the file to that length. Returns the
    /// log, what `replay` read, and how many bytes were cut.
    pub fn open<R>(
        dir: &Path,
        name: &str,
        replay: impl FnOnce(Bytes) -> (R, u64),
    ) -> io::Result<(RecordLog, R, u64)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.log"));
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let total = data.len() as u64;
        let (read, good) = replay(Bytes::from(data));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.set_len(good)?;
        file.seek(io::SeekFrom::Start(good))?;
        let log = RecordLog {
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
        Ok((log, read, total - good))
    }

    /// Frames a record into the buffer (written at the next flush).
    pub fn record(&mut self, tag: u8, payload: impl FnOnce(&mut Vec<u8>)) {
        frame(&mut self.buf, tag, payload);
    }

    /// The id of `scope` in this log, writing its record first if it has none yet.
    pub fn scope_id(&mut self, scope: &Arc<Scope>) -> u32 {
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

    /// Hands the records written so far to the OS (they survive `kill -9` from here on).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.buf);
        if r.is_err() {
            // Part of the buffer may be in the file: a torn record, cut at the next open.
            // Later records must not follow it, so the file is rewound to the last good end.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(io::SeekFrom::Start(self.len));
            self.buf.clear();
            // Scopes written in the lost buffer must be written again.
            self.scopes.clear();
            return r;
        }
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

    /// Replaces the log with what `fill` records (written to a new file, synced, renamed over
    /// the old one, the rename made durable).
    pub fn rewrite(&mut self, fill: impl FnOnce(&mut RecordLog)) -> io::Result<()> {
        self.buf.clear();
        self.scopes.clear();
        fill(self);
        let tmp = self.path.with_extension("log.tmp");
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&self.buf)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)?;
            // The rename must be durable too, or a crash could bring the old log back.
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok::<_, io::Error>(())
        })();
        let written = std::mem::take(&mut self.buf);
        self.scopes.clear();
        r?;
        self.len = written.len() as u64;
        self.compacted_len = self.len;
        self.file = OpenOptions::new().write(true).open(&self.path)?;
        self.file.seek(io::SeekFrom::Start(self.len))?;
        self.dirty = false;
        Ok(())
    }
}
