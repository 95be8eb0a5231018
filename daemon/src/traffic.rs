//! How much of a device's traffic still looks like the bundle's base domain.
//!
//! Forgetting the base domain only costs a device what it still sees of it. The gate's
//! retention bound therefore follows the traffic: [`TrafficLog`] keeps the inputs of the latest
//! requests per task, [`BaseDomainDetector`] says which of them look like the bundle's retention
//! set (the base domain), and [`allowed_retention_drop`] turns that share into the bound.
//!
//! The detector needs no labels of the traffic. An input counts as base-like when its base-model
//! embedding is as close to a retention embedding as held-out retention samples are to theirs
//! (the 95th percentile of their nearest-neighbour distances), and, for small dense inputs such
//! as sensor frames, its raw values are too: an embedding trained to classify can map a shifted
//! input close to some base-domain class (a sideways 1 near an upright 7), the input itself
//! cannot hide the shift. The share is the traffic's base-like rate divided by the retention
//! set's own held-out rate, so traffic made entirely of base-domain inputs reads 1; it is read
//! at the median distance too and the smaller reading kept, since a shift close to the base
//! domain (blur) lands inside the outer radius but seldom inside the inner one.
//!
//! [`BaseRouter`] uses the same idea per row, for serving: an adapter the gate found forgetting
//! a base domain the device still sees may serve with base-like rows answered by the base model.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use adaptd_adapters::bundle::RetentionSet;
use adaptd_adapters::tensor::HostTensor;
use serde::{Deserialize, Serialize};

/// Inputs kept per task: enough for a share to within a few points.
pub const TRAFFIC_ROWS: usize = 256;
/// Fewer recent requests than this: the estimate uses the task's latest samples' inputs instead.
pub const MIN_TRAFFIC_ROWS: usize = 32;
/// Inputs up to this many values are also compared as they are (sensor frames, small images).
const MAX_RAW_VALUES: usize = 4096;
const PERCENTILE: f64 = 0.95;

/// The latest request inputs per task, one row each (a tensor per model input, batch of 1).
#[derive(Debug, Default)]
pub struct TrafficLog {
    rows: Mutex<BTreeMap<String, VecDeque<Vec<HostTensor>>>>,
    requests: std::sync::atomic::AtomicU64,
}

/// One request in this many is kept: the window then spans the last ~1,000 requests, and
/// serving copies a request's inputs only that often.
const KEEP_ONE_IN: u64 = 4;
/// Rows kept of one request, evenly spread: a bulk request (an operator's audit, a batch
/// evaluation) counts as a few inputs, so it cannot swamp what the device's cameras send.
const ROWS_PER_REQUEST: usize = 8;

impl TrafficLog {
    /// Whether to keep the next request's inputs.
    pub fn sample(&self) -> bool {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(KEEP_ONE_IN)
    }

    /// Keep the rows of a request `task` answered (oldest rows leave first).
    pub fn record(&self, task: &str, inputs: &[HostTensor]) {
        let Some(rows) = inputs.first().and_then(|t| t.shape.first()).copied() else { return };
        let mut all = self.rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = all.entry(task.to_string()).or_default();
        let kept_rows = rows.min(ROWS_PER_REQUEST);
        for r in (0..kept_rows).map(|i| i * rows / kept_rows) {
            if kept.len() == TRAFFIC_ROWS {
                kept.pop_front();
            }
            kept.push_back(inputs.iter().map(|t| t.rows(r, r + 1)).collect());
        }
    }

    /// The rows kept for `task`, oldest first.
    pub fn rows(&self, task: &str) -> Vec<Vec<HostTensor>> {
        self.rows.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(task).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }
}

/// Which inputs look like the base domain, learnt from the bundle's retention set.
#[derive(Debug, Clone)]
pub struct BaseDomainDetector {
    reference_embeddings: Vec<Vec<f32>>,
    /// Per level of [`LEVELS`]: the nearest-neighbour distance that share of held-out retention
    /// rows stay within.
    embedding_radii: Vec<f32>,
    /// Raw inputs of the reference half and their radii, for small dense inputs.
    raw: Option<(Vec<Vec<f32>>, Vec<f32>)>,
    /// Per level: the held-out half's own base-like rate, what traffic of base-domain inputs reads.
    base_rates: Vec<f64>,
}

/// Base-domain inputs sit as close to the reference at every level (half of them within the
/// median distance, 95 % within the 95th percentile); a shift near the base domain (blur) fills
/// the outer band but not the inner one, so its share is the smallest level's reading.
const LEVELS: [f64; 2] = [0.5, PERCENTILE];

/// An input as the detector sees it: its base-model embedding, and its raw values when small.
#[derive(Debug, Clone)]
pub struct Observed {
    pub embedding: Vec<f32>,
    pub raw: Option<Vec<f32>>,
}

impl Observed {
    /// `raw` is kept only for a single dense f32 input of at most a few thousand values.
    pub fn new(embedding: Vec<f32>, input: &[HostTensor]) -> Observed {
        let raw = match input {
            [only] if only.len() <= MAX_RAW_VALUES => only.as_f32().map(<[f32]>::to_vec),
            _ => None,
        };
        Observed { embedding, raw }
    }
}

/// The smallest squared distance from `x` to any of `rows`; stops early once one is within
/// `enough` (a row's sum stops as soon as it passes the best so far).
fn nearest_sq<'r>(x: &[f32], rows: impl IntoIterator<Item = &'r [f32]>, enough: f32) -> f32 {
    let mut best = f32::INFINITY;
    for r in rows {
        let mut d = 0.0f32;
        for (a, b) in x.iter().zip(r) {
            d += (a - b) * (a - b);
            if d >= best {
                break;
            }
        }
        best = best.min(d);
        if best <= enough {
            break;
        }
    }
    best
}

fn nearest(x: &[f32], reference: &[Vec<f32>]) -> f32 {
    nearest_sq(x, reference.iter().map(Vec::as_slice), f32::NEG_INFINITY).sqrt()
}

fn percentile(mut values: Vec<f32>, q: f64) -> f32 {
    values.sort_by(f32::total_cmp);
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values.get(i).copied().unwrap_or(f32::INFINITY)
}

impl BaseDomainDetector {
    /// From the retention set observed through the base model: even rows are the reference,
    /// odd rows calibrate the radii and the base rate. None with fewer than 8 rows.
    pub fn from_retention(retention: &[Observed]) -> Option<BaseDomainDetector> {
        if retention.len() < 8 {
            return None;
        }
        let (reference, held_out): (Vec<&Observed>, Vec<&Observed>) = retention.iter().enumerate().fold((Vec::new(), Vec::new()), |(mut r, mut h), (i, o)| {
            if i % 2 == 0 {
                r.push(o)
            } else {
                h.push(o)
            }
            (r, h)
        });
        let radii = |distances: Vec<f32>| LEVELS.iter().map(|&q| percentile(distances.clone(), q)).collect::<Vec<f32>>();
        let reference_embeddings: Vec<Vec<f32>> = reference.iter().map(|o| o.embedding.clone()).collect();
        let embedding_radii = radii(held_out.iter().map(|o| nearest(&o.embedding, &reference_embeddings)).collect());
        let raw = reference.iter().map(|o| o.raw.clone()).collect::<Option<Vec<Vec<f32>>>>().and_then(|raw_ref| {
            let distances: Option<Vec<f32>> = held_out.iter().map(|o| o.raw.as_ref().map(|x| nearest(x, &raw_ref))).collect();
            distances.map(|d| (raw_ref, radii(d)))
        });
        let mut detector = BaseDomainDetector { reference_embeddings, embedding_radii, raw, base_rates: vec![1.0; LEVELS.len()] };
        let held: Vec<Observed> = held_out.into_iter().cloned().collect();
        detector.base_rates = detector.base_like_rates(&held).into_iter().map(|r| r.max(1e-6)).collect();
        Some(detector)
    }

    /// Per level, the share of `traffic` within that level's radii (embedding and raw).
    fn base_like_rates(&self, traffic: &[Observed]) -> Vec<f64> {
        let mut within = vec![0usize; LEVELS.len()];
        for o in traffic {
            let embedding = nearest(&o.embedding, &self.reference_embeddings);
            let raw = match (&self.raw, &o.raw) {
                (Some((reference, _)), Some(x)) => Some(nearest(x, reference)),
                _ => None,
            };
            for (level, count) in within.iter_mut().enumerate() {
                let raw_close = match (&self.raw, raw) {
                    (Some((_, radii)), Some(d)) => d <= radii[level],
                    _ => true,
                };
                if embedding <= self.embedding_radii[level] && raw_close {
                    *count += 1;
                }
            }
        }
        within.into_iter().map(|c| if traffic.is_empty() { 0.0 } else { c as f64 / traffic.len() as f64 }).collect()
    }

    /// The share of `traffic` that is base-domain input, in [0, 1]: the smallest of the levels'
    /// rates, each against what base-domain traffic reads at that level.
    pub fn share(&self, traffic: &[Observed]) -> f64 {
        self.base_like_rates(traffic).iter().zip(&self.base_rates).map(|(rate, base)| rate / base).fold(1.0f64, f64::min).clamp(0.0, 1.0)
    }
}

/// Answers base-domain inputs with the base model: a device that still sees the base domain
/// (a third of its cameras upright) keeps the base model's accuracy there, and the adapter
/// serves only what moved. Decided per row from the raw input alone (no model pass): small
/// dense inputs only, against the even rows of the bundle's retention set, within the 95th
/// percentile of their leave-one-out nearest-neighbour distances. The odd rows stay unseen: the
/// gate checks forgetting on them, so a routed candidate is not measured on its calibration.
#[derive(Debug)]
pub struct BaseRouter {
    reference: Vec<f32>,
    width: usize,
    radius_sq: f32,
}

impl BaseRouter {
    /// None when the bundle's input is not a single small dense f32 tensor, or the retention
    /// set has fewer than 8 rows.
    pub fn from_retention(retention: &RetentionSet) -> Option<BaseRouter> {
        let [input] = retention.inputs.as_slice() else { return None };
        let rows = retention.len();
        let values = input.as_f32()?;
        if rows < 8 || values.len() % rows != 0 || values.len() / rows > MAX_RAW_VALUES {
            return None;
        }
        let width = values.len() / rows;
        let row = |i: usize| &values[i * width..(i + 1) * width];
        let reference: Vec<f32> = (0..rows).step_by(2).flat_map(|i| row(i).iter().copied()).collect();
        let references = reference.len() / width;
        let leave_one_out: Vec<f32> = (0..references)
            .map(|i| {
                let others = reference.chunks_exact(width).enumerate().filter(|&(j, _)| j != i).map(|(_, r)| r);
                nearest_sq(&reference[i * width..(i + 1) * width], others, f32::NEG_INFINITY)
            })
            .collect();
        Some(BaseRouter { reference, width, radius_sq: percentile(leave_one_out, PERCENTILE) })
    }

    /// For each row of `inputs`, whether it looks like the base domain; None when the inputs are
    /// not the single dense tensor the router was built for.
    pub fn base_like_rows(&self, inputs: &[HostTensor]) -> Option<Vec<bool>> {
        let [input] = inputs else { return None };
        let values = input.as_f32()?;
        let rows = *input.shape.first()?;
        if rows == 0 || values.len() != rows * self.width {
            return None;
        }
        Some(values.chunks_exact(self.width).map(|x| nearest_sq(x, self.reference.chunks_exact(self.width), self.radius_sq) <= self.radius_sq).collect())
    }
}

/// Whose forgetting the retention check guards against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionPolicy {
    /// The base domain as far as the device's traffic still shows it (the default).
    Traffic,
    /// The base domain always, whatever the traffic (a device that must keep it).
    Base,
    /// No retention check.
    Off,
}

/// How far base-domain accuracy may fall. The whole bound (`max_drop`) holds while at least
/// `min_share` of the traffic is base-domain input, since whatever the device still sees of the
/// base domain it must keep serving; below that it loosens linearly, to no bound at all when the
/// traffic holds none: forgetting what nobody sends costs nothing, and refusing it would keep a
/// device whose inputs moved on a model that no longer fits them.
pub fn allowed_retention_drop(policy: RetentionPolicy, max_drop: f64, min_share: f64, share: Option<f64>) -> Option<f64> {
    match (policy, share) {
        (RetentionPolicy::Off, _) => None,
        (RetentionPolicy::Base, _) | (RetentionPolicy::Traffic, None) => Some(max_drop),
        (RetentionPolicy::Traffic, Some(s)) if s >= min_share || min_share <= 0.0 => Some(max_drop),
        (RetentionPolicy::Traffic, Some(s)) => Some(max_drop + (1.0 - max_drop) * (1.0 - s / min_share)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaptd_adapters::tensor::SeededRng;

    fn cloud(rng: &mut SeededRng, centre: f32, n: usize, dim: usize) -> Vec<Observed> {
        (0..n)
            .map(|_| {
                let v: Vec<f32> = rng.normal_vec(dim, 0.3).into_iter().map(|x| x + centre).collect();
                Observed { embedding: v.clone(), raw: Some(v) }
            })
            .collect()
    }

    #[test]
    fn the_share_of_base_like_traffic_is_measured_without_labels() {
        let mut rng = SeededRng::new(3);
        let detector = BaseDomainDetector::from_retention(&cloud(&mut rng, 0.0, 200, 8)).unwrap();
        let base = cloud(&mut rng, 0.0, 300, 8);
        let moved = cloud(&mut rng, 3.0, 300, 8);
        assert!(detector.share(&base) > 0.9, "{}", detector.share(&base));
        assert!(detector.share(&moved) < 0.02, "{}", detector.share(&moved));
        let mixed: Vec<Observed> = base[..100].iter().chain(&moved[..200]).cloned().collect();
        assert!((detector.share(&mixed) - 1.0 / 3.0).abs() < 0.08, "{}", detector.share(&mixed));
        // Close in the embedding, far in the raw input: the input decides.
        let disguised: Vec<Observed> = base.iter().zip(&moved).map(|(b, m)| Observed { embedding: b.embedding.clone(), raw: m.raw.clone() }).collect();
        assert!(detector.share(&disguised) < 0.02);
        // Near the base domain without being it (blur): inside the outer radius, not the inner one.
        let near: Vec<Observed> = base
            .iter()
            .map(|o| {
                let v: Vec<f32> = o.embedding.iter().zip(rng.normal_vec(8, 0.25)).map(|(x, n)| x + n).collect();
                Observed { embedding: v.clone(), raw: Some(v) }
            })
            .collect();
        let outer = detector.base_like_rates(&near)[1] / detector.base_rates[1];
        assert!(outer > 0.6 && detector.share(&near) < outer - 0.2, "outer {outer}, share {}", detector.share(&near));
        assert!(BaseDomainDetector::from_retention(&base[..4]).is_none());
    }

    #[test]
    fn the_router_sends_base_like_rows_to_the_base_model_and_the_rest_to_the_adapter() {
        let mut rng = SeededRng::new(5);
        let dim = 16;
        let rows = |rng: &mut SeededRng, centre: f32, n: usize| -> Vec<f32> { rng.normal_vec(n * dim, 0.3).into_iter().map(|x| x + centre).collect() };
        let retention = RetentionSet { inputs: vec![HostTensor::f32(vec![200, 1, 4, 4], rows(&mut rng, 0.0, 200)).unwrap()], labels: vec![0; 200] };
        let router = BaseRouter::from_retention(&retention).unwrap();
        let base = HostTensor::f32(vec![300, 1, 4, 4], rows(&mut rng, 0.0, 300)).unwrap();
        let moved = HostTensor::f32(vec![300, 1, 4, 4], rows(&mut rng, 3.0, 300)).unwrap();
        let rate = |t: HostTensor| router.base_like_rows(&[t]).unwrap().iter().filter(|&&b| b).count() as f64 / 300.0;
        assert!(rate(base) > 0.88, "held-out base rows go to the base model");
        assert_eq!(rate(moved), 0.0, "moved rows go to the adapter");
        assert!(router.base_like_rows(&[HostTensor::f32(vec![1, 3], vec![0.0; 3]).unwrap()]).is_none(), "another width is not routed");
        let text = RetentionSet { inputs: vec![HostTensor::i64(vec![8, 4], vec![1; 32]).unwrap()], labels: vec![0; 8] };
        assert!(BaseRouter::from_retention(&text).is_none(), "token ids are not routed by their values");
    }

    #[test]
    fn the_bound_holds_while_the_base_domain_is_seen_and_fades_when_it_is_not() {
        let allowed = |share| allowed_retention_drop(RetentionPolicy::Traffic, 0.02, 0.1, share);
        assert_eq!(allowed(Some(1.0)), Some(0.02));
        assert_eq!(allowed(Some(0.33)), Some(0.02), "a mixed device keeps the whole bound");
        assert_eq!(allowed(Some(0.1)), Some(0.02));
        assert!((allowed(Some(0.05)).unwrap() - 0.51).abs() < 1e-9);
        assert_eq!(allowed(Some(0.0)), Some(1.0), "inputs that fully moved may forget the base domain");
        assert_eq!(allowed(None), Some(0.02), "no estimate: the whole bound");
        assert_eq!(allowed_retention_drop(RetentionPolicy::Base, 0.02, 0.1, Some(0.0)), Some(0.02));
        assert_eq!(allowed_retention_drop(RetentionPolicy::Off, 0.02, 0.1, Some(1.0)), None);
    }

    #[test]
    fn the_log_keeps_the_latest_rows_per_task() {
        let log = TrafficLog::default();
        for i in 0..(TRAFFIC_ROWS + 10) {
            log.record("sorter", &[HostTensor::f32(vec![1, 2], vec![i as f32, 0.0]).unwrap()]);
        }
        log.record("other", &[HostTensor::f32(vec![3, 2], vec![0.0; 6]).unwrap()]);
        let rows = log.rows("sorter");
        assert_eq!(rows.len(), TRAFFIC_ROWS);
        assert_eq!(rows[0][0].as_f32().unwrap()[0], 10.0);
        assert_eq!(log.rows("other").len(), 3);
        assert!(log.rows("nobody").is_empty());
        // A bulk request counts as a few inputs, spread over it.
        log.record("audit", &[HostTensor::f32(vec![100, 1], (0..100).map(|i| i as f32).collect()).unwrap()]);
        let firsts: Vec<f32> = log.rows("audit").iter().map(|r| r[0].as_f32().unwrap()[0]).collect();
        assert_eq!(firsts, vec![0.0, 12.0, 25.0, 37.0, 50.0, 62.0, 75.0, 87.0]);
    }
}
