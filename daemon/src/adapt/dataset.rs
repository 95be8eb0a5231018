//! The data of a job: which samples and labels it trains on, the base-domain rows it replays,
//! the head it starts from, and the model inputs of stored samples.

use std::collections::BTreeMap;

use adaptd_adapters::bundle::{Bundle, Manifest, RetentionSet};
use adaptd_adapters::files::SampleCounts;
use adaptd_adapters::head::{Head, class_means, grow_linear};
use adaptd_adapters::lora::LoraWeights;
use adaptd_adapters::reft::ReftWeights;
use adaptd_adapters::tensor::HostTensor;
use adaptd_train::{CachedActivation, Examples, PrefixCache};

use super::{AdaptConfig, AdaptError};
use crate::engine::concat_inputs;
use crate::gate::GateConfig;
use crate::preprocess::TextEncoder;
use crate::registry::Serving;
use crate::samples::{SampleInput, SampleStore, Split, StoredSample};
use crate::traffic::BaseDomainDetector;
use crate::trainer::{JobKind, TrainJob};

/// The bundle's base domain as the loop uses it: retention rows replayed in training (and their
/// embeddings, for heads), rows that check forgetting, and the detector that measures how much
/// of the device's traffic still looks like it.
pub(super) struct BaseDomain {
    pub replay: RetentionSet,
    pub check: RetentionSet,
    pub replay_embeddings: Option<Vec<Vec<f32>>>,
    pub detector: Option<BaseDomainDetector>,
    /// The share of the latest traffic that looks like the base domain, and over how many
    /// inputs, measured at the start of the current job.
    pub traffic_share: Option<(f64, usize)>,
}

impl BaseDomain {
    /// Replay protects what the device still sees: the configured share while the traffic
    /// holds the base domain (at least `min_share` of it), less as that fades, none without it.
    pub(super) fn replay_fraction(&self, configured: f64, gate: &GateConfig) -> f64 {
        match (gate.retention, self.traffic_share) {
            (crate::gate::RetentionPolicy::Traffic, Some((share, _))) if gate.retention_min_share > 0.0 => {
                configured * (share / gate.retention_min_share).min(1.0)
            }
            _ => configured,
        }
    }
}

/// Even rows of the retention set are replayed in training, odd rows check forgetting.
pub(super) fn split_retention(retention: Option<&RetentionSet>) -> (RetentionSet, RetentionSet) {
    let empty = || RetentionSet { inputs: Vec::new(), labels: Vec::new() };
    let Some(r) = retention else { return (empty(), empty()) };
    let even: Vec<usize> = (0..r.len()).step_by(2).collect();
    let odd: Vec<usize> = (1..r.len()).step_by(2).collect();
    (r.select(&even), r.select(&odd))
}

/// Model inputs for `samples` (one row each), in the bundle's input order: text tokenized,
/// images normalised as the bundle's preprocessing says, tensors as they are.
pub fn model_inputs(text: Option<&TextEncoder>, manifest: &Manifest, samples: &[&StoredSample]) -> Result<Vec<HostTensor>, AdaptError> {
    if samples.is_empty() {
        return Err(AdaptError::Data("no samples".into()));
    }
    let holds = |s: &StoredSample, what: &str, takes: &str| AdaptError::Data(format!("sample {:?} holds {what}; the bundle takes {takes}", s.sample.key));
    if let Some(encoder) = text {
        let texts: Vec<&str> = samples
            .iter()
            .map(|s| match &s.sample.input {
                SampleInput::Text(t) => Ok(t.as_str()),
                SampleInput::Tensor(_) | SampleInput::Image(_) => Err(holds(s, "a tensor or image", "text")),
            })
            .collect::<Result<_, _>>()?;
        return encoder.encode(&texts).map_err(|e| AdaptError::Data(e.to_string()));
    }
    if matches!(samples[0].sample.input, SampleInput::Image(_)) {
        let images: Vec<&crate::preprocess::Pixels> = samples
            .iter()
            .map(|s| match &s.sample.input {
                SampleInput::Image(p) => Ok(p),
                SampleInput::Text(_) | SampleInput::Tensor(_) => Err(holds(s, "text or a tensor", "images")),
            })
            .collect::<Result<_, _>>()?;
        let tensor = crate::preprocess::normalize(&manifest.name, &manifest.preprocessing, &images).map_err(|e| AdaptError::Data(e.to_string()))?;
        return Ok(vec![tensor]);
    }
    let tensors: Vec<&HostTensor> = samples
        .iter()
        .map(|s| match &s.sample.input {
            SampleInput::Tensor(t) => Ok(t),
            SampleInput::Text(_) | SampleInput::Image(_) => Err(holds(s, "text or an image", "tensors")),
        })
        .collect::<Result<_, _>>()?;
    let stacked = concat_inputs(tensors.iter().map(|t| std::slice::from_ref(*t)));
    // A bundle with a dynamic non-batch axis may hold samples that do not stack.
    if stacked.iter().any(|t| t.len() != t.shape.iter().product::<usize>()) {
        return Err(AdaptError::Data("samples of different shapes".into()));
    }
    Ok(stacked)
}

/// The job as the trainer takes it, and what the gate needs to know about it.
pub(super) struct Prepared {
    pub job: TrainJob,
    pub labels: Vec<String>,
    pub counts: SampleCounts,
    pub notes: Vec<String>,
    /// Labels the job trains that no validation sample has: validation cannot speak for them.
    pub unvalidated: Vec<String>,
    /// The stored samples behind the job's rows (training rows, then validation rows; None for
    /// replayed rows), for keeping the prefix activations the job computes.
    pub sample_ids: (Vec<Option<i64>>, Vec<i64>),
}

/// Pseudo-labelled inputs of the traffic (see `crate::labels::pseudo`): their model inputs (rows
/// along the first axis), base-model embeddings, and the labels the teacher gave them.
pub(super) struct PseudoRows {
    pub inputs: Vec<HostTensor>,
    pub embeddings: Vec<Vec<f32>>,
    pub labels: Vec<String>,
}

/// What a step trains on besides the training split's labelled samples.
#[derive(Clone, Copy)]
pub(super) enum Rows<'a> {
    /// Nothing: validation chooses the epoch and judges the step.
    Labelled,
    /// Pseudo-labelled traffic (training rows only: validation and the holdout stay labelled).
    WithPseudo(&'a PseudoRows),
    /// The validation split's samples too, with no validation: the refit of a recipe validation
    /// already chose (epochs included), which only the gate's holdout judges.
    WithValidation,
}

/// The training data of one step of a job: the task's embedded samples over the labels that
/// qualify (the incumbent's first, new ones with enough samples), class-balanced by the trainer,
/// the `rows` beside them, base-domain rows replayed as the traffic asks, and the head to start
/// from. Err: why the job cannot run now (the loop defers it).
pub(super) fn prepare(
    bundle: &Bundle,
    text: Option<&TextEncoder>,
    config: &AdaptConfig,
    store: &SampleStore,
    incumbent: &Serving,
    base_domain: &BaseDomain,
    rows: Rows<'_>,
) -> Result<Prepared, AdaptError> {
    let task = &config.task;
    let dim = bundle.manifest.embedding_dim;
    let mut notes = Vec::new();
    let (mut train_all, mut validation_all) = embedded_samples(store, task, dim, &mut notes)?;
    let pseudo = match rows {
        Rows::WithPseudo(p) => Some(p),
        Rows::Labelled => None,
        Rows::WithValidation => {
            notes.push(format!("refit: {} validation samples train beside {} training samples", validation_all.len(), train_all.len()));
            train_all.append(&mut validation_all);
            None
        }
    };
    let per_label = count_labels(&train_all);
    let labels = job_labels(&incumbent.labels, store.labels(task)?, &per_label, config.training.min_samples_per_class, &mut notes);
    let index: BTreeMap<&str, i64> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as i64)).collect();
    let train: Vec<&StoredSample> = train_all.iter().filter(|s| index.contains_key(s.sample.label.as_str())).collect();
    let validation: Vec<&StoredSample> = validation_all.iter().filter(|s| index.contains_key(s.sample.label.as_str())).collect();
    let mut coverage = Vec::new();
    let unvalidated = check_coverage(&labels, &per_label, &train, &validation, config.training.min_train_samples, &mut coverage)?;
    // A refit has no validation by design: a note per label would say nothing.
    if !matches!(rows, Rows::WithValidation) {
        notes.append(&mut coverage);
    }

    let train_emb = embeddings(&train, dim)?;
    let train_labels: Vec<i64> = train.iter().map(|s| index[s.sample.label.as_str()]).collect();
    let base_labels = bundle.manifest.labels.clone().unwrap_or_default();
    let init_head = starting_head(bundle, incumbent, &base_labels, &labels, &class_means(&train_emb, &train_labels, labels.len(), dim), dim)?;
    let weights = |rows: &[&StoredSample]| rows.iter().map(|s| s.sample.weight).collect::<Vec<f32>>();
    let mut train_ex = Examples { labels: train_labels, weights: weights(&train), inputs: Vec::new() };
    // Pseudo-labelled rows over the job's labels follow the labelled ones.
    let pseudo_rows: Vec<usize> = pseudo.map(|p| (0..p.labels.len()).filter(|&i| index.contains_key(p.labels[i].as_str())).collect()).unwrap_or_default();
    if let Some(p) = pseudo {
        for &i in &pseudo_rows {
            train_ex.labels.push(index[p.labels[i].as_str()]);
            train_ex.weights.push(1.0);
        }
    }
    let mut val_ex =
        Examples { labels: validation.iter().map(|s| index[s.sample.label.as_str()]).collect(), weights: weights(&validation), inputs: Vec::new() };
    // Replay: retained base-domain rows whose labels the task uses, as a share of the task's samples.
    let replay_fraction = base_domain.replay_fraction(config.training.replay_fraction, &config.gate);
    let replay_rows: Vec<(usize, i64)> = base_domain
        .replay
        .labels
        .iter()
        .enumerate()
        .filter_map(|(i, &l)| base_labels.get(l as usize).and_then(|name| index.get(name.as_str())).map(|&c| (i, c)))
        .take((replay_fraction * train.len() as f64).round() as usize)
        .collect();
    match config.training.kind() {
        JobKind::Head => {
            let mut emb = train_emb;
            if let Some(p) = pseudo {
                for &i in &pseudo_rows {
                    if p.embeddings[i].len() != dim {
                        return Err(AdaptError::Data(format!(
                            "a pseudo-labelled input's embedding has {} values; the bundle's have {dim}",
                            p.embeddings[i].len()
                        )));
                    }
                    emb.extend_from_slice(&p.embeddings[i]);
                }
            }
            if let Some(replay_emb) = base_domain.replay_embeddings.as_deref() {
                for &(i, c) in &replay_rows {
                    emb.extend_from_slice(&replay_emb[i]);
                    train_ex.labels.push(c);
                    train_ex.weights.push(1.0);
                }
            }
            let n = train_ex.labels.len();
            train_ex.inputs = vec![HostTensor::f32(vec![n, dim], emb).map_err(|e| AdaptError::Data(e.to_string()))?];
            let val_emb = if validation.is_empty() { Vec::new() } else { embeddings(&validation, dim)? };
            val_ex.inputs = vec![HostTensor::f32(vec![validation.len(), dim], val_emb).map_err(|e| AdaptError::Data(e.to_string()))?];
        }
        JobKind::Lora { .. } | JobKind::Loreft { .. } => {
            let mut inputs = model_inputs(text, &bundle.manifest, &train)?;
            if let Some(p) = pseudo.filter(|_| !pseudo_rows.is_empty()) {
                let chosen: Vec<HostTensor> = p.inputs.iter().map(|t| t.select_rows(&pseudo_rows)).collect();
                inputs = concat_inputs([inputs.as_slice(), chosen.as_slice()].into_iter());
            }
            if !replay_rows.is_empty() && text.is_none() {
                let rows: Vec<usize> = replay_rows.iter().map(|&(i, _)| i).collect();
                let extra = base_domain.replay.select(&rows).inputs;
                inputs = concat_inputs([inputs.as_slice(), extra.as_slice()].into_iter());
                for &(_, c) in &replay_rows {
                    train_ex.labels.push(c);
                    train_ex.weights.push(1.0);
                }
            }
            train_ex.inputs = inputs;
            if !validation.is_empty() {
                val_ex.inputs = model_inputs(text, &bundle.manifest, &validation)?;
            }
        }
    }
    if !pseudo_rows.is_empty() {
        notes.push(format!("{} pseudo-labelled inputs of the traffic train beside {} labelled samples", pseudo_rows.len(), train.len()));
    }
    if !replay_rows.is_empty() {
        notes.push(format!("{} retained base-domain samples replayed", replay_rows.len()));
    }
    if let Some((share, n)) = base_domain.traffic_share.filter(|_| replay_fraction < config.training.replay_fraction) {
        notes.push(format!(
            "replay follows the traffic: {:.0} % of the last {n} inputs look like the base domain, so {:.2} of the samples instead of {:.2}",
            share * 100.0,
            replay_fraction,
            config.training.replay_fraction
        ));
    }
    let holdout = store.counts(task)?.iter().filter(|((split, _), _)| *split == Split::Holdout).map(|(_, n)| n).sum();
    let counts = SampleCounts {
        train: train.len() as u64,
        validation: validation.len() as u64,
        holdout,
        train_by_label: count_labels(train.iter().copied()).into_iter().map(|(l, n)| (l.to_string(), n as u64)).collect(),
    };
    let start_lora = serving_lora_to_continue(config.training.kind(), bundle, incumbent, &mut notes);
    let start_reft = serving_reft_to_continue(config.training.kind(), bundle, incumbent, &mut notes);
    let mut train_ids: Vec<Option<i64>> = train.iter().map(|s| Some(s.id)).collect();
    train_ids.resize(train_ex.labels.len(), None);
    let validation_ids: Vec<i64> = validation.iter().map(|s| s.id).collect();
    let prefix_cache = match (config.training.kind(), &bundle.manifest.cut) {
        (JobKind::Lora { .. } | JobKind::Loreft { .. }, Some(_)) => kept_prefix_activations(store, &train_ids, &validation_ids)?,
        _ => PrefixCache::default(),
    };
    let job = TrainJob {
        kind: config.training.kind(),
        train: train_ex,
        validation: val_ex,
        init_head,
        start_lora,
        start_reft,
        loreft_layers: config.training.loreft_layers.clone(),
        recipe: config.training.job_recipe(),
        prefix_cache,
    };
    Ok(Prepared { job, labels, counts, notes, unvalidated, sample_ids: (train_ids, validation_ids) })
}

/// The task's training and validation samples that have their embedding. Under a steady stream
/// some samples always arrived after this tick's embeddings were computed: the job trains on
/// those that have one, and the rest join the next job (waiting for all of them would defer the
/// job for as long as the stream lasts).
fn embedded_samples(store: &SampleStore, task: &str, dim: usize, notes: &mut Vec<String>) -> Result<(Vec<StoredSample>, Vec<StoredSample>), AdaptError> {
    // Samples whose labels are doubted (see `crate::labels`) do not train.
    let mut train = store.load_trusted(task, Split::Train)?;
    let mut validation = store.load_trusted(task, Split::Validation)?;
    let embedded = |s: &StoredSample| s.embedding.as_ref().is_some_and(|e| e.len() == dim);
    let arriving = train.iter().chain(&validation).filter(|s| !embedded(s)).count();
    train.retain(embedded);
    validation.retain(embedded);
    if arriving > 0 {
        notes.push(format!("{arriving} sample(s) still arriving join the next job"));
    }
    Ok((train, validation))
}

/// Samples per label.
fn count_labels<'s>(samples: impl IntoIterator<Item = &'s StoredSample>) -> BTreeMap<&'s str, usize> {
    let mut per_label = BTreeMap::new();
    for s in samples {
        *per_label.entry(s.sample.label.as_str()).or_default() += 1;
    }
    per_label
}

/// The labels a job classifies: the incumbent's first (their rows are kept), then the store's
/// new labels, in first-seen order, that have `min_per_class` training samples.
fn job_labels(incumbent: &[String], stored: Vec<String>, per_label: &BTreeMap<&str, usize>, min_per_class: usize, notes: &mut Vec<String>) -> Vec<String> {
    let mut labels: Vec<String> = incumbent.to_vec();
    for label in stored {
        let n = per_label.get(label.as_str()).copied().unwrap_or(0);
        if labels.contains(&label) {
            continue;
        }
        if n < min_per_class {
            notes.push(format!("label {label:?} waits: {n} training sample(s), {min_per_class} needed"));
            continue;
        }
        labels.push(label);
    }
    labels
}

/// Enough training samples over the job's labels, and two labels to tell apart; a note for each
/// trained label that validation (so early stopping) cannot see.
fn check_coverage(
    labels: &[String],
    per_label: &BTreeMap<&str, usize>,
    train: &[&StoredSample],
    validation: &[&StoredSample],
    min_train_samples: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<String>, AdaptError> {
    if train.len() < min_train_samples {
        return Err(AdaptError::Data(format!("{} training samples over labels that qualify; {min_train_samples} needed", train.len())));
    }
    let trained_labels: std::collections::BTreeSet<&str> = train.iter().map(|s| s.sample.label.as_str()).collect();
    if trained_labels.len() < 2 && labels.len() < 2 {
        return Err(AdaptError::Data(format!("only one label ({:?}) has samples; a classifier needs two", trained_labels.iter().next())));
    }
    let mut unvalidated = Vec::new();
    for label in labels {
        if per_label.get(label.as_str()).copied().unwrap_or(0) > 0 && !validation.iter().any(|s| &s.sample.label == label) {
            notes.push(format!("label {label:?} has no validation samples: early stopping cannot see it"));
            unvalidated.push(label.clone());
        }
    }
    Ok(unvalidated)
}

/// The samples' embeddings, row after row.
fn embeddings(rows: &[&StoredSample], dim: usize) -> Result<Vec<f32>, AdaptError> {
    let mut out = Vec::with_capacity(rows.len() * dim);
    for s in rows {
        match &s.embedding {
            Some(e) if e.len() == dim => out.extend_from_slice(e),
            _ => return Err(AdaptError::Data("embeddings of new samples are still being computed".into())),
        }
    }
    Ok(out)
}

/// The head a job starts from: the incumbent's, or the bundle's pre-trained classifier, or
/// prototypes (the class means), grown to the job's labels.
fn starting_head(
    bundle: &Bundle,
    incumbent: &Serving,
    base_labels: &[String],
    labels: &[String],
    means: &[Option<Vec<f32>>],
    dim: usize,
) -> Result<Head, AdaptError> {
    let base_head = bundle.base_head()?;
    let previous: Option<(&Head, &[String])> = match (&incumbent.head, &base_head) {
        (Some(h), _) => Some((h, &incumbent.labels[..])),
        (None, Some(h)) => Some((h, base_labels)),
        (None, None) => None,
    };
    Ok(grow_linear(previous, labels, means, dim))
}

/// A LoRA job continues from the LoRA that serves (its head starts from the serving head too).
fn serving_lora_to_continue(kind: JobKind, bundle: &Bundle, incumbent: &Serving, notes: &mut Vec<String>) -> Option<LoraWeights> {
    let info = incumbent.manifest.as_ref().and_then(|m| m.lora.as_ref()).filter(|_| matches!(kind, JobKind::Lora { .. }))?;
    let (lora_inputs, _) = adaptd_adapters::slots::split(&bundle.manifest, &incumbent.lora.tensors);
    match adaptd_adapters::lora::from_lora_inputs(&bundle.manifest.lora, lora_inputs, info.rank) {
        Ok(lora) => {
            notes.push(format!("LoRA continues from v{} (rank {})", incumbent.version, info.rank));
            Some(lora)
        }
        Err(e) => {
            notes.push(format!("LoRA starts fresh: the serving LoRA cannot be continued ({e})"));
            None
        }
    }
}

/// A LoReFT job continues from the LoReFT that serves, where it edits the positions the job edits.
fn serving_reft_to_continue(kind: JobKind, bundle: &Bundle, incumbent: &Serving, notes: &mut Vec<String>) -> Option<ReftWeights> {
    let JobKind::Loreft { positions, .. } = kind else { return None };
    let info = incumbent.manifest.as_ref().and_then(|m| m.reft.as_ref())?;
    let spec = bundle.manifest.reft.as_ref()?;
    let (_, reft_inputs) = adaptd_adapters::slots::split(&bundle.manifest, &incumbent.lora.tensors);
    match adaptd_adapters::reft::from_reft_inputs(spec, reft_inputs, info.rank) {
        Ok(reft) if spec.positions_input.is_none() || reft.positions == Some(positions) => {
            notes.push(format!("LoReFT continues from v{} (rank {})", incumbent.version, info.rank));
            Some(reft)
        }
        Ok(reft) => {
            notes.push(format!("LoReFT starts fresh: the serving LoReFT edits positions {:?}, this job {positions:?}", reft.positions));
            None
        }
        Err(e) => {
            notes.push(format!("LoReFT starts fresh: the serving LoReFT cannot be continued ({e})"));
            None
        }
    }
}

/// Above a cut: the prefix activations earlier jobs kept for these samples (the trainer reuses
/// those whose key is its prefix's, and computes the rest). Replayed rows (None) have none.
fn kept_prefix_activations(store: &SampleStore, train_ids: &[Option<i64>], validation_ids: &[i64]) -> Result<PrefixCache, AdaptError> {
    let mut kept = store.activations(&train_ids.iter().flatten().chain(validation_ids).copied().collect::<Vec<_>>())?;
    // Each sample is one row: its activation moves into the job, uncopied.
    let mut take = |id: &i64| kept.remove(id).map(|(key, data)| CachedActivation { key, data });
    Ok(PrefixCache {
        train: train_ids.iter().map(|id| id.as_ref().and_then(&mut take)).collect(),
        validation: validation_ids.iter().map(&mut take).collect(),
        keep: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::RetentionPolicy;

    #[test]
    fn even_retention_rows_are_replayed_and_odd_ones_check_forgetting() {
        let retention = RetentionSet { inputs: vec![HostTensor::f32(vec![5, 1], vec![0.0, 1.0, 2.0, 3.0, 4.0]).unwrap()], labels: vec![0, 1, 2, 3, 4] };
        let (replay, check) = split_retention(Some(&retention));
        assert_eq!((replay.labels, check.labels), (vec![0, 2, 4], vec![1, 3]));
        assert!(split_retention(None).0.is_empty());
    }

    #[test]
    fn replay_follows_the_share_of_base_domain_traffic() {
        let empty = || RetentionSet { inputs: Vec::new(), labels: Vec::new() };
        let domain = |share: Option<f64>| BaseDomain {
            replay: empty(),
            check: empty(),
            replay_embeddings: None,
            detector: None,
            traffic_share: share.map(|s| (s, 256)),
        };
        let gate = GateConfig::default();
        assert_eq!(domain(Some(0.5)).replay_fraction(0.2, &gate), 0.2, "a device that still sees the base domain replays it all");
        assert!((domain(Some(0.05)).replay_fraction(0.2, &gate) - 0.1).abs() < 1e-12);
        assert_eq!(domain(Some(0.0)).replay_fraction(0.2, &gate), 0.0, "nothing to protect");
        assert_eq!(domain(None).replay_fraction(0.2, &gate), 0.2, "not measured: the configured share");
        assert_eq!(domain(Some(0.0)).replay_fraction(0.2, &GateConfig { retention: RetentionPolicy::Base, ..gate }), 0.2);
    }

    fn stored(id: i64, label: &str) -> StoredSample {
        let sample = crate::samples::Sample {
            key: format!("k{id}"),
            task: "t".into(),
            label: label.into(),
            input: SampleInput::Text("x".into()),
            weight: 1.0,
            source: None,
            timestamp_ms: 0,
            correction: false,
            request_id: None,
        };
        StoredSample { id, sample, split: Split::Train, received_ms: 0, embedding: None }
    }

    #[test]
    fn the_incumbents_labels_come_first_and_a_new_label_waits_for_enough_samples() {
        let train: Vec<StoredSample> = [(1, "cat"), (2, "dog"), (3, "dog"), (4, "bird")].into_iter().map(|(i, l)| stored(i, l)).collect();
        let per_label = count_labels(&train);
        let mut notes = Vec::new();
        let stored_labels = vec!["bird".to_string(), "dog".to_string(), "cat".to_string(), "fox".to_string()];
        let labels = job_labels(&["cat".to_string()], stored_labels, &per_label, 2, &mut notes);
        // "cat" keeps its row; "dog" has two samples and joins; "bird" (one) and "fox" (none) wait.
        assert_eq!(labels, ["cat", "dog"]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("\"bird\" waits: 1 training sample(s), 2 needed"), "{notes:?}");
        assert!(notes[1].contains("\"fox\" waits: 0"), "{notes:?}");
    }

    #[test]
    fn a_job_needs_enough_samples_and_two_labels_and_says_which_label_validation_cannot_see() {
        let train: Vec<StoredSample> = [(1, "cat"), (2, "cat"), (3, "dog")].into_iter().map(|(i, l)| stored(i, l)).collect();
        let validation = [stored(4, "cat")];
        let per_label = count_labels(&train);
        let (train_refs, val_refs): (Vec<&StoredSample>, Vec<&StoredSample>) = (train.iter().collect(), validation.iter().collect());
        let labels = ["cat".to_string(), "dog".to_string()];

        let mut notes = Vec::new();
        let unvalidated = check_coverage(&labels, &per_label, &train_refs, &val_refs, 3, &mut notes).unwrap();
        assert_eq!(notes, ["label \"dog\" has no validation samples: early stopping cannot see it"]);
        assert_eq!(unvalidated, ["dog"]);

        let err = check_coverage(&labels, &per_label, &train_refs, &val_refs, 4, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("3 training samples over labels that qualify; 4 needed"), "{err}");

        let cats: Vec<&StoredSample> = train_refs.iter().copied().filter(|s| s.sample.label == "cat").collect();
        let err = check_coverage(&labels[..1], &per_label, &cats, &val_refs, 1, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("a classifier needs two"), "{err}");
        // An incumbent that already tells two labels apart may train on samples of one of them.
        check_coverage(&labels, &per_label, &cats, &val_refs, 1, &mut Vec::new()).unwrap();
    }
}
