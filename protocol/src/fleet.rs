//! Fleet rollout over MQTT: what the controller assigns a device's task, and what the device
//! reports back. Both are retained: a device that comes back online finds its assignment, and
//! the controller (restarted or not) finds every device's latest state. Adapter bytes never
//! travel over MQTT; an assignment only names a release of the signed repository.

use serde::{Deserialize, Serialize};

/// How a device treats an assigned release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The same gate as local training, against what serves now; promoted only if it passes.
    Validate,
    /// Promoted without the device's gate, only where the signed release allows it.
    Force,
    /// Scored by the gate and reported; nothing is promoted.
    Shadow,
    /// A fleet-learning round: scored as under `shadow`, then the device trains on from the
    /// release (its LoRA and head as the start) on its own samples, keeps the result only if its
    /// gate passes it against what serves, and offers it up naming the release as its parent.
    Train,
}

/// `{prefix}/{device}/assign/{task}`, retained, from the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// Increases with every assignment to this device and task: an older or repeated one is
    /// refused (a replayed message, or a controller restored from an old backup).
    pub seq: u64,
    pub task: String,
    /// The release of the signed repository to install.
    pub release: u64,
    pub policy: Policy,
    /// Installing a release older than the one committed is refused unless this says the
    /// operator means it.
    #[serde(default)]
    pub rollback: bool,
    /// Unix milliseconds after which the device gives up (`aborted`); none: no deadline.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// The rollout it belongs to, for the controller's tables.
    #[serde(default)]
    pub rollout: Option<String>,
}

/// Where a device's task is with its latest assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Nothing assigned yet.
    Idle,
    Queued,
    /// Waiting: training runs, serving is over its latency budget, or outside the maintenance window.
    Deferred,
    Downloading,
    /// Checking the signed metadata, the file hashes and lengths, the base model.
    Verifying,
    /// The gate runs on this device's own data.
    Validating,
    /// Serving it; the post-promotion watch is still counting.
    Applied,
    /// The watch held: final.
    Committed,
    /// Scored and reported under the `shadow` policy; nothing promoted: final.
    Scored,
    /// Not installed, with the reason: final.
    Refused,
    /// An error on the way (download, disk), with the reason: final.
    Failed,
    /// Applied, then rolled back by the device's watch: final.
    RolledBack,
    /// The deadline passed before it was applied: final.
    Aborted,
}

impl AgentState {
    /// Whether nothing more happens for this assignment.
    pub fn is_final(self) -> bool {
        matches!(self, AgentState::Committed | AgentState::Scored | AgentState::Refused | AgentState::Failed | AgentState::RolledBack | AgentState::Aborted)
    }
}

/// The gate's figures for a release, as the device measured them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scores {
    /// Holdout accuracy of the release and of what served before it, on this device's data.
    pub candidate_accuracy: f64,
    pub incumbent_accuracy: f64,
    pub holdout_samples: u64,
    /// Whether the gate passed it.
    pub passed: bool,
    /// The gate's summary line.
    pub summary: String,
}

/// `{prefix}/{device}/rollout/{task}`, retained, from the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    pub task: String,
    pub state: AgentState,
    /// The assignment this is about (none while idle).
    pub seq: Option<u64>,
    pub release: Option<u64>,
    pub rollout: Option<String>,
    /// Why it is deferred, refused, failed, rolled back or aborted (a short stable word:
    /// `stale_sequence`, `gate_refused`, `hash_mismatch`, ...).
    pub reason: Option<String>,
    /// The same in words, with the figures.
    pub message: Option<String>,
    /// The adapter version that serves the task now, and the release it came from if any.
    pub serving_version: u64,
    pub serving_release: Option<u64>,
    /// Bytes downloaded so far and in all, while downloading.
    pub bytes: Option<(u64, u64)>,
    pub scores: Option<Scores>,
    pub time_ms: u64,
    /// The sha256 of the base bundle's manifest this device serves: a controller leaves a device
    /// on another base out of a rollout, with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
}

/// `offer.json`: an adapter a device offers up to the operator (its files beside it; no
/// sample ever leaves the device), for review and, if it is good, publishing as a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub device: String,
    pub task: String,
    /// The adapter's version on the device.
    pub version: u64,
    pub kind: String,
    /// The base bundle's manifest sha256 it was trained on.
    pub base_sha256: String,
    /// The release it serves from, if the device took its parent from the fleet.
    pub parent_release: Option<u64>,
    /// The gate's figures on the device (holdout accuracy and the like).
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// How many samples of each split it learned from and was judged on.
    pub samples: crate::event::SampleCounts,
    pub offered_ms: u64,
}

/// `{prefix}/{device}/online`, retained: `online` while connected, `offline` as the broker's
/// last will for the device.
pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_with_an_unknown_field_or_policy_is_refused_by_name() {
        let ok: Assignment = serde_json::from_str(r#"{"seq": 3, "task": "sorter", "release": 2, "policy": "validate"}"#).unwrap();
        assert_eq!((ok.seq, ok.policy, ok.rollback, ok.deadline_ms), (3, Policy::Validate, false, None));
        let e = serde_json::from_str::<Assignment>(r#"{"seq": 3, "task": "sorter", "release": 2, "policy": "validate", "url": "http://x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `url`"), "{e}");
        let e = serde_json::from_str::<Assignment>(r#"{"seq": 3, "task": "sorter", "release": 2, "policy": "yolo"}"#).unwrap_err();
        assert!(e.to_string().contains("yolo"), "{e}");
        assert!(AgentState::RolledBack.is_final() && !AgentState::Applied.is_final());
        assert_eq!(serde_json::to_string(&AgentState::RolledBack).unwrap(), "\"rolled_back\"");
    }
}
