//! Request and response encodings, shared by the HTTP and MQTT APIs.
//!
//! - JSON, for people and scripts ([`PredictRequest`]): `{"text": ["..."]}` for text bundles, or
//!   `{"inputs": {"<input name>": {"shape": [...], "data": [...]}}}` for tensors.
//! - a PNG or JPEG (`image/png`, `image/jpeg`) for image bundles: one image, preprocessed as the
//!   bundle's manifest says (channels, size, pixel scale).
//! - safetensors bytes (content type `application/x-safetensors`), for tensors: one tensor per
//!   model input, named as in the bundle manifest; self-describing (dtype, shape), the same format
//!   as adapter files, and written by `safetensors.numpy.save` in Python with no extra code. An
//!   image bundle's input may be U8 bytes instead: a JPEG/PNG file (`[len]`), a raw RGB camera
//!   frame (`[height, width, 3]`) or a batch of them (`[N, height, width, 3]`).
//!
//! Every refusal says what was wrong and where, and carries a stable label for metrics.

use adaptd_adapters::bundle::{Manifest, Preprocessing};
use adaptd_adapters::tensor::HostTensor;
use adaptd_protocol::wire::{ErrorBody, PredictRequest, PredictResponse, PredictionBody};
use safetensors::SafeTensors;

use crate::engine::{EngineError, Prediction};
use crate::preprocess::{TextEncoder, json_tensor_to_host};

pub const CONTENT_JSON: &str = "application/json";
pub const CONTENT_SAFETENSORS: &str = "application/x-safetensors";
pub const CONTENT_PNG: &str = "image/png";
pub const CONTENT_JPEG: &str = "image/jpeg";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("payload of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error(
        "content type {0:?} is not supported: send application/json, application/x-safetensors, image/png or image/jpeg (with curl: -H 'content-type: application/json')"
    )]
    ContentType(String),
    #[error("invalid JSON request: {0}")]
    Json(String),
    #[error("invalid safetensors request: {0}")]
    Safetensors(String),
    #[error("{0}")]
    Input(String),
}

impl WireError {
    pub fn error_type(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too_large",
            WireError::ContentType(_) => "content_type",
            WireError::Json(_) => "bad_json",
            WireError::Safetensors(_) => "bad_safetensors",
            WireError::Input(_) => "bad_input",
        }
    }
}

fn media_type(content_type: Option<&str>) -> Option<String> {
    content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// A PNG or JPEG body, or safetensors for an image bundle (files or camera frames): decoding
/// and resizing it is CPU work of milliseconds, done off the async workers.
pub fn decodes_images(content_type: Option<&str>, manifest: &Manifest) -> bool {
    match media_type(content_type).as_deref() {
        Some(CONTENT_PNG) | Some(CONTENT_JPEG) | Some("image/jpg") => true,
        Some(CONTENT_SAFETENSORS) => matches!(manifest.preprocessing, Preprocessing::Image { .. }),
        _ => false,
    }
}

/// Decode a request body into the bundle's model inputs.
pub fn decode(body: &[u8], content_type: Option<&str>, manifest: &Manifest, text: Option<&TextEncoder>, limit: usize) -> Result<Vec<HostTensor>, WireError> {
    if body.len() > limit {
        return Err(WireError::TooLarge { size: body.len(), limit });
    }
    match media_type(content_type).as_deref() {
        None | Some("") | Some(CONTENT_JSON) | Some("text/json") => decode_json(body, manifest, text),
        Some(CONTENT_SAFETENSORS) => decode_safetensors(body, manifest),
        Some(CONTENT_PNG) | Some(CONTENT_JPEG) | Some("image/jpg") => {
            let image = crate::preprocess::decode_image(&manifest.name, &manifest.preprocessing, body).map_err(|e| WireError::Input(e.to_string()))?;
            Ok(vec![image])
        }
        Some(other) => Err(WireError::ContentType(other.to_string())),
    }
}

fn decode_json(body: &[u8], manifest: &Manifest, text: Option<&TextEncoder>) -> Result<Vec<HostTensor>, WireError> {
    let req: PredictRequest = serde_json::from_slice(body).map_err(|e| WireError::Json(e.to_string()))?;
    match (req.text, req.inputs) {
        (Some(texts), None) => {
            let encoder = match (&manifest.preprocessing, text) {
                (Preprocessing::Text { .. }, Some(enc)) => enc,
                _ => return Err(WireError::Input(format!("bundle {:?} does not take text; send \"inputs\"", manifest.name))),
            };
            if texts.is_empty() {
                return Err(WireError::Input("\"text\" is empty".into()));
            }
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            encoder.encode(&refs).map_err(|e| WireError::Input(e.to_string()))
        }
        (None, Some(mut inputs)) => {
            let mut out = Vec::with_capacity(manifest.inputs.len());
            for spec in &manifest.inputs {
                let t = inputs.remove(&spec.name).ok_or_else(|| WireError::Input(format!("missing input {:?}", spec.name)))?;
                let tensor = json_tensor_to_host(t, spec.dtype).map_err(|e| WireError::Input(format!("input {:?}: {e}", spec.name)));
                out.push(tensor?);
            }
            if let Some(extra) = inputs.keys().next() {
                return Err(WireError::Input(format!(
                    "unknown input {extra:?}; the model takes {:?}",
                    manifest.inputs.iter().map(|i| &i.name).collect::<Vec<_>>()
                )));
            }
            Ok(out)
        }
        (Some(_), Some(_)) => Err(WireError::Json("give either \"text\" or \"inputs\", not both".into())),
        (None, None) => Err(WireError::Json("expected \"text\" or \"inputs\"".into())),
    }
}

fn decode_safetensors(body: &[u8], manifest: &Manifest) -> Result<Vec<HostTensor>, WireError> {
    let st = SafeTensors::deserialize(body).map_err(|e| WireError::Safetensors(e.to_string()))?;
    for name in st.names() {
        if !manifest.inputs.iter().any(|i| i.name == name) {
            return Err(WireError::Input(format!("unknown input {name:?}; the model takes {:?}", manifest.inputs.iter().map(|i| &i.name).collect::<Vec<_>>())));
        }
    }
    manifest
        .inputs
        .iter()
        .map(|spec| {
            let t = st.tensor(&spec.name).map_err(|_| WireError::Input(format!("missing input {:?}", spec.name)))?;
            if t.dtype() == safetensors::Dtype::U8 && matches!(manifest.preprocessing, Preprocessing::Image { .. }) {
                return camera_input(&t, manifest).map_err(|e| WireError::Input(format!("input {:?}: {e}", spec.name)));
            }
            crate::preprocess::tensor_from_safetensors(&t, spec.dtype).map_err(|e| WireError::Input(format!("input {:?} {e}", spec.name)))
        })
        .collect()
}

/// An image bundle's input sent as bytes: a JPEG or PNG file (U8 `[len]`), a raw RGB frame
/// (U8 `[height, width, 3]`) or a batch of frames (U8 `[N, height, width, 3]`), fitted and
/// normalised as the bundle's preprocessing says.
fn camera_input(t: &safetensors::tensor::TensorView<'_>, manifest: &Manifest) -> Result<HostTensor, crate::preprocess::PreprocessError> {
    let pixels = camera_pixels(t, manifest)?;
    crate::preprocess::normalize(&manifest.name, &manifest.preprocessing, &pixels.iter().collect::<Vec<_>>())
}

/// U8 bytes as the images they hold, fitted to the bundle: a JPEG/PNG file `[len]`, a raw frame
/// `[height, width, 3]` or frames `[N, height, width, 3]`.
fn camera_pixels(t: &safetensors::tensor::TensorView<'_>, manifest: &Manifest) -> Result<Vec<crate::preprocess::Pixels>, crate::preprocess::PreprocessError> {
    use crate::preprocess::{PreprocessError, bytes_pixels, frame_pixels};
    let (name, pre) = (&manifest.name, &manifest.preprocessing);
    Ok(match *t.shape() {
        [_] | [_, _, _] => vec![bytes_pixels(name, pre, t.shape(), t.data())?],
        [n, h, w, c] if n > 0 => {
            let frame = h.saturating_mul(w).saturating_mul(c);
            if frame.saturating_mul(n) != t.data().len() {
                return Err(PreprocessError::Image(format!("{n} frames of {h}x{w}x{c} need {} bytes", frame.saturating_mul(n))));
            }
            t.data().chunks_exact(frame.max(1)).map(|f| frame_pixels(name, pre, &[h, w, c], f)).collect::<Result<_, _>>()?
        }
        ref shape => {
            return Err(PreprocessError::Image(format!(
                "U8 bytes are a JPEG/PNG file [len], a raw frame [height, width, 3] or frames [N, height, width, 3], got shape {shape:?}"
            )));
        }
    })
}

/// Row `row` of a prediction request as a sample takes it: a text, an image as the bundle fits
/// it, or one row of the bundle's single input. What a label request asks about.
pub fn sample_input(body: &[u8], content_type: Option<&str>, manifest: &Manifest, row: usize) -> Result<crate::samples::SampleInput, WireError> {
    use crate::samples::SampleInput;
    let input_err = |e: &dyn std::fmt::Display| WireError::Input(e.to_string());
    let no_row = || WireError::Input(format!("the request has no row {row}"));
    let tensor_row = |t: HostTensor| if row < t.shape.first().copied().unwrap_or(0) { Ok(SampleInput::Tensor(t.rows(row, row + 1))) } else { Err(no_row()) };
    let (name, pre) = (&manifest.name, &manifest.preprocessing);
    match media_type(content_type).as_deref() {
        None | Some("") | Some(CONTENT_JSON) | Some("text/json") => {
            let req: PredictRequest = serde_json::from_slice(body).map_err(|e| WireError::Json(e.to_string()))?;
            match (req.text, req.inputs) {
                (Some(texts), _) => texts.into_iter().nth(row).map(SampleInput::Text).ok_or_else(no_row),
                (None, Some(mut inputs)) if manifest.inputs.len() == 1 => {
                    let spec = &manifest.inputs[0];
                    let t = inputs.remove(&spec.name).ok_or_else(|| WireError::Input(format!("missing input {:?}", spec.name)))?;
                    tensor_row(json_tensor_to_host(t, spec.dtype).map_err(|e| input_err(&e))?)
                }
                _ => Err(WireError::Input("a sample holds one input; this bundle takes several".into())),
            }
        }
        Some(CONTENT_PNG) | Some(CONTENT_JPEG) | Some("image/jpg") if row == 0 => {
            crate::preprocess::image_pixels(name, pre, body).map(SampleInput::Image).map_err(|e| input_err(&e))
        }
        Some(CONTENT_SAFETENSORS) => {
            let st = SafeTensors::deserialize(body).map_err(|e| WireError::Safetensors(e.to_string()))?;
            let spec = manifest.inputs.first().ok_or_else(|| WireError::Input("the bundle takes no input".into()))?;
            let t = st.tensor(&spec.name).map_err(|_| WireError::Input(format!("missing input {:?}", spec.name)))?;
            if t.dtype() == safetensors::Dtype::U8 && matches!(pre, Preprocessing::Image { .. }) {
                let pixels = camera_pixels(&t, manifest).map_err(|e| input_err(&e))?;
                return pixels.into_iter().nth(row).map(SampleInput::Image).ok_or_else(no_row);
            }
            tensor_row(crate::preprocess::tensor_from_safetensors(&t, spec.dtype).map_err(|e| input_err(&e))?)
        }
        Some(_) => Err(no_row()),
    }
}

/// The answer's body: [`PredictResponse`].
pub fn encode_predictions(preds: &[Prediction]) -> Vec<u8> {
    let response = PredictResponse {
        predictions: preds
            .iter()
            .map(|p| PredictionBody {
                label: p.label().to_string(),
                class_index: p.class_index,
                scores: p.labels.iter().cloned().zip(p.scores.iter().copied()).collect(),
                adapter: p.adapter.to_string(),
                adapter_version: p.adapter_version,
                base_routed: p.base_routed,
            })
            .collect(),
    };
    serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"predictions\": []}".to_vec())
}

/// A refusal's body: [`ErrorBody`].
pub fn encode_error(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody::new(error_type, message)).unwrap_or_else(|_| b"{\"error\": {}}".to_vec())
}

/// What went wrong with a request, for either transport.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ApiError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Wire(e) => e.error_type(),
            ApiError::Engine(e) => e.error_type(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::SampleInput;

    #[test]
    fn a_request_row_becomes_the_input_a_sample_takes() {
        let manifest = crate::engine::two_value_manifest();
        let body = br#"{"inputs": {"x": {"shape": [2, 2], "data": [1, 2, 3, 4]}}}"#;
        let Ok(SampleInput::Tensor(t)) = sample_input(body, Some(CONTENT_JSON), &manifest, 1) else { panic!("a tensor row") };
        assert_eq!((t.shape.clone(), t.as_f32().map(<[f32]>::to_vec)), (vec![1, 2], Some(vec![3.0, 4.0])));
        let err = sample_input(body, Some(CONTENT_JSON), &manifest, 2).unwrap_err();
        assert!(err.to_string().contains("no row 2"), "{err}");
        let texts = br#"{"text": ["turn on the light", "what time is it"]}"#;
        assert_eq!(sample_input(texts, None, &manifest, 1).unwrap(), SampleInput::Text("what time is it".into()));
        assert!(sample_input(b"{", Some(CONTENT_JSON), &manifest, 0).is_err());
    }
}
