//! BitFit: fine-tune only the bias terms (Ben Zaken, Ravfogel & Goldberg,
//! ACL 2022, <https://arxiv.org/abs/2106.10199>).
//!
//! - trains: every bias of the backbone (linear layers, convolutions with a
//!   bias, and the shifts of LayerNorm and BatchNorm, which the paper counts as
//!   bias terms) and the head; frozen: every weight matrix, kernel and norm scale.
//! - adds no parameters, so nothing to merge: the trained biases are the model.
//! - artifact: the trained biases and the head (a BatchNorm's running
//!   statistics stay frozen: its scale does not train, see `BatchNorm2d`).
//! - `query_and_mlp_only` keeps the paper's smaller variant: only the
//!   attention query biases and the first MLP (intermediate) biases.

use serde::{Deserialize, Serialize};
use zhijian_core::{Error, Method, Model, ParamGroup, Result, Role, config_table};

/// Configuration of BitFit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BitFitConfig {
    /// Train only the biases of the attention query and the first MLP
    /// projection (the paper's `b_q`, `b_m2` subset, §4). Default false: all biases.
    pub query_and_mlp_only: bool,
}

/// The BitFit method.
#[derive(Debug, Default)]
pub struct BitFit {
    config: BitFitConfig,
}

impl BitFit {
    /// BitFit with `config`.
    pub fn new(config: BitFitConfig) -> Self {
        BitFit { config }
    }
}

impl Method for BitFit {
    fn name(&self) -> &'static str {
        "bitfit"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let chosen: Vec<String> = if self.config.query_and_mlp_only {
            let sites = model.sites();
            let picked: Vec<String> = sites.iter().filter(|s| matches!(s.role, Role::Query | Role::MlpUp)).map(|s| format!("{}.bias", s.path)).collect();
            if picked.is_empty() {
                return Err(Error::MethodConfig {
                    method: "bitfit".into(),
                    message: format!("query_and_mlp_only needs attention query and MLP layers; {} has none", model.backbone.arch()),
                });
            }
            picked
        } else {
            Vec::new()
        };
        let is_trained =
            |name: &str, group: ParamGroup| name.ends_with(".bias") && group != ParamGroup::Head && (chosen.is_empty() || chosen.iter().any(|c| c == name));
        if !model.vs.variables().keys().any(|n| is_trained(n, model.group(n))) {
            return Err(Error::MethodConfig { method: "bitfit".into(), message: format!("{} has no bias terms to train", model.backbone.arch()) });
        }
        model.unfreeze_where(is_trained);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn trained(model: &Model) -> Vec<String> {
        model.trainable().into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn trains_exactly_the_biases_and_the_head() {
        for model in [testing::bert(0), testing::vit(0), testing::efficientnet(0)] {
            model.freeze_backbone();
            BitFit::default().prepare(&model).unwrap();
            let names = trained(&model);
            let all = model.vs.variables();
            // Every bias (the head's included), plus the head's weight.
            let biases = all.keys().filter(|n| n.ends_with(".bias")).count();
            assert_eq!(names.len(), biases + 1, "{names:?}");
            assert!(names.iter().all(|n| n.ends_with(".bias") || n.ends_with("head.weight") || n == "_fc.weight"), "{names:?}");
        }
    }

    #[test]
    fn the_subset_variant_trains_query_and_intermediate_biases() {
        let model = testing::bert(0);
        model.freeze_backbone();
        BitFit::new(BitFitConfig { query_and_mlp_only: true }).prepare(&model).unwrap();
        let names = trained(&model);
        assert_eq!(names.len(), 2 * 2 + 2, "{names:?}");
        assert!(names.contains(&"encoder.layer.1.attention.self.query.bias".to_string()));
        assert!(names.contains(&"encoder.layer.0.intermediate.dense.bias".to_string()));
        let cnn = testing::cnn(0);
        let err = BitFit::new(BitFitConfig { query_and_mlp_only: true }).prepare(&cnn).unwrap_err().to_string();
        assert!(err.contains("bitfit") && err.contains("small_cnn"), "{err}");
    }
}
