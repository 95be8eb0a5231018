//! The engine: serves the base model and adapters through real ONNX Runtime, agrees with the
//! trainer (libtorch) on adapter outputs, refuses bad input without stopping, micro-batches, and
//! hot-swaps adapters under concurrent load without failing or mixing a request.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use adaptd::datasets::{Digits, Shift};
use adaptd_adapters::head::softmax_rows;
use adaptd_adapters::tensor::HostTensor;
use adaptd_adapters::{AdapterStore, Bundle};
use adaptd_daemon::engine::onnx::SessionOptions;
use adaptd_daemon::engine::{Engine, EngineConfig, EngineError, Health, INLINE_RUN_MAX};
use adaptd_daemon::preprocess::TextEncoder;
use adaptd_daemon::registry::Registry;
use adaptd_train::TrainingGraph;

use crate::{digits_data, head_adapter, lora_adapter, reference_bundle};

fn start(bundle: &str, config: EngineConfig) -> (tempfile::TempDir, Arc<Registry>, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(reference_bundle(bundle)).unwrap();
    let (registry, _) = Registry::open(bundle, AdapterStore::open(dir.path()).unwrap(), 4).unwrap();
    let registry = Arc::new(registry);
    let engine = Engine::start(registry.clone(), config).unwrap();
    (dir, registry, engine)
}

fn one_thread() -> EngineConfig {
    EngineConfig { session: SessionOptions { intra_op_threads: 1, ..Default::default() }, ..Default::default() }
}

#[test]
fn serves_the_base_model_and_is_ready_only_after_warm_up() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    assert!(matches!(*engine.handle.health().borrow(), Health::Ready { .. }));
    registry.ensure_task("digits").unwrap();
    let digits = Digits::load(&digits_data()).unwrap();
    let held = digits.held_out();
    let preds = engine.handle.infer_blocking("digits", vec![digits.batch(&held, Shift::None)]).unwrap();
    let correct = preds.iter().zip(digits.labels_of(&held)).filter(|(p, y)| p.class_index as i64 == *y).count();
    let accuracy = correct as f64 / held.len() as f64;
    assert!(accuracy > 0.95, "base model accuracy on upright held-out digits: {accuracy}");
    assert!(preds.iter().all(|p| &*p.adapter == "digits@v0" && p.labels.len() == 10 && (p.scores.iter().sum::<f32>() - 1.0).abs() < 1e-4));
    engine.shutdown();
}

/// A small model on an idle engine: each request runs on its caller's thread (no hand-off),
/// answering what the owner thread answers; with a batching wait configured, none does.
#[test]
fn an_idle_engine_runs_a_small_models_requests_on_the_callers_thread() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    registry.promote(lora_adapter(registry.bundle(), "sorter", 1, 4)).unwrap();
    let digits = Digits::load(&digits_data()).unwrap();
    let h = &engine.handle;
    let inline = || h.stats().inline.load(Ordering::Relaxed);
    let image = |i: usize| vec![digits.batch(&[i], Shift::Rotate90)];
    // The first small call is the owner thread's (nothing is known to be cheap before it).
    let first = h.infer_blocking("sorter", image(0)).unwrap();
    assert_eq!(inline(), 0);
    // Each later request runs inline exactly when the small-call estimate says cheap: one
    // answered by the owner thread must not make the next one queue too (the owner answers
    // only after releasing the session).
    let mut cheap_before = Vec::new();
    for i in 0..20 {
        let cheap = h.stats().small_call_ns.load(Ordering::Relaxed) <= INLINE_RUN_MAX.as_nanos() as u64;
        let before = inline();
        let answer = h.infer_blocking("sorter", image(i % 2)).unwrap();
        assert_eq!(inline() - before, u64::from(cheap), "request {i}: inline exactly when a small call is cheap");
        cheap_before.push(cheap);
        if i % 2 == 0 {
            assert_eq!(answer, first, "the same answer on either thread");
        }
    }
    // A batch-1 call of this model costs well under the limit, even on a busy machine.
    assert!(
        cheap_before.iter().filter(|c| **c).count() >= 15,
        "small calls cheap before: {cheap_before:?}, estimate now {} ns",
        h.stats().small_call_ns.load(Ordering::Relaxed)
    );
    assert!(h.stats().latency.snapshot().0.last().is_some_and(|(_, n)| *n == 21), "inline requests count in the latency metric too");
    engine.shutdown();

    let batching = EngineConfig { max_wait: Duration::from_millis(1), ..one_thread() };
    let (_dir, registry, engine) = start("digits-cnn", batching);
    registry.ensure_task("sorter").unwrap();
    for i in 0..5 {
        engine.handle.infer_blocking("sorter", image(i)).unwrap();
    }
    assert_eq!(engine.handle.stats().inline.load(Ordering::Relaxed), 0, "a configured wait asks for batching");
    engine.shutdown();
}

#[test]
fn adapter_outputs_match_the_trainer() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    let adapter = lora_adapter(registry.bundle(), "sorter", 1, 4);
    registry.promote(adapter.clone()).unwrap();
    let digits = Digits::load(&digits_data()).unwrap();
    let rows: Vec<usize> = digits.held_out().into_iter().take(16).collect();
    let images = digits.batch(&rows, Shift::Rotate90);
    let served = engine.handle.infer_blocking("sorter", vec![images.clone()]).unwrap();

    // The same adapter through libtorch: training graph + head + softmax.
    let graph = TrainingGraph::load(registry.bundle(), tch::Device::Cpu).unwrap();
    let slots = adapter.lora.as_ref().unwrap().graph_inputs(&registry.bundle().manifest).unwrap();
    let emb = graph.forward_host(&[images], &slots).unwrap().remove(0);
    let mut expected = adapter.head.forward(emb.as_f32().unwrap(), rows.len());
    softmax_rows(&mut expected, 3);
    let got: Vec<f32> = served.iter().flat_map(|p| p.scores.clone()).collect();
    let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-4, "engine and trainer disagree by {diff}");
    assert!(served.iter().all(|p| &*p.adapter == "sorter@v1" && p.adapter_version == 1 && ["left", "right", "stop"].contains(&p.label())));
    engine.shutdown();
}

#[test]
fn bad_requests_get_clear_errors_and_the_engine_keeps_serving() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    registry.promote(head_adapter(registry.bundle(), "sorter", 1, 1)).unwrap();
    let h = &engine.handle;
    let err = h.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![1, 1, 7, 8])]).unwrap_err();
    assert!(matches!(&err, EngineError::BadInput(m) if m.contains("\"image\"") && m.contains("[1, 1, 7, 8]")), "{err}");
    let mut nan = HostTensor::zeros_f32(vec![2, 1, 8, 8]);
    if let adaptd_adapters::HostData::F32(v) = &mut nan.data {
        v[70] = f32::NAN;
    }
    let err = h.infer_blocking("sorter", vec![nan]).unwrap_err();
    assert!(matches!(&err, EngineError::BadInput(m) if m.contains("non-finite") && m.contains("element 70")), "{err}");
    let err = h.infer_blocking("sorter", vec![HostTensor::i64(vec![1, 1, 8, 8], vec![0; 64]).unwrap()]).unwrap_err();
    assert_eq!(err.error_type(), "bad_input", "{err}");
    let err = h.infer_blocking("sorter", vec![]).unwrap_err();
    assert_eq!(err.error_type(), "bad_input", "{err}");
    let err = h.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![0, 1, 8, 8])]).unwrap_err();
    assert!(matches!(&err, EngineError::BadInput(m) if m.contains("no rows")), "{err}");
    let err = h.infer_blocking("nobody", vec![HostTensor::zeros_f32(vec![1, 1, 8, 8])]).unwrap_err();
    assert_eq!(err, EngineError::UnknownTask("nobody".into()));
    assert_eq!(h.stats().refused.load(Ordering::Relaxed), 6);
    let ok = h.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![3, 1, 8, 8])]).unwrap();
    assert_eq!(ok.len(), 3);
    engine.shutdown();
}

#[test]
fn text_requests_of_different_lengths_batch_together_without_changing_answers() {
    let config = EngineConfig { max_wait: Duration::from_millis(50), ..one_thread() };
    let (_dir, registry, engine) = start("minilm", config);
    registry.promote(lora_adapter(registry.bundle(), "intent", 1, 3)).unwrap();
    let encoder = TextEncoder::from_bundle(registry.bundle()).unwrap();
    let texts = ["stop", "drive back to the charging station near the north entrance right now", "pick up the box"];
    let alone: Vec<_> = texts.iter().map(|t| engine.handle.infer_blocking("intent", encoder.encode(&[t]).unwrap()).unwrap().remove(0)).collect();
    let batches_before = engine.handle.stats().batches.load(Ordering::Relaxed);
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| {
                let (h, inputs) = (engine.handle.clone(), encoder.encode(&[t]).unwrap());
                s.spawn(move || h.infer_blocking("intent", inputs).unwrap().remove(0))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let batches = engine.handle.stats().batches.load(Ordering::Relaxed) - batches_before;
    assert!(batches < texts.len() as u64, "{batches} graph calls for {} concurrent requests: no micro-batching", texts.len());
    for (a, b) in alone.iter().zip(&together) {
        let diff = a.scores.iter().zip(&b.scores).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "padding inside a batch changed an answer by {diff}");
    }
    engine.shutdown();
}

/// Heads whose answer encodes their version: all weights zero, the bias picks class version % 3.
fn marker_adapter(registry: &Registry, version: u64) -> adaptd_adapters::Adapter {
    let mut a = head_adapter(registry.bundle(), "sorter", version, version);
    let layer = &mut a.head.layers[0];
    layer.weight = HostTensor::zeros_f32(layer.weight.shape.clone());
    let mut bias = vec![0.0f32; 3];
    bias[(version % 3) as usize] = 10.0;
    layer.bias = HostTensor::f32(vec![3], bias).unwrap();
    a
}

#[test]
fn hot_swap_under_load_drops_nothing_and_never_mixes_adapters() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    registry.promote(marker_adapter(&registry, 1)).unwrap();
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 150;
    const PROMOTIONS: u64 = 40;
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let h = engine.handle.clone();
                s.spawn(move || {
                    let mut last_version = 0;
                    for _ in 0..REQUESTS {
                        let preds = h.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![2, 1, 8, 8])]).expect("no request fails during swaps");
                        let v = preds[0].adapter_version;
                        for p in &preds {
                            assert_eq!(p.adapter_version, v, "one request was served by two adapters");
                            assert_eq!(p.class_index as u64, v % 3, "v{v} reported, but another adapter's head answered");
                        }
                        assert!(v >= last_version, "a client saw v{v} after v{last_version}");
                        last_version = v;
                    }
                    last_version
                })
            })
            .collect();
        for v in 2..=PROMOTIONS {
            registry.promote(marker_adapter(&registry, v)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        for c in clients {
            c.join().unwrap();
        }
    });
    assert_eq!(registry.current("sorter").unwrap().version, PROMOTIONS);
    assert_eq!(registry.store().versions("sorter").unwrap().len(), 4, "pruned to the configured four");
    engine.shutdown();
}

#[test]
fn a_gpu_provider_that_cannot_register_fails_loudly_or_falls_back_when_allowed() {
    use adaptd_daemon::engine::onnx::ExecutionProvider;
    // The CPU build of ONNX Runtime used here has no CUDA provider: asking for it must not
    // quietly serve on the CPU.
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let (registry, _) = Registry::open(bundle, AdapterStore::open(dir.path()).unwrap(), 2).unwrap();
    let registry = Arc::new(registry);
    let cuda = SessionOptions { provider: ExecutionProvider::Cuda, ..Default::default() };
    let err = Engine::start(registry.clone(), EngineConfig { session: cuda, ..Default::default() }).err().expect("CUDA must not silently become CPU");
    assert!(err.to_string().contains("Cuda was asked for but failed to register"), "{err}");
    assert_eq!(err.error_type(), "execution_provider");

    let fallback = SessionOptions { fallback_to_cpu: true, ..cuda };
    let engine = Engine::start(registry, EngineConfig { session: fallback, ..Default::default() }).unwrap();
    assert_eq!(*engine.handle.health().borrow(), Health::Ready { provider: ExecutionProvider::Cpu });
    engine.shutdown();
}

#[test]
fn shutdown_answers_what_is_queued_and_then_refuses() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    registry.promote(head_adapter(registry.bundle(), "sorter", 1, 1)).unwrap();
    let kept = engine.handle.clone(); // a caller that still holds a handle must not block shutdown
    let in_flight: Vec<_> = (0..16)
        .map(|_| {
            let h = engine.handle.clone();
            std::thread::spawn(move || h.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![1, 1, 8, 8])]))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    engine.shutdown();
    for t in in_flight {
        // Either answered before the stop, or refused as stopped: never hung, never another error.
        match t.join().unwrap() {
            Ok(p) => assert_eq!(&*p[0].adapter, "sorter@v1"),
            Err(e) => assert_eq!(e, EngineError::Stopped),
        }
    }
    assert_eq!(kept.infer_blocking("sorter", vec![HostTensor::zeros_f32(vec![1, 1, 8, 8])]).unwrap_err(), EngineError::Stopped);
    assert_eq!(*kept.health().borrow(), Health::Stopped);
}

#[test]
fn a_routed_adapter_answers_base_like_rows_with_the_base_model_and_the_rest_itself() {
    let (_dir, registry, engine) = start("digits-cnn", one_thread());
    // A LoRA adapter over the base model's own labels (routing needs all of them).
    let mut adapter = lora_adapter(registry.bundle(), "sorter", 1, 4);
    adapter.manifest.base_routing = true;
    assert_eq!(registry.preview(adapter.clone()).unwrap_err().error_type(), "no_routing", "labels the base model cannot answer");
    let dim = registry.bundle().manifest.embedding_dim;
    let mut rng = adaptd_adapters::tensor::SeededRng::new(9);
    adapter.manifest.labels = (0..10).map(|d| d.to_string()).collect();
    adapter.head.layers[0].weight = HostTensor::f32(vec![10, dim], rng.normal_vec(10 * dim, 0.5)).unwrap();
    adapter.head.layers[0].bias = HostTensor::f32(vec![10], rng.normal_vec(10, 0.1)).unwrap();
    let routed = registry.promote(adapter.clone()).unwrap();
    assert!(routed.route.is_some(), "the manifest's base_routing is served");
    adapter.manifest.base_routing = false;
    let plain = registry.preview(adapter).unwrap();
    let digits = Digits::load(&digits_data()).unwrap();
    let rows: Vec<usize> = digits.held_out().into_iter().take(64).collect();
    // One request, rows interleaved: upright (the base domain) and sideways.
    let (upright, sideways) = (digits.batch(&rows, Shift::None), digits.batch(&rows, Shift::Rotate90));
    let width = 64;
    let mixed: Vec<f32> = (0..rows.len())
        .flat_map(|i| {
            let from = if i % 2 == 0 { &upright } else { &sideways };
            from.as_f32().unwrap()[i * width..(i + 1) * width].to_vec()
        })
        .collect();
    let mixed = HostTensor::f32(vec![rows.len(), 1, 8, 8], mixed).unwrap();
    let served = engine.handle.infer_blocking("sorter", vec![mixed.clone()]).unwrap();
    let base = runtime().block_on(engine.handle.evaluate(registry.base("sorter"), vec![mixed.clone()])).unwrap();
    let adapter_alone = runtime().block_on(engine.handle.evaluate(plain, vec![mixed])).unwrap();

    let routed_upright = served.iter().step_by(2).filter(|p| p.base_routed).count();
    let routed_sideways = served.iter().skip(1).step_by(2).filter(|p| p.base_routed).count();
    assert!(routed_upright >= 28, "most upright rows go to the base model: {routed_upright} of 32");
    assert!(routed_sideways <= 2, "sideways rows stay with the adapter: {routed_sideways} of 32 routed");
    for (i, p) in served.iter().enumerate() {
        let expected = if p.base_routed { &base[i] } else { &adapter_alone[i] };
        assert_eq!(p.label(), expected.label(), "row {i}");
        assert!(p.scores.iter().zip(&expected.scores).all(|(a, b)| (a - b).abs() < 1e-5), "row {i}: {:?} vs {:?}", p.scores, expected.scores);
        assert_eq!(&*p.adapter, "sorter@v1", "the routed adapter is what serves");
    }
    engine.shutdown();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}
