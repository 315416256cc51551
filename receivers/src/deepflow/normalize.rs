//! Reads DeepFlow rows (OTLP spans with `df.*` attributes) into the eBPF model of
//! `shared/docs/ebpf-spans.md` §7. (Skeleton: replaced by the real implementation.)

use tailweave_core::Span;

/// How the receiver that took the spans relates to DeepFlow (`ebpf-spans.md` §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A receiver dedicated to DeepFlow: every span is eBPF-derived.
    Ebpf,
    /// A shared receiver: spans are eBPF-derived when they carry DeepFlow markers.
    Shared,
}

/// Classifies each span and fills `source` and `ebpf` for eBPF-derived ones. Malformed eBPF
/// attributes never fail: such a span passes on as a plain span and a counter says why.
pub fn normalize_spans(_spans: &mut [Span], _role: Role) {}
