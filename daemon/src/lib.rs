//! adaptd: an on-device adaptation daemon. It serves a frozen base model (ONNX Runtime), collects
//! labelled samples, fine-tunes adapters on the device (libtorch), validates and hot-swaps them.
//!
//! Where each step of the loop lives:
//! - `engine`: the serving graph on ONNX Runtime, one owner thread, micro-batched.
//! - `registry`: which adapter serves each task; atomic promotion, rollback, recovery.
//! - `preprocess`: client input (text, images, tensors) into model inputs.
//! - `api`: the inference API over HTTP and MQTT v5 request/response.
//! - `config`: the configuration file; unknown keys are errors.
//! - `mqtt`: the device's MQTT links (one per MQTT version) and the embedded broker (rumqttd).
//! - `ingest`: labelled samples over MQTT, acked only once durable.
//! - `samples`: the durable, deduplicated sample store (SQLite, WAL) with stable splits.
//! - `scheduler`: when to train (a pure state machine); `resources`: whether the device can.
//! - `trainer`: the libtorch owner thread that fits heads and LoRA adapters.
//! - `gate`: whether a candidate is promoted, with the figures.
//! - `adapt`: the loop that ties store, scheduler, trainer, gate and registry together.
//! - `fleet`: the fleet agent: releases from the signed repository, judged by the task's loop.
//! - `app`: the supervisor: named tasks stopped in stages within a deadline.
//! - `serve`: the serving process: engine, registry and APIs until shutdown.
//! - `systemd`: sd_notify (ready, status, watchdog) without libsystemd.
//! - adapters, bundles and training: the `adaptd-adapters` crate.

pub mod adapt;
pub mod api;
pub mod app;
pub mod config;
pub mod control;
pub mod engine;
pub mod events;
pub mod fleet;
pub mod gate;
pub mod ingest;
pub mod labels;
pub mod mqtt;
pub mod preprocess;
pub mod registry;
pub mod resources;
pub mod samples;
pub mod scheduler;
pub mod serve;
pub mod systemd;
pub mod traffic;
pub mod trainer;

/// Lower the calling thread's CPU priority (nice 10) so serving wins the cores over background
/// work: training, validation, promotion I/O. On Linux nice values are per thread.
pub fn background_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority has no memory-safety preconditions; `0` names the calling thread.
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, 0, 10) != 0 {
            tracing::debug!("could not lower the thread's priority; continuing at normal priority");
        }
    }
}
