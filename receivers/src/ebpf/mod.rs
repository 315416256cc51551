//! The `ebpf` receiver: tailweave's own kernel capture (Linux, x86_64). It turns what the kernel
//! sees on the sockets of watched processes into eBPF-derived spans (`c-p` / `s-p`) in the model
//! the `deepflow` receiver produces (`shared/docs/ebpf-spans.md` §7), so the `join` processor
//! places them as it places DeepFlow's.
//!
//! # Layout
//! - `receivers/bpf/`: the BPF program (C, GPL-compatible), its committed object and the
//!   Makefile that regenerates it. `cargo build` needs neither clang nor libbpf.
//! - [`event`]: the ring-buffer record.
//! - [`proto`]: HTTP/1.x, RESP and MySQL parsers (pure, per direction of a socket).
//! - [`session`]: per-socket detection, parsing and request/response pairing into [`session::Call`]s.
//! - [`span`]: calls into spans (`source = Ebpf`, `ebpf = Some(..)`).
//! - [`cgroup`]: `cgroups` entries (paths, container ids) resolved to cgroup ids and levels.
//! - [`caps`]: the capability check that makes start-up fail with a precise message.
//! - `kernel` (feature `ebpf`): loading, attaching, batched ring-buffer reading, the [`Receiver`].
//!
//! # Configuration
//!
//! ```yaml
//! receivers:
//!   ebpf:
//!     comm: [nginx, redis-server]   # process names (the kernel's 15-byte comm)
//!     pids: [4242]                  # and/or process ids
//!     cgroups: [system.slice/redis-server.service, 4f1c2d3e4f5a]  # and/or cgroup v2 paths, container ids
//!     all: false                    # true: every process but tailweave
//!     capture_bytes: 512            # payload prefix copied per syscall (max 1024)
//!     ring_buffer_size: 8388608     # bytes, a power of two
//!     wakeup_bytes: 262144          # the kernel wakes the reader per this much unread
//!     poll_interval: 50ms           # ... and the reader polls at least this often
//!     request_timeout: 60s          # a request unanswered this long leaves request-only
//! ```
//!
//! Never captured: tailweave's own process (filtered in the kernel), and any socket whose local
//! or remote port is one of tailweave's listen ports or export targets (the SDK's exports to
//! tailweave, tailweave's exports onward), plus `skip_ports`. The self-filter therefore has
//! nothing of tailweave's own traffic left to drop from this receiver.
//!
//! Privileges: root, or CAP_BPF + CAP_PERFMON. Without them `validate` and start-up both name
//! the missing capability, so the collector stops before any component serves. A build without
//! the `ebpf` cargo feature accepts the configuration and fails the same way, saying so.

pub mod caps;
pub mod cgroup;
pub mod event;
#[cfg(all(feature = "ebpf", target_os = "linux"))]
mod kernel;
pub mod proto;
pub mod session;
pub mod span;

use std::time::Duration;

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::{ComponentError, Receiver};

/// Kernel events read from the ring buffer, by `kind` (`data` / `close`).
pub const EVENTS: &str = "tailweave_ebpf_receiver_events_total";
/// Events lost before parsing, by `reason` (`ring_buffer_full`, `payload_fault`, `decode`).
pub const DROPPED_EVENTS: &str = "tailweave_ebpf_receiver_dropped_events_total";
/// sendfile/splice calls on captured sockets: their bytes are not parsed.
pub const UNPARSED_SYSCALLS: &str = "tailweave_ebpf_receiver_unparsed_syscalls_total";
/// Syscalls whose payload capture stopped short of `capture_bytes`, by `reason` (`iovec_limit`:
/// the bytes sat beyond the iovecs the kernel side walks).
pub const CUT_CAPTURES: &str = "tailweave_ebpf_receiver_cut_captures_total";
/// iovecs of one readv/writev/recvmsg/sendmsg whose bytes are captured (`MAX_IOV`).
pub const MAX_IOV: usize = 8;
/// Messages framed, by `protocol`.
pub const MESSAGES: &str = "tailweave_ebpf_receiver_messages_total";
/// Parser trouble, by `protocol` and `reason` (`truncated`, `garbage`, `lost`).
pub const PARSE_ERRORS: &str = "tailweave_ebpf_receiver_parse_errors_total";
/// Socket-level losses, by `reason` (`unknown_protocol`, `evicted`, `pending_overflow`,
/// `timed_out`).
pub const SOCKET_EVENTS: &str = "tailweave_ebpf_receiver_socket_events_total";
/// Spans made and handed on, or refused by a full pipeline (dropped: the kernel cannot wait).
pub const ACCEPTED_SPANS: &str = tailweave_core::names::RECEIVER_ACCEPTED_SPANS;
pub const REFUSED_SPANS: &str = tailweave_core::names::RECEIVER_REFUSED_SPANS;
/// Sockets tracked now.
pub const TRACKED_SOCKETS: &str = "tailweave_ebpf_receiver_tracked_sockets";

/// The message of a build without the kernel side.
pub const NO_FEATURE: &str = "tailweave was built without the ebpf feature \
     (rebuild with `cargo build --features tailweave-receivers/ebpf`)";

/// The largest payload prefix the BPF program can copy (`CAP_MAX`).
pub const MAX_CAPTURE_BYTES: u32 = 1024;
/// Longest process name the kernel keeps (`TASK_COMM_LEN` - 1).
pub const MAX_COMM: usize = 15;

/// Configuration of the `ebpf` receiver.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EbpfReceiverConfig {
    /// Process ids to watch. Default none.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// Process names to watch (the kernel's `comm` of the main thread, at most 15 bytes, e.g.
    /// `nginx`, `redis-server`). Default none.
    #[serde(default)]
    pub comm: Vec<String>,
    /// cgroup v2 groups to watch, with everything below them: a path (absolute, on a cgroup v2
    /// mount, or relative to the first cgroup v2 mount, e.g. `system.slice/nginx.service`) or
    /// a container id (12 to 64 hex digits, found by the cgroup named after it, e.g.
    /// `docker-<id>.scope`). Resolved once at start-up; at most 64. Default none.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Watch every process except tailweave itself. Default `false`.
    #[serde(default)]
    pub all: bool,
    /// Payload bytes copied per syscall, 1 to 1024. Default 512.
    #[serde(default = "default_capture_bytes")]
    pub capture_bytes: u32,
    /// Ring buffer size in bytes: a power of two, at least 64 KiB. Default 8 MiB.
    #[serde(default = "default_ring_buffer_size")]
    pub ring_buffer_size: u32,
    /// The kernel wakes the reader each time the unread data crosses a multiple of this many
    /// bytes; below `ring_buffer_size`. Default 256 KiB.
    #[serde(default = "default_wakeup_bytes")]
    pub wakeup_bytes: u32,
    /// The reader drains the ring buffer at least this often. Default 50ms.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A request without a response this long leaves as a request-only span. Default 60s.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Sockets tracked at once; the least recently used are dropped beyond it (counted).
    /// Default 65536.
    #[serde(default = "default_max_sockets")]
    pub max_sockets: usize,
    /// Requests waiting for a response per socket (pipelining depth). Default 64.
    #[serde(default = "default_max_pending")]
    pub max_pending_per_socket: usize,
    /// Spans per batch handed to the pipelines. Default 512.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Ports never captured, besides tailweave's own listen ports and export targets.
    /// Default none.
    #[serde(default)]
    pub skip_ports: Vec<u16>,
    /// The agent name written as `df.capture_info.agent`. Default: the host name.
    #[serde(default)]
    pub agent: Option<String>,
}

fn default_capture_bytes() -> u32 {
    512
}
fn default_ring_buffer_size() -> u32 {
    8 << 20
}
fn default_wakeup_bytes() -> u32 {
    256 << 10
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(50)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_sockets() -> usize {
    65536
}
fn default_max_pending() -> usize {
    64
}
fn default_max_batch() -> usize {
    512
}

impl Default for EbpfReceiverConfig {
    fn default() -> Self {
        EbpfReceiverConfig {
            pids: Vec::new(),
            comm: Vec::new(),
            cgroups: Vec::new(),
            all: false,
            capture_bytes: default_capture_bytes(),
            ring_buffer_size: default_ring_buffer_size(),
            wakeup_bytes: default_wakeup_bytes(),
            poll_interval: default_poll_interval(),
            request_timeout: default_request_timeout(),
            max_sockets: default_max_sockets(),
            max_pending_per_socket: default_max_pending(),
            max_batch: default_max_batch(),
            skip_ports: Vec::new(),
            agent: None,
        }
    }
}

impl EbpfReceiverConfig {
    /// Every problem with the configuration, and whether this build and this process can run
    /// it at all (the feature, the capabilities): a config check must fail where start-up would,
    /// before anything else starts.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = self.validate_settings();
        if issues.iter().all(|i| !i.path.starts_with("cgroups")) {
            for (i, r) in cgroup::resolve_all(&self.cgroups) {
                if let Err(e) = r {
                    issues.push(ConfigIssue::new(format!("cgroups[{i}]"), e.to_string()));
                }
            }
        }
        if !cfg!(all(feature = "ebpf", target_os = "linux")) {
            issues.push(ConfigIssue::new("", NO_FEATURE));
        } else {
            match caps::missing_here() {
                Ok(m) if m.is_empty() => {}
                Ok(m) => issues.push(ConfigIssue::new("", caps::message(&m))),
                Err(e) => issues.push(ConfigIssue::new("", e)),
            }
        }
        issues
    }

    /// The settings alone (pure).
    pub fn validate_settings(&self) -> Vec<ConfigIssue> {
        let mut v = Vec::new();
        if !self.all && self.pids.is_empty() && self.comm.is_empty() && self.cgroups.is_empty() {
            v.push(ConfigIssue::new(
                "",
                "nothing to watch: set `pids`, `comm`, `cgroups` or `all: true`",
            ));
        }
        for (i, c) in self.cgroups.iter().enumerate() {
            if let Some(m) = cgroup::check_entry(c) {
                v.push(ConfigIssue::new(format!("cgroups[{i}]"), m));
            }
        }
        if self.cgroups.len() > 64 {
            v.push(ConfigIssue::new("cgroups", "at most 64 cgroups"));
        }
        for (i, c) in self.comm.iter().enumerate() {
            if c.is_empty() || c.len() > MAX_COMM || c.contains('\0') {
                v.push(ConfigIssue::new(
                    format!("comm[{i}]"),
                    format!(
                        "process names are 1 to {MAX_COMM} bytes (the kernel's comm), got {c:?}"
                    ),
                ));
            }
        }
        if self.comm.len() > 64 {
            v.push(ConfigIssue::new("comm", "at most 64 names"));
        }
        if self.pids.len() > 1024 {
            v.push(ConfigIssue::new("pids", "at most 1024 pids"));
        }
        if let Some(i) = self.pids.iter().position(|&p| p == 0) {
            v.push(ConfigIssue::new(
                format!("pids[{i}]"),
                "0 is not a process id",
            ));
        }
        if self.capture_bytes == 0 || self.capture_bytes > MAX_CAPTURE_BYTES {
            v.push(ConfigIssue::new(
                "capture_bytes",
                format!("must be 1 to {MAX_CAPTURE_BYTES}"),
            ));
        }
        if !self.ring_buffer_size.is_power_of_two() || self.ring_buffer_size < (64 << 10) {
            v.push(ConfigIssue::new(
                "ring_buffer_size",
                "must be a power of two of at least 65536",
            ));
        }
        if self.wakeup_bytes == 0 || self.wakeup_bytes >= self.ring_buffer_size {
            v.push(ConfigIssue::new(
                "wakeup_bytes",
                "must be above 0 and below ring_buffer_size",
            ));
        }
        if self.poll_interval.is_zero() {
            v.push(ConfigIssue::new("poll_interval", "must be above 0"));
        }
        if self.request_timeout.is_zero() {
            v.push(ConfigIssue::new("request_timeout", "must be above 0"));
        }
        for (k, n) in [
            ("max_sockets", self.max_sockets),
            ("max_pending_per_socket", self.max_pending_per_socket),
            ("max_batch", self.max_batch),
        ] {
            if n == 0 {
                v.push(ConfigIssue::new(k, "must be above 0"));
            }
        }
        if self.skip_ports.len() > 200 {
            v.push(ConfigIssue::new("skip_ports", "at most 200 ports"));
        }
        v
    }

    /// The receiver listens on nothing.
    pub fn listen_addrs(&self) -> Vec<String> {
        Vec::new()
    }

    /// The session tracker's limits from this config.
    pub fn limits(&self) -> session::Limits {
        session::Limits {
            max_sockets: self.max_sockets,
            max_pending: self.max_pending_per_socket,
            request_timeout_ns: self.request_timeout.as_nanos().min(u64::MAX as u128) as u64,
            detect_tries: 8,
        }
    }

    /// Ports whose sockets are never captured: tailweave's own and `skip_ports`.
    pub fn skipped_ports(&self, ctx: &BuildContext) -> Vec<u16> {
        let mut ports: Vec<u16> = ctx.self_info.listen_ports.clone();
        for e in &ctx.self_info.exporter_endpoints {
            let e = e.rsplit('/').next().unwrap_or(e);
            if let Some(p) = e.rsplit(':').next().and_then(|p| p.parse().ok()) {
                ports.push(p);
            }
        }
        ports.extend(&self.skip_ports);
        ports.sort_unstable();
        ports.dedup();
        ports.retain(|&p| p != 0);
        ports
    }

    /// Loads and attaches the kernel side. Fails (and nothing stays attached) without the
    /// feature, without privileges, or when the kernel refuses the program.
    pub async fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Receiver>, ComponentError> {
        #[cfg(all(feature = "ebpf", target_os = "linux"))]
        {
            let missing = caps::missing_here().map_err(|e| ComponentError::build(&ctx.id, e))?;
            if !missing.is_empty() {
                return Err(ComponentError::build(&ctx.id, caps::message(&missing)));
            }
            kernel::EbpfReceiver::start(self, ctx).map(|r| Box::new(r) as Box<dyn Receiver>)
        }
        #[cfg(not(all(feature = "ebpf", target_os = "linux")))]
        {
            Err(ComponentError::build(&ctx.id, NO_FEATURE))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tailweave_core::config::{parse, SelfInfo};

    fn cfg(yaml: &str) -> EbpfReceiverConfig {
        parse(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn defaults_and_full_config() {
        let c = cfg("comm: [nginx]");
        assert_eq!(c.capture_bytes, 512);
        assert_eq!(c.poll_interval, Duration::from_millis(50));
        assert!(c.validate_settings().is_empty());
        let c = cfg(
            "pids: [1, 2]\ncomm: [redis-server]\ncapture_bytes: 1024\nring_buffer_size: 65536\n\
             wakeup_bytes: 4096\npoll_interval: 10ms\nrequest_timeout: 2s\nmax_sockets: 10\n\
             max_pending_per_socket: 1\nmax_batch: 1\nskip_ports: [9999]\nagent: node-a",
        );
        assert!(
            c.validate_settings().is_empty(),
            "{:?}",
            c.validate_settings()
        );
        assert!(parse::<EbpfReceiverConfig>(serde_yaml::from_str("bogus: 1").unwrap()).is_err());
    }

    #[test]
    fn every_problem_with_its_path() {
        let c = cfg(
            "comm: ['', averyveryverylongname]\npids: [0]\ncapture_bytes: 2048\n\
             ring_buffer_size: 100000\nwakeup_bytes: 0\npoll_interval: 0s\nmax_batch: 0",
        );
        let paths: Vec<String> = c.validate_settings().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            [
                "comm[0]",
                "comm[1]",
                "pids[0]",
                "capture_bytes",
                "ring_buffer_size",
                "wakeup_bytes",
                "poll_interval",
                "max_batch"
            ]
        );
        let nothing = EbpfReceiverConfig::default().validate_settings();
        assert!(nothing[0].message.contains("nothing to watch"));
    }

    #[test]
    fn validate_reports_what_start_up_would() {
        let issues = cfg("all: true").validate();
        if cfg!(feature = "ebpf") {
            let missing = caps::missing_here().unwrap();
            assert_eq!(issues.is_empty(), missing.is_empty(), "{issues:?}");
        } else {
            assert_eq!(issues.len(), 1);
            assert!(issues[0].message.contains("built without the ebpf feature"));
        }
    }

    #[test]
    fn cgroups_are_checked_with_their_key_paths() {
        let c = cfg("cgroups: ['', 'a/../b']");
        let paths: Vec<String> = c.validate_settings().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["cgroups[0]", "cgroups[1]"]);
        // A cgroup that does not exist on this host is named with its index, whatever the host
        // (no cgroup v2 at all is reported there too).
        let c = cfg("comm: [nginx]\ncgroups: [system.slice, tailweave-no-such-cgroup/x]");
        let issues = c.validate();
        let bad: Vec<_> = issues
            .iter()
            .filter(|i| i.path.starts_with("cgroups"))
            .collect();
        assert!(!bad.is_empty(), "{issues:?}");
        assert!(
            bad.iter().any(|i| i.path == "cgroups[1]"
                && (i.message.contains("tailweave-no-such-cgroup")
                    || i.message.contains("no cgroup v2"))),
            "{issues:?}"
        );
        assert!(c.validate_settings().is_empty());
    }

    #[test]
    fn own_ports_are_skipped() {
        let ctx = BuildContext {
            id: "ebpf".into(),
            pipeline: String::new(),
            self_info: Arc::new(SelfInfo {
                listen_ports: vec![4317, 8888],
                exporter_endpoints: vec!["http://backend:4317".into(), "10.0.0.1:9411".into()],
                ..SelfInfo::default()
            }),
        };
        let c = cfg("all: true\nskip_ports: [22]");
        assert_eq!(c.skipped_ports(&ctx), [22, 4317, 8888, 9411]);
    }

    #[cfg(not(feature = "ebpf"))]
    #[tokio::test]
    async fn build_without_the_feature_says_so() {
        let ctx = BuildContext {
            id: "ebpf".into(),
            ..BuildContext::default()
        };
        let err = cfg("all: true").build(&ctx).await.err().expect("must fail");
        assert!(err
            .to_string()
            .contains("tailweave was built without the ebpf feature"));
    }
}
