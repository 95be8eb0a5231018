//! Operator-facing events (`adaptd_protocol::Event`): one JSON object each, logged, published on
//! `{prefix}/{device}/events` (QoS 1) over the device's MQTT link when a broker is configured,
//! and — for training outcomes — appended to the task's journal (`<state>/journal/<task>.jsonl`), which `adaptd report` reads.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use adaptd_protocol::{Event, EventRecord};
use tokio::sync::mpsc;

use crate::mqtt::LinkHandle;

#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<EventRecord>,
    /// For parts of the daemon that act on events (the fleet agent follows its promotions'
    /// watch); lagging subscribers lose the oldest.
    local: tokio::sync::broadcast::Sender<EventRecord>,
}

impl Events {
    pub fn channel() -> (Events, mpsc::UnboundedReceiver<EventRecord>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (local, _) = tokio::sync::broadcast::channel(256);
        (Events { tx, local }, rx)
    }

    /// Every event emitted from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<EventRecord> {
        self.local.subscribe()
    }

    /// Emit `event` about `task` (empty: the daemon as a whole): logged, and published when a
    /// broker is configured. Returns the record, for the journal.
    pub fn emit(&self, task: &str, event: Event) -> EventRecord {
        let record = EventRecord { task: task.to_string(), time_ms: now_ms(), event };
        let kind = record.event.kind();
        tracing::info!(target: "adaptd::events", event = %serde_json::to_string(&record).unwrap_or_default(), "{kind}");
        let _ = self.tx.send(record.clone());
        let _ = self.local.send(record.clone());
        record
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The largest event published: a decision with per-class figures for many labels.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Publish events on `topic` through the device's MQTT link until `shutdown`; with no link,
/// drain them (they are in the log already). At shutdown what is queued still goes out, as
/// far as the link's request queue has room: the link stops after this, and flushes.
pub async fn publish(mut rx: mpsc::UnboundedReceiver<EventRecord>, link: Option<LinkHandle>, topic: String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let record = tokio::select! {
            _ = &mut shutdown => break,
            record = rx.recv() => match record { Some(r) => r, None => return },
        };
        if let Some(link) = &link
            && let Err(e) = link.publish(topic.clone(), encode(&record), false).await
        {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
    while let Ok(record) = rx.try_recv() {
        if let Some(link) = &link
            && let Err(e) = link.try_publish(topic.clone(), encode(&record), false)
        {
            tracing::warn!(error = %e, kind = record.event.kind(), "could not publish an event while stopping");
        }
    }
}

fn encode(record: &EventRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
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
