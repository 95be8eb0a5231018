//! The label-request service: serving offers what it answered ([`LabelRequests::offer`]); a loop
//! of its own chooses, within each task's quotas, the inputs whose labels would help most
//! ([`super::requests`]), keeps them in the sample store until they expire, and publishes each as
//! a [`LabelRequest`] on `{prefix}/{device}/label_requests/{task}`. An answer is an ordinary
//! sample carrying the request's id; ingest stores it like any other and marks the request
//! answered (see `SampleStore::insert_batch`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use adaptd_adapters::tensor::HostTensor;
use adaptd_protocol::wire::LabelRequest;
use adaptd_protocol::{Event, Topics};
use tokio::sync::watch;

use super::LabelsConfig;
use super::requests::{Labelled, Requester, Strategy};
use crate::adapt::AdaptConfig;
use crate::engine::{EngineHandle, Prediction, concat_inputs};
use crate::events::{Events, now_ms};
use crate::mqtt::LinkHandle;
use crate::preprocess::TextEncoder;
use crate::registry::Registry;
use crate::samples::{LabelRequestRow, RequestCounts, SampleInput, SampleStore, Split, SplitPolicy};

/// A served row as the pool keeps it: the request's body (shared by its rows) and the row.
#[derive(Debug, Clone)]
pub struct RawRow {
    body: Arc<[u8]>,
    content_type: Option<Arc<str>>,
    row: usize,
}

/// What serving and the loop share: each task's requester and its figures.
#[derive(Debug)]
pub struct LabelRequests {
    requesters: Mutex<HashMap<String, Requester<RawRow>>>,
    /// Per task: requests published since start, and the store's counts as last read.
    figures: Mutex<BTreeMap<String, (u64, RequestCounts)>>,
    published: AtomicU64,
    /// Where the requests' inputs are kept (read by `GET /v1/label_requests/{id}/input`).
    store_path: PathBuf,
}

impl LabelRequests {
    pub fn new(store_path: PathBuf) -> LabelRequests {
        LabelRequests { requesters: Mutex::default(), figures: Mutex::default(), published: AtomicU64::new(0), store_path }
    }

    /// A kept request as it was sent, with its input as a sample carries it (`input`, `text` or
    /// `image`), or None when no request has that id (or it expired).
    pub fn input(&self, id: &str) -> Result<Option<LabelRequest>, String> {
        let store = SampleStore::open(&self.store_path, SplitPolicy::default()).map_err(|e| e.to_string())?;
        let Some(row) = store.label_request(id).map_err(|e| e.to_string())? else { return Ok(None) };
        let mut message = LabelRequest {
            id: row.id,
            task: row.task,
            input: None,
            text: None,
            image: None,
            input_url: None,
            predicted: row.predicted,
            confidence: row.confidence,
            strategy: row.strategy,
            expires_ms: row.expires_ms,
        };
        fill_input(&mut message, &row.input).map_err(|e| e.to_string())?;
        Ok(Some(message))
    }

    fn requesters(&self) -> MutexGuard<'_, HashMap<String, Requester<RawRow>>> {
        self.requesters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serving answered `predictions` (one per row of `body`) for `task`. Cheap: the scores of
    /// each row against the pool, and the body kept (once, shared) only if a row enters it.
    pub fn offer(&self, task: &str, predictions: &[Prediction], body: &[u8], content_type: Option<&str>) {
        let mut requesters = self.requesters();
        let Some(requester) = requesters.get_mut(task) else { return };
        // The body is copied once, by the first row that enters the pool; its other rows share it.
        let mut kept: Option<RawRow> = None;
        for (row, p) in predictions.iter().enumerate() {
            requester.offer(p.adapter_version, &p.scores, &p.labels, || {
                let first = kept.get_or_insert_with(|| RawRow { body: Arc::from(body), content_type: content_type.map(Arc::from), row });
                RawRow { row, ..first.clone() }
            });
        }
    }

    /// Choose requests for `task` under `config` (the loop does this for each task that asks).
    pub fn ask_for(&self, task: &str, config: &LabelsConfig) {
        self.requesters().entry(task.to_string()).or_insert_with(|| Requester::new(strategy(config), seed(task))).set_strategy(strategy(config));
    }

    /// Per task: requests published since start, and the store's counts (the requests kept).
    pub fn figures(&self) -> BTreeMap<String, (u64, RequestCounts)> {
        self.figures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn strategy(config: &LabelsConfig) -> Strategy {
    Strategy {
        uncertainty: config.request_uncertainty,
        novelty: config.request_novelty,
        balance: config.request_balance,
        random_share: config.request_random_share,
        min_distance: config.request_min_distance,
        per_minute: config.requests_per_minute,
        per_hour: config.requests_per_hour,
        per_day: config.requests_per_day,
    }
}

/// What the loop works with.
pub struct RequestParts {
    pub shared: Arc<LabelRequests>,
    pub engine: EngineHandle,
    pub registry: Arc<Registry>,
    pub text: Option<Arc<TextEncoder>>,
    pub store_path: PathBuf,
    pub split: SplitPolicy,
    pub link: LinkHandle,
    pub topics: Topics,
    pub events: Events,
    /// Where answers are journalled, for the report.
    pub journal: crate::events::Journal,
    /// Each task's configuration as reloads change it.
    pub configs: BTreeMap<String, watch::Receiver<AdaptConfig>>,
    pub max_request_bytes: usize,
}

/// How often the loop looks for a request to send.
const TICK: Duration = Duration::from_secs(1);
/// How often the task's request counts are read again (answers announced), and its labelled
/// samples (for novelty and balance).
const COUNT_EVERY: Duration = Duration::from_secs(3);
const REFRESH: Duration = Duration::from_secs(30);

/// Run until `shutdown`.
pub async fn run(parts: RequestParts, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut store = match SampleStore::open(&parts.store_path, parts.split) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "label requests: cannot open the sample store; no requests are sent");
            return;
        }
    };
    let mut clocks: HashMap<String, TaskClock> = HashMap::new();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = interval.tick() => {}
        }
        for (task, config) in &parts.configs {
            let labels = config.borrow().labels.clone();
            if !labels.requests {
                parts.shared.requesters().remove(task);
                continue;
            }
            parts.shared.ask_for(task, &labels);
            let clock = clocks.entry(task.clone()).or_default();
            if clock.refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
                clock.refreshed = Some(std::time::Instant::now());
                refresh(&parts, &mut store, task);
            }
            if clock.counted.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
                clock.counted = Some(std::time::Instant::now());
                count(&parts, &store, task, &mut clock.answered);
            }
            // As many as the quotas allow, up to a pool's worth a tick.
            for _ in 0..super::requests::POOL {
                match request(&parts, &mut store, task, &labels).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(task, error = %e, "label requests: could not send one");
                        break;
                    }
                }
            }
        }
    }
}

/// When the loop last read a task's labelled samples and its request counts, and the answers
/// counted then.
#[derive(Default)]
struct TaskClock {
    refreshed: Option<std::time::Instant>,
    counted: Option<std::time::Instant>,
    answered: u64,
}

fn seed(task: &str) -> u64 {
    super::requests::fnv1a(task.bytes().map(u64::from))
}

/// Read the task's labelled samples (class counts and centroids); forget expired requests.
fn refresh(parts: &RequestParts, store: &mut SampleStore, task: &str) {
    let now = now_ms() as i64;
    if let Err(e) = store.expire_label_requests(now) {
        tracing::warn!(task, error = %e, "label requests: could not forget expired requests");
    }
    let labelled = store.labels(task).and_then(|labels| {
        let train = store.load_trusted(task, Split::Train)?;
        let index: HashMap<&str, usize> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
        let mut counts = vec![0u64; labels.len()];
        let mut rows: Vec<(usize, &[f32])> = Vec::new();
        for s in &train {
            if let Some(&c) = index.get(s.sample.label.as_str()) {
                counts[c] += 1;
                if let Some(e) = &s.embedding {
                    rows.push((c, e));
                }
            }
        }
        Ok(Labelled::from_embeddings(labels.clone(), counts, &rows))
    });
    match labelled {
        Ok(l) => {
            if let Some(r) = parts.shared.requesters().get_mut(task) {
                r.set_labelled(l);
            }
        }
        Err(e) => tracing::warn!(task, error = %e, "label requests: could not read the task's samples"),
    }
}

/// Read the task's request counts; announce new answers.
fn count(parts: &RequestParts, store: &SampleStore, task: &str, answered_before: &mut u64) {
    match store.label_request_counts(task, now_ms() as i64) {
        Ok(counts) => {
            let published = {
                let mut figures = parts.shared.figures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let entry = figures.entry(task.to_string()).or_default();
                entry.1 = counts;
                entry.0
            };
            if counts.answered > *answered_before {
                let event = parts.events.emit(
                    task,
                    Event::LabelRequestsAnswered {
                        published,
                        sent: counts.sent,
                        answered: counts.answered,
                        disagreed: counts.disagreed,
                        pending: counts.pending,
                    },
                );
                parts.journal.record(&event);
            }
            *answered_before = counts.answered;
        }
        Err(e) => tracing::warn!(task, error = %e, "label requests: could not count them"),
    }
}

/// Send the task's next request if its quotas allow and its pool has a candidate; whether it did.
async fn request(parts: &RequestParts, store: &mut SampleStore, task: &str, config: &LabelsConfig) -> Result<bool, String> {
    let now = now_ms() as i64;
    let candidates: Vec<RawRow> = {
        let requesters = parts.shared.requesters();
        match requesters.get(task) {
            Some(r) if r.has_candidates() && r.may_send(now) => r.candidates().into_iter().map(|c| c.input.clone()).collect(),
            _ => return Ok(false),
        }
    };
    // The candidates through the base model, for novelty and diversity: one engine call, its
    // decoding off the async workers and at background priority.
    let manifest = parts.engine.manifest_arc();
    let (text, limit) = (parts.text.clone(), parts.max_request_bytes);
    let rows = candidates.clone();
    let inputs = tokio::task::spawn_blocking(move || {
        crate::background_priority();
        // Rows of one request share its body: it is decoded once.
        let mut bodies: Vec<&Arc<[u8]>> = Vec::new();
        let mut decoded: Vec<Option<Vec<HostTensor>>> = Vec::new();
        rows.iter()
            .map(|r| {
                let at = bodies.iter().position(|body| Arc::ptr_eq(body, &r.body)).unwrap_or_else(|| {
                    bodies.push(&r.body);
                    decoded.push(crate::api::wire::decode(&r.body, r.content_type.as_deref(), &manifest, text.as_deref(), limit).ok());
                    decoded.len() - 1
                });
                decoded[at].as_ref().map(|inputs| inputs.iter().map(|t| t.rows(r.row, r.row + 1)).collect::<Vec<HostTensor>>())
            })
            .collect::<Vec<Option<Vec<HostTensor>>>>()
    })
    .await
    .map_err(|e| e.to_string())?;
    let decoded: Vec<&Vec<HostTensor>> = inputs.iter().flatten().collect();
    let mut embeddings: Vec<Option<Vec<f32>>> = vec![None; candidates.len()];
    if !decoded.is_empty() {
        let batch = concat_inputs(decoded.iter().map(|v| v.as_slice()));
        let base = parts.registry.base(task);
        let predictions = parts.engine.evaluate(base, batch).await.map_err(|e| e.to_string())?;
        let mut embedded = predictions.into_iter().map(|p| p.embedding);
        for (slot, input) in embeddings.iter_mut().zip(&inputs) {
            if input.is_some() {
                *slot = embedded.next().flatten();
            }
        }
    }
    let chosen = {
        let mut requesters = parts.shared.requesters();
        let Some(r) = requesters.get_mut(task) else { return Ok(false) };
        // The pool may have changed while the candidates were embedded: their embeddings then no
        // longer line up, and this round waits for the next tick.
        if r.candidates().len() != candidates.len()
            || r.candidates().iter().zip(&candidates).any(|(c, k)| !Arc::ptr_eq(&c.input.body, &k.body) || c.input.row != k.row)
        {
            return Ok(false);
        }
        r.choose(now, &embeddings)
    };
    let Some(chosen) = chosen else { return Ok(false) };
    let raw = chosen.candidate.input.clone();
    let manifest = parts.engine.manifest_arc();
    let input = tokio::task::spawn_blocking(move || crate::api::wire::sample_input(&raw.body, raw.content_type.as_deref(), &manifest, raw.row))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let predicted = chosen.candidate.predicted.clone();
    let id = format!("{}-{}-{:x}", parts.topics.device(), task, now as u64 ^ (parts.shared.published.fetch_add(1, Ordering::Relaxed) << 48));
    let expires_ms = now + (config.request_expiry_h * 3_600_000.0) as i64;
    store
        .add_label_request(&LabelRequestRow {
            id: id.clone(),
            task: task.to_string(),
            input: input.clone(),
            predicted: predicted.clone(),
            confidence: chosen.candidate.confidence,
            strategy: chosen.strategy.to_string(),
            created_ms: now,
            expires_ms,
        })
        .map_err(|e| e.to_string())?;
    let mut message = LabelRequest {
        id: id.clone(),
        task: task.to_string(),
        input: None,
        text: None,
        image: None,
        input_url: None,
        predicted,
        confidence: chosen.candidate.confidence,
        strategy: chosen.strategy.to_string(),
        expires_ms,
    };
    fill_input(&mut message, &input).map_err(|e| e.to_string())?;
    let mut payload = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
    if payload.len() > config.request_inline_kb * 1024 {
        (message.input, message.text, message.image) = (None, None, None);
        message.input_url = Some(format!("/v1/label_requests/{id}/input"));
        payload = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
    }
    parts.link.publish(parts.topics.task(adaptd_protocol::topics::Channel::LabelRequests, task), payload, false).await.map_err(|e| e.to_string())?;
    let mut figures = parts.shared.figures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    figures.entry(task.to_string()).or_default().0 += 1;
    tracing::debug!(task, id, strategy = chosen.strategy, "label request sent");
    Ok(true)
}

/// The input as a sample carries it: `input` (a tensor), `text`, or `image` (base64 PNG).
pub fn fill_input(message: &mut LabelRequest, input: &SampleInput) -> Result<(), crate::preprocess::PreprocessError> {
    match input {
        SampleInput::Tensor(t) => message.input = Some(crate::preprocess::host_to_json_tensor(t)),
        SampleInput::Text(text) => message.text = Some(text.clone()),
        SampleInput::Image(pixels) => {
            use base64::Engine as _;
            message.image = Some(base64::engine::general_purpose::STANDARD.encode(crate::preprocess::png_bytes(pixels)?));
        }
    }
    Ok(())
}
