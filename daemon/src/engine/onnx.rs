//! The serving graph on ONNX Runtime.
//!
//! ONNX Runtime is loaded at run time from a shared library (`ort`'s `load-dynamic`): the PyPI
//! `onnxruntime` wheel on a workstation, JetPack's `onnxruntime-gpu` on a Jetson. The library is
//! found, in order, from the explicit path given, `ORT_DYLIB_PATH` in the environment, and the
//! path the build was configured with, so an installed binary needs nothing exported by hand.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use adaptd_adapters::bundle::Bundle;
use adaptd_adapters::tensor::{HostData, HostTensor};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("ONNX Runtime library not found: set ORT_DYLIB_PATH or runtime.onnxruntime_library (looked for {0})")]
    LibraryMissing(String),
    #[error("ONNX Runtime library {path}: {reason}")]
    Library { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already loaded from {loaded}; cannot load {requested} as well")]
    LibraryConflict { loaded: PathBuf, requested: PathBuf },
    #[error("{path}: ONNX Runtime cannot load the serving graph: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("{path}: the graph's {what} do not match the bundle manifest: graph has {graph:?}, manifest says {manifest:?}")]
    Contract { path: PathBuf, what: &'static str, graph: Vec<String>, manifest: Vec<String> },
    #[error("expected {expected} inputs ({names}), got {actual}")]
    InputCount { expected: usize, actual: usize, names: String },
    #[error("input {name:?}: {reason}")]
    Input { name: String, reason: String },
    #[error("ONNX Runtime run failed: {0}")]
    Run(String),
    #[error("output {name:?}: {reason}")]
    Output { name: String, reason: String },
}

impl OnnxError {
    pub fn error_type(&self) -> &'static str {
        match self {
            OnnxError::LibraryMissing(_) | OnnxError::Library { .. } | OnnxError::LibraryConflict { .. } => "runtime_library",
            OnnxError::Load { .. } | OnnxError::Contract { .. } => "load",
            OnnxError::InputCount { .. } | OnnxError::Input { .. } => "input",
            OnnxError::Run(_) | OnnxError::Output { .. } => "run",
        }
    }
}

/// The build-time default, written into `.cargo/config.toml` by the set-up step.
const BUILD_ORT_DYLIB_PATH: Option<&str> = option_env!("ORT_DYLIB_PATH");

static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Where the ONNX Runtime library will be loaded from.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, OnnxError> {
    let candidates: Vec<PathBuf> = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .chain(BUILD_ORT_DYLIB_PATH.map(PathBuf::from))
        .collect();
    if let Some(explicit) = explicit {
        return if explicit.is_file() {
            Ok(explicit.to_path_buf())
        } else {
            Err(OnnxError::Library { path: explicit.to_path_buf(), reason: "no such file".into() })
        };
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OnnxError::LibraryMissing(candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")))
}

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment, OnnxError> {
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        if let Some(requested) = explicit
            && requested != loaded
        {
            return Err(OnnxError::LibraryConflict { loaded: loaded.clone(), requested: requested.to_path_buf() });
        }
        return Ok(env);
    }
    let path = resolve_library(explicit)?;
    let env = ort::init_from(&path)
        .map_err(|e| OnnxError::Library { path: path.clone(), reason: e.to_string() })?
        .with_name("adaptd")
        .build()
        .map_err(|e| OnnxError::Library { path: path.clone(), reason: e.to_string() })?;
    // A racing first caller may have won; either environment is equivalent.
    Ok(&ENVIRONMENT.get_or_init(|| (path, env)).1)
}

/// Threads given to one session. Serving and training share a small device, so nothing spins.
#[derive(Debug, Clone, Copy)]
pub struct SessionThreads {
    pub intra_op: usize,
}

impl Default for SessionThreads {
    fn default() -> Self {
        SessionThreads { intra_op: 2 }
    }
}

/// A bundle's serving graph in an ONNX Runtime session. Owned by one thread (runs need `&mut`).
pub struct OnnxModel {
    session: Session,
    bundle: Bundle,
    input_names: Vec<String>,
    output_names: Vec<String>,
}

impl OnnxModel {
    pub fn load(bundle: &Bundle, threads: SessionThreads, library: Option<&Path>) -> Result<OnnxModel, OnnxError> {
        let env = environment(library)?;
        let path = bundle.serving_graph_path();
        let load_err = |reason: String| OnnxError::Load { path: path.clone(), reason };
        let session = Session::builder(env)
            .map_err(|e| load_err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .and_then(|b| b.with_intra_threads(threads.intra_op.max(1)))
            .and_then(|b| b.with_inter_threads(1))
            .and_then(|b| b.with_intra_op_spinning(false))
            .and_then(|b| b.with_inter_op_spinning(false))
            .map_err(|e| load_err(e.to_string()))?
            .commit_from_file(&path)
            .map_err(|e| load_err(e.to_string()))?;

        // The graph must be the one the manifest describes, input for input.
        let graph_inputs: Vec<String> = session.inputs().iter().map(|i| i.name().to_string()).collect();
        let manifest_inputs: Vec<String> = bundle.manifest.graph_input_names().into_iter().map(String::from).collect();
        if graph_inputs != manifest_inputs {
            return Err(OnnxError::Contract { path, what: "inputs", graph: graph_inputs, manifest: manifest_inputs });
        }
        let graph_outputs: Vec<String> = session.outputs().iter().map(|o| o.name().to_string()).collect();
        let manifest_outputs: Vec<String> = bundle.manifest.outputs.iter().map(|o| o.name.clone()).collect();
        if graph_outputs != manifest_outputs {
            return Err(OnnxError::Contract { path, what: "outputs", graph: graph_outputs, manifest: manifest_outputs });
        }
        Ok(OnnxModel { session, bundle: bundle.clone(), input_names: graph_inputs, output_names: graph_outputs })
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Run with the model inputs and the LoRA slot tensors (see `adaptd_adapters::lora`);
    /// returns every output in manifest order.
    pub fn run(&mut self, inputs: &[HostTensor], lora: &[HostTensor]) -> Result<Vec<HostTensor>, OnnxError> {
        let manifest = &self.bundle.manifest;
        let expected = self.input_names.len();
        if inputs.len() + lora.len() != expected || inputs.len() != manifest.inputs.len() {
            return Err(OnnxError::InputCount { expected, actual: inputs.len() + lora.len(), names: self.input_names.join(", ") });
        }
        let mut feeds: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(expected);
        for (i, (name, t)) in self.input_names.iter().zip(inputs.iter().chain(lora)).enumerate() {
            if let Some(spec) = manifest.inputs.get(i)
                && spec.dtype != t.dtype()
            {
                return Err(OnnxError::Input { name: name.clone(), reason: format!("dtype {:?}, the model needs {:?}", t.dtype(), spec.dtype) });
            }
            let input_err = |e: ort::Error| OnnxError::Input { name: name.clone(), reason: e.to_string() };
            let value: SessionInputValue<'_> = match &t.data {
                HostData::F32(v) => Tensor::from_array((t.shape.clone(), v.clone())).map_err(input_err)?.into(),
                HostData::I64(v) => Tensor::from_array((t.shape.clone(), v.clone())).map_err(input_err)?.into(),
            };
            feeds.push((name.clone(), value));
        }
        let outputs = self.session.run(feeds).map_err(|e| OnnxError::Run(e.to_string()))?;
        self.output_names
            .iter()
            .map(|name| {
                let out_err = |reason: String| OnnxError::Output { name: name.clone(), reason };
                let (shape, data) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(|e| out_err(e.to_string()))?;
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                HostTensor::f32(shape, data.to_vec()).map_err(|e| out_err(e.to_string()))
            })
            .collect()
    }
}
