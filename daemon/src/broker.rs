//! The MQTT broker: how adaptd connects to the one the user runs (address, credentials, TLS with
//! optional client certificates; shared by ingest, events and the MQTT API), and the embedded
//! broker (rumqttd) for the demo and for devices that have no broker of their own. The embedded
//! one lives as long as the process (rumqttd has no stop) and listens on loopback.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the broker is and how to prove who we are.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BrokerConnection {
    pub host: String,
    pub port: u16,
    /// Username, and the file holding the password (read when connecting; the configuration
    /// never holds the secret itself).
    pub credentials: Option<(String, Option<PathBuf>)>,
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS: the CA that signed the broker's certificate, and optionally this device's
/// client certificate and key (brokers with `require_certificate`).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl BrokerConnection {
    pub fn plain(host: impl Into<String>, port: u16) -> BrokerConnection {
        BrokerConnection { host: host.into(), port, credentials: None, tls: None }
    }

    fn password(&self) -> Result<Option<(String, String)>, BrokerError> {
        let Some((user, file)) = &self.credentials else { return Ok(None) };
        let password = match file {
            Some(f) => {
                std::fs::read_to_string(f).map_err(|e| BrokerError::Credentials(format!("{}: {e}", f.display())))?.trim_end_matches(['\n', '\r']).to_string()
            }
            None => String::new(),
        };
        Ok(Some((user.clone(), password)))
    }

    fn transport(&self) -> Result<Option<rumqttc::Transport>, BrokerError> {
        let Some(tls) = &self.tls else { return Ok(None) };
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| BrokerError::Tls(format!("{}: {e}", p.display())));
        let client_auth = match &tls.client {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        Ok(Some(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple { ca: read(&tls.ca)?, alpn: None, client_auth })))
    }

    /// MQTT 3.1.1 options (ingest, events).
    pub fn options(&self, client_id: impl Into<String>) -> Result<rumqttc::MqttOptions, BrokerError> {
        let mut options = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some((user, password)) = self.password()? {
            options.set_credentials(user, password);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        Ok(options)
    }

    /// MQTT 5 options (the request/response inference API).
    pub fn options_v5(&self, client_id: impl Into<String>) -> Result<rumqttc::v5::MqttOptions, BrokerError> {
        let mut options = rumqttc::v5::MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some((user, password)) = self.password()? {
            options.set_credentials(user, password);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        Ok(options)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker configuration: {0}")]
    Config(String),
    #[error("embedded broker did not start listening on {addr} within {secs} s (port in use?)")]
    NotListening { addr: SocketAddr, secs: u64 },
    #[error("MQTT TLS: {0}")]
    Tls(String),
    #[error("MQTT password file: {0}")]
    Credentials(String),
}

/// Subscribe `client` to `filter` (QoS 1) from a task of its own; called on every CONNACK by the
/// loop that polls the connection. That loop is the only one draining the request queue, which
/// may be full of requests made while the broker was away (acks, answers): waiting there for
/// room would deadlock the connection (seen on a broker restart).
pub fn subscribe_in_background(client: &rumqttc::AsyncClient, filter: &str, what: &'static str) {
    let (client, filter) = (client.clone(), filter.to_string());
    tokio::spawn(async move {
        match client.subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce).await {
            Ok(()) => tracing::info!(filter, "{what} connected"),
            Err(e) => tracing::warn!(error = %e, "{what} could not subscribe"),
        }
    });
}

/// Start rumqttd on `listen` (MQTT 3.1.1) on its own thread; returns once it accepts connections.
pub fn start_embedded(listen: SocketAddr, max_payload_bytes: usize) -> Result<(), BrokerError> {
    let toml = format!(
        r#"id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload_bytes}
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&toml).map_err(|e| BrokerError::Config(e.to_string()))?;
    std::thread::Builder::new()
        .name("adaptd-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Config(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(listen).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening { addr: listen, secs: 5 })
}
