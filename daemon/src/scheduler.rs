//! When to train: a pure state machine, no I/O, driven by observations and job outcomes.
//!
//! The adapt loop observes the world (new samples, the live adapter's accuracy on fresh labels,
//! the device's resources, serving latency, operator commands) and feeds it in; the scheduler
//! answers with at most one action. Time is a number it is given, so tests run it on any clock.

use std::time::Duration;

use serde::Deserialize;

use crate::config::units;

/// When a job starts: part of the `[schedule]` section of the configuration file (spans in
/// whole seconds there).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    /// Train once this many new labelled samples arrived since the last job (0: off).
    pub min_new_samples: u64,
    /// Train at least this often when anything new arrived (zero: off).
    #[serde(rename = "interval_s", with = "units::seconds")]
    pub interval: Duration,
    /// Train when new samples stopped arriving for this long, however few (zero: off): the last
    /// samples of a burst, or a trickle, need not wait for `min_new_samples` or the interval.
    #[serde(rename = "settle_s", with = "units::seconds")]
    pub settle: Duration,
    /// Train when the live adapter's accuracy on fresh labelled samples falls below this (0: off)...
    pub drift_accuracy: f64,
    /// ... measured over at least this many fresh samples.
    pub drift_min_samples: u64,
    /// Quiet time after a job, whatever its outcome.
    #[serde(rename = "cooldown_s", with = "units::seconds")]
    pub cooldown: Duration,
    /// Wait after a failed job; doubles per consecutive failure up to `backoff_max`.
    #[serde(rename = "backoff_initial_s", with = "units::seconds")]
    pub backoff_initial: Duration,
    #[serde(rename = "backoff_max_s", with = "units::seconds")]
    pub backoff_max: Duration,
    /// Pause training while serving's p99 latency is above this (0: off); resume below 80 % of it.
    pub latency_budget_ms: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            min_new_samples: 200,
            interval: Duration::from_secs(3600),
            settle: Duration::from_secs(60),
            drift_accuracy: 0.0,
            drift_min_samples: 50,
            cooldown: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(30),
            backoff_max: Duration::from_secs(3600),
            latency_budget_ms: 0.0,
        }
    }
}

/// A span on the scheduler's millisecond clock.
fn ms(span: Duration) -> u64 {
    u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
}

pub use adaptd_protocol::{SchedulerState, Trigger};

/// What the adapt loop saw on one tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    pub now_ms: u64,
    /// Labelled samples stored since the last job started.
    pub new_samples: u64,
    /// The live adapter's accuracy on fresh labelled samples, and over how many.
    pub live_accuracy: Option<(f64, u64)>,
    /// Why the device cannot train now (CPU, memory, temperature, GPU), if it cannot.
    pub device_busy: Option<String>,
    /// Serving's recent p99 latency.
    pub serving_p99_ms: Option<f64>,
    /// An operator asked for a job now.
    pub operator_request: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(Trigger),
    Pause { reason: String },
    Resume,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Promoted,
    Rejected,
    /// Deferred before training (too few samples, a class without samples): not a failure.
    Deferred(String),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    state: SchedulerState,
    last_job_ms: Option<u64>,
    failures: u32,
    /// The new-sample count last seen, since when, and the count a settled job last started on
    /// (so a job that was deferred for too few samples is not started again until more arrive).
    arrivals: (u64, u64),
    settled_on: Option<u64>,
}

impl Scheduler {
    /// New thresholds (a configuration reload); the state and its history stay.
    pub fn reconfigure(&mut self, config: SchedulerConfig) {
        self.config = config;
    }

    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler { config, state: SchedulerState::Idle, last_job_ms: None, failures: 0, arrivals: (0, 0), settled_on: None }
    }

    pub fn state(&self) -> &SchedulerState {
        &self.state
    }

    pub fn observe(&mut self, o: &Observation) -> Option<Action> {
        if o.new_samples != self.arrivals.0 && !matches!(self.state, SchedulerState::Training { .. } | SchedulerState::Validating) {
            self.arrivals = (o.new_samples, o.now_ms);
        }
        let c = &self.config;
        match &mut self.state {
            SchedulerState::Training { paused, .. } => {
                let p99 = o.serving_p99_ms?;
                if c.latency_budget_ms <= 0.0 {
                    return None;
                }
                if !*paused && p99 > c.latency_budget_ms {
                    *paused = true;
                    return Some(Action::Pause { reason: format!("serving p99 {p99:.1} ms is over the {:.1} ms budget", c.latency_budget_ms) });
                }
                if *paused && p99 < 0.8 * c.latency_budget_ms {
                    *paused = false;
                    return Some(Action::Resume);
                }
                None
            }
            SchedulerState::Validating => None,
            SchedulerState::Cooldown { until_ms } | SchedulerState::Backoff { until_ms, .. } if o.now_ms < *until_ms && !o.operator_request => None,
            _ => {
                let trigger = self.trigger(o);
                match (trigger, &o.device_busy) {
                    (Some(_), Some(busy)) => {
                        self.state = SchedulerState::Collecting { waiting_for: format!("device: {busy}") };
                        None
                    }
                    (Some(t), None) => {
                        if t == Trigger::Settled {
                            self.settled_on = Some(o.new_samples);
                        }
                        self.state = SchedulerState::Training { trigger: t, since_ms: o.now_ms, paused: false };
                        self.last_job_ms = Some(o.now_ms);
                        Some(Action::Start(t))
                    }
                    (None, _) if o.new_samples > 0 => {
                        self.state = SchedulerState::Collecting { waiting_for: format!("{} of {} new samples", o.new_samples, self.config.min_new_samples) };
                        None
                    }
                    (None, _) => {
                        if !matches!(self.state, SchedulerState::Backoff { .. }) {
                            self.state = SchedulerState::Idle;
                        }
                        None
                    }
                }
            }
        }
    }

    fn trigger(&self, o: &Observation) -> Option<Trigger> {
        let c = &self.config;
        if o.operator_request {
            return Some(Trigger::Operator);
        }
        if c.drift_accuracy > 0.0
            && let Some((acc, n)) = o.live_accuracy
            && n >= c.drift_min_samples
            && acc < c.drift_accuracy
            && o.new_samples > 0
        {
            return Some(Trigger::Drift);
        }
        if c.min_new_samples > 0 && o.new_samples >= c.min_new_samples {
            return Some(Trigger::NewSamples);
        }
        if !c.interval.is_zero() && o.new_samples > 0 && self.last_job_ms.is_some_and(|t| o.now_ms >= t.saturating_add(ms(c.interval))) {
            return Some(Trigger::Interval);
        }
        let (count, since_ms) = self.arrivals;
        if !c.settle.is_zero()
            && o.new_samples > 0
            && count == o.new_samples
            && o.now_ms >= since_ms.saturating_add(ms(c.settle))
            && self.settled_on != Some(o.new_samples)
        {
            return Some(Trigger::Settled);
        }
        None
    }

    /// The job trains once more after its gate (a pseudo-label candidate): pauses apply again.
    pub fn training_again(&mut self, trigger: Trigger, now_ms: u64) {
        if matches!(self.state, SchedulerState::Validating) {
            self.state = SchedulerState::Training { trigger, since_ms: now_ms, paused: false };
        }
    }

    /// The trainer finished (the gate decides next).
    pub fn training_done(&mut self) {
        if matches!(self.state, SchedulerState::Training { .. }) {
            self.state = SchedulerState::Validating;
        }
    }

    pub fn finished(&mut self, now_ms: u64, outcome: &Outcome) {
        match outcome {
            Outcome::Promoted | Outcome::Rejected => {
                self.failures = 0;
                self.state = SchedulerState::Cooldown { until_ms: now_ms.saturating_add(ms(self.config.cooldown)) };
            }
            Outcome::Deferred(reason) => {
                // Not a failure: try again after the cooldown, not on the next tick.
                self.state =
                    SchedulerState::Backoff { until_ms: now_ms.saturating_add(ms(self.config.cooldown)), failures: self.failures, reason: reason.clone() };
            }
            Outcome::Failed(reason) => {
                self.failures += 1;
                let wait = ms(self.config.backoff_initial).saturating_mul(1 << (self.failures - 1).min(20)).min(ms(self.config.backoff_max));
                self.state = SchedulerState::Backoff { until_ms: now_ms.saturating_add(wait), failures: self.failures, reason: reason.clone() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(now_ms: u64, new_samples: u64) -> Observation {
        Observation { now_ms, new_samples, ..Observation::default() }
    }

    fn config() -> SchedulerConfig {
        SchedulerConfig {
            min_new_samples: 10,
            interval: Duration::from_secs(60),
            settle: Duration::ZERO,
            drift_accuracy: 0.8,
            drift_min_samples: 5,
            cooldown: Duration::from_secs(1),
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(5),
            latency_budget_ms: 50.0,
        }
    }

    #[test]
    fn collects_until_enough_samples_then_trains_then_cools_down() {
        let mut s = Scheduler::new(config());
        assert_eq!(s.observe(&obs(0, 0)), None);
        assert_eq!(s.state(), &SchedulerState::Idle);
        assert_eq!(s.observe(&obs(1, 3)), None);
        assert!(matches!(s.state(), SchedulerState::Collecting { .. }));
        assert_eq!(s.observe(&obs(2, 10)), Some(Action::Start(Trigger::NewSamples)));
        assert!(matches!(s.state(), SchedulerState::Training { .. }));
        assert_eq!(s.observe(&obs(3, 50)), None, "one job at a time");
        s.training_done();
        assert_eq!(s.state(), &SchedulerState::Validating);
        s.finished(100, &Outcome::Promoted);
        assert_eq!(s.observe(&obs(500, 20)), None, "cooling down");
        assert_eq!(s.observe(&obs(1_100, 20)), Some(Action::Start(Trigger::NewSamples)));
    }

    #[test]
    fn samples_that_stopped_arriving_are_trained_on_once_settled() {
        let mut s = Scheduler::new(SchedulerConfig { settle: Duration::from_secs(5), interval: Duration::ZERO, ..config() });
        assert_eq!(s.observe(&obs(0, 3)), None);
        assert_eq!(s.observe(&obs(2_000, 6)), None, "still arriving");
        assert_eq!(s.observe(&obs(6_000, 6)), None, "quiet for 4 s only");
        assert_eq!(s.observe(&obs(7_000, 6)), Some(Action::Start(Trigger::Settled)), "quiet for 5 s: fewer than min_new_samples, trained anyway");
        s.training_done();
        s.finished(7_100, &Outcome::Deferred("too few".into()));
        // The job marked them seen: nothing new, nothing to start again, however long it stays quiet.
        assert_eq!(s.observe(&obs(20_000, 0)), None);
        assert_eq!(s.observe(&obs(21_000, 2)), None, "two more arrive");
        assert_eq!(s.observe(&obs(26_000, 2)), Some(Action::Start(Trigger::Settled)));
        let mut off = Scheduler::new(SchedulerConfig { settle: Duration::ZERO, interval: Duration::ZERO, ..config() });
        assert_eq!(off.observe(&obs(0, 3)), None);
        assert_eq!(off.observe(&obs(1_000_000, 3)), None, "settle = 0: off");
    }

    #[test]
    fn a_busy_device_defers_and_an_operator_overrides_cooldown() {
        let mut s = Scheduler::new(config());
        let busy = Observation { device_busy: Some("temperature 91 C over 85 C".into()), ..obs(0, 100) };
        assert_eq!(s.observe(&busy), None);
        assert!(matches!(s.state(), SchedulerState::Collecting { waiting_for } if waiting_for.contains("temperature")));
        assert_eq!(s.observe(&obs(1, 100)), Some(Action::Start(Trigger::NewSamples)));
        s.training_done();
        s.finished(10, &Outcome::Rejected);
        let now = Observation { operator_request: true, ..obs(11, 0) };
        assert_eq!(s.observe(&now), Some(Action::Start(Trigger::Operator)));
    }

    #[test]
    fn drift_and_interval_trigger() {
        let mut s = Scheduler::new(config());
        let drifting = Observation { live_accuracy: Some((0.5, 5)), ..obs(0, 2) };
        assert_eq!(s.observe(&drifting), Some(Action::Start(Trigger::Drift)));
        s.training_done();
        s.finished(0, &Outcome::Rejected);
        let too_few = Observation { live_accuracy: Some((0.5, 4)), ..obs(2_000, 2) };
        assert_eq!(s.observe(&too_few), None, "drift needs enough fresh samples");
        assert_eq!(s.observe(&obs(60_000, 2)), Some(Action::Start(Trigger::Interval)));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let mut s = Scheduler::new(config());
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..4 {
            assert_eq!(s.observe(&obs(now, 100)), Some(Action::Start(Trigger::NewSamples)));
            s.finished(now, &Outcome::Failed("loss became NaN".into()));
            let SchedulerState::Backoff { until_ms, .. } = s.state().clone() else { panic!("{:?}", s.state()) };
            waits.push(until_ms - now);
            assert_eq!(s.observe(&obs(until_ms - 1, 100)), None);
            now = until_ms;
        }
        assert_eq!(waits, vec![2_000, 4_000, 5_000, 5_000]);
        assert_eq!(s.observe(&obs(now, 100)), Some(Action::Start(Trigger::NewSamples)));
        s.finished(now, &Outcome::Promoted);
        assert!(matches!(s.state(), SchedulerState::Cooldown { .. }), "success resets the backoff");
    }

    #[test]
    fn training_pauses_over_the_latency_budget_and_resumes_with_hysteresis() {
        let mut s = Scheduler::new(config());
        s.observe(&obs(0, 100));
        let at = |p99: f64| Observation { serving_p99_ms: Some(p99), ..obs(1, 0) };
        assert_eq!(s.observe(&at(30.0)), None);
        assert!(matches!(s.observe(&at(60.0)), Some(Action::Pause { .. })));
        assert_eq!(s.observe(&at(45.0)), None, "not yet below 80 % of the budget");
        assert_eq!(s.observe(&at(35.0)), Some(Action::Resume));
    }
}
