//! SP: similarity-preserving distillation (Tung & Mori, "Similarity-Preserving
//! Knowledge Distillation", ICCV 2019, <https://arxiv.org/abs/1907.09682>;
//! RepDistiller `distiller_zoo/SP.py`).
//!
//! The batch's Gram matrix of per-example features, each row scaled to unit
//! L2 norm, should match the teacher's:
//!
//! ```text
//! G = normalize_rows(F Fᵀ)      loss = ‖G_t − G_s‖²_F / b²
//! ```
//!
//! β = 3000 (RepDistiller's run script). `G` is `b × b` whatever the widths,
//! so student and teacher need not match in anything but the batch.
//!
//! - features: the last block on both sides by default (RepDistiller's
//!   `feat[-2]`, the last stage's map). Maps are flattened (`view(b, -1)`, as
//!   the reference), token sequences read their first token (ViT's class
//!   token, BERT's `[CLS]`), vectors are taken as they are.
//! - trains: whatever the strategy trains; no parts of its own.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, check_weight, normalize, per_sample};

/// Configuration of SP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpConfig {
    /// β, weight of the loss beside the cross-entropy. Default 3000.
    pub weight: f64,
    /// The student's feature: `"last"`, `"pooled"` or a block index. Default last.
    pub student: Feature,
    /// The teacher's feature. Default last.
    pub teacher: Feature,
}

impl Default for SpConfig {
    fn default() -> Self {
        SpConfig { weight: 3000.0, student: Feature::Last, teacher: Feature::Last }
    }
}

/// The SP loss.
pub struct SpLoss {
    config: SpConfig,
}

/// The `sp` method.
pub type Sp = Distiller<SpLoss>;

/// `‖G_t − G_s‖²_F / b²` of the row-normalised Gram matrices.
///
/// # Shapes
/// `s`, `t`: any feature with the batch first → scalar.
pub fn sp_loss(s: &Tensor, t: &Tensor) -> Tensor {
    let gram = |f: &Tensor| {
        let f = per_sample(f);
        normalize(&f.matmul(&f.tr()), 1)
    };
    let b = s.size()[0] as f64;
    (gram(t) - gram(s)).square().sum(Kind::Float) / (b * b)
}

impl DistillLoss for SpLoss {
    const NAME: &'static str = "sp";
    type Config = SpConfig;

    fn new(config: SpConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        Ok(SpLoss { config })
    }

    fn config(&self) -> &SpConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        Ok(sp_loss(s, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{close, t, value};

    fn gram(f: &[Vec<f64>]) -> Vec<Vec<f64>> {
        f.iter()
            .map(|a| {
                let row: Vec<f64> = f.iter().map(|b| a.iter().zip(b).map(|(x, y)| x * y).sum()).collect();
                let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                row.into_iter().map(|x| x / n).collect()
            })
            .collect()
    }

    /// Three examples: a 2-wide student, a 1×1×3 teacher map (flattened), against the Gram matrices written out.
    #[test]
    fn sp_matches_the_gram_matrices_written_out() {
        let s = vec![vec![1.0, 2.0], vec![0.0, 1.0], vec![-1.0, 1.0]];
        let tt = vec![vec![1.0, 0.0, 1.0], vec![2.0, 1.0, 0.0], vec![0.0, 1.0, 1.0]];
        let (gs, gt) = (gram(&s), gram(&tt));
        let want = (0..3).flat_map(|i| (0..3).map(move |j| (i, j))).map(|(i, j)| (gt[i][j] - gs[i][j]).powi(2)).sum::<f64>() / 9.0;
        let flat = |f: &[Vec<f64>]| f.concat();
        let got = sp_loss(&t(&flat(&s), &[3, 2]), &t(&flat(&tt), &[3, 3, 1, 1]));
        close(value(&got), want);
        // Tokens read their first token.
        let tokens = Tensor::cat(&[t(&flat(&s), &[3, 1, 2]), Tensor::ones([3, 2, 2], (Kind::Float, tch::Device::Cpu))], 1);
        close(value(&sp_loss(&tokens, &t(&flat(&tt), &[3, 3]))), want);
    }
}
