#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test and bench code: a failure is the report
//! The long chaos run: the real daemon and Mosquitto, poison in the stream, kill -9 and broker
//! restarts at random moments; prints what held (see `tests/integration/chaos.rs`, shared).
//!
//! cargo bench -p adaptd --bench chaos -- [rounds] [samples] [seed]

#[allow(dead_code)]
#[path = "../tests/integration/broker.rs"]
mod broker;
#[path = "../tests/integration/chaos.rs"]
mod chaos;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (rounds, samples, seed) = (arg(0, 60) as usize, arg(1, 6000) as usize, arg(2, 2026));
    println!("chaos: {rounds} rounds over {samples} samples (seed {seed})");
    let report = chaos::run(rounds, samples, seed);
    println!("{report}");
    chaos::check(&report);
    println!("every check held");
}
