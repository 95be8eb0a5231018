//! Fleet rollout of adapters, the parts that need no runtime: the TUF-signed adapter repository
//! an operator publishes releases to ([`repo`]), what a device fetches from it ([`fetch`]), the
//! device agent's state machine ([`agent`]), which the daemon drives, and the rollout
//! controller's ([`controller`]), which `adaptd fleet rollout` drives; and offers, adapters a
//! device sends up for the operator to review ([`offer`]).

pub mod agent;
pub mod controller;
pub mod fetch;
pub mod offer;
pub mod repo;
