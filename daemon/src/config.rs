//! The daemon's configuration file (`config/adaptd.toml` is the shipped default, built in).
//! Unknown keys are errors, and every error names the key and the line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::adapt::{AdaptConfig, ScheduleConfig, TrainingConfig};
use crate::engine::EngineConfig;
use crate::gate::GateConfig;
use crate::samples::SplitPolicy;
use crate::trainer::{TrainDevice, TrainPrecision};

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

impl ConfigError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ConfigError::Read { .. } => "config_unreadable",
            ConfigError::Parse { .. } => "config_parse",
            ConfigError::Invalid { .. } => "config_invalid",
        }
    }
}

/// The file's one unit convention for spans: whole seconds in keys ending `_s`, milliseconds in
/// keys ending `_ms`; in the daemon, [`Duration`]s.
pub mod units {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub mod seconds {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
            u64::deserialize(deserializer).map(Duration::from_secs)
        }
    }

    pub mod millis {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
            u64::deserialize(deserializer).map(Duration::from_millis)
        }
    }
}

/// The configuration file, one section per part of the daemon; each section is that part's own
/// settings type. Unknown keys and values of the wrong kind are refused by key and line before
/// the sections are read ([`Config::parse`]), since sections that compose types cannot refuse
/// unknown keys themselves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bundle: PathBuf,
    pub state_dir: PathBuf,
    /// How long a stop may take (requests answered, jobs cancelled, events out) before the
    /// daemon exits with what still runs named; below the unit's `TimeoutStopSec`.
    #[serde(rename = "stop_deadline_s", with = "units::seconds")]
    pub stop_deadline: Duration,
    pub engine: EngineConfig,
    pub http: HttpSection,
    pub mqtt: MqttSection,
    pub ingest: IngestSection,
    pub adapters: AdaptersSection,
    pub training: TrainingConfig,
    pub schedule: ScheduleConfig,
    pub gate: GateConfig,
    pub labels: crate::labels::LabelsConfig,
    pub fleet: crate::fleet::FleetConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: SocketAddr,
    pub max_request_bytes: usize,
    /// A client gets this long to send a request's headers, and a kept-alive connection that
    /// sends nothing for this long is closed.
    #[serde(rename = "header_timeout_s", with = "units::seconds")]
    pub header_timeout: Duration,
    /// And this long to send its body.
    #[serde(rename = "body_timeout_s", with = "units::seconds")]
    pub body_timeout: Duration,
    /// Connections open at once; past it a new one is closed at once.
    pub max_connections: usize,
}

impl HttpSection {
    pub fn limits(&self) -> crate::api::http::ServerLimits {
        crate::api::http::ServerLimits { header_timeout: self.header_timeout, body_timeout: self.body_timeout, max_connections: self.max_connections }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Empty: no broker (HTTP only).
    pub host: String,
    pub port: u16,
    pub device_id: String,
    pub topic_prefix: String,
    /// Answer inference requests over MQTT v5 (needs a v5 broker; the embedded one speaks 3.1.1).
    pub inference_api: bool,
    /// Empty: no authentication. The password lives in `password_file`, not here.
    pub username: String,
    pub password_file: PathBuf,
    /// PEM CA bundle that signed the broker's certificate; set: TLS (empty: plain TCP).
    pub tls_ca_file: PathBuf,
    /// This device's client certificate and key (PEM), for brokers that require one.
    pub tls_client_cert_file: PathBuf,
    pub tls_client_key_file: PathBuf,
    /// Take operator commands over MQTT (signed with the key in `commands_key_file`).
    pub commands: bool,
    pub commands_key_file: PathBuf,
}

impl MqttSection {
    /// How to reach the broker; none when no host is configured.
    pub fn connection(&self) -> Option<crate::mqtt::BrokerConnection> {
        use crate::mqtt::{BrokerConnection, TlsFiles};
        let set = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        (!self.host.is_empty()).then(|| BrokerConnection {
            host: self.host.clone(),
            port: self.port,
            credentials: (!self.username.is_empty()).then(|| (self.username.clone(), set(&self.password_file))),
            tls: set(&self.tls_ca_file).map(|ca| TlsFiles { ca, client: set(&self.tls_client_cert_file).zip(set(&self.tls_client_key_file)) }),
        })
    }

    /// The key file that verifies operator commands over MQTT, when they are on.
    pub fn commands_key(&self) -> Option<&Path> {
        self.commands.then_some(self.commands_key_file.as_path())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct IngestSection {
    /// The tasks this device learns; with a broker, their samples are ingested.
    pub tasks: Vec<String>,
    pub max_batch: usize,
    pub max_payload_bytes: usize,
    /// Which stored samples validate and which are held out.
    #[serde(flatten)]
    pub split: SplitPolicy,
    /// Disk budget per task for stored samples, in MiB (0: none).
    pub max_mb_per_task: f64,
    /// Eviction never takes a class below this many samples.
    pub reservoir_per_class: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersSection {
    pub keep_versions: usize,
}

impl Default for Config {
    /// Each part's own defaults, so the two cannot drift; the shipped file is held equal to this
    /// by a test.
    fn default() -> Self {
        Config {
            bundle: PathBuf::from("/var/lib/adaptd/bundles/digits-cnn"),
            state_dir: PathBuf::from("/var/lib/adaptd"),
            stop_deadline: Duration::from_secs(20),
            engine: EngineConfig::default(),
            http: {
                let limits = crate::api::http::ServerLimits::default();
                HttpSection {
                    listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                    max_request_bytes: crate::api::DEFAULT_MAX_REQUEST_BYTES,
                    header_timeout: limits.header_timeout,
                    body_timeout: limits.body_timeout,
                    max_connections: limits.max_connections,
                }
            },
            mqtt: MqttSection {
                host: String::new(),
                port: 1883,
                device_id: "adaptd".into(),
                topic_prefix: adaptd_protocol::topics::DEFAULT_PREFIX.into(),
                inference_api: true,
                username: String::new(),
                password_file: PathBuf::new(),
                tls_ca_file: PathBuf::new(),
                tls_client_cert_file: PathBuf::new(),
                tls_client_key_file: PathBuf::new(),
                commands: false,
                commands_key_file: PathBuf::new(),
            },
            ingest: IngestSection {
                tasks: Vec::new(),
                max_batch: 256,
                max_payload_bytes: 1 << 20,
                split: SplitPolicy::default(),
                max_mb_per_task: 0.0,
                reservoir_per_class: 50,
            },
            adapters: AdaptersSection { keep_versions: 5 },
            training: TrainingConfig::default(),
            schedule: ScheduleConfig::default(),
            gate: GateConfig::default(),
            labels: crate::labels::LabelsConfig::default(),
            fleet: crate::fleet::FleetConfig {
                repository: String::new(),
                root_file: PathBuf::from("/etc/adaptd/fleet-root.json"),
                ca_file: PathBuf::new(),
                max_release_mb: 64,
                maintenance_window: String::new(),
                offers: String::new(),
            },
        }
    }
}

/// The kind of a TOML value, as an error names it.
fn kind_of(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// A setting the checks refuse: its dotted key, and why.
type Refusal = (&'static str, String);

fn refuse(key: &'static str, reason: impl Into<String>) -> Result<(), Refusal> {
    Err((key, reason.into()))
}

/// Every key of `file` must be one the built-in defaults have (they have all of them), with a
/// value of the same kind (an integer does for a number). Named by its dotted key.
fn check_keys(file: &toml::Table, defaults: &toml::Table, section: &str) -> Result<(), String> {
    for (key, value) in file {
        let dotted = if section.is_empty() { key.clone() } else { format!("{section}.{key}") };
        let Some(default) = defaults.get(key) else {
            let mut known: Vec<&str> = defaults.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(format!("unknown key `{dotted}`; {} has {}", if section.is_empty() { "the top level" } else { section }, known.join(", ")));
        };
        match (default, value) {
            (toml::Value::Table(d), toml::Value::Table(v)) => check_keys(v, d, &dotted)?,
            (toml::Value::Float(_), toml::Value::Integer(_)) => {}
            (d, v) if std::mem::discriminant(d) != std::mem::discriminant(v) => {
                return Err(format!("`{dotted}` must be {}, not {}", kind_of(d), kind_of(v)));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The line of `text` an error is about: the first thing it quotes in backticks that is a key
/// there (dotted, or a leaf) or a value set there (merging over the defaults loses the parser's
/// own positions).
fn locate(text: &str, message: &str) -> Option<usize> {
    // (section, key, value, line) of every assignment and section header.
    let mut section = String::new();
    let mut entries: Vec<(String, String, String, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|rest| rest.split(']').next()) {
            section = name.trim().to_string();
            entries.push((String::new(), section.clone(), String::new(), i + 1));
        } else if let Some((key, value)) = line.split_once('=') {
            let value = value.split(" #").next().unwrap_or(value).trim().trim_matches('"');
            entries.push((section.clone(), key.trim().to_string(), value.to_string(), i + 1));
        }
    }
    message.split('`').skip(1).step_by(2).find_map(|quoted| {
        let (in_section, leaf) = quoted.rsplit_once('.').unwrap_or(("", quoted));
        let by_key = entries.iter().find(|(s, k, _, _)| k == leaf && (in_section.is_empty() || s == in_section));
        by_key.or_else(|| entries.iter().find(|(_, _, v, _)| !v.is_empty() && v == quoted)).map(|e| e.3)
    })
}

/// Overlay `over` onto `base`: tables merge key by key, anything else replaces. Keys that are not
/// in `base` stay, so `deny_unknown_fields` still refuses them by name.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parse and check `text`, layered over the built-in defaults: a file names only what it
    /// changes. `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_err = |e: &dyn std::fmt::Display| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string().trim_end().to_string() };
        let file: toml::Table = toml::from_str(text).map_err(|e| parse_err(&e))?;
        let mut merged: toml::Table =
            toml::from_str(DEFAULT_TOML).map_err(|e| ConfigError::Parse { path: "the built-in defaults".into(), message: e.to_string() })?;
        check_keys(&file, &merged, "").map_err(|message| match locate(text, &message) {
            Some(line) => parse_err(&format!("line {line}: {message}")),
            None => parse_err(&message),
        })?;
        merge(&mut merged, file);
        let config = Config::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let message = e.to_string().trim_end().to_string();
            let message = match locate(text, &message) {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            };
            parse_err(&message)
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        self.check_serving()
            .and_then(|()| self.check_mqtt())
            .and_then(|()| self.check_ingest())
            .and_then(|()| self.check_training())
            .and_then(|()| self.check_schedule_and_gate())
            .and_then(|()| self.check_labels())
            .and_then(|()| self.check_fleet())
            .map_err(|(key, reason)| ConfigError::Invalid { path: path.to_path_buf(), key, reason })
    }

    /// The engine, the HTTP API, the adapter store and the stop deadline.
    fn check_serving(&self) -> Result<(), Refusal> {
        if self.engine.max_batch == 0 {
            return refuse("engine.max_batch", "must be at least 1");
        }
        if !(1..=3600).contains(&self.stop_deadline.as_secs()) {
            return refuse("stop_deadline_s", "must be between 1 and 3600 seconds");
        }
        if self.engine.queue_depth == 0 {
            return refuse("engine.queue_depth", "must be at least 1");
        }
        if self.engine.session.intra_op_threads == 0 {
            return refuse("engine.intra_op_threads", "must be at least 1");
        }
        if self.engine.max_wait > Duration::from_secs(1) {
            return refuse("engine.max_wait_ms", "must be at most 1000 (it delays every request)");
        }
        if self.http.max_request_bytes < 1024 {
            return refuse("http.max_request_bytes", "must be at least 1024");
        }
        if !(1..=3600).contains(&self.http.header_timeout.as_secs()) {
            return refuse("http.header_timeout_s", "must be between 1 and 3600 seconds");
        }
        if !(1..=3600).contains(&self.http.body_timeout.as_secs()) {
            return refuse("http.body_timeout_s", "must be between 1 and 3600 seconds");
        }
        if self.http.max_connections < 16 {
            return refuse("http.max_connections", "must be at least 16 (operators, clients and probes share them)");
        }
        if self.adapters.keep_versions == 0 {
            return refuse("adapters.keep_versions", "must be at least 1 (the active version)");
        }
        Ok(())
    }

    /// The broker link: topics, TLS, credentials and signed commands.
    fn check_mqtt(&self) -> Result<(), Refusal> {
        if !self.mqtt.host.is_empty() && self.mqtt.port == 0 {
            return refuse("mqtt.port", "must not be 0 when mqtt.host is set");
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) || self.mqtt.topic_prefix.ends_with('/') {
            return refuse("mqtt.topic_prefix", "must be a non-empty topic without wildcards or a trailing '/'");
        }
        if self.mqtt.device_id.is_empty() || self.mqtt.device_id.contains(['/', '+', '#']) {
            return refuse("mqtt.device_id", "must be a non-empty topic level without '/', '+' or '#'");
        }
        let m = &self.mqtt;
        let (cert, key) = (m.tls_client_cert_file.as_os_str().is_empty(), m.tls_client_key_file.as_os_str().is_empty());
        if cert != key {
            return refuse("mqtt.tls_client_cert_file", "tls_client_cert_file and tls_client_key_file go together");
        }
        if !cert && m.tls_ca_file.as_os_str().is_empty() {
            return refuse("mqtt.tls_ca_file", "a client certificate needs TLS: set tls_ca_file to the broker's CA");
        }
        if !m.password_file.as_os_str().is_empty() && m.username.is_empty() {
            return refuse("mqtt.password_file", "a password needs a username");
        }
        if m.commands && m.commands_key_file.as_os_str().is_empty() {
            return refuse("mqtt.commands", "commands over MQTT must be signed: set commands_key_file to the fleet's command key");
        }
        if m.commands
            && let Err(e) = crate::control::CommandVerifier::from_key_file(&m.commands_key_file, &m.device_id)
        {
            return refuse("mqtt.commands_key_file", e.to_string());
        }
        for (key, file) in [
            ("mqtt.password_file", &m.password_file),
            ("mqtt.tls_ca_file", &m.tls_ca_file),
            ("mqtt.tls_client_cert_file", &m.tls_client_cert_file),
            ("mqtt.tls_client_key_file", &m.tls_client_key_file),
        ] {
            if !file.as_os_str().is_empty()
                && let Err(e) = std::fs::File::open(file)
            {
                return refuse(key, format!("cannot read {}: {e}", file.display()));
            }
        }
        Ok(())
    }

    /// Sample intake: the store's budget, batching, the splits and the task names.
    fn check_ingest(&self) -> Result<(), Refusal> {
        if self.ingest.max_mb_per_task.is_nan() || self.ingest.max_mb_per_task < 0.0 {
            return refuse("ingest.max_mb_per_task", "a size in MiB, 0 for no budget");
        }
        if self.ingest.max_batch == 0 {
            return refuse("ingest.max_batch", "must be at least 1");
        }
        if u16::from(self.ingest.split.validation_percent) + u16::from(self.ingest.split.holdout_percent) > 50 {
            return refuse("ingest.validation_percent", "validation_percent + holdout_percent must leave at least half the samples for training");
        }
        for task in &self.ingest.tasks {
            if adaptd_adapters::store::check_task_name(task).is_err() {
                return refuse("ingest.tasks", format!("{task:?} must be 1-64 characters of letters, digits, '-' and '_'"));
            }
        }
        Ok(())
    }

    /// The trainer and the recipe.
    fn check_training(&self) -> Result<(), Refusal> {
        let (t, r) = (&self.training, &self.training.recipe);
        if t.trainer.precision == TrainPrecision::Fp16 && t.trainer.device == TrainDevice::Cpu {
            return refuse("training.precision", "\"fp16\" (autocast) trains on CUDA, and training.device is \"cpu\"; use \"auto\" or \"fp32\"");
        }
        if t.trainer.threads == 0 {
            return refuse("training.threads", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&t.escalate_until) {
            return refuse("training.escalate_until", "a validation accuracy in [0, 1]");
        }
        if t.lora_rank == 0 {
            return refuse("training.lora_rank", "must be at least 1 (and at most the bundle's rank_max)");
        }
        if t.lora_alpha.is_nan() || t.lora_alpha <= 0.0 {
            return refuse("training.lora_alpha", "must be positive");
        }
        if t.loreft_rank == 0 {
            return refuse("training.loreft_rank", "must be at least 1 (and at most the bundle's LoReFT rank_max)");
        }
        for (key, v) in [
            ("training.learning_rate", r.learning_rate),
            ("training.head_learning_rate", r.head_learning_rate),
            ("training.loreft_learning_rate", t.loreft_learning_rate),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return refuse(key, "must be in (0, 1); fine-tuning wants a low learning rate");
            }
        }
        if !(0.0..1.0).contains(&r.warmup_fraction) {
            return refuse("training.warmup_fraction", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&r.dropout) {
            return refuse("training.dropout", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&r.lora_dropout) {
            return refuse("training.lora_dropout", "must be in [0, 1)");
        }
        if r.weight_decay < 0.0 || r.grad_clip < 0.0 {
            return refuse("training.weight_decay", "weight_decay and grad_clip must not be negative");
        }
        if r.max_epochs == 0 || r.batch_size == 0 {
            return refuse("training.max_epochs", "max_epochs and batch_size must be at least 1");
        }
        if !(0.0..=1.0).contains(&t.replay_fraction) {
            return refuse("training.replay_fraction", "must be in [0, 1]");
        }
        if t.min_samples_per_class < 2 {
            return refuse("training.min_samples_per_class", "must be at least 2: a label needs a sample to learn from and one to check");
        }
        Ok(())
    }

    /// Wrong labels and label requests.
    fn check_labels(&self) -> Result<(), Refusal> {
        let l = &self.labels;
        if l.suspect_neighbours == 0 {
            return refuse("labels.suspect_neighbours", "must be at least 1");
        }
        if !(l.suspect_max_share > 0.0 && l.suspect_max_share <= 1.0) {
            return refuse("labels.suspect_max_share", format!("must be above 0 and at most 1, got {}", l.suspect_max_share));
        }
        if !(0.0..=1.0).contains(&l.suspect_min_vote) {
            return refuse("labels.suspect_min_vote", format!("must be between 0 and 1, got {}", l.suspect_min_vote));
        }
        if !(0.0..=1.0).contains(&l.suspect_source_share) {
            return refuse("labels.suspect_source_share", format!("must be between 0 and 1, got {}", l.suspect_source_share));
        }
        if l.suspect_max_samples < 2 {
            return refuse("labels.suspect_max_samples", "must be at least 2 (a sample needs a neighbour)");
        }
        for (key, weight) in [
            ("labels.request_uncertainty", l.request_uncertainty),
            ("labels.request_novelty", l.request_novelty),
            ("labels.request_balance", l.request_balance),
        ] {
            if !(weight.is_finite() && weight >= 0.0) {
                return refuse(key, format!("must be 0 or more, got {weight}"));
            }
        }
        if !(0.0..=1.0).contains(&l.request_random_share) {
            return refuse("labels.request_random_share", format!("must be between 0 and 1, got {}", l.request_random_share));
        }
        if !(0.0..=2.0).contains(&l.request_min_distance) {
            return refuse("labels.request_min_distance", format!("is a cosine distance, between 0 and 2, got {}", l.request_min_distance));
        }
        if !(l.request_expiry_h.is_finite() && l.request_expiry_h > 0.0) {
            return refuse("labels.request_expiry_h", format!("must be above 0, got {}", l.request_expiry_h));
        }
        if !(l.pseudo_threshold > 0.0 && l.pseudo_threshold <= 1.0) {
            return refuse("labels.pseudo_threshold", format!("is a probability, above 0 and at most 1, got {}", l.pseudo_threshold));
        }
        if !(l.pseudo_max_ratio.is_finite() && l.pseudo_max_ratio > 0.0) {
            return refuse("labels.pseudo_max_ratio", format!("must be above 0, got {}", l.pseudo_max_ratio));
        }
        Ok(())
    }

    /// When jobs run and what the gate lets through.
    fn check_schedule_and_gate(&self) -> Result<(), Refusal> {
        if self.schedule.tick < Duration::from_millis(10) {
            return refuse("schedule.tick_ms", "must be at least 10");
        }
        if !(0.0..=1.0).contains(&self.gate.small_holdout_p) {
            return refuse("gate.small_holdout_p", "a probability in [0, 1] (0 turns the small-holdout test off)");
        }
        if !(0.0..=1.0).contains(&self.gate.retention_min_share) {
            return refuse("gate.retention_min_share", "a share of the traffic in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.gate.max_retention_drop) || !(0.0..=1.0).contains(&self.gate.watch.rollback_drop) {
            return refuse("gate.max_retention_drop", "max_retention_drop and rollback_drop are fractions in [0, 1]");
        }
        Ok(())
    }

    /// Fleet rollout: the maintenance window, the offers, and with a repository, the files it trusts.
    fn check_fleet(&self) -> Result<(), Refusal> {
        if let Err(e) = self.fleet.window() {
            return refuse("fleet.maintenance_window", e);
        }
        if let Err(e) = self.fleet.offers_url() {
            return refuse("fleet.offers", e);
        }
        if self.fleet.enabled() {
            if let Err(e) = self.fleet.base_url() {
                return refuse("fleet.repository", e);
            }
            if self.mqtt.host.is_empty() {
                return refuse("fleet.repository", "assignments arrive over MQTT: set mqtt.host too");
            }
            if let Err(e) = std::fs::File::open(&self.fleet.root_file) {
                return refuse("fleet.root_file", format!("cannot read {}: {e}", self.fleet.root_file.display()));
            }
            if !self.fleet.ca_file.as_os_str().is_empty()
                && let Err(e) = std::fs::File::open(&self.fleet.ca_file)
            {
                return refuse("fleet.ca_file", format!("cannot read {}: {e}", self.fleet.ca_file.display()));
            }
            if self.fleet.max_release_mb == 0 {
                return refuse("fleet.max_release_mb", "must be at least 1");
            }
        }
        Ok(())
    }

    /// Take `new`'s `[training]`, `[schedule]`, `[gate]` and `[labels]` (what a reload applies) and return
    /// what else changed, which only a restart applies. Everything else stays as it runs, the
    /// trainer's own settings too, so the next file is compared with what runs.
    pub fn reload(&mut self, new: Config) -> Vec<&'static str> {
        let needs_restart = self.restart_only_changes(&new);
        let trainer = self.training.trainer.clone();
        (self.training, self.schedule, self.gate, self.labels) = (new.training, new.schedule, new.gate, new.labels);
        self.training.trainer = trainer;
        needs_restart
    }

    /// What changed between `self` (running) and `new` that only a restart applies: everything
    /// outside `[training]`, `[schedule]`, `[gate]` and `[labels]`, and the trainer thread's own settings.
    fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("bundle", self.bundle != new.bundle);
        check("state_dir", self.state_dir != new.state_dir);
        check("stop_deadline_s", self.stop_deadline != new.stop_deadline);
        check("engine", self.engine != new.engine);
        check("http", self.http != new.http);
        check("mqtt", self.mqtt != new.mqtt);
        check("ingest", self.ingest != new.ingest);
        check("adapters", self.adapters != new.adapters);
        check("fleet", self.fleet != new.fleet);
        let (old, new) = (&self.training.trainer, &new.training.trainer);
        check("training.device", old.device != new.device);
        check("training.threads", old.threads != new.threads);
        check("training.above_cut", old.above_cut != new.above_cut);
        check("training.precision", old.precision != new.precision);
        changed
    }

    /// The adaptation loop of `task`: the file's training, schedule and gate sections as they
    /// are, and the task's share of the sample store.
    pub fn adapt_config(&self, task: &str) -> AdaptConfig {
        AdaptConfig {
            task: task.to_string(),
            training: self.training.clone(),
            schedule: self.schedule.clone(),
            gate: self.gate.clone(),
            labels: self.labels.clone(),
            store_budget_bytes: (self.ingest.max_mb_per_task * f64::from(1 << 20)) as u64,
            reservoir_per_class: self.ingest.reservoir_per_class,
            ..AdaptConfig::new(task)
        }
    }
}
