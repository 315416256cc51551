//! Building one unit's tree at flush (join.md §6, steps A-F).
//!
//! Input: the group's spans (request/response fragments already merged, §3). The relations are
//! tested again here on the merged models, inside the group only, so the streaming part needs to
//! keep no edge lists. A span gets at most one parent; a later step never overrides an earlier one.

// Index loops over parallel per-member vectors read better than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use hashbrown::HashMap;
use tailweave_core::ebpf::{flags, EbpfSpan, TapSide};
use tailweave_core::{Span, SpanId, SpanKind};

use super::rules::{self, SysRel, Tol, Via};

/// One span of a unit, with the response fragments merged into it.
pub struct Member {
    pub span: Span,
    /// Response fragments merged into this request fragment, as received.
    pub absorbed: Vec<Span>,
    /// gRPC/HTTP2 frame rows merged into this session, as received (join.md §3).
    pub frames: Vec<Span>,
    pub other_traces: Vec<[u8; 16]>,
    /// This request fragment's own model before any merge, for passthrough of originals.
    original: Option<Box<EbpfSpan>>,
}

impl Member {
    pub fn new(span: Span, other_traces: Vec<[u8; 16]>) -> Member {
        Member {
            span,
            absorbed: Vec::new(),
            frames: Vec::new(),
            other_traces,
            original: None,
        }
    }

    /// Merges response fragment `r` into this request fragment (join.md §3).
    pub fn absorb(&mut self, r: Span) {
        if let (Some(q), Some(rm)) = (self.span.ebpf.as_mut(), r.ebpf.as_deref()) {
            if self.original.is_none() {
                self.original = Some(q.clone());
            }
            **q = rules::merge_models(q, rm);
        }
        self.absorbed.push(r);
    }

    /// Merges frame row `f` into this session: only the end and the merged row ids change.
    pub fn absorb_frame(&mut self, f: Span) {
        if let (Some(s), Some(fm)) = (self.span.ebpf.as_mut(), f.ebpf.as_deref()) {
            if self.original.is_none() {
                self.original = Some(s.clone());
            }
            s.end_ns = s.end_ns.max(fm.end_ns);
            s.merged_row_ids.push(fm.row_id);
        }
        self.frames.push(f);
    }

    pub fn model(&self) -> Option<&EbpfSpan> {
        self.span.ebpf.as_deref()
    }

    /// The spans as received (for `passthrough` of unassociated spans).
    pub fn into_original_spans(mut self) -> Vec<Span> {
        if let Some(o) = self.original.take() {
            self.span.ebpf = Some(o);
        }
        let mut v = Vec::with_capacity(1 + self.absorbed.len() + self.frames.len());
        v.push(self.span);
        v.extend(self.absorbed);
        v.extend(self.frames);
        v
    }
}

/// Where a span hangs in the unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    /// Not placed (yet): a root.
    Root,
    /// Under another member.
    Node(usize),
    /// Under a span id that is not in the unit (the caller's header id).
    Dangling(SpanId),
    /// An SDK span keeping the parent id it arrived with.
    Own,
}

/// The result of [`build`].
#[derive(Debug, Default)]
pub struct Plan {
    pub trace_id: [u8; 16],
    pub parent: Vec<Parent>,
    pub via: Vec<Option<Via>>,
    pub order: Vec<u32>,
    pub kept: Vec<bool>,
    /// Clock offset of the span's agent in µs (join.md §6 F), 0 if not corrected.
    pub offset_us: Vec<i64>,
    pub main_root: usize,
}

/// Where an SDK span runs (join.md §1 "instance").
#[derive(Default, Clone)]
struct Inst {
    pod: Option<String>,
    host: Option<String>,
    pid: Option<i64>,
    sid: Option<String>,
}

fn sdk_inst(s: &Span) -> Inst {
    let mut i = Inst::default();
    let st =
        |v: tailweave_core::AttrValue<'_>| v.as_str().filter(|v| !v.is_empty()).map(String::from);
    // One pass over the resource.
    for (k, v) in s.resource().attrs() {
        match k {
            "k8s.pod.name" if i.pod.is_none() => i.pod = st(v),
            "host.name" if i.host.is_none() => i.host = st(v),
            "process.pid" if i.pid.is_none() => i.pid = v.as_i64(),
            "service.instance.id" if i.sid.is_none() => i.sid = st(v),
            _ => {}
        }
    }
    i
}

/// `Some(true)` if any pair available on both sides is equal, `Some(false)` if some pair is
/// available and none is equal, `None` (unknown) if no pair is available.
fn inst_match(s: &Inst, e: &EbpfSpan, e_span: &Span, side: usize) -> Option<bool> {
    let mut seen = false;
    if let (Some(a), Some(b)) = (&s.pod, &e.instance[side]) {
        if **a == **b {
            return Some(true);
        }
        seen = true;
    }
    if let (Some(h), Some(p), Some(eh)) = (&s.host, s.pid, &e.host[side]) {
        if e.pid[side] != 0 {
            if **h == **eh && p == e.pid[side] as i64 {
                return Some(true);
            }
            seen = true;
        }
    }
    if e.local_side() == Some(side) {
        let esid = e_span
            .resource()
            .attr("service.instance.id")
            .and_then(|v| v.as_str());
        if let (Some(a), Some(b)) = (&s.sid, esid) {
            if a == b {
                return Some(true);
            }
            seen = true;
        }
    }
    if seen {
        Some(false)
    } else {
        None
    }
}

fn sdk_same(a: &Inst, b: &Inst) -> bool {
    let mut seen = false;
    if let (Some(x), Some(y)) = (&a.pod, &b.pod) {
        if x == y {
            return true;
        }
        seen = true;
    }
    if let (Some(h1), Some(p1), Some(h2), Some(p2)) = (&a.host, a.pid, &b.host, b.pid) {
        if h1 == h2 && p1 == p2 {
            return true;
        }
        seen = true;
    }
    if let (Some(x), Some(y)) = (&a.sid, &b.sid) {
        if x == y {
            return true;
        }
        seen = true;
    }
    !seen
}

struct Hop {
    /// Linked chain, upstream first.
    chain: Vec<usize>,
    header: Option<[u8; 8]>,
}

impl Hop {
    fn root(&self) -> usize {
        self.chain[0]
    }
    fn leaf(&self) -> usize {
        *self.chain.last().expect("non-empty hop")
    }
}

struct Ctx<'a> {
    ms: &'a [Member],
    tol: &'a Tol,
    parent: Vec<Parent>,
    via: Vec<Option<Via>>,
}

impl Ctx<'_> {
    fn e(&self, i: usize) -> Option<&EbpfSpan> {
        self.ms[i].model()
    }
    fn unplaced(&self, i: usize) -> bool {
        self.parent[i] == Parent::Root
    }
    fn set(&mut self, i: usize, p: usize, via: Via) {
        if self.unplaced(i) && i != p {
            self.parent[i] = Parent::Node(p);
            self.via[i] = Some(via);
        }
    }
    fn start(&self, i: usize) -> u64 {
        self.ms[i].span.start_ns
    }
    fn end(&self, i: usize) -> u64 {
        self.ms[i]
            .span
            .end_ns
            .max(self.e(i).map_or(0, |e| e.end_ns))
    }
    fn dur_us(&self, i: usize) -> u64 {
        match self.e(i) {
            Some(e) => e.duration_us,
            None => self.end(i).saturating_sub(self.start(i)) / 1000,
        }
    }
    /// SDK span `s` covers eBPF span `e` within `app_slack` (same host clocks).
    fn sdk_covers(&self, s: usize, e: usize) -> bool {
        let slack = self.tol.app_slack;
        self.start(s) <= self.start(e).saturating_add(slack)
            && self.end(e) <= self.end(s).saturating_add(slack)
    }
    /// The time deviation of §4.2: 0 if covered, else the smaller of |Δstart|, |Δend|.
    fn deviation(&self, a: usize, b: usize) -> u64 {
        let (s1, e1, s2, e2) = (self.start(a), self.end(a), self.start(b), self.end(b));
        if (s1 <= s2 && e2 <= e1) || (s2 <= s1 && e1 <= e2) {
            0
        } else {
            s1.abs_diff(s2).min(e1.abs_diff(e2))
        }
    }
}

/// The §4.2 ambiguity order for an SDK span `s` and eBPF candidates: instance match, cover on
/// the same host, smallest time deviation, then `e.dur >= s.dur`.
fn best_candidate(c: &Ctx<'_>, s: usize, cands: &[(usize, Option<bool>)]) -> Option<usize> {
    cands
        .iter()
        .min_by_key(|(e, m)| {
            let covered = c.deviation(*e, s) == 0;
            (
                *m != Some(true),
                !(covered && *m == Some(true)),
                c.deviation(*e, s),
                c.dur_us(*e) < c.dur_us(s),
                *e,
            )
        })
        .map(|(e, _)| *e)
}

/// Builds the tree of one unit. `unit_trace` is the group's trace key.
pub fn build(ms: &mut [Member], unit_trace: [u8; 16], tol: &Tol, allow_multiple: bool) -> Plan {
    let n = ms.len();
    let mut c = Ctx {
        ms,
        tol,
        parent: vec![Parent::Root; n],
        via: vec![None; n],
    };
    let is_sdk: Vec<bool> = (0..n).map(|i| c.e(i).is_none()).collect();
    // SDK spans of one service share their resource: read each resource once.
    let mut by_resource: HashMap<usize, usize> = HashMap::new();
    // Shared, so spans of one resource (and all eBPF spans) cost no allocation each.
    let no_inst = std::rc::Rc::new(Inst::default());
    let mut insts: Vec<std::rc::Rc<Inst>> = Vec::with_capacity(n);
    for i in 0..n {
        if !is_sdk[i] {
            insts.push(no_inst.clone());
            continue;
        }
        let key = c.ms[i].span.resource() as *const tailweave_core::Resource as usize;
        match by_resource.get(&key) {
            Some(&j) => insts.push(insts[j].clone()),
            None => {
                by_resource.insert(key, i);
                insts.push(std::rc::Rc::new(sdk_inst(&c.ms[i].span)));
            }
        }
    }
    let mut sdk_by_id: HashMap<SpanId, usize> = HashMap::with_capacity(n);
    for i in (0..n).filter(|&i| is_sdk[i]) {
        sdk_by_id.insert(c.ms[i].span.span_id, i);
    }
    let tap = |c: &Ctx<'_>, i: usize| c.e(i).map(|e| e.tap_side.clone()).unwrap_or_default();
    let joinable = |e: &EbpfSpan| !e.has(flags::NO_KEYS) && !e.has(flags::NO_TIMESTAMPS);

    // ---- Step A: hops.
    let mut uf: Vec<usize> = (0..n).collect();
    fn find(uf: &mut [usize], mut x: usize) -> usize {
        while uf[x] != x {
            uf[x] = uf[uf[x]];
            x = uf[x];
        }
        x
    }
    {
        let mut by_req: HashMap<u32, Vec<usize>> = HashMap::new();
        let mut by_resp: HashMap<u32, Vec<usize>> = HashMap::new();
        for i in 0..n {
            if let Some(e) = c.e(i).filter(|e| joinable(e)) {
                if e.req_tcp_seq != 0 {
                    by_req.entry(e.req_tcp_seq).or_default().push(i);
                }
                if e.resp_tcp_seq != 0 {
                    by_resp.entry(e.resp_tcp_seq).or_default().push(i);
                }
            }
        }
        for bucket in by_req.values().chain(by_resp.values()) {
            for (k, &a) in bucket.iter().enumerate() {
                for &b in &bucket[k + 1..] {
                    let (ra, rb) = (find(&mut uf, a), find(&mut uf, b));
                    if ra == rb {
                        // Already one hop (the pair shares both seqs): A1 re-checks it anyway.
                        continue;
                    }
                    let (ea, eb) = (c.e(a).expect("e"), c.e(b).expect("e"));
                    if rules::tcp_related(&c.ms[a].span, ea, &c.ms[b].span, eb, tol) {
                        uf[ra.max(rb)] = ra.min(rb);
                    }
                }
            }
        }
    }
    let mut comps: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in (0..n).filter(|&i| !is_sdk[i]) {
        let r = find(&mut uf, i);
        comps.entry(r).or_default().push(i);
    }
    let mut comp_list: Vec<Vec<usize>> = comps.into_values().collect();
    comp_list.sort_unstable_by_key(|v| v[0]);
    let mut hops: Vec<Hop> = Vec::new();
    for members in comp_list {
        // A1: re-check against the first member with the strict rule.
        let first = members[0];
        let mut inside = vec![first];
        let mut alone = Vec::new();
        for &m in &members[1..] {
            let (ef, em) = (c.e(first).expect("e"), c.e(m).expect("e"));
            if rules::tcp_related(&c.ms[first].span, ef, &c.ms[m].span, em, tol) {
                inside.push(m);
            } else {
                alone.push(m);
            }
        }
        order_hop(&c, &mut inside);
        chain_hop(&mut c, &inside, &mut hops);
        for m in alone {
            hops.push(Hop {
                chain: vec![m],
                header: c.e(m).and_then(|e| e.header_span_id),
            });
        }
    }
    let mut hop_of = vec![usize::MAX; n];
    for (h, hop) in hops.iter().enumerate() {
        for &m in &hop.chain {
            hop_of[m] = h;
        }
    }

    // ---- Step B1: SDK process subtrees.
    let mut provisional: Vec<Option<usize>> = vec![None; n];
    for i in (0..n).filter(|&i| is_sdk[i]) {
        let p = c.ms[i].span.parent_span_id;
        if p.is_zero() {
            continue;
        }
        if let Some(&j) = sdk_by_id.get(&p) {
            if j == i {
                continue;
            }
            if sdk_same(&insts[i], &insts[j]) {
                c.set(i, j, Via::SpanId);
            } else {
                provisional[i] = Some(j);
            }
        }
    }

    // ---- Step B2: c-p under the SDK span whose id is its header.
    let mut by_sdk: HashMap<usize, Vec<(usize, Option<bool>)>> = HashMap::new();
    for i in (0..n).filter(|&i| !is_sdk[i]) {
        let e = c.e(i).expect("e");
        if e.tap_side != TapSide::CP || !c.unplaced(i) {
            continue;
        }
        let Some(h) = e.header_span_id else { continue };
        if let Some(&s) = sdk_by_id.get(&SpanId(h)) {
            let m = inst_match(&insts[s], e, &c.ms[i].span, 0);
            if m != Some(false) {
                by_sdk.entry(s).or_default().push((i, m));
            }
        }
    }
    let mut cp_child_of_sdk = vec![false; n];
    let mut b2_placed: Vec<(usize, usize)> = Vec::new();
    for (s, cands) in by_sdk.iter() {
        if let Some(best) = best_candidate(&c, *s, cands) {
            c.set(best, *s, Via::SpanId);
            cp_child_of_sdk[*s] = true;
            b2_placed.push((best, *s));
        }
    }
    b2_placed.sort_unstable();

    // Subtree root of each SDK span (through fixed SDK links).
    let sdk_root = |c: &Ctx<'_>, mut i: usize| {
        let mut guard = 0;
        while let Parent::Node(p) = c.parent[i] {
            if !is_sdk[p] || guard > n {
                break;
            }
            i = p;
            guard += 1;
        }
        i
    };

    // ---- Step B3: s-p above SDK subtree roots.
    let sps: Vec<usize> = (0..n)
        .filter(|&i| c.e(i).is_some_and(|e| e.tap_side == TapSide::SP))
        .collect();
    let cps: Vec<usize> = (0..n)
        .filter(|&i| c.e(i).is_some_and(|e| e.tap_side == TapSide::CP))
        .collect();
    let sdk_roots: Vec<usize> = (0..n).filter(|&i| is_sdk[i] && c.unplaced(i)).collect();
    for &r in &sdk_roots {
        let p = c.ms[r].span.parent_span_id;
        if !p.is_zero() {
            let cands: Vec<(usize, Option<bool>)> = sps
                .iter()
                .filter_map(|&k| {
                    let e = c.e(k)?;
                    (e.header_span_id == Some(p.0)).then_some(())?;
                    let m = inst_match(&insts[r], e, &c.ms[k].span, 1);
                    (m != Some(false)).then_some((k, m))
                })
                .collect();
            if let Some(k) = best_candidate(&c, r, &cands) {
                c.set(r, k, Via::SpanId);
            }
        } else {
            // (b)/(c): an s-p linked in-process to a c-p placed under this subtree in B2.
            let found = b2_placed.iter().find_map(|&(cp, s)| {
                if sdk_root(&c, s) != r {
                    return None;
                }
                let ecp = c.e(cp)?;
                sps.iter().find_map(|&k| {
                    let ek = c.e(k)?;
                    match rules::syscall_rel(ek, ecp, tol) {
                        Some((SysRel::Parent { same_side: true }, _)) => Some((k, Via::Syscall)),
                        _ if ek.tap_side == TapSide::SP && rules::xreq_upstream(ek, ecp) => {
                            Some((k, Via::XRequestId))
                        }
                        _ => None,
                    }
                })
            });
            if let Some((k, via)) = found {
                c.set(r, k, via);
            }
        }
    }

    // Process set of each SDK span: the s-p above its subtree root, if any.
    let proc_of = |c: &Ctx<'_>, i: usize| -> Option<usize> {
        let r = sdk_root(c, i);
        match c.parent[r] {
            Parent::Node(k) if c.e(k).is_some_and(|e| e.tap_side == TapSide::SP) => Some(k),
            _ => None,
        }
    };
    let depth = |c: &Ctx<'_>, mut i: usize| {
        let mut d = 0;
        while let Parent::Node(p) = c.parent[i] {
            if d > n {
                break;
            }
            d += 1;
            i = p;
        }
        d
    };

    // Syscall sibling chains among c-p (B4.5, F1).
    let mut chain_uf: Vec<usize> = (0..n).collect();
    for (k, &a) in cps.iter().enumerate() {
        for &b in &cps[k + 1..] {
            let (ea, eb) = (c.e(a).expect("e"), c.e(b).expect("e"));
            if rules::syscall_rel(ea, eb, tol).is_some()
                || rules::syscall_rel(eb, ea, tol).is_some()
            {
                let (ra, rb) = (find(&mut chain_uf, a), find(&mut chain_uf, b));
                chain_uf[ra.max(rb)] = ra.min(rb);
            }
        }
    }
    let chain_id: Vec<usize> = (0..n).map(|i| find(&mut chain_uf, i)).collect();

    // ---- Step B4: remaining c-p to their process.
    for &cp in &cps {
        if !c.unplaced(cp) {
            continue;
        }
        let ecp = c.e(cp).expect("e");
        let mut best: Option<(u64, usize, Via)> = None;
        for &k in &sps {
            let ek = c.e(k).expect("e");
            if !rules::same_process(ek, ecp) {
                continue;
            }
            let timing = if ek.duration_us == 0 {
                ek.start_ns <= ecp.start_ns
            } else {
                rules::covers(ek, ecp)
            };
            if !timing {
                continue;
            }
            let direct = matches!(
                rules::syscall_rel(ek, ecp, tol),
                Some((SysRel::Parent { .. }, _))
            );
            let chained = !direct
                && cps.iter().any(|&o| {
                    o != cp
                        && chain_id[o] == chain_id[cp]
                        && c.e(o).is_some_and(|eo| {
                            matches!(
                                rules::syscall_rel(ek, eo, tol),
                                Some((SysRel::Parent { .. }, _))
                            )
                        })
                });
            let via = if direct || chained {
                Via::Syscall
            } else if rules::xreq_upstream(ek, ecp) {
                Via::XRequestId
            } else if ek.trace_key.is_some() && ek.trace_key == ecp.trace_key {
                Via::TraceId
            } else {
                continue;
            };
            if best.is_none_or(|(s, _, _)| ek.start_ns > s) {
                best = Some((ek.start_ns, k, via));
            }
        }
        if best.is_none() {
            // B4.6: async work after the request ended, same trace key.
            for &k in &sps {
                let ek = c.e(k).expect("e");
                if rules::same_process(ek, ecp)
                    && ek.trace_key.is_some()
                    && ek.trace_key == ecp.trace_key
                    && ek.end_ns <= ecp.start_ns
                    && best.is_none_or(|(s, _, _)| ek.end_ns > s)
                {
                    best = Some((ek.end_ns, k, Via::TraceId));
                }
            }
        }
        let Some((_, k, via)) = best else { continue };
        // B4.4: the SDK CLIENT span of the call, else the deepest covering SDK span, else the s-p.
        let set: Vec<usize> = (0..n)
            .filter(|&i| is_sdk[i] && proc_of(&c, i) == Some(k))
            .collect();
        // Each CLIENT span takes at most one c-p (`taken`).
        let client_of = |c: &Ctx<'_>, taken: &[bool], x: usize| {
            let ex = c.e(x)?;
            set.iter()
                .copied()
                .filter(|&s| {
                    matches!(c.ms[s].span.kind, SpanKind::Client | SpanKind::Producer)
                        && !taken[s]
                        && c.sdk_covers(s, x)
                        && protocol_matches(&c.ms[s].span, ex.l7_protocol)
                })
                .min_by_key(|&s| (c.dur_us(s).abs_diff(ex.duration_us), s))
        };
        let client = client_of(&c, &cp_child_of_sdk, cp);
        let deepest = set
            .iter()
            .copied()
            .filter(|&s| {
                matches!(
                    c.ms[s].span.kind,
                    SpanKind::Server | SpanKind::Consumer | SpanKind::Internal
                ) && c.sdk_covers(s, cp)
            })
            .max_by_key(|&s| (depth(&c, s), std::cmp::Reverse(s)));
        match client.or(deepest) {
            Some(s) => {
                if client == Some(s) {
                    cp_child_of_sdk[s] = true;
                }
                c.set(cp, s, via);
            }
            None => c.set(cp, k, via),
        }
        // B4.5: the rest of its syscall sibling chain shares the parent (one thread's calls
        // belong to one request), unless a member has its own SDK CLIENT span. The shared parent
        // is never a CLIENT span: that one belongs to its own call.
        let shared = deepest.unwrap_or(k);
        for &o in &cps {
            if o == cp || chain_id[o] != chain_id[cp] || !c.unplaced(o) {
                continue;
            }
            match client_of(&c, &cp_child_of_sdk, o) {
                Some(s) => {
                    cp_child_of_sdk[s] = true;
                    c.set(o, s, Via::Syscall);
                }
                None => c.set(o, shared, Via::Syscall),
            }
        }
    }

    // ---- Step C: connecting sets.
    let mut cp_took_hop = vec![false; n];
    for h in 0..hops.len() {
        let root = hops[h].root();
        if !c.unplaced(root) || tap(&c, root) == TapSide::CP {
            continue;
        }
        // C1: the process-set leaf whose header (a c-p that starts no hop of its own) or whose
        // id (an SDK span) is the hop header. The c-p is the deeper of the two.
        if let Some(hd) = hops[h].header {
            let er = c.e(root).expect("e");
            let leaf_cp = cps
                .iter()
                .copied()
                .filter(|&k| {
                    hop_of[k] != h
                        && !cp_took_hop[k]
                        && hops[hop_of[k]].leaf() == k
                        && c.e(k)
                            .is_some_and(|ek| ek.header_span_id == Some(hd) && c_guard(ek, er))
                        && !is_ancestor(&c.parent, root, k)
                })
                .min_by_key(|&k| {
                    (
                        c.deviation(k, root),
                        c.dur_us(k).abs_diff(c.dur_us(root)),
                        k,
                    )
                });
            if let Some(k) = leaf_cp {
                c.set(root, k, Via::SpanId);
                cp_took_hop[k] = true;
                continue;
            }
            if let Some(&s) = sdk_by_id.get(&SpanId(hd)) {
                let e = c.e(root).expect("e");
                if inst_match(&insts[s], e, &c.ms[root].span, 0) != Some(false) {
                    c.set(root, s, Via::SpanId);
                }
            }
        }
    }
    for h in 0..hops.len() {
        let leaf = hops[h].leaf();
        if tap(&c, leaf) == TapSide::SP {
            continue;
        }
        let Some(hd) = hops[h].header else { continue };
        // C2: the hop has no s-p; an SDK root (or a stray s-p) carrying the hop header hangs below.
        let e = c.e(leaf).expect("e");
        let cands: Vec<(usize, Option<bool>)> = (0..n)
            .filter(|&r| {
                is_sdk[r]
                    && c.unplaced(r)
                    && c.ms[r].span.parent_span_id == SpanId(hd)
                    && hop_of[r] == usize::MAX
            })
            .map(|r| (r, inst_match(&insts[r], e, &c.ms[leaf].span, 1)))
            .filter(|(_, m)| *m != Some(false))
            .collect();
        if let Some(r) = cands
            .iter()
            .min_by_key(|(r, m)| (*m != Some(true), c.deviation(*r, leaf), *r))
        {
            c.set(r.0, leaf, Via::SpanId);
        } else if let Some(&stray) = sps.iter().find(|&&k| {
            c.unplaced(k)
                && hop_of[k] != h
                && c.e(k).is_some_and(|ek| ek.header_span_id == Some(hd))
        }) {
            c.set(stray, leaf, Via::SpanId);
        }
    }
    // C3: provisional SDK parents stay.
    for i in 0..n {
        if let Some(p) = provisional[i] {
            c.set(i, p, Via::SpanId);
        }
    }
    // C3 between eBPF spans: a c-p that starts a process set of its own (no syscall or
    // X-Request-ID link to its s-p) hangs under the s-p that received the header it forwards,
    // e.g. a worker that broke the syscall chain, or a sidecar that opened a new connection.
    // The nearest s-p wins: same agent, same process, smallest time deviation, latest start.
    for &r in &cps {
        if !c.unplaced(r) {
            continue;
        }
        let er = c.e(r).expect("e");
        let Some(hd) = er.header_span_id else {
            continue;
        };
        let best = sps
            .iter()
            .copied()
            .filter(|&p| {
                hop_of[p] != hop_of[r]
                    && c.e(p)
                        .is_some_and(|ep| ep.header_span_id == Some(hd) && c_guard(ep, er))
                    && !is_ancestor(&c.parent, r, p)
            })
            .min_by_key(|&p| {
                let ep = c.e(p).expect("e");
                (
                    ep.agent != er.agent,
                    !rules::same_process(ep, er),
                    c.deviation(p, r),
                    std::cmp::Reverse(ep.start_ns),
                    p,
                )
            });
        if let Some(p) = best {
            c.set(r, p, Via::SpanId);
        }
    }
    // C4: hop leaf -> hop root through X-Request-ID or an equal hop header.
    for h in 0..hops.len() {
        let root = hops[h].root();
        if !c.unplaced(root) {
            continue;
        }
        let er = c.e(root).expect("e");
        let mut best: Option<(u64, usize, Via)> = None;
        for (g, other) in hops.iter().enumerate() {
            if g == h {
                continue;
            }
            let leaf = other.leaf();
            let el = c.e(leaf).expect("e");
            if el.agent == er.agent && !rules::covers(el, er) {
                continue;
            }
            if el.duration_us < er.duration_us {
                continue;
            }
            let via = if rules::xreq_upstream(el, er) {
                Via::XRequestId
            } else if other.header.is_some() && other.header == hops[h].header {
                Via::SpanId
            } else {
                continue;
            };
            if best.is_none_or(|(d, _, _)| el.duration_us < d) {
                best = Some((el.duration_us, leaf, via));
            }
        }
        if let Some((_, leaf, via)) = best {
            if !is_ancestor(&c.parent, root, leaf) {
                c.set(root, leaf, via);
            }
        }
    }

    // ---- Step D: spans placed by trace id only; SDK spans keep their own parents.
    for i in 0..n {
        if !c.unplaced(i) {
            continue;
        }
        match c.e(i) {
            None => {
                if !c.ms[i].span.parent_span_id.is_zero() {
                    c.parent[i] = Parent::Own;
                    c.via[i] = Some(Via::SpanId);
                } else {
                    // A parentless root of an extra component: only the trace id put it here.
                    c.via[i] = Some(Via::TraceId);
                }
            }
            Some(e) if e.trace_key == Some(unit_trace) => match e.header_span_id {
                Some(h) => match sdk_by_id.get(&SpanId(h)) {
                    Some(&s) => c.set(i, s, Via::SpanId),
                    None => {
                        c.parent[i] = Parent::Dangling(SpanId(h));
                        c.via[i] = Some(Via::SpanId);
                    }
                },
                None => c.via[i] = Some(Via::TraceId),
            },
            Some(_) => {}
        }
    }

    // Cycle check: on a cycle, the weakest link is cut and its child becomes a root.
    break_cycles(&mut c.parent, &mut c.via);

    // ---- Step E: components, main root, pruning.
    let mut top = vec![usize::MAX; n];
    let mut path = Vec::new();
    for i in 0..n {
        path.clear();
        let mut x = i;
        loop {
            if top[x] != usize::MAX {
                break;
            }
            path.push(x);
            match c.parent[x] {
                Parent::Node(p) => x = p,
                _ => break,
            }
        }
        let t = if top[x] != usize::MAX { top[x] } else { x };
        for &p in &path {
            top[p] = t;
        }
    }
    let mut sdk_count: HashMap<usize, usize> = HashMap::new();
    let mut has_key: HashMap<usize, bool> = HashMap::new();
    for i in 0..n {
        if is_sdk[i] {
            *sdk_count.entry(top[i]).or_default() += 1;
        }
        let k = match c.e(i) {
            None => true,
            Some(e) => e.trace_key == Some(unit_trace),
        };
        *has_key.entry(top[i]).or_default() |= k;
    }
    let roots: Vec<usize> = (0..n).filter(|&i| top[i] == i).collect();
    let main_root = roots
        .iter()
        .copied()
        .max_by_key(|&r| {
            (
                sdk_count.get(&r).copied().unwrap_or(0),
                std::cmp::Reverse(c.start(r)),
                std::cmp::Reverse(r),
            )
        })
        .unwrap_or(0);
    let kept: Vec<bool> = (0..n)
        .map(|i| top[i] == main_root || has_key.get(&top[i]).copied().unwrap_or(false))
        .collect();
    let mut trace_id = unit_trace;
    if allow_multiple {
        if let Some(s) = (0..n)
            .filter(|&i| is_sdk[i] && top[i] == main_root)
            .min_by_key(|&i| (depth(&c, i), c.start(i)))
        {
            trace_id = c.ms[s].span.trace_id.0;
        }
    }

    // ---- Step F: clock correction and pre-order.
    let offsets = clock_offsets(&c, &hops);
    let mut off_node = vec![0i64; n];
    let mut done = vec![false; n];
    for i in 0..n {
        node_offset(&c, &offsets, i, &mut off_node, &mut done, 0);
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        if let Parent::Node(p) = c.parent[i] {
            if kept[i] {
                children[p].push(i);
            }
        }
    }
    // Chain members sort together, at the chain's first start, in chain order.
    let corrected = |i: usize| c.start(i) as i128 + off_node[i] as i128 * 1000;
    let mut chain_head: HashMap<usize, i128> = HashMap::new();
    for &cp in &cps {
        let v = chain_head.entry(chain_id[cp]).or_insert(i128::MAX);
        *v = (*v).min(corrected(cp));
    }
    let chain_size = |id: usize| cps.iter().filter(|&&x| chain_id[x] == id).count();
    let key = |i: usize| {
        let rank = c.e(i).map_or(0, |e| e.tap_side.rank());
        let sid = c.ms[i].span.span_id;
        if c.e(i).is_some_and(|e| e.tap_side == TapSide::CP) && chain_size(chain_id[i]) > 1 {
            let head = chain_head[&chain_id[i]];
            (head, chain_id[i], c.start(i), rank, sid)
        } else {
            (corrected(i), usize::MAX, 0, rank, sid)
        }
    };
    for ch in children.iter_mut() {
        if ch.len() > 1 {
            ch.sort_by_cached_key(|&i| key(i));
        }
    }
    let mut other_roots: Vec<usize> = roots
        .iter()
        .copied()
        .filter(|&r| r != main_root && kept[r])
        .collect();
    other_roots.sort_by_cached_key(|&r| (c.start(r), r));
    let mut order = vec![0u32; n];
    let mut next = 0u32;
    let mut stack: Vec<usize> = Vec::new();
    for r in std::iter::once(main_root).chain(other_roots) {
        if r >= n {
            continue;
        }
        stack.push(r);
        while let Some(x) = stack.pop() {
            order[x] = next;
            next += 1;
            for &ch in children[x].iter().rev() {
                stack.push(ch);
            }
        }
    }
    let mut via = c.via;
    if main_root < n {
        via[main_root] = None;
    }
    Plan {
        trace_id,
        parent: c.parent,
        via,
        order,
        kept,
        offset_us: off_node,
        main_root,
    }
}

/// A2: segment order `c-p` | network | `s-p`.
fn order_hop(c: &Ctx<'_>, members: &mut [usize]) {
    let e = |i: usize| c.e(i).expect("eBPF hop member");
    let simple = members.iter().all(|&m| {
        matches!(
            e(m).tap_side,
            TapSide::CP
                | TapSide::SP
                | TapSide::C
                | TapSide::CNd
                | TapSide::CHv
                | TapSide::SHv
                | TapSide::SNd
                | TapSide::S
        )
    });
    let ingress = members
        .iter()
        .filter(|&&m| matches!(e(m).tap_side, TapSide::CP | TapSide::C | TapSide::CNd))
        .min_by_key(|&&m| e(m).tap_side.rank())
        .map(|&m| e(m).agent.clone());
    let egress = members
        .iter()
        .filter(|&&m| matches!(e(m).tap_side, TapSide::S | TapSide::SNd | TapSide::SP))
        .max_by_key(|&&m| e(m).tap_side.rank())
        .map(|&m| e(m).agent.clone());
    let agent_group = |m: usize| {
        let a = &e(m).agent;
        if ingress.as_ref() == Some(a) {
            0
        } else if egress.as_ref() == Some(a) {
            2
        } else {
            1
        }
    };
    let seg = |m: usize| match e(m).tap_side {
        TapSide::CP => 0u8,
        TapSide::SP => 2,
        _ => 1,
    };
    members.sort_by_cached_key(|&m| {
        let x = e(m);
        let (k1, k2) = if simple {
            (x.tap_side.rank() as i64, -(x.duration_us as i64))
        } else {
            (-(x.duration_us as i64), x.tap_side.rank() as i64)
        };
        (seg(m), k1, k2, agent_group(m), x.start_ns, m)
    });
    // gRPC/HTTP2 server push: the session flows server -> client.
    let reversed = members.iter().all(|&m| {
        let x = e(m);
        rules::same_l7(x.l7_protocol, 21)
            && x.l7_protocol != 0
            && x.req_tcp_seq == 0
            && x.has(flags::SESSION)
    });
    if reversed {
        members.reverse();
    }
}

/// A3: parent of member i is member i-1, with the two exceptions of join.md §6.
fn chain_hop(c: &mut Ctx<'_>, members: &[usize], hops: &mut Vec<Hop>) {
    let header = |c: &Ctx<'_>, chain: &[usize]| {
        chain
            .iter()
            .find_map(|&m| c.e(m).and_then(|e| e.header_span_id))
    };
    let mut chain: Vec<usize> = vec![members[0]];
    let mut strays: Vec<usize> = Vec::new();
    for &m in &members[1..] {
        let p = *chain.last().expect("chain");
        let (ep, em) = (c.e(p).expect("e"), c.e(m).expect("e"));
        if ep.is_system()
            && em.is_system()
            && !(ep.tap_side == TapSide::CP && em.tap_side == TapSide::SP)
        {
            strays.push(m);
            continue;
        }
        if ep.agent != em.agent {
            let dev = c.tol.dev(ep, em);
            let overlap = ep.start_ns <= em.end_ns.saturating_add(dev)
                && em.start_ns <= ep.end_ns.saturating_add(dev);
            if !overlap {
                let h = header(c, &chain);
                hops.push(Hop {
                    chain: std::mem::take(&mut chain),
                    header: h,
                });
                chain.push(m);
                continue;
            }
        }
        c.set(m, p, Via::TcpSeq);
        chain.push(m);
    }
    let h = header(c, &chain);
    hops.push(Hop { chain, header: h });
    for s in strays {
        hops.push(Hop {
            chain: vec![s],
            header: c.e(s).and_then(|e| e.header_span_id),
        });
    }
}

/// The guards of every step-C rule between two eBPF spans, `p` the parent: on one agent `p`
/// covers `c`; with both durations known, `p` lasts at least as long.
fn c_guard(p: &EbpfSpan, c: &EbpfSpan) -> bool {
    if p.agent == c.agent && !rules::covers(p, c) {
        return false;
    }
    p.duration_us == 0 || c.duration_us == 0 || p.duration_us >= c.duration_us
}

fn protocol_matches(s: &Span, l7: u8) -> bool {
    let has = |k: &str| s.attr(k).is_some();
    match l7 {
        60..=63 | 80..=82 => has("db.system"),
        40 | 41 | 49 => has("rpc.system"),
        20 | 21 => {
            has("http.method")
                || has("http.request.method")
                || has("url.full")
                || has("http.url")
                || has("rpc.system")
        }
        100..=108 => has("messaging.system"),
        _ => true,
    }
}

fn is_ancestor(parent: &[Parent], anc: usize, mut x: usize) -> bool {
    let mut steps = 0;
    loop {
        if x == anc {
            return true;
        }
        match parent[x] {
            Parent::Node(p) if steps <= parent.len() => {
                x = p;
                steps += 1;
            }
            _ => return false,
        }
    }
}

fn break_cycles(parent: &mut [Parent], via: &mut [Option<Via>]) {
    let n = parent.len();
    let mut state = vec![0u8; n]; // 0 new, 1 on path, 2 done
    let mut path = Vec::new();
    for i in 0..n {
        path.clear();
        let mut x = i;
        while state[x] == 0 {
            state[x] = 1;
            path.push(x);
            match parent[x] {
                Parent::Node(p) => x = p,
                _ => break,
            }
        }
        if state[x] == 1 {
            if let Parent::Node(_) = parent[x] {
                // x is on the current path and links back into it: a cycle starting at x.
                let start = path.iter().position(|&p| p == x).unwrap_or(0);
                let cycle = &path[start..];
                if let Some(&weak) = cycle
                    .iter()
                    .max_by_key(|&&m| (via[m].unwrap_or(Via::TraceId), m))
                {
                    parent[weak] = Parent::Root;
                    via[weak] = Some(Via::TraceId);
                }
            }
        }
        for &p in &path {
            state[p] = 2;
        }
    }
}

/// Clock offsets per agent, in µs (join.md §6 F).
fn clock_offsets(c: &Ctx<'_>, hops: &[Hop]) -> HashMap<std::sync::Arc<str>, i64> {
    let mut cons: Vec<(std::sync::Arc<str>, std::sync::Arc<str>, i64, i64)> = Vec::new();
    for hop in hops {
        for w in hop.chain.windows(2) {
            let (ep, ec) = (c.e(w[0]).expect("e"), c.e(w[1]).expect("e"));
            if ep.agent == ec.agent {
                continue;
            }
            // i128: timestamps come from the network and may be anything.
            let us = |x: u64, y: u64| {
                ((x as i128 - y as i128) / 1000).clamp(i64::MIN as i128, i64::MAX as i128) as i64
            };
            let a = us(ep.start_ns, ec.start_ns);
            let b = us(ep.end_ns, ec.end_ns);
            cons.push((ep.agent.clone(), ec.agent.clone(), a.min(b), a.max(b)));
        }
    }
    let mut off: HashMap<std::sync::Arc<str>, i64> = HashMap::new();
    if cons.is_empty() {
        return off;
    }
    let children: Vec<&std::sync::Arc<str>> = cons.iter().map(|c| &c.1).collect();
    for (p, _, _, _) in &cons {
        if !children.contains(&p) {
            off.insert(p.clone(), 0);
        }
    }
    for _ in 0..cons.len() + 1 {
        let mut changed = false;
        for (p, ch, _, _) in &cons {
            if off.contains_key(ch) {
                continue;
            }
            let Some(&po) = off.get(p) else { continue };
            let (mut lo, mut hi) = (i64::MIN, i64::MAX);
            for (p2, c2, l, h) in &cons {
                if p2 == p && c2 == ch {
                    lo = lo.max(*l);
                    hi = hi.min(*h);
                }
            }
            // Empty intersection, or one containing 0: no correction.
            let o = if lo > hi || (lo <= 0 && 0 <= hi) {
                0
            } else if lo > 0 {
                lo
            } else {
                hi
            };
            off.insert(ch.clone(), po.saturating_add(o));
            changed = true;
        }
        if !changed {
            break;
        }
    }
    off
}

fn node_offset(
    c: &Ctx<'_>,
    offsets: &HashMap<std::sync::Arc<str>, i64>,
    i: usize,
    out: &mut [i64],
    done: &mut [bool],
    depth: usize,
) -> i64 {
    if done[i] {
        return out[i];
    }
    let v = match c.e(i) {
        Some(e) => offsets.get(&e.agent).copied().unwrap_or(0),
        None => match c.parent[i] {
            Parent::Node(p) if depth < out.len() => {
                node_offset(c, offsets, p, out, done, depth + 1)
            }
            _ => 0,
        },
    };
    out[i] = v;
    done[i] = true;
    v
}
