//! tailweave collector.
