//! The adaptation loop of one task: store → scheduler → trainer → gate → registry, and the
//! watch that rolls a promoted adapter back when fresh labels say it got worse.
//!
//! - [`task_loop`]: the loop itself ([`TaskLoop`](task_loop::TaskLoop)), a thin async driver
//!   that owns the task's state and calls the parts below in order, each tick.
//! - [`dataset`]: what a job trains on (samples, labels, replayed base-domain rows, the head
//!   to start from).
//! - [`evaluate`]: everything asked of the serving engine, and the gate's evidence about a
//!   candidate (holdout, retention, probe, parity, base-domain routing).
//! - [`watch`]: the rollback watch after a promotion, pure.
//! - The scheduler ([`crate::scheduler`]) and the gate's decision ([`crate::gate`]) are pure
//!   too, and the same for every task.
//!
//! Every decision is an event, a log line, a journal record, and part of the adapter's manifest.

mod dataset;
mod evaluate;
mod task_loop;
#[cfg(test)]
mod tests;
mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptd_adapters::reft::ReftPositions;
use adaptd_train::Recipe;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch as channel};

pub use dataset::model_inputs;

use crate::engine::EngineHandle;
use crate::events::{Events, Journal};
use crate::gate::GateConfig;
use crate::preprocess::TextEncoder;
use crate::registry::Registry;
use crate::resources::ResourceLimits;
use crate::samples::{SampleStore, SplitPolicy};
use crate::scheduler::SchedulerConfig;
use crate::trainer::{JobKind, Trainer, TrainerConfig};

/// Which adapter a job trains first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterChoice {
    Head,
    Lora,
    Loreft,
}

/// Whether a job escalating from a head tries LoReFT before LoRA. Off by default: on the text
/// shift suite the LoReFT step changed nothing on typos and phrasings but, reaching
/// `escalate_until` on validation, ended the new-intents job before LoRA (95.7 % against 97.1 %,
/// old intents kept 92.7 % against 96.3 %); on images LoReFT trails LoRA (sideways digits 85.6 %
/// against 91.2 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoreftStep {
    /// Where the bundle's LoReFT slots edit sequences (text models): there LoReFT alone came
    /// within 0.1 point of LoRA on the intents bench at 1/26 of its size.
    Auto,
    Always,
    Never,
}

/// How a task trains: the `[training]` section of the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrainingConfig {
    pub adapter: AdapterChoice,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    /// LoReFT's rank, the positions it edits on sequences (`f1+l1`: each text's first and last
    /// token, as the paper writes them) and the layers (empty: every LoReFT slot of the bundle).
    pub loreft_rank: usize,
    #[serde(deserialize_with = "positions_from_str")]
    pub loreft_positions: ReftPositions,
    pub loreft_layers: Vec<String>,
    /// LoReFT's learning rate (the recipe's `learning_rate` is LoRA's): its few parameters want
    /// larger steps (benches/compare_loreft.py).
    pub loreft_learning_rate: f64,
    /// Escalating from a head: a LoReFT step before LoRA (a far smaller adapter where it does
    /// as well; the ladder goes on to LoRA where it does not).
    pub loreft_step: LoreftStep,
    /// The trainer thread's own settings (applied at start-up).
    #[serde(flatten)]
    pub trainer: TrainerConfig,
    #[serde(flatten)]
    pub recipe: Recipe,
    /// Retained base-domain samples mixed into training, as a share of the task's samples.
    pub replay_fraction: f64,
    /// Fewer training samples than this (over the classes that qualify): the job is deferred.
    pub min_train_samples: usize,
    /// A label with fewer training samples than this waits for more before it joins the head.
    pub min_samples_per_class: usize,
    /// Try more capacity within a job ([`escalation_after`]) while the best validation
    /// accuracy so far is below `escalate_until` and each step still improves it.
    pub escalate: bool,
    pub escalate_until: f64,
    /// Each escalation step that beats the steps before it meets the gate as soon as it is
    /// trained and, passed, serves at once (the next step is judged against it): an improvement
    /// serves within seconds instead of after the whole ladder. False: only the job's best step
    /// meets the gate, at the end.
    pub promote_each_step: bool,
    /// After the ladder: its promoted choice trained again with the validation samples too, for
    /// the epochs validation chose, judged by the holdout alone (see `TaskLoop::refit_step`).
    pub refit: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            adapter: AdapterChoice::Head,
            lora_rank: 8,
            lora_alpha: 8.0,
            loreft_rank: 4,
            loreft_positions: ReftPositions { first: 1, last: 1 },
            loreft_layers: Vec::new(),
            loreft_learning_rate: 5e-3,
            loreft_step: LoreftStep::Never,
            trainer: TrainerConfig::default(),
            recipe: Recipe::default(),
            replay_fraction: 0.2,
            min_train_samples: 20,
            min_samples_per_class: 2,
            escalate: true,
            escalate_until: 0.98,
            promote_each_step: true,
            refit: true,
        }
    }
}

impl TrainingConfig {
    /// What a job trains first.
    pub fn kind(&self) -> JobKind {
        match self.adapter {
            AdapterChoice::Head => JobKind::Head,
            AdapterChoice::Lora => JobKind::Lora { rank: self.lora_rank, alpha: self.lora_alpha },
            AdapterChoice::Loreft => JobKind::Loreft { rank: self.loreft_rank, positions: self.loreft_positions },
        }
    }

    /// The same settings, training `kind` (a step of escalation).
    pub fn with_kind(&self, kind: JobKind) -> TrainingConfig {
        let (adapter, lora_rank, lora_alpha, loreft_rank, loreft_positions) = match kind {
            JobKind::Head => (AdapterChoice::Head, self.lora_rank, self.lora_alpha, self.loreft_rank, self.loreft_positions),
            JobKind::Lora { rank, alpha } => (AdapterChoice::Lora, rank, alpha, self.loreft_rank, self.loreft_positions),
            JobKind::Loreft { rank, positions } => (AdapterChoice::Loreft, self.lora_rank, self.lora_alpha, rank, positions),
        };
        TrainingConfig { adapter, lora_rank, lora_alpha, loreft_rank, loreft_positions, ..self.clone() }
    }

    /// The recipe of a job that trains [`kind`](Self::kind): LoReFT at its own learning rate.
    pub fn job_recipe(&self) -> Recipe {
        match self.kind() {
            JobKind::Loreft { .. } => Recipe { learning_rate: self.loreft_learning_rate, ..self.recipe.clone() },
            JobKind::Head | JobKind::Lora { .. } => self.recipe.clone(),
        }
    }

    /// More capacity to try after [`kind`](Self::kind) within a job, in order (empty: none):
    /// from a head, LoReFT first where `loreft_step` says so and `edits_sequences` (the bundle's
    /// LoReFT slots edit text), then LoRA.
    pub fn escalation(&self, edits_sequences: bool) -> Vec<JobKind> {
        if !self.escalate {
            return Vec::new();
        }
        let loreft_first = self.adapter == AdapterChoice::Head
            && match self.loreft_step {
                LoreftStep::Auto => edits_sequences,
                LoreftStep::Always => true,
                LoreftStep::Never => false,
            };
        let loreft = loreft_first.then_some(JobKind::Loreft { rank: self.loreft_rank, positions: self.loreft_positions });
        loreft.into_iter().chain(escalation_after(self.adapter != AdapterChoice::Lora, self.lora_rank, self.lora_alpha)).collect()
    }
}

/// When jobs start, and what the device must spare for one: the `[schedule]` section of the
/// configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ScheduleConfig {
    #[serde(flatten)]
    pub trigger: SchedulerConfig,
    #[serde(flatten)]
    pub limits: ResourceLimits,
    /// How often the loop looks at its task.
    #[serde(rename = "tick_ms", with = "crate::config::units::millis")]
    pub tick: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig { trigger: SchedulerConfig::default(), limits: ResourceLimits::default(), tick: Duration::from_secs(1) }
    }
}

/// One task's loop: the configuration file's sections, as they are, and the task's share of
/// the sample store.
#[derive(Debug, Clone)]
pub struct AdaptConfig {
    pub task: String,
    pub training: TrainingConfig,
    pub schedule: ScheduleConfig,
    pub gate: GateConfig,
    pub labels: crate::labels::LabelsConfig,
    /// Holdout samples evaluated per decision (the newest).
    pub max_eval_samples: usize,
    /// Disk budget of the task's samples in bytes (0: none), and the samples per class that
    /// eviction never goes below.
    pub store_budget_bytes: u64,
    pub reservoir_per_class: u64,
}

impl AdaptConfig {
    /// The built-in defaults.
    pub fn new(task: &str) -> AdaptConfig {
        AdaptConfig {
            task: task.to_string(),
            training: TrainingConfig::default(),
            schedule: ScheduleConfig::default(),
            gate: GateConfig::default(),
            labels: crate::labels::LabelsConfig::default(),
            max_eval_samples: 2000,
            store_budget_bytes: 0,
            reservoir_per_class: 50,
        }
    }
}

/// The steps of more capacity after the configured adapter: LoRA on the bundle's slots (when
/// the adapter is a head or LoReFT), then LoRA at twice the rank. Steps the bundle cannot take
/// (no slots, a rank over its `rank_max`) are skipped when the job runs.
pub fn escalation_after(before_lora: bool, rank: usize, alpha: f32) -> Vec<JobKind> {
    let mut steps = Vec::new();
    if before_lora {
        steps.push(JobKind::Lora { rank, alpha });
    }
    steps.push(JobKind::Lora { rank: rank * 2, alpha: alpha * 2.0 });
    steps
}

/// LoReFT positions as the paper writes them: `f<n>+l<m>` (each sequence's first n and last m
/// tokens), or `f<n>` or `l<m>` alone.
pub fn parse_positions(text: &str) -> Result<ReftPositions, String> {
    let (mut first, mut last) = (None, None);
    for part in text.split('+') {
        let (slot, digits) = match part.split_at_checked(1) {
            Some(("f", d)) => (&mut first, d),
            Some(("l", d)) => (&mut last, d),
            _ => return Err(format!("{text:?}: expected f<n>+l<m>, e.g. \"f1+l1\" (part {part:?} is neither f<n> nor l<m>)")),
        };
        let n: usize = digits.parse().map_err(|_| format!("{text:?}: {part:?} needs a count after its letter, e.g. f1"))?;
        if slot.replace(n).is_some() {
            return Err(format!("{text:?}: names {} twice", &part[..1]));
        }
    }
    let positions = ReftPositions { first: first.unwrap_or(0), last: last.unwrap_or(0) };
    if positions.first + positions.last == 0 {
        return Err(format!("{text:?} edits no position"));
    }
    Ok(positions)
}

fn positions_from_str<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ReftPositions, D::Error> {
    let text = <String as Deserialize>::deserialize(deserializer)?;
    parse_positions(&text).map_err(serde::de::Error::custom)
}

/// Everything the loop works with; shared with the rest of the daemon.
#[derive(Clone)]
pub struct Context {
    pub registry: Arc<Registry>,
    pub engine: EngineHandle,
    pub trainer: Arc<Trainer>,
    pub store_path: PathBuf,
    pub split: SplitPolicy,
    pub text: Option<Arc<TextEncoder>>,
    pub events: Events,
    pub journal: Journal,
    /// The latest request inputs per task, for the share of base-domain traffic.
    pub traffic: Arc<crate::traffic::TrafficLog>,
}

/// What an operator asks of a task's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    /// Keep the exported adapter in this directory as the task's next version (not serving).
    Import(PathBuf),
    TrainNow,
    Rollback,
    /// Serve this version (0: the base model).
    Pin(u64),
}

/// An operator's request, answered with a line saying what happened. `by` says who asked (how
/// they proved it: the HTTP control token, or the signer of an MQTT command); events record it.
pub struct Command {
    pub kind: CommandKind,
    pub by: String,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// A fleet release for the task's loop to judge and, as the policy says, promote (between jobs).
pub struct Install {
    /// The release's adapter files, verified against the signed repository.
    pub dir: PathBuf,
    pub release: u64,
    pub policy: adaptd_protocol::fleet::Policy,
    /// Under the `train` policy: where the round's adapter is offered (none: nowhere).
    pub offer_to: Option<OfferTo>,
    pub reply: oneshot::Sender<Result<Installed, String>>,
}

/// Where a fleet-learning round's adapter is offered, and as which device.
#[derive(Debug, Clone)]
pub struct OfferTo {
    pub base: url::Url,
    pub device: String,
}

/// The gate's figures for a release, and the version serving it if it was promoted.
#[derive(Debug, Clone)]
pub struct Installed {
    pub scores: adaptd_protocol::fleet::Scores,
    pub promoted: Option<u64>,
}

/// A task's status, as HTTP, the CLI and tests read it.
pub use adaptd_protocol::TaskStatus as Status;

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error(transparent)]
    Store(#[from] crate::samples::StoreError),
    #[error(transparent)]
    Bundle(#[from] adaptd_adapters::bundle::BundleError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The trainer could not run the candidate's forward pass (parity).
    #[error("trainer: {0}")]
    Trainer(#[from] crate::trainer::TrainerError),
    /// The samples cannot make a job (too few, one label, inputs that do not stack).
    #[error("{0}")]
    Data(String),
}

impl AdaptError {
    pub fn error_type(&self) -> &'static str {
        match self {
            AdaptError::Store(e) => e.error_type(),
            AdaptError::Bundle(e) => e.error_type(),
            AdaptError::Registry(e) => e.error_type(),
            AdaptError::Engine(e) => e.error_type(),
            AdaptError::Trainer(e) => e.error_type(),
            AdaptError::Data(_) => "data",
        }
    }
}

fn lock(store: &Mutex<SampleStore>) -> std::sync::MutexGuard<'_, SampleStore> {
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The name a task's loop goes by under supervision (`/readyz`, metrics, `part_down` events).
pub fn part_name(task: &str) -> String {
    format!("loop:{task}")
}

/// How the rest of the daemon reaches a task's loop: kept across its restarts, so the API, the
/// fleet agent and a reload reach whichever run of the loop is current.
pub struct Channels {
    /// Its settings; a new value (a configuration reload) applies from the next tick.
    pub configs: channel::Receiver<AdaptConfig>,
    pub commands: mpsc::Receiver<Command>,
    pub installs: mpsc::Receiver<Install>,
    pub status: channel::Sender<Status>,
}

/// The loop for one task, until `shutdown`, under supervision: a run that stops on an error (the
/// sample store on a full disk, say) or a panic is shown down (its status, `parts`, a
/// `part_down` event) and restarted with backoff, and serving goes on meanwhile. The restart
/// reads the task's state again from the store, the registry and the journal.
pub async fn run(ctx: Context, channels: Channels, parts: Arc<crate::app::Parts>, shutdown: impl Future<Output = ()>) {
    let Channels { configs, commands, installs, status } = channels;
    let status = Arc::new(status);
    let task = configs.borrow().task.clone();
    let receivers = Arc::new(tokio::sync::Mutex::new((configs, commands, installs)));
    let restarts = crate::app::Restarts { part: part_name(&task), task, parts, events: ctx.events.clone() };
    let start = |stop: tokio_util::sync::CancellationToken| {
        let (ctx, status, receivers) = (ctx.clone(), status.clone(), receivers.clone());
        async move {
            let mut receivers = receivers.lock_owned().await;
            let (configs, commands, installs) = &mut *receivers;
            let config = configs.borrow_and_update().clone();
            task_loop::TaskLoop::open(ctx, config, status)?.run(configs, commands, installs, stop.cancelled_owned()).await
        }
    };
    let shown = status.clone();
    crate::app::restarting(restarts, shutdown, start, |change| match change {
        // What the stopped run last published no longer holds (a job it was running is gone).
        crate::app::PartChange::Down(reason) => shown.send_modify(|s| {
            s.down = Some(reason.to_string());
            s.scheduler = crate::scheduler::SchedulerState::Idle;
            s.progress = None;
        }),
        crate::app::PartChange::Restarting => shown.send_modify(|s| s.down = None),
    })
    .await;
}
