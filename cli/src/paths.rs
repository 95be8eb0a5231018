//! Where the set-up step put the reference bundles and data.

use std::path::PathBuf;

/// `build/` of the checkout this binary was built from, recorded at build time by the generated
/// cargo configuration; `ADAPTD_BUILD_DIR` at run time overrides it.
pub fn build_dir() -> PathBuf {
    std::env::var_os("ADAPTD_BUILD_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("ADAPTD_BUILD_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("build"))
}

pub fn reference_bundle(name: &str) -> PathBuf {
    build_dir().join("bundles").join(name)
}

pub fn digits_data() -> PathBuf {
    build_dir().join("data").join("digits.safetensors")
}

pub fn camera_data() -> PathBuf {
    build_dir().join("data").join("camera.safetensors")
}
