//! The daemon's tasks under one supervisor. Each task has a name and a stage. Stopping cancels
//! one token and then waits for the stages in order: first what takes requests and samples, then
//! the task loops (which cancel their jobs), then what publishes their events, then the MQTT
//! links, which flush what was queued for them. All of it runs within one deadline. When the deadline passes, the error and the log name every task still
//! running, so "shutdown took too long" always says what was stuck.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
