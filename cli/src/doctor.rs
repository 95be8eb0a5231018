//! `adaptd doctor`: is this device ready for adaptd, and how fast is it? What the device is
//! (architecture, Jetson model, L4T and JetPack release, memory, temperatures, GPU load), which
//! ONNX Runtime execution providers register and how fast each serves the bundle, whether
//! libtorch sees CUDA and how fast a head and LoRA train on each device, then the configuration
//! to use. The facts are read below a root directory (`/` on a device), so tests lay out real
//! Jetson trees in a temporary directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use adaptd_adapters::bundle::{Bundle, DType, Preprocessing};
use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::slots::no_adapter_inputs;
use adaptd_adapters::tensor::{HostData, HostTensor, SeededRng};
use adaptd_train::{Examples, FitTarget, Recipe, TrainingGraph, fit, libtorch};
use serde::Serialize;

use adaptd_daemon::engine::onnx::{ExecutionProvider, OnnxModel, SessionOptions};

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("bundle {bundle}: {reason}")]
    Bundle { bundle: String, reason: String },
}

impl DoctorError {
    pub fn error_type(&self) -> &'static str {
        match self {
            DoctorError::Bundle { .. } => "bundle",
        }
    }
}

/// What the device is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    pub arch: String,
    /// `/proc/device-tree/model`, e.g. "NVIDIA Jetson Orin Nano Developer Kit".
    pub model: Option<String>,
    /// From `/etc/nv_tegra_release`, e.g. "R36.4.3".
    pub l4t: Option<String>,
    /// The JetPack release that L4T belongs to, where known.
    pub jetpack: Option<String>,
    pub cpus: usize,
    pub memory_total_mb: u64,
    pub memory_available_mb: u64,
    pub temperatures_c: Vec<(String, f32)>,
    pub gpu_percent: Option<f32>,
}

/// One ONNX Runtime execution provider: whether it registered, and serving's median latency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderCheck {
    pub provider: ExecutionProvider,
    pub registered: bool,
    pub reason: Option<String>,
    /// Median latency of one request (batch 1) through the bundle's serving graph.
    pub p50_ms: Option<f64>,
}

/// Training on one libtorch device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingCheck {
    pub device: String,
    /// "fp32", or "fp16" (the base's products under CUDA autocast).
    pub precision: String,
    /// A head fit on cached embeddings (what the default first step trains), in seconds.
    pub head_seconds: Option<f64>,
    /// LoRA training throughput through the bundle's training graph.
    pub lora_samples_per_second: Option<f64>,
    pub error: Option<String>,
}

/// The configuration this device should run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub execution_provider: ExecutionProvider,
    pub training_device: String,
    pub training_precision: String,
    pub intra_op_threads: usize,
    pub training_threads: usize,
    pub memory_budget_mb: u64,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub device: Device,
    pub onnxruntime_library: Option<PathBuf>,
    pub bundle: String,
    pub providers: Vec<ProviderCheck>,
    /// The `libtorch_cpu.so` this process runs.
    pub libtorch_library: Option<PathBuf>,
    pub torch_cuda: bool,
    /// Why libtorch has no CUDA, when it has none.
    pub torch_cuda_reason: Option<String>,
    pub training: Vec<TrainingCheck>,
    pub verdict: Verdict,
    /// The local Mosquitto's queue settings, where one is installed.
    pub broker: Option<BrokerCheck>,
}

/// A local Mosquitto's settings that decide whether a burst of samples survives the broker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerCheck {
    /// The files read, main configuration first.
    pub files: Vec<PathBuf>,
    /// As the files set them; None: Mosquitto's default (1000, 0 = none, 0 = 256 MiB).
    pub max_queued_messages: Option<u64>,
    pub max_queued_bytes: Option<u64>,
    pub message_size_limit: Option<u64>,
    /// What to change, if anything.
    pub advice: Vec<String>,
}

/// Mosquitto's queue settings below `root` (`/etc/mosquitto/mosquitto.conf` and the
/// `conf.d/*.conf` drop-ins, the last setting winning as Mosquitto reads them); None when no
/// Mosquitto configuration is there.
pub fn broker(root: &Path) -> Option<BrokerCheck> {
    let main = root.join("etc/mosquitto/mosquitto.conf");
    let text = std::fs::read_to_string(&main).ok()?;
    let mut files = vec![main];
    let mut texts = vec![text];
    let mut drop_ins: Vec<PathBuf> = std::fs::read_dir(root.join("etc/mosquitto/conf.d"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "conf")).collect())
        .unwrap_or_default();
    drop_ins.sort();
    for path in drop_ins {
        if let Ok(text) = std::fs::read_to_string(&path) {
            files.push(path);
            texts.push(text);
        }
    }
    let setting = |name: &str| {
        texts.iter().flat_map(|t| t.lines()).filter_map(|l| l.trim().strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok()).next_back()
    };
    let (messages, bytes, size) = (setting("max_queued_messages "), setting("max_queued_bytes "), setting("message_size_limit "));
    let mut advice = Vec::new();
    match messages {
        Some(0) => {}
        n => advice.push(format!(
            "max_queued_messages is {}: a burst past that many samples per client is dropped at the broker after the sender was told it arrived; install deploy/mosquitto/adaptd.conf in /etc/mosquitto/conf.d/ (max_queued_messages 0 with a byte bound)",
            n.map_or("1000 (the default)".to_string(), |n| n.to_string())
        )),
    }
    if matches!(size, None | Some(0)) {
        advice.push("message_size_limit is not set (up to 256 MiB): adaptd reads an oversized sample once to refuse it; set it a few times ingest.max_payload_bytes, e.g. 4194304".into());
    }
    Some(BrokerCheck { files, max_queued_messages: messages, max_queued_bytes: bytes, message_size_limit: size, advice })
}

/// `# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...` → `R36.4.3`.
pub fn parse_l4t(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.contains("(release)"))?;
    let major = line.trim_start_matches('#').split_whitespace().next()?.trim_start_matches('R');
    let revision = line.split(',').find_map(|f| f.trim().strip_prefix("REVISION:"))?.trim();
    (major.chars().all(|c| c.is_ascii_digit()) && !major.is_empty() && !revision.is_empty()).then(|| format!("R{major}.{revision}"))
}

/// The JetPack release an L4T release ships in (NVIDIA's release notes).
pub fn jetpack_of(l4t: &str) -> Option<&'static str> {
    let known = [
        ("R32.7.", "4.6.x"),
        ("R35.1.", "5.0.2"),
        ("R35.2.", "5.1"),
        ("R35.3.", "5.1.1"),
        ("R35.4.", "5.1.2"),
        ("R35.5.", "5.1.3"),
        ("R35.6.", "5.1.4"),
        ("R36.2.", "6.0 DP"),
        ("R36.3.", "6.0"),
        ("R36.4.", "6.1/6.2"),
    ];
    known.iter().find(|(prefix, _)| l4t.starts_with(prefix)).map(|(_, jp)| *jp)
}

/// The device's facts, read below `root` (`/` on a device).
pub fn device(root: &Path) -> Device {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    // The device tree's strings end in NUL.
    let model = read("proc/device-tree/model").map(|m| m.trim_end_matches('\0').trim().to_string()).filter(|m| !m.is_empty());
    let l4t = read("etc/nv_tegra_release").as_deref().and_then(parse_l4t);
    let jetpack = l4t.as_deref().and_then(jetpack_of).map(String::from);
    let reading = adaptd_daemon::resources::Monitor::new(&root.join("sys")).read();
    Device {
        arch: std::env::consts::ARCH.to_string(),
        model,
        l4t,
        jetpack,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_total_mb: reading.total_mb,
        memory_available_mb: reading.available_mb,
        temperatures_c: reading.temperatures_c,
        gpu_percent: reading.gpu_percent,
    }
}

/// Inputs of batch `rows` for the bundle: encoded sentences for text, seeded noise of the input
/// shape otherwise (the figures are about speed, not answers).
fn inputs(bundle: &Bundle, rows: usize, seed: u64) -> Result<Vec<HostTensor>, String> {
    if let Preprocessing::Text { .. } = bundle.manifest.preprocessing {
        let encoder = adaptd_daemon::preprocess::TextEncoder::from_bundle(bundle).map_err(|e| e.to_string())?;
        let texts: Vec<&str> = crate::datasets::ROBOT_INTENTS.iter().cycle().take(rows).map(|(t, _)| *t).collect();
        return encoder.encode(&texts).map_err(|e| e.to_string());
    }
    let mut rng = SeededRng::new(seed);
    bundle
        .manifest
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().enumerate().map(|(i, &d)| if d < 0 { if i == 0 { rows } else { 1 } } else { d as usize }).collect();
            let n: usize = shape.iter().product();
            match spec.dtype {
                DType::F32 => Ok(HostTensor { shape, data: HostData::F32((0..n).map(|_| rng.uniform() as f32).collect()) }),
                DType::I64 => Ok(HostTensor { shape, data: HostData::I64(vec![1; n]) }),
                other => Err(format!("input {:?} is {other:?}: the doctor feeds f32 and i64 inputs only", spec.name)),
            }
        })
        .collect()
}

/// Median latency of single requests on `provider` for about `budget`.
fn serve(bundle: &Bundle, provider: ExecutionProvider, threads: usize, library: Option<&Path>, budget: Duration) -> ProviderCheck {
    let options = SessionOptions { intra_op_threads: threads, provider, ..SessionOptions::default() };
    let failed = |reason: String| ProviderCheck { provider, registered: false, reason: Some(reason), p50_ms: None };
    let mut model = match OnnxModel::load(bundle, options, library) {
        Ok(m) => m,
        Err(e) => return failed(e.to_string()),
    };
    let lora = no_adapter_inputs(&bundle.manifest);
    let request = match inputs(bundle, 1, 1) {
        Ok(i) => i,
        Err(e) => return ProviderCheck { provider, registered: true, reason: Some(e), p50_ms: None },
    };
    let started = Instant::now();
    let mut times = Vec::new();
    // The first runs pay for allocation and kernel selection.
    for _ in 0..3 {
        if let Err(e) = model.run(&request, &lora) {
            return ProviderCheck { provider, registered: true, reason: Some(e.to_string()), p50_ms: None };
        }
    }
    while started.elapsed() < budget || times.len() < 20 {
        let t = Instant::now();
        if model.run(&request, &lora).is_err() {
            break;
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if times.len() >= 100_000 {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    ProviderCheck { provider, registered: true, reason: None, p50_ms: times.get(times.len() / 2).copied() }
}

/// A head fit and LoRA steps on `device`, each within about `budget`.
fn train(bundle: &Bundle, device: tch::Device, fp16: bool, budget: Duration) -> TrainingCheck {
    let name = if device.is_cuda() { "cuda" } else { "cpu" }.to_string();
    let precision = if fp16 { "fp16" } else { "fp32" }.to_string();
    let failed =
        |e: String| TrainingCheck { device: name.clone(), precision: precision.clone(), head_seconds: None, lora_samples_per_second: None, error: Some(e) };
    let dim = bundle.manifest.embedding_dim;
    let classes = 10;
    let mut rng = SeededRng::new(3);
    let head = Head {
        layers: vec![Dense {
            weight: HostTensor { shape: vec![classes, dim], data: HostData::F32(rng.normal_vec(classes * dim, 0.05)) },
            bias: HostTensor::zeros_f32(vec![classes]),
        }],
    };
    let labels = |n: usize| (0..n).map(|i| (i % classes) as i64).collect::<Vec<_>>();
    // The head: 1,000 cached embeddings, 30 epochs (the shipped recipe's cap).
    let n = 1000;
    let embeddings = Examples {
        inputs: vec![HostTensor { shape: vec![n, dim], data: HostData::F32(rng.normal_vec(n * dim, 1.0)) }],
        labels: labels(n),
        weights: vec![1.0; n],
    };
    let recipe = Recipe { max_epochs: 30, patience: 0, ..Recipe::default() };
    let never = AtomicBool::new(false);
    let started = Instant::now();
    if let Err(e) = fit(FitTarget::Head { device }, &embeddings, &Examples::default(), &head, &recipe, &never, &mut |_| {}) {
        return failed(e.to_string());
    }
    let head_seconds = started.elapsed().as_secs_f64();
    // LoRA: epochs of 64 samples through the training graph until the budget is spent.
    let graph = match TrainingGraph::load(bundle, device) {
        Ok(mut g) => match fp16.then(|| g.enable_mixed_precision()) {
            Some(Err(e)) => return TrainingCheck { head_seconds: Some(head_seconds), ..failed(e.to_string()) },
            _ => g,
        },
        Err(e) => return TrainingCheck { head_seconds: Some(head_seconds), ..failed(e.to_string()) },
    };
    let rows = 64;
    let batch = match inputs(bundle, rows, 4) {
        Ok(b) => Examples { inputs: b, labels: labels(rows), weights: vec![1.0; rows] },
        Err(e) => return TrainingCheck { head_seconds: Some(head_seconds), ..failed(e) },
    };
    let started = Instant::now();
    let (mut seen, mut epochs) = (0usize, 1usize);
    while started.elapsed() < budget {
        let recipe = Recipe { max_epochs: epochs, patience: 0, batch_size: 16, ..Recipe::default() };
        let t = Instant::now();
        match fit(FitTarget::Lora { graph: &graph, rank: 8, alpha: 8.0, start: None }, &batch, &Examples::default(), &head, &recipe, &never, &mut |_| {}) {
            Ok(_) => seen += rows * epochs,
            Err(e) => return TrainingCheck { head_seconds: Some(head_seconds), ..failed(e.to_string()) },
        }
        epochs = if t.elapsed() < budget / 8 { epochs * 2 } else { epochs };
    }
    let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    TrainingCheck { device: name, precision, head_seconds: Some(head_seconds), lora_samples_per_second: Some(rate), error: None }
}

/// The configuration to use, from the checks.
pub fn verdict(device: &Device, providers: &[ProviderCheck], training: &[TrainingCheck]) -> Verdict {
    let mut notes = Vec::new();
    let cpu_p50 = providers.iter().find(|p| p.provider == ExecutionProvider::Cpu).and_then(|p| p.p50_ms);
    // The fastest provider that registered; a GPU one only when it serves faster than the CPU.
    let best =
        providers.iter().filter(|p| p.registered && p.p50_ms.is_some()).min_by(|a, b| a.p50_ms.unwrap_or(f64::MAX).total_cmp(&b.p50_ms.unwrap_or(f64::MAX)));
    let execution_provider = best.map_or(ExecutionProvider::Cpu, |p| p.provider);
    if let (Some(b), Some(cpu)) = (best.and_then(|p| p.p50_ms), cpu_p50)
        && execution_provider != ExecutionProvider::Cpu
    {
        notes.push(format!("serving on {execution_provider:?}: p50 {b:.3} ms against {cpu:.3} ms on the CPU"));
    }
    let rate = |d: &str, p: &str| training.iter().find(|t| t.device == d && t.precision == p).and_then(|t| t.lora_samples_per_second);
    // CUDA's rate is its better precision's.
    let (gpu_rate, gpu_precision) = match (rate("cuda", "fp32"), rate("cuda", "fp16")) {
        (Some(full), Some(half)) if half > full => {
            notes.push(format!("fp16 autocast trains at {half:.0} LoRA samples/s against {full:.0} in fp32"));
            (Some(half), "fp16")
        }
        (full, half) => (full.or(half), if full.is_some() { "fp32" } else { "fp16" }),
    };
    let (training_device, training_precision) = match (gpu_rate, rate("cpu", "fp32")) {
        (Some(gpu), Some(cpu)) if gpu > cpu => {
            notes.push(format!("training on CUDA: {gpu:.0} LoRA samples/s against {cpu:.0} on the CPU"));
            ("cuda", gpu_precision)
        }
        _ => ("cpu", "fp32"),
    };
    // Serving keeps two cores' worth when it has them; training takes one at background priority.
    let intra_op_threads = device.cpus.clamp(1, 2);
    let training_threads = if device.cpus >= 4 { 2 } else { 1 };
    // A quarter of what is free now, for a job's peak on top of serving.
    let memory_budget_mb = device.memory_available_mb / 4;
    if let Some((zone, t)) = device.temperatures_c.iter().max_by(|a, b| a.1.total_cmp(&b.1))
        && *t >= 80.0
    {
        notes.push(format!("{zone} is at {t:.0} °C: training waits above schedule.max_temperature_c (85 °C by default)"));
    }
    if device.model.as_deref().is_some_and(|m| m.contains("Jetson")) && device.l4t.is_none() {
        notes.push("a Jetson without /etc/nv_tegra_release: JetPack's runtimes may be missing".into());
    }
    Verdict {
        execution_provider,
        training_device: training_device.into(),
        training_precision: training_precision.into(),
        intra_op_threads,
        training_threads,
        memory_budget_mb,
        notes,
    }
}

/// Run every check on `bundle`, spending about `seconds` on the benchmarks.
pub fn run(bundle: &Bundle, root: &Path, seconds: f64, library: Option<&Path>) -> Report {
    let device = device(root);
    let budget = Duration::from_secs_f64(seconds.max(1.0));
    let threads = device.cpus.clamp(1, 2);
    let onnxruntime_library = adaptd_daemon::engine::onnx::resolve_library(library).ok();
    // A quarter of the time per provider and per training device.
    let providers: Vec<ProviderCheck> = [ExecutionProvider::Cpu, ExecutionProvider::Cuda, ExecutionProvider::TensorRt]
        .into_iter()
        .map(|p| serve(bundle, p, threads, library, budget / 6))
        .collect();
    let torch_cuda = libtorch::cuda_available();
    let torch_cuda_reason = libtorch::cuda_unavailable_reason();
    let mut training = vec![train(bundle, tch::Device::Cpu, false, budget / 4)];
    if torch_cuda {
        training.push(train(bundle, tch::Device::Cuda(0), false, budget / 8));
        training.push(train(bundle, tch::Device::Cuda(0), true, budget / 8));
    }
    let verdict = verdict(&device, &providers, &training);
    let libtorch_library = libtorch::cpu_library();
    let broker = broker(root);
    Report {
        device,
        onnxruntime_library,
        bundle: bundle.manifest.name.clone(),
        providers,
        libtorch_library,
        torch_cuda,
        torch_cuda_reason,
        training,
        verdict,
        broker,
    }
}

/// The report as a person reads it.
pub fn render(r: &Report) -> String {
    let d = &r.device;
    let mut out = format!("device      {} · {} CPUs · {} of {} MiB free\n", d.arch, d.cpus, d.memory_available_mb, d.memory_total_mb);
    out += &format!("model       {}\n", d.model.as_deref().unwrap_or("(no device tree model: not a Jetson)"));
    if let Some(l4t) = &d.l4t {
        out += &format!("L4T         {l4t} (JetPack {})\n", d.jetpack.as_deref().unwrap_or("unknown to this version"));
    }
    if let Some((zone, t)) = d.temperatures_c.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
        out += &format!("hottest     {zone} {t:.1} °C\n");
    }
    if let Some(g) = d.gpu_percent {
        out += &format!("GPU load    {g:.1} %\n");
    }
    out += &format!("ONNX Runtime {}\n", r.onnxruntime_library.as_ref().map_or("not found (set ORT_DYLIB_PATH)".to_string(), |p| p.display().to_string()));
    for p in &r.providers {
        let figure = match (p.registered, p.p50_ms, &p.reason) {
            (true, Some(ms), _) => format!("serves {} at p50 {ms:.3} ms (batch 1)", r.bundle),
            (_, _, Some(reason)) => format!("not available: {}", reason.lines().next().unwrap_or_default()),
            _ => "not available".into(),
        };
        out += &format!("  {:<9} {figure}\n", format!("{:?}", p.provider).to_lowercase());
    }
    out += &format!("libtorch    {}\n", r.libtorch_library.as_ref().map_or("(libtorch_cpu.so not mapped)".to_string(), |p| p.display().to_string()));
    out += &match &r.torch_cuda_reason {
        None => "  cuda      available\n".to_string(),
        Some(reason) => format!("  cuda      not available: {reason}\n"),
    };
    for t in &r.training {
        match &t.error {
            Some(e) => out += &format!("  {:<9} training failed: {e}\n", format!("{} {}", t.device, t.precision)),
            None => {
                out += &format!(
                    "  {:<9} head fit {:.2} s · LoRA {:.0} samples/s\n",
                    format!("{} {}", t.device, t.precision),
                    t.head_seconds.unwrap_or(f64::NAN),
                    t.lora_samples_per_second.unwrap_or(f64::NAN)
                )
            }
        }
    }
    let v = &r.verdict;
    out += &format!(
        "\nuse:\n  [engine]   execution_provider = \"{}\"   intra_op_threads = {}\n  [training] device = \"{}\"   precision = \"{}\"   threads = {}   memory_budget_mb = {}\n",
        format!("{:?}", v.execution_provider).to_lowercase(),
        v.intra_op_threads,
        v.training_device,
        v.training_precision,
        v.training_threads,
        v.memory_budget_mb
    );
    for n in &v.notes {
        out += &format!("  - {n}\n");
    }
    if let Some(b) = &r.broker {
        let show = |v: Option<u64>, default: &str| v.map_or(format!("{default} (default)"), |v| v.to_string());
        out += &format!(
            "\nmosquitto   max_queued_messages {} · max_queued_bytes {} · message_size_limit {}\n",
            show(b.max_queued_messages, "1000"),
            show(b.max_queued_bytes, "0"),
            show(b.message_size_limit, "0")
        );
        out += &match b.advice.is_empty() {
            true => "  holds a burst of samples\n".to_string(),
            false => b.advice.iter().map(|a| format!("  - {a}\n")).collect(),
        };
    }
    out
}

/// For `--bundle` paths and errors.
pub fn open_bundle(path: &Path) -> Result<Bundle, DoctorError> {
    Bundle::open(path).map_err(|e| DoctorError::Bundle { bundle: path.display().to_string(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Jetson's files as they are on the device, below `root`.
    fn jetson(root: &Path, model: &str, release: &str, gpu_load: &str, zones: &[(&str, &str)]) {
        let write = |p: &str, text: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("proc/device-tree/model", &format!("{model}\0"));
        write("etc/nv_tegra_release", release);
        write("sys/devices/platform/gpu.0/load", gpu_load);
        for (i, (kind, milli)) in zones.iter().enumerate() {
            write(&format!("sys/class/thermal/thermal_zone{i}/type"), kind);
            write(&format!("sys/class/thermal/thermal_zone{i}/temp"), milli);
        }
    }

    #[test]
    fn an_orin_nano_and_an_agx_orin_are_recognised_with_their_releases() {
        let nano = tempfile::tempdir().unwrap();
        jetson(
            nano.path(),
            "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n",
            "123\n",
            &[("cpu-thermal", "48312\n"), ("gpu-thermal", "47156\n"), ("soc0-thermal", "49062\n")],
        );
        let d = device(nano.path());
        assert_eq!(d.model.as_deref(), Some("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"));
        assert_eq!((d.l4t.as_deref(), d.jetpack.as_deref()), (Some("R36.4.3"), Some("6.1/6.2")));
        assert_eq!(d.gpu_percent, Some(12.3));
        assert_eq!(d.temperatures_c.len(), 3);
        assert!(d.temperatures_c.iter().any(|(z, t)| z == "soc0-thermal" && (*t - 49.062).abs() < 1e-3));

        let agx = tempfile::tempdir().unwrap();
        jetson(
            agx.path(),
            "Jetson AGX Orin Developer Kit",
            "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n",
            "0\n",
            &[("CPU-therm", "41500\n"), ("GPU-therm", "88000\n"), ("Tboard_tboard", "35000\n")],
        );
        let d = device(agx.path());
        assert_eq!((d.l4t.as_deref(), d.jetpack.as_deref()), (Some("R35.4.1"), Some("5.1.2")));
        let v = verdict(&d, &[], &[]);
        assert!(v.notes.iter().any(|n| n.contains("GPU-therm") && n.contains("88")), "{v:?}");
        assert_eq!((v.execution_provider, v.training_device.as_str()), (ExecutionProvider::Cpu, "cpu"));
    }

    #[test]
    fn a_machine_that_is_not_a_jetson_has_no_release_and_bad_release_files_are_not_read_as_one() {
        let empty = tempfile::tempdir().unwrap();
        let d = device(empty.path());
        assert_eq!((d.model, d.l4t, d.jetpack, d.gpu_percent), (None, None, None, None));
        for bad in ["", "R36", "# R36 (release)", "# Rxx (release), REVISION: 4.3", "# R36 (release), GCID: 1"] {
            assert_eq!(parse_l4t(bad), None, "{bad:?}");
        }
        assert_eq!(jetpack_of("R99.1.0"), None);
    }

    #[test]
    fn the_broker_check_reads_mosquitto_and_its_drop_ins_and_says_what_to_change() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(broker(root.path()), None, "no Mosquitto here");
        let etc = root.path().join("etc/mosquitto");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        std::fs::write(etc.join("mosquitto.conf"), "persistence true\ninclude_dir /etc/mosquitto/conf.d\n").unwrap();
        let stock = broker(root.path()).unwrap();
        assert_eq!(stock.max_queued_messages, None);
        assert!(stock.advice.len() == 2 && stock.advice[0].contains("1000 (the default)"), "{:?}", stock.advice);
        let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mosquitto/adaptd.conf")).unwrap();
        std::fs::write(etc.join("conf.d/adaptd.conf"), shipped).unwrap();
        let fixed = broker(root.path()).unwrap();
        assert_eq!((fixed.max_queued_messages, fixed.max_queued_bytes, fixed.message_size_limit), (Some(0), Some(1 << 30), Some(4 << 20)));
        assert!(fixed.advice.is_empty(), "{:?}", fixed.advice);
        assert_eq!(fixed.files.len(), 2);
    }

    #[test]
    fn the_verdict_picks_a_gpu_only_where_it_is_faster() {
        let d = device(tempfile::tempdir().unwrap().path());
        let provider = |provider, p50_ms: Option<f64>| ProviderCheck { provider, registered: p50_ms.is_some(), reason: None, p50_ms };
        let check = |device: &str, precision: &str, rate: f64| TrainingCheck {
            device: device.into(),
            precision: precision.into(),
            head_seconds: Some(0.1),
            lora_samples_per_second: Some(rate),
            error: None,
        };
        let training = |device: &str, rate: f64| check(device, "fp32", rate);
        let v = verdict(
            &d,
            &[provider(ExecutionProvider::Cpu, Some(0.5)), provider(ExecutionProvider::Cuda, Some(0.2))],
            &[training("cpu", 100.0), training("cuda", 900.0)],
        );
        assert_eq!((v.execution_provider, v.training_device.as_str(), v.training_precision.as_str()), (ExecutionProvider::Cuda, "cuda", "fp32"));
        // fp16 autocast where it trains faster than fp32 on the same GPU, fp32 where it does not.
        let cpu = provider(ExecutionProvider::Cpu, Some(0.5));
        let v = verdict(&d, std::slice::from_ref(&cpu), &[training("cpu", 100.0), check("cuda", "fp32", 900.0), check("cuda", "fp16", 2000.0)]);
        assert_eq!((v.training_device.as_str(), v.training_precision.as_str()), ("cuda", "fp16"));
        let v = verdict(&d, std::slice::from_ref(&cpu), &[training("cpu", 100.0), check("cuda", "fp32", 900.0), check("cuda", "fp16", 800.0)]);
        assert_eq!((v.training_device.as_str(), v.training_precision.as_str()), ("cuda", "fp32"));
        let v = verdict(
            &d,
            &[provider(ExecutionProvider::Cpu, Some(0.1)), provider(ExecutionProvider::Cuda, Some(0.2))],
            &[training("cpu", 100.0), training("cuda", 50.0)],
        );
        assert_eq!((v.execution_provider, v.training_device.as_str()), (ExecutionProvider::Cpu, "cpu"));
    }
}
