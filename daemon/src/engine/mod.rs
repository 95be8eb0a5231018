//! The serving engine: the frozen base model on ONNX Runtime with each task's active adapter.
//!
//! One owner thread serves the ONNX Runtime session (runs need `&mut`). Callers reach it through
//! a bounded queue carrying their tracing span and a reply channel; a full queue is refused at
//! once (`Overloaded`) instead of blocking the caller's runtime. The thread gathers requests into
//! micro-batches (up to `max_batch` rows, waiting at most `max_wait` after the first), loads each
//! task's adapter once per batch from the registry, and runs one graph call per distinct LoRA.
//! A `watch` channel publishes health: `Ready` only after a warm-up batch has run.
//!
//! At low load the hand-off to the owner thread costs more than a small model's run. So a
//! serving request that finds the engine idle (the session free, nothing queued) and a small
//! graph call cheap (under [`INLINE_RUN_MAX`]) runs at once on the caller's thread, holding the
//! session's lock as the owner does; under load the lock is taken or the queue is not empty,
//! and requests batch on the owner thread as before. Only with `max_wait` zero (the default): a
//! configured wait asks for batching.

pub mod onnx;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use adaptd_adapters::bundle::{Bundle, DType, Manifest};
use adaptd_adapters::head::softmax_rows;
use adaptd_adapters::tensor::{HostData, HostTensor};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::{oneshot, watch};

use crate::registry::{LoraInputs, Registry, Serving};
use onnx::{ExecutionProvider, OnnxError, OnnxModel, PreparedLora, SessionOptions};

/// The engine's settings: the `[engine]` section of the configuration file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct EngineConfig {
    pub max_batch: usize,
    /// How long a batch waits for more requests (0: none, and idle requests run inline).
    #[serde(rename = "max_wait_ms", with = "crate::config::units::millis")]
    pub max_wait: Duration,
    pub queue_depth: usize,
    #[serde(flatten)]
    pub session: SessionOptions,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_batch: 32, max_wait: Duration::ZERO, queue_depth: 1024, session: SessionOptions::default() }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    #[error("input: {0}")]
    BadInput(String),
    #[error("task {0:?} has no adapter yet and the base model has no classifier")]
    NoClassifier(String),
    #[error("the engine's queue is full; retry later")]
    Overloaded,
    #[error("the engine has stopped")]
    Stopped,
    #[error("the model failed: {0}")]
    Runtime(String),
}

impl EngineError {
    /// Stable label for metrics and events.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::UnknownTask(_) => "unknown_task",
            EngineError::BadInput(_) => "bad_input",
            EngineError::NoClassifier(_) => "no_classifier",
            EngineError::Overloaded => "overloaded",
            EngineError::Stopped => "stopped",
            EngineError::Runtime(_) => "runtime",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Starting,
    Ready { provider: ExecutionProvider },
    Failed(String),
    Stopped,
}

/// One row's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The winning label's index in `labels` ([`Prediction::label`] names it).
    pub class_index: usize,
    /// Softmax scores, one per label, in `labels` order.
    pub scores: Vec<f32>,
    pub labels: Arc<[String]>,
    /// `task@vN` of the adapter that served this row (v0: the base model).
    pub adapter: Arc<str>,
    pub adapter_version: u64,
    /// The adapter routed this row, which looked like the base domain, to the base model.
    pub base_routed: bool,
    /// The backbone's embedding of the row, when asked for ([`EngineHandle::evaluate`]).
    pub embedding: Option<Vec<f32>>,
}

impl Prediction {
    /// The winning label ("" for an answer without a classifier).
    pub fn label(&self) -> &str {
        self.labels.get(self.class_index).map_or("", String::as_str)
    }
}

enum Command {
    Infer(Request),
    /// Answer at once: proof that the owner thread is alive and draining its queue.
    Ping(oneshot::Sender<()>),
    /// Answer what is queued, then stop.
    Stop,
}

struct Request {
    task: String,
    /// Serve with this adapter instead of the task's active one (validation of a candidate).
    adapter: Option<Arc<Serving>>,
    with_embedding: bool,
    submitted: Instant,
    inputs: Vec<HostTensor>,
    rows: usize,
    span: tracing::Span,
    reply: Reply,
}

/// Counters the engine thread keeps (read for metrics and tests).
#[derive(Debug)]
pub struct EngineStats {
    /// Graph calls made.
    pub batches: AtomicU64,
    /// Rows served through them.
    pub rows: AtomicU64,
    /// Requests refused before or inside the engine, any reason.
    pub refused: AtomicU64,
    /// Latencies (queue + run) of the most recent requests, in ms, oldest first.
    recent: std::sync::Mutex<VecDeque<f32>>,
    /// Cumulative histograms for `/metrics`: request latency and rows per graph call.
    pub latency: Histogram,
    pub batch_rows: Histogram,
    /// Requests run on their caller's thread (the engine was idle), of all served.
    pub inline: AtomicU64,
    /// What a small graph call (up to [`INLINE_MAX_ROWS`] rows) costs now, in ns: a moving
    /// average; `u64::MAX` until one has run.
    pub small_call_ns: AtomicU64,
    /// LoRA adapters serving merged into a copy of the model, as of the last graph call.
    pub merged_sessions: AtomicU64,
}

/// A fixed-bucket histogram with lock-free counters (Prometheus' cumulative form is computed
/// when rendered).
#[derive(Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    pub fn observe(&self, value: f64) {
        let i = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) per bucket, the last one `+Inf`; then the sum.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut acc = 0;
        let buckets = self.counts.iter().enumerate().map(|(i, c)| {
            acc += c.load(Ordering::Relaxed);
            (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc)
        });
        (buckets.collect(), self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Seconds: sub-millisecond to a second, the range an edge model's requests live in.
const LATENCY_BOUNDS_S: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            recent: Default::default(),
            latency: Histogram::new(LATENCY_BOUNDS_S),
            batch_rows: Histogram::new(BATCH_BOUNDS),
            inline: AtomicU64::new(0),
            small_call_ns: AtomicU64::new(u64::MAX),
            merged_sessions: AtomicU64::new(0),
        }
    }
}

const RECENT_LATENCIES: usize = 256;

/// A request runs on its caller's thread only if a small graph call costs less than this: it
/// may be an async worker, which must not be held for long.
pub const INLINE_RUN_MAX: Duration = Duration::from_millis(1);
/// ... and only if it has at most this many rows.
pub const INLINE_MAX_ROWS: usize = 4;

impl EngineStats {
    /// Fold one graph call's duration into the small-call estimate.
    fn observe_call(&self, rows: usize, took: Duration) {
        if rows > INLINE_MAX_ROWS {
            return;
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.small_call_ns.load(Ordering::Relaxed);
        let new = if old == u64::MAX { ns } else { old - old / 8 + ns / 8 };
        self.small_call_ns.store(new, Ordering::Relaxed);
    }

    fn record_latency(&self, ms: f32) {
        self.latency.observe(ms as f64 / 1e3);
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_LATENCIES {
            recent.pop_front();
        }
        recent.push_back(ms);
    }

    /// p99 of the most recent requests' latency (queue + run), if any were served.
    pub fn recent_p99_ms(&self) -> Option<f64> {
        let mut v: Vec<f32> = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f32::total_cmp);
        Some(v[((v.len() - 1) as f64 * 0.99).round() as usize] as f64)
    }
}

/// What runs requests: the session and its converted LoRA values. The owner thread holds the
/// lock while it runs a batch; a caller that finds the engine idle holds it to run its own
/// request. `model` is None before warm-up and after the engine stopped.
struct Core<B: InferenceBackend> {
    model: Option<B>,
    cache: LoraCache<B::Lora>,
}

/// What serves a task now, owned: the registry's `current`, shared by every thread that runs.
type CurrentFn = Box<dyn Fn(&str) -> Option<Arc<Serving>> + Send + Sync>;

/// What the owner thread and the handles share.
struct Shared<B: InferenceBackend> {
    core: Mutex<Core<B>>,
    current: CurrentFn,
    /// Callers may run their requests themselves (`max_wait` is zero).
    inline: bool,
}

impl<B: InferenceBackend> Shared<B> {
    fn new(current: CurrentFn, inline: bool) -> Shared<B> {
        Shared { core: Mutex::new(Core { model: None, cache: LoraCache::new() }), current, inline }
    }

    /// The core, also after a panic in a run (its state is a session and a cache, both whole).
    fn lock(&self) -> MutexGuard<'_, Core<B>> {
        self.core.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `request` on this thread if the engine is idle and a small call is cheap; otherwise
    /// hand it back, for the queue. `queue_empty` is read by the caller (the queue is its).
    fn run_inline(&self, request: Request, queue_empty: bool, stats: &EngineStats) -> Option<Request> {
        let cheap = stats.small_call_ns.load(Ordering::Relaxed) <= INLINE_RUN_MAX.as_nanos() as u64;
        // Validation traffic stays on the owner thread: it comes from a background-priority
        // thread, which must never hold the session a serving request waits for.
        let serving = request.adapter.is_none() && !request.with_embedding && request.rows <= INLINE_MAX_ROWS;
        if !(self.inline && cheap && serving && queue_empty) {
            return Some(request);
        }
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Some(request),
        };
        let Core { model: Some(model), cache } = &mut *core else { return Some(request) };
        stats.inline.fetch_add(1, Ordering::Relaxed);
        let answers = run_batch(model, &*self.current, cache, vec![request], stats);
        drop(core);
        answers.send();
        None
    }
}

/// Running a request on the caller's thread, whatever the backend: what a handle needs of
/// [`Shared`], so the handle is one type for every backend.
trait RunInline: Send + Sync {
    fn run_inline(&self, request: Request, queue_empty: bool, stats: &EngineStats) -> Option<Request>;
}

impl<B> RunInline for Shared<B>
where
    B: InferenceBackend + Send,
    B::Lora: Send + Sync,
{
    fn run_inline(&self, request: Request, queue_empty: bool, stats: &EngineStats) -> Option<Request> {
        Shared::run_inline(self, request, queue_empty, stats)
    }
}

/// A cheap, cloneable way to reach the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    shared: Arc<dyn RunInline>,
    health: watch::Receiver<Health>,
    manifest: Arc<Manifest>,
    stats: Arc<EngineStats>,
}

/// The running engine: its handle, and the owner thread to join on shutdown.
pub struct Engine {
    pub handle: EngineHandle,
    thread: JoinHandle<()>,
}

impl Engine {
    /// Load the bundle's serving graph on a new owner thread. Returns once the session is built
    /// and warmed up, or with the reason it could not be.
    pub fn start(registry: Arc<Registry>, config: EngineConfig) -> Result<Engine, OnnxError> {
        let session = config.session;
        Engine::start_with(registry, config, move |bundle| {
            let mut model = OnnxModel::load(bundle, session, None)?;
            warm_up(&mut model)?;
            let provider = model.provider();
            tracing::info!(provider = ?provider, lora_values = %model.lora_device(), "serving session ready");
            Ok((model, provider))
        })
    }

    /// The same over any backend: `load` builds it on the owner thread (ONNX Runtime in the
    /// daemon; a test double in the unit tests of what sits on the engine, such as the task loop).
    pub fn start_with<B, L>(registry: Arc<Registry>, config: EngineConfig, load: L) -> Result<Engine, OnnxError>
    where
        B: InferenceBackend + Send + 'static,
        B::Lora: Send + Sync + 'static,
        L: FnOnce(&Bundle) -> Result<(B, ExecutionProvider), OnnxError> + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_depth.max(1));
        let (health_tx, health) = watch::channel(Health::Starting);
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
        let manifest = Arc::new(registry.bundle().manifest.clone());
        let stats = Arc::new(EngineStats::default());
        let engine_stats = stats.clone();
        let current = registry.clone();
        let shared: Arc<Shared<B>> = Arc::new(Shared::new(Box::new(move |task| current.current(task)), config.max_wait.is_zero()));
        let engine_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("adaptd-engine".into())
            .spawn(move || {
                let (model, provider) = match load(registry.bundle()) {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        let _ = health_tx.send(Health::Failed(e.to_string()));
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                engine_shared.lock().model = Some(model);
                // Ready before `start` returns, so a caller never sees a started engine as Starting.
                let _ = health_tx.send(Health::Ready { provider });
                let _ = loaded_tx.send(Ok(()));
                serve(&engine_shared, &rx, &config, &engine_stats);
                // The session goes with the owner thread, not with the last handle.
                engine_shared.lock().model = None;
                let _ = health_tx.send(Health::Stopped);
            })
            .map_err(|e| OnnxError::Run(format!("cannot start the engine thread: {e}")))?;
        match loaded_rx.recv() {
            Ok(Ok(())) => Ok(Engine { handle: EngineHandle { tx, shared, health, manifest, stats }, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(OnnxError::Run("the engine thread died while loading".into())),
        }
    }

    /// Answer the requests already queued, stop, and join the owner thread. Handles that callers
    /// still hold get `EngineError::Stopped` from then on.
    pub fn shutdown(self) {
        let Engine { handle, thread } = self;
        let _ = handle.tx.send(Command::Stop);
        drop(handle);
        let _ = thread.join();
    }
}

impl EngineHandle {
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest, shared: for work that runs off the async workers.
    pub fn manifest_arc(&self) -> Arc<Manifest> {
        self.manifest.clone()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Predict `task` for every row of `inputs` (model inputs with a leading batch axis).
    pub async fn infer(&self, task: &str, inputs: Vec<HostTensor>) -> Result<Vec<Prediction>, EngineError> {
        let rx = self.submit(task, None, false, inputs)?;
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }

    /// The same from a thread outside any async runtime.
    pub fn infer_blocking(&self, task: &str, inputs: Vec<HostTensor>) -> Result<Vec<Prediction>, EngineError> {
        let rx = self.submit(task, None, false, inputs)?;
        rx.blocking_recv().unwrap_or(Err(EngineError::Stopped))
    }

    /// Predict with `adapter` (active or not: a candidate, the incumbent, the base) and return
    /// each row's embedding too. Shares the queue and batching with serving, so validation sees
    /// exactly what serving would answer. A serving without a classifier answers empty scores.
    pub async fn evaluate(&self, adapter: Arc<Serving>, inputs: Vec<HostTensor>) -> Result<Vec<Prediction>, EngineError> {
        let task = adapter.task.clone();
        let rx = self.submit(&task, Some(adapter), true, inputs)?;
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }

    /// The engine's heartbeat: true when its owner thread answers a ping within `timeout`
    /// (behind whatever is queued). The systemd watchdog is fed only while this holds.
    pub async fn heartbeat(&self, timeout: std::time::Duration) -> bool {
        let (pong, rx) = oneshot::channel();
        if self.tx.try_send(Command::Ping(pong)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    fn submit(
        &self,
        task: &str,
        adapter: Option<Arc<Serving>>,
        with_embedding: bool,
        inputs: Vec<HostTensor>,
    ) -> Result<oneshot::Receiver<Result<Vec<Prediction>, EngineError>>, EngineError> {
        let rows = validate_inputs(&self.manifest, &inputs).inspect_err(|_| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        })?;
        let (reply, rx) = oneshot::channel();
        let request =
            Request { task: task.to_string(), adapter, with_embedding, submitted: Instant::now(), inputs, rows, span: tracing::Span::current(), reply };
        // Answered on this thread (the reply waits in `rx`), or queued for the owner thread.
        let Some(request) = self.shared.run_inline(request, self.tx.is_empty(), &self.stats) else { return Ok(rx) };
        let refused = match self.tx.try_send(Command::Infer(request)) {
            Ok(()) => return Ok(rx),
            Err(TrySendError::Full(_)) => EngineError::Overloaded,
            Err(TrySendError::Disconnected(_)) => EngineError::Stopped,
        };
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        Err(refused)
    }
}

/// Check a request against the bundle's input spec before it reaches the engine thread: count,
/// dtype, rank, fixed dimensions, one batch size across inputs, finite values. Returns the rows.
pub fn validate_inputs(manifest: &Manifest, inputs: &[HostTensor]) -> Result<usize, EngineError> {
    let bad = |m: String| Err(EngineError::BadInput(m));
    if inputs.len() != manifest.inputs.len() {
        let names: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
        return bad(format!("expected {} input(s) ({}), got {}", names.len(), names.join(", "), inputs.len()));
    }
    let mut rows = None;
    for (t, spec) in inputs.iter().zip(&manifest.inputs) {
        if t.dtype() != spec.dtype {
            return bad(format!("{:?} must be {:?}, got {:?}", spec.name, spec.dtype, t.dtype()));
        }
        if t.shape.len() != spec.shape.len() {
            return bad(format!("{:?} must have {} dimensions {:?}, got shape {:?}", spec.name, spec.shape.len(), spec.shape, t.shape));
        }
        for (axis, (&got, &want)) in t.shape.iter().zip(&spec.shape).enumerate() {
            if want >= 0 && got as i64 != want && axis > 0 {
                return bad(format!("{:?} must have shape {:?} (-1: any), got {:?}", spec.name, spec.shape, t.shape));
            }
        }
        if t.shape.iter().product::<usize>() != t.len() {
            return bad(format!("{:?}: shape {:?} does not match {} values", spec.name, t.shape, t.len()));
        }
        match (rows, t.shape.first()) {
            (_, None) | (_, Some(0)) => return bad(format!("{:?} has no rows", spec.name)),
            (Some(r), Some(&n)) if r != n => return bad(format!("inputs disagree on the batch size ({r} vs {n})")),
            _ => rows = t.shape.first().copied(),
        }
        if let HostData::F32(v) = &t.data
            && let Some(i) = first_non_finite(v)
        {
            return bad(format!("{:?} holds a non-finite value ({}) at element {i}", spec.name, v[i]));
        }
    }
    rows.ok_or_else(|| EngineError::BadInput("no inputs".into()))
}

/// The index of the first NaN or infinity. Blocks are checked without an early exit, which the
/// compiler vectorises: a camera frame's 150k values cost a few microseconds, not tens.
fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 4096;
    values.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        let any = block.iter().fold(false, |bad, x| bad | !x.is_finite());
        any.then(|| b * BLOCK + block.iter().position(|x| !x.is_finite()).unwrap_or(0))
    })
}

/// One batch-1 run before serving, at the longest input the bundle's preprocessing makes: the
/// runtime's memory arena then holds what any single request needs, and the first requests
/// (and the sessions' memory layout) do not depend on what happened to come first.
fn warm_up(model: &mut OnnxModel) -> Result<(), OnnxError> {
    let manifest = model.bundle().manifest.clone();
    let longest = match &manifest.preprocessing {
        adaptd_adapters::bundle::Preprocessing::Text { max_length, .. } => (*max_length).max(1),
        _ => 1,
    };
    let inputs: Vec<HostTensor> = manifest
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, &d)| {
                    if d >= 0 {
                        d as usize
                    } else if axis == 0 {
                        1
                    } else {
                        longest
                    }
                })
                .collect();
            let n = shape.iter().product();
            match spec.dtype {
                DType::F32 => HostTensor { shape, data: HostData::F32(vec![0.0; n]) },
                _ => HostTensor { shape, data: HostData::I64(vec![1; n]) },
            }
        })
        .collect();
    let lora = adaptd_adapters::slots::no_adapter_inputs(&manifest);
    model.run(&inputs, &lora).map(|_| ())
}

/// What the engine runs micro-batches on: ONNX Runtime ([`OnnxModel`]) in the daemon, a test
/// double in the batcher's unit tests.
pub trait InferenceBackend {
    /// A LoRA's slot tensors as the backend takes them, converted once and reused.
    type Lora;
    fn manifest(&self) -> &Manifest;
    fn prepare_lora(&self, lora: &[HostTensor]) -> Result<Self::Lora, OnnxError>;
    /// Every output, in manifest order, for owned model inputs and prepared LoRA values.
    fn run_prepared(&mut self, inputs: Vec<HostTensor>, lora: &Self::Lora) -> Result<Vec<HostTensor>, OnnxError>;
    /// LoRA adapters running merged into a copy of the model now.
    fn merged_sessions(&self) -> usize {
        0
    }
}

impl InferenceBackend for OnnxModel {
    type Lora = PreparedLora;

    fn manifest(&self) -> &Manifest {
        &self.bundle().manifest
    }

    fn prepare_lora(&self, lora: &[HostTensor]) -> Result<PreparedLora, OnnxError> {
        OnnxModel::prepare_lora(self, lora)
    }

    fn run_prepared(&mut self, inputs: Vec<HostTensor>, lora: &PreparedLora) -> Result<Vec<HostTensor>, OnnxError> {
        OnnxModel::run_prepared(self, inputs, lora)
    }

    fn merged_sessions(&self) -> usize {
        OnnxModel::merged_sessions(self)
    }
}

/// Runtime values of recently served adapters, so a LoRA's tensors are converted once, not per batch.
struct LoraCache<L> {
    values: HashMap<u64, Arc<L>>,
    order: VecDeque<u64>,
}

const LORA_CACHE_ENTRIES: usize = 8;

impl<L> LoraCache<L> {
    fn new() -> LoraCache<L> {
        LoraCache { values: HashMap::new(), order: VecDeque::new() }
    }

    fn get<B: InferenceBackend<Lora = L>>(&mut self, model: &B, lora: &LoraInputs) -> Result<Arc<L>, OnnxError> {
        if let Some(v) = self.values.get(&lora.key) {
            return Ok(v.clone());
        }
        let values = Arc::new(model.prepare_lora(&lora.tensors)?);
        if self.order.len() == LORA_CACHE_ENTRIES
            && let Some(old) = self.order.pop_front()
        {
            self.values.remove(&old);
        }
        self.order.push_back(lora.key);
        self.values.insert(lora.key, values.clone());
        Ok(values)
    }
}

/// What serves a task now (the registry's `current`; tests hand in their own).
type Current<'a> = &'a dyn Fn(&str) -> Option<Arc<Serving>>;

fn serve<B: InferenceBackend>(shared: &Shared<B>, rx: &Receiver<Command>, config: &EngineConfig, stats: &EngineStats) {
    let max_batch = config.max_batch.max(1);
    // A request that did not fit the previous batch opens the next one.
    let mut carry: Option<Request> = None;
    let mut stopping = false;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => {
                // Once stopping, only what is already queued is answered.
                let next = if stopping { rx.try_recv().ok() } else { rx.recv().ok() };
                match next {
                    Some(Command::Infer(r)) => r,
                    Some(Command::Ping(pong)) => {
                        // Only once the session is free: a run stuck on a caller's thread
                        // starves the watchdog as one stuck here does.
                        let _held = shared.lock();
                        let _ = pong.send(());
                        continue;
                    }
                    Some(Command::Stop) => {
                        stopping = true;
                        continue;
                    }
                    None => return,
                }
            }
        };
        let deadline = Instant::now() + config.max_wait;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < max_batch {
            let next = if config.max_wait.is_zero() || stopping { rx.try_recv().map_err(|_| RecvTimeoutError::Timeout) } else { rx.recv_deadline(deadline) };
            match next {
                Ok(Command::Infer(r)) if rows + r.rows > max_batch => {
                    carry = Some(r);
                    break;
                }
                Ok(Command::Infer(r)) => {
                    rows += r.rows;
                    batch.push(r);
                }
                Ok(Command::Ping(pong)) => {
                    let _held = shared.lock();
                    let _ = pong.send(());
                }
                Ok(Command::Stop) => stopping = true,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut core = shared.lock();
        let answers = match &mut *core {
            Core { model: Some(model), cache } => run_batch(model, &*shared.current, cache, batch, stats),
            Core { model: None, .. } => Answers(batch.into_iter().map(|r| (r.reply, Err(EngineError::Stopped))).collect()),
        };
        // Answer only once the session is free: a caller woken while this thread still holds
        // it finds the engine busy and queues its next request instead of running it, and so
        // does every request after it.
        drop(core);
        answers.send();
    }
}

type Reply = oneshot::Sender<Result<Vec<Prediction>, EngineError>>;

/// A batch's answers, computed under the session's lock and sent after it is released.
#[must_use]
struct Answers(Vec<(Reply, Result<Vec<Prediction>, EngineError>)>);

impl Answers {
    fn send(self) {
        for (reply, answer) in self.0 {
            let _ = reply.send(answer);
        }
    }
}

/// Rows of one request served one way: all of them, or those a routed adapter sends to the
/// base model (`base_view`) or keeps.
struct Part {
    request: usize,
    /// None: every row of the request, in order.
    rows: Option<Vec<usize>>,
    serving: Arc<Serving>,
    base_view: bool,
}

/// Parts that share one LoRA run in one graph call.
type LoraGroup = (Arc<LoraInputs>, Vec<Part>);

/// Serve one micro-batch: each task's adapter is read once, and parts whose adapters share a
/// LoRA (all head-only adapters share the base's) run in one graph call. A routed adapter's
/// base-like rows join the base model's call.
fn run_batch<B: InferenceBackend>(
    model: &mut B,
    current: Current<'_>,
    cache: &mut LoraCache<B::Lora>,
    mut batch: Vec<Request>,
    stats: &EngineStats,
) -> Answers {
    // What serves each task, read once per batch: (the first request naming it, its serving).
    // A batch names few tasks, so a short list beats a map (no key to copy per request).
    let mut snapshots: Vec<(usize, Option<Arc<Serving>>)> = Vec::new();
    let mut groups: Vec<LoraGroup> = Vec::new();
    let mut answers: Vec<Result<Vec<Option<Prediction>>, EngineError>> = batch.iter().map(|r| Ok(vec![None; r.rows])).collect();
    let mut add = |lora: &Arc<LoraInputs>, part: Part| match groups.iter_mut().find(|(l, _)| l.key == lora.key) {
        Some((_, parts)) => parts.push(part),
        None => groups.push((lora.clone(), vec![part])),
    };
    for (request, req) in batch.iter().enumerate() {
        let serving = match &req.adapter {
            Some(pinned) => Some(pinned.clone()),
            None => match snapshots.iter().find(|(first, _)| batch[*first].task == req.task) {
                Some((_, serving)) => serving.clone(),
                None => {
                    let serving = current(&req.task);
                    snapshots.push((request, serving.clone()));
                    serving
                }
            },
        };
        let Some(serving) = serving else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            answers[request] = Err(EngineError::UnknownTask(req.task.clone()));
            continue;
        };
        let base_like = serving.route.as_ref().and_then(|route| route.router.base_like_rows(&req.inputs).map(|rows| (route.base_lora.clone(), rows)));
        match base_like {
            Some((base_lora, rows)) if rows.iter().any(|&b| b) => {
                let (to_base, to_adapter): (Vec<usize>, Vec<usize>) = (0..rows.len()).partition(|&r| rows[r]);
                if !to_adapter.is_empty() {
                    add(&serving.lora, Part { request, rows: Some(to_adapter), serving: serving.clone(), base_view: false });
                }
                let rows = (to_base.len() < rows.len()).then_some(to_base);
                add(&base_lora, Part { request, rows, serving, base_view: true });
            }
            _ => add(&serving.lora.clone(), Part { request, rows: None, serving, base_view: false }),
        }
    }
    for (lora, parts) in groups {
        let rows: usize = parts.iter().map(|p| p.rows.as_ref().map_or(batch[p.request].rows, Vec::len)).sum();
        let inputs = match parts.as_slice() {
            // A whole request alone in its call (the common case at low load) hands its inputs
            // over: no other part reads them, and a camera frame's copy showed in latency.
            [only] if only.rows.is_none() => std::mem::take(&mut batch[only.request].inputs),
            _ => {
                let picked: Vec<Option<Vec<HostTensor>>> =
                    parts.iter().map(|p| p.rows.as_deref().map(|rows| pick_rows(&batch[p.request].inputs, rows))).collect();
                concat_inputs(parts.iter().zip(&picked).map(|(p, own)| own.as_deref().unwrap_or(batch[p.request].inputs.as_slice())))
            }
        };
        let _span = tracing::debug_span!("batch", rows, parts = parts.len(), lora = lora.key).entered();
        // Only the graph call is timed: preparing an adapter's values (a cache miss) is paid
        // once, and counting it would keep the small-call estimate high for many calls after.
        let outputs = cache.get(model, &lora).and_then(|values| {
            let started = Instant::now();
            let outputs = model.run_prepared(inputs, &values);
            stats.observe_call(rows, started.elapsed());
            outputs
        });
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.merged_sessions.store(model.merged_sessions() as u64, Ordering::Relaxed);
        stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        stats.batch_rows.observe(rows as f64);
        match outputs {
            Ok(outputs) => answer(model.manifest(), &outputs, &parts, &batch, &mut answers),
            Err(e) => {
                tracing::error!(error = %e, rows, "batch failed");
                for part in &parts {
                    answers[part.request] = Err(EngineError::Runtime(e.to_string()));
                }
            }
        }
    }
    let mut replies = Vec::with_capacity(batch.len());
    for (req, answer) in batch.into_iter().zip(answers) {
        let _enter = req.span.enter();
        let reply = match answer {
            Ok(rows) => rows.into_iter().collect::<Option<Vec<Prediction>>>().ok_or_else(|| EngineError::Runtime("a row was left unanswered".into())),
            Err(e) => Err(e),
        };
        // Validation traffic is not what clients see; only serving requests count.
        if req.adapter.is_none() && !matches!(reply, Err(EngineError::UnknownTask(_))) {
            stats.record_latency(req.submitted.elapsed().as_secs_f32() * 1e3);
        }
        replies.push((req.reply, reply));
    }
    Answers(replies)
}

/// The chosen rows of a request's inputs, in order.
fn pick_rows(inputs: &[HostTensor], rows: &[usize]) -> Vec<HostTensor> {
    inputs
        .iter()
        .map(|t| {
            let picked: Vec<HostTensor> = rows.iter().map(|&r| t.rows(r, r + 1)).collect();
            concat_inputs(picked.iter().map(std::slice::from_ref)).swap_remove(0)
        })
        .collect()
}

/// Concatenate requests along the batch axis; text inputs (i64 `[rows, seq]`) of different
/// lengths are right-padded with zeros, which is both the pad token id and a masked position.
pub fn concat_inputs<'a>(requests: impl Iterator<Item = &'a [HostTensor]> + Clone) -> Vec<HostTensor> {
    let Some(first) = requests.clone().next() else { return Vec::new() };
    (0..first.len())
        .map(|i| {
            let parts: Vec<&HostTensor> = requests.clone().map(|r| &r[i]).collect();
            let rows: usize = parts.iter().map(|t| t.shape[0]).sum();
            let seq_padded = parts[0].shape.len() == 2 && matches!(parts[0].data, HostData::I64(_));
            let mut shape = parts[0].shape.clone();
            shape[0] = rows;
            if seq_padded {
                shape[1] = parts.iter().map(|t| t.shape[1]).max().unwrap_or(0);
            }
            let width: usize = shape[1..].iter().product();
            let data = match &parts[0].data {
                // Sized once and copied slice by slice: a camera frame is 150k values, and an
                // element-wise collect of them showed in serving latency.
                HostData::F32(_) => {
                    let mut out = Vec::with_capacity(rows * width);
                    for t in &parts {
                        out.extend_from_slice(t.as_f32().unwrap_or(&[]));
                    }
                    HostData::F32(out)
                }
                HostData::I64(_) => {
                    let mut out = vec![0i64; rows * width];
                    let mut row = 0;
                    for t in &parts {
                        let HostData::I64(v) = &t.data else { unreachable!("validated dtype") };
                        let w = t.shape[1..].iter().product::<usize>();
                        for r in 0..t.shape[0] {
                            out[(row + r) * width..(row + r) * width + w].copy_from_slice(&v[r * w..(r + 1) * w]);
                        }
                        row += t.shape[0];
                    }
                    HostData::I64(out)
                }
            };
            HostTensor { shape, data }
        })
        .collect()
}

/// Fill in the answers of a group's parts from its graph outputs (rows in part order).
fn answer(manifest: &Manifest, outputs: &[HostTensor], parts: &[Part], batch: &[Request], answers: &mut [Result<Vec<Option<Prediction>>, EngineError>]) {
    let logits_index = manifest.logits_output.as_ref().and_then(|n| manifest.output_index(n));
    let dim = manifest.embedding_dim;
    // Checked against the manifest when the session loaded; a graph that breaks that contract
    // fails the whole group rather than the engine thread.
    let embeddings = manifest.output_index(&manifest.embedding_output).and_then(|i| outputs.get(i)).and_then(HostTensor::as_f32);
    let Some(embeddings) = embeddings.filter(|e| e.len() >= parts.iter().map(|p| p.rows.as_ref().map_or(batch[p.request].rows, Vec::len)).sum::<usize>() * dim)
    else {
        for part in parts {
            answers[part.request] = Err(EngineError::Runtime("the serving graph gave no f32 embedding of the expected size".into()));
        }
        return;
    };
    let mut row = 0;
    for part in parts {
        let req = &batch[part.request];
        let serving = &part.serving;
        let n = part.rows.as_ref().map_or(req.rows, Vec::len);
        let base_logits = |li: usize| -> Result<Vec<f32>, EngineError> {
            let t = &outputs[li];
            let classes = t.shape.get(1).copied().unwrap_or(0);
            t.as_f32()
                .and_then(|v| v.get(row * classes..(row + n) * classes))
                .map(<[f32]>::to_vec)
                .ok_or_else(|| EngineError::Runtime("the serving graph gave no f32 logits".into()))
        };
        let result = match (&serving.head, logits_index, &serving.route) {
            (Some(_), Some(li), Some(route)) if part.base_view => base_logits(li).map(|base| {
                // The base classifier's scores, in the adapter's label order (-inf for labels
                // the base model does not know, which then cannot win on base-like rows).
                let base_classes = outputs[li].shape.get(1).copied().unwrap_or(0);
                let mut logits = vec![f32::NEG_INFINITY; n * serving.labels.len()];
                for r in 0..n {
                    for (j, b) in route.base_index.iter().enumerate() {
                        if let Some(score) = b.and_then(|b| base.get(r * base_classes + b)) {
                            logits[r * serving.labels.len() + j] = *score;
                        }
                    }
                }
                logits
            }),
            (Some(head), _, _) => Ok(head.forward(&embeddings[row * dim..(row + n) * dim], n)),
            (None, Some(li), _) => base_logits(li),
            (None, None, _) if req.with_embedding => Ok(Vec::new()),
            (None, None, _) => Err(EngineError::NoClassifier(serving.task.clone())),
        };
        let embedding_rows = req.with_embedding.then(|| embeddings[row * dim..(row + n) * dim].chunks_exact(dim).map(<[f32]>::to_vec).collect::<Vec<_>>());
        row += n;
        let slots = match &mut answers[part.request] {
            Ok(slots) => slots,
            Err(_) => continue,
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                answers[part.request] = Err(e);
                continue;
            }
        };
        let classes = serving.labels.len().max(1);
        let mut logits = logits;
        if logits.is_empty() {
            logits = vec![f32::NAN; n * classes];
        } else {
            softmax_rows(&mut logits, classes);
        }
        // A single row (the common case at low load) keeps the logits' vector as its scores.
        let rows_scored = logits.len() / classes;
        for i in 0..rows_scored {
            let scores = if rows_scored == 1 { std::mem::take(&mut logits) } else { logits[i * classes..(i + 1) * classes].to_vec() };
            let class_index = scores.iter().enumerate().fold(0, |best, (i, &s)| if s > scores[best] { i } else { best });
            let slot = part.rows.as_ref().map_or(i, |rows| rows[i]);
            slots[slot] = Some(Prediction {
                class_index,
                scores,
                labels: serving.labels.clone(),
                adapter: serving.adapter_id(),
                adapter_version: serving.version,
                base_routed: part.base_view,
                embedding: embedding_rows.as_ref().map(|e| e[i].clone()),
            });
        }
    }
}

/// The manifest of the test doubles' model: two values per row in (`x`), the same two out as the
/// embedding and as the base classifier's logits (labels `a`, `b`), no LoRA slot.
#[cfg(test)]
pub(crate) fn two_value_manifest() -> Manifest {
    let spec = |name: &str| serde_json::json!({ "name": name, "dtype": "f32", "shape": [-1, 2] });
    serde_json::from_value(serde_json::json!({
        "format": 1, "name": "pair", "version": "1", "fingerprint": "0", "exporter": { "torch": "-", "opset": 17 },
        "serving_graph": "serving.onnx", "training_graph": "train.pt", "files": {}, "inputs": [spec("x")], "outputs": [spec("embedding"), spec("logits")],
        "embedding_output": "embedding", "embedding_dim": 2, "logits_output": "logits", "labels": ["a", "b"],
        "preprocessing": { "kind": "tensor" }, "lora": { "rank_max": 1, "slots": [] },
    }))
    .unwrap_or_else(|e| panic!("the test model's manifest: {e}"))
}

#[cfg(test)]
mod tests {
    use adaptd_adapters::bundle::RetentionSet;
    use adaptd_adapters::head::{Dense, Head};

    use super::*;
    use crate::registry::BaseRoute;
    use crate::traffic::BaseRouter;

    /// A graph of two values per row: the embedding is the input with the LoRA's first value
    /// added to the row's first value, and the base classifier's logits are the embedding. It
    /// records each call's rows.
    struct Double {
        manifest: Manifest,
        calls: Vec<usize>,
        fail: bool,
    }

    impl InferenceBackend for Double {
        type Lora = f32;

        fn manifest(&self) -> &Manifest {
            &self.manifest
        }

        fn prepare_lora(&self, lora: &[HostTensor]) -> Result<f32, OnnxError> {
            Ok(lora.first().and_then(|t| t.as_f32()?.first().copied()).unwrap_or(0.0))
        }

        fn run_prepared(&mut self, inputs: Vec<HostTensor>, lora: &f32) -> Result<Vec<HostTensor>, OnnxError> {
            if self.fail {
                return Err(OnnxError::Run("the double fails".into()));
            }
            self.calls.push(inputs[0].shape[0]);
            let embedding: Vec<f32> = inputs[0].as_f32().unwrap().iter().enumerate().map(|(i, x)| if i % 2 == 0 { x + lora } else { *x }).collect();
            let shape = inputs[0].shape.clone();
            Ok(vec![HostTensor::f32(shape.clone(), embedding.clone()).unwrap(), HostTensor::f32(shape, embedding).unwrap()])
        }
    }

    fn serving(task: &str, version: u64, lora: (u64, f32), route: Option<BaseRoute>) -> Arc<Serving> {
        // A head that swaps the two values: the adapter's answer is the base's opposite.
        let weight = HostTensor::f32(vec![2, 2], vec![0.0, 1.0, 1.0, 0.0]).unwrap();
        Arc::new(Serving {
            task: task.into(),
            version,
            id: Serving::id_of(task, version),
            labels: vec!["a".to_string(), "b".to_string()].into(),
            head: (version > 0).then(|| Head { layers: vec![Dense { weight, bias: HostTensor::zeros_f32(vec![2]) }] }),
            lora: Arc::new(LoraInputs { key: lora.0, tensors: vec![HostTensor::f32(vec![1], vec![lora.1]).unwrap()] }),
            manifest: None,
            route,
        })
    }

    fn request(task: &str, rows: &[[f32; 2]]) -> (Request, oneshot::Receiver<Result<Vec<Prediction>, EngineError>>) {
        let (reply, rx) = oneshot::channel();
        let inputs = vec![HostTensor::f32(vec![rows.len(), 2], rows.concat()).unwrap()];
        let request = Request {
            task: task.into(),
            adapter: None,
            with_embedding: false,
            submitted: Instant::now(),
            inputs,
            rows: rows.len(),
            span: tracing::Span::none(),
            reply,
        };
        (request, rx)
    }

    fn run(double: &mut Double, tasks: &[(&str, Arc<Serving>)], batch: Vec<Request>) {
        let tasks: HashMap<String, Arc<Serving>> = tasks.iter().map(|(t, s)| (t.to_string(), s.clone())).collect();
        let current = |task: &str| tasks.get(task).cloned();
        let mut cache = LoraCache::new();
        run_batch(double, &current, &mut cache, batch, &EngineStats::default()).send();
    }

    fn labels(rx: &mut oneshot::Receiver<Result<Vec<Prediction>, EngineError>>) -> Vec<(String, bool)> {
        rx.try_recv().unwrap().unwrap().into_iter().map(|p| (p.label().to_string(), p.base_routed)).collect()
    }

    #[test]
    fn requests_that_share_a_lora_share_one_graph_call_and_each_gets_its_own_rows() {
        let mut double = Double { manifest: two_value_manifest(), calls: Vec::new(), fail: false };
        let tasks = [("base", serving("base", 0, (0, 0.0), None)), ("head", serving("head", 1, (0, 0.0), None)), ("lora", serving("lora", 2, (7, 5.0), None))];
        let (r1, mut a1) = request("base", &[[1.0, 0.0], [0.0, 1.0]]);
        let (r2, mut a2) = request("head", &[[1.0, 0.0]]);
        let (r3, mut a3) = request("lora", &[[1.0, 3.0]]);
        let (r4, mut a4) = request("nobody", &[[1.0, 0.0]]);
        run(&mut double, &tasks, vec![r1, r2, r3, r4]);
        assert_eq!(double.calls, vec![3, 1], "the base and the head-only adapter in one call, the LoRA in its own");
        assert_eq!(labels(&mut a1), [("a".into(), false), ("b".into(), false)]);
        assert_eq!(labels(&mut a2), [("b".into(), false)], "the head swaps the base's answer");
        assert_eq!(labels(&mut a3), [("b".into(), false)], "the LoRA moves the row to [6, 3], which the head swaps (without it: [3, 1], \"a\")");
        assert!(matches!(a4.try_recv().unwrap(), Err(EngineError::UnknownTask(t)) if t == "nobody"), "refused alone");
    }

    #[test]
    fn a_batch_is_answered_only_when_its_answers_are_sent_after_the_session_is_released() {
        let tasks: HashMap<String, Arc<Serving>> = [("base".to_string(), serving("base", 0, (0, 0.0), None))].into();
        let current = |task: &str| tasks.get(task).cloned();
        let mut double = Double { manifest: two_value_manifest(), calls: Vec::new(), fail: false };
        let (r, mut answer) = request("base", &[[1.0, 0.0]]);
        let answers = run_batch(&mut double, &current, &mut LoraCache::new(), vec![r], &EngineStats::default());
        assert!(matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "computed, not yet sent");
        answers.send();
        assert_eq!(labels(&mut answer), [("a".into(), false)]);
    }

    #[test]
    fn a_routed_adapter_answers_base_like_rows_with_the_base_and_keeps_the_row_order() {
        let retention = RetentionSet {
            inputs: vec![HostTensor::f32(vec![8, 2], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]].repeat(2).concat()).unwrap()],
            labels: vec![0, 0, 1, 1, 0, 0, 1, 1],
        };
        let route = BaseRoute {
            router: Arc::new(BaseRouter::from_retention(&retention).unwrap()),
            base_lora: Arc::new(LoraInputs { key: 0, tensors: Vec::new() }),
            base_index: vec![Some(0), Some(1)],
        };
        let tasks = [("cell", serving("cell", 3, (9, 0.0), Some(route)))];
        let mut double = Double { manifest: two_value_manifest(), calls: Vec::new(), fail: false };
        // Base-like, moved, base-like: the base answers rows 0 and 2, the adapter (swapping) row 1.
        let (r, mut answers) = request("cell", &[[1.0, 0.0], [5.0, 7.0], [0.0, 1.0]]);
        run(&mut double, &tasks, vec![r]);
        assert_eq!(double.calls, vec![1, 2], "one call for the adapter's row, one for the base's");
        assert_eq!(labels(&mut answers), [("a".into(), true), ("a".into(), false), ("b".into(), true)]);
    }

    #[test]
    fn a_request_that_finds_the_engine_idle_runs_on_its_callers_thread_and_otherwise_queues() {
        let tasks: HashMap<String, Arc<Serving>> = [("base".to_string(), serving("base", 0, (0, 0.0), None))].into();
        let shared: Shared<Double> = Shared::new(Box::new(move |task| tasks.get(task).cloned()), true);
        let stats = EngineStats::default();
        let queued = |shared: &Shared<Double>, request: Request, queue_empty: bool| shared.run_inline(request, queue_empty, &stats).is_some();
        assert!(queued(&shared, request("base", &[[1.0, 0.0]]).0, true), "before warm-up there is no session to run");
        shared.lock().model = Some(Double { manifest: two_value_manifest(), calls: Vec::new(), fail: false });
        assert!(queued(&shared, request("base", &[[1.0, 0.0]]).0, true), "no call measured yet: nothing is known to be cheap");
        stats.observe_call(1, Duration::from_micros(50));

        let (r, mut answer) = request("base", &[[1.0, 0.0]]);
        assert!(!queued(&shared, r, true), "idle and cheap: run here");
        assert_eq!(labels(&mut answer), [("a".into(), false)]);
        assert_eq!(stats.inline.load(Ordering::Relaxed), 1);

        assert!(queued(&shared, request("base", &[[1.0, 0.0]]).0, false), "requests queued ahead of it are not overtaken");
        {
            let _owner_runs_a_batch = shared.lock();
            assert!(queued(&shared, request("base", &[[1.0, 0.0]]).0, true), "the session is busy");
        }
        let (mut validation, _) = request("base", &[[1.0, 0.0]]);
        validation.adapter = Some(serving("base", 1, (0, 0.0), None));
        assert!(queued(&shared, validation, true), "validation traffic stays on the owner thread");
        assert!(queued(&shared, request("base", &[[1.0, 0.0]; INLINE_MAX_ROWS + 1]).0, true), "a large request batches");
        let batching: Shared<Double> = Shared::new(Box::new(|_: &str| None), false);
        batching.lock().model = Some(Double { manifest: two_value_manifest(), calls: Vec::new(), fail: false });
        assert!(queued(&batching, request("base", &[[1.0, 0.0]]).0, true), "max_wait > 0 asks for batching");
        for _ in 0..64 {
            stats.observe_call(1, INLINE_RUN_MAX * 4);
        }
        assert!(queued(&shared, request("base", &[[1.0, 0.0]]).0, true), "a slow model is not run on the caller's thread");
        assert_eq!(stats.inline.load(Ordering::Relaxed), 1);
        let cheap = EngineStats::default();
        cheap.observe_call(1, Duration::from_micros(50));
        shared.lock().model = None;
        assert!(shared.run_inline(request("base", &[[1.0, 0.0]]).0, true, &cheap).is_some(), "stopped: the queue answers");
    }

    #[test]
    fn a_failing_graph_call_fails_its_requests_with_the_reason() {
        let mut double = Double { manifest: two_value_manifest(), calls: Vec::new(), fail: true };
        let (r, mut answer) = request("base", &[[1.0, 0.0]]);
        run(&mut double, &[("base", serving("base", 0, (0, 0.0), None))], vec![r]);
        assert!(matches!(answer.try_recv().unwrap(), Err(EngineError::Runtime(m)) if m.contains("the double fails")));
    }
}
