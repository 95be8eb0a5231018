//! Which libtorch this process runs, and whether its CUDA backend is loaded.
//!
//! libtorch splits CUDA into `libtorch_cuda.so`, which registers itself with the CPU library
//! only by being loaded. The Rust binary uses no symbol of it, so the linker (`--as-needed`)
//! drops it and `tch::Cuda::is_available()` would say false on every GPU. Linking it would make
//! every start, GPU or not, map 400 MB and need cuDNN and cuBLAS. So the backend is loaded here,
//! at run time, only on a device with a GPU: from beside the `libtorch_cpu.so` the process
//! runs, else by name through the dynamic linker's search path.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

/// What loading libtorch's CUDA backend came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CudaBackend {
    /// `libtorch_cuda.so` is loaded from this path; whether a device answers is libtorch's to say.
    Loaded { library: PathBuf },
    /// No GPU device node on this machine: the backend was not loaded (nothing to load it for).
    NoGpu,
    /// The library is missing or would not load (a CPU-only libtorch, missing cuDNN...).
    Failed { reason: String },
}

/// GPU device nodes: desktop and data-centre NVIDIA drivers, then Jetson's (nvgpu).
const GPU_NODES: &[&str] = &["/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvgpu/igpu0"];

/// Whether this machine shows a GPU to processes (the device nodes a CUDA driver makes).
pub fn gpu_visible() -> bool {
    GPU_NODES.iter().any(|node| Path::new(node).exists())
}

/// The `libtorch_cpu.so` this process mapped, read from `/proc/self/maps`.
pub fn cpu_library() -> Option<PathBuf> {
    loaded_path("libtorch_cpu.so")
}

/// Load the CUDA backend once per process, where a GPU is visible; later calls return the first
/// outcome.
pub fn cuda_backend() -> &'static CudaBackend {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        if !gpu_visible() {
            return CudaBackend::NoGpu;
        }
        let beside = cpu_library().and_then(|p| p.parent().map(|dir| dir.join("libtorch_cuda.so")));
        let candidates: Vec<PathBuf> = beside.into_iter().chain([PathBuf::from("libtorch_cuda.so")]).collect();
        let mut reasons = Vec::new();
        for candidate in &candidates {
            match open_global(candidate) {
                Ok(()) => {
                    let library =
                        if candidate.is_absolute() { candidate.clone() } else { loaded_path("libtorch_cuda.so").unwrap_or_else(|| candidate.clone()) };
                    return CudaBackend::Loaded { library };
                }
                Err(e) => reasons.push(e),
            }
        }
        CudaBackend::Failed { reason: reasons.join("; ") }
    })
}

/// Whether training can run on CUDA: the backend loaded and libtorch sees a device.
pub fn cuda_available() -> bool {
    matches!(cuda_backend(), CudaBackend::Loaded { .. }) && tch::Cuda::is_available()
}

/// Why CUDA is not available, for errors and the doctor; None when it is.
pub fn cuda_unavailable_reason() -> Option<String> {
    match cuda_backend() {
        CudaBackend::Loaded { library } if !tch::Cuda::is_available() => Some(format!("{} is loaded, but libtorch sees no CUDA device", library.display())),
        CudaBackend::Loaded { .. } => None,
        CudaBackend::NoGpu => Some(format!("no GPU device node ({})", GPU_NODES.join(", "))),
        CudaBackend::Failed { reason } => Some(reason.clone()),
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_GLOBAL)`, kept open for the life of the process: the CUDA
/// backend's static initialisers register it with libtorch, and its symbols must stay visible.
fn open_global(path: &Path) -> Result<(), String> {
    let name = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| format!("{}: a NUL in the path", path.display()))?;
    // SAFETY: `name` is a valid C string. Loading runs the library's initialisers, which is the
    // point; the handle is deliberately never closed.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a C string valid until the next dl* call on this thread.
        let error = unsafe { libc::dlerror() };
        let message = if error.is_null() { "unknown error".to_string() } else { unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned() };
        return Err(message);
    }
    Ok(())
}

/// The path of a mapped library, by file name, from `/proc/self/maps`.
fn loaded_path(file_name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|line| line.split_whitespace().nth(5)).find(|path| path.ends_with(&format!("/{file_name}"))).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_names_the_libtorch_it_runs() {
        // Touch libtorch so it is mapped (it is, as a linked library; this makes sure).
        let _ = tch::Tensor::from(1.0f32);
        let library = cpu_library().and_then(|p| p.file_name().map(|n| n.to_owned()));
        assert_eq!(library.as_deref(), Some(std::ffi::OsStr::new("libtorch_cpu.so")));
    }

    #[test]
    fn without_a_gpu_the_backend_is_not_loaded() {
        if gpu_visible() {
            return; // a GPU machine: the outcome depends on its libraries
        }
        assert_eq!(cuda_backend(), &CudaBackend::NoGpu);
        assert!(!cuda_available());
        assert!(cuda_unavailable_reason().is_some_and(|r| r.contains("no GPU device node")));
        assert!(loaded_path("libtorch_cuda.so").is_none(), "the CUDA backend must not be mapped without a GPU");
    }
}
