//! An adapter's slot values: the graph inputs that follow the model's own in the slotted graphs,
//! LoRA's `A, B` per LoRA slot and then LoReFT's `R, W, b` per LoReFT slot (and its positions).
//! Every path that feeds a graph (serving, training, parity, probes) builds them here, so the
//! two kinds always line up with the manifest.

use crate::bundle::Manifest;
use crate::lora::{LoraError, LoraWeights};
use crate::reft::{ReftError, ReftWeights};
use crate::tensor::HostTensor;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Reft(#[from] ReftError),
}

impl SlotError {
    pub fn error_type(&self) -> &'static str {
        match self {
            SlotError::Lora(e) => e.error_type(),
            SlotError::Reft(e) => e.error_type(),
        }
    }
}

/// The slot values of an adapter with this LoRA and this LoReFT (either may be absent: zeros).
pub fn adapter_inputs(manifest: &Manifest, lora: Option<&LoraWeights>, reft: Option<&ReftWeights>) -> Result<Vec<HostTensor>, SlotError> {
    let mut out = match lora {
        Some(lora) => lora.lora_inputs(&manifest.lora)?,
        None => crate::lora::no_lora_inputs(&manifest.lora),
    };
    match (&manifest.reft, reft) {
        (Some(spec), Some(reft)) => out.extend(reft.reft_inputs(spec)?),
        (Some(spec), None) => out.extend(crate::reft::no_edit_inputs(spec)),
        (None, Some(_)) => return Err(ReftError::NoSlots.into()),
        (None, None) => {}
    }
    Ok(out)
}

/// Slot values that serve the base model unchanged: every slot all zeros.
pub fn no_adapter_inputs(manifest: &Manifest) -> Vec<HostTensor> {
    let mut out = crate::lora::no_lora_inputs(&manifest.lora);
    if let Some(spec) = &manifest.reft {
        out.extend(crate::reft::no_edit_inputs(spec));
    }
    out
}

/// The LoRA part of slot values, and the LoReFT part.
pub fn split<'a>(manifest: &Manifest, inputs: &'a [HostTensor]) -> (&'a [HostTensor], &'a [HostTensor]) {
    inputs.split_at((2 * manifest.lora.slots.len()).min(inputs.len()))
}

/// Whether slot values change nothing: no LoRA slot adds anything and no LoReFT slot edits.
pub fn changes_nothing(manifest: &Manifest, inputs: &[HostTensor]) -> bool {
    lora_adds_nothing(manifest, inputs) && reft_edits_nothing(manifest, inputs)
}

/// Whether the LoRA part of slot values adds nothing (each slot's A or B all zeros).
pub fn lora_adds_nothing(manifest: &Manifest, inputs: &[HostTensor]) -> bool {
    let (lora, _) = split(manifest, inputs);
    lora.chunks(2).all(crate::lora::slot_adds_nothing)
}

/// Whether the LoReFT part of slot values edits nothing (a bundle without LoReFT slots: true).
pub fn reft_edits_nothing(manifest: &Manifest, inputs: &[HostTensor]) -> bool {
    let (_, reft) = split(manifest, inputs);
    manifest.reft.as_ref().is_none_or(|spec| crate::reft::edits_nothing(spec, reft))
}
