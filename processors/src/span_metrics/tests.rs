use std::time::Instant;

use tailweave_core::config::{parse, BuildContext};
use tailweave_core::ebpf::EbpfSpan;
use tailweave_core::red::{RedRegistry, SeriesSnapshot, SetSnapshot};
use tailweave_core::{Processor, SpanBatch, SpanKind, SpanSource};

use super::testspan::{scope, span, sv};
use super::*;

fn config(yaml: &str) -> SpanMetricsConfig {
    parse(serde_yaml::from_str(yaml).expect("yaml")).expect("config")
}

fn ctx(id: &str) -> BuildContext {
    BuildContext {
        id: id.into(),
        pipeline: "traces".into(),
        ..Default::default()
    }
}

fn run(cfg: &SpanMetricsConfig, spans: Vec<Span>) -> (SetSnapshot, Vec<Span>) {
    let reg = RedRegistry::new();
    let mut p = cfg.build_with(&ctx("span_metrics"), &reg).expect("build");
    let mut out = Vec::new();
    p.process(Instant::now(), SpanBatch::whole(spans), &mut out);
    let passed: Vec<Span> = out.into_iter().flat_map(|b| b.spans).collect();
    (reg.snapshot().remove(0), passed)
}

fn find<'a>(snap: &'a SetSnapshot, labels: &[(&str, &str)]) -> Vec<&'a SeriesSnapshot> {
    snap.series
        .iter()
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
        })
        .collect()
}

fn calls(snap: &SetSnapshot, labels: &[(&str, &str)]) -> u64 {
    find(snap, labels).iter().map(|s| s.calls).sum()
}

#[test]
fn counts_calls_errors_and_durations_per_service_operation_kind_and_status() {
    let cart = scope("cart", vec![]);
    let pay = scope("pay", vec![]);
    let mut spans = Vec::new();
    // cart: 5 server calls of GET /cart, 2 of them errors; durations 1,3,5,7,60 ms.
    for (i, d) in [1u64, 3, 5, 7, 60].iter().enumerate() {
        let mut b = span(&cart, i as u8 + 1, 1, 0)
            .name("GET /cart")
            .kind(SpanKind::Server)
            .times(0, *d);
        if i < 2 {
            b = b.error();
        }
        spans.push(b.build());
    }
    spans.push(
        span(&pay, 9, 2, 1)
            .name("charge")
            .kind(SpanKind::Client)
            .build(),
    );
    let cfg = SpanMetricsConfig::default();
    let (snap, passed) = run(&cfg, spans.clone());

    assert_eq!(passed.len(), spans.len());
    for (a, b) in passed.iter().zip(spans.iter()) {
        assert_eq!(a.raw, b.raw, "spans pass unchanged");
    }
    let cart_l = [("service_name", "cart"), ("span_name", "GET /cart")];
    assert_eq!(calls(&snap, &cart_l), 5);
    let err = [
        ("service_name", "cart"),
        ("status_code", "STATUS_CODE_ERROR"),
    ];
    assert_eq!(calls(&snap, &err), 2);
    let unset = [
        ("service_name", "cart"),
        ("status_code", "STATUS_CODE_UNSET"),
    ];
    assert_eq!(calls(&snap, &unset), 3);
    let ok = find(&snap, &unset)[0];
    // 5, 7 and 60 ms with the default bounds 2 4 6 8 10 50 100 ...
    let cum: Vec<(f64, u64)> = ok
        .cumulative(&snap.cfg.bounds)
        .map(|(le, c, _)| (le, c))
        .take(7)
        .collect();
    assert_eq!(
        cum,
        vec![
            (2.0, 0),
            (4.0, 0),
            (6.0, 1),
            (8.0, 2),
            (10.0, 2),
            (50.0, 2),
            (100.0, 3)
        ]
    );
    assert_eq!(ok.sum, 72.0);
    let pay_l = [
        ("service_name", "pay"),
        ("span_kind", "SPAN_KIND_CLIENT"),
        ("span_name", "charge"),
    ];
    assert_eq!(calls(&snap, &pay_l), 1);
    // SDK spans have no protocol label.
    assert!(snap
        .series
        .iter()
        .all(|s| s.labels.iter().all(|(k, _)| k != "protocol")));
    assert_eq!(snap.cfg.calls_name(), "traces_span_metrics_calls_total");
}

#[test]
fn ebpf_spans_are_keyed_by_protocol_and_timeouts_count_as_errors() {
    let mysql = scope("mysql", vec![]);
    let from_attr = span(&mysql, 1, 1, 0)
        .name("SELECT orders")
        .attr(L7_PROTOCOL_ATTR, sv("MySQL"))
        .build();
    let mut from_model = span(&mysql, 2, 1, 0).name("GET").build();
    from_model.source = SpanSource::Ebpf;
    from_model.ebpf = Some(Box::new(EbpfSpan {
        l7_protocol: 80,
        ..Default::default()
    }));
    from_model.marks.timed_out = true;
    let mut tls = span(&mysql, 3, 1, 0).name("GET /").build();
    tls.source = SpanSource::Ebpf;
    tls.ebpf = Some(Box::new(EbpfSpan {
        l7_protocol: 20,
        is_tls: true,
        ..Default::default()
    }));
    let (snap, _) = run(
        &SpanMetricsConfig::default(),
        vec![from_attr, from_model, tls],
    );
    assert_eq!(calls(&snap, &[("protocol", "MySQL")]), 1);
    assert_eq!(
        calls(
            &snap,
            &[("protocol", "Redis"), ("status_code", "STATUS_CODE_ERROR")]
        ),
        1
    );
    assert_eq!(calls(&snap, &[("protocol", "HTTP_TLS")]), 1);
}

#[test]
fn dimensions_add_labels_with_defaults() {
    let cfg = config(
        r#"
dimensions:
  - name: http.method
  - name: deployment.env
    default: prod
"#,
    );
    let s = scope("web", vec![]);
    let spans = vec![
        span(&s, 1, 1, 0).attr("http.method", sv("GET")).build(),
        span(&s, 2, 1, 0).attr("http.method", sv("POST")).build(),
        span(&s, 3, 1, 0).build(),
    ];
    let (snap, _) = run(&cfg, spans);
    assert_eq!(
        calls(&snap, &[("http_method", "GET"), ("deployment_env", "prod")]),
        1
    );
    assert_eq!(calls(&snap, &[("http_method", "POST")]), 1);
    let bare: Vec<_> = snap
        .series
        .iter()
        .filter(|s| s.labels.iter().all(|(k, _)| k != "http_method"))
        .collect();
    assert_eq!(bare.len(), 1);
    assert_eq!(bare[0].calls, 1);
}

#[test]
fn cardinality_is_bounded_by_an_overflow_series() {
    let cfg = config("max_series: 3");
    let s = scope("web", vec![]);
    let spans: Vec<Span> = (0..10u8)
        .map(|i| span(&s, i + 1, 1, 0).name(&format!("op{i}")).build())
        .collect();
    let (snap, passed) = run(&cfg, spans);
    assert_eq!(passed.len(), 10);
    assert_eq!(snap.series.len(), 4);
    assert_eq!(snap.overflowed_spans, 7);
    assert_eq!(calls(&snap, &[("otel_metric_overflow", "true")]), 7);
    assert_eq!(snap.series.iter().map(|s| s.calls).sum::<u64>(), 10);
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let cfg = config(
        r#"
histogram:
  unit: s
  explicit:
    buckets: [10ms, 5ms, 1s]
dimensions:
  - name: span.name
  - name: ""
max_series: 0
exemplars:
  max_pending_traces: 0
"#,
    );
    let paths: Vec<String> = cfg.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        vec![
            "histogram.explicit.buckets[1]",
            "max_series",
            "exemplars.max_pending_traces",
            "dimensions[0].name",
            "dimensions[1].name",
        ]
    );
    assert!(SpanMetricsConfig::default().validate().is_empty());
    let unknown: Result<SpanMetricsConfig, _> =
        parse(serde_yaml::from_str("histogram: {bukets: []}").unwrap());
    assert_eq!(unknown.unwrap_err().path, "histogram.bukets");
    let c = config(
        "aggregation_cardinality_limit: 7\nhistogram: {unit: s, explicit: {buckets: [500ms, 2s]}}",
    );
    assert_eq!(c.max_series, 7);
    assert_eq!(c.set_config().bounds, vec![0.5, 2.0]);
    assert_eq!(
        c.set_config().duration_name(),
        "traces_span_metrics_duration_seconds"
    );
}

#[test]
fn the_same_component_in_two_pipelines_shares_its_series() {
    let reg = RedRegistry::new();
    let cfg = SpanMetricsConfig::default();
    let mut a = cfg.build_with(&ctx("span_metrics"), &reg).unwrap();
    let mut b = cfg.build_with(&ctx("span_metrics"), &reg).unwrap();
    let s = scope("web", vec![]);
    let mut out = Vec::new();
    a.process(
        Instant::now(),
        SpanBatch::new(vec![span(&s, 1, 1, 0).build()]),
        &mut out,
    );
    b.process(
        Instant::now(),
        SpanBatch::new(vec![span(&s, 2, 1, 0).build()]),
        &mut out,
    );
    let snap = reg.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].series[0].calls, 2);
    let clash = cfg.build_with(&ctx("span_metrics/other"), &reg);
    assert!(clash.is_err());
}
