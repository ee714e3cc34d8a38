//! Head2Toe: a linear head on features selected from every intermediate of a
//! frozen backbone (Evci, Dumoulin, Larochelle & Mozer, "Head2Toe: Utilizing
//! Intermediate Representations for Better Transfer Learning", ICML 2022,
//! <https://arxiv.org/abs/2201.03529>; reference code
//! <https://github.com/google-research/head2toe>, `models/finetune.py` and
//! `finetune_fs.py`).
//!
//! - features: the output of every block (`Tap::Block(i)`) and the pooled
//!   features, each reduced to a vector by average pooling and L2-normalised
//!   per example (the reference's `feature_normalization = "unit_vector"`),
//!   then concatenated (`F` features in all). A CNN map `[b, c, h, w]` is
//!   pooled to an `n × n` grid, `n = ⌊√⌊target_size / c⌋⌋`, and a ViT's
//!   tokens `[b, t, d]` to `⌊target_size / d⌋` groups of consecutive tokens
//!   (never finer than the map or the tokens themselves), so a tap gives
//!   about `target_size` features at most (the reference's
//!   `additional_features_target_size`); a tap at least `target_size` wide
//!   (or `target_size = 0`) is averaged globally. Text backbones' tokens give
//!   their first token (`[CLS]`, `<s>`; the reference's `only_cls`): the taps
//!   carry no padding mask, and a mean would mix padding in.
//! - trains: nothing of the model. Once the training loop is over (a strategy
//!   of Head2Toe alone takes no step: the backbone and, by default, the head
//!   are frozen), the backbone runs once over the training split, in
//!   evaluation mode, without gradients ([`Method::fit_input`]: every other
//!   method of the strategy active), and two linear heads are fitted on those
//!   cached features with Adam (cosine-decayed learning rate, minibatches
//!   drawn from the run's seed, zero initialisation): first `W` `[classes, F]`
//!   under cross-entropy + `group_lasso · Σ_f ‖W[:, f]‖₂` (each input
//!   feature's weights are a group, the reference's `GroupLRP` with r = 2,
//!   p = 1), then, on the `⌊keep_fraction · F⌋` features of largest
//!   `‖W[:, f]‖₂` (the reference's `connectivity_l2` scores, same order), a
//!   fresh head without penalty. This fit is the method's train time.
//! - logits: the second head on the selected features, `x[:, idx] · Wᵀ + b`;
//!   they replace the head's logits. Until fitted the head's pass through (the
//!   method is the identity at initialisation). Composition as for `ncm`
//!   (`train_head = true` lets other methods train through the head first;
//!   the features are then read through the backbone they leave).
//! - artifact: `head2toe/index` `[k]` (int64, the selected features, in
//!   increasing order), `head2toe/widths` `[taps]` (int64, each tap's number
//!   of features, blocks then pooled: a backbone of other shapes is refused),
//!   `head2toe/weight` `[k, classes]` (the head's weight, transposed) and
//!   `head2toe/bias` `[classes]`, persistent state without gradient. The
//!   unit-vector normalisation keeps no statistics.
//! - cost: the fit holds the training split's `n × F` features (fp32) on the
//!   model's device; inference pools every tap, then reads `k` features.
//!
//! Deviations from the reference, which we simplified or had to change:
//! - taps: block outputs and the pooled features only; the reference also
//!   reads inside each block (ViT-B/16: attention and both MLP outputs and
//!   the pre-attention input of each of the 12 encoder blocks, plus the
//!   embeddings; ResNet-50: every layer of every unit, and the pre-trained
//!   logits).
//! - pooling: adaptive average pooling to the grid or token groups (every
//!   position counts); the reference pools fixed windows of `w // n` pixels
//!   or tokens, which drops a remainder. One target size, where the reference
//!   may concatenate several (`additional_features_multi_target_sizes`).
//! - normalisation: each tap's vector is normalised as a whole, before the
//!   selection gathers from it, so both fits and inference see the same
//!   features; the reference re-normalises each tap's selected subset after
//!   gathering (a tap that keeps one feature then gives its sign alone).
//! - selection and training: no interpolation of scores towards their
//!   layer's mean, no averaging over repeated selections, one learning rate
//!   and number of steps for both fits (the reference searches them per task
//!   on validation; here `group_lasso`, `keep_fraction` and `target_size` are
//!   configured, not searched), zero instead of Glorot initialisation (both
//!   problems are convex), and a minibatch stream of the training split
//!   reshuffled each pass (the reference repeats a batched dataset).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, RunData, SplitMix64, Tap, TrainConfig, config_table};

use crate::prototypes::{check_fit, empty_state, freeze_head, l2_normalise, set_state};

/// Head2Toe's settings; the defaults follow the reference's dSprites command
/// (target size 512, λ = 1e-5, 500 Adam steps at 0.01), with a 5 % selection
/// (the reference's commands keep 1 % to 20 %, searched per task).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Head2ToeConfig {
    /// About how many features each tap gives at most, by average pooling
    /// (a map to an `n × n` grid with `n = ⌊√(target_size / channels)⌋`,
    /// image tokens to `⌊target_size / width⌋` groups); taps at least as wide,
    /// and every tap when 0, are averaged globally. Default 512.
    pub target_size: i64,
    /// λ of the group-lasso penalty `λ Σ_f ‖W[:, f]‖₂` of the selection fit,
    /// added to the mean cross-entropy. Default 1e-5 (the reference's commands).
    pub group_lasso: f64,
    /// Fraction of the features kept, those of largest `‖W[:, f]‖₂`
    /// (`⌊keep_fraction · F⌋`, at least 1), in (0, 1]. Default 0.05.
    pub keep_fraction: f64,
    /// Adam steps of each of the two fits. Default 500.
    pub steps: usize,
    /// Peak learning rate of both fits, cosine-decayed to 0. Default 0.01.
    pub lr: f64,
    /// Examples per step (0 or at least the training split: full batch). Default 128.
    pub batch_size: i64,
    /// Keep the head trainable, for strategies where another method trains
    /// through it before Head2Toe's head replaces it. Default false: the head
    /// is frozen and Head2Toe alone takes no gradient step of the run.
    pub train_head: bool,
}

impl Default for Head2ToeConfig {
    fn default() -> Self {
        Head2ToeConfig { target_size: 512, group_lasso: 1e-5, keep_fraction: 0.05, steps: 500, lr: 0.01, batch_size: 128, train_head: false }
    }
}

struct State {
    vs: VarStore,
    /// `[k]` int64 once fitted.
    index: Tensor,
    /// `[taps]` int64 once fitted.
    widths: Tensor,
    /// `[k, classes]` once fitted.
    weight: Tensor,
    /// `[classes]`.
    bias: Tensor,
}

impl State {
    fn is_fitted(&self) -> bool {
        self.index.size()[0] > 0
    }
}

/// The Head2Toe method.
pub struct Head2Toe {
    config: Head2ToeConfig,
    state: Option<State>,
    classes: i64,
    blocks: usize,
    /// Token taps are text (first token) rather than image patches (pooled groups).
    text: bool,
    device: Device,
    /// The run's seed (minibatch order of the fits).
    seed: u64,
    /// Each tap's width in the last batch [`Method::fit_input`] made.
    seen_widths: Mutex<Vec<i64>>,
    summary: Option<toml::Table>,
}

impl Head2Toe {
    /// Head2Toe with `config`; the selection and head come in [`Method::fit`].
    pub fn new(config: Head2ToeConfig) -> Self {
        Head2Toe { config, state: None, classes: 0, blocks: 0, text: false, device: Device::Cpu, seed: 0, seen_widths: Mutex::new(Vec::new()), summary: None }
    }

    /// The taps read, in the order their features are concatenated: every block, then the pooled features.
    fn tap_list(&self) -> Vec<Tap> {
        (0..self.blocks).map(Tap::Block).chain([Tap::Pooled]).collect()
    }

    /// One tap reduced to a vector per example (fp32), before normalisation.
    ///
    /// # Shapes
    /// `[b, c, h, w]`, `[b, t, d]` or `[b, d]` → `[b, features]`.
    fn reduce(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float);
        let target = self.config.target_size;
        match *x.size().as_slice() {
            [_, c, h, w] => {
                if target == 0 || c >= target {
                    x.mean_dim([2, 3].as_slice(), false, Kind::Float)
                } else {
                    let n = ((target / c) as f64).sqrt().floor() as i64;
                    x.adaptive_avg_pool2d([n.min(h), n.min(w)]).flatten(1, -1)
                }
            }
            [_, _, _] if self.text => x.select(1, 0),
            [_, t, d] => {
                if target == 0 || d >= target {
                    x.mean_dim(1, false, Kind::Float)
                } else {
                    x.transpose(1, 2).adaptive_avg_pool1d((target / d).min(t)).flatten(1, -1)
                }
            }
            _ => x.flatten(1, -1),
        }
    }

    /// Every tap reduced and L2-normalised, concatenated, with each tap's width;
    /// `Err` names a tap the forward pass did not record.
    ///
    /// # Shapes
    /// → `[b, F]` fp32, on the taps' device.
    fn features(&self, taps: &BTreeMap<Tap, Tensor>) -> std::result::Result<(Tensor, Vec<i64>), Tap> {
        let parts =
            self.tap_list().into_iter().map(|t| taps.get(&t).map(|x| l2_normalise(&self.reduce(x))).ok_or(t)).collect::<std::result::Result<Vec<_>, _>>()?;
        let widths = parts.iter().map(|p| p.size()[1]).collect();
        Ok((Tensor::cat(&parts, 1), widths))
    }
}

/// The group-lasso penalty `Σ_f ‖W[:, f]‖₂`: the L2 norm of each input
/// feature's weights (a column), summed over features.
///
/// # Shapes
/// `w` `[classes, F]` → scalar.
pub fn group_lasso(w: &Tensor) -> Tensor {
    w.norm_scalaropt_dim(2, [0], false).sum(Kind::Float)
}

/// Minibatches of `0..n` in a fresh random order each pass, from a
/// splitmix64 stream of `seed` (not LibTorch's global generator, which other
/// threads may draw from), the incomplete end of each pass dropped.
struct Minibatches {
    rng: SplitMix64,
    order: Vec<i64>,
    at: usize,
}

impl Minibatches {
    fn new(seed: u64, n: i64) -> Self {
        Minibatches { rng: SplitMix64::new(seed), order: (0..n).collect(), at: usize::MAX }
    }

    /// The next `size` indices (`size` ≤ n).
    fn next(&mut self, size: usize) -> &[i64] {
        if self.at.saturating_add(size) > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.at = 0;
        }
        self.at += size;
        &self.order[self.at - size..self.at]
    }
}

/// A linear head `[classes, F]` and bias fitted to `x`, `y` with Adam
/// (`config.steps` steps, cosine-decayed `config.lr`, minibatches of
/// `config.batch_size`, zero initialisation) under mean cross-entropy +
/// `lambda · Σ_f ‖W[:, f]‖₂`. Returns the weight and the bias, detached.
///
/// # Shapes
/// `x` `[n, F]` float, `y` `[n]` int64, on one device → (`[classes, F]`, `[classes]`).
fn fit_linear(x: &Tensor, y: &Tensor, classes: i64, lambda: f64, config: &Head2ToeConfig, seed: u64) -> Result<(Tensor, Tensor)> {
    let (n, f) = (x.size()[0], x.size()[1]);
    let vs = VarStore::new(x.device());
    let w = vs.root().zeros("weight", &[classes, f]);
    let b = vs.root().zeros("bias", &[classes]);
    let mut opt = nn::Adam::default().build(&vs, config.lr).map_err(|e| Error::Data(format!("head2toe: {e}")))?;
    let batch = if config.batch_size <= 0 || config.batch_size >= n { n } else { config.batch_size } as usize;
    let mut batches = Minibatches::new(seed, n);
    tch::with_grad(|| {
        for step in 0..config.steps {
            opt.set_lr(config.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / config.steps as f64).cos()));
            let (xb, yb) = if batch as i64 == n {
                (x.shallow_clone(), y.shallow_clone())
            } else {
                let idx = Tensor::from_slice(batches.next(batch)).to_device(x.device());
                (x.index_select(0, &idx), y.index_select(0, &idx))
            };
            let mut loss = xb.linear(&w, Some(&b)).cross_entropy_for_logits(&yb);
            if lambda > 0.0 {
                loss += group_lasso(&w) * lambda;
            }
            opt.backward_step(&loss);
        }
    });
    Ok((w.detach(), b.detach()))
}

/// The selection: the `k` features whose weights in a group-lasso fit to `x`,
/// `y` have the largest L2 norms, in increasing order, with those norms (all `F`).
///
/// # Shapes
/// `x` `[n, F]`, `y` `[n]` → (`[k]` int64, `[F]`).
fn select(x: &Tensor, y: &Tensor, classes: i64, k: i64, config: &Head2ToeConfig, seed: u64) -> Result<(Tensor, Tensor)> {
    let (w, _) = fit_linear(x, y, classes, config.group_lasso, config, seed)?;
    let norms = w.norm_scalaropt_dim(2, [0], false);
    let (_, top) = norms.topk(k, 0, true, true);
    let (index, _) = top.sort(0, false);
    Ok((index, norms))
}

impl Method for Head2Toe {
    fn name(&self) -> &'static str {
        "head2toe"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "head2toe".into(), message });
        if c.target_size < 0 {
            return bad(format!("target_size must be ≥ 0 (0: global average pooling), got {}", c.target_size));
        }
        if !(c.keep_fraction > 0.0 && c.keep_fraction <= 1.0) {
            return bad(format!("keep_fraction must be in (0, 1], got {}", c.keep_fraction));
        }
        if !(c.group_lasso >= 0.0 && c.group_lasso.is_finite()) {
            return bad(format!("group_lasso must be a non-negative number, got {}", c.group_lasso));
        }
        if !(c.lr > 0.0 && c.lr.is_finite()) {
            return bad(format!("lr must be a positive number, got {}", c.lr));
        }
        if c.steps < 1 {
            return bad("steps must be ≥ 1".into());
        }
        if c.batch_size < 0 {
            return bad(format!("batch_size must be ≥ 0 (0: full batch), got {}", c.batch_size));
        }
        if !c.train_head {
            freeze_head(model);
        }
        self.classes = model.num_classes();
        self.blocks = model.backbone.num_blocks();
        self.text = model.backbone.image_preset().is_none();
        self.device = model.device();
        let vs = VarStore::new(model.device());
        let root = vs.root();
        let index = empty_state(&root, "index", &[], Kind::Int64);
        let widths = empty_state(&root, "widths", &[], Kind::Int64);
        let weight = empty_state(&root, "weight", &[self.classes], Kind::Float);
        let bias = root.zeros_no_train("bias", &[self.classes]);
        self.state = Some(State { vs, index, widths, weight, bias });
        Ok(())
    }

    fn before_train(&mut self, _model: &Model, _data: &RunData, cfg: &TrainConfig) -> Result<()> {
        self.seed = cfg.seed;
        Ok(())
    }

    fn fits_features(&self) -> bool {
        true
    }

    fn fit_input(&self, _pooled: &Tensor, taps: &BTreeMap<Tap, Tensor>) -> Tensor {
        let (x, widths) = self.features(taps).unwrap_or_else(|tap| {
            panic!("head2toe: the forward pass recorded no {tap:?}: it reads the backbone's intermediates, which cached features do not have")
        });
        *self.seen_widths.lock().unwrap_or_else(|p| p.into_inner()) = widths;
        x
    }

    fn fit(&mut self, features: &Tensor, labels: &Tensor) -> Result<()> {
        let classes = self.classes;
        check_fit("head2toe", features, labels, classes)?;
        let f = features.size()[1];
        let mut widths = std::mem::take(&mut *self.seen_widths.lock().unwrap_or_else(|p| p.into_inner()));
        if widths.iter().sum::<i64>() != f {
            // Rows that fit_input did not make (a direct call): one group.
            widths = vec![f];
        }
        let Some(state) = &mut self.state else { return Ok(()) };
        let x = features.to_kind(Kind::Float).to_device(self.device);
        let y = labels.to_device(self.device);
        let k = ((self.config.keep_fraction * f as f64).floor() as i64).clamp(1, f);
        let (index, _) = select(&x, &y, classes, k, &self.config, self.seed)?;
        let (w, b) = fit_linear(&x.index_select(1, &index), &y, classes, 0.0, &self.config, self.seed.wrapping_add(1))?;
        set_state(&mut state.index, &index);
        set_state(&mut state.widths, &Tensor::from_slice(&widths));
        set_state(&mut state.weight, &w.transpose(0, 1).contiguous());
        tch::no_grad(|| state.bias.copy_(&b));
        // Features kept per tap, in tap order.
        let index = Vec::<i64>::try_from(index.to_device(Device::Cpu)).unwrap_or_default();
        let mut start = 0;
        let per_tap: Vec<toml::Value> = widths
            .iter()
            .map(|&w| {
                let kept = index.iter().filter(|&&i| i >= start && i < start + w).count();
                start += w;
                toml::Value::Integer(kept as i64)
            })
            .collect();
        let mut summary = toml::Table::new();
        summary.insert("features".into(), toml::Value::Integer(f));
        summary.insert("kept".into(), toml::Value::Integer(k));
        summary.insert("kept_per_tap".into(), toml::Value::Array(per_tap));
        self.summary = Some(summary);
        Ok(())
    }

    fn forward_taps(&self) -> Vec<Tap> {
        self.tap_list()
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        let Some(s) = self.state.as_ref().filter(|s| s.is_fitted()) else { return logits };
        let (x, widths) = self.features(taps).unwrap_or_else(|tap| {
            panic!("head2toe: the forward pass recorded no {tap:?}: it reads the backbone's intermediates, which cached features do not have")
        });
        let fitted = Vec::<i64>::try_from(s.widths.to_device(Device::Cpu)).unwrap_or_default();
        assert_eq!(widths, fitted, "head2toe: the taps give features of other widths than those the selection was fitted on");
        x.index_select(1, &s.index).matmul(&s.weight) + &s.bias
    }

    fn summary(&self) -> Option<toml::Table> {
        self.summary.clone()
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
    use zhijian_backbones::toys;
    use zhijian_core::train::{self, TrainOptions};
    use zhijian_core::{Compute, Input, Split};

    fn t(v: &[f32], cols: i64) -> Tensor {
        Tensor::from_slice(v).view([-1, cols])
    }

    /// `Σ_f ‖W[:, f]‖₂` on a hand-made W, and a zero column's gradient is 0, not NaN.
    #[test]
    fn group_lasso_penalty_matches_hand_computed_value() {
        // Columns (3, 4), (0, 0), (1, 0), (−2, 2): norms 5, 0, 1, 2√2.
        let w = t(&[3.0, 0.0, 1.0, -2.0, 4.0, 0.0, 0.0, 2.0], 4).set_requires_grad(true);
        let p = group_lasso(&w);
        let want = 5.0 + 1.0 + 2.0 * std::f64::consts::SQRT_2;
        assert!((p.double_value(&[]) - want).abs() < 1e-5, "{p} vs {want}");
        p.backward();
        let g = Vec::<f32>::try_from(w.grad().view([-1])).unwrap();
        // d‖c‖/dc = c / ‖c‖; the zero column's subgradient is 0.
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let want = [0.6, 0.0, 1.0, -h, 0.8, 0.0, 0.0, h];
        assert!(g.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "{g:?}");
    }

    /// 2 informative features among 50 of noise, 3 classes: the group-lasso
    /// fit's largest columns are the 2, and the penalty shrinks the noise
    /// columns relative to them.
    #[test]
    fn selection_keeps_the_features_that_carry_the_signal() {
        let n = 300;
        let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
        // Class c sits at angle 2πc/3 on a circle of radius 2 in features 7 and 33.
        let angle = labels.to_kind(Kind::Float) * (std::f64::consts::TAU / 3.0);
        let noise = Tensor::randn([n, 52], (Kind::Float, Device::Cpu));
        let signal = Tensor::stack(&[angle.cos() * 2.0, angle.sin() * 2.0], 1);
        let x = noise.index_copy(1, &Tensor::from_slice(&[7i64, 33]), &(signal + Tensor::randn([n, 2], (Kind::Float, Device::Cpu)) * 0.3));
        let config = Head2ToeConfig { group_lasso: 1e-3, batch_size: 0, steps: 300, lr: 0.05, ..Default::default() };
        let (index, norms) = select(&x, &labels, 3, 2, &config, 0).unwrap();
        assert_eq!(Vec::<i64>::try_from(&index).unwrap(), [7, 33], "norms {norms}");
        // The largest noise column against the smaller signal column, with and without the penalty.
        let ratio = |lambda: f64| {
            let (_, norms) = select(&x, &labels, 3, 2, &Head2ToeConfig { group_lasso: lambda, ..config.clone() }, 0).unwrap();
            let signal = norms.index_select(0, &Tensor::from_slice(&[7i64, 33])).min().double_value(&[]);
            let noise = norms.index_fill(0, &Tensor::from_slice(&[7i64, 33]), 0.0).max().double_value(&[]);
            noise / signal
        };
        let (plain, penalised) = (ratio(0.0), ratio(0.05));
        assert!(penalised < 0.5 * plain, "noise/signal column norms: {plain} without the penalty, {penalised} with");
    }

    /// Reductions: a map to an n × n grid (or its global mean), image tokens
    /// to groups, text to its first token, vectors as they are.
    #[test]
    fn taps_reduce_to_about_target_size_features() {
        let model = toys::cnn(0);
        let mut m = Head2Toe::new(Head2ToeConfig { target_size: 32, ..Default::default() });
        m.prepare(&model).unwrap();
        // 2 channels, 32 / 2 = 16 → a 4 × 4 grid of 2 × 2 means of a 8 × 8 map.
        let map = Tensor::arange(2 * 2 * 64, (Kind::Float, Device::Cpu)).view([2, 2, 8, 8]);
        let r = m.reduce(&map);
        assert_eq!(r.size(), [2, 32]);
        // The first cell: (0 + 1 + 8 + 9) / 4.
        assert_eq!(r.double_value(&[0, 0]), 4.5);
        // 40 channels ≥ 32: the global mean.
        assert_eq!(m.reduce(&Tensor::ones([2, 40, 3, 3], (Kind::Float, Device::Cpu))).size(), [2, 40]);
        // Image tokens: width 8, 32 / 8 = 4 groups of 17 tokens.
        assert_eq!(m.reduce(&Tensor::ones([2, 17, 8], (Kind::Float, Device::Cpu))).size(), [2, 32]);
        assert_eq!(m.reduce(&Tensor::ones([2, 5], (Kind::Float, Device::Cpu))).size(), [2, 5]);
        let mut text = Head2Toe::new(Head2ToeConfig::default());
        text.prepare(&toys::bert(0)).unwrap();
        let tokens = Tensor::arange(2 * 3 * 4, (Kind::Float, Device::Cpu)).view([2, 3, 4]);
        assert!(text.reduce(&tokens).equal(&tokens.select(1, 0)));
        // target_size = 0: every map averaged globally.
        let mut global = Head2Toe::new(Head2ToeConfig { target_size: 0, ..Default::default() });
        global.prepare(&model).unwrap();
        assert_eq!(global.reduce(&map).size(), [2, 2]);
    }

    /// 3 classes of 16 px images told apart by which colour channel is
    /// brighter (a random-init CNN's early blocks see it): Head2Toe alone
    /// takes no optimiser step, leaves the model as it was, beats chance well
    /// on held-out images, and its artifact restores to the same logits.
    #[test]
    fn fits_a_toy_backbone_and_restores_from_its_artifact() {
        let split = |seed: i64, n: i64| {
            tch::manual_seed(seed);
            let labels = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(3);
            let shift = labels.one_hot(3).to_kind(Kind::Float).view([n, 3, 1, 1]) * 1.5;
            let images = Tensor::randn([n, 3, 16, 16], (Kind::Float, Device::Cpu)) + shift;
            Split { name: "toy".into(), input: Input::Images(images), labels }
        };
        let (train_split, test) = (split(1, 90), split(2, 60));
        let model = toys::cnn(3);
        let weights: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let config = Head2ToeConfig { steps: 200, lr: 0.05, keep_fraction: 0.2, ..Default::default() };
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(Head2Toe::new(config.clone()))];
        train::prepare(&model, &mut methods, 0).unwrap();
        assert!(train::trainable(&model, &methods).is_empty());
        assert!(!train::features_cacheable(&model, &methods), "the block taps need the backbone");
        let head = train::predict(&model, &[], &test.input, 32, Compute::Fp32).unwrap();
        assert!(train::predict(&model, &methods, &test.input, 32, Compute::Fp32).unwrap().equal(&head), "identity before fitting");

        let report = train::train(&model, &mut methods, &train_split, None, &TrainConfig::default(), &TrainOptions::default()).unwrap();
        assert_eq!(report.steps, 0);
        assert!(model.vs.variables().iter().all(|(n, t)| weights.iter().any(|(m, w)| m == n && w.equal(t))), "a model parameter moved");
        let summary = &report.summaries["head2toe"];
        let kept = summary["kept"].as_integer().unwrap();
        let per_tap: i64 = summary["kept_per_tap"].as_array().unwrap().iter().map(|v| v.as_integer().unwrap()).sum();
        assert_eq!(per_tap, kept);
        assert_eq!(summary["kept_per_tap"].as_array().unwrap().len(), 3, "2 blocks and the pooled features");
        let accuracy = train::evaluate(&model, &methods, &test, 32, Compute::Fp32).unwrap().top1();
        assert!(accuracy > 0.8, "test accuracy {accuracy} (chance 1/3)");

        let dir = std::env::temp_dir().join(format!("zhijian-head2toe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("artifact.safetensors");
        let artifact = train::artifact(&model, &methods);
        let names: Vec<&str> = artifact.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["head2toe/bias", "head2toe/index", "head2toe/weight", "head2toe/widths"]);
        zhijian_core::save_atomic(&artifact, &path).unwrap();
        let fresh = toys::with_weights(toys::cnn(4), &weights);
        let mut fresh_methods: Vec<Box<dyn Method>> = vec![Box::new(Head2Toe::new(config))];
        train::prepare(&fresh, &mut fresh_methods, 0).unwrap();
        train::restore(&fresh, &fresh_methods, &path).unwrap();
        let want = train::predict(&model, &methods, &test.input, 32, Compute::Fp32).unwrap();
        let got = train::predict(&fresh, &fresh_methods, &test.input, 32, Compute::Fp32).unwrap();
        assert!(got.equal(&want), "restored logits differ by {}", (got - want).abs().max());
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Defaults are documented values; unknown fields and bad values are refused, naming themselves.
    #[test]
    fn config_fields_have_defaults_and_bad_ones_name_themselves() {
        let table: toml::Table = toml::from_str("keep_fraction = 0.01\ntarget_size = 0").unwrap();
        let c: Head2ToeConfig = zhijian_core::parse_config("head2toe", &table).unwrap();
        assert_eq!(c, Head2ToeConfig { keep_fraction: 0.01, target_size: 0, ..Default::default() });
        let table: toml::Table = toml::from_str("keep_fractoin = 0.01").unwrap();
        let err = zhijian_core::parse_config::<Head2ToeConfig>("head2toe", &table).unwrap_err().to_string();
        assert!(err.contains("head2toe") && err.contains("keep_fractoin"), "{err}");
        let model = toys::cnn(0);
        let mut m = Head2Toe::new(Head2ToeConfig { keep_fraction: 1.5, ..Default::default() });
        let err = m.prepare(&model).unwrap_err().to_string();
        assert!(err.contains("head2toe") && err.contains("keep_fraction"), "{err}");
    }
}
