//! Nearest class mean (NCM): each class is the mean of its training examples'
//! pooled features, and an example goes to the nearest mean (Mensink, Verbeek,
//! Perronnin & Csurka, "Distance-Based Image Classification: Generalizing to
//! New Classes at Near-Zero Cost", TPAMI 2013, <https://doi.org/10.1109/TPAMI.2013.83>;
//! here with the identity metric, W = I, on a frozen pre-trained backbone).
//!
//! - trains: nothing (the means are fitted once, without gradients, on the
//!   training split's pooled features after training; [`Method::fit`]);
//!   frozen: everything, the head included (`train_head`); merges: n/a.
//! - logits: `-½‖x − μ_c‖²` (`metric = "euclidean"`), whose softmax is
//!   Mensink et al.'s class posterior `exp(-½ d(x, μ_c)) / Σ_c' exp(-½ d(x, μ_c'))`,
//!   or the cosine similarity `cos(x, μ_c)` in [-1, 1] (`metric = "cosine"`).
//!   A class without training examples scores `f32::MIN`. They replace the
//!   head's logits; until the means are fitted the head's pass through (so the
//!   method is the identity at initialisation).
//! - a strategy of NCM alone takes no optimiser step: the backbone is frozen
//!   and, by default, so is the head, whose output the means replace; its
//!   features are cached like a linear probe's and the fit (one pass over the
//!   cached training features) is its train time. With `train_head = true`
//!   other methods of the strategy (`lora`) train through the head as usual,
//!   and the means are taken over the features they leave. A later method
//!   that calls `freeze_backbone` in its `prepare` (`linear_probe`) makes the
//!   head trainable again: list NCM after it.
//! - artifact: `ncm/means` `[classes, hidden]` and `ncm/counts` `[classes]`
//!   (training examples per class), persistent state without gradient.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use zhijian_core::{Method, Model, Result, Tap, config_table};

use crate::prototypes::{ClassMeans, Metric, freeze_head};

/// Nearest class mean's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NcmConfig {
    /// Distance to the class means: `euclidean` (Mensink et al.) or `cosine`.
    /// Default euclidean.
    pub metric: Metric,
    /// Keep the head trainable, for strategies where another method trains
    /// through it before the means replace it. Default false: the head is
    /// frozen and NCM alone takes no gradient step.
    pub train_head: bool,
}

/// The NCM method.
#[derive(Debug, Default)]
pub struct Ncm {
    config: NcmConfig,
    state: Option<(VarStore, ClassMeans)>,
    classes: i64,
}

impl Ncm {
    /// NCM with `config`; the means come in [`Method::fit`].
    pub fn new(config: NcmConfig) -> Self {
        Ncm { config, state: None, classes: 0 }
    }
}

impl Method for Ncm {
    fn name(&self) -> &'static str {
        "ncm"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        if !self.config.train_head {
            freeze_head(model);
        }
        let vs = VarStore::new(model.device());
        let means = ClassMeans::new(&vs.root(), model.backbone.hidden_size());
        self.state = Some((vs, means));
        self.classes = model.num_classes();
        Ok(())
    }

    fn fits_features(&self) -> bool {
        true
    }

    fn fit(&mut self, features: &Tensor, labels: &Tensor) -> Result<()> {
        let classes = self.classes;
        match &mut self.state {
            Some((_, means)) => means.fit("ncm", features, labels, classes),
            None => Ok(()),
        }
    }

    fn forward_taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        match (&self.state, taps.get(&Tap::Pooled)) {
            (Some((_, means)), Some(x)) if means.is_fitted() => means.scores(x, self.config.metric),
            _ => logits,
        }
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.state.as_ref().map(|(vs, _)| vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.state.as_mut().map(|(vs, _)| vs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prototypes::testing;
    use tch::Kind;
    use zhijian_core::Compute;
    use zhijian_core::train::{self, TrainConfig, TrainOptions};

    fn t(v: &[f32], cols: i64) -> Tensor {
        Tensor::from_slice(v).view([-1, cols])
    }

    /// On hand-made 3-d features: the means, `-½‖x − μ‖²` and cosine logits.
    #[test]
    fn logits_are_scores_against_hand_computed_class_means() {
        for (metric, want) in [
            // Means (1,0,0) and (0,2,0); x = (1,1,0): ‖(0,1,0)‖² = 1, ‖(1,−1,0)‖² = 2.
            (Metric::Euclidean, [-0.5, -1.0]),
            // cos((1,1,0), (1,0,0)) = cos((1,1,0), (0,2,0)) = 1/√2.
            (Metric::Cosine, [std::f32::consts::FRAC_1_SQRT_2; 2]),
        ] {
            let model = testing::model(0, 2);
            let mut m = Ncm::new(NcmConfig { metric, ..Default::default() });
            m.prepare(&model).unwrap();
            let x = t(&[1.0, 1.0, 0.0], 3);
            let head = Tensor::from_slice(&[7.0f32, 8.0]).view([1, 2]);
            // Before fitting the head's logits pass through.
            assert!(m.logits(head.shallow_clone(), &testing::pooled(&x), false).equal(&head));
            let features = t(&[2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0], 3);
            m.fit(&features, &Tensor::from_slice(&[0i64, 1, 0])).unwrap();
            let got = m.logits(head, &testing::pooled(&x), false);
            assert!(got.allclose(&Tensor::from_slice(&want).view([1, 2]), 1e-6, 1e-6, false), "{metric:?}: {got}");
        }
    }

    /// NCM alone takes no optimiser step, leaves every model parameter as it
    /// was, and predicts the nearest mean of the engine's own features.
    #[test]
    fn ncm_alone_trains_nothing_and_predicts_the_nearest_mean() {
        let (model, data) = (testing::model(1, 3), testing::split(2, 24, 3));
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(Ncm::new(NcmConfig::default()))];
        train::prepare(&model, &mut methods, 0).unwrap();
        assert!(train::trainable(&model, &methods).is_empty() && train::features_cacheable(&model, &methods));
        let before: BTreeMap<String, Tensor> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let report = train::train(&model, &mut methods, &data, None, &TrainConfig::default(), &TrainOptions::default()).unwrap();
        assert_eq!(report.steps, 0);
        assert!(model.vs.variables().iter().all(|(n, t)| t.equal(&before[n])), "a model parameter moved");
        let f = train::features(&model, &[], &data.input, 8).unwrap();
        let means: Vec<Tensor> = (0..3).map(|c| f.index_select(0, &data.labels.eq(c).nonzero().view([-1])).mean_dim(0, false, Kind::Float)).collect();
        let d = f.unsqueeze(1) - Tensor::stack(&means, 0).unsqueeze(0);
        let want = d.square().sum_dim_intlist(2, false, Kind::Float) * -0.5;
        let got = train::predict(&model, &methods, &data.input, 5, Compute::Fp32).unwrap();
        assert!(got.allclose(&want, 1e-4, 1e-5, false), "{got} vs {want}");
    }

    /// `train_head = true` leaves the head to other methods; unknown fields are refused.
    #[test]
    fn config_fields_have_defaults_and_typos_name_themselves() {
        let model = testing::model(0, 2);
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(Ncm::new(NcmConfig { train_head: true, ..Default::default() }))];
        train::prepare(&model, &mut methods, 0).unwrap();
        assert_eq!(model.trainable().len(), 2, "head weight and bias");
        let table: toml::Table = toml::from_str("metric = \"cosine\"").unwrap();
        let c: NcmConfig = zhijian_core::parse_config("ncm", &table).unwrap();
        assert_eq!(c, NcmConfig { metric: Metric::Cosine, train_head: false });
        let table: toml::Table = toml::from_str("metrik = \"cosine\"").unwrap();
        let err = zhijian_core::parse_config::<NcmConfig>("ncm", &table).unwrap_err().to_string();
        assert!(err.contains("ncm") && err.contains("metrik"), "{err}");
    }
}
