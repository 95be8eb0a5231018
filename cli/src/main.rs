//! The `adaptd` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use adaptd::parity::{self, PARITY_TOLERANCE, ParityReport};
use adaptd::paths;
use adaptd_adapters::Bundle;
use adaptd_daemon::engine::onnx::{OnnxModel, SessionOptions};
use adaptd_train::{FitReport, TrainingGraph};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "adaptd", version, about = "On-device adaptation daemon: serve a frozen base model, fine-tune adapters on the device, hot-swap them.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole loop, live, in about a minute: an embedded broker, the daemon, and a simulated fleet
    /// of robots publishing rotated digits; watch it train, gate, hot-swap; then an HTML report.
    Demo {
        /// Directory holding bundles/ and data/ (made by `make setup`).
        #[arg(long)]
        build_dir: Option<PathBuf>,
        /// The demo daemon's state directory (emptied first) [default: BUILD_DIR/demo/state].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Where to write the HTML report [default: BUILD_DIR/demo/report.html].
        #[arg(long)]
        report: Option<PathBuf>,
        /// Robots in the simulated fleet.
        #[arg(long, default_value_t = 3)]
        robots: usize,
        /// Samples each robot publishes per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
    /// Check the reference bundles: ONNX Runtime and libtorch compute the same function with and
    /// without LoRA, and LoRA trains with the base frozen.
    Check {
        /// Directory holding bundles/ and data/ (made by `make setup`).
        #[arg(long)]
        build_dir: Option<PathBuf>,
    },
    /// Is this device ready, and how fast is it? Architecture, Jetson model and L4T/JetPack
    /// release, memory, temperatures, GPU load; which ONNX Runtime providers register and how
    /// fast each serves the bundle; whether libtorch sees CUDA and how fast a head and LoRA train;
    /// then the configuration to use.
    Doctor {
        /// The configuration whose bundle to measure [default: the shipped one's].
        #[arg(long)]
        config: Option<PathBuf>,
        /// A bundle directory instead.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// About how long the benchmarks may take.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Where the device's /etc, /proc and /sys are (for looking at another device's files).
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
        /// JSON for a fleet inventory.
        #[arg(long)]
        json: bool,
    },
    /// Write the HTML report (accuracy per adapter version, loss curves, per-class recall, every
    /// gate decision) from a daemon's state directory; works while the daemon runs.
    Report {
        /// The daemon's state directory [default: the config's].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output file.
        #[arg(long, default_value = "adaptd-report.html")]
        out: PathBuf,
    },
    /// Compare a bundle's serving graph (ONNX Runtime) with its training graph (libtorch).
    Parity {
        /// Bundle directories.
        #[arg(required = true)]
        bundles: Vec<PathBuf>,
        /// Rank of the random LoRA adapter to compare with.
        #[arg(long, default_value_t = 8)]
        rank: usize,
    },
    /// Run the daemon (alias: serve): the engine with each task's active adapter over HTTP and
    /// MQTT, ingest, and one adaptation loop per task.
    /// Settings come from --config (default: the built-in config/adaptd.toml); flags override it.
    #[command(alias = "run")]
    Serve {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Bundle directory [default: the config's, or the digits-cnn reference bundle without --config].
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Where adapters are kept (created if missing).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// HTTP address; keep it on loopback unless a proxy guards it.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// MQTT broker for ingest and the MQTT inference API, as host:port (credentials and TLS
        /// still come from the configuration).
        #[arg(long)]
        mqtt: Option<String>,
        /// This device's id in MQTT topics.
        #[arg(long)]
        device: Option<String>,
    },
    /// Ingest labelled samples from an MQTT broker into a sample store until stopped.
    Ingest {
        /// Bundle the samples are checked against [default: the digits-cnn reference bundle].
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// SQLite sample store (created if missing).
        #[arg(long)]
        store: PathBuf,
        /// MQTT broker as host:port.
        #[arg(long)]
        mqtt: String,
        /// This device's id in MQTT topics.
        #[arg(long, default_value = "adaptd")]
        device: String,
        /// Tasks samples may be for, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        tasks: Vec<String>,
        /// Samples committed per transaction (one fsync each); 1 commits every sample alone.
        #[arg(long, default_value_t = 256)]
        max_batch: usize,
    },
    /// Check a configuration file without starting anything (exit 0: valid, 2: invalid).
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Work with model bundles.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Show a running daemon's tasks: serving version, scheduler state, samples, jobs, last decision.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Ask a running daemon to train a task now (the scheduler still checks the device and the data).
    Train {
        task: String,
        /// Required: says that this starts a job now, not on the schedule.
        #[arg(long, required = true)]
        now: bool,
        /// Return once the daemon has accepted the request, without following the job.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// The sample store: `stats` counts labelled samples per task, split and label.
    Samples {
        #[command(subcommand)]
        command: SamplesCommand,
    },
    /// Adapters: list and show read the state directory; rollback and pin go through the daemon.
    Adapters {
        #[command(subcommand)]
        command: AdaptersCommand,
    },
    /// The fleet's TUF-signed adapter repository: keys, releases, expiry.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
}

/// Where the operator's keys and the repository live.
#[derive(clap::Args)]
struct RepoArgs {
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
struct CombineArgs {
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
struct ControllerArgs {
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

#[derive(Subcommand)]
enum FleetCommand {
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
    Publish {
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
    },
    /// Fleet learning: combine devices' offers of a task (trained from the same parent on the same
    /// base, same kind and modules) into one adapter and publish it as a release. LoRA updates
    /// are summed weighted by training samples (exact `cat` when the ranks fit the bundle, else
    /// `svd` to its rank_max); heads over the union of labels. Roll it out in `shadow` first.
    Aggregate {
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
    },
    /// Fleet learning in rounds: roll the current release out with the `train` policy (each
    /// device scores it, trains on from it, offers the result into its `[fleet] offers`), wait
    /// for the offers, aggregate them into the next release; after the last round roll that
    /// release out under `--final-policy`. Without `--parent` the devices' offers trained from
    /// the base model make the first release. Each round's figures go to `<state-dir>/learn.json`.
    Learn {
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
    },
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
    Rollout {
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
    },
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

/// How to reach the daemon (its HTTP API on loopback) and its state.
#[derive(clap::Args)]
struct DaemonArgs {
    /// The daemon's configuration file (for its HTTP address and state directory).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The daemon's HTTP address [default: the config's http.listen].
    #[arg(long, global = true)]
    http: Option<std::net::SocketAddr>,
    /// The daemon's state directory [default: the config's state_dir].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

impl DaemonArgs {
    fn config(&self) -> anyhow::Result<adaptd_daemon::config::Config> {
        Ok(match &self.config {
            Some(path) => adaptd_daemon::config::Config::load(path)?,
            None => adaptd_daemon::config::Config::default(),
        })
    }

    fn client(&self) -> anyhow::Result<adaptd::client::Client> {
        let addr = match self.http {
            Some(a) => a,
            None => self.config()?.http.listen,
        };
        Ok(adaptd::client::Client::new(addr).with_token_from(&self.state_dir()?))
    }

    fn state_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(match &self.state_dir {
            Some(s) => s.clone(),
            None => self.config()?.state_dir,
        })
    }
}

#[derive(Subcommand)]
enum SamplesCommand {
    /// Labelled samples per task, split (train / validation / holdout) and label.
    Stats {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Add labelled samples from a file of JSON lines (the MQTT sample format), checked against
    /// the configured bundle and tasks; duplicates are recognised, bad lines refused by number.
    Import {
        file: PathBuf,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Every adapter version kept on disk, newest first; `*` marks the one serving.
    List {
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// One adapter's manifest: kind, labels, metrics, the gate's decision with its checks.
    Show {
        task: String,
        version: u64,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Copy a verified adapter version out (its manifest and PEFT-compatible tensors), e.g. to
    /// roll it out to other devices.
    Export {
        task: String,
        version: u64,
        /// A new directory to write it to.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Add an exported adapter as the task's next version (not served until pinned or promoted);
    /// refused unless it fits this device's bundle.
    Import {
        /// A directory written by `adapters export`.
        dir: PathBuf,
        /// The task to import into [default: the adapter's own].
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Serve the previous version again (the daemon says which).
    Rollback {
        task: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Serve this version (0: the base model) until the next promotion.
    Pin {
        task: String,
        version: u64,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Check a bundle's manifest and every file's sha256, and print what it holds.
    Verify { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo talks to the user on stdout; its log only says what went wrong.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) { "warn,rumqttd=off" } else { "info" };
    // ADAPTD_LOG_FORMAT=json for log shippers; text otherwise (journald keeps either).
    let filter = tracing_subscriber::EnvFilter::try_from_env("ADAPTD_LOG").unwrap_or_else(|_| default_filter.into());
    let log = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("ADAPTD_LOG_FORMAT").is_ok_and(|f| f == "json") {
        log.json().init();
    } else {
        log.init();
    }
    let result = match cli.command {
        Command::Demo { build_dir, state_dir, report, robots, rate } => demo(build_dir, state_dir, report, robots, rate),
        Command::Check { build_dir } => check(build_dir),
        Command::Doctor { config, bundle, seconds, root, json } => operate(json, || {
            let bundle = match bundle {
                Some(dir) => dir,
                None => match &config {
                    Some(path) => adaptd_daemon::config::Config::load(path)?.bundle,
                    None => adaptd_daemon::config::Config::default().bundle,
                },
            };
            let bundle = adaptd::doctor::open_bundle(&bundle).map_err(|e| anyhow::anyhow!("{e} (name one with --bundle or --config)"))?;
            let report = adaptd::doctor::run(&bundle, &root, seconds, None);
            Ok((adaptd::doctor::render(&report), serde_json::to_value(&report)?))
        }),
        Command::Report { state_dir, config, out } => report(state_dir, config, out),
        Command::Parity { bundles, rank } => parity_command(&bundles, rank),
        Command::Bundle { command: BundleCommand::Verify { dir } } => verify(&dir),
        Command::Serve { config, bundle, state_dir, http, mqtt, device } => serve(config, bundle, state_dir, http, mqtt, device),
        Command::Ingest { bundle, store, mqtt, device, tasks, max_batch } => ingest(bundle, store, mqtt, device, tasks, max_batch),
        Command::Status { daemon } => operate(daemon.json, || {
            let statuses = adaptd::ops::status(&daemon.client()?)?;
            Ok((adaptd::ops::render_status(&statuses), serde_json::to_value(&statuses)?))
        }),
        Command::Train { task, now: _, no_wait, daemon } => train_now(&task, no_wait, &daemon),
        Command::Adapters { command } => adapters(command),
        Command::Fleet { command } => fleet(command),
        Command::Samples { command: SamplesCommand::Import { file, daemon } } => operate(daemon.json, || {
            let config = daemon.config()?;
            let bundle = Bundle::open(&config.bundle)?;
            let result = adaptd::ops::import_samples(&daemon.state_dir()?, &bundle, &config.ingest.tasks, &file, config.ingest.max_payload_bytes)?;
            Ok((result.render(), serde_json::to_value(&result)?))
        }),
        Command::Samples { command: SamplesCommand::Stats { daemon } } => operate(daemon.json, || {
            let stats = adaptd::ops::sample_stats(&daemon.state_dir()?)?;
            Ok((adaptd::ops::render_sample_stats(&stats), serde_json::to_value(&stats)?))
        }),
        Command::Validate { config } => match adaptd_daemon::config::Config::load(&config) {
            Ok(_) => {
                println!("{}: valid", config.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("adaptd: {e}");
                Ok(ExitCode::from(2))
            }
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("adaptd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run an operator command; print its text (or JSON with `--json`); map its failure to an exit code.
fn operate(json: bool, f: impl FnOnce() -> anyhow::Result<(String, serde_json::Value)>) -> anyhow::Result<ExitCode> {
    match f() {
        Ok((text, value)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = e.downcast_ref::<adaptd::ops::OpsError>().map_or(1, adaptd::ops::OpsError::exit_code);
            eprintln!("adaptd: {e:#}");
            Ok(ExitCode::from(code))
        }
    }
}

fn fleet(command: FleetCommand) -> anyhow::Result<ExitCode> {
    use adaptd_fleet::repo::{self, Expiry};
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
        FleetCommand::Publish { task, version, from, release, parent, allow_force, state_dir, repo: r } => operate(r.json, || {
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
            let (info, names) = publish_release(&runtime, &adapter, release, parent, allow_force, &r, expiry)?;
            Ok((
                format!("{} published as {task} release {release}: {}\n", adapter.manifest.id(), names.join(", ")),
                serde_json::json!({ "release": info, "targets": names }),
            ))
        }),
        FleetCommand::Aggregate { task, offers: wanted, parent, combine, release, out, repo: r } => operate(r.json, || {
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
                let adapter =
                    adaptd_adapters::Adapter::read_dir(&dir).map_err(|e| anyhow::anyhow!("offer {}: {e}", adaptd_fleet::offer::offer_name(&offer)))?;
                offers.push((offer, adapter));
            }
            let combined = aggregate(&task, release, &bundle, &parent_of, &offers, combine.options())?;
            if let Some(out) = &out {
                std::fs::create_dir_all(out)?;
                combined.write_dir(out)?;
            }
            let (info, names) = publish_release(&runtime, &combined, release, parent, false, &r, expiry)?;
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
        }),
        FleetCommand::Learn { task, rounds, devices, parent, combine, state_dir, offer_timeout_s, device_timeout_s, final_policy, mqtt, prefix, repo: r } => {
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
        FleetCommand::Report { state_dir, out } => operate(false, || {
            let path = state_dir.join("learn.json");
            let learned: adaptd_daemon::fleet::learn::LearnReport =
                serde_json::from_slice(&std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut rollouts = Vec::new();
            let mut names: Vec<PathBuf> = std::fs::read_dir(&state_dir)?
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
            adaptd_adapters::fsutil::write_atomic(&out, html.as_bytes())?;
            Ok((format!("fleet report written to {}\n", out.display()), serde_json::json!({ "out": out })))
        }),
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
        FleetCommand::Rollout {
            task,
            release,
            devices,
            waves,
            policy,
            success_percent,
            max_failures,
            device_timeout_s,
            per_minute,
            rollback,
            repo: repo_dir,
            control,
        } => {
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

/// Start a job and, unless told not to, follow it with a progress bar to its decision. Exit 0
/// when the candidate was promoted, 1 when it was rejected, deferred or failed (with the reason).
fn train_now(task: &str, no_wait: bool, daemon: &DaemonArgs) -> anyhow::Result<ExitCode> {
    let client = daemon.client()?;
    let status = |c: &adaptd::client::Client| -> anyhow::Result<adaptd_protocol::TaskStatus> {
        let answer = c.get(&format!("/v1/tasks/{task}/status"))?;
        anyhow::ensure!(answer.ok(), "{}", answer.message());
        Ok(serde_json::from_value(answer.body)?)
    };
    if no_wait {
        return operate(daemon.json, || {
            let message = adaptd::ops::command(&client, task, "train")?;
            Ok((format!("{message}\n"), serde_json::json!({ "message": message })))
        });
    }
    let before = status(&client)?;
    let message = match adaptd::ops::command(&client, task, "train") {
        Ok(m) => m,
        Err(e) => return operate(daemon.json, || Err(e.into())),
    };
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<14} {bar:40.cyan/blue} {pos:>5}/{len} steps  {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if daemon.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        eprintln!("{message}");
    }
    let after = loop {
        let s = status(&client)?;
        if s.finished_jobs() > before.finished_jobs() {
            break s;
        }
        if let Some((done, total)) = s.progress {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        bar.set_message(s.scheduler.name());
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    bar.finish_and_clear();
    let promoted_jobs = |s: &adaptd_protocol::TaskStatus| s.jobs.get("promoted").copied().unwrap_or(0);
    let promoted = promoted_jobs(&after) > promoted_jobs(&before);
    let decision = after.last_decision.clone().unwrap_or_default();
    if daemon.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "promoted": promoted, "decision": decision, "status": after }))?);
    } else {
        println!("{decision}");
        println!("{task} serves v{}", after.serving_version);
    }
    Ok(if promoted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn adapters(command: AdaptersCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdaptersCommand::List { task, daemon } => operate(daemon.json, || {
            let rows = adaptd::ops::list_adapters(&daemon.state_dir()?, task.as_deref())?;
            Ok((adaptd::ops::render_adapters(&rows), serde_json::to_value(&rows)?))
        }),
        AdaptersCommand::Show { task, version, daemon } => operate(true, || {
            let store = adaptd_adapters::AdapterStore::open(daemon.state_dir()?.join("adapters"))?;
            let adapter = store.load(&task, version)?;
            Ok((String::new(), serde_json::to_value(&adapter.manifest)?))
        }),
        AdaptersCommand::Export { task, version, out, daemon } => operate(daemon.json, || {
            let store = adaptd_adapters::AdapterStore::open(daemon.state_dir()?.join("adapters"))?;
            let adapter = store.load(&task, version)?;
            anyhow::ensure!(!out.exists(), "{}: already exists; export writes a new directory", out.display());
            std::fs::create_dir_all(&out)?;
            let manifest = adapter.write_dir(&out)?;
            let text = format!("{} exported to {} ({} files, hashes in adapter.json)\n", manifest.id(), out.display(), manifest.files.len());
            Ok((text, serde_json::json!({ "adapter": manifest.id(), "dir": out })))
        }),
        // Never beside a running daemon's registry: through it when it runs (it hands out
        // versions, so an import cannot take the one a job is about to promote), else here with
        // the state directory locked so no daemon starts meanwhile.
        AdaptersCommand::Import { dir, task, daemon } => operate(daemon.json, || {
            let config = daemon.config()?;
            let state_dir = daemon.state_dir()?;
            let dir = std::fs::canonicalize(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            let adapter = adaptd_adapters::Adapter::read_dir(&dir)?;
            let from = adapter.manifest.id();
            match adaptd_daemon::serve::lock_state_dir(&state_dir) {
                Ok(_lock) => {
                    let bundle = adaptd_adapters::Bundle::open(&config.bundle)?;
                    let store = adaptd_adapters::AdapterStore::open(state_dir.join("adapters"))?;
                    let (registry, _) = adaptd_daemon::registry::Registry::open(bundle, store, config.adapters.keep_versions)?;
                    let manifest = registry.import(adapter, task)?;
                    let (task, version) = (manifest.task.clone(), manifest.version);
                    let text = format!("{from} imported as {}; `adaptd adapters pin {task} {version}` serves it\n", manifest.id());
                    Ok((text, serde_json::json!({ "imported_from": from, "adapter": manifest.id(), "version": version })))
                }
                Err(adaptd_daemon::serve::StateLockError::InUse { .. }) => {
                    let task = task.unwrap_or_else(|| adapter.manifest.task.clone());
                    let message = adaptd::ops::import_through_daemon(&daemon.client()?, &task, &dir)?;
                    Ok((format!("{message} (through the running daemon)\n"), serde_json::json!({ "imported_from": from, "message": message })))
                }
                Err(e) => Err(e.into()),
            }
        }),
        AdaptersCommand::Rollback { task, daemon } => operate(daemon.json, || {
            let message = adaptd::ops::command(&daemon.client()?, &task, "rollback")?;
            Ok((format!("{message}\n"), serde_json::json!({ "message": message })))
        }),
        AdaptersCommand::Pin { task, version, daemon } => operate(daemon.json, || {
            let message = adaptd::ops::command(&daemon.client()?, &task, &format!("pin/{version}"))?;
            Ok((format!("{message}\n"), serde_json::json!({ "message": message })))
        }),
    }
}

fn verify(dir: &Path) -> anyhow::Result<ExitCode> {
    let bundle = Bundle::open(dir)?;
    let m = &bundle.manifest;
    println!("{} {} (bundle format {}, exported with torch {})", m.name, m.version, m.format, m.exporter.torch);
    for (name, f) in &m.files {
        println!("  {name:<16} {:>11} bytes  sha256 {}", f.bytes, &f.sha256[..16]);
    }
    let inputs: Vec<String> = m.inputs.iter().map(|i| format!("{}{:?}", i.name, i.shape)).collect();
    println!("  inputs: {}; embedding {} x {}", inputs.join(", "), m.embedding_output, m.embedding_dim);
    let slots: Vec<&str> = m.lora.slots.iter().map(|s| s.module.as_str()).collect();
    println!("  LoRA: {} slots up to rank {}: {}", slots.len(), m.lora.rank_max, slots.join(", "));
    if let Some(cut) = &m.cut {
        let above: Vec<&str> = cut.slots_above.iter().filter_map(|&i| slots.get(i).copied()).collect();
        println!("  cut after {} ({} {:?}): slots above it {}", cut.after, cut.activation.name, cut.activation.shape, above.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

struct BundleCheck {
    verify_ms: f64,
    load_ms: f64,
    parity: ParityReport,
    train: Option<FitReport>,
    head: Option<parity::HeadProbe>,
}

fn check_bundle(dir: &Path, digits: &Path, rank: usize, train_steps: usize) -> anyhow::Result<BundleCheck> {
    let t0 = Instant::now();
    let bundle = Bundle::open(dir)?;
    let verify_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut onnx = OnnxModel::load(&bundle, SessionOptions::default(), None)?;
    let graph = TrainingGraph::load(&bundle, tch::Device::Cpu)?;
    let load_ms = t1.elapsed().as_secs_f64() * 1e3;
    let inputs = parity::probe_inputs(&bundle, digits)?;
    let parity = parity::check_parity(&mut onnx, &graph, &inputs, rank, 7)?;
    let train = (train_steps > 0).then(|| parity::training_probe(&bundle, &graph, digits, train_steps)).transpose()?;
    // The head path end to end on images (the text bundle's probe data has three sentences a class).
    let image = !matches!(bundle.manifest.preprocessing, adaptd_adapters::bundle::Preprocessing::Text { .. });
    let head = (train_steps > 0 && image).then(|| parity::head_probe(&mut onnx, digits)).transpose()?;
    Ok(BundleCheck { verify_ms, load_ms, parity, train, head })
}

fn print_check(check: &BundleCheck) {
    let p = &check.parity;
    let verdict = if p.passed() { "PASS" } else { "FAIL" };
    println!(
        "\n{} — verified in {:.0} ms, both runtimes loaded in {:.0} ms; batch {}, random LoRA rank {} [{verdict}]",
        p.bundle, check.verify_ms, check.load_ms, p.batch, p.rank
    );
    println!("  {:<12} {:>22} {:>22}", "output", "max|ort-torch| base", "max|ort-torch| LoRA");
    for o in &p.outputs {
        println!("  {:<12} {:>22.2e} {:>22.2e}", o.name, o.base_max_abs_diff, o.lora_max_abs_diff);
    }
    println!("  LoRA moves the embedding by up to {:.3} (tolerance for parity {PARITY_TOLERANCE:.0e})", p.lora_effect);
    if let Some(t) = &check.train {
        println!(
            "  LoRA+head training through libtorch: loss {:.3} -> {:.3} in {} steps; base weights bit-identical: {}",
            t.losses.first().copied().unwrap_or(f32::NAN),
            t.losses.last().copied().unwrap_or(f32::NAN),
            t.losses.len(),
            if t.base_unchanged == Some(true) { "yes" } else { "NO" }
        );
    }
    if let Some(h) = &check.head {
        println!(
            "  head adaptation to {} digits ({} train / {} test, shipped recipe, CPU): {:.1} % -> {:.1} % in {:.1} s",
            format!("{:?}", h.shift).to_lowercase(),
            h.train,
            h.test,
            h.base_accuracy * 100.0,
            h.adapted_accuracy * 100.0,
            h.seconds
        );
    }
}

/// A head adapted to rotated digits must beat the base classifier by this much (it gains 50+).
const HEAD_PROBE_MIN_GAIN: f64 = 0.2;

fn demo(build_dir: Option<PathBuf>, state_dir: Option<PathBuf>, report: Option<PathBuf>, robots: usize, rate: f64) -> anyhow::Result<ExitCode> {
    let build = build_dir.unwrap_or_else(paths::build_dir);
    let config = adaptd::demo::DemoConfig {
        state_dir: state_dir.unwrap_or_else(|| build.join("demo").join("state")),
        report: report.unwrap_or_else(|| build.join("demo").join("report.html")),
        build_dir: build,
        robots,
        rate_per_robot: rate,
    };
    let outcome = adaptd::demo::run(config)?;
    println!("demo finished in {:.0} s", outcome.seconds);
    if outcome.succeeded() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("adaptd demo: the adapted model did not beat the base by 20 points on the new domain, or requests failed");
        Ok(ExitCode::FAILURE)
    }
}

fn report(state_dir: Option<PathBuf>, config: Option<PathBuf>, out: PathBuf) -> anyhow::Result<ExitCode> {
    let state_dir = match (state_dir, config) {
        (Some(s), _) => s,
        (None, Some(c)) => adaptd_daemon::config::Config::load(&c)?.state_dir,
        (None, None) => adaptd_daemon::config::Config::default().state_dir,
    };
    let journal = adaptd_daemon::events::Journal::new(&state_dir.join("journal"));
    let tasks = adaptd::report::journal_tasks(&state_dir);
    let histories = tasks.iter().map(|t| adaptd::report::TaskHistory::read(&journal, t)).collect::<Result<Vec<_>, _>>()?;
    adaptd::report::write(&out, &format!("adaptd report: {}", state_dir.display()), &histories, None)?;
    println!("{} ({} task(s), {} job(s))", out.display(), histories.len(), histories.iter().map(|h| h.jobs().count()).sum::<usize>());
    Ok(ExitCode::SUCCESS)
}

fn check(build_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let build = build_dir.unwrap_or_else(paths::build_dir);
    let digits = build.join("data").join("digits.safetensors");
    println!("adaptd check: one model, two runtimes, same function");
    let mut ok = true;
    for name in ["digits-cnn", "minilm"] {
        let check = check_bundle(&build.join("bundles").join(name), &digits, 8, 10)?;
        print_check(&check);
        ok &= check.parity.passed() && check.train.as_ref().is_some_and(|t| t.base_unchanged == Some(true) && t.losses.last() < t.losses.first());
        ok &= check.head.as_ref().is_none_or(|h| h.adapted_accuracy >= h.base_accuracy + HEAD_PROBE_MIN_GAIN);
    }
    println!("\n{}", if ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn parity_command(bundles: &[PathBuf], rank: usize) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    for dir in bundles {
        let check = check_bundle(dir, &paths::digits_data(), rank, 0)?;
        print_check(&check);
        ok &= check.parity.passed();
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn serve(
    config_path: Option<PathBuf>,
    bundle: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    http: Option<std::net::SocketAddr>,
    mqtt: Option<String>,
    device: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut config = match &config_path {
        Some(path) => adaptd_daemon::config::Config::load(path)?,
        // Without a file, serve the reference bundle from this checkout's build directory.
        None => adaptd_daemon::config::Config { bundle: paths::reference_bundle("digits-cnn"), ..Default::default() },
    };
    if let Some(b) = bundle {
        config.bundle = b;
    }
    if let Some(s) = state_dir {
        config.state_dir = s;
    }
    if let Some(h) = http {
        config.http.listen = h;
    }
    if let Some(d) = device {
        config.mqtt.device_id = d;
    }
    if let Some(addr) = mqtt {
        (config.mqtt.host, config.mqtt.port) = parse_host_port(&addr)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(adaptd_daemon::serve::run(config, config_path, shutdown_signal(), None))?;
    Ok(ExitCode::SUCCESS)
}

fn parse_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("{addr:?}: expected host:port"))?;
    Ok((host.to_string(), port.parse().map_err(|_| anyhow::anyhow!("{addr:?}: port must be a number"))?))
}

fn ingest(bundle: Option<PathBuf>, store: PathBuf, mqtt: String, device: String, tasks: Vec<String>, max_batch: usize) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(max_batch > 0, "--max-batch must be at least 1");
    use std::sync::{Arc, Mutex};
    let bundle = Bundle::open(bundle.unwrap_or_else(|| paths::reference_bundle("digits-cnn")))?;
    let samples = adaptd_daemon::samples::SampleStore::open(&store, Default::default())?;
    let (host, port) = parse_host_port(&mqtt)?;
    let mut link = adaptd_daemon::mqtt::Link::new(adaptd_daemon::mqtt::LinkConfig {
        broker: adaptd_daemon::mqtt::BrokerConnection::plain(host, port),
        client_id: format!("adaptd-ingest-{device}"),
        persistent: true,
        max_outgoing_bytes: adaptd_daemon::events::MAX_EVENT_BYTES,
        request_queue: 2 * max_batch + 256,
        availability: None,
    });
    let config = adaptd_daemon::ingest::IngestConfig {
        topics: adaptd_protocol::Topics::new(adaptd_protocol::topics::DEFAULT_PREFIX, &device),
        max_batch,
        max_payload_bytes: 1 << 20,
    };
    let (ingest, mut inbox) =
        adaptd_daemon::ingest::Ingest::on_link(&mut link, config, Arc::new(Mutex::new(samples)), Arc::new(bundle.manifest.clone()), tasks);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        // Ingest stops first, then the link (its acks go out before it disconnects).
        let stop = tokio_util::sync::CancellationToken::new();
        let link = tokio::spawn(link.run(stop.clone().cancelled_owned()));
        let result = ingest.run(&mut inbox, shutdown_signal()).await;
        stop.cancel();
        let _ = link.await;
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("adaptd: cannot handle SIGTERM/SIGINT ({e}); only SIGKILL stops this process");
            return std::future::pending().await;
        }
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("adaptd: second signal, exiting now");
        std::process::exit(130);
    });
}
