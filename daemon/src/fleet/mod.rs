//! Fleet rollout in the daemon: the device agent (`agent`), a handler on the device's MQTT link,
//! and the rollout controller's loop (`controller`), which `adaptd fleet rollout` runs on the
//! operator's machine. Their decisions are pure state machines in `adaptd_fleet`.

pub mod agent;
pub mod controller;

use std::path::PathBuf;

use serde::Deserialize;

pub use agent::{AgentParts, run, subscribe};

/// `[fleet]`: where releases come from. Off while `repository` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The signed repository's address (`metadata/` and `targets/` below it), http or https.
    pub repository: String,
    /// The repository's root of trust, as `adaptd fleet init` wrote it.
    pub root_file: PathBuf,
    /// The most one release may weigh, all files together.
    pub max_release_mb: u64,
}

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.repository.is_empty()
    }

    /// The repository's address as a base URL (with its trailing `/`).
    pub fn base_url(&self) -> Result<url::Url, String> {
        let text = if self.repository.ends_with('/') { self.repository.clone() } else { format!("{}/", self.repository) };
        let url = url::Url::parse(&text).map_err(|e| format!("{:?}: {e}", self.repository))?;
        match url.scheme() {
            "http" | "https" => Ok(url),
            other => Err(format!("{:?}: the scheme must be http or https, not {other}", self.repository)),
        }
    }
}
