//! The task loop as a whole, on test doubles of the two runtimes: an engine backend whose
//! embedding is its input and whose classifier answers the larger of two values, and a trainer
//! that fits a nearest-class-mean head. Everything else is the daemon's own: the sample store,
//! the registry and its files, the scheduler, the gate, the events. The integration tests run
//! the same loop on ONNX Runtime and libtorch.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use adaptd_adapters::bundle::{Bundle, Manifest};
use adaptd_adapters::head::{Dense, Head, class_means, softmax_rows};
use adaptd_adapters::tensor::{HostTensor, SeededRng};
use adaptd_adapters::{AdapterKind, AdapterStore};
use adaptd_protocol::{Event, EventRecord};
use adaptd_train::{EpochRecord, FitReport, Progress, TrainError};
use tokio::sync::{mpsc, oneshot, watch};

use super::{AdaptConfig, AdapterChoice, Command, CommandKind, Context, Status};
use crate::engine::onnx::{ExecutionProvider, OnnxError};
use crate::engine::{Engine, EngineConfig, InferenceBackend, two_value_manifest};
use crate::events::{Events, Journal};
use crate::registry::Registry;
use crate::samples::{Sample, SampleInput, SampleStore, SplitPolicy};
use crate::scheduler::SchedulerState;
use crate::trainer::{TrainBackend, TrainJob, Trainer};

const TASK: &str = "sorter";

struct PairModel {
    manifest: Manifest,
}

impl InferenceBackend for PairModel {
    type Lora = ();

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn prepare_lora(&self, _lora: &[HostTensor]) -> Result<(), OnnxError> {
        Ok(())
    }

    fn run_prepared(&mut self, inputs: Vec<HostTensor>, _lora: &()) -> Result<Vec<HostTensor>, OnnxError> {
        let x = inputs.into_iter().next().ok_or_else(|| OnnxError::Run("no input".into()))?;
        Ok(vec![x.clone(), x])
    }
}

/// What the fake trainer hands back.
#[derive(Clone, Copy)]
enum Fits {
    /// The nearest class mean, as a linear head: what a real fit would reach on separable data.
    ClassMeans,
    /// The same head with its classes swapped: a candidate worse than what serves.
    Swapped,
}

struct MeansTrainer(Fits);

impl TrainBackend for MeansTrainer {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn fit(&self, job: &TrainJob, _cancel: &AtomicBool, progress: &mut dyn FnMut(&Progress)) -> Result<FitReport, TrainError> {
        let (classes, dim) = (job.init_head.classes(), 2);
        let embeddings = job.train.inputs.first().and_then(HostTensor::as_f32).ok_or_else(|| TrainError::Data("no embeddings".into()))?;
        let means = class_means(embeddings, &job.train.labels, classes, dim);
        let (mut weight, mut bias) = (Vec::new(), Vec::new());
        for mean in &means {
            let mean = mean.clone().unwrap_or_else(|| vec![0.0; dim]);
            bias.push(-0.5 * mean.iter().map(|v| v * v).sum::<f32>());
            weight.extend(mean);
        }
        if let Fits::Swapped = self.0 {
            weight = weight.chunks(dim).rev().flatten().copied().collect();
            bias.reverse();
        }
        progress(&Progress { epoch: 1, max_epochs: 1, step: 1, total_steps: 1, loss: 0.1, learning_rate: 0.0 });
        let head = Head {
            layers: vec![Dense {
                weight: HostTensor::f32(vec![classes, dim], weight).map_err(|e| TrainError::Data(e.to_string()))?,
                bias: HostTensor::f32(vec![classes], bias).map_err(|e| TrainError::Data(e.to_string()))?,
            }],
        };
        Ok(FitReport {
            head,
            lora: None,
            reft: None,
            epochs: vec![EpochRecord { epoch: 1, train_loss: 0.1, val_loss: 0.1, val_accuracy: 1.0, seconds: 0.0 }],
            best_epoch: 0,
            stopped_early: false,
            steps: 1,
            batch_size: job.train.len(),
            samples_per_second: 1.0,
            probe_bytes_per_sample: None,
            lora_dropout: 0.0,
            base_unchanged: None,
            losses: vec![0.1],
            mixed_precision: false,
            skipped_steps: 0,
            prefix: None,
        })
    }

    fn predict(&self, inputs: &[HostTensor], _slots: &[HostTensor], head: &Head) -> Result<Vec<f32>, TrainError> {
        let x = inputs.first().ok_or_else(|| TrainError::Data("no input".into()))?;
        let rows = x.shape.first().copied().unwrap_or(0);
        let mut scores = head.forward(x.as_f32().ok_or_else(|| TrainError::Data("not f32".into()))?, rows);
        softmax_rows(&mut scores, head.classes());
        Ok(scores)
    }
}

/// A daemon's state directory with the loop's parts over the doubles, and the loop running.
struct Running {
    _dir: tempfile::TempDir,
    store_path: std::path::PathBuf,
    split: SplitPolicy,
    registry: Arc<Registry>,
    events: mpsc::UnboundedReceiver<EventRecord>,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
    stop: oneshot::Sender<()>,
    task_loop: tokio::task::JoinHandle<()>,
    engine: Engine,
    parts: Arc<crate::app::Parts>,
}

/// The loop over `samples` already stored.
async fn start(fits: Fits, samples: &[Sample]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let bundle_dir = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    // The graph files are placeholders (the doubles stand in for the runtimes), listed with
    // their hashes as an exported bundle lists its graphs.
    let mut manifest = two_value_manifest();
    for name in ["serving.onnx", "train.pt"] {
        let bytes = format!("{name}: a placeholder").into_bytes();
        std::fs::write(bundle_dir.join(name), &bytes).unwrap();
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        manifest.files.insert(name.into(), adaptd_adapters::bundle::FileEntry { sha256, bytes: bytes.len() as u64 });
    }
    std::fs::write(bundle_dir.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let bundle = Bundle::open(&bundle_dir).unwrap();
    let (registry, _) = Registry::open(bundle, AdapterStore::open(dir.path().join("adapters")).unwrap(), 5).unwrap();
    let registry = Arc::new(registry);
    let engine =
        Engine::start_with(registry.clone(), EngineConfig::default(), |bundle| Ok((PairModel { manifest: bundle.manifest.clone() }, ExecutionProvider::Cpu)))
            .unwrap();
    let trainer = Trainer::start_with(move || Ok(MeansTrainer(fits))).unwrap();
    let store_path = dir.path().join("samples.db");
    let split = SplitPolicy { validation_percent: 20, holdout_percent: 20 };
    let (events, events_rx) = Events::channel();
    let ctx = Context {
        registry: registry.clone(),
        engine: engine.handle.clone(),
        trainer: Arc::new(trainer),
        store_path: store_path.clone(),
        split,
        text: None,
        events,
        journal: Journal::new(&dir.path().join("journal")),
        traffic: Default::default(),
    };
    let mut config = AdaptConfig::new(TASK);
    config.training.adapter = AdapterChoice::Head;
    config.training.escalate = false;
    // One candidate a job, so a test knows its versions (the refit is tested end to end).
    config.training.refit = false;
    config.schedule.trigger.min_new_samples = 100;
    config.schedule.tick = Duration::from_millis(20);
    // Whatever else the machine is doing, the device is never too busy for this job.
    config.schedule.limits.max_cpu_percent = 1000.0;
    config.schedule.limits.min_available_mb = 0;
    config.schedule.limits.sysfs_root = dir.path().join("no-sysfs");
    let (commands, commands_rx) = mpsc::channel(8);
    let (_installs, installs_rx) = mpsc::channel(1);
    let (_configs, configs_rx) = watch::channel(config.clone());
    let (status_tx, status) = watch::channel(Status::starting(TASK, 0));
    let mut store = SampleStore::open(&store_path, split).unwrap();
    store.insert_batch(samples).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let parts = Arc::new(crate::app::Parts::default());
    let channels = super::Channels { configs: configs_rx, commands: commands_rx, installs: installs_rx, status: status_tx };
    let task_loop = tokio::spawn(super::run(ctx, channels, parts.clone(), async move {
        let _ = stopped.await;
    }));
    Running { _dir: dir, store_path, split, registry, events: events_rx, status, commands, stop, task_loop, engine, parts }
}

/// `n` labelled samples. In the base domain `a` rows have the larger first value, as the base
/// model answers; `shifted`, the larger second one, and the base model gets every row wrong.
fn samples(n: usize, seed: u64, shifted: bool) -> Vec<Sample> {
    let mut rng = SeededRng::new(seed);
    (0..n)
        .map(|i| {
            let label = if i % 2 == 0 { "a" } else { "b" };
            let centre = if (label == "a") != shifted { [1.0, 0.2] } else { [0.2, 1.0] };
            let noise = rng.normal_vec(2, 0.1);
            let x = vec![centre[0] + noise[0], centre[1] + noise[1]];
            Sample {
                key: format!("{seed}-{i}"),
                task: TASK.into(),
                label: label.into(),
                input: SampleInput::Tensor(HostTensor::f32(vec![1, 2], x).unwrap()),
                weight: 1.0,
                source: None,
                timestamp_ms: 0,
                correction: false,
                request_id: None,
            }
        })
        .collect()
}

impl Running {
    /// Wait until `done` holds for the task's status, or fail after `limit` with the last one.
    async fn wait_for(&mut self, limit: Duration, done: impl Fn(&Status) -> bool) -> Status {
        let started = Instant::now();
        loop {
            let status = self.status.borrow().clone();
            if done(&status) {
                return status;
            }
            assert!(started.elapsed() < limit, "gave up waiting; the last status: {status:?}");
            let _ = tokio::time::timeout(Duration::from_millis(100), self.status.changed()).await;
        }
    }

    fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(record) = self.events.try_recv() {
            out.push(record.event);
        }
        out
    }

    /// Store more labelled samples beside the running loop (as ingest does, on a connection of
    /// its own).
    fn publish(&self, samples: &[Sample]) {
        SampleStore::open(&self.store_path, self.split).unwrap().insert_batch(samples).unwrap();
    }

    async fn command(&self, kind: CommandKind) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command { kind, by: "test".into(), reply }).await.unwrap();
        rx.await.unwrap()
    }

    async fn stop(self) {
        let Running { stop, task_loop, engine, .. } = self;
        let _ = stop.send(());
        task_loop.await.unwrap();
        tokio::task::spawn_blocking(move || engine.shutdown()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enough_shifted_samples_train_a_head_the_gate_promotes_and_an_operator_can_roll_back() {
    let mut running = start(Fits::ClassMeans, &samples(200, 1, true)).await;
    let status = running.wait_for(Duration::from_secs(30), |s| s.jobs.contains_key("promoted")).await;
    assert!(status.serving_version > 0, "{status:?}");

    // What serves is the candidate the gate judged, its decision kept with it.
    let serving = running.registry.current(TASK).unwrap();
    let manifest = serving.manifest.as_ref().unwrap();
    assert_eq!(manifest.kind, AdapterKind::Head);
    let decision = manifest.decision.as_ref().unwrap();
    assert!(decision.promote && decision.checks.iter().all(|c| c.passed), "{decision:?}");
    assert!(manifest.metrics["holdout_accuracy"] > 0.95 && manifest.metrics["incumbent_holdout_accuracy"] < 0.05, "{:?}", manifest.metrics);
    let events = running.events();
    let judged = events.iter().find_map(|e| match e {
        Event::GateDecision(job) => Some(job),
        _ => None,
    });
    assert!(judged.is_some_and(|j| j.promote && j.version == status.serving_version), "{events:?}");

    // An operator's rollback goes through the loop, and the base serves again.
    running.command(CommandKind::Rollback).await.unwrap();
    running.wait_for(Duration::from_secs(10), |s| s.serving_version == 0).await;
    assert_eq!(running.registry.current(TASK).unwrap().version, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_worse_than_what_serves_is_refused_and_nothing_changes() {
    let mut running = start(Fits::Swapped, &samples(200, 2, false)).await;
    let status = running.wait_for(Duration::from_secs(30), |s| s.jobs.contains_key("rejected")).await;
    assert_eq!((status.serving_version, status.jobs.get("promoted")), (0, None), "{status:?}");
    assert_eq!(running.registry.current(TASK).unwrap().version, 0);
    // The refusal names the check that failed, and the scheduler backs off before trying again.
    let decision = status.last_decision.unwrap_or_default();
    assert!(decision.contains("accuracy"), "{decision}");
    assert!(
        matches!(running.status.borrow().scheduler, SchedulerState::Backoff { .. } | SchedulerState::Cooldown { .. }),
        "{:?}",
        running.status.borrow().scheduler
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_rolls_a_promotion_back_when_fresh_labels_say_it_got_worse() {
    let mut running = start(Fits::ClassMeans, &samples(200, 3, true)).await;
    let promoted = running.wait_for(Duration::from_secs(30), |s| s.jobs.contains_key("promoted")).await.serving_version;
    // The cameras are turned back: fresh labels look like the base domain again, and the
    // promoted head gets them all wrong.
    running.publish(&samples(60, 4, false));
    running.wait_for(Duration::from_secs(30), |s| s.serving_version == 0).await;
    let events = running.events();
    let rolled_back = events.iter().find_map(|e| match e {
        Event::RolledBack { from_version, to_version, by, reason } => Some((*from_version, *to_version, by.clone(), reason.clone())),
        _ => None,
    });
    let (from, to, by, reason) = rolled_back.unwrap_or_else(|| panic!("no rollback event: {events:?}"));
    assert_eq!((from, to, by.as_str()), (promoted, 0, "watch"), "{reason}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_that_arrive_while_the_loop_runs_start_one_job_once_they_are_embedded() {
    let mut running = start(Fits::ClassMeans, &[]).await;
    running.publish(&samples(200, 5, true));
    let status = running.wait_for(Duration::from_secs(30), |s| s.jobs.contains_key("promoted")).await;
    // No job started before the engine had embedded what it would train on: none was deferred
    // for too few samples, and the first version number went to the promoted adapter.
    assert_eq!((status.jobs.get("deferred"), status.jobs.get("started"), status.serving_version), (None, Some(&1), 1), "{status:?}");
    running.stop().await;
}

/// The sample store fails under the loop (a full disk, here a trigger that refuses every write
/// of the job marks, which SQLite reports as it reports any write error). The loop stops on the
/// error, is shown down with the reason (status, parts, an event) while serving goes on, and is
/// restarted by itself; once the fault clears, the same request trains and promotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_fault_takes_the_loop_down_and_it_comes_back_by_itself_once_the_fault_clears() {
    let mut running = start(Fits::ClassMeans, &samples(60, 6, true)).await;
    let fault = rusqlite::Connection::open(&running.store_path).unwrap();
    fault
        .execute_batch(
            "CREATE TRIGGER full_disk_insert BEFORE INSERT ON marks BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
             CREATE TRIGGER full_disk_update BEFORE UPDATE ON marks BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
        )
        .unwrap();
    // A job must write its mark before it trains: the request finds the store failing.
    let answer = running.command(CommandKind::TrainNow).await;
    assert!(answer.is_err() || answer.as_ref().is_ok_and(|a| a.contains("training")), "{answer:?}");
    let down = running.wait_for(Duration::from_secs(10), |s| s.down.is_some()).await;
    assert!(down.down.as_deref().unwrap().contains("disk is full"), "{down:?}");
    assert_eq!(down.scheduler, SchedulerState::Idle, "no stale training state while down");
    let part = running.parts.get(&super::part_name(TASK)).unwrap();
    assert!(!part.up && part.reason.as_deref().unwrap().contains("disk is full"), "{part:?}");
    let events = running.events();
    assert!(events.iter().any(|e| matches!(e, Event::PartDown { part, reason, .. } if part == "loop:sorter" && reason.contains("disk is full"))), "{events:?}");
    // Serving goes on meanwhile.
    let x = HostTensor::f32(vec![1, 2], vec![1.0, 0.2]).unwrap();
    assert_eq!(running.engine.handle.infer(TASK, vec![x.clone()]).await.unwrap()[0].label(), "a");

    // The fault clears; the loop is back after its first wait (1 s) without a restart of anything else.
    fault.execute_batch("DROP TRIGGER full_disk_insert; DROP TRIGGER full_disk_update;").unwrap();
    running.wait_for(Duration::from_secs(10), |s| s.down.is_none()).await;
    let part = running.parts.get(&super::part_name(TASK)).unwrap();
    assert!(part.up && part.restarts == 1, "{part:?}");
    assert!(running.events().iter().any(|e| matches!(e, Event::PartRestarted { part, restarts: 1, .. } if part == "loop:sorter")));
    running.command(CommandKind::TrainNow).await.unwrap();
    let status = running.wait_for(Duration::from_secs(30), |s| s.jobs.contains_key("promoted")).await;
    assert!(status.serving_version > 0 && status.down.is_none(), "{status:?}");
    running.stop().await;
}

#[test]
fn the_ladder_takes_a_loreft_step_only_where_the_configuration_asks() {
    use super::{LoreftStep, TrainingConfig, parse_positions};
    let names = |t: &TrainingConfig, text: bool| t.escalation(text).iter().map(|k| k.label()).collect::<Vec<_>>();
    let mut t = TrainingConfig::default();
    assert_eq!(names(&t, true), ["lora-r8", "lora-r16"], "shipped: from the head to LoRA");
    t.loreft_step = LoreftStep::Auto;
    assert_eq!(names(&t, true), ["loreft-r4", "lora-r8", "lora-r16"], "auto: where the bundle edits text");
    assert_eq!(names(&t, false), ["lora-r8", "lora-r16"], "auto: not on image bundles");
    t.loreft_step = LoreftStep::Always;
    assert_eq!(names(&t, false)[0], "loreft-r4");
    t.adapter = AdapterChoice::Loreft;
    assert_eq!(names(&t, true), ["lora-r8", "lora-r16"], "a LoReFT job escalates to LoRA");
    assert_eq!(parse_positions("f3+l1").unwrap(), adaptd_adapters::reft::ReftPositions { first: 3, last: 1 });
    assert_eq!(parse_positions("l2").unwrap(), adaptd_adapters::reft::ReftPositions { first: 0, last: 2 });
    assert!(parse_positions("f1+f2").unwrap_err().contains("twice"));
}

#[test]
fn a_loreft_step_trains_at_loreft_s_learning_rate_and_the_others_at_the_recipe_s() {
    use super::TrainingConfig;
    use crate::trainer::JobKind;
    let t = TrainingConfig::default();
    assert_eq!(t.job_recipe().learning_rate, t.recipe.learning_rate, "a head job");
    let loreft = t.with_kind(JobKind::Loreft { rank: 4, positions: t.loreft_positions });
    assert_eq!(loreft.job_recipe().learning_rate, t.loreft_learning_rate);
    assert_ne!(t.loreft_learning_rate, t.recipe.learning_rate, "shipped: LoReFT's own rate");
    assert_eq!(loreft.job_recipe().head_learning_rate, t.recipe.head_learning_rate, "the head's rate is the recipe's");
    let lora = loreft.with_kind(JobKind::Lora { rank: 8, alpha: 8.0 });
    assert_eq!(lora.job_recipe().learning_rate, t.recipe.learning_rate, "the ladder's LoRA after LoReFT");
}
