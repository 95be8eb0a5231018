//! A task's status (HTTP `GET /v1/tasks`, the CLI's `status`) and the answer to an operator's
//! command (HTTP and MQTT).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a job started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `schedule.min_new_samples` new samples arrived.
    NewSamples,
    /// `schedule.interval_s` passed with new samples.
    Interval,
    /// New samples stopped arriving for `schedule.settle_s`.
    Settled,
    /// Accuracy on fresh labels fell below `schedule.drift_accuracy`.
    Drift,
    /// An operator asked.
    Operator,
    /// A fleet release arrived (judged, not trained here).
    Fleet,
}

/// Where a task's scheduler stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SchedulerState {
    /// Nothing new to learn from.
    Idle,
    /// New samples are arriving; not enough to train yet (or the device is busy).
    Collecting {
        waiting_for: String,
    },
    Training {
        trigger: Trigger,
        since_ms: u64,
        paused: bool,
    },
    /// The job finished; the gate is deciding.
    Validating,
    Cooldown {
        until_ms: u64,
    },
    /// The last job failed; the next try waits.
    Backoff {
        until_ms: u64,
        failures: u32,
        reason: String,
    },
}

impl SchedulerState {
    /// The state's name, as the JSON's `state` says it.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerState::Idle => "idle",
            SchedulerState::Collecting { .. } => "collecting",
            SchedulerState::Training { .. } => "training",
            SchedulerState::Validating => "validating",
            SchedulerState::Cooldown { .. } => "cooldown",
            SchedulerState::Backoff { .. } => "backoff",
        }
    }

    /// One line for people, e.g. `training (new_samples, paused)`, `backoff: 3 failures, ...`.
    pub fn describe(&self, now_ms: u64) -> String {
        let in_s = |until: u64| until.saturating_sub(now_ms).div_ceil(1000);
        match self {
            SchedulerState::Idle | SchedulerState::Validating => self.name().to_string(),
            SchedulerState::Collecting { waiting_for } => format!("collecting: {waiting_for}"),
            SchedulerState::Training { trigger, paused, .. } => {
                let trigger = serde_json::to_value(trigger).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                format!("training ({trigger}{})", if *paused { ", paused" } else { "" })
            }
            SchedulerState::Cooldown { until_ms } => format!("cooldown: {} s", in_s(*until_ms)),
            SchedulerState::Backoff { until_ms, failures, reason } => format!("backoff: {failures} failed, next in {} s ({reason})", in_s(*until_ms)),
        }
    }
}

/// One task, as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task: String,
    pub scheduler: SchedulerState,
    pub serving_version: u64,
    /// Jobs by outcome: `started`, `promoted`, `rejected`, `failed`, `deferred`, `cancelled`.
    pub jobs: BTreeMap<String, u64>,
    pub last_decision: Option<String>,
    /// Steps done / total of the running job.
    pub progress: Option<(usize, usize)>,
    /// Labelled samples stored for the task, and how many arrived since the last job started.
    pub samples: u64,
    pub new_samples: u64,
    /// The task's loop stopped on an error and waits for its restart: why. Serving goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
}

impl TaskStatus {
    /// A task as its loop starts: nothing done yet, `serving_version` serving.
    pub fn starting(task: &str, serving_version: u64) -> TaskStatus {
        TaskStatus {
            task: task.to_string(),
            scheduler: SchedulerState::Idle,
            serving_version,
            jobs: BTreeMap::new(),
            last_decision: None,
            progress: None,
            samples: 0,
            new_samples: 0,
            down: None,
        }
    }

    /// Jobs that reached an outcome (every count but `started`).
    pub fn finished_jobs(&self) -> u64 {
        self.jobs.iter().filter(|(k, _)| k.as_str() != "started").map(|(_, v)| v).sum()
    }
}

/// The table `adaptd status` prints.
pub fn render_statuses(statuses: &[TaskStatus], now_ms: u64) -> String {
    let mut out = format!("{:<16} {:>8} {:<34} {:>9} {:>6}  {}\n", "task", "serving", "scheduler", "samples", "new", "jobs / last decision");
    for s in statuses {
        let jobs: Vec<String> = s.jobs.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out += &format!(
            "{:<16} {:>8} {:<34} {:>9} {:>6}  {}\n",
            s.task,
            format!("v{}", s.serving_version),
            truncate(&s.down.as_ref().map_or_else(|| s.scheduler.describe(now_ms), |why| format!("down: {why}")), 34),
            s.samples,
            s.new_samples,
            jobs.join(", ")
        );
        if let Some(d) = &s.last_decision {
            out += &format!("{:<16} last: {d}\n", "");
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { s.chars().take(n.saturating_sub(1)).collect::<String>() + "…" }
}

/// The answer to an operator's command (HTTP `POST /v1/tasks/{task}/train|rollback|pin|import`):
/// what happened, in one line, and a stable label when the request itself was refused (no
/// token, a browser, a malformed body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub message: String,
}

impl CommandReply {
    pub fn done(message: String) -> CommandReply {
        CommandReply { ok: true, error: None, message }
    }

    /// The task's loop would not do it (a job running, no such version, ...).
    pub fn refused(message: String) -> CommandReply {
        CommandReply { ok: false, error: None, message }
    }

    /// The request was refused before it reached the task: `error` is the stable label.
    pub fn rejected(error: &str, message: String) -> CommandReply {
        CommandReply { ok: false, error: Some(error.to_string()), message }
    }
}

/// `POST /v1/tasks/{task}/import`: an adapter directory (`adaptd adapters export`) on the
/// daemon's machine, as an absolute path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    pub dir: std::path::PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(scheduler: SchedulerState) -> TaskStatus {
        TaskStatus {
            task: "sorter".into(),
            scheduler,
            serving_version: 3,
            jobs: BTreeMap::from([("started".into(), 4), ("promoted".into(), 3), ("rejected".into(), 1)]),
            last_decision: Some("promoted: accuracy 0.8 -> 0.9".into()),
            progress: Some((12, 100)),
            samples: 1200,
            new_samples: 40,
            down: None,
        }
    }

    #[test]
    fn people_read_the_scheduler_state_by_its_name() {
        let training = status(SchedulerState::Training { trigger: Trigger::Settled, since_ms: 5, paused: true });
        let json = serde_json::to_value(&training).unwrap();
        assert_eq!(json["scheduler"]["state"], "training");
        assert_eq!(serde_json::from_value::<TaskStatus>(json).unwrap(), training);
        let table = render_statuses(&[training.clone(), status(SchedulerState::Backoff { until_ms: 31_000, failures: 2, reason: "nan loss".into() })], 1_000);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("training (settled, paused)"), "{table}");
        assert!(lines[1].starts_with("sorter") && lines[1].contains("v3") && lines[1].contains("1200"), "{table}");
        assert!(lines[2].contains("last: promoted: accuracy 0.8 -> 0.9"), "{table}");
        assert!(lines[3].contains("backoff: 2 failed, next in 30 s"), "{table}");
        assert_eq!(training.finished_jobs(), 4);

        let down = TaskStatus { down: Some("sample store: database or disk is full".into()), ..status(SchedulerState::Idle) };
        let json = serde_json::to_value(&down).unwrap();
        assert_eq!(json["down"], "sample store: database or disk is full");
        assert_eq!(serde_json::from_value::<TaskStatus>(json).unwrap(), down);
        assert!(render_statuses(&[down], 0).lines().nth(1).unwrap().contains("down: sample store: database or"));
        assert!(serde_json::to_value(status(SchedulerState::Idle)).unwrap().get("down").is_none(), "absent while up");
    }
}
