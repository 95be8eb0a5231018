//! LoRA weights as plain host tensors, and how they become a bundle's graph inputs.
//!
//! PEFT semantics: per target module, `A: [r, in]` and `B: [out, r]` (conv: `[r, in, kh, kw]` and
//! `[out, r, 1, 1]`), and the update `scale * B @ A @ x` with `scale = alpha / r`. The bundle's
//! graphs take tensors at the slot's maximum rank, so `lora_inputs` zero-pads A's rows and B's
//! columns up to `rank_max` and folds `scale` into B. Zero padding adds exactly nothing.

use crate::bundle::{LoraSlot, LoraSpec};
use crate::tensor::{HostData, HostTensor, SeededRng};

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA rank {rank} is outside 1..={rank_max} (the bundle's maximum)")]
    Rank { rank: usize, rank_max: usize },
    #[error("LoRA alpha must be finite and positive, got {0}")]
    Alpha(f32),
    #[error("adapter has a tensor for module {0:?}, which is not a LoRA slot of this bundle")]
    UnknownSlot(String),
    #[error("LoRA {which} for module {module:?} has shape {actual:?}, the bundle's slot needs {expected:?}")]
    Shape { module: String, which: &'static str, actual: Vec<usize>, expected: Vec<usize> },
    #[error("LoRA {which} for module {module:?} holds a non-finite value")]
    NonFinite { module: String, which: &'static str },
}

impl LoraError {
    pub fn error_type(&self) -> &'static str {
        match self {
            LoraError::Rank { .. } => "rank",
            LoraError::Alpha(_) => "alpha",
            LoraError::UnknownSlot(_) => "unknown_slot",
            LoraError::Shape { .. } => "shape",
            LoraError::NonFinite { .. } => "non_finite",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub module: String,
    /// `[r, in]` or `[r, in, kh, kw]`.
    pub a: HostTensor,
    /// `[out, r]` or `[out, r, 1, 1]`.
    pub b: HostTensor,
}

/// A LoRA adapter's trained tensors. Slots the adapter does not name get zeros (no update).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub rank: usize,
    pub alpha: f32,
    pub modules: Vec<LoraModule>,
}

/// Expected `(A, B)` shapes of `slot` at rank `r`.
pub fn slot_shapes(slot: &LoraSlot, r: usize) -> (Vec<usize>, Vec<usize>) {
    let mut a = slot.a_shape.clone();
    let mut b = slot.b_shape.clone();
    a[0] = r;
    b[1] = r;
    (a, b)
}

impl LoraWeights {
    /// Seeded weights for every slot: A ~ N(0, std) and B ~ N(0, std). (Training starts B at zero,
    /// as PEFT does; parity checks need a non-zero B so the slot actually changes the output.)
    pub fn random(spec: &LoraSpec, rank: usize, alpha: f32, seed: u64, std: f32) -> Result<LoraWeights, LoraError> {
        check_rank(spec, rank)?;
        let mut rng = SeededRng::new(seed);
        let modules = spec
            .slots
            .iter()
            .map(|slot| {
                let (a_shape, b_shape) = slot_shapes(slot, rank);
                let a = rng.normal_vec(a_shape.iter().product(), std);
                let b = rng.normal_vec(b_shape.iter().product(), std);
                LoraModule {
                    module: slot.module.clone(),
                    a: HostTensor { shape: a_shape, data: HostData::F32(a) },
                    b: HostTensor { shape: b_shape, data: HostData::F32(b) },
                }
            })
            .collect();
        Ok(LoraWeights { rank, alpha, modules })
    }

    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Check these weights fit `spec`: known slots, right shapes at this rank, finite values.
    pub fn validate(&self, spec: &LoraSpec) -> Result<(), LoraError> {
        check_rank(spec, self.rank)?;
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(LoraError::Alpha(self.alpha));
        }
        for m in &self.modules {
            let slot = spec.slots.iter().find(|s| s.module == m.module).ok_or_else(|| LoraError::UnknownSlot(m.module.clone()))?;
            let (a_shape, b_shape) = slot_shapes(slot, self.rank);
            for (which, tensor, expected) in [("A", &m.a, a_shape), ("B", &m.b, b_shape)] {
                if tensor.shape != expected || tensor.len() != expected.iter().product::<usize>() {
                    return Err(LoraError::Shape { module: m.module.clone(), which, actual: tensor.shape.clone(), expected });
                }
                let finite = tensor.as_f32().is_some_and(|v| v.iter().all(|x| x.is_finite()));
                if !finite {
                    return Err(LoraError::NonFinite { module: m.module.clone(), which });
                }
            }
        }
        Ok(())
    }

    /// The graph's LoRA inputs in slot order (A_0, B_0, A_1, B_1, ...), padded to `rank_max`
    /// with `alpha / r` folded into B.
    /// The slot values that serve this LoRA alone (no LoReFT edit) on `manifest`'s graphs.
    pub fn graph_inputs(&self, manifest: &crate::bundle::Manifest) -> Result<Vec<HostTensor>, crate::slots::SlotError> {
        crate::slots::adapter_inputs(manifest, Some(self), None)
    }

    /// The LoRA part of a graph's slot values: see [`crate::slots::adapter_inputs`] for all of them.
    pub fn lora_inputs(&self, spec: &LoraSpec) -> Result<Vec<HostTensor>, LoraError> {
        self.validate(spec)?;
        let mut out = Vec::with_capacity(2 * spec.slots.len());
        for slot in &spec.slots {
            match self.modules.iter().find(|m| m.module == slot.module) {
                Some(m) => {
                    out.push(pad_rank(&m.a, 0, spec.rank_max, 1.0));
                    out.push(pad_rank(&m.b, 1, spec.rank_max, self.scale()));
                }
                None => {
                    out.push(HostTensor::zeros_f32(slot.a_shape.clone()));
                    out.push(HostTensor::zeros_f32(slot.b_shape.clone()));
                }
            }
        }
        Ok(out)
    }
}

/// The LoRA weights at rank `rank` that `inputs` (as [`LoraWeights::lora_inputs`] made them,
/// scale folded into B) serve: A's first `rank` rows and B's first `rank` columns, alpha = rank.
/// How a job continues from the LoRA that serves. Slots whose inputs are all zeros are left out.
pub fn from_lora_inputs(spec: &LoraSpec, inputs: &[HostTensor], rank: usize) -> Result<LoraWeights, LoraError> {
    check_rank(spec, rank)?;
    let mut modules = Vec::new();
    for (slot, pair) in spec.slots.iter().zip(inputs.chunks(2)) {
        let [a, b] = pair else { return Err(LoraError::UnknownSlot(slot.module.clone())) };
        let (a_shape, b_shape) = slot_shapes(slot, rank);
        let (a, b) = (narrow_rank(a, 0, rank), narrow_rank(b, 1, rank));
        if a.shape != a_shape || b.shape != b_shape {
            return Err(LoraError::Shape { module: slot.module.clone(), which: "A/B", actual: a.shape, expected: a_shape });
        }
        if b.as_f32().is_some_and(|v| v.iter().all(|&x| x == 0.0)) {
            continue;
        }
        modules.push(LoraModule { module: slot.module.clone(), a, b });
    }
    Ok(LoraWeights { rank, alpha: rank as f32, modules })
}

/// The first `keep` entries of `axis` (the inverse of `pad_rank` without its scale).
fn narrow_rank(t: &HostTensor, axis: usize, keep: usize) -> HostTensor {
    let src = t.as_f32().unwrap_or(&[]);
    let outer: usize = t.shape[..axis].iter().product();
    let r = t.shape.get(axis).copied().unwrap_or(0);
    let inner: usize = t.shape[(axis + 1).min(t.shape.len())..].iter().product();
    let keep = keep.min(r);
    let mut shape = t.shape.clone();
    if let Some(d) = shape.get_mut(axis) {
        *d = keep;
    }
    let mut data = Vec::with_capacity(outer * keep * inner);
    for o in 0..outer {
        if let Some(rows) = src.get(o * r * inner..o * r * inner + keep * inner) {
            data.extend_from_slice(rows);
        }
    }
    HostTensor { shape, data: HostData::F32(data) }
}

/// Whether a slot's pair of graph inputs (A, B) adds nothing to its layer: A or B all zeros.
pub fn slot_adds_nothing(pair: &[HostTensor]) -> bool {
    pair.iter().any(|t| match &t.data {
        HostData::F32(v) => v.iter().all(|&x| x == 0.0),
        HostData::I64(v) => v.iter().all(|&x| x == 0),
    })
}

/// LoRA slot values that add nothing: every slot all zeros.
pub fn no_lora_inputs(spec: &LoraSpec) -> Vec<HostTensor> {
    spec.slots.iter().flat_map(|s| [HostTensor::zeros_f32(s.a_shape.clone()), HostTensor::zeros_f32(s.b_shape.clone())]).collect()
}

fn check_rank(spec: &LoraSpec, rank: usize) -> Result<(), LoraError> {
    if rank == 0 || rank > spec.rank_max {
        return Err(LoraError::Rank { rank, rank_max: spec.rank_max });
    }
    Ok(())
}

/// Zero-pad `t` along `axis` (0 or 1) to `to`, multiplying every value by `scale`.
pub(crate) fn pad_rank(t: &HostTensor, axis: usize, to: usize, scale: f32) -> HostTensor {
    // Validated as f32 before padding; anything else pads as zeros.
    let src = t.as_f32().unwrap_or(&[]);
    let outer: usize = t.shape[..axis].iter().product();
    let r = t.shape[axis];
    let inner: usize = t.shape[axis + 1..].iter().product();
    let mut shape = t.shape.clone();
    shape[axis] = to;
    let mut data = vec![0.0f32; outer * to * inner];
    for o in 0..outer {
        let Some(from) = src.get(o * r * inner..(o + 1) * r * inner) else { break };
        let dst = &mut data[o * to * inner..o * to * inner + r * inner];
        for (d, s) in dst.iter_mut().zip(from) {
            *d = s * scale;
        }
    }
    HostTensor { shape, data: HostData::F32(data) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{LoraSlot, SlotKind};

    fn spec() -> LoraSpec {
        LoraSpec {
            dropout_input: None,
            rank_max: 4,
            slots: vec![
                LoraSlot {
                    module: "fc".into(),
                    kind: SlotKind::Linear,
                    in_features: 3,
                    out_features: 2,
                    a_input: "fc.lora_A".into(),
                    b_input: "fc.lora_B".into(),
                    a_shape: vec![4, 3],
                    b_shape: vec![2, 4],
                },
                LoraSlot {
                    module: "conv".into(),
                    kind: SlotKind::Conv2d,
                    in_features: 1,
                    out_features: 2,
                    a_input: "conv.lora_A".into(),
                    b_input: "conv.lora_B".into(),
                    a_shape: vec![4, 1, 3, 3],
                    b_shape: vec![2, 4, 1, 1],
                },
            ],
        }
    }

    #[test]
    fn padding_places_values_and_scales_b() {
        let w = LoraWeights {
            rank: 2,
            alpha: 4.0,
            modules: vec![LoraModule {
                module: "fc".into(),
                a: HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap(),
                b: HostTensor::f32(vec![2, 2], vec![1., 2., 3., 4.]).unwrap(),
            }],
        };
        let inputs = w.lora_inputs(&spec()).unwrap();
        assert_eq!(inputs[0].shape, vec![4, 3]);
        assert_eq!(inputs[0].as_f32().unwrap(), &[1., 2., 3., 4., 5., 6., 0., 0., 0., 0., 0., 0.]);
        // scale = alpha / r = 2; B's columns padded from 2 to 4.
        assert_eq!(inputs[1].as_f32().unwrap(), &[2., 4., 0., 0., 6., 8., 0., 0.]);
        // The conv slot the adapter does not name is all zeros at full shape.
        assert_eq!(inputs[2].shape, vec![4, 1, 3, 3]);
        assert!(inputs[3].as_f32().unwrap().iter().all(|&x| x == 0.0));

        // And back: the same update at alpha = rank (the scale lives in B now); the empty slot is left out.
        let back = from_lora_inputs(&spec(), &inputs, 2).unwrap();
        assert_eq!((back.rank, back.alpha, back.modules.len()), (2, 2.0, 1));
        assert_eq!(back.modules[0].a, w.modules[0].a);
        assert_eq!(back.modules[0].b.as_f32().unwrap(), &[2., 4., 6., 8.]);
        assert_eq!(back.lora_inputs(&spec()).unwrap(), inputs);
    }

    #[test]
    fn refuses_wrong_rank_shape_slot_and_nan() {
        let s = spec();
        assert!(matches!(LoraWeights::random(&s, 5, 8.0, 1, 0.1), Err(LoraError::Rank { rank: 5, rank_max: 4 })));
        assert!(matches!(LoraWeights::random(&s, 0, 8.0, 1, 0.1), Err(LoraError::Rank { .. })));

        let mut w = LoraWeights::random(&s, 2, 8.0, 1, 0.1).unwrap();
        w.modules[0].a = HostTensor::f32(vec![2, 5], vec![0.0; 10]).unwrap();
        let err = w.lora_inputs(&s).unwrap_err();
        assert!(err.to_string().contains("\"fc\"") && err.to_string().contains("[2, 5]"), "{err}");

        let mut w = LoraWeights::random(&s, 2, 8.0, 1, 0.1).unwrap();
        w.modules[1].module = "nope".into();
        assert!(matches!(w.validate(&s), Err(LoraError::UnknownSlot(m)) if m == "nope"));

        let mut w = LoraWeights::random(&s, 2, 8.0, 1, 0.1).unwrap();
        if let HostData::F32(v) = &mut w.modules[0].b.data {
            v[1] = f32::NAN;
        }
        assert!(matches!(w.validate(&s), Err(LoraError::NonFinite { which: "B", .. })));

        let mut w = LoraWeights::random(&s, 2, 8.0, 1, 0.1).unwrap();
        w.alpha = f32::INFINITY;
        assert!(matches!(w.validate(&s), Err(LoraError::Alpha(_))));
    }

    #[test]
    fn no_adapter_is_all_zeros_at_slot_shapes() {
        let inputs = no_lora_inputs(&spec());
        assert_eq!(inputs.iter().map(|t| t.shape.clone()).collect::<Vec<_>>(), vec![vec![4, 3], vec![2, 4], vec![4, 1, 3, 3], vec![2, 4, 1, 1]]);
        assert!(inputs.iter().all(|t| t.as_f32().unwrap().iter().all(|&x| x == 0.0)));
    }
}
