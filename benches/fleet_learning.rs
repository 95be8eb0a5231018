#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code
//! Fleet learning: five daemons (in this process, one Mosquitto) learn the digits on the shipped
//! defaults with a LoRA adapter, and their adapters are combined by each rule. Two fleets:
//! - "own shifts": each device its own camera (rotate 90, rotate 180, mirror, noise, dropout) and
//!   class mix (two devices keep every other sample of five labels, one never sees 3 and 8);
//! - "one world": every camera rotated 90 degrees, each device two fifths of the samples and its
//!   own class mix (the same labels thinned as above).
//!
//! Scored offline through the serving graph, per seed: the base model, each device's own adapter
//! and the aggregate, on each device's own held-out digits and on all of them pooled. The
//! issue's goal: the aggregate at least 5 points over the mean single-device adapter on the
//! pooled digits, and no device more than 2 points worse on its own than with its own adapter.
//! `cat` needs the stacked ranks within the bundle's rank_max (5 x r8 = 40 > 16: not servable),
//! `linear` equal ranks: escalation is off here so every device trains the shipped r8.
//!
//! Then rounds, as `adaptd fleet learn` runs them (signed repository behind nginx, MQTT rollouts
//! with the `train` policy, offers into a shared directory): the svd aggregate is release 1, and
//! each of three rounds trains on from the last release on every device and aggregates again.
//!
//!     cargo bench -p adaptd --bench fleet_learning [-- --seeds 3]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adaptd::datasets::{Digits, Shift};
use adaptd_adapters::aggregate::Rule;
use adaptd_adapters::{Adapter, AdapterStore, Bundle};
use adaptd_daemon::engine::onnx::{OnnxModel, SessionOptions};
use adaptd_daemon::fleet::aggregate::{Options, Parent, aggregate};
use adaptd_protocol::fleet::Offer;

const TRAIN: usize = 360;
const HALVED_HIGH: &[i64] = &[5, 6, 7, 8, 9];
const HALVED_LOW: &[i64] = &[0, 1, 2, 3, 4];

struct Device {
    name: &'static str,
    shift: Shift,
    halved: &'static [i64],
    missing: &'static [i64],
}

fn fleets() -> Vec<(&'static str, Vec<Device>)> {
    let mixes: [(&'static [i64], &'static [i64]); 5] = [(&[], &[]), (HALVED_HIGH, &[]), (&[], &[]), (HALVED_LOW, &[]), (&[], &[3, 8])];
    let names = ["robot-a", "robot-b", "robot-c", "robot-d", "robot-e"];
    let own = [Shift::Rotate90, Shift::Rotate180, Shift::Mirror, Shift::Noise, Shift::Dropout];
    let make = |shifts: [Shift; 5]| -> Vec<Device> {
        names.iter().zip(shifts).zip(mixes).map(|((name, shift), (halved, missing))| Device { name, shift, halved, missing }).collect()
    };
    vec![("own shifts", make(own)), ("one world", make([Shift::Rotate90; 5]))]
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A child process stopped when dropped, with the directory it works in.
struct Spawned(Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nginx serving `root` (the repository) read-only on a free loopback port.
fn nginx(root: &std::path::Path) -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let user = if unsafe { libc::geteuid() } == 0 { "user root root;" } else { "" };
    let conf = format!(
        "{user}\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{ access_log off; \
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi; \
         default_type application/octet-stream; server {{ listen 127.0.0.1:{port}; root {}; }} }}\n",
        root.display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let binary = if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
    let child = Command::new(binary)
        .args(["-p", dir.path().to_str().unwrap(), "-c", dir.path().join("nginx.conf").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (make setup)");
    wait_listening(port, "nginx");
    Spawned(child, port, dir)
}

fn mosquitto() -> Spawned {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let stay = if unsafe { libc::geteuid() } == 0 { "user root\n" } else { "" };
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{stay}")).unwrap();
    let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| std::path::Path::new(p).is_file()).expect("mosquitto (make setup)");
    let child = Command::new(binary).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_listening(port, "mosquitto");
    Spawned(child, port, dir)
}

fn publish(port: u16, topic: &str, lines: &[String]) {
    let mut p = Command::new("mosquitto_pub").args(["-p", &port.to_string(), "-q", "1", "-t", topic, "-l"]).stdin(Stdio::piped()).spawn().unwrap();
    p.stdin.take().unwrap().write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
    assert!(p.wait().unwrap().success());
}

fn sample_lines(digits: &Digits, indices: &[usize], device: &str, shift: Shift) -> Vec<String> {
    indices
        .iter()
        .map(|&i| {
            let data: Vec<String> = digits.image(i, shift).iter().map(|v| format!("{v:.4}")).collect();
            format!(
                "{{\"key\": \"{device}:{i}\", \"task\": \"sorter\", \"label\": \"{}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}",
                digits.labels[i],
                data.join(",")
            )
        })
        .collect()
}

/// A fleet on one broker with its signed repository behind nginx and a shared offers directory.
struct Fleet {
    broker: Spawned,
    _nginx: Spawned,
    work: tempfile::TempDir,
    dirs: Vec<tempfile::TempDir>,
    daemons: Vec<Daemon>,
}

/// A running daemon: its stop switch, its HTTP address, its task.
type Daemon = (tokio::sync::oneshot::Sender<()>, std::net::SocketAddr, tokio::task::JoinHandle<Result<(), adaptd_daemon::serve::ServeError>>);

impl Fleet {
    fn keys(&self) -> std::path::PathBuf {
        self.work.path().join("keys")
    }
    fn repo(&self) -> std::path::PathBuf {
        self.work.path().join("www/repo")
    }
    fn offers(&self) -> std::path::PathBuf {
        self.work.path().join("offers")
    }

    async fn stop(self) {
        for (stop, _, handle) in self.daemons {
            let _ = stop.send(());
            let _ = handle.await;
        }
    }
}

/// Five devices learn from their samples; returns the fleet (still running), each device's
/// (offer, adapter) and the held-out digits.
async fn learn(digits: &Digits, devices: &[Device], one_world: bool, seed: u64) -> (Fleet, Vec<(Offer, Adapter)>, Vec<usize>) {
    let mut pool = digits.held_out();
    let mut rng = adaptd_adapters::tensor::SeededRng::new(seed);
    for i in (1..pool.len()).rev() {
        pool.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let (train_pool, test) = pool.split_at(TRAIN);
    let work = tempfile::tempdir().unwrap();
    let (keys, repo, offers_dir) = (work.path().join("keys"), work.path().join("www/repo"), work.path().join("offers"));
    adaptd_fleet::repo::keygen(&keys).unwrap();
    adaptd_fleet::repo::init(&keys, &repo, adaptd_fleet::repo::Expiry::default()).await.unwrap();
    std::fs::create_dir_all(&offers_dir).unwrap();
    let web = nginx(&work.path().join("www"));
    let broker = mosquitto();
    let dirs: Vec<tempfile::TempDir> = devices.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons = Vec::new();
    for (device, dir) in devices.iter().zip(&dirs) {
        let mut config =
            adaptd_daemon::config::Config { bundle: repo_root().join("build/bundles/digits-cnn"), state_dir: dir.path().to_path_buf(), ..Default::default() };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        (config.mqtt.host, config.mqtt.port, config.mqtt.device_id) = ("127.0.0.1".into(), broker.1, device.name.into());
        config.ingest.tasks = vec!["sorter".into()];
        let schedule = &mut config.schedule;
        (schedule.trigger.min_new_samples, schedule.trigger.settle, schedule.tick) = (0, Duration::from_secs(2), Duration::from_millis(100));
        (config.schedule.limits.max_cpu_percent, config.schedule.limits.min_available_mb) = (100.0, 0);
        (config.training.adapter, config.training.escalate, config.training.recipe.seed) = (adaptd_daemon::adapt::AdapterChoice::Lora, false, seed);
        config.fleet.repository = format!("http://127.0.0.1:{}/repo/", web.1);
        config.fleet.root_file = repo.join("metadata/1.root.json");
        config.fleet.offers = offers_dir.to_str().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(adaptd_daemon::serve::run(
            config,
            None,
            async {
                let _ = stopped.await;
            },
            Some(bound_tx),
        ));
        daemons.push((stop, bound_rx.await.unwrap(), handle));
    }
    let mut lines = Vec::new();
    for (n, device) in devices.iter().enumerate() {
        // One world: each device two fifths of the samples (overlapping); own shifts: all of
        // them, each under its own view.
        let mine: Vec<usize> = train_pool
            .iter()
            .copied()
            .enumerate()
            .filter(|(k, i)| {
                let label = digits.labels[*i];
                (!one_world || (k + n) % devices.len() < 2) && !device.missing.contains(&label) && (!device.halved.contains(&label) || k % 2 == 0)
            })
            .map(|(_, i)| i)
            .collect();
        lines.push((format!("adaptd/v1/{}/samples/sorter", device.name), sample_lines(digits, &mine, device.name, device.shift)));
    }
    let clients: Vec<adaptd::client::Client> = daemons.iter().map(|(_, addr, _)| adaptd::client::Client::new(*addr)).collect();
    let port = broker.1;
    tokio::task::spawn_blocking(move || {
        for (topic, l) in &lines {
            publish(port, topic, l);
        }
        let started = Instant::now();
        while !clients.iter().all(|c| {
            let s = c.get("/v1/tasks/sorter/status").unwrap().body;
            s["jobs"]["promoted"].as_u64().unwrap_or(0) + s["jobs"]["rejected"].as_u64().unwrap_or(0) > 0
        }) {
            assert!(started.elapsed() < Duration::from_secs(600), "the devices did not decide");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
    let mut offers = Vec::new();
    for (device, dir) in devices.iter().zip(&dirs) {
        let store = AdapterStore::open(dir.path().join("adapters")).unwrap();
        let Some(&version) = store.versions("sorter").unwrap().last() else {
            println!("  {} promoted nothing (its own LoRA did not beat the base model on its holdout); it offers nothing", device.name);
            continue;
        };
        let adapter = store.load("sorter", version).unwrap();
        let m = &adapter.manifest;
        let offer = Offer {
            device: device.name.into(),
            task: "sorter".into(),
            version,
            kind: m.kind.name().into(),
            base_sha256: m.base.manifest_sha256.clone(),
            parent_release: None,
            metrics: m.metrics.clone(),
            samples: m.samples.clone(),
            offered_ms: 0,
        };
        offers.push((offer, adapter));
    }
    (Fleet { broker, _nginx: web, work, dirs, daemons }, offers, test.to_vec())
}

/// Accuracy on each device's held-out digits under its own view, and their mean (pooled).
fn scores(onnx: &mut OnnxModel, bundle: &Bundle, adapter: Option<&Adapter>, digits: &Digits, devices: &[Device], test: &[usize]) -> (Vec<f64>, f64) {
    let own: Vec<f64> = devices.iter().map(|d| digits.accuracy(onnx, bundle, adapter, test, d.shift).unwrap()).collect();
    let pooled = own.iter().sum::<f64>() / own.len() as f64;
    (own, pooled)
}

const ROUNDS: usize = 3;

fn main() {
    let seeds: u64 = std::env::args().skip_while(|a| a != "--seeds").nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let digits = Digits::load(&repo_root().join("build/data/digits.safetensors")).unwrap();
    let bundle = Bundle::open(repo_root().join("build/bundles/digits-cnn")).unwrap();
    let mut onnx = OnnxModel::load(&bundle, SessionOptions { intra_op_threads: 1, ..Default::default() }, None).unwrap();
    let parent = Parent::base(&bundle).unwrap();
    // (fleet, what, seed, pooled gain over the mean single-device adapter, worst own-holdout drop)
    let mut summary: Vec<(&str, String, u64, f64, f64)> = Vec::new();
    for (fleet_name, devices) in fleets() {
        let one_world = fleet_name == "one world";
        for seed in 0..seeds {
            let started = Instant::now();
            let (fleet, offers, test) = runtime.block_on(learn(&digits, &devices, one_world, seed));
            println!("\n{fleet_name}, seed {seed}: {} offers in {:.0} s", offers.len(), started.elapsed().as_secs_f64());
            let (base_own, base_pooled) = scores(&mut onnx, &bundle, None, &digits, &devices, &test);
            let singles: Vec<(Vec<f64>, f64)> = offers.iter().map(|(_, a)| scores(&mut onnx, &bundle, Some(a), &digits, &devices, &test)).collect();
            let mean_single = singles.iter().map(|s| s.1).sum::<f64>() / singles.len().max(1) as f64;
            // Each offering device's accuracy on its own digits with its own adapter.
            let own_of: Vec<(usize, f64)> = offers
                .iter()
                .zip(&singles)
                .map(|((o, _), s)| {
                    let k = devices.iter().position(|d| d.name == o.device).unwrap();
                    (k, s.0[k])
                })
                .collect();
            let mut judge = |what: String, adapter: &Adapter, summary: &mut Vec<(&str, String, u64, f64, f64)>| -> (Vec<f64>, f64) {
                let (own, pooled) = scores(&mut onnx, &bundle, Some(adapter), &digits, &devices, &test);
                let drop = own_of.iter().map(|(k, mine)| mine - own[*k]).fold(f64::NEG_INFINITY, f64::max);
                summary.push((fleet_name, what, seed, pooled - mean_single, drop));
                (own, pooled)
            };
            let mut rows = format!("{:<9} {:<10} {:>6} {:>6}", "device", "shift", "base", "own");
            let mut columns: Vec<Option<Vec<f64>>> = Vec::new();
            let mut lines = Vec::new();
            let mut first_release = None;
            for rule in [Rule::Cat, Rule::Svd, Rule::Linear] {
                rows += &format!(" {:>7}", rule.name());
                match aggregate("sorter", 1, &bundle, &parent, &offers, Options { rule: Some(rule), max_residual: 1.0, cap: None }) {
                    Ok(a) => {
                        let residual = a.manifest.aggregate.as_ref().map_or(0.0, |p| p.residual);
                        let (own, pooled) = judge(rule.name().to_string(), &a, &mut summary);
                        lines.push(format!(
                            "  {:<6} pooled {pooled:.3} ({:+.1} points over the mean single), residual {residual:.4}",
                            rule.name(),
                            100.0 * (pooled - mean_single)
                        ));
                        columns.push(Some(own));
                        if rule == Rule::Svd {
                            first_release = Some(a);
                        }
                    }
                    Err(e) => {
                        lines.push(format!("  {:<6} refused: {e}", rule.name()));
                        columns.push(None);
                    }
                }
            }
            rows += "   (own held-out digits)\n";
            for (k, d) in devices.iter().enumerate() {
                let mine = own_of.iter().find(|(i, _)| *i == k).map_or("     -".to_string(), |(_, a)| format!("{a:>6.3}"));
                rows += &format!("{:<9} {:<10} {:>6.3} {mine}", d.name, format!("{:?}", d.shift), base_own[k]);
                for c in &columns {
                    rows += &c.as_ref().map_or(format!(" {:>7}", "n/a"), |own| format!(" {:>7.3}", own[k]));
                }
                rows += "\n";
            }
            print!("{rows}");
            println!(
                "pooled: base {base_pooled:.3}, single-device adapters mean {mean_single:.3} ({:?})",
                singles.iter().map(|s| format!("{:.3}", s.1)).collect::<Vec<_>>()
            );
            for l in lines {
                println!("{l}");
            }

            // Rounds: the svd aggregate is release 1; `fleet learn` goes on from it.
            if let Some(first) = first_release {
                let plan = adaptd_daemon::fleet::learn::LearnPlan {
                    task: "sorter".into(),
                    rounds: ROUNDS,
                    devices: devices.iter().map(|d| d.name.to_string()).collect(),
                    parent: Some(1),
                    offers_dir: fleet.offers(),
                    bundle: Bundle::open(repo_root().join("build/bundles/digits-cnn")).unwrap(),
                    options: Options { rule: None, max_residual: 1.0, cap: None },
                    keys: fleet.keys(),
                    repo: fleet.repo(),
                    state_dir: fleet.work.path().join("learn"),
                    offer_timeout: Duration::from_secs(300),
                    device_timeout: Duration::from_secs(300),
                    final_policy: adaptd_protocol::fleet::Policy::Validate,
                    expiry: adaptd_fleet::repo::Expiry::default(),
                };
                let rounds_started = Instant::now();
                let broker = adaptd_daemon::mqtt::BrokerConnection::plain("127.0.0.1", fleet.broker.1);
                let report = runtime.block_on(async {
                    adaptd_daemon::fleet::aggregate::publish(&first, 1, None, false, &plan.keys, &plan.repo, plan.expiry).await.unwrap();
                    adaptd_daemon::fleet::learn::learn(&plan, broker, adaptd_protocol::topics::DEFAULT_PREFIX, |_| {}, std::future::pending::<()>()).await
                });
                match report {
                    Ok(report) => {
                        println!("rounds ({:.0} s):", rounds_started.elapsed().as_secs_f64());
                        for round in &report.rounds {
                            let dir = tempfile::tempdir().unwrap();
                            runtime.block_on(adaptd_fleet::repo::read_release(&plan.repo, "sorter", round.release, dir.path())).unwrap();
                            let release = Adapter::read_dir(dir.path()).unwrap();
                            let (own, pooled) = judge(format!("round {}", round.round), &release, &mut summary);
                            println!(
                                "  round {} -> release {}: pooled {pooled:.3} ({:+.1} over the mean single), own {:?}, {} offers",
                                round.round,
                                round.release,
                                100.0 * (pooled - mean_single),
                                own.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>(),
                                round.offers.len()
                            );
                        }
                        let finals: Vec<String> = report.final_devices.iter().map(|d| format!("{} {:?}", d.device, d.state)).collect();
                        println!("  release {:?} under validate: {finals:?}", report.final_release);
                    }
                    Err(e) => println!("rounds failed: {e}"),
                }
            }
            let _ = &fleet.dirs;
            runtime.block_on(fleet.stop());
        }
    }
    println!("\nsummary over seeds: pooled gain over the mean single-device adapter, worst own-holdout drop (goal >= +5.0, <= 2.0 points)");
    let mut kinds: Vec<(&str, String)> = Vec::new();
    for s in &summary {
        if !kinds.contains(&(s.0, s.1.clone())) {
            kinds.push((s.0, s.1.clone()));
        }
    }
    for (fleet_name, what) in kinds {
        let hits: Vec<_> = summary.iter().filter(|s| s.0 == fleet_name && s.1 == what).collect();
        let mut gains: Vec<f64> = hits.iter().map(|s| 100.0 * s.3).collect();
        let mut drops: Vec<f64> = hits.iter().map(|s| 100.0 * s.4).collect();
        gains.sort_by(f64::total_cmp);
        drops.sort_by(f64::total_cmp);
        println!(
            "  {fleet_name:<10} {what:<8} gain median {:+5.1} (range {:+5.1} .. {:+5.1}), worst drop median {:5.1}   [{} seeds]",
            gains[gains.len() / 2],
            gains[0],
            gains[gains.len() - 1],
            drops[drops.len() / 2],
            hits.len()
        );
    }
}
