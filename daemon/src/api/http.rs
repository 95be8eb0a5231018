//! The HTTP API. Bound to loopback by default: the device's own clients and operators over SSH.
//!
//! - `POST /v1/tasks/{task}/predict` with a JSON or safetensors body (see `wire`)
//! - `GET /healthz` (the process answers) and `GET /readyz` (the engine has warmed up)
//! - `GET /metrics` (Prometheus text exposition, `adaptd_` names)

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;

use adaptd_protocol::wire::ErrorBody;
use adaptd_protocol::{CommandReply, ImportRequest};

use super::Api;
use super::wire::{self, ApiError, WireError};
use crate::adapt;
use crate::engine::Health;

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/tasks/{task}/predict", post(predict))
        .route("/v1/tasks", get(statuses))
        .route("/v1/tasks/{task}/status", get(status))
        .route("/v1/tasks/{task}/train", post(|s, p, h| command(s, p, h, "train")))
        .route("/v1/tasks/{task}/rollback", post(|s, p, h| command(s, p, h, "rollback")))
        .route("/v1/tasks/{task}/pin/{version}", post(pin))
        .route("/v1/tasks/{task}/import", post(import))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(api)
}

/// Serve `router(api)` on `listener` until `shutdown` completes, then finish in-flight requests.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(api)).with_graceful_shutdown(shutdown).await
}

async fn predict(State(api): State<Arc<Api>>, Path(task): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let limit = api.max_request_bytes();
    // Read at most one byte past the limit, so an oversized body is refused without buffering it.
    let bytes = match to_bytes(body, limit + 1).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError::Wire(WireError::TooLarge { size: limit + 1, limit });
            api.count_refusal(&task, &e);
            return error_response(&e);
        }
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    match api.predict(&task, &bytes, content_type).await {
        Ok(json) => ([(header::CONTENT_TYPE, wire::CONTENT_JSON)], json).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn statuses(State(api): State<Arc<Api>>) -> Response {
    json_response(StatusCode::OK, &api.statuses())
}

async fn status(State(api): State<Arc<Api>>, Path(task): Path<String>) -> Response {
    match api.task_status(&task) {
        Some(s) => json_response(StatusCode::OK, &s),
        None => json_response(StatusCode::NOT_FOUND, &ErrorBody::new("unknown_task", &format!("task {task:?} does not adapt on this device"))),
    }
}

async fn command(State(api): State<Arc<Api>>, Path(task): Path<String>, headers: HeaderMap, which: &'static str) -> Response {
    let kind = if which == "train" { adapt::CommandKind::TrainNow } else { adapt::CommandKind::Rollback };
    control(&api, &task, &headers, kind).await
}

async fn pin(State(api): State<Arc<Api>>, Path((task, version)): Path<(String, u64)>, headers: HeaderMap) -> Response {
    control(&api, &task, &headers, adapt::CommandKind::Pin(version)).await
}

/// `{"dir": "/abs/path"}`: an adapter directory (`adaptd adapters export`) on this machine.
async fn import(State(api): State<Arc<Api>>, Path(task): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    // Who asks is checked before what they ask: a refused caller learns nothing about the body.
    if let Some(refused) = refusal(&api, &headers) {
        return refused;
    }
    match serde_json::from_slice::<ImportRequest>(&body) {
        Ok(request) if request.dir.is_absolute() => control(&api, &task, &headers, adapt::CommandKind::Import(request.dir)).await,
        Ok(_) => json_response(StatusCode::BAD_REQUEST, &CommandReply::rejected("bad_input", "dir must be an absolute path".into())),
        Err(e) => json_response(StatusCode::BAD_REQUEST, &CommandReply::rejected("bad_json", format!("expected {{\"dir\": \"/path\"}}: {e}"))),
    }
}

/// A control request: authorized first (token; no browser), then handed to the task's loop.
async fn control(api: &Api, task: &str, headers: &HeaderMap, kind: adapt::CommandKind) -> Response {
    if let Some(refused) = refusal(api, headers) {
        return refused;
    }
    command_response(api.command(task, kind, "http (control token)").await)
}

/// The answer to a caller without the control token, or from a browser (see `control`); None
/// when it may go on.
fn refusal(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let e = api.authorize(header(header::ORIGIN), header(header::HOST), header(header::AUTHORIZATION)).err()?;
    let status = if matches!(e, crate::control::HttpRefusal::Token) { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
    Some(json_response(status, &CommandReply::rejected(e.error_type(), e.to_string())))
}

fn command_response(result: Result<String, String>) -> Response {
    match result {
        Ok(message) => json_response(StatusCode::OK, &CommandReply::done(message)),
        Err(message) => json_response(StatusCode::CONFLICT, &CommandReply::refused(message)),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    (status, [(header::CONTENT_TYPE, wire::CONTENT_JSON)], body).into_response()
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    // Device readings touch sysfs and /proc: off the async workers.
    let body = tokio::task::spawn_blocking(move || super::metrics::render(&api)).await.unwrap_or_default();
    ([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], body).into_response()
}

/// Ready: the engine serves, and ingest (where this device ingests) is running. A broker that
/// is away is reported but does not make the device unready: serving goes on without it.
async fn ready(State(api): State<Arc<Api>>) -> Response {
    let ingest = api.ingest_stats().map(|s| (s.running.load(std::sync::atomic::Ordering::Relaxed), s.connected.load(std::sync::atomic::Ordering::Relaxed)));
    let ingest_line = match ingest {
        None => String::new(),
        Some((false, _)) => "; ingest: not running (restarting)".into(),
        Some((true, true)) => "; ingest: subscribed".into(),
        Some((true, false)) => "; ingest: waiting for the broker".into(),
    };
    match &*api.engine().health().borrow() {
        Health::Ready { .. } if matches!(ingest, Some((false, _))) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready{ingest_line}\n")).into_response(),
        Health::Ready { provider } => (StatusCode::OK, format!("ready ({provider:?}){ingest_line}\n")).into_response(),
        other => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {other:?}{ingest_line}\n")).into_response(),
    }
}

fn status_of(e: &ApiError) -> StatusCode {
    match e.error_type() {
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "content_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unknown_task" => StatusCode::NOT_FOUND,
        "no_classifier" => StatusCode::CONFLICT,
        "overloaded" | "stopped" => StatusCode::SERVICE_UNAVAILABLE,
        "runtime" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn error_response(e: &ApiError) -> Response {
    (status_of(e), [(header::CONTENT_TYPE, wire::CONTENT_JSON)], wire::encode_error(e.error_type(), &e.to_string())).into_response()
}
