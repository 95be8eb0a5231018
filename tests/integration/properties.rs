//! Property tests over every decoder of outside input: sample payloads (JSON and safetensors),
//! inference requests (JSON, safetensors, PNG, JPEG), images, adapter directories, bundle
//! manifests and files, the configuration, and the fleet's messages and saved rollouts.
//! Arbitrary bytes and mutations of valid inputs never panic, never make one allocation past a
//! bound, and always end in a typed refusal or a value that passed every check.
//!
//! `make test` runs 256 cases per property; `make fuzz` runs many more (`PROPTEST_CASES`).

use std::path::Path;

use adaptd_adapters::Bundle;
use adaptd_adapters::files::Adapter;
use adaptd_daemon::api::wire;
use adaptd_daemon::ingest::decode::{SampleSchema, decode_sample};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use sha2::{Digest, Sha256};

use crate::{head_adapter, lora_adapter, reference_bundle};

/// No single allocation of a decode may be larger than this (payloads are at most 1 MiB; the
/// largest legitimate buffer is a 1024x1024 picture at 16-bit RGBA, 8 MiB).
const ALLOCATION_BOUND: usize = 64 << 20;

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    TestRunner::new(ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() })
}

/// Bytes, and ways to damage them: flip, insert, delete, truncate, splice in hostile numbers.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let hostile = prop::sample::select(vec![
        b"4294967296".to_vec(),
        b"18446744073709551615".to_vec(),
        b"-1".to_vec(),
        b"1e999".to_vec(),
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec(),
        vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        b"\"shape\": [4294967296, 4294967296, 1, 1]".to_vec(),
        vec![0u8; 16],
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), prop_oneof![prop::collection::vec(any::<u8>(), 1..16), hostile]).prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Flip(i, b) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] ^= b | 1;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(i, v) => {
                let i = at(*i, bytes.len());
                bytes.splice(i..i, v.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(*i, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Mutation::Truncate(n) => {
                let n = at(*n, bytes.len());
                bytes.truncate(n);
            }
        }
    }
    bytes
}

/// Valid input, damaged a little (most cases) or a lot, or replaced by arbitrary bytes.
fn damaged(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (prop::sample::select(seeds.clone()), prop::collection::vec(mutation(), 1..4)).prop_map(|(s, m)| mutate(s, &m)),
        1 => (prop::sample::select(seeds), prop::collection::vec(mutation(), 4..32)).prop_map(|(s, m)| mutate(s, &m)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

/// A well-formed JSON tensor of any shape: dimensions near the limits of usize included, so
/// element counts overflow (as `[2^32, 2^32, 1, 1]` did in the decoders).
fn json_tensor() -> impl Strategy<Value = String> {
    let dim = prop_oneof![0u64..12, Just(4_294_967_296u64), Just(u64::MAX), any::<u64>()];
    (prop::collection::vec(dim, 0..6), 0usize..80).prop_map(|(shape, n)| {
        let data: Vec<String> = (0..n).map(|i| (i % 3).to_string()).collect();
        format!("{{\"shape\": {shape:?}, \"data\": [{}]}}", data.join(","))
    })
}

/// Run `f` and return the largest single allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    crate::allocations::reset_largest();
    let r = f();
    (r, crate::allocations::largest())
}

fn digit_json(key: &str) -> String {
    let data: Vec<String> = (0..64).map(|i| format!("{:.2}", (i % 7) as f32 / 7.0)).collect();
    format!(
        "{{\"key\": \"{key}\", \"task\": \"sorter\", \"label\": \"left\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}, \"weight\": 1.0, \"correction\": false}}",
        data.join(",")
    )
}

fn safetensors_sample(name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, bytes: &[u8], meta: &[(&str, &str)]) -> Vec<u8> {
    let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
    let meta = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    safetensors::serialize(vec![(name.to_string(), view)], Some(meta)).unwrap()
}

fn png_digit() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x * 13 + y * 7) % 255) as u8])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg_digit() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x * 5 + y * 11) % 255) as u8])).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

#[test]
fn sample_decoders_refuse_damage_with_a_type_and_bounded_memory() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let tasks = vec!["sorter".to_string()];
    let schema = SampleSchema { manifest: &bundle.manifest, tasks: &tasks, max_bytes: 1 << 20 };
    let pixels: Vec<u8> = (0..64).flat_map(|i| (i as f32 / 64.0).to_le_bytes()).collect();
    let meta = [("key", "s:1"), ("task", "sorter"), ("label", "left")];
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(png_digit());
    let seeds = vec![
        digit_json("j:1").into_bytes(),
        format!("{{\"key\": \"i:1\", \"task\": \"sorter\", \"label\": 3, \"image\": \"{b64}\"}}").into_bytes(),
        safetensors_sample("input", safetensors::Dtype::F32, vec![1, 1, 8, 8], &pixels, &meta),
        safetensors_sample("image", safetensors::Dtype::U8, vec![png_digit().len()], &png_digit(), &meta),
        // A raw RGB camera frame, 6x10.
        safetensors_sample("image", safetensors::Dtype::U8, vec![6, 10, 3], &(0..180).map(|i| i as u8).collect::<Vec<u8>>(), &meta),
    ];
    for seed in &seeds {
        decode_sample(seed, &schema, 0).expect("every seed is valid");
    }
    let ok = std::cell::Cell::new(0);
    let refused = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let structured = json_tensor().prop_map(|t| format!("{{\"key\": \"t:1\", \"task\": \"sorter\", \"label\": \"left\", \"input\": {t}}}").into_bytes());
    runner()
        .run(&prop_oneof![3 => damaged(seeds), 1 => structured], |payload| {
            let (result, largest) = largest_allocation(|| decode_sample(&payload, &schema, 0));
            prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {largest} bytes for a {}-byte payload", payload.len());
            match result {
                Ok(sample) => {
                    ok.set(ok.get() + 1);
                    prop_assert!(!sample.key.is_empty() && sample.task == "sorter" && sample.weight.is_finite());
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    *refused.borrow_mut().entry(e.error_type()).or_insert(0u32) += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    let refused = refused.into_inner();
    eprintln!("samples: {} still valid, refused {refused:?}", ok.get());
    assert!(refused.len() >= 3, "the damage reaches several checks: {refused:?}");
}

#[test]
fn request_decoders_refuse_damage_with_a_type_and_bounded_memory() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let manifest = &bundle.manifest;
    let pixels: Vec<u8> = (0..128).flat_map(|i| (i as f32 / 128.0).to_le_bytes()).collect();
    let data: Vec<String> = (0..64).map(|i| (i % 5).to_string()).collect();
    let seeds = vec![
        (format!("{{\"inputs\": {{\"image\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}}}", data.join(",")).into_bytes(), wire::CONTENT_JSON),
        (safetensors_sample("image", safetensors::Dtype::F32, vec![2, 1, 8, 8], &pixels, &[]), wire::CONTENT_SAFETENSORS),
        (png_digit(), wire::CONTENT_PNG),
        (jpeg_digit(), wire::CONTENT_JPEG),
        // Two raw RGB camera frames, 6x10, as U8 [N, height, width, 3].
        (
            safetensors_sample("image", safetensors::Dtype::U8, vec![2, 6, 10, 3], &(0..360).map(|i| i as u8).collect::<Vec<u8>>(), &[]),
            wire::CONTENT_SAFETENSORS,
        ),
    ];
    for (body, kind) in &seeds {
        wire::decode(body, Some(kind), manifest, None, 1 << 20).expect("every seed is valid");
    }
    let kinds: Vec<&'static str> = vec![wire::CONTENT_JSON, wire::CONTENT_SAFETENSORS, wire::CONTENT_PNG, wire::CONTENT_JPEG];
    let structured = json_tensor().prop_map(|t| format!("{{\"inputs\": {{\"image\": {t}}}}}").into_bytes());
    let bodies = prop_oneof![3 => damaged(seeds.iter().map(|(b, _)| b.clone()).collect()), 1 => structured];
    let refused = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner()
        .run(&(bodies, prop::sample::select(kinds)), |(body, kind)| {
            let (result, largest) = largest_allocation(|| wire::decode(&body, Some(kind), manifest, None, 1 << 20));
            prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {largest} bytes for a {}-byte {kind} body", body.len());
            match result {
                // What decodes goes on to the engine's own checks (shape, dtype, finite values),
                // which the API runs before anything reaches the model: typed as well.
                Ok(inputs) => {
                    prop_assert_eq!(inputs.len(), 1);
                    if let Err(e) = adaptd_daemon::engine::validate_inputs(manifest, &inputs) {
                        *refused.borrow_mut().entry(e.error_type()).or_insert(0u32) += 1;
                    }
                }
                Err(e) => *refused.borrow_mut().entry(e.error_type()).or_insert(0u32) += 1,
            }
            Ok(())
        })
        .unwrap();
    eprintln!("requests: refused {:?}", refused.into_inner());
}

/// Write `adapter` to `dir` with some of its files damaged, and the manifest's hashes made to
/// match the damage, so the parsers behind the hash check are what the damage reaches.
fn write_damaged(adapter: &Adapter, dir: &Path, damage: &[(usize, Vec<Mutation>)]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    adapter.write_dir(dir).unwrap();
    let manifest_path = dir.join("adapter.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let names: Vec<String> = manifest["files"].as_object().unwrap().keys().cloned().collect();
    for (which, mutations) in damage {
        let name = &names[which % names.len()];
        let path = dir.join(name);
        let bytes = mutate(std::fs::read(&path).unwrap(), mutations);
        std::fs::write(&path, &bytes).unwrap();
        manifest["files"][name] = serde_json::json!({ "sha256": hex::encode(Sha256::digest(&bytes)), "bytes": bytes.len() });
    }
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
}

#[test]
fn adapter_directories_refuse_damage_by_name() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    // The gate's decision rides in the manifest too: damage reaches the typed record.
    let mut judged = head_adapter(&bundle, "sorter", 1, 1);
    judged.manifest.decision = Some(adaptd_protocol::gate::DecisionRecord {
        promote: true,
        summary: "promoted: accuracy 0.3810 -> 0.8571".into(),
        checks: vec![adaptd_protocol::gate::Check { name: "beats_incumbent".into(), passed: true, detail: "accuracy 0.8571 vs 0.3810".into() }],
        trigger: Some(adaptd_protocol::status::Trigger::NewSamples),
    });
    let adapters = [judged, lora_adapter(&bundle, "sorter", 2, 2), crate::loreft_adapter(&bundle, "sorter", 3, 3)];
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("v");
    let damage = prop::collection::vec((any::<usize>(), prop::collection::vec(mutation(), 1..6)), 1..3);
    let manifest_damage = prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..3)];
    let refused = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner()
        .run(&(0usize..3, damage, manifest_damage), |(which, damage, manifest_damage)| {
            write_damaged(&adapters[which], &target, &damage);
            let manifest_path = target.join("adapter.json");
            let manifest = mutate(std::fs::read(&manifest_path).unwrap(), &manifest_damage);
            std::fs::write(&manifest_path, manifest).unwrap();
            let (result, largest) = largest_allocation(|| Adapter::read_dir(&target).and_then(|a| a.check_fits(&bundle).map(|_| a)));
            prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {largest} bytes");
            match result {
                Ok(a) => prop_assert!(a.head.validate(bundle.manifest.embedding_dim, a.manifest.labels.len()).is_ok()),
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(
                        text.contains(target.to_str().unwrap()) || ["wrong_base", "lora", "reft", "head"].contains(&e.error_type()),
                        "names the file: {}",
                        text
                    );
                    *refused.borrow_mut().entry(e.error_type()).or_insert(0u32) += 1;
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("adapters: refused {:?}", refused.into_inner());
}

#[test]
fn bundle_manifests_and_files_refuse_damage_by_name() {
    let src = reference_bundle("digits-cnn");
    let dir = tempfile::tempdir().unwrap();
    for big in ["model.onnx", "train.pt"] {
        std::os::unix::fs::symlink(src.join(big), dir.path().join(big)).unwrap();
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("manifest.json")).unwrap()).unwrap();
    let small = ["base_head.safetensors", "retention.safetensors"];
    let originals: Vec<Vec<u8>> = small.iter().map(|f| std::fs::read(src.join(f)).unwrap()).collect();
    let file_damage = prop::collection::vec((0usize..2, prop::collection::vec(mutation(), 1..6)), 0..3);
    let manifest_damage = prop::collection::vec(mutation(), 0..4);
    let refused = std::cell::RefCell::new(std::collections::BTreeMap::new());
    runner()
        .run(&(file_damage, manifest_damage), |(file_damage, manifest_damage)| {
            let mut manifest = manifest.clone();
            let mut files = originals.clone();
            for (which, mutations) in &file_damage {
                files[*which] = mutate(files[*which].clone(), mutations);
            }
            for (name, bytes) in small.iter().zip(&files) {
                std::fs::write(dir.path().join(name), bytes).unwrap();
                manifest["files"][name] = serde_json::json!({ "sha256": hex::encode(Sha256::digest(bytes)), "bytes": bytes.len() });
            }
            std::fs::write(dir.path().join("manifest.json"), mutate(manifest.to_string().into_bytes(), &manifest_damage)).unwrap();
            let (result, largest) = largest_allocation(|| {
                let b = Bundle::open(dir.path())?;
                b.base_head()?;
                b.retention()?;
                Ok::<_, adaptd_adapters::bundle::BundleError>(())
            });
            prop_assert!(largest <= ALLOCATION_BOUND, "one allocation of {largest} bytes");
            if let Err(e) = result {
                prop_assert!(e.to_string().contains(dir.path().to_str().unwrap()), "names the file: {}", e);
                *refused.borrow_mut().entry(e.to_string().split(':').nth(1).unwrap_or("").trim().chars().take(24).collect::<String>()).or_insert(0u32) += 1;
            }
            Ok(())
        })
        .unwrap();
    eprintln!("bundles: {} kinds of refusal", refused.into_inner().len());
}

#[test]
fn configuration_text_is_refused_with_key_or_line() {
    let shipped = adaptd_daemon::config::DEFAULT_TOML.as_bytes().to_vec();
    let path = Path::new("/etc/adaptd/adaptd.toml");
    let refused = std::cell::Cell::new(0);
    runner()
        .run(&damaged(vec![shipped]), |text| {
            let text = String::from_utf8_lossy(&text).into_owned();
            let (result, largest) = largest_allocation(|| adaptd_daemon::config::Config::parse(&text, path));
            prop_assert!(largest <= ALLOCATION_BOUND);
            if let Err(e) = result {
                refused.set(refused.get() + 1);
                prop_assert!(e.to_string().contains("adaptd.toml"), "names the file: {}", e);
            }
            Ok(())
        })
        .unwrap();
    assert!(refused.get() > 0);
}

/// The fleet's messages and files: an assignment, a device's rollout status, an offer, and a
/// saved rollout. Damaged, each is refused with a reason (a saved rollout names its file), with
/// bounded memory; what decodes is a whole value.
#[test]
fn fleet_messages_and_state_refuse_damage_with_a_reason_and_bounded_memory() {
    use adaptd_protocol::fleet::{AgentStatus, Offer};
    let assignment =
        br#"{"seq": 4, "task": "sorter", "release": 3, "policy": "validate", "rollback": false, "deadline_ms": 1795950000000, "rollout": "r3"}"#.to_vec();
    let status = br#"{"task": "sorter", "state": "applied", "seq": 4, "release": 3, "rollout": "r3", "reason": null, "message": null, "serving_version": 7, "serving_release": 3, "bytes": [10, 20], "scores": {"candidate_accuracy": 0.77, "incumbent_accuracy": 0.08, "holdout_samples": 13, "passed": true, "summary": "promoted"}, "time_ms": 1}"#.to_vec();
    let offer = br#"{"device": "robot-3", "task": "sorter", "version": 7, "kind": "head", "base_sha256": "ab", "parent_release": null, "metrics": {"holdout_accuracy": 0.9}, "samples": {"train": 80, "validation": 10, "holdout": 10}, "offered_ms": 1}"#.to_vec();
    assert!(adaptd_daemon::fleet::agent::decode_assignment(&assignment, None).is_ok());
    assert!(adaptd_daemon::fleet::agent::decode_assignment(&assignment, Some(1 << 20)).unwrap_err().contains("over the limit"));
    let refused = std::cell::Cell::new(0);
    runner()
        .run(&damaged(vec![assignment, status, offer]), |bytes| {
            let (results, largest) = largest_allocation(|| {
                (
                    adaptd_daemon::fleet::agent::decode_assignment(&bytes, None),
                    serde_json::from_slice::<AgentStatus>(&bytes).map_err(|e| e.to_string()),
                    serde_json::from_slice::<Offer>(&bytes).map_err(|e| e.to_string()),
                )
            });
            prop_assert!(largest <= ALLOCATION_BOUND);
            for reason in [results.0.err(), results.1.err(), results.2.err()].into_iter().flatten() {
                prop_assert!(!reason.is_empty());
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    assert!(refused.get() > 0);

    // A saved rollout, damaged on disk: the controller names the file and does not start.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollout.json");
    let plan = adaptd_fleet::controller::Plan {
        id: "r".into(),
        task: "sorter".into(),
        release: 1,
        policy: adaptd_protocol::fleet::Policy::Validate,
        rollback: false,
        waves: vec![vec!["robot-1".into()]],
        success_percent: 100.0,
        failures: adaptd_fleet::controller::FailureThreshold { count: Some(1), percent: None, min_executed: 1 },
        device_timeout_ms: 60_000,
        per_minute: None,
        base_sha256: None,
    };
    adaptd_daemon::fleet::controller::save(&path, &adaptd_fleet::controller::Rollout::new(plan, Default::default())).unwrap();
    let saved = std::fs::read(&path).unwrap();
    runner()
        .run(&damaged(vec![saved]), |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = adaptd_daemon::fleet::controller::load(&path) {
                prop_assert!(e.to_string().contains("rollout.json"), "names the file: {}", e);
            }
            Ok(())
        })
        .unwrap();
}
