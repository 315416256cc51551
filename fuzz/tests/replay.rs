//! Runs every fuzz target over its seed corpus (`corpus/<target>/`), then over deterministic
//! mutations of it, under plain `cargo test` (no nightly, no libFuzzer). A crash file found by
//! `cargo fuzz` and copied into the corpus stays a regression test here.
//!
//! `cargo test -- --ignored write_seed_corpus` rewrites the generated seeds.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use tailweave_core::otlp::{decode_request, encode_json_request, DecodeLimits};
use tailweave_core::proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tailweave_core::proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use tailweave_core::proto::tonic::resource::v1::Resource;
use tailweave_core::proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

use tailweave_fuzz::replay::{self, Rng, TARGETS};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn corpus_dir(target: &str) -> PathBuf {
    replay::corpus_dir(&corpus_root(), target)
}

#[test]
fn every_target_has_a_seed_corpus_and_survives_it() {
    for (name, f) in TARGETS {
        let r = replay::replay(&corpus_root(), name, *f, 0, &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.seeds > 0);
    }
}

#[test]
fn every_target_survives_mutations_of_its_corpus() {
    let rounds = replay::rounds_from_env(replay::DEFAULT_ROUNDS);
    for (name, f) in TARGETS {
        let r = replay::replay(&corpus_root(), name, *f, rounds, &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "replay: {name}: {} executions ({} seeds, {} mutations) in {:.1}s, 0 crashes",
            r.executions(),
            r.seeds,
            r.mutations,
            r.elapsed.as_secs_f64()
        );
    }
}

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

fn request() -> ExportTraceServiceRequest {
    let nested = any_value::Value::KvlistValue(KeyValueList {
        values: vec![
            kv(
                "list",
                any_value::Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(any_value::Value::IntValue(1)),
                        },
                        AnyValue {
                            value: Some(any_value::Value::BytesValue(vec![0, 1, 2])),
                        },
                    ],
                }),
            ),
            kv("d", any_value::Value::DoubleValue(1.5)),
        ],
    });
    let span = |t: u8, id: u8, parent: u8, attrs: Vec<KeyValue>| Span {
        trace_id: vec![t; 16],
        span_id: vec![id; 8],
        parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
        name: format!("op-{id}"),
        kind: 2,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_500_000_000,
        attributes: attrs,
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![
            ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("frontend"))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "http".into(),
                        version: "1".into(),
                        ..Default::default()
                    }),
                    spans: vec![
                        span(1, 1, 0, vec![kv("http.method", s("GET")), kv("n", nested)]),
                        span(1, 2, 1, vec![kv("ok", any_value::Value::BoolValue(true))]),
                    ],
                    schema_url: "https://opentelemetry.io/schemas/1.21.0".into(),
                }],
                schema_url: String::new(),
            },
            ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("telemetry.sdk.name", s("deepflow")),
                        kv("df.capture_info.observation_point", s("Server Process")),
                        kv(
                            "df.transport.req_tcp_seq",
                            any_value::Value::IntValue(12345),
                        ),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: None,
                    spans: vec![span(
                        2,
                        3,
                        9,
                        vec![
                            kv("df.span.type", s("Process")),
                            kv(
                                "df.span.syscall_trace_id_request",
                                any_value::Value::IntValue(7),
                            ),
                        ],
                    )],
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            },
        ],
    }
}

#[test]
#[ignore = "writes the generated seeds into corpus/"]
fn write_seed_corpus() {
    let put = |target: &str, name: &str, data: &[u8]| {
        let d = corpus_dir(target);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(name), data).unwrap();
    };
    let req = request().encode_to_vec();
    put("otlp_decode", "two-resources.pb", &req);
    put("otlp_decode", "empty.pb", &[]);
    let mut bad = request();
    bad.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![1; 3];
    put("otlp_decode", "bad-trace-id.pb", &bad.encode_to_vec());
    put("deepflow_normalize", "two-resources.pb", &req);

    let spans = decode_request(req.clone().into(), &DecodeLimits::default())
        .unwrap()
        .spans;
    put(
        "otlp_json",
        "two-resources.json",
        &encode_json_request(&spans),
    );
    put(
        "otlp_json",
        "hand.json",
        br#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"a"}}]},"scopeSpans":[{"scope":{"name":"s"},"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"x","kind":2,"startTimeUnixNano":"1","endTimeUnixNano":"2","attributes":[{"key":"i","value":{"intValue":"42"}},{"key":"arr","value":{"arrayValue":{"values":[{"boolValue":true}]}}}],"status":{"code":2}}]}]}]}"#,
    );
    put("otlp_json", "empty.json", b"{}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for f in [
        "pipelines.yaml",
        "examples/gateway.yaml",
        "examples/relay.yaml",
        "examples/sidecar.yaml",
        "examples/red-metrics.yaml",
    ] {
        if let Ok(text) = fs::read(root.join(f)) {
            let name = f.replace('/', "-");
            put("config_load", &name, &text);
        }
    }
    put(
        "config_load",
        "env.yaml",
        b"receivers:\n  otlp:\n    protocols:\n      grpc:\n        endpoint: ${env:HOST}:${env:PORT}\nexporters:\n  debug: {}\nservice:\n  pipelines:\n    traces: {receivers: [otlp], exporters: [debug]}\n",
    );

    // The state machines read choices from bytes: seeds of several lengths.
    let mut rng = Rng(42);
    for target in ["deepflow_normalize", "join", "tail_sampling"] {
        for (i, len) in [16usize, 64, 256, 1024, 4096].into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            put(target, &format!("random-{i}"), &data);
        }
    }
}
