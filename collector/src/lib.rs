//! tailweave collector: the binary's library half.
//!
//! # Layout
//! - [`config`]: the pipeline file (Collector layout), env substitution, validation with key paths
//!   and lines.
//! - [`service`]: the pipeline graph, the stage driver, start-up and shutdown order.
//! - [`telemetry`]: `/metrics`, the health endpoint, logs, the RSS sampler.
//! - [`loadgen`]: the scenario generator behind `tailweave loadgen`.

pub mod config;
pub mod loadgen;
pub mod service;
pub mod telemetry;
