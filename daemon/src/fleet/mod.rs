//! Fleet rollout in the daemon: the device agent (`agent`), a handler on the device's MQTT link,
//! and the rollout controller's loop (`controller`), which `adaptd fleet rollout` runs on the
//! operator's machine. Their decisions are pure state machines in `adaptd_fleet`.

pub mod agent;
pub mod aggregate;
pub mod controller;
pub mod learn;

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
    /// A PEM CA certificate for an HTTPS repository behind a private CA (empty: the system's
    /// CA store alone).
    pub ca_file: PathBuf,
    /// The most one release may weigh, all files together.
    pub max_release_mb: u64,
    /// When releases may be installed, `HH:MM-HH:MM` in UTC (it may wrap past midnight);
    /// empty: any time. Outside it an assignment waits, `deferred`.
    pub maintenance_window: String,
    /// Where this device offers what it trains in a fleet-learning round (`train` policy): an
    /// HTTP upload directory (WebDAV `PUT`) or a directory on a shared mount; empty: it trains
    /// and keeps the result if its gate passes it, but offers nothing.
    pub offers: String,
}

impl FleetConfig {
    /// `offers` as a base URL (a plain path becomes a `file:` URL); None when empty.
    pub fn offers_url(&self) -> Result<Option<url::Url>, String> {
        offers_location(&self.offers)
    }

    pub fn enabled(&self) -> bool {
        !self.repository.is_empty()
    }

    /// The maintenance window as minutes of the day, [from, to); None: any time.
    pub fn window(&self) -> Result<Option<(u32, u32)>, String> {
        if self.maintenance_window.trim().is_empty() {
            return Ok(None);
        }
        let bad = || format!("{:?}: expected HH:MM-HH:MM (UTC)", self.maintenance_window);
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (from, to) = self.maintenance_window.split_once('-').ok_or_else(bad)?;
        let (from, to) = (minutes(from).ok_or_else(bad)?, minutes(to).ok_or_else(bad)?);
        if from == to {
            return Err(format!("{:?}: an empty window", self.maintenance_window));
        }
        Ok(Some((from, to)))
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

/// Where offers go: an http(s) upload URL, a `file:` URL or an absolute directory path (a shared
/// mount), as a base URL with its trailing `/`; None when empty.
pub fn offers_location(text: &str) -> Result<Option<url::Url>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let with_slash = if text.ends_with('/') { text.to_string() } else { format!("{text}/") };
    match url::Url::parse(&with_slash) {
        Ok(url) if matches!(url.scheme(), "http" | "https" | "file") => Ok(Some(url)),
        Ok(url) => Err(format!("{text:?}: the scheme must be http, https or file, not {}", url.scheme())),
        Err(_) if std::path::Path::new(text).is_absolute() => {
            url::Url::from_directory_path(text).map(Some).map_err(|()| format!("{text:?}: not a directory path"))
        }
        Err(e) => Err(format!("{text:?}: neither a URL nor an absolute directory path ({e})")),
    }
}

/// An offer's files: name and bytes, `offer.json` not among them.
pub type OfferFiles = Vec<(String, Vec<u8>)>;

/// `adapter` as an offer from `device`: the files exactly as `adapters export` writes them
/// (written into `staging`, which is removed after) and the figures that go with them, never a
/// sample.
pub fn offer_of(
    adapter: &adaptd_adapters::Adapter,
    device: &str,
    parent_release: Option<u64>,
    staging: &std::path::Path,
) -> Result<(adaptd_protocol::fleet::Offer, OfferFiles), String> {
    let files = (|| -> Result<OfferFiles, String> {
        let _ = std::fs::remove_dir_all(staging);
        std::fs::create_dir_all(staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        let written = adapter.write_dir(staging).map_err(|e| e.to_string())?;
        let mut files = Vec::new();
        for name in written.files.keys().map(String::as_str).chain(["adapter.json"]) {
            let path = staging.join(name);
            files.push((name.to_string(), std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?));
        }
        Ok(files)
    })();
    let _ = std::fs::remove_dir_all(staging);
    let m = &adapter.manifest;
    let offer = adaptd_protocol::fleet::Offer {
        device: device.to_string(),
        task: m.task.clone(),
        version: m.version,
        kind: m.kind.name().into(),
        base_sha256: m.base.manifest_sha256.clone(),
        parent_release,
        metrics: m.metrics.clone(),
        samples: m.samples.clone(),
        offered_ms: crate::events::now_ms(),
    };
    Ok((offer, files?))
}

/// Whether `minute` of the day (UTC) falls in the window [from, to), which may wrap midnight.
pub fn in_window((from, to): (u32, u32), minute: u32) -> bool {
    if from < to { (from..to).contains(&minute) } else { minute >= from || minute < to }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: &str) -> FleetConfig {
        FleetConfig {
            repository: String::new(),
            root_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            max_release_mb: 1,
            maintenance_window: window.into(),
            offers: String::new(),
        }
    }

    #[test]
    fn maintenance_windows_parse_and_wrap_past_midnight() {
        assert_eq!(config("").window().unwrap(), None);
        assert_eq!(config("02:00-04:30").window().unwrap(), Some((120, 270)));
        let night = config("23:00-01:00").window().unwrap().unwrap();
        assert!(in_window(night, 23 * 60 + 30) && in_window(night, 30) && !in_window(night, 60) && !in_window(night, 12 * 60));
        for bad in ["2-4", "25:00-01:00", "02:00-02:00", "02:00"] {
            assert!(config(bad).window().is_err(), "{bad}");
        }
    }

    #[test]
    fn offers_go_to_an_upload_url_or_a_directory() {
        let offers = |text: &str| FleetConfig { offers: text.into(), ..config("") }.offers_url();
        assert_eq!(offers("").unwrap(), None);
        assert_eq!(offers("https://fleet.example/offers").unwrap().unwrap().as_str(), "https://fleet.example/offers/");
        assert_eq!(offers("/mnt/fleet/offers").unwrap().unwrap().as_str(), "file:///mnt/fleet/offers/");
        assert!(offers("ftp://x/").unwrap_err().contains("scheme"));
        assert!(offers("offers").unwrap_err().contains("absolute"));
    }
}
