//! Fleet learning in rounds (`adaptd fleet learn`), on the operator's machine: each round rolls
//! the current release out with the `train` policy (every device scores it on its own data, then
//! trains on from it and offers what it learned), waits for the devices' offers naming that
//! release, aggregates them into the next release, and goes on. The last release then rolls out
//! with the devices' own gate (`validate`). Each step is a rollout the controller runs as always;
//! the rounds' figures are saved (atomically) after every step.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use adaptd_adapters::Bundle;
use adaptd_adapters::files::AggregatedOffer;
use adaptd_fleet::controller::{FailureThreshold, Plan, Rollout};
use adaptd_fleet::repo::Expiry;
use adaptd_protocol::fleet::{AgentState, Offer, Policy};
use serde::{Deserialize, Serialize};

use super::aggregate::{self, FleetAggregateError, Options, Parent, aggregate, publish};
use crate::events::now_ms;
use crate::mqtt::BrokerConnection;

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Aggregate(#[from] FleetAggregateError),
    #[error(transparent)]
    Controller(#[from] super::controller::ControllerError),
    #[error("round {round}: {reason}")]
    Round { round: usize, reason: String },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

impl LearnError {
    pub fn error_type(&self) -> &'static str {
        match self {
            LearnError::Aggregate(e) => e.error_type(),
            LearnError::Controller(e) => e.error_type(),
            LearnError::Round { .. } => "round",
            LearnError::Io { .. } => "io",
        }
    }
}

/// What `fleet learn` is asked to do.
pub struct LearnPlan {
    pub task: String,
    pub rounds: usize,
    pub devices: Vec<String>,
    /// The release the first round trains on from; None: the devices' offers trained from the
    /// base model are aggregated into it first (round 0).
    pub parent: Option<u64>,
    pub offers_dir: PathBuf,
    pub bundle: Bundle,
    pub options: Options,
    pub keys: PathBuf,
    pub repo: PathBuf,
    /// Each round's rollout state and the report (`learn.json`) go here.
    pub state_dir: PathBuf,
    /// How long a round waits for the devices' offers once they scored the release.
    pub offer_timeout: Duration,
    /// A device that has not ended a rollout this long after its assignment has failed.
    pub device_timeout: Duration,
    /// How the last release rolls out (`validate`: each device's own gate).
    pub final_policy: Policy,
    pub expiry: Expiry,
}

/// One device in a round: how it scored the round's release, and what it offered back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRound {
    pub device: String,
    pub state: Option<AgentState>,
    /// The release's holdout accuracy on this device, and what it served.
    pub release_accuracy: Option<f64>,
    pub serving_accuracy: Option<f64>,
    /// The version it offered after training on from the release, and its holdout accuracy.
    pub offered_version: Option<u64>,
    pub offered_accuracy: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: usize,
    /// The release the devices trained from (None in round 0: the base model).
    pub parent: Option<u64>,
    /// The release made from their offers.
    pub release: u64,
    pub rule: String,
    pub residual: f64,
    pub offers: Vec<AggregatedOffer>,
    pub devices: Vec<DeviceRound>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LearnReport {
    pub task: String,
    pub rounds: Vec<RoundReport>,
    /// The last release's rollout under the final policy: each device's end.
    pub final_release: Option<u64>,
    pub final_devices: Vec<DeviceRound>,
}

/// Run the rounds, then the final rollout. `on_step` sees the report after every step.
pub async fn learn(
    plan: &LearnPlan,
    broker: BrokerConnection,
    prefix: &str,
    mut on_step: impl FnMut(&LearnReport),
    shutdown: impl Future<Output = ()>,
) -> Result<LearnReport, LearnError> {
    tokio::pin!(shutdown);
    std::fs::create_dir_all(&plan.state_dir).map_err(|e| LearnError::Io { path: plan.state_dir.clone(), reason: e.to_string() })?;
    let mut report = LearnReport { task: plan.task.clone(), ..LearnReport::default() };
    let mut parent = plan.parent;
    if parent.is_none() {
        let offers = offers_from(plan, None)?;
        let (release, round) = combine(plan, 0, None, &offers).await?;
        report.rounds.push(RoundReport { devices: offered(&offers, &plan.devices), ..round });
        save(plan, &report)?;
        on_step(&report);
        parent = Some(release);
    }
    for round in 1..=plan.rounds {
        let Some(from) = parent else { break };
        let rollout = roll_out(plan, from, Policy::Train, &format!("round-{round}"), broker.clone(), prefix, &mut shutdown).await?;
        // Each device that scored the release trains on from it and offers the result.
        let scored: Vec<String> = rollout.devices.iter().filter(|(_, p)| p.state == Some(AgentState::Scored)).map(|(d, _)| d.clone()).collect();
        if scored.is_empty() {
            return Err(LearnError::Round { round, reason: format!("no device scored release {from}: {}", rollout.table()) });
        }
        let deadline = Instant::now() + plan.offer_timeout;
        let offers = loop {
            let offers = offers_from(plan, Some(from))?;
            if scored.iter().all(|d| offers.iter().any(|(o, _)| &o.device == d)) || Instant::now() >= deadline {
                break offers;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(report),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        };
        if offers.is_empty() {
            return Err(LearnError::Round {
                round,
                reason: format!("no device offered an adapter trained from release {from} within {:?}", plan.offer_timeout),
            });
        }
        let (release, mut summary) = combine(plan, round, Some(from), &offers).await?;
        summary.devices = devices_of(&rollout, &plan.devices, &offers);
        report.rounds.push(summary);
        save(plan, &report)?;
        on_step(&report);
        parent = Some(release);
    }
    if let Some(last) = parent {
        let rollout = roll_out(plan, last, plan.final_policy, "final", broker, prefix, &mut shutdown).await?;
        report.final_release = Some(last);
        report.final_devices = devices_of(&rollout, &plan.devices, &[]);
        save(plan, &report)?;
        on_step(&report);
    }
    Ok(report)
}

/// The newest whole offer of each of the plan's devices that was trained from `parent`.
fn offers_from(plan: &LearnPlan, parent: Option<u64>) -> Result<Vec<(Offer, adaptd_adapters::Adapter)>, LearnError> {
    let found = adaptd_fleet::offer::list(&plan.offers_dir).map_err(|e| LearnError::Io { path: plan.offers_dir.clone(), reason: e.to_string() })?.found;
    let mut chosen = Vec::new();
    for (offer, dir) in aggregate::newest_offers(&found, &plan.task, parent, Some(&plan.devices)) {
        match adaptd_adapters::Adapter::read_dir(&dir) {
            Ok(adapter) => chosen.push((offer, adapter)),
            Err(e) => tracing::warn!(device = offer.device, error = %e, "fleet learn: an offer cannot be read; left out"),
        }
    }
    Ok(chosen)
}

/// Aggregate `offers` into the next release and publish it.
async fn combine(plan: &LearnPlan, round: usize, parent: Option<u64>, offers: &[(Offer, adaptd_adapters::Adapter)]) -> Result<(u64, RoundReport), LearnError> {
    let scratch = plan.state_dir.join(format!(".release-{}", parent.unwrap_or(0)));
    let parent_of = Parent::read(&plan.bundle, &plan.repo, &plan.task, parent, &scratch).await?;
    let release =
        adaptd_fleet::repo::next_release(&plan.repo, &plan.task).await.map_err(|e| LearnError::Io { path: plan.repo.clone(), reason: e.to_string() })?;
    let combined = aggregate(&plan.task, release, &plan.bundle, &parent_of, offers, plan.options)?;
    publish(&combined, release, parent, false, &plan.keys, &plan.repo, plan.expiry).await?;
    let provenance = combined.manifest.aggregate.clone().unwrap_or_else(|| adaptd_adapters::files::Aggregation {
        rule: String::new(),
        parent_release: parent,
        offers: Vec::new(),
        residual: 0.0,
        modules: Vec::new(),
    });
    let report = RoundReport { round, parent, release, rule: provenance.rule, residual: provenance.residual, offers: provenance.offers, devices: Vec::new() };
    Ok((release, report))
}

/// Roll `release` out to every device in one wave under `policy`, followed to its end.
async fn roll_out(
    plan: &LearnPlan,
    release: u64,
    policy: Policy,
    name: &str,
    broker: BrokerConnection,
    prefix: &str,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Rollout, LearnError> {
    let state = plan.state_dir.join(format!("{name}.json"));
    // A state left by an interrupted run of this step goes on from where it was.
    if !state.exists() {
        let rollout_plan = Plan {
            id: format!("{}-learn-{name}-r{release}-{}", plan.task, now_ms() / 1000),
            task: plan.task.clone(),
            release,
            policy,
            rollback: false,
            waves: vec![plan.devices.clone()],
            success_percent: 0.0,
            // A device that refuses or fails is reported, not a reason to stop the round.
            failures: FailureThreshold { count: None, percent: None, min_executed: usize::MAX },
            device_timeout_ms: plan.device_timeout.as_millis() as u64,
            per_minute: None,
            base_sha256: Some(plan.bundle.manifest_sha256.clone()),
        };
        super::controller::save(&state, &Rollout::new(rollout_plan, Default::default()))?;
    }
    let rollout = super::controller::run(&state, broker, prefix, |_| {}, shutdown.as_mut()).await?;
    Ok(rollout)
}

fn offered(offers: &[(Offer, adaptd_adapters::Adapter)], devices: &[String]) -> Vec<DeviceRound> {
    devices
        .iter()
        .map(|d| {
            let offer = offers.iter().find(|(o, _)| &o.device == d).map(|(o, _)| o);
            DeviceRound {
                device: d.clone(),
                state: None,
                release_accuracy: None,
                serving_accuracy: None,
                offered_version: offer.map(|o| o.version),
                offered_accuracy: offer.and_then(|o| o.metrics.get("holdout_accuracy").copied()),
            }
        })
        .collect()
}

fn devices_of(rollout: &Rollout, devices: &[String], offers: &[(Offer, adaptd_adapters::Adapter)]) -> Vec<DeviceRound> {
    offered(offers, devices)
        .into_iter()
        .map(|mut d| {
            if let Some(p) = rollout.devices.get(&d.device) {
                (d.state, d.release_accuracy, d.serving_accuracy) = (p.state, p.candidate_accuracy, p.incumbent_accuracy);
            }
            d
        })
        .collect()
}

fn save(plan: &LearnPlan, report: &LearnReport) -> Result<(), LearnError> {
    let path = plan.state_dir.join("learn.json");
    let bytes = serde_json::to_vec_pretty(report).map_err(|e| LearnError::Io { path: path.clone(), reason: e.to_string() })?;
    adaptd_adapters::fsutil::write_atomic(&path, &bytes).map_err(|e| LearnError::Io { path, reason: e.to_string() })
}

impl LearnReport {
    /// The rounds as a table: per round the release made, and per device how it scored the
    /// round's parent release against what it served, and what its offer reached.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for r in &self.rounds {
            let parent = r.parent.map_or_else(|| "the base model".to_string(), |p| format!("release {p}"));
            out += &format!("round {}: {} offers from {parent} -> release {} ({}, residual {:.4})\n", r.round, r.offers.len(), r.release, r.rule, r.residual);
            for d in &r.devices {
                let pct = |a: Option<f64>| a.map_or("    -".to_string(), |a| format!("{:5.1}", 100.0 * a));
                out += &format!(
                    "  {:<17} {:<10} parent {} vs serving {}  offered v{} at {}\n",
                    d.device,
                    d.state.map_or("-".to_string(), |s| format!("{s:?}").to_lowercase()),
                    pct(d.release_accuracy),
                    pct(d.serving_accuracy),
                    d.offered_version.map_or("-".to_string(), |v| v.to_string()),
                    pct(d.offered_accuracy)
                );
            }
        }
        if let Some(release) = self.final_release {
            out += &format!("final: release {release}\n");
            for d in &self.final_devices {
                out += &format!("  {:<17} {}\n", d.device, d.state.map_or("-".to_string(), |s| format!("{s:?}").to_lowercase()));
            }
        }
        out
    }
}
