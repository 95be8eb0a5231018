//! The MQTT inference API: MQTT v5 request/response.
//!
//! A client publishes a request to `{prefix}/{device}/infer/{task}` with the v5 properties
//! *response topic* and (optionally) *correlation data*; the answer is published to the response
//! topic with the same correlation data. A request without a response topic (an MQTT 3 client)
//! is answered on `{request topic}/response`. The payload is JSON, or safetensors when the
//! request's content-type property says `application/x-safetensors`. Refusals are answered too,
//! as `{"error": {...}}` with the user property `status` = `error`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use adaptd_protocol::topics::{Channel, Topics};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event};

use super::Api;
use super::wire;

#[derive(Debug, Clone)]
pub struct MqttApiConfig {
    pub broker: crate::broker::BrokerConnection,
    pub client_id: String,
    pub topics: Topics,
}

impl MqttApiConfig {
    pub fn request_filter(&self) -> String {
        self.topics.every_task(Channel::Infer)
    }
}

/// Answer inference requests until `shutdown` completes. Reconnects with backoff on its own.
pub async fn run(api: Arc<Api>, config: MqttApiConfig, shutdown: impl Future<Output = ()>) {
    let mut options = match config.broker.options_v5(config.client_id.clone()) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "MQTT inference API is off");
            return;
        }
    };
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_start(true);
    // The same body limit as HTTP. Requests up to twice the limit are read and answered
    // `too_large`; past that the broker must not send them at all (MQTT 5's maximum packet size).
    options.set_max_packet_size(Some(u32::try_from(read_limit(api.max_request_bytes())).unwrap_or(u32::MAX)));
    let (client, mut events) = AsyncClient::new(options, 64);
    let filter = config.request_filter();
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                // Re-subscribed on every connect (the session is clean), from a task of its own
                // as `broker::subscribe_in_background` does for the MQTT v3 clients: answers
                // queued while the broker was away may fill the request queue this loop drains.
                let (client, filter) = (client.clone(), filter.clone());
                tokio::spawn(async move {
                    match client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        Ok(()) => tracing::info!(filter, "MQTT inference API connected"),
                        Err(e) => tracing::warn!(error = %e, "MQTT inference API could not subscribe"),
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let (api, client, topics) = (api.clone(), client.clone(), config.topics.clone());
                tokio::spawn(async move { answer(&api, &client, &topics, publish).await });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT inference API connection lost");
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

/// What an MQTT client of ours reads: twice the body limit plus room for topic and properties.
pub fn read_limit(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(2).saturating_add(64 * 1024)
}

async fn answer(api: &Api, client: &AsyncClient, topics: &Topics, publish: Publish) {
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let Some(task) = topics.task_of(Channel::Infer, &topic) else { return };
    let props = publish.properties.unwrap_or_default();
    let response_topic = props.response_topic.clone().unwrap_or_else(|| Topics::default_response(&topic));
    let (payload, status) = match api.predict(task, &publish.payload, props.content_type.as_deref()).await {
        Ok(json) => (json, "ok"),
        Err(e) => (wire::encode_error(e.error_type(), &e.to_string()), "error"),
    };
    let reply = PublishProperties {
        correlation_data: props.correlation_data,
        content_type: Some(wire::CONTENT_JSON.into()),
        user_properties: vec![("status".into(), status.into())],
        ..Default::default()
    };
    if let Err(e) = client.publish_with_properties(response_topic, QoS::AtLeastOnce, false, Bytes::from(payload), reply).await {
        tracing::warn!(error = %e, "could not publish an inference answer");
    }
}
