//! AT: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
//! Attention", ICLR 2017, <https://arxiv.org/abs/1612.03928>; RepDistiller
//! `distiller_zoo/AT.py`).
//!
//! The attention map of a feature is the mean over channels of `|f|^p` at
//! each position, flattened and scaled to unit L2 norm; the loss is the mean
//! squared difference of the student's and the teacher's maps:
//!
//! ```text
//! a(f) = normalize(mean_c f^p)       loss = mean_{i, position} (a(f_s) − a(f_t))²
//! ```
//!
//! (`|f|^p` as the paper; the reference's `f^p` is the same for p = 2).
//! p = 2, β = 1000 (RepDistiller's run script; it sums the loss over every
//! stage's output, here one pair of taps).
//!
//! - features: the last block on both sides by default; maps of different
//!   sizes are pooled to the smaller (adaptive average pooling, as the
//!   reference). Token sequences (ViT, BERT) count each token as a position,
//!   which compares only sequences of one length: otherwise the first step
//!   fails with an error. Vectors (pooled features, MLP blocks) are refused:
//!   one position's map is always 1.
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, Form, align, by_position, check_positive, check_weight, need_positions, normalize};

/// Configuration of attention transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AtConfig {
    /// β, weight of the loss beside the cross-entropy. Default 1000.
    pub weight: f64,
    /// Exponent p of the attention map, > 0. Default 2.
    pub p: f64,
    /// The student's feature: `"last"`, a block index, or `"pooled"` (refused). Default last.
    pub student: Feature,
    /// The teacher's feature. Default last.
    pub teacher: Feature,
}

impl Default for AtConfig {
    fn default() -> Self {
        AtConfig { weight: 1000.0, p: 2.0, student: Feature::Last, teacher: Feature::Last }
    }
}

/// The attention-transfer loss.
pub struct AtLoss {
    config: AtConfig,
}

/// The `at` method.
pub type At = Distiller<AtLoss>;

/// The attention map `[b, positions]` of a feature (maps, tokens).
fn attention(f: &Tensor, p: f64) -> Tensor {
    normalize(&by_position(f).abs().pow_tensor_scalar(p).mean_dim(1, false, Kind::Float), 1)
}

/// `mean (a(s) − a(t))²` after bringing `s`, `t` to the same positions.
pub fn at_loss(s: &Tensor, t: &Tensor, p: f64) -> std::result::Result<Tensor, String> {
    let (s, t) = align(s, t)?;
    Ok((attention(&s, p) - attention(&t, p)).square().mean(Kind::Float))
}

impl DistillLoss for AtLoss {
    const NAME: &'static str = "at";
    type Config = AtConfig;

    fn new(config: AtConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_positive(Self::NAME, "p", config.p)?;
        Ok(AtLoss { config })
    }

    fn config(&self) -> &AtConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn check(&self, s: Form, t: Form) -> std::result::Result<(), String> {
        need_positions(s, t)
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        at_loss(s, t, self.config.p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    fn unit(v: &[f64]) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// A 2×2 student map (2 channels) pooled to the teacher's 1×2 (3 channels), against the maps written out.
    #[test]
    fn at_matches_the_maps_written_out() {
        // Student [1, 2, 2, 2]: channel 0 rows (1, 2), (3, 0); channel 1 rows (0, 1), (-1, 2).
        let s = [1.0, 2.0, 3.0, 0.0, 0.0, 1.0, -1.0, 2.0];
        // Teacher [1, 3, 1, 2].
        let tt = [1.0, 0.0, 2.0, 1.0, -1.0, 1.0];
        // Pooling to 1×2 averages each column: channel 0 (2, 1), channel 1 (-0.5, 1.5).
        let pooled: [[f64; 2]; 2] = [[2.0, 1.0], [-0.5, 1.5]];
        let a_s = unit(&[(pooled[0][0].powi(2) + pooled[1][0].powi(2)) / 2.0, (pooled[0][1].powi(2) + pooled[1][1].powi(2)) / 2.0]);
        let a_t = unit(&[(1.0 + 4.0 + 1.0) / 3.0, (0.0 + 1.0 + 1.0) / 3.0]);
        let want = ((a_s[0] - a_t[0]).powi(2) + (a_s[1] - a_t[1]).powi(2)) / 2.0;
        close(value(&at_loss(&t(&s, &[1, 2, 2, 2]), &t(&tt, &[1, 3, 1, 2]), 2.0).unwrap()), want);
        // Tokens: each token a position; lengths must match.
        let (a, b) = (t(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 2]), t(&[1.0, 0.0, 0.0, 1.0, 2.0, 2.0], &[1, 2, 3]));
        let a_s = unit(&[(1.0 + 4.0) / 2.0, (9.0 + 16.0) / 2.0]);
        let a_t = unit(&[1.0 / 3.0, 9.0 / 3.0]);
        let want = ((a_s[0] - a_t[0]).powi(2) + (a_s[1] - a_t[1]).powi(2)) / 2.0;
        close(value(&at_loss(&a, &b, 2.0).unwrap()), want);
        let err = at_loss(&a, &t(&[0.0; 9], &[1, 3, 3]), 2.0).unwrap_err();
        assert!(err.contains("2 tokens") && err.contains("3"), "{err}");
    }

    /// Pooled features are refused up front; token sequences of different
    /// lengths stop the run at the first step with the reason.
    #[test]
    fn at_refuses_vectors_and_unequal_sequences() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12])));
        let split = testing::images(0);
        let mut m = At::new(AtConfig { student: Feature::Pooled, ..Default::default() }).unwrap();
        m.prepare(&student).unwrap();
        let err = m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap_err().to_string();
        assert!(err.contains("`at`") && err.contains("one vector per example"), "{err}");

        // ViTs of one patch grid (17 tokens) compare token by token.
        let (student, teacher) = (testing::vit(0, 16, 4), testing::teacher(testing::vit(1, 24, 4)));
        let mut m = At::new(AtConfig::default()).unwrap();
        m.prepare(&student).unwrap();
        m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap();
        assert!(value(&testing::one_loss(&student, &teacher, &split, &m)).is_finite());
        // A teacher with patch 8 has 5 tokens: the run stops at its first step, saying why.
        let teacher = testing::teacher(testing::vit(1, 24, 8));
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(At::new(AtConfig::default()).unwrap())];
        zhijian_core::train::prepare(&student, &mut methods, 0).unwrap();
        let cfg = TrainConfig { max_steps: 2, batch_size: 4, ..Default::default() };
        let opts = zhijian_core::train::TrainOptions { teacher: Some(&teacher), ..Default::default() };
        let err = zhijian_core::train::train(&student, &mut methods, &split, None, &cfg, &opts).expect_err("refused").to_string();
        assert!(err.contains("`at`") && err.contains("17 tokens") && err.contains("pooled"), "{err}");
    }
}
