#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code: a failure is the report
//! Faults a device really meets, each against the real daemon (`adaptd serve`) and Mosquitto,
//! in rounds, with what held printed: the state directory's disk full and freed while samples
//! stream in and an operator asks for training; a daemon restart between a signed command and
//! its replay; a flood of idle and half-sent HTTP connections while clients predict; a burst of
//! samples against the broker's queue, with Mosquitto's default settings and the shipped ones.
//!
//! cargo bench -p adaptd --bench faults -- [rounds]
//!
//! The disk-full rounds put the state directory on a tmpfs of its own, which needs root (as the
//! daemon's own users would run it in a test cell); without root they are reported as not run.

#[allow(dead_code)]
#[path = "../tests/integration/broker.rs"]
mod broker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adaptd::client::Client;
use adaptd::datasets::{Digits, Shift};
use broker::{Mosquitto, free_port};
use serde_json::{Value, json};

const DEVICE: &str = "faults";

fn sample_line(key: &str, label: &str, pixels: &[f32]) -> String {
    let data: Vec<String> = pixels.iter().map(|v| format!("{v:.4}")).collect();
    format!("{{\"key\": \"{key}\", \"task\": \"sorter\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}", data.join(","))
}

/// `n` sideways digits from `from` on, as sample lines.
fn samples(digits: &Digits, from: usize, n: usize) -> Vec<(String, String)> {
    (from..from + n)
        .map(|i| {
            let index = i % digits.len();
            let key = format!("cam:{i}");
            (key.clone(), sample_line(&key, &digits.labels[index].to_string(), &digits.image(index, Shift::Rotate90)))
        })
        .collect()
}

/// Publish at QoS 1 with one client; true when the broker acknowledged every message.
fn publish(port: u16, topic: &str, lines: &[String]) -> bool {
    let mut p = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-q", "1", "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub");
    let wrote = p.stdin.take().map(|mut s| s.write_all((lines.join("\n") + "\n").as_bytes()).is_ok()).unwrap_or(false);
    wrote && p.wait().map(|s| s.success()).unwrap_or(false)
}

struct Daemon {
    child: Child,
    client: Client,
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// The shipped configuration, but for where things are and a small first job.
    fn start(dir: &Path, state: &Path, broker_port: u16, extra_mqtt: &str) -> Daemon {
        let http = format!("127.0.0.1:{}", free_port());
        let config = dir.join("adaptd.toml");
        std::fs::write(
            &config,
            format!(
                "bundle = {:?}\nstate_dir = {state:?}\n[http]\nlisten = {http:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\ndevice_id = \"{DEVICE}\"\ninference_api = false\n{extra_mqtt}\n\
                 [ingest]\ntasks = [\"sorter\"]\n[schedule]\nmin_new_samples = 150\ntick_ms = 200\ncooldown_s = 1\nmax_cpu_percent = 100.0\nmin_available_mb = 0\n",
                adaptd::paths::reference_bundle("digits-cnn"),
            ),
        )
        .expect("config");
        let log = dir.join("daemon.log");
        let client = Client::new(http.parse().expect("address"));
        let mut daemon = Daemon { child: spawn(&config, &log), client, state: state.to_path_buf(), config, log };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.client.get("/readyz").map(|r| r.ok()).unwrap_or(false) {
            assert!(Instant::now() < deadline, "the daemon did not become ready; see {}", self.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client.metric("adaptd_ingest_connected").ok().flatten() != Some(1.0) {
            assert!(Instant::now() < deadline, "ingest did not subscribe");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.client = self.client.clone().with_token_from(&self.state);
    }

    fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.config, &self.log);
        self.wait_ready();
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }

    fn stored(&self) -> u64 {
        self.client.metric("adaptd_samples_ingested_total").ok().flatten().unwrap_or(0.0) as u64
    }

    /// The parts that are down now, with their state, from `/metrics`.
    fn parts_up(&self) -> BTreeMap<String, bool> {
        let (_, text) = self.client.request_text("GET", "/metrics").unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("adaptd_part_up{part=\"")?;
                let (part, value) = rest.split_once("\"} ")?;
                Some((part.to_string(), value.trim() == "1"))
            })
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("daemon log");
    Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .env("ADAPTD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start adaptd serve")
}

fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

#[derive(Default)]
struct DiskFull {
    rounds: usize,
    acked: usize,
    stored: usize,
    down_seen: BTreeMap<String, usize>,
    refusals: BTreeMap<String, usize>,
    served_while_full: (usize, usize),
    recovery_s: Vec<f64>,
    loops_alive_at_end: bool,
}

/// The state directory on a 48 MiB tmpfs: samples stream in, the disk is filled, more samples
/// and an operator's training requests come, the disk is freed. Serving must go on throughout,
/// every part must run again within 60 s of the fault clearing, and nothing acked is lost.
fn disk_full(rounds: usize, digits: &Digits) -> Result<DiskFull, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=48m", "tmpfs", state.to_str().expect("utf-8")]).status();
    if !mounted.map(|s| s.success()).unwrap_or(false) {
        return Err("mounting a tmpfs failed (root is needed)".into());
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    let broker = Mosquitto::start_with("max_queued_messages 0\n");
    let mut daemon = Daemon::start(dir.path(), &state, broker.port, "");
    let topic = format!("adaptd/v1/{DEVICE}/samples/sorter");
    let probe = json!({ "inputs": { "image": { "shape": [1, 1, 8, 8], "data": digits.image(0, Shift::Rotate90) } } });
    let mut report = DiskFull { rounds, ..DiskFull::default() };
    let mut next = 0;
    for _ in 0..rounds {
        let before = samples(digits, next, 200);
        next += 200;
        assert!(publish(broker.port, &topic, &before.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>()));
        report.acked += before.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        while daemon.stored() < report.acked as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Fill the disk.
        let filler = state.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 1 << 20];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        drop(file);
        let during = samples(digits, next, 200);
        next += 200;
        assert!(publish(broker.port, &topic, &during.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>()));
        report.acked += during.len();
        for _ in 0..2 {
            let answer = daemon.client.post("/v1/tasks/sorter/train", None).expect("train request");
            if !answer.ok() {
                let why = answer.message();
                let kind = if why.contains("down") {
                    "loop down"
                } else if why.contains("disk") || why.contains("full") {
                    "disk full"
                } else {
                    "other"
                };
                *report.refusals.entry(kind.to_string()).or_default() += 1;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        for _ in 0..20 {
            report.served_while_full.1 += 1;
            if daemon.client.post("/v1/tasks/sorter/predict", Some(&probe)).map(|r| r.ok()).unwrap_or(false) {
                report.served_while_full.0 += 1;
            }
            for (part, up) in daemon.parts_up() {
                if !up {
                    *report.down_seen.entry(part).or_default() += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Free it: every part must be up again, and every acked sample stored.
        std::fs::remove_file(&filler).expect("free the disk");
        let freed = Instant::now();
        while !(daemon.client.get("/readyz").map(|r| r.ok()).unwrap_or(false) && daemon.parts_up().values().all(|up| *up)) {
            if freed.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        report.recovery_s.push(freed.elapsed().as_secs_f64());
        let deadline = Instant::now() + Duration::from_secs(120);
        while daemon.stored() < report.acked as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        report.stored = daemon.stored() as usize;
    }
    report.loops_alive_at_end = daemon.parts_up().values().all(|up| *up);
    daemon.stop();
    Ok(report)
}

/// A signed command applied, the daemon restarted, the same message published again: each
/// round's replay must be refused as one.
fn replay_after_restart(rounds: usize) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let key = b"fleet command key, 16+ bytes".to_vec();
    let key_file = dir.path().join("commands.key");
    std::fs::write(&key_file, &key).expect("key");
    let broker = Mosquitto::start_with("max_queued_messages 0\n");
    let extra = format!("commands = true\ncommands_key_file = {key_file:?}");
    let mut daemon = Daemon::start(dir.path(), &state, broker.port, &extra);
    let events = dir.path().join("events.jsonl");
    let out = std::fs::File::create(&events).expect("events file");
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &broker.port.to_string(), "-q", "1", "-t", &format!("adaptd/v1/{DEVICE}/events")])
        .stdout(out)
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(300));
    let results = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<Value> = std::fs::read_to_string(&events)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|e| e["event"] == "command_result")
                .collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (mut applied, mut refused) = (0, 0);
    for round in 0..rounds {
        let issued = adaptd_daemon::events::now_ms();
        let text = adaptd_daemon::control::signed_text(DEVICE, "sorter", "pin", Some(0), "alice", issued);
        let command =
            json!({ "command": "pin", "version": 0, "by": "alice", "issued_ms": issued, "signature": adaptd_daemon::control::sign(&key, &text) }).to_string();
        let topic = format!("adaptd/v1/{DEVICE}/commands/sorter");
        assert!(publish(broker.port, &topic, std::slice::from_ref(&command)));
        applied += usize::from(results(2 * round + 1).last().is_some_and(|r| r["ok"] == true));
        daemon.restart();
        assert!(publish(broker.port, &topic, &[command]));
        refused += usize::from(results(2 * round + 2).last().is_some_and(|r| r["ok"] == false && r["message"].as_str().unwrap_or("").contains("replay")));
    }
    let _ = sub.kill();
    let _ = sub.wait();
    daemon.stop();
    (applied, refused)
}

struct Flood {
    idle: usize,
    slow: usize,
    healthz_ms: Vec<f64>,
    predict_ms: Vec<f64>,
    baseline_healthz_ms: Vec<f64>,
    baseline_predict_ms: Vec<f64>,
    closed_after_timeout: usize,
}

/// `idle` idle and `slow` half-sent connections held against the daemon on its shipped HTTP
/// settings while a client times `/healthz` and predict, each on a fresh connection.
fn connection_flood(idle: usize, slow: usize, digits: &Digits) -> Flood {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let broker = Mosquitto::start();
    let daemon = Daemon::start(dir.path(), &state, broker.port, "");
    let probe = json!({ "inputs": { "image": { "shape": [1, 1, 8, 8], "data": digits.image(0, Shift::Rotate90) } } });
    let time = |n: usize| {
        let (mut healthz, mut predict) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let t = Instant::now();
            assert!(daemon.client.get("/healthz").map(|r| r.ok()).unwrap_or(false), "healthz failed");
            healthz.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            assert!(daemon.client.post("/v1/tasks/sorter/predict", Some(&probe)).map(|r| r.ok()).unwrap_or(false), "predict failed");
            predict.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        healthz.sort_by(f64::total_cmp);
        predict.sort_by(f64::total_cmp);
        (healthz, predict)
    };
    let (baseline_healthz_ms, baseline_predict_ms) = time(200);
    let mut held: Vec<std::net::TcpStream> = Vec::with_capacity(idle + slow);
    for i in 0..idle + slow {
        let mut s = std::net::TcpStream::connect(daemon.client.addr).expect("flood connection");
        if i >= idle {
            let _ = s.write_all(b"POST /v1/tasks/sorter/predict HTTP/1.1\r\nHost: x\r\n");
        }
        held.push(s);
    }
    let (healthz_ms, predict_ms) = time(200);
    // The header timeout (10 s shipped) closes every one of them.
    std::thread::sleep(Duration::from_secs(12));
    let closed_after_timeout = held
        .iter()
        .filter(|s| {
            use std::io::Read;
            let mut s: &std::net::TcpStream = s;
            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
            match s.read(&mut [0u8; 16]) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .count();
    Flood { idle, slow, healthz_ms, predict_ms, baseline_healthz_ms, baseline_predict_ms, closed_after_timeout }
}

/// A burst of `n` samples at QoS 1 from one publisher into a running daemon, with the broker
/// configured by `broker_config`: (acked by the broker, stored by the daemon).
fn burst(n: usize, broker_config: &str, digits: &Digits) -> (usize, usize, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let broker = Mosquitto::start_with(broker_config);
    let daemon = Daemon::start(dir.path(), &state, broker.port, "");
    let lines: Vec<String> = samples(digits, 0, n).into_iter().map(|(_, l)| l).collect();
    let started = Instant::now();
    let acked = if publish(broker.port, &format!("adaptd/v1/{DEVICE}/samples/sorter"), &lines) { n } else { 0 };
    // Stored: until the count stops moving for 5 s.
    let (mut last, mut still_since) = (0, Instant::now());
    loop {
        let stored = daemon.stored();
        if stored != last {
            (last, still_since) = (stored, Instant::now());
        }
        if stored as usize >= n || still_since.elapsed() > Duration::from_secs(5) {
            return (acked, stored as usize, started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rounds = args.first().and_then(|a| a.parse().ok()).unwrap_or(3usize);
    let digits = Digits::load(&adaptd::paths::digits_data()).expect("digits");
    let descriptors = raise_descriptor_limit();
    let mut failures = Vec::new();

    println!("faults: {rounds} rounds of each");
    match disk_full(rounds, &digits) {
        Ok(r) => {
            let worst = r.recovery_s.iter().copied().fold(0.0, f64::max);
            println!(
                "disk full and freed, {} rounds: samples acked {}, stored {}; parts seen down {:?}; train requests refused {:?}; predict while full {}/{}; every part up again after {:.1} s at worst; loops alive at the end: {}",
                r.rounds, r.acked, r.stored, r.down_seen, r.refusals, r.served_while_full.0, r.served_while_full.1, worst, r.loops_alive_at_end
            );
            if r.stored < r.acked || worst > 60.0 || !r.loops_alive_at_end || r.served_while_full.0 < r.served_while_full.1 {
                failures.push("disk full");
            }
        }
        Err(why) => println!("disk full and freed: not run: {why}"),
    }

    let (applied, refused) = replay_after_restart(rounds);
    println!("signed command, restart, replay, {rounds} rounds: applied {applied}, replays refused {refused}");
    if applied != rounds || refused != rounds {
        failures.push("replay after restart");
    }

    let (idle, slow) = if descriptors > 14_000 { (5000, 1000) } else { ((descriptors as usize / 3).saturating_sub(500), 200) };
    let f = connection_flood(idle, slow, &digits);
    println!(
        "HTTP flood, {} idle + {} half-sent connections held: /healthz p50 {:.2} ms p99 {:.2} ms (without the flood {:.2} / {:.2}); predict p50 {:.2} ms p99 {:.2} ms (without {:.2} / {:.2}); closed by the server after its header timeout: {} of {}",
        f.idle,
        f.slow,
        percentile(&f.healthz_ms, 0.5),
        percentile(&f.healthz_ms, 0.99),
        percentile(&f.baseline_healthz_ms, 0.5),
        percentile(&f.baseline_healthz_ms, 0.99),
        percentile(&f.predict_ms, 0.5),
        percentile(&f.predict_ms, 0.99),
        percentile(&f.baseline_predict_ms, 0.5),
        percentile(&f.baseline_predict_ms, 0.99),
        f.closed_after_timeout,
        f.idle + f.slow
    );
    if percentile(&f.healthz_ms, 0.99) > 100.0 || percentile(&f.predict_ms, 0.99) > 100.0 || f.closed_after_timeout < f.idle + f.slow {
        failures.push("connection flood");
    }

    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mosquitto/adaptd.conf")).expect("shipped broker config");
    for (name, config) in [("Mosquitto's defaults", String::new()), ("deploy/mosquitto/adaptd.conf", shipped)] {
        let (acked, stored, seconds) = burst(20_000, &config, &digits);
        println!("burst of 20,000 samples, {name}: acked by the broker {acked}, stored {stored} ({seconds:.1} s)");
        if name.starts_with("deploy") && stored < acked {
            failures.push("broker queue");
        }
    }
    if failures.is_empty() {
        println!("every check held");
    } else {
        panic!("failed: {failures:?}");
    }
}
