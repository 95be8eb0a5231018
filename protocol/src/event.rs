//! Every event adaptd emits: logged, published on `{prefix}/{device}/events` (QoS 1), and for
//! training outcomes appended to the task's journal, which the report reads. One JSON object
//! each: `{"event": <kind>, "task": ..., "time_ms": ..., ...fields}`. `docs/protocol.md` lists
//! each kind with its fields, and a test holds the two to each other.

use serde::{Deserialize, Serialize};

use crate::gate::{Check, Evidence};
use crate::status::Trigger;

/// One event with its envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The task it concerns; empty for the daemon as a whole (configuration).
    pub task: String,
    pub time_ms: u64,
    /// The device's event number, rising by one per event across restarts: an event published
    /// again after a crash (see the outbox) has the number it had, so consumers drop what they
    /// have seen. Absent (0) on records written before events were numbered, and on ingest's
    /// `sample_refused`, which is announced again with its sample's redelivery instead.
    /// Named apart from `rollout`'s own `seq` (an assignment's), which sits beside it in the JSON.
    #[serde(rename = "event_seq", default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    #[serde(flatten)]
    pub event: Event,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How many samples of each split a job used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleCounts {
    pub train: u64,
    pub validation: u64,
    pub holdout: u64,
    /// Training samples per label (the device's own, replay not counted): fleet learning weighs
    /// each device's change to a label's row by them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub train_by_label: std::collections::BTreeMap<String, u64>,
}

/// A source (the `source` its samples name) whose labels are often suspected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspectSource {
    pub source: String,
    /// Its samples searched, and how many of them are suspects.
    pub samples: u64,
    pub suspects: u64,
}

/// One epoch of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "crate::nan::f32")]
    pub train_loss: f32,
    /// NaN (`null`) when there are no validation samples.
    #[serde(deserialize_with = "crate::nan::f32")]
    pub val_loss: f32,
    #[serde(deserialize_with = "crate::nan::f32")]
    pub val_accuracy: f32,
    pub seconds: f64,
}

/// How the chosen candidate trained. Events carry the summary; the journal adds the curves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// 0-based, as `epochs` counts.
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub steps: usize,
    pub batch_size: usize,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<EpochRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "nan_list")]
    pub losses: Vec<f32>,
}

fn nan_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    Ok(Vec::<Option<f32>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
}

/// A job's decision with everything it rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub version: u64,
    pub incumbent_version: u64,
    /// `head` or `lora`.
    pub kind: String,
    pub trigger: Trigger,
    pub promote: bool,
    pub summary: String,
    pub checks: Vec<Check>,
    pub evidence: Evidence,
    /// What the job chose and why (replay, escalation, routing).
    pub notes: Vec<String>,
    pub samples: SampleCounts,
    pub training: TrainingSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A payload on a samples topic that cannot be a sample (acknowledged, counted, not stored).
    SampleRefused {
        topic: String,
        reason: String,
        message: String,
    },
    /// The task's samples went over `ingest.max_mb_per_task`.
    SamplesEvicted {
        evicted: u64,
        bytes: u64,
        budget_bytes: u64,
        at_reservoir: bool,
    },
    /// Before a job, a search for wrong labels found samples whose labels their neighbours doubt:
    /// they stay out of training and the holdout until an operator judges them.
    LabelsSuspected {
        /// Samples searched, suspects among them, and suspects the previous search did not name.
        judged: u64,
        suspects: u64,
        new: u64,
        by_label: std::collections::BTreeMap<String, u64>,
        sources: Vec<SuspectSource>,
    },
    /// Answers to the task's label requests arrived. `published`: requests published since the
    /// daemon started; the rest count the requests kept (those not yet expired): `sent`,
    /// `answered`, `disagreed` (answers that say serving was wrong), `pending`.
    LabelRequestsAnswered {
        published: u64,
        sent: u64,
        answered: u64,
        disagreed: u64,
        pending: u64,
    },
    TrainingStarted {
        version: u64,
        kind: String,
        trigger: Trigger,
        device: String,
        samples: SampleCounts,
        labels: Vec<String>,
        notes: Vec<String>,
        escalation: Vec<String>,
    },
    TrainingProgress {
        version: u64,
        kind: String,
        epoch: usize,
        epochs: usize,
        step: usize,
        steps: usize,
        #[serde(deserialize_with = "crate::nan::f32")]
        loss: f32,
        eta_s: f64,
    },
    /// A step of the escalation finished (journalled).
    TrainingAttempt {
        version: u64,
        step: usize,
        steps: usize,
        kind: String,
        #[serde(deserialize_with = "crate::nan::f32")]
        val_accuracy: f32,
        #[serde(deserialize_with = "crate::nan::f32")]
        val_loss: f32,
        seconds: f64,
        best_so_far: bool,
        reason: String,
    },
    TrainingEscalated {
        version: u64,
        from: String,
        to: String,
        #[serde(deserialize_with = "crate::nan::f32")]
        val_accuracy: f32,
        until: f64,
    },
    TrainingFinished {
        version: u64,
        seconds: f64,
        /// Epochs run.
        epochs: usize,
        /// Counted from 1: the epoch whose weights the candidate keeps.
        best_epoch: usize,
        stopped_early: bool,
        samples_per_second: f64,
        batch_size: usize,
    },
    TrainingPaused {
        version: u64,
        reason: String,
    },
    TrainingResumed {
        version: u64,
    },
    TrainingDeferred {
        reason: String,
    },
    TrainingFailed {
        version: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        error_type: String,
        reason: String,
    },
    TrainingCancelled {
        version: u64,
        reason: String,
    },
    /// The gate decided (the training summary without its curves).
    GateDecision(JobRecord),
    /// The journal's record of a job: the gate's decision with the loss curves (journal only).
    Job(JobRecord),
    /// A job is over: how it ended, the versions it promoted (each step that passed the gate,
    /// in order) and what serves now (journalled).
    JobFinished {
        /// `promoted`, `rejected`, `deferred`, `failed` or `cancelled`.
        outcome: String,
        promoted: Vec<u64>,
        serving_version: u64,
        seconds: f64,
        summary: String,
    },
    Promoted {
        version: u64,
        from_version: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holdout_accuracy: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        incumbent_holdout_accuracy: Option<f64>,
        /// A crash came between the promotion and its record: written at the next start.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        recovered: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    RolledBack {
        from_version: u64,
        to_version: u64,
        reason: String,
        by: String,
    },
    /// An operator imported an adapter exported elsewhere; it serves once pinned.
    AdapterImported {
        version: u64,
        from: String,
        by: String,
    },
    Pinned {
        version: u64,
        by: String,
    },
    WatchPassed {
        version: u64,
        fresh_samples: u64,
        accuracy: f64,
        previous_accuracy: f64,
    },
    /// The fleet agent's state for an assignment changed (the retained status says the same).
    Rollout {
        state: crate::fleet::AgentState,
        seq: Option<u64>,
        release: Option<u64>,
        reason: Option<String>,
        message: Option<String>,
        serving_version: u64,
        serving_release: Option<u64>,
        scores: Option<crate::fleet::Scores>,
    },
    ConfigReloaded {
        applied: Vec<String>,
        needs_restart: Vec<String>,
    },
    ConfigRefused {
        reason: String,
    },
    /// A long-running part of the daemon (`loop:<task>`, `ingest`) stopped on an error or a
    /// panic; the daemon keeps serving and restarts the part after `restart_in_s`.
    PartDown {
        part: String,
        reason: String,
        restart_in_s: u64,
        /// Restarts so far.
        restarts: u64,
    },
    /// The part runs again (`after`: why it had stopped). If the fault is still there it stops
    /// again, and the next wait is longer.
    PartRestarted {
        part: String,
        restarts: u64,
        after: String,
    },
    CommandResult {
        command: String,
        ok: bool,
        by: String,
        message: String,
        via: String,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::SampleRefused { .. } => "sample_refused",
            Event::SamplesEvicted { .. } => "samples_evicted",
            Event::LabelsSuspected { .. } => "labels_suspected",
            Event::LabelRequestsAnswered { .. } => "label_requests_answered",
            Event::TrainingStarted { .. } => "training_started",
            Event::TrainingProgress { .. } => "training_progress",
            Event::TrainingAttempt { .. } => "training_attempt",
            Event::TrainingEscalated { .. } => "training_escalated",
            Event::TrainingFinished { .. } => "training_finished",
            Event::TrainingPaused { .. } => "training_paused",
            Event::TrainingResumed { .. } => "training_resumed",
            Event::TrainingDeferred { .. } => "training_deferred",
            Event::TrainingFailed { .. } => "training_failed",
            Event::TrainingCancelled { .. } => "training_cancelled",
            Event::GateDecision(_) => "gate_decision",
            Event::Job(_) => "job",
            Event::JobFinished { .. } => "job_finished",
            Event::Promoted { .. } => "promoted",
            Event::RolledBack { .. } => "rolled_back",
            Event::AdapterImported { .. } => "adapter_imported",
            Event::Pinned { .. } => "pinned",
            Event::WatchPassed { .. } => "watch_passed",
            Event::Rollout { .. } => "rollout",
            Event::ConfigReloaded { .. } => "config_reloaded",
            Event::ConfigRefused { .. } => "config_refused",
            Event::PartDown { .. } => "part_down",
            Event::PartRestarted { .. } => "part_restarted",
            Event::CommandResult { .. } => "command_result",
        }
    }

    /// The version of the task's adapter the event is about, if any.
    pub fn version(&self) -> Option<u64> {
        match self {
            Event::TrainingStarted { version, .. }
            | Event::TrainingProgress { version, .. }
            | Event::TrainingAttempt { version, .. }
            | Event::TrainingEscalated { version, .. }
            | Event::TrainingFinished { version, .. }
            | Event::TrainingPaused { version, .. }
            | Event::TrainingResumed { version }
            | Event::TrainingFailed { version, .. }
            | Event::TrainingCancelled { version, .. }
            | Event::Promoted { version, .. }
            | Event::Pinned { version, .. }
            | Event::AdapterImported { version, .. }
            | Event::WatchPassed { version, .. } => Some(*version),
            Event::GateDecision(job) | Event::Job(job) => Some(job.version),
            Event::RolledBack { to_version, .. } => Some(*to_version),
            Event::JobFinished { serving_version, .. } => Some(*serving_version),
            _ => None,
        }
    }
}
