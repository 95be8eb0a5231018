//! The HTTP API. Bound to loopback by default: the device's own clients and operators over SSH.
//!
//! - `POST /v1/tasks/{task}/predict` with a JSON or safetensors body (see `wire`)
//! - `GET /healthz` (the process answers) and `GET /readyz` (the engine has warmed up)
//! - `GET /metrics` (Prometheus text exposition, `adaptd_` names)

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
        .route("/v1/label_requests/{id}/input", get(label_request_input))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(api)
}

/// How long and how many: what keeps slow, idle or abandoned clients from holding the server
/// (the `[http]` section's timeouts and connection limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLimits {
    /// A connection gets this long to send a request's headers; a kept-alive connection that
    /// sends nothing for this long is closed.
    pub header_timeout: Duration,
    /// And this long to send the body it announced.
    pub body_timeout: Duration,
    /// Connections open at once; a new one past it is closed at once (counted), so the
    /// descriptors of the process never run out.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits { header_timeout: Duration::from_secs(10), body_timeout: Duration::from_secs(30), max_connections: 8192 }
    }
}

/// The server's connection counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    pub open: AtomicU64,
    /// Closed at once for being past `max_connections`.
    pub refused: AtomicU64,
    /// Requests whose body did not arrive within `body_timeout`.
    pub body_timeouts: AtomicU64,
}

/// Connections the kernel holds for the accept loop: a burst of clients (or a flood of idle
/// ones) past tokio's default of 1024 would wait for SYN retries, seconds, before being taken.
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with a backlog of [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a stop waits for the requests in flight before it closes their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Serve `router(api)` on `listener` until `shutdown` completes, within `limits`; then finish
/// the requests in flight (for at most a few seconds) and close every connection.
pub async fn serve(listener: TcpListener, api: Arc<Api>, limits: ServerLimits, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let stats = api.connections().clone();
    let router = router(api.clone()).layer(axum::middleware::from_fn_with_state((api, limits.body_timeout), read_body));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors or a connection reset before it was taken: the listener is
                // fine; wait a moment rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service.clone()));
        let stats = stats.clone();
        stats.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace_s = STOP_GRACE.as_secs(), "HTTP requests still in flight at the stop were cut off");
    }
    Ok(())
}

/// Every request's body is read here, before any handler: at most one byte past
/// `http.max_request_bytes` (a handler then refuses it as too large, by its own rules), and
/// within the body timeout. A `Content-Length` past the limit is refused before a byte of the
/// body is read.
async fn read_body(State((api, timeout)): State<(Arc<Api>, Duration)>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let limit = api.max_request_bytes();
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared.filter(|&size| size > (limit + 1) as u64) {
        let e = ApiError::Wire(WireError::TooLarge { size: usize::try_from(size).unwrap_or(usize::MAX), limit });
        api.count_refusal("", &e);
        return closing(error_response(&e));
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, to_bytes(body, limit + 1)).await {
        Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(_)) => {
            let e = ApiError::Wire(WireError::TooLarge { size: limit + 1, limit });
            api.count_refusal("", &e);
            closing(error_response(&e))
        }
        Err(_) => {
            api.connections().body_timeouts.fetch_add(1, Ordering::Relaxed);
            let message = format!("the request body did not arrive within {} s", timeout.as_secs());
            let body = wire::encode_error("body_timeout", &message);
            closing((StatusCode::REQUEST_TIMEOUT, [(header::CONTENT_TYPE, wire::CONTENT_JSON)], body).into_response())
        }
    }
}

/// The answer, and the connection closed after it: the client's request was not read whole.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    response
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

/// A label request's input (what it asks about), for a labeller that got the request without
/// it (too large to go inline). Served inputs are the device's data: the control token is needed.
async fn label_request_input(State(api): State<Arc<Api>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&api, &headers) {
        return refused;
    }
    let found = {
        let api = api.clone();
        tokio::task::spawn_blocking(move || api.label_requests().map(|r| r.input(&id))).await
    };
    match found {
        Ok(Some(Ok(Some(request)))) => json_response(StatusCode::OK, &request),
        Ok(Some(Ok(None))) => {
            error_response(&ApiError::Wire(WireError::Input("no such label request (or it expired)".into()))).map_status(StatusCode::NOT_FOUND)
        }
        Ok(None) => error_response(&ApiError::Wire(WireError::Input("this device sends no label requests".into()))).map_status(StatusCode::NOT_FOUND),
        Ok(Some(Err(reason))) => (StatusCode::INTERNAL_SERVER_ERROR, wire::encode_error("store", &reason)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, wire::encode_error("runtime", &e.to_string())).into_response(),
    }
}

trait MapStatus {
    fn map_status(self, status: StatusCode) -> Response;
}

impl MapStatus for Response {
    fn map_status(mut self, status: StatusCode) -> Response {
        *self.status_mut() = status;
        self
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

/// Ready: the engine serves, and every supervised part (ingest where this device ingests, each
/// task's loop) runs. A part that stopped on an error makes the device unready, naming it and
/// why, until its restart; a broker that is away is reported but does not: serving goes on
/// without it.
async fn ready(State(api): State<Arc<Api>>) -> Response {
    let ingest_line = match api.ingest_stats().map(|s| s.connected.load(std::sync::atomic::Ordering::Relaxed)) {
        None => "",
        Some(true) => "; ingest: subscribed",
        Some(false) => "; ingest: waiting for the broker",
    };
    let down: Vec<String> = api.parts().down_now().into_iter().map(|(part, reason)| format!("{part} down ({reason}), restarting")).collect();
    match &*api.engine().health().borrow() {
        Health::Ready { .. } if !down.is_empty() => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", down.join("; "))).into_response(),
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
