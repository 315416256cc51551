//! The on-disk log behind `sending_queue.storage: file`.
//!
//! Layout of a queue directory:
//! - `seg-<20 digits>.log`: segments, appended in sequence order. A record is
//!   `len: u32 LE | crc32(payload): u32 LE | payload`.
//! - `commit`: the position of the first record not yet acknowledged
//!   (`segment: u64 LE | offset: u64 LE | crc32 of those 16 bytes: u32 LE`).
//!
//! A record becomes readable only after the fsync that covers it, so a consumer never hands out
//! what a crash could still take back. Acknowledgements may come out of order (several consumers);
//! the commit only moves over a contiguous acknowledged prefix, so a restart re-delivers whatever
//! was in flight (at least once, never lost). The commit file is rewritten in place at every move
//! without fsync: it survives `kill -9` (the page cache does), and if a power loss takes it back
//! the cost is duplicates, not loss. A segment is deleted once the commit has passed it.
//!
//! On open, every segment is scanned: a record cut short (a crash in the middle of a write) ends
//! its segment, which is truncated there and counted. A record whose checksum does not match is
//! skipped when read, and counted. Writing always starts a new segment, so nothing is ever
//! appended after a repaired tail.
//!
//! The size bound counts the bytes of every live segment. An append that does not fit is refused
//! with [`DiskError::Full`]; the caller waits for [`DiskQueue::wait_for_space`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

/// Bytes before each payload: length and checksum.
pub const RECORD_HEADER: u64 = 8;
const COMMIT_FILE: &str = "commit";
const COMMIT_LEN: usize = 20;
/// Segment size bounds: small enough that delivered data is freed long before the queue is
/// full, large enough that segment churn (a file and a directory fsync each) stays rare.
const MIN_SEGMENT: u64 = 64 << 10;
const MAX_SEGMENT: u64 = 64 << 20;

/// Where a record starts: segment sequence number and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

/// One record handed to a consumer. Give `pos` back to [`DiskQueue::ack`] once it is settled.
#[derive(Debug, Clone)]
pub struct Record {
    pub pos: Pos,
    pub payload: Bytes,
    /// Set for records appended by this process with a decision time (not persisted: an
    /// `Instant` means nothing to the next process).
    pub decided_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("sending queue is full: {used} of {max} bytes on disk in use, a batch of {need} bytes does not fit")]
    Full { used: u64, max: u64, need: u64 },
    #[error("a batch of {need} bytes is larger than the whole sending queue ({max} bytes)")]
    TooLarge { need: u64, max: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`DiskQueue::open`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Records not yet acknowledged, to be delivered again.
    pub records: u64,
    /// Their bytes (headers included).
    pub bytes: u64,
    /// Records cut short by a crash mid-write, dropped from the tail of their segment.
    pub truncated_records: u64,
    /// Bytes removed with them.
    pub truncated_bytes: u64,
}

struct Segment {
    seq: u64,
    /// Bytes written (the readable end for every segment but the last, which stops at
    /// `Inner::published`).
    size: u64,
}

struct Inner {
    /// Live segments in order; the last one is written to.
    segments: VecDeque<Segment>,
    writer: Arc<File>,
    /// Bytes in all live segments.
    total: u64,
    /// Everything before this is on stable storage and may be read.
    published: Pos,
    /// Next record to hand out.
    read: Pos,
    reader: Option<(u64, File)>,
    /// Handed out and not yet committed: start -> acknowledged.
    outstanding: BTreeMap<Pos, bool>,
    commit: Pos,
    commit_file: File,
    /// Records appended or recovered and not yet acknowledged.
    pending: u64,
    decided: HashMap<Pos, Instant>,
    closed: bool,
    /// Records skipped for a checksum mismatch while reading.
    corrupt: u64,
}

/// A bounded, crash-safe FIFO of byte records with out-of-order acknowledgement.
pub struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    readable: Notify,
    space: Notify,
}

fn segment_name(seq: u64) -> String {
    format!("seg-{seq:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn encode_commit(p: Pos) -> [u8; COMMIT_LEN] {
    let mut b = [0u8; COMMIT_LEN];
    b[..8].copy_from_slice(&p.segment.to_le_bytes());
    b[8..16].copy_from_slice(&p.offset.to_le_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_commit(b: &[u8]) -> Option<Pos> {
    if b.len() < COMMIT_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    if crc32fast::hash(&b[..16]) != crc {
        return None;
    }
    Some(Pos {
        segment: u64::from_le_bytes(b[..8].try_into().ok()?),
        offset: u64::from_le_bytes(b[8..16].try_into().ok()?),
    })
}

fn read_header(f: &File, offset: u64) -> io::Result<Option<(u32, u32)>> {
    let mut h = [0u8; RECORD_HEADER as usize];
    match f.read_exact_at(&mut h, offset) {
        Ok(()) => Ok(Some((
            u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
        ))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Scans a segment; returns its valid length and whether a record was cut short.
fn scan_segment(f: &File, size: u64) -> io::Result<(u64, u64)> {
    let mut off = 0u64;
    let mut records = 0u64;
    while off < size {
        let Some((len, _)) = read_header(f, off)? else {
            break;
        };
        let end = off + RECORD_HEADER + u64::from(len);
        if end > size {
            break;
        }
        off = end;
        records += 1;
    }
    Ok((off, records))
}

fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl DiskQueue {
    /// Opens (or creates) the queue in `dir`, repairing a torn tail and queueing everything not
    /// acknowledged for delivery. `max_bytes` bounds the bytes on disk.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(DiskQueue, Recovered), DiskError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let segment_bytes = (max_bytes / 8).clamp(MIN_SEGMENT, MAX_SEGMENT);
        let mut seqs: Vec<u64> = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            if let Some(seq) = e.file_name().to_str().and_then(parse_segment_name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();

        let commit_path = dir.join(COMMIT_FILE);
        let commit_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&commit_path)
            .map_err(io_err(&commit_path))?;
        let mut cb = [0u8; COMMIT_LEN];
        let saved = match commit_file.read_exact_at(&mut cb, 0) {
            Ok(()) => decode_commit(&cb),
            Err(_) => None,
        };

        let mut rec = Recovered::default();
        let mut segments = VecDeque::new();
        let mut commit: Option<Pos> = None;
        for seq in seqs {
            let path = dir.join(segment_name(seq));
            if saved.is_some_and(|c| seq < c.segment) {
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let size = f.metadata().map_err(io_err(&path))?.len();
            let (valid, _) = scan_segment(&f, size).map_err(io_err(&path))?;
            if valid < size {
                rec.truncated_records += 1;
                rec.truncated_bytes += size - valid;
                f.set_len(valid).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            // The first live segment starts at the saved commit if it names a record boundary
            // there; otherwise everything in it is delivered again.
            let resume = saved.filter(|c| c.segment == seq && commit.is_none());
            let start = match resume {
                Some(c) if is_boundary(&f, valid, c.offset).map_err(io_err(&path))? => c.offset,
                _ => 0,
            };
            if commit.is_none() {
                commit = Some(Pos {
                    segment: seq,
                    offset: start,
                });
            }
            let (_, n) = scan_from(&f, valid, start).map_err(io_err(&path))?;
            rec.records += n;
            rec.bytes += valid - start;
            segments.push_back(Segment { seq, size: valid });
        }

        let next_seq = segments.back().map(|s| s.seq + 1).unwrap_or(0);
        let path = dir.join(segment_name(next_seq));
        let writer = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(dir)?;
        segments.push_back(Segment {
            seq: next_seq,
            size: 0,
        });
        let commit = commit.unwrap_or(Pos {
            segment: next_seq,
            offset: 0,
        });
        let total = segments.iter().map(|s| s.size).sum();
        let q = DiskQueue {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            inner: Mutex::new(Inner {
                segments,
                writer: Arc::new(writer),
                total,
                published: Pos {
                    segment: next_seq,
                    offset: 0,
                },
                read: commit,
                reader: None,
                outstanding: BTreeMap::new(),
                commit,
                commit_file,
                pending: rec.records,
                decided: HashMap::new(),
                closed: false,
                corrupt: 0,
            }),
            readable: Notify::new(),
            space: Notify::new(),
        };
        {
            let mut g = q.lock();
            q.settle_commit(&mut g)?;
        }
        Ok((q, rec))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the log itself inconsistent (files are
        // only ever appended or removed), so the state is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory this queue lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record (not yet durable: call [`DiskQueue::sync`]).
    pub fn append(&self, payload: &[u8], decided_at: Option<Instant>) -> Result<Pos, DiskError> {
        let need = RECORD_HEADER + payload.len() as u64;
        if need > self.max_bytes || payload.len() > u32::MAX as usize {
            return Err(DiskError::TooLarge {
                need,
                max: self.max_bytes,
            });
        }
        let mut g = self.lock();
        if g.total + need > self.max_bytes {
            // Everything written may be delivered already, all of it in the segment being
            // written, which is never deleted: start a new one so the old can go.
            if g.commit == g.published && self.back_size(&g) > 0 && g.pending == 0 {
                self.roll(&mut g)?;
                self.settle_commit(&mut g)?;
            }
            if g.total + need > self.max_bytes {
                return Err(DiskError::Full {
                    used: g.total,
                    max: self.max_bytes,
                    need,
                });
            }
        }
        if self.back_size(&g) > 0 && self.back_size(&g) + need > self.segment_bytes {
            self.roll(&mut g)?;
        }
        let mut buf = Vec::with_capacity(need as usize);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        let seq = g.segments.back().map(|s| s.seq).unwrap_or(0);
        let offset = self.back_size(&g);
        let path = self.dir.join(segment_name(seq));
        (&*g.writer).write_all(&buf).map_err(io_err(&path))?;
        if let Some(s) = g.segments.back_mut() {
            s.size += need;
        }
        g.total += need;
        g.pending += 1;
        let pos = Pos {
            segment: seq,
            offset,
        };
        if let Some(t) = decided_at {
            g.decided.insert(pos, t);
        }
        Ok(pos)
    }

    fn back_size(&self, g: &Inner) -> u64 {
        g.segments.back().map(|s| s.size).unwrap_or(0)
    }

    /// Closes the segment being written (durably) and starts the next one.
    fn roll(&self, g: &mut Inner) -> Result<(), DiskError> {
        let seq = g.segments.back().map(|s| s.seq).unwrap_or(0);
        let old = self.dir.join(segment_name(seq));
        g.writer.sync_data().map_err(io_err(&old))?;
        let next = seq + 1;
        let path = self.dir.join(segment_name(next));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        g.writer = Arc::new(f);
        g.segments.push_back(Segment { seq: next, size: 0 });
        // The old segment was synced whole: all of it is readable.
        g.published = Pos {
            segment: next,
            offset: 0,
        };
        self.readable.notify_waiters();
        Ok(())
    }

    /// Makes every appended record durable, then readable. The fsync runs without the lock, so
    /// consumers keep reading and acknowledging meanwhile.
    pub fn sync(&self) -> Result<(), DiskError> {
        let (writer, upto) = {
            let g = self.lock();
            let seq = g.segments.back().map(|s| s.seq).unwrap_or(0);
            (
                g.writer.clone(),
                Pos {
                    segment: seq,
                    offset: self.back_size(&g),
                },
            )
        };
        let path = self.dir.join(segment_name(upto.segment));
        writer.sync_data().map_err(io_err(&path))?;
        let mut g = self.lock();
        if upto > g.published {
            g.published = upto;
        }
        drop(g);
        self.readable.notify_waiters();
        Ok(())
    }

    /// The next durable record not yet handed out, if any.
    pub fn try_next(&self) -> Result<Option<Record>, DiskError> {
        let mut g = self.lock();
        loop {
            let read = g.read;
            if read >= g.published {
                return Ok(None);
            }
            let Some(limit) = g.segments.iter().find(|s| s.seq == read.segment).map(|s| {
                if s.seq == g.published.segment {
                    g.published.offset
                } else {
                    s.size
                }
            }) else {
                // The read position names a segment that is gone (only after a bad commit file):
                // go on at the first live one.
                let first = g
                    .segments
                    .iter()
                    .find(|s| s.seq > read.segment)
                    .map(|s| s.seq);
                match first {
                    Some(seq) => {
                        g.read = Pos {
                            segment: seq,
                            offset: 0,
                        };
                        continue;
                    }
                    None => return Ok(None),
                }
            };
            if read.offset >= limit {
                let next = g
                    .segments
                    .iter()
                    .find(|s| s.seq > read.segment)
                    .map(|s| s.seq);
                match next {
                    Some(seq) if read.segment < g.published.segment => {
                        g.read = Pos {
                            segment: seq,
                            offset: 0,
                        };
                        continue;
                    }
                    _ => return Ok(None),
                }
            }
            let path = self.dir.join(segment_name(read.segment));
            if g.reader.as_ref().map(|r| r.0) != Some(read.segment) {
                let f = File::open(&path).map_err(io_err(&path))?;
                g.reader = Some((read.segment, f));
            }
            let Some((_, f)) = g.reader.as_ref() else {
                return Ok(None);
            };
            let header = read_header(f, read.offset).map_err(io_err(&path))?;
            let end = header.map(|(len, _)| read.offset + RECORD_HEADER + u64::from(len));
            let (Some((len, crc)), Some(end)) = (header, end) else {
                g.corrupt += 1;
                g.read.offset = limit;
                continue;
            };
            if end > limit {
                g.corrupt += 1;
                g.read.offset = limit;
                continue;
            }
            let mut payload = vec![0u8; len as usize];
            f.read_exact_at(&mut payload, read.offset + RECORD_HEADER)
                .map_err(io_err(&path))?;
            g.read.offset = end;
            if crc32fast::hash(&payload) != crc {
                // Nothing will acknowledge it: count it as settled right away.
                g.corrupt += 1;
                g.pending = g.pending.saturating_sub(1);
                self.settle_commit(&mut g)?;
                continue;
            }
            g.outstanding.insert(read, false);
            let decided_at = g.decided.remove(&read);
            return Ok(Some(Record {
                pos: read,
                payload: payload.into(),
                decided_at,
            }));
        }
    }

    /// Waits for the next record; `None` once the queue is closed and everything was handed out.
    pub async fn next(&self) -> Result<Option<Record>, DiskError> {
        loop {
            let notified = self.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.try_next()? {
                return Ok(Some(r));
            }
            {
                let g = self.lock();
                if g.closed && g.read >= g.published {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }

    /// Marks a handed-out record settled (delivered or given up on and counted).
    pub fn ack(&self, pos: Pos) -> Result<(), DiskError> {
        let mut g = self.lock();
        match g.outstanding.get_mut(&pos) {
            Some(done) if !*done => *done = true,
            _ => return Ok(()),
        }
        g.pending = g.pending.saturating_sub(1);
        while let Some(entry) = g.outstanding.first_entry() {
            if !*entry.get() {
                break;
            }
            entry.remove();
        }
        self.settle_commit(&mut g)
    }

    /// Moves the commit to the first record still owed, persists it, and deletes the segments
    /// it has passed.
    fn settle_commit(&self, g: &mut Inner) -> Result<(), DiskError> {
        let target = g.outstanding.keys().next().copied().unwrap_or(g.read);
        let mut target = target;
        // A commit at the end of a finished segment belongs at the start of the next.
        while let Some(s) = g.segments.iter().find(|s| s.seq == target.segment) {
            let finished = s.seq != g.segments.back().map(|b| b.seq).unwrap_or(s.seq);
            if finished && target.offset >= s.size {
                match g.segments.iter().find(|n| n.seq > s.seq) {
                    Some(n) => {
                        target = Pos {
                            segment: n.seq,
                            offset: 0,
                        }
                    }
                    None => break,
                }
            } else {
                break;
            }
        }
        if target != g.commit {
            g.commit = target;
            let path = self.dir.join(COMMIT_FILE);
            g.commit_file
                .write_all_at(&encode_commit(target), 0)
                .map_err(io_err(&path))?;
        }
        let mut freed = false;
        while g.segments.len() > 1 && g.segments.front().is_some_and(|s| s.seq < target.segment) {
            if let Some(s) = g.segments.pop_front() {
                let path = self.dir.join(segment_name(s.seq));
                if g.reader.as_ref().map(|r| r.0) == Some(s.seq) {
                    g.reader = None;
                }
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
                g.total -= s.size;
                freed = true;
            }
        }
        if freed {
            self.space.notify_waiters();
        }
        Ok(())
    }

    /// Resolves when an acknowledgement may have freed room. Create it (and `enable` it) before
    /// the append it retries, so a free in between is not missed.
    pub fn space_freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.space.notified()
    }

    /// No more appends: consumers end once everything was handed out.
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        // Make the commit durable for the next start (best effort: losing it only means
        // duplicates).
        let _ = g.commit_file.sync_data();
        drop(g);
        self.readable.notify_waiters();
    }

    /// Records appended or recovered and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.lock().pending
    }

    /// Bytes of every live segment.
    pub fn used_bytes(&self) -> u64 {
        self.lock().total
    }

    /// The bound given to [`DiskQueue::open`].
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Records skipped so far for a checksum mismatch (the counter takes the difference).
    pub fn corrupt_records(&self) -> u64 {
        self.lock().corrupt
    }

    /// Live segment files (for tests and the size gauge).
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }
}

fn is_boundary(f: &File, valid: u64, target: u64) -> io::Result<bool> {
    let mut off = 0u64;
    while off < target && off < valid {
        let Some((len, _)) = read_header(f, off)? else {
            return Ok(false);
        };
        off += RECORD_HEADER + u64::from(len);
    }
    Ok(off == target)
}

/// Records between `start` and `valid` (both on record boundaries).
fn scan_from(f: &File, valid: u64, start: u64) -> io::Result<(u64, u64)> {
    let mut off = start;
    let mut n = 0;
    while off < valid {
        let Some((len, _)) = read_header(f, off)? else {
            break;
        };
        off += RECORD_HEADER + u64::from(len);
        n += 1;
    }
    Ok((off, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u32, len: usize) -> Vec<u8> {
        let mut v = i.to_le_bytes().to_vec();
        v.resize(len.max(4), (i % 251) as u8);
        v
    }

    fn id(r: &Record) -> u32 {
        u32::from_le_bytes(r.payload[..4].try_into().unwrap())
    }

    fn drain(q: &DiskQueue) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(r) = q.try_next().unwrap() {
            out.push(r);
        }
        out
    }

    fn segments_on_disk(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn records_become_readable_only_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec, Recovered::default());
        q.append(&payload(1, 10), None).unwrap();
        assert!(q.try_next().unwrap().is_none());
        q.sync().unwrap();
        let got = drain(&q);
        assert_eq!(got.iter().map(id).collect::<Vec<_>>(), [1]);
        assert_eq!(&got[0].payload[..], &payload(1, 10)[..]);
    }

    #[test]
    fn unacknowledged_records_come_back_after_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..5 {
                q.append(&payload(i, 100), None).unwrap();
            }
            q.sync().unwrap();
            let got = drain(&q);
            // Out-of-order acks: 0, 1 and 3 settled; 2 still owed, so the commit stops at 2 and
            // 3 is delivered again (at least once).
            q.ack(got[1].pos).unwrap();
            q.ack(got[0].pos).unwrap();
            q.ack(got[3].pos).unwrap();
            assert_eq!(q.pending(), 2);
            // Dropped without close: as after kill -9.
        }
        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 3);
        assert_eq!(rec.truncated_records, 0);
        assert_eq!(drain(&q).iter().map(id).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[test]
    fn fully_acknowledged_queue_reopens_empty_and_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            // 64 KiB segments: 40 records of 10 KB span several.
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..40 {
                q.append(&payload(i, 10_000), None).unwrap();
            }
            q.sync().unwrap();
            assert!(q.segment_count() > 3, "{}", q.segment_count());
            for r in drain(&q) {
                q.ack(r.pos).unwrap();
            }
            assert_eq!(q.pending(), 0);
            // Only the segment being written is left.
            assert_eq!(q.segment_count(), 1);
            assert_eq!(segments_on_disk(dir.path()).len(), 1);
        }
        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 0);
        assert!(drain(&q).is_empty());
    }

    #[test]
    fn a_truncated_last_record_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..3 {
                q.append(&payload(i, 1000), None).unwrap();
            }
            q.sync().unwrap();
        }
        // A crash in the middle of the fourth write: its header and half its payload.
        let seg = dir.path().join(&segments_on_disk(dir.path())[0]);
        let whole = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        let p = payload(3, 1000);
        f.write_all(&(p.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&crc32fast::hash(&p).to_le_bytes()).unwrap();
        f.write_all(&p[..500]).unwrap();
        drop(f);

        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 3);
        assert_eq!(rec.truncated_records, 1);
        assert_eq!(rec.truncated_bytes, RECORD_HEADER + 500);
        assert_eq!(fs::metadata(&seg).unwrap().len(), whole);
        let got = drain(&q);
        assert_eq!(got.iter().map(id).collect::<Vec<_>>(), [0, 1, 2]);
        // New writes go to a new segment and are read after the repaired one.
        q.append(&payload(9, 10), None).unwrap();
        q.sync().unwrap();
        assert_eq!(drain(&q).iter().map(id).collect::<Vec<_>>(), [9]);
    }

    #[test]
    fn a_torn_header_is_dropped_too() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            q.append(&payload(0, 10), None).unwrap();
            q.sync().unwrap();
        }
        let seg = dir.path().join(&segments_on_disk(dir.path())[0]);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0, 0]).unwrap();
        drop(f);
        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((rec.records, rec.truncated_records), (1, 1));
        assert_eq!(drain(&q).iter().map(id).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_checksum_mismatch_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..3 {
                q.append(&payload(i, 100), None).unwrap();
            }
            q.sync().unwrap();
        }
        let seg = dir.path().join(&segments_on_disk(dir.path())[0]);
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        // Flip a payload byte of the second record.
        let second = RECORD_HEADER + 100;
        f.write_all_at(&[0xff], second + RECORD_HEADER + 50)
            .unwrap();
        drop(f);
        let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        let got = drain(&q);
        assert_eq!(got.iter().map(id).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(q.corrupt_records(), 1);
        for r in got {
            q.ack(r.pos).unwrap();
        }
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_full_queue_refuses_until_delivery_frees_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        // 512 KiB: 64 KiB segments, each record about 20 KB.
        let max = 512 << 10;
        let (q, _) = DiskQueue::open(dir.path(), max).unwrap();
        let mut n = 0;
        let err = loop {
            match q.append(&payload(n, 20_000), None) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, DiskError::Full { max: m, .. } if m == max),
            "{err}"
        );
        assert!(err.to_string().contains("sending queue is full"), "{err}");
        assert!(q.used_bytes() <= max);
        q.sync().unwrap();
        // Delivering the first few records frees their segment; the append then fits.
        let got = drain(&q);
        assert_eq!(got.len() as u32, n);
        for r in &got[..5] {
            q.ack(r.pos).unwrap();
        }
        q.append(&payload(n, 20_000), None).unwrap();
        assert!(q.used_bytes() <= max);
    }

    #[test]
    fn a_queue_delivered_inside_one_segment_still_frees_room() {
        let dir = tempfile::tempdir().unwrap();
        // One record fills most of the queue and all of one segment.
        let max = 128 << 10;
        let (q, _) = DiskQueue::open(dir.path(), max).unwrap();
        q.append(&payload(0, 100_000), None).unwrap();
        assert!(matches!(
            q.append(&payload(1, 100_000), None),
            Err(DiskError::Full { .. })
        ));
        q.sync().unwrap();
        let r = q.try_next().unwrap().unwrap();
        q.ack(r.pos).unwrap();
        q.append(&payload(1, 100_000), None).unwrap();
        q.sync().unwrap();
        assert_eq!(drain(&q).iter().map(id).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_record_larger_than_the_queue_is_refused_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = DiskQueue::open(dir.path(), 1000).unwrap();
        assert!(matches!(
            q.append(&[0u8; 1000], None),
            Err(DiskError::TooLarge {
                need: 1008,
                max: 1000
            })
        ));
    }

    #[test]
    fn a_damaged_commit_file_means_redelivery_not_loss() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for i in 0..3 {
                q.append(&payload(i, 10), None).unwrap();
            }
            q.sync().unwrap();
            let r = q.try_next().unwrap().unwrap();
            q.ack(r.pos).unwrap();
        }
        fs::write(dir.path().join(COMMIT_FILE), b"garbage").unwrap();
        let (q, rec) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.records, 3);
        assert_eq!(drain(&q).iter().map(id).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn decision_times_stay_with_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        let t = Instant::now();
        q.append(&payload(0, 10), Some(t)).unwrap();
        q.append(&payload(1, 10), None).unwrap();
        q.sync().unwrap();
        let got = drain(&q);
        assert_eq!(got[0].decided_at, Some(t));
        assert_eq!(got[1].decided_at, None);
    }

    #[tokio::test]
    async fn next_waits_for_a_sync_and_ends_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        let q = Arc::new(q);
        let reader = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while let Some(r) = q.next().await.unwrap() {
                    ids.push(id(&r));
                    q.ack(r.pos).unwrap();
                }
                ids
            })
        };
        for i in 0..3 {
            q.append(&payload(i, 10), None).unwrap();
            q.sync().unwrap();
            tokio::task::yield_now().await;
        }
        q.close();
        assert_eq!(reader.await.unwrap(), [0, 1, 2]);
        assert_eq!(q.pending(), 0);
    }
}
