//! WiSE-FT: weight-space ensembling of the pre-trained and the fine-tuned
//! model (Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes,
//! Hajishirzi, Farhadi, Namkoong & Schmidt, CVPR 2022, "Robust fine-tuning
//! of zero-shot models", <https://arxiv.org/abs/2109.01903>).
//!
//! `θ_α = (1 − α)·θ₀ + α·θ_ft`, every trained tensor interpolated, α chosen
//! after training on the held-out validation split from `alphas` without
//! retraining (each α costs one validation pass). The paper's θ₀ carries a
//! zero-shot head; a backbone without one gets a linear probe on its frozen
//! features instead, and fine-tuning starts from that head (end-to-end
//! fine-tuning "initialised with the zero-shot head", i.e. LP-FT, the
//! paper's recipe for models without zero-shot heads). So θ₀ = (pre-trained
//! backbone, probe head), θ_ft = the run's result.
//!
//! - trains: every backbone parameter and the head (`unfreeze = false`:
//!   what the strategy's other methods unfreeze).
//! - The α search runs the model alone ([`Method::forwards_model_alone`]),
//!   so WiSE-FT interpolates the model's own weights and cannot be combined
//!   with methods that change the forward pass (LoRA: merge first).
//! - BatchNorm running statistics are interpolated with the weights.
//! - The record's summary holds the chosen α and the validation curve.

use serde::{Deserialize, Serialize};
use tch::Tensor;
use zhijian_core::train::{artifact, evaluate};
use zhijian_core::{Compute, Error, Method, Model, Result, RunData, TrainConfig, config_table};

use crate::anchor::{Anchored, snapshot};
use crate::probe::{ProbeConfig, ProbeFit, fit_probe};

/// Configuration of WiSE-FT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WiseFtConfig {
    /// Mixing coefficients tried (0 = pre-trained with the probe head,
    /// 1 = fine-tuned). Default 0, 0.1, …, 1.
    pub alphas: Vec<f64>,
    /// The probe that gives θ₀ its head.
    pub probe: ProbeConfig,
    /// Fine-tune every backbone parameter. Default true.
    pub unfreeze: bool,
}

impl Default for WiseFtConfig {
    fn default() -> Self {
        WiseFtConfig { alphas: (0..=10).map(|i| i as f64 / 10.0).collect(), probe: ProbeConfig::default(), unfreeze: true }
    }
}

impl WiseFtConfig {
    /// Rejects an empty or out-of-range α list and a bad probe, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.alphas.is_empty() || self.alphas.iter().any(|a| !(0.0..=1.0).contains(a)) {
            return Err(Error::MethodConfig {
                method: "wise_ft".into(),
                message: format!("`alphas = {:?}`: needs at least one value, each in [0, 1]", self.alphas),
            });
        }
        self.probe.validate("wise_ft")
    }
}

/// WiSE-FT.
pub struct WiseFt {
    config: WiseFtConfig,
    start: Vec<Anchored>,
    curve: Vec<(f64, f64)>,
    chosen: Option<f64>,
    probe: Option<ProbeFit>,
    eval_batch_size: i64,
}

impl WiseFt {
    /// WiSE-FT with `config`.
    pub fn new(config: WiseFtConfig) -> Self {
        WiseFt { config, start: Vec::new(), curve: Vec::new(), chosen: None, probe: None, eval_batch_size: 128 }
    }
}

/// Writes `(1 − α)·start + α·end` into each anchored parameter.
pub fn interpolate(anchored: &[Anchored], end: &[Tensor], alpha: f64) {
    tch::no_grad(|| {
        for (a, e) in anchored.iter().zip(end) {
            let mixed = &a.start * (1.0 - alpha) + e * alpha;
            a.param.shallow_clone().copy_(&mixed);
        }
    });
}

/// The index of the best score; ties go to the later entry (the larger α:
/// closer to the fine-tuned model, which the validation split cannot tell apart).
fn best(curve: &[(f64, f64)]) -> usize {
    // `max_by` keeps the last of equal maxima.
    (0..curve.len()).max_by(|&i, &j| curve[i].1.total_cmp(&curve[j].1)).unwrap_or(0)
}

impl Method for WiseFt {
    fn name(&self) -> &'static str {
        "wise_ft"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        if self.config.unfreeze {
            model.unfreeze_where(|_, _| true);
        }
        Ok(())
    }

    fn forwards_model_alone(&self) -> bool {
        true
    }

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        if data.val.is_none() {
            return Err(Error::Config("wise_ft chooses α on a validation split, and this run has none".into()));
        }
        self.probe = Some(fit_probe(model, data.train, data.val, &self.config.probe, cfg, "wise_ft")?);
        // The model's trained tensors with the running statistics of the
        // BatchNorm layers that train (what the artifact holds): both ends
        // are whole models, statistics included.
        let tensors: Vec<_> = artifact(model, &[]).into_iter().filter(|(_, t)| t.is_floating_point()).collect();
        self.start = snapshot(&tensors, |_| true);
        self.eval_batch_size = cfg.eval_batch_size;
        Ok(())
    }

    fn after_train(&mut self, model: &Model, data: &RunData) -> Result<()> {
        let val = data.val.ok_or_else(|| Error::Config("wise_ft chooses α on a validation split, and this run has none".into()))?;
        let end: Vec<Tensor> = self.start.iter().map(|a| a.param.detach().copy()).collect();
        self.curve.clear();
        for &alpha in &self.config.alphas {
            interpolate(&self.start, &end, alpha);
            let top1 = evaluate(model, &[], val, self.eval_batch_size, Compute::Fp32)?.top1();
            self.curve.push((alpha, top1));
        }
        let alpha = self.curve[best(&self.curve)].0;
        interpolate(&self.start, &end, alpha);
        self.chosen = Some(alpha);
        Ok(())
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut t = toml::Table::new();
        t.insert("alpha".into(), self.chosen?.into());
        t.insert("alphas".into(), self.curve.iter().map(|c| toml::Value::from(c.0)).collect::<Vec<_>>().into());
        t.insert("val_top1".into(), self.curve.iter().map(|c| toml::Value::from(c.1)).collect::<Vec<_>>().into());
        if let Some(probe) = &self.probe {
            probe.summary(&mut t);
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// θ_α is the straight line between the two ends: α 0.25 of the way.
    #[test]
    fn interpolation_is_linear_in_alpha() {
        let p = Tensor::from_slice(&[4.0f32, -2.0]);
        let anchored = vec![Anchored { name: "w".into(), param: p.shallow_clone(), start: Tensor::from_slice(&[0.0f32, 2.0]) }];
        let end = vec![p.copy()];
        interpolate(&anchored, &end, 0.25);
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, 1.0]);
        interpolate(&anchored, &end, 1.0);
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [4.0, -2.0]);
    }

    /// The best α wins, and a tie goes to the larger α.
    #[test]
    fn best_alpha_prefers_the_fine_tuned_end_on_ties() {
        assert_eq!(best(&[(0.0, 0.5), (0.5, 0.9), (1.0, 0.7)]), 1);
        assert_eq!(best(&[(0.0, 0.5), (0.5, 0.9), (1.0, 0.9)]), 2);
    }

    /// Without a validation split the run is refused before training.
    #[test]
    fn needs_a_validation_split() {
        let model = crate::testing::cnn(0);
        let split = zhijian_core::Split { name: "train".into(), input: crate::testing::images(), labels: crate::testing::labels() };
        let mut methods: Vec<Box<dyn Method>> = vec![Box::new(WiseFt::new(WiseFtConfig::default()))];
        zhijian_core::train::prepare(&model, &mut methods, 0).unwrap();
        let cfg = TrainConfig { max_steps: 1, ..Default::default() };
        let err = zhijian_core::train::train(&model, &mut methods, &split, None, &cfg, &Default::default()).err().unwrap().to_string();
        assert!(err.contains("validation"), "{err}");
    }
}
