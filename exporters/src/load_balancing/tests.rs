use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tailweave_core::config::parse;
use tailweave_core::ebpf::EbpfSpan;
use tailweave_core::proto::tonic::trace::v1::Span as ProtoSpan;
use tailweave_core::{ExportError, Scope, Span, SpanBatch, SpanSource, TraceId};

use super::ring::{hash, Ring};
use super::router::{AssociationConfig, Router};
use super::*;
use crate::queue::{Accepted, DiskConfig, QueueConfig, RetryConfig};

fn span(trace: u64, sid: u64) -> Span {
    let mut t = [0u8; 16];
    t[8..].copy_from_slice(&trace.to_be_bytes());
    t[0] = 1;
    Span::from_proto(
        Arc::new(Scope::default()),
        &ProtoSpan {
            trace_id: t.to_vec(),
            span_id: sid.to_be_bytes().to_vec(),
            name: format!("s{sid}"),
            ..Default::default()
        },
    )
}

fn tid(trace: u64) -> TraceId {
    span(trace, 1).trace_id
}

/// An eBPF span: with `trace` it names its trace, without it carries only its keys.
fn ebpf(trace: Option<u64>, sid: u64, syscall: u64, seq: u32) -> Span {
    let mut s = span(0xdead_0000 + sid, sid);
    s.source = SpanSource::Ebpf;
    s.ebpf = Some(Box::new(EbpfSpan {
        row_id: sid,
        trace_key: trace.map(|t| tid(t).0),
        agent: "node-a".into(),
        syscall_req: syscall,
        req_tcp_seq: seq,
        ..Default::default()
    }));
    s
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{}:4317", i + 1)).collect()
}

fn up(_: usize) -> bool {
    false
}

/// Backend index per span id.
fn placement(routed: &[Vec<Span>]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for (i, spans) in routed.iter().enumerate() {
        for s in spans {
            m.insert(s.span_id.as_u64(), i);
        }
    }
    m
}

#[test]
fn config_in_collector_syntax() {
    let c: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            r#"
routing_key: traceID
protocol:
  otlp:
    tls: {insecure: true}
    timeout: 2s
    sending_queue: {queue_size: 50}
resolver:
  static:
    hostnames: [gw-0.gw:4317, gw-1.gw, "http://10.0.0.3:5317"]
"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(c.validate().is_empty(), "{:?}", c.validate());
    assert_eq!(
        c.endpoints(),
        vec!["gw-0.gw:4317", "gw-1.gw:4317", "10.0.0.3:5317"]
    );
    let d: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            r#"
protocol: {otlp: {tls: {insecure: true}}}
resolver:
  dns: {hostname: tailweave-gateway.observability.svc.cluster.local, port: 4317, interval: 2s, timeout: 500ms}
"#,
        )
        .unwrap(),
    )
    .unwrap();
    assert!(d.validate().is_empty(), "{:?}", d.validate());
    assert_eq!(
        d.endpoints(),
        vec!["tailweave-gateway.observability.svc.cluster.local:4317"]
    );
    assert_eq!(
        d.resolver.dns.as_ref().unwrap().interval,
        Duration::from_secs(2)
    );
}

#[test]
fn validate_reports_every_problem_with_its_path() {
    let bad: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            r#"
routing_key: service
protocol: {otlp: {endpoint: "x:1", sending_queue: {queue_size: 0}}}
resolver:
  static: {hostnames: ["", "a/b"]}
  dns: {hostname: "x:80", port: 0, interval: 0s}
association: {max_entries: 0, wait: 60s}
"#,
        )
        .unwrap(),
    )
    .unwrap();
    let paths: Vec<String> = bad.validate().into_iter().map(|i| i.path).collect();
    for want in [
        "routing_key",
        "protocol.otlp.endpoint",
        "protocol.otlp.sending_queue.queue_size",
        "resolver",
        "association.max_entries",
        "association.wait",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "missing {want} in {paths:?}"
        );
    }
    let dns: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "protocol: {otlp: {tls: {insecure: true}}}\nresolver: {dns: {hostname: 'x:80', port: 0, interval: 0s}}",
        )
        .unwrap(),
    )
    .unwrap();
    let paths: Vec<String> = dns.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        vec![
            "resolver.dns.hostname",
            "resolver.dns.port",
            "resolver.dns.interval"
        ]
    );
    let st: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "protocol: {otlp: {tls: {insecure: true}}}\nresolver: {static: {hostnames: ['', 'a/b', 'ok']}}",
        )
        .unwrap(),
    )
    .unwrap();
    let paths: Vec<String> = st.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(
        paths,
        vec![
            "resolver.static.hostnames[0]",
            "resolver.static.hostnames[1]"
        ]
    );
    assert!(parse::<LoadBalancingExporterConfig>(
        serde_yaml::from_str("resolver: {k8s: {service: x}}").unwrap()
    )
    .is_err());
}

#[test]
fn every_span_of_a_trace_goes_to_its_owner() {
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let now = Instant::now();
    let spans: Vec<Span> = (0..300u64)
        .flat_map(|t| (0..4u64).map(move |k| span(t, t * 10 + k + 1)))
        .collect();
    let routed = r.route(now, spans, &up);
    let at = placement(&routed);
    let ring = Ring::new(&names(3));
    for t in 0..300u64 {
        let owner = ring.owner(hash(&tid(t).0)).unwrap();
        for k in 0..4 {
            assert_eq!(at[&(t * 10 + k + 1)], owner, "trace {t}");
        }
    }
    // Every backend got some traces.
    assert!(routed.iter().all(|v| !v.is_empty()));
    assert_eq!(r.stats.by_trace, 1200);
}

#[test]
fn ebpf_span_without_trace_follows_a_trace_seen_with_its_key() {
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let now = Instant::now();
    // Same batch: the c-p row naming trace 7 comes after the MySQL row sharing its syscall id.
    let routed = r.route(
        now,
        vec![
            ebpf(None, 2, 555, 0),
            ebpf(Some(7), 1, 555, 9001),
            span(7, 3),
        ],
        &up,
    );
    let at = placement(&routed);
    assert_eq!(at[&1], at[&3]);
    assert_eq!(at[&2], at[&3], "placed with its trace");
    // A network row sharing only the TCP sequence number, in a later batch.
    let at2 = placement(&r.route(now, vec![ebpf(None, 4, 0, 9001)], &up));
    assert_eq!(at2[&4], at[&3]);
    assert_eq!(r.stats.associated, 2);
    assert_eq!(r.stats.by_key, 0);
}

#[test]
fn a_span_placed_through_a_key_teaches_its_other_keys() {
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let now = Instant::now();
    // The MySQL server's s-p row (TCP seq only) comes first, then the shop's c-p MySQL row
    // (same TCP seq, same syscall id as the keyed call), then the keyed call itself.
    let routed = r.route(
        now,
        vec![
            ebpf(None, 3, 0, 4711),
            ebpf(None, 2, 99, 4711),
            ebpf(Some(5), 1, 99, 0),
        ],
        &up,
    );
    let at = placement(&routed);
    assert_eq!(at.len(), 3, "nothing waits");
    assert_eq!(at[&2], at[&1]);
    assert_eq!(at[&3], at[&1]);
    assert_eq!(r.stats.associated, 2);
    // A row sharing only that TCP seq, later: the index learned it from the placed row.
    let at2 = placement(&r.route(now, vec![ebpf(None, 4, 0, 4711)], &up));
    assert_eq!(at2[&4], at[&1]);
}

#[test]
fn a_waiting_span_is_placed_when_its_trace_shows_up() {
    let cfg = AssociationConfig {
        wait: Duration::from_secs(1),
        ..Default::default()
    };
    let mut r = Router::new(&names(3), cfg);
    let t0 = Instant::now();
    let first = r.route(t0, vec![ebpf(None, 2, 777, 0)], &up);
    assert!(first.iter().all(|v| v.is_empty()), "it waits");
    assert_eq!(r.pending(), 1);
    let later = r.route(
        t0 + Duration::from_millis(300),
        vec![ebpf(Some(11), 1, 777, 0)],
        &up,
    );
    let at = placement(&later);
    assert_eq!(at[&2], at[&1]);
    assert_eq!(r.pending(), 0);
    assert_eq!(r.stats.associated, 1);
}

#[test]
fn an_unplaceable_span_goes_by_its_key_after_the_wait_and_is_counted() {
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let t0 = Instant::now();
    // Two rows sharing a syscall id nobody names: they wait, then meet on one backend.
    r.route(
        t0,
        vec![ebpf(None, 1, 4242, 0), ebpf(None, 2, 4242, 0)],
        &up,
    );
    let early = r.tick(t0 + Duration::from_millis(999), &up);
    assert!(early.iter().all(|v| v.is_empty()));
    let out = r.tick(t0 + Duration::from_secs(1), &up);
    let at = placement(&out);
    assert_eq!(at.len(), 2);
    assert_eq!(at[&1], at[&2]);
    assert_eq!(r.stats.by_key, 2);
    assert_eq!(r.pending(), 0);
}

#[test]
fn the_wait_buffer_and_the_index_are_bounded() {
    let cfg = AssociationConfig {
        max_pending: 3,
        max_entries: 4,
        ttl: Duration::from_secs(10),
        ..Default::default()
    };
    let mut r = Router::new(&names(2), cfg);
    let t0 = Instant::now();
    let spans: Vec<Span> = (1..=5).map(|i| ebpf(None, i, 100 + i, 0)).collect();
    let out = r.route(t0, spans, &up);
    assert_eq!(r.pending(), 3);
    assert_eq!(out.iter().map(|v| v.len()).sum::<usize>(), 2);
    assert_eq!(r.stats.by_key_overflow, 2);
    // Ten keyed rows with two keys each: the index keeps the newest four keys.
    let keyed: Vec<Span> = (10..20)
        .map(|i| ebpf(Some(i), i, 1000 + i, i as u32))
        .collect();
    r.route(t0, keyed, &up);
    assert_eq!(r.index_len(), 4);
    // Entries expire after the ttl.
    r.tick(t0 + Duration::from_secs(10), &up);
    assert_eq!(r.index_len(), 0);
}

#[test]
fn a_down_owner_gives_its_traces_to_the_next_on_the_ring() {
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let now = Instant::now();
    let spans = |base: u64| -> Vec<Span> { (0..200u64).map(|t| span(t, base + t)).collect() };
    let normal = placement(&r.route(now, spans(1000), &up));
    let down = 1usize;
    let failed = placement(&r.route(now, spans(2000), &|i| i == down));
    let ring = Ring::new(&names(3));
    let mut moved = 0;
    for t in 0..200u64 {
        let before = normal[&(1000 + t)];
        let after = failed[&(2000 + t)];
        if before == down {
            moved += 1;
            let succ = ring.owner_where(hash(&tid(t).0), |n| n != down).unwrap();
            assert_eq!(after, succ);
        } else {
            assert_eq!(after, before, "a trace of a healthy backend moved");
        }
    }
    assert!(moved > 0);
    assert_eq!(r.stats.rerouted, moved);
}

// --- the driver, with fake backends and paused time ---

#[derive(Default)]
struct Fakes {
    got: Mutex<HashMap<String, Vec<u64>>>,
    failing: Mutex<Vec<String>>,
    probes: Mutex<HashMap<String, u64>>,
    /// Non-empty sends, failed or not.
    attempts: Mutex<HashMap<String, u64>>,
}

struct FakeDest {
    name: String,
    fakes: Arc<Fakes>,
}

#[async_trait]
impl Destination for FakeDest {
    async fn send(&self, spans: &[Span]) -> Result<Accepted, ExportError> {
        if spans.is_empty() {
            *self
                .fakes
                .probes
                .lock()
                .unwrap()
                .entry(self.name.clone())
                .or_default() += 1;
        }
        if !spans.is_empty() {
            *self
                .fakes
                .attempts
                .lock()
                .unwrap()
                .entry(self.name.clone())
                .or_default() += 1;
        }
        if self.fakes.failing.lock().unwrap().contains(&self.name) {
            return Err(ExportError::retryable(format!("{} is down", self.name)));
        }
        let mut g = self.fakes.got.lock().unwrap();
        g.entry(self.name.clone())
            .or_default()
            .extend(spans.iter().map(|s| s.trace_id.low_u64()));
        Ok(Accepted::default())
    }
}

fn settings() -> ExportSettings {
    ExportSettings {
        timeout: Duration::from_secs(1),
        retry: RetryConfig {
            initial_interval: Duration::from_millis(200),
            max_interval: Duration::from_millis(400),
            max_elapsed_time: Duration::ZERO,
            randomization_factor: 0.0,
            ..Default::default()
        },
        queue: QueueConfig {
            enabled: true,
            num_consumers: 2,
            queue_size: 100,
        },
    }
}

fn make(fakes: &Arc<Fakes>) -> MakeDest {
    let fakes = fakes.clone();
    Arc::new(move |name: &str| {
        Ok(Arc::new(FakeDest {
            name: name.to_string(),
            fakes: fakes.clone(),
        }) as Arc<dyn Destination>)
    })
}

/// Backend name per trace (low 64 bits of its id).
fn owners(fakes: &Fakes) -> HashMap<u64, Vec<String>> {
    let mut m: HashMap<u64, Vec<String>> = HashMap::new();
    for (b, traces) in fakes.got.lock().unwrap().iter() {
        for t in traces {
            let v = m.entry(*t).or_default();
            if !v.contains(b) {
                v.push(b.clone());
            }
        }
    }
    m
}

async fn send_traces(tx: &mpsc::Sender<SpanBatch>, traces: std::ops::Range<u64>) {
    let spans: Vec<Span> = traces
        .flat_map(|t| (0..3u64).map(move |k| span(t, t * 10 + k + 1)))
        .collect();
    tx.send(SpanBatch::new(spans)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn driver_sends_whole_traces_to_static_backends_and_drains_on_close() {
    let fakes = Arc::new(Fakes::default());
    let ex = spawn(
        "loadbalancing",
        settings(),
        Duration::from_secs(5),
        AssociationConfig::default(),
        Resolve::Static(names(3)),
        make(&fakes),
    );
    send_traces(&ex.input, 0..100).await;
    drop(ex.input);
    ex.done.await.unwrap();
    let o = owners(&fakes);
    assert_eq!(o.len(), 100);
    let ring = Ring::new(&names(3));
    for (t, b) in &o {
        assert_eq!(b.len(), 1, "trace {t} split over {b:?}");
        let mut id = [0u8; 16];
        id[0] = 1;
        id[8..].copy_from_slice(&t.to_be_bytes());
        assert_eq!(b[0], ring.nodes()[ring.owner(hash(&id)).unwrap()]);
    }
    let total: usize = fakes.got.lock().unwrap().values().map(|v| v.len()).sum();
    assert_eq!(total, 300);
}

#[tokio::test(start_paused = true)]
async fn driver_reroutes_a_down_backend_after_the_delay_and_returns_when_it_is_back() {
    let fakes = Arc::new(Fakes::default());
    let after = Duration::from_secs(5);
    let ex = spawn(
        "loadbalancing",
        settings(),
        after,
        AssociationConfig::default(),
        Resolve::Static(names(3)),
        make(&fakes),
    );
    let victim = names(3)[0].clone();
    fakes.failing.lock().unwrap().push(victim.clone());
    // Before the delay: the victim's traces stay with it (its queue retries them).
    send_traces(&ex.input, 0..60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got_before = fakes
        .got
        .lock()
        .unwrap()
        .get(&victim)
        .map_or(0, |v| v.len());
    assert_eq!(got_before, 0);
    // After the delay, new traces owned by the victim go to their successors.
    tokio::time::sleep(after).await;
    send_traces(&ex.input, 100..160).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ring = Ring::new(&names(3));
    let o = owners(&fakes);
    let mut rerouted = 0;
    for t in 100..160u64 {
        let mut id = [0u8; 16];
        id[0] = 1;
        id[8..].copy_from_slice(&t.to_be_bytes());
        let owner = &ring.nodes()[ring.owner(hash(&id)).unwrap()];
        let got = &o[&t];
        assert_eq!(got.len(), 1);
        if owner == &victim {
            rerouted += 1;
            assert_ne!(&got[0], &victim);
        } else {
            assert_eq!(&got[0], owner);
        }
    }
    assert!(rerouted > 0, "the victim owned none of the traces");
    // Probes ran while it was down.
    assert!(
        fakes
            .probes
            .lock()
            .unwrap()
            .get(&victim)
            .copied()
            .unwrap_or(0)
            > 0
    );
    // Back up: the probe sees it, its queued traces are delivered, and new traces return to it.
    fakes.failing.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    send_traces(&ex.input, 200..260).await;
    drop(ex.input);
    ex.done.await.unwrap();
    let o = owners(&fakes);
    for t in (0..60u64).chain(200..260) {
        let mut id = [0u8; 16];
        id[0] = 1;
        id[8..].copy_from_slice(&t.to_be_bytes());
        let owner = &ring.nodes()[ring.owner(hash(&id)).unwrap()];
        assert_eq!(o[&t], vec![owner.clone()], "trace {t}");
    }
}

#[tokio::test(start_paused = true)]
async fn dns_re_resolution_moves_only_the_traces_whose_owner_changed() {
    let fakes = Arc::new(Fakes::default());
    let answer: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(names(2)));
    let a2 = answer.clone();
    let lookup: Lookup = Arc::new(move |_h: String, _p: u16| {
        let v = a2.lock().unwrap().clone();
        Box::pin(async move { Ok(v) })
    });
    let ex = spawn(
        "loadbalancing",
        settings(),
        Duration::from_secs(30),
        AssociationConfig::default(),
        Resolve::Dns {
            hostname: "gw".into(),
            port: 4317,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            lookup,
        },
        make(&fakes),
    );
    send_traces(&ex.input, 0..300).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = owners(&fakes);
    assert_eq!(before.len(), 300);
    // The headless Service grows by one pod.
    *answer.lock().unwrap() = names(3);
    tokio::time::sleep(Duration::from_secs(6)).await;
    fakes.got.lock().unwrap().clear();
    send_traces(&ex.input, 0..300).await;
    drop(ex.input);
    ex.done.await.unwrap();
    let after = owners(&fakes);
    let added = &names(3)[2];
    let mut moved = 0;
    for t in 0..300u64 {
        let (b, a) = (&before[&t][0], &after[&t][0]);
        if b != a {
            moved += 1;
            assert_eq!(a, added, "trace {t} moved between old backends");
        }
    }
    let frac = moved as f64 / 300.0;
    assert!((0.15..0.5).contains(&frac), "moved {frac}");
}

// --- affinity ---

fn with_affinity(n: usize, ttl: Duration, max_traces: usize) -> Router {
    Router::new(&names(n), AssociationConfig::default())
        .with_affinity(AffinityConfig { ttl, max_traces })
}

/// The ring's owner of trace `t` among `n` backends.
fn ring_owner(n: usize, t: u64) -> usize {
    Ring::new(&names(n)).owner(hash(&tid(t).0)).unwrap()
}

#[test]
fn affinity_keeps_a_trace_on_its_first_backend_while_its_owner_goes_down_and_comes_back() {
    let mut r = with_affinity(3, Duration::from_secs(30), 1000);
    let t0 = Instant::now();
    let victim = 1usize;
    let is_victim = |i: usize| i == victim;
    let owned: Vec<u64> = (0..300u64)
        .filter(|t| ring_owner(3, *t) == victim)
        .collect();
    assert!(!owned.is_empty());
    // First spans while the victim is up: queued there.
    r.route(t0, (0..300).map(|t| span(t, 10_000 + t)).collect(), &up);
    // It goes down: the later spans of those traces still go to it, where their first spans wait.
    let later = placement(&r.route(
        t0 + Duration::from_secs(2),
        (0..300).map(|t| span(t, 20_000 + t)).collect(),
        &is_victim,
    ));
    for t in 0..300u64 {
        assert_eq!(later[&(20_000 + t)], ring_owner(3, t), "trace {t} split");
    }
    assert_eq!(r.stats.affinity, owned.len() as u64);
    assert_eq!(r.stats.rerouted, 0);
    // New traces while it is down go to the successors, and stay there when it is back.
    let fresh: Vec<u64> = (1000..1300u64).collect();
    let first = placement(&r.route(
        t0 + Duration::from_secs(3),
        fresh.iter().map(|t| span(*t, 30_000 + t)).collect(),
        &is_victim,
    ));
    let moved = fresh
        .iter()
        .filter(|t| ring_owner(3, **t) == victim)
        .count() as u64;
    assert!(moved > 0);
    assert_eq!(r.stats.rerouted, moved);
    let back = placement(&r.route(
        t0 + Duration::from_secs(4),
        fresh.iter().map(|t| span(*t, 40_000 + t)).collect(),
        &up,
    ));
    for t in &fresh {
        assert_eq!(back[&(40_000 + t)], first[&(30_000 + t)], "trace {t} split");
        assert_ne!(back[&(40_000 + t)], victim);
    }
    assert_eq!(r.stats.affinity, owned.len() as u64 + moved);
    assert_eq!(r.stats.rerouted, 2 * moved);
    // Past the ttl (from each trace's first span) the ring decides again.
    let after = placement(&r.route(
        t0 + Duration::from_secs(33),
        fresh.iter().map(|t| span(*t, 50_000 + t)).collect(),
        &up,
    ));
    for t in &fresh {
        assert_eq!(after[&(50_000 + t)], ring_owner(3, *t));
    }
    assert_eq!(r.affinity_len(), fresh.len());
}

#[test]
fn without_affinity_a_switch_splits_the_traces_in_flight() {
    // The behaviour affinity exists for, so the test above cannot pass by accident.
    let mut r = Router::new(&names(3), AssociationConfig::default());
    let t0 = Instant::now();
    r.route(t0, (0..300).map(|t| span(t, 10_000 + t)).collect(), &up);
    let later = placement(
        &r.route(t0, (0..300).map(|t| span(t, 20_000 + t)).collect(), &|i| {
            i == 1
        }),
    );
    let split = (0..300u64)
        .filter(|t| later[&(20_000 + t)] != ring_owner(3, *t))
        .count();
    assert!(split > 0);
    assert_eq!(r.affinity_len(), 0);
}

#[test]
fn a_forced_reroute_moves_the_trace_and_its_later_spans_follow() {
    let mut r = with_affinity(3, Duration::from_secs(30), 1000);
    let t0 = Instant::now();
    let t = (0..100u64).find(|t| ring_owner(3, *t) == 0).unwrap();
    let first = r.route(t0, vec![span(t, 1)], &up);
    assert_eq!(placement(&first)[&1], 0);
    // Backend 0's queue refused a batch while it was down: the spans go to the successor.
    let moved = placement(&r.reroute(t0, vec![span(t, 2)], 0, &up));
    let succ = Ring::new(&names(3))
        .owner_where(hash(&tid(t).0), |n| n != 0)
        .unwrap();
    assert_eq!(moved[&2], succ);
    // Backend 0 is fine again, but the trace now lives at the successor.
    let later = placement(&r.route(t0, vec![span(t, 3)], &up));
    assert_eq!(later[&3], succ);
}

#[test]
fn affinity_survives_a_ring_change_for_backends_that_stay_and_is_bounded() {
    let mut r = with_affinity(2, Duration::from_secs(30), 1000);
    let t0 = Instant::now();
    let first = placement(&r.route(t0, (0..300).map(|t| span(t, 10_000 + t)).collect(), &up));
    // A third backend joins: traces in flight stay; new ones use the new ring.
    r.set_backends(&names(3));
    let later = placement(&r.route(t0, (0..300).map(|t| span(t, 20_000 + t)).collect(), &up));
    let b = names(3);
    let a = names(2);
    for t in 0..300u64 {
        assert_eq!(
            b[later[&(20_000 + t)]],
            a[first[&(10_000 + t)]],
            "trace {t} moved"
        );
    }
    let fresh = placement(&r.route(t0, (1000..1300).map(|t| span(t, t)).collect(), &up));
    assert!(fresh.iter().all(|(sid, at)| *at == ring_owner(3, *sid)));
    // The first backend leaves: its traces go where the new ring says.
    r.set_backends(&b[1..]);
    let gone = placement(&r.route(t0, (0..300).map(|t| span(t, 30_000 + t)).collect(), &up));
    let ring = Ring::new(&b[1..]);
    for t in 0..300u64 {
        if a[first[&(10_000 + t)]] == b[0] {
            assert_eq!(gone[&(30_000 + t)], ring.owner(hash(&tid(t).0)).unwrap());
        }
    }
    // At most max_traces are remembered.
    let mut small = with_affinity(3, Duration::from_secs(30), 50);
    small.route(t0, (0..300).map(|t| span(t, t + 1)).collect(), &up);
    assert_eq!(small.affinity_len(), 50);
}

#[test]
fn affinity_config_parses_and_is_checked() {
    let c: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "resolver: {static: {hostnames: [a]}}\naffinity: {ttl: 10s, max_traces: 0}",
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.affinity.ttl, Duration::from_secs(10));
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(paths, ["affinity.max_traces"]);
    let off: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "resolver: {static: {hostnames: [a]}}\naffinity: {ttl: 0s, max_traces: 0}",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(off.validate().is_empty());
    assert!(!off.affinity.enabled());
    let d: LoadBalancingExporterConfig =
        parse(serde_yaml::from_str("resolver: {static: {hostnames: [a]}}").unwrap()).unwrap();
    assert_eq!(d.affinity, AffinityConfig::default());
    assert!(d.affinity.enabled());
    assert!(parse::<LoadBalancingExporterConfig>(
        serde_yaml::from_str("resolver: {static: {hostnames: [a]}}\naffinity: {sticky: true}")
            .unwrap()
    )
    .is_err());
}

// --- persistent per-backend queues ---

/// Runs `f` on a runtime of its own, then drops the runtime with every task still on it: the
/// queues stop where they are, as when the process is killed.
fn life<T>(f: impl std::future::Future<Output = T>) -> T {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(f);
    // Lets an fsync in flight finish; the async tasks are dropped.
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

fn on_disk(dir: &std::path::Path) -> Settings {
    Settings {
        export: settings(),
        // Never re-route: a failing backend keeps its traces in its queue.
        reroute_after: Duration::ZERO,
        association: AssociationConfig::default(),
        affinity: AffinityConfig::default(),
        disk: Some(DiskConfig {
            directory: dir.join("loadbalancing"),
            max_bytes: 1 << 20,
        }),
    }
}

/// Polls `cond` for up to 10 s of real time.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// First life: every backend fails, 100 traces are queued on disk, then the process "dies".
fn queue_and_die(dir: &std::path::Path, fakes: &Arc<Fakes>) {
    *fakes.failing.lock().unwrap() = names(3);
    life(async {
        let ex = spawn_with(
            "loadbalancing",
            on_disk(dir),
            Resolve::Static(names(3)),
            make(fakes),
        );
        send_traces(&ex.input, 0..100).await;
        // A failed attempt means the batch was read back, so it was on disk.
        let all_tried = eventually(|| {
            let a = fakes.attempts.lock().unwrap();
            names(3).iter().all(|n| a.get(n).copied().unwrap_or(0) > 0)
        })
        .await;
        assert!(all_tried, "not every backend got its batch");
        // The runtime is dropped with `ex` running: nothing drains, nothing is acknowledged.
        std::mem::forget(ex.input);
    });
    assert!(fakes.got.lock().unwrap().is_empty());
    fakes.failing.lock().unwrap().clear();
}

fn owner_name(n: &[String], t: u64) -> String {
    let ring = Ring::new(n);
    ring.nodes()[ring.owner(hash(&tid(t).0)).unwrap()].clone()
}

#[test]
fn persistent_backend_queues_deliver_after_a_crash_to_each_traces_owner() {
    let dir = tempfile::tempdir().unwrap();
    let fakes = Arc::new(Fakes::default());
    queue_and_die(dir.path(), &fakes);
    // One directory per backend, naming it.
    let mut named: Vec<String> = std::fs::read_dir(dir.path().join("loadbalancing"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path().join(backend::NAME_FILE)).unwrap())
        .collect();
    named.sort();
    assert_eq!(named, names(3));
    // Second life, every backend answering: the queued traces are delivered, each to its owner.
    life(async {
        let ex = spawn_with(
            "loadbalancing",
            on_disk(dir.path()),
            Resolve::Static(names(3)),
            make(&fakes),
        );
        drop(ex.input);
        ex.done.await.unwrap();
    });
    let o = owners(&fakes);
    assert_eq!(o.len(), 100);
    for t in 0..100u64 {
        assert_eq!(o[&t], vec![owner_name(&names(3), t)], "trace {t}");
    }
    let total: usize = fakes.got.lock().unwrap().values().map(|v| v.len()).sum();
    assert_eq!(total, 300, "lost or duplicated");
    // Delivered and acknowledged: a third life sends nothing.
    fakes.got.lock().unwrap().clear();
    life(async {
        let ex = spawn_with(
            "loadbalancing",
            on_disk(dir.path()),
            Resolve::Static(names(3)),
            make(&fakes),
        );
        drop(ex.input);
        ex.done.await.unwrap();
    });
    assert!(fakes.got.lock().unwrap().is_empty());
}

#[test]
fn a_restart_drains_the_queue_of_a_backend_no_longer_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let fakes = Arc::new(Fakes::default());
    queue_and_die(dir.path(), &fakes);
    let gone = names(3)[2].clone();
    let kept = names(3)[..2].to_vec();
    let gone_traces: Vec<u64> = (0..100u64)
        .filter(|t| owner_name(&names(3), *t) == gone)
        .collect();
    assert!(!gone_traces.is_empty());
    life(async {
        let ex = spawn_with(
            "loadbalancing",
            on_disk(dir.path()),
            Resolve::Static(kept.clone()),
            make(&fakes),
        );
        // New traces use the two-backend ring.
        send_traces(&ex.input, 1000..1100).await;
        drop(ex.input);
        ex.done.await.unwrap();
    });
    let o = owners(&fakes);
    for t in 0..100u64 {
        // Owed to the backend they were queued for, which is drained though no longer resolved.
        assert_eq!(o[&t], vec![owner_name(&names(3), t)], "trace {t}");
    }
    for t in 1000..1100u64 {
        assert_eq!(o[&t], vec![owner_name(&kept, t)], "trace {t}");
    }
    assert_eq!(
        fakes.got.lock().unwrap()[&gone].len(),
        gone_traces.len() * 3
    );
}

#[test]
fn sending_queue_on_disk_is_checked_under_protocol_otlp() {
    let c: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "protocol: {otlp: {sending_queue: {storage: file}}}\nresolver: {static: {hostnames: [a]}}",
        )
        .unwrap(),
    )
    .unwrap();
    let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
    assert_eq!(paths, ["protocol.otlp.sending_queue.directory"]);
    let ok: LoadBalancingExporterConfig = parse(
        serde_yaml::from_str(
            "protocol: {otlp: {sending_queue: {storage: file, directory: /var/lib/tw, max_size_mib: 64}}}\nresolver: {static: {hostnames: [a]}}",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(ok.validate().is_empty());
    let d = ok
        .protocol
        .otlp
        .sending_queue
        .disk("loadbalancing")
        .unwrap();
    assert_eq!(
        d.child("10.0.0.1:4317").directory,
        std::path::Path::new("/var/lib/tw/loadbalancing/10.0.0.1_4317")
    );
    assert_eq!(d.child("10.0.0.1:4317").max_bytes, 64 << 20);
}

#[tokio::test]
async fn a_backend_back_while_its_old_queue_drains_gets_a_directory_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let fakes = Arc::new(Fakes::default());
    let s = on_disk(dir.path());
    let root = s.disk.clone().unwrap();
    let mut d = Driver {
        id: "loadbalancing".into(),
        router: Router::new(&[], AssociationConfig::default()),
        backends: Vec::new(),
        retired: Vec::new(),
        settings: s.export,
        make: make(&fakes),
        reroute_after: Duration::ZERO,
        published: RouterStats::default(),
        disk: s.disk,
        orphans_checked: true,
    };
    let name = names(1)[0].clone();
    let first = d.start_backend(&name).unwrap();
    assert_eq!(first.queue_dir, Some(root.child(&name).directory));
    // Removed while its queue still drains (a task that does not end stands for the drain).
    drop(first.input);
    let draining = tokio::spawn(std::future::pending::<()>());
    d.retired.push((first.queue_dir.clone(), draining));
    let again = d.start_backend(&name).unwrap();
    assert_eq!(
        again.queue_dir,
        Some(root.child(&format!("{name}#1")).directory)
    );
    // Both name the backend, so a restart drains both to it.
    for q in [&first.queue_dir, &again.queue_dir] {
        let f = q.as_ref().unwrap().join(backend::NAME_FILE);
        assert_eq!(std::fs::read_to_string(f).unwrap(), name);
    }
    // Once the old queue has drained, its directory is used again.
    first.done.await.unwrap();
    let (_, h) = d.retired.pop().unwrap();
    h.abort();
    let _ = h.await;
    d.retired
        .push((first.queue_dir.clone(), tokio::spawn(async {})));
    tokio::task::yield_now().await;
    while !d.retired.iter().all(|(_, h)| h.is_finished()) {
        tokio::task::yield_now().await;
    }
    drop(again.input);
    again.done.await.unwrap();
    let third = d.start_backend(&name).unwrap();
    assert_eq!(third.queue_dir, Some(root.child(&name).directory));
}
