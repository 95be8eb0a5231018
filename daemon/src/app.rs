//! The daemon's tasks under one supervisor. Each task has a name and a stage. Stopping cancels
//! one token and then waits for the stages in order: first what takes requests and samples, then
//! the task loops (which cancel their jobs), then what publishes their events, then the MQTT
//! links, which flush what was queued for them. All of it runs within one deadline. When the deadline passes, the error and the log name every task still
//! running, so "shutdown took too long" always says what was stuck.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adaptd_protocol::Event;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events::{Events, now_ms};

/// When a task stops, relative to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Takes work in: HTTP, the MQTT APIs, ingest, the watchdog, SIGHUP.
    Intake,
    /// The task loops: they finish or cancel their jobs.
    Loops,
    /// Carries the loops' last events out.
    Outbound,
    /// The MQTT links: they flush what was queued for them, then disconnect.
    Link,
}

const STAGES: [Stage; 4] = [Stage::Intake, Stage::Loops, Stage::Outbound, Stage::Link];

#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("shutdown took longer than {:.1} s; still running: {}", deadline.as_secs_f64(), still_running.join(", "))]
    Deadline { deadline: Duration, still_running: Vec<String> },
}

impl StopError {
    pub fn error_type(&self) -> &'static str {
        match self {
            StopError::Deadline { .. } => "deadline",
        }
    }
}

struct Supervised {
    stage: Stage,
    name: String,
    handle: JoinHandle<Result<(), String>>,
}

#[derive(Default)]
pub struct Supervisor {
    token: CancellationToken,
    /// Cancelled only when the stop reaches the MQTT links: they carry the other stages' last
    /// messages (acks, events) until then.
    links: CancellationToken,
    tasks: Vec<Supervised>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Completes once stopping began: what each task's own `shutdown` waits on.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// Completes once stopping reached the last stage, [`Stage::Link`]: what the MQTT links wait on.
    pub fn links_stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        self.links.clone().cancelled_owned()
    }

    /// Run `task` as `name` until it ends on its own or, after [`Supervisor::stop`] began, once
    /// its stage's turn comes. An error it ends with is logged under its name.
    pub fn spawn<E: Display>(&mut self, stage: Stage, name: impl Into<String>, task: impl Future<Output = Result<(), E>> + Send + 'static) {
        let name = name.into();
        let handle = tokio::spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.tasks.push(Supervised { stage, name, handle });
    }

    /// The same for a task that cannot fail.
    pub fn spawn_infallible(&mut self, stage: Stage, name: impl Into<String>, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn(stage, name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Cancel, then wait for each stage in turn, all within `deadline`. Err names the tasks that
    /// had not ended when it passed (they are aborted).
    pub async fn stop(mut self, deadline: Duration) -> Result<(), StopError> {
        self.token.cancel();
        let until = Instant::now() + deadline;
        for stage in STAGES {
            if stage == Stage::Link {
                self.links.cancel();
            }
            for task in self.tasks.iter_mut().filter(|t| t.stage == stage) {
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, &mut task.handle).await {
                    Ok(Ok(Ok(()))) => tracing::debug!(task = task.name, "stopped"),
                    Ok(Ok(Err(e))) => tracing::error!(task = task.name, error = %e, "stopped with an error"),
                    Ok(Err(e)) => tracing::error!(task = task.name, error = %e, "ended abnormally"),
                    Err(_) => {
                        let still_running: Vec<String> = self.tasks.iter().filter(|t| !t.handle.is_finished()).map(|t| t.name.clone()).collect();
                        tracing::error!(?still_running, deadline_s = deadline.as_secs(), "shutdown deadline passed");
                        for t in &self.tasks {
                            t.handle.abort();
                        }
                        return Err(StopError::Deadline { deadline, still_running });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether each long-running part (a task's loop, ingest) is up, for `/readyz`, `/metrics`
/// and the status: a part that stopped on an error is down, with its reason, until its restart.
#[derive(Debug, Default)]
pub struct Parts {
    parts: Mutex<BTreeMap<String, PartState>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartState {
    pub up: bool,
    /// Why it is down (none while up).
    pub reason: Option<String>,
    /// Times it was restarted after stopping on an error or a panic.
    pub restarts: u64,
    /// When it last went up or down.
    pub since_ms: u64,
}

impl Parts {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, PartState>) -> R) -> R {
        f(&mut self.parts.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// `part` runs (again).
    pub fn up(&self, part: &str) {
        self.with(|parts| {
            let state = parts.entry(part.to_string()).or_insert(PartState { up: false, reason: None, restarts: 0, since_ms: 0 });
            if !state.up {
                (state.up, state.reason, state.since_ms) = (true, None, now_ms());
            }
        });
    }

    /// `part` stopped on an error; it is restarted later.
    pub fn down(&self, part: &str, reason: &str) {
        self.with(|parts| {
            let state = parts.entry(part.to_string()).or_insert(PartState { up: true, reason: None, restarts: 0, since_ms: 0 });
            (state.up, state.reason, state.since_ms) = (false, Some(reason.to_string()), now_ms());
        });
    }

    fn restarted(&self, part: &str) {
        self.with(|parts| {
            parts.entry(part.to_string()).and_modify(|s| s.restarts += 1).or_insert(PartState { up: false, reason: None, restarts: 1, since_ms: 0 }).restarts
        });
        self.up(part);
    }

    pub fn get(&self, part: &str) -> Option<PartState> {
        self.with(|parts| parts.get(part).cloned())
    }

    pub fn snapshot(&self) -> BTreeMap<String, PartState> {
        self.with(|parts| parts.clone())
    }

    /// The parts that are down, with their reasons.
    pub fn down_now(&self) -> Vec<(String, String)> {
        self.with(|parts| parts.iter().filter(|(_, s)| !s.up).map(|(name, s)| (name.clone(), s.reason.clone().unwrap_or_default())).collect())
    }
}

/// How a part is restarted: its name, the task its events concern ("" for the daemon as a
/// whole), where its state is shown and its events go.
#[derive(Clone)]
pub struct Restarts {
    pub part: String,
    pub task: String,
    pub parts: Arc<Parts>,
    pub events: Events,
}

/// The first wait before a restart, doubled after each failure up to the longest; a run that
/// lasted [`HEALTHY_RUN`] starts the waits over.
pub const FIRST_RESTART_WAIT: Duration = Duration::from_secs(1);
pub const LONGEST_RESTART_WAIT: Duration = Duration::from_secs(30);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What a supervised part is told of its supervision.
pub enum PartChange<'a> {
    /// It stopped (reason); its restart comes after the wait.
    Down(&'a str),
    /// It is about to be started again.
    Restarting,
}

/// Run `start(stop)` until `shutdown`, restarting it with backoff whenever it ends on an error,
/// a panic, or by itself: it is shown down meanwhile (`parts`, an event, the log) and up again
/// from its restart. `change` lets the part act on each (clear its status, reconnect a link).
/// A run is its own tokio task, so a panic ends that run, not the supervision.
pub async fn restarting<F, Fut, E>(restarts: Restarts, shutdown: impl Future<Output = ()>, mut start: F, mut change: impl FnMut(PartChange<'_>))
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let Restarts { part, task, parts, events } = restarts;
    tokio::pin!(shutdown);
    let mut wait = FIRST_RESTART_WAIT;
    parts.up(&part);
    loop {
        let stop = CancellationToken::new();
        let mut run = tokio::spawn(start(stop.clone()));
        let started = Instant::now();
        let outcome = tokio::select! {
            // A run that ends because the daemon stops is not a failure to restart.
            biased;
            _ = &mut shutdown => {
                stop.cancel();
                let _ = (&mut run).await;
                return;
            }
            outcome = &mut run => outcome,
        };
        let reason = match outcome {
            Ok(Ok(())) => "it stopped by itself".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= HEALTHY_RUN {
            wait = FIRST_RESTART_WAIT;
        }
        tracing::error!(part, reason, restart_in_s = wait.as_secs(), "{part} stopped; restarting it");
        parts.down(&part, &reason);
        let restarts = parts.get(&part).map_or(0, |s| s.restarts);
        events.emit(&task, Event::PartDown { part: part.clone(), reason: reason.clone(), restart_in_s: wait.as_secs(), restarts });
        change(PartChange::Down(&reason));
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // The part's state and its event first: whoever sees the status come back up then
        // finds the restart counted and announced too.
        parts.restarted(&part);
        let restarts = parts.get(&part).map_or(0, |s| s.restarts);
        events.emit(&task, Event::PartRestarted { part: part.clone(), restarts, after: reason });
        change(PartChange::Restarting);
        wait = (wait * 2).min(LONGEST_RESTART_WAIT);
    }
}

pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn stages_stop_in_order_and_a_stuck_task_is_named() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut supervisor = Supervisor::new();
        for (stage, name) in [(Stage::Outbound, "events"), (Stage::Loops, "loop:sorter"), (Stage::Intake, "http")] {
            let (stopped, order) = (supervisor.stopped(), order.clone());
            supervisor.spawn(stage, name, async move {
                stopped.await;
                // Later stages take a moment longer, so the order shows who was waited for.
                tokio::time::sleep(Duration::from_millis(10 * stage as u64)).await;
                order.lock().unwrap().push(name);
                Ok::<(), String>(())
            });
        }
        // The link waits for its own signal, which comes only once the others have ended.
        let (links, link_order) = (supervisor.links_stopped(), order.clone());
        supervisor.spawn(Stage::Link, "mqtt", async move {
            links.await;
            link_order.lock().unwrap().push("mqtt");
            Ok::<(), String>(())
        });
        supervisor.stop(Duration::from_secs(5)).await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["http", "loop:sorter", "events", "mqtt"]);

        let mut supervisor = Supervisor::new();
        let stopped = supervisor.stopped();
        supervisor.spawn(Stage::Intake, "ingest", async move {
            stopped.await;
            Err("broker gone")
        });
        supervisor.spawn(Stage::Loops, "loop:stuck", std::future::pending::<Result<(), String>>());
        let e = supervisor.stop(Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(e.to_string(), "shutdown took longer than 0.1 s; still running: loop:stuck");
        assert_eq!(e.error_type(), "deadline");
    }
}
