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

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("otlp_decode", tailweave_fuzz::otlp_decode),
    ("otlp_json", tailweave_fuzz::otlp_json),
    ("config_load", tailweave_fuzz::config_load),
    ("deepflow_normalize", tailweave_fuzz::deepflow_normalize),
    ("join", tailweave_fuzz::join),
    ("tail_sampling", tailweave_fuzz::tail_sampling),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(corpus_dir(target))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| (e.path(), fs::read(e.path()).expect("read corpus file")))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// xorshift64*: deterministic mutations, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            3 if !v.is_empty() => {
                let (a, b) = (rng.below(v.len()), rng.below(v.len()));
                let (lo, hi) = (a.min(b), a.max(b));
                let chunk = v[lo..hi].to_vec();
                let at = rng.below(v.len());
                v.splice(at..at, chunk);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

#[test]
fn every_target_has_a_seed_corpus_and_survives_it() {
    for (name, f) in TARGETS {
        let files = corpus(name);
        assert!(
            !files.is_empty(),
            "no seed corpus in {:?}",
            corpus_dir(name)
        );
        for (path, data) in files {
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{name} crashed on {}", path.display());
        }
    }
}

#[test]
fn every_target_survives_mutations_of_its_corpus() {
    let rounds: usize = std::env::var("FUZZ_REPLAY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for (name, f) in TARGETS {
        let seeds = corpus(name);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for i in 0..rounds {
            let (path, seed) = &seeds[i % seeds.len()];
            let input = mutate(seed, &mut rng);
            let r = std::panic::catch_unwind(|| f(&input));
            if r.is_err() {
                let out = std::env::temp_dir().join(format!("crash-{name}-{i}"));
                let _ = fs::write(&out, &input);
                panic!(
                    "{name} crashed on a mutation of {} (written to {})",
                    path.display(),
                    out.display()
                );
            }
        }
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
