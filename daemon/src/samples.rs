//! The sample store: labelled samples, durable before they are acknowledged.
//!
//! SQLite in WAL mode (bundled, so every device runs the same SQLite): one file, crash-safe on
//! power loss with `synchronous=FULL`, readers never block the writer. Samples are deduplicated
//! by their idempotency key (a redelivery or a duplicate publish is harmless), and each goes to
//! train, validation or holdout by a hash of that key, so the split is stable across restarts
//! and no sample ever moves between sets. Each task's label set grows when a new label appears.
//! Inserts come in batches: one transaction, one fsync, for as many samples as the ingest loop
//! has in hand.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use adaptd_adapters::tensor::{HostData, HostTensor, f32s_from_le, i64s_from_le};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: sample store: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: sample store holds a damaged row {id}: {reason}")]
    Corrupt { path: PathBuf, id: i64, reason: String },
}

impl StoreError {
    pub fn error_type(&self) -> &'static str {
        match self {
            StoreError::Sqlite { .. } => "sqlite",
            StoreError::Corrupt { .. } => "corrupt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    Train = 0,
    Validation = 1,
    Holdout = 2,
}

impl Split {
    fn from_i64(v: i64) -> Option<Split> {
        match v {
            0 => Some(Split::Train),
            1 => Some(Split::Validation),
            2 => Some(Split::Holdout),
            _ => None,
        }
    }
}

/// Fractions of samples for validation and holdout; the rest trains. Part of the `[ingest]`
/// section of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct SplitPolicy {
    pub validation_percent: u8,
    pub holdout_percent: u8,
}

impl Default for SplitPolicy {
    fn default() -> Self {
        SplitPolicy { validation_percent: 10, holdout_percent: 10 }
    }
}

impl SplitPolicy {
    /// The split of an idempotency key: a pure function of the key and the policy.
    pub fn split_of(&self, key: &str) -> Split {
        let digest = Sha256::digest(key.as_bytes());
        let d = &digest;
        let bucket = (u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) % 100) as u8;
        if bucket < self.validation_percent {
            Split::Validation
        } else if bucket < self.validation_percent + self.holdout_percent {
            Split::Holdout
        } else {
            Split::Train
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SampleInput {
    Tensor(HostTensor),
    Text(String),
    /// An image or camera frame, fitted to an image bundle's size and kept as bytes: the model
    /// input is normalised from it when used.
    Image(crate::preprocess::Pixels),
}

/// A labelled sample as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Idempotency key: device id + sequence number, or a uuid.
    pub key: String,
    pub task: String,
    pub label: String,
    pub input: SampleInput,
    pub weight: f32,
    pub source: Option<String>,
    pub timestamp_ms: i64,
    /// An operator's correction of a served prediction.
    pub correction: bool,
    /// The label request it answers, if any (not stored with the sample: the request records
    /// its answer).
    pub request_id: Option<String>,
}

/// A sample as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSample {
    pub id: i64,
    pub sample: Sample,
    pub split: Split,
    pub received_ms: i64,
    pub embedding: Option<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(Split),
    /// The key was stored before: nothing changed.
    Duplicate,
    /// The key was stored before with another label (or task): the first one stands.
    Conflict {
        kept_task: String,
        kept_label: String,
    },
}

/// A clean close checkpoints and removes both `-wal` and `-shm`; a crash leaves both. An index
/// without its log means the log was deleted, and the transactions in it with it.
fn wal_missing(path: &Path) -> bool {
    let side = |suffix: &str| PathBuf::from(format!("{}{suffix}", path.display()));
    side("-shm").exists() && !side("-wal").exists()
}

pub struct SampleStore {
    conn: Connection,
    path: PathBuf,
    policy: SplitPolicy,
    lost_wal: bool,
}

/// The sample store's file in the daemon's state directory (the daemon, `samples stats` and
/// `samples import` all open it there).
pub const STORE_FILE: &str = "samples.db";

/// What a row costs beyond its blobs (other columns, the key's index), for the disk budget.
const ROW_OVERHEAD_BYTES: i64 = 128;
/// The disk budget's measure of a row, in SQL (the overhead bound as `?2`).
const TASK_BYTES_SQL: &str = "SELECT COALESCE(SUM(length(input) + COALESCE(length(embedding), 0) + ?2), 0) \
    + (SELECT COALESCE(SUM(length(a.data)), 0) FROM activations a JOIN samples s ON s.id = a.sample_id WHERE s.task = ?1) \
    + (SELECT COALESCE(SUM(length(input) + ?2), 0) FROM label_requests WHERE task = ?1) \
    FROM samples WHERE task = ?1";

/// The result of enforcing a disk budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Eviction {
    pub evicted: u64,
    /// What the task's samples hold afterwards.
    pub bytes: u64,
    /// Every class is down to its reservoir: still over budget, nothing more is evicted.
    pub at_reservoir: bool,
}

fn task_bytes(conn: &Connection, task: &str) -> rusqlite::Result<u64> {
    conn.query_row(TASK_BYTES_SQL, params![task, ROW_OVERHEAD_BYTES], |r| r.get::<_, i64>(0)).map(|n| n as u64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    label TEXT NOT NULL,
    split INTEGER NOT NULL,
    input_kind TEXT NOT NULL,
    input_shape TEXT NOT NULL,
    input BLOB NOT NULL,
    weight REAL NOT NULL,
    source TEXT,
    timestamp_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    correction INTEGER NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS samples_by_task ON samples(task, split, label);
-- The samples still waiting for their embedding: few, looked up every tick.
CREATE INDEX IF NOT EXISTS samples_awaiting_embedding ON samples(task, id) WHERE embedding IS NULL;
CREATE TABLE IF NOT EXISTS marks (
    task TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (task, name)
);
-- Prefix activations of bundles cut for training above a prefix: a cache (dropped before any
-- sample is evicted), each row under the key of the prefix that computed it.
CREATE TABLE IF NOT EXISTS activations (
    sample_id INTEGER PRIMARY KEY,
    cache_key TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS samples_drop_activation AFTER DELETE ON samples
BEGIN
    DELETE FROM activations WHERE sample_id = OLD.id;
END;
CREATE TABLE IF NOT EXISTS labels (
    task TEXT NOT NULL,
    label TEXT NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    PRIMARY KEY (task, label)
);
-- Samples whose labels their neighbours doubt (the latest search's findings, per task): kept out
-- of training and the holdout unless an operator judged the label right. Those only an adapter
-- doubts (by_adapter) are kept out of training alone: a holdout without them would be one the
-- adapter agrees with everywhere, and no candidate could beat it there.
CREATE TABLE IF NOT EXISTS suspects (
    sample_id INTEGER PRIMARY KEY,
    task TEXT NOT NULL,
    suggested TEXT NOT NULL,
    given_probability REAL NOT NULL,
    suggested_probability REAL NOT NULL,
    found_ms INTEGER NOT NULL,
    by_adapter INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS suspects_by_task ON suspects(task);
-- An operator's word on a sample's label: right (it trains, and is not suspected again) or
-- wrong (it never trains, nor counts in the holdout).
CREATE TABLE IF NOT EXISTS label_reviews (
    sample_id INTEGER PRIMARY KEY,
    label_is_right INTEGER NOT NULL,
    by TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
-- Label requests sent: the input asked about (kept until it expires), what serving answered,
-- and the answer once a sample carrying the request's id arrives.
CREATE TABLE IF NOT EXISTS label_requests (
    id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    input_kind TEXT NOT NULL,
    input_shape TEXT NOT NULL,
    input BLOB NOT NULL,
    predicted TEXT NOT NULL,
    strategy TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    confidence REAL NOT NULL DEFAULT 0,
    answered_ms INTEGER,
    answer_label TEXT,
    answer_key TEXT
);
CREATE INDEX IF NOT EXISTS label_requests_by_task ON label_requests(task, created_ms);
CREATE TRIGGER IF NOT EXISTS samples_drop_suspicion AFTER DELETE ON samples
BEGIN
    DELETE FROM suspects WHERE sample_id = OLD.id;
    DELETE FROM label_reviews WHERE sample_id = OLD.id;
END;
";

/// Columns added since their table was first released: (table, column, declaration). A store
/// written before one opens and gains it, at its default.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // Label requests kept their confidence.
    ("label_requests", "confidence", "REAL NOT NULL DEFAULT 0"),
    // Suspects tell an adapter's doubts from the neighbours'.
    ("suspects", "by_adapter", "INTEGER NOT NULL DEFAULT 0"),
];

/// A condition on `samples`' `id`: among the suspects `$suspects` selects and not judged right,
/// or judged wrong.
macro_rules! doubted_sql {
    ($suspects:literal) => {
        concat!(
            "(id IN (",
            $suspects,
            ") AND id NOT IN (SELECT sample_id FROM label_reviews WHERE label_is_right = 1)) \
             OR id IN (SELECT sample_id FROM label_reviews WHERE label_is_right = 0)"
        )
    };
}

/// Samples that do not train: suspected and not judged right, or judged wrong.
const DOUBTED_SQL: &str = doubted_sql!("SELECT sample_id FROM suspects");

/// Samples that do not count in the holdout: the same, less those only an adapter doubts.
const DOUBTED_IN_HOLDOUT_SQL: &str = doubted_sql!("SELECT sample_id FROM suspects WHERE by_adapter = 0");

/// A label request as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRequestRow {
    pub id: String,
    pub task: String,
    pub input: SampleInput,
    pub predicted: String,
    /// The serving adapter's probability of `predicted`.
    pub confidence: f32,
    pub strategy: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// A task's label requests so far (expired ones included until they are forgotten).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    pub sent: u64,
    pub answered: u64,
    /// Answers that say serving was wrong: the requests that found an error.
    pub disagreed: u64,
    /// Neither answered nor expired.
    pub pending: u64,
}

/// A sample whose label the latest search doubts, or an operator judged, as `samples suspects`
/// lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SuspectRecord {
    pub key: String,
    pub label: String,
    /// What those who doubt it suggest (None: judged wrong by an operator, not suspected now).
    pub suggested: Option<String>,
    /// Who doubts it: "neighbours" (the search on the base model's embedding) or "adapter" (a
    /// promoted adapter's second look: kept out of training, not the holdout); None: not suspected.
    pub doubted_by: Option<&'static str>,
    pub given_probability: Option<f32>,
    pub suggested_probability: Option<f32>,
    pub source: Option<String>,
    pub split: &'static str,
    /// The operator's word: Some(true) the label is right, Some(false) it is wrong.
    pub label_is_right: Option<bool>,
}

/// One finding of a search, as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct SuspectRow {
    pub sample_id: i64,
    pub suggested: String,
    pub given_probability: f32,
    pub suggested_probability: f32,
    /// Doubted by an adapter's look, not by the neighbours: kept out of training, not the holdout.
    pub by_adapter: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl SampleStore {
    pub fn open(path: &Path, policy: SplitPolicy) -> Result<SampleStore, StoreError> {
        // The daemon's parts open the store at once as it starts. On a fresh file the first one
        // switches it to WAL, and SQLite answers the others "busy" without waiting (the busy
        // handler does not cover the journal-mode change): try again for a few seconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Self::open_once(path, policy) {
                Err(StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. })
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path, policy: SplitPolicy) -> Result<SampleStore, StoreError> {
        let err = |source| StoreError::Sqlite { path: path.to_path_buf(), source };
        let lost_wal = wal_missing(path);
        if lost_wal {
            tracing::error!(path = %path.display(), "the sample store's write-ahead log (-wal) is gone while its index (-shm) is not: samples committed since the last checkpoint, acknowledged to the broker, are lost; restore the -wal file from a backup if there is one");
        }
        let conn = Connection::open(path).map_err(err)?;
        // busy_timeout: a reader (a CLI `samples stats`) never makes the daemon's writer fail.
        // WAL + FULL: a committed transaction survives power loss.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        for (table, column, declaration) in ADDED_COLUMNS {
            let has: bool =
                conn.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2", params![table, column], |r| r.get(0)).map_err(err)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}")).map_err(err)?;
            }
        }
        Ok(SampleStore { conn, path: path.to_path_buf(), policy, lost_wal })
    }

    /// Whether the write-ahead log was missing at open while its index was there: something
    /// deleted it after a crash, with whatever it held (see `open`'s log line).
    pub fn lost_wal(&self) -> bool {
        self.lost_wal
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite { path: self.path.clone(), source }
    }

    pub fn policy(&self) -> SplitPolicy {
        self.policy
    }

    /// Store `samples` in one transaction (one fsync). Returns, per sample, whether it was new.
    /// When this returns Ok, every sample is durable and may be acknowledged.
    pub fn insert_batch(&mut self, samples: &[Sample]) -> Result<Vec<Inserted>, StoreError> {
        let received = now_ms();
        let path = self.path.clone();
        let err = move |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(&err)?;
        let mut out = Vec::with_capacity(samples.len());
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO samples (key, task, label, split, input_kind, input_shape, input, weight, source, timestamp_ms, received_ms, correction)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(&err)?;
            let mut label = tx.prepare_cached("INSERT OR IGNORE INTO labels (task, label, first_seen_ms) VALUES (?1, ?2, ?3)").map_err(&err)?;
            let mut stored = tx.prepare_cached("SELECT task, label FROM samples WHERE key = ?1").map_err(&err)?;
            // The first answer to a request stands, like the first label of a key.
            let mut answer = tx
                .prepare_cached(
                    "UPDATE label_requests SET answered_ms = ?3, answer_label = ?4, answer_key = ?5 WHERE id = ?1 AND task = ?2 AND answered_ms IS NULL",
                )
                .map_err(&err)?;
            for s in samples {
                let split = self.policy.split_of(&s.key);
                let (kind, shape, bytes) = encode_input(&s.input);
                let changed = insert
                    .execute(params![
                        s.key,
                        s.task,
                        s.label,
                        split as i64,
                        kind,
                        shape,
                        bytes,
                        s.weight as f64,
                        s.source,
                        s.timestamp_ms,
                        received,
                        s.correction
                    ])
                    .map_err(&err)?;
                if changed == 1 {
                    label.execute(params![s.task, s.label, received]).map_err(&err)?;
                    if let Some(request) = &s.request_id {
                        answer.execute(params![request, s.task, received, s.label, s.key]).map_err(&err)?;
                    }
                    out.push(Inserted::New(split));
                } else {
                    // A redelivery is harmless; the same key with another label is a conflict
                    // the sender should hear about (the first label stands: it may have trained).
                    let (kept_task, kept_label): (String, String) = stored.query_row(params![s.key], |r| Ok((r.get(0)?, r.get(1)?))).map_err(&err)?;
                    out.push(if kept_task == s.task && kept_label == s.label { Inserted::Duplicate } else { Inserted::Conflict { kept_task, kept_label } });
                }
            }
        }
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// Labels of `task` in the order they first appeared (class indices stay stable as it grows).
    pub fn labels(&self, task: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT label FROM labels WHERE task = ?1 ORDER BY first_seen_ms, rowid").map_err(self.err())?;
        let rows = stmt.query_map(params![task], |r| r.get::<_, String>(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    pub fn tasks(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT DISTINCT task FROM labels ORDER BY task").map_err(self.err())?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Bytes `task`'s samples hold: inputs, cached embeddings and a per-row allowance for the
    /// other columns and the index, and the inputs its label requests keep. What the disk
    /// budget counts.
    pub fn bytes(&self, task: &str) -> Result<u64, StoreError> {
        task_bytes(&self.conn, task).map_err(self.err())
    }

    /// Evict `task`'s samples until they fit `budget` bytes. Class-balanced, oldest first: each
    /// round takes the oldest samples of the class that has the most, operator corrections last,
    /// and never takes a class below `reservoir` samples, so rare classes stay. When every class
    /// is at its reservoir it stops over budget and says so.
    pub fn evict_to_budget(&mut self, task: &str, budget: u64, reservoir: u64) -> Result<Eviction, StoreError> {
        let mut evicted = 0;
        let tx = self.conn.transaction().map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })?;
        let err = |source| StoreError::Sqlite { path: self.path.clone(), source };
        let mut bytes = task_bytes(&tx, task).map_err(err)?;
        // Cached prefix activations go before any sample does: they can be computed again.
        if bytes > budget {
            tx.execute("DELETE FROM activations WHERE sample_id IN (SELECT id FROM samples WHERE task = ?1)", params![task]).map_err(err)?;
            bytes = task_bytes(&tx, task).map_err(err)?;
        }
        let mut at_reservoir = false;
        while bytes > budget {
            let largest: Option<(String, i64)> = tx
                .query_row(
                    "SELECT label, COUNT(*) AS n FROM samples WHERE task = ?1 GROUP BY label HAVING n > ?2 ORDER BY n DESC, label LIMIT 1",
                    params![task, reservoir as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            let Some((label, n)) = largest else {
                at_reservoir = true;
                break;
            };
            // As many of this class's rows as cover the excess, at its mean row size.
            let mean: f64 = tx
                .query_row(
                    "SELECT AVG(length(input) + COALESCE(length(embedding), 0) + ?3) FROM samples WHERE task = ?1 AND label = ?2",
                    params![task, label, ROW_OVERHEAD_BYTES],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let needed = ((bytes - budget) as f64 / mean.max(1.0)).ceil() as i64;
            let take = needed.clamp(1, (n - reservoir as i64).min(256));
            let removed = tx
                .execute(
                    "DELETE FROM samples WHERE id IN (SELECT id FROM samples WHERE task = ?1 AND label = ?2 ORDER BY correction, id LIMIT ?3)",
                    params![task, label, take],
                )
                .map_err(err)?;
            evicted += removed as u64;
            bytes = task_bytes(&tx, task).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(Eviction { evicted, bytes, at_reservoir })
    }

    /// Sample counts of `task` by split and label.
    pub fn counts(&self, task: &str) -> Result<BTreeMap<(Split, String), u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT split, label, COUNT(*) FROM samples WHERE task = ?1 GROUP BY split, label").map_err(self.err())?;
        let rows = stmt.query_map(params![task], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))).map_err(self.err())?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (split, label, n) = row.map_err(self.err())?;
            if let Some(split) = Split::from_i64(split) {
                out.insert((split, label), n as u64);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> Result<u64, StoreError> {
        self.conn.query_row("SELECT COUNT(*) FROM samples", [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(self.err())
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    pub fn get(&self, key: &str) -> Result<Option<StoredSample>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{SELECT_SAMPLE} WHERE key = ?1")).map_err(self.err())?;
        let row = stmt.query_row(params![key], read_row).optional().map_err(self.err())?;
        row.map(|r| self.decode_row(r)).transpose()
    }

    /// The samples of `task` in `split` that train and count in the holdout: all but those whose
    /// labels are doubted (suspected and not judged right, or judged wrong; in the holdout, those
    /// only an adapter doubts count), in arrival order.
    pub fn load_trusted(&self, task: &str, split: Split) -> Result<Vec<StoredSample>, StoreError> {
        let doubted = if matches!(split, Split::Holdout) { DOUBTED_IN_HOLDOUT_SQL } else { DOUBTED_SQL };
        self.query_samples(&format!("{SELECT_SAMPLE} WHERE task = ?1 AND split = ?2 AND NOT ({doubted}) ORDER BY id"), params![task, split as i64])
    }

    /// The newest `limit` samples of `task` with an embedding, of every split, that an operator
    /// has not judged wrong: what a search for wrong labels looks at. Oldest first.
    pub fn reviewable(&self, task: &str, limit: usize) -> Result<Vec<StoredSample>, StoreError> {
        self.query_samples(
            &format!(
                "SELECT * FROM ({SELECT_SAMPLE} WHERE task = ?1 AND embedding IS NOT NULL \
                 AND id NOT IN (SELECT sample_id FROM label_reviews WHERE label_is_right = 0) ORDER BY id DESC LIMIT ?2) ORDER BY id"
            ),
            params![task, limit as i64],
        )
    }

    /// Replace `task`'s suspects with the latest search's, in one transaction. Returns how many of
    /// them were not suspected before.
    pub fn replace_suspects(&mut self, task: &str, rows: &[SuspectRow]) -> Result<usize, StoreError> {
        let found = now_ms();
        let path = self.path.clone();
        let err = move |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(&err)?;
        let before: std::collections::HashSet<i64> = {
            let mut stmt = tx.prepare_cached("SELECT sample_id FROM suspects WHERE task = ?1").map_err(&err)?;
            let ids = stmt.query_map(params![task], |r| r.get::<_, i64>(0)).map_err(&err)?;
            ids.collect::<Result<_, _>>().map_err(&err)?
        };
        tx.execute("DELETE FROM suspects WHERE task = ?1", params![task]).map_err(&err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO suspects (sample_id, task, suggested, given_probability, suggested_probability, found_ms, by_adapter) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(&err)?;
            for r in rows {
                let row = params![r.sample_id, task, r.suggested, r.given_probability as f64, r.suggested_probability as f64, found, r.by_adapter];
                insert.execute(row).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(rows.iter().filter(|r| !before.contains(&r.sample_id)).count())
    }

    /// `task`'s suspects and judged samples, newest first.
    pub fn suspects(&self, task: &str) -> Result<Vec<SuspectRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT s.key, s.label, u.suggested, u.given_probability, u.suggested_probability, s.source, s.split, r.label_is_right, u.by_adapter \
                 FROM samples s LEFT JOIN suspects u ON u.sample_id = s.id LEFT JOIN label_reviews r ON r.sample_id = s.id \
                 WHERE s.task = ?1 AND (u.sample_id IS NOT NULL OR r.sample_id IS NOT NULL) ORDER BY s.id DESC",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![task], |r| {
                let split: i64 = r.get(6)?;
                Ok(SuspectRecord {
                    key: r.get(0)?,
                    label: r.get(1)?,
                    suggested: r.get(2)?,
                    doubted_by: r.get::<_, Option<bool>>(8)?.map(|by_adapter| if by_adapter { "adapter" } else { "neighbours" }),
                    given_probability: r.get::<_, Option<f64>>(3)?.map(|p| p as f32),
                    suggested_probability: r.get::<_, Option<f64>>(4)?.map(|p| p as f32),
                    source: r.get(5)?,
                    split: match Split::from_i64(split) {
                        Some(Split::Train) => "train",
                        Some(Split::Validation) => "validation",
                        Some(Split::Holdout) => "holdout",
                        None => "unknown",
                    },
                    label_is_right: r.get(7)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Record an operator's word on the label of the sample stored under `key`. Returns the
    /// sample's task and label, or None when no sample has that key.
    pub fn review_label(&mut self, key: &str, label_is_right: bool, by: &str) -> Result<Option<(String, String)>, StoreError> {
        let found: Option<(i64, String, String)> = self
            .conn
            .query_row("SELECT id, task, label FROM samples WHERE key = ?1", params![key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(self.err())?;
        let Some((id, task, label)) = found else { return Ok(None) };
        self.conn
            .execute(
                "INSERT INTO label_reviews (sample_id, label_is_right, by, at_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(sample_id) DO UPDATE SET label_is_right = excluded.label_is_right, by = excluded.by, at_ms = excluded.at_ms",
                params![id, label_is_right, by, now_ms()],
            )
            .map_err(self.err())?;
        Ok(Some((task, label)))
    }

    /// Keep a label request that is being sent.
    pub fn add_label_request(&mut self, r: &LabelRequestRow) -> Result<(), StoreError> {
        let (kind, shape, bytes) = encode_input(&r.input);
        self.conn
            .execute(
                "INSERT INTO label_requests (id, task, input_kind, input_shape, input, predicted, confidence, strategy, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![r.id, r.task, kind, shape, bytes, r.predicted, f64::from(r.confidence), r.strategy, r.created_ms, r.expires_ms],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// A label request as it was sent, while it is kept.
    pub fn label_request(&self, id: &str) -> Result<Option<LabelRequestRow>, StoreError> {
        type Row = (String, String, String, Vec<u8>, String, f64, String, i64, i64);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT task, input_kind, input_shape, input, predicted, confidence, strategy, created_ms, expires_ms FROM label_requests WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((task, kind, shape, bytes, predicted, confidence, strategy, created_ms, expires_ms)) = row else { return Ok(None) };
        let input = decode_input(&kind, &shape, bytes).map_err(|reason| StoreError::Corrupt {
            path: self.path.clone(),
            id: 0,
            reason: format!("label request {id}: {reason}"),
        })?;
        Ok(Some(LabelRequestRow { id: id.to_string(), task, input, predicted, confidence: confidence as f32, strategy, created_ms, expires_ms }))
    }

    /// Forget the requests that expired before `now_ms`, answered or not (an answer stays as
    /// its sample). Returns how many went.
    pub fn expire_label_requests(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        self.conn.execute("DELETE FROM label_requests WHERE expires_ms < ?1", params![now_ms]).map_err(self.err())
    }

    /// `task`'s label requests still kept: sent, answered, answered against what serving said,
    /// and waiting.
    pub fn label_request_counts(&self, task: &str, now_ms: i64) -> Result<RequestCounts, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COUNT(answered_ms), COALESCE(SUM(answered_ms IS NOT NULL AND answer_label != predicted), 0), \
                 COALESCE(SUM(answered_ms IS NULL AND expires_ms >= ?2), 0) FROM label_requests WHERE task = ?1",
                params![task, now_ms],
                |r| {
                    Ok(RequestCounts {
                        sent: r.get::<_, i64>(0)? as u64,
                        answered: r.get::<_, i64>(1)? as u64,
                        disagreed: r.get::<_, i64>(2)? as u64,
                        pending: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .map_err(self.err())
    }

    /// How many samples of `task` each source sent (samples without one are not counted).
    pub fn samples_per_source(&self, task: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT source, COUNT(*) FROM samples WHERE task = ?1 AND source IS NOT NULL GROUP BY source").map_err(self.err())?;
        let rows = stmt.query_map(params![task], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Sample ids an operator judged right (never suspected again).
    pub fn labels_judged_right(&self, task: &str) -> Result<std::collections::HashSet<i64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT r.sample_id FROM label_reviews r JOIN samples s ON s.id = r.sample_id WHERE s.task = ?1 AND r.label_is_right = 1")
            .map_err(self.err())?;
        let ids = stmt.query_map(params![task], |r| r.get::<_, i64>(0)).map_err(self.err())?;
        ids.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Every sample of `task` in `split`, oldest first.
    pub fn load(&self, task: &str, split: Split) -> Result<Vec<StoredSample>, StoreError> {
        self.query_samples(&format!("{SELECT_SAMPLE} WHERE task = ?1 AND split = ?2 ORDER BY id"), params![task, split as i64])
    }

    /// Cache the backbone's embedding of a sample, so head training never re-runs the backbone.
    pub fn set_embedding(&mut self, id: i64, embedding: &[f32]) -> Result<(), StoreError> {
        self.set_embeddings(&[(id, embedding.to_vec())])
    }

    /// The same for many samples, in one transaction.
    pub fn set_embeddings(&mut self, rows: &[(i64, Vec<f32>)]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = move |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut update = tx.prepare_cached("UPDATE samples SET embedding = ?1 WHERE id = ?2").map_err(&err)?;
            for (id, embedding) in rows {
                let bytes: Vec<u8> = embedding.iter().flat_map(|x| x.to_le_bytes()).collect();
                update.execute(params![bytes, id]).map_err(&err)?;
            }
        }
        tx.commit().map_err(&err)
    }

    /// The prefix activations kept for `ids`, with the key each was computed under.
    pub fn activations(&self, ids: &[i64]) -> Result<HashMap<i64, (String, Vec<f32>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT cache_key, data FROM activations WHERE sample_id = ?1").map_err(self.err())?;
        let mut found = HashMap::new();
        for &id in ids {
            let row: Option<(String, Vec<u8>)> = stmt.query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(self.err())?;
            if let Some((key, data)) = row {
                found.insert(id, (key, f32s_from_le(&data)));
            }
        }
        Ok(found)
    }

    /// Keep prefix activations of `task`'s samples under `key`, replacing what they had, while
    /// the task stays within `budget` bytes (0: no budget): a cache never pushes samples out.
    /// Returns how many rows were kept.
    pub fn set_activations(&mut self, task: &str, key: &str, rows: &[(i64, Vec<f32>)], budget: u64) -> Result<usize, StoreError> {
        let err = |source| StoreError::Sqlite { path: self.path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let mut room = if budget == 0 { u64::MAX } else { budget.saturating_sub(task_bytes(&tx, task).map_err(err)?) };
        let mut kept = 0;
        {
            let mut insert = tx.prepare_cached("INSERT OR REPLACE INTO activations (sample_id, cache_key, data) VALUES (?1, ?2, ?3)").map_err(err)?;
            for (id, values) in rows {
                let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                if bytes.len() as u64 > room {
                    break;
                }
                room -= bytes.len() as u64;
                insert.execute(params![id, key, bytes]).map_err(err)?;
                kept += 1;
            }
        }
        tx.commit().map_err(err)?;
        Ok(kept)
    }

    /// Up to `limit` samples of `task` whose embedding is not cached yet, oldest first.
    pub fn missing_embeddings(&self, task: &str, limit: usize) -> Result<Vec<StoredSample>, StoreError> {
        self.query_samples(&format!("{SELECT_SAMPLE} WHERE task = ?1 AND embedding IS NULL ORDER BY id LIMIT ?2"), params![task, limit as i64])
    }

    /// The oldest row of `task` whose embedding is not cached yet.
    pub fn first_missing_embedding(&self, task: &str) -> Result<Option<i64>, StoreError> {
        self.conn.query_row("SELECT MIN(id) FROM samples WHERE task = ?1 AND embedding IS NULL", params![task], |r| r.get(0)).map_err(self.err())
    }

    /// Samples of `task` stored after row `after_id` (any split), oldest first, at most `limit`.
    pub fn load_after(&self, task: &str, after_id: i64, limit: usize) -> Result<Vec<StoredSample>, StoreError> {
        self.query_samples(&format!("{SELECT_SAMPLE} WHERE task = ?1 AND id > ?2 ORDER BY id LIMIT ?3"), params![task, after_id, limit as i64])
    }

    /// The newest `limit` samples of `task`, oldest of them first.
    pub fn latest(&self, task: &str, limit: usize) -> Result<Vec<StoredSample>, StoreError> {
        let mut out = self.query_samples(&format!("{SELECT_SAMPLE} WHERE task = ?1 ORDER BY id DESC LIMIT ?2"), params![task, limit as i64])?;
        out.reverse();
        Ok(out)
    }

    /// How many samples of `task` stored after row `after_id` a job could train on now: those
    /// before the first one still waiting for its embedding (a job trains on that prefix).
    pub fn count_ready_after(&self, task: &str, after_id: i64) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM samples WHERE task = ?1 AND id > ?2 \
                 AND id < COALESCE((SELECT MIN(id) FROM samples WHERE task = ?1 AND embedding IS NULL), ?3)",
                params![task, after_id, i64::MAX],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// How many samples of `task` were stored after row `after_id`.
    pub fn count_after(&self, task: &str, after_id: i64) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM samples WHERE task = ?1 AND id > ?2", params![task, after_id], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// The newest row id of `task` (0 when it has none).
    pub fn last_id(&self, task: &str) -> Result<i64, StoreError> {
        self.conn.query_row("SELECT COALESCE(MAX(id), 0) FROM samples WHERE task = ?1", params![task], |r| r.get(0)).map_err(self.err())
    }

    /// A named position the adapt loop keeps per task (e.g. the last sample a job started from).
    pub fn mark(&self, task: &str, name: &str) -> Result<Option<i64>, StoreError> {
        self.conn.query_row("SELECT value FROM marks WHERE task = ?1 AND name = ?2", params![task, name], |r| r.get(0)).optional().map_err(self.err())
    }

    pub fn set_mark(&mut self, task: &str, name: &str, value: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO marks (task, name, value) VALUES (?1, ?2, ?3) ON CONFLICT(task, name) DO UPDATE SET value = excluded.value",
                params![task, name, value],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The samples `sql` (a [`SELECT_SAMPLE`] query) selects with `params`, decoded.
    fn query_samples(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<StoredSample>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.err())?;
        let rows = stmt.query_map(params, read_row).map_err(self.err())?;
        rows.map(|r| r.map_err(self.err()).and_then(|r| self.decode_row(r))).collect()
    }

    fn decode_row(&self, r: RawRow) -> Result<StoredSample, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { path: self.path.clone(), id: r.id, reason };
        let split = Split::from_i64(r.split).ok_or_else(|| corrupt(format!("split {}", r.split)))?;
        let input = decode_input(&r.input_kind, &r.input_shape, r.input).map_err(corrupt)?;
        Ok(StoredSample {
            id: r.id,
            sample: Sample {
                key: r.key,
                task: r.task,
                label: r.label,
                input,
                weight: r.weight as f32,
                source: r.source,
                timestamp_ms: r.timestamp_ms,
                correction: r.correction,
                request_id: None,
            },
            split,
            received_ms: r.received_ms,
            embedding: r.embedding.map(|b| f32s_from_le(&b)),
        })
    }
}

const SELECT_SAMPLE: &str =
    "SELECT id, key, task, label, split, input_kind, input_shape, input, weight, source, timestamp_ms, received_ms, correction, embedding FROM samples";

struct RawRow {
    id: i64,
    key: String,
    task: String,
    label: String,
    split: i64,
    input_kind: String,
    input_shape: String,
    input: Vec<u8>,
    weight: f64,
    source: Option<String>,
    timestamp_ms: i64,
    received_ms: i64,
    correction: bool,
    embedding: Option<Vec<u8>>,
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        id: r.get(0)?,
        key: r.get(1)?,
        task: r.get(2)?,
        label: r.get(3)?,
        split: r.get(4)?,
        input_kind: r.get(5)?,
        input_shape: r.get(6)?,
        input: r.get(7)?,
        weight: r.get(8)?,
        source: r.get(9)?,
        timestamp_ms: r.get(10)?,
        received_ms: r.get(11)?,
        correction: r.get(12)?,
        embedding: r.get(13)?,
    })
}

fn encode_input(input: &SampleInput) -> (&'static str, String, Vec<u8>) {
    match input {
        SampleInput::Text(t) => ("text", "[]".into(), t.as_bytes().to_vec()),
        SampleInput::Tensor(t) => {
            let shape = format!("[{}]", t.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(","));
            match &t.data {
                HostData::F32(v) => ("f32", shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::I64(v) => ("i64", shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            }
        }
        SampleInput::Image(p) => ("u8hwc", format!("[{},{},{}]", p.height, p.width, p.channels), p.data.clone()),
    }
}

fn decode_input(kind: &str, shape: &str, bytes: Vec<u8>) -> Result<SampleInput, String> {
    let shape: Vec<usize> = serde_json::from_str(shape).map_err(|e| format!("input shape {shape:?}: {e}"))?;
    let tensor = match kind {
        "text" => return String::from_utf8(bytes).map(SampleInput::Text).map_err(|e| format!("text input: {e}")),
        "f32" => HostTensor::f32(shape, f32s_from_le(&bytes)),
        "i64" => HostTensor::i64(shape, i64s_from_le(&bytes)),
        "u8hwc" => {
            let [height, width, channels] = shape[..] else { return Err(format!("image input of shape {shape:?}")) };
            if height.saturating_mul(width).saturating_mul(channels) != bytes.len() {
                return Err(format!("image input of {height}x{width}x{channels} holds {} bytes", bytes.len()));
            }
            return Ok(SampleInput::Image(crate::preprocess::Pixels { height, width, channels, data: bytes }));
        }
        other => return Err(format!("input kind {other:?}")),
    };
    tensor.map(SampleInput::Tensor).map_err(|e| format!("input: {e}"))
}
