#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! Time-to-adapt: from the broker's PUBACK of the last of 500 new labelled samples to the first
//! improvement serving and to the job's final adapter, through a real Mosquitto and the daemon's
//! own loop (`serve::run`): ingest, embedding cache, scheduler, trainer, gate, promotion,
//! hot-swap. Several runs, fresh state each; medians, and each step from the daemon's own events.
//!
//!   cargo bench -p adaptd --bench time_to_adapt -- [--runs N] [--only digits|minilm|camera] [--lora-bundle DIR]
//!
//! `--lora-bundle` replaces the minilm reference bundle: a bundle exported with a cut
//! (`docs/bundle.md`) trains above it, as the shipped `training.above_cut` says.
//!
//! The shipped defaults throughout (a head, then LoRA while validation asks for more, each step
//! promoted as the gate passes it), except the trigger (500 new samples), a 200 ms scheduler
//! tick and no CPU gate (the publisher shares the cores). digits: digits-cnn on sideways digits.
//! minilm: operator commands. camera: efficientnet-lite0 on 500 JPEG frames of the camera task
//! (the parts as commissioned, then the evening light).

// The tests' Mosquitto helper; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../tests/integration/broker.rs"]
mod broker;

use std::time::{Duration, Instant};

use adaptd::datasets::{Digits, ROBOT_INTENTS, Shift};
use adaptd_daemon::config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const SAMPLES: usize = 500;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Digits,
    Minilm,
    Camera,
}

fn samples(case: Case, run: usize) -> Vec<Vec<u8>> {
    match case {
        Case::Digits => {
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
        Case::Minilm => (0..SAMPLES)
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
        (Case::Digits, _) => adaptd::paths::reference_bundle("digits-cnn"),
        (Case::Minilm, Some(dir)) => dir.to_path_buf(),
        (Case::Minilm, None) => adaptd::paths::reference_bundle("minilm"),
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
    /// From the last PUBACK: the job's start, its first promotion, and its end (the final adapter).
    wait_s: f64,
    first_s: f64,
    final_s: f64,
    /// Each step that met the gate: its kind, when it was decided, and whether it serves.
    steps: Vec<(String, f64, bool)>,
    /// The final adapter serves the next request.
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
    let since = |t: Instant| t.saturating_duration_since(last_ack).as_secs_f64();
    let (mut started, mut first, mut steps) = (f64::NAN, f64::NAN, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    // The job's end: what serves then, or nothing.
    let finished = loop {
        let Ok(Some((at, e))) = tokio::time::timeout_at(deadline, rx.recv()).await else { break None };
        match e["event"].as_str().unwrap_or("") {
            "training_started" if started.is_nan() => started = since(at),
            "promoted" if first.is_nan() => first = since(at),
            "gate_decision" => {
                if e["promote"] != true {
                    eprintln!("  gate refused v{}: {}", e["version"], e["summary"]);
                }
                steps.push((e["kind"].as_str().unwrap_or("?").to_string(), since(at), e["promote"] == true));
            }
            "training_failed" | "training_deferred" => eprintln!("  {}: {}", e["event"], e["reason"]),
            "job_finished" => break Some((since(at), e["serving_version"].as_u64().unwrap_or(0))),
            _ => {}
        }
    };
    // Serving: the next request is answered by the final version.
    let client = adaptd::client::Client::new(addr);
    let body = match case {
        Case::Digits => json!({ "inputs": { "image": { "shape": [1, 1, 8, 8], "data": vec![0.0; 64] } } }),
        Case::Minilm => json!({ "text": ["go to the dock"] }),
        Case::Camera => json!({ "inputs": { "image": { "shape": [1, 3, 224, 224], "data": vec![0.0; 3 * 224 * 224] } } }),
    };
    let serving = client.post("/v1/tasks/bench/predict", Some(&body)).unwrap();
    let served = serving.body["predictions"][0]["adapter_version"].as_u64();
    let _ = stop.send(());
    let _ = daemon.await;
    let (final_s, version) = finished.unwrap_or((f64::NAN, 0));
    Run { wait_s: started, first_s: first, final_s, steps, promoted: version > 0 && served == Some(version) }
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
    // Goals: the first improvement serving within 5 s on digits and MiniLM (whose final adapter
    // within 20 s), and within 60 s on the camera model (500 frames to embed first).
    for (name, case, first_goal, final_goal) in
        [("digits", Case::Digits, 5.0, None), ("minilm", Case::Minilm, 5.0, Some(20.0)), ("camera", Case::Camera, 60.0, None)]
    {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let results: Vec<Run> = (0..runs).map(|r| runtime.block_on(run_once(case, r, lora_bundle.as_deref()))).collect();
        for (i, r) in results.iter().enumerate() {
            let steps: Vec<String> =
                r.steps.iter().map(|(kind, at, promoted)| format!("{kind} at {at:.1} s{}", if *promoted { " (promoted)" } else { " (refused)" })).collect();
            println!(
                "{name} run {}: first promotion {:.2} s, final adapter {:.2} s (the job started {:.2} s after the last ack; gated: {}){}",
                i + 1,
                r.first_s,
                r.final_s,
                r.wait_s,
                steps.join(", "),
                if r.promoted { "" } else { " — NOT PROMOTED" }
            );
        }
        let first = median(results.iter().map(|r| r.first_s).collect());
        let last = median(results.iter().map(|r| r.final_s).collect());
        let final_goal = final_goal.map(|t| format!(" (goal <= {t:.0} s)")).unwrap_or_default();
        println!(
            "time-to-adapt, {name}, {SAMPLES} samples over Mosquitto, shipped defaults: first promotion median {first:.2} s (goal <= {first_goal:.0} s), \
             final adapter median {last:.2} s{final_goal} of {runs}; the final adapter serving in {}/{runs}\n",
            results.iter().filter(|r| r.promoted).count()
        );
    }
}
