//! Linear probing: a linear classifier on a frozen pre-trained backbone
//! (the standard transfer baseline; e.g. Kornblith et al. 2019,
//! <https://arxiv.org/abs/1805.08974>).
//!
//! - trains: the head only; frozen: the whole backbone; merges: nothing to merge.
//! - Because nothing in the backbone changes, the engine computes the pooled
//!   features of every split once and trains the head on that cache
//!   ([`zhijian_core::train::features_cacheable`]): epochs cost almost nothing.

use serde::{Deserialize, Serialize};
use zhijian_core::{Method, Model, Result, config_table};

/// Linear probing has no knobs of its own: the head's optimiser and budget are
/// the strategy's `train` settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearProbeConfig {}

/// The linear-probe method.
#[derive(Debug, Default)]
pub struct LinearProbe {
    config: LinearProbeConfig,
}

impl LinearProbe {
    /// A linear probe.
    pub fn new(config: LinearProbeConfig) -> Self {
        LinearProbe { config }
    }
}

impl Method for LinearProbe {
    fn name(&self) -> &'static str {
        "linear_probe"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    /// The engine has already frozen the backbone and left the head trainable;
    /// re-freezing here keeps a probe a probe whatever came before it.
    fn prepare(&mut self, model: &Model) -> Result<()> {
        model.freeze_backbone();
        Ok(())
    }
}
