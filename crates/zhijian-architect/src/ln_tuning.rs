//! LN-tuning: fine-tune only the normalisation layers' gain and bias (Qi et al.
//! 2022, "Parameter-Efficient Tuning on Layer Normalization for Pre-trained
//! Language Models", <https://arxiv.org/abs/2211.08682>).
//!
//! - trains: the scale and shift of every LayerNorm of a transformer (the
//!   embeddings', each block's and the final one) and the head; on a CNN the
//!   affine parameters of every BatchNorm (the same idea for that family;
//!   training a BatchNorm's scale also makes it normalise with batch statistics
//!   in training and update its running statistics, which the artifact keeps).
//! - frozen: everything else; adds no parameters, so nothing to merge.
//! - artifact: the norms' parameters (and BatchNorm statistics) and the head.

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, Method, Model, Result, Role, config_table};

/// Configuration of LN-tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LnTuningConfig {
    /// Train the norms' scales (gains). Default true.
    pub scale: bool,
    /// Train the norms' shifts (biases). Default true.
    pub shift: bool,
}

impl Default for LnTuningConfig {
    fn default() -> Self {
        LnTuningConfig { scale: true, shift: true }
    }
}

/// The LN-tuning method.
#[derive(Debug, Default)]
pub struct LnTuning {
    config: LnTuningConfig,
}

impl LnTuning {
    /// LN-tuning with `config`.
    pub fn new(config: LnTuningConfig) -> Self {
        LnTuning { config }
    }
}

impl Method for LnTuning {
    fn name(&self) -> &'static str {
        "ln_tuning"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        if !c.scale && !c.shift {
            return Err(Error::MethodConfig { method: "ln_tuning".into(), message: "scale and shift are both false: nothing would train".into() });
        }
        let norms: Vec<String> = model.sites().into_iter().filter(|s| s.role == Role::Norm).map(|s| s.path).collect();
        if norms.is_empty() {
            return Err(Error::MethodConfig { method: "ln_tuning".into(), message: format!("{} has no normalisation layers", model.backbone.arch()) });
        }
        let mut wanted = Vec::new();
        for norm in &norms {
            if c.scale {
                wanted.push(format!("{norm}.weight"));
            }
            if c.shift {
                wanted.push(format!("{norm}.bias"));
            }
        }
        model.unfreeze_where(|name, _| wanted.iter().any(|w| w == name));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn trains_the_norms_of_every_family() {
        // BERT: the embeddings' LayerNorm and 2 a layer; ViT: 2 a block and the final one.
        for (model, norms) in [(testing::bert(0), 1 + 2 * 2), (testing::vit(0), 2 * 2 + 1), (testing::cnn(0), 2)] {
            model.freeze_backbone();
            LnTuning::default().prepare(&model).unwrap();
            let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names.len(), 2 * norms + 2, "{names:?}");
        }
        let model = testing::vit(0);
        model.freeze_backbone();
        LnTuning::new(LnTuningConfig { scale: false, shift: true }).prepare(&model).unwrap();
        let names: Vec<String> = model.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"blocks.1.norm2.bias".to_string()) && !names.contains(&"blocks.1.norm2.weight".to_string()), "{names:?}");
        assert!(LnTuning::new(LnTuningConfig { scale: false, shift: false }).prepare(&model).is_err());
    }
}
