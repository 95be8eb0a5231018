//! Ingest through a real Mosquitto broker: valid samples land exactly once, poison is refused
//! with a reason, counted, announced on the events topic, and does not block the stream.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adaptd::ingest::{self, IngestConfig, IngestStats};
use adaptd::samples::{SampleInput, SampleStore, SplitPolicy};
use adaptd_adapters::Bundle;
use tokio::sync::oneshot;

use crate::broker::Mosquitto;
use crate::reference_bundle;

fn digit_sample(key: &str, task: &str, label: &str) -> String {
    let data: Vec<String> = (0..64).map(|i| format!("{:.3}", (i % 9) as f32 / 8.0)).collect();
    format!("{{\"key\": \"{key}\", \"task\": \"{task}\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}, \"source\": \"robot-7\"}}", data.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_land_once_and_poison_is_refused_with_reasons() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Mutex::new(SampleStore::open(&dir.path().join("samples.db"), SplitPolicy::default()).unwrap()));
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let stats = Arc::new(IngestStats::default());
    let config = IngestConfig {
        host: "127.0.0.1".into(),
        port: broker.port,
        client_id: "adaptd-ingest-test".into(),
        topic_prefix: "adaptd/v1".into(),
        device_id: "robot-7".into(),
        max_batch: 64,
        max_payload_bytes: 16 * 1024,
    };
    let events_topic = config.events_topic();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ingest::run(config, store.clone(), Arc::new(bundle.manifest.clone()), Arc::new(vec!["sorter".into()]), stats.clone(), async { let _ = stopped.await; }));

    let poison: Vec<(String, &str)> = vec![
        ("{\"key\": \"x\", ".into(), "bad_json"),
        (digit_sample("p:1", "sorter", "left").replace("\"source\"", "\"colour\""), "bad_json"),
        (digit_sample("p:2", "sorter", "left").replace("[1, 1, 8, 8]", "[1, 1, 4, 16]"), "bad_input"),
        (digit_sample("p:3", "sorter", "left").replace("\"data\": [0.000", "\"data\": [1e999"), "bad_json"),
        (digit_sample("p:4", "nobody", "left"), "unknown_task"),
        (digit_sample("p:5", "sorter", "left").replace("\"label\": \"left\"", "\"label\": {\"a\": 1}"), "bad_field"),
        (digit_sample("p:6", "sorter", "left").replace("\"key\": \"p:6\"", "\"key\": \"\""), "bad_field"),
    ];
    // Wait for ingest's subscription, then stream: valid samples, a duplicate of each tenth, poison.
    let port = broker.port;
    let events = tokio::task::spawn_blocking(move || {
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", &events_topic, "-C", &poison.len().to_string(), "-W", "30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let mut lines = Vec::new();
        for i in 0..200 {
            lines.push(digit_sample(&format!("robot-7:{i}"), "sorter", ["left", "right", "stop"][i % 3]));
            if i % 10 == 0 {
                lines.push(digit_sample(&format!("robot-7:{i}"), "sorter", "left"));
            }
            if i % 30 == 0
                && let Some((p, _)) = poison.get(i / 30)
            {
                lines.push(p.clone());
            }
        }
        let mut publish = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        publish.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
        assert!(publish.wait().unwrap().success());
        let out = sub.wait_with_output().unwrap();
        (String::from_utf8(out.stdout).unwrap(), poison.iter().map(|p| p.1).collect::<Vec<_>>())
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.stored.load(Ordering::Relaxed) < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.stored.load(Ordering::Relaxed), 200, "every valid sample stored");
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 20, "each duplicate recognised");
    let (event_lines, expected) = events;
    let mut want = std::collections::BTreeMap::new();
    for r in &expected {
        *want.entry(*r).or_insert(0u64) += 1;
    }
    assert_eq!(stats.refused(), want);
    let reasons: Vec<String> = event_lines.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons.len(), expected.len(), "one event per refusal: {event_lines}");
    assert!(event_lines.contains("[1, 1, 4, 16]") && event_lines.contains("nobody"), "events say why: {event_lines}");

    let store = store.lock().unwrap();
    assert_eq!(store.len().unwrap(), 200);
    assert_eq!(store.labels("sorter").unwrap(), vec!["left", "right", "stop"]);
    let s = store.get("robot-7:4").unwrap().unwrap();
    assert_eq!(s.sample.label, "right", "the first delivery's label, not the duplicate's");
    assert!(matches!(&s.sample.input, SampleInput::Tensor(t) if t.shape == vec![1, 1, 8, 8]));
    drop(store);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
