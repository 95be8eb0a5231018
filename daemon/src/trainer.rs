//! The trainer: one owner thread for all training state.
//!
//! The thread runs jobs on a [`TrainBackend`]: in the daemon, libtorch through the bundle's
//! training graph (the `training` feature), loaded once on the thread (on CUDA when libtorch sees
//! a GPU and the configuration allows it); in the task loop's unit tests, a test double. It runs
//! at background priority so serving keeps the CPU it needs, and takes jobs one at a time. A job
//! goes in as host tensors and comes out as a plain [`FitReport`]: no tch type leaves this
//! module. Every job is cancellable between steps and can be paused (the latency guard does); a
//! panic inside the backend becomes an error for that job, and the thread carries on.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use adaptd_adapters::bundle::Bundle;
use adaptd_adapters::head::Head;
use adaptd_adapters::lora::LoraWeights;
use adaptd_adapters::reft::{ReftPositions, ReftWeights};
use adaptd_adapters::tensor::HostTensor;
use adaptd_train::{Examples, FitReport, PrefixCache, Progress, Recipe, TrainError};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainDevice {
    /// CUDA when libtorch sees a GPU, else the CPU.
    Auto,
    Cpu,
    /// CUDA or refuse to start.
    Cuda,
}

/// The precision of LoRA training forwards on CUDA (the CPU always trains in fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// fp16 autocast on CUDA where the bundle's graph passes the numerics check, else fp32.
    Auto,
    Fp32,
    /// fp16 autocast on CUDA, or refuse to start there.
    Fp16,
}

/// The trainer thread's settings: part of the `[training]` section of the configuration file,
/// applied at start-up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrainerConfig {
    pub device: TrainDevice,
    /// libtorch intra-op threads (leave cores for serving).
    pub threads: usize,
    /// LoRA trains above the bundle's cut when it has one (activations below it computed once
    /// per sample and job).
    pub above_cut: bool,
    pub precision: TrainPrecision,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig { device: TrainDevice::Auto, threads: 1, above_cut: true, precision: TrainPrecision::Auto }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum JobKind {
    /// A classification head on cached backbone embeddings.
    Head,
    /// LoRA on every slot of the bundle, trained jointly with the head.
    Lora { rank: usize, alpha: f32 },
    /// LoReFT on the bundle's LoReFT slots (the layers `TrainJob::loreft_layers` names, else
    /// all), editing `positions` of sequences, trained jointly with the head.
    Loreft { rank: usize, positions: ReftPositions },
}

impl JobKind {
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Head => "head",
            JobKind::Lora { .. } => "lora",
            JobKind::Loreft { .. } => "loreft",
        }
    }

    /// The name with its rank: `head`, `lora-r8`.
    pub fn label(&self) -> String {
        match self {
            JobKind::Head => "head".into(),
            JobKind::Lora { rank, .. } => format!("lora-r{rank}"),
            JobKind::Loreft { rank, .. } => format!("loreft-r{rank}"),
        }
    }
}

/// The rank and alpha a LoRA job of `rank` and `alpha` trains at when it continues from a LoRA of
/// `from_rank`: a higher rank is kept (a fleet aggregate at `rank_max`, say, or the r16 an earlier
/// job promoted), at the same alpha/rank.
pub fn continued_lora(rank: usize, alpha: f32, from_rank: Option<usize>) -> (usize, f32) {
    match from_rank {
        Some(from) if from > rank => (from, alpha * from as f32 / rank as f32),
        _ => (rank, alpha),
    }
}

pub struct TrainJob {
    pub kind: JobKind,
    /// For `Head`: one `[N, dim]` embedding tensor; for `Lora`: the model inputs.
    pub train: Examples,
    pub validation: Examples,
    pub init_head: Head,
    /// For `Lora`: the LoRA that serves now, to continue from (the job's rank grows to hold it).
    pub start_lora: Option<LoraWeights>,
    /// For `Loreft`: the LoReFT that serves now, to continue from, and the layers to edit
    /// (empty: every LoReFT slot the bundle has).
    pub start_reft: Option<ReftWeights>,
    pub loreft_layers: Vec<String>,
    pub recipe: Recipe,
    /// For `Lora` above a cut: prefix activations kept from earlier jobs.
    pub prefix_cache: PrefixCache,
}

/// A submitted job: its progress, its result, and the switches to pause or cancel it.
pub struct JobHandle {
    pub cancel: Arc<AtomicBool>,
    pub pause: Arc<AtomicBool>,
    pub progress: mpsc::UnboundedReceiver<Progress>,
    pub done: oneshot::Receiver<Result<FitReport, TrainError>>,
}

enum Command {
    Fit {
        job: Box<TrainJob>,
        cancel: Arc<AtomicBool>,
        pause: Arc<AtomicBool>,
        progress: mpsc::UnboundedSender<Progress>,
        reply: oneshot::Sender<Result<FitReport, TrainError>>,
    },
    Predict {
        inputs: Vec<HostTensor>,
        slots: Vec<HostTensor>,
        head: Head,
        reply: oneshot::Sender<Result<Vec<f32>, TrainError>>,
    },
    Stop,
}

pub struct Trainer {
    tx: std::sync::mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("training.device is \"cuda\", but CUDA is not available to libtorch: {0}")]
    NoCuda(String),
    #[error("the trainer thread has stopped")]
    Stopped,
    #[error("this build of adaptd cannot train: the daemon was built without its `training` feature (libtorch)")]
    NotBuilt,
}

impl TrainerError {
    pub fn error_type(&self) -> &'static str {
        match self {
            TrainerError::Train(e) => e.error_type(),
            TrainerError::NoCuda(_) => "no_cuda",
            TrainerError::Stopped => "trainer_stopped",
            TrainerError::NotBuilt => "training_not_built",
        }
    }
}

impl Trainer {
    /// Start the owner thread and load the bundle's training graph on it (libtorch); returns
    /// once it is loaded.
    pub fn start(bundle: Bundle, config: TrainerConfig) -> Result<Trainer, TrainerError> {
        #[cfg(feature = "training")]
        return torch::start(bundle, config);
        #[cfg(not(feature = "training"))]
        {
            let _ = (bundle, config);
            Err(TrainerError::NotBuilt)
        }
    }

    /// Start the owner thread over any backend: `load` builds it on that thread (so it need not
    /// be `Send`: libtorch's state never leaves the thread). Returns once it is loaded.
    pub fn start_with<B, L>(load: L) -> Result<Trainer, TrainerError>
    where
        B: TrainBackend,
        L: FnOnce() -> Result<B, TrainerError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("adaptd-trainer".into())
            .spawn(move || {
                crate::background_priority();
                let backend = match load() {
                    Ok(backend) => backend,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let _ = loaded_tx.send(Ok(backend.device()));
                while let Ok(command) = rx.recv() {
                    match command {
                        Command::Fit { job, cancel, pause, progress, reply } => {
                            let mut report = |p: &Progress| {
                                let _ = progress.send(p.clone());
                                // Paused (serving is over its latency budget): hold here between
                                // steps until resumed or cancelled.
                                while pause.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) {
                                    std::thread::sleep(Duration::from_millis(20));
                                }
                            };
                            let _ = reply.send(guarded(|| backend.fit(&job, &cancel, &mut report)));
                        }
                        Command::Predict { inputs, slots, head, reply } => {
                            let _ = reply.send(guarded(|| backend.predict(&inputs, &slots, &head)));
                        }
                        Command::Stop => return,
                    }
                }
            })
            .map_err(|e| TrainerError::Train(TrainError::Data(format!("cannot start the trainer thread: {e}"))))?;
        match loaded_rx.recv() {
            Ok(Ok(device)) => Ok(Trainer { tx, thread: Some(thread), device }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(TrainerError::Stopped),
        }
    }

    /// "cpu" or "cuda(0)".
    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn submit(&self, job: TrainJob) -> Result<JobHandle, TrainerError> {
        let (cancel, pause) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (progress_tx, progress) = mpsc::unbounded_channel();
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Fit { job: Box::new(job), cancel: cancel.clone(), pause: pause.clone(), progress: progress_tx, reply })
            .map_err(|_| TrainerError::Stopped)?;
        Ok(JobHandle { cancel, pause, progress, done })
    }

    /// Softmax scores of `head` over the training graph's embedding with the adapter's slot
    /// values `slots` (LoRA and LoReFT, as serving feeds them): the trainer's side of the
    /// engine/trainer parity check.
    pub async fn predict(&self, inputs: Vec<HostTensor>, slots: Vec<HostTensor>, head: Head) -> Result<Vec<f32>, TrainerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Predict { inputs, slots, head, reply }).map_err(|_| TrainerError::Stopped)?;
        Ok(rx.await.map_err(|_| TrainerError::Stopped)??)
    }

    /// Stop after the current job (cancel it first to stop sooner) and join the thread.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the trainer's owner thread runs jobs on: libtorch through the bundle's training graph in
/// the daemon (the `training` feature), a test double in the unit tests of the task loop.
pub trait TrainBackend: 'static {
    /// Where it trains: "cpu" or "cuda(0)".
    fn device(&self) -> String;
    /// Fit `job`, reporting after every optimizer step; stop with `TrainError::Cancelled` once
    /// `cancel` is set.
    fn fit(&self, job: &TrainJob, cancel: &AtomicBool, progress: &mut dyn FnMut(&Progress)) -> Result<FitReport, TrainError>;
    /// Softmax scores of `head` over the embedding of `inputs` with the slot values `slots`.
    fn predict(&self, inputs: &[HostTensor], slots: &[HostTensor], head: &Head) -> Result<Vec<f32>, TrainError>;
}

/// A panic inside a backend (libtorch) fails the job, not the daemon.
fn guarded<T>(f: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Err(TrainError::Data(format!("the trainer panicked: {message}")))
    })
}

/// The owner thread's side: everything here runs on it, and it alone touches libtorch.
#[cfg(feature = "training")]
mod torch {
    use std::sync::atomic::AtomicBool;

    use adaptd_adapters::bundle::Bundle;
    use adaptd_adapters::head::{Head, softmax_rows};
    use adaptd_adapters::tensor::HostTensor;
    use adaptd_train::{FitReport, FitTarget, Progress, TrainError, TrainingGraph, fit_cached, libtorch};

    use super::{JobKind, TrainBackend, TrainDevice, TrainJob, TrainPrecision, Trainer, TrainerConfig, TrainerError};

    /// The bundle's training graph, loaded into libtorch on the owner thread.
    struct Torch {
        graph: TrainingGraph,
    }

    pub(super) fn start(bundle: Bundle, config: TrainerConfig) -> Result<Trainer, TrainerError> {
        let device = match config.device {
            TrainDevice::Cpu => tch::Device::Cpu,
            TrainDevice::Auto if libtorch::cuda_available() => tch::Device::Cuda(0),
            TrainDevice::Auto => tch::Device::Cpu,
            TrainDevice::Cuda if libtorch::cuda_available() => tch::Device::Cuda(0),
            TrainDevice::Cuda => return Err(TrainerError::NoCuda(libtorch::cuda_unavailable_reason().unwrap_or_default())),
        };
        tracing::info!(
            library = %libtorch::cpu_library().map_or("(not mapped)".into(), |p| p.display().to_string()),
            device = ?device,
            cuda = %libtorch::cuda_unavailable_reason().map_or("available".into(), |r| format!("not available: {r}")),
            "libtorch loaded"
        );
        Trainer::start_with(move || {
            tch::set_num_threads(config.threads.max(1) as i32);
            let mut graph = TrainingGraph::load(&bundle, device)?;
            if let Some(cut) = bundle.manifest.cut.as_ref().filter(|_| config.above_cut) {
                // A cut that does not hold costs speed, not serving: train the whole graph.
                match graph.load_cut(&bundle) {
                    Ok(()) => tracing::info!(cut = %cut.after, slots = cut.slots_above.len(), "LoRA trains above the bundle's cut"),
                    Err(e) => tracing::warn!(cut = %cut.after, error = %e, "the bundle's cut is not used: LoRA trains the whole graph"),
                }
            }
            choose_precision(&mut graph, config.precision)?;
            Ok(Torch { graph })
        })
    }

    impl TrainBackend for Torch {
        fn device(&self) -> String {
            format!("{:?}", self.graph.device()).to_lowercase()
        }

        fn fit(&self, job: &TrainJob, cancel: &AtomicBool, progress: &mut dyn FnMut(&Progress)) -> Result<FitReport, TrainError> {
            let graph = &self.graph;
            let target = match job.kind {
                JobKind::Head => FitTarget::Head { device: graph.device() },
                JobKind::Lora { rank, alpha } => {
                    let start = job.start_lora.as_ref();
                    let (rank, alpha) = super::continued_lora(rank, alpha, start.map(|s| s.rank));
                    FitTarget::Lora { graph, rank, alpha, start }
                }
                JobKind::Loreft { rank, positions } => {
                    let start = job.start_reft.as_ref();
                    // Positions only where the bundle edits sequences.
                    let positions = graph.manifest().reft.as_ref().and_then(|r| r.positions_input.as_ref()).map(|_| positions);
                    FitTarget::Loreft { graph, rank: start.map_or(rank, |s| s.rank.max(rank)), positions, layers: &job.loreft_layers, start }
                }
            };
            let _span = tracing::info_span!("train", kind = job.kind.name(), samples = job.train.len()).entered();
            fit_cached(target, &job.train, &job.validation, &job.init_head, &job.recipe, &job.prefix_cache, cancel, progress)
        }

        fn predict(&self, inputs: &[HostTensor], slots: &[HostTensor], head: &Head) -> Result<Vec<f32>, TrainError> {
            let manifest = self.graph.manifest();
            let outputs = self.graph.forward_host(inputs, slots)?;
            let no_embedding = || TrainError::Output("the training graph gave no f32 embedding".into());
            let emb = manifest.output_index(&manifest.embedding_output).and_then(|i| outputs.get(i)).ok_or_else(no_embedding)?;
            let rows = emb.shape.first().copied().unwrap_or(0);
            let mut scores = head.forward(emb.as_f32().ok_or_else(no_embedding)?, rows);
            softmax_rows(&mut scores, head.classes());
            Ok(scores)
        }
    }

    /// Mixed precision where asked for and it holds: on CUDA, `auto` tries fp16 autocast and keeps
    /// fp32 (with the reason logged) where the bundle's graph fails the numerics check; `fp16`
    /// refuses to start then. On the CPU training is fp32 whatever is asked.
    fn choose_precision(graph: &mut TrainingGraph, precision: TrainPrecision) -> Result<(), TrainError> {
        if !graph.device().is_cuda() {
            if precision == TrainPrecision::Fp16 {
                tracing::warn!("training.precision is \"fp16\", but training runs on the CPU: fp32");
            }
            return Ok(());
        }
        if precision == TrainPrecision::Fp32 {
            return Ok(());
        }
        match graph.enable_mixed_precision() {
            Ok(diff) => tracing::info!(embedding_relative_diff = diff, "LoRA trains with the base under fp16 autocast"),
            Err(e) if precision == TrainPrecision::Auto => tracing::warn!(error = %e, "LoRA trains in fp32"),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
