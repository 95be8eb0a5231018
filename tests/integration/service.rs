//! The daemon as systemd runs it: the real binary with a configuration file, READY only after
//! the engine warmed up, a watchdog fed by the engine's heartbeat, SIGHUP reloads (and refusals),
//! a clean stop on SIGTERM; and the shipped unit file verifies.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::reference_bundle;

fn config_text(state: &std::path::Path, min_improvement: f64, max_request_bytes: usize) -> String {
    format!(
        "bundle = {:?}\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\nmax_request_bytes = {max_request_bytes}\n[ingest]\ntasks = [\"sorter\"]\n[gate]\nmin_improvement = {min_improvement}\n",
        reference_bundle("digits-cnn"),
        state.join("state")
    )
}

/// Notifications received until one equals `want` (or the timeout passes).
fn wait_for(socket: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(msg.clone());
            if msg.lines().any(|l| l == want) {
                return true;
            }
        }
    }
    false
}

#[test]
fn the_daemon_notifies_systemd_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("adaptd.toml");
    std::fs::write(&config, config_text(dir.path(), 0.0, 1 << 20)).unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("ADAPTD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    let mut seen = Vec::new();

    assert!(wait_for(&socket, "READY=1", Duration::from_secs(60), &mut seen), "READY after warm-up: {seen:?}");
    assert!(seen.iter().any(|m| m.contains("STATUS=serving")), "{seen:?}");
    assert!(wait_for(&socket, "WATCHDOG=1", Duration::from_secs(5), &mut seen), "the watchdog is fed: {seen:?}");

    // A reload: the gate's margin applies now, the HTTP limit needs a restart, and says so.
    std::fs::write(&config, config_text(dir.path(), 0.05, 1 << 16)).unwrap();
    signal("-HUP");
    assert!(wait_for(&socket, "RELOADING=1", Duration::from_secs(5), &mut seen), "{seen:?}");
    assert!(wait_for(&socket, "READY=1", Duration::from_secs(5), &mut seen), "ready again after the reload: {seen:?}");
    // A broken file is refused; the daemon keeps serving.
    std::fs::write(&config, "bundle = 42\n").unwrap();
    signal("-HUP");
    assert!(wait_for(&socket, "READY=1", Duration::from_secs(5), &mut seen), "{seen:?}");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP never stops the daemon");

    signal("-TERM");
    assert!(wait_for(&socket, "STOPPING=1", Duration::from_secs(5), &mut seen), "{seen:?}");
    let deadline = Instant::now() + Duration::from_secs(25);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "stops within the shutdown deadline");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "a clean stop exits 0: {status:?}");
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("needs_restart") && log.contains("http"), "the reload names what needs a restart:\n{log}");
    assert!(log.contains("configuration refused"), "the broken file is refused with its reason:\n{log}");
}

#[test]
fn the_shipped_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/adaptd.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Verify against this build's binary (the package installs it as /usr/bin/adaptd).
    let path = dir.path().join("adaptd.service");
    std::fs::write(&path, unit.replace("/usr/bin/adaptd", env!("CARGO_BIN_EXE_adaptd"))).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (package systemd) is installed by the set-up");
    assert!(verify.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&verify.stderr));
    // The daemon, not SIGKILL, ends a slow stop: its deadline is under the unit's.
    let timeout_stop: u64 = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).and_then(|v| v.trim().parse().ok()).unwrap();
    assert!(adaptd_daemon::config::Config::default().stop_deadline.as_secs() < timeout_stop, "stop_deadline_s must stay under TimeoutStopSec={timeout_stop}");
    let security = Command::new("systemd-analyze").args(["security", "--offline=yes", path.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for adaptd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.0, "systemd-analyze security exposure {exposure} (README states 1.8)");
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=/usr/bin/adaptd validate",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=adaptd",
        "ConfigurationDirectory=adaptd",
        "User=adaptd",
    ] {
        assert!(unit.contains(key), "the unit sets {key}");
    }
}

/// Start `adaptd serve --config` with `config`; the exit code and stderr once it gives up.
fn serve_fails(config: &str, dir: &std::path::Path) -> (Option<i32>, String) {
    let path = dir.join(format!("bad-{}.toml", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("adaptd kept running with {config}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn bad_deployments_exit_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = reference_bundle("digits-cnn");
    let state = dir.path().join("state");
    let base = |extra: &str| format!("bundle = {bundle:?}\nstate_dir = {state:?}\n{extra}");
    let check = |config: String, want: &[&str]| {
        let (code, stderr) = serve_fails(&config, dir.path());
        assert!(code.is_some_and(|c| c != 0), "non-zero exit for {config}: {code:?}");
        assert!(!stderr.contains("panicked"), "a message, not a panic: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{w:?} in: {stderr}");
        }
    };

    check(format!("bundle = \"/nonexistent/bundle\"\nstate_dir = {state:?}\n"), &["/nonexistent/bundle"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    check(base(&format!("[http]\nlisten = \"{addr}\"\n")), &[&addr.to_string()]);
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let not_a_dir = dir.path().join("a-file").join("state");
    check(format!("bundle = {bundle:?}\nstate_dir = {not_a_dir:?}\n"), &["state directory", "writable"]);

    // A second daemon on the same state directory is refused while the first one runs.
    let first_config = dir.path().join("first.toml");
    std::fs::write(&first_config, base("[http]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_adaptd"))
        .args(["serve", "--config", first_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = state.join("adaptd.lock");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The earlier failed starts left their pid in the file: wait for this daemon's own.
    let holder = format!("pid {}", first.id());
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == holder) {
        assert!(Instant::now() < deadline, "the first daemon took its lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    check(base("[http]\nlisten = \"127.0.0.1:0\"\n"), &["in use by another adaptd", &format!("pid {}", first.id())]);
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn samples_import_checks_each_line_and_stats_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("adaptd.toml");
    std::fs::write(
        &config,
        format!("bundle = {:?}\nstate_dir = {:?}\n[ingest]\ntasks = [\"sorter\"]\n", reference_bundle("digits-cnn"), dir.path().join("state")),
    )
    .unwrap();
    let pixels = vec!["0.5"; 64].join(",");
    let line = |key: &str, label: &str| {
        format!("{{\"key\": \"{key}\", \"task\": \"sorter\", \"label\": \"{label}\", \"input\": {{\"shape\": [1, 1, 8, 8], \"data\": [{pixels}]}}}}")
    };
    let file = dir.path().join("samples.jsonl");
    let lines = [
        line("a", "3"),
        line("b", "4"),
        line("a", "3"),
        "{\"key\": \"c\", \"task\": \"sorter\", \"label\": \"1\", \"input\": {\"shape\": [1, 1, 4, 16], \"data\": []}}".to_string(),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(args).args(["--config", config.to_str().unwrap(), "--json"]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let imported = run(&["samples", "import", file.to_str().unwrap()]);
    assert_eq!((imported["stored"].as_u64(), imported["duplicates"].as_u64()), (Some(2), Some(1)), "{imported}");
    assert_eq!(imported["refused"][0]["line"], 4, "the bad line is named: {imported}");
    let stats = run(&["samples", "stats"]);
    assert_eq!(stats[0]["task"], "sorter");
    assert_eq!(stats[0]["samples"], 2, "{stats}");
}

/// Events still queued for the broker when the daemon is killed go out at its next start, under
/// the numbers they had (the outbox); after a clean stop nothing goes out twice, and numbering
/// goes on where it was.
#[test]
fn events_a_crash_left_undelivered_go_out_at_the_next_start_under_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (broker_port, http) = (crate::broker::free_port(), format!("127.0.0.1:{}", crate::broker::free_port()));
    let config = dir.path().join("adaptd.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!(
            "bundle = {:?}\nstate_dir = {state:?}\n[http]\nlisten = {http:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\ndevice_id = \"outbox\"\ninference_api = false\n[ingest]\ntasks = [\"sorter\"]\n",
            reference_bundle("digits-cnn")
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let spawn = || {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["serve", "--config", config.to_str().unwrap()]).stdout(Stdio::null()).stderr(log).spawn().unwrap()
    };
    let client = adaptd::client::Client::new(http.parse().unwrap());
    let ready = |client: &adaptd::client::Client| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client.get("/readyz").map(|r| r.ok()).unwrap_or(false) {
            assert!(Instant::now() < deadline, "not ready: {}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
        client.clone().with_token_from(&state)
    };
    let stop = |mut child: std::process::Child| {
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        assert!(child.wait().unwrap().success(), "a clean stop");
    };

    // No broker yet: the event waits in the link's queue, and the daemon is killed.
    let mut first = spawn();
    let operator = ready(&client);
    assert!(operator.post("/v1/tasks/sorter/pin/0", None).unwrap().ok());
    std::thread::sleep(Duration::from_millis(300));
    first.kill().unwrap();
    first.wait().unwrap();

    let broker = crate::broker::Mosquitto::start_on(broker_port, "");
    let events = dir.path().join("events.jsonl");
    let mut sub = Command::new("mosquitto_sub")
        .args(["-p", &broker.port.to_string(), "-q", "1", "-t", "adaptd/v1/outbox/events"])
        .stdout(std::fs::File::create(&events).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pinned = || -> Vec<u64> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "pinned")
            .map(|e| e["event_seq"].as_u64().expect("numbered"))
            .collect()
    };
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while pinned().len() < n {
            assert!(Instant::now() < deadline, "{:?}; log:\n{}", pinned(), std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let second = spawn();
    let operator = ready(&client);
    wait_for(1);
    stop(second);

    // After a clean stop nothing is published again; a new event takes the next number.
    let third = spawn();
    assert!(ready(&client).post("/v1/tasks/sorter/pin/0", None).unwrap().ok());
    wait_for(2);
    std::thread::sleep(Duration::from_secs(1));
    let seqs = pinned();
    assert!(seqs.len() == 2 && seqs[1] > seqs[0], "the replayed event once, then a new one numbered after it: {seqs:?}");
    drop(operator);
    stop(third);
    let _ = sub.kill();
    let _ = sub.wait();
}
