//! The configuration file: the shipped default and `Config::default()` cannot drift, a file is
//! layered over the defaults, and a bad file is refused with the key (and line) that is wrong.

use std::path::Path;
use std::process::Command;

use adaptd_daemon::config::{Config, DEFAULT_TOML};

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("test.toml")).map_err(|e| e.to_string())
}

#[test]
fn the_shipped_file_is_the_built_in_default() {
    assert_eq!(parse(DEFAULT_TOML).unwrap(), Config::default());
}

#[test]
fn bad_files_name_the_key_and_say_what_is_allowed() {
    let unknown = DEFAULT_TOML.replace("[engine]\n", "[engine]\nmax_bacth = 8\n");
    let err = parse(&unknown).unwrap_err();
    assert!(err.contains("test.toml") && err.contains("max_bacth") && err.contains("line"), "{err}");

    let wrong_type = DEFAULT_TOML.replace("max_batch = 32", "max_batch = \"lots\"");
    let err = parse(&wrong_type).unwrap_err();
    assert!(err.contains("max_batch") || err.contains("invalid type"), "{err}");

    // fp16 autocast is a CUDA path: asked for with training pinned to the CPU, refused by key.
    let fp16_on_cpu =
        DEFAULT_TOML.replace("precision = \"auto\"", "precision = \"fp16\"").replace("device = \"auto\"\n# libtorch", "device = \"cpu\"\n# libtorch");
    let err = parse(&fp16_on_cpu).unwrap_err();
    assert!(err.contains("training.precision") && err.contains("cpu"), "{err}");
    assert!(parse(&DEFAULT_TOML.replace("precision = \"auto\"", "precision = \"fp16\"")).is_ok(), "fp16 where training may run on CUDA");

    let provider = DEFAULT_TOML.replace("execution_provider = \"cpu\"", "execution_provider = \"npu\"");
    let err = parse(&provider).unwrap_err();
    assert!(err.contains("npu") && err.contains("cuda"), "lists what is allowed: {err}");

    for (from, to, key) in [
        ("max_batch = 32", "max_batch = 0", "engine.max_batch"),
        ("stop_deadline_s = 20", "stop_deadline_s = 0", "stop_deadline_s"),
        ("keep_versions = 5", "keep_versions = 0", "adapters.keep_versions"),
        ("topic_prefix = \"adaptd/v1\"", "topic_prefix = \"adaptd/#\"", "mqtt.topic_prefix"),
        ("listen = \"127.0.0.1:8080\"", "listen = \"localhost\"", "listen"),
        ("lora_rank = 8", "lora_rank = 0", "training.lora_rank"),
        ("loreft_rank = 4", "loreft_rank = 0", "training.loreft_rank"),
        ("loreft_positions = \"f1+l1\"", "loreft_positions = \"middle\"", "expected f<n>+l<m>"),
        ("loreft_positions = \"f1+l1\"", "loreft_positions = \"first+last\"", "needs a count after its letter"),
        ("loreft_positions = \"f1+l1\"", "loreft_positions = \"f0\"", "edits no position"),
        ("precision = \"auto\"", "precision = \"fp8\"", "fp16"),
        ("learning_rate = 0.001", "learning_rate = 3.0", "training.learning_rate"),
        ("loreft_learning_rate = 0.005", "loreft_learning_rate = 0.0", "training.loreft_learning_rate"),
        ("escalate_until = 0.98", "escalate_until = 2.0", "training.escalate_until"),
        ("retention = \"traffic\"", "retention = \"sometimes\"", "traffic"),
        ("retention_min_share = 0.1", "retention_min_share = -1.0", "gate.retention_min_share"),
        ("small_holdout_p = 0.05", "small_holdout_p = 2.0", "gate.small_holdout_p"),
        ("commands = false", "commands = true", "mqtt.commands"),
        ("min_samples_per_class = 2", "min_samples_per_class = 1", "training.min_samples_per_class"),
        ("replay_fraction = 0.2", "replay_fraction = 1.5", "training.replay_fraction"),
        ("lora_dropout = 0.05", "lora_dropout = 1.0", "training.lora_dropout"),
        ("adapter = \"head\"", "adapter = \"full\"", "full"),
        ("tick_ms = 1000", "tick_ms = 1", "schedule.tick_ms"),
        ("rollback_drop = 0.05", "rollback_drop = 2.0", "gate.max_retention_drop"),
        ("metric = \"accuracy\"", "metric = \"auc\"", "macro_f1"),
        ("password_file = \"\"", "password_file = \"/etc/adaptd/mqtt-password\"", "mqtt.password_file"),
        ("tls_client_cert_file = \"\"", "tls_client_cert_file = \"/etc/adaptd/client.pem\"", "mqtt.tls_client_cert_file"),
        ("tls_ca_file = \"\"", "tls_ca_file = \"/nonexistent/ca.pem\"", "mqtt.tls_ca_file"),
        ("maintenance_window = \"\"", "maintenance_window = \"25:00-01:00\"", "fleet.maintenance_window"),
        ("repository = \"\"", "repository = \"ftp://adapters\"", "fleet.repository"),
        ("repository = \"\"", "repository = \"https://adapters.example/fleet/\"", "fleet.repository"),
        ("max_release_mb = 64", "max_release_mb = \"big\"", "max_release_mb"),
        ("max_mb_per_task = 0.0", "max_mb_per_task = -1.0", "ingest.max_mb_per_task"),
        ("suspect_neighbours = 10", "suspect_neighbours = 0", "labels.suspect_neighbours"),
        ("suspect_max_share = 0.5", "suspect_max_share = 0.0", "labels.suspect_max_share"),
        ("suspect_min_vote = 0.5", "suspect_min_vote = 1.5", "labels.suspect_min_vote"),
        ("suspect_source_share = 0.3", "suspect_source_share = -0.1", "labels.suspect_source_share"),
        ("suspect_max_samples = 4000", "suspect_max_samples = 1", "labels.suspect_max_samples"),
        ("request_novelty = 0.5", "request_novelty = -1.0", "labels.request_novelty"),
        ("request_random_share = 0.1", "request_random_share = 2.0", "labels.request_random_share"),
        ("request_min_distance = 0.001", "request_min_distance = 3.0", "labels.request_min_distance"),
        ("request_expiry_h = 24.0", "request_expiry_h = 0.0", "labels.request_expiry_h"),
        ("pseudo_threshold = 0.95", "pseudo_threshold = 1.5", "labels.pseudo_threshold"),
        ("pseudo_max_ratio = 1.0", "pseudo_max_ratio = 0.0", "labels.pseudo_max_ratio"),
        ("pseudo_agreement = true", "pseudo_agreement = 1", "pseudo_agreement"),
        ("requests_per_minute = 6", "requests_per_minute = -6", "requests_per_minute"),
    ] {
        let err = parse(&DEFAULT_TOML.replace(from, to)).unwrap_err();
        assert!(err.contains(key), "{key}: {err}");
    }
    let err = parse("[gate]\nmin_improvement = \"a lot\"\n").unwrap_err();
    assert!(err.contains("line 2") && err.contains("min_improvement"), "a partial file's error names the line: {err}");

    // The kind of refusal, for logs and events: a value out of range, or a file that is not one.
    let error_type = |text: &str| Config::parse(text, Path::new("test.toml")).unwrap_err().error_type();
    assert_eq!(error_type("[engine]\nmax_batch = 0\n"), "config_invalid");
    assert_eq!(error_type("[engine\n"), "config_parse");
    assert_eq!(error_type("[engine]\nmax_bacth = 8\n"), "config_parse");
}

#[test]
fn a_file_names_only_what_it_changes() {
    let config = parse("state_dir = \"/data/adaptd\"\n[gate]\nmin_improvement = 0.05\n").unwrap();
    let mut expected = Config { state_dir: "/data/adaptd".into(), ..Config::default() };
    expected.gate.min_improvement = 0.05;
    assert_eq!(config, expected, "everything else comes from the built-in defaults");
}

#[test]
fn validate_exits_zero_for_a_good_file_and_two_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, DEFAULT_TOML).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["validate", "--config"]).arg(&good).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, DEFAULT_TOML.replace("queue_depth = 1024", "queue_depth = -1")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["validate", "--config"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.toml") && stderr.contains("queue_depth"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["validate", "--config", "/nonexistent/adaptd.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/adaptd.toml"));
}

#[test]
fn the_example_configurations_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.ingest.tasks.is_empty() && !config.mqtt.host.is_empty(), "{}: an example that learns", path.display());
        checked += 1;
    }
    assert!(checked >= 3, "Orin Nano, Orin AGX and a CPU box");
}

/// Sections compose the parts' own settings types; the file is still checked key by key, with
/// the section, the key and the line named, and a key's line found in its own section.
#[test]
fn keys_and_kinds_are_checked_in_their_own_sections() {
    let err = parse("[engine]\nmax_batch = 8\n[ingest]\nmax_batch = \"many\"\n").unwrap_err();
    assert!(err.contains("line 4") && err.contains("ingest.max_batch") && err.contains("an integer") && err.contains("a string"), "{err}");
    let err = parse("[schedule]\ntick_ms = 100\nsettle_seconds = 5\n").unwrap_err();
    assert!(err.contains("line 3") && err.contains("schedule.settle_seconds") && err.contains("settle_s"), "names the key and what the section has: {err}");
    let err = parse("[trainig]\nmax_epochs = 3\n").unwrap_err();
    assert!(err.contains("line 1") && err.contains("`trainig`") && err.contains("training"), "{err}");
    let err = parse("[ingest]\nvalidation_percent = 300\n").unwrap_err();
    assert!(err.contains("line 2"), "a value out of its type's range is found by the value: {err}");
    // An integer where the default is a number is a number; spans become typed durations.
    let config = parse("[training]\nlora_alpha = 16\n[schedule]\ncooldown_s = 7\ntick_ms = 250\n[gate]\nrollback_drop = 0.1\n").unwrap();
    assert_eq!(config.training.lora_alpha, 16.0);
    assert_eq!(config.schedule.trigger.cooldown, std::time::Duration::from_secs(7));
    assert_eq!(config.schedule.tick, std::time::Duration::from_millis(250));
    assert_eq!(config.gate.watch.rollback_drop, 0.1);
    let budget = parse("[ingest]\nmax_mb_per_task = 0.5\n[training]\nmemory_budget_mb = 300\n").unwrap();
    assert_eq!(budget.adapt_config("sorter").store_budget_bytes, 512 * 1024);
    assert_eq!(budget.training.recipe.memory_budget_bytes, Some(300 << 20));
    assert_eq!(Config::default().training.recipe.memory_budget_bytes, None, "0: no budget");
}

/// What only a restart applies is named, and a reload keeps the trainer's running settings to
/// compare the next file with.
#[test]
fn a_reload_applies_training_schedule_and_gate_and_names_the_rest() {
    let mut running = Config::default();
    let file = "[engine]\nmax_batch = 8\n[training]\nabove_cut = false\nmax_epochs = 3\n[gate]\nmin_holdout = 20\n";
    assert_eq!(running.reload(parse(file).unwrap()), ["engine", "training.above_cut"]);
    let adapt = running.adapt_config("sorter");
    assert_eq!((adapt.training.recipe.max_epochs, adapt.gate.min_holdout), (3, 20), "a loop gets the file's sections as they are");
    assert!(running.training.trainer.above_cut && running.engine.max_batch == 32, "what only a restart applies still runs as before");
    assert_eq!(running.reload(parse(file).unwrap()), ["engine", "training.above_cut"], "the same file again: still not applied, still said");
}
