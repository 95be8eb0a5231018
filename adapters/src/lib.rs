//! adaptd's adapters: the model-bundle contract, adapter tensors (LoRA, head) as plain host data,
//! their files and store, and training through a bundle's libtorch graph.

pub mod aggregate;
pub mod bundle;
pub mod files;
pub mod fsutil;
pub mod head;
pub mod lora;
pub mod reft;
pub mod slots;
pub mod store;
pub mod tensor;

pub use bundle::{Bundle, BundleError, Manifest};
pub use files::{Adapter, AdapterKind, AdapterManifest};
pub use head::Head;
pub use lora::{LoraError, LoraWeights};
pub use reft::{ReftError, ReftWeights};
pub use store::AdapterStore;
pub use tensor::{HostData, HostTensor};
