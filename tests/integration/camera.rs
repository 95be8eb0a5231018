//! The camera model through the whole loop: a parts-sorting station's camera frames (320x240
//! JPEG, base64 in JSON, as `mosquitto_pub` sends them) arrive over a real Mosquitto; ingest
//! decodes, resizes and crops them to EfficientNet-Lite0's 224x224 and keeps the bytes; the
//! scheduler starts a job; LoRA trains the pointwise convolutions above the cut on activations the
//! frozen prefix computed once; the gate evaluates the candidate through the engine and promotes
//! it; the engine then answers held-out frames sent as JPEG over HTTP.

use std::time::Duration;

use adaptd::datasets::CameraFrames;
use adaptd_daemon::samples::{SampleInput, SampleStore, Split};
use base64::Engine as _;
use serde_json::Value;

use crate::adapt::{Running, http, publish, shut_down, start_daemon_with};

/// Frames per class the device learns from, and frames per class held out for the check.
const TRAIN_PER_CLASS: usize = 8;
const TEST_PER_CLASS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_learns_the_camera_task_from_jpeg_frames_over_mqtt_and_the_gate_promotes_it() {
    let camera = CameraFrames::load(&adaptd::paths::camera_data()).expect("the set-up made the camera task's frames");
    let classes = camera.classes.len();
    let base = camera.of_domain("base");
    // Frame i of a domain is of class i % 12: the first frames hold every class alike.
    let (train, test) = (&base[..TRAIN_PER_CLASS * classes], &base[TRAIN_PER_CLASS * classes..(TRAIN_PER_CLASS + TEST_PER_CLASS) * classes]);
    let lines: Vec<String> = train
        .iter()
        .map(|&i| {
            let image = base64::engine::general_purpose::STANDARD.encode(&camera.frames[i]);
            let label = &camera.classes[camera.labels[i] as usize];
            format!(r#"{{"key": "cam-1:{i}", "task": "parts", "label": "{label}", "image": "{image}"}}"#)
        })
        .collect();
    let Running { broker, state, events, base: url, stop, daemon } = start_daemon_with("parts", train.len() as u64, |c| {
        c.bundle = crate::reference_bundle("efficientnet-lite0");
        // No retention set or base classifier: the parts are the task's own labels.
        c.training.replay_fraction = 0.0;
        c.gate.max_retention_drop = 0.02;
        // One LoRA rung, briefly (the shift suite runs the shipped ladder): the job's shape is
        // under test here, not how far it climbs.
        c.training.escalate = false;
        c.training.recipe.max_epochs = 4;
        // A fifth held out: the gate wants 10 holdout samples, and 96 frames give about 19.
        c.ingest.split.holdout_percent = 20;
    })
    .await;
    let port = broker.port;
    let frames: Vec<Vec<u8>> = test.iter().map(|&i| camera.frames[i].clone()).collect();
    let truth: Vec<String> = test.iter().map(|&i| camera.classes[camera.labels[i] as usize].clone()).collect();
    let base_url = url.clone();
    let (decision, answers) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500)); // ingest subscribes
        publish(port, "adaptd/v1/robot-3/samples/parts", &lines);
        let decision = events.wait_for("gate_decision", Duration::from_secs(240));
        if decision["promote"] == true {
            events.wait_for("promoted", Duration::from_secs(20));
        }
        let dir = tempfile::tempdir().unwrap();
        let answers: Vec<Value> = frames
            .iter()
            .enumerate()
            .map(|(n, jpeg)| {
                let path = dir.path().join(format!("{n}.jpg"));
                std::fs::write(&path, jpeg).unwrap();
                let out = std::process::Command::new("curl")
                    .args(["-s", "-H", "content-type: image/jpeg", "--data-binary", &format!("@{}", path.display())])
                    .arg(format!("{base_url}/v1/tasks/parts/predict"))
                    .output()
                    .unwrap();
                serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
            })
            .collect();
        (decision, answers)
    })
    .await
    .unwrap();

    // The gate's decision is right for its own figures: the first adapter of a task with no
    // incumbent is promoted when every check passes, and the checks say so.
    eprintln!("camera gate: {} (trained in {} s)", decision["summary"], decision["training"]["seconds"]);
    let checks = decision["checks"].as_array().unwrap();
    assert_eq!(decision["promote"], checks.iter().all(|c| c["passed"] == true), "{decision}");
    assert_eq!(decision["promote"], true, "{decision}");
    assert_eq!(decision["kind"], "lora", "{decision}");
    let (_, status) = http("GET", &format!("{url}/v1/tasks/parts/status"));
    assert_eq!(status["serving_version"], 1, "{status}");

    // Frames it never saw, sent as the camera's JPEG: answered by the promoted adapter, far
    // above the 1-in-12 of chance (ImageNet features and a few labels already tell most parts apart).
    let right = answers.iter().zip(&truth).filter(|(a, t)| a["predictions"][0]["label"].as_str() == Some(t.as_str())).count();
    assert!(answers.iter().all(|a| a["predictions"][0]["adapter"] == "parts@v1"), "{:?}", answers.first());
    let accuracy = right as f64 / truth.len() as f64;
    eprintln!("camera: {right} of {} held-out frames right", truth.len());
    assert!(accuracy >= 0.4, "held-out accuracy {accuracy}");

    shut_down(stop, daemon).await;
    // What the store kept of each frame: its 224x224 RGB bytes, not the JPEG nor f32 values.
    let store = SampleStore::open(&state.path().join("samples.db"), adaptd_daemon::samples::SplitPolicy::default()).unwrap();
    let kept = store.load("parts", Split::Train).unwrap();
    assert!(!kept.is_empty());
    for s in &kept {
        let SampleInput::Image(p) = &s.sample.input else { panic!("a camera sample is kept as an image: {:?}", s.sample.key) };
        assert_eq!((p.height, p.width, p.channels, p.data.len()), (224, 224, 3, 150_528));
    }
    drop(broker);
}
