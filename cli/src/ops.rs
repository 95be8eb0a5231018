//! What the operator commands of the CLI do: ask a running daemon (over its loopback HTTP API)
//! or read a state directory (adapters on disk, which works with the daemon stopped too). Each
//! returns JSON for `--json` and a human rendering, so scripts and people read the same facts.

use std::path::Path;

use adaptd_adapters::AdapterStore;
use adaptd_protocol::{CommandReply, ImportRequest, TaskStatus};
use serde_json::{Value, json};

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

/// The adapters kept on disk under `state_dir`, newest first, with the one that serves marked.
pub fn list_adapters(state_dir: &Path, only_task: Option<&str>) -> Result<Value, OpsError> {
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
                    let m = &a.manifest;
                    json!({ "task": task, "version": version, "serving": active == Some(version), "kind": m.kind, "labels": m.labels.len(),
                            "parent_version": m.parent_version, "created_unix_ms": m.created_unix_ms, "metrics": m.metrics, "samples": m.samples,
                            "decision": m.decision.as_ref().and_then(|d| d["summary"].as_str()) })
                }
                Err(e) => json!({ "task": task, "version": version, "serving": false, "error": e.to_string() }),
            };
            rows.push(row);
        }
        if active == Some(0) {
            rows.push(json!({ "task": task, "version": 0, "serving": true, "kind": "base" }));
        }
    }
    Ok(Value::Array(rows))
}

pub fn render_adapters(rows: &Value) -> String {
    let mut out = format!("{:<16} {:>8} {:<5} {:>9} {:>9}  {}\n", "task", "version", "kind", "holdout", "samples", "decision");
    for r in rows.as_array().into_iter().flatten() {
        let marker = if r["serving"] == true { "*" } else { " " };
        let holdout = r["metrics"]["holdout_accuracy"].as_f64().map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(|| "–".into());
        let what = r["error"].as_str().map(|e| format!("UNREADABLE: {e}")).or_else(|| r["decision"].as_str().map(str::to_string)).unwrap_or_default();
        out += &format!(
            "{:<16} {:>7}{marker} {:<5} {:>9} {:>9}  {}\n",
            r["task"].as_str().unwrap_or("?"),
            format!("v{}", r["version"]),
            r["kind"].as_str().unwrap_or("?"),
            holdout,
            r["samples"]["train"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "–".into()),
            what
        );
    }
    out + "(* serving)\n"
}

/// Labelled samples in the store under `state_dir`: per task, split and label.
pub fn sample_stats(state_dir: &Path) -> Result<Value, OpsError> {
    let path = state_dir.join(adaptd_daemon::samples::STORE_FILE);
    if !path.is_file() {
        return Err(OpsError::State {
            path: path.display().to_string(),
            reason: "no sample store here yet (nothing ingested, or not the daemon's state directory)".into(),
        });
    }
    let state_err = |e: adaptd_daemon::samples::StoreError| OpsError::State { path: path.display().to_string(), reason: e.to_string() };
    let store = adaptd_daemon::samples::SampleStore::open(&path, Default::default()).map_err(state_err)?;
    let mut tasks = Vec::new();
    for task in store.tasks().map_err(state_err)? {
        let mut labels: std::collections::BTreeMap<String, serde_json::Map<String, Value>> = std::collections::BTreeMap::new();
        let mut total = 0;
        for ((split, label), n) in store.counts(&task).map_err(state_err)? {
            total += n;
            labels.entry(label).or_default().insert(format!("{split:?}").to_lowercase(), json!(n));
        }
        tasks.push(json!({ "task": task, "samples": total, "labels": labels }));
    }
    Ok(Value::Array(tasks))
}

pub fn render_sample_stats(stats: &Value) -> String {
    let mut out = format!("{:<16} {:<16} {:>8} {:>11} {:>8}\n", "task", "label", "train", "validation", "holdout");
    for t in stats.as_array().into_iter().flatten() {
        for (label, splits) in t["labels"].as_object().into_iter().flatten() {
            out += &format!(
                "{:<16} {:<16} {:>8} {:>11} {:>8}\n",
                t["task"].as_str().unwrap_or("?"),
                label,
                splits["train"].as_u64().unwrap_or(0),
                splits["validation"].as_u64().unwrap_or(0),
                splits["holdout"].as_u64().unwrap_or(0)
            );
        }
        out += &format!("{:<16} {:<16} {:>8}\n", t["task"].as_str().unwrap_or("?"), "(all)", t["samples"]);
    }
    out
}

/// Import labelled samples from a file of JSON lines (the MQTT sample format, one per line) into
/// the store under `state_dir`, checked against `bundle` like ingest checks them. Duplicates (by
/// key) are recognised; bad lines are refused with their line number and reason; good ones land.
pub fn import_samples(state_dir: &Path, bundle: &adaptd_adapters::Bundle, tasks: &[String], file: &Path, max_bytes: usize) -> Result<Value, OpsError> {
    use adaptd_daemon::ingest::decode::{SampleSchema, decode_sample};
    let text = std::fs::read_to_string(file).map_err(|e| OpsError::State { path: file.display().to_string(), reason: e.to_string() })?;
    let schema = SampleSchema { manifest: &bundle.manifest, tasks, max_bytes };
    let now = adaptd_daemon::events::now_ms() as i64;
    let (mut samples, mut refused) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match decode_sample(line.as_bytes(), &schema, now) {
            Ok(s) => samples.push(s),
            Err(e) => refused.push(json!({ "line": i + 1, "reason": e.error_type(), "message": e.to_string() })),
        }
    }
    let path = state_dir.join(adaptd_daemon::samples::STORE_FILE);
    let state_err = |e: adaptd_daemon::samples::StoreError| OpsError::State { path: path.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(state_dir).map_err(|e| OpsError::State { path: state_dir.display().to_string(), reason: e.to_string() })?;
    let mut store = adaptd_daemon::samples::SampleStore::open(&path, Default::default()).map_err(state_err)?;
    let inserted = store.insert_batch(&samples).map_err(state_err)?;
    let new = inserted.iter().filter(|r| matches!(r, adaptd_daemon::samples::Inserted::New(_))).count();
    let conflicts: Vec<Value> = inserted
        .iter()
        .zip(&samples)
        .filter_map(|(r, s)| match r {
            adaptd_daemon::samples::Inserted::Conflict { kept_label, .. } => Some(json!({ "key": s.key, "label": s.label, "kept_label": kept_label })),
            _ => None,
        })
        .collect();
    Ok(json!({ "file": file, "stored": new, "duplicates": inserted.len() - new, "conflicts": conflicts, "refused": refused }))
}
