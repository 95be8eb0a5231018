//! Opening bundles: a good one opens; a damaged one is refused with a message naming the file.

use std::fs;

use adaptd_adapters::bundle::{Bundle, BundleError, Preprocessing, SlotKind};

use crate::{copy_bundle, reference_bundle};

#[test]
fn reference_bundles_open_and_describe_their_slots() {
    let digits = Bundle::open(reference_bundle("digits-cnn")).expect("digits-cnn opens");
    let m = &digits.manifest;
    assert_eq!((m.name.as_str(), m.embedding_dim), ("digits-cnn", 64));
    assert_eq!(m.labels.as_ref().map(Vec::len), Some(10));
    let kinds: Vec<(&str, SlotKind)> = m.lora.slots.iter().map(|s| (s.module.as_str(), s.kind)).collect();
    assert_eq!(kinds, [("conv1", SlotKind::Conv2d), ("conv2", SlotKind::Conv2d), ("fc1", SlotKind::Linear)]);
    assert_eq!(m.lora.slots[0].a_shape, [16, 1, 3, 3]);
    assert_eq!(m.lora.slots[2].a_shape, [16, 512]);
    assert_eq!(m.lora.slots[2].b_shape, [64, 16]);
    assert_eq!(digits.manifest_sha256.len(), 64);

    let minilm = Bundle::open(reference_bundle("minilm")).expect("minilm opens");
    let m = &minilm.manifest;
    assert_eq!(m.embedding_dim, 384);
    assert!(matches!(&m.preprocessing, Preprocessing::Text { max_length: 64, .. }));
    // Query and value projections of all six layers, each 384 -> 384 ...
    let (query_value, above): (Vec<_>, Vec<_>) =
        m.lora.slots.iter().enumerate().partition(|(_, s)| s.module.ends_with(".query") || s.module.ends_with(".value"));
    assert_eq!(query_value.len(), 12);
    assert!(query_value.iter().all(|(_, s)| s.in_features == 384 && s.out_features == 384));
    // ... and every other linear map of layers 4 and 5, above the cut after layer 3, which is
    // where a LoRA job trains.
    let cut = m.cut.as_ref().expect("the reference minilm bundle is cut");
    assert_eq!(cut.after, "bert.encoder.layer.3");
    assert_eq!(above.len(), 8);
    assert!(above.iter().all(|(_, s)| s.module.contains(".layer.4.") || s.module.contains(".layer.5.")));
    let in_layers_4_5 = |i: &usize| m.lora.slots[*i].module.contains(".layer.4.") || m.lora.slots[*i].module.contains(".layer.5.");
    assert!(cut.slots_above.iter().all(in_layers_4_5) && cut.slots_above.len() == 12, "{:?}", cut.slots_above);
}

#[test]
fn a_modified_file_is_refused_by_name() {
    let copy = copy_bundle(&reference_bundle("digits-cnn"));
    let graph = copy.path().join("model.onnx");
    let mut bytes = fs::read(&graph).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    fs::write(&graph, bytes).unwrap();
    let err = Bundle::open(copy.path()).unwrap_err();
    assert!(matches!(err, BundleError::HashMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("model.onnx") && msg.contains("does not match the manifest"), "{msg}");
    assert_eq!(err.error_type(), "hash_mismatch");
}

#[test]
fn a_truncated_or_missing_file_is_refused_by_name() {
    let copy = copy_bundle(&reference_bundle("digits-cnn"));
    let graph = copy.path().join("train.pt");
    let bytes = fs::read(&graph).unwrap();
    fs::write(&graph, &bytes[..bytes.len() / 3]).unwrap();
    let msg = Bundle::open(copy.path()).unwrap_err().to_string();
    assert!(msg.contains("train.pt"), "{msg}");

    fs::remove_file(&graph).unwrap();
    let err = Bundle::open(copy.path()).unwrap_err();
    assert!(matches!(err, BundleError::Io { .. }) && err.to_string().contains("train.pt"), "{err}");
}

#[test]
fn a_garbled_manifest_is_refused_with_its_path_and_reason() {
    let copy = copy_bundle(&reference_bundle("digits-cnn"));
    let manifest = copy.path().join("manifest.json");
    let original = fs::read_to_string(&manifest).unwrap();

    fs::write(&manifest, "{ not json").unwrap();
    let err = Bundle::open(copy.path()).unwrap_err();
    assert!(matches!(err, BundleError::Manifest { .. }), "{err}");
    assert!(err.to_string().contains("manifest.json"), "{err}");

    // Unknown keys are refused, not ignored: a newer exporter's bundle must not be half-read.
    let extra = original.replacen("{", "{\n  \"surprise\": 1,", 1);
    fs::write(&manifest, extra).unwrap();
    let msg = Bundle::open(copy.path()).unwrap_err().to_string();
    assert!(msg.contains("unknown field") && msg.contains("surprise"), "{msg}");

    let newer = original.replacen("\"format\": 1", "\"format\": 99", 1);
    fs::write(&manifest, newer).unwrap();
    assert!(matches!(Bundle::open(copy.path()).unwrap_err(), BundleError::Format { found: 99, .. }));

    // A slot whose shapes contradict its layer.
    let mut value: serde_json::Value = serde_json::from_str(&original).unwrap();
    value["lora"]["slots"][2]["a_shape"] = serde_json::json!([16, 511]);
    fs::write(&manifest, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    let msg = Bundle::open(copy.path()).unwrap_err().to_string();
    assert!(msg.contains("LoRA slot \"fc1\"") && msg.contains("511"), "{msg}");
}

#[test]
fn a_manifest_cannot_point_outside_its_bundle() {
    let copy = copy_bundle(&reference_bundle("digits-cnn"));
    let manifest = copy.path().join("manifest.json");
    let original = fs::read_to_string(&manifest).unwrap();
    let escaped = original.replace("\"model.onnx\"", "\"../model.onnx\"");
    fs::write(&manifest, escaped).unwrap();
    let msg = Bundle::open(copy.path()).unwrap_err().to_string();
    assert!(msg.contains("../model.onnx") && msg.contains("plain name"), "{msg}");
}

/// The camera bundle describes its preprocessing, its cut and its slots (pointwise convolutions
/// only); `adaptd check --bundle` proves a bundle given by path, and refuses a damaged copy
/// naming the file; a manifest whose image preprocessing contradicts itself is refused.
#[test]
fn the_camera_bundle_is_proved_by_check_and_a_damaged_copy_or_a_bad_preprocessing_is_refused() {
    use adaptd_adapters::bundle::ImageResize;
    let dir = reference_bundle("efficientnet-lite0");
    let bundle = Bundle::open(&dir).unwrap();
    let m = &bundle.manifest;
    let Preprocessing::Image { height, width, channels, resize, resize_to, .. } = &m.preprocessing else { panic!("an image bundle") };
    assert_eq!((*height, *width, *channels, *resize, *resize_to), (224, 224, 3, ImageResize::ShorterSide, Some(256)));
    assert_eq!(m.embedding_dim, 1280);
    let cut = m.cut.as_ref().expect("cut for training above a frozen prefix");
    assert_eq!(cut.activation.shape, [-1, 192, 7, 7]);
    assert_eq!(cut.slots_above.len(), m.lora.slots.len(), "every slot is above the cut");
    assert!(m.lora.slots.iter().all(|s| s.kind == SlotKind::Conv2d && s.a_shape[2..] == [1, 1]), "pointwise slots only");

    let check = |path: &std::path::Path| std::process::Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["check", "--bundle"]).arg(path).output().unwrap();
    let out = check(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("efficientnet-lite0") && text.contains("[PASS]") && text.contains("bit-identical: yes"), "{text}");
    assert!(text.contains("LoRA merged into a copy") && text.contains("LoReFT merged into a copy"), "merged serving is checked too: {text}");
    // A LoReFT merge map whose offset points at the wrong values (within the file, so nothing
    // refuses it on opening): serving's merged copy would compute something else; check fails it.
    let digits = copy_bundle(&reference_bundle("digits-cnn"));
    let manifest_path = digits.path().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let w_offset = m["reft"]["merge"]["offsets"][1].clone();
    m["reft"]["merge"]["offsets"][0] = w_offset;
    fs::write(&manifest_path, m.to_string()).unwrap();
    let out = check(digits.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("[FAIL]") && text.contains("LoReFT merged"), "{text}{}", String::from_utf8_lossy(&out.stderr));

    let copy = copy_bundle(&dir);
    let mut onnx = fs::read(copy.path().join("model.onnx")).unwrap();
    let last = onnx.len() - 1;
    onnx[last] ^= 1;
    fs::write(copy.path().join("model.onnx"), onnx).unwrap();
    let out = check(copy.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.onnx"), "{}", String::from_utf8_lossy(&out.stderr));

    let copy = copy_bundle(&dir);
    let manifest = fs::read_to_string(copy.path().join("manifest.json")).unwrap();
    fs::write(copy.path().join("manifest.json"), manifest.replace("\"resize_to\": 256", "\"resize_to\": 100")).unwrap();
    let err = Bundle::open(copy.path()).unwrap_err();
    assert!(matches!(err, BundleError::Invalid { .. }) && err.to_string().contains("resize_to 100"), "{err}");
    // Normalisation that cannot apply: a std of zero, a mean for two channels of three.
    let edit = |key: &str, value: serde_json::Value| {
        let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        m["preprocessing"][key] = value;
        fs::write(copy.path().join("manifest.json"), m.to_string()).unwrap();
        Bundle::open(copy.path()).unwrap_err().to_string()
    };
    let zero_std = edit("std", serde_json::json!([0.5, 0.0, 0.5]));
    assert!(zero_std.contains("std must have one finite value per channel (3), each above 0"), "{zero_std}");
    let short_mean = edit("mean", serde_json::json!([0.5, 0.5]));
    assert!(short_mean.contains("mean must have one finite value per channel (3)"), "{short_mean}");
}

/// A damaged merge map is refused: by name when the bundle opens (a slot count that disagrees,
/// a scaled slot without its scales file), and when a LoRA is folded (an offset past the graph
/// file's end), so merged serving never writes outside the weight it means.
#[test]
fn a_damaged_loreft_section_is_refused_with_what_is_wrong() {
    let copy = copy_bundle(&reference_bundle("minilm"));
    let path = copy.path().join("manifest.json");
    let original: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let refusal = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut m = original.clone();
        edit(&mut m);
        fs::write(&path, m.to_string()).unwrap();
        let msg = Bundle::open(copy.path()).unwrap_err().to_string();
        assert!(msg.contains("manifest.json"), "names the file: {msg}");
        msg
    };
    assert!(refusal(&|m| m["reft"]["rank_max"] = serde_json::json!(0)).contains("reft.rank_max must be at least 1"));
    assert!(refusal(&|m| m["reft"]["rank_max"] = serde_json::json!(500)).contains("is 384 wide, below reft.rank_max 500"));
    assert!(refusal(&|m| m["reft"]["mask_input"] = serde_json::Value::Null).contains("positions_input and reft.mask_input go together"));
    assert!(refusal(&|m| m["reft"]["mask_input"] = serde_json::json!("input_ids_typo")).contains("\"input_ids_typo\" is not an i64 model input"));
    assert!(refusal(&|m| m["cut"]["reft_above"] = serde_json::json!([6])).contains("names LoReFT slot 6, but there are 6"));
    assert!(refusal(&|m| m["reft"]["slots"][0]["kind"] = serde_json::json!("token")).contains("token"));
    assert!(refusal(&|m| m["reft"]["merge"]["graph"] = serde_json::json!("other.onnx")).contains("\"other.onnx\" is not listed under \"files\""));
    assert!(refusal(&|m| drop(m["reft"]["merge"]["offsets"].as_array_mut().unwrap().pop())).contains("reft.merge has 18 offsets for 19 LoReFT inputs"));
    // An offset past the file's end, and values that are not what the graph holds, are refused
    // when a copy is made, naming the input.
    let mut m = original.clone();
    m["reft"]["merge"]["offsets"][0] = serde_json::json!(u64::MAX / 2);
    fs::write(&path, m.to_string()).unwrap();
    let bundle = Bundle::open(copy.path()).unwrap();
    let reft = adaptd_adapters::ReftWeights::random(bundle.manifest.reft.as_ref().unwrap(), 4, 3, 0.3).unwrap();
    let values = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, None, Some(&reft)).unwrap();
    let msg = bundle.merged_reft_graph(&values).unwrap_err().to_string();
    assert!(msg.contains("reft.onnx") && msg.contains("bert.encoder.layer.0.reft_R") && msg.contains("run past the file's end"), "{msg}");
    // As exported it opens, and writes a LoReFT into a copy the size of the file; positions that
    // are not i64, or a LoRA beside the edits, are refused.
    fs::write(&path, original.to_string()).unwrap();
    let bundle = Bundle::open(copy.path()).unwrap();
    assert!(bundle.manifest.reft.is_some());
    let mut short = values.clone();
    let last = short.len() - 1;
    short[last] = adaptd_adapters::tensor::HostTensor::f32(vec![2], vec![1.0, 1.0]).unwrap();
    let msg = bundle.merged_reft_graph(&short).unwrap_err().to_string();
    assert!(msg.contains("reft.positions") && msg.contains("F32"), "positions are i64: {msg}");
    let lora = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 1, 0.05).unwrap();
    let both = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, Some(&lora), Some(&reft)).unwrap();
    assert!(bundle.merged_reft_graph(&both).unwrap_err().to_string().contains("changes LoRA slots too"));
    let merged = bundle.merged_reft_graph(&values).unwrap().unwrap();
    let graph = fs::read(copy.path().join("reft.onnx")).unwrap();
    assert_eq!(merged.len(), graph.len());
    assert_ne!(merged, graph);
}

#[test]
fn a_damaged_merge_map_is_refused_with_what_is_wrong() {
    let copy = copy_bundle(&reference_bundle("efficientnet-lite0"));
    let path = copy.path().join("manifest.json");
    let original: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let open_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut m = original.clone();
        edit(&mut m);
        fs::write(&path, m.to_string()).unwrap();
        Bundle::open(copy.path())
    };
    let msg = open_with(&|m| drop(m["merge"]["slots"].as_array_mut().unwrap().pop())).unwrap_err().to_string();
    assert!(msg.contains("merge names 6 slots, but there are 7"), "{msg}");
    let msg = open_with(&|m| m["merge"]["scales"] = serde_json::Value::Null).unwrap_err().to_string();
    assert!(msg.contains("scaled slots but no scales file"), "{msg}");

    let bundle = open_with(&|m| m["merge"]["slots"][0]["offset"] = serde_json::json!(u64::MAX / 2)).unwrap();
    let lora = adaptd_adapters::lora::LoraWeights::random(&bundle.manifest.lora, 4, 8.0, 1, 0.05).unwrap().graph_inputs(&bundle.manifest).unwrap();
    let msg = bundle.merged_plain_graph(&lora).unwrap_err().to_string();
    assert!(msg.contains("plain.onnx") && msg.contains("run past the file's end"), "{msg}");
    // The map as exported folds the same LoRA, changing only the slots' weights.
    let bundle = open_with(&|_| {}).unwrap();
    let merged = bundle.merged_plain_graph(&lora).unwrap().unwrap();
    let plain = fs::read(bundle.plain_graph_path().unwrap()).unwrap();
    assert_eq!(merged.len(), plain.len());
    assert_ne!(merged, plain);
}
