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
mod hardening;
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

/// Runs the calling test again in a child process of this binary, alone, and returns true in
/// the parent once the child passed; returns false in the child, which then runs the test body.
/// For tests that read process-wide counters (peak RSS), which other tests' threads disturb.
pub fn in_own_process(test_path: &str) -> bool {
    const ALONE: &str = "ADAPTD_TEST_ALONE";
    if std::env::var(ALONE).as_deref() == Ok(test_path) {
        return false;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([test_path, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, test_path)
        .output()
        .expect("the test binary runs again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test_path} failed in its own process:\n{text}");
    assert!(text.contains("1 passed"), "{test_path} did not run in its own process:\n{text}");
    true
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
