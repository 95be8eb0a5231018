//! Adapters up from the devices: a device offers an adapter (its files and an `offer.json` with
//! its figures and sample counts, never a sample) by HTTP `PUT` into a directory the operator
//! reviews (nginx's WebDAV module, an object store's upload URL), and the operator lists the
//! offers there and publishes the good ones as releases.

use std::path::{Path, PathBuf};

use adaptd_protocol::fleet::Offer;

#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error("{url}: {reason}")]
    Upload { url: String, reason: String },
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

impl OfferError {
    pub fn error_type(&self) -> &'static str {
        match self {
            OfferError::Upload { .. } => "upload",
            OfferError::Read { .. } => "read",
        }
    }
}

/// The directory name an offer gets: `<device>.<task>.v<version>`.
pub fn offer_name(offer: &Offer) -> String {
    format!("{}.{}.v{}", offer.device, offer.task, offer.version)
}

/// `PUT` the adapter's `files` (name, bytes) and then `offer.json` under `base/<offer name>/`.
/// `offer.json` goes last: an offer whose `offer.json` is there is whole. A `file:` base is a
/// directory (a shared mount): the offer is written beside it and renamed into place whole.
pub async fn upload(base: &url::Url, offer: &Offer, files: &[(String, Vec<u8>)]) -> Result<url::Url, OfferError> {
    if base.scheme() == "file" {
        return write_into(base, offer, files);
    }
    let dir = base.join(&format!("{}/", offer_name(offer))).map_err(|e| OfferError::Upload { url: base.to_string(), reason: e.to_string() })?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| OfferError::Upload { url: dir.to_string(), reason: e.to_string() })?;
    let manifest = serde_json::to_vec_pretty(offer).map_err(|e| OfferError::Upload { url: dir.to_string(), reason: e.to_string() })?;
    for (name, bytes) in files.iter().map(|(n, b)| (n.as_str(), b.clone())).chain(std::iter::once(("offer.json", manifest))) {
        let url = dir.join(name).map_err(|e| OfferError::Upload { url: dir.to_string(), reason: e.to_string() })?;
        let response = client.put(url.clone()).body(bytes).send().await.map_err(|e| OfferError::Upload { url: url.to_string(), reason: e.to_string() })?;
        if !response.status().is_success() {
            return Err(OfferError::Upload { url: url.to_string(), reason: format!("HTTP {}", response.status()) });
        }
    }
    Ok(dir)
}

fn write_into(base: &url::Url, offer: &Offer, files: &[(String, Vec<u8>)]) -> Result<url::Url, OfferError> {
    let root = base.to_file_path().map_err(|_| OfferError::Upload { url: base.to_string(), reason: "not a local directory".into() })?;
    let name = offer_name(offer);
    let (partial, whole) = (root.join(format!(".{name}.partial-{}", std::process::id())), root.join(&name));
    let fail = |path: &Path, e: std::io::Error| OfferError::Upload { url: path.display().to_string(), reason: e.to_string() };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| fail(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| fail(&partial, e))?;
    let manifest = serde_json::to_vec_pretty(offer).map_err(|e| OfferError::Upload { url: base.to_string(), reason: e.to_string() })?;
    for (file, bytes) in files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).chain(std::iter::once(("offer.json", manifest.as_slice()))) {
        let path = partial.join(file);
        std::fs::File::create(&path).and_then(|mut f| std::io::Write::write_all(&mut f, bytes).and_then(|()| f.sync_all())).map_err(|e| fail(&path, e))?;
    }
    // An offer made again replaces the old one whole.
    if whole.exists() {
        std::fs::remove_dir_all(&whole).map_err(|e| fail(&whole, e))?;
    }
    std::fs::rename(&partial, &whole).map_err(|e| fail(&whole, e))?;
    url::Url::from_directory_path(&whole).map_err(|_| OfferError::Upload { url: whole.display().to_string(), reason: "not an absolute path".into() })
}

/// What an offers directory holds.
#[derive(Debug, Default)]
pub struct Offers {
    /// Each whole offer and the directory it lives in, newest first.
    pub found: Vec<(Offer, PathBuf)>,
    /// The `offer.json` files that could not be read, and why.
    pub unreadable: Vec<String>,
}

/// The whole offers in `dir` (each a directory with an `offer.json`).
pub fn list(dir: &Path) -> Result<Offers, OfferError> {
    let entries = std::fs::read_dir(dir).map_err(|e| OfferError::Read { path: dir.to_path_buf(), reason: e.to_string() })?;
    let (mut offers, mut bad) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let path = entry.path().join("offer.json");
        if !path.exists() {
            continue;
        }
        match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Offer>(&b).map_err(|e| e.to_string())) {
            Ok(offer) => offers.push((offer, entry.path())),
            Err(e) => bad.push(format!("{}: {e}", path.display())),
        }
    }
    offers.sort_by_key(|o| std::cmp::Reverse(o.0.offered_ms));
    Ok(Offers { found: offers, unreadable: bad })
}
