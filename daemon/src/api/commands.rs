//! Operator commands over MQTT, for fleets where nobody can reach the device's loopback HTTP:
//! `{prefix}/{device}/commands/{task}` with `{"command": "train" | "rollback" | "pin",
//! "version": N, "by": "...", "issued_ms": ..., "signature": "..."}` (QoS 1), signed as
//! `control` says. Off unless `[mqtt] commands = true`. Each answer is a `command_result` event
//! on the events topic, so the operator's console sees what happened next to the training
//! events it caused; a refused one says why (bad signature, stale, replayed) and counts.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptd_protocol::topics::{Channel, Topics};
use rumqttc::{AsyncClient, Event, Packet};

use super::Api;
use crate::adapt::CommandKind;
use crate::broker::BrokerConnection;
use crate::control::CommandVerifier;
use crate::events::Events;

/// The answer to one command message: (ok, command, by, message).
async fn execute(api: &Api, verifier: &Mutex<CommandVerifier>, task: &str, payload: &[u8]) -> (bool, String, String, String) {
    if payload.len() > api.max_request_bytes() {
        return (false, "?".into(), "?".into(), format!("a command of {} bytes is over the limit of {}", payload.len(), api.max_request_bytes()));
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

/// Answer commands until `shutdown`; reconnects with backoff on its own.
pub async fn run(
    api: Arc<Api>,
    broker: BrokerConnection,
    client_id: String,
    topics: Topics,
    verifier: CommandVerifier,
    events: Events,
    shutdown: impl Future<Output = ()>,
) {
    let verifier = Arc::new(Mutex::new(verifier));
    let mut options = match broker.options(client_id) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "MQTT operator commands are off");
            return;
        }
    };
    options.set_keep_alive(Duration::from_secs(30));
    // rumqttc's default 10 KiB would drop a larger message without an answer; read what the
    // inference API reads, and refuse oversized commands with a command_result.
    let limit = super::mqtt::read_limit(api.max_request_bytes());
    options.set_max_packet_size(limit, limit);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let filter = topics.every_task(Channel::Commands);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                crate::broker::subscribe_in_background(&client, &filter, "MQTT operator commands");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(task) = topics.task_of(Channel::Commands, &p.topic).map(str::to_string) else { continue };
                let (api, events, verifier) = (api.clone(), events.clone(), verifier.clone());
                tokio::spawn(async move {
                    let (ok, command, by, message) = execute(&api, &verifier, &task, &p.payload).await;
                    tracing::info!(task, command, ok, by, message, "operator command over MQTT");
                    events.emit(&task, adaptd_protocol::Event::CommandResult { command: command.to_string(), ok, by, message, via: "mqtt".into() });
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "MQTT operator commands: connection lost; retrying");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    // Not `disconnect().await`: nothing polls the event loop any more, and a full request queue
    // would hold shutdown forever.
    let _ = client.try_disconnect();
}
