//! Labels where they matter, through a real broker: a sender that labels a share of its samples
//! wrong is caught before the job, its samples kept out of training and the holdout, the sender
//! named; an operator's word on a suspect (through the CLI) puts it back.

use std::process::Command;
use std::time::Duration;

use adaptd::datasets::{Digits, Shift};
use serde_json::Value;

use crate::adapt::{Running, digit_lines, publish, shut_down, start_daemon_with};
use crate::digits_data;

fn cli(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(args).env("ADAPTD_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "adaptd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_labels_wrong_is_caught_its_samples_kept_out_and_an_operator_puts_one_back() {
    let Running { broker, state, events, base: _, stop, daemon } = start_daemon_with("sorter", 400, |c| {
        c.training.adapter = adaptd_daemon::adapt::AdapterChoice::Head;
        c.training.escalate = false;
    })
    .await;
    // 400 upright digits: "line-1" labels its 340 right; "line-9" labels 40 of its 60 as the next
    // digit. The order of arrival is fixed, and so are the embeddings and the search.
    let digits = Digits::load(&digits_data()).unwrap();
    let indices: Vec<usize> = digits.held_out().into_iter().take(400).collect();
    let lines = digit_lines(&digits, indices.iter().copied(), "cell", "sorter", Shift::None);
    let (lines, flipped) = flip_labels(lines, |i, sample| {
        let from_line_9 = i % 20 >= 17;
        sample["source"] = (if from_line_9 { "line-9" } else { "line-1" }).into();
        from_line_9 && i % 3 != 0
    });
    assert_eq!(flipped.len(), 40);
    let port = broker.port;
    let (suspected, started) = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500)); // ingest subscribes
        publish(port, "adaptd/v1/robot-3/samples/sorter", &lines);
        let suspected = events.wait_for("labels_suspected", Duration::from_secs(60));
        let started = events.wait_for("training_started", Duration::from_secs(60));
        events.wait_for("job_finished", Duration::from_secs(120));
        (suspected, started)
    })
    .await
    .unwrap();

    // The event: most wrong labels found, few right ones doubted, the sender named.
    let suspects = suspected["suspects"].as_u64().unwrap();
    assert_eq!(suspected["judged"], 400, "{suspected}");
    assert!((36..=48).contains(&suspects), "40 wrong labels; {suspects} suspects: {suspected}");
    let sources = suspected["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 1, "only line-9 is named: {suspected}");
    assert_eq!(sources[0]["source"], "line-9");
    assert!(started["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains("kept out of training, and out of the holdout")), "{started}");

    // The listing: which samples, by key, and what their neighbours suggest instead.
    let dir = state.path().to_str().unwrap();
    let listed = cli(&["samples", "suspects", "--json", "--state-dir", dir]);
    let listed = listed[0]["suspects"].as_array().unwrap().clone();
    let found: Vec<&str> = listed.iter().filter(|s| flipped.contains(&s["key"].as_str().unwrap().to_string())).map(|s| s["key"].as_str().unwrap()).collect();
    assert!(found.len() >= 36, "{} of the 40 wrong labels listed", found.len());
    let first = listed.iter().find(|s| s["key"] == found[0]).unwrap();
    let (given, suggested): (i64, i64) = (first["label"].as_str().unwrap().parse().unwrap(), first["suggested"].as_str().unwrap().parse().unwrap());
    assert_eq!(given, (suggested + 1) % 10, "the suggestion is the digit it was: {first}");

    // Kept out of training and the holdout; an operator's word puts one back, and says so.
    let store = adaptd_daemon::samples::SampleStore::open(&state.path().join("samples.db"), Default::default()).unwrap();
    let trusted = |store: &adaptd_daemon::samples::SampleStore| -> Vec<String> {
        use adaptd_daemon::samples::Split::*;
        [Train, Validation, Holdout].into_iter().flat_map(|split| store.load_trusted("sorter", split).unwrap()).map(|s| s.sample.key).collect()
    };
    assert!(found.iter().all(|k| !trusted(&store).contains(&k.to_string())), "suspects do not train or count in the holdout");
    let judged = cli(&["samples", "judge", found[0], "right", "--by", "alice", "--json", "--state-dir", dir]);
    assert_eq!((judged["label_is_right"].as_bool(), judged["task"].as_str()), (Some(true), Some("sorter")), "{judged}");
    assert!(trusted(&store).contains(&found[0].to_string()), "judged right: it trains again");
    cli(&["samples", "judge", found[1], "wrong", "--state-dir", dir]);
    let after = cli(&["samples", "suspects", "--json", "--state-dir", dir]);
    let verdict = |key: &str| after[0]["suspects"].as_array().unwrap().iter().find(|s| s["key"] == key).map(|s| s["label_is_right"].clone());
    assert_eq!((verdict(found[0]), verdict(found[1])), (Some(Value::Bool(true)), Some(Value::Bool(false))));
    let out = Command::new(env!("CARGO_BIN_EXE_adaptd")).args(["samples", "judge", "no-such-key", "right", "--state-dir", dir]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no sample has the key"), "{out:?}");
    shut_down(stop, daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_that_learnt_a_shift_doubts_wrong_labels_the_neighbours_missed_and_a_candidate_trains_without_them() {
    let Running { broker, state, events, base: _, stop, daemon } = start_daemon_with("sorter", 400, |c| {
        c.training.adapter = adaptd_daemon::adapt::AdapterChoice::Lora;
        c.training.escalate = false;
        c.labels.pseudo = false;
    })
    .await;
    // 400 digits from a camera turned 90°, which the base model's embedding does not see
    // through; every fourth goes out as the next digit. The order of arrival is fixed.
    let digits = Digits::load(&digits_data()).unwrap();
    let lines = digit_lines(&digits, digits.held_out().into_iter().take(400), "cam-2", "sorter", Shift::Rotate90);
    let (lines, flipped) = flip_labels(lines, |i, _| i % 4 == 1);
    let port = broker.port;
    let events = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500)); // ingest subscribes
        publish(port, "adaptd/v1/robot-3/samples/sorter", &lines);
        events.wait_for("job_finished", Duration::from_secs(300));
        events.events()
    })
    .await
    .unwrap();

    // The neighbours' search before the job, then the promoted LoRA's look after it.
    let suspected: Vec<&Value> = events.iter().filter(|e| e["event"] == "labels_suspected").collect();
    assert!(suspected.len() >= 2, "a search before the job and a look after it: {suspected:?}");
    let (before, after) = (suspected[0]["suspects"].as_u64().unwrap(), suspected[1]["suspects"].as_u64().unwrap());
    assert!(after >= before + 10, "the adapter doubts labels the neighbours did not: {before} then {after}");
    eprintln!("suspects: {before} from the neighbours, {after} with the adapter's doubts");
    let listed = cli(&["samples", "suspects", "--json", "--state-dir", state.path().to_str().unwrap()]);
    let keys: Vec<String> = listed[0]["suspects"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap().to_string()).collect();
    let right = keys.iter().filter(|k| !flipped.contains(k)).count();
    let by_adapter = listed[0]["suspects"].as_array().unwrap().iter().filter(|s| s["doubted_by"] == "adapter").count();
    assert!(by_adapter >= 10, "the listing names the adapter for the labels it doubts: {by_adapter}");
    eprintln!("listed: {} of the 100 wrong labels, {right} right ones, {by_adapter} doubted by the adapter", keys.len() - right);
    assert!(keys.len() - right >= 60 && right * 5 <= keys.len(), "{} of the 100 wrong labels suspected, and {right} right ones", keys.len() - right);

    // A candidate trained without them met the gate, which held it to beating the adapter.
    let look = events.iter().find(|e| e["event"] == "training_attempt" && e["kind"].as_str().is_some_and(|k| k.ends_with("without doubted labels")));
    let look = look.unwrap_or_else(|| panic!("no candidate without the doubted labels: {events:?}"));
    let version = look["version"].as_u64().unwrap();
    let decided =
        events.iter().find(|e| e["event"] == "gate_decision" && e["version"].as_u64() == Some(version)).unwrap_or_else(|| panic!("v{version} met no gate"));
    assert!(decided.to_string().contains("must beat what serves"), "{decided}");
    shut_down(stop, daemon).await;
}

/// Sample lines with the labels `flip` picks (by arrival index; it may edit the sample too)
/// turned into the next digit, and the keys of those flipped.
fn flip_labels(lines: Vec<String>, mut flip: impl FnMut(usize, &mut Value) -> bool) -> (Vec<String>, Vec<String>) {
    let mut flipped = Vec::new();
    let lines = lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let mut sample: Value = serde_json::from_str(&line).unwrap();
            if flip(i, &mut sample) {
                let label: i64 = sample["label"].as_str().unwrap().parse().unwrap();
                sample["label"] = ((label + 1) % 10).to_string().into();
                flipped.push(sample["key"].as_str().unwrap().to_string());
            }
            sample.to_string()
        })
        .collect();
    (lines, flipped)
}

/// Messages on one topic, collected by `mosquitto_sub` into a file.
struct Subscription {
    child: std::process::Child,
    path: std::path::PathBuf,
}

impl Subscription {
    fn start(port: u16, topic: &str, dir: &std::path::Path) -> Subscription {
        let path = dir.join("label_requests.jsonl");
        let file = std::fs::File::create(&path).unwrap();
        let child = Command::new("mosquitto_sub").args(["-p", &port.to_string(), "-q", "1", "-t", topic]).stdout(file).spawn().unwrap();
        Subscription { child, path }
    }

    fn messages(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn predict(base: &str, body: &str) -> (u16, Value) {
    let mut child = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            &format!("{base}/v1/tasks/sorter/predict"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_inputs_go_out_as_label_requests_within_quota_and_an_answer_comes_back_as_a_sample() {
    let Running { broker, state, events, base, stop, daemon } = start_daemon_with("sorter", 100_000, |c| {
        c.labels.requests_per_minute = 3;
        c.labels.requests_per_hour = 3;
    })
    .await;
    let requests = Subscription::start(broker.port, "adaptd/v1/robot-3/label_requests/sorter", state.path());
    std::thread::sleep(Duration::from_millis(300)); // the subscription is in place
    // Sideways digits, which the upright base model is unsure of, served one by one.
    let digits = Digits::load(&digits_data()).unwrap();
    for i in digits.held_out().into_iter().take(40) {
        let pixels: Vec<String> = digits.image(i, Shift::Rotate90).iter().map(|v| format!("{v:.4}")).collect();
        let body = format!("{{\"inputs\": {{\"image\": {{\"shape\": [1, 1, 8, 8], \"data\": [{}]}}}}}}", pixels.join(","));
        let (code, answer) = predict(&base, &body);
        assert_eq!(code, 200, "{answer}");
    }
    // Three a minute, and here three an hour: three requests, however long one waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while requests.messages().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "requests so far: {:?}", requests.messages());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let sent = requests.messages();
    assert_eq!(sent.len(), 3, "{sent:?}");
    let ids: std::collections::BTreeSet<&str> = sent.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "each request its own id");
    for r in &sent {
        assert_eq!(r["input"]["shape"], serde_json::json!([1, 1, 8, 8]), "the input goes inline: {r}");
        assert!(["diversity", "random"].contains(&r["strategy"].as_str().unwrap()), "the base model serves: {r}");
        assert!((0.0..=1.0).contains(&r["confidence"].as_f64().unwrap()) && r["expires_ms"].as_i64().unwrap() > adaptd_daemon::events::now_ms() as i64, "{r}");
    }

    // The input over HTTP too, with the control token only.
    let first = &sent[0];
    let url = format!("{base}/v1/label_requests/{}/input", first["id"].as_str().unwrap());
    let (code, _) = crate::adapt::http("GET", &url);
    assert_eq!(code, 401, "served inputs are the device's data");
    let token = adaptd_daemon::control::read_token(state.path()).unwrap();
    let out = Command::new("curl").args(["-s", "-H", &format!("Authorization: Bearer {token}"), &url]).output().unwrap();
    let fetched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched["input"], first["input"], "{fetched}");
    for field in ["task", "predicted", "confidence", "strategy", "expires_ms"] {
        assert_eq!(fetched[field], first[field], "the request as it was sent: {field}");
    }
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {token}"), &format!("{base}/v1/label_requests/no-such-id/input")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with("\n404") && text.contains("no such label request"), "an unknown id is refused by name: {text}");

    // An answer: an ordinary sample carrying the request's id, with the input copied.
    let truth = if first["predicted"] == "3" { "4" } else { "3" };
    let answer =
        serde_json::json!({"key": "labeller:1", "task": "sorter", "label": truth, "input": first["input"], "request_id": first["id"], "source": "operator"});
    crate::adapt::publish(broker.port, "adaptd/v1/robot-3/samples/sorter", &[answer.to_string()]);
    let answered = tokio::task::spawn_blocking(move || events.wait_for("label_requests_answered", Duration::from_secs(30))).await.unwrap();
    assert_eq!((answered["answered"].as_u64(), answered["disagreed"].as_u64(), answered["sent"].as_u64()), (Some(1), Some(1), Some(3)), "{answered}");
    assert_eq!(answered["pending"], 2);
    let store = adaptd_daemon::samples::SampleStore::open(&state.path().join("samples.db"), Default::default()).unwrap();
    let stored = store.get("labeller:1").unwrap().expect("the answer is a sample");
    assert_eq!(stored.sample.label, truth);
    let (_, metrics) = {
        let out = Command::new("curl").args(["-s", &format!("{base}/metrics")]).output().unwrap();
        (0, String::from_utf8_lossy(&out.stdout).to_string())
    };
    assert!(metrics.contains("adaptd_label_requests_published_total{task=\"sorter\"} 3"), "{metrics}");
    assert!(metrics.contains("adaptd_label_requests{task=\"sorter\",state=\"disagreed\"} 1"), "{metrics}");
    drop(requests);
    shut_down(stop, daemon).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_traffic_pseudo_labelled_trains_one_more_candidate_and_one_that_is_not_better_is_refused() {
    // A head on sideways digits, and a gate that asks for 30 points over what serves: the
    // labelled head clears that over the upright base model; a pseudo-label candidate cannot
    // clear it over its own teacher, so it must be refused, on validation or by the gate.
    let Running { broker, state, events, base, stop, daemon } = start_daemon_with("sorter", 240, |c| {
        c.training.adapter = adaptd_daemon::adapt::AdapterChoice::Head;
        c.training.escalate = false;
        c.gate.min_improvement = 0.3;
        c.labels.requests = false;
    })
    .await;
    let digits = Digits::load(&digits_data()).unwrap();
    let pool = digits.held_out();
    // The traffic first: the other 279 sideways digits, served twice in requests of 8, unlabelled.
    for chunk in pool[240..].chunks(8).chain(pool[240..].chunks(8)) {
        let pixels: Vec<String> = chunk.iter().flat_map(|&i| digits.image(i, Shift::Rotate90)).map(|v| format!("{v:.4}")).collect();
        let body = format!("{{\"inputs\": {{\"image\": {{\"shape\": [{}, 1, 8, 8], \"data\": [{}]}}}}}}", chunk.len(), pixels.join(","));
        let (code, answer) = predict(&base, &body);
        assert_eq!(code, 200, "{answer}");
    }
    let lines = digit_lines(&digits, pool.iter().copied().take(240), "cam-3", "sorter", Shift::Rotate90);
    let port = broker.port;
    let finished = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500)); // ingest subscribes
        publish(port, "adaptd/v1/robot-3/samples/sorter", &lines);
        events.wait_for("job_finished", Duration::from_secs(180))
    })
    .await
    .unwrap();
    assert_eq!((finished["outcome"].as_str(), finished["promoted"][0].as_u64()), (Some("promoted"), Some(1)), "the labelled head: {finished}");

    let journal: Vec<Value> =
        std::fs::read_to_string(state.path().join("journal").join("sorter.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let attempt = journal
        .iter()
        .find(|r| r["event"] == "training_attempt" && r["kind"] == "head on pseudo-labels")
        .unwrap_or_else(|| panic!("a pseudo-label candidate trained: {journal:?}"));
    let reason = attempt["reason"].as_str().unwrap();
    assert!(reason.contains("pseudo-labels) reached validation accuracy") && reason.contains("against its teacher v1"), "{reason}");
    let pseudo_job = |r: &&Value| r["event"] == "job" && r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with("pseudo-labels by v1"));
    match journal.iter().find(pseudo_job) {
        // Offered to the gate: refused for not beating its teacher by the margin, on labels.
        Some(job) => {
            assert_eq!(job["promote"], false, "{job}");
            let beats = job["checks"].as_array().unwrap().iter().find(|c| c["name"] == "beats_incumbent").unwrap();
            assert_eq!(beats["passed"], false, "{job}");
            let notes = job["notes"].as_array().unwrap();
            assert!(notes.iter().any(|n| n.as_str().unwrap().contains("pseudo-labelled inputs of the traffic train beside")), "{notes:?}");
        }
        // Or not offered at all: no better than its teacher on validation.
        None => assert_eq!(attempt["best_so_far"], false, "{attempt}"),
    }
    let (_, status) = crate::adapt::http("GET", &format!("{base}/v1/tasks/sorter/status"));
    assert_eq!(status["serving_version"], 1, "the teacher still serves: {status}");
    shut_down(stop, daemon).await;
}
