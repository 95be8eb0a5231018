//! The MQTT topic tree, built in one place: `{prefix}/{device}/{kind}[/{task}]`, the prefix
//! carrying the protocol version (`adaptd/v1`).

/// The topic root of this protocol version.
pub const DEFAULT_PREFIX: &str = "adaptd/v1";

/// What a topic under a device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Labelled samples for a task (ingest).
    Samples,
    /// Inference requests for a task (MQTT v5 request/response).
    Infer,
    /// Signed operator commands for a task.
    Commands,
    /// The fleet controller's assignment for a task (retained).
    Assign,
    /// The device's rollout state for a task (retained).
    Rollout,
    /// Requests for the labels of served inputs that would help most.
    LabelRequests,
}

impl Channel {
    fn segment(self) -> &'static str {
        match self {
            Channel::Samples => "samples",
            Channel::Infer => "infer",
            Channel::Commands => "commands",
            Channel::Assign => "assign",
            Channel::Rollout => "rollout",
            Channel::LabelRequests => "label_requests",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    device: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Topics {
        Topics { prefix: prefix.trim_end_matches('/').to_string(), device: device.to_string() }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// `{prefix}/{device}/{channel}/{task}`.
    pub fn task(&self, channel: Channel, task: &str) -> String {
        format!("{}/{}/{}/{task}", self.prefix, self.device, channel.segment())
    }

    /// The subscription filter for every task of `channel`: `{prefix}/{device}/{channel}/+`.
    pub fn every_task(&self, channel: Channel) -> String {
        self.task(channel, "+")
    }

    /// The task a topic of `channel` names; None for any other topic (or a task with a `/`).
    pub fn task_of<'t>(&self, channel: Channel, topic: &'t str) -> Option<&'t str> {
        let task = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix('/')?
            .strip_prefix(&self.device)?
            .strip_prefix('/')?
            .strip_prefix(channel.segment())?
            .strip_prefix('/')?;
        (!task.is_empty() && !task.contains('/')).then_some(task)
    }

    /// Where the device's events go: `{prefix}/{device}/events`.
    pub fn events(&self) -> String {
        format!("{}/{}/events", self.prefix, self.device)
    }

    /// Whether the device is online: `{prefix}/{device}/online` (retained; the last will says
    /// `offline`).
    pub fn online(&self) -> String {
        format!("{}/{}/online", self.prefix, self.device)
    }

    /// Every device's topic of `channel` for every task, for the fleet controller:
    /// `{prefix}/+/{channel}/+`.
    pub fn fleet_wide(prefix: &str, channel: Channel) -> String {
        format!("{}/+/{}/+", prefix.trim_end_matches('/'), channel.segment())
    }

    /// Where an MQTT v3 client (no response-topic property) gets its answer.
    pub fn default_response(request_topic: &str) -> String {
        format!("{request_topic}/response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_built_and_read_back_in_one_place() {
        let t = Topics::new("adaptd/v1/", "robot-7");
        assert_eq!(t.task(Channel::Samples, "sorter"), "adaptd/v1/robot-7/samples/sorter");
        assert_eq!(t.every_task(Channel::Infer), "adaptd/v1/robot-7/infer/+");
        assert_eq!(t.events(), "adaptd/v1/robot-7/events");
        assert_eq!(t.task_of(Channel::Commands, "adaptd/v1/robot-7/commands/sorter"), Some("sorter"));
        assert_eq!(t.task_of(Channel::Samples, "adaptd/v1/robot-7/commands/sorter"), None);
        assert_eq!(t.task_of(Channel::Samples, "adaptd/v1/robot-8/samples/sorter"), None);
        assert_eq!(t.task_of(Channel::Samples, "adaptd/v1/robot-7/samples/a/b"), None);
        assert_eq!(t.task_of(Channel::Samples, "adaptd/v1/robot-7/samples/"), None);
        assert_eq!(Topics::default_response("x/infer/t"), "x/infer/t/response");
        assert_eq!(t.task(Channel::Assign, "sorter"), "adaptd/v1/robot-7/assign/sorter");
        assert_eq!(t.online(), "adaptd/v1/robot-7/online");
        assert_eq!(Topics::fleet_wide("adaptd/v1", Channel::Rollout), "adaptd/v1/+/rollout/+");
    }
}
