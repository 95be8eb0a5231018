//! Operator commands over MQTT, for fleets where nobody can reach the device's loopback HTTP:
//! `{prefix}/{device}/commands/{task}` with `{"command": "train" | "rollback" | "pin",
//! "version": N}` (QoS 1). Each answer is a `command_result` event on the events topic, so the
//! operator's console sees what happened next to the training events it caused.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet};
use serde::Deserialize;
use serde_json::json;

use super::Api;
use crate::adapt;
use crate::broker::BrokerConnection;
use crate::events::Events;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandMessage {
    command: String,
    version: Option<u64>,
}

/// The answer to one command message: (ok, message).
async fn execute(api: &Api, task: &str, payload: &[u8]) -> (bool, String, String) {
    let msg: CommandMessage = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => return (false, "?".into(), format!("not a command: {e}; expected {{\"command\": \"train\" | \"rollback\" | \"pin\", \"version\": N}}")),
    };
    let result = match (msg.command.as_str(), msg.version) {
        ("train", None) => api.command(task, adapt::Command::TrainNow).await,
        ("rollback", None) => api.command(task, adapt::Command::Rollback).await,
        ("pin", Some(v)) => api.command(task, |reply| adapt::Command::Pin(v, reply)).await,
        ("pin", None) => Err("pin needs \"version\"".into()),
        (other, _) => Err(format!("unknown command {other:?}; expected train, rollback or pin (with \"version\")")),
    };
    match result {
        Ok(m) => (true, msg.command, m),
        Err(m) => (false, msg.command, m),
    }
}

/// Answer commands until `shutdown`; reconnects with backoff on its own.
pub async fn run(api: Arc<Api>, broker: BrokerConnection, client_id: String, filter_prefix: String, events: Events, shutdown: impl Future<Output = ()>) {
    let mut options = match broker.options(client_id) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "MQTT operator commands are off");
            return;
        }
    };
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let filter = format!("{filter_prefix}/+");
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
                let Some(task) = p.topic.strip_prefix(&format!("{filter_prefix}/")).map(str::to_string) else { continue };
                let (api, events) = (api.clone(), events.clone());
                tokio::spawn(async move {
                    let (ok, command, message) = execute(&api, &task, &p.payload).await;
                    tracing::info!(task, command, ok, message, "operator command over MQTT");
                    events.emit("command_result", &task, json!({ "command": command, "ok": ok, "message": message, "via": "mqtt" }));
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
