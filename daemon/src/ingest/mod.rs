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

use crate::samples::{Inserted, SampleStore, StoreError};
use decode::{SampleSchema, decode_sample, refusal_event};

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub broker: crate::broker::BrokerConnection,
    /// Stable across restarts: the broker keeps the session (and unacked messages) under it.
    pub client_id: String,
    pub topic_prefix: String,
    pub device_id: String,
    pub max_batch: usize,
    pub max_payload_bytes: usize,
}

impl IngestConfig {
    pub fn samples_filter(&self) -> String {
        format!("{}/{}/samples/+", self.topic_prefix, self.device_id)
    }

    pub fn events_topic(&self) -> String {
        format!("{}/{}/events", self.topic_prefix, self.device_id)
    }
}

#[derive(Debug, Default)]
pub struct IngestStats {
    /// Subscribed to the samples topic right now (the broker acknowledged the subscription).
    pub connected: std::sync::atomic::AtomicBool,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl IngestStats {
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().expect("ingest counters").clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
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
    options.set_max_packet_size(config.max_payload_bytes + 1024, config.max_payload_bytes + 1024);
    let (client, mut events) = AsyncClient::new(options, 2 * config.max_batch.max(1) + 16);
    // Unbounded on purpose: the poller must never wait on the batcher, because acks (and with
    // them the whole connection) only move while it polls; a bounded hand-off deadlocks under a
    // steady stream. Its length is bounded by the broker's in-flight window, since every message
    // in it is unacknowledged.
    let (tx, mut rx) = mpsc::unbounded_channel::<Publish>();

    let filter = config.samples_filter();
    let poll_client = client.clone();
    let poll_stats = stats.clone();
    let poller = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(100);
                    crate::broker::subscribe_in_background(&poll_client, &filter, "ingest");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return; // the batcher stopped
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => poll_stats.connected.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => {
                    poll_stats.connected.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "ingest connection lost");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });

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
    poller.abort();
    // Not `disconnect().await`: the poller is gone, and a request queue full of acks would hold
    // shutdown until the deadline.
    let _ = client.try_disconnect();
    result
}

async fn store_batch(
    config: &IngestConfig,
    client: &AsyncClient,
    store: &Arc<Mutex<SampleStore>>,
    manifest: &Manifest,
    tasks: &[String],
    stats: &IngestStats,
    batch: Vec<Publish>,
) -> Result<(), IngestError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let schema = SampleSchema { manifest, tasks, max_bytes: config.max_payload_bytes };
    let prefix = format!("{}/{}/samples/", config.topic_prefix, config.device_id);
    let mut samples = Vec::with_capacity(batch.len());
    let mut refusals = Vec::new();
    for p in &batch {
        let topic = p.topic.clone();
        let topic_task = topic.strip_prefix(&prefix).unwrap_or_default().to_string();
        match decode_sample(&p.payload, &schema, now) {
            Ok(s) if s.task != topic_task => {
                let reason = format!("{:?} does not match the topic's task {topic_task:?}", s.task);
                refusals.push((topic, decode::DecodeError::Field { field: "task", reason }))
            }
            Ok(s) => samples.push(s),
            Err(e) => refusals.push((topic, e)),
        }
    }
    let store = store.clone();
    let inserted = tokio::task::spawn_blocking(move || store.lock().expect("sample store").insert_batch(&samples))
        .await
        .expect("the store thread does not panic")?;
    // Durable: now every message of the batch may be acknowledged.
    for r in &inserted {
        match r {
            Inserted::New(_) => stats.stored.fetch_add(1, Ordering::Relaxed),
            Inserted::Duplicate => stats.duplicates.fetch_add(1, Ordering::Relaxed),
        };
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(messages = batch.len(), stored = inserted.len(), refused = refusals.len(), "batch committed");
    for (topic, e) in &refusals {
        *stats.refused.lock().expect("ingest counters").entry(e.error_type()).or_default() += 1;
        tracing::info!(topic, reason = e.error_type(), error = %e, "sample refused");
        let _ = client.publish(config.events_topic(), QoS::AtLeastOnce, false, refusal_event(topic, e)).await;
    }
    for p in &batch {
        if let Err(e) = client.ack(p).await {
            tracing::warn!(error = %e, "could not ack a stored sample; the broker will redeliver it (harmless)");
        }
    }
    Ok(())
}
