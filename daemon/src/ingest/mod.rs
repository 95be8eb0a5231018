//! Ingest: labelled samples over MQTT into the sample store, acknowledged only once durable.
//!
//! A handler on the device's MQTT link (`crate::mqtt`): it subscribes to
//! `{prefix}/{device}/samples/{task}` at QoS 1 on the link's persistent session and acknowledges
//! each message itself. It takes what has arrived (up to `max_batch`), decodes it, commits the
//! valid samples in one transaction, and only then acks every message of the batch. Backpressure is
//! MQTT's own flow control: a broker sends at most its in-flight window of unacknowledged QoS 1
//! messages, and nothing is acked before it is stored, so a slow store slows the broker down
//! and the rest waits there. Nothing is dropped, nothing is acked before it is durable. A payload that cannot be
//! a sample is refused with its reason, counted, announced on `{prefix}/{device}/events`, and
//! acked, so the broker does not redeliver poison forever.

pub mod decode;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adaptd_adapters::bundle::Manifest;
use adaptd_protocol::topics::{Channel, Topics};

use crate::mqtt::{Ack, Inbound, Inbox, Link, LinkHandle};
use crate::samples::{Inserted, SampleStore, StoreError};
use decode::{SampleSchema, decode_sample, refusal_event};

#[derive(Debug, Clone)]
pub struct IngestConfig {
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
    /// Subscribed to the samples topic right now (the broker granted the subscription); shared
    /// with the inbox, which the link keeps current.
    pub connected: Arc<AtomicBool>,
    /// The ingest task is running (the supervisor restarts it when it stops).
    pub running: AtomicBool,
    /// Times the supervisor restarted ingest after it stopped on an error or a panic.
    pub restarts: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl IngestStats {
    /// Statistics of the ingest that reads `inbox`.
    pub fn new(inbox: &Inbox) -> IngestStats {
        IngestStats { connected: inbox.subscribed(), ..IngestStats::default() }
    }

    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn count_refusal(&self, reason: &'static str) {
        *self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(reason).or_default() += 1;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Stopped(String),
}

impl IngestError {
    pub fn error_type(&self) -> &'static str {
        match self {
            IngestError::Store(_) => "store",
            IngestError::Stopped(_) => "stopped",
        }
    }
}

/// Ingest: what it needs to take the samples of an [`Inbox`] into the store.
#[derive(Clone)]
pub struct Ingest {
    pub config: IngestConfig,
    pub link: LinkHandle,
    pub store: Arc<Mutex<SampleStore>>,
    pub manifest: Arc<Manifest>,
    /// The tasks whose samples are taken; any other task's are refused.
    pub tasks: Arc<Vec<String>>,
    pub stats: Arc<IngestStats>,
}

impl Ingest {
    /// Ingest for `tasks` on `link`: subscribed to every task's samples, acknowledged by ingest
    /// itself once stored. Run the returned inbox with [`Ingest::supervise`] (or [`Ingest::run`]).
    pub fn on_link(link: &mut Link, config: IngestConfig, store: Arc<Mutex<SampleStore>>, manifest: Arc<Manifest>, tasks: Vec<String>) -> (Ingest, Inbox) {
        let inbox = link.subscribe(config.samples_filter(), Ack::Handler, config.max_payload_bytes);
        let stats = Arc::new(IngestStats::new(&inbox));
        (Ingest { config, link: link.handle(), store, manifest, tasks: Arc::new(tasks), stats }, inbox)
    }

    /// Ingest until `shutdown` completes or the store fails (unacked messages then stay with
    /// the broker, to be redelivered).
    pub async fn run(&self, inbox: &mut Inbox, shutdown: impl Future<Output = ()>) -> Result<(), IngestError> {
        tokio::pin!(shutdown);
        loop {
            let first = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                m = inbox.recv() => match m { Some(m) => m, None => return Ok(()) },
            };
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch {
                match inbox.try_recv() {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            if let Err(e) = self.store_batch(batch).await {
                tracing::error!(error = %e, "sample store failed; the unacked samples stay with the broker");
                return Err(e);
            }
        }
    }

    /// Run ingest under supervision until `shutdown`: when it stops on an error or a panic, it
    /// is shown as down (`running`, readiness) and restarted with backoff, and the link
    /// reconnects so the broker redelivers what the stopped run had not acknowledged; acked
    /// samples are durable already.
    pub async fn supervise(self, inbox: Inbox, shutdown: impl Future<Output = ()>) {
        let inbox = Arc::new(tokio::sync::Mutex::new(inbox));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        let mut wait = Duration::from_secs(1);
        loop {
            let mut stop = stop_rx.clone();
            self.stats.running.store(true, Ordering::Relaxed);
            let (ingest, inbox) = (self.clone(), inbox.clone());
            let mut task = tokio::spawn(async move {
                let mut inbox = inbox.lock_owned().await;
                ingest
                    .run(&mut inbox, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            });
            let started = std::time::Instant::now();
            let outcome = tokio::select! {
                // A run that ended because the daemon stops is not a failure to restart.
                biased;
                _ = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    let _ = (&mut task).await;
                    self.stats.running.store(false, Ordering::Relaxed);
                    return;
                }
                outcome = &mut task => outcome,
            };
            self.stats.running.store(false, Ordering::Relaxed);
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
            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
            self.link.reconnect();
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    async fn store_batch(&self, batch: Vec<Inbound>) -> Result<(), IngestError> {
        let (config, stats) = (&self.config, &self.stats);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let messages: Vec<(String, bytes::Bytes, Option<usize>)> =
            batch.iter().map(|a| (a.publish.topic.clone(), a.publish.payload.clone(), a.oversize)).collect();
        let (store, manifest, tasks, max_bytes, topic_tree) =
            (self.store.clone(), self.manifest.clone(), self.tasks.clone(), config.max_payload_bytes, config.topics.clone());
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
            let event = refusal_event(topic, config.topics.task_of(Channel::Samples, topic).unwrap_or_default(), e);
            if let Err(e) = self.link.publish(config.events_topic(), event, false).await {
                tracing::warn!(error = %e, "could not announce a refused sample");
            }
        }
        for message in &batch {
            self.link.ack(message).await;
        }
        Ok(())
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}
