//! Pseudo-labels: unlabelled traffic as a source of training samples.
//!
//! Self-training with a confidence threshold, as FixMatch (Sohn et al., NeurIPS 2020) does it:
//! after a job promotes, the adapter that now serves (the teacher) labels the inputs the device
//! answered lately, and those it is sure of train one more candidate beside the labelled samples.
//! Confirmation bias (a teacher learning its own mistakes) is the method's known failure, so a
//! pseudo-label needs a second, independent view to agree: the labelled samples nearest to the
//! input on the base model's embedding (co-training's idea; the bundles carry no augmentations
//! for FixMatch's weak/strong consistency). A skewed stream (Tent's collapse: one class fills
//! the traffic and the model drifts to it) cannot outvote the labels: a label gets at most
//! `max_ratio` times its labelled training samples, the surest first.
//!
//! The candidate is judged like any other: it must beat the job's best on labelled validation,
//! then the gate on the labelled holdout. Wrong pseudo-labels cost a training run, never what
//! serves. Pure: the selection is a function of the predictions and counts it is given.

use std::collections::BTreeMap;

/// The `[labels]` section's `pseudo_*` keys, as the selection uses them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PseudoPolicy {
    /// The teacher's probability of its label must reach this.
    pub threshold: f32,
    /// A label gets at most this many pseudo-labels per labelled training sample.
    pub max_ratio: f64,
    /// The input's labelled neighbours (base-model embedding) must vote for the same label.
    pub agreement: bool,
}

/// One input as the teacher and the neighbours see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judged {
    /// The teacher's class (among the job's labels) and its probability; None when the teacher
    /// answered a label the job does not train.
    pub teacher: Option<(usize, f32)>,
    /// The majority class of its labelled neighbours, when there are any.
    pub neighbours: Option<usize>,
}

/// How the traffic fared, for the job's notes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PseudoSummary {
    pub offered: usize,
    /// At or above the threshold.
    pub confident: usize,
    /// Confident, and the neighbours agree (= confident without the agreement check).
    pub agreed: usize,
    /// Within the per-label caps: what trains.
    pub chosen: usize,
    /// Chosen per class.
    pub per_class: BTreeMap<usize, usize>,
}

/// The inputs that train, as (row, class), surest first within each class, and what was seen.
/// `labelled[c]`: labelled training samples of class c.
pub fn choose(judged: &[Judged], labelled: &[usize], policy: &PseudoPolicy) -> (Vec<(usize, usize)>, PseudoSummary) {
    let mut summary = PseudoSummary { offered: judged.len(), ..PseudoSummary::default() };
    let mut by_class: BTreeMap<usize, Vec<(f32, usize)>> = BTreeMap::new();
    for (row, j) in judged.iter().enumerate() {
        let Some((class, confidence)) = j.teacher else { continue };
        // NaN is never confident.
        if confidence.is_nan() || confidence < policy.threshold || class >= labelled.len() {
            continue;
        }
        summary.confident += 1;
        if policy.agreement && j.neighbours != Some(class) {
            continue;
        }
        summary.agreed += 1;
        by_class.entry(class).or_default().push((confidence, row));
    }
    let mut chosen = Vec::new();
    for (class, mut rows) in by_class {
        let cap = (policy.max_ratio * labelled[class] as f64).floor() as usize;
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        rows.truncate(cap);
        if !rows.is_empty() {
            summary.per_class.insert(class, rows.len());
        }
        chosen.extend(rows.into_iter().map(|(_, row)| (row, class)));
    }
    summary.chosen = chosen.len();
    (chosen, summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(teacher: Option<(usize, f32)>, neighbours: Option<usize>) -> Judged {
        Judged { teacher, neighbours }
    }

    const POLICY: PseudoPolicy = PseudoPolicy { threshold: 0.9, max_ratio: 1.0, agreement: true };

    #[test]
    fn only_confident_rows_whose_neighbours_agree_are_chosen() {
        let rows = [
            judged(Some((0, 0.99)), Some(0)), // chosen
            judged(Some((0, 0.80)), Some(0)), // not sure enough
            judged(Some((1, 0.95)), Some(0)), // the neighbours disagree
            judged(None, Some(1)),            // a label the job does not train
            judged(Some((1, 0.97)), Some(1)), // chosen
            judged(Some((1, f32::NAN)), Some(1)),
        ];
        let (chosen, summary) = choose(&rows, &[10, 10], &POLICY);
        assert_eq!(chosen, vec![(0, 0), (4, 1)]);
        assert_eq!((summary.offered, summary.confident, summary.agreed, summary.chosen), (6, 3, 2, 2));
        let (chosen, summary) = choose(&rows, &[10, 10], &PseudoPolicy { agreement: false, ..POLICY });
        assert_eq!(chosen, vec![(0, 0), (4, 1), (2, 1)], "surest first within a class");
        assert_eq!(summary.agreed, 3);
    }

    #[test]
    fn a_skewed_stream_cannot_outvote_the_labels() {
        // 50 confident inputs of class 0, 2 of class 1: class 0 has 5 labels, so 5 train,
        // the surest first.
        let mut rows: Vec<Judged> = (0..50).map(|i| judged(Some((0, 0.90 + i as f32 / 1000.0)), Some(0))).collect();
        rows.extend([judged(Some((1, 0.99)), Some(1)), judged(Some((1, 0.98)), Some(1))]);
        let (chosen, summary) = choose(&rows, &[5, 8], &POLICY);
        assert_eq!(chosen.iter().filter(|c| c.1 == 0).map(|c| c.0).collect::<Vec<_>>(), vec![49, 48, 47, 46, 45]);
        assert_eq!(summary.per_class, BTreeMap::from([(0, 5), (1, 2)]));
        // A class without labels gets none.
        let (chosen, _) = choose(&rows, &[0, 8], &POLICY);
        assert!(chosen.iter().all(|c| c.1 == 1));
    }
}
