//! tailweave-core: what every stage of the pipeline shares.
//!
//! # Layout
//! - [`span`]: the span as held in memory (encoded bytes + parsed header, shared resource/scope).
//! - [`wire`]: a minimal protobuf reader/writer used to slice requests without copying.
//! - [`otlp`]: OTLP trace request decoding (with per-span validation) and re-framing.
//! - [`ebpf`]: the normalized model of an eBPF-derived span.
//! - [`component`]: the receiver / processor / exporter traits and the bounded [`component::Consumer`].
//! - [`error`]: export and component errors (retryable or permanent).
//! - [`limiter`]: the process memory budget.
//! - [`names`]: metric names.
//! - [`red`]: the bounded store of RED series that `span_metrics` writes and the Prometheus
//!   exporters read.

pub mod component;
pub mod config;
pub mod ebpf;
pub mod error;
pub mod limiter;
pub mod names;
pub mod otlp;
pub mod red;
pub mod span;
pub mod tls;
pub mod wire;

pub use component::{Ack, AckWait, Consumer, Exporter, Processor, Receiver, Refused, SpanBatch};
pub use config::{BuildContext, ConfigIssue, SelfInfo};
pub use error::{ComponentError, ExportError};
pub use span::{
    AttrValue, Resource, Scope, Span, SpanId, SpanKind, SpanSource, StatusCode, TraceId,
};

/// Re-exported so every crate uses one version of the generated OTLP types.
pub use opentelemetry_proto as proto;
