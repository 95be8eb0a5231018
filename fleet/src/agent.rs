//! The device agent for one task, as a pure state machine: assignments and what the daemon
//! observed go in ([`Input`]), what to do next and what to report come out ([`Action`]). The
//! daemon's thin loop fetches, verifies, runs the gate and the watch; every decision about an
//! assignment is made here, where a unit test can walk every path.
//!
//! `queued → deferred → downloading → verifying → validating → applied → committed`, with the
//! exits `refused(reason) | failed | rolled_back | aborted`, and `scored` for the shadow policy.

use adaptd_protocol::fleet::{AgentState, AgentStatus, Assignment, Policy, Scores};
use serde::{Deserialize, Serialize};

use crate::repo::Release;

/// What the device is, for the checks a release must pass before the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// The sha256 of the base bundle's manifest this device serves.
    pub base_sha256: String,
}

/// What survives a restart (an atomic file): the newest assignment taken and how it ended, and
/// the release committed last. With it a redelivered retained assignment resumes or is
/// recognised, and an older one is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    pub last_seq: Option<u64>,
    /// The newest assignment's last reported state, and why.
    pub last_state: Option<AgentState>,
    pub last_reason: Option<String>,
    pub committed_release: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Assigned(Assignment),
    /// Whether the device may start now (None) or why it waits (training runs, over the
    /// latency budget, outside the maintenance window).
    Readiness(Option<String>),
    Progress {
        done: u64,
        total: u64,
    },
    /// The release's files are in staging, verified against the signed metadata, which
    /// describes the release as this.
    Fetched(Release),
    /// The release cannot be installed (a verification failure, a yanked or absent target).
    Refuse {
        reason: String,
        message: String,
    },
    /// Something broke on the way (network after retries, disk full).
    Fail {
        reason: String,
        message: String,
    },
    /// The gate's verdict; `promoted` is the registry version now serving it, if it was.
    Gated {
        scores: Scores,
        promoted: Option<u64>,
    },
    /// The post-promotion watch held.
    WatchHeld,
    /// The watch rolled the release back to `to_version`.
    RolledBack {
        to_version: u64,
        message: String,
    },
    /// Time passes (deadlines).
    Tick,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Find out whether the device may start; answer with [`Input::Readiness`] (again later
    /// while it waits).
    CheckReadiness,
    /// Download the release's files into staging and verify them; answer with
    /// [`Input::Fetched`], [`Input::Refuse`] or [`Input::Fail`].
    Fetch { release: u64 },
    /// Run the gate against what serves; promote unless the policy is `shadow` (and without
    /// the gate's verdict under `force`). Answer with [`Input::Gated`].
    Validate { release: u64, policy: Policy },
    /// Stop whatever runs for the previous assignment.
    Cancel,
    /// Save [`Agent::memory`] (atomically) before reporting.
    Remember(Memory),
    /// Publish this (retained).
    Report(Box<AgentStatus>),
}

#[derive(Debug, Clone)]
struct Job {
    assignment: Assignment,
    state: AgentState,
    reason: Option<String>,
    message: Option<String>,
    bytes: Option<(u64, u64)>,
    scores: Option<Scores>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    task: String,
    device: DeviceFacts,
    memory: Memory,
    job: Option<Job>,
    serving_version: u64,
    serving_release: Option<u64>,
}

impl Agent {
    pub fn new(task: &str, device: DeviceFacts, memory: Memory, serving_version: u64) -> Agent {
        let serving_release = memory.committed_release;
        Agent { task: task.into(), device, memory, job: None, serving_version, serving_release }
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// Where the task stands now.
    pub fn status(&self, now_ms: u64) -> AgentStatus {
        let job = self.job.as_ref();
        AgentStatus {
            task: self.task.clone(),
            state: job.map_or(AgentState::Idle, |j| j.state),
            seq: job.map(|j| j.assignment.seq),
            release: job.map(|j| j.assignment.release),
            rollout: job.and_then(|j| j.assignment.rollout.clone()),
            reason: job.and_then(|j| j.reason.clone()),
            message: job.and_then(|j| j.message.clone()),
            serving_version: self.serving_version,
            serving_release: self.serving_release,
            bytes: job.and_then(|j| j.bytes),
            scores: job.and_then(|j| j.scores.clone()),
            time_ms: now_ms,
            base_sha256: Some(self.device.base_sha256.clone()),
        }
    }

    /// The version serving changed outside the agent (a local promotion, an operator's pin).
    pub fn serving(&mut self, version: u64, release: Option<u64>) {
        self.serving_version = version;
        self.serving_release = release;
    }

    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        match input {
            Input::Assigned(a) => self.assigned(a, now_ms),
            Input::Tick => self.tick(now_ms),
            other => self.advance(other, now_ms),
        }
    }

    fn assigned(&mut self, a: Assignment, now_ms: u64) -> Vec<Action> {
        // A refusal of an assignment that does not replace the current job is reported about
        // that assignment alone; the job goes on.
        let refuse_alone = |agent: &Agent, a: Assignment, reason: &str, message: String| {
            let mut status = agent.status(now_ms);
            (status.state, status.seq, status.release, status.rollout) = (AgentState::Refused, Some(a.seq), Some(a.release), a.rollout);
            (status.reason, status.message, status.bytes, status.scores) = (Some(reason.into()), Some(message), None, None);
            vec![Action::Report(Box::new(status))]
        };
        if a.task != self.task {
            let message = format!("the assignment names task {:?} on the topic of {:?}", a.task, self.task);
            return refuse_alone(self, a, "task_mismatch", message);
        }
        if let Some(last) = self.memory.last_seq {
            if a.seq < last {
                let message = format!("sequence {} is older than {last}, taken already", a.seq);
                return refuse_alone(self, a, "stale_sequence", message);
            }
            if a.seq == last {
                // The retained assignment again (a reconnect, a restart): resume what did not
                // end; say again how it ended otherwise. A release applied before a restart
                // serves already: it is not installed a second time.
                return match (&self.job, self.memory.last_state) {
                    (Some(job), _) if job.assignment.seq == a.seq => Vec::new(),
                    (_, Some(state)) if state.is_final() || state == AgentState::Applied => {
                        let mut job = Job::new(a);
                        (job.state, job.reason) = (state, self.memory.last_reason.clone());
                        self.job = Some(job);
                        vec![Action::Report(Box::new(self.status(now_ms)))]
                    }
                    _ => self.start(a, now_ms),
                };
            }
        }
        let mut actions = Vec::new();
        if self.job.as_ref().is_some_and(|j| !j.state.is_final()) {
            actions.push(Action::Cancel);
        }
        self.memory.last_seq = Some(a.seq);
        self.memory.last_state = Some(AgentState::Queued);
        if a.deadline_ms.is_some_and(|d| d <= now_ms) {
            self.job = Some(Job::new(a));
            actions.extend(self.finish(AgentState::Refused, "deadline_passed", "the assignment's deadline had passed when it arrived".into(), now_ms));
            return actions;
        }
        if Some(a.release) == self.memory.committed_release {
            self.job = Some(Job::new(a));
            actions.extend(self.finish(AgentState::Committed, "already_committed", "this release serves here already".into(), now_ms));
            return actions;
        }
        if let Some(committed) = self.memory.committed_release
            && a.release < committed
            && !a.rollback
        {
            let message = format!("release {} is older than release {committed}, committed here; an operator's rollback must say so", a.release);
            self.job = Some(Job::new(a));
            actions.extend(self.finish(AgentState::Refused, "older_release", message, now_ms));
            return actions;
        }
        actions.extend(self.start(a, now_ms));
        actions
    }

    fn start(&mut self, a: Assignment, now_ms: u64) -> Vec<Action> {
        self.memory.last_seq = Some(a.seq);
        self.job = Some(Job::new(a));
        let mut actions = self.enter(AgentState::Queued, now_ms);
        actions.push(Action::CheckReadiness);
        actions
    }

    fn advance(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        let Some(job) = &mut self.job else { return Vec::new() };
        let (state, policy, release) = (job.state, job.assignment.policy, job.assignment.release);
        match (state, input) {
            (AgentState::Queued | AgentState::Deferred, Input::Readiness(Some(why))) => {
                let changed = state != AgentState::Deferred || job.message.as_deref() != Some(&why);
                job.reason = Some("deferred".into());
                job.message = Some(why);
                let mut actions = if changed { self.enter(AgentState::Deferred, now_ms) } else { Vec::new() };
                actions.push(Action::CheckReadiness);
                actions
            }
            (AgentState::Queued | AgentState::Deferred, Input::Readiness(None)) => {
                (job.reason, job.message) = (None, None);
                let mut actions = self.enter(AgentState::Downloading, now_ms);
                actions.push(Action::Fetch { release });
                actions
            }
            (AgentState::Downloading, Input::Progress { done, total }) => {
                job.bytes = Some((done, total));
                Vec::new()
            }
            (AgentState::Downloading, Input::Fetched(signed)) => {
                let mut actions = self.enter(AgentState::Verifying, now_ms);
                match self.check(&signed, policy, release) {
                    Err((reason, message)) => actions.extend(self.finish(AgentState::Refused, reason, message, now_ms)),
                    Ok(()) => {
                        actions.extend(self.enter(AgentState::Validating, now_ms));
                        actions.push(Action::Validate { release, policy });
                    }
                }
                actions
            }
            (AgentState::Downloading | AgentState::Verifying | AgentState::Validating, Input::Refuse { reason, message }) => {
                self.finish(AgentState::Refused, &reason, message, now_ms)
            }
            (s, Input::Fail { reason, message }) if !s.is_final() && s != AgentState::Applied => self.finish(AgentState::Failed, &reason, message, now_ms),
            (AgentState::Validating, Input::Gated { scores, promoted }) => {
                job.scores = Some(scores.clone());
                match (policy, promoted) {
                    (Policy::Shadow, _) => self.finish(AgentState::Scored, "shadow", scores.summary, now_ms),
                    // The round's training starts on the device once the release is scored.
                    (Policy::Train, _) => self.finish(AgentState::Scored, "training_from_it", scores.summary, now_ms),
                    (_, Some(version)) => {
                        self.serving(version, Some(release));
                        self.enter(AgentState::Applied, now_ms)
                    }
                    (Policy::Validate, None) => self.finish(AgentState::Refused, "gate_refused", scores.summary, now_ms),
                    (Policy::Force, None) => self.finish(AgentState::Failed, "not_promoted", scores.summary, now_ms),
                }
            }
            (AgentState::Applied, Input::WatchHeld) => {
                self.memory.committed_release = Some(release);
                self.finish(AgentState::Committed, "committed", "the post-promotion watch held".into(), now_ms)
            }
            (AgentState::Applied, Input::RolledBack { to_version, message }) => {
                self.serving(to_version, if to_version == 0 { None } else { self.memory.committed_release });
                self.finish(AgentState::RolledBack, "rolled_back", message, now_ms)
            }
            // Anything else is late news about a job that has moved on: nothing to do.
            _ => Vec::new(),
        }
    }

    /// The checks a verified release must pass before the gate sees it.
    fn check(&self, signed: &Release, policy: Policy, release: u64) -> Result<(), (&'static str, String)> {
        if signed.task != self.task {
            return Err(("task_mismatch", format!("the signed release is for task {:?}, not {:?}", signed.task, self.task)));
        }
        if signed.release != release {
            return Err(("release_mismatch", format!("the signed files are release {}, not {release}", signed.release)));
        }
        if signed.base_sha256 != self.device.base_sha256 {
            return Err(("wrong_base", format!("trained on base {}, this device serves base {}", short(&signed.base_sha256), short(&self.device.base_sha256))));
        }
        if policy == Policy::Force && !signed.allow_force {
            return Err(("force_not_allowed", "the signed release does not allow installing it without this device's gate".into()));
        }
        Ok(())
    }

    fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(job) = &self.job else { return Vec::new() };
        let waiting = !job.state.is_final() && job.state != AgentState::Applied;
        if waiting && job.assignment.deadline_ms.is_some_and(|d| d <= now_ms) {
            let mut actions = vec![Action::Cancel];
            actions.extend(self.finish(AgentState::Aborted, "deadline_passed", "the deadline passed before the release was applied".into(), now_ms));
            return actions;
        }
        Vec::new()
    }

    fn enter(&mut self, state: AgentState, now_ms: u64) -> Vec<Action> {
        if let Some(job) = &mut self.job {
            job.state = state;
            self.memory.last_reason = job.reason.clone();
        }
        self.memory.last_state = Some(state);
        vec![Action::Remember(self.memory.clone()), Action::Report(Box::new(self.status(now_ms)))]
    }

    fn finish(&mut self, state: AgentState, reason: &str, message: String, now_ms: u64) -> Vec<Action> {
        if let Some(job) = &mut self.job {
            (job.reason, job.message) = (Some(reason.into()), Some(message));
        }
        self.enter(state, now_ms)
    }
}

impl Job {
    fn new(assignment: Assignment) -> Job {
        Job { assignment, state: AgentState::Queued, reason: None, message: None, bytes: None, scores: None }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "base-sha-of-this-device";

    fn agent() -> Agent {
        Agent::new("sorter", DeviceFacts { base_sha256: BASE.into() }, Memory::default(), 0)
    }

    fn assign(seq: u64, release: u64, policy: Policy) -> Assignment {
        Assignment { seq, task: "sorter".into(), release, policy, rollback: false, deadline_ms: None, rollout: Some("r".into()) }
    }

    fn signed(release: u64) -> Release {
        Release { task: "sorter".into(), release, kind: "head".into(), base_sha256: BASE.into(), parent: None, allow_force: false }
    }

    fn scores(passed: bool) -> Scores {
        Scores {
            candidate_accuracy: 0.9,
            incumbent_accuracy: 0.5,
            holdout_samples: 40,
            passed,
            summary: if passed { "promoted" } else { "holdout accuracy 0.40 < 0.50" }.into(),
        }
    }

    /// The states reported, in order.
    fn reported(actions: &[Action]) -> Vec<(AgentState, Option<String>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report(s) => Some((s.state, s.reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_good_release_goes_the_whole_way_and_is_remembered() {
        let mut a = agent();
        let mut states = Vec::new();
        let out = a.handle(Input::Assigned(assign(1, 3, Policy::Validate)), 10);
        assert!(out.contains(&Action::CheckReadiness));
        states.extend(reported(&out));
        let out = a.handle(Input::Readiness(Some("training runs".into())), 11);
        states.extend(reported(&out));
        assert!(reported(&a.handle(Input::Readiness(Some("training runs".into())), 12)).is_empty(), "the same deferral is not reported twice");
        let out = a.handle(Input::Readiness(None), 13);
        assert!(out.contains(&Action::Fetch { release: 3 }));
        states.extend(reported(&out));
        a.handle(Input::Progress { done: 10, total: 20 }, 14);
        assert_eq!(a.status(15).bytes, Some((10, 20)));
        let out = a.handle(Input::Fetched(signed(3)), 16);
        assert!(out.contains(&Action::Validate { release: 3, policy: Policy::Validate }));
        states.extend(reported(&out));
        states.extend(reported(&a.handle(Input::Gated { scores: scores(true), promoted: Some(7) }, 17)));
        let out = a.handle(Input::WatchHeld, 18);
        states.extend(reported(&out));
        let names: Vec<AgentState> = states.iter().map(|s| s.0).collect();
        use AgentState::*;
        assert_eq!(names, [Queued, Deferred, Downloading, Verifying, Validating, Applied, Committed]);
        let status = a.status(19);
        assert_eq!((status.serving_version, status.serving_release), (7, Some(3)));
        assert_eq!(a.memory(), &Memory { last_seq: Some(1), last_state: Some(Committed), last_reason: Some("committed".into()), committed_release: Some(3) });
        assert!(out.contains(&Action::Remember(a.memory().clone())), "remembered before it is reported");

        // After a restart: the retained assignment again is recognised, an older one refused,
        // an older release without `rollback` refused, the same release is committed already.
        let mut b = Agent::new("sorter", DeviceFacts { base_sha256: BASE.into() }, a.memory().clone(), 7);
        assert_eq!(reported(&b.handle(Input::Assigned(assign(1, 3, Policy::Validate)), 20)), [(Committed, Some("committed".into()))]);
        assert_eq!(reported(&b.handle(Input::Assigned(assign(0, 3, Policy::Validate)), 21)), [(Refused, Some("stale_sequence".into()))]);
        // Restarted while applied (the watch still counting): it serves already, and is not
        // fetched or installed again.
        let applied = Memory { last_seq: Some(9), last_state: Some(Applied), last_reason: None, committed_release: None };
        let mut c = Agent::new("sorter", DeviceFacts { base_sha256: BASE.into() }, applied, 7);
        let out = c.handle(Input::Assigned(assign(9, 4, Policy::Validate)), 30);
        assert_eq!(reported(&out), [(Applied, None)]);
        assert!(!out.iter().any(|a| matches!(a, Action::CheckReadiness | Action::Fetch { .. })), "{out:?}");
        assert_eq!(reported(&b.handle(Input::Assigned(assign(2, 2, Policy::Validate)), 22)), [(Refused, Some("older_release".into()))]);
        assert_eq!(reported(&b.handle(Input::Assigned(assign(3, 3, Policy::Validate)), 23)), [(Committed, Some("already_committed".into()))]);
        let out = b.handle(Input::Assigned(Assignment { rollback: true, ..assign(4, 2, Policy::Validate) }), 24);
        assert!(out.contains(&Action::CheckReadiness), "an operator's rollback to an older release is taken");
    }

    #[test]
    fn every_exit_has_its_reason() {
        use AgentState::*;
        let last = |a: &mut Agent, inputs: Vec<Input>| -> (AgentState, Option<String>) {
            let mut out = Vec::new();
            for i in inputs {
                out.extend(a.handle(i, 50));
            }
            reported(&out).last().cloned().unwrap()
        };
        let to_verify = |seq, policy| vec![Input::Assigned(assign(seq, 5, policy)), Input::Readiness(None)];
        let mut a = agent();
        let wrong_base = Release { base_sha256: "another".into(), ..signed(5) };
        assert_eq!(last(&mut a, [to_verify(1, Policy::Validate), vec![Input::Fetched(wrong_base)]].concat()), (Refused, Some("wrong_base".into())));
        assert_eq!(last(&mut a, [to_verify(2, Policy::Validate), vec![Input::Fetched(signed(6))]].concat()), (Refused, Some("release_mismatch".into())));
        let other_task = Release { task: "picker".into(), ..signed(5) };
        assert_eq!(last(&mut a, [to_verify(3, Policy::Validate), vec![Input::Fetched(other_task)]].concat()), (Refused, Some("task_mismatch".into())));
        assert_eq!(last(&mut a, [to_verify(4, Policy::Force), vec![Input::Fetched(signed(5))]].concat()), (Refused, Some("force_not_allowed".into())));
        let refuse = Input::Refuse { reason: "hash_mismatch".into(), message: "x".into() };
        assert_eq!(last(&mut a, [to_verify(5, Policy::Validate), vec![refuse]].concat()), (Refused, Some("hash_mismatch".into())));
        let fail = Input::Fail { reason: "disk_full".into(), message: "x".into() };
        assert_eq!(last(&mut a, [to_verify(6, Policy::Validate), vec![fail]].concat()), (Failed, Some("disk_full".into())));
        let gated = |passed, promoted| Input::Gated { scores: scores(passed), promoted };
        assert_eq!(
            last(&mut a, [to_verify(7, Policy::Validate), vec![Input::Fetched(signed(5)), gated(false, None)]].concat()),
            (Refused, Some("gate_refused".into()))
        );
        assert_eq!(last(&mut a, [to_verify(8, Policy::Shadow), vec![Input::Fetched(signed(5)), gated(true, None)]].concat()), (Scored, Some("shadow".into())));
        let back = Input::RolledBack { to_version: 0, message: "fresh labels 0.4 < 0.8".into() };
        assert_eq!(
            last(&mut a, [to_verify(9, Policy::Validate), vec![Input::Fetched(signed(5)), gated(true, Some(4)), back]].concat()),
            (RolledBack, Some("rolled_back".into()))
        );
        assert_eq!(a.status(60).serving_version, 0, "reports the version it really serves");
        assert_eq!(a.memory().committed_release, None);
        assert_eq!(
            last(&mut a, [to_verify(15, Policy::Train), vec![Input::Fetched(signed(5)), gated(false, None)]].concat()),
            (Scored, Some("training_from_it".into()))
        );

        // Deadlines: passed on arrival, and passing while it waits (the job is cancelled).
        let late = Assignment { deadline_ms: Some(40), ..assign(16, 5, Policy::Validate) };
        assert_eq!(last(&mut a, vec![Input::Assigned(late)]), (Refused, Some("deadline_passed".into())));
        let soon = Assignment { deadline_ms: Some(100), ..assign(17, 5, Policy::Validate) };
        a.handle(Input::Assigned(soon), 50);
        a.handle(Input::Readiness(None), 60);
        let out = a.handle(Input::Tick, 100);
        assert!(out.first() == Some(&Action::Cancel) && reported(&out) == [(Aborted, Some("deadline_passed".into()))], "{out:?}");
        // A newer assignment replaces one in flight, cancelling it; a wrong task is refused alone.
        a.handle(Input::Assigned(assign(18, 5, Policy::Validate)), 110);
        let out = a.handle(Input::Assigned(assign(19, 6, Policy::Validate)), 111);
        assert_eq!(out.first(), Some(&Action::Cancel));
        let out = a.handle(Input::Assigned(Assignment { task: "picker".into(), ..assign(20, 6, Policy::Validate) }), 112);
        assert_eq!(reported(&out), [(Refused, Some("task_mismatch".into()))]);
        assert_eq!(a.status(113).seq, Some(19), "the job in flight goes on");
    }
}
