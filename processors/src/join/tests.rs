//! Deterministic state-machine tests: the worked examples of join.md §9, the edge cases of §10,
//! and the bkmonitor-bookinfo fixture. Spans are built as DeepFlow and SDKs export them, run
//! through the real normalizer, and fed with injected `Instant`s.

use std::collections::HashMap as StdMap;
use std::time::{Duration, Instant};

use tailweave_core::{Span, SpanBatch, SpanId, SpanKind, StatusCode};
use tailweave_receivers::deepflow::normalize::{normalize_spans, Role};

use super::output::{
    LATE, MERGED_SPAN_IDS, ORDER, ORIGINAL_PARENT, ORIGINAL_TRACE_ID, OTHER_TRACE_IDS, TAP_SIDE,
    VIA,
};
use super::testkit::{kv_s, sdk_scope, sdk_span, DfRow};
use super::*;

const BASE_US: u64 = 1_700_000_000_000_000;

fn us(ms: f64) -> u64 {
    BASE_US + (ms * 1000.0).round() as u64
}

fn norm(mut v: Vec<Span>) -> Vec<Span> {
    normalize_spans(&mut v, Role::Shared);
    v
}

fn join(cfg: JoinConfig) -> Join {
    assert!(cfg.validate().is_empty());
    Join::new(cfg)
}

fn feed(j: &mut Join, now: Instant, spans: Vec<Span>) -> Vec<SpanBatch> {
    let mut out = Vec::new();
    j.process(now, SpanBatch::new(norm(spans)), &mut out);
    out
}

fn tick(j: &mut Join, now: Instant) -> Vec<SpanBatch> {
    let mut out = Vec::new();
    j.tick(now, &mut out);
    out
}

fn s_attr(s: &Span, k: &str) -> Option<String> {
    s.attr(k).map(|v| v.to_string_lossy())
}

fn i_attr(s: &Span, k: &str) -> Option<i64> {
    s.attr(k).and_then(|v| v.as_i64())
}

fn str_array(s: &Span, k: &str) -> Vec<String> {
    let Ok(p) = s.decode() else { return Vec::new() };
    use tailweave_core::proto::tonic::common::v1::any_value::Value;
    p.attributes
        .iter()
        .find(|a| a.key == k)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::ArrayValue(arr)) => Some(
                arr.values
                    .iter()
                    .filter_map(|x| match &x.value {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// One row of an expected table: (span, parent, via, order).
type Row = (&'static str, &'static str, &'static str, i64);

fn labels(pairs: &[(&'static str, u64)]) -> StdMap<SpanId, &'static str> {
    pairs
        .iter()
        .map(|(l, id)| (SpanId::from_u64(*id), *l))
        .collect()
}

/// Asserts a unit against an expected table, in output order.
fn assert_unit(unit: &[Span], names: &StdMap<SpanId, &'static str>, want: &[Row], trace: [u8; 16]) {
    let got: Vec<(String, String, String, i64)> = unit
        .iter()
        .map(|s| {
            let l = names.get(&s.span_id).copied().unwrap_or("?").to_string();
            let p = if s.parent_span_id.is_zero() {
                "-".to_string()
            } else {
                names
                    .get(&s.parent_span_id)
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| s.parent_span_id.to_hex())
            };
            let via = s_attr(s, VIA).unwrap_or_else(|| "-".into());
            (l, p, via, i_attr(s, ORDER).unwrap_or(-1))
        })
        .collect();
    let want: Vec<(String, String, String, i64)> = want
        .iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), *d))
        .collect();
    assert_eq!(got, want);
    for s in unit {
        assert_eq!(s.trace_id.0, trace, "every span adopts the unit's trace id");
        assert_ne!(s.parent_span_id, s.span_id, "parent == self never survives");
        if let Some(e) = &s.ebpf {
            assert_eq!(s_attr(s, TAP_SIDE).as_deref(), Some(e.tap_side.code()));
        }
    }
}

fn only_unit(out: Vec<SpanBatch>) -> Vec<Span> {
    assert_eq!(
        out.len(),
        1,
        "one unit: {:?}",
        out.iter().map(|b| b.len()).collect::<Vec<_>>()
    );
    assert!(out[0].whole);
    out.into_iter().next().unwrap().spans
}

fn find(unit: &[Span], id: u64) -> &Span {
    unit.iter()
        .find(|s| s.span_id == SpanId::from_u64(id))
        .expect("span in unit")
}

const T1: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
const T2: [u8; 16] = [
    0x5c, 0x01, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x37,
];
const T3: [u8; 16] = [
    0x6d, 0x02, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x38,
];

// ---------------------------------------------------------------- example (i)

const W1: u64 = 0x1111_0000_0000_0001;
const W2: u64 = 0x1111_0000_0000_0002;
const A1: u64 = 0x2222_0000_0000_0001;
const E1: u64 = 0x6553_f100_0040_0001;
const E2: u64 = 0x6553_f100_0040_0002;
const E3: u64 = 0x6553_f100_0040_0003;
const E4: u64 = 0x6553_f100_0040_0004;
const E5: u64 = 0x6553_f100_0040_0005;

fn example_i() -> (Vec<Span>, Vec<Span>) {
    let web = sdk_scope("web", "web-pod", "default");
    let api = sdk_scope("api", "api-pod", "default");
    let sdk = vec![
        sdk_span(
            &web,
            T1,
            W1,
            0,
            SpanKind::Server,
            "GET /",
            us(0.0),
            us(50.0),
            vec![],
        ),
        sdk_span(
            &web,
            T1,
            W2,
            W1,
            SpanKind::Client,
            "GET /api",
            us(5.0),
            us(45.0),
            vec![kv_s("http.method", "GET")],
        ),
        sdk_span(
            &api,
            T1,
            A1,
            W2,
            SpanKind::Server,
            "GET /api",
            us(4.2),
            us(41.3),
            vec![],
        ),
    ];
    let ebpf = vec![
        DfRow::new(E3, "c-p", "nginx-node")
            .trace(T1, W2)
            .seqs(3001, 4001)
            .sys(77, 78)
            .pids(900, 0)
            .pods("nginx-pod", "api-pod")
            .time_us(us(9.6), us(48.0))
            .to_span(),
        DfRow::new(E1, "c-p", "web-node")
            .trace(T1, W2)
            .seqs(1001, 2001)
            .sys(31, 32)
            .pids(410, 0)
            .pods("web-pod", "nginx-pod")
            .time_us(us(5.1), us(44.9))
            .to_span(),
        DfRow::new(E4, "s-p", "api-node")
            .trace(T1, W2)
            .seqs(3001, 4001)
            .sys(55, 55)
            .pids(0, 620)
            .pods("nginx-pod", "api-pod")
            .time_us(us(4.0), us(41.5))
            .to_span(),
        DfRow::new(E2, "s-p", "nginx-node")
            .trace(T1, W2)
            .seqs(1001, 2001)
            .sys(77, 78)
            .pids(0, 900)
            .pods("web-pod", "nginx-pod")
            .time_us(us(9.2), us(48.8))
            .to_span(),
    ];
    (sdk, ebpf)
}

#[test]
fn example_i_uninstrumented_nginx_between_two_sdk_services() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_i();
    assert!(feed(&mut j, t0, sdk).is_empty());
    assert!(feed(&mut j, t0 + Duration::from_secs(3), ebpf).is_empty());
    assert_eq!(j.pending_groups(), 1);
    assert!(
        tick(&mut j, t0 + Duration::from_secs(14)).is_empty(),
        "min wait not reached"
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let names = labels(&[
        ("W1", W1),
        ("W2", W2),
        ("E1", E1),
        ("E2", E2),
        ("E3", E3),
        ("E4", E4),
        ("A1", A1),
    ]);
    assert_unit(
        &unit,
        &names,
        &[
            ("W1", "-", "-", 0),
            ("W2", "W1", "span_id", 1),
            ("E1", "W2", "span_id", 2),
            ("E2", "E1", "tcp_seq", 3),
            ("E3", "E2", "syscall", 4),
            ("E4", "E3", "tcp_seq", 5),
            ("A1", "E4", "span_id", 6),
        ],
        T1,
    );
    let a1 = find(&unit, A1);
    assert_eq!(
        s_attr(a1, ORIGINAL_PARENT),
        Some(SpanId::from_u64(W2).to_hex())
    );
    assert_eq!(
        s_attr(find(&unit, W2), ORIGINAL_PARENT),
        None,
        "kept parents are not marked"
    );
    assert_eq!(
        s_attr(find(&unit, E1), ORIGINAL_TRACE_ID),
        None,
        "real trace ids are not replaced"
    );
    assert_eq!(j.pending_spans(), 0);
    assert_eq!(j.pending_bytes(), 0);
}

// ---------------------------------------------------------------- example (ii)

const F1: u64 = 0x3333_0000_0000_0001;
const O1: u64 = 0x4444_0000_0000_0001;

fn example_ii(with_entry: bool) -> (Vec<Span>, Vec<Span>) {
    let frontend = sdk_scope("frontend", "frontend-pod", "default");
    let orders = sdk_scope("orders", "orders-pod", "default");
    let sdk = vec![
        sdk_span(
            &frontend,
            T2,
            F1,
            0,
            SpanKind::Client,
            "POST /orders",
            us(0.0),
            us(30.0),
            vec![],
        ),
        sdk_span(
            &orders,
            T2,
            O1,
            F1,
            SpanKind::Server,
            "POST /orders",
            us(1.2),
            us(28.8),
            vec![],
        ),
    ];
    let mysql = |id,
                 tap: &str,
                 agent: &str,
                 req,
                 resp,
                 sr,
                 ss,
                 pid: (u32, u32),
                 t: (f64, f64),
                 name: &str| {
        DfRow::new(id, tap, agent)
            .seqs(req, resp)
            .sys(sr, ss)
            .pids(pid.0, pid.1)
            .pods("orders-pod", "mysql-0")
            .l7("MySQL", name)
            .time_us(us(t.0), us(t.1))
            .to_span()
    };
    let mut ebpf = vec![
        mysql(
            E5,
            "s-p",
            "db-node",
            7101,
            8101,
            901,
            901,
            (0, 2500),
            (12.3, 19.6),
            "INSERT order_items",
        ),
        mysql(
            E2,
            "c-p",
            "orders-node",
            7001,
            8001,
            501,
            502,
            (700, 0),
            (3.0, 9.0),
            "SELECT orders",
        ),
        mysql(
            E4,
            "s-p",
            "db-node",
            7001,
            8001,
            900,
            900,
            (0, 2500),
            (3.4, 8.7),
            "SELECT orders",
        ),
        mysql(
            E3,
            "c-p",
            "orders-node",
            7101,
            8101,
            502,
            503,
            (700, 0),
            (12.0, 20.0),
            "INSERT order_items",
        ),
    ];
    if with_entry {
        ebpf.push(
            DfRow::new(E1, "s-p", "orders-node")
                .trace(T2, F1)
                .seqs(5001, 6001)
                .sys(501, 503)
                .pids(0, 700)
                .pods("frontend-pod", "orders-pod")
                .time_us(us(1.0), us(29.0))
                .to_span(),
        );
    }
    (sdk, ebpf)
}

#[test]
fn example_ii_uninstrumented_mysql_joined_through_syscall_ids() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_ii(true);
    // The fake-trace rows arrive first, before anything they could join.
    assert!(feed(&mut j, t0, ebpf).is_empty());
    assert!(feed(&mut j, t0 + Duration::from_secs(2), sdk).is_empty());
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(17)));
    let names = labels(&[
        ("F1", F1),
        ("E1", E1),
        ("O1", O1),
        ("E2", E2),
        ("E3", E3),
        ("E4", E4),
        ("E5", E5),
    ]);
    assert_unit(
        &unit,
        &names,
        &[
            ("F1", "-", "-", 0),
            ("E1", "F1", "span_id", 1),
            ("O1", "E1", "span_id", 2),
            ("E2", "O1", "syscall", 3),
            ("E4", "E2", "tcp_seq", 4),
            ("E3", "O1", "syscall", 5),
            ("E5", "E3", "tcp_seq", 6),
        ],
        T2,
    );
    assert_eq!(
        s_attr(find(&unit, O1), ORIGINAL_PARENT),
        Some(SpanId::from_u64(F1).to_hex())
    );
    // Fake ids are replaced and kept.
    let e2 = find(&unit, E2);
    assert_eq!(
        s_attr(e2, ORIGINAL_TRACE_ID).as_deref(),
        Some("6553f100004000020000000000000000")
    );
    for id in [E3, E4, E5] {
        assert!(s_attr(find(&unit, id), ORIGINAL_TRACE_ID).is_some());
    }
    assert_eq!(s_attr(find(&unit, E1), ORIGINAL_TRACE_ID), None);
}

#[test]
fn example_ii_with_sdk_client_spans_the_queries_hang_under_them() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (mut sdk, ebpf) = example_ii(true);
    let orders = sdk_scope("orders", "orders-pod", "default");
    const Q1: u64 = 0x4444_0000_0000_0002;
    const Q2: u64 = 0x4444_0000_0000_0003;
    let db = || vec![kv_s("db.system", "mysql")];
    sdk.push(sdk_span(
        &orders,
        T2,
        Q1,
        O1,
        SpanKind::Client,
        "SELECT",
        us(3.0),
        us(9.0),
        db(),
    ));
    sdk.push(sdk_span(
        &orders,
        T2,
        Q2,
        O1,
        SpanKind::Client,
        "INSERT",
        us(12.0),
        us(20.0),
        db(),
    ));
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(16)));
    let parent_of = |id| find(&unit, id).parent_span_id;
    assert_eq!(parent_of(E2), SpanId::from_u64(Q1));
    assert_eq!(parent_of(E3), SpanId::from_u64(Q2));
    assert_eq!(parent_of(E4), SpanId::from_u64(E2));
}

// ---------------------------------------------------------------- example (iii)

const C1: u64 = 0x5555_0000_0000_0001;
const S1: u64 = 0x6666_0000_0000_0001;
const R1: u64 = 0x6553_f200_0040_0001;
const R2: u64 = 0x6553_f200_0040_0002;
const R3: u64 = 0x6553_f200_0040_0003;
const R4A: u64 = 0x6553_f200_0040_0004;
const R4B: u64 = 0x6553_f200_0040_0005;

fn example_iii(with_cp: bool) -> (Vec<Span>, Vec<Span>) {
    let client = sdk_scope("client", "client-pod", "default");
    let server = sdk_scope("server", "server-pod", "default");
    let sdk = vec![
        sdk_span(
            &client,
            T3,
            C1,
            0,
            SpanKind::Client,
            "GET /x",
            us(10.0),
            us(31.0),
            vec![],
        ),
        sdk_span(
            &server,
            T3,
            S1,
            C1,
            SpanKind::Server,
            "GET /x",
            us(8.9),
            us(28.1),
            vec![],
        ),
    ];
    let row =
        |id, tap: &str, agent: &str| DfRow::new(id, tap, agent).pods("client-pod", "server-pod");
    let mut r4a = row(R4A, "s-p", "agent-b")
        .trace(T3, C1)
        .kind("request")
        .seqs(100, 0)
        .sys(21, 0)
        .pids(0, 1200)
        .time_us(us(8.7), us(8.7));
    r4a.cap_seq = [80, 0];
    r4a.flow_id = 8001;
    r4a.status = 0;
    let mut r4b = row(R4B, "s-p", "agent-b")
        .kind("response")
        .seqs(0, 900)
        .sys(0, 21)
        .pids(0, 1200)
        .time_us(us(28.3), us(28.3));
    r4b.cap_seq = [0, 81];
    r4b.flow_id = 8001;
    let mut r1 = row(R1, "c-p", "agent-a")
        .trace(T3, C1)
        .seqs(100, 900)
        .sys(11, 12)
        .pids(300, 0)
        .time_us(us(10.2), us(30.8));
    r1.cap_seq = [40, 41];
    r1.flow_id = 7001;
    let mut r2 = row(R2, "c", "agent-a")
        .trace(T3, C1)
        .seqs(100, 900)
        .time_us(us(10.3), us(30.7));
    r2.flow_id = 7002;
    let mut r3 = row(R3, "s", "agent-b")
        .trace(T3, C1)
        .seqs(100, 900)
        .time_us(us(8.6), us(28.4));
    r3.flow_id = 8002;
    // Any arrival order: the response half first.
    let mut ebpf = vec![r4b.to_span(), r3.to_span(), r2.to_span(), r4a.to_span()];
    if with_cp {
        ebpf.push(r1.to_span());
    }
    (sdk, ebpf)
}

#[test]
fn example_iii_four_tap_points_and_a_split_server_process_span() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_iii(true);
    feed(&mut j, t0, sdk);
    feed(&mut j, t0 + Duration::from_secs(4), ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let names = labels(&[
        ("C1", C1),
        ("R1", R1),
        ("R2", R2),
        ("R3", R3),
        ("M4", R4A),
        ("S1", S1),
    ]);
    assert_unit(
        &unit,
        &names,
        &[
            ("C1", "-", "-", 0),
            ("R1", "C1", "span_id", 1),
            ("R2", "R1", "tcp_seq", 2),
            ("R3", "R2", "tcp_seq", 3),
            ("M4", "R3", "tcp_seq", 4),
            ("S1", "M4", "span_id", 5),
        ],
        T3,
    );
    let m4 = find(&unit, R4A);
    assert_eq!(
        str_array(m4, MERGED_SPAN_IDS),
        vec![SpanId::from_u64(R4B).to_hex()]
    );
    assert_eq!((m4.start_ns, m4.end_ns), (us(8.7) * 1000, us(28.3) * 1000));
    assert!(!m4.marks.timed_out, "a merged request is not a timeout");
    assert_ne!(m4.status, StatusCode::Error);
    assert_eq!(s_attr(m4, "df.span.type").as_deref(), Some("session"));
    assert_eq!(
        s_attr(find(&unit, S1), ORIGINAL_PARENT),
        Some(SpanId::from_u64(C1).to_hex())
    );
}

#[test]
fn throttled_client_process_row_the_hop_still_connects_through_its_header() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_iii(false);
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let names = labels(&[("C1", C1), ("R2", R2), ("R3", R3), ("M4", R4A), ("S1", S1)]);
    assert_unit(
        &unit,
        &names,
        &[
            ("C1", "-", "-", 0),
            ("R2", "C1", "span_id", 1),
            ("R3", "R2", "tcp_seq", 2),
            ("M4", "R3", "tcp_seq", 3),
            ("S1", "M4", "span_id", 4),
        ],
        T3,
    );
}

// ---------------------------------------------------------------- fixture

#[test]
fn bkmonitor_bookinfo_network_chains_follow_the_expected_links() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bkmonitor-bookinfo"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/rows.json")).unwrap())
            .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/expected.json")).unwrap())
            .unwrap();
    let num = |v: &serde_json::Value| -> u64 {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    };
    let mut spans = Vec::new();
    for case in rows["cases"].as_array().unwrap() {
        for r in case["rows"].as_array().unwrap() {
            let id = num(&r["_ids"][0]);
            let tap = r["tap_side"].as_str().unwrap();
            let agent = format!("vtap-{}", num(&r["vtap_id"]));
            let inst = r["auto_instance"].as_str().unwrap_or("");
            let (p0, p1) = if tap.starts_with('c') {
                (inst, "")
            } else {
                ("", inst)
            };
            let mut row = DfRow::new(id, tap, &agent)
                .seqs(
                    num(&r["req_tcp_seq"]) as u32,
                    num(&r["resp_tcp_seq"]) as u32,
                )
                .pods(p0, p1)
                .l7(
                    r["l7_protocol_str"].as_str().unwrap(),
                    &format!(
                        "{} {}",
                        r["request_type"].as_str().unwrap(),
                        r["request_resource"].as_str().unwrap()
                    ),
                )
                .time_us(num(&r["start_time_us"]), num(&r["end_time_us"]));
            row.flow_id = num(&r["flow_id"]);
            row.extra_attrs.push(kv_s(
                "df.http.path",
                r["request_resource"].as_str().unwrap(),
            ));
            row.extra_attrs
                .push(kv_s("http.method", r["request_type"].as_str().unwrap()));
            spans.push(row.to_span());
        }
    }
    // Rows are listed by start time; feed them in a scrambled (but fixed) order.
    let n = spans.len();
    let mut shuffled: Vec<Span> = (0..n).map(|i| spans[(i * 7 + 3) % n].clone()).collect();
    shuffled.reverse();

    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    feed(&mut j, t0, shuffled);
    // Three calls, three groups: case 03 is the next hop of 02, but nothing links them.
    let mut groups: Vec<Vec<u64>> = j
        .groups
        .values()
        .map(|g| {
            let mut v: Vec<u64> = j
                .members_of(g)
                .iter()
                .map(|&m| j.node(m).span.span_id.as_u64())
                .collect();
            v.sort_unstable();
            v
        })
        .collect();
    groups.sort();
    let mut want: Vec<Vec<u64>> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut v: Vec<u64> = c["order"].as_array().unwrap().iter().map(num).collect();
            v.sort_unstable();
            v
        })
        .collect();
    want.sort();
    assert_eq!(groups, want);

    // Each group's tree: the expected edges, nothing more.
    let tol = j.tol;
    for case in expected["cases"].as_array().unwrap() {
        let order: Vec<u64> = case["order"].as_array().unwrap().iter().map(num).collect();
        let mut members: Vec<tree::Member> = order
            .iter()
            .rev()
            .map(|id| {
                let s = norm(vec![spans
                    .iter()
                    .find(|s| s.span_id.as_u64() == *id)
                    .unwrap()
                    .clone()]);
                tree::Member::new(s.into_iter().next().unwrap(), Vec::new())
            })
            .collect();
        let plan = tree::build(&mut members, [0; 16], &tol, false);
        let id_of = |i: usize| members[i].span.span_id.as_u64();
        let mut edges: Vec<(u64, u64)> = Vec::new();
        for i in 0..members.len() {
            if let tree::Parent::Node(p) = plan.parent[i] {
                assert_eq!(plan.via[i], Some(Via::TcpSeq));
                edges.push((id_of(p), id_of(i)));
            }
        }
        edges.sort_unstable();
        let mut want: Vec<(u64, u64)> = case["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (num(&e["parent"]), num(&e["child"])))
            .collect();
        want.sort_unstable();
        assert_eq!(edges, want, "{}", case["case"]);
        let mut by_order: Vec<(u32, u64)> = (0..members.len())
            .map(|i| (plan.order[i], id_of(i)))
            .collect();
        by_order.sort_unstable();
        assert_eq!(
            by_order.into_iter().map(|(_, id)| id).collect::<Vec<_>>(),
            order,
            "{}",
            case["case"]
        );
    }
}

// ---------------------------------------------------------------- edge cases (join.md §10)

fn session(id: u64, tap: &str, agent: &str, req: u32, resp: u32, t: (f64, f64)) -> DfRow {
    DfRow::new(id, tap, agent)
        .seqs(req, resp)
        .time_us(us(t.0), us(t.1))
}

#[test]
fn tcp_seq_reuse_needs_both_seqs_and_time_within_tolerance() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    feed(
        &mut j,
        t0,
        vec![
            session(1, "c", "a", 10, 20, (0.0, 5.0)).to_span(),
            // Same request seq, another response seq: not the same call.
            session(2, "s", "b", 10, 21, (0.5, 5.5)).to_span(),
            // Both seqs equal but 1 s later: a reused seq.
            session(3, "s", "b", 10, 20, (1000.0, 1005.0)).to_span(),
            // Both equal and within 60 ms: the same call.
            session(4, "s", "b", 10, 20, (0.4, 4.9)).to_span(),
            // Zero seqs never match (UDP, DNS).
            session(5, "c", "a", 0, 0, (0.0, 5.0)).to_span(),
            session(6, "s", "b", 0, 0, (0.0, 5.0)).to_span(),
        ],
    );
    let mut groups: Vec<Vec<u64>> = j
        .groups
        .values()
        .map(|g| {
            let mut v: Vec<u64> = j
                .members_of(g)
                .iter()
                .map(|&m| j.node(m).span.span_id.as_u64())
                .collect();
            v.sort_unstable();
            v
        })
        .collect();
    groups.sort();
    assert_eq!(groups, vec![vec![1, 4], vec![2], vec![3], vec![5], vec![6]]);
}

#[test]
fn syscall_ids_never_chain_across_agents_or_processes() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let sp = |id, agent: &str, pid| {
        session(id, "s-p", agent, 0, 0, (0.0, 50.0))
            .sys(500, 501)
            .pids(0, pid)
    };
    let cp = |id, agent: &str, pid| {
        session(id, "c-p", agent, 0, 0, (10.0, 20.0))
            .sys(500, 502)
            .pids(pid, 0)
    };
    feed(
        &mut j,
        t0,
        vec![
            sp(1, "a", 10).to_span(),
            cp(2, "a", 10).to_span(), // same agent and process: joined
            cp(3, "b", 10).to_span(), // same ids on another agent
            cp(4, "a", 11).to_span(), // same agent, another process
        ],
    );
    let root_of = |j: &mut Join, id: u64| {
        let n = (0..j.nodes.len() as u32)
            .find(|&n| {
                j.nodes[n as usize]
                    .node
                    .as_ref()
                    .is_some_and(|x| x.span.span_id.as_u64() == id)
            })
            .unwrap();
        j.find(n)
    };
    let r1 = root_of(&mut j, 1);
    assert_eq!(root_of(&mut j, 2), r1);
    assert_ne!(root_of(&mut j, 3), r1);
    assert_ne!(root_of(&mut j, 4), r1);
    // Two s-p are never linked through syscall ids.
    let two = |id| {
        norm(vec![session(id, "s-p", "a", 0, 0, (0.0, 50.0))
            .sys(500, 501)
            .pids(0, 10)
            .to_span()])
    };
    let (x, y) = (two(1), two(2));
    let (ex, ey) = (x[0].ebpf.as_deref().unwrap(), y[0].ebpf.as_deref().unwrap());
    assert_eq!(rules::syscall_rel(ex, ey, &j.tol), None);
}

#[test]
fn thread_guard_strict_rejects_differing_threads() {
    for (check, joined) in [(ThreadCheck::Lenient, true), (ThreadCheck::Strict, false)] {
        let mut cfg = JoinConfig::default();
        cfg.syscall.thread_check = check;
        let mut j = join(cfg);
        let mut sp = session(1, "s-p", "a", 0, 0, (0.0, 50.0))
            .sys(500, 501)
            .pids(0, 10);
        sp.threads = [7, 7];
        let mut cp = session(2, "c-p", "a", 0, 0, (10.0, 20.0))
            .sys(500, 502)
            .pids(10, 0);
        cp.threads = [8, 8];
        feed(&mut j, Instant::now(), vec![sp.to_span(), cp.to_span()]);
        assert_eq!(j.pending_groups() == 1, joined, "{check:?}");
    }
}

#[test]
fn missing_sdk_root_the_unit_is_still_emitted_with_its_dangling_parent() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (mut sdk, ebpf) = example_i();
    sdk.remove(0); // W1 never arrives
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(unit.len(), 6);
    let w2 = &unit[0];
    assert_eq!(w2.span_id, SpanId::from_u64(W2));
    assert_eq!(
        w2.parent_span_id,
        SpanId::from_u64(W1),
        "root keeps its received parent"
    );
    assert_eq!(find(&unit, A1).parent_span_id, SpanId::from_u64(E4));
}

#[test]
fn different_trace_ids_are_never_united_and_the_bridge_is_recorded() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let a = sdk_scope("a", "a-pod", "default");
    let b = sdk_scope("b", "b-pod", "default");
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &a,
                T1,
                W1,
                0,
                SpanKind::Client,
                "x",
                us(0.0),
                us(10.0),
                vec![],
            ),
            sdk_span(
                &b,
                T2,
                F1,
                0,
                SpanKind::Client,
                "y",
                us(0.0),
                us(10.0),
                vec![],
            ),
            session(E1, "c", "n", 10, 20, (0.1, 9.9))
                .trace(T1, W1)
                .to_span(),
            // A response-only row of a fake trace relates by resp seq to a T2 row and to E1.
            session(E2, "s", "m", 30, 20, (0.2, 9.8))
                .trace(T2, F1)
                .to_span(),
        ],
    );
    assert_eq!(j.pending_groups(), 2);
    let out = tick(&mut j, t0 + Duration::from_secs(15));
    assert_eq!(out.len(), 2);
    for u in &out {
        let traces: std::collections::HashSet<[u8; 16]> =
            u.spans.iter().map(|s| s.trace_id.0).collect();
        assert_eq!(traces.len(), 1);
    }
}

#[test]
fn other_trace_ids_are_recorded_on_the_bridging_span() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let a = sdk_scope("a", "a-pod", "default");
    let b = sdk_scope("b", "b-pod", "default");
    let mut resp = session(E3, "s", "m", 0, 20, (0.2, 9.8)).kind("response");
    resp.flow_id = 0;
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &a,
                T1,
                W1,
                0,
                SpanKind::Client,
                "x",
                us(0.0),
                us(10.0),
                vec![],
            ),
            sdk_span(
                &b,
                T2,
                F1,
                0,
                SpanKind::Client,
                "y",
                us(0.0),
                us(10.0),
                vec![],
            ),
            session(E1, "c", "n", 10, 20, (0.1, 9.9))
                .trace(T1, W1)
                .to_span(),
            session(E2, "c", "k", 11, 20, (0.1, 9.85))
                .trace(T2, F1)
                .to_span(),
            resp.to_span(),
        ],
    );
    let out = tick(&mut j, t0 + Duration::from_secs(15));
    let bridge: Vec<&Span> = out
        .iter()
        .flat_map(|u| u.spans.iter())
        .filter(|s| s.span_id == SpanId::from_u64(E3))
        .collect();
    assert_eq!(bridge.len(), 1, "the bridging span is emitted once");
    assert_eq!(str_array(bridge[0], OTHER_TRACE_IDS).len(), 1);
}

#[test]
fn duplicate_client_process_rows_with_one_seq_are_not_chained() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &web,
                T1,
                W2,
                0,
                SpanKind::Client,
                "GET",
                us(0.0),
                us(10.0),
                vec![],
            ),
            session(E1, "c-p", "n", 10, 20, (0.1, 9.9))
                .trace(T1, W2)
                .pods("web-pod", "")
                .pids(5, 0)
                .to_span(),
            session(E2, "c-p", "n", 10, 20, (0.2, 9.8))
                .trace(T1, W2)
                .pods("web-pod", "")
                .pids(5, 0)
                .to_span(),
            session(E3, "c", "n", 10, 20, (0.3, 9.7))
                .trace(T1, W2)
                .to_span(),
        ],
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let p = |id| find(&unit, id).parent_span_id;
    assert_ne!(p(E2), SpanId::from_u64(E1));
    assert_ne!(p(E1), SpanId::from_u64(E2));
    assert_eq!(p(E3), SpanId::from_u64(E1));
}

#[test]
fn client_process_rows_without_their_entry_stay_unassociated() {
    for (mode, emitted) in [(Unassociated::Drop, 0), (Unassociated::Passthrough, 4)] {
        let cfg = JoinConfig {
            unassociated_ebpf: mode,
            ..Default::default()
        };
        let mut j = join(cfg);
        let t0 = Instant::now();
        let (sdk, ebpf) = example_ii(false);
        let before: Vec<Span> = norm(ebpf.clone());
        feed(&mut j, t0, ebpf);
        feed(&mut j, t0, sdk);
        let out = tick(&mut j, t0 + Duration::from_secs(61));
        let units: Vec<&SpanBatch> = out
            .iter()
            .filter(|b| b.spans.iter().any(|s| s.ebpf.is_some()))
            .collect();
        assert_eq!(units.len(), emitted, "{mode:?}");
        for u in units {
            assert_eq!(u.len(), 1, "one unit per passthrough span");
            let orig = before
                .iter()
                .find(|s| s.span_id == u.spans[0].span_id)
                .unwrap();
            assert_eq!(u.spans[0].raw, orig.raw, "passthrough spans are unchanged");
        }
        // The SDK unit alone, unchanged (no eBPF span in it).
        let sdk_unit = out
            .iter()
            .find(|b| b.spans.iter().all(|s| s.ebpf.is_none()))
            .unwrap();
        assert_eq!(sdk_unit.len(), 2);
        assert!(sdk_unit.spans.iter().all(|s| s.attr(ORDER).is_none()));
        assert_eq!(j.pending_spans(), 0);
    }
}

#[test]
fn keep_alive_fragments_pair_by_request_id_and_adjacent_cap_seqs() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let frag = |id, kind: &str, rid: i64, cap: [u32; 2], t: f64, req: u32, resp: u32| {
        let mut r = DfRow::new(id, "c-p", "n")
            .trace(T1, W2)
            .kind(kind)
            .seqs(req, resp)
            .pids(5, 0)
            .pods("web-pod", "")
            .l7("HTTP2", "POST /x")
            .time_us(us(t), us(t));
        r.request_id = Some(rid);
        r.cap_seq = cap;
        r.flow_id = 99;
        r.status = if kind == "request" { 0 } else { 1 };
        if kind == "response" {
            r.trace = None;
            r.header = None;
        }
        r.to_span()
    };
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &web,
                T1,
                W2,
                0,
                SpanKind::Client,
                "POST",
                us(0.0),
                us(30.0),
                vec![],
            ),
            frag(E1, "request", 1, [10, 0], 1.0, 100, 0),
            frag(E2, "request", 3, [11, 0], 2.0, 101, 0),
            // Response of stream 1: must not pair with the newer request of stream 3.
            frag(E3, "response", 1, [0, 11], 20.0, 0, 200),
            frag(E4, "response", 3, [0, 12], 21.0, 0, 201),
        ],
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(unit.len(), 3);
    assert_eq!(
        str_array(find(&unit, E1), MERGED_SPAN_IDS),
        vec![SpanId::from_u64(E3).to_hex()]
    );
    assert_eq!(
        str_array(find(&unit, E2), MERGED_SPAN_IDS),
        vec![SpanId::from_u64(E4).to_hex()]
    );
}

#[test]
fn request_without_response_is_a_timeout_error_and_late_rows_follow_their_unit() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let mut req = DfRow::new(E1, "c-p", "n")
        .trace(T1, W2)
        .kind("request")
        .seqs(100, 0)
        .pids(5, 0)
        .pods("web-pod", "")
        .time_us(us(1.0), us(1.0));
    req.status = 0;
    req.flow_id = 42;
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &web,
                T1,
                W2,
                0,
                SpanKind::Client,
                "GET",
                us(0.0),
                us(30.0),
                vec![],
            ),
            req.to_span(),
        ],
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let e1 = find(&unit, E1);
    assert_eq!(
        e1.status,
        StatusCode::Error,
        "timeouts are errors for the sampler"
    );
    assert!(e1.marks.timed_out && e1.is_error());

    // A network row of the same call, 100 s later: joins the emitted unit as `late`.
    let late = session(E2, "c", "n", 100, 0, (1.05, 1.05)).kind("request");
    let mut late = late;
    late.trace = None;
    late.header = None;
    let out = feed(&mut j, t0 + Duration::from_secs(100), vec![late.to_span()]);
    let s = &only_unit(out)[0];
    assert!(s.marks.late);
    assert_eq!(s.attr(LATE).and_then(|v| v.as_bool()), Some(true));
    assert_eq!(s.trace_id.0, T1);
    assert_eq!(
        s.parent_span_id,
        SpanId::from_u64(E1),
        "the c-p is upstream of the c"
    );
    assert_eq!(s_attr(s, VIA).as_deref(), Some("tcp_seq"));
    assert_eq!(s.attr(ORDER), None);

    // A late SDK span of the same trace goes through on its own.
    let out = feed(
        &mut j,
        t0 + Duration::from_secs(101),
        vec![sdk_span(
            &web,
            T1,
            W1,
            0,
            SpanKind::Server,
            "GET",
            us(0.0),
            us(31.0),
            vec![],
        )],
    );
    assert!(only_unit(out)[0].marks.late);

    // After late_ttl the tombstone is gone: the same row is just unassociated.
    tick(&mut j, t0 + Duration::from_secs(15 + 301));
    let out = feed(&mut j, t0 + Duration::from_secs(400), vec![late.to_span()]);
    assert!(out.is_empty());
}

#[test]
fn error_seen_only_on_an_ebpf_span_keeps_error_status() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, mut ebpf) = example_ii(true);
    // E4 (mysqld s-p) failed; SDK spans say nothing.
    let mut err = DfRow::new(E4, "s-p", "db-node")
        .seqs(7001, 8001)
        .sys(900, 900)
        .pids(0, 2500)
        .pods("orders-pod", "mysql-0")
        .l7("MySQL", "SELECT orders")
        .time_us(us(3.4), us(8.7));
    err.status = 2;
    ebpf.retain(|s| s.span_id != SpanId::from_u64(E4));
    ebpf.push(err.to_span());
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(find(&unit, E4).status, StatusCode::Error);
    assert!(unit.iter().any(|s| s.is_error()));
    assert!(unit
        .iter()
        .filter(|s| s.ebpf.is_none())
        .all(|s| s.status != StatusCode::Error));
}

#[test]
fn cross_tenant_call_splits_at_the_boundary() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let client = sdk_scope("client", "client-pod", "tenant-a");
    let server = sdk_scope("server", "server-pod", "tenant-b");
    let ns = |mut r: DfRow| {
        r.ns = [Some("tenant-a".into()), Some("tenant-b".into())];
        r.pods("client-pod", "server-pod").trace(T3, C1)
    };
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &client,
                T3,
                C1,
                0,
                SpanKind::Client,
                "GET",
                us(10.0),
                us(31.0),
                vec![],
            ),
            sdk_span(
                &server,
                T3,
                S1,
                C1,
                SpanKind::Server,
                "GET",
                us(8.9),
                us(28.1),
                vec![],
            ),
            ns(session(R1, "c-p", "agent-a", 100, 900, (10.2, 30.8)).pids(3, 0)).to_span(),
            ns(session(R2, "c", "agent-a", 100, 900, (10.3, 30.7))).to_span(),
            ns(session(R3, "s", "agent-b", 100, 900, (8.6, 28.4))).to_span(),
            ns(session(R4A, "s-p", "agent-b", 100, 900, (8.7, 28.3)).pids(0, 4)).to_span(),
        ],
    );
    assert_eq!(j.pending_groups(), 2);
    let out = tick(&mut j, t0 + Duration::from_secs(15));
    assert_eq!(out.len(), 2);
    let ids = |b: &SpanBatch| {
        let mut v: Vec<u64> = b.spans.iter().map(|s| s.span_id.as_u64()).collect();
        v.sort_unstable();
        v
    };
    let mut units: Vec<Vec<u64>> = out.iter().map(ids).collect();
    units.sort();
    let mut a = vec![C1, R1, R2];
    a.sort_unstable();
    let mut b = vec![S1, R3, R4A];
    b.sort_unstable();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(units, want);
    let server_unit = out
        .iter()
        .find(|u| u.spans.iter().any(|s| s.span_id == SpanId::from_u64(S1)))
        .unwrap();
    assert_eq!(
        find(&server_unit.spans, S1).parent_span_id,
        SpanId::from_u64(R4A)
    );
}

#[test]
fn unknown_tenant_drop_discards_and_isolate_keeps() {
    let plain = sdk_scope("x", "x-pod", "");
    for (mode, kept) in [(UnknownTenant::Isolate, 1), (UnknownTenant::Drop, 0)] {
        let mut cfg = JoinConfig::default();
        cfg.tenant.unknown = mode;
        let mut j = join(cfg);
        let t0 = Instant::now();
        feed(
            &mut j,
            t0,
            vec![sdk_span(
                &plain,
                T1,
                W1,
                0,
                SpanKind::Server,
                "x",
                us(0.0),
                us(1.0),
                vec![],
            )],
        );
        assert_eq!(j.pending_spans(), kept);
    }
}

#[test]
fn max_spans_per_trace_flushes_early() {
    let cfg = JoinConfig {
        max_spans_per_trace: 3,
        max_pending_spans: 100,
        ..Default::default()
    };
    let mut j = join(cfg);
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let spans: Vec<Span> = (1..=5)
        .map(|i| {
            sdk_span(
                &web,
                T1,
                i,
                0,
                SpanKind::Internal,
                "x",
                us(0.0),
                us(1.0),
                vec![],
            )
        })
        .collect();
    let out = feed(&mut j, t0, spans);
    assert_eq!(
        out.len(),
        3,
        "one full unit, then the rest of the trace follows as late spans"
    );
    assert_eq!(out[0].len(), 3);
    assert!(out[1..].iter().all(|b| b.spans[0].marks.late));
    assert_eq!(j.pending_spans(), 0);
}

#[test]
fn max_pending_spans_forces_the_oldest_group_out() {
    let cfg = JoinConfig {
        max_spans_per_trace: 10,
        max_pending_spans: 10,
        ..Default::default()
    };
    let mut j = join(cfg);
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let mut emitted = 0;
    for t in 0..12u8 {
        let mut trace = T1;
        trace[0] = t;
        let out = feed(
            &mut j,
            t0 + Duration::from_millis(t as u64),
            vec![sdk_span(
                &web,
                trace,
                1 + t as u64,
                0,
                SpanKind::Server,
                "x",
                us(0.0),
                us(1.0),
                vec![],
            )],
        );
        for b in &out {
            assert_eq!(b.spans[0].trace_id.0[0], emitted as u8, "oldest first");
            emitted += 1;
        }
    }
    assert_eq!(emitted, 2);
    assert_eq!(j.pending_spans(), 10);
    let mut out = Vec::new();
    j.shutdown(t0 + Duration::from_secs(1), &mut out);
    assert_eq!(
        out.iter().map(|b| b.len()).sum::<usize>(),
        10,
        "shutdown flushes everything"
    );
    assert_eq!(j.pending_spans(), 0);
}

#[test]
fn sdk_only_traces_pass_whole_and_unchanged_after_the_wait() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let spans = [
        sdk_span(
            &web,
            T1,
            W1,
            0,
            SpanKind::Server,
            "GET",
            us(0.0),
            us(10.0),
            vec![],
        ),
        sdk_span(
            &web,
            T1,
            W2,
            W1,
            SpanKind::Client,
            "GET",
            us(1.0),
            us(9.0),
            vec![],
        ),
    ];
    let raw: Vec<_> = spans.iter().map(|s| s.raw.clone()).collect();
    feed(&mut j, t0, spans[..1].to_vec());
    feed(&mut j, t0 + Duration::from_secs(12), spans[1..].to_vec());
    assert!(
        tick(&mut j, t0 + Duration::from_secs(16)).is_empty(),
        "idle wait after the last span"
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(17)));
    assert_eq!(unit.iter().map(|s| s.raw.clone()).collect::<Vec<_>>(), raw);
}

#[test]
fn max_wait_bounds_a_busy_trace() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    for i in 0..20u64 {
        let out = feed(
            &mut j,
            t0 + Duration::from_secs(i * 4),
            vec![sdk_span(
                &web,
                T1,
                i + 1,
                0,
                SpanKind::Internal,
                "x",
                us(0.0),
                us(1.0),
                vec![],
            )],
        );
        if !out.is_empty() {
            panic!("flushed during process at {i}");
        }
        let out = tick(&mut j, t0 + Duration::from_secs(i * 4 + 1));
        if i * 4 + 1 >= 60 {
            assert_eq!(out.len(), 1, "emitted at max wait");
            assert_eq!(out[0].len(), 16);
            return;
        }
        assert!(out.is_empty());
    }
}

#[test]
fn game_scenario_of_the_bench_joins_into_the_intended_tree() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let i = 7u64;
    let (sdk, ebpf) = super::testkit::game_trace(i);
    feed(&mut j, t0, sdk);
    let mut e = ebpf;
    e.reverse();
    let mut out = Vec::new();
    normalize_spans(&mut e, Role::Ebpf);
    j.process(t0 + Duration::from_secs(2), SpanBatch::new(e), &mut out);
    assert!(out.is_empty());
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(unit.len(), 21);
    let id = |k: u64| (i << 8) | k | (1 << 60);
    let row = |k: u64| (i << 8) | k | (3 << 60);
    let parent = |x: u64| find(&unit, x).parent_span_id.as_u64();
    let via = |x: u64| s_attr(find(&unit, x), VIA).unwrap_or_default();
    let want = [
        (id(1), row(1), "span_id"),
        (id(2), id(1), "span_id"),
        (row(2), id(3), "syscall"),
        (row(3), row(2), "tcp_seq"),
        (row(4), id(4), "syscall"),
        (row(5), row(4), "tcp_seq"),
        (row(6), id(5), "span_id"),
        (row(7), row(6), "tcp_seq"),
        (id(6), row(7), "span_id"),
        (row(8), id(8), "syscall"),
        (row(9), row(8), "tcp_seq"),
        (row(10), id(9), "span_id"),
        (row(11), row(10), "tcp_seq"),
        (id(10), row(11), "span_id"),
    ];
    for (child, p, v) in want {
        assert_eq!((parent(child), via(child)), (p, v.to_string()), "{child:x}");
    }
    assert_eq!(
        unit[0].span_id.as_u64(),
        row(1),
        "the entry s-p is the main root"
    );
    assert_eq!(i_attr(&unit[0], ORDER), Some(0));
    assert_eq!(
        unit[0].parent_span_id.as_u64(),
        0x0abc_0000_0000_0000 | i,
        "dangling header"
    );
}

#[test]
fn multi_worker_gateway_links_its_process_spans_by_x_request_id() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_i();
    // nginx handed the request to another worker: the syscall chain breaks (E3 gets new ids),
    // and the X-Request-ID nginx injected links its inbound and outbound process spans.
    let mut rows: Vec<Span> = ebpf
        .into_iter()
        .filter(|s| s.span_id.as_u64() != E2 && s.span_id.as_u64() != E3)
        .collect();
    let mut e2 = DfRow::new(E2, "s-p", "nginx-node")
        .trace(T1, W2)
        .seqs(1001, 2001)
        .sys(77, 78)
        .pids(0, 900)
        .pods("web-pod", "nginx-pod")
        .time_us(us(9.2), us(48.8));
    e2.xreq = [None, Some("rid-42".into())];
    let mut e3 = DfRow::new(E3, "c-p", "nginx-node")
        .trace(T1, W2)
        .seqs(3001, 4001)
        .sys(91, 92)
        .pids(900, 0)
        .pods("nginx-pod", "api-pod")
        .time_us(us(9.6), us(48.0));
    e3.xreq = [Some("rid-42".into()), None];
    rows.push(e2.to_span());
    rows.push(e3.to_span());
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, rows);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let e3 = find(&unit, E3);
    assert_eq!(e3.parent_span_id, SpanId::from_u64(E2));
    assert_eq!(s_attr(e3, VIA).as_deref(), Some("x_request_id"));
    assert_eq!(find(&unit, A1).parent_span_id, SpanId::from_u64(E4));
}

#[test]
fn emit_clock_offset_writes_the_estimated_agent_offset() {
    let cfg = JoinConfig {
        emit_clock_offset: true,
        ..Default::default()
    };
    let mut j = join(cfg);
    let t0 = Instant::now();
    let (sdk, ebpf) = example_iii(true);
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    // join.md §9 (iii): agent B's offset is estimated at 1.7 ms (true skew 2.0).
    assert_eq!(
        i_attr(find(&unit, R3), super::output::CLOCK_OFFSET),
        Some(1700)
    );
    assert_eq!(i_attr(find(&unit, R1), super::output::CLOCK_OFFSET), None);
}

/// Shuffled arrival, eBPF rows up to 10 s late, host clocks up to 10 ms apart, several traces
/// interleaved: every input span comes
/// out exactly once (merged rows inside their request row), in its own trace, under the intended
/// parent.
#[test]
fn game_workload_shuffled_late_and_skewed_loses_nothing_and_keeps_every_link() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // (arrival ms, span)
    let mut arrivals: Vec<(u64, Span)> = Vec::new();
    let traces = 150u64;
    let mut input_ids = std::collections::HashSet::new();
    for i in 0..traces {
        // Hosts' clocks up to 10 ms apart, differently per trace.
        let skew = [
            0,
            next(20_001) as i64 - 10_000,
            next(20_001) as i64 - 10_000,
            next(20_001) as i64 - 10_000,
        ];
        let (sdk, ebpf) = super::testkit::game_trace_skewed(i, skew);
        let at = i * 20;
        for s in norm(sdk) {
            input_ids.insert(s.span_id);
            arrivals.push((at + next(50), s));
        }
        let mut e = ebpf;
        normalize_spans(&mut e, Role::Ebpf);
        for s in e {
            input_ids.insert(s.span_id);
            arrivals.push((at + next(10_000), s));
        }
    }
    arrivals.sort_by_key(|(t, s)| (*t, s.span_id));
    let mut out = Vec::new();
    let mut last_tick = 0;
    for chunk in arrivals.chunks(37) {
        let t = chunk[0].0;
        let now = t0 + Duration::from_millis(t);
        j.process(
            now,
            SpanBatch::new(chunk.iter().map(|(_, s)| s.clone()).collect()),
            &mut out,
        );
        if t >= last_tick + 250 {
            j.tick(now, &mut out);
            last_tick = t;
        }
    }
    j.tick(t0 + Duration::from_secs(3600), &mut out);
    j.shutdown(t0 + Duration::from_secs(3600), &mut out);
    assert_eq!(j.pending_spans(), 0);

    let mut seen = std::collections::HashMap::new();
    for b in &out {
        assert!(b.whole);
        assert!(
            b.spans.iter().all(|s| !s.marks.late),
            "nothing is late here"
        );
        for s in &b.spans {
            *seen.entry(s.span_id).or_insert(0) += 1;
            for m in str_array(s, MERGED_SPAN_IDS) {
                *seen.entry(SpanId::from_hex(&m).unwrap()).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(
        seen.len(),
        input_ids.len(),
        "every input span is in the output"
    );
    assert!(seen.values().all(|&n| n == 1), "and only once");
    assert_eq!(out.len(), traces as usize, "one unit per trace");
    for b in &out {
        let i = (b.spans[0].span_id.as_u64() >> 8) & 0xffff_ffff;
        assert_eq!(b.len(), 21, "trace {i}");
        let id = |k: u64| (i << 8) | k | (1 << 60);
        let row = |k: u64| (i << 8) | k | (3 << 60);
        let parent = |x: u64| find(&b.spans, x).parent_span_id.as_u64();
        for (child, p) in [
            (id(1), row(1)),
            (row(2), id(3)),
            (row(3), row(2)),
            (row(4), id(4)),
            (row(6), id(5)),
            (id(6), row(7)),
            (row(8), id(8)),
            (row(10), id(9)),
            (row(11), row(10)),
            (id(10), row(11)),
        ] {
            assert_eq!(parent(child), p, "trace {i}: parent of {child:x}");
        }
        let trace = b.spans[0].trace_id;
        assert!(b.spans.iter().all(|s| s.trace_id == trace));
    }
}

#[test]
fn hostile_timestamps_and_ids_never_panic() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let mut spans = vec![sdk_span(
        &web,
        T1,
        W2,
        W2,
        SpanKind::Client,
        "self parent",
        0,
        u64::MAX / 1000,
        vec![],
    )];
    let extremes = [0u64, 1, u64::MAX / 1000, u64::MAX / 2000];
    for (k, (&s, &e)) in extremes.iter().zip(extremes.iter().rev()).enumerate() {
        for tap in ["c-p", "c", "s", "s-p", "local"] {
            let mut r = DfRow::new(0x7000 + k as u64 * 16 + tap.len() as u64, tap, "n")
                .trace(T1, W2)
                .seqs(1, 1)
                .sys(u64::MAX, u64::MAX - 1)
                .pids(1, 1)
                .time_us(s, e);
            r.flow_id = 5;
            r.span_type = ["request", "response", "session"][k % 3].into();
            r.cap_seq = [u32::MAX, 0];
            spans.push(r.to_span());
        }
    }
    feed(&mut j, t0, spans);
    let mut out = tick(&mut j, t0 + Duration::from_secs(61));
    j.shutdown(t0 + Duration::from_secs(62), &mut out);
    let n: usize = out.iter().map(|b| b.len()).sum();
    assert!(n >= 1, "the SDK span at least comes out");
    assert_eq!(j.pending_spans(), 0);
}

#[test]
fn late_response_fragment_is_emitted_next_to_its_request() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let mut req = DfRow::new(E1, "c-p", "n")
        .trace(T1, W2)
        .kind("request")
        .seqs(100, 0)
        .pids(5, 0)
        .pods("web-pod", "")
        .time_us(us(1.0), us(1.0));
    req.status = 0;
    req.flow_id = 42;
    req.cap_seq = [7, 0];
    feed(
        &mut j,
        t0,
        vec![
            sdk_span(
                &web,
                T1,
                W2,
                0,
                SpanKind::Client,
                "GET",
                us(0.0),
                us(200_000.0),
                vec![],
            ),
            req.to_span(),
        ],
    );
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(find(&unit, E1).parent_span_id, SpanId::from_u64(W2));
    // The response row of a 150 s call: fake trace id, parent == self.
    let mut resp = DfRow::new(E2, "c-p", "n")
        .kind("response")
        .seqs(0, 900)
        .pids(5, 0)
        .pods("web-pod", "")
        .time_us(us(150_000.0), us(150_000.0));
    resp.flow_id = 42;
    resp.cap_seq = [0, 8];
    let out = feed(&mut j, t0 + Duration::from_secs(151), vec![resp.to_span()]);
    let late = &only_unit(out)[0];
    assert!(late.marks.late);
    assert_eq!(late.trace_id.0, T1, "adopts the unit's trace id");
    assert_eq!(
        late.parent_span_id,
        SpanId::from_u64(W2),
        "next to its request row"
    );
    assert!(s_attr(late, ORIGINAL_TRACE_ID).is_some());
}

#[test]
fn parentless_roots_of_extra_components_are_placed_by_trace_id() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (mut sdk, ebpf) = example_i();
    let batch = sdk_scope("batch", "batch-pod", "default");
    const X: u64 = 0x7777_0000_0000_0001;
    sdk.push(sdk_span(
        &batch,
        T1,
        X,
        0,
        SpanKind::Internal,
        "async",
        us(60.0),
        us(70.0),
        vec![],
    ));
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(
        s_attr(find(&unit, W1), VIA),
        None,
        "the main root has no via"
    );
    assert_eq!(s_attr(find(&unit, X), VIA).as_deref(), Some("trace_id"));
    assert_eq!(
        i_attr(find(&unit, X), ORDER),
        Some(7),
        "other roots follow the main tree"
    );
}

// ---------------------------------------------------------------- join.md §3: HTTP/2 frames

/// A gRPC call at `c-p` as one session row (1-20 ms, stream 5 on flow 77) and a zero-duration
/// frame row of the same stream (at `frame_ms`, with its own seqs and a fake trace id).
fn grpc_session_and_frame(frame_rid: i64, frame_ms: f64, frame_kind: &str) -> (Span, Span, Span) {
    let web = sdk_scope("web", "web-pod", "default");
    let client = sdk_span(
        &web,
        T1,
        W2,
        0,
        SpanKind::Client,
        "pkg.Svc/Call",
        us(0.0),
        us(30.0),
        vec![kv_s("rpc.system", "grpc")],
    );
    let mut s = DfRow::new(E1, "c-p", "web-node")
        .trace(T1, W2)
        .seqs(1001, 2001)
        .sys(31, 32)
        .pids(410, 0)
        .pods("web-pod", "api-pod")
        .l7("gRPC", "pkg.Svc/POST")
        .time_us(us(1.0), us(20.0));
    s.request_id = Some(5);
    s.flow_id = 77;
    s.cap_seq = [40, 41];
    let mut f = DfRow::new(E2, "c-p", "web-node")
        .kind(frame_kind)
        .seqs(0, 5555)
        .pids(410, 0)
        .pods("web-pod", "api-pod")
        .l7("gRPC", "pkg.Svc/POST")
        .time_us(us(frame_ms), us(frame_ms));
    f.request_id = Some(frame_rid);
    f.flow_id = 77;
    f.cap_seq = [0, 99];
    f.status = 2;
    (client, s.to_span(), f.to_span())
}

#[test]
fn grpc_zero_duration_frame_rows_merge_into_their_session() {
    for frame_first in [false, true] {
        let mut j = join(JoinConfig::default());
        let t0 = Instant::now();
        let (client, session, frame) = grpc_session_and_frame(5, 25.0, "response");
        let rows = if frame_first {
            vec![frame, session]
        } else {
            vec![session, frame]
        };
        feed(&mut j, t0, vec![client]);
        feed(&mut j, t0, rows);
        let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
        assert_eq!(
            unit.len(),
            2,
            "the frame row is absorbed (frame first: {frame_first})"
        );
        let e1 = find(&unit, E1);
        assert_eq!(
            str_array(e1, MERGED_SPAN_IDS),
            vec![SpanId::from_u64(E2).to_hex()]
        );
        assert_eq!(
            e1.end_ns,
            us(25.0) * 1000,
            "the frame extends the session's end"
        );
        assert_eq!(e1.start_ns, us(1.0) * 1000);
        // Only the end and the merged ids change: seqs, cap seqs and status stay the session's.
        assert_eq!(i_attr(e1, "df.span.syscall_cap_seq_1"), Some(41));
        assert_eq!(
            e1.resource()
                .attr("df.transport.resp_tcp_seq")
                .and_then(|v| v.as_i64()),
            Some(2001)
        );
        assert_eq!(e1.status, StatusCode::Ok);
        assert_eq!(e1.parent_span_id, SpanId::from_u64(W2));
    }
}

#[test]
fn grpc_frame_rows_of_another_stream_or_protocol_stay_apart() {
    // Another stream id: not this session's frame.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (client, session, frame) = grpc_session_and_frame(6, 25.0, "response");
    feed(&mut j, t0, vec![client, session, frame]);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert!(str_array(find(&unit, E1), MERGED_SPAN_IDS).is_empty());
    assert_eq!(find(&unit, E1).end_ns, us(20.0) * 1000);

    // HTTP/1 sessions take no frames: a zero-duration row there is a plain fragment.
    let mut j = join(JoinConfig::default());
    let (client, _, _) = grpc_session_and_frame(5, 25.0, "response");
    let mut s = DfRow::new(E1, "c-p", "web-node")
        .trace(T1, W2)
        .seqs(1001, 2001)
        .pids(410, 0)
        .pods("web-pod", "api-pod")
        .time_us(us(1.0), us(20.0));
    s.request_id = Some(5);
    s.flow_id = 77;
    let mut f = DfRow::new(E2, "c-p", "web-node")
        .kind("response")
        .seqs(0, 5555)
        .pids(410, 0)
        .pods("web-pod", "api-pod")
        .time_us(us(25.0), us(25.0));
    f.request_id = Some(5);
    f.flow_id = 77;
    feed(&mut j, t0, vec![client, s.to_span(), f.to_span()]);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert!(str_array(find(&unit, E1), MERGED_SPAN_IDS).is_empty());
}

// ---------------------------------------------------------------- join.md §6 C1, C3, B4.5

#[test]
fn c1_a_client_process_leaf_takes_the_hop_that_carries_its_header() {
    // The c-p row's seqs do not match the network copies (say a NAT rewrote them), so it is a hop
    // of its own; the hop of the network rows has no c-p and carries the c-p's header.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, mut ebpf) = example_iii(false);
    let mut r1 = DfRow::new(R1, "c-p", "agent-a")
        .pods("client-pod", "server-pod")
        .trace(T3, C1)
        .seqs(111, 999)
        .sys(11, 12)
        .pids(300, 0)
        .time_us(us(10.2), us(30.8));
    r1.cap_seq = [40, 41];
    r1.flow_id = 7001;
    ebpf.push(r1.to_span());
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let names = labels(&[
        ("C1", C1),
        ("R1", R1),
        ("R2", R2),
        ("R3", R3),
        ("M4", R4A),
        ("S1", S1),
    ]);
    assert_unit(
        &unit,
        &names,
        &[
            ("C1", "-", "-", 0),
            ("R1", "C1", "span_id", 1),
            ("R2", "R1", "span_id", 2),
            ("R3", "R2", "tcp_seq", 3),
            ("M4", "R3", "tcp_seq", 4),
            ("S1", "M4", "span_id", 5),
        ],
        T3,
    );
}

#[test]
fn c1_a_client_process_leaf_with_a_hop_child_takes_no_second_hop() {
    // Example (iii) with its c-p: the c-p starts its own hop; a second network hop with the same
    // header (another call forwarded unchanged) does not hang below it.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, mut ebpf) = example_iii(true);
    const R9: u64 = 0x6553_f100_0090_0009;
    let mut r9 = DfRow::new(R9, "c", "agent-a")
        .pods("client-pod", "server-pod")
        .trace(T3, C1)
        .seqs(5000, 6000)
        .time_us(us(12.0), us(14.0));
    r9.flow_id = 7100;
    ebpf.push(r9.to_span());
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(find(&unit, R2).parent_span_id, SpanId::from_u64(R1));
    assert_eq!(
        find(&unit, R9).parent_span_id,
        SpanId::from_u64(C1),
        "one c-p starts one request"
    );
}

#[test]
fn c3_a_sidecar_forwarding_the_header_on_a_new_connection_links_the_process_spans() {
    // Example (i) where the outbound call leaves through a sidecar (another process on the nginx
    // node, pid 901) on a new connection: the inbound s-p and the outbound c-p share no syscall
    // id, no process and no X-Request-ID, only the forwarded header.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_i();
    let mut rows: Vec<Span> = ebpf
        .into_iter()
        .filter(|s| s.span_id.as_u64() != E3)
        .collect();
    rows.push(
        DfRow::new(E3, "c-p", "nginx-node")
            .trace(T1, W2)
            .seqs(3001, 4001)
            .sys(91, 92)
            .pids(901, 0)
            .pods("nginx-pod", "api-pod")
            .time_us(us(9.6), us(48.0))
            .to_span(),
    );
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, rows);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    let names = labels(&[
        ("W1", W1),
        ("W2", W2),
        ("E1", E1),
        ("E2", E2),
        ("E3", E3),
        ("E4", E4),
        ("A1", A1),
    ]);
    assert_unit(
        &unit,
        &names,
        &[
            ("W1", "-", "-", 0),
            ("W2", "W1", "span_id", 1),
            ("E1", "W2", "span_id", 2),
            ("E2", "E1", "tcp_seq", 3),
            ("E3", "E2", "span_id", 4),
            ("E4", "E3", "tcp_seq", 5),
            ("A1", "E4", "span_id", 6),
        ],
        T1,
    );
}

#[test]
fn c3_needs_the_parent_to_cover_the_child_on_one_agent() {
    // As above, but the sidecar's c-p ends after the inbound s-p: not its child.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_i();
    let mut rows: Vec<Span> = ebpf
        .into_iter()
        .filter(|s| s.span_id.as_u64() != E3)
        .collect();
    rows.push(
        DfRow::new(E3, "c-p", "nginx-node")
            .trace(T1, W2)
            .seqs(3001, 4001)
            .sys(91, 92)
            .pids(901, 0)
            .pods("nginx-pod", "api-pod")
            .time_us(us(9.6), us(49.0))
            .to_span(),
    );
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, rows);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(
        find(&unit, E3).parent_span_id,
        SpanId::from_u64(W2),
        "step D: under the span its header names"
    );
}

#[test]
fn b4_5_a_syscall_sibling_chain_shares_its_parent() {
    // Example (ii) where the second query ends after the entry s-p (its response was read after
    // the reply went out, on the same thread): the s-p does not cover it, but its sibling chain
    // (E2.resp == E3.req) places it next to E2.
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = example_ii(true);
    let mut rows: Vec<Span> = ebpf
        .into_iter()
        .filter(|s| s.span_id.as_u64() != E3 && s.span_id.as_u64() != E5)
        .collect();
    let mysql = |id, tap: &str, agent: &str, sys: (u64, u64), pid: (u32, u32), t: (f64, f64)| {
        DfRow::new(id, tap, agent)
            .seqs(7101, 8101)
            .sys(sys.0, sys.1)
            .pids(pid.0, pid.1)
            .pods("orders-pod", "mysql-0")
            .l7("MySQL", "INSERT order_items")
            .time_us(us(t.0), us(t.1))
            .to_span()
    };
    rows.push(mysql(
        E3,
        "c-p",
        "orders-node",
        (502, 504),
        (700, 0),
        (12.0, 29.5),
    ));
    rows.push(mysql(
        E5,
        "s-p",
        "db-node",
        (901, 901),
        (0, 2500),
        (12.3, 29.2),
    ));
    feed(&mut j, t0, rows);
    feed(&mut j, t0 + Duration::from_secs(2), sdk);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(17)));
    assert_eq!(unit.len(), 7, "nothing pruned");
    let e3 = find(&unit, E3);
    assert_eq!(e3.parent_span_id, SpanId::from_u64(O1));
    assert_eq!(s_attr(e3, VIA).as_deref(), Some("syscall"));
    assert_eq!(find(&unit, E5).parent_span_id, SpanId::from_u64(E3));
    assert_eq!(find(&unit, E2).parent_span_id, SpanId::from_u64(O1));
    assert!(i_attr(find(&unit, E2), ORDER) < i_attr(e3, ORDER));
}

// ---------------------------------------------------------------- join.md §5.5: X-Request-ID

/// web (SDK) -> gateway (eBPF only): the gateway's inbound s-p with the X-Request-ID it
/// injected in the response.
fn gateway_unit() -> (Vec<Span>, Vec<Span>) {
    let web = sdk_scope("web", "web-pod", "default");
    let sdk = vec![sdk_span(
        &web,
        T1,
        W2,
        0,
        SpanKind::Client,
        "GET /api",
        us(0.0),
        us(50.0),
        vec![kv_s("http.method", "GET")],
    )];
    let e1 = DfRow::new(E1, "c-p", "web-node")
        .trace(T1, W2)
        .seqs(1001, 2001)
        .sys(31, 32)
        .pids(410, 0)
        .pods("web-pod", "gw-pod")
        .time_us(us(1.0), us(49.0));
    let mut e2 = DfRow::new(E2, "s-p", "gw-node")
        .trace(T1, W2)
        .seqs(1001, 2001)
        .sys(77, 78)
        .pids(0, 900)
        .pods("web-pod", "gw-pod")
        .time_us(us(2.0), us(48.0));
    e2.xreq = [None, Some("rid-9".into())];
    (sdk, vec![e1.to_span(), e2.to_span()])
}

/// The gateway's outbound call, without a trace header, carrying `xreq` in its request.
fn gateway_outbound(id: u64, xreq: &str, t: (f64, f64)) -> Span {
    let mut e = DfRow::new(id, "c-p", "gw-node")
        .seqs(3001, 4001)
        .sys(5, 6)
        .pids(900, 0)
        .pods("gw-pod", "api-pod")
        .time_us(us(t.0), us(t.1));
    e.xreq = [Some(xreq.into()), None];
    e.to_span()
}

#[test]
fn late_span_keyed_by_an_x_request_id_of_an_emitted_unit_follows_it() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = gateway_unit();
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(unit.len(), 3);

    let out = feed(
        &mut j,
        t0 + Duration::from_secs(30),
        vec![gateway_outbound(E3, "rid-9", (3.0, 47.0))],
    );
    let late = &only_unit(out)[0];
    assert!(late.marks.late);
    assert_eq!(late.trace_id.0, T1, "adopts the unit's trace id");
    assert_eq!(
        late.parent_span_id,
        SpanId::from_u64(E2),
        "the gateway's inbound side is upstream"
    );
    assert_eq!(s_attr(late, VIA).as_deref(), Some("x_request_id"));
    assert!(s_attr(late, ORIGINAL_TRACE_ID).is_some());
}

#[test]
fn late_x_request_id_match_keeps_the_time_guards() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (sdk, ebpf) = gateway_unit();
    feed(&mut j, t0, sdk);
    feed(&mut j, t0, ebpf);
    only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    // Another value, and the same value outside the gateway span on its own agent: neither is
    // late; both wait as unassociated spans and are dropped.
    let out = feed(
        &mut j,
        t0 + Duration::from_secs(30),
        vec![
            gateway_outbound(E3, "rid-10", (3.0, 47.0)),
            gateway_outbound(E4, "rid-9", (3.0, 60.0)),
        ],
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(tick(&mut j, t0 + Duration::from_secs(200)).is_empty());
}

// ---------------------------------------------------------------- timers (join.md §5.4)

#[test]
fn timers_follow_min_idle_and_the_first_sdk_span_after_merges() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let s = |n: u64| Duration::from_secs(n);
    let (sdk, ebpf) = example_i();
    // eBPF rows first: their orphan timer (60 s) must not decide an SDK group.
    feed(&mut j, t0, ebpf);
    feed(&mut j, t0 + s(10), sdk[..1].to_vec());
    // A later span keeps the trace idle-waiting past `min` (10 + 15 s): due at 22 + 5 s.
    feed(&mut j, t0 + s(22), sdk[1..].to_vec());
    assert!(tick(&mut j, t0 + s(24)).is_empty());
    assert!(tick(&mut j, t0 + s(26)).is_empty());
    let out = tick(&mut j, t0 + s(27));
    assert_eq!(only_unit(out).len(), 7);
    assert_eq!(j.pending_spans(), 0);
    assert_eq!(j.pending_groups(), 0);
    // Stale timers of the flushed group fire later and do nothing.
    assert!(tick(&mut j, t0 + s(200)).is_empty());
}

#[test]
fn timers_expire_a_busy_trace_at_max_wait_and_orphans_at_their_ttl() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let web = sdk_scope("web", "web-pod", "default");
    let span = |id: u64, parent: u64| {
        sdk_span(
            &web,
            T1,
            id,
            parent,
            SpanKind::Internal,
            "x",
            us(0.0),
            us(1.0),
            vec![],
        )
    };
    feed(&mut j, t0, vec![span(W1, 0)]);
    // A lone eBPF row of another trace: an orphan, dropped at 60 s.
    let orphan = DfRow::new(E5, "c-p", "n")
        .trace(T2, 7)
        .time_us(us(0.0), us(1.0));
    feed(
        &mut j,
        t0 + Duration::from_millis(500),
        vec![orphan.to_span()],
    );
    for k in 1..=59u64 {
        // A span every second: never idle for 5 s.
        let out = feed(&mut j, t0 + Duration::from_secs(k), vec![span(W1 + k, W1)]);
        assert!(out.is_empty(), "at {k} s");
    }
    assert!(tick(&mut j, t0 + Duration::from_millis(59_999)).is_empty());
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(60)));
    assert_eq!(unit.len(), 60, "expired at first_sdk + max");
    assert_eq!(j.pending_groups(), 1, "the orphan waits until 60.5 s");
    assert!(tick(&mut j, t0 + Duration::from_millis(60_500)).is_empty());
    assert_eq!(j.pending_groups(), 0);
}

/// Three hops that passed one X-Request-ID on (an nginx, a gateway, a proxy on other hosts),
/// emitted in one unit, and the late span of the next hop down: join.md §4.5's nearest hop
/// above it (the smallest duration that still covers its own) is its parent, whichever of the
/// three was emitted last.
#[test]
fn a_late_x_request_id_span_takes_the_nearest_hop_above_among_several() {
    let hops = [
        (E1, "ngx-node", (1.0, 49.0)),
        (E2, "gw-node", (5.0, 30.0)),
        (E3, "px-node", (10.0, 45.0)),
    ];
    for order in [[0usize, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1]] {
        let mut j = join(JoinConfig::default());
        let t0 = Instant::now();
        let web = sdk_scope("web", "web-pod", "default");
        let sdk = vec![sdk_span(
            &web,
            T1,
            W2,
            0,
            SpanKind::Client,
            "GET /api",
            us(0.0),
            us(60.0),
            vec![],
        )];
        let rows: Vec<Span> = order
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let (id, agent, t) = hops[i];
                let mut r = DfRow::new(id, "s", agent)
                    .trace(T1, W2)
                    .seqs(5000 + k as u32, 6000 + k as u32)
                    .time_us(us(t.0), us(t.1));
                r.xreq = [Some("rid-7".into()), None];
                r.to_span()
            })
            .collect();
        feed(&mut j, t0, sdk);
        feed(&mut j, t0, rows);
        let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
        assert_eq!(unit.len(), 4);
        let mut late = DfRow::new(E4, "s", "api-node")
            .seqs(7001, 8001)
            .time_us(us(12.0), us(32.0));
        late.xreq = [Some("rid-7".into()), None];
        let out = feed(&mut j, t0 + Duration::from_secs(30), vec![late.to_span()]);
        let late = &only_unit(out)[0];
        assert!(late.marks.late);
        assert_eq!(late.trace_id.0, T1);
        assert_eq!(
            late.parent_span_id,
            SpanId::from_u64(E2),
            "hops fed in order {order:?}; unit order {:?}",
            unit.iter().map(|s| s.span_id).collect::<Vec<_>>()
        );
        assert_eq!(s_attr(late, VIA).as_deref(), Some("x_request_id"));
    }
}

/// A gRPC/HTTP2 frame row arriving after its session went out cannot be merged into it any
/// more: it follows the session's unit as a late span, beside the session (its trace id and
/// parent). A frame of another stream of the connection does not.
#[test]
fn a_grpc_frame_row_after_its_session_was_emitted_follows_the_session() {
    let mut j = join(JoinConfig::default());
    let t0 = Instant::now();
    let (client, session, frame) = grpc_session_and_frame(5, 25.0, "response");
    let (_, _, other_stream) = grpc_session_and_frame(6, 26.0, "response");
    feed(&mut j, t0, vec![client]);
    feed(&mut j, t0, vec![session]);
    let unit = only_unit(tick(&mut j, t0 + Duration::from_secs(15)));
    assert_eq!(unit.len(), 2);
    let s = find(&unit, E1);
    let (session_parent, session_via) = (s.parent_span_id, s_attr(s, VIA));
    assert_eq!(session_parent, SpanId::from_u64(W2));

    let late = only_unit(feed(&mut j, t0 + Duration::from_secs(20), vec![frame]));
    let f = &late[0];
    assert_eq!(f.span_id, SpanId::from_u64(E2));
    assert!(f.marks.late);
    assert_eq!(s_attr(f, LATE).as_deref(), Some("true"));
    assert_eq!(f.trace_id.0, T1, "the session's trace id");
    assert_eq!(f.parent_span_id, session_parent, "beside the session");
    assert_eq!(s_attr(f, VIA), session_via);

    let out = feed(&mut j, t0 + Duration::from_secs(20), vec![other_stream]);
    assert!(
        out.is_empty(),
        "another stream's frame is not late: {out:?}"
    );
}
