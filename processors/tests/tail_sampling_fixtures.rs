//! The OpenTelemetry Collector's own `tail_sampling` test configs (copied from
//! `shared/fixtures/otelcol-tail-sampling/`) either load with every policy and its settings, or
//! fail with an error naming the problem.

use std::path::PathBuf;

use tailweave_processors::tail_sampling::{PolicyKind, TailSamplingConfig};
use tailweave_processors::ProcessorConfig;

fn fixture(name: &str) -> serde_yaml::Value {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/otelcol-tail-sampling",
        name,
    ]
    .iter()
    .collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    doc.get("tail_sampling")
        .cloned()
        .expect("fixture holds a tail_sampling block")
}

/// Parses and validates through the processor registry, as the collector does.
fn load(name: &str) -> Result<TailSamplingConfig, Vec<String>> {
    let cfg = ProcessorConfig::parse("tail_sampling", fixture(name))
        .map_err(|e| vec![e.to_string()])?
        .expect("tail_sampling is a known processor type");
    let issues = cfg.validate();
    if !issues.is_empty() {
        return Err(issues.iter().map(|i| i.to_string()).collect());
    }
    match cfg {
        ProcessorConfig::TailSampling(c) => Ok(*c),
        _ => unreachable!("parsed as tail_sampling"),
    }
}

#[test]
fn collector_main_config_loads_with_every_policy() {
    let c = load("tail_sampling_config.yaml").expect("loads");
    assert_eq!(c.decision_wait, std::time::Duration::from_secs(10));
    assert_eq!(c.num_traces, 100);
    assert_eq!(c.expected_new_traces_per_sec, 10);
    let names: Vec<(&str, &str)> = c
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.kind.type_name()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("test-policy-1", "always_sample"),
            ("test-policy-2", "latency"),
            ("test-policy-3", "numeric_attribute"),
            ("test-policy-4", "probabilistic"),
            ("test-policy-5", "status_code"),
            ("test-policy-6", "string_attribute"),
            ("test-policy-7", "rate_limiting"),
            ("test-policy-8", "span_count"),
            ("test-policy-9", "trace_state"),
            ("and-policy-1", "and"),
            ("composite-policy-1", "composite"),
        ]
    );
    let p = |i: usize| &c.policies[i].kind;
    match p(1) {
        PolicyKind::Latency(l) => assert_eq!(l.threshold_ms, 5000),
        k => panic!("{k:?}"),
    }
    match p(2) {
        PolicyKind::NumericAttribute(n) => {
            assert_eq!(
                (n.key.as_str(), n.min_value, n.max_value),
                ("key1", Some(50), Some(100))
            )
        }
        k => panic!("{k:?}"),
    }
    match p(3) {
        PolicyKind::Probabilistic(pr) => {
            assert_eq!(pr.hash_salt, "custom-salt");
            assert_eq!(pr.sampling_percentage, 0.1);
        }
        k => panic!("{k:?}"),
    }
    match p(4) {
        PolicyKind::StatusCode(s) => assert_eq!(s.status_codes, vec!["ERROR", "UNSET"]),
        k => panic!("{k:?}"),
    }
    match p(5) {
        PolicyKind::StringAttribute(s) => {
            assert_eq!(s.key, "key2");
            assert_eq!(s.values, vec!["value1", "value2"]);
        }
        k => panic!("{k:?}"),
    }
    match p(6) {
        PolicyKind::RateLimiting(r) => assert_eq!(r.spans_per_second, 35),
        k => panic!("{k:?}"),
    }
    match p(7) {
        PolicyKind::SpanCount(s) => assert_eq!(s.min_spans, 2),
        k => panic!("{k:?}"),
    }
    match p(8) {
        PolicyKind::TraceState(t) => {
            assert_eq!(t.key, "key3");
            assert_eq!(t.values, vec!["value1", "value2"]);
        }
        k => panic!("{k:?}"),
    }
    match p(9) {
        PolicyKind::And(a) => {
            let subs: Vec<_> = a.and_sub_policy.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(subs, vec!["test-and-policy-1", "test-and-policy-2"]);
        }
        k => panic!("{k:?}"),
    }
    match p(10) {
        PolicyKind::Composite(comp) => {
            assert_eq!(comp.max_total_spans_per_second, 1000);
            assert_eq!(comp.policy_order.len(), 3);
            assert_eq!(comp.composite_sub_policy.len(), 3);
            let alloc: Vec<_> = comp
                .rate_allocation
                .iter()
                .map(|r| (r.policy.as_str(), r.percent))
                .collect();
            assert_eq!(
                alloc,
                vec![
                    ("test-composite-policy-1", 50.0),
                    ("test-composite-policy-2", 25.0)
                ]
            );
        }
        k => panic!("{k:?}"),
    }
    // And it builds into a running sampler.
    let ctx = tailweave_core::BuildContext {
        id: "tail_sampling".into(),
        ..Default::default()
    };
    assert!(c.build(&ctx).is_ok());
}

#[test]
fn numeric_min_greater_than_max_is_refused_naming_policy_and_values() {
    let e =
        load("numeric_attribute_with_minvalue_greather_than_maxvalue.yaml").expect_err("refused");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("test-policy-3"), "{e:?}");
    assert!(e[0].contains("500") && e[0].contains("100"), "{e:?}");
    assert!(e[0].starts_with("policies[0].numeric_attribute"), "{e:?}");
}

#[test]
fn numeric_without_bounds_is_refused_naming_policy() {
    let e = load("numeric_attribute_without_minvalue_or_maxvalue.yaml").expect_err("refused");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("test-policy-3"), "{e:?}");
    assert!(
        e[0].contains("min_value") && e[0].contains("max_value"),
        "{e:?}"
    );
}

#[test]
fn ottl_condition_is_refused_naming_the_type() {
    let e = load("tail_sampling_config_errormode.yaml").expect_err("refused");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("policies[0].type"), "{e:?}");
    assert!(
        e[0].contains("unsupported policy type `ottl_condition`"),
        "{e:?}"
    );
}

#[test]
fn every_fixture_is_covered() {
    let dir: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/otelcol-tail-sampling",
    ]
    .iter()
    .collect();
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("fixture dir") {
        let name = e.expect("entry").file_name().into_string().expect("utf-8");
        if !name.ends_with(".yaml") {
            continue;
        }
        n += 1;
        // Each loads, or its error names what is wrong (a policy or a type).
        if let Err(e) = load(&name) {
            assert!(
                e.iter().all(|m| m.contains("policy")),
                "{name}: unhelpful error {e:?}"
            );
        }
    }
    assert_eq!(n, 4);
}
