//! PKT: probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep
//! Representations with Probabilistic Knowledge Transfer", ECCV 2018,
//! <https://arxiv.org/abs/1803.10837>; RepDistiller `distiller_zoo/PKT.py`).
//!
//! Each example's cosine similarities to the batch, mapped to [0, 1] and
//! normalised to sum to one, form a distribution; the student's should match
//! the teacher's in KL divergence:
//!
//! ```text
//! c_ij = (cos(f_i, f_j) + 1) / 2      p_ij = c_ij / Σ_j c_ij
//! loss = mean_ij p^t_ij · log((p^t_ij + ε) / (p^s_ij + ε)),   ε = 1e-7
//! ```
//!
//! (the mean over all `b²` entries, as the reference; features divided by
//! `‖f‖ + ε`). β = 30000 (RepDistiller's run script).
//!
//! - features: pooled on both sides by default (RepDistiller's `feat[-1]`);
//!   maps are flattened, token sequences read their first token.
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, check_weight, per_sample};

/// ε of the reference.
const EPS: f64 = 1e-7;

/// Configuration of PKT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PktConfig {
    /// β, weight of the loss beside the cross-entropy. Default 30000.
    pub weight: f64,
    /// The student's feature: `"pooled"`, `"last"` or a block index. Default pooled.
    pub student: Feature,
    /// The teacher's feature. Default pooled.
    pub teacher: Feature,
}

impl Default for PktConfig {
    fn default() -> Self {
        PktConfig { weight: 30000.0, student: Feature::Pooled, teacher: Feature::Pooled }
    }
}

/// The PKT loss.
pub struct PktLoss {
    config: PktConfig,
}

/// The `pkt` method.
pub type Pkt = Distiller<PktLoss>;

/// Each row's similarity distribution over the batch.
fn similarities(f: &Tensor) -> Tensor {
    let f = per_sample(f);
    let f = &f / (f.norm_scalaropt_dim(2, [1], true) + EPS);
    let c = (f.matmul(&f.tr()) + 1.0) / 2.0;
    &c / c.sum_dim_intlist(1, true, Kind::Float)
}

/// `mean_ij p^t_ij log((p^t_ij + ε) / (p^s_ij + ε))`.
pub fn pkt_loss(s: &Tensor, t: &Tensor) -> Tensor {
    let (p_s, p_t) = (similarities(s), similarities(t));
    (&p_t * ((&p_t + EPS) / (p_s + EPS)).log()).mean(Kind::Float)
}

impl DistillLoss for PktLoss {
    const NAME: &'static str = "pkt";
    type Config = PktConfig;

    fn new(config: PktConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        Ok(PktLoss { config })
    }

    fn config(&self) -> &PktConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        Ok(pkt_loss(s, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{close, t, value};

    fn distribution(f: &[[f64; 2]]) -> Vec<Vec<f64>> {
        let unit: Vec<[f64; 2]> = f
            .iter()
            .map(|v| {
                let n = (v[0] * v[0] + v[1] * v[1]).sqrt() + 1e-7;
                [v[0] / n, v[1] / n]
            })
            .collect();
        unit.iter()
            .map(|a| {
                let c: Vec<f64> = unit.iter().map(|b| (a[0] * b[0] + a[1] * b[1] + 1.0) / 2.0).collect();
                let sum: f64 = c.iter().sum();
                c.into_iter().map(|x| x / sum).collect()
            })
            .collect()
    }

    /// Three examples in the plane, against the distributions written out.
    #[test]
    fn pkt_matches_the_kl_written_out() {
        let s = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]];
        let tt = [[2.0, 1.0], [-1.0, 1.0], [0.5, 0.5]];
        let (ps, pt) = (distribution(&s), distribution(&tt));
        let want = (0..3).flat_map(|i| (0..3).map(move |j| (i, j))).map(|(i, j)| pt[i][j] * ((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7)).ln()).sum::<f64>() / 9.0;
        close(value(&pkt_loss(&t(&s.concat(), &[3, 2]), &t(&tt.concat(), &[3, 2]))), want);
    }
}
