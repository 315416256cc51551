//! `join` configuration (`shared/docs/join.md` §8).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tailweave_core::config::ConfigIssue;

/// The `join` processor's settings. Every field has a default, so `join:` alone is valid.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// How spans are assigned to tenants; spans of different tenants are never joined (join.md §2).
    pub tenant: TenantConfig,
    /// Time tolerances of the association rules (join.md §1 `dev`, §4.2 `app_slack`).
    pub tolerance: ToleranceConfig,
    /// How long a trace waits for related spans before it is emitted (join.md §5.4, §5.5).
    pub wait: WaitConfig,
    /// Guards of the syscall trace id rule (join.md §4.4).
    pub syscall: SyscallConfig,
    /// Allow one unit to hold spans of several trace ids when eBPF keys bridge them (join.md §5.3).
    /// Default `false`, as DeepFlow's `allow_multiple_trace_ids_in_tracing_result`.
    pub allow_multiple_trace_ids: bool,
    /// What happens to eBPF spans that associate with no SDK trace: `drop` (default, counted) or
    /// `passthrough` (emitted unchanged, one unit per span).
    pub unassociated_ebpf: Unassociated,
    /// Largest unit. A trace reaching it is emitted early (counted in
    /// `tailweave_join_limit_total`); a union that would exceed it is refused. Default 1000.
    pub max_spans_per_trace: usize,
    /// Most spans held at once. At the cap the group seen first is emitted early (counted in
    /// `tailweave_join_forced_flush_total`). Default 1 000 000.
    pub max_pending_spans: usize,
    /// Write `tailweave.join.clock_offset_us` on spans of agents whose clock was corrected for
    /// ordering (join.md §6 F). Default `false`.
    pub emit_clock_offset: bool,
    /// Where the spans the join holds are kept: `memory` (default; a restart loses them) or
    /// `file`: an append-only log under `directory`, replayed at start, so a restart (even
    /// `kill -9`) neither loses an acknowledged span nor emits a unit twice when avoidable.
    pub storage: StorageKind,
    /// Directory of the log with `storage: file` (one file per pipeline and processor, named
    /// `<pipeline>_<id>.log`); required then. No default.
    pub directory: Option<PathBuf>,
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            tenant: TenantConfig::default(),
            tolerance: ToleranceConfig::default(),
            wait: WaitConfig::default(),
            syscall: SyscallConfig::default(),
            allow_multiple_trace_ids: false,
            unassociated_ebpf: Unassociated::Drop,
            max_spans_per_trace: 1000,
            max_pending_spans: 1_000_000,
            emit_clock_offset: false,
            storage: StorageKind::Memory,
            directory: None,
        }
    }
}

/// Where the join keeps the spans it holds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// In memory only (`none` is accepted too, as `tail_sampling` spells it).
    #[default]
    #[serde(alias = "none")]
    Memory,
    /// An append-only log under `directory`.
    File,
}

/// Tenant keys (join.md §2).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Resource attributes of SDK spans; the first non-empty one is the tenant.
    /// Default `[k8s.namespace.name]`.
    pub sdk_keys: Vec<String>,
    /// Base names of eBPF resource attributes; `_0` or `_1` is appended by the span's local side.
    /// Default `[df.universal_tag.pod_ns]`.
    pub ebpf_keys: Vec<String>,
    /// Spans with no tenant: `isolate` (default: they form the tenant `""`) or `drop` (counted).
    pub unknown: UnknownTenant,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            sdk_keys: vec!["k8s.namespace.name".into()],
            ebpf_keys: vec!["df.universal_tag.pod_ns".into()],
            unknown: UnknownTenant::Isolate,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTenant {
    /// Spans without a tenant join only each other.
    #[default]
    Isolate,
    /// Spans without a tenant are dropped and counted.
    Drop,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unassociated {
    /// Dropped and counted (`tailweave_join_unassociated_total{action="drop"}`).
    #[default]
    Drop,
    /// Emitted unchanged, with DeepFlow's ids, one unit per span.
    Passthrough,
}

/// Time tolerances.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ToleranceConfig {
    /// Allowed deviation between two rows of one agent (DeepFlow `network_delay_us`). Default 50ms.
    #[serde(with = "humantime_serde")]
    pub network_delay: Duration,
    /// Added to `network_delay` across agents (DeepFlow `host_clock_offset_us`). Default 10ms.
    #[serde(with = "humantime_serde")]
    pub host_clock_offset: Duration,
    /// Timestamp precision of SDK spans when compared with eBPF spans of the same host. Default 1ms.
    #[serde(with = "humantime_serde")]
    pub app_slack: Duration,
}

impl Default for ToleranceConfig {
    fn default() -> Self {
        ToleranceConfig {
            network_delay: Duration::from_millis(50),
            host_clock_offset: Duration::from_millis(10),
            app_slack: Duration::from_millis(1),
        }
    }
}

/// Waits (join.md §5.4, §5.5).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WaitConfig {
    /// A trace with an SDK span is emitted no earlier than this after its first SDK span arrived
    /// (covers DeepFlow's export delay). Default 15s.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// ... and no earlier than this after its last span arrived. Default 5s.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// A trace is emitted at the latest this long after its first SDK span arrived. Default 60s.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// eBPF spans that joined no SDK trace are given up (`unassociated_ebpf`) this long after the
    /// first of them arrived. Default: `max`.
    #[serde(with = "humantime_serde::option")]
    pub orphan_ttl: Option<Duration>,
    /// How long an emitted trace is remembered, so late spans follow it as `late` units. Default 300s.
    #[serde(with = "humantime_serde")]
    pub late_ttl: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        WaitConfig {
            min: Duration::from_secs(15),
            idle: Duration::from_secs(5),
            max: Duration::from_secs(60),
            orphan_ttl: None,
            late_ttl: Duration::from_secs(300),
        }
    }
}

impl WaitConfig {
    pub fn orphan_ttl(&self) -> Duration {
        self.orphan_ttl.unwrap_or(self.max)
    }
}

/// Syscall rule guards (join.md §4.4).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallConfig {
    /// Differing thread ids on matched syscall ids: `lenient` (default) accepts the edge only when
    /// it is the only candidate (Go goroutines move between threads); `strict` rejects it.
    pub thread_check: ThreadCheck,
    /// Syscall ids of rows further apart than this never match (the per-agent counter restarts).
    /// Default 300s.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for SyscallConfig {
    fn default() -> Self {
        SyscallConfig {
            thread_check: ThreadCheck::Lenient,
            ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ThreadCheck {
    #[default]
    Lenient,
    Strict,
}

impl JoinConfig {
    /// Every problem at once, with key paths relative to the processor.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let w = &self.wait;
        if w.max.is_zero() {
            out.push(ConfigIssue::new("wait.max", "must be greater than 0"));
        }
        if w.min > w.max {
            out.push(ConfigIssue::new(
                "wait.min",
                format!("{:?} is longer than wait.max {:?}", w.min, w.max),
            ));
        }
        if w.idle > w.max {
            out.push(ConfigIssue::new(
                "wait.idle",
                format!("{:?} is longer than wait.max {:?}", w.idle, w.max),
            ));
        }
        if w.orphan_ttl.is_some_and(|o| o.is_zero()) {
            out.push(ConfigIssue::new(
                "wait.orphan_ttl",
                "must be greater than 0",
            ));
        }
        // Bounds keep deadline arithmetic far from overflow.
        let day = Duration::from_secs(86_400);
        for (path, d) in [
            ("wait.min", w.min),
            ("wait.idle", w.idle),
            ("wait.max", w.max),
            ("wait.orphan_ttl", w.orphan_ttl()),
            ("wait.late_ttl", w.late_ttl),
            ("syscall.ttl", self.syscall.ttl),
        ] {
            if d > day {
                out.push(ConfigIssue::new(path, format!("{d:?} is longer than 24h")));
            }
        }
        let hour = Duration::from_secs(3600);
        for (path, d) in [
            ("tolerance.network_delay", self.tolerance.network_delay),
            (
                "tolerance.host_clock_offset",
                self.tolerance.host_clock_offset,
            ),
            ("tolerance.app_slack", self.tolerance.app_slack),
        ] {
            if d > hour {
                out.push(ConfigIssue::new(path, format!("{d:?} is longer than 1h")));
            }
        }
        if self.syscall.ttl.is_zero() {
            out.push(ConfigIssue::new("syscall.ttl", "must be greater than 0"));
        }
        if self.max_spans_per_trace == 0 {
            out.push(ConfigIssue::new(
                "max_spans_per_trace",
                "must be at least 1",
            ));
        }
        if self.max_pending_spans < self.max_spans_per_trace {
            out.push(ConfigIssue::new(
                "max_pending_spans",
                format!(
                    "{} is below max_spans_per_trace {}",
                    self.max_pending_spans, self.max_spans_per_trace
                ),
            ));
        }
        for (i, k) in self.tenant.sdk_keys.iter().enumerate() {
            if k.trim().is_empty() {
                out.push(ConfigIssue::new(
                    format!("tenant.sdk_keys[{i}]"),
                    "empty key",
                ));
            }
        }
        for (i, k) in self.tenant.ebpf_keys.iter().enumerate() {
            if k.trim().is_empty() {
                out.push(ConfigIssue::new(
                    format!("tenant.ebpf_keys[{i}]"),
                    "empty key",
                ));
            } else if k.ends_with("_0") || k.ends_with("_1") {
                out.push(ConfigIssue::new(
                    format!("tenant.ebpf_keys[{i}]"),
                    format!("`{k}`: give the base name; _0/_1 is added by the span's side"),
                ));
            }
        }
        match (self.storage, &self.directory) {
            (StorageKind::File, None) => out.push(ConfigIssue::new(
                "directory",
                "`storage: file` needs a directory for its log",
            )),
            (StorageKind::File, Some(d)) if d.as_os_str().is_empty() => {
                out.push(ConfigIssue::new("directory", "empty path"))
            }
            (StorageKind::Memory, Some(_)) => out.push(ConfigIssue::new(
                "directory",
                "only read with `storage: file` (storage is `memory`)",
            )),
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tailweave_core::config::parse;

    #[test]
    fn empty_config_is_the_documented_defaults() {
        let c: JoinConfig = parse(serde_yaml::Value::Null).unwrap();
        assert_eq!(c, JoinConfig::default());
        assert_eq!(c.wait.orphan_ttl(), Duration::from_secs(60));
        assert!(c.validate().is_empty());
    }

    #[test]
    fn full_example_of_the_spec_parses() {
        let y = r#"
tenant: {sdk_keys: [k8s.namespace.name], ebpf_keys: [df.universal_tag.pod_ns], unknown: isolate}
tolerance: {network_delay: 50ms, host_clock_offset: 10ms, app_slack: 1ms}
wait: {min: 15s, idle: 5s, max: 60s, orphan_ttl: 60s, late_ttl: 300s}
syscall: {thread_check: lenient, ttl: 300s}
allow_multiple_trace_ids: false
unassociated_ebpf: drop
max_spans_per_trace: 1000
max_pending_spans: 1000000
emit_clock_offset: false
storage: memory
"#;
        let c: JoinConfig = parse(serde_yaml::from_str(y).unwrap()).unwrap();
        let mut want = JoinConfig::default();
        want.wait.orphan_ttl = Some(Duration::from_secs(60));
        assert_eq!(c, want);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e =
            parse::<JoinConfig>(serde_yaml::from_str("wait: {minimum: 1s}").unwrap()).unwrap_err();
        assert_eq!(e.path, "wait.minimum");
        assert!(e.message.contains("minimum"), "{}", e.message);
    }

    #[test]
    fn absurd_durations_are_refused() {
        let mut c = JoinConfig::default();
        c.wait.late_ttl = Duration::from_secs(90_000);
        c.tolerance.network_delay = Duration::from_secs(7200);
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["wait.late_ttl", "tolerance.network_delay"]);
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = JoinConfig::default();
        c.wait.min = Duration::from_secs(100);
        c.max_spans_per_trace = 0;
        c.tenant.ebpf_keys = vec!["df.universal_tag.pod_ns_0".into(), "".into()];
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            [
                "wait.min",
                "max_spans_per_trace",
                "tenant.ebpf_keys[0]",
                "tenant.ebpf_keys[1]"
            ]
        );
    }

    #[test]
    fn storage_file_needs_a_directory_and_a_directory_needs_file() {
        let c: JoinConfig = parse(serde_yaml::from_str("storage: file").unwrap()).unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["directory"]);
        let c: JoinConfig = parse(serde_yaml::from_str("directory: /tmp/x").unwrap()).unwrap();
        let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["directory"]);
        let c: JoinConfig =
            parse(serde_yaml::from_str("{storage: file, directory: /tmp/x}").unwrap()).unwrap();
        assert!(c.validate().is_empty());
        assert_eq!(c.storage, StorageKind::File);
        let c: JoinConfig = parse(serde_yaml::from_str("storage: none").unwrap()).unwrap();
        assert_eq!(c.storage, StorageKind::Memory);
        let e = parse::<JoinConfig>(serde_yaml::from_str("storage: disk").unwrap()).unwrap_err();
        assert_eq!(e.path, "storage");
    }
}
