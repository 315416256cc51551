//! The `tail_sampling` config: the OpenTelemetry Collector's `tail_sampling` syntax plus the
//! tailweave settings for triggers, caps and tenants.
//!
//! A policy is `{name, type, <type>: {...}}`: its settings sit under a key named after its type,
//! as in the Collector. The policy is parsed by hand (not derived) so that an unsupported type is
//! reported by `validate` with its path instead of as an opaque "unknown field" parse error.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use tailweave_core::config::ConfigIssue;

/// Policy types this build evaluates.
pub const SUPPORTED_POLICY_TYPES: &[&str] = &[
    "always_sample",
    "latency",
    "numeric_attribute",
    "probabilistic",
    "status_code",
    "string_attribute",
    "boolean_attribute",
    "rate_limiting",
    "span_count",
    "trace_state",
    "and",
    "not",
    "drop",
    "composite",
];

/// The Collector's default salt, used when `hash_salt` is empty.
pub const DEFAULT_HASH_SALT: &str = "default-hash-seed";

/// What to do when `num_traces` or `max_memory_mib` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Decide the oldest undecided traces early, on the spans they have (counted by cause).
    #[default]
    DecideEarly,
    /// Refuse intake (`accepting() == false`) until decisions free room.
    Backpressure,
}

/// Where undecided traces and decisions live across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// In memory only: a restart forgets buffered traces and decisions.
    #[default]
    None,
    /// An append-only log under `directory`, replayed at start.
    File,
}

/// Settings of the `tail_sampling` processor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailSamplingConfig {
    /// Longest time a trace waits for more spans, from its first span. Default `30s`.
    #[serde(default = "default_decision_wait", with = "humantime_serde")]
    pub decision_wait: Duration,
    /// Once the root span has arrived, decide after this long without a new span. `0s` turns the
    /// trigger off. Default `2s`. The Collector's `decision_wait_after_root_received` is an alias.
    #[serde(
        default = "default_after_root",
        with = "humantime_serde",
        alias = "decision_wait_after_root_received"
    )]
    pub decision_wait_after_root: Duration,
    /// Most undecided traces held at once. Default `100000`.
    #[serde(default = "default_num_traces")]
    pub num_traces: usize,
    /// Accepted for Collector compatibility: sizes the trace table up front. Default `0`.
    #[serde(default)]
    pub expected_new_traces_per_sec: u64,
    /// Most memory held by undecided traces (bytes of buffered spans plus per-trace overhead),
    /// in MiB. Default `512`.
    #[serde(default = "default_max_memory_mib")]
    pub max_memory_mib: u64,
    /// A trace reaching this many spans is decided at once. Default `10000`.
    #[serde(default = "default_max_spans_per_trace")]
    pub max_spans_per_trace: usize,
    /// A trace reaching this many held bytes is decided at once. Default `16 MiB`. The Collector's
    /// `maximum_trace_size_bytes` is an alias (tailweave decides such a trace instead of dropping it).
    #[serde(
        default = "default_max_trace_bytes",
        alias = "maximum_trace_size_bytes"
    )]
    pub max_trace_bytes: usize,
    /// What happens at `num_traces` / `max_memory_mib`. Default `decide_early`.
    #[serde(default)]
    pub on_full: OnFull,
    /// The Collector's switch for `on_full: backpressure`. Default `false`.
    #[serde(default)]
    pub block_on_overflow: bool,
    /// Stop at the first policy that keeps the trace (drop policies are always evaluated first).
    /// Default `false`: every policy votes, and the keep with the smallest adjusted count names
    /// the trace's `sampling.policy`.
    #[serde(default)]
    pub sample_on_first_match: bool,
    /// Remembered decisions, so late spans follow their trace's decision.
    #[serde(default)]
    pub decision_cache: DecisionCacheConfig,
    /// The default policy set (and the set of every trace when `tenant_key` is unset).
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
    /// A resource attribute (e.g. `k8s.namespace.name`) whose value selects a policy set from
    /// `tenants`. Unset by default.
    #[serde(default)]
    pub tenant_key: Option<String>,
    /// Policy sets per tenant value; traces of other tenants use `policies`.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// `file`: keep the spans of undecided traces and recent decisions in a log under
    /// `directory`, so a restart (even `kill -9`) neither loses buffered traces nor decides a
    /// trace again. Default `none`.
    #[serde(default)]
    pub storage: StorageKind,
    /// Directory of the log with `storage: file` (one file per pipeline and processor).
    #[serde(default)]
    pub directory: Option<std::path::PathBuf>,
}

impl Default for TailSamplingConfig {
    fn default() -> Self {
        TailSamplingConfig {
            decision_wait: default_decision_wait(),
            decision_wait_after_root: default_after_root(),
            num_traces: default_num_traces(),
            expected_new_traces_per_sec: 0,
            max_memory_mib: default_max_memory_mib(),
            max_spans_per_trace: default_max_spans_per_trace(),
            max_trace_bytes: default_max_trace_bytes(),
            on_full: OnFull::default(),
            block_on_overflow: false,
            sample_on_first_match: false,
            decision_cache: DecisionCacheConfig::default(),
            policies: Vec::new(),
            tenant_key: None,
            tenants: BTreeMap::new(),
            storage: StorageKind::None,
            directory: None,
        }
    }
}

fn default_decision_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_after_root() -> Duration {
    Duration::from_secs(2)
}
fn default_num_traces() -> usize {
    100_000
}
fn default_max_memory_mib() -> u64 {
    512
}
fn default_max_spans_per_trace() -> usize {
    10_000
}
fn default_max_trace_bytes() -> usize {
    16 << 20
}

/// Sizes of the decision caches, in trace ids. `0` turns a cache off.
///
/// The defaults cover about three minutes at 10,000 traces/s when up to a sixth of the traces
/// are kept; each entry costs about 30 bytes (about 65 MB for both caches when full).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionCacheConfig {
    /// Ids of kept traces remembered (with the keeping policy). Default `300000`.
    #[serde(default = "default_sampled_cache")]
    pub sampled_cache_size: usize,
    /// Ids of dropped traces remembered. Default `1800000`.
    #[serde(default = "default_non_sampled_cache")]
    pub non_sampled_cache_size: usize,
}

impl Default for DecisionCacheConfig {
    fn default() -> Self {
        DecisionCacheConfig {
            sampled_cache_size: default_sampled_cache(),
            non_sampled_cache_size: default_non_sampled_cache(),
        }
    }
}

fn default_sampled_cache() -> usize {
    300_000
}
fn default_non_sampled_cache() -> usize {
    1_800_000
}

/// One tenant's policy set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The policies for traces of this tenant (same syntax as the top-level `policies`).
    pub policies: Vec<PolicyConfig>,
}

/// One policy: a name and its typed settings.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Names the policy in `sampling.policy` and in metrics.
    pub name: String,
    pub kind: PolicyKind,
}

/// The typed settings of a policy, one variant per `type`.
#[derive(Debug, Clone)]
pub enum PolicyKind {
    AlwaysSample,
    Latency(LatencyCfg),
    NumericAttribute(NumericAttributeCfg),
    Probabilistic(ProbabilisticCfg),
    StatusCode(StatusCodeCfg),
    StringAttribute(StringAttributeCfg),
    BooleanAttribute(BooleanAttributeCfg),
    RateLimiting(RateLimitingCfg),
    SpanCount(SpanCountCfg),
    TraceState(TraceStateCfg),
    And(AndCfg),
    Not(Box<NotCfg>),
    Drop(DropCfg),
    Composite(CompositeCfg),
    /// A `type` this build does not evaluate; `validate` reports it.
    Unsupported(String),
}

impl PolicyKind {
    pub fn type_name(&self) -> &str {
        match self {
            PolicyKind::AlwaysSample => "always_sample",
            PolicyKind::Latency(_) => "latency",
            PolicyKind::NumericAttribute(_) => "numeric_attribute",
            PolicyKind::Probabilistic(_) => "probabilistic",
            PolicyKind::StatusCode(_) => "status_code",
            PolicyKind::StringAttribute(_) => "string_attribute",
            PolicyKind::BooleanAttribute(_) => "boolean_attribute",
            PolicyKind::RateLimiting(_) => "rate_limiting",
            PolicyKind::SpanCount(_) => "span_count",
            PolicyKind::TraceState(_) => "trace_state",
            PolicyKind::And(_) => "and",
            PolicyKind::Not(_) => "not",
            PolicyKind::Drop(_) => "drop",
            PolicyKind::Composite(_) => "composite",
            PolicyKind::Unsupported(t) => t,
        }
    }
}

/// `latency`: keep traces whose duration (latest end - earliest start) is at least
/// `threshold_ms`, or, with `upper_threshold_ms`, in (`threshold_ms`, `upper_threshold_ms`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyCfg {
    /// Lower bound in milliseconds. Default `0`.
    #[serde(default)]
    pub threshold_ms: i64,
    /// Upper bound in milliseconds; `0` means none. Default `0`.
    #[serde(default)]
    pub upper_threshold_ms: i64,
}

/// `numeric_attribute`: keep traces with a span or resource attribute `key` in
/// [`min_value`, `max_value`] (either bound may be left out, not both).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericAttributeCfg {
    /// The attribute key.
    #[serde(default)]
    pub key: String,
    /// Smallest matching value. Unset: no lower bound.
    #[serde(default)]
    pub min_value: Option<i64>,
    /// Largest matching value. Unset: no upper bound.
    #[serde(default)]
    pub max_value: Option<i64>,
    /// Keep the traces where no span matches instead. Default `false`.
    #[serde(default)]
    pub invert_match: bool,
}

/// `probabilistic`: keep `sampling_percentage` percent of traces, chosen by a fixed hash of the
/// salt and the trace id, so every instance and every restart keeps the same traces.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbabilisticCfg {
    /// Salt of the hash; layers with different rates should use different salts. Empty means
    /// the Collector's default salt.
    #[serde(default)]
    pub hash_salt: String,
    /// Percentage kept, 0 to 100. Default `0`.
    #[serde(default)]
    pub sampling_percentage: f64,
}

/// `status_code`: keep traces with a span whose status is one of `status_codes`
/// (`OK`, `ERROR`, `UNSET`). A timed-out eBPF call counts as `ERROR`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusCodeCfg {
    /// The status codes that keep a trace.
    #[serde(default)]
    pub status_codes: Vec<String>,
}

/// `string_attribute`: keep traces with a span or resource attribute `key` equal to one of
/// `values` (or matching one of them as a regular expression).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringAttributeCfg {
    /// The attribute key.
    #[serde(default)]
    pub key: String,
    /// Exact values, or regular expressions with `enabled_regex_matching`.
    #[serde(default)]
    pub values: Vec<String>,
    /// Treat `values` as (unanchored) regular expressions. Default `false`.
    #[serde(default)]
    pub enabled_regex_matching: bool,
    /// Entries of the cache of regex results per attribute value. Default `0` (no cache).
    #[serde(default)]
    pub cache_max_size: usize,
    /// Keep the traces where no span matches instead. Default `false`.
    #[serde(default)]
    pub invert_match: bool,
}

/// `boolean_attribute`: keep traces with a span or resource attribute `key` equal to `value`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BooleanAttributeCfg {
    /// The attribute key.
    #[serde(default)]
    pub key: String,
    /// The value that matches. Default `false`.
    #[serde(default)]
    pub value: bool,
    /// Keep the traces where no span matches instead. Default `false`.
    #[serde(default)]
    pub invert_match: bool,
}

/// `rate_limiting`: keep traces while fewer than `spans_per_second` spans were kept by this
/// policy in the current second.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitingCfg {
    /// Span budget per second.
    #[serde(default)]
    pub spans_per_second: u64,
}

/// `span_count`: keep traces with at least `min_spans` (and at most `max_spans`) spans.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanCountCfg {
    /// Fewest spans. Default `0`.
    #[serde(default)]
    pub min_spans: u64,
    /// Most spans; `0` means none. Default `0`.
    #[serde(default)]
    pub max_spans: u64,
}

/// `trace_state`: keep traces with a span whose W3C trace state has `key` set to one of `values`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceStateCfg {
    /// The trace state key.
    #[serde(default)]
    pub key: String,
    /// The values that keep a trace.
    #[serde(default)]
    pub values: Vec<String>,
}

/// `and`: keep when every sub-policy keeps.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AndCfg {
    /// The sub-policies.
    #[serde(default)]
    pub and_sub_policy: Vec<PolicyConfig>,
}

/// `not`: keep when the sub-policy does not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotCfg {
    /// The negated policy.
    pub not_sub_policy: PolicyConfig,
}

/// `drop`: when every sub-policy matches, the trace is dropped whatever the other policies say.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropCfg {
    /// The sub-policies that must all match.
    #[serde(default)]
    pub drop_sub_policy: Vec<PolicyConfig>,
}

/// `composite`: sub-policies tried in `policy_order`; the first that keeps the trace spends its
/// share of `max_total_spans_per_second`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeCfg {
    /// Span budget per second shared by the sub-policies.
    #[serde(default)]
    pub max_total_spans_per_second: u64,
    /// Names of the sub-policies in evaluation order; unnamed ones follow in config order.
    #[serde(default)]
    pub policy_order: Vec<String>,
    /// The sub-policies.
    #[serde(default)]
    pub composite_sub_policy: Vec<PolicyConfig>,
    /// Percent of the budget per sub-policy; sub-policies not listed share what is left equally.
    #[serde(default)]
    pub rate_allocation: Vec<RateAllocationCfg>,
}

/// One entry of `composite.rate_allocation`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateAllocationCfg {
    /// The sub-policy name.
    pub policy: String,
    /// Its percent of `max_total_spans_per_second`.
    pub percent: f64,
}

impl<'de> Deserialize<'de> for PolicyConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = serde_yaml::Mapping::deserialize(d)?;
        let name = match m.remove("name") {
            Some(serde_yaml::Value::String(s)) => s,
            Some(_) => return Err(D::Error::custom("`name` must be a string")),
            None => return Err(D::Error::custom("missing field `name`")),
        };
        let ty = match m.remove("type") {
            Some(serde_yaml::Value::String(s)) => s,
            Some(_) => {
                return Err(D::Error::custom(format!(
                    "policy `{name}`: `type` must be a string"
                )))
            }
            None => {
                return Err(D::Error::custom(format!(
                    "policy `{name}`: missing field `type`"
                )))
            }
        };
        let body = m.remove(ty.as_str()).unwrap_or(serde_yaml::Value::Null);
        if let Some((k, _)) = m.iter().next() {
            let k = serde_yaml::to_string(k).unwrap_or_default();
            return Err(D::Error::custom(format!(
                "policy `{name}` (type `{ty}`): unknown key `{}`",
                k.trim()
            )));
        }
        let kind = match ty.as_str() {
            "always_sample" => PolicyKind::AlwaysSample,
            "latency" => PolicyKind::Latency(sub(&name, &ty, body)?),
            "numeric_attribute" => PolicyKind::NumericAttribute(sub(&name, &ty, body)?),
            "probabilistic" => PolicyKind::Probabilistic(sub(&name, &ty, body)?),
            "status_code" => PolicyKind::StatusCode(sub(&name, &ty, body)?),
            "string_attribute" => PolicyKind::StringAttribute(sub(&name, &ty, body)?),
            "boolean_attribute" => PolicyKind::BooleanAttribute(sub(&name, &ty, body)?),
            "rate_limiting" => PolicyKind::RateLimiting(sub(&name, &ty, body)?),
            "span_count" => PolicyKind::SpanCount(sub(&name, &ty, body)?),
            "trace_state" => PolicyKind::TraceState(sub(&name, &ty, body)?),
            "and" => PolicyKind::And(sub(&name, &ty, body)?),
            "not" => PolicyKind::Not(Box::new(sub(&name, &ty, body)?)),
            "drop" => PolicyKind::Drop(sub(&name, &ty, body)?),
            "composite" => PolicyKind::Composite(sub(&name, &ty, body)?),
            _ => PolicyKind::Unsupported(ty),
        };
        Ok(PolicyConfig { name, kind })
    }
}

/// Parses a policy's settings, naming the policy and the path inside its settings on error.
fn sub<T: DeserializeOwned, E: serde::de::Error>(
    name: &str,
    ty: &str,
    body: serde_yaml::Value,
) -> Result<T, E> {
    let body = match body {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        v => v,
    };
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            ty.to_string()
        } else {
            format!("{ty}.{path}")
        };
        E::custom(format!("policy `{name}`: {at}: {}", e.into_inner()))
    })
}

impl TailSamplingConfig {
    /// `on_full`, with the Collector's `block_on_overflow` folded in.
    pub fn effective_on_full(&self) -> OnFull {
        if self.block_on_overflow {
            OnFull::Backpressure
        } else {
            self.on_full
        }
    }

    /// Every problem of the config, with key paths relative to the processor.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        if self.decision_wait.is_zero() {
            out.push(ConfigIssue::new("decision_wait", "must be greater than 0"));
        }
        if self.num_traces == 0 {
            out.push(ConfigIssue::new("num_traces", "must be greater than 0"));
        }
        if self.max_memory_mib == 0 {
            out.push(ConfigIssue::new("max_memory_mib", "must be greater than 0"));
        }
        if self.max_spans_per_trace == 0 {
            out.push(ConfigIssue::new(
                "max_spans_per_trace",
                "must be greater than 0",
            ));
        }
        if self.max_trace_bytes == 0 {
            out.push(ConfigIssue::new(
                "max_trace_bytes",
                "must be greater than 0",
            ));
        }
        if self.storage == StorageKind::File && self.directory.is_none() {
            out.push(ConfigIssue::new(
                "directory",
                "`storage: file` needs a directory for its log",
            ));
        }
        if self.policies.is_empty() {
            out.push(ConfigIssue::new(
                "policies",
                "at least one policy is required (with none, every trace would be dropped)",
            ));
        }
        validate_set(&self.policies, "policies", &mut out);
        match self.tenant_key.as_deref() {
            Some("") => out.push(ConfigIssue::new("tenant_key", "must not be empty")),
            None if !self.tenants.is_empty() => out.push(ConfigIssue::new(
                "tenants",
                "tenants are configured but `tenant_key` is not set",
            )),
            _ => {}
        }
        for (tenant, t) in &self.tenants {
            let path = format!("tenants.{tenant}.policies");
            if t.policies.is_empty() {
                out.push(ConfigIssue::new(&path, "at least one policy is required"));
            }
            validate_set(&t.policies, &path, &mut out);
        }
        out
    }
}

fn validate_set(policies: &[PolicyConfig], path: &str, out: &mut Vec<ConfigIssue>) {
    let mut seen = std::collections::HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if !p.name.is_empty() && !seen.insert(p.name.as_str()) {
            out.push(ConfigIssue::new(
                format!("{at}.name"),
                format!("duplicate policy name `{}`", p.name),
            ));
        }
        validate_policy(p, &at, Level::Top, out);
    }
}

/// Where a policy sits: some types only make sense at the top of a set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Top,
    Composite,
    Nested,
}

fn validate_policy(p: &PolicyConfig, at: &str, level: Level, out: &mut Vec<ConfigIssue>) {
    let name = &p.name;
    let mut issue = |key: &str, msg: String| {
        let path = if key.is_empty() {
            at.to_string()
        } else {
            format!("{at}.{key}")
        };
        out.push(ConfigIssue::new(path, format!("policy `{name}`: {msg}")));
    };
    if name.is_empty() {
        issue("name", "must not be empty".into());
    }
    match &p.kind {
        PolicyKind::AlwaysSample => {}
        PolicyKind::Latency(c) => {
            if c.threshold_ms < 0 {
                issue("latency.threshold_ms", "must not be negative".into());
            }
            if c.upper_threshold_ms < 0 {
                issue("latency.upper_threshold_ms", "must not be negative".into());
            }
            if c.upper_threshold_ms > 0 && c.upper_threshold_ms <= c.threshold_ms {
                issue(
                    "latency.upper_threshold_ms",
                    format!(
                        "upper_threshold_ms ({}) must be greater than threshold_ms ({})",
                        c.upper_threshold_ms, c.threshold_ms
                    ),
                );
            }
            if c.threshold_ms == 0 && c.upper_threshold_ms == 0 {
                issue(
                    "latency",
                    "set threshold_ms and/or upper_threshold_ms (with neither, every trace matches)"
                        .into(),
                );
            }
        }
        PolicyKind::NumericAttribute(c) => {
            if c.key.is_empty() {
                issue("numeric_attribute.key", "must not be empty".into());
            }
            match (c.min_value, c.max_value) {
                (None, None) => issue(
                    "numeric_attribute",
                    "set min_value and/or max_value (neither is set)".into(),
                ),
                (Some(lo), Some(hi)) if lo > hi => issue(
                    "numeric_attribute.min_value",
                    format!("min_value ({lo}) is greater than max_value ({hi})"),
                ),
                _ => {}
            }
        }
        PolicyKind::Probabilistic(c) => {
            if !(0.0..=100.0).contains(&c.sampling_percentage) {
                issue(
                    "probabilistic.sampling_percentage",
                    format!("must be between 0 and 100, got {}", c.sampling_percentage),
                );
            }
        }
        PolicyKind::StatusCode(c) => {
            if c.status_codes.is_empty() {
                issue(
                    "status_code.status_codes",
                    "must list at least one code".into(),
                );
            }
            for (j, s) in c.status_codes.iter().enumerate() {
                if parse_status(s).is_none() {
                    issue(
                        &format!("status_code.status_codes[{j}]"),
                        format!("unknown status code `{s}` (expected OK, ERROR or UNSET)"),
                    );
                }
            }
        }
        PolicyKind::StringAttribute(c) => {
            if c.key.is_empty() {
                issue("string_attribute.key", "must not be empty".into());
            }
            if c.values.is_empty() {
                issue(
                    "string_attribute.values",
                    "must list at least one value".into(),
                );
            }
            if c.enabled_regex_matching {
                for (j, v) in c.values.iter().enumerate() {
                    if let Err(e) = regex::Regex::new(v) {
                        issue(
                            &format!("string_attribute.values[{j}]"),
                            format!("invalid regular expression: {e}"),
                        );
                    }
                }
            }
        }
        PolicyKind::BooleanAttribute(c) => {
            if c.key.is_empty() {
                issue("boolean_attribute.key", "must not be empty".into());
            }
        }
        PolicyKind::RateLimiting(c) => {
            if c.spans_per_second == 0 {
                issue(
                    "rate_limiting.spans_per_second",
                    "must be greater than 0".into(),
                );
            }
        }
        PolicyKind::SpanCount(c) => {
            if c.max_spans > 0 && c.max_spans < c.min_spans {
                issue(
                    "span_count.max_spans",
                    format!(
                        "max_spans ({}) is less than min_spans ({})",
                        c.max_spans, c.min_spans
                    ),
                );
            }
            if c.min_spans == 0 && c.max_spans == 0 {
                issue(
                    "span_count",
                    "set min_spans and/or max_spans (with neither, every trace matches)".into(),
                );
            }
        }
        PolicyKind::TraceState(c) => {
            if c.key.is_empty() {
                issue("trace_state.key", "must not be empty".into());
            }
            if c.values.is_empty() {
                issue("trace_state.values", "must list at least one value".into());
            }
        }
        PolicyKind::And(c) => {
            if c.and_sub_policy.is_empty() {
                issue("and.and_sub_policy", "must list at least one policy".into());
            }
            for (j, s) in c.and_sub_policy.iter().enumerate() {
                validate_policy(
                    s,
                    &format!("{at}.and.and_sub_policy[{j}]"),
                    Level::Nested,
                    out,
                );
            }
        }
        PolicyKind::Not(c) => {
            validate_policy(
                &c.not_sub_policy,
                &format!("{at}.not.not_sub_policy"),
                Level::Nested,
                out,
            );
        }
        PolicyKind::Drop(c) => {
            if level != Level::Top {
                issue(
                    "type",
                    "`drop` is only allowed in a top-level policy list".into(),
                );
            }
            if c.drop_sub_policy.is_empty() {
                issue(
                    "drop.drop_sub_policy",
                    "must list at least one policy".into(),
                );
            }
            for (j, s) in c.drop_sub_policy.iter().enumerate() {
                validate_policy(
                    s,
                    &format!("{at}.drop.drop_sub_policy[{j}]"),
                    Level::Nested,
                    out,
                );
            }
        }
        PolicyKind::Composite(c) => {
            if level != Level::Top {
                issue(
                    "type",
                    "`composite` is only allowed in a top-level policy list".into(),
                );
            }
            validate_composite(c, at, name, out);
        }
        PolicyKind::Unsupported(t) => {
            issue(
                "type",
                format!(
                    "unsupported policy type `{t}` (supported: {})",
                    SUPPORTED_POLICY_TYPES.join(", ")
                ),
            );
        }
    }
}

fn validate_composite(c: &CompositeCfg, at: &str, name: &str, out: &mut Vec<ConfigIssue>) {
    let issue = |out: &mut Vec<ConfigIssue>, key: &str, msg: String| {
        out.push(ConfigIssue::new(
            format!("{at}.composite.{key}"),
            format!("policy `{name}`: {msg}"),
        ))
    };
    if c.max_total_spans_per_second == 0 {
        issue(
            out,
            "max_total_spans_per_second",
            "must be greater than 0".into(),
        );
    }
    if c.composite_sub_policy.is_empty() {
        issue(
            out,
            "composite_sub_policy",
            "must list at least one policy".into(),
        );
    }
    let names: Vec<&str> = c
        .composite_sub_policy
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    for (j, s) in c.composite_sub_policy.iter().enumerate() {
        if names[..j].contains(&s.name.as_str()) {
            issue(
                out,
                &format!("composite_sub_policy[{j}].name"),
                format!("duplicate sub-policy name `{}`", s.name),
            );
        }
        validate_policy(
            s,
            &format!("{at}.composite.composite_sub_policy[{j}]"),
            Level::Composite,
            out,
        );
    }
    for (j, o) in c.policy_order.iter().enumerate() {
        if !names.contains(&o.as_str()) {
            issue(
                out,
                &format!("policy_order[{j}]"),
                format!("names `{o}`, which is not a composite_sub_policy"),
            );
        }
    }
    let mut sum = 0.0;
    for (j, r) in c.rate_allocation.iter().enumerate() {
        if !names.contains(&r.policy.as_str()) {
            issue(
                out,
                &format!("rate_allocation[{j}].policy"),
                format!("names `{}`, which is not a composite_sub_policy", r.policy),
            );
        }
        if !(0.0..=100.0).contains(&r.percent) {
            issue(
                out,
                &format!("rate_allocation[{j}].percent"),
                format!("must be between 0 and 100, got {}", r.percent),
            );
        }
        sum += r.percent;
    }
    if sum > 100.0 + 1e-9 {
        issue(
            out,
            "rate_allocation",
            format!("percentages add up to {sum}, more than 100"),
        );
    }
}

/// `OK` / `ERROR` / `UNSET` (any case, with or without the `STATUS_CODE_` prefix).
pub(crate) fn parse_status(s: &str) -> Option<tailweave_core::StatusCode> {
    let u = s.trim().to_ascii_uppercase();
    let u = u.strip_prefix("STATUS_CODE_").unwrap_or(&u);
    match u {
        "OK" => Some(tailweave_core::StatusCode::Ok),
        "ERROR" => Some(tailweave_core::StatusCode::Error),
        "UNSET" => Some(tailweave_core::StatusCode::Unset),
        _ => None,
    }
}
