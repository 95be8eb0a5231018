//! Adapter files: one directory per adapter version.
//!
//! ```text
//! adapter.json               what the adapter is (task, version, kind, base bundle, metrics, file hashes)
//! head.safetensors           the classification head: layers.{i}.weight [out,in], layers.{i}.bias [out]
//! adapter_config.json        LoRA only, PEFT's format: PEFT's `PeftModel.from_pretrained` loads it
//! adapter_model.safetensors  LoRA only, PEFT's tensor names: base_model.model.{module}.lora_{A,B}.weight
//! ```
//!
//! A LoRA trained elsewhere with PEFT on the same base model can be read with [`read_peft`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, FileEntry, LoraSpec};
use crate::fsutil::{self, FsError};
use crate::head::{Dense, Head, HeadError};
use crate::lora::{LoraError, LoraModule, LoraWeights};
use crate::tensor::{HostTensor, f32s_from_le};

pub const ADAPTER_FORMAT: u32 = 1;
pub const ADAPTER_MANIFEST: &str = "adapter.json";
pub const HEAD_FILE: &str = "head.safetensors";
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub const REFT_WEIGHTS: &str = "reft.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

#[derive(Debug, thiserror::Error)]
pub enum AdapterFileError {
    #[error(transparent)]
    Io(#[from] FsError),
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: sha256 {actual} does not match adapter.json's {expected}; the file is corrupt")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
    #[error("adapter {adapter} was trained on base {adapter_base} but the bundle is {bundle_base}")]
    WrongBase { adapter: String, adapter_base: String, bundle_base: String },
    #[error("adapter {adapter}: {source}")]
    Lora { adapter: String, source: LoraError },
    #[error("adapter {adapter}: {source}")]
    Head { adapter: String, source: HeadError },
    #[error("adapter {adapter}: {source}")]
    Reft { adapter: String, source: Box<crate::reft::ReftError> },
}

impl AdapterFileError {
    pub fn error_type(&self) -> &'static str {
        match self {
            AdapterFileError::Io(_) => "io",
            AdapterFileError::Format { .. } => "format",
            AdapterFileError::HashMismatch { .. } => "hash_mismatch",
            AdapterFileError::WrongBase { .. } => "wrong_base",
            AdapterFileError::Lora { .. } => "lora",
            AdapterFileError::Head { .. } => "head",
            AdapterFileError::Reft { .. } => "reft",
        }
    }
}

fn format_err(path: &Path, reason: impl Into<String>) -> AdapterFileError {
    AdapterFileError::Format { path: path.to_path_buf(), reason: reason.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// A head over the frozen embedding.
    Head,
    /// LoRA on the bundle's slots plus a head, trained jointly.
    Lora,
    /// LoReFT edits of the bundle's layer outputs plus a head, trained jointly.
    Loreft,
}

impl AdapterKind {
    /// `head` or `lora`, as manifests and events write it.
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Head => "head",
            AdapterKind::Lora => "lora",
            AdapterKind::Loreft => "loreft",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraInfo {
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
}

/// A LoReFT adapter's configuration (its tensors are in `reft.safetensors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftInfo {
    pub rank: usize,
    /// Which tokens of a sequence are edited; none where the bundle edits no sequence.
    pub positions: Option<crate::reft::ReftPositions>,
    /// The layers whose output it edits.
    pub modules: Vec<String>,
}

/// The base bundle an adapter was trained on; it is served only on that bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub name: String,
    pub version: String,
    pub manifest_sha256: String,
}

impl BaseRef {
    pub fn of(bundle: &Bundle) -> BaseRef {
        BaseRef { name: bundle.manifest.name.clone(), version: bundle.manifest.version.clone(), manifest_sha256: bundle.manifest_sha256.clone() }
    }
}

/// How many samples of each split trained an adapter (the events carry the same figures).
pub use adaptd_protocol::event::SampleCounts;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterManifest {
    pub format: u32,
    pub task: String,
    pub version: u64,
    pub kind: AdapterKind,
    pub labels: Vec<String>,
    pub lora: Option<LoraInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reft: Option<ReftInfo>,
    pub base: BaseRef,
    pub parent_version: Option<u64>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub samples: SampleCounts,
    pub created_unix_ms: u64,
    /// Why the adapter was promoted or refused, with the figures (written by the gate).
    #[serde(default)]
    pub decision: Option<adaptd_protocol::gate::DecisionRecord>,
    /// When this device's registry promoted it (the gate's path); none for an import until an
    /// operator pins it. Recovery without a usable `active` pointer serves only promoted versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_unix_ms: Option<u64>,
    /// Serve rows that look like the bundle's base domain with the base model and only the
    /// rest with this adapter (chosen by the gate when the device still sees the base domain
    /// and the adapter alone would forget it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base_routing: bool,
    /// How a fleet aggregate was made from devices' offers (none for an adapter one device trained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregation>,
    /// Filled in when written; checked when read.
    #[serde(default)]
    pub files: BTreeMap<String, FileEntry>,
}

/// The provenance of a fleet aggregate: which offers, at which weights, by which rule, how well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    /// `cat` or `svd` (LoRA), `heads` (head adapters).
    pub rule: String,
    /// The release the devices trained from (none: the base model).
    pub parent_release: Option<u64>,
    pub offers: Vec<AggregatedOffer>,
    /// The largest relative residual over the LoRA modules (0 for `cat`).
    pub residual: f64,
    pub modules: Vec<crate::aggregate::ModuleFit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatedOffer {
    pub device: String,
    pub version: u64,
    /// Its share of the LoRA update (from its training samples, capped).
    pub weight: f64,
    pub train_samples: u64,
}

impl AdapterManifest {
    /// `task@vN`: how logs, events and responses name an adapter.
    pub fn id(&self) -> String {
        format!("{}@v{}", self.task, self.version)
    }
}

/// A complete adapter: what it is and its tensors, as plain host data.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub manifest: AdapterManifest,
    pub head: Head,
    pub lora: Option<LoraWeights>,
    pub reft: Option<crate::reft::ReftWeights>,
}

impl Adapter {
    /// Refuse an adapter that cannot be served on `bundle`: another base, LoRA shapes that do not
    /// fit its slots, or a head that does not fit its embedding or labels.
    pub fn check_fits(&self, bundle: &Bundle) -> Result<(), AdapterFileError> {
        let id = self.manifest.id();
        if self.manifest.base.manifest_sha256 != bundle.manifest_sha256 {
            return Err(AdapterFileError::WrongBase {
                adapter: id,
                adapter_base: format!("{} {} ({})", self.manifest.base.name, self.manifest.base.version, short(&self.manifest.base.manifest_sha256)),
                bundle_base: format!("{} {} ({})", bundle.manifest.name, bundle.manifest.version, short(&bundle.manifest_sha256)),
            });
        }
        if let Some(lora) = &self.lora {
            lora.validate(&bundle.manifest.lora).map_err(|source| AdapterFileError::Lora { adapter: id.clone(), source })?;
        }
        if let Some(reft) = &self.reft {
            let spec = bundle
                .manifest
                .reft
                .as_ref()
                .ok_or_else(|| AdapterFileError::Reft { adapter: id.clone(), source: Box::new(crate::reft::ReftError::NoSlots) })?;
            reft.validate(spec).map_err(|source| AdapterFileError::Reft { adapter: id.clone(), source: Box::new(source) })?;
        }
        self.head.validate(bundle.manifest.embedding_dim, self.manifest.labels.len()).map_err(|source| AdapterFileError::Head { adapter: id, source })
    }

    /// The slot values that serve this adapter on `bundle`'s graphs.
    pub fn slot_inputs(&self, bundle: &Bundle) -> Result<Vec<HostTensor>, AdapterFileError> {
        crate::slots::adapter_inputs(&bundle.manifest, self.lora.as_ref(), self.reft.as_ref()).map_err(|e| match e {
            crate::slots::SlotError::Lora(source) => AdapterFileError::Lora { adapter: self.manifest.id(), source },
            crate::slots::SlotError::Reft(source) => AdapterFileError::Reft { adapter: self.manifest.id(), source: Box::new(source) },
        })
    }

    /// Write every file into `dir` (which must exist and be empty, e.g. a staging directory),
    /// fsynced, with `adapter.json` last, recording each file's sha256.
    pub fn write_dir(&self, dir: &Path) -> Result<AdapterManifest, AdapterFileError> {
        let mut manifest = self.manifest.clone();
        manifest.files.clear();
        let mut put = |name: &str, bytes: Vec<u8>| -> Result<(), AdapterFileError> {
            fsutil::write_synced(&dir.join(name), &bytes)?;
            manifest.files.insert(name.to_string(), FileEntry { sha256: hex::encode(Sha256::digest(&bytes)), bytes: bytes.len() as u64 });
            Ok(())
        };
        put(HEAD_FILE, head_to_safetensors(&self.head).map_err(|e| format_err(&dir.join(HEAD_FILE), e))?)?;
        if let Some(lora) = &self.lora {
            let (config, weights) = peft_files(lora, &self.manifest.base.name).map_err(|e| format_err(&dir.join(PEFT_WEIGHTS), e))?;
            put(PEFT_CONFIG, config)?;
            put(PEFT_WEIGHTS, weights)?;
        }
        if let Some(reft) = &self.reft {
            put(REFT_WEIGHTS, reft_to_safetensors(reft).map_err(|e| format_err(&dir.join(REFT_WEIGHTS), e))?)?;
        }
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| format_err(&dir.join(ADAPTER_MANIFEST), e.to_string()))?;
        fsutil::write_synced(&dir.join(ADAPTER_MANIFEST), &json)?;
        Ok(manifest)
    }

    /// Read and verify an adapter directory written by [`Adapter::write_dir`].
    pub fn read_dir(dir: &Path) -> Result<Adapter, AdapterFileError> {
        let manifest_path = dir.join(ADAPTER_MANIFEST);
        let raw = std::fs::read(&manifest_path).map_err(fsutil::at(&manifest_path))?;
        let manifest: AdapterManifest = serde_json::from_slice(&raw).map_err(|e| format_err(&manifest_path, format!("not a valid adapter manifest: {e}")))?;
        if manifest.format != ADAPTER_FORMAT {
            return Err(format_err(&manifest_path, format!("adapter format {} is not supported (this build reads {ADAPTER_FORMAT})", manifest.format)));
        }
        let mut contents: HashMap<String, Vec<u8>> = HashMap::new();
        for (name, entry) in &manifest.files {
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(format_err(&manifest_path, format!("file name {name:?} must be a plain name inside the adapter")));
            }
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(fsutil::at(&path))?;
            let actual = hex::encode(Sha256::digest(&bytes));
            if actual != entry.sha256 || bytes.len() as u64 != entry.bytes {
                return Err(AdapterFileError::HashMismatch { path, expected: entry.sha256.clone(), actual });
            }
            contents.insert(name.clone(), bytes);
        }
        let head_path = dir.join(HEAD_FILE);
        let head_bytes = contents.get(HEAD_FILE).ok_or_else(|| format_err(&manifest_path, format!("lists no {HEAD_FILE}")))?;
        let head = head_from_safetensors(head_bytes).map_err(|e| format_err(&head_path, e))?;
        let lora = match (manifest.kind, &manifest.lora) {
            (AdapterKind::Head, None) => None,
            (AdapterKind::Lora, Some(info)) => {
                let config = contents.get(PEFT_CONFIG).ok_or_else(|| format_err(&manifest_path, format!("a LoRA adapter lists no {PEFT_CONFIG}")))?;
                let weights = contents.get(PEFT_WEIGHTS).ok_or_else(|| format_err(&manifest_path, format!("a LoRA adapter lists no {PEFT_WEIGHTS}")))?;
                let lora = parse_peft(config, weights, &dir.join(PEFT_CONFIG), &dir.join(PEFT_WEIGHTS))?;
                if lora.rank != info.rank {
                    return Err(format_err(&manifest_path, format!("says rank {}, {PEFT_CONFIG} says {}", info.rank, lora.rank)));
                }
                Some(lora)
            }
            (AdapterKind::Loreft, None) => None,
            (kind, info) => return Err(format_err(&manifest_path, format!("kind {kind:?} with lora {info:?} is contradictory"))),
        };
        let reft = match (manifest.kind, &manifest.reft) {
            (AdapterKind::Loreft, Some(info)) => {
                let path = dir.join(REFT_WEIGHTS);
                let bytes = contents.get(REFT_WEIGHTS).ok_or_else(|| format_err(&manifest_path, format!("a LoReFT adapter lists no {REFT_WEIGHTS}")))?;
                Some(reft_from_safetensors(bytes, info).map_err(|e| format_err(&path, e))?)
            }
            (AdapterKind::Head | AdapterKind::Lora, None) => None,
            (kind, info) => return Err(format_err(&manifest_path, format!("kind {kind:?} with reft {info:?} is contradictory"))),
        };
        Ok(Adapter { manifest, head, lora, reft })
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(tensors: &[(String, &HostTensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>, String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), t.shape.clone(), f32_bytes(t.as_f32().ok_or_else(|| format!("tensor {name} is not f32"))?))))
        .collect::<Result<_, String>>()?;
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| e.to_string()))
        .collect::<Result<_, String>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

fn read_f32(st: &SafeTensors<'_>, name: &str) -> Result<HostTensor, String> {
    let t = st.tensor(name).map_err(|e| format!("tensor {name:?}: {e}"))?;
    if t.dtype() != Dtype::F32 {
        return Err(format!("tensor {name:?} is {:?}; adaptd reads F32", t.dtype()));
    }
    HostTensor::f32(t.shape().to_vec(), f32s_from_le(t.data())).map_err(|e| format!("tensor {name:?}: {e}"))
}

/// The LoReFT configuration file beside `reft.safetensors` where a LoReFT comes without an
/// adaptd adapter around it (converted from pyreft, say): a [`ReftInfo`] as JSON.
pub const REFT_CONFIG: &str = "reft_config.json";

/// A LoReFT in adaptd's layout without an adapter around it: `reft.safetensors` and
/// `reft_config.json` in `dir` (what `deploy/export/pyreft_interop.py import` writes from a
/// pyreft save directory). Refused by file and reason when either does not hold up; the caller
/// checks it fits a bundle ([`crate::reft::ReftWeights::validate`]).
pub fn read_reft_dir(dir: &Path) -> Result<crate::reft::ReftWeights, AdapterFileError> {
    let config_path = dir.join(REFT_CONFIG);
    let raw = std::fs::read(&config_path).map_err(fsutil::at(&config_path))?;
    let info: ReftInfo = serde_json::from_slice(&raw).map_err(|e| format_err(&config_path, format!("not a LoReFT configuration: {e}")))?;
    let weights_path = dir.join(REFT_WEIGHTS);
    let bytes = std::fs::read(&weights_path).map_err(fsutil::at(&weights_path))?;
    reft_from_safetensors(&bytes, &info).map_err(|e| format_err(&weights_path, e))
}

/// `{module}.rotate_layer`, `{module}.weight`, `{module}.bias` per edited layer, as pyreft's
/// LoReFT state dicts name and lay them out: `rotate_layer` is Rᵀ (`[d, r]`, orthonormal
/// columns), `weight` is W (`[r, d]`), `bias` is b. The rank, positions and layers are in
/// `adapter.json`.
fn reft_to_safetensors(reft: &crate::reft::ReftWeights) -> Result<Vec<u8>, String> {
    let rotations: Vec<HostTensor> = reft.modules.iter().map(|m| transpose(&m.rotate)).collect::<Result<_, String>>()?;
    let names: Vec<(String, &HostTensor)> = reft
        .modules
        .iter()
        .zip(&rotations)
        .flat_map(|(m, rt)| [(format!("{}.rotate_layer", m.module), rt), (format!("{}.weight", m.module), &m.weight), (format!("{}.bias", m.module), &m.bias)])
        .collect();
    serialize(&names, HashMap::from([("format".to_string(), "adaptd-loreft".to_string())]))
}

/// The bytes of the tensor files an adapter's LoRA (PEFT's config and weights) and LoReFT
/// (`reft.safetensors`) take, as [`Adapter::write_dir`] writes them: what a rollout ships besides
/// the head.
pub fn slot_file_bytes(lora: Option<&LoraWeights>, reft: Option<&crate::reft::ReftWeights>) -> Result<usize, String> {
    let lora_bytes = match lora {
        Some(l) => peft_files(l, "base").map(|(config, weights)| config.len() + weights.len())?,
        None => 0,
    };
    let reft_bytes = match reft {
        Some(r) => reft_to_safetensors(r)?.len(),
        None => 0,
    };
    Ok(lora_bytes + reft_bytes)
}

/// A 2-d f32 tensor transposed.
fn transpose(t: &HostTensor) -> Result<HostTensor, String> {
    let (&[rows, cols], Some(v)) = (t.shape.as_slice(), t.as_f32()) else { return Err(format!("expected a 2-d f32 tensor, got shape {:?}", t.shape)) };
    let data = (0..cols).flat_map(|c| (0..rows).map(move |r| v[r * cols + c])).collect();
    HostTensor::f32(vec![cols, rows], data).map_err(|e| e.to_string())
}

fn reft_from_safetensors(bytes: &[u8], info: &ReftInfo) -> Result<crate::reft::ReftWeights, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    if st.names().len() != 3 * info.modules.len() {
        let mut found = st.names();
        found.sort_unstable();
        return Err(format!("expected rotate_layer, weight and bias for each of {:?}, found {found:?}", info.modules));
    }
    let modules = info
        .modules
        .iter()
        .map(|m| {
            Ok(crate::reft::ReftModule {
                module: m.clone(),
                rotate: transpose(&read_f32(&st, &format!("{m}.rotate_layer"))?)?,
                weight: read_f32(&st, &format!("{m}.weight"))?,
                bias: read_f32(&st, &format!("{m}.bias"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(crate::reft::ReftWeights { rank: info.rank, positions: info.positions, modules })
}

fn head_to_safetensors(head: &Head) -> Result<Vec<u8>, String> {
    let names: Vec<(String, &HostTensor)> =
        head.layers.iter().enumerate().flat_map(|(i, l)| [(format!("layers.{i}.weight"), &l.weight), (format!("layers.{i}.bias"), &l.bias)]).collect();
    serialize(&names, HashMap::from([("format".to_string(), "adaptd-head".to_string())]))
}

fn head_from_safetensors(bytes: &[u8]) -> Result<Head, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let layers = (0..).take_while(|i| st.tensor(&format!("layers.{i}.weight")).is_ok()).count();
    if layers == 0 || st.names().len() != 2 * layers {
        return Err(format!("expected tensors layers.{{i}}.weight/bias, found {:?}", st.names()));
    }
    let layers = (0..layers)
        .map(|i| Ok(Dense { weight: read_f32(&st, &format!("layers.{i}.weight"))?, bias: read_f32(&st, &format!("layers.{i}.bias"))? }))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Head { layers })
}

/// PEFT's `adapter_config.json`, the fields adaptd writes and checks. Unknown fields are allowed
/// here (PEFT adds some every release); the ones that change the math are refused if set.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    r: usize,
    lora_alpha: f32,
    target_modules: serde_json::Value,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default = "bias_none")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default = "init_true")]
    init_lora_weights: serde_json::Value,
}

fn bias_none() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

fn peft_files(lora: &LoraWeights, base_name: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let config = PeftConfig {
        peft_type: "LORA".into(),
        r: lora.rank,
        lora_alpha: lora.alpha,
        target_modules: serde_json::json!(lora.modules.iter().map(|m| m.module.clone()).collect::<Vec<_>>()),
        lora_dropout: 0.0,
        bias: "none".into(),
        fan_in_fan_out: false,
        use_rslora: false,
        use_dora: false,
        modules_to_save: None,
        layers_to_transform: None,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        base_model_name_or_path: Some(base_name.to_string()),
        inference_mode: true,
        task_type: None,
        init_lora_weights: init_true(),
    };
    let tensors: Vec<(String, &HostTensor)> = lora
        .modules
        .iter()
        .flat_map(|m| [(format!("{PEFT_PREFIX}{}.lora_A.weight", m.module), &m.a), (format!("{PEFT_PREFIX}{}.lora_B.weight", m.module), &m.b)])
        .collect();
    let weights = serialize(&tensors, HashMap::from([("format".to_string(), "pt".to_string())]))?;
    Ok((serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?, weights))
}

fn parse_peft(config: &[u8], weights: &[u8], config_path: &Path, weights_path: &Path) -> Result<LoraWeights, AdapterFileError> {
    let cfg: PeftConfig = serde_json::from_slice(config).map_err(|e| format_err(config_path, format!("not a PEFT adapter config: {e}")))?;
    let refuse = |what: &str| Err(format_err(config_path, format!("{what} is not supported; adaptd serves plain LoRA")));
    if cfg.peft_type != "LORA" {
        return refuse(&format!("peft_type {:?}", cfg.peft_type));
    }
    if cfg.use_dora {
        return refuse("use_dora");
    }
    if cfg.fan_in_fan_out {
        return refuse("fan_in_fan_out");
    }
    if cfg.bias != "none" {
        return refuse(&format!("bias {:?}", cfg.bias));
    }
    if cfg.modules_to_save.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse("modules_to_save");
    }
    if cfg.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse("layers_to_transform");
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        return refuse("rank_pattern/alpha_pattern");
    }
    let st = SafeTensors::deserialize(weights).map_err(|e| format_err(weights_path, format!("not a safetensors file: {e}")))?;
    let mut modules: BTreeMap<String, (Option<HostTensor>, Option<HostTensor>)> = BTreeMap::new();
    for name in st.names() {
        let rest = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(format_err(weights_path, format!("tensor {name:?} is not a LoRA A/B weight")));
        };
        let t = read_f32(&st, name).map_err(|e| format_err(weights_path, e))?;
        let entry = modules.entry(module.to_string()).or_default();
        if which == 0 { entry.0 = Some(t) } else { entry.1 = Some(t) }
    }
    let modules = modules
        .into_iter()
        .map(|(module, pair)| match pair {
            (Some(a), Some(b)) => Ok(LoraModule { module, a, b }),
            _ => Err(format_err(weights_path, format!("module {module:?} lacks its lora_A or lora_B"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if modules.is_empty() {
        return Err(format_err(weights_path, "holds no LoRA tensors"));
    }
    // rsLoRA scales by alpha / sqrt(r); keep adaptd's alpha / r by folding sqrt(r) into alpha.
    let alpha = if cfg.use_rslora { cfg.lora_alpha * (cfg.r as f32).sqrt() } else { cfg.lora_alpha };
    Ok(LoraWeights { rank: cfg.r, alpha, modules })
}

/// Read a LoRA adapter saved by PEFT's `save_pretrained` (a directory with `adapter_config.json`
/// and `adapter_model.safetensors`) for a bundle whose slots it must fit.
pub fn read_peft(dir: &Path, spec: &LoraSpec) -> Result<LoraWeights, AdapterFileError> {
    let (config_path, weights_path) = (dir.join(PEFT_CONFIG), dir.join(PEFT_WEIGHTS));
    let config = std::fs::read(&config_path).map_err(fsutil::at(&config_path))?;
    let weights = std::fs::read(&weights_path).map_err(fsutil::at(&weights_path))?;
    let lora = parse_peft(&config, &weights, &config_path, &weights_path)?;
    lora.validate(spec).map_err(|source| AdapterFileError::Lora { adapter: dir.display().to_string(), source })?;
    Ok(lora)
}
