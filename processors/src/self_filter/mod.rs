//! The `self_filter` processor: drops spans that describe tailweave's own traffic.
//!
//! The DeepFlow agent on tailweave's node captures every OTLP call tailweave receives and makes;
//! DeepFlow exports those rows back to tailweave, which exports them, which the agent captures
//! again (`ebpf-spans.md` §9). This stage sits first in every pipeline that receives eBPF-derived
//! spans and breaks that loop on the tailweave side; the agent-side half is the
//! `inputs.ebpf.socket.kprobe.blacklist.ports` setting that [`SelfFilterConfig::describe`] prints.
//!
//! # Layout
//! - this file: the config, its validation, the derived-rule description and the build step;
//! - [`rules`]: the compiled rules and the per-span match, over the eBPF model or, when the
//!   receiver left `span.ebpf` empty, over the DeepFlow attributes read from the bytes.
//!
//! With no settings the rules come from [`SelfInfo`] (the running config): tailweave's listening
//! ports, its exporter endpoints, its pid and process name, its host, pod and node name, and its
//! own service name. The node name is read from `NODE_NAME` (or `K8S_NODE_NAME`), which a pod gets
//! from the downward API: the DeepFlow agent runs once per node, so the host of an eBPF span is the
//! node's name, not the pod's. Config adds rules by port, CIDR, process name, service name and
//! resource attribute. Every drop is counted by rule in [`DROPPED_SPANS`].

pub mod rules;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue, SelfInfo};
use tailweave_core::{ComponentError, Processor, SpanBatch};

pub use rules::{Cidr, Rule, Rules};

/// Spans dropped, by `processor` (component id) and `rule` ([`Rule::label`]).
pub const DROPPED_SPANS: &str = "tailweave_self_filter_dropped_spans_total";

/// `processors.self_filter`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SelfFilterConfig {
    /// Derive rules from the running config: listening ports, exporter endpoints, pid, process
    /// name, host / pod name and tailweave's own service name. Default `true`.
    pub derive_rules: bool,
    /// Apply the listening-port rule to eBPF spans from every host, not only this one. In a
    /// gateway tier every instance listens on the same ports and receives the rows of the
    /// others' traffic. Default `false`.
    pub any_host: bool,
    /// Extra server ports: an eBPF span whose server port is listed is dropped, on any host.
    /// Default none.
    pub ports: Vec<u16>,
    /// Extra networks (`10.0.0.0/8`, `fd00::/8`, or a bare address): an eBPF span with a client
    /// or server IP inside one is dropped. Default none.
    pub cidrs: Vec<String>,
    /// Extra process names (the kernel's name, at most 15 bytes, as `thread.name_0/1` carries
    /// it): an eBPF span with a client or server process of that name is dropped. Default none.
    pub process_names: Vec<String>,
    /// Extra service names: any span (SDK or eBPF) whose resource `service.name` is listed is
    /// dropped. Default none.
    pub service_names: Vec<String>,
    /// Resource attribute matches: any span whose resource has one of these attributes with that
    /// value (compared as text) is dropped. Each pair is a rule of its own. Default none.
    pub resource_attributes: BTreeMap<String, String>,
}

impl Default for SelfFilterConfig {
    fn default() -> Self {
        SelfFilterConfig {
            derive_rules: true,
            any_host: false,
            ports: Vec::new(),
            cidrs: Vec::new(),
            process_names: Vec::new(),
            service_names: Vec::new(),
            resource_attributes: BTreeMap::new(),
        }
    }
}

impl SelfFilterConfig {
    /// Every problem, with key paths relative to the processor.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        for (i, p) in self.ports.iter().enumerate() {
            if *p == 0 {
                out.push(ConfigIssue::new(
                    format!("ports[{i}]"),
                    "must be 1 to 65535",
                ));
            }
        }
        for (i, c) in self.cidrs.iter().enumerate() {
            if let Err(e) = Cidr::parse(c) {
                out.push(ConfigIssue::new(format!("cidrs[{i}]"), e));
            }
        }
        for (i, n) in self.process_names.iter().enumerate() {
            if n.trim().is_empty() {
                out.push(ConfigIssue::new(
                    format!("process_names[{i}]"),
                    "must not be empty",
                ));
            }
        }
        for (i, n) in self.service_names.iter().enumerate() {
            if n.trim().is_empty() {
                out.push(ConfigIssue::new(
                    format!("service_names[{i}]"),
                    "must not be empty",
                ));
            }
        }
        for k in self.resource_attributes.keys() {
            if k.trim().is_empty() {
                out.push(ConfigIssue::new(
                    "resource_attributes",
                    "an attribute key must not be empty",
                ));
            }
        }
        out
    }

    /// Compiles the rules for this process. Invalid CIDRs were reported by `validate`; here they
    /// fail the build.
    pub fn rules(&self, info: &SelfInfo) -> Result<Rules, String> {
        Rules::compile(self, info)
    }

    /// The rules as `tailweave validate` prints them, one per line, and the matching agent
    /// setting so the agent does not capture the traffic at all.
    pub fn describe(&self, ctx: &BuildContext) -> Vec<String> {
        match self.rules(&ctx.self_info) {
            Ok(r) => r.describe(),
            Err(e) => vec![format!("invalid: {e}")],
        }
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<SelfFilter, ComponentError> {
        let rules = self
            .rules(&ctx.self_info)
            .map_err(|e| ComponentError::build(&ctx.id, e))?;
        for line in rules.describe() {
            tracing::info!(processor = %ctx.id, "{line}");
        }
        Ok(SelfFilter::new(&ctx.id, Arc::new(rules)))
    }
}

/// The running `self_filter`: stateless, one pass over each batch.
pub struct SelfFilter {
    rules: Arc<Rules>,
    /// One counter per rule, indexed by [`Rule::index`], registered at build so a zero shows.
    dropped: Vec<metrics::Counter>,
}

impl SelfFilter {
    pub fn new(id: &str, rules: Arc<Rules>) -> Self {
        let dropped = Rule::ALL
            .iter()
            .map(|r| {
                let c = metrics::counter!(DROPPED_SPANS, "processor" => id.to_string(), "rule" => r.label());
                c.increment(0);
                c
            })
            .collect();
        SelfFilter { rules, dropped }
    }

    /// The compiled rules (for tests and `describe`).
    pub fn rules(&self) -> &Rules {
        &self.rules
    }
}

impl Processor for SelfFilter {
    fn process(&mut self, _now: Instant, mut batch: SpanBatch, out: &mut Vec<SpanBatch>) {
        let mut counts = [0u64; Rule::ALL.len()];
        let mut cache = rules::ResourceCache::default();
        batch
            .spans
            .retain(|s| match self.rules.matches(s, &mut cache) {
                Some(rule) => {
                    counts[rule.index()] += 1;
                    false
                }
                None => true,
            });
        for (i, n) in counts.iter().enumerate() {
            if *n > 0 {
                self.dropped[i].increment(*n);
            }
        }
        if !batch.spans.is_empty() {
            out.push(batch);
        }
    }
}
