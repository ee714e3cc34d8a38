//! NST: neuron selectivity transfer (Huang & Wang, "Like What You Like:
//! Knowledge Distill via Neuron Selectivity Transfer", 2017,
//! <https://arxiv.org/abs/1707.01219>; RepDistiller `distiller_zoo/NST.py`).
//!
//! Each channel's activations over the positions, scaled to unit L2 norm, is
//! a sample; the student's channels should be distributed like the
//! teacher's, by the maximum mean discrepancy with the polynomial kernel
//! `k(x, y) = (xᵀy)²`:
//!
//! ```text
//! loss = mean k(t, t) + mean k(s, s) − 2 · mean k(s, t)
//! ```
//!
//! each mean over the batch and every pair of channels (`[b, c, c']`), the
//! teacher-only term a constant. Channel counts may differ; positions must
//! match. β = 50 (RepDistiller's run script; it sums over every stage).
//!
//! - features: the last block on both sides by default; maps of different
//!   sizes are pooled to the smaller. Token sequences count each token as a
//!   position, which needs one length on both sides (otherwise the first step
//!   fails with an error), and include padding positions in BERT's sequences
//!   (the taps carry no mask). Vectors are refused.
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, Form, align, by_position, check_weight, need_positions, normalize};

/// Configuration of NST.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NstConfig {
    /// β, weight of the loss beside the cross-entropy. Default 50.
    pub weight: f64,
    /// The student's feature: `"last"` or a block index (`"pooled"` is refused). Default last.
    pub student: Feature,
    /// The teacher's feature. Default last.
    pub teacher: Feature,
}

impl Default for NstConfig {
    fn default() -> Self {
        NstConfig { weight: 50.0, student: Feature::Last, teacher: Feature::Last }
    }
}

/// The NST loss.
pub struct NstLoss {
    config: NstConfig,
}

/// The `nst` method.
pub type Nst = Distiller<NstLoss>;

/// `mean_{b, i, j} (a_i · b_j)²` of channel rows `[b, c, positions]`.
fn poly(a: &Tensor, b: &Tensor) -> Tensor {
    a.bmm(&b.transpose(1, 2)).square().mean(Kind::Float)
}

/// The polynomial-kernel MMD between the student's and the teacher's channels.
pub fn nst_loss(s: &Tensor, t: &Tensor) -> std::result::Result<Tensor, String> {
    let (s, t) = align(s, t)?;
    let (s, t) = (normalize(&by_position(&s), 2), normalize(&by_position(&t), 2));
    Ok(poly(&t, &t).detach() + poly(&s, &s) - poly(&s, &t) * 2.0)
}

impl DistillLoss for NstLoss {
    const NAME: &'static str = "nst";
    type Config = NstConfig;

    fn new(config: NstConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        Ok(NstLoss { config })
    }

    fn config(&self) -> &NstConfig {
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
        nst_loss(s, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{close, t, value};

    fn mean_k(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        let mut sum = 0.0;
        for x in a {
            for y in b {
                sum += x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>().powi(2);
            }
        }
        sum / (a.len() * b.len()) as f64
    }

    fn unit(v: &[f64]) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// One example: 2 student channels and 3 teacher channels over 1×2 positions, against the MMD written out.
    #[test]
    fn nst_matches_the_mmd_written_out() {
        let s = [1.0, 2.0, 3.0, -1.0];
        let tt = [1.0, 0.0, 1.0, 1.0, -2.0, 1.0];
        let sc: Vec<Vec<f64>> = s.chunks(2).map(unit).collect();
        let tc: Vec<Vec<f64>> = tt.chunks(2).map(unit).collect();
        let want = mean_k(&tc, &tc) + mean_k(&sc, &sc) - 2.0 * mean_k(&sc, &tc);
        close(value(&nst_loss(&t(&s, &[1, 2, 1, 2]), &t(&tt, &[1, 3, 1, 2])).unwrap()), want);
        // The same as token sequences [1, positions, channels].
        let st = t(&s, &[1, 2, 2]).transpose(1, 2);
        let ttok = t(&tt, &[1, 3, 2]).transpose(1, 2);
        close(value(&nst_loss(&st, &ttok).unwrap()), want);
    }
}
