//! The MQTT 5 link, for the request/response inference API: a clean session (a request is
//! worth answering only while its client waits), acknowledged on receipt, re-subscribed on every
//! connect. The read limit is sent to the broker as MQTT 5's maximum packet size, so a larger
//! request never reaches the device.

use std::future::Future;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::mpsc;

use super::{Backoff, BrokerConnection};

pub struct Link {
    broker: BrokerConnection,
    client_id: String,
    client: AsyncClient,
    events: EventLoop,
    filters: Vec<(String, mpsc::UnboundedSender<Publish>)>,
}

impl Link {
    /// A link that reads messages up to `read_limit` bytes.
    pub fn new(broker: BrokerConnection, client_id: String, read_limit: usize) -> Link {
        let mut options = broker.options_v5(client_id.clone());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        options.set_max_packet_size(Some(u32::try_from(read_limit).unwrap_or(u32::MAX)));
        let (client, events) = AsyncClient::new(options, 64);
        Link { broker, client_id, client, events, filters: Vec::new() }
    }

    /// Messages matching `filter` (QoS 1), in arrival order.
    pub fn subscribe(&mut self, filter: String) -> mpsc::UnboundedReceiver<Publish> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.filters.push((filter, tx));
        rx
    }

    /// What handlers publish through.
    pub fn client(&self) -> AsyncClient {
        self.client.clone()
    }

    /// Keep the connection until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Link { broker, client_id, client, mut events, filters } = self;
        let subscription: Vec<Filter> = filters.iter().map(|(f, _)| Filter::new(f.clone(), QoS::AtLeastOnce)).collect();
        let mut backoff = Backoff::default();
        // Whether a connection is up, or the next poll connects.
        let mut up = false;
        tokio::pin!(shutdown);
        loop {
            // Credentials and TLS are read before each connect (rotated files are picked up).
            if !up && let Err(e) = broker.secure_v5(&mut events.options) {
                let wait = backoff.failed();
                tracing::error!(client_id, error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT 5 link cannot connect");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            let event = tokio::select! {
                _ = &mut shutdown => break,
                event = events.poll() => event,
            };
            up = event.is_ok();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.connected();
                    // From a task of its own: the request queue this loop drains may be full of
                    // answers made while the broker was away.
                    let (client, subscription) = (client.clone(), subscription.clone());
                    tokio::spawn(async move {
                        if let Err(e) = client.subscribe_many(subscription).await {
                            tracing::warn!(error = %e, "MQTT 5 link could not subscribe");
                        }
                    });
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if let Some((_, tx)) = filters.iter().find(|(f, _)| super::topic_matches(f, &topic)) {
                        let _ = tx.send(publish);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff.failed();
                    tracing::warn!(client_id, error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT 5 link lost");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        // Not `disconnect().await`: nothing polls the event loop any more, and a full request
        // queue would hold shutdown forever.
        let _ = client.try_disconnect();
    }
}
