//! The pipeline graph and its lifecycle.
//!
//! Start-up (reverse data flow): telemetry and health listeners are bound; exporters start; each
//! pipeline's processors are built (one instance per pipeline) and their drivers spawned, last
//! first; then every receiver binds its sockets, and only when all have bound do they serve.
//!
//! Shutdown (data-flow order): health turns 503; receivers are told to stop and finish in-flight
//! requests; dropping their senders ends each processor's input, so each driver flushes its state
//! (`Processor::shutdown`) and closes its output; exporters then drain their queues and deliver.
//! The whole drain is bounded by `service.shutdown_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tailweave_core::config::{BuildContext, SelfInfo};
use tailweave_core::limiter::MemoryLimiter;
use tailweave_core::{names, Ack, Consumer, Processor, SpanBatch};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{parse_host_port, Config};
use crate::telemetry::{self, Health};

/// A running collector.
pub struct Running {
    shutdown: CancellationToken,
    telemetry_stop: CancellationToken,
    receivers: Vec<(
        String,
        JoinHandle<Result<(), tailweave_core::ComponentError>>,
    )>,
    processors: Vec<JoinHandle<()>>,
    exporters: Vec<(String, JoinHandle<()>)>,
    pub health: Health,
    /// A component failed while running; the process should stop.
    pub failed: CancellationToken,
    shutdown_timeout: Duration,
}

/// What this process looks like from outside, for the self-filter.
pub fn self_info(cfg: &Config) -> SelfInfo {
    let mut ports = Vec::new();
    for r in &cfg.receivers {
        for a in r.config.listen_addrs() {
            if let Some((_, p)) = parse_host_port(&a) {
                ports.push(p);
            }
        }
    }
    if let Some((_, p)) = parse_host_port(&cfg.service.telemetry.metrics.address) {
        ports.push(p);
    }
    if let Some(h) = &cfg.health_check {
        if let Some((_, p)) = parse_host_port(&h.endpoint) {
            ports.push(p);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    let mut endpoints: Vec<String> = cfg
        .exporters
        .iter()
        .flat_map(|e| e.config.endpoints())
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let host_name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    SelfInfo {
        listen_ports: ports,
        exporter_endpoints: endpoints,
        pid: std::process::id(),
        process_name: std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tailweave".into()),
        host_name,
        pod_name: std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("K8S_POD_NAME").ok()),
        service_name: "tailweave".into(),
    }
}

/// How long a batch whose client still waits for its answer (it carries acks) waits for room in
/// the next stage or exporter queue before it is refused (one bound per turn of a stage, shared
/// by the batches it sends): its acks fail, its client is answered
/// `UNAVAILABLE` / 503 and sends again, and the batch is dropped here and counted
/// (`tailweave_processor_dropped_spans_total{reason="refused_downstream_full"}`), so a retry does
/// not duplicate it. Batches without acks (a holding stage's output, already answered for) wait
/// for room as long as it takes: that is the backpressure that stops the stage.
const REFUSE_AFTER: Duration = Duration::from_secs(1);

/// Why a bounded send gave a batch back.
enum NotSent {
    Full(SpanBatch),
    Closed(SpanBatch),
}

/// Sends `batch` on `tx`, waiting for room until `deadline` (then `Full`); a `deadline` of `None`
/// waits as long as it takes.
async fn send_by(
    tx: &mpsc::Sender<SpanBatch>,
    batch: SpanBatch,
    deadline: Option<Instant>,
) -> Result<(), NotSent> {
    let Some(deadline) = deadline else {
        return tx
            .send(batch)
            .await
            .map_err(|mpsc::error::SendError(b)| NotSent::Closed(b));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return tx.try_send(batch).map_err(|e| match e {
            mpsc::error::TrySendError::Full(b) => NotSent::Full(b),
            mpsc::error::TrySendError::Closed(b) => NotSent::Closed(b),
        });
    }
    tx.send_timeout(batch, left).await.map_err(|e| match e {
        mpsc::error::SendTimeoutError::Timeout(b) => NotSent::Full(b),
        mpsc::error::SendTimeoutError::Closed(b) => NotSent::Closed(b),
    })
}

/// Sends `batch` on `tx`: a batch a client waits for (it carries acks) waits for room until
/// `deadline` (one [`REFUSE_AFTER`] per turn of the stage, shared by the batches it sends), then
/// is refused; any other batch waits as long as it takes. `false`: not sent, its acks failed.
async fn send_or_refuse(
    tx: &mpsc::Sender<SpanBatch>,
    batch: SpanBatch,
    at: &str,
    deadline: Instant,
) -> bool {
    let bound = (!batch.acks.is_empty()).then_some(deadline);
    let (b, why) = match send_by(tx, batch, bound).await {
        Ok(()) => return true,
        Err(NotSent::Full(b)) => {
            metrics::counter!(names::PROCESSOR_DROPPED_SPANS, "processor" => at.to_string(),
                "reason" => "refused_downstream_full")
            .increment(b.len() as u64);
            (b, "pipeline full")
        }
        Err(NotSent::Closed(b)) => (b, "pipeline stopped"),
    };
    for a in &b.acks {
        a.fail(why);
    }
    false
}

/// An exporter's input, and whether the exporter keeps a batch's acks until it holds the batch
/// durably (a sending queue on disk). An in-memory queue takes the batch when the channel takes
/// it, so the acks are let go then.
#[derive(Clone)]
struct ExporterInput {
    id: String,
    tx: mpsc::Sender<SpanBatch>,
    durable: bool,
}

impl ExporterInput {
    async fn send(&self, mut batch: SpanBatch, deadline: Instant) -> bool {
        if self.durable {
            return send_or_refuse(&self.tx, batch, &self.id, deadline).await;
        }
        // Taken when the queue takes it; the acks still bound the wait for room.
        let acks = std::mem::take(&mut batch.acks);
        let bound = (!acks.is_empty()).then_some(deadline);
        let why = match send_by(&self.tx, batch, bound).await {
            Ok(()) => return true,
            Err(NotSent::Full(b)) => {
                metrics::counter!(names::EXPORTER_ENQUEUE_FAILED_SPANS, "exporter" => self.id.clone(),
                    "reason" => "queue_full")
                .increment(b.len() as u64);
                "sending queue full"
            }
            Err(NotSent::Closed(_)) => "exporter stopped",
        };
        for a in &acks {
            a.fail(why);
        }
        false
    }
}

/// Where a stage sends its output.
enum Next {
    Stage(mpsc::Sender<SpanBatch>),
    Exporters(Vec<ExporterInput>),
}

impl Next {
    /// Waits for room: a full downstream stops this stage, and so, upstream, the receivers. A
    /// batch a client waits for is refused after [`REFUSE_AFTER`] instead.
    async fn send(&self, batch: SpanBatch, from: &str, deadline: Instant) -> bool {
        match self {
            Next::Stage(tx) => send_or_refuse(tx, batch, from, deadline).await,
            Next::Exporters(txs) => {
                let mut ok = true;
                let n = txs.len();
                let mut batch = Some(batch);
                for (i, tx) in txs.iter().enumerate() {
                    let b = if i + 1 == n {
                        batch.take().unwrap_or_default()
                    } else {
                        batch.clone().unwrap_or_default()
                    };
                    ok &= tx.send(b, deadline).await;
                }
                ok
            }
        }
    }
}

/// Input batches a stage takes from its queue, when they are already waiting, before it sends
/// what they produced: a burst then costs one send (and one wake-up downstream) instead of one
/// per batch, and nothing waits for input that has not arrived.
const MAX_BATCHES_PER_TURN: usize = 64;

/// A stage's output is sent in batches of at most this many spans (unless one batch is larger on
/// its own): the join emits one batch per trace, and merging them is what keeps a channel send
/// and an exporter request from being paid per trace.
const MAX_MERGED_SPANS: usize = 4096;

/// Merges consecutive output batches of the same kind (`whole` or not), keeping the earliest
/// `decided_at` and every ack, and sends them. Spans keep their order. `acks` (the input acks
/// of a stage that does not hold spans) go with every batch sent, or are let go with nothing to
/// send (the stage dropped every span, by its rules and counted).
async fn send_merged(
    out: &mut Vec<SpanBatch>,
    acks: &mut Vec<Ack>,
    next: &Next,
    outgoing: &metrics::Counter,
    id: &str,
    pipeline: &str,
) {
    let mut merged: Vec<SpanBatch> = Vec::new();
    for b in out.drain(..) {
        if b.is_empty() {
            continue;
        }
        match merged.last_mut() {
            Some(p) if p.whole == b.whole && p.len() + b.len() <= MAX_MERGED_SPANS => p.absorb(b),
            _ => merged.push(b),
        }
    }
    let acks = std::mem::take(acks);
    if let Some((last, rest)) = merged.split_last_mut() {
        for b in rest {
            b.acks.extend(acks.iter().cloned());
        }
        last.acks.extend(acks);
    }
    // One bound for the whole turn: a stage whose downstream stays full refuses what it holds
    // within about REFUSE_AFTER, so the clients waiting in its input are answered soon too.
    let deadline = Instant::now() + REFUSE_AFTER;
    for b in merged {
        send_one(b, next, outgoing, id, pipeline, deadline).await;
    }
}

async fn send_one(
    b: SpanBatch,
    next: &Next,
    outgoing: &metrics::Counter,
    id: &str,
    pipeline: &str,
    deadline: Instant,
) {
    outgoing.increment(b.len() as u64);
    let n = b.len();
    if !next.send(b, id, deadline).await {
        tracing::debug!(processor = %id, pipeline = %pipeline, spans = n,
            "downstream full or closed: batch refused, its clients answered with a retryable error");
    }
}

/// Runs one stage: a processor (or a pass-through when `None`) between two channels.
async fn drive(
    id: String,
    pipeline: String,
    mut p: Option<Box<dyn Processor>>,
    mut rx: mpsc::Receiver<SpanBatch>,
    next: Next,
) {
    let labels = [("processor", id.clone()), ("pipeline", pipeline.clone())];
    let incoming = metrics::counter!(names::PROCESSOR_INCOMING_SPANS, &labels);
    let outgoing = metrics::counter!(names::PROCESSOR_OUTGOING_SPANS, &labels);
    let queue = metrics::gauge!(names::PIPELINE_QUEUE_LENGTH, &labels);
    let tick_every = p
        .as_ref()
        .and_then(|p| p.tick_interval())
        .unwrap_or(Duration::from_millis(100));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out: Vec<SpanBatch> = Vec::new();
    // The acks of this turn's input, for a stage that does not hold spans: they go on its output.
    let mut acks: Vec<Ack> = Vec::new();
    let holds = p.as_ref().is_some_and(|p| p.holds_spans());
    let take = |p: &mut Option<Box<dyn Processor>>,
                mut b: SpanBatch,
                out: &mut Vec<SpanBatch>,
                acks: &mut Vec<Ack>| {
        incoming.increment(b.len() as u64);
        match p.as_mut() {
            Some(p) => {
                if !holds {
                    acks.append(&mut b.acks);
                }
                p.process(Instant::now(), b, out)
            }
            None => out.push(b),
        }
    };
    loop {
        let accepting = p.as_ref().is_none_or(|p| p.accepting());
        tokio::select! {
            biased;
            b = rx.recv(), if accepting => match b {
                Some(b) => {
                    take(&mut p, b, &mut out, &mut acks);
                    for _ in 1..MAX_BATCHES_PER_TURN {
                        if !p.as_ref().is_none_or(|p| p.accepting()) {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(b) => take(&mut p, b, &mut out, &mut acks),
                            Err(_) => break,
                        }
                    }
                    queue.set(rx.len() as f64);
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Some(p) = p.as_mut() {
                    p.tick(Instant::now(), &mut out);
                }
            }
        }
        send_merged(&mut out, &mut acks, &next, &outgoing, &id, &pipeline).await;
    }
    if let Some(p) = p.as_mut() {
        p.shutdown(Instant::now(), &mut out);
    }
    send_merged(&mut out, &mut acks, &next, &outgoing, &id, &pipeline).await;
    tracing::debug!(processor = %id, pipeline = %pipeline, "stage drained");
}

/// Builds and starts everything. Nothing serves unless everything built.
pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let telemetry_stop = CancellationToken::new();
    let failed = CancellationToken::new();
    let health = Health::default();
    let info = Arc::new(self_info(cfg));

    let prom = telemetry::install_recorder();
    if cfg.service.telemetry.metrics.address != "none" {
        let l = telemetry::bind(
            "service.telemetry.metrics",
            &cfg.service.telemetry.metrics.address,
        )
        .await?;
        tracing::info!(address = %l.local_addr()?, "serving /metrics");
        telemetry::serve_metrics(l, prom, telemetry_stop.clone());
    }
    if let Some(h) = &cfg.health_check {
        let l = telemetry::bind("extensions.health_check", &h.endpoint).await?;
        tracing::info!(address = %l.local_addr()?, path = %h.path, "serving health check");
        telemetry::serve_health(l, h.path.clone(), health.clone(), telemetry_stop.clone());
    }
    let limiter = cfg.service.memory_limit_mib.map(|mib| {
        let limit = mib << 20;
        let spike = cfg
            .service
            .memory_spike_limit_mib
            .map(|s| s << 20)
            .unwrap_or(limit / 5);
        Arc::new(MemoryLimiter::new(limit, spike))
    });
    telemetry::sample_rss(limiter.clone(), telemetry_stop.clone());

    // Exporters: one instance each, shared by the pipelines that name it.
    let mut exporter_inputs: Vec<(String, ExporterInput)> = Vec::new();
    let mut exporters = Vec::new();
    for (pid, p) in &cfg.service.pipelines {
        for eid in &p.exporters {
            if exporter_inputs.iter().any(|(id, _)| id == eid) {
                continue;
            }
            let e = cfg
                .exporter(eid)
                .context("validated config names a missing exporter")?;
            let ctx = BuildContext {
                id: eid.clone(),
                pipeline: pid.clone(),
                self_info: info.clone(),
            };
            let running = e
                .config
                .build(&ctx)
                .with_context(|| format!("exporters.{eid}: cannot start"))?;
            let input = ExporterInput {
                id: eid.clone(),
                tx: running.input,
                durable: e.config.holds_durably(),
            };
            exporter_inputs.push((eid.clone(), input));
            exporters.push((eid.clone(), running.done));
        }
    }

    // Pipelines, last stage first.
    let mut pipeline_inputs: Vec<(String, mpsc::Sender<SpanBatch>)> = Vec::new();
    let mut processors = Vec::new();
    for (pid, p) in &cfg.service.pipelines {
        let fan: Vec<ExporterInput> = p
            .exporters
            .iter()
            .filter_map(|e| exporter_inputs.iter().find(|(id, _)| id == e))
            .map(|(_, tx)| tx.clone())
            .collect();
        let mut next = Next::Exporters(fan);
        let mut stages: Vec<(String, Option<Box<dyn Processor>>)> = Vec::new();
        for prid in &p.processors {
            let pc = cfg
                .processor(prid)
                .context("validated config names a missing processor")?;
            let ctx = BuildContext {
                id: prid.clone(),
                pipeline: pid.clone(),
                self_info: info.clone(),
            };
            let built = pc
                .config
                .build(&ctx)
                .with_context(|| format!("processors.{prid} (pipeline {pid}): cannot build"))?;
            stages.push((prid.clone(), Some(built)));
        }
        if stages.is_empty() {
            stages.push(("passthrough".into(), None));
        }
        for (prid, proc_) in stages.into_iter().rev() {
            let (tx, rx) = mpsc::channel(cfg.service.queue_size);
            processors.push(tokio::spawn(drive(prid, pid.clone(), proc_, rx, next)));
            next = Next::Stage(tx);
        }
        let Next::Stage(input) = next else {
            unreachable!("at least one stage")
        };
        pipeline_inputs.push((pid.clone(), input));
    }
    drop(exporter_inputs);

    // Receivers: bind all, then serve.
    let mut bound = Vec::new();
    for r in &cfg.receivers {
        let targets: Vec<mpsc::Sender<SpanBatch>> = cfg
            .service
            .pipelines
            .iter()
            .filter(|(_, p)| p.receivers.contains(&r.id))
            .filter_map(|(pid, _)| pipeline_inputs.iter().find(|(id, _)| id == pid))
            .map(|(_, tx)| tx.clone())
            .collect();
        if targets.is_empty() {
            continue;
        }
        let ctx = BuildContext {
            id: r.id.clone(),
            pipeline: String::new(),
            self_info: info.clone(),
        };
        let rx = r
            .config
            .build(&ctx)
            .await
            .with_context(|| format!("receivers.{}: cannot start", r.id))?;
        bound.push((r.id.clone(), rx, Consumer::new(targets, limiter.clone())));
    }
    drop(pipeline_inputs);
    let mut receivers = Vec::new();
    for (id, rx, consumer) in bound {
        let stop = shutdown.clone();
        let failed = failed.clone();
        let rid = id.clone();
        receivers.push((
            id,
            tokio::spawn(async move {
                let r = rx.run(consumer, stop.clone()).await;
                if !stop.is_cancelled() {
                    match &r {
                        Err(e) => tracing::error!(receiver = %rid, error = %e, "receiver failed"),
                        Ok(()) => tracing::error!(receiver = %rid, "receiver stopped unexpectedly"),
                    }
                    failed.cancel();
                }
                r
            }),
        ));
    }
    health.set(true);
    Ok(Running {
        shutdown,
        telemetry_stop,
        receivers,
        processors,
        exporters,
        health,
        failed,
        shutdown_timeout: cfg.service.shutdown_timeout,
    })
}

impl Running {
    /// Stops receiving, drains every stage and delivers, within the shutdown timeout.
    /// Returns `false` if the deadline passed with work left.
    pub async fn stop(self) -> bool {
        self.health.set(false);
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let mut clean = true;
        for (id, h) in self.receivers {
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(receiver = %id, error = %e, "receiver stopped with an error")
                }
                Ok(Err(e)) => tracing::error!(receiver = %id, error = %e, "receiver task panicked"),
                Err(_) => {
                    tracing::error!(receiver = %id, "receiver did not stop before the shutdown deadline");
                    clean = false;
                }
            }
        }
        for h in self.processors {
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::error!("a pipeline stage did not drain before the shutdown deadline");
                clean = false;
            }
        }
        for (id, h) in self.exporters {
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::error!(exporter = %id, "exporter did not deliver everything before the shutdown deadline; undelivered spans are lost");
                clean = false;
            }
        }
        self.telemetry_stop.cancel();
        clean
    }
}
