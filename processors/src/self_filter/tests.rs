use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tailweave_core::config::{parse, BuildContext, SelfInfo};
use tailweave_core::ebpf::{EbpfSpan, TapSide};
use tailweave_core::proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use tailweave_core::proto::tonic::resource::v1::Resource as ProtoResource;
use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
use tailweave_core::{Processor, Resource, Scope, Span, SpanBatch, SpanSource};

use super::*;

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

fn info() -> SelfInfo {
    SelfInfo {
        listen_ports: vec![4317, 4318, 8888, 13133, 14317],
        exporter_endpoints: vec!["tempo.observability:4417".into()],
        pid: 4242,
        process_name: "tailweave".into(),
        host_name: "tailweave-gateway-0".into(),
        pod_name: Some("tailweave-gateway-0".into()),
        service_name: "tailweave".into(),
    }
}

fn ctx() -> BuildContext {
    BuildContext {
        id: "self_filter".into(),
        pipeline: "traces".into(),
        self_info: Arc::new(info()),
    }
}

fn cfg(yaml: &str) -> SelfFilterConfig {
    parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
}

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}
fn s(k: &str, v: &str) -> KeyValue {
    kv(k, any_value::Value::StringValue(v.into()))
}
fn i(k: &str, v: i64) -> KeyValue {
    kv(k, any_value::Value::IntValue(v))
}

fn span_with(res: Vec<KeyValue>, attrs: Vec<KeyValue>, name: &str, kind: i32) -> Span {
    let r = Resource::from_proto(
        &ProtoResource {
            attributes: res,
            ..Default::default()
        },
        "",
    );
    let scope = Scope::new(r, Default::default(), Default::default());
    Span::from_proto(
        scope,
        &ProtoSpan {
            trace_id: vec![7; 16],
            span_id: vec![9; 8],
            name: name.into(),
            kind,
            attributes: attrs,
            ..Default::default()
        },
    )
}

fn sdk(service: &str) -> Span {
    span_with(
        vec![s("service.name", service)],
        vec![s("http.route", "/api/cart")],
        "GET /api/cart",
        2,
    )
}

/// A DeepFlow row as attributes only (the receiver did not classify it).
#[derive(Clone)]
struct Row {
    client_port: i64,
    server_port: i64,
    pid: [i64; 2],
    comm: [&'static str; 2],
    host: [&'static str; 2],
    ip: [&'static str; 2],
    path: &'static str,
    tap: &'static str,
}

fn ordinary() -> Row {
    Row {
        client_port: 51000,
        server_port: 8080,
        pid: [310, 4242],
        comm: ["frontend", "cart"],
        host: ["node-a", "node-b"],
        ip: ["10.1.0.5", "10.1.0.9"],
        path: "/api/cart",
        tap: "Client Process",
    }
}

fn attrs_span(r: &Row) -> Span {
    let mut res = vec![
        s("telemetry.sdk.name", "deepflow"),
        s("df.capture_info.observation_point", r.tap),
        i("df.transport.client_port", r.client_port),
        i("df.transport.server_port", r.server_port),
    ];
    for side in 0..2 {
        if r.pid[side] != 0 {
            res.push(i(&format!("process.pid_{side}"), r.pid[side]));
        }
        if !r.comm[side].is_empty() {
            res.push(s(&format!("thread.name_{side}"), r.comm[side]));
        }
        if !r.host[side].is_empty() {
            res.push(s(&format!("df.universal_tag.host_{side}"), r.host[side]));
        }
        if !r.ip[side].is_empty() {
            res.push(s(&format!("df.network.ip_{side}"), r.ip[side]));
        }
    }
    span_with(
        res,
        vec![
            s("df.span.type", "session"),
            s("df.span.endpoint", r.path),
            s("df.http.path", r.path),
        ],
        &format!("POST {}", r.path),
        3,
    )
}

/// The same row as the receiver would have classified it.
fn model_span(r: &Row) -> Span {
    let mut sp = span_with(
        vec![s("telemetry.sdk.name", "deepflow")],
        vec![s("df.span.type", "session"), s("df.http.path", r.path)],
        &format!("POST {}", r.path),
        3,
    );
    let opt = |x: &str| (!x.is_empty()).then(|| Arc::<str>::from(x));
    let ip = |x: &str| x.parse::<IpAddr>().ok();
    sp.source = SpanSource::Ebpf;
    sp.ebpf = Some(Box::new(EbpfSpan {
        tap_side: TapSide::parse(r.tap),
        port: [r.client_port as u16, r.server_port as u16],
        pid: [r.pid[0] as u32, r.pid[1] as u32],
        process_name: [opt(r.comm[0]), opt(r.comm[1])],
        host: [opt(r.host[0]), opt(r.host[1])],
        ip: [ip(r.ip[0]), ip(r.ip[1])],
        endpoint: opt(r.path),
        ..Default::default()
    }));
    sp
}

fn verdict(c: &SelfFilterConfig, sp: &Span) -> Option<Rule> {
    let rules = c.rules(&info()).unwrap();
    rules.matches(sp, &mut rules::ResourceCache::default())
}

/// Both readings of the row (model and attributes) give the same verdict.
fn both(c: &SelfFilterConfig, r: &Row) -> Option<Rule> {
    let a = verdict(c, &attrs_span(r));
    let m = verdict(c, &model_span(r));
    assert_eq!(a, m, "model and attribute readings disagree");
    a
}

#[test]
fn listen_port_on_this_host() {
    let c = SelfFilterConfig::default();
    // An SDK export into tailweave's 4317, seen at tailweave's side.
    let mut r = Row {
        server_port: 4317,
        host: ["node-a", "tailweave-gateway-0"],
        comm: ["frontend", "tailweave"],
        path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        tap: "Server Process",
        ..ordinary()
    };
    assert_eq!(both(&c, &r), Some(Rule::ListenPort));
    // The server side unnamed: tailweave's ports are dedicated, so it is taken as this host.
    r.host[1] = "";
    assert_eq!(both(&c, &r), Some(Rule::ListenPort));
    // Another host's 8888 is not ours (and the path is ordinary).
    let other = Row {
        server_port: 8888,
        host: ["node-a", "node-b"],
        comm: ["frontend", "metrics-app"],
        ..ordinary()
    };
    assert_eq!(both(&c, &other), None);
    // ...unless every host runs a tailweave on these ports.
    let any = cfg("any_host: true");
    assert_eq!(both(&any, &other), Some(Rule::ListenPort));
}

#[test]
fn node_name_from_the_environment_counts_as_this_host() {
    let c = SelfFilterConfig::default();
    // DeepFlow names the server side by its node: another process on the node, not tailweave.
    let r = Row {
        server_port: 4317,
        host: ["node-a", "worker-7"],
        comm: ["frontend", "otelcol"],
        pid: [310, 99],
        ..ordinary()
    };
    let with = |env: &'static [(&'static str, &'static str)]| {
        let rules = Rules::compile_with_env(&c, &info(), |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        let a = rules.matches(&attrs_span(&r), &mut rules::ResourceCache::default());
        let m = rules.matches(&model_span(&r), &mut rules::ResourceCache::default());
        assert_eq!(a, m, "model and attribute readings disagree");
        (a, rules.describe().join("\n"))
    };
    assert_eq!(with(&[]).0, None);
    let (v, described) = with(&[("NODE_NAME", "worker-7")]);
    assert_eq!(v, Some(Rule::ListenPort));
    assert!(described.contains("worker-7"), "{described}");
    assert_eq!(
        with(&[("K8S_NODE_NAME", "WORKER-7")]).0,
        Some(Rule::ListenPort)
    );
    // An empty variable names nothing.
    assert_eq!(with(&[("NODE_NAME", " ")]).0, None);
}

#[test]
fn own_process_calling_an_exporter_endpoint() {
    let c = SelfFilterConfig::default();
    let r = Row {
        server_port: 4417,
        pid: [4242, 77],
        comm: ["tailweave", "tempo"],
        host: ["tailweave-gateway-0", "node-t"],
        path: "/push",
        ..ordinary()
    };
    assert_eq!(both(&c, &r), Some(Rule::OwnProcess));
    // The same pid under another process name is a different process (another pid namespace).
    let impostor = Row {
        comm: ["nginx", "tempo"],
        ..r.clone()
    };
    assert_eq!(both(&c, &impostor), None);
    // Our name on another named host is another instance's business, not this one's.
    let elsewhere = Row {
        host: ["node-x", "node-t"],
        ..r.clone()
    };
    assert_eq!(both(&c, &elsewhere), None);
    // Without a name the pid decides.
    let by_pid = Row {
        comm: ["", "tempo"],
        ..r
    };
    assert_eq!(both(&c, &by_pid), Some(Rule::OwnProcess));
}

#[test]
fn export_path_towards_an_exporter_port() {
    let c = SelfFilterConfig::default();
    let r = Row {
        server_port: 4417,
        path: EXPORT,
        ..ordinary()
    };
    assert_eq!(both(&c, &r), Some(Rule::ExportPath));
    let http = Row {
        path: "/v1/traces",
        ..r.clone()
    };
    assert_eq!(both(&c, &http), Some(Rule::ExportPath));
    // The same path towards a port tailweave has nothing to do with.
    let unrelated = Row {
        server_port: 9000,
        ..r
    };
    assert_eq!(both(&c, &unrelated), None);
}

#[test]
fn own_service_sdk_spans() {
    let c = SelfFilterConfig::default();
    assert_eq!(verdict(&c, &sdk("tailweave")), Some(Rule::OwnService));
    assert_eq!(verdict(&c, &sdk("checkout")), None);
    let off = cfg("derive_rules: false");
    assert_eq!(verdict(&off, &sdk("tailweave")), None);
}

#[test]
fn config_rules() {
    let c = cfg(r#"
derive_rules: false
ports: [9999]
cidrs: [10.9.0.0/16, "fd00::1"]
process_names: [otelcol-contrib-long-name]
service_names: [otel-collector]
resource_attributes: {k8s.namespace.name: observability}
"#);
    assert!(c.validate().is_empty());
    let port = Row {
        server_port: 9999,
        host: ["a", "b"],
        ..ordinary()
    };
    assert_eq!(both(&c, &port), Some(Rule::Port));
    let cidr = Row {
        ip: ["10.1.0.5", "10.9.3.3"],
        ..ordinary()
    };
    assert_eq!(both(&c, &cidr), Some(Rule::Cidr));
    let v6 = Row {
        ip: ["fd00::1", "10.1.0.9"],
        ..ordinary()
    };
    assert_eq!(both(&c, &v6), Some(Rule::Cidr));
    // The kernel's 15-byte name of the configured process.
    let comm = Row {
        comm: ["otelcol-contrib", "cart"],
        ..ordinary()
    };
    assert_eq!(both(&c, &comm), Some(Rule::ProcessName));
    assert_eq!(verdict(&c, &sdk("otel-collector")), Some(Rule::ServiceName));
    let ns = span_with(
        vec![
            s("service.name", "x"),
            s("k8s.namespace.name", "observability"),
        ],
        vec![],
        "op",
        1,
    );
    assert_eq!(verdict(&c, &ns), Some(Rule::ResourceAttribute));
    assert_eq!(verdict(&c, &sdk("checkout")), None);
    assert_eq!(both(&c, &ordinary()), None);
}

#[test]
fn no_false_positives_on_ordinary_spans() {
    // Every rule active at once.
    let c = cfg(r#"
ports: [9999]
cidrs: [192.168.0.0/16]
process_names: [otelcol]
service_names: [otel-collector]
resource_attributes: {team: observability}
"#);
    let mut spans = vec![sdk("checkout"), sdk("frontend"), sdk("cart")];
    let rows = [
        ordinary(),
        // Business gRPC between two services on a port tailweave also uses elsewhere.
        Row {
            server_port: 4317,
            host: ["node-a", "node-b"],
            comm: ["checkout", "payments"],
            path: "/payments.v1.Payments/Charge",
            ..ordinary()
        },
        // A MySQL call from a pod whose pid happens to equal tailweave's.
        Row {
            server_port: 3306,
            pid: [4242, 900],
            comm: ["orders", "mysqld"],
            host: ["node-c", "node-d"],
            path: "SELECT orders",
            ..ordinary()
        },
        // A network span with no process information at all.
        Row {
            pid: [0, 0],
            comm: ["", ""],
            host: ["", ""],
            tap: "Client NIC",
            ..ordinary()
        },
    ];
    for r in &rows {
        spans.push(attrs_span(r));
        spans.push(model_span(r));
    }
    let n = spans.len();
    let mut p = c.build(&ctx()).unwrap();
    let mut out = Vec::new();
    p.process(Instant::now(), SpanBatch::new(spans), &mut out);
    assert_eq!(out.iter().map(|b| b.len()).sum::<usize>(), n);
}

#[test]
fn process_drops_only_matching_spans_and_keeps_the_whole_mark() {
    let c = SelfFilterConfig::default();
    let mut p = c.build(&ctx()).unwrap();
    let own = Row {
        server_port: 14317,
        host: ["deepflow-server", "tailweave-gateway-0"],
        comm: ["deepflow-server", "tailweave"],
        tap: "Server Process",
        ..ordinary()
    };
    let spans = vec![
        sdk("checkout"),
        attrs_span(&own),
        model_span(&own),
        sdk("tailweave"),
    ];
    let mut out = Vec::new();
    p.process(Instant::now(), SpanBatch::whole(spans), &mut out);
    assert_eq!(out.len(), 1);
    assert!(out[0].whole);
    assert_eq!(out[0].spans.len(), 1);
    assert_eq!(out[0].spans[0].service_name(), "checkout");
    // A batch of nothing but self traffic leaves nothing behind.
    let mut out = Vec::new();
    p.process(
        Instant::now(),
        SpanBatch::new(vec![attrs_span(&own)]),
        &mut out,
    );
    assert!(out.is_empty());
}

#[test]
fn fallback_reads_net_attributes_by_kind() {
    // No df.transport.*: the ports come from net.host.port / net.peer.port, whose orientation
    // depends on the kind (SERVER: host is the server).
    let res = vec![
        s("telemetry.sdk.name", "deepflow"),
        s("df.universal_tag.host_1", "tailweave-gateway-0"),
    ];
    let server = span_with(
        res.clone(),
        vec![
            s("df.span.type", "request"),
            i("net.host.port", 14317),
            i("net.peer.port", 50000),
        ],
        "",
        2,
    );
    let c = SelfFilterConfig::default();
    assert_eq!(verdict(&c, &server), Some(Rule::ListenPort));
    let client = span_with(
        res,
        vec![
            s("df.span.type", "request"),
            i("net.host.port", 14317),
            i("net.peer.port", 50000),
        ],
        "",
        3,
    );
    // As a CLIENT span, 14317 is the client's port and 50000 the server's.
    assert_eq!(verdict(&c, &client), None);
}

#[test]
fn describe_lists_derived_rules_and_the_agent_setting() {
    let c = cfg("ports: [9999]");
    let lines = c.describe(&ctx());
    let text = lines.join("\n");
    assert!(
        text.contains("listen_port") && text.contains("4317, 4318, 8888, 13133, 14317"),
        "{text}"
    );
    assert!(text.contains("own_process") && text.contains("tempo.observability:4417"));
    assert!(text.contains("export_path"));
    assert!(text.contains("own_service") && text.contains("\"tailweave\""));
    assert!(text.contains("rule ports") && text.contains("9999"));
    assert!(text.contains(
        "inputs.ebpf.socket.kprobe.blacklist.ports: \"4317,4318,4417,8888,9999,13133,14317\""
    ));
    let off = cfg("derive_rules: false").describe(&ctx()).join("\n");
    assert!(off.contains("no rules"), "{off}");
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let c = cfg(r#"
ports: [0, 80]
cidrs: [10.0.0.0/33, nope, 10.0.0.1]
process_names: [""]
service_names: [" "]
resource_attributes: {"": x}
"#);
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        vec![
            "ports[0]",
            "cidrs[0]",
            "cidrs[1]",
            "process_names[0]",
            "service_names[0]",
            "resource_attributes"
        ]
    );
    assert!(parse::<SelfFilterConfig>(serde_yaml::from_str("port: [1]").unwrap()).is_err());
}

#[test]
fn cidr_contains() {
    let c = Cidr::parse("10.0.0.0/8").unwrap();
    assert!(c.contains("10.255.1.2".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
    assert!(Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("8.8.8.8".parse().unwrap()));
    assert!(!Cidr::parse("fd00::/8")
        .unwrap()
        .contains("10.0.0.1".parse().unwrap()));
}
