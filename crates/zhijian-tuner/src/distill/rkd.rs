//! RKD: relational knowledge distillation (Park, Kim, Lu & Cho, "Relational
//! Knowledge Distillation", CVPR 2019, <https://arxiv.org/abs/1904.05068>;
//! RepDistiller `distiller_zoo/RKD.py`).
//!
//! Two relations among the batch's per-example features, each compared with
//! the smooth L1 loss (Huber, δ = 1, mean):
//!
//! ```text
//! distance: d_ij = ‖f_i − f_j‖ / mean_{i≠j} ‖f_i − f_j‖
//! angle:    a_ijk = ⟨e_ij, e_ik⟩,  e_ij = (f_j − f_i) / ‖f_j − f_i‖
//! loss = 25 · huber(d_s, d_t) + 50 · huber(a_s, a_t)
//! ```
//!
//! Distances are clamped at 1e-12 before the square root and the diagonal
//! set to zero, as the reference; a batch of one example has no relations
//! and adds nothing. Loss weight 1 (RepDistiller's `-b 1`), distance weight
//! 25, angle weight 50.
//!
//! - features: pooled on both sides by default (RepDistiller's `feat[-1]`);
//!   maps are flattened, token sequences read their first token.
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, check_weight, normalize, per_sample};

/// Configuration of RKD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RkdConfig {
    /// Weight of the loss beside the cross-entropy. Default 1.
    pub weight: f64,
    /// Weight of the distance term. Default 25.
    pub distance_weight: f64,
    /// Weight of the angle term. Default 50.
    pub angle_weight: f64,
    /// The student's feature: `"pooled"`, `"last"` or a block index. Default pooled.
    pub student: Feature,
    /// The teacher's feature. Default pooled.
    pub teacher: Feature,
}

impl Default for RkdConfig {
    fn default() -> Self {
        RkdConfig { weight: 1.0, distance_weight: 25.0, angle_weight: 50.0, student: Feature::Pooled, teacher: Feature::Pooled }
    }
}

/// The RKD loss.
pub struct RkdLoss {
    config: RkdConfig,
}

/// The `rkd` method.
pub type Rkd = Distiller<RkdLoss>;

/// Pairwise distances divided by their mean off the diagonal.
fn distances(f: &Tensor) -> Tensor {
    let sq = f.square().sum_dim_intlist(1, false, Kind::Float);
    let d = (sq.unsqueeze(1) + sq.unsqueeze(0) - f.matmul(&f.tr()) * 2.0).clamp_min(1e-12).sqrt();
    let b = f.size()[0];
    let d: Tensor = d * (1.0 - Tensor::eye(b, (Kind::Float, f.device())));
    let mean = d.sum(Kind::Float) / (b * (b - 1)) as f64;
    d / mean
}

/// Cosines of the angles `a_ijk` between `f_j − f_i` and `f_k − f_i`, flattened.
fn angles(f: &Tensor) -> Tensor {
    let e = normalize(&(f.unsqueeze(0) - f.unsqueeze(1)), 2);
    e.bmm(&e.transpose(1, 2)).flatten(0, -1)
}

/// `w_d · huber(d_s, d_t) + w_a · huber(a_s, a_t)`; zero for a batch of one.
pub fn rkd_loss(s: &Tensor, t: &Tensor, distance_weight: f64, angle_weight: f64) -> Tensor {
    let (s, t) = (per_sample(s), per_sample(t));
    if s.size()[0] < 2 {
        return (s.sum(Kind::Float) * 0.0).detach();
    }
    let loss_d = distances(&s).smooth_l1_loss(&distances(&t), Reduction::Mean, 1.0);
    let loss_a = angles(&s).smooth_l1_loss(&angles(&t), Reduction::Mean, 1.0);
    loss_d * distance_weight + loss_a * angle_weight
}

impl DistillLoss for RkdLoss {
    const NAME: &'static str = "rkd";
    type Config = RkdConfig;

    fn new(config: RkdConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_weight(Self::NAME, "distance_weight", config.distance_weight)?;
        check_weight(Self::NAME, "angle_weight", config.angle_weight)?;
        Ok(RkdLoss { config })
    }

    fn config(&self) -> &RkdConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        Ok(rkd_loss(s, t, self.config.distance_weight, self.config.angle_weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{close, t, value};

    fn huber(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| if (x - y).abs() < 1.0 { 0.5 * (x - y).powi(2) } else { (x - y).abs() - 0.5 }).sum::<f64>() / a.len() as f64
    }

    fn relations(f: &[[f64; 2]]) -> (Vec<f64>, Vec<f64>) {
        let n = f.len();
        let dist = |i: usize, j: usize| ((f[i][0] - f[j][0]).powi(2) + (f[i][1] - f[j][1]).powi(2)).sqrt();
        let mean = (0..n).flat_map(|i| (0..n).map(move |j| (i, j))).filter(|(i, j)| i != j).map(|(i, j)| dist(i, j)).sum::<f64>() / (n * (n - 1)) as f64;
        let d = (0..n).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| if i == j { 0.0 } else { dist(i, j) / mean }).collect();
        let unit = |i: usize, j: usize| {
            let v = [f[j][0] - f[i][0], f[j][1] - f[i][1]];
            let norm = (v[0] * v[0] + v[1] * v[1]).sqrt().max(1e-12);
            [v[0] / norm, v[1] / norm]
        };
        let mut a = Vec::new();
        for i in 0..n {
            for j in 0..n {
                for k in 0..n {
                    let (u, v) = (unit(i, j), unit(i, k));
                    a.push(u[0] * v[0] + u[1] * v[1]);
                }
            }
        }
        (d, a)
    }

    /// Three examples in the plane, against the distances and angles written out.
    #[test]
    fn rkd_matches_the_relations_written_out() {
        let s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]];
        let tt = [[1.0, 1.0], [2.0, 3.0], [-1.0, 0.0]];
        let ((ds, a_s), (dt, at)) = (relations(&s), relations(&tt));
        let want = 25.0 * huber(&ds, &dt) + 50.0 * huber(&a_s, &at);
        let got = rkd_loss(&t(&s.concat(), &[3, 2]), &t(&tt.concat(), &[3, 2]), 25.0, 50.0);
        // The diagonal's clamped 1e-6 distance is zeroed; its 1e-12-clamped angle is 0 as written.
        close(value(&got), want);
        assert_eq!(value(&rkd_loss(&t(&[1.0, 2.0], &[1, 2]), &t(&[3.0, 4.0], &[1, 2]), 25.0, 50.0)), 0.0);
    }
}
