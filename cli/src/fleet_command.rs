//! `adaptd fleet ...`: the operator's side of fleet rollout and fleet learning: the signed
//! repository and its releases, aggregation of the devices' offers, rollouts and their
//! controller, and a device's own offer.

use std::path::PathBuf;
use std::process::ExitCode;

use adaptd_fleet::repo::{self, Expiry};
use clap::Subcommand;

use crate::{operate, parse_host_port, shutdown_signal};

/// Where the operator's keys and the repository live.
#[derive(clap::Args)]
pub(crate) struct RepoArgs {
    /// The directory of the four role keys (`adaptd fleet keygen` writes it; keep root.pk8 offline).
    #[arg(long)]
    keys: PathBuf,
    /// The repository directory (what the HTTP server serves).
    #[arg(long)]
    repo: PathBuf,
    /// Print JSON for scripts instead of text.
    #[arg(long)]
    json: bool,
}

/// Which offers are combined, and how.
#[derive(clap::Args)]
pub(crate) struct CombineArgs {
    /// Where the devices' offers arrive (an upload directory, or their shared `[fleet] offers`).
    #[arg(long)]
    offers_dir: PathBuf,
    /// The model bundle the devices serve.
    #[arg(long)]
    bundle: PathBuf,
    /// cat, svd or linear [default: cat when the stacked ranks fit, else svd].
    #[arg(long, value_parser = parse_rule)]
    rule: Option<adaptd_adapters::aggregate::Rule>,
    /// Refuse an svd fit that leaves more than this share of the update (relative Frobenius norm).
    #[arg(long, default_value_t = 0.5)]
    max_residual: f64,
    /// A device's weight counts at most this many training samples.
    #[arg(long)]
    cap: Option<u64>,
}

impl CombineArgs {
    fn options(&self) -> adaptd_daemon::fleet::aggregate::Options {
        adaptd_daemon::fleet::aggregate::Options { rule: self.rule, max_residual: self.max_residual, cap: self.cap }
    }
}

/// Where a rollout's controller keeps its state and reaches the fleet.
#[derive(clap::Args)]
pub(crate) struct ControllerArgs {
    /// The rollout's state file (written atomically after every step).
    #[arg(long)]
    state: PathBuf,
    /// The fleet's MQTT broker, host:port.
    #[arg(long)]
    mqtt: String,
    /// The topic prefix the devices use.
    #[arg(long, default_value = adaptd_protocol::topics::DEFAULT_PREFIX)]
    prefix: String,
    /// Print the final state as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct PublishArgs {
    task: String,
    /// The adapter version in the state directory (ignored with `--from`).
    version: Option<u64>,
    /// An exported adapter directory instead.
    #[arg(long)]
    from: Option<PathBuf>,
    /// The release number [default: one past the task's newest].
    #[arg(long)]
    release: Option<u64>,
    /// The release it was trained from.
    #[arg(long)]
    parent: Option<u64>,
    /// Let devices install it without their own gate (`force` policy).
    #[arg(long)]
    allow_force: bool,
    /// The state directory holding the version.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    repo: RepoArgs,
}

#[derive(clap::Args)]
pub(crate) struct AggregateArgs {
    task: String,
    /// Offers by name (`<device>.<task>.v<version>`), comma-separated [default: the newest
    /// offer of each device for the task that was trained from `--parent`].
    #[arg(long, value_delimiter = ',')]
    offers: Vec<String>,
    /// The release the devices trained from [default: the base model].
    #[arg(long)]
    parent: Option<u64>,
    #[command(flatten)]
    combine: CombineArgs,
    /// The release number [default: one past the task's newest].
    #[arg(long)]
    release: Option<u64>,
    /// Also keep the aggregate's files in this (new) directory.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    repo: RepoArgs,
}

#[derive(clap::Args)]
pub(crate) struct LearnArgs {
    task: String,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The devices (their MQTT device ids), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    devices: Vec<String>,
    /// The release the first round trains on from.
    #[arg(long)]
    parent: Option<u64>,
    #[command(flatten)]
    combine: CombineArgs,
    /// The rounds' rollout states and report.
    #[arg(long)]
    state_dir: PathBuf,
    /// How long a round waits for the offers after the devices scored its release.
    #[arg(long, default_value_t = 1800)]
    offer_timeout_s: u64,
    /// A device that has not ended a rollout this long after its assignment has failed.
    #[arg(long, default_value_t = 1800)]
    device_timeout_s: u64,
    /// How the last release rolls out.
    #[arg(long, default_value = "validate", value_parser = parse_policy)]
    final_policy: adaptd_protocol::fleet::Policy,
    /// The fleet's MQTT broker, host:port.
    #[arg(long)]
    mqtt: String,
    #[arg(long, default_value = adaptd_protocol::topics::DEFAULT_PREFIX)]
    prefix: String,
    #[command(flatten)]
    repo: RepoArgs,
}

#[derive(clap::Args)]
pub(crate) struct RolloutArgs {
    task: String,
    release: u64,
    /// The devices (their MQTT device ids), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    devices: Vec<String>,
    /// Wave sizes, e.g. `1,2,2` (a canary, then pairs); the last wave takes the rest.
    #[arg(long, value_delimiter = ',', default_value = "1,100000")]
    waves: Vec<usize>,
    /// validate (the device's own gate), force (where the release allows it) or shadow.
    #[arg(long, default_value = "validate", value_parser = parse_policy)]
    policy: adaptd_protocol::fleet::Policy,
    /// A wave is done when this share of its devices succeeded.
    #[arg(long, default_value_t = 100.0)]
    success_percent: f64,
    /// Halt after this many failed devices.
    #[arg(long, default_value_t = 1)]
    max_failures: usize,
    /// A device that has not finished this long after its assignment has failed.
    #[arg(long, default_value_t = 1800)]
    device_timeout_s: u64,
    /// At most this many assignments a minute.
    #[arg(long)]
    per_minute: Option<u32>,
    /// Assign an older release on purpose.
    #[arg(long)]
    rollback: bool,
    /// The repository directory: the release's base model is read from it, and devices
    /// whose status says they serve another base are left out, listed with the reason.
    #[arg(long)]
    repo: Option<PathBuf>,
    #[command(flatten)]
    control: ControllerArgs,
}

#[derive(Subcommand)]
pub(crate) enum FleetCommand {
    /// Make an Ed25519 key for each TUF role (root, targets, snapshot, timestamp); never overwrites.
    Keygen {
        #[arg(long)]
        keys: PathBuf,
    },
    /// Start a repository: root.json (the file devices ship with) and an empty release list.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Publish an adapter version as a release: from this device's state directory, or from a
    /// directory `adapters export` wrote (`--from`).
    Publish(PublishArgs),
    /// Fleet learning: combine devices' offers of a task (trained from the same parent on the same
    /// base, same kind and modules) into one adapter and publish it as a release. LoRA updates
    /// are summed weighted by training samples (exact `cat` when the ranks fit the bundle, else
    /// `svd` to its rank_max); heads over the union of labels. Roll it out in `shadow` first.
    Aggregate(AggregateArgs),
    /// Fleet learning in rounds: roll the current release out with the `train` policy (each
    /// device scores it, trains on from it, offers the result into its `[fleet] offers`), wait
    /// for the offers, aggregate them into the next release; after the last round roll that
    /// release out under `--final-policy`. Without `--parent` the devices' offers trained from
    /// the base model make the first release. Each round's figures go to `<state-dir>/learn.json`.
    Learn(LearnArgs),
    /// The fleet page of the HTML report, from `fleet learn`'s state directory: each round's
    /// release on each device (shadow scores), what each device's offer reached, the rounds'
    /// offers and weights, and every rollout's table.
    Report {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value = "adaptd-fleet.html")]
        out: PathBuf,
    },
    /// Withdraw a release: devices refuse it from their next update on.
    Yank {
        task: String,
        release: u64,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Sign the metadata again with fresh expiry dates (run it from a timer, well inside 7 days).
    Refresh {
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Roll a release out to devices in waves, and follow it to the end (a live table). The
    /// state is kept in `--state`: `fleet controller` takes over from it after a restart.
    Rollout(RolloutArgs),
    /// Take every device that applied the rollout saved in `--from` back to an older release,
    /// in one wave, followed to the end like a rollout (its state in `--state`).
    Rollback {
        /// The rollout to undo.
        #[arg(long)]
        from: PathBuf,
        /// The release to go back to.
        #[arg(long)]
        to: u64,
        /// validate (the device's own gate), force (where the release allows it) or shadow.
        #[arg(long, default_value = "validate", value_parser = parse_policy)]
        policy: adaptd_protocol::fleet::Policy,
        #[command(flatten)]
        control: ControllerArgs,
    },
    /// Run (or take over) the rollout saved in `--state` until it ends.
    Controller {
        #[command(flatten)]
        control: ControllerArgs,
    },
    /// The rollout saved in `--state`: devices × states.
    Status {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pause a rollout: no new assignments until `resume`.
    Pause {
        #[arg(long)]
        state: PathBuf,
    },
    /// Resume a paused rollout.
    Resume {
        #[arg(long)]
        state: PathBuf,
    },
    /// Stop assigning for good.
    Abort {
        #[arg(long)]
        state: PathBuf,
    },
    /// Offer an adapter of this device up to the operator (its files and figures, no sample) by
    /// HTTP PUT into the offers directory the operator reviews.
    Offer {
        task: String,
        version: u64,
        /// Where offers go, e.g. `https://fleet.example/offers/` (a WebDAV directory or an upload
        /// URL), or a directory on a shared mount.
        #[arg(long)]
        to: String,
        /// The daemon's configuration (its state directory and device id).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        device: Option<String>,
    },
    /// The offers in a directory, newest first: device, task, version, figures.
    Offers {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The releases the repository publishes now.
    List {
        /// The repository directory.
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Run one `fleet` command.
pub(crate) fn run(command: FleetCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let expiry = Expiry::default();
    match command {
        FleetCommand::Keygen { keys } => operate(false, || {
            let written = repo::keygen(&keys)?;
            let list: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            Ok((
                format!("{}\nkeep {} offline: only `fleet init` and a new root need it\n", list.join("\n"), repo::key_path(&keys, "root").display()),
                serde_json::json!(list),
            ))
        }),
        FleetCommand::Init { repo: r } => operate(r.json, || {
            let root = runtime.block_on(repo::init(&r.keys, &r.repo, expiry))?;
            Ok((format!("repository at {}; devices trust {}\n", r.repo.display(), root.display()), serde_json::json!({ "root": root })))
        }),
        FleetCommand::Publish(args) => publish(args, &runtime, expiry),
        FleetCommand::Aggregate(args) => aggregate(args, &runtime, expiry),
        FleetCommand::Learn(args) => learn(args, expiry),
        FleetCommand::Report { state_dir, out } => report(&state_dir, &out),
        FleetCommand::Yank { task, release, repo: r } => operate(r.json, || {
            let n = runtime.block_on(repo::yank(&r.keys, &r.repo, &task, release, expiry))?;
            Ok((format!("{task} release {release} yanked ({n} targets withdrawn)\n"), serde_json::json!({ "task": task, "release": release, "targets": n })))
        }),
        FleetCommand::Refresh { repo: r } => operate(r.json, || {
            runtime.block_on(repo::refresh(&r.keys, &r.repo, expiry))?;
            Ok((
                format!("signed again; the timestamp is valid for {} days\n", expiry.timestamp_days),
                serde_json::json!({ "timestamp_days": expiry.timestamp_days }),
            ))
        }),
        FleetCommand::Rollout(args) => rollout(args, &runtime),
        FleetCommand::Rollback { from, to, policy, control } => {
            anyhow::ensure!(!control.state.exists(), "{} exists: a rollout is saved there", control.state.display());
            let undone = adaptd_daemon::fleet::controller::load(&from)?;
            let plan = undone.rollback_plan(format!("{}-back-to-r{to}", undone.plan.id), to, policy);
            anyhow::ensure!(!plan.waves[0].is_empty(), "no device applied {}; nothing to take back", undone.plan.id);
            adaptd_daemon::fleet::controller::save(&control.state, &adaptd_fleet::controller::Rollout::new(plan, Default::default()))?;
            run_controller(&control)
        }
        FleetCommand::Controller { control } => run_controller(&control),
        FleetCommand::Status { state, json } => operate(json, || {
            let rollout = adaptd_daemon::fleet::controller::load(&state)?;
            Ok((rollout.table(), serde_json::to_value(&rollout)?))
        }),
        FleetCommand::Pause { state } => controller_request(&state, adaptd_daemon::fleet::controller::Request::Pause),
        FleetCommand::Resume { state } => controller_request(&state, adaptd_daemon::fleet::controller::Request::Resume),
        FleetCommand::Abort { state } => controller_request(&state, adaptd_daemon::fleet::controller::Request::Abort),
        FleetCommand::Offer { task, version, to, config, state_dir, device } => operate(false, || {
            let config = match &config {
                Some(path) => adaptd_daemon::config::Config::load(path)?,
                None => adaptd_daemon::config::Config::default(),
            };
            let state_dir = state_dir.unwrap_or(config.state_dir);
            let device = device.unwrap_or(config.mqtt.device_id);
            let store = adaptd_adapters::AdapterStore::open(state_dir.join("adapters"))?;
            let adapter = store.load(&task, version)?;
            // A relative path: a directory on a shared mount, from here.
            let to = if url::Url::parse(&to).is_ok() { to } else { std::path::absolute(&to)?.display().to_string() };
            let base = adaptd_daemon::fleet::offers_location(&to).map_err(|e| anyhow::anyhow!("--to {e}"))?.ok_or_else(|| anyhow::anyhow!("--to is empty"))?;
            let parent = adaptd_daemon::fleet::aggregate::fleet_parent(&store, &adapter.manifest);
            let (offer, files) = adaptd_daemon::fleet::offer_of(&adapter, &device, parent, &tempfile_dir(&state_dir)?).map_err(|e| anyhow::anyhow!(e))?;
            let at = runtime.block_on(adaptd_fleet::offer::upload(&base, &offer, &files))?;
            Ok((format!("{} offered at {at}\n", adapter.manifest.id()), serde_json::json!({ "offer": offer, "at": at.to_string() })))
        }),
        FleetCommand::Offers { dir, json } => operate(json, || {
            let adaptd_fleet::offer::Offers { found: offers, unreadable: bad } = adaptd_fleet::offer::list(&dir)?;
            let mut text = String::from("device            task        version  kind   holdout  samples (train/val/holdout)  directory\n");
            for (o, path) in &offers {
                let holdout = o.metrics.get("holdout_accuracy").map_or("-".into(), |a| format!("{a:.3}"));
                let counts = format!("{}/{}/{}", o.samples.train, o.samples.validation, o.samples.holdout);
                text += &format!("{:<17} {:<11} {:>7}  {:<5}  {holdout:>7}  {counts:<27}  {}\n", o.device, o.task, o.version, o.kind, path.display());
            }
            for b in &bad {
                text += &format!("unreadable: {b}\n");
            }
            let list: Vec<serde_json::Value> = offers.iter().map(|(o, p)| serde_json::json!({ "offer": o, "dir": p })).collect();
            Ok((text, serde_json::json!({ "offers": list, "unreadable": bad })))
        }),
        FleetCommand::List { repo: dir, json } => operate(json, || {
            let releases = runtime.block_on(repo::list(&dir))?;
            let mut text = String::from("task        release  kind  parent  force  base\n");
            for p in &releases {
                let parent = p.parent.map_or("-".into(), |v| v.to_string());
                text += &format!(
                    "{:<11} {:>7}  {:<5} {:>6}  {:<5}  {}\n",
                    p.task,
                    p.release,
                    p.kind,
                    parent,
                    p.allow_force,
                    &p.base_sha256[..p.base_sha256.len().min(12)]
                );
            }
            Ok((text, serde_json::to_value(&releases)?))
        }),
    }
}

fn publish(
    PublishArgs { task, version, from, release, parent, allow_force, state_dir, repo: r }: PublishArgs,
    runtime: &tokio::runtime::Runtime,
    expiry: Expiry,
) -> anyhow::Result<ExitCode> {
    operate(r.json, || {
        let adapter = match (&from, version) {
            (Some(dir), _) => adaptd_adapters::Adapter::read_dir(dir)?,
            (None, Some(v)) => {
                let state_dir = state_dir.clone().unwrap_or_else(|| adaptd_daemon::config::Config::default().state_dir);
                adaptd_adapters::AdapterStore::open(state_dir.join("adapters"))?.load(&task, v)?
            }
            (None, None) => anyhow::bail!("name the adapter: a VERSION in the state directory, or --from DIR"),
        };
        anyhow::ensure!(adapter.manifest.task == task, "the adapter is for task {:?}, not {task:?}", adapter.manifest.task);
        let release = match release {
            Some(r) => r,
            None => runtime.block_on(repo::next_release(&r.repo, &task))?,
        };
        let (info, names) = publish_release(runtime, &adapter, release, parent, allow_force, &r, expiry)?;
        Ok((
            format!("{} published as {task} release {release}: {}\n", adapter.manifest.id(), names.join(", ")),
            serde_json::json!({ "release": info, "targets": names }),
        ))
    })
}

fn aggregate(
    AggregateArgs { task, offers: wanted, parent, combine, release, out, repo: r }: AggregateArgs,
    runtime: &tokio::runtime::Runtime,
    expiry: Expiry,
) -> anyhow::Result<ExitCode> {
    operate(r.json, || {
        use adaptd_daemon::fleet::aggregate::{Parent, aggregate};
        let bundle = adaptd_adapters::Bundle::open(&combine.bundle)?;
        let offers_dir = &combine.offers_dir;
        let release = match release {
            Some(r) => r,
            None => runtime.block_on(repo::next_release(&r.repo, &task))?,
        };
        let parent_of = runtime.block_on(Parent::read(&bundle, &r.repo, &task, parent, &tempfile_dir(&r.repo)?))?;
        let found = adaptd_fleet::offer::list(offers_dir)?.found;
        let chosen: Vec<_> = if wanted.is_empty() {
            adaptd_daemon::fleet::aggregate::newest_offers(&found, &task, parent, None)
        } else {
            let mut chosen = Vec::new();
            for name in &wanted {
                let hit = found.iter().find(|(o, _)| &adaptd_fleet::offer::offer_name(o) == name);
                chosen.push(hit.cloned().ok_or_else(|| anyhow::anyhow!("no whole offer named {name:?} in {}", offers_dir.display()))?);
            }
            chosen
        };
        let mut offers = Vec::with_capacity(chosen.len());
        for (offer, dir) in chosen {
            let adapter = adaptd_adapters::Adapter::read_dir(&dir).map_err(|e| anyhow::anyhow!("offer {}: {e}", adaptd_fleet::offer::offer_name(&offer)))?;
            offers.push((offer, adapter));
        }
        let combined = aggregate(&task, release, &bundle, &parent_of, &offers, combine.options())?;
        if let Some(out) = &out {
            std::fs::create_dir_all(out)?;
            combined.write_dir(out)?;
        }
        let (info, names) = publish_release(runtime, &combined, release, parent, false, &r, expiry)?;
        let Some(provenance) = &combined.manifest.aggregate else { anyhow::bail!("the aggregate lost its provenance") };
        let mut text = format!(
            "{} offers combined by {} (largest residual {:.4}) into {task} release {release}: {}\n",
            provenance.offers.len(),
            provenance.rule,
            provenance.residual,
            names.join(", ")
        );
        for o in &provenance.offers {
            text += &format!("  {:<17} v{:<4} weight {:.3}  ({} training samples)\n", o.device, o.version, o.weight, o.train_samples);
        }
        text += "roll it out with --policy shadow first: every device scores it on its own data\n";
        Ok((text, serde_json::json!({ "release": info, "targets": names, "aggregate": provenance })))
    })
}

fn learn(
    LearnArgs { task, rounds, devices, parent, combine, state_dir, offer_timeout_s, device_timeout_s, final_policy, mqtt, prefix, repo: r }: LearnArgs,
    expiry: Expiry,
) -> anyhow::Result<ExitCode> {
    let plan = adaptd_daemon::fleet::learn::LearnPlan {
        task,
        rounds,
        devices,
        parent,
        bundle: adaptd_adapters::Bundle::open(&combine.bundle)?,
        options: combine.options(),
        offers_dir: combine.offers_dir,
        keys: r.keys.clone(),
        repo: r.repo.clone(),
        state_dir,
        offer_timeout: std::time::Duration::from_secs(offer_timeout_s),
        device_timeout: std::time::Duration::from_secs(device_timeout_s),
        final_policy,
        expiry,
    };
    let (host, port) = parse_host_port(&mqtt)?;
    let broker = adaptd_daemon::mqtt::BrokerConnection::plain(host, port);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let json = r.json;
    let report = runtime.block_on(adaptd_daemon::fleet::learn::learn(
        &plan,
        broker,
        &prefix,
        |report| {
            if !json {
                println!("{}", report.table());
            }
        },
        shutdown_signal(),
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if report.final_release.is_some() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn rollout(
    RolloutArgs { task, release, devices, waves, policy, success_percent, max_failures, device_timeout_s, per_minute, rollback, repo: repo_dir, control, }: RolloutArgs,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!((0.0..=100.0).contains(&success_percent), "--success-percent must be in [0, 100]");
    anyhow::ensure!(!control.state.exists(), "{} exists: a rollout is saved there (`fleet controller` goes on with it)", control.state.display());
    let base_sha256 = match &repo_dir {
        Some(dir) => {
            let published = runtime.block_on(repo::list(dir))?;
            let signed = published.iter().find(|p| p.task == task && p.release == release);
            Some(signed.ok_or_else(|| anyhow::anyhow!("{task} release {release} is not published in {}", dir.display()))?.base_sha256.clone())
        }
        None => None,
    };
    let plan = adaptd_fleet::controller::Plan {
        id: format!("{task}-r{release}-{}", adaptd_daemon::events::now_ms() / 1000),
        task,
        release,
        policy,
        rollback,
        waves: adaptd_fleet::controller::Plan::waves_of(&devices, &waves),
        success_percent,
        failures: adaptd_fleet::controller::FailureThreshold { count: Some(max_failures.max(1)), percent: None, min_executed: 1 },
        device_timeout_ms: device_timeout_s.saturating_mul(1000),
        per_minute,
        base_sha256,
    };
    adaptd_daemon::fleet::controller::save(&control.state, &adaptd_fleet::controller::Rollout::new(plan, Default::default()))?;
    run_controller(&control)
}

/// The fleet page of the HTML report from `fleet learn`'s state directory.
fn report(state_dir: &std::path::Path, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    operate(false, || {
        let path = state_dir.join("learn.json");
        let learned: adaptd_daemon::fleet::learn::LearnReport =
            serde_json::from_slice(&std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut rollouts = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(state_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| n != "learn.json"))
            .collect();
        names.sort();
        for p in names {
            if let Ok(rollout) = adaptd_daemon::fleet::controller::load(&p) {
                rollouts.push((p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), rollout));
            }
        }
        let html = adaptd::report::render_fleet(&format!("adaptd fleet learning: {}", learned.task), &learned, &rollouts);
        adaptd_adapters::fsutil::write_atomic(out, html.as_bytes())?;
        Ok((format!("fleet report written to {}\n", out.display()), serde_json::json!({ "out": out })))
    })
}

fn controller_request(state: &std::path::Path, request: adaptd_daemon::fleet::controller::Request) -> anyhow::Result<ExitCode> {
    operate(false, || {
        let rollout = adaptd_daemon::fleet::controller::request(state, request)?;
        Ok((rollout.table(), serde_json::to_value(&rollout)?))
    })
}

/// Run the saved rollout to its end, printing the table as it changes; exit 0 when it completed.
fn run_controller(control: &ControllerArgs) -> anyhow::Result<ExitCode> {
    let (host, port) = parse_host_port(&control.mqtt)?;
    let broker = adaptd_daemon::mqtt::BrokerConnection::plain(host, port);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let json = control.json;
    let rollout = runtime.block_on(adaptd_daemon::fleet::controller::run(
        &control.state,
        broker,
        &control.prefix,
        |r| {
            if !json {
                println!("{}", r.table());
            }
        },
        shutdown_signal(),
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    }
    Ok(if rollout.phase == adaptd_fleet::controller::Phase::Completed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `--policy`: the fleet's policy by its name in the protocol.
fn parse_rule(text: &str) -> Result<adaptd_adapters::aggregate::Rule, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| format!("{text:?}: cat, svd or linear"))
}

/// Sign `adapter` into the repository as `release` (see `fleet::aggregate::publish`).
fn publish_release(
    runtime: &tokio::runtime::Runtime,
    adapter: &adaptd_adapters::Adapter,
    release: u64,
    parent: Option<u64>,
    allow_force: bool,
    r: &RepoArgs,
    expiry: adaptd_fleet::repo::Expiry,
) -> anyhow::Result<(adaptd_fleet::repo::Release, Vec<String>)> {
    Ok(runtime.block_on(adaptd_daemon::fleet::aggregate::publish(adapter, release, parent, allow_force, &r.keys, &r.repo, expiry))?)
}

fn parse_policy(text: &str) -> Result<adaptd_protocol::fleet::Policy, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| format!("{text:?}: validate, force or shadow"))
}

/// A fresh directory inside `parent` for an adapter's files on their way somewhere else.
fn tempfile_dir(parent: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join(format!(".incoming-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
