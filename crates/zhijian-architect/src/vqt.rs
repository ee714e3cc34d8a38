//! VQT, Visual Query Tuning (Tu, Mai & Chao, CVPR 2023,
//! <https://arxiv.org/abs/2212.03220>): a few learned query tokens enter every
//! block, attend to that block's tokens, and come out as a summary of its
//! intermediate features; a linear head reads the summaries of all blocks
//! beside the usual pooled feature.
//!
//! - The queries are observers ([`zhijian_core::Tokens::insert_observers`]):
//!   they attend to the backbone's tokens, no token attends to them (their
//!   keys are masked), so the backbone's own features are exactly those of the
//!   frozen model. Block `i` replaces block `i − 1`'s queries with its own.
//! - Head: the paper's linear classifier over `[pooled, q₀, …, q_{L−1}]` is
//!   written as the model's head on `pooled` plus this method's linear map
//!   `W` (`[classes, L·k·hidden]`, zero-initialised, so the model is unchanged
//!   at initialisation) on the concatenated query outputs (each block's output
//!   at its query positions, read from the `Tap::Block` taps).
//! - trains: the queries `[L, k, hidden]`, `W` and the head; frozen: the
//!   backbone. Queries are initialised uniformly in ±√(6 / (fan_in + hidden))
//!   as VPT and LAMDA-ZhiJian's VQT do ([`crate::vpt::prompt_init`]: fan_in =
//!   channels·patch² on a ViT, `hidden` on BERT).
//! - does not merge (the queries are extra tokens); artifact: queries and `W`.
//! - Gradients reach the queries through each block's attention and MLP rows of
//!   the query tokens only: no gradient flows into the backbone's features.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use zhijian_core::layers::dropout;
use zhijian_core::{Error, Method, Model, Result, Tap, Tokens, config_table};

use crate::bottleneck::check_dropout;
use crate::vpt::prompt_init;

/// Configuration of VQT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqtConfig {
    /// Query tokens per block. Default 3 (LAMDA-ZhiJian's default).
    pub tokens: i64,
    /// Dropout on the queries entering each block during training. Default 0.
    pub dropout: f64,
    /// Average each block's query outputs instead of concatenating them (the
    /// reference's `pool_feats`; `W` then reads `L·hidden` features). Default false.
    pub mean_over_tokens: bool,
}

impl Default for VqtConfig {
    fn default() -> Self {
        VqtConfig { tokens: 3, dropout: 0.0, mean_over_tokens: false }
    }
}

/// The VQT method.
pub struct Vqt {
    config: VqtConfig,
    vs: Option<VarStore>,
    queries: Option<Tensor>,
    readout: Option<Tensor>,
    blocks: usize,
    /// Where the queries sit in the block outputs, seen by the last `block_input`.
    start: Cell<i64>,
}

impl Vqt {
    /// VQT with `config` (parameters are created by `prepare`).
    pub fn new(config: VqtConfig) -> Self {
        Vqt { config, vs: None, queries: None, readout: None, blocks: 0, start: Cell::new(0) }
    }

    /// The features `W` reads: each block's query outputs, concatenated.
    ///
    /// # Shapes
    /// → `[batch, L·k·hidden]` (or `[batch, L·hidden]` with `mean_over_tokens`).
    fn summaries(&self, taps: &BTreeMap<Tap, Tensor>) -> Tensor {
        let (start, k) = (self.start.get(), self.config.tokens);
        let per_block: Vec<Tensor> = (0..self.blocks)
            .map(|i| {
                let q = taps[&Tap::Block(i)].narrow(1, start, k);
                if self.config.mean_over_tokens { q.mean_dim(1, false, None) } else { q.flatten(1, 2) }
            })
            .collect();
        Tensor::cat(&per_block, 1)
    }
}

impl Method for Vqt {
    fn name(&self) -> &'static str {
        "vqt"
    }

    fn config(&self) -> toml::Table {
        config_table(&self.config)
    }

    fn prepare(&mut self, model: &Model) -> Result<()> {
        let c = &self.config;
        let bad = |message: String| Err(Error::MethodConfig { method: "vqt".into(), message });
        if c.tokens < 1 {
            return bad(format!("tokens must be ≥ 1, got {}", c.tokens));
        }
        check_dropout("vqt", c.dropout)?;
        if !model.has_attention() {
            return bad(format!("needs a transformer backbone (bert, vit) whose blocks take tokens; {} has none", model.backbone.arch()));
        }
        let (blocks, hidden) = (model.backbone.num_blocks(), model.backbone.hidden_size());
        let vs = VarStore::new(model.device());
        let root = vs.root();
        self.queries = Some(root.var("queries", &[blocks as i64, c.tokens, hidden], prompt_init(model)));
        let width = if c.mean_over_tokens { blocks as i64 * hidden } else { blocks as i64 * c.tokens * hidden };
        self.readout = Some(root.zeros("readout", &[model.num_classes(), width]));
        self.blocks = blocks;
        self.vs = Some(vs);
        Ok(())
    }

    fn block_input(&self, block: usize, tokens: Tokens, train: bool) -> Tokens {
        let Some(queries) = &self.queries else { return tokens };
        let b = tokens.x.size()[0];
        let q = queries.get(block as i64).unsqueeze(0).expand([b, -1, -1], false);
        let q = dropout(&q, self.config.dropout, train);
        let tokens = if block == 0 { tokens.insert_observers(&q) } else { tokens.replace_observers(&q) };
        self.start.set(tokens.layout.content_start() - self.config.tokens);
        tokens
    }

    fn forward_taps(&self) -> Vec<Tap> {
        (0..self.blocks).map(Tap::Block).collect()
    }

    fn logits(&self, logits: Tensor, taps: &BTreeMap<Tap, Tensor>, _train: bool) -> Tensor {
        match &self.readout {
            Some(w) if taps.contains_key(&Tap::Block(0)) => logits + self.summaries(taps).linear::<Tensor>(w, None),
            _ => logits,
        }
    }

    fn alters_forward(&self) -> bool {
        true
    }

    fn var_store(&self) -> Option<&VarStore> {
        self.vs.as_ref()
    }

    fn var_store_mut(&mut self) -> Option<&mut VarStore> {
        self.vs.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::{Device, Kind};
    use zhijian_core::{Ctx, Input};

    fn prepared(model: &Model, config: VqtConfig) -> Vec<Box<dyn Method>> {
        model.freeze_backbone();
        let mut vqt = Vqt::new(config);
        vqt.prepare(model).unwrap();
        vec![Box::new(vqt)]
    }

    /// The backbone's own features are those of the frozen model whatever the
    /// queries are, and the logits move by exactly W · [q outputs].
    #[test]
    fn queries_observe_without_changing_the_backbone() {
        for (model, input) in [(testing::vit(0), testing::images()), (testing::bert(0), testing::tokens())] {
            let methods = prepared(&model, VqtConfig { tokens: 2, ..Default::default() });
            let plain = model.features(&Ctx::plain(false), &input);
            let cx = Ctx::new(false, &methods, Vec::new());
            let with_queries = model.features(&cx, &input);
            assert!((&with_queries - &plain).abs().max().double_value(&[]) < 1e-5, "the queries changed the backbone's features");
            // Zero readout at init: unchanged logits.
            let base = model.forward(&Ctx::plain(false), &input);
            assert!((model.forward(&Ctx::new(false, &methods, Vec::new()), &input) - &base).abs().max().double_value(&[]) < 1e-5);

            let vqt = methods[0].var_store().unwrap().variables();
            let w = &vqt["readout"];
            tch::no_grad(|| w.shallow_clone().copy_(&w.randn_like()));
            let cx = Ctx::new(false, &methods, Vec::new());
            let logits = model.forward(&cx, &input);
            let taps = cx.take_taps();
            // Block i's output at the query positions: right after the class token.
            let summaries = Tensor::cat(&(0..2).map(|i| taps[&Tap::Block(i)].narrow(1, 1, 2).flatten(1, 2)).collect::<Vec<_>>(), 1);
            let want = &base + summaries.matmul(&w.tr());
            assert!((logits - want).abs().max().double_value(&[]) < 1e-4);
        }
    }

    /// Real tokens give the same logits in a padded batch and alone.
    #[test]
    fn padding_does_not_leak_into_the_queries() {
        let model = testing::bert(1);
        let methods = prepared(&model, VqtConfig::default());
        tch::no_grad(|| {
            let w = &methods[0].var_store().unwrap().variables()["readout"];
            w.shallow_clone().copy_(&w.randn_like())
        });
        let Input::Tokens { ids, mask } = testing::tokens() else { unreachable!() };
        let cx = || Ctx::new(false, &methods, Vec::new());
        let batch = model.forward(&cx(), &Input::Tokens { ids: ids.shallow_clone(), mask: mask.shallow_clone() });
        // Example 0 has 5 real tokens; alone it needs no padding.
        let alone = model.forward(&cx(), &Input::Tokens { ids: ids.narrow(0, 0, 1).narrow(1, 0, 5), mask: mask.narrow(0, 0, 1).narrow(1, 0, 5) });
        assert!((batch.narrow(0, 0, 1) - alone).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn mean_over_tokens_reads_one_vector_per_block_and_cnns_are_refused() {
        let model = testing::vit(0);
        let methods = prepared(&model, VqtConfig { mean_over_tokens: true, ..Default::default() });
        assert_eq!(methods[0].var_store().unwrap().variables()["readout"].size(), [3, 2 * 16]);
        let input = Input::Images(Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu)));
        assert_eq!(model.forward(&Ctx::new(true, &methods, Vec::new()), &input).size(), [2, 3]);
        let err = Vqt::new(VqtConfig::default()).prepare(&testing::efficientnet(0)).err().unwrap().to_string();
        assert!(err.contains("vqt") && err.contains("efficientnet_lite"), "{err}");
        assert!(Vqt::new(VqtConfig { tokens: 0, ..Default::default() }).prepare(&model).is_err());
    }
}
