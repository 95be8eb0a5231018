//! Wrong labels: samples whose label disagrees with what their neighbours say.
//!
//! Confident learning (Northcutt et al., JAIR 2021; the method cleanlab implements) on the base
//! model's embeddings, with out-of-sample class probabilities from the k nearest neighbours of
//! each sample among the others (leave-one-out, so no sample votes for itself; deep-kNN
//! filtering, Bahri et al., ICML 2020, found neighbours in a pretrained embedding a strong
//! detector of wrong labels). No model is trained: the answer is a pure function of the
//! embeddings and labels, the same on every run.
//!
//! Each class c gets a threshold t_c, the mean probability of c among the samples labelled c
//! (how sure the neighbours are of a sample that really is a c). A sample labelled y is a
//! suspect when its neighbours are less sure of y than that (p_y < t_y) and sure enough of
//! another class (p_j >= t_j for some j != y; the likeliest such j is the suggestion).
//!
//! Three guards keep hard samples and real classes from being taken for noise: the suggested
//! class must hold at least `min_vote` of the neighbours' vote (a sample among mixed neighbours,
//! where the base model does not see through a shift, is hard, not mislabelled); a label with
//! fewer than `min_class_samples` samples is never judged (its neighbours cannot know it yet: a
//! new intent or a new part on its first samples); and no more than `max_share` of a label's
//! samples are suspected (the least likely first): a class that mostly looks like another is a
//! hard class, which training must see, more likely than a mostly mislabelled one.

use std::collections::BTreeMap;

/// The settings of the search (the `[labels]` section's `suspect_*` keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuspectSearch {
    /// Neighbours that vote for each sample.
    pub neighbours: usize,
    /// Labels with fewer samples are never judged.
    pub min_class_samples: usize,
    /// At most this share of a label's samples is suspected.
    pub max_share: f64,
    /// The suggested class must hold at least this much of the neighbours' vote: where the
    /// embedding mixes classes (a shift the base model does not see through), a sample whose
    /// neighbours are split is hard, not mislabelled.
    pub min_vote: f32,
    /// Embeddings wider than this are projected down to it first (a fixed random projection,
    /// which keeps cosine similarities within a few percent) so the search stays cheap.
    pub projected_dim: usize,
}

impl Default for SuspectSearch {
    fn default() -> Self {
        SuspectSearch { neighbours: 10, min_class_samples: 20, max_share: 0.5, min_vote: 0.5, projected_dim: 256 }
    }
}

/// A sample whose label its neighbours doubt.
#[derive(Debug, Clone, PartialEq)]
pub struct Suspect {
    /// The sample's row in the input.
    pub row: usize,
    /// The class its neighbours suggest instead.
    pub suggested: usize,
    /// The neighbours' probability of the given label, and of the suggested one.
    pub given_probability: f32,
    pub suggested_probability: f32,
}

/// The samples (rows of `embeddings`, `dim` wide, labelled `labels` in `0..classes`) whose labels
/// look wrong, by row.
pub fn find_suspects(embeddings: &[f32], dim: usize, labels: &[usize], classes: usize, search: &SuspectSearch) -> Vec<Suspect> {
    let n = labels.len();
    let k = search.neighbours.min(n.saturating_sub(1));
    if dim == 0 || embeddings.len() != n * dim || k == 0 || classes < 2 || labels.iter().any(|&l| l >= classes) {
        return Vec::new();
    }
    let points = unit_rows(&project(embeddings, dim, search.projected_dim), n);
    let width = points.len() / n;
    let probabilities = neighbour_probabilities(&points, width, labels, classes, k);
    confident_learning(&probabilities, labels, classes, search)
}

/// The samples whose labels a served adapter doubts: `probabilities` are its class
/// probabilities for each sample (`classes` per row, in the order of `labels`). The rule and the
/// guards are the neighbours' ([`find_suspects`]): an adapter's probabilities stand in for their
/// vote. It sees what the base model's embedding does not (a turned camera, a new lens), so it
/// tells a wrong label from a hard sample where the neighbours cannot; trained on most of these
/// samples, it doubts only labels it did not learn, and early stopping on validation leaves a
/// wrong label mostly unlearnt (a network fits the consistent labels first).
pub fn doubted_by_adapter(probabilities: &[f32], labels: &[usize], classes: usize, search: &SuspectSearch) -> Vec<Suspect> {
    if classes < 2 || probabilities.len() != labels.len() * classes || labels.iter().any(|&l| l >= classes) || probabilities.iter().any(|p| !p.is_finite()) {
        return Vec::new();
    }
    confident_learning(probabilities, labels, classes, search)
}

/// Confident learning's rule over per-sample class probabilities (see the module's comment),
/// with the search's guards; suspects by row.
fn confident_learning(probabilities: &[f32], labels: &[usize], classes: usize, search: &SuspectSearch) -> Vec<Suspect> {
    let mut per_class = vec![0usize; classes];
    let mut sums = vec![0f64; classes];
    for (i, &y) in labels.iter().enumerate() {
        per_class[y] += 1;
        sums[y] += f64::from(probabilities[i * classes + y]);
    }
    // A class nobody is labelled with has no threshold: it is never suggested.
    let thresholds: Vec<Option<f32>> = sums.iter().zip(&per_class).map(|(&s, &m)| (m > 0).then(|| (s / m as f64) as f32)).collect();

    let mut found: BTreeMap<usize, Vec<Suspect>> = BTreeMap::new();
    for (row, &given) in labels.iter().enumerate() {
        if per_class[given] < search.min_class_samples.max(1) {
            continue;
        }
        let p = &probabilities[row * classes..(row + 1) * classes];
        let Some(given_threshold) = thresholds[given] else { continue };
        if p[given] >= given_threshold {
            continue;
        }
        let suggested = (0..classes)
            .filter(|&c| c != given && p[c] >= search.min_vote && thresholds[c].is_some_and(|t| p[c] >= t && p[c] > 0.0))
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)));
        if let Some(suggested) = suggested {
            found.entry(given).or_default().push(Suspect { row, suggested, given_probability: p[given], suggested_probability: p[suggested] });
        }
    }
    let mut suspects = Vec::new();
    for (class, mut candidates) in found {
        let cap = (search.max_share * per_class[class] as f64).floor() as usize;
        // The least likely labels first: the widest gap between the suggestion and the label.
        candidates.sort_by(|a, b| {
            (b.suggested_probability - b.given_probability).total_cmp(&(a.suggested_probability - a.given_probability)).then(a.row.cmp(&b.row))
        });
        candidates.truncate(cap);
        suspects.extend(candidates);
    }
    suspects.sort_by_key(|s| s.row);
    suspects
}

/// The majority class among the `k` rows of `reference` (labelled `reference_labels`, classes
/// below `classes`) most similar to each row of `queries` by cosine, both `dim` wide and
/// projected as `search` says; None where there are no references. Ties go to the class of the
/// nearer neighbour.
pub fn neighbour_vote(
    reference: &[f32],
    reference_labels: &[usize],
    queries: &[f32],
    dim: usize,
    classes: usize,
    search: &SuspectSearch,
) -> Vec<Option<usize>> {
    let n_queries = queries.len().checked_div(dim).unwrap_or(0);
    let n = reference_labels.len();
    if n == 0 || dim == 0 || reference.len() != n * dim {
        return vec![None; n_queries];
    }
    let width = dim.min(search.projected_dim.max(1));
    let reference = unit_rows(&project(reference, dim, search.projected_dim), n);
    let queries = unit_rows(&project(queries, dim, search.projected_dim), n_queries);
    let k = search.neighbours.max(1);
    let mut nearest: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    queries
        .chunks_exact(width)
        .map(|q| {
            nearest.clear();
            for (j, r) in reference.chunks_exact(width).enumerate() {
                let similarity = dot(q, r);
                if nearest.len() < k || similarity > nearest[nearest.len() - 1].0 {
                    let at = nearest.partition_point(|&(s, _)| s >= similarity);
                    nearest.insert(at, (similarity, j));
                    nearest.truncate(k);
                }
            }
            let mut votes = vec![0usize; classes];
            for &(_, j) in &nearest {
                if let Some(v) = votes.get_mut(reference_labels[j]) {
                    *v += 1;
                }
            }
            let most = votes.iter().copied().max().unwrap_or(0);
            // Nearest first: the first neighbour whose class has the most votes.
            nearest.iter().map(|&(_, j)| reference_labels[j]).find(|&c| votes.get(c) == Some(&most)).filter(|_| most > 0)
        })
        .collect()
}

/// Rows projected to at most `to` dimensions by a fixed Gaussian matrix (the same on every run
/// and device), or as they are when they are no wider.
fn project(embeddings: &[f32], dim: usize, to: usize) -> Vec<f32> {
    if to == 0 || dim <= to {
        return embeddings.to_vec();
    }
    // A small xorshift generator and Box-Muller: fixed, dependency-free, good enough for a
    // Johnson-Lindenstrauss projection.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut matrix = vec![0f32; dim * to];
    for pair in matrix.chunks_mut(2) {
        let (u, v) = (uniform(), uniform());
        let r = (-2.0 * u.ln()).sqrt();
        pair[0] = (r * (std::f64::consts::TAU * v).cos()) as f32;
        if let Some(second) = pair.get_mut(1) {
            *second = (r * (std::f64::consts::TAU * v).sin()) as f32;
        }
    }
    let n = embeddings.len() / dim;
    let mut out = vec![0f32; n * to];
    for (row, projected) in embeddings.chunks_exact(dim).zip(out.chunks_exact_mut(to)) {
        for (&x, weights) in row.iter().zip(matrix.chunks_exact(to)) {
            if x != 0.0 {
                for (o, &w) in projected.iter_mut().zip(weights) {
                    *o += x * w;
                }
            }
        }
    }
    out
}

/// Rows scaled to unit length (a zero row stays zero): dot products are then cosines.
fn unit_rows(points: &[f32], n: usize) -> Vec<f32> {
    let width = points.len() / n.max(1);
    let mut out = points.to_vec();
    for row in out.chunks_exact_mut(width.max(1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight running sums: the compiler vectorises this, where one sum would be a serial chain.
    let mut sums = [0f32; 8];
    let (a_blocks, b_blocks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_blocks.remainder().iter().zip(b_blocks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_blocks.zip(b_blocks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// Each row's class probabilities from its `k` most similar other rows (row-major, `classes`
/// per row), smoothed so no class is impossible: (votes + 1/classes) / (k + 1).
fn neighbour_probabilities(points: &[f32], width: usize, labels: &[usize], classes: usize, k: usize) -> Vec<f32> {
    let n = labels.len();
    let mut probabilities = vec![0f32; n * classes];
    let mut nearest: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for i in 0..n {
        nearest.clear();
        let a = &points[i * width..(i + 1) * width];
        for j in (0..n).filter(|&j| j != i) {
            let similarity = dot(a, &points[j * width..(j + 1) * width]);
            if nearest.len() < k || similarity > nearest[nearest.len() - 1].0 {
                // Kept sorted, most similar first; ties keep the earlier row.
                let at = nearest.partition_point(|&(s, _)| s >= similarity);
                nearest.insert(at, (similarity, j));
                nearest.truncate(k);
            }
        }
        let p = &mut probabilities[i * classes..(i + 1) * classes];
        for &(_, j) in &nearest {
            p[labels[j]] += 1.0;
        }
        let smoothing = 1.0 / classes as f32;
        for v in p.iter_mut() {
            *v = (*v + smoothing) / (k as f32 + 1.0);
        }
    }
    probabilities
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `classes` well-separated centres in `dim` dimensions, `per_class` each,
    /// deterministic.
    fn clusters(classes: usize, per_class: usize, dim: usize) -> (Vec<f32>, Vec<usize>) {
        let mut state = 12345u64;
        let mut noise = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let (mut points, mut labels) = (Vec::new(), Vec::new());
        for i in 0..classes * per_class {
            let class = i % classes;
            for d in 0..dim {
                let centre = if d % classes == class { 1.0 } else { 0.0 };
                points.push(centre + 0.3 * noise());
            }
            labels.push(class);
        }
        (points, labels)
    }

    #[test]
    fn a_query_takes_the_class_of_its_labelled_neighbours() {
        let (points, labels) = clusters(3, 20, 8);
        // Each class's first row asks; the other rows of the three classes answer.
        let (mut reference, mut reference_labels, mut queries) = (Vec::new(), Vec::new(), Vec::new());
        for (row, &label) in labels.iter().enumerate() {
            let p = &points[row * 8..(row + 1) * 8];
            if row % 20 == 0 {
                queries.extend_from_slice(p);
            } else {
                reference.extend_from_slice(p);
                reference_labels.push(label);
            }
        }
        let votes = neighbour_vote(&reference, &reference_labels, &queries, 8, 3, &SuspectSearch::default());
        assert_eq!(votes, vec![Some(labels[0]), Some(labels[20]), Some(labels[40])]);
        assert_eq!(neighbour_vote(&[], &[], &queries, 8, 3, &SuspectSearch::default()), vec![None; 3]);
    }

    #[test]
    fn flipped_labels_are_found_and_their_true_class_suggested() {
        let (points, mut labels) = clusters(4, 50, 16);
        let flipped = [3usize, 40, 77, 120, 199];
        let truth: Vec<usize> = flipped.iter().map(|&r| labels[r]).collect();
        for &r in &flipped {
            labels[r] = (labels[r] + 1) % 4;
        }
        let suspects = find_suspects(&points, 16, &labels, 4, &SuspectSearch::default());
        let rows: Vec<usize> = suspects.iter().map(|s| s.row).collect();
        assert_eq!(rows, flipped, "exactly the flipped samples: {suspects:?}");
        for (s, t) in suspects.iter().zip(truth) {
            assert_eq!(s.suggested, t, "the suggestion is the sample's true class");
            assert!(s.suggested_probability > s.given_probability);
        }
    }

    #[test]
    fn clean_labels_give_no_suspects() {
        let (points, labels) = clusters(3, 40, 12);
        assert!(find_suspects(&points, 12, &labels, 3, &SuspectSearch::default()).is_empty());
    }

    #[test]
    fn a_label_with_few_samples_is_never_judged_and_a_class_loses_at_most_its_cap() {
        let (points, mut labels) = clusters(2, 60, 8);
        // A new label on five samples that sit among class 0: a new class, not noise.
        for r in [0, 2, 4, 6, 8] {
            labels[r] = 2;
        }
        let search = SuspectSearch { min_class_samples: 20, ..SuspectSearch::default() };
        assert!(find_suspects(&points, 8, &labels, 3, &search).iter().all(|s| labels[s.row] != 2), "the five new-label samples are not judged");
        // Class 1 relabelled 0 on most of its rows: at most max_share of the 0s are suspected.
        let (points, mut labels) = clusters(2, 60, 8);
        for r in (1..120).step_by(2).take(40) {
            labels[r] = 0;
        }
        let zeros = labels.iter().filter(|&&l| l == 0).count();
        let search = SuspectSearch { max_share: 0.25, ..SuspectSearch::default() };
        let suspected = find_suspects(&points, 8, &labels, 2, &search).iter().filter(|s| labels[s.row] == 0).count();
        assert!(suspected <= zeros / 4, "{suspected} of {zeros}");
    }

    #[test]
    fn wide_embeddings_are_projected_and_still_separate() {
        let (points, mut labels) = clusters(5, 30, 600);
        labels[7] = (labels[7] + 2) % 5;
        let search = SuspectSearch { projected_dim: 64, ..SuspectSearch::default() };
        let suspects = find_suspects(&points, 600, &labels, 5, &search);
        assert_eq!(suspects.iter().map(|s| s.row).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn an_adapter_doubts_the_labels_it_did_not_learn_and_not_the_samples_it_is_unsure_of() {
        // Three classes, 30 samples each. The adapter learnt the consistent labels: rows 5 and
        // 40 carry a wrong label and it is sure of their true class; rows 70-74 are hard (it
        // spreads them over two classes); the rest it gets right.
        let classes = 3;
        let mut labels: Vec<usize> = (0..90).map(|r| r / 30).collect();
        let truth = labels.clone();
        labels[5] = 2;
        labels[40] = 0;
        let probabilities: Vec<f32> = (0..90)
            .flat_map(|r| {
                let mut p = vec![0.05f32; classes];
                if (70..75).contains(&r) {
                    p = vec![0.45, 0.1, 0.45];
                } else {
                    p[truth[r]] = 0.9;
                }
                p
            })
            .collect();
        let search = SuspectSearch::default();
        let doubted = doubted_by_adapter(&probabilities, &labels, classes, &search);
        assert_eq!(doubted.iter().map(|s| (s.row, s.suggested)).collect::<Vec<_>>(), [(5, 0), (40, 1)], "{doubted:?}");
        // Probabilities it cannot read judge nothing.
        let mut broken = probabilities.clone();
        broken[7] = f32::NAN;
        assert!(doubted_by_adapter(&broken, &labels, classes, &search).is_empty());
        assert!(doubted_by_adapter(&probabilities[1..], &labels, classes, &search).is_empty());
    }

    #[test]
    fn degenerate_inputs_find_nothing() {
        let search = SuspectSearch::default();
        assert!(find_suspects(&[], 4, &[], 2, &search).is_empty());
        assert!(find_suspects(&[1.0, 0.0], 2, &[0], 2, &search).is_empty(), "one sample has no neighbours");
        assert!(find_suspects(&[1.0; 6], 2, &[0, 1, 5], 2, &search).is_empty(), "a label out of range");
        assert!(find_suspects(&[1.0; 5], 2, &[0, 1, 1], 2, &search).is_empty(), "embeddings of the wrong size");
    }
}
