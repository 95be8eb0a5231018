//! MQTT, written once. A device opens at most one connection per MQTT version:
//! - [`Link`] (MQTT 3.1.1): samples in (ingest), operator commands in, events out. Its session is
//!   persistent while ingest runs, so what was not acknowledged waits at the broker.
//! - [`v5::Link`] (MQTT 5): the request/response inference API, which needs v5's response topic
//!   and correlation data.
//!
//! Each link owns its connection: credentials and TLS ([`BrokerConnection`]), reconnecting with
//! a [`Backoff`] the connection has to earn back, and subscribing again on every connect. The
//! parts that use a link are handlers: they get the messages of their subscription from an
//! [`Inbox`] and publish and acknowledge through a [`LinkHandle`].
//!
//! Two lessons hold for both links. rumqttc moves acks (and everything else) only while its event
//! loop is polled, so the loop never waits for room in its own request queue: subscribing and
//! acking from inside it happen on tasks of their own. And the broker's in-flight window is the
//! backpressure: the loop hands messages on without waiting, and a handler that acknowledges
//! only when done (ingest) slows the broker down.

mod connection;
mod embedded;
mod link;
pub mod v5;

use std::time::{Duration, Instant};

pub use connection::{BrokerConnection, BrokerError, TlsFiles};
pub use embedded::start_embedded;
pub use link::{Ack, Inbound, Inbox, Link, LinkConfig, LinkHandle, LinkStatus};

/// Reconnect backoff that a connection has to earn back: it resets only after the connection
/// stayed up a while, so a connect that fails again at once (a broker that drops us on
/// subscribe) backs off instead of reconnecting ten times a second.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    up_since: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: Backoff::FIRST, up_since: None }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    /// Up this long: the connection is healthy again and the next failure starts from FIRST.
    const STABLE: Duration = Duration::from_secs(10);

    pub fn connected(&mut self) {
        self.up_since = Some(Instant::now());
    }

    /// How long to wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        if self.up_since.take().is_some_and(|t| t.elapsed() >= Backoff::STABLE) {
            self.next = Backoff::FIRST;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        wait
    }
}

/// Whether `topic` matches the subscription `filter` (MQTT wildcards: `+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (exact, Some(level)) if exact == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_defines_wildcards() {
        assert!(topic_matches("adaptd/v1/r7/samples/+", "adaptd/v1/r7/samples/sorter"));
        assert!(!topic_matches("adaptd/v1/r7/samples/+", "adaptd/v1/r7/samples/sorter/x"));
        assert!(!topic_matches("adaptd/v1/r7/samples/+", "adaptd/v1/r7/samples"));
        assert!(!topic_matches("adaptd/v1/r7/samples/+", "adaptd/v1/r7/commands/sorter"));
        assert!(topic_matches("adaptd/#", "adaptd/v1/r7/events"));
        assert!(topic_matches("adaptd/v1/r7/events", "adaptd/v1/r7/events"));
        assert!(!topic_matches("adaptd/v1/r7/events", "adaptd/v1/r7/events/x"));
    }

    #[test]
    fn reconnect_backoff_is_earned_back_only_by_a_connection_that_stays_up() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..5)
            .map(|_| {
                b.connected(); // connects, then fails at once
                b.failed().as_millis()
            })
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600], "a connect that fails at once does not reset the backoff");
    }
}
