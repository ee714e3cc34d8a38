//! Fast Trainable Projection (FTP; Tian, Liu, Kira & Kira, "Fast Trainable
//! Projection for Robust Fine-Tuning", NeurIPS 2023,
//! <https://arxiv.org/abs/2310.19182>; reference code `GT-RIPL/FTP`,
//! `util/FTP.py`, class `FTP` inside its `SGDP` / `AdamP` optimisers).
//!
//! After every optimiser step, each constrained tensor is pulled back toward
//! its pre-trained value `W₀` inside a learnt radius γ (one scalar per tensor),
//! measured row by row:
//!
//! ```text
//! c_t = W'_t − W₀                       W'_t: the optimiser's unconstrained update of W_{t−1}
//! n_t = Σ_{dims ≥ 1} |c_t| + 1e-8       row-wise L1 ("MARS"), keepdim; 1-D tensors: one whole-tensor L1
//! t = 1:  γ = 1e-8
//! t > 1:  g = Σ ∇L(W_{t−1}) ⊙ c_{t−1} / n_{t−1}         (dL/dγ_{t−1}: W_{t−1} = W₀ + (γ_{t−1}/n_{t−1}) c_{t−1})
//!         g ← k·g if g > 0                                (gradient annealing)
//!         Adam on γ (β 0.9/0.999, ε 1e-8, learning rate μ), then γ ← clamp(γ, 1e-8, max n_t)
//! W_t = W₀ + clamp(γ / n_t, 0, 1) ⊙ c_t                  (written in place, no gradient)
//! ```
//!
//! - `c_{t−1}` is the previous step's *unconstrained* difference (the
//!   optimiser's update of the projected `W_{t−2}`, minus `W₀`), not the
//!   projected one, and `∇L(W_{t−1})` the gradient of this step's loss at the
//!   projected weights (here after the run's gradient clipping): what the
//!   reference stores in `prev_c` / `prev_scale` and reads from `p.grad`.
//! - Step 1 only records `c_1`, `n_1` with γ = 1e-8: the first update is
//!   almost entirely undone (`W_1 ≈ W₀`), as in the reference; γ then grows by
//!   about μ per step while the gradient keeps pointing away from `W₀`.
//! - Adam's bias correction uses the tensor's step count *including* step 1,
//!   which takes no Adam step (the reference's global `t`): the first Adam
//!   step divides by `1 − β^2`, not `1 − β`.
//! - The gradient `g` uses the whole `c_{t−1}/n_{t−1}`, also on rows whose
//!   ratio was clamped at 1 (the reference does not mask them).
//! - constrained: every parameter that trains when training starts except the
//!   head (new for the task), the model's and other methods' alike (FTP on
//!   LoRA's A and B constrains the adapter toward its initial value). A
//!   tensor whose gradient is undefined at a step is left alone at that step;
//!   its own first step with a gradient is its `t = 1` (the reference skips
//!   such tensors too, but counts steps globally).
//! - trains: nothing of its own (γ and its Adam moments are training-only
//!   state held here, not in a [`VarStore`](tch::nn::VarStore), and not in the
//!   artifact); alters no forward pass; merges: n/a. Memory: three copies of
//!   each constrained tensor (`W₀`, `c_{t−1}`, the step's `c_t`).
//! - drop-in for any optimiser: the reference wraps SGD (momentum 0.9) and
//!   AdamW; here FTP acts on whatever update the run's optimiser made
//!   (weight decay included, as the reference's `d_p`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use zhijian_core::train::TrainConfig;
use zhijian_core::{Error, Method, Model, Result, RunData, StepCx, config_table};

use crate::anchor::{Anchored, snapshot};

/// γ's floor and the first step's γ; also added to each norm (the reference's).
const EPS: f64 = 1e-8;
/// Adam's moment decays on γ (the reference's `beta1`, `beta2`).
const BETAS: (f64, f64) = (0.9, 0.999);

/// Configuration of FTP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FtpConfig {
    /// Gradient annealing factor k in [0, 1]: a positive gradient on γ (one
    /// that would shrink the radius) is multiplied by k. Default 1 (no
    /// annealing, the reference's default).
    pub k: f64,
    /// μ, the learning rate of the Adam step on each γ, > 0. Default 1e-2 (the reference's).
    pub mu: f64,
}

impl Default for FtpConfig {
    fn default() -> Self {
        FtpConfig { k: 1.0, mu: 1e-2 }
    }
}

impl FtpConfig {
    /// Rejects values out of range, naming the field (checked when the config
    /// is parsed and again in `prepare`, for configs built in code).
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(Error::MethodConfig { method: "ftp".into(), message });
        if !(0.0..=1.0).contains(&self.k) {
            return bad(format!("k must be in [0, 1], got {}", self.k));
        }
        if !(self.mu > 0.0 && self.mu.is_finite()) {
            return bad(format!("mu must be a positive number, got {}", self.mu));
        }
        Ok(())
    }
}

/// FTP's state of one constrained tensor after its last projection.
struct Radius {
    /// γ, 0-dim f64.
    gamma: Tensor,
    /// Adam's first and second moments of γ, 0-dim f64.
    m: Tensor,
    v: Tensor,
    /// `c` of the last step (the unconstrained difference from `W₀`).
    c: Tensor,
    /// `1 / n` of the last step, keepdim (one per row, or one for a 1-D tensor).
    inv_n: Tensor,
    /// Projections so far (the reference's `t` after its last increment).
    t: i32,
}

/// One constrained tensor.
struct Constrained {
    anchor: Anchored,
    radius: Option<Radius>,
}

/// The FTP method.
pub struct Ftp {
    config: FtpConfig,
    tensors: Vec<Constrained>,
}

/// The row-wise L1 norm ("MARS") of `c` plus 1e-8: summed over every dim but
/// the first, keepdim; a tensor of at most one dimension gets one whole-tensor
/// norm (0-dim).
pub fn mars_norm(c: &Tensor) -> Tensor {
    let abs = c.abs();
    if c.dim() <= 1 {
        abs.sum(Kind::Float) + EPS
    } else {
        let dims: Vec<i64> = (1..c.dim() as i64).collect();
        abs.sum_dim_intlist(dims.as_slice(), true, Kind::Float) + EPS
    }
}

impl Ftp {
    /// FTP with `config`; the pre-trained values are taken in `before_train`.
    pub fn new(config: FtpConfig) -> Self {
        Ftp { config, tensors: Vec::new() }
    }

    /// Each constrained tensor's name and current γ (`None` before its first projection).
    pub fn gammas(&self) -> Vec<(String, Option<f64>)> {
        self.tensors.iter().map(|c| (c.anchor.name.clone(), c.radius.as_ref().map(|r| r.gamma.double_value(&[])))).collect()
    }

    /// One FTP projection of `a`, whose parameter holds the optimiser's
    /// unconstrained update and whose gradient is the step's.
    fn project(config: &FtpConfig, a: &Anchored, radius: Option<Radius>) -> Radius {
        let c = (a.param.detach() - &a.start).to_kind(Kind::Float);
        let n = mars_norm(&c);
        let scalar = |x: f64| Tensor::scalar_tensor(x, (Kind::Double, c.device()));
        let (gamma, m, v, t) = match radius {
            None => (scalar(EPS), scalar(0.0), scalar(0.0), 1),
            Some(r) => {
                let t = r.t + 1;
                let grad = a.param.grad().to_kind(Kind::Float);
                let g = (grad * &r.c * &r.inv_n).sum(Kind::Double);
                let g = (&g * config.k).where_self(&g.gt(0.0), &g);
                let m = r.m * BETAS.0 + &g * (1.0 - BETAS.0);
                let v = r.v * BETAS.1 + g.square() * (1.0 - BETAS.1);
                let m_hat = &m / (1.0 - BETAS.0.powi(t));
                let v_hat = &v / (1.0 - BETAS.1.powi(t));
                let gamma = r.gamma - m_hat / (v_hat.sqrt() + EPS) * config.mu;
                let gamma = gamma.clamp_min(EPS).minimum(&n.max().to_kind(Kind::Double));
                (gamma, m, v, t)
            }
        };
        let inv_n = n.reciprocal();
        let ratio = (&inv_n * &gamma).clamp(0.0, 1.0).to_kind(Kind::Float);
        let new = &a.start + (ratio * &c).to_kind(a.start.kind());
        a.param.shallow_clone().copy_(&new);
        Radius { gamma, m, v, c, inv_n, t }
    }
}

impl Method for Ftp {
    fn name(&self) -> &'static str {
        "ftp"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, _model: &Model) -> Result<()> {
        self.config.validate()
    }

    fn before_train(&mut self, model: &Model, data: &RunData, _cfg: &TrainConfig) -> Result<()> {
        self.tensors = snapshot(data.params, |name| !data.is_head(model, name)).into_iter().map(|anchor| Constrained { anchor, radius: None }).collect();
        Ok(())
    }

    fn after_step(&mut self, _cx: &StepCx) -> Result<()> {
        let config = &self.config;
        tch::no_grad(|| {
            for t in &mut self.tensors {
                if t.anchor.param.grad().defined() {
                    t.radius = Some(Ftp::project(config, &t.anchor, t.radius.take()));
                }
            }
        });
        Ok(())
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut table = toml::Table::new();
        table.insert("tensors".into(), toml::Value::Integer(self.tensors.len() as i64));
        let ratios: Vec<Tensor> =
            self.tensors.iter().filter_map(|c| c.radius.as_ref()).map(|r| (&r.inv_n * &r.gamma).clamp(0.0, 1.0).to_kind(Kind::Double).flatten(0, -1)).collect();
        if !ratios.is_empty() {
            // Per row (per tensor for 1-D ones): the fraction of the unconstrained difference kept at the last step.
            let all = Tensor::cat(&ratios, 0);
            let means: Vec<f64> = ratios.iter().map(|r| r.mean(Kind::Double).double_value(&[])).collect();
            table.insert("ratio_mean".into(), toml::Value::Float(means.iter().sum::<f64>() / means.len() as f64));
            table.insert("ratio_min".into(), toml::Value::Float(all.min().double_value(&[])));
            table.insert("ratio_max".into(), toml::Value::Float(all.max().double_value(&[])));
            table.insert("rows_projected".into(), toml::Value::Float(all.lt(1.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[])));
            let gammas: Vec<f64> = self.tensors.iter().filter_map(|c| c.radius.as_ref()).map(|r| r.gamma.double_value(&[])).collect();
            table.insert("gamma_min".into(), toml::Value::Float(gammas.iter().copied().fold(f64::INFINITY, f64::min)));
            table.insert("gamma_max".into(), toml::Value::Float(gammas.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
        }
        Some(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;
    use zhijian_backbones::{Mlp, MlpConfig};
    use zhijian_core::{Input, Split};

    /// 2 × 1 × 1 images → 2 features: `layers.0.weight` is 2×2, `layers.0.bias` [2];
    /// every parameter (the head's too) trains.
    fn model() -> Model {
        tch::manual_seed(0);
        let config = MlpConfig { image_size: 1, in_chans: 2, hidden: vec![2] };
        let model = Model::new(Device::Cpu, 3, |p| Box::new(Mlp::new(p, &config).unwrap()));
        model.unfreeze_where(|_, _| true);
        model
    }

    fn split() -> Split {
        Split {
            name: "toy".into(),
            input: Input::Images(Tensor::zeros([1, 2, 1, 1], (Kind::Float, Device::Cpu))),
            labels: Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
        }
    }

    fn set(t: &Tensor, v: &[f64]) {
        tch::no_grad(|| t.shallow_clone().copy_(&Tensor::from_slice(v).view(t.size().as_slice()).to_kind(t.kind())));
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// One training step as the engine takes it: the gradient `grads[i]` on
    /// parameter `i` (from the loss Σ G ⊙ W), an SGD step of learning rate
    /// `lr`, then FTP's `after_step`.
    fn step(ftp: &mut Ftp, model: &Model, params: &[(String, Tensor)], grads: &[&[f64]], lr: f64, step: usize) {
        for (_, p) in params {
            let mut p = p.shallow_clone();
            p.zero_grad();
        }
        let loss = params.iter().zip(grads).fold(Tensor::from(0f32), |acc, ((_, p), g)| {
            acc + (Tensor::from_slice(&g[..p.numel()]).view(p.size().as_slice()).to_kind(Kind::Float) * p).sum(Kind::Float)
        });
        loss.backward();
        tch::no_grad(|| {
            for (_, p) in params {
                let _ = p.shallow_clone().f_sub_(&(p.grad() * lr)).unwrap();
            }
        });
        ftp.after_step(&StepCx { model, step, total: 3, lr, params }).unwrap();
    }

    /// FTP in plain f64 for one tensor of `rows` rows (1 row = a whole-tensor
    /// norm): returns W_t for each step of SGD with learning rate `lr` and the
    /// given gradients, starting from `w0`.
    fn reference(w0: &[f64], rows: usize, grads: &[&[f64]], lr: f64, k: f64, mu: f64) -> Vec<Vec<f64>> {
        let cols = w0.len() / rows;
        let (mut w, mut gamma, mut m, mut v) = (w0.to_vec(), 0.0, 0.0, 0.0);
        let (mut prev_c, mut prev_n) = (vec![0.0; w0.len()], vec![0.0; rows]);
        let mut out = Vec::new();
        for (step, g) in grads.iter().enumerate() {
            let t = step as i32 + 1;
            let c: Vec<f64> = (0..w.len()).map(|i| w[i] - lr * g[i] - w0[i]).collect();
            let n: Vec<f64> = (0..rows).map(|r| c[r * cols..(r + 1) * cols].iter().map(|x| x.abs()).sum::<f64>() + 1e-8).collect();
            if t == 1 {
                gamma = 1e-8;
            } else {
                let mut grad: f64 = (0..w.len()).map(|i| g[i] * prev_c[i] / prev_n[i / cols]).sum();
                if grad > 0.0 {
                    grad *= k;
                }
                m = 0.9 * m + 0.1 * grad;
                v = 0.999 * v + 0.001 * grad * grad;
                let (m_hat, v_hat) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
                gamma -= mu * m_hat / (v_hat.sqrt() + 1e-8);
                gamma = gamma.clamp(1e-8, n.iter().copied().fold(0.0, f64::max));
            }
            w = (0..w.len()).map(|i| w0[i] + (gamma / n[i / cols]).clamp(0.0, 1.0) * c[i]).collect();
            prev_c = c;
            prev_n = n;
            out.push(w.clone());
        }
        out
    }

    fn close(got: &[f64], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 2e-6, "{what}: got {got:?}, want {want:?}");
        }
    }

    /// Three SGD steps on a 2×2 matrix (row-wise norms) and a bias (one
    /// whole-tensor norm), against the algorithm in plain f64; step 3's
    /// gradient on γ is positive, so the annealing (k = 0.5) shows.
    #[test]
    fn projection_matches_hand_computed_steps_for_a_matrix_and_a_bias() {
        let model = model();
        let params = model.trainable();
        let weight = &params.iter().find(|(n, _)| n == "layers.0.weight").unwrap().1;
        let bias = &params.iter().find(|(n, _)| n == "layers.0.bias").unwrap().1;
        let (w0, b0) = ([0.5, -0.25, 0.75, 1.0], [0.1, -0.2]);
        set(weight, &w0);
        set(bias, &b0);
        let config = FtpConfig { k: 0.5, mu: 0.05 };
        let mut ftp = Ftp::new(config.clone());
        ftp.prepare(&model).unwrap();
        let split = split();
        ftp.before_train(&model, &RunData { params: &params, ..RunData::train_only(&split) }, &TrainConfig::default()).unwrap();
        let zero = [0.0; 6];
        // Steps 1–2 keep pushing away from W₀ (γ grows), step 3 pulls back (g > 0, annealed).
        let wg: [&[f64]; 3] = [&[1.0, -2.0, 0.5, 0.5], &[2.0, -1.0, 1.0, 0.0], &[-3.0, 1.0, -2.0, -1.0]];
        let bg: [&[f64]; 3] = [&[0.5, 1.0], &[1.0, 0.5], &[-1.0, -2.0]];
        let lr = 0.1;
        let want_w = reference(&w0, 2, &wg, lr, config.k, config.mu);
        let want_b = reference(&b0, 1, &bg, lr, config.k, config.mu);
        for s in 0..3 {
            let grads: Vec<&[f64]> = params
                .iter()
                .map(|(n, _)| {
                    if n == "layers.0.weight" {
                        wg[s]
                    } else if n == "layers.0.bias" {
                        bg[s]
                    } else {
                        &zero[..]
                    }
                })
                .collect();
            step(&mut ftp, &model, &params, &grads, lr, s + 1);
            close(&values(weight), &want_w[s], &format!("weight, step {}", s + 1));
            close(&values(bias), &want_b[s], &format!("bias, step {}", s + 1));
        }
        // Step 1 keeps W₀ (γ = 1e-8); step 2 moves by a first Adam step of about 0.744 μ
        // (bias correction with t = 2: (0.1/0.19) / √(0.001/0.001999)) along row-normalised c.
        assert!(want_w[0].iter().zip(&w0).all(|(a, b)| (a - b).abs() < 1e-7));
        let gamma2 = 0.05 * (0.1 / 0.19) / (0.001f64 / (1.0 - 0.999f64.powi(2))).sqrt();
        // c₂ = W₁ − lr·G₂ − W₀ ≈ −0.1·G₂: row 0 = (−0.2, 0.1), n = 0.3.
        let row0 = [w0[0] + gamma2 / 0.3 * -0.2, w0[1] + gamma2 / 0.3 * 0.1];
        close(&want_w[1][..2], &row0, "hand-worked step 2");
        // The bias's norm is one number over both entries: c₂ = (−0.1, −0.05), n = 0.15.
        let bias2 = [b0[0] + gamma2 / 0.15 * -0.1, b0[1] + gamma2 / 0.15 * -0.05];
        close(&want_b[1], &bias2, "hand-worked bias step 2");
    }

    /// A weight pushed far by large steps stays within γ of W₀ (row-wise L1),
    /// far short of where the optimiser sent it.
    #[test]
    fn far_updates_are_pulled_back_inside_the_radius() {
        let model = model();
        let params = model.trainable();
        let weight = params.iter().find(|(n, _)| n == "layers.0.weight").unwrap().1.shallow_clone();
        let w0 = weight.detach().copy();
        let mut ftp = Ftp::new(FtpConfig::default());
        let split = split();
        ftp.before_train(&model, &RunData { params: &params, ..RunData::train_only(&split) }, &TrainConfig::default()).unwrap();
        let g: Vec<f64> = vec![1.0, -1.0, 2.0, 0.5];
        let zero = [0.0; 6];
        for s in 1..=5 {
            let grads: Vec<&[f64]> = params.iter().map(|(n, _)| if n == "layers.0.weight" { &g[..] } else { &zero[..] }).collect();
            step(&mut ftp, &model, &params, &grads, 10.0, s);
        }
        let gamma = ftp.gammas().into_iter().find(|(n, _)| n == "layers.0.weight").unwrap().1.unwrap();
        // γ grew by about μ per step from step 2 on, nowhere near the step's 10·|g| per entry.
        assert!(gamma > 0.01 && gamma < 0.05, "γ = {gamma}");
        let rows = values(&(&weight - &w0).abs().sum_dim_intlist(1, false, Kind::Double));
        for r in rows {
            assert!(r <= gamma * (1.0 + 1e-4) && r > 0.5 * gamma, "row L1 {r} against γ {gamma}");
        }
    }

    /// The head is not constrained: after a step it holds the optimiser's
    /// update as is. Other methods' parameters (`instance/param`) are.
    #[test]
    fn the_head_is_untouched_and_method_parameters_are_constrained() {
        let model = model();
        let mut params = model.trainable();
        let lora = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        params.push(("lora/layers.0.lora_b".into(), lora.shallow_clone()));
        let head = params.iter().find(|(n, _)| n == "head.weight").unwrap().1.shallow_clone();
        let head0 = head.detach().copy();
        let mut ftp = Ftp::new(FtpConfig::default());
        let split = split();
        ftp.before_train(&model, &RunData { params: &params, ..RunData::train_only(&split) }, &TrainConfig::default()).unwrap();
        let names: Vec<String> = ftp.gammas().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| !n.starts_with("head.")), "{names:?}");
        assert!(names.contains(&"lora/layers.0.lora_b".to_string()) && names.contains(&"layers.0.weight".to_string()));
        let grads: Vec<Vec<f64>> = params.iter().map(|(_, p)| vec![1.0; p.numel()]).collect();
        let grads: Vec<&[f64]> = grads.iter().map(|g| g.as_slice()).collect();
        step(&mut ftp, &model, &params, &grads, 0.5, 1);
        assert!(head.allclose(&(head0 - 0.5), 1e-6, 1e-6, false), "the head moved by the optimiser's step alone");
        // The adapter's first step is undone (γ = 1e-8 at t = 1).
        assert!(lora.abs().max().double_value(&[]) < 1e-7);
        let summary = ftp.summary().unwrap();
        assert_eq!(summary["tensors"].as_integer(), Some(3));
        assert!(summary["ratio_max"].as_float().unwrap() < 1e-7);
    }

    /// Through the registry: out-of-range values are refused when the config
    /// is parsed, naming the field; a built method's config builds it again.
    #[test]
    fn registered_configs_are_checked_when_parsed_and_round_trip() {
        let mut r = zhijian_core::Registry::new();
        crate::register(&mut r);
        for (spec, field) in [("method = \"ftp\"\nmu = 0.0", "mu"), ("method = \"ftp\"\nk = -0.5", "k must"), ("method = \"tpgm\"\niters = 0", "iters")] {
            match r.build(&toml::from_str(spec).unwrap()) {
                Err(e) => assert!(e.to_string().contains(field), "{e}"),
                Ok(_) => panic!("{spec} was accepted"),
            }
        }
        for name in ["ftp", "tpgm"] {
            let mut spec: toml::Table = toml::from_str(&format!("method = \"{name}\"\nk = 0.5\nmu = 0.02")).unwrap();
            if name == "tpgm" {
                spec = toml::from_str("method = \"tpgm\"\nnorm = \"l2\"\npost_hoc = true\niters = 50").unwrap();
            }
            let m = r.build(&spec).unwrap();
            let mut again = m.config();
            again.insert("method".into(), toml::Value::String(name.into()));
            assert_eq!(r.build(&again).unwrap().config(), m.config());
            assert!(spec.iter().all(|(k, v)| again.get(k) == Some(v)), "{name}: {again:?}");
        }
    }

    #[test]
    fn config_out_of_range_is_refused_naming_the_field() {
        let err = FtpConfig { k: 1.5, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("k must be in [0, 1]"), "{err}");
        let err = FtpConfig { mu: 0.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("mu"), "{err}");
    }
}
