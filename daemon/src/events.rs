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
    /// The last event number given out (see [`EventRecord::seq`]).
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// For parts of the daemon that act on events (the fleet agent follows its promotions'
    /// watch); lagging subscribers lose the oldest.
    local: tokio::sync::broadcast::Sender<EventRecord>,
}

impl Events {
    pub fn channel() -> (Events, mpsc::UnboundedReceiver<EventRecord>) {
        Events::numbered_after(0)
    }

    /// Events numbered from `last_seq + 1` on (a restart goes on from its outbox's last).
    pub fn numbered_after(last_seq: u64) -> (Events, mpsc::UnboundedReceiver<EventRecord>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (local, _) = tokio::sync::broadcast::channel(256);
        (Events { tx, seq: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(last_seq)), local }, rx)
    }

    /// Every event emitted from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<EventRecord> {
        self.local.subscribe()
    }

    /// Emit `event` about `task` (empty: the daemon as a whole): logged, and published when a
    /// broker is configured. Returns the record, for the journal.
    pub fn emit(&self, task: &str, event: Event) -> EventRecord {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let record = EventRecord { task: task.to_string(), time_ms: now_ms(), seq, event };
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
/// drain them (they are in the log already). Each event worth replaying is written to `outbox`
/// before it is handed to the link, and `replay` (what a previous run may not have delivered)
/// goes out first. At shutdown what is queued still goes out, as far as the link's request
/// queue has room: the link stops after this, and flushes. Returns the last event number handed
/// to the link.
pub async fn publish(
    mut rx: mpsc::UnboundedReceiver<EventRecord>,
    link: Option<LinkHandle>,
    topic: String,
    mut outbox: Option<Outbox>,
    replay: Vec<EventRecord>,
    shutdown: impl Future<Output = ()>,
) -> u64 {
    tokio::pin!(shutdown);
    let mut last = 0;
    if !replay.is_empty() {
        tracing::info!(events = replay.len(), first_seq = replay[0].seq, "publishing again the events a previous run may not have delivered");
    }
    for record in replay {
        if let Some(link) = &link
            && let Err(e) = link.publish(topic.clone(), encode(&record), false).await
        {
            tracing::warn!(error = %e, "could not publish an event again");
        }
        last = last.max(record.seq);
    }
    loop {
        let record = tokio::select! {
            _ = &mut shutdown => break,
            record = rx.recv() => match record { Some(r) => r, None => return last },
        };
        if let Some(outbox) = outbox.as_mut() {
            outbox.keep(&record);
        }
        if let Some(link) = &link
            && let Err(e) = link.publish(topic.clone(), encode(&record), false).await
        {
            tracing::warn!(error = %e, "could not publish an event");
        }
        last = last.max(record.seq);
    }
    while let Ok(record) = rx.try_recv() {
        if let Some(outbox) = outbox.as_mut() {
            outbox.keep(&record);
        }
        if let Some(link) = &link
            && let Err(e) = link.try_publish(topic.clone(), encode(&record), false)
        {
            tracing::warn!(error = %e, kind = record.event.kind(), "could not publish an event while stopping");
        }
        last = last.max(record.seq);
    }
    last
}

/// Events that matter after a crash, kept on disk until a clean stop says they went out: a
/// daemon killed with events still queued for the broker publishes them again at its next start,
/// under their own numbers. Progress reports are not kept (the next one supersedes them).
///
/// `<state>/events/outbox.jsonl` holds the latest [`Outbox::KEPT`] events (appended and synced
/// one by one; a torn last line from a crash is skipped), `<state>/events/delivered` the last
/// number a clean stop flushed to the broker (written atomically).
pub struct Outbox {
    dir: PathBuf,
    file: Option<std::fs::File>,
    failing: bool,
}

impl Outbox {
    pub const KEPT: usize = 1000;
    const FILE: &'static str = "outbox.jsonl";
    const DELIVERED: &'static str = "delivered";

    /// Open the outbox in `dir`: the events to publish again (numbered after the last delivered
    /// one, oldest first) and the last number given out. The file is rewritten (atomically) with
    /// its newest [`Outbox::KEPT`] events.
    pub fn open(dir: &Path) -> std::io::Result<(Outbox, Vec<EventRecord>, u64)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(Outbox::FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut records: Vec<EventRecord> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let skip = records.len().saturating_sub(Outbox::KEPT);
        records.drain(..skip);
        let delivered = std::fs::read_to_string(dir.join(Outbox::DELIVERED)).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
        let last_seq = records.iter().map(|r| r.seq).max().unwrap_or(0).max(delivered);
        let mut kept = String::new();
        for r in &records {
            kept += &serde_json::to_string(r).map_err(std::io::Error::other)?;
            kept.push('\n');
        }
        adaptd_adapters::fsutil::write_atomic(&path, kept.as_bytes()).map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))?;
        let mut replay: Vec<EventRecord> = records.into_iter().filter(|r| r.seq > delivered).collect();
        replay.sort_by_key(|r| r.seq);
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok((Outbox { dir: dir.to_path_buf(), file: Some(file), failing: false }, replay, last_seq))
    }

    /// Whether `event` is worth publishing again after a crash.
    pub fn worth_keeping(event: &Event) -> bool {
        !matches!(event, Event::TrainingProgress { .. })
    }

    /// Write `record` (if worth keeping) before it is published; a failure (a full disk) is
    /// logged once and publishing goes on: the event is then only as durable as the link.
    pub fn keep(&mut self, record: &EventRecord) {
        if !Outbox::worth_keeping(&record.event) {
            return;
        }
        let Some(file) = self.file.as_mut() else { return };
        let written = serde_json::to_string(record).map_err(std::io::Error::other).and_then(|line| {
            file.write_all(format!("{line}\n").as_bytes())?;
            file.sync_data()
        });
        match (written, self.failing) {
            (Ok(()), true) => {
                tracing::info!(dir = %self.dir.display(), "the event outbox is written again");
                self.failing = false;
            }
            (Err(e), false) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write the event outbox; events go out without a copy on disk");
                self.failing = true;
            }
            _ => {}
        }
    }

    /// A clean stop flushed everything up to `seq` to the broker.
    pub fn delivered(dir: &Path, seq: u64) -> std::io::Result<()> {
        adaptd_adapters::fsutil::write_atomic(&dir.join(Outbox::DELIVERED), format!("{seq}\n").as_bytes())
            .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, event: Event) -> EventRecord {
        EventRecord { task: "sorter".into(), time_ms: seq, seq, event }
    }

    #[test]
    fn the_outbox_gives_back_what_a_crash_may_not_have_delivered_and_nothing_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut outbox, replay, last) = Outbox::open(dir.path()).unwrap();
        assert!(replay.is_empty() && last == 0);
        outbox.keep(&record(1, Event::Pinned { version: 0, by: "alice".into() }));
        let progress = Event::TrainingProgress { version: 1, kind: "head".into(), epoch: 1, epochs: 2, step: 1, steps: 2, loss: 0.5, eta_s: 1.0 };
        outbox.keep(&record(2, progress));
        outbox.keep(&record(3, Event::TrainingDeferred { reason: "few samples".into() }));
        drop(outbox); // a crash: no clean stop said they went out
        let (_, replay, last) = Outbox::open(dir.path()).unwrap();
        assert_eq!(replay.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3], "progress is not kept");
        assert_eq!(last, 3, "numbering goes on after the last kept");

        // A clean stop flushed up to 3; a torn line from a later crash is skipped.
        Outbox::delivered(dir.path(), 3).unwrap();
        let (mut outbox, replay, last) = Outbox::open(dir.path()).unwrap();
        assert!(replay.is_empty() && last == 3);
        outbox.keep(&record(4, Event::Pinned { version: 2, by: "bob".into() }));
        drop(outbox);
        std::fs::OpenOptions::new().append(true).open(dir.path().join(Outbox::FILE)).unwrap().write_all(b"{\"task\": \"sor").unwrap();
        let (_, replay, last) = Outbox::open(dir.path()).unwrap();
        assert_eq!((replay.iter().map(|r| r.seq).collect::<Vec<_>>(), last), (vec![4], 4));

        // Bounded: only the newest KEPT stay.
        let (mut outbox, ..) = Outbox::open(dir.path()).unwrap();
        for seq in 5..5 + Outbox::KEPT as u64 + 10 {
            outbox.keep(&record(seq, Event::Pinned { version: 0, by: "carol".into() }));
        }
        drop(outbox);
        let (_, replay, last) = Outbox::open(dir.path()).unwrap();
        assert_eq!((replay.len(), last), (Outbox::KEPT, 4 + Outbox::KEPT as u64 + 10));
        let lines = std::fs::read_to_string(dir.path().join(Outbox::FILE)).unwrap().lines().count();
        assert_eq!(lines, Outbox::KEPT);
    }
}
