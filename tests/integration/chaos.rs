//! Chaos: the real daemon (`adaptd serve`) and a real Mosquitto with persistence, a publisher
//! streaming labelled digits at QoS 1 with poison interleaved, and at random moments a kill -9
//! of the daemon (during ingest, training or promotion, wherever it is) or a broker restart.
//! What must hold: every sample the broker acknowledged is stored exactly once, every kind of
//! poison is refused with an event, after every restart the daemon serves what its active
//! pointer records, and its memory stays bounded.
//!
//! A short run is a test (`chaos::a_short_chaos_run_loses_nothing_and_serves_what_it_promoted`);
//! `cargo bench --bench chaos` runs a long one and prints the figures. This file is shared by
//! both (the bench includes it by path), so it uses nothing else of the test binary but the broker.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adaptd::datasets::{Digits, Shift};
use adaptd_adapters::tensor::SeededRng;
use adaptd_daemon::samples::{SampleStore, SplitPolicy};

use crate::broker::{Mosquitto, free_port};

/// Kinds of poison the publisher mixes in, with the refusal each must get.
const POISON: [(&str, &str); 5] =
    [("{\"key\": ", "bad_json"), ("overflow", "bad_input"), ("unknown", "unknown_task"), ("conflict", "conflicting_label"), ("bomb", "bad_image")];

#[derive(Debug, Default)]
pub struct ChaosReport {
    pub rounds: usize,
    pub daemon_kills: usize,
    pub broker_restarts: usize,
    pub valid_acked: usize,
    pub valid_stored: usize,
    pub missing: Vec<String>,
    pub poison_sent: u64,
    pub refused: BTreeMap<String, u64>,
    pub promotions: usize,
    pub restarts_checked: usize,
    pub serving_mismatches: Vec<String>,
    pub peak_rss_mib: u64,
    pub seconds: f64,
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "chaos: {} rounds in {:.0} s: {} kill -9 of the daemon, {} broker restarts",
            self.rounds, self.seconds, self.daemon_kills, self.broker_restarts
        )?;
        writeln!(f, "  valid samples acked by the broker {}, stored {} (missing {})", self.valid_acked, self.valid_stored, self.missing.len())?;
        writeln!(f, "  poison sent {}, refused with events: {:?}", self.poison_sent, self.refused)?;
        writeln!(
            f,
            "  promotions {}, restarts checked {}, serving what the pointer records after each: {}",
            self.promotions,
            self.restarts_checked,
            if self.serving_mismatches.is_empty() { "yes".to_string() } else { format!("NO {:?}", self.serving_mismatches) }
        )?;
        write!(f, "  daemon peak RSS {} MiB", self.peak_rss_mib)
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG that declares `side` x `side` grey pixels in a few dozen bytes: decoded naively it
/// allocates side² bytes before finding out the data is not there.
pub fn png_bomb(side: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey, deflate, no filter, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

fn sample_line(key: &str, label: &str, pixels: &[f32], task: &str) -> String {
    let data: Vec<String> = pixels.iter().map(|v| format!("{v:.4}")).collect();
    format!("{{\"key\": \"{key}\", \"task\": \"{task}\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}", data.join(","))
}

fn poison_line(kind: &str, n: u64, first_valid: &str) -> String {
    let zeros = vec![0.0f32; 64];
    match kind {
        "overflow" => sample_line(&format!("poison:{n}"), "1", &zeros, "sorter").replace("[1, 1, 8, 8]", "[4294967296, 4294967296, 1, 1]"),
        "unknown" => sample_line(&format!("poison:{n}"), "1", &zeros, "nobody"),
        // The first valid sample's key again, with a label it does not have.
        "conflict" => first_valid.replace("\"label\": \"", "\"label\": \"x"),
        "bomb" => {
            use base64::Engine as _;
            let png = png_bomb(20_000);
            format!(
                "{{\"key\": \"poison:{n}\", \"task\": \"sorter\", \"label\": \"1\", \"image\": \"{}\"}}",
                base64::engine::general_purpose::STANDARD.encode(png)
            )
        }
        other => other.to_string(),
    }
}

fn spawn_daemon(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("daemon log");
    Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .env("ADAPTD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start adaptd serve")
}

/// A persistent events subscriber (QoS 1, its session kept by the broker across our restarts).
fn spawn_events(port: u16, file: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(file).expect("events file");
    Command::new("mosquitto_sub")
        .args(["-p", &port.to_string(), "-q", "1", "-c", "-i", "chaos-events", "-t", "adaptd/v1/chaos/events"])
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub")
}

fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) / 1024
}

fn wait_ready(client: &adaptd::client::Client, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if client.get("/readyz").map(|r| r.ok()).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn active_pointer(state: &Path) -> u64 {
    std::fs::read_to_string(state.join("adapters/sorter/active")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Run `rounds` of chaos over a stream of `valid` samples.
pub fn run(rounds: usize, valid: usize, seed: u64) -> ChaosReport {
    let started = Instant::now();
    let mut rng = SeededRng::new(seed);
    let mut broker =
        Mosquitto::start_with("persistence true\npersistence_location {dir}/\nmax_queued_messages 0\nmax_inflight_messages 100\nautosave_interval 1\n");
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let http = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("adaptd.toml");
    std::fs::write(
        &config,
        format!(
            "bundle = {:?}\nstate_dir = {:?}\n[http]\nlisten = {http:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\ndevice_id = \"chaos\"\ninference_api = false\n[ingest]\ntasks = [\"sorter\"]\nmax_payload_bytes = 65536\n\
             [schedule]\nmin_new_samples = 150\ntick_ms = 100\ncooldown_s = 1\nmax_cpu_percent = 100.0\nmin_available_mb = 0\n\
             [training]\nadapter = \"lora\"\nescalate = false\nreplay_fraction = 0.5\nlearning_rate = 0.002\nmax_epochs = 30\n[gate]\nmax_retention_drop = 0.25\n",
            adaptd::paths::reference_bundle("digits-cnn"),
            state,
            broker.port
        ),
    )
    .expect("config");
    let (log, events_file) = (dir.path().join("daemon.log"), dir.path().join("events.jsonl"));
    let mut events = spawn_events(broker.port, &events_file);
    let client = adaptd::client::Client::new(http.parse().expect("address"));
    let mut daemon = spawn_daemon(&config, &log);
    assert!(wait_ready(&client, Duration::from_secs(60)), "the daemon did not become ready; see {}", log.display());
    // Ingest's session must exist before the first publish, or the broker keeps nothing for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.metric("adaptd_ingest_connected").ok().flatten() != Some(1.0) {
        assert!(Instant::now() < deadline, "ingest did not subscribe");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The stream: sideways digits (the daemon has something to learn), poison in every chunk.
    let digits = Digits::load(&adaptd::paths::digits_data()).expect("digits");
    let lines: Vec<(String, String)> = (0..valid)
        .map(|i| {
            let index = i % digits.len();
            let key = format!("cam:{i}");
            (key.clone(), sample_line(&key, &digits.labels[index].to_string(), &digits.image(index, Shift::Rotate90), "sorter"))
        })
        .collect();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let poison_sent = Arc::new(AtomicU64::new(0));
    let stream_done = Arc::new(AtomicBool::new(false));
    let port = broker.port;
    let publisher = std::thread::spawn({
        let (acked, poison_sent, stream_done) = (acked.clone(), poison_sent.clone(), stream_done.clone());
        let first_valid = lines[0].1.clone();
        move || {
            for (c, chunk) in lines.chunks(50).enumerate() {
                let mut payload: Vec<String> = chunk.iter().map(|(_, l)| l.clone()).collect();
                let kind = POISON[c % POISON.len()].0;
                payload.insert(payload.len() / 2, poison_line(kind, c as u64, &first_valid));
                poison_sent.fetch_add(1, Ordering::Relaxed);
                // Until the broker acknowledges the whole chunk (a broker restart fails a run
                // part-way; what it had acked comes again, and is a duplicate).
                loop {
                    let mut p = Command::new("mosquitto_pub")
                        .args(["-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/chaos/samples/sorter", "-l"])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("mosquitto_pub");
                    let wrote = p.stdin.take().map(|mut s| s.write_all((payload.join("\n") + "\n").as_bytes()).is_ok()).unwrap_or(false);
                    if wrote && p.wait().map(|s| s.success()).unwrap_or(false) {
                        break;
                    }
                    let _ = p.kill();
                    let _ = p.wait();
                    std::thread::sleep(Duration::from_millis(200));
                }
                acked.lock().expect("acked").extend(chunk.iter().map(|(k, _)| k.clone()));
                std::thread::sleep(Duration::from_millis(40));
            }
            stream_done.store(true, Ordering::Relaxed);
        }
    });

    let mut report = ChaosReport { rounds, ..ChaosReport::default() };
    let probe = serde_json::json!({ "inputs": { "image": { "shape": [1, 1, 8, 8], "data": digits.image(0, Shift::Rotate90) } } });
    for _ in 0..rounds {
        // Some rounds long enough for a job to finish and promote, most shorter.
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 2700));
        if rng.uniform() < 0.75 {
            report.peak_rss_mib = report.peak_rss_mib.max(peak_rss_mib(daemon.id()));
            let _ = daemon.kill(); // SIGKILL: wherever it is, ingest, training or promotion
            let _ = daemon.wait();
            report.daemon_kills += 1;
            let recorded = active_pointer(&state);
            daemon = spawn_daemon(&config, &log);
            if wait_ready(&client, Duration::from_secs(60)) {
                // What answers a request, and what the status says, both from the first moment.
                let answered = client
                    .post("/v1/tasks/sorter/predict", Some(&probe))
                    .ok()
                    .and_then(|r| r.body["predictions"][0]["adapter_version"].as_u64())
                    .unwrap_or(u64::MAX);
                let status = client.get("/v1/tasks/sorter/status").ok().and_then(|r| r.body["serving_version"].as_u64()).unwrap_or(u64::MAX);
                report.restarts_checked += 1;
                if answered != recorded || status != recorded {
                    report.serving_mismatches.push(format!("pointer v{recorded}, answering v{answered}, status v{status}"));
                }
            } else {
                report.serving_mismatches.push("not ready within 60 s after a restart".into());
            }
        } else {
            broker.restart();
            let _ = events.kill();
            let _ = events.wait();
            events = spawn_events(broker.port, &events_file);
            report.broker_restarts += 1;
        }
    }
    publisher.join().expect("publisher");
    assert!(stream_done.load(Ordering::Relaxed));
    let acked = acked.lock().expect("acked").clone();
    report.valid_acked = acked.len();
    report.poison_sent = poison_sent.load(Ordering::Relaxed);

    // Everything acked reaches the store (the broker redelivers what the daemon never acked).
    let db = state.join(adaptd_daemon::samples::STORE_FILE);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let store = SampleStore::open(&db, SplitPolicy::default()).expect("sample store");
        report.missing = acked.iter().filter(|k| !matches!(store.get(k), Ok(Some(_)))).cloned().collect();
        if report.missing.is_empty() || Instant::now() > deadline {
            report.valid_stored = store.len().unwrap_or(0) as usize;
            break;
        }
        drop(store);
        std::thread::sleep(Duration::from_millis(250));
    }
    report.peak_rss_mib = report.peak_rss_mib.max(peak_rss_mib(daemon.id()));
    std::thread::sleep(Duration::from_millis(500)); // the last refusal events
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    let _ = events.kill();
    let _ = events.wait();
    for line in std::fs::read_to_string(&events_file).unwrap_or_default().lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match e["event"].as_str() {
            Some("sample_refused") => *report.refused.entry(e["reason"].as_str().unwrap_or("?").to_string()).or_default() += 1,
            Some("promoted") => report.promotions += 1,
            _ => {}
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// What every chaos run must show.
pub fn check(report: &ChaosReport) {
    assert!(report.missing.is_empty(), "acked samples missing from the store: {:?}\n{report}", &report.missing[..report.missing.len().min(10)]);
    assert_eq!(report.valid_stored, report.valid_acked, "each valid sample exactly once\n{report}");
    for (_, reason) in POISON.iter().take(report.poison_sent.min(POISON.len() as u64) as usize) {
        assert!(report.refused.contains_key(*reason), "no {reason} refusal event\n{report}");
    }
    assert!(report.serving_mismatches.is_empty(), "{report}");
    assert!(report.peak_rss_mib < 2048, "{report}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_short_chaos_run_loses_nothing_and_serves_what_it_promoted() {
        let report = super::run(6, 600, 7);
        eprintln!("{report}");
        super::check(&report);
    }
}
