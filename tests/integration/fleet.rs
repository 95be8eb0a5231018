//! The fleet's adapter repository as an operator makes it with the CLI and as a device reads it
//! with another implementation: python-tuf's reference client, over HTTP.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adaptd_adapters::{AdapterStore, Bundle};
use serde_json::Value;

use crate::reference_bundle;

fn adaptd(args: &[&str]) -> (bool, String) {
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
