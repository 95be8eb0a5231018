//! The MQTT inference API: MQTT v5 request/response, a handler on the device's MQTT 5 link.
//!
//! A client publishes a request to `{prefix}/{device}/infer/{task}` with the v5 properties
//! *response topic* and (optionally) *correlation data*; the answer is published to the response
//! topic with the same correlation data. A request without a response topic (an MQTT 3 client)
//! is answered on `{request topic}/response`. The payload is JSON, or safetensors when the
//! request's content-type property says `application/x-safetensors`. Refusals are answered too,
//! as `{"error": {...}}` with the user property `status` = `error`.

use std::future::Future;
use std::sync::Arc;

use adaptd_protocol::topics::{Channel, Topics};
use bytes::Bytes;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use tokio::sync::mpsc;

use super::Api;
use super::wire;
use crate::mqtt::v5;

/// Subscribe the MQTT 5 `link` to every task's inference requests.
pub fn subscribe(link: &mut v5::Link, topics: &Topics) -> mpsc::UnboundedReceiver<Publish> {
    link.subscribe(topics.every_task(Channel::Infer))
}

/// Answer the requests of `inbox` until `shutdown` completes, each on a task of its own (the
/// engine batches them).
pub async fn run(api: Arc<Api>, client: AsyncClient, mut inbox: mpsc::UnboundedReceiver<Publish>, topics: Topics, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let publish = tokio::select! {
            _ = &mut shutdown => return,
            p = inbox.recv() => match p { Some(p) => p, None => return },
        };
        let (api, client, topics) = (api.clone(), client.clone(), topics.clone());
        tokio::spawn(async move { answer(&api, &client, &topics, publish).await });
    }
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
