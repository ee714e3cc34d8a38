//! CC: correlation congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang,
//! "Correlation Congruence for Knowledge Distillation", ICCV 2019,
//! <https://arxiv.org/abs/1904.01802>; RepDistiller `distiller_zoo/CC.py`,
//! the authors' code as RepDistiller ships it).
//!
//! Both sides' per-example features are embedded linearly into a common
//! space (`LinearEmbed`, 128 dimensions, both embeddings learned); with
//! `δ_i = |e^s_i − e^t_i|`, consecutive examples' differences should not
//! correlate:
//!
//! ```text
//! loss = mean_{i < b−1} Σ_d δ_i,d · δ_{i+1},d
//! ```
//!
//! β = 0.02 (RepDistiller's run script, tuned for this form). A batch of one
//! example adds nothing. This is RepDistiller's loss (restructured from the
//! authors' code, its docstring says), not the paper's correlation matrix
//! under a Gaussian-kernel approximation.
//!
//! - features: pooled on both sides by default (RepDistiller's `feat[-1]`);
//!   maps are flattened, token sequences read their first token.
//! - trains: the two embeddings `embed_student`, `embed_teacher`
//!   (training-only, not in the artifact), and whatever the strategy trains.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Result, StepOutput};

use super::{DistillLoss, Distiller, Feature, Setup, Stack, check_weight, linear_embed, per_sample, per_sample_width};

/// Configuration of CC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CcConfig {
    /// β, weight of the loss beside the cross-entropy. Default 0.02.
    pub weight: f64,
    /// Width of the common embedding, ≥ 1. Default 128 (RepDistiller's `feat_dim`).
    pub embed_dim: i64,
    /// The student's feature: `"pooled"`, `"last"` or a block index. Default pooled.
    pub student: Feature,
    /// The teacher's feature. Default pooled.
    pub teacher: Feature,
}

impl Default for CcConfig {
    fn default() -> Self {
        CcConfig { weight: 0.02, embed_dim: 128, student: Feature::Pooled, teacher: Feature::Pooled }
    }
}

/// The CC loss and its embeddings.
pub struct CcLoss {
    config: CcConfig,
    embed: Option<(Stack, Stack)>,
}

/// The `cc` method.
pub type Cc = Distiller<CcLoss>;

/// `mean_{i < b−1} Σ_d δ_i,d δ_{i+1},d` of the embeddings `e_s`, `e_t` (`[b, d]`); zero for one example.
pub fn cc_loss(e_s: &Tensor, e_t: &Tensor) -> Tensor {
    let b = e_s.size()[0];
    if b < 2 {
        return (e_s.sum(Kind::Float) * 0.0).detach();
    }
    let delta = (e_s - e_t).abs();
    (delta.narrow(0, 0, b - 1) * delta.narrow(0, 1, b - 1)).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float)
}

impl DistillLoss for CcLoss {
    const NAME: &'static str = "cc";
    type Config = CcConfig;

    fn new(config: CcConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        if config.embed_dim < 1 {
            return Err(Error::MethodConfig { method: Self::NAME.into(), message: format!("embed_dim must be ≥ 1, got {}", config.embed_dim) });
        }
        Ok(CcLoss { config, embed: None })
    }

    fn config(&self) -> &CcConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn build(&mut self, setup: &Setup, vs: &tch::nn::VarStore) -> Result<()> {
        let root = &vs.root();
        let (s, t) = setup.shapes();
        let d = self.config.embed_dim;
        self.embed = Some((linear_embed(root, "embed_student", per_sample_width(s), d), linear_embed(root, "embed_teacher", per_sample_width(t), d)));
        Ok(())
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        let (embed_s, embed_t) = self.embed.as_ref().ok_or("the embeddings are made in before_train")?;
        Ok(cc_loss(&embed_s.forward(&per_sample(s)), &embed_t.forward(&per_sample(t))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    /// Three examples in 2 dimensions, against the products written out.
    #[test]
    fn cc_matches_the_products_written_out() {
        let (es, et): ([f64; 6], [f64; 6]) = ([1.0, 2.0, 0.0, -1.0, 3.0, 1.0], [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        let delta: Vec<f64> = es.iter().zip(&et).map(|(a, b)| (a - b).abs()).collect();
        let want = ((delta[0] * delta[2] + delta[1] * delta[3]) + (delta[2] * delta[4] + delta[3] * delta[5])) / 2.0;
        close(value(&cc_loss(&t(&es, &[3, 2]), &t(&et, &[3, 2]))), want);
        assert_eq!(value(&cc_loss(&t(&[1.0, 2.0], &[1, 2]), &t(&[0.0, 0.0], &[1, 2]))), 0.0);
    }

    /// The embeddings read each side's width (a flattened map on the teacher's side) and are training-only.
    #[test]
    fn cc_embeds_both_sides_into_one_space() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12])));
        let split = testing::images(0);
        let mut m = Cc::new(CcConfig { teacher: Feature::Last, embed_dim: 5, ..Default::default() }).unwrap();
        m.prepare(&student).unwrap();
        m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap();
        // The teacher's last map: 12 channels × 8 × 8.
        testing::assert_parts(&m, &[("embed_student.weight", &[5, 8]), ("embed_teacher.weight", &[5, 12 * 8 * 8]), ("embed_teacher.bias", &[5])]);
        assert!(value(&testing::one_loss(&student, &teacher, &split, &m)).is_finite());
    }
}
