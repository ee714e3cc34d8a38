//! Output-space ensembles: several trained models predict, and their outputs
//! are combined. Unlike the weight-space rules ([`crate::merge`]) only the
//! outputs meet, so the members may be different backbones (MiniLM and MPNet
//! on text; one network at two input resolutions), each reading the examples
//! through its own tokenizer or image pipeline. Nothing here runs a model:
//! the caller hands over each member's logits or pooled features on the same
//! examples, in the same order. A `[[merge]]` entry asks for it with
//! `rule = { kind = "ensemble", combine = "probabilities" }`.
//!
//! | `combine` | what it computes | trains |
//! |---|---|---|
//! | `probabilities` | Σᵢ wᵢ softmax(zᵢ), the deep-ensemble rule (Lakshminarayanan et al. 2017) | nothing |
//! | `logits` | Σᵢ wᵢ zᵢ | nothing |
//! | `features` | a feature ensemble: one linear probe on the standardised concatenation [f₁ ‖ f₂ ‖ …] of the members' pooled features, fitted on the training split | the probe |
//!
//! Weights wᵢ default to uniform; given ones are non-negative and are
//! normalised to sum 1, so `[2, 1]` means two thirds and one third. The
//! feature ensemble takes no weights and ignores the members' heads: the
//! probe sees every member's features and learns its own mix.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};
use zhijian_core::train::{Optimizer, OptimizerConfig};
use zhijian_core::{Error, Result};

/// How the members' outputs are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The weighted mean of the members' softmax probabilities.
    #[default]
    Probabilities,
    /// The weighted mean of the members' logits.
    Logits,
    /// One linear probe on the members' concatenated pooled features.
    Features,
}

impl Combine {
    /// As `combine` writes it.
    pub fn name(self) -> &'static str {
        match self {
            Combine::Probabilities => "probabilities",
            Combine::Logits => "logits",
            Combine::Features => "features",
        }
    }
}

/// The `ensemble` rule's settings (`rule = { kind = "ensemble", … }`). The
/// probe's settings (`steps`, `lr`, `weight_decay`) belong to
/// `combine = "features"` alone; [`Ensemble::fill_defaults`] writes their
/// defaults in there, so a record holds every value the probe used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ensemble {
    /// `probabilities`, `logits` or `features`. Default `probabilities`.
    #[serde(default)]
    pub combine: Combine,
    /// One non-negative weight per member, in the members' order (this
    /// experiment's strategies, seed-major within each, then each `with`
    /// entry's runs); normalised to sum 1. Default: uniform. Not with
    /// `features`, whose probe weighs the members itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// `features`: full-batch AdamW steps of the probe. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// `features`: the probe's peak learning rate (cosine-decayed to 0). Default 1e-2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// `features`: AdamW's decoupled weight decay of the probe's matrix. Default 1e-2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
}

/// How the feature ensemble's probe trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeSettings {
    /// Full-batch AdamW steps.
    pub steps: usize,
    /// Peak learning rate, cosine-decayed to 0 over the steps.
    pub lr: f64,
    /// Decoupled weight decay of the weight matrix (not the bias).
    pub weight_decay: f64,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        // 300 full-batch steps from zero reach a plateau on standardised features of a few
        // thousand examples; 1e-2 is the usual probe rate (the tuner's ProbeConfig too).
        ProbeSettings { steps: 300, lr: 1e-2, weight_decay: 1e-2 }
    }
}

impl Ensemble {
    /// The rule's name in tables and logs.
    pub fn name(&self) -> &'static str {
        match self.combine {
            Combine::Probabilities => "ensemble (probabilities)",
            Combine::Logits => "ensemble (logits)",
            Combine::Features => "feature ensemble (probe on concatenated features)",
        }
    }

    /// Checks the settings: weights non-negative, finite and not all zero;
    /// probe settings only with `combine = "features"`, and in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("merge rule `ensemble`: {what}")));
        if let Some(w) = &self.weights {
            if w.is_empty() {
                return bad("`weights = []`: give one weight per member, or leave it out for uniform weights".into());
            }
            if let Some((i, v)) = w.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
                return bad(format!("`weights[{i}] = {v}`: weights must be non-negative numbers"));
            }
            if w.iter().sum::<f64>() <= 0.0 {
                return bad("`weights` are all 0: at least one member must count".into());
            }
        }
        if self.combine == Combine::Features && self.weights.is_some() {
            return bad("`weights` set with combine = \"features\": the probe on the concatenated features weighs the members itself".into());
        }
        if self.combine != Combine::Features {
            let set: Vec<&str> = [("steps", self.steps.is_some()), ("lr", self.lr.is_some()), ("weight_decay", self.weight_decay.is_some())]
                .into_iter()
                .filter_map(|(name, set)| set.then_some(name))
                .collect();
            if !set.is_empty() {
                return bad(format!(
                    "`{}` set with combine = \"{}\": those are the probe's settings of combine = \"features\"; this combination trains nothing",
                    set.join("`, `"),
                    self.combine.name()
                ));
            }
        }
        if self.steps == Some(0) {
            return bad("`steps = 0`: the probe needs at least 1 step".into());
        }
        if let Some(lr) = self.lr.filter(|lr| !(*lr > 0.0 && lr.is_finite())) {
            return bad(format!("`lr = {lr}`: must be a positive number"));
        }
        if let Some(wd) = self.weight_decay.filter(|wd| !(*wd >= 0.0 && wd.is_finite())) {
            return bad(format!("`weight_decay = {wd}`: must be a non-negative number"));
        }
        Ok(())
    }

    /// Writes the probe's defaults into the unset probe settings of a
    /// feature ensemble (the other combinations have none).
    pub fn fill_defaults(&mut self) {
        if self.combine == Combine::Features {
            let d = ProbeSettings::default();
            self.steps.get_or_insert(d.steps);
            self.lr.get_or_insert(d.lr);
            self.weight_decay.get_or_insert(d.weight_decay);
        }
    }

    /// The probe's settings, defaults where unset.
    pub fn probe(&self) -> ProbeSettings {
        let d = ProbeSettings::default();
        ProbeSettings { steps: self.steps.unwrap_or(d.steps), lr: self.lr.unwrap_or(d.lr), weight_decay: self.weight_decay.unwrap_or(d.weight_decay) }
    }

    /// The weights of `members` members, normalised to sum 1: uniform by
    /// default; given ones must be one per member.
    pub fn member_weights(&self, members: usize) -> Result<Vec<f64>> {
        if members == 0 {
            return Err(Error::Config("merge rule `ensemble`: no members to combine".into()));
        }
        let Some(w) = &self.weights else { return Ok(vec![1.0 / members as f64; members]) };
        if w.len() != members {
            return Err(Error::Config(format!(
                "merge rule `ensemble`: {} weights for {members} members; give one per member, in the members' order (this experiment's strategies, each at its seeds, then each `with` entry's runs)",
                w.len()
            )));
        }
        self.validate()?;
        let sum: f64 = w.iter().sum();
        Ok(w.iter().map(|v| v / sum).collect())
    }

    /// The ensemble's scores from each member's logits on the same examples:
    /// mean probabilities or mean logits, `[n, classes]`; their ranking is
    /// the prediction. `weights` as [`Self::member_weights`] gives them.
    /// A feature ensemble has no such rule: it fits a [`FeatureProbe`].
    pub fn combine(&self, logits: &[&Tensor], weights: &[f64]) -> Result<Tensor> {
        match self.combine {
            Combine::Probabilities => mean_probabilities(logits, weights),
            Combine::Logits => mean_logits(logits, weights),
            Combine::Features => Err(Error::Config("a feature ensemble fits a probe on the members' features; it does not combine their logits".into())),
        }
    }
}

/// Checks that the members' outputs are one per weight and agree in shape.
fn check_outputs(outputs: &[&Tensor], weights: &[f64]) -> Result<()> {
    if outputs.is_empty() || outputs.len() != weights.len() {
        return Err(Error::Config(format!("ensemble: {} members' outputs for {} weights", outputs.len(), weights.len())));
    }
    let first = outputs[0].size();
    if let Some((i, t)) = outputs.iter().enumerate().find(|(_, t)| t.size() != first) {
        return Err(Error::ShapeMismatch { name: format!("ensemble member {i}'s logits"), expected: first, got: t.size() });
    }
    Ok(())
}

/// Σᵢ wᵢ softmax(zᵢ) over the class axis.
///
/// # Shapes
/// each `[n, classes]` → `[n, classes]`, f32.
pub fn mean_probabilities(logits: &[&Tensor], weights: &[f64]) -> Result<Tensor> {
    check_outputs(logits, weights)?;
    Ok(tch::no_grad(|| logits.iter().zip(weights).map(|(z, &w)| z.softmax(-1, Kind::Float) * w).reduce(|a, b| a + b).expect("one member at least")))
}

/// Σᵢ wᵢ zᵢ.
///
/// # Shapes
/// each `[n, classes]` → `[n, classes]`, f32.
pub fn mean_logits(logits: &[&Tensor], weights: &[f64]) -> Result<Tensor> {
    check_outputs(logits, weights)?;
    Ok(tch::no_grad(|| logits.iter().zip(weights).map(|(z, &w)| z.to_kind(Kind::Float) * w).reduce(|a, b| a + b).expect("one member at least")))
}

/// The members' features side by side, `[f₁ ‖ f₂ ‖ …]`.
///
/// # Shapes
/// each `[n, dᵢ]` (one `n`) → `[n, Σ dᵢ]`, f32.
pub fn concatenate(features: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = features.first() else { return Err(Error::Config("ensemble: no members' features to concatenate".into())) };
    let n = first.size()[0];
    if let Some((i, t)) = features.iter().enumerate().find(|(_, t)| t.dim() != 2 || t.size()[0] != n) {
        return Err(Error::ShapeMismatch { name: format!("ensemble member {i}'s features"), expected: vec![n, -1], got: t.size() });
    }
    Ok(Tensor::cat(&features.iter().map(|t| t.to_kind(Kind::Float)).collect::<Vec<_>>(), 1))
}

/// The feature ensemble's classifier: the training features' mean and
/// standard deviation (the members' features live on unrelated scales:
/// MiniLM's and MPNet's pooled norms differ, so unstandardised the larger
/// would dominate the first steps), and a linear head on the standardised
/// concatenation.
#[derive(Debug)]
pub struct FeatureProbe {
    /// Per-feature mean of the training features, `[d]`.
    pub mean: Tensor,
    /// Per-feature standard deviation, 1 where it is 0 (a constant feature), `[d]`.
    pub std: Tensor,
    /// `[classes, d]`.
    pub weight: Tensor,
    /// `[classes]`.
    pub bias: Tensor,
}

impl FeatureProbe {
    /// Fits the probe to the members' training features (one `[n, dᵢ]` each,
    /// on one device) and labels `[n]`: standardise, then full-batch AdamW on
    /// mean cross-entropy from zero weights (deterministic: no draws), the
    /// rate cosine-decayed to 0. Returns it and the last step's loss.
    pub fn fit(features: &[&Tensor], labels: &Tensor, classes: i64, settings: ProbeSettings) -> Result<(FeatureProbe, f64)> {
        let x = concatenate(features)?;
        let (n, d) = (x.size()[0], x.size()[1]);
        if labels.size() != [n] {
            return Err(Error::ShapeMismatch { name: "ensemble probe's labels".into(), expected: vec![n], got: labels.size() });
        }
        let (mean, std) = tch::no_grad(|| {
            let mean = x.mean_dim(0, false, Kind::Float);
            let std = x.std_dim(0, false, false);
            let std = std.where_self(&std.gt(1e-12), &std.ones_like());
            (mean, std)
        });
        let z = tch::no_grad(|| (&x - &mean) / &std);
        let labels = labels.to_device(x.device());
        let weight = Tensor::zeros([classes, d], (Kind::Float, x.device())).set_requires_grad(true);
        let bias = Tensor::zeros([classes], (Kind::Float, x.device())).set_requires_grad(true);
        let mut opt = Optimizer::new(OptimizerConfig::default(), vec![weight.shallow_clone(), bias.shallow_clone()], settings.weight_decay);
        let mut last = f64::NAN;
        tch::with_grad(|| {
            for step in 0..settings.steps {
                let lr = settings.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / settings.steps as f64).cos());
                let loss = z.linear(&weight, Some(&bias)).cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
                opt.zero_grad();
                loss.backward();
                opt.step(lr);
                last = loss.double_value(&[]);
            }
        });
        Ok((FeatureProbe { mean, std, weight: weight.detach(), bias: bias.detach() }, last))
    }

    /// The probe's logits on the members' features of some examples.
    ///
    /// # Shapes
    /// each `[n, dᵢ]`, in the fit's order and widths → `[n, classes]`.
    pub fn logits(&self, features: &[&Tensor]) -> Result<Tensor> {
        let x = concatenate(features)?;
        if x.size()[1] != self.mean.size()[0] {
            return Err(Error::ShapeMismatch { name: "ensemble probe's input features".into(), expected: self.mean.size(), got: vec![x.size()[1]] });
        }
        Ok(tch::no_grad(|| ((x.to_device(self.mean.device()) - &self.mean) / &self.std).linear(&self.weight, Some(&self.bias))))
    }

    /// The probe's trained parameters (weight and bias).
    pub fn num_params(&self) -> i64 {
        (self.weight.numel() + self.bias.numel()) as i64
    }

    /// Everything the probe predicts with, by name, for its artifact.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        [("mean", &self.mean), ("std", &self.std), ("weight", &self.weight), ("bias", &self.bias)]
            .into_iter()
            .map(|(k, t)| (format!("probe.{k}"), t.shallow_clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f64]]) -> Tensor {
        let cols = rows[0].len() as i64;
        Tensor::from_slice(&rows.concat()).to_kind(Kind::Float).reshape([-1, cols])
    }

    fn values(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&x.flatten(0, -1)).unwrap()
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} against {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} against {want:?}");
        }
    }

    fn rule(text: &str) -> Ensemble {
        let mut e: Ensemble = toml::from_str(text).unwrap();
        e.validate().unwrap();
        e.fill_defaults();
        e
    }

    #[test]
    fn probabilities_are_the_mean_of_two_softmaxes() {
        // softmax(0, ln 3) = (1/4, 3/4); softmax(ln 3, 0) = (3/4, 1/4); softmax(0, 0) = (1/2, 1/2).
        let ln3 = 3f64.ln();
        let a = t(&[&[0.0, ln3], &[0.0, 0.0]]);
        let b = t(&[&[ln3, 0.0], &[0.0, ln3]]);
        let uniform = rule("combine = \"probabilities\"");
        let w = uniform.member_weights(2).unwrap();
        close(&values(&uniform.combine(&[&a, &b], &w).unwrap()), &[0.5, 0.5, 0.375, 0.625]);
        // Weights [3, 1] → 3/4 and 1/4: row 0 = 3/4 (1/4, 3/4) + 1/4 (3/4, 1/4) = (3/8, 5/8).
        let weighted = rule("combine = \"probabilities\"\nweights = [3.0, 1.0]");
        let w = weighted.member_weights(2).unwrap();
        close(&w.iter().map(|&v| v as f32).collect::<Vec<_>>(), &[0.75, 0.25]);
        close(&values(&weighted.combine(&[&a, &b], &w).unwrap()), &[0.375, 0.625, 0.4375, 0.5625]);
    }

    #[test]
    fn logits_are_their_weighted_mean() {
        let a = t(&[&[1.0, -2.0, 4.0]]);
        let b = t(&[&[3.0, 2.0, 0.0]]);
        let e = rule("combine = \"logits\"\nweights = [1.0, 3.0]");
        // 1/4 a + 3/4 b = (0.25 + 2.25, −0.5 + 1.5, 1 + 0) = (2.5, 1, 1).
        close(&values(&e.combine(&[&a, &b], &e.member_weights(2).unwrap()).unwrap()), &[2.5, 1.0, 1.0]);
        // The probabilities' mean is a distribution again.
        let p = rule("combine = \"probabilities\"\nweights = [1.0, 3.0]");
        let probs = values(&p.combine(&[&a, &b], &p.member_weights(2).unwrap()).unwrap());
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{probs:?}");
    }

    #[test]
    fn an_ensemble_of_one_model_returns_its_predictions() {
        let z = t(&[&[0.3, -1.0, 2.0], &[5.0, 0.0, -1.0]]);
        let logits = rule("combine = \"logits\"");
        assert!(logits.combine(&[&z], &logits.member_weights(1).unwrap()).unwrap().allclose(&z, 1e-6, 1e-7, false));
        let probs = rule("combine = \"probabilities\"");
        assert!(probs.combine(&[&z], &probs.member_weights(1).unwrap()).unwrap().allclose(&z.softmax(-1, Kind::Float), 1e-6, 1e-7, false));
        // And of a model with itself, whatever the weights.
        let twice = rule("combine = \"logits\"\nweights = [0.2, 5.0]");
        assert!(twice.combine(&[&z, &z], &twice.member_weights(2).unwrap()).unwrap().allclose(&z, 1e-5, 1e-6, false));
    }

    #[test]
    fn weights_are_checked_and_named() {
        let err = |text: &str| {
            let e: Ensemble = toml::from_str(text).unwrap();
            e.validate().unwrap_err().to_string()
        };
        let e = err("weights = [1.0, -0.5]");
        assert!(e.contains("weights[1] = -0.5") && e.contains("non-negative"), "{e}");
        assert!(err("weights = [0.0, 0.0]").contains("all 0"));
        assert!(err("weights = []").contains("one weight per member"));
        let e = rule("weights = [1.0, 2.0]").member_weights(3).unwrap_err().to_string();
        assert!(e.contains("2 weights for 3 members"), "{e}");
        let e = err("combine = \"logits\"\nsteps = 10");
        assert!(e.contains("`steps`") && e.contains("combine = \"features\""), "{e}");
        assert!(err("combine = \"features\"\nlr = 0.0").contains("`lr = 0`"));
        assert!(err("combine = \"features\"\nsteps = 0").contains("steps = 0"));
        assert!(err("combine = \"features\"\nweights = [1.0, 1.0]").contains("weighs the members itself"));
        assert!(toml::from_str::<Ensemble>("combine = \"votes\"").unwrap_err().to_string().contains("votes"));
        assert!(toml::from_str::<Ensemble>("wieghts = [1.0]").unwrap_err().to_string().contains("wieghts"));
        // Defaults: uniform weights; the probe's settings filled in for features only.
        assert_eq!(rule("").member_weights(4).unwrap(), vec![0.25; 4]);
        assert_eq!(rule("combine = \"features\"").steps, Some(300));
        assert_eq!(rule("combine = \"logits\"").steps, None);
    }

    #[test]
    fn concatenation_keeps_the_members_columns_in_order() {
        let a = t(&[&[1.0], &[2.0]]);
        let b = t(&[&[3.0, 4.0], &[5.0, 6.0]]);
        close(&values(&concatenate(&[&a, &b]).unwrap()), &[1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
        let short = t(&[&[1.0]]);
        assert!(concatenate(&[&a, &short]).unwrap_err().to_string().contains("member 1"));
    }

    #[test]
    fn the_probe_standardises_and_separates_what_one_member_alone_cannot() {
        // Member a sees the class in column 0 only at a tiny scale, member b carries noise at a
        // large scale: standardised, the probe still finds a's signal.
        tch::manual_seed(0);
        let n = 64;
        let labels = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).remainder(2);
        let a = (labels.to_kind(Kind::Float) * 2.0 - 1.0).unsqueeze(1) * 1e-3 + Tensor::randn([n, 1], (Kind::Float, tch::Device::Cpu)) * 1e-4;
        let b = Tensor::randn([n, 3], (Kind::Float, tch::Device::Cpu)) * 100.0;
        let (probe, loss) = FeatureProbe::fit(&[&a, &b], &labels, 2, ProbeSettings { steps: 200, lr: 0.05, weight_decay: 0.0 }).unwrap();
        assert!(loss < 0.1, "{loss}");
        let hits = probe.logits(&[&a, &b]).unwrap().argmax(1, false).eq_tensor(&labels).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(hits, n);
        // The statistics are the training features': the first column's mean is ~0, its std ~1e-3.
        let std = values(&probe.std);
        assert!((std[0] - 1e-3).abs() < 2e-4 && std[1] > 50.0, "{std:?}");
        assert_eq!(probe.num_params(), 2 * 4 + 2);
        assert_eq!(probe.tensors().len(), 4);
        // Features of other widths are refused.
        assert!(probe.logits(&[&a]).is_err());
    }

    #[test]
    fn a_constant_feature_is_left_unscaled() {
        let x = t(&[&[1.0, 7.0], &[3.0, 7.0]]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let (probe, _) = FeatureProbe::fit(&[&x], &y, 2, ProbeSettings { steps: 5, ..ProbeSettings::default() }).unwrap();
        close(&values(&probe.std), &[1.0, 1.0]);
        assert!(values(&probe.logits(&[&x]).unwrap()).iter().all(|v| v.is_finite()));
    }
}
