//! The fleet's adapter repository: The Update Framework (TUF) through `tough`, the way
//! Bottlerocket signs its updates. Four roles, each with its own Ed25519 key (root kept offline,
//! targets, snapshot, timestamp), consistent snapshots, and the adapter files as targets whose
//! signed `custom` field says what release they belong to ([`Release`]).
//!
//! Layout (any static HTTP server, object store or CDN serves it as files):
//! - `metadata/`: `N.root.json`, `N.targets.json`, `N.snapshot.json`, `timestamp.json`.
//! - `targets/`: `<sha256>.<name>` per target file.
//!
//! Target names are flat (`<task>.r<release>.<file>`): TUF clients disagree on where a
//! consistent-snapshot target whose name has a `/` lives (python-tuf puts the hash before the
//! last path segment, tough before the whole name), and both must read what adaptd writes.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use tough::editor::RepositoryEditor;
use tough::editor::signed::SignedRole;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Target};
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};

const SPEC_VERSION: &str = "1.0.0";
/// The four roles, in the order their keys are made.
const ROLES: [(RoleType, &str); 4] =
    [(RoleType::Root, "root"), (RoleType::Targets, "targets"), (RoleType::Snapshot, "snapshot"), (RoleType::Timestamp, "timestamp")];

/// How long each role's metadata stays valid after it is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub root_days: i64,
    pub targets_days: i64,
    pub snapshot_days: i64,
    /// Short: a device that cannot fetch a fresh timestamp stops trusting the repository soon
    /// (freeze protection); `refresh` renews it.
    pub timestamp_days: i64,
}

impl Default for Expiry {
    fn default() -> Expiry {
        Expiry { root_days: 365, targets_days: 90, snapshot_days: 90, timestamp_days: 7 }
    }
}

/// What a release is, signed into each of its targets' `custom` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub task: String,
    pub release: u64,
    /// The adapter kind (`head`, `lora`).
    pub kind: String,
    /// The sha256 of the base bundle's model the adapter was trained on: a device on another
    /// base refuses it.
    pub base_sha256: String,
    /// The release it was trained from, if any.
    pub parent: Option<u64>,
    /// Whether a device may install it without its own gate (`force`).
    pub allow_force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} exists already; refusing to overwrite a signing key")]
    KeyExists { path: PathBuf },
    #[error("TUF: {0}")]
    Tuf(String),
    #[error("{0}")]
    Invalid(String),
    #[error("release {release} of {task} is published already (releases are immutable; publish a new one)")]
    Exists { task: String, release: u64 },
    #[error("no release {release} of {task} in the repository")]
    NoRelease { task: String, release: u64 },
}

impl RepoError {
    pub fn error_type(&self) -> &'static str {
        match self {
            RepoError::Io { .. } => "io",
            RepoError::KeyExists { .. } => "key_exists",
            RepoError::Tuf(_) => "tuf",
            RepoError::Invalid(_) => "invalid",
            RepoError::Exists { .. } => "exists",
            RepoError::NoRelease { .. } => "no_release",
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RepoError + '_ {
    move |e| RepoError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

fn tuf(e: impl std::fmt::Display) -> RepoError {
    RepoError::Tuf(e.to_string())
}

/// The key file of `role` in `keys`.
pub fn key_path(keys: &Path, role: &str) -> PathBuf {
    keys.join(format!("{role}.pk8"))
}

/// Make an Ed25519 key (PKCS#8) per role in `keys`, readable by its owner only. Refuses to
/// overwrite any key: a lost root key is a new fleet.
pub fn keygen(keys: &Path) -> Result<Vec<PathBuf>, RepoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(keys).map_err(io(keys))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut written = Vec::new();
    for (_, role) in ROLES {
        let path = key_path(keys, role);
        if path.exists() {
            return Err(RepoError::KeyExists { path });
        }
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| RepoError::Invalid(format!("key generation: {e}")))?;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io(&path))?;
        file.write_all(pkcs8.as_ref()).and_then(|_| file.sync_all()).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

fn sources(keys: &Path, roles: &[&str]) -> Vec<Box<dyn KeySource>> {
    roles.iter().map(|r| Box::new(LocalKeySource { path: key_path(keys, r) }) as Box<dyn KeySource>).collect()
}

/// `n` days from now, to the second: the TUF spec writes expiry as `YYYY-MM-DDTHH:MM:SSZ`, and
/// other clients (python-tuf) refuse fractions of a second.
fn days(n: i64) -> DateTime<Utc> {
    let at = Utc::now() + TimeDelta::days(n);
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}

/// A new repository in `repo`, its root signed with the root key of `keys` (which may go
/// offline afterwards: publishing needs only the other three). Returns the path of the
/// `root.json` that devices ship with.
pub async fn init(keys: &Path, repo: &Path, expiry: Expiry) -> Result<PathBuf, RepoError> {
    let metadata = repo.join("metadata");
    if metadata.join("1.root.json").exists() {
        return Err(RepoError::Invalid(format!("{} holds a repository already", repo.display())));
    }
    let mut root = Root {
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: days(expiry.root_days),
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for (role, name) in ROLES {
        let sign =
            LocalKeySource { path: key_path(keys, name) }.as_sign().await.map_err(|e| RepoError::Tuf(format!("{}: {e}", key_path(keys, name).display())))?;
        let key = sign.tuf_key();
        let id = key.key_id().map_err(tuf)?;
        root.keys.insert(id.clone(), key);
        root.roles.insert(role, RoleKeys { keyids: vec![id], threshold: NonZeroU64::MIN, _extra: HashMap::new() });
    }
    let holder = KeyHolder::Root(root.clone());
    let signed = SignedRole::new(root, &holder, &sources(keys, &["root"]), &aws_lc_rs::rand::SystemRandom::new()).await.map_err(tuf)?;
    let staging = staging_dir(repo)?;
    signed.write(&staging, true).await.map_err(tuf)?;
    let root_file = staging.join("1.root.json");
    std::fs::create_dir_all(&metadata).map_err(io(&metadata))?;
    std::fs::create_dir_all(repo.join("targets")).map_err(io(repo))?;
    // The first targets, snapshot and timestamp: an empty release list.
    let editor = RepositoryEditor::new(&root_file).await.map_err(tuf)?;
    let signed_repo = sign(keys, editor, Versions { targets: 1, snapshot: 1, timestamp: 1 }, expiry).await?;
    write_metadata(&signed_repo, &staging, &metadata).await?;
    Ok(metadata.join("1.root.json"))
}

/// The versions the next signing gives each role.
struct Versions {
    targets: u64,
    snapshot: u64,
    timestamp: u64,
}

impl Versions {
    fn after(repo: &tough::Repository) -> Versions {
        Versions {
            targets: repo.targets().signed.version.get() + 1,
            snapshot: repo.snapshot().signed.version.get() + 1,
            timestamp: repo.timestamp().signed.version.get() + 1,
        }
    }

    fn apply(&self, editor: &mut RepositoryEditor, expiry: Expiry) -> Result<(), RepoError> {
        let version = |v: u64| NonZeroU64::new(v).ok_or_else(|| RepoError::Invalid("a version of 0".into()));
        editor.targets_version(version(self.targets)?).map_err(tuf)?;
        editor.targets_expires(days(expiry.targets_days)).map_err(tuf)?;
        editor.snapshot_version(version(self.snapshot)?);
        editor.snapshot_expires(days(expiry.snapshot_days));
        editor.timestamp_version(version(self.timestamp)?);
        editor.timestamp_expires(days(expiry.timestamp_days));
        Ok(())
    }
}

/// The repository in `repo` as a client loads it, from its first root (expiry is not enforced:
/// this is the operator's own copy, and `refresh` must work on expired metadata).
async fn load(repo: &Path) -> Result<(tough::Repository, PathBuf), RepoError> {
    let root_path = repo.join("metadata").join("1.root.json");
    let root = std::fs::read(&root_path).map_err(io(&root_path))?;
    let url = |dir: &str| {
        let path = std::path::absolute(repo.join(dir)).map_err(io(repo))?;
        url::Url::from_directory_path(&path).map_err(|_| RepoError::Invalid(format!("{} is not an absolute path", path.display())))
    };
    let loaded =
        RepositoryLoader::new(&root, url("metadata")?, url("targets")?).expiration_enforcement(ExpirationEnforcement::Unsafe).load().await.map_err(tuf)?;
    Ok((loaded, root_path))
}

/// The name of a release's file as a target.
pub fn target_name(task: &str, release: u64, file: &str) -> String {
    format!("{task}.r{release}.{file}")
}

/// Publish `files` (an adapter's `adapter.json` and weights) as release `release` of its task.
/// Returns the target names. Releases are immutable: publishing one twice is refused.
pub async fn publish(keys: &Path, repo: &Path, release: &Release, files: &[PathBuf], expiry: Expiry) -> Result<Vec<String>, RepoError> {
    let (loaded, root_path) = load(repo).await?;
    if releases(&loaded).iter().any(|r| r.task == release.task && r.release == release.release) {
        return Err(RepoError::Exists { task: release.task.clone(), release: release.release });
    }
    let versions = Versions::after(&loaded);
    let mut editor = RepositoryEditor::from_repo(&root_path, loaded).await.map_err(tuf)?;
    let custom = serde_json::to_value(release).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let mut names = Vec::new();
    let mut placed = Vec::new();
    for file in files {
        let base = file.file_name().and_then(|n| n.to_str()).ok_or_else(|| RepoError::Invalid(format!("{}: no file name", file.display())))?;
        let name = target_name(&release.task, release.release, base);
        let mut target = Target::from_path(file).await.map_err(tuf)?;
        target.custom.insert("adaptd".into(), custom.clone());
        let target_name = TargetName::new(name.clone()).map_err(tuf)?;
        editor.add_target(target_name, target.clone()).map_err(tuf)?;
        placed.push((file.clone(), format!("{}.{name}", hex::encode(&target.hashes.sha256))));
        names.push(name);
    }
    let signed = sign(keys, editor, versions, expiry).await?;
    // The files first: metadata that names a target must never be served before the target.
    let targets_dir = repo.join("targets");
    for (from, to) in placed {
        atomic_copy(&from, &targets_dir.join(to))?;
    }
    write_metadata(&signed, &staging_dir(repo)?, &repo.join("metadata")).await?;
    Ok(names)
}

/// Withdraw release `release` of `task`: its targets leave the signed list (devices refuse it
/// from their next update on); the files stay for devices mid-download of an older snapshot.
pub async fn yank(keys: &Path, repo: &Path, task: &str, release: u64, expiry: Expiry) -> Result<usize, RepoError> {
    let (loaded, root_path) = load(repo).await?;
    let names = release_targets(&loaded, task, release)?;
    let versions = Versions::after(&loaded);
    let mut editor = RepositoryEditor::from_repo(&root_path, loaded).await.map_err(tuf)?;
    for name in &names {
        editor.remove_target(name).map_err(tuf)?;
    }
    let signed = sign(keys, editor, versions, expiry).await?;
    write_metadata(&signed, &staging_dir(repo)?, &repo.join("metadata")).await?;
    Ok(names.len())
}

/// Sign everything again with fresh expiry dates and new versions (run it from a timer well
/// inside the timestamp's lifetime).
pub async fn refresh(keys: &Path, repo: &Path, expiry: Expiry) -> Result<(), RepoError> {
    let (loaded, root_path) = load(repo).await?;
    let versions = Versions::after(&loaded);
    let editor = RepositoryEditor::from_repo(&root_path, loaded).await.map_err(tuf)?;
    let signed = sign(keys, editor, versions, expiry).await?;
    write_metadata(&signed, &staging_dir(repo)?, &repo.join("metadata")).await
}

/// Sign targets, snapshot and timestamp at `versions` with fresh expiry dates (the three online
/// keys; root stays offline).
async fn sign(keys: &Path, mut editor: RepositoryEditor, versions: Versions, expiry: Expiry) -> Result<tough::editor::signed::SignedRepository, RepoError> {
    versions.apply(&mut editor, expiry)?;
    editor.sign(&sources(keys, &["targets", "snapshot", "timestamp"])).await.map_err(tuf)
}

/// Write signed metadata into `staging`, then move it into `metadata` (see [`publish_staged`]).
async fn write_metadata(signed: &tough::editor::signed::SignedRepository, staging: &Path, metadata: &Path) -> Result<(), RepoError> {
    signed.write(staging).await.map_err(tuf)?;
    publish_staged(staging, metadata)
}

/// One past the newest release of `task` the repository publishes.
pub async fn next_release(repo: &Path, task: &str) -> Result<u64, RepoError> {
    Ok(list(repo).await?.iter().filter(|p| p.task == task).map(|p| p.release).max().unwrap_or(0) + 1)
}

/// What the repository publishes now, as releases (one per task and release number).
pub async fn list(repo: &Path) -> Result<Vec<Release>, RepoError> {
    let (loaded, _) = load(repo).await?;
    Ok(releases(&loaded))
}

/// Read release `release` of `task` from the repository on this disk into `dir` (which must
/// exist), each file under its plain name and verified against the signed metadata as it is read.
/// The operator's side of fleet learning reads the parent release this way.
pub async fn read_release(repo: &Path, task: &str, release: u64, dir: &Path) -> Result<Vec<PathBuf>, RepoError> {
    use futures::StreamExt;
    use std::io::Write;
    let (loaded, _) = load(repo).await?;
    let prefix = format!("{task}.r{release}.");
    let names = release_targets(&loaded, task, release)?;
    let mut written = Vec::with_capacity(names.len());
    for name in &names {
        let Some(mut stream) = loaded.read_target(name).await.map_err(tuf)? else {
            return Err(RepoError::NoRelease { task: task.into(), release });
        };
        let path = dir.join(name.raw().strip_prefix(&prefix).unwrap_or(name.raw()));
        let mut file = std::fs::File::create(&path).map_err(io(&path))?;
        while let Some(chunk) = stream.next().await {
            file.write_all(&chunk.map_err(tuf)?).map_err(io(&path))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// The target names of release `release` of `task`; refused when it has none.
fn release_targets(loaded: &tough::Repository, task: &str, release: u64) -> Result<Vec<TargetName>, RepoError> {
    let names: Vec<TargetName> = loaded
        .targets()
        .signed
        .targets
        .iter()
        .filter(|(_, t)| release_of(t).is_some_and(|r| r.task == task && r.release == release))
        .map(|(n, _)| n.clone())
        .collect();
    if names.is_empty() {
        return Err(RepoError::NoRelease { task: task.into(), release });
    }
    Ok(names)
}

fn release_of(target: &Target) -> Option<Release> {
    target.custom.get("adaptd").and_then(|v| serde_json::from_value(v.clone()).ok())
}

fn releases(repo: &tough::Repository) -> Vec<Release> {
    let mut out: Vec<Release> = repo.targets().signed.targets.values().filter_map(release_of).collect();
    out.sort_by(|a, b| (&a.task, a.release).cmp(&(&b.task, b.release)));
    out.dedup();
    out
}

fn staging_dir(repo: &Path) -> Result<PathBuf, RepoError> {
    let dir = repo.join(".staging");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

/// Move freshly signed metadata from `staging` into `metadata`, each file by rename (a reader
/// never sees half a file), `timestamp.json` last: until it moves, clients see the old state.
fn publish_staged(staging: &Path, metadata: &Path) -> Result<(), RepoError> {
    std::fs::create_dir_all(metadata).map_err(io(metadata))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(staging).map_err(io(staging))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort_by_key(|p| p.file_name().is_some_and(|n| n == "timestamp.json"));
    for file in files {
        let Some(name) = file.file_name() else { continue };
        let to = metadata.join(name);
        // Versioned files are immutable: an existing one stays as it is (only `1.root.json` is
        // written again, identical, by nothing here).
        if to.exists() && name != "timestamp.json" {
            continue;
        }
        std::fs::File::open(&file).and_then(|f| f.sync_all()).map_err(io(&file))?;
        std::fs::rename(&file, &to).map_err(io(&to))?;
    }
    std::fs::File::open(metadata).and_then(|d| d.sync_all()).map_err(io(metadata))?;
    std::fs::remove_dir_all(staging).map_err(io(staging))
}

fn atomic_copy(from: &Path, to: &Path) -> Result<(), RepoError> {
    if to.exists() {
        return Ok(()); // named by its hash: the same bytes
    }
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp).map_err(io(from))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, to).map_err(io(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(task: &str, n: u64) -> Release {
        Release {
            task: task.into(),
            release: n,
            kind: "head".into(),
            base_sha256: "ab".repeat(32),
            parent: n.checked_sub(1).filter(|p| *p > 0),
            allow_force: false,
        }
    }

    #[tokio::test]
    async fn a_repository_is_made_published_to_yanked_and_refreshed_and_tough_verifies_each_state() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, repo) = (dir.path().join("keys"), dir.path().join("repo"));
        assert_eq!(keygen(&keys).unwrap().len(), 4);
        assert_eq!(keygen(&keys).unwrap_err().error_type(), "key_exists", "a key is never overwritten");
        let root = init(&keys, &repo, Expiry::default()).await.unwrap();
        assert!(root.ends_with("metadata/1.root.json"));
        assert!(list(&repo).await.unwrap().is_empty());

        let files = dir.path().join("adapter");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("adapter.json"), br#"{"task": "sorter"}"#).unwrap();
        std::fs::write(files.join("head.safetensors"), [7u8; 300]).unwrap();
        let paths = vec![files.join("adapter.json"), files.join("head.safetensors")];
        let names = publish(&keys, &repo, &release("sorter", 1), &paths, Expiry::default()).await.unwrap();
        assert_eq!(names, ["sorter.r1.adapter.json", "sorter.r1.head.safetensors"]);
        assert_eq!(publish(&keys, &repo, &release("sorter", 1), &paths, Expiry::default()).await.unwrap_err().error_type(), "exists");
        publish(&keys, &repo, &release("sorter", 2), &paths, Expiry::default()).await.unwrap();
        assert_eq!(list(&repo).await.unwrap(), vec![release("sorter", 1), release("sorter", 2)]);

        // A client that trusts only the root, with expiry enforced, reads a target's bytes.
        let (loaded, _) = load(&repo).await.unwrap();
        let root_bytes = std::fs::read(&root).unwrap();
        let url = |d: &str| url::Url::from_directory_path(repo.join(d)).unwrap();
        let client = RepositoryLoader::new(&root_bytes, url("metadata"), url("targets")).load().await.unwrap();
        assert_eq!(client.targets().signed.version, loaded.targets().signed.version);
        let name = TargetName::new("sorter.r2.head.safetensors").unwrap();
        let bytes = tough::IntoVec::into_vec(client.read_target(&name).await.unwrap().unwrap()).await.unwrap();
        assert_eq!(bytes, vec![7u8; 300]);

        assert_eq!(yank(&keys, &repo, "sorter", 1, Expiry::default()).await.unwrap(), 2);
        assert_eq!(yank(&keys, &repo, "sorter", 1, Expiry::default()).await.unwrap_err().error_type(), "no_release");
        assert_eq!(list(&repo).await.unwrap(), vec![release("sorter", 2)]);

        // Expired timestamp: a client refuses the repository until `refresh`.
        refresh(&keys, &repo, Expiry { timestamp_days: -1, ..Expiry::default() }).await.unwrap();
        let e = RepositoryLoader::new(&root_bytes, url("metadata"), url("targets")).load().await.unwrap_err();
        assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
        refresh(&keys, &repo, Expiry::default()).await.unwrap();
        let client = RepositoryLoader::new(&root_bytes, url("metadata"), url("targets")).load().await.unwrap();
        assert!(client.targets().signed.version.get() >= 6, "every change signs a new version");
        assert!(!repo.join(".staging").exists());
    }
}
