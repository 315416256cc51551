//! Metric names, in one place. Every counter of refused, dropped or sampled-out spans is here.

// Receivers
pub const RECEIVER_ACCEPTED_SPANS: &str = "tailweave_receiver_accepted_spans_total";
pub const RECEIVER_REFUSED_SPANS: &str = "tailweave_receiver_refused_spans_total";
pub const RECEIVER_REQUESTS: &str = "tailweave_receiver_requests_total";

// Processors
pub const PROCESSOR_INCOMING_SPANS: &str = "tailweave_processor_incoming_spans_total";
pub const PROCESSOR_OUTGOING_SPANS: &str = "tailweave_processor_outgoing_spans_total";
pub const PROCESSOR_DROPPED_SPANS: &str = "tailweave_processor_dropped_spans_total";

// Exporters
pub const EXPORTER_SENT_SPANS: &str = "tailweave_exporter_sent_spans_total";
pub const EXPORTER_FAILED_SPANS: &str = "tailweave_exporter_send_failed_spans_total";
pub const EXPORTER_RETRIES: &str = "tailweave_exporter_retries_total";
pub const EXPORTER_ENQUEUE_FAILED_SPANS: &str = "tailweave_exporter_enqueue_failed_spans_total";
pub const EXPORTER_QUEUE_SIZE: &str = "tailweave_exporter_queue_size";
pub const EXPORTER_QUEUE_CAPACITY: &str = "tailweave_exporter_queue_capacity";

// Pipelines
pub const PIPELINE_QUEUE_LENGTH: &str = "tailweave_pipeline_queue_length";

// Process
pub const PROCESS_RSS_BYTES: &str = "tailweave_process_memory_rss_bytes";
/// Live heap bytes (the binary's counting allocator); with RSS it drives the memory budget.
pub const PROCESS_HEAP_BYTES: &str = "tailweave_process_memory_heap_bytes";
/// Log lines that could not be written (stderr closed or full): dropped, never a panic.
pub const LOG_LINES_LOST: &str = "tailweave_log_lines_lost_total";
