//! The watch after a promotion, and the drift signal: how the adapter serving now does on
//! freshly labelled samples, and, right after a promotion, how the adapter it replaced does on
//! the same samples. Pure: the loop scores the samples through the engine and tells the watch.

/// Correct answers out of scored samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub correct: u64,
    pub total: u64,
}

impl Tally {
    pub fn accuracy(self) -> f64 {
        if self.total == 0 { 0.0 } else { self.correct as f64 / self.total as f64 }
    }
}

pub use crate::gate::WatchLimits;

/// What the fresh samples say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to decide (yet).
    Watching,
    /// The promoted adapter held up: the watch ends.
    Passed { fresh_samples: u64, accuracy: f64, previous_accuracy: f64 },
    /// The promoted adapter does worse than the one it replaced.
    RollBack { reason: String },
}

/// The fresh-sample record of the live adapter (version `live_version`) and, after a promotion,
/// of the one before it (`P`: how the loop reaches it, to score it).
#[derive(Debug, Clone)]
pub struct RollbackWatch<P> {
    /// The newest sample already scored: the next tick scores what came after.
    pub after_id: i64,
    live_version: u64,
    live: Tally,
    previous: Option<(P, u64, Tally)>,
}

impl<P> RollbackWatch<P> {
    /// Watching `live_version` for drift only, from the samples after `after_id`.
    pub fn new(after_id: i64, live_version: u64) -> RollbackWatch<P> {
        RollbackWatch { after_id, live_version, live: Tally::default(), previous: None }
    }

    /// Just promoted `live_version` over `previous` (its version `previous_version`).
    pub fn after_promotion(after_id: i64, live_version: u64, previous: P, previous_version: u64) -> RollbackWatch<P> {
        RollbackWatch { after_id, live_version, live: Tally::default(), previous: Some((previous, previous_version, Tally::default())) }
    }

    /// What serves now is `version`: when something else moved it (a rollback, a pin),
    /// counting starts afresh and there is no comparison to make.
    pub fn serving(&mut self, version: u64) {
        if version != self.live_version {
            *self = RollbackWatch::new(self.after_id, version);
        }
    }

    /// The live adapter's accuracy on fresh labels, and on how many.
    pub fn live_accuracy(&self) -> Option<(f64, u64)> {
        (self.live.total > 0).then(|| (self.live.accuracy(), self.live.total))
    }

    /// The adapter to compare with, while the watch after a promotion runs.
    pub fn previous(&self) -> Option<&P> {
        self.previous.as_ref().map(|(p, _, _)| p)
    }

    /// Record `scored` fresh samples: `live_hits` right for the live adapter and `previous_hits`
    /// for the one before it (when watching), then judge.
    pub fn record(&mut self, scored: u64, live_hits: u64, previous_hits: Option<u64>, limits: &WatchLimits) -> Verdict {
        self.live.correct += live_hits;
        self.live.total += scored;
        let Some((_, previous_version, tally)) = &mut self.previous else { return Verdict::Watching };
        let Some(hits) = previous_hits else { return Verdict::Watching };
        tally.correct += hits;
        tally.total += scored;
        let (new_acc, old_acc) = (self.live.accuracy(), tally.accuracy());
        if self.live.total >= limits.min_samples && old_acc - new_acc > limits.rollback_drop {
            let reason = format!("on {} fresh samples v{} scores {new_acc:.4}, v{previous_version} scored {old_acc:.4}", self.live.total, self.live_version);
            Verdict::RollBack { reason }
        } else if self.live.total >= limits.max_samples {
            self.previous = None;
            Verdict::Passed { fresh_samples: self.live.total, accuracy: new_acc, previous_accuracy: old_acc }
        } else {
            Verdict::Watching
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WatchLimits = WatchLimits { min_samples: 30, rollback_drop: 0.05, max_samples: 100 };

    #[test]
    fn a_promoted_adapter_that_does_worse_is_rolled_back_once_enough_samples_say_so() {
        let mut watch = RollbackWatch::after_promotion(10, 2, "v1", 1);
        assert_eq!(watch.record(20, 10, Some(19), &LIMITS), Verdict::Watching, "too few samples to judge");
        let Verdict::RollBack { reason } = watch.record(20, 10, Some(19), &LIMITS) else { panic!("40 samples, 50 % against 95 %") };
        assert!(reason.contains("on 40 fresh samples v2 scores 0.5000, v1 scored 0.9500"), "{reason}");
    }

    #[test]
    fn a_promoted_adapter_that_holds_up_passes_and_the_watch_ends() {
        let mut watch = RollbackWatch::after_promotion(0, 2, (), 1);
        assert_eq!(watch.record(60, 57, Some(55), &LIMITS), Verdict::Watching);
        assert_eq!(watch.record(40, 38, Some(37), &LIMITS), Verdict::Passed { fresh_samples: 100, accuracy: 0.95, previous_accuracy: 0.92 });
        assert!(watch.previous().is_none());
        assert_eq!(watch.record(10, 0, None, &LIMITS), Verdict::Watching, "drift only from here on");
        assert_eq!(watch.live_accuracy(), Some((95.0 / 110.0, 110)));
    }

    #[test]
    fn another_version_serving_restarts_the_count_without_a_comparison() {
        let mut watch = RollbackWatch::after_promotion(5, 2, (), 1);
        watch.record(10, 1, Some(10), &LIMITS);
        watch.serving(2);
        assert_eq!(watch.live_accuracy(), Some((0.1, 10)), "the same version: nothing changes");
        watch.serving(1);
        assert_eq!((watch.live_accuracy(), watch.previous(), watch.after_id), (None, None, 5));
    }
}
