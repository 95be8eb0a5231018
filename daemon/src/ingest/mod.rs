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
    pub stored: AtomicU64,
    /// Samples a sender published again under a key already stored.
    pub duplicates: AtomicU64,
    /// Messages the broker delivered again after a reconnect (MQTT's DUP flag), already stored
    /// or already refused: not counted, and not announced, a second time.
    pub redelivered: AtomicU64,
    pub batches: AtomicU64,
    /// Digests of the messages refused lately, so a redelivery is not refused (and announced)
    /// again.
    recently_refused: Mutex<RecentDigests>,
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

    /// True the first time this message is refused; false for a redelivery of one refused lately.
    fn first_refusal(&self, topic: &str, payload: &[u8]) -> bool {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(topic.as_bytes());
        hasher.update([0]);
        hasher.update(payload);
        let digest: [u8; 32] = hasher.finalize().into();
        self.recently_refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(digest)
    }
}

/// The last [`RecentDigests::KEPT`] digests, in order of arrival: bounded memory.
#[derive(Debug, Default)]
struct RecentDigests {
    order: std::collections::VecDeque<[u8; 32]>,
    set: std::collections::HashSet<[u8; 32]>,
}

impl RecentDigests {
    const KEPT: usize = 4096;

    /// False if `digest` is among the recent ones already.
    fn insert(&mut self, digest: [u8; 32]) -> bool {
        if !self.set.insert(digest) {
            return false;
        }
        self.order.push_back(digest);
        if self.order.len() > RecentDigests::KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
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

    /// Run ingest under supervision until `shutdown`: when it stops on an error (the store: a
    /// full disk) or a panic, it is shown as down (`restarts.parts`, readiness, an event) and
    /// restarted with backoff, and the link reconnects so the broker redelivers what the stopped
    /// run had not acknowledged; acked samples are durable already.
    pub async fn supervise(self, inbox: Inbox, restarts: crate::app::Restarts, shutdown: impl Future<Output = ()>) {
        let inbox = Arc::new(tokio::sync::Mutex::new(inbox));
        let link = self.link.clone();
        let start = |stop: tokio_util::sync::CancellationToken| {
            let (ingest, inbox) = (self.clone(), inbox.clone());
            async move {
                let mut inbox = inbox.lock_owned().await;
                ingest.run(&mut inbox, stop.cancelled_owned()).await
            }
        };
        crate::app::restarting(restarts, shutdown, start, |change| {
            if let crate::app::PartChange::Restarting = change {
                link.reconnect();
            }
        })
        .await;
    }

    async fn store_batch(&self, batch: Vec<Inbound>) -> Result<(), IngestError> {
        let (config, stats) = (&self.config, &self.stats);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let messages: Vec<(String, bytes::Bytes, Option<usize>)> =
            batch.iter().map(|a| (a.publish.topic.clone(), a.publish.payload.clone(), a.oversize)).collect();
        // Which messages the broker marked as sent before (a redelivery after a reconnect).
        let redelivery: Vec<bool> = batch.iter().map(|a| a.publish.dup).collect();
        let (store, manifest, tasks, max_bytes, topic_tree) =
            (self.store.clone(), self.manifest.clone(), self.tasks.clone(), config.max_payload_bytes, config.topics.clone());
        // Decoding (images included) and the commit are CPU and disk work: off the async workers.
        let (inserted, refusals) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let schema = SampleSchema { manifest: &manifest, tasks: &tasks, max_bytes };
            let mut samples = Vec::with_capacity(messages.len());
            // For each sample and each refusal: the message it came from.
            let mut origins = Vec::with_capacity(messages.len());
            let mut refusals = Vec::new();
            for (i, (topic, payload, oversize)) in messages.into_iter().enumerate() {
                let topic_task = topic_tree.task_of(Channel::Samples, &topic).unwrap_or_default().to_string();
                let decoded = match oversize {
                    Some(size) => Err(decode::DecodeError::TooLarge { size, limit: max_bytes }),
                    None => decode_sample(&payload, &schema, now),
                };
                match decoded {
                    Ok(s) if s.task != topic_task => {
                        let reason = format!("{:?} does not match the topic's task {topic_task:?}", s.task);
                        refusals.push((i, topic, decode::DecodeError::Field { field: "task", reason }))
                    }
                    Ok(s) => {
                        samples.push(s);
                        origins.push((i, topic));
                    }
                    Err(e) => refusals.push((i, topic, e)),
                }
            }
            let inserted = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert_batch(&samples)?;
            for ((result, sample), (i, topic)) in inserted.iter().zip(&samples).zip(&origins) {
                if let Inserted::Conflict { kept_task, kept_label } = result {
                    let conflict = decode::DecodeError::Conflict {
                        key: sample.key.clone(),
                        sent: format!("{}/{}", sample.task, sample.label),
                        kept: format!("{kept_task}/{kept_label}"),
                    };
                    refusals.push((*i, topic.clone(), conflict));
                }
            }
            let inserted: Vec<(Inserted, usize)> = inserted.into_iter().zip(origins.into_iter().map(|(i, _)| i)).collect();
            Ok((inserted, refusals))
        })
        .await
        .map_err(|e| IngestError::Stopped(format!("the decode-and-store worker stopped: {e}")))??;
        // Durable: now every message of the batch may be acknowledged. A key stored already is a
        // sender's duplicate, unless the broker redelivered the message (then it is ours); a
        // conflict is a refusal, counted there alone.
        for (r, i) in &inserted {
            match r {
                Inserted::New(_) => stats.stored.fetch_add(1, Ordering::Relaxed),
                Inserted::Duplicate if redelivery[*i] => stats.redelivered.fetch_add(1, Ordering::Relaxed),
                Inserted::Duplicate => stats.duplicates.fetch_add(1, Ordering::Relaxed),
                Inserted::Conflict { .. } => 0,
            };
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(messages = batch.len(), stored = inserted.len(), refused = refusals.len(), "batch committed");
        for (i, topic, e) in &refusals {
            let message = &batch[*i];
            let size = message.oversize.unwrap_or(message.publish.payload.len()).to_le_bytes();
            let seen_lately = !stats.first_refusal(topic, &[&size[..], &message.publish.payload[..]].concat());
            // Only what the broker marks as a redelivery: a sender may well send the same
            // poison twice, and each is refused and announced.
            if redelivery[*i] && seen_lately {
                stats.redelivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic, reason = e.error_type(), "a refused sample delivered again; acknowledged, not announced again");
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_digests_know_what_came_lately_and_forget_the_oldest() {
        let mut recent = RecentDigests::default();
        let digest = |n: usize| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&n.to_le_bytes());
            d
        };
        assert!(recent.insert(digest(0)));
        assert!(!recent.insert(digest(0)), "seen lately");
        for n in 1..=RecentDigests::KEPT {
            assert!(recent.insert(digest(n)));
        }
        assert_eq!((recent.order.len(), recent.set.len()), (RecentDigests::KEPT, RecentDigests::KEPT), "bounded");
        assert!(recent.insert(digest(0)), "the oldest was forgotten");
        let stats = IngestStats::default();
        assert!(stats.first_refusal("t", b"poison") && !stats.first_refusal("t", b"poison") && stats.first_refusal("u", b"poison"));
    }
}
