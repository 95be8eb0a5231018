//! The daemon's configuration file (`config/adaptd.toml` is the shipped default, built in).
//! Unknown keys are errors, and every error names the key and the line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::EngineConfig;
use crate::engine::onnx::{ExecutionProvider, SessionOptions};

/// The shipped default file, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config/adaptd.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid { path: PathBuf, key: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bundle: PathBuf,
    pub state_dir: PathBuf,
    pub engine: EngineSection,
    pub http: HttpSection,
    pub mqtt: MqttSection,
    pub ingest: IngestSection,
    pub adapters: AdaptersSection,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub max_batch: usize,
    pub max_wait_ms: u64,
    pub queue_depth: usize,
    pub intra_op_threads: usize,
    pub execution_provider: ExecutionProvider,
    pub device_id: i32,
    pub fallback_to_cpu: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: SocketAddr,
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub host: String,
    pub port: u16,
    pub device_id: String,
    pub topic_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    pub tasks: Vec<String>,
    pub max_batch: usize,
    pub max_payload_bytes: usize,
    pub validation_percent: u8,
    pub holdout_percent: u8,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersSection {
    pub keep_versions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bundle: PathBuf::from("/var/lib/adaptd/bundles/digits-cnn"),
            state_dir: PathBuf::from("/var/lib/adaptd"),
            engine: EngineSection { max_batch: 32, max_wait_ms: 0, queue_depth: 1024, intra_op_threads: 2, execution_provider: ExecutionProvider::Cpu, device_id: 0, fallback_to_cpu: false },
            http: HttpSection { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), max_request_bytes: crate::api::DEFAULT_MAX_REQUEST_BYTES },
            mqtt: MqttSection { host: String::new(), port: 1883, device_id: "adaptd".into(), topic_prefix: "adaptd/v1".into() },
            ingest: IngestSection { tasks: Vec::new(), max_batch: 256, max_payload_bytes: 1 << 20, validation_percent: 10, holdout_percent: 10 },
            adapters: AdaptersSection { keep_versions: 5 },
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parse and check `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string().trim_end().to_string() })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| Err(ConfigError::Invalid { path: path.to_path_buf(), key, reason: reason.to_string() });
        if self.engine.max_batch == 0 {
            return invalid("engine.max_batch", "must be at least 1");
        }
        if self.engine.queue_depth == 0 {
            return invalid("engine.queue_depth", "must be at least 1");
        }
        if self.engine.intra_op_threads == 0 {
            return invalid("engine.intra_op_threads", "must be at least 1");
        }
        if self.engine.max_wait_ms > 1000 {
            return invalid("engine.max_wait_ms", "must be at most 1000 (it delays every request)");
        }
        if self.http.max_request_bytes < 1024 {
            return invalid("http.max_request_bytes", "must be at least 1024");
        }
        if self.adapters.keep_versions == 0 {
            return invalid("adapters.keep_versions", "must be at least 1 (the active version)");
        }
        if !self.mqtt.host.is_empty() && self.mqtt.port == 0 {
            return invalid("mqtt.port", "must not be 0 when mqtt.host is set");
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) || self.mqtt.topic_prefix.ends_with('/') {
            return invalid("mqtt.topic_prefix", "must be a non-empty topic without wildcards or a trailing '/'");
        }
        if self.mqtt.device_id.is_empty() || self.mqtt.device_id.contains(['/', '+', '#']) {
            return invalid("mqtt.device_id", "must be a non-empty topic level without '/', '+' or '#'");
        }
        if self.ingest.max_batch == 0 {
            return invalid("ingest.max_batch", "must be at least 1");
        }
        if u16::from(self.ingest.validation_percent) + u16::from(self.ingest.holdout_percent) > 50 {
            return invalid("ingest.validation_percent", "validation_percent + holdout_percent must leave at least half the samples for training");
        }
        for task in &self.ingest.tasks {
            if adaptd_adapters::store::check_task_name(task).is_err() {
                return invalid("ingest.tasks", &format!("{task:?} must be 1-64 characters of letters, digits, '-' and '_'"));
            }
        }
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.engine.max_batch,
            max_wait: Duration::from_millis(self.engine.max_wait_ms),
            queue_depth: self.engine.queue_depth,
            session: SessionOptions {
                intra_op_threads: self.engine.intra_op_threads,
                provider: self.engine.execution_provider,
                device_id: self.engine.device_id,
                fallback_to_cpu: self.engine.fallback_to_cpu,
            },
        }
    }
}
