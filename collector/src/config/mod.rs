//! Loading and validating a pipeline file in the OpenTelemetry Collector's layout.
//!
//! `load_str` substitutes `${env:...}`, parses the YAML, parses every component into its typed
//! config, validates it, checks the cross-references of `service.pipelines`, and returns either
//! the whole config or every problem at once, each with its key path and line.

mod env;
mod lines;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use tailweave_core::config::{parse, ConfigIssue};
use tailweave_exporters::ExporterConfig;
use tailweave_processors::ProcessorConfig;
use tailweave_receivers::ReceiverConfig;

pub use lines::LineIndex;

/// One problem found in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => f.write_str(&self.message),
            (false, Some(l)) => write!(f, "{} (line {l}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem of a config that does not load.
#[derive(Debug)]
pub struct ConfigErrors {
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem(s) in the configuration:",
            self.source,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A configured component: its id (`type[/name]`), its type, and its typed config.
#[derive(Debug, Clone)]
pub struct Component<T> {
    pub id: String,
    pub kind: String,
    pub config: T,
}

/// `extensions.health_check`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Address of the health endpoint. Default `127.0.0.1:13133`.
    #[serde(default = "default_health_endpoint")]
    pub endpoint: String,
    /// Path answered. Default `/`.
    #[serde(default = "default_health_path")]
    pub path: String,
}

fn default_health_endpoint() -> String {
    "127.0.0.1:13133".into()
}
fn default_health_path() -> String {
    "/".into()
}

/// `service`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Extensions to start, by id (each must be configured under `extensions`).
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Pipelines by id: `traces` or `traces/<name>`.
    #[serde(default)]
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// Self-telemetry.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Process memory budget in MiB. Above `memory_limit_mib - memory_spike_limit_mib` receivers refuse
    /// with retryable errors. Unset: no budget.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Headroom below the limit where refusal starts. Default: 20% of the limit.
    #[serde(default)]
    pub memory_spike_limit_mib: Option<u64>,
    /// How long shutdown may take to drain and deliver. Default `30s`.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Batches buffered between two stages of a pipeline. Default 64.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_queue_size() -> usize {
    64
}

/// `service.pipelines.<id>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Receiver ids feeding this pipeline.
    #[serde(default)]
    pub receivers: Vec<String>,
    /// Processor ids, in order.
    #[serde(default)]
    pub processors: Vec<String>,
    /// Exporter ids; every span is sent to each.
    #[serde(default)]
    pub exporters: Vec<String>,
}

/// `service.telemetry`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Prometheus endpoint for tailweave's own metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Log settings.
    #[serde(default)]
    pub logs: LogsConfig,
}

/// `service.telemetry.metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` serving `/metrics`. Default `127.0.0.1:8888`. `none` disables it.
    #[serde(default = "default_metrics_address")]
    pub address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: default_metrics_address(),
        }
    }
}

fn default_metrics_address() -> String {
    "127.0.0.1:8888".into()
}

/// `service.telemetry.logs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or an `EnvFilter` directive. `RUST_LOG`
    /// overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `console` (default) or `json`.
    #[serde(default = "default_log_encoding")]
    pub encoding: String,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            level: default_log_level(),
            encoding: default_log_encoding(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_encoding() -> String {
    "console".into()
}

/// A loaded, valid config.
#[derive(Debug, Clone)]
pub struct Config {
    pub receivers: Vec<Component<ReceiverConfig>>,
    pub processors: Vec<Component<ProcessorConfig>>,
    pub exporters: Vec<Component<ExporterConfig>>,
    pub health_check: Option<HealthCheckConfig>,
    pub service: ServiceConfig,
    /// Problems that do not stop the config from running (unused components, unset variables).
    pub warnings: Vec<Problem>,
}

impl Config {
    pub fn receiver(&self, id: &str) -> Option<&Component<ReceiverConfig>> {
        self.receivers.iter().find(|c| c.id == id)
    }
    pub fn processor(&self, id: &str) -> Option<&Component<ProcessorConfig>> {
        self.processors.iter().find(|c| c.id == id)
    }
    pub fn exporter(&self, id: &str) -> Option<&Component<ExporterConfig>> {
        self.exporters.iter().find(|c| c.id == id)
    }
}

/// The default pipeline file, embedded so `tailweave` runs with no file at all.
pub const EMBEDDED_PIPELINES: &str = include_str!("../../../pipelines.yaml");

/// Loads a config file from disk.
pub fn load_file(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        source: source.clone(),
        problems: vec![Problem {
            path: String::new(),
            line: None,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    load_str(&text, &source, |n| std::env::var(n).ok())
}

struct Collect<'a> {
    lines: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Collect<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.lines.line_of(&path);
        self.problems.push(Problem {
            path,
            line,
            message: message.into(),
        });
    }
    fn issue(&mut self, prefix: &str, i: ConfigIssue) {
        let path = if i.path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", i.path)
        };
        self.add(path, i.message);
    }
}

/// Loads a config from text. `lookup` resolves environment variables.
pub fn load_str(
    text: &str,
    source: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let fail = |problems| ConfigErrors {
        source: source.to_string(),
        problems,
    };
    let (text, unset) = env::substitute(text, lookup).map_err(|m| {
        fail(vec![Problem {
            path: String::new(),
            line: None,
            message: m,
        }])
    })?;
    let lines = LineIndex::build(&text);
    let root: Value = serde_yaml::from_str(&text).map_err(|e| {
        fail(vec![Problem {
            path: String::new(),
            line: e.location().map(|l| l.line()),
            message: format!("not valid YAML: {e}"),
        }])
    })?;
    let mut c = Collect {
        lines: &lines,
        problems: Vec::new(),
    };
    let mut warnings: Vec<Problem> = unset
        .into_iter()
        .map(|n| Problem {
            path: String::new(),
            line: None,
            message: format!("environment variable {n} is not set; substituted an empty value"),
        })
        .collect();

    let root = match root {
        Value::Mapping(m) => m,
        Value::Null => Default::default(),
        _ => {
            c.add(
                "",
                "the config must be a mapping with receivers, processors, exporters and service",
            );
            return Err(fail(c.problems));
        }
    };
    let mut sections: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in root {
        let Some(k) = k.as_str().map(str::to_string) else {
            c.add("", "top-level keys must be strings");
            continue;
        };
        match k.as_str() {
            "receivers" | "processors" | "exporters" | "extensions" | "service" => {
                sections.insert(k, v);
            }
            "connectors" => c.add(k, "connectors are not supported by tailweave yet"),
            _ => c.add(
                k.clone(),
                format!("unknown top-level key `{k}` (expected receivers, processors, exporters, extensions, service)"),
            ),
        }
    }

    let (receivers, receivers_ids) = components(
        &mut c,
        "receivers",
        sections.remove("receivers"),
        tailweave_receivers::KINDS,
        ReceiverConfig::parse,
        ReceiverConfig::validate,
    );
    let (processors, processors_ids) = components(
        &mut c,
        "processors",
        sections.remove("processors"),
        tailweave_processors::KINDS,
        ProcessorConfig::parse,
        ProcessorConfig::validate,
    );
    let (exporters, exporters_ids) = components(
        &mut c,
        "exporters",
        sections.remove("exporters"),
        tailweave_exporters::KINDS,
        ExporterConfig::parse,
        ExporterConfig::validate,
    );

    let mut health_check = None;
    let mut extension_ids: Vec<String> = Vec::new();
    match sections.remove("extensions") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(m)) => {
            for (k, v) in m {
                let id = k.as_str().unwrap_or("").to_string();
                let kind = id.split('/').next().unwrap_or("");
                let path = format!("extensions.{id}");
                match kind {
                    "health_check" => match parse::<HealthCheckConfig>(v) {
                        Ok(h) => {
                            check_addr(&mut c, &format!("{path}.endpoint"), &h.endpoint);
                            health_check = Some(h);
                        }
                        Err(i) => c.issue(&path, i),
                    },
                    _ => c.add(
                        path,
                        format!("unknown extension type `{kind}` (known: health_check)"),
                    ),
                }
                extension_ids.push(id);
            }
        }
        Some(_) => c.add(
            "extensions",
            "must be a mapping of extension ids to settings",
        ),
    }

    let service: Option<ServiceConfig> = match sections.remove("service") {
        None => {
            c.add("service", "missing: a config needs service.pipelines");
            None
        }
        Some(v) => match parse::<ServiceConfig>(v) {
            Ok(s) => Some(s),
            Err(i) => {
                c.issue("service", i);
                None
            }
        },
    };

    if let Some(s) = &service {
        for (i, e) in s.extensions.iter().enumerate() {
            if !extension_ids.contains(e) {
                c.add(
                    format!("service.extensions[{i}]"),
                    format!("references extension `{e}` which is not configured under extensions"),
                );
            }
        }
        if s.extensions.iter().all(|e| !e.starts_with("health_check")) {
            health_check = None;
        }
        if s.pipelines.is_empty() {
            c.add(
                "service.pipelines",
                "no pipelines: define at least service.pipelines.traces",
            );
        }
        if s.telemetry.metrics.address != "none" {
            check_addr(
                &mut c,
                "service.telemetry.metrics.address",
                &s.telemetry.metrics.address,
            );
        }
        if !matches!(s.telemetry.logs.encoding.as_str(), "console" | "json") {
            c.add(
                "service.telemetry.logs.encoding",
                "must be `console` or `json`",
            );
        }
        if let Some(limit) = s.memory_limit_mib {
            if limit == 0 {
                c.add("service.memory_limit_mib", "must be greater than 0");
            }
            if s.memory_spike_limit_mib.is_some_and(|sp| sp >= limit) {
                c.add(
                    "service.memory_spike_limit_mib",
                    "must be smaller than service.memory_limit_mib",
                );
            }
        }
        if s.queue_size == 0 {
            c.add("service.queue_size", "must be at least 1");
        }
        let mut used_r = Vec::new();
        let mut used_p = Vec::new();
        let mut used_e = Vec::new();
        for (pid, p) in &s.pipelines {
            let base = format!("service.pipelines.{pid}");
            let signal = pid.split('/').next().unwrap_or("");
            if signal != "traces" {
                c.add(
                    base.clone(),
                    format!("`{signal}` pipelines are not supported: tailweave handles traces (use traces or traces/<name>)"),
                );
            }
            if p.receivers.is_empty() {
                c.add(
                    format!("{base}.receivers"),
                    "a pipeline needs at least one receiver",
                );
            }
            if p.exporters.is_empty() {
                c.add(
                    format!("{base}.exporters"),
                    "a pipeline needs at least one exporter",
                );
            }
            refs(&mut c, &base, "receivers", "receiver", &p.receivers, |id| {
                receivers_ids.iter().any(|x| x == id)
            });
            refs(
                &mut c,
                &base,
                "processors",
                "processor",
                &p.processors,
                |id| processors_ids.iter().any(|x| x == id),
            );
            refs(&mut c, &base, "exporters", "exporter", &p.exporters, |id| {
                exporters_ids.iter().any(|x| x == id)
            });
            used_r.extend(p.receivers.iter().cloned());
            used_p.extend(p.processors.iter().cloned());
            used_e.extend(p.exporters.iter().cloned());
        }
        let unused = |section: &str, ids: Vec<&String>, used: &[String]| -> Vec<Problem> {
            ids.into_iter()
                .filter(|id| !used.contains(id))
                .map(|id| {
                    let path = format!("{section}.{id}");
                    Problem {
                        line: lines.line_of(&path),
                        path,
                        message: "configured but not used in any pipeline".into(),
                    }
                })
                .collect()
        };
        warnings.extend(unused(
            "receivers",
            receivers.iter().map(|x| &x.id).collect(),
            &used_r,
        ));
        warnings.extend(unused(
            "processors",
            processors.iter().map(|x| &x.id).collect(),
            &used_p,
        ));
        warnings.extend(unused(
            "exporters",
            exporters.iter().map(|x| &x.id).collect(),
            &used_e,
        ));
    }

    let problems = c.problems;
    match service {
        Some(service) if problems.is_empty() => Ok(Config {
            receivers,
            processors,
            exporters,
            health_check,
            service,
            warnings,
        }),
        _ => Err(fail(problems)),
    }
}

fn refs(
    c: &mut Collect<'_>,
    base: &str,
    field: &str,
    what: &str,
    ids: &[String],
    exists: impl Fn(&str) -> bool,
) {
    for (i, id) in ids.iter().enumerate() {
        if !exists(id) {
            c.add(
                format!("{base}.{field}[{i}]"),
                format!("references {what} `{id}` which is not configured"),
            );
        }
        if ids[..i].contains(id) {
            c.add(
                format!("{base}.{field}[{i}]"),
                format!("{what} `{id}` is listed twice"),
            );
        }
    }
}

fn check_addr(c: &mut Collect<'_>, path: &str, addr: &str) {
    if parse_host_port(addr).is_none() {
        c.add(path, format!("`{addr}` is not a host:port address"));
    }
}

/// Splits `host:port` (with `[v6]:port`), accepting a leading `http://`.
pub fn parse_host_port(addr: &str) -> Option<(String, u16)> {
    let a = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let a = a.split('/').next()?;
    let (host, port) = a.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port))
}

type ParseFn<T> = fn(&str, Value) -> Result<Option<T>, ConfigIssue>;

fn components<T>(
    c: &mut Collect<'_>,
    section: &str,
    value: Option<Value>,
    kinds: &[&str],
    parse_fn: ParseFn<T>,
    validate: fn(&T) -> Vec<ConfigIssue>,
) -> (Vec<Component<T>>, Vec<String>) {
    let mut out = Vec::new();
    let mut ids = Vec::new();
    let m = match value {
        None | Some(Value::Null) => return (out, ids),
        Some(Value::Mapping(m)) => m,
        Some(_) => {
            c.add(
                section,
                format!("must be a mapping of {section} ids to settings"),
            );
            return (out, ids);
        }
    };
    for (k, v) in m {
        let Some(id) = k.as_str().map(str::to_string) else {
            c.add(section, "component ids must be strings");
            continue;
        };
        let path = format!("{section}.{id}");
        ids.push(id.clone());
        let (kind, name) = match id.split_once('/') {
            Some((k, n)) => (k.to_string(), Some(n)),
            None => (id.clone(), None),
        };
        if name.is_some_and(str::is_empty) || kind.is_empty() {
            c.add(path, format!("`{id}` is not a valid id (type[/name])"));
            continue;
        }
        match parse_fn(&kind, v) {
            Ok(None) => c.add(
                path,
                format!(
                    "unknown {} type `{kind}` (known: {})",
                    section.trim_end_matches('s'),
                    kinds.join(", ")
                ),
            ),
            Ok(Some(cfg)) => {
                for i in validate(&cfg) {
                    c.issue(&path, i);
                }
                out.push(Component {
                    id,
                    kind,
                    config: cfg,
                });
            }
            Err(i) => c.issue(&path, i),
        }
    }
    (out, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(y: &str) -> Result<Config, ConfigErrors> {
        load_str(y, "test.yaml", |_| None)
    }

    #[test]
    fn three_mistakes_all_reported_with_paths_and_lines() {
        let y = "\
receivers:
  otlp:
    protocols:
      grpc:
processors:
  batch:
    not_a_key: 1
exporters:
  debug:
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch, missing]
      exporters: [debug, nope]
";
        let e = load(y).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 3, "{text}");
        assert!(text.contains("processors.batch"), "{text}");
        assert!(text.contains("line 7"), "{text}");
        assert!(
            text.contains(
                "service.pipelines.traces.processors[1] (line 14): references processor `missing`"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "service.pipelines.traces.exporters[1] (line 15): references exporter `nope`"
            ),
            "{text}"
        );
    }

    #[test]
    fn unknown_types_and_top_level_keys() {
        let y = "receivers:\n  kafka:\nbogus: 1\nservice:\n  pipelines:\n    traces:\n      receivers: [kafka]\n      exporters: [x]\n";
        let e = load(y).unwrap_err();
        let t = e.to_string();
        assert!(t.contains("unknown receiver type `kafka`"), "{t}");
        assert!(t.contains("unknown top-level key `bogus`"), "{t}");
        assert!(t.contains("references exporter `x`"), "{t}");
    }

    #[test]
    fn empty_pipeline_and_metrics_pipelines_refused() {
        let y = "service:\n  pipelines:\n    metrics:\n      receivers: []\n";
        let t = load(y).unwrap_err().to_string();
        assert!(t.contains("`metrics` pipelines are not supported"), "{t}");
        assert!(t.contains("needs at least one receiver"), "{t}");
        assert!(t.contains("needs at least one exporter"), "{t}");
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            parse_host_port("127.0.0.1:4317"),
            Some(("127.0.0.1".into(), 4317))
        );
        assert_eq!(
            parse_host_port("http://collector:4318/v1/traces"),
            Some(("collector".into(), 4318))
        );
        assert_eq!(parse_host_port("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(parse_host_port("nohost"), None);
    }
}
