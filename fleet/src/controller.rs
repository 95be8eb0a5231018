//! The rollout controller as a pure state machine: a plan (which release, to which devices, in
//! which waves, with which thresholds) and the devices' retained statuses go in, assignments
//! come out. Waves advance when enough of the current one succeeded (applied or committed), the
//! rollout halts when failures pass the threshold, a device that does not answer in time counts
//! as failed, and pacing spreads assignments out. The whole state is serde, saved atomically
//! by the caller after every step: a restarted controller goes on where it stopped.

use std::collections::BTreeMap;

use adaptd_protocol::fleet::{AgentState, AgentStatus, Assignment, Policy};
use serde::{Deserialize, Serialize};

/// When failures halt a rollout: after `count` of them, or once `percent` of the devices
/// assigned so far failed, whichever comes first (the percentage only after `min_executed`
/// devices reached an end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureThreshold {
    pub count: Option<usize>,
    pub percent: Option<f64>,
    pub min_executed: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    pub task: String,
    pub release: u64,
    pub policy: Policy,
    /// Assign an older release on purpose (a rollback the operator means).
    pub rollback: bool,
    /// The devices of each wave, in order.
    pub waves: Vec<Vec<String>>,
    /// A wave is done when this share of its devices succeeded (0-100).
    pub success_percent: f64,
    pub failures: FailureThreshold,
    /// A device that has not reached an end this long after its assignment has failed.
    pub device_timeout_ms: u64,
    /// At most this many assignments a minute (None: a wave at once).
    pub per_minute: Option<u32>,
    /// The base bundle's manifest sha256 the release was trained on, when the controller knows
    /// it: a device whose status says it serves another base is left out, with the reason.
    #[serde(default)]
    pub base_sha256: Option<String>,
}

impl Plan {
    /// Waves of the given sizes over `devices` in a stable order (sorted): the same devices
    /// always make the same waves. The last wave takes whatever is left.
    pub fn waves_of(devices: &[String], sizes: &[usize]) -> Vec<Vec<String>> {
        let mut sorted = devices.to_vec();
        sorted.sort();
        sorted.dedup();
        let mut waves = Vec::new();
        let mut rest = sorted.as_slice();
        for (i, &size) in sizes.iter().enumerate() {
            if rest.is_empty() {
                break;
            }
            let take = if i + 1 == sizes.len() { rest.len() } else { size.min(rest.len()) };
            waves.push(rest[..take].to_vec());
            rest = &rest[take..];
        }
        if !rest.is_empty() {
            waves.push(rest.to_vec());
        }
        waves
    }
}

/// Where one device is in this rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProgress {
    pub wave: usize,
    /// The sequence number assigned, and when (unix ms); None: not assigned yet.
    pub seq: Option<u64>,
    pub assigned_ms: Option<u64>,
    /// The device's latest state for this assignment.
    pub state: Option<AgentState>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub serving_release: Option<u64>,
    pub candidate_accuracy: Option<f64>,
    pub incumbent_accuracy: Option<f64>,
    /// No end reached within the device timeout.
    pub timed_out: bool,
}

impl DeviceProgress {
    pub fn succeeded(&self) -> bool {
        matches!(self.state, Some(AgentState::Applied | AgentState::Committed | AgentState::Scored))
    }

    pub fn failed(&self) -> bool {
        self.timed_out || matches!(self.state, Some(AgentState::Refused | AgentState::Failed | AgentState::RolledBack | AgentState::Aborted))
    }

    fn ended(&self) -> bool {
        self.succeeded() || self.failed()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Phase {
    Running,
    Paused,
    /// Failures passed the threshold: no more assignments.
    Halted {
        reason: String,
    },
    Aborted,
    Completed,
}

/// An assignment to publish (retained) on the device's assign topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Assign {
    pub device: String,
    pub assignment: Assignment,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub plan: Plan,
    pub phase: Phase,
    /// The wave being rolled out (index into `plan.waves`).
    pub wave: usize,
    pub devices: BTreeMap<String, DeviceProgress>,
    /// The newest sequence number each device has seen for the task, from its status.
    pub last_seq: BTreeMap<String, u64>,
    /// Devices left out, with the reason (another base model, unknown).
    pub ineligible: BTreeMap<String, String>,
    /// When the last assignment went out (pacing).
    pub last_assign_ms: Option<u64>,
}

impl Rollout {
    pub fn new(plan: Plan, ineligible: BTreeMap<String, String>) -> Rollout {
        let devices = plan
            .waves
            .iter()
            .enumerate()
            .flat_map(|(w, devices)| devices.iter().map(move |d| (d.clone(), w)))
            .filter(|(d, _)| !ineligible.contains_key(d))
            .map(|(d, wave)| {
                let progress = DeviceProgress {
                    wave,
                    seq: None,
                    assigned_ms: None,
                    state: None,
                    reason: None,
                    message: None,
                    serving_release: None,
                    candidate_accuracy: None,
                    incumbent_accuracy: None,
                    timed_out: false,
                };
                (d, progress)
            })
            .collect();
        Rollout { plan, phase: Phase::Running, wave: 0, devices, last_seq: BTreeMap::new(), ineligible, last_assign_ms: None }
    }

    /// A device's retained status for the plan's task.
    pub fn observe(&mut self, device: &str, status: &AgentStatus) {
        if status.task != self.plan.task {
            return;
        }
        if let Some(seq) = status.seq {
            let last = self.last_seq.entry(device.to_string()).or_insert(0);
            *last = (*last).max(seq);
        }
        // A device on another base model cannot take the release: left out before it is assigned.
        if let (Some(want), Some(has)) = (&self.plan.base_sha256, &status.base_sha256)
            && want != has
            && self.devices.get(device).is_some_and(|p| p.seq.is_none())
        {
            self.devices.remove(device);
            let short = |h: &str| h.chars().take(12).collect::<String>();
            self.ineligible.insert(device.to_string(), format!("serves another base model ({}; the release needs {})", short(has), short(want)));
            return;
        }
        let Some(progress) = self.devices.get_mut(device) else { return };
        let ours = status.rollout.as_deref() == Some(self.plan.id.as_str()) && status.release == Some(self.plan.release);
        if progress.seq.is_none() || status.seq != progress.seq || !ours || progress.timed_out {
            return; // about another assignment
        }
        progress.state = Some(status.state);
        (progress.reason, progress.message, progress.serving_release) = (status.reason.clone(), status.message.clone(), status.serving_release);
        if let Some(s) = &status.scores {
            (progress.candidate_accuracy, progress.incumbent_accuracy) = (Some(s.candidate_accuracy), Some(s.incumbent_accuracy));
        }
    }

    pub fn pause(&mut self) {
        if self.phase == Phase::Running {
            self.phase = Phase::Paused;
        }
    }

    pub fn resume(&mut self) {
        if self.phase == Phase::Paused {
            self.phase = Phase::Running;
        }
    }

    pub fn abort(&mut self) {
        if matches!(self.phase, Phase::Running | Phase::Paused) {
            self.phase = Phase::Aborted;
        }
    }

    /// Advance: time out silent devices, halt on failures, finish or move to the next wave, and
    /// hand out the assignments due now.
    pub fn step(&mut self, now_ms: u64) -> Vec<Assign> {
        for p in self.devices.values_mut() {
            if let Some(at) = p.assigned_ms
                && !p.ended()
                && now_ms.saturating_sub(at) >= self.plan.device_timeout_ms
            {
                p.timed_out = true;
                (p.reason, p.message) = (Some("timeout".into()), Some(format!("no end reached within {} s", self.plan.device_timeout_ms / 1000)));
            }
        }
        if self.phase != Phase::Running {
            return Vec::new();
        }
        if let Some(reason) = self.over_threshold() {
            self.phase = Phase::Halted { reason };
            return Vec::new();
        }
        // The wave is done once enough of it succeeded and the rest ended; then the next.
        while self.wave < self.plan.waves.len() && self.wave_done(self.wave) {
            self.wave += 1;
        }
        if let Some(reason) = self.wave_short(self.wave) {
            self.phase = Phase::Halted { reason };
            return Vec::new();
        }
        if self.wave >= self.plan.waves.len() || self.devices.is_empty() {
            self.phase = Phase::Completed;
            return Vec::new();
        }
        let mut out = Vec::new();
        let due: Vec<String> = self.devices.iter().filter(|(_, p)| p.wave <= self.wave && p.seq.is_none()).map(|(d, _)| d.clone()).collect();
        for device in due {
            if let (Some(per_minute), Some(last)) = (self.plan.per_minute, self.last_assign_ms)
                && now_ms.saturating_sub(last) < 60_000 / u64::from(per_minute.max(1))
            {
                break;
            }
            let seq = self.last_seq.get(&device).copied().unwrap_or(0) + 1;
            self.last_seq.insert(device.clone(), seq);
            if let Some(p) = self.devices.get_mut(&device) {
                (p.seq, p.assigned_ms) = (Some(seq), Some(now_ms));
            }
            self.last_assign_ms = Some(now_ms);
            let assignment = self.assignment(seq, now_ms);
            out.push(Assign { device, assignment });
        }
        out
    }

    /// The plan that takes every device that applied this rollout's release back to `release`
    /// (one wave, `rollback` set so the devices take an older release).
    pub fn rollback_plan(&self, id: String, release: u64, policy: Policy) -> Plan {
        let devices: Vec<String> = self.devices.iter().filter(|(_, p)| p.succeeded()).map(|(d, _)| d.clone()).collect();
        Plan { id, release, policy, rollback: true, waves: vec![devices], per_minute: None, ..self.plan.clone() }
    }

    /// Assignments made but not yet answered: a restarted controller publishes them again
    /// (the same sequence numbers, so a device that has them already just goes on).
    pub fn outstanding(&self) -> Vec<Assign> {
        self.devices
            .iter()
            .filter(|(_, p)| p.state.is_none() && !p.timed_out)
            .filter_map(|(device, p)| {
                let (seq, at) = (p.seq?, p.assigned_ms?);
                Some(Assign { device: device.clone(), assignment: self.assignment(seq, at) })
            })
            .collect()
    }

    fn assignment(&self, seq: u64, at_ms: u64) -> Assignment {
        Assignment {
            seq,
            task: self.plan.task.clone(),
            release: self.plan.release,
            policy: self.plan.policy,
            rollback: self.plan.rollback,
            deadline_ms: Some(at_ms + self.plan.device_timeout_ms),
            rollout: Some(self.plan.id.clone()),
        }
    }

    fn wave_done(&self, wave: usize) -> bool {
        let members: Vec<&DeviceProgress> = self.devices.values().filter(|p| p.wave == wave).collect();
        if members.is_empty() {
            return true;
        }
        let succeeded = members.iter().filter(|p| p.succeeded()).count();
        let share = 100.0 * succeeded as f64 / members.len() as f64;
        share + 1e-9 >= self.plan.success_percent && members.iter().all(|p| p.ended())
    }

    /// Every device of the wave ended, too few of them well: it can never pass.
    fn wave_short(&self, wave: usize) -> Option<String> {
        let members: Vec<&DeviceProgress> = self.devices.values().filter(|p| p.wave == wave).collect();
        if members.is_empty() || !members.iter().all(|p| p.ended()) {
            return None;
        }
        let succeeded = members.iter().filter(|p| p.succeeded()).count();
        let share = 100.0 * succeeded as f64 / members.len() as f64;
        (share + 1e-9 < self.plan.success_percent)
            .then(|| format!("wave {} ended with {succeeded} of {} devices succeeded, below {} %", wave + 1, members.len(), self.plan.success_percent))
    }

    fn over_threshold(&self) -> Option<String> {
        let failed = self.devices.values().filter(|p| p.failed()).count();
        let ended = self.devices.values().filter(|p| p.ended()).count();
        let t = &self.plan.failures;
        if let Some(count) = t.count
            && failed >= count
        {
            return Some(format!("{failed} device(s) failed (the threshold is {count})"));
        }
        if let Some(percent) = t.percent
            && ended >= t.min_executed.max(1)
            && 100.0 * failed as f64 / ended as f64 > percent
        {
            return Some(format!("{failed} of {ended} devices that finished failed (over {percent} %)"));
        }
        None
    }

    /// Devices × state, for people.
    pub fn table(&self) -> String {
        let phase = match &self.phase {
            Phase::Running => "Running".to_string(),
            Phase::Paused => "Paused".to_string(),
            Phase::Halted { reason } => format!("Halted ({reason})"),
            Phase::Aborted => "Aborted".to_string(),
            Phase::Completed => "Completed".to_string(),
        };
        let wave = (self.wave + 1).min(self.plan.waves.len());
        let mut out =
            format!("rollout {} of {} release {}: {phase}, wave {wave} of {}\n", self.plan.id, self.plan.task, self.plan.release, self.plan.waves.len());
        // `serving`: the release the device serves now (not the one it was assigned).
        out += "device            wave  state        serving  holdout (new / old)  reason\n";
        for (device, p) in &self.devices {
            let state = if p.timed_out { "timed_out".to_string() } else { p.state.map_or("-".into(), |s| format!("{s:?}").to_lowercase()) };
            let figures = match (p.candidate_accuracy, p.incumbent_accuracy) {
                (Some(c), Some(i)) => format!("{c:.3} / {i:.3}"),
                _ => "-".into(),
            };
            let serving = p.serving_release.map_or("-".into(), |r| r.to_string());
            out += &format!("{device:<17} {:>4}  {state:<12} {serving:>7}  {figures:<19}  {}\n", p.wave + 1, p.reason.clone().unwrap_or_default());
        }
        for (device, why) in &self.ineligible {
            out += &format!("{device:<17}    -  ineligible         -  -                    {why}\n");
        }
        out
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Completed | Phase::Halted { .. } | Phase::Aborted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(devices: &[&str], sizes: &[usize]) -> Plan {
        let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        Plan {
            id: "r1".into(),
            task: "sorter".into(),
            release: 3,
            policy: Policy::Validate,
            rollback: false,
            waves: Plan::waves_of(&devices, sizes),
            success_percent: 100.0,
            failures: FailureThreshold { count: Some(1), percent: None, min_executed: 1 },
            device_timeout_ms: 60_000,
            per_minute: None,
            base_sha256: None,
        }
    }

    fn status(seq: u64, state: AgentState) -> AgentStatus {
        AgentStatus {
            task: "sorter".into(),
            state,
            seq: Some(seq),
            release: Some(3),
            rollout: Some("r1".into()),
            reason: (state == AgentState::Refused).then(|| "gate_refused".into()),
            message: None,
            serving_version: 1,
            serving_release: Some(3),
            bytes: None,
            scores: None,
            time_ms: 0,
            base_sha256: None,
        }
    }

    fn devices(out: &[Assign]) -> Vec<&str> {
        out.iter().map(|a| a.device.as_str()).collect()
    }

    #[test]
    fn waves_advance_when_each_one_succeeded_and_the_rollout_completes() {
        let mut r = Rollout::new(plan(&["e", "d", "c", "b", "a"], &[1, 2, 2]), BTreeMap::new());
        assert_eq!(r.plan.waves, vec![vec!["a"], vec!["b", "c"], vec!["d", "e"]], "sorted: the same devices make the same waves");
        let out = r.step(0);
        assert_eq!(devices(&out), ["a"]);
        assert_eq!((out[0].assignment.seq, out[0].assignment.deadline_ms), (1, Some(60_000)));
        assert!(r.step(1).is_empty(), "the canary has not answered");
        assert_eq!(r.outstanding(), out, "a restarted controller sends the same assignment again");
        r.observe("a", &status(1, AgentState::Downloading));
        assert!(r.step(2).is_empty());
        r.observe("a", &status(1, AgentState::Applied));
        assert_eq!(devices(&r.step(3)), ["b", "c"]);
        r.observe("b", &status(1, AgentState::Committed));
        r.observe("c", &status(1, AgentState::Applied));
        assert_eq!(devices(&r.step(4)), ["d", "e"]);
        r.observe("d", &status(1, AgentState::Applied));
        r.observe("e", &status(1, AgentState::Applied));
        assert!(r.step(5).is_empty());
        assert_eq!(r.phase, Phase::Completed);
        assert!(r.table().contains("applied"), "{}", r.table());
        let back_to = r.rollback_plan("r1-back".into(), 2, Policy::Validate);
        assert_eq!((back_to.release, back_to.rollback, back_to.waves.len(), back_to.waves[0].len()), (2, true, 1, 5), "every device that applied");
        // The state survives a restart as JSON.
        let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_refusing_canary_halts_the_rollout_before_later_waves_and_silence_times_out() {
        let mut r = Rollout::new(plan(&["a", "b", "c"], &[1, 2]), BTreeMap::new());
        // The device saw sequence 7 from an earlier rollout: the next assignment is 8.
        r.observe("a", &AgentStatus { seq: Some(7), rollout: Some("old".into()), ..status(7, AgentState::Committed) });
        let out = r.step(0);
        assert_eq!(out[0].assignment.seq, 8);
        r.observe("a", &status(8, AgentState::Refused));
        assert!(r.step(1).is_empty());
        assert!(matches!(&r.phase, Phase::Halted { reason } if reason.contains("1 device(s) failed")), "{:?}", r.phase);
        assert!(r.devices["b"].seq.is_none() && r.devices["c"].seq.is_none(), "no later wave was assigned");

        let mut r = Rollout::new(
            Plan { failures: FailureThreshold { count: None, percent: Some(50.0), min_executed: 2 }, ..plan(&["a", "b", "c"], &[2, 1]) },
            BTreeMap::new(),
        );
        assert_eq!(devices(&r.step(0)), ["a", "b"]);
        r.observe("a", &status(1, AgentState::Applied));
        r.step(30_000);
        assert_eq!(r.phase, Phase::Running, "b still has time");
        r.step(60_000);
        assert!(r.devices["b"].timed_out && r.devices["b"].failed());
        assert!(matches!(&r.phase, Phase::Halted { reason } if reason.contains("wave 1 ended with 1 of 2")), "{:?}", r.phase);
        assert!(r.devices["c"].seq.is_none());
    }

    #[test]
    fn a_device_that_reports_another_base_model_is_left_out_before_it_is_assigned() {
        let mut r = Rollout::new(Plan { base_sha256: Some("a".repeat(64)), ..plan(&["a", "b", "z"], &[1, 2]) }, BTreeMap::new());
        let on = |base: &str, seq: u64| AgentStatus { base_sha256: Some(base.repeat(64)), rollout: None, ..status(seq, AgentState::Idle) };
        r.observe("z", &on("b", 4));
        r.observe("b", &on("a", 2));
        assert!(!r.devices.contains_key("z") && r.ineligible["z"].contains("another base model"), "{:?}", r.ineligible);
        assert!(r.devices.contains_key("b"));
        assert!(r.table().contains("ineligible"));
        // Once assigned, a device's own gate refuses the release (wrong_base); the controller does not take it out.
        assert_eq!(devices(&r.step(0)), ["a"]);
        r.observe("a", &on("b", 1));
        assert!(r.devices.contains_key("a"));
        assert_eq!(r.last_seq.get("z"), Some(&4), "its sequence is still remembered");
    }

    #[test]
    fn pacing_pause_abort_and_ineligible_devices() {
        let ineligible = BTreeMap::from([("z".to_string(), "serves another base model".to_string())]);
        let mut r = Rollout::new(Plan { per_minute: Some(2), device_timeout_ms: 600_000, ..plan(&["a", "b", "c", "z"], &[4]) }, ineligible);
        assert!(!r.devices.contains_key("z") && r.table().contains("another base model"));
        assert_eq!(devices(&r.step(0)), ["a"], "two a minute: one now");
        assert!(r.step(10_000).is_empty());
        assert_eq!(devices(&r.step(30_000)), ["b"]);
        r.pause();
        assert!(r.step(90_000).is_empty());
        r.resume();
        assert_eq!(devices(&r.step(90_000)), ["c"]);
        r.abort();
        assert_eq!(r.phase, Phase::Aborted);
        assert!(r.finished() && r.step(200_000).is_empty());
    }
}
