//! The adapter store: every version of every task's adapter, on disk.
//!
//! ```text
//! <root>/<task>/v000001/   adapter files (see `files`)
//! <root>/<task>/v000002/
//! ```
//!
//! A version directory is staged under a dot-name, fully written and fsynced, then renamed into
//! place, so a crash leaves either a complete version or none (staging leftovers are swept on
//! open). The newest versions are kept for rollback; older ones are pruned.

use std::path::{Path, PathBuf};

use crate::files::{Adapter, AdapterFileError, AdapterManifest};
use crate::fsutil::{self, FsError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] FsError),
    #[error(transparent)]
    File(#[from] AdapterFileError),
    #[error("task name {0:?} must be 1-64 characters of letters, digits, '-' and '_'")]
    TaskName(String),
    #[error("{task} v{version} already exists in the adapter store")]
    Exists { task: String, version: u64 },
}

impl StoreError {
    pub fn error_type(&self) -> &'static str {
        match self {
            StoreError::Io(_) => "io",
            StoreError::File(e) => e.error_type(),
            StoreError::TaskName(_) => "task_name",
            StoreError::Exists { .. } => "exists",
        }
    }
}

pub fn check_task_name(task: &str) -> Result<(), StoreError> {
    let ok = !task.is_empty() && task.len() <= 64 && task.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(StoreError::TaskName(task.to_string())) }
}

#[derive(Debug, Clone)]
pub struct AdapterStore {
    root: PathBuf,
}

impl AdapterStore {
    /// Open (creating) the store at `root` and sweep what a crash left behind: staging
    /// directories of versions not yet renamed into place, and temporary files of a pointer not
    /// yet renamed (each rename is its write's commit point, so what stands is consistent).
    pub fn open(root: impl Into<PathBuf>) -> Result<AdapterStore, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(fsutil::at(&root))?;
        let store = AdapterStore { root };
        for task in store.tasks()? {
            let dir = store.root.join(&task);
            for entry in std::fs::read_dir(&dir).map_err(fsutil::at(&dir))? {
                let entry = entry.map_err(fsutil::at(&dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    let removed = if entry.path().is_dir() { std::fs::remove_dir_all(entry.path()) } else { std::fs::remove_file(entry.path()) };
                    if removed.is_ok() {
                        tracing::info!(task, name, "removed what an interrupted write left behind");
                    }
                }
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version_dir(&self, task: &str, version: u64) -> PathBuf {
        self.root.join(task).join(format!("v{version:06}"))
    }

    /// Tasks that have a directory in the store, sorted.
    pub fn tasks(&self) -> Result<Vec<String>, StoreError> {
        let mut tasks = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(fsutil::at(&self.root))? {
            let entry = entry.map_err(fsutil::at(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && check_task_name(&name).is_ok() {
                tasks.push(name);
            }
        }
        tasks.sort();
        Ok(tasks)
    }

    /// Versions of `task` present on disk, oldest first.
    pub fn versions(&self, task: &str) -> Result<Vec<u64>, StoreError> {
        check_task_name(task)?;
        let dir = self.root.join(task);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut versions: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(fsutil::at(&dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix('v')).and_then(|v| v.parse().ok()))
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    /// Write `adapter` as a new version, atomically. Returns the manifest as written (with hashes).
    pub fn save(&self, adapter: &Adapter) -> Result<AdapterManifest, StoreError> {
        let (task, version) = (&adapter.manifest.task, adapter.manifest.version);
        check_task_name(task)?;
        let target = self.version_dir(task, version);
        if target.exists() {
            return Err(StoreError::Exists { task: task.clone(), version });
        }
        let task_dir = self.root.join(task);
        std::fs::create_dir_all(&task_dir).map_err(fsutil::at(&task_dir))?;
        let staging = task_dir.join(format!(".v{version:06}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(fsutil::at(&staging))?;
        let result = adapter.write_dir(&staging).map_err(StoreError::from).and_then(|m| {
            fsutil::publish_dir(&staging, &target)?;
            Ok(m)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result
    }

    /// Only a version's manifest (no tensors, no hash checks): enough to ask how it came.
    pub fn read_manifest(&self, task: &str, version: u64) -> Result<AdapterManifest, StoreError> {
        check_task_name(task)?;
        let path = self.version_dir(task, version).join(crate::files::ADAPTER_MANIFEST);
        let bytes = std::fs::read(&path).map_err(fsutil::at(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::from(AdapterFileError::Format { path, reason: e.to_string() }))
    }

    pub fn load(&self, task: &str, version: u64) -> Result<Adapter, StoreError> {
        check_task_name(task)?;
        Ok(Adapter::read_dir(&self.version_dir(task, version))?)
    }

    /// Remove all but the newest `keep` versions of `task`, never removing `protect` (the one serving).
    pub fn prune(&self, task: &str, keep: usize, protect: Option<u64>) -> Result<Vec<u64>, StoreError> {
        let versions = self.versions(task)?;
        let cut = versions.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for &v in &versions[..cut] {
            if Some(v) == protect {
                continue;
            }
            let dir = self.version_dir(task, v);
            std::fs::remove_dir_all(&dir).map_err(fsutil::at(&dir))?;
            removed.push(v);
        }
        Ok(removed)
    }
}
