//! Parity between the two runtimes: the serving graph on ONNX Runtime and the training graph on
//! libtorch must compute the same function, with and without a LoRA adapter, or an adapter
//! validated in the trainer would behave differently once served.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use adaptd_adapters::bundle::{Bundle, Preprocessing};
use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::lora::LoraWeights;
use adaptd_adapters::slots::no_adapter_inputs;
use adaptd_adapters::tensor::SeededRng;
use adaptd_adapters::tensor::{HostData, HostTensor, max_abs_diff};
use adaptd_train::{Examples, FitReport, FitTarget, Recipe, Schedule, TrainError, TrainingGraph, fit};

use crate::datasets::{CameraFrames, DatasetError, Digits, ROBOT_INTENTS, Shift};
use adaptd_daemon::engine::onnx::{OnnxError, OnnxModel};
use adaptd_daemon::preprocess::{PreprocessError, TextEncoder};

/// fp32 agreement required between the two runtimes.
pub const PARITY_TOLERANCE: f32 = 1e-4;

#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Lora(#[from] adaptd_adapters::LoraError),
    #[error(transparent)]
    Reft(#[from] adaptd_adapters::ReftError),
    #[error(transparent)]
    Slots(#[from] adaptd_adapters::slots::SlotError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("output {name:?}: ONNX Runtime gives shape {onnx:?}, libtorch {torch:?}")]
    Shape { name: String, onnx: Vec<usize>, torch: Vec<usize> },
    #[error("merged serving: {0}")]
    Merge(String),
}

#[derive(Debug, Clone)]
pub struct OutputParity {
    pub name: String,
    /// With the base model alone (all LoRA inputs zero).
    pub base_max_abs_diff: f32,
    /// With a random LoRA adapter in every slot.
    pub lora_max_abs_diff: f32,
    /// With random LoReFT edits on every LoReFT slot (bundles that have them).
    pub reft_max_abs_diff: Option<f32>,
}

#[derive(Debug, Clone)]
pub struct ParityReport {
    pub bundle: String,
    pub batch: usize,
    pub rank: usize,
    pub outputs: Vec<OutputParity>,
    /// How far the random adapter moved the embedding: proves the LoRA slots are live.
    pub lora_effect: f32,
    /// The same for the random LoReFT edits.
    pub reft_effect: Option<f32>,
    /// Merged serving (see [`check_merged`]): what ran merged, and its max |ORT − torch| over
    /// every output.
    pub merged: Vec<(&'static str, f32)>,
}

impl ParityReport {
    pub fn worst(&self) -> f32 {
        let merged = self.merged.iter().map(|m| m.1).fold(0.0, f32::max);
        self.outputs.iter().map(|o| o.base_max_abs_diff.max(o.lora_max_abs_diff).max(o.reft_max_abs_diff.unwrap_or(0.0))).fold(merged, f32::max)
    }

    /// Within tolerance everywhere (a NaN anywhere fails), and the adapter changed the output.
    pub fn passed(&self) -> bool {
        let worst = self.worst();
        worst.is_finite()
            && worst <= PARITY_TOLERANCE
            && self.lora_effect > 10.0 * PARITY_TOLERANCE
            && self.reft_effect.is_none_or(|e| e > 10.0 * PARITY_TOLERANCE)
    }
}

/// Where the probes' real data lies: the digits and the camera task's frames (`build/data`).
#[derive(Debug, Clone)]
pub struct ProbeData {
    pub digits: PathBuf,
    pub camera: PathBuf,
}

impl ProbeData {
    /// The data the set-up step put in `build_dir/data`.
    pub fn in_build_dir(build_dir: &Path) -> ProbeData {
        let data = build_dir.join("data");
        ProbeData { digits: data.join("digits.safetensors"), camera: data.join("camera.safetensors") }
    }
}

/// Model inputs to compare the runtimes on: real digits for the 8x8 digits bundles (upright and
/// shifted), camera frames for camera-sized image bundles (base and lighting domains), operator
/// sentences of different lengths (so padding is exercised) for text bundles.
pub fn probe_inputs(bundle: &Bundle, data: &ProbeData) -> Result<Vec<HostTensor>, ParityError> {
    if let Preprocessing::Text { .. } = &bundle.manifest.preprocessing {
        let texts: Vec<&str> = ROBOT_INTENTS.iter().step_by(3).map(|(t, _)| *t).collect();
        return Ok(TextEncoder::from_bundle(bundle)?.encode(&texts)?);
    }
    if takes_digits(bundle) {
        let digits = Digits::load(&data.digits)?;
        let held = digits.held_out();
        let upright = held[..6].iter().map(|&i| digits.image(i, Shift::None));
        let rotated = held[6..12].iter().map(|&i| digits.image(i, Shift::Rotate90));
        let pixels = upright.chain(rotated).flatten().collect();
        let side = crate::datasets::DIGIT_SIDE;
        return Ok(vec![HostTensor { shape: vec![12, 1, side, side], data: HostData::F32(pixels) }]);
    }
    Ok(labelled_frames(bundle, data, 6, &["base", "lighting"])?.0)
}

/// An image or tensor bundle whose input is the 8x8 grey digit.
pub fn takes_digits(bundle: &Bundle) -> bool {
    let side = crate::datasets::DIGIT_SIDE as i64;
    bundle.manifest.inputs.first().is_some_and(|i| i.shape[1..] == [1, side, side])
}

/// `per_domain` camera frames of each domain with their labels, through the bundle's own image
/// preprocessing (JPEG decode, resize, crop, normalisation); (inputs, labels, classes). A bundle
/// on a machine without the camera task's data gets seeded synthetic frames and three labels.
fn labelled_frames(bundle: &Bundle, data: &ProbeData, per_domain: usize, domains: &[&str]) -> Result<(Vec<HostTensor>, Vec<i64>, usize), ParityError> {
    use adaptd_daemon::preprocess::{frame_pixels, image_pixels, normalize};
    let manifest = &bundle.manifest;
    let (pixels, labels, classes) = if data.camera.exists() {
        let camera = CameraFrames::load(&data.camera)?;
        let rows: Vec<usize> = domains.iter().flat_map(|d| camera.of_domain(d).into_iter().take(per_domain)).collect();
        let pixels = rows.iter().map(|&i| image_pixels(&manifest.name, &manifest.preprocessing, &camera.frames[i])).collect::<Result<Vec<_>, _>>()?;
        (pixels, camera.labels_of(&rows), camera.classes.len())
    } else {
        let (h, w) = (240, 320);
        let mut rng = SeededRng::new(11);
        let mut pixels = Vec::new();
        for _ in 0..per_domain * domains.len() {
            let frame: Vec<u8> = (0..h * w * 3).map(|_| (rng.uniform() * 255.0) as u8).collect();
            pixels.push(frame_pixels(&manifest.name, &manifest.preprocessing, &[h, w, 3], &frame)?);
        }
        let labels = (0..pixels.len() as i64).map(|i| i % 3).collect();
        (pixels, labels, 3)
    };
    let input = normalize(&manifest.name, &manifest.preprocessing, &pixels.iter().collect::<Vec<_>>())?;
    Ok((vec![input], labels, classes))
}

/// Compare every output of both graphs on `inputs`, without an adapter, with a seeded random
/// LoRA adapter of rank `rank` in every slot, and (where the bundle has LoReFT slots) with seeded
/// random LoReFT edits of rank `rank` (up to the LoReFT maximum) on every LoReFT slot.
pub fn check_parity(onnx: &mut OnnxModel, graph: &TrainingGraph, inputs: &[HostTensor], rank: usize, seed: u64) -> Result<ParityReport, ParityError> {
    let manifest = onnx.bundle().manifest.clone();
    let zeros = no_adapter_inputs(&manifest);
    let adapter = LoraWeights::random(&manifest.lora, rank, 2.0 * rank as f32, seed, 0.05)?;
    let lora = adapter.graph_inputs(&manifest)?;

    let onnx_base = onnx.run(inputs, &zeros)?;
    let torch_base = graph.forward_host(inputs, &zeros)?;
    let onnx_lora = onnx.run(inputs, &lora)?;
    let torch_lora = graph.forward_host(inputs, &lora)?;
    let reft = match &manifest.reft {
        Some(spec) => {
            let edits = adaptd_adapters::ReftWeights::random(spec, rank.min(spec.rank_max), seed, 0.1)?;
            let values = adaptd_adapters::slots::adapter_inputs(&manifest, None, Some(&edits))?;
            Some((onnx.run(inputs, &values)?, graph.forward_host(inputs, &values)?))
        }
        None => None,
    };

    let mut outputs = Vec::new();
    for (i, spec) in manifest.outputs.iter().enumerate() {
        let diff = |a: &HostTensor, b: &HostTensor| {
            max_abs_diff(a, b).ok_or_else(|| ParityError::Shape { name: spec.name.clone(), onnx: a.shape.clone(), torch: b.shape.clone() })
        };
        outputs.push(OutputParity {
            name: spec.name.clone(),
            base_max_abs_diff: diff(&onnx_base[i], &torch_base[i])?,
            lora_max_abs_diff: diff(&onnx_lora[i], &torch_lora[i])?,
            reft_max_abs_diff: reft.as_ref().map(|(o, t)| diff(&o[i], &t[i])).transpose()?,
        });
    }
    let emb = manifest.output_index(&manifest.embedding_output);
    let lora_effect = emb.and_then(|e| max_abs_diff(onnx_base.get(e)?, onnx_lora.get(e)?)).unwrap_or(f32::NAN);
    let reft_effect = reft.as_ref().map(|(o, _)| emb.and_then(|e| max_abs_diff(onnx_base.get(e)?, o.get(e)?)).unwrap_or(f32::NAN));
    Ok(ParityReport { bundle: manifest.name, batch: inputs[0].shape[0], rank, outputs, lora_effect, reft_effect, merged: Vec::new() })
}

/// What serves once an adapter has served a second, against libtorch: a seeded random LoRA
/// folded into a copy of the graph without slots, and seeded random LoReFT edits written into
/// the bundle's edits-only graph (where the bundle has the maps for them). Each copy is built as
/// serving builds it, on a thread of its own. Returns what ran merged and its max |ORT − torch|
/// over every output: a merge map that points at the wrong bytes shows here, not in serving.
pub fn check_merged(
    onnx: &mut OnnxModel,
    graph: &TrainingGraph,
    inputs: &[HostTensor],
    rank: usize,
    seed: u64,
) -> Result<Vec<(&'static str, f32)>, ParityError> {
    let manifest = onnx.bundle().manifest.clone();
    let mut kinds: Vec<(&'static str, Vec<HostTensor>)> = Vec::new();
    if onnx.merges_lora() {
        kinds.push(("LoRA", LoraWeights::random(&manifest.lora, rank, 2.0 * rank as f32, seed, 0.05)?.graph_inputs(&manifest)?));
    }
    if let Some(spec) = manifest.reft.as_ref().filter(|r| r.merge.is_some()) {
        let edits = adaptd_adapters::ReftWeights::random(spec, rank.min(spec.rank_max), seed, 0.1)?;
        kinds.push(("LoReFT", adaptd_adapters::slots::adapter_inputs(&manifest, None, Some(&edits))?));
    }
    let mut out = Vec::new();
    for (kind, values) in kinds {
        let prepared = onnx.prepare_merged(&values)?;
        let adaptd_daemon::engine::onnx::PreparedLora::Slots(_, Some(merging)) = &prepared else {
            return Err(ParityError::Merge(format!("a {kind} adapter is not offered merged serving on this bundle")));
        };
        let started = std::time::Instant::now();
        while !merging.is_merged() {
            if merging.has_failed() || started.elapsed() > std::time::Duration::from_secs(300) {
                return Err(ParityError::Merge(format!("the merged copy for a {kind} adapter was not built (the log says why)")));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let served = onnx.run_prepared(inputs.to_vec(), &prepared)?;
        let trained = graph.forward_host(inputs, &values)?;
        let mut worst = 0.0f32;
        for ((a, b), spec) in served.iter().zip(&trained).zip(&manifest.outputs) {
            let diff = max_abs_diff(a, b).ok_or_else(|| ParityError::Shape { name: spec.name.clone(), onnx: a.shape.clone(), torch: b.shape.clone() })?;
            worst = worst.max(diff);
        }
        out.push((kind, worst));
    }
    Ok(out)
}

/// A few LoRA + head training steps through the training graph on real labelled data from the
/// bundle's domain (rotated held-out digits; camera frames in the evening light; operator
/// intents for text). Proves the graph trains
/// and the base stays frozen; the report carries the losses and the bit-identity check.
pub fn training_probe(bundle: &Bundle, graph: &TrainingGraph, data: &ProbeData, steps: usize) -> Result<FitReport, ParityError> {
    let (train, head, recipe) = probe_job(bundle, data, steps)?;
    let target = FitTarget::Lora { graph, rank: 8, alpha: 8.0, start: None };
    Ok(fit(target, &train, &Examples::default(), &head, &recipe, &AtomicBool::new(false), &mut |_| {})?)
}

/// The same probe training LoReFT (rank 4, each text's first and last token) with the head.
pub fn loreft_training_probe(bundle: &Bundle, graph: &TrainingGraph, data: &ProbeData, steps: usize) -> Result<FitReport, ParityError> {
    let (train, head, recipe) = probe_job(bundle, data, steps)?;
    let positions = bundle.manifest.reft.as_ref().and_then(|r| r.positions_input.as_ref()).map(|_| adaptd_adapters::reft::ReftPositions { first: 1, last: 1 });
    let target = FitTarget::Loreft { graph, rank: 4, positions, layers: &[], start: None };
    Ok(fit(target, &train, &Examples::default(), &head, &recipe, &AtomicBool::new(false), &mut |_| {})?)
}

/// A training probe's data, starting head and recipe.
fn probe_job(bundle: &Bundle, data: &ProbeData, steps: usize) -> Result<(Examples, Head, Recipe), ParityError> {
    let (inputs, labels, classes) = match &bundle.manifest.preprocessing {
        Preprocessing::Text { .. } => {
            let texts: Vec<&str> = ROBOT_INTENTS.iter().map(|(t, _)| *t).collect();
            let labels: Vec<i64> = ROBOT_INTENTS.iter().map(|(_, l)| *l).collect();
            (TextEncoder::from_bundle(bundle)?.encode(&texts)?, labels, 3)
        }
        _ if takes_digits(bundle) => {
            let digits = Digits::load(&data.digits)?;
            let held: Vec<usize> = digits.held_out().into_iter().take(64).collect();
            (vec![digits.batch(&held, Shift::Rotate90)], digits.labels_of(&held), 10)
        }
        _ => labelled_frames(bundle, data, 12, &["lighting"])?,
    };
    // Full-batch steps at a constant, high learning rate so the loss curve is deterministic and
    // short: the head starts from scratch.
    let recipe = Recipe {
        learning_rate: 1e-2,
        head_learning_rate: 1e-2,
        warmup_fraction: 0.0,
        schedule: Schedule::Constant,
        max_epochs: steps,
        batch_size: labels.len(),
        patience: 0,
        dropout: 0.0,
        lora_dropout: 0.0,
        class_balanced: false,
        ..Recipe::default()
    };
    let dim = bundle.manifest.embedding_dim;
    let mut rng = SeededRng::new(0);
    let bound = 1.0 / (dim as f32).sqrt();
    let head = Head {
        layers: vec![Dense {
            weight: HostTensor {
                shape: vec![classes, dim],
                data: HostData::F32((0..classes * dim).map(|_| (rng.uniform() as f32 * 2.0 - 1.0) * bound).collect()),
            },
            bias: HostTensor::zeros_f32(vec![classes]),
        }],
    };
    let train = Examples { weights: vec![1.0; labels.len()], inputs, labels };
    Ok((train, head, recipe))
}

/// What a head adaptation on shifted digits came to (`adaptd check`).
#[derive(Debug, Clone)]
pub struct HeadProbe {
    pub shift: Shift,
    pub train: usize,
    pub test: usize,
    /// The bundle's own classifier on the shifted test half.
    pub base_accuracy: f64,
    /// A head trained with the shipped recipe on the shifted train half, on the same test half.
    pub adapted_accuracy: f64,
    pub seconds: f64,
}

/// Adapt a head to rotated digits as the daemon's head step does (embeddings from the serving
/// graph, the shipped recipe on the CPU), starting from rows imprinted from the class means
/// rather than from the bundle's classifier, and score it on held-out images: proves the whole
/// head path (serving runtime, trainer, head) on this machine.
pub fn head_probe(onnx: &mut OnnxModel, digits_path: &Path) -> Result<HeadProbe, ParityError> {
    let shift = Shift::Rotate90;
    let started = std::time::Instant::now();
    let digits = Digits::load(digits_path)?;
    let held = digits.held_out();
    let (train_rows, test_rows) = held.split_at(held.len() / 2);
    let manifest = onnx.bundle().manifest.clone();
    let zeros = no_adapter_inputs(&manifest);
    let dim = manifest.embedding_dim;
    let mut embed = |rows: &[usize]| -> Result<(Vec<f32>, Option<Vec<f32>>), ParityError> {
        let outputs = onnx.run(&[digits.batch(rows, shift)], &zeros)?;
        let output = |name: &str| manifest.output_index(name).and_then(|i| outputs.get(i)).and_then(|t| t.as_f32()).map(<[f32]>::to_vec);
        let embeddings = output(&manifest.embedding_output).ok_or_else(|| TrainError::Data("the serving graph gave no embedding output".into()))?;
        Ok((embeddings, manifest.logits_output.as_deref().and_then(output)))
    };
    let (train_embeddings, _) = embed(train_rows)?;
    let (test_embeddings, base_logits) = embed(test_rows)?;
    let labels = digits.labels_of(train_rows);
    let classes = 10;
    let names: Vec<String> = (0..classes).map(|c| c.to_string()).collect();
    let means = adaptd_adapters::head::class_means(&train_embeddings, &labels, classes, dim);
    let start = adaptd_adapters::head::grow_linear(None, &names, &means, dim);
    let train = Examples {
        inputs: vec![HostTensor { shape: vec![train_rows.len(), dim], data: HostData::F32(train_embeddings) }],
        weights: vec![1.0; labels.len()],
        labels,
    };
    let target = FitTarget::Head { device: tch::Device::Cpu };
    let fitted = fit(target, &train, &Examples::default(), &start, &Recipe::default(), &AtomicBool::new(false), &mut |_| {})?;
    let truth = digits.labels_of(test_rows);
    let accuracy = |logits: &[f32]| {
        let right = truth
            .iter()
            .enumerate()
            .filter(|(row, label)| {
                let scores = &logits[row * classes..(row + 1) * classes];
                (0..classes).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).map(|c| c as i64) == Some(**label)
            })
            .count();
        right as f64 / truth.len().max(1) as f64
    };
    let adapted = fitted.head.forward(&test_embeddings, test_rows.len());
    let base_accuracy = base_logits.filter(|l| l.len() == test_rows.len() * classes).map_or(f64::NAN, |l| accuracy(&l));
    Ok(HeadProbe {
        shift,
        train: train_rows.len(),
        test: test_rows.len(),
        base_accuracy,
        adapted_accuracy: accuracy(&adapted),
        seconds: started.elapsed().as_secs_f64(),
    })
}
