//! Labels where they matter.
//! - Label requests ([`requests`], [`service`]): the served inputs whose labels would help most
//!   go out on MQTT, within quotas; an answer is a sample carrying the request's id.
//! - Wrong labels ([`suspects`]): before a job, the task's samples are searched for labels their
//!   neighbours doubt; the suspects stay out of training and the holdout until an operator judges
//!   them (`adaptd samples suspects`, `adaptd samples judge`), and a source whose samples are
//!   often suspected is named.
//! - Pseudo-labels ([`pseudo`]): after a job promotes, what serves labels the traffic it is sure
//!   of, and one more candidate trains on them beside the labels; only the gate's labelled
//!   holdout can promote it.

pub mod pseudo;
pub mod requests;
pub mod service;
pub mod suspects;

use std::collections::{BTreeMap, HashMap, HashSet};

use adaptd_protocol::SuspectSource;

use crate::samples::{SampleStore, StoreError, StoredSample, SuspectRow};
use suspects::{SuspectSearch, doubted_by_adapter, find_suspects};

/// The `[labels]` section of the configuration file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsConfig {
    /// Search for wrong labels before each job; suspects do not train or count in the holdout.
    pub suspects: bool,
    /// Neighbours that vote on each sample's label.
    pub suspect_neighbours: usize,
    /// Labels with fewer samples are not judged (a new class on its first samples).
    pub suspect_min_class_samples: usize,
    /// At most this share of a label's samples is suspected.
    pub suspect_max_share: f64,
    /// The class suggested instead must hold at least this share of the neighbours' vote.
    pub suspect_min_vote: f64,
    /// The newest samples searched (the search costs the square of their number).
    pub suspect_max_samples: usize,
    /// A source (`source` of its samples) with at least `suspect_source_min_samples` samples and
    /// at least this share of them suspected is named in the event and the listing.
    pub suspect_source_share: f64,
    pub suspect_source_min_samples: usize,
    /// Publish label requests for served inputs (where the device has an MQTT broker).
    pub requests: bool,
    pub requests_per_minute: u32,
    pub requests_per_hour: u32,
    pub requests_per_day: u32,
    /// Weights of what makes an input worth a label (see [`requests`]).
    pub request_uncertainty: f64,
    pub request_novelty: f64,
    pub request_balance: f64,
    /// The share of requests for inputs drawn at random from everything served.
    pub request_random_share: f64,
    /// Cosine distance under which an input counts as one asked about already.
    pub request_min_distance: f64,
    /// Inputs larger than this go by reference (`input_url`), not inline.
    pub request_inline_kb: usize,
    /// After this the request and its input are forgotten.
    pub request_expiry_h: f64,
    /// After a job promotes, train one more candidate on the served traffic the new adapter
    /// is sure of (see [`pseudo`]).
    pub pseudo: bool,
    /// The teacher's probability a pseudo-label needs.
    pub pseudo_threshold: f64,
    /// A label gets at most this many pseudo-labels per labelled training sample.
    pub pseudo_max_ratio: f64,
    /// The input's labelled neighbours on the base model's embedding must agree.
    pub pseudo_agreement: bool,
}

impl Default for LabelsConfig {
    fn default() -> Self {
        let search = SuspectSearch::default();
        LabelsConfig {
            suspects: true,
            suspect_neighbours: search.neighbours,
            suspect_min_class_samples: search.min_class_samples,
            suspect_max_share: search.max_share,
            suspect_min_vote: f64::from(search.min_vote),
            suspect_max_samples: 4000,
            suspect_source_share: 0.3,
            suspect_source_min_samples: 20,
            requests: true,
            requests_per_minute: 6,
            requests_per_hour: 60,
            requests_per_day: 500,
            request_uncertainty: 1.0,
            request_novelty: 0.5,
            request_balance: 0.5,
            request_random_share: 0.1,
            request_min_distance: 0.001,
            request_inline_kb: 256,
            request_expiry_h: 24.0,
            pseudo: true,
            pseudo_threshold: 0.95,
            pseudo_max_ratio: 1.0,
            pseudo_agreement: true,
        }
    }
}

impl LabelsConfig {
    pub fn pseudo_policy(&self) -> pseudo::PseudoPolicy {
        pseudo::PseudoPolicy { threshold: self.pseudo_threshold as f32, max_ratio: self.pseudo_max_ratio, agreement: self.pseudo_agreement }
    }

    pub fn suspect_search(&self) -> SuspectSearch {
        SuspectSearch {
            neighbours: self.suspect_neighbours,
            min_class_samples: self.suspect_min_class_samples,
            max_share: self.suspect_max_share,
            min_vote: self.suspect_min_vote as f32,
            ..SuspectSearch::default()
        }
    }
}

/// What one search found.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// Samples searched.
    pub judged: usize,
    pub suspects: usize,
    /// Suspects that were not suspected by the search before.
    pub new: usize,
    /// Suspects per given label.
    pub by_label: BTreeMap<String, u64>,
    /// Sources whose samples are suspected at least `suspect_source_share` of the time.
    pub sources: Vec<SuspectSource>,
}

/// The samples a search looks at, read under the store's lock; the search itself runs without it.
pub struct Reviewable {
    samples: Vec<StoredSample>,
    labels: Vec<String>,
    judged_right: HashSet<i64>,
}

impl Reviewable {
    /// The samples searched, oldest first.
    pub fn samples(&self) -> &[StoredSample] {
        &self.samples
    }
}

/// Read what a search of `task` needs (the newest `suspect_max_samples` embedded samples).
pub fn reviewable(store: &SampleStore, task: &str, config: &LabelsConfig) -> Result<Reviewable, StoreError> {
    Ok(Reviewable { samples: store.reviewable(task, config.suspect_max_samples)?, labels: store.labels(task)?, judged_right: store.labels_judged_right(task)? })
}

/// The samples of `input` whose labels an adapter trained on them doubts (see
/// [`suspects::doubted_by_adapter`]): `predictions` holds, per sample id, the adapter's class
/// probabilities in the order of its `labels`. Samples it has no prediction for, or whose label
/// it does not know, are not judged.
pub fn adapter_doubts(input: &Reviewable, labels: &[String], predictions: &HashMap<i64, Vec<f32>>, config: &LabelsConfig) -> Vec<SuspectRow> {
    let index: HashMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let judged: Vec<(&StoredSample, usize, &Vec<f32>)> = input
        .samples
        .iter()
        .filter_map(|s| Some((s, *index.get(s.sample.label.as_str())?, predictions.get(&s.id).filter(|p| p.len() == labels.len())?)))
        .collect();
    let probabilities: Vec<f32> = judged.iter().flat_map(|(_, _, p)| p.iter().copied()).collect();
    let given: Vec<usize> = judged.iter().map(|(_, y, _)| *y).collect();
    doubted_by_adapter(&probabilities, &given, labels.len(), &config.suspect_search())
        .into_iter()
        .filter(|f| !input.judged_right.contains(&judged[f.row].0.id))
        .map(|f| SuspectRow {
            sample_id: judged[f.row].0.id,
            suggested: labels[f.suggested].clone(),
            given_probability: f.given_probability,
            suggested_probability: f.suggested_probability,
            by_adapter: true,
        })
        .collect()
}

/// Search `input` for wrong labels: the suspects to keep (samples an operator judged right are
/// never suspected), and the review to report. The neighbours' suspects come first, then those
/// of `doubted` (an adapter's, [`adapter_doubts`]) among the samples still in `input` that the
/// neighbours did not suspect. Pure: no store, no clock.
pub fn search(input: &Reviewable, dim: usize, config: &LabelsConfig, doubted: &[SuspectRow]) -> (Vec<SuspectRow>, Review) {
    let samples: Vec<&StoredSample> = input.samples.iter().filter(|s| s.embedding.as_ref().is_some_and(|e| e.len() == dim)).collect();
    let index: HashMap<&str, usize> = input.labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let samples: Vec<&StoredSample> = samples.into_iter().filter(|s| index.contains_key(s.sample.label.as_str())).collect();
    let mut embeddings = Vec::with_capacity(samples.len() * dim);
    for s in &samples {
        embeddings.extend_from_slice(s.embedding.as_deref().unwrap_or_default());
    }
    let labels: Vec<usize> = samples.iter().map(|s| index[s.sample.label.as_str()]).collect();
    let found = find_suspects(&embeddings, dim, &labels, input.labels.len(), &config.suspect_search());
    let mut rows: Vec<SuspectRow> = found
        .iter()
        .filter(|f| !input.judged_right.contains(&samples[f.row].id))
        .map(|f| SuspectRow {
            sample_id: samples[f.row].id,
            suggested: input.labels[f.suggested].clone(),
            given_probability: f.given_probability,
            suggested_probability: f.suggested_probability,
            by_adapter: false,
        })
        .collect();
    let searched: HashSet<i64> = samples.iter().map(|s| s.id).collect();
    let by_neighbours: HashSet<i64> = rows.iter().map(|r| r.sample_id).collect();
    rows.extend(
        doubted
            .iter()
            .filter(|r| searched.contains(&r.sample_id) && !by_neighbours.contains(&r.sample_id) && !input.judged_right.contains(&r.sample_id))
            .cloned(),
    );
    let suspected: HashSet<i64> = rows.iter().map(|r| r.sample_id).collect();
    let mut by_label = BTreeMap::new();
    let mut per_source: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in &samples {
        let doubted = suspected.contains(&s.id);
        if doubted {
            *by_label.entry(s.sample.label.clone()).or_insert(0) += 1;
        }
        if let Some(source) = s.sample.source.as_deref() {
            let entry = per_source.entry(source).or_default();
            entry.0 += 1;
            entry.1 += u64::from(doubted);
        }
    }
    let sources = per_source
        .into_iter()
        .filter(|(_, (n, doubted))| *n >= config.suspect_source_min_samples as u64 && *doubted as f64 >= config.suspect_source_share * *n as f64)
        .map(|(source, (samples, suspects))| SuspectSource { source: source.to_string(), samples, suspects })
        .collect();
    let review = Review { judged: samples.len(), suspects: rows.len(), new: 0, by_label, sources };
    (rows, review)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{Sample, SampleInput, Split};

    fn sample(id: i64, label: &str, source: &str, embedding: Vec<f32>) -> StoredSample {
        StoredSample {
            id,
            sample: Sample {
                key: format!("k{id}"),
                task: "t".into(),
                label: label.into(),
                input: SampleInput::Text(String::new()),
                weight: 1.0,
                source: Some(source.into()),
                timestamp_ms: 0,
                correction: false,
                request_id: None,
            },
            split: Split::Train,
            received_ms: 0,
            embedding: Some(embedding),
        }
    }

    #[test]
    fn an_adapters_doubts_join_the_neighbours_suspects_for_samples_still_searched() {
        // Two clean clusters: the neighbours doubt nothing. The adapter is sure that samples 3
        // and 8 ("a" on the "a" side) are "b", and knows nothing of sample 5.
        let samples: Vec<StoredSample> = (0..60i64)
            .map(|i| if i % 2 == 0 { sample(i, "a", "cam", vec![1.0, 0.05 * (i % 7) as f32]) } else { sample(i, "b", "cam", vec![0.05 * (i % 7) as f32, 1.0]) })
            .collect();
        let labels = vec!["b".to_string(), "a".to_string()];
        let predictions: HashMap<i64, Vec<f32>> = (0..60i64)
            .filter(|&i| i != 5)
            .map(|i| {
                let sure_b = i % 2 == 1 || i == 4 || i == 8;
                (i, if sure_b { vec![0.95, 0.05] } else { vec![0.05, 0.95] })
            })
            .collect();
        let input = Reviewable { samples, labels: vec!["a".into(), "b".into()], judged_right: HashSet::from([8]) };
        let config = LabelsConfig::default();
        let doubts = adapter_doubts(&input, &labels, &predictions, &config);
        assert_eq!(doubts.iter().map(|r| (r.sample_id, r.suggested.as_str())).collect::<Vec<_>>(), [(4, "b")], "sample 8 was judged right");
        // A doubt about a sample no longer searched (deleted, or older than the search reads)
        // is dropped; the neighbours' own suspects come first.
        let gone = SuspectRow { sample_id: 999, suggested: "a".into(), given_probability: 0.0, suggested_probability: 1.0, by_adapter: true };
        let (rows, review) = search(&input, 2, &config, &[doubts.clone(), vec![gone]].concat());
        assert_eq!(rows, doubts);
        assert_eq!((review.judged, review.suspects), (60, 1));
        assert_eq!(review.by_label, BTreeMap::from([("a".to_string(), 1)]));
    }

    #[test]
    fn a_search_names_the_source_whose_labels_are_often_wrong_and_spares_labels_judged_right() {
        // Two clean clusters; "cam-7" labels a third of its "a" samples "b".
        let mut samples = Vec::new();
        for i in 0..120i64 {
            let (label, point) = if i % 2 == 0 { ("a", vec![1.0, 0.05 * (i % 7) as f32]) } else { ("b", vec![0.05 * (i % 7) as f32, 1.0]) };
            let source = if i < 60 { "cam-7" } else { "cam-1" };
            let label = if source == "cam-7" && label == "a" && i % 6 == 0 { "b" } else { label };
            samples.push(sample(i, label, source, point));
        }
        let flipped: Vec<i64> = (0..60).filter(|i| i % 6 == 0).collect();
        let input = Reviewable { samples, labels: vec!["a".into(), "b".into()], judged_right: HashSet::from([flipped[0]]) };
        let config = LabelsConfig { suspect_source_share: 0.15, ..LabelsConfig::default() };
        let (rows, review) = search(&input, 2, &config, &[]);
        let ids: Vec<i64> = rows.iter().map(|r| r.sample_id).collect();
        assert_eq!(ids, flipped[1..], "every flipped sample but the one judged right");
        assert!(rows.iter().all(|r| r.suggested == "a"));
        assert_eq!(review.by_label, BTreeMap::from([("b".to_string(), flipped.len() as u64 - 1)]));
        assert_eq!(review.sources, vec![SuspectSource { source: "cam-7".into(), samples: 60, suspects: flipped.len() as u64 - 1 }]);
    }
}
