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
    /// Fewer holdout samples than this: an accuracy margin alone is not trusted...
    pub min_holdout: usize,
    /// ... but a candidate is still judged when its wins over the incumbent on the samples there
    /// are, are this unlikely by chance (one-sided exact sign test on the paired answers; 0 turns
    /// this off): a device with few labels gets a clear improvement, not nothing.
    pub small_holdout_p: f64,
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
            small_holdout_p: 0.05,
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

    let clear_win = e.paired.map(|(wins, losses)| (wins, losses, sign_test_p(wins, losses)));
    match clear_win {
        _ if e.candidate.samples >= cfg.min_holdout => {
            check("holdout_size", true, format!("{} holdout samples (at least {})", e.candidate.samples, cfg.min_holdout))
        }
        Some((wins, losses, p)) if wins > losses && p <= cfg.small_holdout_p => check(
            "holdout_size",
            true,
            format!(
                "{} holdout samples, fewer than {}, but a clear win: right on {wins} the incumbent gets wrong, wrong on {losses} it gets right (sign test p = {p:.3}, at most {})",
                e.candidate.samples, cfg.min_holdout, cfg.small_holdout_p
            ),
        ),
        Some((wins, losses, p)) => check(
            "holdout_size",
            false,
            format!(
                "{} holdout samples (at least {} needed, or a clear win: right on {wins} the incumbent gets wrong, wrong on {losses} it gets right, sign test p = {p:.3} above {})",
                e.candidate.samples, cfg.min_holdout, cfg.small_holdout_p
            ),
        ),
        None => check("holdout_size", false, format!("{} holdout samples (at least {} needed)", e.candidate.samples, cfg.min_holdout)),
    }
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

/// The discordant pairs of two sets of answers to the same samples: (right only in
/// `candidate`, right only in `incumbent`).
pub fn paired(truth: &[&str], candidate: &[&str], incumbent: &[&str]) -> (usize, usize) {
    truth.iter().zip(candidate).zip(incumbent).fold((0, 0), |(wins, losses), ((t, c), i)| match (c == t, i == t) {
        (true, false) => (wins + 1, losses),
        (false, true) => (wins, losses + 1),
        _ => (wins, losses),
    })
}

/// One-sided exact sign test: the chance of `wins` or more among `wins + losses` discordant
/// pairs were each a fair coin (1 when there are none).
pub fn sign_test_p(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    // C(n, k) / 2^n summed for k >= wins, in logs so a large holdout does not overflow.
    let ln_choose = |k: usize| -> f64 { (1..=k).map(|i| ((n - k + i) as f64).ln() - (i as f64).ln()).sum() };
    let tail: f64 = (wins..=n).map(|k| (ln_choose(k) - n as f64 * std::f64::consts::LN_2).exp()).sum();
    tail.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(cand_acc: &[(&str, &str)], inc_acc: &[(&str, &str)]) -> Evidence {
        let m = |pairs: &[(&str, &str)]| {
            let (t, p): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
            metrics(&t, &p)
        };
        let truth: Vec<&str> = cand_acc.iter().map(|p| p.0).collect();
        let (cand, inc): (Vec<&str>, Vec<&str>) = (cand_acc.iter().map(|p| p.1).collect(), inc_acc.iter().map(|p| p.1).collect());
        Evidence {
            candidate: m(cand_acc),
            incumbent: m(inc_acc),
            paired: Some(paired(&truth, &cand, &inc)),
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
        assert!(d.summary.contains("holdout_size") && d.summary.contains("p = 0.500"), "{}", d.summary);
        let mut unpaired = evidence(&[("a", "a")], &[("a", "b")]);
        unpaired.paired = None;
        assert!(!decide(&unpaired, &GateConfig::default()).promote, "without paired answers only the count can decide");
    }

    #[test]
    fn the_sign_test_is_the_binomial_tail() {
        assert_eq!(sign_test_p(0, 0), 1.0);
        assert!((sign_test_p(5, 0) - 1.0 / 32.0).abs() < 1e-12);
        assert!((sign_test_p(4, 0) - 1.0 / 16.0).abs() < 1e-12);
        // P(X >= 6 | n = 7) = (7 + 1) / 128.
        assert!((sign_test_p(6, 1) - 8.0 / 128.0).abs() < 1e-12);
        assert!((sign_test_p(0, 3) - 1.0).abs() < 1e-12);
        assert!(sign_test_p(400, 300) < 1e-4 && sign_test_p(400, 300).is_finite(), "large holdouts stay finite");
    }

    #[test]
    fn a_small_holdout_passes_on_a_clear_win_only() {
        let cfg = GateConfig::default();
        // 6 samples: the candidate right on 5 the incumbent gets wrong and wrong on none.
        let truth = ["a", "b", "a", "b", "a", "b"];
        let pairs = |pred: [&'static str; 6]| -> Vec<(&'static str, &'static str)> { truth.iter().copied().zip(pred).collect() };
        let clear = evidence(&pairs(["a", "b", "a", "b", "a", "a"]), &pairs(["b", "a", "b", "a", "b", "a"]));
        assert_eq!(clear.paired, Some((5, 0)));
        let d = decide(&clear, &cfg);
        assert!(d.promote, "{}", d.summary);
        let size = d.checks.iter().find(|c| c.name == "holdout_size").unwrap();
        assert!(size.detail.contains("a clear win") && size.detail.contains("p = 0.031"), "{}", size.detail);
        // 4 wins of 4: p = 1/16, not clear enough at 0.05; nor is anything with 0 turning it off.
        let four = evidence(&pairs(["a", "b", "a", "b", "b", "a"]), &pairs(["b", "a", "b", "a", "b", "a"]));
        assert_eq!(four.paired, Some((4, 0)));
        assert!(!decide(&four, &cfg).promote);
        assert!(!decide(&clear, &GateConfig { small_holdout_p: 0.0, ..cfg.clone() }).promote);
        // A clear win still has to pass every other check.
        let mut forgets = clear.clone();
        forgets.retention = Some((0.99, 0.5));
        let d = decide(&forgets, &cfg);
        assert!(!d.promote && d.summary.contains("retention") && !d.summary.contains("holdout_size"), "{}", d.summary);
    }
}
