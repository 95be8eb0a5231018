//! The reference data the set-up step exports next to the bundles: the UCI handwritten digits
//! (from scikit-learn's wheel), split into the source domain the base CNN was pre-trained on and
//! the rest, plus the domain shifts the adaptation demos and tests use.

use std::path::{Path, PathBuf};

use adaptd_adapters::tensor::{HostTensor, SeededRng, f32s_from_le, i64s_from_le};
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// 8x8 grey digits scaled to [0, 1], as `[1, 8, 8]` images.
#[derive(Debug, Clone)]
pub struct Digits {
    /// `N * 64` values, row-major.
    pub pixels: Vec<f32>,
    pub labels: Vec<i64>,
    /// True for the samples the base model was pre-trained on (the source domain).
    pub pretrain: Vec<bool>,
    /// True for the samples the digits bundle ships as its retention set.
    pub retention: Vec<bool>,
}

pub const DIGIT_SIDE: usize = 8;
const DIGIT_PIXELS: usize = DIGIT_SIDE * DIGIT_SIDE;

/// How the target domain differs from the one the base model learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    None,
    /// Rotated 90 degrees clockwise: a robot camera mounted sideways.
    Rotate90,
    /// Dark digits on a light background: another sensor's contrast.
    Invert,
    /// Upside down: a camera mounted on the ceiling.
    Rotate180,
    /// Left and right swapped: a camera seeing the scene in a mirror.
    Mirror,
    /// Gaussian sensor noise (σ 0.3), the same for an image every time it is drawn.
    Noise,
    /// Half the pixels dead (0), the same ones for an image every time it is drawn.
    Dropout,
}

impl Digits {
    pub fn load(path: &Path) -> Result<Digits, DatasetError> {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        let fmt = |reason: String| DatasetError::Format { path: path.to_path_buf(), reason };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
        let tensor = |name: &str, dtype: Dtype| {
            let t = st.tensor(name).map_err(|e| fmt(format!("tensor {name:?}: {e}")))?;
            if t.dtype() != dtype {
                return Err(fmt(format!("tensor {name:?} is {:?}, expected {dtype:?}", t.dtype())));
            }
            Ok(t)
        };
        let images = tensor("images", Dtype::F32)?;
        let labels = tensor("labels", Dtype::I64)?;
        let pretrain = tensor("pretrain", Dtype::U8)?;
        let n = labels.shape().first().copied().unwrap_or(0);
        if images.shape() != [n, 1, DIGIT_SIDE, DIGIT_SIDE] || pretrain.shape() != [n] {
            return Err(fmt(format!("shapes images {:?} / labels {:?} / pretrain {:?} do not fit", images.shape(), labels.shape(), pretrain.shape())));
        }
        let pixels = f32s_from_le(images.data());
        let labels = i64s_from_le(labels.data());
        let pretrain = pretrain.data().iter().map(|&b| b != 0).collect();
        let retention = match st.tensor("retention") {
            Ok(t) if t.dtype() == Dtype::U8 && t.shape() == [n] => t.data().iter().map(|&b| b != 0).collect(),
            Ok(t) => return Err(fmt(format!("tensor \"retention\" is {:?} {:?}, expected U8 [{n}]", t.dtype(), t.shape()))),
            Err(_) => vec![false; n],
        };
        Ok(Digits { pixels, labels, pretrain, retention })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Indices of the samples the base model never saw (nor the bundle's retention set holds):
    /// the pool adaptation tasks draw from.
    pub fn held_out(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| !self.pretrain[i] && !self.retention[i]).collect()
    }

    /// One image under `shift`, as 64 values.
    pub fn image(&self, index: usize, shift: Shift) -> Vec<f32> {
        let src = &self.pixels[index * DIGIT_PIXELS..(index + 1) * DIGIT_PIXELS];
        match shift {
            Shift::None => src.to_vec(),
            Shift::Invert => src.iter().map(|v| 1.0 - v).collect(),
            Shift::Rotate180 => src.iter().rev().copied().collect(),
            Shift::Mirror => src.chunks(DIGIT_SIDE).flat_map(|row| row.iter().rev().copied()).collect(),
            Shift::Noise => {
                let mut rng = SeededRng::new(0x6e6f_6973_6500 ^ index as u64);
                src.iter().zip(rng.normal_vec(DIGIT_PIXELS, 0.3)).map(|(v, n)| (v + n).clamp(0.0, 1.0)).collect()
            }
            Shift::Dropout => {
                let mut rng = SeededRng::new(0x6472_6f70_0000 ^ index as u64);
                src.iter().map(|&v| if rng.uniform() < 0.5 { 0.0 } else { v }).collect()
            }
            Shift::Rotate90 => {
                let mut out = vec![0.0; DIGIT_PIXELS];
                for r in 0..DIGIT_SIDE {
                    for c in 0..DIGIT_SIDE {
                        // clockwise: (r, c) -> (c, side-1-r)
                        out[c * DIGIT_SIDE + (DIGIT_SIDE - 1 - r)] = src[r * DIGIT_SIDE + c];
                    }
                }
                out
            }
        }
    }

    /// `[len, 1, 8, 8]` model input for `indices` under `shift`.
    pub fn batch(&self, indices: &[usize], shift: Shift) -> HostTensor {
        let data = indices.iter().flat_map(|&i| self.image(i, shift)).collect();
        // One DIGIT_SIDE² image per index, by construction above.
        HostTensor { shape: vec![indices.len(), 1, DIGIT_SIDE, DIGIT_SIDE], data: adaptd_adapters::tensor::HostData::F32(data) }
    }

    pub fn labels_of(&self, indices: &[usize]) -> Vec<i64> {
        indices.iter().map(|&i| self.labels[i]).collect()
    }

    /// The share of `indices` under `shift` that `adapter` (None: the base model's classifier)
    /// labels right, run through the bundle's serving graph, as the daemon would serve them.
    pub fn accuracy(
        &self,
        onnx: &mut adaptd_daemon::engine::onnx::OnnxModel,
        bundle: &adaptd_adapters::Bundle,
        adapter: Option<&adaptd_adapters::Adapter>,
        indices: &[usize],
        shift: Shift,
    ) -> Result<f64, String> {
        let slots = match adapter {
            Some(a) => a.slot_inputs(bundle).map_err(|e| e.to_string())?,
            None => adaptd_adapters::slots::no_adapter_inputs(&bundle.manifest),
        };
        let outputs = onnx.run(&[self.batch(indices, shift)], &slots).map_err(|e| e.to_string())?;
        let rows = indices.len();
        let output = |name: &str| bundle.manifest.output_index(name).and_then(|i| outputs.get(i)).and_then(|t| t.as_f32());
        let (logits, labels) = match adapter {
            Some(a) => (a.head.forward(output(&bundle.manifest.embedding_output).ok_or("no embedding output")?, rows), a.manifest.labels.clone()),
            None => {
                let logits = bundle.manifest.logits_output.as_deref().and_then(output).ok_or("the bundle has no logits output")?;
                (logits.to_vec(), bundle.manifest.labels.clone().ok_or("the bundle has no labels")?)
            }
        };
        let classes = labels.len();
        if classes == 0 || logits.len() != rows * classes {
            return Err(format!("{} scores for {rows} rows of {classes} classes", logits.len()));
        }
        let correct = indices
            .iter()
            .enumerate()
            .filter(|(row, i)| {
                let scores = &logits[row * classes..(row + 1) * classes];
                let best = (0..classes).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).unwrap_or(0);
                labels[best] == self.labels[**i].to_string()
            })
            .count();
        Ok(correct as f64 / rows.max(1) as f64)
    }
}

/// Operator commands to a mobile robot, labelled by intent: a small text task for probing LoRA
/// training on the MiniLM bundle (0 = navigate, 1 = manipulate, 2 = status).
pub const ROBOT_INTENTS: &[(&str, i64)] = &[
    ("go to the loading dock", 0),
    ("drive back to the charging station", 0),
    ("move to aisle seven and wait there", 0),
    ("navigate to the north entrance", 0),
    ("head over to the packing area", 0),
    ("return to your home position", 0),
    ("follow me to the workshop", 0),
    ("park next to the red shelf", 0),
    ("pick up the blue box", 1),
    ("grab the screwdriver from the table", 1),
    ("place the part in the bin on the left", 1),
    ("put the crate down gently", 1),
    ("open the gripper and release the cup", 1),
    ("lift the pallet onto the rack", 1),
    ("hand me the wrench", 1),
    ("stack the boxes on top of each other", 1),
    ("what is your battery level", 2),
    ("report your current status", 2),
    ("are any of your motors overheating", 2),
    ("how many tasks are left in the queue", 2),
    ("show me the error log", 2),
    ("is the lidar working correctly", 2),
    ("tell me your position on the map", 2),
    ("how long until you need to recharge", 2),
];

/// The camera task's frames (`data/camera.safetensors`, made by deploy/export/camera_task.py):
/// 320x240 JPEGs of twelve kinds of parts on a bench, in a base domain and four shifted ones.
#[derive(Debug, Clone)]
pub struct CameraFrames {
    /// Each frame's JPEG file bytes, as a camera sends them.
    pub frames: Vec<Vec<u8>>,
    pub labels: Vec<i64>,
    /// Index into `domain_names`.
    pub domains: Vec<u8>,
    pub classes: Vec<String>,
    pub domain_names: Vec<String>,
}

impl CameraFrames {
    pub fn load(path: &Path) -> Result<CameraFrames, DatasetError> {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::Io { path: path.to_path_buf(), source })?;
        let fmt = |reason: String| DatasetError::Format { path: path.to_path_buf(), reason };
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
        let names = |key: &str| -> Result<Vec<String>, DatasetError> {
            let raw = meta.metadata().as_ref().and_then(|m| m.get(key)).ok_or_else(|| fmt(format!("metadata {key:?} is missing")))?;
            serde_json::from_str(raw).map_err(|e| fmt(format!("metadata {key:?}: {e}")))
        };
        let tensor = |name: &str, dtype: Dtype| {
            let t = st.tensor(name).map_err(|e| fmt(format!("tensor {name:?}: {e}")))?;
            if t.dtype() != dtype {
                return Err(fmt(format!("tensor {name:?} is {:?}, expected {dtype:?}", t.dtype())));
            }
            Ok(t)
        };
        let jpeg = tensor("jpeg", Dtype::U8)?;
        let offsets = i64s_from_le(tensor("offsets", Dtype::I64)?.data());
        let labels = i64s_from_le(tensor("labels", Dtype::I64)?.data());
        let domains = tensor("domain", Dtype::U8)?.data().to_vec();
        let (classes, domain_names) = (names("classes")?, names("domains")?);
        let n = labels.len();
        let in_range = offsets.windows(2).all(|w| 0 <= w[0] && w[0] <= w[1] && w[1] as usize <= jpeg.data().len());
        if offsets.len() != n + 1 || domains.len() != n || !in_range {
            return Err(fmt(format!("{} offsets, {} labels and {} domains do not fit together", offsets.len(), n, domains.len())));
        }
        if labels.iter().any(|&l| l < 0 || l as usize >= classes.len()) || domains.iter().any(|&d| d as usize >= domain_names.len()) {
            return Err(fmt("a label or domain is out of range".into()));
        }
        let frames = offsets.windows(2).map(|w| jpeg.data()[w[0] as usize..w[1] as usize].to_vec()).collect();
        Ok(CameraFrames { frames, labels, domains, classes, domain_names })
    }

    /// The frames of one domain ("base", "lighting", ...), in order.
    pub fn of_domain(&self, name: &str) -> Vec<usize> {
        let Some(d) = self.domain_names.iter().position(|n| n == name) else { return Vec::new() };
        (0..self.labels.len()).filter(|&i| usize::from(self.domains[i]) == d).collect()
    }

    pub fn labels_of(&self, indices: &[usize]) -> Vec<i64> {
        indices.iter().map(|&i| self.labels[i]).collect()
    }
}
