//! What the operator commands of the CLI do: ask a running daemon (over its loopback HTTP API)
//! or read a state directory (adapters on disk, which works with the daemon stopped too). Each
//! returns JSON for `--json` and a human rendering, so scripts and people read the same facts.

use std::path::Path;

use adaptd_adapters::AdapterStore;
use adaptd_daemon::samples::Split;
use adaptd_protocol::{CommandReply, ImportRequest, TaskStatus};
use serde::Serialize;

use crate::client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon answered, and said no (unknown task, nothing to roll back to, ...).
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    State { path: String, reason: String },
}

impl OpsError {
    /// Exit codes from sysexits.h, so scripts can tell "try later" from "you asked wrongly".
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::Client(ClientError::Connect { .. }) => 69, // EX_UNAVAILABLE
            OpsError::Client(_) => 76,                           // EX_PROTOCOL
            OpsError::Refused(_) => 1,
            OpsError::State { .. } => 66, // EX_NOINPUT
        }
    }
}

/// Every task's state from a running daemon.
pub fn status(client: &Client) -> Result<Vec<TaskStatus>, OpsError> {
    let r = client.get("/v1/tasks")?;
    if !r.ok() {
        return Err(OpsError::Refused(r.message()));
    }
    serde_json::from_value(r.body).map_err(|e| OpsError::Refused(format!("the daemon's status does not read as this CLI's: {e}")))
}

/// The table `adaptd status` prints.
pub fn render_status(statuses: &[TaskStatus]) -> String {
    adaptd_protocol::status::render_statuses(statuses, adaptd_daemon::events::now_ms())
}

/// Ask the running daemon to import the adapter exported in `dir` (an absolute path) as
/// `task`'s next version.
pub fn import_through_daemon(client: &Client, task: &str, dir: &Path) -> Result<String, OpsError> {
    let request = serde_json::to_value(ImportRequest { dir: dir.to_path_buf() }).map_err(|e| OpsError::Refused(e.to_string()))?;
    let r = client.post(&format!("/v1/tasks/{task}/import"), Some(&request))?;
    command_reply(r)
}

/// Ask the daemon to act on `task`: `train`, `rollback` or `pin/{version}`.
pub fn command(client: &Client, task: &str, action: &str) -> Result<String, OpsError> {
    command_reply(client.post(&format!("/v1/tasks/{task}/{action}"), None)?)
}

/// A command's [`CommandReply`]: its message, or why it was refused.
fn command_reply(r: crate::client::Response) -> Result<String, OpsError> {
    match serde_json::from_value::<CommandReply>(r.body.clone()) {
        Ok(reply) if reply.ok && r.ok() => Ok(reply.message),
        Ok(reply) => Err(OpsError::Refused(reply.message)),
        Err(_) => Err(OpsError::Refused(r.message())),
    }
}

/// One row of `adapters list`: a kept version, one that could not be read, or the base model
/// (version 0) where it serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterRow {
    pub task: String,
    pub version: u64,
    pub serving: bool,
    /// `head`, `lora`, or `base`; none for an unreadable version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub kept: Option<KeptVersion>,
    /// Why the version could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a readable version's manifest says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeptVersion {
    /// How many labels its head has.
    pub labels: usize,
    pub parent_version: Option<u64>,
    pub created_unix_ms: u64,
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub samples: adaptd_adapters::files::SampleCounts,
    /// The gate's one-line summary, when the gate judged it.
    pub decision: Option<String>,
}

/// The adapters kept on disk under `state_dir`, newest first, with the one that serves marked.
pub fn list_adapters(state_dir: &Path, only_task: Option<&str>) -> Result<Vec<AdapterRow>, OpsError> {
    let root = state_dir.join("adapters");
    if !root.is_dir() {
        return Err(OpsError::State { path: root.display().to_string(), reason: "no adapter store here (is this the daemon's state directory?)".into() });
    }
    let store = AdapterStore::open(&root).map_err(|e| OpsError::State { path: root.display().to_string(), reason: e.to_string() })?;
    let state_err = |e: adaptd_adapters::store::StoreError| OpsError::State { path: root.display().to_string(), reason: e.to_string() };
    let mut rows = Vec::new();
    for task in store.tasks().map_err(state_err)? {
        if only_task.is_some_and(|t| t != task) {
            continue;
        }
        let active = std::fs::read_to_string(root.join(&task).join(adaptd_daemon::registry::ACTIVE_FILE)).ok().and_then(|s| s.trim().parse::<u64>().ok());
        for version in store.versions(&task).map_err(state_err)?.into_iter().rev() {
            let row = match store.load(&task, version) {
                Ok(a) => {
                    let m = a.manifest;
                    AdapterRow {
                        task: task.clone(),
                        version,
                        serving: active == Some(version),
                        kind: Some(m.kind.name().to_string()),
                        kept: Some(KeptVersion {
                            labels: m.labels.len(),
                            parent_version: m.parent_version,
                            created_unix_ms: m.created_unix_ms,
                            metrics: m.metrics,
                            samples: m.samples,
                            decision: m.decision.map(|d| d.summary),
                        }),
                        error: None,
                    }
                }
                Err(e) => AdapterRow { task: task.clone(), version, serving: false, kind: None, kept: None, error: Some(e.to_string()) },
            };
            rows.push(row);
        }
        if active == Some(0) {
            rows.push(AdapterRow { task: task.clone(), version: 0, serving: true, kind: Some("base".into()), kept: None, error: None });
        }
    }
    Ok(rows)
}

pub fn render_adapters(rows: &[AdapterRow]) -> String {
    let mut out = format!("{:<16} {:>8} {:<5} {:>9} {:>9}  {}\n", "task", "version", "kind", "holdout", "samples", "decision");
    let none = || "–".to_string();
    for r in rows {
        let marker = if r.serving { "*" } else { " " };
        let kept = r.kept.as_ref();
        let holdout = kept.and_then(|k| k.metrics.get("holdout_accuracy")).map_or_else(none, |a| format!("{:.1}%", 100.0 * a));
        let samples = kept.map_or_else(none, |k| k.samples.train.to_string());
        let what = match (&r.error, kept.and_then(|k| k.decision.as_deref())) {
            (Some(e), _) => format!("UNREADABLE: {e}"),
            (None, decision) => decision.unwrap_or_default().to_string(),
        };
        out += &format!(
            "{:<16} {:>7}{marker} {:<5} {:>9} {:>9}  {}\n",
            r.task,
            format!("v{}", r.version),
            r.kind.as_deref().unwrap_or("?"),
            holdout,
            samples,
            what
        );
    }
    out + "(* serving)\n"
}

/// A task's labelled samples in the store: how many in all, and per label, per split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSamples {
    pub task: String,
    pub samples: u64,
    pub labels: std::collections::BTreeMap<String, SplitCounts>,
}

/// Samples of one label in each split.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitCounts {
    pub train: u64,
    pub validation: u64,
    pub holdout: u64,
}

/// Labelled samples in the store under `state_dir`: per task, split and label.
pub fn sample_stats(state_dir: &Path) -> Result<Vec<TaskSamples>, OpsError> {
    let (store, path) = open_store(state_dir)?;
    let state_err = |e: adaptd_daemon::samples::StoreError| OpsError::State { path: path.clone(), reason: e.to_string() };
    let mut tasks = Vec::new();
    for task in store.tasks().map_err(state_err)? {
        let mut stats = TaskSamples { task: task.clone(), samples: 0, labels: Default::default() };
        for ((split, label), n) in store.counts(&task).map_err(state_err)? {
            stats.samples += n;
            let counts = stats.labels.entry(label).or_default();
            match split {
                Split::Train => counts.train += n,
                Split::Validation => counts.validation += n,
                Split::Holdout => counts.holdout += n,
            }
        }
        tasks.push(stats);
    }
    Ok(tasks)
}

/// A task's samples whose labels are doubted or judged, and its senders by how often their
/// labels are suspected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskSuspects {
    pub task: String,
    pub suspects: Vec<adaptd_daemon::samples::SuspectRecord>,
    /// Senders with a suspect among their samples, the most suspected share first.
    pub sources: Vec<adaptd_protocol::SuspectSource>,
}

/// The sample store under `state_dir`, and its path as errors show it; refused when there is none.
fn open_store(state_dir: &Path) -> Result<(adaptd_daemon::samples::SampleStore, String), OpsError> {
    let path = state_dir.join(adaptd_daemon::samples::STORE_FILE);
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(OpsError::State { path: shown, reason: "no sample store here yet (nothing ingested, or not the daemon's state directory)".into() });
    }
    let store =
        adaptd_daemon::samples::SampleStore::open(&path, Default::default()).map_err(|e| OpsError::State { path: shown.clone(), reason: e.to_string() })?;
    Ok((store, shown))
}

/// Every task's (or `task`'s) samples whose labels the last search doubts or an operator judged.
pub fn suspects(state_dir: &Path, task: Option<&str>) -> Result<Vec<TaskSuspects>, OpsError> {
    let (store, path) = open_store(state_dir)?;
    let state_err = |e: adaptd_daemon::samples::StoreError| OpsError::State { path: path.clone(), reason: e.to_string() };
    let tasks = match task {
        Some(t) => vec![t.to_string()],
        None => store.tasks().map_err(state_err)?,
    };
    let mut out = Vec::new();
    for task in tasks {
        let suspects = store.suspects(&task).map_err(state_err)?;
        let per_source = store.samples_per_source(&task).map_err(state_err)?;
        let mut doubted: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for s in suspects.iter().filter(|s| s.suggested.is_some() && s.label_is_right != Some(true)) {
            if let Some(source) = s.source.as_deref() {
                *doubted.entry(source).or_default() += 1;
            }
        }
        let mut sources: Vec<adaptd_protocol::SuspectSource> = doubted
            .into_iter()
            .map(|(source, n)| adaptd_protocol::SuspectSource {
                source: source.to_string(),
                samples: per_source.get(source).copied().unwrap_or(n),
                suspects: n,
            })
            .collect();
        sources.sort_by(|a, b| (b.suspects * a.samples).cmp(&(a.suspects * b.samples)).then(a.source.cmp(&b.source)));
        out.push(TaskSuspects { task, suspects, sources });
    }
    Ok(out)
}

pub fn render_suspects(tasks: &[TaskSuspects]) -> String {
    let mut out = String::new();
    for t in tasks {
        let waiting = t.suspects.iter().filter(|s| s.label_is_right.is_none()).count();
        out += &format!("{}: {} suspect(s) waiting for a judgement, {} judged\n", t.task, waiting, t.suspects.len() - waiting);
        if t.suspects.is_empty() {
            continue;
        }
        out += &format!("  {:<28} {:<14} {:<14} {:>7} {:<11} {:<11} {:<14} {}\n", "key", "label", "suggested", "p(lab)", "by", "split", "source", "judged");
        for s in &t.suspects {
            let judged = match s.label_is_right {
                Some(true) => "right (trains)",
                Some(false) => "wrong (kept out)",
                None => "-",
            };
            out += &format!(
                "  {:<28} {:<14} {:<14} {:>7} {:<11} {:<11} {:<14} {}\n",
                s.key,
                s.label,
                s.suggested.as_deref().unwrap_or("-"),
                s.given_probability.map_or("-".into(), |p| format!("{p:.2}")),
                s.doubted_by.unwrap_or("-"),
                s.split,
                s.source.as_deref().unwrap_or("-"),
                judged
            );
        }
        for s in &t.sources {
            out += &format!(
                "  source {}: {} of its {} samples suspected ({:.0} %)\n",
                s.source,
                s.suspects,
                s.samples,
                100.0 * s.suspects as f64 / s.samples.max(1) as f64
            );
        }
    }
    out
}

/// An operator's word on a sample's label, as `samples judge` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judged {
    pub key: String,
    pub task: String,
    pub label: String,
    pub label_is_right: bool,
}

impl Judged {
    pub fn render(&self) -> String {
        if self.label_is_right {
            format!("{} ({}): label {:?} judged right; it trains from the next job on and is not suspected again\n", self.key, self.task, self.label)
        } else {
            format!(
                "{} ({}): label {:?} judged wrong; it never trains or counts in the holdout (publish it again under a new key with the right label)\n",
                self.key, self.task, self.label
            )
        }
    }
}

/// Record an operator's word on the label of the sample stored under `key`.
pub fn judge(state_dir: &Path, key: &str, label_is_right: bool, by: &str) -> Result<Judged, OpsError> {
    let (mut store, path) = open_store(state_dir)?;
    let judged = store.review_label(key, label_is_right, by).map_err(|e| OpsError::State { path: path.clone(), reason: e.to_string() })?;
    let Some((task, label)) = judged else { return Err(OpsError::Refused(format!("no sample has the key {key:?}"))) };
    Ok(Judged { key: key.to_string(), task, label, label_is_right })
}

pub fn render_sample_stats(stats: &[TaskSamples]) -> String {
    let mut out = format!("{:<16} {:<16} {:>8} {:>11} {:>8}\n", "task", "label", "train", "validation", "holdout");
    for t in stats {
        for (label, splits) in &t.labels {
            out += &format!("{:<16} {:<16} {:>8} {:>11} {:>8}\n", t.task, label, splits.train, splits.validation, splits.holdout);
        }
        out += &format!("{:<16} {:<16} {:>8}\n", t.task, "(all)", t.samples);
    }
    out
}

/// What `samples import` did with a file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleImport {
    pub file: std::path::PathBuf,
    /// New samples stored.
    pub stored: usize,
    /// Samples the store had already (by key), including conflicts.
    pub duplicates: usize,
    /// Keys the store had under another label: the stored label is kept.
    pub conflicts: Vec<LabelConflict>,
    /// Lines that are not a valid sample for this device, with the reason.
    pub refused: Vec<RefusedLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelConflict {
    pub key: String,
    pub label: String,
    pub kept_label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedLine {
    /// 1-based.
    pub line: usize,
    /// The decoder's error type.
    pub reason: &'static str,
    pub message: String,
}

impl SampleImport {
    pub fn render(&self) -> String {
        let mut text = format!("{}: {} stored, {} already there, {} refused\n", self.file.display(), self.stored, self.duplicates, self.refused.len());
        for c in &self.conflicts {
            text += &format!("  key {:?}: labelled {:?} here, {:?} kept\n", c.key, c.label, c.kept_label);
        }
        for r in &self.refused {
            text += &format!("  line {}: {}\n", r.line, r.message);
        }
        text
    }
}

/// Import labelled samples from a file of JSON lines (the MQTT sample format, one per line) into
/// the store under `state_dir`, checked against `bundle` like ingest checks them. Duplicates (by
/// key) are recognised; bad lines are refused with their line number and reason; good ones land.
pub fn import_samples(state_dir: &Path, bundle: &adaptd_adapters::Bundle, tasks: &[String], file: &Path, max_bytes: usize) -> Result<SampleImport, OpsError> {
    use adaptd_daemon::ingest::decode::{SampleSchema, decode_sample};
    let text = std::fs::read_to_string(file).map_err(|e| OpsError::State { path: file.display().to_string(), reason: e.to_string() })?;
    let schema = SampleSchema { manifest: &bundle.manifest, tasks, max_bytes };
    let now = adaptd_daemon::events::now_ms() as i64;
    let (mut samples, mut refused) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match decode_sample(line.as_bytes(), &schema, now) {
            Ok(s) => samples.push(s),
            Err(e) => refused.push(RefusedLine { line: i + 1, reason: e.error_type(), message: e.to_string() }),
        }
    }
    let path = state_dir.join(adaptd_daemon::samples::STORE_FILE);
    let state_err = |e: adaptd_daemon::samples::StoreError| OpsError::State { path: path.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(state_dir).map_err(|e| OpsError::State { path: state_dir.display().to_string(), reason: e.to_string() })?;
    let mut store = adaptd_daemon::samples::SampleStore::open(&path, Default::default()).map_err(state_err)?;
    let inserted = store.insert_batch(&samples).map_err(state_err)?;
    let new = inserted.iter().filter(|r| matches!(r, adaptd_daemon::samples::Inserted::New(_))).count();
    let conflicts = inserted
        .iter()
        .zip(&samples)
        .filter_map(|(r, s)| match r {
            adaptd_daemon::samples::Inserted::Conflict { kept_label, .. } => {
                Some(LabelConflict { key: s.key.clone(), label: s.label.clone(), kept_label: kept_label.clone() })
            }
            _ => None,
        })
        .collect();
    Ok(SampleImport { file: file.to_path_buf(), stored: new, duplicates: inserted.len() - new, conflicts, refused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapter_table_marks_what_serves_and_names_what_cannot_be_read() {
        let kept = KeptVersion {
            labels: 3,
            parent_version: Some(1),
            created_unix_ms: 0,
            metrics: [("holdout_accuracy".to_string(), 0.925)].into(),
            samples: adaptd_adapters::files::SampleCounts { train: 120, ..Default::default() },
            decision: Some("promoted: holdout +12.0 points".into()),
        };
        let rows = vec![
            AdapterRow { task: "sorter".into(), version: 3, serving: false, kind: None, kept: None, error: Some("bad checksum".into()) },
            AdapterRow { task: "sorter".into(), version: 2, serving: true, kind: Some("lora".into()), kept: Some(kept), error: None },
            AdapterRow { task: "gripper".into(), version: 0, serving: true, kind: Some("base".into()), kept: None, error: None },
        ];
        let table = render_adapters(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("v3 ") && lines[1].contains("UNREADABLE: bad checksum"), "{table}");
        assert!(lines[2].contains("v2*") && lines[2].contains("92.5%") && lines[2].contains("120") && lines[2].contains("promoted"), "{table}");
        assert!(lines[3].contains("v0*") && lines[3].contains("base") && lines[3].contains('–'), "{table}");
        // The JSON keeps the manifest's figures at the row's top level, and leaves out what a row lacks.
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[1]["samples"]["train"], 120);
        assert_eq!(json[1]["decision"], "promoted: holdout +12.0 points");
        assert!(json[0].get("kind").is_none() && json[2].get("labels").is_none(), "{json}");
    }

    #[test]
    fn an_import_report_names_each_refused_line_and_each_conflict() {
        let report = SampleImport {
            file: "samples.jsonl".into(),
            stored: 2,
            duplicates: 1,
            conflicts: vec![LabelConflict { key: "a".into(), label: "4".into(), kept_label: "3".into() }],
            refused: vec![RefusedLine { line: 4, reason: "shape", message: "input has 0 values, expected 64".into() }],
        };
        let text = report.render();
        assert!(text.starts_with("samples.jsonl: 2 stored, 1 already there, 1 refused"), "{text}");
        assert!(text.contains("key \"a\": labelled \"4\" here, \"3\" kept"), "{text}");
        assert!(text.contains("line 4: input has 0 values"), "{text}");
    }
}
