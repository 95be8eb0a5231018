//! Ingest through a real Mosquitto broker: valid samples land exactly once, poison is refused
//! with a reason, counted, announced on the events topic, and does not block the stream.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adaptd_adapters::Bundle;
use adaptd_daemon::ingest::{Ingest, IngestConfig, IngestStats};
use adaptd_daemon::mqtt::{BrokerConnection, Link, LinkConfig};
use adaptd_daemon::samples::{SampleInput, SampleStore, SplitPolicy};

use crate::broker::Mosquitto;
use crate::reference_bundle;

fn digit_sample(key: &str, task: &str, label: &str) -> String {
    let data: Vec<String> = (0..64).map(|i| format!("{:.3}", (i % 9) as f32 / 8.0)).collect();
    format!(
        "{{\"key\": \"{key}\", \"task\": \"{task}\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}, \"source\": \"robot-7\"}}",
        data.join(",")
    )
}

/// Ingest for the digits bundle's `sorter` task from the broker at `port`, into a fresh store:
/// the daemon's own parts (its MQTT link, ingest under its supervisor).
pub struct RunningIngest {
    pub dir: tempfile::TempDir,
    pub store: Arc<Mutex<SampleStore>>,
    pub stats: Arc<IngestStats>,
    /// Whether ingest is up, and its restarts (as `/readyz` and `/metrics` read them).
    pub parts: Arc<adaptd_daemon::app::Parts>,
    pub events_topic: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningIngest {
    /// Stop ingest, then the link, as the daemon does; nothing may have failed on the way.
    pub async fn stop(self) {
        assert_eq!(self.parts.get("ingest").map(|s| s.restarts), Some(0), "ingest never stopped on an error or a panic");
        self.stop_after_restarts().await;
    }

    /// Stop, where restarts were the point.
    pub async fn stop_after_restarts(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("stops in time").unwrap();
    }
}

pub fn start_ingest(port: u16, client_id: &str) -> RunningIngest {
    start_ingest_into(port, client_id, 16 * 1024, tempfile::tempdir().unwrap())
}

/// The same with a payload limit, storing into `dir/samples.db`.
pub fn start_ingest_into(port: u16, client_id: &str, max_payload_bytes: usize, dir: tempfile::TempDir) -> RunningIngest {
    let store = Arc::new(Mutex::new(SampleStore::open(&dir.path().join("samples.db"), SplitPolicy::default()).unwrap()));
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let mut link = Link::new(LinkConfig {
        broker: BrokerConnection::plain("127.0.0.1", port),
        client_id: client_id.into(),
        persistent: true,
        max_outgoing_bytes: 64 * 1024,
        request_queue: 256,
        availability: None,
    });
    let config = IngestConfig { topics: adaptd_protocol::Topics::new("adaptd/v1", "robot-7"), max_batch: 64, max_payload_bytes };
    let events_topic = config.events_topic();
    let (ingest, inbox) = Ingest::on_link(&mut link, config, store.clone(), Arc::new(bundle.manifest.clone()), vec!["sorter".into()]);
    let stats = ingest.stats.clone();
    let parts = Arc::new(adaptd_daemon::app::Parts::default());
    let (events, _) = adaptd_daemon::events::Events::channel();
    let restarts = adaptd_daemon::app::Restarts { part: "ingest".into(), task: String::new(), parts: parts.clone(), events };
    let stop = tokio_util::sync::CancellationToken::new();
    let (ingest_stop, link_stop) = (stop.clone(), tokio_util::sync::CancellationToken::new());
    let task = tokio::spawn(async move {
        let link = tokio::spawn(link.run(link_stop.clone().cancelled_owned()));
        ingest.supervise(inbox, restarts, ingest_stop.cancelled_owned()).await;
        link_stop.cancel();
        link.await.unwrap();
    });
    RunningIngest { dir, store, stats, parts, events_topic, stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_land_once_and_poison_is_refused_with_reasons() {
    let broker = Mosquitto::start();
    let running = start_ingest(broker.port, "adaptd-ingest-test");
    let (store, stats, events_topic) = (running.store.clone(), running.stats.clone(), running.events_topic.clone());

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
                // A redelivery (a key with another label is a conflict: see hardening).
                lines.push(digit_sample(&format!("robot-7:{i}"), "sorter", ["left", "right", "stop"][i % 3]));
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
    let reasons: Vec<String> =
        event_lines.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(reasons.len(), expected.len(), "one event per refusal: {event_lines}");
    assert!(event_lines.contains("[1, 1, 4, 16]") && event_lines.contains("nobody"), "events say why: {event_lines}");

    {
        let store = store.lock().unwrap();
        assert_eq!(store.len().unwrap(), 200);
        assert_eq!(store.labels("sorter").unwrap(), vec!["left", "right", "stop"]);
        let s = store.get("robot-7:4").unwrap().unwrap();
        assert_eq!(s.sample.label, "right", "stored as sent");
        assert!(matches!(&s.sample.input, SampleInput::Tensor(t) if t.shape == vec![1, 1, 8, 8]));
    }
    running.stop().await;
}

/// kill -9 the ingesting daemon 20 times while a publisher streams 10,000 samples at QoS 1:
/// every sample the broker acknowledged to the publisher ends up in the store exactly once.
#[test]
fn kill_9_during_a_stream_loses_nothing_acknowledged() {
    const SAMPLES: usize = 10_000;
    const KILLS: usize = 20;
    // Unlimited queue for the daemon's persistent session while it is down (Mosquitto's default
    // of 1,000 would drop messages at the broker, which is not what this test is about).
    let broker = Mosquitto::start_with("max_queued_messages 0\nmax_inflight_messages 100\n");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("samples.db");
    let port = broker.port.to_string();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_adaptd"))
            .args(["ingest", "--store", db.to_str().unwrap(), "--mqtt", &format!("127.0.0.1:{port}"), "--device", "robot-7", "--tasks", "sorter"])
            .env("ADAPTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start adaptd ingest")
    };
    let count = || SampleStore::open(&db, SplitPolicy::default()).and_then(|s| s.len()).unwrap_or(0);
    let publish = |lines: &[String]| {
        let mut p = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
        p
    };

    let mut daemon = spawn();
    // The session exists once the daemon has subscribed: wait for a probe sample to land.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() == 0 {
        assert!(Instant::now() < deadline, "the ingest daemon never stored the probe sample");
        publish(&[digit_sample("probe", "sorter", "left")]).wait().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    let lines: Vec<String> = (0..SAMPLES).map(|i| digit_sample(&format!("robot-7:{i}"), "sorter", ["left", "right", "stop"][i % 3])).collect();
    let mut publisher = publish(&lines);
    let mut rng = adaptd_adapters::tensor::SeededRng::new(2024);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(50 + rng.next_u64() % 250));
        daemon.kill().unwrap(); // SIGKILL: no chance to flush or ack anything
        daemon.wait().unwrap();
        daemon = spawn();
    }
    assert!(publisher.wait().unwrap().success(), "the broker acknowledged every publish");

    let deadline = Instant::now() + Duration::from_secs(60);
    while count() < SAMPLES as u64 + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let store = SampleStore::open(&db, SplitPolicy::default()).unwrap();
    assert_eq!(store.len().unwrap(), SAMPLES as u64 + 1, "every acknowledged sample, exactly once");
    for i in (0..SAMPLES).step_by(97) {
        assert!(store.get(&format!("robot-7:{i}")).unwrap().is_some(), "robot-7:{i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_process_ingests_the_configured_tasks_samples() {
    let broker = Mosquitto::start();
    let state = tempfile::tempdir().unwrap();
    let mut config = crate::serve_config(reference_bundle("digits-cnn"), state.path());
    (config.mqtt.host, config.mqtt.port) = ("127.0.0.1".into(), broker.port);
    config.mqtt.device_id = "robot-7".into();
    config.ingest.tasks = vec!["sorter".into()];
    let (stop, _, daemon) = crate::serve_in_process(config).await;

    let db = state.path().join("samples.db");
    let port = broker.port.to_string();
    let stored = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let count = || SampleStore::open(&db, SplitPolicy::default()).and_then(|s| s.len()).unwrap_or(0);
        let mut i = 0;
        while count() < 3 && Instant::now() < deadline {
            let line = digit_sample(&format!("robot-7:{i}"), "sorter", "left");
            let ok = Command::new("mosquitto_pub").args(["-p", &port, "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-m", &line]).status().unwrap();
            assert!(ok.success());
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        count()
    })
    .await
    .unwrap();
    assert!(stored >= 3, "samples published to the daemon's task reach its store");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), daemon).await.expect("shuts down in time").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_arrive_through_the_embedded_rumqttd_broker() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    adaptd_daemon::mqtt::start_embedded(([127, 0, 0, 1], port).into(), 64 * 1024).expect("rumqttd starts");
    let running = start_ingest(port, "adaptd-ingest-rumqttd");
    let (store, stats) = (running.store.clone(), running.stats.clone());
    let port_s = port.to_string();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let lines: Vec<String> = (0..300).map(|i| digit_sample(&format!("r:{i}"), "sorter", "left")).collect();
        // Re-publish until ingest has subscribed and everything landed (duplicates are harmless).
        while stats.stored.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
            let mut p = Command::new("mosquitto_pub")
                .args(["-p", &port_s, "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-l"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            p.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
            assert!(p.wait().unwrap().success());
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(stats.stored.load(Ordering::Relaxed), 300);
    })
    .await
    .unwrap();
    assert_eq!(store.lock().unwrap().len().unwrap(), 300);
    running.stop().await;
}

/// The broker restarts (SIGTERM, persistence on) in the middle of a QoS 1 stream. Every sample
/// the broker acked before it went down reaches the store (through the daemon's persistent
/// session: what the broker had in flight to the daemon is redelivered from its persistence file),
/// the publisher resends what was not acked, and each sample lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    use std::collections::{BTreeSet, HashMap};
    const SAMPLES: usize = 3_000;
    let key = |i: usize| format!("restart:{i}");
    // The persistence file lives in the broker's own directory; an unlimited queue so the broker
    // itself drops nothing for a session that is away.
    let mut broker = Mosquitto::start_with("persistence true\npersistence_location {dir}/\nmax_queued_messages 0\n");
    let running = start_ingest(broker.port, "adaptd-ingest-restart");
    let (store, stats) = (running.store.clone(), running.stats.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Publish in order; the n-th outgoing publish is sample n, so each PUBACK names its sample.
    let publish = |port: u16, name: &str, indices: Vec<usize>| {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new(name, "127.0.0.1", port), 256);
        tokio::spawn({
            let indices = indices.clone();
            async move {
                for i in indices {
                    if client
                        .publish("adaptd/v1/robot-7/samples/sorter", QoS::AtLeastOnce, false, digit_sample(&format!("restart:{i}"), "sorter", "left"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        (eventloop, indices)
    };
    // Poll until `until` acks or the connection drops; returns the samples the broker acked, and
    // counts them in `progress` as they come.
    async fn acked_samples(mut eventloop: rumqttc::EventLoop, indices: Vec<usize>, until: usize, progress: Arc<AtomicUsize>) -> BTreeSet<usize> {
        let (mut sent, mut in_flight, mut acked) = (0, HashMap::new(), BTreeSet::new());
        while acked.len() < until {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    in_flight.insert(pkid, indices[sent]);
                    sent += 1;
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    acked.insert(in_flight.remove(&ack.pkid).expect("a PUBACK for a publish in flight"));
                    progress.store(acked.len(), Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        acked
    }

    let (eventloop, indices) = publish(broker.port, "restart-publisher", (0..SAMPLES).collect());
    // The broker restarts once it acked a quarter of the stream: the publisher acks run ahead
    // of what ingest stores, so waiting on the store could let the whole stream be acked first.
    let published = Arc::new(AtomicUsize::new(0));
    let first = tokio::spawn(acked_samples(eventloop, indices, SAMPLES, published.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while published.load(Ordering::Relaxed) < SAMPLES / 4 {
        assert!(Instant::now() < deadline, "the stream is flowing");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::task::block_in_place(|| broker.restart());
    assert!(broker.dir().join("mosquitto.db").is_file(), "the broker saved its sessions when it stopped");
    let acked_before = first.await.unwrap();
    assert!(acked_before.len() < SAMPLES, "the restart happened mid-stream ({} of {SAMPLES} acked before it)", acked_before.len());

    // The publisher resends what the broker never acked.
    let resend: Vec<usize> = (0..SAMPLES).filter(|i| !acked_before.contains(i)).collect();
    let lines: Vec<String> = resend.iter().map(|&i| digit_sample(&key(i), "sorter", "left")).collect();
    let port = broker.port;
    tokio::task::spawn_blocking(move || {
        let mut publish = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        publish.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
        assert!(publish.wait().unwrap().success(), "the broker is back and acks the resent samples");
    })
    .await
    .unwrap();

    while (stats.stored.load(Ordering::Relaxed) as usize) < SAMPLES && Instant::now() < deadline + Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let store = store.lock().unwrap();
        let missing: Vec<usize> = acked_before.iter().copied().filter(|&i| store.get(&key(i)).unwrap().is_none()).collect();
        assert!(missing.is_empty(), "acked before the restart but not stored: {} (e.g. {:?})", missing.len(), &missing[..missing.len().min(5)]);
        assert_eq!(store.len().unwrap(), SAMPLES as u64, "every sample exactly once (redeliveries recognised: {})", stats.duplicates.load(Ordering::Relaxed));
        eprintln!("{} of {SAMPLES} acked before the restart; {} redeliveries recognised", acked_before.len(), stats.duplicates.load(Ordering::Relaxed));
    }
    running.stop().await;
}

/// Image bundles take samples as JPEG/PNG (base64 in JSON), through the bundle's own preprocessing.
#[test]
fn image_samples_are_decoded_by_the_bundles_preprocessing_or_refused_with_the_reason() {
    use adaptd_daemon::ingest::decode::{SampleSchema, decode_sample};
    use base64::Engine as _;
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let tasks = vec!["sorter".to_string()];
    let schema = SampleSchema { manifest: &bundle.manifest, tasks: &tasks, max_bytes: 1 << 20 };
    // A 16x16 grey PNG: the bundle resizes it to 8x8 and scales pixels by its pixel_scale.
    let img = image::GrayImage::from_fn(16, 16, |x, _| image::Luma([if x < 8 { 0 } else { 255 }]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let sample = decode_sample(format!("{{\"key\": \"cam:1\", \"task\": \"sorter\", \"label\": 7, \"image\": \"{b64}\"}}").as_bytes(), &schema, 0).unwrap();
    // Kept as the bundle sees it before normalising: 8x8 grey bytes.
    let SampleInput::Image(t) = &sample.input else { panic!("an image is kept as its fitted pixels") };
    assert_eq!((t.height, t.width, t.channels), (8, 8, 1));
    assert!(t.data[0] < 26 && t.data[7] > 230, "left dark, right bright: {:?}", &t.data[..8]);
    let input = adaptd_daemon::preprocess::normalize(&bundle.manifest.name, &bundle.manifest.preprocessing, &[t]).unwrap();
    assert_eq!(input.shape, vec![1, 1, 8, 8]);
    let data = input.as_f32().unwrap();
    assert!(data[0] < 0.1 && data[7] > 0.9, "scaled by the bundle's pixel_scale: {:?}", &data[..8]);
    assert_eq!(sample.label, "7");

    let not_an_image = base64::engine::general_purpose::STANDARD.encode(b"this is not a PNG");
    let err =
        decode_sample(format!("{{\"key\": \"cam:2\", \"task\": \"sorter\", \"label\": 7, \"image\": \"{not_an_image}\"}}").as_bytes(), &schema, 0).unwrap_err();
    assert_eq!(err.error_type(), "bad_image", "{err}");
    let err = decode_sample(br#"{"key": "cam:3", "task": "sorter", "label": 7, "image": "%%%"}"#, &schema, 0).unwrap_err();
    assert!(err.to_string().contains("base64"), "{err}");

    // The compact form: the file's bytes as a U8 tensor named "image", fields as metadata.
    let compact = |name: &str, dtype: safetensors::Dtype, bytes: &[u8], shape: Vec<usize>| {
        let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap();
        let meta = std::collections::HashMap::from([("key".to_string(), "cam:4".to_string()), ("task".into(), "sorter".into()), ("label".into(), "7".into())]);
        safetensors::serialize([(name, view)], Some(meta)).unwrap()
    };
    let sample = decode_sample(&compact("image", safetensors::Dtype::U8, &png, vec![png.len()]), &schema, 0).unwrap();
    let SampleInput::Image(from_compact) = &sample.input else { panic!("an image is kept as its fitted pixels") };
    assert_eq!(from_compact, t, "both encodings decode the same image to the same pixels");
    let err = decode_sample(&compact("image", safetensors::Dtype::U8, b"this is not a PNG", vec![17]), &schema, 0).unwrap_err();
    assert_eq!(err.error_type(), "bad_image", "{err}");
    let err = decode_sample(&compact("image", safetensors::Dtype::F32, &[0; 16], vec![4]), &schema, 0).unwrap_err();
    assert!(err.error_type() == "bad_safetensors" && err.to_string().contains("JPEG or PNG file (U8, one axis) or a raw frame"), "{err}");
    let err = decode_sample(&compact("picture", safetensors::Dtype::U8, &png, vec![png.len()]), &schema, 0).unwrap_err();
    assert!(err.to_string().contains("\"input\" or \"image\""), "{err}");
    // Text rides as metadata with no tensor; an image bundle refuses it.
    let meta = std::collections::HashMap::from([
        ("key".to_string(), "cam:5".to_string()),
        ("task".into(), "sorter".into()),
        ("label".into(), "7".into()),
        ("text".into(), "left".into()),
    ]);
    let text_only = safetensors::serialize(Vec::<(&str, safetensors::tensor::TensorView<'_>)>::new(), Some(meta)).unwrap();
    let err = decode_sample(&text_only, &schema, 0).unwrap_err();
    assert!(err.to_string().contains("does not take text"), "{err}");
}

/// The shipped broker settings (`deploy/mosquitto/adaptd.conf`) hold a fast burst: 20,000
/// samples published at QoS 1 as fast as one client can, each acknowledged to the sender by the
/// broker, all land in the store. With Mosquitto's default queue of 1,000 messages per client
/// most of such a burst is dropped at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_settings_hold_a_burst_of_20000_samples() {
    const SAMPLES: usize = 20_000;
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mosquitto/adaptd.conf")).unwrap();
    let broker = Mosquitto::start_with(&shipped);
    let running = start_ingest(broker.port, "adaptd-ingest-burst");
    let (stats, store) = (running.stats.clone(), running.store.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats.connected.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "ingest did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = broker.port;
    tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = (0..SAMPLES).map(|i| digit_sample(&format!("burst:{i}"), "sorter", ["left", "right", "stop"][i % 3])).collect();
        let mut publish = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/robot-7/samples/sorter", "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        publish.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
        assert!(publish.wait().unwrap().success(), "every publish acknowledged by the broker");
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.stored.load(Ordering::Relaxed) < SAMPLES as u64 {
        assert!(Instant::now() < deadline, "{} of {SAMPLES} stored", stats.stored.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.lock().unwrap().len().unwrap(), SAMPLES as u64, "each sample once");
    running.stop().await;
}
