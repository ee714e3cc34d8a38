//! L2: weight decay toward the origin as an explicit penalty, the baseline
//! L2-SP is compared with (Li, Grandvalet & Davoine, ICML 2018,
//! <https://arxiv.org/abs/1802.01483>).
//!
//! Adds `α·½‖w‖²` over the reused weights (every trainable backbone
//! parameter) and `β·½‖w_head‖²` over the head. As a loss term it is L2
//! regularisation in the strict sense, under AdamW too (whose own decay is
//! decoupled, Loshchilov & Hutter 2019); with SGD it equals weight decay α.
//!
//! - trains: nothing of its own; it regularises what the strategy trains.
//! - Defaults α 1e-4 (the usual decay of ImageNet fine-tuning, as in the
//!   reference's `l2` setting) and β 0.01 (L2-SP's head weight).

use serde::{Deserialize, Serialize};

use crate::anchor::{PenaltyConfig, WeightPenalty};

/// Configuration of the L2 penalty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L2Config {
    /// Weight α of `½‖w‖²` on the reused weights. Default 1e-4.
    pub alpha: f64,
    /// Weight β of `½‖w‖²` on the head. Default 0.01.
    pub beta: f64,
}

impl Default for L2Config {
    fn default() -> Self {
        L2Config { alpha: 1e-4, beta: 0.01 }
    }
}

impl PenaltyConfig for L2Config {
    const NAME: &'static str = "l2";
    const TOWARD_START: bool = false;

    fn alpha(&self) -> f64 {
        self.alpha
    }

    fn beta(&self) -> f64 {
        self.beta
    }
}

/// The L2 penalty.
pub type L2 = WeightPenalty<L2Config>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::Tensor;
    use zhijian_core::train::{prepare, trainable};
    use zhijian_core::{Method, RunData, TrainConfig};

    /// ½α‖w‖² + ½β‖head‖² by hand, over every parameter of a fully trainable MLP.
    #[test]
    fn penalty_is_half_alpha_squared_norm() {
        let model = testing::mlp(1, 2);
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(L2::new(L2Config { alpha: 0.3, beta: 0.7 }))];
        prepare(&model, &mut methods, 0).unwrap();
        model.unfreeze_where(|_, _| true);
        let params = trainable(&model, &methods);
        let train = zhijian_core::Split { name: "train".into(), input: testing::images(), labels: testing::labels() };
        methods[0].before_train(&model, &RunData { params: &params, ..RunData::train_only(&train) }, &TrainConfig::default()).unwrap();
        let sq = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap().iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        let want: f64 = params.iter().map(|(n, t)| if n.starts_with("head") { 0.7 } else { 0.3 } * 0.5 * sq(t)).sum();
        let step = testing::empty_step();
        let got = methods[0].extra_loss(&step).unwrap().double_value(&[]);
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }
}
