//! A client for a running daemon's HTTP API on loopback: what `adaptd status`, `adaptd train`,
//! `adaptd adapters rollback|pin` and the demo use. Blocking and dependency-free on purpose (one
//! request, `Connection: close`): the CLI should not start a runtime to ask one question.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use adaptd_protocol::wire::ErrorBody;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach adaptd at http://{addr} (is the daemon running? see `--http`)")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("http://{addr}{path}")]
    Io { addr: SocketAddr, path: String, source: std::io::Error },
    #[error("http://{addr}{path}: malformed response: {reason}")]
    Malformed { addr: SocketAddr, path: String, reason: String },
}

/// A response: status code and JSON body (`Value::Null` for an empty or non-JSON body).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

impl Response {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The daemon's `{"message": ...}` (a command's reply) or its [`ErrorBody`]'s message,
    /// whichever it sent.
    pub fn message(&self) -> String {
        if let Ok(e) = serde_json::from_value::<ErrorBody>(self.body.clone()) {
            return e.error.message;
        }
        self.body["message"].as_str().map_or_else(|| self.body.to_string(), str::to_string)
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub timeout: Duration,
    /// The daemon's control token (`<state>/control.token`), sent with every request.
    pub token: Option<String>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, timeout: Duration::from_secs(30), token: None }
    }

    /// With the control token of the daemon whose state directory is `state_dir`, if readable.
    pub fn with_token_from(mut self, state_dir: &std::path::Path) -> Client {
        self.token = adaptd_daemon::control::read_token(state_dir);
        self
    }

    pub fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, json: Option<&Value>) -> Result<Response, ClientError> {
        self.request("POST", path, json.map(|j| j.to_string().into_bytes()).as_deref())
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let (status, payload) = self.request_raw(method, path, body)?;
        Ok(Response { status, body: serde_json::from_slice(&payload).unwrap_or(Value::Null) })
    }

    /// A response as text (`/readyz`, `/metrics`): status code and body.
    pub fn request_text(&self, method: &str, path: &str) -> Result<(u16, String), ClientError> {
        let (status, body) = self.request_raw(method, path, None)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// One sample's value from `/metrics` (an unlabelled one, e.g. `adaptd_engine_ready`).
    pub fn metric(&self, name: &str) -> Result<Option<f64>, ClientError> {
        let (_, text) = self.request_raw("GET", "/metrics", None)?;
        let text = String::from_utf8_lossy(&text);
        Ok(text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()))
    }

    fn request_raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>), ClientError> {
        let io = |source| ClientError::Io { addr: self.addr, path: path.to_string(), source };
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|source| ClientError::Connect { addr: self.addr, source })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let auth = self.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let malformed = |reason: &str| ClientError::Malformed { addr: self.addr, path: path.to_string(), reason: reason.to_string() };
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| malformed("no end of headers"))?;
        let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed("headers are not UTF-8"))?;
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| malformed("no status code"))?;
        let mut payload = raw[split + 4..].to_vec();
        if head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")) {
            payload = dechunk(&payload).ok_or_else(|| malformed("bad chunked body"))?;
        }
        Ok((status, payload))
    }
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).ok()?.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(super::dechunk(b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap(), b"{\"a\":1}");
        assert!(super::dechunk(b"zz\r\n").is_none());
    }
}
