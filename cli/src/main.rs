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

// The binary's own modules (the library's are in lib.rs).
mod fleet_command;
use fleet_command::FleetCommand;

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
        /// A bundle of your own to prove instead of the reference ones (repeatable): manifest
        /// and hashes, parity of both runtimes with and without LoRA, and a few LoRA steps with
        /// the base frozen.
        #[arg(long)]
        bundle: Vec<PathBuf>,
        /// Steps of each training probe (full batch; the loss must end below where it started):
        /// fewer on a machine where a step takes long, e.g. under emulation.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..))]
        train_steps: u64,
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
    /// Samples whose labels the last search for wrong labels doubts (kept out of training and the
    /// holdout), those an operator judged, and the senders most often suspected.
    Suspects {
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Give your word on a sample's label: `right` (it trains, and is not suspected again) or
    /// `wrong` (it never trains or counts in the holdout). Applies from the next job on.
    Judge {
        /// The sample's idempotency key.
        key: String,
        /// `right` or `wrong`.
        #[arg(value_parser = ["right", "wrong"])]
        verdict: String,
        /// Who judges, for the record [default: the user running the command].
        #[arg(long)]
        by: Option<String>,
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
        Command::Check { build_dir, bundle, train_steps } => check(build_dir, &bundle, train_steps as usize),
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
        Command::Fleet { command } => fleet_command::run(command),
        Command::Samples { command: SamplesCommand::Import { file, daemon } } => operate(daemon.json, || {
            let config = daemon.config()?;
            let bundle = Bundle::open(&config.bundle)?;
            let result = adaptd::ops::import_samples(&daemon.state_dir()?, &bundle, &config.ingest.tasks, &file, config.ingest.max_payload_bytes)?;
            Ok((result.render(), serde_json::to_value(&result)?))
        }),
        Command::Samples { command: SamplesCommand::Suspects { task, daemon } } => operate(daemon.json, || {
            let found = adaptd::ops::suspects(&daemon.state_dir()?, task.as_deref())?;
            Ok((adaptd::ops::render_suspects(&found), serde_json::to_value(&found)?))
        }),
        Command::Samples { command: SamplesCommand::Judge { key, verdict, by, daemon } } => operate(daemon.json, || {
            let by = by.or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "operator".into());
            let judged = adaptd::ops::judge(&daemon.state_dir()?, &key, verdict == "right", &by)?;
            Ok((judged.render(), serde_json::to_value(&judged)?))
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

fn check_bundle(dir: &Path, data: &parity::ProbeData, rank: usize, train_steps: usize) -> anyhow::Result<BundleCheck> {
    // Each step says when it starts and how long it took: a slow or stuck one is visible (under
    // emulation a step can take minutes).
    let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let step = |what: &str| {
        use std::io::Write;
        print!("  {name}: {what} ... ");
        let _ = std::io::stdout().flush();
        Instant::now()
    };
    // Prints the step's time and returns it in milliseconds.
    let done = |t: Instant| {
        let seconds = t.elapsed().as_secs_f64();
        println!("{seconds:.1} s");
        seconds * 1e3
    };
    let t = step("verifying the files");
    let bundle = Bundle::open(dir)?;
    let verify_ms = done(t);
    let t = step("loading both runtimes");
    let mut onnx = OnnxModel::load(&bundle, SessionOptions::default(), None)?;
    let graph = TrainingGraph::load(&bundle, tch::Device::Cpu)?;
    let load_ms = done(t);
    let t = step(if bundle.manifest.reft.is_some() { "parity with and without LoRA and LoReFT" } else { "parity with and without LoRA" });
    let inputs = parity::probe_inputs(&bundle, data)?;
    let mut parity = parity::check_parity(&mut onnx, &graph, &inputs, rank, 7)?;
    done(t);
    let t = step("merged serving against libtorch");
    parity.merged = parity::check_merged(&mut onnx, &graph, &inputs, rank, 7)?;
    done(t);
    let train = if train_steps > 0 {
        let t = step(&format!("{train_steps} LoRA+head training steps"));
        let report = parity::training_probe(&bundle, &graph, data, train_steps)?;
        done(t);
        Some(report)
    } else {
        None
    };
    // The head path end to end on rotated digits (the bundles that take them and ship a classifier).
    let digits_classifier = parity::takes_digits(&bundle) && bundle.manifest.logits_output.is_some();
    let head = if train_steps > 0 && digits_classifier {
        let t = step("head adaptation to rotated digits");
        let probe = parity::head_probe(&mut onnx, &data.digits)?;
        done(t);
        Some(probe)
    } else {
        None
    };
    Ok(BundleCheck { verify_ms, load_ms, parity, train, head })
}

fn print_check(check: &BundleCheck) {
    let p = &check.parity;
    let verdict = if p.passed() { "PASS" } else { "FAIL" };
    println!(
        "\n{} — verified in {:.0} ms, both runtimes loaded in {:.0} ms; batch {}, random LoRA rank {} [{verdict}]",
        p.bundle, check.verify_ms, check.load_ms, p.batch, p.rank
    );
    let reft = p.reft_effect.is_some();
    println!(
        "  {:<12} {:>22} {:>22}{}",
        "output",
        "max|ort-torch| base",
        "max|ort-torch| LoRA",
        if reft { format!(" {:>22}", "max|ort-torch| LoReFT") } else { String::new() }
    );
    for o in &p.outputs {
        let reft_diff = o.reft_max_abs_diff.map_or(String::new(), |d| format!(" {d:>22.2e}"));
        println!("  {:<12} {:>22.2e} {:>22.2e}{reft_diff}", o.name, o.base_max_abs_diff, o.lora_max_abs_diff);
    }
    println!("  LoRA moves the embedding by up to {:.3} (tolerance for parity {PARITY_TOLERANCE:.0e})", p.lora_effect);
    if let Some(effect) = p.reft_effect {
        println!("  LoReFT edits move the embedding by up to {effect:.3}");
    }
    for (kind, diff) in &p.merged {
        println!("  {kind} merged into a copy of the model, as serving runs it after its first second: max|ort-torch| {diff:.2e}");
    }
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

fn check(build_dir: Option<PathBuf>, bundles: &[PathBuf], train_steps: usize) -> anyhow::Result<ExitCode> {
    let build = build_dir.unwrap_or_else(paths::build_dir);
    let data = parity::ProbeData::in_build_dir(&build);
    println!("adaptd check: one model, two runtimes, same function");
    let dirs: Vec<PathBuf> =
        if bundles.is_empty() { REFERENCE_BUNDLES.iter().map(|name| build.join("bundles").join(name)).collect() } else { bundles.to_vec() };
    let mut ok = true;
    for dir in &dirs {
        let check = check_bundle(dir, &data, 8, train_steps)?;
        print_check(&check);
        ok &= check.parity.passed() && check.train.as_ref().is_some_and(|t| t.base_unchanged == Some(true) && t.losses.last() < t.losses.first());
        ok &= check.head.as_ref().is_none_or(|h| h.adapted_accuracy >= h.base_accuracy + HEAD_PROBE_MIN_GAIN);
    }
    println!("\n{}", if ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What `adaptd check` proves without --bundle: the bundles the set-up builds.
const REFERENCE_BUNDLES: [&str; 3] = ["digits-cnn", "minilm", "efficientnet-lite0"];

fn parity_command(bundles: &[PathBuf], rank: usize) -> anyhow::Result<ExitCode> {
    let data = parity::ProbeData::in_build_dir(&paths::build_dir());
    let mut ok = true;
    for dir in bundles {
        let check = check_bundle(dir, &data, rank, 0)?;
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
