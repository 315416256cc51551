//! End-to-end tests of the collector base (issue 2): the real `tailweave` binary on loopback, real
//! clients (the OpenTelemetry Python SDK, tonic, raw HTTP), and an OTLP sink downstream.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde_json::Value as Json;
use tailweave_suite::{
    hex, http_request, run_python, service_yaml, str_kv, validate_config, validate_file, wait_for,
    wait_for_async, Collector, Ports, Sink, SinkMode,
};

/// otlp (gRPC + HTTP) -> batch -> otlp exporter to the sink.
fn relay_config(sink: &Sink, extra_receiver: &str, batch: &str, exporter_extra: &str) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{{GRPC}}
      http:
        endpoint: 127.0.0.1:{{HTTP}}
{extra_receiver}
processors:
  batch:
{batch}
exporters:
  otlp:
    endpoint: {sink}
    tls:
      insecure: true
{exporter_extra}
{service}"#,
        sink = sink.endpoint(),
        service = service_yaml(&["otlp"], &["batch"], &["otlp"]),
    )
}

fn any_to_json(v: &Option<AnyValue>) -> Json {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Json::from(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Json::from(*b),
        Some(any_value::Value::IntValue(i)) => Json::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Json::from(*d),
        Some(any_value::Value::ArrayValue(a)) => Json::Array(
            a.values
                .iter()
                .map(|x| any_to_json(&Some(x.clone())))
                .collect(),
        ),
        Some(other) => Json::from(format!("{other:?}")),
        None => Json::Null,
    }
}

fn attrs_to_json(a: &[KeyValue]) -> Json {
    Json::Object(
        a.iter()
            .map(|kv| (kv.key.clone(), any_to_json(&kv.value)))
            .collect(),
    )
}

/// Compares every span the Python SDK reported sending with what the sink received.
fn assert_sdk_spans_delivered(sent: &Json, sink: &Sink) {
    let sent = sent.as_array().expect("array of spans");
    assert_eq!(sent.len(), 3, "the script sends three spans");
    let got = sink.spans();
    for s in sent {
        let sid = s["span_id"].as_str().unwrap();
        let r = got
            .iter()
            .find(|r| hex(&r.span.span_id) == sid)
            .unwrap_or_else(|| panic!("span {sid} ({}) not delivered", s["name"]));
        let p = &r.span;
        assert_eq!(hex(&p.trace_id), s["trace_id"].as_str().unwrap());
        assert_eq!(
            hex(&p.parent_span_id),
            s["parent_span_id"].as_str().unwrap()
        );
        assert_eq!(p.name, s["name"].as_str().unwrap());
        // Python's SpanKind starts at INTERNAL = 0; OTLP's at UNSPECIFIED = 0.
        assert_eq!(
            p.kind as i64,
            s["kind"].as_i64().unwrap() + 1,
            "kind of {}",
            p.name
        );
        assert_eq!(p.start_time_unix_nano, s["start"].as_u64().unwrap());
        assert_eq!(p.end_time_unix_nano, s["end"].as_u64().unwrap());
        let st = p.status.clone().unwrap_or_default();
        assert_eq!(
            st.code as i64,
            s["status_code"].as_i64().unwrap(),
            "status of {}",
            p.name
        );
        assert_eq!(st.message, s["status_message"].as_str().unwrap());
        assert_eq!(
            attrs_to_json(&p.attributes),
            s["attributes"],
            "attributes of {}",
            p.name
        );
        let events: Vec<Json> = p
            .events
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "time": e.time_unix_nano, "attributes": attrs_to_json(&e.attributes)}))
            .collect();
        assert_eq!(Json::Array(events), s["events"], "events of {}", p.name);
        let links: Vec<Json> = p
            .links
            .iter()
            .map(|l| serde_json::json!({"trace_id": hex(&l.trace_id), "span_id": hex(&l.span_id), "attributes": attrs_to_json(&l.attributes)}))
            .collect();
        assert_eq!(Json::Array(links), s["links"], "links of {}", p.name);
        assert_eq!(
            attrs_to_json(&r.resource.attributes),
            s["resource"],
            "resource of {}",
            p.name
        );
        assert_eq!(r.scope.name, s["scope"].as_str().unwrap());
    }
}

#[test]
fn python_sdk_trace_arrives_unchanged_over_grpc_and_http() {
    let sink = Sink::start_blocking();
    let c = Collector::start(
        &relay_config(&sink, "", "    timeout: 50ms", ""),
        Ports::new(),
    );
    for (proto, endpoint, service) in [
        ("grpc", c.grpc_endpoint(), "checkout-grpc"),
        (
            "http",
            format!("http://{}/v1/traces", c.http_addr()),
            "checkout-http",
        ),
    ] {
        let out = run_python("send_trace.py", &[proto, &endpoint, service]);
        let sent: Json = serde_json::from_str(out.trim()).expect("script prints JSON");
        let ids: Vec<String> = sent
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["span_id"].as_str().unwrap().to_string())
            .collect();
        wait_for("the SDK spans downstream", Duration::from_secs(30), || {
            let got = sink.spans();
            ids.iter()
                .all(|id| got.iter().any(|r| &hex(&r.span.span_id) == id))
                .then_some(())
        });
        assert_sdk_spans_delivered(&sent, &sink);
    }
    assert!(
        c.metric(
            "tailweave_receiver_accepted_spans_total",
            &[("receiver", "otlp")]
        ) >= 6.0
    );
}

fn span(trace: u8, id: u64, name: &str) -> Span {
    Span {
        trace_id: vec![trace; 16],
        span_id: id.to_be_bytes().to_vec(),
        name: name.into(),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_100_000_000,
        attributes: vec![str_kv("k", "v")],
        ..Default::default()
    }
}

fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![str_kv("service.name", "handmade")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "test".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn post(c: &Collector, ctype: &str, body: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    http_request(
        &c.http_addr(),
        "POST",
        "/v1/traces",
        &[("content-type", ctype)],
        body,
    )
    .expect("http request")
}

#[test]
fn otlp_json_body_is_accepted_and_answered_in_json() {
    let sink = Sink::start_blocking();
    let c = Collector::start(
        &relay_config(&sink, "", "    timeout: 10ms", ""),
        Ports::new(),
    );
    let req = request(vec![span(0xab, 0x1122334455667788, "json span")]);
    let body = serde_json::to_vec(&req).unwrap();
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(
        text.contains("abababab"),
        "ids are hex in OTLP/JSON: {text}"
    );
    let (st, hdrs, resp) = post(&c, "application/json", &body);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    assert!(hdrs
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("application/json")));
    let _: Json = serde_json::from_slice(&resp).expect("JSON answer");
    wait_for("the JSON span downstream", Duration::from_secs(20), || {
        sink.spans()
            .iter()
            .find(|r| hex(&r.span.span_id) == "1122334455667788")
            .map(|r| assert_eq!(r.span.name, "json span"))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_and_good_spans_are_kept() {
    let sink = Sink::start().await;
    let extra = "";
    let yaml = relay_config(&sink, extra, "    timeout: 10ms", "").replace(
        "        endpoint: 127.0.0.1:{HTTP}\n",
        "        endpoint: 127.0.0.1:{HTTP}\n        max_request_body_size: 4096\n",
    );
    let c = tokio::task::spawn_blocking(move || Collector::start(&yaml, Ports::new()))
        .await
        .unwrap();
    let cc = &c;
    let good = request(vec![span(1, 1, "good")]).encode_to_vec();

    // Not protobuf at all, and truncated protobuf: 400 with a readable message.
    let (st, _, body) = post(
        cc,
        "application/x-protobuf",
        b"\xff\xff\xff this is not protobuf",
    );
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    let (st, _, body) = post(cc, "application/x-protobuf", &good[..good.len() - 4]);
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    assert!(!body.is_empty(), "400 carries a message");
    // Wrong content type, wrong method, too large.
    let (st, _, _) = post(cc, "text/plain", &good);
    assert_eq!(st, 415);
    let (st, _, _) = http_request(&c.http_addr(), "GET", "/v1/traces", &[], &[]).unwrap();
    assert_eq!(st, 405);
    let big: Vec<Span> = (0..200).map(|i| span(2, 100 + i, "big")).collect();
    let (st, _, _) = post(cc, "application/x-protobuf", &request(big).encode_to_vec());
    assert_eq!(st, 413);

    // Invalid ids mixed with good spans over HTTP: partial success, good spans delivered.
    let mut zero_trace = span(3, 7, "zero trace id");
    zero_trace.trace_id = vec![0; 16];
    let mut short_span = span(3, 8, "short span id");
    short_span.span_id = vec![1, 2, 3];
    let mixed = request(vec![
        span(3, 0x31, "good 1"),
        zero_trace.clone(),
        short_span.clone(),
        span(3, 0x32, "good 2"),
    ]);
    let (st, _, body) = post(cc, "application/x-protobuf", &mixed.encode_to_vec());
    assert_eq!(st, 200);
    let resp = ExportTraceServiceResponse::decode(&body[..]).expect("protobuf answer");
    let ps = resp.partial_success.expect("partial_success is set");
    assert_eq!(ps.rejected_spans, 2);
    assert!(!ps.error_message.is_empty());

    // The same over gRPC.
    let mut client = TraceServiceClient::connect(c.grpc_endpoint())
        .await
        .unwrap();
    let mixed = request(vec![span(4, 0x41, "grpc good"), zero_trace, short_span]);
    let resp = client
        .export(mixed)
        .await
        .expect("grpc export")
        .into_inner();
    assert_eq!(resp.partial_success.expect("partial").rejected_spans, 2);

    // Still serving: a good request after all of that.
    let (st, _, _) = post(cc, "application/x-protobuf", &good);
    assert_eq!(st, 200);
    let want = [
        "0000000000000031",
        "0000000000000032",
        "0000000000000041",
        "0000000000000001",
    ];
    wait_for_async("the good spans downstream", Duration::from_secs(20), || {
        let got = sink.spans();
        async move {
            want.iter()
                .all(|w| got.iter().any(|r| hex(&r.span.span_id) == *w))
                .then_some(())
        }
    })
    .await;
    let refused = tokio::task::spawn_blocking(move || {
        let m = c.metrics();
        drop(c);
        m
    })
    .await
    .unwrap();
    assert!(
        tailweave_suite::metric_sum(&refused, "tailweave_receiver_refused_spans_total", &[]) >= 4.0,
        "refused spans are counted:\n{refused}"
    );
}

/// A relay (the config `yaml` makes for the sink) to a sink that holds every call open, started,
/// with a gRPC client connected to it.
async fn stalled_relay(
    yaml: impl FnOnce(&Sink) -> String,
) -> (
    Sink,
    Collector,
    TraceServiceClient<tonic::transport::Channel>,
) {
    let sink = Sink::start().await;
    sink.set_mode(SinkMode::Stall);
    let yaml = yaml(&sink);
    let c = tokio::task::spawn_blocking(move || Collector::start(&yaml, Ports::new()))
        .await
        .unwrap();
    let client = TraceServiceClient::connect(c.grpc_endpoint())
        .await
        .unwrap();
    (sink, c, client)
}

/// The span ids (of spans named `name`) the sink received, sorted, duplicates kept.
fn delivered_ids(sink: &Sink, name: &str) -> Vec<Vec<u8>> {
    let mut ids: Vec<Vec<u8>> = sink
        .spans()
        .into_iter()
        .filter(|r| r.span.name == name)
        .map(|r| r.span.span_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downstream_gives_backpressure_then_everything_is_delivered() {
    let (sink, c, mut client) = stalled_relay(|sink| {
        relay_config(
            sink,
            "",
            "    timeout: 0s\n    send_batch_size: 1",
            "    timeout: 120s\n    sending_queue:\n      queue_size: 2\n      num_consumers: 1",
        )
        .replace("service:\n", "service:\n  queue_size: 1\n")
    })
    .await;
    // A request is answered once a stage keeps its spans (end-to-end acknowledgement). While the
    // sink stalls, the exporter queue fills; a request already inside the pipeline then gets a
    // bounded wait for room and is refused (its spans dropped, so a resend cannot duplicate
    // them), and once the stage channels are full the receiver refuses at the door.
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    let mut refused_grpc = false;
    for i in 0..2000u64 {
        let spans: Vec<_> = (0..5).map(|j| span(9, i * 10 + j + 1, "bp")).collect();
        let ids: Vec<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
        match client.export(request(spans)).await {
            Ok(_) => accepted.extend(ids),
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                refused_grpc = true;
                break;
            }
        }
    }
    assert!(
        refused_grpc,
        "the receiver never refused while downstream was stalled"
    );
    // HTTP refuses too, with Retry-After.
    let addr = c.http_addr();
    let mut http_answers = Vec::new();
    for k in 0..50u64 {
        let body = request(vec![span(9, 999_000 + k, "http bp")]).encode_to_vec();
        let addr = addr.clone();
        let (st, hdrs, _) = tokio::task::spawn_blocking(move || {
            http_request(
                &addr,
                "POST",
                "/v1/traces",
                &[("content-type", "application/x-protobuf")],
                &body,
            )
            .unwrap()
        })
        .await
        .unwrap();
        http_answers.push(st);
        if st != 200 {
            assert_eq!(st, 503, "answers so far: {http_answers:?}");
            assert!(hdrs.iter().any(|(k, _)| k == "retry-after"), "{hdrs:?}");
            break;
        }
    }
    assert_eq!(
        http_answers.last(),
        Some(&503),
        "HTTP never refused while downstream was stalled: {http_answers:?}"
    );
    let c = tokio::task::spawn_blocking(move || {
        // Refused at the receiver's door (`pipeline_full`) or, for a request already inside,
        // by the stage that found no room behind it (`downstream_refused`).
        let refused = c.metric("tailweave_receiver_refused_spans_total", &[]);
        assert!(
            refused >= 5.0,
            "refusals are counted on /metrics ({refused})"
        );
        c
    })
    .await
    .unwrap();
    // Downstream back: every accepted span arrives exactly once, and no refused one.
    sink.set_mode(SinkMode::Accept);
    let want = accepted.len();
    wait_for_async(
        "all accepted spans downstream",
        Duration::from_secs(60),
        || {
            let n = delivered_ids(&sink, "bp").len();
            async move { (n >= want).then_some(()) }
        },
    )
    .await;
    // What was in the pipeline is out (the queues are empty), so nothing more can come.
    let c = tokio::task::spawn_blocking(move || {
        c.wait_drained(&sink, "tailweave_exporter_queue_size");
        (c, sink)
    })
    .await
    .unwrap();
    accepted.sort();
    assert_eq!(
        delivered_ids(&c.1, "bp"),
        accepted,
        "exactly the accepted spans are delivered, once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delivers_spans_held_in_batch_and_queue_then_exits_zero() {
    let (sink, c, mut client) = stalled_relay(|sink| {
        relay_config(
            sink,
            "",
            "    timeout: 60s\n    send_batch_size: 100",
            "    timeout: 120s\n    sending_queue:\n      num_consumers: 1",
        )
    })
    .await;
    let mut sent = 0usize;
    for i in 0..25u64 {
        let req = request((0..10).map(|j| span(5, i * 100 + j + 1, "held")).collect());
        client.export(req).await.expect("accepted");
        sent += 10;
    }
    // 250 spans: two full batches went to the (stalled) exporter, 50 wait in the batch processor.
    let mut c = tokio::task::spawn_blocking(move || {
        wait_for(
            "the exporter to be stuck on the stalled sink",
            Duration::from_secs(20),
            || {
                (c.metric(
                    "tailweave_processor_outgoing_spans_total",
                    &[("processor", "batch")],
                ) >= 200.0)
                    .then_some(())
            },
        );
        c
    })
    .await
    .unwrap();
    assert_eq!(sink.span_count(), 0, "nothing delivered before shutdown");
    let pid = c.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    sink.set_mode(SinkMode::Accept);
    let status = tokio::task::spawn_blocking(move || {
        let st = c.terminate();
        (st, c)
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit status {:?}\n{}",
        status.0,
        status.1.log_text()
    );
    assert_eq!(
        sink.span_count(),
        sent,
        "every span held at SIGTERM was delivered"
    );
}

#[test]
fn validate_reports_three_mistakes_with_paths_and_lines() {
    let out = validate_config(
        "receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: 127.0.0.1:4317\n        bogus_key: 1\nprocessors:\n  batch:\n    timeout: not-a-duration\nexporters:\n  debug:\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n      processors: [batch]\n      exporters: [debug, missing]\n",
    );
    let err = &out.stderr;
    assert_ne!(out.code, Some(0), "validate must fail:\n{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
    assert!(
        err.contains("receivers.otlp.protocols.grpc") && err.contains("line 6"),
        "{err}"
    );
    assert!(err.contains("processors.batch.timeout (line 9)"), "{err}");
    assert!(
        err.contains(
            "service.pipelines.traces.exporters[1] (line 17): references exporter `missing`"
        ),
        "{err}"
    );
}

#[test]
fn every_example_and_the_default_pipeline_validate() {
    let root = tailweave_suite::root();
    let mut files = vec![root.join("pipelines.yaml")];
    for e in std::fs::read_dir(root.join("examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            files.push(p);
        }
    }
    assert!(
        files.len() >= 3,
        "examples/ holds at least a sidecar and a gateway config"
    );
    let mut failures = HashMap::new();
    for f in &files {
        let out = validate_file(f);
        if out.code != Some(0) {
            failures.insert(f.display().to_string(), out.stderr);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
