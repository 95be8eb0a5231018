//! What the gate measured about a candidate and what it decided, as events, the journal and
//! adapter manifests carry it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub accuracy: f64,
    /// Mean F1 over the classes present in the truth.
    pub macro_f1: f64,
    pub samples: usize,
    pub per_class: BTreeMap<String, ClassMetrics>,
}

/// What the adapt loop measured about one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// On the holdout split.
    pub candidate: Metrics,
    pub incumbent: Metrics,
    /// On the same holdout samples: how many the candidate gets right and the incumbent wrong,
    /// and how many the other way round (the discordant pairs of a paired comparison).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<(usize, usize)>,
    /// Accuracy on the retention set's check half: (reference, candidate), the reference being the
    /// better of the incumbent and the base model. None: the bundle has no retention set, or its
    /// labels are not the task's.
    pub retention: Option<(f64, f64)>,
    /// The share of the device's recent inputs that look like the base domain (see `traffic`),
    /// and how many inputs it was measured on. None: not measured (no retention set).
    #[serde(default)]
    pub base_traffic_share: Option<(f64, usize)>,
    /// The candidate routes base-like rows to the base model: the share of holdout rows it
    /// routed. None: it serves every row itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_routed: Option<f64>,
    /// Every score the engine produced for the candidate is finite.
    pub finite: bool,
    /// Largest change of any score versus the base model on the probe set.
    pub probe_change: f32,
    /// Largest |engine − trainer| score difference on the probe set.
    pub parity_max_diff: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub promote: bool,
    /// One line: why.
    pub summary: String,
    pub checks: Vec<Check>,
}

/// A gate decision as the judged adapter's manifest keeps it: what became of the candidate (the
/// gate's verdict, unless the job overrode it, as a fleet release under the `shadow` policy is
/// never promoted), why, every check with its figures, and what started the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub promote: bool,
    pub summary: String,
    pub checks: Vec<Check>,
    #[serde(default)]
    pub trigger: Option<crate::status::Trigger>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_as_earlier_daemons_wrote_it_into_a_manifest_reads_back_unchanged() {
        // The JSON value the loop wrote before the record was typed: these four keys, always.
        let written = serde_json::json!({
            "promote": true,
            "summary": "promoted: accuracy 0.3810 -> 0.8571",
            "checks": [{ "name": "beats_incumbent", "passed": true, "detail": "accuracy 0.8571 vs incumbent 0.3810" }],
            "trigger": "new_samples",
        });
        let record: DecisionRecord = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(record.trigger, Some(crate::status::Trigger::NewSamples));
        assert_eq!(serde_json::to_value(&record).unwrap(), written);
    }

    #[test]
    fn a_decision_missing_a_field_or_of_the_wrong_kind_is_refused_by_name() {
        let missing = serde_json::from_value::<DecisionRecord>(serde_json::json!({ "promote": true, "checks": [] })).unwrap_err();
        assert!(missing.to_string().contains("summary"), "{missing}");
        let wrong = serde_json::from_value::<DecisionRecord>(serde_json::json!({ "promote": "yes", "summary": "", "checks": [] })).unwrap_err();
        assert!(wrong.to_string().contains("boolean"), "{wrong}");
        let trigger =
            serde_json::from_value::<DecisionRecord>(serde_json::json!({ "promote": true, "summary": "", "checks": [], "trigger": "whim" })).unwrap_err();
        assert!(trigger.to_string().contains("whim"), "{trigger}");
    }
}
