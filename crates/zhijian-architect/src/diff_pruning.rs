//! Diff pruning (Guo, Rush & Kim, ACL 2021, "Parameter-Efficient Transfer
//! Learning with Diff Pruning", <https://arxiv.org/abs/2012.07463>; reference
//! code `dguo98/DiffPruning`, `examples/run_glue_diffpruning.py` and `run_glue_mag.py`).
//!
//! Every eligible tensor becomes `θ = θ₀ + δ` with `δ = z ⊙ w`: `w` is a dense
//! trainable diff (zero at init, so the model starts unchanged) and `z` a
//! stretched hard-concrete gate per entry (Louizos et al. 2018,
//! <https://arxiv.org/abs/1712.01312>) with a trainable `log α`:
//!
//! ```text
//! training:   u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β)
//! evaluation: s = σ(log α)
//! z = clamp(s · (ζ − γ) + γ, 0, 1)
//! penalty:    λ · Σ σ(log α − β · log(−γ / ζ))      (expected number of open gates)
//! ```
//!
//! The penalty is a sum over all gated entries (the reference's convention, so
//! the pressure on each gate does not depend on the model's size), added by
//! [`Method::extra_loss`]; gradients reach `w` and `log α` through the
//! reparameterised sample, as in the reference's hand-written backward.
//! At the end ([`Method::after_train`]), the magnitude cut keeps the
//! `target_density` largest `|δ|` (δ with the deterministic evaluation gate) of
//! all eligible entries together — one threshold, as `run_glue_mag.py` — and
//! drops the rest; from then on the method is a fixed sparse delta, stored and
//! applied as in [`crate::sparse_ft`] (`indices`, `values`). With
//! `fixmask_fraction > 0` the cut comes that fraction of the run's steps before
//! its end, and the kept entries alone train afterwards, without the penalty:
//! the paper's "fixmask" fine-tuning stage, within one run (the paper trains
//! 3 epochs, cuts, then trains 3 more: `fixmask_fraction = 0.5`).
//!
//! - eligible: as in sparse fine-tuning, the weights of every linear layer and
//!   convolution, and (`biases = true`) their biases. Norm parameters and
//!   embedding tables, which the reference also diffs, are not: the hooks do
//!   not reach them well.
//! - trains: `w`, `log α` and the head (after a fixmask cut: the kept entries
//!   and the head); frozen: the backbone.
//! - memory: `w` and `log α` double the adapted tensors (and their optimiser
//!   state doubles again) until the cut frees them. Speed: a step samples a
//!   gate per entry and runs a dense delta per site (measured on MiniLM-L6,
//!   CPU, one thread, 16 × 64 tokens: 0.95 s against 0.48 s for full fine-tuning).
//! - merges: before the cut, `W ← W + δ` densely (unmerge writes back a saved
//!   copy of each tensor); after it, the kept entries are scattered in (unmerge
//!   writes back the saved entries). Both restore the weights bit for bit.
//! - artifact: after the cut, `indices` and `values` only (the dense `w` and
//!   `log α` leave the method's store). An artifact written mid-run (an
//!   epoch checkpoint) also holds them; either kind restores into a freshly
//!   prepared method, whose untrained `w = 0` adds nothing.
//!
//! Defaults and deviations from the reference:
//! - β = 1, γ = −1.5, ζ = 1.5, log α₀ = 5, λ = 1.25·10⁻⁷, log α learning rate
//!   0.1: the reference's values (its `concrete_lower`/`concrete_upper`, no
//!   temperature, `alpha_init`, `sparsity_pen`, separate AdamW at lr 0.1).
//!   Louizos et al.'s β = 2/3, γ = −0.1, ζ = 1.1 are a config away.
//! - The log α learning rate follows the run's schedule (the reference's stays
//!   constant: its second scheduler is never stepped); the run's gradient
//!   clipping spans all parameters together (the reference clips `w` and `log α` apart).
//! - The cut uses the deterministic gate; the reference cuts the weights left
//!   by the last training step, whose gate was a random sample.
//! - `target_density` counts eligible entries, not all of the model's
//!   parameters (the reference's 0.5 % counts embeddings, norms and the classifier too).
//! - The reference's structured variant (one more gate per tensor,
//!   `per_params_alpha`) is left out.

use serde::{Deserialize, Serialize};
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};
use zhijian_core::train::{ParamOpts, TrainConfig};
use zhijian_core::{Error, Method, Model, Result, RunData, Site, StepCx, StepOutput, config_table};

use crate::sparse_ft::{Flat, Merged, add_delta, spread_indices, top_k};

/// Keeps the logistic noise finite (Louizos et al.'s reference uses the same bound).
const NOISE_EPS: f64 = 1e-6;

/// Configuration of diff pruning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffPruningConfig {
    /// Fraction of the eligible entries the final magnitude cut keeps, in
    /// (0, 1]. Default 0.005 (0.5 %, the paper's).
    pub target_density: f64,
    /// λ, the weight of the expected L0 norm, per gated entry (the penalty is
    /// summed over entries). Default 1.25e-7 (the reference's `sparsity_pen`).
    pub l0_penalty: f64,
    /// Initial `log α` of every gate. Default 5 (gates start almost surely open).
    pub log_alpha_init: f64,
    /// Peak learning rate of `log α` (absolute; the run's schedule applies).
    /// Default 0.1 (the reference's).
    pub log_alpha_lr: f64,
    /// Temperature β of the concrete distribution, > 0. Default 1 (the
    /// reference's; Louizos et al. use 2/3).
    pub temperature: f64,
    /// Lower end γ < 0 of the stretched interval. Default −1.5 (the reference's; Louizos et al.: −0.1).
    pub stretch_low: f64,
    /// Upper end ζ > 1 of the stretched interval. Default 1.5 (the reference's; Louizos et al.: 1.1).
    pub stretch_high: f64,
    /// Fraction of the run's steps, at its end, in which only the entries kept
    /// by the cut train (the paper's fixmask stage), in [0, 1). Default 0.5:
    /// the paper's 3 + 3 epochs. 0 cuts after the last step, with no retraining
    /// (measured on MiniLM → Rotten Tomatoes: 61.9 ± 4.9 % against 0.5's; see the README).
    pub fixmask_fraction: f64,
    /// Whether the biases of the adapted layers are diffed too. Default true.
    pub biases: bool,
}

impl Default for DiffPruningConfig {
    fn default() -> Self {
        DiffPruningConfig {
            target_density: 0.005,
            l0_penalty: 1.25e-7,
            log_alpha_init: 5.0,
            log_alpha_lr: 0.1,
            temperature: 1.0,
            stretch_low: -1.5,
            stretch_high: 1.5,
            fixmask_fraction: 0.5,
            biases: true,
        }
    }
}

/// The stretched hard-concrete gate `z = clamp(s(ζ − γ) + γ, 0, 1)`: with
/// uniform noise `u`, `s = σ((log u − log(1 − u) + log α)/β)` (a training
/// sample); without, `s = σ(log α)` (the deterministic evaluation gate).
///
/// # Shapes
/// `log_alpha`, `u`: the same shape → that shape.
pub fn hard_concrete(log_alpha: &Tensor, u: Option<&Tensor>, c: &DiffPruningConfig) -> Tensor {
    let s = match u {
        Some(u) => ((u.log() - u.neg().log1p() + log_alpha) / c.temperature).sigmoid(),
        None => log_alpha.sigmoid(),
    };
    (s * (c.stretch_high - c.stretch_low) + c.stretch_low).clamp(0.0, 1.0)
}

/// The probability that each gate is open, `P(z > 0) = σ(log α − β log(−γ/ζ))`:
/// its sum is the expected L0 norm of `δ`.
pub fn open_probability(log_alpha: &Tensor, c: &DiffPruningConfig) -> Tensor {
    (log_alpha - c.temperature * (-c.stretch_low / c.stretch_high).ln()).sigmoid()
}

/// The dense parameters of one eligible tensor, until the cut.
struct Dense {
    w: Tensor,
    log_alpha: Tensor,
}

struct State {
    vs: VarStore,
    flat: Flat,
    indices: Tensor,
    values: Tensor,
    /// `Some` until the magnitude cut.
    dense: Option<Vec<Dense>>,
}

/// The diff-pruning method.
pub struct DiffPruning {
    config: DiffPruningConfig,
    state: Option<State>,
    merged: Option<Merged>,
    /// `log_alpha_lr` over the run's learning rate (set by `before_train`).
    alpha_lr_scale: f64,
}

impl DiffPruning {
    /// Diff pruning with `config` (parameters are created by `prepare`).
    pub fn new(config: DiffPruningConfig) -> Self {
        let alpha_lr_scale = config.log_alpha_lr / TrainConfig::default().lr;
        DiffPruning { config, state: None, merged: None, alpha_lr_scale }
    }

    /// Whether the magnitude cut has happened (the method is a fixed sparse delta).
    pub fn is_cut(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.dense.is_none())
    }

    /// The flat positions (sorted) and values of the kept entries of `δ`
    /// (meaningful after the cut).
    pub fn entries(&self) -> Option<(&Tensor, &Tensor)> {
        self.state.as_ref().map(|s| (&s.indices, &s.values))
    }

    /// `δ` of segment `seg`, shaped as its tensor: `z ⊙ w` plus any sparse
    /// entries before the cut (those are zero unless restored; they never train
    /// then), the sparse entries alone after it.
    fn segment_delta(&self, s: &State, seg: usize, train: bool) -> Tensor {
        match &s.dense {
            Some(dense) => {
                let d = &dense[seg];
                let u = train.then(|| d.log_alpha.rand_like().clamp(NOISE_EPS, 1.0 - NOISE_EPS));
                hard_concrete(&d.log_alpha, u.as_ref(), &self.config) * &d.w + s.flat.scatter(seg, &s.indices, &s.values.detach())
            }
            None => s.flat.scatter(seg, &s.indices, &s.values),
        }
    }

    fn apply(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        let Some(s) = self.state.as_ref().filter(|_| self.merged.is_none()) else { return out };
        let Some((w, b)) = s.flat.site(&site.path) else { return out };
        let dw = self.segment_delta(s, w, train);
        let db = b.map(|b| self.segment_delta(s, b, train));
        add_delta(site, x, out, &dw, db.as_ref())
    }

    /// The magnitude cut: keeps the `k` largest `|δ|` over every eligible entry
    /// as `(indices, values)` and drops `w` and `log α` from the method's store.
    fn cut(&mut self) -> Result<()> {
        if self.merged.is_some() {
            return Err(Error::MethodConfig { method: "diff_pruning".into(), message: "cannot cut the diff while it is merged; unmerge first".into() });
        }
        let Some(s) = self.state.as_ref().filter(|s| s.dense.is_some()) else { return Ok(()) };
        tch::no_grad(|| {
            let deltas: Vec<Tensor> = (0..s.flat.segments.len()).map(|i| self.segment_delta(s, i, false).flatten(0, -1)).collect();
            let all = Tensor::cat(&deltas, 0);
            let keep = top_k(&all.abs(), s.values.numel() as i64);
            let kept = all.index_select(0, &keep).to_kind(s.values.kind());
            s.indices.shallow_clone().copy_(&keep);
            s.values.shallow_clone().copy_(&kept);
        });
        let s = self.state.as_mut().expect("checked above");
        s.dense = None;
        // A store without the dense parameters: the artifact keeps only what the cut kept.
        let vs = VarStore::new(s.vs.device());
        let _ = vs.root().add("indices", s.indices.shallow_clone(), false);
        let _ = vs.root().add("values", s.values.shallow_clone(), self.config.fixmask_fraction > 0.0);
        s.vs = vs;
        Ok(())
    }
}

impl Method for DiffPruning {
    fn name(&self) -> &'static str {
        "diff_pruning"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "diff_pruning".into(), message });
        if !(c.target_density > 0.0 && c.target_density <= 1.0) {
            return bad(format!("target_density must be in (0, 1], got {}", c.target_density));
        }
        if !(c.l0_penalty >= 0.0 && c.l0_penalty.is_finite()) {
            return bad(format!("l0_penalty must be ≥ 0, got {}", c.l0_penalty));
        }
        if !(c.log_alpha_lr > 0.0 && c.log_alpha_lr.is_finite()) {
            return bad(format!("log_alpha_lr must be positive, got {}", c.log_alpha_lr));
        }
        if !c.log_alpha_init.is_finite() {
            return bad(format!("log_alpha_init must be finite, got {}", c.log_alpha_init));
        }
        if !(c.temperature > 0.0 && c.temperature.is_finite()) {
            return bad(format!("temperature must be positive, got {}", c.temperature));
        }
        if !(c.stretch_low < 0.0 && c.stretch_high > 1.0) {
            return bad(format!(
                "the stretched interval must contain [0, 1] strictly (stretch_low < 0 < 1 < stretch_high), got [{}, {}]",
                c.stretch_low, c.stretch_high
            ));
        }
        if !(0.0..1.0).contains(&c.fixmask_fraction) {
            return bad(format!("fixmask_fraction must be in [0, 1), got {}", c.fixmask_fraction));
        }
        let flat = Flat::new(model, c.biases, "diff_pruning")?;
        let k = flat.budget(c.target_density);
        let device = model.device();
        let vs = VarStore::new(device);
        let indices = vs.root().add("indices", spread_indices(flat.total, k, device), false);
        // The kept entries train only in a fixmask stage; otherwise they are state.
        let values = if c.fixmask_fraction > 0.0 { vs.root().zeros("values", &[k]) } else { vs.root().zeros_no_train("values", &[k]) };
        let dense = flat
            .segments
            .iter()
            .map(|seg| {
                let p = seg.name.split('.').fold(vs.root(), |p, part| p / part);
                let size = seg.tensor.size();
                Dense { w: p.zeros("diff_w", &size), log_alpha: p.var("log_alpha", &size, Init::Const(c.log_alpha_init)) }
            })
            .collect();
        self.state = Some(State { vs, flat, indices, values, dense: Some(dense) });
        self.merged = None;
        Ok(())
    }

    fn linear(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        self.apply(site, x, out, train)
    }

    fn conv(&self, site: &Site, x: &Tensor, out: Tensor, train: bool) -> Tensor {
        self.apply(site, x, out, train)
    }

    fn before_train(&mut self, _model: &Model, _data: &RunData, cfg: &TrainConfig) -> Result<()> {
        self.alpha_lr_scale = self.config.log_alpha_lr / cfg.lr;
        Ok(())
    }

    /// The fixmask cut, `fixmask_fraction` of the run's steps before its end.
    fn after_step(&mut self, cx: &StepCx) -> Result<()> {
        let f = self.config.fixmask_fraction;
        if f > 0.0 && !self.is_cut() {
            let cut_at = (((1.0 - f) * cx.total as f64).round() as usize).max(1);
            if cx.step >= cut_at && cx.step < cx.total {
                self.cut()?;
            }
        }
        Ok(())
    }

    fn after_train(&mut self, _model: &Model, _data: &RunData) -> Result<()> {
        self.cut()
    }

    fn param_opts(&self, name: &str) -> ParamOpts {
        if name.ends_with(".log_alpha") {
            // Decay would pull log α towards 0, i.e. towards half-open gates.
            ParamOpts { lr_scale: self.alpha_lr_scale, decay: Some(false) }
        } else {
            ParamOpts::default()
        }
    }

    fn extra_loss(&self, _step: &StepOutput) -> Option<Tensor> {
        let dense = self.state.as_ref()?.dense.as_ref()?;
        if self.config.l0_penalty == 0.0 || self.merged.is_some() {
            return None;
        }
        let open = dense.iter().map(|d| open_probability(&d.log_alpha, &self.config).sum(Kind::Float)).reduce(|a, b| a + b)?;
        Some(open * self.config.l0_penalty)
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.state.as_ref().map(|s| &s.vs)
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.state.as_mut().map(|s| &mut s.vs)
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn merge(&mut self, _model: &Model) -> Result<()> {
        let Some(s) = self.state.as_ref().filter(|_| self.merged.is_none()) else { return Ok(()) };
        let merged = match s.dense {
            Some(_) => s.flat.merge_dense(|i| self.segment_delta(s, i, false)),
            None => s.flat.merge_sparse(&s.indices, &s.values),
        };
        self.merged = Some(merged);
        Ok(())
    }

    fn unmerge(&mut self, _model: &Model) -> Result<()> {
        if let (Some(s), Some(m)) = (&self.state, self.merged.take()) {
            s.flat.unmerge(m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse_ft::tests::{NormOnly, dense_by_hand, linear_model};
    use crate::testing;
    use tch::Device;
    use zhijian_core::{Ctx, Input, Split};

    fn outputs(model: &Model, methods: &[Box<dyn Method>], x: &Input, train: bool) -> Tensor {
        tch::no_grad(|| model.forward(&Ctx::new(train, methods, Vec::new()), x))
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Gives every `w` and `log α` random values (w of a trained diff's size,
    /// log α spread so that some gates are shut, some open, some in between).
    fn randomise(m: &DiffPruning) {
        for d in m.state.as_ref().unwrap().dense.as_ref().unwrap() {
            tch::no_grad(|| {
                d.w.shallow_clone().copy_(&(Tensor::randn(d.w.size(), (Kind::Float, Device::Cpu)) * 0.05));
                d.log_alpha.shallow_clone().copy_(&(Tensor::randn(d.w.size(), (Kind::Float, Device::Cpu)) * 3.0));
            });
        }
    }

    fn split() -> Split {
        Split { name: "train".into(), input: testing::images(), labels: testing::labels() }
    }

    /// The training sample, the evaluation gate and the open probability against
    /// the formulas computed by hand, for the reference's and Louizos et al.'s constants.
    #[test]
    fn gate_and_penalty_match_hand_computation() {
        let la = [-2.0f64, 0.0, 0.7, 1.5, 5.0];
        let u = [0.1f64, 0.5, 0.45, 0.9, 0.3];
        let louizos = DiffPruningConfig { temperature: 2.0 / 3.0, stretch_low: -0.1, stretch_high: 1.1, ..Default::default() };
        for c in [DiffPruningConfig::default(), louizos] {
            let (b, g, z) = (c.temperature, c.stretch_low, c.stretch_high);
            let t_la = Tensor::from_slice(&la);
            let sample = Vec::<f64>::try_from(hard_concrete(&t_la, Some(&Tensor::from_slice(&u)), &c)).unwrap();
            let eval = Vec::<f64>::try_from(hard_concrete(&t_la, None, &c)).unwrap();
            let open = Vec::<f64>::try_from(open_probability(&t_la, &c)).unwrap();
            for i in 0..la.len() {
                let s = sigmoid(((u[i] / (1.0 - u[i])).ln() + la[i]) / b);
                assert!((sample[i] - (s * (z - g) + g).clamp(0.0, 1.0)).abs() < 1e-12, "sample {i}");
                assert!((eval[i] - (sigmoid(la[i]) * (z - g) + g).clamp(0.0, 1.0)).abs() < 1e-12, "eval {i}");
                assert!((open[i] - sigmoid(la[i] - b * (-g / z).ln())).abs() < 1e-12, "open {i}");
            }
        }
        // Known values: with γ = −ζ the threshold term vanishes; log α = 5 opens the gate.
        assert!((hard_concrete(&Tensor::from_slice(&[5.0f64]), None, &DiffPruningConfig::default()).double_value(&[0]) - 1.0).abs() < 1e-12);
        assert_eq!(hard_concrete(&Tensor::from_slice(&[-5.0f64]), None, &DiffPruningConfig::default()).double_value(&[0]), 0.0);

        // The method's extra loss: λ · N · σ(log α₀ − β log(−γ/ζ)) at init, over 12 weights + 3 biases.
        let model = linear_model();
        let mut m = DiffPruning::new(DiffPruningConfig { l0_penalty: 0.01, log_alpha_init: 0.7, stretch_low: -0.2, ..Default::default() });
        m.prepare(&model).unwrap();
        let step = StepOutput {
            logits: Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64]),
            index: Tensor::from_slice(&[0i64]),
            taps: Default::default(),
            teacher: None,
        };
        let want = 0.01 * 15.0 * sigmoid(0.7 - (0.2f64 / 1.5).ln());
        assert!((m.extra_loss(&step).unwrap().double_value(&[]) - want).abs() < 1e-6);
    }

    /// The cut keeps exactly the k largest |z ⊙ w| (deterministic gate) over
    /// weights and biases together, drops the dense parameters from the store,
    /// and the model then equals the plain model with `W + δ_cut`.
    #[test]
    fn magnitude_cut_keeps_exactly_the_top_k() {
        let model = linear_model();
        let mut m = DiffPruning::new(DiffPruningConfig { target_density: 0.25, fixmask_fraction: 0.0, ..Default::default() });
        m.prepare(&model).unwrap();
        randomise(&m);
        let c = m.config.clone();
        let dense = m.state.as_ref().unwrap().dense.as_ref().unwrap();
        let delta: Vec<Tensor> = dense.iter().map(|d| (hard_concrete(&d.log_alpha, None, &c) * &d.w).flatten(0, -1)).collect();
        let delta = Tensor::cat(&delta, 0);
        let want = Vec::<i64>::try_from(delta.abs().argsort(0, true).narrow(0, 0, 4).sort(0, false).0).unwrap();
        assert!(
            m.extra_loss(&StepOutput {
                logits: Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
                labels: Tensor::from_slice(&[0i64]),
                index: Tensor::from_slice(&[0i64]),
                taps: Default::default(),
                teacher: None,
            })
            .is_some()
        );
        let x = Input::Images(Tensor::randn([5, 4], (Kind::Float, Device::Cpu)));
        let mut all: Vec<Box<dyn Method>> = vec![Box::new(m)];
        let before = outputs(&model, &all, &x, false);
        all[0].after_train(&model, &RunData::train_only(&split())).unwrap();
        let m = &all[0];
        let names: Vec<String> = m.var_store().unwrap().variables().into_keys().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        assert_eq!(names, ["indices", "values"]);
        let step = StepOutput {
            logits: Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
            labels: Tensor::from_slice(&[0i64]),
            index: Tensor::from_slice(&[0i64]),
            taps: Default::default(),
            teacher: None,
        };
        assert!(m.extra_loss(&step).is_none(), "no penalty after the cut");
        let vars = m.var_store().unwrap().variables();
        assert_eq!(Vec::<i64>::try_from(&vars["indices"]).unwrap(), want);
        assert!(vars["values"].allclose(&delta.index_select(0, &vars["indices"]), 1e-6, 1e-7, false));
        assert!(!vars["values"].requires_grad(), "without a fixmask stage the kept entries are state");

        // The cut model is W + (δ restricted to the kept entries).
        let after = outputs(&model, &all, &x, false);
        assert!(!after.allclose(&before, 1e-6, 1e-6, false), "the cut must drop entries that mattered");
        let flat = Flat::new(&model, true, "test").unwrap();
        let hand = dense_by_hand(&flat, &vars["indices"], &vars["values"]);
        let v = model.vs.variables();
        let (w, b) = (&v["proj.weight"], &v["proj.bias"]);
        let (w0, b0) = (w.copy(), b.copy());
        tch::no_grad(|| {
            w.shallow_clone().copy_(&(&w0 + &hand[0]));
            b.shallow_clone().copy_(&(&b0 + &hand[1]));
        });
        let by_weights = outputs(&model, &[], &x, false);
        tch::no_grad(|| {
            w.shallow_clone().copy_(&w0);
            b.shallow_clone().copy_(&b0);
        });
        assert!(after.allclose(&by_weights, 1e-5, 1e-6, false));
    }

    /// With a fixmask stage the cut comes after step round((1 − f)·total), and
    /// then the kept entries, and only they, receive gradients.
    #[test]
    fn fixmask_cut_comes_at_its_step_and_trains_the_kept_entries() {
        let model = linear_model();
        model.freeze_backbone();
        let mut m = DiffPruning::new(DiffPruningConfig { target_density: 0.25, fixmask_fraction: 0.3, ..Default::default() });
        m.prepare(&model).unwrap();
        randomise(&m);
        for step in 1..=6 {
            m.after_step(&StepCx { model: &model, step, total: 10, lr: 1e-3, params: &[] }).unwrap();
            assert!(!m.is_cut(), "step {step}");
        }
        m.after_step(&StepCx { model: &model, step: 7, total: 10, lr: 1e-3, params: &[] }).unwrap();
        assert!(m.is_cut());
        let values = m.var_store().unwrap().variables()["values"].shallow_clone();
        assert!(values.requires_grad());
        let x = Input::Images(Tensor::randn([5, 4], (Kind::Float, Device::Cpu)));
        let all: Vec<Box<dyn Method>> = vec![Box::new(m)];
        model.forward(&Ctx::new(true, &all, Vec::new()), &x).sum(Kind::Float).backward();
        assert!(values.grad().defined() && values.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    /// Merging gives the unmerged outputs, before and after the cut; unmerging
    /// restores every weight bit for bit.
    #[test]
    fn merge_then_unmerge_is_bit_exact() {
        for cut in [false, true] {
            for model in [testing::vit(1), testing::cnn(1)] {
                let x = testing::images();
                let mut m = DiffPruning::new(DiffPruningConfig { target_density: 0.05, ..Default::default() });
                m.prepare(&model).unwrap();
                randomise(&m);
                if cut {
                    m.after_train(&model, &RunData::train_only(&split())).unwrap();
                }
                let before: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
                let mut all: Vec<Box<dyn Method>> = vec![Box::new(m)];
                let unmerged = outputs(&model, &all, &x, false);
                assert!(!outputs(&model, &[], &x, false).allclose(&unmerged, 1e-4, 1e-4, false), "the diff must matter");
                all[0].merge(&model).unwrap();
                assert!(outputs(&model, &all, &x, false).allclose(&unmerged, 1e-4, 1e-4, false), "{} cut {cut}", model.backbone.arch());
                all[0].unmerge(&model).unwrap();
                let after = model.vs.variables();
                for (n, t) in &before {
                    assert!(after[n].equal(t), "{n} differs after unmerge (cut {cut})");
                }
            }
        }
    }

    /// With w = 0 the output is exactly the plain model's, in evaluation on
    /// every family and in training (random gates) on BERT.
    #[test]
    fn identity_at_init() {
        for (model, x) in [
            (testing::bert(2), testing::tokens()),
            (testing::vit(2), testing::images()),
            (testing::efficientnet(2), testing::images()),
            (testing::cnn(2), testing::images()),
        ] {
            let mut m = DiffPruning::new(DiffPruningConfig::default());
            m.prepare(&model).unwrap();
            assert!(m.identity_at_init());
            let all: Vec<Box<dyn Method>> = vec![Box::new(m)];
            assert!(outputs(&model, &all, &x, false).equal(&outputs(&model, &[], &x, false)), "{}", model.backbone.arch());
            if model.backbone.arch() == "bert" {
                assert!(outputs(&model, &all, &x, true).equal(&outputs(&model, &[], &x, true)));
            }
        }
    }

    /// A short run through the engine: w, log α (at its own learning rate) and
    /// the head train, the backbone does not; after the cut the artifact holds
    /// only the kept entries, and restores into a fresh (uncut) method with the
    /// same outputs.
    #[test]
    fn train_cut_save_restore_round_trip() {
        use zhijian_core::train::{TrainOptions, artifact, method_variables, prepare, restore, train, trainable};
        let x = testing::tokens();
        let data = Split { name: "train".into(), input: testing::tokens(), labels: testing::labels() };
        let model = testing::bert(5);
        let frozen: Vec<(String, Tensor)> = model.vs.variables().into_iter().filter(|(n, _)| !n.starts_with("head.")).map(|(n, t)| (n, t.copy())).collect();
        let mut all: Vec<Box<dyn Method>> =
            vec![Box::new(DiffPruning::new(DiffPruningConfig { target_density: 0.01, fixmask_fraction: 0.0, ..Default::default() }))];
        prepare(&model, &mut all, 0).unwrap();
        let flat = Flat::new(&model, true, "test").unwrap();
        let head = model.num_classes() * (model.backbone.hidden_size() + 1);
        let count = |v: &[(String, Tensor)]| v.iter().map(|(_, t)| t.numel() as i64).sum::<i64>();
        assert_eq!(count(&trainable(&model, &all)), 2 * flat.total + head, "w and log α train, the kept entries do not");
        let cfg = TrainConfig { batch_size: 3, max_steps: 3, lr: 1e-2, ..Default::default() };
        train(&model, &mut all, &data, None, &cfg, &TrainOptions::default()).unwrap();
        assert_eq!(all[0].param_opts("x.weight.log_alpha"), ParamOpts { lr_scale: 10.0, decay: Some(false) });
        let vars = method_variables(&all);
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["diff_pruning/indices", "diff_pruning/values"]);
        assert_eq!(vars[1].1.numel() as i64, flat.budget(0.01));
        assert!(vars[1].1.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the diff must have trained");
        let after = model.vs.variables();
        for (n, t) in &frozen {
            assert!(after[n].equal(t), "{n} is frozen but changed");
        }
        let want = outputs(&model, &all, &x, false);

        let dir = std::env::temp_dir().join(format!("zhijian-diff-pruning-{}", std::process::id()));
        let path = dir.join("a.safetensors");
        zhijian_core::save_atomic(&artifact(&model, &all), &path).unwrap();
        let fresh = testing::with_weights(testing::bert(5), &frozen);
        let mut again: Vec<Box<dyn Method>> = vec![Box::new(DiffPruning::new(DiffPruningConfig { target_density: 0.01, ..Default::default() }))];
        prepare(&fresh, &mut again, 0).unwrap();
        restore(&fresh, &again, &path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(outputs(&fresh, &again, &x, false).equal(&want));
    }

    #[test]
    fn config_round_trips_through_toml() {
        let c = DiffPruningConfig { temperature: 2.0 / 3.0, stretch_low: -0.1, stretch_high: 1.1, fixmask_fraction: 0.5, biases: false, ..Default::default() };
        assert_eq!(zhijian_core::parse_config::<DiffPruningConfig>("diff_pruning", &DiffPruning::new(c.clone()).config()).unwrap(), c);
    }

    #[test]
    fn bad_configs_and_a_backbone_without_layers_are_errors() {
        let model = linear_model();
        let d = DiffPruningConfig::default;
        for (c, field) in [
            (DiffPruningConfig { target_density: 0.0, ..d() }, "target_density"),
            (DiffPruningConfig { target_density: 1.5, ..d() }, "target_density"),
            (DiffPruningConfig { l0_penalty: -1.0, ..d() }, "l0_penalty"),
            (DiffPruningConfig { log_alpha_lr: 0.0, ..d() }, "log_alpha_lr"),
            (DiffPruningConfig { log_alpha_init: f64::INFINITY, ..d() }, "log_alpha_init"),
            (DiffPruningConfig { temperature: 0.0, ..d() }, "temperature"),
            (DiffPruningConfig { stretch_low: 0.0, ..d() }, "stretch"),
            (DiffPruningConfig { stretch_high: 1.0, ..d() }, "stretch"),
            (DiffPruningConfig { fixmask_fraction: 1.0, ..d() }, "fixmask_fraction"),
        ] {
            let err = DiffPruning::new(c).prepare(&model).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        let norm_only = Model::new(Device::Cpu, 2, |p| Box::new(NormOnly(zhijian_core::layers::LayerNorm::new(p / "ln", 4, 1e-5))));
        let err = DiffPruning::new(d()).prepare(&norm_only).unwrap_err();
        assert!(err.to_string().contains("diff_pruning") && err.to_string().contains("norm_only"), "{err}");
    }
}
