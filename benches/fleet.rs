#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench code
//! The rollout controller at fleet scale: 10,000 devices' status reports, each as the JSON it
//! arrives as, parsed and folded into the rollout, then one step that hands out the next wave.
//! The goal is under a second. Median of 5 runs.

use std::time::Instant;

use adaptd_fleet::controller::{FailureThreshold, Plan, Rollout};
use adaptd_protocol::fleet::{AgentState, AgentStatus, Policy};

const DEVICES: usize = 10_000;

fn main() {
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("robot-{i:05}")).collect();
    let plan = Plan {
        id: "bench".into(),
        task: "sorter".into(),
        release: 2,
        policy: Policy::Validate,
        rollback: false,
        waves: Plan::waves_of(&devices, &[100, 900, 9_000]),
        success_percent: 95.0,
        failures: FailureThreshold { count: None, percent: Some(5.0), min_executed: 100 },
        device_timeout_ms: 3_600_000,
        per_minute: None,
        base_sha256: None,
    };
    let mut runs = Vec::new();
    for _ in 0..5 {
        let mut rollout = Rollout::new(plan.clone(), Default::default());
        // Every device assigned (as if each wave had gone out), then every report at once.
        rollout.step(0);
        for wave in 1..plan.waves.len() {
            for d in &plan.waves[wave - 1] {
                rollout.observe(d, &status(1, AgentState::Applied));
            }
            rollout.step(wave as u64);
        }
        let reports: Vec<(String, Vec<u8>)> = devices.iter().map(|d| (d.clone(), serde_json::to_vec(&status(1, AgentState::Committed)).unwrap())).collect();
        let started = Instant::now();
        for (device, payload) in &reports {
            let status: AgentStatus = serde_json::from_slice(payload).unwrap();
            rollout.observe(device, &status);
        }
        rollout.step(10);
        runs.push(started.elapsed().as_secs_f64());
        assert!(rollout.finished(), "{:?}", rollout.phase);
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    let median = runs[runs.len() / 2];
    println!("fleet controller: {DEVICES} status reports parsed and folded, then a step: median {:.1} ms of 5 (goal < 1000 ms)", median * 1000.0);
}

fn status(seq: u64, state: AgentState) -> AgentStatus {
    AgentStatus {
        task: "sorter".into(),
        state,
        seq: Some(seq),
        release: Some(2),
        rollout: Some("bench".into()),
        reason: None,
        message: None,
        serving_version: 3,
        serving_release: Some(2),
        bytes: None,
        scores: None,
        time_ms: 0,
        base_sha256: None,
    }
}
