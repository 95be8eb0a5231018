//! The two runtimes agree on each reference bundle, LoRA slots are live, and LoRA trains through
//! libtorch while the base stays bit-identical.

use std::sync::atomic::AtomicBool;

use adaptd::engine::onnx::{OnnxModel, SessionOptions};
use adaptd::parity::{self, PARITY_TOLERANCE};
use adaptd_adapters::Bundle;
use adaptd_adapters::lora::no_adapter_inputs;
use adaptd_adapters::tensor::HostTensor;
use adaptd_adapters::train::{LoraTrainConfig, TrainError, TrainingGraph, train_lora_and_head};
use tch::Device;

use crate::{digits_data, reference_bundle};

fn load(name: &str) -> (Bundle, OnnxModel, TrainingGraph) {
    let bundle = Bundle::open(reference_bundle(name)).expect("bundle opens");
    let onnx = OnnxModel::load(&bundle, SessionOptions { intra_op_threads: 1, ..Default::default() }, None).expect("ONNX Runtime loads the serving graph");
    let graph = TrainingGraph::load(&bundle, Device::Cpu).expect("libtorch loads the training graph");
    (bundle, onnx, graph)
}

fn assert_parity(name: &str) {
    let (bundle, mut onnx, graph) = load(name);
    let inputs = parity::probe_inputs(&bundle, &digits_data()).unwrap();
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

#[test]
fn minilm_base_embeddings_are_unit_length_and_padding_does_not_leak() {
    let (bundle, mut onnx, _) = load("minilm");
    let encoder = adaptd::preprocess::TextEncoder::from_bundle(&bundle).unwrap();
    let zeros = no_adapter_inputs(&bundle.manifest.lora);
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

fn assert_trains(name: &str) {
    let (bundle, _, graph) = load(name);
    let report = parity::training_probe(&bundle, &graph, &digits_data(), 12).unwrap();
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    assert!(report.losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.8 * first, "{name}: loss went {first} -> {last}");
    assert!(report.base_unchanged, "{name}: base parameters changed during LoRA training");
    // B moved away from its zero start on every slot: LoRA itself trained, not only the head.
    for m in &report.lora.modules {
        let b_norm: f32 = m.b.as_f32().unwrap().iter().map(|x| x.abs()).sum();
        assert!(b_norm > 0.0, "{name}: LoRA B of {} never moved", m.module);
    }
    report.lora.validate(&bundle.manifest.lora).expect("trained weights fit the bundle");
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
fn training_refuses_bad_labels_and_stops_when_cancelled() {
    let (_, _, graph) = load("digits-cnn");
    let images = HostTensor::zeros_f32(vec![4, 1, 8, 8]);
    let cfg = LoraTrainConfig { steps: 3, batch_size: 4, ..Default::default() };
    let never = AtomicBool::new(false);

    let err = train_lora_and_head(&graph, std::slice::from_ref(&images), &[0, 1, 2, 10], 10, &cfg, &never).unwrap_err();
    assert!(matches!(err, TrainError::Data(ref m) if m.contains("label 10")), "{err}");
    let err = train_lora_and_head(&graph, std::slice::from_ref(&images), &[0, 1], 10, &cfg, &never).unwrap_err();
    assert!(matches!(err, TrainError::Data(_)), "{err}");
    let wrong_dtype = HostTensor::i64(vec![4, 1, 8, 8], vec![0; 256]).unwrap();
    let err = train_lora_and_head(&graph, &[wrong_dtype], &[0, 1, 2, 3], 10, &cfg, &never).unwrap_err();
    assert!(matches!(err, TrainError::InputDType { .. }), "{err}");
    let too_big = LoraTrainConfig { rank: 17, ..cfg.clone() };
    assert!(train_lora_and_head(&graph, std::slice::from_ref(&images), &[0, 1, 2, 3], 10, &too_big, &never).is_err());

    let cancelled = AtomicBool::new(true);
    let err = train_lora_and_head(&graph, &[images], &[0, 1, 2, 3], 10, &cfg, &cancelled).unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { step: 0 }), "{err}");
}

#[test]
fn onnx_engine_refuses_wrong_inputs_with_clear_errors() {
    let (bundle, mut onnx, _) = load("digits-cnn");
    let zeros = no_adapter_inputs(&bundle.manifest.lora);
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
