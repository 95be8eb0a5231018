//! The MQTT 3.1.1 link: one connection for ingest, operator commands and events.
//!
//! Handlers subscribe before the link runs ([`Link::subscribe`]); on every connect the link
//! subscribes to all their filters in one SUBSCRIBE, and each message goes to the inbox of the
//! first subscription whose filter matches. Acknowledgements are manual: a subscription either
//! acknowledges each message itself once done with it ([`Ack::Handler`]: ingest, after the
//! commit) or lets the link acknowledge on receipt ([`Ack::OnReceipt`]: commands). A message
//! no subscription wants (a leftover of an older persistent session) is acknowledged and counted.
//!
//! A message over its subscription's size limit reaches the handler without its payload, with
//! its size, so the handler can refuse it with a reason and acknowledge it. One over the link's
//! read limit breaks the connection before it is decoded, and a persistent session redelivers it
//! first on every reconnect: the link then reads once at that message's size (the broker's limit
//! bounds it) and goes back to the usual limit after it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::{Notify, mpsc};

use super::{Backoff, BrokerConnection, topic_matches};

/// The largest MQTT packet there is (a 256 MiB remaining length plus its fixed header).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;
/// Room for the topic and the packet's headers on top of a payload limit.
const PACKET_OVERHEAD: usize = 1024;

#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub broker: BrokerConnection,
    /// Stable across restarts: a persistent session lives under it at the broker.
    pub client_id: String,
    /// Keep the session across reconnects and restarts, so the broker holds every message not
    /// yet acknowledged (ingest needs this; without it a clean session is enough).
    pub persistent: bool,
    /// The largest message this link publishes (a gate decision with per-class figures).
    pub max_outgoing_bytes: usize,
    /// Requests (publishes, acks) that may wait for the event loop before a sender waits.
    pub request_queue: usize,
    /// Where the link says whether the device is online (retained): `online` on every connect,
    /// `offline` when it stops, and the broker says `offline` for it (its last will) when the
    /// connection dies. None: not said.
    pub availability: Option<String>,
}

/// Who acknowledges a subscription's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The handler, with [`LinkHandle::ack`], once it is done with the message (ingest: once
    /// the sample is durable). Until then the broker counts it against its in-flight window.
    Handler,
    /// The link, as it hands the message on.
    OnReceipt,
}

/// A message as a handler receives it.
#[derive(Debug)]
pub struct Inbound {
    /// The message; its payload is empty when `oversize` is set.
    pub publish: Publish,
    /// The payload's size when it was over the subscription's limit. Only its size is kept, so
    /// at most one oversized message is ever in memory.
    pub oversize: Option<usize>,
    /// The connection it arrived on: an ack on a later connection would name another message.
    connection: u64,
}

/// The messages of one subscription, and whether the broker granted it on this connection.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Inbound>,
    subscribed: Arc<AtomicBool>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Inbound> {
        self.rx.try_recv().ok()
    }

    /// True while the broker has granted this subscription on the current connection.
    pub fn subscribed(&self) -> Arc<AtomicBool> {
        self.subscribed.clone()
    }
}

/// The link's state, for readiness and metrics.
#[derive(Debug, Default)]
pub struct LinkStatus {
    pub connected: AtomicBool,
    /// Connections made so far (the first one included).
    pub connections: AtomicU64,
    /// Messages that no subscription wanted (acknowledged and dropped).
    pub unrouted: AtomicU64,
    /// The link stopped connected, and wrote everything queued for it before its DISCONNECT.
    pub flushed: AtomicBool,
}

struct Route {
    filter: String,
    ack: Ack,
    max_payload: usize,
    tx: mpsc::UnboundedSender<Inbound>,
    subscribed: Arc<AtomicBool>,
}

/// What handlers publish and acknowledge through; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    client: AsyncClient,
    status: Arc<LinkStatus>,
    reconnect: Arc<Notify>,
}

impl LinkHandle {
    /// Publish at QoS 1; waits while the request queue is full (never call it from the loop).
    pub async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), rumqttc::ClientError> {
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await
    }

    /// Publish at QoS 1 if the request queue has room now (shutdown: nothing may wait).
    pub fn try_publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), rumqttc::ClientError> {
        self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload)
    }

    /// Acknowledge a message of an [`Ack::Handler`] subscription. One that arrived on an
    /// earlier connection is not acknowledged: the broker redelivers it on the new one.
    pub async fn ack(&self, message: &Inbound) {
        if message.connection != self.status.connections.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.client.ack(&message.publish).await {
            tracing::warn!(error = %e, topic = message.publish.topic, "could not acknowledge a message; the broker will redeliver it");
        }
    }

    /// Drop the connection and make a new one: a persistent session then redelivers whatever
    /// was not acknowledged (a handler that lost messages it had not finished asks for this).
    pub fn reconnect(&self) {
        self.reconnect.notify_one();
    }

    pub fn status(&self) -> Arc<LinkStatus> {
        self.status.clone()
    }
}

pub struct Link {
    config: LinkConfig,
    client: AsyncClient,
    events: EventLoop,
    routes: Vec<Route>,
    status: Arc<LinkStatus>,
    reconnect: Arc<Notify>,
}

impl Link {
    pub fn new(config: LinkConfig) -> Link {
        let mut options = config.broker.options(config.client_id.clone());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(!config.persistent);
        options.set_manual_acks(true);
        if let Some(topic) = &config.availability {
            options.set_last_will(rumqttc::LastWill::new(topic, adaptd_protocol::fleet::OFFLINE, QoS::AtLeastOnce, true));
        }
        let (client, events) = AsyncClient::new(options, config.request_queue.max(16));
        Link { config, client, events, routes: Vec::new(), status: Arc::default(), reconnect: Arc::default() }
    }

    /// Route messages matching `filter` (QoS 1) to the returned inbox. Payloads over
    /// `max_payload` arrive without their bytes, with `oversize` set.
    pub fn subscribe(&mut self, filter: String, ack: Ack, max_payload: usize) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let subscribed = Arc::new(AtomicBool::new(false));
        self.routes.push(Route { filter, ack, max_payload, tx, subscribed: subscribed.clone() });
        Inbox { rx, subscribed }
    }

    pub fn handle(&self) -> LinkHandle {
        LinkHandle { client: self.client.clone(), status: self.status.clone(), reconnect: self.reconnect.clone() }
    }

    /// Keep the connection until `shutdown`, then leave cleanly: what handlers queued before
    /// (the last events) goes out ahead of the DISCONNECT, within a second.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Link { config, client, mut events, routes, status, reconnect } = self;
        let read_limit = routes.iter().map(|r| r.max_payload).max().unwrap_or(0).saturating_add(PACKET_OVERHEAD);
        events.mqtt_options.set_max_packet_size(read_limit, config.max_outgoing_bytes.saturating_add(PACKET_OVERHEAD));
        let filters: Vec<SubscribeFilter> = routes.iter().map(|r| SubscribeFilter::new(r.filter.clone(), QoS::AtLeastOnce)).collect();
        let disconnected = || {
            status.connected.store(false, Ordering::Relaxed);
            routes.iter().for_each(|r| r.subscribed.store(false, Ordering::Relaxed));
        };
        let mut backoff = Backoff::default();
        let mut connection = 0;
        tokio::pin!(shutdown);
        loop {
            // Credentials and TLS are read before each connect: unreadable files (not yet
            // provisioned, or mid-rotation) are retried like a broker that is away.
            if events.network.is_none()
                && let Err(e) = config.broker.secure(&mut events.mqtt_options)
            {
                let wait = backoff.failed();
                tracing::error!(client_id = config.client_id, error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT link cannot connect");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            let event = tokio::select! {
                _ = &mut shutdown => break,
                _ = reconnect.notified() => {
                    tracing::info!(client_id = config.client_id, "MQTT link reconnecting, so the broker redelivers what is unacknowledged");
                    events.clean();
                    disconnected();
                    continue;
                }
                event = events.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.connected();
                    connection = status.connections.fetch_add(1, Ordering::AcqRel) + 1;
                    status.connected.store(true, Ordering::Relaxed);
                    tracing::info!(client_id = config.client_id, session_present = ack.session_present, "MQTT link connected");
                    if !filters.is_empty() {
                        subscribe_in_background(&client, filters.clone());
                    }
                    if let Some(topic) = &config.availability {
                        let (client, topic) = (client.clone(), topic.clone());
                        tokio::spawn(async move { client.publish(topic, QoS::AtLeastOnce, true, adaptd_protocol::fleet::ONLINE).await });
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    for (route, code) in routes.iter().zip(&ack.return_codes) {
                        match code {
                            SubscribeReasonCode::Success(_) => route.subscribed.store(true, Ordering::Relaxed),
                            SubscribeReasonCode::Failure => tracing::error!(filter = route.filter, "the broker refused the subscription (check its ACL)"),
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(mut publish))) => {
                    let size = publish.payload.len();
                    if size > read_limit {
                        // Read once to refuse it; the next connection reads at the usual limit.
                        events.mqtt_options.set_max_packet_size(read_limit, config.max_outgoing_bytes.saturating_add(PACKET_OVERHEAD));
                    }
                    let Some(route) = routes.iter().find(|r| topic_matches(&r.filter, &publish.topic)) else {
                        status.unrouted.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(topic = publish.topic, "no subscription wants this message; acknowledged and dropped");
                        ack_in_background(&client, publish);
                        continue;
                    };
                    let oversize = (size > route.max_payload).then_some(size);
                    if oversize.is_some() {
                        publish.payload = bytes::Bytes::new();
                    }
                    if route.ack == Ack::OnReceipt {
                        ack_in_background(&client, publish.clone());
                    }
                    // A handler that has stopped leaves its messages unacknowledged, with the broker.
                    let _ = route.tx.send(Inbound { publish, oversize, connection });
                }
                Ok(_) => {}
                Err(e) => {
                    disconnected();
                    if let Some(size) = oversized_packet(&e) {
                        let once = size.saturating_add(PACKET_OVERHEAD).min(MQTT_MAX_PACKET);
                        tracing::warn!(
                            size,
                            limit = read_limit,
                            "a message over the read limit is waiting; reading it once to refuse it (set the broker's message_size_limit to bound this)"
                        );
                        events.mqtt_options.set_max_packet_size(once, config.max_outgoing_bytes.saturating_add(PACKET_OVERHEAD));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let wait = backoff.failed();
                    tracing::warn!(client_id = config.client_id, error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT link lost");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        disconnected();
        if status.connections.load(Ordering::Relaxed) == 0 {
            return;
        }
        // A clean disconnect does not fire the last will: say it ourselves.
        if let Some(topic) = &config.availability {
            let _ = client.try_publish(topic.clone(), QoS::AtLeastOnce, true, adaptd_protocol::fleet::OFFLINE);
        }
        if client.try_disconnect().is_err() {
            return;
        }
        let drained = async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        status.flushed.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
    }
}

/// Subscribe from a task of its own: the loop that polls is the only one draining the request
/// queue, which may be full of requests made while the broker was away (acks, events); waiting
/// there for room would deadlock the connection (seen on a broker restart).
fn subscribe_in_background(client: &AsyncClient, filters: Vec<SubscribeFilter>) {
    let client = client.clone();
    tokio::spawn(async move {
        let names: Vec<String> = filters.iter().map(|f| f.path.clone()).collect();
        match client.subscribe_many(filters).await {
            Ok(()) => tracing::info!(?names, "MQTT link subscribing"),
            Err(e) => tracing::warn!(error = %e, ?names, "MQTT link could not subscribe"),
        }
    });
}

/// Acknowledge from a task of its own, for the same reason.
fn ack_in_background(client: &AsyncClient, publish: Publish) {
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.ack(&publish).await {
            tracing::debug!(error = %e, "could not acknowledge; the broker will redeliver");
        }
    });
}

/// The size of a packet that was over the read limit, if that is why the connection broke.
fn oversized_packet(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size))) => Some(*size),
        _ => None,
    }
}
