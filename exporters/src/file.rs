//! The `file` exporter: OTLP/JSON lines, one `ExportTraceServiceRequest` per batch.
//!
//! The file is opened for appending at build time (so a bad path fails start-up, not the first
//! batch) and flushed after every line, so a reader following the file sees whole batches as they
//! are written. One sender keeps lines in batch order. A failed write is counted and logged by the
//! queue like any permanent export failure.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;
use tailweave_core::config::{BuildContext, ConfigIssue};
use tailweave_core::otlp::encode_json_request;
use tailweave_core::{ComponentError, ExportError, Exporter, Span};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::queue::{self, ExportSettings, QueueConfig, RetryConfig};
use crate::RunningExporter;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileExporterConfig {
    /// The file to append to; created when missing (its directory must exist). Required.
    pub path: PathBuf,
}

impl FileExporterConfig {
    pub fn validate(&self) -> Vec<ConfigIssue> {
        if self.path.as_os_str().is_empty() {
            vec![ConfigIssue::new("path", "required: the file to write")]
        } else {
            Vec::new()
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        Vec::new()
    }

    pub fn build(&self, ctx: &BuildContext) -> Result<RunningExporter, ComponentError> {
        if let Some(i) = self.validate().into_iter().next() {
            return Err(ComponentError::build(&ctx.id, i.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| {
                ComponentError::build(
                    &ctx.id,
                    format!(
                        "path: cannot open {} for appending: {e}",
                        self.path.display()
                    ),
                )
            })?;
        let settings = ExportSettings {
            retry: RetryConfig {
                enabled: false,
                ..Default::default()
            },
            queue: QueueConfig {
                num_consumers: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let exporter = FileExporter {
            path: self.path.clone(),
            file: Mutex::new(tokio::fs::File::from_std(file)),
        };
        Ok(queue::spawn_exporter(&ctx.id, &settings, exporter))
    }
}

struct FileExporter {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

#[async_trait]
impl Exporter for FileExporter {
    async fn export(&self, spans: &[Span]) -> Result<(), ExportError> {
        let mut line = encode_json_request(spans);
        line.push(b'\n');
        let mut f = self.file.lock().await;
        let r = match f.write_all(&line).await {
            Ok(()) => f.flush().await,
            Err(e) => Err(e),
        };
        r.map_err(|e| ExportError::permanent(format!("writing {}: {e}", self.path.display())))
    }

    async fn shutdown(&self) {
        let mut f = self.file.lock().await;
        if let Err(e) = f.flush().await {
            tracing::warn!(path = %self.path.display(), error = %e, "flushing the file exporter");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use tailweave_core::otlp::{decode_json_request, to_proto_request, DecodeLimits};
    use tailweave_core::proto::tonic::trace::v1::Span as PS;
    use tailweave_core::{Scope, SpanBatch};

    fn spans(trace: u8, n: u8) -> Vec<Span> {
        let sc = Arc::new(Scope::default());
        (1..=n)
            .map(|i| {
                Span::from_proto(
                    sc.clone(),
                    &PS {
                        trace_id: vec![trace; 16],
                        span_id: vec![i; 8],
                        name: format!("op{i}"),
                        start_time_unix_nano: 10,
                        end_time_unix_nano: 20,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn build(path: &std::path::Path) -> Result<RunningExporter, ComponentError> {
        let yaml = format!("path: {}", path.display());
        let c: FileExporterConfig =
            tailweave_core::config::parse(serde_yaml::from_str(&yaml).unwrap()).unwrap();
        assert!(c.validate().is_empty());
        c.build(&BuildContext {
            id: "file".into(),
            ..Default::default()
        })
    }

    fn lines(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn writes_one_parseable_line_per_batch_and_flushes_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let running = build(&path).unwrap();
        let (a, b) = (spans(1, 2), spans(2, 3));
        running.input.send(SpanBatch::new(a.clone())).await.unwrap();
        // Visible while the exporter still runs.
        let mut seen = Vec::new();
        for _ in 0..500 {
            seen = lines(&path);
            if seen.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        running.input.send(SpanBatch::new(b.clone())).await.unwrap();
        drop(running.input);
        running.done.await.unwrap();

        let got = lines(&path);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], "earlier");
        for (line, want) in got[1..].iter().zip([&a, &b]) {
            let d = decode_json_request(line.as_bytes(), &DecodeLimits::default()).unwrap();
            assert_eq!(to_proto_request(&d.spans), to_proto_request(want));
        }
    }

    #[test]
    fn path_is_required() {
        let c = FileExporterConfig::default();
        assert_eq!(c.validate()[0].path, "path");
        assert!(tailweave_core::config::parse::<FileExporterConfig>(
            serde_yaml::from_str("path: x\nrotation: {}").unwrap()
        )
        .is_err());
    }

    #[tokio::test]
    async fn unopenable_path_fails_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(&dir.path().join("missing/dir/out.jsonl"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }

    #[tokio::test]
    async fn write_errors_are_permanent_failures() {
        // /dev/full opens but every write fails with ENOSPC.
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full on Linux");
        let e = FileExporter {
            path: "/dev/full".into(),
            file: Mutex::new(tokio::fs::File::from_std(file)),
        };
        let err = e.export(&spans(1, 1)).await.unwrap_err();
        assert!(!err.retryable);
        assert!(err.message.contains("/dev/full"), "{err}");
    }
}
