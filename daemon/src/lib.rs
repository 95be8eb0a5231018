//! adaptd: an on-device adaptation daemon. It serves a frozen base model (ONNX Runtime), collects
//! labelled samples, fine-tunes adapters on the device (libtorch), validates and hot-swaps them.
//!
//! Where each step of the loop lives:
//! - `engine`: the serving graph on ONNX Runtime, one owner thread, micro-batched.
//! - `registry`: which adapter serves each task; atomic promotion, rollback, recovery.
//! - `preprocess`: client input (text, images, tensors) into model inputs.
//! - `parity`: proof that the serving and training graphs compute the same function.
//! - `datasets`: the reference data shipped with the reference bundles.
//! - `paths`: where the set-up step put bundles and data.
//! - adapters, bundles and training: the `adaptd-adapters` crate.

pub mod datasets;
pub mod engine;
pub mod parity;
pub mod paths;
pub mod preprocess;
pub mod registry;
