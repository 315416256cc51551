//! The pure, seeded scenario generator.
//!
//! [`Generator`] yields [`GeneratedTrace`]s: the SDK spans the services export, the DeepFlow rows
//! the eBPF agents export for the same requests, and the ground truth the join should produce.
//! Everything comes from one seeded PRNG, so a seed gives the same traces on every run.
//!
//! - [`ScenarioKind::Game`]: a game backend, see `game.rs` for the topology and the join rules
//!   its expected tree relies on.
//! - [`ScenarioKind::Sdk`]: SDK-only traces of N spans, for throughput benches.

mod game;
pub mod model;
mod sdk;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tailweave_core::proto::tonic::common::v1::KeyValue;
use tailweave_core::proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tailweave_core::span::hex;
use tailweave_core::ConfigIssue;

use super::rng::Rng;
use super::truth::{Source, SpanTruth, TraceTruth};
use super::wire::Encoded;
use model::{fake_trace_id, response_status, Pod, Row, HOSTS, STATUS_ERROR};

/// Which workload to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// Player client -> nginx -> api gateway -> login / shop / payment -> MySQL / Redis, with SDK
    /// spans and DeepFlow rows.
    Game,
    /// SDK-only traces of `sdk_spans` spans (a server root with nested client/internal children).
    Sdk,
}

/// What to generate. Rates are per trace; `error_rate`, `slow_rate` and `timeout_rate` pick
/// disjoint sets of traces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioConfig {
    /// The workload. Default `game`.
    pub scenario: ScenarioKind,
    /// Traces [`generate`] returns. Default 100.
    pub traces: usize,
    /// Spans per trace in the `sdk` scenario. Default 10.
    pub sdk_spans: usize,
    /// Fraction of traces with an error: in `game`, half a declined payment (SDK error), half a
    /// MySQL error seen only by eBPF under a successful SDK span. Default 0.01.
    pub error_rate: f64,
    /// Fraction of traces with a slow query (seen only by eBPF in `game`). Default 0.01.
    pub slow_rate: f64,
    /// Fraction of `game` traces whose shop -> payment call times out: a request-only `c-p` row
    /// and no response. Default 0.005.
    pub timeout_rate: f64,
    /// Fraction of `game` traces in which one `s-p` row arrives split into request-only and
    /// response-only rows. Default 0.1.
    pub split_rate: f64,
    /// Number of tenants (namespaces `game-0`, `game-1`, ...); a trace stays in one. Default 1.
    pub tenants: usize,
    /// Each host's clock is off by a fixed amount drawn in `[-clock_skew_ms, +clock_skew_ms]`.
    /// Default 0.
    pub clock_skew_ms: u64,
    /// Each DeepFlow row is delivered a delay drawn in `[0, ebpf_delay_ms]` after the trace's SDK
    /// spans. Default 2000.
    pub ebpf_delay_ms: u64,
    /// Shuffle the order of spans within each service's export and of the rows. Default true.
    pub shuffle: bool,
    /// Traces longer than this are `slow` in the truth. Default 500.
    pub slow_threshold_ms: u64,
    /// Start of the first trace, Unix ns. Default 2025-12-01T00:00:00Z.
    pub start_unix_nano: u64,
    /// Time between the starts of consecutive traces, µs. Default 1000.
    pub trace_interval_us: u64,
    /// Most spans an SDK puts in one ResourceSpans; a service's spans of one trace are split
    /// into several, as a batching exporter flushes between them. Default 4.
    pub sdk_spans_per_resource: usize,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            scenario: ScenarioKind::Game,
            traces: 100,
            sdk_spans: 10,
            error_rate: 0.01,
            slow_rate: 0.01,
            timeout_rate: 0.005,
            split_rate: 0.1,
            tenants: 1,
            clock_skew_ms: 0,
            ebpf_delay_ms: 2000,
            shuffle: true,
            slow_threshold_ms: 500,
            start_unix_nano: 1_764_547_200_000_000_000,
            trace_interval_us: 1000,
            sdk_spans_per_resource: 4,
        }
    }
}

/// `telemetry.sdk.version` of the DeepFlow rows.
const DEEPFLOW_VERSION: &str = "v7.0.1";

/// Tenant count limit: pod IPs and pids are unique per (tenant, service) up to it.
pub const MAX_TENANTS: usize = 65_536;

impl ScenarioConfig {
    /// Every problem, each with its key.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        for (k, v) in [
            ("error_rate", self.error_rate),
            ("slow_rate", self.slow_rate),
            ("timeout_rate", self.timeout_rate),
            ("split_rate", self.split_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                out.push(ConfigIssue::new(
                    k,
                    format!("must be within 0..=1, got {v}"),
                ));
            }
        }
        if self.error_rate + self.slow_rate + self.timeout_rate > 1.0 {
            out.push(ConfigIssue::new(
                "error_rate",
                "error_rate + slow_rate + timeout_rate must not exceed 1",
            ));
        }
        if self.tenants == 0 || self.tenants > MAX_TENANTS {
            out.push(ConfigIssue::new(
                "tenants",
                format!("must be within 1..={MAX_TENANTS}, got {}", self.tenants),
            ));
        }
        if self.sdk_spans == 0 || self.sdk_spans > 10_000 {
            out.push(ConfigIssue::new(
                "sdk_spans",
                format!("must be within 1..=10000, got {}", self.sdk_spans),
            ));
        }
        if self.sdk_spans_per_resource == 0 {
            out.push(ConfigIssue::new(
                "sdk_spans_per_resource",
                "must be at least 1",
            ));
        }
        if self.clock_skew_ms > 3_600_000 {
            out.push(ConfigIssue::new(
                "clock_skew_ms",
                "must be at most one hour",
            ));
        }
        if self.slow_threshold_ms == 0 {
            out.push(ConfigIssue::new("slow_threshold_ms", "must be positive"));
        }
        // Host clocks may run behind: keep every timestamp positive.
        if self.start_unix_nano < 2 * self.clock_skew_ms * 1_000_000 + 1_000_000_000 {
            out.push(ConfigIssue::new(
                "start_unix_nano",
                "must exceed twice the clock skew plus one second",
            ));
        }
        out
    }
}

/// One generated trace: what is sent and what the join should make of it.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedTrace {
    pub truth: TraceTruth,
    /// SDK spans as the services export them: per service, ResourceSpans of at most
    /// `sdk_spans_per_resource` spans with the service's resource.
    pub sdk: Vec<ResourceSpans>,
    /// DeepFlow rows, one ResourceSpans per row (`ebpf-spans.md` §2.1).
    pub ebpf: Vec<ResourceSpans>,
    /// Per entry of `ebpf`: its delivery delay after the trace's SDK spans.
    pub ebpf_delay: Vec<Duration>,
}

impl GeneratedTrace {
    pub fn sdk_span_count(&self) -> usize {
        span_count(&self.sdk)
    }
    pub fn ebpf_span_count(&self) -> usize {
        span_count(&self.ebpf)
    }
}

/// A generated trace already encoded for sending ([`Generator::next_wire`]): the same spans as
/// [`GeneratedTrace`], without building `opentelemetry-proto` values for the DeepFlow rows.
#[derive(Clone, Debug, PartialEq)]
pub struct WireTrace {
    pub truth: TraceTruth,
    pub sdk: Vec<Encoded>,
    /// Each row with its delivery delay after the trace's SDK spans.
    pub ebpf: Vec<(Encoded, Duration)>,
}

/// Spans in a list of ResourceSpans.
pub fn span_count(rs: &[ResourceSpans]) -> usize {
    rs.iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum()
}

/// `cfg.traces` traces for `seed`. Equal inputs give equal outputs.
pub fn generate(cfg: &ScenarioConfig, seed: u64) -> Vec<GeneratedTrace> {
    let mut g = Generator::new(cfg.clone(), seed);
    (0..cfg.traces).map(|_| g.next_trace()).collect()
}

/// An endless, seeded stream of traces. Counters (row ids, TCP sequence numbers, syscall ids)
/// run across traces, so ids never repeat within a stream.
pub struct Generator {
    cfg: ScenarioConfig,
    rng: Rng,
    index: u64,
    clock_offset_us: [i64; HOSTS.len()],
    syscall_next: [u64; HOSTS.len()],
    seq_next: u32,
    flow_next: u64,
    row_next: u64,
}

impl Generator {
    /// The config should have passed [`ScenarioConfig::validate`]; out-of-range values are
    /// clamped rather than trusted.
    pub fn new(cfg: ScenarioConfig, seed: u64) -> Generator {
        let mut rng = Rng::new(seed);
        let skew = (cfg.clock_skew_ms * 1000) as i64;
        let mut clock_offset_us = [0i64; HOSTS.len()];
        for o in clock_offset_us.iter_mut() {
            *o = rng.range(-skew, skew + 1);
        }
        let mut syscall_next = [0u64; HOSTS.len()];
        for s in syscall_next.iter_mut() {
            // Anywhere in u64: about half the agents write ids above i64::MAX, which arrive
            // negative (`ebpf-spans.md` §6).
            *s = rng.next_u64();
        }
        let seq_next = rng.next_u64() as u32;
        let flow_next = rng.next_u64() >> 8;
        Generator {
            cfg,
            rng,
            index: 0,
            clock_offset_us,
            syscall_next,
            seq_next,
            flow_next,
            row_next: 0,
        }
    }

    pub fn config(&self) -> &ScenarioConfig {
        &self.cfg
    }

    pub fn next_trace(&mut self) -> GeneratedTrace {
        let (truth, sdk, ebpf) = self.build(|rs| rs, |r| r.encode(DEEPFLOW_VERSION));
        let (ebpf, ebpf_delay) = ebpf.into_iter().unzip();
        GeneratedTrace {
            truth,
            sdk,
            ebpf,
            ebpf_delay,
        }
    }

    /// The next trace, encoded: equal to encoding [`Generator::next_trace`]'s output (and it
    /// advances the stream the same way), but much cheaper.
    pub fn next_wire(&mut self) -> WireTrace {
        let (truth, sdk, ebpf) =
            self.build(|rs| Encoded::new(&rs), |r| r.encode_field(DEEPFLOW_VERSION));
        WireTrace { truth, sdk, ebpf }
    }

    /// This stream as encoded traces.
    pub fn wire(mut self) -> impl Iterator<Item = WireTrace> {
        std::iter::from_fn(move || Some(self.next_wire()))
    }

    #[allow(clippy::type_complexity)]
    fn build<S, E>(
        &mut self,
        sdk_enc: impl Fn(ResourceSpans) -> S,
        row_enc: impl Fn(&Row) -> E,
    ) -> (TraceTruth, Vec<S>, Vec<(E, Duration)>) {
        let tenant = self
            .rng
            .below(self.cfg.tenants.clamp(1, MAX_TENANTS) as u64) as usize;
        let base_us = self.cfg.start_unix_nano / 1000 + self.index * self.cfg.trace_interval_us;
        self.index += 1;
        let trace_id = self.rng.trace_id();
        let mut b = TraceBuild {
            g: self,
            tenant,
            trace_id,
            base_us,
            sdk: Vec::new(),
            rows: Vec::new(),
            truth: Vec::new(),
            timed_out: false,
        };
        let case = match b.g.cfg.scenario {
            ScenarioKind::Game => game::build(&mut b),
            ScenarioKind::Sdk => sdk::build(&mut b),
        };
        b.finish(case, sdk_enc, row_enc)
    }

    // Per-stream counters. Each yields values that do not repeat within a stream.

    fn syscall_id(&mut self, host: usize) -> u64 {
        let s = &mut self.syscall_next[host];
        *s = s.wrapping_add(1);
        if *s == 0 {
            *s = 1;
        }
        *s
    }

    /// TCP sequence numbers: a bijection of a counter, so they look random and repeat only
    /// after 2^32 allocations.
    fn tcp_seq(&mut self) -> u32 {
        loop {
            self.seq_next = self.seq_next.wrapping_add(1);
            let v = self.seq_next.wrapping_mul(0x9E37_79B1);
            if v != 0 {
                return v;
            }
        }
    }

    fn flow_id(&mut self) -> u64 {
        self.flow_next = self.flow_next.wrapping_add(1).max(1);
        self.flow_next
    }

    fn row_id(&mut self, end_us: u64) -> u64 {
        let c = self.row_next;
        self.row_next = (self.row_next + 1) & 0xffff_ffff;
        model::row_id(end_us, c)
    }
}

impl Iterator for Generator {
    type Item = GeneratedTrace;
    fn next(&mut self) -> Option<GeneratedTrace> {
        Some(self.next_trace())
    }
}

/// One trace under construction.
pub(crate) struct TraceBuild<'g> {
    g: &'g mut Generator,
    tenant: usize,
    trace_id: [u8; 16],
    /// Start of the trace on the true clock, Unix µs.
    base_us: u64,
    sdk: Vec<(Pod, Span)>,
    rows: Vec<Row>,
    truth: Vec<SpanTruth>,
    timed_out: bool,
}

impl TraceBuild<'_> {
    fn rng(&mut self) -> &mut Rng {
        &mut self.g.rng
    }

    fn cfg(&self) -> &ScenarioConfig {
        &self.g.cfg
    }

    /// A time `t` µs after the trace start as `host`'s clock shows it, Unix µs.
    fn host_us(&self, host: usize, t: i64) -> u64 {
        (self.base_us as i64 + t + self.g.clock_offset_us[host]).max(1) as u64
    }

    /// Records an SDK span of `pod` running from `t0` to `t1` (µs after the trace start, true
    /// clock) and its truth entry.
    #[allow(clippy::too_many_arguments)]
    fn sdk_span(
        &mut self,
        pod: &Pod,
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        name: &str,
        kind: i32,
        (t0, t1): (i64, i64),
        attributes: Vec<KeyValue>,
        status: (i32, &str),
        expected_parent: Option<[u8; 8]>,
        via: Option<&str>,
    ) {
        // SDKs record ns; the sub-µs part tells them apart from DeepFlow's µs timestamps.
        let j0 = self.rng().below(1000);
        let j1 = self.rng().below(1000);
        let start = self.host_us(pod.svc.host, t0) * 1000 + j0;
        let end = self.host_us(pod.svc.host, t1) * 1000 + j1;
        let span = model::sdk_span(
            self.trace_id,
            id,
            parent,
            name,
            kind,
            start,
            end,
            attributes,
            status,
        );
        self.truth.push(SpanTruth {
            span_id: hex(&id),
            parent_span_id: expected_parent.map(|p| hex(&p)),
            source: Source::Sdk,
            tap_side: None,
            merged_span_ids: Vec::new(),
            via: via.map(str::to_string),
            service: pod.svc.name.to_string(),
            name: name.to_string(),
        });
        self.sdk.push((pod.clone(), span));
    }

    /// Records a DeepFlow row (or, with `split`, its request-only and response-only halves)
    /// and its truth entry. Returns the id of the span the join should emit for it.
    fn row(&mut self, mut row: Row, expected_parent: [u8; 8], via: &str, split: bool) -> [u8; 8] {
        row.row_id = self.g.row_id(row.end_us);
        let mut merged = Vec::new();
        let truth_row = if split {
            let rid = self.g.row_id(row.end_us);
            let (q, r) = row.split(rid);
            merged.push(hex(&rid.to_be_bytes()));
            self.rows.push(q.clone());
            self.rows.push(r);
            q
        } else {
            self.rows.push(row.clone());
            row
        };
        let id = truth_row.row_id.to_be_bytes();
        self.truth.push(SpanTruth {
            span_id: hex(&id),
            parent_span_id: Some(hex(&expected_parent)),
            source: Source::Ebpf,
            tap_side: Some(truth_row.tap.code().to_string()),
            merged_span_ids: merged,
            via: Some(via.to_string()),
            service: truth_row.local().svc.name.to_string(),
            name: truth_row.name(),
        });
        id
    }

    #[allow(clippy::type_complexity)]
    fn finish<S, E>(
        self,
        case: &'static str,
        sdk_enc: impl Fn(ResourceSpans) -> S,
        row_enc: impl Fn(&Row) -> E,
    ) -> (TraceTruth, Vec<S>, Vec<(E, Duration)>) {
        let TraceBuild {
            g,
            tenant,
            trace_id,
            sdk,
            rows,
            truth,
            timed_out,
            ..
        } = self;
        let cfg = &g.cfg;
        let sdk_error = sdk
            .iter()
            .any(|(_, s)| s.status.as_ref().is_some_and(|st| st.code == STATUS_ERROR));
        let row_error = rows
            .iter()
            .any(|r| response_status::otlp(r.status) == STATUS_ERROR);
        let mut start = u64::MAX;
        let mut end = 0u64;
        for (_, s) in &sdk {
            start = start.min(s.start_time_unix_nano);
            end = end.max(s.end_time_unix_nano);
        }
        for r in &rows {
            start = start.min(r.start_us * 1000);
            end = end.max(r.end_us * 1000);
        }
        let duration_us = end.saturating_sub(start) / 1000;

        // SDK exports: per service in first-seen order, optionally shuffled, then chunked.
        let mut services: Vec<(Pod, Vec<Span>)> = Vec::new();
        for (pod, span) in sdk {
            match services.iter_mut().find(|(p, _)| p.pod == pod.pod) {
                Some((_, v)) => v.push(span),
                None => services.push((pod, vec![span])),
            }
        }
        let mut sdk_rs = Vec::new();
        for (pod, mut spans) in services {
            if cfg.shuffle {
                g.rng.shuffle(&mut spans);
            }
            for chunk in spans.chunks(cfg.sdk_spans_per_resource.max(1)) {
                sdk_rs.push(ResourceSpans {
                    resource: Some(model::sdk_resource(&pod)),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(model::sdk_scope(&pod.svc)),
                        spans: chunk.to_vec(),
                        schema_url: String::new(),
                    }],
                    schema_url: "https://opentelemetry.io/schemas/1.26.0".to_string(),
                });
            }
        }
        let mut ebpf: Vec<(E, Duration)> = rows
            .iter()
            .map(|r| {
                let d = g.rng.below(cfg.ebpf_delay_ms + 1);
                (row_enc(r), Duration::from_millis(d))
            })
            .collect();
        if cfg.shuffle {
            g.rng.shuffle(&mut sdk_rs);
            g.rng.shuffle(&mut ebpf);
        }
        (
            TraceTruth {
                trace_id: hex(&trace_id),
                tenant: model::tenant_ns(tenant),
                case: case.to_string(),
                error: sdk_error || row_error || timed_out,
                slow: duration_us > cfg.slow_threshold_ms * 1000,
                duration_us,
                spans: truth,
            },
            sdk_rs.into_iter().map(sdk_enc).collect(),
            ebpf,
        )
    }
}

/// True when `trace_id` is DeepFlow's fake id for `span_id` (`ebpf-spans.md` §2.2, without the
/// attribute part of the test).
pub fn is_fake_trace_id(trace_id: &[u8], span_id: &[u8]) -> bool {
    span_id.len() == 8
        && span_id
            .try_into()
            .map(|s: [u8; 8]| fake_trace_id(u64::from_be_bytes(s)) == trace_id)
            .unwrap_or(false)
}

#[cfg(test)]
mod tests;
