//! The fleet agent: a handler on the device's MQTT link that takes the controller's retained
//! assignments (`{prefix}/{device}/assign/{task}`), and for each task drives the pure state
//! machine of `adaptd_fleet::agent`: it fetches the named release from the signed repository
//! (`adaptd_fleet::fetch`: TUF, resumable), hands it to the task's loop to be judged by the same
//! gate as a local candidate and promoted as the policy says, follows the post-promotion watch,
//! and reports every state, retained, on `{prefix}/{device}/rollout/{task}` and as a `rollout`
//! event. Nothing serving changes before a release is verified; the loop alone promotes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use adaptd_fleet::agent::{Action, Agent, DeviceFacts, Input, Memory};
use adaptd_fleet::fetch::{self, Progress, Source};
use adaptd_protocol::fleet::{AgentState, AgentStatus, Assignment};
use adaptd_protocol::topics::{Channel, Topics};
use adaptd_protocol::{Event, SchedulerState};
use tokio::sync::{mpsc, oneshot};

use super::FleetConfig;
use crate::adapt::Install;
use crate::api::TaskControl;
use crate::events::{Events, now_ms};
use crate::mqtt::{Ack, Inbox, Link, LinkHandle};

/// The largest assignment message read (they are a few hundred bytes).
const MAX_ASSIGNMENT_BYTES: usize = 16 * 1024;

/// Subscribe `link` to every task's assignment, acknowledged on receipt (they are retained: the
/// broker keeps the newest for the next connect).
pub fn subscribe(link: &mut Link, topics: &Topics) -> Inbox {
    link.subscribe(topics.every_task(Channel::Assign), Ack::OnReceipt, MAX_ASSIGNMENT_BYTES)
}

/// What the agent needs from the rest of the daemon.
pub struct AgentParts {
    pub config: FleetConfig,
    /// `<state>/fleet`: each task's memory, the TUF datastore, staging.
    pub dir: PathBuf,
    pub topics: Topics,
    pub link: LinkHandle,
    pub inbox: Inbox,
    /// The tasks that adapt: their loops judge and promote releases.
    pub control: BTreeMap<String, TaskControl>,
    pub events: Events,
    /// The sha256 of the base bundle's manifest this device serves.
    pub base_sha256: String,
    /// What serves each task now (its version), at start.
    pub serving: BTreeMap<String, u64>,
    /// Serving's latency, to defer while it is over budget.
    pub engine: crate::engine::EngineHandle,
    /// `schedule.latency_budget_ms` (0: none).
    pub latency_budget_ms: f64,
}

/// What a task's agent is doing in the background, and for which assignment.
struct Running {
    seq: Option<u64>,
    abort: tokio::task::AbortHandle,
    progress: Option<Arc<Progress>>,
}

/// Run the agent until `shutdown`.
pub async fn run(parts: AgentParts, shutdown: impl Future<Output = ()>) {
    let AgentParts { config, dir, topics, link, mut inbox, control, events, base_sha256, serving, engine, latency_budget_ms } = parts;
    let (base_url, window, offers) = match (config.base_url(), config.window(), config.offers_url()) {
        (Ok(u), Ok(w), Ok(o)) => (u, w, o),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
            tracing::error!(error = e, "fleet rollout is off: its configuration is not usable");
            return;
        }
    };
    let agents = control
        .keys()
        .map(|task| {
            let facts = DeviceFacts { base_sha256: base_sha256.clone() };
            (task.clone(), Agent::new(task, facts, read_memory(&dir, task), serving.get(task).copied().unwrap_or(0)))
        })
        .collect();
    let source = Source {
        base_url,
        root: config.root_file.clone(),
        datastore: dir.join("tuf"),
        staging: dir.join("staging"),
        max_release_bytes: config.max_release_mb.saturating_mul(1 << 20),
        ca: (!config.ca_file.as_os_str().is_empty()).then(|| config.ca_file.clone()),
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut local = events.subscribe();
    let reporter = Reporter { link, topics: topics.clone(), events, dir };
    let mut agent_loop = AgentLoop {
        agents,
        source,
        control,
        reporter,
        done: done_tx,
        running: BTreeMap::new(),
        fetched: BTreeMap::new(),
        waiting: BTreeSet::new(),
        readiness: Readiness { engine, latency_budget_ms, window },
        offer_to: offers.map(|base| crate::adapt::OfferTo { base, device: topics.device().to_string() }),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let inputs = tokio::select! {
            _ = &mut shutdown => break,
            message = inbox.recv() => match message {
                Some(message) => agent_loop.assignment(&topics, &message),
                None => break,
            },
            done = done_rx.recv() => match done {
                Some(done) => agent_loop.finished(done),
                None => break,
            },
            event = local.recv() => match event {
                Ok(record) => agent_loop.watch_event(&record),
                Err(_) => Vec::new(),
            },
            _ = tick.tick() => agent_loop.tick(),
        };
        for (task, input) in inputs {
            agent_loop.handle(&task, input);
        }
    }
    for r in agent_loop.running.values() {
        r.abort.abort();
    }
}

/// An assignment as it arrives (`oversize`: its size when it was over the limit and its bytes
/// were dropped), or why it is not one.
pub fn decode_assignment(payload: &[u8], oversize: Option<usize>) -> Result<Assignment, String> {
    match oversize {
        Some(size) => Err(format!("an assignment of {size} bytes is over the limit of {MAX_ASSIGNMENT_BYTES}")),
        None => serde_json::from_slice::<Assignment>(payload).map_err(|e| e.to_string()),
    }
}

/// Background work that finished: (task, the assignment's sequence number, what came of it).
type Done = (String, Option<u64>, Input);

/// The agents and what they have going, driven by one task.
struct AgentLoop {
    agents: BTreeMap<String, Agent>,
    source: Source,
    control: BTreeMap<String, TaskControl>,
    reporter: Reporter,
    done: mpsc::UnboundedSender<Done>,
    running: BTreeMap<String, Running>,
    /// Where each task's fetched release waits for its loop.
    fetched: BTreeMap<String, PathBuf>,
    /// Tasks whose agent waits to hear whether it may start.
    waiting: BTreeSet<String>,
    readiness: Readiness,
    /// Where fleet-learning rounds' adapters are offered (`[fleet] offers`).
    offer_to: Option<crate::adapt::OfferTo>,
}

/// What makes a device wait besides a training job.
struct Readiness {
    engine: crate::engine::EngineHandle,
    latency_budget_ms: f64,
    window: Option<(u32, u32)>,
}

impl AgentLoop {
    /// A message on an assign topic, as agent input (or refused here, before any agent).
    fn assignment(&self, topics: &Topics, message: &crate::mqtt::Inbound) -> Vec<(String, Input)> {
        let Some(task) = topics.task_of(Channel::Assign, &message.publish.topic).map(str::to_string) else { return Vec::new() };
        let Some(agent) = self.agents.get(&task) else {
            self.reporter.refused_alone(&task, None, "unknown_task", format!("this device does not adapt task {task:?}"), now_ms());
            return Vec::new();
        };
        if message.publish.payload.is_empty() {
            return Vec::new(); // a retained assignment cleared by the controller
        }
        match decode_assignment(&message.publish.payload, message.oversize) {
            Ok(a) => vec![(task, Input::Assigned(a))],
            Err(e) => {
                self.reporter.refused_alone(&task, Some(agent), "malformed", format!("not an assignment: {e}"), now_ms());
                Vec::new()
            }
        }
    }

    /// Background work finished; late news about an assignment that was replaced is dropped.
    fn finished(&mut self, (task, seq, input): Done) -> Vec<(String, Input)> {
        if self.agents.get(&task).is_none_or(|a| a.status(0).seq != seq) {
            return Vec::new();
        }
        if let Input::Fetched(r) = &input {
            self.fetched.insert(task.clone(), self.source.staging.join(format!("{task}.r{}", r.release)));
        }
        self.running.remove(&task);
        vec![(task, input)]
    }

    /// The loop's watch on a release an agent applied: held, or rolled back.
    fn watch_event(&self, record: &adaptd_protocol::EventRecord) -> Vec<(String, Input)> {
        let Some(agent) = self.agents.get(&record.task) else { return Vec::new() };
        let status = agent.status(0);
        if status.state != AgentState::Applied {
            return Vec::new();
        }
        let input = match &record.event {
            Event::WatchPassed { version, .. } if *version == status.serving_version => Input::WatchHeld,
            Event::RolledBack { from_version, to_version, reason, .. } if *from_version == status.serving_version => {
                Input::RolledBack { to_version: *to_version, message: reason.clone() }
            }
            _ => return Vec::new(),
        };
        vec![(record.task.clone(), input)]
    }

    /// Every second: readiness for those waiting, deadlines, download progress.
    fn tick(&mut self) -> Vec<(String, Input)> {
        let mut inputs = Vec::new();
        for task in std::mem::take(&mut self.waiting) {
            let busy = self
                .control
                .get(&task)
                .and_then(|c| busy_reason(&c.status.borrow()))
                .or_else(|| over_latency_budget(self.readiness.engine.stats().recent_p99_ms(), self.readiness.latency_budget_ms))
                .or_else(|| outside_window(self.readiness.window, now_ms()));
            inputs.push((task, Input::Readiness(busy)));
        }
        inputs.extend(self.agents.keys().map(|task| (task.clone(), Input::Tick)));
        for (task, r) in &self.running {
            if let (Some(progress), Some(agent)) = (&r.progress, self.agents.get(task)) {
                let mut status = agent.status(now_ms());
                if status.state == AgentState::Downloading {
                    status.bytes = Some((progress.done.load(std::sync::atomic::Ordering::Relaxed), progress.total.load(std::sync::atomic::Ordering::Relaxed)));
                    self.reporter.publish(&status);
                }
            }
        }
        inputs
    }

    /// Give `input` to the task's agent and carry out what it decides.
    fn handle(&mut self, task: &str, input: Input) {
        let Some(agent) = self.agents.get_mut(task) else { return };
        let actions = agent.handle(input, now_ms());
        let seq = agent.status(0).seq;
        for action in actions {
            match action {
                Action::CheckReadiness => {
                    self.waiting.insert(task.to_string());
                }
                Action::Fetch { release } => self.fetch(task, seq, release),
                Action::Validate { release, policy } => self.validate(task, seq, release, policy),
                Action::Cancel => {
                    if let Some(r) = self.running.remove(task) {
                        tracing::info!(task, seq = r.seq, "fleet: the previous assignment's work is cancelled");
                        r.abort.abort();
                    }
                    self.waiting.remove(task);
                }
                Action::Remember(memory) => self.reporter.remember(task, &memory),
                Action::Report(status) => self.reporter.report(&status),
            }
        }
    }

    fn fetch(&mut self, task: &str, seq: Option<u64>, release: u64) {
        let progress = Arc::new(Progress::default());
        let (source, done, task_name, p) = (self.source.clone(), self.done.clone(), task.to_string(), progress.clone());
        let handle = tokio::spawn(async move {
            let input = match fetch::fetch(&source, &task_name, release, p).await {
                Ok(f) => Input::Fetched(f.release),
                Err(e) if e.refused => Input::Refuse { reason: e.reason.into(), message: e.message },
                Err(e) => Input::Fail { reason: e.reason.into(), message: e.message },
            };
            let _ = done.send((task_name, seq, input));
        });
        self.running.insert(task.to_string(), Running { seq, abort: handle.abort_handle(), progress: Some(progress) });
    }

    /// The task's loop judges the fetched release and promotes it as the policy says.
    fn validate(&mut self, task: &str, seq: Option<u64>, release: u64, policy: adaptd_protocol::fleet::Policy) {
        let (Some(control), Some(dir)) = (self.control.get(task), self.fetched.get(task).cloned()) else { return };
        let (installs, done, task_name) = (control.installs.clone(), self.done.clone(), task.to_string());
        let offer_to = self.offer_to.clone().filter(|_| policy == adaptd_protocol::fleet::Policy::Train);
        let handle = tokio::spawn(async move {
            let (reply, answer) = oneshot::channel();
            let stopped = || Input::Fail { reason: "stopped".into(), message: "the task's loop stopped".into() };
            let input = match installs.send(Install { dir, release, policy, offer_to, reply }).await {
                Err(_) => stopped(),
                Ok(()) => match answer.await {
                    Ok(Ok(installed)) => Input::Gated { scores: installed.scores, promoted: installed.promoted },
                    Ok(Err(message)) => Input::Refuse { reason: "install_refused".into(), message },
                    Err(_) => stopped(),
                },
            };
            let _ = done.send((task_name, seq, input));
        });
        self.running.insert(task.to_string(), Running { seq, abort: handle.abort_handle(), progress: None });
    }
}

/// Why a task cannot take a release now, if it cannot.
fn busy_reason(status: &adaptd_protocol::TaskStatus) -> Option<String> {
    match &status.scheduler {
        SchedulerState::Training { .. } => Some("a training job runs".into()),
        _ => None,
    }
}

/// Serving's p99 over the budget: installing now would add to it.
fn over_latency_budget(p99_ms: Option<f64>, budget_ms: f64) -> Option<String> {
    let p99 = p99_ms?;
    (budget_ms > 0.0 && p99 > budget_ms).then(|| format!("serving p99 {p99:.1} ms is over the {budget_ms:.1} ms budget"))
}

fn outside_window(window: Option<(u32, u32)>, now_ms: u64) -> Option<String> {
    let (from, to) = window?;
    let minute = ((now_ms / 60_000) % (24 * 60)) as u32;
    (!super::in_window((from, to), minute))
        .then(|| format!("outside the maintenance window {:02}:{:02}-{:02}:{:02} UTC", from / 60, from % 60, to / 60, to % 60))
}

/// Says what the agents do: retained status on MQTT, an event, and the memory on disk.
struct Reporter {
    link: LinkHandle,
    topics: Topics,
    events: Events,
    dir: PathBuf,
}

impl Reporter {
    fn report(&self, status: &AgentStatus) {
        self.publish(status);
        self.events.emit(
            &status.task,
            Event::Rollout {
                state: status.state,
                seq: status.seq,
                release: status.release,
                reason: status.reason.clone(),
                message: status.message.clone(),
                serving_version: status.serving_version,
                serving_release: status.serving_release,
                scores: status.scores.clone(),
            },
        );
    }

    fn publish(&self, status: &AgentStatus) {
        let payload = serde_json::to_vec(status).unwrap_or_default();
        if let Err(e) = self.link.try_publish(self.topics.task(Channel::Rollout, &status.task), payload, true) {
            tracing::warn!(task = status.task, error = %e, "could not publish the rollout status");
        }
    }

    /// An assignment refused before it reached an agent (malformed, an unknown task).
    fn refused_alone(&self, task: &str, agent: Option<&Agent>, reason: &str, message: String, now: u64) {
        tracing::warn!(task, reason, message, "fleet assignment refused");
        let mut status = match agent {
            Some(a) => a.status(now),
            None => AgentStatus {
                task: task.into(),
                state: AgentState::Idle,
                seq: None,
                release: None,
                rollout: None,
                reason: None,
                message: None,
                serving_version: 0,
                serving_release: None,
                bytes: None,
                scores: None,
                time_ms: now,
                base_sha256: None,
            },
        };
        (status.state, status.seq, status.release, status.bytes, status.scores) = (AgentState::Refused, None, None, None, None);
        (status.reason, status.message) = (Some(reason.into()), Some(message));
        self.report(&status);
    }

    fn remember(&self, task: &str, memory: &Memory) {
        if let Err(e) = write_memory(&self.dir, task, memory) {
            tracing::error!(task, error = %e, "could not save the fleet agent's memory; a restart may redo the last assignment");
        }
    }
}

fn memory_path(dir: &Path, task: &str) -> PathBuf {
    dir.join(format!("{task}.json"))
}

fn read_memory(dir: &Path, task: &str) -> Memory {
    let path = memory_path(dir, task);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(task, path = %path.display(), error = %e, "unreadable fleet memory; starting without it");
            Memory::default()
        }),
        Err(_) => Memory::default(),
    }
}

/// Atomically (the memory is read at boot).
fn write_memory(dir: &Path, task: &str, memory: &Memory) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec_pretty(memory).map_err(std::io::Error::other)?;
    adaptd_adapters::fsutil::write_atomic(&memory_path(dir, task), &bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_round_trips_and_an_unreadable_one_starts_the_agent_afresh() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_memory(dir.path(), "sorter"), Memory::default(), "none yet");
        let memory = Memory { last_seq: Some(4), last_state: Some(AgentState::Committed), last_reason: Some("committed".into()), committed_release: Some(2) };
        write_memory(dir.path(), "sorter", &memory).unwrap();
        assert_eq!(read_memory(dir.path(), "sorter"), memory);
        std::fs::write(memory_path(dir.path(), "sorter"), b"{\"last_seq\": 4, \"colour\": 1}").unwrap();
        assert_eq!(read_memory(dir.path(), "sorter"), Memory::default(), "refused by name in the log, not trusted");
    }

    #[test]
    fn a_release_waits_while_serving_is_over_budget_or_outside_the_window() {
        assert_eq!(over_latency_budget(Some(80.0), 50.0).as_deref(), Some("serving p99 80.0 ms is over the 50.0 ms budget"));
        assert_eq!(over_latency_budget(Some(80.0), 0.0), None, "no budget");
        assert_eq!(over_latency_budget(None, 50.0), None, "nothing served yet");
        let noon = 12 * 3_600_000;
        assert_eq!(outside_window(Some((120, 240)), noon).as_deref(), Some("outside the maintenance window 02:00-04:00 UTC"));
        assert_eq!(outside_window(Some((11 * 60, 13 * 60)), noon), None);
        assert_eq!(outside_window(None, noon), None);
    }
}
