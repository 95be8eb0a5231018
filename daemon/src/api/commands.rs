//! Operator commands over MQTT, for fleets where nobody can reach the device's loopback HTTP:
//! `{prefix}/{device}/commands/{task}` with `{"command": "train" | "rollback" | "pin",
//! "version": N, "by": "...", "issued_ms": ..., "signature": "..."}` (QoS 1), signed as
//! `control` says. Off unless `[mqtt] commands = true`. Each answer is a `command_result` event
//! on the events topic, so the operator's console sees what happened next to the training
//! events it caused; a refused one says why (bad signature, stale, replayed) and counts.

use std::future::Future;
use std::sync::{Arc, Mutex};

use adaptd_protocol::topics::{Channel, Topics};

use super::Api;
use crate::adapt::CommandKind;
use crate::control::CommandVerifier;
use crate::events::Events;
use crate::mqtt::{Ack, Inbox, Link};

/// Subscribe `link` to every task's commands, acknowledged on receipt (a command is answered
/// with an event, not redelivered). A command over the request limit arrives without its
/// payload and is refused with a `command_result` that gives its size.
pub fn subscribe(link: &mut Link, topics: &Topics, max_request_bytes: usize) -> Inbox {
    link.subscribe(topics.every_task(Channel::Commands), Ack::OnReceipt, max_request_bytes)
}

/// The answer to one command message: (ok, command, by, message).
async fn execute(api: &Api, verifier: &Mutex<CommandVerifier>, task: &str, payload: &[u8]) -> (bool, String, String, String) {
    if payload.len() > api.max_request_bytes() {
        return (false, "?".into(), "?".into(), too_large(payload.len(), api.max_request_bytes()));
    }
    let verified = verifier.lock().unwrap_or_else(std::sync::PoisonError::into_inner).verify(task, payload, crate::events::now_ms());
    let msg = match verified {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(task, error_type = e.error_type(), error = %e, "MQTT command refused");
            return (false, "?".into(), "?".into(), format!("refused ({}): {e}", e.error_type()));
        }
    };
    let by = format!("mqtt:{}", msg.by);
    let kind = match (msg.command.as_str(), msg.version) {
        ("train", None) => Ok(CommandKind::TrainNow),
        ("rollback", None) => Ok(CommandKind::Rollback),
        ("pin", Some(v)) => Ok(CommandKind::Pin(v)),
        ("pin", None) => Err("pin needs \"version\"".to_string()),
        (other, _) => Err(format!("unknown command {other:?}; expected train, rollback or pin (with \"version\")")),
    };
    let result = match kind {
        Ok(kind) => api.command(task, kind, &by).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(m) => (true, msg.command, by, m),
        Err(m) => (false, msg.command, by, m),
    }
}

/// Answer the commands of `inbox` until `shutdown`.
pub async fn run(api: Arc<Api>, mut inbox: Inbox, topics: Topics, verifier: CommandVerifier, events: Events, shutdown: impl Future<Output = ()>) {
    let verifier = Arc::new(Mutex::new(verifier));
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            _ = &mut shutdown => return,
            m = inbox.recv() => match m { Some(m) => m, None => return },
        };
        let Some(task) = topics.task_of(Channel::Commands, &message.publish.topic).map(str::to_string) else { continue };
        let (api, events, verifier) = (api.clone(), events.clone(), verifier.clone());
        tokio::spawn(async move {
            let (ok, command, by, message) = match message.oversize {
                Some(size) => (false, "?".into(), "?".into(), too_large(size, api.max_request_bytes())),
                None => execute(&api, &verifier, &task, &message.publish.payload).await,
            };
            tracing::info!(task, command, ok, by, message, "operator command over MQTT");
            events.emit(&task, adaptd_protocol::Event::CommandResult { command: command.to_string(), ok, by, message, via: "mqtt".into() });
        });
    }
}

fn too_large(size: usize, limit: usize) -> String {
    format!("a command of {size} bytes is over the limit of {limit}")
}
