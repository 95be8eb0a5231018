//! The embedded broker (rumqttd) for the demo and for devices that have no broker of their own.
//! It lives as long as the process (rumqttd has no stop) and listens on loopback.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::BrokerError;

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
