//! Decoding sample payloads. JSON for people (`mosquitto_pub -m '{...}'`), in the form
//! [`adaptd_protocol::wire::SampleMessage`] describes: `"input"` (a tensor), `"text"` for text
//! bundles, or `"image"` (base64 JPEG or PNG) for image bundles (decoded, resized and cropped by
//! the bundle's own preprocessing and kept as bytes). The compact form is safetensors bytes: one
//! tensor named `input` (F32/I64), or one named `image` holding a JPEG/PNG file's bytes (U8, one
//! axis) or a raw camera frame (U8 `[height, width, 3]`, RGB), or no tensor and a `text`
//! metadata field for text bundles; the other fields are string metadata (`key`, `task`, `label`,
//! optional `timestamp_ms`, `source`, `weight`, `correction`). Every refusal says why.

use std::collections::HashMap;

use adaptd_adapters::bundle::{DType, Manifest, Preprocessing};
use adaptd_adapters::tensor::{HostData, HostTensor};
use adaptd_protocol::wire::{SAMPLE_METADATA, SampleMessage};
use safetensors::{Dtype, SafeTensors};

use crate::preprocess::json_tensor_to_host;
use crate::samples::{Sample, SampleInput};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid safetensors sample: {0}")]
    Safetensors(String),
    #[error("unknown task {task:?} (known: {known})")]
    UnknownTask { task: String, known: String },
    #[error("field {field:?}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("input: {0}")]
    Input(String),
    #[error("image: {0}")]
    Image(String),
    #[error("key {key:?} is stored already as {kept:?}; this message says {sent:?} (the first one stands: send a new key for a new sample)")]
    Conflict { key: String, sent: String, kept: String },
}

impl DecodeError {
    pub fn error_type(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Json(_) => "bad_json",
            DecodeError::Safetensors(_) => "bad_safetensors",
            DecodeError::UnknownTask { .. } => "unknown_task",
            DecodeError::Field { .. } => "bad_field",
            DecodeError::Input(_) => "bad_input",
            DecodeError::Image(_) => "bad_image",
            DecodeError::Conflict { .. } => "conflicting_label",
        }
    }
}

/// What a decoder checks samples against: the bundle's input and the tasks it serves.
pub struct SampleSchema<'a> {
    pub manifest: &'a Manifest,
    pub tasks: &'a [String],
    pub max_bytes: usize,
}

fn field(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Field { field, reason: reason.into() }
}

/// Decode one payload into a sample that fits the bundle, or say why not.
pub fn decode_sample(payload: &[u8], schema: &SampleSchema<'_>, now_ms: i64) -> Result<Sample, DecodeError> {
    if payload.len() > schema.max_bytes {
        return Err(DecodeError::TooLarge { size: payload.len(), limit: schema.max_bytes });
    }
    if payload.is_empty() {
        return Err(DecodeError::Json("the payload is empty: send a JSON sample or safetensors bytes".into()));
    }
    // safetensors starts with a little-endian u64 header length, JSON with '{' (after spaces).
    let sample = if payload.first().is_some_and(|b| b.is_ascii_whitespace() || *b == b'{') {
        // One sample is one row of the bundle's single input, in the bundle's dtype.
        decode_json(payload, schema.manifest, now_ms)?
    } else {
        decode_safetensors(payload, schema.manifest, now_ms)?
    };
    check(sample, schema)
}

fn label_of(v: &serde_json::Value) -> Result<String, DecodeError> {
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        // Past 64 bits serde_json reads an integer as a float and would print it as one.
        serde_json::Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
            Err(field("label", "is an integer too large for 64 bits; send it as a string"))
        }
        other => Err(field("label", format!("must be a string or an integer, got {other}"))),
    }
}

fn decode_json(payload: &[u8], manifest: &Manifest, now_ms: i64) -> Result<Sample, DecodeError> {
    // One sample is one row of the bundle's single input, in the bundle's dtype.
    let dtype = manifest.inputs.first().map_or(DType::F32, |i| i.dtype);
    let j: SampleMessage = serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    let input = match (j.input, j.text, j.image) {
        (Some(t), None, None) => SampleInput::Tensor(json_tensor_to_host(t, dtype).map_err(DecodeError::Input)?),
        (None, Some(text), None) => SampleInput::Text(text),
        (None, None, Some(b64)) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| DecodeError::Image(format!("not base64: {e}")))?;
            SampleInput::Image(crate::preprocess::image_pixels(&manifest.name, &manifest.preprocessing, &bytes).map_err(|e| DecodeError::Image(e.to_string()))?)
        }
        (None, None, None) => return Err(DecodeError::Json("missing \"input\" (or \"text\" for text bundles, \"image\" for image bundles)".into())),
        _ => return Err(DecodeError::Json("give one of \"input\", \"text\" or \"image\"".into())),
    };
    Ok(Sample {
        key: j.key,
        task: j.task,
        label: label_of(&j.label)?,
        input,
        weight: j.weight.unwrap_or(1.0),
        source: j.source,
        timestamp_ms: j.timestamp_ms.unwrap_or(now_ms),
        correction: j.correction,
        request_id: j.request_id,
    })
}

fn decode_safetensors(payload: &[u8], manifest: &Manifest, now_ms: i64) -> Result<Sample, DecodeError> {
    let bad = |m: String| DecodeError::Safetensors(m);
    let (_, metadata) = SafeTensors::read_metadata(payload).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(payload).map_err(|e| bad(e.to_string()))?;
    let meta: HashMap<String, String> = metadata.metadata().clone().unwrap_or_default();
    if let Some(unknown) = meta.keys().find(|k| !SAMPLE_METADATA.contains(&k.as_str())) {
        return Err(bad(format!("unknown metadata field {unknown:?} (allowed: {})", SAMPLE_METADATA.join(", "))));
    }
    let names = st.names();
    let input = match (names.as_slice(), meta.get("text")) {
        ([], Some(text)) => SampleInput::Text(text.clone()),
        ([name], None) if *name == "input" => {
            let t = st.tensor("input").map_err(|e| bad(e.to_string()))?;
            // In the bundle's dtype, as inference requests are read.
            let dtype = manifest.inputs.first().map_or(DType::F32, |i| i.dtype);
            let tensor = crate::preprocess::tensor_from_safetensors(&t, dtype).map_err(|e| DecodeError::Input(format!("tensor \"input\" {e}")))?;
            SampleInput::Tensor(tensor)
        }
        ([name], None) if *name == "image" => {
            let t = st.tensor("image").map_err(|e| bad(e.to_string()))?;
            // One sample is one image: a file or a frame, not a batch of frames.
            if t.dtype() != Dtype::U8 || !matches!(t.shape().len(), 1 | 3) {
                return Err(bad(format!(
                    "tensor \"image\" must be the bytes of a JPEG or PNG file (U8, one axis) or a raw frame (U8 [height, width, 3]), got {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            let pixels = crate::preprocess::bytes_pixels(&manifest.name, &manifest.preprocessing, t.shape(), t.data());
            SampleInput::Image(pixels.map_err(|e| DecodeError::Image(e.to_string()))?)
        }
        (names, text) => {
            return Err(bad(format!(
                "expected one tensor named \"input\" or \"image\", or none and a \"text\" metadata field; found tensors {names:?}{}",
                if text.is_some() { " and \"text\"" } else { "" }
            )));
        }
    };
    let get = |k: &'static str| meta.get(k).cloned().ok_or_else(|| field(k, "missing from the safetensors metadata"));
    let parse = |k: &'static str| -> Result<Option<f64>, DecodeError> {
        meta.get(k).map(|v| v.parse::<f64>().map_err(|_| field(k, format!("{v:?} is not a number")))).transpose()
    };
    Ok(Sample {
        key: get("key")?,
        task: get("task")?,
        label: get("label")?,
        input,
        weight: parse("weight")?.unwrap_or(1.0) as f32,
        source: meta.get("source").cloned(),
        timestamp_ms: parse("timestamp_ms")?.map_or(now_ms, |v| v as i64),
        correction: matches!(meta.get("correction").map(String::as_str), Some("true") | Some("1")),
        request_id: meta.get("request_id").cloned(),
    })
}

/// The checks both encodings share: key, task, label, weight, and the input against the bundle.
fn check(sample: Sample, schema: &SampleSchema<'_>) -> Result<Sample, DecodeError> {
    if sample.key.is_empty() || sample.key.len() > 200 {
        return Err(field("key", "must be 1-200 characters (device id + sequence, or a uuid)"));
    }
    if !schema.tasks.iter().any(|t| t == &sample.task) {
        return Err(DecodeError::UnknownTask { task: sample.task.clone(), known: schema.tasks.join(", ") });
    }
    if sample.label.is_empty() || sample.label.len() > 100 {
        return Err(field("label", "must be 1-100 characters"));
    }
    if !(sample.weight.is_finite() && sample.weight > 0.0) {
        return Err(field("weight", format!("must be finite and positive, got {}", sample.weight)));
    }
    match (&sample.input, &schema.manifest.preprocessing) {
        (SampleInput::Text(t), Preprocessing::Text { .. }) if !t.trim().is_empty() => {}
        (SampleInput::Text(_), Preprocessing::Text { .. }) => return Err(field("text", "is empty")),
        (SampleInput::Text(_), _) => return Err(DecodeError::Input(format!("bundle {:?} does not take text", schema.manifest.name))),
        (SampleInput::Tensor(t), _) => check_tensor(t, schema.manifest)?,
        // Fitted to the bundle's own size when decoded.
        (SampleInput::Image(_), _) => {}
    }
    Ok(sample)
}

/// One sample is one row: the bundle's input shape with a batch of 1, the bundle's dtype, finite.
fn check_tensor(t: &HostTensor, manifest: &Manifest) -> Result<(), DecodeError> {
    let spec = match manifest.inputs.as_slice() {
        [only] => only,
        _ => return Err(DecodeError::Input(format!("bundle {:?} takes {} inputs; send text", manifest.name, manifest.inputs.len()))),
    };
    let fits = t.shape.len() == spec.shape.len()
        && t.shape.first() == Some(&1)
        && t.shape.iter().zip(&spec.shape).skip(1).all(|(&got, &want)| want < 0 || got as i64 == want);
    if !fits {
        return Err(DecodeError::Input(format!("shape {:?} does not fit {:?} with a batch of 1", t.shape, spec.shape)));
    }
    match (&t.data, spec.dtype) {
        (HostData::F32(v), DType::F32) => {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(DecodeError::Input(format!("non-finite value {} at element {i}", v[i])));
            }
        }
        (HostData::I64(_), DType::I64) => {}
        (_, want) => return Err(DecodeError::Input(format!("values must be {want:?}"))),
    }
    Ok(())
}

/// An event for the operator's events topic.
pub fn refusal_event(topic: &str, task: &str, error: &DecodeError) -> Vec<u8> {
    let event = adaptd_protocol::Event::SampleRefused { topic: topic.to_string(), reason: error.error_type().to_string(), message: error.to_string() };
    serde_json::to_vec(&adaptd_protocol::EventRecord { task: task.to_string(), time_ms: crate::events::now_ms(), seq: 0, event }).unwrap_or_default()
}
