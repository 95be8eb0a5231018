//! The adapter registry: which adapter serves each task, swapped atomically.
//!
//! Each task's serving state is an immutable [`Serving`] behind an `ArcSwap`. The engine loads it
//! once per batch, so no batch mixes adapters and in-flight requests finish on the adapter they
//! started with. Promotion writes the adapter's files atomically, records the task's active
//! version atomically (`<store>/<task>/active`), and only then swaps the pointer. On start the
//! registry recovers each task's active version; if that one is unreadable it falls back to the
//! next older version, and then to the base model, saying so for each step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use adaptd_adapters::bundle::Bundle;
use adaptd_adapters::files::{Adapter, AdapterFileError, AdapterManifest};
use adaptd_adapters::fsutil;
use adaptd_adapters::head::Head;
use adaptd_adapters::slots::no_adapter_inputs;
use adaptd_adapters::store::{AdapterStore, StoreError, check_task_name};
use adaptd_adapters::tensor::HostTensor;
use arc_swap::ArcSwap;

use crate::traffic::BaseRouter;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Adapter(#[from] AdapterFileError),
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    #[error("task {task:?} has no version {version} on disk")]
    NoSuchVersion { task: String, version: u64 },
    #[error("adapter {id} is not newer than the serving v{serving}")]
    NotNewer { id: String, serving: u64 },
    #[error("adapter {id} routes base-domain inputs to the base model, which needs {reason}")]
    NoRouting { id: String, reason: &'static str },
}

impl RegistryError {
    pub fn error_type(&self) -> &'static str {
        match self {
            RegistryError::Store(e) => e.error_type(),
            RegistryError::Adapter(e) => e.error_type(),
            RegistryError::UnknownTask(_) => "unknown_task",
            RegistryError::NoSuchVersion { .. } => "no_such_version",
            RegistryError::NotNewer { .. } => "not_newer",
            RegistryError::NoRouting { .. } => "no_routing",
        }
    }
}

/// The bundle's LoRA graph inputs for one adapter, padded and scaled once at promotion.
#[derive(Debug)]
pub struct LoraInputs {
    /// Unique per promotion, so the engine can cache runtime values per adapter.
    pub key: u64,
    pub tensors: Vec<HostTensor>,
}

/// What serves a task: immutable, replaced whole on promotion or rollback.
#[derive(Debug)]
pub struct Serving {
    pub task: String,
    /// 0 is the base model.
    pub version: u64,
    /// `task@vN`, made once: every answered row carries it (shared, not copied).
    pub id: Arc<str>,
    pub labels: Arc<[String]>,
    /// None: the base model's own classifier output.
    pub head: Option<Head>,
    pub lora: Arc<LoraInputs>,
    pub manifest: Option<AdapterManifest>,
    /// Rows that look like the base domain are answered by the base model.
    pub route: Option<BaseRoute>,
}

/// How a routed adapter answers base-domain rows: the base model's LoRA inputs (none) and, per
/// label of the adapter, the base classifier's output for it.
#[derive(Debug)]
pub struct BaseRoute {
    pub router: Arc<BaseRouter>,
    pub base_lora: Arc<LoraInputs>,
    /// For each of the adapter's labels, its index among the base model's labels.
    pub base_index: Vec<Option<usize>>,
}

impl Serving {
    pub fn adapter_id(&self) -> Arc<str> {
        self.id.clone()
    }

    /// The id of `task`'s version `version`.
    pub fn id_of(task: &str, version: u64) -> Arc<str> {
        format!("{task}@v{version}").into()
    }
}

/// What recovery did for a task on start.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    Restored {
        task: String,
        version: u64,
    },
    /// A version could not be read; the registry moved on to an older one.
    Skipped {
        task: String,
        version: u64,
        reason: String,
    },
    /// No readable version: the task serves the base model.
    Base {
        task: String,
    },
}

pub struct Registry {
    bundle: Bundle,
    store: AdapterStore,
    keep_versions: usize,
    base_lora: Arc<LoraInputs>,
    tasks: RwLock<BTreeMap<String, Arc<ArcSwap<Serving>>>>,
    next_key: AtomicU64,
    /// The highest version handed out per task (see `next_version`).
    reserved: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Built from the bundle's retention set on first use.
    router: OnceLock<Result<Arc<BaseRouter>, &'static str>>,
}

/// `<store>/<task>/active`: the version that serves (0: the base model).
pub const ACTIVE_FILE: &str = "active";

impl Registry {
    /// Open the registry for `bundle` over `store`, recovering every task found on disk.
    pub fn open(bundle: Bundle, store: AdapterStore, keep_versions: usize) -> Result<(Registry, Vec<Recovery>), RegistryError> {
        let base_lora = Arc::new(LoraInputs { key: 0, tensors: no_adapter_inputs(&bundle.manifest) });
        let registry = Registry {
            bundle,
            store,
            keep_versions: keep_versions.max(1),
            base_lora,
            tasks: RwLock::new(BTreeMap::new()),
            next_key: AtomicU64::new(1),
            reserved: std::sync::Mutex::new(BTreeMap::new()),
            router: OnceLock::new(),
        };
        let mut events = Vec::new();
        for task in registry.store.tasks()? {
            let serving = registry.recover(&task, &mut events)?;
            registry.tasks.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(task, Arc::new(ArcSwap::from_pointee(serving)));
        }
        Ok((registry, events))
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    /// The serving state of `task`; the engine calls this once per batch.
    pub fn current(&self, task: &str) -> Option<Arc<Serving>> {
        self.tasks.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(task).map(|slot| slot.load_full())
    }

    pub fn tasks(&self) -> Vec<String> {
        self.tasks.read().unwrap_or_else(std::sync::PoisonError::into_inner).keys().cloned().collect()
    }

    /// Make sure `task` exists, serving the base model until an adapter is promoted.
    pub fn ensure_task(&self, task: &str) -> Result<Arc<Serving>, RegistryError> {
        check_task_name(task)?;
        let mut tasks = self.tasks.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = tasks.entry(task.to_string()).or_insert_with(|| Arc::new(ArcSwap::from_pointee(self.base_serving(task))));
        Ok(slot.load_full())
    }

    /// Validate `adapter` against the bundle, write it, record it as active, then swap it in.
    pub fn promote(&self, adapter: Adapter) -> Result<Arc<Serving>, RegistryError> {
        adapter.check_fits(&self.bundle)?;
        let task = adapter.manifest.task.clone();
        let serving_now = self.ensure_task(&task)?;
        if adapter.manifest.version <= serving_now.version {
            return Err(RegistryError::NotNewer { id: adapter.manifest.id(), serving: serving_now.version });
        }
        let mut adapter = adapter;
        adapter.manifest.promoted_unix_ms = Some(crate::events::now_ms());
        let written = self.store.save(&adapter)?;
        let serving = Arc::new(self.serving_from(Adapter { manifest: written, ..adapter })?);
        self.activate(serving.clone())?;
        self.store.prune(&task, self.keep_versions, Some(serving.version))?;
        Ok(serving)
    }

    /// What serving `adapter` would look like, without promoting it: the gate evaluates
    /// candidates through the engine with this.
    pub fn preview(&self, adapter: Adapter) -> Result<Arc<Serving>, RegistryError> {
        Ok(Arc::new(self.serving_from(adapter)?))
    }

    /// What stored `version` of `task` would serve (0: the base model), without activating it.
    pub fn stored(&self, task: &str, version: u64) -> Result<Arc<Serving>, RegistryError> {
        if version == 0 {
            return Ok(self.base(task));
        }
        Ok(Arc::new(self.serving_from(self.store.load(task, version)?)?))
    }

    /// The base model serving `task` (version 0), for comparisons.
    pub fn base(&self, task: &str) -> Arc<Serving> {
        Arc::new(self.base_serving(task))
    }

    /// The version number a new adapter of `task` gets: above every version on disk and the one serving.
    /// Reserved: a job that trains it and an import that arrives meanwhile never get the same one.
    pub fn next_version(&self, task: &str) -> Result<u64, RegistryError> {
        let on_disk = self.store.versions(task)?.last().copied().unwrap_or(0);
        let serving = self.current(task).map_or(0, |s| s.version);
        let mut reserved = self.reserved.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = reserved.entry(task.to_string()).or_insert(0);
        *slot = (*slot).max(on_disk).max(serving) + 1;
        Ok(*slot)
    }

    /// Keep `adapter` (made on another device, exported) as the next version of `task` (its own
    /// task when None), not serving: an operator pins it. Checked against the bundle first.
    pub fn import(&self, mut adapter: Adapter, task: Option<String>) -> Result<AdapterManifest, RegistryError> {
        adapter.check_fits(&self.bundle)?;
        if let Some(task) = task {
            check_task_name(&task)?;
            adapter.manifest.task = task;
        }
        adapter.manifest.version = self.next_version(&adapter.manifest.task)?;
        // Promoted elsewhere is not promoted here: it serves once an operator pins it.
        adapter.manifest.promoted_unix_ms = None;
        Ok(self.store.save(&adapter)?)
    }

    /// Serve the newest readable version older than the current one (or the base model).
    pub fn rollback(&self, task: &str) -> Result<(Arc<Serving>, Vec<Recovery>), RegistryError> {
        let current = self.current(task).ok_or_else(|| RegistryError::UnknownTask(task.to_string()))?;
        let mut events = Vec::new();
        let older: Vec<u64> = self.store.versions(task)?.into_iter().filter(|&v| v < current.version).rev().collect();
        let serving = self.first_readable(task, &older, &mut events)?;
        let serving = Arc::new(serving);
        self.activate(serving.clone())?;
        Ok((serving, events))
    }

    /// Serve a specific version that is on disk, or 0 for the base model (an operator's pin).
    pub fn pin(&self, task: &str, version: u64) -> Result<Arc<Serving>, RegistryError> {
        check_task_name(task)?;
        let serving = if version == 0 {
            Arc::new(self.base_serving(task))
        } else {
            if !self.store.versions(task)?.contains(&version) {
                return Err(RegistryError::NoSuchVersion { task: task.to_string(), version });
            }
            Arc::new(self.serving_from(self.store.load(task, version)?)?)
        };
        self.ensure_task(task)?;
        self.activate(serving.clone())?;
        Ok(serving)
    }

    fn activate(&self, serving: Arc<Serving>) -> Result<(), RegistryError> {
        let path = self.active_path(&serving.task);
        // A task that never had an adapter has no directory yet (pinning the base model to it).
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(adaptd_adapters::fsutil::at(dir)).map_err(StoreError::from)?;
        }
        fsutil::write_atomic(&path, format!("{}\n", serving.version).as_bytes()).map_err(StoreError::from)?;
        let tasks = self.tasks.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match tasks.get(&serving.task) {
            Some(slot) => slot.store(serving),
            None => return Err(RegistryError::UnknownTask(serving.task.clone())),
        }
        Ok(())
    }

    fn active_path(&self, task: &str) -> PathBuf {
        self.store.root().join(task).join(ACTIVE_FILE)
    }

    fn recover(&self, task: &str, events: &mut Vec<Recovery>) -> Result<Serving, RegistryError> {
        let versions = self.store.versions(task)?;
        let path = self.active_path(task);
        let pointer = match std::fs::read(&path) {
            Ok(bytes) => match std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(0) => Ok(0),
                Some(v) if versions.contains(&v) => Ok(v),
                Some(v) => Err(format!("{}: names v{v}, which is not on disk", path.display())),
                None => Err(format!("{}: not a version number ({} bytes)", path.display(), bytes.len())),
            },
            // No pointer: a first promotion that a crash interrupted after its files were written.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("{}: missing", path.display())),
            Err(e) => Err(format!("{}: {e}", path.display())),
        };
        let pointer_usable = pointer.is_ok();
        let candidates = match pointer {
            Ok(0) => {
                events.push(Recovery::Base { task: task.into() });
                return Ok(self.base_serving(task));
            }
            // The pointed-at version (whatever put it there: the gate or an operator's pin),
            // then older versions this registry promoted.
            Ok(v) => std::iter::once(v).chain(versions.iter().rev().copied().filter(|&o| o < v && self.was_promoted(task, o))).collect(),
            // Without a usable pointer, only what the gate promoted here: never an import that
            // nobody chose to serve.
            Err(reason) => {
                tracing::warn!(task, reason, "no usable active pointer; serving the newest promoted version");
                events.push(Recovery::Skipped { task: task.into(), version: 0, reason });
                versions.iter().rev().copied().filter(|&v| self.was_promoted(task, v)).collect::<Vec<u64>>()
            }
        };
        let serving = self.first_readable(task, &candidates, events)?;
        events.push(if serving.version == 0 {
            Recovery::Base { task: task.into() }
        } else {
            Recovery::Restored { task: task.into(), version: serving.version }
        });
        // A pointer that was unusable is replaced by what was chosen, so the next start agrees.
        if !pointer_usable && let Err(e) = fsutil::write_atomic(&path, format!("{}\n", serving.version).as_bytes()) {
            tracing::warn!(task, error = %e, "could not rewrite the active pointer");
        }
        Ok(serving)
    }

    /// Whether `version`'s manifest records a promotion by this registry (an unreadable one
    /// counts as promoted here, so that `first_readable` reports why it is skipped).
    fn was_promoted(&self, task: &str, version: u64) -> bool {
        self.store.read_manifest(task, version).map_or(true, |m| m.promoted_unix_ms.is_some())
    }

    fn first_readable(&self, task: &str, newest_first: &[u64], events: &mut Vec<Recovery>) -> Result<Serving, RegistryError> {
        for &version in newest_first {
            match self.store.load(task, version).map_err(RegistryError::from).and_then(|a| self.serving_from(a)) {
                Ok(serving) => return Ok(serving),
                Err(e) => {
                    tracing::warn!(task, version, error = %e, "adapter version unreadable; trying an older one");
                    events.push(Recovery::Skipped { task: task.into(), version, reason: e.to_string() });
                }
            }
        }
        Ok(self.base_serving(task))
    }

    fn base_serving(&self, task: &str) -> Serving {
        Serving {
            task: task.to_string(),
            version: 0,
            id: Serving::id_of(task, 0),
            labels: self.bundle.manifest.labels.clone().unwrap_or_default().into(),
            head: None,
            lora: self.base_lora.clone(),
            manifest: None,
            route: None,
        }
    }

    /// Whether this bundle can route base-domain rows to the base model, and if not, why not.
    pub fn router(&self) -> Result<Arc<BaseRouter>, &'static str> {
        self.router
            .get_or_init(|| {
                if self.bundle.manifest.logits_output.is_none() {
                    return Err("a base classifier, and the bundle has none");
                }
                match self.bundle.retention() {
                    Ok(Some(retention)) => {
                        BaseRouter::from_retention(&retention).map(Arc::new).ok_or("a single small dense input and a retention set of at least 8 rows")
                    }
                    Ok(None) => Err("a retention set, and the bundle has none"),
                    Err(_) => Err("a readable retention set"),
                }
            })
            .clone()
    }

    fn route_for(&self, manifest: &AdapterManifest) -> Result<Option<BaseRoute>, RegistryError> {
        if !manifest.base_routing {
            return Ok(None);
        }
        let router = self.router().map_err(|reason| RegistryError::NoRouting { id: manifest.id(), reason })?;
        let base_labels = self.bundle.manifest.labels.clone().unwrap_or_default();
        if !base_labels.iter().all(|b| manifest.labels.contains(b)) {
            return Err(RegistryError::NoRouting { id: manifest.id(), reason: "every label of the base model among the adapter's" });
        }
        let base_index = manifest.labels.iter().map(|l| base_labels.iter().position(|b| b == l)).collect();
        Ok(Some(BaseRoute { router, base_lora: self.base_lora.clone(), base_index }))
    }

    fn serving_from(&self, adapter: Adapter) -> Result<Serving, RegistryError> {
        adapter.check_fits(&self.bundle)?;
        let lora = if adapter.lora.is_some() || adapter.reft.is_some() {
            Arc::new(LoraInputs { key: self.next_key.fetch_add(1, Ordering::Relaxed), tensors: adapter.slot_inputs(&self.bundle)? })
        } else {
            self.base_lora.clone()
        };
        Ok(Serving {
            task: adapter.manifest.task.clone(),
            version: adapter.manifest.version,
            id: Serving::id_of(&adapter.manifest.task, adapter.manifest.version),
            labels: adapter.manifest.labels.clone().into(),
            head: Some(adapter.head),
            lora,
            route: self.route_for(&adapter.manifest)?,
            manifest: Some(adapter.manifest),
        })
    }
}
