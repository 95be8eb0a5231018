//! Seeded adapters for tests and benchmarks (benches include this file by path).

use adaptd_adapters::Bundle;
use adaptd_adapters::files::{ADAPTER_FORMAT, Adapter, AdapterKind, AdapterManifest, BaseRef, LoraInfo};
use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::lora::LoraWeights;
use adaptd_adapters::tensor::{HostTensor, SeededRng};

pub const TEST_LABELS: [&str; 3] = ["left", "right", "stop"];

/// A head-only adapter with a seeded random linear head over the bundle's embedding.
pub fn head_adapter(bundle: &Bundle, task: &str, version: u64, seed: u64) -> Adapter {
    let (classes, dim) = (TEST_LABELS.len(), bundle.manifest.embedding_dim);
    let mut rng = SeededRng::new(seed);
    let head = Head {
        layers: vec![Dense {
            weight: HostTensor::f32(vec![classes, dim], rng.normal_vec(classes * dim, 0.5)).unwrap(),
            bias: HostTensor::f32(vec![classes], rng.normal_vec(classes, 0.1)).unwrap(),
        }],
    };
    let manifest = AdapterManifest {
        format: ADAPTER_FORMAT,
        task: task.into(),
        version,
        kind: AdapterKind::Head,
        labels: TEST_LABELS.iter().map(|s| s.to_string()).collect(),
        lora: None,
        reft: None,
        base: BaseRef::of(bundle),
        parent_version: version.checked_sub(1).filter(|&v| v > 0),
        metrics: Default::default(),
        samples: Default::default(),
        created_unix_ms: 1_700_000_000_000,
        decision: None,
        promoted_unix_ms: None,
        base_routing: false,
        aggregate: None,
        files: Default::default(),
    };
    Adapter { manifest, head, lora: None, reft: None }
}

/// A LoRA (rank 4, alpha 8, every slot) + head adapter with seeded random weights.
pub fn lora_adapter(bundle: &Bundle, task: &str, version: u64, seed: u64) -> Adapter {
    let mut adapter = head_adapter(bundle, task, version, seed);
    let lora = LoraWeights::random(&bundle.manifest.lora, 4, 8.0, seed, 0.05).unwrap();
    adapter.manifest.kind = AdapterKind::Lora;
    adapter.manifest.lora = Some(LoraInfo { rank: 4, alpha: 8.0, target_modules: lora.modules.iter().map(|m| m.module.clone()).collect() });
    adapter.lora = Some(lora);
    adapter
}

/// A LoReFT (rank 4, every LoReFT slot, each text's first and last token) + head adapter with
/// seeded random weights.
pub fn loreft_adapter(bundle: &Bundle, task: &str, version: u64, seed: u64) -> Adapter {
    let mut adapter = head_adapter(bundle, task, version, seed);
    let spec = bundle.manifest.reft.as_ref().expect("the bundle has LoReFT slots");
    let reft = adaptd_adapters::ReftWeights::random(spec, 4, seed, 0.3).unwrap();
    adapter.manifest.kind = AdapterKind::Loreft;
    adapter.manifest.reft =
        Some(adaptd_adapters::files::ReftInfo { rank: reft.rank, positions: reft.positions, modules: reft.modules.iter().map(|m| m.module.clone()).collect() });
    adapter.reft = Some(reft);
    adapter
}
