//! Who may change what a device serves: the control token for HTTP, and signed MQTT commands.
//!
//! HTTP: `POST /v1/tasks/{task}/train|rollback|pin/{v}` need `Authorization: Bearer <token>`,
//! where the token is `<state>/control.token` (created at first start, mode 0640: the service's
//! user and group read it; operators in that group, and the CLI they run, read it too). Browser
//! requests are refused outright (an `Origin` header, or a `Host` that is not the address the
//! daemon listens on): a web page the device's user opens cannot drive the daemon, whether by a
//! cross-origin POST or by DNS rebinding.
//!
//! MQTT: commands are off unless `[mqtt] commands = true`, and then each one must carry an
//! HMAC-SHA256 signature made with the key in `[mqtt] commands_key_file`. A subscriber cannot
//! see who published a message (MQTT carries no authenticated publisher identity to the
//! receiver, and the broker's ACLs are not something a device can check), so the proof has to
//! travel inside the message: the signature covers the device, the task, the command, its
//! version, who signs and when, and a message is taken once within five minutes of being signed.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// `<state>/control.token`.
pub const TOKEN_FILE: &str = "control.token";
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: {reason}")]
    Token { path: PathBuf, reason: String },
}

impl ControlError {
    pub fn error_type(&self) -> &'static str {
        match self {
            ControlError::Token { .. } => "control_token",
        }
    }
}

/// The daemon's control token: read from the state directory, or made there (atomically, mode
/// 0640) the first time. A file that holds no usable token is replaced, and the log says so.
pub fn ensure_token(state_dir: &Path) -> Result<String, ControlError> {
    let path = state_dir.join(TOKEN_FILE);
    let err = |reason: String| ControlError::Token { path: path.clone(), reason };
    match std::fs::read_to_string(&path) {
        Ok(text) if usable(text.trim()) => {
            keep_private(&path).map_err(|e| err(format!("cannot make it private: {e}")))?;
            return Ok(text.trim().to_string());
        }
        Ok(_) => tracing::warn!(path = %path.display(), "the control token file holds no usable token; making a new one"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).map_err(|e| err(format!("no randomness: {e}")))?;
    let token = hex::encode(bytes);
    let tmp = state_dir.join(format!(".{TOKEN_FILE}.tmp-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e.to_string()));
    }
    let _ = adaptd_adapters::fsutil::fsync_dir(state_dir);
    Ok(token)
}

/// The token as an operator's CLI reads it; none when the file is missing or unreadable (the
/// daemon then answers 401, and the CLI says where the token lives).
pub fn read_token(state_dir: &Path) -> Option<String> {
    std::fs::read_to_string(state_dir.join(TOKEN_FILE)).ok().map(|t| t.trim().to_string()).filter(|t| usable(t))
}

fn usable(token: &str) -> bool {
    token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Compare without leaking where the first difference is.
pub fn same_secret(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a control request over HTTP is refused (before its token is even looked at, for a browser).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpRefusal {
    #[error("requests from web pages are refused (Origin {0:?}); use the adaptd CLI or curl")]
    Browser(String),
    #[error("Host {0:?} is not this daemon's address")]
    Host(String),
    #[error("missing or wrong control token: send `Authorization: Bearer <token>` with the token in the state directory's control.token (the adaptd CLI does)")]
    Token,
}

impl HttpRefusal {
    pub fn error_type(&self) -> &'static str {
        match self {
            HttpRefusal::Browser(_) => "cross_origin",
            HttpRefusal::Host(_) => "bad_host",
            HttpRefusal::Token => "unauthorized",
        }
    }
}

/// Check a control request's headers: no `Origin` (browsers send one with every POST), a `Host`
/// that names the address the daemon listens on (or loopback, when it listens there), and the token.
pub fn authorize_http(
    token: &str,
    listen: std::net::SocketAddr,
    origin: Option<&str>,
    host: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), HttpRefusal> {
    if let Some(origin) = origin {
        return Err(HttpRefusal::Browser(origin.chars().take(200).collect()));
    }
    let host = host.unwrap_or_default();
    if !host_is_ours(host, listen) {
        return Err(HttpRefusal::Host(host.chars().take(200).collect()));
    }
    // The scheme's name is case-insensitive (RFC 7235 §2.1): `bearer` and `BEARER` are Bearer.
    let presented = authorization.and_then(|a| a.trim_start().split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t);
    match presented {
        Some(presented) if same_secret(token, presented.trim()) => Ok(()),
        _ => Err(HttpRefusal::Token),
    }
}

fn host_is_ours(host: &str, listen: std::net::SocketAddr) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
            if port.parse::<u16>().ok() != Some(listen.port()) {
                return false;
            }
            name
        }
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let ip = name.parse::<std::net::IpAddr>().ok();
    if listen.ip().is_loopback() {
        name.eq_ignore_ascii_case("localhost") || ip.is_some_and(|ip| ip.is_loopback())
    } else {
        // Listening wider: an address of this host, as a literal (names are what rebinding abuses).
        ip.is_some_and(|ip| listen.ip().is_unspecified() || ip == listen.ip())
    }
}

/// The token file, readable by others (a copy, an umask, a hand edit): taken back to the mode the
/// daemon writes (0640: the daemon and its group), loudly, since whoever could read it could
/// change what the device serves.
fn keep_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the control token was readable by every user; it is 0640 now (anyone who read it could change what this device serves: replace it if in doubt)");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o770))?;
    }
    Ok(())
}

/// A signed MQTT command: `{"command", "version"?, "by", "issued_ms", "signature"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCommand {
    pub command: String,
    #[serde(default)]
    pub version: Option<u64>,
    /// Who signed: recorded in the events the command causes.
    pub by: String,
    pub issued_ms: u64,
    /// Hex HMAC-SHA256 of [`signed_text`] under the fleet's command key.
    pub signature: String,
}

/// What a signature covers: one line per field, so no field can be shifted into another.
pub fn signed_text(device: &str, task: &str, command: &str, version: Option<u64>, by: &str, issued_ms: u64) -> String {
    format!("adaptd-command-v1\n{device}\n{task}\n{command}\n{}\n{by}\n{issued_ms}", version.map(|v| v.to_string()).unwrap_or_default())
}

/// The signature an operator's tool attaches (tests and `docs/protocol.md` show it).
pub fn sign(key: &[u8], text: &str) -> String {
    mac_of(key, text).map(|m| hex::encode(m.finalize().into_bytes())).unwrap_or_default()
}

/// HMAC-SHA256 of `text` (HMAC takes keys of any length, so this is always `Some`).
fn mac_of(key: &[u8], text: &str) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(text.as_bytes());
    Some(mac)
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandRefusal {
    #[error("not a signed command: {0}")]
    Malformed(String),
    #[error("the signature does not verify with this device's command key")]
    BadSignature,
    #[error("signed {age_s} s away from this device's clock; commands are taken within {window_s} s")]
    Stale { age_s: i64, window_s: u64 },
    #[error("this signed command was already taken (a replay)")]
    Replay,
    /// Acting on a command that could not be recorded as taken would let it be replayed after a
    /// restart.
    #[error("cannot record the command as taken ({0}); it was not carried out")]
    Unrecorded(String),
}

impl CommandRefusal {
    pub fn error_type(&self) -> &'static str {
        match self {
            CommandRefusal::Malformed(_) => "malformed",
            CommandRefusal::BadSignature => "bad_signature",
            CommandRefusal::Stale { .. } => "stale",
            CommandRefusal::Replay => "replay",
            CommandRefusal::Unrecorded(_) => "unrecorded",
        }
    }
}

/// Checks signed commands for one device: signature, age, and once-only.
pub struct CommandVerifier {
    key: Vec<u8>,
    device: String,
    window_ms: u64,
    /// Signatures taken within the window, oldest first (bounded by the window's traffic).
    seen: VecDeque<(u64, String)>,
    /// Where `seen` is kept across restarts: a command captured from the topic and published
    /// again after a restart, within its window, is still a replay.
    kept_in: Option<PathBuf>,
}

impl CommandVerifier {
    pub const WINDOW_MS: u64 = 5 * 60 * 1000;
    const MAX_SEEN: usize = 10_000;
    /// The longest `by` a command may name (it goes into events and logs).
    pub const MAX_BY_BYTES: usize = 128;

    pub fn new(key: Vec<u8>, device: &str) -> CommandVerifier {
        CommandVerifier { key, device: device.to_string(), window_ms: CommandVerifier::WINDOW_MS, seen: VecDeque::new(), kept_in: None }
    }

    /// Keep the commands taken in `file` (written atomically before each is carried out), and
    /// take back those a previous run kept. An unreadable file is reported and set aside: the
    /// signature window still bounds what could be replayed.
    pub fn remembering(mut self, file: PathBuf) -> CommandVerifier {
        match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<(u64, String)>>(&bytes) {
                Ok(seen) => self.seen = seen.into_iter().collect(),
                Err(e) => tracing::error!(path = %file.display(), error = %e, "the record of signed commands taken is unreadable; starting a new one"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(path = %file.display(), error = %e, "cannot read the record of signed commands taken; starting a new one"),
        }
        self.kept_in = Some(file);
        self
    }

    /// Read the key file (its bytes, trimmed of a trailing newline); it must hold at least 16 bytes.
    pub fn from_key_file(path: &Path, device: &str) -> Result<CommandVerifier, ControlError> {
        let bytes = std::fs::read(path).map_err(|e| ControlError::Token { path: path.to_path_buf(), reason: e.to_string() })?;
        let key = bytes.strip_suffix(b"\n").unwrap_or(&bytes).to_vec();
        if key.len() < 16 {
            return Err(ControlError::Token { path: path.to_path_buf(), reason: format!("a command key needs at least 16 bytes, the file has {}", key.len()) });
        }
        Ok(CommandVerifier::new(key, device))
    }

    /// The command if it is signed by the key, fresh, and not seen before.
    pub fn verify(&mut self, task: &str, payload: &[u8], now_ms: u64) -> Result<SignedCommand, CommandRefusal> {
        let cmd: SignedCommand = serde_json::from_slice(payload).map_err(|e| CommandRefusal::Malformed(e.to_string()))?;
        if cmd.by.len() > CommandVerifier::MAX_BY_BYTES {
            return Err(CommandRefusal::Malformed(format!("\"by\" is {} bytes; at most {}", cmd.by.len(), CommandVerifier::MAX_BY_BYTES)));
        }
        let text = signed_text(&self.device, task, &cmd.command, cmd.version, &cmd.by, cmd.issued_ms);
        let signature = hex::decode(cmd.signature.trim()).map_err(|_| CommandRefusal::BadSignature)?;
        mac_of(&self.key, &text).ok_or(CommandRefusal::BadSignature)?.verify_slice(&signature).map_err(|_| CommandRefusal::BadSignature)?;
        let age_ms = now_ms as i64 - cmd.issued_ms as i64;
        if age_ms.unsigned_abs() > self.window_ms {
            return Err(CommandRefusal::Stale { age_s: age_ms / 1000, window_s: self.window_ms / 1000 });
        }
        while self.seen.front().is_some_and(|(t, _)| now_ms.saturating_sub(*t) > 2 * self.window_ms) || self.seen.len() >= CommandVerifier::MAX_SEEN {
            self.seen.pop_front();
        }
        let signature = cmd.signature.trim().to_ascii_lowercase();
        if self.seen.iter().any(|(_, s)| *s == signature) {
            return Err(CommandRefusal::Replay);
        }
        self.seen.push_back((now_ms, signature));
        if let Some(file) = &self.kept_in {
            let kept = serde_json::to_vec(&self.seen).unwrap_or_default();
            if let Err(e) = adaptd_adapters::fsutil::write_atomic(file, &kept) {
                self.seen.pop_back();
                return Err(CommandRefusal::Unrecorded(e.to_string()));
            }
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_commands_verify_once_and_only_as_signed() {
        let key = b"0123456789abcdef-fleet".to_vec();
        let mut v = CommandVerifier::new(key.clone(), "robot-7");
        let now = 1_800_000_000_000;
        let make = |task: &str, command: &str, version: Option<u64>, issued: u64, key: &[u8]| {
            let sig = sign(key, &signed_text("robot-7", task, command, version, "alice", issued));
            serde_json::json!({ "command": command, "version": version, "by": "alice", "issued_ms": issued, "signature": sig }).to_string()
        };
        let ok = make("sorter", "pin", Some(2), now, &key);
        assert_eq!(v.verify("sorter", ok.as_bytes(), now + 10).unwrap().version, Some(2));
        assert_eq!(v.verify("sorter", ok.as_bytes(), now + 20).unwrap_err(), CommandRefusal::Replay);
        // Signed for another task, another version, another key, or too long ago.
        assert_eq!(v.verify("picker", make("sorter", "pin", Some(3), now, &key).as_bytes(), now).unwrap_err(), CommandRefusal::BadSignature);
        let tampered = make("sorter", "pin", Some(3), now, &key).replace("\"version\":3", "\"version\":0");
        assert_eq!(v.verify("sorter", tampered.as_bytes(), now).unwrap_err(), CommandRefusal::BadSignature);
        assert_eq!(v.verify("sorter", make("sorter", "rollback", None, now, b"another key of 16+").as_bytes(), now).unwrap_err(), CommandRefusal::BadSignature);
        assert!(matches!(v.verify("sorter", make("sorter", "rollback", None, now - 600_000, &key).as_bytes(), now), Err(CommandRefusal::Stale { .. })));
        assert!(matches!(v.verify("sorter", b"{\"command\": \"train\"}", now), Err(CommandRefusal::Malformed(_))));
        let long_by = sign(&key, &signed_text("robot-7", "sorter", "train", None, &"a".repeat(20_000), now));
        let long_by = serde_json::json!({ "command": "train", "by": "a".repeat(20_000), "issued_ms": now, "signature": long_by }).to_string();
        assert_eq!(v.verify("sorter", long_by.as_bytes(), now).unwrap_err(), CommandRefusal::Malformed("\"by\" is 20000 bytes; at most 128".into()));
    }

    /// A command captured from the topic and published again after a restart, within its
    /// window, is still a replay: what was taken is kept in the state directory.
    #[test]
    fn a_command_taken_before_a_restart_is_a_replay_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (key, now) = (b"0123456789abcdef-fleet".to_vec(), 1_800_000_000_000);
        let sig = sign(&key, &signed_text("robot-7", "sorter", "rollback", None, "alice", now));
        let cmd = serde_json::json!({ "command": "rollback", "by": "alice", "issued_ms": now, "signature": sig }).to_string();
        let file = dir.path().join("commands-taken.json");
        let mut before = CommandVerifier::new(key.clone(), "robot-7").remembering(file.clone());
        assert!(before.verify("sorter", cmd.as_bytes(), now + 10).is_ok());
        drop(before);
        let mut after = CommandVerifier::new(key.clone(), "robot-7").remembering(file.clone());
        assert_eq!(after.verify("sorter", cmd.as_bytes(), now + 60_000).unwrap_err(), CommandRefusal::Replay);
        // A record that cannot be written refuses the command rather than carry it out unrecorded.
        let sig = sign(&key, &signed_text("robot-7", "sorter", "train", None, "alice", now));
        let train = serde_json::json!({ "command": "train", "by": "alice", "issued_ms": now, "signature": sig }).to_string();
        let mut nowhere = CommandVerifier::new(key, "robot-7").remembering(dir.path().join("gone/commands-taken.json"));
        assert_eq!(nowhere.verify("sorter", train.as_bytes(), now).unwrap_err().error_type(), "unrecorded");
        // Garbage in the record: set aside, commands still verify.
        std::fs::write(&file, b"\x00garbage").unwrap();
        let mut fresh = CommandVerifier::new(b"0123456789abcdef-fleet".to_vec(), "robot-7").remembering(file);
        assert!(fresh.verify("sorter", train.as_bytes(), now).is_ok());
    }

    #[test]
    fn http_control_needs_the_token_and_no_browser() {
        let listen: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let token = "ab".repeat(32);
        let bearer = format!("Bearer {token}");
        assert_eq!(authorize_http(&token, listen, None, Some("127.0.0.1:8080"), Some(&bearer)), Ok(()));
        assert_eq!(authorize_http(&token, listen, None, Some("localhost:8080"), Some(&bearer)), Ok(()));
        assert_eq!(authorize_http(&token, listen, None, Some("127.0.0.1:8080"), None), Err(HttpRefusal::Token));
        assert_eq!(authorize_http(&token, listen, None, Some("127.0.0.1:8080"), Some("Bearer abab")), Err(HttpRefusal::Token));
        assert!(matches!(authorize_http(&token, listen, Some("http://evil.example"), Some("127.0.0.1:8080"), Some(&bearer)), Err(HttpRefusal::Browser(_))));
        // DNS rebinding: the page's own name in Host.
        assert!(matches!(authorize_http(&token, listen, None, Some("evil.example:8080"), Some(&bearer)), Err(HttpRefusal::Host(_))));
        assert!(matches!(authorize_http(&token, listen, None, Some("127.0.0.1:9999"), Some(&bearer)), Err(HttpRefusal::Host(_))));
        let lower = format!("bearer {token}");
        assert_eq!(authorize_http(&token, listen, None, Some("127.0.0.1:8080"), Some(&lower)), Ok(()), "the scheme is case-insensitive");
        assert_eq!(authorize_http(&token, listen, None, Some("127.0.0.1:8080"), Some(&format!("Basic {token}"))), Err(HttpRefusal::Token));
        let v6: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(authorize_http(&token, v6, None, Some("[::1]:8080"), Some(&bearer)), Ok(()));
    }

    #[test]
    fn the_token_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = ensure_token(dir.path()).unwrap();
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "others cannot read the token (mode {mode:o})");
        assert_eq!(ensure_token(dir.path()).unwrap(), token, "a restart keeps the token");
        std::fs::set_permissions(dir.path().join(TOKEN_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(ensure_token(dir.path()).unwrap(), token, "a token others could read is kept ...");
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "... and made private again");
        assert_eq!(read_token(dir.path()), Some(token.clone()));
        std::fs::write(dir.path().join(TOKEN_FILE), "garbage").unwrap();
        assert_ne!(ensure_token(dir.path()).unwrap(), token, "an unusable file is replaced");
    }
}
