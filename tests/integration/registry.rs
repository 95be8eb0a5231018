//! The registry: promotion is atomic and durable, rollback and pins survive a restart, and a
//! corrupt adapter on disk makes recovery fall back instead of failing.

use std::sync::Arc;

use adaptd_adapters::files::HEAD_FILE;
use adaptd_adapters::{AdapterStore, Bundle};
use adaptd_daemon::registry::{Recovery, Registry, RegistryError};

use crate::{head_adapter, lora_adapter, reference_bundle};

fn open(root: &std::path::Path, keep: usize) -> (Registry, Vec<Recovery>) {
    let bundle = Bundle::open(reference_bundle("digits-cnn")).unwrap();
    Registry::open(bundle, AdapterStore::open(root).unwrap(), keep).unwrap()
}

#[test]
fn promotion_swaps_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, events) = open(dir.path(), 5);
    assert!(events.is_empty());
    let base = reg.ensure_task("sorter").unwrap();
    assert_eq!((base.version, base.head.is_none()), (0, true));
    assert_eq!(base.labels.len(), 10, "the base model serves its own ten digit labels");

    let v1 = reg.promote(head_adapter(reg.bundle(), "sorter", 1, 1)).unwrap();
    let v2 = reg.promote(lora_adapter(reg.bundle(), "sorter", 2, 2)).unwrap();
    assert_eq!(reg.current("sorter").unwrap().version, 2);
    assert_ne!(v1.lora.key, v2.lora.key, "a LoRA adapter gets its own graph inputs");
    assert_eq!(v1.lora.key, base.lora.key, "a head-only adapter shares the base's zero LoRA");
    let manifest = v2.manifest.as_ref().unwrap();
    assert_eq!(manifest.files.len(), 3);

    drop(reg);
    let (reg, events) = open(dir.path(), 5);
    assert_eq!(events, vec![Recovery::Restored { task: "sorter".into(), version: 2 }]);
    let again = reg.current("sorter").unwrap();
    assert_eq!(again.head, v2.head);
    assert_eq!(again.lora.tensors, v2.lora.tensors);
}

#[test]
fn rollback_and_pin_persist_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 5);
    for v in 1..=3 {
        reg.promote(head_adapter(reg.bundle(), "sorter", v, v)).unwrap();
    }
    let (back, _) = reg.rollback("sorter").unwrap();
    assert_eq!(back.version, 2);
    drop(reg);
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 2, "a restart must not undo a rollback");

    reg.pin("sorter", 1).unwrap();
    assert_eq!(reg.current("sorter").unwrap().version, 1);
    let (base, _) = reg.rollback("sorter").unwrap();
    assert_eq!(base.version, 0, "rolling back past the oldest version serves the base model");
    drop(reg);
    let (reg, events) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 0);
    assert_eq!(events, vec![Recovery::Base { task: "sorter".into() }]);
    assert!(matches!(reg.pin("sorter", 9), Err(RegistryError::NoSuchVersion { version: 9, .. })));
}

#[test]
fn recovery_skips_corrupt_versions_down_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 5);
    for v in 1..=3 {
        reg.promote(lora_adapter(reg.bundle(), "sorter", v, v)).unwrap();
    }
    let store = reg.store().clone();
    drop(reg);
    // Newest: truncated head file. Middle: garbage manifest.
    let head = store.version_dir("sorter", 3).join(HEAD_FILE);
    let bytes = std::fs::read(&head).unwrap();
    std::fs::write(&head, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(store.version_dir("sorter", 2).join("adapter.json"), b"{\"format\": 1, \"task\": ").unwrap();

    let (reg, events) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 1);
    assert!(matches!(&events[0], Recovery::Skipped { version: 3, reason, .. } if reason.contains(HEAD_FILE)), "{events:?}");
    assert!(matches!(&events[1], Recovery::Skipped { version: 2, reason, .. } if reason.contains("adapter.json")), "{events:?}");
    assert_eq!(events[2], Recovery::Restored { task: "sorter".into(), version: 1 });

    drop(reg);
    std::fs::remove_file(store.version_dir("sorter", 1).join(HEAD_FILE)).unwrap();
    let (reg, events) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 0);
    assert_eq!(events.last(), Some(&Recovery::Base { task: "sorter".into() }));
}

#[test]
fn only_the_newest_versions_are_kept_and_bad_candidates_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 3);
    for v in 1..=5 {
        reg.promote(head_adapter(reg.bundle(), "sorter", v, v)).unwrap();
    }
    assert_eq!(reg.store().versions("sorter").unwrap(), vec![3, 4, 5]);

    // Not newer than what serves.
    let err = reg.promote(head_adapter(reg.bundle(), "sorter", 4, 9)).unwrap_err();
    assert!(matches!(err, RegistryError::NotNewer { serving: 5, .. }), "{err}");
    // Trained for another base model.
    let minilm = Bundle::open(reference_bundle("minilm")).unwrap();
    let err = reg.promote(head_adapter(&minilm, "sorter", 6, 6)).unwrap_err();
    assert_eq!(err.error_type(), "wrong_base", "{err}");
    // A bad task name never reaches the file system.
    let err = reg.promote(head_adapter(reg.bundle(), "../escape", 7, 7)).unwrap_err();
    assert_eq!(err.error_type(), "task_name", "{err}");
    assert_eq!(reg.current("sorter").unwrap().version, 5);
    assert_eq!(reg.store().versions("sorter").unwrap(), vec![3, 4, 5]);
}

#[test]
fn tasks_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 3);
    let reg = Arc::new(reg);
    reg.promote(head_adapter(reg.bundle(), "sorter", 1, 1)).unwrap();
    reg.promote(lora_adapter(reg.bundle(), "inspector", 1, 2)).unwrap();
    reg.promote(head_adapter(reg.bundle(), "inspector", 2, 3)).unwrap();
    assert_eq!(reg.tasks(), vec!["inspector".to_string(), "sorter".to_string()]);
    assert_eq!(reg.current("sorter").unwrap().version, 1);
    assert_eq!(reg.current("inspector").unwrap().version, 2);
    assert!(reg.current("nobody").is_none());
}

#[test]
fn pin_zero_serves_the_base_model() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 5);
    reg.promote(head_adapter(reg.bundle(), "sorter", 1, 1)).unwrap();
    let base = reg.pin("sorter", 0).unwrap();
    assert_eq!((base.version, base.head.is_none()), (0, true));
    drop(reg);
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 0, "the pin survives a restart");
    assert_eq!(reg.pin("sorter", 1).unwrap().version, 1, "and v1 can be pinned back");

    // A task that never had an adapter (no directory of its own yet) takes the pin too.
    reg.ensure_task("inspector").unwrap();
    assert_eq!(reg.pin("inspector", 0).unwrap().version, 0);
    drop(reg);
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("inspector").unwrap().version, 0);
}

/// An unusable `active` pointer (garbage, not UTF-8, a version not on disk, missing) serves the
/// newest version the registry promoted, never a newer import that nobody chose to serve.
#[test]
fn an_unusable_active_pointer_serves_the_newest_promoted_version_never_an_import() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 5);
    reg.promote(head_adapter(reg.bundle(), "sorter", 1, 1)).unwrap();
    reg.promote(head_adapter(reg.bundle(), "sorter", 2, 2)).unwrap();
    // An import: saved to the store, not promoted (what `adaptd adapters import` does).
    reg.store().save(&head_adapter(reg.bundle(), "sorter", 3, 3)).unwrap();
    let store = reg.store().clone();
    drop(reg);
    let pointer = dir.path().join("sorter").join(adaptd_daemon::registry::ACTIVE_FILE);
    for (bad, why) in [(&b"garbage\n"[..], "not a version number"), (&[0xff, 0xfe, 0x00][..], "not a version number"), (&b"99\n"[..], "not on disk")] {
        std::fs::write(&pointer, bad).unwrap();
        let (reg, events) = open(dir.path(), 5);
        assert_eq!(reg.current("sorter").unwrap().version, 2, "{why}: {events:?}");
        assert!(matches!(&events[0], Recovery::Skipped { reason, .. } if reason.contains(why)), "the log says why: {events:?}");
        assert_eq!(std::fs::read_to_string(&pointer).unwrap(), "2\n", "the pointer is rewritten to what serves");
    }
    std::fs::remove_file(&pointer).unwrap();
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 2);
    // An operator's pin of the import is a choice: it stands across restarts.
    reg.pin("sorter", 3).unwrap();
    drop(reg);
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 3);
    drop(reg);
    // A promotion a crash interrupted: its staging directory and the pointer's temporary file.
    std::fs::create_dir_all(dir.path().join("sorter/.v000004.staging-4242")).unwrap();
    std::fs::write(dir.path().join("sorter/.active.tmp-4242"), "4\n").unwrap();
    let (reg, _) = open(dir.path(), 5);
    assert_eq!(reg.current("sorter").unwrap().version, 3);
    assert!(!dir.path().join("sorter/.active.tmp-4242").exists() && !dir.path().join("sorter/.v000004.staging-4242").exists());
    assert_eq!(store.versions("sorter").unwrap(), vec![1, 2, 3]);
}

#[test]
fn versions_are_reserved_so_an_import_never_takes_the_one_a_job_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = open(dir.path(), 5);
    reg.ensure_task("sorter").unwrap();
    let training = reg.next_version("sorter").unwrap();
    assert_eq!(training, 1);
    // While v1 trains, an operator imports an adapter made elsewhere (its own version 7).
    let imported = reg.import(head_adapter(reg.bundle(), "other-device-task", 7, 3), Some("sorter".into())).unwrap();
    assert_eq!((imported.task.as_str(), imported.version, imported.promoted_unix_ms), ("sorter", 2, None), "the next free version, not serving");
    assert_eq!(reg.current("sorter").unwrap().version, 0, "an import serves only once pinned");
    reg.promote(head_adapter(reg.bundle(), "sorter", training, 1)).unwrap();
    assert_eq!(reg.store().versions("sorter").unwrap(), vec![1, 2], "both kept, neither overwrote the other");
    assert_eq!(reg.next_version("sorter").unwrap(), 3);
    assert_eq!(reg.pin("sorter", 2).unwrap().version, 2);
}
