#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! adaptd's side of `benches/compare_training.py`: the daemon's own training recipe
//! (`adaptd_train::fit`, the function the trainer thread runs) on data the driver
//! prepared, printing one JSON line. PEFT's side is `benches/peft_reference.py`; the driver runs
//! both in turn, several times, and prints medians and ratios.
//!
//! Every mode takes `--bundle DIR` (default: the reference bundle it names); LoRA trains every
//! slot of the bundle, or with `--cut` those above its cut. The driver hands in a query/value
//! bundle where it compares with PEFT's query/value LoRA.
//!
//!   cargo bench -p adaptd --bench training -- throughput DATA [--bundle DIR] [--inputs a,b] [--cut x] --threads T --epochs E --rank R
//!       LoRA + head on a minilm bundle (or on the bundle given, fed the data's tensors named by
//!       --inputs: `image` for the camera bundle); samples/s and peak RSS. Above a cut the
//!       samples/s are over the whole job, the prefix's time included.
//!   cargo bench -p adaptd --bench training -- quality DATA [--bundle DIR] --threads T --epochs E --rank R --lr LR --head-lr LR --seed S
//!       LoRA (the bundle's slots: conv1/conv2/fc1) + head on the digits-cnn bundle; accuracy on the test and retention sets.
//!   cargo bench -p adaptd --bench training -- time-to-accuracy DATA [--bundle DIR] [--cut x] --threads T --epochs E --rank R --lr LR --head-lr LR --seed S
//!       The intents of `text` (LoRA + head, on a minilm bundle) or the sideways digits of
//!       `quality` (LoRA conv1/conv2/fc1 + head, on a digits-cnn bundle) and, with --cut, above
//!       its cut; validation accuracy per epoch against seconds since the job started, test accuracy.
//!       With `--cached 1`, the job again on the prefix activations the first one kept.
//!   cargo bench -p adaptd --bench training -- adapter DATA [--bundle DIR] [--cut 1] --adapter lora|loreft [--positions f1+l1] [--layers a,b] --threads T --epochs E --rank R --lr LR --head-lr LR --seed S
//!       One adapter kind + head on the intents of `text` or the sideways digits of `quality`
//!       (the data says which): test accuracy, trainable parameters, tensor file bytes,
//!       samples/s over the whole job and peak RSS (`benches/compare_loreft.py` drives it).
//!   cargo bench -p adaptd --bench training -- text DATA [--bundle DIR] --threads T --epochs E --rank R --lr LR --head-lr LR --seed S
//!       Few-shot intents on a minilm bundle: a head on the frozen backbone and LoRA + head; test
//!       accuracy, and nearest-centroid accuracy on intents never trained (forgetting).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use adaptd_adapters::head::{Dense, Head};
use adaptd_adapters::{Bundle, HostTensor};
use adaptd_train::{CachedActivation, Examples, FitTarget, PrefixCache, Recipe, Schedule, TrainingGraph, fit, fit_cached, memory};
use safetensors::{Dtype, SafeTensors};

fn tensor(st: &SafeTensors<'_>, name: &str) -> HostTensor {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("data file has no tensor {name:?}"));
    let shape = t.shape().to_vec();
    match t.dtype() {
        Dtype::F32 => HostTensor::f32(shape, t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()).unwrap(),
        Dtype::I64 => HostTensor::i64(shape, t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()).unwrap(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

fn examples(st: &SafeTensors<'_>, inputs: &[&str], labels: &str) -> Examples {
    let labels = tensor(st, labels).as_i64().expect("labels are i64").to_vec();
    let weights = vec![1.0; labels.len()];
    Examples { inputs: inputs.iter().map(|n| tensor(st, n)).collect(), labels, weights }
}

/// Accuracy of `graph` with `lora` and `head` on `examples`.
fn accuracy(graph: &TrainingGraph, lora: &[HostTensor], head: &Head, ex: &Examples) -> f64 {
    head_accuracy(head, &embeddings(graph, lora, &ex.inputs), &ex.labels)
}

/// The embedding output of `graph` for `inputs`, batch by batch.
fn embeddings(graph: &TrainingGraph, lora: &[HostTensor], inputs: &[HostTensor]) -> HostTensor {
    let m = graph.manifest();
    let emb_index = m.output_index(&m.embedding_output).unwrap();
    let n = inputs[0].shape[0];
    let mut rows = Vec::new();
    let mut dim = 0;
    for start in (0..n).step_by(64) {
        let end = (start + 64).min(n);
        let batch: Vec<HostTensor> = inputs.iter().map(|t| t.rows(start, end)).collect();
        let out = graph.forward_host(&batch, lora).unwrap().swap_remove(emb_index);
        dim = out.shape[1];
        rows.extend_from_slice(out.as_f32().unwrap());
    }
    HostTensor::f32(vec![n, dim], rows).unwrap()
}

/// Accuracy of `head` on embeddings.
fn head_accuracy(head: &Head, emb: &HostTensor, labels: &[i64]) -> f64 {
    let logits = head.forward(emb.as_f32().unwrap(), labels.len());
    argmax_rows(&logits, head.classes()).zip(labels).filter(|(p, l)| p == *l).count() as f64 / labels.len().max(1) as f64
}

fn argmax_rows(values: &[f32], width: usize) -> impl Iterator<Item = i64> + '_ {
    values.chunks_exact(width).map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(-1, |(i, _)| i as i64))
}

/// Nearest-centroid accuracy: class centroids from `reference` embeddings, cosine similarity.
fn centroid_accuracy(reference: &HostTensor, ref_labels: &[i64], test: &HostTensor, test_labels: &[i64]) -> f64 {
    let dim = reference.shape[1];
    let classes = ref_labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut centroids = vec![0f32; classes * dim];
    for (row, &l) in reference.as_f32().unwrap().chunks_exact(dim).zip(ref_labels) {
        centroids[l as usize * dim..][..dim].iter_mut().zip(row).for_each(|(c, v)| *c += v);
    }
    for c in centroids.chunks_exact_mut(dim) {
        let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        c.iter_mut().for_each(|v| *v /= norm);
    }
    let scores: Vec<f32> = test
        .as_f32()
        .unwrap()
        .chunks_exact(dim)
        .flat_map(|row| centroids.chunks_exact(dim).map(|c| c.iter().zip(row).map(|(a, b)| a * b).sum::<f32>()).collect::<Vec<_>>())
        .collect();
    argmax_rows(&scores, classes).zip(test_labels).filter(|(p, l)| p == *l).count() as f64 / test_labels.len().max(1) as f64
}

/// The intents of `text`, the sideways digits of `quality` or a camera shift's frames (the data
/// says which), on the bundle they belong to (cut where asked): the splits and the head a job
/// starts from.
struct ShiftTask {
    bundle: Bundle,
    graph: TrainingGraph,
    train: Examples,
    val: Examples,
    test: Examples,
    init: Head,
}

impl ShiftTask {
    fn load(st: &SafeTensors<'_>, bundle_dir: &dyn Fn(&str) -> std::path::PathBuf, cut: bool) -> ShiftTask {
        let digits = st.tensor("train_x").is_ok();
        let camera = st.tensor("train_image").is_ok();
        let bundle = Bundle::open(bundle_dir(match (digits, camera) {
            (true, _) => "digits-cnn",
            (_, true) => "efficientnet-lite0",
            _ => "minilm",
        }))
        .unwrap();
        let mut graph = TrainingGraph::load(&bundle, tch::Device::Cpu).unwrap();
        if cut {
            graph.load_cut(&bundle).unwrap();
        }
        let split = |name: &str| match (digits, camera) {
            (true, _) => examples(st, &[&format!("{name}_x")], &format!("{name}_y")),
            (_, true) => examples(st, &[&format!("{name}_image")], &format!("{name}_y")),
            _ => examples(st, &[&format!("{name}_ids"), &format!("{name}_mask")], &format!("{name}_y")),
        };
        let init = match digits {
            true => bundle.base_head().unwrap().expect("digits-cnn ships its classifier"),
            false => Head { layers: vec![Dense { weight: tensor(st, "head_weight"), bias: tensor(st, "head_bias") }] },
        };
        ShiftTask { train: split("train"), val: split("val"), test: split("test"), init, graph, bundle }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.len() < 2 {
        eprintln!("usage: training (throughput|quality) DATA [--threads T] [--epochs E] [--rank R] [--lr LR] [--head-lr LR]");
        std::process::exit(2);
    }
    let (mode, data) = (args.remove(0), args.remove(0));
    let opts: BTreeMap<String, String> = args.chunks(2).map(|c| (c[0].trim_start_matches("--").to_string(), c.get(1).cloned().unwrap_or_default())).collect();
    let opt = |k: &str, d: &str| opts.get(k).cloned().unwrap_or_else(|| d.to_string());
    let threads: i32 = opt("threads", "2").parse().unwrap();
    let epochs: usize = opt("epochs", "3").parse().unwrap();
    let rank: usize = opt("rank", "8").parse().unwrap();
    tch::set_num_threads(threads);
    tch::set_num_interop_threads(1);
    let bytes = std::fs::read(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // The recipe both sides share: what the driver passes, no early stopping (the best epoch by
    // validation loss is kept), no dropout and plain shuffling so PEFT's side can match it exactly.
    let recipe = Recipe {
        learning_rate: opt("lr", "5e-4").parse().unwrap(),
        head_learning_rate: opt("head-lr", "5e-3").parse().unwrap(),
        weight_decay: 0.01,
        warmup_fraction: 0.1,
        schedule: Schedule::Cosine,
        max_epochs: epochs,
        batch_size: 16,
        patience: 0,
        grad_clip: 1.0,
        dropout: 0.0,
        lora_dropout: 0.0,
        class_balanced: false,
        head_only_epochs: 0,
        memory_budget_bytes: None,
        seed: opt("seed", "0").parse().unwrap(),
    };
    let cancel = AtomicBool::new(false);
    // `--bundle DIR`, or the reference bundle of that name.
    let bundle_dir = |reference: &str| opts.get("bundle").map_or_else(|| adaptd::paths::reference_bundle(reference), std::path::PathBuf::from);
    match mode.as_str() {
        "throughput" => {
            let rss_start = memory::rss();
            let bundle = Bundle::open(bundle_dir("minilm")).unwrap();
            let mut graph = TrainingGraph::load(&bundle, tch::Device::Cpu).unwrap();
            if opts.contains_key("cut") {
                graph.load_cut(&bundle).unwrap();
            }
            let rss_loaded = memory::rss();
            let inputs = opt("inputs", "input_ids,attention_mask");
            let train = examples(&st, &inputs.split(',').collect::<Vec<_>>(), "labels");
            let head = Head { layers: vec![Dense { weight: tensor(&st, "head_weight"), bias: tensor(&st, "head_bias") }] };
            // The daemon's trainer gets its examples from the sample store, never from a file
            // held whole: the file's bytes are not the trainer's memory.
            drop(st);
            drop(bytes);
            let started = std::time::Instant::now();
            let report = fit(
                FitTarget::Lora { graph: &graph, rank, alpha: 2.0 * rank as f32, start: None },
                &train,
                &Examples::default(),
                &head,
                &recipe,
                &cancel,
                &mut |_| {},
            )
            .unwrap();
            // Above a cut the job pays for the prefix once per sample before its first step: count it.
            let job_samples_per_second = (train.len() * epochs) as f64 / started.elapsed().as_secs_f64();
            let samples_per_second = if graph.trains_above_cut() { job_samples_per_second } else { report.samples_per_second };
            let out = serde_json::json!({
                "side": "adaptd", "samples_per_second": samples_per_second, "steps_samples_per_second": report.samples_per_second, "steps": report.steps,
                "peak_rss_bytes": memory::peak_rss(), "rss_start_bytes": rss_start, "rss_loaded_bytes": rss_loaded, "first_loss": report.losses.first(), "last_loss": report.losses.last(),
            });
            println!("{out}");
        }
        "quality" => {
            let bundle = Bundle::open(bundle_dir("digits-cnn")).unwrap();
            let graph = TrainingGraph::load(&bundle, tch::Device::Cpu).unwrap();
            let base_head = bundle.base_head().unwrap().expect("digits-cnn ships its classifier");
            let (train, val, test, retention) = (
                examples(&st, &["train_x"], "train_y"),
                examples(&st, &["val_x"], "val_y"),
                examples(&st, &["test_x"], "test_y"),
                examples(&st, &["retention_x"], "retention_y"),
            );
            let no_lora = adaptd_adapters::slots::no_adapter_inputs(&bundle.manifest);
            let started = std::time::Instant::now();
            let report =
                fit(FitTarget::Lora { graph: &graph, rank, alpha: 2.0 * rank as f32, start: None }, &train, &val, &base_head, &recipe, &cancel, &mut |_| {})
                    .unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let lora = report.lora.as_ref().unwrap().graph_inputs(&bundle.manifest).unwrap();
            let out = serde_json::json!({
                "side": "adaptd",
                "base": { "test": accuracy(&graph, &no_lora, &base_head, &test), "retention": accuracy(&graph, &no_lora, &base_head, &retention) },
                "lora": { "test": accuracy(&graph, &lora, &report.head, &test), "retention": accuracy(&graph, &lora, &report.head, &retention), "best_epoch": report.best_epoch, "seconds": seconds },
            });
            println!("{out}");
        }
        "text" => {
            let bundle = Bundle::open(bundle_dir("minilm")).unwrap();
            let graph = TrainingGraph::load(&bundle, tch::Device::Cpu).unwrap();
            let no_lora = adaptd_adapters::slots::no_adapter_inputs(&bundle.manifest);
            let split = |name: &str| examples(&st, &[&format!("{name}_ids"), &format!("{name}_mask")], &format!("{name}_y"));
            let (train, val, test, other_ref, other_test) = (split("train"), split("val"), split("test"), split("other_ref"), split("other_test"));
            let init = Head { layers: vec![Dense { weight: tensor(&st, "head_weight"), bias: tensor(&st, "head_bias") }] };
            // A head on the frozen backbone: what the daemon's head adapter does, on cached embeddings.
            let cached =
                |ex: &Examples| Examples { inputs: vec![embeddings(&graph, &no_lora, &ex.inputs)], labels: ex.labels.clone(), weights: ex.weights.clone() };
            let started = std::time::Instant::now();
            let head_only = fit(FitTarget::Head { device: tch::Device::Cpu }, &cached(&train), &cached(&val), &init, &recipe, &cancel, &mut |_| {}).unwrap();
            let head_seconds = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            let report =
                fit(FitTarget::Lora { graph: &graph, rank, alpha: 2.0 * rank as f32, start: None }, &train, &val, &init, &recipe, &cancel, &mut |_| {})
                    .unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let lora = report.lora.as_ref().unwrap().graph_inputs(&bundle.manifest).unwrap();
            let forgetting = |lora: &[HostTensor]| {
                centroid_accuracy(
                    &embeddings(&graph, lora, &other_ref.inputs),
                    &other_ref.labels,
                    &embeddings(&graph, lora, &other_test.inputs),
                    &other_test.labels,
                )
            };
            let out = serde_json::json!({
                "side": "adaptd",
                "head": { "test": head_accuracy(&head_only.head, &embeddings(&graph, &no_lora, &test.inputs), &test.labels), "other": forgetting(&no_lora), "seconds": head_seconds },
                "lora": { "test": accuracy(&graph, &lora, &report.head, &test), "other": forgetting(&lora), "best_epoch": report.best_epoch, "seconds": seconds },
            });
            println!("{out}");
        }
        "adapter" => {
            // One adapter kind (`--adapter lora|loreft`) + head on the intents of `text`, the
            // sideways digits of `quality` or a camera shift's frames, above the bundle's cut with
            // `--cut 1` (as the daemon trains): test accuracy, trainable parameters, the adapter's
            // tensor file bytes, samples/s over the whole job and the process's peak RSS.
            let rss_start = memory::rss();
            let ShiftTask { bundle, graph, train, val, test, init } = ShiftTask::load(&st, &bundle_dir, opts.contains_key("cut"));
            // The splits are copies: the file's bytes (400 MB of frames) are not the trainer's memory.
            drop(st);
            drop(bytes);
            let adapter = opt("adapter", "lora");
            let layers: Vec<String> = opt("layers", "").split(',').filter(|l| !l.is_empty()).map(String::from).collect();
            let positions = adaptd_daemon::adapt::parse_positions(&opt("positions", "f1+l1")).unwrap();
            let positions = bundle.manifest.reft.as_ref().and_then(|r| r.positions_input.as_ref()).map(|_| positions);
            let target = match adapter.as_str() {
                "lora" => FitTarget::Lora { graph: &graph, rank, alpha: 2.0 * rank as f32, start: None },
                "loreft" => FitTarget::Loreft { graph: &graph, rank, positions, layers: &layers, start: None },
                other => panic!("--adapter {other}: lora or loreft"),
            };
            let started = std::time::Instant::now();
            let report = fit(target, &train, &val, &init, &recipe, &cancel, &mut |_| {}).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let values = adaptd_adapters::slots::adapter_inputs(&bundle.manifest, report.lora.as_ref(), report.reft.as_ref()).unwrap();
            let params = report.lora.as_ref().map_or(0, |l| l.modules.iter().map(|m| m.a.len() + m.b.len()).sum::<usize>())
                + report.reft.as_ref().map_or(0, adaptd_adapters::ReftWeights::parameter_count);
            let out = serde_json::json!({
                "side": "adaptd", "adapter": adapter, "rank": rank, "test": accuracy(&graph, &values, &report.head, &test),
                "best_epoch": report.best_epoch, "params": params,
                "file_bytes": adaptd_adapters::files::slot_file_bytes(report.lora.as_ref(), report.reft.as_ref()).unwrap(),
                "seconds": seconds, "samples_per_second": (train.len() * epochs) as f64 / seconds,
                "peak_rss_bytes": memory::peak_rss(), "rss_start_bytes": rss_start,
            });
            println!("{out}");
        }
        "time-to-accuracy" => {
            // LoRA (query/value) + head on a minilm bundle (`--bundle DIR`, the reference one by
            // default); with `--cut`, above the bundle's cut. The curve: seconds since the job
            // started (the prefix's activations included) against validation accuracy, per epoch.
            let rss_start = memory::rss();
            let ShiftTask { bundle, graph, train, val, test, init } = ShiftTask::load(&st, &bundle_dir, opts.contains_key("cut"));
            let started = std::time::Instant::now();
            let keep = PrefixCache { keep: opts.contains_key("cached"), ..PrefixCache::default() };
            let target = || FitTarget::Lora { graph: &graph, rank, alpha: 2.0 * rank as f32, start: None };
            let report = fit_cached(target(), &train, &val, &init, &recipe, &keep, &cancel, &mut |_| {}).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            let peak_rss = memory::peak_rss();
            // With --cached, the same job again on the activations the first one kept (what the
            // daemon's next job on these samples does): its set-up time, and the same training.
            let cached = opts.contains_key("cached").then(|| {
                let p = report.prefix.clone().unwrap();
                let rows = |r: &[Option<Vec<f32>>]| r.iter().map(|d| d.clone().map(|data| CachedActivation { key: p.key.clone(), data })).collect();
                let cache = PrefixCache { train: rows(&p.train), validation: rows(&p.validation), keep: false };
                let started = std::time::Instant::now();
                let again = fit_cached(target(), &train, &val, &init, &recipe, &cache, &cancel, &mut |_| {}).unwrap();
                let setup = started.elapsed().as_secs_f64() - again.epochs.iter().map(|e| e.seconds).sum::<f64>();
                let same = again.epochs.iter().zip(&report.epochs).all(|(a, b)| (a.val_accuracy - b.val_accuracy).abs() < 1e-6);
                serde_json::json!({ "setup_seconds": setup, "reused": again.prefix.unwrap().reused, "same_curve": same,
                    "max_loss_diff": again.losses.iter().zip(&report.losses).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) })
            });
            // What the job spent outside its epochs (loading the data, the prefix's activations)
            // counts before the first epoch.
            let setup = seconds - report.epochs.iter().map(|e| e.seconds).sum::<f64>();
            let mut at = setup;
            let curve: Vec<(f64, f32)> = report
                .epochs
                .iter()
                .map(|e| {
                    at += e.seconds;
                    (at, e.val_accuracy)
                })
                .collect();
            let lora = report.lora.as_ref().unwrap().graph_inputs(&bundle.manifest).unwrap();
            let out = serde_json::json!({
                "side": "adaptd", "cut": bundle.manifest.cut.as_ref().filter(|_| graph.trains_above_cut()).map(|c| c.after.clone()),
                "curve": curve, "setup_seconds": setup, "seconds": seconds, "test": accuracy(&graph, &lora, &report.head, &test),
                "peak_rss_bytes": peak_rss, "rss_start_bytes": rss_start, "cached": cached,
            });
            println!("{out}");
        }
        other => panic!("unknown mode {other:?}"),
    }
}
