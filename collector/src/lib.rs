//! tailweave collector: the binary's library half.
//!
//! # Layout
//! - [`loadgen`]: the scenario generator behind `tailweave loadgen`.

pub mod loadgen;
