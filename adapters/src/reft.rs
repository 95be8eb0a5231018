//! LoReFT weights as plain host tensors, and how they become a bundle's graph inputs.
//!
//! LoReFT (arXiv 2404.03592) edits a frozen layer's output `h` at chosen positions:
//! `h + Rᵀ(W h + b − R h)`, with `R: [r, d]` (orthonormal rows: the subspace it edits), `W: [r, d]`
//! and `b: [r]` (what that subspace should hold). pyreft names them `rotate_layer`, `weight` and
//! `bias`. The bundle's graphs take them at `rank_max` rows; zero rows edit nothing, so a smaller
//! rank is zero-padded and "no adapter" is all zeros (R = 0 makes the whole edit 0).

use serde::{Deserialize, Serialize};

use crate::bundle::{ReftKind, ReftSlot, ReftSpec};
use crate::lora::pad_rank;
use crate::tensor::{HostData, HostTensor, SeededRng};

#[derive(Debug, thiserror::Error)]
pub enum ReftError {
    #[error("the bundle has no LoReFT slots (export it with reft_layers)")]
    NoSlots,
    #[error("LoReFT rank {rank} is outside 1..={rank_max} (the bundle's maximum)")]
    Rank { rank: usize, rank_max: usize },
    #[error("adapter has LoReFT tensors for module {0:?}, which is not a LoReFT slot of this bundle")]
    UnknownSlot(String),
    #[error("LoReFT {which} for module {module:?} has shape {actual:?}, the bundle's slot needs {expected:?}")]
    Shape { module: String, which: &'static str, actual: Vec<usize>, expected: Vec<usize> },
    #[error("LoReFT {which} for module {module:?} holds a non-finite value")]
    NonFinite { module: String, which: &'static str },
    #[error("LoReFT positions: {0}")]
    Positions(String),
}

impl ReftError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ReftError::NoSlots => "no_slots",
            ReftError::Rank { .. } => "rank",
            ReftError::UnknownSlot(_) => "unknown_slot",
            ReftError::Shape { .. } => "shape",
            ReftError::NonFinite { .. } => "non_finite",
            ReftError::Positions(_) => "positions",
        }
    }
}

/// Which positions of a sequence are edited: each row's first `first` and last `last` real tokens
/// (the paper's `f{first}+l{last}`). Feature maps and vectors are edited everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReftPositions {
    pub first: usize,
    pub last: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReftModule {
    pub module: String,
    /// `R: [r, d]`, orthonormal rows.
    pub rotate: HostTensor,
    /// `W: [r, d]`.
    pub weight: HostTensor,
    /// `b: [r]`.
    pub bias: HostTensor,
}

/// A LoReFT adapter's tensors. Slots it does not name get zeros (no edit).
#[derive(Debug, Clone, PartialEq)]
pub struct ReftWeights {
    pub rank: usize,
    /// Needed exactly when the bundle edits sequences.
    pub positions: Option<ReftPositions>,
    pub modules: Vec<ReftModule>,
}

impl ReftWeights {
    /// Random values at `rank` on every slot (R with orthonormal rows), for tests and probes.
    pub fn random(spec: &ReftSpec, rank: usize, seed: u64, std: f32) -> Result<ReftWeights, ReftError> {
        check_rank(spec, rank)?;
        let mut rng = SeededRng::new(seed);
        let modules = spec
            .slots
            .iter()
            .map(|slot| ReftModule {
                module: slot.module.clone(),
                rotate: orthonormal_rows(rank, slot.dim, &mut rng),
                weight: HostTensor { shape: vec![rank, slot.dim], data: HostData::F32(rng.normal_vec(rank * slot.dim, std)) },
                bias: HostTensor { shape: vec![rank], data: HostData::F32(rng.normal_vec(rank, std)) },
            })
            .collect();
        let positions = spec.positions_input.as_ref().map(|_| ReftPositions { first: 1, last: 1 });
        Ok(ReftWeights { rank, positions, modules })
    }

    pub fn validate(&self, spec: &ReftSpec) -> Result<(), ReftError> {
        check_rank(spec, self.rank)?;
        match (&spec.positions_input, &self.positions) {
            (Some(_), None) => return Err(ReftError::Positions("the bundle edits sequences, so the adapter must say which positions".into())),
            (None, Some(_)) => return Err(ReftError::Positions("the bundle edits no sequence; the adapter must not name positions".into())),
            _ => {}
        }
        for m in &self.modules {
            let slot = spec.slots.iter().find(|s| s.module == m.module).ok_or_else(|| ReftError::UnknownSlot(m.module.clone()))?;
            for (which, tensor, expected) in
                [("R", &m.rotate, vec![self.rank, slot.dim]), ("W", &m.weight, vec![self.rank, slot.dim]), ("b", &m.bias, vec![self.rank])]
            {
                if tensor.shape != expected || tensor.len() != expected.iter().product::<usize>() {
                    return Err(ReftError::Shape { module: m.module.clone(), which, actual: tensor.shape.clone(), expected });
                }
                if !tensor.as_f32().is_some_and(|v| v.iter().all(|x| x.is_finite())) {
                    return Err(ReftError::NonFinite { module: m.module.clone(), which });
                }
            }
        }
        Ok(())
    }

    /// The graph's LoReFT inputs: `R, W, b` per slot padded to `rank_max`, then the positions.
    pub fn reft_inputs(&self, spec: &ReftSpec) -> Result<Vec<HostTensor>, ReftError> {
        self.validate(spec)?;
        let mut out = Vec::with_capacity(spec.input_count());
        for slot in &spec.slots {
            match self.modules.iter().find(|m| m.module == slot.module) {
                Some(m) => out.extend([&m.rotate, &m.weight, &m.bias].map(|t| pad_rank(t, 0, spec.rank_max, 1.0))),
                None => out.extend(zero_slot(slot, spec.rank_max)),
            }
        }
        if spec.positions_input.is_some() {
            let p = self.positions.unwrap_or(ReftPositions { first: 0, last: 0 });
            out.push(HostTensor { shape: vec![2], data: HostData::I64(vec![p.first as i64, p.last as i64]) });
        }
        Ok(out)
    }

    /// Trainable values: `rank · (2 d + 1)` per module.
    pub fn parameter_count(&self) -> usize {
        self.modules.iter().map(|m| m.rotate.len() + m.weight.len() + m.bias.len()).sum()
    }
}

/// The LoReFT weights at `rank` that `inputs` (as [`ReftWeights::reft_inputs`] made them)
/// serve: the first `rank` rows of each slot. Slots with R all zero are left out.
pub fn from_reft_inputs(spec: &ReftSpec, inputs: &[HostTensor], rank: usize) -> Result<ReftWeights, ReftError> {
    check_rank(spec, rank)?;
    if inputs.len() != spec.input_count() {
        return Err(ReftError::Shape { module: String::new(), which: "inputs", actual: vec![inputs.len()], expected: vec![spec.input_count()] });
    }
    let mut modules = Vec::new();
    for (slot, triple) in spec.slots.iter().zip(inputs.chunks(3)) {
        let [r, w, b] = triple else { return Err(ReftError::UnknownSlot(slot.module.clone())) };
        if r.shape != [spec.rank_max, slot.dim] || w.shape != [spec.rank_max, slot.dim] || b.shape != [spec.rank_max] {
            return Err(ReftError::Shape { module: slot.module.clone(), which: "R/W/b", actual: r.shape.clone(), expected: vec![spec.rank_max, slot.dim] });
        }
        if r.as_f32().is_some_and(|v| v.iter().all(|&x| x == 0.0)) {
            continue;
        }
        modules.push(ReftModule { module: slot.module.clone(), rotate: r.rows(0, rank), weight: w.rows(0, rank), bias: b.rows(0, rank) });
    }
    let positions = match (&spec.positions_input, inputs.last().and_then(HostTensor::as_i64)) {
        (Some(_), Some([first, last])) => Some(ReftPositions { first: (*first).max(0) as usize, last: (*last).max(0) as usize }),
        (Some(_), _) => return Err(ReftError::Positions("the positions input is not an i64 [2]".into())),
        (None, _) => None,
    };
    Ok(ReftWeights { rank, positions, modules })
}

/// Graph inputs that edit nothing: every slot all zeros, positions `[0, 0]`.
pub fn no_edit_inputs(spec: &ReftSpec) -> Vec<HostTensor> {
    let mut out: Vec<HostTensor> = spec.slots.iter().flat_map(|s| zero_slot(s, spec.rank_max)).collect();
    if spec.positions_input.is_some() {
        out.push(HostTensor { shape: vec![2], data: HostData::I64(vec![0, 0]) });
    }
    out
}

/// Whether LoReFT inputs edit nothing: each slot's R all zeros (or, where every slot edits a
/// sequence, no position picked).
pub fn edits_nothing(spec: &ReftSpec, inputs: &[HostTensor]) -> bool {
    let rotations_zero = inputs.chunks(3).take(spec.slots.len()).all(|t| t[0].as_f32().is_some_and(|v| v.iter().all(|&x| x == 0.0)));
    let no_position = spec.positions_input.is_some()
        && spec.slots.iter().all(|s| s.kind == ReftKind::Sequence)
        && inputs.last().and_then(HostTensor::as_i64).is_some_and(|p| p.iter().all(|&x| x <= 0));
    rotations_zero || no_position
}

fn zero_slot(slot: &ReftSlot, rank_max: usize) -> [HostTensor; 3] {
    [HostTensor::zeros_f32(vec![rank_max, slot.dim]), HostTensor::zeros_f32(vec![rank_max, slot.dim]), HostTensor::zeros_f32(vec![rank_max])]
}

fn check_rank(spec: &ReftSpec, rank: usize) -> Result<(), ReftError> {
    if rank == 0 || rank > spec.rank_max {
        return Err(ReftError::Rank { rank, rank_max: spec.rank_max });
    }
    Ok(())
}

/// `[r, d]` with orthonormal rows (Gram-Schmidt on Gaussian rows, in f64).
pub fn orthonormal_rows(r: usize, d: usize, rng: &mut SeededRng) -> HostTensor {
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(r);
    while rows.len() < r {
        let mut v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        for q in &rows {
            let dot: f64 = v.iter().zip(q).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            rows.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    HostTensor { shape: vec![r, d], data: HostData::F32(rows.into_iter().flatten().map(|x| x as f32).collect()) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(positions: bool) -> ReftSpec {
        let slot = |m: &str, kind| ReftSlot {
            module: m.into(),
            kind,
            dim: 6,
            r_input: format!("{m}.reft_R"),
            w_input: format!("{m}.reft_W"),
            b_input: format!("{m}.reft_b"),
        };
        ReftSpec {
            rank_max: 4,
            slots: vec![slot("a", ReftKind::Sequence), slot("b", ReftKind::Vector)],
            positions_input: positions.then(|| "reft.positions".into()),
            mask_input: positions.then(|| "mask".into()),
            merge: None,
        }
    }

    #[test]
    fn inputs_pad_to_rank_max_and_come_back_at_the_rank_trained() {
        let s = spec(true);
        let w = ReftWeights::random(&s, 2, 3, 0.1).unwrap();
        let inputs = w.reft_inputs(&s).unwrap();
        assert_eq!(inputs.len(), 7);
        assert_eq!(inputs[0].shape, [4, 6]);
        assert_eq!(inputs[2].shape, [4]);
        assert!(inputs[0].as_f32().unwrap()[12..].iter().all(|&x| x == 0.0), "rows past the rank are zero");
        assert_eq!(inputs[6].as_i64().unwrap(), [1, 1]);
        let back = from_reft_inputs(&s, &inputs, 2).unwrap();
        assert_eq!(back, w);
        assert!(!edits_nothing(&s, &inputs));
        assert!(edits_nothing(&s, &no_edit_inputs(&s)));
        // R's rows are orthonormal.
        let r = w.modules[0].rotate.as_f32().unwrap();
        let dot = |i: usize, j: usize| (0..6).map(|k| r[i * 6 + k] * r[j * 6 + k]).sum::<f32>();
        assert!((dot(0, 0) - 1.0).abs() < 1e-5 && dot(0, 1).abs() < 1e-5);
        assert_eq!(w.parameter_count(), 2 * (2 * 2 * 6 + 2));
    }

    #[test]
    fn a_wrong_adapter_is_refused_with_what_is_wrong() {
        let s = spec(true);
        let mut w = ReftWeights::random(&s, 2, 3, 0.1).unwrap();
        w.positions = None;
        assert!(w.reft_inputs(&s).unwrap_err().to_string().contains("which positions"));
        let mut w = ReftWeights::random(&s, 2, 3, 0.1).unwrap();
        w.modules[1].weight = HostTensor::zeros_f32(vec![2, 5]);
        assert_eq!(w.validate(&s).unwrap_err().to_string(), "LoReFT W for module \"b\" has shape [2, 5], the bundle's slot needs [2, 6]");
        let mut w = ReftWeights::random(&s, 2, 3, 0.1).unwrap();
        w.modules[0].module = "c".into();
        assert_eq!(w.validate(&s).unwrap_err().error_type(), "unknown_slot");
        assert_eq!(ReftWeights::random(&s, 5, 3, 0.1).unwrap_err().error_type(), "rank");
        let mut w = ReftWeights::random(&spec(false), 2, 3, 0.1).unwrap();
        w.modules[0].bias = HostTensor { shape: vec![2], data: HostData::F32(vec![f32::NAN, 0.0]) };
        assert_eq!(w.validate(&spec(false)).unwrap_err().error_type(), "non_finite");
    }
}
