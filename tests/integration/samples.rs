//! The sample store: durable across reopen, deduplicated by key, stable splits, growing labels.

use adaptd_adapters::tensor::HostTensor;
use adaptd_daemon::samples::{Inserted, Sample, SampleInput, SampleStore, Split, SplitPolicy, SuspectRow};

fn sample(key: &str, task: &str, label: &str) -> Sample {
    Sample {
        key: key.into(),
        task: task.into(),
        label: label.into(),
        input: SampleInput::Tensor(HostTensor::f32(vec![1, 1, 8, 8], (0..64).map(|i| i as f32 / 64.0).collect()).unwrap()),
        weight: 1.0,
        source: Some("robot-7".into()),
        timestamp_ms: 1_700_000_000_000,
        correction: false,
        request_id: None,
    }
}

#[test]
fn duplicates_change_nothing_and_everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.db");
    let mut store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    let batch: Vec<Sample> = (0..50).map(|i| sample(&format!("robot-7:{i}"), "sorter", ["left", "right"][i % 2])).collect();
    let first = store.insert_batch(&batch).unwrap();
    assert!(first.iter().all(|r| matches!(r, Inserted::New(_))));

    // A redelivery of the same keys is a no-op; one that now claims another label changes
    // nothing either, and says which label stands.
    let mut again = batch.clone();
    again[0].label = "stop".into();
    let results = store.insert_batch(&again).unwrap();
    assert_eq!(results[0], Inserted::Conflict { kept_task: "sorter".into(), kept_label: "left".into() });
    assert!(results[1..].iter().all(|r| *r == Inserted::Duplicate));
    assert_eq!(store.len().unwrap(), 50);
    assert_eq!(store.labels("sorter").unwrap(), vec!["left", "right"], "a duplicate must not add its label");

    let text = Sample { input: SampleInput::Text("pick up the box".into()), ..sample("op:1", "intent", "manipulate") };
    store.insert_batch(std::slice::from_ref(&text)).unwrap();
    let id = store.get("robot-7:3").unwrap().unwrap().id;
    store.set_embedding(id, &[0.5, -1.0, 2.0]).unwrap();
    drop(store);

    let store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    assert_eq!(store.len().unwrap(), 51);
    assert_eq!(store.tasks().unwrap(), vec!["intent", "sorter"]);
    let back = store.get("robot-7:0").unwrap().unwrap();
    assert_eq!(back.sample, batch[0], "stored exactly as sent, first label kept");
    assert_eq!(back.split, SplitPolicy::default().split_of("robot-7:0"));
    assert_eq!(store.get("op:1").unwrap().unwrap().sample, text);
    assert_eq!(store.get("robot-7:3").unwrap().unwrap().embedding, Some(vec![0.5, -1.0, 2.0]));
    let counted: u64 = store.counts("sorter").unwrap().values().sum();
    assert_eq!(counted, 50);
    let train = store.load("sorter", Split::Train).unwrap();
    assert!(train.iter().all(|s| s.split == Split::Train && s.sample.task == "sorter"));
    assert!(train.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
}

#[test]
fn splits_are_a_stable_function_of_the_key_in_the_configured_proportions() {
    let policy = SplitPolicy { validation_percent: 10, holdout_percent: 15 };
    let n = 20_000;
    let mut counts = [0usize; 3];
    for i in 0..n {
        let key = format!("dev-{}:{i}", i % 7);
        let split = policy.split_of(&key);
        assert_eq!(split, policy.split_of(&key));
        counts[split as usize] += 1;
    }
    let pct = |c: usize| 100.0 * c as f64 / n as f64;
    assert!((pct(counts[0]) - 75.0).abs() < 1.5, "train {}%", pct(counts[0]));
    assert!((pct(counts[1]) - 10.0).abs() < 1.0, "validation {}%", pct(counts[1]));
    assert!((pct(counts[2]) - 15.0).abs() < 1.0, "holdout {}%", pct(counts[2]));
}

#[test]
fn labels_grow_in_first_seen_order_so_class_indices_stay_put() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SampleStore::open(&dir.path().join("s.db"), SplitPolicy::default()).unwrap();
    store.insert_batch(&[sample("a", "t", "cat"), sample("b", "t", "dog")]).unwrap();
    store.insert_batch(&[sample("c", "t", "ant"), sample("d", "t", "cat")]).unwrap();
    assert_eq!(store.labels("t").unwrap(), vec!["cat", "dog", "ant"]);
}

#[test]
fn a_file_that_is_not_a_database_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let err = SampleStore::open(&path, SplitPolicy::default()).err().expect("garbage is not a store");
    assert!(err.to_string().contains("samples.db"), "{err}");
}

/// The disk budget evicts class-balanced, oldest first, keeps operator corrections longest and
/// never takes a class below its reservoir.
#[test]
fn the_disk_budget_evicts_the_majority_oldest_first_and_keeps_rare_classes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SampleStore::open(&dir.path().join("samples.db"), SplitPolicy::default()).unwrap();
    let mut batch = Vec::new();
    for (label, n) in [("common", 250), ("usual", 40), ("rare", 10)] {
        for i in 0..n {
            batch.push(Sample { correction: label == "common" && i < 5, ..sample(&format!("{label}:{i:03}"), "sorter", label) });
        }
    }
    store.insert_batch(&batch).unwrap();
    let per_sample = store.bytes("sorter").unwrap() / 300;
    assert!(per_sample > 256, "a digit's input and the row: {per_sample} bytes");

    let budget = per_sample * 100;
    let e = store.evict_to_budget("sorter", budget, 20).unwrap();
    assert!(e.bytes <= budget && !e.at_reservoir, "{e:?}");
    let count = |store: &SampleStore, label: &str| store.counts("sorter").unwrap().iter().filter(|((_, l), _)| l == label).map(|(_, n)| n).sum::<u64>();
    assert_eq!(count(&store, "rare"), 10, "a class under its reservoir is never touched");
    assert_eq!(count(&store, "usual"), 40, "the majority class goes first");
    assert_eq!(count(&store, "common") + 50, 100, "down to the budget, no further");
    assert!(store.get("common:000").unwrap().is_some(), "operator corrections are kept longest");
    assert!(store.get("common:005").unwrap().is_none() && store.get("common:249").unwrap().is_some(), "oldest first");

    // A budget below every reservoir: evicts down to the reservoirs and says it stopped there.
    let e = store.evict_to_budget("sorter", per_sample * 10, 20).unwrap();
    assert!(e.at_reservoir && e.bytes > per_sample * 10, "{e:?}");
    assert_eq!((count(&store, "common"), count(&store, "usual"), count(&store, "rare")), (20, 20, 10));
}

/// Prefix activations are a cache in the store: kept per sample under a key, counted in the
/// disk budget but never at a sample's expense (they go first, and are not kept past it).
#[test]
fn prefix_activations_are_kept_within_the_budget_and_go_before_any_sample() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SampleStore::open(&dir.path().join("samples.db"), SplitPolicy::default()).unwrap();
    let batch: Vec<Sample> = (0..40).map(|i| sample(&format!("s:{i:02}"), "sorter", if i % 2 == 0 { "a" } else { "b" })).collect();
    store.insert_batch(&batch).unwrap();
    let ids: Vec<i64> = batch.iter().map(|s| store.get(&s.key).unwrap().unwrap().id).collect();
    let samples_bytes = store.bytes("sorter").unwrap();
    let row = vec![0.5f32; 256]; // 1 KiB a row

    let kept = store.set_activations("sorter", "k1", &ids.iter().map(|&id| (id, row.clone())).collect::<Vec<_>>(), 0).unwrap();
    assert_eq!(kept, 40, "no budget: all kept");
    assert_eq!(store.bytes("sorter").unwrap(), samples_bytes + 40 * 1024, "the budget counts them");
    let found = store.activations(&ids[..3]).unwrap();
    assert_eq!(found.len(), 3);
    assert_eq!(found[&ids[0]], ("k1".to_string(), row.clone()));

    // Another prefix's rows replace what a sample had.
    store.set_activations("sorter", "k2", &[(ids[0], vec![1.0; 256])], 0).unwrap();
    assert_eq!(store.activations(&ids[..1]).unwrap()[&ids[0]].0, "k2");

    // Over budget: the cache goes, every sample stays.
    let e = store.evict_to_budget("sorter", samples_bytes + 1024, 1).unwrap();
    assert_eq!(e.evicted, 0, "{e:?}");
    assert!(store.activations(&ids).unwrap().is_empty());
    assert_eq!(store.bytes("sorter").unwrap(), samples_bytes);
    // And only what fits is kept.
    let kept = store.set_activations("sorter", "k1", &ids.iter().map(|&id| (id, row.clone())).collect::<Vec<_>>(), samples_bytes + 5 * 1024).unwrap();
    assert_eq!(kept, 5);
}

#[test]
fn parts_of_the_daemon_opening_a_fresh_store_at_once_all_get_it() {
    // Ingest and every task's loop open the store as the daemon starts; on a fresh state
    // directory one of them turns the file into WAL mode while the others wait for it.
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.db");
        let start = std::sync::Barrier::new(6);
        std::thread::scope(|s| {
            let opened: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        SampleStore::open(&path, SplitPolicy::default()).map(|_| ())
                    })
                })
                .collect();
            for o in opened {
                o.join().unwrap().expect("every opener gets the store");
            }
        });
    }
}

/// A sample store's path in a new directory, holding one table as an older release wrote it.
fn store_from_an_older_release(create_table: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.db");
    rusqlite::Connection::open(&path).unwrap().execute_batch(create_table).unwrap();
    (dir, path)
}

#[test]
fn a_store_from_before_label_requests_kept_their_confidence_opens_and_keeps_it_from_then_on() {
    // The label_requests table as the first release with label requests wrote it.
    let (_dir, path) = store_from_an_older_release(
        "CREATE TABLE label_requests (id TEXT PRIMARY KEY, task TEXT NOT NULL, input_kind TEXT NOT NULL, input_shape TEXT NOT NULL, \
         input BLOB NOT NULL, predicted TEXT NOT NULL, strategy TEXT NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, \
         answered_ms INTEGER, answer_label TEXT, answer_key TEXT)",
    );
    let mut store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    let row = adaptd_daemon::samples::LabelRequestRow {
        id: "robot-7-sorter-1".into(),
        task: "sorter".into(),
        input: SampleInput::Text("pick up the box".into()),
        predicted: "manipulate".into(),
        confidence: 0.4375,
        strategy: "uncertainty".into(),
        created_ms: 1_700_000_000_000,
        expires_ms: 1_700_086_400_000,
    };
    store.add_label_request(&row).unwrap();
    drop(store);
    let store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    assert_eq!(store.label_request("robot-7-sorter-1").unwrap(), Some(row), "as it was sent, confidence included");
    assert_eq!(store.label_request("no-such-id").unwrap(), None);
}

#[test]
fn labels_only_an_adapter_doubts_stay_out_of_training_but_count_in_the_holdout_and_an_older_store_opens() {
    // The suspects table as the first release with the search for wrong labels wrote it.
    let (_dir, path) = store_from_an_older_release(
        "CREATE TABLE suspects (sample_id INTEGER PRIMARY KEY, task TEXT NOT NULL, suggested TEXT NOT NULL, \
         given_probability REAL NOT NULL, suggested_probability REAL NOT NULL, found_ms INTEGER NOT NULL)",
    );
    let mut store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    let batch: Vec<Sample> = (0..200).map(|i| sample(&format!("robot-7:{i}"), "sorter", ["left", "right"][i % 2])).collect();
    store.insert_batch(&batch).unwrap();
    let (train, holdout) = (store.load_trusted("sorter", Split::Train).unwrap(), store.load_trusted("sorter", Split::Holdout).unwrap());
    assert!(train.len() >= 2 && holdout.len() >= 2, "{} train, {} holdout", train.len(), holdout.len());
    let doubt =
        |id: i64, by_adapter: bool| SuspectRow { sample_id: id, suggested: "left".into(), given_probability: 0.1, suggested_probability: 0.9, by_adapter };
    // One sample of each split doubted by the neighbours, one of each by an adapter alone.
    let rows = [doubt(train[0].id, false), doubt(train[1].id, true), doubt(holdout[0].id, false), doubt(holdout[1].id, true)];
    assert_eq!(store.replace_suspects("sorter", &rows).unwrap(), 4);
    drop(store);
    let store = SampleStore::open(&path, SplitPolicy::default()).unwrap();
    let ids = |split| store.load_trusted("sorter", split).unwrap().iter().map(|s| s.id).collect::<Vec<i64>>();
    let (train_after, holdout_after) = (ids(Split::Train), ids(Split::Holdout));
    assert_eq!(train_after.len(), train.len() - 2, "both doubted training samples stay out of training");
    assert!(!train_after.contains(&train[0].id) && !train_after.contains(&train[1].id));
    // A holdout without what the adapter doubts would be one it agrees with everywhere.
    assert_eq!(holdout_after.len(), holdout.len() - 1, "only the neighbours' suspect leaves the holdout");
    assert!(!holdout_after.contains(&holdout[0].id) && holdout_after.contains(&holdout[1].id));
    // The listing says who doubts each.
    let by: std::collections::BTreeMap<String, Option<&str>> = store.suspects("sorter").unwrap().into_iter().map(|s| (s.key, s.doubted_by)).collect();
    let key = |id: i64| train.iter().chain(&holdout).find(|s| s.id == id).unwrap().sample.key.clone();
    assert_eq!((by[&key(train[0].id)], by[&key(train[1].id)]), (Some("neighbours"), Some("adapter")));
    assert_eq!((by[&key(holdout[0].id)], by[&key(holdout[1].id)]), (Some("neighbours"), Some("adapter")));
}
