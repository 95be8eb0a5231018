#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! adaptd's integration tests: one binary, real runtimes (ONNX Runtime, libtorch), the real
//! reference bundles and data that `make setup` builds.

mod adapt;
mod adapters;
mod api;
mod broker;
mod bundles;
mod camera;
mod chaos;
mod config;
mod demo;
mod engine;
mod fleet;
mod fleet_learning;
mod hardening;
mod ingest;
mod labels;
mod package;
mod properties;
mod registry;
mod runtimes;
mod samples;
mod service;
mod tls;

use std::path::{Path, PathBuf};

mod fixtures;

/// The largest single allocation each thread made since it last asked: the property tests hold
/// decoders to a bound with it (a decompression bomb is one huge allocation).
pub mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Tracking;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the bookkeeping is a
    // const-initialised thread-local without a destructor, which allocates nothing.
    unsafe impl GlobalAlloc for Tracking {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    pub fn reset_largest() {
        LARGEST.with(|l| l.set(0));
    }

    pub fn largest() -> usize {
        LARGEST.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: allocations::Tracking = allocations::Tracking;
pub use fixtures::{TEST_LABELS, head_adapter, lora_adapter, loreft_adapter};

/// A running daemon in this process: what stops it, the address it listens on, its end.
pub type ServeHandle = (tokio::sync::oneshot::Sender<()>, std::net::SocketAddr, tokio::task::JoinHandle<Result<(), adaptd_daemon::serve::ServeError>>);

/// The built-in defaults serving `bundle` from `state_dir`, on a free HTTP port.
pub fn serve_config(bundle: std::path::PathBuf, state_dir: &std::path::Path) -> adaptd_daemon::config::Config {
    let mut config = adaptd_daemon::config::Config { bundle, state_dir: state_dir.to_path_buf(), ..Default::default() };
    config.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// Start the daemon on `config` as `adaptd serve` runs it, and return once it listens.
pub async fn serve_in_process(config: adaptd_daemon::config::Config) -> ServeHandle {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let shutdown = async {
        let _ = stopped.await;
    };
    let daemon = tokio::spawn(adaptd_daemon::serve::run(config, None, shutdown, Some(bound_tx)));
    let addr = match bound_rx.await {
        Ok(addr) => addr,
        // It stopped before listening: say why.
        Err(_) => panic!("the daemon did not start: {:?}", daemon.await),
    };
    (stop, addr, daemon)
}

/// The project's Python (the venv `make setup` made), for the reference implementations.
pub fn python() -> String {
    std::env::var("ADAPTD_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into())
}

/// The LoReFT reference's Python (`.venv-pyreft`, beside the project's venv: pyreft pins an
/// older transformers).
pub fn pyreft_python() -> PathBuf {
    let python = PathBuf::from(python());
    let root = python.parent().and_then(|bin| bin.parent()).and_then(|venv| venv.parent()).map_or_else(PathBuf::new, PathBuf::from);
    root.join(".venv-pyreft/bin/python")
}

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
