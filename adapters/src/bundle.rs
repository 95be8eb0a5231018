//! Model bundles: the contract between the export tool, the serving engine and the trainer.
//!
//! A bundle is a directory made by `deploy/export/adaptd_export.py`: an ONNX serving graph, a
//! TorchScript training graph traced from the same module, and `manifest.json` describing both.
//! Opening a bundle checks every file against the sha256 its manifest records, so a truncated
//! copy or a swapped file is refused by name before any runtime sees it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::head::{Dense, Head};
use crate::tensor::{HostTensor, f32s_from_le, i64s_from_le};

/// The manifest format this build understands.
pub const BUNDLE_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a valid bundle manifest: {source}")]
    Manifest { path: PathBuf, source: serde_json::Error },
    #[error("{path}: bundle format {found} is not supported (this build reads format {BUNDLE_FORMAT})")]
    Format { path: PathBuf, found: u32 },
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}; the file is corrupt or was replaced")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl BundleError {
    /// Stable label for metrics and events.
    pub fn error_type(&self) -> &'static str {
        match self {
            BundleError::Io { .. } => "io",
            BundleError::Manifest { .. } => "manifest",
            BundleError::Format { .. } => "format",
            BundleError::HashMismatch { .. } => "hash_mismatch",
            BundleError::Invalid { .. } => "invalid",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    I64,
    I32,
    U8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    /// -1 marks a dynamic axis (batch, sequence).
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    Linear,
    Conv2d,
}

/// One LoRA slot: a Linear/Conv2d of the base model whose low-rank update enters as two graph inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSlot {
    /// The module's name in the PyTorch model (PEFT's naming).
    pub module: String,
    pub kind: SlotKind,
    pub in_features: usize,
    pub out_features: usize,
    pub a_input: String,
    pub b_input: String,
    /// `[r_max, in]` (linear) or `[r_max, in, kh, kw]` (conv2d).
    pub a_shape: Vec<usize>,
    /// `[out, r_max]` (linear) or `[out, r_max, 1, 1]` (conv2d).
    pub b_shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub rank_max: usize,
    pub slots: Vec<LoraSlot>,
    /// The training graph's last input, the LoRA dropout keep probability (a 0-d float, 1 = off);
    /// bundles exported before LoRA dropout have none and train without it.
    #[serde(default)]
    pub dropout_input: Option<String>,
}

/// What a LoReFT slot edits: a layer's output of shape `[N, d]`, `[N, S, d]` (edited at the
/// positions the adapter names) or `[N, d, H, W]` (every pixel's channel vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReftKind {
    Vector,
    Sequence,
    FeatureMap,
}

/// One LoReFT intervention slot (arXiv 2404.03592): the layer's output `h` becomes
/// `h + Rᵀ(W h + b − R h)`, with `R`, `W: [rank_max, dim]` and `b: [rank_max]` as graph inputs.
/// All zeros (R = 0) edits nothing; a smaller rank is zero-padded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftSlot {
    /// The module whose output is edited (its name in the PyTorch model).
    pub module: String,
    pub kind: ReftKind,
    pub dim: usize,
    pub r_input: String,
    pub w_input: String,
    pub b_input: String,
}

/// The bundle's LoReFT slots; their inputs follow the LoRA slots' in every graph, and then, where
/// a slot edits a sequence, `positions_input` (i64 `[2]`: how many of each row's first and last
/// real tokens are edited, real tokens being where `mask_input` is 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftSpec {
    pub rank_max: usize,
    pub slots: Vec<ReftSlot>,
    #[serde(default)]
    pub positions_input: Option<String>,
    #[serde(default)]
    pub mask_input: Option<String>,
    /// A copy of the model with these edits and no LoRA slot, for merged LoReFT serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<ReftMerge>,
}

/// The model with the LoReFT edits and nothing else, their values stored in the graph file:
/// serving writes an adapter's values over them and loads a copy, which then takes the model's
/// inputs alone and pays for no LoRA slot (merged LoReFT, as merged LoRA folds into weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftMerge {
    pub graph: String,
    /// Per LoReFT input, in [`ReftSpec::input_names`] order: the byte offset of its values
    /// (little-endian, as the input's shape and dtype say) in the graph file.
    pub offsets: Vec<u64>,
}

impl ReftSpec {
    /// `[R, W, b]` per slot, then the positions input if there is one.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().flat_map(|s| [s.r_input.as_str(), s.w_input.as_str(), s.b_input.as_str()]).chain(self.positions_input.as_deref())
    }

    /// How many graph inputs the slots take.
    pub fn input_count(&self) -> usize {
        3 * self.slots.len() + usize::from(self.positions_input.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Preprocessing {
    /// Raw tensors in the model's input layout.
    Tensor,
    /// Images decoded, resized (and cropped) and normalised into `[N, channels, height, width]`:
    /// each value is `(pixel * pixel_scale - mean[c]) / std[c]`. Bundles exported before the
    /// camera fields stretch to the model's size with no mean or std, and still load.
    Image {
        height: usize,
        width: usize,
        channels: usize,
        pixel_scale: f32,
        #[serde(default)]
        resize: ImageResize,
        /// `shorter_side`: the shorter side's length before the centre crop (ImageNet models:
        /// 256 for a 224 crop); default: the model's longer side (a crop with no margin).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resize_to: Option<usize>,
        /// Per channel, in the model's channel order, after `pixel_scale`; default 0.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mean: Option<Vec<f32>>,
        /// Per channel; default 1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        std: Option<Vec<f32>>,
        /// The model's channel order (frames and files arrive RGB).
        #[serde(default)]
        channel_order: ChannelOrder,
    },
    /// Text tokenized with the bundle's `tokenizer` file and cut at `max_length` tokens.
    Text { tokenizer: String, max_length: usize },
}

/// How an image of any size becomes the model's `height` x `width`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageResize {
    /// Scaled to exactly the model's size, aspect ratio not kept.
    #[default]
    Stretch,
    /// Scaled so the shorter side is `resize_to`, aspect ratio kept, then the centre cut out
    /// (what ImageNet models are evaluated with).
    ShorterSide,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exporter {
    pub torch: String,
    pub opset: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    /// Identity of the weights and export settings the bundle was made from.
    pub fingerprint: String,
    pub exporter: Exporter,
    pub serving_graph: String,
    /// The model exported without LoRA slots (the same inputs but the slots', the same outputs):
    /// what serves an adapter that changes no slot, at the original model's speed. Bundles
    /// exported before it have none, and serve everything on `serving_graph`.
    #[serde(default)]
    pub plain_graph: Option<String>,
    pub training_graph: String,
    pub files: BTreeMap<String, FileEntry>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub embedding_output: String,
    pub embedding_dim: usize,
    pub logits_output: Option<String>,
    pub labels: Option<Vec<String>>,
    pub preprocessing: Preprocessing,
    pub lora: LoraSpec,
    /// The pre-trained classifier (`weight [labels, dim]`, `bias [labels]`) as a file, so heads
    /// trained on the device start from it instead of from noise.
    #[serde(default)]
    pub base_head: Option<String>,
    /// Base-domain samples (`input.<name>` per model input, `labels` as indices into `labels`):
    /// replayed against forgetting and checked by the validation gate.
    #[serde(default)]
    pub retention: Option<String>,
    /// Where the model is cut for training above a frozen prefix, if it is.
    #[serde(default)]
    pub cut: Option<Cut>,
    /// Where each slot's weight lies in `plain_graph`, so a served LoRA can be folded into a copy
    /// of it (merged serving). Bundles without it serve LoRA on the slotted graph.
    #[serde(default)]
    pub merge: Option<Merge>,
    /// LoReFT intervention slots, if the bundle was exported with them.
    #[serde(default)]
    pub reft: Option<ReftSpec>,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// How to fold a LoRA into the graph without slots: per slot (in `lora.slots` order) the
/// initializer that holds its weight and where that initializer's values lie in the graph file
/// (little-endian f32, stored in place), and a safetensors file with `{i}.scale`, one value per
/// output channel, for the weights the export folded a batch norm into (a LoRA's update is scaled
/// alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    pub scales: Option<String>,
    pub slots: Vec<MergeSlot>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSlot {
    pub initializer: String,
    /// Byte offset of the initializer's values in the graph file.
    pub offset: u64,
    /// `[in, out]` (a Linear exported as MatMul) rather than the layer's `[out, in]`.
    pub transposed: bool,
    /// The weight was scaled per output channel (`{i}.scale` in the scales file).
    pub scaled: bool,
}

/// The model cut after one module: a frozen prefix graph (model inputs and LoRA values -> the
/// module's output) and a suffix training graph (model inputs, that output, LoRA values and the
/// dropout keep -> the model outputs), both TorchScript. LoRA on the slots above the cut trains
/// on activations the prefix computed once per sample; the serving graph is the whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cut {
    /// The module the model is cut after (its name in the exported module).
    pub after: String,
    pub prefix_graph: String,
    pub suffix_graph: String,
    /// The prefix's output, the suffix's input after the model inputs.
    pub activation: TensorSpec,
    /// Indices into `lora.slots` of the slots that run after the cut: the ones a job above the
    /// cut trains (the others stay as the prefix ran them).
    pub slots_above: Vec<usize>,
    /// Indices into `reft.slots` of the LoReFT slots whose edit is above the cut.
    #[serde(default)]
    pub reft_above: Vec<usize>,
}

impl Manifest {
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Names of all serving-graph inputs in graph order: model inputs, then A/B per LoRA slot,
    /// then the LoReFT slots' inputs.
    pub fn graph_input_names(&self) -> Vec<&str> {
        self.inputs
            .iter()
            .map(|i| i.name.as_str())
            .chain(self.lora.slots.iter().flat_map(|s| [s.a_input.as_str(), s.b_input.as_str()]))
            .chain(self.reft.iter().flat_map(ReftSpec::input_names))
            .collect()
    }

    /// How many graph inputs follow the model's own: the adapter's slot values.
    pub fn slot_input_count(&self) -> usize {
        2 * self.lora.slots.len() + self.reft.as_ref().map_or(0, ReftSpec::input_count)
    }

    fn check(&self, path: &Path) -> Result<(), BundleError> {
        let invalid = |reason: String| BundleError::Invalid { path: path.to_path_buf(), reason };
        if self.format != BUNDLE_FORMAT {
            return Err(BundleError::Format { path: path.to_path_buf(), found: self.format });
        }
        for graph in [&self.serving_graph, &self.training_graph].into_iter().chain(&self.plain_graph) {
            if !self.files.contains_key(graph) {
                return Err(invalid(format!("graph file {graph:?} is not listed under \"files\"")));
            }
        }
        if let Preprocessing::Text { tokenizer, .. } = &self.preprocessing
            && !self.files.contains_key(tokenizer)
        {
            return Err(invalid(format!("tokenizer file {tokenizer:?} is not listed under \"files\"")));
        }
        if let Preprocessing::Image { height, width, channels, pixel_scale, resize, resize_to, mean, std, channel_order } = &self.preprocessing {
            if *height == 0 || *width == 0 || !matches!(channels, 1 | 3) || !pixel_scale.is_finite() {
                return Err(invalid(format!(
                    "image preprocessing needs a height and width above 0, 1 or 3 channels and a finite pixel_scale, got {height}x{width}x{channels} at {pixel_scale}"
                )));
            }
            if let Some(to) = resize_to
                && (*resize != ImageResize::ShorterSide || *to < (*height).max(*width))
            {
                return Err(invalid(format!("resize_to {to} needs resize \"shorter_side\" and at least the model's {height}x{width}")));
            }
            for (key, values) in [("mean", mean), ("std", std)] {
                if let Some(v) = values
                    && (v.len() != *channels || v.iter().any(|x| !x.is_finite()) || (key == "std" && v.iter().any(|&x| x <= 0.0)))
                {
                    return Err(invalid(format!(
                        "{key} must have one finite value per channel ({channels}){}, got {v:?}",
                        if key == "std" { ", each above 0" } else { "" }
                    )));
                }
            }
            if *channel_order == ChannelOrder::Bgr && *channels != 3 {
                return Err(invalid("channel_order \"bgr\" needs 3 channels".into()));
            }
        }
        for name in self.files.keys() {
            if name.contains('/') || name.contains('\\') || name == ".." || name.is_empty() {
                return Err(invalid(format!("file name {name:?} must be a plain name inside the bundle")));
            }
        }
        if self.inputs.is_empty() {
            return Err(invalid("\"inputs\" is empty".into()));
        }
        let emb = self
            .outputs
            .iter()
            .find(|o| o.name == self.embedding_output)
            .ok_or_else(|| invalid(format!("embedding_output {:?} is not among the outputs", self.embedding_output)))?;
        if emb.shape.last().copied() != Some(self.embedding_dim as i64) {
            return Err(invalid(format!("embedding output {:?} has shape {:?}, but embedding_dim is {}", emb.name, emb.shape, self.embedding_dim)));
        }
        match (&self.logits_output, &self.labels) {
            (Some(logits), Some(labels)) => {
                let out =
                    self.outputs.iter().find(|o| &o.name == logits).ok_or_else(|| invalid(format!("logits_output {logits:?} is not among the outputs")))?;
                if out.shape.last().copied() != Some(labels.len() as i64) {
                    return Err(invalid(format!("logits output {logits:?} has {:?} columns but there are {} labels", out.shape.last(), labels.len())));
                }
            }
            (None, None) => {}
            _ => return Err(invalid("logits_output and labels must be given together".into())),
        }
        for (key, file) in [("base_head", &self.base_head), ("retention", &self.retention)] {
            if let Some(file) = file {
                if !self.files.contains_key(file) {
                    return Err(invalid(format!("{key} file {file:?} is not listed under \"files\"")));
                }
                if self.labels.is_none() {
                    return Err(invalid(format!("{key} needs the bundle's labels")));
                }
            }
        }
        if let Some(merge) = &self.merge {
            if self.plain_graph.is_none() || merge.scales.as_ref().is_some_and(|f| !self.files.contains_key(f)) {
                return Err(invalid(format!("merge needs plain_graph and its scales file {:?} listed under \"files\"", merge.scales)));
            }
            if merge.slots.iter().any(|m| m.scaled) && merge.scales.is_none() {
                return Err(invalid("merge has scaled slots but no scales file".into()));
            }
            if merge.slots.len() != self.lora.slots.len() {
                return Err(invalid(format!("merge names {} slots, but there are {}", merge.slots.len(), self.lora.slots.len())));
            }
        }
        if let Some(cut) = &self.cut {
            for graph in [&cut.prefix_graph, &cut.suffix_graph] {
                if !self.files.contains_key(graph) {
                    return Err(invalid(format!("cut graph file {graph:?} is not listed under \"files\"")));
                }
            }
            if let Some(bad) = cut.slots_above.iter().find(|&&i| i >= self.lora.slots.len()) {
                return Err(invalid(format!("cut.slots_above names slot {bad}, but there are {} slots", self.lora.slots.len())));
            }
            let reft_slots = self.reft.as_ref().map_or(0, |r| r.slots.len());
            if let Some(bad) = cut.reft_above.iter().find(|&&i| i >= reft_slots) {
                return Err(invalid(format!("cut.reft_above names LoReFT slot {bad}, but there are {reft_slots}")));
            }
            if cut.activation.dtype != DType::F32 || cut.activation.shape.first() != Some(&-1) {
                return Err(invalid(format!(
                    "cut.activation must be f32 with a dynamic batch axis, got {:?} {:?}",
                    cut.activation.dtype, cut.activation.shape
                )));
            }
        }
        if self.lora.rank_max == 0 {
            return Err(invalid("lora.rank_max must be at least 1".into()));
        }
        if let Some(reft) = &self.reft {
            if reft.rank_max == 0 {
                return Err(invalid("reft.rank_max must be at least 1".into()));
            }
            if let Some(slot) = reft.slots.iter().find(|s| s.dim < reft.rank_max) {
                return Err(invalid(format!("LoReFT slot {:?} is {} wide, below reft.rank_max {}", slot.module, slot.dim, reft.rank_max)));
            }
            let sequences = reft.slots.iter().any(|s| s.kind == ReftKind::Sequence);
            match (&reft.positions_input, &reft.mask_input) {
                (Some(_), Some(mask)) if sequences => {
                    if !self.inputs.iter().any(|i| &i.name == mask && i.dtype == DType::I64) {
                        return Err(invalid(format!("reft.mask_input {mask:?} is not an i64 model input")));
                    }
                }
                (None, None) => {}
                _ => return Err(invalid("reft.positions_input and reft.mask_input go together, and only with a sequence slot".into())),
            }
            if let Some(merge) = &reft.merge {
                if !self.files.contains_key(&merge.graph) {
                    return Err(invalid(format!("reft.merge.graph {:?} is not listed under \"files\"", merge.graph)));
                }
                if merge.offsets.len() != reft.input_count() {
                    return Err(invalid(format!("reft.merge has {} offsets for {} LoReFT inputs", merge.offsets.len(), reft.input_count())));
                }
            }
        }
        for slot in &self.lora.slots {
            let (a_rank, b_rank) = (slot.a_shape.first().copied(), slot.b_shape.get(1).copied());
            let dims_ok = match slot.kind {
                SlotKind::Linear => slot.a_shape.len() == 2 && slot.b_shape.len() == 2,
                SlotKind::Conv2d => slot.a_shape.len() == 4 && slot.b_shape == [slot.out_features, self.lora.rank_max, 1, 1],
            };
            if !dims_ok
                || a_rank != Some(self.lora.rank_max)
                || b_rank != Some(self.lora.rank_max)
                || slot.a_shape[1] != slot.in_features
                || slot.b_shape[0] != slot.out_features
            {
                return Err(invalid(format!(
                    "LoRA slot {:?} has shapes A {:?} / B {:?}, which do not fit a {:?} {}->{} at rank_max {}",
                    slot.module, slot.a_shape, slot.b_shape, slot.kind, slot.in_features, slot.out_features, self.lora.rank_max
                )));
            }
        }
        Ok(())
    }
}

/// A bundle whose manifest parsed and whose files all match their recorded hashes.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// sha256 of `manifest.json` itself: adapters record it as the base they were trained on.
    pub manifest_sha256: String,
}

impl Bundle {
    /// Open and verify a bundle directory. Every listed file is hashed (about 0.5 s for MiniLM's 180 MB).
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let raw = std::fs::read(&manifest_path).map_err(|source| BundleError::Io { path: manifest_path.clone(), source })?;
        let manifest: Manifest = serde_json::from_slice(&raw).map_err(|source| BundleError::Manifest { path: manifest_path.clone(), source })?;
        manifest.check(&manifest_path)?;
        for (name, entry) in &manifest.files {
            let path = dir.join(name);
            let (actual, bytes) = sha256_of(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
            if actual != entry.sha256 {
                return Err(BundleError::HashMismatch { path, expected: entry.sha256.clone(), actual });
            }
            if bytes != entry.bytes {
                return Err(BundleError::Invalid { path, reason: format!("{bytes} bytes, but the manifest records {}", entry.bytes) });
            }
        }
        let manifest_sha256 = hex::encode(Sha256::digest(&raw));
        Ok(Bundle { dir, manifest, manifest_sha256 })
    }

    pub fn serving_graph_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.serving_graph)
    }

    /// The graph without LoRA slots, if the bundle has one.
    pub fn plain_graph_path(&self) -> Option<PathBuf> {
        self.manifest.plain_graph.as_ref().map(|g| self.dir.join(g))
    }

    pub fn training_graph_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.training_graph)
    }

    pub fn file_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pre-trained classifier as a linear head, if the bundle ships one.
    pub fn base_head(&self) -> Result<Option<Head>, BundleError> {
        let Some(name) = &self.manifest.base_head else { return Ok(None) };
        let path = self.file_path(name);
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let invalid = |reason: String| BundleError::Invalid { path: path.clone(), reason };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let weight = read_tensor(&st, "weight").map_err(&invalid)?;
        let bias = read_tensor(&st, "bias").map_err(&invalid)?;
        let head = Head { layers: vec![Dense { weight, bias }] };
        let labels = self.manifest.labels.as_ref().map_or(0, Vec::len);
        head.validate(self.manifest.embedding_dim, labels).map_err(|e| invalid(e.to_string()))?;
        Ok(Some(head))
    }

    /// The base-domain retention set, if the bundle ships one.
    pub fn retention(&self) -> Result<Option<RetentionSet>, BundleError> {
        let Some(name) = &self.manifest.retention else { return Ok(None) };
        let path = self.file_path(name);
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let invalid = |reason: String| BundleError::Invalid { path: path.clone(), reason };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let labels_t = read_tensor(&st, "labels").map_err(&invalid)?;
        let labels = labels_t.as_i64().ok_or_else(|| invalid("labels must be i64".into()))?.to_vec();
        let classes = self.manifest.labels.as_ref().map_or(0, Vec::len) as i64;
        if labels.iter().any(|&l| l < 0 || l >= classes) || labels_t.shape.len() != 1 {
            return Err(invalid(format!("labels must be a 1-D list of indices below {classes}")));
        }
        let mut inputs = Vec::new();
        for spec in &self.manifest.inputs {
            let t = read_tensor(&st, &format!("input.{}", spec.name)).map_err(&invalid)?;
            if t.dtype() != spec.dtype || t.shape.first() != Some(&labels.len()) || t.shape.len() != spec.shape.len() {
                return Err(invalid(format!(
                    "input.{} has shape {:?} ({:?}); expected {} rows of {:?} ({:?})",
                    spec.name,
                    t.shape,
                    t.dtype(),
                    labels.len(),
                    spec.shape,
                    spec.dtype
                )));
            }
            inputs.push(t);
        }
        Ok(Some(RetentionSet { inputs, labels }))
    }
}

impl Bundle {
    /// The edits-only graph with a LoReFT adapter's values written in (merged LoReFT serving),
    /// for slot values that change no LoRA slot; None where the bundle has no such graph.
    pub fn merged_reft_graph(&self, values: &[HostTensor]) -> Result<Option<Vec<u8>>, BundleError> {
        let Some((spec, merge)) = self.manifest.reft.as_ref().and_then(|r| r.merge.as_ref().map(|m| (r, m))) else { return Ok(None) };
        let path = self.file_path(&merge.graph);
        let invalid = |reason: String| BundleError::Invalid { path: path.clone(), reason };
        if values.len() != self.manifest.slot_input_count() {
            return Err(invalid(format!("{} slot values, the graph takes {}", values.len(), self.manifest.slot_input_count())));
        }
        if !crate::slots::lora_adds_nothing(&self.manifest, values) {
            return Err(invalid("the adapter changes LoRA slots too, which the edits-only graph does not have".into()));
        }
        let mut graph = std::fs::read(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        let sizes = spec
            .slots
            .iter()
            .flat_map(|s| [(spec.rank_max * s.dim, DType::F32), (spec.rank_max * s.dim, DType::F32), (spec.rank_max, DType::F32)])
            .chain(spec.positions_input.iter().map(|_| (2, DType::I64)));
        let (_, reft) = crate::slots::split(&self.manifest, values);
        for (((name, value), &offset), size) in spec.input_names().zip(reft).zip(&merge.offsets).zip(sizes) {
            let bytes = le_bytes(value, size).map_err(|e| invalid(format!("{name}: {e}")))?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let dst = start
                .checked_add(bytes.len())
                .and_then(|end| graph.get_mut(start..end))
                .ok_or_else(|| invalid(format!("{name}: {} bytes at byte {start} run past the file's end", bytes.len())))?;
            dst.copy_from_slice(&bytes);
        }
        Ok(Some(graph))
    }

    /// The graph without slots with `lora` (graph-input order: A, B per slot, B already scaled)
    /// folded into its weights: each slot whose A and B both change something gets `W + B·A`
    /// written over its initializer's values, laid out as the graph holds W (transposed where it
    /// is `[in, out]`, scaled per output channel where a batch norm was folded into it). The
    /// model these bytes hold computes what the slotted graph computes with these slot values (LoRA only: LoReFT edits are refused). `None` where
    /// the bundle has no graph without slots or no merge map.
    pub fn merged_plain_graph(&self, values: &[HostTensor]) -> Result<Option<Vec<u8>>, BundleError> {
        let (Some(merge), Some(path)) = (&self.manifest.merge, self.plain_graph_path()) else { return Ok(None) };
        let invalid = |path: &Path, reason: String| BundleError::Invalid { path: path.to_path_buf(), reason };
        let slots = &self.manifest.lora.slots;
        if values.len() != self.manifest.slot_input_count() {
            return Err(invalid(&path, format!("{} slot values, the graph takes {}", values.len(), self.manifest.slot_input_count())));
        }
        if !crate::slots::reft_edits_nothing(&self.manifest, values) {
            return Err(invalid(&path, "the adapter has LoReFT edits, which change a layer's output, not its weights: nothing to fold".into()));
        }
        let (lora, _) = crate::slots::split(&self.manifest, values);
        let scales = match &merge.scales {
            Some(name) => {
                let scales_path = self.file_path(name);
                Some((std::fs::read(&scales_path).map_err(|source| BundleError::Io { path: scales_path.clone(), source })?, scales_path))
            }
            None => None,
        };
        let scales = match &scales {
            Some((bytes, p)) => Some((SafeTensors::deserialize(bytes).map_err(|e| invalid(p, format!("not a safetensors file: {e}")))?, p)),
            None => None,
        };
        let mut graph = std::fs::read(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
        for (i, ((slot, place), pair)) in slots.iter().zip(&merge.slots).zip(lora.chunks(2)).enumerate() {
            let (Some(a), Some(b)) = (pair[0].as_f32(), pair[1].as_f32()) else {
                return Err(invalid(&path, format!("slot {}: LoRA values must be f32", slot.module)));
            };
            if crate::lora::slot_adds_nothing(pair) {
                continue; // the graph's own weight stands
            }
            let scale = match (place.scaled, &scales) {
                (true, Some((st, p))) => Some(read_tensor(st, &format!("{i}.scale")).map_err(|e| invalid(p, e))?),
                (true, None) => return Err(invalid(&path, format!("slot {} is scaled but the bundle has no scales file", slot.module))),
                (false, _) => None,
            };
            let values = slot.out_features * slot.a_shape.iter().skip(1).product::<usize>();
            let start = usize::try_from(place.offset).unwrap_or(usize::MAX);
            let bytes = start
                .checked_add(4 * values)
                .and_then(|end| graph.get_mut(start..end))
                .ok_or_else(|| invalid(&path, format!("slot {}: {values} values at byte {start} run past the file's end", slot.module)))?;
            let mut weight: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            fold_slot(slot, place, &mut weight, scale.as_ref(), a, b).map_err(|e| invalid(&path, format!("slot {}: {e}", slot.module)))?;
            for (dst, v) in bytes.chunks_exact_mut(4).zip(&weight) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(Some(graph))
    }
}

/// Each LoReFT input's values as little-endian bytes, `expected` values long, or why not.
fn le_bytes(t: &HostTensor, (expected, dtype): (usize, DType)) -> Result<Vec<u8>, String> {
    if t.len() != expected || t.dtype() != dtype {
        return Err(format!("{} {:?} values, the graph holds {expected} {dtype:?}", t.len(), t.dtype()));
    }
    Ok(match &t.data {
        crate::tensor::HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        crate::tensor::HostData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

/// Add the slot's update `B·A` to `weight` (the graph's initializer, out x (in·kh·kw) values,
/// transposed or scaled as `place` says), from A `[r, in(, kh, kw)]` and B `[out, r(, 1, 1)]`.
fn fold_slot(slot: &LoraSlot, place: &MergeSlot, weight: &mut [f32], scale: Option<&HostTensor>, a: &[f32], b: &[f32]) -> Result<(), String> {
    let rank = slot.a_shape.first().copied().unwrap_or(0);
    let (out, fan_in) = (slot.out_features, slot.a_shape.iter().skip(1).product::<usize>());
    if a.len() != rank * fan_in || b.len() != out * rank || weight.len() != out * fan_in {
        return Err(format!(
            "A has {} values, B {} and the weight {}, expected {rank}x{fan_in}, {out}x{rank} and {out}x{fan_in}",
            a.len(),
            b.len(),
            weight.len()
        ));
    }
    if place.transposed && slot.kind != SlotKind::Linear {
        return Err("only a linear slot's weight can be held transposed".into());
    }
    let scale = match scale {
        Some(t) => Some(t.as_f32().filter(|s| s.len() == out).ok_or_else(|| format!("the scale must be {out} f32 values"))?),
        None => None,
    };
    for o in 0..out {
        let s = scale.map_or(1.0, |s| s[o]);
        for r in 0..rank {
            let coef = s * b[o * rank + r];
            if coef == 0.0 {
                continue;
            }
            let a_row = &a[r * fan_in..(r + 1) * fan_in];
            if place.transposed {
                for (j, &x) in a_row.iter().enumerate() {
                    weight[j * out + o] += coef * x;
                }
            } else {
                for (w, &x) in weight[o * fan_in..(o + 1) * fan_in].iter_mut().zip(a_row) {
                    *w += coef * x;
                }
            }
        }
    }
    Ok(())
}

/// Base-domain samples shipped with a bundle: model inputs (batch axis first) and label indices.
#[derive(Debug, Clone)]
pub struct RetentionSet {
    pub inputs: Vec<HostTensor>,
    pub labels: Vec<i64>,
}

impl RetentionSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> RetentionSet {
        RetentionSet { inputs: self.inputs.iter().map(|t| t.select_rows(indices)).collect(), labels: indices.iter().map(|&i| self.labels[i]).collect() }
    }
}

fn read_tensor(st: &SafeTensors<'_>, name: &str) -> Result<HostTensor, String> {
    let t = st.tensor(name).map_err(|e| format!("tensor {name:?}: {e}"))?;
    let shape = t.shape().to_vec();
    let result = match t.dtype() {
        safetensors::Dtype::F32 => HostTensor::f32(shape, f32s_from_le(t.data())),
        safetensors::Dtype::I64 => HostTensor::i64(shape, i64s_from_le(t.data())),
        other => return Err(format!("tensor {name:?} is {other:?}; bundles use f32 or i64")),
    };
    result.map_err(|e| format!("tensor {name:?}: {e}"))
}

fn sha256_of(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}
