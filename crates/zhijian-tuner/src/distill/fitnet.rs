//! FitNet: hints from the teacher's features (Romero, Ballas, Kahou,
//! Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
//! <https://arxiv.org/abs/1412.6550>; RepDistiller `distiller_zoo/FitNet.py`,
//! `models/util.py: ConvReg`).
//!
//! ```text
//! loss = mean over every element of (r(f_s) − f_t)²      (nn.MSELoss, reduction mean)
//! ```
//!
//! with `r` a learned regressor from the student's width to the teacher's,
//! β = 100 (RepDistiller's run script). Normalisation as the reference: the
//! mean over batch, channels and positions, so β does not depend on the sizes.
//!
//! - features: pooled on both sides by default (any tap, same form on both
//!   sides: vectors, equal-length token sequences, or maps, the larger map
//!   pooled to the smaller). RepDistiller hints at a middle stage's map
//!   (`hint_layer = 2`): `student = 1, teacher = 2` and the like do that here.
//! - regressor: an affine map per position (1×1 convolution on maps, linear
//!   map per token or vector), PyTorch's default initialisation. RepDistiller's
//!   `ConvReg` adds BatchNorm and ReLU, which suit ResNet stage outputs
//!   (non-negative) but would cut off the signed features of transformers and
//!   EfficientNet stages; it uses strided convolutions where we pool.
//! - trains: the regressor (training-only, not in the artifact) and whatever
//!   the strategy trains.

use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};
use zhijian_core::{Result, StepOutput};

use super::{Act, DistillLoss, Distiller, Feature, Form, LayerSpec, Setup, Stack, align, check_weight, need_same_form};

/// Configuration of FitNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitNetConfig {
    /// β, weight of the loss beside the cross-entropy. Default 100.
    pub weight: f64,
    /// The student's feature: `"pooled"`, `"last"` or a block index. Default pooled.
    pub student: Feature,
    /// The teacher's feature. Default pooled.
    pub teacher: Feature,
}

impl Default for FitNetConfig {
    fn default() -> Self {
        FitNetConfig { weight: 100.0, student: Feature::Pooled, teacher: Feature::Pooled }
    }
}

/// The FitNet loss and its regressor.
pub struct FitNetLoss {
    config: FitNetConfig,
    regressor: Option<Stack>,
}

/// The `fitnet` method.
pub type FitNet = Distiller<FitNetLoss>;

impl DistillLoss for FitNetLoss {
    const NAME: &'static str = "fitnet";
    type Config = FitNetConfig;

    fn new(config: FitNetConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        Ok(FitNetLoss { config, regressor: None })
    }

    fn config(&self) -> &FitNetConfig {
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
        let form = Form::of(s).map_err(zhijian_core::Error::Config)?;
        let (c_in, c_out) = (form.channels(s), form.channels(t));
        let spec = LayerSpec { c_in, c_out, kernel: 1, bias: true, batch_norm: false, act: Act::Identity };
        self.regressor = Some(Stack::new(form).push(root, "regressor", spec));
        Ok(())
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        let r = self.regressor.as_ref().ok_or("the regressor is made in before_train")?;
        let (s, t) = align(s, t)?;
        Ok(r.forward(&s).mse_loss(&t, Reduction::Mean))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use tch::{Device, Kind};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    /// The regressor to the teacher's width, per form; then the loss of a
    /// known regressor against the squares written out.
    #[test]
    fn fitnet_regresses_to_the_teachers_width_and_matches_the_squares() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12, 12])));
        let split = testing::images(0);
        let data = testing::run_data(&split, &teacher);
        for (feature, shape) in [(Feature::Pooled, vec![12i64, 8]), (Feature::Last, vec![12, 8, 1, 1])] {
            let mut m = FitNet::new(FitNetConfig { student: feature, teacher: feature, ..Default::default() }).unwrap();
            m.prepare(&student).unwrap();
            m.before_train(&student, &data, &TrainConfig::default()).unwrap();
            testing::assert_parts(&m, &[("regressor.weight", &shape), ("regressor.bias", &[12])]);
            // The student's 8×8 map is pooled to the teacher's 4×4.
            let l = testing::one_loss(&student, &teacher, &split, &m);
            assert!(value(&l).is_finite() && l.requires_grad());
        }

        // A 2 → 3 regressor: W = [[1, 0], [0, 2], [1, -1]], b = [0, 1, 0.5].
        let (w, b) = ([1.0, 0.0, 0.0, 2.0, 1.0, -1.0], [0.0, 1.0, 0.5]);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let spec = LayerSpec { c_in: 2, c_out: 3, kernel: 1, bias: true, batch_norm: false, act: Act::Identity };
        let regressor = Stack::new(Form::Vector).push(&vs.root(), "regressor", spec);
        tch::no_grad(|| {
            vs.variables()["regressor.weight"].shallow_clone().copy_(&t(&w, &[3, 2]));
            vs.variables()["regressor.bias"].shallow_clone().copy_(&t(&b, &[3]));
        });
        let loss = FitNetLoss { config: FitNetConfig::default(), regressor: Some(regressor) };
        let (s, tt) = ([1.0, 2.0, 0.0, -1.0], [1.0, 5.0, 0.0, 0.5, -1.0, 1.0]);
        let mut want = 0.0;
        for i in 0..2 {
            for o in 0..3 {
                let r = w[2 * o] * s[2 * i] + w[2 * o + 1] * s[2 * i + 1] + b[o];
                want += (r - tt[3 * i + o]).powi(2);
            }
        }
        want /= 6.0;
        let step = testing::logit_step(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)), &Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)));
        let got = loss.loss(&t(&s, &[2, 2]), &t(&tt, &[2, 3]), &step).unwrap();
        close(value(&got), want);
    }
}
