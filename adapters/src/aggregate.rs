//! Fleet learning's arithmetic: several devices' adapters, trained from the same parent on the same
//! base, combined into one. Pure host math (f64 inside, f32 out); no runtime, no I/O.
//!
//! LoRA, per module: the weighted sum of the devices' updates `ΔW = Σ pᵢ (αᵢ/rᵢ) BᵢAᵢ`, written
//! back as factors by one of PEFT's rules (`add_weighted_adapter`):
//! - `cat`: exact, by stacking the factors (rank `Σ rᵢ`, alpha = rank);
//! - `svd`: the sum truncated to a rank by its singular value decomposition (alpha = rank), with
//!   the relative residual `‖ΔW − ΔW_k‖_F / ‖ΔW‖_F` reported so a caller can refuse a poor fit;
//! - `linear`: A and B averaged separately with `√(pᵢ sᵢ)`. Not the average of the updates; kept
//!   for comparison only.
//!
//! Heads (one linear layer): the union of labels, the parent's order first; each label's row is
//! the parent's moved by the sample-weighted mean of the devices' changes for that label (a device
//! that saw no sample of a label does not move it); labels no device saw keep the parent's row.

use std::collections::BTreeMap;

use crate::head::{Dense, Head};
use crate::lora::{LoraModule, LoraWeights};
use crate::tensor::{HostData, HostTensor};

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("nothing to combine")]
    Empty,
    #[error("the adapters do not match: {0}")]
    Mismatch(String),
    #[error("weight {weight} of adapter {index} is not a finite, non-negative number (or all weights are zero)")]
    Weight { index: usize, weight: f64 },
    #[error("a {layers}-layer head cannot be combined row by row; only single-layer (linear) heads can")]
    HeadLayers { layers: usize },
    #[error("LoRA module {module:?}: truncating to rank {rank} leaves a relative residual of {residual:.4}, above the bound {bound}")]
    Residual { module: String, rank: usize, residual: f64, bound: f64 },
    #[error("{0}")]
    Shape(String),
}

impl AggregateError {
    pub fn error_type(&self) -> &'static str {
        match self {
            AggregateError::Empty => "empty",
            AggregateError::Mismatch(_) => "mismatch",
            AggregateError::Weight { .. } => "weight",
            AggregateError::HeadLayers { .. } => "head_layers",
            AggregateError::Residual { .. } => "residual",
            AggregateError::Shape(_) => "shape",
        }
    }
}

/// How LoRA factors are written back from the weighted sum of the updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Stack the factors (exact).
    Cat,
    /// Truncate the summed update by its SVD.
    Svd,
    /// Average A and B separately (an approximation; comparison only).
    Linear,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Cat => "cat",
            Rule::Svd => "svd",
            Rule::Linear => "linear",
        }
    }

    /// `cat` when the stacked rank fits `rank_max`, else `svd`.
    pub fn exact_if_it_fits(ranks: &[usize], rank_max: usize) -> Rule {
        if ranks.iter().sum::<usize>() <= rank_max { Rule::Cat } else { Rule::Svd }
    }
}

/// How well a module's combined factors hold the summed update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModuleFit {
    pub module: String,
    /// `‖ΔW − BA‖_F / ‖ΔW‖_F` (0 for `cat`, which is exact; 0 when ΔW is zero).
    pub residual: f64,
}

/// Weights normalised to sum to one; refused when one is negative or not finite, or all are zero.
pub fn normalise(weights: &[f64]) -> Result<Vec<f64>, AggregateError> {
    if weights.is_empty() {
        return Err(AggregateError::Empty);
    }
    if let Some((index, &weight)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
        return Err(AggregateError::Weight { index, weight });
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(AggregateError::Weight { index: 0, weight: 0.0 });
    }
    Ok(weights.iter().map(|w| w / total).collect())
}

/// Combine `parts` (LoRA weights and their weights, used as given) by `rule`. `rank` is the
/// rank `svd` truncates to (PEFT's `svd_rank`); `cat` and `linear` ignore it. With `max_residual`,
/// an `svd` fit above it is refused.
pub fn combine_lora(
    parts: &[(&LoraWeights, f64)],
    rule: Rule,
    rank: usize,
    max_residual: Option<f64>,
) -> Result<(LoraWeights, Vec<ModuleFit>), AggregateError> {
    let (first, _) = parts.first().ok_or(AggregateError::Empty)?;
    let modules: Vec<&str> = first.modules.iter().map(|m| m.module.as_str()).collect();
    for (i, (lora, _)) in parts.iter().enumerate() {
        let theirs: Vec<&str> = lora.modules.iter().map(|m| m.module.as_str()).collect();
        if theirs != modules {
            return Err(AggregateError::Mismatch(format!("adapter {i} has LoRA on {theirs:?}, adapter 0 on {modules:?}")));
        }
    }
    if rule == Rule::Linear && parts.iter().any(|(l, _)| l.rank != first.rank) {
        return Err(AggregateError::Mismatch("the linear rule needs equal ranks".into()));
    }
    let out_rank = match rule {
        Rule::Cat => parts.iter().map(|(l, _)| l.rank).sum(),
        Rule::Svd => rank,
        Rule::Linear => first.rank,
    };
    if out_rank == 0 {
        return Err(AggregateError::Shape("the combined rank would be 0".into()));
    }
    let mut combined = Vec::with_capacity(modules.len());
    let mut fits = Vec::with_capacity(modules.len());
    for (index, name) in modules.iter().enumerate() {
        let factors: Vec<(Factors, f64)> =
            parts.iter().map(|(lora, w)| Factors::of(&lora.modules[index], lora.rank).map(|f| (f, w * f64::from(lora.scale())))).collect::<Result<_, _>>()?;
        let (out, cols) = (factors[0].0.out, factors[0].0.cols);
        if factors.iter().any(|(f, _)| (f.out, f.cols) != (out, cols)) {
            return Err(AggregateError::Mismatch(format!("module {name:?} has different shapes across adapters")));
        }
        let (a, b, residual) = match rule {
            Rule::Cat => {
                // A rows scaled by pᵢsᵢ, B columns as they are (PEFT's `cat`).
                let mut a = Vec::with_capacity(out_rank * cols);
                let mut b = vec![0.0f64; out * out_rank];
                let mut offset = 0;
                for (f, ws) in &factors {
                    a.extend(f.a.iter().map(|v| v * ws));
                    for row in 0..out {
                        for j in 0..f.rank {
                            b[row * out_rank + offset + j] = f.b[row * f.rank + j];
                        }
                    }
                    offset += f.rank;
                }
                (a, b, 0.0)
            }
            Rule::Linear => {
                let mut a = vec![0.0f64; out_rank * cols];
                let mut b = vec![0.0f64; out * out_rank];
                for (f, ws) in &factors {
                    let s = ws.abs().sqrt();
                    let sign = if *ws >= 0.0 { 1.0 } else { -1.0 };
                    a.iter_mut().zip(&f.a).for_each(|(acc, v)| *acc += sign * s * v);
                    b.iter_mut().zip(&f.b).for_each(|(acc, v)| *acc += s * v);
                }
                (a, b, f64::NAN)
            }
            Rule::Svd => {
                let mut delta = vec![0.0f64; out * cols];
                for (f, ws) in &factors {
                    f.add_delta(&mut delta, *ws);
                }
                let (a, b, residual) = truncate(&delta, out, cols, out_rank);
                (a, b, residual)
            }
        };
        if let (Rule::Svd, Some(bound)) = (rule, max_residual)
            && residual > bound
        {
            return Err(AggregateError::Residual { module: name.to_string(), rank: out_rank, residual, bound });
        }
        let residual = if rule == Rule::Linear { linear_residual(&factors, &a, &b, out, cols, out_rank) } else { residual };
        fits.push(ModuleFit { module: name.to_string(), residual });
        let template = &first.modules[index];
        combined.push(LoraModule {
            module: name.to_string(),
            a: with_rank(&template.a.shape, 0, out_rank, a),
            b: with_rank(&template.b.shape, 1, out_rank, b),
        });
    }
    Ok((LoraWeights { rank: out_rank, alpha: out_rank as f32, modules: combined }, fits))
}

/// The update `(α/r) B A` a LoRA makes to `module`'s weight, row-major `[out, in·kh·kw]`.
pub fn update(lora: &LoraWeights, module: &str) -> Result<Vec<f64>, AggregateError> {
    let m = lora.modules.iter().find(|m| m.module == module).ok_or_else(|| AggregateError::Mismatch(format!("no LoRA on module {module:?}")))?;
    let f = Factors::of(m, lora.rank)?;
    let mut delta = vec![0.0; f.out * f.cols];
    f.add_delta(&mut delta, f64::from(lora.scale()));
    Ok(delta)
}

/// A module's factors flattened: A `[r, cols]`, B `[out, r]` (a conv's kernel dims in `cols`).
struct Factors {
    a: Vec<f64>,
    b: Vec<f64>,
    rank: usize,
    out: usize,
    cols: usize,
}

impl Factors {
    fn of(m: &LoraModule, rank: usize) -> Result<Factors, AggregateError> {
        let bad = || AggregateError::Shape(format!("LoRA module {:?} has shapes A {:?} / B {:?} at rank {rank}", m.module, m.a.shape, m.b.shape));
        let (Some(a), Some(b)) = (m.a.as_f32(), m.b.as_f32()) else { return Err(bad()) };
        let (Some(&r_a), Some(&out)) = (m.a.shape.first(), m.b.shape.first()) else { return Err(bad()) };
        if r_a != rank || m.b.shape.get(1) != Some(&rank) || rank == 0 || a.len() % rank != 0 || b.len() != out * rank {
            return Err(bad());
        }
        Ok(Factors { a: a.iter().map(|&v| f64::from(v)).collect(), b: b.iter().map(|&v| f64::from(v)).collect(), rank, out, cols: a.len() / rank })
    }

    /// `delta += w · B A`.
    fn add_delta(&self, delta: &mut [f64], w: f64) {
        for row in 0..self.out {
            for k in 0..self.rank {
                let coefficient = w * self.b[row * self.rank + k];
                if coefficient == 0.0 {
                    continue;
                }
                let a_row = &self.a[k * self.cols..(k + 1) * self.cols];
                delta[row * self.cols..(row + 1) * self.cols].iter_mut().zip(a_row).for_each(|(d, a)| *d += coefficient * a);
            }
        }
    }
}

fn with_rank(template: &[usize], axis: usize, rank: usize, data: Vec<f64>) -> HostTensor {
    let mut shape = template.to_vec();
    shape[axis] = rank;
    HostTensor { shape, data: HostData::F32(data.into_iter().map(|v| v as f32).collect()) }
}

fn frobenius(m: &[f64]) -> f64 {
    m.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// How far the linear rule's `BA` is from the true weighted sum of the updates.
fn linear_residual(factors: &[(Factors, f64)], a: &[f64], b: &[f64], out: usize, cols: usize, rank: usize) -> f64 {
    let mut truth = vec![0.0; out * cols];
    for (f, ws) in factors {
        f.add_delta(&mut truth, *ws);
    }
    let mut got = vec![0.0; out * cols];
    Factors { a: a.to_vec(), b: b.to_vec(), rank, out, cols }.add_delta(&mut got, 1.0);
    let norm = frobenius(&truth);
    if norm == 0.0 {
        return 0.0;
    }
    frobenius(&truth.iter().zip(&got).map(|(t, g)| t - g).collect::<Vec<_>>()) / norm
}

/// `delta` (`[out, cols]`) truncated to `rank` by its SVD, as PEFT writes it: B = U_k diag(S_k),
/// A = Vᵀ_k (zero rows and columns past the matrix's own rank). Also the relative residual.
fn truncate(delta: &[f64], out: usize, cols: usize, rank: usize) -> (Vec<f64>, Vec<f64>, f64) {
    let triplets = svd(delta, out, cols);
    let total: f64 = triplets.iter().map(|(s, _, _)| s * s).sum();
    let kept: f64 = triplets.iter().take(rank).map(|(s, _, _)| s * s).sum();
    let residual = if total > 0.0 { ((total - kept).max(0.0) / total).sqrt() } else { 0.0 };
    let mut a = vec![0.0; rank * cols];
    let mut b = vec![0.0; out * rank];
    for (j, (s, u, v)) in triplets.iter().take(rank).enumerate() {
        a[j * cols..(j + 1) * cols].copy_from_slice(v);
        for row in 0..out {
            b[row * rank + j] = s * u[row];
        }
    }
    (a, b, residual)
}

/// The singular triplets `(σ, u, v)` of the row-major `[rows, cols]` matrix `m`, largest first,
/// by one-sided Jacobi rotations (Hestenes) over the shorter side's columns.
pub fn svd(m: &[f64], rows: usize, cols: usize) -> Vec<(f64, Vec<f64>, Vec<f64>)> {
    // Rotate the columns of X (n columns of length len) until they are orthogonal: X V = U Σ.
    let transpose = cols > rows;
    let (n, len) = if transpose { (rows, cols) } else { (cols, rows) };
    let mut x: Vec<Vec<f64>> = (0..n).map(|j| (0..len).map(|i| if transpose { m[j * cols + i] } else { m[i * cols + j] }).collect()).collect();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| f64::from(u8::from(i == j))).collect()).collect();
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha: f64 = x[p].iter().map(|a| a * a).sum();
                let beta: f64 = x[q].iter().map(|b| b * b).sum();
                let gamma: f64 = x[p].iter().zip(&x[q]).map(|(a, b)| a * b).sum();
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for cols in [&mut x, &mut v] {
                    let (left, right) = cols.split_at_mut(q);
                    for (a, b) in left[p].iter_mut().zip(right[0].iter_mut()) {
                        let (ap, bq) = (*a, *b);
                        *a = c * ap - s * bq;
                        *b = s * ap + c * bq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut triplets: Vec<(f64, Vec<f64>, Vec<f64>)> = x
        .into_iter()
        .zip(v)
        .map(|(column, right)| {
            let sigma = frobenius(&column);
            let left = if sigma > 0.0 { column.iter().map(|c| c / sigma).collect() } else { vec![0.0; len] };
            // X = Mᵀ when transposed: Mᵀ = U Σ Vᵀ, so M = V Σ Uᵀ.
            if transpose { (sigma, right, left) } else { (sigma, left, right) }
        })
        .collect();
    triplets.sort_by(|a, b| b.0.total_cmp(&a.0));
    triplets
}

/// One device's head for combining: its labels and how many training samples of each it saw.
pub struct HeadPart<'a> {
    pub head: &'a Head,
    pub labels: &'a [String],
    pub samples_per_label: &'a BTreeMap<String, u64>,
}

/// Combine single-layer heads over the union of labels (see the module's comment). `parent` is
/// the head and labels the devices started from. Returns the head and its labels.
pub fn combine_heads(parent: (&Head, &[String]), parts: &[HeadPart<'_>]) -> Result<(Head, Vec<String>), AggregateError> {
    if parts.is_empty() {
        return Err(AggregateError::Empty);
    }
    let single = |h: &Head| -> Result<(Vec<f32>, Vec<f32>, usize), AggregateError> {
        match h.layers.as_slice() {
            [Dense { weight, bias }] => {
                let (Some(w), Some(b)) = (weight.as_f32(), bias.as_f32()) else { return Err(AggregateError::Shape("a head holds non-f32 values".into())) };
                Ok((w.to_vec(), b.to_vec(), weight.shape.get(1).copied().unwrap_or(0)))
            }
            layers => Err(AggregateError::HeadLayers { layers: layers.len() }),
        }
    };
    let (parent_w, parent_b, dim) = single(parent.0)?;
    let mut labels: Vec<String> = parent.1.to_vec();
    let mut devices = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let (w, b, d) = single(part.head)?;
        if d != dim || w.len() != part.labels.len() * dim || b.len() != part.labels.len() {
            return Err(AggregateError::Mismatch(format!("head {i} does not fit its {} labels at width {dim}", part.labels.len())));
        }
        for label in part.labels {
            if !labels.contains(label) && part.samples_per_label.get(label).copied().unwrap_or(0) > 0 {
                labels.push(label.clone());
            }
        }
        devices.push((w, b));
    }
    let mut weight = Vec::with_capacity(labels.len() * dim);
    let mut bias = Vec::with_capacity(labels.len());
    for label in &labels {
        let parent_row = parent.1.iter().position(|l| l == label);
        let mut seen = 0u64;
        let mut row_change = vec![0.0f64; dim];
        let mut bias_change = 0.0f64;
        for (part, (w, b)) in parts.iter().zip(&devices) {
            let n = part.samples_per_label.get(label).copied().unwrap_or(0);
            let Some(row) = part.labels.iter().position(|l| l == label).filter(|_| n > 0) else { continue };
            seen += n;
            for (k, change) in row_change.iter_mut().enumerate() {
                let from = parent_row.map_or(0.0, |p| f64::from(parent_w[p * dim + k]));
                *change += n as f64 * (f64::from(w[row * dim + k]) - from);
            }
            bias_change += n as f64 * (f64::from(b[row]) - parent_row.map_or(0.0, |p| f64::from(parent_b[p])));
        }
        let denominator = seen.max(1) as f64;
        for (k, change) in row_change.iter().enumerate() {
            weight.push((parent_row.map_or(0.0, |p| f64::from(parent_w[p * dim + k])) + change / denominator) as f32);
        }
        bias.push((parent_row.map_or(0.0, |p| f64::from(parent_b[p])) + bias_change / denominator) as f32);
    }
    let n = labels.len();
    let head = Head {
        layers: vec![Dense {
            weight: HostTensor { shape: vec![n, dim], data: HostData::F32(weight) },
            bias: HostTensor { shape: vec![n], data: HostData::F32(bias) },
        }],
    };
    Ok((head, labels))
}

/// Combine LoReFT adapters exactly: the weighted sum `Σ wᵢ Rᵢᵀ(Wᵢ h + bᵢ − Rᵢ h)` of their edits
/// is one LoReFT edit of rank `Σ rᵢ`, with `R` the stacked `Rᵢ`, `W` the stacked
/// `wᵢ Wᵢ + (1 − wᵢ) Rᵢ` and `b` the stacked `wᵢ bᵢ`: then `Rᵀ(W h + b − R h)` is the sum, term by
/// term. (The stacked R need not have orthonormal rows across devices; serving does not need it.)
/// Devices must edit the same positions; a layer one of them leaves alone gets zero rows from it.
/// Refused when `Σ rᵢ` is above `rank_max`: no smaller edit is exact, and LoReFT ranks are small.
pub fn combine_reft(parts: &[(&crate::reft::ReftWeights, f64)], rank_max: usize) -> Result<crate::reft::ReftWeights, AggregateError> {
    use crate::reft::{ReftModule, ReftWeights};
    let (first, _) = parts.first().ok_or(AggregateError::Empty)?;
    if let Some((i, _)) = parts.iter().enumerate().find(|(_, (p, _))| p.positions != first.positions) {
        return Err(AggregateError::Mismatch(format!("adapter {i} edits positions {:?}, adapter 0 {:?}", parts[i].0.positions, first.positions)));
    }
    let rank: usize = parts.iter().map(|(p, _)| p.rank).sum();
    if rank > rank_max {
        return Err(AggregateError::Shape(format!("the stacked LoReFT rank {rank} is above the bundle's rank_max {rank_max}")));
    }
    let mut names: Vec<&str> = Vec::new();
    for (p, _) in parts {
        for m in &p.modules {
            if !names.contains(&m.module.as_str()) {
                names.push(&m.module);
            }
        }
    }
    let mut modules = Vec::with_capacity(names.len());
    for name in names {
        let dim = parts
            .iter()
            .flat_map(|(p, _)| p.modules.iter().filter(|m| m.module == name).map(|m| m.rotate.shape.get(1).copied().unwrap_or(0)))
            .next()
            .unwrap_or(0);
        let (mut rotate, mut weight, mut bias) = (Vec::with_capacity(rank * dim), Vec::with_capacity(rank * dim), Vec::with_capacity(rank));
        for (p, w) in parts {
            match p.modules.iter().find(|m| m.module == name) {
                Some(m) => {
                    let (r, wt, b) = (m.rotate.as_f32(), m.weight.as_f32(), m.bias.as_f32());
                    let (Some(r), Some(wt), Some(b)) = (r, wt, b) else { return Err(AggregateError::Shape(format!("LoReFT {name:?}: values must be f32"))) };
                    if r.len() != p.rank * dim || wt.len() != p.rank * dim || b.len() != p.rank {
                        return Err(AggregateError::Shape(format!("LoReFT {name:?}: shapes do not fit rank {} and width {dim}", p.rank)));
                    }
                    let w = *w as f32;
                    rotate.extend_from_slice(r);
                    weight.extend(wt.iter().zip(r).map(|(wt, r)| w * wt + (1.0 - w) * r));
                    bias.extend(b.iter().map(|b| w * b));
                }
                None => {
                    rotate.resize(rotate.len() + p.rank * dim, 0.0);
                    weight.resize(weight.len() + p.rank * dim, 0.0);
                    bias.resize(bias.len() + p.rank, 0.0);
                }
            }
        }
        modules.push(ReftModule {
            module: name.to_string(),
            rotate: HostTensor { shape: vec![rank, dim], data: HostData::F32(rotate) },
            weight: HostTensor { shape: vec![rank, dim], data: HostData::F32(weight) },
            bias: HostTensor { shape: vec![rank], data: HostData::F32(bias) },
        });
    }
    Ok(ReftWeights { rank, positions: first.positions, modules })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn lora(rank: usize, alpha: f32, seed: u64, modules: &[(&str, usize, usize)]) -> LoraWeights {
        let mut rng = SeededRng::new(seed);
        LoraWeights {
            rank,
            alpha,
            modules: modules
                .iter()
                .map(|(name, out, cols)| LoraModule {
                    module: name.to_string(),
                    a: HostTensor { shape: vec![rank, *cols], data: HostData::F32(rng.normal_vec(rank * cols, 0.3)) },
                    b: HostTensor { shape: vec![*out, rank], data: HostData::F32(rng.normal_vec(out * rank, 0.3)) },
                })
                .collect(),
        }
    }

    fn delta_of(l: &LoraWeights, index: usize) -> Vec<f64> {
        let f = Factors::of(&l.modules[index], l.rank).unwrap();
        let mut d = vec![0.0; f.out * f.cols];
        f.add_delta(&mut d, f64::from(l.scale()));
        d
    }

    fn weighted_sum(parts: &[(&LoraWeights, f64)], index: usize) -> Vec<f64> {
        let mut sum = vec![0.0; delta_of(parts[0].0, index).len()];
        for (l, w) in parts {
            sum.iter_mut().zip(delta_of(l, index)).for_each(|(s, d)| *s += w * d);
        }
        sum
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn loreft_adapters_combine_exactly_into_one_edit_of_the_summed_rank() {
        use crate::bundle::{ReftKind, ReftSlot, ReftSpec};
        use crate::reft::ReftWeights;
        let slot =
            |m: &str| ReftSlot { module: m.into(), kind: ReftKind::Vector, dim: 5, r_input: String::new(), w_input: String::new(), b_input: String::new() };
        let spec = ReftSpec { rank_max: 8, slots: vec![slot("x"), slot("y")], positions_input: None, mask_input: None, merge: None };
        let a = ReftWeights::random(&spec, 2, 1, 0.3).unwrap();
        let mut b = ReftWeights::random(&spec, 3, 2, 0.3).unwrap();
        b.modules.remove(1); // b leaves "y" alone
        // The edit h -> Rᵀ(W h + b − R h) of one module, on a vector.
        let edit = |w: &ReftWeights, module: &str, h: &[f32]| -> Vec<f64> {
            let Some(m) = w.modules.iter().find(|m| m.module == module) else { return vec![0.0; h.len()] };
            let (r, wt, bias) = (m.rotate.as_f32().unwrap(), m.weight.as_f32().unwrap(), m.bias.as_f32().unwrap());
            let d = h.len();
            let mut out = vec![0.0f64; d];
            for k in 0..w.rank {
                let dot = |row: &[f32]| row.iter().zip(h).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
                let inner = dot(&wt[k * d..(k + 1) * d]) + f64::from(bias[k]) - dot(&r[k * d..(k + 1) * d]);
                for (o, rv) in out.iter_mut().zip(&r[k * d..(k + 1) * d]) {
                    *o += f64::from(*rv) * inner;
                }
            }
            out
        };
        let combined = combine_reft(&[(&a, 0.25), (&b, 0.75)], 8).unwrap();
        assert_eq!(combined.rank, 5);
        let h = [0.3f32, -1.2, 0.5, 2.0, -0.7];
        for module in ["x", "y"] {
            let want: Vec<f64> = edit(&a, module, &h).iter().zip(edit(&b, module, &h)).map(|(x, y)| 0.25 * x + 0.75 * y).collect();
            let got = edit(&combined, module, &h);
            assert!(want.iter().zip(&got).all(|(w, g)| (w - g).abs() < 1e-5), "{module}: {want:?} vs {got:?}");
        }
        assert_eq!(combine_reft(&[(&a, 0.5), (&b, 0.5)], 4).unwrap_err().error_type(), "shape");
        let mut c = a.clone();
        c.positions = Some(crate::reft::ReftPositions { first: 1, last: 0 });
        assert_eq!(combine_reft(&[(&a, 0.5), (&c, 0.5)], 8).unwrap_err().error_type(), "mismatch");
    }

    #[test]
    fn cat_holds_the_weighted_sum_of_the_updates_exactly() {
        let shapes = [("fc1", 12, 20), ("conv", 6, 27)];
        let (x, y) = (lora(4, 8.0, 1, &shapes), lora(2, 2.0, 2, &shapes));
        let parts = [(&x, 0.7), (&y, 0.3)];
        let (combined, fits) = combine_lora(&parts, Rule::Cat, 0, None).unwrap();
        assert_eq!((combined.rank, combined.alpha), (6, 6.0));
        for (index, fit) in fits.iter().enumerate() {
            assert!(max_diff(&delta_of(&combined, index), &weighted_sum(&parts, index)) < 1e-5);
            assert_eq!(fit.residual, 0.0);
        }
    }

    #[test]
    fn svd_at_full_rank_is_exact_and_below_it_reports_the_residual() {
        let shapes = [("fc1", 10, 16)];
        let (x, y, z) = (lora(3, 3.0, 3, &shapes), lora(3, 6.0, 4, &shapes), lora(3, 3.0, 5, &shapes));
        let parts = [(&x, 0.5), (&y, 0.25), (&z, 0.25)];
        let truth = weighted_sum(&parts, 0);
        let (full, fits) = combine_lora(&parts, Rule::Svd, 9, None).unwrap();
        assert!(max_diff(&delta_of(&full, 0), &truth) < 1e-5, "rank 9 holds a sum of three rank-3 updates");
        assert!(fits[0].residual < 1e-6);
        let (cut, fits) = combine_lora(&parts, Rule::Svd, 4, None).unwrap();
        let error: Vec<f64> = delta_of(&cut, 0).iter().zip(&truth).map(|(a, b)| a - b).collect();
        let residual = frobenius(&error) / frobenius(&truth);
        assert!((fits[0].residual - residual).abs() < 1e-6 && residual > 0.05, "{} vs {residual}", fits[0].residual);
        let refused = combine_lora(&parts, Rule::Svd, 4, Some(0.01)).unwrap_err();
        assert_eq!(refused.error_type(), "residual");
        assert!(refused.to_string().contains("fc1"), "{refused}");
    }

    #[test]
    fn the_jacobi_svd_reconstructs_wide_and_tall_matrices() {
        let mut rng = SeededRng::new(9);
        for (rows, cols) in [(7, 3), (3, 7), (5, 5)] {
            let m: Vec<f64> = rng.normal_vec(rows * cols, 1.0).into_iter().map(f64::from).collect();
            let triplets = svd(&m, rows, cols);
            let mut back = vec![0.0; rows * cols];
            for (s, u, v) in &triplets {
                for i in 0..rows {
                    for j in 0..cols {
                        back[i * cols + j] += s * u[i] * v[j];
                    }
                }
            }
            assert!(max_diff(&back, &m) < 1e-10, "{rows}x{cols}");
            assert!(triplets.windows(2).all(|w| w[0].0 >= w[1].0));
        }
    }

    #[test]
    fn linear_is_not_the_average_of_the_updates() {
        let shapes = [("fc1", 8, 8)];
        let (x, y) = (lora(2, 2.0, 6, &shapes), lora(2, 2.0, 7, &shapes));
        let (_, fits) = combine_lora(&[(&x, 0.5), (&y, 0.5)], Rule::Linear, 0, None).unwrap();
        assert!(fits[0].residual > 0.1, "{}", fits[0].residual);
        let other = lora(2, 2.0, 8, &[("fc2", 8, 8)]);
        assert_eq!(combine_lora(&[(&x, 0.5), (&other, 0.5)], Rule::Cat, 0, None).unwrap_err().error_type(), "mismatch");
    }

    fn head(rows: &[[f32; 2]], bias: &[f32]) -> Head {
        Head {
            layers: vec![Dense {
                weight: HostTensor { shape: vec![rows.len(), 2], data: HostData::F32(rows.iter().flatten().copied().collect()) },
                bias: HostTensor { shape: vec![bias.len()], data: HostData::F32(bias.to_vec()) },
            }],
        }
    }

    #[test]
    fn heads_combine_over_the_union_of_labels_weighted_by_each_labels_samples() {
        let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let counts = |c: &[(&str, u64)]| c.iter().map(|(l, n)| (l.to_string(), *n)).collect::<BTreeMap<_, _>>();
        let parent = head(&[[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], &[0.0, 0.0, 0.0]);
        let parent_labels = names(&["a", "b", "c"]);
        // Device 1 saw a (3 samples) and b (1); device 2 saw a (1) and a new label d (4); nobody saw c.
        let (h1, l1, c1) = (head(&[[4.0, 0.0], [3.0, 1.0], [9.0, 9.0]], &[1.0, 0.0, 0.0]), names(&["a", "b", "c"]), counts(&[("a", 3), ("b", 1)]));
        let (h2, l2, c2) =
            (head(&[[0.0, 8.0], [7.0, 7.0], [2.0, 2.0], [6.0, 6.0]], &[5.0, 7.0, 0.0, 2.0]), names(&["a", "b", "c", "d"]), counts(&[("a", 1), ("d", 4)]));
        let parts = [HeadPart { head: &h1, labels: &l1, samples_per_label: &c1 }, HeadPart { head: &h2, labels: &l2, samples_per_label: &c2 }];
        let (combined, labels) = combine_heads((&parent, &parent_labels), &parts).unwrap();
        assert_eq!(labels, names(&["a", "b", "c", "d"]));
        let w = combined.layers[0].weight.as_f32().unwrap();
        let b = combined.layers[0].bias.as_f32().unwrap();
        // a: (3·(4,0) + 1·(0,8)) / 4 = (3, 2); b: only device 1 saw it; c: the parent's; d: device 2's.
        assert_eq!(w, &[3.0, 2.0, 3.0, 1.0, 5.0, 5.0, 6.0, 6.0]);
        assert_eq!(b, &[2.0, 0.0, 0.0, 2.0]);
        let mlp = Head { layers: vec![parent.layers[0].clone(), parent.layers[0].clone()] };
        assert_eq!(combine_heads((&mlp, &parent_labels), &parts).unwrap_err().error_type(), "head_layers");
    }

    #[test]
    fn weights_are_normalised_and_bad_ones_refused() {
        assert_eq!(normalise(&[1.0, 3.0]).unwrap(), vec![0.25, 0.75]);
        assert_eq!(normalise(&[1.0, -1.0]).unwrap_err().error_type(), "weight");
        assert_eq!(normalise(&[0.0, 0.0]).unwrap_err().error_type(), "weight");
        assert_eq!(normalise(&[f64::NAN]).unwrap_err().error_type(), "weight");
    }
}
