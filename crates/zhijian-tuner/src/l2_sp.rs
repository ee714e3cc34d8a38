//! L2-SP: fine-tuning with the starting point as reference (Li, Grandvalet &
//! Davoine, ICML 2018, <https://arxiv.org/abs/1802.01483>).
//!
//! Adds `α·½‖w − w⁰‖²` over the reused weights (every trainable parameter of
//! the backbone, pulled toward its pre-trained value) and `β·½‖w_head‖²` over
//! the new head, as the reference (`lixingjian/DELTA` `reg_l2sp`,
//! `reg_classifier`) and LAMDA-ZhiJian do, with their defaults α 0.1, β 0.01.
//!
//! - trains: nothing of its own; it regularises what the strategy trains
//!   (combine with `full_finetune`, `partial_k`, …; methods' own parameters
//!   such as LoRA's are not reused weights and are not pulled).
//! - The paper's optimiser has no weight decay: set the strategy's
//!   `weight_decay = 0` for the method as published (decoupled decay would
//!   pull toward 0 as well).

use serde::{Deserialize, Serialize};

use crate::anchor::{PenaltyConfig, WeightPenalty};

/// Configuration of L2-SP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L2SpConfig {
    /// Weight α of `½‖w − w⁰‖²` on the reused weights. Default 0.1.
    pub alpha: f64,
    /// Weight β of `½‖w‖²` on the head. Default 0.01.
    pub beta: f64,
}

impl Default for L2SpConfig {
    fn default() -> Self {
        L2SpConfig { alpha: 0.1, beta: 0.01 }
    }
}

impl PenaltyConfig for L2SpConfig {
    const NAME: &'static str = "l2_sp";
    const TOWARD_START: bool = true;

    fn alpha(&self) -> f64 {
        self.alpha
    }

    fn beta(&self) -> f64 {
        self.beta
    }
}

/// The L2-SP regulariser.
pub type L2Sp = WeightPenalty<L2SpConfig>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use zhijian_core::train::{prepare, trainable};
    use zhijian_core::{Method, RunData, TrainConfig};

    /// The penalty is ½α‖w − w⁰‖² + ½β‖head‖², by hand on the model's tensors.
    #[test]
    fn penalty_matches_a_hand_computation() {
        let model = testing::mlp(0, 2);
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(L2Sp::new(L2SpConfig { alpha: 0.5, beta: 0.25 }))];
        prepare(&model, &mut methods, 0).unwrap();
        model.unfreeze_where(|_, _| true);
        let params = trainable(&model, &methods);
        let train = zhijian_core::Split { name: "train".into(), input: testing::images(), labels: testing::labels() };
        let data = RunData { params: &params, ..RunData::train_only(&train) };
        methods[0].before_train(&model, &data, &TrainConfig::default()).unwrap();
        // At the start only the head term is left.
        let vars = model.vs.variables();
        let head: f64 = ["head.weight", "head.bias"]
            .iter()
            .map(|n| Vec::<f32>::try_from(vars[*n].flatten(0, -1)).unwrap().iter().map(|v| (*v as f64).powi(2)).sum::<f64>())
            .sum();
        let step = testing::empty_step();
        let got = methods[0].extra_loss(&step).unwrap().double_value(&[]);
        assert!((got - 0.25 * 0.5 * head).abs() < 1e-5 * head.max(1.0), "{got} vs {}", 0.125 * head);
        // Moving one backbone weight by 0.2 adds ½·α·0.04.
        tch::no_grad(|| {
            let _ = vars["layers.0.weight"].shallow_clone().get(0).get(0).g_add_scalar_(0.2);
        });
        let moved = methods[0].extra_loss(&step).unwrap().double_value(&[]);
        assert!((moved - got - 0.5 * 0.5 * 0.04).abs() < 1e-5, "{moved} − {got}");
    }
}
