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

use crate::adapt::{self, AdaptConfig};
use crate::api::mqtt;
use crate::api::{Api, TaskControl, http};
use crate::app::{Parts, Restarts, Stage, Supervisor};
use crate::config::Config;
use crate::engine::Engine;
use crate::events::{self, Events, Journal};
use crate::ingest::{Ingest, IngestConfig};
use crate::mqtt::{Link, LinkConfig, v5};
use crate::preprocess::TextEncoder;
use crate::registry::{Recovery, Registry};
use crate::samples::SampleStore;
use crate::trainer::Trainer;

/// Why serving could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    StateLock(#[from] StateLockError),
    #[error("state directory {}: {source}", dir.display())]
    StateDir { dir: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Bundle(#[from] adaptd_adapters::bundle::BundleError),
    #[error(transparent)]
    AdapterStore(#[from] adaptd_adapters::store::StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Text(#[from] crate::preprocess::PreprocessError),
    #[error(transparent)]
    Engine(#[from] crate::engine::onnx::OnnxError),
    #[error(transparent)]
    Trainer(#[from] crate::trainer::TrainerError),
    #[error(transparent)]
    Samples(#[from] crate::samples::StoreError),
    #[error("HTTP {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("a runtime's start or stop panicked: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}; exiting with work unfinished (acked samples are already durable)")]
    Unfinished(#[from] crate::app::StopError),
    #[error("shutdown took longer than {} s; still running: trainer or engine", deadline.as_secs())]
    RuntimesStuck { deadline: std::time::Duration },
}

impl ServeError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ServeError::StateLock(e) => e.error_type(),
            ServeError::StateDir { .. } => "state_dir",
            ServeError::Bundle(_) => "bundle",
            ServeError::AdapterStore(_) => "adapter_store",
            ServeError::Registry(_) => "registry",
            ServeError::Text(_) => "text_encoder",
            ServeError::Engine(_) => "engine",
            ServeError::Trainer(_) => "trainer",
            ServeError::Samples(_) => "samples",
            ServeError::Http { .. } => "http",
            ServeError::Control(_) => "control",
            ServeError::Join(_) => "panicked",
            ServeError::Unfinished(_) => "unfinished",
            ServeError::RuntimesStuck { .. } => "runtimes_stuck",
        }
    }
}

/// Serve `config` until `shutdown` completes; one adaptation loop per task in `ingest.tasks`.
/// `reload_from`: the file it came from, read again on SIGHUP. `bound` learns the HTTP address
/// once it listens (port 0 works).
pub async fn run(
    config: Config,
    reload_from: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), ServeError> {
    let adapt: Vec<AdaptConfig> = config.ingest.tasks.iter().map(|task| config.adapt_config(task)).collect();
    let broker = config.mqtt.connection();
    let _lock = lock_state_dir(&config.state_dir)?;
    let registry = open_registry(&config)?;
    let bundle = registry.bundle().clone();
    let text = match bundle.manifest.preprocessing {
        Preprocessing::Text { .. } => Some(Arc::new(TextEncoder::from_bundle(&bundle)?)),
        _ => None,
    };
    let engine = tokio::task::spawn_blocking({
        let (registry, engine_config) = (registry.clone(), config.engine.clone());
        move || Engine::start(registry, engine_config)
    })
    .await??;
    let mut supervisor = Supervisor::new();
    let topics = adaptd_protocol::Topics::new(&config.mqtt.topic_prefix, &config.mqtt.device_id);
    // The device's MQTT 3.1.1 link, shared by ingest, commands and events. Its session is
    // persistent while ingest runs; the client id is ingest's from before the link was shared,
    // so an upgraded device finds the samples the broker kept for it.
    let ingesting = broker.is_some() && !config.ingest.tasks.is_empty();
    let mut link = broker.clone().map(|broker| {
        Link::new(LinkConfig {
            broker,
            client_id: format!("adaptd-ingest-{}", config.mqtt.device_id),
            persistent: ingesting,
            max_outgoing_bytes: events::MAX_EVENT_BYTES,
            request_queue: 2 * config.ingest.max_batch + 256,
            availability: Some(topics.online()),
        })
    });
    // Events worth replaying are kept in an outbox until a clean stop has flushed them to the
    // broker; what a crash left behind goes out again first, under the numbers it had.
    let events_dir = config.state_dir.join("events");
    let (outbox, replay, last_seq) = match link.as_ref().map(|_| events::Outbox::open(&events_dir)) {
        Some(Ok((outbox, replay, last_seq))) => (Some(outbox), replay, last_seq),
        Some(Err(e)) => {
            tracing::error!(dir = %events_dir.display(), error = %e, "cannot open the event outbox; events are only as durable as the MQTT link");
            (None, Vec::new(), 0)
        }
        None => (None, Vec::new(), 0),
    };
    let keeps_outbox = outbox.is_some();
    let (events, events_rx) = Events::numbered_after(last_seq);
    let published = Arc::new(std::sync::atomic::AtomicU64::new(last_seq));
    let publisher = events::publish(events_rx, link.as_ref().map(Link::handle), topics.events(), outbox, replay, supervisor.stopped());
    supervisor.spawn_infallible(Stage::Outbound, "events", {
        let published = published.clone();
        async move {
            published.fetch_max(publisher.await, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let link_status = link.as_ref().map(|l| l.handle().status());

    let traffic = Arc::new(crate::traffic::TrafficLog::default());
    // The long-running parts under supervision (each task's loop, ingest): up, or down and why.
    let parts = Arc::new(Parts::default());
    // Training: one libtorch owner thread, one adaptation loop per task.
    let (trainer, control, adapt_configs) = match adapt.is_empty() {
        true => (None, BTreeMap::new(), BTreeMap::new()),
        false => {
            std::fs::create_dir_all(&config.state_dir).map_err(|source| ServeError::StateDir { dir: config.state_dir.clone(), source })?;
            let trainer = tokio::task::spawn_blocking({
                let (bundle, trainer_config) = (bundle.clone(), config.training.trainer.clone());
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
                split: config.ingest.split,
                text: text.clone(),
                events: events.clone(),
                journal: Journal::new(&config.state_dir.join("journal")),
                traffic: traffic.clone(),
            };
            let (control, adapt_configs) = spawn_task_loops(&mut supervisor, &context, &adapt, &parts);
            (Some(trainer), control, adapt_configs)
        }
    };
    let ingest = match link.as_mut().filter(|_| ingesting) {
        Some(link) => {
            let store = SampleStore::open(&config.state_dir.join(crate::samples::STORE_FILE), config.ingest.split)?;
            let ingest_config = IngestConfig { topics: topics.clone(), max_batch: config.ingest.max_batch, max_payload_bytes: config.ingest.max_payload_bytes };
            let manifest = Arc::new(bundle.manifest.clone());
            Some(Ingest::on_link(link, ingest_config, Arc::new(Mutex::new(store)), manifest, config.ingest.tasks.clone()))
        }
        None => None,
    };
    // Label requests, where there is a broker to send them to and a task that adapts.
    let label_requests = match (&link, config.labels.requests && !adapt_configs.is_empty()) {
        (Some(link), true) => {
            let shared = Arc::new(crate::labels::service::LabelRequests::new(config.state_dir.join(crate::samples::STORE_FILE)));
            let parts = crate::labels::service::RequestParts {
                shared: shared.clone(),
                engine: engine.handle.clone(),
                registry: registry.clone(),
                text: text.clone(),
                store_path: config.state_dir.join(crate::samples::STORE_FILE),
                split: config.ingest.split,
                link: link.handle(),
                topics: topics.clone(),
                events: events.clone(),
                journal: Journal::new(&config.state_dir.join("journal")),
                configs: adapt_configs.iter().map(|(task, tx)| (task.clone(), tx.subscribe())).collect(),
                max_request_bytes: config.http.max_request_bytes,
            };
            supervisor.spawn_infallible(Stage::Outbound, "label-requests", crate::labels::service::run(parts, supervisor.stopped()));
            Some(shared)
        }
        _ => None,
    };
    let http_error = |source| ServeError::Http { addr: config.http.listen, source };
    let listener = http::bind(config.http.listen).map_err(http_error)?;
    let addr = listener.local_addr().map_err(http_error)?;
    let token = crate::control::ensure_token(&config.state_dir)?;
    let fleet_control = control.clone();
    let api = Arc::new(
        Api::new(engine.handle.clone(), text, config.http.max_request_bytes)
            .with_control(control)
            .with_auth(token, addr)
            .with_traffic(traffic)
            .with_telemetry(ingest.as_ref().map(|(i, _)| i.stats.clone()), &config.schedule.limits.sysfs_root)
            .with_link(link.as_ref().map(|l| l.handle().status()))
            .with_parts(parts.clone())
            .with_label_requests(label_requests),
    );
    tracing::info!(%addr, tasks = ?registry.tasks(), "serving");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    supervisor.spawn(Stage::Intake, "http", http::serve(listener, api.clone(), config.http.limits(), supervisor.stopped()));
    // Operator commands over MQTT for the tasks that adapt (also through HTTP and the CLI).
    if let (Some(link), Some(key_file)) = (link.as_mut(), config.mqtt.commands_key())
        && !adapt.is_empty()
    {
        let verifier =
            crate::control::CommandVerifier::from_key_file(key_file, &config.mqtt.device_id)?.remembering(config.state_dir.join(COMMANDS_TAKEN_FILE));
        let inbox = crate::api::commands::subscribe(link, &topics, config.http.max_request_bytes);
        let commands = crate::api::commands::run(api.clone(), inbox, topics.clone(), verifier, events.clone(), supervisor.stopped());
        supervisor.spawn_infallible(Stage::Intake, "mqtt-commands", commands);
    }
    // The fleet agent, for the tasks that adapt: releases judged by their loops.
    if let Some(link) = link.as_mut().filter(|_| config.fleet.enabled() && !fleet_control.is_empty()) {
        let parts = crate::fleet::AgentParts {
            config: config.fleet.clone(),
            dir: config.state_dir.join("fleet"),
            topics: topics.clone(),
            inbox: crate::fleet::subscribe(link, &topics),
            link: link.handle(),
            serving: fleet_control.keys().map(|t| (t.clone(), registry.current(t).map_or(0, |s| s.version))).collect(),
            control: fleet_control,
            events: events.clone(),
            base_sha256: bundle.manifest_sha256.clone(),
            engine: engine.handle.clone(),
            latency_budget_ms: config.schedule.trigger.latency_budget_ms,
        };
        supervisor.spawn_infallible(Stage::Intake, "fleet", crate::fleet::run(parts, supervisor.stopped()));
    }
    if let Some((ingest, inbox)) = ingest {
        let restarts = Restarts { part: "ingest".into(), task: String::new(), parts: parts.clone(), events: events.clone() };
        supervisor.spawn_infallible(Stage::Intake, "ingest", ingest.supervise(inbox, restarts, supervisor.stopped()));
    }
    if let Some(link) = link {
        supervisor.spawn_infallible(Stage::Link, "mqtt", link.run(supervisor.links_stopped()));
    }
    // The MQTT 5 link, for the inference API alone.
    if let Some(broker) = broker.filter(|_| config.mqtt.inference_api) {
        let mut link = v5::Link::new(broker, format!("adaptd-{}", config.mqtt.device_id), mqtt::read_limit(api.max_request_bytes()));
        let inbox = mqtt::subscribe(&mut link, &topics);
        supervisor.spawn_infallible(Stage::Intake, "mqtt-inference", mqtt::run(api.clone(), link.client(), inbox, topics.clone(), supervisor.stopped()));
        supervisor.spawn_infallible(Stage::Link, "mqtt5", link.run(supervisor.links_stopped()));
    }

    // The engine warmed up before we listened: ready now, not when the broker answers.
    crate::systemd::notify_or_log(&format!("READY=1\nSTATUS=serving {} task(s) on http://{addr}", registry.tasks().len()));
    if let Some(every) = crate::systemd::watchdog_interval() {
        spawn_watchdog(&mut supervisor, engine.handle.clone(), every);
    }
    let deadline = config.stop_deadline;
    let reload = reload_on_sighup(reload_from.map(|path| (path, config)), adapt_configs, events.clone(), supervisor.stopped());
    supervisor.spawn_infallible(Stage::Intake, "reload", reload);

    shutdown.await;
    stop_in_order(supervisor, trainer, engine, deadline).await?;
    // Everything handed to the link went out before its DISCONNECT: nothing to replay.
    if keeps_outbox && link_status.is_some_and(|s| s.flushed.load(std::sync::atomic::Ordering::Relaxed)) {
        let last = published.load(std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = events::Outbox::delivered(&events_dir, last) {
            tracing::warn!(error = %e, "could not record the events delivered; the next start publishes them again");
        }
    }
    Ok(())
}

/// The signed MQTT commands taken within their window, kept across restarts (replays refused).
pub const COMMANDS_TAKEN_FILE: &str = "commands-taken.json";

/// The bundle, the adapter store and the registry over them, every task this device serves
/// present (the bundle's own classifier, if it has one, as a task named after the bundle).
fn open_registry(config: &Config) -> Result<Arc<Registry>, ServeError> {
    let bundle = Bundle::open(&config.bundle)?;
    let store = AdapterStore::open(config.state_dir.join("adapters"))?;
    let (registry, recovered) = Registry::open(bundle, store, config.adapters.keep_versions)?;
    for event in &recovered {
        match event {
            Recovery::Restored { task, version } => tracing::info!(task, version, "adapter restored"),
            Recovery::Skipped { task, version, reason } => tracing::warn!(task, version, reason, "adapter version skipped"),
            Recovery::Base { task } => tracing::warn!(task, "no readable adapter: serving the base model"),
        }
    }
    let manifest = &registry.bundle().manifest;
    if manifest.labels.is_some() {
        registry.ensure_task(&manifest.name)?;
    }
    for task in &config.ingest.tasks {
        registry.ensure_task(task)?;
    }
    Ok(Arc::new(registry))
}

/// Stop within `deadline`: the tasks in their stages (intake first), then the runtimes, which
/// no request or job can reach by then.
async fn stop_in_order(supervisor: Supervisor, trainer: Option<Arc<Trainer>>, engine: Engine, deadline: std::time::Duration) -> Result<(), ServeError> {
    tracing::info!(deadline_s = deadline.as_secs(), "shutting down");
    crate::systemd::notify_or_log("STOPPING=1");
    let started = std::time::Instant::now();
    supervisor.stop(deadline).await?;
    let left = deadline.saturating_sub(started.elapsed());
    let runtimes = async move {
        if let Some(trainer) = trainer.and_then(|t| Arc::try_unwrap(t).ok()) {
            tokio::task::spawn_blocking(move || trainer.shutdown()).await?;
        }
        tokio::task::spawn_blocking(move || engine.shutdown()).await
    };
    match tokio::time::timeout(left, runtimes).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ServeError::RuntimesStuck { deadline }),
    }
}

/// Feed systemd's watchdog only while the engine's owner thread answers: a wedged engine gets
/// the service restarted instead of serving nothing forever.
fn spawn_watchdog(supervisor: &mut Supervisor, engine: crate::engine::EngineHandle, every: std::time::Duration) {
    let stop = supervisor.stopped();
    supervisor.spawn_infallible(Stage::Intake, "watchdog", async move {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! { _ = &mut stop => return, _ = tick.tick() => {} }
            if engine.heartbeat(every).await {
                crate::systemd::notify_or_log("WATCHDOG=1");
            } else {
                tracing::error!("engine heartbeat missed; not feeding the systemd watchdog");
            }
        }
    });
}

/// One adaptation loop per task, under the supervisor. Returns how the API and the fleet agent
/// reach each loop, and the senders a configuration reload (SIGHUP) reaches them with.
fn spawn_task_loops(
    supervisor: &mut Supervisor,
    context: &adapt::Context,
    tasks: &[AdaptConfig],
    parts: &Arc<Parts>,
) -> (BTreeMap<String, TaskControl>, Reloads) {
    let (mut control, mut reloads) = (BTreeMap::new(), BTreeMap::new());
    for adapt_config in tasks {
        let (commands_tx, commands_rx) = mpsc::channel(8);
        let (installs_tx, installs_rx) = mpsc::channel(1);
        let (config_tx, config_rx) = watch::channel(adapt_config.clone());
        reloads.insert(adapt_config.task.clone(), config_tx);
        // What recovery chose serves from the start: the loop's first tick is later.
        let serving_version = context.registry.current(&adapt_config.task).map_or(0, |s| s.version);
        let (status_tx, status_rx) = watch::channel(adapt::Status::starting(&adapt_config.task, serving_version));
        control.insert(adapt_config.task.clone(), TaskControl { commands: commands_tx, installs: installs_tx, status: status_rx });
        let channels = adapt::Channels { configs: config_rx, commands: commands_rx, installs: installs_rx, status: status_tx };
        let task_loop = adapt::run(context.clone(), channels, parts.clone(), supervisor.stopped());
        supervisor.spawn_infallible(Stage::Loops, adapt::part_name(&adapt_config.task), task_loop);
    }
    (control, reloads)
}

/// Each task loop's settings, for SIGHUP.
type Reloads = BTreeMap<String, watch::Sender<AdaptConfig>>;

/// Held for the life of the process: one daemon per state directory (two would interleave
/// adapter versions and fight over the sample store). The lock file names the holder.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] std::fs::File); // held, not read: the lock lives as long as the descriptor

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error("state directory {dir} is in use by another adaptd ({holder}); one daemon per state directory")]
    InUse { dir: PathBuf, holder: String },
    #[error("state directory {dir}: {reason} (it must be writable by the daemon's user)")]
    Io { dir: PathBuf, reason: String },
}

impl StateLockError {
    pub fn error_type(&self) -> &'static str {
        match self {
            StateLockError::InUse { .. } => "in_use",
            StateLockError::Io { .. } => "io",
        }
    }
}

pub fn lock_state_dir(dir: &std::path::Path) -> Result<StateLock, StateLockError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let io = |reason: String| StateLockError::Io { dir: dir.to_path_buf(), reason };
    std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
    let path = dir.join("adaptd.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(format!("cannot write {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
        return Err(StateLockError::InUse { dir: dir.to_path_buf(), holder });
    }
    file.set_len(0).map_err(|e| io(e.to_string()))?;
    write!(file, "pid {}", std::process::id()).map_err(|e| io(e.to_string()))?;
    Ok(StateLock(file))
}

/// SIGHUP: re-read the configuration file; `[training]`, `[schedule]` and `[gate]` apply to each
/// task's loop from its next tick; anything else is reported as needing a restart. A file that
/// does not load is refused with its error, and the running configuration stays.
async fn reload_on_sighup(
    mut from: Option<(PathBuf, Config)>,
    loops: BTreeMap<String, watch::Sender<AdaptConfig>>,
    events: Events,
    stop: impl Future<Output = ()>,
) {
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
                    let needs_restart = running.reload(new);
                    for (task, tx) in &loops {
                        tx.send_replace(running.adapt_config(task));
                    }
                    if !needs_restart.is_empty() {
                        tracing::warn!(?needs_restart, "SIGHUP: these changed but apply only after a restart");
                    }
                    events.emit(
                        "",
                        adaptd_protocol::Event::ConfigReloaded {
                            applied: ["training", "schedule", "gate"].map(String::from).to_vec(),
                            needs_restart: needs_restart.iter().map(|k| k.to_string()).collect(),
                        },
                    );
                }
            },
        }
        crate::systemd::notify_or_log("READY=1");
    }
}
