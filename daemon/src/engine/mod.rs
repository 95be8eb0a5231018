//! The serving engine: the frozen base model on ONNX Runtime with the active adapter.

pub mod onnx;
