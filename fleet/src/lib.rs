//! Fleet rollout of adapters, the parts that need no runtime: the TUF-signed adapter repository
//! an operator publishes releases to ([`repo`]) and the device agent's state machine
//! ([`agent`]), which the daemon drives.

pub mod agent;
pub mod fetch;
pub mod repo;
