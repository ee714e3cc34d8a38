//! KD: distillation of the teacher's softened class probabilities (Hinton,
//! Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
//! <https://arxiv.org/abs/1503.02531>; RepDistiller `distiller_zoo/KD.py`).
//!
//! ```text
//! loss = T² · (1/b) Σ_i KL(softmax(t_i / T) ‖ softmax(s_i / T))
//! ```
//!
//! summed over classes and averaged over the batch, T = 4; the T² keeps the
//! gradients' scale independent of T. Student and teacher need the same
//! classes (the same number; their order is the user's business).
//!
//! - trains: whatever the strategy trains (the student); no parts of its own.
//! - weight 9: RepDistiller's KD run weighs the cross-entropy 0.1 and KD 0.9
//!   (`-r 0.1 -a 0.9`); the engine weighs the cross-entropy 1, so the same
//!   balance is KD × 9 (the whole loss is then 10× the reference's, which
//!   Adam's updates do not see).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, check_positive, check_weight};

/// Configuration of KD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdLogitsConfig {
    /// Weight of the loss beside the cross-entropy (weight 1). Default 9,
    /// RepDistiller's balance 0.9 : 0.1.
    pub weight: f64,
    /// Softmax temperature T, > 0. Default 4.
    pub temperature: f64,
}

impl Default for KdLogitsConfig {
    fn default() -> Self {
        KdLogitsConfig { weight: 9.0, temperature: 4.0 }
    }
}

/// The KD loss.
pub struct KdLogitsLoss {
    config: KdLogitsConfig,
}

/// The `kd_logits` method.
pub type KdLogits = Distiller<KdLogitsLoss>;

/// `T² · mean_i KL(softmax(t_i/T) ‖ softmax(s_i/T))`.
///
/// # Shapes
/// `s`, `t`: `[b, classes]` → scalar.
pub fn kd_loss(s: &Tensor, t: &Tensor, temperature: f64) -> Tensor {
    let log_p_s = (s / temperature).log_softmax(1, Kind::Float);
    let log_p_t = (t / temperature).log_softmax(1, Kind::Float);
    let kl = (log_p_t.exp() * (&log_p_t - log_p_s)).sum(Kind::Float);
    kl / s.size()[0] as f64 * temperature * temperature
}

impl DistillLoss for KdLogitsLoss {
    const NAME: &'static str = "kd_logits";
    type Config = KdLogitsConfig;

    fn new(config: KdLogitsConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_positive(Self::NAME, "temperature", config.temperature)?;
        Ok(KdLogitsLoss { config })
    }

    fn config(&self) -> &KdLogitsConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        None
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        Ok(kd_loss(s, t, self.config.temperature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;

    /// Two examples, three classes, T = 2, against the KL written out.
    #[test]
    fn kd_matches_the_kl_written_out() {
        let (s, tt) = ([1.0, 2.0, 0.5, -1.0, 0.0, 1.0], [2.0, 1.0, 0.0, 0.5, 0.5, -0.5]);
        let temp = 2.0;
        let softmax = |z: &[f64]| {
            let e: Vec<f64> = z.iter().map(|v| (v / temp).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<_>>()
        };
        let mut want = 0.0;
        for i in 0..2 {
            let (p_s, p_t) = (softmax(&s[3 * i..3 * i + 3]), softmax(&tt[3 * i..3 * i + 3]));
            want += (0..3).map(|c| p_t[c] * (p_t[c] / p_s[c]).ln()).sum::<f64>();
        }
        want = want / 2.0 * temp * temp;
        close(value(&kd_loss(&t(&s, &[2, 3]), &t(&tt, &[2, 3]), temp)), want);
        // Through the method: weighted, and zero when the student copies the teacher.
        let m = KdLogits::new(KdLogitsConfig { weight: 3.0, temperature: temp }).unwrap();
        let l = m.extra_loss(&testing::logit_step(&t(&s, &[2, 3]), &t(&tt, &[2, 3]))).unwrap();
        close(value(&l), 3.0 * want);
        close(value(&kd_loss(&t(&tt, &[2, 3]), &t(&tt, &[2, 3]), temp)), 0.0);
        assert!(KdLogits::new(KdLogitsConfig { temperature: 0.0, ..Default::default() }).is_err());
    }
}
