//! LP-FT: linear probing, then fine-tuning (Kumar, Raghunathan, Jones, Ma &
//! Liang, ICLR 2022, "Fine-tuning can distort pretrained features and
//! underperform out-of-distribution", <https://arxiv.org/abs/2202.10054>).
//!
//! Fine-tuning from a random head changes the features most where the head
//! is worst, early on, and distorts them for inputs the training data does
//! not cover. LP-FT first fits the head on the frozen pre-trained features
//! (the linear probe), then fine-tunes everything from that head, so the
//! features move less and out-of-distribution accuracy holds.
//!
//! One strategy, two phases: the probe runs in `before_train` on the pooled
//! features of the training split (plain backbone, evaluation mode, no
//! augmentation; AdamW on the features, `probe = { epochs, lr,
//! weight_decay }`), inside the run's clock; the run's own steps are the
//! fine-tuning phase (the paper uses a smaller learning rate there: set the
//! strategy's `lr`). The paper fits the probe with L-BFGS logistic
//! regression, its L2 strength chosen on validation; `probe.l2 = [λ, …]`
//! does that choice here (AdamW on the penalised loss, the best validation
//! top-1 kept; see [`ProbeConfig::l2`]). Without it the probe is
//! unregularised, and on small training sets it ends very confident.
//!
//! - trains: in phase 2 every backbone parameter and the head
//!   (`unfreeze = false`: only what the strategy's other methods train, e.g.
//!   LoRA: LP then LoRA).

use serde::{Deserialize, Serialize};
use zhijian_core::{Method, Model, Result, RunData, TrainConfig, config_table};

use crate::probe::{ProbeConfig, ProbeFit, fit_probe};

/// Configuration of LP-FT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LpFtConfig {
    /// The probe phase.
    pub probe: ProbeConfig,
    /// Fine-tune every backbone parameter in phase 2. Default true.
    pub unfreeze: bool,
}

impl Default for LpFtConfig {
    fn default() -> Self {
        LpFtConfig { probe: ProbeConfig::default(), unfreeze: true }
    }
}

/// LP-FT.
pub struct LpFt {
    config: LpFtConfig,
    probe: Option<ProbeFit>,
}

impl LpFt {
    /// LP-FT with `config`.
    pub fn new(config: LpFtConfig) -> Self {
        LpFt { config, probe: None }
    }
}

impl Method for LpFt {
    fn name(&self) -> &'static str {
        "lp_ft"
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

    fn before_train(&mut self, model: &Model, data: &RunData, cfg: &TrainConfig) -> Result<()> {
        self.probe = Some(fit_probe(model, data.train, data.val, &self.config.probe, cfg, "lp_ft")?);
        Ok(())
    }

    fn summary(&self) -> Option<toml::Table> {
        let mut t = toml::Table::new();
        self.probe.as_ref()?.summary(&mut t);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use zhijian_core::Split;
    use zhijian_core::train::{TrainOptions, prepare, train};

    /// After the probe phase the head fits the frozen features (loss below
    /// chance by a fifth: a random toy CNN's features are barely separable), and the fine-tuning phase then moves the backbone.
    #[test]
    fn probe_then_fine_tune() {
        let model = testing::cnn(0);
        let split = Split { name: "train".into(), input: testing::images(), labels: testing::labels() };
        let backbone_before = model.vs.variables()["features.0.conv.weight"].copy();
        let mut methods: Vec<Box<dyn Method>> =
            vec![Box::new(LpFt::new(LpFtConfig { probe: ProbeConfig { epochs: 200, lr: 0.05, ..Default::default() }, unfreeze: true }))];
        prepare(&model, &mut methods, 0).unwrap();
        let cfg = TrainConfig { max_steps: 2, batch_size: 6, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        train(&model, &mut methods, &split, None, &cfg, &TrainOptions::default()).unwrap();
        let probe_loss = methods[0].summary().unwrap()["probe_final_loss"].as_float().unwrap();
        assert!(probe_loss < (3f64).ln() * 0.8, "probe loss {probe_loss} (chance {})", (3f64).ln());
        assert!(!model.vs.variables()["features.0.conv.weight"].equal(&backbone_before), "fine-tuning moved nothing");
    }
}
