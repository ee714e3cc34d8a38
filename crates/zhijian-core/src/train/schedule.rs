//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

/// How the learning rate evolves after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay to zero over the remaining steps (the default).
    #[default]
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant after warm-up.
    Constant,
}

impl Schedule {
    /// Learning-rate multiplier at `step` (0-based) of `total`, with `warmup`
    /// linear warm-up steps (the first step already trains, at `1/warmup`).
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => 1.0 - progress,
            Schedule::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::Cosine;
        assert_eq!(s.factor(0, 110, 10), 0.1);
        assert_eq!(s.factor(9, 110, 10), 1.0);
        assert_eq!(s.factor(10, 110, 10), 1.0);
        assert!((s.factor(60, 110, 10) - 0.5).abs() < 1e-12);
        assert!(s.factor(109, 110, 10) < 0.01);
        assert_eq!(Schedule::Linear.factor(60, 110, 10), 0.5);
        assert_eq!(Schedule::Constant.factor(100, 110, 10), 1.0);
    }
}
