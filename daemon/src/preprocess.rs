//! Turning what clients and sensors send into the bundle's model inputs.

use adaptd_adapters::bundle::{Bundle, DType, Preprocessing};
use adaptd_adapters::tensor::HostTensor;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("bundle {bundle:?} takes {kind} input, not text")]
    NotText { bundle: String, kind: &'static str },
    #[error("{path}: cannot load the tokenizer: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("no texts to encode")]
    Empty,
    #[error("bundle {bundle:?} takes {kind} input, not images")]
    NotImage { bundle: String, kind: &'static str },
    #[error("the image does not decode: {0}")]
    Image(String),
    /// It decodes, or would, but is larger than this bundle takes (refused from its header).
    #[error("the image is too large: {0}")]
    ImageTooLarge(String),
}

impl PreprocessError {
    pub fn error_type(&self) -> &'static str {
        match self {
            PreprocessError::NotText { .. } => "wrong_kind",
            PreprocessError::Tokenizer { .. } => "tokenizer",
            PreprocessError::Encode(_) | PreprocessError::Empty => "encode",
            PreprocessError::NotImage { .. } => "wrong_kind",
            PreprocessError::Image(_) | PreprocessError::ImageTooLarge(_) => "bad_image",
        }
    }
}

/// A text bundle's tokenizer, padding each batch to its longest text and cutting at `max_length`.
pub struct TextEncoder {
    tokenizer: Tokenizer,
}

impl TextEncoder {
    pub fn from_bundle(bundle: &Bundle) -> Result<TextEncoder, PreprocessError> {
        let (file, max_length) = match &bundle.manifest.preprocessing {
            Preprocessing::Text { tokenizer, max_length } => (tokenizer, *max_length),
            Preprocessing::Tensor => return Err(PreprocessError::NotText { bundle: bundle.manifest.name.clone(), kind: "tensor" }),
            Preprocessing::Image { .. } => return Err(PreprocessError::NotText { bundle: bundle.manifest.name.clone(), kind: "image" }),
        };
        let path = bundle.file_path(file);
        let tok_err = |reason: String| PreprocessError::Tokenizer { path: path.display().to_string(), reason };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| tok_err(e.to_string()))?;
        // The shipped tokenizer pads every text to a fixed 128; a batch only needs its longest.
        let padding = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..padding }));
        tokenizer.with_truncation(Some(TruncationParams { max_length, ..Default::default() })).map_err(|e| tok_err(e.to_string()))?;
        Ok(TextEncoder { tokenizer })
    }

    /// `[input_ids, attention_mask]`, both `[batch, seq]` i64, in the bundle's input order.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<HostTensor>, PreprocessError> {
        if texts.is_empty() {
            return Err(PreprocessError::Empty);
        }
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| PreprocessError::Encode(e.to_string()))?;
        let seq = encodings[0].get_ids().len();
        let mut ids = Vec::with_capacity(texts.len() * seq);
        let mut mask = Vec::with_capacity(texts.len() * seq);
        for enc in &encodings {
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            mask.extend(enc.get_attention_mask().iter().map(|&m| m as i64));
        }
        let shape = vec![texts.len(), seq];
        let to_err = |e: adaptd_adapters::tensor::ShapeError| PreprocessError::Encode(e.to_string());
        Ok(vec![HostTensor::i64(shape.clone(), ids).map_err(to_err)?, HostTensor::i64(shape, mask).map_err(to_err)?])
    }
}

/// Decode a PNG or JPEG into an image bundle's model input `[1, channels, height, width]`:
/// converted to grey or RGB as the bundle wants, resized (bilinear), scaled by `pixel_scale`.
pub fn decode_image(bundle_name: &str, preprocessing: &Preprocessing, bytes: &[u8]) -> Result<HostTensor, PreprocessError> {
    let Preprocessing::Image { height, width, channels, pixel_scale } = *preprocessing else {
        let kind = if matches!(preprocessing, Preprocessing::Text { .. }) { "text" } else { "tensor" };
        return Err(PreprocessError::NotImage { bundle: bundle_name.to_string(), kind });
    };
    let img = decode_bounded(bytes, height, width, channels)?;
    let resize = |i: image::DynamicImage| i.resize_exact(width as u32, height as u32, image::imageops::FilterType::Triangle);
    let (h, w) = (height, width);
    let mut data = vec![0.0f32; channels * h * w];
    match channels {
        1 => {
            let grey = resize(img).to_luma8();
            for (i, p) in grey.pixels().enumerate() {
                data[i] = p.0[0] as f32 * pixel_scale;
            }
        }
        3 => {
            let rgb = resize(img).to_rgb8();
            for (i, p) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    data[c * h * w + i] = p.0[c] as f32 * pixel_scale; // channels first
                }
            }
        }
        n => return Err(PreprocessError::Image(format!("bundles with {n} channels are not supported (1 or 3)"))),
    }
    HostTensor::f32(vec![1, channels, h, w], data).map_err(|e| PreprocessError::Image(e.to_string()))
}

/// The largest side a source image may have for a model input of `height` x `width`: generous
/// for real cameras (a 28x28 model still takes a 1024x1024 photo; a 224x224 one up to 7168), and
/// far below what a few kilobytes of PNG can declare (20000x20000, 1.6 GB of pixels).
pub fn max_image_side(height: usize, width: usize) -> u32 {
    (height.max(width).saturating_mul(32)).clamp(1024, 8192) as u32
}

/// Decode with the image's declared size checked before any pixel is allocated: a
/// decompression bomb is refused from its header, in microseconds, with no allocation.
fn decode_bounded(bytes: &[u8], height: usize, width: usize, channels: usize) -> Result<image::DynamicImage, PreprocessError> {
    let side = max_image_side(height, width);
    // The sides are checked from the header below; the decoder's own limit bounds what it
    // allocates: the largest image at 16-bit RGBA (8 bytes a pixel), plus the model input.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(u64::from(side) * u64::from(side) * 8 + (channels * height * width * 4) as u64);
    let open = || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| PreprocessError::Image(e.to_string()));
    // The header alone says how big the image claims to be.
    let (w, h) = open()?.into_dimensions().map_err(|e| PreprocessError::Image(e.to_string()))?;
    if w > side || h > side {
        return Err(PreprocessError::ImageTooLarge(format!("{w}x{h} pixels is over the {side}x{side} taken for this bundle's {width}x{height} input")));
    }
    let mut reader = open()?;
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => {
            PreprocessError::ImageTooLarge(format!("{l}: decoding a {w}x{h} image would take more memory than a {side}x{side} one"))
        }
        other => PreprocessError::Image(other.to_string()),
    })
}

/// A JSON tensor (inference requests and samples write tensors alike) as a host tensor of
/// `dtype` (i64 inputs must be integers), or why not.
pub fn json_tensor_to_host(t: adaptd_protocol::wire::JsonTensor, dtype: DType) -> Result<HostTensor, String> {
    let n = adaptd_adapters::tensor::element_count(&t.shape).ok_or_else(|| format!("shape {:?} has more elements than memory can address", t.shape))?;
    if n != t.data.len() {
        return Err(format!("shape {:?} needs {n} values, got {}", t.shape, t.data.len()));
    }
    let tensor = match dtype {
        DType::F32 => {
            let v: Option<Vec<f32>> = t.data.iter().map(|x| x.as_f64().map(|f| f as f32)).collect();
            HostTensor::f32(t.shape, v.ok_or("values must be numbers")?)
        }
        _ => {
            let v: Option<Vec<i64>> = t.data.iter().map(serde_json::Number::as_i64).collect();
            HostTensor::i64(t.shape, v.ok_or("values must be integers")?)
        }
    };
    tensor.map_err(|e| e.to_string())
}

/// A safetensors tensor as the model input `want` (F32, or I64 with I32 widened), or why not.
/// Used by inference requests and by samples, so both read the compact form alike.
pub fn tensor_from_safetensors(view: &safetensors::tensor::TensorView<'_>, want: DType) -> Result<HostTensor, String> {
    use adaptd_adapters::tensor::{f32s_from_le, i64s_from_le};
    use safetensors::Dtype;
    let (shape, bytes) = (view.shape().to_vec(), view.data());
    let tensor = match (want, view.dtype()) {
        (DType::F32, Dtype::F32) => HostTensor::f32(shape, f32s_from_le(bytes)),
        (DType::I64, Dtype::I64) => HostTensor::i64(shape, i64s_from_le(bytes)),
        (DType::I64, Dtype::I32) => HostTensor::i64(shape, bytes.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect()),
        (want, got) => return Err(format!("must be {want:?}, got {got:?}")),
    };
    tensor.map_err(|e| e.to_string())
}
