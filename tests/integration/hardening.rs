//! Hostile input, as an attacker sends it: every path refuses it with a reason, fast, with
//! bounded memory, and keeps serving; poison over MQTT is acknowledged, so it never blocks the
//! stream behind it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use std::time::{Duration, Instant};

use adaptd_adapters::Bundle;
use adaptd_daemon::api::wire;
use adaptd_daemon::ingest::decode::{SampleSchema, decode_sample};
use adaptd_daemon::samples::{SampleStore, SplitPolicy};

use crate::broker::Mosquitto;
use crate::reference_bundle;

fn digit_sample(key: &str) -> String {
    let data: Vec<String> = (0..64).map(|i| format!("{:.3}", (i % 9) as f32 / 8.0)).collect();
    format!("{{\"key\": \"{key}\", \"task\": \"sorter\", \"label\": \"left\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}", data.join(","))
}

const OVERFLOWING: &str = "[4294967296, 4294967296, 1, 1]";

#[test]
fn overflowing_shapes_and_image_bombs_are_refused_fast() {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let manifest = &bundle.manifest;
    let tasks = vec!["sorter".to_string()];
    let schema = SampleSchema { manifest, tasks: &tasks, max_bytes: 1 << 20 };

    // A shape whose element count overflows: "attempt to multiply with overflow" before.
    let sample = digit_sample("a:1").replace("[1, 1, 8, 8]", OVERFLOWING);
    let e = decode_sample(sample.as_bytes(), &schema, 0).unwrap_err();
    assert_eq!(e.error_type(), "bad_input", "{e}");
    assert!(e.to_string().contains("4294967296"), "says which shape: {e}");
    // Messages that misled: an empty payload, an integer label past 64 bits.
    let e = decode_sample(b"", &schema, 0).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = decode_sample(digit_sample("a:2").replace("\"left\"", "123456789012345678901234567890").as_bytes(), &schema, 0).unwrap_err();
    assert!(e.to_string().contains("as a string") && !e.to_string().contains("e29"), "{e}");
    let request = format!("{{\"inputs\": {{\"image\": {{\"shape\": {OVERFLOWING}, \"data\": [0]}}}}}}");
    let e = wire::decode(request.as_bytes(), Some("application/json"), manifest, None, 1 << 20).unwrap_err();
    assert_eq!(e.error_type(), "bad_input", "{e}");

    // A 20000x20000 PNG in 80 bytes, as a sample (base64 and compact forms) and as a request.
    let bomb = crate::chaos::png_bomb(20_000);
    assert!(bomb.len() < 100);
    let started = Instant::now();
    use base64::Engine as _;
    let json =
        format!("{{\"key\": \"b:1\", \"task\": \"sorter\", \"label\": \"left\", \"image\": \"{}\"}}", base64::engine::general_purpose::STANDARD.encode(&bomb));
    let e = decode_sample(json.as_bytes(), &schema, 0).unwrap_err();
    assert_eq!(e.error_type(), "bad_image", "{e}");
    assert!(e.to_string().contains("1024x1024"), "says what is taken: {e}");
    assert!(e.to_string().contains("too large") && !e.to_string().contains("does not decode"), "says it is a size refusal: {e}");
    let e = wire::decode(&bomb, Some("image/png"), manifest, None, 1 << 20).unwrap_err();
    assert_eq!(e.error_type(), "bad_input", "{e}");
    assert!(e.to_string().contains("20000"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(500), "refused from the header, not after decoding: {:?}", started.elapsed());
    // An honest photo larger than the model's input still goes through.
    let mut photo = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_pixel(640, 480, image::Luma([200])).write_to(&mut photo, image::ImageFormat::Png).unwrap();
    let inputs = wire::decode(photo.get_ref(), Some("image/png"), manifest, None, 1 << 20).unwrap();
    assert_eq!(inputs[0].shape, vec![1, 1, 8, 8]);
}

/// A sample far over the limit broke the connection before it was decoded, was never acked,
/// and came back first on every reconnect: nothing after it was ever stored. Now it is read
/// once, refused as too large, acked, and the stream behind it flows; a sample whose shape
/// overflowed panicked the ingest task, which then came back and panicked on the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_over_mqtt_is_refused_acked_and_the_stream_behind_it_flows() {
    let broker = Mosquitto::start();
    // 16 KiB: the sample limit, and with it the link's read limit.
    let running = crate::ingest::start_ingest_into(broker.port, "adaptd-ingest-poison", 16 * 1024, tempfile::tempdir().unwrap());
    let (store, stats, events_topic) = (running.store.clone(), running.stats.clone(), running.events_topic.clone());
    let dir = running.dir.path().to_path_buf();
    let port = broker.port;
    let big = dir.join("big.json");
    // 5 MB: over the 16 KiB sample limit and the read limit derived from it.
    std::fs::write(&big, digit_sample("big:1").replace("\"label\"", &format!("\"source\": \"{}\", \"label\"", "x".repeat(5 << 20)))).unwrap();
    let overflow = digit_sample("overflow:1").replace("[1, 1, 8, 8]", OVERFLOWING);
    let events = tokio::task::spawn_blocking(move || {
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", &events_topic, "-C", "3", "-W", "30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let pub_args = ["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter"].map(str::to_string);
        let ok = Command::new("mosquitto_pub").args(&pub_args).args(["-f", big.to_str().unwrap()]).status().unwrap();
        assert!(ok.success());
        let mut p = Command::new("mosquitto_pub").args(&pub_args).arg("-l").stdin(Stdio::piped()).spawn().unwrap();
        let mut lines = vec![overflow];
        lines.extend((0..50).map(|i| digit_sample(&format!("after:{i}"))));
        // The same key again with another label: the first stands, and the sender hears why.
        lines.push(digit_sample("after:7").replace("\"left\"", "\"right\""));
        p.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
        assert!(p.wait().unwrap().success());
        String::from_utf8(sub.wait_with_output().unwrap().stdout).unwrap()
    })
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.stored.load(Ordering::Relaxed) < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.stored.load(Ordering::Relaxed), 50, "everything behind the poison is stored");
    let refused = stats.refused();
    assert_eq!((refused.get("too_large"), refused.get("bad_input"), refused.get("conflicting_label")), (Some(&1), Some(&1), Some(&1)), "{refused:?}");
    assert_eq!(store.lock().unwrap().get("after:7").unwrap().unwrap().sample.label, "left");
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0, "a conflict is a refusal, not also a duplicate; a redelivery is not a sender's duplicate");
    let parts = running.parts.clone();
    assert_eq!(parts.get("ingest").map(|s| s.restarts), Some(0), "nothing panicked");
    assert!(events.contains("too_large") && events.contains("5243"), "the refusal is announced with the size: {events}");
    assert!(events.contains("conflicting_label") && events.contains("sorter/right"), "{events}");
    assert!(stats.connected.load(Ordering::Relaxed) && parts.get("ingest").unwrap().up);
    running.stop().await;

    // Acknowledged: a new session under the same client id gets none of it redelivered.
    let again = crate::ingest::start_ingest_into(broker.port, "adaptd-ingest-poison", 16 * 1024, tempfile::tempdir().unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((again.stats.stored.load(Ordering::Relaxed), again.stats.refused().len()), (0, 0), "nothing was left unacknowledged");
    again.stop().await;
}

/// A deleted `-wal` file loses what it held; the store says so when it opens.
#[test]
fn a_deleted_write_ahead_log_is_reported_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("samples.db");
    drop(SampleStore::open(&db, SplitPolicy::default()).unwrap());
    // A writer that dies without closing (another process, as a crash is): its -wal and -shm stay.
    let script = format!(
        "import os, sqlite3\nc = sqlite3.connect({:?})\nc.execute('PRAGMA journal_mode=WAL')\nc.execute(\"INSERT INTO labels (task, label, first_seen_ms) VALUES ('sorter', 'left', 1)\")\nc.commit()\nos._exit(0)\n",
        db.to_str().unwrap()
    );
    assert!(Command::new("python3").args(["-c", &script]).status().unwrap().success());
    assert!(dir.path().join("samples.db-wal").exists() && dir.path().join("samples.db-shm").exists());
    let store = SampleStore::open(&db, SplitPolicy::default()).unwrap();
    assert!(!store.lost_wal(), "a crash alone loses nothing: SQLite replays the log");
    assert_eq!(store.labels("sorter").unwrap(), vec!["left"]);
    drop(store);
    assert!(Command::new("python3").args(["-c", &script.replace("'left'", "'right'")]).status().unwrap().success());
    std::fs::remove_file(dir.path().join("samples.db-wal")).unwrap();
    let store = SampleStore::open(&db, SplitPolicy::default()).unwrap();
    assert!(store.lost_wal(), "the missing log is noticed");
    assert_eq!(store.labels("sorter").unwrap(), vec!["left"], "what the log held is gone");
    drop(store);
    assert!(!SampleStore::open(&db, SplitPolicy::default()).unwrap().lost_wal(), "a clean close since: nothing more to say");
}

/// TLS files that are not there (not yet provisioned, or mid-rotation) do not stop the daemon:
/// it serves, shows ingest waiting for the broker, and its MQTT link retries reading them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tls_files_leave_ingest_waiting_while_serving_goes_on() {
    let state = tempfile::tempdir().unwrap();
    let mut config = crate::serve_config(reference_bundle("digits-cnn"), state.path());
    (config.mqtt.host, config.mqtt.port) = ("127.0.0.1".into(), crate::broker::free_port());
    config.mqtt.tls_ca_file = state.path().join("gone-ca.pem");
    config.mqtt.inference_api = false;
    config.ingest.tasks = vec!["sorter".into()];
    let (stop, addr, daemon) = crate::serve_in_process(config).await;
    let client = adaptd::client::Client::new(addr);
    let (ready, metrics, answer) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(800));
        let ready = client.request_text("GET", "/readyz").unwrap();
        let (_, metrics) = client.request_text("GET", "/metrics").unwrap();
        let body = format!("{{\"inputs\": {{\"image\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}}}", vec!["0.5"; 64].join(","));
        (ready, metrics, client.request("POST", "/v1/tasks/sorter/predict", Some(body.as_bytes())).unwrap())
    })
    .await
    .unwrap();
    assert!(ready.0 == 200 && ready.1.contains("ingest: waiting for the broker"), "{ready:?}");
    assert!(metrics.lines().any(|l| l == "adaptd_ingest_connected 0") && metrics.lines().any(|l| l == "adaptd_part_up{part=\"ingest\"} 1"), "{metrics}");
    assert_eq!(answer.status, 200, "serving goes on: {:?}", answer.body);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), daemon).await.expect("stops in time").unwrap().unwrap();
}

/// The sample store fails under ingest (here: another process holds its write lock past the
/// busy timeout). Ingest stops with the unacknowledged batch, shows as down, is restarted with
/// backoff, and the link reconnects so the broker redelivers that batch: every sample the
/// broker took lands, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_restarts_ingest_and_the_broker_redelivers_what_it_held() {
    let broker = Mosquitto::start();
    let running = crate::ingest::start_ingest_into(broker.port, "adaptd-ingest-store-fails", 16 * 1024, tempfile::tempdir().unwrap());
    let (store, stats, parts) = (running.store.clone(), running.stats.clone(), running.parts.clone());
    let db = running.dir.path().join("samples.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats.connected.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "ingest did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the store's 5 s busy timeout.
    let script = format!(
        "import sqlite3, sys, time\nc = sqlite3.connect({:?}, isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(7)\nc.execute('COMMIT')\n",
        db.to_str().unwrap()
    );
    let mut locker = Command::new("python3").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(locker.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let lines: Vec<String> = (0..40).map(|i| digit_sample(&format!("held:{i}"))).collect();
    crate::adapt::publish(broker.port, "adaptd/v1/robot-7/samples/sorter", &lines); // the broker took every sample

    let deadline = Instant::now() + Duration::from_secs(10);
    while parts.get("ingest").unwrap().up {
        assert!(Instant::now() < deadline, "ingest did not stop on the store's error");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(locker.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.stored.load(Ordering::Relaxed) < 40 {
        assert!(Instant::now() < deadline, "redelivered samples not stored: {} of 40", stats.stored.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.lock().unwrap().len().unwrap(), 40, "each sample once");
    let ingest = parts.get("ingest").unwrap();
    assert!(ingest.restarts >= 1 && ingest.up, "{ingest:?}");
    running.stop_after_restarts().await;
}

/// A promotion that a crash interrupted after its pointer moved: the version serves, and its
/// `promoted` record, never written, is written at the next start, marked as recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_promotion_is_announced_at_the_next_start() {
    let state = tempfile::tempdir().unwrap();
    {
        let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
        let store = adaptd_adapters::AdapterStore::open(state.path().join("adapters")).unwrap();
        let (registry, _) = adaptd_daemon::registry::Registry::open(bundle, store, 5).unwrap();
        registry.promote(crate::head_adapter(registry.bundle(), "sorter", 1, 1)).unwrap(); // then the crash: no event, no journal
    }
    let mut config = crate::serve_config(reference_bundle("digits-cnn"), state.path());
    config.ingest.tasks = vec!["sorter".into()];
    let (stop, _, daemon) = crate::serve_in_process(config).await;
    let journal = state.path().join("journal/sorter.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !journal.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), daemon).await.expect("stops").unwrap().unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&journal).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (records[0]["event"].as_str(), records[0]["version"].as_u64(), records[0]["recovered"].as_bool()),
        (Some("promoted"), Some(1), Some(true)),
        "{records:?}"
    );
}
