//! The fleet's adapter repository as an operator makes it with the CLI and as a device reads it
//! with another implementation: python-tuf's reference client, over HTTP.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adaptd_adapters::{AdapterStore, Bundle};
use serde_json::Value;

use crate::reference_bundle;

pub(crate) fn adaptd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(args).env("ADAPTD_LOG", "warn").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A static HTTP server for the repository (the fleet tests proper use nginx).
struct Served(Child, u16);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path) -> Served {
    let port = crate::broker::free_port();
    let child = Command::new(crate::python())
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Served(child, port)
}

/// What python-tuf's client says of `targets`, one JSON object each.
fn python_tuf(root: &Path, port: u16, work: &Path, targets: &[&str]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/integration/tuf_client.py");
    let out = Command::new(crate::python())
        .arg(&script)
        .args([root.to_str().unwrap(), &format!("http://127.0.0.1:{port}"), work.to_str().unwrap()])
        .args(targets)
        .output()
        .unwrap();
    assert!(out.status.success(), "python-tuf refused the repository: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn python_tuf_reads_the_adapter_repository_adaptd_publishes_and_yanks() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, repo, state) = (dir.path().join("keys"), dir.path().join("repo"), dir.path().join("state"));
    let (keys_s, repo_s) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let store = AdapterStore::open(state.join("adapters")).unwrap();
    let saved = store.save(&crate::head_adapter(&bundle, "sorter", 1, 7)).unwrap();

    let (ok, out) = adaptd(&["fleet", "keygen", "--keys", keys_s]);
    assert!(ok, "{out}");
    let (ok, out) = adaptd(&["fleet", "init", "--keys", keys_s, "--repo", repo_s]);
    assert!(ok && out.contains("1.root.json"), "{out}");
    let (ok, out) = adaptd(&["fleet", "init", "--keys", keys_s, "--repo", repo_s]);
    assert!(!ok && out.contains("holds a repository already"), "{out}");
    let (ok, out) = adaptd(&["fleet", "publish", "sorter", "1", "--state-dir", state.to_str().unwrap(), "--keys", keys_s, "--repo", repo_s]);
    assert!(ok && out.contains("sorter release 1"), "{out}");
    let (ok, out) = adaptd(&["fleet", "list", "--repo", repo_s, "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert!(ok && listed[0]["base_sha256"] == bundle.manifest_sha256.as_str() && listed[0]["kind"] == "head", "{listed}");

    let served = serve(&repo);
    let root = repo.join("metadata/1.root.json");
    let device = dir.path().join("device");
    let answers = python_tuf(&root, served.1, &device, &["sorter.r1.adapter.json", "sorter.r1.head.safetensors", "sorter.r2.adapter.json"]);
    let adapter_json = std::fs::read(store.version_dir("sorter", 1).join("adapter.json")).unwrap();
    assert_eq!(answers[0]["found"], true, "{answers:?}");
    assert_eq!(answers[0]["custom"]["adaptd"]["task"], "sorter");
    assert_eq!(answers[0]["custom"]["adaptd"]["release"], 1);
    assert_eq!(answers[0]["custom"]["adaptd"]["allow_force"], false);
    let parsed: Value = serde_json::from_slice(&adapter_json).unwrap();
    assert_eq!(
        parsed["files"]["head.safetensors"]["sha256"], answers[1]["sha256"],
        "the weights the device verified are the ones the adapter's manifest names"
    );
    assert_eq!(answers[1]["bytes"], saved.files["head.safetensors"].bytes);
    assert_eq!(answers[2]["found"], false, "no release 2");

    let (ok, out) = adaptd(&["fleet", "yank", "sorter", "1", "--keys", keys_s, "--repo", repo_s]);
    assert!(ok, "{out}");
    let answers = python_tuf(&root, served.1, &device, &["sorter.r1.adapter.json"]);
    assert_eq!(answers[0]["found"], false, "a yanked release is gone for a client that updates: {answers:?}");
    let (ok, out) = adaptd(&["fleet", "refresh", "--keys", keys_s, "--repo", repo_s]);
    assert!(ok, "{out}");
    python_tuf(&root, served.1, &device, &[]);
}

/// nginx from Debian's packages serving `root` on a free loopback port, logging each request's
/// status, range and body size.
pub struct Nginx {
    pub port: u16,
    scheme: &'static str,
    dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_throttled(root, None)
    }

    /// The same, sending targets at most `bytes_per_second` (a slow link, to stop a download
    /// half way).
    pub fn start_throttled(root: &Path, bytes_per_second: Option<u32>) -> Nginx {
        Nginx::start_with(root, &bytes_per_second.map(|b| format!("location /targets/ {{ limit_rate {b}; }}")).unwrap_or_default())
    }

    /// The same with `locations` (nginx configuration) inside its server block.
    pub fn start_with(root: &Path, locations: &str) -> Nginx {
        Nginx::start_full(root, locations, None)
    }

    /// Over HTTPS with this certificate and key (PEM).
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_full(root, "", Some((cert, key)))
    }

    fn start_full(root: &Path, locations: &str, tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let (ssl, tls_conf) = match tls {
            Some((cert, key)) => (" ssl", format!("ssl_certificate {}; ssl_certificate_key {};", cert.display(), key.display())),
            None => ("", String::new()),
        };
        let throttle = locations;
        let port = crate::broker::free_port();
        let d = dir.path().display();
        // As root, the workers must be allowed to read a private temporary directory.
        let user = if unsafe { libc::geteuid() } == 0 { "user root root;" } else { "" };
        let conf = format!(
            "{user}\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n  \
             log_format fleet '$status \"$request\" range=\"$http_range\" bytes=$body_bytes_sent';\n  access_log {d}/access.log fleet;\n  \
             client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n  \
             default_type application/octet-stream;\n  server {{ listen 127.0.0.1:{port}{ssl}; {tls_conf} root {}; {throttle} }}\n}}\n",
            root.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx = if Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx".to_string() } else { "nginx".to_string() };
        // A process group of its own: the master and its workers are stopped together, however
        // the test ends (killing only the master leaves its workers running, orphaned).
        let child = Command::new(nginx)
            .args(["-p", dir.path().to_str().unwrap(), "-c", dir.path().join("nginx.conf").to_str().unwrap()])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx (make setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen: {}", std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { port, scheme: if tls.is_some() { "https" } else { "http" }, dir, child }
    }

    pub fn url(&self) -> url::Url {
        url::Url::parse(&format!("{}://127.0.0.1:{}/", self.scheme, self.port)).unwrap()
    }

    /// The access log so far, a line per request.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The group's id is the master's pid (process_group(0)): master and workers at once.
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A repository with `sorter` release 1 (a head adapter on the digits bundle) published.
fn published_repository(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let state = dir.join("state");
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    AdapterStore::open(state.join("adapters")).unwrap().save(&crate::head_adapter(&bundle, "sorter", 1, 7)).unwrap();
    publish_first_release(dir, &state)
}

/// As an operator does it with the CLI: keys and a signed repository under `dir`, and `sorter`
/// v1 of the daemon state in `state_dir` published as release 1. Returns (keys, repository).
fn publish_first_release(dir: &Path, state_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (keys, repo) = (dir.join("keys"), dir.join("repo"));
    let (ks, rs) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    for args in [
        vec!["fleet", "keygen", "--keys", ks],
        vec!["fleet", "init", "--keys", ks, "--repo", rs],
        vec!["fleet", "publish", "sorter", "1", "--state-dir", state_dir.to_str().unwrap(), "--keys", ks, "--repo", rs],
    ] {
        let (ok, out) = adaptd(&args);
        assert!(ok, "{args:?}: {out}");
    }
    (keys, repo)
}

fn device_source(dir: &Path, repo: &Path, nginx: &Nginx, name: &str) -> adaptd_fleet::fetch::Source {
    adaptd_fleet::fetch::Source {
        base_url: nginx.url(),
        root: repo.join("metadata/1.root.json"),
        datastore: dir.join(name).join("tuf"),
        staging: dir.join(name).join("staging"),
        max_release_bytes: 1 << 20,
        ca: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fetches_a_release_through_tuf_resumes_a_download_and_refuses_tampering_by_reason() {
    use adaptd_fleet::fetch::{Progress, fetch};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (keys, repo) = published_repository(dir.path());
    let nginx = Nginx::start(&repo);
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();

    let source = device_source(dir.path(), &repo, &nginx, "device-1");
    let fetched = fetch(&source, "sorter", 1, Arc::new(Progress::default())).await.unwrap();
    assert_eq!((fetched.release.task.as_str(), fetched.release.release), ("sorter", 1));
    assert_eq!(fetched.release.base_sha256, bundle.manifest_sha256);
    let adapter = adaptd_adapters::Adapter::read_dir(&fetched.dir).expect("a verified adapter directory");
    assert_eq!(adapter.manifest.version, 1);
    let total: u64 = std::fs::read_dir(&fetched.dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert_eq!(fetched.downloaded, total, "a fresh fetch downloads every byte");

    // Killed mid-download: half of the weights are in staging; the next fetch asks for the rest.
    let weights =
        std::fs::read_dir(repo.join("targets")).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_str().unwrap().ends_with("head.safetensors")).unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    let source = device_source(dir.path(), &repo, &nginx, "device-2");
    std::fs::create_dir_all(source.staging.join("partial")).unwrap();
    std::fs::write(source.staging.join("partial").join(weights.file_name().unwrap()), &bytes[..bytes.len() / 2]).unwrap();
    let resumed = fetch(&source, "sorter", 1, Arc::new(Progress::default())).await.unwrap();
    assert_eq!(std::fs::read(resumed.dir.join("head.safetensors")).unwrap(), bytes);
    assert_eq!(resumed.downloaded, total - (bytes.len() / 2) as u64, "only the rest came over the network");
    let log = nginx.log();
    assert!(log.lines().any(|l| l.starts_with("206") && l.contains(&format!("range=\"bytes={}-\"", bytes.len() / 2))), "a Range request: {log}");

    // A torn tail in what was kept (a crash mid-write): it does not verify, so the file is
    // downloaded once more from the start, and the release still arrives.
    let source = device_source(dir.path(), &repo, &nginx, "device-2b");
    std::fs::create_dir_all(source.staging.join("partial")).unwrap();
    let mut torn = bytes[..bytes.len() / 2].to_vec();
    torn.extend_from_slice(&[0u8; 16]);
    std::fs::write(source.staging.join("partial").join(weights.file_name().unwrap()), &torn).unwrap();
    let again = fetch(&source, "sorter", 1, Arc::new(Progress::default())).await.unwrap();
    assert_eq!(std::fs::read(again.dir.join("head.safetensors")).unwrap(), bytes);

    let refused =
        |source: adaptd_fleet::fetch::Source, release: u64| async move { fetch(&source, "sorter", release, Arc::new(Progress::default())).await.unwrap_err() };
    // Each case is refused by every device of a five-device fleet (each its own trusted state),
    // with the same reason.
    let fleet = |name: &str| (0..5).map(|k| format!("{name}-{k}")).collect::<Vec<_>>();
    let refused_by_every = |nginx: &Nginx, name: &str, release: u64| {
        let sources: Vec<_> = fleet(name).iter().map(|n| device_source(dir.path(), &repo, nginx, n)).collect();
        async move {
            let mut errors = Vec::new();
            for source in sources {
                errors.push(fetch(&source, "sorter", release, Arc::new(Progress::default())).await.unwrap_err());
            }
            let first = errors.remove(0);
            for e in &errors {
                assert_eq!((e.refused, e.reason), (first.refused, first.reason), "every device refuses alike: {e} / {first}");
            }
            first
        }
    };
    // Not published.
    let e = refused_by_every(&nginx, "device-3", 2).await;
    assert_eq!((e.refused, e.reason), (true, "no_such_release"), "{e}");
    // The weights edited on the server.
    let mut edited = bytes.clone();
    let last = edited.len() - 1;
    edited[last] ^= 1;
    std::fs::write(&weights, &edited).unwrap();
    let e = refused_by_every(&nginx, "device-4", 1).await;
    assert_eq!((e.refused, e.reason), (true, "hash_mismatch"), "{e}");
    std::fs::write(&weights, &bytes).unwrap();
    // A longer body than signed.
    std::fs::write(&weights, [bytes.as_slice(), b"more"].concat()).unwrap();
    let e = refused_by_every(&nginx, "device-5", 1).await;
    assert!(e.refused && ["too_large", "hash_mismatch"].contains(&e.reason), "{e}");
    std::fs::write(&weights, &bytes).unwrap();

    // The release list edited on the server (the task's base hash swapped), and a repository
    // signed by keys the device's root does not know.
    let newest_targets = |repo: &Path| {
        let mut all: Vec<_> =
            std::fs::read_dir(repo.join("metadata")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_str().unwrap().ends_with(".targets.json")).collect();
        all.sort_by_key(|p| p.file_name().unwrap().to_str().unwrap().split('.').next().unwrap().parse::<u64>().unwrap());
        all.pop().unwrap()
    };
    let targets_file = newest_targets(&repo);
    let original = std::fs::read_to_string(&targets_file).unwrap();
    std::fs::write(&targets_file, original.replace(&bundle.manifest_sha256, &"0".repeat(64))).unwrap();
    let e = refused_by_every(&nginx, "device-8", 1).await;
    assert!(e.refused && ["hash_mismatch", "bad_signature"].contains(&e.reason), "{e}");
    std::fs::write(&targets_file, &original).unwrap();
    let other = tempfile::tempdir().unwrap();
    let (_, foreign) = published_repository(other.path());
    let impostor = Nginx::start(&foreign);
    let e = refused_by_every(&impostor, "device-9", 1).await;
    assert_eq!((e.refused, e.reason), (true, "bad_signature"), "{e}");

    // Expired metadata (a timestamp that ran out yesterday), then refreshed by the CLI.
    let timestamp = std::fs::read(repo.join("metadata/timestamp.json")).unwrap();
    let expired = adaptd_fleet::repo::Expiry { timestamp_days: -1, ..adaptd_fleet::repo::Expiry::default() };
    adaptd_fleet::repo::refresh(&keys, &repo, expired).await.unwrap();
    let e = refused_by_every(&nginx, "device-7", 1).await;
    assert_eq!((e.refused, e.reason), (true, "expired_metadata"), "{e}");
    let (ok, out) = adaptd(&["fleet", "refresh", "--keys", keys.to_str().unwrap(), "--repo", repo.to_str().unwrap()]);
    assert!(ok, "{out}");
    // The device's clock stepped back behind a time it had already seen (its datastore keeps
    // the latest): nothing it verified can be trusted to be current.
    for name in fleet("device-10") {
        let stepped = device_source(dir.path(), &repo, &nginx, &name);
        std::fs::create_dir_all(&stepped.datastore).unwrap();
        std::fs::write(stepped.datastore.join("latest_known_time.json"), "\"2099-01-01T00:00:00Z\"").unwrap();
        let e = refused(stepped, 1).await;
        assert_eq!((e.refused, e.reason), (true, "clock_stepped_back"), "{name}: {e}");
    }
    // An old timestamp restored after a device saw the new one: a rollback attack.
    let watchers: Vec<_> = fleet("device-6").iter().map(|n| device_source(dir.path(), &repo, &nginx, n)).collect();
    for watcher in &watchers {
        fetch(watcher, "sorter", 1, Arc::new(Progress::default())).await.unwrap();
    }
    std::fs::write(repo.join("metadata/timestamp.json"), &timestamp).unwrap();
    for watcher in watchers {
        let e = refused(watcher, 1).await;
        assert_eq!((e.refused, e.reason), (true, "rollback_attack"), "{e}");
    }
}

/// The rollout status a device keeps retained for `task`, as the controller reads it.
fn retained_status(port: u16, device: &str, task: &str) -> Value {
    let out = Command::new("mosquitto_sub")
        .args(["-p", &port.to_string(), "-t", &format!("adaptd/v1/{device}/rollout/{task}"), "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// A device of the rollout tests: it never trains by itself (releases come from the repository
/// `nginx` serves), and its rollback watch judges a release on 10-20 fresh labels.
fn fleet_device_config(port: u16, state: &Path, device: &str, nginx: &Nginx, repo: &Path) -> adaptd_daemon::config::Config {
    let mut config = crate::adapt::daemon_config(port, state, "sorter", 1_000_000);
    config.mqtt.device_id = device.into();
    (config.schedule.trigger.settle, config.schedule.trigger.interval) = (Duration::from_secs(u64::MAX / 4_000), Duration::from_secs(u64::MAX / 4_000));
    (config.gate.watch.min_samples, config.gate.watch.max_samples) = (10, 20);
    config.fleet = adaptd_daemon::fleet::FleetConfig {
        repository: nginx.url().to_string(),
        root_file: repo.join("metadata/1.root.json"),
        ca_file: std::path::PathBuf::new(),
        max_release_mb: 16,
        maintenance_window: String::new(),
        offers: String::new(),
    };
    config
}

/// The devices of the rollout test, in the order the statuses are read.
const DEVICES: [&str; 5] = ["robot-b", "robot-c", "robot-d", "robot-e", "robot-f"];

/// `adaptd fleet rollout` as an operator types it, run to its end; its exit code and tables.
fn rollout(port: u16, state: &Path, release: u64) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["fleet", "rollout", "sorter", &release.to_string(), "--devices", "robot-d,robot-b,robot-f,robot-c,robot-e", "--waves", "1,2,2"])
        .args(["--mqtt", &format!("127.0.0.1:{port}"), "--state", state.to_str().unwrap(), "--device-timeout-s", "120"])
        .env("ADAPTD_LOG", "warn")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `adaptd fleet controller` taking over a saved rollout, run to its end.
fn controller(port: u16, state: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["fleet", "controller", "--mqtt", &format!("127.0.0.1:{port}"), "--state", state.to_str().unwrap()])
        .env("ADAPTD_LOG", "warn")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn assign_by_hand(port: u16, device: &str, body: &str) {
    let ok = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-q", "1", "-t", &format!("adaptd/v1/{device}/assign/sorter"), "-m", body])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// One device learns rotated digits; an operator publishes its adapter as release 1 of a
/// signed repository on nginx, and an adapter that knows nothing as release 2. Five devices
/// that see the same shift and never trained take release 1 in waves (a canary, then pairs):
/// each fetches it through TUF, its own gate judges it on its own holdout samples, and it
/// serves it; fresh labels let the canary's watch commit it. Release 2 is refused by the
/// canary's gate, the rollout halts, no other device downloads it and no device answers
/// differently. Assignments that are not ones are refused by every device with their reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_rolls_out_in_waves_through_each_devices_gate_and_a_bad_one_halts_at_the_canary() {
    use crate::adapt::{EventLog, digit_lines, publish, shut_down, start_daemon_with};
    use adaptd::datasets::{Digits, Shift};
    let digits = Digits::load(&crate::digits_data()).unwrap();
    let pool = digits.held_out();

    // Device A learns the shift.
    let a = start_daemon_with("sorter", 300, |_| {}).await;
    let (port_a, lines) = (a.broker.port, digit_lines(&digits, pool.iter().copied().take(300), "cam-a", "sorter", Shift::Rotate90));
    let events_a = a.events;
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        publish(port_a, "adaptd/v1/robot-3/samples/sorter", &lines);
        let decision = events_a.wait_for("gate_decision", Duration::from_secs(180));
        assert_eq!(decision["promote"], true, "{}", decision["summary"]);
    })
    .await
    .unwrap();
    shut_down(a.stop, a.daemon).await;

    // The operator publishes it, and a bad one.
    let dir = tempfile::tempdir().unwrap();
    let (keys, repo) = publish_first_release(dir.path(), a.state.path());
    let (ks, rs) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    crate::head_adapter(&bundle, "sorter", 9, 99).write_dir(&junk).unwrap();
    let (ok, out) = adaptd(&["fleet", "publish", "sorter", "--from", junk.to_str().unwrap(), "--release", "2", "--keys", ks, "--repo", rs]);
    assert!(ok, "{out}");
    // Release 3: correctly signed, but trained on another base model.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let minilm = Bundle::open(reference_bundle("minilm")).unwrap();
    crate::head_adapter(&minilm, "sorter", 1, 5).write_dir(&foreign).unwrap();
    let (ok, out) = adaptd(&["fleet", "publish", "sorter", "--from", foreign.to_str().unwrap(), "--release", "3", "--keys", ks, "--repo", rs]);
    assert!(ok, "{out}");
    let nginx = Nginx::start(&repo);

    // Devices B to F: the same shift, never train by themselves, take releases from the repository.
    let broker = crate::broker::Mosquitto::start();
    let port = broker.port;
    let mut daemons = Vec::new();
    let mut states = Vec::new();
    for device in DEVICES {
        let state = tempfile::tempdir().unwrap();
        let config = fleet_device_config(port, state.path(), device, &nginx, &repo);
        daemons.push(crate::serve_in_process(config).await);
        states.push(state);
    }
    let events_b = EventLog::start(port, states[0].path());
    // Each device's own camera and its own digits, none of which device A trained on: what each
    // device's gate judges a release by. Fresh labels come from the held-out pool's tail.
    let trained: std::collections::HashSet<usize> = pool.iter().copied().take(300).collect();
    let unseen: Vec<usize> = (0..digits.len()).filter(|i| !trained.contains(i) && !pool[470..].contains(i)).collect();
    let holdouts: Vec<Vec<String>> = (0..DEVICES.len())
        .map(|d| digit_lines(&digits, unseen.iter().copied().skip(d * 170).take(170), &format!("cam-{d}"), "sorter", Shift::Rotate90))
        .collect();
    let fresh = digit_lines(&digits, pool.iter().copied().skip(470), "cam-fresh", "sorter", Shift::Rotate90);
    // Robot C's camera turns back upright: release 1 gets its fresh labels wrong.
    let upright = digit_lines(&digits, pool.iter().copied().skip(470), "cam-upright", "sorter", Shift::None);
    let clients: Vec<adaptd::client::Client> = daemons.iter().map(|(_, addr, _)| adaptd::client::Client::new(*addr)).collect();
    let probe_rows: Vec<usize> = pool.iter().copied().skip(470).take(8).collect();
    let probe_pixels: Vec<f32> = probe_rows.iter().flat_map(|&i| digits.image(i, Shift::Rotate90)).collect();
    let probe = serde_json::json!({ "inputs": { "image": { "shape": [probe_rows.len(), 1, 8, 8], "data": probe_pixels } } });
    let rollouts = dir.path().to_path_buf();
    let (first, second, committed, rolled_back, malformed, statuses, retained) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        for (device, holdout) in DEVICES.iter().zip(&holdouts) {
            publish(port, &format!("adaptd/v1/{device}/samples/sorter"), holdout);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while clients.iter().any(|c| c.get("/v1/tasks/sorter/status").unwrap().body["samples"].as_u64().unwrap_or(0) < 170) {
            assert!(Instant::now() < deadline, "the devices did not store their samples");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Release 1, with the controller killed (SIGKILL) once the canary passed and another
        // taking over from its saved state.
        let started = Instant::now();
        let state = rollouts.join("r1.json");
        let mut killed = Command::new(env!("CARGO_BIN_EXE_adaptd"))
            .args(["fleet", "rollout", "sorter", "1", "--devices", "robot-d,robot-b,robot-f,robot-c,robot-e", "--waves", "1,2,2"])
            .args(["--mqtt", &format!("127.0.0.1:{port}"), "--state", state.to_str().unwrap(), "--device-timeout-s", "120"])
            .env("ADAPTD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read(&state).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).is_none_or(|v| v["wave"] != 1) {
            assert!(Instant::now() < deadline, "the canary did not pass");
            std::thread::sleep(Duration::from_millis(20));
        }
        killed.kill().unwrap();
        killed.wait().unwrap();
        let first = controller(port, &state);
        eprintln!("release 1 rolled out to 5 devices in waves 1, 2, 2 (the controller killed after the canary): {:.1} s", started.elapsed().as_secs_f64());
        publish(port, "adaptd/v1/robot-b/samples/sorter", &fresh);
        let committed = events_b.wait_where("rollout", |e| e["state"] == "committed", Duration::from_secs(60));
        publish(port, "adaptd/v1/robot-c/samples/sorter", &upright);
        let rolled_back = events_b.wait_where("rollout", |e| e["state"] == "rolled_back", Duration::from_secs(60));
        // What every device answers, before and after the bad release's rollout.
        let predictions =
            || -> Vec<String> { clients.iter().map(|c| c.post("/v1/tasks/sorter/predict", Some(&probe)).unwrap().body["predictions"].to_string()).collect() };
        let before = predictions();
        let second = rollout(port, &rollouts.join("r2.json"), 2);
        let retained = retained_status(port, "robot-b", "sorter");
        assert_eq!(predictions(), before, "a release refused at the canary changes no device's answers");
        let ok = Command::new("mosquitto_pub")
            .args(["-p", &port.to_string(), "-q", "1", "-t", "adaptd/v1/robot-c/assign/sorter", "-m", "{\"seq\": 3}"])
            .status()
            .unwrap();
        assert!(ok.success());
        let malformed = events_b.wait_where("rollout", |e| e["reason"] == "malformed", Duration::from_secs(10));
        // By hand, as an attacker or a stale controller would: each refused by every device with
        // its reason, in the status it keeps retained for the controller.
        for (seq, body, reason) in [
            (0, r#"{"seq": 0, "task": "sorter", "release": 1, "policy": "validate"}"#, "stale_sequence"),
            (5, r#"{"seq": 5, "task": "other", "release": 1, "policy": "validate"}"#, "task_mismatch"),
            (6, r#"{"seq": 6, "task": "sorter", "release": 99, "policy": "validate"}"#, "no_such_release"),
            (7, r#"{"seq": 7, "task": "sorter", "release": 3, "policy": "validate"}"#, "wrong_base"),
            (8, r#"{"seq": 8, "task": "sorter", "release": 1, "policy": "force"}"#, "force_not_allowed"),
        ] {
            for device in DEVICES {
                assign_by_hand(port, device, body);
            }
            for device in DEVICES {
                // B's watch committed release 1 already: nothing to force, and nothing fetched.
                let reason = if device == "robot-b" && reason == "force_not_allowed" { "already_committed" } else { reason };
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let status = retained_status(port, device, "sorter");
                    if status["reason"] == reason && status["seq"] == seq {
                        let state = if reason == "already_committed" { "committed" } else { "refused" };
                        assert_eq!(status["state"], state, "{device}: {status}");
                        break;
                    }
                    assert!(Instant::now() < deadline, "{device} did not refuse {body} as {reason}: {status}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let statuses: Vec<Value> = clients.iter().map(|c| c.get("/v1/tasks/sorter/status").unwrap().body).collect();
        (first, second, committed, rolled_back, malformed, statuses, retained)
    })
    .await
    .unwrap();
    eprintln!("{}\n{}", first.1, second.1);
    assert!(first.0, "release 1 completed: {}", first.1);
    let last_table = first.1.rsplit("rollout sorter-r1").next().unwrap_or_default();
    assert!(last_table.contains("Completed") && last_table.matches("applied").count() == 5, "5/5 applied: {}", first.1);
    assert_eq!((committed["release"].as_u64(), committed["serving_release"].as_u64()), (Some(1), Some(1)), "{committed}");
    assert!(!second.0, "release 2 halted: {}", second.1);
    assert!(second.1.contains("Halted") && second.1.contains("gate_refused"), "{}", second.1);
    assert!(malformed["message"].as_str().unwrap().contains("missing field"), "{malformed}");
    assert_eq!((rolled_back["serving_version"].as_u64(), rolled_back["release"].as_u64()), (Some(0), Some(1)), "reports what it really serves: {rolled_back}");
    assert!(rolled_back["message"].as_str().unwrap().contains("fresh samples"), "{rolled_back}");
    let serving: Vec<u64> = statuses.iter().map(|s| s["serving_version"].as_u64().unwrap()).collect();
    assert_eq!(serving, [1, 0, 1, 1, 1], "every device serves release 1 as its v1 but C, which went back to the base model");
    let r2 = dir.path().join("r2.json").to_str().unwrap().to_string();
    let back = dir.path().join("back.json").to_str().unwrap().to_string();
    let (ok, out) = adaptd(&["fleet", "rollback", "--from", &r2, "--to", "1", "--state", &back, "--mqtt", &format!("127.0.0.1:{port}")]);
    assert!(!ok && out.contains("no device applied"), "nothing to take back from a rollout that halted at its canary: {out}");
    let (ok, out) = adaptd(&["fleet", "status", "--state", &r2]);
    assert!(ok && out.contains("gate_refused"), "{out}");
    let saved: Value = serde_json::from_slice(&std::fs::read(dir.path().join("r2.json")).unwrap()).unwrap();
    assert_eq!(saved["devices"]["robot-b"]["reason"], "gate_refused", "{saved}");
    assert!(["robot-c", "robot-d", "robot-e", "robot-f"].iter().all(|d| saved["devices"][d]["seq"].is_null()), "no later wave was assigned: {saved}");
    assert_eq!((retained["state"].as_str(), retained["release"].as_u64()), (Some("refused"), Some(2)), "what a controller reads: {retained}");
    let log = nginx.log();
    let weights = |release: u64| log.lines().filter(|l| l.contains(&format!("sorter.r{release}.head.safetensors"))).count();
    // Release 1: once per device in the rollout, and once more by each but B for the `force`
    // attempt (refused once the signed metadata says the release does not allow it).
    assert_eq!((weights(1), weights(2)), (9, 1), "every device fetched release 1, only the canary release 2: {log}");
    for (stop, _, daemon) in daemons {
        shut_down(stop, daemon).await;
    }
}

/// `adapter = "loreft"`, end to end: device A's job trains LoReFT edits of the bundle's layer
/// outputs with the head, the gate judges it as any adapter (the trainer's answers and serving's
/// agree) and it serves, its tensors in `reft.safetensors` in pyreft's layout. The operator
/// publishes it as release 1; device B, which never trained, fetches it through TUF, its own
/// gate judges it on B's own samples, it serves there byte for byte as A made it, and B's
/// rollback watch commits it on fresh labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loreft_adapter_is_trained_promoted_released_and_committed_by_another_device() {
    use crate::adapt::{EventLog, Running, digit_lines, publish, shut_down, start_daemon_with};
    use adaptd::datasets::{Digits, Shift};
    let Running { broker, state, events, base, stop, daemon } = start_daemon_with("sorter", 300, |c| {
        c.training.adapter = adaptd_daemon::adapt::AdapterChoice::Loreft;
        c.training.escalate = false;
    })
    .await;
    let digits = Digits::load(&crate::digits_data()).unwrap();
    let pool = digits.held_out();
    let lines = digit_lines(&digits, pool.iter().copied().take(360), "cam-3", "sorter", Shift::Rotate90);
    let port = broker.port;
    let decision = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500)); // ingest subscribes
        publish(port, "adaptd/v1/robot-3/samples/sorter", &lines);
        let started = events.wait_for("training_started", Duration::from_secs(60));
        assert_eq!(started["kind"], "loreft", "{started}");
        let decision = events.wait_for("gate_decision", Duration::from_secs(180));
        events.wait_for("job_finished", Duration::from_secs(60));
        decision
    })
    .await
    .unwrap();
    assert_eq!(decision["promote"], true, "{}", decision["summary"]);
    let evidence = &decision["evidence"];
    let (cand, inc) = (evidence["candidate"]["accuracy"].as_f64().unwrap(), evidence["incumbent"]["accuracy"].as_f64().unwrap());
    assert!(cand > inc + 0.2, "holdout accuracy {inc} -> {cand}");
    assert!(evidence["parity_max_diff"].as_f64().unwrap() < 1e-3, "serving answers as the trainer predicted: {evidence}");

    let trained = state.path().join("adapters/sorter/v000001");
    let manifest: Value = serde_json::from_slice(&std::fs::read(trained.join("adapter.json")).unwrap()).unwrap();
    assert_eq!((manifest["kind"].as_str(), manifest["lora"].is_null()), (Some("loreft"), true), "{manifest}");
    assert_eq!(manifest["reft"]["rank"], 4);
    assert_eq!(manifest["reft"]["modules"], serde_json::json!(["conv2", "fc1"]));
    let adapter = adaptd_adapters::Adapter::read_dir(&trained).unwrap();
    let reft = adapter.reft.as_ref().unwrap();
    assert_eq!(reft.parameter_count(), 4 * (2 * 32 + 1) + 4 * (2 * 64 + 1));
    let tensors = std::fs::read(trained.join("reft.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    assert_eq!(st.tensor("fc1.rotate_layer").unwrap().shape(), [64, 4], "pyreft's rotate_layer is R transposed");
    assert_eq!(st.tensor("fc1.weight").unwrap().shape(), [4, 64]);
    let status = adaptd::client::Client::new(base.trim_start_matches("http://").parse().unwrap()).get("/v1/tasks/sorter/status").unwrap().body;
    assert_eq!(status["serving_version"], 1, "{status}");
    shut_down(stop, daemon).await;

    // The operator publishes it.
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = publish_first_release(dir.path(), state.path());
    let nginx = Nginx::start(&repo);

    // Device B: the same shift, never trains by itself; its own samples judge the release.
    let state_b = tempfile::tempdir().unwrap();
    let (stop_b, addr_b, daemon_b) = crate::serve_in_process(fleet_device_config(port, state_b.path(), "robot-b", &nginx, &repo)).await;
    let events_b = EventLog::start(port, state_b.path());
    // B's own digits, none of which A trained on; fresh labels come from the held-out pool's tail.
    let trained: std::collections::HashSet<usize> = pool.iter().copied().take(360).collect();
    let unseen: Vec<usize> = (0..digits.len()).filter(|i| !trained.contains(i) && !pool[470..].contains(i)).collect();
    let own = digit_lines(&digits, unseen.iter().copied().take(170), "cam-b", "sorter", Shift::Rotate90);
    let fresh = digit_lines(&digits, pool.iter().copied().skip(470).take(20), "cam-fresh", "sorter", Shift::Rotate90);
    let rollouts = dir.path().join("r1.json");
    let (rollout, committed, status_b) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        publish(port, "adaptd/v1/robot-b/samples/sorter", &own);
        let client = adaptd::client::Client::new(addr_b);
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get("/v1/tasks/sorter/status").unwrap().body["samples"].as_u64().unwrap_or(0) < 170 {
            assert!(Instant::now() < deadline, "device B did not store its samples");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_adaptd"))
            .args(["fleet", "rollout", "sorter", "1", "--devices", "robot-b", "--waves", "1"])
            .args(["--mqtt", &format!("127.0.0.1:{port}"), "--state", rollouts.to_str().unwrap(), "--device-timeout-s", "120"])
            .env("ADAPTD_LOG", "warn")
            .output()
            .unwrap();
        let rollout = (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        publish(port, "adaptd/v1/robot-b/samples/sorter", &fresh);
        let committed = events_b.wait_where("rollout", |e| e["state"] == "committed", Duration::from_secs(60));
        (rollout, committed, client.get("/v1/tasks/sorter/status").unwrap().body)
    })
    .await
    .unwrap();
    assert!(rollout.0 && rollout.1.contains("Completed") && rollout.1.contains("applied"), "release 1 applied on B: {}", rollout.1);
    assert_eq!((committed["release"].as_u64(), committed["serving_release"].as_u64()), (Some(1), Some(1)), "{committed}");
    assert_eq!(status_b["serving_version"], 1, "{status_b}");
    let served = state_b.path().join("adapters/sorter/v000001");
    let manifest_b: Value = serde_json::from_slice(&std::fs::read(served.join("adapter.json")).unwrap()).unwrap();
    assert_eq!(manifest_b["kind"], "loreft", "{manifest_b}");
    assert_eq!(std::fs::read(served.join("reft.safetensors")).unwrap(), tensors, "B serves A's LoReFT tensors as A trained them");
    shut_down(stop_b, daemon_b).await;
    drop(broker);
}

/// The newest retained rollout status of `device`, or Null.
fn rollout_status(port: u16, device: &str) -> Value {
    retained_status(port, device, "sorter")
}

/// A daemon killed with SIGKILL half way through a download (the repository's server is slow)
/// resumes it after its restart with a `Range` request for the rest, and applies the release;
/// killed again during the watch after the promotion, it commits the release after that restart.
#[test]
fn a_daemon_killed_mid_download_resumes_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, repo) = (dir.path().join("keys"), dir.path().join("repo"));
    let (ks, rs) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let files = dir.path().join("adapter");
    std::fs::create_dir_all(&files).unwrap();
    crate::head_adapter(&bundle, "sorter", 1, 3).write_dir(&files).unwrap();
    for args in [
        vec!["fleet", "keygen", "--keys", ks],
        vec!["fleet", "init", "--keys", ks, "--repo", rs],
        vec!["fleet", "publish", "sorter", "--from", files.to_str().unwrap(), "--release", "1", "--allow-force", "--keys", ks, "--repo", rs],
    ] {
        let (ok, out) = adaptd(&args);
        assert!(ok, "{args:?}: {out}");
    }
    let first_file = std::fs::metadata(files.join("adapter.json")).unwrap().len();
    let nginx = Nginx::start_throttled(&repo, Some(256));
    let broker = crate::broker::Mosquitto::start();
    let config = dir.path().join("adaptd.toml");
    let text = format!(
        "bundle = {:?}\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\ndevice_id = \"robot-k\"\ninference_api = false\n\
         [ingest]\ntasks = [\"sorter\"]\n[gate]\nwatch_max_samples = 40\n[fleet]\nrepository = \"{}\"\nroot_file = {:?}\n",
        reference_bundle("digits-cnn"),
        dir.path().join("state"),
        broker.port,
        nginx.url(),
        repo.join("metadata/1.root.json")
    );
    std::fs::write(&config, text).unwrap();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_adaptd"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("ADAPTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut daemon = start();
    let port = broker.port;
    let ok = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-q", "1", "-r", "-t", "adaptd/v1/robot-k/assign/sorter"])
        .args(["-m", r#"{"seq": 1, "task": "sorter", "release": 1, "policy": "force"}"#])
        .status()
        .unwrap();
    assert!(ok.success());
    // Killed once the weights (the second file) are partly down.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = rollout_status(port, "robot-k");
        if status["state"] == "downloading" && status["bytes"][0].as_u64().unwrap_or(0) > first_file + 64 {
            break;
        }
        assert!(Instant::now() < deadline, "no download in progress: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let mut daemon = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied = loop {
        let status = rollout_status(port, "robot-k");
        if status["state"] == "applied" {
            break status;
        }
        assert!(Instant::now() < deadline, "not applied after the restart: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!((applied["release"].as_u64(), applied["serving_release"].as_u64()), (Some(1), Some(1)), "{applied}");
    // Killed again during the watch after the promotion: the watch goes on after the restart,
    // and fresh labels the release names commit it.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let mut daemon = start();
    std::thread::sleep(Duration::from_millis(1500));
    let digits = adaptd::datasets::Digits::load(&crate::digits_data()).unwrap();
    let fresh: Vec<String> = digits
        .held_out()
        .into_iter()
        .take(40)
        .map(|i| {
            let label = crate::TEST_LABELS[(digits.labels[i] % 3) as usize];
            let data: Vec<String> = digits.image(i, adaptd::datasets::Shift::None).iter().map(|v| format!("{v:.3}")).collect();
            format!(
                "{{\"key\": \"fresh:{i}\", \"task\": \"sorter\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}",
                data.join(",")
            )
        })
        .collect();
    crate::adapt::publish(port, "adaptd/v1/robot-k/samples/sorter", &fresh);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = rollout_status(port, "robot-k");
        if status["state"] == "committed" {
            break;
        }
        assert!(Instant::now() < deadline, "not committed after the restart during its watch: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let log = nginx.log();
    let resumed =
        log.lines().find(|l| l.starts_with("206") && l.contains("head.safetensors")).unwrap_or_else(|| panic!("no Range request for the rest: {log}"));
    eprintln!("resumed: {resumed}");
}

/// A device offers an adapter up (files and figures by HTTP PUT into nginx's WebDAV directory);
/// the operator lists the offers, reviews the figures, and publishes it as a release.
#[test]
fn a_device_offers_an_adapter_and_the_operator_publishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (keys, repo, state, www) = (dir.path().join("keys"), dir.path().join("repo"), dir.path().join("state"), dir.path().join("www"));
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    AdapterStore::open(state.join("adapters")).unwrap().save(&crate::head_adapter(&bundle, "sorter", 4, 11)).unwrap();
    std::fs::create_dir_all(www.join("offers")).unwrap();
    let nginx = Nginx::start_with(&www, "location /offers/ { dav_methods PUT; create_full_put_path on; client_max_body_size 64m; }");
    let to = format!("{}offers/", nginx.url());
    let (ok, out) = adaptd(&["fleet", "offer", "sorter", "4", "--to", &to, "--state-dir", state.to_str().unwrap(), "--device", "robot-a"]);
    assert!(ok && out.contains("offered at"), "{out}");
    let offered = www.join("offers/robot-a.sorter.v4");
    assert!(offered.join("offer.json").exists() && offered.join("head.safetensors").exists(), "{:?}", std::fs::read_dir(&offered).map(|d| d.count()));
    let (ok, out) = adaptd(&["fleet", "offers", "--dir", www.join("offers").to_str().unwrap(), "--json"]);
    let listed: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert!(ok, "{out}");
    let offer = &listed["offers"][0]["offer"];
    assert_eq!((offer["device"].as_str(), offer["task"].as_str(), offer["version"].as_u64()), (Some("robot-a"), Some("sorter"), Some(4)), "{listed}");
    assert_eq!(offer["base_sha256"], bundle.manifest_sha256.as_str());
    assert!(offer.get("samples").is_some() && !out.contains("\"data\""), "figures and counts, never a sample: {out}");
    let (ks, rs) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    for args in [vec!["fleet", "keygen", "--keys", ks], vec!["fleet", "init", "--keys", ks, "--repo", rs]] {
        let (ok, out) = adaptd(&args);
        assert!(ok, "{out}");
    }
    let (ok, out) = adaptd(&["fleet", "publish", "sorter", "--from", offered.to_str().unwrap(), "--keys", ks, "--repo", rs]);
    assert!(ok && out.contains("sorter release 1"), "the reviewed offer becomes release 1: {out}");
    assert!(nginx.log().lines().filter(|l| l.starts_with("201") || l.starts_with("204")).count() >= 3, "{}", nginx.log());
}

/// A repository served over HTTPS by a private CA: trusted with `[fleet] ca_file`, refused
/// (as unreachable, not as tampering) without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_behind_a_private_ca_is_fetched_over_https_with_its_certificate() {
    use adaptd_fleet::fetch::{Progress, fetch};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (_, repo) = published_repository(dir.path());
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    crate::tls::make_pki(&pki);
    let nginx = Nginx::start_tls(&repo, &pki.join("server.pem"), &pki.join("server.key"));
    assert_eq!(nginx.url().scheme(), "https");
    let trusting = adaptd_fleet::fetch::Source { ca: Some(pki.join("ca.pem")), ..device_source(dir.path(), &repo, &nginx, "trusting") };
    let fetched = fetch(&trusting, "sorter", 1, Arc::new(Progress::default())).await.unwrap();
    assert!(fetched.dir.join("head.safetensors").exists());
    let e = fetch(&device_source(dir.path(), &repo, &nginx, "untrusting"), "sorter", 1, Arc::new(Progress::default())).await.unwrap_err();
    assert_eq!((e.refused, e.reason), (false, "unreachable"), "{e}");
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the command may hold spaces, so split after its ')'.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// A test's nginx goes away whole: its workers with its master, none left orphaned.
#[test]
fn a_stopped_nginx_leaves_no_worker_behind() {
    let root = tempfile::tempdir().unwrap();
    let nginx = Nginx::start(root.path());
    let master = nginx.child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let workers = loop {
        let workers = children_of(master);
        if !workers.is_empty() {
            break workers;
        }
        assert!(Instant::now() < deadline, "nginx started no worker");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(nginx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers
        .iter()
        .any(|w| Path::new(&format!("/proc/{w}")).exists() && !std::fs::read_to_string(format!("/proc/{w}/stat")).unwrap_or_default().contains(") Z"))
    {
        assert!(Instant::now() < deadline, "nginx workers {workers:?} outlived their master");
        std::thread::sleep(Duration::from_millis(20));
    }
}
