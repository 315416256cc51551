//! `propagate` and `extract` end to end (issue 8), through the real `tailweave` binary:
//! - a seeded game workload (SDK spans to `otlp`, DeepFlow rows to `deepflow`) is joined, and
//!   `propagate` puts the player id of each trace's entry span on every span of the joined trace,
//!   eBPF-derived spans included;
//! - `extract` turns an HTTP 200 whose body says `"result": false` (the BlueKing convention) into
//!   an error span before `tail_sampling`, whose error policy then keeps that whole trace (with the
//!   user id propagated onto every span) and drops the twin trace whose body says `true`.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tailweave_collector::loadgen::scenario::{generate, ScenarioConfig, ScenarioKind};
use tailweave_suite::{
    hex, service_yaml, validate_config, wait_for, Collector, Ports, ReceivedSpan, Sink, GAME_JOIN,
    OTLP_GRPC_RECEIVER, SDK_AND_DEEPFLOW_RECEIVERS,
};

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn attr(span: &Span, k: &str) -> Option<any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == k)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

fn tail(sink: &Sink, receivers: &[&str], processors: &[&str]) -> String {
    format!(
        r#"
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
{service}"#,
        sink = sink.endpoint(),
        service = service_yaml(receivers, processors, &["otlp"]),
    )
}

/// Waits until the sink has stopped growing for a few polls (with at least `min` spans).
fn settled(sink: &Sink, min: usize) -> Vec<ReceivedSpan> {
    let mut last = usize::MAX;
    let mut same = 0;
    wait_for("the sink to settle", Duration::from_secs(120), || {
        let n = sink.span_count();
        same = if n == last { same + 1 } else { 0 };
        last = n;
        std::thread::sleep(Duration::from_millis(300));
        (n >= min && same >= 4).then(|| sink.spans())
    })
}

async fn send(endpoint: String, reqs: Vec<Vec<ResourceSpans>>) {
    let mut c = TraceServiceClient::connect(endpoint)
        .await
        .expect("connect");
    for r in reqs {
        c.export(ExportTraceServiceRequest { resource_spans: r })
            .await
            .expect("export accepted");
    }
}

#[test]
fn propagation_puts_the_player_id_on_every_span_of_a_joined_trace() {
    let sink = Sink::start_blocking();
    let yaml = format!(
        r#"
{SDK_AND_DEEPFLOW_RECEIVERS}processors:
{GAME_JOIN}  propagate:
    rules:
      - attributes: [player.id]
        from: entry
{}"#,
        tail(&sink, &["otlp", "deepflow"], &["join", "propagate"])
    );
    let c = Collector::start(&yaml, Ports::new());
    let cfg = ScenarioConfig {
        scenario: ScenarioKind::Game,
        traces: 40,
        shuffle: false,
        clock_skew_ms: 0,
        ..Default::default()
    };
    let mut traces = generate(&cfg, 11);
    // The game client's entry span carries the player; nothing else does.
    let mut player_of: HashMap<String, String> = HashMap::new();
    for (i, t) in traces.iter_mut().enumerate() {
        for rs in t.sdk.iter_mut() {
            for sp in rs.scope_spans.iter_mut().flat_map(|ss| ss.spans.iter_mut()) {
                if sp.parent_span_id.is_empty() {
                    let p = format!("player-{i}");
                    sp.attributes.push(kv("player.id", s(&p)));
                    player_of.insert(hex(&sp.trace_id), p);
                }
            }
        }
    }
    assert_eq!(player_of.len(), traces.len());
    let sdk: Vec<Vec<ResourceSpans>> = traces.iter().map(|t| t.sdk.clone()).collect();
    let ebpf: Vec<Vec<ResourceSpans>> = traces.iter().map(|t| t.ebpf.clone()).collect();
    let sent_ebpf: usize = traces.iter().map(|t| t.ebpf_span_count()).sum();
    assert!(sent_ebpf > 0);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        send(c.grpc_endpoint(), sdk).await;
        send(format!("http://127.0.0.1:{}", c.ports.extra[0]), ebpf).await;
    });

    let got = settled(&sink, 40);
    let mut ebpf_seen = 0;
    for r in &got {
        let tid = hex(&r.span.trace_id);
        let want = player_of
            .get(&tid)
            .unwrap_or_else(|| panic!("span {} of an unknown trace {tid}", r.span.name));
        assert_eq!(
            attr(&r.span, "player.id"),
            Some(s(want)),
            "span {:?} of trace {tid} lacks the player id",
            r.span.name
        );
        if r.span.attributes.iter().any(|a| a.key.starts_with("df.")) {
            ebpf_seen += 1;
        }
    }
    assert!(
        ebpf_seen > 0,
        "eBPF-derived spans reached the sink and carry the player id"
    );
    let traces_seen: std::collections::HashSet<String> =
        got.iter().map(|r| hex(&r.span.trace_id)).collect();
    assert_eq!(traces_seen.len(), player_of.len());
}

fn bk_trace(tid: u8, user: &str, result: bool) -> ResourceSpans {
    let t0 = 1_700_000_000_000_000_000u64;
    let span = |id: u8, parent: u8, name: &str, kind: i32, attrs: Vec<KeyValue>| Span {
        trace_id: vec![tid; 16],
        span_id: vec![id; 8],
        parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
        name: name.into(),
        kind,
        start_time_unix_nano: t0 + id as u64 * 1_000_000,
        end_time_unix_nano: t0 + 50_000_000,
        attributes: attrs,
        ..Default::default()
    };
    let body = if result {
        r#"{"result": true, "code": 0, "message": "OK", "data": {"bk_biz_id": 2}}"#
    } else {
        r#"{"result": false, "code": 1306201, "message": "business not found", "data": null}"#
    };
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![kv("service.name", s("cmdb-gateway"))],
            ..Default::default()
        }),
        scope_spans: vec![ScopeSpans {
            spans: vec![
                span(1, 0, "GET /api/v3/biz", 2, vec![kv("user.id", s(user))]),
                span(2, 1, "auth check", 1, vec![]),
                span(
                    3,
                    1,
                    "POST /api/c/compapi/search_business",
                    3,
                    vec![
                        kv("http.status_code", any_value::Value::IntValue(200)),
                        kv("http.response.body", s(body)),
                    ],
                ),
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn an_error_found_by_extraction_keeps_the_trace_and_every_span_has_the_user_id() {
    let sink = Sink::start_blocking();
    let yaml = format!(
        r#"
{OTLP_GRPC_RECEIVER}processors:
  extract:
    rules:
      - name: bk_api_result
        from: http.response.body
        when: {{attribute: http.status_code, equals: 200}}
        json: true
        into: {{bk.result: /result, bk.code: /code, bk.message: /message}}
        set_error:
          when: {{attribute: bk.result, equals: false}}
          message_from: bk.message
  propagate:
    rules:
      - attributes: [user.id]
  tail_sampling:
    decision_wait: 2s
    decision_wait_after_root: 300ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
{}"#,
        tail(&sink, &["otlp"], &["extract", "propagate", "tail_sampling"])
    );
    let mut c = Collector::start(&yaml, Ports::new());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(send(
        c.grpc_endpoint(),
        vec![vec![
            bk_trace(0xa1, "u-1001", false),
            bk_trace(0xb2, "u-2002", true),
        ]],
    ));

    let got = settled(&sink, 3);
    let failed_tid = hex(&[0xa1; 16]);
    assert!(
        got.iter().all(|r| hex(&r.span.trace_id) == failed_tid),
        "only the trace whose body said result:false is kept"
    );
    assert_eq!(got.len(), 3, "the whole trace is kept");
    for r in &got {
        assert_eq!(
            attr(&r.span, "user.id"),
            Some(s("u-1001")),
            "{}",
            r.span.name
        );
    }
    let call = got
        .iter()
        .find(|r| r.span.span_id == vec![3; 8])
        .expect("the API call span");
    let st = call.span.status.clone().expect("status");
    assert_eq!(st.code, 2, "an error span");
    assert_eq!(st.message, "business not found");
    assert_eq!(
        attr(&call.span, "bk.result"),
        Some(any_value::Value::BoolValue(false))
    );
    assert_eq!(
        attr(&call.span, "bk.code"),
        Some(any_value::Value::IntValue(1306201))
    );
    assert!(c.terminate().success());
}

#[test]
fn bad_rules_are_config_errors_with_their_key_paths() {
    let out = validate_config(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:0
processors:
  extract:
    rules:
      - from: body
        regex: '(?P<code>\d+'
      - from: body
        json: true
        into: {x: result}
      - from: body
        key_value: {separator: ";", pair_separator: ";"}
  propagate:
    rules:
      - attributes: [user.id, user.id]
exporters:
  debug:
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [extract, propagate]
      exporters: [debug]
"#,
    );
    out.assert_config_error(&[
        "processors.extract.rules[0].regex",
        "processors.extract.rules[1].into.x",
        "processors.extract.rules[2].key_value",
        "processors.propagate.rules[0].attributes[1]",
    ]);
}
