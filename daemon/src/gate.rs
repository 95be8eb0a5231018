//! The validation gate: a candidate adapter is promoted only on evidence.
//!
//! Pure functions over figures the adapt loop gathers (engine predictions on holdout samples
//! the trainer never saw, the bundle's retention set, a probe against the base model, and the
//! trainer's own outputs for parity). Every check is reported with its figures, passed or not,
//! so a decision can be read, logged, published and kept in the adapter's manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::traffic::RetentionPolicy;
pub use adaptd_protocol::gate::{Check, ClassMetrics, Decision, Evidence, Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    Accuracy,
    MacroF1,
    /// Both must clear the margin.
    Both,
}

/// The gate's thresholds, and the rollback watch's after a promotion: the `[gate]` section of
/// the configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GateConfig {
    pub metric: GateMetric,
    /// The candidate must beat the incumbent by at least this much (0.01 = one point).
    pub min_improvement: f64,
    /// Retention-set accuracy may fall by at most this much below the better of the incumbent's
    /// and the base model's (while the traffic still shows the base domain: see `retention`).
    pub max_retention_drop: f64,
    /// Whose forgetting the retention check guards against: the traffic's (default), always
    /// the base domain's, or nobody's.
    pub retention: RetentionPolicy,
    /// With the traffic policy: the whole bound holds while at least this share of the traffic
    /// looks like the base domain, and fades to none as the share goes to zero.
    pub retention_min_share: f64,
    /// Scores must move by at least this much somewhere on the probe set versus the base model.
    pub min_probe_change: f32,
    /// Largest allowed |engine − trainer| difference of any score.
    pub parity_tolerance: f32,
    /// Fewer holdout samples than this: no decision can be trusted, the candidate is refused.
    pub min_holdout: usize,
    /// After a promotion, fresh labels judge the new adapter against the one it replaced.
    #[serde(flatten)]
    pub watch: WatchLimits,
}

/// When the rollback watch judges a promoted adapter.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct WatchLimits {
    /// Compare old and new on at least this many fresh samples before judging...
    #[serde(rename = "watch_min_samples")]
    pub min_samples: u64,
    /// ... roll back if the new one is worse by more than this ...
    pub rollback_drop: f64,
    /// ... and stop watching after this many.
    #[serde(rename = "watch_max_samples")]
    pub max_samples: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            metric: GateMetric::Accuracy,
            min_improvement: 0.0,
            max_retention_drop: 0.02,
            retention: RetentionPolicy::Traffic,
            retention_min_share: 0.1,
            min_probe_change: 1e-4,
            parity_tolerance: 1e-3,
            min_holdout: 10,
            watch: WatchLimits { min_samples: 30, rollback_drop: 0.05, max_samples: 500 },
        }
    }
}

/// Accuracy, macro-F1 and per-class figures of predicted label names against true ones.
pub fn metrics(truth: &[&str], predicted: &[&str]) -> Metrics {
    let n = truth.len().min(predicted.len());
    let mut per_class: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new(); // (tp, fp, fn)
    let mut correct = 0;
    for (t, p) in truth.iter().zip(predicted).take(n) {
        if t == p {
            correct += 1;
            per_class.entry(t.to_string()).or_default().0 += 1;
        } else {
            per_class.entry(p.to_string()).or_default().1 += 1;
            per_class.entry(t.to_string()).or_default().2 += 1;
        }
    }
    let mut out = BTreeMap::new();
    let mut f1_sum = 0.0;
    let mut present = 0;
    for (label, (tp, fp, fn_)) in per_class {
        let support = tp + fn_;
        let precision = if tp + fp > 0 { tp as f64 / (tp + fp) as f64 } else { 0.0 };
        let recall = if support > 0 { tp as f64 / support as f64 } else { 0.0 };
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        if support > 0 {
            f1_sum += f1;
            present += 1;
            out.insert(label, ClassMetrics { precision, recall, f1, support });
        }
    }
    Metrics {
        accuracy: if n > 0 { correct as f64 / n as f64 } else { 0.0 },
        macro_f1: if present > 0 { f1_sum / present as f64 } else { 0.0 },
        samples: n,
        per_class: out,
    }
}

pub fn decide(e: &Evidence, cfg: &GateConfig) -> Decision {
    let mut checks = Vec::new();
    let mut check = |name: &str, passed: bool, detail: String| checks.push(Check { name: name.into(), passed, detail });

    check("holdout_size", e.candidate.samples >= cfg.min_holdout, format!("{} holdout samples (at least {} needed)", e.candidate.samples, cfg.min_holdout));
    let margin = |name: &str, cand: f64, inc: f64| {
        (
            cand >= inc + cfg.min_improvement,
            format!("{name} {:.4} vs incumbent {:.4} (margin {:+.4}, required {:+.4})", cand, inc, cand - inc, cfg.min_improvement),
        )
    };
    let (acc_ok, acc_detail) = margin("accuracy", e.candidate.accuracy, e.incumbent.accuracy);
    let (f1_ok, f1_detail) = margin("macro-F1", e.candidate.macro_f1, e.incumbent.macro_f1);
    match cfg.metric {
        GateMetric::Accuracy => check("beats_incumbent", acc_ok, acc_detail),
        GateMetric::MacroF1 => check("beats_incumbent", f1_ok, f1_detail),
        GateMetric::Both => check("beats_incumbent", acc_ok && f1_ok, format!("{acc_detail}; {f1_detail}")),
    }
    let allowed = crate::traffic::allowed_retention_drop(cfg.retention, cfg.max_retention_drop, cfg.retention_min_share, e.base_traffic_share.map(|(s, _)| s));
    let traffic = match (cfg.retention, e.base_traffic_share) {
        (RetentionPolicy::Traffic, Some((share, n))) => format!("; {:.0} % of the last {n} inputs look like the base domain", share * 100.0),
        (RetentionPolicy::Traffic, None) => "; the traffic's share of base-domain inputs is unknown".into(),
        (RetentionPolicy::Base, _) => "; policy: always the base domain".into(),
        (RetentionPolicy::Off, _) => String::new(),
    };
    match (e.retention, allowed) {
        (Some((before, after)), Some(allowed)) => check(
            "retention",
            after >= before - allowed,
            format!(
                "base-domain accuracy {after:.4} vs {before:.4}, the better of incumbent and base model (drop {:.4}, at most {allowed:.4} allowed{traffic})",
                before - after
            ),
        ),
        (Some((before, after)), None) => {
            check("retention", true, format!("base-domain accuracy {after:.4} vs {before:.4}: not checked (gate.retention = \"off\")"))
        }
        (None, _) => check("retention", true, "no retention set for this task: not checked".into()),
    }
    check("finite", e.finite, if e.finite { "every output finite".into() } else { "non-finite outputs".into() });
    check(
        "changes_output",
        e.probe_change >= cfg.min_probe_change,
        format!("scores move by up to {:.2e} versus the base model (at least {:.0e} required)", e.probe_change, cfg.min_probe_change),
    );
    check(
        "engine_trainer_parity",
        e.parity_max_diff <= cfg.parity_tolerance,
        format!("engine and trainer scores differ by up to {:.2e} (at most {:.0e})", e.parity_max_diff, cfg.parity_tolerance),
    );
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.passed).collect();
    let promote = failed.is_empty();
    let summary = if promote {
        format!(
            "promoted: accuracy {:.4} -> {:.4}, macro-F1 {:.4} -> {:.4}",
            e.incumbent.accuracy, e.candidate.accuracy, e.incumbent.macro_f1, e.candidate.macro_f1
        )
    } else {
        format!("rejected: {}", failed.iter().map(|c| format!("{} ({})", c.name, c.detail)).collect::<Vec<_>>().join("; "))
    };
    Decision { promote, summary, checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(cand_acc: &[(&str, &str)], inc_acc: &[(&str, &str)]) -> Evidence {
        let m = |pairs: &[(&str, &str)]| {
            let (t, p): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
            metrics(&t, &p)
        };
        Evidence {
            candidate: m(cand_acc),
            incumbent: m(inc_acc),
            retention: Some((0.95, 0.94)),
            base_traffic_share: Some((1.0, 256)),
            base_routed: None,
            finite: true,
            probe_change: 0.3,
            parity_max_diff: 1e-6,
        }
    }

    #[test]
    fn metrics_count_per_class() {
        let m = metrics(&["a", "a", "b", "c"], &["a", "b", "b", "a"]);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.per_class["a"].support, 2);
        assert_eq!(m.per_class["a"].precision, 0.5);
        assert_eq!(m.per_class["b"].recall, 1.0);
        assert_eq!(m.per_class["c"].f1, 0.0);
        assert!((m.macro_f1 - (0.5 + 2.0 / 3.0 + 0.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn promotes_a_better_candidate_and_names_every_failed_check() {
        let cfg = GateConfig { min_holdout: 2, ..GateConfig::default() };
        let good = evidence(&[("a", "a"), ("b", "b")], &[("a", "a"), ("b", "a")]);
        let d = decide(&good, &cfg);
        assert!(d.promote, "{}", d.summary);
        assert!(d.checks.iter().all(|c| c.passed));

        let mut bad = good.clone();
        bad.candidate = bad.incumbent.clone();
        bad.incumbent.accuracy = 0.9;
        bad.retention = Some((0.95, 0.80));
        bad.finite = false;
        bad.probe_change = 0.0;
        bad.parity_max_diff = 0.5;
        let d = decide(&bad, &cfg);
        assert!(!d.promote);
        for name in ["beats_incumbent", "retention", "finite", "changes_output", "engine_trainer_parity"] {
            assert!(d.checks.iter().any(|c| c.name == name && !c.passed), "{name}: {:?}", d.checks);
            assert!(d.summary.contains(name), "{}", d.summary);
        }
    }

    #[test]
    fn the_retention_bound_follows_the_traffic() {
        let cfg = GateConfig { min_holdout: 2, ..GateConfig::default() };
        let mut e = evidence(&[("a", "a"), ("b", "b")], &[("a", "a"), ("b", "a")]);
        e.retention = Some((0.99, 0.54));
        let retention = |e: &Evidence, cfg: &GateConfig| decide(e, cfg).checks.into_iter().find(|c| c.name == "retention").unwrap();
        for (share, passes) in [(1.0, false), (0.3, false), (0.0, true)] {
            e.base_traffic_share = Some((share, 256));
            let c = retention(&e, &cfg);
            assert_eq!(c.passed, passes, "share {share}: {}", c.detail);
            assert!(c.detail.contains(&format!("{:.0} %", share * 100.0)), "{}", c.detail);
        }
        let base = GateConfig { retention: RetentionPolicy::Base, ..cfg.clone() };
        assert!(!retention(&e, &base).passed, "the base policy ignores the traffic");
        let off = GateConfig { retention: RetentionPolicy::Off, ..cfg };
        assert!(retention(&e, &off).passed);
    }

    #[test]
    fn too_few_holdout_samples_refuse() {
        let d = decide(&evidence(&[("a", "a")], &[("a", "b")]), &GateConfig::default());
        assert!(!d.promote);
        assert!(d.summary.contains("holdout_size"), "{}", d.summary);
    }
}
