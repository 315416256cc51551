//! Errors shared by components. Each export error is retryable or permanent and maps to a
//! protocol status.

use std::time::Duration;

/// A failed delivery attempt.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    pub message: String,
    /// The destination may accept the same data later.
    pub retryable: bool,
    /// The destination asked us to wait this long (Retry-After, gRPC RetryInfo).
    pub retry_after: Option<Duration>,
}

impl ExportError {
    pub fn retryable(message: impl Into<String>) -> Self {
        ExportError {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        ExportError {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }
    pub fn with_retry_after(mut self, d: Option<Duration>) -> Self {
        self.retry_after = d;
        self
    }
}

/// A component failed to build or start.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("{component}: cannot bind {addr}: {source}")]
    Bind {
        component: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("{component}: {message}")]
    Build { component: String, message: String },
    #[error("{component}: {message}")]
    Runtime { component: String, message: String },
}

impl ComponentError {
    pub fn build(component: impl Into<String>, message: impl Into<String>) -> Self {
        ComponentError::Build {
            component: component.into(),
            message: message.into(),
        }
    }
    pub fn runtime(component: impl Into<String>, message: impl Into<String>) -> Self {
        ComponentError::Runtime {
            component: component.into(),
            message: message.into(),
        }
    }
}
