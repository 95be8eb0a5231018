//! Operator-facing events (`adaptd_protocol::Event`): one JSON object each, logged, published on
//! `{prefix}/{device}/events` (QoS 1) when a broker is configured, and — for training outcomes —
//! appended to the task's journal (`<state>/journal/<task>.jsonl`), which `adaptd report` reads.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use adaptd_protocol::{Event, EventRecord};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<EventRecord>,
}

impl Events {
    pub fn channel() -> (Events, mpsc::UnboundedReceiver<EventRecord>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Events { tx }, rx)
    }

    /// Emit `event` about `task` (empty: the daemon as a whole): logged, and published when a
    /// broker is configured. Returns the record, for the journal.
    pub fn emit(&self, task: &str, event: Event) -> EventRecord {
        let record = EventRecord { task: task.to_string(), time_ms: now_ms(), event };
        let kind = record.event.kind();
        tracing::info!(target: "adaptd::events", event = %serde_json::to_string(&record).unwrap_or_default(), "{kind}");
        let _ = self.tx.send(record.clone());
        record
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Publish events until `shutdown`; with no broker, drain them (they are in the log already).
pub async fn publish(
    mut rx: mpsc::UnboundedReceiver<EventRecord>,
    broker: Option<crate::broker::BrokerConnection>,
    client_id: String,
    topic: String,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let options = broker.map(|b| b.options(client_id)).transpose().unwrap_or_else(|e| {
        tracing::error!(error = %e, "events are only logged: cannot connect to the broker");
        None
    });
    let Some(mut options) = options else {
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                e = rx.recv() => if e.is_none() { return },
            }
        }
    };
    options.set_keep_alive(Duration::from_secs(30));
    // rumqttc's default 10 KiB limit would drop a decision with per-class figures for many labels.
    options.set_max_packet_size(MAX_EVENT_BYTES, MAX_EVENT_BYTES);
    let (client, mut connection) = AsyncClient::new(options, 256);
    let poller = tokio::spawn(async move {
        loop {
            if let Err(e) = connection.poll().await {
                tracing::debug!(error = %e, "event publisher connection lost; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            e = rx.recv() => match e {
                Some(event) => {
                    let payload = serde_json::to_vec(&event).unwrap_or_default();
                    if let Err(e) = client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await {
                        tracing::warn!(error = %e, "could not publish an event");
                    }
                }
                None => break,
            },
        }
    }
    // Let queued publishes leave before the connection goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = client.disconnect().await;
    poller.abort();
}

/// The per-task journal of training jobs and gate decisions (append-only JSON lines).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(dir: &Path) -> Journal {
        Journal { dir: dir.to_path_buf() }
    }

    pub fn path(&self, task: &str) -> PathBuf {
        self.dir.join(format!("{task}.jsonl"))
    }

    /// Append one record and fsync it. Only reports read the journal; a torn last line from a
    /// crash is skipped by [`Journal::read`].
    pub fn append(&self, record: &EventRecord) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(self.path(&record.task))?;
        file.write_all(format!("{line}\n").as_bytes())?;
        file.sync_data()
    }

    /// Append, and say so in the log if the journal cannot be written (serving goes on).
    pub fn record(&self, record: &EventRecord) {
        if let Err(e) = self.append(record) {
            tracing::warn!(task = record.task, error = %e, "could not write the journal");
        }
    }

    /// Every readable record of `task`, oldest first, and how many lines were unreadable.
    pub fn read(&self, task: &str) -> std::io::Result<(Vec<EventRecord>, usize)> {
        let text = match std::fs::read_to_string(self.path(task)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(e),
        };
        let mut bad = 0;
        let records = text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).map_err(|_| bad += 1).ok()).collect();
        Ok((records, bad))
    }
}
