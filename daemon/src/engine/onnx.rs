//! The serving graph on ONNX Runtime.
//!
//! ONNX Runtime is loaded at run time from a shared library (`ort`'s `load-dynamic`): the PyPI
//! `onnxruntime` wheel on a workstation, JetPack's `onnxruntime-gpu` on a Jetson. The library is
//! found, in order, from the explicit path given, `ORT_DYLIB_PATH` in the environment, the path
//! the build was configured with, and then where JetPack users install it ([`INSTALL_DIRS`]), so
//! an installed binary needs nothing exported by hand. The one loaded is logged at start-up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use adaptd_adapters::bundle::Bundle;
use adaptd_adapters::tensor::{HostData, HostTensor};
use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::memory::AllocationDevice;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("ONNX Runtime library not found: set ORT_DYLIB_PATH (the unit sets it) to libonnxruntime.so (looked for {0}, and in the JetPack install places)")]
    LibraryMissing(String),
    #[error("ONNX Runtime library {path}: {reason}")]
    Library { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already loaded from {loaded}; cannot load {requested} as well")]
    LibraryConflict { loaded: PathBuf, requested: PathBuf },
    #[error("{path}: ONNX Runtime cannot load the serving graph: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path}: the graph's {what} do not match the bundle manifest: graph has {graph:?}, manifest says {manifest:?}")]
    Contract { path: PathBuf, what: &'static str, graph: Vec<String>, manifest: Vec<String> },
    #[error("expected {expected} inputs ({names}), got {actual}")]
    InputCount { expected: usize, actual: usize, names: String },
    #[error("input {name:?}: {reason}")]
    Input { name: String, reason: String },
    #[error("execution provider {provider:?} was asked for but failed to register: {reason}")]
    Provider { provider: ExecutionProvider, reason: String },
    #[error("ONNX Runtime run failed: {0}")]
    Run(String),
    #[error("output {name:?}: {reason}")]
    Output { name: String, reason: String },
}

impl OnnxError {
    pub fn error_type(&self) -> &'static str {
        match self {
            OnnxError::LibraryMissing(_) | OnnxError::Library { .. } | OnnxError::LibraryConflict { .. } => "runtime_library",
            OnnxError::Load { .. } | OnnxError::Contract { .. } => "load",
            OnnxError::Provider { .. } => "execution_provider",
            OnnxError::InputCount { .. } | OnnxError::Input { .. } => "input",
            OnnxError::Run(_) | OnnxError::Output { .. } => "run",
        }
    }
}

/// The build-time default, written into `.cargo/config.toml` by the set-up step.
const BUILD_ORT_DYLIB_PATH: Option<&str> = option_env!("ORT_DYLIB_PATH");

static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Where ONNX Runtime is looked for after the explicit path, `ORT_DYLIB_PATH` and the build's
/// path, in this order: the .deb's own copy; NVIDIA's and PyPI's wheels installed system-wide
/// (`pip install` as root on JetPack puts them under `/usr/local`); the distribution's and a
/// hand-built library. `*` matches one directory name (`python3.10`, ...).
pub const INSTALL_DIRS: &[&str] = &[
    "/usr/lib/adaptd",
    "/usr/local/lib/python3*/dist-packages/onnxruntime/capi",
    "/usr/lib/python3/dist-packages/onnxruntime/capi",
    "/usr/lib/python3*/dist-packages/onnxruntime/capi",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
];

/// `libonnxruntime.so*` files in the [`INSTALL_DIRS`] below `root` (`/` on a device), in their
/// order; within a directory the newest version first.
pub fn installed_libraries(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for pattern in INSTALL_DIRS {
        let mut dirs = vec![root.to_path_buf()];
        for part in pattern.trim_start_matches('/').split('/') {
            dirs = dirs
                .iter()
                .flat_map(|d| match part.split_once('*') {
                    None => vec![d.join(part)],
                    Some((prefix, suffix)) => std::fs::read_dir(d)
                        .map(|entries| {
                            let mut matched: Vec<PathBuf> = entries
                                .filter_map(|e| e.ok())
                                .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix)))
                                .map(|e| e.path())
                                .collect();
                            matched.sort();
                            matched
                        })
                        .unwrap_or_default(),
                })
                .collect();
        }
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            let mut libraries: Vec<(Vec<u64>, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    let version = name.strip_prefix("libonnxruntime.so")?;
                    let parts =
                        version.trim_start_matches('.').split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
                    e.path().is_file().then_some((parts, e.path()))
                })
                .collect();
            libraries.sort_by(|a, b| b.0.cmp(&a.0));
            found.extend(libraries.into_iter().map(|(_, p)| p));
        }
    }
    found
}

/// Where the ONNX Runtime library will be loaded from.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, OnnxError> {
    let candidates: Vec<PathBuf> = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .chain(BUILD_ORT_DYLIB_PATH.map(PathBuf::from))
        .chain(installed_libraries(Path::new("/")))
        .collect();
    if let Some(explicit) = explicit {
        return if explicit.is_file() {
            Ok(explicit.to_path_buf())
        } else {
            Err(OnnxError::Library { path: explicit.to_path_buf(), reason: "no such file".into() })
        };
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OnnxError::LibraryMissing(candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")))
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment, OnnxError> {
    if let Some(env) = loaded_environment(explicit)? {
        return Ok(env);
    }
    // ONNX Runtime allows one environment per process and refuses a second ("only one
    // environment is allowed per process"), so first callers racing here take turns.
    static FIRST_LOAD: Mutex<()> = Mutex::new(());
    let _turn = FIRST_LOAD.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(env) = loaded_environment(explicit)? {
        return Ok(env);
    }
    let path = resolve_library(explicit)?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    let env = ort::init_from(&path)
        .map_err(|e| OnnxError::Library { path: path.clone(), reason: e.to_string() })?
        .with_name("adaptd")
        .build()
        .map_err(|e| OnnxError::Library { path: path.clone(), reason: e.to_string() })?;
    Ok(&ENVIRONMENT.get_or_init(|| (path, env)).1)
}

/// The environment already loaded, if any; an explicit library other than the loaded one is refused.
fn loaded_environment(explicit: Option<&Path>) -> Result<Option<&'static Environment>, OnnxError> {
    let Some((loaded, env)) = ENVIRONMENT.get() else { return Ok(None) };
    match explicit {
        Some(requested) if requested != loaded => Err(OnnxError::LibraryConflict { loaded: loaded.clone(), requested: requested.to_path_buf() }),
        _ => Ok(Some(env)),
    }
}

/// Where a session runs. GPU providers are asked for explicitly; one that fails to register is
/// an error at start-up (or, with `fallback_to_cpu`, a loud warning), never a silent CPU session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

/// How one session is built. Serving and training share a small device, so nothing spins.
/// Read from the `[engine]` section of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct SessionOptions {
    pub intra_op_threads: usize,
    #[serde(rename = "execution_provider")]
    pub provider: ExecutionProvider,
    pub device_id: i32,
    pub fallback_to_cpu: bool,
    /// How many LoRA adapters may serve folded into a copy of the model at once (merged
    /// serving: the original model's speed, each copy the model's weights again in memory); 0
    /// serves every LoRA on the graph with slots.
    pub merged_sessions: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { intra_op_threads: 2, provider: ExecutionProvider::Cpu, device_id: 0, fallback_to_cpu: false, merged_sessions: 2 }
    }
}

/// Runs on the graph with slots after which a LoRA is folded into a copy of the graph without
/// them: an adapter that serves traffic, not one the gate scores once.
pub const MERGE_AFTER_RUNS: usize = 32;
/// ... and after this long since it was prepared: an adapter replaced within a second (a burst of
/// promotions) is not worth a copy, and building one would compete with serving.
pub const MERGE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

fn session_builder(env: &Environment, options: SessionOptions) -> ort::Result<SessionBuilder> {
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)?
        .with_intra_threads(options.intra_op_threads.max(1))?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?)
}

/// A LoRA's slot values as a run takes them: none at all (the adapter changes no slot, and the
/// bundle's graph without slots runs), or a value per slot input, with the adapter's way to
/// merged serving where the bundle and the options allow it.
pub enum PreparedLora {
    Plain,
    Slots(Vec<DynValue>, Option<Arc<Merging>>),
}

/// A LoRA on its way to merged serving. Every [`MERGE_AFTER_RUNS`] runs on the graph with slots,
/// once it has served for [`MERGE_AFTER`], it asks for a merged copy: a background thread folds it into the weights of a copy of the
/// graph without slots (PEFT's merge, `W + B·A`, as the bundle's merge map lays W out); once
/// built, runs use that copy and pay nothing for the slots. Until then, and if it cannot be
/// built, the slotted graph serves: the same function either way, and swapping adapters never
/// waits for a build. At most `SessionOptions::merged_sessions` copies live at once: a LoRA that
/// asks when all are taken replaces the one run least recently if that one has been idle for
/// [`MERGE_AFTER_RUNS`] runs (an adapter the gate scored once, one that was replaced), else waits.
pub struct Merging {
    merged: Mutex<Option<Session>>,
    ready: AtomicBool,
    building: AtomicBool,
    failed: AtomicBool,
    runs: AtomicUsize,
    prepared: std::time::Instant,
    /// The pool's clock at this adapter's last run.
    last_run: AtomicU64,
    job: MergeJob,
    pool: Arc<MergePool>,
}

/// A model's merged copies: their limit, a clock of runs, and the adapters holding (or
/// building) one.
struct MergePool {
    limit: usize,
    clock: AtomicU64,
    holders: Mutex<Vec<Weak<Merging>>>,
    /// Copies built and kept now.
    ready: AtomicUsize,
}

struct MergeJob {
    bundle: Bundle,
    lora: Vec<HostTensor>,
    options: SessionOptions,
    provider: ExecutionProvider,
}

impl Merging {
    /// Whether runs now use the merged copy.
    pub fn is_merged(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether building the copy failed (the adapter then serves on the slotted graph for good).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Count a run; every [`MERGE_AFTER_RUNS`]th on the slotted graph asks for a merged copy.
    fn note_run(self: &Arc<Self>) {
        self.last_run.store(self.pool.clock.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        if (self.runs.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(MERGE_AFTER_RUNS) && self.prepared.elapsed() >= MERGE_AFTER {
            self.ask_for_copy();
        }
    }

    fn ask_for_copy(self: &Arc<Self>) {
        if self.is_merged() || self.failed.load(Ordering::Acquire) || self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self.pool.take_place(self) {
            self.building.store(false, Ordering::Release);
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("adaptd-merge".into()).spawn(move || {
            crate::background_priority();
            let started = std::time::Instant::now();
            match merged_session(&me.job) {
                Ok(session) => {
                    *me.merged.lock().unwrap_or_else(PoisonError::into_inner) = Some(session);
                    me.ready.store(true, Ordering::Release);
                    me.pool.ready.fetch_add(1, Ordering::AcqRel);
                    tracing::info!(bundle = %me.job.bundle.manifest.name, ms = started.elapsed().as_millis() as u64, "merged serving: an adapter now runs written into a copy of the model (a LoRA folded into its weights, or LoReFT edits into the edits-only graph)");
                }
                Err(e) => {
                    // Not retried: the bundle's merge map does not fit this LoRA or this runtime.
                    me.failed.store(true, Ordering::Release);
                    me.pool.leave(&me);
                    tracing::warn!(error = %e, "merged serving: could not write the adapter into a copy of the model; it serves on the slotted graph");
                }
            }
            me.building.store(false, Ordering::Release);
        });
        if let Err(e) = spawned {
            self.pool.leave(self);
            self.building.store(false, Ordering::Release);
            tracing::warn!(error = %e, "merged serving: no thread to build the merged copy on");
        }
    }

    /// Give the copy up: the pool needs its place for a busier adapter.
    fn evict(&self) {
        if self.ready.swap(false, Ordering::AcqRel) {
            self.pool.ready.fetch_sub(1, Ordering::AcqRel);
        }
        drop(self.merged.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

impl Drop for Merging {
    fn drop(&mut self) {
        if self.ready.load(Ordering::Acquire) {
            self.pool.ready.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl MergePool {
    /// A place among the merged copies for `who`: a free one, or that of the holder run least
    /// recently if it has been idle for [`MERGE_AFTER_RUNS`] runs (its copy is dropped).
    fn take_place(&self, who: &Arc<Merging>) -> bool {
        let mut holders = self.holders.lock().unwrap_or_else(PoisonError::into_inner);
        holders.retain(|h| h.strong_count() > 0);
        if holders.len() >= self.limit {
            let now = self.clock.load(Ordering::Relaxed);
            let idle = holders
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.upgrade().map(|h| (i, h)))
                .filter(|(_, h)| h.is_merged() && now.saturating_sub(h.last_run.load(Ordering::Relaxed)) >= MERGE_AFTER_RUNS as u64)
                .min_by_key(|(_, h)| h.last_run.load(Ordering::Relaxed));
            let Some((i, victim)) = idle else { return false };
            victim.evict();
            holders.swap_remove(i);
        }
        holders.push(Arc::downgrade(who));
        true
    }

    fn leave(&self, who: &Arc<Merging>) {
        self.holders.lock().unwrap_or_else(PoisonError::into_inner).retain(|h| h.strong_count() > 0 && !std::ptr::eq(h.as_ptr(), Arc::as_ptr(who)));
    }
}

/// The graph without slots with the LoRA folded into its weights, or (a LoReFT) the edits-only
/// graph with the edits' values written in, on the provider serving runs on.
fn merged_session(job: &MergeJob) -> Result<Session, OnnxError> {
    let manifest = &job.bundle.manifest;
    let reft = !adaptd_adapters::slots::reft_edits_nothing(manifest, &job.lora);
    let path = match (reft, job.bundle.plain_graph_path(), manifest.reft.as_ref().and_then(|r| r.merge.as_ref())) {
        (false, Some(plain), _) => plain,
        (true, _, Some(merge)) => job.bundle.file_path(&merge.graph),
        (false, None, _) => return Err(OnnxError::Run("the bundle has no graph without slots".into())),
        (true, _, None) => return Err(OnnxError::Run("the bundle has no edits-only LoReFT graph".into())),
    };
    let load_err = |reason: String| OnnxError::Load { path: path.clone(), reason };
    let graph = if reft { job.bundle.merged_reft_graph(&job.lora) } else { job.bundle.merged_plain_graph(&job.lora) };
    let graph = graph.map_err(|e| load_err(e.to_string()))?.ok_or_else(|| load_err("the bundle has no merge map".into()))?;
    let mut builder = provider_builder(environment(None)?, job.options, job.provider)?;
    builder.commit_from_memory(&graph).map_err(|e| load_err(e.to_string()))
}

/// A session builder with `provider` registered.
fn provider_builder(env: &Environment, options: SessionOptions, provider: ExecutionProvider) -> Result<SessionBuilder, OnnxError> {
    let mut builder = session_builder(env, options).map_err(|e| OnnxError::Run(e.to_string()))?;
    let registered = match provider {
        ExecutionProvider::Cpu => Ok(()),
        ExecutionProvider::Cuda => ep::CUDA::default().with_device_id(options.device_id).register(&mut builder),
        ExecutionProvider::TensorRt => ep::TensorRT::default().with_device_id(options.device_id).register(&mut builder),
    };
    registered.map_err(|e| OnnxError::Provider { provider, reason: e.to_string() })?;
    Ok(builder)
}

/// A bundle's serving graph in an ONNX Runtime session. Owned by one thread (runs need `&mut`).
pub struct OnnxModel {
    session: Session,
    /// The bundle's graph without slots, if it has one: an adapter that changes no slot (the
    /// base model, a head) runs there, paying nothing for the slots.
    plain: Option<Session>,
    bundle: Bundle,
    input_names: Vec<String>,
    output_names: Vec<String>,
    provider: ExecutionProvider,
    /// Where prepared LoRA values live: the GPU the session runs on, or host memory.
    lora_device: Option<(AllocationDevice<'static>, i32)>,
    options: SessionOptions,
    /// The merged copies of the model (see [`Merging`]).
    merge_pool: Arc<MergePool>,
}

impl OnnxModel {
    pub fn load(bundle: &Bundle, options: SessionOptions, library: Option<&Path>) -> Result<OnnxModel, OnnxError> {
        let env = environment(library)?;
        let path = bundle.serving_graph_path();
        let load_err = |reason: String| OnnxError::Load { path: path.clone(), reason };
        let mut builder = session_builder(env, options).map_err(|e| load_err(e.to_string()))?;
        let registered = match options.provider {
            ExecutionProvider::Cpu => Ok(()),
            ExecutionProvider::Cuda => ep::CUDA::default().with_device_id(options.device_id).register(&mut builder),
            ExecutionProvider::TensorRt => ep::TensorRT::default().with_device_id(options.device_id).register(&mut builder),
        };
        let provider = match registered {
            Ok(()) => options.provider,
            Err(e) if options.fallback_to_cpu => {
                tracing::error!(provider = ?options.provider, error = %e, "GPU execution provider failed to register; SERVING ON CPU because fallback_to_cpu is set");
                ExecutionProvider::Cpu
            }
            Err(e) => return Err(OnnxError::Provider { provider: options.provider, reason: e.to_string() }),
        };
        let session = builder.commit_from_file(&path).map_err(|e| load_err(e.to_string()))?;
        let plain = match bundle.plain_graph_path() {
            Some(plain_path) => {
                let plain_err = |reason: String| OnnxError::Load { path: plain_path.clone(), reason };
                let mut builder = provider_builder(env, options, provider)?;
                let plain = builder.commit_from_file(&plain_path).map_err(|e| plain_err(e.to_string()))?;
                let inputs: Vec<String> = plain.inputs().iter().map(|i| i.name().to_string()).collect();
                let wanted: Vec<String> = bundle.manifest.inputs.iter().map(|i| i.name.clone()).collect();
                if inputs != wanted {
                    return Err(OnnxError::Contract { path: plain_path, what: "inputs", graph: inputs, manifest: wanted });
                }
                let outputs: Vec<String> = plain.outputs().iter().map(|o| o.name().to_string()).collect();
                let wanted: Vec<String> = bundle.manifest.outputs.iter().map(|o| o.name.clone()).collect();
                if outputs != wanted {
                    return Err(OnnxError::Contract { path: plain_path, what: "outputs", graph: outputs, manifest: wanted });
                }
                Some(plain)
            }
            None => None,
        };

        // The graph must be the one the manifest describes, input for input.
        let graph_inputs: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let manifest_inputs: Vec<String> = bundle.manifest.graph_input_names().into_iter().map(String::from).collect();
        if graph_inputs != manifest_inputs {
            return Err(OnnxError::Contract { path, what: "inputs", graph: graph_inputs, manifest: manifest_inputs });
        }
        let graph_outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        let manifest_outputs: Vec<String> = bundle.manifest.outputs.iter().map(|o| o.name.clone()).collect();
        if graph_outputs != manifest_outputs {
            return Err(OnnxError::Contract { path, what: "outputs", graph: graph_outputs, manifest: manifest_outputs });
        }
        // On a GPU provider the LoRA values are copied to the device once per swap, not once per
        // request (a host input is copied to the device on every run).
        let lora_device = match provider {
            ExecutionProvider::Cpu => None,
            ExecutionProvider::Cuda | ExecutionProvider::TensorRt => Some((AllocationDevice::CUDA, options.device_id)),
        };
        Ok(OnnxModel {
            session,
            plain,
            bundle: bundle.clone(),
            input_names: graph_inputs,
            output_names: graph_outputs,
            provider,
            lora_device,
            options,
            merge_pool: Arc::new(MergePool {
                limit: options.merged_sessions,
                clock: AtomicU64::new(0),
                holders: Mutex::new(Vec::new()),
                ready: AtomicUsize::new(0),
            }),
        })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The provider the session actually runs on.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// Where prepared LoRA values are kept: `"Cpu"`, or `"Cuda"` on a GPU provider.
    pub fn lora_device(&self) -> String {
        self.lora_device.as_ref().map_or_else(|| "Cpu".to_string(), |(d, _)| d.as_str().to_string())
    }

    /// Keep prepared LoRA values on `device` (`None`: host memory). The session picks this from
    /// its provider; tests move values between allocators with it on a CPU-only machine.
    pub fn set_lora_device(&mut self, device: Option<(AllocationDevice<'static>, i32)>) {
        self.lora_device = device;
    }

    /// Whether adapters that change no slot run on the bundle's graph without slots.
    pub fn has_plain_graph(&self) -> bool {
        self.plain.is_some()
    }

    /// Whether a LoRA that serves long enough is folded into a copy of the graph without slots.
    pub fn merges_lora(&self) -> bool {
        self.plain.is_some() && self.bundle.manifest.merge.is_some() && self.options.merged_sessions > 0
    }

    /// Whether slot values that serve long enough run merged: a LoRA alone folded into the
    /// weights, or a LoReFT alone written into the bundle's edits-only graph (an edit of a
    /// layer's output folds into no weight, but needs no LoRA slot either).
    fn merges(&self, values: &[HostTensor]) -> bool {
        let manifest = &self.bundle.manifest;
        if adaptd_adapters::slots::reft_edits_nothing(manifest, values) {
            self.merges_lora()
        } else {
            let edits_only = manifest.reft.as_ref().is_some_and(|r| r.merge.is_some());
            edits_only && self.options.merged_sessions > 0 && adaptd_adapters::slots::lora_adds_nothing(manifest, values)
        }
    }

    /// Merged copies of the model alive now.
    pub fn merged_sessions(&self) -> usize {
        self.merge_pool.ready.load(Ordering::Acquire)
    }

    /// Turn LoRA slot tensors into runtime values once, for reuse across runs: on a GPU
    /// provider they are copied into device memory here, so runs read them where they are. A
    /// LoRA that changes no slot (each slot's A or B all zeros) becomes [`PreparedLora::Plain`]
    /// where the bundle has a graph without slots.
    pub fn prepare_lora(&self, lora: &[HostTensor]) -> Result<PreparedLora, OnnxError> {
        self.prepare(lora, true)
    }

    /// [`OnnxModel::prepare_lora`], merging at once if the bundle allows it (the build runs on a
    /// thread of its own; the value serves on the slotted graph until it is done).
    pub fn prepare_merged(&self, lora: &[HostTensor]) -> Result<PreparedLora, OnnxError> {
        let prepared = self.prepare(lora, true)?;
        if let PreparedLora::Slots(_, Some(merging)) = &prepared {
            merging.ask_for_copy();
        }
        Ok(prepared)
    }

    fn prepare(&self, lora: &[HostTensor], plain_allowed: bool) -> Result<PreparedLora, OnnxError> {
        let names = &self.input_names[self.bundle.manifest.inputs.len()..];
        if lora.len() != names.len() {
            return Err(OnnxError::InputCount {
                expected: self.input_names.len(),
                actual: self.bundle.manifest.inputs.len() + lora.len(),
                names: self.input_names.join(", "),
            });
        }
        let manifest = &self.bundle.manifest;
        if plain_allowed && self.plain.is_some() && adaptd_adapters::slots::changes_nothing(manifest, lora) {
            return Ok(PreparedLora::Plain);
        }
        let values = names
            .iter()
            .zip(lora)
            .map(|(name, t)| {
                let host = to_tensor(name, t.clone())?;
                let Some((device, id)) = &self.lora_device else { return Ok(host.into_dyn()) };
                let placed = host
                    .to(device.clone(), *id)
                    .map_err(|e| OnnxError::Input { name: name.clone(), reason: format!("cannot copy the LoRA value to {} {id}: {e}", device.as_str()) })?;
                Ok(placed.into_dyn())
            })
            .collect::<Result<Vec<DynValue>, OnnxError>>()?;
        let merging = (plain_allowed && self.merges(lora)).then(|| {
            Arc::new(Merging {
                merged: Mutex::new(None),
                ready: AtomicBool::new(false),
                building: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                runs: AtomicUsize::new(0),
                prepared: std::time::Instant::now(),
                last_run: AtomicU64::new(self.merge_pool.clock.load(Ordering::Relaxed)),
                job: MergeJob { bundle: self.bundle.clone(), lora: lora.to_vec(), options: self.options, provider: self.provider },
                pool: Arc::clone(&self.merge_pool),
            })
        });
        Ok(PreparedLora::Slots(values, merging))
    }

    /// Run with the model inputs and the LoRA slot tensors (see `adaptd_adapters::lora`);
    /// returns every output in manifest order.
    pub fn run(&mut self, inputs: &[HostTensor], lora: &[HostTensor]) -> Result<Vec<HostTensor>, OnnxError> {
        let lora = self.prepare_lora(lora)?;
        self.run_prepared(inputs.to_vec(), &lora)
    }

    /// LoRA values for the graph with slots whatever they are, even ones that change no slot
    /// (to compare the two graphs, and what unused slots cost).
    pub fn prepare_slots(&self, lora: &[HostTensor]) -> Result<PreparedLora, OnnxError> {
        self.prepare(lora, false)
    }

    /// Run with owned model inputs (moved into the runtime, not copied) and prepared LoRA values.
    pub fn run_prepared(&mut self, inputs: Vec<HostTensor>, lora: &PreparedLora) -> Result<Vec<HostTensor>, OnnxError> {
        let manifest = &self.bundle.manifest;
        let n_model = manifest.inputs.len();
        let (slots, merging): (&[DynValue], _) = match lora {
            PreparedLora::Plain => (&[], None),
            PreparedLora::Slots(values, merging) => (values, merging.as_ref()),
        };
        if let Some(m) = merging {
            m.note_run();
        }
        // The merged copy, if built and kept: it takes the model's inputs alone, as the graph
        // without slots does.
        let mut merged_guard = merging.filter(|m| m.is_merged()).map(|m| m.merged.lock().unwrap_or_else(PoisonError::into_inner));
        let merged = merged_guard.as_mut().and_then(|g| g.as_mut());
        let slots = if merged.is_some() { &[] } else { slots };
        let plain = matches!(lora, PreparedLora::Plain) || merged.is_some();
        if inputs.len() != n_model || (!plain && slots.len() + n_model != self.input_names.len()) {
            return Err(OnnxError::InputCount { expected: self.input_names.len(), actual: inputs.len() + slots.len(), names: self.input_names.join(", ") });
        }
        let mut feeds: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(self.input_names.len());
        for ((name, spec), t) in self.input_names.iter().zip(&manifest.inputs).zip(inputs) {
            if spec.dtype != t.dtype() {
                return Err(OnnxError::Input { name: name.clone(), reason: format!("dtype {:?}, the model needs {:?}", t.dtype(), spec.dtype) });
            }
            feeds.push((name.as_str(), to_value(name, t)?.into()));
        }
        for (name, value) in self.input_names[n_model..].iter().zip(slots) {
            feeds.push((name.as_str(), value.into()));
        }
        let session = match (merged, &mut self.plain, plain) {
            (Some(merged), _, _) => merged,
            (None, Some(plain), true) => plain,
            (None, None, true) => return Err(OnnxError::Run("the bundle has no graph without slots".into())),
            (None, _, false) => &mut self.session,
        };
        let outputs = session.run(feeds).map_err(|e| OnnxError::Run(e.to_string()))?;
        self.output_names
            .iter()
            .map(|name| {
                let out_err = |reason: String| OnnxError::Output { name: name.clone(), reason };
                let (shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(|e| out_err(e.to_string()))?;
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                HostTensor::f32(shape, data.to_vec()).map_err(|e| out_err(e.to_string()))
            })
            .collect()
    }
}

fn to_value(name: &str, t: HostTensor) -> Result<DynValue, OnnxError> {
    Ok(to_tensor(name, t)?.into_dyn())
}

fn to_tensor(name: &str, t: HostTensor) -> Result<DynTensor, OnnxError> {
    let input_err = |e: ort::Error| OnnxError::Input { name: name.to_string(), reason: e.to_string() };
    Ok(match t.data {
        HostData::F32(v) => Tensor::from_array((t.shape, v)).map_err(input_err)?.upcast(),
        HostData::I64(v) => Tensor::from_array((t.shape, v)).map_err(input_err)?.upcast(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_runtime_is_found_where_jetpack_users_install_it_newest_first() {
        let root = tempfile::tempdir().unwrap();
        let put = |p: &str| {
            let path = root.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        };
        let capi = "usr/local/lib/python3.10/dist-packages/onnxruntime/capi";
        for name in ["libonnxruntime.so.1.16.0", "libonnxruntime.so.1.9.0", "libonnxruntime.so.1.20.1", "libonnxruntime_providers_cuda.so"] {
            put(&format!("{capi}/{name}"));
        }
        put("usr/lib/aarch64-linux-gnu/libonnxruntime.so.1.18.0");
        put("usr/lib/aarch64-linux-gnu/libonnxruntime.so.not-a-version");
        let found: Vec<String> = installed_libraries(root.path()).iter().map(|p| p.strip_prefix(root.path()).unwrap().display().to_string()).collect();
        assert_eq!(
            found,
            [
                format!("{capi}/libonnxruntime.so.1.20.1"),
                format!("{capi}/libonnxruntime.so.1.16.0"),
                format!("{capi}/libonnxruntime.so.1.9.0"),
                "usr/lib/aarch64-linux-gnu/libonnxruntime.so.1.18.0".to_string(),
            ]
        );
        assert!(installed_libraries(tempfile::tempdir().unwrap().path()).is_empty());
    }
}
