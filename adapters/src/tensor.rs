//! Host tensors: the plain data that crosses between the trainer (libtorch), the engine
//! (ONNX Runtime), adapter files and the wire. Neither runtime's types leave its owner.

use crate::bundle::DType;

#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("tensor of shape {shape:?} needs {expected} elements, got {actual}")]
    Count { shape: Vec<usize>, expected: usize, actual: usize },
    #[error("tensor shape {shape:?} has more elements than memory can address")]
    Overflow { shape: Vec<usize> },
}

/// The number of elements of `shape`, or `None` when the product overflows: shapes come from
/// the wire, and `[2^32, 2^32, 1, 1]` must be refused, not wrap or panic.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Result<HostTensor, ShapeError> {
        Self::checked(shape, data.len(), HostData::F32(data))
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Result<HostTensor, ShapeError> {
        Self::checked(shape, data.len(), HostData::I64(data))
    }

    /// Zeros of a shape the program itself chose (a bundle's slot, a head's layer); wire shapes
    /// go through [`HostTensor::f32`], which checks them.
    pub fn zeros_f32(shape: Vec<usize>) -> HostTensor {
        let n = shape.iter().product();
        HostTensor { shape, data: HostData::F32(vec![0.0; n]) }
    }

    fn checked(shape: Vec<usize>, actual: usize, data: HostData) -> Result<HostTensor, ShapeError> {
        let Some(expected) = element_count(&shape) else { return Err(ShapeError::Overflow { shape }) };
        if expected != actual {
            return Err(ShapeError::Count { shape, expected, actual });
        }
        Ok(HostTensor { shape, data })
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::I64(_) => DType::I64,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            HostData::I64(_) => None,
        }
    }

    /// Rows `start..end` of the leading (batch) axis.
    pub fn rows(&self, start: usize, end: usize) -> HostTensor {
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        let data = match &self.data {
            HostData::F32(v) => HostData::F32(v[start * row..end * row].to_vec()),
            HostData::I64(v) => HostData::I64(v[start * row..end * row].to_vec()),
        };
        HostTensor { shape, data }
    }

    /// The rows at `indices` of the leading (batch) axis, in that order.
    pub fn select_rows(&self, indices: &[usize]) -> HostTensor {
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = indices.len();
        let data = match &self.data {
            HostData::F32(v) => HostData::F32(indices.iter().flat_map(|&i| v[i * row..(i + 1) * row].iter().copied()).collect()),
            HostData::I64(v) => HostData::I64(indices.iter().flat_map(|&i| v[i * row..(i + 1) * row].iter().copied()).collect()),
        };
        HostTensor { shape, data }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            HostData::I64(v) => Some(v),
            HostData::F32(_) => None,
        }
    }
}

/// Little-endian f32 values from raw bytes (safetensors, wire payloads); a trailing partial value is ignored.
pub fn f32s_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Little-endian i64 values from raw bytes.
pub fn i64s_from_le(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

/// Largest absolute element-wise difference of two equally shaped f32 tensors; None if the
/// shapes differ or either is not f32. NaN anywhere yields NaN (it must never compare as equal).
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> Option<f32> {
    if a.shape != b.shape {
        return None;
    }
    let (a, b) = (a.as_f32()?, b.as_f32()?);
    Some(a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) }
    }))
}

/// Small deterministic generator (SplitMix64) for seeded test inputs and LoRA initialisation
/// that must not depend on either runtime's RNG.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32 * std).collect()
    }
}
