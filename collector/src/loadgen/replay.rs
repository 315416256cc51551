//! Fast replay of the `sdk` scenario, for throughput benches that must not be limited by the
//! generator.
//!
//! A pool of traces is generated and encoded once. Each replay copies a pooled trace's bytes and
//! patches them in place: trace ids XOR a fresh 16-byte mask, span and parent ids XOR a fresh
//! 8-byte mask (parent links survive, since both sides get the same mask), and timestamps move
//! forward by whole pool periods. Every patched field has a fixed width in protobuf (16 / 8 byte
//! ids, fixed64 times), so no length changes. The first round uses zero masks: the first
//! `pool` replays are exactly the generated traces.
//!
//! `game` traces are not replayable this way: their DeepFlow keys (row ids, syscall ids, TCP
//! seqs) are varints, whose length would change.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::rng::Rng;
use super::scenario::{Generator, ScenarioConfig, ScenarioKind};
use super::send::Outgoing;
use super::truth::TraceTruth;
use super::wire::Encoded;
use tailweave_core::span::{hex, unhex};

/// Offsets into one encoded ResourceSpans field of the fields a replay rewrites.
#[derive(Clone, Debug, Default, PartialEq)]
struct Patch {
    trace: usize,
    span: usize,
    parent: Option<usize>,
    start: usize,
    end: usize,
}

struct Part {
    field: Vec<u8>,
    spans: u64,
    patches: Vec<Patch>,
}

struct Template {
    truth: TraceTruth,
    parts: Vec<Part>,
}

/// Why a replayer cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay supports the sdk scenario only (game rows carry varint keys)")]
    Scenario,
    #[error("the replay pool must hold at least one trace")]
    EmptyPool,
    #[error("an encoded span could not be walked: {0}")]
    Walk(&'static str),
}

/// An endless stream of replayed traces.
pub struct Replayer {
    templates: Vec<Arc<Template>>,
    rng: Rng,
    index: u64,
    /// How far one round over the pool moves the timestamps.
    period_ns: u64,
}

impl Replayer {
    /// Generates `pool` traces of `cfg` (which must be the `sdk` scenario) with `seed`.
    pub fn new(cfg: ScenarioConfig, seed: u64, pool: usize) -> Result<Replayer, ReplayError> {
        if cfg.scenario != ScenarioKind::Sdk {
            return Err(ReplayError::Scenario);
        }
        if pool == 0 {
            return Err(ReplayError::EmptyPool);
        }
        let period_ns = pool as u64 * cfg.trace_interval_us * 1000;
        let mut g = Generator::new(cfg, seed);
        let mut templates = Vec::with_capacity(pool);
        for _ in 0..pool {
            let t = g.next_trace();
            let parts = t
                .sdk
                .iter()
                .map(|rs| {
                    let e = Encoded::new(rs);
                    let field = e.field.to_vec();
                    let patches = patches(&field)?;
                    Ok(Part {
                        field,
                        spans: e.spans,
                        patches,
                    })
                })
                .collect::<Result<Vec<_>, ReplayError>>()?;
            templates.push(Arc::new(Template {
                truth: t.truth,
                parts,
            }));
        }
        Ok(Replayer {
            templates,
            rng: Rng::new(seed ^ 0x2E91_A7C3_0B5D_44F1),
            index: 0,
            period_ns,
        })
    }

    pub fn next_trace(&mut self) -> ReplayTrace {
        let n = self.templates.len() as u64;
        let template = self.templates[(self.index % n) as usize].clone();
        let round = self.index / n;
        self.index += 1;
        let (trace_mask, span_mask) = if round == 0 {
            ([0u8; 16], [0u8; 8])
        } else {
            (self.rng.trace_id(), self.rng.span_id())
        };
        let shift = round * self.period_ns;
        let parts = template
            .parts
            .iter()
            .map(|p| {
                let mut b = p.field.clone();
                for x in &p.patches {
                    xor(&mut b[x.trace..x.trace + 16], &trace_mask);
                    xor(&mut b[x.span..x.span + 8], &span_mask);
                    if let Some(par) = x.parent {
                        xor(&mut b[par..par + 8], &span_mask);
                    }
                    add_ns(&mut b[x.start..x.start + 8], shift);
                    add_ns(&mut b[x.end..x.end + 8], shift);
                }
                Encoded::from_field(Bytes::from(b), p.spans)
            })
            .collect();
        ReplayTrace {
            template,
            trace_mask,
            span_mask,
            shift_us: shift / 1000,
            parts,
        }
    }
}

impl Iterator for Replayer {
    type Item = ReplayTrace;
    fn next(&mut self) -> Option<ReplayTrace> {
        Some(self.next_trace())
    }
}

/// One replayed trace, encoded.
pub struct ReplayTrace {
    template: Arc<Template>,
    trace_mask: [u8; 16],
    span_mask: [u8; 8],
    shift_us: u64,
    parts: Vec<Encoded>,
}

impl ReplayTrace {
    /// The ground truth of this replay (the template's, with the ids patched the same way).
    pub fn truth(&self) -> TraceTruth {
        let remask = |h: &str, m: &[u8]| -> String {
            let mut b = unhex(h).unwrap_or_default();
            if b.len() == m.len() {
                xor(&mut b, m);
            }
            hex(&b)
        };
        let mut t = self.template.truth.clone();
        t.trace_id = remask(&t.trace_id, &self.trace_mask);
        for s in &mut t.spans {
            s.span_id = remask(&s.span_id, &self.span_mask);
            s.parent_span_id = s
                .parent_span_id
                .as_deref()
                .map(|p| remask(p, &self.span_mask));
        }
        t
    }

    /// How far this replay's timestamps moved from its template's, µs.
    pub fn shift_us(&self) -> u64 {
        self.shift_us
    }

    /// The encoded ResourceSpans fields, for tests.
    pub fn fields(&self) -> impl Iterator<Item = &Bytes> {
        self.parts.iter().map(|p| &p.field)
    }
}

impl Outgoing for ReplayTrace {
    fn into_wire(self) -> (Vec<Encoded>, Vec<(Encoded, Duration)>) {
        (self.parts, Vec::new())
    }
}

fn xor(dst: &mut [u8], mask: &[u8]) {
    for (d, m) in dst.iter_mut().zip(mask) {
        *d ^= m;
    }
}

fn add_ns(dst: &mut [u8], shift: u64) {
    let mut v = [0u8; 8];
    v.copy_from_slice(dst);
    let t = u64::from_le_bytes(v).wrapping_add(shift);
    dst.copy_from_slice(&t.to_le_bytes());
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, ReplayError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or(ReplayError::Walk("truncated varint"))?;
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ReplayError::Walk("varint too long"))
}

/// The fields of the message in `b[start..end]`: (field number, wire type, value range).
fn fields(
    b: &[u8],
    start: usize,
    end: usize,
) -> Result<Vec<(u64, u64, usize, usize)>, ReplayError> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let key = varint(b, &mut pos)?;
        let (field, wt) = (key >> 3, key & 7);
        let vstart = pos;
        match wt {
            0 => {
                varint(b, &mut pos)?;
            }
            1 => pos += 8,
            2 => {
                let len = varint(b, &mut pos)? as usize;
                let s = pos;
                pos += len;
                out.push((field, wt, s, pos));
                continue;
            }
            5 => pos += 4,
            _ => return Err(ReplayError::Walk("unsupported wire type")),
        }
        if pos > end {
            return Err(ReplayError::Walk("field past the end"));
        }
        out.push((field, wt, vstart, pos));
    }
    if pos != end {
        return Err(ReplayError::Walk("message length mismatch"));
    }
    Ok(out)
}

/// Where each span's ids and times sit in one encoded `resource_spans` field.
fn patches(field: &[u8]) -> Result<Vec<Patch>, ReplayError> {
    let mut pos = 0;
    if varint(field, &mut pos)? != 0x0a {
        return Err(ReplayError::Walk("not a resource_spans field"));
    }
    let len = varint(field, &mut pos)? as usize;
    let mut out = Vec::new();
    for (f, wt, a, b) in fields(field, pos, pos + len)? {
        if (f, wt) != (2, 2) {
            continue;
        }
        for (f, wt, a, b) in fields(field, a, b)? {
            if (f, wt) != (2, 2) {
                continue;
            }
            let mut p = Patch::default();
            let (mut has_trace, mut has_span) = (false, false);
            let (mut has_start, mut has_end) = (false, false);
            for (f, wt, a, b) in fields(field, a, b)? {
                match (f, wt, b - a) {
                    (1, 2, 16) => (p.trace, has_trace) = (a, true),
                    (2, 2, 8) => (p.span, has_span) = (a, true),
                    (4, 2, 8) => p.parent = Some(a),
                    (7, 1, 8) => (p.start, has_start) = (a, true),
                    (8, 1, 8) => (p.end, has_end) = (a, true),
                    _ => {}
                }
            }
            if !(has_trace && has_span && has_start && has_end) {
                return Err(ReplayError::Walk("span without ids or times"));
            }
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    fn cfg() -> ScenarioConfig {
        ScenarioConfig {
            scenario: ScenarioKind::Sdk,
            error_rate: 0.2,
            ..ScenarioConfig::default()
        }
    }

    fn decode(t: &ReplayTrace) -> ExportTraceServiceRequest {
        let body: Vec<u8> = t.fields().flat_map(|f| f.iter().copied()).collect();
        ExportTraceServiceRequest::decode(body.as_slice()).unwrap()
    }

    #[test]
    fn the_first_round_is_the_generated_traces() {
        let generated: Vec<_> = Generator::new(cfg(), 4).take(20).collect();
        let mut r = Replayer::new(cfg(), 4, 20).unwrap();
        for g in &generated {
            let t = r.next_trace();
            assert_eq!(decode(&t).resource_spans, g.sdk);
            assert_eq!(t.truth(), g.truth);
        }
    }

    #[test]
    fn later_rounds_are_new_traces_with_the_same_shape() {
        let pool = 5;
        let mut r = Replayer::new(cfg(), 9, pool).unwrap();
        let first: Vec<ReplayTrace> = (0..pool).map(|_| r.next_trace()).collect();
        let mut ids = std::collections::HashSet::new();
        for t in &first {
            ids.insert(t.truth().trace_id);
        }
        for round in 1..4u64 {
            for f in &first {
                let t = r.next_trace();
                let (a, b) = (f.truth(), t.truth());
                assert!(ids.insert(b.trace_id.clone()), "trace id repeated");
                assert_eq!(
                    (a.error, a.slow, a.spans.len()),
                    (b.error, b.slow, b.spans.len())
                );
                let req = decode(&t);
                let spans: Vec<_> = req
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .flat_map(|ss| &ss.spans)
                    .collect();
                let base: Vec<_> = decode(f)
                    .resource_spans
                    .into_iter()
                    .flat_map(|rs| rs.scope_spans)
                    .flat_map(|ss| ss.spans)
                    .collect();
                for (s, o) in spans.iter().zip(&base) {
                    assert_eq!(hex(&s.trace_id), b.trace_id);
                    let shift = round * pool as u64 * cfg().trace_interval_us * 1000;
                    assert_eq!(s.start_time_unix_nano, o.start_time_unix_nano + shift);
                    assert_eq!(s.end_time_unix_nano, o.end_time_unix_nano + shift);
                    assert_eq!(s.name, o.name);
                    // The truth's parent links hold in the patched bytes.
                    let truth = b
                        .spans
                        .iter()
                        .find(|x| x.span_id == hex(&s.span_id))
                        .unwrap();
                    let want = truth
                        .parent_span_id
                        .as_deref()
                        .and_then(unhex)
                        .unwrap_or_default();
                    assert_eq!(s.parent_span_id, want);
                }
            }
        }
    }

    #[test]
    fn only_the_sdk_scenario_replays() {
        assert!(matches!(
            Replayer::new(ScenarioConfig::default(), 1, 10),
            Err(ReplayError::Scenario)
        ));
        assert!(matches!(
            Replayer::new(cfg(), 1, 0),
            Err(ReplayError::EmptyPool)
        ));
    }
}
