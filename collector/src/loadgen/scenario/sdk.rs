//! The `sdk` scenario: SDK-only traces of N spans from one service, for throughput benches.
//!
//! A SERVER root; every other span is a CLIENT or INTERNAL child of an earlier non-CLIENT span.
//! Children run one after the other inside their parent. With no eBPF span the join passes the
//! trace through unchanged (`join.md` §7), so the expected parents are the SDK parents.

use super::model::{
    kv_str, pod, BENCH, KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, STATUS_ERROR, STATUS_UNSET,
};
use super::TraceBuild;

pub(super) fn build(b: &mut TraceBuild<'_>) -> &'static str {
    let pod = pod(BENCH, b.tenant);
    let n = b.cfg().sdk_spans.max(1);
    let (er, sr) = (b.cfg().error_rate, b.cfg().slow_rate);
    let u = b.rng().unit();
    let case = if u < er {
        "sdk_error"
    } else if u < er + sr {
        "slow"
    } else {
        "normal"
    };

    let mut parent: Vec<Option<usize>> = vec![None];
    let mut kind = vec![KIND_SERVER];
    for i in 1..n {
        let candidates: Vec<usize> = (0..i).filter(|&j| kind[j] != KIND_CLIENT).collect();
        let p = candidates[b.rng().below(candidates.len() as u64) as usize];
        parent.push(Some(p));
        kind.push(if b.rng().chance(0.5) {
            KIND_CLIENT
        } else {
            KIND_INTERNAL
        });
    }
    let children: Vec<Vec<usize>> = (0..n)
        .map(|j| (0..n).filter(|&i| parent[i] == Some(j)).collect())
        .collect();

    // Durations bottom-up (children sequential with 50 µs gaps), then starts top-down.
    let mut dur = vec![0i64; n];
    let slow_leaf = if case == "slow" {
        let leaves: Vec<usize> = (0..n).filter(|&i| children[i].is_empty()).collect();
        Some(leaves[b.rng().below(leaves.len() as u64) as usize])
    } else {
        None
    };
    for i in (0..n).rev() {
        dur[i] = if children[i].is_empty() {
            if Some(i) == slow_leaf {
                b.rng().range(700_000, 1_200_000)
            } else {
                b.rng().range(200, 2000)
            }
        } else {
            100 + children[i].iter().map(|&c| dur[c] + 50).sum::<i64>()
        };
    }
    let mut start = vec![0i64; n];
    for i in 0..n {
        let mut t = start[i] + 50;
        for &c in &children[i] {
            start[c] = t;
            t += dur[c] + 50;
        }
    }
    let error_span = (case == "sdk_error").then(|| b.rng().below(n as u64) as usize);

    let ids: Vec<[u8; 8]> = (0..n).map(|_| b.rng().span_id()).collect();
    let route = b.rng().below(16);
    for i in 0..n {
        let name = match (i, kind[i]) {
            (0, _) => format!("GET /bench/{route}"),
            (_, KIND_CLIENT) => format!("call downstream {i}"),
            _ => format!("work {i}"),
        };
        let status = if error_span == Some(i) {
            (STATUS_ERROR, "injected failure")
        } else {
            (STATUS_UNSET, "")
        };
        let p = parent[i].map(|p| ids[p]);
        b.sdk_span(
            &pod,
            ids[i],
            p,
            &name,
            kind[i],
            (start[i], start[i] + dur[i]),
            vec![kv_str("bench.index", i.to_string())],
            status,
            p,
            p.map(|_| "span_id"),
        );
    }
    case
}
