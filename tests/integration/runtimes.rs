//! The two runtimes agree on each reference bundle, LoRA slots are live, and LoRA trains through
//! libtorch while the base stays bit-identical.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use adaptd::parity::{self, PARITY_TOLERANCE};
use adaptd_adapters::Bundle;
use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::slots::no_adapter_inputs;
use adaptd_adapters::tensor::HostTensor;
use adaptd_daemon::engine::onnx::{MERGE_AFTER_RUNS, OnnxModel, PreparedLora, SessionOptions};
use adaptd_train::{Examples, FitTarget, Recipe, TrainError, TrainingGraph, fit};
use tch::Device;

use crate::reference_bundle;

fn probe_data() -> parity::ProbeData {
    parity::ProbeData::in_build_dir(&adaptd::paths::build_dir())
}

fn load(name: &str) -> (Bundle, OnnxModel, TrainingGraph) {
    let bundle = Bundle::open(reference_bundle(name)).expect("bundle opens");
    let onnx = OnnxModel::load(&bundle, SessionOptions { intra_op_threads: 1, ..Default::default() }, None).expect("ONNX Runtime loads the serving graph");
    let graph = TrainingGraph::load(&bundle, Device::Cpu).expect("libtorch loads the training graph");
    (bundle, onnx, graph)
}

fn assert_parity(name: &str) {
    let (bundle, mut onnx, graph) = load(name);
    let inputs = parity::probe_inputs(&bundle, &probe_data()).unwrap();
    for rank in [1, 8, bundle.manifest.lora.rank_max] {
        let report = parity::check_parity(&mut onnx, &graph, &inputs, rank, 11).unwrap();
        for o in &report.outputs {
            assert!(o.base_max_abs_diff <= PARITY_TOLERANCE, "{name} {}: base differs by {}", o.name, o.base_max_abs_diff);
            assert!(o.lora_max_abs_diff <= PARITY_TOLERANCE, "{name} {} rank {rank}: LoRA differs by {}", o.name, o.lora_max_abs_diff);
        }
        assert!(report.lora_effect > 1e-2, "{name} rank {rank}: the LoRA slots barely change the output ({})", report.lora_effect);
        assert!(report.passed());
    }
}

#[test]
fn digits_cnn_runtimes_agree_with_and_without_lora() {
    assert_parity("digits-cnn");
}

#[test]
fn minilm_runtimes_agree_with_and_without_lora() {
    assert_parity("minilm");
}

/// EfficientNet-Lite0 at 224x224 on real camera frames (JPEG decoded, resized, cropped and
/// normalised by the daemon's own preprocessing): batch norm folded the same way in both
/// runtimes, depthwise convolutions, ReLU6, TensorFlow 'same' padding, and LoRA slots on the
/// pointwise convolutions above the cut.
#[test]
fn efficientnet_lite0_runtimes_agree_with_and_without_lora_on_camera_frames() {
    assert_parity("efficientnet-lite0");
}

/// ONNX Runtime allows one environment per process. Parts of the daemon that start at once
/// (engine, doctor, a second task) all load it on first use: each gets the one environment.
#[test]
fn parts_loading_onnx_runtime_at_once_all_get_the_one_environment() {
    const RACERS: usize = 256;
    // In a process of its own, or another test will have loaded it already.
    if crate::in_own_process("runtimes::parts_loading_onnx_runtime_at_once_all_get_the_one_environment") {
        return;
    }
    // Callers arrive every 0.2 ms over the first load (tens of ms): those arriving as it
    // finishes are the ones a check-then-create sends to build a second environment.
    let start = std::sync::Barrier::new(RACERS);
    let loaded: Vec<usize> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    std::thread::sleep(std::time::Duration::from_micros(200 * i as u64));
                    adaptd_daemon::engine::onnx::environment(None).map(|env| env as *const _ as usize)
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().expect("racer thread").expect("each first caller gets the environment")).collect()
    });
    assert!(loaded.windows(2).all(|w| w[0] == w[1]), "callers got different environments: {loaded:?}");
}

/// On a GPU provider prepared LoRA values are copied into the device's memory once. The copy
/// goes through ONNX Runtime's device-to-device path, the same one used here between host
/// allocators: the values a run reads from there give the answers host values give.
#[test]
fn lora_values_prepared_on_a_device_give_the_same_outputs_as_host_values() {
    let (bundle, mut onnx, _) = load("digits-cnn");
    assert_eq!(onnx.lora_device(), "Cpu", "a CPU session keeps LoRA values in host memory");
    let inputs = parity::probe_inputs(&bundle, &probe_data()).unwrap();
    let lora = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 5, 0.05).unwrap().graph_inputs(&bundle.manifest).unwrap();
    let host = onnx.run(&inputs, &lora).unwrap();
    onnx.set_lora_device(Some((ort::memory::AllocationDevice::CPU, 0)));
    let prepared = onnx.prepare_lora(&lora).unwrap();
    let PreparedLora::Slots(values, _) = &prepared else { panic!("a LoRA that changes the slots runs on the graph with slots") };
    assert!(
        values
            .iter()
            .all(|v| v.view().downcast::<ort::value::DynTensorValueType>().unwrap().memory_info().allocation_device() == ort::memory::AllocationDevice::CPU)
    );
    let placed = onnx.run_prepared(inputs.clone(), &prepared).unwrap();
    for (a, b) in host.iter().zip(&placed) {
        assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap(), "the same values, wherever they were prepared");
    }
    let none = onnx.run(&inputs, &no_adapter_inputs(&bundle.manifest)).unwrap();
    assert_ne!(none[0].as_f32().unwrap(), placed[0].as_f32().unwrap(), "the placed LoRA values are the ones the run read");
}

/// Every reference bundle ships its model exported without slots too: an adapter that changes
/// no slot (the base model, a head) runs there and answers as the graph with slots fed zeros
/// does; a LoRA that changes a slot runs on the graph with slots.
#[test]
fn adapters_that_change_no_slot_run_on_the_graph_without_slots_and_answer_alike() {
    for name in ["digits-cnn", "minilm", "efficientnet-lite0"] {
        let bundle = adaptd_adapters::Bundle::open(reference_bundle(name)).unwrap();
        let mut onnx = OnnxModel::load(&bundle, SessionOptions::default(), None).unwrap();
        assert!(onnx.has_plain_graph(), "{name}");
        let inputs: Vec<HostTensor> = parity::probe_inputs(&bundle, &probe_data()).unwrap().into_iter().map(|t| t.rows(0, 4)).collect();
        let zeros = no_adapter_inputs(&bundle.manifest);
        assert!(matches!(onnx.prepare_lora(&zeros).unwrap(), PreparedLora::Plain), "{name}: zeros run on the graph without slots");
        let plain = onnx.run(&inputs, &zeros).unwrap();
        let slots = onnx.prepare_slots(&zeros).unwrap();
        let slotted = onnx.run_prepared(inputs.clone(), &slots).unwrap();
        for (a, b) in plain.iter().zip(&slotted) {
            let diff = a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "{name}: the two graphs differ by {diff}");
        }
        // B all zeros on every slot: still no change, whatever A holds.
        let mut a_only = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 3, 0.05).unwrap().graph_inputs(&bundle.manifest).unwrap();
        for b in a_only.iter_mut().skip(1).step_by(2) {
            *b = HostTensor::f32(b.shape.clone(), vec![0.0; b.shape.iter().product()]).unwrap();
        }
        assert!(matches!(onnx.prepare_lora(&a_only).unwrap(), PreparedLora::Plain), "{name}");
        let lora = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 3, 0.05).unwrap().graph_inputs(&bundle.manifest).unwrap();
        assert!(matches!(onnx.prepare_lora(&lora).unwrap(), PreparedLora::Slots(..)), "{name}");
        let adapted = onnx.run(&inputs, &lora).unwrap();
        assert_ne!(adapted[0].as_f32().unwrap(), plain[0].as_f32().unwrap(), "{name}: the LoRA changes the answers");
    }
}

/// A LoRA that serves is folded into a copy of the model without slots (merged serving) on a
/// thread of its own; from then on it runs there and answers as the slotted graph does, on every
/// reference bundle (Linear weights held transposed in MiniLM, convolutions with their batch
/// norm folded in in EfficientNet), whether it uses every slot or some. Merged copies are capped
/// by `merged_sessions`, and a dropped adapter frees its copy. A LoReFT alone runs merged as well,
/// its values written into the bundle's edits-only graph.
#[test]
fn a_served_lora_is_folded_into_a_copy_of_the_model_and_answers_as_the_slots_do() {
    let merged_of = |p: &PreparedLora| match p {
        PreparedLora::Slots(_, Some(m)) => m.clone(),
        _ => panic!("a LoRA or a LoReFT on a bundle with merge maps can be merged"),
    };
    let wait = |m: &adaptd_daemon::engine::onnx::Merging| {
        let started = std::time::Instant::now();
        while !m.is_merged() {
            assert!(started.elapsed() < Duration::from_secs(120), "the merged copy was not built in 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for name in ["digits-cnn", "minilm", "efficientnet-lite0"] {
        let bundle = adaptd_adapters::Bundle::open(reference_bundle(name)).unwrap();
        let mut onnx = OnnxModel::load(&bundle, SessionOptions { merged_sessions: 1, ..SessionOptions::default() }, None).unwrap();
        assert!(onnx.merges_lora(), "{name}: the reference bundles ship a merge map");
        let inputs: Vec<HostTensor> = parity::probe_inputs(&bundle, &probe_data()).unwrap().into_iter().map(|t| t.rows(0, 4)).collect();
        let every = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 8, 16.0, 21, 0.05).unwrap().graph_inputs(&bundle.manifest).unwrap();
        // Every other slot left empty (B zero): those keep the model's own weight.
        let mut some = every.clone();
        for b in some.iter_mut().skip(1).step_by(4) {
            *b = HostTensor::f32(b.shape.clone(), vec![0.0; b.shape.iter().product()]).unwrap();
        }
        // A LoReFT alone runs merged too: its values written into the bundle's edits-only graph,
        // which answers as the slotted graph does (MiniLM's probe rows are a padded batch).
        let spec = bundle.manifest.reft.as_ref().unwrap();
        let reft = adaptd_adapters::ReftWeights::random(spec, 4, 9, 0.3).unwrap();
        let edits = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, None, Some(&reft)).unwrap();
        for (kind, values) in [("LoRA", &every), ("LoRA on some slots", &some), ("LoReFT", &edits)] {
            let prepared = onnx.prepare_merged(values).unwrap();
            let merging = merged_of(&prepared);
            wait(&merging);
            assert_eq!(onnx.merged_sessions(), 1, "{name}");
            let merged = onnx.run_prepared(inputs.clone(), &prepared).unwrap();
            let slotted = onnx.run_prepared(inputs.clone(), &onnx.prepare_slots(values).unwrap()).unwrap();
            let base = onnx.run(&inputs, &no_adapter_inputs(&bundle.manifest)).unwrap();
            for ((m, s), b) in merged.iter().zip(&slotted).zip(&base) {
                let (m, s, b) = (m.as_f32().unwrap(), s.as_f32().unwrap(), b.as_f32().unwrap());
                let scale = s.iter().fold(1.0f32, |acc, x| acc.max(x.abs()));
                let diff = m.iter().zip(s).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                let effect = s.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                assert!(diff <= 1e-4 * scale, "{name} {kind}: merged and slotted differ by {diff} (values up to {scale})");
                assert!(effect > 100.0 * diff, "{name} {kind}: the adapter moves the outputs by {effect}, far more than merging does ({diff})");
            }
            drop(prepared);
            drop(merging);
            let started = std::time::Instant::now();
            while onnx.merged_sessions() > 0 {
                assert!(started.elapsed() < Duration::from_secs(10), "{name} {kind}: a dropped adapter frees its merged copy");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // One place (merged_sessions = 1): a second LoRA waits while the first is in use, and
        // takes the place once the first has sat idle while the second served.
        let first = onnx.prepare_merged(&every).unwrap();
        wait(&merged_of(&first));
        let second = onnx.prepare_merged(&some).unwrap();
        // Old enough to ask for a copy when it runs (MERGE_AFTER).
        std::thread::sleep(adaptd_daemon::engine::onnx::MERGE_AFTER + Duration::from_millis(100));
        assert!(!merged_of(&second).is_merged(), "{name}: merged_sessions = 1 allows one merged copy");
        for _ in 0..2 * MERGE_AFTER_RUNS {
            onnx.run_prepared(inputs.clone(), &second).unwrap();
        }
        wait(&merged_of(&second));
        assert!(!merged_of(&first).is_merged(), "{name}: the idle adapter gave its copy up");
        assert_eq!(onnx.merged_sessions(), 1, "{name}");
    }
}

/// fp16 autocast is a CUDA path: a graph on the CPU refuses it and stays fp32, so CPU training
/// is unchanged whatever `training.precision` says.
#[test]
fn mixed_precision_is_refused_on_the_cpu_and_training_there_stays_fp32() {
    let (_, _, mut graph) = load("digits-cnn");
    let err = graph.enable_mixed_precision().unwrap_err().to_string();
    assert!(err.contains("CUDA") && err.contains("CPU"), "{err}");
    assert!(!graph.mixed_precision());
}

#[test]
fn minilm_base_embeddings_are_unit_length_and_padding_does_not_leak() {
    let (bundle, mut onnx, _) = load("minilm");
    let encoder = adaptd_daemon::preprocess::TextEncoder::from_bundle(&bundle).unwrap();
    let zeros = no_adapter_inputs(&bundle.manifest);
    let alone_inputs = encoder.encode(&["pick up the blue box"]).unwrap();
    let alone = onnx.run(&alone_inputs, &zeros).unwrap();
    let padded_batch = encoder.encode(&["pick up the blue box", "drive all the way back to the charging station near the north entrance"]).unwrap();
    assert!(padded_batch[0].shape[1] > alone_inputs[0].shape[1], "second text must force padding of the first");
    let batched = onnx.run(&padded_batch, &zeros).unwrap();
    let first = &batched[0].as_f32().unwrap()[..384];
    let diff = first.iter().zip(alone[0].as_f32().unwrap()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-5, "padding changed the embedding by {diff}");
    let norm: f32 = first.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "embedding norm {norm}");
}

#[test]
fn trimming_padding_from_a_text_batch_changes_no_output() {
    let (bundle, _, graph) = load("minilm");
    let encoder = adaptd_daemon::preprocess::TextEncoder::from_bundle(&bundle).unwrap();
    // Two short texts padded as if a long one were in the training set.
    let long = "drive all the way back to the charging station near the north entrance and wait there for the operator";
    let padded: Vec<tch::Tensor> = encoder
        .encode(&["pick up the blue box", "go to the dock", long])
        .unwrap()
        .iter()
        .map(|t| adaptd_train::to_tensor(t, Device::Cpu).narrow(0, 0, 2))
        .collect();
    let trimmed = graph.trim_padding(padded.iter().map(tch::Tensor::shallow_clone).collect());
    let (full, short) = (padded[0].size()[1], trimmed[0].size()[1]);
    assert!(short < full && trimmed.iter().all(|t| t.size()[1] == short), "{full} -> {short} columns");
    assert_eq!(short, padded[1].sum_dim_intlist(1, false, tch::Kind::Int64).max().int64_value(&[]), "cut to the longest text of the batch");
    let lora = no_adapter_inputs(&bundle.manifest).iter().map(|t| adaptd_train::to_tensor(t, Device::Cpu)).collect::<Vec<_>>();
    let (a, b) = (graph.forward(&padded, &lora).unwrap(), graph.forward(&trimmed, &lora).unwrap());
    let diff = (&a[0] - &b[0]).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "trimming changed the embedding by {diff}");
    // Image batches pass unchanged.
    let (_, _, cnn) = load("digits-cnn");
    let images = vec![tch::Tensor::zeros([2, 1, 8, 8], (tch::Kind::Float, Device::Cpu))];
    assert_eq!(cnn.trim_padding(images)[0].size(), vec![2, 1, 8, 8]);
}

fn assert_trains(name: &str) {
    let (bundle, _, graph) = load(name);
    let report = parity::training_probe(&bundle, &graph, &probe_data(), 12).unwrap();
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    assert!(report.losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.8 * first, "{name}: loss went {first} -> {last}");
    assert_eq!(report.base_unchanged, Some(true), "{name}: base parameters changed during LoRA training");
    let lora = report.lora.expect("a LoRA fit returns LoRA weights");
    // B moved away from its zero start on every slot: LoRA itself trained, not only the head.
    for m in &lora.modules {
        let b_norm: f32 = m.b.as_f32().unwrap().iter().map(|x| x.abs()).sum();
        assert!(b_norm > 0.0, "{name}: LoRA B of {} never moved", m.module);
    }
    lora.validate(&bundle.manifest.lora).expect("trained weights fit the bundle");
}

/// LoReFT trains through libtorch on each bundle: the loss falls, the base stays bit-identical,
/// R keeps orthonormal rows, only the slots a job may train are in the adapter (above the cut
/// where the trainer takes it), the adapter is a small fraction of a LoRA's parameters, and ONNX
/// Runtime serves it as libtorch trained it.
fn assert_loreft_trains(name: &str, above_cut: bool) {
    let (bundle, mut onnx, mut graph) = load(name);
    if above_cut {
        graph.load_cut(&bundle).unwrap();
    }
    let report = parity::loreft_training_probe(&bundle, &graph, &probe_data(), 12).unwrap();
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    assert!(report.losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.8 * first, "{name}: loss went {first} -> {last}");
    assert_eq!(report.base_unchanged, Some(true), "{name}: base parameters changed during LoReFT training");
    assert!(report.lora.is_none());
    let reft = report.reft.expect("a LoReFT fit returns LoReFT weights");
    let spec = bundle.manifest.reft.as_ref().unwrap();
    reft.validate(spec).expect("trained weights fit the bundle");
    let expected: Vec<&str> = match (above_cut, &bundle.manifest.cut) {
        (true, Some(cut)) => cut.reft_above.iter().map(|&i| spec.slots[i].module.as_str()).collect(),
        _ => spec.slots.iter().map(|s| s.module.as_str()).collect(),
    };
    assert_eq!(reft.modules.iter().map(|m| m.module.as_str()).collect::<Vec<_>>(), expected, "{name}: the slots the job trains");
    for m in &reft.modules {
        let (r, d) = (m.rotate.as_f32().unwrap(), m.rotate.shape[1]);
        let mut worst = 0.0f64;
        for i in 0..reft.rank {
            for j in 0..reft.rank {
                // In f64, so the check measures R and not the sum's own rounding.
                let dot: f64 = (0..d).map(|k| f64::from(r[i * d + k]) * f64::from(r[j * d + k])).sum();
                worst = worst.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        eprintln!("{name} {}: max |R R^T - I| = {worst:.2e}", m.module);
        assert!(worst < 1e-5, "{name} {}: R R^T is {worst:.2e} from the identity", m.module);
        let moved: f32 =
            m.weight.as_f32().unwrap().iter().zip(r).map(|(w, r)| (w - r).abs()).sum::<f32>() + m.bias.as_f32().unwrap().iter().map(|b| b.abs()).sum::<f32>();
        assert!(moved > 0.0, "{name}: LoReFT {} never moved from its no-edit start", m.module);
    }
    let lora_params: usize = bundle.manifest.lora.slots.iter().map(|s| 8 * (s.a_shape[1..].iter().product::<usize>() + s.out_features)).sum();
    assert!(reft.parameter_count() * 5 <= lora_params, "{name}: LoReFT {} parameters vs LoRA rank 8's {lora_params}", reft.parameter_count());
    // Served by ONNX Runtime as libtorch trained it.
    let values = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, None, Some(&reft)).unwrap();
    let inputs = parity::probe_inputs(&bundle, &probe_data()).unwrap();
    let served = onnx.run(&inputs, &values).unwrap();
    let trained = graph.forward_host(&inputs, &values).unwrap();
    for (s, t) in served.iter().zip(&trained) {
        let diff = adaptd_adapters::tensor::max_abs_diff(s, t).unwrap();
        assert!(diff <= PARITY_TOLERANCE, "{name}: ONNX Runtime serves the trained LoReFT {diff} away from libtorch");
    }
    assert!(!adaptd_adapters::slots::changes_nothing(&bundle.manifest, &values));
}

#[test]
fn loreft_trains_on_each_bundle_with_r_orthonormal_and_serves_as_it_trained() {
    assert_loreft_trains("digits-cnn", false);
    assert_loreft_trains("minilm", true);
    assert_loreft_trains("minilm", false);
    assert_loreft_trains("efficientnet-lite0", true);
}

#[test]
fn digits_cnn_lora_trains_and_base_stays_bit_identical() {
    assert_trains("digits-cnn");
}

#[test]
fn minilm_lora_trains_and_base_stays_bit_identical() {
    assert_trains("minilm");
}

#[test]
fn efficientnet_lite0_lora_trains_on_camera_frames_and_base_stays_bit_identical() {
    assert_trains("efficientnet-lite0");
}

#[test]
fn lora_dropout_drops_only_the_lora_path_while_training() {
    let (bundle, _, graph) = load("digits-cnn");
    assert!(graph.has_lora_dropout(), "the exporter gives training graphs a LoRA dropout input");
    let spec = &bundle.manifest.lora;
    let inputs = parity::probe_inputs(&bundle, &probe_data()).unwrap();
    let images = adaptd_train::to_tensor(&inputs[0], Device::Cpu);
    let slot = |b_scale: f32| -> Vec<tch::Tensor> {
        spec.slots
            .iter()
            .flat_map(|s| {
                let a = tch::Tensor::randn(s.a_shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), (tch::Kind::Float, Device::Cpu)) * 0.1;
                let b = tch::Tensor::randn(s.b_shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), (tch::Kind::Float, Device::Cpu)) * b_scale as f64;
                [a, b]
            })
            // The LoReFT slots edit nothing here.
            .chain(bundle.manifest.reft.iter().flat_map(adaptd_adapters::reft::no_edit_inputs).map(|t| adaptd_train::to_tensor(&t, Device::Cpu)))
            .collect()
    };
    let logits = |lora: &[tch::Tensor], p: f64| graph.forward_dropout(std::slice::from_ref(&images), lora, p).unwrap().swap_remove(1);
    let max_diff = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    tch::manual_seed(3);
    let lora = slot(0.1);
    // p = 0 is the plain forward, bit for bit.
    assert_eq!(max_diff(&logits(&lora, 0.0), &graph.forward(std::slice::from_ref(&images), &lora).unwrap()[1]), 0.0);
    // p > 0: a fresh mask per call, so two calls differ and both differ from no dropout.
    let (d1, d2) = (logits(&lora, 0.5), logits(&lora, 0.5));
    assert!(max_diff(&d1, &d2) > 1e-4 && max_diff(&d1, &logits(&lora, 0.0)) > 1e-4);
    // Only the LoRA path is dropped: with B = 0 (a fresh adapter) dropout changes nothing.
    let fresh = slot(0.0);
    assert!(max_diff(&logits(&fresh, 0.5), &logits(&fresh, 0.0)) < 1e-6);

    // A fit with LoRA dropout trains, reports it, and leaves the base alone.
    let head = bundle.base_head().unwrap().expect("digits-cnn ships its classifier");
    let digits = adaptd::datasets::Digits::load(&crate::digits_data()).unwrap();
    let rows: Vec<usize> = digits.held_out().into_iter().take(48).collect();
    let train =
        Examples { inputs: vec![digits.batch(&rows, adaptd::datasets::Shift::Rotate90)], labels: digits.labels_of(&rows), weights: vec![1.0; rows.len()] };
    let recipe = Recipe { max_epochs: 4, batch_size: 16, lora_dropout: 0.2, patience: 0, ..Recipe::default() };
    let report = fit(
        FitTarget::Lora { graph: &graph, rank: 8, alpha: 16.0, start: None },
        &train,
        &Examples::default(),
        &head,
        &recipe,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.lora_dropout, 0.2);
    assert_eq!(report.base_unchanged, Some(true));
    assert!(report.losses.iter().all(|l| l.is_finite()));
    assert!(report.losses.last().unwrap() < &report.losses[0], "loss went {:?}", report.losses);
}

/// A LoRA job can continue from the LoRA that serves: with nothing learned (learning rates 0)
/// it hands back exactly the update it started from, at its own rank and alpha.
#[test]
fn a_lora_job_continues_from_the_serving_lora_exactly() {
    let (bundle, _, graph) = load("digits-cnn");
    let head = bundle.base_head().unwrap().expect("digits-cnn ships its classifier");
    let start = adaptd_adapters::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 3, 0.1).unwrap();
    let digits = adaptd::datasets::Digits::load(&crate::digits_data()).unwrap();
    let rows: Vec<usize> = digits.held_out().into_iter().take(16).collect();
    let train =
        Examples { inputs: vec![digits.batch(&rows, adaptd::datasets::Shift::Rotate90)], labels: digits.labels_of(&rows), weights: vec![1.0; rows.len()] };
    let frozen = Recipe { max_epochs: 1, batch_size: 8, patience: 0, learning_rate: 0.0, head_learning_rate: 0.0, lora_dropout: 0.0, ..Recipe::default() };
    let target = FitTarget::Lora { graph: &graph, rank: 8, alpha: 8.0, start: Some(&start) };
    let report = fit(target, &train, &Examples::default(), &head, &frozen, &AtomicBool::new(false), &mut |_| {}).unwrap();
    let lora = report.lora.expect("a LoRA job reports its LoRA");
    assert_eq!((lora.rank, lora.alpha), (8, 8.0));
    for m in &start.modules {
        let (want, got) = (adaptd_adapters::aggregate::update(&start, &m.module).unwrap(), adaptd_adapters::aggregate::update(&lora, &m.module).unwrap());
        let diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-6, "{}: the continued update moved by {diff}", m.module);
    }
    // A start of higher rank than the job is refused, not cut.
    let wide = adaptd_adapters::LoraWeights::random(&bundle.manifest.lora, 16, 16.0, 4, 0.1).unwrap();
    let target = FitTarget::Lora { graph: &graph, rank: 8, alpha: 8.0, start: Some(&wide) };
    let err = fit(target, &train, &Examples::default(), &head, &frozen, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("rank-16"), "{err}");
}

#[test]
fn training_refuses_bad_labels_and_stops_when_cancelled() {
    let (bundle, _, graph) = load("digits-cnn");
    let head = bundle.base_head().unwrap().expect("digits-cnn ships its classifier");
    let images = HostTensor::zeros_f32(vec![4, 1, 8, 8]);
    let recipe = Recipe { max_epochs: 3, batch_size: 4, ..Recipe::default() };
    let never = AtomicBool::new(false);
    let examples = |inputs: Vec<HostTensor>, labels: Vec<i64>| Examples { weights: vec![1.0; labels.len()], inputs, labels };
    let lora = || FitTarget::Lora { graph: &graph, rank: 8, alpha: 8.0, start: None };
    let none = Examples::default();

    let err = fit(lora(), &examples(vec![images.clone()], vec![0, 1, 2, 10]), &none, &head, &recipe, &never, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::Data(ref m) if m.contains("label 10")), "{err}");
    let err = fit(lora(), &examples(vec![images.clone()], vec![0, 1]), &none, &head, &recipe, &never, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::Data(_)), "{err}");
    let wrong_dtype = HostTensor::i64(vec![4, 1, 8, 8], vec![0; 256]).unwrap();
    let err = fit(lora(), &examples(vec![wrong_dtype], vec![0, 1, 2, 3]), &none, &head, &recipe, &never, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::InputDType { .. }), "{err}");
    let all_dropped = Recipe { lora_dropout: 1.0, ..recipe.clone() };
    let err = fit(lora(), &examples(vec![images.clone()], vec![0, 1, 2, 3]), &none, &head, &all_dropped, &never, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("lora_dropout"), "{err}");
    let too_big = FitTarget::Lora { graph: &graph, rank: 17, alpha: 8.0, start: None };
    assert!(fit(too_big, &examples(vec![images.clone()], vec![0, 1, 2, 3]), &none, &head, &recipe, &never, &mut |_| {}).is_err());
    let mut bad_weights = examples(vec![images.clone()], vec![0, 1, 2, 3]);
    bad_weights.weights[2] = f32::NAN;
    let err = fit(lora(), &bad_weights, &none, &head, &recipe, &never, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");

    let cancelled = AtomicBool::new(true);
    let err = fit(lora(), &examples(vec![images], vec![0, 1, 2, 3]), &none, &head, &recipe, &cancelled, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { step: 0 }), "{err}");
}

#[test]
fn a_memory_budget_shrinks_the_batch_or_refuses_the_job() {
    // The probe reads the process's peak RSS; other tests' threads would move it.
    if crate::in_own_process("runtimes::a_memory_budget_shrinks_the_batch_or_refuses_the_job") {
        return;
    }
    let (bundle, _, graph) = load("minilm");
    let encoder = adaptd_daemon::preprocess::TextEncoder::from_bundle(&bundle).unwrap();
    let texts: Vec<String> = (0..32).map(|i| format!("sample sentence number {i} about a robot arm moving boxes")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let inputs = encoder.encode(&refs).unwrap();
    let labels: Vec<i64> = (0..32).map(|i| i % 2).collect();
    let train = Examples { weights: vec![1.0; 32], inputs, labels };
    let head = Head { layers: vec![Dense { weight: HostTensor::zeros_f32(vec![2, 384]), bias: HostTensor::zeros_f32(vec![2]) }] };
    let never = AtomicBool::new(false);
    let lora = || FitTarget::Lora { graph: &graph, rank: 8, alpha: 8.0, start: None };

    // Plenty of room: the batch stays as asked.
    let roomy = Recipe { max_epochs: 1, batch_size: 16, memory_budget_bytes: Some(8 << 30), ..Recipe::default() };
    let report = fit(lora(), &train, &Examples::default(), &head, &roomy, &never, &mut |_| {}).unwrap();
    assert_eq!(report.batch_size, 16);
    let per_sample = report.probe_bytes_per_sample.expect("the probe measured");
    assert!(per_sample > 0);
    // Room for a few samples only: the batch shrinks to fit.
    let tight = Recipe { memory_budget_bytes: Some(per_sample * 4), ..roomy.clone() };
    let report = fit(lora(), &train, &Examples::default(), &head, &tight, &never, &mut |_| {}).unwrap();
    assert!(
        report.batch_size < 16 && report.batch_size >= 1,
        "batch {} ({per_sample} bytes per sample, then {:?})",
        report.batch_size,
        report.probe_bytes_per_sample
    );
    // No room at all: refused, with the figures.
    let none = Recipe { memory_budget_bytes: Some(1024), ..roomy };
    let err = fit(lora(), &train, &Examples::default(), &head, &none, &never, &mut |_| {}).unwrap_err();
    assert!(matches!(err, TrainError::MemoryBudget { budget: 1024, .. }), "{err}");
}

#[test]
fn onnx_engine_refuses_wrong_inputs_with_clear_errors() {
    let (bundle, mut onnx, _) = load("digits-cnn");
    let zeros = no_adapter_inputs(&bundle.manifest);
    let err = onnx.run(&[], &zeros).unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    let ints = HostTensor::i64(vec![1, 1, 8, 8], vec![0; 64]).unwrap();
    let err = onnx.run(&[ints], &zeros).unwrap_err();
    assert!(err.to_string().contains("\"image\"") && err.to_string().contains("I64"), "{err}");
    let wrong_shape = HostTensor::zeros_f32(vec![1, 1, 7, 8]);
    let err = onnx.run(&[wrong_shape], &zeros).unwrap_err();
    assert_eq!(err.error_type(), "run", "{err}");
    // The session keeps serving after refusing bad input.
    let ok = onnx.run(&[HostTensor::zeros_f32(vec![2, 1, 8, 8])], &zeros).unwrap();
    assert_eq!(ok[1].shape, vec![2, 10]);
}

/// `adaptd doctor` on a machine laid out as an Orin Nano: the device's release, every provider
/// tried (the CPU serving), libtorch training, and a configuration to use, as JSON.
#[test]
fn the_doctor_reads_the_device_measures_the_runtimes_and_says_what_to_use() {
    let root = tempfile::tempdir().unwrap();
    for (path, text) in [
        ("proc/device-tree/model", "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0"),
        ("etc/nv_tegra_release", "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"),
        ("sys/class/thermal/thermal_zone0/type", "cpu-thermal\n"),
        ("sys/class/thermal/thermal_zone0/temp", "48312\n"),
    ] {
        std::fs::create_dir_all(root.path().join(path).parent().unwrap()).unwrap();
        std::fs::write(root.path().join(path), text).unwrap();
    }
    let bundle = reference_bundle("digits-cnn");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["doctor", "--bundle", bundle.to_str().unwrap(), "--seconds", "2", "--json", "--root", root.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((report["device"]["l4t"].as_str(), report["device"]["jetpack"].as_str()), (Some("R36.4.3"), Some("6.1/6.2")), "{report}");
    let cpu = &report["providers"][0];
    assert!(cpu["provider"] == "cpu" && cpu["registered"] == true && cpu["p50_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["providers"].as_array().unwrap().len(), 3, "CPU, CUDA and TensorRT are each tried: {report}");
    assert!(report["libtorch_library"].as_str().is_some_and(|p| p.ends_with("/libtorch_cpu.so")), "{report}");
    assert_eq!(report["torch_cuda"] == true, report["torch_cuda_reason"].is_null(), "a reason exactly when CUDA is not available: {report}");
    let training = &report["training"][0];
    assert!(training["lora_samples_per_second"].as_f64().unwrap() > 0.0 && training["head_seconds"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["verdict"]["execution_provider"].is_string() && report["verdict"]["memory_budget_mb"].as_u64().is_some(), "{report}");
}

/// A small model (conv, layer norm, linear) exported with LoRA on the conv and the linear and cut
/// after the norm: one slot below the cut, one above.
fn export_tiny_cut(dir: &std::path::Path, seed: u64) -> std::path::PathBuf {
    let out = dir.join(format!("tiny-cut-{seed}"));
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/export");
    let script = format!(
        r#"
import sys, torch
from torch import nn
sys.path.insert(0, {tool:?})
from adaptd_export import export_bundle
torch.manual_seed({seed})
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(64, 8)
    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)
        return torch.relu(self.fc(self.norm(h).flatten(1)))
export_bundle(Tiny(), {{"x": torch.zeros(2, 1, 4, 4)}}, ["conv", "fc"], {out:?}, name="tiny", version="1", rank_max=4,
              output_names=["embedding"], dynamic_axes={{"x": {{0: "batch"}}, "embedding": {{0: "batch"}}}}, cut_after="norm")
"#,
        out = out.to_str().unwrap(),
        seed = seed
    );
    let made = std::process::Command::new(crate::python()).args(["-c", &script]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    out
}

/// A bundle the export tool cut after a module opens (its cut checked like every file), and on
/// libtorch its suffix fed its prefix's output computes the training graph's outputs, with and
/// without LoRA: what training above a frozen prefix rests on.
#[test]
fn a_bundle_cut_for_training_above_a_prefix_computes_the_same_function_in_two_halves() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_tiny_cut(dir.path(), 0);

    let bundle = Bundle::open(&out).expect("a cut bundle opens");
    let cut = bundle.manifest.cut.clone().expect("the manifest names its cut");
    assert_eq!((cut.after.as_str(), cut.slots_above.as_slice(), cut.activation.shape.as_slice()), ("norm", &[1usize][..], &[-1i64, 4, 16][..]));
    let load = |file: &str| tch::CModule::load(bundle.dir.join(file)).unwrap();
    let (train, prefix, suffix) = (load(&bundle.manifest.training_graph), load(&cut.prefix_graph), load(&cut.suffix_graph));
    let x = tch::Tensor::randn([6, 1, 4, 4], (tch::Kind::Float, Device::Cpu));
    let keep = tch::Tensor::from(1.0f32);
    let first = |outputs: tch::IValue| match outputs {
        tch::IValue::Tuple(mut v) => match v.remove(0) {
            tch::IValue::Tensor(t) => t,
            other => panic!("{other:?}"),
        },
        tch::IValue::Tensor(t) => t,
        other => panic!("{other:?}"),
    };
    for scale in [0.0, 0.1] {
        let lora: Vec<tch::Tensor> = bundle
            .manifest
            .lora
            .slots
            .iter()
            .flat_map(|s| [&s.a_shape, &s.b_shape])
            .map(|shape| tch::Tensor::randn(shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), (tch::Kind::Float, Device::Cpu)) * scale)
            .collect();
        let args = |parts: &[&[tch::Tensor]]| parts.iter().flat_map(|p| p.iter().map(|t| tch::IValue::Tensor(t.shallow_clone()))).collect::<Vec<_>>();
        let (x, keep) = (std::slice::from_ref(&x), std::slice::from_ref(&keep));
        let whole = first(train.forward_is(&args(&[x, &lora, keep])).unwrap());
        let activation = first(prefix.forward_is(&args(&[x, &lora])).unwrap());
        assert_eq!(activation.size(), [6, 4, 16]);
        let halves = first(suffix.forward_is(&args(&[x, std::slice::from_ref(&activation), &lora, keep])).unwrap());
        let diff = (whole - halves).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "LoRA scale {scale}: prefix + suffix differ from the training graph by {diff}");
    }
}

/// Training above the cut: only the slots above it move, the base stays bit-identical, the loss
/// falls, and the adapter it makes answers through the whole graph as it trained.
#[test]
fn lora_trains_above_the_cut_on_activations_the_prefix_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_tiny_cut(dir.path(), 0);
    let bundle = Bundle::open(&out).unwrap();
    let mut graph = TrainingGraph::load(&bundle, Device::Cpu).unwrap();
    graph.load_cut(&bundle).unwrap();
    assert_eq!(graph.trained_slots(), [1]);

    // Two classes: which half of the image is brighter.
    let mut rng = adaptd_adapters::tensor::SeededRng::new(5);
    let n = 96;
    let pixels = rng.normal_vec(n * 16, 1.0);
    let labels: Vec<i64> =
        (0..n).map(|i| i64::from(pixels[i * 16..i * 16 + 8].iter().sum::<f32>() > pixels[i * 16 + 8..(i + 1) * 16].iter().sum::<f32>())).collect();
    let train = Examples { inputs: vec![HostTensor::f32(vec![n, 1, 4, 4], pixels).unwrap()], labels, weights: vec![1.0; n] };
    let head = Head { layers: vec![Dense { weight: HostTensor::f32(vec![2, 8], rng.normal_vec(16, 0.1)).unwrap(), bias: HostTensor::zeros_f32(vec![2]) }] };
    let recipe = Recipe { max_epochs: 30, patience: 0, learning_rate: 1e-2, head_learning_rate: 1e-2, lora_dropout: 0.0, ..Recipe::default() };
    let target = FitTarget::Lora { graph: &graph, rank: 4, alpha: 8.0, start: None };
    let report = fit(target, &train, &Examples::default(), &head, &recipe, &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_eq!(report.base_unchanged, Some(true));
    let (first, last) = (report.losses[..4].iter().sum::<f32>() / 4.0, report.losses[report.losses.len() - 4..].iter().sum::<f32>() / 4.0);
    assert!(last < first * 0.8, "the loss falls above the cut: {first} -> {last}");
    let lora = report.lora.unwrap();
    let b_of = |module: &str| lora.modules.iter().find(|m| m.module == module).unwrap().b.as_f32().unwrap().to_vec();
    assert!(b_of("conv").iter().all(|&v| v == 0.0), "the slot below the cut does not train");
    assert!(b_of("fc").iter().any(|&v| v != 0.0), "the slot above the cut trains");

    // The daemon's trainer takes the cut by default (`training.above_cut`), and every slot without.
    for above_cut in [true, false] {
        let config = adaptd_daemon::trainer::TrainerConfig {
            device: adaptd_daemon::trainer::TrainDevice::Cpu,
            above_cut,
            ..adaptd_daemon::trainer::TrainerConfig::default()
        };
        let trainer = adaptd_daemon::trainer::Trainer::start(bundle.clone(), config).unwrap();
        let job = adaptd_daemon::trainer::TrainJob {
            kind: adaptd_daemon::trainer::JobKind::Lora { rank: 4, alpha: 8.0 },
            train: train.clone(),
            validation: Examples::default(),
            init_head: head.clone(),
            start_lora: None,
            start_reft: None,
            loreft_layers: Vec::new(),
            recipe: recipe.clone(),
            prefix_cache: adaptd_train::PrefixCache::default(),
        };
        let report = trainer.submit(job).unwrap().done.blocking_recv().unwrap().unwrap();
        let conv = report.lora.unwrap().modules.iter().find(|m| m.module == "conv").unwrap().b.as_f32().unwrap().iter().any(|&v| v != 0.0);
        assert_eq!(conv, !above_cut, "above_cut {above_cut}: the conv slot trains only without the cut");
        trainer.shutdown();
    }
}

/// Prefix activations kept from one job serve the next: a job given them computes none, trains
/// exactly as the job that computed them, and a job whose LoRA below the cut differs (so its
/// prefix computes another function) computes them all again.
#[test]
fn a_job_above_the_cut_reuses_the_prefix_activations_an_earlier_job_kept() {
    use adaptd_train::{CachedActivation, PrefixCache, fit_cached};
    // Runs are compared bit for bit, so in a process of their own: libtorch's random generator
    // (dropout) and its thread count (set by a trainer) are per process, and other tests' jobs
    // draw from and set them meanwhile.
    if crate::in_own_process("runtimes::a_job_above_the_cut_reuses_the_prefix_activations_an_earlier_job_kept") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(export_tiny_cut(dir.path(), 0)).unwrap();
    let mut graph = TrainingGraph::load(&bundle, Device::Cpu).unwrap();
    graph.load_cut(&bundle).unwrap();
    let mut rng = adaptd_adapters::tensor::SeededRng::new(9);
    let (n, v) = (48, 16);
    let examples = |rows: usize, rng: &mut adaptd_adapters::tensor::SeededRng| Examples {
        inputs: vec![HostTensor::f32(vec![rows, 1, 4, 4], rng.normal_vec(rows * 16, 1.0)).unwrap()],
        labels: (0..rows as i64).map(|i| i % 2).collect(),
        weights: vec![1.0; rows],
    };
    let (train, validation) = (examples(n, &mut rng), examples(v, &mut rng));
    let head = Head { layers: vec![Dense { weight: HostTensor::f32(vec![2, 8], rng.normal_vec(16, 0.1)).unwrap(), bias: HostTensor::zeros_f32(vec![2]) }] };
    let recipe = Recipe { max_epochs: 3, patience: 0, lora_dropout: 0.0, ..Recipe::default() };
    let run = |cache: &PrefixCache, start: Option<&adaptd_adapters::lora::LoraWeights>| {
        let target = FitTarget::Lora { graph: &graph, rank: 4, alpha: 8.0, start };
        fit_cached(target, &train, &validation, &head, &recipe, cache, &AtomicBool::new(false), &mut |_| {}).unwrap()
    };

    let first = run(&PrefixCache { keep: true, ..PrefixCache::default() }, None);
    let computed = first.prefix.clone().unwrap();
    assert_eq!((computed.computed, computed.reused), (n + v, 0));
    assert!(computed.train.iter().chain(&computed.validation).all(|r| r.as_ref().is_some_and(|r| r.len() == 4 * 16)), "a row per sample, each its activation");
    let kept = |rows: &[Option<Vec<f32>>]| rows.iter().map(|r| Some(CachedActivation { key: computed.key.clone(), data: r.clone().unwrap() })).collect();
    let cache = PrefixCache { train: kept(&computed.train), validation: kept(&computed.validation), keep: true };

    let second = run(&cache, None);
    let reused = second.prefix.clone().unwrap();
    assert_eq!((reused.computed, reused.reused, reused.key.as_str()), (0, n + v, computed.key.as_str()));
    assert_eq!(first.losses, second.losses, "the same activations, so the same training");
    assert!(reused.train.iter().all(Option::is_none), "nothing new to keep");

    // A kept row of the wrong length (a store written by another bundle, a torn value) is not
    // used: that row alone is computed again, and training is the same.
    let mut torn = cache.clone();
    if let Some(row) = torn.train[0].as_mut() {
        row.data.truncate(10);
    }
    let mended = run(&torn, None);
    assert_eq!((mended.prefix.as_ref().unwrap().reused, mended.prefix.as_ref().unwrap().computed), (n + v - 1, 1));
    assert_eq!(mended.losses, first.losses);

    // A start whose slot below the cut is not zero: another prefix, another key, all recomputed.
    let mut start = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 3, 0.1).unwrap();
    start.modules.iter_mut().filter(|m| m.module != "conv").for_each(|m| m.b = HostTensor::zeros_f32(m.b.shape.clone()));
    let third = run(&cache, Some(&start)).prefix.unwrap();
    assert_ne!(third.key, computed.key);
    assert_eq!((third.computed, third.reused), (n + v, 0));
    // A start that is zero below the cut computes the prefix the first job did.
    let mut above_only = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 3, 0.1).unwrap();
    above_only.modules.iter_mut().filter(|m| m.module == "conv").for_each(|m| m.b = HostTensor::zeros_f32(m.b.shape.clone()));
    assert_eq!(run(&cache, Some(&above_only)).prefix.unwrap().reused, n + v);
}

/// A cut whose halves do not compute the training graph's function (here: a suffix from other
/// weights, with a manifest that lists it correctly) is refused when loaded, and the daemon's
/// trainer trains the whole graph instead of serving what it did not validate.
#[test]
fn a_cut_whose_halves_disagree_with_the_training_graph_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (good, other) = (export_tiny_cut(dir.path(), 0), export_tiny_cut(dir.path(), 1));
    std::fs::copy(other.join("suffix.pt"), good.join("suffix.pt")).unwrap();
    let bytes = std::fs::read(good.join("suffix.pt")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    manifest["files"]["suffix.pt"] = serde_json::json!({ "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), "bytes": bytes.len() });
    std::fs::write(good.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();

    let bundle = Bundle::open(&good).expect("every file matches its manifest");
    let mut graph = TrainingGraph::load(&bundle, Device::Cpu).unwrap();
    let e = graph.load_cut(&bundle).unwrap_err().to_string();
    assert!(e.contains("prefix + suffix differ from the training graph"), "{e}");
    assert!(!graph.trains_above_cut() && graph.trained_slots() == [0, 1], "the whole graph trains");
    let config = adaptd_daemon::trainer::TrainerConfig { device: adaptd_daemon::trainer::TrainDevice::Cpu, ..adaptd_daemon::trainer::TrainerConfig::default() };
    let trainer = adaptd_daemon::trainer::Trainer::start(bundle, config).expect("a bad cut does not stop the trainer");
    trainer.shutdown();
}

/// A manifest whose cut contradicts the bundle is refused when the bundle opens, saying what is
/// wrong: a graph the manifest does not list, a slot that does not exist, an activation that is
/// not f32 with a dynamic batch axis, a key nobody knows.
#[test]
fn a_cut_the_manifest_contradicts_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = export_tiny_cut(dir.path(), 0);
    let original = std::fs::read(bundle.join("manifest.json")).unwrap();
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("prefix_graph", serde_json::json!("missing.pt"), "cut graph file \"missing.pt\" is not listed"),
        ("slots_above", serde_json::json!([1, 7]), "names slot 7, but there are 2 slots"),
        ("activation", serde_json::json!({ "name": "cut.activation", "dtype": "i64", "shape": [-1, 4, 16] }), "must be f32 with a dynamic batch axis"),
        ("activation", serde_json::json!({ "name": "cut.activation", "dtype": "f32", "shape": [5, 4, 16] }), "must be f32 with a dynamic batch axis"),
        ("extra", serde_json::json!(1), "unknown field `extra`"),
    ];
    for (key, value, expected) in cases {
        let mut manifest: serde_json::Value = serde_json::from_slice(&original).unwrap();
        manifest["cut"][key] = value;
        std::fs::write(bundle.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
        let e = Bundle::open(&bundle).unwrap_err();
        assert!(e.to_string().contains(expected), "cut.{key}: {e}");
        assert!(["invalid", "manifest"].contains(&e.error_type()), "{}", e.error_type());
    }
    std::fs::write(bundle.join("manifest.json"), &original).unwrap();
    Bundle::open(&bundle).expect("the untouched manifest opens");
}
