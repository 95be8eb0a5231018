//! The rollout controller's loop: `adaptd fleet rollout` and `adaptd fleet controller` run it on
//! the operator's machine. It reads every device's retained rollout status from the broker,
//! steps the pure `adaptd_fleet::controller::Rollout`, publishes the assignments that fall due
//! (retained, so a device that is away finds its assignment when it comes back), and saves the
//! whole state atomically after every step: a controller killed between waves comes back where
//! it was. Operators pause, resume and abort through a request file beside the state file.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptd_fleet::controller::Rollout;
use adaptd_protocol::fleet::AgentStatus;
use adaptd_protocol::topics::{Channel, Topics};

use crate::events::now_ms;
use crate::mqtt::{Ack, BrokerConnection, Link, LinkConfig};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },
}

impl ControllerError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ControllerError::State { .. } => "state",
        }
    }
}

/// An operator's request to a running controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Abort,
}

impl Request {
    fn word(self) -> &'static str {
        match self {
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Abort => "abort",
        }
    }
}

fn request_path(state: &Path) -> PathBuf {
    state.with_extension("request")
}

/// Leave `request` for the controller running on `state` (it acts within a second), and apply it
/// to the saved state too, so it holds even if no controller runs now.
pub fn request(state: &Path, request: Request) -> Result<Rollout, ControllerError> {
    let mut rollout = load(state)?;
    apply(&mut rollout, request);
    save(state, &rollout)?;
    let path = request_path(state);
    std::fs::write(&path, request.word()).map_err(|e| ControllerError::State { path, reason: e.to_string() })?;
    Ok(rollout)
}

fn apply(rollout: &mut Rollout, request: Request) {
    match request {
        Request::Pause => rollout.pause(),
        Request::Resume => rollout.resume(),
        Request::Abort => rollout.abort(),
    }
}

pub fn load(path: &Path) -> Result<Rollout, ControllerError> {
    let err = |reason: String| ControllerError::State { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| err(format!("not a rollout's state: {e}")))
}

/// Atomically: a controller restarted at any moment reads the old state or the new one.
pub fn save(path: &Path, rollout: &Rollout) -> Result<(), ControllerError> {
    let err = |reason: String| ControllerError::State { path: path.to_path_buf(), reason };
    let bytes = serde_json::to_vec_pretty(rollout).map_err(|e| err(e.to_string()))?;
    adaptd_adapters::fsutil::write_atomic(path, &bytes).map_err(|e| err(e.to_string()))
}

/// Run the rollout saved in `state` until it completes, halts or is aborted (or `shutdown`).
/// `on_change` sees the rollout whenever its table changed (the CLI prints it).
pub async fn run(
    state: &Path,
    broker: BrokerConnection,
    prefix: &str,
    mut on_change: impl FnMut(&Rollout),
    shutdown: impl Future<Output = ()>,
) -> Result<Rollout, ControllerError> {
    let mut rollout = load(state)?;
    let client_id = format!("adaptd-controller-{}", rollout.plan.id);
    let mut link = Link::new(LinkConfig { broker, client_id, persistent: false, max_outgoing_bytes: 64 * 1024, request_queue: 1024, availability: None });
    let mut statuses = link.subscribe(Topics::fleet_wide(prefix, Channel::Rollout), Ack::OnReceipt, 256 * 1024);
    let handle = link.handle();
    let stop = tokio_util::sync::CancellationToken::new();
    let link_task = tokio::spawn(link.run(stop.clone().cancelled_owned()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = String::new();
    // Nothing is assigned before the devices' retained statuses are in: a device's next
    // sequence number is one past the newest it reported, and reusing one would read as the
    // old assignment again.
    let subscribed = statuses.subscribed();
    let mut ready_at: Option<std::time::Instant> = None;
    let mut sent_outstanding = false;
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            message = statuses.recv() => {
                let Some(message) = message else { break Ok(()) };
                let topic = message.publish.topic.clone();
                let device = topic.strip_prefix(&format!("{}/", prefix.trim_end_matches('/'))).and_then(|rest| rest.split('/').next()).unwrap_or_default();
                match serde_json::from_slice::<AgentStatus>(&message.publish.payload) {
                    Ok(status) => rollout.observe(device, &status),
                    Err(e) => tracing::warn!(topic, error = %e, "not a rollout status; ignored"),
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        match ready_at {
            None if subscribed.load(std::sync::atomic::Ordering::Relaxed) => {
                ready_at = Some(std::time::Instant::now() + Duration::from_secs(1));
                continue;
            }
            None => continue,
            Some(at) if std::time::Instant::now() < at => continue,
            Some(_) if !sent_outstanding => {
                sent_outstanding = true;
                for assign in rollout.outstanding() {
                    publish(&handle, prefix, &assign).await;
                }
            }
            Some(_) => {}
        }
        if let Ok(word) = std::fs::read_to_string(request_path(state)) {
            let _ = std::fs::remove_file(request_path(state));
            match word.trim() {
                "pause" => apply(&mut rollout, Request::Pause),
                "resume" => apply(&mut rollout, Request::Resume),
                "abort" => apply(&mut rollout, Request::Abort),
                other => tracing::warn!(request = other, "unknown controller request; ignored"),
            }
        }
        let due = rollout.step(now_ms());
        // Saved before the assignments go out: a restart never assigns a sequence twice.
        if let Err(e) = save(state, &rollout) {
            break Err(e);
        }
        for assign in due {
            publish(&handle, prefix, &assign).await;
        }
        let table = rollout.table();
        if table != shown {
            on_change(&rollout);
            shown = table;
        }
        if rollout.finished() {
            break Ok(());
        }
    };
    stop.cancel();
    let _ = link_task.await;
    result.map(|()| rollout)
}

/// Publish an assignment, retained, on the device's assign topic.
async fn publish(link: &crate::mqtt::LinkHandle, prefix: &str, assign: &adaptd_fleet::controller::Assign) {
    let topic = Topics::new(prefix, &assign.device).task(Channel::Assign, &assign.assignment.task);
    let payload = serde_json::to_vec(&assign.assignment).unwrap_or_default();
    if let Err(e) = link.publish(topic, payload, true).await {
        tracing::error!(device = assign.device, error = %e, "could not publish an assignment");
    }
}
