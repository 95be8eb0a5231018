//! The `adaptd` command's library: what the binary runs besides the daemon itself (which is the
//! `adaptd-daemon` crate), kept out of the daemon so a device's serving process links none of it.
//!
//! - `ops`: the operator commands (status, train, samples, adapters) against a daemon or its state.
//! - `client`: a blocking client for a running daemon's HTTP API (the operator commands').
//! - `demo`: the one-command demo: a simulated fleet teaches the daemon a shifted domain.
//! - `report`: the HTML report of what the loop did (charts from the journal).
//! - `doctor`: what this device can run, measured (execution providers, training speed).
//! - `parity`: proof that the serving and training graphs compute the same function.
//! - `datasets`: the reference data shipped with the reference bundles.
//! - `paths`: where the set-up step put bundles and data.

pub mod client;
pub mod datasets;
pub mod demo;
pub mod doctor;
pub mod ops;
pub mod parity;
pub mod paths;
pub mod report;
