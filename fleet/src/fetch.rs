//! The device's side of the repository: fetch one release into staging, verified by TUF.
//!
//! tough does the verifying: the root chain from the root the device shipped with, signatures
//! and thresholds, expiry (freeze protection), versions never going backwards (rollback
//! protection, remembered in a datastore across restarts), a clock that stepped back, and each
//! file's length and hashes. This module adds what a fleet needs around it: HTTP(S) with the
//! system's CA store, downloads that resume after a restart (a `Range` request for what is
//! missing, the bytes already in staging replayed to tough so it still hashes the whole file),
//! a size limit per release, and a reason word for every refusal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use tough::error::Error as TufError;
use tough::{RepositoryLoader, TargetName, Transport, TransportError, TransportErrorKind};
use url::Url;

use crate::repo::Release;

/// What a tough transport returns (tough names it but does not export the name).
type TransportStream = futures::stream::BoxStream<'static, Result<bytes::Bytes, TransportError>>;

/// Why a release was not fetched: refused (the repository or the files are not what the signed
/// metadata says, or the release is not there) or failed (the network, the disk).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct FetchError {
    pub refused: bool,
    pub reason: &'static str,
    pub message: String,
}

impl FetchError {
    fn refused(reason: &'static str, message: impl Into<String>) -> FetchError {
        FetchError { refused: true, reason, message: message.into() }
    }

    fn failed(reason: &'static str, message: impl Into<String>) -> FetchError {
        FetchError { refused: false, reason, message: message.into() }
    }

    /// The disk failed at `path`: full (ENOSPC), or otherwise.
    fn disk(path: &Path, e: std::io::Error) -> FetchError {
        const ENOSPC: i32 = 28;
        FetchError::failed(if e.raw_os_error() == Some(ENOSPC) { "disk_full" } else { "disk" }, format!("{}: {e}", path.display()))
    }

    /// A tough error, classified: what an attacker or a broken repository causes is a refusal.
    fn from_tuf(e: &TufError) -> FetchError {
        let message = e.to_string();
        // tough reports a target that fails its checks mid-stream as a transport error whose
        // cause is the check: classify by the cause.
        if let TufError::Transport { .. } = e {
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                if let Some(inner) = c.downcast_ref::<TufError>().map(FetchError::from_tuf).filter(|f| f.refused) {
                    return FetchError { message, ..inner };
                }
                cause = c.source();
            }
        }
        let reason = match e {
            TufError::ExpiredMetadata { .. } => "expired_metadata",
            TufError::OlderMetadata { .. } => "rollback_attack",
            TufError::VerifyMetadata { .. } | TufError::VerifyRoleMetadata { .. } | TufError::VerifyTrustedMetadata { .. } => "bad_signature",
            TufError::HashMismatch { .. } => "hash_mismatch",
            TufError::MaxSizeExceeded { .. } => "too_large",
            TufError::SystemTimeSteppedBackward { .. } => "clock_stepped_back",
            TufError::VersionMismatch { .. } | TufError::MetaMissing { .. } => "inconsistent_metadata",
            TufError::ParseMetadata { .. } | TufError::ParseTrustedMetadata { .. } => "bad_metadata",
            TufError::Transport { .. } => return FetchError::failed("unreachable", message),
            TufError::DatastoreCreate { .. } | TufError::DatastoreInit { .. } | TufError::DatastoreOpen { .. } | TufError::DatastoreSerialize { .. } => {
                return FetchError::failed("disk", message);
            }
            _ => "verification_failed",
        };
        FetchError::refused(reason, message)
    }
}

/// Where a device fetches releases from and keeps what it fetched.
#[derive(Debug, Clone)]
pub struct Source {
    /// The repository's address: `metadata/` and `targets/` below it.
    pub base_url: Url,
    /// The `root.json` the device shipped with.
    pub root: PathBuf,
    /// Where tough remembers the newest metadata it trusted (rollback protection).
    pub datastore: PathBuf,
    /// Downloads in progress (resumed after a restart) and fetched releases.
    pub staging: PathBuf,
    /// The most one release may weigh, all files together.
    pub max_release_bytes: u64,
    /// A PEM CA certificate to trust for the repository (a private CA), besides the system's.
    pub ca: Option<PathBuf>,
}

/// A release fetched and verified: its files under their own names in `dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub release: Release,
    pub dir: PathBuf,
    /// Bytes that came over the network this time (less than the release after a resume).
    pub downloaded: u64,
}

/// Bytes done and in all, for progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// Fetch release `release` of `task` into `source.staging`, verified end to end.
pub async fn fetch(source: &Source, task: &str, release: u64, progress: Arc<Progress>) -> Result<Fetched, FetchError> {
    let root = std::fs::read(&source.root).map_err(|e| FetchError::disk(&source.root, e))?;
    let partial_dir = source.staging.join("partial");
    std::fs::create_dir_all(&partial_dir).map_err(|e| FetchError::disk(&partial_dir, e))?;
    std::fs::create_dir_all(&source.datastore).map_err(|e| FetchError::disk(&source.datastore, e))?;
    let join = |dir: &str| source.base_url.join(dir).map_err(|e| FetchError::failed("bad_url", format!("{}{dir}: {e}", source.base_url)));
    let (metadata_url, targets_url) = (join("metadata/")?, join("targets/")?);
    let counted = Arc::new(AtomicU64::new(0));
    let transport = ResumingHttp::new(targets_url.clone(), partial_dir.clone(), counted.clone(), progress.clone(), source.ca.as_deref())?;
    let repo = RepositoryLoader::new(&root, metadata_url, targets_url)
        .transport(transport)
        .datastore(&source.datastore)
        .load()
        .await
        .map_err(|e| FetchError::from_tuf(&e))?;

    // The release's targets, as the signed metadata describes them.
    let mut files: Vec<(TargetName, u64, String)> = Vec::new();
    let mut signed: Option<Release> = None;
    for (name, target) in &repo.targets().signed.targets {
        let Some(r) = target.custom.get("adaptd").and_then(|v| serde_json::from_value::<Release>(v.clone()).ok()) else { continue };
        if r.task == task && r.release == release {
            if signed.as_ref().is_some_and(|s| s != &r) {
                return Err(FetchError::refused("inconsistent_release", format!("the files of {task} release {release} disagree on what the release is")));
            }
            // Where the transport keeps its bytes: the content-addressed name it is served under.
            files.push((name.clone(), target.length, format!("{}.{}", hex::encode(&target.hashes.sha256), name.raw())));
            signed = Some(r);
        }
    }
    let Some(signed) = signed else {
        return Err(FetchError::refused("no_such_release", format!("{task} release {release} is not in the signed release list (never published, or yanked)")));
    };
    let total: u64 = files.iter().map(|(_, n, _)| n).sum();
    if total > source.max_release_bytes {
        return Err(FetchError::refused(
            "too_large",
            format!("{task} release {release} is {total} bytes; this device takes at most {}", source.max_release_bytes),
        ));
    }
    progress.total.store(total, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);

    let dir = source.staging.join(format!("{task}.r{release}"));
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::disk(&dir, e))?;
    files.sort_by(|a, b| a.0.raw().cmp(b.0.raw()));
    for (name, _, kept) in &files {
        let kept = partial_dir.join(kept);
        let plain = name.raw().strip_prefix(&format!("{task}.r{release}.")).unwrap_or(name.raw()).to_string();
        // Bytes kept from an interrupted download that do not add up (a crash can leave a torn
        // tail) cost one download from the start, not the release.
        let resuming = kept.exists();
        match read_target(&repo, name, &kept, &dir, &plain).await {
            Err(e) if resuming && e.refused => {
                tracing::warn!(target = name.raw(), error = %e, "the bytes kept from an interrupted download do not verify; downloading it again");
                read_target(&repo, name, &kept, &dir, &plain).await?;
            }
            other => other?,
        }
    }
    Ok(Fetched { release: signed, dir, downloaded: counted.load(Ordering::Relaxed) })
}

/// One target into `dir/plain`, verified by tough as it streams; the transport keeps its bytes
/// in `kept` as they arrive, dropped once the file is whole, or when they do not verify.
async fn read_target(repo: &tough::Repository, name: &TargetName, kept: &Path, dir: &Path, plain: &str) -> Result<(), FetchError> {
    let io = |e: std::io::Error| FetchError::disk(dir, e);
    let stream = repo.read_target(name).await.map_err(|e| FetchError::from_tuf(&e))?;
    let Some(mut stream) = stream else {
        return Err(FetchError::refused("no_such_release", format!("{} vanished from the signed list", name.raw())));
    };
    let mut file = tempfile_in(dir).map_err(io)?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            let _ = std::fs::remove_file(kept);
            FetchError::from_tuf(&e)
        })?;
        file.write_all(&chunk).map_err(io)?;
    }
    file.as_file().sync_all().map_err(io)?;
    file.persist(dir.join(plain)).map_err(|e| io(e.error))?;
    let _ = std::fs::remove_file(kept);
    Ok(())
}

fn tempfile_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::NamedTempFile::new_in(dir)
}

/// HTTP(S) for tough that resumes target downloads: a target's bytes are kept in `partial/`
/// under its content-addressed name as they arrive, and a later fetch of the same URL replays
/// them and asks the server only for the rest.
#[derive(Debug, Clone)]
struct ResumingHttp {
    client: reqwest::Client,
    targets: Url,
    partial: PathBuf,
    /// Bytes that came over the network.
    counted: Arc<AtomicU64>,
    progress: Arc<Progress>,
}

impl ResumingHttp {
    fn new(targets: Url, partial: PathBuf, counted: Arc<AtomicU64>, progress: Arc<Progress>, ca: Option<&Path>) -> Result<ResumingHttp, FetchError> {
        // The process's TLS provider, if nothing chose one yet (an error means one is set).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| FetchError::failed("tls", format!("{}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| FetchError::failed("tls", format!("{}: not a PEM certificate: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| FetchError::failed("http", e.to_string()))?;
        Ok(ResumingHttp { client, targets, partial, counted, progress })
    }
}

fn transport_error(kind: TransportErrorKind, url: &Url, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TransportError {
    TransportError::new_with_cause(kind, url.clone(), e)
}

#[tough::async_trait]
impl Transport for ResumingHttp {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(TransportError::new(TransportErrorKind::UnsupportedUrlScheme, url));
        }
        let other = |e: std::io::Error| transport_error(TransportErrorKind::Other, &url, e);
        // Metadata is small and must be current: fetched whole. Targets are named by their hash.
        let keep = url
            .as_str()
            .starts_with(self.targets.as_str())
            .then(|| url.path_segments().and_then(|mut s| s.next_back()).map(|n| self.partial.join(n)))
            .flatten();
        let have = keep.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
        let mut request = self.client.get(url.clone());
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = request.send().await.map_err(|e| transport_error(TransportErrorKind::Other, &url, e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
        }
        if !status.is_success() {
            return Err(transport_error(TransportErrorKind::Other, &url, format!("HTTP {status}")));
        }
        let resumed = have > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
        let (counted, progress) = (self.counted.clone(), self.progress.clone());
        let body_url = url.clone();
        let body = response.bytes_stream().map_err(move |e| transport_error(TransportErrorKind::Other, &body_url, e));
        let Some(keep) = keep else {
            return Ok(body.boxed());
        };
        // The bytes kept from before (if the server resumes), then the network's, each kept too.
        let replay: Vec<u8> = if resumed { std::fs::read(&keep).map_err(other)? } else { Vec::new() };
        progress.done.fetch_add(replay.len() as u64, Ordering::Relaxed);
        let mut file = std::fs::OpenOptions::new().create(true).write(true).append(resumed).truncate(!resumed).open(&keep).map_err(other)?;
        let keep_url = url.clone();
        let network = body.and_then(move |chunk| {
            let written = file.write_all(&chunk).map(|_| chunk).map_err(|e| transport_error(TransportErrorKind::Other, &keep_url, e));
            if let Ok(c) = &written {
                counted.fetch_add(c.len() as u64, Ordering::Relaxed);
                progress.done.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
            std::future::ready(written)
        });
        let replayed = futures::stream::iter((!replay.is_empty()).then(|| Ok(bytes::Bytes::from(replay))));
        Ok(replayed.chain(network).boxed())
    }
}
