//! How adaptd reaches the broker the user runs: address, credentials, TLS with optional client
//! certificates. Written once for both links (MQTT 3.1.1 and MQTT 5).

use std::net::SocketAddr;
use std::path::PathBuf;

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

    /// MQTT 3.1.1 options with the address only: [`BrokerConnection::secure`] adds the
    /// credentials and TLS before each connect, so rotated files are picked up.
    pub fn options(&self, client_id: impl Into<String>) -> rumqttc::MqttOptions {
        rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port)
    }

    /// Read the password and TLS files into `options`.
    pub fn secure(&self, options: &mut rumqttc::MqttOptions) -> Result<(), BrokerError> {
        if let Some((user, password)) = self.password()? {
            options.set_credentials(user, password);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        Ok(())
    }

    /// The same for MQTT 5.
    pub fn options_v5(&self, client_id: impl Into<String>) -> rumqttc::v5::MqttOptions {
        rumqttc::v5::MqttOptions::new(client_id, self.host.clone(), self.port)
    }

    pub fn secure_v5(&self, options: &mut rumqttc::v5::MqttOptions) -> Result<(), BrokerError> {
        if let Some((user, password)) = self.password()? {
            options.set_credentials(user, password);
        }
        if let Some(t) = self.transport()? {
            options.set_transport(t);
        }
        Ok(())
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

impl BrokerError {
    pub fn error_type(&self) -> &'static str {
        match self {
            BrokerError::Config(_) => "config",
            BrokerError::NotListening { .. } => "not_listening",
            BrokerError::Tls(_) => "tls",
            BrokerError::Credentials(_) => "credentials",
        }
    }
}
