#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! Serving benchmarks, our engine and plain ONNX Runtime side by side in one run.
//!
//! 1. Criterion: batch-1 latency and batch-32 throughput, for `minilm` (seq 64) and `digits-cnn`:
//!    plain ONNX Runtime on the original model (exported without LoRA slots), on the graph with
//!    slots fed zeros and fed a LoRA adapter's values, and the engine serving a head alone and
//!    that LoRA with a head; all with the same intra-op threads.
//! 2. Side by side: interleaved rounds of sequential batch-1 requests; p50/p99 of each and the
//!    median over rounds of p50 ratios. Goals: a head / the original model <= 1.03; LoRA + head /
//!    the original model <= 1.08; LoRA + head / plain ONNX Runtime on the same graph and LoRA <= 1.05;
//!    LoReFT + head / plain ONNX Runtime on the same graph and LoReFT <= 1.05.
//!    Then each pair alone (a head / the original model, LoRA + head / the original model): the
//!    same requests with only the two contenders interleaved, as a device serving one model repeats
//!    one path; in the seven-way rotation each request follows another graph, and the engine's
//!    larger code and data are the more likely to have left the caches. Then, on digits-cnn, the
//!    engine alone: its own work per request, on a backend that hands back canned outputs.
//! 3. Throughput at 64 concurrent clients, batch 1, three runs: plain ONNX Runtime on the
//!    original model with one session shared through a mutex, and the engine serving LoRA + a
//!    head; the median ratio (target >= 1).
//!    The same for `efficientnet-lite0` at 224x224; then camera frames: a 1280x720 JPEG to the
//!    model input (time per frame) and frames per second at batch 8 under 8 clients.
//! 4. Hot swap under load, three runs: 64 client threads, 1,000 promotions each from a thread at
//!    background priority (as the trainer promotes); failed requests (target 0) and the median
//!    ratio of p99 during swaps to steady state (target <= 1.2x).
//!
//! `cargo bench -p adaptd --bench serving` (criterion's filters and `--quick` apply to part 1).
//! Set ADAPTD_BENCH_SKIP_CRITERION=1 to run only parts 2 to 4, ADAPTD_BENCH_ONLY=<bundle> (e.g.
//! `digits-cnn`) to run only part 2 for that bundle.

#[path = "../tests/integration/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use adaptd_adapters::slots::no_adapter_inputs;
use adaptd_adapters::tensor::{HostData, HostTensor};
use adaptd_adapters::{AdapterStore, Bundle};
use adaptd_daemon::engine::onnx::{OnnxModel, PreparedLora, SessionOptions};
use adaptd_daemon::engine::{Engine, EngineConfig};
use adaptd_daemon::preprocess::TextEncoder;
use adaptd_daemon::registry::Registry;
use criterion::{Criterion, Throughput};

const THREADS: usize = 2;
const SEQ: usize = 64;

struct Setup {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    engine: Engine,
    plain: OnnxModel,
    /// The original model, exported without slots (what a user would otherwise serve).
    original: PreparedLora,
    /// The graph with slots, fed zeros (what every adapter paid before the graph without slots).
    zero_lora: PreparedLora,
    /// The same graph fed the LoRA adapter's values.
    same_lora: PreparedLora,
    /// The LoReFT adapter's values written into the bundle's edits-only graph (merged LoReFT,
    /// the graph it serves on), run by plain ONNX Runtime.
    same_reft: PreparedLora,
    batch1: Vec<HostTensor>,
    batch32: Vec<HostTensor>,
}

fn inputs(bundle: &Bundle, rows: usize) -> Vec<HostTensor> {
    if bundle.manifest.name == "minilm" {
        // A sentence padded to 64 tokens, as the reference figures were taken at seq 64.
        let enc = TextEncoder::from_bundle(bundle).unwrap();
        let text = "the robot should move the blue crate from aisle seven to the loading dock and report when done";
        let one = enc.encode(&[text]).unwrap();
        let pad = |t: &HostTensor| {
            let HostData::I64(v) = &t.data else { unreachable!() };
            let mut row = v.clone();
            row.resize(SEQ, 0);
            HostTensor::i64(vec![rows, SEQ], row.iter().copied().cycle().take(rows * SEQ).collect()).unwrap()
        };
        vec![pad(&one[0]), pad(&one[1])]
    } else if bundle.manifest.name == "efficientnet-lite0" {
        let n = rows * 3 * 224 * 224;
        vec![HostTensor::f32(vec![rows, 3, 224, 224], (0..n).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect()).unwrap()]
    } else {
        vec![HostTensor::f32(vec![rows, 1, 8, 8], (0..rows * 64).map(|i| (i % 17) as f32 / 16.0).collect()).unwrap()]
    }
}

/// A frame of the camera task scaled to 1280x720, as a JPEG (quality 90), as a camera sends it.
fn hd_camera_jpeg() -> Vec<u8> {
    let camera = adaptd::datasets::CameraFrames::load(&adaptd::paths::camera_data()).expect("run `make setup` first");
    let frame = image::load_from_memory(&camera.frames[camera.of_domain("base")[0]]).unwrap().to_rgb8();
    let hd = image::imageops::resize(&frame, 1280, 720, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&hd).unwrap();
    jpeg
}

/// Camera frames as a user sends them: the time from a 1280x720 JPEG to the model input (decode,
/// crop, resize, normalise; median of 50), then frames per second with 8 clients each sending
/// batches of 8 such JPEGs through preprocessing and the engine (LoRA + head) for `seconds`.
fn camera_frames(s: &Setup, seconds: f64) {
    use adaptd_daemon::preprocess::{decode_image, image_pixels, normalize};
    let manifest = s.registry.bundle().manifest.clone();
    let jpeg = Arc::new(hd_camera_jpeg());
    let times: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            decode_image(&manifest.name, &manifest.preprocessing, &jpeg).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (h, stop, frames, jpeg, manifest) = (s.engine.handle.clone(), stop.clone(), frames.clone(), jpeg.clone(), manifest.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let pixels: Vec<_> = (0..8).map(|_| image_pixels(&manifest.name, &manifest.preprocessing, &jpeg).unwrap()).collect();
                    let batch = normalize(&manifest.name, &manifest.preprocessing, &pixels.iter().collect::<Vec<_>>()).unwrap();
                    h.infer_blocking("bench", vec![batch]).unwrap();
                    frames.fetch_add(8, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    println!(
        "camera frames: a 1280x720 JPEG ({} KiB) to the model input in {:.2} ms (median of 50); 8 clients x batches of 8 JPEGs, decoded and served with LoRA+head: {:.1} frames/s",
        jpeg.len() / 1024,
        median(times),
        frames.load(Ordering::Relaxed) as f64 / seconds
    );
}

fn setup(name: &str) -> Setup {
    let bundle = Bundle::open(adaptd::paths::reference_bundle(name)).expect("run `make setup` first");
    let dir = tempfile::tempdir().unwrap();
    let (registry, _) = Registry::open(bundle.clone(), AdapterStore::open(dir.path()).unwrap(), 4).unwrap();
    let registry = Arc::new(registry);
    // "bench" serves LoRA (every slot, rank 4) and a head; "head" a head alone (no slot changed);
    // "reft" LoReFT (every LoReFT slot, rank 4) and a head.
    registry.promote(fixtures::lora_adapter(&bundle, "bench", 1, 1)).unwrap();
    registry.promote(fixtures::head_adapter(&bundle, "head", 1, 1)).unwrap();
    registry.promote(fixtures::loreft_adapter(&bundle, "reft", 1, 1)).unwrap();
    // "base" serves the bundle as it is: its own classifier where it has one, no adapter.
    registry.ensure_task("base").unwrap();
    let session = SessionOptions { intra_op_threads: THREADS, ..Default::default() };
    let engine = Engine::start(registry.clone(), EngineConfig { session, ..Default::default() }).unwrap();
    let plain = OnnxModel::load(&bundle, session, None).unwrap();
    assert!(plain.has_plain_graph(), "{name}: a bundle exported before graphs without slots; run `make setup` to export it again");
    let zero_lora = plain.prepare_slots(&no_adapter_inputs(&bundle.manifest)).unwrap();
    let same_lora = plain.prepare_slots(&registry.current("bench").unwrap().lora.tensors).unwrap();
    let same_reft = plain.prepare_merged(&registry.current("reft").unwrap().lora.tensors).unwrap();
    let (batch1, batch32) = (inputs(&bundle, 1), inputs(&bundle, 32));
    // The LoRA and LoReFT adapters serve as the daemon serves them: after their first runs each
    // is written into a copy of the model (merged serving); measure once both copies serve.
    let started = Instant::now();
    while engine.handle.stats().merged_sessions.load(Ordering::Relaxed) < 2 || !matches!(&same_reft, PreparedLora::Slots(_, Some(m)) if m.is_merged()) {
        assert!(started.elapsed() < Duration::from_secs(120), "{name}: the LoRA and LoReFT adapters were not merged within 120 s");
        engine.handle.infer_blocking("bench", batch1.clone()).unwrap();
        engine.handle.infer_blocking("reft", batch1.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    Setup { _dir: dir, registry, engine, plain, original: PreparedLora::Plain, zero_lora, same_lora, same_reft, batch1, batch32 }
}

fn criterion_part(c: &mut Criterion, s: &mut Setup, name: &str) {
    for (label, batch) in [("batch1", s.batch1.clone()), ("batch32", s.batch32.clone())] {
        let mut group = c.benchmark_group(format!("serving/{name}/{label}"));
        group.throughput(Throughput::Elements(batch[0].shape[0] as u64));
        if name == "minilm" {
            group.sample_size(20).measurement_time(Duration::from_secs(if label == "batch32" { 12 } else { 5 }));
        }
        group.bench_function("plain_onnxruntime_original", |b| b.iter(|| s.plain.run_prepared(batch.clone(), &s.original).unwrap()));
        group.bench_function("plain_onnxruntime_slots_zero", |b| b.iter(|| s.plain.run_prepared(batch.clone(), &s.zero_lora).unwrap()));
        // The same LoRA values fed to plain ONNX Runtime: separates the LoRA's own compute from
        // what the engine adds (queue, batching, head, answers).
        group.bench_function("plain_onnxruntime_same_lora", |b| b.iter(|| s.plain.run_prepared(batch.clone(), &s.same_lora).unwrap()));
        let handle = s.engine.handle.clone();
        group.bench_function("adaptd_head", |b| b.iter(|| handle.infer_blocking("head", batch.clone()).unwrap()));
        let handle = s.engine.handle.clone();
        group.bench_function("adaptd_lora_head", |b| b.iter(|| handle.infer_blocking("bench", batch.clone()).unwrap()));
        group.finish();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Interleaved rounds of sequential batch-1 requests, request by request so drift in the
/// machine's load hits every contender alike: plain ONNX Runtime on the original model (no
/// slots), on the graph with slots fed zeros and fed the LoRA adapter's values, and the engine
/// serving a head alone, the LoRA adapter with its head and a LoReFT adapter with its head (each
/// merged: the LoRA folded into weights, the LoReFT written into the edits-only graph), and plain
/// ONNX Runtime on that edits-only graph with the same LoReFT values written in. p50 and p99 of
/// each; ratios are medians over rounds of the ratio of p50s.
fn side_by_side(s: &mut Setup, name: &str, rounds: usize, per_round: usize) {
    const NAMES: [&str; 7] =
        ["ORT original", "ORT slots, zeros", "ORT slots, same LoRA", "adaptd head", "adaptd LoRA+head", "adaptd LoReFT+head", "ORT edits-only, same LoReFT"];
    let handle = s.engine.handle.clone();
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); 6];
    for _ in 0..rounds {
        let mut round: Vec<Vec<f64>> = vec![Vec::with_capacity(per_round); NAMES.len()];
        for k in 0..per_round {
            // Each request's order rotates, so no contender always follows the same one (the
            // graph before it decides what is left in the caches).
            for j in 0..NAMES.len() {
                let i = (j + k) % NAMES.len();
                let t = Instant::now();
                match i {
                    0 => drop(s.plain.run_prepared(s.batch1.clone(), &s.original).unwrap()),
                    1 => drop(s.plain.run_prepared(s.batch1.clone(), &s.zero_lora).unwrap()),
                    2 => drop(s.plain.run_prepared(s.batch1.clone(), &s.same_lora).unwrap()),
                    3 => drop(handle.infer_blocking("head", s.batch1.clone()).unwrap()),
                    4 => drop(handle.infer_blocking("bench", s.batch1.clone()).unwrap()),
                    5 => drop(handle.infer_blocking("reft", s.batch1.clone()).unwrap()),
                    _ => drop(s.plain.run_prepared(s.batch1.clone(), &s.same_reft).unwrap()),
                }
                round[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let p50: Vec<f64> = round.iter().map(|t| median(t.clone())).collect();
        for (ratio, (ours, theirs)) in ratios.iter_mut().zip([(3, 0), (4, 0), (4, 2), (1, 0), (5, 0), (5, 6)]) {
            ratio.push(p50[ours] / p50[theirs]);
        }
        for (a, r) in all.iter_mut().zip(round) {
            a.extend(r);
        }
    }
    let figures: Vec<String> = NAMES
        .iter()
        .zip(&mut all)
        .map(|(n, t)| {
            t.sort_by(f64::total_cmp);
            format!("{n} p50 {:.3} ms p99 {:.3} ms", percentile(t, 0.5), percentile(t, 0.99))
        })
        .collect();
    let ratio = |i: usize| median(ratios[i].clone());
    println!("side-by-side {name} batch 1 ({rounds} rounds x {per_round}): {}", figures.join(" | "));
    println!(
        "side-by-side {name} summary: adaptd head / ORT original {:.3} (goal <= 1.03); adaptd LoRA+head / ORT original {:.3} (goal <= 1.08); \
         adaptd LoRA+head / ORT same graph and LoRA {:.3} (goal <= 1.05); unused slots, ORT slots with zeros / original {:.3}; \
         adaptd LoReFT+head / ORT original {:.3}; adaptd LoReFT+head / ORT same graph and LoReFT {:.3} (goal <= 1.05)",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3),
        ratio(4),
        ratio(5)
    );
}

fn hot_swap(s: &Setup, clients: usize, promotions: u64) -> (f64, u64) {
    let handle = s.engine.handle.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let swapping = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (h, stop, swapping, failures, input) = (handle.clone(), stop.clone(), swapping.clone(), failures.clone(), s.batch1.clone());
            std::thread::spawn(move || {
                let (mut steady, mut during) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let in_swap = swapping.load(Ordering::Relaxed);
                    let t = Instant::now();
                    if h.infer_blocking("bench", input.clone()).is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if in_swap { during.push(ms) } else { steady.push(ms) }
                }
                (steady, during)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    swapping.store(true, Ordering::Relaxed);
    let bundle = s.registry.bundle().clone();
    let start_version = s.registry.current("bench").unwrap().version;
    let t = Instant::now();
    let registry = s.registry.clone();
    // Promotions come from the trainer's side of the daemon, which runs below serving's priority.
    std::thread::spawn(move || {
        adaptd_daemon::background_priority();
        for v in 1..=promotions {
            let adapter = if v % 2 == 0 {
                fixtures::lora_adapter(&bundle, "bench", start_version + v, v)
            } else {
                fixtures::head_adapter(&bundle, "bench", start_version + v, v)
            };
            registry.promote(adapter).unwrap();
        }
    })
    .join()
    .unwrap();
    let swap_secs = t.elapsed().as_secs_f64();
    swapping.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (mut steady, mut during) = (Vec::new(), Vec::new());
    for th in threads {
        let (a, b) = th.join().unwrap();
        steady.extend(a);
        during.extend(b);
    }
    steady.sort_by(f64::total_cmp);
    during.sort_by(f64::total_cmp);
    let (p99s, p99d) = (percentile(&steady, 0.99), percentile(&during, 0.99));
    println!(
        "hot-swap {}: {clients} clients, {promotions} promotions in {swap_secs:.1} s ({:.0}/s); requests steady {} / during swaps {}; failed {}; p50 steady {:.2} ms during {:.2} ms; p99 steady {p99s:.2} ms during {p99d:.2} ms (ratio {:.2})",
        s.registry.bundle().manifest.name,
        promotions as f64 / swap_secs,
        steady.len(),
        during.len(),
        failures.load(Ordering::Relaxed),
        percentile(&steady, 0.5),
        percentile(&during, 0.5),
        p99d / p99s
    );
    (p99d / p99s, failures.load(Ordering::Relaxed))
}

/// Requests per second of `clients` threads sending batch-1 requests for `seconds`: plain ONNX
/// Runtime with one session behind a mutex (what a user serving one model from many threads
/// writes), then the engine; returns (plain, ours).
fn concurrent(s: &Setup, clients: usize, seconds: f64) -> (f64, f64) {
    let bundle = s.registry.bundle().clone();
    let session = SessionOptions { intra_op_threads: THREADS, ..Default::default() };
    let plain = OnnxModel::load(&bundle, session, None).unwrap();
    let original = Arc::new(PreparedLora::Plain);
    let plain = Arc::new(std::sync::Mutex::new(plain));
    let count = |run: Arc<dyn Fn() + Send + Sync>| {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (run, stop, served) = (run.clone(), stop.clone(), served.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        run();
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        served.load(Ordering::Relaxed) as f64 / seconds
    };
    let input = s.batch1.clone();
    let plain_run: Arc<dyn Fn() + Send + Sync> = {
        let input = input.clone();
        Arc::new(move || {
            plain.lock().unwrap().run_prepared(input.clone(), &original).unwrap();
        })
    };
    let handle = s.engine.handle.clone();
    let ours_run: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        handle.infer_blocking("bench", input.clone()).unwrap();
    });
    let (p, o) = (count(plain_run), count(ours_run));
    println!(
        "concurrent {}: {clients} clients x {seconds:.0} s, batch 1: plain ORT on the original model (one session, a mutex) {p:.0} req/s | adaptd LoRA+head {o:.0} req/s | ratio {:.2}",
        bundle.manifest.name,
        o / p
    );
    (p, o)
}

fn main() {
    let skip_criterion = std::env::var_os("ADAPTD_BENCH_SKIP_CRITERION").is_some();
    // One model's side-by-side and pairwise parts alone (to profile or repeat them quickly).
    if let Ok(name) = std::env::var("ADAPTD_BENCH_ONLY") {
        let mut s = setup(&name);
        let per_round = if name == "digits-cnn" { 2000 } else { 40 };
        side_by_side(&mut s, &name, 5, per_round / 5);
        pairwise(&mut s, &name, 5, per_round);
        engine_alone(&s);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut minilm = setup("minilm");
    let mut digits = setup("digits-cnn");
    if !skip_criterion {
        criterion_part(&mut c, &mut minilm, "minilm");
        criterion_part(&mut c, &mut digits, "digits-cnn");
        c.final_summary();
    }
    side_by_side(&mut minilm, "minilm", 5, 40);
    pairwise(&mut minilm, "minilm", 5, 40);
    side_by_side(&mut digits, "digits-cnn", 5, 400);
    pairwise(&mut digits, "digits-cnn", 5, 2000);
    engine_alone(&digits);
    let mut camera = setup("efficientnet-lite0");
    side_by_side(&mut camera, "efficientnet-lite0", 5, 40);
    pairwise(&mut camera, "efficientnet-lite0", 5, 40);
    camera_frames(&camera, 10.0);
    for (setup, seconds) in [(&digits, 3.0), (&minilm, 5.0)] {
        let runs: Vec<(f64, f64)> = (0..3).map(|_| concurrent(setup, 64, seconds)).collect();
        println!(
            "concurrent {} summary: throughput ratio adaptd / plain ORT, median of {} runs: {:.2}",
            setup.registry.bundle().manifest.name,
            runs.len(),
            median(runs.iter().map(|(p, o)| o / p).collect())
        );
    }
    label_request_offers(&mut digits);
    let runs: Vec<(f64, u64)> = (0..3).map(|_| hot_swap(&digits, 64, 1000)).collect();
    println!(
        "hot-swap summary: failed requests {} in total; p99 during swaps / steady, median of {} runs: {:.2}",
        runs.iter().map(|r| r.1).sum::<u64>(),
        runs.len(),
        median(runs.iter().map(|r| r.0).collect())
    );
}

/// What label requests add to serving: the HTTP and MQTT paths offer each answered request to the
/// requester (a look at its scores under a lock; the body kept only for the few that enter the
/// pool). Timed per request against a batch-1 digits-cnn run, the cheapest model here.
fn label_request_offers(s: &mut Setup) {
    use adaptd_daemon::labels::service::LabelRequests;
    let requests = LabelRequests::new(s._dir.path().join("unused.db"));
    requests.ask_for("bench", &adaptd_daemon::labels::LabelsConfig::default());
    let body = br#"{"inputs": {"image": {"shape": [1, 1, 8, 8], "data": [0]}}}"#;
    let handle = s.engine.handle.clone();
    let predictions: Vec<Vec<adaptd_daemon::engine::Prediction>> = (0..256).map(|_| handle.infer_blocking("bench", s.batch1.clone()).unwrap()).collect();
    let (mut offer, mut serve) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        for p in &predictions {
            requests.offer("bench", p, body, Some("application/json"));
        }
        offer.push(t.elapsed().as_secs_f64() * 1e9 / predictions.len() as f64);
        let t = Instant::now();
        for _ in 0..256 {
            drop(s.plain.run_prepared(s.batch1.clone(), &s.original).unwrap());
        }
        serve.push(t.elapsed().as_secs_f64() * 1e9 / 256.0);
    }
    let (offer, serve) = (median(offer), median(serve));
    println!(
        "label requests: an answered request offered to the requester costs {offer:.0} ns (median of 5 x 256), {:.1} % of a batch-1 digits-cnn run ({:.1} us) on plain ONNX Runtime",
        100.0 * offer / serve,
        serve / 1e3
    );
}

/// Pairs alone: each comparison interleaves only its two contenders, so neither runs after a
/// third graph that emptied the caches of what it uses (a device serving one model repeats one
/// path). Prints the median over rounds of each pair's p50 ratio.
fn pairwise(s: &mut Setup, name: &str, rounds: usize, per_round: usize) {
    let handle = s.engine.handle.clone();
    let (mut base, mut head, mut lora) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (task, out) in [("base", &mut base), ("head", &mut head), ("bench", &mut lora)] {
            let (mut ours, mut theirs) = (Vec::with_capacity(per_round), Vec::with_capacity(per_round));
            for k in 0..per_round {
                for j in 0..2 {
                    let t = Instant::now();
                    if (j + k) % 2 == 0 {
                        drop(s.plain.run_prepared(s.batch1.clone(), &s.original).unwrap());
                        theirs.push(t.elapsed().as_secs_f64());
                    } else {
                        drop(handle.infer_blocking(task, s.batch1.clone()).unwrap());
                        ours.push(t.elapsed().as_secs_f64());
                    }
                }
            }
            out.push(median(ours) / median(theirs));
        }
    }
    println!(
        "pairwise {name} batch 1 ({rounds} rounds x {per_round}): adaptd base / ORT original {:.3} (goal <= 1.03); adaptd head / ORT original {:.3}; adaptd LoRA+head / ORT original {:.3} (goal <= 1.08)",
        median(base),
        median(head),
        median(lora)
    );
}

/// The engine's own work per request, without a model: a backend that answers every call with the
/// outputs ONNX Runtime gave for the same input, served through the same handle and head.
fn engine_alone(s: &Setup) {
    use adaptd_daemon::engine::InferenceBackend;
    use adaptd_daemon::engine::onnx::OnnxError;
    struct Canned(adaptd_adapters::Manifest, Vec<HostTensor>);
    impl InferenceBackend for Canned {
        type Lora = ();
        fn manifest(&self) -> &adaptd_adapters::Manifest {
            &self.0
        }
        fn prepare_lora(&self, _: &[HostTensor]) -> Result<(), OnnxError> {
            Ok(())
        }
        fn run_prepared(&mut self, _: Vec<HostTensor>, _: &()) -> Result<Vec<HostTensor>, OnnxError> {
            Ok(self.1.clone())
        }
    }
    let mut plain = OnnxModel::load(s.registry.bundle(), SessionOptions::default(), None).unwrap();
    let outputs = plain.run_prepared(s.batch1.clone(), &PreparedLora::Plain).unwrap();
    let manifest = s.registry.bundle().manifest.clone();
    let canned = Canned(manifest, outputs.clone());
    let engine =
        Engine::start_with(s.registry.clone(), EngineConfig::default(), move |_| Ok((canned, adaptd_daemon::engine::onnx::ExecutionProvider::Cpu))).unwrap();
    let handle = engine.handle.clone();
    let time = |f: &mut dyn FnMut()| {
        let runs: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..20000 {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e9 / 20000.0
            })
            .collect();
        median(runs)
    };
    let copy = time(&mut || drop(std::hint::black_box((s.batch1.clone(), outputs.clone()))));
    let head = time(&mut || drop(handle.infer_blocking("head", s.batch1.clone()).unwrap()));
    let lora = time(&mut || drop(handle.infer_blocking("bench", s.batch1.clone()).unwrap()));
    println!(
        "engine alone (a backend that hands back canned outputs): a head {head:.0} ns, LoRA+head {lora:.0} ns a request, of which copying the input and outputs {copy:.0} ns"
    );
    engine.shutdown();
}
