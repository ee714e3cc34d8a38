//! Trainable Projected Gradient Method (TPGM; Tian, Dai, Kira & Kira,
//! "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023,
//! <https://arxiv.org/abs/2303.10720>; reference code `PotatoTian/TPGM`,
//! `utils/tpgm.py`, the same file in its DomainNet and ImageNet experiments).
//!
//! Each constrained tensor keeps within a learnt distance γ of its
//! pre-trained value `W₀` (one γ per tensor):
//!
//! ```text
//! W̃(γ) = W₀ + clamp(γ / (‖W − W₀‖ + 1e-8), 0, 1) · (W − W₀)
//! ```
//!
//! with `‖·‖` the whole tensor's L2 norm (`norm = "l2"`) or the row-wise L1
//! norm over every dim but the first (`norm = "mars"`; a 1-D tensor such as
//! a bias gets one whole-tensor L1 norm, as the reference's `sum(dim=())`).
//! The radii are learnt on the held-out validation split, bi-level: every
//! `every` steps, for `iters` iterations, a batch of validation examples runs
//! through the model alone, in evaluation mode (no dropout, BatchNorm's
//! running statistics untouched), with the weights set to `W̃(γ)` from the
//! *unprojected* trained weights `W`; the cross-entropy's gradient reaches γ
//! by the chain rule,
//!
//! ```text
//! dL/dγ = Σ ∇L(W̃) ⊙ (W − W₀) / (‖W − W₀‖ + 1e-8)    over rows (or the tensor) where 0 < γ/(‖·‖+1e-8) < 1
//! ```
//!
//! (hardtanh's gradient: none where the ratio is clamped), and Adam (β
//! 0.9/0.999, ε 1e-8, bias-corrected as `torch.optim.Adam`) takes a step on
//! γ alone. Then the real weights become `W̃(γ)` (no gradient). Steps in
//! between (`every > 1`) project with the current γ without updating it, as
//! the reference's `proj_freq`.
//!
//! - γ starts at `min(‖W − W₀‖)/2` at the first projection (the smallest
//!   row's norm for MARS) and is clipped to `[1e-8, max ‖W − W₀‖]` before
//!   every use, as the reference's `_clip`.
//! - `post_hoc = true` projects once, after training (200 iterations by
//!   default): the reference's ImageNet variant, a learnt per-layer WiSE-FT
//!   (which uses `norm = "l2"`; the per-step DomainNet runs use MARS, the default here).
//! - constrained: the model's parameters that train when training starts,
//!   except the head (new for the task; the reference excludes it on
//!   DomainNet). Other methods' parameters are not: TPGM runs the model alone
//!   ([`Method::forwards_model_alone`]), so it cannot be combined with a
//!   method that alters the forward pass (LoRA, adapters…), and use it with
//!   `full_finetune`, `partial_k`, `bitfit` or `ln_tuning`.
//! - deviations: validation batches are drawn at random per iteration from
//!   a seed made of the run's seed and the step (the reference cycles a
//!   shuffled loader), without augmentation; the gradient on γ is computed by
//!   the chain rule from one backward pass of the model (`autograd.grad` on its
//!   parameters, leaving their `.grad` alone) rather than through a deep copy
//!   of the model, which gives the same number.
//! - trains: nothing of its own (γ and its Adam moments are training-only
//!   state held here, not in the artifact); alters no forward pass; merges:
//!   n/a. Cost: per update, `iters` forward and backward passes of a
//!   validation batch, and one copy of each constrained tensor.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use zhijian_core::train::TrainConfig;
use zhijian_core::{Ctx, Error, Input, Method, Model, Result, RunData, StepCx, config_table};

use crate::anchor::{Anchored, snapshot};

/// Added to each norm in the ratio; γ's floor (the reference's).
const EPS: f64 = 1e-8;
/// Adam's moment decays and ε on γ (`torch.optim.Adam`'s defaults, the reference's).
const BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;
/// Iterations per update when `iters` is not given: per step, and post hoc.
const ITERS_PER_STEP: usize = 1;
const ITERS_POST_HOC: usize = 200;

/// How the distance from the pre-trained weights is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// The whole tensor's L2 norm (the reference's ImageNet runs).
    L2,
    /// Row-wise L1 norm over every dim but the first, one radius per row
    /// ("maximum absolute row sum"); 1-D tensors: the whole-tensor L1 norm.
    #[default]
    Mars,
}

/// Configuration of TPGM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TpgmConfig {
    /// `mars` (row-wise L1) or `l2` (whole tensor). Default mars (the
    /// reference's DomainNet default; its ImageNet runs use l2).
    pub norm: Norm,
    /// Learning rate of the Adam steps on γ, > 0. Default 1e-2 (the reference's `proj_lr`).
    pub lr: f64,
    /// Update γ every this many optimiser steps (≥ 1; projecting at every
    /// step regardless). Default 1 (the reference's DomainNet `proj_freq`).
    pub every: usize,
    /// Adam iterations on γ per update, each on a new validation batch (≥ 1).
    /// Default 1 per step, 200 with `post_hoc` (the reference's `max_iters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<usize>,
    /// Validation examples per iteration (≥ 1; all of them if the split is
    /// smaller). Default 32.
    pub batch_size: i64,
    /// Project once, after training, instead of after every step (the
    /// reference's ImageNet variant). Default false.
    pub post_hoc: bool,
}

impl Default for TpgmConfig {
    fn default() -> Self {
        TpgmConfig { norm: Norm::Mars, lr: 1e-2, every: 1, iters: None, batch_size: 32, post_hoc: false }
    }
}

impl TpgmConfig {
    /// Rejects values out of range, naming the field (checked when the config
    /// is parsed and again in `prepare`, for configs built in code).
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "tpgm".into(), message });
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if self.every < 1 {
            return bad("every must be ≥ 1, got 0".into());
        }
        if self.iters == Some(0) {
            return bad("iters must be ≥ 1, got 0".into());
        }
        if self.batch_size < 1 {
            return bad(format!("batch_size must be ≥ 1, got {}", self.batch_size));
        }
        Ok(())
    }

    /// Adam iterations per update.
    pub fn iterations(&self) -> usize {
        self.iters.unwrap_or(if self.post_hoc { ITERS_POST_HOC } else { ITERS_PER_STEP })
    }
}

/// `‖d‖` as `norm` measures it, without the 1e-8: 0-dim for L2 and for
/// tensors of at most one dimension, `[rows, 1, …]` (keepdim) for MARS.
pub fn distance(d: &Tensor, norm: Norm) -> Tensor {
    match norm {
        Norm::L2 => d.to_kind(Kind::Float).norm(),
        Norm::Mars if d.dim() <= 1 => d.abs().sum(Kind::Float),
        Norm::Mars => {
            let dims: Vec<i64> = (1..d.dim() as i64).collect();
            d.abs().sum_dim_intlist(dims.as_slice(), true, Kind::Float)
        }
    }
}

/// The fraction of the difference kept, `clamp(γ / (norms + 1e-8), 0, 1)`.
pub fn ratio(gamma: f64, norms: &Tensor) -> Tensor {
    ((norms + EPS).reciprocal() * gamma).clamp(0.0, 1.0)
}

/// `W̃ = W₀ + clamp(γ / (‖W − W₀‖ + 1e-8), 0, 1) · (W − W₀)`.
pub fn project(w: &Tensor, w0: &Tensor, gamma: f64, norm: Norm) -> Tensor {
    let d = w - w0;
    let r = ratio(gamma, &distance(&d, norm));
    w0 + (r * d).to_kind(w0.kind())
}

/// `dL/dγ` (0-dim, f64) by the chain rule, given `grad = ∂L/∂W̃`, the
/// difference `d = W − W₀` and its `norms` ([`distance`]): `Σ grad ⊙ d /
/// (norms + 1e-8)` over the rows (or tensor) whose ratio is strictly inside
/// (0, 1); none elsewhere (hardtanh's gradient).
pub fn gamma_grad(grad: &Tensor, d: &Tensor, norms: &Tensor, gamma: f64) -> Tensor {
    let inv = (norms + EPS).reciprocal();
    let raw = &inv * gamma;
    let inside = raw.gt(0.0).logical_and(&raw.lt(1.0)).to_kind(Kind::Float);
    (grad.to_kind(Kind::Float) * d.to_kind(Kind::Float) * inv * inside).sum(Kind::Double)
}

/// One constrained tensor and its radius.
struct Radius {
    anchor: Anchored,
    /// γ; `None` until the first projection.
    gamma: Option<f64>,
    /// Adam's moments and step count.
    m: f64,
    v: f64,
    t: i32,
    /// `‖W − W₀‖` at the last projection.
    norms: Option<Tensor>,
}

/// The examples and labels of the validation split.
struct Validation {
    input: Input,
    labels: Tensor,
}

/// The TPGM method.
pub struct Tpgm {
    config: TpgmConfig,
    tensors: Vec<Radius>,
    val: Option<Validation>,
    seed: u64,
    /// Updates of γ and Adam iterations so far, and the last iteration's validation loss.
    updates: usize,
    iterations: usize,
    last_loss: Option<f64>,
}

/// The same examples as `input`, sharing its storage.
fn share(input: &Input) -> Input {
    match input {
        Input::Tokens { ids, mask } => Input::Tokens { ids: ids.shallow_clone(), mask: mask.shallow_clone() },
        Input::Images(x) => Input::Images(x.shallow_clone()),
        Input::Lazy(source) => Input::Lazy(source.clone()),
        Input::Features(x) => Input::Features(x.shallow_clone()),
        Input::Hidden { block, states, mask } => Input::Hidden { block: *block, states: states.shallow_clone(), mask: mask.shallow_clone() },
    }
}

/// SplitMix64's output function.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `k` distinct indices of `0..n` (all of them if `k ≥ n`), sorted, drawn
/// from `seed` by Floyd's algorithm (no global generator is touched).
fn draw(n: i64, k: i64, seed: u64) -> Vec<i64> {
    if k >= n {
        return (0..n).collect();
    }
    let mut state = seed;
    let mut chosen = std::collections::BTreeSet::new();
    for j in n - k..n {
        state = mix(state);
        let r = (state % (j as u64 + 1)) as i64;
        if !chosen.insert(r) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

impl Tpgm {
    /// TPGM with `config`; the pre-trained values and the validation split
    /// are taken in `before_train`.
    pub fn new(config: TpgmConfig) -> Self {
        Tpgm { config, tensors: Vec::new(), val: None, seed: 0, updates: 0, iterations: 0, last_loss: None }
    }

    /// Each constrained tensor's name and γ (`None` before its first projection).
    pub fn gammas(&self) -> Vec<(String, Option<f64>)> {
        self.tensors.iter().map(|r| (r.anchor.name.clone(), r.gamma)).collect()
    }

    /// Writes `W̃(γ)` of every tensor into its parameter, γ clipped to `[1e-8, max ‖·‖]` first.
    fn write(&mut self, diffs: &[Tensor], norms: &[Tensor], maxima: &[f64]) {
        tch::no_grad(|| {
            for ((r, d), (n, &max)) in self.tensors.iter_mut().zip(diffs).zip(norms.iter().zip(maxima)) {
                let gamma = r.gamma.expect("initialised").clamp(EPS, max.max(EPS));
                r.gamma = Some(gamma);
                let w = &r.anchor.start + (ratio(gamma, n) * d).to_kind(r.anchor.start.kind());
                r.anchor.param.shallow_clone().copy_(&w);
            }
        });
    }

    /// Projects the constrained tensors, first updating γ with `iters` Adam
    /// iterations on validation batches (none: project with the current γ).
    /// `stream` tells the batches of this update apart from other updates'.
    fn update(&mut self, model: &Model, iters: usize, stream: u64) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        // The unprojected weights: every iteration projects from them.
        let diffs: Vec<Tensor> = tch::no_grad(|| self.tensors.iter().map(|r| r.anchor.param.detach() - &r.anchor.start).collect());
        let norms: Vec<Tensor> = diffs.iter().map(|d| distance(d, self.config.norm)).collect();
        // One read of every tensor's smallest and largest norm.
        let ends: Vec<Tensor> = norms.iter().flat_map(|n| [n.min().to_kind(Kind::Double), n.max().to_kind(Kind::Double)]).collect();
        let ends = Vec::<f64>::try_from(Tensor::stack(&ends, 0).to_device(Device::Cpu))?;
        let maxima: Vec<f64> = ends.chunks(2).map(|e| e[1]).collect();
        for (r, e) in self.tensors.iter_mut().zip(ends.chunks(2)) {
            r.gamma.get_or_insert(e[0] / 2.0);
        }
        let device = model.device();
        for it in 0..iters {
            self.write(&diffs, &norms, &maxima);
            let val = self.val.as_ref().expect("checked in before_train");
            let idx = draw(val.labels.size()[0], self.config.batch_size, mix(mix(self.seed ^ mix(stream)) ^ it as u64));
            let idx = Tensor::from_slice(&idx);
            let input = val.input.select(&idx, device)?;
            let labels = val.labels.index_select(0, &idx).to_device(device);
            let params: Vec<&Tensor> = self.tensors.iter().map(|r| &r.anchor.param).collect();
            let (loss, grads) = tch::with_grad(|| -> Result<(f64, Vec<Tensor>)> {
                let logits = model.forward(&Ctx::plain(false), &input);
                let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(&labels);
                let grads = Tensor::f_run_backward(&[&loss], &params, false, false)?;
                Ok((loss.double_value(&[]), grads))
            })?;
            let g: Vec<Tensor> = tch::no_grad(|| {
                grads
                    .iter()
                    .zip(self.tensors.iter().zip(diffs.iter().zip(&norms)))
                    .map(|(grad, (r, (d, n)))| {
                        // A tensor the forward pass does not use has no gradient.
                        if grad.defined() { gamma_grad(grad, d, n, r.gamma.expect("initialised")) } else { Tensor::zeros([], (Kind::Double, d.device())) }
                    })
                    .collect()
            });
            let g = Vec::<f64>::try_from(Tensor::stack(&g, 0).to_device(Device::Cpu))?;
            for (r, g) in self.tensors.iter_mut().zip(g) {
                r.t += 1;
                r.m = BETAS.0 * r.m + (1.0 - BETAS.0) * g;
                r.v = BETAS.1 * r.v + (1.0 - BETAS.1) * g * g;
                let (c1, c2) = (1.0 - BETAS.0.powi(r.t), 1.0 - BETAS.1.powi(r.t));
                let step = self.config.lr / c1 * r.m / (r.v.sqrt() / c2.sqrt() + ADAM_EPS);
                r.gamma = r.gamma.map(|gamma| gamma - step);
            }
            self.iterations += 1;
            self.last_loss = Some(loss);
        }
        if iters > 0 {
            self.updates += 1;
        }
        self.write(&diffs, &norms, &maxima);
        for (r, n) in self.tensors.iter_mut().zip(norms) {
            r.norms = Some(n);
        }
        Ok(())
    }
}

impl Method for Tpgm {
    fn name(&self) -> &'static str {
        "tpgm"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        self.config.validate()
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        let Some(val) = data.val.filter(|v| !v.is_empty()) else {
            return Err(Error::MethodConfig {
                method: "tpgm".into(),
                message: "learns its projection radii on the held-out validation split, and this run has none (or an empty one): give the experiment a validation split".into(),
            });
        };
        self.val = Some(Validation { input: share(&val.input), labels: val.labels.shallow_clone() });
        self.seed = cfg.seed;
        // Only the model's own parameters: the model runs alone in the validation passes.
        self.tensors = snapshot(data.params, |name| !name.contains('/') && !data.is_head(model, name))
            .into_iter()
            .map(|anchor| Radius { anchor, gamma: None, m: 0.0, v: 0.0, t: 0, norms: None })
            .collect();
        (self.updates, self.iterations, self.last_loss) = (0, 0, None);
        Ok(())
    }

    fn after_step(&mut self, cx: &StepCx) -> Result<()> {
        if self.config.post_hoc {
            return Ok(());
        }
        let iters = if (cx.step - 1).is_multiple_of(self.config.every) { self.config.iterations() } else { 0 };
        self.update(cx.model, iters, cx.step as u64)
    }

    fn after_train(&mut self, model: &Model, _data: &RunData) -> Result<()> {
        if !self.config.post_hoc {
            return Ok(());
        }
        self.update(model, self.config.iterations(), u64::MAX)
    }

    fn forwards_model_alone(&self) -> bool {
        true
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut table = toml::Table::new();
        table.insert("tensors".into(), toml::Value::Integer(self.tensors.len() as i64));
        table.insert("updates".into(), toml::Value::Integer(self.updates as i64));
        table.insert("iterations".into(), toml::Value::Integer(self.iterations as i64));
        if let Some(loss) = self.last_loss {
            table.insert("val_loss_last".into(), toml::Value::Float(loss));
        }
        let ratios: Vec<Tensor> =
            self.tensors.iter().filter_map(|r| Some(ratio(r.gamma?, r.norms.as_ref()?).to_kind(Kind::Double).flatten(0, -1).to_device(Device::Cpu))).collect();
        if !ratios.is_empty() {
            // γ / ‖W − W₀‖ at the last projection, per row (MARS) or tensor: the fraction of the fine-tuned change kept.
            let all = Tensor::cat(&ratios, 0);
            let means: Vec<f64> = ratios.iter().map(|r| r.mean(Kind::Double).double_value(&[])).collect();
            table.insert("ratio_mean".into(), toml::Value::Float(means.iter().sum::<f64>() / means.len() as f64));
            table.insert("ratio_min".into(), toml::Value::Float(all.min().double_value(&[])));
            table.insert("ratio_max".into(), toml::Value::Float(all.max().double_value(&[])));
        }
        Some(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zhijian_backbones::{Mlp, MlpConfig, SmallCnn, SmallCnnConfig};
    use zhijian_core::Split;

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape).to_kind(Kind::Float)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn close(got: &Tensor, want: &[f64]) {
        let got = values(got);
        assert!(got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "got {got:?}, want {want:?}");
    }

    /// 1 × 2 × 2 images → 4 features (ReLU) → 3 classes, every parameter trainable.
    fn mlp() -> Model {
        tch::manual_seed(1);
        let config = MlpConfig { image_size: 2, in_chans: 1, hidden: vec![4] };
        let model = Model::new(Device::Cpu, 3, |p| Box::new(Mlp::new(p, &config).unwrap()));
        model.unfreeze_where(|_, _| true);
        model
    }

    /// `n` random 1 × 2 × 2 images whose label is the brightest pixel's index mod 3.
    fn split(seed: i64, n: i64) -> Split {
        tch::manual_seed(seed);
        let images = Tensor::randn([n, 1, 2, 2], (Kind::Float, Device::Cpu));
        let labels = images.flatten(1, 3).argmax(1, false).remainder(3);
        Split { name: "val".into(), input: Input::Images(images), labels }
    }

    fn val_loss(model: &Model, val: &Split) -> f64 {
        tch::no_grad(|| model.forward(&Ctx::plain(false), &val.input).cross_entropy_for_logits(&val.labels).double_value(&[]))
    }

    /// Projection on hand-computed tensors: a 2×2 matrix under MARS (one row
    /// clamped at ratio 1) and under L2, and a bias (one whole-tensor norm).
    #[test]
    fn projection_matches_hand_computed_values() {
        let w0 = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let w = t(&[2.0, 0.0, 3.5, 4.0], &[2, 2]); // d = (1, −2), (0.5, 0): row L1 3 and 0.5
        // γ = 1: row 0 keeps 1/3, row 1 all of it (1/0.5 clamped to 1).
        close(&project(&w, &w0, 1.0, Norm::Mars), &[1.0 + 1.0 / 3.0, 2.0 - 2.0 / 3.0, 3.5, 4.0]);
        // L2: ‖d‖ = √(1 + 4 + 0.25) = √5.25; γ = 1 keeps 1/√5.25 of everything.
        let k = 1.0 / 5.25f64.sqrt();
        close(&project(&w, &w0, 1.0, Norm::L2), &[1.0 + k, 2.0 - 2.0 * k, 3.0 + 0.5 * k, 4.0]);
        // A bias: d = (0.3, −0.1), one L1 norm 0.4 under MARS; γ = 0.1 keeps a quarter.
        let b0 = t(&[0.0, 1.0], &[2]);
        let b = t(&[0.3, 0.9], &[2]);
        close(&project(&b, &b0, 0.1, Norm::Mars), &[0.075, 0.975]);
        close(&distance(&(&b - &b0), Norm::Mars), &[0.4]);
        // Under L2: ‖d‖ = √0.1.
        let k = 0.1 / 0.1f64.sqrt();
        close(&project(&b, &b0, 0.1, Norm::L2), &[0.3 * k, 1.0 - 0.1 * k]);
        // γ beyond the norm keeps everything.
        close(&project(&w, &w0, 10.0, Norm::L2), &values(&w));
    }

    /// The chain-rule `dL/dγ` equals autograd's through a differentiable γ,
    /// for MARS (one row clamped, so masked) and L2, on a matrix and a bias.
    #[test]
    fn chain_rule_gradient_matches_autograd() {
        let cases = [
            (t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]), t(&[1.5, 1.0, 3.1, 4.1, 3.0, 7.0], &[3, 2]), 0.8),
            (t(&[0.0, 1.0, -1.0], &[3]), t(&[0.4, 0.7, -0.5], &[3]), 0.5),
        ];
        for (w0, w, gamma0) in cases {
            for norm in [Norm::Mars, Norm::L2] {
                let d = &w - &w0;
                let n = distance(&d, norm);
                let gamma = Tensor::from_slice(&[gamma0]).view([]).set_requires_grad(true);
                let wt = &w0 + ((&n + EPS).reciprocal() * &gamma).clamp(0.0, 1.0).to_kind(Kind::Float) * &d;
                // L = Σ a ⊙ W̃ + Σ W̃³: ∂L/∂W̃ = a + 3 W̃².
                let a = Tensor::arange(wt.numel() as i64, (Kind::Float, Device::Cpu)).view(wt.size().as_slice()) - 1.0;
                let loss = (&a * &wt).sum(Kind::Float) + wt.pow_tensor_scalar(3).sum(Kind::Float);
                let grads = Tensor::run_backward(&[&loss], &[&gamma, &wt], false, false);
                let (want, grad_wt) = (grads[0].double_value(&[]), &grads[1]);
                let got = gamma_grad(grad_wt, &d, &n, gamma0).double_value(&[]);
                assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{norm:?} on {:?}: chain rule {got}, autograd {want}", w.size());
                assert!(want.abs() > 1e-3, "the case exercises a non-zero gradient");
            }
        }
    }

    /// After "fine-tuning" on the validation data itself: one Adam iteration
    /// moves each γ by `lr` against the sign of the validation loss's slope in
    /// γ (measured by finite differences through the real model), and twenty
    /// iterations bring the projected model's validation loss below the
    /// starting projection's (γ = half the smallest norm).
    #[test]
    fn gamma_moves_to_lower_the_validation_loss() {
        let model = mlp();
        let val = split(3, 48);
        let params = model.trainable();
        let data = RunData { val: Some(&val), params: &params, ..RunData::train_only(&val) };
        let w0: Vec<Tensor> = params.iter().map(|(_, p)| p.detach().copy()).collect();
        // Fine-tune every parameter on the validation split with plain gradient descent.
        for _ in 0..200 {
            let loss = model.forward(&Ctx::plain(false), &val.input).cross_entropy_for_logits(&val.labels);
            let grads = Tensor::run_backward(&[&loss], &params.iter().map(|(_, p)| p).collect::<Vec<_>>(), false, false);
            tch::no_grad(|| {
                for ((_, p), g) in params.iter().zip(&grads) {
                    let _ = p.shallow_clone().f_sub_(&(g * 0.5)).unwrap();
                }
            });
        }
        let tuned: Vec<Tensor> = params.iter().map(|(_, p)| p.detach().copy()).collect();
        let tuned_loss = val_loss(&model, &val);
        // The constrained tensors (all but the head), by index into `params`.
        let constrained: Vec<usize> = (0..params.len()).filter(|&i| params[i].0.starts_with("layers.")).collect();
        let init: Vec<f64> = constrained.iter().map(|&i| distance(&(&tuned[i] - &w0[i]), Norm::Mars).min().double_value(&[]) / 2.0).collect();
        // The validation loss with the constrained tensors projected with `gammas`.
        let loss_at = |gammas: &[f64]| {
            tch::no_grad(|| {
                for (i, (_, p)) in params.iter().enumerate() {
                    p.shallow_clone().copy_(&tuned[i]);
                }
                for (&i, &g) in constrained.iter().zip(gammas) {
                    params[i].1.shallow_clone().copy_(&project(&tuned[i], &w0[i], g, Norm::Mars));
                }
            });
            val_loss(&model, &val)
        };
        let start = loss_at(&init);
        assert!(tuned_loss < start, "fine-tuning helps: {tuned_loss} against {start}");
        for (iters, lr) in [(1, 0.01), (20, 0.05)] {
            tch::no_grad(|| params.iter().zip(&tuned).for_each(|((_, p), w)| p.shallow_clone().copy_(w)));
            let mut tpgm = Tpgm::new(TpgmConfig { lr, iters: Some(iters), batch_size: 64, ..Default::default() });
            tpgm.prepare(&model).unwrap();
            tpgm.before_train(&model, &RunData { params: &params, ..data }, &TrainConfig::default()).unwrap();
            // before_train snapshots W₀: here the fine-tuned weights stand in for the
            // step's, so the snapshot is set back to the true W₀.
            for (r, &i) in tpgm.tensors.iter_mut().zip(&constrained) {
                assert_eq!(r.anchor.name, params[i].0, "the head is not constrained");
                r.anchor.start = w0[i].copy();
            }
            assert_eq!(tpgm.tensors.len(), constrained.len());
            tpgm.after_step(&StepCx { model: &model, step: 1, total: 1, lr: 0.0, params: &params }).unwrap();
            let learnt: Vec<f64> = tpgm.gammas().into_iter().map(|(_, g)| g.unwrap()).collect();
            // The weights now are the projection with the learnt radii.
            for (&i, &g) in constrained.iter().zip(&learnt) {
                assert!(params[i].1.allclose(&project(&tuned[i], &w0[i], g, Norm::Mars), 1e-6, 1e-6, false), "{}", params[i].0);
            }
            if iters == 1 {
                // Adam's first step is lr · sign(dL/dγ).
                for (k, (&g, &g0)) in learnt.iter().zip(&init).enumerate() {
                    let h = 1e-3;
                    let (mut up, mut down) = (init.clone(), init.clone());
                    up[k] += h;
                    down[k] -= h;
                    let slope = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
                    assert!(slope.abs() > 1e-4, "a measurable slope");
                    assert!((g - (g0 - lr * slope.signum())).abs() < 1e-6, "{}: γ {g0} → {g}, slope {slope}", params[constrained[k]].0);
                }
            } else {
                let after = val_loss(&model, &val);
                assert!(after < start, "the learnt radii lower the validation loss: {after} against {start}");
                let summary = tpgm.summary().unwrap();
                assert_eq!(summary["updates"].as_integer(), Some(1));
                assert_eq!(summary["iterations"].as_integer(), Some(20));
                assert!(summary["ratio_max"].as_float().unwrap() <= 1.0);
            }
        }
    }

    /// Post hoc, the steps leave the weights alone and `after_train` projects.
    #[test]
    fn post_hoc_projects_once_after_training() {
        let model = mlp();
        let val = split(3, 16);
        let params = model.trainable();
        let mut tpgm = Tpgm::new(TpgmConfig { post_hoc: true, iters: Some(3), norm: Norm::L2, ..Default::default() });
        let data = RunData { val: Some(&val), params: &params, ..RunData::train_only(&val) };
        tpgm.before_train(&model, &data, &TrainConfig::default()).unwrap();
        let weight = params.iter().find(|(n, _)| n == "layers.0.weight").unwrap().1.shallow_clone();
        tch::no_grad(|| weight.shallow_clone().copy_(&(&weight + 0.5)));
        let moved = weight.detach().copy();
        tpgm.after_step(&StepCx { model: &model, step: 1, total: 1, lr: 0.0, params: &params }).unwrap();
        assert!(weight.equal(&moved));
        tpgm.after_train(&model, &data).unwrap();
        assert!(!weight.allclose(&moved, 1e-4, 1e-4, false), "projected toward W₀");
        assert_eq!(tpgm.summary().unwrap()["iterations"].as_integer(), Some(3));
    }

    /// The validation passes run in evaluation mode: BatchNorm's running statistics stay.
    #[test]
    fn validation_passes_leave_batchnorm_statistics_alone() {
        tch::manual_seed(0);
        let config = SmallCnnConfig { image_size: 8, in_chans: 1, channels: vec![2] };
        let model = Model::new(Device::Cpu, 3, |p| Box::new(SmallCnn::new(p, &config).unwrap()));
        model.unfreeze_where(|_, _| true);
        let val = Split {
            name: "val".into(),
            input: Input::Images(Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu))),
            labels: Tensor::from_slice(&[0i64, 1, 2, 0]),
        };
        let params = model.trainable();
        let mut tpgm = Tpgm::new(TpgmConfig::default());
        tpgm.before_train(&model, &RunData { val: Some(&val), params: &params, ..RunData::train_only(&val) }, &TrainConfig::default()).unwrap();
        let buffers = |m: &Model| {
            let mut v: Vec<(String, Tensor)> = m.vs.variables().into_iter().filter(|(n, _)| n.contains("running")).map(|(n, t)| (n, t.copy())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let before = buffers(&model);
        assert!(!before.is_empty());
        tch::no_grad(|| {
            for (_, p) in &params {
                p.shallow_clone().copy_(&(p + 0.1));
            }
        });
        tpgm.after_step(&StepCx { model: &model, step: 1, total: 1, lr: 0.0, params: &params }).unwrap();
        for ((name, a), (_, b)) in before.iter().zip(buffers(&model)) {
            assert!(a.equal(&b), "{name} changed");
        }
    }

    #[test]
    fn a_run_without_validation_split_is_refused() {
        let model = mlp();
        let train = split(0, 8);
        let params = model.trainable();
        let mut tpgm = Tpgm::new(TpgmConfig::default());
        let err = tpgm.before_train(&model, &RunData { params: &params, ..RunData::train_only(&train) }, &TrainConfig::default()).unwrap_err().to_string();
        assert!(err.contains("tpgm") && err.contains("validation split"), "{err}");
    }

    #[test]
    fn config_out_of_range_is_refused_naming_the_field() {
        for (config, field) in [
            (TpgmConfig { lr: 0.0, ..Default::default() }, "lr"),
            (TpgmConfig { every: 0, ..Default::default() }, "every"),
            (TpgmConfig { iters: Some(0), ..Default::default() }, "iters"),
            (TpgmConfig { batch_size: 0, ..Default::default() }, "batch_size"),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        assert_eq!(TpgmConfig::default().iterations(), 1);
        assert_eq!(TpgmConfig { post_hoc: true, ..Default::default() }.iterations(), 200);
        let drawn = draw(100, 10, 7);
        assert_eq!(drawn.len(), 10);
        assert!(drawn.windows(2).all(|w| w[0] < w[1]) && drawn.iter().all(|&i| (0..100).contains(&i)));
        assert_eq!(drawn, draw(100, 10, 7));
    }
}
