//! Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler`: powers of two, so scaling
//! and unscaling are exact.

/// Dynamic loss scaling for fp16 autocast, as PyTorch's `GradScaler`: the loss is multiplied by
/// `scale` before the backward pass and the gradients divided by it after; a step whose
/// gradients overflowed is skipped and the scale halved, and after [`LossScale::GROWTH_INTERVAL`]
/// good steps in a row it doubles. Powers of two, so scaling and unscaling are exact.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScale {
    scale: f64,
    good_steps: usize,
    /// Steps skipped for non-finite gradients, for the report.
    pub skipped: usize,
}

impl LossScale {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new() -> LossScale {
        LossScale { scale: Self::INITIAL, good_steps: 0, skipped: 0 }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// After a scaled backward pass: whether to apply the step. Updates the scale.
    pub fn update(&mut self, gradients_finite: bool) -> bool {
        if gradients_finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
        }
        gradients_finite
    }
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_halves_on_overflow_and_grows_after_a_run_of_good_steps() {
        let mut scale = LossScale::new();
        assert!(!scale.update(false), "an overflowing step is skipped");
        assert_eq!((scale.scale(), scale.skipped), (LossScale::INITIAL / 2.0, 1));
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert!(scale.update(true));
        }
        assert_eq!(scale.scale(), LossScale::INITIAL / 2.0, "not yet a full run of good steps");
        assert!(scale.update(true));
        assert_eq!(scale.scale(), LossScale::INITIAL);
        for _ in 0..40 {
            scale.update(false);
        }
        assert_eq!(scale.scale(), 1.0, "the scale never drops below 1");
    }
}
