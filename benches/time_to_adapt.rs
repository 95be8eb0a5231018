#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! Time-to-adapt: from the broker's PUBACK of the last of 500 new labelled samples to a promoted
//! adapter serving, through a real Mosquitto and the daemon's own loop (`serve::run`): ingest,
//! embedding cache, scheduler, trainer, gate, promotion, hot-swap. Several runs, fresh state each;
//! medians and the breakdown from the daemon's own event timestamps.
//!
//!   cargo bench -p adaptd --bench time_to_adapt -- [--runs N] [--only head|lora] [--lora-bundle DIR]
//!
//! `--lora-bundle` replaces the minilm reference bundle of the lora case: a bundle exported with a
//! cut (`docs/bundle.md`) trains above it, as the shipped `training.above_cut` says.
//!
//! head: digits-cnn, a head on cached embeddings of sideways digits. lora: minilm, LoRA
//! (query/value) + head on operator commands. camera: efficientnet-lite0 on 500 JPEG frames of
//! the camera task, the shipped ladder (head, then LoRA above the cut). Both with the shipped defaults except the trigger
//! (500 new samples), a 200 ms scheduler tick and no CPU gate (the publisher shares the cores);
//! the head case also allows any retention drop, because a head alone cannot keep upright digits
//! while it learns sideways ones (the gate still measures and reports it).

// The tests' Mosquitto helper; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/broker.rs"]
mod broker;

use std::time::{Duration, Instant};

use adaptd::datasets::{Digits, ROBOT_INTENTS, Shift};
use adaptd_daemon::adapt::AdapterChoice;
use adaptd_daemon::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const SAMPLES: usize = 500;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Head,
    Lora,
    Camera,
}

fn samples(case: Case, run: usize) -> Vec<Vec<u8>> {
    match case {
        Case::Head => {
            let digits = Digits::load(&adaptd::paths::digits_data()).unwrap();
            let pool = digits.held_out();
            (0..SAMPLES)
                .map(|i| {
                    let d = pool[i % pool.len()];
                    json!({ "key": format!("r{run}:{i}"), "task": "bench", "label": digits.labels[d].to_string(), "input": { "shape": [1, 1, 8, 8], "data": digits.image(d, Shift::Rotate90) } })
                })
                .map(|v| v.to_string().into_bytes())
                .collect()
        }
        Case::Lora => (0..SAMPLES)
            .map(|i| {
                let (text, label) = ROBOT_INTENTS[i % ROBOT_INTENTS.len()];
                let text = format!("{text}, robot {}", i % 17);
                let intent = ["navigate", "manipulate", "status"][label as usize];
                json!({ "key": format!("r{run}:{i}"), "task": "bench", "label": intent, "text": text }).to_string().into_bytes()
            })
            .collect(),
        // The camera task's first 500 frames (the parts as commissioned, then the evening light),
        // as a camera publishes them: JPEG, base64 in JSON.
        Case::Camera => {
            use base64::Engine as _;
            let camera = adaptd::datasets::CameraFrames::load(&adaptd::paths::camera_data()).unwrap();
            (0..SAMPLES)
                .map(|i| {
                    let label = &camera.classes[camera.labels[i] as usize];
                    let image = base64::engine::general_purpose::STANDARD.encode(&camera.frames[i]);
                    json!({ "key": format!("r{run}:{i}"), "task": "bench", "label": label, "image": image }).to_string().into_bytes()
                })
                .collect()
        }
    }
}

#[allow(clippy::field_reassign_with_default)] // reads as "the defaults, except"
fn daemon_config(case: Case, port: u16, state: &std::path::Path, lora_bundle: Option<&std::path::Path>) -> Config {
    let mut c = Config::default();
    c.bundle = match (case, lora_bundle) {
        (Case::Head, _) => adaptd::paths::reference_bundle("digits-cnn"),
        (Case::Lora, Some(dir)) => dir.to_path_buf(),
        (Case::Lora, None) => adaptd::paths::reference_bundle("minilm"),
        (Case::Camera, _) => adaptd::paths::reference_bundle("efficientnet-lite0"),
    };
    c.state_dir = state.to_path_buf();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.host = "127.0.0.1".into();
    c.mqtt.port = port;
    c.mqtt.device_id = "bench".into();
    c.ingest.tasks = vec!["bench".into()];
    c.schedule.trigger.min_new_samples = SAMPLES as u64;
    c.schedule.tick = std::time::Duration::from_millis(200);
    c.schedule.limits.max_cpu_percent = 100.0;
    c.schedule.limits.min_available_mb = 0;
    match case {
        // Each of these times its own recipe: no escalation to the next one.
        Case::Head | Case::Lora => {
            c.training.adapter = if case == Case::Head { AdapterChoice::Head } else { AdapterChoice::Lora };
            c.training.escalate = false;
        }
        // The shipped ladder, as a camera user gets it: a head, then LoRA above the cut while
        // validation is below escalate_until.
        Case::Camera => {}
    }
    if case == Case::Head {
        c.gate.max_retention_drop = 1.0;
    }
    c
}

/// Publish everything at QoS 1; returns when the last PUBACK arrived.
async fn publish(port: u16, items: Vec<Vec<u8>>) -> Instant {
    let mut options = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let total = items.len();
    tokio::spawn(async move {
        for item in items {
            client.publish("adaptd/v1/bench/samples/bench", QoS::AtLeastOnce, false, item).await.unwrap();
        }
    });
    let mut acked = 0;
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("broker connection") {
            acked += 1;
            if acked == total {
                return Instant::now();
            }
        }
    }
}

/// The daemon's events, as they arrive.
async fn events(port: u16, tx: tokio::sync::mpsc::UnboundedSender<(Instant, Value)>) {
    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("bench-events", "127.0.0.1", port), 64);
    client.subscribe("adaptd/v1/bench/events", QoS::AtLeastOnce).await.unwrap();
    while let Ok(event) = eventloop.poll().await {
        if let Event::Incoming(Packet::Publish(p)) = event
            && let Ok(v) = serde_json::from_slice(&p.payload)
            && tx.send((Instant::now(), v)).is_err()
        {
            return;
        }
    }
}

struct Run {
    total_s: f64,
    wait_s: f64,
    train_s: f64,
    gate_s: f64,
    promoted: bool,
}

async fn run_once(case: Case, run: usize, lora_bundle: Option<&std::path::Path>) -> Run {
    let broker = broker::Mosquitto::start();
    let state = tempfile::tempdir().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let daemon = tokio::spawn(adaptd_daemon::serve::run(
        daemon_config(case, broker.port, state.path(), lora_bundle),
        None,
        async {
            let _ = stopped.await;
        },
        Some(bound_tx),
    ));
    let addr = bound_rx.await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(events(broker.port, tx));
    tokio::time::sleep(Duration::from_millis(500)).await; // subscriptions in place
    let last_ack = publish(broker.port, samples(case, run)).await;
    let mut times = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let promoted = loop {
        let Ok(Some((at, e))) = tokio::time::timeout_at(deadline, rx.recv()).await else { break false };
        let kind = e["event"].as_str().unwrap_or("").to_string();
        times.entry(kind.clone()).or_insert(at);
        match kind.as_str() {
            "promoted" => break true,
            "gate_decision" if e["promote"] != true => {
                eprintln!("  gate refused: {}", e["summary"]);
                break false;
            }
            "training_failed" | "training_deferred" => {
                eprintln!("  {kind}: {}", e["reason"]);
                break false;
            }
            _ => {}
        }
    };
    // Serving: the next request is answered by the new version.
    let client = adaptd::client::Client::new(addr);
    let body = match case {
        Case::Head => json!({ "inputs": { "image": { "shape": [1, 1, 8, 8], "data": vec![0.0; 64] } } }),
        Case::Lora => json!({ "text": ["go to the dock"] }),
        Case::Camera => json!({ "inputs": { "image": { "shape": [1, 3, 224, 224], "data": vec![0.0; 3 * 224 * 224] } } }),
    };
    let serving = client.post("/v1/tasks/bench/predict", Some(&body)).unwrap();
    let served = serving.body["predictions"][0]["adapter_version"].as_u64() == Some(1);
    let done = Instant::now();
    let since = |k: &str| times.get(k).map_or(f64::NAN, |t: &Instant| t.saturating_duration_since(last_ack).as_secs_f64());
    let _ = stop.send(());
    let _ = daemon.await;
    Run {
        total_s: done.duration_since(last_ack).as_secs_f64(),
        wait_s: since("training_started"),
        train_s: since("training_finished") - since("training_started"),
        gate_s: since("promoted") - since("training_finished"),
        promoted: promoted && served,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let runs: usize = args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|n| n.parse().ok()).unwrap_or(3);
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let lora_bundle = args.iter().position(|a| a == "--lora-bundle").and_then(|i| args.get(i + 1)).map(std::path::PathBuf::from);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for (name, case, target) in [("head", Case::Head, Some(5.0)), ("lora", Case::Lora, None), ("camera", Case::Camera, Some(60.0))] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let results: Vec<Run> = (0..runs).map(|r| runtime.block_on(run_once(case, r, lora_bundle.as_deref()))).collect();
        for (i, r) in results.iter().enumerate() {
            println!(
                "{name} run {}: {:.2} s to a promoted adapter serving (waiting for the scheduler {:.2} s, training {:.2} s, gate + promotion {:.2} s){}",
                i + 1,
                r.total_s,
                r.wait_s,
                r.train_s,
                r.gate_s,
                if r.promoted { "" } else { " — NOT PROMOTED" }
            );
        }
        let m = median(results.iter().map(|r| r.total_s).collect());
        let target = target.map(|t| format!(" (target <= {t:.0} s)")).unwrap_or_default();
        println!(
            "time-to-adapt, {name}, {SAMPLES} samples over Mosquitto: median {m:.2} s of {runs}{target}; promoted in {}/{runs}\n",
            results.iter().filter(|r| r.promoted).count()
        );
    }
}
