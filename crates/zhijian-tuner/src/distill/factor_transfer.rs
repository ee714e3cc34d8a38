//! Factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network
//! Compression via Factor Transfer", NeurIPS 2018,
//! <https://arxiv.org/abs/1802.04977>; RepDistiller `distiller_zoo/FT.py`,
//! `models/util.py: Paraphraser, Translator`, `helper/pretrain.py`).
//!
//! A paraphraser (an autoencoder on the teacher's feature) is first trained to
//! reconstruct that feature; its encoder's output is the teacher's "factor".
//! A translator maps the student's feature to a factor of the same width, and
//! the loss compares the two factors' attention-style maps:
//!
//! ```text
//! φ(x) = normalize(mean_c x²)  (flattened over positions)
//! loss = mean |φ(translator(f_s)) − φ(paraphraser_encoder(f_t))|      (p₁ = 2, p₂ = 1, as RepDistiller)
//! ```
//!
//! with the factor maps brought to the same positions (the larger map pooled
//! to the smaller). β = 200 (RepDistiller's run script); factor width
//! `rate · teacher channels`, rate k = 0.5.
//!
//! - paraphraser: encoder 3×3 convolutions C→C→kC→kC, decoder kC→kC→C→C, each
//!   followed by LeakyReLU(0.1), no BatchNorm (the reference's `use_bn=False`);
//!   the reference's decoder uses transposed convolutions, which at stride 1
//!   and padding 1 are convolutions with a flipped kernel: the same maps, here
//!   written as convolutions. Translator: 3×3 convolutions Cₛ→Cₛ→kC→kC, each
//!   with BatchNorm (batch statistics) and LeakyReLU(0.1). On token sequences
//!   the 3×3 convolutions become linear maps per token.
//! - pre-training phase: in `before_train`, on the teacher's features of
//!   random batches of the training split (the teacher's own copy of it if
//!   it reads it differently; `train.batch_size` examples per batch), with
//!   the mean squared reconstruction error. RepDistiller trains it for 30
//!   epochs before the 240 of distillation, one eighth: by default here one
//!   eighth of the run's optimiser steps (`paraphraser_steps` sets it), with
//!   Adam at `paraphraser_lr` 1e-3 (the reference: SGD at 0.01, momentum 0.9,
//!   weight decay 5e-4, whose step size depends on the features' scale,
//!   which differs widely between CNNs and transformers). The time counts in
//!   the run's train time; the first and last reconstruction losses are in
//!   the run's summary. Then the paraphraser is frozen (the reference keeps
//!   it out of the distillation's optimiser).
//! - features: the last block on both sides by default (the reference's
//!   `feat[-2]`); block outputs of one form (maps, or token sequences of one
//!   length); vectors are refused (a one-position factor map is constant).
//! - trains: the translator (training-only, not in the artifact) and whatever
//!   the strategy trains; the paraphraser is frozen, training-only state.

use std::cell::Cell;

use serde::{Deserialize, Serialize};
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Kind, Reduction, Tensor};
use zhijian_core::{Error, Result, StepOutput, WeightCache};

use super::{Act, DistillLoss, Distiller, Feature, Form, LayerSpec, Setup, Stack, align, by_position, check_positive, check_weight, need_positions, normalize};

/// Configuration of factor transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactorTransferConfig {
    /// β, weight of the loss beside the cross-entropy. Default 200.
    pub weight: f64,
    /// Factor width over the teacher's channels, in (0, 1]. Default 0.5.
    pub rate: f64,
    /// Optimiser steps of the paraphraser's pre-training, ≥ 1. Default: one
    /// eighth of the run's steps (RepDistiller: 30 of 240 epochs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paraphraser_steps: Option<usize>,
    /// Adam's learning rate for the pre-training, > 0. Default 1e-3.
    pub paraphraser_lr: f64,
    /// The student's feature: `"last"` or a block index (`"pooled"` is refused). Default last.
    pub student: Feature,
    /// The teacher's feature. Default last.
    pub teacher: Feature,
}

impl Default for FactorTransferConfig {
    fn default() -> Self {
        FactorTransferConfig { weight: 200.0, rate: 0.5, paraphraser_steps: None, paraphraser_lr: 1e-3, student: Feature::Last, teacher: Feature::Last }
    }
}

/// The factor-transfer loss, its paraphraser and translator.
pub struct FactorTransferLoss {
    config: FactorTransferConfig,
    /// The paraphraser's encoder (frozen) and the translator.
    parts: Option<(Stack, Stack)>,
    /// Pre-training: steps, first and last reconstruction losses.
    pretrained: Cell<Option<(usize, f64, f64)>>,
}

/// The `factor_transfer` method.
pub type FactorTransfer = Distiller<FactorTransferLoss>;

/// The factor map `normalize(mean_c x²)` (`[b, positions]`).
fn factor(x: &Tensor) -> Tensor {
    normalize(&by_position(x).square().mean_dim(1, false, Kind::Float), 1)
}

/// `mean |φ(s) − φ(t)|` of two factors, brought to the same positions.
pub fn ft_loss(s: &Tensor, t: &Tensor) -> std::result::Result<Tensor, String> {
    let (s, t) = align(s, t)?;
    Ok((factor(&s) - factor(&t)).abs().mean(Kind::Float))
}

/// A 3×3 layer with LeakyReLU(0.1), with or without BatchNorm.
fn conv(c_in: i64, c_out: i64, batch_norm: bool) -> LayerSpec {
    LayerSpec { c_in, c_out, kernel: 3, bias: true, batch_norm, act: Act::Leaky }
}

impl FactorTransferLoss {
    /// Trains the paraphraser (`encoder`, `decoder`, every variable of `vs`
    /// so far) to reconstruct the teacher's features; returns the steps and
    /// the first and last losses.
    fn pretrain(&self, setup: &Setup, vs: &VarStore, encoder: &Stack, decoder: &Stack) -> Result<(usize, f64, f64)> {
        let (tap, _) = setup.teacher_tap.as_ref().ok_or_else(|| Error::Config("factor_transfer: no teacher tap".into()))?;
        let teacher = setup.teacher;
        let input = teacher.train_input.as_ref().unwrap_or(&setup.data.train.input);
        let n = input.len();
        let steps = self.config.paraphraser_steps.unwrap_or_else(|| setup.cfg.total_steps(n).div_ceil(8)).max(1);
        let batch = setup.cfg.batch_size.clamp(1, n.max(1));
        let mut opt = tch::nn::Adam::default().build(vs, self.config.paraphraser_lr)?;
        let weights = WeightCache::new();
        let (mut order, mut at) = (Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)), 0);
        let (mut first, mut last) = (f64::NAN, f64::NAN);
        for step in 0..steps {
            if at >= n {
                (order, at) = (Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)), 0);
            }
            let len = batch.min(n - at);
            let idx = order.narrow(0, at, len);
            at += len;
            let x = input.select(&idx, teacher.model.device())?;
            let mut out = teacher.run(&x, std::slice::from_ref(tap), &weights);
            let f = out.taps.remove(tap).ok_or_else(|| Error::Config(format!("factor_transfer: the teacher gave no {tap:?}")))?;
            let f = f.to_kind(Kind::Float).to_device(vs.device()).detach();
            let loss = decoder.forward(&encoder.forward(&f)).mse_loss(&f, Reduction::Mean);
            opt.backward_step(&loss);
            last = loss.double_value(&[]);
            if step == 0 {
                first = last;
            }
            if !last.is_finite() {
                return Err(Error::Diverged { step, loss: last });
            }
        }
        Ok((steps, first, last))
    }
}

impl DistillLoss for FactorTransferLoss {
    const NAME: &'static str = "factor_transfer";
    type Config = FactorTransferConfig;

    fn new(config: FactorTransferConfig) -> Result<Self> {
        check_weight(Self::NAME, "weight", config.weight)?;
        check_positive(Self::NAME, "paraphraser_lr", config.paraphraser_lr)?;
        if !(config.rate > 0.0 && config.rate <= 1.0) {
            return Err(Error::MethodConfig { method: Self::NAME.into(), message: format!("rate must be in (0, 1], got {}", config.rate) });
        }
        if config.paraphraser_steps == Some(0) {
            return Err(Error::MethodConfig { method: Self::NAME.into(), message: "paraphraser_steps must be ≥ 1, got 0".into() });
        }
        Ok(FactorTransferLoss { config, parts: None, pretrained: Cell::new(None) })
    }

    fn config(&self) -> &FactorTransferConfig {
        &self.config
    }

    fn weight(&self) -> f64 {
        self.config.weight
    }

    fn features(&self) -> Option<(Feature, Feature)> {
        Some((self.config.student, self.config.teacher))
    }

    fn check(&self, s: Form, t: Form) -> std::result::Result<(), String> {
        need_positions(s, t)
    }

    fn build(&mut self, setup: &Setup, vs: &VarStore) -> Result<()> {
        let (s, t) = setup.shapes();
        let (form, _) = setup.forms().map_err(Error::Config)?;
        let (c_s, c_t) = (form.channels(s), form.channels(t));
        let c_f = ((c_t as f64 * self.config.rate) as i64).max(1);
        let p = vs.root() / "paraphraser";
        let (enc, dec) = (&p / "encoder", &p / "decoder");
        let encoder = Stack::new(form).push(&enc, "0", conv(c_t, c_t, false)).push(&enc, "1", conv(c_t, c_f, false)).push(&enc, "2", conv(c_f, c_f, false));
        let decoder = Stack::new(form).push(&dec, "0", conv(c_f, c_f, false)).push(&dec, "1", conv(c_f, c_t, false)).push(&dec, "2", conv(c_t, c_t, false));
        self.pretrained.set(Some(self.pretrain(setup, vs, &encoder, &decoder)?));
        for (_, v) in vs.variables() {
            let _ = v.set_requires_grad(false);
        }
        let q = vs.root() / "translator";
        let translator = Stack::new(form).push(&q, "0", conv(c_s, c_s, true)).push(&q, "1", conv(c_s, c_f, true)).push(&q, "2", conv(c_f, c_f, true));
        self.parts = Some((encoder, translator));
        Ok(())
    }

    fn loss(&self, s: &Tensor, t: &Tensor, _step: &StepOutput) -> std::result::Result<Tensor, String> {
        let (encoder, translator) = self.parts.as_ref().ok_or("the paraphraser and translator are made in before_train")?;
        let factor_t = tch::no_grad(|| encoder.forward(t));
        ft_loss(&translator.forward(s), &factor_t)
    }

    fn summary(&self) -> Option<toml::Table> {
        let (steps, first, last) = self.pretrained.get()?;
        let mut t = toml::Table::new();
        t.insert("paraphraser_steps".into(), (steps as i64).into());
        t.insert("paraphraser_first_loss".into(), first.into());
        t.insert("paraphraser_last_loss".into(), last.into());
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::testing::{self, close, t, value};
    use zhijian_core::Method;
    use zhijian_core::train::TrainConfig;

    fn unit(v: &[f64]) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Two factor maps (2 and 3 channels at 1×2 positions), against the L1 of the maps written out.
    #[test]
    fn ft_matches_the_factor_maps_written_out() {
        let (s, tt) = ([1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 2.0, 2.0, -1.0, 0.0]);
        let phi_s = unit(&[(1.0 + 9.0) / 2.0, (4.0 + 0.25) / 2.0]);
        let phi_t = unit(&[(0.0 + 4.0 + 1.0) / 3.0, (1.0 + 4.0 + 0.0) / 3.0]);
        let want = ((phi_s[0] - phi_t[0]).abs() + (phi_s[1] - phi_t[1]).abs()) / 2.0;
        close(value(&ft_loss(&t(&s, &[1, 2, 1, 2]), &t(&tt, &[1, 3, 1, 2])).unwrap()), want);
    }

    /// The paraphraser is built on the teacher's width, pre-trained (its
    /// reconstruction improves) and frozen; the translator maps the student's
    /// width to the factor's; all training-only.
    #[test]
    fn ft_pretrains_the_paraphraser_and_builds_the_translator() {
        let (student, teacher) = (testing::cnn(0, &[4, 8]), testing::teacher(testing::cnn(1, &[6, 12, 12])));
        let split = testing::images(0);
        let mut m = FactorTransfer::new(FactorTransferConfig { paraphraser_steps: Some(40), paraphraser_lr: 1e-2, ..Default::default() }).unwrap();
        m.prepare(&student).unwrap();
        m.before_train(&student, &testing::run_data(&split, &teacher), &TrainConfig { batch_size: 4, ..Default::default() }).unwrap();
        let parts = [
            ("paraphraser.encoder.0.weight", &[12i64, 12, 3, 3][..]),
            ("paraphraser.encoder.1.weight", &[6, 12, 3, 3]),
            ("paraphraser.decoder.2.weight", &[12, 12, 3, 3]),
            ("translator.0.weight", &[8, 8, 3, 3]),
            ("translator.1.bn.weight", &[6]),
            ("translator.2.weight", &[6, 6, 3, 3]),
        ];
        testing::assert_parts(&m, &parts);
        let vars = m.var_store().unwrap().variables();
        assert!(vars.iter().all(|(n, v)| v.requires_grad() == n.starts_with("translator")));
        let summary = m.summary().unwrap();
        assert_eq!(summary["paraphraser_steps"].as_integer(), Some(40));
        let (first, last) = (summary["paraphraser_first_loss"].as_float().unwrap(), summary["paraphraser_last_loss"].as_float().unwrap());
        assert!(last < first, "the reconstruction did not improve: {first} → {last}");
        assert!(value(&testing::one_loss(&student, &teacher, &split, &m)).is_finite());
    }
}
