//! Fleet rollout of adapters. This crate holds what needs no runtime: the TUF-signed adapter
//! repository an operator publishes releases to ([`repo`]).

pub mod repo;
