//! The one-command demo: the whole adaptation loop, live, on the reference digits bundle.
//!
//! A sorting cell's robots had their cameras remounted sideways — all but one, which still sees
//! upright digits, the only kind the base model was trained on. The demo starts the embedded MQTT
//! broker and the daemon (the same `serve::run` a device runs, on the shipped defaults), then a
//! simulated fleet publishes labelled, rotated digits over MQTT; the daemon escalates from a head
//! to LoRA as validation asks, the gate checks each step's candidate on samples the trainer never
//! saw and on the base domain the cell still sees, and the engine hot-swaps each one the gate
//! passes (the head within seconds, LoRA when it is trained) while a client keeps sending requests; an operator then corrects the adapted
//! model's mistakes and asks for another round. Accuracy is measured before and after on fixed
//! evaluation images no one published, and an HTML report is written from the daemon's journal.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use adaptd_protocol::wire::{JsonTensor, PredictRequest, PredictResponse, SampleMessage};
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::client::Client;
use crate::datasets::{Digits, Shift};
use crate::report::{self, Measured, Series, TaskHistory};
use adaptd_daemon::config::Config;

const TASK: &str = "sorter";
const DEVICE: &str = "cell-7";

fn topics() -> adaptd_protocol::Topics {
    adaptd_protocol::Topics::new(adaptd_protocol::topics::DEFAULT_PREFIX, DEVICE)
}

#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Holds bundles/ and data/ (made by the set-up step).
    pub build_dir: PathBuf,
    /// The daemon's state for this run; emptied first.
    pub state_dir: PathBuf,
    pub report: PathBuf,
    pub robots: usize,
    /// Samples each robot publishes per second.
    pub rate_per_robot: f64,
}

/// One adapter version as the demo measured it.
#[derive(Debug, Clone)]
pub struct VersionRow {
    pub version: u64,
    pub how: String,
    pub train_samples: Option<u64>,
    pub holdout: Option<f64>,
    /// Measured on the demo's evaluation images; none for a candidate that never served.
    pub rotated: Option<f64>,
    pub upright: Option<f64>,
    pub decision: String,
}

#[derive(Debug, Clone)]
pub struct DemoOutcome {
    pub rows: Vec<VersionRow>,
    pub report: PathBuf,
    pub requests_served: u64,
    pub requests_failed: u64,
    pub seconds: f64,
}

impl DemoOutcome {
    /// The demo shows what it promises: an adapter promoted and serving, better on the new
    /// domain, and no request lost to a swap.
    pub fn succeeded(&self) -> bool {
        let base = self.rows.first().and_then(|r| r.rotated).unwrap_or(0.0);
        let best = self.rows.iter().skip(1).filter_map(|r| r.rotated).fold(0.0, f64::max);
        best > base + 0.2 && self.requests_failed == 0
    }
}

/// A JSON tensor of `shape` holding `values`.
fn json_tensor(shape: Vec<usize>, values: impl IntoIterator<Item = f32>) -> JsonTensor {
    JsonTensor { shape, data: values.into_iter().filter_map(|x| serde_json::Number::from_f64(f64::from(x))).collect() }
}

fn sample(key: &str, label: i64, pixels: &[f32], source: &str, correction: bool) -> Vec<u8> {
    let message = SampleMessage {
        key: key.into(),
        task: TASK.into(),
        label: Value::String(label.to_string()),
        input: Some(json_tensor(vec![1, 1, 8, 8], pixels.iter().copied())),
        text: None,
        image: None,
        timestamp_ms: None,
        source: Some(source.into()),
        weight: None,
        correction,
        request_id: None,
    };
    serde_json::to_vec(&message).unwrap_or_default()
}

fn predict_body(digits: &Digits, indices: &[usize], shift: Shift) -> anyhow::Result<Vec<u8>> {
    let image = json_tensor(vec![indices.len(), 1, 8, 8], indices.iter().flat_map(|&i| digits.image(i, shift)));
    Ok(serde_json::to_vec(&PredictRequest { inputs: Some([("image".to_string(), image)].into()), ..PredictRequest::default() })?)
}

/// Predicted labels for `indices` under `shift`, from the running daemon.
fn predict(client: &Client, digits: &Digits, indices: &[usize], shift: Shift) -> anyhow::Result<(Vec<i64>, u64)> {
    let r = client.request("POST", &format!("/v1/tasks/{TASK}/predict"), Some(&predict_body(digits, indices, shift)?))?;
    anyhow::ensure!(r.ok(), "predict answered {}: {}", r.status, r.message());
    let answer: PredictResponse = serde_json::from_value(r.body.clone()).map_err(|e| anyhow::anyhow!("predict: {e} in {}", r.body))?;
    let labels = answer.predictions.iter().map(|p| p.label.parse().unwrap_or(-1)).collect();
    Ok((labels, answer.predictions.first().map_or(0, |p| p.adapter_version)))
}

fn accuracy(client: &Client, digits: &Digits, indices: &[usize], shift: Shift) -> anyhow::Result<f64> {
    let (predicted, _) = predict(client, digits, indices, shift)?;
    let correct = predicted.iter().zip(digits.labels_of(indices)).filter(|(p, t)| **p == *t).count();
    Ok(correct as f64 / indices.len().max(1) as f64)
}

/// A free loopback port for the embedded broker.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[allow(clippy::field_reassign_with_default)] // reads as "the defaults, except"
fn daemon_config(config: &DemoConfig, broker_port: u16) -> Config {
    let mut c = Config::default();
    c.bundle = config.build_dir.join("bundles").join("digits-cnn");
    c.state_dir = config.state_dir.clone();
    c.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.mqtt.host = "127.0.0.1".into();
    c.mqtt.port = broker_port;
    c.mqtt.device_id = DEVICE.into();
    c.mqtt.inference_api = false; // the embedded broker speaks MQTT 3.1.1; the demo's client uses HTTP
    c.ingest.tasks = vec![TASK.into()];
    // The simulated fleet shares this machine's cores with the daemon: do not wait for them.
    // Everything else (when to train, what to train, the gate) is the shipped default.
    c.schedule.limits.max_cpu_percent = 100.0;
    c.schedule.limits.min_available_mb = 0;
    c
}

/// A robot: publishes `items` at QoS 1 at `rate` per second; returns how many the broker acked.
async fn robot(name: String, port: u16, items: Vec<Vec<u8>>, rate: f64, acked_total: Arc<AtomicU64>) -> anyhow::Result<u64> {
    let mut options = MqttOptions::new(name.clone(), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10)).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let total = items.len() as u64;
    let topic = topics().task(adaptd_protocol::topics::Channel::Samples, TASK);
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
        for item in items {
            tick.tick().await;
            if client.publish(&topic, QoS::AtLeastOnce, false, item).await.is_err() {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(total as f64 / rate.max(0.1) + 30.0);
    while acked < total {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(robot = name, error = %e, "robot reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => break,
        }
    }
    if let Ok(client) = publisher.await {
        let _ = client.disconnect().await;
    }
    Ok(acked)
}

/// Forward the daemon's events topic to the console thread.
async fn watch_events(port: u16, to_console: std_mpsc::Sender<Value>) {
    let mut options = MqttOptions::new("demo-console", "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let _ = client.subscribe(topics().events(), QoS::AtLeastOnce).await;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                    && to_console.send(v).is_err()
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.subscribe(topics().events(), QoS::AtLeastOnce).await;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A client that keeps asking for predictions the whole time, across every hot-swap.
fn steady_client(client: Client, digits: Arc<Digits>, eval: Vec<usize>, stop: Arc<AtomicBool>, served: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        // The cell's own traffic: two cameras sideways, one upright, as its robots publish.
        let index = eval[i % eval.len()];
        let shift = if i % 3 == 2 { Shift::None } else { Shift::Rotate90 };
        match predict(&client, &digits, &[index], shift) {
            Ok(_) => served.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, "steady client: request failed");
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The demo's line for a `training_finished` event.
fn trained_line(e: &Value) -> String {
    format!(
        "  ■ v{} trained, {:.1} s into the job: {} epochs, kept epoch {}{}, batch {}, {:.0} samples/s",
        e["version"],
        e["seconds"].as_f64().unwrap_or(0.0),
        e["epochs"],
        e["best_epoch"],
        if e["stopped_early"] == true { " (stopped early: validation loss stopped improving)" } else { "" },
        e["batch_size"],
        e["samples_per_second"].as_f64().unwrap_or(0.0)
    )
}

/// The console: prints events as they come and draws the training progress bar.
struct Console {
    events: std_mpsc::Receiver<Value>,
    bar: Option<ProgressBar>,
    last_epoch: u64,
    terminal: bool,
}

impl Console {
    fn new(events: std_mpsc::Receiver<Value>) -> Console {
        Console { events, bar: None, last_epoch: 0, terminal: std::io::stderr().is_terminal() }
    }

    /// Show events until one of `kinds` arrives (returned) or `timeout` passes.
    fn until(&mut self, kinds: &[&str], timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.events.recv_timeout(Duration::from_millis(300)) {
                Ok(event) => {
                    self.show(&event);
                    if event["event"].as_str().is_some_and(|k| kinds.contains(&k)) {
                        return Some(event);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        None
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn show(&mut self, e: &Value) {
        let kind = e["event"].as_str().unwrap_or("");
        match kind {
            "training_started" => {
                self.finish_bar();
                println!(
                    "  ▶ training v{} ({}, trigger: {}) on {} train / {} validation samples, device {}",
                    e["version"],
                    e["kind"].as_str().unwrap_or("?"),
                    e["trigger"].as_str().unwrap_or("?"),
                    e["samples"]["train"],
                    e["samples"]["validation"],
                    e["device"].as_str().unwrap_or("?")
                );
                for note in e["notes"].as_array().into_iter().flatten() {
                    println!("    {}", note.as_str().unwrap_or(""));
                }
                self.last_epoch = 0;
            }
            "training_progress" => {
                let (step, steps, epoch, epochs) =
                    (e["step"].as_u64().unwrap_or(0), e["steps"].as_u64().unwrap_or(1), e["epoch"].as_u64().unwrap_or(0), e["epochs"].as_u64().unwrap_or(0));
                let loss = e["loss"].as_f64().unwrap_or(f64::NAN);
                if self.terminal {
                    let bar = self.bar.get_or_insert_with(|| {
                        let bar = ProgressBar::new(steps);
                        bar.set_style(
                            ProgressStyle::with_template("    {bar:36.cyan/blue} {pos:>4}/{len} steps  {msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_bar())
                                .progress_chars("█▉▊▋▌▍▎▏ "),
                        );
                        bar
                    });
                    bar.set_length(steps);
                    bar.set_position(step);
                    bar.set_message(format!("epoch {epoch}/{epochs}  loss {loss:.3}  eta {:.1} s", e["eta_s"].as_f64().unwrap_or(0.0)));
                } else if epoch != self.last_epoch {
                    println!("    epoch {epoch}/{epochs}: step {step}/{steps}, loss {loss:.3}");
                }
                self.last_epoch = epoch;
            }
            "training_paused" | "training_resumed" | "training_deferred" | "training_failed" | "training_cancelled" => {
                self.finish_bar();
                println!("  ! {}: {}", kind.replace('_', " "), e["reason"].as_str().unwrap_or(""));
            }
            "training_attempt" => {
                self.finish_bar();
                println!(
                    "    step {}/{}: {} reaches validation accuracy {:.1} % (loss {:.3}) in {:.1} s{}",
                    e["step"],
                    e["steps"],
                    e["kind"].as_str().unwrap_or("?"),
                    e["val_accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0,
                    e["val_loss"].as_f64().unwrap_or(f64::NAN),
                    e["seconds"].as_f64().unwrap_or(0.0),
                    if e["best_so_far"] == true { ", the best so far" } else { ", no better: escalation stops" }
                );
            }
            "training_escalated" => println!("    ↑ more capacity: {} → {}", e["from"].as_str().unwrap_or("?"), e["to"].as_str().unwrap_or("?")),
            "training_finished" => {
                self.finish_bar();
                println!("{}", trained_line(e));
            }
            "gate_decision" => {
                self.finish_bar();
                println!("  ■ gate for v{} against v{}:", e["version"], e["incumbent_version"]);
                for c in e["checks"].as_array().into_iter().flatten() {
                    println!(
                        "      {} {:<22} {}",
                        if c["passed"] == true { "✓" } else { "✗" },
                        c["name"].as_str().unwrap_or(""),
                        c["detail"].as_str().unwrap_or("")
                    );
                }
                if let Some(routed) = e["evidence"]["base_routed"].as_f64() {
                    println!("    ⑂ routed: inputs that look upright go to the base model ({:.0} % of the holdout), the rest to the adapter", routed * 100.0);
                }
                println!("    → {}", e["summary"].as_str().unwrap_or(""));
            }
            "promoted" => println!("  ⇄ hot-swap: v{} now serves (was v{})", e["version"], e["from_version"]),
            "job_finished" => {
                self.finish_bar();
                let promoted: Vec<String> = e["promoted"].as_array().into_iter().flatten().map(|v| format!("v{v}")).collect();
                let promoted = if promoted.is_empty() { "nothing promoted".to_string() } else { format!("promoted {}", promoted.join(" then ")) };
                println!("  ■ job over in {:.1} s: {promoted}; v{} serves", e["seconds"].as_f64().unwrap_or(0.0), e["serving_version"]);
            }
            "rolled_back" => println!("  ↶ rolled back v{} → v{}: {}", e["from_version"], e["to_version"], e["reason"].as_str().unwrap_or("")),
            "sample_refused" => println!("  ! sample refused: {}", e["reason"].as_str().unwrap_or("")),
            _ => {}
        }
    }
}

fn section(title: &str) {
    println!("\n━━ {title}");
}

/// Run the demo; prints as it goes and returns what it measured.
pub fn run(config: DemoConfig) -> anyhow::Result<DemoOutcome> {
    let started = Instant::now();
    let digits = Arc::new(Digits::load(&config.build_dir.join("data").join("digits.safetensors"))?);
    // Images no one publishes: the demo's own evaluation set (every fourth unseen digit).
    let unseen = digits.held_out();
    let eval: Vec<usize> = unseen.iter().copied().step_by(4).collect();
    let pool: Vec<usize> = unseen.iter().copied().enumerate().filter(|(i, _)| i % 4 != 0).map(|(_, d)| d).collect();
    // Upright, the same unseen digits: the bundle's retention set is what the daemon checks
    // forgetting and routes by, so measuring on it would flatter the daemon.
    let upright_eval = eval.clone();
    if config.state_dir.exists() {
        std::fs::remove_dir_all(&config.state_dir).map_err(|e| anyhow::anyhow!("{}: {e}", config.state_dir.display()))?;
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|e| anyhow::anyhow!("{}: {e}", config.state_dir.display()))?;

    println!("adaptd demo — a sorting cell whose robots' cameras were remounted sideways");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let port = free_port()?;
    adaptd_daemon::mqtt::start_embedded(SocketAddr::from(([127, 0, 0, 1], port)), 1 << 20)?;
    println!("  embedded MQTT broker (rumqttd) on 127.0.0.1:{port}");
    let (stop_daemon, daemon_stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let daemon = runtime.spawn(adaptd_daemon::serve::run(
        daemon_config(&config, port),
        None,
        async {
            let _ = daemon_stopped.await;
        },
        Some(bound_tx),
    ));
    let addr = runtime.block_on(bound_rx).map_err(|_| anyhow::anyhow!("the daemon stopped before it listened; see the log above"))?;
    let client = Client::new(addr).with_token_from(&config.state_dir);
    // Samples published before ingest has subscribed would reach no one: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.metric("adaptd_ingest_connected").ok().flatten() != Some(1.0) {
        anyhow::ensure!(Instant::now() < deadline, "the daemon's ingest did not subscribe to the embedded broker within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  daemon: bundle digits-cnn, task {TASK:?}, HTTP on http://{addr}, state in {}", config.state_dir.display());
    let (events_tx, events_rx) = std_mpsc::channel();
    runtime.spawn(watch_events(port, events_tx));
    let mut console = Console::new(events_rx);

    let stop_client = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let steady = std::thread::spawn({
        let (client, digits, eval, stop, served, failed) = (client.clone(), digits.clone(), eval.clone(), stop_client.clone(), served.clone(), failed.clone());
        move || steady_client(client, digits, eval, stop, served, failed)
    });

    let mut rows = Vec::new();
    // What the daemon serves now, on the demo's evaluation images: (sideways, upright, version).
    let measure = || -> anyhow::Result<(f64, f64, u64)> {
        let (_, version) = predict(&client, &digits, &eval[..1], Shift::None)?;
        let (rotated, upright) = (accuracy(&client, &digits, &eval, Shift::Rotate90)?, accuracy(&client, &digits, &upright_eval, Shift::None)?);
        println!(
            "  v{version} serving: sideways {:.1} %, upright {:.1} % on {} and {} images no one published",
            100.0 * rotated,
            100.0 * upright,
            eval.len(),
            upright_eval.len()
        );
        Ok((rotated, upright, version))
    };

    section("1/4  The base model meets the sideways cameras");
    let (rotated, upright, _) = measure()?;
    rows.push(VersionRow {
        version: 0,
        how: "base model".into(),
        train_samples: None,
        holdout: None,
        rotated: Some(rotated),
        upright: Some(upright),
        decision: "serving".into(),
    });

    section(&format!("2/4  {} robots publish labelled images over MQTT (QoS 1); the last one's camera is still upright", config.robots));
    let round1 = &pool[..pool.len().min(240)];
    let acked = publish_fleet(&runtime, port, &config, &digits, round1, "r1")?;
    let stored = client.get(&format!("/v1/tasks/{TASK}/status")).map(|s| s.body["samples"].clone()).unwrap_or_default();
    println!("  {acked} samples acked by the broker; the daemon holds {stored} in its sample store (acked to the broker only once durable)");
    rows.extend(wait_for_job(&mut console, "the robots' samples", &measure)?);

    section("3/4  An operator reviews the adapted model and corrects its mistakes");
    let review = &pool[pool.len().min(240)..pool.len().min(340)];
    let (predicted, serving_version) = predict(&client, &digits, review, Shift::Rotate90)?;
    let truth = digits.labels_of(review);
    let wrong: Vec<usize> = review.iter().zip(predicted.iter().zip(&truth)).filter(|(_, (p, t))| p != t).map(|(&i, _)| i).collect();
    println!("  the operator checks {} sorted parts served by v{serving_version}: {} were wrong; corrections go out as samples", review.len(), wrong.len());
    let corrections: Vec<Vec<u8>> =
        wrong.iter().map(|&i| sample(&format!("operator:{i}"), digits.labels[i], &digits.image(i, Shift::Rotate90), "operator", true)).collect();
    let extra = &pool[pool.len().min(340)..];
    let mut acked = runtime.block_on(robot("demo-operator".into(), port, corrections, 200.0, Arc::new(AtomicU64::new(0))))?;
    acked += publish_fleet(&runtime, port, &config, &digits, extra, "r2")?;
    println!("  {acked} more samples acked (corrections and the robots' next images); the operator asks for a training round now");
    std::thread::sleep(Duration::from_millis(800)); // the loop's next tick sees them
    let answer = client.post(&format!("/v1/tasks/{TASK}/train"), None)?;
    println!("  POST /v1/tasks/{TASK}/train → {} {}", answer.status, answer.message());
    if answer.ok() {
        rows.extend(wait_for_job(&mut console, "+ the operator's corrections", &measure)?);
    }

    stop_client.store(true, Ordering::Relaxed);
    let _ = steady.join();
    console.finish_bar();
    section("4/4  What changed");
    println!("  {:<8} {:<44} {:>8} {:>9} {:>9} {:>9}  decision", "version", "how it came", "trained", "holdout", "sideways", "upright");
    for r in &rows {
        let pct = |v: Option<f64>| v.map(|h| format!("{:.1}%", 100.0 * h)).unwrap_or_else(|| "–".into());
        println!(
            "  v{:<7} {:<44} {:>8} {:>9} {:>9} {:>9}  {}",
            r.version,
            r.how,
            r.train_samples.map(|n| n.to_string()).unwrap_or_else(|| "–".into()),
            pct(r.holdout),
            pct(r.rotated),
            pct(r.upright),
            r.decision
        );
    }
    let (served, failed) = (served.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("  a client sent {} requests during the demo, across every hot-swap: {} failed", served + failed, failed);

    let measured = Measured {
        title: "Accuracy measured by the demo on images no one published".into(),
        series: vec![
            Series { name: "sideways (new domain)".into(), points: rows.iter().filter_map(|r| Some((r.version as f64, r.rotated?))).collect() },
            Series { name: "upright (base domain)".into(), points: rows.iter().filter_map(|r| Some((r.version as f64, r.upright?))).collect() },
        ],
    };
    let journal = adaptd_daemon::events::Journal::new(&config.state_dir.join("journal"));
    let history = TaskHistory::read(&journal, TASK)?;
    report::write(&config.report, "adaptd demo: a sorting cell learns sideways cameras", &[history], Some(&measured))?;
    println!("\nreport: {}", config.report.display());

    let _ = stop_daemon.send(());
    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(20), daemon).await })??.map_err(|e| anyhow::anyhow!("daemon: {e:#}"))?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(DemoOutcome { rows, report: config.report.clone(), requests_served: served, requests_failed: failed, seconds: started.elapsed().as_secs_f64() })
}

/// A row for a step that met the gate: measured if it serves now, the gate's figures if not.
fn job_row(job: &Value, how: &str, promoted: bool, measure: &impl Fn() -> anyhow::Result<(f64, f64, u64)>) -> anyhow::Result<VersionRow> {
    let version = job["version"].as_u64().unwrap_or(0);
    let (rotated, upright) = match promoted {
        // Measured as it serves; if the next step replaced it meanwhile, the figures would be
        // the next one's, so none are shown.
        true => match measure()? {
            (r, u, serving) if serving == version => (Some(r), Some(u)),
            _ => (None, None),
        },
        false => (None, None),
    };
    Ok(VersionRow {
        version,
        how: format!("{how}: {}", job["kind"].as_str().unwrap_or("?")),
        train_samples: job["samples"]["train"].as_u64(),
        holdout: job["evidence"]["candidate"]["accuracy"].as_f64(),
        rotated,
        upright,
        decision: if promoted { "promoted, served".into() } else { "rejected by the gate; never served".into() },
    })
}

/// The fleet publishes `indices` (rotated for the sideways robots, upright for the last one),
/// spread over the robots, with a progress bar of the
/// broker's acks; returns how many were acked.
fn publish_fleet(runtime: &tokio::runtime::Runtime, port: u16, config: &DemoConfig, digits: &Digits, indices: &[usize], round: &str) -> anyhow::Result<u64> {
    let robots = config.robots.max(1);
    let acked = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..robots)
        .map(|r| {
            let name = format!("robot-{}", r + 1);
            let shift = if robots > 1 && r == robots - 1 { Shift::None } else { Shift::Rotate90 };
            let items = indices
                .iter()
                .skip(r)
                .step_by(robots)
                .map(|&i| sample(&format!("{name}:{round}:{i}"), digits.labels[i], &digits.image(i, shift), &name, false))
                .collect();
            runtime.spawn(robot(format!("demo-{name}"), port, items, config.rate_per_robot, acked.clone()))
        })
        .collect();
    let bar = ProgressBar::new(indices.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("    {bar:36.green/blue} {pos:>4}/{len} samples acked  {per_sec}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while !handles.iter().all(|h| h.is_finished()) {
        bar.set_position(acked.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let mut total = 0;
    for h in handles {
        total += runtime.block_on(h)??;
    }
    Ok(total)
}

/// Show events until a job is over; the rows of each step that met the gate, measured as it
/// starts to serve (the job climbs on meanwhile: a head serves within seconds, LoRA later).
fn wait_for_job(console: &mut Console, how: &str, measure: &impl Fn() -> anyhow::Result<(f64, f64, u64)>) -> anyhow::Result<Vec<VersionRow>> {
    let mut rows = Vec::new();
    let ends = ["gate_decision", "job_finished", "training_failed", "training_deferred"];
    while let Some(event) = console.until(&ends, Duration::from_secs(180)) {
        if event["event"] != "gate_decision" {
            // A failed step after a promotion ends only the climb: the job's end follows.
            if event["event"] == "training_failed" && !rows.is_empty() {
                continue;
            }
            break;
        }
        let promoted = event["promote"] == true && console.until(&["promoted"], Duration::from_secs(10)).is_some();
        rows.push(job_row(&event, how, promoted, measure)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_line_names_the_epoch_kept_as_the_event_counts_it() {
        // The event counts epochs from 1; the demo once added another, and printed "30 epochs,
        // kept epoch 31".
        let event = adaptd_protocol::Event::TrainingFinished {
            version: 3,
            seconds: 2.7,
            epochs: 30,
            best_epoch: 30,
            stopped_early: false,
            samples_per_second: 5184.0,
            batch_size: 16,
        };
        let line = trained_line(&serde_json::to_value(&event).unwrap());
        assert!(line.contains("v3 trained, 2.7 s into the job: 30 epochs, kept epoch 30, batch 16"), "{line}");
    }
}
