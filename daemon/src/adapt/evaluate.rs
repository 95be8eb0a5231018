//! Everything the loop asks of the serving engine: predictions of stored samples and model
//! inputs, cached embeddings, the base-domain detector and the traffic's share of base-domain
//! inputs, and the gate's evidence about a candidate.

use std::sync::{Arc, Mutex};

use adaptd_adapters::bundle::RetentionSet;
use adaptd_adapters::files::Adapter;
use adaptd_adapters::tensor::HostTensor;

use super::dataset::{BaseDomain, PseudoRows, model_inputs};
use super::{AdaptConfig, AdaptError, Context, as_refs, lock};
use crate::engine::{Prediction, concat_inputs};
use crate::gate::{self, Decision, Evidence};
use crate::labels::pseudo::{Judged as PseudoJudged, PseudoSummary, choose as choose_pseudo_labels};
use crate::labels::suspects::neighbour_vote;
use crate::registry::Serving;
use crate::samples::{SampleStore, Split, StoredSample};
use crate::traffic::{BaseDomainDetector, Observed};

const EVAL_CHUNK: usize = 64;

/// Predictions of `serving` for every sample, through the engine in chunks (serving goes first
/// between chunks).
pub(super) async fn predict_samples(ctx: &Context, serving: &Arc<Serving>, samples: &[&StoredSample]) -> Result<Vec<Prediction>, AdaptError> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(EVAL_CHUNK) {
        let inputs = model_inputs(ctx.text.as_deref(), &ctx.registry.bundle().manifest, chunk)?;
        out.extend(ctx.engine.evaluate(serving.clone(), inputs).await?);
    }
    Ok(out)
}

/// The same for model inputs (rows along the first axis).
pub(super) async fn predict_inputs(ctx: &Context, serving: &Arc<Serving>, inputs: &[HostTensor]) -> Result<Vec<Prediction>, AdaptError> {
    let rows = inputs.first().map_or(0, |t| t.shape[0]);
    let mut out = Vec::with_capacity(rows);
    for start in (0..rows).step_by(EVAL_CHUNK) {
        let end = (start + EVAL_CHUNK).min(rows);
        let chunk: Vec<HostTensor> = inputs.iter().map(|t| t.rows(start, end)).collect();
        out.extend(ctx.engine.evaluate(serving.clone(), chunk).await?);
    }
    Ok(out)
}

/// Cache the base model's embeddings of new samples (head training never runs the backbone).
pub(super) async fn fill_embeddings(ctx: &Context, store: &Mutex<SampleStore>, task: &str) -> Result<(), AdaptError> {
    let base = ctx.registry.base(task);
    // Bounded per tick, so a backlog never starves the rest of the loop.
    for _ in 0..16 {
        let missing = lock(store).missing_embeddings(task, 256)?;
        if missing.is_empty() {
            return Ok(());
        }
        let refs: Vec<&StoredSample> = missing.iter().collect();
        let predictions = predict_samples(ctx, &base, &refs).await?;
        let rows: Vec<(i64, Vec<f32>)> = missing.iter().zip(predictions).filter_map(|(s, p)| Some((s.id, p.embedding?))).collect();
        lock(store).set_embeddings(&rows)?;
    }
    Ok(())
}

/// The retention set's rows through the base model.
pub(super) async fn embed_retention(ctx: &Context, task: &str, replay: &RetentionSet) -> Result<Vec<Vec<f32>>, AdaptError> {
    let predictions = predict_inputs(ctx, &ctx.registry.base(task), &replay.inputs).await?;
    predictions.into_iter().map(|p| p.embedding.ok_or_else(|| AdaptError::Data("the base model gave no embedding".into()))).collect()
}

/// The retention set seen through the base model (`embeddings`, one per row), as the
/// base-domain detector learns it.
pub(super) fn base_domain_detector(retention: &RetentionSet, embeddings: &[Vec<f32>]) -> Option<BaseDomainDetector> {
    let observed: Vec<Observed> = embeddings.iter().enumerate().map(|(i, e)| Observed::new(e.clone(), &row_of(&retention.inputs, i))).collect();
    BaseDomainDetector::from_retention(&observed)
}

fn row_of(inputs: &[HostTensor], i: usize) -> Vec<HostTensor> {
    inputs.iter().map(|t| t.rows(i, i + 1)).collect()
}

/// The share of base-domain inputs among the task's latest requests, or, when it has served
/// too few, among its latest samples' inputs (their labels unused); and how many were seen.
pub(super) async fn base_traffic_share(
    ctx: &Context,
    store: &Mutex<SampleStore>,
    task: &str,
    detector: &BaseDomainDetector,
) -> Result<Option<(f64, usize)>, AdaptError> {
    let mut rows = ctx.traffic.rows(task);
    if rows.len() < crate::traffic::MIN_TRAFFIC_ROWS {
        let latest = lock(store).latest(task, crate::traffic::TRAFFIC_ROWS)?;
        let refs: Vec<&StoredSample> = latest.iter().collect();
        rows = Vec::with_capacity(refs.len());
        for chunk in refs.chunks(EVAL_CHUNK) {
            let inputs = model_inputs(ctx.text.as_deref(), &ctx.registry.bundle().manifest, chunk)?;
            rows.extend((0..chunk.len()).map(|i| row_of(&inputs, i)));
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let base = ctx.registry.base(task);
    let mut observed = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(EVAL_CHUNK) {
        let inputs = concat_inputs(chunk.iter().map(Vec::as_slice));
        let predictions = ctx.engine.evaluate(base.clone(), inputs).await?;
        for (p, row) in predictions.into_iter().zip(chunk) {
            observed.push(Observed::new(p.embedding.ok_or_else(|| AdaptError::Data("the base model gave no embedding".into()))?, row));
        }
    }
    Ok(Some((detector.share(&observed), observed.len())))
}

/// Fewer recent inputs than this: no pseudo-labels (too little traffic to learn from).
pub(super) const MIN_PSEUDO_TRAFFIC: usize = 32;

/// The task's recent traffic as `teacher` labels it, kept where the teacher is sure and the
/// labelled samples' neighbours agree (see `crate::labels::pseudo`); None when there is too
/// little traffic or nothing qualifies. Rows the teacher routed to the base model are left out:
/// the teacher did not answer them.
pub(super) async fn pseudo_labelled(
    ctx: &Context,
    store: &Mutex<SampleStore>,
    task: &str,
    teacher: &Arc<Serving>,
    labels: &crate::labels::LabelsConfig,
) -> Result<Option<(PseudoRows, PseudoSummary)>, AdaptError> {
    let rows = ctx.traffic.rows(task);
    if rows.len() < MIN_PSEUDO_TRAFFIC {
        return Ok(None);
    }
    let inputs = concat_inputs(rows.iter().map(Vec::as_slice));
    let taught = predict_inputs(ctx, teacher, &inputs).await?;
    let based = predict_inputs(ctx, &ctx.registry.base(task), &inputs).await?;
    let embeddings: Vec<Vec<f32>> =
        based.into_iter().map(|p| p.embedding.ok_or_else(|| AdaptError::Data("the base model gave no embedding".into()))).collect::<Result<_, _>>()?;
    let dim = ctx.registry.bundle().manifest.embedding_dim;
    let classes: Vec<&str> = teacher.labels.iter().map(String::as_str).collect();
    let class_of = |label: &str| classes.iter().position(|c| *c == label);
    // The labelled training samples, per class of the teacher, and as the neighbours' reference.
    let labelled = lock(store).load_trusted(task, Split::Train)?;
    let mut counts = vec![0usize; classes.len()];
    let (mut reference, mut reference_labels) = (Vec::new(), Vec::new());
    for s in &labelled {
        let Some(c) = class_of(&s.sample.label) else { continue };
        counts[c] += 1;
        if let Some(e) = s.embedding.as_ref().filter(|e| e.len() == dim) {
            reference.extend_from_slice(e);
            reference_labels.push(c);
        }
    }
    let policy = labels.pseudo_policy();
    let votes = if policy.agreement {
        let queries: Vec<f32> = embeddings.iter().flat_map(|e| e.iter().copied()).collect();
        let (search, n_classes) = (labels.suspect_search(), classes.len());
        tokio::task::spawn_blocking(move || {
            crate::background_priority();
            neighbour_vote(&reference, &reference_labels, &queries, dim, n_classes, &search)
        })
        .await
        .map_err(|e| AdaptError::Data(format!("the neighbour vote stopped: {e}")))?
    } else {
        vec![None; taught.len()]
    };
    let judged: Vec<PseudoJudged> = taught
        .iter()
        .zip(&votes)
        .map(|(p, &neighbours)| PseudoJudged {
            teacher: if p.base_routed { None } else { class_of(p.label()).map(|c| (c, p.scores.get(p.class_index).copied().unwrap_or(0.0))) },
            neighbours,
        })
        .collect();
    let (chosen, summary) = choose_pseudo_labels(&judged, &counts, &policy);
    if chosen.is_empty() {
        return Ok(Some((PseudoRows { inputs: Vec::new(), embeddings: Vec::new(), labels: Vec::new() }, summary)));
    }
    let picked: Vec<Vec<HostTensor>> = chosen.iter().map(|&(row, _)| rows[row].clone()).collect();
    let pseudo = PseudoRows {
        inputs: concat_inputs(picked.iter().map(Vec::as_slice)),
        embeddings: chosen.iter().map(|&(row, _)| embeddings[row].clone()).collect(),
        labels: chosen.iter().map(|&(_, c)| classes[c].to_string()).collect(),
    };
    Ok(Some((pseudo, summary)))
}

/// A candidate as the gate saw it: the adapter (routed or not), what was measured, the decision.
pub(super) struct Judged {
    pub adapter: Adapter,
    pub evidence: Evidence,
    pub decision: Decision,
    /// What the evaluation chose (routing, or why not), for the job's notes.
    pub notes: Vec<String>,
}

/// Measure `adapter` against the `incumbent` through the serving engine (holdout samples the
/// trainer never saw, the base domain's check rows, a probe against the base model and the
/// trainer's own outputs) and decide. Refused only for forgetting a base domain the device
/// still sees, it is measured again routed (base-like rows answered by the base model) and
/// decided on that.
pub(super) async fn judge(
    ctx: &Context,
    config: &AdaptConfig,
    store: &Mutex<SampleStore>,
    incumbent: &Arc<Serving>,
    mut adapter: Adapter,
    base_domain: &BaseDomain,
) -> Result<Judged, AdaptError> {
    let mut notes = Vec::new();
    let task = &config.task;
    let bundle = ctx.registry.bundle();
    let labels = adapter.manifest.labels.clone();
    let candidate = ctx.registry.preview(adapter.clone())?;

    // Holdout: samples the trainer never saw (neither gradients nor early stopping), less those
    // whose labels are doubted (a wrong label would score a right answer wrong).
    let mut holdout = lock(store).load_trusted(task, Split::Holdout)?;
    if holdout.len() > config.max_eval_samples {
        holdout.drain(..holdout.len() - config.max_eval_samples);
    }
    let holdout_refs: Vec<&StoredSample> = holdout.iter().collect();
    let truth: Vec<&str> = holdout.iter().map(|s| s.sample.label.as_str()).collect();
    let (cand_pred, inc_pred) = if holdout.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (predict_samples(ctx, &candidate, &holdout_refs).await?, predict_samples(ctx, incumbent, &holdout_refs).await?)
    };
    let names = |p: &[Prediction]| p.iter().map(|p| p.label().to_string()).collect::<Vec<String>>();
    let (cand_names, inc_names) = (names(&cand_pred), names(&inc_pred));
    let cand_metrics = gate::metrics(&truth, &as_refs(&cand_names));
    let inc_metrics = gate::metrics(&truth, &as_refs(&inc_names));
    let paired = Some(gate::paired(&truth, &as_refs(&cand_names), &as_refs(&inc_names)));
    let finite = cand_pred.iter().all(|p| p.scores.iter().all(|x| x.is_finite())) && adapter.head.validate(bundle.manifest.embedding_dim, labels.len()).is_ok();

    // Retention: the base domain, where the task's labels are the bundle's.
    let base_labels = bundle.manifest.labels.clone().unwrap_or_default();
    let retention_check = &base_domain.check;
    let retention_applies =
        !retention_check.is_empty() && retention_check.labels.iter().all(|&l| base_labels.get(l as usize).is_some_and(|n| labels.contains(n)));
    let retention_truth: Vec<&str> =
        if retention_applies { retention_check.labels.iter().map(|&l| base_labels[l as usize].as_str()).collect() } else { Vec::new() };
    let retention_accuracy = async |serving: &Arc<Serving>| -> Result<f64, AdaptError> {
        Ok(gate::metrics(&retention_truth, &as_refs(&names(&predict_inputs(ctx, serving, &retention_check.inputs).await?))).accuracy)
    };
    let retention = if retention_applies {
        let cand = retention_accuracy(&candidate).await?;
        let inc = retention_accuracy(incumbent).await?;
        // Against the better of the incumbent and the base model: measured only against the
        // incumbent, forgetting could pile up a little more with every version.
        let base = if incumbent.version == 0 { inc } else { retention_accuracy(&ctx.registry.base(task)).await? };
        Some((inc.max(base), cand))
    } else {
        None
    };

    // Probe: a few holdout rows against the base model, and against the trainer's own forward
    // pass. (Without holdout rows the gate refuses on holdout size anyway.)
    let probe_rows: Vec<&StoredSample> = holdout_refs.iter().take(32).copied().collect();
    let (probe_change, parity_max_diff) = if probe_rows.is_empty() {
        (0.0, 0.0)
    } else {
        let inputs = model_inputs(ctx.text.as_deref(), &ctx.registry.bundle().manifest, &probe_rows)?;
        // The probe rows are the first holdout rows: the candidate's answers are already in hand.
        let cand = &cand_pred[..probe_rows.len()];
        let base = ctx.engine.evaluate(ctx.registry.base(task), inputs.clone()).await?;
        let mut change = 0.0f32;
        for (c, b) in cand.iter().zip(&base) {
            if let (Some(ce), Some(be)) = (&c.embedding, &b.embedding) {
                change = ce.iter().zip(be).fold(change, |m, (x, y)| m.max((x - y).abs()));
            }
            if b.scores.iter().any(|x| x.is_nan()) {
                change = change.max(1.0); // the base has no classifier: any head is a change
                continue;
            }
            for (i, label) in c.labels.iter().enumerate() {
                let base_score = b.labels.iter().position(|l| l == label).map_or(0.0, |j| b.scores[j]);
                change = change.max((c.scores[i] - base_score).abs());
            }
        }
        let slots = adapter.slot_inputs(ctx.registry.bundle()).map_err(crate::registry::RegistryError::from)?;
        let trainer_scores = ctx.trainer.predict(inputs, slots, adapter.head.clone()).await?;
        let engine_scores: Vec<f32> = cand.iter().flat_map(|p| p.scores.iter().copied()).collect();
        let parity = if trainer_scores.len() == engine_scores.len() {
            trainer_scores.iter().zip(&engine_scores).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        } else {
            f32::MAX
        };
        (change, parity)
    };

    // How much of what the device sees still looks like the base domain (measured as the job
    // started): only then does forgetting it cost anything; the retention bound follows it.
    let base_traffic_share = if retention.is_some() { base_domain.traffic_share } else { None };
    let mut evidence = Evidence {
        candidate: cand_metrics,
        incumbent: inc_metrics,
        paired,
        retention,
        base_traffic_share,
        base_routed: None,
        finite,
        probe_change,
        parity_max_diff,
    };
    let mut decision = gate::decide(&evidence, &config.gate);
    // Refused only for forgetting a base domain the device still sees: the adapter may still
    // serve what moved, with the rows that look like the base domain answered by the base model.
    let only_retention_failed = decision.checks.iter().filter(|c| !c.passed).all(|c| c.name == "retention") && !decision.promote;
    let routable = || {
        let mut routed = adapter.clone();
        routed.manifest.base_routing = true;
        ctx.registry.preview(routed)
    };
    let routed = match (only_retention_failed, evidence.retention) {
        (true, Some(_)) => Some(routable()),
        _ => None,
    };
    if let Some(Err(why)) = &routed {
        notes.push(format!("not routed: {why}"));
    }
    if let (Some(Ok(routed)), Some((reference, _))) = (routed, evidence.retention) {
        let routed_pred = predict_samples(ctx, &routed, &holdout_refs).await?;
        let routed_names = names(&routed_pred);
        let routed_evidence = Evidence {
            candidate: gate::metrics(&truth, &as_refs(&routed_names)),
            paired: Some(gate::paired(&truth, &as_refs(&routed_names), &as_refs(&inc_names))),
            retention: Some((reference, retention_accuracy(&routed).await?)),
            base_routed: Some(routed_pred.iter().filter(|p| p.base_routed).count() as f64 / routed_pred.len().max(1) as f64),
            finite: evidence.finite && routed_pred.iter().all(|p| p.scores.iter().all(|x| x.is_finite())),
            ..evidence.clone()
        };
        let routed_decision = gate::decide(&routed_evidence, &config.gate);
        if routed_decision.promote {
            adapter.manifest.base_routing = true;
            notes.push(format!(
                "the adapter alone forgot the base domain ({}); it serves with base-like inputs routed to the base model ({:.0} % of the holdout)",
                decision.summary,
                routed_evidence.base_routed.unwrap_or(0.0) * 100.0
            ));
            evidence = routed_evidence;
            decision = routed_decision;
        } else {
            notes.push(format!("routing base-like inputs to the base model did not pass either: {}", routed_decision.summary));
        }
    }
    Ok(Judged { adapter, evidence, decision, notes })
}
