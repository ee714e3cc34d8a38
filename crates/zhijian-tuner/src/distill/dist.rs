//! DIST: distillation of the relations between predictions (Huang, You,
//! Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS
//! 2022, <https://arxiv.org/abs/2205.10536>; reference `hunto/DIST_KD`,
//! `image_classification_sota/lib/models/losses/dist_kd.py`).
//!
//! With `y = softmax(z / τ)` for student and teacher and ρ the Pearson
//! correlation (cosine of the centred vectors, `ε = 1e-8` in the denominator):
//!
//! ```text
//! inter = 1 − mean_i ρ(y_s[i, :], y_t[i, :])     (each example's class distribution)
//! intra = 1 − mean_c ρ(y_s[:, c], y_t[:, c])     (each class across the batch)
//! loss  = τ² · (β · inter + γ · intra)
//! ```
//!
//! Defaults β = γ = 1, τ = 1: the reference's ImageNet setting (`dist`); its
//! CIFAR setting is β = γ = 2, τ = 4 (`dist_t4`). The loss weight 1 is the
//! reference's `kd_loss_weight` default. Student and teacher need the same
//! number of classes.
//!
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, check_positive, check_weight};

/// Configuration of DIST.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// Weight of the loss beside the cross-entropy (weight 1). Default 1.
    pub weight: f64,
    /// β, weight of the inter-class relation (per example). Default 1.
    pub inter: f64,
    /// γ, weight of the intra-class relation (per class). Default 1.
    pub intra: f64,
    /// Softmax temperature τ, > 0. Default 1.
    pub temperature: f64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { weight: 1.0, inter: 1.0, intra: 1.0, temperature: 1.0 }
    }
}

/// The DIST loss.
pub struct DistLoss {
    config: DistConfig,
}

/// The `dist` method.
pub type Dist = Distiller<DistLoss>;

/// `1 − mean_i ρ(a_i, b_i)` over the rows of `a`, `b`.
fn one_minus_pearson(a: &Tensor, b: &Tensor) -> Tensor {
    let a = a - a.mean_dim(1, true, Kind::Float);
    let b = b - b.mean_dim(1, true, Kind::Float);
    let cos = (&a * &b).sum_dim_intlist(1, false, Kind::Float) / (a.norm_scalaropt_dim(2, [1], false) * b.norm_scalaropt_dim(2, [1], false) + 1e-8);
    1.0 - cos.mean(Kind::Float)
}

/// `τ² (β·inter + γ·intra)` of the logits `s`, `t`.
///
/// # Shapes
/// `s`, `t`: `[b, classes]` → scalar.
pub fn dist_loss(s: &Tensor, t: &Tensor, inter: f64, intra: f64, temperature: f64) -> Tensor {
    let y_s = (s / temperature).softmax(1, Kind::Float);
    let y_t = (t / temperature).softmax(1, Kind::Float);
    let l = one_minus_pearson(&y_s, &y_t) * inter + one_minus_pearson(&y_s.tr(), &y_t.tr()) * intra;
    l * (temperature * temperature)
}

impl DistillLoss for DistLoss {
    const NAME: &'static str = "dist";
    type Config = DistConfig;

    fn new(config: DistConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_weight(Self::NAME, "inter", config.inter)?;
        check_weight(Self::NAME, "intra", config.intra)?;
        check_positive(Self::NAME, "temperature", config.temperature)?;
        Ok(DistLoss { config })
    }

    fn config(&self) -> &DistConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        None
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        let c = &self.config;
        Ok(dist_loss(s, t, c.inter, c.intra, c.temperature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{close, t, value};

    fn pearson(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let dot: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let na = a.iter().map(|x| (x - ma).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|y| (y - mb).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb + 1e-8)
    }

    /// Three examples, three classes, τ = 2, β = 1, γ = 0.5, against the correlations written out.
    #[test]
    fn dist_matches_the_correlations_written_out() {
        let s = [1.0, 2.0, 0.5, -1.0, 0.0, 1.0, 0.3, 0.3, 2.0];
        let tt = [2.0, 1.0, 0.0, 0.5, 0.5, -0.5, 0.0, 1.0, 1.5];
        let temp = 2.0;
        let softmax = |z: &[f64]| {
            let e: Vec<f64> = z.iter().map(|v| (v / temp).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<_>>()
        };
        let ys: Vec<Vec<f64>> = (0..3).map(|i| softmax(&s[3 * i..3 * i + 3])).collect();
        let yt: Vec<Vec<f64>> = (0..3).map(|i| softmax(&tt[3 * i..3 * i + 3])).collect();
        let inter = 1.0 - (0..3).map(|i| pearson(&ys[i], &yt[i])).sum::<f64>() / 3.0;
        let col = |y: &Vec<Vec<f64>>, c: usize| y.iter().map(|r| r[c]).collect::<Vec<_>>();
        let intra = 1.0 - (0..3).map(|c| pearson(&col(&ys, c), &col(&yt, c))).sum::<f64>() / 3.0;
        let want = temp * temp * (inter + 0.5 * intra);
        close(value(&dist_loss(&t(&s, &[3, 3]), &t(&tt, &[3, 3]), 1.0, 0.5, temp)), want);
        close(value(&dist_loss(&t(&tt, &[3, 3]), &t(&tt, &[3, 3]), 1.0, 1.0, temp)), 0.0);
    }
}
