//! Full fine-tuning: every pre-trained parameter trains, with a new head
//! (Howard & Ruder 2018, <https://arxiv.org/abs/1801.06146>; Devlin et al. 2019).
//!
//! - trains: all backbone parameters (optionally not the embeddings / stem) and the head.
//! - frozen: nothing (or the stem); merges: the result is itself a full model.

use serde::{Deserialize, Serialize};
use zhijian_core::{Method, Model, ParamGroup, Result, config_table};

/// Configuration of full fine-tuning.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FullFinetuneConfig {
    /// Keep the input embeddings / convolutional stem frozen (saves optimiser
    /// memory: MiniLM's word table is half its parameters). Default false.
    pub freeze_stem: bool,
}

/// The full fine-tuning method.
#[derive(Debug, Default)]
pub struct FullFinetune {
    config: FullFinetuneConfig,
}

impl FullFinetune {
    /// Full fine-tuning with `config`.
    pub fn new(config: FullFinetuneConfig) -> Self {
        FullFinetune { config }
    }
}

impl Method for FullFinetune {
    fn name(&self) -> &'static str {
        "full_finetune"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let freeze_stem = self.config.freeze_stem;
        model.unfreeze_where(|_, group| !(freeze_stem && group == ParamGroup::Stem));
        Ok(())
    }
}
