//! Fleet learning on the operator's side: devices' offers of one task, trained from the same parent
//! on the same base, combined into one adapter (`adaptd fleet aggregate`), which is then published
//! as an ordinary release and meets every device's own gate. The arithmetic is
//! `adaptd_adapters::aggregate`; this module picks what may be combined and says why not.

use std::collections::BTreeMap;

use adaptd_adapters::aggregate::{self, AggregateError, HeadPart, Rule};
use adaptd_adapters::files::{AdapterManifest, AggregatedOffer, Aggregation, BaseRef, LoraInfo, ReftInfo, SampleCounts};
use adaptd_adapters::{Adapter, AdapterKind, Bundle, Head};
use adaptd_protocol::fleet::Offer;

#[derive(Debug, thiserror::Error)]
pub enum FleetAggregateError {
    #[error("offer {offer}: {reason}")]
    Refused { offer: String, reason: String },
    #[error("{0}")]
    Combine(#[from] AggregateError),
    #[error("the aggregate does not fit the bundle: {0}")]
    Fit(String),
    #[error("publishing the aggregate: {0}")]
    Publish(String),
    #[error("parent release {release}: {reason}")]
    ParentRelease { release: u64, reason: String },
}

impl FleetAggregateError {
    pub fn error_type(&self) -> &'static str {
        match self {
            FleetAggregateError::Refused { .. } => "refused",
            FleetAggregateError::Combine(e) => e.error_type(),
            FleetAggregateError::Fit(_) => "fit",
            FleetAggregateError::Publish(_) => "publish",
            FleetAggregateError::ParentRelease { .. } => "parent_release",
        }
    }
}

/// What the devices trained from: a release's adapter, or the bundle's base model.
pub struct Parent {
    pub release: Option<u64>,
    pub head: Head,
    pub labels: Vec<String>,
}

impl Parent {
    /// The base model as parent: the bundle's own classifier and labels.
    pub fn base(bundle: &Bundle) -> Result<Parent, FleetAggregateError> {
        let head = bundle.base_head().map_err(|e| FleetAggregateError::Fit(e.to_string()))?;
        let (Some(head), Some(labels)) = (head, bundle.manifest.labels.clone()) else {
            return Err(FleetAggregateError::Fit(format!("bundle {} has no base classifier to start heads from", bundle.manifest.name)));
        };
        Ok(Parent { release: None, head, labels })
    }

    pub fn release(release: u64, adapter: &Adapter) -> Parent {
        Parent { release: Some(release), head: adapter.head.clone(), labels: adapter.manifest.labels.clone() }
    }

    /// The base model (`release` None), or release `release` of `task` read verified from the
    /// repository on this disk through `scratch`, a directory removed afterwards.
    pub async fn read(
        bundle: &Bundle,
        repo: &std::path::Path,
        task: &str,
        release: Option<u64>,
        scratch: &std::path::Path,
    ) -> Result<Parent, FleetAggregateError> {
        let Some(release) = release else { return Parent::base(bundle) };
        let failed = |reason: String| FleetAggregateError::ParentRelease { release, reason };
        let _ = std::fs::remove_dir_all(scratch);
        std::fs::create_dir_all(scratch).map_err(|e| failed(format!("{}: {e}", scratch.display())))?;
        let read = adaptd_fleet::repo::read_release(repo, task, release, scratch).await;
        let adapter = read.map_err(|e| e.to_string()).and_then(|_| Adapter::read_dir(scratch).map_err(|e| e.to_string()));
        let _ = std::fs::remove_dir_all(scratch);
        Ok(Parent::release(release, &adapter.map_err(failed)?))
    }
}

/// From `found` (an offers directory's listing, newest first): the newest offer of each device
/// for `task` trained from `parent`, of every device (in the listing's order) or of `devices`
/// (in their order).
pub fn newest_offers(found: &[(Offer, std::path::PathBuf)], task: &str, parent: Option<u64>, devices: Option<&[String]>) -> Vec<(Offer, std::path::PathBuf)> {
    let wanted = |o: &Offer| o.task == task && o.parent_release == parent;
    match devices {
        Some(devices) => devices.iter().filter_map(|d| found.iter().find(|(o, _)| &o.device == d && wanted(o)).cloned()).collect(),
        None => {
            let mut seen = std::collections::BTreeSet::new();
            found.iter().filter(|(o, _)| wanted(o) && seen.insert(o.device.clone())).cloned().collect()
        }
    }
}

/// How to combine.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// None: `cat` when the stacked ranks fit the bundle's `rank_max`, else `svd` to `rank_max`.
    pub rule: Option<Rule>,
    /// `svd` fits above this relative residual are refused.
    pub max_residual: f64,
    /// A device's weight counts at most this many training samples (None: no cap).
    pub cap: Option<u64>,
}

/// Combine `offers` (each with its adapter, as read from the offer's directory) into one adapter
/// for `task` that serves on `bundle`, numbered `version`. Refuses an offer of another task, base,
/// kind or parent, naming it.
pub fn aggregate(
    task: &str,
    version: u64,
    bundle: &Bundle,
    parent: &Parent,
    offers: &[(Offer, Adapter)],
    options: Options,
) -> Result<Adapter, FleetAggregateError> {
    let Some((first, first_adapter)) = offers.first() else { return Err(AggregateError::Empty.into()) };
    for (offer, adapter) in offers {
        let refuse = |reason: String| Err(FleetAggregateError::Refused { offer: adaptd_fleet::offer::offer_name(offer), reason });
        let m = &adapter.manifest;
        if offer.task != task || m.task != task {
            return refuse(format!("it is for task {:?}, not {task:?}", m.task));
        }
        if m.base.manifest_sha256 != bundle.manifest_sha256 || offer.base_sha256 != bundle.manifest_sha256 {
            return refuse(format!(
                "trained on another base model ({} {}), not {} {}",
                m.base.name, m.base.version, bundle.manifest.name, bundle.manifest.version
            ));
        }
        if m.kind != first_adapter.manifest.kind {
            return refuse(format!("a {} adapter; {} offered a {}", m.kind.name(), adaptd_fleet::offer::offer_name(first), first_adapter.manifest.kind.name()));
        }
        if offer.parent_release != parent.release {
            return refuse(format!("trained from {}, not from {}", release_name(offer.parent_release), release_name(parent.release)));
        }
        if m.lora.as_ref().map(|l| &l.target_modules) != first_adapter.manifest.lora.as_ref().map(|l| &l.target_modules) {
            return refuse("its LoRA targets other modules".into());
        }
        // Shapes and ranks as the bundle's slots allow, before any arithmetic sizes buffers by them.
        if let Err(e) = adapter.check_fits(bundle) {
            return refuse(e.to_string());
        }
    }
    let samples: Vec<u64> = offers.iter().map(|(o, _)| options.cap.map_or(o.samples.train, |cap| o.samples.train.min(cap))).collect();
    let weights = aggregate::normalise(&samples.iter().map(|&n| n as f64).collect::<Vec<_>>())?;

    let by_label: Vec<BTreeMap<String, u64>> = offers.iter().map(|(o, a)| samples_per_label(o, a)).collect();
    let parts: Vec<HeadPart<'_>> = offers
        .iter()
        .zip(&by_label)
        .map(|((_, adapter), counts)| HeadPart { head: &adapter.head, labels: &adapter.manifest.labels, samples_per_label: counts })
        .collect();
    let (head, labels) = aggregate::combine_heads((&parent.head, &parent.labels), &parts)?;

    let mut reft = None;
    let (lora, rule, modules) = match first_adapter.manifest.kind {
        AdapterKind::Head => (None, "heads".to_string(), Vec::new()),
        AdapterKind::Loreft => {
            let parts: Vec<_> = offers
                .iter()
                .zip(&weights)
                .map(|((o, a), &w)| {
                    a.reft.as_ref().map(|r| (r, w)).ok_or_else(|| FleetAggregateError::Refused {
                        offer: adaptd_fleet::offer::offer_name(o),
                        reason: "a LoReFT adapter without LoReFT weights".into(),
                    })
                })
                .collect::<Result<_, _>>()?;
            let rank_max = bundle.manifest.reft.as_ref().map_or(0, |r| r.rank_max);
            reft = Some(aggregate::combine_reft(&parts, rank_max)?);
            // Exact: the stacked edit is the weighted sum of the devices' edits.
            (None, "stack".to_string(), Vec::new())
        }
        AdapterKind::Lora => {
            let loras: Vec<_> = offers
                .iter()
                .map(|(o, a)| {
                    a.lora.as_ref().ok_or_else(|| FleetAggregateError::Refused {
                        offer: adaptd_fleet::offer::offer_name(o),
                        reason: "a LoRA adapter without LoRA weights".into(),
                    })
                })
                .collect::<Result<_, _>>()?;
            let rank_max = bundle.manifest.lora.rank_max;
            let rule = options.rule.unwrap_or_else(|| Rule::exact_if_it_fits(&loras.iter().map(|l| l.rank).collect::<Vec<_>>(), rank_max));
            let parts: Vec<_> = loras.iter().copied().zip(weights.iter().copied()).collect();
            let (lora, fits) = aggregate::combine_lora(&parts, rule, rank_max, Some(options.max_residual))?;
            if lora.rank > rank_max {
                return Err(FleetAggregateError::Fit(format!("rule {} gives rank {}, over the bundle's rank_max {rank_max}", rule.name(), lora.rank)));
            }
            (Some(lora), rule.name().to_string(), fits)
        }
    };
    let residual = modules.iter().map(|m| m.residual).fold(0.0, f64::max);
    let mut counts = SampleCounts::default();
    for ((offer, _), per_label) in offers.iter().zip(&by_label) {
        counts.train += offer.samples.train;
        counts.validation += offer.samples.validation;
        counts.holdout += offer.samples.holdout;
        for (label, n) in per_label {
            *counts.train_by_label.entry(label.clone()).or_insert(0) += n;
        }
    }
    let manifest = AdapterManifest {
        format: first_adapter.manifest.format,
        task: task.to_string(),
        version,
        kind: first_adapter.manifest.kind,
        labels,
        lora: lora.as_ref().map(|l| LoraInfo { rank: l.rank, alpha: l.alpha, target_modules: l.modules.iter().map(|m| m.module.clone()).collect() }),
        reft: reft.as_ref().map(|r| ReftInfo { rank: r.rank, positions: r.positions, modules: r.modules.iter().map(|m| m.module.clone()).collect() }),
        base: BaseRef::of(bundle),
        parent_version: None,
        metrics: BTreeMap::new(),
        samples: counts,
        created_unix_ms: crate::events::now_ms(),
        decision: None,
        promoted_unix_ms: None,
        base_routing: false,
        aggregate: Some(Aggregation {
            rule,
            parent_release: parent.release,
            offers: offers
                .iter()
                .zip(weights.iter().zip(&samples))
                .map(|((o, _), (&weight, &train_samples))| AggregatedOffer { device: o.device.clone(), version: o.version, weight, train_samples })
                .collect(),
            residual,
            modules,
        }),
        files: BTreeMap::new(),
    };
    let adapter = Adapter { manifest, head, lora, reft };
    adapter.check_fits(bundle).map_err(|e| FleetAggregateError::Fit(e.to_string()))?;
    Ok(adapter)
}

/// Sign `adapter` into the repository as `release`: its files exactly as `adapters export` writes
/// them (hashes in adapter.json). Returns the release as signed and its target names.
pub async fn publish(
    adapter: &Adapter,
    release: u64,
    parent: Option<u64>,
    allow_force: bool,
    keys: &std::path::Path,
    repo: &std::path::Path,
    expiry: adaptd_fleet::repo::Expiry,
) -> Result<(adaptd_fleet::repo::Release, Vec<String>), FleetAggregateError> {
    let staging = repo.join(format!(".incoming-{}-{release}", std::process::id()));
    let failed = |e: &dyn std::fmt::Display| FleetAggregateError::Publish(e.to_string());
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| failed(&e))?;
    let written = adapter.write_dir(&staging).map_err(|e| failed(&e)).and_then(|manifest| {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&staging).map_err(|e| failed(&e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        Ok((manifest, files))
    });
    let result = match written {
        Ok((manifest, files)) => {
            let info = adaptd_fleet::repo::Release {
                task: manifest.task.clone(),
                release,
                kind: manifest.kind.name().into(),
                base_sha256: manifest.base.manifest_sha256.clone(),
                parent,
                allow_force,
            };
            adaptd_fleet::repo::publish(keys, repo, &info, &files, expiry).await.map(|names| (info, names)).map_err(|e| failed(&e))
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The fleet release an adapter descends from: the nearest version up its parent chain that was
/// installed from a release (its `fleet_release` figure). None: trained from the base model, or
/// the chain is broken by pruned versions.
pub fn fleet_parent(store: &adaptd_adapters::AdapterStore, manifest: &AdapterManifest) -> Option<u64> {
    let mut parent = manifest.parent_version;
    for _ in 0..64 {
        let m = store.read_manifest(&manifest.task, parent?).ok()?;
        if let Some(release) = m.metrics.get("fleet_release") {
            return Some(*release as u64);
        }
        parent = m.parent_version;
    }
    None
}

/// An offer's training samples per label; an older offer without them counts all its training
/// samples for each label its adapter has.
fn samples_per_label(offer: &Offer, adapter: &Adapter) -> BTreeMap<String, u64> {
    if !offer.samples.train_by_label.is_empty() {
        return offer.samples.train_by_label.clone();
    }
    adapter.manifest.labels.iter().map(|l| (l.clone(), offer.samples.train)).collect()
}

fn release_name(release: Option<u64>) -> String {
    release.map_or_else(|| "the base model".to_string(), |r| format!("release {r}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_offer_of_each_device_from_the_parent_is_chosen() {
        let offer = |device: &str, version: u64, parent: Option<u64>| {
            let o = Offer {
                device: device.into(),
                task: "sorter".into(),
                version,
                kind: "lora".into(),
                base_sha256: String::new(),
                parent_release: parent,
                metrics: BTreeMap::new(),
                samples: SampleCounts::default(),
                offered_ms: 0,
            };
            (o, std::path::PathBuf::from(format!("{device}.v{version}")))
        };
        // Newest first, as the offers directory lists them.
        let found = vec![offer("b", 9, Some(1)), offer("a", 3, None), offer("c", 2, None), offer("a", 1, None)];
        let names = |chosen: Vec<(Offer, std::path::PathBuf)>| chosen.into_iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>();
        assert_eq!(names(newest_offers(&found, "sorter", None, None)), ["a.v3", "c.v2"]);
        assert_eq!(names(newest_offers(&found, "sorter", None, Some(&["c".into(), "a".into(), "b".into()]))), ["c.v2", "a.v3"]);
        assert_eq!(names(newest_offers(&found, "sorter", Some(1), None)), ["b.v9"]);
        assert!(newest_offers(&found, "picker", None, None).is_empty());
    }
}
