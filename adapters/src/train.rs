//! Training through a bundle's TorchScript graph with libtorch (`tch`).
//!
//! The base model's parameters stay frozen (they were exported with `requires_grad=False` and
//! are never handed to an optimizer); only LoRA tensors and a classification head are trained.
//! libtorch types stay inside this module and whoever owns a `TrainingGraph`: results leave as
//! host tensors.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{CModule, Device, IValue, Kind, Tensor, nn, nn::OptimizerConfig};

use crate::bundle::{Bundle, DType, Manifest};
use crate::head::{Dense, Head};
use crate::lora::{LoraModule, LoraWeights, slot_shapes};
use crate::tensor::{HostData, HostTensor, SeededRng};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: cannot load the training graph: {source}")]
    Load { path: String, source: tch::TchError },
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
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl TrainError {
    pub fn error_type(&self) -> &'static str {
        match self {
            TrainError::Load { .. } => "load",
            TrainError::Forward { .. } | TrainError::Output(_) | TrainError::Torch(_) => "runtime",
            TrainError::InputDType { .. } | TrainError::InputCount { .. } | TrainError::Data(_) => "input",
            TrainError::NonFiniteLoss { .. } => "non_finite_loss",
            TrainError::Cancelled { .. } => "cancelled",
            TrainError::Lora(e) => e.error_type(),
        }
    }
}

/// The bundle's training graph, loaded into libtorch. `forward(model inputs..., A_0, B_0, ...)`.
pub struct TrainingGraph {
    module: CModule,
    manifest: Manifest,
    device: Device,
}

impl TrainingGraph {
    pub fn load(bundle: &Bundle, device: Device) -> Result<TrainingGraph, TrainError> {
        let path = bundle.training_graph_path();
        let mut module = CModule::load_on_device(&path, device)
            .map_err(|source| TrainError::Load { path: path.display().to_string(), source })?;
        module.set_eval();
        // Frozen by the exporter already; make sure no caller can build a graph into the base.
        for (_, p) in module.named_parameters()? {
            let _ = p.set_requires_grad(false);
        }
        Ok(TrainingGraph { module, manifest: bundle.manifest.clone(), device })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Run the graph on device tensors; gradients flow into whatever LoRA tensors require them.
    pub fn forward(&self, inputs: &[Tensor], lora: &[Tensor]) -> Result<Vec<Tensor>, TrainError> {
        let args: Vec<IValue> = inputs.iter().chain(lora).map(|t| IValue::Tensor(t.shallow_clone())).collect();
        let out = self
            .module
            .forward_is(&args)
            .map_err(|source| TrainError::Forward { bundle: self.manifest.name.clone(), source })?;
        match out {
            IValue::Tuple(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(TrainError::Output(format!("a tuple holding {other:?}"))),
                })
                .collect(),
            IValue::Tensor(t) => Ok(vec![t]),
            other => Err(TrainError::Output(format!("{other:?}"))),
        }
    }

    /// Inference on host tensors (no gradients), outputs in manifest order.
    pub fn forward_host(&self, inputs: &[HostTensor], lora: &[HostTensor]) -> Result<Vec<HostTensor>, TrainError> {
        self.check_inputs(inputs)?;
        let _guard = tch::no_grad_guard();
        let inputs: Vec<Tensor> = inputs.iter().map(|t| to_tensor(t, self.device)).collect();
        let lora: Vec<Tensor> = lora.iter().map(|t| to_tensor(t, self.device)).collect();
        self.forward(&inputs, &lora)?.iter().map(to_host).collect()
    }

    /// Deep copies of the base parameters, to prove later that training left them untouched.
    pub fn base_parameters(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        Ok(self.module.named_parameters()?.into_iter().map(|(n, t)| (n, t.copy())).collect())
    }

    /// True when every base parameter is bit-identical to `snapshot`.
    pub fn base_unchanged(&self, snapshot: &[(String, Tensor)]) -> Result<bool, TrainError> {
        let now = self.module.named_parameters()?;
        Ok(now.len() == snapshot.len() && now.iter().zip(snapshot).all(|((na, a), (nb, b))| na == nb && a.equal(b)))
    }

    fn check_inputs(&self, inputs: &[HostTensor]) -> Result<(), TrainError> {
        if inputs.len() != self.manifest.inputs.len() {
            return Err(TrainError::InputCount { expected: self.manifest.inputs.len(), actual: inputs.len() });
        }
        for (index, (t, spec)) in inputs.iter().zip(&self.manifest.inputs).enumerate() {
            if t.dtype() != spec.dtype {
                return Err(TrainError::InputDType { index, name: spec.name.clone(), actual: t.dtype(), expected: spec.dtype });
            }
        }
        Ok(())
    }
}

pub fn to_tensor(t: &HostTensor, device: Device) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let tensor = match &t.data {
        HostData::F32(v) => Tensor::from_slice(v),
        HostData::I64(v) => Tensor::from_slice(v),
    };
    tensor.reshape(shape).to_device(device)
}

pub fn to_host(t: &Tensor) -> Result<HostTensor, TrainError> {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let data = match t.kind() {
        Kind::Int64 => HostData::I64(Vec::<i64>::try_from(&t.flatten(0, -1))?),
        _ => HostData::F32(Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1))?),
    };
    Ok(HostTensor { shape, data })
}

/// Settings for a joint LoRA + head fine-tune. Defaults follow PEFT's usual LoRA recipe.
#[derive(Debug, Clone)]
pub struct LoraTrainConfig {
    pub rank: usize,
    pub alpha: f32,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub steps: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for LoraTrainConfig {
    fn default() -> Self {
        LoraTrainConfig { rank: 8, alpha: 8.0, learning_rate: 1e-3, weight_decay: 0.01, steps: 20, batch_size: 16, seed: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct LoraTrainReport {
    /// Training loss per step.
    pub losses: Vec<f32>,
    pub lora: LoraWeights,
    pub head: Head,
    /// Every base parameter bit-identical after training.
    pub base_unchanged: bool,
}

/// Fine-tune LoRA tensors on every slot plus a linear head on the embedding, with cross-entropy.
/// `inputs` are the model inputs for all samples (batch axis first), `labels` one class each.
/// B starts at zero and A at PEFT's Kaiming-uniform bound, so step 0 is exactly the base model.
pub fn train_lora_and_head(
    graph: &TrainingGraph,
    inputs: &[HostTensor],
    labels: &[i64],
    num_classes: usize,
    cfg: &LoraTrainConfig,
    cancel: &AtomicBool,
) -> Result<LoraTrainReport, TrainError> {
    graph.check_inputs(inputs)?;
    let n = labels.len();
    if n == 0 || inputs.iter().any(|t| t.shape.first() != Some(&n)) {
        return Err(TrainError::Data(format!("{n} labels, but inputs have batch sizes {:?}", inputs.iter().map(|t| t.shape.first()).collect::<Vec<_>>())));
    }
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= num_classes) {
        return Err(TrainError::Data(format!("label {bad} is outside 0..{num_classes}")));
    }
    let manifest = graph.manifest();
    let spec = &manifest.lora;
    if cfg.rank == 0 || cfg.rank > spec.rank_max {
        return Err(crate::lora::LoraError::Rank { rank: cfg.rank, rank_max: spec.rank_max }.into());
    }
    let emb_index = manifest
        .output_index(&manifest.embedding_output)
        .ok_or_else(|| TrainError::Data(format!("embedding output {:?} missing", manifest.embedding_output)))?;
    let device = graph.device();
    tch::manual_seed(cfg.seed as i64);
    let mut rng = SeededRng::new(cfg.seed);

    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let scale = cfg.alpha as f64 / cfg.rank as f64;
    let mut lora_vars = Vec::with_capacity(spec.slots.len());
    for (i, slot) in spec.slots.iter().enumerate() {
        let (a_shape, b_shape) = slot_shapes(slot, cfg.rank);
        let fan_in: usize = a_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt(); // kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
        let a_init: Vec<f32> = (0..a_shape.iter().product::<usize>()).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let a = root.var_copy(&format!("lora_a_{i}"), &to_tensor(&HostTensor { shape: a_shape, data: HostData::F32(a_init) }, device));
        let b = root.zeros(&format!("lora_b_{i}"), &b_shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        lora_vars.push((a, b));
    }
    let dim = manifest.embedding_dim as i64;
    let head_bound = 1.0 / (dim as f64).sqrt();
    let head_w = root.var("head_weight", &[num_classes as i64, dim], nn::Init::Uniform { lo: -head_bound, up: head_bound });
    let head_b = root.zeros("head_bias", &[num_classes as i64]);
    let mut opt = nn::AdamW { wd: cfg.weight_decay, ..Default::default() }.build(&vs, cfg.learning_rate)?;

    let padded = |lora_vars: &[(Tensor, Tensor)]| -> Vec<Tensor> {
        spec.slots
            .iter()
            .zip(lora_vars)
            .flat_map(|(slot, (a, b))| {
                let mut a_pad = slot.a_shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
                a_pad[0] = (spec.rank_max - cfg.rank) as i64;
                let mut b_pad = slot.b_shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
                b_pad[1] = (spec.rank_max - cfg.rank) as i64;
                let a_full = Tensor::cat(&[a.shallow_clone(), Tensor::zeros(&a_pad, (Kind::Float, device))], 0);
                let b_full = Tensor::cat(&[b * scale, Tensor::zeros(&b_pad, (Kind::Float, device))], 1);
                [a_full, b_full]
            })
            .collect()
    };

    let snapshot = graph.base_parameters()?;
    let all_inputs: Vec<Tensor> = inputs.iter().map(|t| to_tensor(t, device)).collect();
    let all_labels = Tensor::from_slice(labels).to_device(device);
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        if cancel.load(Ordering::Relaxed) {
            return Err(TrainError::Cancelled { step });
        }
        let idx: Vec<i64> = (0..cfg.batch_size.min(n)).map(|_| (rng.next_u64() % n as u64) as i64).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let batch: Vec<Tensor> = all_inputs.iter().map(|t| t.index_select(0, &idx)).collect();
        let outputs = graph.forward(&batch, &padded(&lora_vars))?;
        let logits = outputs[emb_index].linear(&head_w, Some(&head_b));
        let loss = logits.cross_entropy_for_logits(&all_labels.index_select(0, &idx));
        let value = loss.double_value(&[]) as f32;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss { step, loss: value });
        }
        opt.backward_step(&loss);
        losses.push(value);
    }

    let modules = spec
        .slots
        .iter()
        .zip(&lora_vars)
        .map(|(slot, (a, b))| Ok(LoraModule { module: slot.module.clone(), a: to_host(a)?, b: to_host(b)? }))
        .collect::<Result<Vec<_>, TrainError>>()?;
    Ok(LoraTrainReport {
        losses,
        lora: LoraWeights { rank: cfg.rank, alpha: cfg.alpha, modules },
        head: Head { layers: vec![Dense { weight: to_host(&head_w)?, bias: to_host(&head_b)? }] },
        base_unchanged: graph.base_unchanged(&snapshot)?,
    })
}
