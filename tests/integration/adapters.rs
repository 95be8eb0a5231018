//! Adapter files: round trip, corruption refused by name, wrong base refused, and PEFT loads what
//! adaptd writes and adaptd loads what PEFT writes (the real `peft` package, same base model).

use std::path::Path;
use std::process::Command;

use adaptd_adapters::Bundle;
use adaptd_adapters::aggregate::{Rule, combine_lora, normalise, update};
use adaptd_adapters::files::{Adapter, AdapterFileError, LoraInfo, PEFT_WEIGHTS, read_peft};
use adaptd_adapters::lora::{LoraModule, LoraWeights};
use adaptd_adapters::tensor::{HostTensor, max_abs_diff};
use adaptd_daemon::engine::onnx::{OnnxModel, SessionOptions};

use crate::{head_adapter, lora_adapter, reference_bundle};

#[test]
fn adapter_files_round_trip_and_refuse_corruption_by_name() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let adapter = lora_adapter(&bundle, "sorter", 3, 5);
    let dir = tempfile::tempdir().unwrap();
    let written = adapter.write_dir(dir.path()).unwrap();
    assert_eq!(written.files.len(), 3, "head + PEFT config + PEFT weights: {:?}", written.files.keys());
    let back = Adapter::read_dir(dir.path()).unwrap();
    assert_eq!(back.head, adapter.head);
    assert_eq!(back.lora, adapter.lora);
    assert_eq!(back.manifest.id(), "sorter@v3");
    back.check_fits(&bundle).unwrap();

    let weights = dir.path().join(PEFT_WEIGHTS);
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let err = Adapter::read_dir(dir.path()).unwrap_err();
    assert!(matches!(err, AdapterFileError::HashMismatch { .. }) && err.to_string().contains(PEFT_WEIGHTS), "{err}");

    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = Adapter::read_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains(PEFT_WEIGHTS), "{err}");
}

#[test]
fn an_adapter_for_another_base_or_shape_is_refused() {
    let digits = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let minilm = Bundle::open(reference_bundle("minilm")).unwrap();
    let adapter = head_adapter(&digits, "sorter", 1, 2);
    let err = adapter.check_fits(&minilm).unwrap_err();
    assert!(matches!(err, AdapterFileError::WrongBase { .. }), "{err}");
    assert!(err.to_string().contains("digits-cnn") && err.to_string().contains("minilm"), "{err}");

    // Right base, but a head for the wrong embedding width.
    let mut adapter = head_adapter(&minilm, "intent", 1, 2);
    adapter.manifest.base = adaptd_adapters::files::BaseRef::of(&digits);
    let err = adapter.check_fits(&digits).unwrap_err();
    assert!(err.to_string().contains("384") && err.to_string().contains("64"), "{err}");
}

use crate::python;

struct PeftRun {
    inputs: Vec<HostTensor>,
    embedding: HostTensor,
}

fn run_peft(cmd: &str, adapter_dir: &Path) -> PeftRun {
    let out = adapter_dir.parent().unwrap().join(format!("{cmd}.json"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/export/peft_interop.py");
    let status = Command::new(python()).arg(script).args([cmd, adapter_dir.to_str().unwrap(), out.to_str().unwrap()]).status().expect("run python");
    assert!(status.success(), "peft_interop.py {cmd} failed");
    PeftRun::read(&out)
}

impl PeftRun {
    /// What an interop script wrote: the token ids and mask it ran, and its embeddings.
    fn read(out: &Path) -> PeftRun {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
        let dims = |k: &str| v[k].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect::<Vec<_>>();
        let ints = |k: &str| v[k].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect::<Vec<_>>();
        let floats = v["embedding"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap() as f32).collect();
        PeftRun {
            inputs: vec![HostTensor::i64(dims("shape"), ints("input_ids")).unwrap(), HostTensor::i64(dims("shape"), ints("attention_mask")).unwrap()],
            embedding: HostTensor::f32(dims("embedding_shape"), floats).unwrap(),
        }
    }
}

/// The embedding ONNX Runtime serves for `inputs` with this LoRA and this LoReFT (either absent).
fn serve_embedding(bundle: &Bundle, lora: Option<&LoraWeights>, reft: Option<&adaptd_adapters::ReftWeights>, inputs: &[HostTensor]) -> HostTensor {
    let mut onnx = OnnxModel::load(bundle, SessionOptions { intra_op_threads: 1, ..Default::default() }, None).unwrap();
    let slots = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, lora, reft).unwrap();
    onnx.run(inputs, &slots).unwrap().remove(0)
}

#[test]
fn peft_loads_a_lora_adaptd_wrote_and_gets_the_same_embeddings() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let adapter = lora_adapter(&bundle, "intent", 1, 9);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    adapter.write_dir(&dir).unwrap();

    let peft = run_peft("embed", &dir);
    let ours = serve_embedding(&bundle, adapter.lora.as_ref(), None, &peft.inputs);
    let diff = max_abs_diff(&ours, &peft.embedding).unwrap();
    assert!(diff <= 1e-4, "PEFT and adaptd disagree by {diff}");
    // And the adapter really moved the embedding away from the base model.
    let base = serve_embedding(&bundle, None, None, &peft.inputs);
    assert!(max_abs_diff(&base, &peft.embedding).unwrap() > 1e-3, "the adapter did nothing under PEFT");
}

#[test]
fn adaptd_loads_a_lora_peft_trained_and_gets_the_same_embeddings() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peft-adapter");
    let peft = run_peft("make", &dir);
    let lora = read_peft(&dir, &bundle.manifest.lora).expect("adaptd reads PEFT's save_pretrained output");
    assert_eq!((lora.rank, lora.alpha, lora.modules.len()), (4, 8.0, 12));
    let ours = serve_embedding(&bundle, Some(&lora), None, &peft.inputs);
    let diff = max_abs_diff(&ours, &peft.embedding).unwrap();
    assert!(diff <= 1e-4, "PEFT and adaptd disagree by {diff}");
}

/// pyreft's embeddings of the interop script's texts (run with the pyreft environment).
fn run_pyreft(args: &[&Path], out: &Path, cmd: &str) -> PeftRun {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/export/pyreft_interop.py");
    let python = crate::pyreft_python();
    assert!(python.is_file(), "{} is missing: run `make setup`", python.display());
    let status = Command::new(python).arg(script).arg(cmd).args(args).arg(out).status().expect("run pyreft's python");
    assert!(status.success(), "pyreft_interop.py {cmd} failed");
    PeftRun::read(out)
}

#[test]
fn loreft_adapter_files_round_trip_and_refuse_what_does_not_fit() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let adapter = crate::loreft_adapter(&bundle, "intent", 2, 4);
    let dir = tempfile::tempdir().unwrap();
    let written = adapter.write_dir(dir.path()).unwrap();
    assert_eq!(written.files.keys().map(String::as_str).collect::<Vec<_>>(), ["head.safetensors", "reft.safetensors"]);
    let back = Adapter::read_dir(dir.path()).unwrap();
    assert_eq!((back.reft.as_ref(), back.lora.as_ref()), (adapter.reft.as_ref(), None));
    back.check_fits(&bundle).unwrap();
    // A LoReFT adapter on a bundle whose LoReFT slots are other layers is refused by name.
    let digits = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let mut moved = back.clone();
    moved.manifest.base = adaptd_adapters::files::BaseRef::of(&digits);
    let err = moved.check_fits(&digits).unwrap_err();
    assert!(err.to_string().contains("edits no sequence") && err.error_type() == "reft", "{err}");
    moved.reft.as_mut().unwrap().positions = None;
    let err = moved.check_fits(&digits).unwrap_err();
    assert!(err.to_string().contains("\"bert.encoder.layer.0\", which is not a LoReFT slot"), "{err}");
    // The manifest and the tensors must agree on the layers.
    let manifest_path = dir.path().join("adapter.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["reft"]["modules"] = serde_json::json!(["bert.encoder.layer.0"]);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = Adapter::read_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("reft.safetensors: expected rotate_layer, weight and bias for each of [\"bert.encoder.layer.0\"]"), "{err}");
}

#[test]
fn pyreft_loads_a_loreft_adaptd_wrote_and_gets_the_same_embeddings() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let adapter = crate::loreft_adapter(&bundle, "intent", 1, 9);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    std::fs::create_dir(&dir).unwrap();
    adapter.write_dir(&dir).unwrap();
    // Exported into pyreft's layout (its own ReftModel.save), loaded back by ReftModel.load.
    let pyreft_dir = tmp.path().join("pyreft");
    let theirs = run_pyreft(&[&dir, &pyreft_dir], &tmp.path().join("embed.json"), "embed");
    assert!(pyreft_dir.join("config.json").is_file(), "pyreft's save directory");
    let ours = serve_embedding(&bundle, None, adapter.reft.as_ref(), &theirs.inputs);
    let diff = max_abs_diff(&ours, &theirs.embedding).unwrap();
    assert!(diff <= 1e-4, "pyreft and adaptd disagree by {diff}");
    let base = serve_embedding(&bundle, None, None, &theirs.inputs);
    assert!(max_abs_diff(&base, &theirs.embedding).unwrap() > 1e-3, "the LoReFT did nothing under pyreft");
}

#[test]
fn adaptd_loads_a_loreft_pyreft_saved_and_gets_the_same_embeddings() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (pyreft_dir, converted) = (tmp.path().join("pyreft"), tmp.path().join("adaptd"));
    let theirs = run_pyreft(&[&pyreft_dir, &converted], &tmp.path().join("make.json"), "make");
    let reft = adaptd_adapters::files::read_reft_dir(&converted).expect("adaptd reads what pyreft saved, converted");
    reft.validate(bundle.manifest.reft.as_ref().unwrap()).unwrap();
    assert_eq!((reft.rank, reft.modules.len()), (4, 2));
    let ours = serve_embedding(&bundle, None, Some(&reft), &theirs.inputs);
    let diff = max_abs_diff(&ours, &theirs.embedding).unwrap();
    assert!(diff <= 1e-4, "pyreft and adaptd disagree by {diff}");
}

#[test]
fn peft_configs_adaptd_cannot_serve_are_refused_by_name() {
    let bundle = Bundle::open(reference_bundle("minilm")).unwrap();
    let adapter = lora_adapter(&bundle, "intent", 1, 9);
    let dir = tempfile::tempdir().unwrap();
    adapter.write_dir(dir.path()).unwrap();
    let config_path = dir.path().join("adapter_config.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    for (key, value, expect) in
        [("use_dora", serde_json::json!(true), "use_dora"), ("peft_type", serde_json::json!("IA3"), "IA3"), ("bias", serde_json::json!("all"), "bias")]
    {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(&config_path, serde_json::to_vec(&c).unwrap()).unwrap();
        let err = read_peft(dir.path(), &bundle.manifest.lora).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(expect) && msg.contains("adapter_config.json"), "{msg}");
    }
    // A PEFT adapter for modules the bundle has no slot for.
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let digits = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let err = read_peft(dir.path(), &digits.manifest.lora).unwrap_err();
    assert!(err.to_string().contains("not a LoRA slot"), "{err}");
}

/// The combined adapter PEFT's `add_weighted_adapter` made by `rule`, as LoRA weights (PEFT gives
/// a combined adapter alpha = rank).
fn peft_combined(tensors: &safetensors::SafeTensors, rule: &str, template: &LoraWeights) -> LoraWeights {
    let read = |key: &str| {
        let view = tensors.tensor(key).unwrap_or_else(|_| panic!("PEFT wrote no {key}"));
        HostTensor::f32(view.shape().to_vec(), adaptd_adapters::tensor::f32s_from_le(view.data())).unwrap()
    };
    let modules: Vec<LoraModule> = template
        .modules
        .iter()
        .map(|m| LoraModule { module: m.module.clone(), a: read(&format!("{rule}.{}.A", m.module)), b: read(&format!("{rule}.{}.B", m.module)) })
        .collect();
    let rank = modules[0].a.shape[0];
    LoraWeights { rank, alpha: rank as f32, modules }
}

#[test]
fn fleet_aggregation_equals_peft_add_weighted_adapter_cat_and_svd() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Three devices' adapters at different ranks and alphas, on conv1 (3x3), conv2 (3x3) and fc1.
    let adapters: Vec<LoraWeights> = [(4, 8.0, 11), (2, 2.0, 12), (3, 6.0, 13)]
        .into_iter()
        .map(|(rank, alpha, seed)| LoraWeights::random(&bundle.manifest.lora, rank, alpha, seed, 0.2).unwrap())
        .collect();
    let weights = normalise(&[500.0, 300.0, 200.0]).unwrap();
    let mut dirs = Vec::new();
    for (i, lora) in adapters.iter().enumerate() {
        let mut adapter = lora_adapter(&bundle, "sorter", i as u64 + 1, 20 + i as u64);
        adapter.manifest.lora = Some(LoraInfo { rank: lora.rank, alpha: lora.alpha, target_modules: lora.modules.iter().map(|m| m.module.clone()).collect() });
        adapter.lora = Some(lora.clone());
        let dir = tmp.path().join(format!("device{i}"));
        std::fs::create_dir(&dir).unwrap();
        adapter.write_dir(&dir).unwrap();
        dirs.push(dir.to_str().unwrap().to_string());
    }
    let svd_rank = 5;
    let out = tmp.path().join("peft.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/export/peft_interop.py");
    let weight_list = weights.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(",");
    let status = Command::new(python())
        .arg(script)
        .args(["combine", out.to_str().unwrap(), &weight_list, &svd_rank.to_string()])
        .args(&dirs)
        .status()
        .expect("run python");
    assert!(status.success(), "peft_interop.py combine failed");
    let bytes = std::fs::read(&out).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();

    let parts: Vec<(&LoraWeights, f64)> = adapters.iter().zip(weights.iter().copied()).collect();
    let (cat, fits) = combine_lora(&parts, Rule::Cat, 0, None).unwrap();
    assert!(fits.iter().all(|f| f.residual == 0.0));
    let peft_cat = peft_combined(&theirs, "cat", &cat);
    assert_eq!((peft_cat.rank, cat.rank), (9, 9), "cat stacks the ranks");
    for (ours, peft) in cat.modules.iter().zip(&peft_cat.modules) {
        for (a, b, which) in [(&ours.a, &peft.a, "A"), (&ours.b, &peft.b, "B")] {
            let diff = max_abs_diff(a, b).unwrap();
            assert!(diff <= 1e-6, "cat {} {which}: PEFT and adaptd differ by {diff}", ours.module);
        }
    }

    let (svd, fits) = combine_lora(&parts, Rule::Svd, svd_rank, None).unwrap();
    let peft_svd = peft_combined(&theirs, "svd", &svd);
    assert_eq!(peft_svd.rank, svd_rank);
    for fit in &fits {
        // Factors are unique only up to signs: compare the updates they make.
        let (ours, peft) = (update(&svd, &fit.module).unwrap(), update(&peft_svd, &fit.module).unwrap());
        let diff = ours.iter().zip(&peft).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff <= 1e-4, "svd {}: PEFT and adaptd updates differ by {diff}", fit.module);
        // And the truncation left what the residual says: conv1's update (16x9) has rank 9 > 5.
        let truth: Vec<f64> = parts.iter().fold(vec![0.0; ours.len()], |mut acc, (l, w)| {
            acc.iter_mut().zip(update(l, &fit.module).unwrap()).for_each(|(s, d)| *s += w * d);
            acc
        });
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let residual = norm(&truth.iter().zip(&ours).map(|(t, o)| t - o).collect::<Vec<_>>()) / norm(&truth);
        assert!((residual - fit.residual).abs() < 1e-4, "{}: residual {residual} vs reported {}", fit.module, fit.residual);
        assert!(fit.residual > 0.01, "{}: a rank-9 sum cut to rank 5 loses something", fit.module);
    }
}
