//! The `span_metrics` processor: RED metrics (calls, errors, a duration histogram) over every span,
//! passing spans through unchanged.
//!
//! It belongs *before* `tail_sampling`, so the metrics count 100% of the traffic, not the sample.
//! The series live in the process-wide [`RedRegistry`] (`tailweave_core::red`), which the
//! `prometheus` exporter serves on `/metrics` and the `prometheus_remote_write` exporter pushes.
//! Names follow the Collector's `spanmetrics` connector as its Prometheus exporter renders them:
//! `{namespace}_calls_total` and `{namespace}_duration_milliseconds_{bucket,sum,count}` with the
//! labels `service_name`, `span_name`, `span_kind`, `status_code`, the configured `dimensions`,
//! and `protocol` on eBPF-derived spans (`MySQL`, `Redis`, `HTTP`, ...), so uninstrumented services
//! get the same metrics. Errors are the calls with `status_code="STATUS_CODE_ERROR"`; a span counts
//! as an error when [`Span::is_error`] says so (which includes timed-out eBPF calls).
//!
//! # Exemplars and where to place the exporters
//! Every histogram bucket can carry an exemplar, but only of a trace that was *kept*. This
//! processor only notes candidates (recent trace ids per bucket); a `prometheus` or
//! `prometheus_remote_write` exporter that sits after `tail_sampling` marks the trace ids that
//! reach it as kept, and only those become exemplars. So the wiring is:
//!
//! ```yaml
//! pipelines:
//!   traces:
//!     processors: [span_metrics, tail_sampling, batch]
//!     exporters: [otlp, prometheus]
//! ```
//!
//! A metrics exporter in a pipeline without a sampler marks every trace it sees as kept, which is
//! true: they all went out. See `examples/red-metrics.yaml`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::red::{
    sanitize_name, DurationUnit, Observation, Recorded, RedRegistry, RedSet, RedSetConfig,
};
use tailweave_core::{ComponentError, Processor, Span, SpanBatch, SpanSource};

/// Spans that went to the overflow series because `max_series` was reached.
pub const OVERFLOW_SPANS: &str = "tailweave_span_metrics_overflow_spans_total";
/// Series held (not counting the overflow series).
pub const SERIES: &str = "tailweave_span_metrics_series";

/// The attribute DeepFlow writes the L7 protocol name into.
pub const L7_PROTOCOL_ATTR: &str = "df.application.l7_protocol";

/// The labels every series has, before the dimensions.
pub const BASE_LABELS: [&str; 5] = [
    "service_name",
    "span_name",
    "span_kind",
    "status_code",
    "protocol",
];

/// Unit of the duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum HistogramUnit {
    /// Milliseconds: the metric is `duration_milliseconds`.
    #[default]
    #[serde(rename = "ms")]
    Ms,
    /// Seconds: the metric is `duration_seconds`.
    #[serde(rename = "s")]
    S,
}

/// `histogram.explicit`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExplicitBuckets {
    /// Upper bounds, strictly increasing durations (`2ms`, `1s`). Default the Collector's:
    /// 2ms 4ms 6ms 8ms 10ms 50ms 100ms 200ms 400ms 800ms 1s 1400ms 2s 5s 10s 15s.
    #[serde(deserialize_with = "durations")]
    pub buckets: Vec<Duration>,
}

impl Default for ExplicitBuckets {
    fn default() -> Self {
        let ms = Duration::from_millis;
        ExplicitBuckets {
            buckets: vec![
                ms(2),
                ms(4),
                ms(6),
                ms(8),
                ms(10),
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1400),
                ms(2000),
                ms(5000),
                ms(10_000),
                ms(15_000),
            ],
        }
    }
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let v: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.into_inner()).collect())
}

/// `histogram`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistogramConfig {
    /// `ms` or `s`. Default `ms`.
    pub unit: HistogramUnit,
    /// The bucket bounds.
    pub explicit: ExplicitBuckets,
}

/// One extra label taken from a span attribute (else the resource attribute of that key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// The attribute key; the label name is the key with every character outside
    /// `[a-zA-Z0-9_]` replaced by `_` (`http.method` -> `http_method`).
    pub name: String,
    /// Value used when the span has no such attribute. Default none: the label is left out.
    #[serde(default)]
    pub default: Option<String>,
}

/// `exemplars`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExemplarsConfig {
    /// Note exemplar candidates. Default `true`.
    pub enabled: bool,
    /// Traces whose candidates wait for an exporter to see them kept; the oldest is forgotten
    /// first. Should cover the sampler's decision wait at your trace rate. Default `10000`.
    pub max_pending_traces: usize,
}

impl Default for ExemplarsConfig {
    fn default() -> Self {
        ExemplarsConfig {
            enabled: true,
            max_pending_traces: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpanMetricsConfig {
    /// Prefix of the metric names; characters outside `[a-zA-Z0-9_]` become `_`. Default
    /// `traces.span.metrics` (as the Collector's connector), giving `traces_span_metrics_calls_total`.
    pub namespace: String,
    /// The duration histogram.
    pub histogram: HistogramConfig,
    /// Extra labels from span (else resource) attributes. Default none.
    pub dimensions: Vec<Dimension>,
    /// Most label combinations held; spans of further combinations are counted in one series
    /// labelled `otel_metric_overflow="true"`. Default `5000`.
    #[serde(alias = "aggregation_cardinality_limit")]
    pub max_series: usize,
    /// Exemplars on the histogram buckets.
    pub exemplars: ExemplarsConfig,
}

impl Default for SpanMetricsConfig {
    fn default() -> Self {
        SpanMetricsConfig {
            namespace: "traces.span.metrics".into(),
            histogram: HistogramConfig::default(),
            dimensions: Vec::new(),
            max_series: 5000,
            exemplars: ExemplarsConfig::default(),
        }
    }
}

impl SpanMetricsConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let b = &self.histogram.explicit.buckets;
        if b.is_empty() {
            out.push(ConfigIssue::new(
                "histogram.explicit.buckets",
                "at least one bucket bound is required",
            ));
        }
        for (i, w) in b.windows(2).enumerate() {
            if w[1] <= w[0] {
                out.push(ConfigIssue::new(
                    format!("histogram.explicit.buckets[{}]", i + 1),
                    format!("bounds must increase: {:?} is not above {:?}", w[1], w[0]),
                ));
            }
        }
        if self.max_series == 0 {
            out.push(ConfigIssue::new("max_series", "must be at least 1"));
        }
        if self.exemplars.enabled && self.exemplars.max_pending_traces == 0 {
            out.push(ConfigIssue::new(
                "exemplars.max_pending_traces",
                "must be at least 1 when exemplars are enabled",
            ));
        }
        let mut seen: Vec<String> = BASE_LABELS.iter().map(|s| s.to_string()).collect();
        for (i, d) in self.dimensions.iter().enumerate() {
            let path = format!("dimensions[{i}].name");
            if d.name.trim().is_empty() {
                out.push(ConfigIssue::new(path, "must not be empty"));
                continue;
            }
            let label = sanitize_name(&d.name);
            if seen.contains(&label) || label == "le" || label.starts_with("__") {
                out.push(ConfigIssue::new(
                    path,
                    format!("label {label:?} is already used or reserved"),
                ));
            }
            seen.push(label);
        }
        out
    }

    /// The registry set this config describes.
    pub fn set_config(&self) -> RedSetConfig {
        let unit = match self.histogram.unit {
            HistogramUnit::Ms => DurationUnit::Milliseconds,
            HistogramUnit::S => DurationUnit::Seconds,
        };
        let mut label_names: Vec<String> = BASE_LABELS.iter().map(|s| s.to_string()).collect();
        label_names.extend(self.dimensions.iter().map(|d| sanitize_name(&d.name)));
        RedSetConfig {
            namespace: sanitize_name(&self.namespace),
            unit,
            bounds: self
                .histogram
                .explicit
                .buckets
                .iter()
                .map(|d| unit.from_ns(d.as_nanos().min(u64::MAX as u128) as u64))
                .collect(),
            label_names,
            max_series: self.max_series,
            exemplars: self.exemplars.enabled,
            max_pending_traces: self.exemplars.max_pending_traces,
        }
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<SpanMetrics, ComponentError> {
        self.build_with(ctx, &RedRegistry::global())
    }

    /// Builds against a given registry (tests use their own).
    pub fn build_with(
        &self,
        ctx: &BuildContext,
        registry: &RedRegistry,
    ) -> Result<SpanMetrics, ComponentError> {
        let issues = self.validate();
        if !issues.is_empty() {
            let all: Vec<String> = issues.iter().map(|i| i.to_string()).collect();
            return Err(ComponentError::build(&ctx.id, all.join("; ")));
        }
        let set = registry
            .register(&ctx.id, self.set_config())
            .map_err(|e| ComponentError::build(&ctx.id, e.to_string()))?;
        Ok(SpanMetrics {
            id: ctx.id.clone(),
            set,
            dimensions: self.dimensions.clone(),
        })
    }
}

pub struct SpanMetrics {
    id: String,
    set: Arc<RedSet>,
    dimensions: Vec<Dimension>,
}

impl SpanMetrics {
    /// The label values of `span`, in the set's label order.
    fn labels<'a>(&self, span: &'a Span, out: &mut Vec<Option<Cow<'a, str>>>) {
        out.clear();
        out.push(Some(Cow::Borrowed(span.service_name())));
        out.push(Some(Cow::Borrowed(span.name())));
        out.push(Some(Cow::Borrowed(span.kind.as_str())));
        let status = if span.is_error() {
            tailweave_core::StatusCode::Error
        } else {
            span.status
        };
        out.push(Some(Cow::Borrowed(status.as_str())));
        out.push(protocol(span));
        for d in &self.dimensions {
            let v = match span.attr_or_resource(&d.name) {
                Some(tailweave_core::AttrValue::Str(s)) => Some(Cow::Borrowed(s)),
                Some(v) => Some(Cow::Owned(v.to_string_lossy())),
                None => d.default.clone().map(Cow::Owned),
            };
            out.push(v);
        }
    }
}

impl Processor for SpanMetrics {
    fn process(&mut self, _now: Instant, batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        let unit = self.set.cfg.unit;
        let mut overflowed = 0u64;
        {
            let mut w = self.set.writer();
            let mut labels = Vec::with_capacity(BASE_LABELS.len() + self.dimensions.len());
            for span in &batch.spans {
                self.labels(span, &mut labels);
                let o = Observation {
                    labels: &labels,
                    duration: unit.from_ns(span.end_ns.saturating_sub(span.start_ns)),
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    end_unix_ns: span.end_ns,
                };
                if w.observe(&o) == Recorded::Overflow {
                    overflowed += 1;
                }
            }
        }
        if overflowed > 0 {
            metrics::counter!(OVERFLOW_SPANS, "processor" => self.id.clone()).increment(overflowed);
        }
        metrics::gauge!(SERIES, "processor" => self.id.clone()).set(self.set.series_count() as f64);
        out.push(batch);
    }
}

/// The L7 protocol of an eBPF-derived span: DeepFlow's attribute, else the normalized model's id.
/// `None` for SDK spans. After an OTLP hop the in-memory source is gone, so the attribute alone
/// also marks a span as eBPF-derived.
fn protocol(span: &Span) -> Option<Cow<'_, str>> {
    if let Some(v) = span.attr(L7_PROTOCOL_ATTR) {
        let s = v.to_string_lossy();
        if !s.is_empty() {
            return Some(match v {
                tailweave_core::AttrValue::Str(s) => Cow::Borrowed(s),
                _ => Cow::Owned(s),
            });
        }
    }
    if span.source != SpanSource::Ebpf {
        return None;
    }
    let Some(e) = span.ebpf.as_ref() else {
        return Some(Cow::Borrowed("unknown"));
    };
    let name = l7_protocol_name(e.l7_protocol);
    Some(if e.is_tls {
        Cow::Owned(format!("{name}_TLS"))
    } else {
        Cow::Borrowed(name)
    })
}

/// DeepFlow's L7 protocol ids (`ebpf-spans.md` §5).
pub fn l7_protocol_name(id: u8) -> &'static str {
    match id {
        20 => "HTTP",
        21 => "HTTP2",
        40 => "Dubbo",
        41 => "gRPC",
        43 => "SofaRPC",
        44 => "FastCGI",
        45 => "bRPC",
        46 => "Tars",
        47 => "SOME/IP",
        48 => "ISO8583",
        49 => "Triple",
        50 => "NetSign",
        60 => "MySQL",
        61 => "PostgreSQL",
        62 => "Oracle",
        63 => "Dameng",
        80 => "Redis",
        81 => "MongoDB",
        82 => "Memcached",
        100 => "Kafka",
        101 => "MQTT",
        102 => "AMQP",
        103 => "OpenWire",
        104 => "NATS",
        105 => "Pulsar",
        106 => "ZMTP",
        107 => "RocketMQ",
        108 => "WebSphereMQ",
        120 => "DNS",
        121 => "TLS",
        127 => "Custom",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testspan;
