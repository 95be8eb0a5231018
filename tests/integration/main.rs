//! adaptd's integration tests: one binary, real runtimes (ONNX Runtime, libtorch), the real
//! reference bundles and data that `make setup` builds.

mod adapt;
mod adapters;
mod api;
mod broker;
mod bundles;
mod config;
mod demo;
mod engine;
mod ingest;
mod package;
mod registry;
mod runtimes;
mod samples;
mod tls;
mod service;

use std::path::{Path, PathBuf};

mod fixtures;
pub use fixtures::{TEST_LABELS, head_adapter, lora_adapter};

pub fn reference_bundle(name: &str) -> PathBuf {
    let dir = adaptd::paths::reference_bundle(name);
    assert!(dir.join("manifest.json").is_file(), "{} is missing: run `make setup` first", dir.display());
    dir
}

pub fn digits_data() -> PathBuf {
    adaptd::paths::digits_data()
}

/// A private copy of a bundle that a test may damage.
pub fn copy_bundle(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(src).expect("bundle dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy bundle file");
    }
    dir
}
