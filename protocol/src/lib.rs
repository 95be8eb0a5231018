//! adaptd's contracts with everything outside one part of it: the MQTT topic tree, the events an
//! operator sees (on MQTT, in the log, in the journal the report reads), a task's status, the
//! answer to an operator's command, and the bodies of inference requests, answers and samples. Plain data and serde, no runtime: the daemon, its CLI, the
//! report, the tests and the documentation check all build on these types, so a field cannot
//! change in one place and not in another.

pub mod event;
pub mod fleet;
pub mod gate;
pub mod status;
pub mod topics;
pub mod wire;

pub use event::{Event, EventRecord, SuspectSource};
pub use status::{CommandReply, ImportRequest, SchedulerState, TaskStatus, Trigger};
pub use topics::Topics;

/// Serde helpers for figures that are NaN when there is nothing to measure: JSON writes NaN as
/// `null`, and reads `null` back as NaN.
pub mod nan {
    use serde::{Deserialize, Deserializer};

    pub fn f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}
