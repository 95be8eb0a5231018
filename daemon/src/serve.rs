//! Serving as a process: the engine, the registry and the inference APIs, until shut down.
//! (The configuration file, the training loop and systemd integration build on this.)

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use adaptd_adapters::bundle::Preprocessing;
use adaptd_adapters::{AdapterStore, Bundle};
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::mqtt::{self, MqttApiConfig};
use crate::adapt::{self, AdaptConfig};
use crate::api::{Api, TaskControl, http};
use crate::events::{self, Events, Journal};
use crate::trainer::{Trainer, TrainerConfig};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::preprocess::TextEncoder;
use crate::ingest::{self, IngestConfig, IngestStats};
use crate::registry::{Recovery, Registry};
use crate::samples::{SampleStore, SplitPolicy};

/// Shorter than the unit's `TimeoutStopSec=30`, so the daemon, not SIGKILL, ends a slow stop.
pub const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bundle: PathBuf,
    pub state_dir: PathBuf,
    pub http: SocketAddr,
    /// The MQTT broker for samples, events and the MQTT API; none: HTTP only.
    pub mqtt: Option<crate::broker::BrokerConnection>,
    /// Serve inference over MQTT too (MQTT v5 request/response).
    pub mqtt_api: bool,
    /// Take signed operator commands over MQTT, verified with this key file (none: off).
    pub mqtt_commands_key: Option<PathBuf>,
    pub device_id: String,
    pub topic_prefix: String,
    pub engine: EngineConfig,
    pub keep_versions: usize,
    pub max_request_bytes: usize,
    /// Tasks this device learns; with an MQTT broker, their samples are ingested.
    pub tasks: Vec<String>,
    pub ingest_max_batch: usize,
    pub ingest_max_payload_bytes: usize,
    pub split: SplitPolicy,
    /// One adaptation loop per task in `tasks` (empty: serve and ingest, never train).
    pub adapt: Vec<AdaptConfig>,
    pub trainer: TrainerConfig,
    /// Where device readings come from (`/sys` on a device; a fake tree in tests).
    pub sysfs_root: PathBuf,
    /// The file and the configuration loaded from it, for reloads on SIGHUP.
    pub reload_from: Option<(PathBuf, Config)>,
    /// Graceful shutdown gives up after this long (keep it under systemd's `TimeoutStopSec`).
    pub shutdown_deadline: std::time::Duration,
}

impl ServeConfig {
    pub fn new(bundle: PathBuf, state_dir: PathBuf) -> ServeConfig {
        ServeConfig::from_config(&Config { bundle, state_dir, ..Config::default() })
    }

    pub fn from_config(config: &Config) -> ServeConfig {
        ServeConfig {
            bundle: config.bundle.clone(),
            state_dir: config.state_dir.clone(),
            http: config.http.listen,
            mqtt: config.mqtt.connection(),
            mqtt_api: config.mqtt.inference_api,
            mqtt_commands_key: config.mqtt.commands.then(|| config.mqtt.commands_key_file.clone()),
            device_id: config.mqtt.device_id.clone(),
            topic_prefix: config.mqtt.topic_prefix.clone(),
            engine: config.engine_config(),
            keep_versions: config.adapters.keep_versions,
            max_request_bytes: config.http.max_request_bytes,
            tasks: config.ingest.tasks.clone(),
            ingest_max_batch: config.ingest.max_batch,
            ingest_max_payload_bytes: config.ingest.max_payload_bytes,
            split: SplitPolicy { validation_percent: config.ingest.validation_percent, holdout_percent: config.ingest.holdout_percent },
            adapt: config.ingest.tasks.iter().map(|t| config.adapt_config(t)).collect(),
            trainer: config.trainer_config(),
            sysfs_root: config.schedule.sysfs_root.clone(),
            shutdown_deadline: SHUTDOWN_DEADLINE,
            reload_from: None,
        }
    }
}

/// Serve until `shutdown` completes. `bound` learns the HTTP address once it listens (port 0 works).
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>, bound: Option<oneshot::Sender<SocketAddr>>) -> anyhow::Result<()> {
    let _lock = lock_state_dir(&config.state_dir)?;
    let bundle = Bundle::open(&config.bundle)?;
    let store = AdapterStore::open(config.state_dir.join("adapters"))?;
    let (registry, recovered) = Registry::open(bundle, store, config.keep_versions)?;
    for event in &recovered {
        match event {
            Recovery::Restored { task, version } => tracing::info!(task, version, "adapter restored"),
            Recovery::Skipped { task, version, reason } => tracing::warn!(task, version, reason, "adapter version skipped"),
            Recovery::Base { task } => tracing::warn!(task, "no readable adapter: serving the base model"),
        }
    }
    let registry = Arc::new(registry);
    let bundle = registry.bundle().clone();
    // The bundle's own classifier, if it has one, serves as a task named after the bundle.
    if bundle.manifest.labels.is_some() {
        registry.ensure_task(&bundle.manifest.name)?;
    }
    for task in &config.tasks {
        registry.ensure_task(task)?;
    }
    let text = match bundle.manifest.preprocessing {
        Preprocessing::Text { .. } => Some(Arc::new(TextEncoder::from_bundle(&bundle)?)),
        _ => None,
    };
    let engine = tokio::task::spawn_blocking({
        let (registry, engine_config) = (registry.clone(), config.engine.clone());
        move || Engine::start(registry, engine_config)
    })
    .await??;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let topics = adaptd_protocol::Topics::new(&config.topic_prefix, &config.device_id);
    let (events, events_rx) = Events::channel();
    let events_task = tokio::spawn(events::publish(
        events_rx,
        config.mqtt.clone(),
        format!("adaptd-events-{}", config.device_id),
        topics.events(),
        stopped(stop_rx.clone()),
    ));

    let traffic = Arc::new(crate::traffic::TrafficLog::default());
    // Training: one libtorch owner thread, one adaptation loop per task.
    let mut control = BTreeMap::new();
    let mut adapt_tasks = Vec::new();
    let mut adapt_configs = BTreeMap::new();
    let trainer = if config.adapt.is_empty() {
        None
    } else {
        std::fs::create_dir_all(&config.state_dir).map_err(|e| anyhow::anyhow!("{}: {e}", config.state_dir.display()))?;
        let trainer = tokio::task::spawn_blocking({
            let (bundle, trainer_config) = (bundle.clone(), config.trainer.clone());
            move || Trainer::start(bundle, trainer_config)
        })
        .await??;
        tracing::info!(device = trainer.device(), "trainer ready");
        let trainer = Arc::new(trainer);
        let context = adapt::Context {
            registry: registry.clone(),
            engine: engine.handle.clone(),
            trainer: trainer.clone(),
            store_path: config.state_dir.join(crate::samples::STORE_FILE),
            split: config.split,
            text: text.clone(),
            events: events.clone(),
            journal: Journal::new(&config.state_dir.join("journal")),
            traffic: traffic.clone(),
        };
        for adapt_config in &config.adapt {
            let (commands_tx, commands_rx) = mpsc::channel(8);
            let (config_tx, config_rx) = watch::channel(adapt_config.clone());
            adapt_configs.insert(adapt_config.task.clone(), config_tx);
            let (status_tx, status_rx) = watch::channel(adapt::Status {
                task: adapt_config.task.clone(),
                scheduler: crate::scheduler::SchedulerState::Idle,
                // What recovery chose serves from the start: the loop's first tick is later.
                serving_version: registry.current(&adapt_config.task).map_or(0, |s| s.version),
                jobs: BTreeMap::new(),
                last_decision: None,
                progress: None,
                samples: 0,
                new_samples: 0,
            });
            control.insert(adapt_config.task.clone(), TaskControl { commands: commands_tx, status: status_rx });
            adapt_tasks.push(tokio::spawn(adapt::run(context.clone(), config_rx, commands_rx, status_tx, stopped(stop_rx.clone()))));
        }
        Some(trainer)
    };
    let ingest_stats = Arc::new(IngestStats::default());
    let ingesting = config.mqtt.is_some() && !config.tasks.is_empty();
    let listener = tokio::net::TcpListener::bind(config.http).await.map_err(|e| anyhow::anyhow!("HTTP {}: {e}", config.http))?;
    let addr = listener.local_addr()?;
    let token = crate::control::ensure_token(&config.state_dir)?;
    let api = Arc::new(
        Api::new(engine.handle.clone(), text, config.max_request_bytes)
            .with_control(control)
            .with_auth(token, addr)
            .with_traffic(traffic)
            .with_telemetry(ingesting.then(|| ingest_stats.clone()), &config.sysfs_root),
    );
    tracing::info!(%addr, tasks = ?registry.tasks(), "serving");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let http_task = tokio::spawn(http::serve(listener, api.clone(), stopped(stop_rx.clone())));
    // Operator commands over MQTT for the tasks that adapt (also through HTTP and the CLI).
    let commands_task = match (config.mqtt.clone(), &config.mqtt_commands_key) {
        (Some(broker), Some(key_file)) if !config.adapt.is_empty() => {
            let verifier = crate::control::CommandVerifier::from_key_file(key_file, &config.device_id)?;
            Some(tokio::spawn(crate::api::commands::run(api.clone(), broker, format!("adaptd-commands-{}", config.device_id), topics.clone(), verifier, events.clone(), stopped(stop_rx.clone()))))
        }
        _ => None,
    };
    let mqtt_task = config.mqtt.clone().filter(|_| config.mqtt_api).map(|broker| {
        let mqtt_config = MqttApiConfig { broker, client_id: format!("adaptd-{}", config.device_id), topics: topics.clone() };
        tokio::spawn(mqtt::run(api.clone(), mqtt_config, stopped(stop_rx.clone())))
    });
    let ingest_task = match (&config.mqtt, config.tasks.is_empty()) {
        (Some(broker), false) => {
            let store = SampleStore::open(&config.state_dir.join(crate::samples::STORE_FILE), config.split)?;
            let ingest_config = IngestConfig {
                broker: broker.clone(),
                client_id: format!("adaptd-ingest-{}", config.device_id),
                topics: topics.clone(),
                max_batch: config.ingest_max_batch,
                max_payload_bytes: config.ingest_max_payload_bytes,
            };
            let (manifest, tasks) = (Arc::new(bundle.manifest.clone()), Arc::new(config.tasks.clone()));
            Some(tokio::spawn(ingest::supervise(ingest_config, Arc::new(Mutex::new(store)), manifest, tasks, ingest_stats.clone(), stopped(stop_rx.clone()))))
        }
        _ => None,
    };

    // The engine warmed up before we listened: ready now, not when the broker answers.
    crate::systemd::notify_or_log(&format!("READY=1\nSTATUS=serving {} task(s) on http://{addr}", registry.tasks().len()));
    let watchdog_task = crate::systemd::watchdog_interval().map(|every| {
        let (engine, mut stop) = (engine.handle.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! { _ = stop.wait_for(|s| *s) => return, _ = tick.tick() => {} }
                // Fed only while the engine's owner thread answers: a wedged engine gets the
                // service restarted by systemd instead of serving nothing forever.
                if engine.heartbeat(every).await {
                    crate::systemd::notify_or_log("WATCHDOG=1");
                } else {
                    tracing::error!("engine heartbeat missed; not feeding the systemd watchdog");
                }
            }
        })
    });

    let reload_task = tokio::spawn(reload_on_sighup(config.reload_from.clone(), adapt_configs, events.clone(), stopped(stop_rx.clone())));

    shutdown.await;
    reload_task.abort();
    tracing::info!(deadline_s = config.shutdown_deadline.as_secs(), "shutting down");
    crate::systemd::notify_or_log("STOPPING=1");
    let _ = stop_tx.send(true);
    let stopping = stop_in_order(http_task, mqtt_task, commands_task, ingest_task, adapt_tasks, events_task, watchdog_task, trainer, engine);
    match tokio::time::timeout(config.shutdown_deadline, stopping).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!("shutdown took longer than {} s; exiting with work unfinished (acked samples are already durable)", config.shutdown_deadline.as_secs()),
    }
}

/// Held for the life of the process: one daemon per state directory (two would interleave
/// adapter versions and fight over the sample store). The lock file names the holder.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] std::fs::File); // held, not read: the lock lives as long as the descriptor

pub fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<StateLock> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("state directory {}: {e} (it must be writable by the daemon's user)", dir.display()))?;
    let path = dir.join("adaptd.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("state directory {}: cannot write {}: {e} (it must be writable by the daemon's user)", dir.display(), path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!("state directory {} is in use by another adaptd ({}); one daemon per state directory", dir.display(), holder.trim());
    }
    file.set_len(0)?;
    write!(file, "pid {}", std::process::id())?;
    Ok(StateLock(file))
}

/// SIGHUP: re-read the configuration file; `[training]`, `[schedule]` and `[gate]` apply to each
/// task's loop from its next tick; anything else is reported as needing a restart. A file that
/// does not load is refused with its error, and the running configuration stays.
async fn reload_on_sighup(mut from: Option<(PathBuf, Config)>, loops: BTreeMap<String, watch::Sender<AdaptConfig>>, events: Events, stop: impl Future<Output = ()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; configuration reload is off");
        return;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! { _ = &mut stop => return, _ = hangups.recv() => {} }
        crate::systemd::notify_or_log("RELOADING=1");
        match &mut from {
            None => tracing::warn!("SIGHUP: started without --config, nothing to reload"),
            Some((path, running)) => match Config::load(path) {
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: configuration refused; the running one stays");
                    events.emit("", adaptd_protocol::Event::ConfigRefused { reason: e.to_string() });
                }
                Ok(new) => {
                    let needs_restart = running.restart_only_changes(&new);
                    for (task, tx) in &loops {
                        tx.send_replace(new.adapt_config(task));
                    }
                    if !needs_restart.is_empty() {
                        tracing::warn!(?needs_restart, "SIGHUP: these changed but apply only after a restart");
                    }
                    events.emit("", adaptd_protocol::Event::ConfigReloaded { applied: ["training", "schedule", "gate"].map(String::from).to_vec(), needs_restart: needs_restart.iter().map(|k| k.to_string()).collect() });
                    // What runs is the old value of restart-only keys: keep diffing against it.
                    let (training, schedule, gate) = (new.training, new.schedule, new.gate);
                    let keep = (running.training.device, running.training.threads);
                    running.training = training;
                    (running.training.device, running.training.threads) = keep;
                    running.schedule = schedule;
                    running.gate = gate;
                }
            },
        }
        crate::systemd::notify_or_log("READY=1");
    }
}

/// Stop the parts in dependency order: no new requests or samples, then the loops (which cancel
/// their jobs and discard the candidates), then the trainer and the engine.
#[allow(clippy::too_many_arguments)]
async fn stop_in_order(
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    mqtt_task: Option<tokio::task::JoinHandle<()>>,
    commands_task: Option<tokio::task::JoinHandle<()>>,
    ingest_task: Option<tokio::task::JoinHandle<()>>,
    adapt_tasks: Vec<tokio::task::JoinHandle<Result<(), adapt::AdaptError>>>,
    events_task: tokio::task::JoinHandle<()>,
    watchdog_task: Option<tokio::task::JoinHandle<()>>,
    trainer: Option<Arc<Trainer>>,
    engine: Engine,
) -> anyhow::Result<()> {
    if let Some(t) = watchdog_task {
        let _ = t.await;
    }
    if let Err(e) = http_task.await? {
        tracing::warn!(error = %e, "HTTP server stopped with an error");
    }
    if let Some(t) = mqtt_task {
        t.await?;
    }
    if let Some(t) = commands_task {
        t.await?;
    }
    if let Some(t) = ingest_task {
        t.await?;
    }
    for t in adapt_tasks {
        if let Err(e) = t.await? {
            tracing::error!(error = %e, "adaptation loop stopped with an error");
        }
    }
    let _ = events_task.await;
    if let Some(trainer) = trainer {
        // The loops cancelled their jobs; nothing else holds the trainer now.
        if let Ok(trainer) = Arc::try_unwrap(trainer) {
            tokio::task::spawn_blocking(move || trainer.shutdown()).await?;
        }
    }
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    Ok(())
}
