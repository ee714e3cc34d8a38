//! k-nearest neighbours on frozen pre-trained features: an example takes the
//! (weighted) vote of the `k` training examples whose pooled features are
//! nearest (Cover & Hart, "Nearest neighbor pattern classification", IEEE
//! Trans. Inf. Theory 1967). The defaults are the weighted kNN protocol for
//! frozen features of Wu, Xiong, Yu & Lin 2018 (<https://arxiv.org/abs/1805.01978>)
//! as DINO evaluates it (Caron et al. 2021, <https://arxiv.org/abs/2104.14294>,
//! `eval_knn.py`: cosine similarity on L2-normalised features, `k = 20`,
//! weights `exp(s / 0.07)`).
//!
//! - trains: nothing (the memory of training features is stored once, after
//!   training; [`Method::fit`]); frozen: everything, the head included
//!   (`train_head`); merges: n/a.
//! - neighbours: the `min(k, n)` training examples of highest similarity `s`:
//!   the cosine similarity, or `-‖x − m‖` (`metric = "euclidean"`).
//! - weighting: `exponential` (Wu et al., DINO) `w = exp(s / temperature)`;
//!   `uniform` (one vote each; scikit-learn's default); `distance` (scikit-learn's
//!   `weights = "distance"`) `w = 1 / d`, with `d = 1 − cos` or `‖x − m‖`,
//!   clamped at 1e-12 so an exact match takes practically all the weight.
//! - logits: each class's share of the neighbours' total weight, in [0, 1],
//!   summing to 1 over the classes (DINO's vote sums, divided by their total:
//!   the same argmax; the exponential weights are a softmax over the `k`, so
//!   nothing overflows). Classes no neighbour has score 0 and tie there, so
//!   top-5 beyond the neighbours' classes is arbitrary (lowest index first); a
//!   tie of votes also goes to the lowest class index. They replace the head's
//!   logits; until fitted the head's pass through (identity at initialisation).
//! - training steps and composition as for `ncm` (a strategy of kNN alone
//!   takes none; `train_head = true` to let other methods train through the
//!   head first).
//! - artifact: `knn/memory` `[n, hidden]` (the training features, L2-normalised
//!   for the cosine metric) and `knn/labels` `[n]`, persistent state without
//!   gradient: `n · hidden` floats (MNIST's 60,000 × 1,280 of Lite0: 307 MB; cap
//!   the training split with `train_limit` where that matters). Every
//!   prediction compares against all `n`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, Tap, config_table};

use crate::prototypes::{Metric, check_fit, empty_state, freeze_head, l2_normalise, set_state, sq_distances};

/// How the `k` neighbours' votes are weighted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// One vote per neighbour.
    Uniform,
    /// `1 / distance`.
    Distance,
    /// `exp(similarity / temperature)`.
    #[default]
    Exponential,
}

/// kNN's settings; the defaults are DINO's weighted kNN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnnConfig {
    /// Neighbours per vote (all training examples if fewer). Default 20.
    pub k: usize,
    /// `cosine` or `euclidean`. Default cosine.
    pub metric: Metric,
    /// `exponential`, `uniform` or `distance`. Default exponential.
    pub weighting: Weighting,
    /// Temperature of the exponential weights. Default 0.07.
    pub temperature: f64,
    /// Keep the head trainable, for strategies where another method trains
    /// through it before the vote replaces it. Default false.
    pub train_head: bool,
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig { k: 20, metric: Metric::Cosine, weighting: Weighting::Exponential, temperature: 0.07, train_head: false }
    }
}

struct State {
    vs: VarStore,
    /// `[n, hidden]` once fitted.
    memory: Tensor,
    /// `[n]` int64 once fitted.
    labels: Tensor,
}

/// The kNN method.
pub struct Knn {
    config: KnnConfig,
    state: Option<State>,
    classes: i64,
}

impl Knn {
    /// kNN with `config`; the memory comes in [`Method::fit`].
    pub fn new(config: KnnConfig) -> Self {
        Knn { config, state: None, classes: 0 }
    }

    /// Class vote shares of `x` against `memory` with `labels`.
    ///
    /// # Shapes
    /// `x` `[b, hidden]`, `memory` `[n, hidden]`, `labels` `[n]` → `[b, classes]`.
    fn votes(&self, x: &Tensor, memory: &Tensor, labels: &Tensor) -> Tensor {
        let c = &self.config;
        let similarity = match c.metric {
            // The memory is stored normalised.
            Metric::Cosine => l2_normalise(x).matmul(&memory.transpose(0, 1)),
            Metric::Euclidean => -sq_distances(x, memory).sqrt(),
        };
        let k = (c.k as i64).min(memory.size()[0]);
        let (s, idx) = similarity.topk(k, 1, true, true);
        let w = match c.weighting {
            Weighting::Uniform => s.ones_like(),
            Weighting::Distance => {
                let d = match c.metric {
                    Metric::Cosine => 1.0 - &s,
                    // Recomputed directly for the k chosen: through ‖x‖² − 2x·m + ‖m‖²
                    // a query's distance to itself in the memory is √(rounding) ≈ 1e-3,
                    // not ≈ 0, and its inverse swings with every last-bit change.
                    Metric::Euclidean => {
                        let chosen = memory.index_select(0, &idx.view([-1])).view([idx.size()[0], k, -1]);
                        (x.unsqueeze(1) - chosen).square().sum_dim_intlist(2, false, Kind::Float).sqrt()
                    }
                };
                d.clamp_min(1e-12).reciprocal()
            }
            Weighting::Exponential => (&s / c.temperature).softmax(1, Kind::Float),
        };
        let w = &w / w.sum_dim_intlist(1, true, Kind::Float);
        let neighbour_labels = labels.index_select(0, &idx.view([-1])).view(idx.size().as_slice());
        Tensor::zeros([x.size()[0], self.classes], (Kind::Float, x.device())).scatter_add(1, &neighbour_labels, &w)
    }
}

impl Method for Knn {
    fn name(&self) -> &'static str {
        "knn"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "knn".into(), message });
        if c.k < 1 {
            return bad(format!("k must be ≥ 1, got {}", c.k));
        }
        if !(c.temperature > 0.0 && c.temperature.is_finite()) {
            return bad(format!("temperature must be a positive number, got {}", c.temperature));
        }
        if !c.train_head {
            freeze_head(model);
        }
        let vs = VarStore::new(model.device());
        let root = vs.root();
        let memory = empty_state(&root, "memory", &[model.backbone.hidden_size()], Kind::Float);
        let labels = empty_state(&root, "labels", &[], Kind::Int64);
        self.state = Some(State { vs, memory, labels });
        self.classes = model.num_classes();
        Ok(())
    }

    fn fits_features(&self) -> bool {
        true
    }

    fn fit(&mut self, features: &Tensor, labels: &Tensor) -> Result<()> {
        check_fit("knn", features, labels, self.classes)?;
        let features = features.to_kind(Kind::Float);
        let memory = if self.config.metric == Metric::Cosine { l2_normalise(&features) } else { features };
        let Some(s) = &mut self.state else { return Ok(()) };
        set_state(&mut s.memory, &memory);
        set_state(&mut s.labels, labels);
        Ok(())
    }

    fn forward_taps(&self) -> Vec<Tap> {
        vec![Tap::Pooled]
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        match (&self.state, taps.get(&Tap::Pooled)) {
            (Some(s), Some(x)) if s.memory.size()[0] > 0 => self.votes(x, &s.memory, &s.labels),
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
    use crate::prototypes::testing;

    /// Memory (1,0), (0,1), (0.8,0.6), (−1,0) with labels 0, 1, 1, 2; query (1, 0.1).
    fn votes(config: KnnConfig) -> Vec<f64> {
        let mut m = Knn::new(config);
        let model = {
            tch::manual_seed(0);
            let config = zhijian_backbones::MlpConfig { image_size: 2, in_chans: 1, hidden: vec![2] };
            Model::new(tch::Device::Cpu, 3, |p| Box::new(zhijian_backbones::Mlp::new(p, &config).unwrap()))
        };
        m.prepare(&model).unwrap();
        let memory = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.8, 0.6, -1.0, 0.0]).view([4, 2]);
        m.fit(&memory, &Tensor::from_slice(&[0i64, 1, 1, 2])).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 0.1]).view([1, 2]);
        let head = Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu));
        Vec::<f64>::try_from(m.logits(head, &testing::pooled(&x), false).view([-1]).to_kind(Kind::Double)).unwrap()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "got {got:?} want {want:?}");
    }

    /// Euclidean distances from the query: 0.1, √1.81, √0.29, √4.01; the 3
    /// nearest are examples 0, 2, 1. Uniform votes pick class 1 (2 of 3),
    /// inverse-distance votes class 0 (its neighbour is 5× nearer).
    #[test]
    fn uniform_and_distance_votes_match_a_hand_computation() {
        let euclid = |weighting| KnnConfig { k: 3, metric: Metric::Euclidean, weighting, ..Default::default() };
        close(&votes(euclid(Weighting::Uniform)), &[1.0 / 3.0, 2.0 / 3.0, 0.0]);
        let w = [1.0 / 0.1, 1.0 / 0.29f64.sqrt(), 1.0 / 1.81f64.sqrt()];
        let total: f64 = w.iter().sum();
        close(&votes(euclid(Weighting::Distance)), &[w[0] / total, (w[1] + w[2]) / total, 0.0]);
        // k larger than the memory: every example votes.
        close(&votes(KnnConfig { k: 50, ..euclid(Weighting::Uniform) }), &[0.25, 0.5, 0.25]);
    }

    /// Cosine with exponential weights (the default, k = 20 → all 4): the
    /// query's cosines are 0.995, 0.0995, 0.8557, −0.995 (its norm is √1.01).
    #[test]
    fn exponential_cosine_votes_match_a_hand_computation() {
        let n = 1.01f64.sqrt();
        let s = [1.0 / n, 0.1 / n, (0.8 + 0.06) / n, -1.0 / n];
        let e: Vec<f64> = s.iter().map(|s| (s / 0.07).exp()).collect();
        let total: f64 = e.iter().sum();
        close(&votes(KnnConfig::default()), &[e[0] / total, (e[1] + e[2]) / total, e[3] / total]);
        // Cosine distance weights with k = 2: 1 − 0.995 and 1 − 0.8557.
        let w = [1.0 / (1.0 - s[0]), 1.0 / (1.0 - s[2])];
        close(&votes(KnnConfig { k: 2, weighting: Weighting::Distance, ..Default::default() }), &[w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1]), 0.0]);
    }

    /// A query that is (up to rounding) an example of the memory gets that
    /// example's vote, whatever its last bits: distance weights come from
    /// the chosen neighbours' distances computed directly.
    #[test]
    fn a_query_in_the_memory_votes_for_itself_stably() {
        let mut knn = Knn::new(KnnConfig { k: 3, metric: Metric::Euclidean, weighting: Weighting::Distance, ..Default::default() });
        knn.classes = 3;
        tch::manual_seed(4);
        // Large features (‖v‖² ≈ 6·10⁵, where fp32 rounding is ≈ 0.04) and two
        // other examples ≈ 4 away.
        let v = Tensor::randn([1, 64], (Kind::Float, tch::Device::Cpu)) * 100.0;
        let memory = Tensor::cat(&[&v, &(&v + Tensor::randn([2, 64], (Kind::Float, tch::Device::Cpu)) * 0.5)], 0);
        let labels = Tensor::from_slice(&[0i64, 1, 2]);
        let query = memory.narrow(0, 0, 1);
        let shares = |x: &Tensor| knn.votes(x, &memory, &labels);
        let (exact, nudged) = (shares(&query), shares(&(&query + Tensor::randn([1, 64], (Kind::Float, tch::Device::Cpu)) * 1e-5)));
        assert!(nudged.double_value(&[0, 0]) > 0.999, "{nudged}");
        assert!((&exact - &nudged).abs().max().double_value(&[]) < 1e-3, "{exact} against {nudged}");
    }

    /// Bad values are refused in `prepare`, naming the method and the field.
    #[test]
    fn bad_values_name_the_field() {
        for (config, field) in [(KnnConfig { k: 0, ..Default::default() }, "k must"), (KnnConfig { temperature: 0.0, ..Default::default() }, "temperature")] {
            let err = Knn::new(config).prepare(&testing::model(0, 2)).unwrap_err().to_string();
            assert!(err.contains("knn") && err.contains(field), "{err}");
        }
    }
}
