//! SimpleShot: nearest centroid on centred, L2-normalised features (Wang,
//! Chao, Weinberger & van der Maaten, "SimpleShot: Revisiting
//! Nearest-Neighbor Classification for Few-Shot Learning", 2019,
//! <https://arxiv.org/abs/1911.04623>; reference code `mileyan/simple_shot`).
//!
//! CL2N: subtract `x̄`, the mean of the training split's pooled features, then
//! scale to unit L2 norm: `x̃ = (x − x̄) / ‖x − x̄‖`. Each class's centroid is
//! the mean of its training examples' `x̃` (not renormalised, as in the
//! reference code), and an example goes to the nearest centroid by Euclidean
//! distance. The paper takes `x̄` over the base classes' training set; in
//! transfer there is one training split, so `x̄` is its mean.
//!
//! - trains: nothing (`x̄` and the centroids are fitted once, without
//!   gradients, after training; [`Method::fit`]); frozen: everything, the head
//!   included (`train_head`); merges: n/a.
//! - logits: `-½‖x̃ − c_k‖²` (in [-2, 0] with both steps on, since `‖x̃‖ = 1`
//!   and `‖c_k‖ ≤ 1`); a class without training examples scores `f32::MIN`.
//!   They replace the head's logits; until fitted the head's pass through, so
//!   the method is the identity at initialisation.
//! - `center = false, normalise = true` is the paper's L2N; both off is plain
//!   NCM with the Euclidean metric (UN).
//! - training steps and composition as for `ncm` (a strategy of SimpleShot
//!   alone takes none; `train_head = true` to let other methods train through
//!   the head first).
//! - artifact: `simpleshot/center` `[1, hidden]` (`x̄`; zeros with `center =
//!   false`), `simpleshot/means` `[classes, hidden]`, `simpleshot/counts`
//!   `[classes]`, persistent state without gradient.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};
use zhijian_core::{Method, Model, Result, Tap, config_table};

use crate::prototypes::{ClassMeans, Metric, check_fit, empty_state, freeze_head, l2_normalise, set_state};

/// SimpleShot's settings; the defaults are the paper's CL2N.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimpleShotConfig {
    /// Subtract the mean of the training features. Default true.
    pub center: bool,
    /// Scale features to unit L2 norm (after centring). Default true.
    pub normalise: bool,
    /// Keep the head trainable, for strategies where another method trains
    /// through it before the centroids replace it. Default false.
    pub train_head: bool,
}

impl Default for SimpleShotConfig {
    fn default() -> Self {
        SimpleShotConfig { center: true, normalise: true, train_head: false }
    }
}

struct State {
    vs: VarStore,
    /// `[1, hidden]` once fitted.
    center: Tensor,
    means: ClassMeans,
}

/// The SimpleShot method.
pub struct SimpleShot {
    config: SimpleShotConfig,
    state: Option<State>,
    classes: i64,
}

impl SimpleShot {
    /// SimpleShot with `config`; the centroids come in [`Method::fit`].
    pub fn new(config: SimpleShotConfig) -> Self {
        SimpleShot { config, state: None, classes: 0 }
    }

    /// `x` after the configured centring (by `center` `[1, hidden]`) and normalisation.
    fn transform(&self, x: &Tensor, center: &Tensor) -> Tensor {
        let x = if self.config.center { x - center } else { x.shallow_clone() };
        if self.config.normalise { l2_normalise(&x) } else { x }
    }
}

impl Method for SimpleShot {
    fn name(&self) -> &'static str {
        "simpleshot"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        if !self.config.train_head {
            freeze_head(model);
        }
        let vs = VarStore::new(model.device());
        let hidden = model.backbone.hidden_size();
        let root = vs.root();
        let center = empty_state(&root, "center", &[hidden], Kind::Float);
        let means = ClassMeans::new(&root, hidden);
        self.state = Some(State { vs, center, means });
        self.classes = model.num_classes();
        Ok(())
    }

    fn fits_features(&self) -> bool {
        true
    }

    fn fit(&mut self, features: &Tensor, labels: &Tensor) -> Result<()> {
        check_fit("simpleshot", features, labels, self.classes)?;
        let features = features.to_kind(Kind::Float);
        let center = if self.config.center { features.mean_dim(0, true, Kind::Float) } else { features.narrow(0, 0, 1).zeros_like() };
        let transformed = self.transform(&features, &center);
        let classes = self.classes;
        let Some(s) = &mut self.state else { return Ok(()) };
        set_state(&mut s.center, &center);
        s.means.fit("simpleshot", &transformed, labels, classes)
    }

    fn forward_taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        match (&self.state, taps.get(&Tap::Pooled)) {
            (Some(s), Some(x)) if s.means.is_fitted() => s.means.scores(&self.transform(x, &s.center), Metric::Euclidean),
            _ => logits,
        }
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.state.as_ref().map(|s| &s.vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.state.as_mut().map(|s| &mut s.vs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ncm::{Ncm, NcmConfig};
    use crate::prototypes::testing;

    fn fitted(config: SimpleShotConfig) -> SimpleShot {
        let mut m = SimpleShot::new(config);
        m.prepare(&testing::model(0, 2)).unwrap();
        // Mean (1, 1, 0); centred (2,0,0), (0,2,0), (−2,−2,0); normalised
        // (1,0,0), (0,1,0), (−1/√2,−1/√2,0).
        let features = Tensor::from_slice(&[3.0f32, 1.0, 0.0, 1.0, 3.0, 0.0, -1.0, -1.0, 0.0]).view([3, 3]);
        m.fit(&features, &Tensor::from_slice(&[0i64, 1, 0])).unwrap();
        m
    }

    fn logits(m: &SimpleShot, x: &[f32]) -> Vec<f64> {
        let head = Tensor::zeros([1, 2], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::from_slice(x).view([1, 3]);
        Vec::<f64>::try_from(m.logits(head, &testing::pooled(&x), false).view([-1]).to_kind(Kind::Double)).unwrap()
    }

    /// CL2N against a hand computation: centroid 0 is ((1 − 1/√2)/2, −1/(2√2), 0),
    /// centroid 1 is (0, 1, 0); x = (1, 2, 0) becomes (0, 1, 0).
    #[test]
    fn cl2n_centroids_and_logits_match_a_hand_computation() {
        let m = fitted(SimpleShotConfig::default());
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let c0 = [(1.0 - h) / 2.0, -h / 2.0];
        let d0 = c0[0].powi(2) + (1.0 - c0[1]).powi(2);
        let got = logits(&m, &[1.0, 2.0, 0.0]);
        assert!((got[0] + 0.5 * d0).abs() < 1e-6 && got[1].abs() < 1e-6, "{got:?}");
        let center = &m.state.as_ref().unwrap().center;
        assert_eq!(Vec::<f32>::try_from(center.view([-1])).unwrap(), [1.0, 1.0, 0.0]);
        // Far along a direction, the norm no longer matters: (1, 101, 0) → (0, 1, 0) too.
        let far = logits(&m, &[1.0, 101.0, 0.0]);
        assert!(far.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-5), "{far:?}");
    }

    /// Both steps off is NCM with the Euclidean metric, to rounding.
    #[test]
    fn without_centring_and_normalising_it_is_ncm() {
        let m = fitted(SimpleShotConfig { center: false, normalise: false, ..Default::default() });
        let mut ncm = Ncm::new(NcmConfig::default());
        ncm.prepare(&testing::model(0, 2)).unwrap();
        let features = Tensor::from_slice(&[3.0f32, 1.0, 0.0, 1.0, 3.0, 0.0, -1.0, -1.0, 0.0]).view([3, 3]);
        ncm.fit(&features, &Tensor::from_slice(&[0i64, 1, 0])).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0, 0.5]).view([1, 3]);
        let head = Tensor::zeros([1, 2], (Kind::Float, tch::Device::Cpu));
        let a = m.logits(head.shallow_clone(), &testing::pooled(&x), false);
        let b = ncm.logits(head, &testing::pooled(&x), false);
        assert!(a.allclose(&b, 1e-6, 1e-6, false), "{a} vs {b}");
        // Means (1, 0, 0) and (1, 3, 0): x is ½(0 + 4 + ¼) = 2.125 and ½(0 + 1 + ¼) = 0.625 away.
        assert!(a.allclose(&Tensor::from_slice(&[-2.125f32, -0.625]).view([1, 2]), 1e-6, 1e-6, false), "{a}");
    }
}
