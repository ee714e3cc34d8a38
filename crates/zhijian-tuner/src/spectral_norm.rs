//! Spectral-norm constraint: after every optimiser step each trained weight
//! matrix is projected back onto `σ_max(W) ≤ λ` by `W ← W / max(1, σ_max(W)/λ)`
//! (Gouk, Frank, Pfahringer & Cree, Machine Learning 2021, "Regularisation of
//! neural networks by enforcing Lipschitz continuity",
//! <https://arxiv.org/abs/1804.04368>), which bounds the network's Lipschitz
//! constant layer by layer. Yoshida & Miyato (2017,
//! <https://arxiv.org/abs/1705.10941>) penalise `λ/2·Σ σ_max(W)²` instead:
//! `mode = "penalty"`.
//!
//! - Bound: for fine-tuning, each layer's bound is `max_ratio` times its
//!   pre-trained spectral norm σ⁰ (default 1: no layer may become more
//!   Lipschitz than it was), or an absolute `max_norm` for every layer.
//! - σ_max: exact at the start (singular values), then one power iteration
//!   per step from the previous vector (as Miyato et al. 2018 and Gouk et al.
//!   do), a close upper-tracking estimate as the weights move slowly.
//! - Convolution kernels `[out, in/groups, kh, kw]` are taken as the
//!   `[out, in/groups·kh·kw]` matrix (Miyato et al.'s reshaping); this bounds
//!   the kernel, not the exact operator norm of the strided convolution.
//! - trains: nothing of its own; constrains the model's trainable weight
//!   matrices (2-D and up), the new head only with `head = true`. Methods'
//!   own parameters (LoRA's factors) are not layers and are left alone.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::{Error, Method, Model, Result, RunData, StepCx, StepOutput, TrainConfig, config_table};

/// Projection after each step, or penalty in the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpectralMode {
    /// Gouk et al.: project after each step. Default.
    #[default]
    Project,
    /// Yoshida & Miyato: add `λ/2·Σ σ_max(W)²` to the loss (λ = `penalty`).
    Penalty,
}

/// Configuration of the spectral-norm constraint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpectralNormConfig {
    /// Projection or penalty. Default `project`.
    pub mode: SpectralMode,
    /// Bound relative to each layer's pre-trained spectral norm. Default 1.
    pub max_ratio: f64,
    /// An absolute bound for every layer instead (overrides `max_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_norm: Option<f64>,
    /// Weight λ of the penalty in `penalty` mode. Default 0.01 (Yoshida & Miyato's).
    pub penalty: f64,
    /// Constrain the new head too. Default false.
    pub head: bool,
}

impl Default for SpectralNormConfig {
    fn default() -> Self {
        SpectralNormConfig { mode: SpectralMode::Project, max_ratio: 1.0, max_norm: None, penalty: 0.01, head: false }
    }
}

impl SpectralNormConfig {
    /// Rejects non-positive bounds and a negative penalty, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "spectral_norm".into(), message });
        if !(self.max_ratio > 0.0 && self.max_ratio.is_finite()) {
            return bad(format!("`max_ratio = {}`: must be a positive number", self.max_ratio));
        }
        if let Some(n) = self.max_norm.filter(|n| !(*n > 0.0 && n.is_finite())) {
            return bad(format!("`max_norm = {n}`: must be a positive number"));
        }
        if !(self.penalty >= 0.0 && self.penalty.is_finite()) {
            return bad(format!("`penalty = {}`: must be a non-negative number", self.penalty));
        }
        Ok(())
    }
}

/// One constrained weight: the live tensor, its bound, and the power
/// iteration's left singular vector estimate.
struct Layer {
    weight: Tensor,
    bound: f64,
    u: Tensor,
}

/// The spectral-norm constraint.
pub struct SpectralNorm {
    config: SpectralNormConfig,
    layers: Vec<Layer>,
    projected: usize,
    largest_ratio: f64,
}

impl SpectralNorm {
    /// The constraint with `config`.
    pub fn new(config: SpectralNormConfig) -> Self {
        SpectralNorm { config, layers: Vec::new(), projected: 0, largest_ratio: 0.0 }
    }
}

/// `W` as the matrix whose spectral norm is constrained: `[out, rest]`.
fn as_matrix(w: &Tensor) -> Tensor {
    w.flatten(1, -1).to_kind(Kind::Float)
}

/// The exact largest singular value of `w` (as a matrix) and its left singular vector.
pub fn top_singular(w: &Tensor) -> (f64, Tensor) {
    let (u, s, _) = as_matrix(w).svd(true, true);
    (s.double_value(&[0]), u.select(1, 0))
}

/// One power iteration from `u`: returns σ ≈ ‖Wᵀu‖ after `v = Wᵀu/‖Wᵀu‖`,
/// `u ← Wv/‖Wv‖`, σ = uᵀWv; and the new `u`.
pub fn power_iteration(w: &Tensor, u: &Tensor) -> (Tensor, Tensor) {
    let m = as_matrix(w);
    // v and u are held fixed (no gradient): σ's gradient in W is u·vᵀ.
    let v = m.tr().mv(u).detach();
    let v = &v / v.norm().clamp_min(1e-12);
    let wv = m.mv(&v);
    let u_new = &wv / wv.norm().clamp_min(1e-12);
    let sigma = u_new.detach().dot(&wv);
    (sigma, u_new.detach())
}

impl Method for SpectralNorm {
    fn name(&self) -> &'static str {
        "spectral_norm"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        Ok(())
    }

    fn before_train(&mut self, model: &Model, data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        let c = &self.config;
        self.layers = tch::no_grad(|| {
            data.params
                .iter()
                .filter(|(name, t)| !name.contains('/') && t.dim() >= 2 && (c.head || !data.is_head(model, name)))
                .map(|(_, t)| {
                    let (sigma, u) = top_singular(t);
                    Layer { weight: t.shallow_clone(), bound: c.max_norm.unwrap_or(c.max_ratio * sigma), u }
                })
                .collect()
        });
        Ok(())
    }

    fn after_step(&mut self, _cx: &StepCx) -> Result<()> {
        if self.config.mode != SpectralMode::Project {
            return Ok(());
        }
        tch::no_grad(|| {
            for layer in &mut self.layers {
                let (sigma, u) = power_iteration(&layer.weight, &layer.u);
                layer.u = u;
                let ratio = sigma.double_value(&[]) / layer.bound;
                self.largest_ratio = self.largest_ratio.max(ratio);
                if ratio > 1.0 {
                    let _ = layer.weight.g_div_scalar_(ratio);
                    self.projected += 1;
                }
            }
        });
        Ok(())
    }

    fn extra_loss(&self, _step: &StepOutput) -> Option<Tensor> {
        if self.config.mode != SpectralMode::Penalty || self.layers.is_empty() {
            return None;
        }
        // σ = uᵀWv with u, v from the last iteration held fixed: the gradient is σ·u·vᵀ per unit of σ.
        let squares = self.layers.iter().map(|l| {
            let (sigma, _) = power_iteration(&l.weight, &l.u);
            sigma.square()
        });
        squares.reduce(|a, b| a + b).map(|s| s * (0.5 * self.config.penalty))
    }

    fn after_backward(&mut self, _cx: &StepCx) -> Result<()> {
        if self.config.mode == SpectralMode::Penalty {
            // Carry the power iteration forward between steps.
            tch::no_grad(|| {
                for layer in &mut self.layers {
                    layer.u = power_iteration(&layer.weight, &layer.u).1;
                }
            });
        }
        Ok(())
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut t = toml::Table::new();
        t.insert("layers".into(), (self.layers.len() as i64).into());
        if self.config.mode == SpectralMode::Project {
            t.insert("projections".into(), (self.projected as i64).into());
            t.insert("largest_ratio_seen".into(), self.largest_ratio.into());
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diag(3, 1) has spectral norm 3; with bound 1.5 the projection halves it.
    #[test]
    fn projection_scales_down_to_the_bound() {
        let w = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let (sigma, u) = top_singular(&w);
        assert!((sigma - 3.0).abs() < 1e-6);
        let mut m = SpectralNorm::new(SpectralNormConfig::default());
        m.layers.push(Layer { weight: w.shallow_clone(), bound: 1.5, u });
        let model = crate::testing::mlp(0, 2);
        m.after_step(&StepCx { model: &model, step: 1, total: 1, lr: 0.1, params: &[] }).unwrap();
        let want = [1.5f32, 0.0, 0.0, 0.5];
        assert_eq!(Vec::<f32>::try_from(w.flatten(0, -1)).unwrap(), want);
        // Inside the bound nothing moves.
        let before = w.copy();
        m.layers[0].bound = 10.0;
        m.after_step(&StepCx { model: &model, step: 2, total: 2, lr: 0.1, params: &[] }).unwrap();
        assert!(w.equal(&before));
        assert_eq!(m.projected, 1);
    }

    /// Power iteration converges to the top singular value of a random matrix;
    /// a 4-D kernel is taken as `[out, in·kh·kw]`.
    #[test]
    fn power_iteration_finds_the_top_singular_value() {
        tch::manual_seed(3);
        let w = Tensor::randn([5, 2, 3, 3], tch::kind::FLOAT_CPU);
        let exact = Vec::<f32>::try_from(w.view([5, 18]).svd(true, true).1).unwrap()[0] as f64;
        let mut u = Tensor::ones([5], tch::kind::FLOAT_CPU) / 5f64.sqrt();
        let mut sigma = 0.0;
        for _ in 0..200 {
            let (s, next) = power_iteration(&w, &u);
            sigma = s.double_value(&[]);
            u = next;
        }
        assert!((sigma - exact).abs() < 1e-4 * exact, "{sigma} vs {exact}");
        assert!((top_singular(&w).0 - exact).abs() < 1e-4 * exact);
    }

    /// Penalty mode adds λ/2·σ² of each layer: diag(2, 1) with λ 0.5 gives 1.
    #[test]
    fn penalty_is_half_lambda_sigma_squared() {
        let w = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let (_, u) = top_singular(&w);
        let mut m = SpectralNorm::new(SpectralNormConfig { mode: SpectralMode::Penalty, penalty: 0.5, ..Default::default() });
        m.layers.push(Layer { weight: w, bound: 1.0, u });
        let got = m.extra_loss(&crate::testing::empty_step()).unwrap().double_value(&[]);
        assert!((got - 1.0).abs() < 1e-5, "{got}");
    }
}
