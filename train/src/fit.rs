//! Fitting heads and LoRA adapters with libtorch: the training graph, the optimizer loop, the
//! prefix cache above a cut, mixed precision.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{CModule, Device, IValue, Kind, Tensor, nn, nn::OptimizerConfig};

use adaptd_adapters::bundle::{Bundle, DType, LoraSpec, Manifest, ReftSpec};
use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::lora::{LoraModule, LoraWeights, slot_shapes};
use adaptd_adapters::reft::{ReftModule, ReftPositions, ReftWeights};
use adaptd_adapters::tensor::{HostData, HostTensor, SeededRng};

use crate::LossScale;
use crate::sampling::{class_counts, epoch_order};
use crate::{CachedActivation, EpochRecord, Examples, FitReport, PrefixCache, PrefixComputed, Progress, Recipe, TrainError, lr_factor, memory};

/// Per row, the activation computed now (None: reused, or not asked to keep).
type ComputedRows = Vec<Option<Vec<f32>>>;

/// The bundle's training graph, loaded into libtorch. `forward(model inputs..., A_0, B_0, ...)`.
pub struct TrainingGraph {
    module: CModule,
    manifest: Manifest,
    device: Device,
    /// Text bundles: the position of the `attention_mask` input, for trimming padding per batch.
    attention_mask: Option<usize>,
    /// The bundle's cut, once loaded: LoRA then trains above it ([`TrainingGraph::load_cut`]).
    cut: Option<CutGraphs>,
    /// Training forwards run under CUDA fp16 autocast ([`TrainingGraph::enable_mixed_precision`]).
    mixed_precision: bool,
    /// sha256 of the bundle's manifest (which pins every file's digest): part of the key cached
    /// prefix activations are kept under.
    bundle_sha256: String,
}

/// A TorchScript graph on `device`, in eval mode, every parameter frozen: the exporter froze them
/// already; this makes sure no caller can build a graph into the base.
fn load_frozen(path: &std::path::Path, device: Device) -> Result<CModule, TrainError> {
    let mut module = CModule::load_on_device(path, device).map_err(|source| TrainError::Load { path: path.display().to_string(), source })?;
    module.set_eval();
    for (_, p) in module.named_parameters()? {
        let _ = p.set_requires_grad(false);
    }
    Ok(module)
}

/// How far the cut's halves may stray from the training graph (fp32, as serving parity).
pub const CUT_PARITY_TOLERANCE: f32 = 1e-4;

/// How far (relative to its largest value) the embedding may stray from fp32 under fp16
/// autocast before mixed precision is refused: fp16 keeps ~3 significant digits per product, and
/// a graph that overflows fp16 somewhere shows as inf/NaN or a gross difference here.
pub const MIXED_PRECISION_TOLERANCE: f32 = 5e-2;

/// The two halves of a bundle cut after a module.
struct CutGraphs {
    /// Model inputs and LoRA values -> the cut module's output. Frozen.
    prefix: CModule,
    /// Model inputs, that output, LoRA values and the dropout keep -> the model outputs.
    suffix: CModule,
    /// The slots that run above the cut: the only ones a job above the cut trains.
    slots_above: Vec<usize>,
    /// The LoReFT slots whose edit is above the cut: the only ones a LoReFT job above it trains.
    reft_above: Vec<usize>,
    /// The activation's shape (-1: dynamic), batch axis first.
    activation_shape: Vec<i64>,
}

impl TrainingGraph {
    pub fn load(bundle: &Bundle, device: Device) -> Result<TrainingGraph, TrainError> {
        let path = bundle.training_graph_path();
        // The profiling executor specialises the graph into differentiable subgraphs that keep
        // extra copies of activations: measured on MiniLM LoRA (batch 16, seq 64), the legacy
        // executor trains 1.2x faster at 0.57x the peak RSS. Process-wide, and only TorchScript
        // (training) is affected; serving runs on ONNX Runtime.
        tch::jit::set_profiling_mode(false);
        let module = load_frozen(&path, device)?;
        let attention_mask = match bundle.manifest.preprocessing {
            adaptd_adapters::bundle::Preprocessing::Text { .. } => bundle.manifest.inputs.iter().position(|i| i.name == "attention_mask"),
            _ => None,
        };
        Ok(TrainingGraph {
            module,
            manifest: bundle.manifest.clone(),
            device,
            attention_mask,
            cut: None,
            mixed_precision: false,
            bundle_sha256: bundle.manifest_sha256.clone(),
        })
    }

    /// Load the bundle's prefix and suffix graphs: from then on LoRA jobs on this graph train the
    /// slots above the cut only, on activations the prefix computes once per sample and job (the
    /// slots below stay as the job starts them: the serving LoRA's, or none).
    pub fn load_cut(&mut self, bundle: &Bundle) -> Result<(), TrainError> {
        let cut =
            bundle.manifest.cut.as_ref().ok_or_else(|| TrainError::Data(format!("bundle {} is not cut for training above a prefix", bundle.manifest.name)))?;
        let load = |file: &str| load_frozen(&bundle.dir.join(file), self.device);
        self.cut = Some(CutGraphs {
            prefix: load(&cut.prefix_graph)?,
            suffix: load(&cut.suffix_graph)?,
            slots_above: cut.slots_above.clone(),
            reft_above: cut.reft_above.clone(),
            activation_shape: cut.activation.shape.clone(),
        });
        // An adapter trained above the cut is served by the whole graph: the halves must compute
        // its function, or what the gate validates is not what serves.
        let diff = self.cut_parity().inspect_err(|_| self.cut = None)?;
        if diff.is_nan() || diff > CUT_PARITY_TOLERANCE {
            self.cut = None;
            return Err(TrainError::Data(format!(
                "bundle {}: prefix + suffix differ from the training graph by {diff:.2e} (tolerance {CUT_PARITY_TOLERANCE:.0e}); not training above its cut",
                bundle.manifest.name
            )));
        }
        Ok(())
    }

    /// The largest difference between the training graph's outputs and the suffix's fed the
    /// prefix's output, on two synthetic rows with a seeded random LoRA in every slot.
    fn cut_parity(&self) -> Result<f32, TrainError> {
        let (inputs, lora) = self.synthetic_batch(17);
        let _guard = tch::no_grad_guard();
        let whole = self.forward(&inputs, &lora)?;
        let activation = self.prefix(&inputs, &lora)?;
        let halves = self.forward_suffix(&inputs, &activation, &lora, 0.0)?;
        if whole.len() != halves.len() {
            return Err(TrainError::Output(format!("the suffix returned {} outputs, the training graph {}", halves.len(), whole.len())));
        }
        let mut worst = 0.0f32;
        for (a, b) in whole.iter().zip(&halves) {
            if a.size() != b.size() {
                return Err(TrainError::Output(format!("the suffix returned shape {:?} where the training graph returns {:?}", b.size(), a.size())));
            }
            worst = worst.max((a - b).abs().max().double_value(&[]) as f32);
        }
        Ok(worst)
    }

    /// Two synthetic rows (random features, token ids in the common vocabulary, a mask of ones)
    /// and a seeded random LoRA in every slot: for checks that need no data.
    fn synthetic_batch(&self, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
        let mut rng = SeededRng::new(seed);
        let inputs: Vec<Tensor> = self
            .manifest
            .inputs
            .iter()
            .map(|spec| {
                let shape: Vec<usize> = spec
                    .shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if d >= 0 {
                            d as usize
                        } else if i == 0 {
                            2
                        } else {
                            8
                        }
                    })
                    .collect();
                let n: usize = shape.iter().product();
                let host = match spec.dtype {
                    DType::F32 => HostTensor { shape, data: HostData::F32(rng.normal_vec(n, 1.0)) },
                    // Token ids in the common vocabulary, and an attention mask of ones.
                    _ if spec.name == "attention_mask" => HostTensor { shape, data: HostData::I64(vec![1; n]) },
                    _ => HostTensor { shape, data: HostData::I64((0..n).map(|_| 1000 + (rng.uniform() * 1000.0) as i64).collect()) },
                };
                to_tensor(&host, self.device)
            })
            .collect();
        let lora: Vec<Tensor> = self
            .manifest
            .lora
            .slots
            .iter()
            .flat_map(|slot| [&slot.a_shape, &slot.b_shape])
            .map(|shape| {
                let n: usize = shape.iter().product();
                to_tensor(&HostTensor { shape: shape.clone(), data: HostData::F32(rng.normal_vec(n, 0.05)) }, self.device)
            })
            .collect();
        // Random LoReFT edits too, so the checks cover the LoReFT slots as well.
        let reft = match &self.manifest.reft {
            Some(spec) => ReftWeights::random(spec, spec.rank_max, seed, 0.1)
                .and_then(|r| r.reft_inputs(spec))
                .unwrap_or_else(|_| adaptd_adapters::reft::no_edit_inputs(spec)),
            None => Vec::new(),
        };
        let lora = lora.into_iter().chain(reft.iter().map(|t| to_tensor(t, self.device))).collect();
        (inputs, lora)
    }

    /// Train with the frozen base's matrix products in fp16 (CUDA autocast, as PyTorch's AMP):
    /// the tensor cores' speed and half the activation memory, while the weights, the LoRA
    /// values and the optimizer stay fp32 and the loss is scaled so small gradients survive.
    /// Inference (`forward`, `forward_host`: the gate's parity check) stays fp32. Refused on the
    /// CPU, and where the bundle's graph does not keep its embedding within
    /// [`MIXED_PRECISION_TOLERANCE`] (relative) of fp32 under autocast; returns that difference.
    pub fn enable_mixed_precision(&mut self) -> Result<f32, TrainError> {
        if !self.device.is_cuda() {
            return Err(TrainError::Data("fp16 autocast trains on CUDA; this training graph is on the CPU".into()));
        }
        let emb = self.manifest.output_index(&self.manifest.embedding_output).ok_or_else(|| TrainError::Output("no embedding output".into()))?;
        let (inputs, lora) = self.synthetic_batch(23);
        let _guard = tch::no_grad_guard();
        let pick = |outputs: Vec<Tensor>| outputs.into_iter().nth(emb).ok_or_else(|| TrainError::Output("no embedding output".into()));
        let full = pick(self.forward(&inputs, &lora)?)?;
        let half = pick(tch::autocast(true, || self.forward(&inputs, &lora))?)?.to_kind(Kind::Float);
        let scale = full.abs().max().double_value(&[]).max(1e-6);
        let diff = ((&full - &half).abs().max().double_value(&[]) / scale) as f32;
        if !diff.is_finite() || diff > MIXED_PRECISION_TOLERANCE {
            return Err(TrainError::Data(format!(
                "bundle {}: under fp16 autocast the embedding differs from fp32 by {diff:.2e} (relative; tolerance {MIXED_PRECISION_TOLERANCE:.0e}); training stays fp32",
                self.manifest.name
            )));
        }
        self.mixed_precision = true;
        Ok(diff)
    }

    /// Whether training forwards run under fp16 autocast.
    pub fn mixed_precision(&self) -> bool {
        self.mixed_precision
    }

    /// `f` under fp16 autocast when mixed precision is on (training forwards only).
    fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.mixed_precision { tch::autocast(true, f) } else { f() }
    }

    /// What a prefix activation computed now depends on, as a short digest: the bundle (its
    /// manifest pins every graph file), the precision, and the slot values below the cut
    /// (`values`: graph-input order, LoRA's B already scaled). A LoRA slot whose B is zero adds
    /// nothing to the prefix whatever its A, and a LoReFT slot whose R is zero edits nothing:
    /// they count as absent.
    pub fn prefix_key(&self, values: &[Tensor]) -> Result<String, TrainError> {
        use sha2::{Digest, Sha256};
        let cut = self.cut.as_ref().ok_or_else(|| TrainError::Data("no cut loaded".into()))?;
        let mut hasher = Sha256::new();
        hasher.update(self.bundle_sha256.as_bytes());
        hasher.update(if self.mixed_precision { b"fp16" } else { b"fp32" });
        let (lora, reft) = values.split_at((2 * self.manifest.lora.slots.len()).min(values.len()));
        let host = |t: &Tensor| -> Result<Vec<u8>, TrainError> {
            let values = Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1))?;
            Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        if let Some(spec) = &self.manifest.reft {
            let mut edits_below = false;
            for slot in (0..spec.slots.len()).filter(|i| !cut.reft_above.contains(i)) {
                let Some([r, w, b]) = reft.get(3 * slot..3 * slot + 3) else { return Err(TrainError::Data("LoReFT values come in R/W/b triples".into())) };
                hasher.update(b"reft");
                hasher.update((slot as u64).to_le_bytes());
                if r.abs().max().double_value(&[]) == 0.0 {
                    hasher.update(b"none");
                    continue;
                }
                edits_below = true;
                for t in [r, w, b] {
                    hasher.update(host(t)?);
                }
            }
            // Where an edit below the cut is picked by position, the positions shaped the prefix too.
            if let Some(positions) = reft.get(3 * spec.slots.len()).filter(|_| edits_below) {
                hasher.update(Vec::<i64>::try_from(positions.to_device(Device::Cpu))?.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
            }
        }
        for (slot, pair) in lora.chunks(2).enumerate() {
            let [a, b] = pair else { return Err(TrainError::Data("LoRA values come in A/B pairs".into())) };
            if cut.slots_above.contains(&slot) {
                continue;
            }
            hasher.update((slot as u64).to_le_bytes());
            if b.abs().max().double_value(&[]) == 0.0 {
                hasher.update(b"none");
                continue;
            }
            for t in [a, b] {
                hasher.update(host(t)?);
            }
        }
        Ok(hex::encode(&hasher.finalize()[..16]))
    }

    /// One row's activation shape for a batch `width` tokens wide (text) or fixed (images).
    fn activation_row_shape(&self, width: i64) -> Result<Vec<i64>, TrainError> {
        let cut = self.cut.as_ref().ok_or_else(|| TrainError::Data("no cut loaded".into()))?;
        cut.activation_shape
            .iter()
            .enumerate()
            .skip(1)
            .map(|(axis, &d)| match (axis, d) {
                (_, d) if d >= 0 => Ok(d),
                (1, _) if self.attention_mask.is_some() => Ok(width),
                _ => Err(TrainError::Data(format!("the cut's activation has a dynamic axis {axis} that is not the token axis"))),
            })
            .collect()
    }

    /// The slots a LoRA job trains: those above the cut once it is loaded, else all.
    pub fn trained_slots(&self) -> Vec<usize> {
        match &self.cut {
            Some(cut) => cut.slots_above.clone(),
            None => (0..self.manifest.lora.slots.len()).collect(),
        }
    }

    /// The LoReFT slots a LoReFT job trains: those whose edit is above the cut once it is loaded, else all.
    pub fn trained_reft_slots(&self) -> Vec<usize> {
        match (&self.cut, &self.manifest.reft) {
            (Some(cut), _) => cut.reft_above.clone(),
            (None, Some(spec)) => (0..spec.slots.len()).collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Whether LoRA jobs train above a cut (its graphs are loaded).
    pub fn trains_above_cut(&self) -> bool {
        self.cut.is_some()
    }

    /// The prefix's output for a batch (no gradients): what the suffix trains on.
    fn prefix(&self, inputs: &[Tensor], lora: &[Tensor]) -> Result<Tensor, TrainError> {
        let cut = self.cut.as_ref().ok_or_else(|| TrainError::Data("no cut loaded".into()))?;
        let _guard = tch::no_grad_guard();
        let args: Vec<IValue> = inputs.iter().chain(lora).map(|t| IValue::Tensor(t.shallow_clone())).collect();
        let mut out = self.outputs(cut.prefix.forward_is(&args))?;
        if out.len() != 1 {
            return Err(TrainError::Output(format!("the prefix graph returned {} tensors, expected 1", out.len())));
        }
        Ok(out.swap_remove(0))
    }

    /// The suffix from an activation, with LoRA dropout `p`; gradients flow into the LoRA tensors.
    fn forward_suffix(&self, inputs: &[Tensor], activation: &Tensor, lora: &[Tensor], p: f64) -> Result<Vec<Tensor>, TrainError> {
        let cut = self.cut.as_ref().ok_or_else(|| TrainError::Data("no cut loaded".into()))?;
        let mut args: Vec<IValue> = inputs.iter().chain([activation]).chain(lora).map(|t| IValue::Tensor(t.shallow_clone())).collect();
        args.push(IValue::Tensor(Tensor::from(1.0 - p as f32).to_device(self.device)));
        self.outputs(cut.suffix.forward_is(&args))
    }

    fn outputs(&self, out: Result<IValue, tch::TchError>) -> Result<Vec<Tensor>, TrainError> {
        match out.map_err(|source| TrainError::Forward { bundle: self.manifest.name.clone(), source })? {
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

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Cut the columns at the end of a text batch that are padding in every row. Texts are padded
    /// (on the right) to the longest of the whole training set; such columns are masked out of
    /// attention and pooling, so cutting them changes no output and a batch of short texts costs
    /// what short texts cost. Other bundles' batches pass unchanged.
    pub fn trim_padding(&self, batch: Vec<Tensor>) -> Vec<Tensor> {
        let Some(m) = self.attention_mask else { return batch };
        let Some(mask) = batch.get(m).filter(|t| t.dim() == 2) else { return batch };
        let width = mask.size()[1];
        let used = mask.ne(0).any_dim(0, false).nonzero();
        let keep = if used.size()[0] == 0 { 1 } else { used.max().int64_value(&[]) + 1 };
        if keep >= width {
            return batch;
        }
        // Token inputs [B, T] and, above a cut, activations [B, T, H].
        batch.into_iter().map(|t| if t.dim() >= 2 && t.size()[1] == width { t.narrow(1, 0, keep) } else { t }).collect()
    }

    /// Whether the graph takes a LoRA dropout input (bundles exported before it do not).
    pub fn has_lora_dropout(&self) -> bool {
        self.manifest.lora.dropout_input.is_some()
    }

    /// Run the graph on device tensors; gradients flow into whatever LoRA tensors require them.
    /// No LoRA dropout: evaluation, parity and inference.
    pub fn forward(&self, inputs: &[Tensor], lora: &[Tensor]) -> Result<Vec<Tensor>, TrainError> {
        self.forward_dropout(inputs, lora, 0.0)
    }

    /// `forward` with LoRA dropout `p` on every slot's input (PEFT's `lora_dropout`); the base
    /// path is never dropped. Needs a bundle whose training graph takes the dropout input.
    pub fn forward_dropout(&self, inputs: &[Tensor], lora: &[Tensor], p: f64) -> Result<Vec<Tensor>, TrainError> {
        let mut args: Vec<IValue> = inputs.iter().chain(lora).map(|t| IValue::Tensor(t.shallow_clone())).collect();
        match (&self.manifest.lora.dropout_input, p > 0.0) {
            (Some(_), _) => args.push(IValue::Tensor(Tensor::from(1.0 - p as f32).to_device(self.device))),
            (None, true) => {
                return Err(TrainError::Data(format!(
                    "bundle {} has no LoRA dropout input (exported before it); set lora_dropout to 0 or export the bundle again",
                    self.manifest.name
                )));
            }
            (None, false) => {}
        }
        self.outputs(self.module.forward_is(&args))
    }

    /// Inference on host tensors (no gradients), outputs in manifest order.
    pub fn forward_host(&self, inputs: &[HostTensor], lora: &[HostTensor]) -> Result<Vec<HostTensor>, TrainError> {
        self.check_inputs(inputs)?;
        let _guard = tch::no_grad_guard();
        let inputs: Vec<Tensor> = inputs.iter().map(|t| to_tensor(t, self.device)).collect();
        let lora: Vec<Tensor> = lora.iter().map(|t| to_tensor(t, self.device)).collect();
        self.forward(&inputs, &lora)?.iter().map(to_host).collect()
    }

    /// A SHA-256 of every base parameter's bytes, to prove later that training left them
    /// untouched. A digest rather than a copy: a copy of MiniLM's base would add 90 MB to the
    /// peak memory of every job.
    pub fn base_parameters(&self) -> Result<Vec<(String, [u8; 32])>, TrainError> {
        self.module.named_parameters()?.into_iter().map(|(n, t)| Ok((n, digest(&t)?))).collect()
    }

    /// True when every base parameter is bit-identical to `snapshot`.
    pub fn base_unchanged(&self, snapshot: &[(String, [u8; 32])]) -> Result<bool, TrainError> {
        let now = self.base_parameters()?;
        Ok(now == snapshot)
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

/// SHA-256 of a tensor's bytes in row-major order.
fn digest(t: &Tensor) -> Result<[u8; 32], TrainError> {
    use sha2::{Digest, Sha256};
    let host = t.to_device(Device::Cpu).contiguous();
    let bytes = host.numel() * host.kind().elt_size_in_bytes();
    let mut hasher = Sha256::new();
    if bytes > 0 {
        // SAFETY: `host` is a contiguous CPU tensor of `bytes` bytes that outlives the slice.
        let slice = unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, bytes) };
        hasher.update(slice);
    }
    Ok(hasher.finalize().into())
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

/// What to train: a head on cached embeddings, or LoRA (plus the head) through the bundle's graph.
pub enum FitTarget<'a> {
    /// `Examples::inputs` is one `[N, embedding_dim]` tensor of cached backbone embeddings.
    Head { device: Device },
    /// `Examples::inputs` are the bundle's model inputs. `start`: LoRA weights to continue from
    /// (what serves now), at a rank no higher than `rank`; slots it does not name start fresh.
    Lora { graph: &'a TrainingGraph, rank: usize, alpha: f32, start: Option<&'a LoraWeights> },
    /// LoReFT on the bundle's LoReFT slots (plus the head), editing `positions` of sequences;
    /// `layers` names the slots' modules to train (empty: all; above a cut, those above it).
    /// `start`: LoReFT weights to continue from, at a rank no higher than `rank`.
    Loreft { graph: &'a TrainingGraph, rank: usize, positions: Option<ReftPositions>, layers: &'a [String], start: Option<&'a ReftWeights> },
}

/// The prefix's activation for every row of `inputs`: the cached rows whose key is `key`, the
/// others computed (in batches of `batch`). Returns the activation tensor [N, ...] (f32) and, per
/// row, what was computed now (text rows cut to their tokens) for the cache.
fn cached_activations(
    graph: &TrainingGraph,
    inputs: &[Tensor],
    lora: &[Tensor],
    batch: usize,
    cached: &[Option<CachedActivation>],
    key: &str,
    keep: bool,
) -> Result<(Tensor, ComputedRows, usize), TrainError> {
    let rows = inputs.first().map_or(0, |t| t.size()[0]) as usize;
    let width = graph.attention_mask.and_then(|m| inputs.get(m)).map_or(0, |t| t.size()[1]);
    // Tokens per text row: up to its last unmasked position (texts are padded on the right).
    let tokens: Vec<i64> = match graph.attention_mask.and_then(|m| inputs.get(m)) {
        Some(mask) => {
            let positions = Tensor::arange(width, (Kind::Int64, mask.device())).unsqueeze(0) + 1;
            Vec::<i64>::try_from(mask.ne(0).to_kind(Kind::Int64).g_mul(&positions).amax(1, false).to_device(Device::Cpu))?
        }
        None => Vec::new(),
    };
    let row_shape = graph.activation_row_shape(width)?;
    let inner: i64 = row_shape.iter().skip(usize::from(!tokens.is_empty())).product();
    let row_len = |i: usize| (tokens.get(i).copied().unwrap_or(1).max(1) * inner) as usize;
    let hits: Vec<Option<&CachedActivation>> =
        (0..rows).map(|i| cached.get(i).and_then(Option::as_ref).filter(|c| c.key == key && c.data.len() == row_len(i))).collect();
    // The rows to compute, text rows by length: a batch of rows of one length carries no padding.
    let mut missing: Vec<i64> = (0..rows).filter(|&i| hits[i].is_none()).map(|i| i as i64).collect();
    if !tokens.is_empty() {
        missing.sort_by_key(|&i| tokens[i as usize]);
    }
    let mut full = Tensor::zeros([&[rows as i64][..], &row_shape].concat(), (Kind::Float, graph.device));
    let mut fresh: Vec<Option<Vec<f32>>> = vec![None; rows];
    if !missing.is_empty() {
        let idx = Tensor::from_slice(&missing).to_device(graph.device);
        let part: Vec<Tensor> = inputs.iter().map(|t| t.index_select(0, &idx)).collect();
        let computed = graph.autocast(|| activations(graph, &part, lora, batch))?.to_kind(Kind::Float);
        full = full.index_copy(0, &idx, &computed);
        let host = computed.to_device(Device::Cpu);
        for (j, &row) in missing.iter().enumerate().filter(|_| keep) {
            let row = row as usize;
            let mut values = host.get(j as i64);
            if !tokens.is_empty() {
                values = values.narrow(0, 0, tokens[row].max(1));
            }
            fresh[row] = Some(Vec::<f32>::try_from(values.contiguous().flatten(0, -1))?);
        }
    }
    Ok((fill_hits(full, &hits, &row_shape, &tokens)?, fresh, rows - missing.len()))
}

/// Copy the cached rows into their places in `full`.
fn fill_hits(full: Tensor, hits: &[Option<&CachedActivation>], row_shape: &[i64], tokens: &[i64]) -> Result<Tensor, TrainError> {
    for (i, hit) in hits.iter().enumerate() {
        let Some(hit) = hit else { continue };
        let mut shape = row_shape.to_vec();
        let mut target = full.get(i as i64);
        if let Some(&n) = tokens.get(i) {
            shape[0] = n.max(1);
            target = target.narrow(0, 0, shape[0]);
        }
        let values = Tensor::from_slice(&hit.data).view(shape.as_slice()).to_device(full.device());
        target.f_copy_(&values)?;
    }
    Ok(full)
}

/// Rows in the order to run them in batches: text rows by their token count (a batch of rows of
/// one length carries no padding), other rows as they are.
fn length_order(graph: &TrainingGraph, inputs: &[Tensor]) -> Result<Option<Tensor>, TrainError> {
    let Some(mask) = graph.attention_mask.and_then(|m| inputs.get(m)).filter(|t| t.dim() == 2) else { return Ok(None) };
    Ok(Some(mask.ne(0).sum_dim_intlist(1, false, Kind::Int64).argsort(0, false)))
}

/// The prefix's output for every row of `inputs`, computed in batches of `batch` rows (text
/// batches trimmed of all-padding columns, then padded back to the full width).
fn activations(graph: &TrainingGraph, inputs: &[Tensor], lora: &[Tensor], batch: usize) -> Result<Tensor, TrainError> {
    let rows = inputs.first().map_or(0, |t| t.size()[0]);
    let width = graph.attention_mask.and_then(|m| inputs.get(m)).map(|t| t.size()[1]);
    let mut parts = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = (rows - start).min(batch as i64);
        let part = graph.trim_padding(inputs.iter().map(|t| t.narrow(0, start, n)).collect());
        let mut activation = graph.prefix(&part, lora)?;
        if let Some(width) = width.filter(|&w| activation.dim() >= 2 && activation.size()[1] < w) {
            let mut pad = activation.size();
            pad[1] = width - pad[1];
            activation = Tensor::cat(&[activation.shallow_clone(), Tensor::zeros(&pad, (activation.kind(), activation.device()))], 1);
        }
        parts.push(activation);
        start += n;
    }
    Ok(Tensor::cat(&parts, 0))
}

/// Fine-tune `target` from `init_head` (a linear head whose rows are the classes) on `train`,
/// choosing the epoch by loss on `validation`. Cancellable between steps via `cancel`.
pub fn fit(
    target: FitTarget<'_>,
    train: &Examples,
    validation: &Examples,
    init_head: &Head,
    recipe: &Recipe,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FitReport, TrainError> {
    fit_cached(target, train, validation, init_head, recipe, &PrefixCache::default(), cancel, progress)
}

/// A LoRA job's adapter: the bundle's slots, the rank and alpha it trains at, what it continues.
struct LoraSetup<'a> {
    spec: LoraSpec,
    rank: usize,
    alpha: f32,
    start: Option<&'a LoraWeights>,
}

/// A LoReFT job's adapter: the bundle's LoReFT slots, the rank, the positions, what it continues.
struct ReftSetup<'a> {
    spec: ReftSpec,
    rank: usize,
    positions: Option<ReftPositions>,
    /// Per slot: whether the job may train it (the layers it was asked for).
    wanted: Vec<bool>,
    start: Option<&'a ReftWeights>,
}

/// What a job trains besides the head.
type Setups<'a> = (Option<LoraSetup<'a>>, Option<ReftSetup<'a>>);

/// The job's device, graph and adapter set-up, once its data and recipe are known to fit them.
fn checked_target<'a>(
    target: &FitTarget<'a>,
    train: &Examples,
    validation: &Examples,
    init_head: &Head,
    recipe: &Recipe,
) -> Result<(Device, Option<&'a TrainingGraph>, Setups<'a>), TrainError> {
    if init_head.layers.len() != 1 {
        return Err(TrainError::Data(format!("training starts from a linear head; this one has {} layers", init_head.layers.len())));
    }
    let classes = init_head.classes();
    train.check("training set", classes)?;
    validation.check("validation set", classes)?;
    if train.is_empty() {
        return Err(TrainError::Data("no training samples".into()));
    }
    if recipe.batch_size == 0 || recipe.max_epochs == 0 {
        return Err(TrainError::Data("batch_size and max_epochs must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&recipe.dropout) || !(0.0..1.0).contains(&recipe.lora_dropout) {
        return Err(TrainError::Data(format!("dropout ({}) and lora_dropout ({}) must be in [0, 1)", recipe.dropout, recipe.lora_dropout)));
    }
    match target {
        FitTarget::Head { device } => {
            if train.inputs.len() != 1 || train.inputs[0].shape.len() != 2 || train.inputs[0].shape[1] != init_head.input_dim() {
                return Err(TrainError::Data(format!("head training takes one [N, {}] embedding tensor", init_head.input_dim())));
            }
            Ok((*device, None, (None, None)))
        }
        FitTarget::Lora { graph, rank, alpha, start } => {
            graph.check_inputs(&train.inputs)?;
            if !validation.is_empty() {
                graph.check_inputs(&validation.inputs)?;
            }
            let spec = &graph.manifest().lora;
            if *rank == 0 || *rank > spec.rank_max {
                return Err(adaptd_adapters::lora::LoraError::Rank { rank: *rank, rank_max: spec.rank_max }.into());
            }
            if let Some(start) = start {
                start.validate(spec)?;
                if start.rank > *rank {
                    return Err(TrainError::Data(format!("cannot continue a rank-{} LoRA at rank {rank}", start.rank)));
                }
            }
            Ok((graph.device(), Some(*graph), (Some(LoraSetup { spec: spec.clone(), rank: *rank, alpha: *alpha, start: *start }), None)))
        }
        FitTarget::Loreft { graph, rank, positions, layers, start } => {
            graph.check_inputs(&train.inputs)?;
            if !validation.is_empty() {
                graph.check_inputs(&validation.inputs)?;
            }
            let spec = graph.manifest().reft.as_ref().ok_or(adaptd_adapters::reft::ReftError::NoSlots).map_err(adaptd_adapters::slots::SlotError::from)?;
            if *rank == 0 || *rank > spec.rank_max {
                return Err(adaptd_adapters::slots::SlotError::from(adaptd_adapters::reft::ReftError::Rank { rank: *rank, rank_max: spec.rank_max }).into());
            }
            if positions.is_some() != spec.positions_input.is_some() {
                return Err(TrainError::Data(format!(
                    "bundle {}: LoReFT positions {} for a bundle that {} sequences",
                    graph.manifest().name,
                    if positions.is_some() { "given" } else { "missing" },
                    if spec.positions_input.is_some() { "edits" } else { "edits no" }
                )));
            }
            if let Some(start) = start {
                start.validate(spec).map_err(adaptd_adapters::slots::SlotError::from)?;
                if start.rank > *rank || start.positions != *positions {
                    return Err(TrainError::Data(format!(
                        "cannot continue a rank-{} LoReFT at {:?} as rank {rank} at {positions:?}",
                        start.rank, start.positions
                    )));
                }
            }
            if let Some(unknown) = layers.iter().find(|l| !spec.slots.iter().any(|s| &&s.module == l)) {
                let known: Vec<&str> = spec.slots.iter().map(|s| s.module.as_str()).collect();
                return Err(TrainError::Data(format!("LoReFT layer {unknown:?} is not a LoReFT slot of bundle {} (slots: {known:?})", graph.manifest().name)));
            }
            let wanted = spec.slots.iter().map(|s| layers.is_empty() || layers.contains(&s.module)).collect();
            Ok((graph.device(), Some(*graph), (None, Some(ReftSetup { spec: spec.clone(), rank: *rank, positions: *positions, wanted, start: *start }))))
        }
    }
}

/// The LoRA tensors a job trains, one (A, B) pair per slot at the job's rank: A drawn as PEFT
/// draws it and B zero, or, continuing, the serving LoRA's values in the first rows and columns.
fn init_lora(group: &nn::Path, setup: &LoraSetup<'_>, rng: &mut SeededRng, device: Device) -> Vec<(Tensor, Tensor)> {
    let LoraSetup { spec, rank, alpha, start } = setup;
    let mut lora_vars = Vec::with_capacity(spec.slots.len());
    for (i, slot) in spec.slots.iter().enumerate() {
        let (a_shape, b_shape) = slot_shapes(slot, *rank);
        let fan_in: usize = a_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt(); // kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
        let mut a_init: Vec<f32> = (0..a_shape.iter().product::<usize>()).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
        let mut b_init = vec![0.0f32; b_shape.iter().product()];
        // Continuing: the first rows of A and columns of B hold the serving LoRA's update
        // (rescaled to this job's alpha/rank), so training starts from exactly what serves;
        // the rows past its rank start as fresh capacity (B zero there, A random).
        if let Some((s, m)) = start.and_then(|s| s.modules.iter().find(|m| m.module == slot.module).map(|m| (s, m))) {
            let (a0, b0) = (m.a.as_f32().unwrap_or(&[]), m.b.as_f32().unwrap_or(&[]));
            a_init[..a0.len()].copy_from_slice(a0);
            let rescale = s.scale() / (*alpha / *rank as f32);
            for row in 0..b_shape[0] {
                for k in 0..s.rank {
                    b_init[row * rank + k] = b0[row * s.rank + k] * rescale;
                }
            }
        }
        let a = group.var_copy(&format!("lora_a_{i}"), &to_tensor(&HostTensor { shape: a_shape, data: HostData::F32(a_init) }, device));
        let b = group.var_copy(&format!("lora_b_{i}"), &to_tensor(&HostTensor { shape: b_shape, data: HostData::F32(b_init) }, device));
        lora_vars.push((a, b));
    }
    lora_vars
}

/// The LoRA values as the graph takes them: every slot padded to the bundle's `rank_max` (zero
/// rows of A, zero columns of B) with B scaled by alpha / rank.
fn graph_lora(setup: &LoraSetup<'_>, lora_vars: &[(Tensor, Tensor)], device: Device) -> Vec<Tensor> {
    let LoraSetup { spec, rank, alpha, .. } = setup;
    let scale = *alpha as f64 / *rank as f64;
    spec.slots
        .iter()
        .zip(lora_vars)
        .flat_map(|(slot, (a, b))| {
            let mut a_pad = slot.a_shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
            a_pad[0] = (spec.rank_max - rank) as i64;
            let mut b_pad = slot.b_shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
            b_pad[1] = (spec.rank_max - rank) as i64;
            let a_full = Tensor::cat(&[a.shallow_clone(), Tensor::zeros(&a_pad, (Kind::Float, device))], 0);
            let b_full = Tensor::cat(&[b * scale, Tensor::zeros(&b_pad, (Kind::Float, device))], 1);
            [a_full, b_full]
        })
        .collect()
}

/// The LoReFT tensors a job trains, per slot `(P, D, b)`: R = orth(P)ᵀ ([`rotation`]) and W = R + D,
/// so the edit `Rᵀ((W − R) h + b) = Rᵀ(D h + b)` starts at exactly nothing (D = 0, b = 0) and
/// weight decay pulls it back toward nothing, as LoRA's B = 0 start does; P starts as random
/// orthonormal columns, or, continuing, the serving LoReFT's R (its W and b in D and b) with
/// fresh directions in the rows past its rank.
fn init_reft(group: &nn::Path, setup: &ReftSetup<'_>, rng: &mut SeededRng, device: Device) -> Vec<[Tensor; 3]> {
    let ReftSetup { spec, rank, start, .. } = setup;
    let mut vars = Vec::with_capacity(spec.slots.len());
    for (i, slot) in spec.slots.iter().enumerate() {
        let d = slot.dim;
        let fresh = adaptd_adapters::reft::orthonormal_rows(*rank, d, rng);
        let mut rotate = fresh.as_f32().unwrap_or(&[]).to_vec();
        let mut delta = vec![0.0f32; rank * d];
        let mut bias = vec![0.0f32; *rank];
        if let Some(m) = start.and_then(|s| s.modules.iter().find(|m| m.module == slot.module)) {
            let (r0, w0, b0) = (m.rotate.as_f32().unwrap_or(&[]), m.weight.as_f32().unwrap_or(&[]), m.bias.as_f32().unwrap_or(&[]));
            let n = r0.len().min(rotate.len());
            rotate[..n].copy_from_slice(&r0[..n]);
            for (k, (w, r)) in w0.iter().zip(r0).enumerate().take(delta.len()) {
                delta[k] = w - r;
            }
            bias[..b0.len().min(*rank)].copy_from_slice(&b0[..b0.len().min(*rank)]);
        }
        // P is [d, r]: R's rows as columns (QR orthonormalises columns).
        let p = to_tensor(&HostTensor { shape: vec![*rank, d], data: HostData::F32(rotate) }, device).tr().contiguous();
        let p = group.var_copy(&format!("reft_p_{i}"), &p);
        let delta = group.var_copy(&format!("reft_d_{i}"), &to_tensor(&HostTensor { shape: vec![*rank, d], data: HostData::F32(delta) }, device));
        let bias = group.var_copy(&format!("reft_b_{i}"), &to_tensor(&HostTensor { shape: vec![*rank], data: HostData::F32(bias) }, device));
        vars.push([p, delta, bias]);
    }
    vars
}

/// R with orthonormal rows from the unconstrained P `[d, r]`: the Q of P's reduced QR, its
/// columns' signs fixed by R's diagonal so that the map is smooth (and the identity on P that
/// already has orthonormal columns), transposed. One `d × r` QR per slot and step: O(d r²),
/// with r ≤ 16 negligible beside the model's own products. Chosen over a retraction after
/// each step (which would leave AdamW's moments describing an R that no longer exists) and
/// over Householder products (r sequential reflections of d-vectors, for the same result).
fn rotation(p: &Tensor) -> Tensor {
    let (q, r) = Tensor::linalg_qr(p, "reduced");
    let diagonal = r.diagonal(0, -2, -1);
    let signs = diagonal.sign() + diagonal.eq(0.0).to_kind(Kind::Float);
    (q * signs.unsqueeze(0)).tr()
}

/// The LoReFT values as the graph takes them: R, W = R + D, b per slot, padded to `rank_max`
/// rows with zeros, then the positions. A slot the job leaves alone (`kept` false) and did not
/// start with edits nothing: zeros.
fn graph_reft(setup: &ReftSetup<'_>, vars: &[[Tensor; 3]], kept: &[bool], device: Device) -> Vec<Tensor> {
    let ReftSetup { spec, rank, positions, .. } = setup;
    let pad = (spec.rank_max - rank) as i64;
    let mut out: Vec<Tensor> = spec
        .slots
        .iter()
        .zip(vars)
        .zip(kept)
        .flat_map(|((slot, [p, delta, bias]), &kept)| {
            if !kept {
                let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, device));
                let (rows, dim) = (spec.rank_max as i64, slot.dim as i64);
                return [zeros(&[rows, dim]), zeros(&[rows, dim]), zeros(&[rows])];
            }
            let r = rotation(p);
            let w = &r + delta;
            let rows = |t: Tensor| Tensor::cat(&[t, Tensor::zeros([pad, slot.dim as i64], (Kind::Float, device))], 0);
            [rows(r), rows(w), Tensor::cat(&[bias.shallow_clone(), Tensor::zeros([pad], (Kind::Float, device))], 0)]
        })
        .collect();
    if spec.positions_input.is_some() {
        let p = positions.unwrap_or(ReftPositions { first: 0, last: 0 });
        out.push(Tensor::from_slice(&[p.first as i64, p.last as i64]).to_device(device));
    }
    out
}

/// Append the prefix's activation to the training and the validation inputs (rows `cache`
/// holds under the job's key reused, the rest computed), and say what was done.
fn prefix_for_job(
    graph: &TrainingGraph,
    inputs: [&mut Vec<Tensor>; 2],
    start: &[Tensor],
    batch: usize,
    cache: &PrefixCache,
) -> Result<PrefixComputed, TrainError> {
    let mut done = PrefixComputed { key: graph.prefix_key(start)?, ..PrefixComputed::default() };
    let [train, validation] = inputs;
    for (inputs, cached, fresh) in [(train, &cache.train, &mut done.train), (validation, &cache.validation, &mut done.validation)] {
        let rows = inputs.first().map_or(0, |t| t.size()[0]) as usize;
        if rows > 0 {
            let (activation, computed, reused) = cached_activations(graph, inputs, start, batch, cached, &done.key, cache.keep)?;
            inputs.push(activation);
            done.reused += reused;
            done.computed += rows - reused;
            *fresh = computed;
        }
    }
    Ok(done)
}

/// What a job trains and how a batch runs through it: the head and the LoRA (as variables of one
/// optimizer, a learning rate per group), over the training graph (LoRA) or the cached
/// embeddings themselves (a head).
struct Model<'g> {
    device: Device,
    graph: Option<&'g TrainingGraph>,
    lora: Option<LoraSetup<'g>>,
    reft: Option<ReftSetup<'g>>,
    vs: nn::VarStore,
    opt: nn::Optimizer,
    head_w: Tensor,
    head_b: Tensor,
    lora_vars: Vec<(Tensor, Tensor)>,
    /// Per LoReFT slot `(P, D, b)` (see [`init_reft`]).
    reft_vars: Vec<[Tensor; 3]>,
    /// The slot values of the kind a job does not train: zeros (no LoRA, no LoReFT edit).
    fixed_lora: Vec<Tensor>,
    fixed_reft: Vec<Tensor>,
    /// Per LoRA slot: whether it trains. Above a cut only the slots there do; the rest keep
    /// their start (they shaped the cached activations) and, without gradients, are left alone
    /// by the optimizer.
    trained: Vec<bool>,
    /// The same per LoReFT slot; and whether a LoReFT slot is in the adapter at all (trained,
    /// or continued from the start).
    reft_trained: Vec<bool>,
    reft_kept: Vec<bool>,
    above_cut: bool,
    embedding_index: Option<usize>,
    /// The LoRA dropout applied while training, and the head's input dropout.
    lora_dropout: f64,
    dropout: f64,
}

impl<'g> Model<'g> {
    fn new(
        device: Device,
        graph: Option<&'g TrainingGraph>,
        (lora, reft): Setups<'g>,
        init_head: &Head,
        recipe: &Recipe,
        rng: &mut SeededRng,
    ) -> Result<Self, TrainError> {
        // Group 0: the head; group 1: LoRA or LoReFT.
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let head_w = root.set_group(0).var_copy("head_weight", &to_tensor(&init_head.layers[0].weight, device));
        let head_b = root.set_group(0).var_copy("head_bias", &to_tensor(&init_head.layers[0].bias, device));
        let lora_vars = match &lora {
            Some(setup) => init_lora(&root.set_group(1), setup, rng, device),
            None => Vec::new(),
        };
        let reft_vars = match &reft {
            Some(setup) => init_reft(&root.set_group(1), setup, rng, device),
            None => Vec::new(),
        };
        let zeros = |t: &HostTensor| to_tensor(t, device);
        let fixed_lora = match (graph, &lora) {
            (Some(g), None) => adaptd_adapters::lora::no_lora_inputs(&g.manifest().lora).iter().map(zeros).collect(),
            _ => Vec::new(),
        };
        let fixed_reft = match (graph.and_then(|g| g.manifest().reft.as_ref()), &reft) {
            (Some(spec), None) => adaptd_adapters::reft::no_edit_inputs(spec).iter().map(zeros).collect(),
            _ => Vec::new(),
        };
        let opt = nn::AdamW { wd: recipe.weight_decay, ..Default::default() }.build(&vs, recipe.head_learning_rate)?;
        let trained = match graph {
            Some(g) => {
                let slots = g.trained_slots();
                (0..lora_vars.len()).map(|i| slots.contains(&i)).collect()
            }
            None => Vec::new(),
        };
        let reft_trained: Vec<bool> = match (graph, &reft) {
            (Some(g), Some(setup)) => {
                let slots = g.trained_reft_slots();
                (0..reft_vars.len()).map(|i| slots.contains(&i) && setup.wanted.get(i).copied().unwrap_or(false)).collect()
            }
            _ => Vec::new(),
        };
        let reft_kept = match &reft {
            Some(setup) => setup
                .spec
                .slots
                .iter()
                .zip(&reft_trained)
                .map(|(slot, &trained)| trained || setup.start.is_some_and(|s| s.modules.iter().any(|m| m.module == slot.module)))
                .collect(),
            None => Vec::new(),
        };
        let embedding_index = match graph {
            Some(g) => Some(g.manifest().output_index(&g.manifest().embedding_output).ok_or_else(|| TrainError::Output("no embedding output".into()))?),
            None => None,
        };
        // LoRA dropout needs the graph's dropout input; a bundle exported before it trains without.
        let lora_dropout = match graph {
            Some(g) if recipe.lora_dropout > 0.0 && !g.has_lora_dropout() => {
                tracing::warn!(bundle = %g.manifest().name, lora_dropout = recipe.lora_dropout, "the bundle's training graph has no LoRA dropout input (exported before it): training without LoRA dropout");
                0.0
            }
            Some(_) => recipe.lora_dropout,
            None => 0.0,
        };
        Ok(Model {
            device,
            graph,
            lora,
            reft,
            vs,
            opt,
            head_w,
            head_b,
            lora_vars,
            reft_vars,
            fixed_lora,
            fixed_reft,
            trained,
            reft_trained,
            reft_kept,
            above_cut: graph.is_some_and(TrainingGraph::trains_above_cut),
            embedding_index,
            lora_dropout,
            dropout: recipe.dropout,
        })
    }

    /// The slot values as the graph takes them: the LoRA (padded to the bundle's rank, B
    /// scaled) or zeros, then the LoReFT edits (R from P, padded) or zeros.
    fn graph_lora(&self) -> Vec<Tensor> {
        let lora = match &self.lora {
            Some(setup) => graph_lora(setup, &self.lora_vars, self.device),
            None => self.fixed_lora.iter().map(Tensor::shallow_clone).collect(),
        };
        let reft = match &self.reft {
            Some(setup) => graph_reft(setup, &self.reft_vars, &self.reft_kept, self.device),
            None => self.fixed_reft.iter().map(Tensor::shallow_clone).collect(),
        };
        lora.into_iter().chain(reft).collect()
    }

    /// Whether the job trains more than the head.
    fn trains_slots(&self) -> bool {
        !self.lora_vars.is_empty() || !self.reft_vars.is_empty()
    }

    /// Text batches lose their all-padding columns; the memory probe keeps the full width.
    fn trim(&self, batch: Vec<Tensor>) -> Vec<Tensor> {
        match self.graph {
            Some(g) => g.trim_padding(batch),
            None => batch,
        }
    }

    /// Embeddings for a batch: the cached input itself, or the graph run with the current LoRA
    /// (with LoRA dropout `p` while training).
    fn embed(&self, batch: &[Tensor], p: f64) -> Result<Tensor, TrainError> {
        let Some(g) = self.graph else { return Ok(batch[0].shallow_clone()) };
        // Above a cut the batch carries the cached activation after the model inputs.
        let mut outputs = g.autocast(|| match batch.split_last() {
            Some((activation, inputs)) if self.above_cut => g.forward_suffix(inputs, activation, &self.graph_lora(), p),
            _ => g.forward_dropout(batch, &self.graph_lora(), p),
        })?;
        let index = self.embedding_index.filter(|&i| i < outputs.len()).ok_or_else(|| TrainError::Output("no embedding output".into()))?;
        // The head and the loss run in fp32 whatever precision the graph ran in.
        Ok(outputs.swap_remove(index).to_kind(Kind::Float))
    }

    /// The head's logits for a batch: with dropout on the embedding and LoRA dropout while training.
    fn logits(&self, batch: &[Tensor], train: bool) -> Result<Tensor, TrainError> {
        let embedding = self.embed(batch, if train { self.lora_dropout } else { 0.0 })?;
        Ok(embedding.dropout(if train { self.dropout } else { 0.0 }, train).linear(&self.head_w, Some(&self.head_b)))
    }

    /// Whether the LoRA slots that train at all train this epoch (not in head-only epochs).
    fn train_lora(&self, this_epoch: bool) {
        for (i, (a, b)) in self.lora_vars.iter().enumerate() {
            let trains = this_epoch && self.trained.get(i).copied().unwrap_or(true);
            let _ = a.set_requires_grad(trains);
            let _ = b.set_requires_grad(trains);
        }
        for (i, vars) in self.reft_vars.iter().enumerate() {
            let trains = this_epoch && self.reft_trained.get(i).copied().unwrap_or(true);
            for v in vars {
                let _ = v.set_requires_grad(trains);
            }
        }
    }

    /// Copies of everything trained, in the order [head weight, head bias, A_0, B_0, A_1, ...],
    /// then per LoReFT slot R, W, b (as served: R from P, W = R + D).
    fn snapshot(&self) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        let reft = self.reft_vars.iter().flat_map(|[p, delta, bias]| {
            let r = rotation(p);
            let w = &r + delta;
            [r, w, bias.shallow_clone()]
        });
        [&self.head_w, &self.head_b]
            .into_iter()
            .chain(self.lora_vars.iter().flat_map(|(a, b)| [a, b]))
            .map(Tensor::shallow_clone)
            .chain(reft)
            .map(|t| t.detach().copy())
            .collect()
    }

    /// Loss and accuracy on the validation set, without gradients.
    fn validate(&self, data: &DeviceData<'_>) -> Result<(f32, f32), TrainError> {
        let _guard = tch::no_grad_guard();
        evaluate(&data.val_inputs, &data.val_labels, data.val_rows, |batch| self.logits(&self.trim(batch.iter().map(Tensor::shallow_clone).collect()), false))
    }
}

/// A tensor over `t`'s own memory, without a copy: a job's examples are the largest thing a job
/// holds (500 camera frames are 300 MB), and a copy beside the caller's would double them.
///
/// # Safety
/// The tensor and every view of it must be dropped before `t` is, and nothing may write
/// through them. [`DeviceData`] holds them for one `fit` call that borrows the examples, and
/// its tensors are only read (batches and reorders are `index_select`, which copies).
unsafe fn borrowed_tensor(t: &HostTensor) -> Result<Tensor, TrainError> {
    if adaptd_adapters::tensor::element_count(&t.shape) != Some(t.len()) {
        return Err(TrainError::Data(format!("a tensor of shape {:?} holds {} values", t.shape, t.len())));
    }
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let (ptr, kind) = match &t.data {
        HostData::F32(v) => (v.as_ptr().cast::<u8>(), Kind::Float),
        HostData::I64(v) => (v.as_ptr().cast::<u8>(), Kind::Int64),
    };
    if t.is_empty() {
        return Ok(Tensor::zeros(shape.as_slice(), (kind, Device::Cpu)));
    }
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `ptr` points at `t.len()` contiguous values of `kind`, as many as `shape` holds,
    // in the row-major order `strides` describes; the caller keeps `t` alive and unchanged.
    Ok(unsafe { Tensor::f_from_blob(ptr, &shape, &strides, kind, Device::Cpu)? })
}

/// The examples on `device`: their own memory on the CPU (see [`borrowed_tensor`]), a copy on
/// an accelerator.
fn device_tensor(t: &HostTensor, device: Device) -> Result<Tensor, TrainError> {
    // SAFETY: only `DeviceData::new` calls this, and `DeviceData` borrows the examples for as
    // long as it holds the tensors; they are only read.
    let host = unsafe { borrowed_tensor(t)? };
    Ok(if device == Device::Cpu { host } else { host.to_device(device) })
}

/// A job's examples on the training device. On the CPU its inputs are the examples' own memory
/// (see [`borrowed_tensor`]), so it borrows them: it cannot outlive what it reads.
struct DeviceData<'a> {
    train_inputs: Vec<Tensor>,
    train_labels: Tensor,
    train_weights: Tensor,
    train_rows: usize,
    val_inputs: Vec<Tensor>,
    val_labels: Tensor,
    val_rows: usize,
    examples: std::marker::PhantomData<&'a Examples>,
}

impl<'a> DeviceData<'a> {
    fn new(train: &'a Examples, validation: &'a Examples, device: Device) -> Result<Self, TrainError> {
        Ok(DeviceData {
            train_inputs: train.inputs.iter().map(|t| device_tensor(t, device)).collect::<Result<_, _>>()?,
            train_labels: Tensor::from_slice(&train.labels).to_device(device),
            train_weights: Tensor::from_slice(&train.weights).to_device(device),
            train_rows: train.len(),
            val_inputs: validation.inputs.iter().map(|t| device_tensor(t, device)).collect::<Result<_, _>>()?,
            val_labels: Tensor::from_slice(&validation.labels).to_device(device),
            val_rows: validation.len(),
            examples: std::marker::PhantomData,
        })
    }

    /// Validation runs every epoch in batches: text rows sorted by length carry less padding,
    /// and the loss and accuracy over all rows do not depend on their order.
    fn order_validation_by_length(&mut self, graph: Option<&TrainingGraph>) -> Result<(), TrainError> {
        if let Some(order) = graph.map(|g| length_order(g, &self.val_inputs)).transpose()?.flatten() {
            self.val_inputs = self.val_inputs.iter().map(|t| t.index_select(0, &order)).collect();
            self.val_labels = self.val_labels.index_select(0, &order);
        }
        Ok(())
    }

    /// The training rows `idx` of every input.
    fn train_batch(&self, idx: &Tensor) -> Vec<Tensor> {
        self.train_inputs.iter().map(|t| t.index_select(0, idx)).collect()
    }

    /// The sample-weighted cross-entropy of `logits` for the training rows `idx`.
    fn weighted_loss(&self, logits: &Tensor, idx: &Tensor) -> Tensor {
        let per_sample = logits.log_softmax(-1, Kind::Float).nll_loss_nd::<Tensor>(&self.train_labels.index_select(0, idx), None, tch::Reduction::None, -100);
        let w = self.train_weights.index_select(0, idx);
        (per_sample * &w).sum(Kind::Float) / w.sum(Kind::Float).clamp_min(1e-12)
    }
}

/// The recipe's batch size, shrunk to what the memory budget holds (measured by a probe step),
/// with the probe's bytes per sample; a budget too small for one sample refuses the job.
fn batch_size_within_budget(model: &mut Model<'_>, data: &DeviceData<'_>, recipe: &Recipe) -> Result<(usize, Option<u64>), TrainError> {
    let n = data.train_rows;
    let batch_size = recipe.batch_size.min(n);
    let Some(budget) = recipe.memory_budget_bytes else { return Ok((batch_size, None)) };
    let (per_sample, fixed) = probe_memory(|b| {
        let idx = Tensor::from_slice(&(0..b as i64).map(|i| i % n as i64).collect::<Vec<_>>()).to_device(model.device);
        let loss = data.weighted_loss(&model.logits(&data.train_batch(&idx), true)?, &idx);
        model.opt.zero_grad();
        loss.backward();
        model.opt.zero_grad();
        Ok(())
    })?;
    let fits = (budget.saturating_sub(fixed) / per_sample.max(1)) as usize;
    if fits == 0 {
        return Err(TrainError::MemoryBudget { budget, needed: fixed + per_sample });
    }
    Ok((batch_size.min(fits), Some(per_sample)))
}

/// A job's optimizer steps: the schedule they follow and what they reported so far.
struct Steps<'a> {
    recipe: &'a Recipe,
    batch_size: usize,
    total_steps: usize,
    warmup_steps: usize,
    /// fp16 activations' gradients underflow unless the loss is scaled up first.
    loss_scale: Option<LossScale>,
    done: usize,
    seen: usize,
    losses: Vec<f32>,
    cancel: &'a AtomicBool,
    progress: &'a mut dyn FnMut(&Progress),
}

impl Steps<'_> {
    /// One epoch over the training rows in `order`; returns the sum of its step losses.
    fn epoch(&mut self, model: &mut Model<'_>, data: &DeviceData<'_>, order: &[usize], epoch: usize) -> Result<f64, TrainError> {
        let recipe = self.recipe;
        let mut epoch_loss = 0.0f64;
        for chunk in order.chunks(self.batch_size) {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled { step: self.done });
            }
            let factor = lr_factor(recipe.schedule, self.warmup_steps, self.done, self.total_steps);
            model.opt.set_lr_group(0, recipe.head_learning_rate * factor);
            if model.trains_slots() {
                model.opt.set_lr_group(1, recipe.learning_rate * factor);
            }
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(model.device);
            let loss = data.weighted_loss(&model.logits(&model.trim(data.train_batch(&idx)), true)?, &idx);
            let value = loss.double_value(&[]) as f32;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss { step: self.done, loss: value });
            }
            apply_step(&mut model.opt, &model.vs, &loss, self.loss_scale.as_mut(), recipe.grad_clip);
            self.losses.push(value);
            epoch_loss += value as f64;
            self.done += 1;
            self.seen += chunk.len();
            let at = Progress {
                epoch,
                max_epochs: recipe.max_epochs,
                step: self.done,
                total_steps: self.total_steps,
                loss: value,
                learning_rate: recipe.learning_rate * factor,
            };
            (self.progress)(&at);
        }
        Ok(epoch_loss)
    }
}

/// [`fit`], reusing the prefix activations `cache` holds where a job trains above a cut; the
/// report's `prefix` says which rows it computed, for the cache.
#[allow(clippy::too_many_arguments)] // fit's arguments and the cache: one call site each
pub fn fit_cached(
    target: FitTarget<'_>,
    train: &Examples,
    validation: &Examples,
    init_head: &Head,
    recipe: &Recipe,
    cache: &PrefixCache,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FitReport, TrainError> {
    let (device, graph, setups) = checked_target(&target, train, validation, init_head, recipe)?;
    tch::manual_seed(recipe.seed as i64);
    let mut rng = SeededRng::new(recipe.seed);
    let mut model = Model::new(device, graph, setups, init_head, recipe, &mut rng)?;
    let mut data = DeviceData::new(train, validation, device)?;
    // The frozen prefix, once per sample for the whole job (or kept from an earlier job that ran
    // the same prefix): the cost training above the cut pays up front, in the job's time.
    let prefix = match graph.filter(|g| g.trains_above_cut()) {
        Some(g) => Some(prefix_for_job(g, [&mut data.train_inputs, &mut data.val_inputs], &model.graph_lora(), recipe.batch_size.max(1), cache)?),
        None => None,
    };
    data.order_validation_by_length(graph)?;
    let base = graph.map(TrainingGraph::base_parameters).transpose()?;
    let (batch_size, probe_bytes_per_sample) = batch_size_within_budget(&mut model, &data, recipe)?;

    let steps_per_epoch = train.len().div_ceil(batch_size);
    let total_steps = steps_per_epoch * recipe.max_epochs;
    let mut steps = Steps {
        recipe,
        batch_size,
        total_steps,
        warmup_steps: (recipe.warmup_fraction * total_steps as f64).round() as usize,
        loss_scale: graph.filter(|g| g.mixed_precision()).map(|_| LossScale::new()),
        done: 0,
        seen: 0,
        losses: Vec::new(),
        cancel,
        progress,
    };
    let class_counts = class_counts(&train.labels, init_head.classes());
    let started = std::time::Instant::now();
    let mut epochs = Vec::new();
    let mut best: Option<(f32, usize, Vec<Tensor>)> = None;
    let mut stopped_early = false;
    for epoch in 0..recipe.max_epochs {
        let epoch_start = std::time::Instant::now();
        model.train_lora(epoch >= recipe.head_only_epochs);
        let order = epoch_order(&train.labels, &class_counts, recipe.class_balanced, &mut rng);
        let epoch_loss = steps.epoch(&mut model, &data, &order, epoch)?;
        let (val_loss, val_accuracy) = model.validate(&data)?;
        epochs.push(EpochRecord {
            epoch,
            train_loss: (epoch_loss / steps_per_epoch as f64) as f32,
            val_loss,
            val_accuracy,
            seconds: epoch_start.elapsed().as_secs_f64(),
        });
        if val_loss.is_nan() {
            continue; // no validation samples: train every epoch, keep the last
        }
        if best.as_ref().is_none_or(|(b, _, _)| val_loss < *b) {
            best = Some((val_loss, epoch, model.snapshot()));
        } else if recipe.patience > 0 && best.as_ref().is_some_and(|(_, e, _)| epoch - e >= recipe.patience) {
            stopped_early = true;
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (best_epoch, params) = match best {
        Some((_, e, p)) => (e, p),
        None => (epochs.len() - 1, model.snapshot()),
    };
    let (head, lora, reft) = trained_weights(&params, model.lora.as_ref(), model.reft.as_ref(), &model.reft_kept)?;
    let base_unchanged = match (graph, &base) {
        (Some(g), Some(s)) => Some(g.base_unchanged(s)?),
        _ => None,
    };
    Ok(FitReport {
        head,
        lora,
        reft,
        epochs,
        best_epoch,
        stopped_early,
        steps: steps.done,
        batch_size,
        samples_per_second: steps.seen as f64 / elapsed.max(1e-9),
        probe_bytes_per_sample,
        lora_dropout: model.lora_dropout,
        base_unchanged,
        losses: steps.losses,
        mixed_precision: steps.loss_scale.is_some(),
        skipped_steps: steps.loss_scale.map_or(0, |s| s.skipped),
        prefix,
    })
}

/// The head, LoRA and LoReFT a job returns, from its parameters as [`Model::snapshot`] orders
/// them (head weight, head bias, then A and B of each LoRA slot, then R, W, b of each LoReFT slot).
fn trained_weights(
    params: &[Tensor],
    lora: Option<&LoraSetup<'_>>,
    reft: Option<&ReftSetup<'_>>,
    reft_kept: &[bool],
) -> Result<(Head, Option<LoraWeights>, Option<ReftWeights>), TrainError> {
    let first_reft = 2 + 2 * lora.map_or(0, |l| l.spec.slots.len());
    let head = Head { layers: vec![Dense { weight: to_host(&params[0])?, bias: to_host(&params[1])? }] };
    let lora = match lora {
        Some(LoraSetup { spec, rank, alpha, .. }) => Some(LoraWeights {
            rank: *rank,
            alpha: *alpha,
            modules: spec
                .slots
                .iter()
                .enumerate()
                .map(|(i, slot)| Ok(LoraModule { module: slot.module.clone(), a: to_host(&params[2 + 2 * i])?, b: to_host(&params[3 + 2 * i])? }))
                .collect::<Result<Vec<_>, TrainError>>()?,
        }),
        None => None,
    };
    let reft = match reft {
        Some(ReftSetup { spec, rank, positions, .. }) => Some(ReftWeights {
            rank: *rank,
            positions: *positions,
            modules: spec
                .slots
                .iter()
                .enumerate()
                .filter(|(i, _)| reft_kept.get(*i).copied().unwrap_or(false))
                .map(|(i, slot)| {
                    let at = first_reft + 3 * i;
                    Ok(ReftModule {
                        module: slot.module.clone(),
                        rotate: to_host(&params[at])?,
                        weight: to_host(&params[at + 1])?,
                        bias: to_host(&params[at + 2])?,
                    })
                })
                .collect::<Result<Vec<_>, TrainError>>()?,
        }),
        None => None,
    };
    Ok((head, lora, reft))
}

/// One optimizer step from `loss`: backward (scaled when `loss_scale` is given, the gradients
/// unscaled and checked for overflow after), gradient clipping, the update. Returns whether the
/// step was applied (a scaled step with overflowing gradients is skipped).
pub fn apply_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, loss: &Tensor, loss_scale: Option<&mut LossScale>, grad_clip: f64) -> bool {
    opt.zero_grad();
    let applied = match loss_scale {
        None => {
            loss.backward();
            true
        }
        Some(scaler) => {
            (loss * scaler.scale()).backward();
            let grads: Vec<Tensor> = vs.trainable_variables().iter().map(Tensor::grad).filter(Tensor::defined).collect();
            let inverse = 1.0 / scaler.scale();
            let mut finite = true;
            for mut g in grads {
                let _ = g.f_mul_scalar_(inverse);
                finite &= g.isfinite().all().int64_value(&[]) != 0;
            }
            scaler.update(finite)
        }
    };
    if applied {
        if grad_clip > 0.0 {
            opt.clip_grad_norm(grad_clip);
        }
        opt.step();
    }
    applied
}

/// Mean cross-entropy and accuracy over a labelled set, in chunks.
fn evaluate(inputs: &[Tensor], labels: &Tensor, n: usize, logits_of: impl Fn(&[Tensor]) -> Result<Tensor, TrainError>) -> Result<(f32, f32), TrainError> {
    if n == 0 {
        return Ok((f32::NAN, f32::NAN));
    }
    let (mut loss, mut correct) = (0.0f64, 0i64);
    for start in (0..n).step_by(64) {
        let len = 64.min(n - start) as i64;
        let batch: Vec<Tensor> = inputs.iter().map(|t| t.narrow(0, start as i64, len)).collect();
        let y = labels.narrow(0, start as i64, len);
        let logits = logits_of(&batch)?;
        loss += logits.cross_entropy_for_logits(&y).double_value(&[]) * len as f64;
        correct += logits.argmax(-1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[]);
    }
    Ok(((loss / n as f64) as f32, correct as f32 / n as f32))
}

const PROBE_BATCH: usize = 8;

/// Peak memory a training step adds: (bytes per sample, fixed bytes), from steps at batch 1
/// and 2 with the peak-RSS counter reset before each (Linux `clear_refs`).
fn probe_memory(mut step: impl FnMut(usize) -> Result<(), TrainError>) -> Result<(u64, u64), TrainError> {
    // The first step pays one-time costs (thread pools, autograd buffers): warm up, then measure.
    step(1)?;
    let mut peak_of = |b: usize| -> Result<u64, TrainError> {
        let base = memory::reset_peak().ok_or_else(|| TrainError::Data("a memory budget needs /proc (Linux) to measure peak memory".into()))?;
        step(b)?;
        Ok(memory::peak_rss().unwrap_or(base).saturating_sub(base))
    };
    let one = peak_of(1)?;
    let many = peak_of(PROBE_BATCH)?;
    let per_sample = (many.saturating_sub(one) / (PROBE_BATCH as u64 - 1)).max(1);
    Ok((per_sample, one.saturating_sub(per_sample)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear model's parameters and an optimizer over them, as `fit` builds them.
    fn tiny_model(seed: i64) -> (nn::VarStore, Tensor, nn::Optimizer) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3, 4], nn::Init::Randn { mean: 0.0, stdev: 1.0 });
        let opt = nn::AdamW::default().build(&vs, 1e-2).unwrap();
        (vs, w, opt)
    }

    #[test]
    fn a_scaled_step_updates_exactly_as_an_unscaled_one_and_an_overflowing_one_changes_nothing() {
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([1, 4]);
        let loss_of = |w: &Tensor| x.matmul(&w.tr()).pow_tensor_scalar(2).sum(Kind::Float);
        let (vs_a, w_a, mut opt_a) = tiny_model(1);
        let (vs_b, w_b, mut opt_b) = tiny_model(1);
        let mut scale = LossScale::new();
        for _ in 0..3 {
            assert!(apply_step(&mut opt_a, &vs_a, &loss_of(&w_a), None, 1.0));
            assert!(apply_step(&mut opt_b, &vs_b, &loss_of(&w_b), Some(&mut scale), 1.0));
        }
        // Power-of-two scaling is exact: the same parameters, bit for bit.
        assert_eq!(Vec::<f32>::try_from(w_a.flatten(0, -1)).unwrap(), Vec::<f32>::try_from(w_b.flatten(0, -1)).unwrap());
        assert_eq!(scale.skipped, 0);

        let before = w_b.detach().copy();
        let overflowing = loss_of(&w_b) * f64::INFINITY;
        assert!(!apply_step(&mut opt_b, &vs_b, &overflowing, Some(&mut scale), 1.0), "infinite gradients skip the step");
        assert!(w_b.equal(&before), "a skipped step leaves the parameters as they were");
        assert_eq!((scale.skipped, scale.scale()), (1, LossScale::INITIAL / 2.0));
    }
}
