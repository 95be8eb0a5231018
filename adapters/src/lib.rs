//! adaptd's adapters: the model-bundle contract, adapter tensors (LoRA, head) as plain host data,
//! and training through a bundle's libtorch graph.

pub mod bundle;
pub mod lora;
pub mod tensor;
pub mod train;

pub use bundle::{Bundle, BundleError, Manifest};
pub use lora::{LoraError, LoraWeights};
pub use tensor::{HostData, HostTensor};
