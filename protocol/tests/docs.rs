#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code
//! `docs/protocol.md` lists every event with every field it carries, and nothing else: its
//! events table is read here and held to the `Event` enum through one example of each kind.

use std::collections::{BTreeMap, BTreeSet};

use adaptd_protocol::event::{JobRecord, SampleCounts, TrainingSummary};
use adaptd_protocol::gate::{Check, Evidence, Metrics};
use adaptd_protocol::{Event, EventRecord, Trigger};

fn job() -> JobRecord {
    let metrics = Metrics { accuracy: 0.9, macro_f1: 0.88, samples: 120, per_class: BTreeMap::new() };
    JobRecord {
        version: 2,
        incumbent_version: 1,
        kind: "lora".into(),
        trigger: Trigger::Settled,
        promote: true,
        summary: "promoted".into(),
        checks: vec![Check { name: "retention".into(), passed: true, detail: "ok".into() }],
        evidence: Evidence {
            candidate: metrics.clone(),
            incumbent: metrics,
            paired: Some((14, 2)),
            retention: Some((0.99, 0.98)),
            base_traffic_share: Some((0.3, 256)),
            base_routed: Some(0.2),
            finite: true,
            probe_change: 0.4,
            parity_max_diff: 1e-6,
        },
        notes: vec!["chosen by validation".into()],
        samples: SampleCounts { train: 900, validation: 100, holdout: 100, ..Default::default() },
        training: TrainingSummary { best_epoch: 3, stopped_early: true, steps: 400, batch_size: 16, seconds: 2.5, epochs: Vec::new(), losses: Vec::new() },
    }
}

/// One event of every kind. A new kind does not compile in `variant_has_an_example` below until
/// it is listed there, next to this list.
fn examples() -> Vec<Event> {
    let s = String::new;
    vec![
        Event::SampleRefused { topic: s(), reason: s(), message: s() },
        Event::SamplesEvicted { evicted: 1, bytes: 2, budget_bytes: 3, at_reservoir: false },
        Event::LabelsSuspected {
            judged: 400,
            suspects: 12,
            new: 3,
            by_label: [("gear".to_string(), 12)].into(),
            sources: vec![adaptd_protocol::SuspectSource { source: "line-3".into(), samples: 40, suspects: 9 }],
        },
        Event::LabelRequestsAnswered { published: 12, sent: 10, answered: 4, disagreed: 3, pending: 6 },
        Event::TrainingStarted {
            version: 1,
            kind: s(),
            trigger: Trigger::NewSamples,
            device: s(),
            samples: SampleCounts::default(),
            labels: vec![],
            notes: vec![],
            escalation: vec![],
        },
        Event::TrainingProgress { version: 1, kind: s(), epoch: 1, epochs: 2, step: 3, steps: 4, loss: 0.5, eta_s: 1.0 },
        Event::TrainingAttempt { version: 1, step: 1, steps: 3, kind: s(), val_accuracy: 0.5, val_loss: 0.7, seconds: 1.0, best_so_far: true, reason: s() },
        Event::TrainingEscalated { version: 1, from: s(), to: s(), val_accuracy: 0.5, until: 0.98 },
        Event::TrainingFinished { version: 1, seconds: 1.0, epochs: 3, best_epoch: 2, stopped_early: false, samples_per_second: 100.0, batch_size: 16 },
        Event::TrainingPaused { version: 1, reason: s() },
        Event::TrainingResumed { version: 1 },
        Event::TrainingDeferred { reason: s() },
        Event::TrainingFailed { version: 1, kind: Some(s()), error_type: s(), reason: s() },
        Event::TrainingCancelled { version: 1, reason: s() },
        Event::GateDecision(job()),
        Event::Job(job()),
        Event::JobFinished { outcome: s(), promoted: vec![1, 2], serving_version: 2, seconds: 12.5, summary: s() },
        Event::Promoted { version: 2, from_version: 1, holdout_accuracy: Some(0.9), incumbent_holdout_accuracy: Some(0.8), recovered: true, reason: Some(s()) },
        Event::RolledBack { from_version: 2, to_version: 1, reason: s(), by: s() },
        Event::Pinned { version: 1, by: s() },
        Event::AdapterImported { version: 3, from: s(), by: s() },
        Event::WatchPassed { version: 1, fresh_samples: 10, accuracy: 0.9, previous_accuracy: 0.8 },
        Event::Rollout {
            state: adaptd_protocol::fleet::AgentState::Applied,
            seq: Some(3),
            release: Some(2),
            reason: None,
            message: None,
            serving_version: 4,
            serving_release: Some(2),
            scores: None,
        },
        Event::ConfigReloaded { applied: vec![], needs_restart: vec![] },
        Event::ConfigRefused { reason: s() },
        Event::PartDown { part: s(), reason: s(), restart_in_s: 1, restarts: 0 },
        Event::PartRestarted { part: s(), restarts: 1, after: s() },
        Event::CommandResult { command: s(), ok: true, by: s(), message: s(), via: s() },
    ]
}

/// Exhaustive on purpose (no `_` arm): adding a kind to `Event` stops here, where its example
/// in `examples` and its row in `docs/protocol.md` are due too.
#[allow(dead_code)]
fn variant_has_an_example(e: &Event) {
    match e {
        Event::SampleRefused { .. }
        | Event::SamplesEvicted { .. }
        | Event::LabelsSuspected { .. }
        | Event::LabelRequestsAnswered { .. }
        | Event::TrainingStarted { .. }
        | Event::TrainingProgress { .. }
        | Event::TrainingAttempt { .. }
        | Event::TrainingEscalated { .. }
        | Event::TrainingFinished { .. }
        | Event::TrainingPaused { .. }
        | Event::TrainingResumed { .. }
        | Event::TrainingDeferred { .. }
        | Event::TrainingFailed { .. }
        | Event::TrainingCancelled { .. }
        | Event::GateDecision(_)
        | Event::Job(_)
        | Event::JobFinished { .. }
        | Event::Promoted { .. }
        | Event::RolledBack { .. }
        | Event::AdapterImported { .. }
        | Event::Pinned { .. }
        | Event::WatchPassed { .. }
        | Event::Rollout { .. }
        | Event::ConfigReloaded { .. }
        | Event::ConfigRefused { .. }
        | Event::PartDown { .. }
        | Event::PartRestarted { .. }
        | Event::CommandResult { .. } => {}
    }
}

/// `event` → the field names the events table's `fields` column lists for it.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).expect("docs/protocol.md");
    let start = doc.find("| `event` | when | fields |").expect("the events table, headed | `event` | when | fields |");
    let mut out = BTreeMap::new();
    for line in doc[start..].lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let ticked = |cell: &str| cell.split('`').skip(1).step_by(2).map(str::to_string).collect::<Vec<String>>();
        let fields: BTreeSet<String> = ticked(cells[2]).into_iter().collect();
        for kind in ticked(cells[0]) {
            out.insert(kind, fields.clone());
        }
    }
    out
}

#[test]
fn every_event_and_field_is_documented_and_nothing_else() {
    let examples = examples();
    let kinds: BTreeSet<&str> = examples.iter().map(Event::kind).collect();
    assert_eq!(kinds.len(), examples.len(), "one example per kind");
    let documented = documented();
    assert_eq!(documented.keys().map(String::as_str).collect::<BTreeSet<&str>>(), kinds, "the events table lists exactly the kinds the daemon emits");
    for event in examples {
        let record = EventRecord { task: "sorter".into(), time_ms: 1, seq: 7, event };
        let json = serde_json::to_value(&record).unwrap();
        let fields: BTreeSet<String> =
            json.as_object().unwrap().keys().filter(|k| !["event", "task", "time_ms", "event_seq"].contains(&k.as_str())).cloned().collect();
        let kind = record.event.kind();
        assert_eq!(json["event"], kind);
        assert_eq!(&fields, &documented[kind], "the fields of `{kind}` as emitted (left) and as documented (right)");
        let back: EventRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record, "`{kind}` reads back as written");
    }
}

#[test]
fn figures_that_could_not_be_measured_read_back_as_nan() {
    let json = r#"{"event": "training_attempt", "task": "t", "time_ms": 1, "version": 1, "step": 1, "steps": 1, "kind": "head", "val_accuracy": null, "val_loss": null, "seconds": 0.1, "best_so_far": true, "reason": ""}"#;
    let record: EventRecord = serde_json::from_str(json).unwrap();
    let Event::TrainingAttempt { val_accuracy, val_loss, .. } = record.event else { panic!("{record:?}") };
    assert!(val_accuracy.is_nan() && val_loss.is_nan());
    assert!(serde_json::from_str::<EventRecord>(r#"{"event": "no_such_event", "task": "t", "time_ms": 1}"#).is_err());
}
