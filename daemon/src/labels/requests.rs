//! Label requests: which of the inputs a task serves would help most if someone labelled them.
//!
//! Serving offers every answered row ([`Requester::offer`]); what that costs is a look at the
//! row's scores and a random draw, under one lock, and the request's body is kept (shared, not
//! copied per row) only for the few rows that enter the pool. Each row gets a quick score:
//! - uncertainty: one minus the margin between the two best scores of the serving adapter;
//! - balance: how few labels the predicted class has, against the best-labelled class.
//!
//! The pool keeps the best [`POOL`] rows by that score (a request takes one, the rest wait;
//! a new serving adapter empties it), and one row drawn uniformly from those served since the
//! last request (reservoir sampling) for the random share. When the quotas
//! allow (per minute, hour and day, as labelling services limit them), the loop embeds the pool
//! with the base model and [`Requester::choose`] adds:
//! - novelty: how far the row lies from the nearest class of the task's labelled samples,
//!   measured in that class's own spread;
//! - diversity: a row as close as `min_distance` (cosine) to a recent request is never asked.
//!
//! With probability `random_share` the drawn row is asked instead, so the requests also measure
//! what the device sees, not only where the adapter is unsure.

use std::collections::VecDeque;

/// Rows kept per task between two requests.
pub const POOL: usize = 8;
/// Recent requests' embeddings a new one must differ from.
const RECENT: usize = 256;

/// How requests are chosen and how many may go out.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    pub uncertainty: f64,
    pub novelty: f64,
    pub balance: f64,
    pub random_share: f64,
    /// Cosine distance under which two inputs count as alike.
    pub min_distance: f64,
    pub per_minute: u32,
    pub per_hour: u32,
    pub per_day: u32,
}

/// A served row the pool keeps: its quick score and what it needs later.
#[derive(Debug, Clone)]
pub struct Candidate<I> {
    pub input: I,
    /// The row's scores under its serving adapter, hashed: the same input served again scores
    /// the same, and is not asked about twice.
    pub fingerprint: u64,
    /// The label serving answered (named when served: the adapter may change before it is asked).
    pub predicted: String,
    pub confidence: f32,
    pub uncertainty: f64,
    pub balance: f64,
    /// A uniform draw: while the base model serves, the pool keeps the rows with the highest
    /// (a uniform sample of what was served).
    pub key: f64,
}

/// The task's labelled samples as novelty and balance see them: per class, its label count and
/// (where it has embedded samples) its centroid and spread.
#[derive(Debug, Clone, Default)]
pub struct Labelled {
    pub labels: Vec<String>,
    pub counts: Vec<u64>,
    /// Per class: the mean embedding (unit length) and the mean cosine distance of the class's
    /// samples to it.
    pub centroids: Vec<Option<(Vec<f32>, f64)>>,
}

impl Labelled {
    /// Per-class centroids and spreads from embedded samples (`rows` of class indices).
    pub fn from_embeddings(labels: Vec<String>, counts: Vec<u64>, embeddings: &[(usize, &[f32])]) -> Labelled {
        let classes = labels.len();
        let dim = embeddings.first().map_or(0, |(_, e)| e.len());
        let mut sums = vec![vec![0f64; dim]; classes];
        let mut n = vec![0usize; classes];
        for (c, e) in embeddings.iter().filter(|(c, e)| *c < classes && e.len() == dim) {
            for (s, &x) in sums[*c].iter_mut().zip(unit(e).iter()) {
                *s += f64::from(x);
            }
            n[*c] += 1;
        }
        let mut centroids: Vec<Option<(Vec<f32>, f64)>> =
            sums.iter().zip(&n).map(|(s, &m)| (m > 0).then(|| (unit(&s.iter().map(|&x| (x / m as f64) as f32).collect::<Vec<_>>()), 0.0))).collect();
        for (c, e) in embeddings.iter().filter(|(c, e)| *c < classes && e.len() == dim) {
            if let Some((centre, spread)) = centroids[*c].as_mut() {
                *spread += cosine_distance(&unit(e), centre) / n[*c] as f64;
            }
        }
        Labelled { labels, counts, centroids }
    }

    /// How many labels `class` has against the best-labelled class: 1 for none, 0 for the most.
    fn balance(&self, class: usize) -> f64 {
        let most = self.counts.iter().copied().max().unwrap_or(0);
        if most == 0 {
            return 0.0;
        }
        1.0 - self.counts.get(class).copied().unwrap_or(0) as f64 / most as f64
    }

    /// How far `embedding` lies beyond the nearest class's spread, in spreads, capped at 1.
    fn novelty(&self, embedding: &[f32]) -> f64 {
        let point = unit(embedding);
        let nearest = self
            .centroids
            .iter()
            .flatten()
            .filter(|(c, _)| c.len() == point.len())
            .map(|(centre, spread)| cosine_distance(&point, centre) / spread.max(1e-6))
            .min_by(f64::total_cmp);
        nearest.map_or(0.0, |ratio| ((ratio - 1.0) / 2.0).clamp(0.0, 1.0))
    }
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 { v.iter().map(|x| x / norm).collect() } else { v.to_vec() }
}

/// 1 - cosine similarity of two unit vectors.
fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    1.0 - a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>()
}

/// A request to send: the candidate, why it was chosen, and its embedding (kept for diversity).
#[derive(Debug, Clone)]
pub struct Chosen<I> {
    pub candidate: Candidate<I>,
    pub strategy: &'static str,
}

/// One task's requester: the pool, the random draw, the quotas and the recent requests.
#[derive(Debug)]
pub struct Requester<I> {
    strategy: Strategy,
    labelled: Labelled,
    pool: Vec<Candidate<I>>,
    drawn: Option<Candidate<I>>,
    /// Rows offered since the last request (the random draw's denominator).
    offered: u64,
    sent_at_ms: VecDeque<i64>,
    recent: VecDeque<Vec<f32>>,
    rng: u64,
    /// The serving adapter the pool's scores came from: a new one makes them stale.
    serving_version: Option<u64>,
    /// Fingerprints of the rows asked about under this adapter (the newest [`RECENT`]).
    asked: VecDeque<u64>,
}

impl<I: Clone> Requester<I> {
    pub fn new(strategy: Strategy, seed: u64) -> Requester<I> {
        Requester {
            strategy,
            labelled: Labelled::default(),
            pool: Vec::new(),
            drawn: None,
            offered: 0,
            sent_at_ms: VecDeque::new(),
            recent: VecDeque::new(),
            rng: seed | 1,
            serving_version: None,
            asked: VecDeque::new(),
        }
    }

    pub fn set_strategy(&mut self, strategy: Strategy) {
        self.strategy = strategy;
    }

    pub fn set_labelled(&mut self, labelled: Labelled) {
        self.labelled = labelled;
    }

    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether the base model serves: its doubts about inputs of a domain it was never trained
    /// on are noise, and its predicted classes mostly wrong, so neither uncertainty nor balance
    /// can choose. Until an adapter serves, requests spread over what is served instead (a
    /// uniform pool; the candidate farthest from earlier requests and labelled classes), the
    /// cold-start choice that beat uncertainty on the label-count bench.
    fn cold(&self) -> bool {
        self.serving_version == Some(0)
    }

    fn quick_score(&self, c: &Candidate<I>) -> f64 {
        self.score(c.uncertainty, c.balance, c.key)
    }

    /// A row's place in the pool: its random key while the base model serves, else how unsure
    /// serving is of it and how few labels its predicted class has.
    fn score(&self, uncertainty: f64, balance: f64, key: f64) -> f64 {
        if self.cold() { key } else { self.strategy.uncertainty * uncertainty + self.strategy.balance * balance }
    }

    /// How far `embedding` lies from every earlier request and every labelled class's centre
    /// (cosine distance to the nearest; 1 with nothing to compare): k-center's greedy step.
    fn spread(&self, embedding: &[f32]) -> f64 {
        let point = unit(embedding);
        self.recent
            .iter()
            .chain(self.labelled.centroids.iter().flatten().map(|(c, _)| c))
            .filter(|c| c.len() == point.len())
            .map(|c| cosine_distance(&point, c))
            .fold(1.0, f64::min)
    }

    /// A served row with `scores` (probabilities in the task's label order) from the adapter
    /// version `serving`. `input` is called only when the row is kept. Cheap: a look at the
    /// scores, a comparison with the pool's weakest and a random draw. A new serving version
    /// empties the pool: what the old adapter was unsure of says little about the new one.
    pub fn offer(&mut self, serving: u64, scores: &[f32], labels: &[String], input: impl FnOnce() -> I) {
        if self.serving_version != Some(serving) {
            self.serving_version = Some(serving);
            self.pool.clear();
            self.drawn = None;
            self.offered = 0;
            self.asked.clear();
        }
        let fingerprint = fnv1a(scores.iter().map(|s| u64::from(s.to_bits())));
        if self.asked.contains(&fingerprint) || self.pool.iter().any(|c| c.fingerprint == fingerprint) {
            return;
        }
        self.offered += 1;
        let Some((predicted, top, second)) = top_two(scores) else { return };
        // The class in the order of the task's labelled samples (new labels: none yet).
        let class = self.labelled.labels.iter().position(|l| Some(l) == labels.get(predicted)).unwrap_or(usize::MAX);
        let balance = if class == usize::MAX { 1.0 } else { self.labelled.balance(class) };
        let (key, uncertainty) = (self.uniform(), 1.0 - f64::from(top - second));
        let candidate =
            |input| Candidate { input, fingerprint, predicted: labels.get(predicted).cloned().unwrap_or_default(), confidence: top, uncertainty, balance, key };
        let draw = self.uniform() * (self.offered as f64) < 1.0;
        let weakest = (self.pool.len() == POOL).then(|| self.pool.iter().map(|c| self.quick_score(c)).fold(f64::INFINITY, f64::min));
        let score = self.score(uncertainty, balance, key);
        let enters = weakest.is_none_or(|w| score > w);
        if !draw && !enters {
            return;
        }
        let kept = candidate(input());
        if draw {
            self.drawn = Some(kept.clone());
        }
        if enters {
            if self.pool.len() == POOL
                && let Some(at) = self.pool.iter().enumerate().min_by(|a, b| self.quick_score(a.1).total_cmp(&self.quick_score(b.1))).map(|(i, _)| i)
            {
                self.pool.swap_remove(at);
            }
            self.pool.push(kept);
        }
    }

    /// Whether the quotas allow a request at `now_ms`.
    pub fn may_send(&self, now_ms: i64) -> bool {
        let since = |ms: i64| self.sent_at_ms.iter().filter(|&&t| t > now_ms - ms).count() as u64;
        since(60_000) < u64::from(self.strategy.per_minute)
            && since(3_600_000) < u64::from(self.strategy.per_hour)
            && since(86_400_000) < u64::from(self.strategy.per_day)
    }

    /// Whether there is anything to choose from.
    pub fn has_candidates(&self) -> bool {
        !self.pool.is_empty() || self.drawn.is_some()
    }

    /// The candidates to embed before choosing: the pool, then the drawn row.
    pub fn candidates(&self) -> Vec<&Candidate<I>> {
        self.pool.iter().chain(&self.drawn).collect()
    }

    /// Choose the request to send now from the candidates, given their embeddings (in
    /// [`Requester::candidates`] order; None where one could not be embedded). The chosen row
    /// leaves the pool, the rest stay; the random draw starts over. None when the quotas say no,
    /// or every candidate is too like a recent request.
    pub fn choose(&mut self, now_ms: i64, embeddings: &[Option<Vec<f32>>]) -> Option<Chosen<I>> {
        if !self.may_send(now_ms) {
            return None;
        }
        let pool = std::mem::take(&mut self.pool);
        // The drawn row stays for a later random request until it is asked (or is like one
        // asked): when several requests go out between two served rows, the random share would
        // otherwise fall to the first of them alone.
        let drawn = self.drawn.take();
        self.offered = 0;
        let random = self.uniform() < self.strategy.random_share;
        let embedding_of = |i: usize| embeddings.get(i).cloned().flatten();
        let min_distance = self.strategy.min_distance;
        let alike = |e: &Option<Vec<f32>>, recent: &VecDeque<Vec<f32>>| {
            e.as_ref().is_some_and(|e| {
                let e = unit(e);
                recent.iter().any(|r| r.len() == e.len() && cosine_distance(&e, r) < min_distance)
            })
        };
        // Candidates as good as asked already (alike a recent request) leave the pool for good.
        let alike_rows: Vec<bool> = (0..pool.len()).map(|i| alike(&embedding_of(i), &self.recent)).collect();
        let drawn_alike = alike(&embedding_of(pool.len()), &self.recent);
        let chosen = match (random, &drawn) {
            (true, Some(d)) if !drawn_alike => Some((None, d.clone(), embedding_of(pool.len()), "random")),
            _ if self.cold() => pool
                .iter()
                .enumerate()
                .filter(|(i, _)| !alike_rows[*i])
                .map(|(i, c)| (i, embedding_of(i).map_or(0.0, |e| self.spread(&e)), c.key))
                .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)))
                .map(|(i, _, _)| (Some(i), pool[i].clone(), embedding_of(i), "diversity")),
            _ => pool
                .iter()
                .enumerate()
                .filter(|(i, _)| !alike_rows[*i])
                .map(|(i, c)| {
                    let novelty = embedding_of(i).map_or(0.0, |e| self.labelled.novelty(&e));
                    (i, self.quick_score(c) + self.strategy.novelty * novelty, novelty)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _, novelty)| {
                    let c = pool[i].clone();
                    // Named by what weighed most in its score.
                    let parts = [
                        (self.strategy.uncertainty * c.uncertainty, "uncertainty"),
                        (self.strategy.novelty * novelty, "novelty"),
                        (self.strategy.balance * c.balance, "balance"),
                    ];
                    let strategy = parts.iter().max_by(|a, b| a.0.total_cmp(&b.0)).map_or("uncertainty", |p| p.1);
                    (Some(i), c, embedding_of(i), strategy)
                }),
        };
        // The rest of the pool stays for the next request: still unsure, still unanswered.
        let taken = chosen.as_ref().and_then(|c| c.0);
        self.pool = pool.into_iter().enumerate().filter(|(i, _)| !alike_rows[*i] && Some(*i) != taken).map(|(_, c)| c).collect();
        let drawn_asked = chosen.as_ref().is_some_and(|c| c.0.is_none() || drawn.as_ref().is_some_and(|d| d.fingerprint == c.1.fingerprint));
        if !drawn_asked && !drawn_alike {
            self.drawn = drawn;
        }
        let (_, candidate, embedding, strategy) = chosen?;
        if self.asked.len() == RECENT {
            self.asked.pop_front();
        }
        self.asked.push_back(candidate.fingerprint);
        self.sent_at_ms.push_back(now_ms);
        while self.sent_at_ms.front().is_some_and(|&t| t <= now_ms - 86_400_000) {
            self.sent_at_ms.pop_front();
        }
        if let Some(e) = embedding {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(unit(&e));
        }
        Some(Chosen { candidate, strategy })
    }
}

/// FNV-1a over `words`: a fixed hash (the same on every device and run).
pub(crate) fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, w| (h ^ w).wrapping_mul(0x100_0000_01b3))
}

/// The index of the best score, the best and the second best.
fn top_two(scores: &[f32]) -> Option<(usize, f32, f32)> {
    let (mut best, mut top, mut second) = (None, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &s) in scores.iter().enumerate() {
        if s > top {
            second = top;
            top = s;
            best = Some(i);
        } else if s > second {
            second = s;
        }
    }
    let second = if second.is_finite() { second } else { 0.0 };
    best.map(|b| (b, top, second))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategy() -> Strategy {
        Strategy { uncertainty: 1.0, novelty: 0.5, balance: 0.5, random_share: 0.0, min_distance: 0.05, per_minute: 3, per_hour: 5, per_day: 100 }
    }

    fn labels() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn the_least_sure_rows_are_asked_first_within_the_quotas() {
        let mut r: Requester<u32> = Requester::new(strategy(), 7);
        r.set_labelled(Labelled { labels: labels(), counts: vec![10, 10, 10], centroids: vec![None, None, None] });
        let mut kept = 0;
        for i in 0..100u32 {
            // Rows 0 and 50 are the least sure (each input scores a little apart from the others).
            let margin = (i % 50) as f32 / 100.0;
            let top = 0.5 + margin / 2.0 + i as f32 * 1e-6;
            r.offer(1, &[top, 1.0 - top, 0.0], &labels(), || {
                kept += 1;
                i
            });
        }
        assert!(kept < 40, "the body of most rows is never kept: {kept}");
        let mut asked = Vec::new();
        let mut now = 0;
        while let Some(c) = r.choose(now, &vec![None; r.candidates().len()]) {
            asked.push((c.candidate.input, c.strategy));
            now += 1000;
        }
        assert_eq!(asked.len(), 3, "three a minute: {asked:?}");
        assert!(asked.iter().take(2).all(|(i, _)| i % 50 == 0), "the least sure first: {asked:?}");
        assert_eq!(asked[0].1, "uncertainty");
        assert!(!r.may_send(59_000) && r.has_candidates(), "the rest of the pool waits for the quota");
        // A minute on, the per-hour quota (5) allows two more, then none for the rest of the hour.
        for i in 0..20u32 {
            r.offer(1, &[0.5, 0.5 - i as f32 * 1e-6, 0.0], &labels(), || i);
        }
        let mut more = 0;
        for t in [61_000, 62_000, 63_000, 64_000] {
            more += usize::from(r.choose(t, &vec![None; r.candidates().len()]).is_some());
        }
        assert_eq!(more, 2);
        assert!(!r.may_send(3_500_000) && r.may_send(3_700_000));
    }

    #[test]
    fn a_row_like_a_recent_request_is_not_asked_again_and_novel_rows_win() {
        let mut r: Requester<&str> = Requester::new(Strategy { per_minute: 100, ..strategy() }, 7);
        let centre = |v: [f32; 2]| Some((unit(&v), 0.01));
        r.set_labelled(Labelled { labels: labels(), counts: vec![5, 5, 5], centroids: vec![centre([1.0, 0.0]), centre([0.0, 1.0]), None] });
        r.offer(1, &[0.9, 0.1, 0.0], &labels(), || "near a");
        r.offer(1, &[0.9, 0.1, 1e-7], &labels(), || "between");
        let first = r.choose(0, &[Some(vec![1.0, 0.01]), Some(vec![1.0, 1.0])]).unwrap();
        assert_eq!((first.candidate.input, first.strategy), ("between", "novelty"), "equally unsure: the one far from every class");
        r.offer(1, &[0.9, 0.1, 2e-7], &labels(), || "between again");
        let next = r.choose(1, &[Some(vec![1.0, 0.01]), Some(vec![1.0, 0.999])]).unwrap();
        assert_eq!(next.candidate.input, "near a", "the novel one is as good as asked already");
        assert!(r.choose(2, &[Some(vec![1.0, 0.999])]).is_none(), "nothing left but a row like a recent request");
        assert!(!r.has_candidates(), "which leaves the pool for good");
    }

    #[test]
    fn an_input_served_again_is_not_asked_about_again() {
        let mut r: Requester<u32> = Requester::new(Strategy { per_minute: 100, ..strategy() }, 7);
        let mut kept = Vec::new();
        r.offer(1, &[0.5, 0.5, 0.0], &labels(), || {
            kept.push(1);
            1
        });
        r.offer(1, &[0.5, 0.5, 0.0], &labels(), || {
            kept.push(2);
            2
        });
        assert_eq!(kept, [1], "the same scores twice: one input, kept once");
        assert_eq!(r.choose(0, &[None]).unwrap().candidate.input, 1);
        r.offer(1, &[0.5, 0.5, 0.0], &labels(), || 3);
        assert!(!r.has_candidates(), "asked already");
        r.offer(1, &[0.55, 0.45, 0.0], &labels(), || 4);
        assert_eq!(r.choose(1, &[None]).unwrap().candidate.input, 4);
    }

    #[test]
    fn a_new_serving_adapter_empties_the_pool() {
        let mut r: Requester<&str> = Requester::new(strategy(), 7);
        r.offer(1, &[0.5, 0.5, 0.0], &labels(), || "unsure under v1");
        assert!(r.has_candidates());
        r.offer(2, &[0.99, 0.01, 0.0], &labels(), || "sure under v2");
        let asked = r.choose(0, &[None, None]).unwrap();
        assert_eq!(asked.candidate.input, "sure under v2", "v1's doubts went with v1");
    }

    #[test]
    fn classes_with_few_labels_and_new_labels_weigh_more() {
        let mut r: Requester<&str> = Requester::new(Strategy { uncertainty: 0.0, ..strategy() }, 7);
        r.set_labelled(Labelled { labels: vec!["a".into(), "b".into()], counts: vec![100, 10], centroids: vec![None, None] });
        let three = vec!["a".to_string(), "b".to_string(), "new".to_string()];
        r.offer(1, &[0.9, 0.1, 0.0], &three, || "a");
        r.offer(1, &[0.1, 0.9, 0.0], &three, || "b");
        assert_eq!(r.choose(0, &[None, None]).unwrap().candidate.input, "b");
        r.offer(1, &[0.1, 0.1, 0.8], &three, || "new");
        r.offer(1, &[0.1, 0.9, 0.0], &three, || "b");
        assert_eq!(r.choose(1, &[None, None]).unwrap().candidate.input, "new", "a label with no samples yet");
    }

    #[test]
    fn the_random_share_asks_rows_drawn_uniformly_from_everything_served() {
        let mut r: Requester<u32> = Requester::new(Strategy { random_share: 1.0, per_minute: 1000, per_hour: 1000, per_day: 1000, ..strategy() }, 11);
        r.set_labelled(Labelled { labels: labels(), counts: vec![1, 1, 1], centroids: vec![None, None, None] });
        let mut seen = [0u32; 4];
        for round in 0..400 {
            for i in 0..4u32 {
                // Row 3 is always the least sure; the draw ignores that.
                let top = if i == 3 { 0.4 } else { 0.99 };
                r.offer(1, &[top, 1.0 - top, (round as u32 * 4 + i) as f32 * 1e-9], &labels(), || i);
            }
            let c = r.choose(round * 1000, &vec![None; r.candidates().len()]).unwrap();
            assert_eq!(c.strategy, "random");
            seen[c.candidate.input as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (60..=140).contains(&n)), "uniform over the rows served: {seen:?}");
    }

    #[test]
    fn while_the_base_model_serves_requests_spread_over_what_is_served() {
        let mut r: Requester<u32> = Requester::new(Strategy { per_minute: 1000, per_hour: 1000, per_day: 1000, ..strategy() }, 5);
        r.set_labelled(Labelled { labels: labels(), counts: vec![3, 0, 0], centroids: vec![Some((unit(&[1.0, 0.0, 0.0]), 0.1)), None, None] });
        // Under the base model (version 0) the pool is a uniform sample: the least sure rows
        // (the first ten) do not crowd it out.
        let mut kept = [0u32; 2];
        for round in 0..200u32 {
            for i in 0..40u32 {
                let top = if i < 10 { 0.34 } else { 0.99 };
                r.offer(0, &[top, 1.0 - top, (round * 40 + i) as f32 * 1e-9], &labels(), || i);
            }
            for c in r.candidates() {
                kept[usize::from(c.input >= 10)] += 1;
            }
            while r.choose(i64::from(round) * 1_000_000, &vec![None; r.candidates().len()]).is_some() {}
        }
        let share = f64::from(kept[0]) / f64::from(kept[0] + kept[1]);
        assert!((0.15..=0.35).contains(&share), "a quarter of the rows are unsure, and about a quarter of the pool: {share} ({kept:?})");
        // The candidate farthest from the labelled class and from what was asked wins, whatever
        // its scores: first the one away from class a's centre, then the one away from that request.
        let mut r: Requester<&str> = Requester::new(Strategy { per_minute: 1000, ..strategy() }, 5);
        r.set_labelled(Labelled { labels: labels(), counts: vec![3, 0, 0], centroids: vec![Some((unit(&[1.0, 0.0, 0.0]), 0.1)), None, None] });
        r.offer(0, &[0.34, 0.33, 0.33], &labels(), || "unsure, near a");
        r.offer(0, &[0.99, 0.01, 0.0], &labels(), || "sure, far from a");
        let first = r.choose(0, &[Some(vec![1.0, 0.1, 0.0]), Some(vec![0.0, 1.0, 0.0])]).unwrap();
        assert_eq!((first.candidate.input, first.strategy), ("sure, far from a", "diversity"));
        r.offer(0, &[0.98, 0.02, 0.0], &labels(), || "like the last request");
        r.offer(0, &[0.97, 0.03, 0.0], &labels(), || "away from both");
        let next = r.choose(1, &[Some(vec![1.0, 0.1, 0.0]), Some(vec![0.1, 1.0, 0.0]), Some(vec![0.0, 0.0, 1.0])]).unwrap();
        assert_eq!(next.candidate.input, "away from both");
        // Once an adapter serves, its doubts choose again.
        r.offer(1, &[0.34, 0.33, 0.33], &labels(), || "unsure under v1");
        r.offer(1, &[0.99, 0.01, 0.0], &labels(), || "sure under v1");
        let adapted = r.choose(2, &[Some(vec![0.6, -0.6, 0.5]), Some(vec![-0.6, 0.6, 0.5])]).unwrap();
        assert_eq!((adapted.candidate.input, adapted.strategy), ("unsure under v1", "uncertainty"));
    }

    #[test]
    fn the_drawn_row_waits_for_a_random_request_when_several_go_out_between_served_rows() {
        // Rows are served in bursts and requests go out in bursts (a tick's worth): the drawn row
        // is kept until a random request takes it, so the random share does not fall to the
        // first request after each burst alone.
        let mut r: Requester<u32> = Requester::new(Strategy { random_share: 0.3, per_minute: 100_000, per_hour: 100_000, per_day: 100_000, ..strategy() }, 3);
        r.set_labelled(Labelled { labels: labels(), counts: vec![1, 1, 1], centroids: vec![None, None, None] });
        let (mut random, mut sent) = (0, 0);
        for burst in 0..50u32 {
            for i in 0..8u32 {
                let top = 0.5 + (i as f32) * 0.05;
                r.offer(1, &[top, 1.0 - top, (burst * 8 + i) as f32 * 1e-9], &labels(), || burst * 8 + i);
            }
            for k in 0..4 {
                if let Some(c) = r.choose(i64::from(burst * 4 + k), &vec![None; r.candidates().len()]) {
                    sent += 1;
                    random += usize::from(c.strategy == "random");
                }
            }
        }
        assert!(sent >= 150, "{sent}");
        // At most one random request per burst, a burst asking for one with probability
        // 1 - 0.7^4 = 0.76: about 38 of 50 bursts.
        assert!((25..=50).contains(&random), "random requests {random} of {sent}");
    }

    #[test]
    fn centroids_and_spreads_come_from_the_labelled_embeddings() {
        let rows: Vec<(usize, Vec<f32>)> = vec![(0, vec![1.0, 0.1]), (0, vec![1.0, -0.1]), (1, vec![0.0, 1.0])];
        let refs: Vec<(usize, &[f32])> = rows.iter().map(|(c, e)| (*c, e.as_slice())).collect();
        let l = Labelled::from_embeddings(vec!["a".into(), "b".into(), "c".into()], vec![2, 1, 0], &refs);
        let (centre, spread) = l.centroids[0].clone().unwrap();
        assert!((centre[0] - 1.0).abs() < 1e-6 && centre[1].abs() < 1e-6 && spread > 0.0);
        assert!(l.centroids[2].is_none());
        assert_eq!(l.novelty(&[1.0, 0.0]), 0.0, "at a class centre");
        assert!(l.novelty(&[-1.0, -1.0]) > 0.9, "far from every class");
        assert_eq!((l.balance(0), l.balance(1), l.balance(2)), (0.0, 0.5, 1.0));
    }
}
