//! Turning what clients and sensors send into the bundle's model inputs.

use adaptd_adapters::bundle::{Bundle, ChannelOrder, DType, ImageResize, Preprocessing};
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

/// An image as an image bundle's model sees it before normalisation: resized (and cropped) to
/// the model's size, channels last, one byte a value. What the sample store keeps of a camera
/// frame: a quarter of its model input in f32, and exact (normalising is applied when used).
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// An image bundle's preprocessing, read out of the manifest's enum once.
#[derive(Debug, Clone, Copy)]
struct ImageSpec<'a> {
    height: usize,
    width: usize,
    channels: usize,
    pixel_scale: f32,
    resize: ImageResize,
    resize_to: Option<usize>,
    mean: Option<&'a [f32]>,
    std: Option<&'a [f32]>,
    channel_order: ChannelOrder,
}

/// The bundle's image preprocessing, or the refusal naming what the bundle takes instead.
fn image_spec<'a>(bundle_name: &str, preprocessing: &'a Preprocessing) -> Result<ImageSpec<'a>, PreprocessError> {
    match preprocessing {
        Preprocessing::Image { height, width, channels, pixel_scale, resize, resize_to, mean, std, channel_order } => Ok(ImageSpec {
            height: *height,
            width: *width,
            channels: *channels,
            pixel_scale: *pixel_scale,
            resize: *resize,
            resize_to: *resize_to,
            mean: mean.as_deref(),
            std: std.as_deref(),
            channel_order: *channel_order,
        }),
        Preprocessing::Text { .. } => Err(PreprocessError::NotImage { bundle: bundle_name.to_string(), kind: "text" }),
        Preprocessing::Tensor => Err(PreprocessError::NotImage { bundle: bundle_name.to_string(), kind: "tensor" }),
    }
}

/// Fitted pixels as a PNG file (what a label request carries, so a person can look at it).
pub fn png_bytes(pixels: &Pixels) -> Result<Vec<u8>, PreprocessError> {
    use image::ImageEncoder as _;
    let color = match pixels.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => return Err(PreprocessError::Image(format!("{c} channels cannot be written as a PNG"))),
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&pixels.data, pixels.width as u32, pixels.height as u32, color)
        .map_err(|e| PreprocessError::Image(e.to_string()))?;
    Ok(out)
}

/// Decode a PNG or JPEG into an image bundle's model input `[1, channels, height, width]`.
pub fn decode_image(bundle_name: &str, preprocessing: &Preprocessing, bytes: &[u8]) -> Result<HostTensor, PreprocessError> {
    let pixels = image_pixels(bundle_name, preprocessing, bytes)?;
    normalize(bundle_name, preprocessing, &[&pixels])
}

/// Decode a PNG or JPEG and fit it to the bundle's size (resize policy, crop, channels).
pub fn image_pixels(bundle_name: &str, preprocessing: &Preprocessing, bytes: &[u8]) -> Result<Pixels, PreprocessError> {
    let spec = image_spec(bundle_name, preprocessing)?;
    let img = decode_bounded(bytes, spec.height, spec.width, spec.channels)?;
    Ok(fit(img, &spec))
}

/// An image sent as bytes, by their shape: a JPEG or PNG file (`[len]`) or a raw frame
/// (`[height, width, 3]`), fitted to the bundle's size. What samples and requests share.
pub fn bytes_pixels(bundle_name: &str, preprocessing: &Preprocessing, shape: &[usize], bytes: &[u8]) -> Result<Pixels, PreprocessError> {
    match shape {
        [_] => image_pixels(bundle_name, preprocessing, bytes),
        _ => frame_pixels(bundle_name, preprocessing, shape, bytes),
    }
}

/// A raw camera frame, `[height, width, 3]` RGB (or `[height, width, 1]` grey) bytes as a
/// driver hands them, fitted to the bundle's size like a decoded file.
pub fn frame_pixels(bundle_name: &str, preprocessing: &Preprocessing, shape: &[usize], bytes: &[u8]) -> Result<Pixels, PreprocessError> {
    let spec = image_spec(bundle_name, preprocessing)?;
    let (height, width) = (spec.height, spec.width);
    let [h, w, c] = *shape else {
        return Err(PreprocessError::Image(format!("a raw frame is [height, width, channels] bytes, got shape {shape:?}")));
    };
    let side = max_image_side(height, width) as usize;
    if h > side || w > side {
        return Err(PreprocessError::ImageTooLarge(format!("a {w}x{h} frame is over the {side}x{side} taken for this bundle's {width}x{height} input")));
    }
    if h == 0 || w == 0 || h.saturating_mul(w).saturating_mul(c) != bytes.len() {
        return Err(PreprocessError::Image(format!("a {h}x{w}x{c} frame needs {} bytes, got {}", h.saturating_mul(w).saturating_mul(c), bytes.len())));
    }
    let (w32, h32) = (w as u32, h as u32);
    let img = match c {
        3 => image::RgbImage::from_raw(w32, h32, bytes.to_vec()).map(image::DynamicImage::ImageRgb8),
        1 => image::GrayImage::from_raw(w32, h32, bytes.to_vec()).map(image::DynamicImage::ImageLuma8),
        _ => return Err(PreprocessError::Image(format!("a raw frame has 3 channels (RGB) or 1 (grey), got {c}"))),
    };
    let img = img.ok_or_else(|| PreprocessError::Image(format!("a {h}x{w}x{c} frame does not fit its bytes")))?;
    Ok(fit(img, &spec))
}

/// Resize (and crop) to the model's size as the manifest says; grey or RGB as the model takes.
fn fit(img: image::DynamicImage, spec: &ImageSpec<'_>) -> Pixels {
    use image::imageops::FilterType;
    let ImageSpec { height, width, channels, resize, resize_to, .. } = *spec;
    let (w, h) = (img.width().max(1), img.height().max(1));
    let fitted = match resize {
        ImageResize::Stretch => img.resize_exact(width as u32, height as u32, FilterType::Triangle),
        ImageResize::ShorterSide => {
            // The region of the source that becomes the model's input, centred: cropping before
            // resizing scales only the pixels that are kept (a 1280x720 frame: 720x720 of them).
            let to = resize_to.unwrap_or(height.max(width)) as f64;
            let scale = to / f64::from(w.min(h));
            let crop_w = ((width as f64 / scale).round() as u32).clamp(1, w);
            let crop_h = ((height as f64 / scale).round() as u32).clamp(1, h);
            img.crop_imm((w - crop_w) / 2, (h - crop_h) / 2, crop_w, crop_h).resize_exact(width as u32, height as u32, FilterType::Triangle)
        }
    };
    let data = if channels == 1 { fitted.to_luma8().into_raw() } else { fitted.to_rgb8().into_raw() };
    Pixels { height, width, channels, data }
}

/// Model input `[N, channels, height, width]` for images already fitted to the bundle's size:
/// `(pixel * pixel_scale - mean[c]) / std[c]`, in the model's channel order.
pub fn normalize(bundle_name: &str, preprocessing: &Preprocessing, images: &[&Pixels]) -> Result<HostTensor, PreprocessError> {
    let ImageSpec { height, width, channels, pixel_scale, mean, std, channel_order, .. } = image_spec(bundle_name, preprocessing)?;
    let (h, w, c) = (height, width, channels);
    let plane = h * w;
    let mut data = vec![0.0f32; images.len() * c * plane];
    // value = pixel * a[c] + b[c]
    let (mut a, mut b) = (vec![pixel_scale; c], vec![0.0f32; c]);
    for ch in 0..c {
        // Manifest::check made both one value per channel.
        let (m, s) = (mean.and_then(|v| v.get(ch)).copied().unwrap_or(0.0), std.and_then(|v| v.get(ch)).copied().unwrap_or(1.0));
        a[ch] = pixel_scale / s;
        b[ch] = -m / s;
    }
    for (n, img) in images.iter().enumerate() {
        if (img.height, img.width, img.channels) != (h, w, c) || img.data.len() != plane * c {
            return Err(PreprocessError::Image(format!("an image of {}x{}x{} does not fit the bundle's {h}x{w}x{c}", img.height, img.width, img.channels)));
        }
        let out = &mut data[n * c * plane..(n + 1) * c * plane];
        for (i, px) in img.data.chunks_exact(c).enumerate() {
            for (src, &v) in px.iter().enumerate() {
                // Files and frames are RGB; a BGR model takes the channels the other way round.
                let dst = if channel_order == ChannelOrder::Bgr { c - 1 - src } else { src };
                out[dst * plane + i] = f32::from(v) * a[dst] + b[dst];
            }
        }
    }
    HostTensor::f32(vec![images.len(), c, h, w], data).map_err(|e| PreprocessError::Image(e.to_string()))
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

/// A host tensor as a JSON tensor: what [`json_tensor_to_host`] reads back.
pub fn host_to_json_tensor(t: &HostTensor) -> adaptd_protocol::wire::JsonTensor {
    let data = match &t.data {
        adaptd_adapters::tensor::HostData::F32(v) => v.iter().filter_map(|&x| serde_json::Number::from_f64(f64::from(x))).collect(),
        adaptd_adapters::tensor::HostData::I64(v) => v.iter().map(|&x| serde_json::Number::from(x)).collect(),
    };
    adaptd_protocol::wire::JsonTensor { shape: t.shape.clone(), data }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn camera(resize: ImageResize, resize_to: Option<usize>, order: ChannelOrder) -> Preprocessing {
        Preprocessing::Image {
            height: 4,
            width: 4,
            channels: 3,
            pixel_scale: 1.0 / 255.0,
            resize,
            resize_to,
            mean: Some(vec![0.5, 0.25, 0.0]),
            std: Some(vec![0.5, 0.25, 1.0]),
            channel_order: order,
        }
    }

    /// A 16x8 frame: the left quarter red, the middle half green, the right quarter blue.
    fn frame() -> Vec<u8> {
        let mut data = Vec::new();
        for _ in 0..8 {
            for x in 0..16 {
                data.extend_from_slice(match x {
                    0..4 => &[255, 0, 0],
                    4..12 => &[0, 255, 0],
                    _ => &[0, 0, 255],
                });
            }
        }
        data
    }

    #[test]
    fn fitted_pixels_written_as_png_decode_to_the_same_pixels() {
        let pre = camera(ImageResize::ShorterSide, None, ChannelOrder::Rgb);
        let px = frame_pixels("cam", &pre, &[8, 16, 3], &frame()).unwrap();
        let png = png_bytes(&px).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(image_pixels("cam", &pre, &png).unwrap(), px, "what a label request shows is what the sample stores");
        assert!(png_bytes(&Pixels { height: 1, width: 1, channels: 2, data: vec![0, 0] }).is_err(), "two channels: no PNG, said so");
    }

    #[test]
    fn the_shorter_side_policy_keeps_the_aspect_ratio_and_cuts_out_the_centre() {
        let pre = camera(ImageResize::ShorterSide, None, ChannelOrder::Rgb);
        let px = frame_pixels("cam", &pre, &[8, 16, 3], &frame()).unwrap();
        assert_eq!((px.height, px.width, px.channels), (4, 4, 3));
        // The centre 8x8 of the frame is green throughout: no red or blue from the edges.
        assert!(px.data.chunks(3).all(|p| p == [0, 255, 0]), "{:?}", px.data);
        // Stretched, the whole width is squeezed in: red on the left, blue on the right.
        let stretched = frame_pixels("cam", &camera(ImageResize::Stretch, None, ChannelOrder::Rgb), &[8, 16, 3], &frame()).unwrap();
        let (left, right) = (&stretched.data[..3], &stretched.data[9..12]);
        assert!(left[0] > 200 && left[2] == 0 && right[2] > 200 && right[0] == 0, "{left:?} {right:?}");
        // A margin: the shorter side to 8 before the 4x4 centre crop sees the middle of the green.
        let margin = frame_pixels("cam", &camera(ImageResize::ShorterSide, Some(8), ChannelOrder::Rgb), &[8, 16, 3], &frame()).unwrap();
        assert!(margin.data.chunks(3).all(|p| p == [0, 255, 0]));
    }

    #[test]
    fn normalising_applies_scale_mean_and_std_per_channel_in_the_models_order() {
        let px = Pixels { height: 4, width: 4, channels: 3, data: [255u8, 0, 51].repeat(16) };
        let rgb = normalize("cam", &camera(ImageResize::Stretch, None, ChannelOrder::Rgb), &[&px, &px]).unwrap();
        assert_eq!(rgb.shape, vec![2, 3, 4, 4]);
        let v = rgb.as_f32().unwrap();
        // (1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (0.2 - 0) / 1, each over its plane of 16.
        for (c, want) in [1.0f32, -1.0, 0.2].into_iter().enumerate() {
            assert!(v[c * 16..(c + 1) * 16].iter().all(|x| (x - want).abs() < 1e-6), "channel {c}: {:?}", &v[c * 16..c * 16 + 2]);
        }
        // A BGR model gets blue first, normalised with its own (first) mean and std.
        let bgr = normalize("cam", &camera(ImageResize::Stretch, None, ChannelOrder::Bgr), &[&px]).unwrap();
        let v = bgr.as_f32().unwrap();
        assert!((v[0] - (0.2 - 0.5) / 0.5).abs() < 1e-6 && (v[32] - (1.0 - 0.0) / 1.0).abs() < 1e-6, "{} {}", v[0], v[32]);
        let wrong = Pixels { height: 2, width: 2, channels: 3, data: vec![0; 12] };
        assert!(normalize("cam", &camera(ImageResize::Stretch, None, ChannelOrder::Rgb), &[&wrong]).unwrap_err().to_string().contains("2x2x3"));
    }

    #[test]
    fn raw_frames_that_do_not_fit_their_bytes_or_the_size_limit_are_refused() {
        let pre = camera(ImageResize::ShorterSide, None, ChannelOrder::Rgb);
        let short = frame_pixels("cam", &pre, &[8, 16, 3], &[0; 10]).unwrap_err();
        assert!(short.to_string().contains("needs 384 bytes, got 10"), "{short}");
        let huge = frame_pixels("cam", &pre, &[100_000, 2, 3], &[]).unwrap_err();
        assert!(matches!(huge, PreprocessError::ImageTooLarge(_)), "{huge}");
        let rgba = frame_pixels("cam", &pre, &[2, 2, 4], &[0; 16]).unwrap_err();
        assert!(rgba.to_string().contains("3 channels (RGB) or 1 (grey)"), "{rgba}");
        let text = Preprocessing::Text { tokenizer: "t.json".into(), max_length: 8 };
        assert!(matches!(frame_pixels("minilm", &text, &[2, 2, 3], &[0; 12]), Err(PreprocessError::NotImage { .. })));
    }

    #[test]
    fn an_image_manifest_from_before_the_camera_fields_still_reads_as_a_stretch() {
        let old: Preprocessing = serde_json::from_str(r#"{"kind": "image", "height": 8, "width": 8, "channels": 1, "pixel_scale": 0.00392}"#).unwrap();
        let Preprocessing::Image { resize, resize_to, mean, std, channel_order, .. } = &old else { panic!("an image kind") };
        assert_eq!((*resize, *resize_to, mean, std, *channel_order), (ImageResize::Stretch, None, &None, &None, ChannelOrder::Rgb));
        let unknown = serde_json::from_str::<Preprocessing>(r#"{"kind": "image", "height": 8, "width": 8, "channels": 1, "pixel_scale": 1, "crop": 3}"#);
        assert!(unknown.unwrap_err().to_string().contains("crop"));
    }
}
