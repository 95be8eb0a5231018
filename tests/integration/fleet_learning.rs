//! Fleet learning end to end: five daemons on one Mosquitto, each with its own shift of the digits
//! and its own class mix (one never sees two labels), train on the shipped defaults (LoRA), offer
//! their adapters into nginx's WebDAV directory, and the operator aggregates the offers into a
//! signed release. Then `fleet learn` runs two rounds: every device scores the release, trains on
//! from it and offers the result into a shared directory; each round's offers make the next
//! release, and the last one rolls out through every device's own gate. Every release is scored
//! offline on every device's held-out digits.

use std::time::{Duration, Instant};

use adaptd::datasets::{Digits, Shift};
use adaptd_adapters::{Adapter, AdapterStore, Bundle};
use adaptd_daemon::engine::onnx::{OnnxModel, SessionOptions};
use adaptd_protocol::fleet::Offer;
use serde_json::Value;

use crate::adapt::{digit_lines, publish, shut_down};
use crate::fleet::{Nginx, adaptd};
use crate::reference_bundle;

/// Each device's camera, and the labels it keeps only every other sample of (or never sees).
/// Sensor noise leaves the base model reading most digits: robot D's gate may rightly keep the
/// base (its candidate does not beat it on a small holdout), and the fleet goes on without its offer.
const DEVICES: [(&str, Shift, &[i64], &[i64]); 5] = [
    ("robot-a", Shift::Rotate90, &[], &[]),
    ("robot-b", Shift::Rotate180, &[5, 6, 7, 8, 9], &[]),
    ("robot-c", Shift::Mirror, &[], &[]),
    ("robot-d", Shift::Noise, &[0, 1, 2, 3, 4], &[]),
    ("robot-e", Shift::Dropout, &[], &[3, 8]),
];
const TRAIN: usize = 360;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_with_their_own_shifts_train_offer_and_the_aggregate_beats_their_mean() {
    let digits = Digits::load(&crate::digits_data()).unwrap();
    let pool = digits.held_out();
    let (train_pool, test) = pool.split_at(TRAIN);
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let broker = crate::broker::Mosquitto::start();
    let port = broker.port;
    // The operator's signed repository and the offers directory, behind nginx.
    let dir = tempfile::tempdir().unwrap();
    let (www, keys, out) = (dir.path().join("www"), dir.path().join("keys"), dir.path().join("aggregate"));
    let repo = www.join("repo");
    let (ks, rs) = (keys.to_str().unwrap(), repo.to_str().unwrap());
    for args in [vec!["fleet", "keygen", "--keys", ks], vec!["fleet", "init", "--keys", ks, "--repo", rs]] {
        let (ok, text) = adaptd(&args);
        assert!(ok, "{text}");
    }
    let offers_dir = www.join("offers");
    std::fs::create_dir_all(&offers_dir).unwrap();
    let nginx = Nginx::start_with(&www, "location /offers/ { dav_methods PUT; create_full_put_path on; client_max_body_size 64m; }");

    let trained: Vec<Vec<usize>> = DEVICES
        .iter()
        .map(|(_, _, halved, missing)| {
            train_pool
                .iter()
                .copied()
                .enumerate()
                .filter(|(n, i)| {
                    let label = digits.labels[*i];
                    !missing.contains(&label) && (!halved.contains(&label) || n % 2 == 0)
                })
                .map(|(_, i)| i)
                .collect()
        })
        .collect();
    // The shipped configuration, but for where things are, a LoRA adapter, and one job once all
    // of a device's samples are in (not once they pause: under the whole suite's load a pause
    // can come mid-burst, and a job on part of the samples may rightly be refused by the gate).
    let mut daemons = Vec::new();
    let mut states = Vec::new();
    for ((device, ..), samples) in DEVICES.iter().zip(&trained) {
        let state = tempfile::tempdir().unwrap();
        let mut config = adaptd_daemon::config::Config { bundle: reference_bundle("digits-cnn"), state_dir: state.path().to_path_buf(), ..Default::default() };
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        (config.mqtt.host, config.mqtt.port, config.mqtt.device_id) = ("127.0.0.1".into(), port, (*device).into());
        config.ingest.tasks = vec!["sorter".into()];
        (config.schedule.trigger.min_new_samples, config.schedule.trigger.settle, config.schedule.tick) =
            (samples.len() as u64, Duration::ZERO, Duration::from_millis(100));
        (config.schedule.limits.max_cpu_percent, config.schedule.limits.min_available_mb) = (100.0, 0);
        config.training.adapter = adaptd_daemon::adapt::AdapterChoice::Lora;
        config.fleet.repository = format!("{}repo/", nginx.url());
        config.fleet.root_file = repo.join("metadata/1.root.json");
        // Rounds' offers go into the same directory, as a shared mount.
        config.fleet.offers = offers_dir.to_str().unwrap().to_string();
        daemons.push(crate::serve_in_process(config).await);
        states.push(state);
    }
    let clients: Vec<adaptd::client::Client> = daemons.iter().map(|(_, addr, _)| adaptd::client::Client::new(*addr)).collect();
    let lines: Vec<(String, Vec<String>)> = DEVICES
        .iter()
        .zip(&trained)
        .map(|((device, shift, ..), indices)| {
            (format!("adaptd/v1/{device}/samples/sorter"), digit_lines(&digits, indices.iter().copied(), device, "sorter", *shift))
        })
        .collect();
    let versions: Vec<u64> = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        for (topic, lines) in &lines {
            publish(port, topic, lines);
        }
        let started = Instant::now();
        loop {
            let statuses: Vec<Value> = clients.iter().map(|c| c.get("/v1/tasks/sorter/status").unwrap().body).collect();
            let decided = |s: &Value| s["jobs"]["promoted"].as_u64().unwrap_or(0) + s["jobs"]["rejected"].as_u64().unwrap_or(0) > 0;
            if statuses.iter().all(decided) {
                let serving: Vec<u64> = statuses.iter().map(|s| s["serving_version"].as_u64().unwrap_or(0)).collect();
                // Each gate's decision is right by its own checks: promoted, or refused naming
                // the check that failed. Shifts that leave the base far behind are always adapted.
                for (s, (device, shift, ..)) in statuses.iter().zip(&DEVICES) {
                    let decision = s["last_decision"].as_str().unwrap_or("");
                    let promoted = s["serving_version"].as_u64() > Some(0);
                    // ("rejected: ..." as the gate wrote it, or "rejected in 2 steps: ..." where
                    // the ladder's next step was refused too.)
                    let refused = decision.starts_with("rejected: ") || decision.starts_with("rejected in ");
                    assert!(promoted == decision.starts_with("promoted") && (promoted || refused), "{device}: {s}");
                    assert!(promoted || *shift == Shift::Noise, "{device} ({shift:?}) kept a base that reads few of its digits: {s}");
                }
                println!("five devices decided in {:.0} s: serving {serving:?}", started.elapsed().as_secs_f64());
                return serving;
            }
            assert!(started.elapsed() < Duration::from_secs(420), "not every device decided on an adapter: {statuses:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    })
    .await
    .unwrap();

    // Each device offers what it serves; the operator aggregates the offers into release 1.
    let to = format!("{}offers/", nginx.url());
    // The devices that adapted offer what they serve (a device that kept its base has nothing to offer).
    let adapted: Vec<usize> = (0..DEVICES.len()).filter(|&i| versions[i] > 0).collect();
    let own: Vec<Adapter> =
        adapted.iter().map(|&i| AdapterStore::open(states[i].path().join("adapters")).unwrap().load("sorter", versions[i]).unwrap()).collect();
    for &i in &adapted {
        let ((device, ..), state, version) = (&DEVICES[i], &states[i], &versions[i]);
        let (ok, text) =
            adaptd(&["fleet", "offer", "sorter", &version.to_string(), "--to", &to, "--state-dir", state.path().to_str().unwrap(), "--device", device]);
        assert!(ok, "{text}");
    }
    let bundle_dir = reference_bundle("digits-cnn");
    let (ok, text) = adaptd(&[
        "fleet",
        "aggregate",
        "sorter",
        "--offers-dir",
        offers_dir.to_str().unwrap(),
        "--bundle",
        bundle_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--keys",
        ks,
        "--repo",
        rs,
        "--json",
    ]);
    assert!(ok, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
    assert_eq!(report["release"]["release"], 1, "{report}");
    let provenance = &report["aggregate"];
    let offers = provenance["offers"].as_array().unwrap();
    assert_eq!(offers.len(), adapted.len(), "{provenance}");
    let total: f64 = offers.iter().map(|o| o["weight"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-9, "weights sum to one: {provenance}");
    // Robot B and D halved five labels each: fewer training samples, less weight.
    let weight = |d: &str| offers.iter().find(|o| o["device"] == d).map(|o| o["weight"].as_f64().unwrap());
    assert!(weight("robot-b") < weight("robot-a"), "{provenance}");
    if let Some(d) = weight("robot-d") {
        assert!(Some(d) < weight("robot-c"), "{provenance}");
    }
    let aggregate = Adapter::read_dir(&out).unwrap();
    assert_eq!(aggregate.manifest.aggregate.as_ref().map(|a| a.offers.len()), Some(adapted.len()));
    let (ok, listed) = adaptd(&["fleet", "list", "--repo", rs, "--json"]);
    assert!(ok && listed.contains("\"release\": 1"), "{listed}");

    // Two rounds from release 1, then the last release through every device's own gate.
    let devices: Vec<&str> = DEVICES.iter().map(|(d, ..)| *d).collect();
    let learn_state = dir.path().join("learn");
    let args = vec![
        "fleet".to_string(),
        "learn".into(),
        "sorter".into(),
        "--parent".into(),
        "1".into(),
        "--rounds".into(),
        "2".into(),
        "--devices".into(),
        devices.join(","),
        "--offers-dir".into(),
        offers_dir.to_str().unwrap().into(),
        "--bundle".into(),
        bundle_dir.to_str().unwrap().into(),
        "--state-dir".into(),
        learn_state.to_str().unwrap().into(),
        "--mqtt".into(),
        format!("127.0.0.1:{port}"),
        "--offer-timeout-s".into(),
        "120".into(),
        "--device-timeout-s".into(),
        "120".into(),
        "--keys".into(),
        ks.into(),
        "--repo".into(),
        rs.into(),
        "--json".into(),
    ];
    let (ok, text) = tokio::task::spawn_blocking(move || adaptd(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    assert!(ok, "{text}");
    let learned: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
    let rounds = learned["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{learned}");
    for (k, round) in rounds.iter().enumerate() {
        assert_eq!((round["parent"].as_u64(), round["release"].as_u64()), (Some(k as u64 + 1), Some(k as u64 + 2)), "{round}");
        // Every device scored the round's release, trained on from it and offered the result.
        let devices = round["devices"].as_array().unwrap();
        assert!(devices.iter().all(|d| d["state"] == "scored" && d["release_accuracy"].is_number() && d["offered_version"].is_number()), "{round}");
        assert_eq!(round["offers"].as_array().unwrap().len(), 5, "{round}");
    }
    assert_eq!(learned["final_release"], 3, "{learned}");
    let finals = learned["final_devices"].as_array().unwrap();
    assert!(
        finals.iter().all(|d| ["applied", "committed", "refused"].contains(&d["state"].as_str().unwrap_or(""))),
        "each device's own gate decided: {learned}"
    );
    assert!(std::fs::read(learn_state.join("learn.json")).is_ok(), "the report is saved");
    let page = dir.path().join("fleet.html");
    let (ok, text) = adaptd(&["fleet", "report", "--state-dir", learn_state.to_str().unwrap(), "--out", page.to_str().unwrap()]);
    assert!(ok, "{text}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.matches("<svg").count() >= 2 && html.contains("robot-e") && html.contains("Rollout round-2") && html.contains("Rollout final"), "{html}");
    for (daemon, state) in daemons.into_iter().zip(&states) {
        let _ = state;
        shut_down(daemon.0, daemon.2).await;
    }

    // Scored offline through the serving graph: each device's own held-out digits, and all of them.
    let mut onnx = OnnxModel::load(&bundle, SessionOptions { intra_op_threads: 1, ..Default::default() }, None).unwrap();
    let mut table = String::from("device    shift       base   own    aggregate   (own held-out digits)\n");
    let (mut own_pooled, mut aggregate_pooled, mut base_pooled) = (Vec::new(), 0.0, 0.0);
    for (&i, adapter) in adapted.iter().zip(&own) {
        let (device, shift, ..) = &DEVICES[i];
        let base = digits.accuracy(&mut onnx, &bundle, None, test, *shift).unwrap();
        let mine = digits.accuracy(&mut onnx, &bundle, Some(adapter), test, *shift).unwrap();
        let combined = digits.accuracy(&mut onnx, &bundle, Some(&aggregate), test, *shift).unwrap();
        table += &format!("{device:<9} {:<11} {base:.3}  {mine:.3}  {combined:.3}\n", format!("{shift:?}"));
        // This device's adapter on every device's held-out digits.
        let pooled: f64 =
            DEVICES.iter().map(|(_, s, ..)| digits.accuracy(&mut onnx, &bundle, Some(adapter), test, *s).unwrap()).sum::<f64>() / DEVICES.len() as f64;
        own_pooled.push(pooled);
    }
    // The aggregate and the base on every device's held-out digits, adapted or not.
    for (_, shift, ..) in &DEVICES {
        aggregate_pooled += digits.accuracy(&mut onnx, &bundle, Some(&aggregate), test, *shift).unwrap() / DEVICES.len() as f64;
        base_pooled += digits.accuracy(&mut onnx, &bundle, None, test, *shift).unwrap() / DEVICES.len() as f64;
    }
    let mean_single = own_pooled.iter().sum::<f64>() / own_pooled.len() as f64;
    table += &format!(
        "pooled held-out digits: base {base_pooled:.3}, single-device adapters {:?} (mean {mean_single:.3}), aggregate {aggregate_pooled:.3}; {} rule, residual {}\n",
        own_pooled.iter().map(|a| format!("{a:.3}")).collect::<Vec<_>>(),
        provenance["rule"],
        provenance["residual"]
    );
    // The rounds' releases on the same digits.
    for release in 2..=3u64 {
        let got = tempfile::tempdir().unwrap();
        adaptd_fleet::repo::read_release(&repo, "sorter", release, got.path()).await.unwrap();
        let r = Adapter::read_dir(got.path()).unwrap();
        let pooled: f64 = DEVICES.iter().map(|(_, s, ..)| digits.accuracy(&mut onnx, &bundle, Some(&r), test, *s).unwrap()).sum::<f64>() / DEVICES.len() as f64;
        table += &format!("release {release} (round {}): pooled {pooled:.3}\n", release - 1);
    }
    println!("{table}");
    assert!(aggregate_pooled > mean_single, "the aggregate does not beat the mean single-device adapter on the pooled held-out digits:\n{table}");
    drop(broker);
}

/// Offers that do not belong together are refused by name before any arithmetic: another task,
/// another base, another kind, another parent; heads combine over the union of labels.
#[test]
fn aggregation_refuses_offers_that_do_not_belong_together() {
    use adaptd_daemon::fleet::aggregate::{Options, Parent, aggregate};
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    let offer_of = |device: &str, adapter: &Adapter| Offer {
        device: device.into(),
        task: adapter.manifest.task.clone(),
        version: adapter.manifest.version,
        kind: adapter.manifest.kind.name().into(),
        base_sha256: adapter.manifest.base.manifest_sha256.clone(),
        parent_release: None,
        metrics: Default::default(),
        samples: adaptd_adapters::files::SampleCounts { train: 100, ..Default::default() },
        offered_ms: 0,
    };
    let parent = Parent::base(&bundle).unwrap();
    let options = Options { rule: None, max_residual: 0.5, cap: None };
    let (a, b) = (crate::lora_adapter(&bundle, "sorter", 1, 1), crate::lora_adapter(&bundle, "sorter", 2, 2));
    let pair = |x: &Adapter, y: &Adapter| vec![(offer_of("robot-a", x), x.clone()), (offer_of("robot-b", y), y.clone())];
    let ok = aggregate("sorter", 5, &bundle, &parent, &pair(&a, &b), options).unwrap();
    let provenance = ok.manifest.aggregate.as_ref().unwrap();
    assert_eq!((provenance.rule.as_str(), ok.lora.as_ref().unwrap().rank), ("cat", 8), "two rank-4 LoRAs stack exactly within rank_max 16");

    let refused = |offers: Vec<(Offer, Adapter)>, parent: &Parent| aggregate("sorter", 5, &bundle, parent, &offers, options).unwrap_err().to_string();
    let other_task = crate::lora_adapter(&bundle, "picker", 3, 3);
    assert!(refused(pair(&a, &other_task), &parent).contains("robot-b.picker.v3"), "another task");
    let head = crate::head_adapter(&bundle, "sorter", 4, 4);
    assert!(refused(pair(&a, &head), &parent).contains("a head adapter"), "another kind");
    let minilm = Bundle::open(reference_bundle("minilm")).unwrap();
    let foreign = crate::head_adapter(&minilm, "sorter", 6, 6);
    assert!(refused(pair(&head, &foreign), &parent).contains("another base model"), "another base");
    let mut from_release = pair(&a, &b);
    from_release[1].0.parent_release = Some(3);
    assert!(refused(from_release, &parent).contains("release 3"), "another parent");
    let mut too_wide = b.clone();
    too_wide.lora = Some(adaptd_adapters::LoraWeights::random(&bundle.manifest.lora, 16, 16.0, 9, 0.1).unwrap());
    too_wide.lora.as_mut().unwrap().rank = 32;
    assert!(refused(pair(&a, &too_wide), &parent).contains("robot-b"), "shapes that do not fit the bundle");

    // LoReFT offers stack exactly (the weighted sum of their edits is one edit of the summed
    // rank, proven in `combine_reft`'s own test), weighted by their training samples.
    let (x, y) = (crate::loreft_adapter(&bundle, "sorter", 7, 7), crate::loreft_adapter(&bundle, "sorter", 8, 8));
    let mut heavy = pair(&x, &y);
    heavy[1].0.samples.train = 300;
    let combined = aggregate("sorter", 5, &bundle, &parent, &heavy, options).unwrap();
    assert_eq!(combined.manifest.aggregate.as_ref().unwrap().rule, "stack");
    assert_eq!((combined.manifest.kind.name(), combined.reft.as_ref().unwrap().rank), ("loreft", 8));
    let exact = adaptd_adapters::aggregate::combine_reft(&[(x.reft.as_ref().unwrap(), 0.25), (y.reft.as_ref().unwrap(), 0.75)], 8).unwrap();
    assert_eq!(combined.reft.as_ref().unwrap(), &exact, "offers weighted by their training samples (100 and 300)");
    combined.check_fits(&bundle).unwrap();
    let mut other_positions = y.clone();
    other_positions.reft.as_mut().unwrap().rank = 5;
    assert!(refused(pair(&x, &other_positions), &parent).contains("robot-b"), "a LoReFT whose tensors do not fit its rank");
    let too_many = [x.clone(), y.clone(), crate::loreft_adapter(&bundle, "sorter", 9, 9)];
    let offers: Vec<(Offer, Adapter)> = too_many.iter().enumerate().map(|(i, a)| (offer_of(&format!("robot-{i}"), a), a.clone())).collect();
    assert!(
        aggregate("sorter", 5, &bundle, &parent, &offers, options).unwrap_err().to_string().contains("rank 12 is above the bundle's rank_max 8"),
        "three rank-4 LoReFTs do not stack within rank_max 8: refused, not truncated"
    );
}
