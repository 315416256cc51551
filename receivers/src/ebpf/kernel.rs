//! The kernel side: load the committed BPF object with aya, fill its filter maps, attach it to
//! the raw `sys_exit` tracepoint, and read its ring buffer in batches.
//!
//! The kernel wakes the reader only when the unread data crosses a multiple of `wakeup_bytes`
//! (a reader still draining is not woken again per record: that cost the watched process an
//! IPI per record and tripled the program's time per run); the reader also
//! drains every `poll_interval`, so a quiet system still delivers within one interval and a busy
//! one costs a wake-up per batch rather than per event. Every drain turns events into calls
//! (session), calls into spans (span) and hands them on in batches of at most `max_batch`.
//! Kernel-side losses (ring buffer full, unreadable payloads) are read from a per-CPU counter map
//! on every tick and added to the metrics.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};
use tailweave_core::config::BuildContext;
use tailweave_core::{ComponentError, Consumer, Receiver, Span, SpanBatch};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;

use super::cgroup;
use super::event::{Event, Kind};
use super::proto::{ParseStats, L7};
use super::session::{Call, Tracker, TrackerStats};
use super::span::SpanBuilder;
use super::{
    EbpfReceiverConfig, ACCEPTED_SPANS, CUT_CAPTURES, DROPPED_EVENTS, EVENTS, MESSAGES,
    PARSE_ERRORS, REFUSED_SPANS, SOCKET_EVENTS, TRACKED_SOCKETS, UNPARSED_SYSCALLS,
};

/// The compiled program (`make -C receivers/bpf` regenerates it).
static OBJECT: &[u8] = include_bytes!("../../bpf/tailweave_socket.bpf.o");
const PROGRAM: &str = "tw_sys_exit";
/// Indexes of the `counters` map (`enum counter` in the C source).
const C_EVENTS: u32 = 0;
const C_RINGBUF_FULL: u32 = 1;
const C_READ_FAULT: u32 = 2;
const C_UNPARSED_SYSCALL: u32 = 3;
const C_IOV_CUT: u32 = 4;
const N_COUNTERS: usize = 5;
/// How long a batch waits for room in a full pipeline before it is dropped (counted). Meanwhile
/// the ring buffer absorbs the kernel's events; past its size the kernel drops (counted too).
const SEND_PATIENCE: Duration = Duration::from_secs(1);
/// Events handled per drain before the loop yields (the rest wait for the next turn).
const MAX_EVENTS_PER_DRAIN: usize = 65536;

pub struct EbpfReceiver {
    id: String,
    /// Keeps the program attached and the maps alive; dropping it detaches.
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    tracker: Tracker,
    builder: SpanBuilder,
    poll_interval: Duration,
    max_batch: usize,
    reported: Reported,
}

/// Counter values already added to the metrics (the sources are cumulative).
#[derive(Default)]
struct Reported {
    kernel: [u64; N_COUNTERS],
    tracker: TrackerStats,
    parse: HashMap<L7, ParseStats>,
}

fn err(id: &str, what: &str, e: impl std::fmt::Display) -> ComponentError {
    ComponentError::build(id, format!("{what}: {e}"))
}

fn mono_to_unix_offset() -> i128 {
    let real = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let ns = |t: rustix::time::Timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
    ns(real) - ns(mono)
}

fn comm_key(c: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    let b = c.as_bytes();
    k[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
    k
}

fn host_name(ctx: &BuildContext) -> String {
    if !ctx.self_info.host_name.is_empty() {
        return ctx.self_info.host_name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl EbpfReceiver {
    /// Loads, configures and attaches. Any failure leaves nothing attached (the `Ebpf` drops).
    pub fn start(
        cfg: &EbpfReceiverConfig,
        ctx: &BuildContext,
    ) -> Result<EbpfReceiver, ComponentError> {
        let id = ctx.id.as_str();
        let object = OBJECT.to_vec();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("events", cfg.ring_buffer_size)
            .load(&object)
            .map_err(|e| err(id, "loading the BPF object failed", e))?;

        let self_pid = std::process::id();
        let mut cgroups = Vec::new();
        for (i, r) in cgroup::resolve_all(&cfg.cgroups) {
            cgroups.push(r.map_err(|e| err(id, &format!("cgroups[{i}]"), e))?);
        }
        let cgroup_levels = cgroups.iter().fold(0u32, |m, c| m | 1 << c.level);
        {
            // `struct config` in the C source, field by field.
            let mut conf: Array<_, [u32; 6]> = Array::try_from(
                ebpf.map_mut("config_map")
                    .ok_or_else(|| err(id, "BPF object", "no config_map"))?,
            )
            .map_err(|e| err(id, "config_map", e))?;
            let watch_all = u32::from(cfg.all);
            conf.set(
                0,
                [
                    self_pid,
                    watch_all,
                    cfg.capture_bytes,
                    cfg.wakeup_bytes,
                    cgroup_levels,
                    cfg.comm.len() as u32,
                ],
                0,
            )
            .map_err(|e| err(id, "config_map", e))?;
        }
        {
            let mut pids: BpfHashMap<_, u32, u8> = BpfHashMap::try_from(
                ebpf.map_mut("watch_pids")
                    .ok_or_else(|| err(id, "BPF object", "no watch_pids"))?,
            )
            .map_err(|e| err(id, "watch_pids", e))?;
            for &p in cfg.pids.iter().filter(|&&p| p != self_pid) {
                pids.insert(p, 1, 0).map_err(|e| err(id, "watch_pids", e))?;
            }
        }
        {
            let mut comms: BpfHashMap<_, [u8; 16], u8> = BpfHashMap::try_from(
                ebpf.map_mut("watch_comms")
                    .ok_or_else(|| err(id, "BPF object", "no watch_comms"))?,
            )
            .map_err(|e| err(id, "watch_comms", e))?;
            for c in &cfg.comm {
                comms
                    .insert(comm_key(c), 1, 0)
                    .map_err(|e| err(id, "watch_comms", e))?;
            }
        }
        {
            let mut ids: BpfHashMap<_, u64, u8> = BpfHashMap::try_from(
                ebpf.map_mut("watch_cgroups")
                    .ok_or_else(|| err(id, "BPF object", "no watch_cgroups"))?,
            )
            .map_err(|e| err(id, "watch_cgroups", e))?;
            for c in &cgroups {
                ids.insert(c.id, 1, 0)
                    .map_err(|e| err(id, "watch_cgroups", e))?;
            }
        }
        {
            let mut ports: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
                ebpf.map_mut("skip_ports")
                    .ok_or_else(|| err(id, "BPF object", "no skip_ports"))?,
            )
            .map_err(|e| err(id, "skip_ports", e))?;
            for p in cfg.skipped_ports(ctx) {
                ports
                    .insert(p, 1, 0)
                    .map_err(|e| err(id, "skip_ports", e))?;
            }
        }
        let ring = RingBuf::try_from(
            ebpf.take_map("events")
                .ok_or_else(|| err(id, "BPF object", "no events map"))?,
        )
        .map_err(|e| err(id, "events", e))?;

        let btf = Btf::from_sys_fs().map_err(|e| {
            err(
                id,
                "reading the kernel's BTF (/sys/kernel/btf/vmlinux) failed",
                e,
            )
        })?;
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| err(id, "BPF object", "no program"))?
            .try_into()
            .map_err(|e| err(id, "BPF program", e))?;
        prog.load("sys_exit", &btf)
            .map_err(|e| err(id, "the kernel refused the BPF program", e))?;
        prog.attach()
            .map_err(|e| err(id, "attaching to the sys_exit tracepoint failed", e))?;

        let agent = cfg.agent.clone().unwrap_or_else(|| host_name(ctx));
        let cgroup_paths: Vec<_> = cgroups
            .iter()
            .map(|c| c.path.display().to_string())
            .collect();
        tracing::info!(receiver = %id, comm = ?cfg.comm, pids = ?cfg.pids, cgroups = ?cgroup_paths,
            all = cfg.all, "ebpf receiver attached to sys_exit");
        Ok(EbpfReceiver {
            id: ctx.id.clone(),
            ebpf,
            ring,
            tracker: Tracker::new(cfg.limits(), mono_to_unix_offset()),
            builder: SpanBuilder::new(&agent, &host_name(ctx)),
            poll_interval: cfg.poll_interval,
            max_batch: cfg.max_batch,
            reported: Reported::default(),
        })
    }
}

/// Reads what the ring buffer holds (bounded), returning the finished calls.
fn drain(ring: &mut RingBuf<MapData>, tracker: &mut Tracker, id: &str, calls: &mut Vec<Call>) {
    let (mut data, mut close, mut bad) = (0u64, 0u64, 0u64);
    for _ in 0..MAX_EVENTS_PER_DRAIN {
        let Some(item) = ring.next() else {
            break;
        };
        match Event::decode(&item) {
            Ok(ev) => {
                match ev.kind {
                    Kind::Data => data += 1,
                    Kind::Close => close += 1,
                }
                tracker.on_event(&ev, calls);
            }
            Err(_) => bad += 1,
        }
    }
    if data > 0 {
        metrics::counter!(EVENTS, "receiver" => id.to_string(), "kind" => "data").increment(data);
    }
    if close > 0 {
        metrics::counter!(EVENTS, "receiver" => id.to_string(), "kind" => "close").increment(close);
    }
    if bad > 0 {
        metrics::counter!(DROPPED_EVENTS, "receiver" => id.to_string(), "reason" => "decode")
            .increment(bad);
    }
}

/// Adds what the kernel and the parsers counted since the last report.
fn report(id: &str, ebpf: &Ebpf, tracker: &Tracker, reported: &mut Reported) {
    let id = id.to_string();
    if let Some(m) = ebpf.map("counters") {
        if let Ok(counters) = PerCpuArray::<_, u64>::try_from(m) {
            let mut now = [0u64; N_COUNTERS];
            for (i, slot) in now.iter_mut().enumerate() {
                if let Ok(v) = counters.get(&(i as u32), 0) {
                    *slot = v.iter().sum();
                }
            }
            let delta = |i: u32| now[i as usize].saturating_sub(reported.kernel[i as usize]);
            let full = delta(C_RINGBUF_FULL);
            let fault = delta(C_READ_FAULT);
            let unparsed = delta(C_UNPARSED_SYSCALL);
            let cut = delta(C_IOV_CUT);
            let _ = delta(C_EVENTS);
            if full > 0 {
                metrics::counter!(DROPPED_EVENTS, "receiver" => id.clone(), "reason" => "ring_buffer_full")
                    .increment(full);
            }
            if fault > 0 {
                metrics::counter!(DROPPED_EVENTS, "receiver" => id.clone(), "reason" => "payload_fault")
                    .increment(fault);
            }
            if unparsed > 0 {
                metrics::counter!(UNPARSED_SYSCALLS, "receiver" => id.clone()).increment(unparsed);
            }
            if cut > 0 {
                metrics::counter!(CUT_CAPTURES, "receiver" => id.clone(), "reason" => "iovec_limit")
                    .increment(cut);
            }
            reported.kernel = now;
        }
    }
    let t = tracker.stats;
    let r = reported.tracker;
    for (reason, now, was) in [
        ("unknown_protocol", t.unknown_protocol, r.unknown_protocol),
        ("evicted", t.evicted_sockets, r.evicted_sockets),
        ("pending_overflow", t.pending_overflow, r.pending_overflow),
        ("timed_out", t.timed_out, r.timed_out),
    ] {
        if now > was {
            metrics::counter!(SOCKET_EVENTS, "receiver" => id.clone(), "reason" => reason)
                .increment(now - was);
        }
    }
    reported.tracker = t;
    for (l7, s) in tracker.parse_stats() {
        let was = reported.parse.get(&l7).copied().unwrap_or_default();
        let p = l7.as_str();
        if s.messages > was.messages {
            metrics::counter!(MESSAGES, "receiver" => id.clone(), "protocol" => p)
                .increment(s.messages - was.messages);
        }
        for (reason, now, before) in [
            ("truncated", s.truncated, was.truncated),
            ("garbage", s.garbage, was.garbage),
            ("lost", s.lost, was.lost),
        ] {
            if now > before {
                metrics::counter!(PARSE_ERRORS, "receiver" => id.clone(), "protocol" => p,
                    "reason" => reason)
                .increment(now - before);
            }
        }
        reported.parse.insert(l7, s);
    }
    metrics::gauge!(TRACKED_SOCKETS, "receiver" => id).set(tracker.sockets() as f64);
}

/// Hands spans on in batches. A pipeline that stays full for `patience` loses the batch
/// (counted): the kernel cannot be made to wait, and a stalled reader only moves the loss into
/// the ring buffer.
async fn send_spans(
    id: &str,
    max_batch: usize,
    patience: Duration,
    out: &Consumer,
    spans: &mut Vec<Span>,
) {
    while !spans.is_empty() {
        let n = spans.len().min(max_batch.max(1));
        let batch: Vec<Span> = spans.drain(..n).collect();
        let count = batch.len() as u64;
        let reason = match tokio::time::timeout(patience, out.send(SpanBatch::new(batch))).await {
            Ok(Ok(())) => {
                metrics::counter!(ACCEPTED_SPANS, "receiver" => id.to_string(),
                    "transport" => "kernel")
                .increment(count);
                continue;
            }
            Ok(Err(r)) => r.as_str(),
            Err(_) => "pipeline_full",
        };
        metrics::counter!(REFUSED_SPANS, "receiver" => id.to_string(), "transport" => "kernel",
            "reason" => reason)
        .increment(count);
    }
}

#[async_trait]
impl Receiver for EbpfReceiver {
    async fn run(
        self: Box<Self>,
        out: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), ComponentError> {
        let me = *self;
        let EbpfReceiver {
            id,
            ebpf,
            ring,
            mut tracker,
            mut builder,
            poll_interval,
            max_batch,
            mut reported,
        } = me;
        // The waiter owns the ring buffer (and so its fd) and deregisters before the fd closes,
        // which is the I/O-safety condition tokio's deprecation is about; the sound replacement
        // is an `unsafe fn`, which this workspace forbids.
        #[allow(deprecated)]
        let mut waiter = AsyncFd::with_interest(ring, Interest::READABLE)
            .map_err(|e| ComponentError::runtime(&id, format!("polling the ring buffer: {e}")))?;
        let mut tick = tokio::time::interval(poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut calls = Vec::new();
        let mut spans = Vec::new();
        loop {
            let ticked = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = waiter.readable_mut() => {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    false
                }
                _ = tick.tick() => true,
            };
            drain(waiter.get_mut(), &mut tracker, &id, &mut calls);
            if ticked {
                tracker.tick(unix_now_ns(), &mut calls);
                report(&id, &ebpf, &tracker, &mut reported);
            }
            spans.extend(calls.drain(..).map(|c| builder.build(&c)));
            send_spans(&id, max_batch, SEND_PATIENCE, &out, &mut spans).await;
        }
        // Detach first so the ring buffer stops filling, then hand on what is left.
        drop(ebpf);
        let mut ring = waiter.into_inner();
        drain(&mut ring, &mut tracker, &id, &mut calls);
        tracker.flush(&mut calls);
        spans.extend(calls.drain(..).map(|c| builder.build(&c)));
        send_spans(&id, max_batch, SEND_PATIENCE * 2, &out, &mut spans).await;
        Ok(())
    }
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::caps;
    use std::process::{Command, Stdio};
    use tailweave_core::ebpf::TapSide;
    use tokio::sync::mpsc;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    }

    /// Needs root (CI runs as root); elsewhere it says why it did not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn captures_both_ends_of_a_loopback_http_call() {
        if !caps::missing_here().map(|m| m.is_empty()).unwrap_or(false) {
            eprintln!("skipped: needs CAP_BPF and CAP_PERFMON (run as root)");
            return;
        }
        let port = free_port();
        let mut server = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "http.server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cfg = EbpfReceiverConfig {
            pids: vec![server.id()],
            comm: vec!["curl".into()],
            poll_interval: Duration::from_millis(20),
            ..EbpfReceiverConfig::default()
        };
        let ctx = BuildContext {
            id: "ebpf".into(),
            ..BuildContext::default()
        };
        let rx = EbpfReceiver::start(&cfg, &ctx).expect("load and attach");
        let (tx, mut spans_rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(Box::new(rx).run(Consumer::new(vec![tx], None), stop.clone()));
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let st = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-H", &format!("traceparent: {tp}")])
            .arg(format!("http://127.0.0.1:{port}/nothing-here?q=1"))
            .status()
            .expect("curl");
        assert!(st.success());
        let mut got: Vec<Span> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got
            .iter()
            .filter(|s| s.name() == "GET /nothing-here")
            .count()
            < 2
        {
            match tokio::time::timeout_at(deadline, spans_rx.recv()).await {
                Ok(Some(b)) => got.extend(b.spans),
                _ => break,
            }
        }
        stop.cancel();
        let _ = task.await;
        let _ = server.kill();
        let _ = server.wait();
        let get: Vec<&Span> = got
            .iter()
            .filter(|s| s.name() == "GET /nothing-here")
            .collect();
        assert_eq!(
            get.len(),
            2,
            "spans: {:#?}",
            got.iter()
                .map(|s| (s.name(), s.ebpf.as_deref()))
                .collect::<Vec<_>>()
        );
        let e = |tap: TapSide| {
            get.iter()
                .find_map(|s| s.ebpf.as_deref().filter(|e| e.tap_side == tap))
                .unwrap_or_else(|| panic!("no {tap:?} span"))
        };
        let (cp, sp) = (e(TapSide::CP), e(TapSide::SP));
        // Both ends saw the same bytes: the sequence numbers agree, as in tcpdump.
        assert_ne!(cp.req_tcp_seq, 0);
        assert_eq!(cp.req_tcp_seq, sp.req_tcp_seq, "c-p {cp:?}\ns-p {sp:?}");
        assert_eq!(cp.resp_tcp_seq, sp.resp_tcp_seq, "c-p {cp:?}\ns-p {sp:?}");
        assert_eq!(cp.port, sp.port);
        assert_eq!(sp.port[1], port);
        assert_eq!(sp.pid[1], server.id());
        for s in &get {
            assert_eq!(s.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
            assert_eq!(
                s.attr("http.status_code").and_then(|v| v.as_i64()),
                Some(404)
            );
        }
        // The server read the request (new id) and wrote the answer under the same id.
        assert_ne!(sp.syscall_req, 0);
        assert_eq!(sp.syscall_req, sp.syscall_resp);
    }

    fn privileged() -> bool {
        if caps::missing_here().map(|m| m.is_empty()).unwrap_or(false) {
            return true;
        }
        eprintln!("skipped: needs CAP_BPF and CAP_PERFMON (run as root)");
        false
    }

    /// A child killed and reaped on drop.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The real interpreter behind `python3` (pyenv shims are scripts: their pid is not the
    /// interpreter's until they exec, and the tests watch pids).
    fn python() -> String {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Python's http.server on a free loopback port (answers 404 with a Content-Length, then
    /// closes: HTTP/1.0).
    async fn http_server() -> (Child, u16) {
        let port = free_port();
        let server = Child(
            Command::new(python())
                .args([
                    "-m",
                    "http.server",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 http.server"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "http.server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (server, port)
    }

    /// A started receiver and the spans it hands on.
    struct Running {
        spans: mpsc::Receiver<SpanBatch>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ComponentError>>,
        got: Vec<Span>,
    }

    fn run(cfg: EbpfReceiverConfig) -> Running {
        let ctx = BuildContext {
            id: "ebpf".into(),
            ..BuildContext::default()
        };
        let rx = EbpfReceiver::start(&cfg, &ctx).expect("load and attach");
        let (tx, spans) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(Box::new(rx).run(Consumer::new(vec![tx], None), stop.clone()));
        Running {
            spans,
            stop,
            task,
            got: Vec::new(),
        }
    }

    impl Running {
        /// Collects spans until `done` holds or 10s pass (then the caller's asserts say what is
        /// missing).
        async fn until(&mut self, done: impl Fn(&[Span]) -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !done(&self.got) {
                match tokio::time::timeout_at(deadline, self.spans.recv()).await {
                    Ok(Some(b)) => self.got.extend(b.spans),
                    _ => break,
                }
            }
        }

        async fn stop(self) -> Vec<Span> {
            self.stop.cancel();
            let _ = self.task.await;
            self.got
        }
    }

    fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
        spans.iter().filter(|s| s.name() == name).collect()
    }

    fn describe(spans: &[Span]) -> Vec<(&str, Option<&tailweave_core::ebpf::EbpfSpan>)> {
        spans
            .iter()
            .map(|s| (s.name(), s.ebpf.as_deref()))
            .collect()
    }

    /// Requests whose headers are spread over several buffers of one sendmsg / writev are
    /// parsed as one: the traceparent sits in the third buffer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_written_from_several_buffers_is_parsed_as_one() {
        if !privileged() {
            return;
        }
        let (_server, port) = http_server().await;
        let script = r#"
import os, socket, sys
port = int(sys.argv[1])
sys.stdin.readline()
def call(send, path, trace):
    s = socket.create_connection(("127.0.0.1", port))
    send(s, [b"GET " + path + b" HTTP/1.1\r\n", b"Host: x\r\n",
             b"traceparent: 00-" + trace + b"-b7ad6b7169203331-01\r\n", b"\r\n"])
    while s.recv(65536):
        pass
    s.close()
call(lambda s, bufs: s.sendmsg(bufs), b"/multi-sendmsg", sys.argv[2].encode())
call(lambda s, bufs: os.writev(s.fileno(), bufs), b"/multi-writev", sys.argv[3].encode())
print("done", flush=True)
"#;
        let (ta, tb) = (
            "0af7651916cd43dd8448eb211c80319c",
            "1bf7651916cd43dd8448eb211c80319d",
        );
        let mut client = Child(
            Command::new(python())
                .args(["-c", script, &port.to_string(), ta, tb])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 client"),
        );
        let mut running = run(EbpfReceiverConfig {
            pids: vec![client.0.id()],
            poll_interval: Duration::from_millis(20),
            ..EbpfReceiverConfig::default()
        });
        {
            use std::io::{BufRead, Write};
            let mut stdin = client.0.stdin.take().expect("stdin");
            stdin.write_all(b"go\n").expect("start the client");
            drop(stdin);
            let mut line = String::new();
            std::io::BufReader::new(client.0.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("client output");
            assert_eq!(line.trim(), "done");
        }
        running
            .until(|got| {
                !named(got, "GET /multi-sendmsg").is_empty()
                    && !named(got, "GET /multi-writev").is_empty()
            })
            .await;
        let got = running.stop().await;
        for (name, trace) in [("GET /multi-sendmsg", ta), ("GET /multi-writev", tb)] {
            let spans = named(&got, name);
            assert_eq!(spans.len(), 1, "{name}: {:#?}", describe(&got));
            let s = spans[0];
            assert_eq!(s.ebpf.as_deref().map(|e| &e.tap_side), Some(&TapSide::CP));
            assert_eq!(s.trace_id.to_hex(), trace, "{name}: {:#?}", s.ebpf);
            assert_eq!(
                s.attr("http.status_code").and_then(|v| v.as_i64()),
                Some(404)
            );
        }
    }

    /// A cgroup the test creates and removes (children first) on drop.
    struct TestCgroup(Vec<std::path::PathBuf>);

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                let _ = std::fs::remove_dir(p);
            }
        }
    }

    /// `cgroups: [dir]` captures a process in a cgroup below dir and not one outside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watched_cgroup_is_captured_and_a_process_outside_is_not() {
        if !privileged() {
            return;
        }
        let Some(mount) = cgroup::host_mounts()
            .ok()
            .and_then(|m| m.into_iter().find(|m| m.root == std::path::Path::new("/")))
        else {
            eprintln!("skipped: no cgroup v2 hierarchy mounted at its root");
            return;
        };
        let top = mount
            .point
            .join(format!("tailweave-test-{}", std::process::id()));
        let leaf = top.join("leaf");
        if let Err(e) = std::fs::create_dir_all(&leaf) {
            eprintln!("skipped: cannot create {}: {e}", leaf.display());
            return;
        }
        let _cg = TestCgroup(vec![top.clone(), leaf.clone()]);
        let (_server, port) = http_server().await;
        let mut running = run(EbpfReceiverConfig {
            cgroups: vec![top.display().to_string()],
            poll_interval: Duration::from_millis(20),
            ..EbpfReceiverConfig::default()
        });
        let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");
        let outside = Command::new("curl")
            .args(["-s", "-o", "/dev/null", &url("outside-cgroup")])
            .status()
            .expect("curl");
        assert!(outside.success());
        // The shell joins the leaf cgroup, then becomes curl (same pid).
        let procs = leaf.join("cgroup.procs");
        let mut inside = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec curl -s -o /dev/null {}",
                procs.display(),
                url("inside-cgroup")
            ))
            .spawn()
            .expect("sh");
        let inside_pid = inside.id();
        assert!(inside.wait().expect("curl in the cgroup").success());
        running
            .until(|got| !named(got, "GET /inside-cgroup").is_empty())
            .await;
        let got = running.stop().await;
        let ins = named(&got, "GET /inside-cgroup");
        assert_eq!(ins.len(), 1, "{:#?}", describe(&got));
        let e = ins[0].ebpf.as_deref().expect("ebpf model");
        assert_eq!(e.tap_side, TapSide::CP);
        assert_eq!(e.pid[0], inside_pid, "{e:?}");
        // The server (outside) is not watched either: only the client side shows.
        assert_eq!(got.len(), 1, "{:#?}", describe(&got));
        assert!(named(&got, "GET /outside-cgroup").is_empty());
    }
}
