//! Training through a bundle's TorchScript graph with libtorch (`tch`).
//!
//! The base model's parameters stay frozen (they were exported with `requires_grad=False` and
//! are never handed to an optimizer); only LoRA tensors and a classification head are trained.
//! libtorch types stay inside this crate and whoever owns a `TrainingGraph`: results leave as
//! host tensors.
//!
//! The recipe, the examples, the reports and the errors are plain data and build without
//! libtorch. The fitting itself (`fit`) is the `libtorch` feature, on by default: a crate that
//! only describes jobs or reads their reports (the daemon's unit tests, an inference-only build)
//! builds without it.

#[cfg(feature = "libtorch")]
mod fit;
#[cfg(feature = "libtorch")]
pub mod libtorch;
mod loss_scale;
pub mod sampling;

#[cfg(feature = "libtorch")]
pub use fit::{CUT_PARITY_TOLERANCE, FitTarget, MIXED_PRECISION_TOLERANCE, TrainingGraph, apply_step, fit, fit_cached, to_host, to_tensor};
pub use loss_scale::LossScale;

use adaptd_adapters::bundle::DType;
use adaptd_adapters::head::Head;
use adaptd_adapters::lora::LoraWeights;
use adaptd_adapters::tensor::HostTensor;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[cfg(feature = "libtorch")]
    #[error("{path}: cannot load the training graph: {source}")]
    Load { path: String, source: tch::TchError },
    #[cfg(feature = "libtorch")]
    #[error("training graph of bundle {bundle:?} failed: {source}")]
    Forward { bundle: String, source: tch::TchError },
    #[error("training graph returned {0}, expected a tuple of tensors")]
    Output(String),
    #[error("input {index} has dtype {actual:?}, the bundle's input {name:?} needs {expected:?}")]
    InputDType { index: usize, name: String, actual: DType, expected: DType },
    #[error("expected {expected} model inputs, got {actual}")]
    InputCount { expected: usize, actual: usize },
    #[error("{0}")]
    Data(String),
    #[error("loss became {loss} at step {step}; the candidate is discarded")]
    NonFiniteLoss { step: usize, loss: f32 },
    #[error("training was cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("training needs at least {needed} bytes at batch size 1, over the memory budget of {budget} bytes")]
    MemoryBudget { budget: u64, needed: u64 },
    #[error(transparent)]
    Lora(#[from] adaptd_adapters::lora::LoraError),
    #[error(transparent)]
    Slots(#[from] adaptd_adapters::slots::SlotError),
    #[cfg(feature = "libtorch")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl TrainError {
    pub fn error_type(&self) -> &'static str {
        match self {
            #[cfg(feature = "libtorch")]
            TrainError::Load { .. } => "load",
            #[cfg(feature = "libtorch")]
            TrainError::Forward { .. } | TrainError::Torch(_) => "runtime",
            TrainError::Output(_) => "runtime",
            TrainError::InputDType { .. } | TrainError::InputCount { .. } | TrainError::Data(_) => "input",
            TrainError::NonFiniteLoss { .. } => "non_finite_loss",
            TrainError::Cancelled { .. } => "cancelled",
            TrainError::MemoryBudget { .. } => "memory_budget",
            TrainError::Lora(e) => e.error_type(),
            TrainError::Slots(e) => e.error_type(),
        }
    }
}

/// A size in MiB as bytes; 0: none.
fn mib_or_none<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let mib = <u64 as serde::Deserialize>::deserialize(deserializer)?;
    Ok((mib > 0).then(|| mib.saturating_mul(1 << 20)))
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine down to zero.
    Cosine,
    /// A straight line down to zero.
    Linear,
    Constant,
}

/// A fine-tuning recipe: what the literature and PEFT's users expect, as plain numbers. As
/// a configuration file writes it (adaptd's `[training]` section), the memory budget is in MiB,
/// 0 for none.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Recipe {
    /// Peak learning rate of the LoRA tensors (low: they start at an exact copy of the base).
    pub learning_rate: f64,
    /// Peak learning rate of the head.
    pub head_learning_rate: f64,
    /// Decoupled weight decay (AdamW) on everything trained.
    pub weight_decay: f64,
    /// Share of all steps spent warming the learning rate up linearly from zero.
    pub warmup_fraction: f64,
    pub schedule: Schedule,
    pub max_epochs: usize,
    pub batch_size: usize,
    /// Stop after this many epochs without a better validation loss, and keep the best epoch (0: off).
    pub patience: usize,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip: f64,
    /// Dropout on the embedding before the head, while training.
    pub dropout: f64,
    /// Dropout on each LoRA slot's input while training, as PEFT's `lora_dropout`.
    pub lora_dropout: f64,
    /// Draw each epoch's samples with probability inverse to their class's frequency.
    pub class_balanced: bool,
    /// Gradual unfreezing: train only the head for this many epochs before LoRA joins.
    pub head_only_epochs: usize,
    /// Training may grow the process's peak memory by at most this much: the batch shrinks to
    /// fit, or the job is refused. Measured on a probe step, so it holds on the device at hand.
    #[serde(rename = "memory_budget_mb", deserialize_with = "mib_or_none")]
    pub memory_budget_bytes: Option<u64>,
    pub seed: u64,
}

impl Default for Recipe {
    fn default() -> Self {
        // Measured on the shift suite (benches/shifts.py): LoRA at 1e-3 for up to 30 epochs,
        // patience 5, reaches 0.92-0.98 of a full fine-tune where 5e-4, 20 and 3 reached
        // 0.87-0.95; 1e-3 is also the rate the MiniLM intent bench matches PEFT with.
        Recipe {
            learning_rate: 1e-3,
            head_learning_rate: 5e-3,
            weight_decay: 0.01,
            warmup_fraction: 0.1,
            schedule: Schedule::Cosine,
            max_epochs: 30,
            batch_size: 16,
            patience: 5,
            grad_clip: 1.0,
            dropout: 0.1,
            lora_dropout: 0.05,
            class_balanced: true,
            head_only_epochs: 0,
            memory_budget_bytes: None,
            seed: 0,
        }
    }
}

/// The learning-rate multiplier at `step` (0-based) of `total`: linear warm-up, then the schedule.
pub fn lr_factor(schedule: Schedule, warmup_steps: usize, step: usize, total: usize) -> f64 {
    if step < warmup_steps {
        return (step + 1) as f64 / (warmup_steps + 1) as f64;
    }
    let span = total.saturating_sub(warmup_steps).max(1) as f64;
    let progress = ((step - warmup_steps) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Schedule::Linear => 1.0 - progress,
        Schedule::Constant => 1.0,
    }
}

/// Labelled examples: inputs with a leading batch axis, one class index and one weight per row.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    pub inputs: Vec<HostTensor>,
    pub labels: Vec<i64>,
    pub weights: Vec<f32>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether the examples hold together: a label, a weight and a row of every input per
    /// example, labels in `0..classes`, weights finite and non-negative. `what` names them in the error.
    pub fn check(&self, what: &str, classes: usize) -> Result<(), TrainError> {
        let n = self.labels.len();
        if self.weights.len() != n || self.inputs.iter().any(|t| t.shape.first() != Some(&n)) {
            return Err(TrainError::Data(format!(
                "{what}: {n} labels, {} weights, inputs with batch sizes {:?}",
                self.weights.len(),
                self.inputs.iter().map(|t| t.shape.first()).collect::<Vec<_>>()
            )));
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
            return Err(TrainError::Data(format!("{what}: label {bad} is outside 0..{classes}")));
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(TrainError::Data(format!("{what}: sample weight {w} must be finite and non-negative")));
        }
        Ok(())
    }
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub epoch: usize,
    pub max_epochs: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: f32,
    pub learning_rate: f64,
}

pub use adaptd_protocol::event::EpochRecord;

#[derive(Debug, Clone)]
pub struct FitReport {
    pub head: Head,
    pub lora: Option<LoraWeights>,
    pub reft: Option<adaptd_adapters::ReftWeights>,
    pub epochs: Vec<EpochRecord>,
    /// The epoch whose weights were kept (lowest validation loss).
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub steps: usize,
    /// The batch size used, after any shrinking to fit the memory budget.
    pub batch_size: usize,
    pub samples_per_second: f64,
    /// Peak memory the probe step added, when a budget was set.
    pub probe_bytes_per_sample: Option<u64>,
    /// The LoRA dropout applied (0 for heads, and for bundles without the dropout input).
    pub lora_dropout: f64,
    /// LoRA only: every base parameter bit-identical after training.
    pub base_unchanged: Option<bool>,
    /// The step losses, for loss curves.
    pub losses: Vec<f32>,
    /// LoRA trained with the base under fp16 autocast (CUDA); with the steps the loss scaler
    /// skipped for overflowing gradients.
    pub mixed_precision: bool,
    pub skipped_steps: usize,
    /// Above a cut: the prefix activations' key, the rows computed (for the cache) and reused.
    pub prefix: Option<PrefixComputed>,
}

/// A prefix activation kept from an earlier job: one row (text: its tokens only, no padding),
/// f32, and the [`TrainingGraph::prefix_key`] it was computed under.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedActivation {
    pub key: String,
    pub data: Vec<f32>,
}

/// Prefix activations a job may reuse, one entry per training row and per validation row (None:
/// not kept). Rows whose key is not the job's are computed again.
#[derive(Debug, Clone, Default)]
pub struct PrefixCache {
    pub train: Vec<Option<CachedActivation>>,
    pub validation: Vec<Option<CachedActivation>>,
    /// Return the rows computed now (in the report's `prefix`), to keep for the next job.
    pub keep: bool,
}

/// What a job above a cut did with the prefix: the key its activations belong to, the rows it
/// computed (to keep for the next job) and how many it reused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixComputed {
    pub key: String,
    pub train: Vec<Option<Vec<f32>>>,
    pub validation: Vec<Option<Vec<f32>>>,
    pub reused: usize,
    pub computed: usize,
}

pub mod memory {
    //! The process's resident memory, from `/proc/self/status`.

    fn status_kib(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line[field.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()
    }

    /// Resident set size now, in bytes.
    pub fn rss() -> Option<u64> {
        status_kib("VmRSS:").map(|k| k * 1024)
    }

    /// Peak resident set size since start (or the last reset), in bytes.
    pub fn peak_rss() -> Option<u64> {
        status_kib("VmHWM:").map(|k| k * 1024)
    }

    /// Hand freed heap pages back to the kernel, then reset the peak to the current RSS; returns
    /// the current RSS. Without the trim, a step could reuse pages freed earlier and look free.
    pub fn reset_peak() -> Option<u64> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator; no pointer is touched.
        unsafe {
            libc::malloc_trim(0);
        }
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
        rss()
    }
}
