use std::collections::{HashMap, HashSet};

use super::*;
use tailweave_core::proto::tonic::common::v1::{any_value::Value, KeyValue};
use tailweave_core::span::unhex;

fn attr<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn s<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(kvs, key) {
        Some(Value::StringValue(v)) => Some(v),
        _ => None,
    }
}

fn i(kvs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(kvs, key) {
        Some(Value::IntValue(v)) => Some(*v),
        _ => None,
    }
}

/// A sent span with its resource attributes.
struct Sent<'a> {
    res: &'a [KeyValue],
    span: &'a Span,
    ebpf: bool,
}

fn sent(t: &GeneratedTrace) -> Vec<Sent<'_>> {
    let mut out = Vec::new();
    for (list, ebpf) in [(&t.sdk, false), (&t.ebpf, true)] {
        for rs in list {
            let res = rs
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or(&[]);
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    out.push(Sent { res, span, ebpf });
                }
            }
        }
    }
    out
}

fn game(traces: usize) -> ScenarioConfig {
    ScenarioConfig {
        traces,
        error_rate: 0.2,
        slow_rate: 0.1,
        timeout_rate: 0.1,
        split_rate: 0.5,
        tenants: 3,
        clock_skew_ms: 10,
        ..ScenarioConfig::default()
    }
}

#[test]
fn same_seed_same_traces_other_seed_other_traces() {
    for cfg in [
        game(50),
        ScenarioConfig {
            scenario: ScenarioKind::Sdk,
            traces: 50,
            ..ScenarioConfig::default()
        },
    ] {
        let a = generate(&cfg, 42);
        let b = generate(&cfg, 42);
        assert_eq!(a, b);
        let c = generate(&cfg, 43);
        assert_ne!(a[0].truth.trace_id, c[0].truth.trace_id);
    }
}

#[test]
fn defaults_validate_and_bad_values_are_all_reported() {
    assert!(ScenarioConfig::default().validate().is_empty());
    let bad = ScenarioConfig {
        error_rate: 1.5,
        slow_rate: -0.1,
        tenants: 0,
        sdk_spans: 0,
        ..ScenarioConfig::default()
    };
    let paths: Vec<String> = bad.validate().into_iter().map(|i| i.path).collect();
    for p in ["error_rate", "slow_rate", "tenants", "sdk_spans"] {
        assert!(paths.iter().any(|x| x == p), "{p} not reported: {paths:?}");
    }
}

#[test]
fn every_span_has_valid_ids_and_every_row_the_join_keys() {
    let traces = generate(&game(200), 7);
    for t in &traces {
        for x in sent(t) {
            let sp = x.span;
            assert_eq!(sp.trace_id.len(), 16);
            assert!(sp.trace_id.iter().any(|&b| b != 0));
            assert_eq!(sp.span_id.len(), 8);
            assert!(sp.span_id.iter().any(|&b| b != 0));
            assert!(sp.parent_span_id.is_empty() || sp.parent_span_id.len() == 8);
            assert!(
                sp.start_time_unix_nano > 0 && sp.start_time_unix_nano <= sp.end_time_unix_nano
            );
            if !x.ebpf {
                assert_eq!(
                    s(x.res, "k8s.namespace.name"),
                    Some(t.truth.tenant.as_str())
                );
                assert!(s(x.res, "service.name").is_some());
                assert_eq!(s(x.res, "telemetry.sdk.name"), Some("opentelemetry"));
                assert_eq!(sp.trace_id, unhex(&t.truth.trace_id).unwrap());
                continue;
            }
            let a = &sp.attributes;
            let ty = s(a, "df.span.type").expect("df.span.type");
            assert!(["request", "response", "session"].contains(&ty));
            assert_eq!(s(x.res, "telemetry.sdk.name"), Some("deepflow"));
            let op = s(x.res, "df.capture_info.observation_point").expect("observation point");
            let tap = tailweave_core::ebpf::TapSide::parse(op);
            assert!(tap.rank() > 0, "unknown observation point {op}");
            assert!(s(x.res, "df.capture_info.agent").is_some());
            assert!(s(x.res, "df.application.l7_protocol").is_some());
            assert_eq!(
                i(x.res, "df.flow_info.id").map(|v| v as u64),
                Some(u64::from_be_bytes(sp.span_id.clone().try_into().unwrap()))
            );
            assert!(i(x.res, "df.flow_info.flow_id").is_some());
            for side in ["0", "1"] {
                assert_eq!(
                    s(x.res, &format!("df.universal_tag.pod_ns_{side}")),
                    Some(t.truth.tenant.as_str())
                );
                assert!(s(x.res, &format!("df.universal_tag.pod_{side}")).is_some());
            }
            // µs precision (§2.5).
            assert_eq!(sp.start_time_unix_nano % 1000, 0);
            assert_eq!(sp.end_time_unix_nano % 1000, 0);
            let has_req = ty != "response";
            let has_resp = ty != "request";
            assert_eq!(i(x.res, "df.transport.req_tcp_seq").is_some(), has_req);
            assert_eq!(
                i(x.res, "df.transport.resp_tcp_seq").is_some(),
                has_resp,
                "{op} {ty}"
            );
            if tap.is_process() {
                assert_eq!(i(a, "df.span.syscall_trace_id_request").is_some(), has_req);
                assert_eq!(
                    i(a, "df.span.syscall_trace_id_response").is_some(),
                    has_resp
                );
                assert_eq!(i(a, "df.span.syscall_cap_seq_0").is_some(), has_req);
                let pid_key = if tap.local_side() == Some(0) {
                    "process.pid_0"
                } else {
                    "process.pid_1"
                };
                assert!(i(x.res, pid_key).is_some());
            } else {
                assert!(i(a, "df.span.syscall_trace_id_request").is_none());
            }
            // Trace id and parent exactly as §2.2.
            match s(a, "df.span.native.trace_id") {
                Some(native) => {
                    assert_eq!(sp.trace_id, unhex(native).unwrap());
                    assert_eq!(
                        sp.parent_span_id,
                        unhex(s(a, "df.span.native.span_id").unwrap()).unwrap()
                    );
                    assert_ne!(sp.trace_id[8..], [0u8; 8]);
                }
                None => {
                    assert_eq!(sp.trace_id[8..], [0u8; 8]);
                    assert_eq!(sp.trace_id[..8], sp.span_id[..]);
                    assert_eq!(sp.parent_span_id, sp.span_id, "parent == self");
                    assert!(is_fake_trace_id(&sp.trace_id, &sp.span_id));
                }
            }
        }
    }
}

#[test]
fn truth_trees_are_trees_and_match_what_was_sent() {
    for cfg in [
        game(300),
        ScenarioConfig {
            scenario: ScenarioKind::Sdk,
            traces: 100,
            sdk_spans: 25,
            ..ScenarioConfig::default()
        },
    ] {
        let mut all_ids = HashSet::new();
        for t in generate(&cfg, 11) {
            let ids: HashMap<&str, &SpanTruth> = t
                .truth
                .spans
                .iter()
                .map(|s| (s.span_id.as_str(), s))
                .collect();
            assert_eq!(ids.len(), t.truth.spans.len(), "span ids unique in a trace");
            let roots: Vec<_> = t
                .truth
                .spans
                .iter()
                .filter(|s| s.parent_span_id.is_none())
                .collect();
            assert_eq!(roots.len(), 1, "one root");
            for sp in &t.truth.spans {
                assert!(
                    all_ids.insert(sp.span_id.clone()),
                    "span ids unique across traces"
                );
                // Walk up: every parent present, the root reached without a cycle.
                let mut cur: &SpanTruth = sp;
                let mut steps = 0;
                while let Some(p) = &cur.parent_span_id {
                    cur = ids
                        .get(p.as_str())
                        .copied()
                        .unwrap_or_else(|| panic!("parent {p} missing"));
                    steps += 1;
                    assert!(steps <= ids.len(), "cycle");
                }
                assert!(cur.parent_span_id.is_none());
                assert_eq!(sp.via.is_none(), sp.parent_span_id.is_none());
            }
            // Every sent span is an expected span or a merged row of one.
            let sent_ids: HashSet<String> = sent(&t).iter().map(|x| hex(&x.span.span_id)).collect();
            let merged: HashSet<String> = t
                .truth
                .spans
                .iter()
                .flat_map(|s| s.merged_span_ids.iter().cloned())
                .collect();
            let expected: HashSet<String> = ids.keys().map(|s| s.to_string()).collect();
            assert!(merged.is_disjoint(&expected));
            let union: HashSet<String> = expected.union(&merged).cloned().collect();
            assert_eq!(sent_ids, union);
            assert_eq!(t.ebpf.len(), t.ebpf_delay.len());
        }
    }
}

/// Cross-checks the expected placements against the rows themselves: each placement must be
/// backed by the key `join.md` names for it.
#[test]
fn expected_parents_are_backed_by_the_join_keys() {
    let cfg = game(300);
    let mut vias = HashMap::new();
    for t in generate(&cfg, 5) {
        let all = sent(&t);
        let by_id: HashMap<String, &Sent<'_>> =
            all.iter().map(|x| (hex(&x.span.span_id), x)).collect();
        for sp in &t.truth.spans {
            let Some(p) = &sp.parent_span_id else {
                continue;
            };
            let (c, pa) = (by_id[&sp.span_id], by_id[p]);
            let via = sp.via.as_deref().unwrap();
            *vias.entry(via.to_string()).or_insert(0) += 1;
            match (c.ebpf, pa.ebpf, via) {
                (false, false, "span_id") => assert_eq!(c.span.parent_span_id, pa.span.span_id),
                (true, false, "span_id") => {
                    // §4.2 client side: header == the SDK span, same pod on side 0.
                    assert_eq!(
                        s(&c.span.attributes, "df.span.native.span_id"),
                        Some(p.as_str())
                    );
                    assert_eq!(
                        s(c.res, "df.universal_tag.pod_0"),
                        s(pa.res, "k8s.pod.name")
                    );
                }
                (false, true, "span_id") => {
                    // §4.2 server side: the SDK parent == the s-p's header, same pod on side 1.
                    assert_eq!(
                        s(&pa.span.attributes, "df.span.native.span_id").map(unhex),
                        Some(Some(c.span.parent_span_id.clone()))
                    );
                    assert_eq!(
                        s(pa.res, "df.universal_tag.pod_1"),
                        s(c.res, "k8s.pod.name")
                    );
                }
                (true, true, "tcp_seq") => {
                    let seq = |x: &Sent<'_>| {
                        i(x.res, "df.transport.req_tcp_seq")
                            .or(i(x.res, "df.transport.resp_tcp_seq"))
                    };
                    assert_eq!(seq(c), seq(pa));
                }
                (true, _, "syscall") => {
                    // The c-p's process has an s-p (the parent, or the parent's s-p) sharing a
                    // syscall id on the same agent.
                    let ids = |x: &Sent<'_>| {
                        [
                            i(&x.span.attributes, "df.span.syscall_trace_id_request"),
                            i(&x.span.attributes, "df.span.syscall_trace_id_response"),
                        ]
                    };
                    let agent = s(c.res, "df.capture_info.agent");
                    let pid = i(c.res, "process.pid_0");
                    let sp_of_process = all.iter().find(|x| {
                        x.ebpf
                            && s(x.res, "df.capture_info.agent") == agent
                            && i(x.res, "process.pid_1") == pid
                            && ids(x).iter().flatten().any(|v| ids(c).contains(&Some(*v)))
                    });
                    assert!(
                        sp_of_process.is_some(),
                        "no s-p shares a syscall id with {}",
                        sp.span_id
                    );
                }
                other => panic!("unexpected placement {other:?} for {}", sp.span_id),
            }
        }
    }
    for v in ["span_id", "tcp_seq", "syscall"] {
        assert!(
            vias.get(v).copied().unwrap_or(0) > 0,
            "{v} never used: {vias:?}"
        );
    }
}

#[test]
fn game_traces_have_the_documented_shape() {
    let cfg = ScenarioConfig {
        error_rate: 0.0,
        slow_rate: 0.0,
        timeout_rate: 0.0,
        split_rate: 0.0,
        ..game(20)
    };
    for t in generate(&cfg, 3) {
        assert_eq!(t.sdk_span_count(), 10);
        assert_eq!(t.ebpf_span_count(), 18);
        assert!(!t.truth.error && !t.truth.slow);
        assert_eq!(t.truth.case, "normal");
        let taps: HashSet<&str> = t
            .truth
            .spans
            .iter()
            .filter_map(|s| s.tap_side.as_deref())
            .collect();
        for tap in ["c-p", "c", "c-nd", "s", "s-p"] {
            assert!(taps.contains(tap), "{tap} missing");
        }
    }
}

#[test]
fn injected_cases_show_in_the_truth_and_the_rows() {
    let only = |e: f64, s: f64, to: f64| ScenarioConfig {
        error_rate: e,
        slow_rate: s,
        timeout_rate: to,
        split_rate: 1.0,
        ..game(40)
    };
    let errors = generate(&only(1.0, 0.0, 0.0), 1);
    assert!(errors.iter().all(|t| t.truth.error && !t.truth.slow));
    let cases: HashSet<&str> = errors.iter().map(|t| t.truth.case.as_str()).collect();
    assert_eq!(cases, HashSet::from(["payment_declined", "mysql_error"]));
    for t in &errors {
        let sdk_error = sent(t).iter().any(|x| {
            !x.ebpf
                && x.span
                    .status
                    .as_ref()
                    .is_some_and(|s| s.code == STATUS_ERROR)
        });
        // A MySQL error is seen only by eBPF.
        assert_eq!(sdk_error, t.truth.case == "payment_declined");
    }
    let slow = generate(&only(0.0, 1.0, 0.0), 2);
    assert!(slow
        .iter()
        .all(|t| t.truth.slow && !t.truth.error && t.truth.case == "slow_query"));
    let timeouts = generate(&only(0.0, 0.0, 1.0), 3);
    for t in &timeouts {
        assert!(t.truth.error && t.truth.case == "timeout");
        let request_only = sent(t)
            .iter()
            .filter(|x| x.ebpf && s(&x.span.attributes, "df.span.type") == Some("request"))
            .filter(|x| {
                // Not the request half of a split row: nothing shares its flow.
                let flow = i(x.res, "df.flow_info.flow_id");
                sent(t)
                    .iter()
                    .filter(|y| y.ebpf && i(y.res, "df.flow_info.flow_id") == flow)
                    .count()
                    == 1
            })
            .count();
        assert_eq!(request_only, 1);
    }
    // split_rate 1: every trace has exactly one merged row.
    for t in errors.iter().chain(&slow).chain(&timeouts) {
        let merged: usize = t.truth.spans.iter().map(|s| s.merged_span_ids.len()).sum();
        assert_eq!(merged, 1);
    }
    let normal = generate(&only(0.0, 0.0, 0.0), 4);
    assert!(normal.iter().all(|t| !t.truth.error && !t.truth.slow));
}

#[test]
fn tenants_are_distinct_and_traces_stay_in_one() {
    let traces = generate(&game(200), 9);
    let tenants: HashSet<&str> = traces.iter().map(|t| t.truth.tenant.as_str()).collect();
    assert_eq!(tenants.len(), 3);
    // Pods (and so pids and IPs) are per tenant.
    let mut pods: HashMap<String, &str> = HashMap::new();
    for t in &traces {
        for x in sent(t) {
            let keys: Vec<&str> = if x.ebpf {
                vec!["df.universal_tag.pod_0", "df.universal_tag.pod_1"]
            } else {
                vec!["k8s.pod.name"]
            };
            for k in keys {
                let pod = s(x.res, k).unwrap().to_string();
                let prev = pods.entry(pod.clone()).or_insert(t.truth.tenant.as_str());
                assert_eq!(*prev, t.truth.tenant, "pod {pod} in two tenants");
            }
        }
    }
}

#[test]
fn sdk_scenario_has_n_spans_a_server_root_and_unchanged_parents() {
    let cfg = ScenarioConfig {
        scenario: ScenarioKind::Sdk,
        traces: 30,
        sdk_spans: 10,
        shuffle: false,
        ..ScenarioConfig::default()
    };
    for t in generate(&cfg, 8) {
        assert_eq!(t.sdk_span_count(), 10);
        assert!(t.ebpf.is_empty());
        // 10 spans at most 4 a ResourceSpans: split over 3.
        assert_eq!(t.sdk.len(), 3);
        for x in sent(&t) {
            let truth = t
                .truth
                .spans
                .iter()
                .find(|s| s.span_id == hex(&x.span.span_id))
                .unwrap();
            let expected = truth
                .parent_span_id
                .as_deref()
                .and_then(unhex)
                .unwrap_or_default();
            assert_eq!(expected, x.span.parent_span_id);
            if truth.parent_span_id.is_none() {
                assert_eq!(x.span.kind, model::KIND_SERVER);
            }
        }
    }
}

#[test]
fn the_wire_stream_equals_the_encoded_proto_stream() {
    for cfg in [
        game(100),
        ScenarioConfig {
            split_rate: 1.0,
            error_rate: 0.5,
            timeout_rate: 0.3,
            ..game(50)
        },
        ScenarioConfig {
            scenario: ScenarioKind::Sdk,
            ..ScenarioConfig::default()
        },
    ] {
        let mut a = Generator::new(cfg.clone(), 77);
        let mut b = Generator::new(cfg.clone(), 77);
        for _ in 0..cfg.traces {
            let p = a.next_trace();
            let w = b.next_wire();
            assert_eq!(p.truth, w.truth);
            let sdk: Vec<ResourceSpans> = w.sdk.iter().map(|e| e.decode().unwrap()).collect();
            assert_eq!(p.sdk, sdk);
            assert_eq!(p.ebpf.len(), w.ebpf.len());
            for ((rs, d), (e, wd)) in p.ebpf.iter().zip(&p.ebpf_delay).zip(&w.ebpf) {
                assert_eq!(d, wd);
                assert_eq!(rs, &e.decode().unwrap());
                assert_eq!(e.spans(), 1);
            }
        }
    }
}
