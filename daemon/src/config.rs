//! The daemon's configuration file (`config/adaptd.toml` is the shipped default, built in).
//! Unknown keys are errors, and every error names the key and the line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use adaptd_train::{Recipe, Schedule};

use crate::adapt::AdaptConfig;
use crate::engine::EngineConfig;
use crate::engine::onnx::{ExecutionProvider, SessionOptions};
use crate::gate::{GateConfig, GateMetric};
use crate::resources::ResourceLimits;
use crate::scheduler::SchedulerConfig;
use crate::trainer::{JobKind, TrainDevice, TrainPrecision, TrainerConfig};

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
    /// Seconds a stop may take (requests answered, jobs cancelled, events out) before the
    /// daemon exits with what still runs named; below the unit's `TimeoutStopSec`.
    pub stop_deadline_s: u64,
    pub engine: EngineSection,
    pub http: HttpSection,
    pub mqtt: MqttSection,
    pub ingest: IngestSection,
    pub adapters: AdaptersSection,
    pub training: TrainingSection,
    pub schedule: ScheduleSection,
    pub gate: GateSection,
    /// Fleet rollout: the fleet agent's own configuration type.
    pub fleet: crate::fleet::FleetConfig,
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    pub tasks: Vec<String>,
    pub max_batch: usize,
    pub max_payload_bytes: usize,
    pub validation_percent: u8,
    pub holdout_percent: u8,
    /// Disk budget per task for stored samples, in MiB (0: none).
    pub max_mb_per_task: u64,
    /// Eviction never takes a class below this many samples.
    pub reservoir_per_class: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersSection {
    pub keep_versions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterChoice {
    Head,
    Lora,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    pub adapter: AdapterChoice,
    pub device: TrainDevice,
    pub threads: usize,
    pub above_cut: bool,
    pub precision: TrainPrecision,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    pub learning_rate: f64,
    pub head_learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_fraction: f64,
    pub schedule: Schedule,
    pub max_epochs: usize,
    pub batch_size: usize,
    pub patience: usize,
    pub grad_clip: f64,
    pub dropout: f64,
    pub lora_dropout: f64,
    pub class_balanced: bool,
    pub head_only_epochs: usize,
    pub memory_budget_mb: u64,
    pub seed: u64,
    pub replay_fraction: f64,
    pub min_train_samples: usize,
    pub min_samples_per_class: usize,
    /// Try more capacity within a job (head, then LoRA, then LoRA at twice the rank) while
    /// validation accuracy is below `escalate_until` and each step still improves it.
    pub escalate: bool,
    pub escalate_until: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    pub min_new_samples: u64,
    pub interval_s: u64,
    pub settle_s: u64,
    pub drift_accuracy: f64,
    pub drift_min_samples: u64,
    pub cooldown_s: u64,
    pub backoff_initial_s: u64,
    pub backoff_max_s: u64,
    pub latency_budget_ms: f64,
    pub tick_ms: u64,
    pub max_cpu_percent: f32,
    pub min_available_mb: u64,
    pub max_temperature_c: f32,
    pub max_gpu_percent: f32,
    pub sysfs_root: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSection {
    pub metric: GateMetric,
    pub min_improvement: f64,
    pub max_retention_drop: f64,
    pub retention: crate::gate::RetentionPolicy,
    pub retention_min_share: f64,
    pub min_probe_change: f32,
    pub parity_tolerance: f32,
    pub min_holdout: usize,
    pub watch_min_samples: u64,
    pub rollback_drop: f64,
    pub watch_max_samples: u64,
}

impl Default for Config {
    /// The training, schedule and gate figures are the library's own defaults, so the two
    /// cannot drift; the shipped file is held equal to this by a test.
    fn default() -> Self {
        let adapt = AdaptConfig::new("default");
        let (recipe, sched, gate, limits, trainer) =
            (adapt.recipe.clone(), adapt.scheduler.clone(), adapt.gate.clone(), adapt.limits.clone(), TrainerConfig::default());
        Config {
            bundle: PathBuf::from("/var/lib/adaptd/bundles/digits-cnn"),
            state_dir: PathBuf::from("/var/lib/adaptd"),
            stop_deadline_s: 20,
            engine: EngineSection {
                max_batch: 32,
                max_wait_ms: 0,
                queue_depth: 1024,
                intra_op_threads: 2,
                execution_provider: ExecutionProvider::Cpu,
                device_id: 0,
                fallback_to_cpu: false,
            },
            http: HttpSection { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), max_request_bytes: crate::api::DEFAULT_MAX_REQUEST_BYTES },
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
                validation_percent: 10,
                holdout_percent: 10,
                max_mb_per_task: 0,
                reservoir_per_class: 50,
            },
            adapters: AdaptersSection { keep_versions: 5 },
            training: TrainingSection {
                adapter: AdapterChoice::Head,
                device: trainer.device,
                threads: trainer.threads,
                above_cut: trainer.above_cut,
                precision: trainer.precision,
                lora_rank: 8,
                lora_alpha: 8.0,
                learning_rate: recipe.learning_rate,
                head_learning_rate: recipe.head_learning_rate,
                weight_decay: recipe.weight_decay,
                warmup_fraction: recipe.warmup_fraction,
                schedule: recipe.schedule,
                max_epochs: recipe.max_epochs,
                batch_size: recipe.batch_size,
                patience: recipe.patience,
                grad_clip: recipe.grad_clip,
                dropout: recipe.dropout,
                lora_dropout: recipe.lora_dropout,
                class_balanced: recipe.class_balanced,
                head_only_epochs: recipe.head_only_epochs,
                memory_budget_mb: recipe.memory_budget_bytes.map_or(0, |b| b / (1024 * 1024)),
                seed: recipe.seed,
                replay_fraction: adapt.replay_fraction,
                min_train_samples: adapt.min_train_samples,
                min_samples_per_class: adapt.min_samples_per_class,
                escalate: !adapt.escalation.is_empty(),
                escalate_until: adapt.escalate_until,
            },
            schedule: ScheduleSection {
                min_new_samples: sched.min_new_samples,
                interval_s: sched.interval_ms / 1000,
                settle_s: sched.settle_ms / 1000,
                drift_accuracy: sched.drift_accuracy,
                drift_min_samples: sched.drift_min_samples,
                cooldown_s: sched.cooldown_ms / 1000,
                backoff_initial_s: sched.backoff_initial_ms / 1000,
                backoff_max_s: sched.backoff_max_ms / 1000,
                latency_budget_ms: sched.latency_budget_ms,
                tick_ms: adapt.tick.as_millis() as u64,
                max_cpu_percent: limits.max_cpu_percent,
                min_available_mb: limits.min_available_mb,
                max_temperature_c: limits.max_temperature_c,
                max_gpu_percent: limits.max_gpu_percent,
                sysfs_root: limits.sysfs_root,
            },
            gate: GateSection {
                metric: gate.metric,
                min_improvement: gate.min_improvement,
                max_retention_drop: gate.max_retention_drop,
                retention: gate.retention,
                retention_min_share: gate.retention_min_share,
                min_probe_change: gate.min_probe_change,
                parity_tolerance: gate.parity_tolerance,
                min_holdout: gate.min_holdout,
                watch_min_samples: adapt.watch_min_samples,
                rollback_drop: adapt.rollback_drop,
                watch_max_samples: adapt.watch_max_samples,
            },
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

/// The line of `text` that sets the first key a deserialization error names in backticks
/// (merging over the defaults loses the parser's own positions).
fn locate(text: &str, message: &str) -> Option<usize> {
    let keys = message.split('`').skip(1).step_by(2);
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let found = text.lines().position(|l| l.trim_start().strip_prefix(leaf).is_some_and(|rest| rest.trim_start().starts_with('=')));
        if let Some(i) = found {
            return Some(i + 1);
        }
    }
    None
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
        let invalid = |key: &'static str, reason: &str| Err(ConfigError::Invalid { path: path.to_path_buf(), key, reason: reason.to_string() });
        if self.engine.max_batch == 0 {
            return invalid("engine.max_batch", "must be at least 1");
        }
        if !(1..=3600).contains(&self.stop_deadline_s) {
            return invalid("stop_deadline_s", "must be between 1 and 3600 seconds");
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
        if self.training.precision == TrainPrecision::Fp16 && self.training.device == TrainDevice::Cpu {
            return invalid("training.precision", "\"fp16\" (autocast) trains on CUDA, and training.device is \"cpu\"; use \"auto\" or \"fp32\"");
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
        let m = &self.mqtt;
        let (cert, key) = (m.tls_client_cert_file.as_os_str().is_empty(), m.tls_client_key_file.as_os_str().is_empty());
        if cert != key {
            return invalid("mqtt.tls_client_cert_file", "tls_client_cert_file and tls_client_key_file go together");
        }
        if !cert && m.tls_ca_file.as_os_str().is_empty() {
            return invalid("mqtt.tls_ca_file", "a client certificate needs TLS: set tls_ca_file to the broker's CA");
        }
        if !m.password_file.as_os_str().is_empty() && m.username.is_empty() {
            return invalid("mqtt.password_file", "a password needs a username");
        }
        if m.commands && m.commands_key_file.as_os_str().is_empty() {
            return invalid("mqtt.commands", "commands over MQTT must be signed: set commands_key_file to the fleet's command key");
        }
        if m.commands
            && let Err(e) = crate::control::CommandVerifier::from_key_file(&m.commands_key_file, &m.device_id)
        {
            return invalid("mqtt.commands_key_file", &e.to_string());
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
                return Err(ConfigError::Invalid { path: path.to_path_buf(), key, reason: format!("cannot read {}: {e}", file.display()) });
            }
        }
        if self.ingest.max_batch == 0 {
            return invalid("ingest.max_batch", "must be at least 1");
        }
        if u16::from(self.ingest.validation_percent) + u16::from(self.ingest.holdout_percent) > 50 {
            return invalid("ingest.validation_percent", "validation_percent + holdout_percent must leave at least half the samples for training");
        }
        let t = &self.training;
        if t.threads == 0 {
            return invalid("training.threads", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&t.escalate_until) {
            return invalid("training.escalate_until", "a validation accuracy in [0, 1]");
        }
        if t.lora_rank == 0 {
            return invalid("training.lora_rank", "must be at least 1 (and at most the bundle's rank_max)");
        }
        if t.lora_alpha.is_nan() || t.lora_alpha <= 0.0 {
            return invalid("training.lora_alpha", "must be positive");
        }
        for (key, v) in [("training.learning_rate", t.learning_rate), ("training.head_learning_rate", t.head_learning_rate)] {
            if !(v > 0.0 && v < 1.0) {
                return invalid(key, "must be in (0, 1); fine-tuning wants a low learning rate");
            }
        }
        if !(0.0..1.0).contains(&t.warmup_fraction) {
            return invalid("training.warmup_fraction", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&t.dropout) {
            return invalid("training.dropout", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&t.lora_dropout) {
            return invalid("training.lora_dropout", "must be in [0, 1)");
        }
        if t.weight_decay < 0.0 || t.grad_clip < 0.0 {
            return invalid("training.weight_decay", "weight_decay and grad_clip must not be negative");
        }
        if t.max_epochs == 0 || t.batch_size == 0 {
            return invalid("training.max_epochs", "max_epochs and batch_size must be at least 1");
        }
        if !(0.0..=1.0).contains(&t.replay_fraction) {
            return invalid("training.replay_fraction", "must be in [0, 1]");
        }
        if t.min_samples_per_class < 2 {
            return invalid("training.min_samples_per_class", "must be at least 2: a label needs a sample to learn from and one to check");
        }
        if self.schedule.tick_ms < 10 {
            return invalid("schedule.tick_ms", "must be at least 10");
        }
        if !(0.0..=1.0).contains(&self.gate.retention_min_share) {
            return invalid("gate.retention_min_share", "a share of the traffic in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.gate.max_retention_drop) || !(0.0..=1.0).contains(&self.gate.rollback_drop) {
            return invalid("gate.max_retention_drop", "max_retention_drop and rollback_drop are fractions in [0, 1]");
        }
        if let Err(e) = self.fleet.window() {
            return invalid("fleet.maintenance_window", &e);
        }
        if let Err(e) = self.fleet.offers_url() {
            return invalid("fleet.offers", &e);
        }
        if self.fleet.enabled() {
            if let Err(e) = self.fleet.base_url() {
                return invalid("fleet.repository", &e);
            }
            if self.mqtt.host.is_empty() {
                return invalid("fleet.repository", "assignments arrive over MQTT: set mqtt.host too");
            }
            if let Err(e) = std::fs::File::open(&self.fleet.root_file) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "fleet.root_file",
                    reason: format!("cannot read {}: {e}", self.fleet.root_file.display()),
                });
            }
            if !self.fleet.ca_file.as_os_str().is_empty()
                && let Err(e) = std::fs::File::open(&self.fleet.ca_file)
            {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: "fleet.ca_file",
                    reason: format!("cannot read {}: {e}", self.fleet.ca_file.display()),
                });
            }
            if self.fleet.max_release_mb == 0 {
                return invalid("fleet.max_release_mb", "must be at least 1");
            }
        }
        for task in &self.ingest.tasks {
            if adaptd_adapters::store::check_task_name(task).is_err() {
                return invalid("ingest.tasks", &format!("{task:?} must be 1-64 characters of letters, digits, '-' and '_'"));
            }
        }
        Ok(())
    }

    /// What changed between `self` (running) and `new` that only a restart applies: everything
    /// outside `[training]`, `[schedule]` and `[gate]`, and the trainer's device and threads.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("bundle", self.bundle != new.bundle);
        check("state_dir", self.state_dir != new.state_dir);
        check("stop_deadline_s", self.stop_deadline_s != new.stop_deadline_s);
        check("engine", self.engine != new.engine);
        check("http", self.http != new.http);
        check("mqtt", self.mqtt != new.mqtt);
        check("ingest", self.ingest != new.ingest);
        check("adapters", self.adapters != new.adapters);
        check("fleet", self.fleet != new.fleet);
        check("training.device", self.training.device != new.training.device);
        check("training.threads", self.training.threads != new.training.threads);
        check("training.above_cut", self.training.above_cut != new.training.above_cut);
        check("training.precision", self.training.precision != new.training.precision);
        changed
    }

    pub fn trainer_config(&self) -> TrainerConfig {
        TrainerConfig { device: self.training.device, threads: self.training.threads, above_cut: self.training.above_cut, precision: self.training.precision }
    }

    /// The adaptation loop's settings for `task`.
    pub fn adapt_config(&self, task: &str) -> AdaptConfig {
        let (t, s, g) = (&self.training, &self.schedule, &self.gate);
        AdaptConfig {
            task: task.to_string(),
            kind: match t.adapter {
                AdapterChoice::Head => JobKind::Head,
                AdapterChoice::Lora => JobKind::Lora { rank: t.lora_rank, alpha: t.lora_alpha },
            },
            escalation: if t.escalate { crate::adapt::escalation_after(t.adapter == AdapterChoice::Head, t.lora_rank, t.lora_alpha) } else { Vec::new() },
            escalate_until: t.escalate_until,
            recipe: Recipe {
                learning_rate: t.learning_rate,
                head_learning_rate: t.head_learning_rate,
                weight_decay: t.weight_decay,
                warmup_fraction: t.warmup_fraction,
                schedule: t.schedule,
                max_epochs: t.max_epochs,
                batch_size: t.batch_size,
                patience: t.patience,
                grad_clip: t.grad_clip,
                dropout: t.dropout,
                lora_dropout: t.lora_dropout,
                class_balanced: t.class_balanced,
                head_only_epochs: t.head_only_epochs,
                memory_budget_bytes: (t.memory_budget_mb > 0).then(|| t.memory_budget_mb * 1024 * 1024),
                seed: t.seed,
            },
            scheduler: SchedulerConfig {
                min_new_samples: s.min_new_samples,
                interval_ms: s.interval_s * 1000,
                settle_ms: s.settle_s * 1000,
                drift_accuracy: s.drift_accuracy,
                drift_min_samples: s.drift_min_samples,
                cooldown_ms: s.cooldown_s * 1000,
                backoff_initial_ms: s.backoff_initial_s * 1000,
                backoff_max_ms: s.backoff_max_s * 1000,
                latency_budget_ms: s.latency_budget_ms,
            },
            gate: GateConfig {
                metric: g.metric,
                min_improvement: g.min_improvement,
                max_retention_drop: g.max_retention_drop,
                retention: g.retention,
                retention_min_share: g.retention_min_share,
                min_probe_change: g.min_probe_change,
                parity_tolerance: g.parity_tolerance,
                min_holdout: g.min_holdout,
            },
            limits: ResourceLimits {
                max_cpu_percent: s.max_cpu_percent,
                min_available_mb: s.min_available_mb,
                max_temperature_c: s.max_temperature_c,
                max_gpu_percent: s.max_gpu_percent,
                sysfs_root: s.sysfs_root.clone(),
            },
            tick: Duration::from_millis(s.tick_ms),
            min_train_samples: t.min_train_samples,
            min_samples_per_class: t.min_samples_per_class,
            replay_fraction: t.replay_fraction,
            watch_min_samples: g.watch_min_samples,
            rollback_drop: g.rollback_drop,
            watch_max_samples: g.watch_max_samples,
            max_eval_samples: 2000,
            store_budget_bytes: self.ingest.max_mb_per_task.saturating_mul(1 << 20),
            reservoir_per_class: self.ingest.reservoir_per_class,
        }
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
