//! Optimisers over an explicit list of parameters.
//!
//! tch's optimisers are bound to one `VarStore`, but a run trains parameters of
//! two kinds of store (the backbone's and each method's), so the update rules
//! are written here, following PyTorch's `AdamW` and `SGD` exactly. AdamW runs
//! ATen's fused kernel (`torch.optim.AdamW(fused=True)`, through
//! zhijian-kernels) wherever parameter and gradient are dense and contiguous:
//! one pass over each tensor instead of about ten.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_kernels::AdamwStep;

/// The optimiser and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// AdamW (Loshchilov & Hutter 2019), decoupled weight decay.
    Adamw {
        /// First-moment decay. Default 0.9.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Second-moment decay. Default 0.999.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Denominator epsilon. Default 1e-8.
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// SGD with (optionally Nesterov) momentum; weight decay is L2 added to the gradient.
    Sgd {
        /// Momentum. Default 0.9.
        #[serde(default = "default_momentum")]
        momentum: f64,
        /// Nesterov momentum. Default false.
        #[serde(default)]
        nesterov: bool,
    },
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_momentum() -> f64 {
    0.9
}

impl OptimizerConfig {
    /// Rejects hyper-parameters outside their range, naming the field.
    pub fn validate(&self) -> crate::Result<()> {
        let unit = |field: &str, v: f64| {
            if (0.0..1.0).contains(&v) { Ok(()) } else { Err(crate::Error::Config(format!("train.optimizer.{field} must be in [0, 1), got {v}"))) }
        };
        match *self {
            OptimizerConfig::Adamw { beta1, beta2, eps } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps > 0.0 && eps.is_finite()) {
                    return Err(crate::Error::Config(format!("train.optimizer.eps must be a positive number, got {eps}")));
                }
                Ok(())
            }
            OptimizerConfig::Sgd { momentum, .. } => unit("momentum", momentum),
        }
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adamw { beta1: default_beta1(), beta2: default_beta2(), eps: default_eps() }
    }
}

/// Per-parameter optimiser options (timm's `no_weight_decay`, per-group
/// learning rates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamOpts {
    /// Multiplies the step's learning rate. Default 1.
    pub lr_scale: f64,
    /// Whether weight decay applies; `None` (the default): to matrices and
    /// kernels only, not to biases and norm scales.
    pub decay: Option<bool>,
}

impl Default for ParamOpts {
    fn default() -> Self {
        ParamOpts { lr_scale: 1.0, decay: None }
    }
}

struct Slot {
    param: Tensor,
    decay: bool,
    lr_scale: f64,
    first: Option<Tensor>,
    second: Option<Tensor>,
    /// AdamW's temporaries, reused every step.
    scratch: Option<Tensor>,
}

/// An optimiser with its per-parameter state.
pub struct Optimizer {
    config: OptimizerConfig,
    weight_decay: f64,
    slots: Vec<Slot>,
    steps: i32,
    /// LibTorch's own optimiser over the same parameters, used only for its
    /// `zero_grad`, which drops gradients (PyTorch's `set_to_none`) where
    /// tch's `Tensor::zero_grad` can only fill them with zeros: the next
    /// backward then writes each gradient instead of adding to zeros, two
    /// passes over every trained weight fewer per step. It never steps.
    clearer: Option<tch::COptimizer>,
    /// Whether AdamW runs ATen's fused kernel where the tensors allow it.
    fused: bool,
}

impl Optimizer {
    /// Optimises `params`; weight decay applies to matrices only, not to biases
    /// and norm scales (the usual practice, as in BERT and timm).
    pub fn new(config: OptimizerConfig, params: Vec<Tensor>, weight_decay: f64) -> Self {
        Self::with_options(config, params.into_iter().map(|p| (p, ParamOpts::default())).collect(), weight_decay)
    }

    /// Optimises `params`, each with its own [`ParamOpts`].
    pub fn with_options(config: OptimizerConfig, params: Vec<(Tensor, ParamOpts)>, weight_decay: f64) -> Self {
        let slots: Vec<Slot> = params
            .into_iter()
            .map(|(param, o)| Slot { decay: o.decay.unwrap_or(param.dim() >= 2), lr_scale: o.lr_scale, param, first: None, second: None, scratch: None })
            .collect();
        let clearer =
            tch::COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false).ok().and_then(|mut c| slots.iter().all(|s| c.add_parameters(&s.param, 0).is_ok()).then_some(c));
        Optimizer { config, weight_decay, slots, steps: 0, clearer, fused: true }
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    /// Clears every gradient (drops it where LibTorch's optimiser could be made).
    pub fn zero_grad(&mut self) {
        if let Some(clearer) = &self.clearer
            && clearer.zero_grad().is_ok()
        {
            return;
        }
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Rescales gradients so their global L2 norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(Kind::Float)).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(coef);
                }
            });
        }
        total
    }

    /// One update with learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps;
        let wd = self.weight_decay;
        let config = self.config.clone();
        tch::no_grad(|| {
            // Fusable AdamW slots, grouped by their decay and learning rate and by
            // kind and device (one fused call takes one of each): one call per group.
            let mut groups: Vec<(FusedGroup, Vec<(usize, Tensor)>)> = Vec::new();
            for (i, s) in self.slots.iter_mut().enumerate() {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let decay = if s.decay { wd } else { 0.0 };
                let lr = lr * s.lr_scale;
                match config {
                    OptimizerConfig::Adamw { beta1, beta2, eps } => {
                        let h = AdamwStep { step: t, lr, beta1, beta2, weight_decay: decay, eps };
                        // Moments made by an earlier unfused step (from a strided gradient) must fit too.
                        let state_fits = [&s.first, &s.second].iter().all(|m| m.as_ref().is_none_or(|m| zhijian_kernels::fusable(&s.param, m)));
                        if self.fused && zhijian_kernels::fusable(&s.param, &g) && state_fits {
                            let key = (h, s.param.kind(), s.param.device());
                            match groups.iter_mut().find(|(k, _)| *k == key) {
                                Some((_, members)) => members.push((i, g)),
                                None => groups.push((key, vec![(i, g)])),
                            }
                        } else {
                            adamw_unfused(s, &g, h);
                        }
                    }
                    OptimizerConfig::Sgd { momentum, nesterov } => {
                        let g = if decay > 0.0 { &g + &s.param * decay } else { g };
                        let update = if momentum > 0.0 {
                            let buf = s.first.get_or_insert_with(|| g.zeros_like());
                            let _ = buf.g_mul_scalar_(momentum).g_add_(&g);
                            if nesterov { &g + &*buf * momentum } else { buf.shallow_clone() }
                        } else {
                            g
                        };
                        let _ = s.param.g_sub_(&(update * lr));
                    }
                }
            }
            for ((h, _, _), members) in groups {
                for (i, g) in &members {
                    let s = &mut self.slots[*i];
                    s.first.get_or_insert_with(|| g.zeros_like());
                    s.second.get_or_insert_with(|| g.zeros_like());
                }
                let slots = members.iter().map(|(i, _)| &self.slots[*i]);
                let params: Vec<&Tensor> = slots.clone().map(|s| &s.param).collect();
                let firsts: Vec<&Tensor> = slots.clone().filter_map(|s| s.first.as_ref()).collect();
                let seconds: Vec<&Tensor> = slots.filter_map(|s| s.second.as_ref()).collect();
                let grads: Vec<&Tensor> = members.iter().map(|(_, g)| g).collect();
                // `fusable` held for every member, its gradient and its moments (new ones are
                // made like the gradient), so the kernel's own checks cannot fail here.
                zhijian_kernels::fused_adamw(&params, &grads, &firsts, &seconds, h).unwrap_or_else(|e| panic!("fused AdamW on checked tensors: {e}"));
            }
        });
    }

    /// Turns the fused AdamW kernel off (on by default): every parameter then
    /// takes the update written as separate tensor operations. For comparing
    /// the two; they agree to rounding.
    pub fn unfused(mut self) -> Self {
        self.fused = false;
        self
    }
}

/// What one fused AdamW call shares: the step's hyper-parameters, and the
/// parameters' kind and device.
type FusedGroup = (AdamwStep, Kind, tch::Device);

/// PyTorch's single-tensor AdamW, every operation in place: the temporaries go
/// to one scratch tensor kept across steps, not to five fresh ones per step
/// (each the size of the parameter, and each a page-faulting allocation: 20 %
/// of a full fine-tuning step). Used where the fused kernel cannot be.
fn adamw_unfused(s: &mut Slot, g: &Tensor, h: AdamwStep) {
    let AdamwStep { step: t, lr, beta1, beta2, weight_decay, eps } = h;
    let _ = s.param.g_mul_scalar_(1.0 - lr * weight_decay);
    let m = s.first.get_or_insert_with(|| g.zeros_like());
    let _ = m.lerp_(g, 1.0 - beta1);
    let v = s.second.get_or_insert_with(|| g.zeros_like());
    let scratch = s.scratch.get_or_insert_with(|| g.empty_like());
    // v ← β₂ v + ((1 − β₂) g) g, rounded as PyTorch's addcmul.
    let _ = g.mul_scalar_out(scratch, 1.0 - beta2);
    let _ = v.g_mul_scalar_(beta2).addcmul_(scratch, g);
    let step = lr / (1.0 - beta1.powi(t));
    if step > 0.0 {
        // θ ← θ − step · m / (√v / √(1 − β₂ᵗ) + ε): the denominator,
        // divided by −step, lets addcdiv do the subtraction.
        let _ = v.sqrt_out(scratch);
        let _ = scratch.g_div_scalar_((1.0 - beta2.powi(t)).sqrt()).g_add_scalar_(eps).g_div_scalar_(-step);
        let _ = s.param.addcdiv_(m, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two AdamW steps on f(p) = ½‖p‖², checked against the update rule by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).reshape([1, 2]).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerConfig::default(), vec![p.shallow_clone()], 0.1);
        let (lr, b1, b2, eps) = (0.1, 0.9, 0.999, 1e-8);
        let mut want = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Double).g_mul_scalar(0.5).backward();
            opt.step(lr);
            for i in 0..2 {
                let g = want[i];
                want[i] *= 1.0 - lr * 0.1;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                want[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got: Vec<f64> = Vec::try_from(p.detach().flatten(0, -1)).unwrap();
        for i in 0..2 {
            assert!((got[i] - want[i]).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }

    /// The fused kernel and the separate operations make the same update, to
    /// fp32 rounding, over parameters of both decay groups and two learning-rate
    /// scales (two fused calls), across several steps.
    #[test]
    fn fused_and_unfused_adamw_agree() {
        let opts = (Kind::Float, tch::Device::Cpu);
        let start = [Tensor::randn([4, 5], opts), Tensor::randn([5], opts), Tensor::randn([3, 3], opts)];
        let make = || {
            let params = start.each_ref().map(|t| t.copy().set_requires_grad(true));
            let o = [ParamOpts::default(), ParamOpts::default(), ParamOpts { lr_scale: 0.1, decay: None }];
            let opt = Optimizer::with_options(OptimizerConfig::default(), params.iter().map(|p| p.shallow_clone()).zip(o).collect(), 0.05);
            (params, opt)
        };
        let (fused_params, mut fused) = make();
        let (plain_params, plain) = make();
        let mut plain = plain.unfused();
        for step in 0..5 {
            for (params, opt) in [(&fused_params, &mut fused), (&plain_params, &mut plain)] {
                opt.zero_grad();
                params.iter().map(|p| (p * p * p).sum(Kind::Float)).fold(Tensor::from(0.0f32), |s, x| s + x).backward();
                opt.step(0.01 * (step + 1) as f64);
            }
        }
        assert!(fused_params.iter().all(|p| zhijian_kernels::fusable(p, &p.grad())), "the fused kernel ran");
        for (a, b) in fused_params.iter().zip(&plain_params) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "fused and unfused AdamW differ by {diff}");
        }
        let moved = (&fused_params[0] - &start[0]).abs().max().double_value(&[]);
        assert!(moved > 1e-3, "the parameters moved ({moved})");
    }

    /// Parameters of two kinds under one optimiser take one fused call each
    /// (a fused call takes one kind), and each gets its own update.
    #[test]
    fn fused_adamw_groups_by_kind() {
        let single = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let double = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerConfig::default(), vec![single.shallow_clone(), double.shallow_clone()], 0.0);
        (single.sum(Kind::Float).to_kind(Kind::Double) + double.sum(Kind::Double)).backward();
        opt.step(0.1);
        // First step: m̂ / (√v̂ + ε) = g / (|g| + ε) ≈ 1, so each weight moves by −lr (less 1e-9 for ε).
        assert!(single.to_kind(Kind::Double).allclose(&Tensor::from_slice(&[0.9f64, -2.1]), 1e-6, 1e-6, false), "{single}");
        assert!(double.allclose(&Tensor::from_slice(&[0.9f64, -2.1]), 1e-8, 1e-8, false), "{double}");
    }

    /// Gradients are dropped, not zero-filled: the next backward writes them afresh.
    #[test]
    fn zero_grad_drops_gradients() {
        let p = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerConfig::default(), vec![p.shallow_clone()], 0.0);
        (&p * 3.0).sum(Kind::Float).backward();
        assert!(p.grad().defined());
        opt.zero_grad();
        assert!(!p.grad().defined());
        (&p * 2.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), [2.0, 2.0]);
    }

    #[test]
    fn sgd_momentum_and_decay_skips_vectors() {
        let w = Tensor::from_slice(&[1.0f64]).reshape([1, 1]).set_requires_grad(true);
        let b = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let cfg = OptimizerConfig::Sgd { momentum: 0.5, nesterov: false };
        let mut opt = Optimizer::new(cfg, vec![w.shallow_clone(), b.shallow_clone()], 1.0);
        for _ in 0..2 {
            opt.zero_grad();
            (w.sum(Kind::Double) + b.sum(Kind::Double)).backward();
            opt.step(0.1);
        }
        // w: g = 1 + w (decay); step1 buf = 2, w = 0.8; step2 buf = 0.5·2 + 1.8 = 2.8, w = 0.52.
        assert!((w.double_value(&[0, 0]) - 0.52).abs() < 1e-12);
        // b: no decay; buf 1 then 1.5; b = 1 − 0.1 − 0.15.
        assert!((b.double_value(&[0]) - 0.75).abs() < 1e-12);
    }

    /// Per-parameter options: a zero learning-rate scale freezes a parameter,
    /// and decay can be forced onto a vector (or off a matrix).
    #[test]
    fn parameter_options_scale_the_step_and_choose_decay() {
        let cfg = OptimizerConfig::Sgd { momentum: 0.0, nesterov: false };
        let (a, b, c) = (Tensor::from_slice(&[1.0f64]), Tensor::from_slice(&[1.0f64]), Tensor::from_slice(&[1.0f64]).reshape([1, 1]));
        let params = [&a, &b, &c].map(|t| t.set_requires_grad(true));
        let opts = [ParamOpts { lr_scale: 0.5, decay: Some(true) }, ParamOpts { lr_scale: 0.0, decay: None }, ParamOpts { lr_scale: 1.0, decay: Some(false) }];
        let mut opt = Optimizer::with_options(cfg, params.iter().map(|p| p.shallow_clone()).zip(opts).collect(), 1.0);
        params.iter().map(|p| p.sum(Kind::Double)).fold(Tensor::from(0.0f64), |s, x| s + x).backward();
        opt.step(0.1);
        // a: g = 1 + 1·a (decay on the vector), lr 0.05 → 0.9; b: lr 0 → 1; c: no decay → 0.9.
        let got: Vec<f64> = params.iter().map(|p| p.flatten(0, -1).double_value(&[0])).collect();
        assert!((got[0] - 0.9).abs() < 1e-12 && (got[1] - 1.0).abs() < 1e-12 && (got[2] - 0.9).abs() < 1e-12, "{got:?}");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let p = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerConfig::default(), vec![p.shallow_clone()], 0.0);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let before = opt.clip_grad_norm(1.0);
        assert!((before - 5.0).abs() < 1e-5);
        assert!((p.grad().norm().double_value(&[]) - 1.0).abs() < 1e-4);
    }
}
