//! The adaptation loop of one task: store → scheduler → trainer → gate → registry, and the
//! watch that rolls a promoted adapter back when fresh labels say it got worse.
//!
//! A thin async loop around the pure parts ([`Scheduler`], [`gate::decide`]). Each tick it
//! caches backbone embeddings of new samples (computed by the serving engine, so head training
//! never runs the backbone), scores the live adapter on freshly labelled samples (drift, and the
//! rollback watch after a promotion), reads the device's resources, and asks the scheduler.
//! A job's candidate is evaluated through the engine on holdout samples the trainer never saw,
//! on the bundle's retention set, against the base model and against the trainer's own outputs;
//! every decision is an event, a log line, a journal record, and part of the adapter's manifest.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptd_adapters::bundle::{Bundle, RetentionSet};
use adaptd_adapters::files::{ADAPTER_FORMAT, Adapter, AdapterKind, AdapterManifest, BaseRef, LoraInfo, SampleCounts};
use adaptd_adapters::head::{Head, grow_linear};
use adaptd_adapters::tensor::HostTensor;
use adaptd_adapters::train::{Examples, FitReport, Recipe};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{EngineHandle, Prediction, concat_inputs};
use crate::events::{Events, Journal, now_ms};
use adaptd_protocol::Event;
use adaptd_protocol::event::{JobRecord, TrainingSummary};
use crate::gate::{self, Evidence, GateConfig};
use crate::preprocess::TextEncoder;
use crate::registry::{Registry, Serving};
use crate::resources::{Monitor, ResourceLimits};
use crate::samples::{SampleInput, SampleStore, Split, SplitPolicy, StoredSample};
use crate::traffic::{BaseDomainDetector, Observed};
use crate::scheduler::{Action, Observation, Outcome, Scheduler, SchedulerConfig, SchedulerState, Trigger};
use crate::trainer::{JobKind, TrainJob, Trainer};

#[derive(Debug, Clone)]
pub struct AdaptConfig {
    pub task: String,
    pub kind: JobKind,
    pub recipe: Recipe,
    pub scheduler: SchedulerConfig,
    pub gate: GateConfig,
    pub limits: ResourceLimits,
    pub tick: Duration,
    /// Fewer training samples than this (over the classes that qualify): the job is deferred.
    pub min_train_samples: usize,
    /// A label with fewer training samples than this waits for more before it joins the head.
    pub min_samples_per_class: usize,
    /// Retained base-domain samples mixed into training, as a share of the task's samples.
    pub replay_fraction: f64,
    /// After a promotion: compare old and new on this many fresh samples before judging...
    pub watch_min_samples: u64,
    /// ... roll back if the new one is worse by more than this ...
    pub rollback_drop: f64,
    /// ... and stop watching after this many.
    pub watch_max_samples: u64,
    /// Holdout samples evaluated per decision (the newest).
    pub max_eval_samples: usize,
    /// More capacity to try after `kind` within a job, in order (empty: no escalation)...
    pub escalation: Vec<JobKind>,
    /// ... while the best validation accuracy so far is below this.
    pub escalate_until: f64,
    /// Disk budget of the task's samples in bytes (0: none), and the samples per class that
    /// eviction never goes below.
    pub store_budget_bytes: u64,
    pub reservoir_per_class: u64,
}

impl AdaptConfig {
    pub fn new(task: &str) -> AdaptConfig {
        AdaptConfig {
            task: task.to_string(),
            kind: JobKind::Head,
            recipe: Recipe::default(),
            scheduler: SchedulerConfig::default(),
            gate: GateConfig::default(),
            limits: ResourceLimits::default(),
            tick: Duration::from_secs(1),
            min_train_samples: 20,
            min_samples_per_class: 2,
            replay_fraction: 0.2,
            watch_min_samples: 30,
            rollback_drop: 0.05,
            watch_max_samples: 500,
            max_eval_samples: 2000,
            escalation: escalation_after(true, 8, 8.0),
            escalate_until: 0.98,
            store_budget_bytes: 0,
            reservoir_per_class: 50,
        }
    }
}

/// The steps of more capacity after the configured adapter: LoRA on the bundle's slots (when
/// the adapter is a head), then LoRA at twice the rank. Steps the bundle cannot take (no slots,
/// a rank over its `rank_max`) are skipped when the job runs.
pub fn escalation_after(from_head: bool, rank: usize, alpha: f32) -> Vec<JobKind> {
    let mut steps = Vec::new();
    if from_head {
        steps.push(JobKind::Lora { rank, alpha });
    }
    steps.push(JobKind::Lora { rank: rank * 2, alpha: alpha * 2.0 });
    steps
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
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

/// A task's status, as HTTP, the CLI and tests read it.
pub use adaptd_protocol::TaskStatus as Status;

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error(transparent)]
    Store(#[from] crate::samples::StoreError),
    #[error(transparent)]
    Bundle(#[from] adaptd_adapters::bundle::BundleError),
}

/// What a running job listens to besides the trainer: the operator's commands, which act at
/// once, and the fresh-sample tracker they reset.
struct Operator<'a> {
    commands: &'a mut mpsc::Receiver<Command>,
    fresh: &'a mut Fresh,
}

/// What the fresh-sample tracker knows about the live adapter (and, after a promotion, the one before it).
struct Fresh {
    after_id: i64,
    live_version: u64,
    live: (u64, u64),
    previous: Option<(Arc<Serving>, (u64, u64))>,
}

fn lock(store: &Mutex<SampleStore>) -> std::sync::MutexGuard<'_, SampleStore> {
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn accuracy((correct, total): (u64, u64)) -> f64 {
    if total == 0 { 0.0 } else { correct as f64 / total as f64 }
}

/// The loop for one task. `configs` carries its settings; a new value (a configuration reload)
/// applies from the next tick: thresholds, device limits, the gate and the recipe of later jobs.
pub async fn run(ctx: Context, mut configs: watch::Receiver<AdaptConfig>, mut commands: mpsc::Receiver<Command>, status: watch::Sender<Status>, shutdown: impl Future<Output = ()>) -> Result<(), AdaptError> {
    let mut config = configs.borrow_and_update().clone();
    let task = config.task.clone();
    // A Mutex only so the loop's futures are Send; the loop alone uses this connection.
    let store = Mutex::new(SampleStore::open(&ctx.store_path, ctx.split)?);
    let bundle = ctx.registry.bundle().clone();
    let retention = bundle.retention()?;
    let (replay, check) = split_retention(retention.as_ref());
    let mut base_domain = BaseDomain { replay, check, replay_embeddings: None, detector: None, traffic_share: None };
    let mut scheduler = Scheduler::new(config.scheduler.clone());
    let mut monitor = Monitor::new(&config.limits.sysfs_root);
    let serving = ctx.registry.ensure_task(&task).map_err(|e| crate::samples::StoreError::Corrupt { path: ctx.store_path.clone(), id: 0, reason: e.to_string() })?;
    announce_interrupted_promotion(&ctx, &task, &serving);
    let mut fresh = Fresh { after_id: lock(&store).last_id(&task)?, live_version: serving.version, live: (0, 0), previous: None };
    let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_decision = None;
    let mut ticker = tokio::time::interval(config.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut operator_request = None;
    let mut over_budget_reported = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
            cmd = commands.recv() => if let Some(cmd) = cmd {
                operator_request = act_on(&ctx, &store, &task, &mut fresh, cmd).or(operator_request);
            },
        }
        if configs.has_changed().unwrap_or(false) {
            config = configs.borrow_and_update().clone();
            scheduler.reconfigure(config.scheduler.clone());
            monitor = Monitor::new(&config.limits.sysfs_root);
            ticker = tokio::time::interval(config.tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tracing::info!(task, "configuration reloaded");
        }
        let now = now_ms();
        // 0. The disk budget: class-balanced eviction, oldest first, rare classes kept.
        if config.store_budget_bytes > 0 {
            let e = lock(&store).evict_to_budget(&task, config.store_budget_bytes, config.reservoir_per_class)?;
            if e.evicted > 0 || (e.at_reservoir && !over_budget_reported) {
                ctx.events.emit(&task, Event::SamplesEvicted { evicted: e.evicted as u64, bytes: e.bytes as u64, budget_bytes: config.store_budget_bytes as u64, at_reservoir: e.at_reservoir });
            }
            over_budget_reported = e.at_reservoir;
        }
        // 1. Embeddings for new samples, from the engine (base model, no adapter).
        if let Err(e) = fill_embeddings(&ctx, &store, &task).await {
            tracing::warn!(task, error = %e, "could not cache embeddings; retrying next tick");
        }
        // 2. The live adapter on fresh labels: drift, and the watch after a promotion.
        if let Err(e) = track_fresh(&ctx, &store, &task, &mut fresh, &config).await {
            tracing::warn!(task, error = %e, "could not score fresh samples");
        }
        // 3. Ask the scheduler.
        let since = lock(&store).mark(&task, "job_start")?.unwrap_or(0);
        let reading = monitor.read();
        let observation = Observation {
            now_ms: now,
            new_samples: lock(&store).count_after(&task, since)?,
            live_accuracy: (fresh.live.1 > 0).then(|| (accuracy(fresh.live), fresh.live.1)),
            device_busy: reading.busy_reason(&config.limits),
            serving_p99_ms: None,
            operator_request: operator_request.is_some(),
        };
        let action = scheduler.observe(&observation);
        let stored = lock(&store).count_after(&task, 0)?;
        status.send_modify(|s| (s.samples, s.new_samples) = (stored, observation.new_samples));
        publish_status(&status, &task, &scheduler, &ctx, &jobs, &last_decision, None);
        let Some(Action::Start(trigger)) = action else {
            if let Some(reply) = operator_request.take()
                && let SchedulerState::Collecting { waiting_for } | SchedulerState::Backoff { reason: waiting_for, .. } = scheduler.state()
            {
                let _ = reply.send(Err(format!("not training now: {waiting_for}")));
            }
            continue;
        };
        if let Some(reply) = operator_request.take() {
            let _ = reply.send(Ok(format!("training {task} now")));
        }
        *jobs.entry("started".into()).or_default() += 1;
        {
            // New samples from here on trigger the next job: those this one trains on are the
            // ones with an embedding so far (see `prepare`), and the rest still count as new.
            let mut store = lock(&store);
            let trained_up_to = match store.first_missing_embedding(&task)? {
                Some(id) => id - 1,
                None => store.last_id(&task)?,
            };
            store.set_mark(&task, "job_start", trained_up_to)?;
        }
        if base_domain.replay_embeddings.is_none()
            && let Some(retention) = retention.as_ref().filter(|r| !r.is_empty())
        {
            // One pass of the base model over the retention set serves both: the replay rows'
            // embeddings (the even rows, as `split_retention` takes them) and the detector.
            if let Ok(embeddings) = embed_retention(&ctx, &task, retention).await {
                base_domain.detector = base_domain_detector(retention, &embeddings);
                base_domain.replay_embeddings = Some(embeddings.into_iter().step_by(2).collect());
            }
        }
        // Measured as the job starts: it sets how much of the base domain to replay, and the
        // gate's retention bound.
        base_domain.traffic_share = match &base_domain.detector {
            Some(detector) => base_traffic_share(&ctx, &store, &task, detector).await.unwrap_or_else(|e| {
                tracing::warn!(task, error = %e, "could not measure the traffic's base-domain share");
                None
            }),
            None => None,
        };
        let mut operator = Operator { commands: &mut commands, fresh: &mut fresh };
        let outcome = run_job(&ctx, &config, &store, trigger, &base_domain, &mut shutdown, &mut scheduler, &status, &jobs, &last_decision, &mut operator).await;
        let (outcome, summary, key) = match outcome {
            JobResult::Promoted(summary, incumbent) => {
                fresh = Fresh { after_id: lock(&store).last_id(&task)?, live_version: ctx.registry.current(&task).map_or(0, |s| s.version), live: (0, 0), previous: Some((incumbent, (0, 0))) };
                (Outcome::Promoted, summary, "promoted")
            }
            JobResult::Rejected(summary) => (Outcome::Rejected, summary, "rejected"),
            JobResult::Deferred(reason) => {
                ctx.events.emit(&task, Event::TrainingDeferred { reason: reason.clone() });
                (Outcome::Deferred(reason.clone()), reason, "deferred")
            }
            JobResult::Failed(reason) => (Outcome::Failed(reason.clone()), reason, "failed"),
            // The operator's decision stands; the scheduler waits its cooldown, as after a deferral.
            JobResult::Cancelled(reason) => (Outcome::Deferred(reason.clone()), reason, "cancelled"),
            JobResult::ShutDown => return Ok(()),
        };
        *jobs.entry(key.into()).or_default() += 1;
        last_decision = Some(summary);
        scheduler.finished(now_ms(), &outcome);
        publish_status(&status, &task, &scheduler, &ctx, &jobs, &last_decision, None);
    }
}

/// A promotion that a crash interrupted after its pointer moved serves, but its `promoted`
/// event and journal record were never written: write them now, marked as recovered.
fn announce_interrupted_promotion(ctx: &Context, task: &str, serving: &Serving) {
    let Some(manifest) = serving.manifest.as_ref().filter(|m| m.promoted_unix_ms.is_some()) else { return };
    let recorded = match ctx.journal.read(task) {
        Ok((records, _)) => records.iter().any(|r| matches!(r.event, Event::Job(_) | Event::Promoted { .. }) && r.event.version() == Some(serving.version)),
        Err(_) => true, // unreadable: say nothing rather than something wrong
    };
    if !recorded {
        let event = ctx.events.emit(
            task,
            Event::Promoted {
                version: serving.version,
                from_version: manifest.parent_version.unwrap_or(0),
                holdout_accuracy: manifest.metrics.get("holdout_accuracy").copied(),
                incumbent_holdout_accuracy: manifest.metrics.get("incumbent_holdout_accuracy").copied(),
                recovered: true,
                reason: Some("the promotion finished before a crash; its record is written now".into()),
            },
        );
        ctx.journal.record(&event);
    }
}

/// An operator's command, acted on at once whatever the loop is doing: rollback and pin change
/// what serves right away (a running job is then cancelled by `run_job`); a train request is
/// handed back for the scheduler to answer.
fn act_on(ctx: &Context, store: &Mutex<SampleStore>, task: &str, fresh: &mut Fresh, command: Command) -> Option<oneshot::Sender<Result<String, String>>> {
    let Command { kind, by, reply } = command;
    let result = match kind {
        CommandKind::TrainNow => return Some(reply),
        CommandKind::Rollback => rollback(ctx, task, fresh, "operator", &by),
        CommandKind::Pin(version) => ctx.registry.pin(task, version).map_err(|e| operator_error(ctx, &e)).map(|s| {
            ctx.events.emit(task, Event::Pinned { version: s.version, by: by.clone() });
            *fresh = Fresh { after_id: lock(store).last_id(task).unwrap_or(fresh.after_id), live_version: s.version, live: (0, 0), previous: None };
            if s.version == 0 { format!("{task} serves the base model (pinned)") } else { format!("{} pinned", s.adapter_id()) }
        }),
    };
    let _ = reply.send(result);
    None
}

/// An error as an operator's answer: paths relative to the state directory, never absolute
/// (answers travel to whoever asked; the log keeps the whole story).
fn operator_error(ctx: &Context, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let root = ctx.registry.store().root();
    let state = root.parent().unwrap_or(root).display().to_string();
    if state.len() > 1 { text.replace(&format!("{state}/"), "").replace(&state, ".") } else { text }
}

fn publish_status(status: &watch::Sender<Status>, task: &str, scheduler: &Scheduler, ctx: &Context, jobs: &BTreeMap<String, u64>, last_decision: &Option<String>, progress: Option<(usize, usize)>) {
    let (samples, new_samples) = { let s = status.borrow(); (s.samples, s.new_samples) };
    status.send_replace(Status {
        samples,
        new_samples,
        task: task.to_string(),
        scheduler: scheduler.state().clone(),
        serving_version: ctx.registry.current(task).map_or(0, |s| s.version),
        jobs: jobs.clone(),
        last_decision: last_decision.clone(),
        progress,
    });
}

/// The bundle's base domain as the loop uses it: retention rows replayed in training (and their
/// embeddings, for heads), rows that check forgetting, and the detector that measures how much
/// of the device's traffic still looks like it.
struct BaseDomain {
    replay: RetentionSet,
    check: RetentionSet,
    replay_embeddings: Option<Vec<Vec<f32>>>,
    detector: Option<BaseDomainDetector>,
    /// The share of the latest traffic that looks like the base domain, and over how many
    /// inputs, measured at the start of the current job.
    traffic_share: Option<(f64, usize)>,
}

impl BaseDomain {
    /// Replay protects what the device still sees: the configured share while the traffic
    /// holds the base domain (at least `min_share` of it), less as that fades, none without it.
    fn replay_fraction(&self, configured: f64, gate: &GateConfig) -> f64 {
        match (gate.retention, self.traffic_share) {
            (crate::gate::RetentionPolicy::Traffic, Some((share, _))) if gate.retention_min_share > 0.0 => configured * (share / gate.retention_min_share).min(1.0),
            _ => configured,
        }
    }
}

/// Even rows of the retention set are replayed in training, odd rows check forgetting.
fn split_retention(retention: Option<&RetentionSet>) -> (RetentionSet, RetentionSet) {
    let empty = || RetentionSet { inputs: Vec::new(), labels: Vec::new() };
    let Some(r) = retention else { return (empty(), empty()) };
    let even: Vec<usize> = (0..r.len()).step_by(2).collect();
    let odd: Vec<usize> = (1..r.len()).step_by(2).collect();
    (r.select(&even), r.select(&odd))
}

enum JobResult {
    Promoted(String, Arc<Serving>),
    /// An operator chose what serves while the job ran.
    Cancelled(String),
    Rejected(String),
    Deferred(String),
    Failed(String),
    ShutDown,
}

/// Model inputs for `samples` (one row each), in the bundle's input order.
pub fn model_inputs(text: Option<&TextEncoder>, samples: &[&StoredSample]) -> Result<Vec<HostTensor>, String> {
    if samples.is_empty() {
        return Err("no samples".into());
    }
    if let Some(encoder) = text {
        let texts: Vec<&str> = samples
            .iter()
            .map(|s| match &s.sample.input {
                SampleInput::Text(t) => Ok(t.as_str()),
                SampleInput::Tensor(_) => Err(format!("sample {:?} holds a tensor; the bundle takes text", s.sample.key)),
            })
            .collect::<Result<_, _>>()?;
        return encoder.encode(&texts).map_err(|e| e.to_string());
    }
    let tensors: Vec<&HostTensor> = samples
        .iter()
        .map(|s| match &s.sample.input {
            SampleInput::Tensor(t) => Ok(t),
            SampleInput::Text(_) => Err(format!("sample {:?} holds text; the bundle takes tensors", s.sample.key)),
        })
        .collect::<Result<_, _>>()?;
    let stacked = concat_inputs(tensors.iter().map(|t| std::slice::from_ref(*t)));
    // A bundle with a dynamic non-batch axis may hold samples that do not stack.
    if stacked.iter().any(|t| t.len() != t.shape.iter().product::<usize>()) {
        return Err("samples of different shapes".into());
    }
    Ok(stacked)
}

const EVAL_CHUNK: usize = 64;

/// Predictions of `serving` for every sample, through the engine in chunks (serving goes first
/// between chunks).
async fn predict_samples(ctx: &Context, serving: &Arc<Serving>, samples: &[&StoredSample]) -> Result<Vec<Prediction>, String> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(EVAL_CHUNK) {
        let inputs = model_inputs(ctx.text.as_deref(), chunk)?;
        out.extend(ctx.engine.evaluate(serving.clone(), inputs).await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

async fn predict_inputs(ctx: &Context, serving: &Arc<Serving>, inputs: &[HostTensor]) -> Result<Vec<Prediction>, String> {
    let rows = inputs.first().map_or(0, |t| t.shape[0]);
    let mut out = Vec::with_capacity(rows);
    for start in (0..rows).step_by(EVAL_CHUNK) {
        let end = (start + EVAL_CHUNK).min(rows);
        let chunk: Vec<HostTensor> = inputs.iter().map(|t| t.rows(start, end)).collect();
        out.extend(ctx.engine.evaluate(serving.clone(), chunk).await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

async fn fill_embeddings(ctx: &Context, store: &Mutex<SampleStore>, task: &str) -> Result<(), String> {
    let base = ctx.registry.base(task);
    // Bounded per tick, so a backlog never starves the rest of the loop.
    for _ in 0..16 {
        let missing = lock(store).missing_embeddings(task, 256).map_err(|e| e.to_string())?;
        if missing.is_empty() {
            return Ok(());
        }
        let refs: Vec<&StoredSample> = missing.iter().collect();
        let predictions = predict_samples(ctx, &base, &refs).await?;
        let rows: Vec<(i64, Vec<f32>)> = missing.iter().zip(predictions).filter_map(|(s, p)| Some((s.id, p.embedding?))).collect();
        lock(store).set_embeddings(&rows).map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn embed_retention(ctx: &Context, task: &str, replay: &RetentionSet) -> Result<Vec<Vec<f32>>, String> {
    let predictions = predict_inputs(ctx, &ctx.registry.base(task), &replay.inputs).await?;
    predictions.into_iter().map(|p| p.embedding.ok_or_else(|| "no embedding".to_string())).collect()
}

async fn track_fresh(ctx: &Context, store: &Mutex<SampleStore>, task: &str, fresh: &mut Fresh, config: &AdaptConfig) -> Result<(), String> {
    let Some(live) = ctx.registry.current(task) else { return Ok(()) };
    if live.version != fresh.live_version {
        // Promoted, rolled back or pinned elsewhere: start counting afresh.
        *fresh = Fresh { after_id: fresh.after_id, live_version: live.version, live: (0, 0), previous: None };
    }
    let samples = lock(store).load_after(task, fresh.after_id, 512).map_err(|e| e.to_string())?;
    if samples.is_empty() {
        return Ok(());
    }
    fresh.after_id = samples.last().map_or(fresh.after_id, |s| s.id);
    // Only labels the live adapter can name count for drift: a brand-new label is not drift.
    let scored: Vec<&StoredSample> = samples.iter().filter(|s| live.labels.contains(&s.sample.label)).collect();
    if scored.is_empty() || live.labels.is_empty() {
        return Ok(());
    }
    let hits = |predictions: &[Prediction]| predictions.iter().zip(&scored).filter(|(p, s)| p.label == s.sample.label).count() as u64;
    let predictions = predict_samples(ctx, &live, &scored).await?;
    fresh.live.0 += hits(&predictions);
    fresh.live.1 += scored.len() as u64;
    if let Some((previous, counts)) = &mut fresh.previous {
        let predictions = predict_samples(ctx, previous, &scored).await?;
        counts.0 += hits(&predictions);
        counts.1 += scored.len() as u64;
        let (new_acc, old_acc) = (accuracy(fresh.live), accuracy(*counts));
        if fresh.live.1 >= config.watch_min_samples && old_acc - new_acc > config.rollback_drop {
            let reason = format!("on {} fresh samples v{} scores {new_acc:.4}, v{} scored {old_acc:.4}", fresh.live.1, live.version, previous.version);
            match rollback(ctx, task, fresh, &reason, "watch") {
                Ok(line) => tracing::warn!(task, "{line}"),
                Err(e) => tracing::error!(task, error = %e, "automatic rollback failed"),
            }
        } else if fresh.live.1 >= config.watch_max_samples {
            ctx.events.emit(task, Event::WatchPassed { version: live.version, fresh_samples: fresh.live.1, accuracy: new_acc, previous_accuracy: old_acc });
            fresh.previous = None;
        }
    }
    Ok(())
}

fn rollback(ctx: &Context, task: &str, fresh: &mut Fresh, reason: &str, by: &str) -> Result<String, String> {
    let from = ctx.registry.current(task).map_or(0, |s| s.version);
    let (serving, _) = ctx.registry.rollback(task).map_err(|e| operator_error(ctx, &e))?;
    let event = ctx.events.emit(task, Event::RolledBack { from_version: from, to_version: serving.version, reason: reason.to_string(), by: by.to_string() });
    ctx.journal.record(&event);
    *fresh = Fresh { after_id: fresh.after_id, live_version: serving.version, live: (0, 0), previous: None };
    Ok(format!("rolled {task} back from v{from} to v{}: {reason}", serving.version))
}

/// The job as the trainer takes it, and what the gate needs to know about it.
struct Prepared {
    job: TrainJob,
    labels: Vec<String>,
    counts: SampleCounts,
    notes: Vec<String>,
}

fn prepare(ctx: &Context, config: &AdaptConfig, store: &SampleStore, incumbent: &Serving, base_domain: &BaseDomain) -> Result<Prepared, String> {
    let (replay, replay_embeddings) = (&base_domain.replay, base_domain.replay_embeddings.as_deref());
    let replay_fraction = base_domain.replay_fraction(config.replay_fraction, &config.gate);
    let task = &config.task;
    let bundle: &Bundle = ctx.registry.bundle();
    let store_err = |e: crate::samples::StoreError| e.to_string();
    let mut train_all = store.load(task, Split::Train).map_err(store_err)?;
    let mut validation_all = store.load(task, Split::Validation).map_err(store_err)?;
    let dim = bundle.manifest.embedding_dim;
    // Under a steady stream some samples always arrived after this tick's embeddings were
    // computed: the job trains on those that have one, and the rest join the next job (waiting
    // for all of them would defer the job for as long as the stream lasts).
    let embedded = |s: &StoredSample| s.embedding.as_ref().is_some_and(|e| e.len() == dim);
    let arriving = train_all.iter().chain(&validation_all).filter(|s| !embedded(s)).count();
    train_all.retain(embedded);
    validation_all.retain(embedded);
    let mut notes = Vec::new();
    if arriving > 0 {
        notes.push(format!("{arriving} sample(s) still arriving join the next job"));
    }
    let mut per_label: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &train_all {
        *per_label.entry(s.sample.label.as_str()).or_default() += 1;
    }
    // Labels: the incumbent's first (their rows are kept), then new ones with enough samples.
    let mut labels: Vec<String> = incumbent.labels.to_vec();
    for label in store.labels(task).map_err(store_err)? {
        let n = per_label.get(label.as_str()).copied().unwrap_or(0);
        if labels.contains(&label) {
            continue;
        }
        if n < config.min_samples_per_class {
            notes.push(format!("label {label:?} waits: {n} training sample(s), {} needed", config.min_samples_per_class));
            continue;
        }
        labels.push(label);
    }
    let index: BTreeMap<&str, i64> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as i64)).collect();
    let train: Vec<&StoredSample> = train_all.iter().filter(|s| index.contains_key(s.sample.label.as_str())).collect();
    let validation: Vec<&StoredSample> = validation_all.iter().filter(|s| index.contains_key(s.sample.label.as_str())).collect();
    if train.len() < config.min_train_samples {
        return Err(format!("{} training samples over labels that qualify; {} needed", train.len(), config.min_train_samples));
    }
    let trained_labels: std::collections::BTreeSet<&str> = train.iter().map(|s| s.sample.label.as_str()).collect();
    if trained_labels.len() < 2 && labels.len() < 2 {
        return Err(format!("only one label ({:?}) has samples; a classifier needs two", trained_labels.iter().next()));
    }
    for label in &labels {
        if per_label.get(label.as_str()).copied().unwrap_or(0) > 0 && !validation.iter().any(|s| &s.sample.label == label) {
            notes.push(format!("label {label:?} has no validation samples: early stopping cannot see it"));
        }
    }
    let embeddings_of = |rows: &[&StoredSample]| -> Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(rows.len() * dim);
        for s in rows {
            match &s.embedding {
                Some(e) if e.len() == dim => out.extend_from_slice(e),
                _ => return Err("embeddings of new samples are still being computed".into()),
            }
        }
        Ok(out)
    };
    let train_emb = embeddings_of(&train)?;
    let class_means: Vec<Option<Vec<f32>>> = (0..labels.len())
        .map(|c| {
            let rows: Vec<usize> = train.iter().enumerate().filter(|(_, s)| index[s.sample.label.as_str()] == c as i64).map(|(i, _)| i).collect();
            (!rows.is_empty()).then(|| (0..dim).map(|d| rows.iter().map(|&r| train_emb[r * dim + d]).sum::<f32>() / rows.len() as f32).collect())
        })
        .collect();
    // Start from the incumbent's head, or the bundle's pre-trained classifier, or prototypes.
    let base_head = bundle.base_head().map_err(|e| e.to_string())?;
    let base_labels = bundle.manifest.labels.clone().unwrap_or_default();
    let previous: Option<(&Head, &[String])> = match (&incumbent.head, &base_head) {
        (Some(h), _) => Some((h, &incumbent.labels[..])),
        (None, Some(h)) => Some((h, &base_labels[..])),
        (None, None) => None,
    };
    let init_head = grow_linear(previous, &labels, &class_means, dim);

    let weights = |rows: &[&StoredSample]| rows.iter().map(|s| s.sample.weight).collect::<Vec<f32>>();
    let mut train_ex = Examples { labels: train.iter().map(|s| index[s.sample.label.as_str()]).collect(), weights: weights(&train), inputs: Vec::new() };
    let mut val_ex = Examples { labels: validation.iter().map(|s| index[s.sample.label.as_str()]).collect(), weights: weights(&validation), inputs: Vec::new() };
    // Replay: retained base-domain rows whose labels the task uses, as a share of the task's samples.
    let replay_rows: Vec<(usize, i64)> = replay
        .labels
        .iter()
        .enumerate()
        .filter_map(|(i, &l)| base_labels.get(l as usize).and_then(|name| index.get(name.as_str())).map(|&c| (i, c)))
        .take((replay_fraction * train.len() as f64).round() as usize)
        .collect();
    match config.kind {
        JobKind::Head => {
            let mut emb = train_emb;
            if let Some(replay_emb) = replay_embeddings {
                for &(i, c) in &replay_rows {
                    emb.extend_from_slice(&replay_emb[i]);
                    train_ex.labels.push(c);
                    train_ex.weights.push(1.0);
                }
            }
            let n = train_ex.labels.len();
            train_ex.inputs = vec![HostTensor::f32(vec![n, dim], emb).map_err(|e| e.to_string())?];
            let val_emb = if validation.is_empty() { Vec::new() } else { embeddings_of(&validation)? };
            val_ex.inputs = vec![HostTensor::f32(vec![validation.len(), dim], val_emb).map_err(|e| e.to_string())?];
        }
        JobKind::Lora { .. } => {
            let mut inputs = model_inputs(ctx.text.as_deref(), &train)?;
            if !replay_rows.is_empty() && ctx.text.is_none() {
                let rows: Vec<usize> = replay_rows.iter().map(|&(i, _)| i).collect();
                let extra = replay.select(&rows).inputs;
                inputs = concat_inputs([inputs.as_slice(), extra.as_slice()].into_iter());
                for &(_, c) in &replay_rows {
                    train_ex.labels.push(c);
                    train_ex.weights.push(1.0);
                }
            }
            train_ex.inputs = inputs;
            if !validation.is_empty() {
                val_ex.inputs = model_inputs(ctx.text.as_deref(), &validation)?;
            }
        }
    }
    let holdout = store.counts(task).map_err(store_err)?.iter().filter(|((split, _), _)| *split == Split::Holdout).map(|(_, n)| n).sum();
    let counts = SampleCounts { train: train.len() as u64, validation: validation.len() as u64, holdout };
    if !replay_rows.is_empty() {
        notes.push(format!("{} retained base-domain samples replayed", replay_rows.len()));
    }
    if let Some((share, n)) = base_domain.traffic_share.filter(|_| replay_fraction < config.replay_fraction) {
        notes.push(format!("replay follows the traffic: {:.0} % of the last {n} inputs look like the base domain, so {:.2} of the samples instead of {:.2}", share * 100.0, replay_fraction, config.replay_fraction));
    }
    Ok(Prepared { job: TrainJob { kind: config.kind, train: train_ex, validation: val_ex, init_head, recipe: config.recipe.clone() }, labels, counts, notes })
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    ctx: &Context,
    config: &AdaptConfig,
    store: &Mutex<SampleStore>,
    trigger: Trigger,
    base_domain: &BaseDomain,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    scheduler: &mut Scheduler,
    status: &watch::Sender<Status>,
    jobs: &BTreeMap<String, u64>,
    last_decision: &Option<String>,
    operator: &mut Operator<'_>,
) -> JobResult {
    let task = &config.task;
    let incumbent = ctx.registry.current(task).unwrap_or_else(|| ctx.registry.base(task));
    let version = match ctx.registry.next_version(task) {
        Ok(v) => v,
        Err(e) => return JobResult::Failed(e.to_string()),
    };
    let lora = &ctx.registry.bundle().manifest.lora;
    let ladder: Vec<JobKind> = std::iter::once(config.kind)
        .chain(config.escalation.iter().copied().filter(|k| match k {
            JobKind::Head => false,
            JobKind::Lora { rank, .. } => !lora.slots.is_empty() && *rank <= lora.rank_max,
        }))
        .collect();
    let started = std::time::Instant::now();
    let mut best: Option<Attempt> = None;
    for (step, kind) in ladder.iter().enumerate() {
        let attempt_config = AdaptConfig { kind: *kind, ..config.clone() };
        let prepared = match prepare(ctx, &attempt_config, &lock(store), &incumbent, base_domain) {
            Ok(p) => p,
            Err(reason) if best.is_none() => return JobResult::Deferred(reason),
            Err(reason) => {
                tracing::warn!(task, reason, "could not prepare the next step of escalation; keeping the best so far");
                break;
            }
        };
        if step == 0 {
            let escalation: Vec<String> = ladder.iter().map(JobKind::label).collect();
            ctx.events.emit(
                task,
                Event::TrainingStarted {
                    version,
                    kind: kind.name().into(),
                    trigger,
                    device: ctx.trainer.device().into(),
                    samples: prepared.counts.clone(),
                    labels: prepared.labels.clone(),
                    notes: prepared.notes.clone(),
                    escalation,
                },
            );
        }
        let attempt_started = std::time::Instant::now();
        let Prepared { job, labels, counts, notes } = prepared;
        let report = match train_attempt(ctx, &attempt_config, store, job, version, &incumbent, shutdown, scheduler, status, jobs, last_decision, operator).await {
            Ok(report) => report,
            // A later, larger step that fails (out of memory, say) leaves the best so far.
            Err(JobResult::Failed(reason)) if best.is_some() => {
                tracing::warn!(task, reason, "an escalation step failed; keeping the best so far");
                break;
            }
            Err(result) => return result,
        };
        let attempt = Attempt::new(*kind, report, labels, counts, notes, attempt_started.elapsed().as_secs_f64());
        let improved = best.as_ref().is_none_or(|b| attempt.beats(b));
        let reason = format!(
            "step {} of {}: {} reached validation accuracy {:.4} (loss {:.4}){}",
            step + 1,
            ladder.len(),
            kind.label(),
            attempt.val_accuracy,
            attempt.val_loss,
            if improved { ", the best so far" } else { ", no better than the best so far" }
        );
        let event = ctx.events.emit(
            task,
            Event::TrainingAttempt {
                version,
                step: step + 1,
                steps: ladder.len(),
                kind: kind.label(),
                val_accuracy: attempt.val_accuracy as f32,
                val_loss: attempt.val_loss as f32,
                seconds: attempt.seconds,
                best_so_far: improved,
                reason,
            },
        );
        ctx.journal.record(&event);
        if improved {
            best = Some(attempt);
        }
        let best_accuracy = best.as_ref().map_or(0.0, |b| b.val_accuracy);
        let Some(next) = ladder.get(step + 1) else { break };
        let reason = if !improved {
            Some(format!("{} did not improve on validation; more capacity does not help", kind.label()))
        } else if best_accuracy >= config.escalate_until {
            Some(format!("validation accuracy {best_accuracy:.4} reached {:.4}", config.escalate_until))
        } else if best_accuracy.is_nan() {
            Some("no validation samples to choose by".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => {
                tracing::info!(task, version, reason, "escalation stops");
                break;
            }
            None => {
                ctx.events.emit(task, Event::TrainingEscalated { version, from: kind.label(), to: next.label(), val_accuracy: best_accuracy as f32, until: config.escalate_until });
            }
        }
    }
    let Some(Attempt { report, labels, counts, notes, .. }) = best else { return JobResult::Failed("no attempt finished".into()) };
    scheduler.training_done();
    let seconds = started.elapsed().as_secs_f64();
    ctx.events.emit(
        task,
        Event::TrainingFinished {
            version,
            seconds,
            epochs: report.epochs.len(),
            best_epoch: report.best_epoch + 1,
            stopped_early: report.stopped_early,
            samples_per_second: report.samples_per_second,
            batch_size: report.batch_size,
        },
    );
    match gate_and_promote(ctx, config, store, &incumbent, version, labels, counts, notes, trigger, report, base_domain, seconds).await {
        Ok((true, summary)) => JobResult::Promoted(summary, incumbent),
        Ok((false, summary)) => JobResult::Rejected(summary),
        Err(GateError { error_type: "superseded", reason }) => cancelled(ctx, task, version, reason),
        Err(GateError { error_type, reason }) => {
            let event = ctx.events.emit(task, Event::TrainingFailed { version, kind: None, error_type: error_type.to_string(), reason: reason.clone() });
            ctx.journal.record(&event);
            JobResult::Failed(reason)
        }
    }
}

/// One fit of a job, followed to its end: progress, pause and resume under the device's
/// budget, operator commands acted on at once, shutdown. Err carries how the job ends instead.
#[allow(clippy::too_many_arguments)]
async fn train_attempt(
    ctx: &Context,
    config: &AdaptConfig,
    store: &Mutex<SampleStore>,
    job: TrainJob,
    version: u64,
    incumbent: &Serving,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    scheduler: &mut Scheduler,
    status: &watch::Sender<Status>,
    jobs: &BTreeMap<String, u64>,
    last_decision: &Option<String>,
    operator: &mut Operator<'_>,
) -> Result<FitReport, JobResult> {
    let task = &config.task;
    let started = std::time::Instant::now();
    let mut handle = ctx.trainer.submit(job).map_err(|e| JobResult::Failed(e.to_string()))?;
    let mut last_progress = std::time::Instant::now();
    let mut ticker = tokio::time::interval(config.tick);
    loop {
        tokio::select! {
            _ = &mut *shutdown => {
                handle.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = (&mut handle.done).await;
                ctx.events.emit(task, Event::TrainingCancelled { version, reason: "shutting down; the candidate is discarded".into() });
                return Err(JobResult::ShutDown);
            }
            p = handle.progress.recv() => if let Some(p) = p
                && (last_progress.elapsed() >= Duration::from_millis(500) || p.step == p.total_steps)
            {
                last_progress = std::time::Instant::now();
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / p.step.max(1) as f64 * (p.total_steps - p.step) as f64;
                ctx.events.emit(task, Event::TrainingProgress { version, kind: config.kind.label(), epoch: p.epoch + 1, epochs: p.max_epochs, step: p.step, steps: p.total_steps, loss: p.loss, eta_s: eta });
                publish_status(status, task, scheduler, ctx, jobs, last_decision, Some((p.step, p.total_steps)));
            },
            _ = ticker.tick() => {
                match scheduler.observe(&Observation { now_ms: now_ms(), serving_p99_ms: ctx.engine.stats().recent_p99_ms(), ..Observation::default() }) {
                    Some(Action::Pause { reason }) => {
                        handle.pause.store(true, std::sync::atomic::Ordering::Relaxed);
                        ctx.events.emit(task, Event::TrainingPaused { version, reason });
                    }
                    Some(Action::Resume) => {
                        handle.pause.store(false, std::sync::atomic::Ordering::Relaxed);
                        ctx.events.emit(task, Event::TrainingResumed { version });
                    }
                    _ => {}
                }
            }
            cmd = operator.commands.recv() => if let Some(cmd) = cmd {
                if let Some(reply) = act_on(ctx, store, task, operator.fresh, cmd) {
                    let _ = reply.send(Err(format!("already training v{version} (the progress is in `adaptd status`)")));
                }
                let serving = ctx.registry.current(task).map_or(0, |s| s.version);
                if serving != incumbent.version {
                    handle.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = (&mut handle.done).await;
                    return Err(cancelled(ctx, task, version, format!("an operator chose v{serving} while v{version} trained against v{}; the candidate is discarded", incumbent.version)));
                }
            },
            done = &mut handle.done => return match done {
                Ok(Ok(report)) => Ok(report),
                Ok(Err(e)) => {
                    let reason = format!("{} ({}): the candidate is discarded, v{} keeps serving", e, e.error_type(), incumbent.version);
                    let event = ctx.events.emit(task, Event::TrainingFailed { version, kind: Some(config.kind.label()), error_type: e.error_type().to_string(), reason: reason.clone() });
                    ctx.journal.record(&event);
                    Err(JobResult::Failed(reason))
                }
                Err(_) => Err(JobResult::Failed("the trainer stopped".into())),
            },
        }
    }
}

/// One finished fit of an escalating job, with the validation figures that choose between them.
struct Attempt {
    report: FitReport,
    labels: Vec<String>,
    counts: SampleCounts,
    notes: Vec<String>,
    val_accuracy: f64,
    val_loss: f64,
    seconds: f64,
}

impl Attempt {
    fn new(kind: JobKind, report: FitReport, labels: Vec<String>, counts: SampleCounts, mut notes: Vec<String>, seconds: f64) -> Attempt {
        let best = report.epochs.get(report.best_epoch);
        let (val_accuracy, val_loss) = best.map_or((f64::NAN, f64::NAN), |e| (f64::from(e.val_accuracy), f64::from(e.val_loss)));
        notes.push(format!("chosen by validation: {} (accuracy {val_accuracy:.4}, loss {val_loss:.4})", kind.label()));
        Attempt { report, labels, counts, notes, val_accuracy, val_loss, seconds }
    }

    /// Better on validation: clearly higher accuracy (half a point), or as accurate with a lower
    /// loss. Never the holdout: that stays for the gate.
    fn beats(&self, other: &Attempt) -> bool {
        self.val_accuracy > other.val_accuracy + 0.005 || (self.val_accuracy >= other.val_accuracy && self.val_loss < other.val_loss)
    }
}

/// A job an operator overtook: announced, journalled, its candidate discarded.
fn cancelled(ctx: &Context, task: &str, version: u64, reason: String) -> JobResult {
    let event = ctx.events.emit(task, Event::TrainingCancelled { version, reason: reason.clone() });
    ctx.journal.record(&event);
    JobResult::Cancelled(reason)
}

/// Why a trained candidate got no decision, with a stable label for events and metrics.
#[derive(Debug)]
struct GateError {
    /// `evaluation` (the engine or trainer could not score it), `superseded` (an operator chose
    /// what serves meanwhile), or the registry's own type when promotion failed (`io`, ...).
    error_type: &'static str,
    reason: String,
}

impl From<String> for GateError {
    fn from(reason: String) -> GateError {
        GateError { error_type: "evaluation", reason }
    }
}

/// The retention set seen through the base model (`embeddings`, one per row), as the
/// base-domain detector learns it.
fn base_domain_detector(retention: &RetentionSet, embeddings: &[Vec<f32>]) -> Option<BaseDomainDetector> {
    let observed: Vec<Observed> = embeddings.iter().enumerate().map(|(i, e)| Observed::new(e.clone(), &row_of(&retention.inputs, i))).collect();
    BaseDomainDetector::from_retention(&observed)
}

fn row_of(inputs: &[HostTensor], i: usize) -> Vec<HostTensor> {
    inputs.iter().map(|t| t.rows(i, i + 1)).collect()
}

/// The share of base-domain inputs among the task's latest requests, or, when it has served
/// too few, among its latest samples' inputs (their labels unused); and how many were seen.
async fn base_traffic_share(ctx: &Context, store: &Mutex<SampleStore>, task: &str, detector: &BaseDomainDetector) -> Result<Option<(f64, usize)>, String> {
    let mut rows = ctx.traffic.rows(task);
    if rows.len() < crate::traffic::MIN_TRAFFIC_ROWS {
        let latest = lock(store).latest(task, crate::traffic::TRAFFIC_ROWS).map_err(|e| e.to_string())?;
        let refs: Vec<&StoredSample> = latest.iter().collect();
        rows = Vec::with_capacity(refs.len());
        for chunk in refs.chunks(EVAL_CHUNK) {
            let inputs = model_inputs(ctx.text.as_deref(), chunk)?;
            rows.extend((0..chunk.len()).map(|i| row_of(&inputs, i)));
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let base = ctx.registry.base(task);
    let mut observed = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(EVAL_CHUNK) {
        let inputs = concat_inputs(chunk.iter().map(Vec::as_slice));
        let predictions = ctx.engine.evaluate(base.clone(), inputs).await.map_err(|e| e.to_string())?;
        for (p, row) in predictions.into_iter().zip(chunk) {
            observed.push(Observed::new(p.embedding.ok_or("the base model gave no embedding")?, row));
        }
    }
    Ok(Some((detector.share(&observed), observed.len())))
}

#[allow(clippy::too_many_arguments)]
async fn gate_and_promote(
    ctx: &Context,
    config: &AdaptConfig,
    store: &Mutex<SampleStore>,
    incumbent: &Arc<Serving>,
    version: u64,
    labels: Vec<String>,
    counts: SampleCounts,
    notes: Vec<String>,
    trigger: Trigger,
    report: FitReport,
    base_domain: &BaseDomain,
    train_seconds: f64,
) -> Result<(bool, String), GateError> {
    let task = &config.task;
    let bundle = ctx.registry.bundle();
    let lora_info = report.lora.as_ref().map(|l| LoraInfo { rank: l.rank, alpha: l.alpha, target_modules: l.modules.iter().map(|m| m.module.clone()).collect() });
    let mut adapter = Adapter {
        manifest: AdapterManifest {
            format: ADAPTER_FORMAT,
            task: task.clone(),
            version,
            kind: if report.lora.is_some() { AdapterKind::Lora } else { AdapterKind::Head },
            labels: labels.clone(),
            lora: lora_info,
            base: BaseRef::of(bundle),
            parent_version: (incumbent.version > 0).then_some(incumbent.version),
            metrics: BTreeMap::new(),
            samples: counts,
            created_unix_ms: now_ms(),
            decision: None,
            promoted_unix_ms: None,
            base_routing: false,
            files: BTreeMap::new(),
        },
        head: report.head.clone(),
        lora: report.lora.clone(),
    };
    let candidate = ctx.registry.preview(adapter.clone()).map_err(|e| format!("the candidate does not fit the bundle: {e}"))?;

    // Holdout: samples the trainer never saw (neither gradients nor early stopping).
    let mut holdout = lock(store).load(task, Split::Holdout).map_err(|e| e.to_string())?;
    if holdout.len() > config.max_eval_samples {
        holdout.drain(..holdout.len() - config.max_eval_samples);
    }
    let holdout_refs: Vec<&StoredSample> = holdout.iter().collect();
    let truth: Vec<&str> = holdout.iter().map(|s| s.sample.label.as_str()).collect();
    let (cand_pred, inc_pred) = if holdout.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (predict_samples(ctx, &candidate, &holdout_refs).await?, predict_samples(ctx, incumbent, &holdout_refs).await?)
    };
    let names = |p: &[Prediction]| p.iter().map(|p| p.label.clone()).collect::<Vec<String>>();
    let (cand_names, inc_names) = (names(&cand_pred), names(&inc_pred));
    let cand_metrics = gate::metrics(&truth, &as_refs(&cand_names));
    let inc_metrics = gate::metrics(&truth, &as_refs(&inc_names));
    let finite = cand_pred.iter().all(|p| p.scores.iter().all(|x| x.is_finite())) && report.head.validate(bundle.manifest.embedding_dim, labels.len()).is_ok();

    // Retention: the base domain, where the task's labels are the bundle's.
    let base_labels = bundle.manifest.labels.clone().unwrap_or_default();
    let retention_check = &base_domain.check;
    let retention_applies = !retention_check.is_empty() && retention_check.labels.iter().all(|&l| base_labels.get(l as usize).is_some_and(|n| labels.contains(n)));
    let retention_truth: Vec<&str> = if retention_applies { retention_check.labels.iter().map(|&l| base_labels[l as usize].as_str()).collect() } else { Vec::new() };
    let retention_accuracy = async |serving: &Arc<Serving>| -> Result<f64, String> { Ok(gate::metrics(&retention_truth, &as_refs(&names(&predict_inputs(ctx, serving, &retention_check.inputs).await?))).accuracy) };
    let retention = if retention_applies {
        let cand = retention_accuracy(&candidate).await?;
        let inc = retention_accuracy(incumbent).await?;
        // Against the better of the incumbent and the base model: measured only against the
        // incumbent, forgetting could pile up a little more with every version.
        let base = if incumbent.version == 0 { inc } else { retention_accuracy(&ctx.registry.base(task)).await? };
        Some((inc.max(base), cand))
    } else {
        None
    };

    // Probe: a few holdout rows against the base model, and against the trainer's own forward
    // pass. (Without holdout rows the gate refuses on holdout size anyway.)
    let probe_rows: Vec<&StoredSample> = holdout_refs.iter().take(32).copied().collect();
    let (probe_change, parity_max_diff) = if probe_rows.is_empty() {
        (0.0, 0.0)
    } else {
        let inputs = model_inputs(ctx.text.as_deref(), &probe_rows)?;
        // The probe rows are the first holdout rows: the candidate's answers are already in hand.
        let cand = &cand_pred[..probe_rows.len()];
        let base = ctx.engine.evaluate(ctx.registry.base(task), inputs.clone()).await.map_err(|e| e.to_string())?;
        let mut change = 0.0f32;
        for (c, b) in cand.iter().zip(&base) {
            if let (Some(ce), Some(be)) = (&c.embedding, &b.embedding) {
                change = ce.iter().zip(be).fold(change, |m, (x, y)| m.max((x - y).abs()));
            }
            if b.scores.iter().any(|x| x.is_nan()) {
                change = change.max(1.0); // the base has no classifier: any head is a change
                continue;
            }
            for (i, label) in c.labels.iter().enumerate() {
                let base_score = b.labels.iter().position(|l| l == label).map_or(0.0, |j| b.scores[j]);
                change = change.max((c.scores[i] - base_score).abs());
            }
        }
        let trainer_scores = ctx.trainer.predict(inputs, report.lora.clone(), report.head.clone()).await.map_err(|e| e.to_string())?;
        let engine_scores: Vec<f32> = cand.iter().flat_map(|p| p.scores.iter().copied()).collect();
        let parity = if trainer_scores.len() == engine_scores.len() { trainer_scores.iter().zip(&engine_scores).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) } else { f32::MAX };
        (change, parity)
    };

    // How much of what the device sees still looks like the base domain (measured as the job
    // started): only then does forgetting it cost anything; the retention bound follows it.
    let base_traffic_share = if retention.is_some() { base_domain.traffic_share } else { None };
    let mut evidence = Evidence { candidate: cand_metrics, incumbent: inc_metrics, retention, base_traffic_share, base_routed: None, finite, probe_change, parity_max_diff };
    let mut decision = gate::decide(&evidence, &config.gate);
    let mut notes = notes;
    // Refused only for forgetting a base domain the device still sees: the adapter may still
    // serve what moved, with the rows that look like the base domain answered by the base model.
    let only_retention_failed = decision.checks.iter().filter(|c| !c.passed).all(|c| c.name == "retention") && !decision.promote;
    let routable = || {
        let mut routed = adapter.clone();
        routed.manifest.base_routing = true;
        ctx.registry.preview(routed).map_err(|e| e.to_string())
    };
    let routed = match (only_retention_failed, evidence.retention) {
        (true, Some(_)) => Some(routable()),
        _ => None,
    };
    if let Some(Err(why)) = &routed {
        notes.push(format!("not routed: {why}"));
    }
    if let (Some(Ok(routed)), Some((reference, _))) = (routed, evidence.retention) {
        let routed_pred = predict_samples(ctx, &routed, &holdout_refs).await?;
        let routed_evidence = Evidence {
            candidate: gate::metrics(&truth, &as_refs(&names(&routed_pred))),
            retention: Some((reference, retention_accuracy(&routed).await?)),
            base_routed: Some(routed_pred.iter().filter(|p| p.base_routed).count() as f64 / routed_pred.len().max(1) as f64),
            finite: evidence.finite && routed_pred.iter().all(|p| p.scores.iter().all(|x| x.is_finite())),
            ..evidence.clone()
        };
        let routed_decision = gate::decide(&routed_evidence, &config.gate);
        if routed_decision.promote {
            adapter.manifest.base_routing = true;
            notes.push(format!("the adapter alone forgot the base domain ({}); it serves with base-like inputs routed to the base model ({:.0} % of the holdout)", decision.summary, routed_evidence.base_routed.unwrap_or(0.0) * 100.0));
            evidence = routed_evidence;
            decision = routed_decision;
        } else {
            notes.push(format!("routing base-like inputs to the base model did not pass either: {}", routed_decision.summary));
        }
    }
    let mut metrics = BTreeMap::from([
        ("holdout_accuracy".to_string(), evidence.candidate.accuracy),
        ("holdout_macro_f1".to_string(), evidence.candidate.macro_f1),
        ("incumbent_holdout_accuracy".to_string(), evidence.incumbent.accuracy),
        ("incumbent_holdout_macro_f1".to_string(), evidence.incumbent.macro_f1),
        ("train_seconds".to_string(), train_seconds),
        ("samples_per_second".to_string(), report.samples_per_second),
    ]);
    if let Some((before, after)) = evidence.retention {
        metrics.insert("retention_accuracy".into(), after);
        metrics.insert("incumbent_retention_accuracy".into(), before);
    }
    let job = JobRecord {
        version,
        incumbent_version: incumbent.version,
        kind: adapter.manifest.kind.name().into(),
        trigger,
        promote: decision.promote,
        summary: decision.summary.clone(),
        checks: decision.checks.clone(),
        evidence: evidence.clone(),
        notes,
        samples: adapter.manifest.samples.clone(),
        training: TrainingSummary {
            best_epoch: report.best_epoch,
            stopped_early: report.stopped_early,
            steps: report.steps,
            batch_size: report.batch_size,
            seconds: train_seconds,
            epochs: Vec::new(),
            losses: Vec::new(),
        },
    };
    adapter.manifest.metrics = metrics;
    adapter.manifest.decision = Some(json!({ "promote": decision.promote, "summary": decision.summary, "checks": decision.checks, "trigger": trigger }));
    // The event carries the decision and its figures; the journal also keeps the loss curves.
    let mut journalled = ctx.events.emit(task, Event::GateDecision(job.clone()));
    journalled.event = Event::Job(JobRecord { training: TrainingSummary { epochs: report.epochs.clone(), losses: report.losses.clone(), ..job.training }, ..job });
    // The gate compared against the incumbent; if something else serves now (an operator acted
    // while the candidate was evaluated), the comparison no longer holds.
    let serving_now = ctx.registry.current(task).map_or(0, |s| s.version);
    if decision.promote && serving_now != incumbent.version {
        let reason = format!("an operator chose v{serving_now} while v{version} was evaluated against v{}; the candidate is discarded", incumbent.version);
        return Err(GateError { error_type: "superseded", reason });
    }
    if decision.promote {
        let registry = ctx.registry.clone();
        let promoted = tokio::task::spawn_blocking(move || {
            crate::background_priority();
            registry.promote(adapter)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| GateError { error_type: e.error_type(), reason: format!("promotion failed: {}", operator_error(ctx, &e)) })?;
        ctx.events.emit(
            task,
            Event::Promoted {
                version: promoted.version,
                from_version: incumbent.version,
                holdout_accuracy: Some(evidence.candidate.accuracy),
                incumbent_holdout_accuracy: Some(evidence.incumbent.accuracy),
                recovered: false,
                reason: None,
            },
        );
    }
    ctx.journal.record(&journalled);
    Ok((decision.promote, decision.summary))
}
