//! The `load_balancing` exporter: routes each trace to one of several downstream tailweave
//! instances by trace id, so that the join and the tail sampler there see whole traces.
//!
//! The config is the OpenTelemetry Collector's `loadbalancing` exporter syntax (`routing_key`,
//! `protocol.otlp`, `resolver.static` / `resolver.dns`), so existing configs carry over, plus three
//! tailweave settings: `reroute_after`, `association` and `affinity`.
//!
//! `protocol.otlp.sending_queue: {storage: file, directory}` gives every backend its own on-disk
//! queue ([`crate::queue::spawn_persistent`]) in `<directory>/<exporter id>/<host:port>` (made
//! one path component), each bounded by `max_size_mib`. A restart delivers what a backend's queue
//! held to that backend, including a backend the resolver no longer returns (it drains, as a
//! removed backend does).
//!
//! # Layout
//! - [`ring`]: the consistent-hash ring (adding one of `n` backends moves about `1/n` of traces);
//! - [`router`]: the synchronous routing state: trace id → backend, the association index for
//!   eBPF spans without a trace id, the re-route of a down backend's traces, and the affinity that
//!   keeps a trace in flight on one backend across those switches;
//! - [`backend`]: one downstream instance, an `otlp` exporter ([`crate::otlp`]) with its own
//!   queue and retry ([`crate::queue`]), and the health its sends keep;
//! - this file: the config, the resolver and the async driver that runs the router between the
//!   exporter's input and the backends.
//!
//! Data flow: input channel → driver → `Router::route` → one batch per backend → that backend's
//! queue → OTLP/gRPC. A backend whose queue is full makes the driver wait (backpressure) unless
//! the backend is down, in which case the batch is re-routed. The DNS resolver re-resolves every
//! `interval`; a new address set rebuilds the ring, starts the new backends and lets the removed
//! ones drain.

pub mod backend;
pub mod ring;
pub mod router;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{Ack, ComponentError, Span, SpanBatch};
use tokio::sync::{mpsc, watch};

use crate::otlp::OtlpExporterConfig;
use crate::queue::{Destination, DiskConfig, ExportSettings, REASON_PERMANENT};
use crate::RunningExporter;
use backend::Backend;
pub use router::{AffinityConfig, AssociationConfig, Router, RouterStats};

/// Spans handed to each backend's queue, by `exporter` and `backend`.
pub const LB_ROUTED_SPANS: &str = "tailweave_loadbalancer_routed_spans_total";
/// eBPF spans without a trace id, by `exporter` and `outcome` (`associated`: placed with a
/// trace through one of their keys; `by_key`: routed by their own key after waiting).
pub const LB_UNKEYED_SPANS: &str = "tailweave_loadbalancer_unkeyed_spans_total";
/// Spans sent to another backend than their trace's owner on the ring, by `exporter`: the owner
/// was down, or (affinity) their trace had gone elsewhere while it was.
pub const LB_REROUTED_SPANS: &str = "tailweave_loadbalancer_rerouted_spans_total";
/// Spans sent where their trace's earlier spans went rather than where the ring pointed at that
/// moment (owner down since, back since, or the backend set changed), by `exporter`.
pub const LB_AFFINITY_SPANS: &str = "tailweave_loadbalancer_affinity_spans_total";
/// Backends started only to drain an on-disk queue an earlier run left for a backend the
/// resolver no longer returns, by `exporter`.
pub const LB_ORPHAN_QUEUES: &str = "tailweave_loadbalancer_orphan_queues_drained_total";
/// 1 while a backend takes its traces, 0 while they are re-routed, by `exporter` and `backend`.
pub const LB_BACKEND_UP: &str = "tailweave_loadbalancer_backend_up";
/// Backends currently on the ring, by `exporter`.
pub const LB_BACKENDS: &str = "tailweave_loadbalancer_backends";
/// Resolutions that changed the backend set, by `exporter`.
pub const LB_RESOLVER_CHANGES: &str = "tailweave_loadbalancer_resolver_changes_total";
/// Resolutions that failed or timed out (the previous set is kept), by `exporter`.
pub const LB_RESOLVER_FAILURES: &str = "tailweave_loadbalancer_resolver_failures_total";

/// The OTLP/gRPC port a backend without one gets.
pub const DEFAULT_PORT: u16 = 4317;
/// How often a failing backend is probed with an empty export.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long the driver waits on a full, healthy backend queue before looking at its health again.
const FULL_RECHECK: Duration = Duration::from_millis(50);
/// Batches the exporter's input holds before the pipeline waits.
const INPUT_CAPACITY: usize = 64;

/// `routing_key`: what decides the backend. Only `traceID` keeps whole traces together, which is
/// what the join and the sampler need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum RoutingKey {
    #[default]
    #[serde(rename = "traceID")]
    TraceId,
    /// Accepted by the Collector; refused by `validate` here.
    #[serde(rename = "service")]
    Service,
    #[serde(rename = "resource")]
    Resource,
    #[serde(rename = "metric")]
    Metric,
    #[serde(rename = "streamID")]
    StreamId,
}

/// `protocol`: how each backend is reached.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    /// The `otlp` exporter's settings, used for every backend; `endpoint` comes from the
    /// resolver and must be left out.
    #[serde(default)]
    pub otlp: OtlpExporterConfig,
}

/// `resolver.static`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StaticResolver {
    /// Backends as `host[:port]` (port 4317 when absent). Required, at least one.
    #[serde(default)]
    pub hostnames: Vec<String>,
}

/// `resolver.dns`: the A/AAAA records of one name, as a Kubernetes headless Service gives them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsResolver {
    /// The name to resolve. Required.
    #[serde(default)]
    pub hostname: String,
    /// The port of every resolved address. Default `4317`.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Time between resolutions. Default `5s`.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Bound of one resolution. Default `1s`.
    #[serde(default = "default_dns_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_dns_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_reroute_after() -> Duration {
    Duration::from_secs(30)
}

/// `resolver`: exactly one of `static` and `dns`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// A fixed list of backends.
    #[serde(rename = "static", default)]
    pub static_: Option<StaticResolver>,
    /// Backends from DNS, re-resolved every `interval`.
    #[serde(default)]
    pub dns: Option<DnsResolver>,
}

/// `exporters.loadbalancing` (also `load_balancing`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingExporterConfig {
    /// `traceID` (default); the Collector's other keys are refused.
    #[serde(default)]
    pub routing_key: RoutingKey,
    /// How each backend is reached (`otlp`). Default: the `otlp` exporter's defaults.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// Where the backends are. Required.
    #[serde(default)]
    pub resolver: ResolverConfig,
    /// A backend failing this long (every attempt and probe since answered with a retryable
    /// error) has its traces sent to the next backend on the ring until it answers again; `0s`
    /// never re-routes. Spans already in its queue keep retrying there. Default `30s`.
    #[serde(default = "default_reroute_after", with = "humantime_serde")]
    pub reroute_after: Duration,
    /// Placing eBPF spans that carry no trace id; see [`AssociationConfig`].
    #[serde(default)]
    pub association: AssociationConfig,
    /// Keeping a trace in flight on the backend its first spans went to; see [`AffinityConfig`].
    /// Default: on, `ttl: 30s`.
    #[serde(default)]
    pub affinity: AffinityConfig,
}

impl Default for LoadBalancingExporterConfig {
    fn default() -> Self {
        LoadBalancingExporterConfig {
            routing_key: RoutingKey::TraceId,
            protocol: ProtocolConfig::default(),
            resolver: ResolverConfig::default(),
            reroute_after: default_reroute_after(),
            association: AssociationConfig::default(),
            affinity: AffinityConfig::default(),
        }
    }
}

/// `host[:port]` (or `http://host[:port]`) as the backend's `host:port`.
pub fn backend_name(h: &str) -> Result<String, String> {
    let t = h.trim();
    let rest = t.strip_prefix("http://").unwrap_or(t);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("must not be empty".into());
    }
    if rest.contains("://") || rest.contains('/') {
        return Err(format!("{t:?}: expected host or host:port"));
    }
    let a = http::uri::Authority::from_str(rest).map_err(|e| format!("{t:?}: {e}"))?;
    if a.host().is_empty() {
        return Err(format!("{t:?}: a host is required"));
    }
    Ok(match a.port_u16() {
        Some(0) => return Err(format!("{t:?}: port 0")),
        Some(_) => a.as_str().to_string(),
        None => format!("{}:{DEFAULT_PORT}", a.as_str()),
    })
}

impl LoadBalancingExporterConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        if self.routing_key != RoutingKey::TraceId {
            out.push(ConfigIssue::new(
                "routing_key",
                "only traceID is supported: the join and the tail sampler need every span of a trace on one instance",
            ));
        }
        let otlp = &self.protocol.otlp;
        if !otlp.endpoint.trim().is_empty() {
            out.push(ConfigIssue::new(
                "protocol.otlp.endpoint",
                "set by the resolver for each backend; leave it out",
            ));
        }
        // The otlp exporter's own checks, against a stand-in endpoint.
        let mut probe = otlp.clone();
        probe.endpoint = format!("127.0.0.1:{DEFAULT_PORT}");
        for i in probe.validate() {
            out.push(ConfigIssue::new(
                format!("protocol.otlp.{}", i.path),
                i.message,
            ));
        }
        match (&self.resolver.static_, &self.resolver.dns) {
            (None, None) => out.push(ConfigIssue::new(
                "resolver",
                "required: `static: {hostnames: [...]}` or `dns: {hostname: ...}`",
            )),
            (Some(_), Some(_)) => out.push(ConfigIssue::new(
                "resolver",
                "give one of static and dns, not both",
            )),
            (Some(s), None) => {
                if s.hostnames.is_empty() {
                    out.push(ConfigIssue::new(
                        "resolver.static.hostnames",
                        "at least one backend is required",
                    ));
                }
                for (i, h) in s.hostnames.iter().enumerate() {
                    if let Err(e) = backend_name(h) {
                        out.push(ConfigIssue::new(
                            format!("resolver.static.hostnames[{i}]"),
                            e,
                        ));
                    }
                }
            }
            (None, Some(d)) => {
                if d.hostname.trim().is_empty() {
                    out.push(ConfigIssue::new("resolver.dns.hostname", "required"));
                } else if d.hostname.contains(':') || d.hostname.contains('/') {
                    out.push(ConfigIssue::new(
                        "resolver.dns.hostname",
                        "a name only; the port goes in resolver.dns.port",
                    ));
                }
                if d.port == 0 {
                    out.push(ConfigIssue::new("resolver.dns.port", "must be 1 to 65535"));
                }
                if d.interval.is_zero() {
                    out.push(ConfigIssue::new(
                        "resolver.dns.interval",
                        "must be greater than 0",
                    ));
                }
                if d.timeout.is_zero() {
                    out.push(ConfigIssue::new(
                        "resolver.dns.timeout",
                        "must be greater than 0",
                    ));
                }
            }
        }
        self.association.validate(&mut out);
        self.affinity.validate(&mut out);
        out
    }

    /// The `host:port` of every backend known from the config (for the self-filter).
    pub fn endpoints(&self) -> Vec<String> {
        if let Some(s) = &self.resolver.static_ {
            return s
                .hostnames
                .iter()
                .filter_map(|h| backend_name(h).ok())
                .collect();
        }
        if let Some(d) = &self.resolver.dns {
            if !d.hostname.trim().is_empty() {
                return vec![format!("{}:{}", d.hostname.trim(), d.port)];
            }
        }
        Vec::new()
    }

    /// Starts the exporter. Must run inside a tokio runtime.
    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(&ctx.id, all.join("; ")));
        }
        let otlp = self.protocol.otlp.clone();
        let lb_id = ctx.id.clone();
        let make: MakeDest = Arc::new(move |name: &str| {
            let mut c = otlp.clone();
            c.endpoint = name.to_string();
            let d = c.destination(&format!("{lb_id}/{name}"))?;
            Ok(Arc::new(d) as Arc<dyn Destination>)
        });
        let resolve = match (&self.resolver.static_, &self.resolver.dns) {
            (Some(s), _) => Resolve::Static(
                s.hostnames
                    .iter()
                    .filter_map(|h| backend_name(h).ok())
                    .collect(),
            ),
            (None, Some(d)) => Resolve::Dns {
                hostname: d.hostname.trim().to_string(),
                port: d.port,
                interval: d.interval,
                timeout: d.timeout,
                lookup: Arc::new(system_lookup),
            },
            (None, None) => return Err(ComponentError::build(&ctx.id, "resolver: required")),
        };
        let disk = self.protocol.otlp.sending_queue.disk(&ctx.id);
        if let Some(d) = &disk {
            // Fail at start-up, not at the first backend, when the directory cannot be made.
            std::fs::create_dir_all(&d.directory).map_err(|e| {
                ComponentError::build(
                    &ctx.id,
                    format!(
                        "protocol.otlp.sending_queue.directory: cannot create {}: {e}",
                        d.directory.display()
                    ),
                )
            })?;
        }
        tracing::info!(exporter = %ctx.id, resolver = ?resolve, persistent = ?disk.as_ref().map(|d| d.directory.display().to_string()), "load-balancing exporter ready");
        Ok(spawn_with(
            &ctx.id,
            Settings {
                export: self.protocol.otlp.settings(),
                reroute_after: self.reroute_after,
                association: self.association.clone(),
                affinity: self.affinity.clone(),
                disk,
            },
            resolve,
            make,
        ))
    }
}

/// Makes the destination of one backend from its `host:port`.
pub type MakeDest = Arc<dyn Fn(&str) -> Result<Arc<dyn Destination>, ComponentError> + Send + Sync>;

/// Resolves `host:port` to socket addresses (injectable for tests).
pub type Lookup = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<String>>> + Send>>
        + Send
        + Sync,
>;

fn system_lookup(
    host: String,
    port: u16,
) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<String>>> + Send>> {
    Box::pin(async move {
        let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
        Ok(addrs.map(|a| a.to_string()).collect())
    })
}

/// Where the backend set comes from.
#[derive(Clone)]
pub enum Resolve {
    Static(Vec<String>),
    Dns {
        hostname: String,
        port: u16,
        interval: Duration,
        timeout: Duration,
        lookup: Lookup,
    },
}

impl std::fmt::Debug for Resolve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolve::Static(h) => write!(f, "static {h:?}"),
            Resolve::Dns {
                hostname,
                port,
                interval,
                ..
            } => write!(
                f,
                "dns {hostname}:{port} every {}",
                humantime::format_duration(*interval)
            ),
        }
    }
}

fn normalize(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Publishes the backend set: once for `static`, on every change for `dns`.
fn start_resolver(
    id: &str,
    resolve: Resolve,
) -> (
    watch::Receiver<Vec<String>>,
    Option<tokio::task::JoinHandle<()>>,
) {
    match resolve {
        Resolve::Static(h) => {
            let (_tx, rx) = watch::channel(normalize(h));
            (rx, None)
        }
        Resolve::Dns {
            hostname,
            port,
            interval,
            timeout,
            lookup,
        } => {
            let (tx, rx) = watch::channel(Vec::new());
            let id = id.to_string();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let got = tokio::time::timeout(timeout, lookup(hostname.clone(), port)).await;
                    match got {
                        Ok(Ok(addrs)) if !addrs.is_empty() => {
                            let addrs = normalize(addrs);
                            let changed = tx.send_if_modified(|cur| {
                                if *cur == addrs {
                                    false
                                } else {
                                    *cur = addrs.clone();
                                    true
                                }
                            });
                            if changed {
                                metrics::counter!(LB_RESOLVER_CHANGES, "exporter" => id.clone())
                                    .increment(1);
                                tracing::info!(exporter = %id, backends = ?addrs, "backend set changed");
                            }
                        }
                        other => {
                            metrics::counter!(LB_RESOLVER_FAILURES, "exporter" => id.clone())
                                .increment(1);
                            let why = match other {
                                Ok(Ok(_)) => "no addresses".to_string(),
                                Ok(Err(e)) => e.to_string(),
                                Err(_) => "timed out".to_string(),
                            };
                            tracing::warn!(exporter = %id, host = %hostname, error = %why, "resolution failed, keeping the previous backends");
                        }
                    }
                    if tx.is_closed() {
                        break;
                    }
                }
            });
            (rx, Some(task))
        }
    }
}

/// What the driver runs with, besides the resolver and the destinations.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Timeout, retry and queue of every backend.
    pub export: ExportSettings,
    pub reroute_after: Duration,
    pub association: AssociationConfig,
    pub affinity: AffinityConfig,
    /// With `sending_queue.storage: file`: the exporter's queue directory; each backend's queue
    /// is [`DiskConfig::child`] of it.
    pub disk: Option<DiskConfig>,
}

/// Starts the exporter around `make` (the per-backend destination) and `resolve`, with in-memory
/// queues and no affinity.
pub fn spawn(
    id: &str,
    settings: ExportSettings,
    reroute_after: Duration,
    association: AssociationConfig,
    resolve: Resolve,
    make: MakeDest,
) -> RunningExporter {
    spawn_with(
        id,
        Settings {
            export: settings,
            reroute_after,
            association,
            affinity: AffinityConfig::off(),
            disk: None,
        },
        resolve,
        make,
    )
}

/// Starts the exporter around `make` (the per-backend destination) and `resolve`.
pub fn spawn_with(id: &str, s: Settings, resolve: Resolve, make: MakeDest) -> RunningExporter {
    let (tx, rx) = mpsc::channel(INPUT_CAPACITY);
    let tick =
        (s.association.wait / 4).clamp(Duration::from_millis(10), Duration::from_millis(100));
    let driver = Driver {
        id: id.to_string(),
        router: Router::new(&[], s.association).with_affinity(s.affinity),
        backends: Vec::new(),
        retired: Vec::new(),
        settings: s.export,
        make,
        reroute_after: s.reroute_after,
        published: RouterStats::default(),
        disk: s.disk,
        orphans_checked: false,
    };
    let done = tokio::spawn(driver.run(rx, resolve, tick));
    RunningExporter { input: tx, done }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Driver {
    id: String,
    router: Router,
    /// In the order of `router.backends()`.
    backends: Vec<BackendSlot>,
    /// Removed backends draining their queues.
    /// With the queue directory each uses, so a backend re-added while its old queue still
    /// drains gets a directory of its own.
    retired: Vec<(Option<PathBuf>, tokio::task::JoinHandle<()>)>,
    settings: ExportSettings,
    make: MakeDest,
    reroute_after: Duration,
    published: RouterStats,
    disk: Option<DiskConfig>,
    /// Whether the on-disk queues of backends no longer resolved have been looked for (once, at
    /// the first non-empty backend set).
    orphans_checked: bool,
}

struct BackendSlot {
    b: Backend,
    last_probe: Option<Instant>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<SpanBatch>, resolve: Resolve, tick: Duration) {
        let (mut names, resolver) = start_resolver(&self.id, resolve);
        let first = names.borrow_and_update().clone();
        self.apply(first);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resolving = resolver.is_some();
        loop {
            tokio::select! {
                b = rx.recv(), if !self.backends.is_empty() => match b {
                    Some(b) => {
                        let now = now();
                        let routed = {
                            let (router, backends, after) = (&mut self.router, &self.backends, self.reroute_after);
                            router.route(now, b.spans, &|i| backends[i].b.health.is_down(now, after))
                        };
                        self.dispatch(routed, b.acks).await;
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    let now = now();
                    let routed = {
                        let (router, backends, after) = (&mut self.router, &self.backends, self.reroute_after);
                        router.tick(now, &|i| backends[i].b.health.is_down(now, after))
                    };
                    self.dispatch(routed, Vec::new()).await;
                    self.probe(now);
                    if self.backends.is_empty() && rx.is_closed() {
                        // Never had a backend: what is queued cannot go anywhere.
                        let mut lost = 0u64;
                        while let Ok(b) = rx.try_recv() {
                            lost += b.spans.len() as u64;
                        }
                        if lost > 0 {
                            metrics::counter!(tailweave_core::names::EXPORTER_FAILED_SPANS, "exporter" => self.id.clone(), "reason" => "no_backend").increment(lost);
                            tracing::warn!(exporter = %self.id, spans = lost, "dropping spans: no backend was ever resolved");
                        }
                        break;
                    }
                }
                r = names.changed(), if resolving => match r {
                    Ok(()) => {
                        let set = names.borrow_and_update().clone();
                        self.apply(set);
                    }
                    Err(_) => resolving = false,
                },
            }
        }
        if let Some(t) = resolver {
            t.abort();
        }
        let routed = {
            let (router, backends, after) = (&mut self.router, &self.backends, self.reroute_after);
            let now = now();
            router.flush(&|i| backends[i].b.health.is_down(now, after))
        };
        self.dispatch(routed, Vec::new()).await;
        self.publish();
        let mut handles: Vec<_> = std::mem::take(&mut self.retired)
            .into_iter()
            .map(|(_, h)| h)
            .collect();
        for s in self.backends.drain(..) {
            drop(s.b.input);
            handles.push(s.b.done);
        }
        for h in handles {
            if let Err(e) = h.await {
                tracing::error!(exporter = %self.id, error = %e, "backend task failed");
            }
        }
        tracing::debug!(exporter = %self.id, "load-balancing exporter drained and stopped");
    }

    /// Makes the backends match `names`: new ones start, removed ones drain in the background.
    fn apply(&mut self, names: Vec<String>) {
        let names = normalize(names);
        if names.is_empty() || names == self.router.backends() {
            return;
        }
        let mut old: Vec<BackendSlot> = std::mem::take(&mut self.backends);
        let mut next = Vec::with_capacity(names.len());
        let mut kept = Vec::with_capacity(names.len());
        for n in &names {
            if let Some(pos) = old.iter().position(|s| &s.b.name == n) {
                next.push(old.swap_remove(pos));
                kept.push(n.clone());
                continue;
            }
            match self.start_backend(n) {
                Ok(b) => {
                    next.push(BackendSlot {
                        b,
                        last_probe: None,
                    });
                    kept.push(n.clone());
                }
                Err(e) => {
                    tracing::error!(exporter = %self.id, backend = %n, error = %e, "cannot start backend")
                }
            }
        }
        for s in old {
            tracing::info!(exporter = %self.id, backend = %s.b.name, "backend removed, draining");
            drop(s.b.input);
            self.retired.push((s.b.queue_dir, s.b.done));
        }
        self.router.set_backends(&kept);
        // The router sorts its nodes; keep the slots in the same order.
        next.sort_by(|a, b| a.b.name.cmp(&b.b.name));
        self.backends = next;
        metrics::gauge!(LB_BACKENDS, "exporter" => self.id.clone()).set(self.backends.len() as f64);
        if !self.orphans_checked {
            self.orphans_checked = true;
            self.drain_orphans();
        }
    }

    fn start_backend(&mut self, name: &str) -> Result<Backend, ComponentError> {
        let dest = (self.make)(name)?;
        let qid = format!("{}/{}", self.id, name);
        self.retired.retain(|(_, h)| !h.is_finished());
        let disk = self.disk.as_ref().map(|d| {
            // Two queues must never share a directory: a backend that comes back while its old
            // queue still drains starts beside it (the next start drains both, see
            // `drain_orphans`).
            let busy = |c: &DiskConfig| {
                self.retired
                    .iter()
                    .any(|(dir, _)| dir.as_deref() == Some(c.directory.as_path()))
            };
            let mut c = d.child(name);
            let mut k = 1u32;
            while busy(&c) {
                c = d.child(&format!("{name}#{k}"));
                k += 1;
            }
            c
        });
        Backend::spawn(&qid, name, &self.settings, dest, disk.as_ref())
    }

    /// Starts, only to drain, the on-disk queue of every backend an earlier run queued for that
    /// the resolver does not return now: those spans are owed to it, as a removed backend's
    /// queue drains. A directory without a name file is left alone (and logged).
    fn drain_orphans(&mut self) {
        let Some(root) = self.disk.as_ref().map(|d| d.directory.clone()) else {
            return;
        };
        let used: Vec<PathBuf> = self
            .backends
            .iter()
            .filter_map(|s| s.b.queue_dir.clone())
            .collect();
        for (name, dir) in orphan_queues(&root, &used) {
            let Some(name) = name else {
                tracing::warn!(exporter = %self.id, directory = %dir.display(), "a queue directory without a backend name; left as it is");
                continue;
            };
            let started = (self.make)(&name).and_then(|dest| {
                let disk = DiskConfig {
                    directory: dir.clone(),
                    max_bytes: self.disk.as_ref().map_or(0, |d| d.max_bytes),
                };
                let qid = format!("{}/{}", self.id, name);
                Backend::spawn(&qid, &name, &self.settings, dest, Some(&disk))
            });
            match started {
                Ok(b) => {
                    tracing::info!(exporter = %self.id, backend = %name, directory = %dir.display(), "draining the on-disk queue of a backend no longer resolved");
                    metrics::counter!(LB_ORPHAN_QUEUES, "exporter" => self.id.clone()).increment(1);
                    drop(b.input);
                    self.retired.push((b.queue_dir, b.done));
                }
                Err(e) => {
                    tracing::error!(exporter = %self.id, backend = %name, error = %e, "cannot drain the on-disk queue of a backend no longer resolved")
                }
            }
        }
    }

    fn probe(&mut self, now: Instant) {
        for s in &mut self.backends {
            let up = !s.b.health.is_down(now, self.reroute_after);
            metrics::gauge!(LB_BACKEND_UP, "exporter" => self.id.clone(), "backend" => s.b.name.clone())
                .set(if up { 1.0 } else { 0.0 });
            if s.b.health.failing_since().is_none() {
                continue;
            }
            if s.last_probe
                .is_some_and(|t| now.saturating_duration_since(t) < PROBE_INTERVAL)
            {
                continue;
            }
            s.last_probe = Some(now);
            // A zero timeout means "none" to the queue; a probe still needs a bound.
            let bound = if self.settings.timeout.is_zero() {
                crate::queue::DEFAULT_TIMEOUT
            } else {
                self.settings.timeout
            };
            s.b.probe(bound);
        }
    }

    /// Hands each backend its spans; re-routes a down backend's batch when its queue is full.
    /// `acks` (of the input the spans came from) go with every backend's batch, so a backend with
    /// its queue on disk lets them go once written.
    async fn dispatch(&mut self, routed: router::Routed, acks: Vec<Ack>) {
        let mut work: Vec<(usize, Vec<Span>)> = routed
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        while let Some((i, spans)) = work.pop() {
            let n = spans.len() as u64;
            let mut batch = SpanBatch::new(spans);
            batch.acks.extend(acks.iter().cloned());
            loop {
                let slot = &self.backends[i];
                match slot.b.input.try_send(batch) {
                    Ok(()) => {
                        metrics::counter!(LB_ROUTED_SPANS, "exporter" => self.id.clone(), "backend" => slot.b.name.clone()).increment(n);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(b)) => {
                        // Only after its task ended, which it does not while we hold the sender.
                        metrics::counter!(tailweave_core::names::EXPORTER_FAILED_SPANS, "exporter" => self.id.clone(), "reason" => REASON_PERMANENT).increment(b.spans.len() as u64);
                        for a in &b.acks {
                            a.fail("load balancer backend stopped");
                        }
                        break;
                    }
                    Err(mpsc::error::TrySendError::Full(b)) => {
                        let now = now();
                        let after = self.reroute_after;
                        let backends = &self.backends;
                        let down = |j: usize| backends[j].b.health.is_down(now, after);
                        let elsewhere = (0..backends.len()).any(|j| j != i && !down(j));
                        if down(i) && elsewhere {
                            let r = self.router.reroute(now, b.spans, i, &down);
                            work.extend(r.into_iter().enumerate().filter(|(_, s)| !s.is_empty()));
                            break;
                        }
                        // Healthy but busy (or nowhere better): wait, which holds the pipeline.
                        match tokio::time::timeout(FULL_RECHECK, slot.b.input.reserve()).await {
                            Ok(Ok(permit)) => {
                                permit.send(b);
                                metrics::counter!(LB_ROUTED_SPANS, "exporter" => self.id.clone(), "backend" => slot.b.name.clone()).increment(n);
                                break;
                            }
                            Ok(Err(_)) => break,
                            Err(_) => batch = b,
                        }
                    }
                }
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let s = self.router.stats;
        if s.affinity > self.published.affinity {
            metrics::counter!(LB_AFFINITY_SPANS, "exporter" => self.id.clone())
                .increment(s.affinity - self.published.affinity);
        }
        let p = self.published;
        let id = &self.id;
        if s.associated > p.associated {
            metrics::counter!(LB_UNKEYED_SPANS, "exporter" => id.clone(), "outcome" => "associated")
                .increment(s.associated - p.associated);
        }
        if s.by_key > p.by_key {
            metrics::counter!(LB_UNKEYED_SPANS, "exporter" => id.clone(), "outcome" => "by_key")
                .increment(s.by_key - p.by_key);
        }
        if s.rerouted > p.rerouted {
            metrics::counter!(LB_REROUTED_SPANS, "exporter" => id.clone())
                .increment(s.rerouted - p.rerouted);
        }
        self.published = s;
    }
}

/// The queue directories under `root` that none of `used` is, with the backend name each records
/// (`None`: no readable name file).
fn orphan_queues(root: &Path, used: &[PathBuf]) -> Vec<(Option<String>, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(Option<String>, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let dir = e.path();
            let name = std::fs::read_to_string(dir.join(backend::NAME_FILE))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            (name, dir)
        })
        .filter(|(_, dir)| !used.contains(dir))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests;
