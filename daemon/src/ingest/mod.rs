//! Ingest: labelled samples over MQTT into the sample store, acknowledged only once durable.
//!
//! Subscribes to `{prefix}/{device}/samples/{task}` at QoS 1 with a persistent session (stable
//! client id, clean session off) and manual acks. One task polls the connection and forwards
//! publishes; another takes what has arrived (up to `max_batch`), decodes it, commits the valid
//! samples in one transaction, and only then acks every message of the batch. Backpressure is
//! MQTT's own flow control: a broker sends at most its in-flight window of unacknowledged QoS 1
//! messages, and nothing is acked before it is stored, so a slow store slows the broker down
//! and the rest waits there. Nothing is dropped, nothing is acked before it is durable. A payload that cannot be
//! a sample is refused with its reason, counted, announced on `{prefix}/{device}/events`, and
//! acked, so the broker does not redeliver poison forever.

pub mod decode;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptd_adapters::bundle::Manifest;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::mpsc;

use adaptd_protocol::topics::{Channel, Topics};

use crate::samples::{Inserted, SampleStore, StoreError};
use decode::{SampleSchema, decode_sample, refusal_event};

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub broker: crate::broker::BrokerConnection,
    /// Stable across restarts: the broker keeps the session (and unacked messages) under it.
    pub client_id: String,
    pub topics: Topics,
    pub max_batch: usize,
    pub max_payload_bytes: usize,
}

impl IngestConfig {
    pub fn samples_filter(&self) -> String {
        self.topics.every_task(Channel::Samples)
    }

    pub fn events_topic(&self) -> String {
        self.topics.events()
    }
}

#[derive(Debug, Default)]
pub struct IngestStats {
    /// Subscribed to the samples topic right now (the broker acknowledged the subscription).
    pub connected: std::sync::atomic::AtomicBool,
    /// The ingest task is running (the supervisor restarts it when it stops).
    pub running: std::sync::atomic::AtomicBool,
    /// Times the supervisor restarted ingest after it stopped on an error or a panic.
    pub restarts: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl IngestStats {
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn count_refusal(&self, reason: &'static str) {
        *self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(reason).or_default() += 1;
    }
}

/// The largest MQTT packet there is (a 256 MiB remaining length plus its fixed header): a
/// message over the sample limit is read once, up to this, so it can be refused and acked.
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;
/// Room for the topic and the packet's headers on top of the payload limit.
const PACKET_OVERHEAD: usize = 1024;

/// A message as the poller hands it on: an oversized payload is dropped at once (only its size
/// is kept), so at most one oversized message is ever in memory.
struct Arrived {
    publish: Publish,
    oversize: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("{0}")]
    Stopped(String),
}

/// Ingest until `shutdown` completes or the store fails (unacked messages then stay with the
/// broker, to be redelivered to the next run).
pub async fn run(
    config: IngestConfig,
    store: Arc<Mutex<SampleStore>>,
    manifest: Arc<Manifest>,
    tasks: Arc<Vec<String>>,
    stats: Arc<IngestStats>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), IngestError> {
    let mut options = config.broker.options(config.client_id.clone())?;
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let read_limit = config.max_payload_bytes + PACKET_OVERHEAD;
    options.set_max_packet_size(read_limit, read_limit);
    let (client, mut events) = AsyncClient::new(options, 2 * config.max_batch.max(1) + 16);
    // Unbounded on purpose: the poller must never wait on the batcher, because acks (and with
    // them the whole connection) only move while it polls; a bounded hand-off deadlocks under a
    // steady stream. Its length is bounded by the broker's in-flight window, since every message
    // in it is unacknowledged.
    let (tx, mut rx) = mpsc::unbounded_channel::<Arrived>();

    let filter = config.samples_filter();
    let poll_client = client.clone();
    let poll_stats = stats.clone();
    let max_payload = config.max_payload_bytes;
    // Aborted however `run` ends (a panic in the batcher included): an orphaned poller would
    // keep the client id's session and fight the next run for it.
    let poller = AbortOnDrop(tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.connected();
                    crate::broker::subscribe_in_background(&poll_client, &filter, "ingest");
                }
                Ok(Event::Incoming(Packet::Publish(mut publish))) => {
                    let oversize = (publish.payload.len() > max_payload).then(|| publish.payload.len());
                    if oversize.is_some() {
                        publish.payload = bytes::Bytes::new();
                        // Read once to refuse it; the next connection reads at the usual limit.
                        events.mqtt_options.set_max_packet_size(read_limit, read_limit);
                    }
                    if tx.send(Arrived { publish, oversize }).is_err() {
                        return; // the batcher stopped
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => poll_stats.connected.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => {
                    poll_stats.connected.store(false, Ordering::Relaxed);
                    // A message over the read limit breaks the connection before it is decoded,
                    // and the persistent session redelivers it first on every reconnect: read it
                    // once at its own size (the broker's limit bounds it), refuse it, ack it.
                    if let Some(size) = oversized_packet(&e) {
                        let once = size.saturating_add(PACKET_OVERHEAD).min(MQTT_MAX_PACKET);
                        tracing::warn!(
                            size,
                            limit = max_payload,
                            "a message over the sample limit is waiting; reading it once to refuse it (set the broker's message_size_limit to bound this)"
                        );
                        events.mqtt_options.set_max_packet_size(once, read_limit);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let wait = backoff.failed();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "ingest connection lost");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }));

    tokio::pin!(shutdown);
    let result = loop {
        let first = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            p = rx.recv() => match p { Some(p) => p, None => break Ok(()) },
        };
        let mut batch = vec![first];
        while batch.len() < config.max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if let Err(e) = store_batch(&config, &client, &store, &manifest, &tasks, &stats, batch).await {
            tracing::error!(error = %e, "sample store failed; the unacked samples stay with the broker");
            break Err(e);
        }
    };
    drop(poller);
    // Not `disconnect().await`: the poller is gone, and a request queue full of acks would hold
    // shutdown until the deadline.
    let _ = client.try_disconnect();
    result
}

async fn store_batch(
    config: &IngestConfig,
    client: &AsyncClient,
    store: &Arc<Mutex<SampleStore>>,
    manifest: &Arc<Manifest>,
    tasks: &Arc<Vec<String>>,
    stats: &IngestStats,
    batch: Vec<Arrived>,
) -> Result<(), IngestError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let messages: Vec<(String, bytes::Bytes, Option<usize>)> = batch.iter().map(|a| (a.publish.topic.clone(), a.publish.payload.clone(), a.oversize)).collect();
    let (store, manifest, tasks, max_bytes, topic_tree) = (store.clone(), manifest.clone(), tasks.clone(), config.max_payload_bytes, config.topics.clone());
    // Decoding (images included) and the commit are CPU and disk work: off the async workers.
    let (inserted, refusals) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let schema = SampleSchema { manifest: &manifest, tasks: &tasks, max_bytes };
        let mut samples = Vec::with_capacity(messages.len());
        let mut topics = Vec::with_capacity(messages.len());
        let mut refusals = Vec::new();
        for (topic, payload, oversize) in messages {
            let topic_task = topic_tree.task_of(Channel::Samples, &topic).unwrap_or_default().to_string();
            let decoded = match oversize {
                Some(size) => Err(decode::DecodeError::TooLarge { size, limit: max_bytes }),
                None => decode_sample(&payload, &schema, now),
            };
            match decoded {
                Ok(s) if s.task != topic_task => {
                    let reason = format!("{:?} does not match the topic's task {topic_task:?}", s.task);
                    refusals.push((topic, decode::DecodeError::Field { field: "task", reason }))
                }
                Ok(s) => {
                    samples.push(s);
                    topics.push(topic);
                }
                Err(e) => refusals.push((topic, e)),
            }
        }
        let inserted = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert_batch(&samples)?;
        for ((result, sample), topic) in inserted.iter().zip(&samples).zip(topics) {
            if let Inserted::Conflict { kept_task, kept_label } = result {
                let conflict = decode::DecodeError::Conflict {
                    key: sample.key.clone(),
                    sent: format!("{}/{}", sample.task, sample.label),
                    kept: format!("{kept_task}/{kept_label}"),
                };
                refusals.push((topic, conflict));
            }
        }
        Ok((inserted, refusals))
    })
    .await
    .map_err(|e| IngestError::Stopped(format!("the decode-and-store worker stopped: {e}")))??;
    // Durable: now every message of the batch may be acknowledged.
    for r in &inserted {
        match r {
            Inserted::New(_) => stats.stored.fetch_add(1, Ordering::Relaxed),
            Inserted::Duplicate | Inserted::Conflict { .. } => stats.duplicates.fetch_add(1, Ordering::Relaxed),
        };
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(messages = batch.len(), stored = inserted.len(), refused = refusals.len(), "batch committed");
    for (topic, e) in &refusals {
        stats.count_refusal(e.error_type());
        tracing::info!(topic, reason = e.error_type(), error = %e, "sample refused");
        let _ = client
            .publish(
                config.events_topic(),
                QoS::AtLeastOnce,
                false,
                refusal_event(topic, config.topics.task_of(Channel::Samples, topic).unwrap_or_default(), e),
            )
            .await;
    }
    for a in &batch {
        if let Err(e) = client.ack(&a.publish).await {
            tracing::warn!(error = %e, "could not ack a stored sample; the broker will redeliver it (harmless)");
        }
    }
    Ok(())
}

/// The size of a packet that was over the read limit, if that is why the connection broke.
fn oversized_packet(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size))) => Some(*size),
        _ => None,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reconnect backoff that a connection has to earn back: it resets only after the connection
/// stayed up a while, so a connect that fails again at once (a broker that drops us on
/// subscribe) backs off instead of reconnecting ten times a second.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    up_since: Option<std::time::Instant>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: Backoff::FIRST, up_since: None }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    /// Up this long: the connection is healthy again and the next failure starts from FIRST.
    const STABLE: Duration = Duration::from_secs(10);

    pub fn connected(&mut self) {
        self.up_since = Some(std::time::Instant::now());
    }

    /// How long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        if self.up_since.take().is_some_and(|t| t.elapsed() >= Backoff::STABLE) {
            self.next = Backoff::FIRST;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        wait
    }
}

/// Run ingest under supervision until `shutdown`: when it stops on an error or a panic, it is
/// shown as down (`running`, `connected`, readiness) and restarted with backoff; acked samples
/// are durable already and unacked ones wait at the broker.
pub async fn supervise(
    config: IngestConfig,
    store: Arc<Mutex<SampleStore>>,
    manifest: Arc<Manifest>,
    tasks: Arc<Vec<String>>,
    stats: Arc<IngestStats>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let mut wait = Duration::from_secs(1);
    loop {
        let mut stop = stop_rx.clone();
        stats.running.store(true, Ordering::Relaxed);
        let mut task = tokio::spawn(run(config.clone(), store.clone(), manifest.clone(), tasks.clone(), stats.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            _ = &mut shutdown => {
                let _ = stop_tx.send(true);
                let _ = (&mut task).await;
                stats.running.store(false, Ordering::Relaxed);
                return;
            }
            outcome = &mut task => outcome,
        };
        stats.running.store(false, Ordering::Relaxed);
        stats.connected.store(false, Ordering::Relaxed);
        let why = match outcome {
            Ok(Ok(())) => "stopped".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(60) {
            wait = Duration::from_secs(1);
        }
        tracing::error!(reason = why, restart_in_s = wait.as_secs(), "ingest stopped; restarting it");
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}
