//! VID: variational information distillation (Ahn, Hu, Damianou, Lawrence &
//! Dai, "Variational Information Distillation for Knowledge Transfer", CVPR
//! 2019, <https://arxiv.org/abs/1904.05835>; RepDistiller
//! `distiller_zoo/VID.py`, the authors' code).
//!
//! The teacher's feature is modelled as a Gaussian whose mean a regressor
//! predicts from the student's feature and whose variance is learned per
//! channel; the loss is its negative log-likelihood (up to the constant):
//!
//! ```text
//! μ = r(f_s),  σ²_c = softplus(α_c) + ε      loss = mean ½ ((μ − f_t)² / σ² + log σ²)
//! ```
//!
//! `r`: three 1×1 convolutions without bias (student width → teacher width →
//! teacher width → teacher width) with ReLUs between, as the reference
//! (`VIDLoss(s, t, t)`); α starts where σ² = 5 (`init_pred_var`), ε = 1e-5.
//! β = 1 (RepDistiller's run script; it sums over every stage).
//!
//! - features: the last block on both sides by default (the reference reads
//!   every stage's output, of which the last is one). Any form, the same on
//!   both sides: maps (the larger pooled to the smaller), token sequences of
//!   one length (per token), or vectors (pooled features work too).
//! - trains: the regressor `regressor.{0,1,2}.weight` and the log-variances
//!   `log_scale` (training-only, not in the artifact), and whatever the
//!   strategy trains. The log-variances are vectors, so the optimiser does
//!   not decay them.

use serde::{Deserialize, Serialize};
use tch::nn::Init;
use tch::{Kind, Tensor};
use zhijian_core::{Error, Result, StepOutput};

use super::{Act, DistillLoss, Distiller, Feature, Form, LayerSpec, Setup, Stack, align, check_positive, check_weight, need_same_form};

/// ε of the reference: the smallest variance.
const EPS: f64 = 1e-5;

/// Configuration of VID.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VidConfig {
    /// β, weight of the loss beside the cross-entropy. Default 1.
    pub weight: f64,
    /// The variance σ² every channel starts with, > ε. Default 5 (the reference's `init_pred_var`).
    pub init_variance: f64,
    /// The student's feature: `"last"`, `"pooled"` or a block index. Default last.
    pub student: Feature,
    /// The teacher's feature. Default last.
    pub teacher: Feature,
}

impl Default for VidConfig {
    fn default() -> Self {
        VidConfig { weight: 1.0, init_variance: 5.0, student: Feature::Last, teacher: Feature::Last }
    }
}

/// The VID loss, its regressor and variances.
pub struct VidLoss {
    config: VidConfig,
    parts: Option<(Stack, Tensor, Form)>,
}

/// The `vid` method.
pub type Vid = Distiller<VidLoss>;

/// `mean ½ ((μ − t)² / σ² + log σ²)` with `σ² = softplus(log_scale) + ε`
/// along the channel axis of `form`.
pub fn vid_nll(mean: &Tensor, target: &Tensor, log_scale: &Tensor, form: Form) -> Tensor {
    let var = form.per_channel(&(log_scale.softplus() + EPS));
    (((mean - target).square() / &var + var.log()) * 0.5).mean(Kind::Float)
}

impl DistillLoss for VidLoss {
    const NAME: &'static str = "vid";
    type Config = VidConfig;

    fn new(config: VidConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_positive(Self::NAME, "init_variance", config.init_variance - EPS)
            .map_err(|_| Error::MethodConfig { method: Self::NAME.into(), message: format!("init_variance must be > {EPS}, got {}", config.init_variance) })?;
        Ok(VidLoss { config, parts: None })
    }

    fn config(&self) -> &VidConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn check(&self, s: Form, t: Form) -> std::result::Result<(), String> {
        need_same_form(s, t)
    }

    fn build(&mut self, setup: &Setup, vs: &tch::nn::VarStore) -> Result<()> {
        let root = &vs.root();
        let (s, t) = setup.shapes();
        let form = Form::of(s).map_err(Error::Config)?;
        let (c_s, c_t) = (form.channels(s), form.channels(t));
        let layer = |c_in, act| LayerSpec { c_in, c_out: c_t, kernel: 1, bias: false, batch_norm: false, act };
        let p = root / "regressor";
        let regressor = Stack::new(form).push(&p, "0", layer(c_s, Act::Relu)).push(&p, "1", layer(c_t, Act::Relu)).push(&p, "2", layer(c_t, Act::Identity));
        // softplus⁻¹(σ² − ε) = log(exp(σ² − ε) − 1).
        let init = (self.config.init_variance - EPS).exp_m1().ln();
        let log_scale = root.var("log_scale", &[c_t], Init::Const(init));
        self.parts = Some((regressor, log_scale, form));
        Ok(())
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        let (regressor, log_scale, form) = self.parts.as_ref().ok_or("the regressor is made in before_train")?;
        let (s, t) = align(s, t)?;
        Ok(vid_nll(&regressor.forward(&s), &t, log_scale, *form))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    /// Two examples, 2 channels, per-channel variances, against the log-likelihood written out.
    #[test]
    fn vid_matches_the_gaussian_nll_written_out() {
        let (mu, tt, alpha): ([f64; 4], [f64; 4], [f64; 2]) = ([1.0, 2.0, 0.0, -1.0], [0.5, 2.5, 1.0, -1.0], [0.0, 1.0]);
        let var: Vec<f64> = alpha.iter().map(|a| (1.0 + a.exp()).ln() + 1e-5).collect();
        let want = (0..4).map(|k| 0.5 * ((mu[k] - tt[k]).powi(2) / var[k % 2] + var[k % 2].ln())).sum::<f64>() / 4.0;
        close(value(&vid_nll(&t(&mu, &[2, 2]), &t(&tt, &[2, 2]), &t(&alpha, &[2]), Form::Vector)), want);
        // On maps the variance runs along dimension 1.
        close(value(&vid_nll(&t(&mu, &[2, 2, 1, 1]), &t(&tt, &[2, 2, 1, 1]), &t(&alpha, &[2]), Form::Map)), want);
    }

    /// The regressor ends at the teacher's width, the variances start at 5, all training-only.
    #[test]
    fn vid_builds_a_regressor_to_the_teachers_width() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12, 12])));
        let split = testing::images(0);
        let mut m = Vid::new(VidConfig::default()).unwrap();
        m.prepare(&student).unwrap();
        m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig::default()).unwrap();
        let parts = [
            ("regressor.0.weight", &[12i64, 8, 1, 1][..]),
            ("regressor.1.weight", &[12, 12, 1, 1]),
            ("regressor.2.weight", &[12, 12, 1, 1]),
            ("log_scale", &[12]),
        ];
        testing::assert_parts(&m, &parts);
        let log_scale = &m.var_store().unwrap().variables()["log_scale"];
        close(value(&(log_scale.softplus() + 1e-5).mean(Kind::Float)), 5.0);
        assert!(value(&testing::one_loss(&student, &teacher, &split, &m)).is_finite());
        assert!(Vid::new(VidConfig { init_variance: 0.0, ..Default::default() }).is_err());
    }
}
