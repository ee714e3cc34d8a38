//! Partial-k fine-tuning: train only the last `k` blocks (Yosinski et al.
//! 2014, "How transferable are features in deep neural networks?",
//! <https://arxiv.org/abs/1411.1792>; the "partial-k" baseline of He et al.
//! 2022 and Jia et al. 2022).
//!
//! - trains: every parameter of blocks `num_blocks − k … num_blocks − 1`, the
//!   parts after the blocks (final norm, pooler, a CNN's head convolution) unless
//!   `neck = false`, and the head; frozen: the stem and the earlier blocks.
//! - adds no parameters, so nothing to merge.
//! - artifact: the trained blocks (with their BatchNorm statistics) and the head.
//!   `k = 0` with `neck = false` is a linear probe.
//!
//! Blocks are the backbone's [`zhijian_core::ParamGroup::Block`] units:
//! transformer layers, EfficientNet stages, ResNet stages.

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, Method, Model, ParamGroup, Result, config_table};

/// Configuration of partial-k fine-tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartialKConfig {
    /// How many of the last blocks train. Default 2.
    pub k: usize,
    /// Whether the parts after the blocks (final norm, pooler, head convolution)
    /// train too. Default true.
    pub neck: bool,
}

impl Default for PartialKConfig {
    fn default() -> Self {
        PartialKConfig { k: 2, neck: true }
    }
}

/// The partial-k method.
#[derive(Debug, Default)]
pub struct PartialK {
    config: PartialKConfig,
}

impl PartialK {
    /// Partial-k with `config`.
    pub fn new(config: PartialKConfig) -> Self {
        PartialK { config }
    }

    /// The first block that trains on a backbone of `blocks` blocks.
    pub fn first_trained_block(&self, blocks: usize) -> usize {
        blocks - self.config.k.min(blocks)
    }
}

impl Method for PartialK {
    fn name(&self) -> &'static str {
        "partial_k"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let blocks = model.backbone.num_blocks();
        if self.config.k > blocks {
            return Err(Error::MethodConfig {
                method: "partial_k".into(),
                message: format!("k = {} but {} has only {blocks} blocks", self.config.k, model.backbone.arch()),
            });
        }
        let first = self.first_trained_block(blocks);
        let neck = self.config.neck;
        model.unfreeze_where(|_, group| match group {
            ParamGroup::Block(i) => i >= first,
            ParamGroup::Neck => neck,
            ParamGroup::Stem | ParamGroup::Head => false,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn trains_the_last_k_blocks_and_the_neck() {
        let model = testing::bert(0);
        model.freeze_backbone();
        PartialK::new(PartialKConfig { k: 1, neck: true }).prepare(&model).unwrap();
        for (name, t) in model.vs.variables() {
            let want = matches!(model.group(&name), ParamGroup::Block(1) | ParamGroup::Neck | ParamGroup::Head);
            assert_eq!(t.requires_grad(), want && !zhijian_core::layers::is_buffer(&name), "{name}");
        }
        let model = testing::efficientnet(0);
        model.freeze_backbone();
        PartialK::new(PartialKConfig { k: 0, neck: false }).prepare(&model).unwrap();
        assert_eq!(model.trainable().len(), 2, "k = 0 without the neck is a linear probe");
        let err = PartialK::new(PartialKConfig { k: 3, neck: true }).prepare(&testing::bert(0)).unwrap_err().to_string();
        assert!(err.contains("only 2 blocks"), "{err}");
    }
}
