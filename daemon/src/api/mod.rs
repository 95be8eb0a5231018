//! The inference API, over HTTP (loopback by default) and MQTT v5 request/response.
//! Both decode with `wire`, predict through the engine, and answer in JSON.

pub mod commands;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::adapt;
use crate::engine::EngineHandle;
use crate::preprocess::TextEncoder;
use wire::ApiError;

/// Default largest request body: plenty for a batch of images or texts, small enough that a
/// runaway client cannot make the daemon buffer much.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct Api {
    engine: EngineHandle,
    text: Option<Arc<TextEncoder>>,
    max_request_bytes: usize,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    control: BTreeMap<String, TaskControl>,
    ingest: Option<Arc<crate::ingest::IngestStats>>,
    link: Option<Arc<crate::mqtt::LinkStatus>>,
    /// Device readings for `/metrics` (sysinfo and sysfs), refreshed on scrape.
    monitor: Mutex<Option<crate::resources::Monitor>>,
    /// The control token and the listening address; none: control requests are refused.
    auth: Option<(String, std::net::SocketAddr)>,
    /// Where answered requests' inputs are kept for the adapt loops (base-domain share).
    traffic: Option<Arc<crate::traffic::TrafficLog>>,
    /// The long-running parts under supervision (task loops, ingest): up, or down and why.
    parts: Arc<crate::app::Parts>,
    /// The HTTP server's connections (open, refused past the limit, body timeouts).
    connections: Arc<http::ConnectionStats>,
    /// Where answered rows are offered for label requests (when the device sends them).
    label_requests: Option<Arc<crate::labels::service::LabelRequests>>,
}

/// How the API reaches a task's adaptation loop.
#[derive(Clone)]
pub struct TaskControl {
    pub commands: mpsc::Sender<adapt::Command>,
    /// Fleet releases for the loop to judge (the fleet agent sends them).
    pub installs: mpsc::Sender<adapt::Install>,
    pub status: watch::Receiver<adapt::Status>,
}

impl Api {
    pub fn new(engine: EngineHandle, text: Option<Arc<TextEncoder>>, max_request_bytes: usize) -> Api {
        Api {
            engine,
            text,
            max_request_bytes,
            refused: Mutex::new(BTreeMap::new()),
            control: BTreeMap::new(),
            ingest: None,
            link: None,
            monitor: Mutex::new(None),
            auth: None,
            traffic: None,
            parts: Arc::default(),
            connections: Arc::default(),
            label_requests: None,
        }
    }

    /// Offer what serving answers to the label-request service.
    pub fn with_label_requests(mut self, requests: Option<Arc<crate::labels::service::LabelRequests>>) -> Api {
        self.label_requests = requests;
        self
    }

    pub fn label_requests(&self) -> Option<&crate::labels::service::LabelRequests> {
        self.label_requests.as_deref()
    }

    pub fn connections(&self) -> &Arc<http::ConnectionStats> {
        &self.connections
    }

    /// Where the supervised parts' state is kept (readiness, metrics, control answers).
    pub fn with_parts(mut self, parts: Arc<crate::app::Parts>) -> Api {
        self.parts = parts;
        self
    }

    pub fn parts(&self) -> &crate::app::Parts {
        &self.parts
    }

    /// Ingest counters and device readings for `/metrics`.
    pub fn with_telemetry(mut self, ingest: Option<Arc<crate::ingest::IngestStats>>, sysfs_root: &std::path::Path) -> Api {
        self.ingest = ingest;
        self.monitor = Mutex::new(Some(crate::resources::Monitor::new(sysfs_root)));
        self
    }

    /// The MQTT link's state for `/metrics`.
    pub fn with_link(mut self, link: Option<Arc<crate::mqtt::LinkStatus>>) -> Api {
        self.link = link;
        self
    }

    pub fn link_status(&self) -> Option<&crate::mqtt::LinkStatus> {
        self.link.as_deref()
    }

    pub fn ingest_stats(&self) -> Option<&crate::ingest::IngestStats> {
        self.ingest.as_deref()
    }

    pub fn device_reading(&self) -> Option<crate::resources::Reading> {
        self.monitor.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut().map(crate::resources::Monitor::read)
    }

    /// Operator commands and status for the tasks that adapt.
    pub fn with_control(mut self, control: BTreeMap<String, TaskControl>) -> Api {
        self.control = control;
        self
    }

    pub fn task_status(&self, task: &str) -> Option<adapt::Status> {
        self.control.get(task).map(|c| c.status.borrow().clone())
    }

    pub fn statuses(&self) -> Vec<adapt::Status> {
        self.control.values().map(|c| c.status.borrow().clone()).collect()
    }

    /// Send an operator command to `task`'s loop and wait for its answer (rollback and pin are
    /// answered at once, even while a job runs).
    pub async fn command(&self, task: &str, kind: adapt::CommandKind, by: &str) -> Result<String, String> {
        let control = self.control.get(task).ok_or_else(|| format!("task {task:?} does not adapt on this device"))?;
        // A loop that is down (waiting for its restart) answers nothing until it is back: say so
        // at once rather than queue the command behind the wait.
        let down = || match self.parts.get(&adapt::part_name(task)) {
            Some(crate::app::PartState { up: false, reason, .. }) => {
                format!("the adaptation loop of {task} is down ({}); it restarts by itself, try again shortly", reason.unwrap_or_default())
            }
            _ => format!("the adaptation loop of {task} stopped before answering; it restarts by itself, try again shortly"),
        };
        if self.parts.get(&adapt::part_name(task)).is_some_and(|s| !s.up) {
            return Err(down());
        }
        let (reply, rx) = oneshot::channel();
        let command = adapt::Command { kind, by: by.to_string(), reply };
        control.commands.send(command).await.map_err(|_| down())?;
        rx.await.map_err(|_| down())?
    }

    /// Keep the inputs of answered requests in `traffic`.
    pub fn with_traffic(mut self, traffic: Arc<crate::traffic::TrafficLog>) -> Api {
        self.traffic = Some(traffic);
        self
    }

    /// Who may use the control endpoints: the token, and the address the daemon listens on.
    pub fn with_auth(mut self, token: String, listen: std::net::SocketAddr) -> Api {
        self.auth = Some((token, listen));
        self
    }

    /// Check a control request's headers (see `control::authorize_http`); counted when refused.
    pub fn authorize(&self, origin: Option<&str>, host: Option<&str>, authorization: Option<&str>) -> Result<(), crate::control::HttpRefusal> {
        let Some((token, listen)) = &self.auth else { return Err(crate::control::HttpRefusal::Token) };
        crate::control::authorize_http(token, *listen, origin, host, authorization).inspect_err(|e| {
            *self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(e.error_type()).or_default() += 1;
            tracing::warn!(error_type = e.error_type(), error = %e, "control request refused");
        })
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Refused requests so far, by error type.
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Decode, predict and encode one request; the JSON answer or the reason it was refused.
    pub async fn predict(&self, task: &str, body: &[u8], content_type: Option<&str>) -> Result<Vec<u8>, ApiError> {
        let result: Result<Vec<u8>, ApiError> = async {
            let inputs = if wire::decodes_images(content_type, self.engine.manifest()) {
                // Decoding a picture is CPU work of up to tens of milliseconds: off the async
                // workers, so /healthz and other requests keep answering meanwhile.
                let (body, content_type) = (body.to_vec(), content_type.map(str::to_string));
                let (manifest, limit) = (self.engine.manifest_arc(), self.max_request_bytes);
                tokio::task::spawn_blocking(move || wire::decode(&body, content_type.as_deref(), &manifest, None, limit))
                    .await
                    .map_err(|e| ApiError::Wire(wire::WireError::Input(format!("image decoding stopped: {e}"))))??
            } else {
                wire::decode(body, content_type, self.engine.manifest(), self.text.as_deref(), self.max_request_bytes)?
            };
            let kept = self.traffic.as_ref().filter(|t| t.sample()).map(|_| inputs.clone());
            let preds = self.engine.infer(task, inputs).await?;
            if let (Some(traffic), Some(inputs)) = (&self.traffic, kept) {
                traffic.record(task, &inputs);
            }
            if let Some(requests) = &self.label_requests {
                requests.offer(task, &preds, body, content_type);
            }
            Ok(wire::encode_predictions(&preds))
        }
        // The engine carries the caller's span into its batch: a request's log lines say whose.
        .instrument(tracing::debug_span!("request", task, bytes = body.len()))
        .await;
        if let Err(e) = &result {
            self.count_refusal(task, e);
        }
        result
    }

    /// Count and log a refused request; transports call this for refusals they make themselves.
    pub fn count_refusal(&self, task: &str, e: &ApiError) {
        *self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(e.error_type()).or_default() += 1;
        tracing::info!(task, error_type = e.error_type(), error = %e, "inference request refused");
    }
}
