//! What every component config shares: the problem type with its key path, typed parsing of a
//! YAML subtree, the build context, and the facts about this process the self-filter derives from.

use std::sync::Arc;

use serde::de::DeserializeOwned;

/// One problem in a config, at a key path relative to the component (`protocols.grpc.endpoint`).
/// The collector prefixes the component's own path and adds the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigIssue {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parses a component's YAML subtree into its config type. `null` (a component listed with no
/// settings) parses as the type's defaults. The error names the path of the offending key.
pub fn parse<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, ConfigIssue> {
    let value = match value {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        v => v,
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigIssue::new(path, e.into_inner().to_string())
    })
}

/// Facts about the running collector, for components that must recognise its own traffic.
#[derive(Clone, Debug, Default)]
pub struct SelfInfo {
    /// Every port a receiver or the telemetry/health endpoints listen on.
    pub listen_ports: Vec<u16>,
    /// `host:port` of every exporter endpoint.
    pub exporter_endpoints: Vec<String>,
    pub pid: u32,
    pub process_name: String,
    pub host_name: String,
    pub pod_name: Option<String>,
    /// The service name tailweave's own tracing would use.
    pub service_name: String,
}

/// Passed to every component's build step.
#[derive(Clone, Debug, Default)]
pub struct BuildContext {
    /// The component id, `type[/name]`.
    pub id: String,
    /// The pipeline id, `traces[/name]`, for processors (each pipeline gets its own instance).
    pub pipeline: String,
    pub self_info: Arc<SelfInfo>,
}
