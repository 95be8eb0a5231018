//! Crash-safe file writes. Everything adaptd reads at boot is written here: to a temporary name
//! in the same directory, fsynced, renamed over the target, and the directory fsynced, so a power
//! cut leaves either the old file or the new one, never a torn one. Errors name their file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

pub fn at(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError { path: path.to_path_buf(), source }
}

pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(at(&tmp))?;
        f.write_all(bytes).map_err(at(&tmp))?;
        f.sync_all().map_err(at(&tmp))?;
        fs::rename(&tmp, path).map_err(at(path))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write a file inside a staging directory (no rename needed: the directory is published whole).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut f = File::create(path).map_err(at(path))?;
    f.write_all(bytes).map_err(at(path))?;
    f.sync_all().map_err(at(path))
}

/// Publish a fully written, fsynced staging directory under its final name in one rename.
pub fn publish_dir(staging: &Path, target: &Path) -> Result<(), FsError> {
    fsync_dir(staging)?;
    fs::rename(staging, target).map_err(at(target))?;
    fsync_dir(target.parent().unwrap_or(Path::new(".")))
}
